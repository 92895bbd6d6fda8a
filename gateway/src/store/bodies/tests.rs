//! Tests of the body log: round trips, reopening, segments, bad references.

use super::*;

#[test]
fn bodies_round_trip_across_syncs_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let a = log.append(b"first body");
    let b = log.append(&[7u8; 5000]);
    commit(&log);
    assert_eq!(log.read(a).unwrap(), b"first body");
    assert_eq!(log.read(b).unwrap(), vec![7u8; 5000]);
    // A group that did not commit leaves unreferenced bytes behind.
    let lost = log.append(b"rolled back");
    log.discard();
    let c = log.append(b"after the rollback");
    commit(&log);
    assert!(c.off > lost.off);
    assert_eq!(log.read(c).unwrap(), b"after the rollback");
    drop(log);
    // A torn tail from a crash: reopening appends after it.
    let f = open_segment(dir.path(), 1).unwrap();
    f.write_all_at(b"torn", f.metadata().unwrap().len())
        .unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let d = log.append(b"after the crash");
    commit(&log);
    assert_eq!(log.read(a).unwrap(), b"first body");
    assert_eq!(log.read(d).unwrap(), b"after the crash");
    assert!(d.off >= c.off + c.len + 4);
}

#[test]
fn full_segments_are_closed_and_removed_when_unreferenced() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let big = vec![1u8; (SEGMENT_BYTES / 8) as usize];
    let mut refs = Vec::new();
    for _ in 0..9 {
        refs.push(log.append(&big));
        commit(&log);
    }
    assert!(log.has_closed_segments());
    let last = *refs.last().unwrap();
    assert_eq!(last.seg, 2, "eight fill segment 1");
    // Segment 1 is still referred to: nothing goes.
    assert_eq!(log.remove_below(1).unwrap(), 0);
    assert_eq!(log.read(refs[0]).unwrap().len(), big.len());
    // Nothing refers to segment 1 any more: it becomes a spare.
    assert_eq!(log.remove_below(2).unwrap(), 1);
    assert!(log.read(refs[0]).is_err());
    assert!(spare_path(dir.path(), 1).exists());
    assert_eq!(log.read(last).unwrap().len(), big.len());
    assert!(!log.has_closed_segments());
    // The open segment is never removed.
    assert_eq!(log.remove_below(i64::MAX).unwrap(), 0);
    assert_eq!(log.read(last).unwrap().len(), big.len());
}

#[test]
fn a_bad_reference_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let r = log.append(b"x");
    commit(&log);
    for bad in [
        BodyRef { off: -1, ..r },
        BodyRef { len: -1, ..r },
        BodyRef { seg: 99, ..r },
        BodyRef { len: 1000, ..r },
        BodyRef { len: i64::MAX, ..r },
    ] {
        assert!(log.read(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn only_the_last_unwritten_body_can_be_taken_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let a = log.append(b"kept");
    let b = log.append(b"a duplicate");
    assert!(!log.unappend(a), "not the last");
    assert!(log.unappend(b));
    assert!(!log.unappend(b), "already taken back");
    let c = log.append(b"next");
    assert_eq!(c.off, b.off, "its space is used again");
    commit(&log);
    assert!(!log.unappend(c), "already written");
    assert_eq!(log.read(a).unwrap(), b"kept");
    assert_eq!(log.read(c).unwrap(), b"next");
}

/// The inode of segment `seg` in `dir`.
fn inode(dir: &Path, seg: i64) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(segment_path(dir, seg)).unwrap().ino()
}

/// Appends full segments until `seg` is the open one.
fn fill_until(log: &BodyLog, seg: i64, byte: u8) -> Vec<BodyRef> {
    let half = vec![byte; (SEGMENT_BYTES / 2) as usize];
    let mut refs = Vec::new();
    while log.lock().seg < seg {
        refs.push(log.append(&half));
        commit(log);
    }
    refs
}

#[test]
fn removed_segments_are_reused_as_the_next_ones_and_reopening_begins_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let closed = SPARES as i64 + 2;
    fill_until(&log, closed + 1, 1);
    let old: Vec<u64> = (1..=closed).map(|n| inode(dir.path(), n)).collect();
    // All are delivered: the first SPARES are kept, the rest unlinked.
    assert_eq!(log.remove_below(closed + 1).unwrap(), closed as usize);
    assert_eq!(list(dir.path()).unwrap().spares.len(), SPARES);
    assert_eq!(log.lock().spares.len(), SPARES);
    // The next SPARES segments are those files; bodies written over their
    // old bytes read back as written.
    let newest = closed + 1 + SPARES as i64;
    let refs = fill_until(&log, newest, 2);
    for n in closed + 2..=newest {
        assert!(old[..SPARES].contains(&inode(dir.path(), n)), "segment {n}");
    }
    assert!(list(dir.path()).unwrap().spares.is_empty());
    for r in &refs {
        assert_eq!(log.read(*r).unwrap(), vec![2u8; r.len as usize]);
    }
    // Two more go and are kept, one under the name older versions used.
    let kept = [inode(dir.path(), closed + 1), inode(dir.path(), closed + 2)];
    assert_eq!(log.remove_below(closed + 3).unwrap(), 2);
    drop(log);
    std::fs::rename(
        spare_path(dir.path(), closed + 2),
        dir.path().join("spare.seg-old"),
    )
    .unwrap();
    // Reopened, the log does not append to the newest segment, a reused
    // one whose length no longer shows where its bodies end, but begins the
    // next one; and it finds both spares.
    let log = BodyLog::open(dir.path()).unwrap();
    assert_eq!(log.lock().spares.len(), 2);
    let after = log.append(b"after reopening");
    commit(&log);
    assert_eq!(after.seg, newest + 1);
    assert_eq!(
        (after.off, log.read(after).unwrap()),
        (0, b"after reopening".to_vec())
    );
    let last = refs.last().unwrap();
    assert_eq!(log.read(*last).unwrap(), vec![2u8; last.len as usize]);
    // The two spares come next; then, with none left, a new file (whose
    // inode number may be a freed one's: its length tells).
    fill_until(&log, newest + 4, 3);
    for n in [newest + 2, newest + 3] {
        assert!(kept.contains(&inode(dir.path(), n)), "segment {n}");
    }
    let fresh = segment_path(dir.path(), newest + 4);
    assert_eq!(std::fs::metadata(fresh).unwrap().len(), 0);
}

