//! Referrals as MLS groups, over the gateway: the worker's side of the
//! Delivery Service.
//!
//! A referral (case) is an MLS group. [`Caseworker::refer`] claims the
//! recipient's members' KeyPackages through the gateways, creates the group,
//! adds them and sends the Welcome and the first message; [`Caseworker::read`]
//! takes MLS messages from the inbox in order, joins, decrypts, applies
//! membership changes and acknowledges. Plaintext exists only here, in the
//! client's data directory; the gateways carry ciphertext.
//!
//! Each case remembers the addresses its messages go to (the lead's user
//! address and the receiving team's address); commits update them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use proto::{
    AreaId, Body, Category, IdempotencyKey, MessageId, MessageKind, Recipient, SubmitRequest,
    Target,
};
use serde::{Deserialize, Serialize};

use crate::mls::{GroupId, HistoryEntry, Kept, MlsClient, MlsError, Processed};
use crate::{Api, ClientConfig, ClientError};

/// Why a case operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaseError {
    /// Talking to the gateway failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The MLS layer refused.
    #[error("MLS: {0}")]
    Mls(#[from] MlsError),
    /// No such case on this client.
    #[error("no case {0:?} on this client")]
    UnknownCase(String),
    /// What was read could not be shown (see [`Caseworker::show_as_read`]):
    /// the message it came from, and those after it, are not
    /// acknowledged.
    #[error("could not show what was read: {0}; it was not acknowledged")]
    Output(String),
    /// Nobody in the recipient has published KeyPackages.
    #[error("no member of {0} can be reached yet: none has published keys")]
    NoMembers(String),
    /// The case metadata file is unreadable.
    #[error("case metadata {path}: {message}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An argument is not usable.
    #[error("{0}")]
    Invalid(String),
    /// A case id in what another user sent (a handover's transfer) that
    /// is not one: empty, too long, or holding control characters (a
    /// terminal escape, say). What carried it is refused.
    #[error("refused: a case id must be 1 to 256 bytes without control characters, not \"{0}\"")]
    InvalidCaseId(
        /// The id, shortened and escaped for a terminal.
        String,
    ),
    /// A referral was made and kept, but could not all be sent now (its
    /// gateway out of reach, say): the same `refer` again with its key
    /// sends the rest, the same case (without the key, a second one).
    #[error("{error}; the referral (case {case_id}) is kept: run the same `client refer` again with `--key {key}` to finish it (without that key it would make a second case)")]
    ReferralKept {
        /// Its idempotency key.
        key: String,
        /// Its case.
        case_id: String,
        /// Why it could not all be sent now.
        #[source]
        error: Box<CaseError>,
    },
    /// An earlier message to the case, kept because it could not be sent,
    /// still cannot be: nothing new was made or sent (the case's messages
    /// go in order).
    #[error("{error}; an earlier message to case {case_id} is kept and still waits to be sent: nothing new was sent. `client read` sends it; then send this one")]
    EarlierKept {
        /// The case.
        case_id: String,
        /// Why the earlier one cannot be sent now.
        #[source]
        error: Box<CaseError>,
    },
    /// A message to a case could not be sent to every address now (its
    /// gateway out of reach, say): it is kept, and the next `read` or
    /// message to the case sends it again, the same bytes under the same
    /// keys, so no address gets it twice.
    #[error("{error}; the message is kept, and the next `client read` (or message to the case) sends it again: do not send it again yourself")]
    Kept {
        /// Why it could not be sent now.
        #[source]
        error: Box<CaseError>,
    },
    /// `read` stopped part way: `events` were read (and acknowledged)
    /// before `error`; the messages after it stay in the inbox.
    #[error("{error} (after reading {} message(s); run read again for the rest)", events.len())]
    Interrupted {
        /// What was read before the error.
        events: Vec<Event>,
        /// What stopped the read.
        error: Box<CaseError>,
    },
    /// Another client kept the data directory for too long.
    #[error(
        "another client is still using {0} (a `read --wait` loop?); try again when it has finished"
    )]
    Busy(PathBuf),
    /// The gateway took another member's change to the case for the same
    /// epoch (`stale_epoch`): ours was dropped here and nothing changed.
    #[error("another member changed case {0} at the same time, so nothing was changed: read, then try again")]
    Overtaken(String),
}

/// What reading the inbox brought.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// We joined a case.
    Joined {
        /// The case.
        case_id: String,
        /// Who added us.
        from: String,
    },
    /// A message in a case.
    Message {
        /// The case.
        case_id: String,
        /// The sender's identity.
        from: String,
        /// The decrypted content.
        plaintext: Vec<u8>,
    },
    /// Members were added or removed.
    Membership {
        /// The case.
        case_id: String,
        /// Identities added.
        added: Vec<String>,
        /// Identities removed.
        removed: Vec<String>,
    },
    /// Our change to a case (an `add`, or a handover we committed) was
    /// dropped: another member's change came first, or the gateway refused
    /// it. Nothing changed; it can be made again.
    Overtaken {
        /// The case.
        case_id: String,
    },
    /// We were removed from a case (for example, handed over).
    Removed {
        /// The case.
        case_id: String,
    },
    /// A case chronology was handed to us.
    History {
        /// The case.
        case_id: String,
        /// Who handed it over.
        from: String,
        /// How many entries were new.
        entries: usize,
    },
    /// A case handed over to us by someone whose handover did not add us
    /// to it (its transfer names a KeyPackage the Welcome that brought us
    /// into the case was not made with): its chronology, addresses and
    /// fled areas were not taken up.
    HandoverRefused {
        /// The case.
        case_id: String,
        /// Who sent the transfer.
        from: String,
    },
    /// A message to our team in a case we are not part of (it began before
    /// we joined the team, or we were not added): it is encrypted for the
    /// case's members only. Set aside (the team's inbox stops waiting for
    /// us; its sender is not told it was read); the case's lead can add us.
    NotInCase {
        /// The message.
        message_id: MessageId,
        /// Its sender per the envelope.
        from: String,
        /// The team it was addressed to.
        to: String,
    },
    /// A message that came before a change to its case it follows (a
    /// Commit, or the Welcome that adds us, still on its way through
    /// another gateway): it waits in the inbox, unread and
    /// unacknowledged, and is read once that change is (told once).
    Waiting {
        /// The message.
        message_id: MessageId,
        /// Its sender.
        from: String,
    },
    /// A message read here before whose `read` was cut short before it was
    /// acknowledged (killed, or its output failed): what it brought may
    /// not have been shown then, and is not shown again (its keys are used
    /// up); the case's history has it. Acknowledged now.
    ReadBefore {
        /// The message.
        message_id: MessageId,
        /// Its sender.
        from: String,
        /// Its case, when known.
        case_id: Option<String>,
    },
    /// A message was refused (tampered, replayed, not decryptable); it stays
    /// in the inbox, unacknowledged.
    Refused {
        /// The message.
        message_id: MessageId,
        /// Its sender per the envelope.
        from: String,
        /// Why.
        error: String,
    },
}

// === impl Display for Event ===

impl std::fmt::Display for Event {
    /// What `read` tells a person of the event, safe for a terminal: every
    /// string another user or a gateway chose (a case id, an identity, a
    /// reason) is escaped ([`crate::one_line`]), a message's text shown
    /// by [`crate::readable`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::one_line as safe;
        match self {
            Event::Joined { case_id, from } => {
                write!(f, "joined case {} (added by {})", safe(case_id), safe(from))
            }
            Event::Message {
                case_id,
                from,
                plaintext,
            } => write!(
                f,
                "--- case {}, from {}\n{}",
                safe(case_id),
                safe(from),
                crate::readable(plaintext)
            ),
            Event::Membership {
                case_id,
                added,
                removed,
            } => {
                // `Debug` escapes control characters in the identities.
                write!(
                    f,
                    "case {}: added {added:?}, removed {removed:?}",
                    safe(case_id)
                )
            }
            Event::Overtaken { case_id } => write!(
                f,
                "case {}: your change was dropped (another member's came first, or the gateway refused it); nothing changed: make it again",
                safe(case_id)
            ),
            Event::Removed { case_id } => {
                write!(f, "you were removed from case {}", safe(case_id))
            }
            Event::History {
                case_id,
                from,
                entries,
            } => write!(
                f,
                "case {}: received {entries} chronology entries from {}",
                safe(case_id),
                safe(from)
            ),
            Event::HandoverRefused { case_id, from } => write!(
                f,
                "NOT TAKEN UP: case {} handed over by {}, whose handover did not add you to it",
                safe(case_id),
                safe(from)
            ),
            Event::NotInCase {
                message_id,
                from,
                to,
            } => write!(
                f,
                "message {message_id} to {} (from {}) is in a case you are not part of",
                safe(to),
                safe(from)
            ),
            Event::ReadBefore {
                message_id,
                from,
                case_id,
            } => match case_id {
                Some(c) => write!(
                    f,
                    "message {message_id} from {} (case {}) was read here before, and what it brought may not have been shown: `client history --case {}` shows the case's messages, `client cases` its cases",
                    safe(from),
                    safe(c),
                    safe(c)
                ),
                None => write!(
                    f,
                    "message {message_id} from {} was read here before, and may not have been shown",
                    safe(from)
                ),
            },
            Event::Waiting { message_id, from } => write!(
                f,
                "message {message_id} from {} waits: a change to its case made before it has not reached you yet; `read` again later takes it",
                safe(from)
            ),
            Event::Refused {
                message_id,
                from,
                error,
            } => write!(
                f,
                "REFUSED message {message_id} from {}: {}",
                safe(from),
                safe(error)
            ),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    /// case id → addresses its messages go to.
    cases: BTreeMap<String, Vec<String>>,
    /// Cases handed over to us, waiting for their Welcome (see
    /// [`HandedOver`]).
    #[serde(default)]
    handed_over: Vec<HandedOver>,
    /// case id → the KeyPackages (their references, hex) the Welcome that
    /// brought us into the case was for: a case handed over to us is taken
    /// up only from the one whose transfer names one of them.
    #[serde(default)]
    joined_with: BTreeMap<String, Vec<String>>,
    /// Messages refused once (reported once; they stay unacknowledged).
    #[serde(default)]
    refused: std::collections::BTreeSet<String>,
    /// Refused messages to a team looked at once more: a client before
    /// [`Event::NotInCase`] refused those of cases it is not in.
    #[serde(default)]
    rechecked: std::collections::BTreeSet<String>,
    /// Messages being processed: recorded before, removed once
    /// acknowledged. One of these found already processed was processed
    /// here, its acknowledgement cut short (a crash, a lost connection),
    /// and is acknowledged now; another message with the same bytes is a
    /// replay, and refused.
    #[serde(default)]
    processing: std::collections::BTreeSet<String>,
    /// Messages that came before a change they follow (see
    /// [`Event::Waiting`]) → when this client first found one waiting (ms
    /// since the epoch). Left in the inbox, and read again at every pass.
    #[serde(default)]
    waiting: BTreeMap<String, u64>,
    /// case id → the areas the family fled, as declared by any message
    /// of the case sent or read here: every later disclosure in the case
    /// declares them too, so the gateways keep the family's whereabouts
    /// from those areas though the worker did not name them again.
    #[serde(default)]
    fled_from: BTreeMap<String, std::collections::BTreeSet<AreaId>>,
    /// case id → the identity a handover request named as its new lead,
    /// until the Commit adding them is read: they are reached by their own
    /// address, whatever teams of their area the case has (only they know
    /// whether they are in one; a copy by both is set aside).
    #[serde(default)]
    handover_leads: BTreeMap<String, String>,
    /// case id → our change to it (a Commit), not yet known to be taken by
    /// the gateway: sent again, under the same keys, before anything else
    /// is read or sent (see [`Caseworker::settle`]).
    #[serde(default)]
    staged: BTreeMap<String, Staged>,
    /// case id → a handover request this client is to commit (old lead,
    /// request), kept until the new lead is in the case: a commit overtaken
    /// by another member's is made again once that one is read.
    #[serde(default)]
    handover_requests: BTreeMap<String, (String, Vec<u8>)>,
    /// idempotency key → a referral made under it: kept before its first
    /// message is sent, so that `refer` again with the same key sends the
    /// same bytes (the gateway stores nothing twice) rather than a second
    /// case; its bytes are let go once both messages are taken.
    #[serde(default)]
    referrals: BTreeMap<String, Referral>,
    /// idempotency key → a message to a case's addresses (a reply), kept
    /// from before its first copy is sent until every address took it or
    /// refused it for good (see [`Outgoing`]).
    #[serde(default)]
    outgoing: BTreeMap<String, Outgoing>,
    /// When this client last looked at its published KeyPackages (ms since
    /// the epoch); `None` for a new client until it first publishes some.
    /// `read` looks again after [`KEY_CHECK_INTERVAL`]: KeyPackages run out
    /// with use, and expire unused. A client from before this field looks
    /// at its first `read`: it may have published long ago.
    #[serde(default = "long_ago")]
    keys_checked_ms: Option<u64>,
}

/// [`Meta::keys_checked_ms`] for a client's file from before it.
fn long_ago() -> Option<u64> {
    Some(0)
}

/// A case handed over to us, as its transfer said, kept until we are in
/// the case. It is taken up only if the Welcome that brings us in was made
/// with the KeyPackage it names: the old lead claimed that KeyPackage and
/// put it in the handover request a member committed, so no one else can
/// name it, and a transfer from anyone else (any user may send us one)
/// can neither write the case's chronology nor choose its addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HandedOver {
    case_id: String,
    /// Who sent the transfer (a SPIFFE URI).
    from: String,
    /// The reference of the KeyPackage the handover adds us with (hex).
    key_package: String,
    /// The case's addresses, the old lead's left out.
    addresses: Vec<String>,
    fled_from: Vec<AreaId>,
    /// The chronology, as exported.
    history: Vec<u8>,
}

