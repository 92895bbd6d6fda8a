//! Ordered intake of pipelined federation batches.
//!
//! A peer may have several batches on the wire at once (see
//! [`crate::federation`]). They travel on different connections, so they can
//! arrive in any order; this module makes them enter the store's queue in
//! the order the peer numbered them. Each of the peer's sending sessions
//! numbers its batches 1, 2, 3, …; batch `k` of a session waits until batch
//! `k − 1` of that session is in the store's queue (not until it is on
//! disk: consecutive batches then share group commits and fsyncs).
//!
//! Invariant: the store runs its queue in order and stores a batch only if
//! it directly follows the last stored batch of its session, checked in the
//! batch's own transaction ([`crate::store::Store::queue_batch`]); a
//! session's first batch starts where the peer's answered items end. So the
//! items a peer hands over are stored in its order, whatever the network
//! does. A batch that fails (or whose request is dropped before it is
//! queued) breaks its session: later batches of that session are refused
//! rather than stored past a gap, here or by the store's check, and the peer
//! starts a new session from its last answered item (repeats are
//! deduplicated by the store). This module only saves those refusals in the
//! common case, where requests merely overtake each other.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::AreaId;
use tokio::sync::Notify;

/// Sessions remembered per peer; older ones are forgotten (their late
/// batches then wait for a predecessor that never comes, and time out).
const SESSIONS_PER_PEER: usize = 8;

/// Why a batch may not enter the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OrderError {
    /// An earlier batch of the session failed or was abandoned.
    #[error("an earlier batch of this session failed; start a new session")]
    Broken,
    /// The batch number was already used in this session.
    #[error("batch {0} of this session was already handled; start a new session")]
    Repeated(u64),
    /// The batch number is further ahead than any sender pipelines.
    #[error("batch {0} of this session is too far ahead; start a new session")]
    TooFarAhead(u64),
    /// The earlier batch did not arrive in time.
    #[error("batch {0} of this session did not arrive in time; start a new session")]
    TimedOut(u64),
}

/// How far ahead of the next expected batch a batch may come: more than
/// any `delivery.batches_in_flight` (at most 64).
const MAX_AHEAD: u64 = 64;

#[derive(Debug)]
struct Session {
    /// The batch number allowed in next.
    next: u64,
    broken: bool,
    touched: Instant,
}

/// Per-peer, per-session turn-taking for incoming batches.
#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    sessions: Mutex<HashMap<AreaId, HashMap<u64, Session>>>,
    changed: Notify,
}

/// The right to queue one batch for storing; say how it went with [`Turn::done`].
/// Dropping a turn without that (a cancelled request) breaks the session.
#[derive(Debug)]
pub(crate) struct Turn<'a> {
    seq: &'a Sequencer,
    peer: AreaId,
    session: u64,
    batch: u64,
    finished: bool,
}

impl Sequencer {
    /// Waits (at most `patience`) until batch `batch` of `session` from
    /// `peer` may be queued for storing.
    pub(crate) async fn turn(
        &self,
        peer: &AreaId,
        session: u64,
        batch: u64,
        patience: Duration,
    ) -> Result<Turn<'_>, OrderError> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            // Register for wake-ups before looking, so none is missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.check(peer, session, batch)? {
                return Ok(Turn {
                    seq: self,
                    peer: peer.clone(),
                    session,
                    batch,
                    finished: false,
                });
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(OrderError::TimedOut(batch.saturating_sub(1)));
            }
        }
    }

    /// Remembers a session whose batches up to `last` are stored (from the
    /// store, at start), so that a peer's session goes on across a restart
    /// of this gateway instead of waiting for a batch that came before it.
    pub(crate) fn resume(&self, peer: &AreaId, session: u64, last: u64) {
        let mut all = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        session_entry(all.entry(peer.clone()).or_default(), session).next = last.saturating_add(1);
    }

    /// Whether it is this batch's turn (`Ok(false)`: not yet).
    fn check(&self, peer: &AreaId, session: u64, batch: u64) -> Result<bool, OrderError> {
        let mut all = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let s = session_entry(all.entry(peer.clone()).or_default(), session);
        if s.broken {
            Err(OrderError::Broken)
        } else if batch < s.next {
            Err(OrderError::Repeated(batch))
        } else if batch - s.next >= MAX_AHEAD {
            // It would wait, holding its items, for batches that no
            // sender has on the wire at once.
            Err(OrderError::TooFarAhead(batch))
        } else {
            Ok(batch == s.next)
        }
    }

    fn finish(&self, peer: &AreaId, session: u64, batch: u64, queued: bool) {
        {
            let mut all = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = all.get_mut(peer).and_then(|m| m.get_mut(&session)) {
                if queued && s.next == batch {
                    s.next = batch + 1;
                } else {
                    s.broken = true;
                }
            }
        }
        self.changed.notify_waiters();
    }
}

/// A peer's session, touched now; a new one starts at batch 1 and, when
/// the peer has [`SESSIONS_PER_PEER`] already, pushes out the one touched
/// longest ago.
fn session_entry(sessions: &mut HashMap<u64, Session>, session: u64) -> &mut Session {
    if !sessions.contains_key(&session) && sessions.len() >= SESSIONS_PER_PEER {
        let oldest = sessions
            .iter()
            .min_by_key(|(_, s)| s.touched)
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            sessions.remove(&id);
        }
    }
    let s = sessions.entry(session).or_insert(Session {
        next: 1,
        broken: false,
        touched: Instant::now(),
    });
    s.touched = Instant::now();
    s
}

impl Turn<'_> {
    /// Records whether the batch was queued for storing; lets the next one
    /// in (or, if not, refuses the rest of the session).
    pub(crate) fn done(mut self, queued: bool) {
        self.finished = true;
        self.seq
            .finish(&self.peer, self.session, self.batch, queued);
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.seq.finish(&self.peer, self.session, self.batch, false);
        }
    }
}

#[cfg(test)]
mod tests;
