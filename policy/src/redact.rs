//! Redaction: what the sending client does to case content before
//! encrypting it, and the age routing rule.

use std::collections::BTreeMap;
use std::fmt;

use proto::{AreaId, Recipient};

use crate::decide::{Decision, DenyKind, Facts, RecipientContext, SenderContext};
use crate::names::{FieldPath, RuleName};
use crate::parse::Policy;
use crate::{Date, PolicyError};

/// A value in the case file, as far as redaction needs to understand it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Free text (names, phone numbers, a fact, an opinion, ...).
    Text(String),
    /// A calendar date, e.g. a date of birth.
    Date(Date),
    /// A postal address.
    Address(Address),
    /// A school and where it is.
    School(School),
    /// Several values (e.g. the entries of a chronology).
    List(Vec<Value>),
}

/// A postal address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Street lines, most specific first.
    pub lines: Vec<String>,
    /// The post town.
    pub town: String,
    /// A UK postcode, e.g. `LS6 2AB`.
    pub postcode: String,
}

/// A school.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct School {
    /// The school's name.
    pub name: String,
    /// The town it is in.
    pub town: String,
}

/// Case content keyed by field path: the input and output of
/// [`Policy::prepare`]. (The structured case file comes later; this is the
/// flat view redaction works on.)
pub type CaseFile = BTreeMap<FieldPath, Value>;

/// A field-level redaction operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Redaction {
    /// `drop`: the field is not sent at all.
    Drop,
    /// `town`: an address becomes its town.
    Town,
    /// `postcode-district`: an address becomes its postcode's outward code
    /// (`LS6 2AB` → `LS6`).
    PostcodeDistrict,
    /// `age`: a date of birth becomes `aged N`.
    Age,
    /// `age-band`: a date of birth becomes `aged 13-15` (bands from the policy).
    AgeBand,
    /// `school-town`: a school becomes `a school in <town>`.
    SchoolTown,
    /// `placeholder`: the value becomes `[withheld: <reason>]`.
    Placeholder(String),
}

impl Redaction {
    /// The operation's name in policy TOML.
    pub fn name(&self) -> &'static str {
        match self {
            Redaction::Drop => "drop",
            Redaction::Town => "town",
            Redaction::PostcodeDistrict => "postcode-district",
            Redaction::Age => "age",
            Redaction::AgeBand => "age-band",
            Redaction::SchoolTown => "school-town",
            Redaction::Placeholder(_) => "placeholder",
        }
    }

    /// Applies the operation. `Ok(None)` means the field is dropped; `Err`
    /// says why the value does not suit the operation (the caller drops it).
    pub(crate) fn apply(
        &self,
        value: &Value,
        today: Date,
        bands: &[u8],
    ) -> Result<Option<Value>, String> {
        let wrong = |want: &str| Err(format!("{} needs {want}", self.name()));
        match (self, value) {
            (Redaction::Drop, _) => Ok(None),
            (Redaction::Placeholder(reason), _) => {
                Ok(Some(Value::Text(format!("[withheld: {reason}]"))))
            }
            (Redaction::Town, Value::Address(a)) => match a.town.trim() {
                "" => Err("the address has no town".into()),
                town => Ok(Some(Value::Text(town.to_string()))),
            },
            (Redaction::PostcodeDistrict, Value::Address(a)) => postcode_district(&a.postcode)
                .map(|d| Some(Value::Text(d)))
                .ok_or_else(|| "the address has no valid UK postcode".into()),
            (Redaction::Town | Redaction::PostcodeDistrict, _) => wrong("an address"),
            (Redaction::Age | Redaction::AgeBand, Value::Date(dob)) => {
                let age = dob
                    .age_on(today)
                    .ok_or_else(|| "the date is after today".to_string())?;
                Ok(Some(Value::Text(if *self == Redaction::Age {
                    format!("aged {age}")
                } else {
                    format!("aged {}", age_band(age, bands))
                })))
            }
            (Redaction::Age | Redaction::AgeBand, _) => wrong("a date"),
            (Redaction::SchoolTown, Value::School(s)) => match s.town.trim() {
                "" => Err("the school has no town".into()),
                town => Ok(Some(Value::Text(format!("a school in {town}")))),
            },
            (Redaction::SchoolTown, _) => wrong("a school"),
        }
    }
}

