//! The public framing of MLS (RFC 9420), read by the delivery service.
//!
//! Gateways store and forward MLS messages but never hold a key that decrypts
//! one, so they must not link an MLS implementation. This module is a small
//! sans-I/O parser of the parts of the wire format a delivery service needs:
//!
//! * [`KeyPackageInfo::parse`] reads a KeyPackage (§10), checks that it uses
//!   MLS 1.0 and [`SUPPORTED_CIPHER_SUITE`] with a basic credential, verifies
//!   both of its signatures, and computes its [`KeyPackageRef`] (§5.2);
//! * [`MlsMessageInfo::parse`] reads an MLSMessage (§6) and returns what is
//!   needed to route it: the group id, epoch and content type of a framed
//!   message, or the [`KeyPackageRef`]s of the members a Welcome is for.
//!
//! Promises: parsing never panics and never reads past its input; every
//! length is checked against the bytes that remain, inputs longer than
//! [`MAX_MESSAGE_LEN`] are refused before any parsing, and every structure
//! must be followed by nothing (trailing bytes are an error). Any value
//! this module returns came out of a successful parse.
//!
//! Not checked here (it needs group state the delivery service does not
//! have): the signature and membership tag of a PublicMessage, anything
//! inside a PrivateMessage or the encrypted part of a Welcome, and whether a
//! KeyPackage's lifetime covers the current time (see [`Lifetime::contains`]).

mod reader;
#[cfg(test)]
mod tests;

use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use reader::{write_opaque, Reader};
use sha2::{Digest, Sha256};

/// The only protocol version accepted: `mls10`.
pub const MLS10: u16 = 0x0001;

/// The only cipher suite accepted:
/// `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519`.
pub const SUPPORTED_CIPHER_SUITE: u16 = 0x0001;

/// The largest input either parser accepts, in bytes.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

/// The most new members a single Welcome may name.
pub const MAX_WELCOME_SECRETS: usize = 1024;

/// The most extensions a single extension list may hold.
pub const MAX_EXTENSIONS: usize = 64;

/// Extension type of `last_resort` (RFC 9420 §17.3).
const EXTENSION_LAST_RESORT: u16 = 0x000A;

/// Credential type `basic` (§5.3).
const CREDENTIAL_BASIC: u16 = 0x0001;
/// Credential type `x509` (§5.3).
const CREDENTIAL_X509: u16 = 0x0002;

/// Length of an X25519 HPKE public key.
const HPKE_KEY_LEN: usize = 32;
/// Length of an Ed25519 public key.
const SIGNATURE_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;
/// Length of a SHA-256 hash reference.
const REF_LEN: usize = 32;

/// How a group id names its home area: `home/<area>/` then random bytes.
const HOME_PREFIX: &[u8] = b"home/";

/// A group id naming `home` as the group's home area: the area whose
/// gateway orders the group's Commits (one per epoch), wherever its members
/// are. `random` keeps ids apart.
pub fn group_id_with_home(home: &crate::AreaId, random: &[u8; 16]) -> Vec<u8> {
    let mut id = HOME_PREFIX.to_vec();
    id.extend_from_slice(home.as_str().as_bytes());
    id.push(b'/');
    id.extend_from_slice(random);
    id
}

/// The home area a group id names (see [`group_id_with_home`]); `None` for
/// one that names none, such as a group made before homes were named.
pub fn home_of_group(group_id: &[u8]) -> Option<crate::AreaId> {
    let rest = group_id.strip_prefix(HOME_PREFIX)?;
    let slash = rest.iter().position(|b| *b == b'/')?;
    let (area, random) = rest.split_at(slash);
    if random.len() != 17 {
        return None;
    }
    crate::AreaId::new(std::str::from_utf8(area).ok()?).ok()
}

/// The MLS exporter label (RFC 9420 §8.5; empty context, 32 bytes) from
/// which every member of an epoch derives that epoch's key pair for
/// [`crate::CommitProof`]s ([`epoch_key`]).
pub const EPOCH_KEY_LABEL: &str = "referral-gateway epoch key v1";

/// The epoch key pair derived from the secret exported with
/// [`EPOCH_KEY_LABEL`].
pub fn epoch_key(exported: &[u8; 32]) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(exported)
}

/// What both of a [`crate::CommitProof`]'s signatures cover: the Commit's
/// group (lowercase hex), the epoch it was made in, its content hash and
/// the key it names for the next epoch, after a label that keeps these
/// signatures apart from any other. Each signature adds whose it is
/// ([`PROOF_BY_THIS_EPOCH`], [`PROOF_BY_NEXT_EPOCH`]) in front.
pub fn commit_proof_message(
    group_hex: &str,
    epoch: u64,
    content_hash: &crate::ContentHash,
    next_key: &[u8; 32],
) -> Vec<u8> {
    let mut m = b"referral-gateway commit proof v1\0".to_vec();
    m.extend_from_slice(&(group_hex.len() as u64).to_be_bytes());
    m.extend_from_slice(group_hex.as_bytes());
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&content_hash.0);
    m.extend_from_slice(next_key);
    m
}

