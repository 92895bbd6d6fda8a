//! The policy model and its TOML parser.

use std::collections::BTreeMap;
use std::ops::Range;

use proto::{AreaId, Category, Recipient, TeamId};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::names::{FieldPath, Organisation, PolicyId, Purpose, Role, RuleName, Selector};
use crate::{PolicyError, Redaction};

/// Fields that locate a family, in every policy whatever it lists: they never
/// go to an area the family fled.
pub const BUILTIN_LOCATING_FIELDS: [&str; 4] = [
    "family.new_address",
    "family.new_school",
    "family.gp",
    "family.new_phone",
];

const DEFAULT_NOTICE_DAYS: u32 = 90;
const DEFAULT_AGE_BANDS: [u8; 6] = [0, 5, 10, 13, 16, 18];

/// A parsed, checked sharing policy. Built only by [`Policy::parse`] (or
/// [`crate::SignedPolicy::verify`]), so every value of this type is well formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub(crate) id: PolicyId,
    pub(crate) description: Option<String>,
    pub(crate) area: AreaId,
    pub(crate) version: u32,
    pub(crate) adult_services: Recipient,
    pub(crate) turning_18_notice_days: u32,
    pub(crate) age_bands: Vec<u8>,
    pub(crate) locating_fields: Vec<FieldPath>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) digest: [u8; 32],
}

/// One rule: who may send what to whom, why, and how it is redacted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rule {
    /// Unique within the policy; decisions cite it.
    pub name: RuleName,
    /// Free text for people reading the policy.
    pub description: Option<String>,
    /// The legal basis for the disclosure, as written in the policy.
    pub legal_basis: String,
    /// Message categories the rule covers.
    pub categories: Vec<Category>,
    /// Purposes the rule covers.
    pub purposes: Vec<Purpose>,
    /// Fields (and everything below them) that may be disclosed.
    pub fields: Vec<FieldPath>,
    /// Who may send.
    pub from: SenderSide,
    /// Who may receive.
    pub to: RecipientSide,
    /// Redactions the sender must apply.
    pub redact: Vec<FieldRedaction>,
}

/// The sender selectors of a rule. `None` matches anything.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SenderSide {
    /// The sender's area (from the certificate).
    pub areas: Vec<Selector<AreaId>>,
    /// The sender's organisation (from the directory).
    pub organisations: Option<Vec<Selector<Organisation>>>,
    /// The sender's role (from the directory).
    pub roles: Option<Vec<Selector<Role>>>,
}

/// The recipient selectors of a rule. `None` matches anything.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecipientSide {
    /// The recipient's area.
    pub areas: Vec<Selector<AreaId>>,
    /// The recipient's organisation.
    pub organisations: Option<Vec<Selector<Organisation>>>,
    /// The recipient's role.
    pub roles: Option<Vec<Selector<Role>>>,
    /// The recipient team; when present, user recipients never match.
    pub teams: Option<Vec<Selector<TeamId>>>,
}

/// A redaction a rule requires on a field (and everything below it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRedaction {
    /// The field.
    pub field: FieldPath,
    /// What to do to it.
    pub op: Redaction,
}

// === impl Policy ===

impl Policy {
    /// Parses and checks policy text. Errors name the line, column and key.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let raw: RawDoc = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            error_at(text, span, e.message())
        })?;
        raw.check(text)
    }

    /// The policy id.
    pub fn id(&self) -> &PolicyId {
        &self.id
    }

    /// The policy's free-text description, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The owning area, which signs the policy.
    pub fn area(&self) -> &AreaId {
        &self.area
    }

    /// The version; messages must cite exactly this one.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Where a young person of 18 or over is routed.
    pub fn adult_services(&self) -> &Recipient {
        &self.adult_services
    }

    /// How many days before an 18th birthday [`crate::AgeRoute`] warns.
    pub fn turning_18_notice_days(&self) -> u32 {
        self.turning_18_notice_days
    }

    /// The lower bounds of the age bands, strictly increasing from 0.
    pub fn age_bands(&self) -> &[u8] {
        &self.age_bands
    }

    /// Every locating field: the built-in ones, then those the policy adds.
    pub fn locating_fields(&self) -> &[FieldPath] {
        &self.locating_fields
    }

    /// The rules, in the order they are tried.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// SHA-256 of the exact policy text, hex: what a disclosure log records.
    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest)
    }

    /// Whether `field` shares content with a locating field.
    pub fn is_locating(&self, field: &FieldPath) -> bool {
        self.locating_fields.iter().any(|l| l.overlaps(field))
    }
}

