//! Decisions: (verified sender, recipient, message facts) → allow or deny.

use std::fmt;

use certs::VerifiedPeer;
use proto::{AreaId, Category, Envelope, Recipient, Sender, Target};
use serde::{Deserialize, Serialize};

use crate::names::{list, FieldPath, Organisation, PolicyId, Purpose, Role, RuleName, Selector};
use crate::parse::{FieldRedaction, Policy, Rule};
use crate::PolicyError;

/// The sender of a message: a user proven by certificate, with the
/// organisation and role the sending area's directory gives them. Only
/// buildable from a [`VerifiedPeer`], so a decision cannot skip verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderContext {
    sender: Sender,
    organisation: Organisation,
    role: Role,
}

impl SenderContext {
    /// The context for `peer`, which must be a user.
    pub fn new(
        peer: &VerifiedPeer,
        organisation: Organisation,
        role: Role,
    ) -> Result<SenderContext, PolicyError> {
        let sender = peer
            .as_sender()
            .ok_or_else(|| PolicyError::NotAUser(peer.to_string()))?;
        Ok(SenderContext {
            sender,
            organisation,
            role,
        })
    }

    /// As [`SenderContext::new`], and checks that `envelope` names `peer` as
    /// its sender.
    pub fn for_envelope(
        peer: &VerifiedPeer,
        envelope: &Envelope,
        organisation: Organisation,
        role: Role,
    ) -> Result<SenderContext, PolicyError> {
        let ctx = SenderContext::new(peer, organisation, role)?;
        if ctx.sender != envelope.sender {
            return Err(PolicyError::SenderMismatch {
                envelope: envelope.sender.to_string(),
                peer: ctx.sender.to_string(),
            });
        }
        Ok(ctx)
    }

    /// The verified sender.
    pub fn sender(&self) -> &Sender {
        &self.sender
    }

    /// The sender's area.
    pub fn area(&self) -> &AreaId {
        &self.sender.area
    }

    /// The sender's organisation.
    pub fn organisation(&self) -> &Organisation {
        &self.organisation
    }

    /// The sender's role.
    pub fn role(&self) -> &Role {
        &self.role
    }
}

/// The recipient of a message, with what the recipient area's directory
/// says about it (as published to peers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientContext {
    /// The user or team and its area.
    pub recipient: Recipient,
    /// Its organisation, if known.
    pub organisation: Option<Organisation>,
    /// Its role, if known (a team may have one too, e.g. `duty-social-work`).
    pub role: Option<Role>,
}

/// The policy a message cites: id and version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyRef {
    /// The policy id.
    pub id: PolicyId,
    /// The policy version.
    pub version: u32,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{}", self.id, self.version)
    }
}

/// What the decision needs to know about a message besides its parties.
/// None of it is personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The message category.
    pub category: Category,
    /// Why it is sent.
    pub purpose: Purpose,
    /// The policy the sender applied.
    pub cited: PolicyRef,
    /// Areas the family fled. Locating fields never go to these areas.
    pub fled_from: Vec<AreaId>,
}

/// Allow, or deny and why (in kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The message may go.
    Allow,
    /// The message must not go.
    Deny(DenyKind),
}

/// Why a message is denied, for callers that act on the kind (e.g. a client
/// that refetches the policy on [`DenyKind::OutdatedPolicy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DenyKind {
    /// The message cites another policy, or a version newer than the one in force.
    UnknownPolicy,
    /// The message cites an older version of the policy.
    OutdatedPolicy,
    /// The message declares a locating field and goes to an area the family fled.
    LocatesFamily,
    /// No rule matches sender, recipient, category and purpose.
    NoRuleMatched,
    /// The governing rule does not allow a declared field.
    FieldNotAllowed,
    /// The message declares no fields at all.
    NoFields,
}

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// The governing rule, if one matched.
    pub rule: Option<RuleName>,
    /// A sentence for people: which rule allowed or denied, and why.
    pub reason: String,
    /// The governing rule's legal basis, if one matched.
    pub legal_basis: Option<String>,
    /// The fields the governing rule allows (empty if none matched).
    pub allowed_fields: Vec<FieldPath>,
    /// The redactions the governing rule requires of the sender.
    pub redactions: Vec<FieldRedaction>,
}

impl Decision {
    /// Whether the message may go.
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    pub(crate) fn deny(kind: DenyKind, rule: Option<&Rule>, reason: String) -> Decision {
        Decision {
            verdict: Verdict::Deny(kind),
            rule: rule.map(|r| r.name.clone()),
            reason,
            legal_basis: rule.map(|r| r.legal_basis.clone()),
            allowed_fields: rule.map(|r| r.fields.clone()).unwrap_or_default(),
            redactions: rule.map(|r| r.redact.clone()).unwrap_or_default(),
        }
    }
}

// === impl Policy (decisions) ===

