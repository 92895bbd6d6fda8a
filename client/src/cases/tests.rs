//! Unit tests of the caseworker's local state.

use super::*;

#[test]
fn one_client_at_a_time_works_on_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = lock_data_dir(dir.path(), Duration::from_millis(100)).unwrap();
    match lock_data_dir(dir.path(), Duration::from_millis(200)) {
        Err(CaseError::Busy(d)) => assert_eq!(d, dir.path()),
        other => panic!("expected Busy, got {other:?}"),
    }
    drop(first);
    lock_data_dir(dir.path(), Duration::from_millis(100)).unwrap();
}

const ESC: char = '\u{1b}';

/// A worker whose gateway is nowhere: what is tested here must not need it.
struct Worker {
    _dir: tempfile::TempDir,
    cw: Caseworker,
}

fn worker(user: &str) -> Worker {
    let dir = tempfile::tempdir().unwrap();
    let area = AreaId::new("northshire").unwrap();
    let ca = certs::mint::Ca::new(&area).unwrap();
    let pair = ca
        .issue(
            &certs::Identity::User(area.clone(), proto::UserId::new(user).unwrap()),
            certs::mint::Validity::For(Duration::from_secs(86_400)),
        )
        .unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let config = ClientConfig {
        gateway: "https://127.0.0.1:9".into(),
        area,
        cert: write("user.crt", &pair.cert),
        key: write("user.key", &pair.key),
        ca: write("ca.crt", &ca.pem().cert),
        policy_key: None,
        data_dir: Some(dir.path().join("data")),
        crls: Vec::new(),
    };
    let cw = Caseworker::open(&config, Api::new(&config).unwrap()).unwrap();
    Worker { _dir: dir, cw }
}

/// Someone's MLS state alone (no gateway), in northshire.
fn person(user: &str) -> (tempfile::TempDir, MlsClient) {
    let dir = tempfile::tempdir().unwrap();
    let c = MlsClient::open(dir.path(), &format!("spiffe://northshire/user/{user}")).unwrap();
    (dir, c)
}

fn transfer(case_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "case_id": case_id,
        "addresses": [],
        "history": [],
        "key_package": "00",
    }))
    .unwrap()
}

/// A transfer (which any user may send) whose case id is not one, a
/// terminal escape in it, say, is refused as it is parsed: by the check
/// made before it is kept, and by its taking up; nothing is kept.
#[test]
fn a_transfer_whose_case_id_holds_a_terminal_escape_is_refused() {
    for bad in ["case-1\x1b[2K", "", &"c".repeat(257)] {
        let e = Transfer::parse(&transfer(bad)).err();
        assert!(matches!(e, Some(CaseError::InvalidCaseId(_))), "{e:?}");
        let text = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(!text.contains(ESC), "{text}");
        let keep = keep_declared(None);
        let kept = keep("transfer:case-1:k", Kept::Message(&transfer(bad)));
        assert!(kept.is_err_and(|r| r.contains("case id") && !r.contains(ESC)));
    }
    assert_eq!(
        Transfer::parse(&transfer("case-1")).unwrap().case_id,
        "case-1"
    );

    let mut bob = worker("bob");
    let refused = bob
        .cw
        .receive_history("spiffe://northshire/user/alice", transfer("c\x1b[2K"));
    assert!(
        matches!(refused, Err(CaseError::InvalidCaseId(_))),
        "{refused:?}"
    );
    assert!(bob.cw.meta.handed_over.is_empty());
}