impl fmt::Display for Redaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Redaction::Placeholder(r) => write!(f, "placeholder [withheld: {r}]"),
            other => f.write_str(other.name()),
        }
    }
}

/// The outward code (postcode district) of a UK postcode: `LS6 2AB` → `LS6`,
/// `sw1a1aa` → `SW1A`. `None` if it is not shaped like a postcode.
pub(crate) fn postcode_district(postcode: &str) -> Option<String> {
    let compact: String = postcode
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if !(5..=7).contains(&compact.len()) || !compact.is_ascii() {
        return None;
    }
    let (outward, inward) = compact.split_at(compact.len() - 3);
    let ib = inward.as_bytes();
    let inward_ok =
        ib[0].is_ascii_digit() && ib[1].is_ascii_alphabetic() && ib[2].is_ascii_alphabetic();
    let outward_ok = outward.bytes().all(|b| b.is_ascii_alphanumeric())
        && outward
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
        && outward.bytes().any(|b| b.is_ascii_digit());
    (inward_ok && outward_ok).then(|| outward.to_string())
}

/// `13-15`, `5` (a one-year band) or `18+` (the last band).
pub(crate) fn age_band(age: u32, bands: &[u8]) -> String {
    let i = bands
        .iter()
        .rposition(|lo| u32::from(*lo) <= age)
        .unwrap_or(0);
    let lo = bands.get(i).copied().unwrap_or(0);
    match bands.get(i + 1) {
        None => format!("{lo}+"),
        Some(next) if u32::from(*next) == u32::from(lo) + 1 => lo.to_string(),
        Some(next) => format!("{lo}-{}", next - 1),
    }
}

/// Why a field was redacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Because {
    /// The governing rule requires it.
    Rule(RuleName),
    /// Built in: the field locates the family and the recipient's area is one
    /// they fled.
    LocatesFamily {
        /// The recipient's area.
        fled_from: AreaId,
    },
    /// Default deny: the governing rule does not allow the field.
    NotAllowed {
        /// The governing rule.
        rule: RuleName,
    },
}

impl fmt::Display for Because {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Because::Rule(r) => write!(f, "rule {r}"),
            Because::LocatesFamily { fled_from } => write!(
                f,
                "built-in rule: it locates the family and {fled_from} is an area they fled"
            ),
            Because::NotAllowed { rule } => {
                write!(f, "default deny: rule {rule} does not allow it")
            }
        }
    }
}

/// One line of the redaction preview a client shows before sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedactionRecord {
    /// The field.
    pub field: FieldPath,
    /// What was done (a `Drop` when the intended operation did not fit).
    pub op: Redaction,
    /// Why.
    pub because: Because,
    /// Set when the intended operation could not be applied and the field
    /// was dropped instead, saying why.
    pub note: Option<String>,
}

/// Which service a young person is routed to, by age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgeRoute {
    /// Under 18: children's safeguarding.
    Child {
        /// Age in whole years.
        age: u32,
        /// The 18th birthday.
        turns_18_on: Date,
        /// Days from today to the 18th birthday.
        days_until_18: i64,
        /// Whether that is within the policy's notice period: plan the
        /// transition to adult services.
        turning_18_soon: bool,
    },
    /// 18 or over: route to the adult services recipient the policy names.
    Adult {
        /// Age in whole years.
        age: u32,
        /// The policy's adult services recipient.
        adult_services: Recipient,
    },
}

/// The result of [`Policy::prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The decision on the redacted content (as the gateway will make it).
    pub decision: Decision,
    /// The redacted content; empty when the decision is a deny.
    pub content: CaseFile,
    /// The field list to declare in the envelope: the keys of `content`.
    pub declared_fields: Vec<FieldPath>,
    /// Every field that was dropped or changed, and why.
    pub report: Vec<RedactionRecord>,
    /// The age route, when `child.date_of_birth` is a date not after today.
    pub age_route: Option<AgeRoute>,
}

// === impl Policy (redaction) ===

