//! Names used in policies: each is parsed once, then trusted.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{truncate, PolicyError};

fn check(
    kind: &'static str,
    s: &str,
    max: usize,
    allowed: fn(u8) -> bool,
    why: &'static str,
) -> Result<(), PolicyError> {
    let err = |why| PolicyError::InvalidName {
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

fn name_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_'
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parses and checks a name: 1 to 64 bytes of `a-z`, `0-9`, `-`, `.`, `_`.
            pub fn new(s: impl Into<String>) -> Result<Self, PolicyError> {
                let s = s.into();
                check($kind, &s, 64, name_char, "may hold only a-z, 0-9, '-', '.' and '_'")?;
                Ok(Self(s))
            }

            /// The name as a string.
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
            type Err = PolicyError;
            fn from_str(s: &str) -> Result<Self, PolicyError> {
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

name_type!(
    /// A policy's identifier, cited by every message, e.g. `southvale-sharing`.
    PolicyId, "policy id"
);
name_type!(
    /// A rule's name, unique within its policy; decisions cite it.
    RuleName, "rule name"
);
name_type!(
    /// An organisation in an area's directory, e.g. `southvale-council`,
    /// `southvale-police`.
    Organisation, "organisation"
);
name_type!(
    /// A role in an area's directory, e.g. `social-worker`, `police-intelligence`.
    Role, "role"
);
name_type!(
    /// Why a message is sent, e.g. `safeguarding`, `crime-prevention`.
    Purpose, "purpose"
);

// === impl FieldPath ===

/// A dotted path into the referral case file, e.g. `child.date_of_birth`,
/// `family.new_address`, `facts`.
///
/// Syntax: 1 to 8 segments joined by `.`; each segment is non-empty and holds
/// only `a-z`, `0-9` and `_`; at most 128 bytes in all.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldPath(String);

impl FieldPath {
    /// Parses and checks a field path.
    pub fn new(s: impl Into<String>) -> Result<Self, PolicyError> {
        let s = s.into();
        let err = |why| PolicyError::InvalidName {
            kind: "field path",
            value: truncate(&s),
            why,
        };
        if s.is_empty() {
            return Err(err("is empty"));
        }
        if s.len() > 128 {
            return Err(err("is too long"));
        }
        let mut n = 0;
        for seg in s.split('.') {
            n += 1;
            if seg.is_empty() {
                return Err(err("has an empty segment"));
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(err("segments may hold only a-z, 0-9 and '_'"));
            }
        }
        if n > 8 {
            return Err(err("has more than 8 segments"));
        }
        Ok(FieldPath(s))
    }

    /// A path written in this crate's source; tests check each one parses.
    pub(crate) fn known(s: &'static str) -> FieldPath {
        FieldPath(s.to_string())
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `self` is `other` or an ancestor of it: `family` covers
    /// `family.new_address`; `family.new` does not cover `family.new_address`.
    pub fn covers(&self, other: &FieldPath) -> bool {
        match other.0.strip_prefix(self.0.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('.'),
            None => false,
        }
    }

    /// Whether one of the two paths covers the other (they share content).
    pub fn overlaps(&self, other: &FieldPath) -> bool {
        self.covers(other) || other.covers(self)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FieldPath({:?})", self.0)
    }
}

impl FromStr for FieldPath {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Self::new(s)
    }
}

impl Serialize for FieldPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for FieldPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

// === impl Selector ===

/// One entry of a selector list in a rule: a specific value, or `"*"` for any.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector<T> {
    /// `"*"`: matches anything.
    Any,
    /// Matches exactly this value.
    One(T),
}

impl<T: PartialEq> Selector<T> {
    /// Whether this entry matches `value`.
    pub fn matches(&self, value: &T) -> bool {
        match self {
            Selector::Any => true,
            Selector::One(t) => t == value,
        }
    }
}

impl<T: fmt::Display> fmt::Display for Selector<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str("*"),
            Selector::One(t) => t.fmt(f),
        }
    }
}

impl<'de, T> Deserialize<'de> for Selector<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "*" {
            return Ok(Selector::Any);
        }
        s.parse()
            .map(Selector::One)
            .map_err(serde::de::Error::custom)
    }
}

/// Formats a list as `[a, b, c]` for reasons.
pub(crate) fn list<T: fmt::Display>(items: &[T]) -> String {
    let parts: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    format!("[{}]", parts.join(", "))
}