impl Policy {
    /// Decides whether `sender` may send a message with `facts` and the
    /// `declared` field list to `recipient`. Checks, in order: the cited
    /// policy and version; locating fields to a fled area (built in); the
    /// governing rule (first match); every declared field against it.
    pub fn decide(
        &self,
        sender: &SenderContext,
        recipient: &RecipientContext,
        facts: &Facts,
        declared: &[FieldPath],
    ) -> Decision {
        if let Some(d) = self.check_version(&facts.cited) {
            return d;
        }
        if facts.fled_from.contains(&recipient.recipient.area) {
            if let Some(f) = declared.iter().find(|f| self.is_locating(f)) {
                return Decision::deny(
                    DenyKind::LocatesFamily,
                    None,
                    format!(
                        "built-in rule: field {f} locates the family and never goes to {}, an area the family fled",
                        recipient.recipient.area
                    ),
                );
            }
        }
        let rule = match self.governing_rule(sender, recipient, facts) {
            Ok(rule) => rule,
            Err(why) => return Decision::deny(DenyKind::NoRuleMatched, None, why),
        };
        if declared.is_empty() {
            return Decision::deny(
                DenyKind::NoFields,
                Some(rule),
                format!("rule {}: the message declares no fields", rule.name),
            );
        }
        if let Some(f) = declared
            .iter()
            .find(|f| !rule.fields.iter().any(|a| a.covers(f)))
        {
            return Decision::deny(
                DenyKind::FieldNotAllowed,
                Some(rule),
                format!(
                    "rule {} does not allow field {f} (it allows {})",
                    rule.name,
                    list(&rule.fields)
                ),
            );
        }
        Decision {
            verdict: Verdict::Allow,
            rule: Some(rule.name.clone()),
            reason: format!(
                "allowed by rule {} (legal basis: {})",
                rule.name, rule.legal_basis
            ),
            legal_basis: Some(rule.legal_basis.clone()),
            allowed_fields: rule.fields.clone(),
            redactions: rule.redact.clone(),
        }
    }

    /// A deny if `cited` is not exactly this policy's id and version.
    pub(crate) fn check_version(&self, cited: &PolicyRef) -> Option<Decision> {
        if cited.id != self.id {
            return Some(Decision::deny(
                DenyKind::UnknownPolicy,
                None,
                format!(
                    "message cites unknown policy {cited}; this gateway enforces {} v{}",
                    self.id, self.version
                ),
            ));
        }
        if cited.version < self.version {
            return Some(Decision::deny(
                DenyKind::OutdatedPolicy,
                None,
                format!(
                    "message cites outdated policy version {}; the current version of {} is {}",
                    cited.version, self.id, self.version
                ),
            ));
        }
        if cited.version > self.version {
            return Some(Decision::deny(
                DenyKind::UnknownPolicy,
                None,
                format!(
                    "message cites unknown policy version {}; the current version of {} is {}",
                    cited.version, self.id, self.version
                ),
            ));
        }
        None
    }

    /// The first rule matching everything but the fields, or the reason for a
    /// default deny, saying why each rule did not match.
    pub(crate) fn governing_rule(
        &self,
        sender: &SenderContext,
        recipient: &RecipientContext,
        facts: &Facts,
    ) -> Result<&Rule, String> {
        let mut why = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            match mismatch(rule, sender, recipient, facts) {
                None => return Ok(rule),
                Some(m) => why.push(format!("{}: {m}", rule.name)),
            }
        }
        let reason = if why.is_empty() {
            "no rule matched (default deny): the policy has no rules".to_string()
        } else {
            format!("no rule matched (default deny): {}", why.join("; "))
        };
        Err(reason)
    }
}

fn check_one<T: PartialEq + fmt::Display>(
    what: &str,
    allowed: &[Selector<T>],
    value: &T,
) -> Option<String> {
    if allowed.iter().any(|s| s.matches(value)) {
        None
    } else {
        Some(format!("{what} {value} is not one of {}", list(allowed)))
    }
}

fn check_opt<T: PartialEq + fmt::Display>(
    what: &str,
    allowed: &Option<Vec<Selector<T>>>,
    value: Option<&T>,
) -> Option<String> {
    let allowed = allowed.as_ref()?;
    if allowed.iter().any(|s| matches!(s, Selector::Any)) {
        return None;
    }
    match value {
        Some(v) => check_one(what, allowed, v),
        None => Some(format!(
            "{what} is unknown; the rule needs one of {}",
            list(allowed)
        )),
    }
}

/// The first reason `rule` does not match, or `None` if it does.
fn mismatch(
    rule: &Rule,
    sender: &SenderContext,
    recipient: &RecipientContext,
    facts: &Facts,
) -> Option<String> {
    if !rule.categories.contains(&facts.category) {
        return Some(format!(
            "category {} is not one of {}",
            facts.category,
            list(&rule.categories)
        ));
    }
    if !rule.purposes.contains(&facts.purpose) {
        return Some(format!(
            "purpose {} is not one of {}",
            facts.purpose,
            list(&rule.purposes)
        ));
    }
    let team = match &recipient.recipient.target {
        Target::Team(t) => Some(t),
        Target::User(_) => None,
    };
    check_one("sender area", &rule.from.areas, sender.area())
        .or_else(|| {
            check_opt(
                "sender organisation",
                &rule.from.organisations,
                Some(sender.organisation()),
            )
        })
        .or_else(|| check_opt("sender role", &rule.from.roles, Some(sender.role())))
        .or_else(|| check_one("recipient area", &rule.to.areas, &recipient.recipient.area))
        .or_else(|| {
            check_opt(
                "recipient organisation",
                &rule.to.organisations,
                recipient.organisation.as_ref(),
            )
        })
        .or_else(|| check_opt("recipient role", &rule.to.roles, recipient.role.as_ref()))
        .or_else(|| match (&rule.to.teams, team) {
            (Some(_), None) => Some(format!(
                "recipient {} is a user; the rule needs a team",
                recipient.recipient
            )),
            _ => check_opt("recipient team", &rule.to.teams, team),
        })
}
