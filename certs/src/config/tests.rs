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
