//! The newest queued federation items of each peer, kept in memory, so the
//! federation worker takes fresh items without a database read.
//!
//! A job that queues an item *stages* it here while it runs; the writer
//! hands the group's staged effects to the sync thread, which applies them
//! once the group is on disk, before anyone is answered. Groups are applied
//! in commit order, so a peer's items arrive in queue order, and only
//! durable items are ever served.
//!
//! A tail may serve a read only when it is known to hold *every* item after
//! some position (`Valid { from }`). It gets there from a database read: the
//! tail starts collecting *before* the read takes its snapshot, so every
//! item is either in the snapshot (committed before it) or applied here
//! afterwards (committed after it). If that read found the queue's end, the
//! tail holds everything after the last item it returned. Anything the tail
//! cannot follow (a deleted row, a full tail, an item out of order) turns it
//! off, and reads go to the database until one finds the end again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use proto::{AreaId, FederationItem};

use super::Queued;

/// Bytes of bodies a peer's tail holds at most; beyond, it turns off (a
/// peer that is away builds a backlog, read from the database as before).
const MAX_BYTES: usize = 32 * 1024 * 1024;

/// Items a peer's tail holds at most (status updates carry no body).
const MAX_ITEMS: usize = 65_536;

/// A change to the tails, staged by a job and applied once its group is
/// durable.
#[derive(Debug)]
pub(crate) enum Effect {
    /// An item was queued for the peer.
    Push(AreaId, Queued),
    /// The peer's queue changed in a way the tail does not follow.
    Forget(AreaId),
}

/// Every peer's tail, and the effects staged by the running group.
#[derive(Debug, Default)]
pub(crate) struct Tails {
    peers: Mutex<HashMap<AreaId, Tail>>,
    staged: Mutex<Vec<Effect>>,
}

#[derive(Debug, Default)]
struct Tail {
    /// Counts the times the tail was turned off: a read that began
    /// collecting before the latest of them proves nothing.
    epoch: u64,
    state: State,
    /// Items, in queue order.
    items: VecDeque<Queued>,
    bytes: usize,
    /// The highest position the peer has answered for: items up to it are
    /// dropped, and never served again.
    answered: i64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not collecting.
    #[default]
    Off,
    /// Collecting; not yet known to be complete.
    Collecting,
    /// Holds every item after `from`.
    Valid { from: i64 },
}

fn body_bytes(q: &Queued) -> usize {
    match &q.item {
        FederationItem::Deliver { body, .. } => body.len(),
        _ => 0,
    }
}

impl Tail {
    fn turn_off(&mut self) {
        self.epoch += 1;
        self.state = State::Off;
        self.items.clear();
        self.bytes = 0;
    }

    fn push(&mut self, q: Queued) {
        match self.state {
            State::Off => return,
            State::Valid { from } if q.seq <= from => return,
            _ => {}
        }
        if self.items.back().is_some_and(|last| last.seq >= q.seq) {
            // Not in queue order: nothing is assumed.
            self.turn_off();
            return;
        }
        self.bytes += body_bytes(&q);
        self.items.push_back(q);
        if self.bytes > MAX_BYTES || self.items.len() > MAX_ITEMS {
            self.turn_off();
        }
    }

    /// Drops the items up to `seq`.
    fn drop_through(&mut self, seq: i64) {
        while let Some(q) = self.items.pop_front_if(|q| q.seq <= seq) {
            self.bytes -= body_bytes(&q);
        }
    }
}

impl Tails {
    fn peers(&self) -> MutexGuard<'_, HashMap<AreaId, Tail>> {
        // Every mutation leaves a consistent state (or an `Off` tail).
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn staged(&self) -> MutexGuard<'_, Vec<Effect>> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stages an effect of the running job.
    pub(crate) fn stage(&self, effect: Effect) {
        self.staged().push(effect);
    }

    /// Takes the running group's staged effects (at its COMMIT).
    pub(crate) fn take_staged(&self) -> Vec<Effect> {
        std::mem::take(&mut *self.staged())
    }

    /// How many effects the running group has staged.
    pub(crate) fn staged_len(&self) -> usize {
        self.staged().len()
    }

    /// Drops the effects staged after the first `n` (a job was undone).
    pub(crate) fn truncate_staged(&self, n: usize) {
        self.staged().truncate(n);
    }

    /// Drops the running group's staged effects (it was rolled back).
    pub(crate) fn discard_staged(&self) {
        self.staged().clear();
    }

    /// Applies a durable group's effects, in order.
    pub(crate) fn apply(&self, effects: Vec<Effect>) {
        let mut peers = self.peers();
        for effect in effects {
            match effect {
                Effect::Push(peer, q) => {
                    if let Some(tail) = peers.get_mut(&peer) {
                        tail.push(q);
                    }
                }
                Effect::Forget(peer) => {
                    if let Some(tail) = peers.get_mut(&peer) {
                        tail.turn_off();
                    }
                }
            }
        }
    }

    /// The peer's items after `after` (at most `max`), if the tail holds
    /// every one of them.
    pub(crate) fn serve(&self, peer: &AreaId, after: i64, max: usize) -> Option<Vec<Queued>> {
        let peers = self.peers();
        let tail = peers.get(peer)?;
        let State::Valid { from } = tail.state else {
            return None;
        };
        if after < from {
            return None;
        }
        Some(
            tail.items
                .iter()
                .filter(|q| q.seq > after)
                .take(max)
                .cloned()
                .collect(),
        )
    }

    /// Starts collecting the peer's items, before a database read takes
    /// its snapshot; returns the epoch to hand to [`Tails::found_end`].
    pub(crate) fn collect(&self, peer: &AreaId) -> u64 {
        let mut peers = self.peers();
        let tail = peers.entry(peer.clone()).or_default();
        if tail.state == State::Off {
            tail.state = State::Collecting;
        }
        tail.epoch
    }

    /// A read that began collecting at `epoch` found the end of the peer's
    /// queue after `last`: the tail now holds every item after it, unless
    /// it was turned off since.
    pub(crate) fn found_end(&self, peer: &AreaId, epoch: u64, last: i64) {
        let mut peers = self.peers();
        let Some(tail) = peers.get_mut(peer) else {
            return;
        };
        if tail.epoch != epoch {
            return;
        }
        let from = match tail.state {
            State::Off => return,
            State::Collecting => last,
            State::Valid { from } => from.min(last),
        }
        .max(tail.answered);
        tail.state = State::Valid { from };
        tail.drop_through(from);
    }

    /// The peer has answered for its items up to `seq`: they are not sent
    /// again from here.
    pub(crate) fn answered(&self, peer: &AreaId, seq: i64) {
        if let Some(tail) = self.peers().get_mut(peer) {
            tail.answered = tail.answered.max(seq);
            tail.drop_through(seq);
            if let State::Valid { from } = tail.state {
                tail.state = State::Valid {
                    from: from.max(seq),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests;