/// A message to a case's addresses, as encrypted once (see
/// `Meta::outgoing`): sent again, the same bytes under the same keys, until
/// every address has taken it or refused it for good.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Outgoing {
    case_id: String,
    category: String,
    bytes: Vec<u8>,
    disclosure: Option<proto::Disclosure>,
    /// The addresses still to take it, each with its place in the case's
    /// list when it was made (its copy's key is `<key>:<place>`).
    to: Vec<(usize, String)>,
    /// The case's epoch it was encrypted in (none in a record from before
    /// this): members read a message only a few epochs back.
    #[serde(default)]
    epoch: Option<u64>,
    /// When it was made (ms since the epoch): kept ones go oldest first.
    #[serde(default)]
    made_ms: u64,
}

/// A referral as made under one idempotency key (see `Meta::referrals`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Referral {
    /// Its case.
    case_id: String,
    /// Whom to, and what it says (a digest of the plaintext and the
    /// disclosure): a second `refer` with the key must say the same.
    to: String,
    what: String,
    /// Its Welcome and first message, until both are taken.
    welcome: Option<Vec<u8>>,
    message: Option<Vec<u8>>,
    /// Those it could not reach (no keys), as the first time.
    missing: Vec<String>,
    /// The case's first epoch, to be bound at its home (here) before the
    /// Welcome goes out, until it is (none in a record from before proofs).
    #[serde(default)]
    first_epoch: Option<proto::CommitOrder>,
}

/// Our Commit to a case, kept from before it is sent until the gateway
/// has taken it (then it is merged here, the Welcome sent and the case's
/// addresses changed) or taken another member's for the epoch (then it is
/// dropped, and nothing changed): a commit merged before the gateway took
/// it would leave this client in an epoch nobody else is in.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Staged {
    /// Idempotency key base of its messages.
    key: String,
    /// Category of its messages.
    category: String,
    /// The Commit, for the case's addresses as they were.
    commit: Vec<u8>,
    /// Someone it adds (a SPIFFE URI).
    adds: String,
    /// Whom it removes (SPIFFE URIs).
    #[serde(default)]
    removes: Vec<String>,
    /// The case's addresses (ours left out) when it was made: it goes to
    /// these, in this order, under `<key>:commit:<i>`.
    recipients: Vec<String>,
    /// Whether the gateway has taken it (then it is merged here).
    #[serde(default)]
    taken: bool,
    /// Where the Welcome goes, and the Welcome.
    welcome_to: String,
    welcome: Vec<u8>,
    /// The case's addresses once it is taken.
    addresses: Vec<String>,
    /// The Commit's proof for the gateway (none in a record from before
    /// proofs).
    #[serde(default)]
    proof: Option<proto::CommitProof>,
}

/// An MLS message's submission to `to`.
fn mls_request(
    to: &str,
    category: &Category,
    urgent: bool,
    key: String,
    body: Vec<u8>,
    disclosure: Option<proto::Disclosure>,
) -> Result<SubmitRequest, CaseError> {
    Ok(SubmitRequest {
        idempotency_key: IdempotencyKey::new(key).map_err(|e| CaseError::Invalid(e.to_string()))?,
        recipient: to
            .parse()
            .map_err(|e: proto::ProtoError| CaseError::Invalid(e.to_string()))?,
        category: category.clone(),
        urgent,
        kind: MessageKind::Mls,
        disclosure,
        commit_proof: None,
        body: Body(body),
    })
}

/// What became of a staged Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Taken by the gateway and merged here.
    Taken,
    /// Another member's Commit was taken for the epoch: ours is dropped.
    Overtaken,
}

/// A hand-over sent to the new lead in the transfer group.
#[derive(Debug, Serialize, Deserialize)]
struct Transfer {
    case_id: String,
    addresses: Vec<String>,
    history: Vec<u8>,
    /// The areas the family fled, as recorded for the case (absent from a
    /// client before this was handed over).
    #[serde(default)]
    fled_from: Vec<AreaId>,
    /// The reference (hex) of the KeyPackage the handover request gives
    /// for us: absent from a client before this, whose transfer is not
    /// taken up.
    #[serde(default)]
    key_package: Option<String>,
}

impl Transfer {
    /// Parses a transfer as another user sent it, refusing one whose case
    /// id is not a case id ([`CaseError::InvalidCaseId`]): its case id is
    /// shown to the worker, and compared with the cases joined.
    fn parse(bytes: &[u8]) -> Result<Transfer, CaseError> {
        let t: Transfer = serde_json::from_slice(bytes)
            .map_err(|e| CaseError::Invalid(format!("history hand-over: {e}")))?;
        if crate::mls::check_case_id(&t.case_id).is_err() {
            let shown: String = t.case_id.chars().take(64).collect();
            return Err(CaseError::InvalidCaseId(crate::one_line(&shown)));
        }
        Ok(t)
    }
}

/// What a message sent is, and its case, for the record of sent messages
/// (`None`: MLS housekeeping, such as commits, is not recorded).
type Recording<'a> = Option<(&'a str, &'a str)>;

/// How the record names a Welcome: the invitation that lets its members
/// read the case.
const INVITATION: &str = "case invitation";

/// Marks a handover request inside a case's application messages.
const HANDOVER_MARK: &[u8] = b"\0handover-request\0";

/// The old lead's request, to the case, that a remaining member commit the handover.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoverRequest {
    new_lead: String,
    key_package: Vec<u8>,
}

/// A worker's cases: MLS state plus the gateway connection.
pub struct Caseworker {
    api: Api,
    mls: MlsClient,
    policy_key: Option<String>,
    policy: Option<policy::Policy>,
    me: Recipient,
    meta_path: PathBuf,
    meta: Meta,
    sent: crate::sent::SentLog,
    /// Cases whose own Commit could not be settled for now (their gateway,
    /// or the case's home gateway, out of reach): their messages wait in
    /// the inbox while the other cases are read.
    held: std::collections::HashSet<String>,
    /// Shows what `read` reads as it goes ([`Caseworker::show_as_read`]).
    show: Option<Box<Show>>,
    /// How many of the events of the `read` under way were shown.
    shown: usize,
    /// How long a message to our team in a case we do not hold yet waits
    /// for the Welcome that may still be on its way (see
    /// [`Caseworker::waiting_for_team_welcomes`]).
    team_welcome_wait: Duration,
    /// Held while this client works on its data directory: two clients at
    /// once would each write back state the other moved on.
    _lock: std::fs::File,
}

impl std::fmt::Debug for Caseworker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caseworker")
            .field("me", &self.me.to_string())
            .finish()
    }
}

/// How long a client waits for another one using its data directory.
const LOCK_PATIENCE: Duration = Duration::from_secs(120);

/// Takes the data directory for this client alone, waiting (up to
/// `patience`) while another client has it.
fn lock_data_dir(dir: &std::path::Path, patience: Duration) -> Result<std::fs::File, CaseError> {
    let storage = |e: std::io::Error| CaseError::Metadata {
        path: dir.join("client.lock"),
        message: e.to_string(),
    };
    crate::private_dir(dir).map_err(storage)?;
    let file = crate::private_file()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("client.lock"))
        .map_err(storage)?;
    let give_up = std::time::Instant::now() + patience;
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                if !told {
                    told = true;
                    tracing::warn!(dir = %dir.display(), "another client is using this data directory; waiting for it to finish");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(CaseError::Busy(dir.to_owned())),
            Err(std::fs::TryLockError::Error(e)) => return Err(storage(e)),
        }
    }
}

/// How many single-use KeyPackages `keys publish` publishes by default.
pub const KEY_STOCK: usize = 20;
/// How often `read` asks the gateway whether this client's published
/// KeyPackages run low (or near the end of their lifetime), and publishes
/// fresh ones if so. A member whose KeyPackages all expired could not be
/// added to a case.
const KEY_CHECK_INTERVAL: Duration = Duration::from_secs(86_400);
/// Prefix of the case id of a chronology transfer group.
const TRANSFER: &str = "transfer:";

/// How long [`Caseworker::read`] waits, after joining a case, for the
/// case's first message when it has not arrived with the Welcome.
pub const FIRST_MESSAGE_GRACE: Duration = Duration::from_secs(3);

/// How often `read --wait` looks again while only messages it dealt with
/// before are in the inbox.
const LOOK_AGAIN: Duration = Duration::from_secs(5);

/// Whether some case in `events` was joined and nothing of it (a message or
/// a handed-over chronology) followed.
fn awaiting_first_content(events: &[Event]) -> bool {
    events.iter().enumerate().any(|(i, e)| match e {
        Event::Joined { case_id, .. } => !events[i + 1..].iter().any(|later| match later {
            Event::Message { case_id: c, .. } | Event::History { case_id: c, .. } => c == case_id,
            _ => false,
        }),
        _ => false,
    })
}

/// The fields to declare for a set of chronology entries: each structured
/// entry's fields, and `chronology` for free text (or when there is none).
fn declared_fields<'a>(plaintexts: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    let mut fields = std::collections::BTreeSet::new();
    for p in plaintexts {
        match serde_json::from_slice::<serde_json::Value>(p) {
            Ok(serde_json::Value::Object(_)) => match crate::referral::Disclosed::from_bytes(p) {
                Ok(d) => fields.extend(d.fields.keys().map(ToString::to_string)),
                // Refused by any reader: declared as it is, no less.
                Err(_) => {
                    fields.insert("chronology".to_owned());
                }
            },
            _ => {
                fields.insert("chronology".to_owned());
            }
        }
    }
    if fields.is_empty() {
        fields.insert("chronology".to_owned());
    }
    fields.into_iter().collect()
}

