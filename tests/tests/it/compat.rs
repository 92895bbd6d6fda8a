//! Mixed versions in one federation: a peer that predates framed batches.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use proto::{FederationBatch, FederationBatchResponse, FederationItem, ItemResult, Status};
use tests::{message, reaches, Federation};

/// Stands in for southvale's gateway as an older version: real mTLS with
/// southvale's certificate and trust, no `/v1/federation/frames` (404), and
/// a JSON `/v1/federation/batch` answered by `answer` (status, body).
async fn json_only_peer(
    fed: &Federation,
    b: usize,
    answer: impl Fn(FederationBatch) -> (u16, Vec<u8>) + Clone + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let listener = fed.listen_as(b).await.unwrap();
    tests::serve_as_gateway(fed, b, listener, move |req| {
        let answer = answer.clone();
        async move {
            let path = req.uri().path().to_owned();
            let body = tests::body_bytes(req).await;
            let (status, body) = if path == "/v1/federation/batch" {
                answer(serde_json::from_slice(&body).unwrap())
            } else {
                (
                    404,
                    br#"{"error":"not_found","message":"no such endpoint"}"#.to_vec(),
                )
            };
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        }
    })
    .unwrap()
}

/// Every item stored, as far as the sender can tell: an answer of `stored`
/// for each, and the items recorded in `seen`.
fn store_all(seen: &Mutex<Vec<FederationItem>>, batch: FederationBatch) -> (u16, Vec<u8>) {
    let results = batch.items.iter().map(|_| ItemResult::Stored).collect();
    seen.lock().unwrap().extend(batch.items);
    (
        200,
        serde_json::to_vec(&FederationBatchResponse { results }).unwrap(),
    )
}

/// An older southvale that stores nothing but records what came.
async fn older_peer(
    fed: &Federation,
    b: usize,
) -> (Arc<Mutex<Vec<FederationItem>>>, tokio::task::JoinHandle<()>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    let handle = json_only_peer(fed, b, move |batch| store_all(&seen, batch)).await;
    (got, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_framed_batches_is_sent_json() {
    let mut fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    fed.stop(b).await;
    let (got, older) = older_peer(&fed, b).await;

    let alice = fed.api(a, "alice").unwrap();
    let sent = alice
        .submit(&message("user:dan@southvale", "compat-1", vec![7u8; 4096]).unwrap())
        .await
        .unwrap();
    assert!(
        reaches(
            &alice,
            &sent.message_id,
            Status::Delivered,
            Duration::from_secs(30)
        )
        .await,
        "the message was not delivered to the older peer"
    );
    let items = got.lock().unwrap().clone();
    assert_eq!(items.len(), 1, "one delivery, sent once, as JSON");
    match &items[0] {
        FederationItem::Deliver { envelope, body } => {
            assert_eq!(envelope.message_id, sent.message_id);
            assert_eq!(body.0, vec![7u8; 4096]);
        }
        other => panic!("expected a delivery, got {other:?}"),
    }
    older.abort();
}

/// Stands in for southvale's gateway as a version that cannot read a
/// message whose body is `unreadable`: a JSON batch holding one is answered
/// `400 malformed_request` whole; others are recorded as stored. Also
/// returns the size of each batch that came.
async fn picky_peer(
    fed: &Federation,
    b: usize,
) -> (
    Arc<Mutex<Vec<FederationItem>>>,
    Arc<Mutex<Vec<usize>>>,
    tokio::task::JoinHandle<()>,
) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let batches = Arc::new(Mutex::new(Vec::new()));
    let (seen, sizes) = (got.clone(), batches.clone());
    let peer = json_only_peer(fed, b, move |batch| {
        sizes.lock().unwrap().push(batch.items.len());
        let unreadable = batch
            .items
            .iter()
            .any(|i| matches!(i, FederationItem::Deliver { body, .. } if body.0 == b"unreadable"));
        if unreadable {
            (
                400,
                br#"{"error":"malformed_request","message":"unknown field"}"#.to_vec(),
            )
        } else {
            store_all(&seen, batch)
        }
    })
    .await;
    (got, batches, peer)
}

/// A peer that cannot read one item of a batch (a gateway of another
/// version, say) answers the whole batch `400 malformed_request`: the
/// batch's items then go one at a time and, once the peer has taken
/// another, the one it cannot read is refused to its sender with the
/// reason, and the others are delivered in order, rather than all waiting
/// behind it until they expire. With no such evidence (the first item
/// after an outage), the fault may be every item's: nothing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_the_peer_cannot_read_is_refused_alone_and_the_rest_go_on() {
    let mut fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    fed.stop(b).await;
    // Four messages wait for southvale, so they go as one batch.
    let alice = fed.api(a, "alice").unwrap();
    let send = |key: &'static str, body: &'static [u8]| {
        let alice = alice.clone();
        async move {
            let m = message("user:dan@southvale", key, body.to_vec()).unwrap();
            alice.submit(&m).await.unwrap().message_id
        }
    };
    // The second and third in a row cannot be read.
    let m1 = send("m1", b"first").await;
    let m2 = send("m2", b"unreadable").await;
    let also = send("m2b", b"unreadable").await;
    let m3 = send("m3", b"third").await;
    let sent = [m1, m2, m3];
    let (got, batches, peer) = picky_peer(&fed, b).await;
    let limit = Duration::from_secs(30);
    for id in [&sent[0], &sent[2]] {
        assert!(reaches(&alice, id, Status::Delivered, limit).await);
    }
    for id in [&sent[1], &also] {
        assert!(reaches(&alice, id, Status::Undeliverable, limit).await);
        let reason = tests::undeliverable_reason(&alice, id)
            .await
            .unwrap_or_default();
        assert!(reason.contains("could not read"), "{reason}");
    }
    let delivered = |got: &Mutex<Vec<FederationItem>>| -> Vec<proto::MessageId> {
        got.lock()
            .unwrap()
            .iter()
            .filter_map(|i| match i {
                FederationItem::Deliver { envelope, .. } => Some(envelope.message_id.clone()),
                FederationItem::Status { .. } => None,
            })
            .collect()
    };
    assert_eq!(delivered(&got), [sent[0].clone(), sent[2].clone()]);
    assert_eq!(batches.lock().unwrap().first(), Some(&4), "one batch first");

    // After a pause (the peer may have been replaced meanwhile), an
    // unreadable message first in the queue is not refused: nothing says
    // the peer still reads the others.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = batches.lock().unwrap().len();
    let first = send("m4", b"unreadable").await;
    let behind = send("m5", b"fifth").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in [&first, &behind] {
        assert_eq!(alice.status(id).await.unwrap().status, Status::Accepted);
    }
    assert_eq!(delivered(&got), [sent[0].clone(), sent[2].clone()]);
    assert!(batches.lock().unwrap().len() > asked, "the peer was asked");
    peer.abort();
}

