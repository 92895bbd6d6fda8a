//! The real binaries: `gateway run` processes on loopback, killed with
//! SIGKILL mid-traffic, and the `client` CLI end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failing test may panic

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use client::{Api, ClientConfig};
use proto::{Body, Category, IdempotencyKey, Status, SubmitRequest};
use tokio::process::{Child, Command};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

/// The client binary, built beside the gateway binary (client has integration tests).
fn client_bin() -> PathBuf {
    let p = Path::new(GATEWAY).with_file_name("client");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// The demo federation's files, written by the real `gateway dev --init-only`.
struct Demo {
    dir: tempfile::TempDir,
    procs: Vec<Option<Child>>,
}

const AREAS: [&str; 3] = ["northshire", "southvale", "eastmoor"];

/// The demo federation's files, written by `gateway dev --init-only`
/// (nothing started).
async fn dev_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(GATEWAY)
        .args(["dev", "--init-only", "--base-port", "0", "--dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "gateway dev failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

impl Demo {
    async fn new() -> Demo {
        let dir = dev_files().await;
        // Quick retries make the restart tests fast.
        for area in AREAS {
            let p = dir.path().join(area).join("gateway.toml");
            let text = std::fs::read_to_string(&p).unwrap();
            let text = text.replace(
                "retry_initial = \"250ms\"\nretry_max = \"10s\"",
                "retry_initial = \"50ms\"\nretry_max = \"500ms\"",
            );
            let text = text.replace(
                "[delivery]",
                "[limits]\nuser_requests_per_second = 100000\nuser_burst = 100000\n\n[delivery]",
            );
            std::fs::write(&p, text).unwrap();
        }
        let mut demo = Demo {
            dir,
            procs: vec![None, None, None],
        };
        for i in 0..3 {
            demo.start(i).await;
        }
        demo
    }

    fn area_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(AREAS[i])
    }

    fn user_config(&self, i: usize, user: &str) -> PathBuf {
        self.area_dir(i).join("users").join(format!("{user}.toml"))
    }

    fn api(&self, i: usize, user: &str) -> Api {
        Api::new(&ClientConfig::load(&self.user_config(i, user)).unwrap()).unwrap()
    }

    async fn start(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.area_dir(i).join("gateway.log"))
            .unwrap();
        let child = Command::new(GATEWAY)
            .args(["--log-format", "json", "run", "--config"])
            .arg(self.area_dir(i).join("gateway.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.procs[i] = Some(child);
        // Ready when a user of the area gets an answer.
        let user = ["alice", "dan", "hana"][i];
        let api = self.api(i, user);
        for _ in 0..200 {
            if api.health().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "gateway {} did not start; see {}",
            AREAS[i],
            self.area_dir(i).join("gateway.log").display()
        );
    }

    /// SIGKILL: no chance to flush or say goodbye.
    async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            c.kill().await.unwrap();
        }
    }

    fn count(&self, i: usize, sql: &str) -> i64 {
        let db = self.area_dir(i).join("data").join("gateway.sqlite3");
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }
}

/// The CA `gateway dev` minted for the area in `area_dir`.
fn area_ca(area_dir: &Path) -> certs::mint::Ca {
    certs::mint::Ca::from_pem(certs::mint::PemPair {
        cert: std::fs::read_to_string(area_dir.join("ca").join("ca.crt")).unwrap(),
        key: std::fs::read_to_string(area_dir.join("ca").join("ca.key")).unwrap(),
    })
    .unwrap()
}

async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_either_gateway_with_1000_in_flight_loses_and_duplicates_nothing() {
    let mut demo = Demo::new().await;
    let (a, b) = (0, 1);
    let mut tasks = Vec::new();
    // Each declares what the demo's sharing policy lets them send: a social
    // worker's referral, a police officer's disruption intelligence.
    let senders = [
        ("alice", "relocation", "safeguarding"),
        ("bob", "disruption", "crime-prevention"),
    ];
    for (user, category, purpose) in senders {
        let api = demo.api(a, user);
        let disclosure = proto::Disclosure {
            policy_id: "northshire-sharing".into(),
            policy_version: 1,
            purpose: purpose.into(),
            fields: vec!["chronology".into()],
            fled_from: vec![],
        };
        tasks.push(tokio::spawn(async move {
            for i in 0..500 {
                let m = SubmitRequest {
                    idempotency_key: IdempotencyKey::new(format!("{user}-{i:05}")).unwrap(),
                    recipient: "team:duty@southvale".parse().unwrap(),
                    category: Category::new(category).unwrap(),
                    urgent: false,
                    kind: proto::MessageKind::Opaque,
                    disclosure: Some(disclosure.clone()),
                    commit_proof: None,
                    body: Body(vec![b'k'; 512]),
                };
                // submit() retries with the same key while the gateway is down.
                api.submit(&m).await.unwrap();
            }
        }));
    }
    // Kill the receiver twice and the sender once, while traffic flows.
    for (threshold, victim) in [(250, b), (500, a), (750, b)] {
        assert!(
            eventually(Duration::from_secs(120), || demo
                .count(a, "SELECT COUNT(*) FROM sent")
                >= threshold)
            .await
        );
        demo.kill(victim).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        demo.start(victim).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(120), || demo
            .count(b, "SELECT COUNT(*) FROM inbox")
            >= 1000)
        .await,
        "all 1000 messages must arrive"
    );
    assert!(
        eventually(Duration::from_secs(60), || demo
            .count(a, "SELECT COUNT(*) FROM outbox")
            == 0)
        .await
    );
    assert_eq!(demo.count(a, "SELECT COUNT(*) FROM sent"), 1000);
    assert_eq!(demo.count(b, "SELECT COUNT(*) FROM inbox"), 1000);
    assert_eq!(
        demo.count(a, "SELECT COUNT(*) FROM sent WHERE status = 'delivered'"),
        1000
    );
    // In order per sender.
    let db = demo.area_dir(b).join("data").join("gateway.sqlite3");
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    for user in ["alice", "bob"] {
        let mut stmt = conn
            .prepare("SELECT idem_key FROM inbox WHERE sender_user = ?1 ORDER BY seq")
            .unwrap();
        let keys: Vec<String> = stmt
            .query_map([user], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let expected: Vec<String> = (0..500).map(|i| format!("{user}-{i:05}")).collect();
        assert!(
            keys == expected,
            "{user}: messages lost, duplicated or reordered"
        );
    }
}

async fn cli(config: &Path, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt as _;
    let mut child = Command::new(client_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).await.unwrap();
    }
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_team_referral_from_a_to_b_reaches_acknowledged() {
    let mut demo = Demo::new().await;
    let alice = demo.user_config(0, "alice");
    let dan = demo.user_config(1, "dan");
    let erin = demo.user_config(1, "erin");

    let (code, out, err) = cli(
        &alice,
        &[
            "send",
            "--to",
            "team:duty@southvale",
            "--category",
            "relocation",
            "--key",
            "cli-1",
            "--fields",
            "chronology",
        ],
        Some(b"referral bytes"),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let id = out.split('\t').next().unwrap().to_owned();
    assert_eq!(id.len(), 32, "{out}");

    let (code, out, err) = cli(&dan, &["--json", "inbox", "--wait", "30"], None).await;
    assert_eq!(code, 0, "{err}");
    let inbox: proto::InboxResponse = serde_json::from_str(&out).unwrap();
    assert_eq!(inbox.messages.len(), 1);
    assert_eq!(inbox.messages[0].envelope.message_id.as_str(), id);

    let (code, out, err) = cli(&erin, &["fetch", &id], None).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "referral bytes");
    let (code, _, err) = cli(&dan, &["ack", &id], None).await;
    assert_eq!(code, 0, "{err}");

    let mut status = None;
    for _ in 0..100 {
        let (code, out, err) = cli(&alice, &["--json", "status", &id], None).await;
        assert_eq!(code, 0, "{err}");
        let s: proto::StatusResponse = serde_json::from_str(&out).unwrap();
        if s.status == Status::Acknowledged {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.expect("status reaches acknowledged at the sender");
    assert_eq!(status.history.len(), 4);
    assert_eq!(demo.count(1, "SELECT COUNT(*) FROM inbox"), 1);

    // Resending with the same key sends nothing new.
    let (code, out, _) = cli(
        &alice,
        &[
            "send",
            "--to",
            "team:duty@southvale",
            "--category",
            "relocation",
            "--key",
            "cli-1",
            "--fields",
            "chronology",
        ],
        Some(b"referral bytes"),
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.starts_with(&id) && out.contains("nothing new"), "{out}");

    // Exit codes scripts rely on.
    let (code, _, err) = cli(
        &alice,
        &[
            "send",
            "--to",
            "team:nobody@westfell",
            "--category",
            "update",
        ],
        Some(b"x"),
    )
    .await;
    assert_eq!(code, 4, "refused by the gateway: {err}");
    assert!(
        err.contains("unknown") || err.contains("UnknownRecipient"),
        "{err}"
    );
    // Under the area's sharing policy, bytes that declare nothing are
    // refused: they may hold anything.
    let (code, _, err) = cli(
        &alice,
        &[
            "send",
            "--to",
            "team:duty@southvale",
            "--category",
            "relocation",
        ],
        Some(b"undeclared"),
    )
    .await;
    assert_eq!(code, 4, "refused by the gateway: {err}");
    assert!(
        err.contains("must declare") && err.contains("--fields"),
        "{err}"
    );
    assert_eq!(demo.count(0, "SELECT COUNT(*) FROM sent"), 1);
    let (code, _, _) = cli(&dan, &["inbox", "--wait", "1"], None).await;
    assert_eq!(code, 6, "an empty inbox after waiting");
    demo.kill(0).await;
    let (code, _, err) = cli(&alice, &["status", &id], None).await;
    assert_eq!(code, 5, "gateway unreachable: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_encrypted_referral_reaches_the_whole_team_and_the_gateways_hold_ciphertext_only() {
    let demo = Demo::new().await;
    let alice = demo.user_config(0, "alice");
    for user in ["dan", "erin", "farah"] {
        let (code, out, err) =
            cli(&demo.user_config(1, user), &["keys", "--count", "3"], None).await;
        assert_eq!(code, 0, "{user}: {err}");
        assert!(out.contains("published"), "{out}");
    }
    let secret = format!("CLI-CANARY-{}", std::process::id());
    let (code, out, err) = cli(
        &alice,
        &[
            "refer",
            "--to",
            "team:duty@southvale",
            "--category",
            "relocation",
        ],
        Some(secret.as_bytes()),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let case = out.trim().to_owned();
    assert!(case.starts_with("case-"), "{out}");
    for user in ["dan", "erin", "farah"] {
        let (code, out, err) =
            cli(&demo.user_config(1, user), &["read", "--wait", "30"], None).await;
        assert_eq!(code, 0, "{user}: {err}");
        assert!(
            out.contains(&format!("joined case {case}")) && out.contains(&secret),
            "{user}: {out}"
        );
    }
    // The gateways' files hold only ciphertext.
    for i in 0..3 {
        let mut dirs = vec![demo.area_dir(i).join("data")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{}",
                    path.display()
                );
            }
        }
        let log = std::fs::read(demo.area_dir(i).join("gateway.log")).unwrap();
        assert!(!log.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
    // alice sees where what she sent is: read by the team (each member's
    // client acknowledged it as it read).
    let mut listed = String::new();
    for _ in 0..100 {
        let (code, out, err) = cli(&alice, &["sent"], None).await;
        assert_eq!(code, 0, "{err}");
        listed = out;
        if listed
            .lines()
            .filter(|l| l.ends_with("acknowledged"))
            .count()
            == 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows: Vec<&str> = listed.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{listed}");
    for (row, what) in rows.iter().zip(["case invitation", "referral"]) {
        assert!(
            row.contains(what)
                && row.contains("team:duty@southvale")
                && row.contains(&case)
                && row.ends_with("acknowledged"),
            "{listed}"
        );
    }
    // Nothing is open any more; JSON for scripts.
    let (code, out, err) = cli(&alice, &["--json", "sent", "--open"], None).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "[]");
    // Nothing came back: `read` has nothing to say.
    let (code, out, err) = cli(&alice, &["read", "--wait", "1"], None).await;
    assert_eq!(code, 6, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relocation_the_new_area_gets_the_referral_and_the_fled_area_never_learns_where_the_family_is(
) {
    let demo = Demo::new().await;
    let alice = demo.user_config(0, "alice"); // northshire: the area the family fled
    let dan = demo.user_config(1, "dan"); // southvale: where the family now lives
    for user in ["dan", "erin", "farah"] {
        let (code, _, err) = cli(&demo.user_config(1, user), &["keys", "--count", "3"], None).await;
        assert_eq!(code, 0, "{err}");
    }
    let (code, template, err) = cli(&alice, &["referral-template"], None).await;
    assert_eq!(code, 0, "{err}");
    let case_file = demo.dir.path().join("case.toml");
    std::fs::write(&case_file, &template).unwrap();
    let case_arg = case_file.to_str().unwrap();
    let locating = [
        "12 Example Street",
        "NM4 7QT",
        "Northmoor Academy",
        "07700 900123",
        "Riverside Medical Practice",
    ];

    // A refers to B: the whole referral, previewed, then sent.
    let (code, out, preview) = cli(
        &alice,
        &[
            "refer",
            "--case-file",
            case_arg,
            "--to",
            "team:duty@southvale",
            "--category",
            "relocation",
            "--fled-from",
            "northshire",
            "--yes",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0, "{preview}");
    assert!(
        preview.contains("referral-to-receiving-area"),
        "the preview names the rule: {preview}"
    );
    let case = out.trim().to_owned();
    let (code, out, err) = cli(&dan, &["--json", "read", "--wait", "30"], None).await;
    assert_eq!(code, 0, "{err}");
    for value in ["Amira Example", "12 Example Street", "Northmoor Academy"] {
        assert!(
            out.contains(value),
            "B receives the full referral ({value}): {out}"
        );
    }
    assert!(
        !out.contains("SV-2025-0142"),
        "a field no rule allows never leaves the client: {out}"
    );

    // B sends an update back to A: nothing that locates the family.
    let (code, _, preview) = cli(
        &dan,
        &[
            "reply",
            "--case",
            &case,
            "--case-file",
            case_arg,
            "--to",
            "user:alice@northshire",
            "--category",
            "update",
            "--fled-from",
            "northshire",
            "--yes",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0, "{preview}");
    let (code, out, err) = cli(&alice, &["--json", "read", "--wait", "30"], None).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Amira Example"), "A gets the update: {out}");
    for value in locating {
        assert!(
            !out.contains(value),
            "{value} reached the area the family fled: {out}"
        );
    }

    // B prepares an update for its own team, without naming the fled area:
    // alice is in the case too and would read it, so the client refuses,
    // and nothing reaches A.
    let (code, _, err) = cli(
        &dan,
        &[
            "reply",
            "--case",
            &case,
            "--case-file",
            case_arg,
            "--to",
            "team:duty@southvale",
            "--category",
            "update",
            "--yes",
        ],
        None,
    )
    .await;
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("the family fled northshire (recorded for case")
            && err.contains("user:alice@northshire is in this case too"),
        "{err}"
    );
    let (code, out, _) = cli(&alice, &["--json", "read"], None).await;
    assert!(
        code == 0 || code == 6,
        "nothing new for A to read: {code} {out}"
    );
    for value in locating {
        assert!(
            !out.contains(value),
            "{value} reached the area the family fled: {out}"
        );
    }

    // Declaring a locating field towards the fled area is refused by B's gateway itself.
    let api = Api::new(&ClientConfig::load(&dan).unwrap()).unwrap();
    let e = api
        .submit_once(&SubmitRequest {
            idempotency_key: IdempotencyKey::new("smuggle").unwrap(),
            recipient: "user:alice@northshire".parse().unwrap(),
            category: Category::new("update").unwrap(),
            urgent: false,
            kind: proto::MessageKind::Opaque,
            disclosure: Some(proto::Disclosure {
                policy_id: "southvale-sharing".into(),
                policy_version: 1,
                purpose: "safeguarding".into(),
                fields: vec!["family.new_address".into()],
                fled_from: vec!["northshire".parse().unwrap()],
            }),
            commit_proof: None,
            body: Body(b"x".to_vec()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(proto::ErrorCode::PolicyDenied), "{e}");

    // A young person of 18 or over is routed to adult services, not children's.
    let adult = template.replace(
        "date_of_birth = \"2011-09-14\"",
        "date_of_birth = \"2001-01-01\"",
    );
    assert_ne!(adult, template);
    let adult_file = demo.dir.path().join("adult.toml");
    std::fs::write(&adult_file, adult).unwrap();
    let (code, _, err) = cli(
        &alice,
        &[
            "refer",
            "--case-file",
            adult_file.to_str().unwrap(),
            "--to",
            "team:duty@southvale",
            "--category",
            "relocation",
            "--yes",
        ],
        None,
    )
    .await;
    assert_ne!(code, 0);
    assert!(
        err.contains("adult services") && err.contains("adult-safeguarding@northshire"),
        "{err}"
    );
}

/// The example configuration parses (its `[retention]` included); a missing
/// certificate file is a configuration error (exit 3) that names the file
/// and the OS's reason once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_of_the_example_names_the_missing_certificate_once() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.example.toml");
    let out = Command::new(GATEWAY)
        .args(["check-config", "--config"])
        .arg(&example)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("/etc/referral-gateway/gateway.crt"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// `check-config` says when each certificate expires; with the gateway's
/// own certificate expired, `check-config` and `run` stop with a
/// certificate error (exit 3) naming the file, instead of a gateway that
/// every user and peer would refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_gateway_certificate_is_refused_at_start_naming_it() {
    let dir = dev_files().await;
    let area = dir.path().join("northshire");
    let config = area.join("gateway.toml");
    let gateway = |args: &'static [&'static str]| {
        let config = config.clone();
        async move {
            Command::new(GATEWAY)
                .args(args)
                .arg(&config)
                .output()
                .await
                .unwrap()
        }
    };
    let ok = gateway(&["check-config", "--config"]).await;
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}");
    assert!(text.contains("gateway certificate "), "{text}");
    assert!(text.contains("peer southvale's CA "), "{text}");
    assert!(text.contains("(in 36"), "a year ahead: {text}");
    assert!(
        text.contains("limits.min_free_disk_mib = 512") || text.contains("not there yet"),
        "{text}"
    );

    let ca = area_ca(&area);
    let expired = ca
        .issue(
            &certs::Identity::Gateway(proto::AreaId::new("northshire").unwrap()),
            certs::mint::Validity::Expired,
        )
        .unwrap();
    std::fs::write(area.join("gateway.crt"), expired.cert).unwrap();
    for args in [&["check-config", "--config"][..], &["run", "--config"][..]] {
        let out = gateway(args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert!(err.contains("gateway.crt expired at"), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn check_config_shows_each_revocation_list_and_refuses_one_its_ca_did_not_sign() {
    let dir = dev_files().await;
    let area = dir.path().join("northshire");
    let config = area.join("gateway.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen(
            "ca = \"ca/ca.crt\"\n",
            "ca = \"ca/ca.crt\"\ncrls = [\"published.crl\"]\n",
            1,
        ),
    )
    .unwrap();
    let ca = area_ca(&area);
    let alice = certs::Identity::User(
        proto::AreaId::new("northshire").unwrap(),
        proto::UserId::new("alice").unwrap(),
    );
    let year = certs::mint::Validity::For(Duration::from_secs(365 * 86_400));
    let lost = ca.issue(&alice, year).unwrap();
    let crl = area.join("published.crl");
    std::fs::write(&crl, ca.revocation_list(&[&lost.cert], 1, year).unwrap()).unwrap();
    let check = || async {
        Command::new(GATEWAY)
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .await
            .unwrap()
    };
    let ok = check().await;
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert!(
        out.contains("published.crl (area northshire): 1 revoked; next update by "),
        "{out}"
    );
    assert!(
        out.contains("(policy northshire-sharing version 1): signature verified"),
        "{out}"
    );

    // A list signed by some other CA (same name, other key) is refused.
    let other = certs::mint::Ca::new(&proto::AreaId::new("northshire").unwrap()).unwrap();
    std::fs::write(&crl, other.revocation_list(&[], 1, year).unwrap()).unwrap();
    let bad = check().await;
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(3), "{err}");
    assert!(err.contains("published.crl"), "{err}");
    assert!(err.contains("signature does not verify"), "{err}");

    // A sharing policy whose signature does not verify is refused too.
    std::fs::write(&crl, ca.revocation_list(&[], 2, year).unwrap()).unwrap();
    let signed = area.join("policy").join("policy.signed");
    let text = std::fs::read_to_string(&signed).unwrap();
    std::fs::write(&signed, text.replacen("version = 1", "version = 7", 1)).unwrap();
    let bad = check().await;
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(3), "{err}");
}

/// `kill -HUP` makes the running binary read its configuration again: a
/// user added to `[[users]]` gets in without a restart (the gateway's
/// process and its other users' connections stay), and a broken file
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_up_a_new_user_without_a_restart_and_a_broken_file_changes_nothing() {
    let mut demo = Demo::new().await;
    let area = demo.area_dir(0);
    let config = area.join("gateway.toml");
    let ca = area_ca(&area);
    let ivy = ca
        .issue(
            &certs::Identity::User(
                proto::AreaId::new("northshire").unwrap(),
                proto::UserId::new("ivy").unwrap(),
            ),
            certs::mint::Validity::For(Duration::from_secs(86_400)),
        )
        .unwrap();
    let users = area.join("users");
    std::fs::write(users.join("ivy.crt"), &ivy.cert).unwrap();
    std::fs::write(users.join("ivy.key"), &ivy.key).unwrap();
    let alice_config = std::fs::read_to_string(demo.user_config(0, "alice")).unwrap();
    std::fs::write(
        demo.user_config(0, "ivy"),
        alice_config
            .replace("alice.crt", "ivy.crt")
            .replace("alice.key", "ivy.key"),
    )
    .unwrap();
    let ivy = demo.api(0, "ivy");
    let alice = demo.api(0, "alice");
    alice.me().await.unwrap();
    assert!(ivy.me().await.is_err(), "ivy is not in the directory yet");
    let pid = demo.procs[0].as_ref().unwrap().id().unwrap().to_string();
    let hup = || async {
        let status = Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    };

    // A broken file first: logged, nothing changes, the gateway goes on.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{good}\n[[users]]\nid = \"ivy\"\nrole =\n"),
    )
    .unwrap();
    hup().await;
    let log = area.join("gateway.log");
    let logged = |what: &'static str| {
        let log = log.clone();
        move || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(what)
        }
    };
    assert!(
        eventually(
            Duration::from_secs(20),
            logged("reload: the configuration cannot be used")
        )
        .await
    );
    assert!(ivy.me().await.is_err());
    alice.me().await.unwrap();

    std::fs::write(
        &config,
        format!("{good}\n[[users]]\nid = \"ivy\"\norganisation = \"northshire-childrens-services\"\nrole = \"social-worker\"\nteams = [\"duty\"]\n"),
    )
    .unwrap();
    hup().await;
    assert!(eventually(Duration::from_secs(20), logged("configuration reloaded")).await);
    let me = ivy.me().await.unwrap();
    assert_eq!(me.role, "social-worker");
    alice.me().await.unwrap();
    assert!(
        demo.procs[0]
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the gateway kept running"
    );
}

/// A reload asked for while the gateway starts (here: while it waits for
/// its data directory, held by another instance) does not end the process
/// the way SIGHUP's default would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_the_gateway_starts_does_not_end_it() {
    let demo = Demo::new().await;
    let area = demo.area_dir(0);
    let log = area.join("second.log");
    let mut second = Command::new(GATEWAY)
        .args(["--log-format", "json", "run", "--config"])
        .arg(area.join("gateway.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let waiting = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("the data directory is locked")
    };
    assert!(eventually(Duration::from_secs(20), waiting).await);
    let pid = second.id().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let status = second.wait().await.unwrap();
    // It ends as it would have without the signal: the directory is taken.
    assert_eq!(status.code(), Some(1), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("is in use by another gateway"), "{text}");
}
