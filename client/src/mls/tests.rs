use std::path::PathBuf;
use std::time::Instant;

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::{BasicCredential, CredentialWithKey, KeyPackage};
use openmls_basic_credential::SignatureKeyPair;

use super::*;

fn uri(area: &str, user: &str) -> String {
    format!("spiffe://{area}/user/{user}")
}

struct Person {
    dir: tempfile::TempDir,
    id: String,
    client: Option<MlsClient>,
}

impl Person {
    fn new(area: &str, user: &str) -> Person {
        let dir = tempfile::tempdir().unwrap();
        let id = uri(area, user);
        let client = MlsClient::open(dir.path(), &id).unwrap();
        Person {
            dir,
            id,
            client: Some(client),
        }
    }

    fn c(&mut self) -> &mut MlsClient {
        self.client.as_mut().unwrap()
    }

    fn kp(&mut self) -> Vec<u8> {
        self.c().key_packages(1).unwrap().pop().unwrap()
    }

    /// Drops the client and opens it again from disk.
    fn restart(&mut self) {
        self.client = None;
        self.client = Some(MlsClient::open(self.dir.path(), &self.id).unwrap());
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

fn app(p: Processed) -> (String, Vec<u8>) {
    match p {
        Processed::Application {
            sender, plaintext, ..
        } => (sender, plaintext),
        other => panic!("expected an application message, got {other:?}"),
    }
}

/// A sender in area `a` and a team of three in area `b`, all joined.
fn referral() -> (Person, Vec<Person>, GroupId) {
    let mut sender = Person::new("a.example", "sw1");
    let mut team: Vec<Person> = ["d1", "d2", "d3"]
        .iter()
        .map(|u| Person::new("b.example", u))
        .collect();
    let kps: Vec<Vec<u8>> = team.iter_mut().map(Person::kp).collect();
    let group = sender.c().create_group("CASE-42").unwrap();
    let (_commit, welcome) = sender.c().add_members(&group, &kps).unwrap();
    for member in &mut team {
        let (g, case) = member.c().join(&welcome).unwrap();
        assert_eq!(g, group);
        assert_eq!(case, "CASE-42");
    }
    (sender, team, group)
}

#[test]
fn team_of_three_decrypts_referral() {
    let (mut sender, mut team, group) = referral();
    assert_eq!(sender.c().members(&group).unwrap().len(), 4);
    assert_eq!(sender.c().epoch(&group).unwrap(), 1);
    let ct = sender.c().encrypt(&group, b"referral body").unwrap();
    for member in &mut team {
        let (from, pt) = app(member.c().process(&ct).unwrap());
        assert_eq!(from, sender.id);
        assert_eq!(pt, b"referral body");
        assert_eq!(member.c().history(&group).unwrap().len(), 1);
        assert_eq!(member.c().epoch(&group).unwrap(), 1);
        assert_eq!(
            member.c().groups().unwrap(),
            vec![(group.clone(), "CASE-42".to_owned())]
        );
    }
    // The sender's own copy, echoed by the gateway, is recognised.
    assert_eq!(
        sender.c().process(&ct).unwrap(),
        Processed::OwnMessage {
            group: group.clone()
        }
    );
    let h = sender.c().history(&group).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].sender, sender.id);
    assert_eq!(h[0].plaintext, b"referral body");
    // A reply from the team reaches the sender and the rest of the team.
    let reply = team[0].c().encrypt(&group, b"received, on it").unwrap();
    let (from, pt) = app(sender.c().process(&reply).unwrap());
    assert_eq!(
        (from.as_str(), pt.as_slice()),
        (team[0].id.as_str(), &b"received, on it"[..])
    );
    app(team[1].c().process(&reply).unwrap());
}

#[test]
fn restart_mid_conversation_loses_nothing() {
    let (mut sender, mut team, group) = referral();
    let m1 = sender.c().encrypt(&group, b"one").unwrap();
    app(team[0].c().process(&m1).unwrap());

    sender.restart();
    team[0].restart();

    assert_eq!(sender.c().groups().unwrap().len(), 1);
    assert_eq!(team[0].c().epoch(&group).unwrap(), 1);
    assert_eq!(team[0].c().history(&group).unwrap().len(), 1);
    // Replay after restart is still refused (the ratchet state was persisted).
    assert!(matches!(team[0].c().process(&m1), Err(MlsError::Replay)));

    let m2 = sender.c().encrypt(&group, b"two").unwrap();
    assert_eq!(app(team[0].c().process(&m2).unwrap()).1, b"two");
    let r1 = team[0].c().encrypt(&group, b"reply").unwrap();
    assert_eq!(app(sender.c().process(&r1).unwrap()).1, b"reply");
    // Members that did not restart follow too.
    assert_eq!(app(team[2].c().process(&m1).unwrap()).1, b"one");
    assert_eq!(app(team[2].c().process(&m2).unwrap()).1, b"two");
    assert_eq!(app(team[2].c().process(&r1).unwrap()).1, b"reply");

    // A commit after the restart, and a KeyPackage made before it, work.
    let newcomer_kp = {
        let mut n = Person::new("b.example", "d4");
        let kp = n.kp();
        n.restart();
        (n, kp)
    };
    let (mut newcomer, kp) = newcomer_kp;
    let (commit, welcome) = sender.c().add_members(&group, &[kp]).unwrap();
    assert!(matches!(
        team[0].c().process(&commit).unwrap(),
        Processed::Commit { epoch: 2, .. }
    ));
    newcomer.c().join(&welcome).unwrap();
    let m3 = team[0].c().encrypt(&group, b"three").unwrap();
    assert_eq!(app(newcomer.c().process(&m3).unwrap()).1, b"three");
    assert_eq!(app(sender.c().process(&m3).unwrap()).1, b"three");

    let h = sender.c().history(&group).unwrap();
    let texts: Vec<&[u8]> = h.iter().map(|e| e.plaintext.as_slice()).collect();
    assert_eq!(texts, vec![&b"one"[..], b"two", b"reply", b"three"]);
}