/// Whether `addrs` holds a team address in the area of the person address
/// `user`: such a member is taken to be reached through that team (members
/// are added so when a team's newcomer joins a case). A handover's new lead
/// is not: every member learns them from the request and sends to their
/// own address (`Meta::handover_leads`).
fn team_in_area(addrs: &[String], user: &str) -> bool {
    let area = user.rsplit('@').next().unwrap_or_default();
    addrs
        .iter()
        .any(|a| a.starts_with("team:") && a.rsplit('@').next() == Some(area))
}

/// Whether `e` is the gateway out of reach or busy for now, not a refusal.
/// Whether the gateway refused our change as not proven to come from a
/// member of the case's current epoch (see [`proto::CommitProof`]).
fn unproven(e: &CaseError) -> bool {
    matches!(
        e,
        CaseError::Client(ClientError::Api {
            code: proto::ErrorCode::UnprovenCommit,
            ..
        })
    )
}

fn for_now(e: &CaseError) -> bool {
    match e {
        CaseError::Client(ClientError::Transport(_)) => true,
        CaseError::Client(ClientError::Api { code, .. }) => matches!(
            code,
            proto::ErrorCode::Unavailable
                | proto::ErrorCode::RateLimited
                | proto::ErrorCode::Internal
                | proto::ErrorCode::InsufficientStorage
                | proto::ErrorCode::RequestTimeout
        ),
        _ => false,
    }
}

/// Whether the gateway refused a message for its address, for good (a
/// sharing policy, an unknown recipient, too large, its key used for
/// another): sending it there again cannot help.
fn refused_for_good(e: &CaseError) -> bool {
    matches!(
        e,
        CaseError::Client(ClientError::Api {
            code: proto::ErrorCode::PolicyDenied
                | proto::ErrorCode::UnknownRecipient
                | proto::ErrorCode::PayloadTooLarge
                | proto::ErrorCode::IdempotencyConflict
                | proto::ErrorCode::Rejected,
            ..
        })
    )
}

/// A person's address (`user:<id>@<area>`) from their identity URI.
pub fn address_of(identity: &str) -> Option<String> {
    match certs::Identity::parse_uri(identity) {
        Ok(certs::Identity::User(area, user)) => Some(format!("user:{user}@{area}")),
        _ => None,
    }
}

fn fresh_key() -> String {
    crate::fresh_idempotency_key().to_string()
}

/// Area `area`'s sharing policy, fetched from its gateway (`api`) and
/// verified with `policy_key` (`ed25519:<base64>`); `None` when the area
/// publishes none.
pub async fn home_policy(
    api: &Api,
    area: &proto::AreaId,
    policy_key: Option<&str>,
) -> Result<Option<policy::Policy>, CaseError> {
    let Some(text) = api.policy_text().await? else {
        return Ok(None);
    };
    let key: policy::PolicyVerifyingKey = policy_key
        .ok_or_else(|| {
            CaseError::Invalid(
                "the gateway publishes a sharing policy but this client has no policy_key to verify it"
                    .into(),
            )
        })?
        .parse()
        .map_err(|e: policy::PolicyError| CaseError::Invalid(e.to_string()))?;
    let signed =
        policy::SignedPolicy::from_text(&text).map_err(|e| CaseError::Invalid(e.to_string()))?;
    signed
        .verify(area, &key)
        .map(Some)
        .map_err(|e| CaseError::Invalid(format!("the gateway's policy: {e}")))
}

impl Caseworker {
    /// Opens the worker's MLS state for a client configuration.
    pub fn open(config: &ClientConfig, api: Api) -> Result<Caseworker, CaseError> {
        let creds =
            certs::Credentials::load(&config.cert, &config.key).map_err(ClientError::from)?;
        let leaf = creds
            .chain
            .first()
            .ok_or_else(|| CaseError::Invalid("no certificate".into()))?;
        let identity = certs::identity_of_cert(leaf).map_err(ClientError::from)?;
        let certs::Identity::User(area, user) = &identity else {
            return Err(CaseError::Invalid(format!("{identity} is not a user")));
        };
        let me = Recipient {
            area: area.clone(),
            target: Target::User(user.clone()),
        };
        let dir = config.data_directory();
        let lock = lock_data_dir(&dir, LOCK_PATIENCE)?;
        let mls = MlsClient::open(&dir, &identity.uri())?;
        let meta_path = dir.join("cases.json");
        let sent = crate::sent::SentLog::in_dir(&dir);
        let meta = match std::fs::read(&meta_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CaseError::Metadata {
                path: meta_path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Meta::default(),
            Err(e) => {
                return Err(CaseError::Metadata {
                    path: meta_path,
                    message: e.to_string(),
                })
            }
        };
        Ok(Caseworker {
            api,
            mls,
            policy_key: config.policy_key.clone(),
            policy: None,
            me,
            meta_path,
            meta,
            sent,
            held: std::collections::HashSet::new(),
            show: None,
            shown: 0,
            team_welcome_wait: TEAM_WELCOME_WAIT,
            _lock: lock,
        })
    }

    fn save(&self) -> Result<(), CaseError> {
        use std::io::Write as _;
        let err = |e: std::io::Error| CaseError::Metadata {
            path: self.meta_path.clone(),
            message: e.to_string(),
        };
        let bytes = serde_json::to_vec_pretty(&self.meta).map_err(|e| CaseError::Metadata {
            path: self.meta_path.clone(),
            message: e.to_string(),
        })?;
        let tmp = self.meta_path.with_extension("json.tmp");
        let mut f = crate::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.meta_path).map_err(err)
    }

    /// The home area's sharing policy, fetched from the gateway and verified
    /// with the configured key; `None` when the area publishes none.
    pub async fn policy(&mut self) -> Result<Option<&policy::Policy>, CaseError> {
        if self.policy.is_none() {
            let Some(verified) =
                home_policy(&self.api, &self.me.area, self.policy_key.as_deref()).await?
            else {
                return Ok(None);
            };
            self.policy = Some(verified);
        }
        Ok(self.policy.as_ref())
    }

    /// The disclosure to declare for content with `fields`, under the home
    /// policy (none when the area has no policy).
    pub async fn declare(
        &mut self,
        purpose: &str,
        fields: Vec<String>,
        fled_from: Vec<proto::AreaId>,
    ) -> Result<Option<proto::Disclosure>, CaseError> {
        Ok(self.policy().await?.map(|p| proto::Disclosure {
            policy_id: p.id().to_string(),
            policy_version: p.version(),
            purpose: purpose.to_owned(),
            fields,
            fled_from,
        }))
    }

    /// Our directory entry at the home gateway.
    pub async fn whoami(&self) -> Result<proto::Me, CaseError> {
        Ok(self.api.me().await?)
    }

    /// The MLS state (for history and inspection).
    pub fn mls(&self) -> &MlsClient {
        &self.mls
    }

    /// The connection to the home gateway.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// Publishes `n` single-use KeyPackages and a last-resort one.
    pub async fn publish_keys(&mut self, n: usize) -> Result<proto::KeyPackageStock, CaseError> {
        let mut kps = self.mls.key_packages(n)?;
        kps.push(self.mls.last_resort_key_package()?);
        let stock = self.api.upload_key_packages(kps).await?;
        self.meta.keys_checked_ms = Some(crate::now_ms());
        self.save()?;
        Ok(stock)
    }

    /// Publishes fresh KeyPackages if the gateway says the stock is low:
    /// after joining a case (which used one), and once every
    /// [`KEY_CHECK_INTERVAL`] for a client that has published before.
    async fn top_up_keys(&mut self, joined: bool) -> Result<(), CaseError> {
        let due = self.meta.keys_checked_ms.is_some_and(|t| {
            crate::now_ms().saturating_sub(t) >= KEY_CHECK_INTERVAL.as_millis() as u64
        });
        if !joined && !due {
            return Ok(());
        }
        if self.api.key_package_stock().await?.low {
            self.publish_keys(KEY_STOCK).await?;
        } else {
            self.meta.keys_checked_ms = Some(crate::now_ms());
            self.save()?;
        }
        Ok(())
    }

    fn group_of(&self, case_id: &str) -> Result<GroupId, CaseError> {
        self.mls
            .groups()?
            .into_iter()
            .find(|(_, c)| c == case_id)
            .map(|(g, _)| g)
            .ok_or_else(|| CaseError::UnknownCase(case_id.to_owned()))
    }

    /// The case of an MLS message of a group we are in (not a Welcome).
    fn case_of_message(&self, bytes: &[u8]) -> Option<String> {
        match proto::mls::MlsMessageInfo::parse(bytes).ok()? {
            proto::mls::MlsMessageInfo::PublicMessage(m)
            | proto::mls::MlsMessageInfo::PrivateMessage(m) => {
                self.case_of(&GroupId::from_bytes(m.group_id()))
            }
            _ => None,
        }
    }

    fn case_of(&self, group: &GroupId) -> Option<String> {
        self.mls
            .groups()
            .ok()?
            .into_iter()
            .find(|(g, _)| g == group)
            .map(|(_, c)| c)
    }

    async fn submit(
        &self,
        to: &str,
        category: &Category,
        urgent: bool,
        key: String,
        body: Vec<u8>,
        what: Recording<'_>,
    ) -> Result<MessageId, CaseError> {
        self.submit_declared(to, category, urgent, key, body, None, what)
            .await
    }

    #[allow(clippy::too_many_arguments)] // the message's parts, and its record
    async fn submit_declared(
        &self,
        to: &str,
        category: &Category,
        urgent: bool,
        key: String,
        body: Vec<u8>,
        disclosure: Option<proto::Disclosure>,
        what: Recording<'_>,
    ) -> Result<MessageId, CaseError> {
        let req = mls_request(to, category, urgent, key, body, disclosure)?;
        self.send_request(req, what).await
    }

    /// Sends our Commit to `to`, with its proof (none for one staged by a
    /// client from before proofs).
    async fn submit_commit(
        &self,
        to: &str,
        category: &Category,
        key: String,
        commit: Vec<u8>,
        proof: Option<proto::CommitProof>,
    ) -> Result<MessageId, CaseError> {
        let mut req = mls_request(to, category, false, key, commit, None)?;
        req.commit_proof = proof;
        self.send_request(req, None).await
    }

    async fn send_request(
        &self,
        req: SubmitRequest,
        what: Recording<'_>,
    ) -> Result<MessageId, CaseError> {
        let to = req.recipient.to_string();
        let to = to.as_str();
        let area = req.recipient.area.clone();
        let r = self.api.submit(&req).await?;
        if let Some(w) = &r.waiting {
            tracing::warn!("{}", crate::waiting_note(&area, w));
        }
        if let Some((what, case)) = what {
            let entry = crate::sent::SentEntry::now(
                r.message_id.clone(),
                to,
                what,
                Some(case),
                &req.category,
            );
            // Sent is sent: a record that cannot be written is reported,
            // not turned into a failure the worker would retry.
            if let Err(e) = self.sent.record(entry) {
                tracing::warn!(error = %e, "could not record a sent message");
            }
        }
        Ok(r.message_id)
    }

    /// Claims KeyPackages for every member of `to`; at least one must exist.
    async fn claim(&self, to: &Recipient) -> Result<(Vec<Vec<u8>>, Vec<String>), CaseError> {
        let claimed = self.api.claim(to).await?;
        let mut missing = claimed.missing;
        let mut kps = Vec::with_capacity(claimed.key_packages.len());
        for k in claimed.key_packages {
            // One that cannot be used (expired: a gateway before this
            // client's hands those out too; or not the member's own) leaves
            // that member out, as one without keys, not the whole change.
            match self.mls.key_package_identity(&k.key_package.0) {
                Ok(id) if id == k.identity => kps.push(k.key_package.0),
                Ok(_) => {
                    tracing::warn!(member = %k.identity, "a claimed KeyPackage is someone else's; that member is not added");
                    missing.push(k.identity);
                }
                Err(e) => {
                    tracing::warn!(member = %k.identity, error = %e, "a claimed KeyPackage cannot be used; that member is not added");
                    missing.push(k.identity);
                }
            }
        }
        if kps.is_empty() {
            return Err(CaseError::NoMembers(to.to_string()));
        }
        Ok((kps, missing))
    }

