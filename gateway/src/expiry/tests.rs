use super::*;
use crate::dev::{write_federation, AreaSpec};
use certs::mint::{Ca, PemPair, Validity};
use certs::Identity;

/// A two-area federation on disk; returns the first area's configuration.
fn federation(dir: &Path) -> Config {
    let areas: Vec<AreaSpec> = ["northshire", "southvale"]
        .iter()
        .map(|a| AreaSpec {
            area: (*a).into(),
            port: 0,
            users: vec![],
        })
        .collect();
    let fed = write_federation(dir, &areas, "", false, false).unwrap();
    Config::load(&fed.gateway_configs[0]).unwrap()
}

fn area_ca(dir: &Path) -> Ca {
    let ca = dir.join("northshire").join("ca");
    Ca::from_pem(PemPair {
        cert: std::fs::read_to_string(ca.join("ca.crt")).unwrap(),
        key: std::fs::read_to_string(ca.join("ca.key")).unwrap(),
    })
    .unwrap()
}

#[test]
fn the_gateway_its_area_ca_and_each_peer_ca_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = federation(dir.path());
    let all = load(&config).unwrap();
    let roles: Vec<_> = all.iter().map(|e| e.role.clone()).collect();
    assert_eq!(
        roles,
        vec![
            Role::Gateway,
            Role::AreaCa,
            Role::PeerCa(AreaId::new("southvale").unwrap())
        ]
    );
    let now = now_s();
    for e in &all {
        assert!(e.not_after > now + 86_400, "{e:?}");
    }
    assert_eq!(warn_soon(&all, now), 0, "nothing to warn about");
}

#[test]
fn an_expired_gateway_certificate_is_refused_naming_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = federation(dir.path());
    let expired = area_ca(dir.path())
        .issue(
            &Identity::Gateway(AreaId::new("northshire").unwrap()),
            Validity::Expired,
        )
        .unwrap();
    std::fs::write(&config.tls.cert, expired.cert).unwrap();
    let e = load(&config).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, certs::CertError::Expired { .. }), "{text}");
    assert!(
        text.contains(&config.tls.cert.display().to_string()),
        "{text}"
    );
}

#[test]
fn a_certificate_expiring_within_the_warning_time_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let config = federation(dir.path());
    // A gateway certificate valid for ten more days: still used, warned about.
    let short = area_ca(dir.path())
        .issue(
            &Identity::Gateway(AreaId::new("northshire").unwrap()),
            Validity::For(Duration::from_secs(10 * 86_400)),
        )
        .unwrap();
    std::fs::write(&config.tls.cert, short.cert).unwrap();
    let all = load(&config).unwrap();
    let now = now_s();
    let gateway = all.iter().find(|e| e.role == Role::Gateway).unwrap();
    assert!((gateway.not_after - (now + 10 * 86_400)).abs() < 120);
    assert_eq!(warn_soon(&all, now), 1);
    // A peer CA past its time is counted too (it breaks only that peer).
    let mut later = all.clone();
    later[2].not_after = now - 1;
    assert_eq!(warn_soon(&later, now), 2);
    assert_eq!(
        later[2].reading(),
        crate::metrics::CertificateReading {
            certificate: "peer_ca",
            peer: Some(AreaId::new("southvale").unwrap()),
            not_after: now - 1
        }
    );
}
