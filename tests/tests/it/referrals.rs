//! End-to-end encrypted referrals (MLS) through real gateways: gateways carry
//! ciphertext only; handover removes the old lead.

use std::io::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use client::cases::{CaseError, Caseworker, Event};
use client::ClientConfig;
use proto::{Category, ErrorCode, Recipient};
use tests::{eventually, Federation};

fn worker(fed: &Federation, area: usize, user: &str) -> Caseworker {
    let config = ClientConfig::load(&fed.client_config_path(area, user)).unwrap();
    let api = client::Api::new(&config).unwrap();
    Caseworker::open(&config, api).unwrap()
}

fn category(c: &str) -> Category {
    Category::new(c).unwrap()
}

fn to(r: &str) -> Recipient {
    r.parse().unwrap()
}

/// Reads until at least one event arrives (bounded), returning all events.
/// Refused messages stay in the inbox, so the long-poll may return at once
/// with nothing new: pause between attempts.
async fn read(w: &mut Caseworker) -> Vec<Event> {
    let mut all = Vec::new();
    for _ in 0..100 {
        all.extend(w.read(Duration::from_secs(5)).await.unwrap());
        if !all.is_empty() {
            // Drain whatever else is already waiting.
            all.extend(w.read(Duration::ZERO).await.unwrap());
            return all;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all
}

fn texts(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { plaintext, .. } => {
                Some(String::from_utf8_lossy(plaintext).into_owned())
            }
            _ => None,
        })
        .collect()
}

/// `w`'s referral of `body` to `to` (category `relocation`, not urgent, a
/// fresh case id and key, no disclosure): its case.
async fn refer_to(w: &mut Caseworker, to_whom: &str, body: &[u8]) -> String {
    w.refer(
        &to(to_whom),
        &category("relocation"),
        false,
        body,
        None,
        None,
        None,
    )
    .await
    .unwrap()
    .0
}

/// alice's referral to southvale's duty team, every member reached: its case.
async fn refer_to_duty(alice: &mut Caseworker) -> String {
    let (case, missing) = refer_to_duty_missing(alice).await;
    assert!(missing.is_empty(), "{missing:?}");
    case
}

/// alice's referral to southvale's duty team: its case, and the members
/// not reached (no keys).
async fn refer_to_duty_missing(alice: &mut Caseworker) -> (String, Vec<String>) {
    alice
        .refer(
            &to("team:duty@southvale"),
            &category("relocation"),
            false,
            b"Referral: family moved to southvale",
            None,
            None,
            None,
        )
        .await
        .unwrap()
}

/// A standard federation where everyone has published KeyPackages.
async fn federation_with_keys() -> Federation {
    let fed = Federation::standard().await.unwrap();
    for (area, users) in [
        (0, &["alice", "bob"][..]),
        (1, &["dan", "erin", "farah", "gita"][..]),
        (2, &["hana"][..]),
    ] {
        for u in users {
            let stock = worker(&fed, area, u).publish_keys(5).await.unwrap();
            assert_eq!(stock.available, 5);
            assert!(stock.last_resort);
        }
    }
    fed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referral_to_a_team_of_three_decrypts_on_all_three_and_replies_flow_both_ways() {
    let fed = federation_with_keys().await;
    let mut alice = worker(&fed, 0, "alice");
    let case = refer_to_duty(&mut alice).await;
    // The writer's bulk pass indexes the referral for the team before anyone
    // reads it.
    let team_indexed = || async {
        fed.count(1, "SELECT COUNT(*) FROM mailbox WHERE target_kind = 'team'")
            .unwrap_or(0)
            >= 1
    };
    assert!(eventually(Duration::from_secs(20), team_indexed).await);
    for u in ["dan", "erin", "farah"] {
        let mut w = worker(&fed, 1, u);
        let events = read(&mut w).await;
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Joined { case_id, .. } if *case_id == case)),
            "{u}: {events:?}"
        );
        assert_eq!(
            texts(&events),
            ["Referral: family moved to southvale"],
            "{u}"
        );
    }
    // Each of them has acknowledged all they read, the team's messages
    // included: nothing is left in southvale's index of what can be listed.
    assert_eq!(fed.count(1, "SELECT COUNT(*) FROM mailbox").unwrap(), 0);
    // Joining used a KeyPackage (5 -> 4, low): the client topped its stock up.
    let dan_stock = fed
        .api(1, "dan")
        .unwrap()
        .key_package_stock()
        .await
        .unwrap();
    assert!(dan_stock.available >= 5 && !dan_stock.low, "{dan_stock:?}");
    // gita is in southvale but not in the duty team: she is not in the case.
    let mut gita = worker(&fed, 1, "gita");
    assert!(gita.read(Duration::ZERO).await.unwrap().is_empty());

    // dan replies; alice and the rest of the team read it.
    let mut dan = worker(&fed, 1, "dan");
    dan.send(
        &case,
        &category("update"),
        b"Received; visit booked",
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(texts(&read(&mut alice).await), ["Received; visit booked"]);
    let mut erin = worker(&fed, 1, "erin");
    assert_eq!(texts(&read(&mut erin).await), ["Received; visit booked"]);
    // Their clients stop (one client at a time holds a data directory).
    drop((dan, erin));
    // alice sends an update; all three read it.
    alice
        .send(
            &case,
            &category("update"),
            b"Update from northshire",
            None,
            None,
        )
        .await
        .unwrap();
    for (u, expected) in [
        ("dan", &["Update from northshire"][..]),
        ("erin", &["Update from northshire"][..]),
        // farah had not read dan's reply yet: every member gets every message.
        (
            "farah",
            &["Received; visit booked", "Update from northshire"][..],
        ),
    ] {
        let mut w = worker(&fed, 1, u);
        assert_eq!(texts(&read(&mut w).await), expected, "{u}");
    }
}

/// Everything the gateways print, for the canary test.
/// The Welcome and the first message travel separately: a reader already
/// waiting is woken by the Welcome, and still gets the referral in the same
/// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_waiting_when_a_referral_arrives_gets_the_join_and_the_referral_in_one_read() {
    let fed = federation_with_keys().await;
    let mut alice = worker(&fed, 0, "alice");
    let mut dan = worker(&fed, 1, "dan");
    for round in 0..3 {
        let text = format!("Referral {round}: family moved to southvale");
        let (events, referred) = tokio::join!(dan.read(Duration::from_secs(30)), async {
            // Let dan's long-poll start waiting first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            alice
                .refer(
                    &to("user:dan@southvale"),
                    &category("relocation"),
                    false,
                    text.as_bytes(),
                    None,
                    None,
                    None,
                )
                .await
        });
        let (case, _) = referred.unwrap();
        let events = events.unwrap();
        assert!(
            matches!(events.first(), Some(Event::Joined { case_id, .. }) if *case_id == case),
            "{events:?}"
        );
        assert_eq!(texts(&events), [text]);
    }
}

fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || Capture(writer.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_plaintext_never_reaches_gateway_files_or_logs() {
    let logs = captured_logs();
    let fed = federation_with_keys().await;
    let canary = format!("CANARY-{}-new-address-17-Elm-Row", rand::random::<u64>());
    let mut alice = worker(&fed, 0, "alice");
    let (case, _) = alice
        .refer(
            &to("team:duty@southvale"),
            &category("relocation"),
            false,
            canary.as_bytes(),
            None,
            None,
            None,
        )
        .await
        .unwrap();
    let mut dan = worker(&fed, 1, "dan");
    assert_eq!(
        texts(&read(&mut dan).await),
        std::slice::from_ref(&canary),
        "the recipient does read it"
    );
    let reply = format!("{canary}-reply");
    dan.send(&case, &category("update"), reply.as_bytes(), None, None)
        .await
        .unwrap();
    assert_eq!(texts(&read(&mut alice).await), std::slice::from_ref(&reply));

    // Force everything to disk, including the WAL, then scan every gateway file.
    for i in 0..fed.areas.len() {
        let conn = rusqlite::Connection::open(fed.db_path(i)).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .unwrap();
    }
    let mut scanned = 0;
    for area in &fed.areas {
        for file in files_under(&area.dir.join("data")) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !contains(&bytes, canary.as_bytes()),
                "plaintext found in {}",
                file.display()
            );
            scanned += 1;
        }
    }
    assert!(scanned >= 3, "the gateway databases were scanned");
    std::io::stdout().flush().unwrap();
    let logs = logs.lock().unwrap();
    assert!(!logs.is_empty(), "gateway tracing output was captured");
    assert!(
        !contains(&logs, canary.as_bytes()),
        "plaintext found in gateway logs"
    );
    // The clients do hold it (in their own data directories).
    assert!(alice
        .history(&case)
        .unwrap()
        .iter()
        .any(|e| contains(&e.plaintext, canary.as_bytes())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_removes_the_old_lead_and_gives_the_new_lead_the_chronology() {
    let fed = federation_with_keys().await;
    let mut alice = worker(&fed, 0, "alice");
    let case = refer_to(&mut alice, "team:duty@southvale", b"first referral").await;
    // alice's client has recorded that the family fled eastmoor (here,
    // with no sharing policy, there are no disclosures to carry it).
    drop(alice);
    let meta_path = ClientConfig::load(&fed.client_config_path(0, "alice"))
        .unwrap()
        .data_directory()
        .join("cases.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["fled_from"] = serde_json::json!({ case.clone(): ["eastmoor"] });
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let mut alice = worker(&fed, 0, "alice");
    let mut dan = worker(&fed, 1, "dan");
    assert_eq!(texts(&read(&mut dan).await), ["first referral"]);
    dan.send(&case, &category("update"), b"dan's note", None, None)
        .await
        .unwrap();
    assert_eq!(texts(&read(&mut alice).await), ["dan's note"]);

    // alice hands the case to bob (northshire); dan, the first remaining
    // member, commits it (MLS does not let alice commit her own removal).
    alice
        .handover(&case, &to("user:bob@northshire"), None)
        .await
        .unwrap();
    let events = read(&mut dan).await;
    assert!(events.iter().any(|e| matches!(e, Event::Membership { removed, added, .. }
        if removed.iter().any(|r| r.ends_with("/user/alice")) && added.iter().any(|a| a.ends_with("/user/bob")))), "{events:?}");
    let mut bob = worker(&fed, 0, "bob");
    let events = joins(&mut bob, &case).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::History { entries, .. } if *entries >= 2)),
        "{events:?}"
    );
    let history: Vec<String> = bob
        .history(&case)
        .unwrap()
        .iter()
        .map(|e| String::from_utf8_lossy(&e.plaintext).into_owned())
        .collect();
    assert!(
        history.contains(&"first referral".to_owned())
            && history.contains(&"dan's note".to_owned()),
        "{history:?}"
    );
    // The new lead keeps the family's whereabouts from where they fled.
    assert_eq!(bob.fled_from(&case), ["eastmoor".parse().unwrap()]);

    // The rest of the team sees the membership change; alice learns she is out.
    let mut erin = worker(&fed, 1, "erin");
    let events = read(&mut erin).await;
    assert!(events.iter().any(|e| matches!(e, Event::Membership { removed, .. } if removed.iter().any(|r| r.ends_with("/user/alice")))), "{events:?}");
    let events = read(&mut alice).await;
    assert!(
        events.iter().any(|e| matches!(e, Event::Removed { .. })),
        "{events:?}"
    );

    // A message after the handover: bob reads it; alice cannot.
    dan.send(&case, &category("update"), b"after handover", None, None)
        .await
        .unwrap();
    assert_eq!(texts(&read(&mut bob).await), ["after handover"]);
    let after = alice.read(Duration::from_secs(2)).await.unwrap();
    assert!(
        texts(&after).is_empty(),
        "the old lead must not decrypt: {after:?}"
    );
    // And alice can no longer send in the case.
    assert!(alice
        .send(&case, &category("update"), b"x", None, None)
        .await
        .is_err());
    // The new lead's reply reaches the team once each: dan, who committed
    // the handover, is reached through the team, not twice.
    bob.send(&case, &category("update"), b"from the new lead", None, None)
        .await
        .unwrap();
    let events = read(&mut dan).await;
    assert_eq!(texts(&events), ["from the new lead"]);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Refused { .. })),
        "{events:?}"
    );
    assert!(dan.read(Duration::from_secs(1)).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_lead_outside_the_team_of_their_area_gets_every_members_messages() {
    let fed = federation_with_keys().await;
    let mut alice = worker(&fed, 0, "alice");
    let case = refer_to_duty(&mut alice).await;
    let mut dan = worker(&fed, 1, "dan");
    let mut erin = worker(&fed, 1, "erin");
    assert_eq!(
        texts(&read(&mut dan).await),
        ["Referral: family moved to southvale"]
    );
    assert_eq!(
        texts(&read(&mut erin).await),
        ["Referral: family moved to southvale"]
    );

    // alice hands the case to gita, of southvale but not of its duty team,
    // whose address the case already has. dan, the first remaining member,
    // commits it.
    alice
        .handover(&case, &to("user:gita@southvale"), None)
        .await
        .unwrap();
    let events = read(&mut dan).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Membership { added, .. }
            if added.iter().any(|a| a.ends_with("/user/gita")))),
        "{events:?}"
    );
    let mut gita = worker(&fed, 1, "gita");
    joins(&mut gita, &case).await;
    let events = read(&mut erin).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Membership { added, .. }
            if added.iter().any(|a| a.ends_with("/user/gita")))),
        "{events:?}"
    );

    // Every member's message reaches her once: erin's (who did not commit)
    // as well as dan's (who did).
    erin.send(&case, &category("update"), b"from erin", None, None)
        .await
        .unwrap();
    dan.send(&case, &category("update"), b"from dan", None, None)
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..12 {
        got.extend(gita.read(Duration::from_secs(5)).await.unwrap());
        if texts(&got).len() >= 2 {
            break;
        }
    }
    let mut heard = texts(&got);
    heard.sort();
    assert_eq!(heard, ["from dan", "from erin"], "{got:?}");
    assert!(
        !got.iter().any(|e| matches!(e, Event::Refused { .. })),
        "{got:?}"
    );
    // Her reply reaches the team.
    gita.send(&case, &category("update"), b"from the new lead", None, None)
        .await
        .unwrap();
    let mut heard = Vec::new();
    for _ in 0..12 {
        heard.extend(texts(&erin.read(Duration::from_secs(5)).await.unwrap()));
        if heard.len() >= 2 {
            break;
        }
    }
    heard.sort();
    assert_eq!(heard, ["from dan", "from the new lead"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_restart_mid_conversation_loses_nothing() {
    let fed = federation_with_keys().await;
    let case = {
        let mut alice = worker(&fed, 0, "alice");
        alice
            .refer(
                &to("team:duty@southvale"),
                &category("relocation"),
                false,
                b"one",
                None,
                None,
                None,
            )
            .await
            .unwrap()
            .0
    };
    {
        let mut dan = worker(&fed, 1, "dan");
        assert_eq!(texts(&read(&mut dan).await), ["one"]);
    }
    // Both reopen from disk and carry on both ways.
    let mut dan = worker(&fed, 1, "dan");
    dan.send(&case, &category("update"), b"two", None, None)
        .await
        .unwrap();
    let mut alice = worker(&fed, 0, "alice");
    assert_eq!(texts(&read(&mut alice).await), ["two"]);
    alice
        .send(&case, &category("update"), b"three", None, None)
        .await
        .unwrap();
    // Restarted (one client at a time holds a data directory).
    drop(dan);
    let mut dan = worker(&fed, 1, "dan");
    assert_eq!(texts(&read(&mut dan).await), ["three"]);
    let history: Vec<Vec<u8>> = dan
        .history(&case)
        .unwrap()
        .into_iter()
        .map(|e| e.plaintext)
        .collect();
    assert_eq!(
        history,
        [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
    );
}

/// The first message waiting in `api`'s inbox (waiting up to 10 s for
/// one): its id and the bytes the gateway holds.
async fn first_waiting(api: &client::Api) -> (proto::MessageId, Vec<u8>) {
    let inbox = api.inbox(Duration::from_secs(10)).await.unwrap();
    let id = inbox.messages[0].envelope.message_id.clone();
    let bytes = api.fetch(&id).await.unwrap().body.0;
    (id, bytes)
}

/// alice refers a case to dan ("genuine"), and dan reads it.
async fn genuine_referral_read_by_dan(fed: &Federation) -> (Caseworker, String, Caseworker) {
    let mut alice = worker(fed, 0, "alice");
    let case = refer_to(&mut alice, "user:dan@southvale", b"genuine").await;
    let mut dan = worker(fed, 1, "dan");
    assert_eq!(texts(&read(&mut dan).await), ["genuine"]);
    (alice, case, dan)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_replayed_ciphertext_is_refused_by_the_client() {
    let fed = federation_with_keys().await;
    let (mut alice, case, mut dan) = genuine_referral_read_by_dan(&fed).await;

    // Capture a real ciphertext by reading the gateway's copy after sending.
    alice
        .send(&case, &category("update"), b"second", None, None)
        .await
        .unwrap();
    let dan_api = fed.api(1, "dan").unwrap();
    let (_, ciphertext) = first_waiting(&dan_api).await;
    assert_eq!(texts(&read(&mut dan).await), ["second"]);

    let alice_api = fed.api(0, "alice").unwrap();
    let resend = |bytes: Vec<u8>, key: &str| {
        let alice_api = alice_api.clone();
        let key = key.to_owned();
        async move {
            alice_api
                .submit(&proto::SubmitRequest {
                    idempotency_key: proto::IdempotencyKey::new(key).unwrap(),
                    recipient: to("user:dan@southvale"),
                    category: category("update"),
                    urgent: false,
                    kind: proto::MessageKind::Mls,
                    disclosure: None,
                    commit_proof: None,
                    body: proto::Body(bytes),
                })
                .await
                .unwrap()
        }
    };
    // Replay: the same ciphertext again.
    resend(ciphertext.clone(), "replay").await;
    let events = read(&mut dan).await;
    assert!(
        matches!(events.as_slice(), [Event::Refused { error, .. }] if error.to_lowercase().contains("replay")),
        "{events:?}"
    );
    // Tamper: flip a byte near the end (inside the AEAD ciphertext; framing stays valid).
    let mut tampered = ciphertext.clone();
    let n = tampered.len();
    tampered[n - 20] ^= 0x01;
    resend(tampered, "tamper").await;
    let events = read(&mut dan).await;
    assert!(
        matches!(events.as_slice(), [Event::Refused { .. }]),
        "{events:?}"
    );
    // Refused messages stay in the inbox, unacknowledged, and are reported once.
    assert_eq!(
        dan_api.inbox(Duration::ZERO).await.unwrap().messages.len(),
        2
    );
    assert!(dan.read(Duration::ZERO).await.unwrap().is_empty());
    // A reader waiting with them in the inbox waits: it looks again every
    // few seconds, not in a tight loop of listings (the gateway answers at
    // once while anything is listed).
    let listings = || fed.gateway(1).unwrap().metrics().inbox_listings.get();
    let before = listings();
    let started = std::time::Instant::now();
    assert!(dan.read(Duration::from_secs(6)).await.unwrap().is_empty());
    // (A lower bound: the wait is kept, however slow the machine.)
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "it did not wait"
    );
    let looked = listings() - before;
    assert!((2..=3).contains(&looked), "{looked} listings in 6 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_are_bound_to_the_uploaders_certificate() {
    let fed = Federation::standard().await.unwrap();
    // alice's client makes KeyPackages; bob tries to publish them as his.
    let dir = tempfile::tempdir().unwrap();
    let mut alice_mls =
        client::mls::MlsClient::open(dir.path(), "spiffe://northshire/user/alice").unwrap();
    let kps = alice_mls.key_packages(2).unwrap();
    let bob = fed.api(0, "bob").unwrap();
    let e = bob.upload_key_packages(kps.clone()).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");
    assert_eq!(
        fed.count(0, "SELECT COUNT(*) FROM key_packages").unwrap(),
        0
    );
    // Garbage is refused too.
    let e = bob
        .upload_key_packages(vec![b"not a key package".to_vec()])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MalformedRequest));
    // alice may publish her own; each is handed out once, the last resort forever.
    let alice = fed.api(0, "alice").unwrap();
    let mut all = kps;
    all.push(alice_mls.last_resort_key_package().unwrap());
    let stock = alice.upload_key_packages(all).await.unwrap();
    assert_eq!(
        (stock.available, stock.last_resort, stock.low),
        (2, true, true)
    );
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            bob.claim(&to("user:alice@northshire"))
                .await
                .unwrap()
                .key_packages[0]
                .key_package
                .0
                .clone(),
        );
    }
    assert_ne!(got[0], got[1]);
    assert_eq!(
        got[2], got[3],
        "after the single-use ones, the last resort is handed out again"
    );
    assert_eq!(
        fed.count(0, "SELECT COUNT(*) FROM key_packages").unwrap(),
        1
    );
}

