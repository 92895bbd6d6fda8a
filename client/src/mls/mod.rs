//! End-to-end encryption of referrals with MLS (RFC 9420, openmls), sans
//! network: every operation takes and returns bytes; carrying them through the
//! gateways (the Delivery Service) is the caller's job.
//!
//! A referral is an MLS group. Its case id travels inside the group context
//! (a private-use extension, so it is encrypted in Welcomes and never visible
//! to a gateway); the group id is random. Ciphersuite:
//! `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519`; every handshake and
//! application message is a `PrivateMessage`, so gateways see only the group
//! id, epoch and content type.
//!
//! Promises:
//! * **Identity.** Our credential is a `BasicCredential` whose identity is our
//!   certificate's SPIFFE URI `spiffe://<area>/user/<id>`. A KeyPackage, a
//!   Welcome or a Commit that brings in anyone else is refused.
//! * **Durability.** State lives in `<data_dir>/mls.sqlite3` (WAL,
//!   `synchronous = FULL`). Each state-changing call commits one transaction
//!   before it returns, so a restart loses no group, key or message.
//! * **Plaintext stays here.** The decrypted chronology (history) of each case
//!   is stored only in this file; [`MlsClient::export_history`] hands it to a
//!   new lead ([`MlsClient::send_history`], inside the group).
//! * **Imported history is checked and marked.** Each entry of a history
//!   export a member sends in the group is judged by the same check as a
//!   chronology message ([`Kept::Imported`]), its sender must be a user
//!   identity, and every imported entry is marked as handed over by whoever
//!   handed it over (`imported_from`), whatever the export says.
//! * **Bad bytes change nothing.** Anything from outside that fails to parse,
//!   authenticate or decrypt yields a typed [`MlsError`]; a replay is
//!   [`MlsError::Replay`], tampering [`MlsError::Tampered`].
//!
//! Application messages are framed as `tag (1 byte) ‖ sent_at_ms (u64 BE) ‖
//! body`: tag 1 is a chronology entry, tag 2 a history hand-over.

mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use openmls::framing::errors::{MessageDecryptionError, SecretTreeError};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::MlsGroupStateError;
use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, Credential, CredentialType, CredentialWithKey,
    Extension, ExtensionType, Extensions, GroupId as MlsGroupId, KeyPackage, KeyPackageIn,
    LeafNodeIndex, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig, MlsMessageBodyIn,
    MlsMessageIn, MlsMessageOut, OpenMlsProvider, ProcessMessageError, ProcessedMessageContent,
    ProtocolMessage, ProtocolVersion, RequiredCapabilitiesExtension, StagedWelcome,
    UnknownExtension, ValidationError, WelcomeError, PURE_CIPHERTEXT_WIRE_FORMAT_POLICY,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use store::{Change, Seen, Store};

/// The one ciphersuite this client speaks.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Private-use group context extension carrying the case id.
const CASE_EXTENSION: u16 = 0xF0CA;
/// How many past epochs' secrets a member keeps, so that a message sent just
/// before a commit still decrypts after it.
pub const MAX_PAST_EPOCHS: usize = 2;
/// Longest accepted case id, in bytes.
const MAX_CASE_ID: usize = 256;

const TAG_CHRONOLOGY: u8 = 1;
const TAG_HISTORY: u8 = 2;
const FRAME_HEADER: usize = 9;
const HISTORY_FORMAT: u32 = 1;

// === errors ===

/// Why an MLS operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MlsError {
    /// The state file could not be read or written; the operation changed
    /// nothing.
    #[error("MLS state storage: {0}")]
    Storage(String),
    /// An identity is not a `spiffe://<area>/user/<id>` URI.
    #[error("not a user identity: {0}")]
    BadIdentity(String),
    /// The state in this data directory belongs to someone else.
    #[error("MLS state belongs to {stored}, not {given}")]
    IdentityMismatch {
        /// The identity in the state file.
        stored: String,
        /// The identity asked for.
        given: String,
    },
    /// Bytes that are not the MLS message expected here.
    #[error("malformed MLS message: {0}")]
    Malformed(String),
    /// A KeyPackage failed validation (signature, version, lifetime, suite).
    #[error("invalid KeyPackage: {0}")]
    InvalidKeyPackage(String),
    /// The message is for a group we do not hold.
    #[error("unknown group {0}")]
    UnknownGroup(GroupId),
    /// The message is from a later epoch of the group than ours: the change
    /// (a Commit) that leads there has not reached us yet (gateways keep
    /// order per link, not across them). Nothing changed; it can be
    /// processed once that change has been.
    #[error("from a later state of the case (epoch {epoch}; this client's is {ours}): a change made before it has not arrived yet")]
    Ahead {
        /// The group.
        group: GroupId,
        /// The message's epoch.
        epoch: u64,
        /// Ours.
        ours: u64,
    },
    /// We were removed from this group: we can no longer read or send.
    #[error("no longer a member of group {0}")]
    NotMember(GroupId),
    /// The Welcome is not encrypted to any KeyPackage of ours.
    #[error("this Welcome is not for us")]
    WelcomeNotForUs,
    /// A message we have already processed (or whose key we have already
    /// used and deleted).
    #[error("message already processed (replay)")]
    Replay,
    /// A Welcome to a group we are in already.
    #[error("already in group {0}")]
    AlreadyInGroup(GroupId),
    /// The message failed authentication: altered in transit or forged.
    #[error("message failed authentication (tampered or forged): {0}")]
    Tampered(String),
    /// The message is for an epoch whose keys we do not hold (too old, or
    /// sent after we were removed).
    #[error("cannot decrypt: {0}")]
    Undecryptable(String),
    /// No member with this identity is in the group.
    #[error("no member {0} in the group")]
    MemberNotFound(String),
    /// A valid message we refuse (e.g. a commit adding a non-user identity).
    #[error("refused: {0}")]
    Refused(String),
    /// A history export that does not parse or is for another case.
    #[error("bad history export: {0}")]
    BadHistory(String),
    /// A KeyPackage given for one person (a handover's new lead) is
    /// someone else's: adding its owner would add a person not named.
    #[error("a KeyPackage given for {named} is {owner}'s: refused")]
    NotTheirKeyPackage {
        /// Whom it was given for (escaped for a terminal, shortened).
        named: String,
        /// Whose it is (the identity in its credential).
        owner: String,
    },
    /// An argument from the caller is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Any other error from openmls.
    #[error("MLS: {0}")]
    Mls(String),
}

