//! Decisions: allow, deny, default deny, wrong area, wrong role, versions,
//! and the built-in locating-field rule.

use super::*;

const RELOC: &str = "relocation-to-receiving-social-care";

struct Case {
    name: &'static str,
    from: (&'static str, &'static str, &'static str),
    to: (&'static str, Option<&'static str>, Option<&'static str>),
    category: &'static str,
    purpose: &'static str,
    version: u32,
    fled: &'static [&'static str],
    fields: &'static [&'static str],
    verdict: Verdict,
    rule: Option<&'static str>,
    reason: &'static str,
}

const SW: (&str, &str, &str) = ("alice@southvale", "southvale-council", "social-worker");
const DUTY_NORTH: (&str, Option<&str>, Option<&str>) = ("team:duty@northmoor", None, None);
const POLICE: (&str, &str, &str) = ("pat@southvale", "southvale-police", "police-intelligence");
const DENY_NO_RULE: Verdict = Verdict::Deny(DenyKind::NoRuleMatched);

fn base() -> Case {
    Case {
        name: "",
        from: SW,
        to: DUTY_NORTH,
        category: "relocation",
        purpose: "safeguarding",
        version: 3,
        fled: &[],
        fields: &["child.name", "family.new_address", "facts"],
        verdict: Verdict::Allow,
        rule: Some(RELOC),
        reason: "",
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "allow: relocation to the new area's duty team",
            reason: "allowed by rule relocation-to-receiving-social-care (legal basis: Children Act 1989 s.47; Working Together to Safeguard Children 2023)",
            ..base()
        },
        Case {
            name: "allow: a field below an allowed field",
            fields: &["facts.0.source", "chronology.3"],
            reason: "allowed by rule relocation-to-receiving-social-care",
            ..base()
        },
        Case {
            name: "allow: police disruption intelligence, police to police",
            from: POLICE,
            to: ("user:dc-jones@northmoor", Some("northmoor-police"), Some("police-intelligence")),
            category: "disruption",
            purpose: "crime-prevention",
            fields: &["child.name", "risks"],
            rule: Some("police-disruption"),
            reason: "allowed by rule police-disruption (legal basis: Crime and Disorder Act 1998 s.115)",
            ..base()
        },
        Case {
            name: "allow: fled area, no locating field",
            fled: &["northmoor"],
            fields: &["child.name", "facts", "risks"],
            reason: "allowed by rule relocation-to-receiving-social-care",
            ..base()
        },
        Case {
            name: "deny: a field the rule does not allow",
            fields: &["child.name", "health.diagnosis"],
            verdict: Verdict::Deny(DenyKind::FieldNotAllowed),
            reason: "rule relocation-to-receiving-social-care does not allow field health.diagnosis",
            ..base()
        },
        Case {
            name: "deny: a parent of an allowed field is not allowed",
            fields: &["child"],
            verdict: Verdict::Deny(DenyKind::FieldNotAllowed),
            reason: "does not allow field child (it allows [child.name,",
            ..base()
        },
        Case {
            name: "deny: no fields declared",
            fields: &[],
            verdict: Verdict::Deny(DenyKind::NoFields),
            reason: "rule relocation-to-receiving-social-care: the message declares no fields",
            ..base()
        },
        Case {
            name: "default deny: a category no rule covers",
            category: "complaint",
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "no rule matched (default deny): relocation-to-receiving-social-care: category complaint is not one of [relocation, handover, urgent-risk]; police-disruption: category complaint is not one of [disruption]; update-to-school: category complaint is not one of [update]",
            ..base()
        },
        Case {
            name: "default deny: a purpose no rule covers",
            purpose: "research",
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "relocation-to-receiving-social-care: purpose research is not one of [safeguarding]",
            ..base()
        },
        Case {
            name: "wrong area: sender from another area",
            from: ("alice@northmoor", "southvale-council", "social-worker"),
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "relocation-to-receiving-social-care: sender area northmoor is not one of [southvale]",
            ..base()
        },
        Case {
            name: "wrong area: recipient outside the rule's areas",
            to: ("user:head@eastdale", None, Some("designated-safeguarding-lead")),
            category: "update",
            fields: &["child.name"],
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "update-to-school: recipient area eastdale is not one of [southvale, northmoor]",
            ..base()
        },
        Case {
            name: "wrong role: sender role",
            from: ("tom@southvale", "southvale-council", "teacher"),
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "relocation-to-receiving-social-care: sender role teacher is not one of [social-worker, key-lead]",
            ..base()
        },
        Case {
            name: "wrong organisation: council worker sending police intelligence",
            from: ("alice@southvale", "southvale-council", "police-intelligence"),
            to: ("user:dc-jones@northmoor", None, Some("police-intelligence")),
            category: "disruption",
            purpose: "crime-prevention",
            fields: &["risks"],
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "police-disruption: sender organisation southvale-council is not one of [southvale-police]",
            ..base()
        },
        Case {
            name: "wrong role: recipient role",
            from: POLICE,
            to: ("team:duty@northmoor", None, Some("duty-social-work")),
            category: "disruption",
            purpose: "crime-prevention",
            fields: &["risks"],
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "police-disruption: recipient role duty-social-work is not one of [police-intelligence]",
            ..base()
        },
        Case {
            name: "wrong role: recipient role unknown",
            from: POLICE,
            to: ("team:duty@northmoor", None, None),
            category: "disruption",
            purpose: "crime-prevention",
            fields: &["risks"],
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "police-disruption: recipient role is unknown; the rule needs one of [police-intelligence]",
            ..base()
        },
        Case {
            name: "wrong recipient: a user where the rule names teams",
            to: ("user:bob@northmoor", None, None),
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "recipient user:bob@northmoor is a user; the rule needs a team",
            ..base()
        },
        Case {
            name: "wrong recipient: a team the rule does not name",
            to: ("team:finance@northmoor", None, None),
            verdict: DENY_NO_RULE,
            rule: None,
            reason: "recipient team finance is not one of [duty, mash]",
            ..base()
        },
        Case {
            name: "outdated version",
            version: 2,
            verdict: Verdict::Deny(DenyKind::OutdatedPolicy),
            rule: None,
            reason: "message cites outdated policy version 2; the current version of southvale-sharing is 3",
            ..base()
        },
        Case {
            name: "unknown (newer) version",
            version: 4,
            verdict: Verdict::Deny(DenyKind::UnknownPolicy),
            rule: None,
            reason: "message cites unknown policy version 4; the current version of southvale-sharing is 3",
            ..base()
        },
        Case {
            name: "outdated version beats everything else",
            version: 1,
            category: "complaint",
            fled: &["northmoor"],
            verdict: Verdict::Deny(DenyKind::OutdatedPolicy),
            rule: None,
            reason: "outdated policy version 1",
            ..base()
        },
        Case {
            name: "locating: new address never to the area fled",
            fled: &["northmoor"],
            verdict: Verdict::Deny(DenyKind::LocatesFamily),
            rule: None,
            reason: "built-in rule: field family.new_address locates the family and never goes to northmoor, an area the family fled",
            ..base()
        },
        Case {
            name: "locating: whatever the category (urgent risk, GP)",
            category: "urgent-risk",
            fled: &["eastdale", "northmoor"],
            fields: &["child.name", "family.gp"],
            verdict: Verdict::Deny(DenyKind::LocatesFamily),
            rule: None,
            reason: "field family.gp locates the family",
            ..base()
        },
        Case {
            name: "locating: a parent path counts",
            fled: &["northmoor"],
            fields: &["family"],
            verdict: Verdict::Deny(DenyKind::LocatesFamily),
            rule: None,
            reason: "field family locates the family",
            ..base()
        },
        Case {
            name: "locating: a policy-added locating field",
            fled: &["northmoor"],
            fields: &["family.new_college"],
            verdict: Verdict::Deny(DenyKind::LocatesFamily),
            rule: None,
            reason: "field family.new_college locates the family",
            ..base()
        },
        Case {
            name: "locating: fine to an area not fled",
            fled: &["eastdale"],
            fields: &["family.new_address", "family.new_school", "family.gp", "family.new_phone"],
            reason: "allowed by rule",
            ..base()
        },
    ]
}