#[test]
fn key_package_survives_restart_of_joiner() {
    let mut sender = Person::new("a.example", "sw1");
    let mut joiner = Person::new("b.example", "d1");
    let kp = joiner.kp();
    joiner.restart();
    let group = sender.c().create_group("CASE-7").unwrap();
    let (_, welcome) = sender.c().add_members(&group, &[kp]).unwrap();
    joiner.restart();
    assert_eq!(joiner.c().join(&welcome).unwrap().1, "CASE-7");
    joiner.restart();
    let ct = sender.c().encrypt(&group, b"hi").unwrap();
    assert_eq!(app(joiner.c().process(&ct).unwrap()).1, b"hi");
}

#[test]
fn tampered_ciphertext_is_refused_and_changes_nothing() {
    let (mut sender, mut team, group) = referral();
    let ct = sender.c().encrypt(&group, b"secret").unwrap();
    let mut bad = ct.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    assert!(
        matches!(team[0].c().process(&bad), Err(MlsError::Tampered(_))),
        "{:?}",
        team[0].c().process(&bad)
    );
    let mut bad = ct.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x80;
    assert!(team[0].c().process(&bad).is_err());
    // Truncated and garbage input.
    assert!(matches!(
        team[0].c().process(&ct[..ct.len() / 2]),
        Err(MlsError::Malformed(_))
    ));
    assert!(matches!(
        team[0].c().process(b""),
        Err(MlsError::Malformed(_))
    ));
    // The genuine message still decrypts afterwards.
    assert_eq!(app(team[0].c().process(&ct).unwrap()).1, b"secret");
    assert_eq!(team[0].c().history(&group).unwrap().len(), 1);
}

#[test]
fn a_message_ahead_of_its_commit_waits_unchanged_and_reads_after_it() {
    let (mut sender, mut team, group) = referral();
    let mut extra = Person::new("b.example", "d9");
    let (commit, _) = sender.c().add_members(&group, &[extra.kp()]).unwrap();
    let reply = sender.c().encrypt(&group, b"after the change").unwrap();
    let commit2 = sender.c().remove_member(&group, &extra.id).unwrap();
    let later = sender.c().encrypt(&group, b"after both changes").unwrap();
    // The reply and the second change come by another way than the first
    // change, and first.
    for early in [&reply, &commit2, &later] {
        match team[0].c().process(early) {
            Err(MlsError::Ahead { epoch, ours, .. }) => assert!(epoch > ours),
            other => panic!("expected Ahead, got {other:?}"),
        }
    }
    assert_eq!(team[0].c().epoch(&group).unwrap(), 1, "nothing changed");
    team[0].c().process(&commit).unwrap();
    assert_eq!(
        app(team[0].c().process(&reply).unwrap()).1,
        b"after the change"
    );
    team[0].c().process(&commit2).unwrap();
    assert_eq!(
        app(team[0].c().process(&later).unwrap()).1,
        b"after both changes"
    );
}

#[test]
fn replayed_message_is_refused() {
    let (mut sender, mut team, group) = referral();
    let ct = sender.c().encrypt(&group, b"once").unwrap();
    app(team[0].c().process(&ct).unwrap());
    assert!(matches!(team[0].c().process(&ct), Err(MlsError::Replay)));
    // Replay of a commit is refused too.
    let mut extra = Person::new("b.example", "d9");
    let (commit, _) = sender.c().add_members(&group, &[extra.kp()]).unwrap();
    team[0].c().process(&commit).unwrap();
    assert!(matches!(
        team[0].c().process(&commit),
        Err(MlsError::Replay)
    ));
    // Only one history entry.
    assert_eq!(team[0].c().history(&group).unwrap().len(), 1);
}