fn mls<E: fmt::Display>(e: E) -> MlsError {
    MlsError::Mls(e.to_string())
}

/// An epoch's secret for its commit-proof key (see
/// [`proto::mls::EPOCH_KEY_LABEL`]), as exported.
fn epoch_secret<E: fmt::Display>(exported: Result<Vec<u8>, E>) -> Result<[u8; 32], MlsError> {
    exported
        .map_err(mls)?
        .try_into()
        .map_err(|_| MlsError::Mls("an exported secret of the wrong length".into()))
}

fn malformed<E: fmt::Display>(e: E) -> MlsError {
    MlsError::Malformed(e.to_string())
}

// === public types ===

/// An MLS group id (`home/<area>/` and 16 random bytes for groups we
/// create; see `proto::mls::group_id_with_home`). Displays as hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(Vec<u8>);

impl GroupId {
    /// Wraps raw group id bytes.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> GroupId {
        GroupId(bytes.into())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn mls(&self) -> MlsGroupId {
        MlsGroupId::from_slice(&self.0)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

/// What processing an inbound message did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Processed {
    /// A chronology message from another member (now in the history).
    Application {
        /// The group (referral).
        group: GroupId,
        /// The sender's SPIFFE URI, from its MLS credential.
        sender: String,
        /// The epoch it was sent in.
        epoch: u64,
        /// When the sender says it sent it (ms since the Unix epoch).
        at_ms: u64,
        /// The decrypted content.
        plaintext: Vec<u8>,
    },
    /// Another member's history hand-over, merged into our history.
    HistoryImported {
        /// The group.
        group: GroupId,
        /// Who sent it.
        from: String,
        /// How many entries were new to us.
        imported: usize,
    },
    /// A commit by another member, merged: the group is at `epoch` now.
    Commit {
        /// The group.
        group: GroupId,
        /// Who committed.
        by: String,
        /// The new epoch.
        epoch: u64,
        /// Identities added.
        added: Vec<String>,
        /// Identities removed.
        removed: Vec<String>,
    },
    /// A commit that removed us: the group is inactive for us from now on.
    RemovedUs {
        /// The group.
        group: GroupId,
        /// Who removed us.
        by: String,
    },
    /// Our own message, echoed back by the Delivery Service; nothing to do.
    OwnMessage {
        /// The group.
        group: GroupId,
    },
    /// A message processed here already, come again by another of our
    /// addresses (a member reached both through a team and by name):
    /// nothing new.
    Copy {
        /// The group.
        group: GroupId,
    },
}

/// One entry of a case's chronology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The epoch the message was sent in (as seen by the one who recorded it).
    pub epoch: u64,
    /// The sender's SPIFFE URI.
    pub sender: String,
    /// When the sender says it sent it (ms since the Unix epoch).
    pub at_ms: u64,
    /// The decrypted content.
    #[serde(with = "hex_bytes")]
    pub plaintext: Vec<u8>,
    /// If this entry came in a history hand-over: who handed it over.
    pub imported_from: Option<String>,
}

impl fmt::Display for HistoryEntry {
    /// The entry for a person to read: a header line (when, who, and who
    /// handed it over), then its text, safe for a terminal: its sender and
    /// `imported_from` may be anything a history export said, so they are
    /// escaped as its text is ([`crate::readable`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "--- {} {}",
            crate::time_text(self.at_ms, true),
            crate::one_line(&self.sender)
        )?;
        if let Some(by) = &self.imported_from {
            write!(f, " (handed over by {})", crate::one_line(by))?;
        }
        write!(f, "\n{}", crate::readable(&self.plaintext))
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// The history export format (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct HistoryExport {
    format: u32,
    case_id: String,
    exported_by: String,
    entries: Vec<HistoryEntry>,
}

// === impl Provider ===

/// openmls provider whose storage is the in-memory map we persist.
#[derive(Debug, Default)]
struct Provider {
    crypto: RustCrypto,
    storage: MemoryStorage,
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MemoryStorage;

    fn storage(&self) -> &MemoryStorage {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

impl Provider {
    fn snapshot(&self) -> Result<HashMap<Vec<u8>, Vec<u8>>, MlsError> {
        self.storage
            .values
            .read()
            .map(|m| m.clone())
            .map_err(|_| MlsError::Storage("storage lock poisoned".into()))
    }

    fn replace(&self, values: HashMap<Vec<u8>, Vec<u8>>) -> Result<(), MlsError> {
        let mut guard = self
            .storage
            .values
            .write()
            .map_err(|_| MlsError::Storage("storage lock poisoned".into()))?;
        *guard = values;
        Ok(())
    }
}

// === helpers ===

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Checks that `uri` is exactly `spiffe://<area>/user/<id>` (canonical form).
fn check_user_uri(uri: &str) -> Result<(), MlsError> {
    match certs::Identity::parse_uri(uri) {
        Ok(id @ certs::Identity::User(..)) if id.uri() == uri => Ok(()),
        Ok(_) => Err(MlsError::BadIdentity(short(uri))),
        Err(e) => Err(MlsError::BadIdentity(e.to_string())),
    }
}

fn short(s: &str) -> String {
    s.chars().take(100).collect()
}

/// The SPIFFE URI in a basic credential (not yet checked to be a user URI).
fn identity_of(credential: &Credential) -> Result<String, MlsError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| MlsError::BadIdentity("not a basic credential".into()))?;
    String::from_utf8(basic.identity().to_vec())
        .map_err(|_| MlsError::BadIdentity("identity is not UTF-8".into()))
}

fn user_identity_of(credential: &Credential) -> Result<String, MlsError> {
    let id = identity_of(credential)?;
    check_user_uri(&id)?;
    Ok(id)
}

fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        Some(&[
            ExtensionType::Unknown(CASE_EXTENSION),
            ExtensionType::LastResort,
        ]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}

fn case_id_of(group: &MlsGroup) -> Result<String, MlsError> {
    let ext = group
        .extensions()
        .unknown(CASE_EXTENSION)
        .ok_or_else(|| MlsError::Refused("group carries no case id".into()))?;
    let case_id = String::from_utf8(ext.0.clone())
        .map_err(|_| MlsError::Refused("case id is not UTF-8".into()))?;
    check_case_id(&case_id)?;
    Ok(case_id)
}

