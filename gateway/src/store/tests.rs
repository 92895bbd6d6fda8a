//! The store on real SQLite files: schema migration, WAL restarts, body
//! placement, and the pipelined commit's promises.

use super::*;
use proto::{Category, IdempotencyKey, MessageKind, Sender};
use std::time::Duration;

/// Schema 1 as gateways before schema 2 wrote it (the tables that changed).
const SCHEMA_1: &str = "
CREATE TABLE sent (
    message_id     TEXT PRIMARY KEY,
    sender_user    TEXT NOT NULL,
    idem_key       TEXT NOT NULL,
    recipient_area TEXT NOT NULL,
    envelope       TEXT NOT NULL,
    status         TEXT NOT NULL,
    UNIQUE (sender_user, idem_key)
);
CREATE TABLE status_events (
    message_id TEXT NOT NULL,
    status     TEXT NOT NULL,
    at_ms      INTEGER NOT NULL,
    reason     TEXT,
    PRIMARY KEY (message_id, status)
);
CREATE TABLE inbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT NOT NULL UNIQUE,
    sender_area TEXT NOT NULL,
    sender_user TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    envelope    TEXT NOT NULL,
    body        BLOB NOT NULL,
    status      TEXT NOT NULL,
    stored_at_us INTEGER NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'opaque',
    UNIQUE (sender_area, sender_user, idem_key)
);
CREATE INDEX inbox_target ON inbox (target_kind, target_id, status);
CREATE TABLE outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    peer        TEXT NOT NULL,
    message_id  TEXT,
    is_deliver  INTEGER NOT NULL,
    item        TEXT,
    envelope    TEXT,
    body        BLOB,
    expires_ms  INTEGER NOT NULL
);
PRAGMA user_version = 1;
";

fn envelope(n: u8, key: &str) -> Envelope {
    let body = Body(vec![n; 8]);
    Envelope {
        message_id: MessageId::time_ordered(1_000 + u64::from(n), [n; 10]),
        idempotency_key: IdempotencyKey::new(key).unwrap(),
        sender: Sender {
            area: AreaId::new("northshire").unwrap(),
            user: UserId::new("alice").unwrap(),
        },
        recipient: "user:bob@southvale".parse().unwrap(),
        category: Category::new("update").unwrap(),
        urgent: false,
        kind: MessageKind::Opaque,
        disclosure: None,
        content_hash: body.hash(),
        accepted_at_ms: 1_000,
        expires_at_ms: u64::MAX / 2,
    }
}

/// A message from bob in southvale to alice here.
fn incoming(n: u8, key: &str) -> Envelope {
    Envelope {
        sender: Sender {
            area: AreaId::new("southvale").unwrap(),
            user: UserId::new("bob").unwrap(),
        },
        recipient: "user:alice@northshire".parse().unwrap(),
        ..envelope(n, key)
    }
}

fn write_schema_1(path: &Path, envs: &[Envelope]) {
    let c = Connection::open(path).unwrap();
    c.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
    c.execute_batch(SCHEMA_1).unwrap();
    let events: [&[(&str, i64, Option<&str>)]; 3] = [
        &[
            ("accepted", 1_000, None),
            ("delivered", 1_100, None),
            ("fetched", 1_200, None),
        ],
        &[
            ("accepted", 1_000, None),
            ("undeliverable", 1_300, Some("not delivered in time")),
        ],
        &[("accepted", 1_000, None)],
    ];
    let statuses = ["fetched", "undeliverable", "accepted"];
    for ((env, events), status) in envs.iter().zip(events).zip(statuses) {
        let json = serde_json::to_string(env).unwrap();
        c.execute(
            "INSERT INTO sent VALUES (?1, 'alice', ?2, 'southvale', ?3, ?4)",
            params![
                env.message_id.as_str(),
                env.idempotency_key.as_str(),
                json,
                status
            ],
        )
        .unwrap();
        for (s, at, reason) in events {
            c.execute(
                "INSERT INTO status_events VALUES (?1, ?2, ?3, ?4)",
                params![env.message_id.as_str(), s, at, reason],
            )
            .unwrap();
        }
    }
    // One message received from a peer, waiting in alice's inbox.
    let inc = incoming(7, "in-1");
    c.execute(
        "INSERT INTO inbox (message_id, sender_area, sender_user, idem_key, target_kind, target_id, envelope, body, status, stored_at_us, kind) \
         VALUES (?1, 'southvale', 'bob', 'in-1', 'user', 'alice', ?2, ?3, 'delivered', 5, 'opaque')",
        params![inc.message_id.as_str(), serde_json::to_string(&inc).unwrap(), vec![7u8; 8]],
    )
    .unwrap();
    // The third is still queued, with its envelope in the outbox as schema 1 kept it.
    c.execute(
        "INSERT INTO outbox (peer, message_id, is_deliver, envelope, body, expires_ms) VALUES ('southvale', ?1, 1, ?2, ?3, ?4)",
        params![envs[2].message_id.as_str(), serde_json::to_string(&envs[2]).unwrap(), vec![3u8; 8], i64::MAX / 2],
    )
    .unwrap();
}