/// In front of [`commit_proof_message`] for the signature by the key of
/// the epoch the Commit was made in.
pub const PROOF_BY_THIS_EPOCH: &[u8] = b"by this epoch\0";
/// In front of [`commit_proof_message`] for the signature by the key the
/// Commit names for the next epoch (which shows that its maker holds it).
pub const PROOF_BY_NEXT_EPOCH: &[u8] = b"by the next epoch\0";

/// A [`crate::CommitProof`] that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// A field is not what it must be (hex of the right length, a valid key).
    #[error("commit proof: {0}")]
    Malformed(&'static str),
    /// The signature is not by the epoch's key over this Commit.
    #[error("commit proof: the signature is not by a member of the group's current epoch")]
    BadSignature,
    /// The key named for the next epoch did not sign: its maker may not
    /// hold it.
    #[error("commit proof: the key named for the next epoch is not shown to be held")]
    NextKeyUnproven,
}

impl crate::CommitProof {
    /// The proof for a Commit (its content hash) made in `epoch` of the
    /// group `group_hex`, from the secrets exported with [`EPOCH_KEY_LABEL`]
    /// in that epoch and in the one the Commit starts.
    pub fn make(
        this_epoch: &[u8; 32],
        next_epoch: &[u8; 32],
        group_hex: &str,
        epoch: u64,
        content_hash: &crate::ContentHash,
    ) -> crate::CommitProof {
        use ed25519_dalek::Signer as _;
        let (this, next) = (epoch_key(this_epoch), epoch_key(next_epoch));
        let next_key = next.verifying_key().to_bytes();
        let m = commit_proof_message(group_hex, epoch, content_hash, &next_key);
        let signed = |key: &ed25519_dalek::SigningKey, by: &[u8]| {
            hex::encode(key.sign(&[by, m.as_slice()].concat()).to_bytes())
        };
        crate::CommitProof {
            signature: signed(&this, PROOF_BY_THIS_EPOCH),
            next_epoch_key: hex::encode(next_key),
            next_epoch_signature: signed(&next, PROOF_BY_NEXT_EPOCH),
        }
    }

    /// The key named for the next epoch, checked: a valid Ed25519 key that
    /// signed this Commit (so a proof cannot name a key its maker does not
    /// hold), and the other signature well formed. Needs no stored key:
    /// checked before anything is asked or stored.
    pub fn next_key(
        &self,
        group_hex: &str,
        epoch: u64,
        content_hash: &crate::ContentHash,
    ) -> Result<[u8; 32], ProofError> {
        let key = from_hex::<SIGNATURE_KEY_LEN>(&self.next_epoch_key)
            .ok_or(ProofError::Malformed("next_epoch_key is not 64 hex digits"))?;
        let verifying = VerifyingKey::from_bytes(&key)
            .map_err(|_| ProofError::Malformed("next_epoch_key is not an Ed25519 key"))?;
        signature_of(&self.signature, SIGNATURE_NOT_HEX)?;
        let sig = signature_of(
            &self.next_epoch_signature,
            "next_epoch_signature is not 128 hex digits",
        )?;
        let m = commit_proof_message(group_hex, epoch, content_hash, &key);
        verifying
            .verify_strict(&[PROOF_BY_NEXT_EPOCH, m.as_slice()].concat(), &sig)
            .map_err(|_| ProofError::NextKeyUnproven)?;
        Ok(key)
    }

    /// Checks the signature by `key`, the public key of the epoch the
    /// Commit was made in (as the Commit that started it named it), and
    /// the key named for the next epoch ([`crate::CommitProof::next_key`]),
    /// which it returns.
    pub fn verify(
        &self,
        key: &[u8; 32],
        group_hex: &str,
        epoch: u64,
        content_hash: &crate::ContentHash,
    ) -> Result<[u8; 32], ProofError> {
        let next = self.next_key(group_hex, epoch, content_hash)?;
        let sig = signature_of(&self.signature, SIGNATURE_NOT_HEX)?;
        let key = VerifyingKey::from_bytes(key).map_err(|_| ProofError::BadSignature)?;
        let m = commit_proof_message(group_hex, epoch, content_hash, &next);
        key.verify_strict(&[PROOF_BY_THIS_EPOCH, m.as_slice()].concat(), &sig)
            .map_err(|_| ProofError::BadSignature)?;
        Ok(next)
    }
}

const SIGNATURE_NOT_HEX: &str = "signature is not 128 hex digits";

/// An Ed25519 signature from its hex; `malformed` says what is wrong if it
/// is not one.
fn signature_of(text: &str, malformed: &'static str) -> Result<Signature, ProofError> {
    let bytes = from_hex::<SIGNATURE_LEN>(text).ok_or(ProofError::Malformed(malformed))?;
    Ok(Signature::from_bytes(&bytes))
}

