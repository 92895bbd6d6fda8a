use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::mint::{Ca, Validity};
use crate::Identity;

const YEAR: Validity = Validity::For(Duration::from_secs(365 * 86_400));

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn area(a: &str) -> AreaId {
    AreaId::new(a).unwrap()
}

fn user(a: &str, u: &str) -> Identity {
    Identity::User(area(a), proto::UserId::new(u).unwrap())
}

fn der(pem: &str) -> Vec<u8> {
    crate::parse_certs(pem, "test").unwrap()[0]
        .as_ref()
        .to_vec()
}

/// Writes `text` to a file in `dir` and returns its path.
fn file(dir: &tempfile::TempDir, name: &str, text: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load(a: &AreaId, paths: &[PathBuf], ca: &Ca) -> Result<RevocationList, CertError> {
    let cas = crate::parse_certs(&ca.pem().cert, "ca").unwrap();
    RevocationList::load([(a, paths, cas.as_slice())])
}

#[test]
fn a_revoked_certificate_is_refused_and_its_siblings_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let north = area("northshire");
    let ca = Ca::new(&north).unwrap();
    let stolen = ca.issue(&user("northshire", "alice"), YEAR).unwrap();
    let renewed = ca.issue(&user("northshire", "alice"), YEAR).unwrap();
    let bob = ca.issue(&user("northshire", "bob"), YEAR).unwrap();
    let crl = ca.revocation_list(&[&stolen.cert], 1, YEAR).unwrap();
    let path = file(&dir, "north.crl", crl.as_bytes());

    let list = load(&north, std::slice::from_ref(&path), &ca).unwrap();
    match list.check(&north, &der(&stolen.cert)) {
        Err(CertError::Revoked { who, serial }) => {
            assert_eq!(who, "spiffe://northshire/user/alice");
            assert!(!serial.is_empty());
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    list.check(&north, &der(&renewed.cert)).unwrap();
    list.check(&north, &der(&bob.cert)).unwrap();
    // Another area's lists do not apply to this one's certificates.
    list.check(&area("southvale"), &der(&stolen.cert)).unwrap();
    let info = &list.lists()[0];
    assert_eq!((info.area.clone(), info.revoked), (north, 1));
    assert_eq!(info.path, path);
    assert!(!info.is_stale(now_s()));
}

#[test]
fn a_list_is_read_in_pem_or_der_and_an_overdue_one_still_revokes() {
    let dir = tempfile::tempdir().unwrap();
    let north = area("northshire");
    let ca = Ca::new(&north).unwrap();
    let stolen = ca.issue(&user("northshire", "alice"), YEAR).unwrap();
    let pem = ca
        .revocation_list(&[&stolen.cert], 7, Validity::Expired)
        .unwrap();
    let der_crl: Vec<u8> = CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec();
    let path = file(&dir, "north.der", &der_crl);
    let list = load(&north, &[path], &ca).unwrap();
    assert!(list.lists()[0].is_stale(now_s()));
    assert!(matches!(
        list.check(&north, &der(&stolen.cert)),
        Err(CertError::Revoked { .. })
    ));
}

#[test]
fn a_list_not_signed_by_the_areas_ca_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let north = area("northshire");
    let ca = Ca::new(&north).unwrap();
    // Another CA with the very same name: only the signature tells them apart.
    let impostor = Ca::new(&north).unwrap();
    let forged = impostor.revocation_list(&[], 1, YEAR).unwrap();
    let path = file(&dir, "forged.crl", forged.as_bytes());
    match load(&north, std::slice::from_ref(&path), &ca) {
        Err(CertError::Crl { path: p, reason }) => {
            assert_eq!(p, path.display().to_string());
            assert!(reason.contains("signature"), "{reason}");
        }
        other => panic!("expected a Crl error, got {other:?}"),
    }
    // A list from another area's CA.
    let south = Ca::new(&area("southvale")).unwrap();
    let theirs = file(
        &dir,
        "south.crl",
        south.revocation_list(&[], 1, YEAR).unwrap().as_bytes(),
    );
    match load(&north, &[theirs], &ca) {
        Err(CertError::Crl { reason, .. }) => {
            assert!(reason.contains("not a CA configured"), "{reason}")
        }
        other => panic!("expected a Crl error, got {other:?}"),
    }
}

#[test]
fn garbage_missing_files_and_empty_pem_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let north = area("northshire");
    let ca = Ca::new(&north).unwrap();
    let cases = [
        file(&dir, "garbage.crl", b"\x30\x03\x02\x01"),
        file(&dir, "cert.pem", ca.pem().cert.as_bytes()),
        dir.path().join("missing.crl"),
    ];
    for path in cases {
        match load(&north, std::slice::from_ref(&path), &ca) {
            Err(CertError::Crl { .. } | CertError::Io { .. }) => {}
            other => panic!("{}: expected a typed error, got {other:?}", path.display()),
        }
    }
}

