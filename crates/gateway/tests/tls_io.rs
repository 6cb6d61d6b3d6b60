//! The device TLS stream on rustls's unbuffered API, against tokio-rustls clients over real
//! sockets: data both ways in both TLS versions, records that arrive a byte at a time, key
//! updates, close_notify, a refused server name, and no buffer kept while idle.
#![allow(clippy::unwrap_used)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sekisho_gateway::tls_io::{self, TlsIo};
use sekisho_pki::Ca;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

struct Setup {
    server: Arc<ServerConfig>,
    roots: RootCertStore,
}

fn setup() -> Setup {
    let now = OffsetDateTime::now_utc();
    let ca = Ca::generate("endpoint CA", "Sekisho", now).unwrap();
    let keys = ca.issue_server(&["device.example".into()], now).unwrap();
    let server = ServerConfig::builder_with_provider(sekisho_gateway::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            CertificateDer::pem_slice_iter(keys.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
            PrivateKeyDer::from_pem_slice(keys.private_key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .unwrap();
    Setup {
        server: Arc::new(server),
        roots,
    }
}

fn client_config(s: &Setup, tls12: bool) -> Arc<ClientConfig> {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    Arc::new(
        ClientConfig::builder_with_provider(sekisho_gateway::tls::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(s.roots.clone())
            .with_no_client_auth(),
    )
}

/// A tokio-rustls client connected to `addr` for the server name `device.example`.
async fn client(
    s: &Setup,
    addr: std::net::SocketAddr,
    tls12: bool,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(client_config(s, tls12))
        .connect(ServerName::try_from("device.example").unwrap(), tcp)
        .await
        .unwrap()
}

/// A socket that writes at most one byte per call, so every record reaches the server in
/// pieces.
struct Trickle(TcpStream);

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(1);
        Pin::new(&mut self.0).poll_write(cx, &buf[..n])
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A listener whose first connection is accepted with `TlsIo` and handed to `serve`.
async fn server<F, Fut>(s: &Setup, serve: F) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>)
where
    F: FnOnce(io::Result<TlsIo>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = s.server.clone();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let io = tls_io::accept(tcp, |hello| {
            (hello.server_name() == Some("device.example")).then_some(cfg)
        })
        .await;
        serve(io).await;
    });
    (addr, task)
}

/// Echoes everything until the client closes, then closes with close_notify.
async fn echo(io: io::Result<TlsIo>) {
    let mut io = io.unwrap();
    let mut buf = vec![0u8; 3000];
    loop {
        let n = io.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        io.write_all(&buf[..n]).await.unwrap();
        io.flush().await.unwrap();
    }
    io.shutdown().await.unwrap();
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

async fn echo_round_trip(tls12: bool, len: usize) {
    let s = setup();
    let (addr, task) = server(&s, echo).await;
    let stream = client(&s, addr, tls12).await;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let data = payload(len);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.flush().await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    rd.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    task.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
}

#[tokio::test]
async fn a_megabyte_each_way_over_tls13_and_tls12() {
    echo_round_trip(false, 1 << 20).await;
    echo_round_trip(true, 1 << 20).await;
}

#[tokio::test]
async fn records_arriving_a_byte_at_a_time_are_reassembled() {
    let s = setup();
    let (addr, task) = server(&s, echo).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(client_config(&s, false))
        .connect(
            ServerName::try_from("device.example").unwrap(),
            Trickle(tcp),
        )
        .await
        .unwrap();
    let data = payload(2_000);
    stream.write_all(&data).await.unwrap();
    stream.flush().await.unwrap();
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert!(back == data);
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    task.await.unwrap();
}

#[tokio::test]
async fn key_updates_from_the_client_are_answered_and_traffic_goes_on() {
    let s = setup();
    let (addr, task) = server(&s, echo).await;
    let mut stream = client(&s, addr, false).await;
    for round in 0..5u8 {
        stream.get_mut().1.refresh_traffic_keys().unwrap();
        let data = vec![round; 100];
        stream.write_all(&data).await.unwrap();
        stream.flush().await.unwrap();
        let mut back = vec![0u8; 100];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data);
    }
    stream.shutdown().await.unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_holds_no_buffer() {
    let s = setup();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (addr, task) = server(&s, |io| async move {
        let mut io = io.unwrap();
        let mut buf = [0u8; 5];
        io.read_exact(&mut buf).await.unwrap();
        io.write_all(b"world").await.unwrap();
        io.flush().await.unwrap();
        // Nothing more arrives: the read waits, and nothing is buffered meanwhile.
        let waited = tokio::time::timeout(Duration::from_millis(100), io.read(&mut buf)).await;
        assert!(waited.is_err(), "read should still be waiting");
        tx.send(io.buffered_capacity()).unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
    })
    .await;
    let mut stream = client(&s, addr, false).await;
    stream.write_all(b"hello").await.unwrap();
    stream.flush().await.unwrap();
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"world");
    assert_eq!(rx.await.unwrap(), 0);
    stream.shutdown().await.unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn an_unknown_server_name_is_refused_before_the_handshake() {
    let s = setup();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (addr, task) = server(&s, |io| async move {
        tx.send(io.map(|_| ()).map_err(|e| e.kind())).unwrap();
    })
    .await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(client_config(&s, false))
        .connect(ServerName::try_from("other.example").unwrap(), tcp)
        .await;
    assert!(refused.is_err());
    assert_eq!(rx.await.unwrap(), Err(io::ErrorKind::ConnectionRefused));
    task.await.unwrap();
}

#[tokio::test]
async fn garbage_and_oversized_hellos_end_in_an_error() {
    let s = setup();
    // Not TLS at all.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (addr, task) = server(&s, |io| async move {
        tx.send(io.is_err()).unwrap();
    })
    .await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(rx.await.unwrap());
    task.await.unwrap();

    // A handshake record header announcing more than rustls buffers, then endless bytes.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (addr, task) = server(&s, |io| async move {
        tx.send(io.is_err()).unwrap();
    })
    .await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut hello = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
    hello.resize(0x4005, 0);
    let sender = tokio::spawn(async move {
        for _ in 0..10 {
            if tcp.write_all(&hello).await.is_err() {
                break;
            }
        }
    });
    assert!(rx.await.unwrap());
    task.await.unwrap();
    sender.await.unwrap();
}