#[test]
fn the_append_buffer_keeps_its_room_between_groups_but_not_after_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let a = log.append(&[3u8; 64 * 1024]);
    commit(&log);
    assert!(log.lock().pending.capacity() >= 64 * 1024, "room kept");
    assert!(log.lock().pending.is_empty());
    let b = log.append(&vec![4u8; KEPT_BUFFER_BYTES + 1]);
    commit(&log);
    assert_eq!(
        log.lock().pending.capacity(),
        0,
        "a burst's room is given back"
    );
    assert_eq!(log.read(a).unwrap(), vec![3u8; 64 * 1024]);
    assert_eq!(log.read(b).unwrap().len(), KEPT_BUFFER_BYTES + 1);
}

#[test]
fn spares_not_reused_for_a_while_are_unlinked() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let closed = SPARES as i64;
    fill_until(&log, closed + 1, 1);
    assert_eq!(log.remove_below(closed + 1).unwrap(), closed as usize);
    let hour = std::time::Duration::from_secs(3600);
    // Freshly written: kept for reuse.
    assert_eq!(log.drop_stale_spares(hour).unwrap(), 0);
    assert_eq!(list(dir.path()).unwrap().spares.len(), SPARES);
    // Last written two hours ago, all but one: those go, from the list too.
    let spares = list(dir.path()).unwrap().spares;
    let old = std::time::SystemTime::now() - 2 * hour;
    for p in &spares[1..] {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_modified(old).unwrap();
    }
    assert_eq!(log.drop_stale_spares(hour).unwrap(), SPARES - 1);
    assert_eq!(list(dir.path()).unwrap().spares, spares[..1].to_vec());
    assert_eq!(log.lock().spares, spares[..1].to_vec());
    // The one left is still the next segment.
    let before = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&spares[0]).unwrap().ino()
    };
    fill_until(&log, closed + 2, 2);
    assert_eq!(inode(dir.path(), closed + 2), before);
}

#[test]
fn a_spare_that_cannot_be_unlinked_stays_listed_and_the_others_go() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let closed = SPARES as i64;
    fill_until(&log, closed + 1, 1);
    assert_eq!(log.remove_below(closed + 1).unwrap(), closed as usize);
    let spares = list(dir.path()).unwrap().spares;
    assert!(spares.len() >= 2, "{spares:?}");
    // The first spare is made something `unlink` refuses: a directory.
    std::fs::remove_file(&spares[0]).unwrap();
    std::fs::create_dir(&spares[0]).unwrap();
    std::fs::write(spares[0].join("inside"), b"x").unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for p in &spares {
        std::fs::File::open(p).unwrap().set_modified(old).unwrap();
    }
    let err = log
        .drop_stale_spares(std::time::Duration::from_secs(3600))
        .unwrap_err();
    assert!(
        err.to_string().contains(&spares[0].display().to_string()),
        "{err}"
    );
    // The others are gone; the one that failed is still listed, reused last.
    for p in &spares[1..] {
        assert!(!p.exists(), "{} is still on disk", p.display());
    }
    assert_eq!(log.lock().spares, spares[..1].to_vec());
    // Once it can be unlinked, the next pass takes it.
    std::fs::remove_dir_all(&spares[0]).unwrap();
    std::fs::write(&spares[0], b"").unwrap();
    std::fs::File::open(&spares[0])
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(
        log.drop_stale_spares(std::time::Duration::from_secs(3600))
            .unwrap(),
        1
    );
    assert!(log.lock().spares.is_empty());
    assert!(list(dir.path()).unwrap().spares.is_empty());
}

