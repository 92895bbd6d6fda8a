//! The language check: flags victim-blaming and derogatory wording in the
//! free text of a case file, with a suggestion, and refuses to let a
//! referral go until each finding is rephrased or explicitly confirmed with
//! a reason (which is recorded).
//!
//! The Commitment to Family Friendly Practice asks workers to document
//! "avoiding victim blaming and derogatory language" and to "recognise that
//! exploited children are subject to controlling pressures placed on them
//! by their abusers which may impact their ability to exercise 'choice'".
//!
//! # Matching
//!
//! A phrase is a sequence of words; braces list alternatives for one place,
//! each of one or more words: `{put|puts|putting} {herself|himself} at risk`,
//! `{hard to reach|non-engaging}`. Matching is
//! case-insensitive and word-boundary aware: words are runs of letters,
//! digits and apostrophes, so `streetwise` does not match `streetwiser`
//! (a possessive `'s` is allowed: `boyfriend` matches `boyfriend's`),
//! `street wise` matches `street-wise` and `Street  Wise`, and `boyfriend`
//! does not match `boyfriends` unless listed. Areas add phrases (with
//! suggestions) in configuration: [`Lint::new`].
//!
//! # `consented` and `consensual`
//!
//! These are flagged everywhere, also when they are about the family's
//! agreement to sharing ("the family consented to this referral"): a
//! wordlist cannot tell whom the consent is about, and a child cannot
//! consent to their own exploitation. The suggestion says so, and offers
//! "agreed" for agreement to sharing or to a plan. The bare noun `consent`
//! ("with the family's consent") is not flagged.

use std::fmt;

use proto::case::CaseFile;
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// Why a lint could not be built or a referral may not go yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LintError {
    /// A configured phrase has no words, or unbalanced braces.
    #[error("language check phrase {phrase:?}: {why}")]
    BadPhrase {
        /// The phrase as configured.
        phrase: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A configured phrase has an empty suggestion.
    #[error("language check phrase {0:?} has no suggestion")]
    NoSuggestion(String),
    /// Findings are neither rephrased nor confirmed.
    #[error("{} wording finding(s) not resolved: rephrase, or confirm each with a reason:\n{}",
        .0.len(), list(.0))]
    Unresolved(Vec<Finding>),
    /// A confirmation has an empty reason.
    #[error(
        "confirmation of {0:?} has no reason: a confirmation must say why the wording is kept"
    )]
    EmptyReason(String),
    /// A confirmation matches no finding (a mistyped index or phrase).
    #[error("confirmation of {0:?} matches no finding")]
    NoSuchFinding(String),
}

fn list(findings: &[Finding]) -> String {
    let v: Vec<String> = findings.iter().map(|f| format!("  {f}")).collect();
    v.join("\n")
}

/// One flagged phrase in one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The field, e.g. `facts[2].text`.
    pub field_path: String,
    /// The phrase as written in the text, e.g. `Putting herself at risk`.
    pub phrase: String,
    /// The listed phrase it matched, e.g. `{put|puts|putting} {herself|...} at risk`.
    pub pattern: String,
    /// What to write instead, and why.
    pub suggestion: String,
    /// The phrase in context, with `…` where the text is cut.
    pub excerpt: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: \"{}\" in \"{}\": {}",
            self.field_path, self.phrase, self.excerpt, self.suggestion
        )
    }
}

/// Which finding(s) a confirmation is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmTarget {
    /// The finding at this index of the list [`Lint::check`] returned.
    Index(usize),
    /// Every finding whose phrase as written or whose listed pattern is
    /// this (case-insensitive), e.g. `boyfriend`.
    Phrase(String),
}

impl fmt::Display for ConfirmTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfirmTarget::Index(i) => write!(f, "finding {i}"),
            ConfirmTarget::Phrase(p) => write!(f, "phrase {p:?}"),
        }
    }
}

/// A worker's decision to keep flagged wording, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The finding(s).
    pub target: ConfirmTarget,
    /// Why the wording is kept (e.g. "the child's own words, quoted").
    pub reason: String,
}

/// A finding the worker confirmed: kept in the sending record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedConfirmation {
    /// The finding.
    pub finding: Finding,
    /// The worker's reason.
    pub reason: String,
}

/// One group of a phrase: its alternatives, each a sequence of lowercase
/// words (a bare word is a group with one one-word alternative).
type Group = Vec<Vec<String>>;

#[derive(Debug, Clone)]
struct Phrase {
    pattern: String,
    groups: Vec<Group>,
    suggestion: String,
}

/// The language check: the built-in phrases and the area's own.
#[derive(Debug, Clone)]
pub struct Lint {
    phrases: Vec<Phrase>,
}