impl Policy {
    /// Child or adult route for someone born on `dob`, on `today`. A child
    /// is safeguarded until 18; from 18 the route is the policy's adult
    /// services recipient.
    pub fn age_route(&self, dob: Date, today: Date) -> Result<AgeRoute, PolicyError> {
        let age = dob
            .age_on(today)
            .ok_or(PolicyError::BirthAfterToday { dob, today })?;
        if age >= 18 {
            return Ok(AgeRoute::Adult {
                age,
                adult_services: self.adult_services.clone(),
            });
        }
        let turns_18_on = dob
            .year()
            .checked_add(18)
            .and_then(|y| dob.anniversary_in(y))
            .ok_or_else(|| PolicyError::InvalidDate(dob.to_string()))?;
        let days_until_18 = today.days_until(turns_18_on);
        Ok(AgeRoute::Child {
            age,
            turns_18_on,
            days_until_18,
            turning_18_soon: days_until_18 <= i64::from(self.turning_18_notice_days),
        })
    }

    /// Redacts `case` for a message from `sender` to `recipient` with
    /// `facts`, as the governing rule and the built-in locating-field rule
    /// require, and decides on the result. Fields the rule does not allow are
    /// dropped (default deny); locating fields are dropped when the recipient
    /// is in an area the family fled; the rule's redactions are applied (the
    /// most specific one when several cover a field); a value an operation
    /// does not fit is dropped, with a note.
    pub fn prepare(
        &self,
        sender: &SenderContext,
        recipient: &RecipientContext,
        facts: &Facts,
        case: &CaseFile,
        today: Date,
    ) -> Prepared {
        let age_route = match case.get(&child_dob()) {
            Some(Value::Date(dob)) => self.age_route(*dob, today).ok(),
            _ => None,
        };
        let denied = |decision| Prepared {
            decision,
            content: CaseFile::new(),
            declared_fields: Vec::new(),
            report: Vec::new(),
            age_route: age_route.clone(),
        };
        if let Some(d) = self.check_version(&facts.cited) {
            return denied(d);
        }
        let rule = match self.governing_rule(sender, recipient, facts) {
            Ok(rule) => rule,
            Err(why) => return denied(Decision::deny(DenyKind::NoRuleMatched, None, why)),
        };
        let fled = facts
            .fled_from
            .contains(&recipient.recipient.area)
            .then_some(&recipient.recipient.area);

        let mut content = CaseFile::new();
        let mut report = Vec::new();
        for (field, value) in case {
            let record = |op, because, note| RedactionRecord {
                field: field.clone(),
                op,
                because,
                note,
            };
            if let Some(area) = fled.filter(|_| self.is_locating(field)) {
                let because = Because::LocatesFamily {
                    fled_from: area.clone(),
                };
                report.push(record(Redaction::Drop, because, None));
                continue;
            }
            if !rule.fields.iter().any(|a| a.covers(field)) {
                let because = Because::NotAllowed {
                    rule: rule.name.clone(),
                };
                report.push(record(Redaction::Drop, because, None));
                continue;
            }
            let op = rule
                .redact
                .iter()
                .filter(|r| r.field.covers(field))
                .max_by_key(|r| r.field.as_str().len());
            let Some(op) = op else {
                content.insert(field.clone(), value.clone());
                continue;
            };
            let because = Because::Rule(rule.name.clone());
            match op.op.apply(value, today, &self.age_bands) {
                Ok(Some(v)) => {
                    content.insert(field.clone(), v);
                    report.push(record(op.op.clone(), because, None));
                }
                Ok(None) => report.push(record(Redaction::Drop, because, None)),
                Err(why) => report.push(record(
                    Redaction::Drop,
                    because,
                    Some(format!(
                        "could not apply {}: {why}; dropped instead",
                        op.op.name()
                    )),
                )),
            }
        }
        let declared_fields: Vec<FieldPath> = content.keys().cloned().collect();
        let decision = self.decide(sender, recipient, facts, &declared_fields);
        if !decision.is_allowed() {
            return Prepared {
                report,
                ..denied(decision)
            };
        }
        Prepared {
            decision,
            content,
            declared_fields,
            report,
            age_route,
        }
    }
}

/// The field [`Policy::prepare`] reads the age route from.
pub(crate) const CHILD_DOB: &str = "child.date_of_birth";

fn child_dob() -> FieldPath {
    FieldPath::known(CHILD_DOB)
}