#[test]
fn replacing_the_lists_changes_the_generation_and_rechecks_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let north = area("northshire");
    let ca = Ca::new(&north).unwrap();
    let stolen = ca.issue(&user("northshire", "alice"), YEAR).unwrap();
    let empty = file(
        &dir,
        "empty.crl",
        ca.revocation_list(&[], 1, YEAR).unwrap().as_bytes(),
    );
    let revoking = file(
        &dir,
        "revoking.crl",
        ca.revocation_list(&[&stolen.cert], 2, YEAR)
            .unwrap()
            .as_bytes(),
    );
    let r = Revocations::new(load(&north, &[empty], &ca).unwrap());
    let before = r.generation();
    r.check_chain(&north, &der(&stolen.cert), []).unwrap();
    r.replace(load(&north, &[revoking], &ca).unwrap());
    assert_ne!(r.generation(), before);
    assert!(r.check_chain(&north, &der(&stolen.cert), []).is_err());
}

#[test]
fn a_connections_certificate_is_refused_once_past_its_not_after() {
    let north = area("northshire");
    let ca = Ca::new(&north).unwrap();
    let pair = ca
        .issue(
            &user("northshire", "alice"),
            Validity::For(Duration::from_secs(60)),
        )
        .unwrap();
    let leaf = CertificateDer::from(der(&pair.cert));
    let cert = ConnectionCertificate::of_chain(std::slice::from_ref(&leaf)).unwrap();
    let r = Revocations::new(RevocationList::default());
    let end = crate::not_after(&leaf).unwrap();
    assert!((now_s() + 55..=now_s() + 61).contains(&end));
    cert.check_at(&r, end).unwrap();
    cert.check(&r).unwrap();
    match cert.check_at(&r, end + 1) {
        Err(e @ CertError::ExpiredSince { .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with("spiffe://northshire/user/alice: certificate expired at "),
                "{text}"
            );
        }
        other => panic!("expected ExpiredSince, got {other:?}"),
    }
    // Checked again whenever asked, not only when the lists change.
    assert!(cert.check_at(&r, end + 1).is_err());
}

#[test]
fn serials_compare_without_leading_zeros() {
    assert_eq!(significant(&[0, 0x80, 1]), &[0x80, 1]);
    assert_eq!(significant(&[0]), &[0]);
    assert_eq!(significant(&[]), &[] as &[u8]);
    assert_eq!(significant(&[5, 0]), &[5, 0]);
}

#[test]
fn while_an_area_moves_to_a_new_ca_of_the_same_name_either_cas_list_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let north = area("northshire");
    let old = Ca::new(&north).unwrap();
    let new = Ca::new(&north).unwrap();
    let bundle: Vec<_> = [&old, &new]
        .iter()
        .flat_map(|ca| crate::parse_certs(&ca.pem().cert, "ca").unwrap())
        .collect();
    let laptop = new.issue(&user("northshire", "laptop"), YEAR).unwrap();
    let from_new = file(
        &dir,
        "new.crl",
        new.revocation_list(&[&laptop.cert], 1, YEAR)
            .unwrap()
            .as_bytes(),
    );
    let from_old = file(
        &dir,
        "old.crl",
        old.revocation_list(&[], 1, YEAR).unwrap().as_bytes(),
    );
    let paths = [from_old, from_new];
    let list = RevocationList::load([(&north, &paths[..], bundle.as_slice())]).unwrap();
    assert_eq!(list.revoked(), 1);
    // A third CA of that name, in neither bundle, is still refused.
    let impostor = Ca::new(&north).unwrap();
    let forged = file(
        &dir,
        "forged.crl",
        impostor.revocation_list(&[], 1, YEAR).unwrap().as_bytes(),
    );
    match RevocationList::load([(&north, std::slice::from_ref(&forged), bundle.as_slice())]) {
        Err(CertError::Crl { reason, .. }) => assert!(reason.contains("signature"), "{reason}"),
        other => panic!("expected a Crl error, got {other:?}"),
    }
}

/// An open connection whose certificate came from an issuing CA is
/// refused at its next request once the area's CA revokes that issuing CA.
#[test]
fn an_open_connection_is_refused_once_its_issuing_ca_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let north = area("northshire");
    let root = Ca::with_issuing_cas(&north).unwrap();
    let issuing = root.issuing_ca("northshire issuing CA 1").unwrap();
    let alice = issuing.issue(&user("northshire", "alice"), YEAR).unwrap();
    let chain = crate::parse_certs(&issuing.chain(&alice).cert, "chain").unwrap();
    let cert = ConnectionCertificate::of_chain(&chain).unwrap();
    let r = Revocations::new(RevocationList::default());
    cert.check(&r).unwrap();
    let crl = file(
        &dir,
        "north.crl",
        root.revocation_list(&[&issuing.pem().cert], 1, YEAR)
            .unwrap()
            .as_bytes(),
    );
    r.replace(load(&north, &[crl], &root).unwrap());
    match cert.check(&r) {
        Err(CertError::Revoked { who, .. }) => {
            assert_eq!(who, "the CA that issued spiffe://northshire/user/alice");
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    // The leaf alone is on no list.
    r.check_chain(&north, chain[0].as_ref(), []).unwrap();
}
