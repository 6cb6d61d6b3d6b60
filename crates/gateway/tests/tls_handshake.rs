//! Device TLS handshakes in memory, with a rustls client: the per-handshake verifier asks the
//! registry once and hands the gateway the account and certificate it authenticated; a JITR
//! certificate is registered only after the client proved its key, and refused until active.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};
use sekisho_broker::{Broker, BrokerConfig};
use sekisho_gateway::tls::{Target, TlsConfigs, TlsPolicy};
use sekisho_pki::{Ca, IssuedKeys, KeyKind};
use sekisho_registry::{
    AccountId, CertMode, CertStatus, CertificateId, NewCaCertificate, Registry,
};
use time::OffsetDateTime;

struct Setup {
    registry: Arc<Registry>,
    configs: TlsConfigs,
    account: String,
    endpoint_ca: Ca,
    device_ca: Ca,
}

fn setup() -> Setup {
    let now = OffsetDateTime::now_utc();
    let registry = Arc::new(Registry::in_memory("us-east-1").unwrap());
    let (info, _) = registry.create_account("a").unwrap();
    let endpoint_ca = Ca::generate("endpoint CA", "Sekisho", now).unwrap();
    let server = endpoint_ca
        .issue_server(&["device.example".into()], now)
        .unwrap();
    let device_ca = Ca::generate("JITR CA", "Plant", now).unwrap();
    registry
        .register_ca_certificate(
            &info.id,
            NewCaCertificate {
                pem: device_ca.cert_pem().to_owned(),
                verification_pem: None,
                mode: CertMode::SniOnly,
                active: true,
                auto_registration: true,
                registration_config: None,
            },
            now,
        )
        .unwrap();
    let broker = Arc::new(Broker::new(BrokerConfig::default()));
    let configs = TlsConfigs::new(
        registry.clone(),
        broker,
        &server.cert_pem,
        &server.private_key_pem,
    )
    .unwrap();
    Setup {
        registry,
        configs,
        account: info.id,
        endpoint_ca,
        device_ca,
    }
}

/// What the gateway takes from a finished handshake.
type Authenticated = Option<(AccountId, CertificateId)>;

/// Runs one handshake to its end; `Ok` when both sides finished it.
fn handshake(s: &Setup, device: &IssuedKeys) -> (Result<(), String>, Authenticated) {
    handshake_with(s, device, false, |_| {})
}

