//! Message bodies in append-only segment files beside the database.
//!
//! A body (ciphertext) is written once, sequentially, instead of through
//! SQLite's WAL and then again into the database file by a checkpoint. The
//! store thread appends the bodies of a group, then [`BodyLog::sync`] writes
//! them with one call and `fdatasync`s the segment *before* the group's
//! COMMIT, so a committed row never points at bytes that are not durable.
//! Bytes of a group that did not commit stay in the file unreferenced; a
//! reopened log appends after whatever the file holds, torn tail included.
//!
//! Segments are `<n>.seg` files; a full one is closed and the next begins.
//! Closed segments that no row refers to any more are removed by
//! [`BodyLog::remove_below`], which keeps up to [`SPARES`] of them as
//! spares: renamed, each becomes a next segment instead of a new file.
//! A spare not reused within [`BodyLog::drop_stale_spares`]'s age goes too,
//! so delivered bodies do not stay in it at low traffic.
//! Unlinking a full segment frees its blocks (and, with the `discard`
//! mount option, trims them) and creating one allocates them again: writes
//! of file-system metadata that every other sync on the disk then waits
//! behind. And bodies written over a spare's allocated blocks are made
//! durable without writing any metadata (on this disk, 4 threads each
//! writing 56 KiB and syncing: 446 µs per `fdatasync` over allocated
//! blocks, 799 µs appending). Bodies written over a spare's
//! old bytes are found only through committed rows, as always; a reopened
//! log never appends to a segment that has reached the roll size (its
//! length no longer tells where its bodies end) but begins the next.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Size at which a segment is closed and the next one begun. Small enough
/// that removing a delivered one is a short job for the file system (a
/// 64 MiB unlink stalled every writer on the disk for tens of
/// milliseconds), large enough that a segment outlives many groups.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// Room kept between groups for the bodies a group appends.
const KEPT_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Closed segments kept for reuse as the next ones. Delivered segments are
/// removed about once a second, and at 10,000 messages a second of 4 KiB a
/// relay fills more than two segments in that time: with fewer spares most
/// new segments would still be new files.
const SPARES: usize = 4;

/// The name suffix of a spare segment (`<n>.seg-old`, after the segment it
/// was).
const SPARE_SUFFIX: &str = ".seg-old";

/// Where a body is: segment number, offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyRef {
    pub(crate) seg: i64,
    pub(crate) off: i64,
    pub(crate) len: i64,
}

/// One directory of segments.
#[derive(Debug)]
pub(crate) struct BodyLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// The segment last read, kept open: a batch reads many bodies from one.
    reading: Mutex<Option<(i64, Arc<File>)>>,
    /// Set by a test to make the next directory sync of a roll fail.
    #[cfg(test)]
    fail_next_roll_sync: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Inner {
    /// The segment being appended to.
    seg: i64,
    file: File,
    /// Bytes in that segment's file.
    len: u64,
    /// Appended since the last sync.
    pending: Vec<u8>,
    /// Smallest segment number that may still exist.
    oldest: i64,
    /// Closed segments ready for reuse (removals keep up to [`SPARES`]).
    spares: Vec<PathBuf>,
}

pub(crate) fn segment_path(dir: &Path, seg: i64) -> PathBuf {
    dir.join(format!("{seg:010}.seg"))
}

fn spare_path(dir: &Path, seg: i64) -> PathBuf {
    dir.join(format!("{seg:010}{SPARE_SUFFIX}"))
}

/// What a body-log directory holds.
struct Listing {
    /// Segment numbers, ascending.
    segments: Vec<i64>,
    /// Spare segments, by name.
    spares: Vec<PathBuf>,
}

/// Lists the segments and spares in `dir`, in one pass over it.
fn list(dir: &Path) -> io::Result<Listing> {
    let mut out = Listing {
        segments: Vec::new(),
        spares: Vec::new(),
    };
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.ends_with(SPARE_SUFFIX) {
            out.spares.push(entry.path());
        } else if let Some(Ok(n)) = name.strip_suffix(".seg").map(str::parse::<i64>) {
            out.segments.push(n);
        }
    }
    out.segments.sort_unstable();
    out.spares.sort_unstable();
    Ok(out)
}

