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
