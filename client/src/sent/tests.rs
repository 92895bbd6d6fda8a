//! The record of sent messages on a real file.

use super::*;

fn entry(n: u8, to: &str) -> SentEntry {
    SentEntry {
        message_id: MessageId::time_ordered(1_000 + u64::from(n), [n; 10]),
        to: to.into(),
        what: "referral".into(),
        case: Some(format!("case-{n}")),
        category: "relocation".into(),
        at_ms: 1_000 + u64::from(n),
    }
}

#[test]
fn sent_messages_are_read_back_in_order_with_the_final_statuses_seen() {
    let dir = tempfile::tempdir().unwrap();
    let log = SentLog::in_dir(&dir.path().join("data"));
    assert!(log.read().unwrap().is_empty(), "no file yet: nothing sent");
    let (a, b) = (
        entry(1, "team:duty@southvale"),
        entry(2, "user:dan@southvale"),
    );
    log.record(a.clone()).unwrap();
    log.record(b.clone()).unwrap();
    // Sent again with the same key (the same message): kept once, as first sent.
    log.record(SentEntry {
        at_ms: 9_999,
        ..a.clone()
    })
    .unwrap();
    let gone = FinalStatus {
        status: Status::Undeliverable,
        reason: Some("no one read it".into()),
    };
    log.record_final(&a.message_id, gone.clone()).unwrap();
    // A final status for a message not recorded here changes nothing.
    log.record_final(
        &entry(3, "x").message_id,
        FinalStatus {
            status: Status::Acknowledged,
            reason: None,
        },
    )
    .unwrap();
    assert_eq!(
        log.read().unwrap(),
        [
            Recorded {
                entry: a,
                last: Some(gone)
            },
            Recorded {
                entry: b,
                last: None
            }
        ]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("data/sent.jsonl"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn a_torn_or_foreign_line_is_skipped_and_the_rest_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = SentLog::in_dir(dir.path());
    let (a, b) = (
        entry(1, "team:duty@southvale"),
        entry(2, "user:dan@southvale"),
    );
    log.record(a.clone()).unwrap();
    // Lines that are not ours, then a write cut short mid-line.
    let path = dir.path().join("sent.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(b"[1,2]\n\xff\xfe\n{\"sent\":{\"message_id\":\"00")
        .unwrap();
    drop(f);
    // The next record starts on a line of its own, and is read.
    log.record(b.clone()).unwrap();
    let read: Vec<SentEntry> = log.read().unwrap().into_iter().map(|r| r.entry).collect();
    assert_eq!(read, [a, b]);
}

#[test]
fn only_acknowledged_and_undeliverable_are_final() {
    let finals: Vec<Status> = [
        Status::Accepted,
        Status::Delivered,
        Status::Fetched,
        Status::Acknowledged,
        Status::Undeliverable,
    ]
    .into_iter()
    .filter(|s| is_final(*s))
    .collect();
    assert_eq!(finals, [Status::Acknowledged, Status::Undeliverable]);
}

#[test]
fn a_check_asks_about_the_newest_or_a_sample_of_the_open_ones_and_keeps_the_final_ones() {
    let recorded: Vec<Recorded> = (0..10u8)
        .map(|n| Recorded {
            entry: entry(n, "team:duty@southvale"),
            last: (n % 3 == 0).then_some(FinalStatus {
                status: Status::Acknowledged,
                reason: None,
            }),
        })
        .collect();
    let ns = |rs: &[Recorded]| -> Vec<u64> { rs.iter().map(|r| r.entry.at_ms - 1_000).collect() };
    // Final: 0, 3, 6, 9. Open: 1, 2, 4, 5, 7, 8.
    assert_eq!(
        ns(&pick(recorded.clone(), Ask::Newest(2))),
        [0, 3, 6, 7, 8, 9]
    );
    assert_eq!(
        ns(&pick(recorded.clone(), Ask::Newest(100))),
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(
        ns(&pick(recorded.clone(), Ask::Sample(100))),
        (0..10).collect::<Vec<_>>()
    );
    // A sample: 3 of the open ones, in order, with every final one; over
    // many checks, every open one is asked about.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let got = ns(&pick(recorded.clone(), Ask::Sample(3)));
        assert_eq!(got.len(), 7, "{got:?}");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        for f in [0, 3, 6, 9] {
            assert!(got.contains(&f), "{got:?}");
        }
        seen.extend(got);
    }
    assert_eq!(seen.len(), 10, "{seen:?}");
}