fn open_segment(dir: &Path, seg: i64) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(segment_path(dir, seg))
}

/// Makes a new or removed directory entry durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl BodyLog {
    /// Opens (creating if needed) the segments in `dir`; appends continue
    /// after the end of the newest.
    pub(crate) fn open(dir: &Path) -> io::Result<BodyLog> {
        std::fs::create_dir_all(dir)?;
        let Listing {
            segments: existing,
            spares,
        } = list(dir)?;
        let mut seg = existing.last().copied().unwrap_or(1);
        let mut file = open_segment(dir, seg)?;
        let mut len = file.metadata()?.len();
        if len >= SEGMENT_BYTES {
            // Full, or a reused spare whose length says nothing of where
            // its bodies end: begin the next segment.
            seg += 1;
            file = open_segment(dir, seg)?;
            len = 0;
        }
        if existing.last() != Some(&seg) {
            sync_dir(dir)?;
        }
        Ok(BodyLog {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner {
                seg,
                file,
                len,
                pending: Vec::new(),
                oldest: existing.first().copied().unwrap_or(seg),
                spares,
            }),
            reading: Mutex::new(None),
            #[cfg(test)]
            fail_next_roll_sync: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent even if a holder panicked: every
        // mutation below is a single assignment or a buffer operation.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a body for the next [`sync`](Self::sync); returns where it will be.
    pub(crate) fn append(&self, body: &[u8]) -> BodyRef {
        let mut inner = self.lock();
        let off = inner.len + inner.pending.len() as u64;
        inner.pending.extend_from_slice(body);
        BodyRef {
            seg: inner.seg,
            off: off as i64,
            len: body.len() as i64,
        }
    }

    /// Takes back the body queued last, if `r` is it (and it is not written
    /// yet): for a body whose row turned out to be a duplicate. Returns
    /// whether it was taken back.
    pub(crate) fn unappend(&self, r: BodyRef) -> bool {
        let mut inner = self.lock();
        let queued = inner.pending.len() as u64;
        let (Ok(off), Ok(len)) = (u64::try_from(r.off), u64::try_from(r.len)) else {
            return false;
        };
        let last = r.seg == inner.seg && len <= queued && off + len == inner.len + queued;
        if last {
            let keep = (queued - len) as usize;
            inner.pending.truncate(keep);
        }
        last
    }

    /// Writes the queued bodies and makes them durable. On failure nothing
    /// queued may be referred to: the caller rolls its transaction back.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.pending.is_empty() {
            return Ok(());
        }
        let at = inner.len;
        // Advance first: after a failed write the bytes at `at` are unknown,
        // and later bodies must not be placed over them.
        let queued = inner.pending.len() as u64;
        inner.len += queued;
        let written = inner
            .file
            .write_all_at(&inner.pending, at)
            .and_then(|()| inner.file.sync_data());
        // The next group appends into the same room: growing a fresh buffer
        // group after group copied every body again and again. A burst's
        // larger room is given back.
        inner.pending.clear();
        if inner.pending.capacity() > KEPT_BUFFER_BYTES {
            inner.pending = Vec::new();
        }
        written
    }

    /// Closes a full segment and opens the next. Called only once the rows
    /// of the group whose bodies filled it are committed: a removal decided
    /// from rows read after it sees the new open segment then sees those
    /// rows too (see [`BodyLog::open_segment`]). A failure leaves the full
    /// segment open, appended to as before (the segment, file and length
    /// change together or not at all); the next call tries again.
    pub(crate) fn roll_if_full(&self) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.len < SEGMENT_BYTES {
            return Ok(());
        }
        let next = inner.seg + 1;
        let path = segment_path(&self.dir, next);
        // A roll that failed after its rename left the spare in place.
        if !path.exists() {
            if let Some(spare) = inner.spares.pop() {
                if let Err(e) = std::fs::rename(&spare, &path) {
                    inner.spares.push(spare);
                    return Err(e);
                }
            }
        }
        let file = open_segment(&self.dir, next)?;
        #[cfg(test)]
        if self
            .fail_next_roll_sync
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(io::Error::other("injected: the directory sync failed"));
        }
        sync_dir(&self.dir)?;
        inner.file = file;
        inner.seg = next;
        inner.len = 0;
        Ok(())
    }

    /// Drops the bodies queued since the last sync.
    pub(crate) fn discard(&self) {
        let mut inner = self.lock();
        let n = inner.pending.len() as u64;
        inner.pending.clear();
        // Keep offsets unique: refs handed out for the dropped bytes are
        // never committed, and the space is skipped.
        inner.len += n;
    }

    /// Reads a body.
    pub(crate) fn read(&self, r: BodyRef) -> io::Result<Vec<u8>> {
        let (Ok(off), Ok(len)) = (u64::try_from(r.off), usize::try_from(r.len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad body reference {r:?}"),
            ));
        };
        let file = {
            let mut reading = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            match &*reading {
                Some((seg, file)) if *seg == r.seg => file.clone(),
                _ => {
                    let file = Arc::new(File::open(segment_path(&self.dir, r.seg))?);
                    *reading = Some((r.seg, file.clone()));
                    file
                }
            }
        };
        // Bound the allocation by what the file holds, whatever the row says.
        if off.saturating_add(len as u64) > file.metadata()?.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body reference {r:?} is past the end of its segment"),
            ));
        }
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off)?;
        Ok(buf)
    }

    /// Overwrites bodies with zeros and makes that durable, then gives
    /// their blocks back to the file system (a hole punched where they
    /// lay), so a segment kept for a message not yet acknowledged takes
    /// disk space only for the bodies still in it. Only for bodies no row
    /// refers to any more (erased), so no reader asks for them. A body
    /// whose segment is gone already, or that lies beyond its segment's
    /// end, is skipped. Returns the bytes whose blocks were given back
    /// (none on a file system that cannot punch holes: the zeros stay).
    pub(crate) fn zero(&self, refs: &[BodyRef]) -> io::Result<u64> {
        let mut refs = refs.to_vec();
        refs.sort_by_key(|r| (r.seg, r.off));
        let zeros = vec![0u8; 64 * 1024];
        let mut freed = 0;
        for seg in refs.chunk_by(|a, b| a.seg == b.seg) {
            let path = segment_path(&self.dir, seg[0].seg);
            let file = match std::fs::OpenOptions::new().write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let end = file.metadata()?.len();
            let mut zeroed = Vec::with_capacity(seg.len());
            for r in seg {
                let (Ok(start), Ok(len)) = (u64::try_from(r.off), u64::try_from(r.len)) else {
                    continue;
                };
                let Some(stop) = start.checked_add(len).filter(|s| *s <= end) else {
                    continue;
                };
                let mut at = start;
                while at < stop {
                    let n = usize::try_from(stop - at).map_or(zeros.len(), |n| n.min(zeros.len()));
                    file.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                zeroed.push((start, len));
            }
            // The zeros reach the disk before the blocks are freed: freed
            // first, the pages written would be dropped and the blocks keep
            // the ciphertext until reused.
            file.sync_data()?;
            let mut punched = 0;
            for (start, len) in zeroed {
                let mode =
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
                match rustix::fs::fallocate(&file, mode, start, len) {
                    Ok(()) => punched += len,
                    Err(e) => {
                        tracing::debug!(error = %e, "body log: cannot punch a hole; the zeros stay");
                        break;
                    }
                }
            }
            if punched > 0 {
                file.sync_data()?;
                freed += punched;
            }
        }
        Ok(freed)
    }

    /// Unlinks the spares last written more than `max_age` ago: under
    /// steady traffic spares are reused within seconds, but at low traffic
    /// one would otherwise keep delivered messages' ciphertext for as long
    /// as no new segment is needed. Returns how many.
    pub(crate) fn drop_stale_spares(&self, max_age: std::time::Duration) -> io::Result<usize> {
        let candidates = self.lock().spares.clone();
        let mut stale = Vec::new();
        for p in candidates {
            let written = std::fs::metadata(&p).and_then(|m| m.modified());
            if written.is_ok_and(|t| t.elapsed().is_ok_and(|age| age > max_age)) {
                stale.push(p);
            }
        }
        if stale.is_empty() {
            return Ok(0);
        }
        // Only those still spares are taken (the writer may have just taken
        // one as its next segment); once out of the list, it cannot.
        let taken: Vec<PathBuf> = {
            let mut inner = self.lock();
            let (taken, kept) = std::mem::take(&mut inner.spares)
                .into_iter()
                .partition(|p| stale.contains(p));
            inner.spares = kept;
            taken
        };
        // Every one is tried. One that cannot be unlinked goes back to the
        // front of the list (reused last, tried again at the next pass), and
        // the first error is returned once the others are gone.
        let mut removed = 0;
        let mut failed = Vec::new();
        let mut first_error = None;
        for p in taken {
            match std::fs::remove_file(&p) {
                Ok(()) => removed += 1,
                Err(e) => {
                    first_error.get_or_insert_with(|| {
                        io::Error::new(e.kind(), format!("unlinking {}: {e}", p.display()))
                    });
                    failed.push(p);
                }
            }
        }
        if !failed.is_empty() {
            let mut inner = self.lock();
            failed.append(&mut inner.spares);
            inner.spares = failed;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        first_error.map_or(Ok(removed), Err)
    }

    /// Whether a closed segment exists that might be removable.
    pub(crate) fn has_closed_segments(&self) -> bool {
        let inner = self.lock();
        inner.oldest < inner.seg
    }

    /// The segment being appended to now. Taken before the rows that decide
    /// a removal are read, it bounds what may go: rows committed after that
    /// read refer to it or to later ones, even if it closes meanwhile.
    pub(crate) fn open_segment(&self) -> i64 {
        self.lock().seg
    }

    /// Removes closed segments numbered below `seg` (no row refers to them),
    /// keeping them as spares while fewer than [`SPARES`] are kept.
    ///
    /// The writer's lock is held only to read the open segment and the
    /// spares, and to record what changed: unlinking a full segment and
    /// syncing the directory take tens of milliseconds under load, and the
    /// writer appends and syncs bodies meanwhile. Only segments below the
    /// open one are touched, so nothing the writer uses is removed; the
    /// writer takes a spare only once it is recorded, after its rename.
    pub(crate) fn remove_below(&self, seg: i64) -> io::Result<usize> {
        self.remove_segments_below(seg, true)
    }

    /// Removes closed segments numbered below `seg` (no row refers to them)
    /// and keeps none as a spare: their bytes are erased messages'
    /// ciphertext, which a spare would keep until overwritten.
    pub(crate) fn erase_below(&self, seg: i64) -> io::Result<usize> {
        self.remove_segments_below(seg, false)
    }

    fn remove_segments_below(&self, seg: i64, keep_spares: bool) -> io::Result<usize> {
        let (limit, mut kept) = {
            let inner = self.lock();
            (seg.min(inner.seg), inner.spares.len())
        };
        let mut removed = 0;
        for n in list(&self.dir)?.segments {
            if n >= limit {
                break;
            }
            let path = segment_path(&self.dir, n);
            if !keep_spares || kept >= SPARES {
                std::fs::remove_file(path)?;
            } else {
                let spare = spare_path(&self.dir, n);
                std::fs::rename(path, &spare)?;
                self.lock().spares.push(spare);
                kept += 1;
            }
            removed += 1;
        }
        {
            let mut inner = self.lock();
            inner.oldest = inner.oldest.max(limit);
        }
        {
            let mut reading = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            if reading.as_ref().is_some_and(|(n, _)| *n < limit) {
                *reading = None;
            }
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests;