/// `N` bytes from exactly `2 * N` hex digits.
fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// An error in MLS bytes received from a peer or a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MlsWireError {
    /// The input ended (or a vector ended) before a field was complete.
    #[error("truncated MLS data while reading {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// Bytes remained after a complete structure.
    #[error("{count} trailing bytes after MLS structure")]
    TrailingBytes {
        /// How many bytes were left over.
        count: usize,
    },
    /// The input is larger than the parser accepts.
    #[error("MLS data of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Length of the input.
        len: usize,
        /// The limit it exceeded.
        max: usize,
    },
    /// A vector holds more elements than the parser accepts.
    #[error("too many elements in {field} (limit {max})")]
    TooMany {
        /// The vector.
        field: &'static str,
        /// The limit it exceeded.
        max: usize,
    },
    /// A variable-length integer uses the reserved `11` prefix or is not
    /// minimally encoded (§2.1.2).
    #[error("invalid variable-length integer in {field}")]
    InvalidVarint {
        /// The field whose length it was.
        field: &'static str,
    },
    /// A key, signature or reference has the wrong length for the cipher
    /// suite.
    #[error("{field} is {len} bytes, expected {expected}")]
    InvalidLength {
        /// The field.
        field: &'static str,
        /// Its length on the wire.
        len: usize,
        /// The length the cipher suite requires.
        expected: usize,
    },
    /// An enumerated field holds a value not defined for it.
    #[error("invalid value {value} for {field}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// The protocol version is not `mls10`.
    #[error("unsupported MLS protocol version {0:#06x}")]
    UnsupportedVersion(u16),
    /// The cipher suite is not [`SUPPORTED_CIPHER_SUITE`].
    #[error("unsupported MLS cipher suite {0:#06x}")]
    UnsupportedCipherSuite(u16),
    /// The credential type is not one this parser accepts (a KeyPackage must
    /// carry a `basic` credential).
    #[error("unsupported MLS credential type {0:#06x}")]
    UnsupportedCredential(u16),
    /// The wire format of an MLSMessage is not one of RFC 9420's five.
    #[error("unknown MLS wire format {0:#06x}")]
    UnknownWireFormat(u16),
    /// The content type of a framed message is not application, proposal or
    /// commit.
    #[error("unknown MLS content type {0}")]
    UnknownContentType(u8),
    /// The sender type of a PublicMessage is not one of RFC 9420's four.
    #[error("unknown MLS sender type {0}")]
    UnknownSenderType(u8),
    /// A PublicMessage carries a proposal type this parser cannot delimit.
    #[error("unsupported MLS proposal type {0:#06x}")]
    UnsupportedProposal(u16),
    /// A KeyPackage's leaf node does not have leaf_node_source `key_package`.
    #[error("KeyPackage leaf node has source {0}, expected key_package (1)")]
    WrongLeafNodeSource(u8),
    /// An extension list names the same extension type twice.
    #[error("duplicate MLS extension type {0:#06x}")]
    DuplicateExtension(u16),
    /// A KeyPackage's init key equals its leaf node's encryption key
    /// (forbidden by §10.1).
    #[error("KeyPackage init key equals its leaf encryption key")]
    InitKeyReused,
    /// The signature public key is not a valid Ed25519 point.
    #[error("invalid Ed25519 signature public key")]
    InvalidSignatureKey,
    /// A signature does not verify.
    #[error("bad signature on {what}")]
    BadSignature {
        /// The signed structure: `LeafNodeTBS` or `KeyPackageTBS`.
        what: &'static str,
    },
    /// A basic credential's identity is not UTF-8.
    #[error("credential identity is not valid UTF-8")]
    InvalidUtf8,
    /// A PublicMessage carries application data, which MLS requires to be
    /// encrypted (§6.2); the gateway would see plaintext.
    #[error("application data in a PublicMessage (must be a PrivateMessage)")]
    PlaintextApplicationMessage,
    /// A Welcome names no new member.
    #[error("Welcome names no new member")]
    EmptyWelcome,
}

// === impl KeyPackageRef ===

/// The reference to a KeyPackage (RFC 9420 §5.2): the SHA-256 `RefHash` of
/// its serialisation, under the label `"MLS 1.0 KeyPackage Reference"`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyPackageRef([u8; REF_LEN]);

impl KeyPackageRef {
    /// Wraps the 32 bytes of a reference (as stored, or as another MLS
    /// implementation computed it).
    pub fn from_bytes(bytes: [u8; REF_LEN]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the reference.
    pub fn as_bytes(&self) -> &[u8; REF_LEN] {
        &self.0
    }

    /// Computes the reference of a serialised KeyPackage.
    fn of(key_package: &[u8]) -> Result<Self, MlsWireError> {
        let mut input = Vec::with_capacity(key_package.len().saturating_add(40));
        write_opaque(&mut input, b"MLS 1.0 KeyPackage Reference")?;
        write_opaque(&mut input, key_package)?;
        Ok(Self(Sha256::digest(&input).into()))
    }
}

impl fmt::Display for KeyPackageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyPackageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPackageRef({self})")
    }
}

impl TryFrom<&[u8]> for KeyPackageRef {
    type Error = MlsWireError;