/// Checks a case id: 1 to [`MAX_CASE_ID`] bytes, no control characters (so
/// that one shown on a terminal cannot move the cursor or send it
/// commands).
pub(crate) fn check_case_id(case_id: &str) -> Result<(), MlsError> {
    if case_id.is_empty()
        || case_id.len() > MAX_CASE_ID
        || case_id
            .chars()
            .any(|c| c.is_control() || crate::is_bidi_control(c))
    {
        return Err(MlsError::InvalidArgument(format!(
            "case id must be 1..={MAX_CASE_ID} bytes without control characters"
        )));
    }
    Ok(())
}

fn serialize(msg: &MlsMessageOut) -> Result<Vec<u8>, MlsError> {
    msg.tls_serialize_detached().map_err(mls)
}

fn frame(tag: u8, at_ms: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
    out.push(tag);
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn unframe(bytes: &[u8]) -> Option<(u8, u64, &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (at, body) = rest.split_first_chunk::<8>()?;
    Some((tag, u64::from_be_bytes(*at), body))
}

/// Maps openmls's processing errors to ours.
fn classify(e: ProcessMessageError<openmls_memory_storage::MemoryStorageError>) -> MlsError {
    match e {
        ProcessMessageError::ValidationError(v) => match v {
            ValidationError::UnableToDecrypt(d) => match d {
                MessageDecryptionError::SecretTreeError(
                    SecretTreeError::SecretReuseError | SecretTreeError::TooDistantInThePast,
                ) => MlsError::Replay,
                MessageDecryptionError::AeadError | MessageDecryptionError::MalformedContent => {
                    MlsError::Tampered(d.to_string())
                }
                other => MlsError::Undecryptable(other.to_string()),
            },
            ValidationError::InvalidSignature
            | ValidationError::InvalidMembershipTag
            | ValidationError::MissingMembershipTag => MlsError::Tampered(v.to_string()),
            ValidationError::WrongEpoch | ValidationError::NoPastEpochData => {
                MlsError::Undecryptable(v.to_string())
            }
            other => MlsError::Refused(other.to_string()),
        },
        ProcessMessageError::GroupStateError(MlsGroupStateError::UseAfterEviction) => {
            MlsError::Undecryptable("we are no longer a member".into())
        }
        ProcessMessageError::InvalidCommit(c) => MlsError::Refused(c.to_string()),
        ProcessMessageError::StorageError(s) => MlsError::Storage(s.to_string()),
        other => MlsError::Refused(other.to_string()),
    }
}

// === impl MlsClient ===

/// The group, if we hold it and are still a member. A free function so that
/// callers can borrow the provider and signer alongside.
fn active_mut<'a>(
    groups: &'a mut BTreeMap<GroupId, Group>,
    group: &GroupId,
) -> Result<&'a mut Group, MlsError> {
    let g = groups
        .get_mut(group)
        .ok_or_else(|| MlsError::UnknownGroup(group.clone()))?;
    if !g.mls.is_active() {
        return Err(MlsError::NotMember(group.clone()));
    }
    Ok(g)
}

/// A group we hold, with its case id.
#[derive(Debug)]
struct Group {
    mls: MlsGroup,
    case_id: String,
}

/// One user's MLS state: signature key, credential, groups and history.
#[derive(Debug)]
pub struct MlsClient {
    provider: Provider,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    identity: String,
    store: Store,
    groups: BTreeMap<GroupId, Group>,
}

/// A commit made here and left pending ([`MlsClient::stage_add_members`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnCommit {
    /// The Commit, for the group's members.
    pub commit: Vec<u8>,
    /// The Welcome, for those it adds.
    pub welcome: Vec<u8>,
    /// Whom it adds (SPIFFE URIs).
    pub adds: Vec<String>,
    /// The proof that a member of the epoch made it, for the gateway.
    pub proof: proto::CommitProof,
    /// The epoch it was made in.
    pub epoch: u64,
}

/// What [`Keep`] judges before it is kept.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Kept<'a> {
    /// A chronology message's plaintext.
    Message(&'a [u8]),
    /// An entry of a history export a member sent in the group
    /// ([`MlsClient::send_history`]), as it would be kept (its
    /// `imported_from` set to the member who sent it).
    Imported(&'a HistoryEntry),
}

/// Judges what a message brings (a chronology message, or each entry of a
/// history export), given its case id, before it is kept (see
/// [`MlsClient::process_checked`]): why not, if not.
pub type Keep<'a> = dyn Fn(&str, Kept<'_>) -> Result<(), String> + 'a;

impl MlsClient {
    /// Opens the MLS state in `data_dir` (creating it on first use) for the
    /// user `identity_uri` (`spiffe://<area>/user/<id>`). Fails if the state
    /// there belongs to another identity.
    pub fn open(data_dir: &Path, identity_uri: &str) -> Result<MlsClient, MlsError> {
        check_user_uri(identity_uri)?;
        let mut store = Store::open(data_dir)?;
        let provider = Provider::default();
        provider.replace(store.persisted().clone())?;

        let signer = match store.meta("identity")? {
            Some(stored) => {
                let stored = String::from_utf8_lossy(&stored).into_owned();
                if stored != identity_uri {
                    return Err(MlsError::IdentityMismatch {
                        stored,
                        given: identity_uri.to_owned(),
                    });
                }
                let public = store
                    .meta("sig_public")?
                    .ok_or_else(|| MlsError::Storage("signature key missing".into()))?;
                SignatureKeyPair::read(
                    &provider.storage,
                    &public,
                    CIPHERSUITE.signature_algorithm(),
                )
                .ok_or_else(|| MlsError::Storage("signature key missing".into()))?
            }
            None => {
                let signer =
                    SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(mls)?;
                // The key pair lives in openmls's storage, committed below.
                signer
                    .store(&provider.storage)
                    .map_err(|e| MlsError::Storage(e.to_string()))?;
                store.commit(
                    &provider.snapshot()?,
                    &[
                        Change::Meta {
                            key: "sig_public",
                            value: signer.to_public_vec(),
                        },
                        Change::Meta {
                            key: "identity",
                            value: identity_uri.as_bytes().to_vec(),
                        },
                    ],
                )?;
                signer
            }
        };
        let credential = CredentialWithKey {
            credential: BasicCredential::new(identity_uri.as_bytes().to_vec()).into(),
            signature_key: signer.to_public_vec().into(),
        };
        let mut client = MlsClient {
            provider,
            signer,
            credential,
            identity: identity_uri.to_owned(),
            store,
            groups: BTreeMap::new(),
        };
        client.load_groups()?;
        Ok(client)
    }

