//! Faults: restarts with messages in flight, peer outages, expiry, rate limits.

use std::time::Duration;

use proto::{ErrorCode, Status};
use tests::{eventually, message, reaches, Federation, Settings};

/// Sends `n` messages from `user` of area `a`, one after another, keys `<user>-<i>`.
async fn send_sequence(api: client::Api, user: &'static str, n: usize) -> Vec<proto::MessageId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let m = message(
            "team:duty@southvale",
            &format!("{user}-{i:05}"),
            vec![b'x'; 256],
        )
        .unwrap();
        ids.push(api.submit(&m).await.unwrap().message_id);
    }
    ids
}

/// Every sender's messages are in the inbox exactly once, in the order sent.
fn assert_exactly_once_in_order(fed: &Federation, b: usize, senders: &[&str], per_sender: usize) {
    let conn = rusqlite::Connection::open_with_flags(
        fed.db_path(b),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    for s in senders {
        let mut stmt = conn
            .prepare("SELECT idem_key FROM inbox WHERE sender_user = ?1 ORDER BY seq")
            .unwrap();
        let keys: Vec<String> = stmt
            .query_map([s], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let expected: Vec<String> = (0..per_sender).map(|i| format!("{s}-{i:05}")).collect();
        assert_eq!(
            keys.len(),
            expected.len(),
            "{s}: every message exactly once"
        );
        assert!(keys == expected, "{s}: messages arrived out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_the_receiving_gateway_with_1000_in_flight_loses_and_duplicates_nothing() {
    let mut fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let senders = [("alice", 500), ("bob", 500)];
    let tasks: Vec<_> = senders
        .iter()
        .map(|(u, n)| tokio::spawn(send_sequence(fed.api(a, u).unwrap(), u, *n)))
        .collect();
    // Let traffic flow, then restart the receiver twice while it is busy.
    for _ in 0..2 {
        assert!(
            eventually(Duration::from_secs(60), || async {
                fed.count(a, "SELECT COUNT(*) FROM sent").unwrap_or(0) >= 300
            })
            .await
        );
        fed.stop(b).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        fed.start(b).await.unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(120), || async {
            fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap_or(0) >= 1000
        })
        .await,
        "all 1000 messages must arrive"
    );
    assert!(
        eventually(Duration::from_secs(60), || async {
            fed.count(a, "SELECT COUNT(*) FROM sent WHERE status = 'delivered'")
                .unwrap_or(0)
                == 1000
        })
        .await
    );
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 1000);
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM outbox").unwrap(), 0);
    assert_exactly_once_in_order(&fed, b, &["alice", "bob"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_outage_queues_in_order_and_survives_a_sender_restart() {
    let mut fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    fed.stop(b).await;
    let ids = send_sequence(fed.api(a, "alice").unwrap(), "alice", 150).await;
    let alice = fed.api(a, "alice").unwrap();
    let st = alice.status(&ids[0]).await.unwrap();
    assert_eq!(st.status, Status::Accepted);
    // alice is told why (the worker has tried by now: 150 sends later).
    let waiting = st
        .waiting
        .expect("the sender sees that southvale is unreachable");
    assert!(
        waiting.last_error.to_lowercase().contains("connect"),
        "{waiting:?}"
    );
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM outbox").unwrap(), 150);

    // The sending gateway restarts too while its peer is away.
    fed.stop(a).await;
    fed.start(a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fed.start(b).await.unwrap();

    assert!(
        eventually(Duration::from_secs(60), || async {
            fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap_or(0) >= 150
        })
        .await
    );
    assert!(
        reaches(
            &alice,
            &ids[149],
            Status::Delivered,
            Duration::from_secs(30)
        )
        .await
    );
    assert_exactly_once_in_order(&fed, b, &["alice"], 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_arrive_exactly_once_in_order_across_receiver_restarts() {
    // Tiny batches and a wide window: many batches are on the wire at once.
    let settings = Settings {
        toml: "[delivery]\nbatch_max_items = 3\nbatches_in_flight = 8\nretry_initial = \"50ms\"\nretry_max = \"300ms\"\n".into(),
        policies: false,
    };
    let mut fed = Federation::standard_with(&settings).await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    // A queue builds up while the receiver is away, then drains pipelined.
    fed.stop(b).await;
    let senders = [("alice", 200), ("bob", 200)];
    let tasks: Vec<_> = senders
        .iter()
        .map(|(u, n)| tokio::spawn(send_sequence(fed.api(a, u).unwrap(), u, *n)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    fed.start(b).await.unwrap();
    // Restart the receiver twice while batches are on the wire.
    for seen in [60, 200] {
        assert!(
            eventually(Duration::from_secs(60), || async {
                fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap_or(0) >= seen
            })
            .await
        );
        fed.stop(b).await;
        fed.start(b).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            fed.count(a, "SELECT COUNT(*) FROM outbox").unwrap_or(-1) == 0
        })
        .await,
        "every item must be answered"
    );
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 400);
    assert_exactly_once_in_order(&fed, b, &["alice", "bob"], 200);
    let m = fed.gateway(a).unwrap().metrics();
    assert!(
        m.federation_batches_pipelined.get() > 0,
        "batches must have been pipelined ({} sent)",
        m.federation_batches_sent.get()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_session_goes_on_at_once_after_a_quiet_receiver_restart() {
    let mut fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let alice = fed.api(a, "alice").unwrap();
    // A few batches: B confirms it keeps order, and A's session moves on.
    let ids = send_sequence(fed.api(a, "alice").unwrap(), "alice", 3).await;
    for id in &ids {
        assert!(reaches(&alice, id, Status::Delivered, Duration::from_secs(30)).await);
    }
    // B restarts while nothing is on the wire; A's next batch continues the
    // same session, which B must recognise from its store (a fresh receiver
    // would wait for a batch 1 that never comes, then refuse).
    fed.stop(b).await;
    fed.start(b).await.unwrap();
    let failures = fed.gateway(a).unwrap().metrics().federation_failures.get();
    let next = alice
        .submit(&message("team:duty@southvale", "after-restart", vec![b'y'; 64]).unwrap())
        .await
        .unwrap();
    assert!(
        reaches(
            &alice,
            &next.message_id,
            Status::Delivered,
            Duration::from_secs(60)
        )
        .await
    );
    assert_eq!(
        fed.gateway(a).unwrap().metrics().federation_failures.get(),
        failures,
        "the restarted receiver refused the session's next batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_delivered_in_time_returns_undeliverable() {
    let settings = Settings {
        toml: "[delivery]\nmessage_validity = \"1s\"\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n".into(),
        policies: false,
    };
    let mut fed = Federation::standard_with(&settings).await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    fed.stop(b).await;
    let alice = fed.api(a, "alice").unwrap();
    let sent = alice
        .submit(&message("team:duty@southvale", "late", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(
        reaches(
            &alice,
            &sent.message_id,
            Status::Undeliverable,
            Duration::from_secs(30)
        )
        .await
    );
    let st = alice.status(&sent.message_id).await.unwrap();
    let reason = st
        .history
        .last()
        .and_then(|e| e.reason.clone())
        .unwrap_or_default();
    assert!(
        reason.contains("not delivered to southvale within its validity"),
        "{reason}"
    );
    assert!(
        reason.contains("last error"),
        "the reason names the last error: {reason}"
    );
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM outbox").unwrap(), 0);

    // When the peer returns, the expired message is not delivered late.
    fed.start(b).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_the_rate_limit_gets_429_with_retry_after() {
    let settings = Settings {
        toml: "[limits]\nuser_requests_per_second = 1\nuser_burst = 2\n".into(),
        policies: false,
    };
    let fed = Federation::standard_with(&settings).await.unwrap();
    let a = fed.index("northshire");
    let alice = fed.api(a, "alice").unwrap();
    let mut limited = None;
    for i in 0..5 {
        if let Err(e) = alice
            .submit_once(&message("user:bob@northshire", &format!("r{i}"), b"x".to_vec()).unwrap())
            .await
        {
            limited = Some(e);
            break;
        }
    }
    match limited {
        Some(client::ClientError::Api {
            status: 429,
            code: ErrorCode::RateLimited,
            retry_after: Some(s),
            ..
        }) => assert!(s >= 1),
        other => panic!("expected 429 with Retry-After, got {other:?}"),
    }
    // Every endpoint counts, and is refused before anything of the request
    // is read.
    let health = alice.health().await;
    assert!(
        matches!(health, Err(client::ClientError::Api { status: 429, .. })),
        "{health:?}"
    );
    // Another user is not affected.
    let bob = fed.api(a, "bob").unwrap();
    bob.submit_once(&message("user:alice@northshire", "b0", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    // And the retrying submit gets through once the window passes.
    alice
        .submit(&message("user:bob@northshire", "after", b"x".to_vec()).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_an_area_taken_out_of_the_peers_go_back_to_their_senders() {
    let mut fed = Federation::standard().await.unwrap();
    let (a, b, e) = (
        fed.index("northshire"),
        fed.index("southvale"),
        fed.index("eastmoor"),
    );
    // dan's message reaches alice; her acknowledgement's news for southvale
    // is still queued when southvale goes away.
    let dan = fed.api(b, "dan").unwrap();
    let from_dan = dan
        .submit(&message("user:alice@northshire", "from-dan", b"d".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(
        reaches(
            &dan,
            &from_dan.message_id,
            Status::Delivered,
            Duration::from_secs(30)
        )
        .await
    );
    fed.stop(b).await;
    fed.stop(e).await;
    let alice = fed.api(a, "alice").unwrap();
    alice.ack(&from_dan.message_id).await.unwrap();
    let mut to_southvale = Vec::new();
    for key in ["to-south-1", "to-south-2"] {
        let m = message("team:duty@southvale", key, b"s".to_vec()).unwrap();
        to_southvale.push(alice.submit(&m).await.unwrap().message_id);
    }
    let to_eastmoor = alice
        .submit(&message("team:duty@eastmoor", "to-east", b"e".to_vec()).unwrap())
        .await
        .unwrap()
        .message_id;
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM outbox").unwrap(), 4);

    // northshire stops federating with southvale.
    fed.stop(a).await;
    fed.edit_config(a, &fed.peer_entry(b).unwrap(), "\n")
        .unwrap();
    fed.start(a).await.unwrap();

    for id in &to_southvale {
        let reason = tests::undeliverable_reason(&alice, id)
            .await
            .unwrap_or_default();
        assert!(
            reason.contains("southvale is no longer a federation peer of this gateway"),
            "{reason}"
        );
    }
    // The other peer's queue is untouched, and nothing for southvale is left.
    assert_eq!(
        alice.status(&to_eastmoor).await.unwrap().status,
        Status::Accepted
    );
    assert_eq!(
        fed.count(a, "SELECT COUNT(*) FROM outbox WHERE peer = 'southvale'")
            .unwrap(),
        0
    );
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM outbox").unwrap(), 1);
    // A new message for southvale is refused, nothing stored.
    let refused = alice
        .submit(&message("team:duty@southvale", "to-south-3", b"s".to_vec()).unwrap())
        .await;
    assert!(refused.is_err(), "{refused:?}");
    // A second start finds nothing more to give back.
    let before = st_len(&alice, &to_southvale[0]).await;
    fed.stop(a).await;
    fed.start(a).await.unwrap();
    assert_eq!(st_len(&alice, &to_southvale[0]).await, before);
    fed.start(e).await.unwrap();
    assert!(
        reaches(
            &alice,
            &to_eastmoor,
            Status::Delivered,
            Duration::from_secs(30)
        )
        .await
    );
}

async fn st_len(api: &client::Api, id: &proto::MessageId) -> usize {
    api.status(id).await.unwrap().history.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_may_have_reached_the_peer_unanswered_is_not_given_up_when_it_expires() {
    let settings = Settings {
        toml: "[delivery]\nmessage_validity = \"2s\"\npeer_timeout = \"1s\"\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n".into(),
        policies: false,
    };
    let mut fed = Federation::standard_with(&settings).await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    fed.stop(b).await;
    // southvale's stand-in takes every batch and never answers in time: for
    // all northshire knows, southvale may have stored them.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = seen.clone();
    let listener = fed.listen_as(b).await.unwrap();
    let silent = tests::serve_as_gateway(&fed, b, listener, move |req| {
        let counted = counted.clone();
        async move {
            let _ = tests::body_bytes(req).await;
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(5)).await;
            hyper::Response::builder()
                .status(503)
                .body(http_body_util::Full::new(hyper::body::Bytes::new()))
                .unwrap()
        }
    })
    .unwrap();
    let alice = fed.api(a, "alice").unwrap();
    let sent = alice
        .submit(&message("team:duty@southvale", "unanswered", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            seen.load(std::sync::atomic::Ordering::SeqCst) > 0
        })
        .await
    );
    // Its validity runs out while southvale may have it: it waits.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        alice.status(&sent.message_id).await.unwrap().status,
        Status::Accepted
    );

    // The real southvale has not stored it; it takes it, late by less than
    // the clocks' allowance, and northshire hears so.
    silent.abort();
    fed.start(b).await.unwrap();
    assert!(
        reaches(
            &alice,
            &sent.message_id,
            Status::Delivered,
            Duration::from_secs(30)
        )
        .await
    );
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_peer_takes_is_refused_and_the_queue_behind_it_goes_on() {
    let fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let mut fed = fed;
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    // northshire takes larger messages than southvale's requests hold.
    fed.edit_config(a, "[limits]\n", "[limits]\nmax_body_bytes = 33554432\n")
        .unwrap();
    fed.start_all().await.unwrap();
    fed.stop(b).await;
    let alice = fed.api(a, "alice").unwrap();
    let large = alice
        .submit(&message("user:dan@southvale", "large", vec![b'l'; 20 << 20]).unwrap())
        .await
        .unwrap();
    let small = alice
        .submit(&message("user:dan@southvale", "small", b"s".to_vec()).unwrap())
        .await
        .unwrap();
    fed.start(b).await.unwrap();
    let failures = || {
        fed.gateway(a)
            .map_or(0, |g| g.metrics().federation_failures.get())
    };
    let before = failures();
    assert!(
        reaches(
            &alice,
            &small.message_id,
            Status::Delivered,
            Duration::from_secs(30)
        )
        .await
    );
    // The refusal starts a new session: the next batch does not wait at
    // southvale for the one it never queued (and fail when that times out).
    assert_eq!(failures(), before, "a send failed once southvale was back");
    let reason = tests::undeliverable_reason(&alice, &large.message_id)
        .await
        .unwrap_or_default();
    assert!(
        reason.contains("larger than the receiving gateway takes"),
        "{reason}"
    );
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 1);
}
