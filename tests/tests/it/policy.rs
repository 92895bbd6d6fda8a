//! Sharing policies at the gateways and the receiving client (issue 5).

use std::time::Duration;

use client::cases::{Caseworker, Event};
use client::{ClientConfig, ClientError};
use proto::{Category, Disclosure, ErrorCode, MessageKind, SubmitRequest};
use tests::{Federation, Settings};

async fn with_policies() -> Federation {
    let settings = Settings {
        policies: true,
        ..Settings::default()
    };
    let mut fed = Federation::create(&tests::standard_areas(), &settings).unwrap();
    fed.start_all().await.unwrap();
    fed
}

fn worker(fed: &Federation, area: usize, user: &str) -> Caseworker {
    let config = ClientConfig::load(&fed.client_config_path(area, user)).unwrap();
    Caseworker::open(&config, client::Api::new(&config).unwrap()).unwrap()
}

/// `user`'s worker in area `area`, with keys published.
async fn keyed(fed: &Federation, area: usize, user: &str) -> Caseworker {
    let mut w = worker(fed, area, user);
    w.publish_keys(3).await.unwrap();
    w
}

/// `w`'s reads (of up to 2 s each, 20 at most) until one gives an event
/// `done` picks: everything read.
async fn read_until(w: &mut Caseworker, done: fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.extend(w.read(Duration::from_secs(2)).await.unwrap());
        if seen.iter().any(done) {
            break;
        }
    }
    seen
}

fn disclosure(version: u32, purpose: &str, fields: &[&str], fled_from: &[&str]) -> Disclosure {
    Disclosure {
        policy_id: "northshire-sharing".into(),
        policy_version: version,
        purpose: purpose.into(),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        fled_from: fled_from.iter().map(|a| a.parse().unwrap()).collect(),
    }
}