    /// (Re)loads every group from the provider's storage.
    fn load_groups(&mut self) -> Result<(), MlsError> {
        self.groups.clear();
        for (id, case_id) in self.store.groups()? {
            let mls = MlsGroup::load(&self.provider.storage, &id.mls())
                .map_err(|e| MlsError::Storage(e.to_string()))?
                .ok_or_else(|| MlsError::Storage(format!("group {id} missing from state")))?;
            self.groups.insert(id, Group { mls, case_id });
        }
        Ok(())
    }

    /// Commits the provider's storage plus `changes` in one transaction. On
    /// failure, puts memory back to the last committed state.
    fn persist(&mut self, changes: &[Change]) -> Result<usize, MlsError> {
        let result = match self.provider.storage.values.read() {
            // Diff under the read lock: no copy of the whole map.
            Ok(now) => self.store.commit(&now, changes),
            Err(_) => Err(MlsError::Storage("storage lock poisoned".into())),
        };
        if result.is_err() {
            self.rollback();
        }
        result
    }

    /// Discards in-memory changes since the last commit.
    fn rollback(&mut self) {
        // Best effort: if even this fails the caller already has an error,
        // and reopening the client restores the committed state.
        if self
            .provider
            .replace(self.store.persisted().clone())
            .is_ok()
        {
            let _ = self.load_groups();
        }
    }

