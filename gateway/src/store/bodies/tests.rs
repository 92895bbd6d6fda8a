//! Tests of the body log: round trips, reopening, segments, bad references.

use super::*;

#[test]
fn bodies_round_trip_across_syncs_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let a = log.append(b"first body");
    let b = log.append(&[7u8; 5000]);
    log.sync().unwrap();
    assert_eq!(log.read(a).unwrap(), b"first body");
    assert_eq!(log.read(b).unwrap(), vec![7u8; 5000]);
    // A group that did not commit leaves unreferenced bytes behind.
    let lost = log.append(b"rolled back");
    log.discard();
    let c = log.append(b"after the rollback");
    log.sync().unwrap();
    assert!(c.off > lost.off);
    assert_eq!(log.read(c).unwrap(), b"after the rollback");
    drop(log);
    // A torn tail from a crash: reopening appends after it.
    let f = open_segment(dir.path(), 1).unwrap();
    f.write_all_at(b"torn", f.metadata().unwrap().len())
        .unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let d = log.append(b"after the crash");
    log.sync().unwrap();
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
        log.sync().unwrap();
    }
    assert!(log.has_closed_segments());
    let last = *refs.last().unwrap();
    assert_eq!(last.seg, 2, "eight fill segment 1");
    // Segment 1 is still referred to: nothing goes.
    assert_eq!(log.remove_below(1).unwrap(), 0);
    assert_eq!(log.read(refs[0]).unwrap().len(), big.len());
    // Nothing refers to segment 1 any more: it becomes the spare.
    assert_eq!(log.remove_below(2).unwrap(), 1);
    assert!(log.read(refs[0]).is_err());
    assert!(dir.path().join(SPARE).exists());
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
    log.sync().unwrap();
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
    log.sync().unwrap();
    assert!(!log.unappend(c), "already written");
    assert_eq!(log.read(a).unwrap(), b"kept");
    assert_eq!(log.read(c).unwrap(), b"next");
}

#[test]
fn a_removed_segment_is_reused_as_the_next_and_reopening_begins_a_new_one() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let big = vec![1u8; (SEGMENT_BYTES / 8) as usize];
    for _ in 0..8 {
        log.append(&big);
        log.sync().unwrap();
    }
    let first = std::fs::metadata(segment_path(dir.path(), 1))
        .unwrap()
        .ino();
    // Segment 1 is delivered: kept as the spare, not unlinked.
    assert_eq!(log.remove_below(2).unwrap(), 1);
    assert_eq!(
        std::fs::metadata(dir.path().join(SPARE)).unwrap().ino(),
        first
    );
    // Filling segment 2 rolls into the spare: segment 3 is that file, and
    // bodies written over its old bytes read back as written.
    let mut refs = Vec::new();
    for i in 0..9u8 {
        refs.push((log.append(&vec![i; big.len()]), i));
        log.sync().unwrap();
    }
    assert_eq!(refs[8].0.seg, 3);
    assert!(!dir.path().join(SPARE).exists());
    assert_eq!(
        std::fs::metadata(segment_path(dir.path(), 3))
            .unwrap()
            .ino(),
        first
    );
    for (r, i) in &refs {
        assert_eq!(log.read(*r).unwrap(), vec![*i; big.len()]);
    }
    // Segment 2 goes too: it is the new spare, and with a spare kept the
    // next removal unlinks.
    assert_eq!(log.remove_below(3).unwrap(), 1);
    assert!(dir.path().join(SPARE).exists());
    drop(log);
    // Reopened, the log does not append to segment 3 (full of old bytes
    // past its newest body) but begins segment 4, and takes the spare up.
    let log = BodyLog::open(dir.path()).unwrap();
    let after = log.append(b"after reopening");
    log.sync().unwrap();
    assert_eq!(after.seg, 4);
    assert_eq!(
        (after.off, log.read(after).unwrap()),
        (0, b"after reopening".to_vec())
    );
    assert_eq!(log.read(refs[8].0).unwrap(), vec![8u8; big.len()]);
    assert!(log.lock().spare);
}

#[test]
fn the_append_buffer_keeps_its_room_between_groups_but_not_after_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let log = BodyLog::open(dir.path()).unwrap();
    let a = log.append(&[3u8; 64 * 1024]);
    log.sync().unwrap();
    assert!(log.lock().pending.capacity() >= 64 * 1024, "room kept");
    assert!(log.lock().pending.is_empty());
    let b = log.append(&vec![4u8; KEPT_BUFFER_BYTES + 1]);
    log.sync().unwrap();
    assert_eq!(
        log.lock().pending.capacity(),
        0,
        "a burst's room is given back"
    );
    assert_eq!(log.read(a).unwrap(), vec![3u8; 64 * 1024]);
    assert_eq!(log.read(b).unwrap().len(), KEPT_BUFFER_BYTES + 1);
}
