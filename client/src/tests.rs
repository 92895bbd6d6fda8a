use super::*;
use certs::mint::{Ca, Validity};
use certs::Identity;

fn user_cert(validity: Validity) -> certs::Credentials {
    let area = AreaId::new("northshire").unwrap();
    let ca = Ca::new(&area).unwrap();
    ca.issue(
        &Identity::User(area, proto::UserId::new("alice").unwrap()),
        validity,
    )
    .unwrap()
    .credentials()
    .unwrap()
}

#[test]
fn an_expired_user_certificate_is_refused_before_connecting_naming_its_file() {
    let file = std::path::Path::new("/home/alice/alice.crt");
    let e = check_expiry(file, &user_cert(Validity::Expired), SystemTime::now()).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, ClientError::Certs(certs::CertError::Expired { .. })),
        "{text}"
    );
    assert!(text.contains("/home/alice/alice.crt"), "{text}");
    assert!(text.contains("administrator"), "{text}");
}

#[test]
fn the_days_left_are_counted_and_pass_the_warning_time_without_refusal() {
    let file = std::path::Path::new("alice.crt");
    let now = SystemTime::now();
    let year = user_cert(Validity::For(Duration::from_secs(365 * 86_400)));
    assert!(check_expiry(file, &year, now).unwrap() >= 364);
    let soon = user_cert(Validity::For(Duration::from_secs(10 * 86_400)));
    let left = check_expiry(file, &soon, now).unwrap();
    assert!((9..=10).contains(&left), "{left}");
    // The same certificate eleven days on.
    let later = now + Duration::from_secs(11 * 86_400);
    assert!(check_expiry(file, &soon, later).is_err());
}

#[test]
fn the_waiting_note_says_since_when_why_and_what_to_do() {
    let w = proto::Waiting {
        since_ms: 1_795_000_000_000,
        last_error: "peer answered HTTP 507 (insufficient_storage)".into(),
    };
    let note = waiting_note(&AreaId::new("southvale").unwrap(), &w);
    assert_eq!(
        note,
        "southvale's gateway has not taken messages since 2026-11-18T11:06:40Z \
         (peer answered HTTP 507 (insufficient_storage)); this one is queued and will be \
         retried until it expires: if it is urgent, phone them"
    );
}

#[test]
fn a_time_past_what_rfc_3339_can_write_is_shown_as_a_number_not_a_panic() {
    assert_eq!(time_text(0, false), "1970-01-01T00:00:00Z");
    assert_eq!(
        time_text(1_795_000_000_123, true),
        "2026-11-18T11:06:40.123Z"
    );
    assert_eq!(
        time_text(253_402_300_799_000, false),
        "9999-12-31T23:59:59Z"
    );
    assert_eq!(
        time_text(253_402_300_800_000, false),
        "253402300800000 ms after 1970"
    );
    assert_eq!(
        time_text(u64::MAX, true),
        format!("{} ms after 1970", u64::MAX)
    );
}

#[test]
fn revocation_lists_in_the_configuration_are_found_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alice.toml");
    std::fs::write(
        &path,
        "gateway = \"https://127.0.0.1:7441\"\narea = \"northshire\"\ncert = \"alice.crt\"\n\
         key = \"alice.key\"\nca = \"ca.crt\"\ncrls = [\"northshire.crl\", \"/etc/pki/extra.crl\"]\n",
    )
    .unwrap();
    let c = ClientConfig::load(&path).unwrap();
    assert_eq!(
        c.crls,
        [
            dir.path().join("northshire.crl"),
            std::path::PathBuf::from("/etc/pki/extra.crl")
        ]
    );
    // None configured: none checked (as before).
    std::fs::write(
        &path,
        "gateway = \"https://127.0.0.1:7441\"\narea = \"northshire\"\ncert = \"a\"\nkey = \"k\"\nca = \"c\"\n",
    )
    .unwrap();
    assert!(ClientConfig::load(&path).unwrap().crls.is_empty());
}

#[test]
fn another_workers_text_cannot_command_the_terminal() {
    assert_eq!(
        for_terminal(b"line one\n\tindented"),
        "line one\n\tindented"
    );
    // Clear the line, move up, forge a line; a bell; a carriage return.
    assert_eq!(
        for_terminal(b"ok\x1b[2K\x1b[1AREFUSED\x07\r"),
        "ok\\u{1b}[2K\\u{1b}[1AREFUSED\\u{7}\\u{d}"
    );
    // An OSC sequence ended by the C1 string terminator, and bad UTF-8.
    assert_eq!(
        for_terminal("a\u{9d}b\u{9c}".as_bytes()),
        "a\\u{9d}b\\u{9c}"
    );
    assert_eq!(for_terminal(b"\xff"), "\u{fffd}");
}

#[test]
fn a_reason_stays_on_its_own_line() {
    assert_eq!(
        one_line("refused\n    status: acknowledged\t\x1b[1A"),
        "refused\\u{a}    status: acknowledged\\u{9}\\u{1b}[1A"
    );
}

#[test]
fn a_structured_case_file_is_read_one_field_per_line() {
    let mut content = policy::CaseFile::new();
    content.insert(
        policy::FieldPath::new("child.name").unwrap(),
        policy::Value::Text("Amira Example".into()),
    );
    let text = readable(&referral::disclosed_bytes(&content));
    assert!(text.contains("child.name: Amira Example"), "{text}");
    assert!(!text.contains('{'), "{text}");
    assert_eq!(readable(b"free text\x1b[2K"), "free text\\u{1b}[2K");
}

#[test]
fn one_line_text_cannot_reorder_what_follows_it() {
    // "case-1" followed by a right-to-left override and "evil" shows as
    // "case-1live": escaped, it shows as what it is.
    let spoof = "case-1\u{202E}evil\u{2066}x\u{200F}";
    let shown = one_line(spoof);
    assert!(!shown.chars().any(is_bidi_control), "{shown}");
    assert!(shown.contains("\\u{202e}"), "{shown}");
    // A message's own text keeps its direction marks.
    assert!(for_terminal("\u{200F}\u{05E9}".as_bytes()).contains('\u{200F}'));
    // And a case id cannot hold one.
    assert!(crate::mls::check_case_id(spoof).is_err());
    assert!(crate::mls::check_case_id("case-1").is_ok());
}