/// What `read` and `history` print holds no terminal control from another
/// user's or a gateway's text: escaped, not obeyed.
#[test]
fn what_read_and_history_print_holds_no_terminal_escape() {
    let evil = "x\x1b[2K\x1b]0;pwned\x07";
    let s = || evil.to_owned();
    let id = proto::MessageId::from_bytes([7; 16]);
    let events = [
        Event::Joined {
            case_id: s(),
            from: s(),
        },
        Event::Message {
            case_id: s(),
            from: s(),
            plaintext: evil.as_bytes().to_vec(),
        },
        Event::Membership {
            case_id: s(),
            added: vec![s()],
            removed: vec![s()],
        },
        Event::Overtaken { case_id: s() },
        Event::Removed { case_id: s() },
        Event::History {
            case_id: s(),
            from: s(),
            entries: 1,
        },
        Event::HandoverRefused {
            case_id: s(),
            from: s(),
        },
        Event::NotInCase {
            message_id: id.clone(),
            from: s(),
            to: s(),
        },
        Event::Refused {
            message_id: id,
            from: s(),
            error: s(),
        },
    ];
    for e in &events {
        let text = e.to_string();
        assert!(!text.contains(ESC) && !text.contains('\x07'), "{text:?}");
    }
    assert_eq!(
        events[6].to_string(),
        "NOT TAKEN UP: case x\\u{1b}[2K\\u{1b}]0;pwned\\u{7} handed over by \
         x\\u{1b}[2K\\u{1b}]0;pwned\\u{7}, whose handover did not add you to it"
    );

    let entry = HistoryEntry {
        epoch: 1,
        sender: s(),
        at_ms: 0,
        plaintext: evil.as_bytes().to_vec(),
        imported_from: Some(s()),
    };
    let text = entry.to_string();
    assert!(!text.contains(ESC) && !text.contains('\x07'), "{text:?}");
    assert!(
        text.starts_with("--- 1970-01-01T00:00:00.000Z x\\u{1b}[2K"),
        "{text}"
    );
}

/// A handover request naming one person (here carol) with another's
/// KeyPackage (mallory's) is refused by the member who would commit it,
/// before anything is sent: nobody is added, nothing is kept to be
/// committed again, and one kept from before is let go at the next read.
#[tokio::test]
async fn a_handover_request_with_someone_elses_key_package_is_refused() {
    let mut bob = worker("bob");
    let (_a, mut alice) = person("alice");
    let (_m, mut mallory) = person("mallory");
    let group = alice.create_group("case-1").unwrap();
    let kp = bob.cw.mls.key_packages(1).unwrap().remove(0);
    let (_, welcome) = alice.add_members(&group, &[kp]).unwrap();
    bob.cw.mls.join(&welcome).unwrap();
    let members = bob.cw.mls.members(&group).unwrap();
    let request = serde_json::to_vec(&HandoverRequest {
        new_lead: "spiffe://southvale/user/carol".into(),
        key_package: mallory.key_packages(1).unwrap().remove(0),
    })
    .unwrap();
    let old_lead = alice.identity().to_owned();

    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        bob.cw
            .commit_handover(&group, "case-1", &old_lead, &request, false),
    )
    .await
    .expect("refused before anything is sent");
    assert!(
        matches!(
            &refused,
            Err(CaseError::Mls(MlsError::NotTheirKeyPackage { named, owner }))
                if named == "spiffe://southvale/user/carol" && *owner == mallory.identity()
        ),
        "{refused:?}"
    );
    assert_eq!(bob.cw.mls.members(&group).unwrap(), members);
    assert!(!bob.cw.mls.has_pending_commit(&group));
    assert!(bob.cw.meta.handover_requests.is_empty());
    assert!(bob.cw.meta.staged.is_empty());

    // Kept by a client before this check: let go, not committed.
    bob.cw
        .meta
        .handover_requests
        .insert("case-1".into(), (old_lead, request));
    let events = tokio::time::timeout(Duration::from_secs(5), bob.cw.retry_handovers())
        .await
        .expect("let go before anything is sent")
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
    assert!(bob.cw.meta.handover_requests.is_empty());
    assert_eq!(bob.cw.mls.members(&group).unwrap(), members);
    assert!(!bob.cw.mls.has_pending_commit(&group));
}