#[tokio::test]
async fn schema_1_is_migrated_without_losing_history_queue_or_keys() {
    let dir = tempfile::tempdir().unwrap();
    let envs = [envelope(1, "k1"), envelope(2, "k2"), envelope(3, "k3")];
    write_schema_1(&dir.path().join("gateway.sqlite3"), &envs);

    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let alice = UserId::new("alice").unwrap();

    // History survives, in order, with the reason.
    let s = store
        .status(alice.clone(), envs[0].message_id.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.status, Status::Fetched);
    let steps: Vec<(Status, u64)> = s.history.iter().map(|e| (e.status, e.at_ms)).collect();
    assert_eq!(
        steps,
        vec![
            (Status::Accepted, 1_000),
            (Status::Delivered, 1_100),
            (Status::Fetched, 1_200)
        ]
    );
    let s = store
        .status(alice.clone(), envs[1].message_id.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.status, Status::Undeliverable);
    assert_eq!(
        s.history.last().and_then(|e| e.reason.as_deref()),
        Some("not delivered in time")
    );

    // The queued message is still queued, whole.
    let q = store
        .queued(AreaId::new("southvale").unwrap(), 0, 10)
        .await
        .unwrap();
    assert_eq!(q.len(), 1);
    match &q[0].item {
        FederationItem::Deliver { envelope, body } => {
            assert_eq!(envelope.message_id, envs[2].message_id);
            assert_eq!(body.0, vec![3u8; 8]);
        }
        other => panic!("expected a delivery, got {other:?}"),
    }

    // Idempotency keys still deduplicate.
    let again = NewMessage {
        envelope: Envelope {
            message_id: MessageId::time_ordered(9_999, [9; 10]),
            ..envs[0].clone()
        },
        body: Body(vec![1; 8]),
        route: Route::Peer(AreaId::new("southvale").unwrap()),
        commit: None,
        accept_new: true,
    };
    assert_eq!(
        store.submit(again).await.unwrap(),
        SubmitOutcome::Duplicate(envs[0].message_id.clone(), Status::Fetched)
    );

    // Delivery is recorded in the new columns, and the queue empties.
    store
        .sent(
            AreaId::new("southvale").unwrap(),
            vec![(q[0].seq, Sent::Accepted)],
            2_000,
        )
        .await
        .unwrap();
    let s = store
        .status(alice, envs[2].message_id.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.status, Status::Delivered);
    assert_eq!(s.history.last().map(|e| e.at_ms), Some(2_000));
    assert!(store
        .queued(AreaId::new("southvale").unwrap(), 0, 10)
        .await
        .unwrap()
        .is_empty());

    // The inbox kept its message, and still deduplicates on the sender's key.
    let mb = Mailbox {
        user: UserId::new("alice").unwrap(),
        teams: vec![],
    };
    let items = store.inbox(mb.clone(), 10).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].envelope.message_id, incoming(7, "in-1").message_id);
    let resent = Envelope {
        message_id: MessageId::time_ordered(9_998, [6; 10]),
        ..incoming(7, "in-1")
    };
    let fresh = incoming(8, "in-2");
    let out = store
        .accept_batch(
            AreaId::new("southvale").unwrap(),
            vec![
                Incoming::Deliver(Box::new(resent), Body(vec![7; 8])),
                Incoming::Deliver(Box::new(fresh.clone()), Body(vec![8; 8])),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![IncomingOutcome::Duplicate, IncomingOutcome::Stored]
    );
    let items = store.inbox(mb, 10).await.unwrap();
    let ids: Vec<_> = items
        .iter()
        .map(|i| i.envelope.message_id.clone())
        .collect();
    assert_eq!(ids, vec![incoming(7, "in-1").message_id, fresh.message_id]);
    drop(store);

    // Opening again is a no-op; a newer schema is refused with a clear error.
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let v: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 8);
    // Schema 3: the migrated message is in the bulk-built mailbox index,
    // and the per-message index by recipient is gone.
    let indexed: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM mailbox WHERE target_kind = 'user' AND target_id = 'alice' \
             AND seq <= (SELECT up_to FROM mailbox_mark)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(indexed >= 1, "{indexed}");
    let old_index: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'inbox_target'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old_index, 0);
    c.execute_batch("PRAGMA user_version = 9").unwrap();
    drop(c);
    let e = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap_err();
    assert!(e.to_string().contains("newer"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_restarts_under_sustained_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let wal = dir.path().join("gateway.sqlite3-wal");
    // 3,200 messages whose envelopes (declared disclosures, stored in rows)
    // are about 16 KiB: about 52 MB through the WAL, three times the length
    // at which it is made to restart. (Bodies go to the body log.)
    let mut tasks = Vec::new();
    for w in 0..16u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200u32 {
                let body = Body(vec![w; 64]);
                let key = format!("w{w}-{i}");
                let mut env = envelope(w, &key);
                env.disclosure = Some(proto::Disclosure {
                    policy_id: "northshire".into(),
                    policy_version: 1,
                    purpose: "safeguarding".into(),
                    fields: (0..1024).map(|f| format!("field.{f:010}")).collect(),
                    fled_from: vec![],
                });
                env.message_id = MessageId::time_ordered(1_000 + u64::from(i), [w; 10]);
                env.content_hash = body.hash();
                store
                    .submit(NewMessage {
                        envelope: env,
                        body,
                        route: Route::Peer(AreaId::new("southvale").unwrap()),
                        commit: None,
                        accept_new: true,
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    let mut largest = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let written = 3_200 * 16 * 1024;
    assert!(
        largest < written / 2,
        "the WAL reached {largest} bytes of {written} written: it did not restart"
    );
}

#[tokio::test]
async fn bodies_read_back_whether_inline_or_in_the_body_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    // A batch of twenty 4 KiB bodies is over the group's inline budget: all
    // go to the inbox body log. A batch of four fits: all go inline (some
    // of each would cost the log's fsync and the WAL's writes both).
    let items: Vec<(Envelope, Body)> = (0..24u8)
        .map(|n| {
            let body = Body((0..4096u32).map(|i| (i as u8) ^ n).collect());
            let mut env = incoming(n, &format!("b-{n}"));
            env.content_hash = body.hash();
            (env, body)
        })
        .collect();
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    for (batch, expected) in [(&items[..20], (0, 20)), (&items[20..], (4, 20))] {
        let out = store
            .accept_batch(
                AreaId::new("southvale").unwrap(),
                batch
                    .iter()
                    .map(|(e, b)| Incoming::Deliver(Box::new(e.clone()), b.clone()))
                    .collect(),
            )
            .await
            .unwrap();
        assert!(out.iter().all(|o| *o == IncomingOutcome::Stored));
        let placed: (i64, i64) = c
            .query_row("SELECT COUNT(body), COUNT(body_seg) FROM inbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(placed, expected, "(inline, logged)");
    }
    let mb = Mailbox {
        user: UserId::new("alice").unwrap(),
        teams: vec![],
    };
    for (env, body) in &items {
        let (got, bytes) = store
            .fetch(mb.clone(), env.message_id.clone(), 5)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.message_id, env.message_id);
        assert_eq!(&bytes, body);
    }

    // A body larger than the inline budget goes to the outbox log, is read
    // back for sending, and its segment goes once it is delivered.
    let big = Body(vec![9u8; 40 * 1024]);
    let mut env = envelope(30, "big");
    env.content_hash = big.hash();
    store
        .submit(NewMessage {
            envelope: env.clone(),
            body: big.clone(),
            route: Route::Peer(AreaId::new("southvale").unwrap()),
            commit: None,
            accept_new: true,
        })
        .await
        .unwrap();
    // (The fetches above queued status items for southvale first.)
    let q = store
        .queued(AreaId::new("southvale").unwrap(), 0, 100)
        .await
        .unwrap();
    let sent: Vec<&Body> = q
        .iter()
        .filter_map(|q| match &q.item {
            FederationItem::Deliver { body, .. } => Some(body),
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![&big]);
    let logged: i64 = c
        .query_row("SELECT COUNT(body_seg) FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(logged, 1);
}

/// With the WAL fsync held back, neither the caller nor a reader sees a
/// committed message: the caller is answered, and the row can be read, only
/// once the commit is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The held guard stops the store's sync thread, not this runtime.
#[allow(clippy::await_holding_lock)]
async fn nothing_is_answered_or_read_before_its_commit_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let southvale = AreaId::new("southvale").unwrap();
    let new = |n: u8| {
        let env = envelope(n, &format!("fence-{n}"));
        NewMessage {
            body: Body(vec![n; 8]),
            envelope: env,
            route: Route::Peer(AreaId::new("southvale").unwrap()),
            commit: None,
            accept_new: true,
        }
    };
    store.submit(new(1)).await.unwrap();
    let durable = store.durability.issued();

    let gate = store.durability.gate.lock().unwrap();
    let submitting = tokio::spawn({
        let store = store.clone();
        async move { store.submit(new(2)).await }
    });
    // Wait until the second group's COMMIT is done: numbered, and in the
    // database file (as a connection of our own sees it), not yet fsynced.
    // (The number comes just before the COMMIT, so it alone is not enough.)
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let committed = || -> i64 {
        c.query_row("SELECT COUNT(*) FROM sent", [], |r| r.get(0))
            .unwrap()
    };
    while store.durability.issued() == durable || committed() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reading = tokio::spawn({
        let store = store.clone();
        let southvale = southvale.clone();
        async move { store.queued(southvale, 0, 100).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!submitting.is_finished(), "answered before the fsync");
    assert!(!reading.is_finished(), "read a commit that is not on disk");

    drop(gate);
    submitting.await.unwrap().unwrap();
    let queued = reading.await.unwrap().unwrap();
    assert_eq!(queued.len(), 2, "the read sees both once they are durable");
}

#[tokio::test]
async fn pipelined_batches_are_stored_only_in_session_order() {
    let dir = tempfile::tempdir().unwrap();
    let peer = AreaId::new("southvale").unwrap();
    let n = std::sync::atomic::AtomicU8::new(0);
    let batch = || {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = Body(vec![i; 32]);
        let mut env = incoming(i, &format!("p-{i}"));
        env.message_id = MessageId::time_ordered(20_000 + u64::from(i), [i; 10]);
        env.content_hash = body.hash();
        vec![Incoming::Deliver(Box::new(env), body)]
    };
    let at = |session, batch| Some(BatchOrder { session, batch });
    let stored = |dir: &Path| -> i64 {
        Connection::open(dir.join("gateway.sqlite3"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM inbox", [], |r| r.get(0))
            .unwrap()
    };
    {
        let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
        // Batches 1 and 2 are queued before either is on disk.
        let first = store
            .queue_batch(peer.clone(), batch(), at(7, 1))
            .await
            .unwrap();
        let second = store
            .queue_batch(peer.clone(), batch(), at(7, 2))
            .await
            .unwrap();
        assert_eq!(first.await.unwrap(), vec![IncomingOutcome::Stored]);
        assert_eq!(second.await.unwrap(), vec![IncomingOutcome::Stored]);
        // A gap, a repeat and a session that starts past 1 store nothing.
        for (session, number) in [(7, 4), (7, 2), (7, 1), (8, 2)] {
            let e = store
                .queue_batch(peer.clone(), batch(), at(session, number))
                .await
                .unwrap()
                .await
                .unwrap_err();
            assert!(
                matches!(e, StoreError::OutOfOrder(_)),
                "{session}/{number}: {e}"
            );
        }
        assert_eq!(stored(dir.path()), 2);
        // The refused batches did not move the session on.
        let third = store
            .queue_batch(peer.clone(), batch(), at(7, 3))
            .await
            .unwrap();
        assert_eq!(third.await.unwrap(), vec![IncomingOutcome::Stored]);
        // Sessions are per peer: another peer's session 7 starts at 1.
        let other = AreaId::new("eastmoor").unwrap();
        let e = store
            .queue_batch(other.clone(), batch(), at(7, 4))
            .await
            .unwrap()
            .await;
        assert!(matches!(e, Err(StoreError::OutOfOrder(_))));
        // Without an order, nothing is checked.
        store
            .queue_batch(other, batch(), None)
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(stored(dir.path()), 4);
    }
    // The order survives a restart, and a peer keeps only its newest sessions.
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    assert_eq!(
        store.peer_sessions().await.unwrap(),
        vec![(
            peer.clone(),
            BatchOrder {
                session: 7,
                batch: 3
            }
        )]
    );
    let e = store
        .queue_batch(peer.clone(), batch(), at(7, 3))
        .await
        .unwrap()
        .await;
    assert!(matches!(e, Err(StoreError::OutOfOrder(_))));
    for session in 100..100 + SESSIONS_PER_PEER as u64 {
        store
            .queue_batch(peer.clone(), batch(), at(session, 1))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let e = store
        .queue_batch(peer.clone(), batch(), at(7, 4))
        .await
        .unwrap()
        .await;
    assert!(
        matches!(e, Err(StoreError::OutOfOrder(_))),
        "session 7 is forgotten"
    );
    let e = store
        .queue_batch(peer.clone(), batch(), at(100, 2))
        .await
        .unwrap()
        .await;
    assert_eq!(e.unwrap(), vec![IncomingOutcome::Stored]);
}

#[tokio::test]
async fn after_a_failed_wal_fsync_nothing_more_is_answered_or_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let new = |n: u8| NewMessage {
        body: Body(vec![n; 8]),
        envelope: envelope(n, &format!("fail-{n}")),
        route: Route::Peer(AreaId::new("southvale").unwrap()),
        commit: None,
        accept_new: true,
    };
    let first = store.submit(new(1)).await.unwrap();
    assert!(matches!(first, SubmitOutcome::Stored(..)), "{first:?}");
    assert!(store.fault().is_none());

    store
        .durability
        .fail_next_sync
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = store.submit(new(2)).await.unwrap_err();
    assert!(failed.to_string().contains("durable"), "{failed}");
    // Later writes and reads are refused, not acknowledged or served from
    // a log the disk may have lost part of.
    assert!(store.submit(new(3)).await.is_err());
    assert!(store
        .queued(AreaId::new("southvale").unwrap(), 0, 10)
        .await
        .is_err());
    assert!(store.fault().is_some_and(|f| f.contains("restart")));
}

#[tokio::test]
async fn a_repeated_delivery_adds_no_body_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    // Bodies over the inline budget go to the inbox body log.
    let items = || -> Vec<Incoming> {
        (0..3u8)
            .map(|n| {
                let body = Body(vec![n; 40 * 1024]);
                let mut env = incoming(n, &format!("again-{n}"));
                env.content_hash = body.hash();
                Incoming::Deliver(Box::new(env), body)
            })
            .collect()
    };
    let log_bytes = || -> u64 {
        std::fs::read_dir(dir.path().join("bodies").join("inbox"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let peer = AreaId::new("southvale").unwrap();
    let first = store.accept_batch(peer.clone(), items()).await.unwrap();
    assert!(first.iter().all(|o| *o == IncomingOutcome::Stored));
    let stored = log_bytes();
    assert!(stored >= 3 * 40 * 1024, "{stored}");
    let again = store.accept_batch(peer, items()).await.unwrap();
    assert!(again.iter().all(|o| *o == IncomingOutcome::Duplicate));
    assert_eq!(
        log_bytes(),
        stored,
        "the repeats' bodies were written again"
    );
}

/// Job `n`'s writes in the group tests: a `peer_sessions` row (peer
/// `job`, session `n`) and a queued status update at position `10 + n`.
fn one_row_and_one_queue_effect(
    c: &Connection,
    tails: &Tails,
    peer: &AreaId,
    n: usize,
) -> Result<(), StoreError> {
    exec(
        c,
        "INSERT INTO peer_sessions (peer, session, last_batch) VALUES ('job', ?1, 1)",
        [n as i64],
    )?;
    let item = FederationItem::Status {
        message_id: MessageId::time_ordered(1_000, [n as u8; 10]),
        status: Status::Fetched,
        at_ms: 1,
    };
    tails.stage(Effect::Push(
        peer.clone(),
        Queued {
            seq: 10 + n as i64,
            item,
        },
    ));
    Ok(())
}

/// Queues `jobs` while the writer is held in a job of its own, so that
/// they share its next group; returns their outcomes.
async fn in_one_group<R: Send + 'static>(
    store: &SqliteStore,
    jobs: Vec<impl FnMut(&Connection) -> Result<R, StoreError> + Send + 'static>,
) -> Vec<Result<R, StoreError>> {
    let (open, wait) = std::sync::mpsc::channel::<()>();
    let (running, started) = std::sync::mpsc::channel::<()>();
    let blocker = store
        .queue(move |_: &Connection| {
            let _ = running.send(());
            let _ = wait.recv();
            Ok(())
        })
        .await
        .unwrap();
    // The writer is inside the blocker's group: the next jobs make a new one.
    started.recv().unwrap();
    let mut queued = Vec::new();
    for job in jobs {
        queued.push(store.queue(job).await.unwrap());
    }
    open.send(()).unwrap();
    blocker.await.unwrap();
    let mut outcomes = Vec::new();
    for q in queued {
        outcomes.push(q.await);
    }
    outcomes
}

#[tokio::test]
async fn a_group_whose_transaction_sqlite_ended_fails_whole_and_no_job_commits_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let peer = AreaId::new("southvale").unwrap();
    let epoch = store.tails.collect(&peer);
    store.tails.found_end(&peer, epoch, 0);
    // Job 1 fails the way a full disk can fail a statement while SQLite
    // spills pages: the whole transaction is rolled back under the group.
    let job = |n: usize| {
        let (tails, peer) = (store.tails.clone(), peer.clone());
        move |c: &Connection| {
            if n == 1 {
                c.execute_batch("ROLLBACK")?;
                return Err(StoreError::DiskFull("the disk is full".into()));
            }
            one_row_and_one_queue_effect(c, &tails, &peer, n)?;
            Ok(n)
        }
    };
    let outcomes = in_one_group(&store, (0..3).map(job).collect()).await;
    for (n, o) in outcomes.iter().enumerate() {
        // Told as the full disk it is: "retry later", nothing changed.
        assert!(
            matches!(o, Err(StoreError::DiskFull(_))),
            "job {n} was told {o:?}, but its group was lost to a full disk"
        );
    }
    let db = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let rows: i64 = db
        .query_row(
            "SELECT count(*) FROM peer_sessions WHERE peer = 'job'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 0, "no job committed on its own");
    assert!(
        store.tails.serve(&peer, 0, 10).unwrap().is_empty(),
        "nor queued anything"
    );
    // The store goes on.
    let n = store
        .call(|c: &Connection| {
            exec(
                c,
                "INSERT INTO peer_sessions (peer, session, last_batch) VALUES ('job', 9, 1)",
                [],
            )
        })
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_failing_job_undoes_only_its_own_writes_in_a_shared_group() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let runs: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    // The tail of a peer's queue follows the jobs' effects from here.
    let peer = AreaId::new("southvale").unwrap();
    let epoch = store.tails.collect(&peer);
    store.tails.found_end(&peer, epoch, 0);
    // One row and one queue effect per job, then job 1 fails after both.
    let job = |n: usize| {
        let runs = runs.clone();
        let (tails, peer) = (store.tails.clone(), peer.clone());
        move |c: &Connection| {
            runs[n].fetch_add(1, SeqCst);
            one_row_and_one_queue_effect(c, &tails, &peer, n)?;
            if n == 1 {
                return Err(StoreError::Corrupt("job 1 fails after writing".into()));
            }
            Ok(n)
        }
    };
    let outcomes = in_one_group(&store, (0..3).map(job).collect()).await;
    assert_eq!(outcomes[0].as_ref().unwrap(), &0);
    assert!(
        matches!(outcomes[1], Err(StoreError::Corrupt(_))),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(outcomes[2].as_ref().unwrap(), &2);
    // The group ran once without savepoints, up to the failure, then again
    // with a savepoint per job.
    let runs: Vec<usize> = runs.iter().map(|r| r.load(SeqCst)).collect();
    assert_eq!(runs, vec![2, 2, 1]);

    let db = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let stored: Vec<i64> = db
        .prepare("SELECT session FROM peer_sessions WHERE peer = 'job' ORDER BY session")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(stored, vec![0, 2], "only the failed job's row is undone");
    let queued: Vec<i64> = store
        .tails
        .serve(&peer, 0, 10)
        .unwrap()
        .iter()
        .map(|q| q.seq)
        .collect();
    assert_eq!(queued, vec![10, 12], "and only its queue effect");

    // Without a failure, a job runs once; a job that fails alone is undone.
    let once = Arc::new(AtomicUsize::new(0));
    let n = store
        .call({
            let once = once.clone();
            move |c: &Connection| {
                once.fetch_add(1, SeqCst);
                exec(c, "DELETE FROM peer_sessions WHERE peer = 'job'", [])
            }
        })
        .await
        .unwrap();
    assert_eq!((n, once.load(SeqCst)), (2, 1));
    let again = store.call(job(2)).await;
    assert!(again.is_ok(), "{again:?}");
    let repeat = store.call(job(2)).await;
    assert!(
        matches!(repeat, Err(StoreError::Db(_))),
        "a unique row twice: {repeat:?}"
    );
}

#[tokio::test]
async fn a_damaged_queued_item_goes_back_to_its_sender_and_the_queue_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let peer = AreaId::new("southvale").unwrap();
    let alice = UserId::new("alice").unwrap();
    for n in 1..=3 {
        let m = NewMessage {
            body: Body(vec![n; 8]),
            envelope: envelope(n, &format!("damaged-{n}")),
            route: Route::Peer(peer.clone()),
            commit: None,
            accept_new: true,
        };
        store.submit(m).await.unwrap();
    }
    let side = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let damage = |id: &MessageId, seg: i64, off: i64| {
        let n = side
            .execute(
                "UPDATE outbox SET body = NULL, body_seg = ?2, body_off = ?3, body_len = 8 WHERE message_id = ?1",
                params![id.as_str(), seg, off],
            )
            .unwrap();
        assert_eq!(n, 1);
    };
    // A segment not found may be a body directory briefly missing (a
    // restore, a late mount): the queue waits, and nothing goes back.
    let damaged = envelope(2, "x").message_id;
    damage(&damaged, 999, 0);
    assert!(store.queued(peer.clone(), 1, 10).await.is_err());
    let s = store
        .status(alice.clone(), damaged.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.status, Status::Accepted);
    // The second's body reference points past the end of its segment.
    damage(&damaged, 1, 1 << 40);
    let ids = |q: &[Queued]| -> Vec<MessageId> {
        q.iter()
            .map(|q| match &q.item {
                FederationItem::Deliver { envelope, .. } => envelope.message_id.clone(),
                other => panic!("expected a delivery, got {other:?}"),
            })
            .collect()
    };
    // What comes before it goes first; then it goes back to its sender and
    // what comes after it goes on.
    let first = store.queued(peer.clone(), 0, 10).await.unwrap();
    assert_eq!(ids(&first), vec![envelope(1, "x").message_id]);
    let next = store.queued(peer.clone(), first[0].seq, 10).await.unwrap();
    assert_eq!(ids(&next), vec![envelope(3, "x").message_id]);
    let FederationItem::Deliver { body, .. } = &next[0].item else {
        unreachable!()
    };
    assert_eq!(body.0, vec![3u8; 8]);
    let s = store.status(alice, damaged).await.unwrap().unwrap();
    assert_eq!(s.status, Status::Undeliverable);
    assert_eq!(
        s.history.last().and_then(|e| e.reason.as_deref()),
        Some(DAMAGED_COPY)
    );
}

#[tokio::test]
async fn fresh_queue_items_are_served_from_memory_until_the_queue_changes_under_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let peer = AreaId::new("southvale").unwrap();
    let new = |n: u8| NewMessage {
        body: Body(vec![n; 8]),
        envelope: envelope(n, &format!("tail-{n}")),
        route: Route::Peer(peer.clone()),
        commit: None,
        accept_new: true,
    };
    let side = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    // Deleting a row behind the store's back shows which reads skip the
    // database.
    let delete_row = |n: u8| {
        let id = envelope(n, "x").message_id;
        let gone = side
            .execute("DELETE FROM outbox WHERE message_id = ?1", [id.as_str()])
            .unwrap();
        assert_eq!(gone, 1);
    };
    for n in 1..=3 {
        store.submit(new(n)).await.unwrap();
    }
    let first = store.queued(peer.clone(), 0, 10).await.unwrap();
    assert_eq!(first.len(), 3, "read from the database, to its end");
    let third = first[2].seq;

    for n in 4..=5 {
        store.submit(new(n)).await.unwrap();
        delete_row(n);
    }
    let fresh = store.queued(peer.clone(), third, 10).await.unwrap();
    assert_eq!(fresh.len(), 2, "served from memory");
    for (q, n) in fresh.iter().zip(4u8..) {
        assert!(q.seq > third);
        let FederationItem::Deliver { envelope: e, body } = &q.item else {
            panic!("{q:?}");
        };
        assert_eq!(**e, new(n).envelope);
        assert_eq!(body.0, vec![n; 8]);
    }
    assert_eq!(
        store.queued(peer.clone(), fresh[0].seq, 1).await.unwrap()[0].seq,
        fresh[1].seq
    );

    // Answered items are not served again, even to a read from before them.
    let last = fresh[1].seq;
    let answered = first
        .iter()
        .chain(&fresh)
        .map(|q| (q.seq, Sent::Accepted))
        .collect();
    store.sent(peer.clone(), answered, 2_000).await.unwrap();
    assert!(store
        .queued(peer.clone(), last, 10)
        .await
        .unwrap()
        .is_empty());

    // An expired item leaves a gap the tail does not follow: reads go to
    // the database again, which no longer holds message 7's row.
    let mut stale = new(6);
    stale.envelope.expires_at_ms = 1;
    store.submit(stale).await.unwrap();
    assert_eq!(
        store
            .expire(
                peer.clone(),
                (last, i64::MAX),
                3_000,
                3_000,
                "expired".into()
            )
            .await
            .unwrap(),
        1
    );
    store.submit(new(7)).await.unwrap();
    delete_row(7);
    assert!(store
        .queued(peer.clone(), last, 10)
        .await
        .unwrap()
        .is_empty());
    // Until a read finds the end, and the tail serves again.
    store.submit(new(8)).await.unwrap();
    delete_row(8);
    let again = store.queued(peer.clone(), last, 10).await.unwrap();
    assert_eq!(again.len(), 1);
}

#[tokio::test]
async fn mailboxes_list_indexed_and_newest_messages_alike() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let peer = AreaId::new("southvale").unwrap();
    let recipients = [
        "user:alice@northshire",
        "team:duty@northshire",
        "user:carol@northshire",
    ];
    let batch = |ns: std::ops::Range<u8>| -> Vec<Incoming> {
        ns.map(|n| {
            let mut env = incoming(n, &format!("m-{n}"));
            env.recipient = recipients[usize::from(n) % 3].parse().unwrap();
            Incoming::Deliver(Box::new(env), Body(vec![n; 8]))
        })
        .collect()
    };
    // The first two batches get indexed (as the writer does every
    // INDEX_MAILBOXES_EVERY); the third is left to the scan of the newest
    // rows.
    store.accept_batch(peer.clone(), batch(0..6)).await.unwrap();
    store
        .accept_batch(peer.clone(), batch(6..12))
        .await
        .unwrap();
    let added = store.call(index_mailboxes).await.unwrap();
    assert_eq!(added, 12);
    assert_eq!(store.call(index_mailboxes).await.unwrap(), 0, "once only");
    store
        .accept_batch(peer.clone(), batch(12..18))
        .await
        .unwrap();
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let (indexed, mark): (i64, i64) = c
        .query_row(
            "SELECT (SELECT COUNT(*) FROM mailbox), (SELECT up_to FROM mailbox_mark)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let newest: i64 = c
        .query_row("SELECT MAX(seq) FROM inbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(indexed, 12, "the first two batches are indexed");
    assert!(
        mark < newest,
        "the third is not: mark {mark}, newest {newest}"
    );

    let ids = |ns: &[u8]| -> Vec<MessageId> {
        ns.iter()
            .map(|n| incoming(*n, &format!("m-{n}")).message_id)
            .collect()
    };
    let listed = |mb: Mailbox| {
        let store = store.clone();
        async move {
            store
                .inbox(mb, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|i| i.envelope.message_id)
                .collect::<Vec<_>>()
        }
    };
    let alice = Mailbox {
        user: UserId::new("alice").unwrap(),
        teams: vec![TeamId::new("duty").unwrap()],
    };
    let carol = Mailbox {
        user: UserId::new("carol").unwrap(),
        teams: vec![],
    };
    assert_eq!(
        listed(alice.clone()).await,
        ids(&[0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16]),
        "her own and her team's, indexed or not, in order"
    );
    assert_eq!(listed(carol).await, ids(&[2, 5, 8, 11, 14, 17]));
    // Acknowledged messages leave the listing, indexed or not.
    for n in [3u8, 15] {
        let id = incoming(n, &format!("m-{n}")).message_id;
        let acked = store.ack(alice.clone(), id, 5).await.unwrap();
        assert_eq!(acked, Some(Status::Acknowledged));
    }
    let expected = ids(&[0, 1, 4, 6, 7, 9, 10, 12, 13, 16]);
    assert_eq!(listed(alice.clone()).await, expected);
    // Without its mark (a damaged file), every row is scanned: slower, and
    // still complete.
    c.execute("DELETE FROM mailbox_mark", []).unwrap();
    assert_eq!(listed(alice).await, expected);
}

/// Submits `env` (made by `envelope(n, ..)`, whose body is `n` eight
/// times) for a recipient in the store's own area.
async fn submit_local(store: &SqliteStore, env: &Envelope, n: u8) {
    store
        .submit(NewMessage {
            envelope: env.clone(),
            body: Body(vec![n; 8]),
            route: Route::Local,
            commit: None,
            accept_new: true,
        })
        .await
        .unwrap();
}

/// A sent message's status, as its sender asks for it.
async fn sent_status(store: &SqliteStore, env: &Envelope) -> StatusResponse {
    store
        .status(env.sender.user.clone(), env.message_id.clone())
        .await
        .unwrap()
        .unwrap()
}

/// The ids of what a mailbox lists.
async fn listed_ids(store: &SqliteStore, mb: Mailbox) -> Vec<MessageId> {
    let items = store.inbox(mb, 100).await.unwrap();
    items.into_iter().map(|i| i.envelope.message_id).collect()
}

/// How many `mailbox` index entries each of these messages has.
fn indexed(c: &Connection, ids: &[&MessageId]) -> Vec<i64> {
    ids.iter()
        .map(|id| {
            c.query_row(
                "SELECT COUNT(*) FROM mailbox WHERE seq = (SELECT seq FROM inbox WHERE message_id = ?1)",
                [id.as_str()],
                |r| r.get(0),
            )
            .unwrap()
        })
        .collect()
}

/// An MLS message to a team is for the members the team had when it was
/// stored: one who joins later is not shown it (she could not decrypt it)
/// and is not waited for; one who leaves is waited for during
/// `WAIT_FOR_LEAVERS` (back within it, she sees it again), then no longer.
#[tokio::test]
async fn an_mls_team_message_is_for_the_members_the_team_had_when_it_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let peer = AreaId::new("southvale").unwrap();
    let duty = TeamId::new("duty").unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|u| UserId::new(u).unwrap());
    let member = |u: &UserId| (duty.clone(), u.clone());
    let mb = |u: &UserId| Mailbox {
        user: u.clone(),
        teams: vec![duty.clone()],
    };
    let to_duty = |n: u8, kind: MessageKind| {
        let mut env = incoming(n, &format!("t-{n}"));
        env.recipient = "team:duty@northshire".parse().unwrap();
        env.kind = kind;
        env
    };
    let deliver = |envs: Vec<&Envelope>| {
        let (store, peer) = (store.clone(), peer.clone());
        let items = envs
            .into_iter()
            .map(|e| Incoming::Deliver(Box::new(e.clone()), Body(vec![1; 8])))
            .collect();
        async move { store.accept_batch(peer, items).await.unwrap() }
    };
    let listed = |u: &UserId| listed_ids(&store, mb(u));
    let ack = |u: &UserId, env: &Envelope| {
        let (store, mb, id) = (store.clone(), mb(u), env.message_id.clone());
        async move { store.ack(mb, id, 9).await.unwrap() }
    };
    let settled = || {
        let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
        let mut stmt = c
            .prepare("SELECT message_id FROM settled ORDER BY message_id")
            .unwrap();
        let ids: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        ids
    };
    let ids = |envs: &[&Envelope]| -> Vec<MessageId> {
        envs.iter().map(|e| e.message_id.clone()).collect()
    };
    let sync = |members: Vec<(TeamId, UserId)>, at: u64| {
        let store = store.clone();
        async move { store.sync_teams(members, at).await.unwrap() }
    };
    let change = |joined, returned, left| TeamChanges {
        joined,
        returned,
        left,
        settled: 0,
    };
    let wait_ms = u64::try_from(WAIT_FOR_LEAVERS.as_millis()).unwrap();

    // alice and bob were in the team before the store knew of teams (as
    // after an upgrade): members since ever.
    let (early, shared) = (
        to_duty(1, MessageKind::Mls),
        to_duty(2, MessageKind::Opaque),
    );
    deliver(vec![&early]).await;
    assert_eq!(
        sync(vec![member(&alice), member(&bob)], 1_000).await,
        change(2, 0, 0)
    );
    deliver(vec![&shared]).await;

    // carol joins; the same directory again changes nothing.
    let three = vec![member(&alice), member(&bob), member(&carol)];
    assert_eq!(sync(three.clone(), 2_000).await, change(1, 0, 0));
    assert_eq!(sync(three, 2_500).await, TeamChanges::default());
    let late = to_duty(3, MessageKind::Mls);
    deliver(vec![&late]).await;
    assert_eq!(listed(&alice).await, ids(&[&early, &shared, &late]));
    assert_eq!(listed(&bob).await, ids(&[&early, &shared, &late]));
    // carol sees the team's shared (opaque) messages and the MLS one sent
    // since she joined, not the earlier one, which she cannot fetch or
    // acknowledge either.
    assert_eq!(listed(&carol).await, ids(&[&shared, &late]));
    assert!(store
        .fetch(mb(&carol), early.message_id.clone(), 9)
        .await
        .unwrap()
        .is_none());
    assert_eq!(ack(&carol, &early).await, None);

    // bob is taken out of the team (by mistake) and put back: he sees again
    // what he had not acknowledged.
    assert_eq!(
        sync(vec![member(&alice), member(&carol)], 3_000).await,
        change(0, 0, 1)
    );
    // (The directory no longer gives him the team's mailbox at all; even
    // with it, the MLS messages are not his while he is out.)
    assert_eq!(listed(&bob).await, ids(&[&shared]));
    let three = vec![member(&alice), member(&bob), member(&carol)];
    assert_eq!(sync(three, 3_500).await, change(0, 1, 0));
    assert_eq!(listed(&bob).await, ids(&[&early, &shared, &late]));

    // alice acknowledges the early one; bob leaves without doing so. He is
    // still waited for, and so is nothing stored after he left.
    assert_eq!(ack(&alice, &early).await, Some(Status::Acknowledged));
    assert_eq!(
        sync(vec![member(&alice), member(&carol)], 4_000).await,
        change(0, 0, 1)
    );
    let after = to_duty(4, MessageKind::Mls);
    deliver(vec![&after]).await;
    for m in [&late, &after] {
        assert_eq!(ack(&alice, m).await, Some(Status::Acknowledged));
        assert_eq!(ack(&carol, m).await, Some(Status::Acknowledged));
    }
    assert_eq!(settled(), vec![after.message_id.to_string()]);
    assert_eq!(
        store
            .settle_after_leavers(4_000 + wait_ms - 1)
            .await
            .unwrap(),
        0
    );
    assert_eq!(settled().len(), 1, "bob is still waited for");
    // Once he has been gone long enough, he is not: both are settled, and
    // he is forgotten (back now, he would count from his return).
    assert_eq!(
        store.settle_after_leavers(4_000 + wait_ms).await.unwrap(),
        2
    );
    let mut all = ids(&[&early, &late, &after])
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    all.sort();
    assert_eq!(settled(), all);
    assert_eq!(
        store.settle_after_leavers(4_000 + wait_ms).await.unwrap(),
        0
    );
    assert_eq!(listed(&alice).await, ids(&[&shared]));
}

/// An MLS message to a team that everyone it was for left without
/// acknowledging is given up once they have been gone `WAIT_FOR_LEAVERS`:
/// its sender is told it is undeliverable and why, whether in this area or
/// in another (through the peer queue, to that area's store). One that a
/// member acknowledged was read, and is not.
#[tokio::test]
async fn a_team_message_everyone_left_unread_goes_back_to_its_sender_as_undeliverable() {
    let dir = tempfile::tempdir().unwrap();
    let here = AreaId::new("northshire").unwrap();
    let there = AreaId::new("southvale").unwrap();
    let b = SqliteStore::open(&dir.path().join("b"), here.clone()).unwrap();
    let a = SqliteStore::open(&dir.path().join("a"), there.clone()).unwrap();
    let duty = TeamId::new("duty").unwrap();
    let [alice, carol] = ["alice", "carol"].map(|u| UserId::new(u).unwrap());
    let mb = |u: &UserId| Mailbox {
        user: u.clone(),
        teams: vec![duty.clone()],
    };
    let to_duty = |n: u8, from: &AreaId, user: &str| {
        let mut env = envelope(n, &format!("d-{n}"));
        env.sender = Sender {
            area: from.clone(),
            user: UserId::new(user).unwrap(),
        };
        env.recipient = "team:duty@northshire".parse().unwrap();
        env.kind = MessageKind::Mls;
        env
    };
    // (`envelope(n, ..)`'s body is `n` eight times.)
    let submit = |store: &SqliteStore, n: u8, env: &Envelope, route: Route| {
        let store = store.clone();
        let m = NewMessage {
            envelope: env.clone(),
            body: Body(vec![n; 8]),
            route,
            commit: None,
            accept_new: true,
        };
        async move { store.submit(m).await.unwrap() }
    };
    // Relays what `from` has queued for `to`'s area, as the federation does.
    let relay = |from: &SqliteStore, from_area: &AreaId, to: &SqliteStore, to_area: &AreaId| {
        let (from, to) = (from.clone(), to.clone());
        let (from_area, to_area) = (from_area.clone(), to_area.clone());
        async move {
            let queued = from.queued(to_area.clone(), 0, 100).await.unwrap();
            let items = queued
                .iter()
                .map(|q| match &q.item {
                    FederationItem::Deliver { envelope, body } => {
                        Incoming::Deliver(envelope.clone(), body.clone())
                    }
                    FederationItem::Status {
                        message_id,
                        status,
                        at_ms,
                    } => Incoming::Status(message_id.clone(), *status, *at_ms),
                })
                .collect();
            to.accept_batch(from_area, items).await.unwrap();
            let verdicts = queued.iter().map(|q| (q.seq, Sent::Accepted)).collect();
            from.sent(to_area, verdicts, 5).await.unwrap();
            queued.into_iter().map(|q| q.item).collect::<Vec<_>>()
        }
    };
    let status = sent_status;
    let dave = UserId::new("dave").unwrap();
    b.sync_teams(
        vec![(duty.clone(), alice.clone()), (duty.clone(), dave.clone())],
        1_000,
    )
    .await
    .unwrap();

    // From bob in the other area: fetched by alice, never acknowledged.
    let fetched = to_duty(1, &there, "bob");
    submit(&a, 1, &fetched, Route::Peer(here.clone())).await;
    // From carol here: not even fetched.
    let unread = to_duty(2, &here, "carol");
    submit(&b, 2, &unread, Route::Local).await;
    // From bob: acknowledged by alice (not dave) while she was in the team.
    let read = to_duty(3, &there, "bob");
    submit(&a, 3, &read, Route::Peer(here.clone())).await;
    relay(&a, &there, &b, &here).await;
    assert_eq!(status(&a, &fetched).await.status, Status::Delivered);
    b.fetch(mb(&alice), fetched.message_id.clone(), 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        b.ack(mb(&alice), read.message_id.clone(), 11)
            .await
            .unwrap(),
        Some(Status::Acknowledged)
    );
    relay(&b, &here, &a, &there).await;
    assert_eq!(status(&a, &fetched).await.status, Status::Fetched);

    // alice and dave leave the team; carol, who joins, was never in the case.
    b.sync_teams(vec![(duty.clone(), carol.clone())], 2_000)
        .await
        .unwrap();
    let wait_ms = u64::try_from(WAIT_FOR_LEAVERS.as_millis()).unwrap();
    assert_eq!(
        b.settle_after_leavers(2_000 + wait_ms - 1).await.unwrap(),
        0
    );
    assert_eq!(status(&b, &unread).await.status, Status::Delivered);
    assert_eq!(b.settle_after_leavers(2_000 + wait_ms).await.unwrap(), 3);

    // carol, here, is told at once; bob once the news has crossed.
    let given_up = |s: StatusResponse| {
        assert_eq!(s.status, Status::Undeliverable, "{s:?}");
        let last = s.history.last().unwrap();
        assert_eq!(last.status, Status::Undeliverable);
        assert_eq!(last.reason.as_deref(), Some(GIVEN_UP_UNREAD));
    };
    given_up(status(&b, &unread).await);
    let news = relay(&b, &here, &a, &there).await;
    assert!(
        matches!(&news[..], [FederationItem::Status { message_id, status: Status::Undeliverable, .. }] if *message_id == fetched.message_id),
        "{news:?}"
    );
    given_up(status(&a, &fetched).await);
    // Its history keeps the steps it did reach.
    let steps: Vec<Status> = status(&a, &fetched)
        .await
        .history
        .iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(
        steps,
        [
            Status::Accepted,
            Status::Delivered,
            Status::Fetched,
            Status::Undeliverable
        ]
    );
    assert_eq!(status(&a, &read).await.status, Status::Acknowledged);
    // Decided once: another pass changes nothing and queues nothing.
    assert_eq!(b.settle_after_leavers(3_000 + wait_ms).await.unwrap(), 0);
    assert!(b.queued(there, 0, 100).await.unwrap().is_empty());
}

/// Only a person who can read an MLS message to a team acknowledges it for
/// its sender: a member not in its case sets it aside, and its sender (in
/// the team) acknowledging the echo of their own message only stops it
/// waiting for them. Both count for settling it; one settled so, read by
/// no one, goes back to its sender as undeliverable.
#[tokio::test]
async fn a_team_message_is_acknowledged_only_by_someone_who_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let here = AreaId::new("northshire").unwrap();
    let store = SqliteStore::open(dir.path(), here.clone()).unwrap();
    let duty = TeamId::new("duty").unwrap();
    let [alice, carol, dave] = ["alice", "carol", "dave"].map(|u| UserId::new(u).unwrap());
    let mb = |u: &UserId| Mailbox {
        user: u.clone(),
        teams: vec![duty.clone()],
    };
    store
        .sync_teams(
            [&alice, &carol, &dave]
                .iter()
                .map(|u| (duty.clone(), (*u).clone()))
                .collect(),
            1_000,
        )
        .await
        .unwrap();
    // From alice (in the team) to the team.
    let to_duty = |n: u8| {
        let mut env = envelope(n, &format!("e-{n}"));
        env.recipient = "team:duty@northshire".parse().unwrap();
        env.kind = MessageKind::Mls;
        env
    };
    let submit = |n: u8| {
        let (store, env) = (store.clone(), to_duty(n));
        async move {
            submit_local(&store, &env, n).await;
            env
        }
    };
    let settled = || {
        let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
        c.query_row("SELECT COUNT(*) FROM settled", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };

    let read = submit(1).await;
    let id = || read.message_id.clone();
    // alice's own client fetches her echo as it reads: her message is not
    // `fetched` for that.
    assert!(store.fetch(mb(&alice), id(), 9).await.unwrap().is_some());
    assert_eq!(sent_status(&store, &read).await.status, Status::Delivered);
    // alice's own echo, and carol, not in the case: nothing read yet.
    assert_eq!(
        store.ack(mb(&alice), id(), 10).await.unwrap(),
        Some(Status::Delivered)
    );
    assert_eq!(
        store.not_in_case(mb(&carol), id(), 11).await.unwrap(),
        Some(Status::Delivered)
    );
    assert_eq!(sent_status(&store, &read).await.status, Status::Delivered);
    assert_eq!(settled(), 0, "dave is still to read it");
    // Set aside, it is no longer listed to carol (nor to alice); dave has it.
    assert!(listed_ids(&store, mb(&carol)).await.is_empty());
    assert!(listed_ids(&store, mb(&alice)).await.is_empty());
    assert_eq!(listed_ids(&store, mb(&dave)).await, [id()]);
    assert_eq!(
        store.ack(mb(&dave), id(), 12).await.unwrap(),
        Some(Status::Acknowledged)
    );
    assert_eq!(
        sent_status(&store, &read).await.status,
        Status::Acknowledged
    );
    assert_eq!(settled(), 1);

    // dave leaves before reading the next two; once he is long gone,
    // carol's word settles them, read by no one. bob, in another area, is
    // told his was given up; alice's to her own team is her colleagues'
    // copy, and she is still there: settled without news.
    let mut from_bob = to_duty(2);
    from_bob.sender = Sender {
        area: AreaId::new("southvale").unwrap(),
        user: UserId::new("bob").unwrap(),
    };
    store
        .accept_batch(
            AreaId::new("southvale").unwrap(),
            vec![Incoming::Deliver(
                Box::new(from_bob.clone()),
                Body(vec![2; 8]),
            )],
        )
        .await
        .unwrap();
    let own = submit(4).await;
    store
        .sync_teams(
            vec![(duty.clone(), alice.clone()), (duty.clone(), carol.clone())],
            2_000,
        )
        .await
        .unwrap();
    // Neither is alice's to read: bob's is in a case she is not part of,
    // her own is her echo.
    store
        .not_in_case(mb(&alice), from_bob.message_id.clone(), 13)
        .await
        .unwrap();
    store
        .ack(mb(&alice), own.message_id.clone(), 13)
        .await
        .unwrap();
    assert_eq!(sent_status(&store, &own).await.status, Status::Delivered);
    // dave, gone from the team (still within his grace), writes to it: not
    // his own team's copy any more. Those left set it aside, no one read
    // it, and he is told.
    let mut from_dave = to_duty(5);
    from_dave.sender.user = dave.clone();
    submit_local(&store, &from_dave, 5).await;
    for u in [&alice, &carol] {
        store
            .not_in_case(mb(u), from_dave.message_id.clone(), 13)
            .await
            .unwrap();
    }
    let s = sent_status(&store, &from_dave).await;
    assert_eq!(s.status, Status::Undeliverable, "{s:?}");
    let wait_ms = u64::try_from(WAIT_FOR_LEAVERS.as_millis()).unwrap();
    assert_eq!(
        store.settle_after_leavers(2_000 + wait_ms).await.unwrap(),
        0
    );
    let set_aside = |env: &Envelope| {
        let (store, mb, id) = (store.clone(), mb(&carol), env.message_id.clone());
        async move { store.not_in_case(mb, id, 14).await.unwrap() }
    };
    assert_eq!(set_aside(&from_bob).await, Some(Status::Undeliverable));
    let news = store
        .queued(AreaId::new("southvale").unwrap(), 0, 10)
        .await
        .unwrap();
    assert!(
        matches!(&news[..], [q] if matches!(&q.item, FederationItem::Status { message_id, status: Status::Undeliverable, .. } if *message_id == from_bob.message_id)),
        "{news:?}"
    );
    assert_eq!(set_aside(&own).await, Some(Status::Delivered));
    assert_eq!(sent_status(&store, &own).await.status, Status::Delivered);
    assert_eq!(settled(), 4);
    // A late acknowledgement does not undo the give-up, nor send news.
    assert_eq!(
        store
            .ack(mb(&alice), from_bob.message_id.clone(), 15)
            .await
            .unwrap(),
        Some(Status::Undeliverable)
    );
    assert_eq!(
        store
            .queued(AreaId::new("southvale").unwrap(), 0, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Only an MLS message to a team can be set aside.
    let mut opaque = to_duty(3);
    opaque.kind = MessageKind::Opaque;
    submit_local(&store, &opaque, 3).await;
    assert_eq!(
        store
            .not_in_case(mb(&carol), opaque.message_id.clone(), 15)
            .await
            .unwrap(),
        None
    );
    assert_eq!(sent_status(&store, &opaque).await.status, Status::Delivered);
}

/// Upgraded from schema 5: an MLS message to a team whose last
/// acknowledgement came while someone since gone from the directory had
/// not acknowledged it waited for no one; the first mirror settles it.
#[tokio::test]
async fn the_first_mirror_of_the_teams_settles_what_an_earlier_gateway_left_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let duty = TeamId::new("duty").unwrap();
    let alice = UserId::new("alice").unwrap();
    let mut envs = Vec::new();
    for n in 0..2u8 {
        let mut env = incoming(n, &format!("u-{n}"));
        env.recipient = "team:duty@northshire".parse().unwrap();
        env.kind = MessageKind::Mls;
        envs.push(env);
    }
    let items = envs
        .iter()
        .map(|e| Incoming::Deliver(Box::new(e.clone()), Body(vec![1; 8])))
        .collect();
    store
        .accept_batch(AreaId::new("southvale").unwrap(), items)
        .await
        .unwrap();
    store.call(index_mailboxes).await.unwrap();
    // As an earlier gateway left them: alice acknowledged the first (bob,
    // who has left since, never did); no one acknowledged the second.
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    c.execute(
        "INSERT INTO member_acks (message_id, user_id) VALUES (?1, 'alice')",
        [envs[0].message_id.as_str()],
    )
    .unwrap();
    let first = store
        .sync_teams(vec![(duty.clone(), alice.clone())], 1_000)
        .await
        .unwrap();
    assert_eq!(
        first,
        TeamChanges {
            joined: 1,
            returned: 0,
            left: 0,
            settled: 1
        }
    );
    assert_eq!(
        indexed(&c, &[&envs[0].message_id, &envs[1].message_id]),
        vec![0, 1]
    );
    let listed = store
        .inbox(
            Mailbox {
                user: alice,
                teams: vec![duty],
            },
            100,
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].envelope.message_id, envs[1].message_id);
}

#[tokio::test]
async fn acknowledged_messages_leave_the_mailbox_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let peer = AreaId::new("southvale").unwrap();
    let duty = TeamId::new("duty").unwrap();
    let (alice, bob) = (UserId::new("alice").unwrap(), UserId::new("bob").unwrap());
    let mb = |user: &UserId| Mailbox {
        user: user.clone(),
        teams: vec![duty.clone()],
    };
    let members = vec![(duty.clone(), alice.clone()), (duty.clone(), bob.clone())];
    store.sync_teams(members, 1_000).await.unwrap();
    // 0: opaque to alice, 1: opaque to the team, 2: MLS to alice, 3: MLS to
    // the team; acknowledged before they are indexed: 4: opaque to alice,
    // 5: MLS to the team.
    let kinds = [
        ("user:alice@northshire", MessageKind::Opaque),
        ("team:duty@northshire", MessageKind::Opaque),
        ("user:alice@northshire", MessageKind::Mls),
        ("team:duty@northshire", MessageKind::Mls),
        ("user:alice@northshire", MessageKind::Opaque),
        ("team:duty@northshire", MessageKind::Mls),
    ];
    let envs: Vec<Envelope> = kinds
        .iter()
        .enumerate()
        .map(|(n, (to, kind))| {
            let n = u8::try_from(n).unwrap();
            let mut env = incoming(n, &format!("p-{n}"));
            env.recipient = to.parse().unwrap();
            env.kind = *kind;
            env
        })
        .collect();
    let ids: Vec<&MessageId> = envs.iter().map(|e| &e.message_id).collect();
    let deliver = |envs: &[Envelope]| -> Vec<Incoming> {
        envs.iter()
            .map(|e| Incoming::Deliver(Box::new(e.clone()), Body(vec![7; 8])))
            .collect()
    };
    store
        .accept_batch(peer.clone(), deliver(&envs[..4]))
        .await
        .unwrap();
    assert_eq!(store.call(index_mailboxes).await.unwrap(), 4);
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    assert_eq!(indexed(&c, &ids[..4]), vec![1, 1, 1, 1]);
    let listed = |user: &UserId| listed_ids(&store, mb(user));
    let ack = |user: &UserId, n: usize| {
        let (store, mb, id) = (store.clone(), mb(user), envs[n].message_id.clone());
        async move { store.ack(mb, id, 9).await.unwrap() }
    };

    // Opaque messages, to a user or a team, leave with their acknowledgement;
    // so does an MLS message to a user.
    for n in 0..3 {
        assert_eq!(ack(&alice, n).await, Some(Status::Acknowledged));
    }
    assert_eq!(indexed(&c, &ids[..4]), vec![0, 0, 0, 1]);
    // An MLS message to the team stays until every member has acknowledged it.
    assert_eq!(listed(&alice).await, vec![envs[3].message_id.clone()]);
    assert_eq!(ack(&alice, 3).await, Some(Status::Acknowledged));
    assert_eq!(
        indexed(&c, &ids[3..4]),
        vec![1],
        "bob has not acknowledged it"
    );
    assert_eq!(listed(&alice).await, Vec::<MessageId>::new());
    assert_eq!(listed(&bob).await, vec![envs[3].message_id.clone()]);
    // Acknowledging again changes nothing and is still an answer.
    assert_eq!(ack(&alice, 3).await, Some(Status::Acknowledged));
    assert_eq!(indexed(&c, &ids[3..4]), vec![1]);
    assert_eq!(ack(&bob, 3).await, Some(Status::Acknowledged));
    assert_eq!(indexed(&c, &ids[3..4]), vec![0]);
    assert_eq!(listed(&bob).await, Vec::<MessageId>::new());

    // Acknowledged before the index pass reaches them: never indexed.
    store.accept_batch(peer, deliver(&envs[4..])).await.unwrap();
    let waiting = vec![envs[4].message_id.clone(), envs[5].message_id.clone()];
    assert_eq!(listed(&alice).await, waiting);
    for (user, n) in [(&alice, 4), (&alice, 5), (&bob, 5)] {
        assert_eq!(ack(user, n).await, Some(Status::Acknowledged));
    }
    assert_eq!(store.call(index_mailboxes).await.unwrap(), 0);
    assert_eq!(indexed(&c, &ids[4..]), vec![0, 0]);
    assert_eq!(listed(&alice).await, Vec::<MessageId>::new());
    assert_eq!(listed(&bob).await, Vec::<MessageId>::new());
    // The index covers it all the same: the listing no longer scans for it.
    let (mark, newest): (i64, i64) = c
        .query_row(
            "SELECT (SELECT up_to FROM mailbox_mark), (SELECT MAX(seq) FROM inbox)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(mark, newest);
}

#[tokio::test]
async fn schema_3_drops_acknowledged_messages_from_the_mailbox_index() {
    let dir = tempfile::tempdir().unwrap();
    let peer = AreaId::new("southvale").unwrap();
    let alice = Mailbox {
        user: UserId::new("alice").unwrap(),
        teams: vec![],
    };
    let envs: Vec<Envelope> = (0..4u8).map(|n| incoming(n, &format!("s-{n}"))).collect();
    let ids: Vec<&MessageId> = envs.iter().map(|e| &e.message_id).collect();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let batch = envs
        .iter()
        .map(|e| Incoming::Deliver(Box::new(e.clone()), Body(vec![1; 8])))
        .collect();
    store.accept_batch(peer, batch).await.unwrap();
    store.call(index_mailboxes).await.unwrap();
    for n in [0, 2] {
        let id = envs[n].message_id.clone();
        store.ack(alice.clone(), id, 9).await.unwrap();
    }
    drop(store);
    // As schema 3 left it: every message indexed, acknowledged or not, and
    // nothing settled.
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    c.execute_batch(
        "INSERT OR IGNORE INTO mailbox (target_kind, target_id, seq) \
         SELECT target_kind, target_id, seq FROM inbox; DROP TABLE settled; \
         PRAGMA user_version = 3;",
    )
    .unwrap();
    assert_eq!(indexed(&c, &ids), vec![1, 1, 1, 1]);

    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    assert_eq!(indexed(&c, &ids), vec![0, 1, 0, 1]);
    let v: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 8);
    // Schema 5: the messages acknowledged before it are settled from the
    // upgrade on, and so erased once their retention has run from then.
    let settled: Vec<(String, i64)> = c
        .prepare("SELECT message_id, settled_ms FROM settled ORDER BY message_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let upgraded_ms = i64::try_from(crate::now_ms()).unwrap();
    assert_eq!(
        settled
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        vec![ids[0].as_str(), ids[2].as_str()]
    );
    assert!(settled
        .iter()
        .all(|(_, at)| (upgraded_ms - 60_000..=upgraded_ms).contains(at)));
    let listed: Vec<MessageId> = store
        .inbox(alice, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.envelope.message_id)
        .collect();
    assert_eq!(
        listed,
        vec![envs[1].message_id.clone(), envs[3].message_id.clone()]
    );
}

/// The ids and body bytes found in the inbox body log's segment files.
fn inbox_log(dir: &Path) -> (Vec<String>, Vec<u8>) {
    let mut names = Vec::new();
    let mut bytes = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir.join("bodies").join("inbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        names.push(p.file_name().unwrap().to_string_lossy().into_owned());
        bytes.extend(std::fs::read(&p).unwrap());
    }
    (names, bytes)
}

/// A receiving store (northshire) to which southvale delivered each body
/// in a batch of its own, with alice's mailbox and the envelopes, in order.
async fn delivered_one_by_one(
    dir: &Path,
    bodies: &[Body],
) -> (SqliteStore, Mailbox, Vec<Envelope>) {
    let store = SqliteStore::open(dir, AreaId::new("northshire").unwrap()).unwrap();
    let mut envs = Vec::with_capacity(bodies.len());
    for (n, body) in bodies.iter().enumerate() {
        let mut env = incoming(u8::try_from(n).unwrap(), &format!("r-{n}"));
        env.content_hash = body.hash();
        let out = store
            .accept_batch(
                AreaId::new("southvale").unwrap(),
                vec![Incoming::Deliver(Box::new(env.clone()), body.clone())],
            )
            .await
            .unwrap();
        assert_eq!(out, vec![IncomingOutcome::Stored]);
        envs.push(env);
    }
    let alice = Mailbox {
        user: UserId::new("alice").unwrap(),
        teams: vec![],
    };
    (store, alice, envs)
}

/// The body log segment of each inbox row, in order (`None`: inline).
fn inbox_segments(c: &Connection) -> Vec<Option<i64>> {
    c.prepare("SELECT body_seg FROM inbox ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_messages_lose_their_ciphertext_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    // Five 6 MiB bodies, one batch each: in the body log, over two or more
    // 16 MiB segments. Then one small one, inline in its row.
    let bodies: Vec<Body> = (0..6u8)
        .map(|n| {
            let len = if n < 5 { 6 << 20 } else { 3000 };
            Body((0..len).map(|i| (i % 251) as u8 ^ (n + 1)).collect())
        })
        .collect();
    let (store, alice, envs) = delivered_one_by_one(dir.path(), &bodies).await;
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let segs = inbox_segments(&c);
    assert!(segs[..5].iter().all(Option::is_some), "{segs:?}");
    assert_eq!(segs[5], None, "the small body is inline");
    assert!(segs[4] > segs[0], "{segs:?}");
    let fetch = |n: usize, at: u64| {
        let (store, mb, id) = (store.clone(), alice.clone(), envs[n].message_id.clone());
        async move { store.fetch(mb, id, at).await }
    };
    let ack = |n: usize, at: u64| {
        let (store, mb, id) = (store.clone(), alice.clone(), envs[n].message_id.clone());
        async move { store.ack(mb, id, at).await.unwrap() }
    };

    // Alice acknowledges all but the first at t = 1000; fetching does not
    // settle a message.
    fetch(0, 900).await.unwrap().unwrap();
    for n in 1..6 {
        assert_eq!(ack(n, 1000).await, Some(Status::Acknowledged));
    }
    assert_eq!(store.erase_settled(999, 2000, 100).await.unwrap(), 0);
    assert_eq!(store.erase_settled(1000, 2000, 2).await.unwrap(), 2);
    assert_eq!(store.erase_settled(1000, 2000, 100).await.unwrap(), 3);
    assert_eq!(store.erase_settled(1000, 2000, 100).await.unwrap(), 0);

    // An erased message says so; its row keeps envelope and status.
    for n in 1..6 {
        match fetch(n, 3000).await {
            Err(StoreError::Erased(2000)) => {}
            other => panic!("message {n}: {other:?}"),
        }
    }
    let kept: (i64, i64, i64) = c
        .query_row(
            "SELECT COUNT(*), COUNT(body), COUNT(body_seg) FROM inbox WHERE status = 'acknowledged'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(kept, (5, 0, 0));
    // The small body is gone from the database file too, not just unlinked,
    // and the store truncates the WAL, which held its pages as they were.
    let small = &bodies[5].0[..64];
    let wal = dir.path().join("gateway.sqlite3-wal");
    let mut waited = 0;
    while std::fs::metadata(&wal).map_or(1, |m| m.len()) > 0 {
        assert!(waited < 200, "the WAL was not truncated after the erasure");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    let db = std::fs::read(dir.path().join("gateway.sqlite3")).unwrap();
    assert!(
        !db.windows(small.len()).any(|w| w == small),
        "the inline body's bytes are still in the database file"
    );

    // The log's bytes of erased bodies are zeroed; the first, not
    // acknowledged, is whole and still served.
    assert_eq!(store.zero_erased(2).await.unwrap(), 2);
    assert_eq!(store.zero_erased(100).await.unwrap(), 2);
    assert_eq!(store.zero_erased(100).await.unwrap(), 0);
    let (_, log) = inbox_log(dir.path());
    for (n, b) in bodies.iter().enumerate().take(5) {
        let probe = &b.0[1000..1064];
        let found = log.windows(probe.len()).any(|w| w == probe);
        assert_eq!(found, n == 0, "body {n} in the log");
    }
    assert_eq!(fetch(0, 3000).await.unwrap().unwrap().1, bodies[0]);
    // Its segment is still in use, so no segment goes yet.
    assert_eq!(store.remove_erased_bodies().await.unwrap(), 0);

    // Once it is acknowledged and erased too, every closed segment goes,
    // none kept as a spare; the open one stays.
    assert_eq!(ack(0, 4000).await, Some(Status::Acknowledged));
    assert_eq!(store.erase_settled(4000, 5000, 100).await.unwrap(), 1);
    assert_eq!(store.zero_erased(100).await.unwrap(), 1);
    let closed = usize::try_from(segs[4].unwrap() - segs[0].unwrap()).unwrap();
    assert_eq!(store.remove_erased_bodies().await.unwrap(), closed);
    let (names, log) = inbox_log(dir.path());
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(log.iter().all(|b| *b == 0), "only zeros are left");
    assert_eq!(store.remove_erased_bodies().await.unwrap(), 0);
    // A fetch whose snapshot was taken before an erasure sees the row's
    // old body reference, into a segment removed since: erased (410), not
    // damaged (500).
    c.execute(
        "UPDATE inbox SET body_seg = ?2, body_off = 0, body_len = 64 WHERE message_id = ?1",
        params![envs[1].message_id.as_str(), segs[0]],
    )
    .unwrap();
    match fetch(1, 6000).await {
        Err(StoreError::Erased(2000)) => {}
        other => panic!("{other:?}"),
    }
}

/// The oldest segment in use is found past many rows whose bodies are gone
/// (the scan steps over them a range at a time: two rows in unit tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_in_use_after_many_erased_rows_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    // Eight 6 MiB bodies, one batch each: three segments or more.
    let bodies: Vec<Body> = (1..=8u8).map(|n| Body(vec![n; 6 << 20])).collect();
    let (store, alice, envs) = delivered_one_by_one(dir.path(), &bodies).await;
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let segs: Vec<i64> = inbox_segments(&c).into_iter().flatten().collect();
    assert_eq!(segs.len(), bodies.len(), "every body is in the log");
    // The kept message: the first one in a segment after the first.
    let kept = segs.iter().position(|s| *s > segs[0]).unwrap();
    assert!(kept >= 3, "{segs:?}");
    for (n, env) in envs.iter().enumerate().filter(|(n, _)| *n != kept) {
        let acked = store
            .ack(alice.clone(), env.message_id.clone(), 1000)
            .await
            .unwrap();
        assert_eq!(acked, Some(Status::Acknowledged), "message {n}");
    }
    assert_eq!(store.erase_settled(1000, 2000, 100).await.unwrap(), 7);
    assert_eq!(store.zero_erased(100).await.unwrap(), 7);
    // Only the segments before the kept message's go.
    let before = usize::try_from(segs[kept] - segs[0]).unwrap();
    assert_eq!(store.remove_erased_bodies().await.unwrap(), before);
    assert_eq!(store.remove_erased_bodies().await.unwrap(), 0);
    let fetched = store
        .fetch(alice, envs[kept].message_id.clone(), 3000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fetched.1, bodies[kept]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_damaged_on_disk_is_not_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    // Over the inline budget: in the body log.
    let body = Body(vec![5u8; 40 * 1024]);
    let mut env = incoming(1, "damaged");
    env.content_hash = body.hash();
    store
        .accept_batch(
            AreaId::new("southvale").unwrap(),
            vec![Incoming::Deliver(Box::new(env.clone()), body)],
        )
        .await
        .unwrap();
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let (seg, off): (i64, i64) = c
        .query_row("SELECT body_seg, body_off FROM inbox", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let path = bodies::segment_path(&dir.path().join("bodies").join("inbox"), seg);
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"X", u64::try_from(off).unwrap() + 100)
        .unwrap();
    let alice = Mailbox {
        user: UserId::new("alice").unwrap(),
        teams: vec![],
    };
    match store.fetch(alice, env.message_id.clone(), 5).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("content hash"), "{m}"),
        other => panic!("a damaged body was handed out: {other:?}"),
    }
    // Nothing changed: the message is not `fetched`, no news is queued.
    let (status, queued): (String, i64) = c
        .query_row(
            "SELECT (SELECT status FROM inbox), (SELECT COUNT(*) FROM outbox)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((status.as_str(), queued), ("delivered", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_body_not_yet_zeroed_is_zeroed_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let own = AreaId::new("northshire").unwrap();
    let store = SqliteStore::open(dir.path(), own.clone()).unwrap();
    // Over the inline budget: in the body log.
    let body = Body((0..40 * 1024).map(|i| (i % 199) as u8 + 1).collect());
    let mut env = incoming(1, "restart");
    env.content_hash = body.hash();
    store
        .accept_batch(
            AreaId::new("southvale").unwrap(),
            vec![Incoming::Deliver(Box::new(env.clone()), body.clone())],
        )
        .await
        .unwrap();
    let alice = Mailbox {
        user: UserId::new("alice").unwrap(),
        teams: vec![],
    };
    store.ack(alice, env.message_id.clone(), 10).await.unwrap();
    assert_eq!(store.erase_settled(10, 20, 100).await.unwrap(), 1);
    // Stopped before the bytes were zeroed: where they are is on disk.
    drop(store);
    let probe = &body.0[2000..2064];
    assert!(inbox_log(dir.path())
        .1
        .windows(probe.len())
        .any(|w| w == probe));
    let store = SqliteStore::open(dir.path(), own).unwrap();
    assert_eq!(store.zero_erased(100).await.unwrap(), 1);
    assert!(!inbox_log(dir.path())
        .1
        .windows(probe.len())
        .any(|w| w == probe));
    assert_eq!(store.zero_erased(100).await.unwrap(), 0);
}

#[test]
fn a_full_disk_is_told_apart_from_other_failures() {
    use rusqlite::ffi;
    let sqlite =
        |code| StoreError::from(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None));
    assert!(matches!(sqlite(ffi::SQLITE_FULL), StoreError::DiskFull(_)));
    assert!(matches!(sqlite(ffi::SQLITE_IOERR), StoreError::Db(_)));
    assert!(matches!(sqlite(ffi::SQLITE_BUSY), StoreError::Db(_)));
    // ENOSPC, EDQUOT and EIO as Linux numbers them.
    let os = |errno| StoreError::io("writing bodies", &std::io::Error::from_raw_os_error(errno));
    assert!(matches!(os(28), StoreError::DiskFull(m) if m.starts_with("writing bodies: ")));
    assert!(matches!(os(122), StoreError::DiskFull(_)));
    assert!(matches!(os(5), StoreError::Db(_)));
}

#[tokio::test]
async fn a_submission_that_may_not_be_new_stores_nothing_but_a_repeat_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let new = |n: u8, accept_new: bool| NewMessage {
        body: Body(vec![n; 8]),
        envelope: envelope(n, &format!("short-{n}")),
        route: Route::Peer(AreaId::new("southvale").unwrap()),
        commit: None,
        accept_new,
    };
    let first = store.submit(new(1, true)).await.unwrap();
    let SubmitOutcome::Stored(id, _) = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        store.submit(new(1, false)).await.unwrap(),
        SubmitOutcome::Duplicate(id, Status::Accepted),
        "a retry after a lost answer learns its message was stored"
    );
    assert_eq!(
        store.submit(new(2, false)).await.unwrap(),
        SubmitOutcome::NotStored
    );
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(count("SELECT COUNT(*) FROM sent"), 1);
    assert_eq!(count("SELECT COUNT(*) FROM outbox"), 1);
    assert_eq!(store.queue_depths().await.unwrap()[0].items, 1);
}

#[test]
fn a_damaged_database_file_is_refused_naming_it_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.sqlite3");
    let junk: Vec<u8> = (0..8192u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&db, &junk).unwrap();
    let e = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap_err();
    let text = e.to_string();
    assert!(text.contains(&db.display().to_string()), "{text}");
    assert!(text.contains("not a database"), "{text}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        junk,
        "the file is left for the operator"
    );
}

#[tokio::test]
async fn a_data_directory_is_used_by_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let area = AreaId::new("northshire").unwrap();
    let first = SqliteStore::open(dir.path(), area.clone()).unwrap();
    let e = SqliteStore::open(dir.path(), area.clone()).unwrap_err();
    assert!(e.to_string().contains("in use by another gateway"), "{e}");
    // Nothing of the first was disturbed.
    let new = NewMessage {
        body: Body(vec![1; 8]),
        envelope: envelope(1, "lock-1"),
        route: Route::Peer(AreaId::new("southvale").unwrap()),
        commit: None,
        accept_new: true,
    };
    assert!(matches!(
        first.submit(new).await.unwrap(),
        SubmitOutcome::Stored(..)
    ));
    // Once its threads have finished, the directory is free again.
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        match SqliteStore::open(dir.path(), area.clone()) {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let reopened = reopened.expect("the lock is released when the store ends");
    assert_eq!(reopened.queue_depths().await.unwrap()[0].items, 1);
}

#[tokio::test]
async fn a_peer_queue_shows_when_its_oldest_item_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let (southvale, eastmoor) = (
        AreaId::new("southvale").unwrap(),
        AreaId::new("eastmoor").unwrap(),
    );
    assert!(store.queue_depths().await.unwrap().is_empty());
    // Two messages for southvale, accepted at 5,000 and 7,000 ms.
    for (n, at) in [(1u8, 5_000u64), (2, 7_000)] {
        let mut env = envelope(n, &format!("q-{n}"));
        env.accepted_at_ms = at;
        let new = NewMessage {
            body: Body(vec![n; 8]),
            envelope: env,
            route: Route::Peer(southvale.clone()),
            commit: None,
            accept_new: true,
        };
        store.submit(new).await.unwrap();
    }
    // A message from eastmoor, fetched here at 9,000 ms: its status update
    // is queued for eastmoor then.
    let mut env = incoming(3, "from-east");
    env.sender.area = eastmoor.clone();
    let body = Body(vec![3; 8]);
    env.content_hash = body.hash();
    store
        .accept_batch(
            eastmoor.clone(),
            vec![Incoming::Deliver(Box::new(env.clone()), body)],
        )
        .await
        .unwrap();
    let mb = Mailbox {
        user: UserId::new("alice").unwrap(),
        teams: vec![],
    };
    store.fetch(mb, env.message_id, 9_000).await.unwrap();
    let mut queues = store.queue_depths().await.unwrap();
    queues.sort_by(|a, b| a.peer.as_str().cmp(b.peer.as_str()));
    assert_eq!(
        queues,
        vec![
            PeerQueue {
                peer: eastmoor,
                items: 1,
                oldest_queued_ms: Some(9_000)
            },
            PeerQueue {
                peer: southvale.clone(),
                items: 2,
                oldest_queued_ms: Some(5_000)
            },
        ]
    );
    // Once the head is delivered, the next one is the oldest.
    let head = store.queued(southvale.clone(), 0, 1).await.unwrap();
    store
        .sent(southvale, vec![(head[0].seq, Sent::Accepted)], 10_000)
        .await
        .unwrap();
    let queues = store.queue_depths().await.unwrap();
    let south = queues
        .iter()
        .find(|q| q.peer.as_str() == "southvale")
        .unwrap();
    assert_eq!((south.items, south.oldest_queued_ms), (1, Some(7_000)));
}

/// A peer cannot give up a message it has not confirmed having: the
/// sender's gateway still has it `accepted`, waiting to be sent.
#[tokio::test]
async fn a_peer_cannot_give_up_a_message_it_never_confirmed_having() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let southvale = AreaId::new("southvale").unwrap();
    let env = envelope(1, "waiting");
    store
        .submit(NewMessage {
            envelope: env.clone(),
            body: Body(vec![1; 8]),
            route: Route::Peer(southvale.clone()),
            commit: None,
            accept_new: true,
        })
        .await
        .unwrap();
    let out = store
        .accept_batch(
            southvale,
            vec![Incoming::Status(
                env.message_id.clone(),
                Status::Undeliverable,
                2_000,
            )],
        )
        .await
        .unwrap();
    assert!(matches!(out[..], [IncomingOutcome::Duplicate]), "{out:?}");
    assert_eq!(sent_status(&store, &env).await.status, Status::Accepted);
}

#[tokio::test]
async fn the_areas_with_items_queued_are_listed_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    assert!(store.queued_peers().await.unwrap().is_empty());
    for (n, peer) in [(1u8, "southvale"), (2, "eastmoor"), (3, "southvale")] {
        let mut env = envelope(n, &format!("q-{n}"));
        env.recipient = format!("user:bob@{peer}").parse().unwrap();
        store
            .submit(NewMessage {
                envelope: env,
                body: Body(vec![n; 8]),
                route: Route::Peer(AreaId::new(peer).unwrap()),
                commit: None,
                accept_new: true,
            })
            .await
            .unwrap();
    }
    let area = |a: &str| AreaId::new(a).unwrap();
    assert_eq!(
        store.queued_peers().await.unwrap(),
        [area("eastmoor"), area("southvale")]
    );
    store
        .give_back_queue(area("eastmoor"), 5_000, "gone".into())
        .await
        .unwrap();
    assert_eq!(store.queued_peers().await.unwrap(), [area("southvale")]);
}

#[tokio::test]
async fn a_home_binds_each_epoch_once_and_none_ahead_of_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let order =
        |epoch: u64, hash: &str| store.order_commit("ab".into(), epoch, content(hash), None);
    // No epoch bound: the first a member can make, and no later one.
    assert_eq!(order(u64::MAX, "x").await.unwrap(), Bind::Ahead(0));
    assert_eq!(order(2, "x").await.unwrap(), Bind::Ahead(0));
    assert_eq!(order(1, "a").await.unwrap(), Bind::Bound);
    // The same Commit again (a retry, another address): still its.
    assert_eq!(order(1, "a").await.unwrap(), Bind::Bound);
    // Another for the epoch, or an older one: stale.
    assert_eq!(order(1, "b").await.unwrap(), Bind::Stale(1));
    assert_eq!(order(0, "b").await.unwrap(), Bind::Stale(1));
    // Past the next: refused; the next: bound.
    assert_eq!(order(3, "c").await.unwrap(), Bind::Ahead(1));
    assert_eq!(order(2, "c").await.unwrap(), Bind::Bound);
    assert_eq!(order(3, "d").await.unwrap(), Bind::Bound);
}

/// A content hash named by a letter.
fn content(letter: &str) -> proto::ContentHash {
    proto::ContentHash([letter.as_bytes()[0]; 32])
}

/// Once a bound Commit has named the key of the epoch it starts, the next
/// Commit takes that epoch only with a proof signed by it, for its own
/// content: one made without the epoch's secret (by a member removed
/// before it, say) is refused, and binds nothing. A group whose Commits
/// named no key (clients from before proofs) is ordered as before; a
/// database from before proofs (schema 7) is migrated.
#[tokio::test]
async fn a_commit_without_the_epochs_proof_cannot_take_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let secret = |n: u8| [n; 32];
    let proof = |this: u8, next: u8, epoch: u64, hash: &str| {
        Some(proto::CommitProof::make(
            &secret(this),
            &secret(next),
            "ab",
            epoch,
            &content(hash),
        ))
    };
    let order = |epoch: u64, hash: &str, proof: Option<proto::CommitProof>| {
        store.order_commit("ab".into(), epoch, content(hash), proof)
    };
    // The first Commit seen names the key of epoch 2.
    assert_eq!(
        order(1, "a", proof(1, 2, 1, "a")).await.unwrap(),
        Bind::Bound
    );
    // Epoch 2's Commit: without a proof, with epoch 1's key, or with a
    // proof made for another Commit, refused.
    for p in [
        None,
        proof(1, 3, 2, "b"),
        proof(2, 3, 2, "c"),
        proof(2, 3, 1, "b"),
    ] {
        assert!(
            matches!(order(2, "b", p).await.unwrap(), Bind::Unproven(_)),
            "taken without a valid proof"
        );
    }
    // Nothing was bound: the member's own Commit takes the epoch.
    assert_eq!(
        order(2, "d", proof(2, 3, 2, "d")).await.unwrap(),
        Bind::Bound
    );
    assert_eq!(
        order(2, "d", None).await.unwrap(),
        Bind::Bound,
        "a repeat is the same Commit"
    );
    assert_eq!(
        order(3, "e", proof(2, 4, 3, "e")).await.unwrap(),
        Bind::Unproven("its proof is not signed with the key of the group's current epoch")
    );
    // A malformed next key is refused, not stored.
    let mut bad = proof(3, 4, 3, "e").unwrap();
    bad.next_epoch_key = "00".repeat(31);
    assert!(matches!(
        order(3, "e", Some(bad)).await.unwrap(),
        Bind::Unproven(_)
    ));
    assert_eq!(
        order(3, "e", proof(3, 4, 3, "e")).await.unwrap(),
        Bind::Bound
    );

    // A group whose Commits named no key: ordered as before.
    let plain =
        |epoch: u64, hash: &str| store.order_commit("cd".into(), epoch, content(hash), None);
    assert_eq!(plain(1, "a").await.unwrap(), Bind::Bound);
    assert_eq!(plain(2, "b").await.unwrap(), Bind::Bound);
    drop(store);

    // Schema 7 had no key column: migrated, its bindings are kept (and
    // named no key).
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    c.execute_batch("ALTER TABLE group_commits DROP COLUMN next_key; PRAGMA user_version = 7;")
        .unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let v: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 8);
    let order = |epoch: u64, hash: &str, proof: Option<proto::CommitProof>| {
        store.order_commit("ab".into(), epoch, content(hash), proof)
    };
    assert_eq!(order(3, "f", None).await.unwrap(), Bind::Stale(3));
    assert_eq!(order(4, "f", None).await.unwrap(), Bind::Bound);
    assert_eq!(order(5, "g", None).await.unwrap(), Bind::Bound);
}

