//! Certificate revocation: the CRLs an area's CA publishes, checked during
//! every handshake and again on every request of a connection opened before
//! the lists last changed.
//!
//! A certificate names a person or a gateway, not a key: a worker whose
//! laptop is stolen gets a new certificate for the same identity, so the old
//! one must stop working by itself, before it expires. Each CRL is verified
//! when it is read: it must be signed by one of the CAs configured for its
//! area, so a file that is not that CA's list is refused, naming it, rather
//! than believed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use proto::AreaId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::{identity_of_cert, CertError};

/// One CRL file as read: where it came from and what it says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// The area whose CA signed it.
    pub area: AreaId,
    /// The file.
    pub path: PathBuf,
    /// When the CA issued it (Unix seconds).
    pub this_update: i64,
    /// When the CA promises a newer one (Unix seconds), if it says.
    pub next_update: Option<i64>,
    /// How many certificates it revokes.
    pub revoked: usize,
}

impl CrlInfo {
    /// Whether the CA has promised a newer list by `now_s` (Unix seconds): a
    /// stale list still revokes what it names, but may miss newer revocations.
    pub fn is_stale(&self, now_s: i64) -> bool {
        self.next_update.is_some_and(|n| n <= now_s)
    }
}

/// The certificates revoked by the CRLs of every configured area, each
/// checked against the CA that signed it.
#[derive(Debug, Default)]
pub struct RevocationList {
    /// Area → issuer name (DER) → serial numbers (leading zeros trimmed).
    revoked: HashMap<AreaId, HashMap<Vec<u8>, HashSet<Vec<u8>>>>,
    lists: Vec<CrlInfo>,
}

/// A serial number's significant bytes: DER writes a leading zero before a
/// high bit, and issuers differ in whether they count it.
fn significant(serial: &[u8]) -> &[u8] {
    let zeros = serial.iter().take_while(|b| **b == 0).count();
    &serial[zeros.min(serial.len().saturating_sub(1))..]
}

