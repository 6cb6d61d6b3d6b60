//! What a client may send before it is authenticated, and how long it may take: deadlines on
//! request headers and bodies, and the accept loop every listener shares.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A query string or form body as decoded name/value pairs, in order (repeated names kept).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Most connections open at once on one control-plane or S3 listener; more are closed at once.
pub const MAX_HTTPS_CONNECTIONS: usize = 10_000;

/// How long a client may take to send a request's headers, on every HTTP listener.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(10);

/// How long a client may take to send a whole request body that is read before its signature
/// can be checked (control plane up to 1 MiB, device HTTPS up to 128 KiB): a slow or stalled
/// client cannot hold a connection slot longer than this without authenticating.
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);

/// Why a request body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Larger than allowed.
    TooLarge,
    /// Not complete within the deadline.
    Timeout,
    /// The connection failed.
    Failed,
}

/// Reads a whole request body of at most `max` bytes within `deadline`.
pub async fn read_body<B>(
    body: B,
    max: usize,
    deadline: Duration,
) -> Result<bytes::Bytes, BodyError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt as _;
    match tokio::time::timeout(deadline, http_body_util::Limited::new(body, max).collect()).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(_)) => Err(BodyError::Failed),
    }
}

/// The next connection on `listener`, or `None` at shutdown. Accept errors (such as running
/// out of file descriptors) are logged and retried after a short pause.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}

/// Accepts TLS connections, at most `cap` at once, and serves HTTP/1.1 on each with
/// `service(peer, request)`.
pub async fn serve_https<F, Fut, B>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
    what: &'static str,
    cap: usize,
    service: F,
) where
    F: Fn(std::net::SocketAddr, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    while let Some((tcp, peer)) = accept(&listener, &mut shutdown).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "{what}: {cap} connections open; connection refused");
            continue;
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        // Responses go out as headers and body in separate writes; without this, Nagle's
        // algorithm meets the client's delayed ACK and every small response waits ~40 ms.
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                    .await
            else {
                tracing::debug!(%peer, "{what}: TLS handshake failed");
                return;
            };
            serve_connection(tls, peer, what, service).await;
            drop(slot);
        });
    }
}

/// Serves HTTP/1.1 with `service(peer, request)` on one connection whose TLS handshake is
/// done (by [`serve_https`], or by a device listener that hands over a server name it does not
/// serve itself), with the header deadline every listener keeps.
pub async fn serve_connection<S, F, Fut, B>(
    io: S,
    peer: std::net::SocketAddr,
    what: &'static str,
    service: F,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(std::net::SocketAddr, Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let svc = hyper::service::service_fn(move |req| service(peer, req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_DEADLINE)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "{what}: connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;

    /// A listener holds `cap` connections; the next is closed at accept, and a slot freed is
    /// usable again.
    #[tokio::test]
    async fn connection_cap_at_n_and_n_plus_1() {
        use tokio::io::AsyncReadExt as _;
        #[derive(Debug)]
        struct NoCert;
        impl rustls::server::ResolvesServerCert for NoCert {
            fn resolve(
                &self,
                _: rustls::server::ClientHello<'_>,
            ) -> Option<Arc<rustls::sign::CertifiedKey>> {
                None
            }
        }
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCert));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve_https(
            listener,
            Arc::new(tls),
            shutdown,
            "test",
            2,
            |_, _req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            },
        ));
        let connect = || tokio::net::TcpStream::connect(addr);
        // Closed by the server: reading gives end of file quickly.
        async fn closed(s: &mut tokio::net::TcpStream) -> bool {
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(std::time::Duration::from_millis(500), s.read(&mut b)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        }
        let mut a = connect().await.unwrap();
        let mut b = connect().await.unwrap();
        let mut c = connect().await.unwrap();
        assert!(closed(&mut c).await, "connection N+1 must be refused");
        assert!(
            !closed(&mut a).await && !closed(&mut b).await,
            "N connections are held"
        );
        // The slot is freed once the server has seen the client go; until then, newcomers are
        // still refused. Within a few tries one must be held.
        drop(a);
        let mut held = false;
        for _ in 0..20 {
            let mut d = connect().await.unwrap();
            if !closed(&mut d).await {
                held = true;
                break;
            }
        }
        assert!(held, "a freed slot is used again");
        assert!(!closed(&mut b).await, "the other connection is still held");
    }
}
