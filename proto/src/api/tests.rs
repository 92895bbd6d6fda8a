use super::*;

#[test]
fn an_error_code_from_a_newer_gateway_is_read_as_unknown() {
    let e: ApiError =
        serde_json::from_str(r#"{"error":"some_later_code","message":"what happened"}"#).unwrap();
    assert_eq!(e.error, ErrorCode::Unknown);
    assert_eq!(e.message, "what happened");
    let e: ApiError =
        serde_json::from_str(r#"{"error":"request_timeout","message":"slow"}"#).unwrap();
    assert_eq!(e.error, ErrorCode::RequestTimeout);
    assert_eq!(
        serde_json::to_string(&ErrorCode::RequestTimeout).unwrap(),
        r#""request_timeout""#
    );
}
