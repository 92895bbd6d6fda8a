//! Referral preparation: the worker's TOML case file in, the exact bytes to
//! encrypt out, and a preview of what the sharing policy lets through.
//!
//! Flow on the sending side:
//! 1. [`parse_case_toml`] reads the worker's file (errors name the field
//!    and the line);
//! 2. [`to_policy_fields`] flattens it into the policy's field map
//!    (`child.name`, `family.new_address`, `facts.0.text`, ...);
//! 3. `Policy::prepare` redacts it; [`preview`] shows the worker exactly
//!    what will go and what was withheld, and by which rule;
//! 4. [`disclosed_bytes`] is the canonical plaintext of the redacted
//!    content (its SHA-256, [`disclosed_hash`], is the content hash taken
//!    before encryption).
//!
//! On the receiving side, [`check_declared`] parses decrypted content and
//! refuses any field the envelope did not declare.
//!
//! # Field names
//!
//! | case file | policy field path | value |
//! |---|---|---|
//! | `case.family_ref` | `case.family_ref` | text |
//! | `child.name`, `.gender`, `.gp`, `.phone` | same | text |
//! | `child.date_of_birth` | `child.date_of_birth` | date |
//! | `child.address` | `child.address` | address |
//! | `child.school` | `child.school` | school |
//! | `family.carers[i].name`, `.relationship` | `family.carers.i.name`, ... | text |
//! | `family.previous_area`, `.gp`, `.new_phone` | same | text |
//! | `family.new_address` | `family.new_address` | address |
//! | `family.new_school` | `family.new_school` | school |
//! | `facts[i].text`, `.source` or `.source_withheld_reason` | `facts.i.text`, ... | text |
//! | `opinions[i].text`, `.author` | `opinions.i.text`, ... | text |
//! | `family_views[i].by`, `.text` | `family_views.i.by`, ... | text |
//! | `chronology[i].date` | `chronology.i.date` | date |
//! | `chronology[i].kind`, `.text`, `.source` or `.source_withheld_reason` | `chronology.i.kind`, ... | text |
//! | `actions[i].owner`, `.action`, `.status` | `actions.i.owner`, ... | text |
//! | `actions[i].due` | `actions.i.due` | date |
//! | `risks[i].text`, `.mitigation` | `risks.i.text`, ... | text |
//!
//! A policy rule listing `facts` allows every `facts.i.*` (a field path
//! covers the paths below it). The four built-in locating fields
//! (`family.new_address`, `family.new_school`, `family.gp`,
//! `family.new_phone`) are exactly the case file's locating fields; the case
//! file refuses to repeat them anywhere else (see [`proto::case`]).
//!
//! # Canonical content
//!
//! Disclosed content is a JSON object from field path to a tagged value:
//! `{"text": "..."}`, `{"date": "yyyy-mm-dd"}`,
//! `{"address": {"lines": [...], "postcode": "...", "town": "..."}}`,
//! `{"school": {"name": "...", "town": "..."}}` or `{"list": [...]}`.
//! Canonical form: object keys sorted by code point at every level, no
//! whitespace, strings escaped as `serde_json` escapes them. The receiver
//! refuses content that is not in canonical form, so one content has one
//! hash.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use policy::{AgeRoute, FieldPath, Prepared, Redaction, Verdict};
use proto::case::{Address, CaseError, CaseFile, School, Source, MAX_CASE_FILE_BYTES};
use proto::ContentHash;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

#[cfg(test)]
mod tests;

/// Why a case file or disclosed content was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReferralError {
    /// The case file is not valid; the error lists each problem with its
    /// field path and line.
    #[error(transparent)]
    Case(#[from] CaseError),
    /// A field path built from the case file was refused by the policy
    /// crate (e.g. more than 8 segments). Not expected for any valid case
    /// file; reported rather than silently dropping the field.
    #[error("cannot name field {path:?} for the policy: {why}")]
    FieldPath {
        /// The path that was built.
        path: String,
        /// Why it was refused.
        why: String,
    },
    /// A date in the case file could not be carried over to the policy.
    #[error("date {0} is not usable by the policy")]
    Date(String),
    /// Received content is not disclosed content (not JSON, or not an
    /// object of field path to tagged value).
    #[error("received content is malformed: {0}")]
    Malformed(String),
    /// Received content is well formed but not in canonical form, so its
    /// hash would not be the sender's.
    #[error("received content is not in canonical form")]
    NotCanonical,
    /// Received content holds fields the envelope did not declare.
    #[error("received content holds undeclared field(s): {}", list(.0))]
    Undeclared(Vec<FieldPath>),
}