/// alice's referral to southvale's duty team under the key `ref-1`.
async fn refer(
    alice: &mut Caseworker,
    body: &[u8],
    case: Option<String>,
) -> Result<(String, Vec<String>), CaseError> {
    alice
        .refer(
            &to("team:duty@southvale"),
            &category("relocation"),
            false,
            body,
            case,
            Some("ref-1".into()),
            None,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referral_made_again_under_its_key_is_the_same_referral() {
    let fed = federation_with_keys().await;
    let mut alice = worker(&fed, 0, "alice");
    let (case, missing) = refer(&mut alice, b"first", None).await.unwrap();
    assert!(missing.is_empty());
    let stored = || fed.count(0, "SELECT COUNT(*) FROM sent").unwrap();
    assert_eq!(stored(), 2, "the Welcome and the referral");
    // Again under the key (a script retrying after a lost answer): the same
    // case, nothing new stored, and no second group.
    let (again, _) = refer(&mut alice, b"first", None).await.unwrap();
    assert_eq!(again, case);
    assert_eq!(stored(), 2);
    assert_eq!(alice.cases().unwrap(), std::slice::from_ref(&case));
    // The key with other content, or a case id this client has: refused.
    let e = refer(&mut alice, b"other", None).await.unwrap_err();
    assert!(
        e.to_string().contains("was used for another referral"),
        "{e}"
    );
    let e = alice
        .refer(
            &to("team:duty@southvale"),
            &category("relocation"),
            false,
            b"x",
            Some(case.clone()),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already on this client"), "{e}");
    assert_eq!(stored(), 2);
    let mut dan = worker(&fed, 1, "dan");
    assert_eq!(texts(&read(&mut dan).await), ["first"]);
}

/// alice's referral to bob (both of northshire), read by bob.
async fn alice_refers_to_bob(fed: &Federation) -> (Caseworker, String, Caseworker) {
    let mut alice = worker(fed, 0, "alice");
    let case = refer_to(&mut alice, "user:bob@northshire", b"hi").await;
    let mut bob = worker(fed, 0, "bob");
    assert_eq!(texts(&read(&mut bob).await), ["hi"]);
    (alice, case, bob)
}

/// Reads until `w` has joined `case` (its Welcome may come after other
/// messages), and returns what was read.
async fn joins(w: &mut Caseworker, case: &str) -> Vec<Event> {
    let events = read_until(w, |events| {
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { case_id, .. } if case_id == case))
    })
    .await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { case_id, .. } if case_id == case)),
        "{events:?}"
    );
    events
}

/// Reads until `done` holds for what was read (a few tries of 2 s after
/// the first read), and returns what was read.
async fn read_until(w: &mut Caseworker, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let mut events = read(w).await;
    for _ in 0..5 {
        if done(&events) {
            break;
        }
        events.extend(w.read(Duration::from_secs(2)).await.unwrap());
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_commit_for_the_same_epoch_is_refused_as_stale() {
    let fed = federation_with_keys().await;
    let (mut alice, case, mut bob) = alice_refers_to_bob(&fed).await;
    // Both commit at the same epoch; the gateway accepts the first only.
    alice
        .add(&case, &to("user:gita@southvale"), None)
        .await
        .unwrap();
    let e = bob
        .add(&case, &to("user:hana@eastmoor"), None)
        .await
        .unwrap_err();
    assert!(matches!(&e, CaseError::Overtaken(c) if *c == case), "{e:?}");
    // bob's own Commit was dropped, not merged: he reads alice's and is in
    // her epoch, so the case goes on for both (before, he was left in an
    // epoch of his own and could read nothing more).
    let events = read(&mut bob).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Membership { added, .. }
            if added.iter().any(|a| a.ends_with("/user/gita")))),
        "{events:?}"
    );
    alice
        .send(&case, &category("update"), b"after the change", None, None)
        .await
        .unwrap();
    assert_eq!(texts(&read(&mut bob).await), ["after the change"]);
    // And he can make his change now.
    bob.add(&case, &to("user:hana@eastmoor"), None)
        .await
        .unwrap();
    let mut hana = worker(&fed, 2, "hana");
    let events = read(&mut hana).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { case_id, .. } if *case_id == case)),
        "{events:?}"
    );
    bob.send(&case, &category("update"), b"welcome, hana", None, None)
        .await
        .unwrap();
    let mut got = texts(&read(&mut alice).await);
    got.retain(|t| t == "welcome, hana");
    assert_eq!(got, ["welcome, hana"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_commit_overtaken_by_another_change_is_made_again() {
    let fed = federation_with_keys().await;
    let (mut alice, case, mut bob) = alice_refers_to_bob(&fed).await;
    // alice asks for a handover to hana (bob is to commit it), then adds
    // gita herself before bob has read the request: her Commit takes the
    // epoch, so bob's handover Commit is refused as stale.
    alice
        .handover(&case, &to("user:hana@eastmoor"), None)
        .await
        .unwrap();
    alice
        .add(&case, &to("user:gita@southvale"), None)
        .await
        .unwrap();
    // bob drops his Commit, reads alice's, and commits the handover again.
    let events = read_until(&mut bob, |events| {
        events.iter().any(|e| {
            matches!(e, Event::Membership { added, .. }
            if added.iter().any(|a| a.ends_with("/user/hana")))
        })
    })
    .await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Membership { added, removed, .. }
            if added.iter().any(|a| a.ends_with("/user/hana"))
                && removed.iter().any(|r| r.ends_with("/user/alice")))),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, Event::Refused { .. })),
        "{events:?}"
    );
    let mut hana = worker(&fed, 2, "hana");
    joins(&mut hana, &case).await;
    bob.send(&case, &category("update"), b"to the new lead", None, None)
        .await
        .unwrap();
    assert_eq!(texts(&read(&mut hana).await), ["to the new lead"]);
}

/// Team messages at area `i` settled (no one can list them any more).
fn settled(fed: &Federation, i: usize) -> i64 {
    fed.count(i, "SELECT COUNT(*) FROM settled").unwrap()
}

/// Area `i`'s gateway reads its configuration file again (as on SIGHUP).
async fn reload(fed: &Federation, i: usize) -> gateway::Reloaded {
    fed.gateway(i)
        .unwrap()
        .reload_file(&fed.areas[i].config_path)
        .await
        .unwrap()
}

/// Stops area `i`'s gateway and runs its store's retention pass for
/// leavers (`Store::settle_after_leavers`) as it would a week on, when
/// `WAIT_FOR_LEAVERS` has passed; returns how many it settled.
async fn settle_after_leavers_a_week_on(fed: &mut Federation, i: usize) -> usize {
    let data_dir = fed.config(i).unwrap().data_dir;
    let area = fed.areas[i].area.clone();
    fed.stop(i).await;
    let store = gateway::store::SqliteStore::open(&data_dir, area).unwrap();
    let week_on = std::time::SystemTime::now() + gateway::store::WAIT_FOR_LEAVERS;
    let week_on = week_on
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    gateway::store::Store::settle_after_leavers(&store, u64::try_from(week_on).unwrap())
        .await
        .unwrap()
}

/// Team messages at area `i` not settled yet.
fn unsettled(fed: &Federation, i: usize) -> i64 {
    fed.count(
        i,
        "SELECT COUNT(*) FROM inbox WHERE target_kind = 'team' AND message_id NOT IN \
         (SELECT message_id FROM settled)",
    )
    .unwrap()
}