    /// Starts a referral: a new group with the members of `to`, the Welcome,
    /// then `body` as the first message. Returns the case id and the members
    /// who could not be added yet (no KeyPackages).
    #[allow(clippy::too_many_arguments)] // each is a separate choice of the worker's
    pub async fn refer(
        &mut self,
        to: &Recipient,
        category: &Category,
        urgent: bool,
        body: &[u8],
        case_id: Option<String>,
        key: Option<String>,
        disclosure: Option<proto::Disclosure>,
    ) -> Result<(String, Vec<String>), CaseError> {
        let key = key.unwrap_or_else(fresh_key);
        // What this referral says, to tell a second `refer` with the key.
        let what = {
            let d = serde_json::to_vec(&disclosure).unwrap_or_default();
            let mut all = Vec::with_capacity(body.len() + d.len() + 64);
            for part in [category.as_str().as_bytes(), &[u8::from(urgent)], &d, body] {
                all.extend_from_slice(&(part.len() as u64).to_be_bytes());
                all.extend_from_slice(part);
            }
            hex::encode(crate::mls::sha256(&all))
        };
        let referral = match self.meta.referrals.get(&key) {
            // Made before under this key (its sending cut short, or done):
            // the same bytes again.
            Some(r) => {
                if r.to != to.to_string()
                    || r.what != what
                    || case_id.is_some_and(|c| c != r.case_id)
                {
                    return Err(CaseError::Invalid(format!(
                        "key {key} was used for another referral (case {}): use another key",
                        r.case_id
                    )));
                }
                r.clone()
            }
            None => {
                let case_id = case_id
                    .unwrap_or_else(|| format!("case-{}", hex::encode(rand::random::<[u8; 8]>())));
                if self.meta.cases.contains_key(&case_id) || self.group_of(&case_id).is_ok() {
                    return Err(CaseError::Invalid(format!(
                        "case {case_id} is already on this client: reply, add or handover in it"
                    )));
                }
                let (kps, missing) = self.claim(to).await?;
                let group = self.mls.create_group(&case_id)?;
                let made = self.mls.add_members_proven(&group, &kps)?;
                let message = self.mls.encrypt(&group, body)?;
                let first_epoch = proto::CommitOrder {
                    group_id: group.to_string(),
                    epoch: made.epoch,
                    content_hash: proto::ContentHash(crate::mls::sha256(&made.commit)),
                    proof: Some(made.proof),
                };
                let r = Referral {
                    case_id: case_id.clone(),
                    to: to.to_string(),
                    what,
                    welcome: Some(made.welcome),
                    message: Some(message),
                    missing,
                    first_epoch: Some(first_epoch),
                };
                self.meta.cases.insert(case_id, vec![to.to_string()]);
                self.meta.referrals.insert(key.clone(), r.clone());
                self.save()?;
                r
            }
        };
        let case_id = referral.case_id.clone();
        self.send_referral(&key, referral, category, urgent, disclosure)
            .await
            .map_err(|error| {
                // Kept under its key: the same `refer` with it finishes it
                // (without it, a second case would be made).
                if for_now(&error) {
                    CaseError::ReferralKept {
                        key: key.clone(),
                        case_id,
                        error: Box::new(error),
                    }
                } else {
                    error
                }
            })
    }

    /// Sends what of referral `referral`, kept under `key`, is not taken
    /// yet: its first epoch to be bound at its home, its Welcome, its first
    /// message.
    async fn send_referral(
        &mut self,
        key: &str,
        referral: Referral,
        category: &Category,
        urgent: bool,
        disclosure: Option<proto::Disclosure>,
    ) -> Result<(String, Vec<String>), CaseError> {
        let case_id = referral.case_id.clone();
        if let Some(order) = &referral.first_epoch {
            // Before anyone else knows the group's id: the case's next
            // change then takes a proof too.
            match self.api.order_commit(order).await {
                Ok(_) => {}
                // A gateway from before this: the case's first change takes
                // no proof there, as before.
                Err(ClientError::Api {
                    code: proto::ErrorCode::NotFound,
                    ..
                }) => {
                    tracing::warn!("the gateway does not take a case's first epoch (an older version): its first change will need no proof");
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(r) = self.meta.referrals.get_mut(key) {
                r.first_epoch = None;
            }
            self.save()?;
        }
        if let Some(welcome) = referral.welcome {
            self.submit(
                &referral.to,
                category,
                urgent,
                format!("{key}:welcome"),
                welcome,
                Some((INVITATION, &case_id)),
            )
            .await?;
            if let Some(r) = self.meta.referrals.get_mut(key) {
                r.welcome = None;
            }
            self.save()?;
        }
        if let Some(d) = &disclosure {
            self.remember_fled_from(&case_id, &d.fled_from)?;
        }
        if let Some(message) = referral.message {
            self.submit_declared(
                &referral.to,
                category,
                urgent,
                format!("{key}:message"),
                message,
                disclosure,
                Some(("referral", &case_id)),
            )
            .await?;
            if let Some(r) = self.meta.referrals.get_mut(key) {
                r.message = None;
            }
            self.save()?;
        }
        Ok((case_id, referral.missing))
    }

    /// Sends a message (reply, update) to everyone in a case.
    pub async fn send(
        &mut self,
        case_id: &str,
        category: &Category,
        body: &[u8],
        key: Option<String>,
        disclosure: Option<proto::Disclosure>,
    ) -> Result<Vec<MessageId>, CaseError> {
        let group = self.group_of(case_id)?;
        self.settle_before(case_id).await?;
        if self.addresses(case_id).is_empty() {
            return Err(CaseError::Invalid(format!(
                "this client has no address to send case {case_id}'s messages to (its record in cases.json is missing); nothing was sent"
            )));
        }
        let key = key.unwrap_or_else(fresh_key);
        // Every area the family fled, as recorded for the case, is declared.
        let disclosure = disclosure.map(|mut d| {
            for area in self.fled_from(case_id) {
                if !d.fled_from.contains(&area) {
                    d.fled_from.push(area);
                }
            }
            d
        });
        if let Some(d) = &disclosure {
            self.remember_fled_from(case_id, &d.fled_from)?;
        }
        // One kept from before goes first: the case's messages in order.
        self.send_earlier(case_id).await?;
        if self.meta.outgoing.contains_key(&key) {
            return Err(CaseError::Invalid(format!(
                "a message under key {key} is being sent already: `client read` sends it; nothing new was sent"
            )));
        }
        let epoch = self.mls.epoch(&group)?;
        let msg = self.mls.encrypt(&group, body)?;
        let me = self.me.to_string();
        let to = self
            .meta
            .cases
            .get(case_id)
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, a)| **a != me)
            .map(|(i, a)| (i, a.clone()))
            .collect();
        // Kept before its first copy goes: nothing sent is ever made twice.
        self.meta.outgoing.insert(
            key.clone(),
            Outgoing {
                case_id: case_id.to_owned(),
                category: category.as_str().to_owned(),
                bytes: msg,
                disclosure,
                to,
                epoch: Some(epoch),
                made_ms: crate::now_ms(),
            },
        );
        self.save()?;
        self.send_outgoing(&key).await
    }

    /// Sends again the messages kept from before (of case `only`, or of
    /// every case), oldest key first; stops at the first that cannot be
    /// sent for now ([`CaseError::Kept`]).
    async fn send_kept(&mut self, only: Option<&str>) -> Result<(), CaseError> {
        let mut kept: Vec<(u64, String)> = self
            .meta
            .outgoing
            .iter()
            .filter(|(_, o)| only.is_none_or(|c| o.case_id == c))
            .map(|(k, o)| (o.made_ms, k.clone()))
            .collect();
        // In the order they were made (keys given with `--key` are any).
        kept.sort();
        for (_, key) in kept {
            self.send_outgoing(&key).await?;
        }
        Ok(())
    }

    /// Sends the messages to case `case_id` kept from before, before
    /// anything new goes to it; one that still cannot go stops it
    /// ([`CaseError::EarlierKept`]).
    async fn send_earlier(&mut self, case_id: &str) -> Result<(), CaseError> {
        self.send_kept(Some(case_id)).await.map_err(|e| match e {
            CaseError::Kept { error } => CaseError::EarlierKept {
                case_id: case_id.to_owned(),
                error,
            },
            e => e,
        })
    }

    /// Sends the message kept under `key` to each address still to take
    /// it, under that address's key: one taken, or refused for good (by a
    /// sharing policy, say: the error is returned once the others are
    /// sent), is let go; one that cannot be sent for now keeps it
    /// ([`CaseError::Kept`]).
    async fn send_outgoing(&mut self, key: &str) -> Result<Vec<MessageId>, CaseError> {
        let Some(out) = self.meta.outgoing.get(key).cloned() else {
            return Ok(Vec::new());
        };
        // No longer one to send: we left the case, or it moved on past
        // where its members still read (they would refuse it).
        let moved_on = match self.group_of(&out.case_id) {
            Ok(group) => match (self.mls.is_active(&group), self.mls.epoch(&group)) {
                (Ok(true), Ok(now)) => out
                    .epoch
                    .is_some_and(|e| now.saturating_sub(e) > crate::mls::MAX_PAST_EPOCHS as u64),
                _ => true,
            },
            Err(_) => true,
        };
        let category = Category::new(out.category.clone());
        let category = match (moved_on, category) {
            (false, Ok(c)) => c,
            (_, category) => {
                self.meta.outgoing.remove(key);
                self.save()?;
                return Err(CaseError::Invalid(match category {
                    Err(e) => format!("a kept message to case {} has a bad category ({e}): it was let go, not sent", out.case_id),
                    Ok(_) => format!(
                        "a kept message to case {} could not be sent before the case moved on (or you left it): it was let go, not sent to {} address(es); send it again if it still matters",
                        out.case_id,
                        out.to.len()
                    ),
                }));
            }
        };
        let (mut ids, mut refused) = (Vec::new(), None);
        for (i, addr) in &out.to {
            let sent = self
                .submit_declared(
                    addr,
                    &category,
                    false,
                    format!("{key}:{i}"),
                    out.bytes.clone(),
                    out.disclosure.clone(),
                    Some(("reply", &out.case_id)),
                )
                .await;
            match sent {
                Ok(id) => ids.push(id),
                // Refused for this address, for good: let go of it.
                Err(e) if refused_for_good(&e) => {
                    refused.get_or_insert(e);
                }
                // Anything else (the gateway out of reach or busy, this
                // client's certificate refused): it stays kept.
                Err(e) => {
                    self.save()?;
                    return Err(CaseError::Kept { error: Box::new(e) });
                }
            }
            if let Some(o) = self.meta.outgoing.get_mut(key) {
                o.to.retain(|(j, _)| j != i);
            }
        }
        self.meta.outgoing.remove(key);
        self.save()?;
        match refused {
            Some(e) => Err(e),
            None => Ok(ids),
        }
    }

