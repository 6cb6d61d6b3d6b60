//! The built-in certificate authority: the server chain devices trust, endpoint certificates,
//! and device certificates for CreateKeysAndCertificate / CreateCertificateFromCsr.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, RsaKeySize,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::PkiError;

/// Which key a new certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 (fast; used for the server side).
    EcdsaP256,
    /// RSA 2048 (what AWS IoT issues to devices).
    Rsa2048,
}

/// A certificate with its freshly generated key pair.
#[derive(Debug, Clone)]
pub struct IssuedKeys {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Certificate, DER.
    pub cert_der: Vec<u8>,
    /// Private key, PKCS#8 PEM.
    pub private_key_pem: String,
    /// Public key, SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
}

/// A CA certificate and its private key.
pub struct Ca {
    cert_der: Vec<u8>,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn sign_err(e: rcgen::Error) -> PkiError {
    PkiError::Signing(e.to_string())
}

/// A new key pair for a device certificate, not yet used.
pub struct DeviceKey(KeyPair);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

impl DeviceKey {
    /// Generates one.
    pub fn generate(kind: KeyKind) -> Result<DeviceKey, PkiError> {
        new_key(kind).map(DeviceKey)
    }
}

fn new_key(kind: KeyKind) -> Result<KeyPair, PkiError> {
    match kind {
        KeyKind::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
        KeyKind::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048),
    }
    .map_err(sign_err)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 20];
    // A failure of the system RNG leaves zeros; the high bit is cleared to keep it positive.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// AWS-issued device certificates expire at the end of 2049.
fn aws_device_not_after() -> OffsetDateTime {
    time::macros::datetime!(2049-12-31 23:59:59 UTC)
}

impl Ca {
    /// A new self-signed CA with an ECDSA P-256 key, valid for 20 years from `now`.
    pub fn generate(
        common_name: &str,
        organization: &str,
        now: OffsetDateTime,
    ) -> Result<Ca, PkiError> {
        let key = new_key(KeyKind::EcdsaP256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, organization);
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365 * 20);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(sign_err)?;
        Ok(Ca {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Loads a CA from its certificate and PKCS#8 private key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let cert_der = crate::pem_to_der(cert_pem)?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| PkiError::Invalid(format!("CA key: {e}")))?;
        Ok(Ca {
            cert_der,
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Issuer::from_ca_cert_der(&CertificateDer::from(self.cert_der.as_slice()), &self.key)
            .map_err(sign_err)
    }

    fn finish(cert: rcgen::Certificate, key: &KeyPair) -> IssuedKeys {
        IssuedKeys {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            private_key_pem: key.serialize_pem(),
            public_key_pem: key.public_key_pem(),
        }
    }

    /// A server certificate for the given DNS names and IP addresses (valid 10 years).
    pub fn issue_server(
        &self,
        names: &[String],
        now: OffsetDateTime,
    ) -> Result<IssuedKeys, PkiError> {
        let key = new_key(KeyKind::EcdsaP256)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(sign_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("sekisho"),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(sign_err)?;
        Ok(Ca::finish(cert, &key))
    }

    fn device_params(common_name: &str, now: OffsetDateTime) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - Duration::minutes(5);
        params.not_after = aws_device_not_after();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params
    }

    /// CreateProvisioningClaim: a key pair and a device certificate valid only until
    /// `not_after` (AWS: five minutes).
    pub fn issue_claim(
        &self,
        kind: KeyKind,
        now: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedKeys, PkiError> {
        let key = new_key(kind)?;
        let mut params = Ca::device_params("AWS IoT Provisioning Claim", now);
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(sign_err)?;
        Ok(Ca::finish(cert, &key))
    }

    /// CreateKeysAndCertificate: a new key pair of `kind` (AWS issues RSA 2048) and a device
    /// certificate with subject `CN=AWS IoT Certificate`, valid until 2049-12-31.
    pub fn issue_device(&self, kind: KeyKind, now: OffsetDateTime) -> Result<IssuedKeys, PkiError> {
        self.issue_device_with(DeviceKey::generate(kind)?, now)
    }

    /// [`Ca::issue_device`] for a key generated beforehand (RSA generation is slow enough to
    /// be done away from the request).
    pub fn issue_device_with(
        &self,
        key: DeviceKey,
        now: OffsetDateTime,
    ) -> Result<IssuedKeys, PkiError> {
        let cert = Ca::device_params("AWS IoT Certificate", now)
            .signed_by(&key.0, &self.issuer()?)
            .map_err(sign_err)?;
        Ok(Ca::finish(cert, &key.0))
    }

    /// CreateCertificateFromCsr: signs the CSR's public key under the CSR's subject. The CSR's
    /// signature must verify and its key must be RSA of at least 2048 bits or ECDSA
    /// P-256/P-384/P-521. Extensions in the request are ignored; an empty subject becomes
    /// `CN=AWS IoT Certificate`.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        now: OffsetDateTime,
    ) -> Result<(String, Vec<u8>), PkiError> {
        use rustls_pki_types::pem::PemObject;
        use x509_parser::prelude::*;
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
                .map_err(|e| PkiError::InvalidCsr(format!("PEM: {e}")))?;
        let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| PkiError::InvalidCsr(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::InvalidCsr(
                "trailing bytes after the request".into(),
            ));
        }
        csr.verify_signature()
            .map_err(|_| PkiError::InvalidCsr("signature does not verify".into()))?;
        let spki = &csr.certification_request_info.subject_pki;
        match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => {}
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                return Err(PkiError::InvalidCsr(format!(
                    "RSA key of {} bits; at least 2048 required",
                    rsa.key_size()
                )));
            }
            Ok(x509_parser::public_key::PublicKey::EC(_)) => {}
            _ => {
                return Err(PkiError::InvalidCsr(
                    "key must be RSA (>= 2048 bits) or ECDSA P-256/P-384/P-521".into(),
                ));
            }
        }
        let pk = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
            .map_err(|e| PkiError::InvalidCsr(e.to_string()))?;
        let mut params = Ca::device_params("AWS IoT Certificate", now);
        // The subject comes from the request (so that `${iot:Certificate.Subject.*}` policies
        // work with CSR-issued certificates); extensions never do.
        let mut dn = DistinguishedName::new();
        for attr in csr.certification_request_info.subject.iter_attributes() {
            let (Some(oid), Ok(value)) = (attr.attr_type().iter(), attr.as_str()) else {
                continue;
            };
            let oid: Vec<u64> = oid.collect();
            let ty = DnType::from_oid(&oid);
            // rcgen holds one value per attribute type: a repeated attribute keeps its first value.
            if dn.get(&ty).is_none() {
                dn.push(ty, value);
            }
        }
        if dn.iter().next().is_some() {
            params.distinguished_name = dn;
        }
        let cert = params.signed_by(&pk, &self.issuer()?).map_err(sign_err)?;
        Ok((cert.pem(), cert.der().to_vec()))
    }