/// Where the group's home (another area) has bound the epoch, the record
/// here follows it: no proof is checked and no key kept (one kept here
/// could be a key a removed member named, sending an old Commit again).
/// Where this gateway orders the group alone, it checks proofs as a home
/// does, and takes no key whose maker does not show she holds it.
#[tokio::test]
async fn a_record_that_follows_the_home_keeps_no_key_and_checks_no_proof() {
    let dir = tempfile::tempdir().unwrap();
    let _store = SqliteStore::open(dir.path(), AreaId::new("southvale").unwrap()).unwrap();
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let proof = |group: &str, this: u8, next: u8, epoch: u64, hash: &str| {
        proto::CommitProof::make(&[this; 32], &[next; 32], group, epoch, &content(hash))
    };
    let bind =
        |group: &str, epoch: u64, hash: &str, orderer: Orderer, p: Option<proto::CommitProof>| {
            super::bind_commit(&c, group, epoch, &content(hash), orderer, p.as_ref()).unwrap()
        };
    let keys = |group: &str| -> i64 {
        c.query_row(
            "SELECT COUNT(*) FROM group_commits WHERE group_id = ?1 AND next_key IS NOT NULL",
            [group],
            |r| r.get(0),
        )
        .unwrap()
    };
    use Orderer::{HereAlone, OrderedAtHome};
    assert_eq!(
        bind("ab", 1, "a", OrderedAtHome, Some(proof("ab", 1, 2, 1, "a"))),
        Bind::Bound
    );
    assert_eq!(bind("ab", 2, "b", OrderedAtHome, None), Bind::Bound);
    assert_eq!(keys("ab"), 0);

    assert_eq!(
        bind("ef", 1, "a", HereAlone, Some(proof("ef", 1, 2, 1, "a"))),
        Bind::Bound
    );
    assert_eq!(keys("ef"), 1);
    assert!(matches!(
        bind("ef", 2, "b", HereAlone, None),
        Bind::Unproven(_)
    ));
    // Signed with the epoch's key, but naming a key its maker does not hold.
    let mut swapped = proof("ef", 2, 9, 2, "b");
    swapped.next_epoch_key = proof("ef", 2, 3, 2, "b").next_epoch_key;
    assert!(matches!(
        bind("ef", 2, "b", HereAlone, Some(swapped)),
        Bind::Unproven(_)
    ));
    assert_eq!(
        bind("ef", 2, "b", HereAlone, Some(proof("ef", 2, 3, 2, "b"))),
        Bind::Bound
    );
    // A first Commit seen whose next key did not sign: not taken either.
    let mut unsigned = proof("gh", 1, 2, 1, "a");
    unsigned.next_epoch_signature = proof("gh", 1, 2, 1, "z").next_epoch_signature;
    assert!(matches!(
        bind("gh", 1, "a", HereAlone, Some(unsigned)),
        Bind::Unproven(_)
    ));
    assert_eq!(keys("gh"), 0);
}

