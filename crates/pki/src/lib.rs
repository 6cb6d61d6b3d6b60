//! Certificate logic: ids, identity fields for policy variables, the built-in CA, CSR signing
//! and chain checks.
//!
//! Pure: the current time is always a parameter, nothing here touches the network or disk.

#![warn(missing_docs)]

mod ca;
mod info;

pub use ca::{Ca, DeviceKey, IssuedKeys, KeyKind, new_csr};
pub use info::{CertInfo, NameFields};

use rustls_pki_types::{CertificateDer, pem::PemObject};

/// Why certificate material was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    /// Not parseable PEM / DER, or not a certificate.
    #[error("certificate is invalid: {0}")]
    Invalid(String),
    /// The CSR is malformed, its signature does not verify, or its key is not acceptable.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    /// Key generation or signing failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// AWS's certificate id: the lower-case hex SHA-256 of the DER encoding.
pub fn certificate_id(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

/// The DER of every certificate in a PEM text, in order.
pub fn pem_to_ders(pem: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| PkiError::Invalid(format!("PEM: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::Invalid("no CERTIFICATE block in PEM".into()));
    }
    Ok(certs.into_iter().map(|c| c.to_vec()).collect())
}

/// The first certificate of a PEM text as DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    pem_to_ders(pem)?
        .into_iter()
        .next()
        .ok_or_else(|| PkiError::Invalid("empty PEM".into()))
}

/// PEM text of one DER certificate.
pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + 70);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Whether `cert_der` carries a valid signature by the key of `issuer_der` (names not checked).
pub fn signed_by(cert_der: &[u8], issuer_der: &[u8]) -> bool {
    use x509_parser::prelude::*;
    let (Ok((_, cert)), Ok((_, issuer))) = (
        X509Certificate::from_der(cert_der),
        X509Certificate::from_der(issuer_der),
    ) else {
        return false;
    };
    cert.verify_signature(Some(issuer.public_key())).is_ok()
}

/// The DER SubjectPublicKeyInfo of a certificate (any X.509 version, v1 included).
pub fn spki_der(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(cert.public_key().raw.to_vec())
}
