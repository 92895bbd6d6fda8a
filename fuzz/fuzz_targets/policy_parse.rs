//! The sharing-policy parser and the signed-policy document parser must
//! never panic, whatever the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(policy) = policy::Policy::parse(text) {
        // A parsed policy is well formed: its accessors work.
        let _ = policy.digest_hex();
        for rule in policy.rules() {
            for field in &rule.fields {
                let _ = policy.is_locating(field);
            }
        }
    }
    if let Ok(signed) = policy::SignedPolicy::from_text(text) {
        // What parses prints back to something that parses the same.
        let again = policy::SignedPolicy::from_text(&signed.to_text());
        assert!(again.is_ok(), "to_text of a parsed document does not parse");
    }
});