/// A message the receiving gateway's checks refuse is looked up in the
/// store's own order: a repeat of one queued just before it, not yet
/// committed (its answer lost with a dropped connection), is a duplicate,
/// not a refusal; one never stored stays refused, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The held guard stops the store's sync thread, not this runtime.
#[allow(clippy::await_holding_lock)]
async fn a_refused_repeat_of_a_message_queued_before_it_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("northshire").unwrap()).unwrap();
    let peer = AreaId::new("southvale").unwrap();
    let body = Body(vec![3; 16]);
    let mut env = incoming(3, "repeat-1");
    env.content_hash = body.hash();
    let id = env.message_id.clone();
    let never = MessageId::time_ordered(31_000, [9; 10]);

    // Nothing of the original is on disk while the repeat is queued.
    let gate = store.durability.gate.lock().unwrap();
    let original = store
        .queue_batch(
            peer.clone(),
            vec![Incoming::Deliver(Box::new(env), body)],
            None,
        )
        .await
        .unwrap();
    let repeat = store
        .queue_batch(
            peer.clone(),
            vec![
                Incoming::Refused(id.clone()),
                Incoming::Refused(never.clone()),
            ],
            None,
        )
        .await
        .unwrap();
    drop(gate);
    assert_eq!(original.await.unwrap(), vec![IncomingOutcome::Stored]);
    assert_eq!(
        repeat.await.unwrap(),
        vec![IncomingOutcome::Duplicate, IncomingOutcome::Refused]
    );

    // Another peer's message under that id is not this peer's duplicate.
    let other = store
        .accept_batch(
            AreaId::new("eastmoor").unwrap(),
            vec![Incoming::Refused(id)],
        )
        .await
        .unwrap();
    assert_eq!(other, vec![IncomingOutcome::Refused]);
    let rows: i64 = Connection::open(dir.path().join("gateway.sqlite3"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM inbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1, "a refused item stores nothing");
}