/// A member who joins a team after a referral reached it is not shown it
/// (it was encrypted for the team as it was: she would only be told it
/// cannot be read), and a member who leaves before reading it is waited for
/// only a while (she may have been taken out by mistake): then the
/// referral is settled, so its ciphertext can be erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_member_who_joins_later_is_not_shown_earlier_referrals_and_a_leaver_is_not_waited_for(
) {
    let mut fed = federation_with_keys().await;
    let b = fed.index("southvale");
    let mut alice = worker(&fed, 0, "alice");
    let case = refer_to_duty(&mut alice).await;
    let mut dan = worker(&fed, b, "dan");
    assert_eq!(
        texts(&read(&mut dan).await),
        ["Referral: family moved to southvale"]
    );

    // Before erin and farah have read it, farah moves to another team and
    // gita joins the duty team.
    let farah_in_duty = "id = \"farah\"\norganisation = \"southvale-agency\"\nrole = \"social-worker\"\nteams = [\"duty\"]";
    let gita_alone =
        "id = \"gita\"\norganisation = \"southvale-agency\"\nrole = \"social-worker\"\nteams = []";
    fed.edit_config(
        b,
        farah_in_duty,
        &farah_in_duty.replace("\"duty\"", "\"fostering\""),
    )
    .unwrap();
    fed.edit_config(b, gita_alone, &gita_alone.replace("[]", "[\"duty\"]"))
        .unwrap();
    let reloaded = reload(&fed, b).await;
    // gita in duty and farah in fostering; farah out of duty.
    assert_eq!(
        reloaded.teams,
        gateway::store::TeamChanges {
            joined: 2,
            returned: 0,
            left: 1,
            settled: 0
        }
    );
    assert_eq!(settled(&fed, b), 0);

    // gita sees nothing of the case from before she joined: not a message
    // she is told she cannot read.
    let mut gita = worker(&fed, b, "gita");
    let events = gita.read(Duration::from_secs(1)).await.unwrap();
    assert!(events.is_empty(), "{events:?}");
    let listed = fed
        .api(b, "gita")
        .unwrap()
        .inbox(Duration::ZERO)
        .await
        .unwrap();
    assert!(listed.messages.is_empty(), "{:?}", listed.messages);

    // erin reads it. It still waits for farah, who left only just now.
    assert_eq!(
        texts(&read(&mut worker(&fed, b, "erin")).await),
        ["Referral: family moved to southvale"]
    );
    assert_eq!(settled(&fed, b), 0);
    // The case goes on for those in it. gita, in the team but not in the
    // case, is told so (not that a message was refused), and her client
    // acknowledges it, so the team's inbox does not wait for her.
    dan.send(&case, &category("update"), b"Visit booked", None, None)
        .await
        .unwrap();
    assert_eq!(texts(&read(&mut alice).await), ["Visit booked"]);
    // As a client from before `NotInCase` left it: refused (reported) and
    // not acknowledged. The client looks at it once more.
    let waiting = fed
        .api(b, "gita")
        .unwrap()
        .inbox(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(waiting.messages.len(), 1);
    let config = ClientConfig::load(&fed.client_config_path(b, "gita")).unwrap();
    let meta_path = config.data_dir.unwrap().join("cases.json");
    let mut meta: serde_json::Value = match std::fs::read(&meta_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Err(_) => serde_json::json!({"cases": {}, "pending_history": []}),
    };
    meta["refused"] = serde_json::json!([waiting.messages[0].envelope.message_id.to_string()]);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    drop(gita);
    let mut gita = worker(&fed, b, "gita");
    // (Past the wait for a Welcome that may still be on its way.)
    gita.waiting_for_team_welcomes(Duration::ZERO);
    let events = read(&mut gita).await;
    assert!(
        matches!(&events[..], [Event::NotInCase { to, .. }] if to == "team:duty@southvale"),
        "{events:?}"
    );
    // Neither gita, who could not read it, nor dan, acknowledging its echo
    // when he reads next, tells dan it was read: erin does.
    let visit = waiting.messages[0].envelope.message_id.clone();
    let dan_api = fed.api(b, "dan").unwrap();
    let visit_status = || async { dan_api.status(&visit).await.unwrap().status };
    // (Fetched: gita's client took it.)
    assert_eq!(visit_status().await, proto::Status::Fetched);
    assert!(dan.read(Duration::ZERO).await.unwrap().is_empty());
    assert_eq!(visit_status().await, proto::Status::Fetched);
    assert_eq!(
        texts(&read(&mut worker(&fed, b, "erin")).await),
        ["Visit booked"]
    );
    assert_eq!(visit_status().await, proto::Status::Acknowledged);
    // Stored after farah left, dan's message waited for dan, erin and gita
    // alone: it is settled. The two before it still wait for farah.
    assert_eq!((settled(&fed, b), unsettled(&fed, b)), (1, 2));
    // After `WAIT_FOR_LEAVERS` the gateway's retention pass settles them
    // too (run here on the stopped gateway's store, a week on).
    assert_eq!(settle_after_leavers_a_week_on(&mut fed, b).await, 2);
    assert_eq!((settled(&fed, b), unsettled(&fed, b)), (3, 0));
}

/// A referral that everyone in the team it went to left without reading
/// (and stayed away `WAIT_FOR_LEAVERS`) goes back to its sender as
/// undeliverable, saying why: it is not settled and erased in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referral_everyone_in_the_team_left_unread_comes_back_to_its_sender_as_undeliverable() {
    let mut fed = federation_with_keys().await;
    let b = fed.index("southvale");
    let mut alice = worker(&fed, 0, "alice");
    refer_to_duty(&mut alice).await;
    // The case's Welcome and the referral, both to the team.
    let ids: Vec<proto::MessageId> = rusqlite::Connection::open(fed.db_path(0))
        .unwrap()
        .prepare("SELECT message_id FROM sent WHERE envelope LIKE '%team:duty@southvale%'")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|id| id.unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    let api = fed.api(0, "alice").unwrap();
    let reached = |want: proto::Status| {
        let (api, ids) = (api.clone(), ids.clone());
        async move {
            eventually(Duration::from_secs(30), || async {
                for id in &ids {
                    if api.status(id).await.map(|s| s.status).ok() != Some(want) {
                        return false;
                    }
                }
                true
            })
            .await
        }
    };
    assert!(reached(proto::Status::Delivered).await);

    // No one has read it when the whole duty team moves to fostering.
    for _ in 0..3 {
        fed.edit_config(b, "teams = [\"duty\"]", "teams = [\"fostering\"]")
            .unwrap();
    }
    let reloaded = reload(&fed, b).await;
    assert_eq!(reloaded.teams.left, 3);
    assert_eq!(unsettled(&fed, b), 2);

    // A week on, the retention pass gives it up (run here on the stopped
    // gateway's store), and the news crosses once the gateway is back.
    assert_eq!(settle_after_leavers_a_week_on(&mut fed, b).await, 2);
    assert_eq!(unsettled(&fed, b), 0);
    fed.start(b).await.unwrap();
    assert!(reached(proto::Status::Undeliverable).await);
    for id in &ids {
        let st = api.status(id).await.unwrap();
        let steps: Vec<_> = st.history.iter().map(|e| e.status).collect();
        assert_eq!(
            steps,
            [
                proto::Status::Accepted,
                proto::Status::Delivered,
                proto::Status::Undeliverable
            ]
        );
        assert_eq!(
            st.history[2].reason.as_deref(),
            Some(gateway::store::GIVEN_UP_UNREAD)
        );
    }
    // alice's client recorded both: the next check tells her once (what
    // `client read` prints), and `client sent` keeps showing why.
    let config = ClientConfig::load(&fed.client_config_path(0, "alice")).unwrap();
    let log = client::sent::SentLog::in_dir(&config.data_dir.unwrap());
    let check = |open_only: bool| {
        client::sent::check(&log, &api, 0, open_only, client::sent::Ask::Newest(20))
    };
    let news = check(true).await.unwrap();
    let told: Vec<(&str, &str, bool)> = news
        .iter()
        .map(|c| (c.entry.what.as_str(), c.entry.to.as_str(), c.newly_final))
        .collect();
    assert_eq!(
        told,
        [
            ("case invitation", "team:duty@southvale", true),
            ("referral", "team:duty@southvale", true)
        ]
    );
    for c in &news {
        assert_eq!(c.status, Some(proto::Status::Undeliverable));
        assert_eq!(c.reason.as_deref(), Some(gateway::store::GIVEN_UP_UNREAD));
        assert!(ids.contains(&c.entry.message_id));
    }
    assert!(check(true).await.unwrap().is_empty(), "told once");
    let all = check(false).await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|c| !c.newly_final
        && c.status == Some(proto::Status::Undeliverable)
        && c.reason.as_deref() == Some(gateway::store::GIVEN_UP_UNREAD)));
}

/// A member of the team who was left out of a case (she had published no
/// keys) is told it is in a case she is not part of, and her client does
/// not acknowledge its invitation or its referral for the sender: only
/// someone who read them does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_member_left_out_of_a_case_acknowledges_neither_its_invitation_nor_its_referral() {
    let fed = Federation::standard().await.unwrap();
    let b = fed.index("southvale");
    for u in ["dan", "erin"] {
        worker(&fed, b, u).publish_keys(3).await.unwrap();
    }
    let mut alice = worker(&fed, 0, "alice");
    let (case, missing) = refer_to_duty_missing(&mut alice).await;
    assert_eq!(missing.len(), 1, "farah has no keys: {missing:?}");

    // She is told of the referral (the Welcome, not for her, says nothing:
    // it might have been for a case she is in).
    let mut farah = worker(&fed, b, "farah");
    // (Past the wait for a Welcome that may still be on its way.)
    farah.waiting_for_team_welcomes(Duration::ZERO);
    let events = read(&mut farah).await;
    assert!(
        matches!(&events[..], [Event::NotInCase { to, .. }] if to == "team:duty@southvale"),
        "{events:?}"
    );
    // Nothing waits for her now, and neither is acknowledged: at her
    // gateway (decided as she set them aside), nor so at alice's.
    assert!(farah.read(Duration::ZERO).await.unwrap().is_empty());
    assert_eq!(
        fed.count(b, "SELECT COUNT(*) FROM member_acks").unwrap(),
        2,
        "both set aside"
    );
    assert_eq!(
        fed.count(
            b,
            "SELECT COUNT(*) FROM inbox WHERE status = 'acknowledged'"
        )
        .unwrap(),
        0
    );
    let config = ClientConfig::load(&fed.client_config_path(0, "alice")).unwrap();
    let log = client::sent::SentLog::in_dir(&config.data_dir.unwrap());
    let api = fed.api(0, "alice").unwrap();
    let statuses = || async {
        client::sent::check(&log, &api, 0, false, client::sent::Ask::Newest(20))
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.entry.what, c.entry.case, c.status))
            .collect::<Vec<_>>()
    };
    let before = statuses().await;
    let whats: Vec<&str> = before.iter().map(|(w, _, _)| w.as_str()).collect();
    assert_eq!(whats, ["case invitation", "referral"]);
    for (what, in_case, status) in before {
        assert_eq!(in_case.as_deref(), Some(case.as_str()));
        assert_ne!(status, Some(proto::Status::Acknowledged), "{what}");
    }
    // dan reads them: acknowledged.
    assert_eq!(
        texts(&read(&mut worker(&fed, b, "dan")).await),
        ["Referral: family moved to southvale"]
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            statuses()
                .await
                .iter()
                .all(|(_, _, s)| *s == Some(proto::Status::Acknowledged))
        })
        .await,
        "{:?}",
        statuses().await
    );
}

