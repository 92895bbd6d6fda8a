use super::*;

#[test]
fn the_state_changes_only_when_the_free_space_crosses_the_reserve() {
    let disk = DiskSpace::new(Path::new("."), 1);
    let mib = 1024 * 1024;
    assert_eq!(disk.free_bytes(), None, "nothing read yet");
    assert!(!disk.is_low(), "not refused before the first reading");
    assert_eq!(disk.record(2 * mib), Change::None);
    assert_eq!(disk.record(mib - 1), Change::BecameLow);
    assert!(disk.is_low());
    assert_eq!(disk.record(0), Change::None);
    assert_eq!(disk.free_bytes(), Some(0));
    assert_eq!(
        disk.record(mib),
        Change::Recovered,
        "the reserve itself is enough"
    );
    assert!(!disk.is_low());
}

#[test]
fn a_reserve_of_zero_is_never_low() {
    let disk = DiskSpace::new(Path::new("."), 0);
    assert_eq!(disk.record(0), Change::None);
    assert!(!disk.is_low());
}

#[test]
fn the_free_space_of_a_real_directory_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let free = free_bytes(dir.path()).unwrap();
    assert!(free > 0);
    // A reserve larger than any disk is low at once; a reserve of 1 MiB
    // below what is free is not.
    let huge = DiskSpace::new(dir.path(), u64::MAX / (1024 * 1024));
    assert_eq!(huge.check().unwrap(), Change::BecameLow);
    let small = DiskSpace::new(dir.path(), (free / (1024 * 1024)).saturating_sub(1024));
    assert_eq!(small.check().unwrap(), Change::None);
    assert!(!small.is_low());
}

#[test]
fn a_directory_that_cannot_be_read_keeps_the_last_state() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone");
    let disk = DiskSpace::new(&gone, 1);
    assert_eq!(disk.record(0), Change::BecameLow);
    assert!(disk.check().is_err());
    assert!(disk.is_low(), "a failed reading changes nothing");
}
