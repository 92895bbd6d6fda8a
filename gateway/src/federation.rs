//! Outbound federation: one worker per peer drains that peer's queue, in
//! order, in batches, retrying with exponential backoff and jitter.
//!
//! Invariant: an item leaves the queue only after the peer answered for it
//! (stored, duplicate or refused), so a crash on either side can repeat a
//! batch but never lose or reorder one; the peer deduplicates repeats.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::{FederationBatch, FederationBatchResponse, FederationItem, ItemResult};
use rand::Rng;
use tokio::sync::Notify;

use crate::config::PeerConfig;
use crate::store::{Sent, Store};
use crate::{now_ms, Shared};

/// Largest total body size packed into one federation batch.
pub(crate) const BATCH_MAX_BYTES: usize = 4 * 1024 * 1024;

/// The error code of a peer's error answer, if its first 4 KiB are one.
async fn error_code(mut resp: reqwest::Response) -> Option<proto::ErrorCode> {
    let mut buf = Vec::new();
    while buf.len() < 4096 {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    serde_json::from_slice::<proto::ApiError>(&buf)
        .ok()
        .map(|e| e.error)
}

/// Whether the peer answered that it could not read the batch (`400` with
/// its code `malformed_request`; a bare `400`, from a proxy say, is not
/// that).
fn is_unreadable(status: u16, code: Option<proto::ErrorCode>) -> bool {
    status == 400 && code == Some(proto::ErrorCode::MalformedRequest)
}

/// An error code as it is on the wire (`insufficient_storage`).
fn code_name(c: proto::ErrorCode) -> String {
    serde_json::to_string(&c)
        .map(|s| s.trim_matches('"').to_owned())
        .unwrap_or_else(|_| format!("{c:?}"))
}

/// Why a batch could not be handed over (the batch stays queued).
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The request may have reached the peer (its answer did not come).
    #[error("{0}")]
    Http(String),
    /// No connection could be made: nothing reached the peer.
    #[error("{0}")]
    Unreached(String),
    /// With the error code of the peer's answer, when it gave one (only
    /// the code: the answer's text is the peer's, and is not logged).
    #[error("peer answered HTTP {0}{code}", code = .1.map(|c| format!(" ({})", code_name(c))).unwrap_or_default())]
    Status(u16, Option<proto::ErrorCode>),
    #[error("peer asked us to slow down")]
    RateLimited(Option<Duration>),
    #[error("peer's answer does not match the batch: {0}")]
    BadAnswer(String),
}

impl SendError {
    /// Whether the batch may have reached the peer, and been stored, though
    /// no answer says so.
    fn may_have_arrived(&self) -> bool {
        match self {
            SendError::Http(_) | SendError::BadAnswer(_) => true,
            // A server error may come after the batch was committed (an
            // fsync that failed after COMMIT, a proxy that timed out);
            // `503` and `507` are the peer's word that nothing was stored.
            SendError::Status(status, code) => {
                let nothing_stored = matches!(
                    (status, code),
                    (503, Some(proto::ErrorCode::Unavailable))
                        | (507, Some(proto::ErrorCode::InsufficientStorage))
                );
                *status >= 500 && !nothing_stored
            }
            SendError::Unreached(_) | SendError::RateLimited(_) => false,
        }
    }
}

