//! Case-file decoding and validation, table-driven.

use serde_json::{json, Value};

use super::*;

fn valid() -> Value {
    json!({
        "case": { "family_ref": "SV-2025-0142" },
        "child": {
            "name": "Amira Example",
            "date_of_birth": "2011-09-14",
            "gender": "female",
        },
        "family": {
            "carers": [{ "name": "Sarah Example", "relationship": "mother" }],
            "previous_area": "southvale",
            "new_address": { "lines": ["12 Example Street"], "town": "Northmoor", "postcode": "NM4 7QT" },
            "new_school": { "name": "Northmoor Academy", "town": "Northmoor" },
            "gp": "Riverside Medical Practice",
            "new_phone": "07700 900123",
        },
        "facts": [
            { "text": "Missing from home three times.", "source": "Southvale Police" },
            { "text": "Given a phone by an adult.", "source_withheld_reason": "Risk to the informant." },
        ],
        "opinions": [{ "text": "She is being groomed.", "author": "J. Patel, social worker" }],
        "family_views": [{ "by": "mother", "text": "The move has helped." }],
        "chronology": [
            { "date": "2025-03-02", "kind": "event", "text": "Missing overnight.", "source": "Police" },
        ],
        "actions": [
            { "owner": "Northmoor duty", "action": "Visit the family.", "due": "2025-06-20", "status": "open" },
        ],
        "risks": [{ "text": "Exploiters are looking for the family.", "mitigation": "Address never sent to Southvale." }],
    })
}

/// Sets `value` at a JSON pointer, creating nothing: the parent must exist.
fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = v.pointer_mut(parent).unwrap();
    match target {
        Value::Object(m) => {
            m.insert(key.to_string(), value);
        }
        Value::Array(a) => a[key.parse::<usize>().unwrap()] = value,
        _ => panic!("{pointer}"),
    }
    v
}

fn without(mut v: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    v.pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key);
    v
}

#[test]
fn valid_case_file_decodes() {
    let c = CaseFile::from_json_value(&valid()).unwrap();
    assert_eq!(c.case.family_ref.as_str(), "SV-2025-0142");
    assert_eq!(c.child.date_of_birth.to_string(), "2011-09-14");
    assert_eq!(
        c.facts[1].source,
        Source::Withheld("Risk to the informant.".into())
    );
    assert_eq!(c.chronology[0].kind, ChronologyKind::Event);
    assert_eq!(c.actions[0].status, ActionStatus::Open);
    assert_eq!(
        c.family.previous_area.as_ref().unwrap().as_str(),
        "southvale"
    );
}

#[test]
fn json_round_trip() {
    let c = CaseFile::from_json_value(&valid()).unwrap();
    let text = serde_json::to_string_pretty(&c).unwrap();
    assert_eq!(CaseFile::parse_json(&text).unwrap(), c);
    // Deserialize goes through the same decoder.
    let again: CaseFile = serde_json::from_str(&text).unwrap();
    assert_eq!(again, c);
    assert!(serde_json::from_value::<CaseFile>(with(valid(), "/child/nmae", json!("x"))).is_err());
}