fn list(fields: &[FieldPath]) -> String {
    let v: Vec<&str> = fields.iter().map(FieldPath::as_str).collect();
    v.join(", ")
}

// === TOML ===

/// The filled-in example case file a worker starts from (`client referral
/// template`).
pub fn template() -> &'static str {
    CaseFile::template()
}

/// Parses and validates a TOML case file. Every problem names its field
/// path (e.g. `facts[2].source`) and, where it can be found, its line.
/// Dates may be written as TOML dates (`2011-09-14`) or as strings.
pub fn parse_case_toml(text: &str) -> Result<CaseFile, ReferralError> {
    if text.len() > MAX_CASE_FILE_BYTES {
        return Err(CaseError::TooLarge {
            size: text.len(),
            limit: MAX_CASE_FILE_BYTES,
        }
        .into());
    }
    let doc = toml::de::DeTable::parse(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        CaseError::Syntax {
            format: "TOML",
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })?;
    let mut spans = BTreeMap::new();
    let value = toml_table(doc.get_ref(), "", &mut spans);
    match CaseFile::from_json_value(&value) {
        Ok(case) => Ok(case),
        Err(CaseError::Invalid(mut problems)) => {
            for p in &mut problems {
                p.line = line_of(text, &spans, &p.path);
            }
            Err(CaseError::Invalid(problems).into())
        }
        Err(e) => Err(e.into()),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Converts a parsed TOML table to a JSON value tree, recording where each
/// path starts. Paths are written as the case-file decoder writes them.
fn toml_table(
    table: &toml::de::DeTable<'_>,
    path: &str,
    spans: &mut BTreeMap<String, usize>,
) -> Json {
    let mut map = serde_json::Map::new();
    for (k, v) in table {
        let p = join(path, k.get_ref());
        spans.insert(p.clone(), k.span().start);
        let value = toml_value(v.get_ref(), &p, spans);
        map.insert(k.get_ref().to_string(), value);
    }
    Json::Object(map)
}

fn toml_value(
    value: &toml::de::DeValue<'_>,
    path: &str,
    spans: &mut BTreeMap<String, usize>,
) -> Json {
    use toml::de::DeValue;
    match value {
        DeValue::String(s) => Json::String(s.to_string()),
        // No case-file field takes a number; the decoder only needs to know
        // that one was given, to say so.
        DeValue::Integer(_) | DeValue::Float(_) => Json::from(0),
        DeValue::Boolean(b) => Json::Bool(*b),
        // A TOML local date displays as yyyy-mm-dd; anything with a time
        // does not, and the decoder refuses it as a date.
        DeValue::Datetime(d) => Json::String(d.to_string()),
        DeValue::Array(items) => Json::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let p = format!("{path}[{i}]");
                    spans.insert(p.clone(), item.span().start);
                    toml_value(item.get_ref(), &p, spans)
                })
                .collect(),
        ),
        DeValue::Table(t) => toml_table(t, path, spans),
    }
}

