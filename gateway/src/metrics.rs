//! Prometheus metrics: a handful of counters, rendered in the text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Adds one, until the returned guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Held(self)
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One unit of a [`Gauge`], given back when dropped (also when the future
/// holding it is dropped, as when a client goes away).
#[derive(Debug)]
pub struct Held<'a>(&'a Gauge);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The gateway's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages accepted from users.
    pub submitted: Counter,
    /// Resubmissions answered from the idempotency record.
    pub duplicates: Counter,
    /// Federation items received from peers.
    pub federation_items_received: Counter,
    /// Federation items sent to peers and accepted by them.
    pub federation_items_sent: Counter,
    /// Federation batches a peer answered.
    pub federation_batches_sent: Counter,
    /// Federation batches sent while an earlier one to the same peer was
    /// still on the wire.
    pub federation_batches_pipelined: Counter,
    /// Failed federation requests (each followed by a retry).
    pub federation_failures: Counter,
    /// Messages returned to their senders as undeliverable.
    pub undeliverable: Counter,
    /// Requests refused by a rate limit.
    pub rate_limited: Counter,
    /// TLS handshakes that failed (bad, missing or untrusted certificates).
    pub tls_failures: Counter,
    /// Inbox listings run: one per inbox request, and one more each time a
    /// message arrives for a mailbox whose long-poll is waiting.
    pub inbox_listings: Counter,
    /// Inbox messages whose ciphertext was erased after retention.
    pub messages_erased: Counter,
    /// Inbox long-polls waiting for a message now.
    pub inbox_waiting: Gauge,
    /// Connections open now (past their TCP accept; handshakes included).
    pub connections_open: Gauge,
    /// Times every connection slot (`limits.max_connections`) was taken,
    /// so that new connections waited.
    pub connections_full: Counter,
    /// Connections closed at once because their address had too many TLS
    /// handshakes under way.
    pub handshakes_refused: Counter,
    /// Connections closed because no request was in progress on them for
    /// `limits.idle_timeout`.
    pub connections_idle_closed: Counter,
    /// Requests answered `408 request_timeout` because their body did not
    /// arrive within `limits.body_timeout`.
    pub bodies_timed_out: Counter,
    /// New messages (users' submissions and peers' batches) refused while
    /// the disk was short of space.
    pub refused_disk_low: Counter,
    /// Requests refused because the connection's certificate was revoked
    /// after the connection was opened (handshakes refused for a revoked
    /// certificate count as TLS failures).
    pub refused_revoked: Counter,
    /// Requests refused because the connection's certificate expired after
    /// the connection was opened.
    pub refused_expired: Counter,
}

/// When one certificate the gateway depends on expires, for the metrics text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateReading {
    /// `gateway` (its own), `area_ca` or `peer_ca`.
    pub certificate: &'static str,
    /// The peer, for a peer's CA.
    pub peer: Option<proto::AreaId>,
    /// Its `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// The data directory's disk, as last read, for the metrics text.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskReading {
    /// Free bytes an unprivileged writer may use (`None` before the first reading).
    pub free_bytes: Option<u64>,
    /// The reserve (`limits.min_free_disk_mib`), in bytes.
    pub reserve_bytes: u64,
    /// Whether new messages are refused now.
    pub low: bool,
}