fn describe(e: &reqwest::Error) -> String {
    // reqwest's Display hides the cause; walk the chain for the TLS or socket error.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// A batch sent behind others that are still on the wire carries at least
/// this many new items (unless a backlog is draining): on a fast link, many
/// tiny batches would cost more than they save.
const PIPELINE_MIN_ITEMS: u64 = 8;

/// How the gateway tells a peer's worker that items were queued for it.
#[derive(Debug, Default)]
pub(crate) struct PeerWake {
    notify: Notify,
    /// Items queued since start (approximately: each wake counts one).
    queued: AtomicU64,
    /// Since when, and why, the peer has been failing; `None` while its
    /// last answer was a success (or nothing was sent yet).
    failing: std::sync::Mutex<Option<proto::Waiting>>,
}

impl PeerWake {
    /// Says one more item is queued.
    pub(crate) fn wake(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Since when, and why, the peer has been failing, if it is.
    pub(crate) fn failing(&self) -> Option<proto::Waiting> {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records an answer: a failure keeps the time of the first one in a row.
    fn record(&self, outcome: Result<(), &SendError>, now_ms: u64) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        *failing = match outcome {
            Ok(()) => None,
            Err(e) => Some(proto::Waiting {
                since_ms: failing.as_ref().map_or(now_ms, |f| f.since_ms),
                last_error: e.to_string(),
            }),
        };
    }
}

/// One batch on the wire: its items' queue positions and the request.
struct InFlight {
    seqs: Vec<i64>,
    /// Whether each item is a message (not a status update).
    messages: Vec<bool>,
    request: tokio::task::JoinHandle<Answer>,
}

/// What a request came back with, when (ms since the epoch), and whether
/// the peer takes framed batches.
type Answer = (Result<Answered, SendError>, u64, bool);

/// A peer's answer to a batch, and whether it confirmed taking the batch in
/// session order.
struct Answered {
    response: FederationBatchResponse,
    ordered: bool,
    /// A refusal made here from the peer's error answer to a lone item (too
    /// large, or unreadable): the peer took nothing, so the batch's number
    /// in its session was not used (see `peer_worker`).
    not_taken: bool,
}

/// Runs one peer's worker until shutdown.
///
/// Batches are pipelined: up to `delivery.batches_in_flight` requests are on
/// the wire at once, numbered within a session so the peer stores them in
/// order ([`crate::sequencer`]). Until the peer confirms it does that, one
/// batch at a time. Answers are taken in order; the first failure drops the
/// batches behind it, and a new session starts from the last answered item.
///
/// `stop` turns true when the gateway shuts down or a reload takes the peer
/// out (or moves it to another address).
pub(crate) async fn peer_worker(
    shared: Arc<Shared>,
    peer: PeerConfig,
    wake: Arc<PeerWake>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let delivery = shared.config.delivery.clone();
    let base: Arc<str> = peer.url.trim_end_matches('/').into();
    // Framed batches carry bodies raw; a peer that predates them answers 404
    // and is sent JSON from then on.
    let mut framed = true;
    // Whether the peer confirmed it stores pipelined batches in order.
    let mut ordered = false;
    let mut backoff = delivery.retry_initial;
    let mut last_error: Option<String> = None;
    // Highest queue position the peer has answered for. Items up to it are
    // being removed from the queue by `recording`; after a failure to record
    // (or a restart) the cursor goes back to 0 and the peer deduplicates.
    let mut cursor: i64 = 0;
    // Highest queue position sent (answered or on the wire).
    let mut sent_up_to: i64 = 0;
    let mut session: u64 = rand::random();
    let mut next_batch: u64 = 1;
    let mut in_flight: std::collections::VecDeque<InFlight> = Default::default();
    // Whether the last read of the queue left items behind, and the wake
    // count when it was made.
    let mut backlog = false;
    let mut seen = 0u64;
    let record_failed = Arc::new(AtomicBool::new(false));
    let mut recording: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_expiry = tokio::time::Instant::now() - Duration::from_secs(60);
    // Items up to this queue position may have reached the peer without
    // its answer reaching this worker (a request cut off, a recording that
    // failed, or a batch sent before a restart): the peer may have stored
    // them, so their validity running out does not return them to their
    // senders while the peer may yet answer (a repeat is answered as a
    // duplicate, an expired new one refused), only a day later.
    // After a batch the peer found too large, or could not read, its items
    // go one at a time (up to this queue position), so that only the one at
    // fault is refused.
    let mut one_by_one_until: i64 = 0;
    // Whether the peer took an item from this worker since its last failure
    // other than an unreadable item (see `is_unreadable`).
    let mut reads_others = false;
    // (Read again after a failure: taken as the whole queue, it would hold
    // every message for a day past its validity for this worker's life.)
    let mut uncertain_up_to = loop {
        match shared.store.queue_end(peer.area.clone()).await {
            Ok(end) => break end,
            Err(e) => {
                let wait = jitter(backoff);
                backoff = (backoff * 2).min(delivery.retry_max);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "reading the peer's queue failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::stopped(&mut stop) => return,
                }
            }
        }
    };
    backoff = delivery.retry_initial;
    loop {
        if *stop.borrow() {
            break;
        }
        if record_failed.swap(false, Ordering::SeqCst) {
            abandon(&mut in_flight);
            uncertain_up_to = uncertain_up_to.max(sent_up_to);
            cursor = 0;
            sent_up_to = 0;
            (session, next_batch) = (rand::random(), 1);
            // The store could not record what the peer took: wait before
            // sending it all again.
            let wait = jitter(backoff);
            backoff = (backoff * 2).min(delivery.retry_max);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = crate::stopped(&mut stop) => break,
            }
        }
        if last_expiry.elapsed() >= Duration::from_secs(1) {
            last_expiry = tokio::time::Instant::now();
            expire(
                &shared,
                &peer,
                sent_up_to,
                uncertain_up_to,
                last_error.as_deref(),
            )
            .await;
        }
        // Fill the window.
        let window = if ordered {
            delivery.batches_in_flight
        } else {
            1
        };
        while in_flight.len() < window {
            // Behind a batch on the wire, send another only for a backlog
            // or enough new items; otherwise wait for the answer.
            let queued = wake.queued.load(Ordering::Relaxed);
            if !in_flight.is_empty() && !backlog && queued.wrapping_sub(seen) < PIPELINE_MIN_ITEMS {
                break;
            }
            seen = queued;
            // Taken per batch: rebuilt when the revocation lists change.
            let Some((client, _)) = shared.peer_clients.get(&peer.area) else {
                tracing::error!("no HTTP client for this peer");
                break;
            };
            let one_by_one = sent_up_to < one_by_one_until;
            if one_by_one && !in_flight.is_empty() {
                break;
            }
            let Some((batch, more)) = next_items(&shared, &peer, sent_up_to, one_by_one).await
            else {
                backlog = false;
                break;
            };
            backlog = more;
            let seqs: Vec<i64> = batch.iter().map(|q| q.seq).collect();
            let messages = batch
                .iter()
                .map(|q| matches!(q.item, proto::FederationItem::Deliver { .. }))
                .collect();
            sent_up_to = seqs.last().copied().unwrap_or(sent_up_to);
            if !in_flight.is_empty() {
                shared.metrics.federation_batches_pipelined.inc();
            }
            let order = (session, next_batch);
            next_batch += 1;
            let base = base.clone();
            let request = tokio::spawn(async move {
                let mut framed = framed;
                let answer = send(&client, &base, &mut framed, order, &batch).await;
                // When the items were delivered, however long the worker
                // takes to get to the answer.
                (answer, now_ms(), framed)
            });
            in_flight.push_back(InFlight {
                seqs,
                messages,
                request,
            });
        }
        let room = in_flight.len() < window;
        let Some(front) = in_flight.front_mut() else {
            tokio::select! {
                _ = wake.notify.notified() => {}
                // A second with nothing to send: the peer confirms its
                // ordering again with the next answer before batches are
                // pipelined (it may have been replaced by an older version
                // meanwhile, and no request failed to say so).
                // (And whether it reads this gateway's items, likewise.)
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    ordered = false;
                    reads_others = false;
                }
                _ = crate::stopped(&mut stop) => break,
            }
            continue;
        };
        let (answer, answered_at, now_framed) = tokio::select! {
            a = &mut front.request => match a {
                Ok(a) => a,
                Err(e) => (Err(SendError::Http(format!("request task failed: {e}"))), now_ms(), framed),
            },
            // New items can go out while earlier batches are on the wire.
            _ = wake.notify.notified(), if room => continue,
            _ = crate::stopped(&mut stop) => break,
        };
        // A peer that stopped taking framed batches was replaced by an older
        // version: what it reads is to be seen again.
        if framed && !now_framed {
            reads_others = false;
        }
        framed = now_framed;
        let Some(done) = in_flight.pop_front() else {
            continue;
        };
        // A lone item the peer cannot read (a gateway of another version,
        // say), answered `400 malformed_request` while the peer reads
        // others: refused (its sender is told), not retried for ever with
        // the queue behind it. Without that evidence (after a restart or an
        // outage, say) the fault may be every item's, and all wait.
        // (Nor one the peer may hold already: sent before, unanswered.)
        let lone = done.seqs.first().filter(|_| done.seqs.len() == 1).copied();
        let answer = match answer {
            Err(SendError::Status(status, code))
                if is_unreadable(status, code)
                    && reads_others
                    && lone.is_some_and(|seq| seq > uncertain_up_to) =>
            {
                Ok(Answered {
                    response: FederationBatchResponse {
                        results: vec![ItemResult::Rejected {
                            code: proto::ErrorCode::MalformedRequest,
                            reason: "the receiving gateway could not read it (it may run another version)".into(),
                        }],
                    },
                    ordered: false,
                    not_taken: true,
                })
            }
            other => other,
        };
        match answer {
            Ok(answered) => {
                ordered = answered.ordered;
                if answered.not_taken {
                    // The peer never queued this batch: the next would wait
                    // there for it in vain. A new session starts after it,
                    // and whatever was sent behind it goes again there.
                    if !in_flight.is_empty() {
                        abandon(&mut in_flight);
                        uncertain_up_to = uncertain_up_to.max(sent_up_to);
                    }
                    sent_up_to = done.seqs.last().copied().unwrap_or(sent_up_to);
                    (session, next_batch) = (rand::random(), 1);
                }
                reads_others |= answered
                    .response
                    .results
                    .iter()
                    .any(|r| matches!(r, ItemResult::Stored | ItemResult::Duplicate));
                backoff = delivery.retry_initial;
                if last_error.take().is_some() {
                    tracing::info!("peer reachable again");
                }
                wake.record(Ok(()), answered_at);
                let mut verdicts = Vec::with_capacity(done.seqs.len());
                let results = done.seqs.iter().zip(&done.messages);
                for ((seq, message), r) in results.zip(answered.response.results) {
                    cursor = cursor.max(*seq);
                    verdicts.push((
                        *seq,
                        match r {
                            ItemResult::Stored | ItemResult::Duplicate => Sent::Accepted,
                            ItemResult::Rejected { code, reason } => {
                                // The reason is the peer's text (it may
                                // name people): its sender reads it, the
                                // log gets the code.
                                tracing::warn!(?code, "peer refused an item");
                                // A refused status update is no message
                                // gone back to its sender.
                                if *message {
                                    shared.metrics.undeliverable.inc();
                                }
                                Sent::Refused(reason)
                            }
                        },
                    ));
                }
                shared
                    .metrics
                    .federation_items_sent
                    .add(verdicts.len() as u64);
                shared.metrics.federation_batches_sent.inc();
                // Record while the next batches are on their way; one recording at a time.
                if let Some(h) = recording.take() {
                    let _ = h.await;
                }
                let (shared2, area, failed) =
                    (shared.clone(), peer.area.clone(), record_failed.clone());
                recording = Some(tokio::spawn(async move {
                    if let Err(e) = shared2.store.sent(area, verdicts, answered_at).await {
                        tracing::error!(error = %e, "recording a delivered batch failed; it will be resent and deduplicated");
                        failed.store(true, Ordering::SeqCst);
                    }
                }));
            }
            Err(e) => {
                // The batches behind this one may or may not reach the peer;
                // start again from the last answer (the peer deduplicates).
                let cut_off = !in_flight.is_empty();
                // Too large, or unreadable, for the peer: one at a time, so
                // that only the item at fault is refused.
                let one_item_at_fault = match &e {
                    SendError::Status(status, code) => {
                        *status == 413 || is_unreadable(*status, *code)
                    }
                    _ => false,
                };
                if one_item_at_fault {
                    one_by_one_until = done.seqs.last().copied().unwrap_or(0);
                }
                if !matches!(&e, SendError::Status(status, code) if is_unreadable(*status, *code)) {
                    reads_others = false;
                }
                abandon(&mut in_flight);
                if cut_off || e.may_have_arrived() {
                    uncertain_up_to = uncertain_up_to.max(sent_up_to);
                }
                sent_up_to = cursor;
                (session, next_batch) = (rand::random(), 1);
                ordered = false;
                shared.metrics.federation_failures.inc();
                let mut wait = jitter(backoff);
                backoff = (backoff * 2).min(delivery.retry_max);
                // A peer asking to slow down is waited for as long as it
                // asks, within the retry bounds (so that expiry still runs).
                if let SendError::RateLimited(Some(after)) = &e {
                    wait = (*after).clamp(delivery.retry_initial, delivery.retry_max);
                }
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, queued = done.seqs.len(), "federation send failed");
                last_error = Some(e.to_string());
                wake.record(Err(&e), answered_at);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::stopped(&mut stop) => break,
                }
            }
        }
    }
    abandon(&mut in_flight);
    if let Some(h) = recording.take() {
        let _ = h.await;
    }
}

