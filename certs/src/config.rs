//! rustls configurations: the only place in the project where they are built.

use std::collections::HashMap;
use std::sync::Arc;

use proto::AreaId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::{identity_of_cert, CertError, Credentials, Identity, Revocations};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(cas: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, CertError> {
    let mut store = RootCertStore::empty();
    for ca in cas {
        store
            .add(ca.clone())
            .map_err(|e| CertError::Verifier(e.to_string()))?;
    }
    Ok(Arc::new(store))
}

/// The CA certificates a gateway trusts, each pinned to one area.
#[derive(Debug, Clone)]
pub struct ServerTrust {
    /// This gateway's own area: its users and itself.
    pub own_area: AreaId,
    /// The own area's CA certificate(s).
    pub own_cas: Vec<CertificateDer<'static>>,
    /// Federation peers: each peer's CA(s), accepted only for `spiffe://<peer>/gateway`.
    pub peers: Vec<PeerTrust>,
    /// Certificates revoked by these CAs: refused even though they chain.
    pub revocations: Revocations,
}

/// One federation peer's trust anchor.
#[derive(Debug, Clone)]
pub struct PeerTrust {
    /// The peer's area.
    pub area: AreaId,
    /// The peer's CA certificate(s).
    pub cas: Vec<CertificateDer<'static>>,
}

/// Accepts a client certificate only if it chains to the CA of the area its
/// SPIFFE identity claims, and only users of the gateway's own area or the
/// gateways of configured peers.
#[derive(Debug)]
struct AreaPinnedClientVerifier {
    own_area: AreaId,
    by_area: HashMap<AreaId, Arc<dyn ClientCertVerifier>>,
    hints: Vec<DistinguishedName>,
    any: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
}

fn refuse(why: String) -> rustls::Error {
    tracing::warn!(reason = %why, "refused client certificate");
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Refuses a chain that verified if its end entity, or a CA sent with it,
/// is revoked, with the alert that tells the other side so
/// (`certificate_revoked`).
fn not_revoked(
    revocations: &Revocations,
    area: &AreaId,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    let cas = intermediates.iter().map(|c| c.as_ref());
    revocations
        .check_chain(area, end_entity.as_ref(), cas)
        .map_err(|e| {
            tracing::warn!(reason = %e, "refused a revoked certificate");
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        })
}

impl ClientCertVerifier for AreaPinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let identity = identity_of_cert(end_entity).map_err(|e| refuse(e.to_string()))?;
        let area = identity.area();
        let verifier = self
            .by_area
            .get(area)
            .ok_or_else(|| refuse(format!("area {area} is not a configured peer")))?;
        if let Identity::User(..) = identity {
            if *area != self.own_area {
                return Err(refuse(format!(
                    "{identity}: users of other areas connect to their own gateway"
                )));
            }
        }
        let verified = verifier
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                tracing::warn!(%identity, error = %e, "client certificate did not verify against its area's CA");
            })?;
        not_revoked(&self.revocations, area, end_entity, intermediates)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.any.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.any.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.any.supported_verify_schemes()
    }
}