fn crl_error(path: &Path, reason: impl Into<String>) -> CertError {
    CertError::Crl {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The CRLs in a file: PEM (`-----BEGIN X509 CRL-----`, one or more) or a
/// single DER list.
fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let bytes = std::fs::read(path).map_err(|source| CertError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if bytes.starts_with(b"-----BEGIN") {
        let crls: Result<Vec<_>, _> =
            CertificateRevocationListDer::pem_slice_iter(&bytes).collect();
        match crls {
            Ok(c) if !c.is_empty() => Ok(c),
            Ok(_) => Err(crl_error(path, "no X509 CRL in this PEM file")),
            Err(e) => Err(crl_error(path, format!("not valid PEM: {e}"))),
        }
    } else {
        Ok(vec![CertificateRevocationListDer::from(bytes)])
    }
}

impl RevocationList {
    /// Reads every CRL file of every area, verifying each against the CAs of
    /// its area. Any file that cannot be read, parsed or verified fails the
    /// whole load, naming it: a list half read would let a revoked
    /// certificate in.
    pub fn load<'a>(
        sources: impl IntoIterator<Item = (&'a AreaId, &'a [PathBuf], &'a [CertificateDer<'static>])>,
    ) -> Result<RevocationList, CertError> {
        let mut list = RevocationList::default();
        for (area, paths, cas) in sources {
            for path in paths {
                for der in read_crls(path)? {
                    list.add(area, path, &der, cas)?;
                }
            }
        }
        Ok(list)
    }

    fn add(
        &mut self,
        area: &AreaId,
        path: &Path,
        der: &[u8],
        cas: &[CertificateDer<'static>],
    ) -> Result<(), CertError> {
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| crl_error(path, format!("not a valid X.509 CRL: {e}")))?;
        let issuer = crl.issuer().as_raw();
        // While an area moves to a new CA, its bundle holds the old and the
        // new one, often under the same name: the list is the area's if any
        // CA of that name signed it.
        let mut named = 0;
        let mut failure = None;
        let mut verified = false;
        for ca in cas {
            let (_, cert) = X509Certificate::from_der(ca.as_ref())
                .map_err(|e| CertError::Malformed(e.to_string()))?;
            if cert.subject().as_raw() != issuer {
                continue;
            }
            named += 1;
            match crl.verify_signature(cert.public_key()) {
                Ok(()) => {
                    verified = true;
                    break;
                }
                Err(e) => failure = Some(e),
            }
        }
        if named == 0 {
            return Err(crl_error(
                path,
                format!(
                    "issued by \"{}\", which is not a CA configured for area {area}",
                    crl.issuer()
                ),
            ));
        }
        if !verified {
            return Err(crl_error(
                path,
                format!(
                    "its signature does not verify against area {area}'s CA{}",
                    failure.map(|e| format!(": {e}")).unwrap_or_default()
                ),
            ));
        }
        let serials = self
            .revoked
            .entry(area.clone())
            .or_default()
            .entry(issuer.to_vec())
            .or_default();
        let mut count = 0;
        for entry in crl.iter_revoked_certificates() {
            serials.insert(significant(entry.raw_serial()).to_vec());
            count += 1;
        }
        self.lists.push(CrlInfo {
            area: area.clone(),
            path: path.to_owned(),
            this_update: crl.last_update().timestamp(),
            next_update: crl.next_update().map(|t| t.timestamp()),
            revoked: count,
        });
        Ok(())
    }

    /// The lists read, in order.
    pub fn lists(&self) -> &[CrlInfo] {
        &self.lists
    }

    /// How many certificates the lists revoke, in all.
    pub fn revoked(&self) -> usize {
        self.lists.iter().map(|l| l.revoked).sum()
    }

    /// Refuses `end_entity`, which claims `area`, if it is on one of that
    /// area's lists (or cannot be parsed, which a verified chain rules out).
    pub fn check(&self, area: &AreaId, end_entity: &[u8]) -> Result<(), CertError> {
        self.check_chain(area, end_entity, std::iter::empty())
    }

    /// As [`RevocationList::check`], and refuses the chain too if one of
    /// the `intermediates` sent with `end_entity` (the CAs between it and
    /// its area's CA) is revoked: an area that revokes an issuing CA it
    /// signed revokes everything that CA issued.
    pub fn check_chain<'a>(
        &self,
        area: &AreaId,
        end_entity: &[u8],
        intermediates: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), CertError> {
        let Some(by_issuer) = self.revoked.get(area) else {
            return Ok(());
        };
        let on_list = |der: &[u8]| -> Result<Option<String>, CertError> {
            let (_, cert) =
                X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
            let revoked = by_issuer
                .get(cert.issuer().as_raw())
                .is_some_and(|s| s.contains(significant(cert.raw_serial())));
            Ok(revoked.then(|| cert.raw_serial_as_string()))
        };
        if let Some(serial) = on_list(end_entity)? {
            let who = identity_of_cert(end_entity)
                .map(|i| i.to_string())
                .unwrap_or_else(|_| format!("a certificate of area {area}"));
            return Err(CertError::Revoked { who, serial });
        }
        for der in intermediates {
            if let Some(serial) = on_list(der)? {
                let who = identity_of_cert(end_entity).map_or_else(
                    |_| format!("the CA that issued a certificate of area {area}"),
                    |i| format!("the CA that issued {i}"),
                );
                return Err(CertError::Revoked { who, serial });
            }
        }
        Ok(())
    }
}

/// The revocation lists in force, shared by the TLS verifiers and the
/// request path, and replaced whole when the files change.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    inner: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    current: RwLock<Arc<RevocationList>>,
    generation: AtomicU64,
}

impl Revocations {
    /// Revocations starting from `list`.
    pub fn new(list: RevocationList) -> Revocations {
        let r = Revocations::default();
        r.replace(list);
        r
    }

