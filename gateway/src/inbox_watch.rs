//! Which long-polls a stored message wakes: one channel per recipient here
//! (a user or a team), made when first used, so at most one per directory
//! entry. A waiting long-poll holds receivers for its user and teams only,
//! so a message wakes its recipients' long-polls and leaves every other
//! waiting one asleep (before, every stored batch woke every waiting
//! long-poll to compare counters).

use std::collections::HashMap;

use tokio::sync::watch;

use crate::store::Mailbox;

/// The per-recipient channels; each one's value counts the times a message
/// for that recipient was stored.
#[derive(Debug, Default)]
pub(crate) struct InboxWatch(std::sync::Mutex<HashMap<proto::Target, watch::Sender<u64>>>);

impl InboxWatch {
    /// Records that messages for these recipients were stored, waking the
    /// long-polls of their mailboxes.
    pub(crate) fn changed<'a>(&self, targets: impl IntoIterator<Item = &'a proto::Target>) {
        let mut map = self.lock();
        for t in targets {
            channel(&mut map, t).send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A waiter for a mailbox: a message stored for its user or any of its
    /// teams from now on wakes it.
    pub(crate) fn waiter(&self, mb: &Mailbox) -> Waiter {
        let mut map = self.lock();
        let first = channel(&mut map, &proto::Target::User(mb.user.clone())).subscribe();
        let teams = mb
            .teams
            .iter()
            .map(|t| channel(&mut map, &proto::Target::Team(t.clone())).subscribe())
            .collect();
        Waiter { first, teams }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<proto::Target, watch::Sender<u64>>> {
        // A map of channels: a panic elsewhere cannot leave it torn.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A recipient's channel, made on first use.
fn channel<'m>(
    map: &'m mut HashMap<proto::Target, watch::Sender<u64>>,
    t: &proto::Target,
) -> &'m watch::Sender<u64> {
    map.entry(t.clone()).or_insert_with(|| watch::channel(0).0)
}

/// A long-poll's receivers: its user's and its teams'.
#[derive(Debug)]
pub(crate) struct Waiter {
    first: watch::Receiver<u64>,
    teams: Vec<watch::Receiver<u64>>,
}

impl Waiter {
    /// Marks everything stored so far as seen: call before listing, so a
    /// message stored meanwhile still wakes [`Waiter::wait`].
    pub(crate) fn mark_seen(&mut self) {
        self.first.borrow_and_update();
        for t in &mut self.teams {
            t.borrow_and_update();
        }
    }

    /// Whether a message for this mailbox was stored since it was last
    /// marked seen.
    #[cfg(test)]
    pub(crate) fn has_news(&self) -> bool {
        std::iter::once(&self.first)
            .chain(&self.teams)
            .any(|r| r.has_changed().unwrap_or(true))
    }

    /// Waits until a message for this mailbox is stored after the last
    /// [`Waiter::mark_seen`].
    pub(crate) async fn wait(&mut self) {
        let all = std::iter::once(&mut self.first).chain(&mut self.teams);
        // Never empty: the user's own receiver is always there.
        let changes = all.map(|r| Box::pin(r.changed()));
        // The senders live as long as the gateway: an error means it is
        // going away, and waking is then right too.
        let _ = futures::future::select_all(changes).await;
    }
}

#[cfg(test)]
mod tests;

/// How many long-polls one user may have waiting at once: a client waits
/// with one; a few allow for terminals and scripts. Past that a listing is
/// answered at once, so one user cannot hold an unbounded number of waiting
/// requests (each woken, and listing again, by every message for her).
pub(crate) const POLLS_PER_USER: usize = 8;

/// The long-polls waiting per user.
#[derive(Debug, Default)]
pub(crate) struct PollSlots(std::sync::Arc<std::sync::Mutex<HashMap<proto::UserId, usize>>>);

impl PollSlots {
    /// A slot for one more waiting long-poll of `user`, if she has fewer
    /// than [`POLLS_PER_USER`]; held until dropped.
    pub(crate) fn take(&self, user: &proto::UserId) -> Option<PollSlot> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(user.clone()).or_default();
        if *n >= POLLS_PER_USER {
            return None;
        }
        *n += 1;
        Some(PollSlot {
            slots: self.0.clone(),
            user: user.clone(),
        })
    }
}

/// One waiting long-poll's slot (see [`PollSlots::take`]).
#[derive(Debug)]
pub(crate) struct PollSlot {
    slots: std::sync::Arc<std::sync::Mutex<HashMap<proto::UserId, usize>>>,
    user: proto::UserId,
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        let mut map = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}
