//! Free space on the data directory's file system.
//!
//! A gateway whose disk fills up cannot even record that a duty worker has
//! read or acknowledged a referral. So it keeps a reserve
//! (`limits.min_free_disk_mib`): while the free space is below it, new
//! messages are refused (users and peers are answered 507 and retry later;
//! a peer keeps them queued, so nothing is lost), and everything else —
//! listing, fetching, acknowledging, status from peers — goes on in the
//! room left. The space is read once a second, so the gateway takes
//! messages again on its own once an operator has made room.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the free space is read.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The free space last read, and whether it is below the reserve.
#[derive(Debug)]
pub(crate) struct DiskSpace {
    dir: PathBuf,
    reserve_bytes: u64,
    free_bytes: AtomicU64,
    low: AtomicBool,
}

/// What a reading changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Still on the same side of the reserve.
    None,
    /// The free space fell below the reserve.
    BecameLow,
    /// The free space is back at or above the reserve.
    Recovered,
}

impl DiskSpace {
    /// Watches the file system holding `dir`, keeping `reserve_mib` MiB free
    /// (0: never low). Nothing is read until [`check`](Self::check).
    pub(crate) fn new(dir: &Path, reserve_mib: u64) -> DiskSpace {
        DiskSpace {
            dir: dir.to_owned(),
            reserve_bytes: reserve_mib.saturating_mul(1024 * 1024),
            free_bytes: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(false),
        }
    }

    /// Reads the free space now. On a failed read the last state stays.
    pub(crate) fn check(&self) -> std::io::Result<Change> {
        let free = free_bytes(&self.dir)?;
        Ok(self.record(free))
    }

    /// Takes `free` as the free space now.
    fn record(&self, free: u64) -> Change {
        self.free_bytes.store(free, Ordering::Relaxed);
        let low = free < self.reserve_bytes;
        match (self.low.swap(low, Ordering::Relaxed), low) {
            (false, true) => Change::BecameLow,
            (true, false) => Change::Recovered,
            _ => Change::None,
        }
    }

    /// Whether new messages are refused now.
    pub(crate) fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// The free space last read, in bytes (`None` before the first reading).
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        Some(self.free_bytes.load(Ordering::Relaxed)).filter(|&b| b != u64::MAX)
    }

    /// The reserve, in bytes.
    pub(crate) fn reserve_bytes(&self) -> u64 {
        self.reserve_bytes
    }
}

/// Bytes an unprivileged writer may still use on the file system holding
/// `dir` (blocks reserved for root are not counted: a gateway running as
/// root should not lean on them either).
pub(crate) fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Reads the free space now and logs what changed; `failing` remembers a
/// failed reading, so that a lasting failure is logged once.
pub(crate) fn check_and_log(disk: &DiskSpace, failing: &mut bool) {
    match disk.check() {
        Ok(change) => {
            *failing = false;
            log(disk, change);
        }
        Err(e) if !*failing => {
            *failing = true;
            tracing::warn!(error = %e, dir = %disk.dir.display(), "cannot read the free disk space; the last reading stands");
        }
        Err(_) => {}
    }
}

/// Reads the free space every [`CHECK_EVERY`] until `stop`, logging when
/// the gateway stops and starts taking new messages.
pub(crate) async fn watch(disk: Arc<DiskSpace>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = crate::stopped(&mut stop) => break,
        }
        // A statfs on a stalled file system must not hold up a runtime
        // thread that serves requests.
        let (d, mut f) = (disk.clone(), failing);
        let reading = tokio::task::spawn_blocking(move || {
            check_and_log(&d, &mut f);
            f
        });
        tokio::select! {
            r = reading => match r {
                Ok(f) => failing = f,
                Err(_) => break,
            },
            _ = crate::stopped(&mut stop) => break,
        }
    }
}

fn log(disk: &DiskSpace, change: Change) {
    let mib = |b: u64| b / (1024 * 1024);
    let free_mib = disk.free_bytes().map_or(0, mib);
    let reserve_mib = mib(disk.reserve_bytes);
    match change {
        Change::None => {}
        Change::BecameLow => tracing::error!(
            free_mib,
            reserve_mib,
            dir = %disk.dir.display(),
            "disk space is below limits.min_free_disk_mib: new messages are refused (senders retry later); fetches, acknowledgements and status go on"
        ),
        Change::Recovered => tracing::info!(
            free_mib,
            reserve_mib,
            "disk space is back above limits.min_free_disk_mib: taking new messages again"
        ),
    }
}

#[cfg(test)]
mod tests;