    /// Puts `list` in force for every handshake and request from now on.
    pub fn replace(&self, list: RevocationList) {
        let list = Arc::new(list);
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = list;
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The lists in force.
    pub fn current(&self) -> Arc<RevocationList> {
        self.inner
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A number that changes whenever the lists are replaced: a connection
    /// checked at one generation need not be checked again until it changes.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// [`RevocationList::check_chain`] against the lists in force.
    pub fn check_chain<'a>(
        &self,
        area: &AreaId,
        end_entity: &[u8],
        intermediates: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), CertError> {
        self.current().check_chain(area, end_entity, intermediates)
    }
}

/// A generation no lists have: checked at the first request.
const NEVER: u64 = u64::MAX;

/// The certificate a server-side connection was opened with, kept so that
/// each request can be refused once it is revoked: connections live for
/// minutes (keep-alive, long-polls), a lost laptop's must not outlive the
/// revocation.
#[derive(Debug)]
pub struct ConnectionCertificate {
    area: AreaId,
    leaf: CertificateDer<'static>,
    /// The CAs the peer sent between its certificate and its area's CA.
    intermediates: Vec<CertificateDer<'static>>,
    /// Its `notAfter`, Unix seconds: a connection does not outlive it.
    not_after: i64,
    checked: AtomicU64,
}

impl ConnectionCertificate {
    /// The certificate of a connection that completed its handshake under a
    /// [`crate::server_config`]. It is checked again at the connection's
    /// first request, whatever the handshake did: that costs one parse per
    /// connection, and holds even for a handshake that verified nothing
    /// (a resumed session, which the server configuration does not offer).
    pub fn after_handshake(
        conn: &rustls::ServerConnection,
    ) -> Result<ConnectionCertificate, CertError> {
        let chain = conn
            .peer_certificates()
            .ok_or(CertError::NoPeerCertificate)?;
        Self::of_chain(chain)
    }

    /// The connection certificate `chain` (DER, its leaf first).
    fn of_chain(chain: &[CertificateDer<'_>]) -> Result<ConnectionCertificate, CertError> {
        let (leaf, intermediates) = chain.split_first().ok_or(CertError::NoPeerCertificate)?;
        let identity = identity_of_cert(leaf)?;
        Ok(ConnectionCertificate {
            area: identity.area().clone(),
            leaf: leaf.clone().into_owned(),
            intermediates: intermediates
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
            not_after: crate::not_after(leaf)?,
            checked: AtomicU64::new(NEVER),
        })
    }

    /// Refuses the certificate once it is past its `notAfter` (the
    /// handshake checked it then; keep-alive connections and long-polls
    /// last longer), or if the lists changed since it was last checked and
    /// now revoke it. Cheap while they have not changed.
    pub fn check(&self, revocations: &Revocations) -> Result<(), CertError> {
        self.check_at(revocations, unix_now())
    }

    /// How long the certificate is valid from now (zero once past its
    /// `notAfter`): what a request may wait for, at most.
    pub fn valid_for(&self) -> std::time::Duration {
        let left = self.not_after.saturating_sub(unix_now());
        std::time::Duration::from_secs(left.max(0).unsigned_abs())
    }

    /// [`ConnectionCertificate::check`] at `now` (Unix seconds).
    pub fn check_at(&self, revocations: &Revocations, now: i64) -> Result<(), CertError> {
        if now > self.not_after {
            let who = identity_of_cert(self.leaf.as_ref())
                .map_or_else(|_| self.area.to_string(), |i| i.to_string());
            return Err(CertError::ExpiredSince {
                who,
                at: rfc3339(self.not_after),
            });
        }
        let now = revocations.generation();
        if self.checked.load(Ordering::Acquire) == now {
            return Ok(());
        }
        revocations.check_chain(
            &self.area,
            self.leaf.as_ref(),
            self.intermediates.iter().map(|c| c.as_ref()),
        )?;
        self.checked.store(now, Ordering::Release);
        Ok(())
    }
}

/// Now, in Unix seconds (0 before 1970, which no clock here shows).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Unix seconds as RFC 3339, for people.
fn rfc3339(secs: i64) -> String {
    let at = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_secs(secs.max(0).unsigned_abs()))
        .unwrap_or(std::time::UNIX_EPOCH);
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests;