    fn try_from(bytes: &[u8]) -> Result<Self, MlsWireError> {
        <[u8; REF_LEN]>::try_from(bytes)
            .map(Self)
            .map_err(|_| MlsWireError::InvalidLength {
                field: "KeyPackageRef",
                len: bytes.len(),
                expected: REF_LEN,
            })
    }
}

// === impl Lifetime ===

/// The validity period of a KeyPackage, in seconds since the UNIX epoch
/// (§7.2), both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lifetime {
    /// First second at which the KeyPackage may be used.
    pub not_before: u64,
    /// Last second at which the KeyPackage may be used.
    pub not_after: u64,
}

impl Lifetime {
    /// Whether `unix_secs` lies within the lifetime.
    pub fn contains(&self, unix_secs: u64) -> bool {
        self.not_before <= unix_secs && unix_secs <= self.not_after
    }
}

// === impl KeyPackageInfo ===

/// What a delivery service needs from a KeyPackage whose signatures have
/// been verified. Only [`KeyPackageInfo::parse`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPackageInfo {
    identity: String,
    signature_key: [u8; SIGNATURE_KEY_LEN],
    init_key: [u8; HPKE_KEY_LEN],
    encryption_key: [u8; HPKE_KEY_LEN],
    lifetime: Lifetime,
    last_resort: bool,
    key_package_ref: KeyPackageRef,
}

impl KeyPackageInfo {
    /// Parses a TLS-serialised KeyPackage (RFC 9420 §10) and verifies it.
    ///
    /// Requires protocol version `mls10`, [`SUPPORTED_CIPHER_SUITE`], a
    /// leaf node with source `key_package` and a `basic` credential whose
    /// identity is UTF-8, an init key distinct from the leaf's encryption
    /// key, a valid LeafNode signature (`"LeafNodeTBS"`) and a valid
    /// KeyPackage signature (`"KeyPackageTBS"`), both by the leaf's
    /// signature key, and no bytes after the KeyPackage.
    pub fn parse(bytes: &[u8]) -> Result<Self, MlsWireError> {
        check_size(bytes)?;
        let mut r = Reader::new(bytes);
        let info = parse_key_package(&mut r)?;
        r.finish()?;
        Ok(info)
    }

    /// The identity of the basic credential, e.g. a SPIFFE id.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The Ed25519 signature public key of the leaf node.
    pub fn signature_key(&self) -> &[u8; SIGNATURE_KEY_LEN] {
        &self.signature_key
    }

    /// The X25519 HPKE init key a Welcome is encrypted to.
    pub fn init_key(&self) -> &[u8; HPKE_KEY_LEN] {
        &self.init_key
    }

    /// The X25519 HPKE encryption key of the leaf node.
    pub fn encryption_key(&self) -> &[u8; HPKE_KEY_LEN] {
        &self.encryption_key
    }

    /// The lifetime of the leaf node. Not checked against the clock here.
    pub fn lifetime(&self) -> Lifetime {
        self.lifetime
    }

    /// Whether the KeyPackage carries the `last_resort` extension (it may
    /// then be handed out more than once).
    pub fn is_last_resort(&self) -> bool {
        self.last_resort
    }

    /// The KeyPackage's reference, which a Welcome uses to name its
    /// recipient.
    pub fn key_package_ref(&self) -> KeyPackageRef {
        self.key_package_ref
    }
}

fn check_size(bytes: &[u8]) -> Result<(), MlsWireError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(MlsWireError::TooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    Ok(())
}

fn check_version(version: u16) -> Result<(), MlsWireError> {
    if version != MLS10 {
        return Err(MlsWireError::UnsupportedVersion(version));
    }
    Ok(())
}

fn check_cipher_suite(suite: u16) -> Result<(), MlsWireError> {
    if suite != SUPPORTED_CIPHER_SUITE {
        return Err(MlsWireError::UnsupportedCipherSuite(suite));
    }
    Ok(())
}

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], MlsWireError> {
    <[u8; N]>::try_from(bytes).map_err(|_| MlsWireError::InvalidLength {
        field,
        len: bytes.len(),
        expected: N,
    })
}

