//! Durable storage: the [`Store`] contract and its SQLite implementation.
//!
//! Invariant: every method returns only after its changes are committed and
//! on disk (fsynced), so a caller may acknowledge what it stored; and reads
//! see only what is on disk.
//!
//! The SQLite store runs one thread that owns the connection and commits the
//! jobs waiting in its queue as one transaction (group commit); if a job
//! fails, the group runs again with a savepoint per job, so one failure
//! does not undo the others. The commit is pipelined: a second thread
//! fsyncs the WAL and only then answers the group's callers, while the
//! writer already runs the next group (see `Durability`).

use std::future::Future;
use std::path::Path;

use proto::{
    AreaId, Body, ContentHash, Envelope, FederationItem, InboxItem, MessageId, Status, StatusEvent,
    StatusResponse, TeamId, UserId,
};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

mod bodies;
mod tail;
use bodies::{BodyLog, BodyRef};
use tail::{Effect, Tails};

/// Why storage failed. Nothing was changed by the failed call.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database reported an error.
    #[error("database: {0}")]
    Db(String),
    /// A stored row could not be decoded.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The store is shut down.
    #[error("store is closed")]
    Closed,
    /// A pipelined batch does not directly follow its session's last
    /// stored batch; nothing of it was stored.
    #[error("{0}")]
    OutOfOrder(String),
    /// The message was settled (acknowledged by everyone who had to) and
    /// its ciphertext erased at this time (ms since the epoch); its
    /// envelope and status are kept.
    #[error("its ciphertext was erased at {0} ms after being acknowledged")]
    Erased(u64),
    /// The disk (or the gateway's quota on it) is full; the transaction
    /// was rolled back.
    #[error("disk full: {0}")]
    DiskFull(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            return StoreError::DiskFull(e.to_string());
        }
        StoreError::Db(e.to_string())
    }
}

impl StoreError {
    /// An I/O error while `doing` something: a full disk or quota is told
    /// apart, so that callers are answered "retry later", not "internal".
    fn io(doing: &str, e: &std::io::Error) -> StoreError {
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        match e.kind() {
            StorageFull | QuotaExceeded => StoreError::DiskFull(format!("{doing}: {e}")),
            _ => StoreError::Db(format!("{doing}: {e}")),
        }
    }
}

/// Where a newly accepted message goes next.
#[derive(Debug, Clone)]
pub enum Route {
    /// The recipient is in this area: store it in the inbox at once.
    Local,
    /// Queue it for this peer.
    Peer(AreaId),
}

/// A message a user submitted, ready to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Its envelope (with a fresh message id).
    pub envelope: Envelope,
    /// Its body.
    pub body: Body,
    /// Where it goes.
    pub route: Route,
    /// For an MLS Commit: what binds its epoch to it, checked for order.
    pub commit: Option<CommitToBind>,
    /// Whether it may be stored if it is new. False while the disk is
    /// short of space: a repeat of an earlier submission is still answered
    /// as one, and anything else is [`SubmitOutcome::NotStored`].
    pub accept_new: bool,
}

/// An MLS Commit whose epoch is to be bound to it (see [`Bind`]).
#[derive(Debug, Clone)]
pub struct CommitToBind {
    /// Its group id (lowercase hex).
    pub group: String,
    /// The epoch it was made in.
    pub epoch: u64,
    /// Who orders the group's Commits.
    pub orderer: Orderer,
    /// Its member's proof, if it came with one (see [`Bind::Unproven`]).
    pub proof: Option<proto::CommitProof>,
}

/// Who orders an MLS group's Commits, as this gateway binds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orderer {
    /// This gateway is the group's home: its record sees every Commit of
    /// the group, so its epochs must follow on from the newest bound (see
    /// [`Bind::Ahead`]), and each takes a proof (see [`Bind::Unproven`]).
    Home,
    /// The group's home (another area) has bound the epoch to this Commit:
    /// the record here follows it. No proof is checked or key kept here
    /// (they are the home's to judge: a key kept here could be one a
    /// removed member named when sending an old Commit again, and a refusal
    /// here of what the home has bound would leave the epoch to a Commit
    /// no one received).
    OrderedAtHome,
    /// No home orders the group (its id names none, or one this gateway
    /// cannot ask): this gateway's record alone does, proofs included.
    HereAlone,
}

/// One peer's outbound queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerQueue {
    /// The peer.
    pub peer: AreaId,
    /// Items queued for it.
    pub items: u64,
    /// When the oldest of them was queued (ms since the epoch): a message
    /// when it was accepted, a status update when it happened.
    pub oldest_queued_ms: Option<u64>,
}

/// How long a status update for a peer is kept queued.
const STATUS_ITEM_VALIDITY_MS: u64 = 30 * 86_400_000;

/// Why a delivered message became undeliverable: the receiving gateway gave
/// up an MLS message to a team that no one acknowledged and no one is left
/// to: those it was for left the team (past [`WAIT_FOR_LEAVERS`]) or were
/// not in its case. It is the only reason a receiving gateway gives a
/// message up, so a sender's gateway told `undeliverable` by a peer records
/// this.
pub const GIVEN_UP_UNREAD: &str = "no one read it: those in the team it was sent to left the team, or were not in its case, without reading it. Add the team's current members to the case and send it again";

/// Why a queued message went back to its sender unsent: this gateway's
/// copy of it was found damaged when it was to be sent.
pub const DAMAGED_COPY: &str = "this gateway's stored copy of it was found damaged before the receiving gateway confirmed it: send it again (it may have arrived once already)";

/// What a submission did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Stored as a new message.
    Stored(MessageId, Status),
    /// The sender's idempotency key was used before for this same message.
    Duplicate(MessageId, Status),
    /// The key was used before for a different recipient or body.
    Conflict(MessageId),
    /// An MLS Commit for an epoch that already has a different Commit; the
    /// group's newest epoch with a Commit is given.
    StaleEpoch(u64),
    /// An MLS Commit, at its group's home, for an epoch past the one after
    /// the newest bound (given): nothing was stored.
    EpochAhead(u64),
    /// An MLS Commit without a valid proof (why is given; see
    /// [`Bind::Unproven`]): nothing was stored.
    Unproven(&'static str),
    /// New, and [`NewMessage::accept_new`] was false: nothing was stored.
    NotStored,
}

/// What binding an epoch of a group to a Commit came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// The Commit that started the epoch named the epoch's key, and this
    /// Commit's proof is missing or not signed with it (why is given): a
    /// member of the epoch did not make it (one removed before it, say),
    /// so it cannot take the epoch. Nothing is bound.
    Unproven(&'static str),
    /// The epoch is this Commit's (now, or already).
    Bound,
    /// Another Commit has the epoch, or a later one is bound; the newest
    /// epoch bound is given.
    Stale(u64),
    /// At the group's home, whose record sees every Commit of the group:
    /// the epoch is past the one after the newest bound (given; none bound,
    /// past epoch 1). No member can be there, so it is refused, and no one
    /// can take the group's future epochs ahead of its members.
    Ahead(u64),
}

/// An incoming federation item that passed the server's checks.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// A message for a recipient here.
    Deliver(Box<Envelope>, Body),
    /// A status change of a message sent from here to the calling peer.
    Status(MessageId, Status, u64),
    /// A message the gateway's checks refused (its recipient left the
    /// directory, the policy changed, its validity ran out, …). Nothing of
    /// it is stored. A repeat of one the peer delivered before, whose
    /// answer was lost, is answered as a duplicate: the lookup runs in the
    /// store's order, so it also finds an original queued just before it
    /// and not yet committed.
    Refused(MessageId),
}

/// What became of an incoming item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingOutcome {
    /// Stored now.
    Stored,
    /// Stored before: nothing changed.
    Duplicate,
    /// Another message (another sender's, or under another idempotency
    /// key) was stored before under the same id: nothing changed.
    Conflict,
    /// No such message was sent from here to that peer.
    UnknownMessage,
    /// A [`Incoming::Refused`] message not stored before: the refusal stands.
    Refused,
}

/// One queued federation item.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Queue position (increasing).
    pub seq: i64,
    /// The item to send.
    pub item: FederationItem,
}

/// What the peer said about a queued item.
#[derive(Debug, Clone)]
pub enum Sent {
    /// Stored (or already stored) by the peer.
    Accepted,
    /// Refused for good, with the reason to tell the sender.
    Refused(String),
}

/// A submission as deduplication sees it (see [`Store::prior_submission`]).
#[derive(Debug, Clone)]
pub struct Submitted {
    /// Its sender.
    pub user: UserId,
    /// The sender's idempotency key.
    pub key: proto::IdempotencyKey,
    /// Whom it is for.
    pub recipient: proto::Recipient,
    /// Its body's hash.
    pub content_hash: proto::ContentHash,
    /// Its category.
    pub category: proto::Category,
}

/// A user and the KeyPackage claimed for them, if they had one.
pub type Claimed = (UserId, Option<Vec<u8>>);

/// A KeyPackage a user publishes, checked by the gateway (see
/// [`proto::mls::KeyPackageInfo`]).
#[derive(Debug, Clone)]
pub struct NewKeyPackage {
    /// Its `KeyPackageRef`, hex.
    pub kp_ref: String,
    /// The KeyPackage itself.
    pub bytes: Vec<u8>,
    /// Whether it may be handed out more than once.
    pub last_resort: bool,
    /// The last second of its lifetime.
    pub not_after_s: u64,
}

/// A user's published KeyPackages, as [`Store::put_key_packages`] counts
/// them: only those with [`KEY_PACKAGE_RENEWAL`] or more of their lifetime
/// left, so a client tops up before they run out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStock {
    /// How many of the upload were stored now.
    pub stored: usize,
    /// Single-use KeyPackages left.
    pub available: usize,
    /// Whether a last-resort KeyPackage is held.
    pub last_resort: bool,
}

/// A KeyPackage is handed out only while at least this much of its
/// lifetime is left (a claimer checks it against its own clock); one past
/// that is removed.
pub const KEY_PACKAGE_CLAIM_MARGIN: std::time::Duration = std::time::Duration::from_secs(3600);

/// A KeyPackage with less of its lifetime left than this is not counted in
/// a user's stock (it is still handed out until
/// [`KEY_PACKAGE_CLAIM_MARGIN`]), so the client publishes fresh ones first.
pub const KEY_PACKAGE_RENEWAL: std::time::Duration = std::time::Duration::from_secs(14 * 86_400);

/// What [`Store::sync_teams`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeamChanges {
    /// Members new to a team.
    pub joined: usize,
    /// Members back in a team they had left (within [`WAIT_FOR_LEAVERS`]):
    /// they see again what they had not acknowledged.
    pub returned: usize,
    /// Members gone from a team.
    pub left: usize,
    /// MLS messages to a team settled because they waited for no one any
    /// more (only at the first call, for messages an earlier gateway left
    /// waiting for members no longer in the directory).
    pub settled: usize,
}

/// How long a member who left a team is still waited for: her
/// acknowledgement of the team's MLS messages stored while she was in it
/// holds their settlement back (see [`Store::settle_after_leavers`]), and if
/// she comes back meanwhile she sees them again. A member removed by
/// mistake and put back loses nothing; after this, a leaver no longer
/// holds anything back, and one who comes back counts from her return.
pub const WAIT_FOR_LEAVERS: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// Whose inbox: a user and the teams they are in.
#[derive(Debug, Clone)]
pub struct Mailbox {
    /// The user.
    pub user: UserId,
    /// Their teams.
    pub teams: Vec<TeamId>,
}

/// Where a pipelined federation batch stands in its sender's session: the
/// session's random id and the batch's number in it (1, 2, 3, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOrder {
    /// The sending session.
    pub session: u64,
    /// The batch's number within it.
    pub batch: u64,
}

/// A job in the store's queue: resolves to its outcome once its group is
/// committed and on disk.
#[derive(Debug)]
pub struct Committing<R>(oneshot::Receiver<Result<R, StoreError>>);

