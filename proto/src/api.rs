//! JSON bodies of the user API (`/v1/...`) and the federation API
//! (`/v1/federation/...`).

use serde::{Deserialize, Serialize};

use crate::{Body, Category, ContentHash, Envelope, IdempotencyKey, MessageId, Recipient, Status};

/// `POST /v1/messages`: a user submits a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Resubmitting with the same key returns the first message, never a copy.
    pub idempotency_key: IdempotencyKey,
    /// `user:<id>@<area>` or `team:<id>@<area>`.
    pub recipient: Recipient,
    /// What kind of message this is.
    pub category: Category,
    /// Urgent messages are routed to whoever is on duty.
    #[serde(default)]
    pub urgent: bool,
    /// What the body is (default: opaque).
    #[serde(default)]
    pub kind: crate::MessageKind,
    /// For referral content: what it discloses, under which policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disclosure: Option<crate::Disclosure>,
    /// For an MLS Commit: the member's proof that it was made within the
    /// group's current epoch (see [`CommitProof`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_proof: Option<CommitProof>,
    /// The opaque body (base64 on the wire).
    pub body: Body,
}

/// A member's proof that an MLS Commit was made within its group's epoch,
/// which the group's home gateway checks before it binds the epoch to the
/// Commit, and the key that proves the next Commit.
///
/// Every member of an epoch derives the same key pair from the epoch's
/// secrets ([`crate::mls::EPOCH_KEY_LABEL`]); a member removed before it
/// cannot, so it cannot take the group's next epoch with a Commit of its
/// own making (and with it every later change of the case). A Commit made
/// in epoch `n` is signed with epoch `n`'s key and names epoch `n + 1`'s
/// public key, signed with that key too, which the gateway keeps with the
/// binding. Made and checked with [`CommitProof::make`],
/// [`CommitProof::next_key`] and [`CommitProof::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitProof {
    /// Ed25519 signature (hex, 64 bytes) by the key of the epoch the Commit
    /// was made in, over [`crate::mls::commit_proof_message`].
    pub signature: String,
    /// The Ed25519 public key (hex, 32 bytes) of the epoch the Commit
    /// starts.
    pub next_epoch_key: String,
    /// Ed25519 signature (hex, 64 bytes) by that key over the same: it
    /// shows that whoever made the proof holds the next epoch's key (so a
    /// member removed by the Commit cannot name a key of her own for it).
    pub next_epoch_signature: String,
}

/// Answer to a submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitResponse {
    /// The message's id, the same for every resubmission with one key.
    pub message_id: MessageId,
    /// Its status now.
    pub status: Status,
    /// True when this key had been submitted before and nothing new was stored.
    pub duplicate: bool,
    /// For another area whose gateway keeps failing: since when, and why.
    /// The message is queued and retried; the sender may want to phone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
}

/// One message waiting in an inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxItem {
    /// The message's envelope.
    pub envelope: Envelope,
    /// `delivered` (not yet fetched) or `fetched` (not yet acknowledged).
    pub status: Status,
}

/// `GET /v1/inbox`: messages for the caller and their teams, not yet acknowledged,
/// oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxResponse {
    /// Waiting messages, in arrival order.
    pub messages: Vec<InboxItem>,
}

/// `GET /v1/messages/{id}`: one message, with its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchResponse {
    /// The envelope.
    pub envelope: Envelope,
    /// The opaque body.
    pub body: Body,
}

/// One step in a message's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    /// The status reached.
    pub status: Status,
    /// When (milliseconds since the Unix epoch), as recorded by the gateway that saw it.
    pub at_ms: u64,
    /// Why, for `undeliverable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /v1/messages/{id}/status`: what the sender sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The message.
    pub message_id: MessageId,
    /// Where it was sent.
    pub recipient: Recipient,
    /// Its current status.
    pub status: Status,
    /// Every status it has reached, oldest first.
    pub history: Vec<StatusEvent>,
    /// While it is `accepted` for another area: that area's gateway has
    /// been failing to take it (it stays queued and is retried until it
    /// expires). Absent when nothing is known to be wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
}

/// Why a message accepted here has not reached its recipient's gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// Since when that gateway has been failing (ms since the Unix epoch).
    pub since_ms: u64,
    /// The last failure, e.g. `peer answered HTTP 507 (insufficient_storage)`.
    pub last_error: String,
}