#[test]
fn the_same_message_by_another_of_our_addresses_is_a_copy_and_by_the_same_one_a_replay() {
    let (mut sender, mut team, group) = referral();
    let ct = sender.c().encrypt(&group, b"once").unwrap();
    let keep = |_: &str, _: Kept<'_>| Ok(());
    let team_addr = Some("team:duty@b.example");
    app(team[0].c().process_checked(&ct, team_addr, &keep).unwrap());
    // Again through the team: a replay, refused.
    assert!(matches!(
        team[0].c().process_checked(&ct, team_addr, &keep),
        Err(MlsError::Replay)
    ));
    // By name as well as through the team: a copy, nothing new.
    assert_eq!(
        team[0]
            .c()
            .process_checked(&ct, Some("user:d1@b.example"), &keep)
            .unwrap(),
        Processed::Copy {
            group: group.clone()
        }
    );
    // Once by each address: by name again, a replay.
    assert!(matches!(
        team[0]
            .c()
            .process_checked(&ct, Some("user:d1@b.example"), &keep),
        Err(MlsError::Replay)
    ));
    // An address unknown either way proves nothing: a replay.
    assert!(matches!(team[0].c().process(&ct), Err(MlsError::Replay)));
    assert_eq!(team[0].c().history(&group).unwrap().len(), 1);
    // Kept across a restart (the addresses are on disk with the digest).
    team[0].restart();
    assert!(matches!(
        team[0]
            .c()
            .process_checked(&ct, Some("user:d1@b.example"), &keep),
        Err(MlsError::Replay)
    ));
    assert_eq!(
        team[0]
            .c()
            .process_checked(&ct, Some("team:other@b.example"), &keep)
            .unwrap(),
        Processed::Copy { group }
    );
}

#[test]
fn a_file_from_before_addresses_were_kept_is_taken_and_its_messages_stay_replays() {
    let (mut sender, mut team, group) = referral();
    let ct = sender.c().encrypt(&group, b"once").unwrap();
    app(team[0].c().process(&ct).unwrap());
    // The table as an older client left it.
    let conn = team[0].c().store.conn_for_tests();
    conn.execute_batch(
        "CREATE TABLE seen_old (digest BLOB PRIMARY KEY, own INTEGER NOT NULL);
         INSERT INTO seen_old SELECT digest, own FROM seen;
         DROP TABLE seen;
         ALTER TABLE seen_old RENAME TO seen;",
    )
    .unwrap();
    team[0].restart();
    assert!(matches!(
        team[0]
            .c()
            .process_checked(&ct, Some("user:d1@b.example"), &|_, _| Ok(())),
        Err(MlsError::Replay)
    ));
}

#[test]
fn a_staged_commit_waits_for_the_delivery_service_and_is_dropped_when_overtaken() {
    let (mut sender, mut team, group) = referral();
    let epoch = |p: &mut Person| p.c().group(&group).unwrap().mls.epoch().as_u64();
    let start = epoch(&mut team[0]);
    // Two members change the group at the same epoch.
    let mut x = Person::new("c.example", "x1");
    let mut y = Person::new("c.example", "y1");
    let (kx, ky) = (x.kp(), y.kp());
    let a = team[0].c().stage_add_members(&group, &[kx]).unwrap();
    assert_eq!(a.adds, vec![x.id.clone()]);
    let commit_b = team[1].c().stage_add_members(&group, &[ky]).unwrap().commit;
    assert!(team[0].c().has_pending_commit(&group));
    assert_eq!(epoch(&mut team[0]), start, "not merged before it is taken");
    // The Delivery Service takes team[1]'s: team[0] drops its own and
    // merges the one taken, as does everyone else.
    team[1].c().confirm_commit(&group, &commit_b).unwrap();
    team[0].c().abandon_commit(&group).unwrap();
    assert!(!team[0].c().has_pending_commit(&group));
    team[0].c().process(&commit_b).unwrap();
    sender.c().process(&commit_b).unwrap();
    assert_eq!(epoch(&mut team[0]), start + 1);
    assert!(!team[0].c().members(&group).unwrap().contains(&x.id));
    let m = team[1].c().encrypt(&group, b"after").unwrap();
    assert_eq!(app(team[0].c().process(&m).unwrap()).1, b"after");
    drop(a);
    // A staged commit that comes back from the Delivery Service is ours
    // (nothing to do); it waits for the Delivery Service's word all the
    // same, and is merged when taken.
    let mut z = Person::new("c.example", "z1");
    let commit_c = team[0]
        .c()
        .stage_add_members(&group, &[z.kp()])
        .unwrap()
        .commit;
    assert_eq!(
        team[0].c().process(&commit_c).unwrap(),
        Processed::OwnMessage {
            group: group.clone()
        }
    );
    assert!(team[0].c().has_pending_commit(&group));
    team[0].c().confirm_commit(&group, &commit_c).unwrap();
    assert!(!team[0].c().has_pending_commit(&group));
    assert_eq!(epoch(&mut team[0]), start + 2);
    assert!(team[0].c().members(&group).unwrap().contains(&z.id));
    // Kept across a restart: a commit staged, then the client stopped.
    let mut w = Person::new("c.example", "w1");
    let commit_d = team[0]
        .c()
        .stage_add_members(&group, &[w.kp()])
        .unwrap()
        .commit;
    team[0].restart();
    assert!(team[0].c().has_pending_commit(&group));
    team[0].c().confirm_commit(&group, &commit_d).unwrap();
    assert_eq!(epoch(&mut team[0]), start + 3);
}