/// A case's home from before Commit proofs refuses the field it does not
/// know (`400`): the committer's gateway asks it again without the proof,
/// and the home orders the Commit as it did before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_from_before_commit_proofs_is_asked_without_one() {
    let mut fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    fed.stop(a).await;
    // Whether each order came without a proof (and was taken).
    let orders = Arc::new(Mutex::new(Vec::new()));
    let seen = orders.clone();
    let listener = fed.listen_as(a).await.unwrap();
    let home = tests::serve_as_gateway(&fed, a, listener, move |req| {
        let seen = seen.clone();
        async move {
            let path = req.uri().path().to_owned();
            let body: serde_json::Value =
                serde_json::from_slice(&tests::body_bytes(req).await).unwrap();
            let known = ["group_id", "epoch", "content_hash"];
            let (status, answer) = if path != "/v1/federation/commits" {
                (
                    404,
                    serde_json::json!({"error": "not_found", "message": "no such endpoint"}),
                )
            } else if body
                .as_object()
                .unwrap()
                .keys()
                .all(|k| known.contains(&k.as_str()))
            {
                seen.lock().unwrap().push(true);
                (200, serde_json::json!({"epoch": body["epoch"]}))
            } else {
                // Worded as a gateway from before proofs words it.
                seen.lock().unwrap().push(false);
                (
                    400,
                    serde_json::json!({"error": "malformed_request", "message": "malformed JSON: unknown field `proof`, expected one of `group_id`, `epoch`, `content_hash` at line 1 column 200"}),
                )
            };
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(&answer).unwrap())))
                .unwrap()
        }
    })
    .unwrap();

    let area = proto::AreaId::new("northshire").unwrap();
    let group = proto::mls::group_id_with_home(&area, &[5; 16]);
    let commit = tests::made_up_commit(&group, 1);
    let hash = proto::Body(commit.clone()).hash();
    let mut req = message("user:dan@southvale", "proof-compat-1", commit).unwrap();
    req.kind = proto::MessageKind::Mls;
    req.commit_proof = Some(proto::CommitProof::make(
        &[1; 32],
        &[2; 32],
        &hex::encode(&group),
        1,
        &hash,
    ));
    let erin = fed.api(b, "erin").unwrap();
    erin.submit_once(&req).await.unwrap();
    assert_eq!(*orders.lock().unwrap(), [false, true]);
    // Taken here, following the home (which keeps the keys, once upgraded).
    assert_eq!(
        fed.count(
            b,
            "SELECT COUNT(*) FROM group_commits WHERE next_key IS NULL"
        )
        .unwrap(),
        1
    );
    home.abort();
    fed.stop_all().await;
}
