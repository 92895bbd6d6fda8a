//! The revocation lists a gateway enforces, and keeping them current.
//!
//! An area's CA publishes a CRL; the operator points `tls.crls` (this
//! area's users) and `peers[].crls` (a peer's gateway) at the files their
//! PKI keeps fresh. The gateway reads them at start (a list it cannot use
//! stops it, naming the file), then looks at the files every
//! `tls.crl_check_every` and, when one changed, reads them all again and
//! puts the new lists in force for every handshake and every request after
//! (see [`certs::Revocations`]). A changed file that cannot be used leaves
//! the lists in force as they were: it is logged, and shown in the metrics
//! (`gateway_crl_reload_failed`), until a good one replaces it. A list past
//! its `nextUpdate` is still enforced (it revokes what it names) and is
//! warned about: the CA has promised a newer one that has not arrived.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use certs::{RevocationList, Revocations};
use proto::AreaId;
use tokio::sync::watch;

use crate::config::Config;

/// Every configured CRL file, with its area and that area's CA file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sources {
    areas: Vec<(AreaId, PathBuf, Vec<PathBuf>)>,
}

impl Sources {
    /// The CRL files `config` names.
    pub(crate) fn of(config: &Config) -> Sources {
        let own = (
            config.area.clone(),
            config.tls.ca.clone(),
            config.tls.crls.clone(),
        );
        let peers = config
            .peers
            .iter()
            .map(|p| (p.area.clone(), p.ca.clone(), p.crls.clone()));
        Sources {
            areas: std::iter::once(own)
                .chain(peers)
                .filter(|(_, _, crls)| !crls.is_empty())
                .collect(),
        }
    }

    /// Reads and verifies every list.
    pub(crate) fn load(&self) -> Result<RevocationList, certs::CertError> {
        let mut cas = Vec::new();
        for (_, ca, _) in &self.areas {
            cas.push(certs::load_certs(ca)?);
        }
        RevocationList::load(
            self.areas
                .iter()
                .zip(&cas)
                .map(|((area, _, crls), cas)| (area, crls.as_slice(), cas.as_slice())),
        )
    }

    /// What the files look like, then the lists read from them: a change
    /// made while they are read shows as a stamp older than the files.
    pub(crate) fn read(&self) -> Result<Read, certs::CertError> {
        let stamp = self.stamp();
        Ok(Read {
            stamp,
            list: self.load()?,
        })
    }

    /// Which files, and what they look like now (size and modification
    /// time, or none if unreadable): when it changes, they are read again.
    fn stamp(&self) -> Stamp {
        self.areas
            .iter()
            .flat_map(|(_, ca, crls)| std::iter::once(ca).chain(crls))
            .map(|p| {
                let seen = std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?)));
                (p.clone(), seen)
            })
            .collect()
    }
}

/// Lists read, with what their files looked like before they were read.
pub(crate) struct Read {
    stamp: Stamp,
    list: RevocationList,
}

impl Read {
    /// The lists read.
    pub(crate) fn list(&self) -> &RevocationList {
        &self.list
    }
}

/// Logs each list read, warning about stale ones.
pub(crate) fn report(list: &RevocationList, now_s: i64) {
    for l in list.lists() {
        if l.is_stale(now_s) {
            tracing::warn!(
                area = %l.area,
                file = %l.path.display(),
                next_update = l.next_update.unwrap_or_default(),
                "revocation list is past its nextUpdate: it is still enforced, but newer revocations may be missing; fetch a fresh one from the CA"
            );
        } else {
            tracing::info!(area = %l.area, file = %l.path.display(), revoked = l.revoked, "revocation list in force");
        }
    }
}

/// The lists that are past their `nextUpdate` at `now_s` and were not in
/// `stale` (which is brought up to date): each is warned about once when it
/// goes stale, and again if it goes stale after a fresh one.
fn newly_stale(
    list: &RevocationList,
    now_s: i64,
    stale: &mut std::collections::HashSet<PathBuf>,
) -> Vec<PathBuf> {
    let now: std::collections::HashSet<PathBuf> = list
        .lists()
        .iter()
        .filter(|l| l.is_stale(now_s))
        .map(|l| l.path.clone())
        .collect();
    let new = now.difference(stale).cloned().collect();
    *stale = now;
    new
}