#[test]
fn replay_is_refused_by_openmls_even_without_the_digest_table() {
    // Same ciphertext re-encoded cannot dodge the digest check, but if the
    // digest table were lost the ratchet still refuses: simulate by
    // clearing it.
    let (mut sender, mut team, group) = referral();
    let ct = sender.c().encrypt(&group, b"once").unwrap();
    app(team[0].c().process(&ct).unwrap());
    team[0]
        .c()
        .store
        .conn_for_tests()
        .execute("DELETE FROM seen", [])
        .unwrap();
    assert!(matches!(team[0].c().process(&ct), Err(MlsError::Replay)));
}

fn foreign_key_package(identity: &str) -> Vec<u8> {
    let provider = Provider::default();
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(identity.as_bytes().to_vec()).into(),
        signature_key: signer.to_public_vec().into(),
    };
    KeyPackage::builder()
        .leaf_node_capabilities(capabilities())
        .build(CIPHERSUITE, &provider, &signer, credential)
        .unwrap()
        .key_package()
        .tls_serialize_detached()
        .unwrap()
}

#[test]
fn key_package_with_non_user_identity_is_refused() {
    let mut sender = Person::new("a.example", "sw1");
    let group = sender.c().create_group("CASE-1").unwrap();
    for bad in [
        "spiffe://b.example/gateway",
        "https://b.example/user/d1",
        "spiffe://b.example/user/d1/extra",
        "d1",
        "",
    ] {
        let kp = foreign_key_package(bad);
        assert!(
            matches!(
                sender.c().add_members(&group, &[kp]),
                Err(MlsError::BadIdentity(_))
            ),
            "{bad}"
        );
    }
    // A well-formed one from the same kind of source is accepted.
    let ok = foreign_key_package("spiffe://b.example/user/d1");
    sender.c().add_members(&group, &[ok]).unwrap();
    // Garbage and a tampered KeyPackage are refused.
    assert!(matches!(
        sender.c().add_members(&group, &[vec![1, 2, 3]]),
        Err(MlsError::InvalidKeyPackage(_))
    ));
    let mut kp = foreign_key_package("spiffe://b.example/user/d2");
    let n = kp.len() - 5;
    kp[n] ^= 1;
    assert!(matches!(
        sender.c().add_members(&group, &[kp]),
        Err(MlsError::InvalidKeyPackage(_))
    ));
    assert_eq!(sender.c().epoch(&group).unwrap(), 1);
}

#[test]
fn open_refuses_bad_or_other_identity() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        MlsClient::open(dir.path(), "spiffe://a.example/gateway"),
        Err(MlsError::BadIdentity(_))
    ));
    MlsClient::open(dir.path(), &uri("a.example", "sw1")).unwrap();
    assert!(matches!(
        MlsClient::open(dir.path(), &uri("a.example", "sw2")),
        Err(MlsError::IdentityMismatch { .. })
    ));
}

/// The public key of `group`'s current epoch as `p` derives it (see
/// [`proto::CommitProof`]); `None` once `p` is out of the group.
fn epoch_key(p: &mut Person, group: &GroupId) -> Option<[u8; 32]> {
    let c = p.c();
    let secret = c
        .group(group)
        .ok()?
        .mls
        .export_secret(&c.provider.crypto, proto::mls::EPOCH_KEY_LABEL, &[], 32)
        .ok()?;
    Some(
        proto::mls::epoch_key(&secret.try_into().unwrap())
            .verifying_key()
            .to_bytes(),
    )
}

/// A Commit's proof is signed with the key every member of its epoch
/// derives, and names the key that every member of the next epoch derives,
/// new ones included; a member it removes cannot derive that one.
#[test]
fn a_commits_proof_is_by_its_epochs_key_and_names_one_only_the_next_epochs_members_derive() {
    let (mut sender, mut team, group) = referral();
    let this_epoch = epoch_key(&mut sender, &group).unwrap();
    assert_eq!(epoch_key(&mut team[0], &group), Some(this_epoch));
    let mut new_lead = Person::new("c.example", "lead2");
    let kp = new_lead.kp();
    let old_lead = team[0].id.clone();
    let own = team[1]
        .c()
        .handover(&group, &kp, &new_lead.id, &old_lead)
        .unwrap();
    let (hex_group, hash) = (
        hex::encode(&group.0),
        proto::ContentHash(sha256(&own.commit)),
    );
    let next = own.proof.verify(&this_epoch, &hex_group, 1, &hash).unwrap();
    assert!(own.proof.verify(&this_epoch, &hex_group, 2, &hash).is_err());
    assert_eq!(own.proof.next_key(&hex_group, 1, &hash), Ok(next));
    assert_ne!(next, this_epoch);

    team[1].c().confirm_commit(&group, &own.commit).unwrap();
    sender.c().process(&own.commit).unwrap();
    new_lead.c().join(&own.welcome).unwrap();
    for p in [&mut sender, &mut team[1], &mut new_lead] {
        assert_eq!(epoch_key(p, &group), Some(next));
    }
    // The old lead, removed by it, has only the epoch before.
    assert_eq!(epoch_key(&mut team[0], &group), Some(this_epoch));
    team[0].c().process(&own.commit).unwrap();
    assert_eq!(epoch_key(&mut team[0], &group), None);
}