// === raw TOML ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDoc {
    policy: RawHeader,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    id: PolicyId,
    area: AreaId,
    version: Spanned<i64>,
    adult_services: Recipient,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    turning_18_notice_days: Option<Spanned<i64>>,
    #[serde(default)]
    age_bands: Option<Spanned<Vec<i64>>>,
    #[serde(default)]
    locating_fields: Vec<FieldPath>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<RuleName>,
    #[serde(default)]
    description: Option<String>,
    legal_basis: Spanned<String>,
    categories: Spanned<Vec<Category>>,
    purposes: Spanned<Vec<Purpose>>,
    fields: Spanned<Vec<FieldPath>>,
    from: RawFrom,
    to: RawTo,
    #[serde(default)]
    redact: Vec<RawRedaction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    areas: Spanned<Vec<Selector<AreaId>>>,
    organisations: Option<Spanned<Vec<Selector<Organisation>>>>,
    roles: Option<Spanned<Vec<Selector<Role>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    areas: Spanned<Vec<Selector<AreaId>>>,
    organisations: Option<Spanned<Vec<Selector<Organisation>>>>,
    roles: Option<Spanned<Vec<Selector<Role>>>>,
    teams: Option<Spanned<Vec<Selector<TeamId>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedaction {
    field: Spanned<FieldPath>,
    op: Spanned<OpName>,
    #[serde(default)]
    reason: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum OpName {
    Drop,
    Town,
    PostcodeDistrict,
    Age,
    AgeBand,
    SchoolTown,
    Placeholder,
}

fn nonempty<T>(text: &str, v: Spanned<Vec<T>>) -> Result<Vec<T>, PolicyError> {
    if v.get_ref().is_empty() {
        return Err(error_at(text, v.span(), "must not be empty"));
    }
    Ok(v.into_inner())
}

fn opt_nonempty<T>(text: &str, v: Option<Spanned<Vec<T>>>) -> Result<Option<Vec<T>>, PolicyError> {
    v.map(|v| nonempty(text, v)).transpose()
}

/// Checks free text that ends up in reasons and placeholders.
fn plain_text(text: &str, v: &Spanned<String>, max: usize) -> Result<(), PolicyError> {
    let s = v.get_ref();
    if s.trim().is_empty() {
        return Err(error_at(text, v.span(), "must not be empty"));
    }
    if s.chars().count() > max {
        return Err(error_at(
            text,
            v.span(),
            &format!("is longer than {max} characters"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(error_at(text, v.span(), "must not hold control characters"));
    }
    Ok(())
}

impl RawDoc {
    fn check(self, text: &str) -> Result<Policy, PolicyError> {
        let h = self.policy;
        let version = u32::try_from(*h.version.get_ref())
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| error_at(text, h.version.span(), "must be a whole number from 1"))?;
        let turning_18_notice_days = match h.turning_18_notice_days {
            None => DEFAULT_NOTICE_DAYS,
            Some(d) => u32::try_from(*d.get_ref())
                .ok()
                .filter(|d| *d <= 366)
                .ok_or_else(|| error_at(text, d.span(), "must be 0 to 366 days"))?,
        };
        let age_bands = match h.age_bands {
            None => DEFAULT_AGE_BANDS.to_vec(),
            Some(b) => {
                let bad = || {
                    error_at(
                        text,
                        b.span(),
                        "must be strictly increasing ages from 0 to 150, starting at 0",
                    )
                };
                let bands: Vec<u8> = b
                    .get_ref()
                    .iter()
                    .map(|n| u8::try_from(*n).ok().filter(|n| *n <= 150))
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?;
                if bands.first() != Some(&0) || bands.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(bad());
                }
                bands
            }
        };
        let mut locating_fields = Vec::new();
        for f in BUILTIN_LOCATING_FIELDS {
            locating_fields.push(FieldPath::known(f));
        }
        for f in h.locating_fields {
            if !locating_fields.contains(&f) {
                locating_fields.push(f);
            }
        }

        let mut seen: BTreeMap<RuleName, ()> = BTreeMap::new();
        let mut rules = Vec::with_capacity(self.rule.len());
        for r in self.rule {
            if seen.insert(r.name.get_ref().clone(), ()).is_some() {
                return Err(error_at(text, r.name.span(), "duplicate rule name"));
            }
            plain_text(text, &r.legal_basis, 500)?;
            let fields = nonempty(text, r.fields)?;
            let mut redact = Vec::with_capacity(r.redact.len());
            for x in r.redact {
                let field = x.field.get_ref().clone();
                if !fields.iter().any(|f| f.covers(&field)) {
                    return Err(error_at(
                        text,
                        x.field.span(),
                        &format!("rule does not allow field {field}, so cannot redact it"),
                    ));
                }
                let op = match (*x.op.get_ref(), x.reason) {
                    (OpName::Placeholder, Some(reason)) => {
                        plain_text(text, &reason, 80)?;
                        if reason.get_ref().contains(['[', ']']) {
                            return Err(error_at(text, reason.span(), "must not hold '[' or ']'"));
                        }
                        Redaction::Placeholder(reason.into_inner())
                    }
                    (OpName::Placeholder, None) => {
                        return Err(error_at(text, x.op.span(), "placeholder needs a reason"))
                    }
                    (_, Some(reason)) => {
                        return Err(error_at(
                            text,
                            reason.span(),
                            "only a placeholder takes a reason",
                        ))
                    }
                    (OpName::Drop, None) => Redaction::Drop,
                    (OpName::Town, None) => Redaction::Town,
                    (OpName::PostcodeDistrict, None) => Redaction::PostcodeDistrict,
                    (OpName::Age, None) => Redaction::Age,
                    (OpName::AgeBand, None) => Redaction::AgeBand,
                    (OpName::SchoolTown, None) => Redaction::SchoolTown,
                };
                redact.push(FieldRedaction { field, op });
            }
            rules.push(Rule {
                name: r.name.into_inner(),
                description: r.description,
                legal_basis: r.legal_basis.into_inner(),
                categories: nonempty(text, r.categories)?,
                purposes: nonempty(text, r.purposes)?,
                fields,
                from: SenderSide {
                    areas: nonempty(text, r.from.areas)?,
                    organisations: opt_nonempty(text, r.from.organisations)?,
                    roles: opt_nonempty(text, r.from.roles)?,
                },
                to: RecipientSide {
                    areas: nonempty(text, r.to.areas)?,
                    organisations: opt_nonempty(text, r.to.organisations)?,
                    roles: opt_nonempty(text, r.to.roles)?,
                    teams: opt_nonempty(text, r.to.teams)?,
                },
                redact,
            });
        }
        Ok(Policy {
            id: h.id,
            description: h.description,
            area: h.area,
            version,
            adult_services: h.adult_services,
            turning_18_notice_days,
            age_bands,
            locating_fields,
            rules,
            digest: Sha256::digest(text.as_bytes()).into(),
        })
    }
}

// === error positions ===

/// Builds a parse error for the text at `span`: line, column and key path.
fn error_at(text: &str, span: Range<usize>, message: &str) -> PolicyError {
    let start = floor_char_boundary(text, span.start.min(text.len()));
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..start].chars().count() + 1;
    let end = floor_char_boundary(text, span.end.clamp(start, text.len()));
    PolicyError::Parse {
        line,
        column,
        key: key_path(text, start, &text[start..end]),
        message: message.trim().to_string(),
    }
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Best-effort key path of the text at byte `start`: the enclosing table
/// header (with `[n]` for arrays of tables, counted from 0), the key of the
/// line (or of the line that opened a multi-line value), and the key inside
/// an inline table, if any. This reads the text line by line rather than
/// re-parsing TOML, so exotic layouts (quoted or dotted keys split over
/// lines) may give a shorter path; the line and column are always exact.
fn key_path(text: &str, start: usize, spanned: &str) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut table = String::new();
    let mut outer: Option<String> = None;
    let mut prefix = "";
    let mut offset = 0;
    let mut on_header = false;
    for line in text.split_inclusive('\n') {
        let line_end = offset + line.len();
        let trimmed = line.trim();
        on_header = false;
        if let Some(h) = trimmed.strip_prefix("[[") {
            let name = h.split("]]").next().unwrap_or("").trim().to_string();
            *counts.entry(name.clone()).or_insert(0) += 1;
            table = indexed(&name, &counts);
            outer = None;
            on_header = true;
        } else if let Some(name) = table_header(trimmed) {
            table = indexed(&name, &counts);
            outer = None;
            on_header = true;
        } else if let Some(k) = leading_key(trimmed) {
            outer = Some(k);
        }
        if start < line_end || line_end == text.len() {
            prefix = line.get(..start.saturating_sub(offset)).unwrap_or("");
            break;
        }
        offset = line_end;
    }
    let mut parts: Vec<String> = Vec::new();
    if !table.is_empty() {
        parts.push(table);
    }
    if !on_header {
        if let Some(o) = outer {
            parts.push(o);
        }
        // Inside an inline table: the key being defined or valued.
        if let Some(brace) = prefix.rfind('{') {
            let inside = &prefix[brace + 1..];
            let spanned_key: String = spanned.chars().take_while(|c| is_key_char(*c)).collect();
            let inner = if !spanned_key.is_empty() && spanned_key.len() == spanned.trim_end().len()
            {
                Some(spanned_key)
            } else {
                inside.rsplit_once('=').map(|(k, _)| last_key(k))
            };
            if let Some(inner) = inner.filter(|k| !k.is_empty()) {
                parts.push(inner);
            }
        }
    }
    if parts.is_empty() {
        "(document)".to_string()
    } else {
        parts.join(".")
    }
}

/// The name in a `[name]` line (not an array value that starts a line).
fn table_header(line: &str) -> Option<String> {
    let inner = line.strip_prefix('[')?;
    let (name, rest) = inner.split_once(']')?;
    let rest = rest.trim_start();
    let name_ok =
        !name.trim().is_empty() && name.chars().all(|c| is_key_char(c) || c == '.' || c == ' ');
    (name_ok && (rest.is_empty() || rest.starts_with('#'))).then(|| name.trim().to_string())
}

/// The key of a `key = value` line.
fn leading_key(line: &str) -> Option<String> {
    let (k, _) = line.split_once('=')?;
    let k = k.trim();
    (!k.is_empty() && k.chars().all(|c| is_key_char(c) || c == '.')).then(|| k.to_string())
}

/// The last key-like word of `s`: `"x", op ` → `op`.
fn last_key(s: &str) -> String {
    let word: Vec<char> = s
        .trim_end()
        .chars()
        .rev()
        .take_while(|c| is_key_char(*c))
        .collect();
    word.into_iter().rev().collect()
}

/// `a.b.c` with `[n]` after every prefix that is an array of tables.
fn indexed(name: &str, counts: &BTreeMap<String, usize>) -> String {
    let mut prefix = String::new();
    let mut out = String::new();
    for seg in name.split('.') {
        let seg = seg.trim();
        if !prefix.is_empty() {
            prefix.push('.');
            out.push('.');
        }
        prefix.push_str(seg);
        out.push_str(seg);
        if let Some(n) = counts.get(&prefix) {
            out.push_str(&format!("[{}]", n.saturating_sub(1)));
        }
    }
    out
}