/// One line per list, for `gateway check-config`.
pub(crate) fn describe(list: &RevocationList, now_s: i64) -> Vec<String> {
    list.lists()
        .iter()
        .map(|l| {
            let next = match l.next_update {
                Some(n) if l.is_stale(now_s) => format!(
                    "next update was due at {}: fetch a fresh list from the CA (this one is still enforced)",
                    crate::expiry::rfc3339(n)
                ),
                Some(n) => format!("next update by {}", crate::expiry::rfc3339(n)),
                None => "no next update given".to_owned(),
            };
            format!(
                "revocation list {} (area {}): {} revoked; {next}",
                l.path.display(),
                l.area,
                l.revoked
            )
        })
        .collect()
}

/// The revocation lists in force, the files they were read from, and
/// whether the last attempt to re-read changed files failed (the lists in
/// force are then older than the files). The file watcher and
/// [`Gateway::reload`](crate::Gateway::reload) both put lists in force
/// through it, one at a time.
#[derive(Debug)]
pub(crate) struct InForce {
    /// The files, and what they looked like before the lists in force were
    /// read from them: the watcher reads them again when they look
    /// otherwise, whoever put the lists in force.
    sources: Mutex<(Sources, Stamp)>,
    revocations: Revocations,
    failed: AtomicBool,
}

impl InForce {
    /// `read`, from `sources`, in force.
    pub(crate) fn new(sources: Sources, read: Read) -> InForce {
        InForce {
            sources: Mutex::new((sources, read.stamp)),
            revocations: Revocations::new(read.list),
            failed: AtomicBool::new(false),
        }
    }

    /// What the TLS verifiers and the request path check.
    pub(crate) fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// As the metrics show it.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, (Sources, Stamp)> {
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts `read`, from `sources` (which a reload may name anew), in force.
    pub(crate) fn put(&self, sources: Sources, read: Read) {
        let mut current = self.sources();
        *current = (sources, read.stamp);
        self.revocations.replace(read.list);
        self.failed.store(false, Ordering::Relaxed);
    }

    /// Puts `read` in force if it was read from the files in force now: a
    /// reload that named other files meanwhile wins over the watcher's
    /// read. (A read older than one put in force meanwhile is put too; its
    /// stamp then differs from the files, and the next look reads them
    /// again.)
    fn put_if_current(&self, from: &Sources, read: Read) -> bool {
        let mut current = self.sources();
        if current.0 != *from {
            return false;
        }
        current.1 = read.stamp;
        self.revocations.replace(read.list);
        self.failed.store(false, Ordering::Relaxed);
        true
    }
}

/// Re-reads the lists whenever their files change (or a reload names other
/// files), until `stop`.
pub(crate) async fn watch(
    lists: Arc<InForce>,
    every: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let current = || lists.sources().clone();
    // The files as they looked when they last could not be used: not read
    // again until they change.
    let mut unusable: Option<Stamp> = None;
    // Stale at start was reported with the lists read.
    let mut stale = Default::default();
    newly_stale(
        &lists.revocations.current(),
        crate::expiry::now_s(),
        &mut stale,
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::stopped(&mut stop) => return,
        }
        for path in newly_stale(
            &lists.revocations.current(),
            crate::expiry::now_s(),
            &mut stale,
        ) {
            tracing::warn!(
                file = %path.display(),
                "revocation list has gone past its nextUpdate: it is still enforced, but newer revocations may be missing; fetch a fresh one from the CA"
            );
        }
        let (s, in_force) = current();
        let now = stamp_off_thread(&s).await;
        if now == in_force || unusable.as_ref() == Some(&now) {
            continue;
        }
        let read = s.clone();
        let loaded = tokio::task::spawn_blocking(move || read.read()).await;
        match loaded {
            Ok(Ok(read)) => {
                unusable = None;
                report(&read.list, crate::expiry::now_s());
                let revoked = read.list.revoked();
                if lists.put_if_current(&s, read) {
                    tracing::info!(revoked, "revocation lists changed: re-read and in force");
                }
            }
            Ok(Err(e)) => {
                unusable = Some(now);
                lists.failed.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "revocation lists changed but cannot be used: the previous lists stay in force");
            }
            Err(e) => {
                unusable = Some(now);
                lists.failed.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "re-reading the revocation lists failed: the previous lists stay in force");
            }
        }
    }
}

/// Each file and its size and modification time.
pub(crate) type Stamp = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

async fn stamp_off_thread(sources: &Sources) -> Stamp {
    let s = sources.clone();
    tokio::task::spawn_blocking(move || s.stamp())
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