/// The built-in phrases and suggestions. Each suggestion names what to
/// write instead; most ask the worker to describe what is being done to
/// the child, and by whom.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "{put|puts|putting|place|places|placed|placing} {herself|himself|themselves|themself} {at|in} {risk|danger}",
        "Say who is creating the risk: \"is being put at risk by …\" or \"is at risk of \
         exploitation from …\". Exploited children are controlled by their abusers; the risk is \
         not of their making.",
    ),
    (
        "lifestyle {choice|choices}",
        "Exploitation is not a choice: describe what is happening, e.g. \"is being exploited / \
         coerced into … by …\".",
    ),
    (
        "promiscuous",
        "Describe the abuse: \"is being sexually exploited\" or \"is being sexually abused by …\".",
    ),
    (
        "{sleeps|sleeping|slept} around",
        "Describe the abuse: \"is being sexually exploited\" or \"is being sexually abused by …\".",
    ),
    (
        "{consented|consenting|consensual}",
        "A child cannot consent to their own exploitation: describe the abuse (\"was coerced / \
         groomed into …\"). If this is about agreement to sharing or to a plan, write \"agreed\" \
         instead.",
    ),
    (
        "{streetwise|street wise}",
        "Describe the risk, not a trait: \"is being exploited and may not recognise the danger\", \
         \"has been exposed to …\".",
    ),
    (
        "{associating|associates} with",
        "Name what the adults are doing: \"is being targeted / groomed / exploited by …\".",
    ),
    (
        "sexually active",
        "A child who is being abused is not \"sexually active\": \"is being sexually exploited / \
         abused\".",
    ),
    (
        "{prostitute|prostitutes|prostitution|prostituting|prostituted}",
        "Children are not prostitutes: \"is a victim of child sexual exploitation\", \"is being \
         sexually exploited\".",
    ),
    (
        "{boyfriend|boyfriends}",
        "If he is an adult, or is exploiting the child, do not call him a boyfriend: \"an adult \
         who is exploiting her\", \"the alleged perpetrator\". Quote the child's own word only as \
         a quotation.",
    ),
    (
        "{risk-taking|risk taking} {behaviour|behaviours|behavior|behaviors}",
        "Describe the risk others pose: \"is being exposed to risk by …\".",
    ),
    (
        "{drug|drugs} {runner|runners|mule|mules|dealer|dealers}",
        "Describe the exploitation: \"is being criminally exploited (e.g. through county lines) \
         by …\".",
    ),
    (
        "{abscond|absconds|absconded|absconding}",
        "\"Absconding\" is language for offenders: \"went missing from …\", \"was missing from \
         home\".",
    ),
    (
        "{willing|willingly} {participant|participants|participated|went|took part}",
        "Exploited children are controlled by their abusers: describe the control (\"was \
         coerced / groomed into …\").",
    ),
    (
        "{attention seeking|attention-seeking}",
        "Derogatory: describe the behaviour and what it may be communicating, e.g. \"is \
         showing distress by …\".",
    ),
    (
        "{hard to reach|non-engaging}",
        "Describe what was tried and the barriers the family faced (fear of the exploiters, \
         practical barriers), not a label.",
    ),
];

impl Lint {
    /// The built-in phrases ([`BUILTIN`]) plus the area's own, each a
    /// `(phrase, suggestion)` pair in the syntax the module documents.
    pub fn new(extra_phrases: &[(String, String)]) -> Result<Lint, LintError> {
        let mut phrases = Vec::with_capacity(BUILTIN.len() + extra_phrases.len());
        for (p, s) in BUILTIN {
            phrases.push(Phrase::parse(p, s)?);
        }
        for (p, s) in extra_phrases {
            phrases.push(Phrase::parse(p, s)?);
        }
        Ok(Lint { phrases })
    }

    /// Every flagged phrase in every free-text field of `case`
    /// ([`CaseFile::free_text`]), in field order then text order.
    pub fn check(&self, case: &CaseFile) -> Vec<Finding> {
        let mut out = Vec::new();
        for (path, text) in case.free_text() {
            self.check_text(&path, text, &mut out);
        }
        out
    }

    /// Flagged phrases in one text, reported under `field_path`.
    pub fn check_text(&self, field_path: &str, text: &str, out: &mut Vec<Finding>) {
        let words = tokens(text);
        let mut found: Vec<(usize, usize, &Phrase)> = Vec::new();
        for phrase in &self.phrases {
            for start in 0..words.len() {
                if let Some(end) = phrase.match_at(&words, 0, start) {
                    if let (Some(first), Some(last)) =
                        (words.get(start), words.get(end.saturating_sub(1)))
                    {
                        found.push((first.start, last.end, phrase));
                    }
                }
            }
        }
        found.sort_by_key(|(s, e, _)| (*s, *e));
        for (s, e, phrase) in found {
            out.push(Finding {
                field_path: field_path.to_string(),
                phrase: text.get(s..e).unwrap_or_default().to_string(),
                pattern: phrase.pattern.clone(),
                suggestion: phrase.suggestion.clone(),
                excerpt: excerpt(text, s, e),
            });
        }
    }
}

impl Phrase {
    /// Whether groups `g..` match the words from `pos`; the end of the
    /// longest match.
    fn match_at(&self, words: &[Token], g: usize, pos: usize) -> Option<usize> {
        let Some(group) = self.groups.get(g) else {
            return Some(pos);
        };
        group
            .iter()
            .filter_map(|alt| {
                let end = pos + alt.len();
                let hit = words
                    .get(pos..end)
                    .is_some_and(|ws| ws.iter().zip(alt).all(|(w, a)| w.is(a)));
                if hit {
                    self.match_at(words, g + 1, end)
                } else {
                    None
                }
            })
            .max()
    }

