//! TOML case files, the policy field map, canonical content and the preview.

use std::collections::BTreeMap;

use policy::{
    Because, Decision, DenyKind, FieldPath, Prepared, Redaction, RedactionRecord, RuleName,
    Verdict, BUILTIN_LOCATING_FIELDS,
};
use proto::case::{CaseError, CaseFile};

use super::*;

fn fp(s: &str) -> FieldPath {
    FieldPath::new(s).unwrap()
}

fn template_case() -> CaseFile {
    parse_case_toml(template()).unwrap()
}

/// The problems of a refused TOML case file, as `(path, line)`.
fn problems(text: &str) -> Vec<(String, Option<usize>, String)> {
    match parse_case_toml(text) {
        Err(ReferralError::Case(CaseError::Invalid(p))) => {
            p.into_iter().map(|p| (p.path, p.line, p.message)).collect()
        }
        other => panic!("{other:?}"),
    }
}

const MINIMAL: &str = r#"
[case]
family_ref = "SV-1"

[child]
name = "Amira Example"
date_of_birth = 2011-09-14

[[family_views]]
by = "mother"
text = "We want to be kept informed."
"#;

#[test]
fn template_parses_and_covers_every_section() {
    let c = template_case();
    assert!(!c.facts.is_empty());
    assert!(c
        .facts
        .iter()
        .any(|f| matches!(f.source, proto::case::Source::Withheld(_))));
    assert!(!c.opinions.is_empty());
    assert!(!c.family_views.is_empty());
    assert!(!c.chronology.is_empty());
    assert!(!c.actions.is_empty());
    assert!(!c.risks.is_empty());
    assert!(c.family.new_address.is_some() && c.family.new_school.is_some());
    assert_eq!(CaseFile::template(), template());
}

#[test]
fn toml_dates_and_string_dates_are_both_accepted() {
    let c = parse_case_toml(MINIMAL).unwrap();
    assert_eq!(c.child.date_of_birth.to_string(), "2011-09-14");
    let quoted = MINIMAL.replace("2011-09-14", "\"2011-09-14\"");
    assert_eq!(parse_case_toml(&quoted).unwrap(), c);
}

#[test]
fn toml_round_trip() {
    let c = template_case();
    let text = toml::to_string(&c).unwrap();
    assert_eq!(parse_case_toml(&text).unwrap(), c);
}

#[test]
fn toml_problems_name_field_and_line() {
    // (case file, path, line (0: none), part of the message)
    let missing_source = format!("{MINIMAL}\n[[facts]]\ntext = \"Missing twice.\"\n");
    let table: Vec<(String, &str, usize, &str)> = vec![
        (missing_source, "facts[0].source", 13, "is required"),
        (
            MINIMAL.replace("text = \"We", "txet = \"We"),
            "family_views[0].txet",
            11,
            "unknown field",
        ),
        (
            MINIMAL.replace("2011-09-14", "2011-09-14T10:00:00"),
            "child.date_of_birth",
            7,
            "calendar date",
        ),
        (
            MINIMAL.replace("2011-09-14", "\"14/09/2011\""),
            "child.date_of_birth",
            7,
            "yyyy-mm-dd",
        ),
        (
            MINIMAL.replace("name = \"Amira Example\"", "name = 42"),
            "child.name",
            6,
            "expected text, found a number",
        ),
        (
            MINIMAL.replace("[[family_views]]\nby = \"mother\"\ntext = \"We want to be kept informed.\"\n", ""),
            "family_views",
            0, // a missing top-level key has no line
            "is required",
        ),
        (
            format!("{MINIMAL}\n[[chronology]]\ndate = 2025-03-02\nkind = \"worry\"\ntext = \"x\"\nsource = \"y\"\n"),
            "chronology[0].kind",
            15,
            "concern, indicator, event",
        ),
    ];
    for (text, path, line, message) in table {
        let got = problems(&text);
        assert!(
            got.iter()
                .any(|(p, l, m)| p == path && l.unwrap_or(0) == line && m.contains(message)),
            "want {path} at line {line}: {message}; got {got:?}"
        );
    }
}

#[test]
fn toml_syntax_errors_give_the_line() {
    let text = MINIMAL.replace("family_ref = \"SV-1\"", "family_ref = ");
    match parse_case_toml(&text) {
        Err(ReferralError::Case(CaseError::Syntax { line, format, .. })) => {
            assert_eq!((format, line), ("TOML", 3));
        }
        other => panic!("{other:?}"),
    }
    let dup = format!("{MINIMAL}\n[child]\nname = \"x\"\n");
    assert!(matches!(
        parse_case_toml(&dup),
        Err(ReferralError::Case(CaseError::Syntax { .. }))
    ));
}

