//! The error type of this crate.

/// Why a certificate, key or trust setting was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A PEM file holds no certificate, or holds garbage.
    #[error("{what}: no valid PEM certificate found")]
    NoCertificate {
        /// Which file or value.
        what: String,
    },
    /// A PEM file holds no usable private key.
    #[error("{what}: no valid PEM private key found")]
    NoKey {
        /// Which file or value.
        what: String,
    },
    /// A certificate is not valid DER X.509.
    #[error("certificate is not valid X.509: {0}")]
    Malformed(String),
    /// A certificate carries no SPIFFE identity or an unusable one.
    #[error("certificate identity: {0}")]
    BadIdentity(String),
    /// The TLS peer presented no certificate.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A trust anchor could not be used.
    #[error("trust anchor: {0}")]
    Verifier(String),
    /// A certificate this side must present is past its `notAfter`: every
    /// peer would refuse it.
    #[error("{what} expired at {at}: renew it")]
    Expired {
        /// Which certificate (its file).
        what: String,
        /// When, RFC 3339.
        at: String,
    },
    /// A peer's certificate ran past its `notAfter` while its connection
    /// was open: the connection carries nothing more.
    #[error("{who}: certificate expired at {at}")]
    ExpiredSince {
        /// The identity the certificate names.
        who: String,
        /// When, RFC 3339.
        at: String,
    },
    /// A certificate is on its area's revocation list.
    #[error("{who}: certificate {serial} has been revoked by its area's CA")]
    Revoked {
        /// The identity the certificate names.
        who: String,
        /// Its serial number, hex.
        serial: String,
    },
    /// A certificate revocation list could not be used.
    #[error("revocation list {path}: {reason}")]
    Crl {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Minting a certificate failed.
    #[error("minting certificate: {0}")]
    Mint(#[from] rcgen::Error),
}