    /// The areas the family of case `case_id` fled, as declared by the
    /// messages of the case sent or read here.
    pub fn fled_from(&self, case_id: &str) -> Vec<AreaId> {
        self.meta
            .fled_from
            .get(case_id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The case's addresses but ours, as recorded (the addresses a message
    /// to the case goes to).
    fn recipients(&self, case_id: &str) -> Vec<String> {
        let me = self.me.to_string();
        self.meta
            .cases
            .get(case_id)
            .map(|list| list.iter().filter(|a| **a != me).cloned().collect())
            .unwrap_or_default()
    }

    /// Where the messages of case `case_id` go from here (its addresses
    /// but ours).
    pub fn addresses(&self, case_id: &str) -> Vec<Recipient> {
        self.recipients(case_id)
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    fn remember_fled_from(&mut self, case_id: &str, areas: &[AreaId]) -> Result<(), CaseError> {
        if areas.is_empty() {
            return Ok(());
        }
        let known = self.meta.fled_from.entry(case_id.to_owned()).or_default();
        let before = known.len();
        known.extend(areas.iter().cloned());
        if known.len() != before {
            self.save()?;
        }
        Ok(())
    }

    /// Sends `bytes` to each of the case's addresses but ours; `what` names
    /// them in the record of sent messages (none for MLS housekeeping).
    async fn fan_out_declared(
        &self,
        case_id: &str,
        category: &Category,
        key: &str,
        bytes: Vec<u8>,
        disclosure: Option<proto::Disclosure>,
        what: Option<&str>,
    ) -> Result<Vec<MessageId>, CaseError> {
        let me = self.me.to_string();
        let mut ids = Vec::new();
        for (i, addr) in self
            .meta
            .cases
            .get(case_id)
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if *addr != me {
                ids.push(
                    self.submit_declared(
                        addr,
                        category,
                        false,
                        format!("{key}:{i}"),
                        bytes.clone(),
                        disclosure.clone(),
                        what.map(|w| (w, case_id)),
                    )
                    .await?,
                );
            }
        }
        Ok(ids)
    }

    /// Adds the members of `to` to an open case (for example, someone who
    /// joined the team later).
    pub async fn add(
        &mut self,
        case_id: &str,
        to: &Recipient,
        key: Option<String>,
    ) -> Result<Vec<String>, CaseError> {
        let group = self.group_of(case_id)?;
        self.settle_before(case_id).await?;
        // What is kept for the case goes before this change.
        self.send_earlier(case_id).await?;
        let key = key.unwrap_or_else(fresh_key);
        let (kps, missing) = self.claim(to).await?;
        let own = self.mls.stage_add_members(&group, &kps)?;
        let recipients = self.recipients(case_id);
        let mut addresses = self.meta.cases.get(case_id).cloned().unwrap_or_default();
        if !addresses.contains(&to.to_string()) {
            addresses.push(to.to_string());
        }
        let staged = Staged {
            key,
            category: "update".into(),
            commit: own.commit,
            adds: own.adds.into_iter().next().unwrap_or_default(),
            removes: Vec::new(),
            recipients,
            taken: false,
            welcome_to: to.to_string(),
            welcome: own.welcome,
            addresses,
            proof: Some(own.proof),
        };
        match self.stage(case_id, staged).await? {
            Settled::Taken => Ok(missing),
            Settled::Overtaken => Err(CaseError::Overtaken(case_id.to_owned())),
        }
    }

    /// Records `staged` for `case_id`, then sends it ([`Caseworker::settle`]).
    async fn stage(&mut self, case_id: &str, staged: Staged) -> Result<Settled, CaseError> {
        if self.meta.staged.contains_key(case_id) {
            return Err(CaseError::Invalid(format!(
                "an earlier change to case {case_id} is still being sent: read, then try again"
            )));
        }
        self.meta.staged.insert(case_id.to_owned(), staged);
        self.save()?;
        // Just recorded: settled one way or the other, or an error.
        Ok(self.settle(case_id).await?.unwrap_or(Settled::Overtaken))
    }

    /// Sends our staged Commit to the case's addresses (as they were when
    /// it was made, under the same keys: what the gateway has is not
    /// stored twice) and settles it. The first address decides: the
    /// gateway takes the Commit (the epoch is then bound to it: it is
    /// recorded as taken and merged here, then goes to the other addresses,
    /// then the Welcome to whom it adds, and the case's addresses change),
    /// or refuses it (`stale_epoch`: another member's came first; or any
    /// other refusal), and it is dropped. `None` if there is none. An error
    /// reaching the gateway leaves it staged, to be sent again.
    async fn settle(&mut self, case_id: &str) -> Result<Option<Settled>, CaseError> {
        let Some(s) = self.meta.staged.get(case_id).cloned() else {
            return Ok(None);
        };
        let group = match self.group_of(case_id) {
            Ok(g) if self.mls.members(&g).is_ok() => g,
            // The case is gone, or we were removed from it.
            _ => return self.unstage(case_id, Settled::Overtaken).map(Some),
        };
        let category = Category::new(&s.category).map_err(|e| CaseError::Invalid(e.to_string()))?;
        let mut taken = s.taken;
        if !taken && !self.mls.has_pending_commit(&group) {
            // Cleared by another member's Commit (or dropped before a
            // crash let this record go): never taken.
            return self.unstage(case_id, Settled::Overtaken).map(Some);
        }
        if taken && self.mls.has_pending_commit(&group) {
            // Taken, and a crash came before it was merged.
            self.mls.confirm_commit(&group, &s.commit)?;
        }
        for (i, addr) in s.recipients.iter().enumerate() {
            let sent = self
                .submit_commit(
                    addr,
                    &category,
                    format!("{}:commit:{i}", s.key),
                    s.commit.clone(),
                    s.proof.clone(),
                )
                .await;
            match sent {
                Ok(_) => {
                    if !taken {
                        taken = true;
                        if let Some(r) = self.meta.staged.get_mut(case_id) {
                            r.taken = true;
                        }
                        self.save()?;
                        self.mls.confirm_commit(&group, &s.commit)?;
                    }
                }
                Err(CaseError::Client(ClientError::Api {
                    code: proto::ErrorCode::StaleEpoch,
                    ..
                })) if !taken => {
                    self.mls.abandon_commit(&group)?;
                    return self.unstage(case_id, Settled::Overtaken).map(Some);
                }
                Err(e) if for_now(&e) => return Err(e),
                // Not proven to come from a member of the case's epoch (a
                // change staged before this client made proofs): dropped,
                // and the gateway's reason told, not taken for another
                // member's change.
                Err(e) if !taken && unproven(&e) => {
                    self.mls.abandon_commit(&group)?;
                    self.unstage(case_id, Settled::Overtaken)?;
                    return Err(e);
                }
                // Refused for this address itself (it left the directory,
                // say): the others go on.
                Err(CaseError::Client(ClientError::Api { code, .. })) => {
                    tracing::warn!(case = %case_id, address = %addr, ?code, "the gateway refused our change to the case for one address");
                }
                Err(e) => return Err(e),
            }
        }
        if !taken {
            if !s.recipients.is_empty() {
                // Refused for every address: nobody has it.
                self.mls.abandon_commit(&group)?;
                return self.unstage(case_id, Settled::Overtaken).map(Some);
            }
            // No address but ours: nobody else to take it from.
            self.mls.confirm_commit(&group, &s.commit)?;
        }
        let welcomed = self
            .submit(
                &s.welcome_to,
                &category,
                false,
                format!("{}:welcome", s.key),
                s.welcome.clone(),
                Some((INVITATION, case_id)),
            )
            .await;
        match welcomed {
            Ok(_) => {}
            Err(e) if for_now(&e) => return Err(e),
            // Refused (they left the directory, say): the change stands.
            Err(e) => {
                tracing::warn!(case = %case_id, address = %s.welcome_to, error = %e, "the Welcome of our change to the case was refused");
            }
        }
        self.meta.cases.insert(case_id.to_owned(), s.addresses);
        self.unstage(case_id, Settled::Taken).map(Some)
    }

    /// Forgets the staged Commit of `case_id`, settled as `how`.
    fn unstage(&mut self, case_id: &str, how: Settled) -> Result<Settled, CaseError> {
        self.meta.staged.remove(case_id);
        self.save()?;
        Ok(how)
    }

    /// Settles every staged Commit before another change or message to a
    /// case: what `read` would tell is told in the log.
    async fn settle_before(&mut self, case_id: &str) -> Result<(), CaseError> {
        for e in self.settle_all().await? {
            if let Event::Overtaken { case_id } = e {
                tracing::warn!(case = %case_id, "an earlier change to this case was dropped: another member's came first, or the gateway refused it; make it again");
            }
        }
        if self.held.contains(case_id) {
            // Nothing more in this case until its change is settled: say why.
            self.settle(case_id).await?;
        }
        Ok(())
    }

    /// Settles every staged Commit ([`Caseworker::settle`]); events for
    /// `read` to tell: a handover taken, or a change dropped. One that
    /// cannot be settled for now holds its case (see `Caseworker::held`),
    /// not the others.
    async fn settle_all(&mut self) -> Result<Vec<Event>, CaseError> {
        let mut events = Vec::new();
        self.held.clear();
        let cases: Vec<(String, Staged)> = self
            .meta
            .staged
            .iter()
            .map(|(c, s)| (c.clone(), s.clone()))
            .collect();
        for (case_id, s) in cases {
            let settled = match self.settle(&case_id).await {
                Ok(settled) => settled,
                Err(e) if for_now(&e) => {
                    tracing::warn!(case = %case_id, error = %e, "a change to this case is not settled yet; its messages wait");
                    self.held.insert(case_id);
                    continue;
                }
                // Dropped (see `settle`): told, and the other cases read.
                Err(e) if unproven(&e) => {
                    tracing::warn!(case = %case_id, error = %e, "a change to this case was refused and dropped; make it again");
                    events.push(Event::Overtaken { case_id });
                    continue;
                }
                Err(e) => return Err(e),
            };
            match settled {
                Some(Settled::Overtaken) => events.push(Event::Overtaken {
                    case_id: case_id.clone(),
                }),
                Some(Settled::Taken) if s.category == "handover" => {
                    events.push(Event::Membership {
                        case_id: case_id.clone(),
                        added: vec![s.adds.clone()],
                        removed: s.removes.clone(),
                    });
                }
                _ => {}
            }
        }
        Ok(events)
    }

    /// Hands a case to a new key lead (a user). MLS does not let a member
    /// commit its own removal, so: the chronology and the case's addresses
    /// go to the new lead end to end encrypted (in a two-member transfer
    /// group), and a handover request goes to the case; the first remaining
    /// member (by identity order) commits it when they read: one Commit that
    /// adds the new lead and removes us, after which our keys read nothing new.
    pub async fn handover(
        &mut self,
        case_id: &str,
        to: &Recipient,
        key: Option<String>,
    ) -> Result<(), CaseError> {
        let Target::User(user) = &to.target else {
            return Err(CaseError::Invalid(
                "a case is handed over to a person: use user:<id>@<area>".into(),
            ));
        };
        let new_lead = certs::Identity::User(to.area.clone(), user.clone()).uri();
        let group = self.group_of(case_id)?;
        self.settle_before(case_id).await?;
        // What is kept for the case goes before this change.
        self.send_earlier(case_id).await?;
        let key = key.unwrap_or_else(fresh_key);
        let category = Category::new("handover").map_err(|e| CaseError::Invalid(e.to_string()))?;
        // Two KeyPackages: one for the transfer group, one for the case.
        let (first, _) = self.claim(to).await?;
        let (second, _) = self.claim(to).await?;
        // The first for the case: the likelier to be one-time (below).
        let (Some(kp_case), Some(kp_transfer)) =
            (first.into_iter().next(), second.into_iter().next())
        else {
            return Err(CaseError::NoMembers(to.to_string()));
        };
        // Both the new lead's own, whatever the gateways answered: the
        // chronology goes to the one, the case to the other.
        for kp in [&kp_case, &kp_transfer] {
            self.mls.check_key_package_of(kp, &new_lead)?;
        }
        // The transfer names the KeyPackage the new lead is added with, and
        // the new lead takes up only a transfer naming the one its Welcome
        // was made with. A last-resort KeyPackage is handed to anyone who
        // claims one once the others are gone, so it binds nothing.
        let last_resort = proto::mls::KeyPackageInfo::parse(&kp_case)
            .map(|k| k.is_last_resort())
            .unwrap_or(true);
        if last_resort {
            return Err(CaseError::Invalid(format!(
                "{to} has no one-time KeyPackages left: ask them to run `client keys`, then hand the case over again"
            )));
        }
        let transfer = Transfer {
            case_id: case_id.to_owned(),
            addresses: self.meta.cases.get(case_id).cloned().unwrap_or_default(),
            history: self.mls.export_history(&group)?,
            fled_from: self.fled_from(case_id),
            key_package: Some(hex::encode(self.mls.key_package_ref(&kp_case)?)),
        };
        let transfer =
            serde_json::to_vec(&transfer).map_err(|e| CaseError::Invalid(e.to_string()))?;
        let tgroup = self
            .mls
            .create_group(&format!("{TRANSFER}{case_id}:{}", fresh_key()))?;
        let (_c, welcome_t) = self.mls.add_members(&tgroup, &[kp_transfer])?;
        let transfer_msg = self.mls.encrypt(&tgroup, &transfer)?;
        // Both are application messages: where the area has a sharing
        // policy, they declare what they disclose like any other (the
        // chronology; the request, an action in the case: who leads it).
        let fled = self.fled_from(case_id);
        // The transfer declares every field its chronology holds, so the
        // gateways judge what it really discloses (the family's new
        // address is refused towards where they fled, as ever).
        let entries = self.mls.history(&group)?;
        let fields = declared_fields(entries.iter().map(|e| e.plaintext.as_slice()));
        let transfer_disclosure = self.declare("safeguarding", fields, fled.clone()).await?;
        let request_disclosure = self
            .declare("safeguarding", vec!["actions".into()], fled)
            .await?;
        self.submit(
            &to.to_string(),
            &category,
            false,
            format!("{key}:transfer-welcome"),
            welcome_t,
            None,
        )
        .await?;
        self.submit_declared(
            &to.to_string(),
            &category,
            false,
            format!("{key}:transfer"),
            transfer_msg,
            transfer_disclosure,
            Some(("handover", case_id)),
        )
        .await?;
        let request = serde_json::to_vec(&HandoverRequest {
            new_lead,
            key_package: kp_case,
        })
        .map_err(|e| CaseError::Invalid(e.to_string()))?;
        let mut body = HANDOVER_MARK.to_vec();
        body.extend_from_slice(&request);
        let msg = self.mls.encrypt(&group, &body)?;
        self.fan_out_declared(
            case_id,
            &category,
            &format!("{key}:request"),
            msg,
            request_disclosure,
            None,
        )
        .await?;
        Ok(())
    }

    /// Commits a handover request if we are the designated committer.
    /// `again`: a request this client was designated to commit when it
    /// read it, whose Commit was overtaken: it commits it still, whoever
    /// the overtaking Commit added (they never saw the request).
    async fn commit_handover(
        &mut self,
        group: &GroupId,
        case_id: &str,
        old_lead: &str,
        request: &[u8],
        again: bool,
    ) -> Result<Vec<Event>, CaseError> {
        let req: HandoverRequest = serde_json::from_slice(request)
            .map_err(|e| CaseError::Invalid(format!("handover request: {e}")))?;
        let me = self.mls.identity().to_owned();
        let members = self.mls.members(group)?;
        if members.contains(&req.new_lead) {
            // Committed already: the Commit came first (it travels another
            // way). Only the new lead's address is left to learn.
            self.meta.handover_requests.remove(case_id);
            if let Some(a) = address_of(&req.new_lead) {
                let addrs = self.meta.cases.entry(case_id.to_owned()).or_default();
                if !addrs.contains(&a) && a != self.me.to_string() {
                    addrs.push(a);
                }
            }
            self.save()?;
            return Ok(Vec::new());
        }
        let designated = members.iter().filter(|m| *m != old_lead).min().cloned();
        if !again && designated.as_deref() != Some(me.as_str()) {
            self.meta.handover_requests.remove(case_id);
            self.meta
                .handover_leads
                .insert(case_id.to_owned(), req.new_lead);
            self.save()?;
            return Ok(Vec::new());
        }
        let new_addr = address_of(&req.new_lead)
            .ok_or_else(|| CaseError::Invalid("new lead is not a user".into()))?;
        // The one added is the one named (and recorded, told, welcomed):
        // a request with someone else's KeyPackage is refused before it is
        // kept to be committed again (`retry_handovers` lets go of one
        // kept by a client before this check).
        self.mls
            .check_key_package_of(&req.key_package, &req.new_lead)?;
        // Kept until the new lead is in: made again if overtaken.
        self.meta
            .handover_requests
            .insert(case_id.to_owned(), (old_lead.to_owned(), request.to_vec()));
        self.save()?;
        let own = self
            .mls
            .handover(group, &req.key_package, &req.new_lead, old_lead)?;
        let recipients = self.recipients(case_id);
        let mut addresses = self.meta.cases.get(case_id).cloned().unwrap_or_default();
        if let Some(old) = address_of(old_lead) {
            addresses.retain(|a| *a != old);
        }
        // By their own address, as every other member does (see
        // `handover_leads`).
        if !addresses.contains(&new_addr) {
            addresses.push(new_addr.clone());
        }
        let staged = Staged {
            key: fresh_key(),
            category: "handover".into(),
            // Everyone, the old lead included, gets the Commit.
            commit: own.commit,
            adds: req.new_lead.clone(),
            removes: vec![old_lead.to_owned()],
            recipients,
            taken: false,
            welcome_to: new_addr,
            welcome: own.welcome,
            addresses,
            proof: Some(own.proof),
        };
        match self.stage(case_id, staged).await? {
            Settled::Taken => {
                self.meta.handover_requests.remove(case_id);
                self.save()?;
                Ok(vec![Event::Membership {
                    case_id: case_id.to_owned(),
                    added: vec![req.new_lead],
                    removed: vec![old_lead.to_owned()],
                }])
            }
            // Made again at the end of this read, after the other Commit.
            Settled::Overtaken => Ok(Vec::new()),
        }
    }

    /// Commits again the handover requests whose Commit was overtaken (see
    /// `Meta::handover_requests`), now that the other Commit is read.
    async fn retry_handovers(&mut self) -> Result<Vec<Event>, CaseError> {
        let mut events = Vec::new();
        let requests: Vec<(String, (String, Vec<u8>))> = self
            .meta
            .handover_requests
            .iter()
            .map(|(c, r)| (c.clone(), r.clone()))
            .collect();
        for (case_id, (old_lead, request)) in requests {
            let group = match self.group_of(&case_id) {
                Ok(g) if self.mls.members(&g).is_ok() => g,
                _ => {
                    self.meta.handover_requests.remove(&case_id);
                    self.save()?;
                    continue;
                }
            };
            if self.meta.staged.contains_key(&case_id) {
                continue;
            }
            match self
                .commit_handover(&group, &case_id, &old_lead, &request, true)
                .await
            {
                Ok(mut more) => events.append(&mut more),
                // The gateway out of reach (or not trusted, or not trusting
                // this client): the next read tries again.
                Err(e @ CaseError::Client(_))
                    if for_now(&e) || !matches!(&e, CaseError::Client(ClientError::Api { .. })) =>
                {
                    return Err(e)
                }
                // The request cannot be committed now (its old lead gone,
                // say, or the gateway refused the change for good, as one
                // not proven: the case's other changes and reads go on):
                // dropped, as a request refused when first read is.
                Err(e) => {
                    tracing::warn!(case = %case_id, error = %e, "a handover request could not be committed again; dropped");
                    self.meta.handover_requests.remove(&case_id);
                    self.save()?;
                }
            }
        }
        Ok(events)
    }

    /// The case's chronology as this client holds it.
    pub fn history(&self, case_id: &str) -> Result<Vec<HistoryEntry>, CaseError> {
        Ok(self.mls.history(&self.group_of(case_id)?)?)
    }

    /// The cases this client is in (not transfer groups).
    pub fn cases(&self) -> Result<Vec<String>, CaseError> {
        Ok(self
            .mls
            .groups()?
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| !c.starts_with(TRANSFER))
            .collect())
    }

    /// Has `read` show each event with `show` as it goes: a message is
    /// acknowledged (its sender told a person has it) only once what it
    /// brought was shown, so a `read` cut short (killed, or a long step
    /// after the messages, such as a handover retried or keys topped up)
    /// leaves nothing acknowledged that its reader was not shown. A `show`
    /// that fails (its output closed) stops the `read`
    /// ([`CaseError::Output`]) before anything more is acknowledged.
    pub fn show_as_read(&mut self, show: Box<Show>) {
        self.show = Some(show);
    }

    /// Shows the events of this `read` not shown yet.
    fn show(&mut self, events: &[Event]) -> Result<(), CaseError> {
        let fresh = events.get(self.shown..).unwrap_or_default();
        if let Some(show) = self.show.as_mut() {
            for e in fresh {
                show(e).map_err(|e| CaseError::Output(e.to_string()))?;
                self.shown += 1;
            }
        }
        self.shown = events.len();
        Ok(())
    }

    /// `read` stopped by `error` after `events`: those not shown yet are
    /// shown (as far as they can be) and returned with it.
    fn interrupted(&mut self, events: Vec<Event>, error: CaseError) -> CaseError {
        if let Err(e) = self.show(&events) {
            tracing::warn!(error = %e, "could not show what was read before the read stopped");
        }
        if events.is_empty() {
            error
        } else {
            CaseError::Interrupted {
                events,
                error: Box::new(error),
            }
        }
    }

    /// Processes the MLS messages waiting in the inbox, oldest first, waiting
    /// up to `wait` for the first one; acknowledges each one handled. Tops up
    /// KeyPackages when the gateway says the stock is low.
    ///
    /// A case's Welcome and its first message travel as two messages, so a
    /// reader woken by the Welcome may find the message not there yet. When
    /// a case was joined and nothing of it has been read, `read` waits up to
    /// [`FIRST_MESSAGE_GRACE`] more (within `wait`) for it: the worker sees
    /// the referral with the join, not on the next read.
    pub async fn read(&mut self, wait: Duration) -> Result<Vec<Event>, CaseError> {
        // A day is longer than any gateway holds a request open.
        let wait = wait.min(Duration::from_secs(86_400));
        let deadline = tokio::time::Instant::now() + wait;
        // Our own changes first: the cases' next messages may be in the
        // epochs they make.
        self.shown = 0;
        // A message no longer listed (acknowledged elsewhere, or given up
        // by the gateway) is not looked at again: its record goes.
        let now = crate::now_ms();
        let before = self.meta.waiting.len();
        self.meta
            .waiting
            .retain(|_, since| now.saturating_sub(*since) < 2 * WAIT_FOR_EARLIER_MS);
        if self.meta.waiting.len() != before {
            self.save()?;
        }
        let mut events = self.settle_all().await?;
        // What could not be sent before goes now; still not, it waits and
        // the read goes on.
        if let Err(e) = self.send_kept(None).await {
            tracing::warn!(error = %e, "a message kept from before could not be sent yet");
        }
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let listed = match self.read_batch(left, &mut events).await {
                Ok(n) => n,
                Err(e) => return Err(self.interrupted(events, e)),
            };
            // Only messages dealt with before wait (refused, or not for
            // this client to read): the gateway answers at once while
            // anything is listed, so look again every few seconds until
            // the wait ends, rather than return at once, or at once again.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !events.is_empty() || listed == 0 || left.is_zero() {
                break;
            }
            tokio::time::sleep(left.min(LOOK_AGAIN)).await;
        }
        let grace_end = tokio::time::Instant::now() + FIRST_MESSAGE_GRACE;
        while awaiting_first_content(&events) {
            let left = deadline
                .min(grace_end)
                .saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let before = events.len();
            if let Err(e) = self.read_batch(left, &mut events).await {
                return Err(self.interrupted(events, e));
            }
            if events.len() == before {
                break;
            }
        }
        match self.retry_handovers().await {
            Ok(mut more) => events.append(&mut more),
            Err(e) => return Err(self.interrupted(events, e)),
        }
        if let Err(e) = self.show(&events) {
            return Err(self.interrupted(events, e));
        }
        // Joining used up a KeyPackage, and KeyPackages expire: top up
        // when the gateway says the stock is low. What was read is read: a
        // failure here is only told.
        let joined = events.iter().any(|e| matches!(e, Event::Joined { .. }));
        if let Err(e) = self.top_up_keys(joined).await {
            tracing::warn!(error = %e, "could not top up this client's published keys; `client keys` does it");
        }
        Ok(events)
    }

    /// One pass over the inbox: waits up to `wait` for the first message;
    /// returns how many messages the inbox listed.
    async fn read_batch(
        &mut self,
        wait: Duration,
        events: &mut Vec<Event>,
    ) -> Result<usize, CaseError> {
        let inbox = self.api.inbox(wait).await?;
        let listed = inbox.messages.len();
        let mut work: Vec<&proto::InboxItem> = inbox
            .messages
            .iter()
            .filter(|m| m.envelope.kind == MessageKind::Mls)
            .collect();
        // A message that came before the change it follows waits; once
        // another message was taken, the waiting ones are looked at again
        // (the change may have been among them), in their order.
        let mut first_seen = std::collections::HashSet::new();
        loop {
            let mut waiting = Vec::new();
            let mut took = false;
            for item in work {
                match self.read_one(item, events).await? {
                    Step::Waits { first } => {
                        if first {
                            first_seen.insert(item.envelope.message_id.clone());
                        }
                        waiting.push(item);
                    }
                    Step::Taken => took = true,
                    Step::Other => {}
                }
            }
            if waiting.is_empty() || !took {
                // Told once, of those still waiting (not of one whose
                // change came later in the same listing). A message to
                // the team waits silently: most likely it is in a case we
                // are not in, and is set aside once its wait is over.
                for item in waiting {
                    let env = &item.envelope;
                    let to_team = matches!(env.recipient.target, Target::Team(_));
                    if first_seen.contains(&env.message_id) && !to_team {
                        events.push(Event::Waiting {
                            message_id: env.message_id.clone(),
                            from: env.sender.to_string(),
                        });
                    }
                }
                break;
            }
            work = waiting;
        }
        Ok(listed)
    }

    /// Sets how long a message to our team in a case this client does not
    /// hold yet waits for the Welcome that may still be on its way through
    /// another gateway (by default [`TEAM_WELCOME_WAIT`]), from when it
    /// was sent, before it is set aside as in a case we are not part of
    /// ([`Event::NotInCase`]).
    pub fn waiting_for_team_welcomes(&mut self, wait: Duration) {
        self.team_welcome_wait = wait;
    }

    /// Reads one listed message of the inbox.
    async fn read_one(
        &mut self,
        item: &proto::InboxItem,
        events: &mut Vec<Event>,
    ) -> Result<Step, CaseError> {
        let env = &item.envelope;
        let id = env.message_id.as_str();
        let to_team = matches!(env.recipient.target, proto::Target::Team(_));
        // Refused before: reported then, and not looked at again, but
        // for a message to the team once (see `Meta::rechecked`).
        let again = self.meta.refused.contains(id);
        if again {
            if !to_team || self.meta.rechecked.contains(id) {
                return Ok(Step::Other);
            }
            self.meta.rechecked.insert(id.to_owned());
            self.save()?;
        }
        let fetched = self.api.fetch(&env.message_id).await?;
        let from = env.sender.to_string();
        if fetched.body.hash() != fetched.envelope.content_hash {
            self.meta.refused.insert(env.message_id.to_string());
            self.save()?;
            if !again {
                events.push(Event::Refused {
                    message_id: env.message_id.clone(),
                    from,
                    error: "the body does not match the envelope's content hash".into(),
                });
            }
            return Ok(Step::Other);
        }
        let case = self.case_of_message(&fetched.body.0);
        if case.as_ref().is_some_and(|c| self.held.contains(c)) {
            // Its case waits for our own change to it (above).
            return Ok(Step::Other);
        }
        let resumed = !self.meta.processing.insert(id.to_owned());
        if !resumed {
            self.save()?;
        }
        let outcome = self.handle(env, &fetched.body.0).await;
        // Ahead of a change not read yet (by name: a case we are not
        // in yet, whose Welcome may still come): it waits, unchanged
        // and unacknowledged, for as long as a message may take.
        let now = crate::now_ms();
        let since = self.meta.waiting.get(id).copied();
        let early = match &outcome {
            Err(CaseError::Mls(e)) => may_wait(
                e,
                to_team,
                Waited {
                    sent_ms: env.accepted_at_ms,
                    since_ms: since,
                    now_ms: now,
                },
                self.team_welcome_wait,
            ),
            _ => false,
        };
        if early {
            self.meta.processing.remove(id);
            // Already waiting: the state is as it was (what the save
            // above wrote is harmless: taken up again, it waits again).
            if since.is_none() {
                self.meta.waiting.insert(id.to_owned(), now);
                self.save()?;
            }
            return Ok(Step::Waits {
                first: since.is_none(),
            });
        }
        self.meta.waiting.remove(id);
        let mut step = Step::Other;
        match outcome {
            Ok(mut evs) => {
                events.append(&mut evs);
                // Shown before its sender is told a person has it.
                self.show(events)?;
                self.api.ack(&env.message_id).await?;
                self.meta.refused.remove(id);
                self.meta.processing.remove(id);
                self.save()?;
                step = Step::Taken;
            }
            // Processed here before, its acknowledgement cut short:
            // shown then, or not (see `Event::ReadBefore`); told, and
            // acknowledged now.
            Err(CaseError::Mls(e @ (MlsError::Replay | MlsError::AlreadyInGroup(_))))
                if resumed =>
            {
                // A Welcome names its case by the group it joined.
                let case_id = case.or_else(|| match &e {
                    MlsError::AlreadyInGroup(g) => self.case_of(g),
                    _ => None,
                });
                events.push(Event::ReadBefore {
                    message_id: env.message_id.clone(),
                    from,
                    case_id,
                });
                self.show(events)?;
                self.api.ack(&env.message_id).await?;
                self.meta.refused.remove(id);
                self.meta.processing.remove(id);
                self.save()?;
            }
            // To our team, in a case whose group we are not in (we
            // joined the team after the case began, or were not added):
            // encrypted for its members only, so nothing here is ours to
            // read. Set aside, so the team's inbox does not wait for us;
            // the members of the case have it. Not acknowledged: its
            // sender must not be told a person has read it.
            // A Welcome to the team for a case we are in already (the
            // team was added again for a newcomer) is set aside the same.
            Err(CaseError::Mls(
                e @ (MlsError::UnknownGroup(_)
                | MlsError::WelcomeNotForUs
                | MlsError::AlreadyInGroup(_)),
            )) if to_team => {
                self.api.not_in_case(&env.message_id).await?;
                self.meta.refused.remove(id);
                self.meta.processing.remove(id);
                self.save()?;
                // A Welcome not for us says nothing to tell: we may be
                // in its case already. The case's messages say it if
                // we are not.
                if !matches!(e, MlsError::WelcomeNotForUs | MlsError::AlreadyInGroup(_)) {
                    events.push(Event::NotInCase {
                        message_id: env.message_id.clone(),
                        from,
                        to: env.recipient.to_string(),
                    });
                }
            }
            // A gateway out of reach or busy while handling it (a
            // Commit or Welcome it sends): not the message's fault. The
            // next read takes it up again (done already, it is then
            // acknowledged); meanwhile its case waits, and the read
            // goes on with the others. With no case to hold, it stops.
            Err(e @ CaseError::Client(_)) if for_now(&e) => {
                self.save()?;
                match case {
                    Some(c) => {
                        tracing::warn!(case = %c, error = %e, "a message of this case waits: a gateway is out of reach");
                        self.held.insert(c);
                    }
                    None => return Err(e),
                }
            }
            Err(e) => {
                self.meta.refused.insert(env.message_id.to_string());
                self.meta.processing.remove(id);
                self.save()?;
                if !again {
                    events.push(Event::Refused {
                        message_id: env.message_id.clone(),
                        from,
                        error: e.to_string(),
                    })
                }
            }
        }
        Ok(step)
    }

    /// Records the case `case_id` (group `group`) we joined by the Welcome
    /// `bytes` that `env` carried: the KeyPackages it was for, and the
    /// case's addresses.
    fn record_joined(
        &mut self,
        env: &proto::Envelope,
        bytes: &[u8],
        group: &GroupId,
        case_id: &str,
    ) -> Result<Vec<Event>, CaseError> {
        let me = self.me.to_string();
        let refs = MlsClient::welcome_refs(bytes)?;
        self.meta
            .joined_with
            .insert(case_id.to_owned(), refs.iter().map(hex::encode).collect());
        // Whoever added us, and the address it came by. A case handed over
        // to us takes the old lead's list instead once its transfer is
        // taken up (`import_pending`).
        let mut addrs = distinct_but(
            [
                format!("user:{}@{}", env.sender.user, env.sender.area),
                env.recipient.to_string(),
            ],
            &me,
        );
        // And every other member, as a member reading the Commit that added
        // them would (those of an area whose team we reach are reached by
        // it): added on our own, we would otherwise reach only whoever
        // added us.
        for i in self.mls.members(group)? {
            let Some(a) = address_of(&i) else { continue };
            if a != me && !addrs.contains(&a) && !team_in_area(&addrs, &a) {
                addrs.push(a);
            }
        }
        self.meta.cases.insert(case_id.to_owned(), addrs);
        let mut events = vec![Event::Joined {
            case_id: case_id.to_owned(),
            from: env.sender.to_string(),
        }];
        events.extend(self.import_pending(case_id, true)?);
        self.save()?;
        Ok(events)
    }

    async fn handle(
        &mut self,
        env: &proto::Envelope,
        bytes: &[u8],
    ) -> Result<Vec<Event>, CaseError> {
        let is_welcome = matches!(
            proto::mls::MlsMessageInfo::parse(bytes),
            Ok(proto::mls::MlsMessageInfo::Welcome(_))
        );
        if is_welcome {
            let to_team = matches!(env.recipient.target, Target::Team(_));
            return match self.mls.join(bytes) {
                Ok((_, case_id)) if case_id.starts_with(TRANSFER) => Ok(Vec::new()),
                Ok((group, case_id)) => self.record_joined(env, bytes, &group, &case_id),
                // This Welcome joined us before: a read cut short after
                // joining and before the case was recorded here (recorded
                // now, as then), or a copy by another of our addresses.
                Err(MlsError::AlreadyInGroup(group)) => match self.case_of(&group) {
                    Some(case_id)
                        if !self.meta.cases.contains_key(&case_id)
                            && !case_id.starts_with(TRANSFER) =>
                    {
                        self.record_joined(env, bytes, &group, &case_id)
                    }
                    _ if to_team => Err(MlsError::AlreadyInGroup(group).into()),
                    _ => Ok(Vec::new()),
                },
                // For others of the team, not us: we were not added, or are
                // in the case already (a newcomer's Welcome), or sent it.
                Err(MlsError::WelcomeNotForUs) if to_team => Err(MlsError::WelcomeNotForUs.into()),
                Err(MlsError::WelcomeNotForUs) => Ok(Vec::new()),
                Err(e) => Err(e.into()),
            };
        }
        // The third policy check, before the plaintext is kept.
        let keep = keep_declared(env.disclosure.as_ref().map(|d| d.fields.clone()));
        // The address it came by, if it is one of ours (our own, or a team
        // of our area, as the gateway lists only our teams'): a copy by
        // another of them is set aside; by anything else, a replay.
        let via = env.recipient.to_string();
        let ours = env.recipient == self.me
            || (matches!(env.recipient.target, Target::Team(_))
                && env.recipient.area == self.me.area);
        match self
            .mls
            .process_checked(bytes, ours.then_some(via.as_str()), &keep)?
        {
            Processed::Application {
                group,
                sender,
                plaintext,
                ..
            } => {
                let case_id = self.case_of(&group).unwrap_or_default();
                if case_id.starts_with(TRANSFER) {
                    return self.receive_history(&sender, plaintext);
                }
                if let Some(request) = plaintext.strip_prefix(HANDOVER_MARK) {
                    return self
                        .commit_handover(&group, &case_id, &sender, request, false)
                        .await;
                }
                if let Some(d) = &env.disclosure {
                    self.remember_fled_from(&case_id, &d.fled_from)?;
                }
                Ok(vec![Event::Message {
                    case_id,
                    from: sender,
                    plaintext,
                }])
            }
            Processed::HistoryImported {
                group,
                from,
                imported,
            } => Ok(vec![Event::History {
                case_id: self.case_of(&group).unwrap_or_default(),
                from,
                entries: imported,
            }]),
            Processed::Commit {
                group,
                added,
                removed,
                ..
            } => {
                let case_id = self.case_of(&group).unwrap_or_default();
                // Only the Commit adding the lead settles it (another
                // member's change may come first).
                let lead = self
                    .meta
                    .handover_leads
                    .get(&case_id)
                    .filter(|l| added.contains(l))
                    .cloned();
                if lead.is_some() {
                    self.meta.handover_leads.remove(&case_id);
                }
                let addrs = self.meta.cases.entry(case_id.clone()).or_default();
                for r in &removed {
                    if let Some(a) = address_of(r) {
                        addrs.retain(|x| *x != a);
                    }
                }
                // Members added through a team are reached by its address
                // already (see `team_in_area`); a handover's new lead by
                // their own.
                for i in &added {
                    let Some(a) = address_of(i) else { continue };
                    let by_team = team_in_area(addrs, &a) && lead.as_deref() != Some(i.as_str());
                    if !by_team && !addrs.contains(&a) && a != self.me.to_string() {
                        addrs.push(a);
                    }
                }
                self.save()?;
                Ok(vec![Event::Membership {
                    case_id,
                    added,
                    removed,
                }])
            }
            Processed::RemovedUs { group, .. } => Ok(vec![Event::Removed {
                case_id: self.case_of(&group).unwrap_or_default(),
            }]),
            Processed::OwnMessage { .. } | Processed::Copy { .. } => Ok(Vec::new()),
            #[allow(unreachable_patterns)]
            _ => Ok(Vec::new()),
        }
    }

    fn receive_history(&mut self, from: &str, transfer: Vec<u8>) -> Result<Vec<Event>, CaseError> {
        let t = Transfer::parse(&transfer)?;
        let Some(key_package) = t.key_package else {
            // Made by a client before transfers named their KeyPackage:
            // nothing binds it to a handover that added us.
            return Ok(vec![Event::HandoverRefused {
                case_id: t.case_id,
                from: from.to_owned(),
            }]);
        };
        let old = address_of(from);
        let addresses = t
            .addresses
            .into_iter()
            .filter(|a| Some(a) != old.as_ref())
            .collect();
        self.meta.handed_over.push(HandedOver {
            case_id: t.case_id.clone(),
            from: from.to_owned(),
            key_package,
            addresses,
            fled_from: t.fled_from,
            history: t.history,
        });
        let events = self.import_pending(&t.case_id, false)?;
        self.save()?;
        Ok(events)
    }

    /// Whether the Welcome that brought us into `case_id` was made with the
    /// KeyPackage `key_package` (hex) names.
    fn joined_with(&self, case_id: &str, key_package: &str) -> bool {
        self.meta
            .joined_with
            .get(case_id)
            .is_some_and(|refs| refs.iter().any(|r| r == key_package))
    }

    /// Takes up what was handed over for a case once we are in its group:
    /// its chronology and the areas the family fled, from a transfer that
    /// names the KeyPackage we were added with; any other is let go.
    /// `at_join`: the Welcome was just read (else the transfer came after it).
    fn import_pending(&mut self, case_id: &str, at_join: bool) -> Result<Vec<Event>, CaseError> {
        let Ok(group) = self.group_of(case_id) else {
            return Ok(Vec::new());
        };
        let mut events = Vec::new();
        let (now, later): (Vec<HandedOver>, Vec<HandedOver>) =
            std::mem::take(&mut self.meta.handed_over)
                .into_iter()
                .partition(|h| h.case_id == case_id);
        self.meta.handed_over = later;
        for h in now {
            if !self.joined_with(case_id, &h.key_package) {
                events.push(Event::HandoverRefused {
                    case_id: h.case_id,
                    from: h.from,
                });
                continue;
            }
            // One transfer per handover: any other naming the KeyPackage
            // (a member saw it in the request) is refused.
            self.meta.joined_with.remove(case_id);
            // The case's addresses, as the old lead had them (a transfer
            // that came after the Welcome replaces the committer's address
            // the Welcome gave: the committer is reached by them).
            // The old lead's list. Read with the Welcome, it replaces the
            // committer's address the Welcome gave: the committer is reached
            // by it already (it read the request sent to that list), and its
            // own address as well would bring it every message twice. Come
            // after, it adds to what this client has learnt since (members
            // added by Commits read meanwhile); a person then reached twice
            // gets the second copy set aside.
            let known = if at_join {
                Vec::new()
            } else {
                self.meta.cases.get(case_id).cloned().unwrap_or_default()
            };
            let addresses =
                distinct_but(h.addresses.into_iter().chain(known), &self.me.to_string());
            if !addresses.is_empty() {
                self.meta.cases.insert(case_id.to_owned(), addresses);
            }
            // The new lead keeps the family's whereabouts from where they fled.
            self.remember_fled_from(case_id, &h.fled_from)?;
            let n = self.mls.import_history(&group, &h.from, &h.history)?;
            events.push(Event::History {
                case_id: h.case_id,
                from: h.from,
                entries: n,
            });
        }
        Ok(events)
    }
}

