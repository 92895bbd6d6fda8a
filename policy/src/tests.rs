//! Unit tests, table-driven: each table row is `(input, expected)`.

mod decide;
mod parse;
mod redact;
mod sign;

use certs::danger::assume_verified;
use certs::Identity;
use proto::{AreaId, Category, Recipient, UserId};

use crate::*;

pub(crate) const SOUTHVALE: &str = include_str!("../testdata/southvale.toml");

pub(crate) fn southvale() -> Policy {
    Policy::parse(SOUTHVALE).unwrap()
}

pub(crate) fn area(s: &str) -> AreaId {
    AreaId::new(s).unwrap()
}

pub(crate) fn field(s: &str) -> FieldPath {
    FieldPath::new(s).unwrap()
}

pub(crate) fn fields(s: &[&str]) -> Vec<FieldPath> {
    s.iter().map(|f| field(f)).collect()
}

/// A sender `user@area` with an organisation and role.
pub(crate) fn sender(who: &str, org: &str, role: &str) -> SenderContext {
    let (user, a) = who.split_once('@').unwrap();
    let peer = assume_verified(Identity::User(area(a), UserId::new(user).unwrap()));
    SenderContext::new(
        &peer,
        Organisation::new(org).unwrap(),
        Role::new(role).unwrap(),
    )
    .unwrap()
}

/// A recipient `team:x@area` or `user:x@area`, with optional organisation and role.
pub(crate) fn recipient(r: &str, org: Option<&str>, role: Option<&str>) -> RecipientContext {
    RecipientContext {
        recipient: r.parse::<Recipient>().unwrap(),
        organisation: org.map(|o| Organisation::new(o).unwrap()),
        role: role.map(|r| Role::new(r).unwrap()),
    }
}

pub(crate) fn facts(category: &str, purpose: &str, version: u32, fled: &[&str]) -> Facts {
    Facts {
        category: Category::new(category).unwrap(),
        purpose: Purpose::new(purpose).unwrap(),
        cited: PolicyRef {
            id: PolicyId::new("southvale-sharing").unwrap(),
            version,
        },
        fled_from: fled.iter().map(|a| area(a)).collect(),
    }
}

pub(crate) fn date(s: &str) -> Date {
    Date::parse(s).unwrap()
}

#[test]
fn built_in_field_paths_are_valid() {
    for f in BUILTIN_LOCATING_FIELDS
        .iter()
        .chain([&crate::redact::CHILD_DOB])
    {
        assert!(FieldPath::new(*f).is_ok(), "{f}");
    }
}