#[test]
fn decisions() {
    let policy = southvale();
    for c in cases() {
        let s = sender(c.from.0, c.from.1, c.from.2);
        let r = recipient(c.to.0, c.to.1, c.to.2);
        let f = facts(c.category, c.purpose, c.version, c.fled);
        let d = policy.decide(&s, &r, &f, &fields(c.fields));
        assert_eq!(d.verdict, c.verdict, "{}: {}", c.name, d.reason);
        assert_eq!(d.rule.as_ref().map(|r| r.as_str()), c.rule, "{}", c.name);
        assert!(
            d.reason.contains(c.reason),
            "{}: reason {:?} does not contain {:?}",
            c.name,
            d.reason,
            c.reason
        );
        assert_eq!(d.is_allowed(), c.verdict == Verdict::Allow, "{}", c.name);
    }
}

#[test]
fn allow_carries_the_rule_obligations() {
    let d = southvale().decide(
        &sender("alice@southvale", "southvale-council", "key-lead"),
        &recipient("team:mash@northmoor", None, None),
        &facts("handover", "safeguarding", 3, &[]),
        &fields(&["family.new_address"]),
    );
    assert!(d.is_allowed(), "{}", d.reason);
    assert_eq!(
        d.legal_basis.as_deref(),
        Some("Children Act 1989 s.47; Working Together to Safeguard Children 2023")
    );
    assert_eq!(
        d.redactions,
        vec![
            FieldRedaction {
                field: field("family.new_address"),
                op: Redaction::PostcodeDistrict
            },
            FieldRedaction {
                field: field("family.new_school"),
                op: Redaction::SchoolTown
            },
        ]
    );
    assert!(d.allowed_fields.contains(&field("risks")));
}

