//! Loading certificates and keys from PEM.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// A certificate chain and its private key: what a gateway or a user presents.
#[derive(Debug)]
pub struct Credentials {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Credentials {
    /// Loads a chain and a key from two PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Credentials, CertError> {
        Ok(Credentials {
            chain: load_certs(cert)?,
            key: load_key(key)?,
        })
    }

    /// Parses a chain and a key from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Credentials, CertError> {
        Ok(Credentials {
            chain: parse_certs(cert_pem, "certificate")?,
            key: parse_key(key_pem, "key")?,
        })
    }
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Loads every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    parse_certs(&read(path)?, &path.display().to_string())
}

/// Loads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    parse_key(&read(path)?, &path.display().to_string())
}

/// Parses every certificate in PEM text (at least one); `what` names it in errors.
pub fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        _ => Err(CertError::NoCertificate { what: what.into() }),
    }
}

/// Parses the first private key in PEM text; `what` names it in errors.
pub fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CertError::NoKey { what: what.into() })
}