    fn parse(pattern: &str, suggestion: &str) -> Result<Phrase, LintError> {
        let bad = |why| LintError::BadPhrase {
            phrase: pattern.to_string(),
            why,
        };
        if suggestion.trim().is_empty() {
            return Err(LintError::NoSuggestion(pattern.to_string()));
        }
        // Split into groups: `{a|b c}` is one group; bare text is one group
        // per word. Each alternative is tokenised as text is, so `risk-taking`
        // becomes `risk taking` and spans two words.
        let mut groups: Vec<Group> = Vec::new();
        let mut rest = pattern;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let close = after.find('}').ok_or_else(|| bad("'{' without '}'"))?;
                let inner = &after[..close];
                if inner.contains('{') {
                    return Err(bad("nested '{'"));
                }
                let alts: Vec<Vec<String>> = inner
                    .split('|')
                    .map(|a| tokens(a).into_iter().map(|t| t.lower).collect())
                    .collect();
                if alts.iter().any(Vec::is_empty) {
                    return Err(bad("an alternative in braces has no words"));
                }
                groups.push(alts);
                rest = &after[close + 1..];
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let plain = &rest[..end];
                if plain.contains('}') {
                    return Err(bad("'}' without '{'"));
                }
                for t in tokens(plain) {
                    groups.push(vec![vec![t.lower]]);
                }
                rest = &rest[end..];
            }
        }
        if groups.is_empty() {
            return Err(bad("has no words"));
        }
        Ok(Phrase {
            pattern: pattern.to_string(),
            groups,
            suggestion: suggestion.to_string(),
        })
    }
}

/// A word of text: lowercase form and byte range.
struct Token {
    lower: String,
    start: usize,
    end: usize,
}

impl Token {
    /// Whether this word is `word`, or its possessive (`boyfriend's`).
    fn is(&self, word: &str) -> bool {
        self.lower == word || self.lower.strip_suffix("'s") == Some(word)
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '\'' || c == '\u{2019}'
}

fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (is_word_char(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(token(text, s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(token(text, s, text.len()));
    }
    out
}

fn token(text: &str, start: usize, end: usize) -> Token {
    let word = text.get(start..end).unwrap_or_default();
    // Trailing and leading apostrophes are quotation marks, not part of the word.
    const QUOTES: [char; 2] = ['\'', '\u{2019}'];
    let trimmed = word.trim_matches(QUOTES);
    let lead = word.len() - word.trim_start_matches(QUOTES).len();
    Token {
        lower: trimmed.to_lowercase().replace('\u{2019}', "'"),
        start: start + lead,
        end: start + lead + trimmed.len(),
    }
}

/// Up to 30 characters either side of `start..end`, on one line.
fn excerpt(text: &str, start: usize, end: usize) -> String {
    const CONTEXT: usize = 30;
    let before: Vec<char> = text.get(..start).unwrap_or_default().chars().collect();
    let after: Vec<char> = text.get(end..).unwrap_or_default().chars().collect();
    let mut out = String::new();
    if before.len() > CONTEXT {
        out.push('…');
    }
    out.extend(&before[before.len().saturating_sub(CONTEXT)..]);
    out.push_str(text.get(start..end).unwrap_or_default());
    out.extend(after.iter().take(CONTEXT));
    if after.len() > CONTEXT {
        out.push('…');
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Refuses unless every finding is confirmed by a confirmation with a
/// non-empty reason. Returns what to record: each finding with its reason.
/// A confirmation with an empty reason, or one that matches no finding, is
/// an error too (a mistyped confirmation must not pass unnoticed).
pub fn require_resolved(
    findings: &[Finding],
    confirmations: &[Confirmation],
) -> Result<Vec<RecordedConfirmation>, LintError> {
    for c in confirmations {
        if c.reason.trim().is_empty() {
            return Err(LintError::EmptyReason(c.target.to_string()));
        }
        if !findings.iter().enumerate().any(|(i, f)| c.matches(i, f)) {
            return Err(LintError::NoSuchFinding(c.target.to_string()));
        }
    }
    let mut recorded = Vec::with_capacity(findings.len());
    let mut unresolved = Vec::new();
    for (i, f) in findings.iter().enumerate() {
        match confirmations.iter().find(|c| c.matches(i, f)) {
            Some(c) => recorded.push(RecordedConfirmation {
                finding: f.clone(),
                reason: c.reason.trim().to_string(),
            }),
            None => unresolved.push(f.clone()),
        }
    }
    if unresolved.is_empty() {
        Ok(recorded)
    } else {
        Err(LintError::Unresolved(unresolved))
    }
}

impl Confirmation {
    fn matches(&self, index: usize, f: &Finding) -> bool {
        match &self.target {
            ConfirmTarget::Index(i) => *i == index,
            ConfirmTarget::Phrase(p) => {
                let p = p.trim();
                p.eq_ignore_ascii_case(f.phrase.trim()) || p.eq_ignore_ascii_case(&f.pattern)
            }
        }
    }
}