/// dan's client processed a message, then stopped before acknowledging it
/// (a crash, a lost connection). The next read finds it processed: it was
/// shown then, so it is acknowledged now, not refused as a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_processed_before_a_crash_cut_its_acknowledgement_short_is_acknowledged_now() {
    let fed = federation_with_keys().await;
    let (mut alice, case, dan) = genuine_referral_read_by_dan(&fed).await;
    drop(dan);
    alice
        .send(&case, &category("update"), b"second", None, None)
        .await
        .unwrap();
    let dan_api = fed.api(1, "dan").unwrap();
    let (id, bytes) = first_waiting(&dan_api).await;

    // dan's client as the crash left it: the message processed (in its
    // MLS state and history) and marked as being processed, not acknowledged.
    let config = ClientConfig::load(&fed.client_config_path(1, "dan")).unwrap();
    let dir = config.data_directory();
    {
        let mut mls = client::mls::MlsClient::open(&dir, "spiffe://southvale/user/dan").unwrap();
        mls.process(&bytes).unwrap();
    }
    let meta_path = dir.join("cases.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["processing"] = serde_json::json!([id.to_string()]);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();

    let mut dan = worker(&fed, 1, "dan");
    let events = dan.read(Duration::ZERO).await.unwrap();
    // Not shown again (its keys are used up), and perhaps never shown:
    // dan is told where it is.
    assert!(
        matches!(&events[..], [Event::ReadBefore { message_id, case_id: Some(c), .. }]
            if *message_id == id && *c == case),
        "{events:?}"
    );
    assert!(dan_api
        .inbox(Duration::ZERO)
        .await
        .unwrap()
        .messages
        .is_empty());
    let history = dan.history(&case).unwrap();
    assert_eq!(history.len(), 2, "once in the history");
}

/// A Welcome joined, and the read cut short before the case was recorded
/// (a kill between the MLS state and `cases.json`): the next read records
/// it, so the case can be answered, rather than leaving it with no address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_joined_just_before_a_crash_is_recorded_at_the_next_read() {
    let fed = federation_with_keys().await;
    let mut alice = worker(&fed, 0, "alice");
    let case = refer_to(&mut alice, "user:dan@southvale", b"first referral").await;
    let dan_api = fed.api(1, "dan").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            dan_api.inbox(Duration::ZERO).await.unwrap().messages.len() == 2
        })
        .await
    );
    let (id, bytes) = first_waiting(&dan_api).await;
    // dan's client as the crash left it: joined (in its MLS state), the
    // Welcome marked as being processed, the case not recorded.
    let config = ClientConfig::load(&fed.client_config_path(1, "dan")).unwrap();
    let dir = config.data_directory();
    {
        let mut mls = client::mls::MlsClient::open(&dir, "spiffe://southvale/user/dan").unwrap();
        assert_eq!(mls.join(&bytes).unwrap().1, case);
    }
    let meta_path = dir.join("cases.json");
    let mut meta: serde_json::Value = match std::fs::read(&meta_path) {
        Ok(b) => serde_json::from_slice(&b).unwrap(),
        Err(_) => serde_json::json!({}),
    };
    meta["processing"] = serde_json::json!([id.to_string()]);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();

    let mut dan = worker(&fed, 1, "dan");
    let events = read_until(&mut dan, |e| !texts(e).is_empty()).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { case_id, .. } if *case_id == case)),
        "{events:?}"
    );
    assert_eq!(texts(&events), ["first referral"]);
    dan.send(&case, &category("update"), b"answered", None, None)
        .await
        .unwrap();
    assert_eq!(texts(&read(&mut alice).await), ["answered"]);
}

/// Sends `to` a case "handed over" by gita, who is not in it: a transfer
/// group of her own, and in it a transfer for `case` with a chronology she
/// made up, her own address as the case's, and a genuine KeyPackage of
/// `to`'s she claimed, named as the one the handover adds them with.
async fn forged_handover(
    fed: &Federation,
    to_user: &str,
    case: &str,
    key: &str,
) -> (client::Api, Vec<proto::MessageId>) {
    let southvale = fed.index("southvale");
    let api = fed.api(southvale, "gita").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut mls = client::mls::MlsClient::open(dir.path(), "spiffe://southvale/user/gita").unwrap();
    // A chronology for the case, exported by her.
    let made_up = mls.create_group(case).unwrap();
    mls.encrypt(&made_up, b"forged entry").unwrap();
    let history = mls.export_history(&made_up).unwrap();
    let claim = || async {
        let claimed = api.claim(&to(to_user)).await.unwrap();
        claimed.key_packages[0].key_package.0.clone()
    };
    let (for_transfer, named) = (claim().await, claim().await);
    let transfer = serde_json::json!({
        "case_id": case,
        "addresses": ["user:gita@southvale"],
        "history": history,
        "fled_from": [],
        "key_package": hex::encode(mls.key_package_ref(&named).unwrap()),
    });
    let group = mls.create_group(&format!("transfer:{case}:{key}")).unwrap();
    let (_, welcome) = mls.add_members(&group, &[for_transfer]).unwrap();
    let message = mls
        .encrypt(&group, &serde_json::to_vec(&transfer).unwrap())
        .unwrap();
    let mut sent = Vec::new();
    for (i, body) in [welcome, message].into_iter().enumerate() {
        let req = proto::SubmitRequest {
            idempotency_key: proto::IdempotencyKey::new(format!("{key}-{i}")).unwrap(),
            recipient: to(to_user),
            category: category("handover"),
            urgent: false,
            kind: proto::MessageKind::Mls,
            disclosure: None,
            commit_proof: None,
            body: proto::Body(body),
        };
        sent.push(api.submit(&req).await.unwrap().message_id);
    }
    (api, sent)
}

/// `w` reads until `sender`'s messages `ids` are acknowledged (they may
/// show nothing), returning what it read.
async fn read_acknowledging(
    w: &mut Caseworker,
    sender: &client::Api,
    ids: &[proto::MessageId],
) -> Vec<Event> {
    let mut events = Vec::new();
    for _ in 0..100 {
        events.extend(w.read(Duration::from_secs(1)).await.unwrap());
        let mut all = true;
        for id in ids {
            all &= sender.status(id).await.unwrap().status == proto::Status::Acknowledged;
        }
        if all {
            return events;
        }
    }
    panic!("{ids:?} were not acknowledged; read {events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_handed_over_by_someone_whose_handover_did_not_add_us_is_not_taken_up() {
    let fed = federation_with_keys().await;
    let mut alice = worker(&fed, 0, "alice");
    let case = refer_to(&mut alice, "team:duty@southvale", b"first referral").await;
    let mut dan = worker(&fed, 1, "dan");
    assert_eq!(texts(&read(&mut dan).await), ["first referral"]);

    // gita, outside the case, hands it to bob before alice does.
    let (gita, forged) = forged_handover(&fed, "user:bob@northshire", &case, "forged-before").await;
    let mut bob = worker(&fed, 0, "bob");
    let early = read_acknowledging(&mut bob, &gita, &forged).await;
    assert!(
        !early.iter().any(|e| matches!(e, Event::History { .. })),
        "{early:?}"
    );

    // alice's real handover; dan commits it; bob joins.
    alice
        .handover(&case, &to("user:bob@northshire"), None)
        .await
        .unwrap();
    read(&mut dan).await;
    let mut events = early;
    events.extend(joins(&mut bob, &case).await);
    let alice_uri = "spiffe://northshire/user/alice";
    let gita_uri = "spiffe://southvale/user/gita";
    assert!(
        events.iter().any(|e| matches!(e, Event::History { from, entries, .. } if from == alice_uri && *entries >= 1)),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e, Event::HandoverRefused { case_id, from } if *case_id == case && from == gita_uri)),
        "{events:?}"
    );
    let chronology = |bob: &Caseworker| -> Vec<String> {
        bob.history(&case)
            .unwrap()
            .iter()
            .map(|e| String::from_utf8_lossy(&e.plaintext).into_owned())
            .collect()
    };
    let history = chronology(&bob);
    assert!(
        history.contains(&"first referral".to_owned()),
        "{history:?}"
    );
    assert!(!history.contains(&"forged entry".to_owned()), "{history:?}");
    let addresses = bob.addresses(&case);
    assert!(
        !addresses.contains(&to("user:gita@southvale")),
        "{addresses:?}"
    );
    assert!(
        addresses.contains(&to("team:duty@southvale")),
        "{addresses:?}"
    );

    // Once bob is in the case, another is refused as well.
    let (_, forged) = forged_handover(&fed, "user:bob@northshire", &case, "forged-after").await;
    let late = read_acknowledging(&mut bob, &gita, &forged).await;
    assert!(
        late.iter()
            .any(|e| matches!(e, Event::HandoverRefused { from, .. } if from == gita_uri)),
        "{late:?}"
    );
    assert!(!chronology(&bob).contains(&"forged entry".to_owned()));
    // bob's reply goes to the case, not to gita.
    bob.send(&case, &category("update"), b"from the new lead", None, None)
        .await
        .unwrap();
    assert_eq!(texts(&read(&mut dan).await), ["from the new lead"]);
}

