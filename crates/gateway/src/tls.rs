//! TLS for device listeners: the ClientHello's server name chooses the account, and a
//! per-account verifier accepts only client certificates registered ACTIVE there.
//!
//! Key possession is proven by rustls (the CertificateVerify signature); registration and
//! status are decided by [`RegistryVerifier`] from memory. A refused certificate ends the
//! handshake with the `certificate_unknown` alert, as AWS IoT does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, ServerConfig,
    SignatureScheme,
};
use sekisho_registry::{CertMode, CertStatus, Registry};

/// The crypto provider every config uses (aws-lc-rs only; see decision 0001).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Which account a connection is for, from its server name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// The SNI named this account's endpoint.
    Account(String),
    /// No SNI, or one of the default names: the certificate must identify its account
    /// (DEFAULT mode).
    ByCertificate,
}

/// Maps server names to accounts.
#[derive(Debug, Clone)]
pub struct SniRouter {
    /// `iot.<region>.<domain>`: data endpoints are `<prefix>-ats.` + this.
    pub data_suffix: String,
    /// Names that reach the default (by-certificate) route.
    pub default_names: Vec<String>,
}

impl SniRouter {
    /// Resolves a server name. `None`: an unknown name, which is refused.
    pub fn route(&self, registry: &Registry, sni: Option<&str>) -> Option<Target> {
        let Some(name) = sni else {
            return Some(Target::ByCertificate);
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self
            .default_names
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&name))
        {
            return Some(Target::ByCertificate);
        }
        let host = name.strip_suffix(&format!(".{}", self.data_suffix))?;
        let prefix = host.strip_suffix("-ats").unwrap_or(host);
        registry
            .account_by_prefix(prefix)
            .map(|a| Target::Account(a.id))
    }
}

#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse(msg: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(msg)))))
}

/// Finds the account a certificate authenticates in: the SNI's account, or with no SNI the
/// account of its DEFAULT-mode registration. Returns (account, certificate id, status).
pub fn resolve_certificate(
    registry: &Registry,
    target: &Target,
    der: &[u8],
) -> Result<(String, String), String> {
    let id = sekisho_pki::certificate_id(der);
    let accounts = registry.certificate_accounts(&id);
    let account = match target {
        Target::Account(a) => accounts.into_iter().find(|x| x == a),
        Target::ByCertificate => accounts.into_iter().find(|a| {
            registry
                .describe_certificate(a, &id)
                .is_ok_and(|c| c.mode == CertMode::Default)
        }),
    };
    let Some(account) = account else {
        return Err(format!(
            "certificate {id} is not registered for this endpoint"
        ));
    };
    match registry.describe_certificate(&account, &id) {
        Ok(c) if c.status == CertStatus::Active => Ok((account, id)),
        Ok(c) => Err(format!("certificate {id} is {}", c.status.as_str())),
        Err(e) => Err(e.to_string()),
    }
}

/// The client-certificate verifier of one route.
#[derive(Debug)]
pub struct RegistryVerifier {
    registry: Arc<Registry>,
    target: Target,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for RegistryVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let info = sekisho_pki::CertInfo::parse(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let now = time::OffsetDateTime::from_unix_timestamp(now.as_secs() as i64)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        if !info.valid_at(now) {
            return Err(Error::InvalidCertificate(CertificateError::Expired));
        }
        match resolve_certificate(&self.registry, &self.target, end_entity) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(msg) => {
                tracing::info!(reason = %msg, "client certificate refused");
                Err(refuse(msg))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server configs per route, built once and reused.
pub struct TlsConfigs {
    registry: Arc<Registry>,
    provider: Arc<CryptoProvider>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cache: Mutex<HashMap<Target, Arc<ServerConfig>>>,
    plain: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfigs").finish_non_exhaustive()
    }
}

impl TlsConfigs {
    /// From the endpoint certificate chain and key (PEM).
    pub fn new(
        registry: Arc<Registry>,
        chain_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<TlsConfigs> {
        use rustls::pki_types::pem::PemObject;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        let provider = provider();
        let plain = Arc::new(
            ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain.clone(), key.clone_key())?,
        );
        Ok(TlsConfigs {
            registry,
            provider,
            chain,
            key,
            cache: Mutex::new(HashMap::new()),
            plain,
        })
    }

    /// The mutual-TLS config of a route.
    pub fn mtls(&self, target: &Target) -> anyhow::Result<Arc<ServerConfig>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(target) {
            return Ok(c.clone());
        }
        let verifier = Arc::new(RegistryVerifier {
            registry: self.registry.clone(),
            target: target.clone(),
            provider: self.provider.clone(),
        });
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        // No resumption: every connection's certificate is checked in full.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        let cfg = Arc::new(cfg);
        cache.insert(target.clone(), cfg.clone());
        Ok(cfg)
    }

    /// A config without client authentication (control plane).
    pub fn plain(&self) -> Arc<ServerConfig> {
        self.plain.clone()
    }
}
