//! Redaction operations, age routing, and `prepare` end to end.

use super::*;

fn addr() -> Value {
    Value::Address(Address {
        lines: vec!["12 Acacia Avenue".into()],
        town: "Leeds".into(),
        postcode: "LS6 2AB".into(),
    })
}

fn school() -> Value {
    Value::School(School {
        name: "Hill Top Primary".into(),
        town: "Otley".into(),
    })
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[test]
fn postcode_districts() {
    // (postcode, district)
    let table = [
        ("LS6 2AB", Some("LS6")),
        ("ls62ab", Some("LS6")),
        ("SW1A 1AA", Some("SW1A")),
        ("M1 1AE", Some("M1")),
        ("B33 8TH", Some("B33")),
        ("  cr2 6xh ", Some("CR2")),
        ("", None),
        ("LS6", None),
        ("123 456", None),
        ("LS6 2A", None),
        ("LS6 22B", None),
        ("LŞ6 2AB", None),
        ("TOOLONG1 2AB", None),
    ];
    for (p, want) in table {
        assert_eq!(
            crate::redact::postcode_district(p).as_deref(),
            want,
            "{p:?}"
        );
    }
}

#[test]
fn operations() {
    let today = date("2025-06-15");
    let bands = [0, 5, 10, 13, 16, 18];
    // (op, value, result: Ok(Some(text)) | Ok(None) dropped | Err(why part))
    type Want = Result<Option<&'static str>, &'static str>;
    let table: Vec<(Redaction, Value, Want)> = vec![
        (Redaction::Drop, addr(), Ok(None)),
        (Redaction::Town, addr(), Ok(Some("Leeds"))),
        (Redaction::PostcodeDistrict, addr(), Ok(Some("LS6"))),
        (
            Redaction::SchoolTown,
            school(),
            Ok(Some("a school in Otley")),
        ),
        (
            Redaction::Age,
            Value::Date(date("2010-06-16")),
            Ok(Some("aged 14")),
        ),
        (
            Redaction::Age,
            Value::Date(date("2010-06-15")),
            Ok(Some("aged 15")),
        ),
        (
            Redaction::AgeBand,
            Value::Date(date("2010-06-15")),
            Ok(Some("aged 13-15")),
        ),
        (
            Redaction::AgeBand,
            Value::Date(date("2023-01-01")),
            Ok(Some("aged 0-4")),
        ),
        (
            Redaction::AgeBand,
            Value::Date(date("2007-06-15")),
            Ok(Some("aged 18+")),
        ),
        (
            Redaction::AgeBand,
            Value::Date(date("2009-01-01")),
            Ok(Some("aged 16-17")),
        ),
        (
            Redaction::Placeholder("risk to family".into()),
            text("07700 900123"),
            Ok(Some("[withheld: risk to family]")),
        ),
        (
            Redaction::Town,
            text("12 Acacia Avenue, Leeds"),
            Err("town needs an address"),
        ),
        (Redaction::Age, text("2010-01-01"), Err("age needs a date")),
        (
            Redaction::SchoolTown,
            text("Hill Top"),
            Err("school-town needs a school"),
        ),
        (
            Redaction::Age,
            Value::Date(date("2030-01-01")),
            Err("the date is after today"),
        ),
        (
            Redaction::PostcodeDistrict,
            Value::Address(Address {
                lines: vec![],
                town: "Leeds".into(),
                postcode: "unknown".into(),
            }),
            Err("no valid UK postcode"),
        ),
        (
            Redaction::Town,
            Value::Address(Address {
                lines: vec![],
                town: " ".into(),
                postcode: "LS6 2AB".into(),
            }),
            Err("no town"),
        ),
    ];
    for (op, value, want) in table {
        let got = op.apply(&value, today, &bands);
        match (got, want) {
            (Ok(Some(Value::Text(t))), Ok(Some(w))) => assert_eq!(t, w, "{op}"),
            (Ok(None), Ok(None)) => {}
            (Err(e), Err(w)) => assert!(e.contains(w), "{op}: {e:?} lacks {w:?}"),
            (got, want) => panic!("{op} on {value:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn age_bands_from_the_policy() {
    // (bands, age, label)
    let table: [(&[u8], u32, &str); 4] = [
        (&[0, 18], 17, "0-17"),
        (&[0, 18], 40, "18+"),
        (&[0, 1, 2], 1, "1"),
        (&[0, 12, 16, 18], 12, "12-15"),
    ];
    for (bands, age, want) in table {
        assert_eq!(crate::redact::age_band(age, bands), want, "{bands:?} {age}");
    }
}

#[test]
fn dates() {
    // (text, valid)
    let table = [
        ("2010-06-15", true),
        ("2024-02-29", true),
        ("2000-02-29", true),
        ("1900-02-29", false),
        ("2023-02-29", false),
        ("2023-04-31", false),
        ("2023-13-01", false),
        ("2023-00-01", false),
        ("0000-01-01", false),
        ("2023-1-01", false),
        ("2023/01/01", false),
        ("+023-01-01", false),
        ("", false),
    ];
    for (s, ok) in table {
        assert_eq!(Date::parse(s).is_ok(), ok, "{s:?}");
    }
    assert_eq!(date("2024-02-29").to_string(), "2024-02-29");
    assert_eq!(date("2024-12-31").days_until(date("2025-01-01")), 1);
    assert_eq!(date("2024-01-01").days_until(date("2025-01-01")), 366);
    // A leapling comes of age on 1 March in a common year.
    // (dob, today, age)
    let ages = [
        ("2008-02-29", "2026-02-28", Some(17)),
        ("2008-02-29", "2026-03-01", Some(18)),
        ("2008-02-29", "2028-02-29", Some(20)),
        ("2010-06-15", "2010-06-15", Some(0)),
        ("2010-06-15", "2010-06-14", None),
    ];
    for (dob, today, want) in ages {
        assert_eq!(date(dob).age_on(date(today)), want, "{dob} on {today}");
    }
}

#[test]
fn age_routes() {
    let p = southvale();
    let today = date("2025-06-15");
    // (dob, expected)
    let child = |age, on: &str, days, soon| AgeRoute::Child {
        age,
        turns_18_on: date(on),
        days_until_18: days,
        turning_18_soon: soon,
    };
    let adult = |age| AgeRoute::Adult {
        age,
        adult_services: "team:adult-safeguarding@southvale".parse().unwrap(),
    };
    let table = [
        ("2010-06-15", child(15, "2028-06-15", 1096, false)),
        ("2007-06-16", child(17, "2025-06-16", 1, true)),
        ("2007-09-13", child(17, "2025-09-13", 90, true)),
        ("2007-09-14", child(17, "2025-09-14", 91, false)),
        ("2007-06-15", adult(18)),
        ("1990-01-01", adult(35)),
    ];
    for (dob, want) in table {
        assert_eq!(p.age_route(date(dob), today).unwrap(), want, "{dob}");
    }
    assert!(matches!(
        p.age_route(date("2025-06-16"), today),
        Err(PolicyError::BirthAfterToday { .. })
    ));
}

fn case() -> CaseFile {
    [
        ("child.name", text("Sam")),
        ("child.date_of_birth", Value::Date(date("2010-06-15"))),
        ("family.new_address", addr()),
        ("family.new_school", school()),
        ("family.gp", text("Dr Patel, Hill Surgery")),
        ("family.new_phone", text("07700 900123")),
        ("health.diagnosis", text("asthma")),
        ("facts.0", text("Sam was seen with an older man")),
        ("family_views", text("We want a fresh start")),
    ]
    .into_iter()
    .map(|(k, v)| (field(k), v))
    .collect()
}

fn summary(report: &[RedactionRecord]) -> Vec<(String, String, String)> {
    report
        .iter()
        .map(|r| (r.field.to_string(), r.op.to_string(), r.because.to_string()))
        .collect()
}

#[test]
fn prepare_to_the_new_area() {
    let p = southvale();
    let s = sender("alice@southvale", "southvale-council", "social-worker");
    let r = recipient("team:duty@northmoor", None, None);
    let out = p.prepare(
        &s,
        &r,
        &facts("relocation", "safeguarding", 3, &[]),
        &case(),
        date("2025-06-15"),
    );
    assert!(out.decision.is_allowed(), "{}", out.decision.reason);
    let rule = "rule relocation-to-receiving-social-care";
    assert_eq!(
        summary(&out.report),
        vec![
            (
                "family.new_address".into(),
                "postcode-district".into(),
                rule.into()
            ),
            (
                "family.new_school".into(),
                "school-town".into(),
                rule.into()
            ),
            (
                "health.diagnosis".into(),
                "drop".into(),
                "default deny: rule relocation-to-receiving-social-care does not allow it".into()
            ),
        ]
    );
    assert_eq!(
        out.content.get(&field("family.new_address")),
        Some(&text("LS6"))
    );
    assert_eq!(
        out.content.get(&field("family.new_school")),
        Some(&text("a school in Otley"))
    );
    assert_eq!(
        out.content.get(&field("family.gp")),
        Some(&text("Dr Patel, Hill Surgery"))
    );
    assert!(!out.content.contains_key(&field("health.diagnosis")));
    assert_eq!(
        out.declared_fields,
        out.content.keys().cloned().collect::<Vec<_>>()
    );
    assert!(matches!(
        out.age_route,
        Some(AgeRoute::Child { age: 15, .. })
    ));
}

#[test]
fn prepare_to_the_area_fled_drops_every_locating_field() {
    // The canonical rule: the rule allows new address, school, GP and phone,
    // but none of them goes to the area the family fled.
    let p = southvale();
    let s = sender("alice@southvale", "southvale-council", "social-worker");
    let r = recipient("team:duty@northmoor", None, None);
    let f = facts("urgent-risk", "safeguarding", 3, &["northmoor"]);
    let out = p.prepare(&s, &r, &f, &case(), date("2025-06-15"));
    assert!(out.decision.is_allowed(), "{}", out.decision.reason);
    let fled = "built-in rule: it locates the family and northmoor is an area they fled";
    let report = summary(&out.report);
    for f in [
        "family.new_address",
        "family.new_school",
        "family.gp",
        "family.new_phone",
    ] {
        assert!(!out.content.contains_key(&field(f)), "{f} was sent");
        assert!(
            report.contains(&(f.into(), "drop".into(), fled.into())),
            "{f}: {report:?}"
        );
    }
    assert_eq!(out.content.get(&field("child.name")), Some(&text("Sam")));
    // And the gateway agrees with the client.
    let d = p.decide(&s, &r, &f, &out.declared_fields);
    assert_eq!(d, out.decision);
}

#[test]
fn prepare_applies_placeholders_and_age() {
    let p = southvale();
    let s = sender("alice@southvale", "southvale-council", "key-lead");
    let r = recipient(
        "user:head@northmoor",
        None,
        Some("designated-safeguarding-lead"),
    );
    let f = facts("update", "safeguarding", 3, &[]);
    let out = p.prepare(&s, &r, &f, &case(), date("2025-06-15"));
    assert!(out.decision.is_allowed(), "{}", out.decision.reason);
    assert_eq!(
        out.decision.rule.as_ref().unwrap().as_str(),
        "update-to-school"
    );
    assert_eq!(
        out.content.get(&field("family_views")),
        Some(&text("[withheld: shared at the family's request only]"))
    );
    assert_eq!(
        out.content.get(&field("child.date_of_birth")),
        Some(&text("aged 15"))
    );
    assert_eq!(
        out.declared_fields,
        fields(&["child.date_of_birth", "child.name", "family_views"])
    );
}

#[test]
fn prepare_drops_a_value_the_operation_does_not_fit() {
    let p = southvale();
    let s = sender("alice@southvale", "southvale-council", "social-worker");
    let r = recipient("team:duty@northmoor", None, None);
    let mut c = CaseFile::new();
    c.insert(
        field("family.new_address"),
        text("12 Acacia Avenue, Leeds LS6 2AB"),
    );
    c.insert(field("child.name"), text("Sam"));
    let out = p.prepare(
        &s,
        &r,
        &facts("relocation", "safeguarding", 3, &[]),
        &c,
        date("2025-06-15"),
    );
    assert!(out.decision.is_allowed());
    assert!(!out.content.contains_key(&field("family.new_address")));
    let rec = &out.report[0];
    assert_eq!(rec.op, Redaction::Drop);
    assert_eq!(
        rec.note.as_deref(),
        Some("could not apply postcode-district: postcode-district needs an address; dropped instead")
    );
}

#[test]
fn prepare_denied_sends_nothing() {
    let p = southvale();
    let s = sender("tom@southvale", "southvale-council", "teacher");
    let r = recipient("team:duty@northmoor", None, None);
    // (facts, deny kind)
    let table = [
        (
            facts("relocation", "safeguarding", 3, &[]),
            DenyKind::NoRuleMatched,
        ),
        (
            facts("relocation", "safeguarding", 2, &[]),
            DenyKind::OutdatedPolicy,
        ),
    ];
    for (f, kind) in table {
        let out = p.prepare(&s, &r, &f, &case(), date("2025-06-15"));
        assert_eq!(out.decision.verdict, Verdict::Deny(kind));
        assert!(out.content.is_empty() && out.declared_fields.is_empty());
    }
    // Nothing left after redaction is a deny too.
    let s = sender("alice@southvale", "southvale-council", "social-worker");
    let mut c = CaseFile::new();
    c.insert(field("health.diagnosis"), text("asthma"));
    let out = p.prepare(
        &s,
        &r,
        &facts("relocation", "safeguarding", 3, &[]),
        &c,
        date("2025-06-15"),
    );
    assert_eq!(out.decision.verdict, Verdict::Deny(DenyKind::NoFields));
    assert!(out.content.is_empty());
    assert_eq!(out.report.len(), 1);
}

#[test]
fn prepare_reports_adult_route() {
    let p = southvale();
    let s = sender("alice@southvale", "southvale-council", "social-worker");
    let r = recipient("team:duty@northmoor", None, None);
    let mut c = case();
    c.insert(
        field("child.date_of_birth"),
        Value::Date(date("2007-01-01")),
    );
    let out = p.prepare(
        &s,
        &r,
        &facts("handover", "safeguarding", 3, &[]),
        &c,
        date("2025-06-15"),
    );
    assert_eq!(
        out.age_route,
        Some(AgeRoute::Adult {
            age: 18,
            adult_services: "team:adult-safeguarding@southvale".parse().unwrap()
        })
    );
}