/// Machine-readable error codes. Scripts may rely on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request body is not valid JSON for this endpoint.
    MalformedRequest,
    /// The request body is larger than the gateway accepts.
    PayloadTooLarge,
    /// No such user or team, or an area that is not in the federation.
    UnknownRecipient,
    /// No such message (or not one the caller may see).
    NotFound,
    /// The caller's certificate does not allow this endpoint.
    Forbidden,
    /// Too many requests; retry after the `Retry-After` header.
    RateLimited,
    /// The idempotency key was used before for a different message.
    IdempotencyConflict,
    /// A federation item was refused.
    Rejected,
    /// Something failed inside the gateway; nothing was changed.
    Internal,
    /// The gateway is shutting down or a peer is unreachable; retry.
    Unavailable,
    /// The sharing policy does not allow this disclosure; the message says
    /// which rule (or that none matched).
    PolicyDenied,
    /// An MLS Commit for an epoch that already has a different Commit:
    /// process the pending Commits and retry.
    StaleEpoch,
    /// The message was acknowledged by everyone who had to, and its
    /// ciphertext was erased after the gateway's retention period; its
    /// envelope and status are kept.
    Erased,
    /// The gateway is short of disk space and takes no new messages for
    /// now (HTTP 507); nothing was stored. Fetching, acknowledging and
    /// status go on. Retry later.
    InsufficientStorage,
    /// The caller's certificate has been revoked by its area's CA since the
    /// connection was opened (HTTP 403): nothing was done. A person needs a
    /// new certificate from their gateway's administrator.
    CertificateRevoked,
    /// The caller's certificate ran past its `notAfter` while the
    /// connection was open (HTTP 403): nothing was done. A person needs a
    /// renewed certificate from their gateway's administrator.
    CertificateExpired,
    /// The request's body did not arrive within the gateway's
    /// `limits.body_timeout` (HTTP 408): nothing was done. Retry.
    RequestTimeout,
    /// An MLS Commit without a valid proof that a member of the group's
    /// current epoch made it (HTTP 403; see [`CommitProof`]): nothing was
    /// stored. A client from before proofs needs updating.
    UnprovenCommit,
    /// A code this version does not know (one added by a newer gateway);
    /// the HTTP status and the message still say what happened.
    #[serde(other)]
    Unknown,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, for programs.
    pub error: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

/// `POST /v1/federation/batch`: a gateway hands a peer, in order, the
/// messages and status updates queued for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationBatch {
    /// Items in queue order.
    pub items: Vec<FederationItem>,
}

/// One item of a federation batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FederationItem {
    /// A message for a recipient in the receiving area.
    Deliver {
        /// Its envelope (sender area must be the calling peer's area).
        envelope: Box<Envelope>,
        /// Its opaque body; its hash must match the envelope.
        body: Body,
    },
    /// News about a message the receiving gateway sent to the caller's area.
    Status {
        /// The message (sent from the receiving area).
        message_id: MessageId,
        /// The status it reached.
        status: Status,
        /// When.
        at_ms: u64,
    },
}

/// The receiver's verdict on one federation item, in batch order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ItemResult {
    /// Stored durably; the sender may forget it.
    Stored,
    /// Already stored before: the sender may forget it, nothing new was stored.
    Duplicate,
    /// Refused for good; the sender must tell its user.
    Rejected {
        /// Why.
        code: ErrorCode,
        /// For people.
        reason: String,
    },
}

/// Answer to a federation batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FederationBatchResponse {
    /// One result per item, in order.
    pub results: Vec<ItemResult>,
}

/// `POST /v1/keypackages`: a user publishes MLS KeyPackages (TLS-encoded).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPackageUpload {
    /// KeyPackages whose credential identity is the uploader's certificate identity.
    pub key_packages: Vec<Body>,
}

/// Answer to an upload: the uploader's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPackageStock {
    /// How many were stored now.
    pub stored: usize,
    /// Single-use KeyPackages left.
    pub available: usize,
    /// Whether a last-resort KeyPackage is held (handed out but never used up).
    pub last_resort: bool,
    /// True when the stock is low: publish more.
    pub low: bool,
}

/// `POST /v1/messages/{id}/ack`'s optional body. Without one (or with
/// `not_in_case` false) a person acknowledges the message, and its sender
/// is told. With `not_in_case`, a team member says that the team's MLS
/// message is in a case she is not part of (she cannot decrypt it): it
/// stops waiting for her, and its sender is not told it was acknowledged
/// (only that it is undeliverable, if that leaves no one to read it). (A
/// gateway from before this ignores the body: an acknowledgement.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    /// The message is in a case the caller is not part of.
    #[serde(default)]
    pub not_in_case: bool,
}

/// `POST /v1/federation/commits`: a gateway asks the home gateway of an MLS
/// group (see [`crate::mls::home_of_group`]) to bind an epoch to a Commit a
/// member submitted at it, before taking the Commit. Answered
/// [`CommitOrdered`], or `409` `stale_epoch` when another Commit has the
/// epoch (or a later one is bound).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitOrder {
    /// The group id, hex.
    pub group_id: String,
    /// The epoch the Commit was made in.
    pub epoch: u64,
    /// The Commit's content hash (of its ciphertext).
    pub content_hash: ContentHash,
    /// The member's proof, as it came with the Commit (a home from before
    /// proofs refuses the field: it is then asked again without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<CommitProof>,
}

/// The answer to [`CommitOrder`]: the epoch is this Commit's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitOrdered {
    /// The epoch bound.
    pub epoch: u64,
}

/// `POST /v1/keypackages/claim`: take one KeyPackage for each member of a recipient.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// A user or a team, here or in a peer area.
    pub recipient: Recipient,
}

/// One claimed KeyPackage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedKeyPackage {
    /// The member's identity, `spiffe://<area>/user/<id>`.
    pub identity: String,
    /// The KeyPackage (TLS-encoded).
    pub key_package: Body,
}

/// Answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimResponse {
    /// One KeyPackage per member that had one.
    pub key_packages: Vec<ClaimedKeyPackage>,
    /// Members who have published no KeyPackage (they cannot be added yet).
    pub missing: Vec<String>,
}

/// `GET /v1/me`: the caller's directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Me {
    /// `spiffe://<area>/user/<id>`.
    pub identity: String,
    /// Organisation.
    pub organisation: String,
    /// Role.
    pub role: String,
    /// Teams.
    pub teams: Vec<crate::TeamId>,
}

#[cfg(test)]
mod tests;
