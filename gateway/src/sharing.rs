//! Enforcing the area's signed sharing policy on what leaves it, and checking
//! that what arrives cites its sender area's current policy.
//!
//! Boundary: the gateway sees the declared disclosure (field names, purpose,
//! policy version), never the content. The sending client applied the same
//! policy before encrypting; this is the second of three checks.

use std::collections::HashMap;
use std::sync::Mutex;

use certs::VerifiedPeer;
use policy::{
    Facts, FieldPath, Organisation, Policy, PolicyId, PolicyRef, PolicyVerifyingKey, Purpose,
    RecipientContext, Role, SenderContext, SignedPolicy,
};
use proto::{AreaId, Category, Disclosure, Recipient};

use crate::config::{PolicyConfig, UserConfig};

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SharingError {
    /// The policy file could not be read.
    #[error("policy file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The policy or its signature or key is invalid.
    #[error("policy: {0}")]
    Policy(#[from] policy::PolicyError),
}

/// The area's own policy, verified at start.
#[derive(Debug)]
pub struct OwnPolicy {
    /// The parsed policy.
    pub policy: Policy,
    /// The signed document, as served to users and peers.
    pub signed_text: String,
}

impl OwnPolicy {
    /// Loads and verifies the area's signed policy.
    pub fn load(config: &PolicyConfig, area: &AreaId) -> Result<OwnPolicy, SharingError> {
        let text = std::fs::read_to_string(&config.file).map_err(|source| SharingError::Io {
            path: config.file.display().to_string(),
            source,
        })?;
        let key: PolicyVerifyingKey = config.key.parse()?;
        let signed = SignedPolicy::from_text(&text)?;
        let policy = signed.verify(area, &key)?;
        Ok(OwnPolicy {
            policy,
            signed_text: text,
        })
    }
}

/// Checks a disclosure leaving the area. `Err` carries the reason, naming the rule.
pub(crate) fn check_outgoing(
    own: &OwnPolicy,
    peer: &VerifiedPeer,
    user: &UserConfig,
    recipient: &Recipient,
    category: &Category,
    d: &Disclosure,
    opaque: bool,
) -> Result<(), String> {
    let sender = SenderContext::new(
        peer,
        Organisation::new(user.organisation.as_str()).map_err(|e| e.to_string())?,
        Role::new(user.role.as_str()).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let to = RecipientContext {
        recipient: recipient.clone(),
        organisation: None,
        role: None,
    };
    let facts = facts(category, d)?;
    let fields = d
        .fields
        .iter()
        .map(|f| FieldPath::new(f.as_str()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let decision = own.policy.decide(&sender, &to, &facts, &fields);
    if !decision.is_allowed() {
        return Err(decision.reason);
    }
    // The rule's redactions are the sender's client's to apply (`refer`,
    // `reply`): opaque bytes have been through none, so they may not
    // declare a field the rule redacts.
    if opaque {
        for r in &decision.redactions {
            if let Some(f) = fields.iter().find(|f| f.overlaps(&r.field)) {
                return Err(format!(
                    "rule {} has {} redacted ({}) by the sending client, which only refer and reply do: \
                     a message sent as it is (client send) may not declare {f}",
                    decision.rule.as_ref().map_or("?", |n| n.as_str()),
                    r.field,
                    r.op.name()
                ));
            }
        }
    }
    Ok(())
}

fn facts(category: &Category, d: &Disclosure) -> Result<Facts, String> {
    Ok(Facts {
        category: category.clone(),
        purpose: Purpose::new(d.purpose.as_str()).map_err(|e| e.to_string())?,
        cited: PolicyRef {
            id: PolicyId::new(d.policy_id.as_str()).map_err(|e| e.to_string())?,
            version: d.policy_version,
        },
        fled_from: d.fled_from.clone(),
    })
}

/// Peers' current policies, fetched over the federation and verified.
#[derive(Debug, Default)]
pub(crate) struct PeerPolicies {
    cache: Mutex<HashMap<AreaId, Verified>>,
}

/// A peer's policy as verified: with the key it was checked with, and its
/// id and version.
type Verified = (String, (String, u32));

impl PeerPolicies {
    /// The cached (id, version) of a peer's policy, if any was verified
    /// with `key` (a policy verified with a key since replaced is not).
    pub(crate) fn cached(&self, area: &AreaId, key: &str) -> Option<(String, u32)> {
        let cache = self.cache.lock().ok()?;
        let (with, current) = cache.get(area)?;
        (with == key).then(|| current.clone())
    }

    /// Verifies a peer's signed policy document and caches its id and version.
    pub(crate) fn update(
        &self,
        area: &AreaId,
        key: &str,
        text: &str,
    ) -> Result<(String, u32), String> {
        let key_text = key;
        let key: PolicyVerifyingKey = key
            .parse()
            .map_err(|e: policy::PolicyError| e.to_string())?;
        let signed = SignedPolicy::from_text(text).map_err(|e| e.to_string())?;
        let policy = signed.verify(area, &key).map_err(|e| e.to_string())?;
        let current = (policy.id().to_string(), policy.version());
        if let Ok(mut c) = self.cache.lock() {
            c.insert(area.clone(), (key_text.to_owned(), current.clone()));
        }
        Ok(current)
    }
}
