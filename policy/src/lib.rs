//! Sharing policies and redaction: a pure decision engine.
//!
//! An area states, as signed data, what it lets its people disclose to whom.
//! This crate parses that data, verifies its signature, decides whether a
//! message may go, and computes the redacted content a sending client must
//! produce. It does no I/O: text comes in as `&str`, the date comes in as a
//! [`Date`], randomness comes in as an RNG; nothing here reads a file, a
//! clock or the network.
//!
//! # Promises
//!
//! * **Default deny.** A message is allowed only when a rule matches its
//!   sender, recipient, category and purpose, and that rule lists every field
//!   the message declares. Anything else is [`Verdict::Deny`], with a reason
//!   that names the rule (or says that no rule matched, and why each rule
//!   did not).
//! * **The family is never located to the area they fled.** Every policy has
//!   a list of *locating fields* (at least [`BUILTIN_LOCATING_FIELDS`]:
//!   new address, new school, GP, new phone). When the recipient's area is one
//!   the family fled ([`Facts::fled_from`]), a message declaring any locating
//!   field is denied and [`Policy::prepare`] drops every locating field,
//!   whatever the matching rule says. This is built in; no policy can turn it
//!   off.
//! * **Only the current policy counts.** A message that cites another policy
//!   id, or a version other than the one in force, is denied, and the reason
//!   names both versions.
//! * **Proof of identity is required.** A decision needs a [`SenderContext`],
//!   which can only be built from a [`certs::VerifiedPeer`].
//! * **Nothing panics on input.** Policy text, signatures, keys and case
//!   content from outside produce a [`PolicyError`] (or a deny), never a panic.
//!
//! # Flow
//!
//! 1. The owning area writes TOML (format below) and signs it:
//!    [`SignedPolicy::sign`]. Peers verify with the owner's key:
//!    [`SignedPolicy::verify`] returns a [`Policy`].
//! 2. The sending client calls [`Policy::prepare`] with the case content
//!    ([`CaseFile`]): it gets the redacted content, the field list to declare
//!    in the envelope, a preview report of every redaction
//!    ([`RedactionRecord`]), and the decision.
//! 3. The sending gateway calls [`Policy::decide`] with the envelope's facts
//!    and declared fields; the receiving side may do the same.
//!
//! # The TOML format
//!
//! ```toml
//! [policy]
//! id = "southvale-sharing"          # policy id, cited by every message
//! area = "southvale"                # the owning (signing) area
//! version = 3                       # a positive integer; bump on every change
//! adult_services = "team:adult-safeguarding@southvale"  # where 18+ goes
//! turning_18_notice_days = 90       # optional, default 90
//! age_bands = [0, 5, 10, 13, 16, 18] # optional lower bounds, this default
//! locating_fields = ["family.new_college"]  # added to the built-in four
//!
//! [[rule]]
//! name = "relocation-to-receiving-social-care"
//! description = "optional free text"
//! legal_basis = "Children Act 1989 s.47; Working Together 2023"
//! categories = ["relocation", "handover"]
//! purposes = ["safeguarding"]
//! fields = ["child.name", "child.date_of_birth", "family.new_address", "facts"]
//! from = { areas = ["southvale"], organisations = ["southvale-council"], roles = ["social-worker"] }
//! to = { areas = ["*"], teams = ["duty", "mash"] }
//! redact = [
//!   { field = "child.date_of_birth", op = "age-band" },
//!   { field = "family.new_address", op = "placeholder", reason = "risk to family" },
//! ]
//! ```
//!
//! * `from` has `areas` (required), `organisations` and `roles` (optional);
//!   `to` has `areas` (required), `organisations`, `roles` and `teams`
//!   (optional). An absent optional selector matches anything; `"*"` in any
//!   selector list matches anything. `teams` matches only team recipients;
//!   `roles` matches the role the directory gives the recipient (user or team).
//! * `categories`, `purposes` and `fields` are required and non-empty; they
//!   take no wildcard. A field entry allows that [`FieldPath`] and everything
//!   below it (`facts` allows `facts.0.source`).
//! * Redaction ops: `drop`, `town`, `postcode-district`, `age`, `age-band`,
//!   `school-town`, `placeholder` (needs `reason`). See [`Redaction`].
//! * Unknown keys are errors. Every parse error names the line, column and
//!   key path, e.g. `line 14, column 1, at rule[1].from.rols: unknown field`.
//!
//! # Matching
//!
//! Rules are tried in file order; the **first** rule whose category, purpose,
//! sender and recipient selectors all match *governs* the message. Its field
//! list and redactions apply; a declared field it does not list is a deny
//! naming that field and that rule (later rules are not consulted, so a
//! decision always names one rule and one set of redactions).

