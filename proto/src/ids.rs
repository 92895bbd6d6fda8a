//! Identifier newtypes. Each one is parsed once, at the edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ProtoError;

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks `s` against a character class and a length range.
fn check(
    kind: &'static str,
    s: &str,
    max: usize,
    allowed: fn(u8) -> bool,
    why: &'static str,
) -> Result<(), ProtoError> {
    let err = |why| ProtoError::InvalidId {
        kind,
        value: truncate(s),
        why,
    };
    if s.is_empty() {
        return Err(err("is empty"));
    }
    if s.len() > max {
        return Err(err("is too long"));
    }
    if !s.bytes().all(allowed) {
        return Err(err(why));
    }
    Ok(())
}

fn dns_label_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
}

fn name_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_'
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:literal, $allowed:expr, $why:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parses and checks an identifier.
            pub fn new(s: impl Into<String>) -> Result<Self, ProtoError> {
                let s = s.into();
                check($kind, &s, $max, $allowed, $why)?;
                Ok(Self(s))
            }

            /// The identifier as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ProtoError;
            fn from_str(s: &str) -> Result<Self, ProtoError> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// An area (a local authority or region): the trust domain of one gateway,
    /// e.g. `southvale`. Lowercase letters, digits, `-` and `.`; at most 63 bytes.
    AreaId, "area id", 63, dns_label_char, "may hold only a-z, 0-9, '-' and '.'"
);
id_type!(
    /// A person known to an area's directory, e.g. `alice`.
    UserId, "user id", 64, name_char, "may hold only a-z, 0-9, '-', '.' and '_'"
);
id_type!(
    /// A team in an area's directory, e.g. `duty`.
    TeamId, "team id", 64, name_char, "may hold only a-z, 0-9, '-', '.' and '_'"
);
id_type!(
    /// A message category, e.g. `relocation`, `urgent-risk`, `update`.
    Category, "category", 32, name_char, "may hold only a-z, 0-9, '-', '.' and '_'"
);
id_type!(
    /// A message's identifier, assigned by the sending gateway: 32 lowercase hex digits.
    MessageId, "message id", 32, |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b), "must be lowercase hex"
);
id_type!(
    /// The sender's idempotency key: a resubmission with the same key (by the
    /// same sender) is the same message. Printable ASCII, at most 128 bytes.
    IdempotencyKey, "idempotency key", 128, |b: u8| b.is_ascii_graphic(), "must be printable ASCII without spaces"
);

impl MessageId {
    /// Builds a message id from 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        // Into a fixed buffer: `hex::encode` goes through a char iterator,
        // measurable on the gateway's submission path.
        let mut digits = [0u8; 32];
        match hex::encode_to_slice(bytes, &mut digits) {
            Ok(()) => Self(String::from_utf8_lossy(&digits).into_owned()),
            Err(_) => Self(hex::encode(bytes)),
        }
    }

    /// A time-ordered id: 48 bits of milliseconds since the Unix epoch, then
    /// 80 random bits. Ids made later sort later, so storage indexes keyed by
    /// id grow at one end instead of touching random pages.
    pub fn time_ordered(unix_ms: u64, random: [u8; 10]) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
        bytes[6..].copy_from_slice(&random);
        Self::from_bytes(bytes)
    }
}

impl IdempotencyKey {
    /// A fresh time-ordered key: 48 bits of milliseconds since the Unix
    /// epoch, then 80 random bits, in hex. Keys made later sort later, so the
    /// gateways' idempotency indexes grow at one end (any unique key works;
    /// random ones cost more index pages per commit).
    pub fn time_ordered(unix_ms: u64, random: [u8; 10]) -> Self {
        Self(MessageId::time_ordered(unix_ms, random).0)
    }
}

/// What a message is addressed to inside an area.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// One person.
    User(UserId),
    /// A team: any member may fetch and acknowledge.
    Team(TeamId),
}

/// A recipient anywhere in the federation: `user:<id>@<area>` or `team:<id>@<area>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recipient {
    /// The area whose gateway stores the message for the recipient.
    pub area: AreaId,
    /// The user or team there.
    pub target: Target,
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::User(u) => write!(f, "user:{u}@{}", self.area),
            Target::Team(t) => write!(f, "team:{t}@{}", self.area),
        }
    }
}

impl FromStr for Recipient {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        let bad = || ProtoError::InvalidRecipient(truncate(s));
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        let (name, area) = rest.split_once('@').ok_or_else(bad)?;
        let area = AreaId::new(area)?;
        let target = match kind {
            "user" => Target::User(UserId::new(name)?),
            "team" => Target::Team(TeamId::new(name)?),
            _ => return Err(bad()),
        };
        Ok(Recipient { area, target })
    }
}

impl Serialize for Recipient {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Recipient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
