//! Wire types of the referral federation.
//!
//! This crate defines what crosses a process boundary: identifiers, the
//! routing [`Envelope`] every message carries, delivery [`Status`]es, and the
//! JSON bodies of the user API and the federation API. It does no I/O.
//!
//! Promises:
//! * every identifier is parsed, not validated later: a value of type
//!   [`AreaId`], [`UserId`], [`TeamId`], [`MessageId`] or [`IdempotencyKey`]
//!   is well formed, whether it came from a file, a peer or a user;
//! * the envelope holds no personal data: names of areas, users and teams are
//!   opaque identifiers, and the body it routes is opaque bytes (ciphertext
//!   once MLS is in place);
//! * deserialising untrusted JSON never panics; bad input is a typed error.

mod api;
pub mod case;
mod envelope;
pub mod frame;
mod ids;
pub mod mls;

pub use api::*;
pub use envelope::*;
pub use ids::*;

/// An error in a value received from outside: a peer, a user or a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// An identifier does not follow its syntax.
    #[error("invalid {kind} {value:?}: {why}")]
    InvalidId {
        /// Which kind of identifier (area id, user id, ...).
        kind: &'static str,
        /// The offending value, truncated to 64 characters.
        value: String,
        /// What rule it broke.
        why: &'static str,
    },
    /// A recipient address is not `user:<id>@<area>` or `team:<id>@<area>`.
    #[error("invalid recipient {0:?}: expected user:<id>@<area> or team:<id>@<area>")]
    InvalidRecipient(String),
    /// A body is not valid base64.
    #[error("body is not valid base64")]
    InvalidBody,
}