impl<R> Future for Committing<R> {
    type Output = Result<R, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

/// The storage contract of a gateway. The SQLite implementation is the
/// embedded default; a PostgreSQL one can implement the same contract.
pub trait Store: Send + Sync + 'static {
    /// Accepts a submission, deduplicated on (sender, idempotency key).
    fn submit(
        &self,
        m: NewMessage,
    ) -> impl Future<Output = Result<SubmitOutcome, StoreError>> + Send;
    /// What is stored (on disk) under a submission's (sender, idempotency
    /// key), as [`Store::submit`] would answer a repeat: `Duplicate`,
    /// `Conflict`, or `None` if nothing is. Read off the writer, so that a
    /// repeat is answered before anything that has changed since could
    /// refuse it.
    fn prior_submission(
        &self,
        what: Submitted,
    ) -> impl Future<Output = Result<Option<SubmitOutcome>, StoreError>> + Send;
    /// Binds epoch `epoch` of MLS group `group` (hex) to the Commit whose
    /// content hash is `hash`, for a group whose home is this gateway's
    /// area and a member who submitted the Commit at another gateway.
    fn order_commit(
        &self,
        group: String,
        epoch: u64,
        hash: ContentHash,
        proof: Option<proto::CommitProof>,
    ) -> impl Future<Output = Result<Bind, StoreError>> + Send;
    /// Stores a peer's batch, in order, deduplicated on message id and on
    /// (sender, idempotency key).
    fn accept_batch(
        &self,
        peer: AreaId,
        items: Vec<Incoming>,
    ) -> impl Future<Output = Result<Vec<IncomingOutcome>, StoreError>> + Send;
    /// Puts a peer's batch in the queue of work to store, and returns once
    /// it is there: batches queued one after another are stored in that
    /// order. Await the [`Committing`] for the outcome (as [`Store::accept_batch`]).
    ///
    /// With an `order`, the batch is stored only if it directly follows the
    /// last batch stored of its session (batch 1 starts a session); the
    /// check and the items commit together. Otherwise nothing of it is
    /// stored and it fails with [`StoreError::OutOfOrder`], so a session's
    /// batches are never stored past a gap.
    fn queue_batch(
        &self,
        peer: AreaId,
        items: Vec<Incoming>,
        order: Option<BatchOrder>,
    ) -> impl Future<Output = Result<Committing<Vec<IncomingOutcome>>, StoreError>> + Send;
    /// Messages for a mailbox not yet acknowledged, oldest first.
    fn inbox(
        &self,
        mb: Mailbox,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<InboxItem>, StoreError>> + Send;
    /// One message of a mailbox; marks it fetched and queues the news for its sender.
    fn fetch(
        &self,
        mb: Mailbox,
        id: MessageId,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<(Envelope, Body)>, StoreError>> + Send;
    /// Acknowledges a message of a mailbox and queues the news for its
    /// sender. An MLS message to a team leaves the mailbox index once each
    /// member it is for (see [`Store::sync_teams`]) has acknowledged it.
    /// Its sender's own acknowledgement (of the echo of an MLS message to a
    /// team they are in) counts for that, not as the message read: the
    /// status stays as it is, and is returned.
    fn ack(
        &self,
        mb: Mailbox,
        id: MessageId,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<Status>, StoreError>> + Send;
    /// A team member's word that an MLS message to her team is in a case
    /// she is not part of, so she cannot read it: it no longer waits for
    /// her (or lists to her), and its sender is not told it was
    /// acknowledged. If that leaves it waiting for no one and no one read
    /// it, it is given up (the sender is told it is undeliverable; see
    /// [`GIVEN_UP_UNREAD`]). Returns its status then; `None` if it is not
    /// an MLS message to one of her teams that she can list.
    fn not_in_case(
        &self,
        mb: Mailbox,
        id: MessageId,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<Status>, StoreError>> + Send;
    /// Records who is in which team now (`members`: every team's members,
    /// from the directory), at `now_ms`. A member new since the last call is
    /// shown the team's MLS messages stored from now on, not those from
    /// before (encrypted for the group as it was, she could not decrypt
    /// them); a member gone is waited for during [`WAIT_FOR_LEAVERS`] only.
    /// Writes nothing when nothing changed. Call it when the gateway
    /// starts, and before a new directory is put in force.
    fn sync_teams(
        &self,
        members: Vec<(TeamId, UserId)>,
        now_ms: u64,
    ) -> impl Future<Output = Result<TeamChanges, StoreError>> + Send;
    /// Settles the MLS messages to a team that were waiting only for members
    /// who left it more than [`WAIT_FOR_LEAVERS`] before `now_ms`, and
    /// forgets those members. Returns how many messages were settled.
    fn settle_after_leavers(
        &self,
        now_ms: u64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
    /// Erases the ciphertext of up to `max` inbox messages settled (no
    /// one can list them any more) at or before `settled_by_ms`: their rows lose
    /// body and body reference, their envelope and status stay, and a
    /// fetch then fails with [`StoreError::Erased`]. Returns how many.
    fn erase_settled(
        &self,
        settled_by_ms: u64,
        now_ms: u64,
        max: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
    /// Overwrites with zeros, durably, the body log bytes of up to `max`
    /// erased messages, and forgets where they were; returns how many.
    fn zero_erased(&self, max: usize) -> impl Future<Output = Result<usize, StoreError>> + Send;
    /// Removes the inbox body segments that no row refers to any more (all
    /// their messages erased); returns how many.
    fn remove_erased_bodies(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;
    /// A sent message's status, for its sender only.
    fn status(
        &self,
        sender: UserId,
        id: MessageId,
    ) -> impl Future<Output = Result<Option<StatusResponse>, StoreError>> + Send;
    /// The oldest queued items for a peer after queue position `after`.
    /// An item whose stored copy is damaged (its body past the end of its
    /// segment, its segment gone, its row undecodable) can never be sent:
    /// it goes back to its sender as undeliverable ([`DAMAGED_COPY`]) and
    /// the items behind it are read, so one damaged item does not hold the
    /// peer's queue. A read that may succeed later (a file that could not
    /// be opened now) is an error, and the item stays.
    fn queued(
        &self,
        peer: AreaId,
        after: i64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Queued>, StoreError>> + Send;
    /// Records the peer's verdicts on queued items and removes them from the queue.
    fn sent(
        &self,
        peer: AreaId,
        results: Vec<(i64, Sent)>,
        now_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Returns the messages queued for `peer` at queue positions after
    /// `seqs.0` up to `seqs.1` whose validity ran out by `expired_by_ms` to
    /// their senders as undeliverable at `now_ms`, giving `reason`; returns
    /// how many.
    fn expire(
        &self,
        peer: AreaId,
        seqs: (i64, i64),
        expired_by_ms: u64,
        now_ms: u64,
        reason: String,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
    /// The areas that have items queued for them.
    fn queued_peers(&self) -> impl Future<Output = Result<Vec<AreaId>, StoreError>> + Send;
    /// The last queue position taken by an item for `peer` (0 if none).
    fn queue_end(&self, peer: AreaId) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// Returns every message queued for `peer` to its sender as
    /// undeliverable, giving `reason`, and drops the status updates queued
    /// for it: the gateway no longer federates with that area. Returns how
    /// many messages and how many status updates.
    fn give_back_queue(
        &self,
        peer: AreaId,
        now_ms: u64,
        reason: String,
    ) -> impl Future<Output = Result<(usize, usize), StoreError>> + Send;
    /// Which of the messages `ids` the gateway of `sender_area` delivered
    /// here already (a repeat is answered as a duplicate, whatever has
    /// changed since it was stored).
    /// Stores a user's KeyPackages; a new last-resort package replaces the
    /// old one. One with less than [`KEY_PACKAGE_CLAIM_MARGIN`] of its
    /// lifetime left is not stored, and those held that are past it are
    /// removed. Returns the user's stock (see [`KeyStock`]).
    fn put_key_packages(
        &self,
        user: UserId,
        kps: Vec<NewKeyPackage>,
        now_ms: u64,
    ) -> impl Future<Output = Result<KeyStock, StoreError>> + Send;
    /// Takes one KeyPackage per user: the oldest single-use one (removed), or
    /// else the last-resort one (kept); only one with
    /// [`KEY_PACKAGE_CLAIM_MARGIN`] of its lifetime left at `now_ms`, so an
    /// expired one never fails a referral. Those past it are removed.
    fn claim_key_packages(
        &self,
        users: Vec<UserId>,
        now_ms: u64,
    ) -> impl Future<Output = Result<Vec<Claimed>, StoreError>> + Send;
    /// Why the store takes no more work, if it does not (an fsync of its
    /// log failed); the gateway then reports itself unhealthy.
    fn fault(&self) -> Option<String>;
    /// How many items are queued per peer.
    fn queue_depths(&self) -> impl Future<Output = Result<Vec<PeerQueue>, StoreError>> + Send;
    /// The pipelined sessions remembered per peer, each with its last
    /// stored batch (see [`Store::queue_batch`]).
    fn peer_sessions(
        &self,
    ) -> impl Future<Output = Result<Vec<(AreaId, BatchOrder)>, StoreError>> + Send;
}

// === impl SqliteStore ===

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A unit of the writer's work. A group's jobs normally run back to back in
/// its transaction, without savepoints: a savepoint copies every page a job
/// touches into a sub-journal first (about a tenth of the store's CPU). If a
/// job fails, the whole group is rolled back and run again with a savepoint
/// per job, so that the failure undoes only that job's writes; a job is
/// therefore written so that it can run more than once, with only its last
/// run counting.
trait Job: Send {
    /// Runs the job; `own_savepoint`: inside a savepoint of its own, undone
    /// if it fails. Returns its error, if it failed.
    fn run(&mut self, conn: &Connection, own_savepoint: bool) -> Result<(), StoreError>;
    /// Tells the caller the outcome of its last run, given the group's commit.
    fn complete(self: Box<Self>) -> Completion;
}

/// A job for [`SqliteStore::queue`]: the work and its caller's channel.
struct Pending<F, R> {
    work: F,
    outcome: Option<Result<R, StoreError>>,
    tx: oneshot::Sender<Result<R, StoreError>>,
}

impl<F, R> Job for Pending<F, R>
where
    F: FnMut(&Connection) -> Result<R, StoreError> + Send,
    R: Send + 'static,
{
    fn run(&mut self, conn: &Connection, own_savepoint: bool) -> Result<(), StoreError> {
        let r = if own_savepoint {
            in_savepoint(conn, &mut self.work)
        } else {
            (self.work)(conn)
        };
        let failed = r.as_ref().err().cloned();
        self.outcome = Some(r);
        failed.map_or(Ok(()), Err)
    }

    fn complete(self: Box<Self>) -> Completion {
        let Pending { outcome, tx, .. } = *self;
        // A job that never ran (its group could not begin) has no outcome.
        let r = outcome.unwrap_or(Err(StoreError::Closed));
        Box::new(move |commit: Result<(), StoreError>| {
            let _ = tx.send(commit.and(r));
        })
    }
}

/// The embedded store: one SQLite file in WAL mode; commits are fsynced by
/// the sync thread before anyone is answered or can read them.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    jobs: mpsc::Sender<Box<dyn Job>>,
    reads: mpsc::Sender<ReadJob>,
    own_area: AreaId,
    bodies: std::sync::Arc<Bodies>,
    /// Peers' newest queued items, for the federation worker's reads.
    tails: std::sync::Arc<Tails>,
    durability: std::sync::Arc<Durability>,
    /// Inbox rows below this `seq` refer to no body segment (bodies inline
    /// or erased; a reference is only ever cleared), so the search for the
    /// oldest segment still referred to starts here.
    unreferenced_below: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Set when messages were erased: the checkpointer then truncates the
    /// WAL, whose older frames may still hold their pages as they were.
    truncate_wal: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Alive while any clone of the store is: the checkpointer stops with it.
    _alive: std::sync::Arc<()>,
}

type ReadJob = Box<dyn FnOnce(&Connection, &Durability) + Send>;

/// Which group commits are on disk. The writer numbers each group before its
/// COMMIT ([`Durability::issue`]); the sync thread fsyncs the WAL and then
/// marks every group committed before the fsync began as durable. Callers are
/// answered only then, and readers wait until every commit their snapshot
/// may hold is durable, so nobody acts on data a power cut could undo.
#[derive(Debug, Default)]
struct Durability {
    /// The number of the last group whose COMMIT has been issued.
    issued: std::sync::atomic::AtomicU64,
    /// The number of the last group known to be on disk.
    durable: std::sync::Mutex<u64>,
    advanced: std::sync::Condvar,
    /// An fsync of the WAL failed: nothing written since can be trusted to
    /// be on disk (the kernel may have dropped the pages), so the store
    /// answers and reads nothing more.
    failed: std::sync::atomic::AtomicBool,
    /// Held by a test to stop the sync thread before its next fsync.
    #[cfg(test)]
    gate: std::sync::Mutex<()>,
    /// Set by a test to make the next fsync of the WAL fail.
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
}

/// What every call gets once an fsync of the WAL has failed.
const FAILED_SYNC: &str =
    "an fsync of the database's WAL failed; the store takes no more work (restart the gateway once the disk is sound)";

impl Durability {
    /// Numbers the next group; call before its COMMIT.
    fn issue(&self) -> u64 {
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    fn issued(&self) -> u64 {
        self.issued.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn durable(&self) -> std::sync::MutexGuard<'_, u64> {
        // The value is a plain counter: a panic elsewhere cannot leave it torn.
        self.durable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks until group `n` (and every group before it) is on disk; an
    /// error once that can no longer be known.
    fn wait_for(&self, n: u64) -> Result<(), StoreError> {
        let mut durable = self.durable();
        while *durable < n {
            if self.has_failed() {
                return Err(StoreError::Db(FAILED_SYNC.into()));
            }
            durable = self
                .advanced
                .wait(durable)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        Ok(())
    }

    fn has_failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records a failed fsync and wakes every waiting reader.
    fn fail(&self) {
        let _durable = self.durable();
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.advanced.notify_all();
    }

    fn advance(&self, n: u64) {
        let mut durable = self.durable();
        if n > *durable {
            *durable = n;
            self.advanced.notify_all();
        }
    }
}

/// A group the writer has committed, waiting for the WAL fsync.
struct Committed {
    n: u64,
    commit: Result<(), StoreError>,
    completions: Vec<Completion>,
}

/// The WAL file, opened for fsync (SQLite writes it; this only syncs it).
/// Reopened if SQLite ever replaces it.
struct WalFile {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
}

impl WalFile {
    fn new(path: std::path::PathBuf) -> WalFile {
        WalFile { path, file: None }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let on_disk = std::fs::metadata(&self.path)?.ino();
        let file = match self.file.take() {
            Some(f) if f.metadata()?.ino() == on_disk => f,
            _ => std::fs::OpenOptions::new().write(true).open(&self.path)?,
        };
        let r = file.sync_data();
        self.file = Some(file);
        r
    }
}

/// Fsyncs the WAL for every batch of committed groups, then marks them
/// durable and answers their callers.
fn sync_thread(
    mut wal: WalFile,
    rx: &std::sync::mpsc::Receiver<Committed>,
    durability: &Durability,
) {
    while let Ok(first) = rx.recv() {
        let mut groups = vec![first];
        groups.extend(rx.try_iter());
        #[cfg(test)]
        let _gate = durability
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        #[cfg(test)]
        let injected = durability
            .fail_next_sync
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        #[cfg(not(test))]
        let injected = false;
        let synced = if groups.iter().any(|g| g.commit.is_ok()) {
            let r = if injected {
                Err(std::io::Error::other("injected by a test"))
            } else {
                wal.sync()
            };
            r.map_err(|e| {
                tracing::error!(error = %e, "store: fsync of the WAL failed; the store stops taking work");
                StoreError::Db(format!("making the commit durable: {e}"))
            })
        } else {
            Ok(())
        };
        if let Err(e) = synced {
            // The WAL's frames are chained by checksums: frames lost here
            // would also cut off every later commit at recovery. So nothing
            // more is acknowledged: these callers get the error, and the
            // groups still queued (dropped with this thread) and every later
            // call get `Closed`.
            durability.fail();
            for g in groups {
                for c in g.completions {
                    c(Err(e.clone()));
                }
            }
            break;
        }
        let last = groups.last().map_or(0, |g| g.n);
        durability.advance(last);
        for g in groups {
            let r = g.commit;
            for c in g.completions {
                c(r.clone());
            }
        }
    }
    tracing::debug!("store sync thread stopped");
}

/// The body logs: outgoing deliveries (removed once the peer has them) and
/// inbox messages.
#[derive(Debug)]
struct Bodies {
    outbox: BodyLog,
    inbox: BodyLog,
    /// Body bytes the current group may still store inline, in its rows.
    inline_left: std::sync::atomic::AtomicUsize,
}

/// Inbox rows (by `seq`) one read steps over while looking for the oldest
/// row whose body is still in the log (two in unit tests, so that their
/// few rows take several steps).
const SCAN_ROWS_PER_READ: i64 = if cfg!(test) { 2 } else { 10_000 };

/// Body bytes a group of one job may store inline in its rows: a lone
/// message (or a small batch) then commits with one fsync instead of two.
/// The bodies of larger groups (and larger bodies) go to the body log,
/// written once instead of through the WAL and again by a checkpoint.
const INLINE_BYTES_PER_GROUP: usize = 32 * 1024;

/// Where a body goes: its bytes for the row's `body` column, or a reference
/// for its `body_seg`, `body_off` and `body_len` columns (one is `None`).
type Placed<'a> = (Option<&'a [u8]>, Option<BodyRef>);

impl Bodies {
    /// Starts a group's budget of inline bytes.
    fn start_group(&self, jobs: usize) {
        let budget = if jobs == 1 { INLINE_BYTES_PER_GROUP } else { 0 };
        self.inline_left
            .store(budget, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a job's bodies, `total` bytes in all, go inline: all of them
    /// when they fit the group's budget, else none. Some inline and the rest
    /// in the log would cost the log's fsync and the WAL's writes both.
    fn inline_all(&self, total: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let left = self.inline_left.load(Relaxed);
        let fits = total <= left;
        if fits {
            self.inline_left.store(left - total, Relaxed);
        }
        fits
    }

    /// Places a body inline or in `log`, as [`Bodies::inline_all`] decided.
    fn place<'a>(&self, log: &BodyLog, body: &'a [u8], inline: bool) -> Placed<'a> {
        if inline {
            (Some(body), None)
        } else {
            (None, Some(log.append(body)))
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        self.outbox.sync()?;
        self.inbox.sync()
    }

    /// Opens the next segment of each log that is full: only after the
    /// group that filled it committed (see [`BodyLog::roll_if_full`]).
    fn roll(&self) {
        for log in [&self.outbox, &self.inbox] {
            if let Err(e) = log.roll_if_full() {
                tracing::warn!(error = %e, "store: opening the next body segment failed; the full one stays open");
            }
        }
    }

    fn discard(&self) {
        self.outbox.discard();
        self.inbox.discard();
    }
}

/// Why a queued item could not be read.
enum Unread {
    /// Its stored copy is damaged: it can never be sent.
    Damaged(StoreError),
    /// A read that may succeed later.
    Later(StoreError),
}

/// A queued item from its outbox row.
fn queued_item(
    log: &BodyLog,
    seq: i64,
    item: Option<String>,
    envelope: Option<String>,
    inline: Option<Vec<u8>>,
    [seg, off, len]: [Option<i64>; 3],
) -> Result<FederationItem, Unread> {
    Ok(match (item, envelope) {
        (Some(item), _) => from_json(&item).map_err(Unread::Damaged)?,
        (None, Some(env)) => {
            let envelope = Box::new(from_json(&env).map_err(Unread::Damaged)?);
            let body = body_of(log, inline, seg, off, len)?;
            FederationItem::Deliver {
                envelope,
                body: Body(body),
            }
        }
        _ => {
            return Err(Unread::Damaged(corrupt(format!(
                "outbox row {seq} has neither item nor message"
            ))))
        }
    })
}

/// A stored body: inline in its row (schema 1 rows) or in a body log.
fn stored_body(
    log: &BodyLog,
    inline: Option<Vec<u8>>,
    seg: Option<i64>,
    off: Option<i64>,
    len: Option<i64>,
) -> Result<Vec<u8>, StoreError> {
    body_of(log, inline, seg, off, len).map_err(|(Unread::Damaged(e) | Unread::Later(e))| e)
}

/// A stored body, or why it could not be read: damaged for good (a
/// reference past the end of its segment, or no body at all), or for now
/// (a segment not found may be a directory briefly missing: a restore, a
/// late mount).
fn body_of(
    log: &BodyLog,
    inline: Option<Vec<u8>>,
    seg: Option<i64>,
    off: Option<i64>,
    len: Option<i64>,
) -> Result<Vec<u8>, Unread> {
    match (inline, seg, off, len) {
        (Some(b), _, _, _) => Ok(b),
        (None, Some(seg), Some(off), Some(len)) => {
            log.read(BodyRef { seg, off, len }).map_err(|e| {
                use std::io::ErrorKind::{InvalidData, UnexpectedEof};
                let err = corrupt(format!("body in segment {seg} at {off}: {e}"));
                match e.kind() {
                    UnexpectedEof | InvalidData => Unread::Damaged(err),
                    _ => Unread::Later(err),
                }
            })
        }
        _ => stored_body_missing().map_err(Unread::Damaged),
    }
}

/// When a message's ciphertext was erased, if it was.
fn erased_at(c: &Connection, id: &MessageId) -> Result<Option<u64>, StoreError> {
    let at: Option<i64> = c
        .prepare_cached(
            "SELECT erased_ms FROM settled WHERE message_id = ?1 AND erased_ms IS NOT NULL",
        )?
        .query_row(params![id.as_str()], |r| r.get(0))
        .optional()?;
    Ok(at.map(|at| u64::try_from(at).unwrap_or(0)))
}

fn stored_body_missing() -> Result<Vec<u8>, StoreError> {
    Err(corrupt("a row has neither a body nor a body reference"))
}

/// What was stored before under a submission's (sender, idempotency key):
/// the same message again ([`SubmitOutcome::Duplicate`]), or another one
/// ([`SubmitOutcome::Conflict`]).
fn prior_submission(c: &Connection, s: &Submitted) -> Result<Option<SubmitOutcome>, StoreError> {
    let prior: Option<(String, String, String)> = c
        .prepare_cached("SELECT message_id, envelope, status FROM sent WHERE idem_key = ?1 AND sender_user = ?2")?
        .query_row(params![s.key.as_str(), s.user.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((id, prior_env, status)) = prior else {
        return Ok(None);
    };
    let prior_env: Envelope = from_json(&prior_env)?;
    let id = MessageId::new(id).map_err(corrupt)?;
    let same = prior_env.recipient == s.recipient
        && prior_env.content_hash == s.content_hash
        && prior_env.category == s.category;
    Ok(Some(if same {
        SubmitOutcome::Duplicate(id, parse_status(&status)?)
    } else {
        SubmitOutcome::Conflict(id)
    }))
}

/// Removes `user`'s KeyPackages with less than
/// [`KEY_PACKAGE_CLAIM_MARGIN`] of their lifetime left at `now_ms`: no one
/// may be added with them any more.
fn drop_expired_key_packages(c: &Connection, user: &UserId, now_ms: u64) -> Result<(), StoreError> {
    let until = now_ms / 1000 + KEY_PACKAGE_CLAIM_MARGIN.as_secs();
    exec(
        c,
        "DELETE FROM key_packages WHERE user_id = ?1 AND not_after_s < ?2",
        params![user.as_str(), to_i64(until)],
    )?;
    Ok(())
}

/// A count of seconds as SQLite stores it (saturating).
fn to_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// Schema 7's `key_packages.not_after_s` for KeyPackages stored before it,
/// read from each one (checked when it was uploaded); one that does not
/// parse any more is removed.
fn fill_key_package_lifetimes(c: &Connection) -> Result<(), StoreError> {
    let rows: Vec<(String, Vec<u8>)> = c
        .prepare("SELECT kp_ref, key_package FROM key_packages WHERE not_after_s IS NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (kp_ref, bytes) in rows {
        match proto::mls::KeyPackageInfo::parse(&bytes) {
            Ok(info) => exec(
                c,
                "UPDATE key_packages SET not_after_s = ?2 WHERE kp_ref = ?1",
                params![kp_ref, to_i64(info.lifetime().not_after)],
            )?,
            Err(_) => exec(c, "DELETE FROM key_packages WHERE kp_ref = ?1", [kp_ref])?,
        };
    }
    Ok(())
}

/// The schema version this gateway writes.
const SCHEMA_VERSION: i64 = 8;

/// Columns of `sent` (schema 2 and 3), shared by the schema and the migration.
const SENT_TABLE: &str = "(
    message_id       TEXT PRIMARY KEY,
    sender_user      TEXT NOT NULL,
    idem_key         TEXT NOT NULL,
    recipient_area   TEXT NOT NULL,
    envelope         TEXT NOT NULL,
    status           TEXT NOT NULL,
    accepted_ms      INTEGER NOT NULL,
    delivered_ms     INTEGER,
    fetched_ms       INTEGER,
    acknowledged_ms  INTEGER,
    undeliverable_ms INTEGER,
    reason           TEXT
) WITHOUT ROWID";

/// Columns of `inbox` (schema 2 and 3), shared by the schema and the migration.
const INBOX_TABLE: &str = "(
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT NOT NULL UNIQUE,
    sender_area TEXT NOT NULL,
    sender_user TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    envelope    TEXT NOT NULL,
    body        BLOB,
    status      TEXT NOT NULL,
    stored_at_us INTEGER NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'opaque',
    body_seg    INTEGER,
    body_off    INTEGER,
    body_len    INTEGER
)";

/// Fills the `{SENT}`, `{INBOX}`, `{MAILBOX}`, `{MEMBER_ACKS}`, `{SETTLED}`
/// and `{TEAM_MEMBERS}` table definitions and the `{UNLISTABLE}` condition into a script.
fn with_tables(template: &str) -> String {
    template
        .replace("{SENT}", SENT_TABLE)
        .replace("{INBOX}", INBOX_TABLE)
        .replace("{MAILBOX}", MAILBOX_TABLES)
        .replace("{MEMBER_ACKS}", MEMBER_ACKS_TABLE)
        .replace("{SETTLED}", SETTLED_TABLE)
        .replace("{TEAM_MEMBERS}", TEAM_MEMBERS_TABLE)
        .replace("{UNLISTABLE}", UNLISTABLE)
}

/// The schema, version 8 (4 is 3 with a `mailbox` index that holds only
/// messages someone can still list; 5 adds `settled`, for erasing the
/// ciphertext of acknowledged messages; 6 adds `team_members`, whom an MLS
/// message to a team is for; 7 adds each KeyPackage's `not_after_s`; 8 each bound Commit's
/// `next_key`). A sent message's whole status history
/// lives in its `sent` row (one time column per status), so a status change
/// rewrites one row; the outbox holds only a delivery's body and reads its envelope from
/// `sent`. Idempotency keys are indexed key first (in `sent` and `inbox`):
/// keys that sort by time (as the client makes them) keep those indexes
/// append-only instead of touching one page per sender in every commit. For
/// the same reason the inbox has no index by recipient: `mailbox` is built in
/// bulk instead (see `MAILBOX_TABLES`).
const SCHEMA_TEMPLATE: &str = "
CREATE TABLE IF NOT EXISTS sent {SENT};
CREATE UNIQUE INDEX IF NOT EXISTS sent_idem ON sent (idem_key, sender_user);
CREATE TABLE IF NOT EXISTS inbox {INBOX};
CREATE UNIQUE INDEX IF NOT EXISTS inbox_idem ON inbox (idem_key, sender_area, sender_user);
{MAILBOX}
{MEMBER_ACKS}
{SETTLED}
{TEAM_MEMBERS}
-- A delivery (is_deliver = 1) has its body in the outbox body log (schema 1
-- rows: in `body`, with the envelope) and its envelope in `sent`; a status
-- item has its JSON in `item`.
CREATE TABLE IF NOT EXISTS outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    peer        TEXT NOT NULL,
    message_id  TEXT,
    is_deliver  INTEGER NOT NULL,
    item        TEXT,
    envelope    TEXT,
    body        BLOB,
    expires_ms  INTEGER NOT NULL,
    body_seg    INTEGER,
    body_off    INTEGER,
    body_len    INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_peer ON outbox (peer, seq);
CREATE TABLE IF NOT EXISTS group_commits (
    group_id     TEXT NOT NULL,
    epoch        INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    -- The public key of the epoch the Commit starts (schema 8), which the
    -- next Commit's proof must be signed with; NULL when it named none.
    next_key     BLOB,
    PRIMARY KEY (group_id, epoch)
);
CREATE TABLE IF NOT EXISTS key_packages (
    kp_ref      TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    key_package BLOB NOT NULL,
    last_resort INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    -- The last second of its lifetime (schema 7; filled by the 6 to 7
    -- migration for those stored before).
    not_after_s INTEGER
);
CREATE INDEX IF NOT EXISTS key_packages_user ON key_packages (user_id, last_resort, created_ms);
-- The last batch stored of each of a peer's pipelined sending sessions
-- (see `follow_session`); a few sessions per peer.
CREATE TABLE IF NOT EXISTS peer_sessions (
    id         INTEGER PRIMARY KEY,
    peer       TEXT NOT NULL,
    session    INTEGER NOT NULL,
    last_batch INTEGER NOT NULL,
    UNIQUE (peer, session)
);
PRAGMA user_version = 8;
";

/// Who has acknowledged an MLS message: each member of a team acknowledges
/// for themselves (the sender hears of the first).
const MEMBER_ACKS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS member_acks (
    message_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    PRIMARY KEY (message_id, user_id)
);
";

/// Who is in which team, as the directory said when the gateway last read
/// it (see [`Store::sync_teams`]). An MLS message to a team is for the
/// members it had when it was stored, whose KeyPackages its sender could
/// claim: the inbox rows after `since_seq` (the writer is serial, so the
/// order is exact). One who joins later cannot decrypt the earlier ones, so
/// they are not listed to her and do not wait for her acknowledgement. One
/// who leaves keeps her row for [`WAIT_FOR_LEAVERS`] after `left_ms`, still
/// waited for by the rows up to `until_seq` (those stored while she was
/// in the team); back within it, she sees again what she had not
/// acknowledged. `team_sync` has its row once the directory has been read
/// once: the members read then (an upgraded gateway's, or a new one's)
/// count as members since ever.
const TEAM_MEMBERS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS team_members (
    team      TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    since_seq INTEGER NOT NULL,
    until_seq INTEGER,
    left_ms   INTEGER,
    PRIMARY KEY (team, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS team_sync (
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    at_ms INTEGER NOT NULL
);
";

/// Schema 5 to 6: `team_members`, filled from the directory when the
/// gateway starts. One transaction.
const MIGRATE_5_TO_6_TEMPLATE: &str = "
BEGIN IMMEDIATE;
{TEAM_MEMBERS}
PRAGMA user_version = 6;
COMMIT;
";

/// Schema 7 to 8: the key each bound Commit names for the next epoch (see
/// [`Bind::Unproven`]); those bound before named none. One transaction.
/// (Migrated from before `group_commits`, the schema makes it whole.)
fn migrate_7_to_8(c: &Connection) -> Result<(), StoreError> {
    add_column(c, 8, "group_commits", "next_key", "BLOB", |_| Ok(()))
}

/// Schema 6 to 7: each KeyPackage's lifetime, so that an expired one is
/// neither handed out nor counted: the column, filled from each KeyPackage
/// (see `fill_key_package_lifetimes`), in one transaction with the version.
/// (Migrated from before schema 6, the database has no `key_packages` yet:
/// the schema makes it whole.)
fn migrate_6_to_7(c: &Connection) -> Result<(), StoreError> {
    add_column(
        c,
        7,
        "key_packages",
        "not_after_s",
        "INTEGER",
        fill_key_package_lifetimes,
    )
}

/// One migration step in one transaction: `table` (if it is there; the
/// schema makes a missing one whole) gets `column` of `kind` if it has it
/// not, `fill` fills it, and the schema is `version`; or nothing changes.
fn add_column(
    c: &Connection,
    version: i64,
    table: &str,
    column: &str,
    kind: &str,
    fill: fn(&Connection) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    c.execute_batch("BEGIN IMMEDIATE")?;
    let done = (|| {
        let has_table: bool = c
            .prepare("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1")?
            .exists([table])?;
        let has_column: bool = c
            .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
            .exists([table, column])?;
        if has_table && !has_column {
            c.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
        if has_table {
            fill(c)?;
        }
        c.execute_batch(&format!("PRAGMA user_version = {version}; COMMIT;"))?;
        Ok(())
    })();
    if done.is_err() {
        let _ = c.execute_batch("ROLLBACK");
    }
    done
}

/// Whether the user `?1` may see an inbox row of her mailboxes: any,
/// except an MLS message to a team stored before she joined it (see
/// `TEAM_MEMBERS_TABLE`).
const ELIGIBLE: &str = "(inbox.kind != 'mls' OR inbox.target_kind != 'team' OR EXISTS \
 (SELECT 1 FROM team_members m WHERE m.team = inbox.target_id AND m.user_id = ?1 \
 AND m.until_seq IS NULL AND inbox.seq > m.since_seq))";

/// Inbox messages no one can list any more ("settled": acknowledged by
/// everyone who had to), since when, and when their ciphertext was erased
/// (see [`Store::erase_settled`]). An erased message keeps its row
/// (envelope, status) but loses its body and body reference; a body that
/// was in the body log keeps its place here until its bytes are zeroed.
const SETTLED_TABLE: &str = "
CREATE TABLE IF NOT EXISTS settled (
    message_id TEXT PRIMARY KEY,
    settled_ms INTEGER NOT NULL,
    erased_ms  INTEGER,
    -- An erased body's place in the inbox body log, until it is zeroed.
    body_seg   INTEGER,
    body_off   INTEGER,
    body_len   INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS settled_unerased ON settled (settled_ms) WHERE erased_ms IS NULL;
CREATE INDEX IF NOT EXISTS settled_unzeroed ON settled (body_seg) WHERE body_seg IS NOT NULL;
";

/// Schema 4 to 5: the messages already settled are recorded as settled now,
/// so their retention runs from the upgrade. (An MLS message to a team
/// needs the directory to judge; see `prune_mailbox`.) One transaction.
const MIGRATE_4_TO_5_TEMPLATE: &str = "
BEGIN IMMEDIATE;
{SETTLED}
INSERT OR IGNORE INTO settled (message_id, settled_ms)
    SELECT message_id, CAST(strftime('%s', 'now') AS INTEGER) * 1000 FROM inbox WHERE {UNLISTABLE};
PRAGMA user_version = 5;
COMMIT;
";

/// Inbox rows that no one can list any more, so the `mailbox` index need
/// not hold them: opaque messages once acknowledged, MLS messages to a user
/// once that user has acknowledged them. (An MLS message to a team is
/// listed to each member until they acknowledge it; see `prune_mailbox`.)
/// Without this a mailbox's listing would step over its whole acknowledged
/// history every time.
const UNLISTABLE: &str = "((inbox.kind = 'opaque' AND inbox.status = 'acknowledged') OR \
 (inbox.kind = 'mls' AND inbox.target_kind = 'user' AND EXISTS \
 (SELECT 1 FROM member_acks a WHERE a.message_id = inbox.message_id AND a.user_id = inbox.target_id)))";

/// Schema 3 to 4: the `mailbox` index drops the entries of messages no one
/// can list any more (see `UNLISTABLE`); from schema 4 on they leave it when
/// acknowledged. One transaction.
const MIGRATE_3_TO_4_TEMPLATE: &str = "
BEGIN IMMEDIATE;
{MEMBER_ACKS}
DELETE FROM mailbox WHERE (target_kind, target_id, seq) IN
    (SELECT target_kind, target_id, seq FROM inbox WHERE {UNLISTABLE});
PRAGMA user_version = 4;
COMMIT;
";

/// Which inbox rows each mailbox (a user or a team) holds: the `mailbox`
/// index, added to in bulk (see `index_mailboxes`) up to `mailbox_mark`.
/// Rows after the mark are found by a scan of the inbox's newest rows.
const MAILBOX_TABLES: &str = "
CREATE TABLE IF NOT EXISTS mailbox (
    target_kind TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (target_kind, target_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailbox_mark (
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    up_to INTEGER NOT NULL
);
INSERT OR IGNORE INTO mailbox_mark (id, up_to) VALUES (0, 0);
";

/// Schema 2 to 3: the inbox's index by recipient (which took one scattered
/// page write per message stored) becomes the bulk-built `mailbox` index.
/// One transaction.
const MIGRATE_2_TO_3_TEMPLATE: &str = "
BEGIN IMMEDIATE;
{MAILBOX}
INSERT OR IGNORE INTO mailbox (target_kind, target_id, seq)
    SELECT target_kind, target_id, seq FROM inbox ORDER BY target_kind, target_id, seq;
UPDATE mailbox_mark SET up_to = (SELECT COALESCE(MAX(seq), 0) FROM inbox) WHERE id = 0;
DROP INDEX IF EXISTS inbox_target;
PRAGMA user_version = 3;
COMMIT;
";

/// How often the writer adds the inbox's newest rows to the `mailbox`
/// index. Between times they are found by scanning the rows after the mark:
/// a few thousand at most under heavy load. The unit tests index when they
/// choose.
#[cfg(not(test))]
const INDEX_MAILBOXES_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
#[cfg(test)]
const INDEX_MAILBOXES_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// The inbox rows the `mailbox` index covers: those up to this (0 if the
/// mark's row is missing, so a listing then scans every row).
const MAILBOX_MARK: &str = "COALESCE((SELECT up_to FROM mailbox_mark WHERE id = 0), 0)";

/// Adds the inbox rows after the mark to the `mailbox` index, in key order
/// (one write per mailbox page, not one per message), and moves the mark.
/// Rows no one can list any more (acknowledged already) are left out.
fn index_mailboxes(c: &Connection) -> Result<usize, StoreError> {
    let n = exec(
        c,
        &format!(
            "INSERT OR IGNORE INTO mailbox (target_kind, target_id, seq) \
         SELECT target_kind, target_id, seq FROM inbox \
         WHERE seq > {MAILBOX_MARK} AND NOT {UNLISTABLE} \
         ORDER BY target_kind, target_id, seq"
        ),
        [],
    )?;
    // Written only when it moves, so an idle pass writes no page.
    exec(
        c,
        "UPDATE mailbox_mark SET up_to = (SELECT MAX(seq) FROM inbox) \
         WHERE id = 0 AND up_to < (SELECT COALESCE(MAX(seq), 0) FROM inbox)",
        [],
    )?;
    Ok(n)
}

/// Schema 1 to 2: status history moves from `status_events` into `sent`,
/// and the idempotency indexes of `sent` and `inbox` are rebuilt key first.
/// One transaction.
const MIGRATE_1_TO_2_TEMPLATE: &str = "
BEGIN IMMEDIATE;
CREATE TABLE sent_v2 {SENT};
INSERT INTO sent_v2
SELECT s.message_id, s.sender_user, s.idem_key, s.recipient_area, s.envelope, s.status,
    COALESCE((SELECT at_ms FROM status_events e WHERE e.message_id = s.message_id AND e.status = 'accepted'), 0),
    (SELECT at_ms FROM status_events e WHERE e.message_id = s.message_id AND e.status = 'delivered'),
    (SELECT at_ms FROM status_events e WHERE e.message_id = s.message_id AND e.status = 'fetched'),
    (SELECT at_ms FROM status_events e WHERE e.message_id = s.message_id AND e.status = 'acknowledged'),
    (SELECT at_ms FROM status_events e WHERE e.message_id = s.message_id AND e.status = 'undeliverable'),
    (SELECT reason FROM status_events e WHERE e.message_id = s.message_id AND e.status = 'undeliverable')
FROM sent s;
DROP TABLE sent;
DROP TABLE status_events;
ALTER TABLE sent_v2 RENAME TO sent;
CREATE UNIQUE INDEX sent_idem ON sent (idem_key, sender_user);
CREATE TABLE inbox_v2 {INBOX};
INSERT INTO inbox_v2 (seq, message_id, sender_area, sender_user, idem_key, target_kind, target_id, envelope, body, status, stored_at_us, kind)
SELECT seq, message_id, sender_area, sender_user, idem_key, target_kind, target_id, envelope, body, status, stored_at_us, kind FROM inbox;
DROP TABLE inbox;
ALTER TABLE inbox_v2 RENAME TO inbox;
CREATE UNIQUE INDEX inbox_idem ON inbox (idem_key, sender_area, sender_user);
CREATE INDEX inbox_target ON inbox (target_kind, target_id, status);
ALTER TABLE outbox ADD COLUMN body_seg INTEGER;
ALTER TABLE outbox ADD COLUMN body_off INTEGER;
ALTER TABLE outbox ADD COLUMN body_len INTEGER;
PRAGMA user_version = 2;
COMMIT;
";

/// The `sent` column holding the time a status was reached.
fn time_column(s: Status) -> &'static str {
    match s {
        Status::Accepted => "accepted_ms",
        Status::Delivered => "delivered_ms",
        Status::Fetched => "fetched_ms",
        Status::Acknowledged => "acknowledged_ms",
        Status::Undeliverable => "undeliverable_ms",
    }
}

/// Executes a statement through the connection's statement cache.
fn exec<P: rusqlite::Params>(c: &Connection, sql: &str, p: P) -> Result<usize, StoreError> {
    Ok(c.prepare_cached(sql)?.execute(p)?)
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(corrupt)
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(corrupt)
}

fn parse_status(s: &str) -> Result<Status, StoreError> {
    Status::parse(s).ok_or_else(|| corrupt(format!("unknown status {s:?}")))
}

fn target_of(env: &Envelope) -> (&'static str, &str) {
    match &env.recipient.target {
        proto::Target::User(u) => ("user", u.as_str()),
        proto::Target::Team(t) => ("team", t.as_str()),
    }
}

/// Records a status change of a message sent from here, if it moves forward.
fn advance_sent(
    c: &Connection,
    id: &str,
    to: Status,
    at_ms: u64,
    reason: Option<&str>,
) -> Result<bool, StoreError> {
    move_sent(c, id, to, at_ms, reason, Status::can_become)
}

/// Takes the items queued for `peer` at queue positions after `seqs.0` up
/// to `seqs.1` that expire by `until_ms` out of its queue: each message
/// goes back to its sender as undeliverable at `at_ms`, giving `reason`;
/// status updates are dropped. Returns how many messages and how many
/// status updates.
fn give_back(
    c: &Connection,
    tails: &Tails,
    peer: &AreaId,
    seqs: (i64, i64),
    until_ms: i64,
    at_ms: u64,
    reason: &str,
) -> Result<(usize, usize), StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT seq, message_id, is_deliver FROM outbox WHERE peer = ?1 AND seq > ?3 AND seq <= ?4 AND expires_ms <= ?2 ORDER BY seq",
    )?;
    let rows: Vec<(i64, Option<String>, bool)> = stmt
        .query_map(params![peer.as_str(), until_ms, seqs.0, seqs.1], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    if !rows.is_empty() {
        // The tail holds no gaps: it is rebuilt from the database.
        tails.stage(Effect::Forget(peer.clone()));
    }
    let (mut messages, mut updates) = (0, 0);
    for (seq, id, is_deliver) in &rows {
        exec(c, "DELETE FROM outbox WHERE seq = ?1", [*seq])?;
        match id {
            // One whose sender knows better already (the peer said it was
            // fetched, say) is not counted as given back.
            Some(id) if *is_deliver => {
                if advance_sent(c, id, Status::Undeliverable, at_ms, Some(reason))? {
                    messages += 1;
                }
            }
            _ => updates += 1,
        }
    }
    Ok((messages, updates))
}

/// Records that the receiving gateway gave a sent message up, read by no
/// one (see [`GIVEN_UP_UNREAD`]); false if it was acknowledged (or is
/// unknown, or final) already.
fn give_up_sent(c: &Connection, id: &str, at_ms: u64) -> Result<bool, StoreError> {
    move_sent(
        c,
        id,
        Status::Undeliverable,
        at_ms,
        Some(GIVEN_UP_UNREAD),
        |cur, _| cur.can_be_given_up(),
    )
}

fn move_sent(
    c: &Connection,
    id: &str,
    to: Status,
    at_ms: u64,
    reason: Option<&str>,
    allowed: fn(Status, Status) -> bool,
) -> Result<bool, StoreError> {
    let cur: Option<String> = c
        .prepare_cached("SELECT status FROM sent WHERE message_id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let Some(cur) = cur else { return Ok(false) };
    if !allowed(parse_status(&cur)?, to) {
        return Ok(false);
    }
    let column = time_column(to);
    exec(
        c,
        &format!("UPDATE sent SET status = ?2, {column} = ?3, reason = COALESCE(?4, reason) WHERE message_id = ?1"),
        params![id, to.as_str(), sql_int(at_ms), reason],
    )?;
    Ok(true)
}

fn mailbox_clause(mb: &Mailbox) -> (String, Vec<String>) {
    // (target_kind = 'user' AND target_id = ?1) OR (target_kind = 'team' AND target_id IN (?2, ...))
    let mut args = vec![mb.user.to_string()];
    let mut sql = String::from("((target_kind = 'user' AND target_id = ?1)");
    if !mb.teams.is_empty() {
        sql.push_str(" OR (target_kind = 'team' AND target_id IN (");
        for (i, t) in mb.teams.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("?{}", i + 2));
            args.push(t.to_string());
        }
        sql.push_str("))");
    }
    sql.push(')');
    (sql, args)
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/gateway.sqlite3` and starts the
    /// store thread.
    pub fn open(data_dir: &Path, own_area: AreaId) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::Db(format!("creating {}: {e}", data_dir.display())))?;
        // Held by the threads that write here, so it is released once they end.
        let lock = std::sync::Arc::new(lock_data_dir(data_dir)?);
        let db = data_dir.join("gateway.sqlite3");
        // An operator is told which file (a damaged one, say, reads "file
        // is not a database").
        let in_db = |e: rusqlite::Error| match StoreError::from(e) {
            StoreError::Db(m) => StoreError::Db(format!("{}: {m}", db.display())),
            other => other,
        };
        let conn = Connection::open(&db).map_err(in_db)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
             PRAGMA busy_timeout = 5000; PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 0; \
             PRAGMA journal_size_limit = 100663296;",
        )
        .map_err(in_db)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(in_db)?;
        match version {
            v if v > SCHEMA_VERSION => {
                return Err(StoreError::Db(format!(
                    "database schema version {v} is newer than this gateway understands ({SCHEMA_VERSION})"
                )))
            }
            1..=7 => {
                let steps = [
                    (1, MIGRATE_1_TO_2_TEMPLATE),
                    (2, MIGRATE_2_TO_3_TEMPLATE),
                    (3, MIGRATE_3_TO_4_TEMPLATE),
                    (4, MIGRATE_4_TO_5_TEMPLATE),
                    (5, MIGRATE_5_TO_6_TEMPLATE),
                ];
                for (from, template) in steps.into_iter().filter(|(from, _)| *from >= version) {
                    let to = from + 1;
                    tracing::info!("migrating the database from schema {from} to {to}");
                    conn.execute_batch(&with_tables(template)).map_err(|e| {
                        let _ = conn.execute_batch("ROLLBACK");
                        StoreError::Db(format!(
                            "migrating schema {from} to {to} (that step changed nothing): {e}"
                        ))
                    })?;
                }
                if version <= 6 {
                    tracing::info!("migrating the database from schema 6 to 7");
                    migrate_6_to_7(&conn).map_err(|e| {
                        StoreError::Db(format!(
                            "migrating schema 6 to 7 (that step changed nothing): {e}"
                        ))
                    })?;
                }
                tracing::info!("migrating the database from schema 7 to 8");
                migrate_7_to_8(&conn).map_err(|e| {
                    StoreError::Db(format!(
                        "migrating schema 7 to 8 (that step changed nothing): {e}"
                    ))
                })?;
            }
            _ => {}
        }
        conn.execute_batch(&with_tables(SCHEMA_TEMPLATE))
            .map_err(in_db)?;
        // From here on the sync thread fsyncs the WAL after each group's
        // COMMIT (see `Durability`); SQLite itself still syncs around
        // checkpoints and when the WAL restarts.
        conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        let durability = std::sync::Arc::new(Durability::default());
        let (synced_tx, synced_rx) = std::sync::mpsc::sync_channel::<Committed>(256);
        let wal = WalFile::new(data_dir.join("gateway.sqlite3-wal"));
        std::thread::Builder::new()
            .name("store-sync".into())
            .spawn({
                let durability = durability.clone();
                move || sync_thread(wal, &synced_rx, &durability)
            })
            .map_err(|e| StoreError::Db(format!("starting store sync thread: {e}")))?;
        // Readers see committed data through WAL without waiting for the writer.
        let reader = Connection::open(data_dir.join("gateway.sqlite3"))?;
        reader.execute_batch("PRAGMA query_only = ON; PRAGMA busy_timeout = 5000;")?;
        let bodies = std::sync::Arc::new(Bodies {
            outbox: BodyLog::open(&data_dir.join("bodies").join("outbox"))
                .map_err(|e| StoreError::Db(format!("opening the outbox body log: {e}")))?,
            inbox: BodyLog::open(&data_dir.join("bodies").join("inbox"))
                .map_err(|e| StoreError::Db(format!("opening the inbox body log: {e}")))?,
            inline_left: std::sync::atomic::AtomicUsize::new(0),
        });
        let tails = std::sync::Arc::new(Tails::default());
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>(8192);
        // Checkpoints run beside the writer (below), but under steady writes
        // such a checkpoint never catches up with the end of the WAL, so the
        // WAL would never restart from its beginning and would grow without
        // bound. When it is long, the writer completes the checkpoint itself
        // right after a commit (the background one has copied most of it);
        // the next commit then writes the WAL from its beginning again.
        let mut conn = conn;
        conn.wal_hook(Some(
            |wal: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
                if i64::from(frames) >= WAL_RESTART_FRAMES {
                    // The commit has happened; a failed checkpoint must not be
                    // reported as a failed commit.
                    if let Err(e) = wal.checkpoint() {
                        tracing::warn!(error = %e, "store: checkpoint failed");
                    }
                }
                Ok(())
            },
        ))?;
        std::thread::Builder::new()
            .name("store".into())
            .spawn({
                let (bodies, tails) = (bodies.clone(), tails.clone());
                let (durability, lock) = (durability.clone(), lock.clone());
                move || {
                    let _lock = lock;
                    store_thread(conn, rx, &bodies, &tails, &durability, &synced_tx);
                }
            })
            .map_err(|e| StoreError::Db(format!("starting store thread: {e}")))?;
        let (rtx, mut rrx) = mpsc::channel::<ReadJob>(8192);
        std::thread::Builder::new()
            .name("store-read".into())
            .spawn({
                let durability = durability.clone();
                move || {
                    while let Some(job) = rrx.blocking_recv() {
                        job(&reader, &durability);
                    }
                }
            })
            .map_err(|e| StoreError::Db(format!("starting store reader: {e}")))?;
        // Checkpoints run beside the writer (PASSIVE never blocks it), so the
        // writer's commits pay only for the WAL append and its fsync. Often,
        // so that what is left for the writer's own checkpoint (above) is
        // little. Delivered bodies are removed here too, off the writer.
        let alive = std::sync::Arc::new(());
        let weak = std::sync::Arc::downgrade(&alive);
        let checkpointer = Connection::open(data_dir.join("gateway.sqlite3"))?;
        checkpointer.execute_batch("PRAGMA busy_timeout = 5000;")?;
        let truncate_wal = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn({
                let (bodies, durability) = (bodies.clone(), durability.clone());
                let truncate_wal = truncate_wal.clone();
                move || {
                    let _lock = lock;
                    let mut last_gc = std::time::Instant::now();
                    while weak.upgrade().is_some() {
                        std::thread::sleep(CHECKPOINT_EVERY);
                        if durability.has_failed() {
                            // The WAL may hold frames the disk lost: copy
                            // nothing of it into the database.
                            return;
                        }
                        if truncate_wal.swap(false, std::sync::atomic::Ordering::Relaxed) {
                            truncate_wal_file(&checkpointer, &truncate_wal);
                        } else if let Err(e) =
                            checkpointer.execute_batch("PRAGMA wal_checkpoint(PASSIVE)")
                        {
                            tracing::warn!(error = %e, "store: checkpoint failed");
                        }
                        if last_gc.elapsed() >= std::time::Duration::from_secs(1) {
                            last_gc = std::time::Instant::now();
                            remove_delivered_bodies(&checkpointer, &bodies.outbox, &durability);
                        }
                    }
                    let _ = checkpointer.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
                }
            })
            .map_err(|e| StoreError::Db(format!("starting store checkpointer: {e}")))?;
        Ok(SqliteStore {
            tails,
            jobs: tx,
            reads: rtx,
            own_area,
            bodies,
            durability,
            unreferenced_below: std::sync::Arc::default(),
            truncate_wal,
            _alive: alive,
        })
    }

    /// Runs a read-only `f` on the reader connection, in one read transaction.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn: &Connection, durability: &Durability| {
            let _ = tx.send(read_on_disk(conn, durability, f));
        });
        self.reads.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` inside the next group transaction and waits for its commit.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnMut(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.queue(f).await?.await
    }

    /// Puts `f` in the writer's queue (jobs run in queue order) and returns
    /// the handle to its outcome. `f` may run more than once (see [`Job`]).
    async fn queue<R: Send + 'static>(
        &self,
        f: impl FnMut(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<Committing<R>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job = Box::new(Pending {
            work: f,
            outcome: None,
            tx,
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        Ok(Committing(rx))
    }
}

/// Runs a read-only `f` in one read transaction on `conn`, seeing only
/// what is on disk: it takes the snapshot, then waits until every commit
/// the snapshot may hold is durable, so nothing is read that a crash could
/// undo.
fn read_on_disk<R>(
    conn: &Connection,
    durability: &Durability,
    f: impl FnOnce(&Connection) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    let r = conn
        .execute_batch("BEGIN DEFERRED")
        .map_err(StoreError::from)
        .and_then(|()| {
            conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |_| Ok(()))?;
            durability.wait_for(durability.issued())?;
            f(conn)
        });
    let _ = conn.execute_batch("COMMIT");
    r
}

/// Runs a group's jobs in its open transaction: all without savepoints
/// first; if one fails, the group is rolled back and every job runs again in
/// a savepoint of its own, so that the failure undoes only its own writes.
/// Err: the transaction could not be begun again, or SQLite ended it.
fn run_jobs(
    conn: &Connection,
    bodies: &Bodies,
    tails: &Tails,
    jobs: &mut [Box<dyn Job>],
) -> Result<(), StoreError> {
    bodies.start_group(jobs.len());
    if jobs.iter_mut().all(|job| job.run(conn, false).is_ok()) {
        return Ok(());
    }
    roll_back_group(conn, bodies, tails);
    conn.execute_batch("BEGIN IMMEDIATE")?;
    bodies.start_group(jobs.len());
    for job in jobs.iter_mut() {
        // A failed job's writes are undone, and so are its queue effects.
        let mark = tails.staged_len();
        if let Err(e) = job.run(conn, true) {
            tails.truncate_staged(mark);
            // On some errors (a full disk, an I/O error while spilling
            // pages to the WAL) SQLite rolls back the whole transaction, not
            // only the statement: the group's earlier jobs are undone too,
            // and a job run now would commit on its own, unnumbered and
            // before its bodies are synced. The whole group has failed.
            if conn.is_autocommit() {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Rolls the open group back: its transaction, the bodies it queued and the
/// queue effects it staged.
fn roll_back_group(conn: &Connection, bodies: &Bodies, tails: &Tails) {
    // A failed statement may already have ended the transaction.
    let _ = conn.execute_batch("ROLLBACK");
    bodies.discard();
    tails.discard_staged();
}

fn in_savepoint<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    exec(conn, "SAVEPOINT job", [])?;
    match f(conn) {
        Ok(r) => {
            exec(conn, "RELEASE job", [])?;
            Ok(r)
        }
        Err(e) => {
            // SQLite may have ended the whole transaction (a full disk):
            // then there is no savepoint to go back to, and the job's own
            // error is the one to tell.
            if conn.is_autocommit() {
                return Err(e);
            }
            exec(conn, "ROLLBACK TO job", [])?;
            exec(conn, "RELEASE job", [])?;
            Err(e)
        }
    }
}

/// How often the background checkpointer copies the WAL into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// WAL length (frames, 4 KiB each) at which the writer completes a
/// checkpoint itself after a commit, so that the next transaction writes the
/// WAL from its beginning again: 64 MiB, so that this pause (the part the
/// background checkpointer has not copied yet, and an fsync of the
/// database) comes seldom. The unit tests use a quarter of it, to see the
/// restart with less writing.
#[cfg(not(test))]
const WAL_RESTART_FRAMES: i64 = 16384;
#[cfg(test)]
const WAL_RESTART_FRAMES: i64 = 4096;

/// Sessions remembered per peer in `peer_sessions`; a new one pushes out
/// the oldest (whose late batches are then refused as out of order).
const SESSIONS_PER_PEER: i64 = 8;

/// Checks that a pipelined batch directly follows the last stored batch of
/// its session, and records it as the last; in the batch's transaction.
fn follow_session(c: &Connection, peer: &AreaId, o: BatchOrder) -> Result<(), StoreError> {
    // Session ids are random 64-bit numbers, kept bit for bit.
    let session = o.session as i64;
    let last: Option<i64> = c
        .prepare_cached("SELECT last_batch FROM peer_sessions WHERE peer = ?1 AND session = ?2")?
        .query_row(params![peer.as_str(), session], |r| r.get(0))
        .optional()?;
    let expected = last.map_or(1, |l| l.saturating_add(1));
    if i64::try_from(o.batch).ok() != Some(expected) {
        return Err(StoreError::OutOfOrder(format!(
            "batch {} of this session does not follow the last one stored ({}); start a new session",
            o.batch,
            last.map_or_else(|| "none".to_owned(), |l| l.to_string()),
        )));
    }
    if last.is_some() {
        exec(
            c,
            "UPDATE peer_sessions SET last_batch = ?3 WHERE peer = ?1 AND session = ?2",
            params![peer.as_str(), session, expected],
        )?;
    } else {
        exec(
            c,
            "DELETE FROM peer_sessions WHERE peer = ?1 AND id NOT IN \
             (SELECT id FROM peer_sessions WHERE peer = ?1 ORDER BY id DESC LIMIT ?2)",
            params![peer.as_str(), SESSIONS_PER_PEER - 1],
        )?;
        exec(
            c,
            "INSERT INTO peer_sessions (peer, session, last_batch) VALUES (?1, ?2, 1)",
            params![peer.as_str(), session],
        )?;
    }
    Ok(())
}

/// Copies the whole WAL into the database and truncates it, so that no old
/// page images stay in it (after erasures); tries again at the next tick
/// when readers or the writer keep it from completing. New writes wait while
/// it waits for readers, so it waits at most 200 ms (then retries), not the
/// usual busy timeout.
fn truncate_wal_file(conn: &Connection, again: &std::sync::atomic::AtomicBool) {
    let short = conn.busy_timeout(std::time::Duration::from_millis(200));
    let truncated = short.and_then(|()| {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        })
    });
    if let Err(e) = conn.busy_timeout(std::time::Duration::from_secs(5)) {
        tracing::warn!(error = %e, "store: could not restore the checkpointer's busy timeout");
    }
    match truncated {
        Ok(0) => tracing::debug!("store: truncated the WAL after erasures"),
        Ok(_) => again.store(true, std::sync::atomic::Ordering::Relaxed),
        Err(e) => {
            tracing::warn!(error = %e, "store: truncating the WAL failed");
            again.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Removes the outbox body segments that no queued delivery refers to any
/// more. Runs beside the writer: new deliveries only ever refer to the
/// segment being appended to when the rows were read, or to later ones, and
/// none of those is removed (it may have closed since).
fn remove_delivered_bodies(conn: &Connection, log: &BodyLog, durability: &Durability) {
    match log.drop_stale_spares(SPARE_MAX_AGE) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(spares = n, "store: unlinked unused spare segments"),
        Err(e) => tracing::warn!(error = %e, "store: unlinking unused spare segments failed"),
    }
    if !log.has_closed_segments() {
        return;
    }
    // Decide from durable rows only: a delivery a crash could bring back
    // must still find its body.
    let open = log.open_segment();
    let oldest = read_on_disk(conn, durability, |c| {
        let oldest: Option<i64> = c.query_row(
            "SELECT MIN(body_seg) FROM outbox WHERE body_seg IS NOT NULL",
            [],
            |r| r.get(0),
        )?;
        Ok(oldest)
    });
    match oldest.map(|o| log.remove_below(o.map_or(open, |o| o.min(open)))) {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::debug!(segments = n, "store: removed delivered bodies"),
        Ok(Err(e)) => tracing::warn!(error = %e, "store: removing delivered bodies failed"),
        Err(e) => tracing::warn!(error = %e, "store: finding delivered bodies failed"),
    }
}

/// How long after it was last written a spare outbox segment (delivered
/// bodies) is unlinked rather than reused: under load segments fill, and
/// spares are reused, within seconds.
const SPARE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// The lock file in a data directory: one gateway process at a time.
const LOCK_FILE: &str = "gateway.lock";

/// How long a store waits for another holder of its data directory (a
/// previous instance in this process still finishing its last writes).
const LOCK_PATIENCE: std::time::Duration = if cfg!(test) {
    std::time::Duration::from_millis(300)
} else {
    std::time::Duration::from_secs(10)
};

/// Takes the data directory's lock (`flock`, released by the kernel when
/// the holder exits, however it exits). Two gateways writing the same
/// database and body logs would overwrite each other's bodies.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, StoreError> {
    use rustix::fs::{flock, FlockOperation};
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io(&format!("opening {}", path.display()), &e))?;
    let give_up = std::time::Instant::now() + LOCK_PATIENCE;
    let mut waited = false;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < give_up => {
                if !waited {
                    waited = true;
                    tracing::info!(path = %path.display(), patience_s = LOCK_PATIENCE.as_secs(), "the data directory is locked; waiting for its holder to finish");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StoreError::Db(format!(
                    "data directory {} is in use by another gateway (it holds {}): \
                     stop that one first, or give each gateway its own data_dir",
                    data_dir.display(),
                    path.display()
                )))
            }
            // A file system without locks: go on, as before there was one.
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot lock the data directory; make sure no other gateway uses it");
                return Ok(file);
            }
        }
    }
}

fn store_thread(
    conn: Connection,
    mut rx: mpsc::Receiver<Box<dyn Job>>,
    bodies: &Bodies,
    tails: &std::sync::Arc<Tails>,
    durability: &Durability,
    synced: &std::sync::mpsc::SyncSender<Committed>,
) {
    const GROUP: usize = 512;
    let mut indexed_at = std::time::Instant::now();
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let err = StoreError::from(e);
            tracing::error!(error = %err, "store: cannot begin transaction");
            for job in jobs {
                // Run nothing; tell every caller.
                drop(job);
            }
            continue;
        }
        if let Err(e) = run_jobs(&conn, bodies, tails, &mut jobs) {
            tracing::error!(error = %e, "store: a group failed as a whole (its transaction could not begin again, or SQLite ended it)");
            roll_back_group(&conn, bodies, tails);
            for job in jobs {
                job.complete()(Err(match &e {
                    StoreError::DiskFull(_) => e.clone(),
                    e => StoreError::Db(format!("store: {e}")),
                }));
            }
            continue;
        }
        if indexed_at.elapsed() >= INDEX_MAILBOXES_EVERY {
            indexed_at = std::time::Instant::now();
            // Derived data: on failure the newest rows stay found by the scan.
            if let Err(e) = in_savepoint(&conn, index_mailboxes) {
                tracing::warn!(error = %e, "store: could not index the newest inbox rows");
            }
        }
        // The group's queue effects reach the tails once it is durable,
        // before anyone is answered (a caller may wake the peer's worker).
        let effects = tails.take_staged();
        let mut completions: Vec<Completion> = Vec::with_capacity(jobs.len() + 1);
        if !effects.is_empty() {
            let tails = tails.clone();
            completions.push(Box::new(move |commit: Result<(), StoreError>| {
                if commit.is_ok() {
                    tails.apply(effects);
                }
            }));
        }
        completions.extend(jobs.into_iter().map(|job| job.complete()));
        // Bodies are durable before the rows that point at them commit. The
        // group is numbered only then, right before its COMMIT: a reader
        // whose snapshot holds it waits for its fsync, and one that started
        // while its bodies were being written need not.
        let synced_bodies = bodies.sync();
        let n = durability.issue();
        let commit = match synced_bodies {
            Ok(()) => conn.execute_batch("COMMIT").map_err(StoreError::from),
            Err(e) => Err(StoreError::io("writing bodies", &e)),
        }
        .inspect_err(|e| {
            roll_back_group(&conn, bodies, tails);
            tracing::error!(error = %e, "store: commit failed; the group was rolled back");
        });
        bodies.roll();
        let group = Committed {
            n,
            commit,
            completions,
        };
        if let Err(std::sync::mpsc::SendError(group)) = synced.send(group) {
            // The sync thread is gone: nothing can be made durable.
            tracing::error!("store: the sync thread has stopped");
            for c in group.completions {
                c(Err(StoreError::Closed));
            }
            break;
        }
    }
    tracing::debug!("store thread stopped");
}

/// Binds `epoch` of `group` to the Commit hashed `hash` unless another
/// Commit has that epoch, or a later one is bound, or (at the group's home)
/// the epoch is ahead of the next, or its proof does not hold (see
/// [`Bind`], [`Orderer`]).
fn bind_commit(
    c: &Connection,
    group: &str,
    epoch: u64,
    content_hash: &ContentHash,
    orderer: Orderer,
    proof: Option<&proto::CommitProof>,
) -> Result<Bind, StoreError> {
    let hash = content_hash.to_string();
    let hash = hash.as_str();
    let epoch_i = i64::try_from(epoch).unwrap_or(i64::MAX);
    let newest: Option<i64> = c
        .prepare_cached("SELECT MAX(epoch) FROM group_commits WHERE group_id = ?1")?
        .query_row([group], |r| r.get(0))?;
    let same: Option<String> = c
        .prepare_cached(
            "SELECT content_hash FROM group_commits WHERE group_id = ?1 AND epoch = ?2",
        )?
        .query_row(params![group, epoch_i], |r| r.get(0))
        .optional()?;
    let newest_u = || u64::try_from(newest.unwrap_or(0)).unwrap_or(0);
    let next = newest.map_or(1, |n| n.saturating_add(1));
    match same {
        Some(h) if h == hash => Ok(Bind::Bound),
        Some(_) => Ok(Bind::Stale(newest_u())),
        None if newest.is_some_and(|n| n > epoch_i) => Ok(Bind::Stale(newest_u())),
        None if orderer == Orderer::Home && epoch_i > next => Ok(Bind::Ahead(newest_u())),
        None => {
            let next_key = match orderer {
                Orderer::OrderedAtHome => None,
                Orderer::Home | Orderer::HereAlone => {
                    match proven(c, group, epoch, content_hash, proof)? {
                        Ok(next_key) => next_key,
                        Err(why) => return Ok(Bind::Unproven(why)),
                    }
                }
            };
            exec(
                c,
                "INSERT INTO group_commits (group_id, epoch, content_hash, next_key) VALUES (?1, ?2, ?3, ?4)",
                params![group, epoch_i, hash, next_key.as_ref().map(|k| k.as_slice())],
            )?;
            Ok(Bind::Bound)
        }
    }
}

/// The key the Commit that started `epoch` named, if any, checked against
/// `proof`: the key its proof names for the next epoch (none without a
/// proof), or why not. No proof is asked for where the epoch's key is not
/// known here (no Commit bound here started the epoch with one: the group
/// is new here, or a client from before proofs made that Commit), as
/// before proofs; a proof that comes anyway must show it holds the key it
/// names.
fn proven(
    c: &Connection,
    group: &str,
    epoch: u64,
    content_hash: &ContentHash,
    proof: Option<&proto::CommitProof>,
) -> Result<Result<Option<[u8; 32]>, &'static str>, StoreError> {
    let key: Option<Vec<u8>> = match epoch.checked_sub(1).map(i64::try_from) {
        Some(Ok(before)) => c
            .prepare_cached(
                "SELECT next_key FROM group_commits WHERE group_id = ?1 AND epoch = ?2",
            )?
            .query_row(params![group, before], |r| r.get(0))
            .optional()?
            .flatten(),
        _ => None,
    };
    let key: Option<[u8; 32]> = key
        .map(|k| k.as_slice().try_into().map_err(corrupt))
        .transpose()?;
    Ok(match (key, proof) {
        (None, None) => Ok(None),
        (Some(_), None) => {
            Err("it came without the proof that a member of the group's current epoch made it")
        }
        (Some(key), Some(p)) => match p.verify(&key, group, epoch, content_hash) {
            Ok(next) => Ok(Some(next)),
            Err(proto::mls::ProofError::BadSignature) => {
                Err("its proof is not signed with the key of the group's current epoch")
            }
            Err(_) => Err(NEXT_KEY_UNPROVEN),
        },
        (None, Some(p)) => p
            .next_key(group, epoch, content_hash)
            .map(Some)
            .map_err(|_| NEXT_KEY_UNPROVEN),
    })
}

/// Why a proof whose next key did not sign is refused.
const NEXT_KEY_UNPROVEN: &str =
    "its proof does not show that its maker holds the key it names for the next epoch";

impl SqliteStore {
    /// The queued items for `peer` after `after`, read from the database;
    /// `Err(seq)` (inside `Ok`) when the first of them is damaged.
    async fn read_queued(
        &self,
        peer: &AreaId,
        after: i64,
        max: usize,
    ) -> Result<Result<Vec<Queued>, i64>, StoreError> {
        type Row = (
            i64,
            Option<String>,
            Option<String>,
            Option<Vec<u8>>,
            [Option<i64>; 3],
        );
        // Collect from before the snapshot is taken (see `tail`).
        let epoch = self.tails.collect(peer);
        let peer = peer.clone();
        let bodies = self.bodies.clone();
        let tail_peer = peer.clone();
        let rows: Vec<Row> = self
            .read(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT o.seq, o.item, COALESCE(o.envelope, s.envelope), o.body, o.body_seg, o.body_off, o.body_len FROM outbox o LEFT JOIN sent s ON o.is_deliver = 1 AND s.message_id = o.message_id WHERE o.peer = ?1 AND o.seq > ?2 ORDER BY o.seq LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![peer.as_str(), after, max as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, [r.get(4)?, r.get(5)?, r.get(6)?]))
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?;
        let caught_up = rows.len() < max;
        let mut items = Vec::with_capacity(rows.len());
        for (seq, item, envelope, inline, [seg, off, len]) in rows {
            match queued_item(&bodies.outbox, seq, item, envelope, inline, [seg, off, len]) {
                Ok(item) => items.push(Queued { seq, item }),
                Err(Unread::Later(e)) => return Err(e),
                Err(Unread::Damaged(e)) => {
                    tracing::error!(seq, error = %e, "an item queued for the peer is damaged: it goes back to its sender");
                    // What comes before it is sent first, in order.
                    return Ok(if items.is_empty() {
                        Err(seq)
                    } else {
                        Ok(items)
                    });
                }
            }
        }
        if caught_up {
            let last = items.last().map_or(after, |q| q.seq);
            self.tails.found_end(&tail_peer, epoch, last);
        }
        Ok(Ok(items))
    }

    /// Gives the damaged queued item at `seq` back to its sender.
    async fn give_back_damaged(&self, peer: &AreaId, seq: i64) -> Result<(), StoreError> {
        let (tails, peer) = (self.tails.clone(), peer.clone());
        let at_ms = u64::try_from(now_us() / 1000).unwrap_or(0);
        self.call(move |c| {
            give_back(
                c,
                &tails,
                &peer,
                (seq - 1, seq),
                i64::MAX,
                at_ms,
                DAMAGED_COPY,
            )
        })
        .await
        .map(|_| ())
    }
}

impl Store for SqliteStore {
    async fn order_commit(
        &self,
        group: String,
        epoch: u64,
        hash: ContentHash,
        proof: Option<proto::CommitProof>,
    ) -> Result<Bind, StoreError> {
        self.call(move |c| bind_commit(c, &group, epoch, &hash, Orderer::Home, proof.as_ref()))
            .await
    }

    async fn submit(&self, m: NewMessage) -> Result<SubmitOutcome, StoreError> {
        let own = self.own_area.clone();
        // Serialise outside the writer thread: it is the one serial resource.
        let env_json = to_json(&m.envelope)?;
        let (bodies, tails) = (self.bodies.clone(), self.tails.clone());
        self.call(move |c| {
            let env = &m.envelope;
            let what = Submitted {
                user: env.sender.user.clone(),
                key: env.idempotency_key.clone(),
                recipient: env.recipient.clone(),
                content_hash: env.content_hash,
                category: env.category.clone(),
            };
            if let Some(prior) = prior_submission(c, &what)? {
                return Ok(prior);
            }
            if !m.accept_new {
                return Ok(SubmitOutcome::NotStored);
            }
            if let Some(b) = &m.commit {
                match bind_commit(
                    c,
                    &b.group,
                    b.epoch,
                    &env.content_hash,
                    b.orderer,
                    b.proof.as_ref(),
                )? {
                    Bind::Bound => {}
                    Bind::Stale(newest) => return Ok(SubmitOutcome::StaleEpoch(newest)),
                    Bind::Ahead(newest) => return Ok(SubmitOutcome::EpochAhead(newest)),
                    Bind::Unproven(why) => return Ok(SubmitOutcome::Unproven(why)),
                }
            }
            let id = env.message_id.as_str();
            let status = match m.route {
                Route::Local => Status::Delivered,
                Route::Peer(_) => Status::Accepted,
            };
            let at = env.accepted_at_ms as i64;
            let delivered_at = matches!(m.route, Route::Local).then_some(at);
            exec(c,
                "INSERT INTO sent (message_id, sender_user, idem_key, recipient_area, envelope, status, accepted_ms, delivered_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![id, env.sender.user.as_str(), env.idempotency_key.as_str(), env.recipient.area.as_str(), env_json, status.as_str(), at, delivered_at],
            )?;
            let inline = bodies.inline_all(m.body.0.len());
            match &m.route {
                Route::Local => {
                    debug_assert_eq!(env.recipient.area, own);
                    insert_inbox(c, &bodies, env, &env_json, &m.body, inline)?;
                }
                Route::Peer(peer) => {
                    let (inline, r) = bodies.place(&bodies.outbox, &m.body.0, inline);
                    exec(c,
                        "INSERT INTO outbox (peer, message_id, is_deliver, body, body_seg, body_off, body_len, expires_ms) VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?7)",
                        params![peer.as_str(), id, inline, r.map(|r| r.seg), r.map(|r| r.off), r.map(|r| r.len), env.expires_at_ms as i64],
                    )?;
                    let item = FederationItem::Deliver { envelope: Box::new(env.clone()), body: m.body.clone() };
                    tails.stage(Effect::Push(peer.clone(), Queued { seq: c.last_insert_rowid(), item }));
                }
            }
            Ok(SubmitOutcome::Stored(env.message_id.clone(), status))
        })
        .await
    }

    async fn prior_submission(&self, what: Submitted) -> Result<Option<SubmitOutcome>, StoreError> {
        self.read(move |c| prior_submission(c, &what)).await
    }

    async fn accept_batch(
        &self,
        peer: AreaId,
        items: Vec<Incoming>,
    ) -> Result<Vec<IncomingOutcome>, StoreError> {
        self.queue_batch(peer, items, None).await?.await
    }

    async fn queue_batch(
        &self,
        peer: AreaId,
        items: Vec<Incoming>,
        order: Option<BatchOrder>,
    ) -> Result<Committing<Vec<IncomingOutcome>>, StoreError> {
        let items = items
            .into_iter()
            .map(|item| {
                let json = match &item {
                    Incoming::Deliver(env, _) => to_json(env)?,
                    Incoming::Status(..) | Incoming::Refused(_) => String::new(),
                };
                Ok((item, json))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let body_bytes = items
            .iter()
            .map(|(item, _)| match item {
                Incoming::Deliver(_, body) => body.0.len(),
                Incoming::Status(..) | Incoming::Refused(_) => 0,
            })
            .sum::<usize>();
        let bodies = self.bodies.clone();
        self.queue(move |c| {
            if let Some(order) = order {
                follow_session(c, &peer, order)?;
            }
            let mut out = Vec::with_capacity(items.len());
            let inline = bodies.inline_all(body_bytes);
            for (item, env_json) in &items {
                out.push(match item {
                    Incoming::Deliver(env, body) => {
                        if insert_inbox(c, &bodies, env, env_json, body, inline)? {
                            IncomingOutcome::Stored
                        } else if stored_as(c, env)? {
                            IncomingOutcome::Duplicate
                        } else {
                            IncomingOutcome::Conflict
                        }
                    }
                    Incoming::Status(id, status, at) => {
                        let area: Option<String> = c
                            .prepare_cached(
                                "SELECT recipient_area FROM sent WHERE message_id = ?1",
                            )?
                            .query_row([id.as_str()], |r| r.get(0))
                            .optional()?;
                        match area {
                            Some(a) if a == peer.as_str() => {
                                // `undeliverable` after delivery: the peer
                                // gave it up, read by no one.
                                let moved = if *status == Status::Undeliverable {
                                    give_up_sent(c, id.as_str(), *at)?
                                } else {
                                    advance_sent(c, id.as_str(), *status, *at, None)?
                                };
                                if moved {
                                    IncomingOutcome::Stored
                                } else {
                                    IncomingOutcome::Duplicate
                                }
                            }
                            _ => IncomingOutcome::UnknownMessage,
                        }
                    }
                    Incoming::Refused(id) => {
                        let known = c
                            .prepare_cached(
                                "SELECT 1 FROM inbox WHERE message_id = ?1 AND sender_area = ?2",
                            )?
                            .exists(params![id.as_str(), peer.as_str()])?;
                        if known {
                            IncomingOutcome::Duplicate
                        } else {
                            IncomingOutcome::Refused
                        }
                    }
                });
            }
            Ok(out)
        })
        .await
    }

    async fn inbox(&self, mb: Mailbox, limit: usize) -> Result<Vec<InboxItem>, StoreError> {
        self.read(move |c| {
            let (clause, args) = mailbox_clause(&mb);
            // Indexed rows, and the newest ones the index does not cover yet.
            let sql = format!(
                "SELECT envelope, status FROM inbox WHERE seq IN \
                 (SELECT seq FROM mailbox WHERE {clause} \
                  UNION ALL SELECT seq FROM inbox WHERE seq > {MAILBOX_MARK} AND {clause}) AND \
                 ((kind = 'opaque' AND status != 'acknowledged') OR \
                  (kind = 'mls' AND NOT EXISTS (SELECT 1 FROM member_acks a WHERE a.message_id = inbox.message_id AND a.user_id = ?1))) \
                 AND {ELIGIBLE} ORDER BY seq LIMIT {limit}"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (env, status) = row?;
                out.push(InboxItem { envelope: from_json(&env)?, status: parse_status(&status)? });
            }
            Ok(out)
        })
        .await
    }

    async fn fetch(
        &self,
        mb: Mailbox,
        id: MessageId,
        now_ms: u64,
    ) -> Result<Option<(Envelope, Body)>, StoreError> {
        // The body is read and checked by the reader, off the writer: one
        // that does not match its hash (damaged on disk, or zeroed by an
        // erasure while it was read) is not handed out, and nothing changes.
        let bodies = self.bodies.clone();
        let (m, i) = (mb.clone(), id.clone());
        let found = self
            .read(move |c| {
                let Some((env, body, status)) = find_in_mailbox(c, Some(&bodies.inbox), &m, &i)?
                else {
                    return Ok(None);
                };
                let body = Body(body);
                if body.hash() == env.content_hash {
                    return Ok(Some((env, body, status)));
                }
                match erased_at(c, &i)? {
                    Some(at) => Err(StoreError::Erased(at)),
                    None => Err(corrupt(format!(
                        "the stored body of {i} does not match its content hash"
                    ))),
                }
            })
            .await;
        let found = match found {
            // Erased after this read's snapshot was taken (its body zeroed,
            // or its segment removed, while it was read): erased, not
            // damaged, as a read now shows.
            Err(e @ StoreError::Corrupt(_)) => {
                let i = id.clone();
                return Err(match self.read(move |c| erased_at(c, &i)).await? {
                    Some(at) => StoreError::Erased(at),
                    None => e,
                });
            }
            other => other?,
        };
        let Some((env, body, status)) = found else {
            return Ok(None);
        };
        // Its sender fetching the echo of their own MLS message to their
        // team has not had it read: its sender is not told (as `ack` sets
        // such an echo aside).
        let own_echo = env.kind == proto::MessageKind::Mls
            && env.sender.area == self.own_area
            && env.sender.user == mb.user;
        if status == Status::Delivered && !own_echo {
            let (own, tails) = (self.own_area.clone(), self.tails.clone());
            self.call(move |c| {
                // Moves forward only: another fetch or an acknowledgement
                // may have come first.
                if let Some((env, _, Status::Delivered)) = find_in_mailbox(c, None, &mb, &id)? {
                    set_inbox_status(c, &tails, &own, &env, Status::Fetched, now_ms)?;
                }
                Ok(())
            })
            .await?;
        }
        Ok(Some((env, body)))
    }

    async fn ack(
        &self,
        mb: Mailbox,
        id: MessageId,
        now_ms: u64,
    ) -> Result<Option<Status>, StoreError> {
        let own = self.own_area.clone();
        let tails = self.tails.clone();
        self.call(move |c| {
            let Some((env, _, status)) = find_in_mailbox(c, None, &mb, &id)? else {
                return Ok(None);
            };
            if status == Status::Undeliverable {
                // Given up already: no one it was for was left to read it.
                return Ok(Some(status));
            }
            if env.kind == proto::MessageKind::Mls {
                // Its sender, in the team it went to, acknowledging the
                // echo of their own message: it stops waiting for them,
                // but no one else has read it yet.
                if env.sender.area == own && env.sender.user == mb.user {
                    return set_aside(c, &tails, &own, &env, &mb.user, now_ms).map(Some);
                }
                member_done(c, &id, &mb.user)?;
            }
            if status != Status::Acknowledged {
                set_inbox_status(c, &tails, &own, &env, Status::Acknowledged, now_ms)?;
            }
            prune_mailbox(c, &tails, &own, &env, now_ms)?;
            Ok(Some(Status::Acknowledged))
        })
        .await
    }

    async fn not_in_case(
        &self,
        mb: Mailbox,
        id: MessageId,
        now_ms: u64,
    ) -> Result<Option<Status>, StoreError> {
        let own = self.own_area.clone();
        let tails = self.tails.clone();
        self.call(move |c| {
            let Some((env, _, _)) = find_in_mailbox(c, None, &mb, &id)? else {
                return Ok(None);
            };
            let to_team = matches!(env.recipient.target, proto::Target::Team(_));
            if env.kind != proto::MessageKind::Mls || !to_team {
                return Ok(None);
            }
            set_aside(c, &tails, &own, &env, &mb.user, now_ms).map(Some)
        })
        .await
    }

    async fn sync_teams(
        &self,
        members: Vec<(TeamId, UserId)>,
        now_ms: u64,
    ) -> Result<TeamChanges, StoreError> {
        let (tails, own) = (self.tails.clone(), self.own_area.clone());
        self.call(move |c| {
            let first = !c
                .prepare_cached("SELECT 1 FROM team_sync WHERE id = 0")?
                .exists([])?;
            let had: std::collections::BTreeMap<(String, String), Option<i64>> = c
                .prepare_cached("SELECT team, user_id, left_ms FROM team_members")?
                .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let now: std::collections::BTreeSet<(String, String)> = members
                .iter()
                .map(|(t, u)| (t.to_string(), u.to_string()))
                .collect();
            // The last inbox row so far: a newcomer's rows come after it
            // (the first time, every row is theirs), a leaver's end with it.
            let last: i64 = c
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM inbox")?
                .query_row([], |r| r.get(0))?;
            let since = if first { 0 } else { last };
            let mut changes = TeamChanges::default();
            for (team, user) in &now {
                match had.get(&(team.clone(), user.clone())) {
                    None => {
                        exec(
                            c,
                            "INSERT INTO team_members (team, user_id, since_seq) VALUES (?1, ?2, ?3)",
                            params![team, user, since],
                        )?;
                        changes.joined += 1;
                    }
                    Some(Some(_)) => {
                        exec(
                            c,
                            "UPDATE team_members SET until_seq = NULL, left_ms = NULL \
                             WHERE team = ?1 AND user_id = ?2",
                            params![team, user],
                        )?;
                        changes.returned += 1;
                    }
                    Some(None) => {}
                }
            }
            for ((team, user), left) in &had {
                if left.is_none() && !now.contains(&(team.clone(), user.clone())) {
                    exec(
                        c,
                        "UPDATE team_members SET until_seq = ?3, left_ms = ?4 \
                         WHERE team = ?1 AND user_id = ?2",
                        params![team, user, last, sql_int(now_ms)],
                    )?;
                    changes.left += 1;
                }
            }
            if first {
                exec(
                    c,
                    "INSERT INTO team_sync (id, at_ms) VALUES (0, ?1)",
                    params![sql_int(now_ms)],
                )?;
                // An earlier gateway waited for the members in the
                // directory when each acknowledgement came: a message whose
                // last one came while someone since gone had not
                // acknowledged it is waiting for no one now.
                let teams: Vec<String> = c
                    .prepare_cached("SELECT DISTINCT team FROM team_members")?
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                changes.settled = settle_waiting_for_no_one(c, &tails, &own, &teams, now_ms)?;
            }
            Ok(changes)
        })
        .await
    }

    async fn settle_after_leavers(&self, now_ms: u64) -> Result<usize, StoreError> {
        let before =
            now_ms.saturating_sub(u64::try_from(WAIT_FOR_LEAVERS.as_millis()).unwrap_or(u64::MAX));
        let gone =
            "SELECT DISTINCT team FROM team_members WHERE left_ms IS NOT NULL AND left_ms <= ?1";
        // Read first: most passes find no one, and write nothing.
        let teams: Vec<String> = self
            .read(move |c| {
                Ok(c.prepare_cached(gone)?
                    .query_map(params![sql_int(before)], |r| r.get(0))?
                    .collect::<Result<_, _>>()?)
            })
            .await?;
        if teams.is_empty() {
            return Ok(0);
        }
        let (tails, own) = (self.tails.clone(), self.own_area.clone());
        self.call(move |c| {
            exec(
                c,
                "DELETE FROM team_members WHERE left_ms IS NOT NULL AND left_ms <= ?1",
                params![sql_int(before)],
            )?;
            settle_waiting_for_no_one(c, &tails, &own, &teams, now_ms)
        })
        .await
    }

    async fn erase_settled(
        &self,
        settled_by_ms: u64,
        now_ms: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let max = sql_int(max);
        self.call(move |c| {
            let ids: Vec<String> = c
                .prepare_cached(
                    "SELECT message_id FROM settled WHERE erased_ms IS NULL AND settled_ms <= ?1 \
                     ORDER BY settled_ms LIMIT ?2",
                )?
                .query_map(params![sql_int(settled_by_ms), max], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            // Inline bodies' bytes are zeroed where they lay in the
            // database's pages, not just unlinked from their rows.
            let _secure = SecureDelete::on(c)?;
            for id in &ids {
                exec(
                    c,
                    "UPDATE settled SET erased_ms = ?2, \
                     (body_seg, body_off, body_len) = \
                     (SELECT body_seg, body_off, body_len FROM inbox WHERE message_id = ?1) \
                     WHERE message_id = ?1",
                    params![id, sql_int(now_ms)],
                )?;
                exec(
                    c,
                    "UPDATE inbox SET body = NULL, body_seg = NULL, body_off = NULL, body_len = NULL \
                     WHERE message_id = ?1",
                    params![id],
                )?;
            }
            Ok(ids.len())
        })
        .await
        .inspect(|n| {
            if *n > 0 {
                self.truncate_wal
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
    }

    async fn zero_erased(&self, max: usize) -> Result<usize, StoreError> {
        let max = sql_int(max);
        let places: Vec<(String, BodyRef)> = self
            .read(move |c| {
                let rows = c
                    .prepare_cached(
                        "SELECT message_id, body_seg, body_off, body_len FROM settled \
                         WHERE body_seg IS NOT NULL LIMIT ?1",
                    )?
                    .query_map(params![max], |r| {
                        Ok((
                            r.get(0)?,
                            BodyRef {
                                seg: r.get(1)?,
                                off: r.get(2)?,
                                len: r.get(3)?,
                            },
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await?;
        if places.is_empty() {
            return Ok(0);
        }
        let refs: Vec<BodyRef> = places.iter().map(|(_, r)| *r).collect();
        let freed = self
            .bodies
            .inbox
            .zero(&refs)
            .map_err(|e| StoreError::Db(format!("zeroing erased bodies: {e}")))?;
        tracing::debug!(
            bodies = refs.len(),
            bytes_freed = freed,
            "store: erased bodies zeroed"
        );
        let ids: Vec<String> = places.into_iter().map(|(id, _)| id).collect();
        let n = ids.len();
        self.call(move |c| {
            for id in &ids {
                exec(
                    c,
                    "UPDATE settled SET body_seg = NULL, body_off = NULL, body_len = NULL \
                     WHERE message_id = ?1",
                    params![id],
                )?;
            }
            Ok(())
        })
        .await?;
        Ok(n)
    }

    async fn remove_erased_bodies(&self) -> Result<usize, StoreError> {
        if !self.bodies.inbox.has_closed_segments() {
            return Ok(0);
        }
        // Rows are numbered in the order their bodies were appended, so the
        // first row (by `seq`) that still refers to a segment refers to the
        // oldest one in use. Decided from durable rows: rows committed after
        // a read refer only to the segment open before it (`open`) or to
        // later ones, so nothing from `open` on is removed, even if it has
        // closed since. After a start (or a mass erasure) the rows before the first such
        // row can be many: they are stepped over a range at a time, so no
        // single read holds the reader thread (listings, fetches) for long.
        let open = self.bodies.inbox.open_segment();
        let mut from = self
            .unreferenced_below
            .load(std::sync::atomic::Ordering::Relaxed);
        let oldest: Option<(i64, i64)> = loop {
            let (found, last) = self
                .read(move |c| {
                    let found = c
                        .prepare_cached(
                            "SELECT seq, body_seg FROM inbox WHERE seq >= ?1 AND seq < ?2 \
                             AND body_seg IS NOT NULL ORDER BY seq LIMIT 1",
                        )?
                        .query_row(
                            params![from, from.saturating_add(SCAN_ROWS_PER_READ)],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .optional()?;
                    let last: Option<i64> =
                        c.query_row("SELECT MAX(seq) FROM inbox", [], |r| r.get(0))?;
                    Ok((found, last))
                })
                .await?;
            let next = from.saturating_add(SCAN_ROWS_PER_READ);
            match found {
                Some(row) => break Some(row),
                None if last.is_some_and(|last| last >= next) => {
                    self.unreferenced_below
                        .fetch_max(next, std::sync::atomic::Ordering::Relaxed);
                    from = next;
                }
                None => break None,
            }
        };
        if let Some((seq, _)) = oldest {
            self.unreferenced_below
                .fetch_max(seq, std::sync::atomic::Ordering::Relaxed);
        }
        let below = oldest.map_or(open, |(_, seg)| seg.min(open));
        self.bodies
            .inbox
            .erase_below(below)
            .map_err(|e| StoreError::Db(format!("removing erased bodies: {e}")))
    }

    async fn status(
        &self,
        sender: UserId,
        id: MessageId,
    ) -> Result<Option<StatusResponse>, StoreError> {
        self.read(move |c| {
            type Row = (String, String, [Option<i64>; 5], Option<String>);
            let row: Option<Row> = c.prepare_cached(
                "SELECT envelope, status, accepted_ms, delivered_ms, fetched_ms, acknowledged_ms, undeliverable_ms, reason FROM sent WHERE message_id = ?1 AND sender_user = ?2",
            )?
            .query_row(params![id.as_str(), sender.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, [r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?], r.get(7)?))
            })
            .optional()?;
            let Some((env, status, times, reason)) = row else { return Ok(None) };
            let env: Envelope = from_json(&env)?;
            let steps = [Status::Accepted, Status::Delivered, Status::Fetched, Status::Acknowledged, Status::Undeliverable];
            let mut history: Vec<StatusEvent> = steps
                .into_iter()
                .zip(times)
                .filter_map(|(s, at)| {
                    at.map(|at| StatusEvent {
                        status: s,
                        at_ms: at.max(0) as u64,
                        reason: (s == Status::Undeliverable).then(|| reason.clone()).flatten(),
                    })
                })
                .collect();
            history.sort_by_key(|e| e.status.rank());
            Ok(Some(StatusResponse {
                message_id: id,
                recipient: env.recipient,
                status: parse_status(&status)?,
                history,
                waiting: None,
            }))
        })
        .await
    }

    async fn queued(
        &self,
        peer: AreaId,
        after: i64,
        max: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        if let Some(items) = self.tails.serve(&peer, after, max) {
            return Ok(items);
        }
        loop {
            match self.read_queued(&peer, after, max).await? {
                Ok(items) => return Ok(items),
                Err(seq) => self.give_back_damaged(&peer, seq).await?,
            }
        }
    }

    async fn sent(
        &self,
        peer: AreaId,
        results: Vec<(i64, Sent)>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        // The results are consecutive rows of the peer's queue, so the
        // peer's rows from the first to the last are exactly these.
        let first = results.iter().map(|(seq, _)| *seq).min();
        let last = results.iter().map(|(seq, _)| *seq).max();
        let tail_peer = peer.clone();
        self.call(move |c| {
            // Refusals (rare) one by one, first, so the bulk update below
            // finds them no longer `accepted`.
            for (seq, result) in &results {
                let Sent::Refused(reason) = result else { continue };
                let row: Option<(Option<String>, bool)> = c
                    .prepare_cached(
                        "SELECT message_id, is_deliver FROM outbox WHERE seq = ?1 AND peer = ?2",
                    )?
                    .query_row(params![seq, peer.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                match row {
                    Some((Some(id), true)) => {
                        let reason = format!("refused by {peer}: {reason}");
                        advance_sent(c, &id, Status::Undeliverable, now_ms, Some(&reason))?;
                    }
                    // The peer's words are not logged: they are its text.
                    Some(_) => tracing::warn!(%peer, "peer refused a status update"),
                    None => {}
                }
            }
            if let (Some(first), Some(last)) = (first, last) {
                // Every other delivery in the range was stored by the peer.
                exec(
                    c,
                    "UPDATE sent SET status = 'delivered', delivered_ms = ?1 WHERE status = 'accepted' AND message_id IN \
                     (SELECT message_id FROM outbox WHERE peer = ?2 AND seq BETWEEN ?3 AND ?4 AND is_deliver = 1)",
                    params![now_ms as i64, peer.as_str(), first, last],
                )?;
                exec(
                    c,
                    "DELETE FROM outbox WHERE peer = ?1 AND seq BETWEEN ?2 AND ?3",
                    params![peer.as_str(), first, last],
                )?;
            }
            Ok(())
        })
        .await?;
        if let Some(last) = last {
            self.tails.answered(&tail_peer, last);
        }
        Ok(())
    }

    async fn expire(
        &self,
        peer: AreaId,
        seqs: (i64, i64),
        expired_by_ms: u64,
        now_ms: u64,
        reason: String,
    ) -> Result<usize, StoreError> {
        let tails = self.tails.clone();
        self.call(move |c| {
            let (messages, updates) = give_back(
                c,
                &tails,
                &peer,
                seqs,
                sql_int(expired_by_ms),
                now_ms,
                &reason,
            )?;
            if updates > 0 {
                tracing::warn!(%peer, count = updates, "status updates for the peer expired before they could be sent");
            }
            Ok(messages)
        })
        .await
    }

    async fn give_back_queue(
        &self,
        peer: AreaId,
        now_ms: u64,
        reason: String,
    ) -> Result<(usize, usize), StoreError> {
        let tails = self.tails.clone();
        self.call(move |c| give_back(c, &tails, &peer, (0, i64::MAX), i64::MAX, now_ms, &reason))
            .await
    }

    async fn queued_peers(&self) -> Result<Vec<AreaId>, StoreError> {
        self.read(|c| {
            // One index step per area (`outbox_peer`), not a scan of the
            // queue: the next area after each one found.
            let mut stmt = c.prepare_cached(
                "WITH RECURSIVE p(peer) AS ( \
                   SELECT MIN(peer) FROM outbox \
                   UNION ALL \
                   SELECT (SELECT MIN(peer) FROM outbox WHERE peer > p.peer) FROM p WHERE p.peer IS NOT NULL \
                 ) SELECT peer FROM p WHERE peer IS NOT NULL",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(AreaId::new(row?).map_err(corrupt)?);
            }
            Ok(out)
        })
        .await
    }

    async fn queue_end(&self, peer: AreaId) -> Result<i64, StoreError> {
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE peer = ?1")?
                    .query_row([peer.as_str()], |r| r.get(0))?,
            )
        })
        .await
    }

    async fn put_key_packages(
        &self,
        user: UserId,
        kps: Vec<NewKeyPackage>,
        now_ms: u64,
    ) -> Result<KeyStock, StoreError> {
        self.call(move |c| {
            let mut stored = 0;
            // One too near the end of its lifetime to be handed out is not
            // stored (nor does it replace the last-resort one held).
            let usable_after = now_ms / 1000 + KEY_PACKAGE_CLAIM_MARGIN.as_secs();
            for kp in kps.iter().filter(|kp| kp.not_after_s >= usable_after) {
                if kp.last_resort {
                    exec(c, "DELETE FROM key_packages WHERE user_id = ?1 AND last_resort = 1", [user.as_str()])?;
                }
                stored += exec(
                    c,
                    "INSERT OR IGNORE INTO key_packages (kp_ref, user_id, key_package, last_resort, created_ms, not_after_s) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![kp.kp_ref, user.as_str(), kp.bytes, kp.last_resort, now_ms as i64, to_i64(kp.not_after_s)],
                )?;
            }
            drop_expired_key_packages(c, &user, now_ms)?;
            let (available, last): (i64, i64) = c
                .prepare_cached(
                    "SELECT COALESCE(SUM(last_resort = 0), 0), COALESCE(SUM(last_resort = 1), 0) FROM key_packages WHERE user_id = ?1 AND not_after_s >= ?2",
                )?
                .query_row(params![user.as_str(), to_i64(now_ms / 1000 + KEY_PACKAGE_RENEWAL.as_secs())], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(KeyStock { stored, available: available.max(0) as usize, last_resort: last > 0 })
        })
        .await
    }

    async fn claim_key_packages(
        &self,
        users: Vec<UserId>,
        now_ms: u64,
    ) -> Result<Vec<(UserId, Option<Vec<u8>>)>, StoreError> {
        self.call(move |c| {
            let mut out = Vec::with_capacity(users.len());
            for user in &users {
                drop_expired_key_packages(c, user, now_ms)?;
                let row: Option<(String, Vec<u8>, bool)> = c
                    .prepare_cached(
                        "SELECT kp_ref, key_package, last_resort FROM key_packages WHERE user_id = ?1 ORDER BY last_resort, created_ms LIMIT 1",
                    )?
                    .query_row([user.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?;
                let kp = match row {
                    Some((kp_ref, bytes, last_resort)) => {
                        if !last_resort {
                            exec(c, "DELETE FROM key_packages WHERE kp_ref = ?1", [kp_ref])?;
                        }
                        Some(bytes)
                    }
                    None => None,
                };
                out.push((user.clone(), kp));
            }
            Ok(out)
        })
        .await
    }

    async fn queue_depths(&self) -> Result<Vec<PeerQueue>, StoreError> {
        self.read(|c| {
            // The queue is in order, so its head is its oldest item: a
            // message's time is its acceptance, a status update's is its
            // expiry less the time such updates are kept.
            let mut stmt = c.prepare_cached(
                "SELECT o.peer, COUNT(*), \
                   (SELECT CASE WHEN h.is_deliver = 1 \
                       THEN (SELECT accepted_ms FROM sent WHERE sent.message_id = h.message_id) \
                       ELSE h.expires_ms - ?1 END \
                    FROM outbox h WHERE h.peer = o.peer ORDER BY h.seq LIMIT 1) \
                 FROM outbox o GROUP BY o.peer",
            )?;
            let rows = stmt.query_map([STATUS_ITEM_VALIDITY_MS as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (peer, n, oldest) = row?;
                out.push(PeerQueue {
                    peer: AreaId::new(peer).map_err(corrupt)?,
                    items: n.max(0) as u64,
                    oldest_queued_ms: oldest.and_then(|t| u64::try_from(t).ok()),
                });
            }
            Ok(out)
        })
        .await
    }

    fn fault(&self) -> Option<String> {
        self.durability.has_failed().then(|| FAILED_SYNC.to_owned())
    }

    async fn peer_sessions(&self) -> Result<Vec<(AreaId, BatchOrder)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT peer, session, last_batch FROM peer_sessions ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (peer, session, last) = row?;
                let batch = u64::try_from(last).map_err(corrupt)?;
                // Stored bit for bit (see `follow_session`).
                let session = session as u64;
                out.push((
                    AreaId::new(peer).map_err(corrupt)?,
                    BatchOrder { session, batch },
                ));
            }
            Ok(out)
        })
        .await
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Inserts a message into the inbox; false if it was there already.
fn insert_inbox(
    c: &Connection,
    bodies: &Bodies,
    env: &Envelope,
    env_json: &str,
    body: &Body,
    inline: bool,
) -> Result<bool, StoreError> {
    let (kind, target) = target_of(env);
    // A duplicate (a peer's retry) is refused by the insert, and the body
    // it queued for the log is taken back.
    let (inline, r) = bodies.place(&bodies.inbox, &body.0, inline);
    let n = exec(c,
        "INSERT OR IGNORE INTO inbox (message_id, sender_area, sender_user, idem_key, target_kind, target_id, envelope, body, body_seg, body_off, body_len, status, stored_at_us, kind)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'delivered', ?12, ?13)",
        params![
            env.message_id.as_str(),
            env.sender.area.as_str(),
            env.sender.user.as_str(),
            env.idempotency_key.as_str(),
            kind,
            target,
            env_json,
            inline,
            r.map(|r| r.seg),
            r.map(|r| r.off),
            r.map(|r| r.len),
            now_us(),
            match env.kind {
                proto::MessageKind::Mls => "mls",
                _ => "opaque",
            }
        ],
    )?;
    if n == 0 {
        if let Some(r) = r {
            bodies.inbox.unappend(r);
        }
    }
    Ok(n == 1)
}

/// Whether the inbox holds this message already: one from the same sender
/// under the same idempotency key (a repeat, whatever id it came with), not
/// another message that took its id.
fn stored_as(c: &Connection, env: &Envelope) -> Result<bool, StoreError> {
    Ok(c.prepare_cached(
        "SELECT 1 FROM inbox WHERE idem_key = ?1 AND sender_area = ?2 AND sender_user = ?3",
    )?
    .exists(params![
        env.idempotency_key.as_str(),
        env.sender.area.as_str(),
        env.sender.user.as_str()
    ])?)
}

/// A mailbox's message: its envelope, status and (when `with_body`) body.
fn find_in_mailbox(
    c: &Connection,
    log: Option<&BodyLog>,
    mb: &Mailbox,
    id: &MessageId,
) -> Result<Option<(Envelope, Vec<u8>, Status)>, StoreError> {
    let (clause, mut args) = mailbox_clause(mb);
    let n = args.len() + 1;
    args.push(id.to_string());
    let sql = format!(
        "SELECT envelope, status, body, body_seg, body_off, body_len FROM inbox WHERE message_id = ?{n} AND {clause} AND {ELIGIBLE}"
    );
    type Row = (
        String,
        String,
        Option<Vec<u8>>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
    );
    let row: Option<Row> = c
        .prepare_cached(&sql)?
        .query_row(rusqlite::params_from_iter(args.iter()), |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()?;
    let Some((env, status, inline, seg, off, len)) = row else {
        return Ok(None);
    };
    let body = match log {
        Some(_) if inline.is_none() && seg.is_none() => match erased_at(c, id)? {
            Some(at) => return Err(StoreError::Erased(at)),
            None => stored_body_missing()?,
        },
        Some(log) => stored_body(log, inline, seg, off, len)?,
        None => Vec::new(),
    };
    Ok(Some((from_json(&env)?, body, parse_status(&status)?)))
}

/// Removes an acknowledged message's entry from the `mailbox` index once no
/// one can list it: see `UNLISTABLE`, and for an MLS message to a team, once
/// every member it is for has acknowledged it (see `everyone_acked`). (An
/// `UNLISTABLE` entry not indexed yet is left out when it is; for the
/// team's message, which the bulk pass cannot judge, the pass runs first.)
/// A message no one can list any more is recorded as settled at `now_ms`,
/// for retention; a team's MLS message that no one read is given up (see
/// `give_up_if_unread`).
fn prune_mailbox(
    c: &Connection,
    tails: &Tails,
    own: &AreaId,
    env: &Envelope,
    now_ms: u64,
) -> Result<(), StoreError> {
    let id = env.message_id.as_str();
    match &env.recipient.target {
        proto::Target::Team(team) if env.kind == proto::MessageKind::Mls => {
            if everyone_acked(c, id, team.as_str())? {
                index_mailboxes(c)?;
                // Waiting for no one, and perhaps read by no one: those
                // it was for left, and the rest were not in its case.
                give_up_if_unread(c, tails, own, id, now_ms)?;
                settle(c, id, now_ms)?;
            }
        }
        _ => {
            let unlistable = c
                .prepare_cached(&format!(
                    "SELECT 1 FROM inbox WHERE message_id = ?1 AND {UNLISTABLE}"
                ))?
                .exists(params![id])?;
            if unlistable {
                settle(c, id, now_ms)?;
            }
        }
    }
    Ok(())
}

/// Whether every member an MLS message to `team` is for has acknowledged
/// it: those who were in the team when it was stored and are in it now, or
/// left it less than [`WAIT_FOR_LEAVERS`] ago (their rows are forgotten
/// after that; see `TEAM_MEMBERS_TABLE`). True too when no such member is
/// left.
fn everyone_acked(c: &Connection, id: &str, team: &str) -> Result<bool, StoreError> {
    Ok(c.prepare_cached(
        "SELECT NOT EXISTS (SELECT 1 FROM team_members m, inbox i \
         WHERE i.message_id = ?1 AND m.team = ?2 AND i.seq > m.since_seq \
         AND (m.until_seq IS NULL OR i.seq <= m.until_seq) \
         AND NOT EXISTS (SELECT 1 FROM member_acks a WHERE a.message_id = ?1 AND a.user_id = m.user_id))",
    )?
    .query_row(params![id, team], |r| r.get(0))?)
}

/// Settles the MLS messages to `teams` still listed that every member they
/// are for has acknowledged (see `everyone_acked`); returns how many. One
/// that no one acknowledged (everyone it was for has left the team) is
/// given up: its sender is told it is undeliverable, and why.
fn settle_waiting_for_no_one(
    c: &Connection,
    tails: &Tails,
    own: &AreaId,
    teams: &[String],
    now_ms: u64,
) -> Result<usize, StoreError> {
    index_mailboxes(c)?;
    let mut listed = c.prepare_cached(
        "SELECT i.message_id FROM mailbox b JOIN inbox i ON i.seq = b.seq \
         WHERE b.target_kind = 'team' AND b.target_id = ?1 AND i.kind = 'mls'",
    )?;
    let mut settled = 0;
    for team in teams {
        let ids: Vec<String> = listed
            .query_map([team], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for id in ids {
            if everyone_acked(c, &id, team)? {
                give_up_if_unread(c, tails, own, &id, now_ms)?;
                settle(c, &id, now_ms)?;
                settled += 1;
            }
        }
    }
    Ok(settled)
}

/// Records that a member is done with an MLS message to her team (read
/// it, or cannot): it no longer lists to her or waits for her.
fn member_done(c: &Connection, id: &MessageId, user: &UserId) -> Result<(), StoreError> {
    exec(
        c,
        "INSERT OR IGNORE INTO member_acks (message_id, user_id) VALUES (?1, ?2)",
        params![id.as_str(), user.as_str()],
    )?;
    Ok(())
}

/// A member done with an MLS message to her team without reading it (not
/// in its case, or its sender's echo): it stops waiting for her, and its
/// sender is not told it was read. Returns its status then, which is
/// `undeliverable` if that left no one to read it (see `prune_mailbox`).
fn set_aside(
    c: &Connection,
    tails: &Tails,
    own: &AreaId,
    env: &Envelope,
    user: &UserId,
    now_ms: u64,
) -> Result<Status, StoreError> {
    member_done(c, &env.message_id, user)?;
    prune_mailbox(c, tails, own, env, now_ms)?;
    let now: String = c
        .prepare_cached("SELECT status FROM inbox WHERE message_id = ?1")?
        .query_row([env.message_id.as_str()], |r| r.get(0))?;
    parse_status(&now)
}

/// Tells the sender of an inbox message that no one acknowledged that it is
/// undeliverable (see [`GIVEN_UP_UNREAD`]); an acknowledged one was read.
/// Not a message to a team its sender is in: that copy is the sender's
/// colleagues' (a reply goes to the case's team address too), and the
/// sender is still there to act.
fn give_up_if_unread(
    c: &Connection,
    tails: &Tails,
    own: &AreaId,
    id: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    let row: Option<(String, String, String)> = c
        .prepare_cached("SELECT envelope, status, target_id FROM inbox WHERE message_id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((env, status, team)) = row else {
        return Ok(());
    };
    if !parse_status(&status)?.can_be_given_up() {
        return Ok(());
    }
    let env: Envelope = from_json(&env)?;
    if &env.sender.area == own {
        // One of those it was for (in the team when it was stored), or
        // one who acknowledged its echo.
        let in_team: bool = c
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM team_members m, inbox i WHERE i.message_id = ?3 \
                 AND m.team = ?1 AND m.user_id = ?2 AND i.seq > m.since_seq \
                 AND (m.until_seq IS NULL OR i.seq <= m.until_seq)) \
                 OR EXISTS (SELECT 1 FROM member_acks WHERE message_id = ?3 AND user_id = ?2)",
            )?
            .query_row(params![team, env.sender.user.as_str(), id], |r| r.get(0))?;
        if in_team {
            return Ok(());
        }
    }
    set_inbox_status(c, tails, own, &env, Status::Undeliverable, now_ms)
}

/// Settles a message no one can list any more: its mailbox entries go and
/// it is recorded as settled at `now_ms`, for retention. Decided once.
fn settle(c: &Connection, id: &str, now_ms: u64) -> Result<(), StoreError> {
    exec(
        c,
        "DELETE FROM mailbox WHERE (target_kind, target_id, seq) IN \
         (SELECT target_kind, target_id, seq FROM inbox WHERE message_id = ?1)",
        params![id],
    )?;
    exec(
        c,
        "INSERT OR IGNORE INTO settled (message_id, settled_ms) VALUES (?1, ?2)",
        params![id, sql_int(now_ms)],
    )?;
    Ok(())
}

/// SQLite's `secure_delete` on a connection while this lives: what a
/// statement deletes or shrinks is overwritten with zeros in its pages.
struct SecureDelete<'c>(&'c Connection);

impl<'c> SecureDelete<'c> {
    fn on(c: &'c Connection) -> Result<SecureDelete<'c>, StoreError> {
        c.execute_batch("PRAGMA secure_delete = ON")?;
        Ok(SecureDelete(c))
    }
}

impl Drop for SecureDelete<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.execute_batch("PRAGMA secure_delete = OFF") {
            tracing::warn!(error = %e, "store: could not turn secure_delete off again");
        }
    }
}

/// A count or a time in ms as SQLite stores it (saturating; no real value
/// reaches the limit).
fn sql_int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// Moves an inbox message forward and tells its sender: directly when the
/// sender is local, through the sender's peer queue otherwise.
fn set_inbox_status(
    c: &Connection,
    tails: &Tails,
    own: &AreaId,
    env: &Envelope,
    to: Status,
    now_ms: u64,
) -> Result<(), StoreError> {
    let id = env.message_id.as_str();
    let cur: String = c
        .prepare_cached("SELECT status FROM inbox WHERE message_id = ?1")?
        .query_row([id], |r| r.get(0))?;
    let cur = parse_status(&cur)?;
    let give_up = to == Status::Undeliverable;
    // Only forward: a late acknowledgement does not undo a give-up.
    if !(cur.can_become(to) || give_up && cur.can_be_given_up()) {
        return Ok(());
    }
    exec(
        c,
        "UPDATE inbox SET status = ?2 WHERE message_id = ?1",
        params![id, to.as_str()],
    )?;
    if &env.sender.area == own {
        // Skipped steps (ack without fetch) are recorded too, so history is complete.
        if to == Status::Acknowledged {
            advance_sent(c, id, Status::Fetched, now_ms, None)?;
        }
        if give_up {
            give_up_sent(c, id, now_ms)?;
        } else {
            advance_sent(c, id, to, now_ms, None)?;
        }
    } else {
        let item = FederationItem::Status {
            message_id: env.message_id.clone(),
            status: to,
            at_ms: now_ms,
        };
        exec(c,
            "INSERT INTO outbox (peer, message_id, is_deliver, item, expires_ms) VALUES (?1, ?2, 0, ?3, ?4)",
            params![env.sender.area.as_str(), id, to_json(&item)?, (now_ms + STATUS_ITEM_VALIDITY_MS) as i64],
        )?;
        let seq = c.last_insert_rowid();
        tails.stage(Effect::Push(env.sender.area.clone(), Queued { seq, item }));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
