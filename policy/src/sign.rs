//! Signed policies: Ed25519 over the exact TOML bytes.
//!
//! The signed message is `DOMAIN || toml bytes`, where `DOMAIN` is
//! `b"fedref-policy-v1\n"`, so a policy signature can never be replayed as a
//! signature on anything else the same key might sign. The text is signed
//! byte for byte: no normalisation, so what was reviewed is what is enforced.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use proto::AreaId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Policy, PolicyError};

const DOMAIN: &[u8] = b"fedref-policy-v1\n";
const TEXT_MAGIC: &str = "fedref-signed-policy v1";

fn message(text: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + text.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(text.as_bytes());
    m
}

/// An area's policy-signing key (secret). Its text form is base64 of the
/// 32-byte seed; `Debug` never shows it.
#[derive(Clone)]
pub struct PolicySigningKey(SigningKey);

impl PolicySigningKey {
    /// A fresh key from `rng` (e.g. `rand::rngs::OsRng`): this crate takes no
    /// randomness of its own.
    pub fn generate<R: rand::RngCore + rand::CryptoRng>(rng: &mut R) -> PolicySigningKey {
        PolicySigningKey(SigningKey::generate(rng))
    }

    /// The key with this 32-byte seed (deterministic; for tests and key files).
    pub fn from_seed(seed: [u8; 32]) -> PolicySigningKey {
        PolicySigningKey(SigningKey::from_bytes(&seed))
    }

    /// Parses base64 of a 32-byte seed.
    pub fn from_base64(s: &str) -> Result<PolicySigningKey, PolicyError> {
        let bytes = B64
            .decode(s.trim().as_bytes())
            .map_err(|_| PolicyError::MalformedKey("secret key is not base64"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| PolicyError::MalformedKey("secret key is not 32 bytes"))?;
        Ok(PolicySigningKey::from_seed(seed))
    }

    /// Base64 of the 32-byte seed. Secret: store it as such.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> PolicyVerifyingKey {
        PolicyVerifyingKey(self.0.verifying_key())
    }
}

impl fmt::Debug for PolicySigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicySigningKey(public {})", self.verifying_key())
    }
}

/// A public policy key, written `ed25519:<base64 of 32 bytes>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PolicyVerifyingKey(VerifyingKey);

impl PolicyVerifyingKey {
    /// The 32 key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

impl fmt::Display for PolicyVerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", B64.encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PolicyVerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyVerifyingKey({self})")
    }
}

impl FromStr for PolicyVerifyingKey {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let b64 = s
            .trim()
            .strip_prefix("ed25519:")
            .ok_or(PolicyError::MalformedKey(
                "public key must start with ed25519:",
            ))?;
        let bytes = B64
            .decode(b64.as_bytes())
            .map_err(|_| PolicyError::MalformedKey("public key is not base64"))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| PolicyError::MalformedKey("public key is not 32 bytes"))?;
        VerifyingKey::from_bytes(&bytes)
            .map(PolicyVerifyingKey)
            .map_err(|_| PolicyError::MalformedKey("public key is not a valid Ed25519 point"))
    }
}

impl Serialize for PolicyVerifyingKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PolicyVerifyingKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A policy as it travels between areas: the exact TOML text, the signer's
/// public key and a detached base64 Ed25519 signature. Serde gives the
/// gateway a JSON form (`{"policy": …, "signer": …, "signature": …}`);
/// [`SignedPolicy::to_text`] gives a file form. Holding one proves nothing:
/// call [`SignedPolicy::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedPolicy {
    pub(crate) policy: String,
    pub(crate) signer: PolicyVerifyingKey,
    pub(crate) signature: String,
}

impl SignedPolicy {
    /// Parses `toml_text` (so nobody signs a policy that cannot be enforced)
    /// and signs its exact bytes with `key`.
    pub fn sign(toml_text: &str, key: &PolicySigningKey) -> Result<SignedPolicy, PolicyError> {
        Policy::parse(toml_text)?;
        let sig = key.0.sign(&message(toml_text));
        Ok(SignedPolicy {
            policy: toml_text.to_string(),
            signer: key.verifying_key(),
            signature: B64.encode(sig.to_bytes()),
        })
    }

    /// Checks that the policy is signed by `trusted` (the key configured for
    /// `owner`), that the signature verifies over the exact text, and that the
    /// policy names `owner` as its area; then parses it.
    pub fn verify(
        &self,
        owner: &AreaId,
        trusted: &PolicyVerifyingKey,
    ) -> Result<Policy, PolicyError> {
        if self.signer != *trusted {
            return Err(PolicyError::UntrustedSigner {
                trusted: trusted.to_string(),
                found: self.signer.to_string(),
            });
        }
        let bytes = B64
            .decode(self.signature.trim().as_bytes())
            .map_err(|_| PolicyError::MalformedSignature)?;
        let sig = Signature::from_slice(&bytes).map_err(|_| PolicyError::MalformedSignature)?;
        trusted
            .0
            .verify_strict(&message(&self.policy), &sig)
            .map_err(|_| PolicyError::BadSignature)?;
        let policy = Policy::parse(&self.policy)?;
        if policy.area() != owner {
            return Err(PolicyError::WrongOwner {
                expected: owner.to_string(),
                found: policy.area().to_string(),
            });
        }
        Ok(policy)
    }

    /// The signed TOML text, unverified.
    pub fn policy_text(&self) -> &str {
        &self.policy
    }

    /// The key the document says signed it, unverified.
    pub fn signer(&self) -> &PolicyVerifyingKey {
        &self.signer
    }

    /// The file form:
    ///
    /// ```text
    /// fedref-signed-policy v1
    /// signer: ed25519:<base64>
    /// signature: <base64>
    ///
    /// <the TOML text, byte for byte>
    /// ```
    pub fn to_text(&self) -> String {
        format!(
            "{TEXT_MAGIC}\nsigner: {}\nsignature: {}\n\n{}",
            self.signer, self.signature, self.policy
        )
    }

    /// Parses the file form of [`SignedPolicy::to_text`]. Does not verify.
    pub fn from_text(text: &str) -> Result<SignedPolicy, PolicyError> {
        let bad = PolicyError::MalformedDocument;
        let rest = text
            .strip_prefix(TEXT_MAGIC)
            .and_then(|r| r.strip_prefix('\n'))
            .ok_or(bad("first line must be 'fedref-signed-policy v1'"))?;
        let (signer_line, rest) = rest
            .split_once('\n')
            .ok_or(bad("document ends within the signer line"))?;
        let (sig_line, rest) = rest
            .split_once('\n')
            .ok_or(bad("document ends within the signature line"))?;
        let policy = rest
            .strip_prefix('\n')
            .ok_or(bad("no blank line before the policy text"))?;
        let signer = signer_line
            .strip_prefix("signer: ")
            .ok_or(bad("second line must be 'signer: ed25519:<base64>'"))?
            .parse()?;
        let signature = sig_line
            .strip_prefix("signature: ")
            .ok_or(bad("third line must be 'signature: <base64>'"))?
            .to_string();
        Ok(SignedPolicy {
            policy: policy.to_string(),
            signer,
            signature,
        })
    }
}