#[test]
fn unknown_policy_id_names_both() {
    let mut f = facts("relocation", "safeguarding", 3, &[]);
    f.cited.id = PolicyId::new("other-policy").unwrap();
    let d = southvale().decide(
        &sender("alice@southvale", "southvale-council", "social-worker"),
        &recipient("team:duty@northmoor", None, None),
        &f,
        &fields(&["child.name"]),
    );
    assert_eq!(d.verdict, Verdict::Deny(DenyKind::UnknownPolicy));
    assert_eq!(
        d.reason,
        "message cites unknown policy other-policy v3; this gateway enforces southvale-sharing v3"
    );
}

#[test]
fn first_matching_rule_governs() {
    // Both rules match; the first one governs even though the second would
    // allow the field.
    let text = r#"
[policy]
id = "p"
area = "southvale"
version = 1
adult_services = "team:adults@southvale"

[[rule]]
name = "narrow"
legal_basis = "x"
categories = ["update"]
purposes = ["safeguarding"]
fields = ["child.name"]
from = { areas = ["*"] }
to = { areas = ["*"] }

[[rule]]
name = "wide"
legal_basis = "y"
categories = ["update"]
purposes = ["safeguarding"]
fields = ["child.name", "risks"]
from = { areas = ["*"] }
to = { areas = ["*"] }
"#;
    let p = Policy::parse(text).unwrap();
    let mut f = facts("update", "safeguarding", 1, &[]);
    f.cited.id = PolicyId::new("p").unwrap();
    let d = p.decide(
        &sender("a@eastdale", "org", "any"),
        &recipient("user:b@westdale", None, None),
        &f,
        &fields(&["risks"]),
    );
    assert_eq!(d.verdict, Verdict::Deny(DenyKind::FieldNotAllowed));
    assert_eq!(d.rule.unwrap().as_str(), "narrow");
}

#[test]
fn a_policy_without_rules_denies_everything() {
    let p = Policy::parse(
        "[policy]\nid = \"southvale-sharing\"\narea = \"southvale\"\nversion = 3\nadult_services = \"team:a@southvale\"\n",
    )
    .unwrap();
    let d = p.decide(
        &sender("alice@southvale", "southvale-council", "social-worker"),
        &recipient("team:duty@northmoor", None, None),
        &facts("relocation", "safeguarding", 3, &[]),
        &fields(&["child.name"]),
    );
    assert_eq!(d.verdict, DENY_NO_RULE);
    assert_eq!(
        d.reason,
        "no rule matched (default deny): the policy has no rules"
    );
}

#[test]
fn sender_context_needs_a_user_matching_the_envelope() {
    use proto::{ContentHash, Envelope, IdempotencyKey, MessageId, Sender};
    let gateway = assume_verified(Identity::Gateway(area("southvale")));
    let org = Organisation::new("southvale-council").unwrap();
    let role = Role::new("social-worker").unwrap();
    assert!(matches!(
        SenderContext::new(&gateway, org.clone(), role.clone()),
        Err(PolicyError::NotAUser(_))
    ));

    let alice = assume_verified(Identity::User(
        area("southvale"),
        UserId::new("alice").unwrap(),
    ));
    let mut env = Envelope {
        message_id: MessageId::from_bytes([0; 16]),
        idempotency_key: IdempotencyKey::new("k1").unwrap(),
        sender: Sender {
            area: area("southvale"),
            user: UserId::new("mallory").unwrap(),
        },
        recipient: "team:duty@northmoor".parse().unwrap(),
        category: Category::new("relocation").unwrap(),
        urgent: false,
        kind: proto::MessageKind::Opaque,
        disclosure: None,
        content_hash: ContentHash([0; 32]),
        accepted_at_ms: 0,
        expires_at_ms: 0,
    };
    let err = SenderContext::for_envelope(&alice, &env, org.clone(), role.clone()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "envelope sender user:mallory@southvale is not the verified peer user:alice@southvale"
    );
    env.sender.user = UserId::new("alice").unwrap();
    let ctx = SenderContext::for_envelope(&alice, &env, org, role).unwrap();
    assert_eq!(ctx.area().as_str(), "southvale");
}
