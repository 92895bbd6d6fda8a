//! The language check: tables of phrases that must be caught in every
//! free-text field, and of ordinary sentences that must not be.

use proto::case::CaseFile;
use serde_json::Value;

use super::*;

/// The template, which is clean, as a JSON tree to edit.
fn base() -> Value {
    let case = crate::referral::parse_case_toml(CaseFile::template()).unwrap();
    serde_json::to_value(&case).unwrap()
}

/// `facts[1].source_withheld_reason` → `/facts/1/source_withheld_reason`.
fn pointer(path: &str) -> String {
    format!(
        "/{}",
        path.replace('[', "/").replace("].", "/").replace('.', "/")
    )
}

fn set(v: &Value, path: &str, text: &str) -> CaseFile {
    let mut v = v.clone();
    *v.pointer_mut(&pointer(path)).unwrap() = Value::String(text.to_string());
    CaseFile::from_json_value(&v).unwrap()
}

fn free_text_paths() -> Vec<String> {
    let case = CaseFile::from_json_value(&base()).unwrap();
    let paths: Vec<String> = case.free_text().into_iter().map(|(p, _)| p).collect();
    // The template has every kind of free-text field, including a withheld source.
    for want in [
        "facts[0].text",
        "facts[0].source",
        "facts[1].source_withheld_reason",
        "opinions[0].text",
        "family_views[0].text",
        "chronology[0].text",
        "chronology[0].source",
        "actions[0].action",
        "risks[0].text",
        "risks[0].mitigation",
    ] {
        assert!(paths.iter().any(|p| p == want), "{want}");
    }
    paths
}

fn lint() -> Lint {
    Lint::new(&[(
        "{gang|gangs} {member|members}".to_string(),
        "Say who is exploiting the child: \"is being criminally exploited by …\".".to_string(),
    )])
    .unwrap()
}

/// Wording that must be flagged: (text as written, the phrase flagged).
const FLAGGED: &[(&str, &str)] = &[
    ("putting herself at risk", "putting herself at risk"),
    ("putting himself at risk", "putting himself at risk"),
    ("putting themselves at risk", "putting themselves at risk"),
    ("Putting Herself At Risk", "Putting Herself At Risk"),
    ("puts herself at risk", "puts herself at risk"),
    ("put himself in danger", "put himself in danger"),
    ("placing   herself  at risk", "placing   herself  at risk"),
    ("a lifestyle choice", "lifestyle choice"),
    ("lifestyle choices", "lifestyle choices"),
    ("promiscuous", "promiscuous"),
    ("PROMISCUOUS", "PROMISCUOUS"),
    ("sleeping around", "sleeping around"),
    ("consented", "consented"),
    ("it was consensual", "consensual"),
    ("consenting", "consenting"),
    ("streetwise", "streetwise"),
    ("street-wise", "street-wise"),
    ("street wise", "street wise"),
    ("associating with older males", "associating with"),
    ("associates with adults", "associates with"),
    ("sexually active", "sexually active"),
    ("a prostitute", "prostitute"),
    ("child prostitute", "prostitute"),
    ("child prostitution", "prostitution"),
    ("prostituting herself", "prostituting"),
    ("her boyfriend", "boyfriend"),
    ("her 24-year-old boyfriend", "boyfriend"),
    ("Boyfriend's car", "Boyfriend's"),
    ("risk-taking behaviour", "risk-taking behaviour"),
    ("risk taking behaviours", "risk taking behaviours"),
    ("a drug runner", "drug runner"),
    ("drugs mule", "drugs mule"),
    ("absconded", "absconded"),
    ("absconding from care", "absconding"),
    ("a willing participant", "willing participant"),
    ("willingly went", "willingly went"),
    ("willing took part", "willing took part"),
    ("attention seeking", "attention seeking"),
    ("attention-seeking", "attention-seeking"),
    ("hard to reach", "hard to reach"),
    ("non-engaging", "non-engaging"),
    // An area's own phrase, from configuration.
    ("a gang member", "gang member"),
];

/// Ordinary sentences: nothing to flag. (`consented` is always flagged, as
/// the module documents, so agreement is written "agreed" here.)
const ORDINARY: &[&str] = &[
    "She attends school regularly.",
    "The family agreed to this referral being shared.",
    "With the family's consent, the school was told about the move.",
    "Amira is being put at risk by adults who give her gifts.",
    "She is at risk of exploitation from adults she met online.",
    "He placed himself in the care of his aunt.",
    "The risks associated with disclosure were discussed with the family.",
    "Her mother chose a school close to the new home.",
    "She was reported missing three times in May.",
    "Her friend from school visited at the weekend.",
    "The sexual exploitation was reported to the police.",
    "She is active in sports and enjoys swimming.",
    "The street was well lit.",
    "She took part in a youth club session.",
    "Lifestyle magazines were found in her room.",
    "A drugs worker will visit the family.",
    "Her associates at college have been supportive.",
    "Hard work at school has been praised.",
    "She reached the school safely.",
    "Constance from the youth service attended the meeting.",
    "The mother's views were recorded in her own words.",
    "Police seized phones belonging to the adults involved.",
    "The boyfriendship quiz was part of a lesson.",
];

#[test]
fn every_listed_phrase_is_caught_in_every_free_text_field() {
    let lint = lint();
    let base = base();
    let paths = free_text_paths();
    for (written, phrase) in FLAGGED {
        for path in &paths {
            let text = format!("Noted: {written}, on two occasions.");
            let case = set(&base, path, &text);
            let findings = lint.check(&case);
            assert_eq!(findings.len(), 1, "{written:?} in {path}: {findings:#?}");
            let f = &findings[0];
            assert_eq!(&f.field_path, path);
            assert_eq!(f.phrase, *phrase, "{written:?} in {path}");
            assert!(!f.suggestion.is_empty());
            assert!(f
                .excerpt
                .contains(phrase.split_whitespace().next().unwrap()));
        }
    }
}