/// Parses and verifies a KeyPackage starting at the reader's position.
fn parse_key_package(r: &mut Reader<'_>) -> Result<KeyPackageInfo, MlsWireError> {
    let start = r.pos();
    check_version(r.u16("KeyPackage.version")?)?;
    check_cipher_suite(r.u16("KeyPackage.cipher_suite")?)?;
    let init_key: [u8; HPKE_KEY_LEN] = r.opaque_array("KeyPackage.init_key")?;
    let leaf = parse_leaf_node(r)?;
    let extensions = parse_extensions(r, "KeyPackage.extensions")?;
    let tbs_end = r.pos();
    let signature: [u8; SIGNATURE_LEN] = r.opaque_array("KeyPackage.signature")?;
    let whole = r
        .input()
        .get(start..r.pos())
        .ok_or(MlsWireError::Truncated {
            field: "KeyPackage",
        })?;
    let tbs = r
        .input()
        .get(start..tbs_end)
        .ok_or(MlsWireError::Truncated {
            field: "KeyPackage",
        })?;

    let lifetime = match leaf.source {
        LeafNodeSource::KeyPackage(lifetime) => lifetime,
        LeafNodeSource::Other(source) => return Err(MlsWireError::WrongLeafNodeSource(source)),
    };
    let identity = match leaf.credential {
        Credential::Basic(identity) => {
            std::str::from_utf8(identity).map_err(|_| MlsWireError::InvalidUtf8)?
        }
        Credential::X509 => return Err(MlsWireError::UnsupportedCredential(CREDENTIAL_X509)),
    };
    let encryption_key: [u8; HPKE_KEY_LEN] = fixed("LeafNode.encryption_key", leaf.encryption_key)?;
    if encryption_key == init_key {
        return Err(MlsWireError::InitKeyReused);
    }
    let signature_key: [u8; SIGNATURE_KEY_LEN] =
        fixed("LeafNode.signature_key", leaf.signature_key)?;
    let leaf_signature: [u8; SIGNATURE_LEN] = fixed("LeafNode.signature", leaf.signature)?;

    let verifying_key =
        VerifyingKey::from_bytes(&signature_key).map_err(|_| MlsWireError::InvalidSignatureKey)?;
    // For source key_package, LeafNodeTBS is the leaf node without its
    // signature (§7.2).
    verify_with_label(&verifying_key, "LeafNodeTBS", leaf.tbs, &leaf_signature)?;
    verify_with_label(&verifying_key, "KeyPackageTBS", tbs, &signature)?;

    Ok(KeyPackageInfo {
        identity: identity.to_owned(),
        signature_key,
        init_key,
        encryption_key,
        lifetime,
        last_resort: extensions.contains(&EXTENSION_LAST_RESORT),
        key_package_ref: KeyPackageRef::of(whole)?,
    })
}

/// `VerifyWithLabel` (§5.1.2): Ed25519 over
/// `SignContent { opaque label<V> = "MLS 1.0 " + label; opaque content<V>; }`.
fn verify_with_label(
    key: &VerifyingKey,
    label: &'static str,
    content: &[u8],
    signature: &[u8; SIGNATURE_LEN],
) -> Result<(), MlsWireError> {
    let mut sign_content = Vec::with_capacity(content.len().saturating_add(32));
    write_opaque(&mut sign_content, format!("MLS 1.0 {label}").as_bytes())?;
    write_opaque(&mut sign_content, content)?;
    key.verify_strict(&sign_content, &Signature::from_bytes(signature))
        .map_err(|_| MlsWireError::BadSignature { what: label })
}

// === LeafNode, Credential, Capabilities, Extensions ===

enum Credential<'a> {
    Basic(&'a [u8]),
    X509,
}

enum LeafNodeSource {
    KeyPackage(Lifetime),
    /// `update` (2) or `commit` (3).
    Other(u8),
}

/// A structurally parsed LeafNode (§7.2); key lengths are not checked here
/// because they depend on a cipher suite the caller may not know.
struct LeafNode<'a> {
    encryption_key: &'a [u8],
    signature_key: &'a [u8],
    credential: Credential<'a>,
    source: LeafNodeSource,
    /// The leaf node up to, not including, its signature.
    tbs: &'a [u8],
    signature: &'a [u8],
}

fn parse_leaf_node<'a>(r: &mut Reader<'a>) -> Result<LeafNode<'a>, MlsWireError> {
    let start = r.pos();
    let encryption_key = r.opaque("LeafNode.encryption_key")?;
    let signature_key = r.opaque("LeafNode.signature_key")?;
    let credential = parse_credential(r)?;
    parse_capabilities(r)?;
    let source = match r.u8("LeafNode.leaf_node_source")? {
        1 => LeafNodeSource::KeyPackage(Lifetime {
            not_before: r.u64("Lifetime.not_before")?,
            not_after: r.u64("Lifetime.not_after")?,
        }),
        2 => LeafNodeSource::Other(2),
        3 => {
            r.opaque("LeafNode.parent_hash")?;
            LeafNodeSource::Other(3)
        }
        value => {
            return Err(MlsWireError::InvalidValue {
                field: "LeafNode.leaf_node_source",
                value: u64::from(value),
            })
        }
    };
    parse_extensions(r, "LeafNode.extensions")?;
    let tbs = r
        .input()
        .get(start..r.pos())
        .ok_or(MlsWireError::Truncated { field: "LeafNode" })?;
    let signature = r.opaque("LeafNode.signature")?;
    Ok(LeafNode {
        encryption_key,
        signature_key,
        credential,
        source,
        tbs,
        signature,
    })
}

fn parse_credential<'a>(r: &mut Reader<'a>) -> Result<Credential<'a>, MlsWireError> {
    match r.u16("Credential.credential_type")? {
        CREDENTIAL_BASIC => Ok(Credential::Basic(r.opaque("Credential.identity")?)),
        CREDENTIAL_X509 => {
            let mut certificates = r.vector("Credential.certificates")?;
            while !certificates.is_empty() {
                certificates.opaque("Certificate.cert_data")?;
            }
            Ok(Credential::X509)
        }
        other => Err(MlsWireError::UnsupportedCredential(other)),
    }
}

