//! The routing envelope, opaque bodies and delivery statuses.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::{AreaId, Category, IdempotencyKey, MessageId, ProtoError, Recipient, UserId};

/// Who sent a message: a user of an area, as proven by their certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sender {
    /// The sender's area.
    pub area: AreaId,
    /// The sender's user id in that area.
    pub user: UserId,
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user:{}@{}", self.user, self.area)
    }
}

/// The plaintext header every message carries. It routes the message and
/// holds no personal data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Assigned by the sending gateway when it first accepts the message.
    pub message_id: MessageId,
    /// Chosen by the sender; resubmitting with it yields the same message.
    pub idempotency_key: IdempotencyKey,
    /// The sending user, as verified by the sending gateway.
    pub sender: Sender,
    /// Where the message goes.
    pub recipient: Recipient,
    /// What kind of message this is.
    pub category: Category,
    /// Whether the sender marked it urgent.
    pub urgent: bool,
    /// What the body is.
    #[serde(default)]
    pub kind: MessageKind,
    /// For referral content: what it discloses, under which policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disclosure: Option<Disclosure>,
    /// SHA-256 of the body.
    pub content_hash: ContentHash,
    /// When the sending gateway accepted it (milliseconds since the Unix epoch).
    pub accepted_at_ms: u64,
    /// After this instant an undelivered message is returned as undeliverable.
    pub expires_at_ms: u64,
}

/// What a referral message discloses, declared by the sender: names of
/// fields (never their values), the policy applied and why. Checked by both
/// gateways against the sending area's signed policy, and by the receiving
/// client against the decrypted content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disclosure {
    /// The sending area's policy id.
    pub policy_id: String,
    /// Its version.
    pub policy_version: u32,
    /// Why it is sent, e.g. `safeguarding`.
    pub purpose: String,
    /// The fields inside, as dotted paths (`child.name`, `facts`, ...).
    pub fields: Vec<String>,
    /// Areas the family fled: locating fields never go there.
    #[serde(default)]
    pub fled_from: Vec<AreaId>,
}

/// What a message body is. Either way the gateway never holds a key to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Bytes the gateway does not interpret.
    #[default]
    Opaque,
    /// An MLS message (RFC 9420): Welcome, Commit or application ciphertext.
    /// The gateway checks its framing and, for Commits, the epoch order.
    Mls,
}

/// The opaque bytes a message carries: ciphertext, never read by a gateway.
/// On the wire it is a base64 string.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Body(pub Vec<u8>);

impl Body {
    /// The SHA-256 of these bytes.
    pub fn hash(&self) -> ContentHash {
        ContentHash(Sha256::digest(&self.0).into())
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Body {
    // Never print a body: it may one day be plaintext in a client's log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Body({} bytes)", self.0.len())
    }
}

impl Serialize for Body {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Body)
            .map_err(|_| serde::de::Error::custom(ProtoError::InvalidBody))
    }
}

/// A SHA-256 digest, written `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentHash(pub [u8; 32]);

/// What a content hash's text begins with.
const HASH_PREFIX: &str = "sha256:";

/// The length of a content hash as text: the prefix and 64 hex digits.
const HASH_TEXT_LEN: usize = HASH_PREFIX.len() + 64;

impl ContentHash {
    /// Writes `sha256:<hex>` into `buf` and returns it as text. (Every
    /// envelope is serialised at least twice on its way, and building the
    /// hex through a `String` of chars showed in the relay's profile.)
    fn write_text<'b>(&self, buf: &'b mut [u8; HASH_TEXT_LEN]) -> Result<&'b str, fmt::Error> {
        let (prefix, digits) = buf.split_at_mut(HASH_PREFIX.len());
        prefix.copy_from_slice(HASH_PREFIX.as_bytes());
        hex::encode_to_slice(self.0, digits).map_err(|_| fmt::Error)?;
        std::str::from_utf8(buf).map_err(|_| fmt::Error)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.write_text(&mut [0; HASH_TEXT_LEN])?)
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for ContentHash {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        let bad = |why| ProtoError::InvalidId {
            kind: "content hash",
            value: s.chars().take(64).collect(),
            why,
        };
        let hex_part = s
            .strip_prefix(HASH_PREFIX)
            .ok_or(bad("must start with sha256:"))?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| bad("must be 64 hex digits"))?;
        Ok(ContentHash(out))
    }
}

impl Serialize for ContentHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0; HASH_TEXT_LEN];
        let text = self
            .write_text(&mut buf)
            .map_err(|_| serde::ser::Error::custom("content hash"))?;
        s.serialize_str(text)
    }
}

impl<'de> Deserialize<'de> for ContentHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a message is in its life. Statuses only move forward, in this order;
/// `Undeliverable` is final. It replaces `Accepted` when a message cannot be
/// delivered within its validity, and follows `Delivered` or `Fetched` when
/// the receiving gateway gives up an MLS message to a team that no one it
/// was for read (see [`Status::can_be_given_up`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The sender's gateway has stored (and will log) the message.
    Accepted,
    /// The recipient's gateway has stored it.
    Delivered,
    /// A recipient's client has taken it.
    Fetched,
    /// A person has acknowledged it.
    Acknowledged,
    /// It could not be delivered within its validity, or no one it was for
    /// will read it; the reason says why.
    Undeliverable,
}

impl Status {
    /// Position in the life of a message; a status change must increase it.
    pub fn rank(self) -> u8 {
        match self {
            Status::Accepted => 0,
            Status::Delivered => 1,
            Status::Fetched => 2,
            Status::Acknowledged => 3,
            Status::Undeliverable => 4,
        }
    }

    /// The name used on the wire and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Delivered => "delivered",
            Status::Fetched => "fetched",
            Status::Acknowledged => "acknowledged",
            Status::Undeliverable => "undeliverable",
        }
    }

    /// Parses a stored status name.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "accepted" => Status::Accepted,
            "delivered" => Status::Delivered,
            "fetched" => Status::Fetched,
            "acknowledged" => Status::Acknowledged,
            "undeliverable" => Status::Undeliverable,
            _ => return None,
        })
    }

    /// Whether moving from `self` to `next` is allowed.
    pub fn can_become(self, next: Status) -> bool {
        match (self, next) {
            (Status::Undeliverable, _) => false,
            // Only a message still waiting at the sender's gateway can
            // bounce (expiry, a peer's refusal); see `can_be_given_up`.
            (Status::Accepted, Status::Undeliverable) => true,
            (_, Status::Undeliverable) => false,
            (a, b) => b.rank() > a.rank(),
        }
    }
}

impl Status {
    /// Whether the receiving gateway may still give the message up
    /// (`undeliverable` after delivery): it was delivered and no one has
    /// acknowledged it. Only that give-up moves `delivered` or `fetched` to
    /// `undeliverable`; [`Status::can_become`] covers every other change.
    /// A message still `accepted` at its sender's gateway is not the
    /// receiver's to give up: it has not confirmed having it.
    pub fn can_be_given_up(self) -> bool {
        matches!(self, Status::Delivered | Status::Fetched)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests;
