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

#[test]
fn a_message_id_is_32_lowercase_hex_digits_in_time_order() {
    let id = MessageId::from_bytes([
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32,
        0x10,
    ]);
    assert_eq!(id.as_str(), "0123456789abcdeffedcba9876543210");
    assert_eq!(id.as_str().parse::<MessageId>().unwrap(), id);
    let (a, b) = (
        MessageId::time_ordered(1_700_000_000_000, [0xff; 10]),
        MessageId::time_ordered(1_700_000_000_001, [0; 10]),
    );
    assert_eq!(&a.as_str()[..12], "018bcfe56800");
    assert!(a < b);
}

#[test]
fn statuses_move_forward_and_only_a_waiting_message_bounces() {
    use Status::*;
    let all = [Accepted, Delivered, Fetched, Acknowledged, Undeliverable];
    let allowed: Vec<(Status, Status)> = all
        .iter()
        .flat_map(|a| all.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| a.can_become(*b))
        .collect();
    assert_eq!(
        allowed,
        [
            (Accepted, Delivered),
            (Accepted, Fetched),
            (Accepted, Acknowledged),
            (Accepted, Undeliverable),
            (Delivered, Fetched),
            (Delivered, Acknowledged),
            (Fetched, Acknowledged),
        ]
    );
    // Given up by the receiving gateway: anything it has that no one
    // acknowledged.
    let given_up: Vec<Status> = all.into_iter().filter(|s| s.can_be_given_up()).collect();
    assert_eq!(given_up, [Delivered, Fetched]);
}
