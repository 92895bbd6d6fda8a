//! The structured referral case file: what a worker writes and what the
//! sending client redacts, encrypts and sends.
//!
//! The Commitment to Family Friendly Practice asks workers to "record facts,
//! provide sources for information (where it is safe to do so) and include
//! the family's views; if including subjective opinions, this is clearly
//! stated", and the Parents' Charter asks for "a chronology of concerns,
//! indicators and events". The format makes each of those a field:
//!
//! * every fact and chronology entry has a `source`, or a
//!   `source_withheld_reason` saying why it is not given (exactly one);
//! * opinions are a separate list, each with its author;
//! * `family_views` is required and must not be empty;
//! * agreed actions have an owner, a due date and a status;
//! * `risks` lists the risks to the family from disclosure.
//!
//! Workers write TOML ([`CaseFile::template`] is a filled-in example); the
//! client parses it (proto has no TOML parser: the client converts TOML to a
//! JSON value tree and calls [`CaseFile::from_json_value`], adding line
//! numbers). JSON is accepted too: [`CaseFile::parse_json`].
//!
//! # Promises
//!
//! * **Unknown keys are errors** (as `#[serde(deny_unknown_fields)]` would
//!   make them), so a misspelt `sorce` is never silently ignored.
//! * **Errors point to the field**: each [`Problem`] names a path such as
//!   `facts[2].source` (`facts[2]` is the third `[[facts]]`, counting from 0)
//!   and, where the parser knows it, the line.
//! * **A parsed case file is valid**: [`CaseFile::parse_json`] and
//!   [`CaseFile::from_json_value`] run [`CaseFile::validate`] before they
//!   return a value.
//! * **Locating details stay in locating fields.** The sharing policy
//!   protects `family.new_address`, `family.new_school`, `family.gp` and
//!   `family.new_phone` from the area a family fled; validation refuses a case
//!   file that repeats those details in the child's own fields or in free
//!   text, where no policy would catch them.
//! * Nothing here panics on input.

use std::fmt;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::AreaId;

#[cfg(test)]
mod tests;

/// Longest case file [`CaseFile::parse_json`] reads, in bytes.
pub const MAX_CASE_FILE_BYTES: usize = 1 << 20;
/// Longest one-line value (a name, a source, an owner), in characters.
pub const MAX_LINE_CHARS: usize = 300;
/// Longest free-text value (a fact, an opinion, a view), in characters.
pub const MAX_TEXT_CHARS: usize = 10_000;

// === errors ===

/// One thing wrong with a case file, at one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The field, e.g. `facts[2].source` or `child.date_of_birth`;
    /// `(document)` for the whole file.
    pub path: String,
    /// The 1-based line, when the parser knows it.
    pub line: Option<usize>,
    /// What is wrong, for the worker.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}, {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Why a case file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaseError {
    /// The text is not well-formed JSON (or TOML, from the client).
    #[error("case file is not valid {format}: line {line}, column {column}: {message}")]
    Syntax {
        /// `JSON` or `TOML`.
        format: &'static str,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The file is larger than [`MAX_CASE_FILE_BYTES`].
    #[error("case file is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The file is well formed but breaks the format or its rules; every
    /// problem found is listed, each naming its field.
    #[error("case file has {} problem(s):\n{}", .0.len(), list_problems(.0))]
    Invalid(Vec<Problem>),
}

fn list_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
    lines.join("\n")
}

impl CaseError {
    /// The problems, if the file was well formed but invalid.
    pub fn problems(&self) -> &[Problem] {
        match self {
            CaseError::Invalid(p) => p,
            _ => &[],
        }
    }
}

// === types ===

/// A calendar date written `yyyy-mm-dd`, years 1 to 9999.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CaseDate {
    year: u16,
    month: u8,
    day: u8,
}

impl CaseDate {
    /// Parses `yyyy-mm-dd` (exactly that shape) and checks the date exists.
    pub fn parse(s: &str) -> Option<CaseDate> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<u16> {
            let part = s.get(r)?;
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            part.parse().ok()
        };
        let year = num(0..4)?;
        let month = u8::try_from(num(5..7)?).ok()?;
        let day = u8::try_from(num(8..10)?).ok()?;
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        ((1..=9999).contains(&year) && (1..=days).contains(&day)).then_some(CaseDate {
            year,
            month,
            day,
        })
    }

    /// The year.
    pub fn year(self) -> u16 {
        self.year
    }

    /// The month, 1 to 12.
    pub fn month(self) -> u8 {
        self.month
    }

    /// The day of the month, from 1.
    pub fn day(self) -> u8 {
        self.day
    }
}

impl fmt::Display for CaseDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl fmt::Debug for CaseDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaseDate({self})")
    }
}

impl Serialize for CaseDate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The sending area's own reference for the family: opaque to everyone
/// else. 1 to 64 characters of `A-Z`, `a-z`, `0-9`, `-`, `_`, `.` and `/`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FamilyRef(String);