fn request(category: &str, d: Option<Disclosure>, key: &str) -> SubmitRequest {
    SubmitRequest {
        idempotency_key: proto::IdempotencyKey::new(key).unwrap(),
        recipient: "team:duty@southvale".parse().unwrap(),
        category: Category::new(category).unwrap(),
        urgent: false,
        kind: MessageKind::Opaque,
        disclosure: d,
        commit_proof: None,
        body: proto::Body(b"ciphertext".to_vec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sending_gateway_enforces_the_signed_policy() {
    let fed = with_policies().await;
    let alice = fed.api(0, "alice").unwrap(); // northshire social worker
    let bob = fed.api(0, "bob").unwrap(); // northshire police officer

    // (what, who sends, category, declared disclosure, expected refusal reason)
    type Case<'a> = (
        &'a str,
        &'a client::Api,
        &'a str,
        Option<Disclosure>,
        Option<&'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "allowed",
            &alice,
            "relocation",
            Some(disclosure(
                1,
                "safeguarding",
                &["child.name", "family", "facts"],
                &[],
            )),
            None,
        ),
        (
            "opaque bytes declaring nothing (they may hold anything)",
            &alice,
            "relocation",
            None,
            Some("must declare its disclosure"),
        ),
        (
            "field no rule allows",
            &alice,
            "relocation",
            Some(disclosure(
                1,
                "safeguarding",
                &["child.name", "case.family_ref"],
                &[],
            )),
            Some("case.family_ref"),
        ),
        (
            "no rule for the category",
            &alice,
            "disruption",
            Some(disclosure(1, "crime-prevention", &["child.name"], &[])),
            Some("no rule"),
        ),
        (
            "a field the rule has the client redact, in bytes sent as they are",
            &bob,
            "disruption",
            Some(disclosure(
                1,
                "crime-prevention",
                &["child.date_of_birth"],
                &[],
            )),
            Some("redacted (age-band)"),
        ),
        (
            "the rule's other fields, in bytes sent as they are",
            &bob,
            "disruption",
            Some(disclosure(1, "crime-prevention", &["risks"], &[])),
            None,
        ),
        (
            "wrong role for the rule",
            &bob,
            "relocation",
            Some(disclosure(1, "safeguarding", &["child.name"], &[])),
            Some("no rule"),
        ),
        (
            "outdated policy version",
            &alice,
            "relocation",
            Some(disclosure(0, "safeguarding", &["child.name"], &[])),
            Some("outdated policy version 0"),
        ),
        (
            "unknown policy",
            &alice,
            "relocation",
            Some(Disclosure {
                policy_id: "other".into(),
                ..disclosure(1, "safeguarding", &["child.name"], &[])
            }),
            Some("other"),
        ),
        (
            "locating field to the area the family fled",
            &alice,
            "relocation",
            Some(disclosure(
                1,
                "safeguarding",
                &["family.new_address"],
                &["southvale"],
            )),
            Some("family.new_address"),
        ),
    ];
    for (i, (what, api, category, d, expected)) in cases.into_iter().enumerate() {
        let r = api
            .submit_once(&request(category, d, &format!("p{i}")))
            .await;
        match (expected, r) {
            (None, Ok(_)) => {}
            (
                Some(needle),
                Err(ClientError::Api {
                    code: ErrorCode::PolicyDenied,
                    message,
                    ..
                }),
            ) => {
                assert!(
                    message.to_lowercase().contains(&needle.to_lowercase()),
                    "{what}: reason {message:?} should mention {needle:?}"
                );
            }
            (expected, r) => panic!("{what}: expected {expected:?}, got {r:?}"),
        }
    }
    assert_eq!(
        fed.count(0, "SELECT COUNT(*) FROM sent").unwrap(),
        2,
        "only the allowed messages were stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_content_must_declare_its_disclosure_and_match_it() {
    let fed = with_policies().await;
    let mut dan = keyed(&fed, 1, "dan").await;
    let mut alice = worker(&fed, 0, "alice");
    let to = "user:dan@southvale".parse().unwrap();
    let relocation = Category::new("relocation").unwrap();

    // Referral content without a declared disclosure is refused by the gateway.
    let e = alice
        .refer(&to, &relocation, false, b"free text", None, None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            client::cases::CaseError::Client(ClientError::Api {
                code: ErrorCode::PolicyDenied,
                ..
            })
        ),
        "{e:?}"
    );

    // Declared as a chronology note: allowed, and dan reads it.
    let d = alice
        .declare("safeguarding", vec!["chronology".into()], vec![])
        .await
        .unwrap();
    let (case, _) = alice
        .refer(&to, &relocation, false, b"a chronology note", None, None, d)
        .await
        .unwrap();
    let mut events = Vec::new();
    for _ in 0..50 {
        events.extend(dan.read(Duration::from_secs(2)).await.unwrap());
        if events.iter().any(|e| matches!(e, Event::Message { .. })) {
            break;
        }
    }
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Message { plaintext, .. } if plaintext == b"a chronology note")
        ),
        "{events:?}"
    );

    // Content holding more than it declares is refused by the receiving client.
    let d = alice
        .declare("safeguarding", vec!["chronology".into()], vec![])
        .await
        .unwrap();
    let mut content = policy::CaseFile::new();
    content.insert(
        policy::FieldPath::new("child.name").unwrap(),
        policy::Value::Text("Amira Example".into()),
    );
    let smuggled = &client::referral::disclosed_bytes(&content);
    alice
        .send(&case, &Category::new("update").unwrap(), smuggled, None, d)
        .await
        .unwrap();
    let mut refused = Vec::new();
    for _ in 0..50 {
        refused.extend(dan.read(Duration::from_secs(2)).await.unwrap());
        if !refused.is_empty() {
            break;
        }
    }
    assert!(
        matches!(refused.as_slice(), [Event::Refused { error, .. }] if error.contains("child.name")),
        "{refused:?}"
    );
    // Refused content is not kept in dan's chronology (nor handed on).
    let history = dan.history(&case).unwrap();
    assert!(
        history
            .iter()
            .all(|e| !e.plaintext.windows(6).any(|w| w == b"Amira ")),
        "{history:?}"
    );
    assert_eq!(history.len(), 1, "only the chronology note");
}

/// The receiving gateway fetches the sender's policy when a message cites
/// a version it has not verified: a sender that answers it publishes none
/// has its message refused (for good: that is its word), while one it
/// cannot reach has the batch refused for now, and sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_serves_no_policy_has_its_message_refused_and_one_unreachable_is_sent_again() {
    let mut fed = with_policies().await;
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let alice = fed.api(a, "alice").unwrap();
    fed.stop(b).await;
    let allowed = || {
        Some(disclosure(
            1,
            "safeguarding",
            &["child.name", "family", "facts"],
            &[],
        ))
    };
    let sent = alice
        .submit(&request("relocation", allowed(), "no-policy"))
        .await
        .unwrap();
    // northshire stops publishing its policy; southvale starts afresh
    // (nothing cached) and asks for it.
    let path = fed.areas[a].config_path.clone();
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find("[policy]").unwrap();
    let end = start + text[start..].find("\n\n").unwrap();
    std::fs::write(&path, format!("{}{}", &text[..start], &text[end..])).unwrap();
    fed.gateway(a).unwrap().reload_file(&path).await.unwrap();
    fed.start(b).await.unwrap();
    let reason = tests::eventually(Duration::from_secs(30), || async {
        tests::undeliverable_reason(&alice, &sent.message_id)
            .await
            .is_some()
    })
    .await;
    assert!(reason);
    let reason = tests::undeliverable_reason(&alice, &sent.message_id)
        .await
        .unwrap_or_default();
    assert!(
        reason.contains("northshire serves no sharing policy (HTTP 404)"),
        "{reason}"
    );
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 0);

    // northshire publishes it again, but southvale has its address wrong:
    // the policy cannot be fetched, so the batch waits and is sent again.
    std::fs::write(&path, &text).unwrap();
    fed.gateway(a).unwrap().reload_file(&path).await.unwrap();
    let port = fed.port(a).unwrap();
    let right = format!("url = \"https://127.0.0.1:{port}\"");
    let dead = format!("url = \"https://127.0.0.1:{}\"", tests::free_port());
    fed.edit_config(b, &right, &dead).unwrap();
    let b_path = fed.areas[b].config_path.clone();
    fed.gateway(b).unwrap().reload_file(&b_path).await.unwrap();
    let later = alice
        .submit(&request("relocation", allowed(), "unreachable"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        alice.status(&later.message_id).await.unwrap().status,
        proto::Status::Accepted,
        "waiting, not refused"
    );
    fed.edit_config(b, &dead, &right).unwrap();
    fed.gateway(b).unwrap().reload_file(&b_path).await.unwrap();
    assert!(
        tests::reaches(
            &alice,
            &later.message_id,
            proto::Status::Delivered,
            Duration::from_secs(30)
        )
        .await
    );
}

