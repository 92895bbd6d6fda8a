//! Deduplication on the idempotency key.

use std::time::Duration;

use proto::ErrorCode;
use tests::{eventually, message, Federation};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_twice_is_one_message() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let alice = fed.api(a, "alice").unwrap();
    let m = message("team:duty@southvale", "same-key", b"body".to_vec()).unwrap();
    let first = alice.submit(&m).await.unwrap();
    let second = alice.submit(&m).await.unwrap();
    assert_eq!(first.message_id, second.message_id);
    assert!(!first.duplicate && second.duplicate);
    assert!(
        eventually(Duration::from_secs(20), || async {
            fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap_or(0) == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 1);
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM sent").unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_sent_concurrently_is_one_message() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let alice = fed.api(a, "alice").unwrap();
    let m = message("team:duty@southvale", "racing-key", b"body".to_vec()).unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let alice = alice.clone();
            let m = m.clone();
            tokio::spawn(async move { alice.submit(&m).await })
        })
        .collect();
    let mut ids = Vec::new();
    let mut fresh = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        fresh += usize::from(!r.duplicate);
        ids.push(r.message_id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every submission names the same message");
    assert_eq!(fresh, 1, "exactly one submission stored a message");
    assert!(
        eventually(Duration::from_secs(20), || async {
            fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap_or(0) == 1
        })
        .await
    );
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM sent").unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_with_a_different_body_is_a_conflict_and_stores_nothing() {
    let fed = Federation::standard().await.unwrap();
    let a = fed.index("northshire");
    let alice = fed.api(a, "alice").unwrap();
    alice
        .submit(&message("team:duty@southvale", "k", b"one".to_vec()).unwrap())
        .await
        .unwrap();
    let e = alice
        .submit(&message("team:duty@southvale", "k", b"two".to_vec()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::IdempotencyConflict));
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM sent").unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_per_sender() {
    let fed = Federation::standard().await.unwrap();
    let a = fed.index("northshire");
    let alice = fed.api(a, "alice").unwrap();
    let bob = fed.api(a, "bob").unwrap();
    let m = message("team:duty@southvale", "shared", b"x".to_vec()).unwrap();
    let r1 = alice.submit(&m).await.unwrap();
    let r2 = bob.submit(&m).await.unwrap();
    assert_ne!(r1.message_id, r2.message_id);
    assert!(!r2.duplicate);
}