/// Capabilities (§7.2): five vectors of 16-bit code points.
fn parse_capabilities(r: &mut Reader<'_>) -> Result<(), MlsWireError> {
    for field in [
        "Capabilities.versions",
        "Capabilities.cipher_suites",
        "Capabilities.extensions",
        "Capabilities.proposals",
        "Capabilities.credentials",
    ] {
        let mut list = r.vector(field)?;
        while !list.is_empty() {
            list.u16(field)?;
        }
    }
    Ok(())
}

/// `Extension extensions<V>` (§7.2): returns the extension types, refusing
/// duplicates and more than [`MAX_EXTENSIONS`].
fn parse_extensions(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<u16>, MlsWireError> {
    let mut list = r.vector(field)?;
    let mut types = Vec::new();
    while !list.is_empty() {
        if types.len() == MAX_EXTENSIONS {
            return Err(MlsWireError::TooMany {
                field,
                max: MAX_EXTENSIONS,
            });
        }
        let extension_type = list.u16("Extension.extension_type")?;
        list.opaque("Extension.extension_data")?;
        if types.contains(&extension_type) {
            return Err(MlsWireError::DuplicateExtension(extension_type));
        }
        types.push(extension_type);
    }
    Ok(types)
}

// === impl MlsMessageInfo ===

/// The wire format of an MLSMessage (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireFormat {
    /// `mls_public_message` (1): a signed, unencrypted handshake message.
    PublicMessage,
    /// `mls_private_message` (2): an encrypted handshake or application
    /// message.
    PrivateMessage,
    /// `mls_welcome` (3): the secrets new members need to join.
    Welcome,
    /// `mls_group_info` (4): public group state, for external joins.
    GroupInfo,
    /// `mls_key_package` (5): a KeyPackage.
    KeyPackage,
}

impl WireFormat {
    /// The code point on the wire.
    pub fn code(self) -> u16 {
        match self {
            Self::PublicMessage => 1,
            Self::PrivateMessage => 2,
            Self::Welcome => 3,
            Self::GroupInfo => 4,
            Self::KeyPackage => 5,
        }
    }
}

/// The content type of a framed message (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentType {
    /// `application` (1): application data (a referral).
    Application,
    /// `proposal` (2): a proposal to change the group.
    Proposal,
    /// `commit` (3): a commit, which starts a new epoch.
    Commit,
}

impl ContentType {
    fn from_code(code: u8) -> Result<Self, MlsWireError> {
        match code {
            1 => Ok(Self::Application),
            2 => Ok(Self::Proposal),
            3 => Ok(Self::Commit),
            other => Err(MlsWireError::UnknownContentType(other)),
        }
    }
}

/// The sender of a PublicMessage (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sender {
    /// A member, by leaf index.
    Member {
        /// The member's leaf index in the ratchet tree.
        leaf_index: u32,
    },
    /// A pre-configured external sender, by index in the group's
    /// `external_senders` extension.
    External {
        /// Index into the `external_senders` extension.
        sender_index: u32,
    },
    /// A non-member proposing to join.
    NewMemberProposal,
    /// A non-member joining by external commit.
    NewMemberCommit,
}

/// The routing header of a PublicMessage or PrivateMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramedMessageInfo {
    group_id: Vec<u8>,
    epoch: u64,
    content_type: ContentType,
    sender: Option<Sender>,
}

impl FramedMessageInfo {
    /// The MLS group id.
    pub fn group_id(&self) -> &[u8] {
        &self.group_id
    }

    /// The epoch the message was sent in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Application, proposal or commit.
    pub fn content_type(&self) -> ContentType {
        self.content_type
    }

    /// The sender, for a PublicMessage; `None` for a PrivateMessage, whose
    /// sender is encrypted. Not authenticated: the delivery service cannot
    /// check a PublicMessage's signature without the group's ratchet tree.
    pub fn sender(&self) -> Option<Sender> {
        self.sender
    }
}

/// The routing information of a Welcome (§12.4.3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeInfo {
    cipher_suite: u16,
    new_members: Vec<KeyPackageRef>,
}

impl WelcomeInfo {
    /// The group's cipher suite (always [`SUPPORTED_CIPHER_SUITE`]).
    pub fn cipher_suite(&self) -> u16 {
        self.cipher_suite
    }

    /// The KeyPackageRefs of the new members, in wire order: deliver the
    /// Welcome to the holders of exactly these KeyPackages. Never empty.
    pub fn new_members(&self) -> &[KeyPackageRef] {
        &self.new_members
    }
}

/// The public header of a GroupInfo (§12.4.3). Its signature is not checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfoHeader {
    cipher_suite: u16,
    group_id: Vec<u8>,
    epoch: u64,
    signer: u32,
}

impl GroupInfoHeader {
    /// The group's cipher suite (always [`SUPPORTED_CIPHER_SUITE`]).
    pub fn cipher_suite(&self) -> u16 {
        self.cipher_suite
    }

