//! The Lambda Runtime API (`/2018-06-01/runtime/...`), served to one instance on a loopback
//! port of its own: `GET invocation/next` hands out the instance's next invocation,
//! `POST invocation/{id}/response` and `.../error` answer it, `POST init/error` reports a
//! runtime that could not start.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

use crate::{Invocation, Outcome};

/// The largest response a function may give (Lambda's synchronous payload limit).
const MAX_RESPONSE: usize = 6 * 1024 * 1024;
/// Connections an instance's runtime API serves at once (a runtime needs one or two).
const MAX_CONNECTIONS: usize = 4;
/// The longest line of a function's output the log takes (the rest of it is cut).
const MAX_LINE: usize = 8192;

/// One instance's side of the runtime API.
pub(crate) struct Api {
    next: tokio::sync::Mutex<mpsc::Receiver<Invocation>>,
    /// The invocation handed out and not yet answered: (request id, where its answer goes).
    pending: Mutex<Option<(String, oneshot::Sender<Outcome>)>>,
    /// What the runtime reported on `init/error`.
    init_error: Mutex<Option<Bytes>>,
    function: String,
    /// Whether a `next` is waiting: one at a time (the runtime's own).
    polling: AtomicBool,
    /// Whether the runtime asked for its first invocation (after which `init/error` is not
    /// taken).
    started: AtomicBool,
    connections: AtomicUsize,
}

impl Api {
    pub(crate) fn new(rx: mpsc::Receiver<Invocation>, function: String) -> Arc<Api> {
        Arc::new(Api {
            next: tokio::sync::Mutex::new(rx),
            pending: Mutex::new(None),
            init_error: Mutex::new(None),
            function,
            polling: AtomicBool::new(false),
            started: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        })
    }

    pub(crate) fn init_error(&self) -> Option<Bytes> {
        self.init_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn request_id(&self) -> Option<String> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(id, _)| id.clone())
    }

    /// The instance ended: its invocations, handed out or still queued, are not answered
    /// (their callers see why).
    pub(crate) async fn close(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut rx = self.next.lock().await;
        rx.close();
        while rx.try_recv().is_ok() {}
    }

    fn answer(&self, id: Option<&str>, outcome: Outcome) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.take() {
            Some((pid, reply)) if id.is_none_or(|id| id == pid) => {
                let _ = reply.send(outcome);
                true
            }
            other => {
                *pending = other;
                false
            }
        }
    }
}

/// Lines the instance writes, to the server log with the request id they belong to; a line
/// longer than `MAX_LINE` is cut there (what follows is a line of its own), bytes that are not
/// UTF-8 are replaced, so no output can make the server hold more than a line.
pub(crate) async fn log_lines(mut out: Box<dyn AsyncRead + Send + Unpin>, api: Arc<Api>) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let emit = |line: &[u8]| {
        let request_id = api.request_id().unwrap_or_default();
        tracing::info!(function = %api.function, %request_id, "{}", String::from_utf8_lossy(line));
    };
    loop {
        let n = match out.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &chunk[..n] {
            if b == b'\n' {
                emit(&buf);
                buf.clear();
            } else {
                buf.push(b);
                if buf.len() >= MAX_LINE {
                    emit(&buf);
                    buf.clear();
                }
            }
        }
    }
    if !buf.is_empty() {
        emit(&buf);
    }
}

/// The uid owning the loopback socket that connected from `peer_port` to `local_port`, from
/// `/proc/net/tcp` (`None` where it cannot be read).
fn peer_uid(local_port: u16, peer_port: u16) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want_local = format!(":{peer_port:04X}");
    let want_remote = format!(":{local_port:04X}");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, uid) = (f.get(1)?, f.get(2)?, f.get(7)?);
        (local.ends_with(&want_local) && remote.ends_with(&want_remote))
            .then(|| uid.parse().ok())
            .flatten()
    })
}

fn own_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Serves the instance's runtime API until the instance ends.
/// Only loopback connections of the server's own user are served (another local user's
/// processes may not take or answer an instance's invocations), a few at a time, each with a
/// deadline for its request headers; the connections end with the server task.
pub(crate) async fn serve(listener: tokio::net::TcpListener, api: Arc<Api>) {
    let uid = own_uid();
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // Out of descriptors, say: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if !peer.ip().is_loopback() {
            continue;
        }
        if let Some(me) = uid
            && peer_uid(local_port, peer.port()).is_some_and(|theirs| theirs != me)
        {
            tracing::warn!(function = %api.function, "runtime API connection of another user refused");
            continue;
        }
        if api.connections.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            continue;
        }
        api.connections.fetch_add(1, Ordering::AcqRel);
        let api = api.clone();
        connections.spawn(async move {
            let svc = {
                let api = api.clone();
                hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(handle(&api, req).await) }
                })
            };
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            api.connections.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn accepted() -> Response<Full<Bytes>> {
    reply(StatusCode::ACCEPTED, serde_json::json!({"status": "OK"}))
}