/// Whether `who` (an identity's ending, `/user/hana`) was added.
fn added(who: &'static str) -> impl Fn(&[Event]) -> bool {
    move |events: &[Event]| {
        events.iter().any(|e| {
            matches!(e, Event::Membership { added, .. }
            if added.iter().any(|a| a.ends_with(who)))
        })
    }
}

/// alice (northshire, the case's home) refers to dan (southvale) and adds
/// hana (eastmoor): three members behind three gateways, all joined.
/// Returns alice, the case, dan and hana.
async fn a_case_in_three_areas(fed: &Federation) -> (Caseworker, String, Caseworker, Caseworker) {
    let mut alice = worker(fed, 0, "alice");
    let case = refer_to(&mut alice, "user:dan@southvale", b"first referral").await;
    let mut dan = worker(fed, fed.index("southvale"), "dan");
    joins(&mut dan, &case).await;
    alice
        .add(&case, &to("user:hana@eastmoor"), None)
        .await
        .unwrap();
    assert!(added("/user/hana")(
        &read_until(&mut dan, added("/user/hana")).await
    ));
    let mut hana = worker(fed, fed.index("eastmoor"), "hana");
    joins(&mut hana, &case).await;
    (alice, case, dan, hana)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_made_through_different_gateways_for_one_epoch_are_ordered_at_the_cases_home() {
    let fed = federation_with_keys().await;
    let (mut alice, case, mut dan, mut hana) = a_case_in_three_areas(&fed).await;

    // dan and hana both change the case in the same epoch, each through
    // their own gateway: the case's home takes dan's, and hana's is
    // refused as stale there, though her own gateway has never seen the
    // epoch taken.
    dan.add(&case, &to("user:gita@southvale"), None)
        .await
        .unwrap();
    let e = hana
        .add(&case, &to("user:bob@northshire"), None)
        .await
        .unwrap_err();
    assert!(matches!(&e, CaseError::Overtaken(c) if *c == case), "{e:?}");

    // So the case does not fork: hana reads dan's change and the case goes
    // on for all three.
    assert!(added("/user/gita")(
        &read_until(&mut hana, added("/user/gita")).await
    ));
    assert!(added("/user/gita")(
        &read_until(&mut alice, added("/user/gita")).await
    ));
    let says = |text: &'static str| move |events: &[Event]| texts(events).iter().any(|t| t == text);
    dan.send(&case, &category("update"), b"from southvale", None, None)
        .await
        .unwrap();
    assert!(says("from southvale")(
        &read_until(&mut hana, says("from southvale")).await
    ));
    // hana, added by alice, reaches dan too (a newcomer knows every
    // member's address, not only whoever added her).
    hana.send(&case, &category("update"), b"from eastmoor", None, None)
        .await
        .unwrap();
    assert!(says("from eastmoor")(
        &read_until(&mut alice, says("from eastmoor")).await
    ));
    assert!(says("from eastmoor")(
        &read_until(&mut dan, says("from eastmoor")).await
    ));
}

/// Gateways keep order per link, not across them: a reply that follows a
/// change to its case can reach a member before the change does (the
/// changer's gateway cannot reach the member's for a while). It waits,
/// unread and unacknowledged, and is read once the change is; before, it
/// was refused for good and the reply was never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_overtakes_the_change_it_follows_waits_for_it() {
    let fed = federation_with_keys().await;
    let (south, east) = (fed.index("southvale"), fed.index("eastmoor"));
    let (mut alice, case, mut dan, mut hana) = a_case_in_three_areas(&fed).await;
    // eastmoor loses its way to southvale (its change waits in its queue),
    // while northshire still reaches both.
    let url = format!("url = \"https://127.0.0.1:{}\"", fed.port(south).unwrap());
    let nowhere = "url = \"https://127.0.0.1:1\"";
    fed.edit_config(east, &url, nowhere).unwrap();
    reload(&fed, east).await;
    hana.add(&case, &to("user:bob@northshire"), None)
        .await
        .unwrap();
    assert!(added("/user/bob")(
        &read_until(&mut alice, added("/user/bob")).await
    ));
    alice
        .send(&case, &category("update"), b"after bob joined", None, None)
        .await
        .unwrap();
    // dan gets alice's reply first: it waits, and dan is told so, once.
    let waits = |events: &[Event]| events.iter().any(|e| matches!(e, Event::Waiting { .. }));
    let events = read_until(&mut dan, waits).await;
    assert!(waits(&events), "{events:?}");
    assert!(texts(&events).is_empty(), "{events:?}");
    assert!(
        !events.iter().any(|e| matches!(e, Event::Refused { .. })),
        "{events:?}"
    );
    let again = dan.read(Duration::ZERO).await.unwrap();
    assert!(again.is_empty(), "told once, nothing refused: {again:?}");
    // Unacknowledged: it stays in dan's inbox, and alice is not told a
    // person has read it.
    let listed = fed
        .api(south, "dan")
        .unwrap()
        .inbox(Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(listed.messages.len(), 1, "{listed:?}");
    assert_eq!(listed.messages[0].envelope.category.as_str(), "update");
    // eastmoor reaches southvale again: the change, then the reply.
    fed.edit_config(east, nowhere, &url).unwrap();
    reload(&fed, east).await;
    let says = |text: &'static str| move |events: &[Event]| texts(events).iter().any(|t| t == text);
    let events = read_until(&mut dan, says("after bob joined")).await;
    assert!(says("after bob joined")(&events), "{events:?}");
    assert!(added("/user/bob")(&events), "{events:?}");
    assert!(
        !events.iter().any(|e| matches!(e, Event::Refused { .. })),
        "{events:?}"
    );
}

/// A message is acknowledged (its sender told a person has it) only once
/// what it brought was shown: a `read` whose output fails (closed, say)
/// stops there, and the message stays in the inbox; one that shows it
/// acknowledges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_acknowledged_only_once_its_reader_was_shown_it() {
    let fed = federation_with_keys().await;
    let (mut alice, case, mut bob) = alice_refers_to_bob(&fed).await;
    alice
        .send(&case, &category("update"), b"shown first", None, None)
        .await
        .unwrap();
    let inbox = || async {
        fed.api(0, "bob")
            .unwrap()
            .inbox(Duration::ZERO)
            .await
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            inbox().await.messages.len() == 1
        })
        .await
    );
    bob.show_as_read(Box::new(|_| {
        Err(std::io::Error::other("standard output is closed"))
    }));
    let e = bob.read(Duration::from_secs(5)).await.unwrap_err();
    let output = |e: &CaseError| match e {
        CaseError::Output(_) => true,
        CaseError::Interrupted { error, .. } => matches!(**error, CaseError::Output(_)),
        _ => false,
    };
    assert!(output(&e), "{e:?}");
    assert_eq!(inbox().await.messages.len(), 1, "not acknowledged");
    // Shown, it is acknowledged.
    let shown = Arc::new(Mutex::new(Vec::new()));
    let into = shown.clone();
    bob.show_as_read(Box::new(move |e| {
        into.lock().unwrap().push(format!("{e}"));
        Ok(())
    }));
    let events = bob.read(Duration::from_secs(5)).await.unwrap();
    assert!(inbox().await.messages.is_empty(), "acknowledged once shown");
    // Its keys were used up by the read that could not show it: the
    // reader is told where it is.
    assert!(
        matches!(&events[..], [Event::ReadBefore { case_id: Some(c), .. }] if *c == case),
        "{events:?}"
    );
    let shown = shown.lock().unwrap();
    assert_eq!(shown.len(), 1);
    assert!(shown[0].contains("client history --case"), "{shown:?}");
    let history = bob.history(&case).unwrap();
    assert!(
        history.iter().any(|h| h.plaintext == b"shown first"),
        "the case's history has it"
    );
}

/// A reply its gateway could not take (out of reach) is kept, and the
/// next `read` sends it: the same bytes under the same keys, so it reaches
/// the case once, and the worker need not (must not) write it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_its_gateway_could_not_take_is_kept_and_sent_by_the_next_read() {
    let mut fed = federation_with_keys().await;
    let north = fed.index("northshire");
    let mut alice = impatient_worker(&fed, north, "alice");
    let case = refer_to(&mut alice, "user:dan@southvale", b"first referral").await;
    let mut dan = worker(&fed, fed.index("southvale"), "dan");
    joins(&mut dan, &case).await;
    fed.stop(north).await;
    let e = alice
        .send(&case, &category("update"), b"kept while away", None, None)
        .await
        .unwrap_err();
    assert!(matches!(e, CaseError::Kept { .. }), "{e:?}");
    assert!(e.to_string().contains("do not send it again"), "{e}");
    // A new message while it still cannot go: nothing new is made (the
    // case's messages go in order), and the worker is told so.
    let e = alice
        .send(&case, &category("update"), b"not made", None, None)
        .await
        .unwrap_err();
    assert!(matches!(e, CaseError::EarlierKept { .. }), "{e:?}");
    assert!(e.to_string().contains("nothing new was sent"), "{e}");
    fed.start(north).await.unwrap();
    // The next read sends it; another read does not send it again.
    alice.read(Duration::ZERO).await.unwrap();
    alice.read(Duration::ZERO).await.unwrap();
    let says = |text: &'static str| move |events: &[Event]| texts(events).iter().any(|t| t == text);
    let events = read_until(&mut dan, says("kept while away")).await;
    assert_eq!(
        texts(&events)
            .iter()
            .filter(|t| *t == "kept while away")
            .count(),
        1,
        "{events:?}"
    );
    // And the case goes on.
    alice
        .send(&case, &category("update"), b"and after", None, None)
        .await
        .unwrap();
    assert!(says("and after")(
        &read_until(&mut dan, says("and after")).await
    ));
    let more = dan.read(Duration::ZERO).await.unwrap();
    assert!(texts(&more).is_empty(), "nothing twice: {more:?}");
    let history = dan.history(&case).unwrap();
    assert!(
        !history.iter().any(|h| h.plaintext == b"not made"),
        "{history:?}"
    );
}

