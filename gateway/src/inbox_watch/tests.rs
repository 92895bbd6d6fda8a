//! Tests of the per-recipient long-poll wake-ups.

use super::*;
use proto::{Target, TeamId, UserId};

fn mailbox(user: &str, teams: &[&str]) -> Mailbox {
    Mailbox {
        user: UserId::new(user).unwrap(),
        teams: teams.iter().map(|t| TeamId::new(*t).unwrap()).collect(),
    }
}

fn user(u: &str) -> Target {
    Target::User(UserId::new(u).unwrap())
}

#[test]
fn a_message_wakes_only_the_mailboxes_it_is_for() {
    let watch = InboxWatch::default();
    let (mut dan, mut erin, mut gita) = (
        watch.waiter(&mailbox("dan", &["duty"])),
        watch.waiter(&mailbox("erin", &["duty", "leads"])),
        watch.waiter(&mailbox("gita", &[])),
    );
    for w in [&mut dan, &mut erin, &mut gita] {
        w.mark_seen();
        assert!(!w.has_news());
    }
    watch.changed([&user("dan")]);
    assert!(dan.has_news());
    assert!(!erin.has_news() && !gita.has_news());
    dan.mark_seen();
    assert!(!dan.has_news());
    // A team's message: every member's long-poll, no one else's.
    watch.changed([&Target::Team(TeamId::new("duty").unwrap())]);
    assert!(dan.has_news() && erin.has_news());
    assert!(!gita.has_news());
    // Someone with no waiter, and a batch for several: only theirs.
    for w in [&mut dan, &mut erin] {
        w.mark_seen();
    }
    watch.changed([&user("frank"), &user("gita")]);
    assert!(gita.has_news());
    assert!(!dan.has_news() && !erin.has_news());
    // One channel per recipient ever seen, not one per waiter or message.
    let later = watch.waiter(&mailbox("dan", &["duty"]));
    assert!(!later.has_news(), "a new waiter starts with nothing to see");
    // dan, duty, erin, leads, gita, frank.
    assert_eq!(watch.lock().len(), 6);
}

#[tokio::test]
async fn a_waiting_long_poll_wakes_for_its_own_message_only() {
    let watch = std::sync::Arc::new(InboxWatch::default());
    let mut dan = watch.waiter(&mailbox("dan", &["duty"]));
    dan.mark_seen();
    let woken = tokio::spawn(async move { dan.wait().await });
    tokio::task::yield_now().await;
    watch.changed([&user("gita")]);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!woken.is_finished(), "woken by someone else's message");
    watch.changed([&Target::Team(TeamId::new("duty").unwrap())]);
    tokio::time::timeout(std::time::Duration::from_secs(10), woken)
        .await
        .expect("not woken by a message for its team")
        .unwrap();
}

#[tokio::test]
async fn a_message_stored_between_listing_and_waiting_is_not_missed() {
    let watch = InboxWatch::default();
    let mut erin = watch.waiter(&mailbox("erin", &["duty"]));
    erin.mark_seen();
    // Stored after the listing was read, before the long-poll waits.
    watch.changed([&Target::Team(TeamId::new("duty").unwrap())]);
    tokio::time::timeout(std::time::Duration::from_secs(10), erin.wait())
        .await
        .unwrap();
}

#[test]
fn one_user_has_a_few_long_polls_waiting_at_most() {
    let slots = PollSlots::default();
    let dan = UserId::new("dan").unwrap();
    let held: Vec<PollSlot> = (0..POLLS_PER_USER)
        .map(|_| slots.take(&dan).unwrap())
        .collect();
    assert!(slots.take(&dan).is_none(), "one too many");
    // Another user is not held back by dan's.
    let erin = slots.take(&UserId::new("erin").unwrap());
    assert!(erin.is_some());
    // A finished long-poll gives its slot back.
    drop(held);
    assert!(slots.take(&dan).is_some());
}
