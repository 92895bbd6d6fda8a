//! Minting CAs and certificates with rcgen, for the development federation and
//! tests. Production areas bring certificates from their own PKI.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{CertError, Credentials, Identity};

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct PemPair {
    /// The certificate, PEM.
    pub cert: String,
    /// The private key, PEM. Keep it secret.
    pub key: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PemPair { .. }")
    }
}

impl PemPair {
    /// As rustls credentials.
    pub fn credentials(&self) -> Result<Credentials, CertError> {
        Credentials::from_pem(&self.cert, &self.key)
    }
}

/// An area's certificate authority.
pub struct Ca {
    pem: PemPair,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca { .. }")
    }
}

/// How long a minted certificate is valid, relative to now.
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// From one hour ago for this long.
    For(Duration),
    /// Expired: valid from two days ago until one day ago.
    Expired,
}

/// A CA's certificate parameters: named `name`, signing certificates and
/// CRLs, with at most `path_len` CAs below it; valid for ten years.
fn ca_params(name: String, path_len: u8) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    window(
        &mut params,
        Validity::For(Duration::from_secs(10 * 365 * 86_400)),
    );
    Ok(params)
}

fn window(params: &mut CertificateParams, validity: Validity) {
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let day = Duration::from_secs(86_400);
    let (from, to) = match validity {
        Validity::For(d) => (now - hour, now + d),
        Validity::Expired => (now - 2 * day, now - day),
    };
    params.not_before = from.into();
    params.not_after = to.into();
}

impl Ca {
    /// Mints a new CA for `area`, valid for ten years, that signs
    /// certificates itself.
    pub fn new(area: &proto::AreaId) -> Result<Ca, CertError> {
        Self::root(area, 0)
    }

    /// Mints a new CA for `area`, valid for ten years, that may also sign
    /// issuing CAs ([`Ca::issuing_ca`]), as many areas' PKIs do.
    pub fn with_issuing_cas(area: &proto::AreaId) -> Result<Ca, CertError> {
        Self::root(area, 1)
    }

    fn root(area: &proto::AreaId, path_len: u8) -> Result<Ca, CertError> {
        let params = ca_params(format!("{area} referral gateway CA"), path_len)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca::of(&cert, params, key))
    }

    /// The CA whose certificate `cert` was made from `params` and `key`.
    fn of(cert: &rcgen::Certificate, params: CertificateParams, key: KeyPair) -> Ca {
        let pem = PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// Mints an issuing CA named `name`, signed by this one (made by
    /// [`Ca::with_issuing_cas`]), valid for five years. Certificates it
    /// issues verify against this CA when sent with its certificate (see
    /// [`Ca::chain`]).
    pub fn issuing_ca(&self, name: &str) -> Result<Ca, CertError> {
        let mut params = ca_params(name.to_owned(), 0)?;
        params.use_authority_key_identifier_extension = true;
        window(
            &mut params,
            Validity::For(Duration::from_secs(5 * 365 * 86_400)),
        );
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Ca::of(&cert, params, key))
    }

    /// `pair` (issued by this CA) with this CA's certificate after its own:
    /// the chain a holder of a certificate from an issuing CA presents.
    pub fn chain(&self, pair: &PemPair) -> PemPair {
        PemPair {
            cert: format!("{}{}", pair.cert, self.pem.cert),
            key: pair.key.clone(),
        }
    }

    /// Loads a CA minted earlier from its PEM certificate and key.
    pub fn from_pem(pem: PemPair) -> Result<Ca, CertError> {
        let key = KeyPair::from_pem(&pem.key)?;
        let issuer = Issuer::from_ca_cert_pem(&pem.cert, key)?;
        Ok(Ca { pem, issuer })
    }

    /// The CA's certificate and key.
    pub fn pem(&self) -> &PemPair {
        &self.pem
    }

    /// Issues a certificate for `identity`. Gateways also get `localhost` and
    /// `127.0.0.1` as server names, and both server and client usage; users
    /// get client usage only.
    pub fn issue(&self, identity: &Identity, validity: Validity) -> Result<PemPair, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, identity.uri());
        let uri = identity
            .uri()
            .try_into()
            .map_err(|e: rcgen::Error| CertError::Mint(e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if let Identity::Gateway(_) = identity {
            params
                .subject_alt_names
                .push(SanType::DnsName("localhost".try_into()?));
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        window(&mut params, validity);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// A revocation list (PEM) signed by this CA, revoking the certificates
    /// `revoked` (PEM, each issued by this CA). `number` is the list's CRL
    /// number (higher is newer); `validity` says until when it is current
    /// ([`Validity::Expired`]: a list whose next update is overdue).
    pub fn revocation_list(
        &self,
        revoked: &[&str],
        number: u64,
        validity: Validity,
    ) -> Result<String, CertError> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let now = SystemTime::now();
        let (this_update, next_update) = match validity {
            Validity::For(d) => (now - Duration::from_secs(3600), now + d),
            Validity::Expired => (
                now - Duration::from_secs(2 * 86_400),
                now - Duration::from_secs(86_400),
            ),
        };
        let mut revoked_certs = Vec::new();
        for pem in revoked {
            for der in crate::parse_certs(pem, "revoked certificate")? {
                let (_, cert) = X509Certificate::from_der(der.as_ref())
                    .map_err(|e| CertError::Malformed(e.to_string()))?;
                revoked_certs.push(rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(cert.raw_serial()),
                    revocation_time: this_update.into(),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                });
            }
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: this_update.into(),
            next_update: next_update.into(),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}
