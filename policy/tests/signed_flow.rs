//! The whole flow through the public API only: an area signs its policy, a
//! peer verifies it, the sending client prepares a referral and the sending
//! gateway agrees.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failing test may panic

use certs::danger::assume_verified;
use certs::Identity;
use policy::{
    CaseFile, Date, Facts, FieldPath, Organisation, PolicyRef, PolicySigningKey, Purpose,
    RecipientContext, Role, SenderContext, SignedPolicy, Value, Verdict,
};
use proto::{AreaId, Category, UserId};

const SOUTHVALE: &str = include_str!("../testdata/southvale.toml");

#[test]
fn sign_verify_prepare_decide() {
    let key = PolicySigningKey::from_seed([7; 32]);
    let doc = SignedPolicy::sign(SOUTHVALE, &key).unwrap().to_text();

    // A peer receives the document and verifies it with the key it trusts
    // for southvale.
    let southvale = AreaId::new("southvale").unwrap();
    let policy = SignedPolicy::from_text(&doc)
        .unwrap()
        .verify(&southvale, &key.verifying_key())
        .unwrap();

    let peer = assume_verified(Identity::User(southvale, UserId::new("alice").unwrap()));
    let sender = SenderContext::new(
        &peer,
        Organisation::new("southvale-council").unwrap(),
        Role::new("social-worker").unwrap(),
    )
    .unwrap();
    let recipient = RecipientContext {
        recipient: "team:duty@northmoor".parse().unwrap(),
        organisation: None,
        role: None,
    };
    let facts = Facts {
        category: Category::new("relocation").unwrap(),
        purpose: Purpose::new("safeguarding").unwrap(),
        cited: PolicyRef {
            id: policy.id().clone(),
            version: policy.version(),
        },
        fled_from: vec![AreaId::new("northmoor").unwrap()],
    };
    let mut case = CaseFile::new();
    case.insert(
        FieldPath::new("child.name").unwrap(),
        Value::Text("Sam".into()),
    );
    case.insert(
        FieldPath::new("family.new_phone").unwrap(),
        Value::Text("07700 900123".into()),
    );
    let today = Date::parse("2025-06-15").unwrap();

    let prepared = policy.prepare(&sender, &recipient, &facts, &case, today);
    assert_eq!(prepared.decision.verdict, Verdict::Allow);
    assert_eq!(
        prepared.declared_fields,
        vec![FieldPath::new("child.name").unwrap()]
    );

    // The gateway sees only the envelope facts and the declared fields.
    let decision = policy.decide(&sender, &recipient, &facts, &prepared.declared_fields);
    assert_eq!(decision, prepared.decision);

    // A client that skipped redaction is refused by the gateway.
    let all: Vec<FieldPath> = case.keys().cloned().collect();
    let refused = policy.decide(&sender, &recipient, &facts, &all);
    assert!(!refused.is_allowed());
    assert!(
        refused.reason.contains("family.new_phone"),
        "{}",
        refused.reason
    );
}
