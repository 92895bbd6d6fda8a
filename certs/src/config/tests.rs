//! Handshakes in memory between the configurations built here.

use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConnection, HandshakeKind, ServerConnection};

use super::*;
use crate::mint::{Ca, Validity};

const YEAR: Validity = Validity::For(Duration::from_secs(365 * 86_400));

/// Runs a handshake to its end, moving bytes between the two sides, and
/// sends a byte each way so that TLS 1.3 session tickets are delivered.
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> HandshakeKind {
    let mut buf = Vec::new();
    for _ in 0..20 {
        buf.clear();
        client.write_tls(&mut buf).unwrap();
        server.read_tls(&mut buf.as_slice()).unwrap();
        server.process_new_packets().unwrap();
        buf.clear();
        server.write_tls(&mut buf).unwrap();
        client.read_tls(&mut buf.as_slice()).unwrap();
        client.process_new_packets().unwrap();
        if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() {
            break;
        }
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    client.handshake_kind().unwrap()
}

struct Area {
    id: AreaId,
    ca: Ca,
    gateway: Credentials,
    user: Credentials,
}

fn area(name: &str) -> Area {
    let id = AreaId::new(name).unwrap();
    let ca = Ca::new(&id).unwrap();
    let gateway = ca
        .issue(&Identity::Gateway(id.clone()), YEAR)
        .unwrap()
        .credentials()
        .unwrap();
    let user = ca
        .issue(
            &Identity::User(id.clone(), proto::UserId::new("alice").unwrap()),
            YEAR,
        )
        .unwrap()
        .credentials()
        .unwrap();
    Area {
        id,
        ca,
        gateway,
        user,
    }
}

fn cas(a: &Area) -> Vec<CertificateDer<'static>> {
    crate::parse_certs(&a.ca.pem().cert, "ca").unwrap()
}

fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

#[test]
fn a_gateway_never_resumes_a_session_so_every_connection_checks_the_certificate() {
    let north = area("northshire");
    let trust = ServerTrust {
        own_area: north.id.clone(),
        own_cas: cas(&north),
        peers: Vec::new(),
        revocations: Revocations::default(),
    };
    let server = server_config(&north.gateway, &trust).unwrap();
    // A client that would resume if offered: rustls's default store.
    let mut client = user_client_config(&north.user, &north.id, &cas(&north)).unwrap();
    client.resumption = rustls::client::Resumption::default();
    let client = Arc::new(client);
    for _ in 0..2 {
        let mut c = ClientConnection::new(client.clone(), name()).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        assert_eq!(handshake(&mut c, &mut s), HandshakeKind::Full);
    }
}

#[test]
fn a_gateway_client_never_resumes_even_with_a_server_that_offers_it() {
    let (north, south) = (area("northshire"), area("southvale"));
    // A server that offers resumption (as an older gateway did).
    let trust = ServerTrust {
        own_area: south.id.clone(),
        own_cas: cas(&south),
        peers: vec![PeerTrust {
            area: north.id.clone(),
            cas: cas(&north),
        }],
        revocations: Revocations::default(),
    };
    let mut offering = Arc::unwrap_or_clone(server_config(&south.gateway, &trust).unwrap());
    offering.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
    offering.send_tls13_tickets = 2;
    let offering = Arc::new(offering);
    let peer = PeerTrust {
        area: south.id.clone(),
        cas: cas(&south),
    };
    let ours = Arc::new(
        gateway_client_config(
            &north.gateway,
            &peer,
            &Revocations::default(),
            &Default::default(),
        )
        .unwrap(),
    );
    let mut resumable = (*ours).clone();
    resumable.resumption = rustls::client::Resumption::default();
    let resumable = Arc::new(resumable);
    let kinds = |client: &Arc<ClientConfig>| {
        (0..2)
            .map(|_| {
                let mut c = ClientConnection::new(client.clone(), name()).unwrap();
                let mut s = ServerConnection::new(offering.clone()).unwrap();
                let kind = handshake(&mut c, &mut s);
                // Application data carries the session tickets over.
                use std::io::Write as _;
                s.writer().write_all(b"x").unwrap();
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
                kind
            })
            .collect::<Vec<_>>()
    };
    // The test can tell: a client that may resume does.
    assert_eq!(
        kinds(&resumable),
        [HandshakeKind::Full, HandshakeKind::Resumed]
    );
    assert_eq!(kinds(&ours), [HandshakeKind::Full, HandshakeKind::Full]);
}

/// An area whose CA signs an issuing CA, which signs its users'
/// certificates: a user's chain verifies against the area's CA, and once
/// the area's CA revokes the issuing CA, every certificate it issued is
/// refused in the handshake (`certificate_revoked`), though none of them
/// is on a list itself.
#[test]
fn a_certificate_from_a_revoked_issuing_ca_is_refused() {
    let id = AreaId::new("northshire").unwrap();
    let root = Ca::with_issuing_cas(&id).unwrap();
    let issuing = root.issuing_ca("northshire issuing CA 1").unwrap();
    let gateway = root
        .issue(&Identity::Gateway(id.clone()), YEAR)
        .unwrap()
        .credentials()
        .unwrap();
    let alice = issuing
        .issue(
            &Identity::User(id.clone(), proto::UserId::new("alice").unwrap()),
            YEAR,
        )
        .unwrap();
    let alice = issuing.chain(&alice).credentials().unwrap();
    let root_cas = crate::parse_certs(&root.pem().cert, "ca").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let crl = dir.path().join("north.crl");
    std::fs::write(
        &crl,
        root.revocation_list(&[&issuing.pem().cert], 1, YEAR)
            .unwrap(),
    )
    .unwrap();
    let listed =
        crate::RevocationList::load([(&id, std::slice::from_ref(&crl), root_cas.as_slice())])
            .unwrap();
    let client = Arc::new(user_client_config(&alice, &id, &root_cas).unwrap());
    let connect = |revocations: Revocations| -> Result<(), rustls::Error> {
        let trust = ServerTrust {
            own_area: id.clone(),
            own_cas: root_cas.clone(),
            peers: Vec::new(),
            revocations,
        };
        let server = server_config(&gateway, &trust).unwrap();
        let mut c = ClientConnection::new(client.clone(), name()).unwrap();
        let mut s = ServerConnection::new(server).unwrap();
        let mut buf = Vec::new();
        for _ in 0..20 {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not end");
    };
    connect(Revocations::default()).unwrap();
    let e = connect(Revocations::new(listed)).unwrap_err();
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
    );
}