#[test]
fn ordinary_sentences_are_not_flagged_in_any_free_text_field() {
    let lint = lint();
    let base = base();
    for sentence in ORDINARY {
        for path in free_text_paths() {
            let findings = lint.check(&set(&base, &path, sentence));
            assert!(findings.is_empty(), "{sentence:?} in {path}: {findings:#?}");
        }
    }
}

#[test]
fn the_template_is_clean() {
    let case = crate::referral::parse_case_toml(CaseFile::template()).unwrap();
    assert_eq!(lint().check(&case), []);
}

#[test]
fn several_findings_in_one_text_in_order() {
    let mut out = Vec::new();
    lint().check_text(
        "facts[0].text",
        "Her boyfriend says she is streetwise and promiscuous.",
        &mut out,
    );
    let phrases: Vec<&str> = out.iter().map(|f| f.phrase.as_str()).collect();
    assert_eq!(phrases, ["boyfriend", "streetwise", "promiscuous"]);
}

#[test]
fn excerpts_are_cut_and_on_one_line() {
    let mut out = Vec::new();
    let text = format!("{}\nshe is streetwise\n{}", "a".repeat(50), "b".repeat(50));
    lint().check_text("x", &text, &mut out);
    let e = &out[0].excerpt;
    assert!(e.starts_with('…') && e.ends_with('…'), "{e}");
    assert!(e.contains("she is streetwise"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn configured_phrases_are_checked() {
    // (phrase, suggestion, ok)
    let table = [
        ("gang member", "say who", true),
        ("{county|county-lines} exploitation victim", "ok", true),
        ("{a|b", "s", false),
        ("a}", "s", false),
        ("{a|{b}}", "s", false),
        ("{a||b}", "s", false),
        ("", "s", false),
        ("  -- ", "s", false),
        ("word", "  ", false),
    ];
    for (p, s, ok) in table {
        let r = Lint::new(&[(p.to_string(), s.to_string())]);
        assert_eq!(r.is_ok(), ok, "{p:?}: {r:?}");
    }
}

fn findings() -> Vec<Finding> {
    let mut out = Vec::new();
    lint().check_text(
        "facts[0].text",
        "Her boyfriend said she is streetwise. Her boyfriend left.",
        &mut out,
    );
    assert_eq!(out.len(), 3);
    out
}

fn confirm(target: ConfirmTarget, reason: &str) -> Confirmation {
    Confirmation {
        target,
        reason: reason.to_string(),
    }
}

#[test]
fn sending_needs_every_finding_resolved() {
    use ConfirmTarget::{Index, Phrase};
    let f = findings();
    let quoted = "the child's own words, quoted";

    // Nothing found: nothing to confirm.
    assert_eq!(require_resolved(&[], &[]), Ok(vec![]));

    // (confirmations, expected: Ok(number recorded) or Err(kind))
    type Want = Result<usize, &'static str>;
    let table: Vec<(Vec<Confirmation>, Want)> = vec![
        (vec![], Err("unresolved:3")),
        (vec![confirm(Index(0), quoted)], Err("unresolved:2")),
        (
            vec![confirm(Phrase("BOYFRIEND".into()), quoted)],
            Err("unresolved:1"),
        ),
        (
            vec![
                confirm(Phrase("boyfriend".into()), quoted),
                confirm(Index(1), "quoting the police report"),
            ],
            Ok(3),
        ),
        (
            vec![
                confirm(Index(0), quoted),
                confirm(Index(1), quoted),
                confirm(Index(2), quoted),
            ],
            Ok(3),
        ),
        (
            vec![
                confirm(Phrase("boyfriend".into()), "  "),
                confirm(Index(1), quoted),
            ],
            Err("empty"),
        ),
        (
            vec![
                confirm(Phrase("boyfriend".into()), quoted),
                confirm(Index(1), quoted),
                confirm(Index(3), quoted),
            ],
            Err("no such"),
        ),
        (
            vec![
                confirm(Phrase("{boyfriend|boyfriends}".into()), quoted),
                confirm(Phrase("streetwise".into()), quoted),
            ],
            Ok(3),
        ),
        (
            vec![
                confirm(Phrase("boyfriend".into()), quoted),
                confirm(Phrase("promiscuous".into()), quoted),
            ],
            Err("no such"),
        ),
    ];
    for (i, (confirmations, want)) in table.into_iter().enumerate() {
        let got = require_resolved(&f, &confirmations);
        match (got, want) {
            (Ok(recorded), Ok(n)) => {
                assert_eq!(recorded.len(), n, "row {i}");
                assert!(recorded.iter().all(|r| !r.reason.is_empty()));
                let recorded_findings: Vec<&Finding> =
                    recorded.iter().map(|r| &r.finding).collect();
                assert_eq!(recorded_findings, f.iter().collect::<Vec<_>>(), "row {i}");
            }
            (Err(LintError::Unresolved(u)), Err(w)) => {
                assert_eq!(format!("unresolved:{}", u.len()), w, "row {i}")
            }
            (Err(LintError::EmptyReason(_)), Err("empty")) => {}
            (Err(LintError::NoSuchFinding(_)), Err("no such")) => {}
            (got, want) => panic!("row {i}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn recorded_confirmations_serialise() {
    let f = findings();
    let r = require_resolved(
        &f,
        &[
            confirm(ConfirmTarget::Phrase("boyfriend".into()), "quoted"),
            confirm(ConfirmTarget::Index(1), "quoted"),
        ],
    )
    .unwrap();
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"reason\":\"quoted\""));
    let back: Vec<RecordedConfirmation> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}
