//! The tail's promise: it serves a read only when it holds every item the
//! database would return for it.

use super::*;
use proto::{Body, MessageId, Status};

fn peer() -> AreaId {
    AreaId::new("southvale").unwrap()
}

fn status(seq: i64) -> Queued {
    Queued {
        seq,
        item: FederationItem::Status {
            message_id: MessageId::time_ordered(1_000, [seq as u8; 10]),
            status: Status::Fetched,
            at_ms: 1,
        },
    }
}

fn seqs(items: Option<Vec<Queued>>) -> Option<Vec<i64>> {
    items.map(|v| v.iter().map(|q| q.seq).collect())
}

fn push(t: &Tails, seq: i64) {
    t.apply(vec![Effect::Push(peer(), status(seq))]);
}

#[test]
fn a_tail_serves_only_after_a_read_found_the_end_while_it_collected() {
    let t = Tails::default();
    push(&t, 1);
    assert_eq!(seqs(t.serve(&peer(), 0, 10)), None, "never read: off");
    let epoch = t.collect(&peer());
    // Committed around the read's snapshot: 4 is in both, 6 and 7 after.
    for seq in [4, 6, 7] {
        push(&t, seq);
    }
    assert_eq!(
        seqs(t.serve(&peer(), 0, 10)),
        None,
        "collecting, not yet complete"
    );
    t.found_end(&peer(), epoch, 4);
    assert_eq!(seqs(t.serve(&peer(), 4, 10)), Some(vec![6, 7]));
    assert_eq!(seqs(t.serve(&peer(), 6, 10)), Some(vec![7]));
    assert_eq!(
        seqs(t.serve(&peer(), 7, 10)),
        Some(vec![]),
        "caught up, no read"
    );
    assert_eq!(seqs(t.serve(&peer(), 4, 1)), Some(vec![6]));
    assert_eq!(seqs(t.serve(&peer(), 3, 10)), None, "before what it holds");
    // Other peers are not served from this one's tail.
    assert!(t.serve(&AreaId::new("eastmoor").unwrap(), 4, 10).is_none());
}

#[test]
fn a_tail_turned_off_meanwhile_is_not_made_valid_by_an_older_read() {
    let t = Tails::default();
    let epoch = t.collect(&peer());
    push(&t, 5);
    t.apply(vec![Effect::Forget(peer())]);
    push(&t, 6);
    t.found_end(&peer(), epoch, 4);
    assert_eq!(seqs(t.serve(&peer(), 4, 10)), None);
    // A new read after the change makes it valid again.
    let epoch = t.collect(&peer());
    push(&t, 7);
    t.found_end(&peer(), epoch, 6);
    assert_eq!(seqs(t.serve(&peer(), 6, 10)), Some(vec![7]));
}

#[test]
fn answered_items_are_dropped_and_never_served_again() {
    let t = Tails::default();
    let epoch = t.collect(&peer());
    t.found_end(&peer(), epoch, 0);
    for seq in 1..=5 {
        push(&t, seq);
    }
    t.answered(&peer(), 3);
    assert_eq!(seqs(t.serve(&peer(), 3, 10)), Some(vec![4, 5]));
    assert_eq!(
        seqs(t.serve(&peer(), 2, 10)),
        None,
        "3 is gone from the tail"
    );
    // A later read cannot claim back what was dropped.
    let epoch = t.collect(&peer());
    t.found_end(&peer(), epoch, 1);
    assert_eq!(seqs(t.serve(&peer(), 1, 10)), None);
    assert_eq!(seqs(t.serve(&peer(), 3, 10)), Some(vec![4, 5]));
}

#[test]
fn an_item_out_of_order_or_too_many_bytes_or_items_turn_the_tail_off() {
    let t = Tails::default();
    let epoch = t.collect(&peer());
    t.found_end(&peer(), epoch, 0);
    push(&t, 2);
    push(&t, 1);
    assert_eq!(seqs(t.serve(&peer(), 0, 10)), None);

    let epoch = t.collect(&peer());
    t.found_end(&peer(), epoch, 2);
    let big = |seq: i64| Queued {
        seq,
        item: FederationItem::Deliver {
            envelope: Box::new(status_envelope()),
            body: Body(vec![0; MAX_BYTES / 2]),
        },
    };
    t.apply(vec![
        Effect::Push(peer(), big(3)),
        Effect::Push(peer(), big(4)),
    ]);
    assert_eq!(seqs(t.serve(&peer(), 2, 10)), Some(vec![3, 4]));
    t.apply(vec![Effect::Push(peer(), big(5))]);
    assert_eq!(seqs(t.serve(&peer(), 2, 10)), None, "over its bytes");

    let epoch = t.collect(&peer());
    t.found_end(&peer(), epoch, 5);
    let many = (6..6 + MAX_ITEMS as i64).map(|seq| Effect::Push(peer(), status(seq)));
    t.apply(many.collect());
    assert_eq!(t.serve(&peer(), 5, 1).map(|v| v.len()), Some(1));
    push(&t, 6 + MAX_ITEMS as i64);
    assert_eq!(seqs(t.serve(&peer(), 5, 1)), None, "over its items");
}

fn status_envelope() -> proto::Envelope {
    let body = Body(vec![]);
    proto::Envelope {
        message_id: MessageId::time_ordered(1_000, [1; 10]),
        idempotency_key: proto::IdempotencyKey::new("k").unwrap(),
        sender: proto::Sender {
            area: AreaId::new("northshire").unwrap(),
            user: proto::UserId::new("u").unwrap(),
        },
        recipient: "user:r@southvale".parse().unwrap(),
        category: proto::Category::new("relocation").unwrap(),
        urgent: false,
        kind: proto::MessageKind::Opaque,
        disclosure: None,
        content_hash: body.hash(),
        accepted_at_ms: 1,
        expires_at_ms: 2,
    }
}

#[test]
fn staged_effects_are_taken_truncated_or_discarded() {
    let t = Tails::default();
    t.stage(Effect::Forget(peer()));
    let mark = t.staged_len();
    t.stage(Effect::Push(peer(), status(1)));
    t.truncate_staged(mark);
    assert_eq!(t.take_staged().len(), 1);
    assert!(t.take_staged().is_empty());
    t.stage(Effect::Forget(peer()));
    t.discard_staged();
    assert!(t.take_staged().is_empty());
}