#[tokio::test]
async fn a_forged_record_fails_the_connection_and_the_client_hears_the_alert() {
    let s = setup();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (addr, task) = server(&s, |io| async move {
        let mut io = io.unwrap();
        let mut buf = [0u8; 64];
        // What arrived before the forged record is read first, then the failure.
        let mut got = Vec::new();
        let err = loop {
            match io.read(&mut buf).await {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        // Failed for good: no more reads or writes, only the alert goes out.
        let again = io.read(&mut buf).await.is_err();
        let write = io.write_all(b"late").await.is_err();
        let _ = io.shutdown().await;
        tx.send((got, err.kind(), again, write)).unwrap();
    })
    .await;
    let mut stream = client(&s, addr, false).await;
    // A genuine record (a DISCONNECT, say), then one no key of this connection sealed, in one
    // write so that they arrive together.
    let mut raw = Vec::new();
    {
        use std::io::Write;
        let (_, conn) = stream.get_mut();
        conn.writer().write_all(b"\xe0\x00").unwrap();
        conn.write_tls(&mut raw).unwrap();
    }
    raw.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x20]);
    raw.extend_from_slice(&[0x5a; 32]);
    stream.get_mut().0.write_all(&raw).await.unwrap();
    let (got, kind, again, write) = rx.await.unwrap();
    assert_eq!(
        got, b"\xe0\x00",
        "the data before the forged record is not lost"
    );
    assert_eq!(kind, io::ErrorKind::InvalidData);
    assert!(again && write);
    let mut rest = Vec::new();
    let heard = stream.read_to_end(&mut rest).await.unwrap_err().to_string();
    assert!(heard.to_lowercase().contains("alert"), "{heard}");
    task.await.unwrap();
}
