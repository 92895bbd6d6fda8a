//! Tests of the envelope's text forms.

use super::*;

/// SHA-256 of `abc` (FIPS 180-2, appendix B.1).
const ABC: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

#[test]
fn a_content_hash_is_written_and_read_as_sha256_and_lowercase_hex() {
    let h = Body(b"abc".to_vec()).hash();
    assert_eq!(h.to_string(), ABC);
    assert_eq!(format!("{h:?}"), ABC);
    assert_eq!(serde_json::to_string(&h).unwrap(), format!("\"{ABC}\""));
    assert_eq!(
        serde_json::from_str::<ContentHash>(&format!("\"{ABC}\"")).unwrap(),
        h
    );
    assert_eq!(ABC.parse::<ContentHash>().unwrap(), h);
    for bad in [&ABC[7..], "sha256:ba78", "sha1:ba7816bf"] {
        assert!(bad.parse::<ContentHash>().is_err(), "{bad}");
    }
}
