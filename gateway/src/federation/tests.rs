use super::*;

#[test]
fn a_refusal_names_the_peers_error_code_and_nothing_else() {
    let full = SendError::Status(507, Some(proto::ErrorCode::InsufficientStorage));
    assert_eq!(
        full.to_string(),
        "peer answered HTTP 507 (insufficient_storage)"
    );
    assert_eq!(
        SendError::Status(502, None).to_string(),
        "peer answered HTTP 502"
    );
}