impl FamilyRef {
    /// Parses a family reference.
    pub fn new(s: impl Into<String>) -> Option<FamilyRef> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        ok.then_some(FamilyRef(s))
    }

    /// The reference as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FamilyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for FamilyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FamilyRef({:?})", self.0)
    }
}

impl Serialize for FamilyRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A structured referral. See the module documentation and
/// [`CaseFile::template`] for the format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseFile {
    /// `[case]`: which case this is.
    pub case: CaseRef,
    /// `[child]`: the child.
    pub child: Child,
    /// `[family]`: the family.
    pub family: Family,
    /// `[[facts]]`: facts, each with its source or why it is withheld.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub facts: Vec<Fact>,
    /// `[[opinions]]`: professional opinions, marked as such.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub opinions: Vec<Opinion>,
    /// `[[family_views]]`: the family's own views. Required, not empty.
    pub family_views: Vec<FamilyView>,
    /// `[[chronology]]`: concerns, indicators and events.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chronology: Vec<ChronologyEntry>,
    /// `[[actions]]`: agreed actions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<Action>,
    /// `[[risks]]`: risks to the family from disclosure.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub risks: Vec<Risk>,
}

/// `[case]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseRef {
    /// The sending area's reference for the family.
    pub family_ref: FamilyRef,
}

/// `[child]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Child {
    /// Full name.
    pub name: String,
    /// Date of birth.
    pub date_of_birth: CaseDate,
    /// Gender, as the child describes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    /// Where the child lives, when that is not the family's new address
    /// (which goes in [`Family::new_address`] only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    /// The child's school, when that is not the family's new school.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub school: Option<School>,
    /// The child's GP, when that is not the family's GP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gp: Option<String>,
    /// The child's own phone number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

/// A postal address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Address {
    /// Street lines, most specific first.
    pub lines: Vec<String>,
    /// The post town.
    pub town: String,
    /// The postcode.
    pub postcode: String,
}

/// A school.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct School {
    /// Its name.
    pub name: String,
    /// The town it is in.
    pub town: String,
}

/// `[family]`. The `new_*` fields and `gp` locate the family: the sharing
/// policy never sends them to an area the family fled.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Family {
    /// Parents and carers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub carers: Vec<Carer>,
    /// The area the family lived in before, if they moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_area: Option<AreaId>,
    /// The family's new address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_address: Option<Address>,
    /// The child's new school.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_school: Option<School>,
    /// The family's GP practice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gp: Option<String>,
    /// The family's new phone number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_phone: Option<String>,
}

/// A parent or carer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Carer {
    /// Their name.
    pub name: String,
    /// Their relationship to the child, e.g. `mother`.
    pub relationship: String,
}

/// Where a piece of information came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `source = "..."`: the source.
    Given(String),
    /// `source_withheld_reason = "..."`: the source is withheld, and why
    /// (e.g. naming it would put someone at risk).
    Withheld(String),
}

impl Source {
    fn serialize_into<S: SerializeStruct>(&self, s: &mut S) -> Result<(), S::Error> {
        match self {
            Source::Given(v) => s.serialize_field("source", v),
            Source::Withheld(v) => s.serialize_field("source_withheld_reason", v),
        }
    }
}

/// `[[facts]]`: a fact and its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    /// The fact.
    pub text: String,
    /// Its source, or why the source is withheld.
    pub source: Source,
}

impl Serialize for Fact {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Fact", 2)?;
        st.serialize_field("text", &self.text)?;
        self.source.serialize_into(&mut st)?;
        st.end()
    }
}

/// `[[opinions]]`: a professional opinion, marked as one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Opinion {
    /// The opinion.
    pub text: String,
    /// Whose opinion it is (name and role).
    pub author: String,
}

/// `[[family_views]]`: a family member's own view, in their words where
/// possible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FamilyView {
    /// Whose view it is, e.g. `mother`, `the child`.
    pub by: String,
    /// The view.
    pub text: String,
}

/// What a chronology entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChronologyKind {
    /// `concern`: something that worried someone.
    Concern,
    /// `indicator`: a recognised indicator of exploitation.
    Indicator,
    /// `event`: something that happened (a meeting, a move, a missing episode).
    Event,
}

/// `[[chronology]]`: one dated entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChronologyEntry {
    /// When.
    pub date: CaseDate,
    /// What kind of entry.
    pub kind: ChronologyKind,
    /// What happened.
    pub text: String,
    /// Who reported it, or why that is withheld.
    pub source: Source,
}

impl Serialize for ChronologyEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("ChronologyEntry", 4)?;
        st.serialize_field("date", &self.date)?;
        st.serialize_field("kind", self.kind.as_str())?;
        st.serialize_field("text", &self.text)?;
        self.source.serialize_into(&mut st)?;
        st.end()
    }
}

/// Where an agreed action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionStatus {
    /// `open`: agreed, not started.
    Open,
    /// `in-progress`: under way.
    InProgress,
    /// `done`: completed.
    Done,
    /// `overdue`: past its due date and not done.
    Overdue,
    /// `cancelled`: no longer needed (say why in the action text).
    Cancelled,
}