/// Shows one event of `read` to the person reading
/// ([`Caseworker::show_as_read`]).
pub type Show = dyn FnMut(&Event) -> std::io::Result<()> + Send;

/// What [`Caseworker::read_one`] did with a message.
enum Step {
    /// Taken: processed and acknowledged (a case's state may have moved).
    Taken,
    /// It waits for a change made before it (see [`Event::Waiting`]);
    /// `first`: found waiting for the first time.
    Waits { first: bool },
    /// Anything else: refused, set aside, held, or skipped.
    Other,
}

/// When a message that could not be read yet was sent, first found
/// waiting here, and now (ms since the epoch), for [`may_wait`].
#[derive(Debug, Clone, Copy)]
struct Waited {
    sent_ms: u64,
    since_ms: Option<u64>,
    now_ms: u64,
}

/// Whether a message that could not be read because of `why` waits for a
/// change made before it: one from a later epoch of a case we are in
/// ([`MlsError::Ahead`]), or of a case we do not hold yet
/// ([`MlsError::UnknownGroup`]) whose Welcome may still come. To a
/// person, it waits [`WAIT_FOR_EARLIER_MS`] from when it was first found;
/// to a team, a case we do not hold is most likely one we are not in, so
/// it waits only `team_wait` from when it was sent (and from when it was
/// first found, whatever the sender's clock says), then is set aside.
fn may_wait(why: &MlsError, to_team: bool, t: Waited, team_wait: Duration) -> bool {
    let within = |from: u64, limit: u64| t.now_ms.saturating_sub(from) < limit;
    match why {
        MlsError::Ahead { .. } => t.since_ms.is_none_or(|s| within(s, WAIT_FOR_EARLIER_MS)),
        MlsError::UnknownGroup(_) if !to_team => {
            t.since_ms.is_none_or(|s| within(s, WAIT_FOR_EARLIER_MS))
        }
        MlsError::UnknownGroup(_) => {
            let limit = u64::try_from(team_wait.as_millis()).unwrap_or(u64::MAX);
            within(t.sent_ms, limit) && t.since_ms.is_none_or(|s| within(s, limit))
        }
        _ => false,
    }
}

