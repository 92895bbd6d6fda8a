//! Signed policies: good signature, bad signature, wrong key, wrong owner.

use super::*;

fn key(n: u8) -> PolicySigningKey {
    PolicySigningKey::from_seed([n; 32])
}

#[derive(Debug)]
enum Want {
    Ok,
    Untrusted,
    BadSignature,
    Malformed,
    WrongOwner,
}

#[test]
fn verify_table() {
    let good = SignedPolicy::sign(SOUTHVALE, &key(1)).unwrap();
    let southvale = area("southvale");
    let tamper_text = {
        let mut s = good.clone();
        s.policy = s.policy.replace("version = 3", "version = 4");
        s
    };
    let tamper_whitespace = {
        let mut s = good.clone();
        s.policy.push('\n');
        s
    };
    let tamper_sig = {
        let mut s = good.clone();
        let mut bytes =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &s.signature)
                .unwrap();
        bytes[0] ^= 1;
        s.signature = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes);
        s
    };
    let short_sig = {
        let mut s = good.clone();
        s.signature = "AAAA".into();
        s
    };
    let not_b64 = {
        let mut s = good.clone();
        s.signature = "!!".into();
        s
    };
    // Signed by key 2 but claiming to be key 1's document.
    let forged = {
        let mut s = SignedPolicy::sign(SOUTHVALE, &key(2)).unwrap();
        s.signer = key(1).verifying_key();
        s
    };
    let other_key = SignedPolicy::sign(SOUTHVALE, &key(2)).unwrap();
    // (name, document, owner, trusted key, expected)
    let table = [
        ("good", &good, &southvale, key(1), Want::Ok),
        (
            "text altered",
            &tamper_text,
            &southvale,
            key(1),
            Want::BadSignature,
        ),
        (
            "one byte added",
            &tamper_whitespace,
            &southvale,
            key(1),
            Want::BadSignature,
        ),
        (
            "signature altered",
            &tamper_sig,
            &southvale,
            key(1),
            Want::BadSignature,
        ),
        (
            "signature too short",
            &short_sig,
            &southvale,
            key(1),
            Want::Malformed,
        ),
        (
            "signature not base64",
            &not_b64,
            &southvale,
            key(1),
            Want::Malformed,
        ),
        (
            "signed by another key, claiming ours",
            &forged,
            &southvale,
            key(1),
            Want::BadSignature,
        ),
        (
            "signed by an untrusted key",
            &other_key,
            &southvale,
            key(1),
            Want::Untrusted,
        ),
        (
            "another area's policy",
            &good,
            &area("northmoor"),
            key(1),
            Want::WrongOwner,
        ),
    ];
    for (name, doc, owner, trusted, want) in table {
        let got = doc.verify(owner, &trusted.verifying_key());
        let ok = match (&got, &want) {
            (Ok(p), Want::Ok) => p.version() == 3,
            (Err(PolicyError::UntrustedSigner { .. }), Want::Untrusted) => true,
            (Err(PolicyError::BadSignature), Want::BadSignature) => true,
            (Err(PolicyError::MalformedSignature), Want::Malformed) => true,
            (Err(PolicyError::WrongOwner { .. }), Want::WrongOwner) => true,
            _ => false,
        };
        assert!(ok, "{name}: got {got:?}, want {want:?}");
    }
}

#[test]
fn cannot_sign_an_invalid_policy() {
    let bad = SOUTHVALE.replacen("version = 3", "version = 0", 1);
    assert!(matches!(
        SignedPolicy::sign(&bad, &key(1)),
        Err(PolicyError::Parse { line: 5, .. })
    ));
}

#[test]
fn text_form_round_trips_byte_for_byte() {
    let signed = SignedPolicy::sign(SOUTHVALE, &key(1)).unwrap();
    let text = signed.to_text();
    assert!(text.starts_with("fedref-signed-policy v1\nsigner: ed25519:"));
    let back = SignedPolicy::from_text(&text).unwrap();
    assert_eq!(back, signed);
    assert_eq!(back.policy_text(), SOUTHVALE);
    let p = back
        .verify(&area("southvale"), &key(1).verifying_key())
        .unwrap();
    assert_eq!(p, southvale());

    // (document, error)
    let bad = [
        ("", "first line"),
        ("fedref-signed-policy v2\n", "first line"),
        (
            "fedref-signed-policy v1\nsigner: x",
            "ends within the signer line",
        ),
        (
            "fedref-signed-policy v1\nsignr: x\nsignature: y\n\n",
            "second line",
        ),
        (
            "fedref-signed-policy v1\nsigner: ed25519:AAAA\nsignature: y\n\n",
            "public key is not 32 bytes",
        ),
    ];
    for (doc, why) in bad {
        let e = SignedPolicy::from_text(doc).unwrap_err().to_string();
        assert!(e.contains(why), "{doc:?}: {e}");
    }
    let no_blank = text.replacen("\n\n", "\n", 1);
    assert!(matches!(
        SignedPolicy::from_text(&no_blank),
        Err(PolicyError::MalformedDocument(_))
    ));
}

#[test]
fn serde_form_round_trips() {
    let signed = SignedPolicy::sign(SOUTHVALE, &key(1)).unwrap();
    let toml = toml::to_string(&signed).unwrap();
    let back: SignedPolicy = toml::from_str(&toml).unwrap();
    assert_eq!(back, signed);
}

#[test]
fn keys() {
    let mut rng = rand::rngs::OsRng;
    let k = PolicySigningKey::generate(&mut rng);
    let again = PolicySigningKey::from_base64(&k.to_base64()).unwrap();
    assert_eq!(again.verifying_key(), k.verifying_key());
    let public: PolicyVerifyingKey = k.verifying_key().to_string().parse().unwrap();
    assert_eq!(public, k.verifying_key());
    assert!(!format!("{k:?}").contains(&k.to_base64()));
    // (text, valid public key)
    let table = [
        ("ed25519:", false),
        ("ed25519:!!", false),
        ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", false),
        ("ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", true),
    ];
    for (s, ok) in table {
        assert_eq!(s.parse::<PolicyVerifyingKey>().is_ok(), ok, "{s}");
    }
    assert!(PolicySigningKey::from_base64("AAAA").is_err());
}
