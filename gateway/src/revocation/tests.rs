use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use certs::mint::{Ca, Validity};

use super::*;

/// A list of area northshire in `dir/name`, current until `validity` ends.
fn list_file(dir: &Path, ca: &Ca, name: &str, validity: Validity) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, ca.revocation_list(&[], 1, validity).unwrap()).unwrap();
    path
}

#[test]
fn a_list_is_warned_about_once_when_it_goes_stale() {
    let dir = tempfile::tempdir().unwrap();
    let area = AreaId::new("northshire").unwrap();
    let ca = Ca::new(&area).unwrap();
    let cas = certs::parse_certs(&ca.pem().cert, "ca").unwrap();
    let day = list_file(
        dir.path(),
        &ca,
        "day.crl",
        Validity::For(Duration::from_secs(86_400)),
    );
    let overdue = list_file(dir.path(), &ca, "overdue.crl", Validity::Expired);
    let paths = [day.clone(), overdue.clone()];
    let list = RevocationList::load([(&area, &paths[..], &cas[..])]).unwrap();
    let now = crate::expiry::now_s();
    let mut stale = HashSet::new();
    assert_eq!(
        newly_stale(&list, now, &mut stale),
        std::slice::from_ref(&overdue)
    );
    assert!(newly_stale(&list, now, &mut stale).is_empty(), "once");
    // A day and more later, the other one goes stale too.
    assert_eq!(newly_stale(&list, now + 86_401, &mut stale), [day]);
    // A fresh list in place of the overdue one, then stale again: warned again.
    let fresh = RevocationList::load([(&area, &paths[..1], &cas[..])]).unwrap();
    assert!(newly_stale(&fresh, now, &mut stale).is_empty());
    assert_eq!(newly_stale(&list, now, &mut stale), [overdue]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_changed_while_an_older_read_was_put_in_force_are_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let area = AreaId::new("northshire").unwrap();
    let ca = Ca::new(&area).unwrap();
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, &ca.pem().cert).unwrap();
    let crl = list_file(
        dir.path(),
        &ca,
        "area.crl",
        Validity::For(Duration::from_secs(86_400)),
    );
    let sources = Sources {
        areas: vec![(area.clone(), ca_path, vec![crl.clone()])],
    };
    // A reload's read, made before the CA's new list arrives.
    let older = sources.read().unwrap();
    let lists = Arc::new(InForce::new(sources.clone(), sources.read().unwrap()));
    let revoked = || lists.revocations().current().revoked();
    let stolen = ca
        .issue(
            &certs::Identity::User(area.clone(), proto::UserId::new("laptop").unwrap()),
            Validity::For(Duration::from_secs(86_400)),
        )
        .unwrap();
    let list = ca
        .revocation_list(
            &[&stolen.cert],
            2,
            Validity::For(Duration::from_secs(86_400)),
        )
        .unwrap();
    std::fs::write(&crl, list).unwrap();
    let (stop, stopped) = watch::channel(false);
    let watcher = tokio::spawn(watch(lists.clone(), Duration::from_millis(20), stopped));
    let eventually_revoked = || async {
        for _ in 0..500 {
            if revoked() == 1 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    assert!(eventually_revoked().await, "the watcher reads the new list");
    // The reload that read before the change puts its lists in force last.
    lists.put(sources.clone(), older);
    assert_eq!(revoked(), 0);
    // The files are newer than what is in force: read again.
    assert!(eventually_revoked().await, "the revocation is not lost");
    let _ = stop.send(true);
    watcher.await.unwrap();
}