/// How long, by default, a message to our team in a case we do not hold
/// yet waits for its Welcome (see [`Caseworker::waiting_for_team_welcomes`]):
/// a Welcome normally follows within seconds, and a gateway briefly out
/// of reach is tried again within a minute or two.
pub const TEAM_WELCOME_WAIT: Duration = Duration::from_secs(300);

/// How long a message that came before a change it follows waits for
/// that change (a Commit or Welcome still on its way, by another
/// gateway's link) before it is refused: as long as the gateways try to
/// deliver a message (their default validity).
const WAIT_FOR_EARLIER_MS: u64 = 5 * 24 * 3600 * 1000;

/// Why a history export inside a case's group is refused (see
/// [`keep_declared`]).
const HISTORY_IN_GROUP: &str = "a chronology handed over inside the case's group: chronologies \
     are handed over only to a new lead, in a transfer";

/// The third policy check, as `read` makes it before a message's
/// plaintext is kept ([`MlsClient::process_checked`]): only what the
/// envelope declared (`declared`; none: no check, as in an area without a
/// policy). A handover's transfer and request are checked as what they
/// are. A history export inside a case's group is refused whatever it
/// declares: a chronology is handed over only in a transfer, to the new
/// lead the handover adds (see [`Caseworker::handover`]); one in the group
/// would let any member write entries in others' names into everyone's
/// chronology.
fn keep_declared(declared: Option<Vec<String>>) -> impl Fn(&str, Kept<'_>) -> Result<(), String> {
    move |case_id: &str, kept: Kept<'_>| {
        let Kept::Message(plaintext) = kept else {
            return Err(HISTORY_IN_GROUP.into());
        };
        if let Some(request) = plaintext.strip_prefix(HANDOVER_MARK) {
            // A handover request is that and nothing more.
            return serde_json::from_slice::<HandoverRequest>(request)
                .map(|_| ())
                .map_err(|e| format!("not a handover request: {e}"));
        }
        if case_id.starts_with(TRANSFER) {
            // A transfer is that, with a case id that is one, whatever
            // was declared.
            let t = Transfer::parse(plaintext).map_err(|e| e.to_string())?;
            let Some(fields) = &declared else {
                return Ok(());
            };
            // A chronology handed over: each of its entries within what
            // the transfer declared.
            for entry in MlsClient::export_entries(&t.history).map_err(|e| e.to_string())? {
                check_declared(&entry.plaintext, fields).map_err(|e| e.to_string())?;
            }
            return Ok(());
        }
        match &declared {
            Some(fields) => check_declared(plaintext, fields).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// `addresses` in order, each once, without `me`.
fn distinct_but(addresses: impl IntoIterator<Item = String>, me: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    addresses
        .into_iter()
        .filter(|a| a != me && seen.insert(a.clone()))
        .collect()
}

/// The third policy check: decrypted content must hold only the fields its
/// envelope declared. Structured content is a JSON object of dotted field
/// paths; free text counts as one `chronology` entry.
pub fn check_declared(plaintext: &[u8], declared: &[String]) -> Result<(), CaseError> {
    let covered = |field: &str| {
        declared.iter().any(|d| {
            field == d || field.starts_with(&format!("{d}.")) || d.starts_with(&format!("{field}."))
        })
    };
    match serde_json::from_slice::<serde_json::Value>(plaintext) {
        Ok(serde_json::Value::Object(_)) => {
            let declared = declared
                .iter()
                .map(|d| {
                    policy::FieldPath::new(d.as_str())
                        .map_err(|e| CaseError::Invalid(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            crate::referral::check_declared(plaintext, &declared)
                .map_err(|e| CaseError::Invalid(format!("{e}: refused")))?;
            Ok(())
        }
        _ if covered("chronology") => Ok(()),
        _ => Err(CaseError::Invalid(
            "free-text content, but the envelope does not declare chronology: refused".into(),
        )),
    }
}

#[cfg(test)]
mod tests;