#[test]
fn policy_field_names() {
    let c = template_case();
    let fields = to_policy_fields(&c).unwrap();
    let names: Vec<&str> = fields.keys().map(FieldPath::as_str).collect();
    for want in [
        "case.family_ref",
        "child.name",
        "child.date_of_birth",
        "child.gender",
        "family.carers.0.name",
        "family.carers.0.relationship",
        "family.previous_area",
        "family.new_address",
        "family.new_school",
        "family.gp",
        "family.new_phone",
        "facts.0.text",
        "facts.0.source",
        "facts.1.source_withheld_reason",
        "opinions.0.text",
        "opinions.0.author",
        "family_views.0.by",
        "family_views.0.text",
        "chronology.0.date",
        "chronology.0.kind",
        "chronology.0.text",
        "chronology.0.source",
        "actions.0.owner",
        "actions.0.action",
        "actions.0.due",
        "actions.0.status",
        "risks.0.text",
        "risks.0.mitigation",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // Typed values where redaction needs them.
    assert!(matches!(
        fields[&fp("child.date_of_birth")],
        policy::Value::Date(_)
    ));
    assert!(matches!(
        fields[&fp("family.new_address")],
        policy::Value::Address(_)
    ));
    assert!(matches!(
        fields[&fp("family.new_school")],
        policy::Value::School(_)
    ));
    assert!(matches!(
        fields[&fp("chronology.0.date")],
        policy::Value::Date(_)
    ));

    // Every built-in locating field is a case-file field, and the relocation
    // rule of the example policy names fields the case file produces.
    for f in BUILTIN_LOCATING_FIELDS {
        assert!(names.contains(&f), "{f}");
    }
    let southvale = include_str!("../../../policy/testdata/southvale.toml");
    let policy = policy::Policy::parse(southvale).unwrap();
    for rule in policy.rules() {
        for allowed in &rule.fields {
            assert!(
                fields.keys().any(|k| allowed.covers(k)),
                "rule {} allows {allowed}, which no case-file field matches",
                rule.name
            );
        }
    }
}

#[test]
fn disclosed_content_round_trips_canonically() {
    let fields = to_policy_fields(&template_case()).unwrap();
    let bytes = disclosed_bytes(&fields);
    let d = Disclosed::from_bytes(&bytes).unwrap();
    assert_eq!(d.to_policy_fields(), fields);
    assert_eq!(d.to_bytes(), bytes);
    assert_eq!(
        disclosed_hash(&fields),
        proto::ContentHash(Sha256::digest(&bytes).into())
    );
    let text = String::from_utf8(bytes).unwrap();
    assert!(
        text.starts_with("{\"actions.0.action\":{\"text\":"),
        "{text}"
    );
    assert!(
        text.contains(
            "\"family.new_address\":{\"address\":{\"lines\":[\"12 Example Street\"],\
             \"postcode\":\"NM4 7QT\",\"town\":\"Northmoor\"}}"
        ),
        "{text}"
    );
    assert!(!text.contains(": ") && !text.contains('\n'));
}

#[test]
fn canonical_bytes_table() {
    let mut m = policy::CaseFile::new();
    m.insert(fp("b"), policy::Value::Text("é \"q\"\n".into()));
    m.insert(
        fp("a"),
        policy::Value::List(vec![
            policy::Value::Date(policy::Date::parse("2020-01-02").unwrap()),
            policy::Value::School(policy::School {
                name: "N".into(),
                town: "T".into(),
            }),
        ]),
    );
    assert_eq!(
        String::from_utf8(disclosed_bytes(&m)).unwrap(),
        r#"{"a":{"list":[{"date":"2020-01-02"},{"school":{"name":"N","town":"T"}}]},"b":{"text":"é \"q\"\n"}}"#
    );
}

#[test]
fn received_content_is_checked_against_the_declared_fields() {
    let good = r#"{"child.name":{"text":"A"},"facts.0.text":{"text":"F"}}"#;
    // (content, declared, expected: Ok(number of fields) or Err(kind))
    type Want = Result<usize, &'static str>;
    let table: Vec<(&str, Vec<&str>, Want)> = vec![
        (good, vec!["child.name", "facts.0.text"], Ok(2)),
        (good, vec!["child.name", "facts"], Ok(2)),
        (good, vec!["child", "facts", "risks"], Ok(2)),
        (good, vec!["child.name"], Err("undeclared:facts.0.text")),
        (good, vec!["child.name", "facts.0"], Ok(2)),
        (
            good,
            vec!["child.name", "facts.0.tex"],
            Err("undeclared:facts.0.text"),
        ),
        (good, vec![], Err("undeclared:child.name,facts.0.text")),
        ("{}", vec![], Ok(0)),
        // Not canonical: whitespace, order, duplicate keys.
        (
            r#"{ "child.name":{"text":"A"}}"#,
            vec!["child"],
            Err("canonical"),
        ),
        (
            r#"{"facts.0.text":{"text":"F"},"child.name":{"text":"A"}}"#,
            vec!["child", "facts"],
            Err("canonical"),
        ),
        (
            r#"{"child.name":{"text":"A"},"child.name":{"text":"B"}}"#,
            vec!["child"],
            Err("canonical"),
        ),
        // Malformed.
        ("", vec![], Err("malformed")),
        ("[]", vec![], Err("malformed")),
        (r#"{"Child":{"text":"A"}}"#, vec![], Err("malformed")),
        (
            r#"{"child.name":{"html":"A"}}"#,
            vec!["child"],
            Err("malformed"),
        ),
        (r#"{"child.name":"A"}"#, vec!["child"], Err("malformed")),
        (
            r#"{"child.name":{"date":"2020-02-30"}}"#,
            vec!["child"],
            Err("malformed"),
        ),
        (
            r#"{"a":{"address":{"lines":[],"postcode":"P","town":"T","x":1}}}"#,
            vec!["a"],
            Err("malformed"),
        ),
    ];
    for (content, declared, want) in table {
        let declared: Vec<FieldPath> = declared.into_iter().map(fp).collect();
        let got = check_declared(content.as_bytes(), &declared);
        match (got, want) {
            (Ok(d), Ok(n)) => assert_eq!(d.fields.len(), n, "{content}"),
            (Err(ReferralError::Undeclared(f)), Err(w)) => {
                let names: Vec<&str> = f.iter().map(FieldPath::as_str).collect();
                assert_eq!(format!("undeclared:{}", names.join(",")), w, "{content}");
            }
            (Err(ReferralError::NotCanonical), Err("canonical")) => {}
            (Err(ReferralError::Malformed(_)), Err("malformed")) => {}
            (got, want) => panic!("{content}: got {got:?}, want {want:?}"),
        }
    }
}

/// A `Prepared` as `Policy::prepare` makes it for the relocation rule of the
/// example policy, sending to an area the family fled. (Building one through
/// `prepare` needs a verified peer, which only the certs crate's test
/// utilities can fake.)
fn prepared() -> Prepared {
    let rule = RuleName::new("relocation-to-receiving-social-care").unwrap();
    let mut content: BTreeMap<FieldPath, policy::Value> = BTreeMap::new();
    content.insert(
        fp("child.name"),
        policy::Value::Text("Amira Example".into()),
    );
    content.insert(
        fp("child.date_of_birth"),
        policy::Value::Text("aged 13-15".into()),
    );
    content.insert(
        fp("facts.0.text"),
        policy::Value::Text("Missing three times.\nFound by police.".into()),
    );
    content.insert(
        fp("facts.10.text"),
        policy::Value::Text("Tenth fact.".into()),
    );
    content.insert(
        fp("facts.2.text"),
        policy::Value::Text("Third fact.".into()),
    );
    let record = |f: &str, op, because| RedactionRecord {
        field: fp(f),
        op,
        because,
        note: None,
    };
    Prepared {
        decision: Decision {
            verdict: Verdict::Allow,
            rule: Some(rule.clone()),
            reason: "rule relocation-to-receiving-social-care allows every declared field".into(),
            legal_basis: Some("Children Act 1989 s.47".into()),
            allowed_fields: vec![],
            redactions: vec![],
        },
        declared_fields: content.keys().cloned().collect(),
        content,
        report: vec![
            record(
                "family.new_address",
                Redaction::Drop,
                Because::LocatesFamily {
                    fled_from: proto::AreaId::new("southvale").unwrap(),
                },
            ),
            record(
                "child.date_of_birth",
                Redaction::AgeBand,
                Because::Rule(rule.clone()),
            ),
            record(
                "case.family_ref",
                Redaction::Drop,
                Because::NotAllowed { rule: rule.clone() },
            ),
            RedactionRecord {
                note: Some("could not apply town: the address has no town; dropped instead".into()),
                ..record("child.address", Redaction::Drop, Because::Rule(rule))
            },
        ],
        age_route: None,
    }
}

#[test]
fn preview_shows_what_goes_and_what_is_withheld_and_why() {
    let text = preview(&prepared());
    for want in [
        "Decision: ALLOWED by rule relocation-to-receiving-social-care.",
        "Legal basis: Children Act 1989 s.47",
        "Will be disclosed (5 fields):",
        "  child.name: Amira Example\n",
        "  child.date_of_birth: aged 13-15    [age-band by rule relocation-to-receiving-social-care]",
        "  facts.0.text: Missing three times.\n      Found by police.\n",
        "Redacted or withheld (4 fields):",
        "  family.new_address: not sent: built-in rule: it locates the family and southvale is an area they fled",
        "  case.family_ref: not sent: default deny: rule relocation-to-receiving-social-care does not allow it",
        "  child.date_of_birth: sent as age-band: rule relocation-to-receiving-social-care",
        "(could not apply town: the address has no town; dropped instead)",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Numeric order: facts.2 before facts.10.
    let two = text.find("facts.2.text").unwrap();
    let ten = text.find("facts.10.text").unwrap();
    assert!(two < ten);
    // Nothing that is not in the content appears as disclosed.
    let disclosed = text.split("Redacted or withheld").next().unwrap();
    assert!(!disclosed.contains("family.new_address"));
}

#[test]
fn preview_of_a_refusal() {
    let mut p = prepared();
    p.decision.verdict = Verdict::Deny(DenyKind::LocatesFamily);
    p.decision.reason = "family.new_address locates the family".into();
    p.content.clear();
    let text = preview(&p);
    assert!(text.contains("REFUSED (LocatesFamily)"), "{text}");
    assert!(text.contains("Nothing will be sent."));
    assert!(text.contains("Will be disclosed (0 fields):\n  (nothing)"));
}