/// A handover is referral content too: where the area has a sharing
/// policy, its chronology transfer and its request declare what they
/// disclose, and the case reaches the new lead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_is_handed_over_where_a_sharing_policy_is_enforced() {
    let fed = with_policies().await;
    let mut dan = keyed(&fed, 1, "dan").await;
    let mut bob = keyed(&fed, 0, "bob").await;
    let mut alice = worker(&fed, 0, "alice");
    let d = alice
        .declare("safeguarding", vec!["chronology".into()], vec![])
        .await
        .unwrap();
    let (case, _) = alice
        .refer(
            &"user:dan@southvale".parse().unwrap(),
            &Category::new("relocation").unwrap(),
            false,
            b"a chronology note",
            None,
            None,
            d,
        )
        .await
        .unwrap();
    let seen = read_until(&mut dan, |e| matches!(e, Event::Message { .. })).await;
    assert!(
        seen.iter().any(|e| matches!(e, Event::Message { .. })),
        "{seen:?}"
    );

    alice
        .handover(&case, &"user:bob@northshire".parse().unwrap(), None)
        .await
        .unwrap();
    // dan, the remaining member, commits the handover when he reads.
    let seen = read_until(&mut dan, |e| matches!(e, Event::Membership { .. })).await;
    assert!(
        seen.iter().any(|e| matches!(e, Event::Membership { .. })),
        "{seen:?}"
    );
    let seen = read_until(&mut bob, |e| matches!(e, Event::History { .. })).await;
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Joined { case_id, .. } if *case_id == case)),
        "{seen:?}"
    );
    let history: Vec<Vec<u8>> = bob
        .history(&case)
        .unwrap()
        .into_iter()
        .map(|e| e.plaintext)
        .collect();
    assert!(
        history.contains(&b"a chronology note".to_vec()),
        "{history:?}"
    );
}

/// A handover's chronology transfer declares every field its entries
/// hold: the family's new address, in the case, is not handed to someone
/// in the area they fled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_holding_the_new_address_is_not_handed_over_to_the_area_the_family_fled() {
    let fed = with_policies().await;
    let mut dan = keyed(&fed, 1, "dan").await;
    // bob's keys published, his client closed (he reads later).
    drop(keyed(&fed, 0, "bob").await);
    let mut alice = worker(&fed, 0, "alice");
    let mut content = policy::CaseFile::new();
    content.insert(
        policy::FieldPath::new("child.name").unwrap(),
        policy::Value::Text("Amira Example".into()),
    );
    content.insert(
        policy::FieldPath::new("family.new_address").unwrap(),
        policy::Value::Text("12 Example Street".into()),
    );
    let d = alice
        .declare(
            "safeguarding",
            vec!["child".into(), "family".into()],
            vec!["northshire".parse().unwrap()],
        )
        .await
        .unwrap();
    let (case, _) = alice
        .refer(
            &"user:dan@southvale".parse().unwrap(),
            &Category::new("relocation").unwrap(),
            false,
            &client::referral::disclosed_bytes(&content),
            None,
            None,
            d,
        )
        .await
        .unwrap();
    let seen = read_until(&mut dan, |e| matches!(e, Event::Message { .. })).await;
    assert!(
        seen.iter().any(|e| matches!(e, Event::Message { .. })),
        "{seen:?}"
    );

    // dan would hand the case to bob, in northshire, the area they fled.
    let e = dan
        .handover(&case, &"user:bob@northshire".parse().unwrap(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            client::cases::CaseError::Client(ClientError::Api {
                code: ErrorCode::PolicyDenied,
                ..
            })
        ),
        "{e:?}"
    );
    assert_eq!(
        fed.count(
            0,
            "SELECT COUNT(*) FROM inbox WHERE idem_key LIKE '%:transfer'"
        )
        .unwrap(),
        0,
        "no chronology reached northshire"
    );
}