fn invalid(kind: &str, message: &str, status: StatusCode) -> Response<Full<Bytes>> {
    reply(
        status,
        serde_json::json!({"errorMessage": message, "errorType": kind}),
    )
}

async fn handle(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let Some(rest) = path.strip_prefix("/2018-06-01/runtime/") else {
        return invalid("NotFound", "Not Found", StatusCode::NOT_FOUND);
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["invocation", "next"]) => next(api).await,
        ("POST", ["invocation", id, kind @ ("response" | "error")]) => {
            let id = (*id).to_owned();
            let error = *kind == "error";
            let body = match Limited::new(req.into_body(), MAX_RESPONSE).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    let outcome = Outcome::Error(Bytes::from(
                        serde_json::json!({"errorType": "Function.ResponseSizeTooLarge",
                            "errorMessage": format!("Response payload size exceeded maximum allowed payload size ({MAX_RESPONSE} bytes).")})
                        .to_string(),
                    ));
                    api.answer(Some(&id), outcome);
                    return invalid(
                        "RequestEntityTooLarge",
                        "The response is too large",
                        StatusCode::PAYLOAD_TOO_LARGE,
                    );
                }
            };
            let outcome = if error {
                Outcome::Error(body)
            } else {
                Outcome::Response(body)
            };
            if api.answer(Some(&id), outcome) {
                accepted()
            } else {
                invalid(
                    "InvalidRequestID",
                    "Invalid request ID",
                    StatusCode::BAD_REQUEST,
                )
            }
        }
        ("POST", ["init", "error"]) if api.started.load(Ordering::Acquire) => invalid(
            "Runtime.InvalidStateTransition",
            "The runtime has started",
            StatusCode::FORBIDDEN,
        ),
        ("POST", ["init", "error"]) => {
            let body = Limited::new(req.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body = if body.is_empty() {
                Bytes::from_static(br#"{"errorType":"Runtime.Unknown","errorMessage":"The runtime failed to start"}"#)
            } else {
                body
            };
            tracing::warn!(function = %api.function, error = %String::from_utf8_lossy(&body), "function init error");
            *api.init_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(body.clone());
            api.answer(None, Outcome::Error(body));
            accepted()
        }
        _ => invalid("NotFound", "Not Found", StatusCode::NOT_FOUND),
    }
}

/// Waits for the instance's next invocation and hands it out.
async fn next(api: &Api) -> Response<Full<Bytes>> {
    // One `next` at a time, and none while an invocation is handed out and unanswered.
    let handed_out = api
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some();
    if handed_out || api.polling.swap(true, Ordering::AcqRel) {
        return invalid(
            "Runtime.InvalidStateTransition",
            "An invocation is already being waited for or handled",
            StatusCode::FORBIDDEN,
        );
    }
    api.started.store(true, Ordering::Release);
    let _done = Unpoll(&api.polling);
    let mut rx = api.next.lock().await;
    let Some(inv) = rx.recv().await else {
        // The instance is being retired: the runtime should exit.
        return invalid(
            "Runtime.Stopped",
            "The instance is stopping",
            StatusCode::INTERNAL_SERVER_ERROR,
        );
    };
    drop(rx);
    let Invocation {
        id,
        payload,
        deadline_ms,
        arn,
        reply,
    } = inv;
    *api.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some((id.clone(), reply));
    let mut r = Response::new(Full::new(payload));
    let h = r.headers_mut();
    let mut set = |k: &'static str, v: String| {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set("lambda-runtime-aws-request-id", id.clone());
    set("lambda-runtime-deadline-ms", deadline_ms.to_string());
    set("lambda-runtime-invoked-function-arn", arn);
    set(
        "lambda-runtime-trace-id",
        format!(
            "Root=1-00000000-{};Sampled=0",
            &id.replace('-', "")[..24.min(id.len())]
        ),
    );
    set("content-type", "application/json".into());
    r
}

/// Clears the `next` flag however the request ends (answered, or its connection dropped).
struct Unpoll<'a>(&'a AtomicBool);

impl Drop for Unpoll<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