#[test]
fn handover_removes_old_lead_and_new_lead_gets_history() {
    let (mut sender, mut team, group) = referral();
    // team[0] is the key lead; some chronology builds up.
    let m1 = sender.c().encrypt(&group, b"initial referral").unwrap();
    for p in team.iter_mut() {
        app(p.c().process(&m1).unwrap());
    }
    let m2 = team[0].c().encrypt(&group, b"home visit done").unwrap();
    app(sender.c().process(&m2).unwrap());
    app(team[1].c().process(&m2).unwrap());
    app(team[2].c().process(&m2).unwrap());

    let mut new_lead = Person::new("c.example", "lead2");
    let kp = new_lead.kp();
    let old_lead = team[0].id.clone();
    let OwnCommit {
        commit, welcome, ..
    } = team[1]
        .c()
        .handover(&group, &kp, &new_lead.id, &old_lead)
        .unwrap();
    // Pending until the Delivery Service has taken it.
    assert!(team[1].c().has_pending_commit(&group));
    assert!(team[1].c().members(&group).unwrap().contains(&old_lead));
    team[1].c().confirm_commit(&group, &commit).unwrap();
    assert!(!team[1].c().has_pending_commit(&group));
    assert!(!team[1].c().members(&group).unwrap().contains(&old_lead));
    assert!(team[1].c().members(&group).unwrap().contains(&new_lead.id));

    let (g, case) = new_lead.c().join(&welcome).unwrap();
    assert_eq!((g.clone(), case.as_str()), (group.clone(), "CASE-42"));
    match sender.c().process(&commit).unwrap() {
        Processed::Commit {
            added,
            removed,
            by,
            epoch,
            ..
        } => {
            assert_eq!(added, vec![new_lead.id.clone()]);
            assert_eq!(removed, vec![old_lead.clone()]);
            assert_eq!(by, team[1].id);
            assert_eq!(epoch, 2);
        }
        other => panic!("{other:?}"),
    }
    team[2].c().process(&commit).unwrap();
    // A message sent after the handover, before the old lead even saw the
    // commit: to the old lead, it waits for that commit.
    let after = sender.c().encrypt(&group, b"after handover").unwrap();
    let err = team[0].c().process(&after).unwrap_err();
    assert!(matches!(err, MlsError::Ahead { .. }), "{err:?}");
    // The old lead processes its removal and still cannot read it, nor send.
    assert_eq!(
        team[0].c().process(&commit).unwrap(),
        Processed::RemovedUs {
            group: group.clone(),
            by: team[1].id.clone()
        }
    );
    assert!(!team[0].c().is_active(&group).unwrap());
    assert!(matches!(
        team[0].c().process(&after),
        Err(MlsError::NotMember(_))
    ));
    assert!(matches!(
        team[0].c().encrypt(&group, b"x"),
        Err(MlsError::NotMember(_))
    ));
    // It keeps its own (local) history, and survives a restart as inactive.
    team[0].restart();
    assert!(!team[0].c().is_active(&group).unwrap());
    assert_eq!(team[0].c().history(&group).unwrap().len(), 2);
    // The new lead decrypts it.
    assert_eq!(
        app(new_lead.c().process(&after).unwrap()).1,
        b"after handover"
    );

    // History hand-over, the plain way: export, carry, import.
    let export = sender.c().export_history(&group).unwrap();
    let n = new_lead
        .c()
        .import_history(&group, &sender.id, &export)
        .unwrap();
    assert_eq!(n, 2, "the two messages from before the new lead joined");
    // Importing again adds nothing; a wrong claimed exporter is refused.
    assert_eq!(
        new_lead
            .c()
            .import_history(&group, &sender.id, &export)
            .unwrap(),
        0
    );
    assert!(matches!(
        new_lead.c().import_history(&group, &team[2].id, &export),
        Err(MlsError::BadHistory(_))
    ));
    let h = new_lead.c().history(&group).unwrap();
    let texts: Vec<&[u8]> = h.iter().map(|e| e.plaintext.as_slice()).collect();
    assert_eq!(
        texts,
        vec![
            &b"initial referral"[..],
            b"home visit done",
            b"after handover"
        ]
    );
    assert_eq!(h[0].imported_from.as_deref(), Some(sender.id.as_str()));
    assert_eq!(h[1].sender, old_lead);
    assert_eq!(h[2].imported_from, None);
}