/// The line of `path`, or of its nearest ancestor that is in the file (a
/// missing key is reported at its table).
fn line_of(text: &str, spans: &BTreeMap<String, usize>, path: &str) -> Option<usize> {
    let mut p = path;
    loop {
        if let Some(offset) = spans.get(p) {
            return Some(line_col(text, *offset).0);
        }
        let cut = p.rfind(['.', '['])?;
        p = &p[..cut];
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

// === to the policy's field map ===

fn field(path: String) -> Result<FieldPath, ReferralError> {
    FieldPath::new(path.as_str()).map_err(|e| ReferralError::FieldPath {
        path,
        why: e.to_string(),
    })
}

fn text(s: &str) -> policy::Value {
    policy::Value::Text(s.to_string())
}

fn date(d: proto::case::CaseDate) -> Result<policy::Value, ReferralError> {
    policy::Date::new(d.year(), d.month(), d.day())
        .map(policy::Value::Date)
        .map_err(|_| ReferralError::Date(d.to_string()))
}

fn address(a: &Address) -> policy::Value {
    policy::Value::Address(policy::Address {
        lines: a.lines.clone(),
        town: a.town.clone(),
        postcode: a.postcode.clone(),
    })
}

fn school(s: &School) -> policy::Value {
    policy::Value::School(policy::School {
        name: s.name.clone(),
        town: s.town.clone(),
    })
}

fn source(prefix: &str, s: &Source) -> (String, policy::Value) {
    match s {
        Source::Given(v) => (format!("{prefix}.source"), text(v)),
        Source::Withheld(r) => (format!("{prefix}.source_withheld_reason"), text(r)),
    }
}

/// Flattens a case file into the policy's field map (names in the module
/// documentation). Every value of the case file appears exactly once.
pub fn to_policy_fields(case: &CaseFile) -> Result<policy::CaseFile, ReferralError> {
    let mut out: Vec<(String, policy::Value)> = Vec::new();
    let mut put = |path: &str, v: policy::Value| out.push((path.to_string(), v));

    put("case.family_ref", text(case.case.family_ref.as_str()));
    let c = &case.child;
    put("child.name", text(&c.name));
    put("child.date_of_birth", date(c.date_of_birth)?);
    let optional = [
        ("child.gender", &c.gender),
        ("child.gp", &c.gp),
        ("child.phone", &c.phone),
        ("family.gp", &case.family.gp),
        ("family.new_phone", &case.family.new_phone),
    ];
    for (path, v) in optional {
        if let Some(v) = v {
            put(path, text(v));
        }
    }
    if let Some(a) = &c.address {
        put("child.address", address(a));
    }
    if let Some(s) = &c.school {
        put("child.school", school(s));
    }
    let f = &case.family;
    for (i, carer) in f.carers.iter().enumerate() {
        put(&format!("family.carers.{i}.name"), text(&carer.name));
        put(
            &format!("family.carers.{i}.relationship"),
            text(&carer.relationship),
        );
    }
    if let Some(a) = &f.previous_area {
        put("family.previous_area", text(a.as_str()));
    }
    if let Some(a) = &f.new_address {
        put("family.new_address", address(a));
    }
    if let Some(s) = &f.new_school {
        put("family.new_school", school(s));
    }
    for (i, fact) in case.facts.iter().enumerate() {
        put(&format!("facts.{i}.text"), text(&fact.text));
        let (p, v) = source(&format!("facts.{i}"), &fact.source);
        put(&p, v);
    }
    for (i, o) in case.opinions.iter().enumerate() {
        put(&format!("opinions.{i}.text"), text(&o.text));
        put(&format!("opinions.{i}.author"), text(&o.author));
    }
    for (i, v) in case.family_views.iter().enumerate() {
        put(&format!("family_views.{i}.by"), text(&v.by));
        put(&format!("family_views.{i}.text"), text(&v.text));
    }
    for (i, e) in case.chronology.iter().enumerate() {
        put(&format!("chronology.{i}.date"), date(e.date)?);
        put(&format!("chronology.{i}.kind"), text(e.kind.as_str()));
        put(&format!("chronology.{i}.text"), text(&e.text));
        let (p, v) = source(&format!("chronology.{i}"), &e.source);
        put(&p, v);
    }
    for (i, a) in case.actions.iter().enumerate() {
        put(&format!("actions.{i}.owner"), text(&a.owner));
        put(&format!("actions.{i}.action"), text(&a.action));
        put(&format!("actions.{i}.due"), date(a.due)?);
        put(&format!("actions.{i}.status"), text(a.status.as_str()));
    }
    for (i, r) in case.risks.iter().enumerate() {
        put(&format!("risks.{i}.text"), text(&r.text));
        if let Some(m) = &r.mitigation {
            put(&format!("risks.{i}.mitigation"), text(m));
        }
    }
    out.into_iter().map(|(p, v)| Ok((field(p)?, v))).collect()
}

// === disclosed content ===

/// One disclosed value, as it travels (serialisable form of
/// [`policy::Value`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DisclosedValue {
    /// Text (including redacted forms such as `aged 13-15` or
    /// `[withheld: ...]`).
    Text(String),
    /// A date.
    Date(policy::Date),
    /// An address.
    Address {
        /// Street lines.
        lines: Vec<String>,
        /// Town.
        town: String,
        /// Postcode.
        postcode: String,
    },
    /// A school.
    School {
        /// Name.
        name: String,
        /// Town.
        town: String,
    },
    /// Several values.
    List(Vec<DisclosedValue>),
}

impl DisclosedValue {
    fn from_policy(v: &policy::Value) -> DisclosedValue {
        match v {
            policy::Value::Text(t) => DisclosedValue::Text(t.clone()),
            policy::Value::Date(d) => DisclosedValue::Date(*d),
            policy::Value::Address(a) => DisclosedValue::Address {
                lines: a.lines.clone(),
                town: a.town.clone(),
                postcode: a.postcode.clone(),
            },
            policy::Value::School(s) => DisclosedValue::School {
                name: s.name.clone(),
                town: s.town.clone(),
            },
            policy::Value::List(items) => {
                DisclosedValue::List(items.iter().map(DisclosedValue::from_policy).collect())
            }
        }
    }

    fn to_policy(&self) -> policy::Value {
        match self {
            DisclosedValue::Text(t) => policy::Value::Text(t.clone()),
            DisclosedValue::Date(d) => policy::Value::Date(*d),
            DisclosedValue::Address {
                lines,
                town,
                postcode,
            } => policy::Value::Address(policy::Address {
                lines: lines.clone(),
                town: town.clone(),
                postcode: postcode.clone(),
            }),
            DisclosedValue::School { name, town } => policy::Value::School(policy::School {
                name: name.clone(),
                town: town.clone(),
            }),
            DisclosedValue::List(items) => {
                policy::Value::List(items.iter().map(DisclosedValue::to_policy).collect())
            }
        }
    }

    /// The value for people: text as is, an address on one line.
    pub fn display(&self) -> String {
        match self {
            DisclosedValue::Text(t) => t.clone(),
            DisclosedValue::Date(d) => d.to_string(),
            DisclosedValue::Address {
                lines,
                town,
                postcode,
            } => {
                let mut parts = lines.clone();
                parts.push(town.clone());
                parts.push(postcode.clone());
                parts.join(", ")
            }
            DisclosedValue::School { name, town } => format!("{name}, {town}"),
            DisclosedValue::List(items) => {
                let v: Vec<String> = items.iter().map(DisclosedValue::display).collect();
                v.join("; ")
            }
        }
    }
}

/// Disclosed content: field path to value. What the sender encrypts and the
/// receiver decrypts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disclosed {
    /// The fields.
    pub fields: BTreeMap<FieldPath, DisclosedValue>,
}