/// `[[actions]]`: an agreed action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// Who is responsible (name and role, or team).
    pub owner: String,
    /// What was agreed.
    pub action: String,
    /// When it is due.
    pub due: CaseDate,
    /// Where it stands.
    pub status: ActionStatus,
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Action", 4)?;
        st.serialize_field("owner", &self.owner)?;
        st.serialize_field("action", &self.action)?;
        st.serialize_field("due", &self.due)?;
        st.serialize_field("status", self.status.as_str())?;
        st.end()
    }
}

/// `[[risks]]`: a risk to the family from disclosure or sharing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Risk {
    /// The risk.
    pub text: String,
    /// What is done to reduce it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mitigation: Option<String>,
}

macro_rules! keyword_enum {
    ($ty:ident { $($variant:ident = $s:literal),* $(,)? }) => {
        impl $ty {
            /// Every value, in order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),*];

            /// The value as written in a case file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $s),*
                }
            }

            /// Parses the written form.
            pub fn parse(s: &str) -> Option<$ty> {
                match s {
                    $($s => Some($ty::$variant),)*
                    _ => None,
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keyword_enum!(ChronologyKind {
    Concern = "concern",
    Indicator = "indicator",
    Event = "event",
});

keyword_enum!(ActionStatus {
    Open = "open",
    InProgress = "in-progress",
    Done = "done",
    Overdue = "overdue",
    Cancelled = "cancelled",
});

// === impl CaseFile ===

/// How a text field is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextKind {
    /// A name, a source, an owner: one line, up to [`MAX_LINE_CHARS`].
    Line,
    /// Free text: may span lines, up to [`MAX_TEXT_CHARS`].
    Free,
}

impl CaseFile {
    /// Parses and validates a JSON case file.
    pub fn parse_json(text: &str) -> Result<CaseFile, CaseError> {
        if text.len() > MAX_CASE_FILE_BYTES {
            return Err(CaseError::TooLarge {
                size: text.len(),
                limit: MAX_CASE_FILE_BYTES,
            });
        }
        let value: Value = serde_json::from_str(text).map_err(|e| CaseError::Syntax {
            format: "JSON",
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        CaseFile::from_json_value(&value)
    }

    /// Decodes and validates a case file from a JSON value tree (what the
    /// client builds from TOML). Unknown keys are errors; all problems found
    /// are reported together, each with its field path (no line numbers:
    /// the caller knows where each path came from).
    pub fn from_json_value(value: &Value) -> Result<CaseFile, CaseError> {
        let mut d = Dec::default();
        let case = decode_case(&mut d, value);
        match case {
            Some(case) if d.problems.is_empty() => {
                case.validate()?;
                Ok(case)
            }
            _ => Err(CaseError::Invalid(d.problems)),
        }
    }

    /// Checks the rules of the format that types do not enforce: required
    /// text is not empty, has no control characters and is not too long; a
    /// source is given or its withholding explained (not empty);
    /// `family_views` is not empty; locating details (the family's new
    /// address, school, GP, phone) appear only in their own fields.
    pub fn validate(&self) -> Result<(), CaseError> {
        let mut problems = Vec::new();
        self.visit_text(&mut |path, text, kind| {
            if let Some(msg) = check_text(text, kind) {
                problems.push(problem(&path, msg));
            }
        });
        if self.family_views.is_empty() {
            problems.push(problem(
                "family_views",
                "must not be empty: record the family's own views (the Charter asks for \
                 them); if they could not be asked, say so and why"
                    .into(),
            ));
        }
        if let Some(a) = &self.child.address {
            if a.lines.is_empty() {
                problems.push(problem("child.address.lines", "must not be empty".into()));
            }
        }
        if let Some(a) = &self.family.new_address {
            if a.lines.is_empty() {
                problems.push(problem(
                    "family.new_address.lines",
                    "must not be empty".into(),
                ));
            }
        }
        self.check_locating(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CaseError::Invalid(problems))
        }
    }

    /// Every free-text field, with its path (e.g. `facts[2].text`): facts
    /// and their sources, opinions, family views, chronology entries and
    /// their sources, actions, risks and mitigations. The language check
    /// reads these.
    pub fn free_text(&self) -> Vec<(String, &str)> {
        let mut out: Vec<(String, &str)> = Vec::new();
        for (i, f) in self.facts.iter().enumerate() {
            out.push((format!("facts[{i}].text"), &f.text));
            out.push((source_path("facts", i, &f.source), source_text(&f.source)));
        }
        for (i, o) in self.opinions.iter().enumerate() {
            out.push((format!("opinions[{i}].text"), &o.text));
        }
        for (i, v) in self.family_views.iter().enumerate() {
            out.push((format!("family_views[{i}].text"), &v.text));
        }
        for (i, c) in self.chronology.iter().enumerate() {
            out.push((format!("chronology[{i}].text"), &c.text));
            out.push((
                source_path("chronology", i, &c.source),
                source_text(&c.source),
            ));
        }
        for (i, a) in self.actions.iter().enumerate() {
            out.push((format!("actions[{i}].action"), &a.action));
        }
        for (i, r) in self.risks.iter().enumerate() {
            out.push((format!("risks[{i}].text"), &r.text));
            if let Some(m) = &r.mitigation {
                out.push((format!("risks[{i}].mitigation"), m));
            }
        }
        out
    }

    /// Calls `f` with every text value, its path and how it is checked.
    fn visit_text(&self, f: &mut dyn FnMut(String, &str, TextKind)) {
        let c = &self.child;
        f("child.name".into(), &c.name, TextKind::Line);
        if let Some(g) = &c.gender {
            f("child.gender".into(), g, TextKind::Line);
        }
        if let Some(a) = &c.address {
            visit_address(f, "child.address", a);
        }
        if let Some(s) = &c.school {
            visit_school(f, "child.school", s);
        }
        if let Some(gp) = &c.gp {
            f("child.gp".into(), gp, TextKind::Line);
        }
        if let Some(p) = &c.phone {
            f("child.phone".into(), p, TextKind::Line);
        }
        let fam = &self.family;
        for (i, carer) in fam.carers.iter().enumerate() {
            f(
                format!("family.carers[{i}].name"),
                &carer.name,
                TextKind::Line,
            );
            f(
                format!("family.carers[{i}].relationship"),
                &carer.relationship,
                TextKind::Line,
            );
        }
        if let Some(a) = &fam.new_address {
            visit_address(f, "family.new_address", a);
        }
        if let Some(s) = &fam.new_school {
            visit_school(f, "family.new_school", s);
        }
        if let Some(gp) = &fam.gp {
            f("family.gp".into(), gp, TextKind::Line);
        }
        if let Some(p) = &fam.new_phone {
            f("family.new_phone".into(), p, TextKind::Line);
        }
        for (i, o) in self.opinions.iter().enumerate() {
            f(format!("opinions[{i}].author"), &o.author, TextKind::Line);
        }
        for (i, v) in self.family_views.iter().enumerate() {
            f(format!("family_views[{i}].by"), &v.by, TextKind::Line);
        }
        for (i, a) in self.actions.iter().enumerate() {
            f(format!("actions[{i}].owner"), &a.owner, TextKind::Line);
        }
        for (path, text) in self.free_text() {
            let kind = if path.ends_with(".source") {
                TextKind::Line
            } else {
                TextKind::Free
            };
            f(path, text, kind);
        }
    }

    /// Locating details must not escape their protected fields.
    fn check_locating(&self, problems: &mut Vec<Problem>) {
        let fam = &self.family;
        let c = &self.child;
        if let (Some(a), Some(n)) = (&c.address, &fam.new_address) {
            if compact(&a.postcode) == compact(&n.postcode)
                && a.lines.first().map(|l| l.trim().to_lowercase())
                    == n.lines.first().map(|l| l.trim().to_lowercase())
            {
                problems.push(problem(
                    "child.address",
                    "is the family's new address: give it only as family.new_address, \
                     which the sharing policy protects; leave child.address out"
                        .into(),
                ));
            }
        }
        if let (Some(s), Some(n)) = (&c.school, &fam.new_school) {
            if s.name.trim().eq_ignore_ascii_case(n.name.trim()) {
                problems.push(problem(
                    "child.school",
                    "is the child's new school: give it only as family.new_school, \
                     which the sharing policy protects; leave child.school out"
                        .into(),
                ));
            }
        }
        if let (Some(g), Some(n)) = (&c.gp, &fam.gp) {
            if g.trim().eq_ignore_ascii_case(n.trim()) {
                problems.push(problem(
                    "child.gp",
                    "is the family's GP: give it only as family.gp, which the sharing \
                     policy protects; leave child.gp out"
                        .into(),
                ));
            }
        }
        if let (Some(p), Some(n)) = (&c.phone, &fam.new_phone) {
            if digits(p) == digits(n) {
                problems.push(problem(
                    "child.phone",
                    "is the family's new phone number: give it only as family.new_phone, \
                     which the sharing policy protects; leave child.phone out"
                        .into(),
                ));
            }
        }

        // Needles: (what, how to compare, value).
        let mut needles: Vec<(&str, Needle)> = Vec::new();
        if let Some(a) = &fam.new_address {
            if let Some(first) = a.lines.first() {
                needles.push(("the family's new address", Needle::words(first)));
            }
            needles.push(("the family's new postcode", Needle::compact(&a.postcode)));
        }
        if let Some(s) = &fam.new_school {
            needles.push(("the child's new school", Needle::words(&s.name)));
        }
        if let Some(gp) = &fam.gp {
            needles.push(("the family's GP", Needle::words(gp)));
        }
        if let Some(p) = &fam.new_phone {
            needles.push(("the family's new phone number", Needle::digits(p)));
        }
        for (path, text) in self.free_text() {
            for (what, needle) in &needles {
                if needle.found_in(text) {
                    problems.push(problem(
                        &path,
                        format!(
                            "mentions {what}: free text is not protected by the sharing \
                             policy, so a locating detail here could reach the area the \
                             family fled; refer to it as \"the new address\" (or similar) \
                             and keep the detail in its own field"
                        ),
                    ));
                }
            }
        }
    }

    /// A filled-in example case file in TOML, with comments saying what
    /// goes where. Every name, place and number in it is fictional.
    pub fn template() -> &'static str {
        TEMPLATE
    }
}

impl<'de> Deserialize<'de> for CaseFile {
    /// Decodes through [`CaseFile::from_json_value`], so unknown keys are
    /// refused and the result is validated.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        CaseFile::from_json_value(&value).map_err(serde::de::Error::custom)
    }
}

fn source_path(list: &str, i: usize, s: &Source) -> String {
    match s {
        Source::Given(_) => format!("{list}[{i}].source"),
        Source::Withheld(_) => format!("{list}[{i}].source_withheld_reason"),
    }
}

fn source_text(s: &Source) -> &str {
    match s {
        Source::Given(t) | Source::Withheld(t) => t,
    }
}

fn visit_address(f: &mut dyn FnMut(String, &str, TextKind), path: &str, a: &Address) {
    for (i, l) in a.lines.iter().enumerate() {
        f(format!("{path}.lines[{i}]"), l, TextKind::Line);
    }
    f(format!("{path}.town"), &a.town, TextKind::Line);
    f(format!("{path}.postcode"), &a.postcode, TextKind::Line);
}

fn visit_school(f: &mut dyn FnMut(String, &str, TextKind), path: &str, s: &School) {
    f(format!("{path}.name"), &s.name, TextKind::Line);
    f(format!("{path}.town"), &s.town, TextKind::Line);
}

fn problem(path: &str, message: String) -> Problem {
    Problem {
        path: path.to_string(),
        line: None,
        message,
    }
}

fn check_text(text: &str, kind: TextKind) -> Option<String> {
    if text.trim().is_empty() {
        return Some("must not be empty".into());
    }
    let (max, newlines) = match kind {
        TextKind::Line => (MAX_LINE_CHARS, false),
        TextKind::Free => (MAX_TEXT_CHARS, true),
    };
    if text.chars().count() > max {
        return Some(format!("is longer than {max} characters"));
    }
    let bad = |c: char| c.is_control() && !(newlines && (c == '\n' || c == '\r' || c == '\t'));
    if text.chars().any(bad) {
        return Some(if newlines {
            "must not hold control characters".into()
        } else {
            "must be one line, without control characters".into()
        });
    }
    None
}

/// Uppercase letters and digits only: `ls6 2ab` → `LS62AB`.
fn compact(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_uppercase)
        .collect()
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Lowercase words joined by single spaces: `12  Acacia Avenue,` → `12 acacia avenue`.
fn words(s: &str) -> String {
    let lower = s.to_lowercase();
    let parts: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    parts.join(" ")
}

/// A locating detail to look for in free text.
enum Needle {
    /// Whole words, compared case-insensitively (an address line, a name).
    Words(String),
    /// Letters and digits, ignoring spacing (a postcode).
    Compact(String),
    /// Digits only (a phone number).
    Digits(String),
}

impl Needle {
    fn words(s: &str) -> Needle {
        Needle::Words(words(s))
    }

    fn compact(s: &str) -> Needle {
        Needle::Compact(compact(s))
    }

    fn digits(s: &str) -> Needle {
        Needle::Digits(digits(s))
    }

    fn found_in(&self, text: &str) -> bool {
        match self {
            // Short needles would match by chance; the field itself is checked.
            Needle::Words(w) if w.len() >= 4 => {
                format!(" {} ", words(text)).contains(&format!(" {w} "))
            }
            Needle::Compact(c) if c.len() >= 5 => compact(text).contains(c.as_str()),
            Needle::Digits(d) if d.len() >= 6 => digits(text).contains(d.as_str()),
            _ => false,
        }
    }
}

// === decoding ===

/// Collects problems while decoding; decoders return `None` after
/// recording why.
#[derive(Default)]
struct Dec {
    problems: Vec<Problem>,
}

impl Dec {
    fn fail<T>(&mut self, path: &str, message: impl Into<String>) -> Option<T> {
        self.problems.push(problem(path, message.into()));
        None
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

/// A table being decoded: tracks which keys were read, so the rest can be
/// reported as unknown.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
    known: &'static [&'static str],
}

impl<'a> Obj<'a> {
    fn new(
        d: &mut Dec,
        v: &'a Value,
        path: &str,
        known: &'static [&'static str],
    ) -> Option<Obj<'a>> {
        let shown = if path.is_empty() { "(document)" } else { path };
        let Value::Object(map) = v else {
            return d.fail(shown, format!("expected a table, found {}", type_name(v)));
        };
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
                d.fail::<()>(
                    &join(path, key),
                    format!("unknown field; expected one of: {}", known.join(", ")),
                );
            }
        }
        Some(Obj {
            map,
            path: path.to_string(),
            known,
        })
    }

    fn path(&self, key: &str) -> String {
        debug_assert!(self.known.contains(&key));
        join(&self.path, key)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn req<T>(
        &self,
        d: &mut Dec,
        key: &str,
        f: impl FnOnce(&mut Dec, &'a Value, &str) -> Option<T>,
    ) -> Option<T> {
        let path = self.path(key);
        match self.get(key) {
            Some(v) => f(d, v, &path),
            None => d.fail(&path, "is required"),
        }
    }

    /// `Some(None)` when absent; `None` when present and bad.
    fn opt<T>(
        &self,
        d: &mut Dec,
        key: &str,
        f: impl FnOnce(&mut Dec, &'a Value, &str) -> Option<T>,
    ) -> Option<Option<T>> {
        let path = self.path(key);
        match self.get(key) {
            Some(v) => f(d, v, &path).map(Some),
            None => Some(None),
        }
    }

    /// An optional text: absent, or blank, is `None`.
    fn opt_text(&self, d: &mut Dec, key: &str) -> Option<Option<String>> {
        Some(self.opt(d, key, text)?.filter(|t| !t.is_empty()))
    }

    fn list<T>(
        &self,
        d: &mut Dec,
        key: &str,
        mut f: impl FnMut(&mut Dec, &'a Value, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let path = self.path(key);
        let Some(v) = self.get(key) else {
            return Some(Vec::new());
        };
        let Value::Array(items) = v else {
            return d.fail(&path, format!("expected a list, found {}", type_name(v)));
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match f(d, item, &format!("{path}[{i}]")) {
                Some(x) => out.push(x),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

fn text(d: &mut Dec, v: &Value, path: &str) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_string()),
        other => d.fail(path, format!("expected text, found {}", type_name(other))),
    }
}

fn date(d: &mut Dec, v: &Value, path: &str) -> Option<CaseDate> {
    let s = text(d, v, path)?;
    match CaseDate::parse(&s) {
        Some(date) => Some(date),
        None => d.fail(
            path,
            format!(
                "{:?} is not a calendar date written yyyy-mm-dd",
                s.chars().take(40).collect::<String>()
            ),
        ),
    }
}

fn keyword<T: Copy>(
    d: &mut Dec,
    v: &Value,
    path: &str,
    parse: fn(&str) -> Option<T>,
    all: &[&str],
) -> Option<T> {
    let s = text(d, v, path)?;
    match parse(&s) {
        Some(k) => Some(k),
        None => d.fail(path, format!("must be one of: {}", all.join(", "))),
    }
}

/// Both decoders of a table run to the end, so every problem is reported.
macro_rules! all {
    ($($e:expr),* $(,)?) => {
        ( $( $e, )* )
    };
}

fn decode_case(d: &mut Dec, v: &Value) -> Option<CaseFile> {
    const KNOWN: &[&str] = &[
        "case",
        "child",
        "family",
        "facts",
        "opinions",
        "family_views",
        "chronology",
        "actions",
        "risks",
    ];
    let o = Obj::new(d, v, "", KNOWN)?;
    let (case, child, family, facts, opinions, family_views, chronology, actions, risks) = all!(
        o.req(d, "case", decode_case_ref),
        o.req(d, "child", decode_child),
        o.opt(d, "family", decode_family),
        o.list(d, "facts", decode_fact),
        o.list(d, "opinions", decode_opinion),
        o.list(d, "family_views", decode_view),
        o.list(d, "chronology", decode_chronology),
        o.list(d, "actions", decode_action),
        o.list(d, "risks", decode_risk),
    );
    if o.get("family_views").is_none() {
        d.fail::<()>(
            "family_views",
            "is required: record the family's own views (the Charter asks for them)",
        );
    }
    Some(CaseFile {
        case: case?,
        child: child?,
        family: family?.unwrap_or_default(),
        facts: facts?,
        opinions: opinions?,
        family_views: family_views?,
        chronology: chronology?,
        actions: actions?,
        risks: risks?,
    })
}

fn decode_case_ref(d: &mut Dec, v: &Value, path: &str) -> Option<CaseRef> {
    let o = Obj::new(d, v, path, &["family_ref"])?;
    let family_ref = o.req(d, "family_ref", |d, v, p| {
        let s = text(d, v, p)?;
        match FamilyRef::new(s) {
            Some(r) => Some(r),
            None => d.fail(
                p,
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.' and '/'",
            ),
        }
    });
    Some(CaseRef {
        family_ref: family_ref?,
    })
}

fn decode_child(d: &mut Dec, v: &Value, path: &str) -> Option<Child> {
    const KNOWN: &[&str] = &[
        "name",
        "date_of_birth",
        "gender",
        "address",
        "school",
        "gp",
        "phone",
    ];
    let o = Obj::new(d, v, path, KNOWN)?;
    let (name, date_of_birth, gender, address, school, gp, phone) = all!(
        o.req(d, "name", text),
        o.req(d, "date_of_birth", date),
        o.opt_text(d, "gender"),
        o.opt(d, "address", decode_address),
        o.opt(d, "school", decode_school),
        o.opt_text(d, "gp"),
        o.opt_text(d, "phone"),
    );
    Some(Child {
        name: name?,
        date_of_birth: date_of_birth?,
        gender: gender?,
        address: address?,
        school: school?,
        gp: gp?,
        phone: phone?,
    })
}

fn decode_address(d: &mut Dec, v: &Value, path: &str) -> Option<Address> {
    let o = Obj::new(d, v, path, &["lines", "town", "postcode"])?;
    let (lines, town, postcode) = all!(
        o.req(d, "lines", |d, v, p| {
            let Value::Array(items) = v else {
                return d.fail(
                    p,
                    format!("expected a list of text, found {}", type_name(v)),
                );
            };
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                out.push(text(d, item, &format!("{p}[{i}]")));
            }
            out.into_iter().collect::<Option<Vec<String>>>()
        }),
        o.req(d, "town", text),
        o.req(d, "postcode", text),
    );
    Some(Address {
        lines: lines?,
        town: town?,
        postcode: postcode?,
    })
}

fn decode_school(d: &mut Dec, v: &Value, path: &str) -> Option<School> {
    let o = Obj::new(d, v, path, &["name", "town"])?;
    let (name, town) = all!(o.req(d, "name", text), o.req(d, "town", text));
    Some(School {
        name: name?,
        town: town?,
    })
}

fn decode_family(d: &mut Dec, v: &Value, path: &str) -> Option<Family> {
    const KNOWN: &[&str] = &[
        "carers",
        "previous_area",
        "new_address",
        "new_school",
        "gp",
        "new_phone",
    ];
    let o = Obj::new(d, v, path, KNOWN)?;
    let (carers, previous_area, new_address, new_school, gp, new_phone) = all!(
        o.list(d, "carers", decode_carer),
        o.opt(d, "previous_area", |d, v, p| {
            let s = text(d, v, p)?;
            match AreaId::new(s) {
                Ok(a) => Some(a),
                Err(e) => d.fail(p, e.to_string()),
            }
        }),
        o.opt(d, "new_address", decode_address),
        o.opt(d, "new_school", decode_school),
        o.opt_text(d, "gp"),
        o.opt_text(d, "new_phone"),
    );
    Some(Family {
        carers: carers?,
        previous_area: previous_area?,
        new_address: new_address?,
        new_school: new_school?,
        gp: gp?,
        new_phone: new_phone?,
    })
}

fn decode_carer(d: &mut Dec, v: &Value, path: &str) -> Option<Carer> {
    let o = Obj::new(d, v, path, &["name", "relationship"])?;
    let (name, relationship) = all!(o.req(d, "name", text), o.req(d, "relationship", text));
    Some(Carer {
        name: name?,
        relationship: relationship?,
    })
}

/// `source` xor `source_withheld_reason`.
fn decode_source(d: &mut Dec, o: &Obj<'_>) -> Option<Source> {
    let given = o.opt(d, "source", text)?;
    let withheld = o.opt(d, "source_withheld_reason", text)?;
    match (given, withheld) {
        (Some(s), None) => Some(Source::Given(s)),
        (None, Some(r)) => Some(Source::Withheld(r)),
        (Some(_), Some(_)) => d.fail(
            &o.path("source_withheld_reason"),
            "give either source or source_withheld_reason, not both",
        ),
        (None, None) => d.fail(
            &o.path("source"),
            "is required: give the source, or source_withheld_reason saying why it \
             is not safe to give it",
        ),
    }
}

fn decode_fact(d: &mut Dec, v: &Value, path: &str) -> Option<Fact> {
    let o = Obj::new(d, v, path, &["text", "source", "source_withheld_reason"])?;
    let (text, source) = all!(o.req(d, "text", text), decode_source(d, &o));
    Some(Fact {
        text: text?,
        source: source?,
    })
}

fn decode_opinion(d: &mut Dec, v: &Value, path: &str) -> Option<Opinion> {
    let o = Obj::new(d, v, path, &["text", "author"])?;
    let (text, author) = all!(o.req(d, "text", text), o.req(d, "author", text));
    Some(Opinion {
        text: text?,
        author: author?,
    })
}

fn decode_view(d: &mut Dec, v: &Value, path: &str) -> Option<FamilyView> {
    let o = Obj::new(d, v, path, &["by", "text"])?;
    let (by, text) = all!(o.req(d, "by", text), o.req(d, "text", text));
    Some(FamilyView {
        by: by?,
        text: text?,
    })
}

fn decode_chronology(d: &mut Dec, v: &Value, path: &str) -> Option<ChronologyEntry> {
    const KNOWN: &[&str] = &["date", "kind", "text", "source", "source_withheld_reason"];
    let o = Obj::new(d, v, path, KNOWN)?;
    let (date, kind, text, source) = all!(
        o.req(d, "date", date),
        o.req(d, "kind", |d, v, p| keyword(
            d,
            v,
            p,
            ChronologyKind::parse,
            &["concern", "indicator", "event"]
        )),
        o.req(d, "text", text),
        decode_source(d, &o),
    );
    Some(ChronologyEntry {
        date: date?,
        kind: kind?,
        text: text?,
        source: source?,
    })
}

fn decode_action(d: &mut Dec, v: &Value, path: &str) -> Option<Action> {
    let o = Obj::new(d, v, path, &["owner", "action", "due", "status"])?;
    let (owner, action, due, status) = all!(
        o.req(d, "owner", text),
        o.req(d, "action", text),
        o.req(d, "due", date),
        o.req(d, "status", |d, v, p| keyword(
            d,
            v,
            p,
            ActionStatus::parse,
            &["open", "in-progress", "done", "overdue", "cancelled"]
        )),
    );
    Some(Action {
        owner: owner?,
        action: action?,
        due: due?,
        status: status?,
    })
}

fn decode_risk(d: &mut Dec, v: &Value, path: &str) -> Option<Risk> {
    let o = Obj::new(d, v, path, &["text", "mitigation"])?;
    let (text, mitigation) = all!(o.req(d, "text", text), o.opt_text(d, "mitigation"));
    Some(Risk {
        text: text?,
        mitigation: mitigation?,
    })
}

// === template ===

const TEMPLATE: &str = r#"# Referral case file. Every name, place and number below is fictional:
# replace them with the real details. Lines starting with # are comments.
#
# Write facts as facts, each with its source (or why the source cannot be
# given safely); mark opinions as opinions; record the family's own views.
# Describe what others are doing to the child, not the child's "choices":
# the client checks the wording before anything is sent.
#
# Dates are written yyyy-mm-dd. Optional keys can be deleted.

[case]
family_ref = "SV-2025-0142"          # your area's reference for the family

[child]
name = "Amira Example"
date_of_birth = "2011-09-14"
gender = "female"                    # optional, as the child describes it
# Where the child lives, if that is NOT the family's new address (the new
# address goes only in [family.new_address], which the policy protects):
# address = { lines = ["3 Sample Row"], town = "Southvale", postcode = "SV1 2AB" }
# school = { name = "...", town = "..." }   # optional, if not the new school
# gp = "..."                                # optional, if not the family's GP
# phone = "..."                             # optional, the child's own phone

[family]
carers = [
  { name = "Sarah Example", relationship = "mother" },
]
previous_area = "southvale"          # the area the family moved from, if they moved
gp = "Riverside Medical Practice"    # locating: never sent to an area the family fled
new_phone = "07700 900123"           # locating

[family.new_address]                 # locating
lines = ["12 Example Street"]
town = "Northmoor"
postcode = "NM4 7QT"

[family.new_school]                  # locating
name = "Northmoor Academy"
town = "Northmoor"

# Facts: each needs `source`, or `source_withheld_reason` if naming the
# source would put someone at risk.
[[facts]]
text = "Amira was reported missing from home on three occasions between March and May 2025."
source = "Southvale Police missing person reports"

[[facts]]
text = "An adult unknown to the family gave Amira a mobile phone and gifts."
source_withheld_reason = "Naming the informant would put them at risk of reprisal."

# Opinions: professional judgement, marked as such, with its author.
[[opinions]]
text = "In my view Amira is being groomed by adults who use gifts and threats to control her."
author = "J. Patel, social worker, Southvale Children's Services"

# The family's own views: required. Use their words where you can.
[[family_views]]
by = "mother"
text = "Sarah says the move has helped Amira feel safer and asks to be kept informed before anyone contacts the school."

[[family_views]]
by = "Amira"
text = "Amira says she likes her new school and wants to keep in touch with her youth worker."

# Chronology of concerns, indicators and events. kind = concern | indicator | event
[[chronology]]
date = "2025-03-02"
kind = "event"
text = "Amira missing overnight; found by police in another town."
source = "Southvale Police"

[[chronology]]
date = "2025-04-18"
kind = "indicator"
text = "Unexplained new phone and clothes noticed by her mother."
source = "Sarah Example (mother)"

[[chronology]]
date = "2025-06-01"
kind = "event"
text = "Family moved out of Southvale with support from the housing team."
source = "Southvale Housing"

# Agreed actions. status = open | in-progress | done | overdue | cancelled
[[actions]]
owner = "Northmoor duty team"
action = "Allocate a social worker and visit the family within five working days."
due = "2025-06-20"
status = "open"

[[actions]]
owner = "J. Patel, Southvale Children's Services"
action = "Share police intelligence about the adults involved with Northmoor Police."
due = "2025-06-13"
status = "in-progress"

# Risks to the family from disclosure or sharing, and how they are reduced.
[[risks]]
text = "The adults exploiting Amira are looking for the family; if they learn the new address the family is at risk."
mitigation = "The new address, school, GP and phone are never sent to Southvale; contact goes through the Northmoor duty team."
"#;
