//! When the certificates a gateway depends on expire.
//!
//! An expired certificate takes a gateway off the federation without a
//! sound: users' clients and peers refuse the handshake, and the only trace
//! is a count of failed handshakes. So the gateway reads the `notAfter` of
//! its own certificate, its area's CA and each peer's pinned CA at start;
//! refuses to start with its own certificate expired (every caller would
//! refuse it); warns at start and once a day about any that expires within
//! [`WARN_BEFORE`] or has expired; and shows each in the metrics
//! (`gateway_certificate_not_after_seconds`, a Unix time, for an alert on
//! `… - time() < 14 * 86400`).

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use proto::AreaId;

use crate::config::Config;

/// How long before a certificate expires the gateway starts warning.
pub(crate) const WARN_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// How often the warning is repeated.
const WARN_EVERY: Duration = Duration::from_secs(86_400);

/// Which certificate an expiry belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    /// The gateway's own certificate (it presents it to users and peers).
    Gateway,
    /// The area's CA (users' certificates chain to it).
    AreaCa,
    /// A peer's pinned CA.
    PeerCa(AreaId),
}

/// One certificate's expiry.
#[derive(Debug, Clone)]
pub(crate) struct Expiry {
    /// Which one.
    pub(crate) role: Role,
    /// Its file.
    pub(crate) file: String,
    /// Its `notAfter`, in seconds since the Unix epoch (the earliest, for a
    /// file holding several CA certificates).
    pub(crate) not_after: i64,
}

impl Role {
    /// The metric label value.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::AreaCa => "area_ca",
            Role::PeerCa(_) => "peer_ca",
        }
    }
}

impl Expiry {
    /// As the metrics text shows it.
    pub(crate) fn reading(&self) -> crate::metrics::CertificateReading {
        crate::metrics::CertificateReading {
            certificate: self.role.label(),
            peer: match &self.role {
                Role::PeerCa(a) => Some(a.clone()),
                _ => None,
            },
            not_after: self.not_after,
        }
    }
}

/// The earliest `notAfter` of the certificates of `file`, already read as
/// `chain`; for the gateway's own chain, its leaf's.
pub(crate) fn of(
    role: Role,
    file: &Path,
    chain: &[certs::rustls::pki_types::CertificateDer<'_>],
) -> Result<Expiry, certs::CertError> {
    let leaf_only = matches!(role, Role::Gateway);
    let mut earliest: Option<i64> = None;
    for der in chain.iter().take(if leaf_only { 1 } else { chain.len() }) {
        let t = certs::not_after(der)?;
        earliest = Some(earliest.map_or(t, |e| e.min(t)));
    }
    Ok(Expiry {
        role,
        file: file.display().to_string(),
        not_after: earliest.unwrap_or(i64::MIN),
    })
}

fn read(role: Role, file: &Path) -> Result<Expiry, certs::CertError> {
    of(role, file, &certs::load_certs(file)?)
}

/// Reads the expiry of the gateway's certificate, its area's CA and each
/// peer's CA, and refuses an expired gateway certificate.
pub(crate) fn load(config: &Config) -> Result<Vec<Expiry>, certs::CertError> {
    let mut all = vec![
        read(Role::Gateway, &config.tls.cert)?,
        read(Role::AreaCa, &config.tls.ca)?,
    ];
    for p in &config.peers {
        all.push(read(Role::PeerCa(p.area.clone()), &p.ca)?);
    }
    refuse_expired_own(all)
}

/// `all`, unless the gateway's own certificate among them has expired:
/// every user and peer would refuse it.
pub(crate) fn refuse_expired_own(all: Vec<Expiry>) -> Result<Vec<Expiry>, certs::CertError> {
    let now = now_s();
    if let Some(own) = all
        .iter()
        .find(|e| e.role == Role::Gateway && e.not_after <= now)
    {
        return Err(certs::CertError::Expired {
            what: format!("the gateway certificate {}", own.file),
            at: rfc3339(own.not_after),
        });
    }
    Ok(all)
}

/// One line per certificate, for people: which, its file, when it
/// expires and how long that is from `now`.
pub(crate) fn report(all: &[Expiry], now: i64) -> Vec<String> {
    let soon = now.saturating_add(WARN_BEFORE.as_secs() as i64);
    all.iter()
        .map(|e| {
            let which = match &e.role {
                Role::Gateway => "gateway certificate".to_owned(),
                Role::AreaCa => "area CA".to_owned(),
                Role::PeerCa(a) => format!("peer {a}'s CA"),
            };
            let days = (e.not_after - now).div_euclid(86_400);
            let when = if e.not_after <= now {
                format!("EXPIRED at {}", rfc3339(e.not_after))
            } else if e.not_after <= soon {
                format!(
                    "expires at {} (in {days} days: renew it soon)",
                    rfc3339(e.not_after)
                )
            } else {
                format!("expires at {} (in {days} days)", rfc3339(e.not_after))
            };
            format!("{which} {}: {when}", e.file)
        })
        .collect()
}

/// Logs a warning for each certificate that has expired or expires within
/// [`WARN_BEFORE`] of `now` (seconds since the epoch); returns how many.
pub(crate) fn warn_soon(all: &[Expiry], now: i64) -> usize {
    let soon = now.saturating_add(WARN_BEFORE.as_secs() as i64);
    let mut n = 0;
    for e in all.iter().filter(|e| e.not_after <= soon) {
        n += 1;
        let peer = match &e.role {
            Role::PeerCa(a) => a.as_str(),
            _ => "",
        };
        let days_left = (e.not_after - now).div_euclid(86_400);
        if e.not_after <= now {
            tracing::error!(certificate = e.role.label(), peer, file = %e.file, expired = %rfc3339(e.not_after), "a certificate has expired: renew it, then reload the gateway (SIGHUP)");
        } else {
            tracing::warn!(certificate = e.role.label(), peer, file = %e.file, expires = %rfc3339(e.not_after), days_left, "a certificate expires soon: renew it, then reload the gateway (SIGHUP)");
        }
    }
    n
}

/// Warns at once and then once a day until `stop`, about the certificates
/// in `all` at that moment (a reload replaces them).
pub(crate) async fn watch(
    all: std::sync::Arc<std::sync::RwLock<Vec<Expiry>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let now: Vec<Expiry> = all
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        warn_soon(&now, now_s());
        tokio::select! {
            _ = tokio::time::sleep(WARN_EVERY) => {}
            _ = crate::stopped(&mut stop) => break,
        }
    }
}

/// Seconds since the Unix epoch, from the gateway's clock.
pub(crate) fn now_s() -> i64 {
    i64::try_from(crate::now_ms() / 1000).unwrap_or(i64::MAX)
}

/// A Unix time as RFC 3339, to the second.
pub(crate) fn rfc3339(t: i64) -> String {
    let at = u64::try_from(t).map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(s));
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests;
