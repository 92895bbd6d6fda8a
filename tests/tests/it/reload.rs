//! Reloading a running gateway's configuration: a leaver is out and a new
//! duty worker is in at once, without a restart (open connections and
//! long-polls stay); a reload that cannot be used changes nothing.

use std::time::Duration;

use certs::mint::Validity;
use certs::Identity;
use client::ClientError;
use gateway::{Config, GatewayError};
use proto::{AreaId, ErrorCode, Status};
use tests::{message, reaches, user, Federation, Settings};

const YEAR: Validity = Validity::For(Duration::from_secs(365 * 86_400));
const LIMIT: Duration = Duration::from_secs(20);

const BOB: &str = "\n[[users]]\nid = \"bob\"\norganisation = \"northshire-agency\"\nrole = \"police-officer\"\nteams = [\"exploitation-unit\"]\n";
const IVY: &str = "\n[[users]]\nid = \"ivy\"\norganisation = \"northshire-agency\"\nrole = \"social-worker\"\nteams = [\"duty\"]\n";

fn is_forbidden<T: std::fmt::Debug>(r: &Result<T, ClientError>) -> bool {
    matches!(
        r,
        Err(ClientError::Api {
            status: 403,
            code: ErrorCode::Forbidden,
            ..
        })
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_up_the_directory_at_once_and_a_bad_one_changes_nothing() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    fed.serve_metrics(a).unwrap();
    fed.start_all().await.unwrap();
    let path = fed.areas[a].config_path.clone();
    let original = std::fs::read_to_string(&path).unwrap();
    let reload_failed = || async {
        let text = fed.metrics_text(a).await.unwrap();
        assert!(text.contains("\ngateway_config_reload_failed "), "{text}");
        assert!(text.contains("\ngateway_teams_unrecorded 0\n"), "{text}");
        text.contains("\ngateway_config_reload_failed 1\n")
    };
    assert!(!reload_failed().await);
    assert!(original.contains(BOB), "{original}");
    let bob = fed.api(a, "bob").unwrap();
    bob.me().await.unwrap();
    let ivy_pair = fed
        .mint(
            a,
            &Identity::User(AreaId::new("northshire").unwrap(), user("ivy")),
            YEAR,
        )
        .unwrap();
    let ivy = fed.api_with(a, &ivy_pair).unwrap();
    assert!(
        is_forbidden(&ivy.me().await),
        "ivy is not in the directory yet"
    );

    // bob leaves, ivy joins the duty team, and a limit changes too.
    let edited =
        original
            .replacen(BOB, IVY, 1)
            .replacen("user_burst = 100000", "user_burst = 99999", 1);
    std::fs::write(&path, &edited).unwrap();
    // bob is waiting for his inbox meanwhile.
    let waiting = {
        let bob = bob.clone();
        tokio::spawn(async move { bob.inbox(Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gw = fed.gateway(a).unwrap();
    let r = gw.reload_file(&path).await.unwrap();
    assert_eq!(r.needs_restart, ["limits"]);
    // His long-poll ends refused, not as if he were still in the directory.
    let ended = waiting.await.unwrap();
    assert!(is_forbidden(&ended), "{ended:?}");
    assert!(!reload_failed().await);
    assert_eq!(r.users, 2);

    // At once, on bob's open connection too; nothing of his is stored.
    let sent_before = fed.count(a, "SELECT COUNT(*) FROM sent").unwrap();
    let attempt = bob
        .submit_once(&message("user:dan@southvale", "bob-after", b"x".to_vec()).unwrap())
        .await;
    assert!(is_forbidden(&attempt), "{attempt:?}");
    assert_eq!(
        fed.count(a, "SELECT COUNT(*) FROM sent").unwrap(),
        sent_before
    );
    // ivy works, and team duty@northshire now reaches her.
    assert_eq!(ivy.me().await.unwrap().teams.len(), 1);
    let dan = fed.api(b, "dan").unwrap();
    let to_duty = dan
        .submit(&message("team:duty@northshire", "to-duty", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(reaches(&dan, &to_duty.message_id, Status::Delivered, LIMIT).await);
    let inbox = ivy.inbox(Duration::from_secs(5)).await.unwrap();
    assert_eq!(inbox.messages.len(), 1);

    // Reloads that cannot be used change nothing: another area's
    // configuration, and one naming a revocation list that is not there
    // (while it would also let bob back in).
    let mut other = fed.config(b).unwrap();
    other.users = Config::load(&path).unwrap().users;
    assert!(matches!(
        gw.reload(other).await,
        Err(GatewayError::Reload(_))
    ));
    let broken = edited.replacen(IVY, &format!("{IVY}{BOB}"), 1).replacen(
        "ca = \"ca/ca.crt\"\n",
        "ca = \"ca/ca.crt\"\ncrls = [\"missing.crl\"]\n",
        1,
    );
    std::fs::write(&path, &broken).unwrap();
    let refused = gw.reload_file(&path).await;
    assert!(
        matches!(&refused, Err(GatewayError::Certs(_))),
        "{refused:?}"
    );
    assert!(refused.unwrap_err().to_string().contains("missing.crl"));
    assert!(reload_failed().await);
    // A file that is not valid TOML: the same.
    std::fs::write(&path, format!("{broken}\n[[users]]\nid =\n")).unwrap();
    assert!(matches!(
        gw.reload_file(&path).await,
        Err(GatewayError::Config(_))
    ));
    assert!(reload_failed().await);
    assert!(is_forbidden(&bob.me().await), "a failed reload let bob in");
    ivy.me().await.unwrap();

    // The same without the bad list: bob is back.
    std::fs::write(&path, broken.replacen("crls = [\"missing.crl\"]\n", "", 1)).unwrap();
    let r = gw.reload_file(&path).await.unwrap();
    assert_eq!(r.users, 3);
    assert!(!reload_failed().await);
    bob.me().await.unwrap();
    fed.stop_all().await;
}

/// Signs area `i`'s development policy again as version `version`.
fn resign(fed: &Federation, i: usize, version: u32) {
    let dir = fed.areas[i].dir.join("policy");
    let key = policy::PolicySigningKey::from_base64(
        std::fs::read_to_string(dir.join("policy.key"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.join("policy.toml"))
        .unwrap()
        .replacen("version = 1\n", &format!("version = {version}\n"), 1);
    let signed = policy::SignedPolicy::sign(&text, &key).unwrap();
    std::fs::write(dir.join("policy.signed"), signed.to_text()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_up_a_newer_sharing_policy_and_refuses_an_older_one() {
    let settings = Settings {
        policies: true,
        ..Settings::default()
    };
    let mut fed = Federation::create(&tests::standard_areas(), &settings).unwrap();
    let a = fed.index("northshire");
    fed.start(a).await.unwrap();
    let alice = fed.api(a, "alice").unwrap();
    let served = || async { alice.policy_text().await.unwrap().unwrap() };
    assert!(served().await.contains("version = 1\n"));
    let gw = fed.gateway(a).unwrap();
    let path = fed.areas[a].config_path.clone();

    resign(&fed, a, 2);
    let r = gw.reload(Config::load(&path).unwrap()).await.unwrap();
    assert_eq!(r.policy_version, Some(2));
    assert!(r.needs_restart.is_empty(), "{:?}", r.needs_restart);
    assert!(served().await.contains("version = 2\n"));

    // Going back would contradict what peers and clients hold already.
    resign(&fed, a, 1);
    let back = gw.reload(Config::load(&path).unwrap()).await;
    assert!(
        matches!(&back, Err(GatewayError::Reload(m)) if m.contains("go back from version 2 to 1")),
        "{back:?}"
    );
    assert!(served().await.contains("version = 2\n"));

    // A policy file that does not verify changes nothing either.
    let signed = fed.areas[a].dir.join("policy").join("policy.signed");
    let text = std::fs::read_to_string(&signed).unwrap();
    std::fs::write(&signed, text.replacen("version = 1", "version = 9", 1)).unwrap();
    assert!(gw.reload(Config::load(&path).unwrap()).await.is_err());
    assert!(served().await.contains("version = 2\n"));
    fed.stop(a).await;
}

/// The certificate area `i`'s gateway presents to a new connection now.
async fn served_certificate(fed: &Federation, i: usize, user: &str) -> Vec<u8> {
    let stream = fed.tls_connect(i, user).await.unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    certs::parse_certs(pem, "certificate").unwrap()[0]
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_up_a_renewed_gateway_certificate_and_refuses_an_expired_one() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    fed.serve_metrics(a).unwrap();
    fed.start_all().await.unwrap();
    let dir = fed.areas[a].dir.clone();
    let before = std::fs::read_to_string(dir.join("gateway.crt")).unwrap();
    assert_eq!(served_certificate(&fed, a, "alice").await, der(&before));
    let alice = fed.api(a, "alice").unwrap();
    alice.me().await.unwrap();

    // The operator renews the certificate (a new key too) and reloads.
    let northshire = Identity::Gateway(AreaId::new("northshire").unwrap());
    let renewed = fed.mint(a, &northshire, YEAR).unwrap();
    std::fs::write(dir.join("gateway.crt"), &renewed.cert).unwrap();
    std::fs::write(dir.join("gateway.key"), &renewed.key).unwrap();
    let gw = fed.gateway(a).unwrap();
    let path = fed.areas[a].config_path.clone();
    let r = gw.reload_file(&path).await.unwrap();
    assert!(r.needs_restart.is_empty(), "{:?}", r.needs_restart);
    assert_eq!(
        served_certificate(&fed, a, "alice").await,
        der(&renewed.cert)
    );
    // The open connection goes on; a new one is made with the new certificate.
    alice.me().await.unwrap();
    fed.api(a, "bob").unwrap().me().await.unwrap();
    let not_after = certs::not_after(&der(&renewed.cert)).unwrap();
    let text = fed.metrics_text(a).await.unwrap();
    assert!(
        text.contains(&format!(
            "gateway_certificate_not_after_seconds{{certificate=\"gateway\"}} {not_after}\n"
        )),
        "{text}"
    );
    // The federation works both ways with it: southvale's gateway sees the
    // renewed certificate as a client (northshire's peer client was rebuilt)
    // and as a server.
    let sent = alice
        .submit(&message("user:dan@southvale", "after-renewal", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(reaches(&alice, &sent.message_id, Status::Delivered, LIMIT).await);
    let dan = fed.api(b, "dan").unwrap();
    dan.fetch(&sent.message_id).await.unwrap();
    assert!(reaches(&alice, &sent.message_id, Status::Fetched, LIMIT).await);

    // An expired certificate in the files: the reload is refused, naming
    // it, and the renewed one stays in use.
    let expired = fed.mint(a, &northshire, Validity::Expired).unwrap();
    std::fs::write(dir.join("gateway.crt"), &expired.cert).unwrap();
    std::fs::write(dir.join("gateway.key"), &expired.key).unwrap();
    let refused = gw.reload_file(&path).await;
    assert!(
        matches!(
            &refused,
            Err(GatewayError::Certs(certs::CertError::Expired { .. }))
        ),
        "{refused:?}"
    );
    assert_eq!(
        served_certificate(&fed, a, "alice").await,
        der(&renewed.cert)
    );
    // A key that does not match the certificate is refused too.
    std::fs::write(dir.join("gateway.crt"), &renewed.cert).unwrap();
    let refused = gw.reload_file(&path).await;
    assert!(refused.is_err(), "a mismatched key was taken: {refused:?}");
    assert_eq!(
        served_certificate(&fed, a, "alice").await,
        der(&renewed.cert)
    );
    fed.stop_all().await;
}

/// southvale moves to a new CA without a restart anywhere: each side takes
/// up a bundle of both CAs, then southvale's gateway a certificate from the
/// new one; the federation carries messages both ways throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_area_moves_to_a_new_ca_by_reloads_alone() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    fed.start_all().await.unwrap();
    let alice = fed.api(a, "alice").unwrap();
    let dan = fed.api(b, "dan").unwrap();
    let round_trip = |key: &'static str| {
        let (alice, dan) = (&alice, &dan);
        async move {
            let sent = alice
                .submit(&message("user:dan@southvale", key, b"x".to_vec()).unwrap())
                .await
                .unwrap();
            assert!(reaches(alice, &sent.message_id, Status::Delivered, LIMIT).await);
            dan.fetch(&sent.message_id).await.unwrap();
            assert!(reaches(alice, &sent.message_id, Status::Fetched, LIMIT).await);
        }
    };
    round_trip("before").await;

    let south = fed.areas[b].dir.clone();
    let old_ca = std::fs::read_to_string(south.join("ca").join("ca.crt")).unwrap();
    let new_ca = certs::mint::Ca::new(&AreaId::new("southvale").unwrap()).unwrap();
    let bundle = format!("{old_ca}{}", new_ca.pem().cert);
    // 1. Both sides trust both CAs (northshire pins the bundle to southvale).
    std::fs::write(south.join("ca").join("ca.crt"), &bundle).unwrap();
    for i in [a, b] {
        let path = fed.areas[i].config_path.clone();
        let r = fed.gateway(i).unwrap().reload_file(&path).await.unwrap();
        assert!(r.needs_restart.is_empty(), "{:?}", r.needs_restart);
    }
    round_trip("bundle").await;
    // 2. southvale's gateway takes a certificate from the new CA.
    let renewed = new_ca
        .issue(&Identity::Gateway(AreaId::new("southvale").unwrap()), YEAR)
        .unwrap();
    std::fs::write(south.join("gateway.crt"), &renewed.cert).unwrap();
    std::fs::write(south.join("gateway.key"), &renewed.key).unwrap();
    let path = fed.areas[b].config_path.clone();
    fed.gateway(b).unwrap().reload_file(&path).await.unwrap();
    // dan's certificate is still from the old CA, in the bundle: he gets in.
    dan.me().await.unwrap();
    // southvale's peer clients were rebuilt, so its status updates come on
    // a new connection with the new certificate. northshire's open
    // connection to southvale goes on as it is; a reload there rebuilds
    // its peer clients too, so its next batch verifies the new one.
    let path = fed.areas[a].config_path.clone();
    fed.gateway(a).unwrap().reload_file(&path).await.unwrap();
    round_trip("new-ca").await;
    fed.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_peers_in_and_out_and_follows_a_peer_to_its_new_address() {
    let mut fed = Federation::standard().await.unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    let path = fed.areas[a].config_path.clone();
    let entry = fed.peer_entry(b).unwrap();
    let alice = fed.api(a, "alice").unwrap();
    let dan = fed.api(b, "dan").unwrap();
    let send = |api: &client::Api, to: &str, key: &str| {
        let m = message(to, key, b"x".to_vec()).unwrap();
        let api = api.clone();
        async move { api.submit(&m).await }
    };

    // southvale is away; a message for it waits in northshire's queue.
    fed.stop(b).await;
    let waiting = send(&alice, "team:duty@southvale", "waiting")
        .await
        .unwrap();

    // northshire takes southvale out of its peers.
    fed.edit_config(a, &entry, "\n").unwrap();
    let gw = fed.gateway(a).unwrap();
    let r = gw.reload_file(&path).await.unwrap();
    assert_eq!(r.peers.removed, [AreaId::new("southvale").unwrap()]);
    assert!(r.peers.added.is_empty() && r.peers.moved.is_empty());
    assert_eq!(r.given_back, 1);
    assert!(r.needs_restart.is_empty(), "{:?}", r.needs_restart);
    let reason = tests::undeliverable_reason(&alice, &waiting.message_id)
        .await
        .unwrap_or_default();
    assert!(reason.contains("no longer a federation peer"), "{reason}");
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM outbox").unwrap(), 0);
    // Nothing new is taken for it, and southvale's gateway is refused.
    let refused = send(&alice, "team:duty@southvale", "refused").await;
    assert!(
        matches!(
            &refused,
            Err(ClientError::Api {
                status: 404,
                code: ErrorCode::UnknownRecipient,
                ..
            })
        ),
        "{refused:?}"
    );
    // A repeat of what was stored before (its answer lost) is answered as
    // one, not refused for a peer that has gone since.
    let again = send(&alice, "team:duty@southvale", "waiting")
        .await
        .unwrap();
    assert!(
        again.duplicate && again.message_id == waiting.message_id,
        "{again:?}"
    );
    fed.start(b).await.unwrap();
    let from_dan = send(&dan, "user:alice@northshire", "from-dan")
        .await
        .unwrap();
    // dan is told northshire's gateway refuses his area's (at the
    // handshake: it no longer trusts southvale's CA).
    let refused_by_northshire = tests::eventually(LIMIT, || async {
        let st = dan.status(&from_dan.message_id).await.unwrap();
        st.status == Status::Accepted
            && st
                .waiting
                .is_some_and(|w| w.last_error.contains("AccessDenied"))
    })
    .await;
    assert!(
        refused_by_northshire,
        "{:?}",
        dan.status(&from_dan.message_id).await
    );
    assert_eq!(fed.count(a, "SELECT COUNT(*) FROM inbox").unwrap(), 0);

    // Taken in again: both ways work at once, and dan's message arrives.
    std::fs::write(&path, std::fs::read_to_string(&path).unwrap() + &entry).unwrap();
    let gw = fed.gateway(a).unwrap();
    let r = gw.reload_file(&path).await.unwrap();
    assert_eq!(r.peers.added, [AreaId::new("southvale").unwrap()]);
    assert_eq!(r.given_back, 0);
    let again = send(&alice, "team:duty@southvale", "again").await.unwrap();
    assert!(reaches(&alice, &again.message_id, Status::Delivered, LIMIT).await);
    assert!(reaches(&dan, &from_dan.message_id, Status::Delivered, LIMIT).await);

    // southvale at another address (the same gateway, spelt otherwise).
    let port = fed.port(b).unwrap();
    fed.edit_config(
        a,
        &format!("url = \"https://127.0.0.1:{port}\""),
        &format!("url = \"https://127.0.0.1:{port}/\""),
    )
    .unwrap();
    let r = gw.reload_file(&path).await.unwrap();
    assert_eq!(r.peers.moved, [AreaId::new("southvale").unwrap()]);
    assert!(r.peers.added.is_empty() && r.peers.removed.is_empty());
    let moved = send(&alice, "team:duty@southvale", "moved").await.unwrap();
    assert!(reaches(&alice, &moved.message_id, Status::Delivered, LIMIT).await);
    fed.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_peer_connection_is_let_go_once_the_peers_certificate_expires() {
    let mut fed = Federation::create(&tests::standard_areas(), &Settings::default()).unwrap();
    let (a, b) = (fed.index("northshire"), fed.index("southvale"));
    // southvale's gateway starts with a certificate valid a few seconds
    // (long enough for both to start and a first message to go on a slow
    // machine: a test that ran out of it would fail, not pass).
    let southvale = Identity::Gateway(AreaId::new("southvale").unwrap());
    let short = fed
        .mint(b, &southvale, Validity::For(Duration::from_secs(12)))
        .unwrap();
    let dir = fed.areas[b].dir.clone();
    std::fs::write(dir.join("gateway.crt"), &short.cert).unwrap();
    std::fs::write(dir.join("gateway.key"), &short.key).unwrap();
    fed.start_all().await.unwrap();
    let alice = fed.api(a, "alice").unwrap();
    let before = alice
        .submit(&message("user:dan@southvale", "before-expiry", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    assert!(reaches(&alice, &before.message_id, Status::Delivered, LIMIT).await);

    // Past its `notAfter`, northshire does not send over the connection it
    // opened while the certificate was valid: the message waits, and says
    // why.
    let not_after = certs::not_after(&der(&short.cert)).unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    while now() <= not_after + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = alice
        .submit(&message("user:dan@southvale", "after-expiry", b"x".to_vec()).unwrap())
        .await
        .unwrap();
    let told = tests::eventually(LIMIT, || async {
        let s = alice.status(&after.message_id).await.unwrap();
        s.waiting.is_some_and(|w| w.last_error.contains("expired"))
    })
    .await;
    let status = alice.status(&after.message_id).await.unwrap();
    assert!(told, "{status:?}");
    assert_eq!(status.status, Status::Accepted);

    // Renewed and reloaded: it goes.
    let renewed = fed.mint(b, &southvale, YEAR).unwrap();
    std::fs::write(dir.join("gateway.crt"), &renewed.cert).unwrap();
    std::fs::write(dir.join("gateway.key"), &renewed.key).unwrap();
    let path = fed.areas[b].config_path.clone();
    fed.gateway(b).unwrap().reload_file(&path).await.unwrap();
    assert!(reaches(&alice, &after.message_id, Status::Delivered, LIMIT).await);
    fed.stop_all().await;
}
