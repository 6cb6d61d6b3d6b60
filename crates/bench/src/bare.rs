//! A bare mutual-TLS server (rustls, aws-lc-rs) that answers any CONNECT with CONNACK and then
//! holds the connection: the handshake ceiling a broker is compared with.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves until killed.
pub async fn serve(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> anyhow::Result<serde_json::Value> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key).context("server key")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(client_ca)? {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("bare mTLS server on {addr}");
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = [0u8; 512];
            if matches!(tls.read(&mut buf).await, Ok(n) if n > 0)
                && tls.write_all(&[0x20, 0x02, 0x00, 0x00]).await.is_ok()
            {
                while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
    }
}
