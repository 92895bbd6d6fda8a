//! SPIFFE identities in certificates.

use std::fmt;

use proto::{AreaId, Sender, UserId};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CertError;

/// Who a certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An area's gateway: `spiffe://<area>/gateway`.
    Gateway(AreaId),
    /// A person in an area's directory: `spiffe://<area>/user/<id>`.
    User(AreaId, UserId),
}

impl Identity {
    /// The area (trust domain) of this identity.
    pub fn area(&self) -> &AreaId {
        match self {
            Identity::Gateway(a) | Identity::User(a, _) => a,
        }
    }

    /// The SPIFFE URI for this identity.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// Parses `spiffe://<area>/gateway` or `spiffe://<area>/user/<id>`.
    pub fn parse_uri(uri: &str) -> Result<Identity, CertError> {
        let bad = |why: &str| CertError::BadIdentity(format!("{why}: {:?}", short(uri)));
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("not a spiffe:// URI"))?;
        let (area, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no path after the trust domain"))?;
        let area = AreaId::new(area).map_err(|e| CertError::BadIdentity(e.to_string()))?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["gateway"] => Ok(Identity::Gateway(area)),
            ["user", id] => {
                let id = UserId::new(*id).map_err(|e| CertError::BadIdentity(e.to_string()))?;
                Ok(Identity::User(area, id))
            }
            _ => Err(bad("path is neither /gateway nor /user/<id>")),
        }
    }
}

fn short(s: &str) -> String {
    s.chars().take(100).collect()
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Gateway(a) => write!(f, "spiffe://{a}/gateway"),
            Identity::User(a, u) => write!(f, "spiffe://{a}/user/{u}"),
        }
    }
}

/// Reads the single SPIFFE identity from a DER certificate's URI SANs.
/// Does not verify the certificate: that is the TLS verifier's job.
pub fn identity_of_cert(der: &[u8]) -> Result<Identity, CertError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Malformed(e.to_string()))?
        .ok_or_else(|| CertError::BadIdentity("no subject alternative name".into()))?;
    let mut found = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if uri.starts_with("spiffe://") {
                if found.is_some() {
                    return Err(CertError::BadIdentity("more than one spiffe:// URI".into()));
                }
                found = Some(Identity::parse_uri(uri)?);
            }
        }
    }
    found.ok_or_else(|| {
        CertError::BadIdentity("no spiffe:// URI in subject alternative names".into())
    })
}

/// When a certificate stops being valid (its `notAfter`), in seconds since
/// the Unix epoch.
pub fn not_after(der: &[u8]) -> Result<i64, CertError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The end-entity certificate the client of a server-side connection presented.
pub(crate) fn peer_leaf(
    conn: &rustls::ServerConnection,
) -> Result<&rustls::pki_types::CertificateDer<'static>, CertError> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .ok_or(CertError::NoPeerCertificate)
}

/// A TLS peer whose certificate chain was verified against the CA pinned to
/// the area it claims. Only this crate can make one (see [`crate::server_config`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VerifiedPeer {
    identity: Identity,
}

impl VerifiedPeer {
    pub(crate) fn new(identity: Identity) -> Self {
        VerifiedPeer { identity }
    }

    /// Identifies the peer of a server-side connection that completed its
    /// handshake under a [`crate::server_config`] (which verified the chain and
    /// the area pinning).
    pub fn from_server_connection(
        conn: &rustls::ServerConnection,
    ) -> Result<VerifiedPeer, CertError> {
        Ok(VerifiedPeer::new(identity_of_cert(peer_leaf(conn)?)?))
    }

    /// Who the peer is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The peer's area.
    pub fn area(&self) -> &AreaId {
        self.identity.area()
    }

    /// The peer as a message sender, if it is a user.
    pub fn as_sender(&self) -> Option<Sender> {
        match &self.identity {
            Identity::User(area, user) => Some(Sender {
                area: area.clone(),
                user: user.clone(),
            }),
            Identity::Gateway(_) => None,
        }
    }
}

impl fmt::Display for VerifiedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.identity.fmt(f)
    }
}
