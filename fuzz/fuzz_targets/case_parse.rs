//! The case-file parser must never panic, and what it accepts must
//! serialise back to an equal case file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::case::CaseFile;

fn round_trip(case: &CaseFile) {
    let json = serde_json::to_string(case).expect("a case file serialises");
    let again = CaseFile::parse_json(&json).expect("a serialised case file parses");
    assert_eq!(&again, case, "JSON round trip changed the case file");
}

fuzz_target!(|text: &str| {
    if let Ok(case) = CaseFile::parse_json(text) {
        round_trip(&case);
    }
    // TOML through serde (the client's TOML reader adds line numbers on top
    // of the same decoder).
    if let Ok(case) = toml::from_str::<CaseFile>(text) {
        round_trip(&case);
    }
});