    /// Runs `op`; if it fails, discards whatever it changed in memory.
    fn atomically<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, MlsError>,
    ) -> Result<T, MlsError> {
        let result = op(self);
        if result.is_err() {
            self.rollback();
        }
        result
    }

    fn group(&self, group: &GroupId) -> Result<&Group, MlsError> {
        self.groups
            .get(group)
            .ok_or_else(|| MlsError::UnknownGroup(group.clone()))
    }

    /// Our SPIFFE URI.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    // --- key packages ---

    /// Makes `n` one-time KeyPackages (TLS-serialised `KeyPackage`s) to
    /// publish through the gateway. Their private keys are kept here until a
    /// Welcome uses them.
    pub fn key_packages(&mut self, n: usize) -> Result<Vec<Vec<u8>>, MlsError> {
        self.atomically(|c| {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(c.make_key_package(false)?);
            }
            c.persist(&[])?;
            Ok(out)
        })
    }

    /// Makes a last-resort KeyPackage (RFC 9420 `last_resort` extension): the
    /// gateway hands it out when the one-time ones run out, and it may be used
    /// by several Welcomes. Replace it from time to time.
    pub fn last_resort_key_package(&mut self) -> Result<Vec<u8>, MlsError> {
        self.atomically(|c| {
            let kp = c.make_key_package(true)?;
            c.persist(&[])?;
            Ok(kp)
        })
    }

    fn make_key_package(&self, last_resort: bool) -> Result<Vec<u8>, MlsError> {
        let mut builder = KeyPackage::builder().leaf_node_capabilities(capabilities());
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .map_err(mls)?;
        bundle.key_package().tls_serialize_detached().map_err(mls)
    }

    /// The identity (SPIFFE URI) of a KeyPackage from someone else, once
    /// it is validated (signatures, lifetime against this clock, suite).
    pub fn key_package_identity(&self, key_package: &[u8]) -> Result<String, MlsError> {
        self.validate_key_package(key_package).map(|(_, id)| id)
    }

    /// The reference (RFC 9420 `KeyPackageRef`) of a KeyPackage from someone
    /// else, once it is validated: a Welcome made with it names it.
    pub fn key_package_ref(&self, key_package: &[u8]) -> Result<Vec<u8>, MlsError> {
        let (kp, _) = self.validate_key_package(key_package)?;
        let r = kp.hash_ref(self.provider.crypto()).map_err(mls)?;
        Ok(r.as_slice().to_vec())
    }

    /// The references of the KeyPackages a Welcome is for (one per member
    /// it adds; see [`MlsClient::key_package_ref`]).
    pub fn welcome_refs(welcome: &[u8]) -> Result<Vec<Vec<u8>>, MlsError> {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome).map_err(malformed)?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(MlsError::Malformed("not a Welcome".into()));
        };
        Ok(welcome
            .secrets()
            .iter()
            .map(|s| s.new_member().as_slice().to_vec())
            .collect())
    }

    /// Checks that a KeyPackage from someone else is valid and `named`'s
    /// own: its credential's identity is exactly `named`
    /// ([`MlsError::NotTheirKeyPackage`] if it is someone else's).
    pub fn check_key_package_of(&self, key_package: &[u8], named: &str) -> Result<(), MlsError> {
        self.validate_key_package_of(key_package, named).map(|_| ())
    }

    /// As `validate_key_package`, and the KeyPackage must be `named`'s.
    fn validate_key_package_of(
        &self,
        bytes: &[u8],
        named: &str,
    ) -> Result<(KeyPackage, String), MlsError> {
        let (kp, owner) = self.validate_key_package(bytes)?;
        if owner != named {
            return Err(MlsError::NotTheirKeyPackage {
                named: crate::one_line(&short(named)),
                owner,
            });
        }
        Ok((kp, owner))
    }

    /// Parses and validates a KeyPackage from someone else, and checks its
    /// credential is a user URI. Returns it with that identity.
    fn validate_key_package(&self, bytes: &[u8]) -> Result<(KeyPackage, String), MlsError> {
        let kp_in = KeyPackageIn::tls_deserialize_exact(bytes)
            .map_err(|e| MlsError::InvalidKeyPackage(e.to_string()))?;
        let kp = kp_in
            .validate(&self.provider.crypto, ProtocolVersion::Mls10)
            .map_err(|e| MlsError::InvalidKeyPackage(e.to_string()))?;
        if kp.ciphersuite() != CIPHERSUITE {
            return Err(MlsError::InvalidKeyPackage(format!(
                "ciphersuite {:?}",
                kp.ciphersuite()
            )));
        }
        // A case's group requires it (its id is in the group context): a
        // member whose client lacks it could not be added.
        let case_ids = ExtensionType::Unknown(CASE_EXTENSION);
        if !kp
            .leaf_node()
            .capabilities()
            .extensions()
            .contains(&case_ids)
        {
            return Err(MlsError::InvalidKeyPackage(
                "its client does not support case ids".into(),
            ));
        }
        let id = user_identity_of(kp.leaf_node().credential())?;
        Ok((kp, id))
    }

    // --- groups ---

    /// Creates the group for a referral, with us as its only member.
    pub fn create_group(&mut self, case_id: &str) -> Result<GroupId, MlsError> {
        check_case_id(case_id)?;
        self.atomically(|c| {
            let extensions = Extensions::from_vec(vec![
                Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
                    &[ExtensionType::Unknown(CASE_EXTENSION)],
                    &[],
                    &[CredentialType::Basic],
                )),
                Extension::Unknown(
                    CASE_EXTENSION,
                    UnknownExtension(case_id.as_bytes().to_vec()),
                ),
            ])
            .map_err(mls)?;
            let config = MlsGroupCreateConfig::builder()
                .ciphersuite(CIPHERSUITE)
                .use_ratchet_tree_extension(true)
                .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
                .max_past_epochs(MAX_PAST_EPOCHS)
                .capabilities(capabilities())
                .with_group_context_extensions(extensions)
                .build();
            // The group's home is our area: its gateway orders the group's
            // Commits, wherever members are (see `proto::mls::home_of_group`).
            let home = match certs::Identity::parse_uri(&c.identity) {
                Ok(certs::Identity::User(area, _)) => area,
                _ => return Err(MlsError::BadIdentity(short(&c.identity))),
            };
            let group_id = proto::mls::group_id_with_home(&home, &rand::random::<[u8; 16]>());
            let mls_group = MlsGroup::new_with_group_id(
                &c.provider,
                &c.signer,
                &config,
                openmls::group::GroupId::from_slice(&group_id),
                c.credential.clone(),
            )
            .map_err(mls)?;
            let id = GroupId(mls_group.group_id().to_vec());
            c.groups.insert(
                id.clone(),
                Group {
                    mls: mls_group,
                    case_id: case_id.to_owned(),
                },
            );
            c.persist(&[Change::Group {
                group: id.clone(),
                case_id: case_id.to_owned(),
                created_ms: now_ms(),
                welcome: None,
            }])?;
            Ok(id)
        })
    }

    /// Adds the owners of `key_packages` (validated; each must be a user
    /// URI) in one commit, merged here at once. Returns `(commit, welcome)`:
    /// the commit goes to the existing members, the Welcome to the new ones.
    /// (Its proof is left out: see [`MlsClient::add_members_proven`].)
    pub fn add_members(
        &mut self,
        group: &GroupId,
        key_packages: &[Vec<u8>],
    ) -> Result<(Vec<u8>, Vec<u8>), MlsError> {
        let own = self.add_members_proven(group, key_packages)?;
        Ok((own.commit, own.welcome))
    }

    /// As [`MlsClient::add_members`], with the Commit's proof: a group's
    /// maker has its home bind the group's first epoch with it before the
    /// Welcome goes out.
    pub fn add_members_proven(
        &mut self,
        group: &GroupId,
        key_packages: &[Vec<u8>],
    ) -> Result<OwnCommit, MlsError> {
        self.add(group, key_packages, true)
    }

    /// As [`MlsClient::add_members`], but the commit is left pending here:
    /// merged by [`MlsClient::confirm_commit`] once the Delivery Service has
    /// taken it, dropped by [`MlsClient::abandon_commit`] if it took another
    /// for the epoch (or by processing that other one). Until then the
    /// group stays at its epoch, as the other members do: a commit the
    /// Delivery Service refused forks nothing. (Commits travel encrypted,
    /// so one that comes back is known as ours only by its digest: it
    /// tells nothing of whether the Delivery Service took it first.)
    /// Also returns who it adds (their SPIFFE URIs).
    pub fn stage_add_members(
        &mut self,
        group: &GroupId,
        key_packages: &[Vec<u8>],
    ) -> Result<OwnCommit, MlsError> {
        self.add(group, key_packages, false)
    }

    /// One commit adding the owners of `key_packages` (validated), merged
    /// at once if `merge`, else left pending; with whom it adds.
    fn add(
        &mut self,
        group: &GroupId,
        key_packages: &[Vec<u8>],
        merge: bool,
    ) -> Result<OwnCommit, MlsError> {
        if key_packages.is_empty() {
            return Err(MlsError::InvalidArgument("no KeyPackages".into()));
        }
        let (kps, adds): (Vec<_>, Vec<_>) = key_packages
            .iter()
            .map(|b| self.validate_key_package(b))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let own = self.commit_change(group, Vec::new(), kps, merge)?;
        Ok(OwnCommit { adds, ..own })
    }

    /// Whether our own commit in `group` waits for the Delivery Service.
    pub fn has_pending_commit(&self, group: &GroupId) -> bool {
        self.group(group)
            .is_ok_and(|g| g.mls.pending_commit().is_some())
    }

    /// Merges our pending commit `commit` in `group`: the Delivery Service
    /// took it. Nothing to do if none is pending.
    pub fn confirm_commit(&mut self, group: &GroupId, commit: &[u8]) -> Result<(), MlsError> {
        self.atomically(|c| {
            let g = active_mut(&mut c.groups, group)?;
            if g.mls.pending_commit().is_some() {
                g.mls.merge_pending_commit(&c.provider).map_err(mls)?;
            }
            c.persist(&[Change::Seen {
                digest: sha256(commit),
                kind: Seen::Own,
                via: None,
            }])?;
            Ok(())
        })
    }

    /// Drops our pending commit in `group`: the Delivery Service took
    /// another member's for the epoch.
    pub fn abandon_commit(&mut self, group: &GroupId) -> Result<(), MlsError> {
        self.atomically(|c| {
            let g = active_mut(&mut c.groups, group)?;
            g.mls
                .clear_pending_commit(&c.provider.storage)
                .map_err(|e| MlsError::Storage(e.to_string()))?;
            c.persist(&[])?;
            Ok(())
        })
    }

    /// Hands the case over: one commit that adds the new lead `new_lead`
    /// (from its KeyPackage, which must be theirs:
    /// [`MlsError::NotTheirKeyPackage`] otherwise) and removes every leaf
    /// of `old_lead`, left pending as by [`MlsClient::stage_add_members`].
    pub fn handover(
        &mut self,
        group: &GroupId,
        new_lead_key_package: &[u8],
        new_lead: &str,
        old_lead: &str,
    ) -> Result<OwnCommit, MlsError> {
        let (kp, new_lead) = self.validate_key_package_of(new_lead_key_package, new_lead)?;
        if new_lead == old_lead {
            return Err(MlsError::InvalidArgument(
                "new lead and old lead are the same".into(),
            ));
        }
        let leaves = self.leaves_of(group, old_lead)?;
        let own = self.commit_change(group, leaves, vec![kp], false)?;
        Ok(OwnCommit {
            adds: vec![new_lead],
            ..own
        })
    }

    /// Removes every leaf of `member` in one commit, merged here. Returns the
    /// commit for the other members (without its proof: a gateway whose
    /// record of the group names keys refuses it).
    pub fn remove_member(&mut self, group: &GroupId, member: &str) -> Result<Vec<u8>, MlsError> {
        let leaves = self.leaves_of(group, member)?;
        Ok(self.commit_change(group, leaves, Vec::new(), true)?.commit)
    }

    fn leaves_of(&self, group: &GroupId, member: &str) -> Result<Vec<LeafNodeIndex>, MlsError> {
        if member == self.identity {
            return Err(MlsError::InvalidArgument(
                "cannot remove ourselves with our own commit".into(),
            ));
        }
        let leaves: Vec<LeafNodeIndex> = self
            .group(group)?
            .mls
            .members()
            .filter(|m| identity_of(&m.credential).is_ok_and(|id| id == member))
            .map(|m| m.index)
            .collect();
        if leaves.is_empty() {
            return Err(MlsError::MemberNotFound(short(member)));
        }
        Ok(leaves)
    }

    /// One commit removing `removals` and adding `adds`, merged at once if
    /// `merge`, else left pending. Returns the commit, (empty if nobody was
    /// added) the Welcome, and its proof; `adds` is left to the caller.
    fn commit_change(
        &mut self,
        group: &GroupId,
        removals: Vec<LeafNodeIndex>,
        adds: Vec<KeyPackage>,
        merge: bool,
    ) -> Result<OwnCommit, MlsError> {
        self.atomically(|c| {
            let g = active_mut(&mut c.groups, group)?;
            let epoch = g.mls.epoch().as_u64();
            let this_epoch = epoch_secret(g.mls.export_secret(
                &c.provider.crypto,
                proto::mls::EPOCH_KEY_LABEL,
                &[],
                32,
            ))?;
            let bundle = g
                .mls
                .commit_builder()
                .propose_removals(removals)
                .propose_adds(adds)
                .load_psks(&c.provider.storage)
                .map_err(mls)?
                .build(&c.provider.crypto, &c.provider.crypto, &c.signer, |_| true)
                .map_err(mls)?
                .stage_commit(&c.provider)
                .map_err(mls)?;
            let (commit, welcome, _) = bundle.into_messages();
            let commit = serialize(&commit)?;
            let welcome = match welcome {
                Some(w) => serialize(&w)?,
                None => Vec::new(),
            };
            // The key of the epoch this Commit starts, named to the gateway
            // so that it can check the next Commit's proof.
            let next_epoch = epoch_secret(
                g.mls
                    .pending_commit()
                    .ok_or_else(|| MlsError::Mls("the commit was not staged".into()))?
                    .export_secret(&c.provider.crypto, proto::mls::EPOCH_KEY_LABEL, &[], 32),
            )?;
            let proof = proto::CommitProof::make(
                &this_epoch,
                &next_epoch,
                &hex::encode(&group.0),
                epoch,
                &proto::ContentHash(sha256(&commit)),
            );
            if merge {
                g.mls.merge_pending_commit(&c.provider).map_err(mls)?;
            }
            c.persist(&[Change::Seen {
                digest: sha256(&commit),
                kind: Seen::Own,
                via: None,
            }])?;
            Ok(OwnCommit {
                commit,
                welcome,
                adds: Vec::new(),
                proof,
                epoch,
            })
        })
    }

    /// Joins a group from a Welcome. Returns the group id and its case id.
    /// Refuses a Welcome not encrypted to one of our KeyPackages
    /// ([`MlsError::WelcomeNotForUs`]) and a group with a member whose
    /// identity is not a user URI. A Welcome joined by before is
    /// [`MlsError::AlreadyInGroup`] (its digest is kept with the group).
    pub fn join(&mut self, welcome: &[u8]) -> Result<(GroupId, String), MlsError> {
        // The same Welcome again (its KeyPackage used up by the first
        // join, so it would read as not for us): in that group already.
        let digest = sha256(welcome);
        if let Some(group) = self.store.joined_by(&digest)? {
            if self.groups.contains_key(&group) {
                return Err(MlsError::AlreadyInGroup(group));
            }
        }
        let msg = MlsMessageIn::tls_deserialize_exact(welcome).map_err(malformed)?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(MlsError::Malformed("not a Welcome".into()));
        };
        self.atomically(|c| {
            let staged =
                StagedWelcome::new_from_welcome(&c.provider, &join_config(), welcome, None)
                    .map_err(|e| match e {
                        WelcomeError::NoMatchingKeyPackage
                        | WelcomeError::NoMatchingEncryptionKey => MlsError::WelcomeNotForUs,
                        other => MlsError::Refused(other.to_string()),
                    })?;
            let mls_group = staged.into_group(&c.provider).map_err(mls)?;
            for m in mls_group.members() {
                user_identity_of(&m.credential)?;
            }
            let case_id = case_id_of(&mls_group)?;
            let id = GroupId(mls_group.group_id().to_vec());
            if c.groups.contains_key(&id) {
                return Err(MlsError::AlreadyInGroup(id));
            }
            // Whoever makes a group names its case: a second group naming a
            // case we are in is someone else's, not the case.
            if c.groups.values().any(|g| g.case_id == case_id) {
                return Err(MlsError::Refused(format!(
                    "a Welcome into another group for case {case_id}, which this client is in already"
                )));
            }
            c.groups.insert(
                id.clone(),
                Group {
                    mls: mls_group,
                    case_id: case_id.clone(),
                },
            );
            c.persist(&[Change::Group {
                group: id.clone(),
                case_id: case_id.clone(),
                created_ms: now_ms(),
                welcome: Some(digest),
            }])?;
            Ok((id, case_id))
        })
    }

    // --- messages ---

    /// Encrypts a chronology message to the group and records it in our
    /// history as sent by us.
    pub fn encrypt(&mut self, group: &GroupId, plaintext: &[u8]) -> Result<Vec<u8>, MlsError> {
        let at_ms = now_ms();
        let framed = frame(TAG_CHRONOLOGY, at_ms, plaintext);
        let identity = self.identity.clone();
        self.atomically(|c| {
            let g = active_mut(&mut c.groups, group)?;
            let epoch = g.mls.epoch().as_u64();
            let out = g
                .mls
                .create_message(&c.provider, &c.signer, &framed)
                .map_err(mls)?;
            let bytes = serialize(&out)?;
            c.persist(&[
                Change::Seen {
                    digest: sha256(&bytes),
                    kind: Seen::Own,
                    via: None,
                },
                Change::History {
                    group: group.clone(),
                    entry: HistoryEntry {
                        epoch,
                        sender: identity,
                        at_ms,
                        plaintext: plaintext.to_vec(),
                        imported_from: None,
                    },
                },
            ])?;
            Ok(bytes)
        })
    }

    /// Processes a handshake or application message from the Delivery
    /// Service. Commits by others are merged at once.
    pub fn process(&mut self, bytes: &[u8]) -> Result<Processed, MlsError> {
        self.process_checked(bytes, None, &|_, _| Ok(()))
    }

    /// As [`MlsClient::process`], with `keep` judging a chronology
    /// message's plaintext, and each entry of a history export (given
    /// their case id), before it is kept: a message it refuses (an export
    /// with one entry it refuses) is not written to the history (its key
    /// is used up all the same) and comes back as [`MlsError::Refused`].
    ///
    /// `via` is the address it came by (`user:…` or `team:…`), when known:
    /// the same message again by another of our addresses (a member reached
    /// both through a team and by name) is [`Processed::Copy`], not a
    /// replay.
    pub fn process_checked(
        &mut self,
        bytes: &[u8],
        via: Option<&str>,
        keep: &Keep<'_>,
    ) -> Result<Processed, MlsError> {
        let digest = sha256(bytes);
        let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(malformed)?;
        let protocol: ProtocolMessage = match msg.extract() {
            MlsMessageBodyIn::PrivateMessage(m) => m.into(),
            MlsMessageBodyIn::PublicMessage(m) => m.into(),
            MlsMessageBodyIn::Welcome(_) => {
                return Err(MlsError::Malformed("a Welcome: use join".into()))
            }
            _ => return Err(MlsError::Malformed("not a group message".into())),
        };
        let group = GroupId(protocol.group_id().to_vec());
        match self.store.seen(&digest)? {
            Some((Seen::Own, _)) => return Ok(Processed::OwnMessage { group }),
            Some((Seen::Inbound, first)) => {
                let Some(via) = via else {
                    return Err(MlsError::Replay);
                };
                // Once by each of our addresses; again by any is a replay.
                if first.as_deref().is_none_or(|f| f == via)
                    || self.store.copy_seen(&digest, via)?
                {
                    return Err(MlsError::Replay);
                }
                let via = via.to_owned();
                return self.atomically(|c| {
                    c.persist(&[Change::Copy { digest, via }])?;
                    Ok(Processed::Copy { group })
                });
            }
            None => {}
        }
        let via = via.map(str::to_owned);
        self.atomically(|c| c.process_protocol(group, protocol, digest, via, keep))
    }

    fn process_protocol(
        &mut self,
        group: GroupId,
        protocol: ProtocolMessage,
        digest: [u8; 32],
        via: Option<String>,
        keep: &Keep<'_>,
    ) -> Result<Processed, MlsError> {
        let g = active_mut(&mut self.groups, &group)?;
        let (epoch, ours) = (protocol.epoch().as_u64(), g.mls.epoch().as_u64());
        if epoch > ours {
            return Err(MlsError::Ahead { group, epoch, ours });
        }
        // The case id this client recorded when it joined (not one a member
        // may have set in the group since), for `keep`.
        let case_id = g.case_id.clone();
        let processed = g
            .mls
            .process_message(&self.provider, protocol)
            .map_err(classify)?;
        let epoch = processed.epoch().as_u64();
        let sender = identity_of(processed.credential());
        let seen = Change::Seen {
            digest,
            kind: Seen::Inbound,
            via,
        };
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                let sender = sender?;
                let bytes = app.into_bytes();
                let Some((tag, at_ms, body)) = unframe(&bytes) else {
                    self.persist(&[seen])?;
                    return Err(MlsError::Malformed("application frame too short".into()));
                };
                match tag {
                    TAG_CHRONOLOGY => {
                        if let Err(reason) = keep(&case_id, Kept::Message(body)) {
                            self.persist(&[seen])?;
                            return Err(MlsError::Refused(reason));
                        }
                        let entry = HistoryEntry {
                            epoch,
                            sender: sender.clone(),
                            at_ms,
                            plaintext: body.to_vec(),
                            imported_from: None,
                        };
                        self.persist(&[
                            seen,
                            Change::History {
                                group: group.clone(),
                                entry,
                            },
                        ])?;
                        Ok(Processed::Application {
                            group,
                            sender,
                            epoch,
                            at_ms,
                            plaintext: body.to_vec(),
                        })
                    }
                    TAG_HISTORY => {
                        // Each entry judged as a chronology message is: an
                        // export is no way round the receiver's check.
                        let judged =
                            self.history_entries(&group, body, &sender)
                                .and_then(|entries| {
                                    for entry in &entries {
                                        keep(&case_id, Kept::Imported(entry))
                                            .map_err(MlsError::Refused)?;
                                    }
                                    Ok(entries)
                                });
                        let entries = match judged {
                            Ok(entries) => entries,
                            Err(e) => {
                                self.persist(&[seen])?;
                                return Err(e);
                            }
                        };
                        let mut all = vec![seen];
                        all.extend(entries.into_iter().map(|entry| Change::History {
                            group: group.clone(),
                            entry,
                        }));
                        let imported = self.persist(&all)?;
                        Ok(Processed::HistoryImported {
                            group,
                            from: sender,
                            imported,
                        })
                    }
                    other => {
                        self.persist(&[seen])?;
                        Err(MlsError::Malformed(format!(
                            "unknown application frame tag {other}"
                        )))
                    }
                }
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let by = sender?;
                let mut added = Vec::new();
                for add in staged.add_proposals() {
                    added.push(user_identity_of(
                        add.add_proposal().key_package().leaf_node().credential(),
                    )?);
                }
                if let Some(leaf) = staged.update_path_leaf_node() {
                    user_identity_of(leaf.credential())?;
                }
                let mut removed = Vec::new();
                for rem in staged.remove_proposals() {
                    if let Some(cred) = g.mls.member(rem.remove_proposal().removed()) {
                        removed.push(identity_of(cred)?);
                    }
                }
                let removed_us = staged.self_removed();
                g.mls
                    .merge_staged_commit(&self.provider, *staged)
                    .map_err(mls)?;
                let epoch = g.mls.epoch().as_u64();
                self.persist(&[seen])?;
                if removed_us {
                    Ok(Processed::RemovedUs { group, by })
                } else {
                    Ok(Processed::Commit {
                        group,
                        by,
                        epoch,
                        added,
                        removed,
                    })
                }
            }
            ProcessedMessageContent::OwnPendingCommit => {
                g.mls.merge_pending_commit(&self.provider).map_err(mls)?;
                self.persist(&[seen])?;
                Ok(Processed::OwnMessage { group })
            }
            ProcessedMessageContent::OwnPrivateMessage => Ok(Processed::OwnMessage { group }),
            ProcessedMessageContent::ProposalMessage(_)
            | ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(MlsError::Refused(
                "standalone proposals are not used in referral groups".into(),
            )),
        }
    }

    // --- inspection ---

    /// The group's current epoch.
    pub fn epoch(&self, group: &GroupId) -> Result<u64, MlsError> {
        Ok(self.group(group)?.mls.epoch().as_u64())
    }

    /// The identities (SPIFFE URIs) of the group's members, in leaf order.
    pub fn members(&self, group: &GroupId) -> Result<Vec<String>, MlsError> {
        let g = self.group(group)?;
        if !g.mls.is_active() {
            return Err(MlsError::NotMember(group.clone()));
        }
        g.mls
            .members()
            .map(|m| identity_of(&m.credential))
            .collect()
    }

    /// Whether we are still a member of the group.
    pub fn is_active(&self, group: &GroupId) -> Result<bool, MlsError> {
        Ok(self.group(group)?.mls.is_active())
    }

    /// The case id of a group.
    pub fn case_id(&self, group: &GroupId) -> Result<&str, MlsError> {
        Ok(&self.group(group)?.case_id)
    }

    /// Every group we hold (including ones we were removed from), with its
    /// case id, in the order we got them.
    pub fn groups(&self) -> Result<Vec<(GroupId, String)>, MlsError> {
        self.store.groups()
    }

    // --- history ---

    /// The group's chronology as recorded here, oldest first.
    pub fn history(&self, group: &GroupId) -> Result<Vec<HistoryEntry>, MlsError> {
        self.group(group)?;
        self.store.history(group)
    }

    /// The entries of a history export (see [`MlsClient::export_history`]),
    /// to look at before it is imported.
    pub fn export_entries(export: &[u8]) -> Result<Vec<HistoryEntry>, MlsError> {
        let export: HistoryExport =
            serde_json::from_slice(export).map_err(|e| MlsError::BadHistory(e.to_string()))?;
        if export.format != HISTORY_FORMAT {
            return Err(MlsError::BadHistory(format!("format {}", export.format)));
        }
        Ok(export.entries)
    }

    /// The group's chronology as JSON, for a new lead.
    pub fn export_history(&self, group: &GroupId) -> Result<Vec<u8>, MlsError> {
        let export = HistoryExport {
            format: HISTORY_FORMAT,
            case_id: self.group(group)?.case_id.clone(),
            exported_by: self.identity.clone(),
            entries: self.store.history(group)?,
        };
        serde_json::to_vec(&export).map_err(|e| MlsError::BadHistory(e.to_string()))
    }

    /// Merges a history export from `from` (whom the caller authenticated,
    /// e.g. as the sender of the MLS message that carried it, and whose
    /// entries the caller checked) into our history of `group`. Entries
    /// already present are skipped; returns how many were new. The export
    /// must be for this group's case, made by `from`, and name only user
    /// identities as senders; each entry is recorded as handed over by
    /// `from`.
    pub fn import_history(
        &mut self,
        group: &GroupId,
        from: &str,
        export: &[u8],
    ) -> Result<usize, MlsError> {
        let changes: Vec<Change> = self
            .history_entries(group, export, from)?
            .into_iter()
            .map(|entry| Change::History {
                group: group.clone(),
                entry,
            })
            .collect();
        self.persist(&changes)
    }

    /// The entries of a history export from `from` for `group`, as they
    /// are to be kept: `imported_from` is `from`, who vouches for them (an
    /// export cannot pass its entries off as handed over by someone else,
    /// or as not handed over at all).
    fn history_entries(
        &self,
        group: &GroupId,
        export: &[u8],
        from: &str,
    ) -> Result<Vec<HistoryEntry>, MlsError> {
        let export: HistoryExport =
            serde_json::from_slice(export).map_err(|e| MlsError::BadHistory(e.to_string()))?;
        if export.format != HISTORY_FORMAT {
            return Err(MlsError::BadHistory(format!("format {}", export.format)));
        }
        let case_id = &self.group(group)?.case_id;
        if &export.case_id != case_id {
            return Err(MlsError::BadHistory("export is for another case".into()));
        }
        if export.exported_by != from {
            return Err(MlsError::BadHistory(
                "export was not made by its sender".into(),
            ));
        }
        export
            .entries
            .into_iter()
            .map(|mut entry| {
                check_user_uri(&entry.sender).map_err(|_| {
                    MlsError::BadHistory("an entry's sender is not a user identity".into())
                })?;
                entry.imported_from = Some(from.to_owned());
                Ok(entry)
            })
            .collect()
    }

    /// Encrypts our history of the group to the group (e.g. right after a
    /// [`MlsClient::handover`]); every current member who processes it merges
    /// it into its own history ([`Processed::HistoryImported`]).
    pub fn send_history(&mut self, group: &GroupId) -> Result<Vec<u8>, MlsError> {
        let export = self.export_history(group)?;
        let framed = frame(TAG_HISTORY, now_ms(), &export);
        self.atomically(|c| {
            let g = active_mut(&mut c.groups, group)?;
            let out = g
                .mls
                .create_message(&c.provider, &c.signer, &framed)
                .map_err(mls)?;
            let bytes = serialize(&out)?;
            c.persist(&[Change::Seen {
                digest: sha256(&bytes),
                kind: Seen::Own,
                via: None,
            }])?;
            Ok(bytes)
        })
    }
}
