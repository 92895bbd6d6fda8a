use super::*;
use crate::{
    AreaId, Category, Disclosure, IdempotencyKey, MessageId, MessageKind, Sender, Status, UserId,
};

fn request() -> SubmitRequest {
    SubmitRequest {
        idempotency_key: IdempotencyKey::new("k-1").unwrap(),
        recipient: "team:duty@southvale".parse().unwrap(),
        category: Category::new("referral").unwrap(),
        urgent: true,
        kind: MessageKind::Mls,
        disclosure: Some(Disclosure {
            policy_id: "northshire".into(),
            policy_version: 3,
            purpose: "safeguarding".into(),
            fields: vec!["child.name".into()],
            fled_from: vec![AreaId::new("westmere").unwrap()],
        }),
        commit_proof: None,
        body: Body((0..=255u8).cycle().take(5000).collect()),
    }
}

fn deliver(body: Vec<u8>) -> FederationItem {
    let body = Body(body);
    FederationItem::Deliver {
        envelope: Box::new(Envelope {
            message_id: MessageId::time_ordered(1_700_000_000_000, [7; 10]),
            idempotency_key: IdempotencyKey::new("k-2").unwrap(),
            sender: Sender {
                area: AreaId::new("northshire").unwrap(),
                user: UserId::new("alice").unwrap(),
            },
            recipient: "user:bob@southvale".parse().unwrap(),
            category: Category::new("referral").unwrap(),
            urgent: false,
            kind: MessageKind::Opaque,
            disclosure: None,
            content_hash: body.hash(),
            accepted_at_ms: 1,
            expires_at_ms: 2,
        }),
        body,
    }
}

fn status() -> FederationItem {
    FederationItem::Status {
        message_id: MessageId::time_ordered(1_700_000_000_001, [8; 10]),
        status: Status::Fetched,
        at_ms: 5,
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

#[test]
fn a_submission_round_trips_with_every_field() {
    let req = request();
    let framed = encode_submit(&req);
    // The body travels raw: the frame is barely larger than the body.
    assert!(framed.len() < req.body.len() + 400, "{}", framed.len());
    let back = decode_submit(&framed).unwrap();
    assert_eq!(json(&back), json(&req));
}

#[test]
fn federation_items_round_trip_in_order() {
    let items = vec![deliver(vec![1; 4096]), status(), deliver(Vec::new())];
    let framed = encode_items(&items);
    let back = decode_items(&framed, 10).unwrap();
    assert_eq!(back.len(), 3);
    for (a, b) in items.iter().zip(&back) {
        assert_eq!(json(a), json(b));
    }
}

#[test]
fn every_truncation_is_a_typed_error() {
    let framed = encode_items(&[deliver(vec![9; 100]), status()]);
    for cut in 1..framed.len() {
        let r = decode_items(&framed[..cut], 10);
        // A cut exactly between records leaves one whole record.
        if let Ok(items) = r {
            assert_eq!(items.len(), 1, "cut at {cut}");
        }
    }
    let framed = encode_submit(&request());
    for cut in 0..framed.len() {
        assert!(decode_submit(&framed[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn malformed_frames_are_refused() {
    // A head that claims more than the limit.
    let mut big = Vec::new();
    big.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        records(&big),
        Err(FrameError::HeadTooLarge { record: 0, .. })
    ));
    // A body length past the end.
    let mut short = Vec::new();
    push_record(&mut short, b"{}", b"abc");
    short.truncate(short.len() - 1);
    assert_eq!(records(&short), Err(FrameError::Truncated { record: 0 }));
    // A head that is not JSON.
    let mut bad = Vec::new();
    push_record(&mut bad, b"not json", b"");
    assert!(matches!(
        decode_items(&bad, 10),
        Err(FrameError::Head { record: 0, .. })
    ));
    // Two submissions in one request.
    let mut two = encode_submit(&request());
    two.extend(encode_submit(&request()));
    assert!(matches!(
        decode_submit(&two),
        Err(FrameError::Count { found: 2, .. })
    ));
    // No items, or more than allowed.
    assert!(matches!(
        decode_items(&[], 10),
        Err(FrameError::Count { found: 0, .. })
    ));
    let three = encode_items(&[status(), status(), status()]);
    assert!(matches!(
        decode_items(&three, 2),
        Err(FrameError::Count { found: 3, .. })
    ));
}

#[test]
fn a_body_in_the_wrong_place_is_refused() {
    // A head that carries its own (base64) body.
    let mut req = request();
    req.body = Body(b"hello".to_vec());
    let mut framed = Vec::new();
    push_record(&mut framed, json(&req).as_bytes(), b"other");
    assert!(matches!(
        decode_submit(&framed),
        Err(FrameError::Body { record: 0, .. })
    ));
    // A status item with a body.
    let mut framed = Vec::new();
    push_record(&mut framed, json(&status()).as_bytes(), b"x");
    assert!(matches!(
        decode_items(&framed, 10),
        Err(FrameError::Body { record: 0, .. })
    ));
    // Unknown head fields are refused as in the JSON API.
    let mut framed = Vec::new();
    push_record(
        &mut framed,
        br#"{"kind":"status","message_id":"x","status":"fetched","at_ms":1,"extra":1}"#,
        b"",
    );
    assert!(decode_items(&framed, 10).is_err());
}