/// A history export `c` sends in `group` as it is, whatever it says (as
/// a member's own client could).
fn send_export(c: &mut MlsClient, group: &GroupId, export: &HistoryExport) -> Vec<u8> {
    let framed = frame(TAG_HISTORY, now_ms(), &serde_json::to_vec(export).unwrap());
    let g = active_mut(&mut c.groups, group).unwrap();
    let out = g
        .mls
        .create_message(&c.provider, &c.signer, &framed)
        .unwrap();
    serialize(&out).unwrap()
}

/// A history export travels in the group only under the receiver's check,
/// entry by entry, as a chronology message does: one with an entry that
/// holds a field the check refuses (the family's new address, where only
/// the chronology is declared) is refused whole, and the chronology stays
/// as it was. One taken is marked as handed over by its sender, whatever
/// it says; one naming a sender that is not a user is refused.
#[test]
fn history_travels_in_the_group() {
    let (mut sender, mut team, group) = referral();
    let m1 = sender.c().encrypt(&group, b"one").unwrap();
    app(team[0].c().process(&m1).unwrap());
    let mut new_lead = Person::new("b.example", "lead2");
    let kp = new_lead.kp();
    let old = team[0].id.clone();
    let OwnCommit {
        commit, welcome, ..
    } = sender
        .c()
        .handover(&group, &kp, &new_lead.id, &old)
        .unwrap();
    sender.c().confirm_commit(&group, &commit).unwrap();
    new_lead.c().join(&welcome).unwrap();
    // The receiver's check, as `read` makes it for a message declaring
    // the chronology only.
    let declared = ["chronology".to_owned()];
    let check = |plaintext: &[u8]| {
        crate::cases::check_declared(plaintext, &declared).map_err(|e| e.to_string())
    };
    let keep = |_: &str, kept: Kept<'_>| match kept {
        Kept::Message(p) => check(p),
        Kept::Imported(e) => check(&e.plaintext),
    };

    // An entry the sender's chronology holds, and the export with it.
    let mut address = policy::CaseFile::new();
    address.insert(
        policy::FieldPath::new("family.new_address").unwrap(),
        policy::Value::Text("1 Hidden Lane".into()),
    );
    let hidden = crate::referral::disclosed_bytes(&address);
    sender.c().encrypt(&group, &hidden).unwrap();
    let hist = sender.c().send_history(&group).unwrap();
    let refused = new_lead.c().process_checked(&hist, None, &keep);
    assert!(
        matches!(&refused, Err(MlsError::Refused(r)) if r.contains("family.new_address")),
        "{refused:?}"
    );
    assert!(new_lead.c().history(&group).unwrap().is_empty());
    // The history message itself is not a chronology entry for the sender.
    assert_eq!(sender.c().history(&group).unwrap().len(), 2);

    // Entries within the check, backdated and passed off as a colleague's
    // (and as handed over by them): taken, but marked as handed over by
    // the member who sent them.
    let colleague = team[1].id.clone();
    let entry = |text: &[u8]| HistoryEntry {
        epoch: 0,
        sender: colleague.clone(),
        at_ms: 1_000,
        plaintext: text.to_vec(),
        imported_from: Some(colleague.clone()),
    };
    let exporter = sender.id.clone();
    let export = |entries: Vec<HistoryEntry>| HistoryExport {
        format: HISTORY_FORMAT,
        case_id: "CASE-42".into(),
        exported_by: exporter.clone(),
        entries,
    };
    let forged = send_export(sender.c(), &group, &export(vec![entry(b"one")]));
    assert_eq!(
        new_lead.c().process_checked(&forged, None, &keep).unwrap(),
        Processed::HistoryImported {
            group: group.clone(),
            from: sender.id.clone(),
            imported: 1
        }
    );
    let h = new_lead.c().history(&group).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].plaintext, b"one");
    assert_eq!(h[0].imported_from.as_deref(), Some(sender.id.as_str()));

    // A sender that is not a user identity (a terminal escape, say):
    // refused, nothing kept.
    let mut odd = entry(b"two");
    odd.sender = "\x1b[2K".into();
    let odd = send_export(sender.c(), &group, &export(vec![odd]));
    assert!(matches!(
        new_lead.c().process_checked(&odd, None, &keep),
        Err(MlsError::BadHistory(_))
    ));
    assert_eq!(new_lead.c().history(&group).unwrap().len(), 1);
}

/// A handover adds only the new lead it names: a KeyPackage that is
/// someone else's is refused, and the group is left as it was.
#[test]
fn a_handover_with_someone_elses_key_package_is_refused_and_changes_nothing() {
    let (_sender, mut team, group) = referral();
    let named = Person::new("c.example", "lead2");
    let mut other = Person::new("c.example", "mallory");
    let kp = other.kp();
    let old = team[0].id.clone();
    let before = team[1].c().members(&group).unwrap();
    let r = team[1].c().handover(&group, &kp, &named.id, &old);
    assert!(
        matches!(&r, Err(MlsError::NotTheirKeyPackage { named: n, owner })
            if *n == named.id && *owner == other.id),
        "{r:?}"
    );
    assert!(!team[1].c().has_pending_commit(&group));
    assert_eq!(team[1].c().members(&group).unwrap(), before);
    assert!(matches!(
        team[1].c().check_key_package_of(&kp, &named.id),
        Err(MlsError::NotTheirKeyPackage { .. })
    ));
    team[1].c().check_key_package_of(&kp, &other.id).unwrap();
}

