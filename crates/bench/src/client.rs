//! A minimal MQTT client over mutual TLS on our own codec, for load generation.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::BytesMut;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use sekisho_mqtt::{Connect, Limits, Packet, Properties, ProtocolVersion, decode, encode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_rustls::client::TlsStream;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host name sent as SNI and checked against the server certificate.
    pub host: String,
    /// Address to connect to.
    pub addr: SocketAddr,
    /// MQTT protocol version.
    pub version: ProtocolVersion,
    /// Keep-alive in seconds.
    pub keep_alive: u16,
    /// Whether the client starts a clean session (false: a persistent session, one hour).
    pub clean_start: bool,
    /// A custom authorizer to authenticate through (username and password from the client
    /// id), instead of a client certificate.
    pub custom_auth: Option<String>,
}

/// The TLS client config for one device: server CA plus the device's certificate and key.
pub fn tls_config(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(c?)?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

/// The TLS client config for custom authentication: the server CA, no client certificate,
/// ALPN `mqtt` (AWS's port 443 takes MQTT with custom authentication by it).
pub fn custom_auth_tls_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"mqtt".to_vec()];
    Ok(Arc::new(cfg))
}

/// An open MQTT connection (CONNACK received).
pub struct Conn {
    /// The stream.
    pub stream: TlsStream<tokio::net::TcpStream>,
    /// Bytes read but not yet decoded.
    pub rbuf: BytesMut,
    /// Protocol version.
    pub version: ProtocolVersion,
}

/// Connects, optionally from a given local address, sends CONNECT and waits for CONNACK.
/// Returns the connection or the CONNACK code / error text.
pub async fn connect(
    target: &Target,
    tls: Arc<rustls::ClientConfig>,
    client_id: &str,
    local: Option<IpAddr>,
) -> Result<Conn, String> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(ip) = local {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind: {e}"))?;
    }
    let tcp = socket
        .connect(target.addr)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(target.host.clone()).map_err(|e| e.to_string())?;
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let mut wbuf = BytesMut::new();
    let mut properties = Properties::default();
    if !target.clean_start && target.version == ProtocolVersion::V5 {
        properties.session_expiry_interval = Some(3600);
    }
    let c = Connect {
        version: target.version,
        clean_start: target.clean_start,
        keep_alive: target.keep_alive,
        client_id: client_id.to_owned(),
        will: None,
        username: target
            .custom_auth
            .as_ref()
            .map(|name| format!("{client_id}?x-amz-customauthorizer-name={name}")),
        password: target
            .custom_auth
            .as_ref()
            .map(|_| bytes::Bytes::from(format!("pw-{client_id}"))),
        properties,
    };
    encode(&Packet::Connect(Box::new(c)), target.version, &mut wbuf).map_err(|e| e.to_string())?;
    stream
        .write_all(&wbuf)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::with_capacity(8192),
        version: target.version,
    };
    match conn.next().await {
        Ok(Some(Packet::ConnAck(a))) if a.code == 0 => Ok(conn),
        Ok(Some(Packet::ConnAck(a))) => Err(format!("connack {}", a.code)),
        Ok(Some(p)) => Err(format!("unexpected {}", p.name())),
        Ok(None) => Err("closed before CONNACK".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl Conn {
    /// The next packet, or `None` at end of stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        read_packet(&mut self.stream, &mut self.rbuf, self.version).await
    }
}

/// Reads one packet from any reader with a buffer.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    version: ProtocolVersion,
) -> anyhow::Result<Option<Packet>> {
    let limits = Limits {
        max_packet_size: 1 << 20,
        ..Limits::default()
    };
    loop {
        if let Some(p) = decode(buf, version, &limits)? {
            return Ok(Some(p));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16384);
        }
        if r.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}