impl Metrics {
    /// Renders the counters, plus the given peer queues, whether the
    /// store takes work, the disk reading and the certificates' expiry, in
    /// the Prometheus text format.
    pub fn render(
        &self,
        queues: &[crate::store::PeerQueue],
        store_ok: bool,
        disk: DiskReading,
        certificates: &[CertificateReading],
    ) -> String {
        let mut out = String::new();
        let counters = [
            (
                "gateway_messages_submitted_total",
                "Messages accepted from users.",
                &self.submitted,
            ),
            (
                "gateway_duplicate_submissions_total",
                "Resubmissions answered from the idempotency record.",
                &self.duplicates,
            ),
            (
                "gateway_federation_items_received_total",
                "Federation items received from peers.",
                &self.federation_items_received,
            ),
            (
                "gateway_federation_items_sent_total",
                "Federation items accepted by peers.",
                &self.federation_items_sent,
            ),
            (
                "gateway_federation_batches_sent_total",
                "Federation batches answered by peers.",
                &self.federation_batches_sent,
            ),
            (
                "gateway_federation_batches_pipelined_total",
                "Federation batches sent while an earlier batch to the same peer was on the wire.",
                &self.federation_batches_pipelined,
            ),
            (
                "gateway_federation_failures_total",
                "Failed federation requests.",
                &self.federation_failures,
            ),
            (
                "gateway_undeliverable_total",
                "Messages returned to senders as undeliverable.",
                &self.undeliverable,
            ),
            (
                "gateway_rate_limited_total",
                "Requests refused by a rate limit.",
                &self.rate_limited,
            ),
            (
                "gateway_tls_failures_total",
                "Failed TLS handshakes.",
                &self.tls_failures,
            ),
            (
                "gateway_inbox_listings_total",
                "Inbox listings run (a waiting long-poll lists again only when a message for it arrives).",
                &self.inbox_listings,
            ),
            (
                "gateway_messages_erased_total",
                "Acknowledged inbox messages whose ciphertext was erased after retention.keep_acknowledged.",
                &self.messages_erased,
            ),
            (
                "gateway_refused_disk_low_total",
                "New messages (submissions, peers' batches) refused while the disk was below limits.min_free_disk_mib.",
                &self.refused_disk_low,
            ),
            (
                "gateway_refused_revoked_total",
                "Requests refused on connections whose certificate was revoked after they were opened.",
                &self.refused_revoked,
            ),
            (
                "gateway_connections_full_total",
                "Times all limits.max_connections were open, so that new connections waited.",
                &self.connections_full,
            ),
            (
                "gateway_handshakes_refused_total",
                "Connections closed at once because their address had 32 TLS handshakes under way.",
                &self.handshakes_refused,
            ),
            (
                "gateway_connections_idle_closed_total",
                "Connections closed after limits.idle_timeout with no request in progress.",
                &self.connections_idle_closed,
            ),
            (
                "gateway_request_bodies_timed_out_total",
                "Requests answered 408 because their body took longer than limits.body_timeout.",
                &self.bodies_timed_out,
            ),
            (
                "gateway_refused_expired_total",
                "Requests refused on connections whose certificate expired after they were opened.",
                &self.refused_expired,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP gateway_inbox_long_polls_waiting Inbox long-polls waiting for a message now (one whose client went away counts until its wait ends).\n# TYPE gateway_inbox_long_polls_waiting gauge\ngateway_inbox_long_polls_waiting {}",
            self.inbox_waiting.get()
        );
        let _ = writeln!(
            out,
            "# HELP gateway_connections_open Connections open now, users' and peers' (handshakes included).\n# TYPE gateway_connections_open gauge\ngateway_connections_open {}",
            self.connections_open.get()
        );
        let _ = writeln!(
            out,
            "# HELP gateway_store_ok 1 while the store takes work; 0 after a failed fsync of its log (restart the gateway once the disk is sound).\n# TYPE gateway_store_ok gauge\ngateway_store_ok {}",
            u8::from(store_ok)
        );
        let _ = writeln!(
            out,
            "# HELP gateway_disk_low 1 while the data directory's disk is below limits.min_free_disk_mib and new messages are refused.\n# TYPE gateway_disk_low gauge\ngateway_disk_low {}",
            u8::from(disk.low)
        );
        if let Some(free) = disk.free_bytes {
            let _ = writeln!(
                out,
                "# HELP gateway_disk_free_bytes Free bytes on the data directory's disk, read once a second.\n# TYPE gateway_disk_free_bytes gauge\ngateway_disk_free_bytes {free}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP gateway_disk_reserve_bytes limits.min_free_disk_mib, in bytes.\n# TYPE gateway_disk_reserve_bytes gauge\ngateway_disk_reserve_bytes {}",
            disk.reserve_bytes
        );
        let _ = writeln!(out, "# HELP gateway_certificate_not_after_seconds When a certificate the gateway depends on expires (Unix time): its own, its area's CA, each peer's CA.\n# TYPE gateway_certificate_not_after_seconds gauge");
        for c in certificates {
            let peer = c
                .peer
                .as_ref()
                .map(|p| format!(",peer=\"{p}\""))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "gateway_certificate_not_after_seconds{{certificate=\"{}\"{peer}}} {}",
                c.certificate, c.not_after
            );
        }
        let _ = writeln!(out, "# HELP gateway_peer_queue_depth Items queued for each peer.\n# TYPE gateway_peer_queue_depth gauge");
        for q in queues {
            let _ = writeln!(
                out,
                "gateway_peer_queue_depth{{peer=\"{}\"}} {}",
                q.peer, q.items
            );
        }
        let _ = writeln!(out, "# HELP gateway_peer_oldest_queued_timestamp_seconds When the oldest item queued for each peer was queued (Unix time; a message: when it was accepted). Alert on time() minus it: messages waiting for an unreachable peer.\n# TYPE gateway_peer_oldest_queued_timestamp_seconds gauge");
        for q in queues {
            if let Some(ms) = q.oldest_queued_ms {
                let _ = writeln!(
                    out,
                    "gateway_peer_oldest_queued_timestamp_seconds{{peer=\"{}\"}} {}.{:03}",
                    q.peer,
                    ms / 1000,
                    ms % 1000
                );
            }
        }
        out
    }
}

/// The revocation lists in force, for the metrics text: when each expects
/// a newer list from its CA (alert on `time() >` it: revocations made since
/// may be missing), how many certificates it revokes, and whether the last
/// re-read of changed files failed (the lists in force are then older than
/// the files).
pub fn revocation_text(lists: &[certs::CrlInfo], reload_failed: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP gateway_crl_next_update_seconds When each revocation list's CA promises a newer one (Unix time).\n# TYPE gateway_crl_next_update_seconds gauge");
    for l in lists {
        if let Some(next) = l.next_update {
            let _ = writeln!(
                out,
                "gateway_crl_next_update_seconds{{area=\"{}\",file=\"{}\"}} {next}",
                l.area,
                label(&l.path.display().to_string())
            );
        }
    }
    let _ = writeln!(out, "# HELP gateway_crl_revoked_certificates Certificates each revocation list revokes.\n# TYPE gateway_crl_revoked_certificates gauge");
    for l in lists {
        let _ = writeln!(
            out,
            "gateway_crl_revoked_certificates{{area=\"{}\",file=\"{}\"}} {}",
            l.area,
            label(&l.path.display().to_string()),
            l.revoked
        );
    }
    let _ = writeln!(out, "# HELP gateway_crl_reload_failed 1 if revocation list files changed and could not be used: the previous lists stay in force.\n# TYPE gateway_crl_reload_failed gauge\ngateway_crl_reload_failed {}", u8::from(reload_failed));
    out
}

/// Whether the last reload of the configuration file (SIGHUP) failed, for
/// the metrics text: the gateway then runs on the configuration it had; and
/// whether the directory's teams could not be recorded in the store at the
/// last start or reload.
pub fn reload_text(failed: bool, teams_unrecorded: bool) -> String {
    format!("# HELP gateway_config_reload_failed 1 if the last reload of the configuration file (SIGHUP) could not be used: the gateway runs on what it had; see the log.\n# TYPE gateway_config_reload_failed gauge\ngateway_config_reload_failed {}\n# HELP gateway_teams_unrecorded 1 if the directory's teams could not be recorded in the store at the last start or reload: members new since then see none of their teams' encrypted messages; see the log, make room, reload.\n# TYPE gateway_teams_unrecorded gauge\ngateway_teams_unrecorded {}\n", u8::from(failed), u8::from(teams_unrecorded))
}

/// A Prometheus label value: backslashes, quotes and line ends escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests;