#[test]
fn remove_member_cuts_off_reading() {
    let (mut sender, mut team, group) = referral();
    let removed = team[2].id.clone();
    let commit = sender.c().remove_member(&group, &removed).unwrap();
    team[0].c().process(&commit).unwrap();
    team[2].c().process(&commit).unwrap();
    let ct = sender.c().encrypt(&group, b"after removal").unwrap();
    assert_eq!(app(team[0].c().process(&ct).unwrap()).1, b"after removal");
    let err = team[2].c().process(&ct).unwrap_err();
    assert!(matches!(err, MlsError::NotMember(_)), "{err:?}");
    assert!(matches!(
        sender.c().remove_member(&group, &removed),
        Err(MlsError::MemberNotFound(_))
    ));
    let own = sender.id.clone();
    assert!(matches!(
        sender.c().remove_member(&group, &own),
        Err(MlsError::InvalidArgument(_))
    ));
}

#[test]
fn welcome_not_for_us_is_refused() {
    let mut sender = Person::new("a.example", "sw1");
    let mut intended = Person::new("b.example", "d1");
    let mut other = Person::new("b.example", "d2");
    other.kp();
    let group = sender.c().create_group("CASE-9").unwrap();
    let (commit, welcome) = sender.c().add_members(&group, &[intended.kp()]).unwrap();
    assert!(matches!(
        other.c().join(&welcome),
        Err(MlsError::WelcomeNotForUs)
    ));
    assert!(other.c().groups().unwrap().is_empty());
    // A commit is not a Welcome; a Welcome is not a group message.
    assert!(matches!(
        other.c().join(&commit),
        Err(MlsError::Malformed(_))
    ));
    assert!(matches!(
        intended.c().process(&welcome),
        Err(MlsError::Malformed(_))
    ));
    // Joining twice from the same Welcome is refused (the KeyPackage is used up).
    intended.c().join(&welcome).unwrap();
    assert!(intended.c().join(&welcome).is_err());
}

#[test]
fn message_for_unknown_group_is_refused() {
    let (mut sender, _team, group) = referral();
    let mut stranger = Person::new("b.example", "x1");
    let ct = sender.c().encrypt(&group, b"not yours").unwrap();
    assert!(matches!(
        stranger.c().process(&ct),
        Err(MlsError::UnknownGroup(g)) if g == group
    ));
    assert!(matches!(
        stranger.c().encrypt(&group, b"x"),
        Err(MlsError::UnknownGroup(_))
    ));
}

#[test]
fn last_resort_key_package_serves_two_welcomes() {
    let mut a = Person::new("a.example", "sw1");
    let mut b = Person::new("b.example", "d1");
    let lr = b.c().last_resort_key_package().unwrap();
    let g1 = a.c().create_group("CASE-A").unwrap();
    let g2 = a.c().create_group("CASE-B").unwrap();
    let (_, w1) = a.c().add_members(&g1, std::slice::from_ref(&lr)).unwrap();
    let (_, w2) = a.c().add_members(&g2, &[lr]).unwrap();
    assert_eq!(b.c().join(&w1).unwrap().1, "CASE-A");
    b.restart();
    assert_eq!(b.c().join(&w2).unwrap().1, "CASE-B");
    assert_eq!(b.c().groups().unwrap().len(), 2);
}

#[test]
fn state_file_is_where_promised() {
    let p = Person::new("a.example", "sw1");
    assert!(p.path().join("mls.sqlite3").exists());
}

/// Rough costs, printed with `--nocapture` (not a benchmark; the bench
/// binary does it properly).
#[test]
fn rough_costs() {
    let mut sender = Person::new("a.example", "sw1");
    let mut team: Vec<Person> = (0..5)
        .map(|i| Person::new("b.example", &format!("d{i}")))
        .collect();
    let t = Instant::now();
    let kps: Vec<Vec<u8>> = team.iter_mut().map(Person::kp).collect();
    let kp_each = t.elapsed() / 5;
    let body = vec![0x5a_u8; 8 * 1024];
    let t = Instant::now();
    let group = sender.c().create_group("CASE-BENCH").unwrap();
    let (_, welcome) = sender.c().add_members(&group, &kps).unwrap();
    let create_add = t.elapsed();
    let t = Instant::now();
    for m in &mut team {
        m.c().join(&welcome).unwrap();
    }
    let join_each = t.elapsed() / 5;
    let t = Instant::now();
    let ct = sender.c().encrypt(&group, &body).unwrap();
    let enc = t.elapsed();
    let t = Instant::now();
    app(team[0].c().process(&ct).unwrap());
    let dec = t.elapsed();
    let t = Instant::now();
    let ct2 = team[0].c().encrypt(&group, b"follow-up").unwrap();
    app(sender.c().process(&ct2).unwrap());
    let follow = t.elapsed();
    eprintln!(
        "key package {kp_each:?}; create+add 5 {create_add:?}; join {join_each:?}; \
         encrypt 8 KiB {enc:?}; decrypt 8 KiB {dec:?}; follow-up enc+dec {follow:?}"
    );
}

