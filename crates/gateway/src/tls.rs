//! TLS for device listeners: the ClientHello's server name chooses the account, and a
//! per-account verifier accepts only client certificates registered ACTIVE there (and whose
//! registered CA, if any, is ACTIVE).
//!
//! Key possession is proven by rustls (the CertificateVerify signature); registration and
//! status are decided by [`RegistryVerifier`] from memory. A refused certificate ends the
//! handshake with the `certificate_unknown` alert, as AWS IoT does.
//!
//! Just-in-time registration happens only after the CertificateVerify signature has proven that
//! the client holds the key: an unknown certificate signed by an ACTIVE, auto-registering CA
//! passes the first step provisionally, is registered PENDING_ACTIVATION once the signature
//! checks, announced on `$aws/events/certificates/registered/<caCertificateId>`, and the
//! handshake still fails (AWS: the first connection fails; the device retries once activated).

use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, ServerConfig,
    SignatureScheme,
};
use sekisho_broker::Broker;
use sekisho_registry::{AccountId, Authentication, CertificateId, Registry, Route};

/// MQTT with a client certificate, as AWS's port 443 names it.
pub const ALPN_MQTT: &[u8] = b"x-amzn-mqtt-ca";
/// MQTT with custom authentication (the CONNECT's username and password), as AWS's port 443
/// names it.
pub const ALPN_MQTT_CUSTOM: &[u8] = b"mqtt";
/// What the device HTTPS listeners offer by ALPN, in the server's order of preference: MQTT
/// with a client certificate, HTTPS with one (AWS's names), and plain HTTP/1.1 (HTTPS with
/// SigV4, WebSocket). A client offering none of them is refused (`no_application_protocol`);
/// one that offers no ALPN at all gets HTTPS.
pub const ALPN: &[&[u8]] = &[ALPN_MQTT, b"x-amzn-http-ca", ALPN_MQTT_CUSTOM, b"http/1.1"];

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

impl Target {
    /// As the registry takes it.
    pub fn route(&self) -> Route<'_> {
        match self {
            Target::Account(a) => Route::Account(a),
            Target::ByCertificate => Route::ByCertificate,
        }
    }
}

/// A TLS security policy, named as AWS names them (domain configurations' `tlsConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TlsPolicy {
    /// `IoTSecurityPolicy_TLS13_1_2_2022_10`: TLS 1.2 and 1.3 (the default).
    #[default]
    Tls13Tls12,
    /// `IoTSecurityPolicy_TLS13_1_3_2022_10`: TLS 1.3 only.
    Tls13Only,
    /// `IoTSecurityPolicy_TLS12_1_2_2022_10`: TLS 1.2 only.
    Tls12Only,
}

impl TlsPolicy {
    /// The policies there are, by AWS name.
    pub const ALL: [(&'static str, TlsPolicy); 3] = [
        ("IoTSecurityPolicy_TLS13_1_2_2022_10", TlsPolicy::Tls13Tls12),
        ("IoTSecurityPolicy_TLS13_1_3_2022_10", TlsPolicy::Tls13Only),
        ("IoTSecurityPolicy_TLS12_1_2_2022_10", TlsPolicy::Tls12Only),
    ];

    /// Parses an AWS policy name. The TLS 1.0/1.1 policies (`..._TLS12_1_0_...`) are not
    /// offered: rustls does not speak those versions.
    pub fn parse(name: &str) -> Option<TlsPolicy> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    /// The AWS name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map(|(n, _)| *n)
            .unwrap_or_default()
    }

    fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static BOTH: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        static TLS12: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
        match self {
            TlsPolicy::Tls13Tls12 => &BOTH,
            TlsPolicy::Tls13Only => &TLS13,
            TlsPolicy::Tls12Only => &TLS12,
        }
    }
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
        // `<prefix>-ats.iot…` (iot:Data-ATS), `<prefix>.iot…` (iot:Data),
        // `<prefix>.credentials.iot…` (iot:CredentialProvider), `<prefix>.jobs.iot…` (iot:Jobs).
        let prefix = host
            .strip_suffix("-ats")
            .or_else(|| host.strip_suffix(".credentials"))
            .or_else(|| host.strip_suffix(".jobs"))
            .unwrap_or(host);
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

