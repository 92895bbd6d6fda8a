//! The happy paths: delivery, status travelling back, local delivery, long-poll.

use std::time::Duration;

use proto::{Status, Target};
use tests::{eventually, message, reaches, Federation};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_message_from_a_to_b_is_delivered_once_and_acknowledged() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let alice = fed.api(a, "alice").unwrap();
    let dan = fed.api(b, "dan").unwrap();
    let erin = fed.api(b, "erin").unwrap();

    let sent = alice
        .submit(&message("team:duty@southvale", "k-1", b"opaque ciphertext".to_vec()).unwrap())
        .await
        .unwrap();
    assert_eq!(sent.status, Status::Accepted);
    assert!(!sent.duplicate);

    // The whole team sees it; long-poll returns as soon as it arrives.
    let inbox = dan.inbox(Duration::from_secs(30)).await.unwrap();
    assert_eq!(inbox.messages.len(), 1);
    let env = &inbox.messages[0].envelope;
    assert_eq!(env.message_id, sent.message_id);
    assert_eq!(env.sender.user.as_str(), "alice");
    assert!(matches!(&env.recipient.target, Target::Team(t) if t.as_str() == "duty"));
    assert_eq!(erin.inbox(Duration::ZERO).await.unwrap().messages.len(), 1);

    let got = erin.fetch(&sent.message_id).await.unwrap();
    assert_eq!(got.body.0, b"opaque ciphertext");
    assert_eq!(got.envelope.content_hash, got.body.hash());
    assert!(
        reaches(
            &alice,
            &sent.message_id,
            Status::Fetched,
            Duration::from_secs(20)
        )
        .await
    );

    // The writer's bulk pass indexes it for the team before anyone
    // acknowledges it.
    let in_index = || async { fed.count(b, "SELECT COUNT(*) FROM mailbox").unwrap_or(0) == 1 };
    assert!(eventually(Duration::from_secs(20), in_index).await);
    assert_eq!(
        dan.ack(&sent.message_id).await.unwrap(),
        Status::Acknowledged
    );
    assert!(
        reaches(
            &alice,
            &sent.message_id,
            Status::Acknowledged,
            Duration::from_secs(20)
        )
        .await
    );
    let history: Vec<Status> = alice
        .status(&sent.message_id)
        .await
        .unwrap()
        .history
        .iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(
        history,
        [
            Status::Accepted,
            Status::Delivered,
            Status::Fetched,
            Status::Acknowledged
        ]
    );

    // Acknowledged messages leave every team member's inbox; stored exactly once.
    assert!(dan.inbox(Duration::ZERO).await.unwrap().messages.is_empty());
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 1);
    // Nor is it in the index of what the team can list.
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM mailbox").unwrap(), 0);
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM outbox").unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_recipient_is_delivered_without_federation() {
    let fed = Federation::standard().await.unwrap();
    let a = fed.index("northshire");
    let alice = fed.api(a, "alice").unwrap();
    let bob = fed.api(a, "bob").unwrap();
    let sent = alice
        .submit(&message("user:bob@northshire", "local-1", vec![1, 2, 3]).unwrap())
        .await
        .unwrap();
    assert_eq!(sent.status, Status::Delivered);
    let got = bob.fetch(&sent.message_id).await.unwrap();
    assert_eq!(got.body.0, vec![1, 2, 3]);
    bob.ack(&sent.message_id).await.unwrap();
    assert_eq!(
        alice.status(&sent.message_id).await.unwrap().status,
        Status::Acknowledged
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_recipient_reads_and_only_the_sender_sees_status() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let alice = fed.api(a, "alice").unwrap();
    let bob = fed.api(a, "bob").unwrap();
    let gita = fed.api(b, "gita").unwrap(); // in southvale, not in the duty team
    let dan = fed.api(b, "dan").unwrap();
    let sent = alice
        .submit(&message("team:duty@southvale", "priv-1", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(!dan
        .inbox(Duration::from_secs(30))
        .await
        .unwrap()
        .messages
        .is_empty());

    let e = gita.fetch(&sent.message_id).await.unwrap_err();
    assert_eq!(e.code(), Some(proto::ErrorCode::NotFound));
    assert!(gita
        .inbox(Duration::ZERO)
        .await
        .unwrap()
        .messages
        .is_empty());
    let e = gita.ack(&sent.message_id).await.unwrap_err();
    assert_eq!(e.code(), Some(proto::ErrorCode::NotFound));
    let e = bob.status(&sent.message_id).await.unwrap_err();
    assert_eq!(e.code(), Some(proto::ErrorCode::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_team_in_a_peer_area_comes_back_undeliverable_with_reason() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let alice = fed.api(a, "alice").unwrap();
    let sent = alice
        .submit(&message("team:nobody@southvale", "bounce-1", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(
        reaches(
            &alice,
            &sent.message_id,
            Status::Undeliverable,
            Duration::from_secs(20)
        )
        .await
    );
    let st = alice.status(&sent.message_id).await.unwrap();
    let reason = st
        .history
        .last()
        .and_then(|e| e.reason.clone())
        .unwrap_or_default();
    assert!(
        reason.contains("refused by southvale") && reason.contains("not in the directory"),
        "{reason}"
    );
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_message_wakes_only_its_recipients_long_poll() {
    let fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let alice = fed.api(a, "alice").unwrap();
    let send_to = |to: &'static str, key: &'static str| {
        let alice = &alice;
        async move {
            let m = message(to, key, key.as_bytes().to_vec()).unwrap();
            alice.submit(&m).await.unwrap();
        }
    };
    let (dan, gita) = (fed.api(b, "dan").unwrap(), fed.api(b, "gita").unwrap());
    let listings = || fed.gateway(b).unwrap().metrics().inbox_listings.get();
    let before = listings();
    let dan_waits = tokio::spawn(async move { dan.inbox(Duration::from_secs(30)).await });
    let gita_waits = tokio::spawn(async move { gita.inbox(Duration::from_secs(30)).await });
    let waiting = || fed.gateway(b).unwrap().metrics().inbox_waiting.get();
    // Both have listed their empty inboxes once and wait.
    assert!(
        eventually(Duration::from_secs(20), || async {
            listings() == before + 2 && waiting() == 2
        })
        .await
    );

    send_to("user:dan@southvale", "wake-1").await;
    let got = dan_waits.await.unwrap().unwrap();
    assert_eq!(got.messages.len(), 1);
    // Long enough for a woken long-poll to have listed again (it did, before
    // wakes were per mailbox); not a performance bound.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!gita_waits.is_finished());
    assert_eq!(waiting(), 1, "gita's long-poll still waits");

    send_to("user:gita@southvale", "wake-2").await;
    let got = gita_waits.await.unwrap().unwrap();
    assert_eq!(got.messages.len(), 1);
    assert_eq!(
        listings(),
        before + 4,
        "each long-poll listed again once, for its own message only"
    );
    assert_eq!(waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_are_erased_after_retention() {
    let settings = tests::Settings {
        toml: format!(
            "{}\n[retention]\nkeep_acknowledged = \"0s\"\nerase_every = \"100ms\"\n",
            tests::Settings::default().toml
        ),
        ..tests::Settings::default()
    };
    let fed = Federation::standard_with(&settings).await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let alice = fed.api(a, "alice").unwrap();
    let (dan, erin, gita) = (
        fed.api(b, "dan").unwrap(),
        fed.api(b, "erin").unwrap(),
        fed.api(b, "gita").unwrap(),
    );
    let to_team = alice
        .submit(&message("team:duty@southvale", "r-1", b"team ciphertext".to_vec()).unwrap())
        .await
        .unwrap();
    let to_gita = alice
        .submit(&message("user:gita@southvale", "r-2", b"gita's ciphertext".to_vec()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        dan.inbox(Duration::from_secs(30))
            .await
            .unwrap()
            .messages
            .len(),
        1
    );
    assert_eq!(
        erin.fetch(&to_team.message_id).await.unwrap().body.0,
        b"team ciphertext"
    );
    assert_eq!(
        dan.ack(&to_team.message_id).await.unwrap(),
        Status::Acknowledged
    );

    // Once acknowledged (and retention is zero here), its ciphertext goes;
    // a fetch says why.
    let erased = || async {
        erin.fetch(&to_team.message_id)
            .await
            .is_err_and(|e| e.code() == Some(proto::ErrorCode::Erased))
    };
    assert!(eventually(Duration::from_secs(20), erased).await);
    let gw = fed.gateway(b).unwrap();
    assert_eq!(gw.metrics().messages_erased.get(), 1);
    // Its envelope and status stay; the sender still sees its whole history.
    assert_eq!(fed.count(b, "SELECT COUNT(*) FROM inbox").unwrap(), 2);
    assert!(
        reaches(
            &alice,
            &to_team.message_id,
            Status::Acknowledged,
            Duration::from_secs(20)
        )
        .await
    );
    // A message not yet acknowledged is kept, however many passes run.
    let passes = || async {
        fed.count(
            b,
            "SELECT COUNT(*) FROM settled WHERE erased_ms IS NOT NULL",
        )
        .unwrap_or(0)
            == 1
    };
    assert!(eventually(Duration::from_secs(5), passes).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gita.fetch(&to_gita.message_id).await.unwrap().body.0,
        b"gita's ciphertext"
    );
    assert_eq!(gw.metrics().messages_erased.get(), 1);
}