/// Drops the batches on the wire (the peer may still store them; a later
/// session's repeats are deduplicated).
fn abandon(in_flight: &mut std::collections::VecDeque<InFlight>) {
    for f in in_flight.drain(..) {
        f.request.abort();
    }
}

/// How long after its validity an item that may have reached the peer
/// unanswered is returned to its sender, if the peer does not answer.
const UNCERTAIN_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Returns to their senders the items past `after` whose validity ran out;
/// those up to `uncertain_up_to` (they may have reached the peer) only
/// [`UNCERTAIN_GRACE`] later.
async fn expire(
    shared: &Shared,
    peer: &PeerConfig,
    after: i64,
    uncertain_up_to: i64,
    last_error: Option<&str>,
) {
    let validity = humantime::format_duration(shared.config.delivery.message_validity);
    let last_error = last_error
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default();
    let now = now_ms();
    let grace = UNCERTAIN_GRACE.as_millis() as u64;
    let passes = [
        (
            (after.max(uncertain_up_to), i64::MAX),
            now,
            format!("not delivered to {} within its validity of {validity}{last_error}", peer.area),
        ),
        (
            (after, uncertain_up_to),
            now.saturating_sub(grace),
            format!(
                "not confirmed by {} within its validity of {validity} and a day more; it was sent, so {} may have it{last_error}",
                peer.area, peer.area
            ),
        ),
    ];
    for (seqs, expired_by, reason) in passes {
        if seqs.0 >= seqs.1 {
            continue;
        }
        match shared
            .store
            .expire(peer.area.clone(), seqs, expired_by, now, reason)
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                shared.metrics.undeliverable.add(n as u64);
                tracing::warn!(
                    count = n,
                    "messages expired undelivered; their senders are told"
                );
            }
            Err(e) => tracing::error!(error = %e, "expiring messages failed"),
        }
    }
}