#[cfg(unix)]
#[test]
fn the_keys_and_history_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let client = MlsClient::open(&dir, &uri("northshire", "alice")).unwrap();
    drop(client);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("mls.sqlite3")), 0o600);
    // One written by an earlier version, readable by anyone, is made
    // owner-only when the client opens it again.
    let old = dir.join("cases.json");
    std::fs::write(&old, "{}").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(
        dir.join("mls.sqlite3"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let client = MlsClient::open(&dir, &uri("northshire", "alice")).unwrap();
    for f in ["mls.sqlite3", "mls.sqlite3-wal", "cases.json"] {
        let p = dir.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
    drop(client);
}

#[test]
fn content_refused_before_it_is_kept_uses_up_its_key_and_the_next_message_reads() {
    let (mut sender, mut team, group) = referral();
    let ct = sender.c().encrypt(&group, b"too much").unwrap();
    let refuse = |_: &str, _: Kept<'_>| Err("holds more than it declares".to_owned());
    assert!(matches!(
        team[0].c().process_checked(&ct, None, &refuse),
        Err(MlsError::Refused(r)) if r.contains("more than it declares")
    ));
    // Not kept; the same bytes again are a replay; the next one reads.
    let kept = team[0].c().history(&group).unwrap().len();
    assert!(matches!(team[0].c().process(&ct), Err(MlsError::Replay)));
    let next = sender.c().encrypt(&group, b"within").unwrap();
    app(team[0].c().process(&next).unwrap());
    let history = team[0].c().history(&group).unwrap();
    assert_eq!(history.len(), kept + 1);
    assert!(history.iter().all(|e| e.plaintext != b"too much"));
}

#[test]
fn a_group_names_its_creators_area_as_home_and_a_second_group_for_a_case_is_refused() {
    let (_sender, mut team, group) = referral();
    assert_eq!(
        proto::mls::home_of_group(&group.0),
        Some(proto::AreaId::new("a.example").unwrap())
    );
    // Someone else makes a group of their own under the same case id and
    // adds a member of the real one: refused, and the case is still the
    // real group.
    let mut other = Person::new("c.example", "mallory");
    let kp = team[0].kp();
    let theirs = other.c().create_group("CASE-42").unwrap();
    let (_, welcome) = other.c().add_members(&theirs, &[kp]).unwrap();
    let r = team[0].c().join(&welcome);
    assert!(
        matches!(&r, Err(MlsError::Refused(m)) if m.contains("CASE-42")),
        "{r:?}"
    );
    let groups: Vec<(GroupId, String)> = team[0].c().groups().unwrap();
    let cases: Vec<&GroupId> = groups
        .iter()
        .filter(|(_, c)| c == "CASE-42")
        .map(|(g, _)| g)
        .collect();
    assert_eq!(cases, [&group]);
}

/// A KeyPackage from a client that cannot take part in a case (no support
/// for case ids, which every case's group requires) is refused when it is
/// checked, before any group is changed; one that can is taken.
#[test]
fn a_key_package_without_case_id_support_is_refused_when_checked() {
    let mut sender = Person::new("a.example", "sw1");
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
    let id = uri("b.example", "d1");
    let credential = CredentialWithKey {
        credential: BasicCredential::new(id.as_bytes().to_vec()).into(),
        signature_key: signer.to_public_vec().into(),
    };
    let without = KeyPackage::builder()
        .build(CIPHERSUITE, &Provider::default(), &signer, credential)
        .unwrap()
        .key_package()
        .tls_serialize_detached()
        .unwrap();
    assert!(matches!(
        sender.c().key_package_identity(&without),
        Err(MlsError::InvalidKeyPackage(_))
    ));
    let with = foreign_key_package(&id);
    assert_eq!(sender.c().key_package_identity(&with).unwrap(), id);
}

#[test]
fn a_welcome_joined_by_before_is_already_in_group_even_with_its_key_package_used_up() {
    let (mut sender, _team, group) = referral();
    let mut late = Person::new("b.example", "d7");
    let (_, welcome) = sender.c().add_members(&group, &[late.kp()]).unwrap();
    late.c().join(&welcome).unwrap();
    late.restart();
    match late.c().join(&welcome) {
        Err(MlsError::AlreadyInGroup(g)) => assert_eq!(g, group),
        other => panic!("expected AlreadyInGroup, got {other:?}"),
    }
}