mod date;
mod decide;
mod names;
mod parse;
mod redact;
mod sign;

pub use date::Date;
pub use decide::{Decision, DenyKind, Facts, PolicyRef, RecipientContext, SenderContext, Verdict};
pub use names::{FieldPath, Organisation, PolicyId, Purpose, Role, RuleName, Selector};
pub use parse::{FieldRedaction, Policy, RecipientSide, Rule, SenderSide, BUILTIN_LOCATING_FIELDS};
pub use redact::{
    Address, AgeRoute, Because, CaseFile, Prepared, Redaction, RedactionRecord, School, Value,
};
pub use sign::{PolicySigningKey, PolicyVerifyingKey, SignedPolicy};

#[cfg(test)]
mod tests;

/// Everything that can go wrong in this crate. Decisions are not errors: a
/// refused message is a [`Decision`] with [`Verdict::Deny`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The policy text is not valid TOML, does not follow the policy format,
    /// or breaks a rule of the format (a duplicate rule name, an empty list,
    /// a redaction of a field the rule does not allow, ...).
    #[error("policy line {line}, column {column}, at {key}: {message}")]
    Parse {
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column (in characters) of the offending text.
        column: usize,
        /// The key path, e.g. `rule[2].from.roles` (`rule[2]` is the third
        /// `[[rule]]`); `(document)` when no key applies.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A name (organisation, role, purpose, field path, ...) built in code does
    /// not follow its syntax.
    #[error("invalid {kind} {value:?}: {why}")]
    InvalidName {
        /// Which kind of name.
        kind: &'static str,
        /// The offending value, truncated to 64 characters.
        value: String,
        /// The rule it broke.
        why: &'static str,
    },
    /// A date is not a real `yyyy-mm-dd` calendar date.
    #[error("invalid date {0:?}: expected a calendar date written yyyy-mm-dd")]
    InvalidDate(String),
    /// A date of birth is later than the `today` passed in.
    #[error("date of birth {dob} is after today ({today})")]
    BirthAfterToday {
        /// The date of birth.
        dob: Date,
        /// The date passed as today.
        today: Date,
    },
    /// A decision was asked for a peer that is not a user (e.g. a gateway).
    #[error("{0} is not a user: only a user can send a referral")]
    NotAUser(String),
    /// The envelope names a sender other than the verified peer.
    #[error("envelope sender {envelope} is not the verified peer {peer}")]
    SenderMismatch {
        /// The sender the envelope claims.
        envelope: String,
        /// Who the certificate proves.
        peer: String,
    },
    /// A key is not `ed25519:<base64 of 32 bytes>` (public) or base64 of a
    /// 32-byte seed (secret).
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    /// A signature is not base64 of 64 bytes.
    #[error("malformed signature: not base64 of 64 bytes")]
    MalformedSignature,
    /// A signed-policy document is not in the text format of
    /// [`SignedPolicy::to_text`].
    #[error("malformed signed policy document: {0}")]
    MalformedDocument(&'static str),
    /// A policy is signed by a key other than the one trusted for its owner.
    #[error("policy signed by {found}, but the key trusted for this area is {trusted}")]
    UntrustedSigner {
        /// The trusted key.
        trusted: String,
        /// The key the document names.
        found: String,
    },
    /// The signature does not verify over the policy text: the text or the
    /// signature was altered.
    #[error("bad policy signature: the policy text or its signature was altered")]
    BadSignature,
    /// A correctly signed policy claims an owning area other than the expected one.
    #[error("policy belongs to area {found}, expected {expected}")]
    WrongOwner {
        /// The area the verifier expected.
        expected: String,
        /// The area the policy names.
        found: String,
    },
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}
