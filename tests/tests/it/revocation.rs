//! Revoked certificates: a stolen laptop's certificate stops working as soon
//! as its area's CA lists it, on connections already open too; a peer
//! gateway's revoked certificate stops the federation with it until the peer
//! presents a new one, and nothing is lost meanwhile.

use std::path::Path;
use std::time::Duration;

use certs::mint::{Ca, PemPair, Validity};
use certs::Identity;
use client::ClientError;
use proto::{AreaId, ErrorCode, Status};
use tests::{eventually, message, reaches, user, Federation, Settings};

const YEAR: Validity = Validity::For(Duration::from_secs(365 * 86_400));
const LIMIT: Duration = Duration::from_secs(20);

/// Writes `ca`'s revocation list number `n`, revoking `revoked`, to `path`
/// the way a PKI publishes one: a new file renamed over the old.
fn publish(path: &Path, ca: &Ca, revoked: &[&PemPair], n: u64) {
    let pems: Vec<&str> = revoked.iter().map(|p| p.cert.as_str()).collect();
    let text = ca.revocation_list(&pems, n, YEAR).unwrap();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Area `a`'s gateway set to read its CA's revocation list every 100 ms
/// from a file, published empty here; returns the file.
fn publishing(fed: &Federation, a: usize, ca: &Ca) -> std::path::PathBuf {
    let crl = fed.areas[a].dir.join("published.crl");
    publish(&crl, ca, &[], 1);
    fed.edit_config(
        a,
        "ca = \"ca/ca.crt\"\n",
        "ca = \"ca/ca.crt\"\ncrls = [\"published.crl\"]\ncrl_check_every = \"100ms\"\n",
    )
    .unwrap();
    crl
}

/// `count` once it has stopped moving: the gateway counts a refused
/// handshake just after sending its alert, so the client may hear of the
/// refusal a moment before it is counted.
async fn settled(count: impl Fn() -> u64) -> u64 {
    let mut last = count();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = count();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// The first error `api`'s open connection gets, asking every `every`
/// (within [`LIMIT`]) once its certificate is `what` (revoked, expired).
async fn first_refusal(api: &client::Api, what: &str, every: Duration) -> ClientError {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Err(e) = api.health().await {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the {what} certificate kept working"
        );
        tokio::time::sleep(every).await;
    }
}

/// Refused in the handshake for being revoked.
fn is_tls_refusal<T: std::fmt::Debug>(r: &Result<T, ClientError>) -> bool {
    matches!(r, Err(ClientError::Revoked(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_user_certificate_is_refused_at_once_on_open_connections_too() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let a = fed.index("northshire");
    let ca = fed.ca(a).unwrap();
    let alice = Identity::User(AreaId::new("northshire").unwrap(), user("alice"));
    let stolen = ca.issue(&alice, YEAR).unwrap();
    let renewed = ca.issue(&alice, YEAR).unwrap();
    let crl = publishing(&fed, a, &ca);
    fed.serve_metrics(a).unwrap();
    fed.start_all().await.unwrap();
    let text = fed.metrics_text(a).await.unwrap();
    assert!(text.contains("gateway_crl_revoked_certificates{area=\"northshire\""));
    assert!(text.contains("gateway_crl_reload_failed 0"));

    // The laptop works, and keeps its connection open.
    let laptop = fed.api_with(a, &stolen).unwrap();
    laptop
        .submit(&message("user:dan@southvale", "before-theft", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    let sent = || fed.count(a, "SELECT COUNT(*) FROM sent").unwrap();
    assert_eq!(sent(), 1);

    // A long-poll the laptop began before the theft is noticed.
    let polling = fed.api_with(a, &stolen).unwrap();
    polling.health().await.unwrap();
    let poll = tokio::spawn(async move { polling.inbox(Duration::from_secs(60)).await });

    // The CA revokes it. Within the check interval its open connection is
    // refused with a typed answer, and then any new handshake is refused.
    publish(&crl, &ca, &[&stolen], 2);
    let first_refusal = first_refusal(&laptop, "revoked", Duration::from_millis(50)).await;
    match first_refusal {
        ClientError::Api { status, code, .. } => {
            assert_eq!((status, code), (403, ErrorCode::CertificateRevoked));
        }
        other => panic!("the open connection should get a typed refusal, got {other:?}"),
    }
    // A message for alice wakes the long-poll: it is refused, not answered
    // with the message.
    fed.api(a, "bob")
        .unwrap()
        .submit(&message("user:alice@northshire", "to-alice", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    match tokio::time::timeout(LIMIT, poll).await {
        Ok(Ok(Err(ClientError::Api { status, code, .. }))) => {
            assert_eq!((status, code), (403, ErrorCode::CertificateRevoked));
        }
        other => panic!("the waiting long-poll should be refused, got {other:?}"),
    }
    // A new connection is refused in the handshake. (A fresh client: the
    // laptop's own pool may hold a second connection, opened before the
    // revocation, which gets the typed answer above.)
    let reconnecting = fed.api_with(a, &stolen).unwrap();
    match reconnecting.health().await {
        Err(e @ ClientError::Revoked(_)) => assert!(
            e.to_string()
                .contains("has been revoked; ask your area's gateway administrator"),
            "{e}"
        ),
        other => panic!("a new connection should be refused in the handshake, got {other:?}"),
    }
    // The client does not retry a revoked certificate (`submit` retries a
    // gateway it cannot reach for a minute): the attempt's handshake, and
    // one more when the attempt's connection closed before the alert was
    // read and the client opened one to hear why.
    let failures = || fed.gateway(a).unwrap().metrics().tls_failures.get();
    let handshakes = settled(failures).await;
    let attempt = reconnecting
        .submit(&message("user:dan@southvale", "after-theft", b"x".to_vec()).unwrap())
        .await;
    assert!(is_tls_refusal(&attempt), "{attempt:?}");
    let made = settled(failures).await - handshakes;
    assert!((1..=2).contains(&made), "{made} handshakes");
    assert_eq!(
        sent(),
        2,
        "nothing stored from the revoked certificate (bob's is the second)"
    );
    assert!(fed.gateway(a).unwrap().metrics().refused_revoked.get() >= 1);

    // alice's new certificate, for the same identity, works.
    let replacement = fed.api_with(a, &renewed).unwrap();
    replacement
        .submit(&message("user:dan@southvale", "after-theft", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    assert_eq!(sent(), 3);

    // A list that cannot be used leaves the one in force as it was, and
    // says so in the metrics until a good one comes.
    std::fs::write(
        &crl,
        "-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let failed = eventually(LIMIT, || async {
        fed.metrics_text(a)
            .await
            .unwrap()
            .contains("gateway_crl_reload_failed 1")
    })
    .await;
    assert!(failed, "a bad list was not reported");
    let refused = fed.api_with(a, &stolen).unwrap().health().await;
    assert!(is_tls_refusal(&refused), "{refused:?}");
    replacement.health().await.unwrap();
    publish(&crl, &ca, &[&stolen], 3);
    let recovered = eventually(LIMIT, || async {
        fed.metrics_text(a)
            .await
            .unwrap()
            .contains("gateway_crl_reload_failed 0")
    })
    .await;
    assert!(recovered);
    let refused = fed.api_with(a, &stolen).unwrap().health().await;
    assert!(is_tls_refusal(&refused), "{refused:?}");
    fed.stop_all().await;
}

/// An HTTP/2 client of area `a`'s gateway with `pair`'s certificate.
fn http2_client(fed: &Federation, a: usize, pair: &PemPair) -> reqwest::Client {
    let tls = certs::user_client_config(
        &pair.credentials().unwrap(),
        &fed.areas[a].area,
        &fed.ca_certs(a).unwrap(),
    )
    .unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_is_ended_once_its_certificate_is_revoked() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let a = fed.index("northshire");
    let ca = fed.ca(a).unwrap();
    let alice = Identity::User(AreaId::new("northshire").unwrap(), user("alice"));
    let stolen = ca.issue(&alice, YEAR).unwrap();
    let crl = publishing(&fed, a, &ca);
    fed.start(a).await.unwrap();
    // An HTTP/2 client (HTTP/2 drops `Connection: close`).
    let http = http2_client(&fed, a, &stolen);
    let url = format!("https://127.0.0.1:{}/v1/health", fed.port(a).unwrap());
    let ok = http.get(&url).send().await.unwrap();
    assert_eq!(ok.version(), reqwest::Version::HTTP_2);
    assert_eq!(ok.status(), 200);

    publish(&crl, &ca, &[&stolen], 2);
    let deadline = tokio::time::Instant::now() + LIMIT;
    let refused = loop {
        match http.get(&url).send().await {
            Ok(r) if r.status() == 200 => {}
            Ok(r) => break Some(r),
            // The client's connection was replaced (rarely, on a loaded
            // machine) and the new one refused in its handshake: nothing
            // is carried either way.
            Err(e) => {
                assert!(format!("{e:?}").contains("CertificateRevoked"), "{e:?}");
                break None;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "kept working");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if let Some(refused) = refused {
        assert_eq!(refused.status(), 403);
        assert!(refused
            .text()
            .await
            .unwrap()
            .contains("certificate_revoked"));
    }
    // The connection is ended (a request sent before the client has read
    // the GOAWAY may still be answered, refused): the next request needs a
    // new one, which is refused in its handshake.
    let mut next = http.get(&url).send().await;
    for _ in 0..20 {
        match &next {
            Ok(r) if r.status() == 403 => next = http.get(&url).send().await,
            _ => break,
        }
    }
    assert!(next.is_err(), "{next:?}");
    fed.stop_all().await;
}

/// A long-poll waiting on an HTTP/2 connection when its certificate is
/// revoked is refused when it wakes, and that refusal ends the connection
/// too (GOAWAY), as a refused request does: the next request needs a new
/// connection, which is refused in its handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_refused_for_a_revocation_ends_its_http2_connection() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let a = fed.index("northshire");
    let ca = fed.ca(a).unwrap();
    let alice = Identity::User(AreaId::new("northshire").unwrap(), user("alice"));
    let stolen = ca.issue(&alice, YEAR).unwrap();
    let crl = publishing(&fed, a, &ca);
    fed.serve_metrics(a).unwrap();
    fed.start(a).await.unwrap();
    let http = http2_client(&fed, a, &stolen);
    let base = format!("https://127.0.0.1:{}", fed.port(a).unwrap());
    let ok = http.get(format!("{base}/v1/health")).send().await.unwrap();
    assert_eq!(
        (ok.version(), ok.status().as_u16()),
        (reqwest::Version::HTTP_2, 200)
    );
    let poll = tokio::spawn({
        let (http, url) = (http.clone(), format!("{base}/v1/inbox?wait=30"));
        async move { http.get(url).send().await }
    });
    let waiting = || async {
        fed.metrics_text(a)
            .await
            .unwrap_or_default()
            .lines()
            .any(|l| l == "gateway_inbox_long_polls_waiting 1")
    };
    assert!(
        eventually(LIMIT, waiting).await,
        "the long-poll never waited"
    );

    publish(&crl, &ca, &[&stolen], 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A message for alice wakes the long-poll: refused.
    fed.api(a, "bob")
        .unwrap()
        .submit(&message("user:alice@northshire", "wake", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    let refused = tokio::time::timeout(LIMIT, poll)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused
        .text()
        .await
        .unwrap()
        .contains("certificate_revoked"));
    // The connection was ended with it: the next request is not answered on
    // it (a new connection is refused in its handshake; a request that went
    // out before the client saw the end is cancelled with it).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..2 {
        let next = http.get(format!("{base}/v1/health")).send().await;
        assert!(next.is_err(), "{next:?}");
    }
    fed.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_carries_nothing_once_its_certificate_has_expired() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let a = fed.index("northshire");
    let alice = Identity::User(AreaId::new("northshire").unwrap(), user("alice"));
    fed.start_all().await.unwrap();
    // Valid for five more seconds: the handshake takes it.
    let short = fed
        .mint(a, &alice, Validity::For(Duration::from_secs(5)))
        .unwrap();
    let laptop = fed.api_with(a, &short).unwrap();
    laptop
        .submit(&message("user:dan@southvale", "while-valid", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    let sent = || fed.count(a, "SELECT COUNT(*) FROM sent").unwrap();
    assert_eq!(sent(), 1);
    // A long-poll asking for a minute ends when the certificate expires,
    // not after (another client: the laptop's connection stays free for
    // the requests below): an empty listing, or the refusal if the clock
    // passed the second.
    let polling = fed.api_with(a, &short).unwrap();
    let poll = tokio::spawn(async move { polling.inbox(Duration::from_secs(60)).await });
    let answered = tokio::time::timeout(Duration::from_secs(40), poll).await;
    assert!(
        matches!(&answered, Ok(Ok(Ok(r))) if r.messages.is_empty())
            || matches!(
                &answered,
                Ok(Ok(Err(ClientError::Api {
                    code: ErrorCode::CertificateExpired,
                    ..
                })))
            ),
        "{answered:?}"
    );

    // The connection stays open past the certificate's notAfter: its next
    // request is refused with a typed answer, and nothing is stored.
    let first_refusal = first_refusal(&laptop, "expired", Duration::from_millis(200)).await;
    match first_refusal {
        ClientError::Api {
            status,
            code,
            message,
            ..
        } => {
            assert_eq!((status, code), (403, ErrorCode::CertificateExpired));
            assert!(message.contains("certificate expired at"), "{message}");
        }
        other => panic!("the open connection should get a typed refusal, got {other:?}"),
    }
    let attempt = laptop
        .submit_once(&message("user:dan@southvale", "after-expiry", b"x".to_vec()).unwrap())
        .await;
    assert!(attempt.is_err(), "{attempt:?}");
    assert_eq!(sent(), 1, "nothing stored from the expired certificate");
    let metrics = fed.gateway(a).unwrap().metrics();
    assert!(metrics.refused_expired.get() >= 1);
    assert_eq!(metrics.refused_revoked.get(), 0);
    fed.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peer_gateway_is_refused_both_ways_until_it_has_a_new_certificate() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let south_ca = fed.ca(b).unwrap();
    let south_cert = PemPair {
        cert: std::fs::read_to_string(fed.areas[b].dir.join("gateway.crt")).unwrap(),
        key: std::fs::read_to_string(fed.areas[b].dir.join("gateway.key")).unwrap(),
    };
    // northshire's copy of southvale's published list.
    fed.serve_metrics(a).unwrap();
    let crl = fed.areas[a].dir.join("southvale.crl");
    publish(&crl, &south_ca, &[], 1);
    fed.edit_config(
        a,
        "ca = \"../southvale/ca/ca.crt\"\n",
        "ca = \"../southvale/ca/ca.crt\"\ncrls = [\"southvale.crl\"]\n",
    )
    .unwrap();
    fed.edit_config(
        a,
        "ca = \"ca/ca.crt\"\n",
        "ca = \"ca/ca.crt\"\ncrl_check_every = \"100ms\"\n",
    )
    .unwrap();
    fed.start_all().await.unwrap();
    let alice = fed.api(a, "alice").unwrap();
    let first = alice
        .submit(&message("user:dan@southvale", "first", b"1".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(reaches(&alice, &first.message_id, Status::Delivered, LIMIT).await);

    // southvale's CA revokes its gateway's certificate (a leaked key).
    publish(&crl, &south_ca, &[&south_cert], 2);
    let in_force = eventually(LIMIT, || async {
        fed.metrics_text(a).await.unwrap().contains(&format!(
            "gateway_crl_revoked_certificates{{area=\"southvale\",file=\"{}\"}} 1",
            crl.display()
        ))
    })
    .await;
    assert!(in_force, "northshire did not take up southvale's new list");

    // A new message waits: northshire refuses southvale's certificate (its
    // pooled connection was dropped with the old lists), and the sender is
    // told why it waits.
    let second = alice
        .submit(&message("user:dan@southvale", "second", b"2".to_vec()).unwrap())
        .await
        .unwrap();
    let waiting = eventually(LIMIT, || async {
        alice
            .status(&second.message_id)
            .await
            .map(|s| s.status == Status::Accepted && s.waiting.is_some())
            .unwrap_or(false)
    })
    .await;
    assert!(waiting, "a message to a revoked peer did not wait");
    assert_eq!(
        fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(),
        1,
        "nothing reached the revoked peer"
    );

    // southvale cannot reach northshire either: dan's fetch makes a status
    // update for northshire, and northshire refuses southvale's handshake.
    let dan = fed.api(b, "dan").unwrap();
    dan.fetch(&first.message_id).await.unwrap();
    let failures = fed.gateway(a).unwrap().metrics().tls_failures.get();
    let refused = eventually(LIMIT, || async {
        fed.gateway(a).unwrap().metrics().tls_failures.get() > failures
    })
    .await;
    assert!(
        refused,
        "northshire took a connection from the revoked gateway"
    );
    assert_eq!(
        alice.status(&first.message_id).await.unwrap().status,
        Status::Delivered
    );

    // southvale's operator installs a new certificate and restarts: what
    // waited is delivered, once, in order.
    fed.stop(b).await;
    let fresh = south_ca
        .issue(&Identity::Gateway(AreaId::new("southvale").unwrap()), YEAR)
        .unwrap();
    std::fs::write(fed.areas[b].dir.join("gateway.crt"), &fresh.cert).unwrap();
    std::fs::write(fed.areas[b].dir.join("gateway.key"), &fresh.key).unwrap();
    fed.start(b).await.unwrap();
    assert!(reaches(&alice, &second.message_id, Status::Delivered, LIMIT).await);
    assert!(reaches(&alice, &first.message_id, Status::Fetched, LIMIT).await);
    let keys: Vec<String> = dan
        .inbox(Duration::ZERO)
        .await
        .unwrap()
        .messages
        .iter()
        .map(|m| m.envelope.idempotency_key.to_string())
        .collect();
    assert_eq!(keys, ["first", "second"], "each message once, in order");
    fed.stop_all().await;
}

/// What a client sees when it goes on writing after its handshake: TLS 1.3
/// lets it send requests before the gateway has judged its certificate.
/// Returns the TLS error that ended the exchange, or the I/O error if the
/// connection broke without one.
fn write_past_refusal(
    port: u16,
    config: std::sync::Arc<certs::rustls::ClientConfig>,
) -> Result<certs::rustls::Error, std::io::Error> {
    use std::io::Write as _;
    let name = certs::rustls::pki_types::ServerName::try_from("127.0.0.1")
        .map_err(std::io::Error::other)?;
    let mut conn = certs::rustls::ClientConnection::new(config, name.to_owned())
        .map_err(std::io::Error::other)?;
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    // The client's side of the handshake is done. Three requests, the later
    // ones after the gateway has refused and closed.
    for _ in 0..3 {
        conn.writer()
            .write_all(b"GET /v1/health HTTP/1.1\r\nhost: gateway\r\n\r\n")?;
        while conn.wants_write() {
            conn.write_tls(&mut tcp)?;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    loop {
        if conn.read_tls(&mut tcp)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Err(e) = conn.process_new_packets() {
            return Ok(e);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_that_writes_before_hearing_the_refusal_still_hears_why() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let a = fed.index("northshire");
    let ca = fed.ca(a).unwrap();
    let alice = Identity::User(AreaId::new("northshire").unwrap(), user("alice"));
    let stolen = ca.issue(&alice, YEAR).unwrap();
    let crl = fed.areas[a].dir.join("published.crl");
    publish(&crl, &ca, &[&stolen], 1);
    fed.edit_config(
        a,
        "ca = \"ca/ca.crt\"\n",
        "ca = \"ca/ca.crt\"\ncrls = [\"published.crl\"]\n",
    )
    .unwrap();
    fed.start(a).await.unwrap();
    let config = certs::user_client_config(
        &stolen.credentials().unwrap(),
        &fed.areas[a].area,
        &fed.ca_certs(a).unwrap(),
    )
    .unwrap();
    let port = fed.port(a).unwrap();
    let heard = tokio::task::spawn_blocking(move || write_past_refusal(port, config.into()))
        .await
        .unwrap();
    // Not "connection reset": the gateway drains what the client sent
    // instead of resetting the connection under it.
    match heard {
        Ok(certs::rustls::Error::AlertReceived(
            certs::rustls::AlertDescription::CertificateRevoked,
        )) => {}
        other => panic!("the client should read the alert certificate_revoked, got {other:?}"),
    }
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM sent").unwrap(), 0);
    fed.stop(a).await;
}

/// A user's client with its area CA's revocation lists refuses a gateway
/// whose certificate they revoke (its key may be in other hands), with a
/// clear, typed error and nothing sent; without the lists, or once the
/// gateway has a new certificate, it talks to it as before. A list its CA
/// did not sign is refused when the client starts, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_its_areas_revocation_lists_refuses_a_revoked_gateway() {
    let fed = Federation::standard().await.unwrap();
    let a = fed.index("northshire");
    let dir = fed.areas[a].dir.clone();
    let gateway = PemPair {
        cert: std::fs::read_to_string(dir.join("gateway.crt")).unwrap(),
        key: std::fs::read_to_string(dir.join("gateway.key")).unwrap(),
    };
    let ca = fed.ca(a).unwrap();
    let crl = dir.join("client-view.crl");
    publish(&crl, &ca, &[&gateway], 1);
    let plain = fed.client_config_path(a, "alice");
    // Beside alice's own, so its relative paths still resolve.
    let checking = plain.with_file_name("alice-checking.toml");
    let text = std::fs::read_to_string(&plain).unwrap();
    std::fs::write(
        &checking,
        format!("{text}\ncrls = [\"{}\"]\n", crl.display()),
    )
    .unwrap();
    let config = client::ClientConfig::load(&checking).unwrap();
    assert_eq!(config.crls, std::slice::from_ref(&crl));
    let to_bob = || {
        message(
            "user:bob@northshire",
            &client::fresh_idempotency_key().to_string(),
            b"x".to_vec(),
        )
        .unwrap()
    };

    let e = client::Api::new(&config)
        .unwrap()
        .submit(&to_bob())
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::GatewayRevoked(_)), "{e}");
    assert!(e.to_string().contains("revoked its certificate"), "{e}");
    assert_eq!(
        fed.count(a, "SELECT COUNT(*) FROM sent").unwrap(),
        0,
        "nothing sent"
    );
    // Without the lists the same gateway is trusted (as before).
    let plain_config = client::ClientConfig::load(&plain).unwrap();
    client::Api::new(&plain_config)
        .unwrap()
        .submit(&to_bob())
        .await
        .unwrap();

    // The gateway gets a new certificate (taken up by a reload): trusted
    // again with the same lists.
    let fresh = ca
        .issue(&Identity::Gateway(AreaId::new("northshire").unwrap()), YEAR)
        .unwrap();
    std::fs::write(dir.join("gateway.crt"), &fresh.cert).unwrap();
    std::fs::write(dir.join("gateway.key"), &fresh.key).unwrap();
    fed.gateway(a)
        .unwrap()
        .reload_file(&fed.areas[a].config_path)
        .await
        .unwrap();
    client::Api::new(&config)
        .unwrap()
        .submit(&to_bob())
        .await
        .unwrap();

    // A list another CA signed is refused before connecting, naming it.
    let other = Ca::new(&AreaId::new("northshire").unwrap()).unwrap();
    publish(&crl, &other, &[], 2);
    let e = client::Api::new(&config).unwrap_err();
    assert!(matches!(e, ClientError::Certs(_)), "{e}");
    assert!(e.to_string().contains("client-view.crl"), "{e}");
}