    /// The MLS group id.
    pub fn group_id(&self) -> &[u8] {
        &self.group_id
    }

    /// The epoch the GroupInfo describes.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Leaf index of the member who signed the GroupInfo.
    pub fn signer(&self) -> u32 {
        self.signer
    }
}

/// What a delivery service needs from an MLSMessage (§6), by wire format.
/// Only [`MlsMessageInfo::parse`] makes the contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MlsMessageInfo {
    /// A PublicMessage (only proposals and commits are accepted).
    PublicMessage(FramedMessageInfo),
    /// A PrivateMessage.
    PrivateMessage(FramedMessageInfo),
    /// A Welcome.
    Welcome(WelcomeInfo),
    /// A GroupInfo.
    GroupInfo(GroupInfoHeader),
    /// A KeyPackage, verified as by [`KeyPackageInfo::parse`].
    KeyPackage(Box<KeyPackageInfo>),
}

impl MlsMessageInfo {
    /// Parses a TLS-serialised MLSMessage (RFC 9420 §6).
    ///
    /// Requires protocol version `mls10` and a known wire format, and reads
    /// the whole message: every vector length is checked, a PublicMessage's
    /// proposal or commit is delimited (an unknown proposal type is an
    /// error), a PublicMessage carrying application data is refused, and no
    /// bytes may follow the message.
    pub fn parse(bytes: &[u8]) -> Result<Self, MlsWireError> {
        check_size(bytes)?;
        let mut r = Reader::new(bytes);
        check_version(r.u16("MLSMessage.version")?)?;
        let info = match r.u16("MLSMessage.wire_format")? {
            1 => Self::PublicMessage(parse_public_message(&mut r)?),
            2 => Self::PrivateMessage(parse_private_message(&mut r)?),
            3 => Self::Welcome(parse_welcome(&mut r)?),
            4 => Self::GroupInfo(parse_group_info(&mut r)?),
            5 => Self::KeyPackage(Box::new(parse_key_package(&mut r)?)),
            other => return Err(MlsWireError::UnknownWireFormat(other)),
        };
        r.finish()?;
        Ok(info)
    }

    /// The protocol version (always [`MLS10`]; others are refused).
    pub fn version(&self) -> u16 {
        MLS10
    }

    /// The wire format.
    pub fn wire_format(&self) -> WireFormat {
        match self {
            Self::PublicMessage(_) => WireFormat::PublicMessage,
            Self::PrivateMessage(_) => WireFormat::PrivateMessage,
            Self::Welcome(_) => WireFormat::Welcome,
            Self::GroupInfo(_) => WireFormat::GroupInfo,
            Self::KeyPackage(_) => WireFormat::KeyPackage,
        }
    }

    /// The group id, for messages that name their group in the clear.
    pub fn group_id(&self) -> Option<&[u8]> {
        match self {
            Self::PublicMessage(m) | Self::PrivateMessage(m) => Some(m.group_id()),
            Self::GroupInfo(g) => Some(g.group_id()),
            Self::Welcome(_) | Self::KeyPackage(_) => None,
        }
    }

    /// The epoch, for messages that carry one in the clear.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Self::PublicMessage(m) | Self::PrivateMessage(m) => Some(m.epoch()),
            Self::GroupInfo(g) => Some(g.epoch()),
            Self::Welcome(_) | Self::KeyPackage(_) => None,
        }
    }
}

/// PublicMessage (§6.2): FramedContent, FramedContentAuthData, and a
/// membership tag when the sender is a member.
fn parse_public_message(r: &mut Reader<'_>) -> Result<FramedMessageInfo, MlsWireError> {
    let group_id = r.opaque("FramedContent.group_id")?.to_vec();
    let epoch = r.u64("FramedContent.epoch")?;
    let sender = match r.u8("Sender.sender_type")? {
        1 => Sender::Member {
            leaf_index: r.u32("Sender.leaf_index")?,
        },
        2 => Sender::External {
            sender_index: r.u32("Sender.sender_index")?,
        },
        3 => Sender::NewMemberProposal,
        4 => Sender::NewMemberCommit,
        other => return Err(MlsWireError::UnknownSenderType(other)),
    };
    r.opaque("FramedContent.authenticated_data")?;
    let content_type = ContentType::from_code(r.u8("FramedContent.content_type")?)?;
    match content_type {
        ContentType::Application => return Err(MlsWireError::PlaintextApplicationMessage),
        ContentType::Proposal => parse_proposal(r)?,
        ContentType::Commit => parse_commit(r)?,
    }
    r.opaque("FramedContentAuthData.signature")?;
    if content_type == ContentType::Commit {
        r.opaque("FramedContentAuthData.confirmation_tag")?;
    }
    if matches!(sender, Sender::Member { .. }) {
        r.opaque("PublicMessage.membership_tag")?;
    }
    Ok(FramedMessageInfo {
        group_id,
        epoch,
        content_type,
        sender: Some(sender),
    })
}

