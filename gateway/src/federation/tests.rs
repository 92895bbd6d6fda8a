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

/// A batch whose answer was lost, or a server error that may come after
/// the peer committed it, may be stored there: its items are not returned
/// to their senders while the peer may yet answer. A refused connection,
/// a rate limit and the peer's typed "nothing stored" refusals (`503`,
/// `507`) say nothing reached it.
#[test]
fn server_errors_other_than_the_peers_refusals_may_have_stored_the_batch() {
    use proto::ErrorCode;
    for e in [
        SendError::Http("connection reset".into()),
        SendError::BadAnswer("2 results for 3 items".into()),
        SendError::Status(500, Some(ErrorCode::Internal)),
        SendError::Status(502, None),
        SendError::Status(504, None),
        // A proxy's, not the peer's word.
        SendError::Status(503, None),
    ] {
        assert!(e.may_have_arrived(), "{e}");
    }
    for e in [
        SendError::Unreached("connection refused".into()),
        SendError::RateLimited(None),
        SendError::Status(503, Some(ErrorCode::Unavailable)),
        SendError::Status(507, Some(ErrorCode::InsufficientStorage)),
        SendError::Status(400, Some(ErrorCode::MalformedRequest)),
        SendError::Status(403, Some(ErrorCode::Forbidden)),
    ] {
        assert!(!e.may_have_arrived(), "{e}");
    }
}
