//! What a client may send before it is authenticated, and how long it may take: deadlines on
//! request headers and bodies, and the accept loop every listener shares.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

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