/// A chronology handed over inside a case's group is refused whatever it
/// declares: chronologies travel to a new lead in a transfer only.
#[test]
fn a_history_export_inside_a_cases_group_is_refused() {
    let mut bob = worker("bob");
    let (_a, mut alice) = person("alice");
    let group = alice.create_group("case-1").unwrap();
    let kp = bob.cw.mls.key_packages(1).unwrap().remove(0);
    let (_, welcome) = alice.add_members(&group, &[kp]).unwrap();
    bob.cw.mls.join(&welcome).unwrap();
    alice.encrypt(&group, b"a visit, backdated").unwrap();
    let export = alice.send_history(&group).unwrap();
    let keep = keep_declared(Some(vec!["chronology".into()]));
    let r = bob.cw.mls.process_checked(&export, None, &keep);
    assert!(matches!(r, Err(MlsError::Refused(_))), "{r:?}");
    assert!(bob.cw.mls.history(&group).unwrap().is_empty());
    // A chronology message so declared is kept.
    let m = alice.encrypt(&group, b"a visit").unwrap();
    bob.cw.mls.process_checked(&m, None, &keep).unwrap();
    assert_eq!(bob.cw.mls.history(&group).unwrap().len(), 1);
}

#[test]
fn a_message_waits_for_the_change_it_follows_only_as_long_as_it_may_take() {
    let group = GroupId::from_bytes(vec![1, 2, 3]);
    let ahead = MlsError::Ahead {
        group: group.clone(),
        epoch: 3,
        ours: 2,
    };
    let unknown = MlsError::UnknownGroup(group);
    let team_wait = Duration::from_secs(300);
    let at = |sent_ms: u64, since_ms: Option<u64>, now_ms: u64| Waited {
        sent_ms,
        since_ms,
        now_ms,
    };
    let day = 86_400_000;
    // Ahead of its case's change, to a person or a team: days.
    for to_team in [false, true] {
        assert!(may_wait(&ahead, to_team, at(0, None, 10 * day), team_wait));
        assert!(may_wait(
            &ahead,
            to_team,
            at(0, Some(day), 5 * day),
            team_wait
        ));
        assert!(!may_wait(
            &ahead,
            to_team,
            at(0, Some(day), 7 * day),
            team_wait
        ));
    }
    // A case we do not hold, by name: its Welcome may come, for days.
    assert!(may_wait(&unknown, false, at(0, None, day), team_wait));
    assert!(!may_wait(
        &unknown,
        false,
        at(0, Some(0), 6 * day),
        team_wait
    ));
    // To the team: minutes from when it was sent, and from when it was
    // first found here, whatever the sender's clock says.
    assert!(may_wait(&unknown, true, at(1_000, None, 60_000), team_wait));
    assert!(!may_wait(
        &unknown,
        true,
        at(1_000, None, 400_000),
        team_wait
    ));
    assert!(!may_wait(
        &unknown,
        true,
        at(10 * day, Some(0), 400_000),
        team_wait
    ));
    assert!(!may_wait(
        &unknown,
        true,
        at(1_000, None, 2_000),
        Duration::ZERO
    ));
    // Anything else never waits.
    for other in [
        MlsError::Replay,
        MlsError::Tampered("x".into()),
        MlsError::Undecryptable("x".into()),
    ] {
        assert!(!may_wait(&other, false, at(0, None, 1), team_wait));
    }
}

#[test]
fn a_kept_message_lets_an_address_go_only_when_the_gateway_refused_it_there_for_good() {
    let api = |status: u16, code: proto::ErrorCode| {
        CaseError::Client(ClientError::Api {
            status,
            code,
            message: "x".into(),
            retry_after: None,
        })
    };
    for final_for_it in [
        api(403, proto::ErrorCode::PolicyDenied),
        api(404, proto::ErrorCode::UnknownRecipient),
        api(413, proto::ErrorCode::PayloadTooLarge),
        api(409, proto::ErrorCode::IdempotencyConflict),
    ] {
        assert!(refused_for_good(&final_for_it), "{final_for_it:?}");
    }
    // Whatever else (this client's certificate, the gateway busy or out of
    // reach, an answer a proxy garbled) keeps it for every address.
    for kept in [
        api(403, proto::ErrorCode::CertificateExpired),
        api(403, proto::ErrorCode::Forbidden),
        api(503, proto::ErrorCode::Unavailable),
        api(500, proto::ErrorCode::Internal),
        CaseError::Client(ClientError::Transport("down".into())),
        CaseError::Client(ClientError::Decode("<html>502</html>".into())),
    ] {
        assert!(!refused_for_good(&kept), "{kept:?}");
    }
}