/// The next batch after queue position `after`: up to `batch_max_items`
/// items within the byte budget (at least one), and whether more items were
/// left behind; `None` if nothing waits.
async fn next_items(
    shared: &Shared,
    peer: &PeerConfig,
    after: i64,
    one_by_one: bool,
) -> Option<(Vec<crate::store::Queued>, bool)> {
    let max = if one_by_one {
        1
    } else {
        shared.config.delivery.batch_max_items
    };
    let mut batch = match shared.store.queued(peer.area.clone(), after, max).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "reading the queue failed");
            return None;
        }
    };
    let mut size = 0;
    let mut take = 0;
    for q in &batch {
        if let FederationItem::Deliver { body, .. } = &q.item {
            size += body.len();
        }
        if take > 0 && size > BATCH_MAX_BYTES {
            break;
        }
        take += 1;
    }
    let more = take < batch.len() || batch.len() >= max;
    batch.truncate(take);
    (!batch.is_empty()).then_some((batch, more))
}

/// Full jitter between half and all of `d`.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis().max(1) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    framed: &mut bool,
    (session, number): (u64, u64),
    batch: &[crate::store::Queued],
) -> Result<Answered, SendError> {
    let n = batch.len();
    let post = |framed: bool| {
        let req = if framed {
            client
                .post(format!("{base}/v1/federation/frames"))
                .header(reqwest::header::CONTENT_TYPE, proto::frame::FRAMED)
                .body(proto::frame::encode_items(batch.iter().map(|q| &q.item)))
        } else {
            client
                .post(format!("{base}/v1/federation/batch"))
                .json(&FederationBatch {
                    items: batch.iter().map(|q| q.item.clone()).collect(),
                })
        };
        let req = req
            .header(proto::frame::SESSION_HEADER, session)
            .header(proto::frame::BATCH_HEADER, number);
        async move {
            req.send().await.map_err(|e| {
                if e.is_connect() {
                    SendError::Unreached(describe(&e))
                } else {
                    SendError::Http(describe(&e))
                }
            })
        }
    };
    let mut resp = post(*framed).await?;
    if *framed && resp.status() == reqwest::StatusCode::NOT_FOUND {
        tracing::info!("peer does not accept framed batches; sending JSON");
        *framed = false;
        resp = post(false).await?;
    }
    let status = resp.status();
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        let after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(SendError::RateLimited(after));
    }
    // A lone item larger than the peer takes in a request: refused (its
    // sender is told), not retried for ever with the queue behind it.
    if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE && n == 1 {
        return Ok(Answered {
            response: FederationBatchResponse {
                results: vec![ItemResult::Rejected {
                    code: proto::ErrorCode::PayloadTooLarge,
                    reason: "it is larger than the receiving gateway takes".into(),
                }],
            },
            ordered: false,
            not_taken: true,
        });
    }
    if !status.is_success() {
        return Err(SendError::Status(status.as_u16(), error_code(resp).await));
    }
    let ordered = resp
        .headers()
        .get(proto::frame::ORDERED_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    // The answer's size is bounded: a result's reason is short.
    let budget = 64 * 1024 + n.saturating_mul(4096);
    let text = read_bounded(resp, budget)
        .await
        .map_err(|e| SendError::BadAnswer(e.to_string()))?;
    let answer: FederationBatchResponse =
        serde_json::from_slice(&text).map_err(|e| SendError::BadAnswer(e.to_string()))?;
    if answer.results.len() != n {
        return Err(SendError::BadAnswer(format!(
            "{} results for {n} items",
            answer.results.len()
        )));
    }
    Ok(Answered {
        response: answer,
        ordered,
        not_taken: false,
    })
}

/// Why an answer's body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The peer sent more than is taken.
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    /// The connection failed or timed out while the body came.
    #[error("{0}")]
    Transport(String),
}

/// An answer's body, refused once it grows past `max` bytes (a peer's
/// answer is read no further than that).
pub(crate) async fn read_bounded(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ReadError::Transport(describe(&e)))?
    {
        if body.len() + chunk.len() > max {
            return Err(ReadError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests;