impl Disclosed {
    /// Back to the policy's field map.
    pub fn to_policy_fields(&self) -> policy::CaseFile {
        self.fields
            .iter()
            .map(|(k, v)| (k.clone(), v.to_policy()))
            .collect()
    }

    /// The canonical bytes (see the module documentation).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::new();
        out.push('{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_canonical(&Json::String(k.as_str().to_string()), &mut out);
            out.push(':');
            // A DisclosedValue always serialises (strings, a date, lists).
            let json = serde_json::to_value(v).unwrap_or(Json::Null);
            write_canonical(&json, &mut out);
        }
        out.push('}');
        out.into_bytes()
    }

    /// Parses canonical bytes. Refuses anything else: bad JSON, a key that
    /// is not a field path, an unknown value tag, or a non-canonical form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Disclosed, ReferralError> {
        let raw: BTreeMap<String, DisclosedValue> =
            serde_json::from_slice(bytes).map_err(|e| ReferralError::Malformed(e.to_string()))?;
        let mut fields = BTreeMap::new();
        for (k, v) in raw {
            let key = FieldPath::new(k.as_str())
                .map_err(|e| ReferralError::Malformed(format!("key {k:?}: {e}")))?;
            fields.insert(key, v);
        }
        let d = Disclosed { fields };
        if d.to_bytes() != bytes {
            return Err(ReferralError::NotCanonical);
        }
        Ok(d)
    }

    /// Every field for people, one per line, in case-file order (`facts.2`
    /// before `facts.10`).
    pub fn render(&self) -> String {
        let mut fields: Vec<(&FieldPath, &DisclosedValue)> = self.fields.iter().collect();
        fields.sort_by(|a, b| natural(a.0.as_str(), b.0.as_str()));
        let mut out = String::new();
        for (k, v) in fields {
            let _ = writeln!(out, "  {k}: {}", indent(&v.display()));
        }
        out
    }
}

fn write_canonical(v: &Json, out: &mut String) {
    match v {
        Json::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Json::String(k.clone()).to_string());
                out.push(':');
                if let Some(x) = m.get(k) {
                    write_canonical(x, out);
                }
            }
            out.push('}');
        }
        Json::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The serialisable form of redacted content.
pub fn from_policy_fields(content: &policy::CaseFile) -> Disclosed {
    Disclosed {
        fields: content
            .iter()
            .map(|(k, v)| (k.clone(), DisclosedValue::from_policy(v)))
            .collect(),
    }
}

/// The canonical bytes of redacted content: what the sender encrypts.
pub fn disclosed_bytes(content: &policy::CaseFile) -> Vec<u8> {
    from_policy_fields(content).to_bytes()
}

