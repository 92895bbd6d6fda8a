//! Tests of the sequencer: order, broken sessions, time-outs, bounds.

use super::*;
use std::sync::Arc;

fn area(s: &str) -> AreaId {
    s.parse().unwrap()
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn batches_enter_in_their_numbered_order_whatever_order_they_arrive_in() {
    let seq = Arc::new(Sequencer::default());
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    // Arrive 4, 3, 2, 1.
    for batch in (1..=4u64).rev() {
        let (seq, order) = (seq.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let turn = seq.turn(&area("b"), 7, batch, LONG).await.unwrap();
            order.lock().unwrap().push(batch);
            tokio::task::yield_now().await;
            turn.done(true);
        }));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn a_failed_or_dropped_batch_breaks_its_session_only() {
    let seq = Sequencer::default();
    let b = area("b");
    seq.turn(&b, 1, 1, LONG).await.unwrap().done(false);
    assert_eq!(
        seq.turn(&b, 1, 2, LONG).await.unwrap_err(),
        OrderError::Broken
    );
    // A dropped turn (a cancelled request) breaks its session too.
    drop(seq.turn(&b, 2, 1, LONG).await.unwrap());
    assert_eq!(
        seq.turn(&b, 2, 2, LONG).await.unwrap_err(),
        OrderError::Broken
    );
    // A new session starts afresh; another peer's sessions are apart.
    seq.turn(&b, 3, 1, LONG).await.unwrap().done(true);
    seq.turn(&b, 3, 2, LONG).await.unwrap().done(true);
    assert_eq!(
        seq.turn(&b, 3, 2, LONG).await.unwrap_err(),
        OrderError::Repeated(2)
    );
    seq.turn(&area("c"), 1, 1, LONG).await.unwrap().done(true);
}

#[tokio::test]
async fn a_batch_whose_predecessor_never_comes_times_out_and_changes_nothing() {
    let seq = Sequencer::default();
    let b = area("b");
    let e = seq
        .turn(&b, 1, 2, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(e, OrderError::TimedOut(1));
    // The predecessor can still come, and then the batch.
    seq.turn(&b, 1, 1, LONG).await.unwrap().done(true);
    seq.turn(&b, 1, 2, LONG).await.unwrap().done(true);
}

#[tokio::test]
async fn old_sessions_are_forgotten_beyond_a_bound() {
    let seq = Sequencer::default();
    let b = area("b");
    for s in 0..(SESSIONS_PER_PEER as u64 * 3) {
        seq.turn(&b, s, 1, LONG).await.unwrap().done(true);
    }
    let n = seq.sessions.lock().unwrap().get(&b).map(|m| m.len());
    assert_eq!(n, Some(SESSIONS_PER_PEER));
}

#[tokio::test]
async fn a_resumed_session_goes_on_from_its_last_stored_batch() {
    let seq = Sequencer::default();
    let b = area("b");
    seq.resume(&b, 5, 41);
    // Batch 42 need not wait for 1..=41; 41 itself is a repeat.
    seq.turn(&b, 5, 42, Duration::from_millis(1))
        .await
        .unwrap()
        .done(true);
    assert_eq!(
        seq.turn(&b, 5, 41, LONG).await.unwrap_err(),
        OrderError::Repeated(41)
    );
    // Other sessions still start at 1.
    assert_eq!(
        seq.turn(&b, 6, 2, Duration::from_millis(20))
            .await
            .unwrap_err(),
        OrderError::TimedOut(1)
    );
}

#[tokio::test]
async fn a_batch_further_ahead_than_any_sender_pipelines_is_refused_at_once() {
    let seq = Sequencer::default();
    let b = area("b");
    assert_eq!(
        seq.turn(&b, 3, 1 + MAX_AHEAD, LONG).await.unwrap_err(),
        OrderError::TooFarAhead(1 + MAX_AHEAD)
    );
    assert_eq!(
        seq.turn(&b, 4, u64::MAX, LONG).await.unwrap_err(),
        OrderError::TooFarAhead(u64::MAX)
    );
    // Within reach, a batch waits for its turn as before.
    seq.turn(&b, 5, 1, LONG).await.unwrap().done(true);
}
