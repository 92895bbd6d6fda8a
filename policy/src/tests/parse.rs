//! Parsing: the example policy, and errors that name line and key.

use super::*;

#[test]
fn example_policy_parses() {
    let p = southvale();
    assert_eq!(p.id().as_str(), "southvale-sharing");
    assert_eq!(p.area().as_str(), "southvale");
    assert_eq!(p.version(), 3);
    assert_eq!(
        p.adult_services().to_string(),
        "team:adult-safeguarding@southvale"
    );
    assert_eq!(p.turning_18_notice_days(), 90);
    assert_eq!(p.age_bands(), &[0, 5, 10, 13, 16, 18]);
    let names: Vec<&str> = p.rules().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "relocation-to-receiving-social-care",
            "police-disruption",
            "update-to-school"
        ]
    );
    // The built-in locating fields come first, then the policy's own.
    let loc: Vec<&str> = p.locating_fields().iter().map(|f| f.as_str()).collect();
    assert_eq!(
        loc,
        [
            "family.new_address",
            "family.new_school",
            "family.gp",
            "family.new_phone",
            "family.new_college"
        ]
    );
    assert_eq!(p.digest_hex().len(), 64);
    assert_eq!(
        p.rules()[2].redact[1].op,
        Redaction::Placeholder("shared at the family's request only".into())
    );
}

/// (what to replace in the example, replacement, line, key, message part)
const ERRORS: &[(&str, &str, usize, &str, &str)] = &[
    (
        "roles = [\"social-worker\", \"key-lead\"]\n\n[rule.to]",
        "rols = [\"social-worker\", \"key-lead\"]\n\n[rule.to]",
        39,
        "rule[0].from.rols",
        "unknown field `rols`",
    ),
    (
        "version = 3",
        "version = \"3\"",
        5,
        "policy.version",
        "invalid type: string \"3\"",
    ),
    (
        "version = 3",
        "version = 0",
        5,
        "policy.version",
        "must be a whole number from 1",
    ),
    (
        "version = 3",
        "version = -1",
        5,
        "policy.version",
        "must be a whole number from 1",
    ),
    (
        "legal_basis = \"Crime and Disorder Act 1998 s.115\"\n",
        "",
        46,
        "rule[1]",
        "missing field `legal_basis`",
    ),
    (
        "  \"risks\",\n]",
        "  \"risks\",\n  \"Bad Field\",\n]",
        17,
        "rule[0].fields",
        "invalid field path \"Bad Field\"",
    ),
    (
        "op = \"age-band\"",
        "op = \"age-bnd\"",
        53,
        "rule[1].redact.op",
        "unknown variant `age-bnd`",
    ),
    (
        "op = \"age-band\"",
        "opp = \"age-band\"",
        53,
        "rule[1].redact.opp",
        "unknown field `opp`",
    ),
    (
        "name = \"police-disruption\"",
        "name = \"relocation-to-receiving-social-care\"",
        47,
        "rule[1].name",
        "duplicate rule name",
    ),
    (
        "categories = [\"disruption\"]",
        "categories = []",
        49,
        "rule[1].categories",
        "must not be empty",
    ),
    (
        "areas = [\"southvale\"]\norganisations = [\"southvale-police\"]",
        "areas = [\"South Vale\"]\norganisations = [\"southvale-police\"]",
        57,
        "rule[1].from.areas",
        "invalid area id \"South Vale\"",
    ),
    (
        "turning_18_notice_days = 90",
        "turning_18_notice_days = 400",
        7,
        "policy.turning_18_notice_days",
        "must be 0 to 366 days",
    ),
    (
        "[policy]\n",
        "[policy]\nbogus = 1\n",
        3,
        "policy.bogus",
        "unknown field `bogus`",
    ),
    (
        "op = \"placeholder\", reason = \"shared at the family's request only\"",
        "op = \"placeholder\"",
        74,
        "rule[2].redact.op",
        "placeholder needs a reason",
    ),
    (
        "op = \"age\" }",
        "op = \"age\", reason = \"x\" }",
        73,
        "rule[2].redact.reason",
        "only a placeholder takes a reason",
    ),
    (
        "reason = \"shared at the family's request only\"",
        "reason = \"[risk]\"",
        74,
        "rule[2].redact.reason",
        "must not hold '[' or ']'",
    ),
    (
        "{ field = \"child.date_of_birth\", op = \"age-band\" }",
        "{ field = \"family.new_address\", op = \"town\" }",
        53,
        "rule[1].redact.field",
        "rule does not allow field family.new_address, so cannot redact it",
    ),
    (
        "adult_services = \"team:adult-safeguarding@southvale\"",
        "adult_services = \"adults\"",
        6,
        "policy.adult_services",
        "invalid recipient",
    ),
    (
        "turning_18_notice_days = 90",
        "age_bands = [0, 13, 10]",
        7,
        "policy.age_bands",
        "strictly increasing",
    ),
    (
        "teams = [\"duty\", \"mash\"]",
        "teams = [\"Duty\"]",
        43,
        "rule[0].to.teams",
        "invalid team id",
    ),
    (
        "[[rule]]\nname = \"update-to-school\"",
        "[[rule]]\nname = 7",
        67,
        "rule[2].name",
        "invalid type",
    ),
    ("[policy]", "[policy", 2, "(document)", ""),
];

#[test]
fn parse_errors_name_line_and_key() {
    for (from, to, line, key, message) in ERRORS {
        assert!(
            SOUTHVALE.contains(from),
            "test input {from:?} not in the example"
        );
        let text = SOUTHVALE.replacen(from, to, 1);
        match Policy::parse(&text) {
            Err(PolicyError::Parse {
                line: l,
                key: k,
                message: m,
                ..
            }) => {
                assert_eq!((l, k.as_str()), (*line, *key), "{to:?}: {m}");
                assert!(m.contains(message), "{to:?}: {m:?} lacks {message:?}");
            }
            other => panic!("{to:?}: expected a parse error, got {other:?}"),
        }
    }
}

#[test]
fn parse_error_display() {
    let text = SOUTHVALE.replacen("[policy]\n", "[policy]\nbogus = 1\n", 1);
    let e = Policy::parse(&text).unwrap_err().to_string();
    assert!(
        e.starts_with("policy line 3, column 1, at policy.bogus: unknown field `bogus`"),
        "{e}"
    );
}

#[test]
fn names_and_paths() {
    // (input, valid)
    let paths = [
        ("child.name", true),
        ("facts", true),
        ("facts.0.source", true),
        ("a.b.c.d.e.f.g.h", true),
        ("a.b.c.d.e.f.g.h.i", false),
        ("", false),
        ("child..name", false),
        (".child", false),
        ("child.", false),
        ("Child.name", false),
        ("child-name", false),
        ("child name", false),
    ];
    for (p, ok) in paths {
        assert_eq!(FieldPath::new(p).is_ok(), ok, "{p:?}");
    }
    // (ancestor, descendant, covers)
    let covers = [
        ("family", "family.new_address", true),
        ("family.new_address", "family.new_address", true),
        ("family.new", "family.new_address", false),
        ("family.new_address", "family", false),
    ];
    for (a, b, want) in covers {
        assert_eq!(field(a).covers(&field(b)), want, "{a} covers {b}");
    }
    assert!(Role::new("social-worker").is_ok());
    assert!(Role::new("Social Worker").is_err());
    assert!(Organisation::new("").is_err());
    assert!(Purpose::new("x".repeat(65)).is_err());
}