/// KeyPackages are handed out only while they have
/// `KEY_PACKAGE_CLAIM_MARGIN` of their lifetime left, and counted in the
/// stock only with `KEY_PACKAGE_RENEWAL` left; one too short-lived is not
/// stored, nor does it replace the last-resort one held. Those stored before
/// schema 7 get their lifetime at start (one that no longer parses is let go).
#[tokio::test]
async fn only_key_packages_with_lifetime_left_are_handed_out_or_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), AreaId::new("southvale").unwrap()).unwrap();
    let erin = UserId::new("erin").unwrap();
    let now_ms = 1_800_000_000_000;
    let now_s = now_ms / 1000;
    let day = 86_400;
    let kp = |name: &str, last_resort, not_after_s| NewKeyPackage {
        kp_ref: name.to_owned(),
        bytes: name.as_bytes().to_vec(),
        last_resort,
        not_after_s,
    };
    // Oldest first: ten days left (handed out, not counted), then sixty.
    let stock = store
        .put_key_packages(
            erin.clone(),
            vec![kp("ten", false, now_s + 10 * day)],
            now_ms,
        )
        .await
        .unwrap();
    assert_eq!(
        (stock.stored, stock.available, stock.last_resort),
        (1, 0, false)
    );
    let stock = store
        .put_key_packages(
            erin.clone(),
            vec![
                kp("sixty", false, now_s + 60 * day),
                kp("last", true, now_s + 30 * day),
            ],
            now_ms + 1,
        )
        .await
        .unwrap();
    assert_eq!(
        (stock.stored, stock.available, stock.last_resort),
        (2, 1, true)
    );
    // A last-resort one with half an hour left is not stored, and the one
    // held stays.
    let stock = store
        .put_key_packages(
            erin.clone(),
            vec![
                kp("brief", true, now_s + 1800),
                kp("brief2", false, now_s + 1800),
            ],
            now_ms + 2,
        )
        .await
        .unwrap();
    assert_eq!(
        (stock.stored, stock.available, stock.last_resort),
        (0, 1, true)
    );

    let claim = |at_ms: u64| {
        let (store, erin) = (store.clone(), erin.clone());
        async move {
            let got = store.claim_key_packages(vec![erin], at_ms).await.unwrap();
            got[0].1.clone().map(|b| String::from_utf8(b).unwrap())
        }
    };
    assert_eq!(claim(now_ms).await.as_deref(), Some("ten"));
    assert_eq!(claim(now_ms).await.as_deref(), Some("sixty"));
    assert_eq!(claim(now_ms).await.as_deref(), Some("last"));
    assert_eq!(claim(now_ms).await.as_deref(), Some("last"));
    // Within an hour of its end, the last-resort one is no more.
    let late = (now_s + 30 * day - 1800) * 1000;
    assert_eq!(claim(late).await, None);
    drop(store);
    let c = Connection::open(dir.path().join("gateway.sqlite3")).unwrap();
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM key_packages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);

    // Schema 6 had no lifetime column: migrated, a row from then gets its
    // KeyPackage's lifetime, and one that does not parse is let go.
    let mls_dir = tempfile::tempdir().unwrap();
    let real = client::mls::MlsClient::open(mls_dir.path(), "spiffe://southvale/user/erin")
        .unwrap()
        .key_packages(1)
        .unwrap()
        .remove(0);
    c.execute_batch(
        "ALTER TABLE key_packages DROP COLUMN not_after_s; \
         INSERT INTO key_packages (kp_ref, user_id, key_package, last_resort, created_ms) VALUES ('old', 'erin', x'00', 0, 0); \
         PRAGMA user_version = 6;",
    )
    .unwrap();
    c.execute(
        "INSERT INTO key_packages (kp_ref, user_id, key_package, last_resort, created_ms) VALUES ('real', 'erin', ?1, 0, 0)",
        [&real],
    )
    .unwrap();
    let _store = SqliteStore::open(dir.path(), AreaId::new("southvale").unwrap()).unwrap();
    let (n, v): (i64, i64) = c
        .query_row(
            "SELECT (SELECT COUNT(*) FROM key_packages), (SELECT user_version FROM pragma_user_version)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((n, v), (1, 8));
    let not_after: i64 = c
        .query_row(
            "SELECT not_after_s FROM key_packages WHERE kp_ref = 'real'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let wall_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // openmls makes them for 12 weeks.
    assert!(
        (80 * 86_400..90 * 86_400).contains(&(not_after - wall_s)),
        "{not_after}"
    );
    let column: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM pragma_table_info('key_packages') WHERE name = 'not_after_s'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(column, 1);
}