#[test]
fn problems_name_the_field() {
    // (changed case file, expected problem path, part of the message)
    let table: Vec<(Value, &str, &str)> = vec![
        (
            without(valid(), "/facts/0/source"),
            "facts[0].source",
            "is required",
        ),
        (
            with(valid(), "/facts/0/source_withheld_reason", json!("why")),
            "facts[0].source_withheld_reason",
            "not both",
        ),
        (
            with(valid(), "/facts/1/sorce", json!("x")),
            "facts[1].sorce",
            "unknown field",
        ),
        (
            with(valid(), "/facts/0/text", json!("  ")),
            "facts[0].text",
            "must not be empty",
        ),
        (
            with(valid(), "/facts/0/text", json!(7)),
            "facts[0].text",
            "expected text",
        ),
        (
            with(valid(), "/facts", json!({})),
            "facts",
            "expected a list",
        ),
        (
            with(valid(), "/facts/0", json!("x")),
            "facts[0]",
            "expected a table",
        ),
        (
            without(valid(), "/family_views"),
            "family_views",
            "is required",
        ),
        (
            with(valid(), "/family_views", json!([])),
            "family_views",
            "must not be empty",
        ),
        (
            with(valid(), "/family_views/0/by", json!("")),
            "family_views[0].by",
            "must not be empty",
        ),
        (without(valid(), "/child/name"), "child.name", "is required"),
        (
            with(valid(), "/child/date_of_birth", json!("2011-02-30")),
            "child.date_of_birth",
            "calendar date",
        ),
        (
            with(valid(), "/child/date_of_birth", json!("14/09/2011")),
            "child.date_of_birth",
            "yyyy-mm-dd",
        ),
        (
            with(valid(), "/child/name", json!("A\nB")),
            "child.name",
            "one line",
        ),
        (
            with(valid(), "/child/name", json!("x".repeat(301))),
            "child.name",
            "longer than 300",
        ),
        (
            with(valid(), "/facts/0/text", json!("x\u{7}")),
            "facts[0].text",
            "control",
        ),
        (
            with(valid(), "/chronology/0/kind", json!("worry")),
            "chronology[0].kind",
            "concern, indicator, event",
        ),
        (
            with(valid(), "/chronology/0/date", json!("2025-13-01")),
            "chronology[0].date",
            "calendar date",
        ),
        (
            without(valid(), "/chronology/0/source"),
            "chronology[0].source",
            "is required",
        ),
        (
            with(valid(), "/actions/0/status", json!("pending")),
            "actions[0].status",
            "in-progress",
        ),
        (
            with(valid(), "/actions/0/due", json!("")),
            "actions[0].due",
            "calendar date",
        ),
        (
            without(valid(), "/actions/0/owner"),
            "actions[0].owner",
            "is required",
        ),
        (
            with(valid(), "/case/family_ref", json!("has space")),
            "case.family_ref",
            "1 to 64",
        ),
        (without(valid(), "/case"), "case", "is required"),
        (
            with(valid(), "/family/previous_area", json!("South Vale")),
            "family.previous_area",
            "invalid area id",
        ),
        (
            with(valid(), "/family/new_address/lines", json!([])),
            "family.new_address.lines",
            "must not be empty",
        ),
        (
            with(valid(), "/family/new_address/lines", json!(["ok", 3])),
            "family.new_address.lines[1]",
            "expected text",
        ),
        (
            without(valid(), "/family/new_address/postcode"),
            "family.new_address.postcode",
            "is required",
        ),
        (
            with(valid(), "/family/carers/0/age", json!(40)),
            "family.carers[0].age",
            "unknown field",
        ),
        (
            with(valid(), "/risks/0/text", json!(null)),
            "risks[0].text",
            "is required",
        ),
        (with(valid(), "/extra", json!(1)), "extra", "unknown field"),
        // Locating details only in their own fields.
        (
            with(
                valid(),
                "/child/address",
                json!({ "lines": ["12 Example Street"], "town": "Northmoor", "postcode": "nm47qt" }),
            ),
            "child.address",
            "family.new_address",
        ),
        (
            with(
                valid(),
                "/child/school",
                json!({ "name": "northmoor academy", "town": "Northmoor" }),
            ),
            "child.school",
            "family.new_school",
        ),
        (
            with(valid(), "/child/gp", json!("Riverside Medical Practice")),
            "child.gp",
            "family.gp",
        ),
        (
            with(valid(), "/child/phone", json!("07700900123")),
            "child.phone",
            "family.new_phone",
        ),
        (
            with(
                valid(),
                "/facts/0/text",
                json!("The family now live at 12 Example Street."),
            ),
            "facts[0].text",
            "new address",
        ),
        (
            with(
                valid(),
                "/risks/0/mitigation",
                json!("Postcode nm4 7qt kept from Southvale."),
            ),
            "risks[0].mitigation",
            "new postcode",
        ),
        (
            with(
                valid(),
                "/family_views/0/text",
                json!("Happy at Northmoor Academy."),
            ),
            "family_views[0].text",
            "new school",
        ),
        (
            with(
                valid(),
                "/chronology/0/text",
                json!("Registered with riverside medical practice."),
            ),
            "chronology[0].text",
            "GP",
        ),
        (
            with(
                valid(),
                "/opinions/0/text",
                json!("Call mum on 07700-900-123."),
            ),
            "opinions[0].text",
            "phone",
        ),
    ];
    for (input, path, message) in table {
        let err = CaseFile::from_json_value(&input).unwrap_err();
        let found = err
            .problems()
            .iter()
            .any(|p| p.path == path && p.message.contains(message));
        assert!(found, "want {path}: {message}; got {err}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let v = without(without(valid(), "/facts/0/source"), "/child/name");
    let v = with(v, "/actions/0/status", json!("later"));
    let err = CaseFile::from_json_value(&v).unwrap_err();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["child.name", "facts[0].source", "actions[0].status"]
    );
}

#[test]
fn optional_fields_may_be_absent_or_blank() {
    let v = without(valid(), "/family");
    let v = with(v, "/child/gender", json!(""));
    let c = CaseFile::from_json_value(&v).unwrap();
    assert_eq!(c.family, Family::default());
    assert_eq!(c.child.gender, None);
    for key in ["facts", "opinions", "chronology", "actions", "risks"] {
        assert!(CaseFile::from_json_value(&without(valid(), &format!("/{key}"))).is_ok());
    }
}

#[test]
fn short_locating_details_are_not_searched_for() {
    // A two-letter GP name would match by chance; only the field itself counts.
    let v = with(valid(), "/family/gp", json!("Dr"));
    let v = with(v, "/facts/0/text", json!("Dr Jones saw her."));
    assert!(CaseFile::from_json_value(&v).is_ok());
}

#[test]
fn syntax_errors_give_line_and_column() {
    let err = CaseFile::parse_json("{\n  \"case\": ,\n}").unwrap_err();
    match err {
        CaseError::Syntax { line, column, .. } => assert_eq!((line, column), (2, 11)),
        other => panic!("{other}"),
    }
    let big = " ".repeat(MAX_CASE_FILE_BYTES + 1);
    assert!(matches!(
        CaseFile::parse_json(&big),
        Err(CaseError::TooLarge { .. })
    ));
}

#[test]
fn dates() {
    // (text, valid)
    let table = [
        ("2024-02-29", true),
        ("2023-02-29", false),
        ("2000-02-29", true),
        ("1900-02-29", false),
        ("0000-01-01", false),
        ("9999-12-31", true),
        ("2024-04-31", false),
        ("2024-4-1", false),
        ("2024-04-01T00:00", false),
        ("+024-04-01", false),
        ("２０２４-04-01", false),
        ("", false),
    ];
    for (s, ok) in table {
        assert_eq!(CaseDate::parse(s).is_some(), ok, "{s:?}");
    }
}

#[test]
fn free_text_lists_every_free_text_field() {
    let c = CaseFile::from_json_value(&valid()).unwrap();
    let paths: Vec<String> = c.free_text().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        paths,
        [
            "facts[0].text",
            "facts[0].source",
            "facts[1].text",
            "facts[1].source_withheld_reason",
            "opinions[0].text",
            "family_views[0].text",
            "chronology[0].text",
            "chronology[0].source",
            "actions[0].action",
            "risks[0].text",
            "risks[0].mitigation",
        ]
    );
}

#[test]
fn keywords_round_trip() {
    for k in ChronologyKind::ALL {
        assert_eq!(ChronologyKind::parse(k.as_str()), Some(*k));
    }
    for s in ActionStatus::ALL {
        assert_eq!(ActionStatus::parse(s.as_str()), Some(*s));
    }
}
