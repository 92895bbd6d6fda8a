//! Identity from X.509 certificates, and the only place rustls configurations
//! are built.
//!
//! Every principal in the federation is named by a SPIFFE-style URI in its
//! certificate's subject alternative names:
//! * a gateway is `spiffe://<area>/gateway`;
//! * a person is `spiffe://<area>/user/<user-id>`.
//!
//! Each area is a trust domain with its own CA. Promises:
//! * a [`VerifiedPeer`] exists only for a TLS peer whose chain verified against
//!   the CA pinned to the area its certificate claims: a certificate issued by
//!   area B's CA that claims area C is refused during the handshake;
//! * peer gateways may connect as `spiffe://<peer>/gateway` only; users may
//!   connect only to their own area's gateway;
//! * a certificate on its area's revocation list ([`Revocations`], read from
//!   the CA's CRLs and verified against it) is refused in the handshake, and
//!   a connection opened before the list named it is refused at its next
//!   request ([`ConnectionCertificate`]);
//! * nothing here panics on a certificate, key or file from outside.
//!
//! [`mint`] creates CAs and certificates with rcgen for the development
//! federation and tests.

mod config;
mod error;
mod identity;
pub mod mint;
mod pem;
mod revocation;

pub use config::{
    gateway_client_config, server_config, user_client_config, user_client_config_checking,
    verify_own_certificate, PeerTrust, ServerNotAfter, ServerTrust,
};
pub use error::CertError;
pub use identity::{identity_of_cert, not_after, Identity, VerifiedPeer};
pub use pem::{load_certs, load_key, parse_certs, parse_key, Credentials};
pub use revocation::{ConnectionCertificate, CrlInfo, RevocationList, Revocations};
pub use rustls;

/// Constructors that skip certificate verification, for tests only.
#[cfg(feature = "test-util")]
pub mod danger {
    use crate::{Identity, VerifiedPeer};

    /// A [`VerifiedPeer`] for `identity` without any certificate. Tests only.
    pub fn assume_verified(identity: Identity) -> VerifiedPeer {
        VerifiedPeer::new(identity)
    }

    /// A client configuration that trusts `server_cas` but presents no
    /// client certificate. Tests of refusal only.
    pub fn client_config_without_certificate(
        server_cas: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<rustls::ClientConfig, crate::CertError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in server_cas {
            roots
                .add(ca.clone())
                .map_err(|e| crate::CertError::Verifier(e.to_string()))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}