#[test]
fn zeroed_bodies_give_their_blocks_back_and_the_rest_stay_readable() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    // Not a whole number of blocks: the neighbours share the edge blocks.
    let mib = (1 << 20) + 1000;
    let refs: Vec<BodyRef> = (1..=3u8).map(|n| log.append(&vec![n; mib])).collect();
    commit(&log);
    let path = segment_path(dir.path(), refs[0].seg);
    let before = std::fs::metadata(&path).unwrap();
    let freed = log.zero(&refs[1..2]).unwrap();
    assert_eq!(freed, mib as u64);
    let after = std::fs::metadata(&path).unwrap();
    // Its place reads as zeros; the file keeps its length (appends go on
    // where they were), and about a MiB of blocks is free again.
    assert_eq!(log.read(refs[1]).unwrap(), vec![0u8; mib]);
    assert_eq!(after.len(), before.len());
    let freed_blocks = before.blocks().saturating_sub(after.blocks()) * 512;
    assert!(
        freed_blocks + 2 * 4096 >= (1 << 20),
        "only {freed_blocks} bytes of blocks were freed"
    );
    let raw = std::fs::read(&path).unwrap();
    assert!(
        !raw.windows(64).any(|w| w == [2u8; 64]),
        "the body's bytes are still there"
    );
    // The others are whole, and the log goes on appending after them.
    assert_eq!(log.read(refs[0]).unwrap(), vec![1u8; mib]);
    assert_eq!(log.read(refs[2]).unwrap(), vec![3u8; mib]);
    let next = log.append(b"after the hole");
    commit(&log);
    assert!(next.off >= refs[2].off + refs[2].len);
    assert_eq!(log.read(next).unwrap(), b"after the hole");
}

/// Syncs the queued bodies and, as the writer does once their group has
/// committed, closes a full segment.
fn commit(log: &BodyLog) {
    log.sync().unwrap();
    log.roll_if_full().unwrap();
}

#[test]
fn a_full_body_segment_stays_open_until_its_group_has_committed() {
    // A removal decides from rows read after it took the open segment: if
    // the segment a group's bodies filled closed before the group's rows
    // committed, those rows could be missed and their segment removed.
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let first = log.open_segment();
    let body = vec![7u8; 1 << 20];
    for _ in 0..17 {
        log.append(&body);
    }
    log.sync().unwrap();
    assert_eq!(
        log.open_segment(),
        first,
        "full, but its rows are not committed yet"
    );
    assert!(!log.has_closed_segments());
    log.roll_if_full().unwrap();
    assert_eq!(log.open_segment(), first + 1);
    assert!(log.has_closed_segments());
    // Nothing more to roll until the new one fills.
    log.roll_if_full().unwrap();
    assert_eq!(log.open_segment(), first + 1);
}

#[test]
fn a_roll_that_fails_keeps_appending_where_the_references_say() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let body = vec![7u8; 1 << 20];
    for _ in 0..17 {
        log.append(&body);
    }
    log.sync().unwrap();
    let full = log.open_segment();
    // The next segment is created, but the directory sync fails.
    log.fail_next_roll_sync
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(log.roll_if_full().is_err());
    assert_eq!(log.open_segment(), full, "the full segment stays open");
    // The next group's bodies are where their references say.
    let r = log.append(b"after the failed roll");
    log.sync().unwrap();
    assert_eq!(r.seg, full);
    assert_eq!(log.read(r).unwrap(), b"after the failed roll");
    // The next roll succeeds, and the body is still there.
    log.roll_if_full().unwrap();
    assert_eq!(log.open_segment(), full + 1);
    let s = log.append(b"in the next segment");
    commit(&log);
    assert_eq!(log.read(r).unwrap(), b"after the failed roll");
    assert_eq!(log.read(s).unwrap(), b"in the next segment");
}