    /// A certificate signed by this CA whose subject common name is `common_name`, for a key
    /// of `kind`. Used to make test devices and verification certificates.
    pub fn issue_named(
        &self,
        common_name: &str,
        kind: KeyKind,
        now: OffsetDateTime,
    ) -> Result<IssuedKeys, PkiError> {
        let key = new_key(kind)?;
        let cert = Ca::device_params(common_name, now)
            .signed_by(&key, &self.issuer()?)
            .map_err(sign_err)?;
        Ok(Ca::finish(cert, &key))
    }
}

/// A new key of `kind` and a certificate signing request for `common_name` (PEM key, PEM CSR).
/// Used by the load tool and tests to provision devices through CreateCertificateFromCsr.
pub fn new_csr(common_name: &str, kind: KeyKind) -> Result<(String, String), PkiError> {
    let key = new_key(kind)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(sign_err)?
        .pem()
        .map_err(sign_err)?;
    Ok((key.serialize_pem(), csr))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests issue certificates valid now
mod tests {
    use super::*;
    use crate::{CertInfo, certificate_id, signed_by};

    #[test]
    fn device_certificates_chain_to_the_ca() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::generate("Sekisho Test CA", "Sekisho", now).unwrap();
        let dev = ca.issue_device(KeyKind::EcdsaP256, now).unwrap();
        assert!(signed_by(&dev.cert_der, ca.cert_der()));
        let other = Ca::generate("Other", "Other", now).unwrap();
        assert!(!signed_by(&dev.cert_der, other.cert_der()));
        let info = CertInfo::parse(&dev.cert_der).unwrap();
        assert_eq!(
            info.subject.get("CommonName"),
            Some(&vec!["AWS IoT Certificate".to_string()])
        );
        assert_eq!(
            info.issuer.get("CommonName"),
            Some(&vec!["Sekisho Test CA".to_string()])
        );
        assert_eq!(certificate_id(&dev.cert_der).len(), 64);
        assert_eq!(info.not_after.year(), 2049);
        // A CA reloaded from PEM keeps signing.
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let d2 = again.issue_device(KeyKind::EcdsaP256, now).unwrap();
        assert!(signed_by(&d2.cert_der, ca.cert_der()));
    }

    #[test]
    fn csr_signing_checks_the_request() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::generate("CA", "O", now).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "from-csr");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let (pem, der) = ca.sign_csr(&csr, now).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
        assert!(signed_by(&der, ca.cert_der()));
        let info = CertInfo::parse(&der).unwrap();
        assert_eq!(
            info.subject.get("CommonName"),
            Some(&vec!["from-csr".to_string()])
        );
        assert!(ca.sign_csr("garbage", now).is_err());
        // Tampered request: flip a byte inside the signed part.
        let mut bad = rustls_pki_types::pem::PemObject::from_pem_slice(csr.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer| d.as_ref().to_vec())
            .unwrap();
        let n = bad.len() / 2;
        bad[n] ^= 0x01;
        let bad_pem = {
            use base64::Engine as _;
            format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                base64::engine::general_purpose::STANDARD.encode(&bad)
            )
        };
        assert!(ca.sign_csr(&bad_pem, now).is_err());
    }
}