/// SHA-256 of [`disclosed_bytes`]: the content hash before encryption.
pub fn disclosed_hash(content: &policy::CaseFile) -> ContentHash {
    ContentHash(Sha256::digest(disclosed_bytes(content)).into())
}

/// Receiving side: parses decrypted content and checks that every field in
/// it is covered by a field the envelope declared (`facts` covers
/// `facts.0.text`). Refuses malformed or non-canonical content, and lists
/// every undeclared field.
pub fn check_declared(content: &[u8], declared: &[FieldPath]) -> Result<Disclosed, ReferralError> {
    let d = Disclosed::from_bytes(content)?;
    let undeclared: Vec<FieldPath> = d
        .fields
        .keys()
        .filter(|k| !declared.iter().any(|f| f.covers(k)))
        .cloned()
        .collect();
    if !undeclared.is_empty() {
        return Err(ReferralError::Undeclared(undeclared));
    }
    Ok(d)
}

// === preview ===

/// Compares field paths with numeric segments as numbers.
fn natural(a: &str, b: &str) -> Ordering {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) => {
                let o = match (p.parse::<u64>(), q.parse::<u64>()) {
                    (Ok(m), Ok(n)) => m.cmp(&n),
                    _ => p.cmp(q),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

fn indent(s: &str) -> String {
    s.replace('\n', "\n      ")
}

/// What the worker sees before sending: the decision and its rule, exactly
/// what will be disclosed (each field and its value after redaction), and
/// every field that was redacted or withheld, with the operation and the
/// rule (or built-in rule) that did it.
pub fn preview(p: &Prepared) -> String {
    let mut out = String::new();
    let d = &p.decision;
    let rule = d
        .rule
        .as_ref()
        .map(|r| format!("rule {r}"))
        .unwrap_or_else(|| "no rule".into());
    match d.verdict {
        Verdict::Allow => {
            let _ = writeln!(out, "Decision: ALLOWED by {rule}.");
        }
        Verdict::Deny(kind) => {
            let _ = writeln!(
                out,
                "Decision: REFUSED ({kind:?}) by {rule}. Nothing will be sent."
            );
        }
    }
    let _ = writeln!(out, "  {}", indent(&d.reason));
    if let Some(basis) = &d.legal_basis {
        let _ = writeln!(out, "  Legal basis: {basis}");
    }
    match &p.age_route {
        Some(AgeRoute::Child {
            age,
            turns_18_on,
            turning_18_soon,
            ..
        }) => {
            let _ = write!(out, "Age: {age}; turns 18 on {turns_18_on}");
            if *turning_18_soon {
                out.push_str(" (soon: plan the transition to adult services)");
            }
            out.push('\n');
        }
        Some(AgeRoute::Adult {
            age,
            adult_services,
        }) => {
            let _ = writeln!(
                out,
                "Age: {age}: an adult; the policy routes adults to {adult_services}"
            );
        }
        None => {}
    }

    let changed: BTreeMap<&FieldPath, &policy::RedactionRecord> =
        p.report.iter().map(|r| (&r.field, r)).collect();
    let mut sent: Vec<(&FieldPath, &policy::Value)> = p.content.iter().collect();
    sent.sort_by(|a, b| natural(a.0.as_str(), b.0.as_str()));
    let _ = writeln!(out, "\nWill be disclosed ({} fields):", sent.len());
    if sent.is_empty() {
        out.push_str("  (nothing)\n");
    }
    for (k, v) in sent {
        let shown = DisclosedValue::from_policy(v).display();
        let _ = write!(out, "  {k}: {}", indent(&shown));
        if let Some(r) = changed.get(k) {
            let _ = write!(out, "    [{} by {}]", r.op, r.because);
        }
        out.push('\n');
    }

    let mut withheld: Vec<&policy::RedactionRecord> = p.report.iter().collect();
    withheld.sort_by(|a, b| natural(a.field.as_str(), b.field.as_str()));
    let _ = writeln!(out, "\nRedacted or withheld ({} fields):", withheld.len());
    if withheld.is_empty() {
        out.push_str("  (nothing)\n");
    }
    for r in withheld {
        let what = match &r.op {
            Redaction::Drop => "not sent".to_string(),
            op => format!("sent as {op}"),
        };
        let _ = write!(out, "  {}: {what}: {}", r.field, r.because);
        if let Some(note) = &r.note {
            let _ = write!(out, " ({note})");
        }
        out.push('\n');
    }
    out
}