/// `user` of area `area`, whose client tries a submission again for a
/// moment only (not a minute) while its gateway is out of reach or busy.
fn impatient_worker(fed: &Federation, area: usize, user: &str) -> Caseworker {
    let config = ClientConfig::load(&fed.client_config_path(area, user)).unwrap();
    let api = client::Api::new(&config)
        .unwrap()
        .retrying_for(Duration::from_millis(300));
    Caseworker::open(&config, api).unwrap()
}

/// alice's referral to dan under key `ref-kept`.
async fn refer_kept(alice: &mut Caseworker) -> Result<(String, Vec<String>), CaseError> {
    alice
        .refer(
            &to("user:dan@southvale"),
            &category("relocation"),
            false,
            b"kept referral",
            None,
            Some("ref-kept".into()),
            None,
        )
        .await
}

/// A referral cut short after it was made (its gateway busy) is kept under
/// its key, and the worker is told to run the same `refer` with that key:
/// which finishes it, the same case, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referral_cut_short_says_which_key_finishes_it() {
    let mut fed = federation_with_keys().await;
    let north = fed.index("northshire");
    // alice's gateway takes three requests at once, then one a second.
    fed.stop(north).await;
    fed.edit_config(
        north,
        "user_requests_per_second = 100000\nuser_burst = 100000",
        "user_requests_per_second = 1\nuser_burst = 3",
    )
    .unwrap();
    fed.start(north).await.unwrap();
    let mut alice = impatient_worker(&fed, north, "alice");
    let e = refer_kept(&mut alice).await.unwrap_err();
    let CaseError::ReferralKept { key, case_id, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(key, "ref-kept");
    assert!(e.to_string().contains("--key ref-kept"), "{e}");
    let case_id = case_id.clone();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (again, _) = refer_kept(&mut alice).await.unwrap();
    assert_eq!(again, case_id, "the same case");
    let mut dan = worker(&fed, fed.index("southvale"), "dan");
    let events = joins(&mut dan, &case_id).await;
    let events = if texts(&events).is_empty() {
        read_until(&mut dan, |e| !texts(e).is_empty()).await
    } else {
        events
    };
    assert_eq!(texts(&events), ["kept referral"]);
}

/// An MLS Commit (`body`) submitted to `to_whom` under `key`, with `proof`.
fn commit_to(
    to_whom: &str,
    key: &str,
    body: Vec<u8>,
    proof: Option<proto::CommitProof>,
) -> proto::SubmitRequest {
    proto::SubmitRequest {
        idempotency_key: proto::IdempotencyKey::new(key.to_owned()).unwrap(),
        recipient: to(to_whom),
        category: category("membership"),
        urgent: false,
        kind: proto::MessageKind::Mls,
        disclosure: None,
        commit_proof: proof,
        body: proto::Body(body),
    }
}

/// A submission refused as a Commit no member of the epoch proved.
fn refused_unproven(r: Result<proto::SubmitResponse, client::ClientError>) {
    match r {
        Err(client::ClientError::Api { status, code, .. }) => {
            assert_eq!((status, code), (403, ErrorCode::UnprovenCommit));
        }
        other => panic!("taken: {other:?}"),
    }
}

/// alice hands `case` to bob (northshire); `committer`, reading, commits
/// it, and she is out; bob joins. Returns bob.
async fn alice_hands_over_to_bob(
    fed: &Federation,
    alice: &mut Caseworker,
    case: &str,
    committer: &mut Caseworker,
) -> Caseworker {
    alice
        .handover(case, &to("user:bob@northshire"), None)
        .await
        .unwrap();
    let events = read(committer).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Membership { removed, .. }
        if removed.iter().any(|r| r.ends_with("/user/alice")))),
        "{events:?}"
    );
    let mut bob = worker(fed, fed.index("northshire"), "bob");
    joins(&mut bob, case).await;
    bob
}

/// `by` adds `user` (of southvale) to `case`, and `reader` reads that.
async fn adds(by: &mut Caseworker, case: &str, user: &str, reader: &mut Caseworker) {
    by.add(case, &to(&format!("user:{user}@southvale")), None)
        .await
        .unwrap();
    let suffix = format!("/user/{user}");
    let added = |events: &[Event]| {
        events.iter().any(|e| {
            matches!(e, Event::Membership { added, .. }
            if added.iter().any(|a| a.ends_with(&suffix)))
        })
    };
    assert!(added(&read_until(reader, added).await));
}

/// A new case's first epoch is bound at its home, with its proof, before
/// the Welcome goes out: so its first change takes a proof too, and
/// someone who learns the group's id from a message's framing (a team
/// member outside the case, say) cannot freeze the case before it changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cases_first_change_takes_a_proof_too() {
    let mut fed = federation_with_keys().await;
    let (north, south) = (fed.index("northshire"), fed.index("southvale"));
    let mut alice = worker(&fed, north, "alice");
    let case = refer_to(&mut alice, "user:dan@southvale", b"referral").await;
    let db = rusqlite::Connection::open(fed.db_path(north)).unwrap();
    let (group, epoch, keyed): (String, i64, bool) = db
        .query_row(
            "SELECT group_id, epoch, next_key IS NOT NULL FROM group_commits",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((epoch, keyed), (0, true));
    let junk = tests::made_up_commit(&hex::decode(&group).unwrap(), 1);
    let submission = commit_to("user:dan@southvale", "first-junk", junk, None);
    refused_unproven(
        fed.api(south, "gita")
            .unwrap()
            .submit_once(&submission)
            .await,
    );
    // The members' first change goes through.
    let mut dan = worker(&fed, south, "dan");
    assert_eq!(texts(&read(&mut dan).await), ["referral"]);
    adds(&mut dan, &case, "gita", &mut alice).await;
    fed.stop_all().await;
}

/// A member removed from a case knows its group id, and its epochs can be
/// counted: before proofs, a Commit of her making (any bytes so framed)
/// could take the case's next epoch at its home, and every real change
/// after it was refused `stale_epoch` for good. Now the home takes a
/// Commit only with a proof signed with the current epoch's key, which only
/// its members can derive: hers is refused, at the home and through
/// another gateway, and the members' next change goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_from_a_case_cannot_take_its_next_epoch() {
    let mut fed = federation_with_keys().await;
    let (north, south) = (fed.index("northshire"), fed.index("southvale"));
    let mut alice = worker(&fed, north, "alice");
    let case = refer_to(&mut alice, "team:duty@southvale", b"first referral").await;
    let mut dan = worker(&fed, south, "dan");
    assert_eq!(texts(&read(&mut dan).await), ["first referral"]);
    // alice hands the case to bob; dan commits it, and she is out.
    let mut bob = alice_hands_over_to_bob(&fed, &mut alice, &case, &mut dan).await;

    // What she knows: the group, and the epoch after the newest bound.
    let db = rusqlite::Connection::open(fed.db_path(north)).unwrap();
    let (group, epoch): (String, i64) = db
        .query_row(
            "SELECT group_id, MAX(epoch) FROM group_commits GROUP BY group_id",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let bound = |sql: &str| {
        fed.count(north, &format!("SELECT COUNT(*) FROM group_commits{sql}"))
            .unwrap()
    };
    let keyed = " WHERE next_key IS NOT NULL";
    let (before, keyed_before) = (bound(""), bound(keyed));
    let epoch = u64::try_from(epoch).unwrap();
    let junk = tests::made_up_commit(&hex::decode(&group).unwrap(), epoch + 1);
    let hash = proto::Body(junk.clone()).hash();
    let submission = |key: &str, proof: Option<proto::CommitProof>| {
        commit_to("user:bob@northshire", key, junk.clone(), proof)
    };
    // A key of her choosing (she cannot derive the epoch's).
    let guessed = proto::CommitProof::make(&[1; 32], &[2; 32], &group, epoch + 1, &hash);
    let refused = refused_unproven;
    // At the case's home, through her own gateway; and through another
    // area's gateway, which asks the home.
    let at_home = fed.api(north, "alice").unwrap();
    refused(at_home.submit_once(&submission("junk-1", None)).await);
    refused(
        at_home
            .submit_once(&submission("junk-2", Some(guessed.clone())))
            .await,
    );
    let elsewhere = fed.api(south, "gita").unwrap();
    refused(
        elsewhere
            .submit_once(&submission("junk-3", Some(guessed)))
            .await,
    );
    assert_eq!(
        bound(""),
        before,
        "an epoch was bound to a Commit no member made"
    );
    assert_eq!(
        fed.count(
            north,
            "SELECT COUNT(*) FROM sent WHERE idem_key LIKE 'junk-%'"
        )
        .unwrap(),
        0
    );

    // The members' next change takes the epoch, with its proof, and the
    // case goes on.
    adds(&mut dan, &case, "gita", &mut bob).await;
    assert_eq!(bound(keyed), keyed_before + 1);
    fed.stop_all().await;
}