/// Runs one handshake, feeding the server one TLS record at a time; `between` runs once, as
/// soon as the server has accepted the client's certificate and before it has read the rest.
fn handshake_with(
    s: &Setup,
    device: &IssuedKeys,
    tls12: bool,
    between: impl FnOnce(&Setup),
) -> (Result<(), String>, Authenticated) {
    let (cfg, verifier) = s
        .configs
        .mtls(
            &Target::Account(s.account.clone()),
            TlsPolicy::default(),
            false,
        )
        .unwrap();
    let mut server = ServerConnection::new(cfg).unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(s.endpoint_ca.cert_der().to_vec()))
        .unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let client_cfg = ClientConfig::builder_with_provider(sekisho_gateway::tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(device.cert_der.clone())],
            PrivateKeyDer::from_pem_slice(device.private_key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let mut client = ClientConnection::new(
        Arc::new(client_cfg),
        ServerName::try_from("device.example").unwrap(),
    )
    .unwrap();
    let mut result = Ok(());
    let mut between = Some(between);
    'pump: for _ in 0..20 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        let mut rest = buf.as_slice();
        while rest.len() >= 5 {
            let len = 5 + u16::from_be_bytes([rest[3], rest[4]]) as usize;
            let (record, tail) = rest.split_at(len.min(rest.len()));
            rest = tail;
            server.read_tls(&mut &record[..]).unwrap();
            if let Err(e) = server.process_new_packets() {
                result = Err(e.to_string());
                break 'pump;
            }
            if verifier.authenticated().is_some()
                && let Some(f) = between.take()
            {
                f(s);
            }
        }
        let mut buf = Vec::new();
        server.write_tls(&mut buf).unwrap();
        if !buf.is_empty() {
            client.read_tls(&mut buf.as_slice()).unwrap();
            if let Err(e) = client.process_new_packets() {
                result = Err(e.to_string());
                break;
            }
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    if result.is_ok() && (client.is_handshaking() || server.is_handshaking()) {
        result = Err("handshake did not finish".into());
    }
    (result, verifier.authenticated())
}

#[test]
fn jitr_registers_once_the_key_is_proven_and_an_active_certificate_is_authenticated() {
    let s = setup();
    let now = OffsetDateTime::now_utc();
    let device = s
        .device_ca
        .issue_named("dev-1", KeyKind::EcdsaP256, now)
        .unwrap();
    let id = sekisho_pki::certificate_id(&device.cert_der);

    // First connection: registered PENDING_ACTIVATION, and refused.
    let (result, authenticated) = handshake(&s, &device);
    let err = result.unwrap_err();
    assert!(err.contains("PENDING_ACTIVATION"), "{err}");
    assert_eq!(authenticated, None);
    let cert = s.registry.describe_certificate(&s.account, &id).unwrap();
    assert_eq!(cert.status, CertStatus::PendingActivation);

    // Still pending: refused again, nothing new registered.
    let (result, authenticated) = handshake(&s, &device);
    assert!(result.unwrap_err().contains("PENDING_ACTIVATION"));
    assert_eq!(authenticated, None);

    // Activated: the handshake hands over the account and certificate it authenticated.
    s.registry
        .update_certificate(&s.account, &id, CertStatus::Active)
        .unwrap();
    let (result, authenticated) = handshake(&s, &device);
    result.unwrap();
    assert_eq!(
        authenticated,
        Some((
            AccountId::new(s.account.clone()),
            CertificateId::new(id.clone())
        ))
    );

    // Revoked: refused with the registry's reason, and nothing authenticated.
    s.registry
        .update_certificate(&s.account, &id, CertStatus::Revoked)
        .unwrap();
    let (result, authenticated) = handshake(&s, &device);
    assert!(result.is_err());
    assert_eq!(authenticated, None);
}

#[test]
fn a_certificate_from_an_unknown_issuer_is_refused_and_not_registered() {
    let s = setup();
    let now = OffsetDateTime::now_utc();
    let stranger = Ca::generate("stranger", "Elsewhere", now).unwrap();
    let device = stranger
        .issue_named("dev-x", KeyKind::EcdsaP256, now)
        .unwrap();
    let (result, authenticated) = handshake(&s, &device);
    assert!(result.unwrap_err().contains("not registered"));
    assert_eq!(authenticated, None);
    let id = sekisho_pki::certificate_id(&device.cert_der);
    assert!(s.registry.describe_certificate(&s.account, &id).is_err());
}

/// A certificate revoked while its handshake is under way (the client holds back the proof of
/// its key) fails that handshake: the status is read again at the proof.
#[test]
fn a_certificate_revoked_mid_handshake_fails_it() {
    let s = setup();
    let now = OffsetDateTime::now_utc();
    let device = s
        .device_ca
        .issue_named("dev-2", KeyKind::EcdsaP256, now)
        .unwrap();
    let id = sekisho_pki::certificate_id(&device.cert_der);
    let _ = handshake(&s, &device); // registered PENDING_ACTIVATION
    s.registry
        .update_certificate(&s.account, &id, CertStatus::Active)
        .unwrap();
    // Control: untouched, the same stepwise handshake succeeds.
    let (result, authenticated) = handshake_with(&s, &device, true, |_| {});
    result.unwrap();
    assert!(authenticated.is_some());
    for status in [CertStatus::Inactive, CertStatus::Revoked] {
        s.registry
            .update_certificate(&s.account, &id, CertStatus::Active)
            .ok();
        let (result, authenticated) = handshake_with(&s, &device, true, |s| {
            s.registry
                .update_certificate(&s.account, &id, status)
                .unwrap();
        });
        let err = result.unwrap_err();
        assert!(
            err.contains("not ACTIVE") || err.contains(status.as_str()),
            "{err}"
        );
        assert_eq!(authenticated, None);
    }
}