/// A gateway's server configuration: its own certificate, and mandatory client
/// certificates verified per area (see the crate docs).
pub fn server_config(
    own: &Credentials,
    trust: &ServerTrust,
) -> Result<Arc<ServerConfig>, CertError> {
    let provider = provider();
    let mut by_area: HashMap<AreaId, Arc<dyn ClientCertVerifier>> = HashMap::new();
    let mut hints = Vec::new();
    let areas = std::iter::once((&trust.own_area, &trust.own_cas))
        .chain(trust.peers.iter().map(|p| (&p.area, &p.cas)));
    for (area, cas) in areas {
        let store = roots(cas)?;
        hints.extend(store.subjects());
        let v = WebPkiClientVerifier::builder_with_provider(store, provider.clone())
            .build()
            .map_err(|e| CertError::Verifier(format!("area {area}: {e}")))?;
        if by_area.insert(area.clone(), v).is_some() {
            return Err(CertError::Verifier(format!(
                "area {area} is configured twice"
            )));
        }
    }
    let any = by_area
        .get(&trust.own_area)
        .cloned()
        .ok_or_else(|| CertError::Verifier("own area has no CA".into()))?;
    let verifier = AreaPinnedClientVerifier {
        own_area: trust.own_area.clone(),
        by_area,
        hints,
        any,
        revocations: trust.revocations.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(own.chain.clone(), own.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips the client
    // certificate's verification, so a certificate revoked or expired since
    // it was first seen would get in. Every connection is a full handshake
    // (clients keep their connections open, so that is rare).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Verifies a gateway's server certificate against one area's CA (with the
/// usual host name check) and requires the identity `spiffe://<area>/gateway`.
#[derive(Debug)]
struct PinnedGatewayVerifier {
    area: AreaId,
    inner: Arc<WebPkiServerVerifier>,
    revocations: Option<Revocations>,
    accepted: Option<ServerNotAfter>,
}

/// The earliest `notAfter` among the server certificates a client
/// configuration has accepted. A pooled connection was verified when it
/// was opened, so a client that keeps connections must let them go once
/// that time has passed (see [`ServerNotAfter::passed`]) rather than carry
/// requests to a server whose certificate has expired.
#[derive(Debug, Clone)]
pub struct ServerNotAfter(Arc<std::sync::atomic::AtomicI64>);

impl Default for ServerNotAfter {
    fn default() -> Self {
        ServerNotAfter(Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX)))
    }
}

impl ServerNotAfter {
    /// The earliest `notAfter` accepted (Unix seconds), if any.
    pub fn earliest(&self) -> Option<i64> {
        let t = self.0.load(std::sync::atomic::Ordering::SeqCst);
        (t != i64::MAX).then_some(t)
    }

    /// Whether a certificate accepted so far is past its `notAfter` at
    /// `now_s` (Unix seconds).
    pub fn passed(&self, now_s: i64) -> bool {
        self.earliest().is_some_and(|t| now_s > t)
    }

    fn saw(&self, not_after: i64) {
        self.0
            .fetch_min(not_after, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ServerCertVerifier for PinnedGatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match identity_of_cert(end_entity) {
            Ok(Identity::Gateway(area)) if area == self.area => {
                if let Some(r) = &self.revocations {
                    not_revoked(r, &area, end_entity, intermediates)?;
                }
                if let Some(accepted) = &self.accepted {
                    accepted.saw(crate::not_after(end_entity).map_err(|e| refuse(e.to_string()))?);
                }
                Ok(verified)
            }
            Ok(other) => Err(refuse(format!(
                "server is {other}, expected spiffe://{}/gateway",
                self.area
            ))),
            Err(e) => Err(refuse(e.to_string())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn client_config(
    own: &Credentials,
    server_area: &AreaId,
    server_cas: &[CertificateDer<'static>],
    revocations: Option<Revocations>,
    accepted: Option<ServerNotAfter>,
) -> Result<ClientConfig, CertError> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(roots(server_cas)?, provider.clone())
        .build()
        .map_err(|e| CertError::Verifier(e.to_string()))?;
    let verifier = PinnedGatewayVerifier {
        area: server_area.clone(),
        inner,
        revocations,
        accepted,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(own.chain.clone(), own.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Nor does a client resume: a resumed session would skip the server
    // certificate's verification (and the revocation lists) too, with a
    // server that still offers resumption.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// A user's client configuration for their home gateway: presents the user's
/// certificate and accepts only `spiffe://<home>/gateway` under the home CA.
pub fn user_client_config(
    own: &Credentials,
    home: &AreaId,
    home_cas: &[CertificateDer<'static>],
) -> Result<ClientConfig, CertError> {
    client_config(own, home, home_cas, None, None)
}

/// [`user_client_config`] that also refuses the gateway's certificate if
/// `revocations` (the home area's CA's lists, as the client has them)
/// revoke it: a gateway whose key was stolen is not trusted once its
/// certificate is revoked.
pub fn user_client_config_checking(
    own: &Credentials,
    home: &AreaId,
    home_cas: &[CertificateDer<'static>],
    revocations: &Revocations,
) -> Result<ClientConfig, CertError> {
    client_config(own, home, home_cas, Some(revocations.clone()), None)
}

/// A gateway's client configuration for one federation peer: presents the
/// gateway's certificate and accepts only `spiffe://<peer>/gateway` under the
/// peer's pinned CA, and not if `revocations` (the gateway's, kept current)
/// revoke the peer's certificate. `accepted` learns the earliest `notAfter`
/// of the peer certificates it accepts.
pub fn gateway_client_config(
    own: &Credentials,
    peer: &PeerTrust,
    revocations: &Revocations,
    accepted: &ServerNotAfter,
) -> Result<ClientConfig, CertError> {
    client_config(
        own,
        &peer.area,
        &peer.cas,
        Some(revocations.clone()),
        Some(accepted.clone()),
    )
}

/// Verifies one's own certificate chain against one's area CA, as a server
/// would, and returns the identity it proves. Used by a client that applies
/// its area's sharing policy to itself before sending.
pub fn verify_own_certificate(
    own: &Credentials,
    area_cas: &[CertificateDer<'static>],
) -> Result<crate::VerifiedPeer, CertError> {
    let leaf = own.chain.first().ok_or(CertError::NoPeerCertificate)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(area_cas)?, provider())
        .build()
        .map_err(|e| CertError::Verifier(e.to_string()))?;
    verifier.verify_client_cert(leaf, &own.chain[1..], UnixTime::now())?;
    let identity = identity_of_cert(leaf)?;
    if identity.area().as_str().is_empty() {
        return Err(CertError::BadIdentity("empty area".into()));
    }
    Ok(crate::VerifiedPeer::new(identity))
}

#[cfg(test)]
mod tests;