/// A member removed from a case has the Commit that removed her (it came to
/// her). Sent again through a gateway that is not the case's home, the
/// home takes it as the Commit it bound already; the record there follows
/// the home and keeps no key, so the key she names with it for the next
/// epoch (one she holds) cannot stop the members' next change there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_cannot_name_the_next_epochs_key_where_the_case_has_no_home() {
    let mut fed = federation_with_keys().await;
    let (north, south) = (fed.index("northshire"), fed.index("southvale"));
    // dan (southvale) refers to alice (northshire): southvale is the home.
    let mut dan = worker(&fed, south, "dan");
    let case = refer_to(&mut dan, "user:alice@northshire", b"referral").await;
    let mut alice = worker(&fed, north, "alice");
    assert_eq!(texts(&read(&mut alice).await), ["referral"]);
    let mut bob = alice_hands_over_to_bob(&fed, &mut alice, &case, &mut dan).await;

    // The Commit that removed her, as it came to her.
    let api = fed.api(north, "alice").unwrap();
    let waiting = api.inbox(Duration::ZERO).await.unwrap().messages;
    let item = waiting
        .iter()
        .find(|m| {
            m.envelope.sender.user.as_str() == "dan" && m.envelope.category.as_str() == "handover"
        })
        .expect("the Commit that removed her");
    let commit = api.fetch(&item.envelope.message_id).await.unwrap().body.0;
    let (group, epoch) = match proto::mls::MlsMessageInfo::parse(&commit).unwrap() {
        proto::mls::MlsMessageInfo::PrivateMessage(m)
        | proto::mls::MlsMessageInfo::PublicMessage(m) => (hex::encode(m.group_id()), m.epoch()),
        other => panic!("{other:?}"),
    };
    // Sent again by her, naming a next key of her own (she holds it).
    let own = proto::CommitProof::make(
        &[1; 32],
        &[9; 32],
        &group,
        epoch,
        &proto::Body(commit.clone()).hash(),
    );
    let again = commit_to("user:bob@northshire", "again-1", commit, Some(own));
    api.submit_once(&again).await.unwrap();
    assert_eq!(
        fed.count(
            north,
            "SELECT COUNT(*) FROM group_commits WHERE next_key IS NOT NULL"
        )
        .unwrap(),
        0,
        "a key was kept where the case has no home"
    );

    // bob, a member of the next epoch, changes the case through northshire.
    adds(&mut bob, &case, "gita", &mut dan).await;
    fed.stop_all().await;
}

/// A client upgraded while one of its changes to a case waited (staged
/// before it made proofs, the case's home out of reach): once the case's
/// changes carry proofs, that change is refused, dropped and told as such,
/// and the case goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_staged_before_proofs_is_dropped_and_the_case_goes_on() {
    let mut fed = federation_with_keys().await;
    let (north, south) = (fed.index("northshire"), fed.index("southvale"));
    let mut alice = worker(&fed, north, "alice");
    let case = refer_to(&mut alice, "user:dan@southvale", b"referral").await;
    let mut dan = worker(&fed, south, "dan");
    assert_eq!(texts(&read(&mut dan).await), ["referral"]);
    // dan's first change names the next epoch's key at the home.
    dan.add(&case, &to("user:gita@southvale"), None)
        .await
        .unwrap();
    // His next waits, the home out of reach (his client stopped while it
    // was sending it again)...
    fed.stop(north).await;
    let waited = tokio::time::timeout(
        Duration::from_secs(2),
        dan.add(&case, &to("user:farah@southvale"), None),
    )
    .await;
    assert!(waited.is_err(), "{waited:?}");
    // ...as a client from before proofs staged it.
    drop(dan);
    let meta_path = ClientConfig::load(&fed.client_config_path(south, "dan"))
        .unwrap()
        .data_directory()
        .join("cases.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["staged"][&case]["proof"] = serde_json::Value::Null;
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    fed.start(north).await.unwrap();

    let mut dan = worker(&fed, south, "dan");
    let events = read(&mut dan).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Overtaken { case_id } if *case_id == case)),
        "{events:?}"
    );
    // Made again, with its proof, it goes through.
    adds(&mut dan, &case, "farah", &mut alice).await;
    fed.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_waits_while_its_groups_home_gateway_is_out_of_reach() {
    let mut fed = federation_with_keys().await;
    let (north, south) = (fed.index("northshire"), fed.index("southvale"));
    // A group made by a northshire worker: northshire is its home.
    let dir = tempfile::tempdir().unwrap();
    let mut mls =
        client::mls::MlsClient::open(dir.path(), "spiffe://northshire/user/alice").unwrap();
    let group = mls.create_group("case-home-test").unwrap();
    let dan = fed.api(south, "dan").unwrap();
    let kp = dan.claim(&to("user:erin@southvale")).await.unwrap();
    let (commit, _) = mls
        .add_members(&group, &[kp.key_packages[0].key_package.0.clone()])
        .unwrap();
    let submission = proto::SubmitRequest {
        idempotency_key: proto::IdempotencyKey::new("home-test-commit".to_owned()).unwrap(),
        recipient: to("user:erin@southvale"),
        category: category("membership"),
        urgent: false,
        kind: proto::MessageKind::Mls,
        disclosure: None,
        commit_proof: None,
        body: proto::Body(commit),
    };
    // The home is down: southvale cannot order the Commit, so it takes
    // nothing, and says why.
    fed.stop(north).await;
    let r = dan.submit_once(&submission).await;
    match &r {
        Err(client::ClientError::Api {
            status,
            code,
            message,
            ..
        }) => {
            assert_eq!((*status, *code), (503, ErrorCode::Unavailable), "{message}");
            assert!(message.contains("northshire"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fed.count(south, "SELECT COUNT(*) FROM sent").unwrap(), 0);
    // Back, it binds the epoch to it, and takes the same Commit again.
    fed.start(north).await.unwrap();
    dan.submit_once(&submission).await.unwrap();
    dan.submit_once(&submission).await.unwrap();
    assert_eq!(
        fed.count(north, "SELECT COUNT(*) FROM group_commits")
            .unwrap(),
        1
    );
    fed.stop_all().await;
}

/// KeyPackages for `identity`, made with openmls as a client makes them,
/// but whose lifetime ends `secs` from now: a single-use one and a
/// last-resort one (as if published long ago).
fn short_lived_key_packages(identity: &str, secs: u64) -> Vec<Vec<u8>> {
    use openmls::prelude as om;
    use openmls::prelude::tls_codec::Serialize as _;
    let cs = om::Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
    let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let signer = openmls_basic_credential::SignatureKeyPair::new(cs.signature_algorithm()).unwrap();
    let credential = om::CredentialWithKey {
        credential: om::BasicCredential::new(identity.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    [false, true]
        .into_iter()
        .map(|last_resort| {
            let mut b = om::KeyPackage::builder()
                .key_package_lifetime(om::Lifetime::init(now - 60, now + secs));
            if last_resort {
                b = b.mark_as_last_resort();
            }
            b.build(cs, &provider, &signer, credential.clone())
                .unwrap()
                .key_package()
                .tls_serialize_detached()
                .unwrap()
        })
        .collect()
}

/// A team member whose published KeyPackages expire (within the hour) does not stop a
/// referral to the team: the gateway hands out none past its lifetime (the
/// member is told to the sender as one without keys), and the member's
/// client, which looks at its stock once a day when it reads, publishes
/// fresh ones, so the next referral reaches the whole team.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_keys_run_out_does_not_stop_a_referral_to_the_team() {
    let fed = Federation::standard().await.unwrap();
    for (area, u) in [(0, "alice"), (1, "dan"), (1, "farah")] {
        worker(&fed, area, u).publish_keys(5).await.unwrap();
    }
    // erin published long ago: what the gateway holds of hers runs out in
    // half an hour, too soon to be handed out (written to its database as
    // it stored them then).
    worker(&fed, 1, "erin").publish_keys(1).await.unwrap();
    let short = short_lived_key_packages("spiffe://southvale/user/erin", 1800);
    let erin_api = fed.api(1, "erin").unwrap();
    // Published now, ones that short-lived are not stored at all.
    let stock = erin_api.upload_key_packages(short.clone()).await.unwrap();
    assert_eq!((stock.stored, stock.available), (0, 1), "{stock:?}");
    let db = rusqlite::Connection::open(fed.db_path(1)).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute("DELETE FROM key_packages WHERE user_id = 'erin'", [])
        .unwrap();
    for kp in &short {
        let info = proto::mls::KeyPackageInfo::parse(kp).unwrap();
        db.execute(
            "INSERT INTO key_packages (kp_ref, user_id, key_package, last_resort, created_ms, not_after_s) VALUES (?1, 'erin', ?2, ?3, 0, ?4)",
            rusqlite::params![
                info.key_package_ref().to_string(),
                kp,
                info.is_last_resort(),
                info.lifetime().not_after as i64
            ],
        )
        .unwrap();
    }
    drop(db);

    let mut alice = worker(&fed, 0, "alice");
    let (case, missing) = refer_to_duty_missing(&mut alice).await;
    assert_eq!(missing, ["spiffe://southvale/user/erin"]);
    for u in ["dan", "farah"] {
        let events = read(&mut worker(&fed, 1, u)).await;
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Joined { case_id, .. } if *case_id == case)),
            "{u}: {events:?}"
        );
    }
    let erins = "SELECT COUNT(*) FROM key_packages WHERE user_id = 'erin'";
    assert_eq!(fed.count(1, erins).unwrap(), 0, "expired ones are removed");

    // A day after erin's client last looked, reading publishes fresh ones.
    let config = ClientConfig::load(&fed.client_config_path(1, "erin")).unwrap();
    let meta = config.data_directory().join("cases.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let checked = m["keys_checked_ms"].as_u64().unwrap();
    m["keys_checked_ms"] = (checked - 86_400_000).into();
    std::fs::write(&meta, serde_json::to_vec(&m).unwrap()).unwrap();
    let mut erin = worker(&fed, 1, "erin");
    erin.read(Duration::ZERO).await.unwrap();
    let stock = erin_api.key_package_stock().await.unwrap();
    assert!(!stock.low && stock.last_resort, "{stock:?}");
    // Read again at once: no more are published.
    erin.read(Duration::ZERO).await.unwrap();
    assert_eq!(
        erin_api.key_package_stock().await.unwrap().available,
        stock.available
    );
    drop(erin);

    let second = refer_to_duty(&mut alice).await;
    let events = read(&mut worker(&fed, 1, "erin")).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { case_id, .. } if *case_id == second)),
        "{events:?}"
    );
}