/// Checks the handshake signature with the certificate's public key. Unlike rustls's own
/// helpers (webpki's `EndEntityCert`), this accepts X.509 v1 certificates, which AWS IoT
/// accepts and which `openssl x509 -req` makes by default (the developer guide's own recipe).
/// The certificate's trust is decided by the registry, not by a chain.
fn verify_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    provider: &CryptoProvider,
    tls13: bool,
) -> Result<HandshakeSignatureValid, Error> {
    let algs = &provider.signature_verification_algorithms;
    let spki = sekisho_pki::spki_der(cert)
        .ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from(spki.as_slice());
    if tls13 {
        return rustls::crypto::verify_tls13_signature_with_raw_key(message, &spki, dss, algs);
    }
    let key = webpki::RawPublicKeyEntity::try_from(&spki)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let candidates = algs
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == dss.scheme)
        .map(|(_, a)| *a)
        .ok_or(Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ))?;
    for alg in candidates {
        match key.verify_signature(*alg, message, dss.signature()) {
            Ok(()) => return Ok(HandshakeSignatureValid::assertion()),
            Err(webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)) => continue,
            Err(_) => break,
        }
    }
    Err(Error::InvalidCertificate(CertificateError::BadSignature))
}

/// What every verifier shares.
#[derive(Debug)]
struct VerifierContext {
    registry: Arc<Registry>,
    broker: Arc<Broker>,
    provider: Arc<CryptoProvider>,
}

/// The client-certificate verifier of one handshake. The registry is asked once, when the
/// certificate arrives; the answer is kept for the signature step (which only acts on it) and
/// for the gateway, which reads the authenticated account and certificate id from
/// [`RegistryVerifier::authenticated`] once the handshake is done.
#[derive(Debug)]
pub struct RegistryVerifier {
    context: Arc<VerifierContext>,
    target: Target,
    /// Device HTTPS: a client without a certificate may go on and sign its requests (SigV4).
    optional: bool,
    /// The registry's answer for this handshake's certificate.
    decided: Mutex<Option<Authentication>>,
}

impl RegistryVerifier {
    /// The account and certificate id this handshake authenticated, if the client presented an
    /// ACTIVE certificate and proved possession of its key.
    pub fn authenticated(&self) -> Option<(AccountId, CertificateId)> {
        match &*self.decided.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(Authentication::Active {
                account,
                certificate_id,
            }) => Some((account.clone(), certificate_id.clone())),
            _ => None,
        }
    }

    /// The decision once the client has proven possession of the certificate's key: ACTIVE
    /// passes; a JITR candidate is registered PENDING_ACTIVATION and announced, and refused.
    fn after_proof(&self, der: &[u8]) -> Result<(), Error> {
        let decided = self
            .decided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let registry = &self.context.registry;
        let broker = &self.context.broker;
        match decided {
            // The client chose how long to wait between sending its certificate and proving
            // its key: the status is read again (by id, no second resolution), so a certificate
            // revoked meanwhile fails the handshake.
            Some(Authentication::Active {
                account,
                certificate_id,
            }) => registry
                .certificate_usable(&account, &certificate_id)
                .map_err(|why| {
                    *self.decided.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    refuse(format!("certificate {certificate_id}: {why}"))
                }),
            Some(Authentication::PendingActivation {
                account,
                certificate_id,
                ca_certificate_id,
            }) => {
                let registered = registry
                    .describe_certificate(&account, &certificate_id)
                    .map(|c| c.created)
                    .unwrap_or_default();
                crate::events::certificate_registered(
                    broker,
                    &account,
                    &certificate_id,
                    &ca_certificate_id,
                    registered,
                );
                Err(refuse(format!(
                    "certificate {certificate_id} is PENDING_ACTIVATION"
                )))
            }
            Some(Authentication::AutoRegister {
                account,
                ca_certificate_id,
            }) => match registry.auto_register(&account, der, &ca_certificate_id) {
                Ok(c) => {
                    tracing::info!(%account, certificate = %c.id, ca = %ca_certificate_id, "just-in-time registration: certificate registered PENDING_ACTIVATION");
                    crate::events::certificate_registered(
                        broker,
                        &account,
                        &c.id,
                        &ca_certificate_id,
                        c.created,
                    );
                    // Just-in-time provisioning, when the CA names a template; this
                    // connection is refused all the same (AWS drops it), the next one finds
                    // the certificate as the template left it.
                    match crate::provision::jitp(registry, &account, &ca_certificate_id, &c) {
                        None => {}
                        Some(Ok(thing)) => {
                            tracing::info!(%account, certificate = %c.id, thing = ?thing, "just-in-time provisioning done");
                        }
                        Some(Err(why)) => {
                            tracing::warn!(%account, certificate = %c.id, %why, "just-in-time provisioning failed; the certificate stays PENDING_ACTIVATION");
                        }
                    }
                    Err(refuse(format!(
                        "certificate {} registered PENDING_ACTIVATION; activate it to connect",
                        c.id
                    )))
                }
                Err(e) => {
                    tracing::warn!(%account, error = %e, "just-in-time registration failed");
                    Err(refuse(e.to_string()))
                }
            },
            Some(Authentication::Refused(m)) => Err(refuse(m)),
            // rustls asks for the signature only after the certificate was accepted.
            None => Err(refuse("no certificate was verified".into())),
        }
    }
}

