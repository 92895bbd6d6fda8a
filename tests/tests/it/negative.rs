//! The negative matrix: every refusal is typed and stores nothing.

use std::time::Duration;

use certs::mint::{Ca, Validity};
use certs::Identity;
use client::ClientError;
use proto::{AreaId, ErrorCode, FederationBatch, FederationItem};
use tests::{message, user, Federation};

const YEAR: Validity = Validity::For(Duration::from_secs(365 * 86_400));

/// Nothing at all was stored by any gateway.
fn assert_nothing_stored(fed: &Federation) {
    for i in 0..fed.areas.len() {
        for table in [
            "sent",
            "inbox",
            "outbox",
            "member_acks",
            "group_commits",
            "key_packages",
        ] {
            let n = fed
                .count(i, &format!("SELECT COUNT(*) FROM {table}"))
                .unwrap();
            assert_eq!(n, 0, "{table} of {} is not empty", fed.areas[i].area);
        }
    }
}

fn assert_refused_by_tls(r: Result<serde_json::Value, ClientError>) {
    match r {
        // The gateway's alert says why, whichever way the connection ended.
        Err(ClientError::Transport(msg)) => {
            assert!(msg.contains("received fatal alert"), "{msg}");
        }
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

/// A client of area `a`'s gateway holding a gateway certificate of
/// southvale (area `b`), as southvale's gateway calls it.
fn as_southvale_gateway(fed: &Federation, a: usize, b: usize) -> client::Api {
    let pair = fed
        .mint(
            b,
            &Identity::Gateway(AreaId::new("southvale").unwrap()),
            YEAR,
        )
        .unwrap();
    fed.api_with(a, &pair).unwrap()
}

/// A federation batch delivering one message as if from `from` to `to`.
fn batch_from(from: &str, to: &str) -> Vec<u8> {
    let body = proto::Body(b"x".to_vec());
    let envelope = proto::Envelope {
        message_id: proto::MessageId::from_bytes([7; 16]),
        idempotency_key: proto::IdempotencyKey::new("forged").unwrap(),
        sender: proto::Sender {
            area: AreaId::new(from).unwrap(),
            user: user("mallory"),
        },
        recipient: format!("team:duty@{to}").parse().unwrap(),
        category: proto::Category::new("relocation").unwrap(),
        urgent: false,
        kind: proto::MessageKind::Opaque,
        disclosure: None,
        content_hash: body.hash(),
        accepted_at_ms: 0,
        expires_at_ms: u64::MAX,
    };
    serde_json::to_vec(&FederationBatch {
        items: vec![FederationItem::Deliver {
            envelope: Box::new(envelope),
            body,
        }],
    })
    .unwrap()
}

/// A JSON batch re-encoded in the framed encoding.
fn framed(json_batch: &[u8]) -> Vec<u8> {
    let batch: FederationBatch = serde_json::from_slice(json_batch).unwrap();
    proto::frame::encode_items(&batch.items)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_at_the_tls_layer_store_nothing() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let url = format!("https://127.0.0.1:{}/v1/health", fed.port(a).unwrap());

    // No client certificate at all.
    let tls = certs::danger::client_config_without_certificate(&fed.ca_certs(a).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    assert!(
        http.get(&url).send().await.is_err(),
        "no client certificate must be refused"
    );

    // A certificate from a CA nobody configured, claiming to be alice of northshire.
    let rogue = Ca::new(&AreaId::new("northshire").unwrap()).unwrap();
    let pair = rogue
        .issue(
            &Identity::User(AreaId::new("northshire").unwrap(), user("alice")),
            YEAR,
        )
        .unwrap();
    assert_refused_by_tls(fed.api_with(a, &pair).unwrap().health().await);

    // alice's own CA, but expired.
    let pair = fed
        .mint(
            a,
            &Identity::User(AreaId::new("northshire").unwrap(), user("alice")),
            Validity::Expired,
        )
        .unwrap();
    assert_refused_by_tls(fed.api_with(a, &pair).unwrap().health().await);

    // southvale's CA issuing a gateway certificate that claims eastmoor.
    let pair = fed
        .mint(
            b,
            &Identity::Gateway(AreaId::new("eastmoor").unwrap()),
            YEAR,
        )
        .unwrap();
    let forged = fed.api_with(a, &pair).unwrap();
    assert_refused_by_tls(
        forged
            .post_raw("/v1/federation/batch", batch_from("eastmoor", "northshire"))
            .await,
    );

    // southvale's CA issuing a user certificate that claims northshire.
    let pair = fed
        .mint(
            b,
            &Identity::User(AreaId::new("northshire").unwrap(), user("alice")),
            YEAR,
        )
        .unwrap();
    assert_refused_by_tls(fed.api_with(a, &pair).unwrap().health().await);

    // A gateway of an area that is not a configured peer.
    let west = AreaId::new("westfell").unwrap();
    let pair = Ca::new(&west)
        .unwrap()
        .issue(&Identity::Gateway(west), YEAR)
        .unwrap();
    let stranger = fed.api_with(a, &pair).unwrap();
    assert_refused_by_tls(
        stranger
            .post_raw("/v1/federation/batch", batch_from("westfell", "northshire"))
            .await,
    );

    // A user of a peer area connecting to a gateway that is not theirs.
    let pair = fed
        .mint(
            b,
            &Identity::User(AreaId::new("southvale").unwrap(), user("dan")),
            YEAR,
        )
        .unwrap();
    assert_refused_by_tls(fed.api_with(a, &pair).unwrap().health().await);

    // The genuine alice gets in, so the refusals above were about the certificates.
    fed.api(a, "alice").unwrap().health().await.unwrap();
    assert_nothing_stored(&fed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_principal_for_the_endpoint_is_forbidden() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));

    // A user certificate calling the federation endpoint.
    let alice = fed.api(a, "alice").unwrap();
    let e = alice
        .post_raw(
            "/v1/federation/batch",
            batch_from("northshire", "northshire"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    let e = alice
        .post_framed(
            "/v1/federation/frames",
            framed(&batch_from("northshire", "northshire")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));

    // A peer gateway calling a user endpoint.
    let southvale_gw = as_southvale_gateway(&fed, a, b);
    let e = southvale_gw
        .submit_once(&message("user:bob@northshire", "gw", b"x".to_vec()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));

    // A user certificate from the right CA but not in the directory.
    let pair = fed
        .mint(
            a,
            &Identity::User(AreaId::new("northshire").unwrap(), user("zed")),
            YEAR,
        )
        .unwrap();
    let zed = fed.api_with(a, &pair).unwrap();
    let e = zed
        .submit_once(&message("user:bob@northshire", "z", b"x".to_vec()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    assert_nothing_stored(&fed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_speak_for_another_area_or_forge_a_body() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let southvale_gw = as_southvale_gateway(&fed, a, b);

    // Claims the message comes from eastmoor.
    let answer = southvale_gw
        .post_raw("/v1/federation/batch", batch_from("eastmoor", "northshire"))
        .await
        .unwrap();
    assert_eq!(answer["results"][0]["result"], "rejected");
    assert_eq!(answer["results"][0]["code"], "forbidden");
    let answer = southvale_gw
        .post_framed(
            "/v1/federation/frames",
            framed(&batch_from("eastmoor", "northshire")),
        )
        .await
        .unwrap();
    assert_eq!(answer["results"][0]["code"], "forbidden");

    // Malformed frames from a genuine peer: a typed error, nothing stored.
    let whole = framed(&batch_from("southvale", "northshire"));
    let mut body_in_head = Vec::new();
    proto::frame::push_record(
        &mut body_in_head,
        br#"{"kind":"status","message_id":"00112233445566778899aabbccddeeff","status":"fetched","at_ms":1}"#,
        b"a body where none belongs",
    );
    for (what, bytes) in [
        ("truncated", whole[..whole.len() - 1].to_vec()),
        ("empty", Vec::new()),
        ("head too large", u32::MAX.to_be_bytes().to_vec()),
    ] {
        let e = southvale_gw
            .post_framed("/v1/federation/frames", bytes)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::MalformedRequest), "{what}: {e}");
    }
    // A record that cannot be read, in a batch whose framing is sound, is
    // refused alone (a gateway of another version may send one), beside an
    // item that can be.
    let mut unknown_kind = Vec::new();
    proto::frame::push_record(
        &mut unknown_kind,
        br#"{"kind":"recall","message_id":"00112233445566778899aabbccddeeff"}"#,
        b"",
    );
    for (what, bad) in [
        ("body on a status item", body_in_head),
        ("unknown kind", unknown_kind),
    ] {
        let mut batch = bad;
        batch.extend_from_slice(&framed(&batch_from("eastmoor", "northshire")));
        let answer = southvale_gw
            .post_framed("/v1/federation/frames", batch)
            .await
            .unwrap();
        assert_eq!(
            answer["results"][0]["code"], "malformed_request",
            "{what}: {answer}"
        );
        assert_eq!(
            answer["results"][1]["code"], "forbidden",
            "{what}: {answer}"
        );
    }

    // Body does not match the content hash.
    let mut batch: serde_json::Value =
        serde_json::from_slice(&batch_from("southvale", "northshire")).unwrap();
    batch["items"][0]["envelope"]["recipient"] = "user:alice@northshire".into();
    batch["items"][0]["body"] = "dGFtcGVyZWQ=".into();
    let answer = southvale_gw
        .post_raw("/v1/federation/batch", serde_json::to_vec(&batch).unwrap())
        .await
        .unwrap();
    assert_eq!(answer["results"][0]["result"], "rejected");

    // A status update for a message never sent to southvale.
    let batch = serde_json::json!({"items": [{"kind": "status", "message_id": "00112233445566778899aabbccddeeff", "status": "acknowledged", "at_ms": 1}]});
    let answer = southvale_gw
        .post_raw("/v1/federation/batch", serde_json::to_vec(&batch).unwrap())
        .await
        .unwrap();
    assert_eq!(answer["results"][0]["code"], "not_found");
    assert_nothing_stored(&fed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_store_nothing() {
    let fed = Federation::standard().await.unwrap();
    let a = fed.index("northshire");
    let alice = fed.api(a, "alice").unwrap();

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("malformed JSON", b"{not json".to_vec(), ErrorCode::MalformedRequest),
        ("empty body", Vec::new(), ErrorCode::MalformedRequest),
        ("unknown field", br#"{"idempotency_key":"k","recipient":"user:bob@northshire","category":"update","body":"","admin":true}"#.to_vec(), ErrorCode::MalformedRequest),
        ("bad recipient", br#"{"idempotency_key":"k","recipient":"bob","category":"update","body":""}"#.to_vec(), ErrorCode::MalformedRequest),
        ("bad base64", br#"{"idempotency_key":"k","recipient":"user:bob@northshire","category":"update","body":"!!"}"#.to_vec(), ErrorCode::MalformedRequest),
    ];
    for (what, body, code) in cases {
        let e = alice.post_raw("/v1/messages", body).await.unwrap_err();
        assert_eq!(e.code(), Some(code), "{what}: {e}");
    }
    // The same in the framed encoding.
    let good =
        proto::frame::encode_submit(&message("user:bob@northshire", "f", b"x".to_vec()).unwrap());
    let mut two = good.clone();
    two.extend_from_slice(&good);
    let mut base64_in_head = Vec::new();
    proto::frame::push_record(
        &mut base64_in_head,
        br#"{"idempotency_key":"k","recipient":"user:bob@northshire","category":"update","body":"eA=="}"#,
        b"x",
    );
    for (what, body) in [
        ("truncated frame", good[..good.len() - 1].to_vec()),
        ("two submissions", two),
        ("body in the head", base64_in_head),
        (
            "JSON sent as frames",
            br#"{"idempotency_key":"k"}"#.to_vec(),
        ),
    ] {
        let e = alice.post_framed("/v1/messages", body).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::MalformedRequest), "{what}: {e}");
    }

    // A request far over the transport limit (more than the sockets' buffers
    // hold): the gateway answers 413 without reading it all, and drains the
    // rest before it closes the connection, so the client reads the 413
    // rather than a reset while still writing. Nothing is stored.
    for _ in 0..3 {
        match alice
            .post_raw("/v1/messages", vec![b' '; 24 * 1024 * 1024])
            .await
        {
            Err(ClientError::Api {
                status: 413,
                code: ErrorCode::PayloadTooLarge,
                ..
            }) => {}
            other => panic!("huge request: {other:?}"),
        }
    }

    let too_big = message("user:bob@northshire", "big", vec![0u8; 1024 * 1024 + 1]).unwrap();
    let e = alice.submit_once(&too_big).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PayloadTooLarge), "{e}");

    for to in [
        "user:nobody@northshire",
        "team:nobody@northshire",
        "team:duty@westfell",
    ] {
        let e = alice
            .submit_once(&message(to, "unknown", b"x".to_vec()).unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UnknownRecipient), "{to}: {e}");
    }
    let e = alice
        .fetch(&proto::MessageId::from_bytes([1; 16]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    // An acknowledgement's body, when there is one, is checked first.
    let some_id = proto::MessageId::from_bytes([2; 16]);
    for (what, body) in [
        ("malformed JSON", b"{not json".to_vec()),
        ("unknown field", br#"{"read":true}"#.to_vec()),
        ("wrong type", br#"{"not_in_case":"yes"}"#.to_vec()),
    ] {
        let e = alice
            .post_raw(&format!("/v1/messages/{some_id}/ack"), body)
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Some(ErrorCode::MalformedRequest),
            "ack, {what}: {e}"
        );
    }
    let e = alice.not_in_case(&some_id).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    assert_nothing_stored(&fed);
}

/// A stand-in for gateway `a` that answers every submission with `307` to
/// another path, and counts the requests that reach that path.
async fn redirecting_gateway(
    fed: &Federation,
    a: usize,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let elsewhere = std::sync::Arc::new(AtomicUsize::new(0));
    let count = elsewhere.clone();
    tests::serve_as_gateway(fed, a, listener, move |req| {
        let count = count.clone();
        async move {
            let mut resp = hyper::Response::new(http_body_util::Full::default());
            if req.uri().path() == "/v1/messages" {
                *resp.status_mut() = hyper::StatusCode::TEMPORARY_REDIRECT;
                let to = format!("https://127.0.0.1:{port}/v1/elsewhere");
                resp.headers_mut()
                    .insert(hyper::header::LOCATION, to.parse().unwrap());
            } else {
                count.fetch_add(1, Ordering::SeqCst);
            }
            resp
        }
    })
    .unwrap();
    (port, elsewhere)
}

/// A client sends a message to its own gateway only: a `3xx` answer is an
/// error, never a reason to send the message somewhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_never_follows_a_redirect() {
    let fed = Federation::standard().await.unwrap();
    let a = fed.index("northshire");
    let (port, elsewhere) = redirecting_gateway(&fed, a).await;
    let config = client::ClientConfig::load(&fed.client_config_path(a, "alice")).unwrap();
    let creds = certs::Credentials::load(&config.cert, &config.key).unwrap();
    let alice = client::Api::from_parts(
        &format!("https://127.0.0.1:{port}"),
        &creds,
        &config.area,
        &certs::load_certs(&config.ca).unwrap(),
    )
    .unwrap();
    let m = message("user:bob@northshire", "redirected", b"x".to_vec()).unwrap();
    match alice.submit_once(&m).await {
        Err(ClientError::Decode(msg)) => assert!(msg.contains("307"), "{msg}"),
        other => panic!("a redirect must be an error, got {other:?}"),
    }
    assert_eq!(
        elsewhere.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the message was sent on to the redirect's target"
    );
    assert_nothing_stored(&fed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_repeat_of_a_stored_message_is_a_duplicate_and_an_expired_new_one_is_refused() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let southvale_gw = as_southvale_gateway(&fed, a, b);
    // A message whose validity ran out on its way is refused; a repeat of
    // one stored before is a duplicate, even if it would not be taken now.
    let item = |id: u8, expires_at_ms: u64| {
        let mut batch: serde_json::Value =
            serde_json::from_slice(&batch_from("southvale", "northshire")).unwrap();
        batch["items"][0]["envelope"]["recipient"] = "user:alice@northshire".into();
        batch["items"][0]["envelope"]["message_id"] =
            proto::MessageId::from_bytes([id; 16]).to_string().into();
        batch["items"][0]["envelope"]["expires_at_ms"] = expires_at_ms.into();
        serde_json::to_vec(&batch).unwrap()
    };
    let answer = southvale_gw
        .post_raw("/v1/federation/batch", item(9, 1))
        .await
        .unwrap();
    assert_eq!(answer["results"][0]["result"], "rejected", "{answer}");
    assert!(
        answer["results"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("validity ran out before it reached northshire"),
        "{answer}"
    );
    let answer = southvale_gw
        .post_raw("/v1/federation/batch", item(8, u64::MAX))
        .await
        .unwrap();
    assert_eq!(answer["results"][0]["result"], "stored", "{answer}");
    let answer = southvale_gw
        .post_raw("/v1/federation/batch", item(8, 1))
        .await
        .unwrap();
    assert_eq!(answer["results"][0]["result"], "duplicate", "{answer}");
    // Another message under the same id is not taken for a repeat.
    let mut other: serde_json::Value = serde_json::from_slice(&item(8, u64::MAX)).unwrap();
    other["items"][0]["envelope"]["idempotency_key"] = "another".into();
    let answer = southvale_gw
        .post_raw("/v1/federation/batch", serde_json::to_vec(&other).unwrap())
        .await
        .unwrap();
    assert_eq!(
        answer["results"][0]["code"], "idempotency_conflict",
        "{answer}"
    );
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM inbox").unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_for_a_free_slot() {
    let settings = tests::Settings {
        toml: format!("{}max_connections = 2\n", tests::Settings::default().toml),
        policies: false,
    };
    let mut fed = Federation::create(&tests::standard_areas(), &settings).unwrap();
    let a = fed.index("northshire");
    fed.start(a).await.unwrap();
    let gateway = fed.gateway(a).unwrap();
    let metrics = gateway.metrics();
    // Two clients, each keeping its connection open.
    let alice = fed.api(a, "alice").unwrap();
    let bob = fed.api(a, "bob").unwrap();
    alice.health().await.unwrap();
    bob.health().await.unwrap();
    assert_eq!(metrics.connections_open.get(), 2);

    // A third waits while both are open: not refused, not served.
    let third = fed.api(a, "alice").unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(1), third.health()).await;
    assert!(waited.is_err(), "served past the limit: {waited:?}");
    assert!(metrics.connections_full.get() >= 1);

    // Once one closes, the third is served.
    drop(alice);
    let served = tests::eventually(Duration::from_secs(20), || async {
        matches!(
            tokio::time::timeout(Duration::from_secs(2), third.health()).await,
            Ok(Ok(_))
        )
    })
    .await;
    assert!(served, "the freed slot was not taken");
    bob.health().await.unwrap();
    assert!(metrics.connections_open.get() <= 2);
    fed.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_slot_with_handshakes_it_never_finishes() {
    let mut fed =
        Federation::create(&tests::standard_areas(), &tests::Settings::default()).unwrap();
    let a = fed.index("northshire");
    fed.start(a).await.unwrap();
    let metrics = fed.gateway(a).unwrap().metrics();
    let addr = format!("127.0.0.1:{}", fed.port(a).unwrap());
    // 32 connections that never say hello are waited for (10 s each).
    let mut idle = Vec::new();
    for _ in 0..32 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let opened = tests::eventually(Duration::from_secs(20), || async {
        metrics.connections_open.get() == 32
    })
    .await;
    assert!(opened, "{} open", metrics.connections_open.get());
    assert_eq!(metrics.handshakes_refused.get(), 0);
    // The next from the same address is closed at once.
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read(&mut extra, &mut buf),
    )
    .await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    assert_eq!(metrics.handshakes_refused.get(), 1);
    // Once they go, a real client from that address gets in.
    drop(idle);
    let alice = fed.api(a, "alice").unwrap();
    let served = tests::eventually(Duration::from_secs(20), || async {
        alice.health().await.is_ok()
    })
    .await;
    assert!(served);
    fed.stop_all().await;
}

/// What `stream` receives until the gateway closes it, or `None` if it is
/// still open after `within`.
async fn until_closed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Option<String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::io::AsyncReadExt::read(stream, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed_but_long_polls_are_not() {
    use tokio::io::AsyncWriteExt as _;
    let settings = tests::Settings {
        toml: format!(
            "{}idle_timeout = \"1s\"\nbody_timeout = \"1s\"\n",
            tests::Settings::default().toml
        ),
        policies: false,
    };
    let mut fed = Federation::create(&tests::standard_areas(), &settings).unwrap();
    let a = fed.index("northshire");
    fed.start(a).await.unwrap();
    let metrics = fed.gateway(a).unwrap().metrics();

    // Authenticated, then silent: closed.
    let mut silent = fed.tls_connect(a, "alice").await.unwrap();
    // Headers begun and never finished: closed, unanswered.
    let mut slow_headers = fed.tls_connect(a, "alice").await.unwrap();
    slow_headers
        .write_all(b"GET /v1/health HTTP/1.1\r\nhost: northshire\r\n")
        .await
        .unwrap();
    // A body that stops short: answered 408, then closed.
    let mut slow_body = fed.tls_connect(a, "alice").await.unwrap();
    slow_body
        .write_all(b"POST /v1/messages HTTP/1.1\r\nhost: northshire\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{\"recipient\":")
        .await
        .unwrap();
    // One request answered, then nothing more on the connection: closed.
    let mut kept_alive = fed.tls_connect(a, "alice").await.unwrap();
    kept_alive
        .write_all(b"GET /v1/health HTTP/1.1\r\nhost: northshire\r\n\r\n")
        .await
        .unwrap();
    // A long-poll outlasting the idle timeout is a request in progress.
    let bob = fed.api(a, "bob").unwrap();
    let poll = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r = bob.inbox(Duration::from_secs(4)).await;
        (r, started.elapsed(), bob)
    });

    let within = Duration::from_secs(30);
    let (silent, slow_headers, slow_body, kept_alive) = tokio::join!(
        until_closed(&mut silent, within),
        until_closed(&mut slow_headers, within),
        until_closed(&mut slow_body, within),
        until_closed(&mut kept_alive, within),
    );
    assert_eq!(silent.as_deref(), Some(""), "the silent connection");
    assert_eq!(slow_headers.as_deref(), Some(""), "the unfinished headers");
    let slow_body = slow_body.expect("the unfinished body was not closed");
    assert!(
        slow_body.starts_with("HTTP/1.1 408") && slow_body.contains("\"request_timeout\""),
        "{slow_body}"
    );
    let kept_alive = kept_alive.expect("the idle keep-alive connection was not closed");
    assert!(kept_alive.starts_with("HTTP/1.1 200"), "{kept_alive}");
    assert_eq!(metrics.bodies_timed_out.get(), 1);
    // Counted as each task ends, just after its connection was dropped.
    let counted = tests::eventually(within, || async {
        metrics.connections_idle_closed.get() >= 3
    })
    .await;
    assert!(counted, "{}", metrics.connections_idle_closed.get());

    let (listed, took, bob) = poll.await.unwrap();
    let listed = listed.unwrap();
    assert!(listed.messages.is_empty());
    assert!(
        took >= Duration::from_secs(3),
        "the long-poll ended after {took:?}"
    );
    // The client's pooled connection was closed while it sat idle: the
    // next request opens another.
    tokio::time::sleep(Duration::from_secs(2)).await;
    bob.health().await.unwrap();
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM sent").unwrap(), 0);
    fed.stop_all().await;
}

/// A peer's repeat of a message stored before (its answer lost) is answered
/// as a duplicate even when the checks would refuse it now; a refused
/// message never stored stays refused. Either way nothing more is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_repeat_of_a_stored_message_is_answered_as_a_duplicate() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let southvale_gw = as_southvale_gateway(&fed, a, b);
    let mut original: serde_json::Value =
        serde_json::from_slice(&batch_from("southvale", "northshire")).unwrap();
    original["items"][0]["envelope"]["recipient"] = "user:alice@northshire".into();
    let original = serde_json::to_vec(&original).unwrap();
    let answer = southvale_gw
        .post_raw("/v1/federation/batch", original.clone())
        .await
        .unwrap();
    assert_eq!(answer["results"][0]["result"], "stored", "{answer}");

    // The same message again, now refused by a check (its body no longer
    // matches), beside one never stored that fails the same check.
    let mut batch: serde_json::Value = serde_json::from_slice(&original).unwrap();
    batch["items"][0]["body"] = "dGFtcGVyZWQ=".into();
    let mut fresh = batch["items"][0].clone();
    fresh["envelope"]["message_id"] = "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f".into();
    batch["items"].as_array_mut().unwrap().push(fresh);
    let answer = southvale_gw
        .post_framed(
            "/v1/federation/frames",
            framed(&serde_json::to_vec(&batch).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(answer["results"][0]["result"], "duplicate", "{answer}");
    assert_eq!(answer["results"][1]["result"], "rejected", "{answer}");
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM inbox").unwrap(), 1);
}
