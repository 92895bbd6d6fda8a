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