impl ClientCertVerifier for RegistryVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
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
        let decision = self
            .context
            .registry
            .authenticate(self.target.route(), end_entity);
        let verdict = match &decision {
            // JITR candidates pass provisionally: decided in `after_proof`.
            Authentication::Active { .. }
            | Authentication::PendingActivation { .. }
            | Authentication::AutoRegister { .. } => Ok(ClientCertVerified::assertion()),
            Authentication::Refused(msg) => {
                tracing::info!(reason = %msg, "client certificate refused");
                Err(refuse(msg.clone()))
            }
        };
        *self.decided.lock().unwrap_or_else(|p| p.into_inner()) = Some(decision);
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let ok = verify_signature(message, cert, dss, &self.context.provider, false)?;
        self.after_proof(cert)?;
        Ok(ok)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let ok = verify_signature(message, cert, dss, &self.context.provider, true)?;
        self.after_proof(cert)?;
        Ok(ok)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.context
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why the endpoint's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate chain's PEM.
    #[error("endpoint certificate chain: {0}")]
    Chain(rustls::pki_types::pem::Error),
    /// The private key's PEM.
    #[error("endpoint private key: {0}")]
    Key(rustls::pki_types::pem::Error),
    /// rustls refused the key, the chain or the protocol versions.
    #[error("endpoint TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Server configs: the control plane's one, and a fresh mutual-TLS config per device
/// handshake (its verifier holds that handshake's registry answer). The endpoint's key is
/// parsed once; a per-handshake config is a few reference counts.
pub struct TlsConfigs {
    context: Arc<VerifierContext>,
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
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
        broker: Arc<Broker>,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<TlsConfigs, TlsSetupError> {
        use rustls::pki_types::pem::PemObject;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(TlsSetupError::Chain)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(TlsSetupError::Key)?;
        let provider = provider();
        let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider)?;
        let resolver: Arc<dyn rustls::server::ResolvesServerCert> =
            Arc::new(rustls::sign::SingleCertAndKey::from(certified));
        let plain = Arc::new(
            ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone()),
        );
        Ok(TlsConfigs {
            context: Arc::new(VerifierContext {
                registry,
                broker,
                provider,
            }),
            resolver,
            plain,
        })
    }

    /// The mutual-TLS config of one handshake on a route under a TLS security policy, and its
    /// verifier; with `optional`, a client may also connect without a certificate (device
    /// HTTPS with SigV4), and the protocols of [`ALPN`] are offered.
    pub fn mtls(
        &self,
        target: &Target,
        policy: TlsPolicy,
        optional: bool,
    ) -> Result<(Arc<ServerConfig>, Arc<RegistryVerifier>), rustls::Error> {
        let verifier = Arc::new(RegistryVerifier {
            context: self.context.clone(),
            target: target.clone(),
            optional,
            decided: Mutex::new(None),
        });
        let mut cfg = ServerConfig::builder_with_provider(self.context.provider.clone())
            .with_protocol_versions(policy.versions())?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(self.resolver.clone());
        // Device HTTPS listeners (the only ones where the certificate is optional) carry MQTT
        // too, chosen by ALPN as on AWS's port 443; the server's order decides, so a client
        // offering several gets MQTT only if it asks for it.
        if optional {
            cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        }
        // No resumption: every connection's certificate is checked in full.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok((Arc::new(cfg), verifier))
    }

    /// A config without client authentication (control plane).
    pub fn plain(&self) -> Arc<ServerConfig> {
        self.plain.clone()
    }

    /// A config without client authentication under a device listener's TLS security policy,
    /// without resumption: for server names a device listener hands over ([`crate::Handover`]).
    pub fn service(&self, policy: TlsPolicy) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut cfg = ServerConfig::builder_with_provider(self.context.provider.clone())
            .with_protocol_versions(policy.versions())?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver.clone());
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }
}