/// Commit (§12.4): proposals by value or reference, and an optional
/// UpdatePath. Proposals inside the commit are delimited, not parsed.
fn parse_commit(r: &mut Reader<'_>) -> Result<(), MlsWireError> {
    r.opaque("Commit.proposals")?;
    if r.presence("Commit.path")? {
        parse_leaf_node(r)?;
        r.opaque("UpdatePath.nodes")?;
    }
    Ok(())
}

/// Proposal (§12.1), for the types RFC 9420 defines.
fn parse_proposal(r: &mut Reader<'_>) -> Result<(), MlsWireError> {
    match r.u16("Proposal.proposal_type")? {
        // add
        1 => {
            parse_key_package(r)?;
        }
        // update
        2 => {
            parse_leaf_node(r)?;
        }
        // remove
        3 => {
            r.u32("Remove.removed")?;
        }
        // psk
        4 => parse_psk_id(r)?,
        // reinit
        5 => {
            r.opaque("ReInit.group_id")?;
            r.u16("ReInit.version")?;
            r.u16("ReInit.cipher_suite")?;
            parse_extensions(r, "ReInit.extensions")?;
        }
        // external_init
        6 => {
            r.opaque("ExternalInit.kem_output")?;
        }
        // group_context_extensions
        7 => {
            parse_extensions(r, "GroupContextExtensions.extensions")?;
        }
        other => return Err(MlsWireError::UnsupportedProposal(other)),
    }
    Ok(())
}

/// PreSharedKeyID (§8.4).
fn parse_psk_id(r: &mut Reader<'_>) -> Result<(), MlsWireError> {
    match r.u8("PreSharedKeyID.psktype")? {
        1 => {
            r.opaque("PreSharedKeyID.psk_id")?;
        }
        2 => {
            r.u8("PreSharedKeyID.usage")?;
            r.opaque("PreSharedKeyID.psk_group_id")?;
            r.u64("PreSharedKeyID.psk_epoch")?;
        }
        value => {
            return Err(MlsWireError::InvalidValue {
                field: "PreSharedKeyID.psktype",
                value: u64::from(value),
            })
        }
    }
    r.opaque("PreSharedKeyID.psk_nonce")?;
    Ok(())
}

/// PrivateMessage (§6.3): only the clear header is read.
fn parse_private_message(r: &mut Reader<'_>) -> Result<FramedMessageInfo, MlsWireError> {
    let group_id = r.opaque("PrivateMessage.group_id")?.to_vec();
    let epoch = r.u64("PrivateMessage.epoch")?;
    let content_type = ContentType::from_code(r.u8("PrivateMessage.content_type")?)?;
    r.opaque("PrivateMessage.authenticated_data")?;
    r.opaque("PrivateMessage.encrypted_sender_data")?;
    r.opaque("PrivateMessage.ciphertext")?;
    Ok(FramedMessageInfo {
        group_id,
        epoch,
        content_type,
        sender: None,
    })
}

/// Welcome (§12.4.3.1).
fn parse_welcome(r: &mut Reader<'_>) -> Result<WelcomeInfo, MlsWireError> {
    let cipher_suite = r.u16("Welcome.cipher_suite")?;
    check_cipher_suite(cipher_suite)?;
    let mut secrets = r.vector("Welcome.secrets")?;
    let mut new_members = Vec::new();
    while !secrets.is_empty() {
        if new_members.len() == MAX_WELCOME_SECRETS {
            return Err(MlsWireError::TooMany {
                field: "Welcome.secrets",
                max: MAX_WELCOME_SECRETS,
            });
        }
        let new_member = secrets.opaque_array("EncryptedGroupSecrets.new_member")?;
        secrets.opaque("HPKECiphertext.kem_output")?;
        secrets.opaque("HPKECiphertext.ciphertext")?;
        new_members.push(KeyPackageRef(new_member));
    }
    if new_members.is_empty() {
        return Err(MlsWireError::EmptyWelcome);
    }
    r.opaque("Welcome.encrypted_group_info")?;
    Ok(WelcomeInfo {
        cipher_suite,
        new_members,
    })
}

/// GroupInfo (§12.4.3), with its GroupContext (§8.1).
fn parse_group_info(r: &mut Reader<'_>) -> Result<GroupInfoHeader, MlsWireError> {
    check_version(r.u16("GroupContext.version")?)?;
    let cipher_suite = r.u16("GroupContext.cipher_suite")?;
    check_cipher_suite(cipher_suite)?;
    let group_id = r.opaque("GroupContext.group_id")?.to_vec();
    let epoch = r.u64("GroupContext.epoch")?;
    r.opaque("GroupContext.tree_hash")?;
    r.opaque("GroupContext.confirmed_transcript_hash")?;
    parse_extensions(r, "GroupContext.extensions")?;
    parse_extensions(r, "GroupInfo.extensions")?;
    r.opaque("GroupInfo.confirmation_tag")?;
    let signer = r.u32("GroupInfo.signer")?;
    r.opaque("GroupInfo.signature")?;
    Ok(GroupInfoHeader {
        cipher_suite,
        group_id,
        epoch,
        signer,
    })
}
