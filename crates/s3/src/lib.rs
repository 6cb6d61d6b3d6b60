//! An S3-compatible object store, for what devices spend credential-provider credentials on
//! (firmware downloads, log uploads). The S3 REST API over HTTPS on its own port: path-style
//! and virtual-hosted addressing, SigV4 in a header or a presigned URL, payloads signed,
//! unsigned or streamed in signed or unsigned aws-chunked encoding with trailing checksums.
//! Every request is authorized by the caller's IAM policies on `arn:aws:s3:::bucket[/key]`;
//! buckets belong to one account and no other account reaches them (there are no bucket
//! policies or ACLs here, decision 0006).
//!
//! Module map: this file (addressing, authentication, routing, the request context `Op`),
//! `bucket`, `object` and `multipart` (the operations), `body` (reading and checking request
//! bodies), `error` (S3's error codes), `store` (disk layout, atomic writes, listings), `chunked`
//! and `checksum` (pure body decoding), `xml` (request bodies and response writers).

pub mod backend;
mod body;
mod bucket;
pub mod checksum;
pub mod chunked;
mod error;
mod multipart;
mod object;
mod ops;
pub mod remote;
pub mod store;
pub mod xml;

use self::body::*;
use self::bucket::*;
use self::error::*;
use self::multipart::*;
use self::object::*;
use self::ops::{Grant, Kind};

use std::convert::Infallible;
use std::io::{Seek, SeekFrom};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use md5::Digest as _;
use sekisho_auth::authn::{self, AuthFailure, Caller};
use sekisho_registry::Registry;
use sekisho_sigv4::SigError;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use self::checksum::{Algorithm, Hasher};
use self::chunked::{ChunkError, ChunkSigner, Decoder};
use self::store::{MAX_KEY_LEN, MAX_PART_NUMBER, MAX_PUT_SIZE, ObjectMeta, Store, StoreError};
use self::xml::{el, esc};

/// Where the store is reached: virtual-hosted requests name `<bucket>.s3.<region>.<domain>`.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Region, e.g. `us-east-1`.
    pub region: String,
    /// Base domain, e.g. `localhost`.
    pub domain: String,
}

use sekisho_auth::http::parse_query;

/// Serves the object store over HTTPS on `listener` until shutdown (at most
/// [`sekisho_auth::http::MAX_HTTPS_CONNECTIONS`] connections at once).
pub async fn serve(
    state: Arc<S3State>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    sekisho_auth::http::serve_https(
        listener,
        tls,
        shutdown,
        "S3",
        sekisho_auth::http::MAX_HTTPS_CONNECTIONS,
        move |peer, req| handle(state.clone(), peer, req),
    )
    .await
}

/// Largest XML request body (DeleteObjects, CompleteMultipartUpload, CreateBucket).
pub const MAX_XML_BODY: u64 = 4 * 1024 * 1024;
/// Most user metadata (`x-amz-meta-*` names and values), in bytes, as S3.
pub const MAX_USER_METADATA: usize = 2048;
/// Most buckets per account.
pub const MAX_BUCKETS: usize = 10_000;
/// Longest wait for the next piece of a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// A response body: in memory or streamed from a file.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// What the S3 endpoint works on.
pub struct S3State {
    /// Registry (callers and their IAM policies).
    pub registry: Arc<Registry>,
    /// Buckets and objects.
    pub store: Arc<Store>,
    /// Region and domain: virtual-hosted requests name `<bucket>.s3.<region>.<domain>`.
    pub endpoints: Endpoints,
    /// How many multipart uploads an account may have in progress.
    pub max_uploads: Box<dyn Fn(&str) -> usize + Send + Sync>,
}

/// How the request body is protected.
enum Payload {
    /// `UNSIGNED-PAYLOAD` (and presigned URLs).
    Unsigned,
    /// The SHA-256 the signature covers, checked once the body is read.
    Sha256(String),
    /// aws-chunked; signed chunks carry a signer.
    Chunked(Option<ChunkSigner>),
}

/// One authenticated request.
struct Op<'a> {
    state: &'a S3State,
    caller: Caller,
    peer: SocketAddr,
    method: Method,
    headers: HeaderMap,
    query: Vec<(String, String)>,
    payload: Payload,
    host: String,
    /// The incarnation of each bucket this request was authorized on, as first looked up.
    incarnations: std::sync::Mutex<Vec<(String, u64)>>,
}

impl Op<'_> {
    fn q(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Runs blocking store work (file I/O, syncs) off the async threads.
    async fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.state.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e))))
    }

    /// The bucket's owner, or NoSuchBucket; AccessDenied when the caller expects another
    /// owner (`x-amz-expected-bucket-owner`).
    fn owner(&self, bucket: &str) -> Result<String, S3Error> {
        let (owner, incarnation) = self
            .state
            .store
            .bucket_ref(bucket)
            .ok_or_else(|| no_such_bucket(bucket))?;
        {
            let mut seen = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
            if !seen.iter().any(|(b, _)| b == bucket) {
                seen.push((bucket.to_owned(), incarnation));
            }
        }
        match self.header("x-amz-expected-bucket-owner") {
            Some(expected) if expected != owner => Err(access_denied()),
            _ => Ok(owner),
        }
    }

    /// The incarnation of `bucket` this request was authorized on: writes commit only into
    /// it (0, which no bucket has, if the bucket was never looked up).
    fn incarnation(&self, bucket: &str) -> u64 {
        self.incarnations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(b, _)| b == bucket)
            .map_or(0, |(_, i)| *i)
    }

    /// What a write requires of the object it replaces: `If-None-Match: *` (none) or
    /// `If-Match` (one of these ETags).
    fn write_condition(&self) -> store::Condition {
        if self
            .header("if-none-match")
            .is_some_and(|v| v.trim() == "*")
        {
            store::Condition::Absent
        } else if let Some(m) = self.header("if-match") {
            store::Condition::Matches(m.split(',').map(|e| e.trim().to_owned()).collect())
        } else {
            store::Condition::None
        }
    }

    fn permits(&self, owner: &str, action: &str, resource: &str, extra: &[(&str, String)]) -> bool {
        let request = authn::RequestContext {
            region: Some(self.state.endpoints.region.clone()),
            ..authn::RequestContext::tls(self.peer.ip(), None, now() as i64)
        };
        self.caller.account == owner
            && authn::is_authorized(
                &self.state.registry,
                &self.caller,
                &request,
                action,
                resource,
                extra,
            )
    }

    /// The answer for a key that is not there: as S3, only a caller who may list the bucket
    /// learns that it is absent (NoSuchKey); others get AccessDenied.
    fn missing_key(&self, owner: &str, bucket: &str, key: &str) -> S3Error {
        if self.permits(owner, "s3:ListBucket", &bucket_arn(bucket), &[]) {
            S3Error::new(404, "NoSuchKey", "The specified key does not exist.").with("Key", key)
        } else {
            access_denied()
        }
    }

    /// Authorizes `action` on `resource` in a bucket owned by `owner`, or AccessDenied.
    fn allow(
        &self,
        owner: &str,
        action: &str,
        resource: &str,
        extra: &[(&str, String)],
    ) -> Result<(), S3Error> {
        if self.permits(owner, action, resource, extra) {
            return Ok(());
        }
        let why = if self.caller.account == owner {
            "no identity-based policy"
        } else {
            "no resource-based policy"
        };
        tracing::info!(caller = %self.caller.arn(), action, resource, "S3 request denied");
        Err(S3Error::new(
            403,
            "AccessDenied",
            format!(
                "User: {} is not authorized to perform: {action} on resource: \"{resource}\" because {why} allows the {action} action",
                self.caller.arn()
            ),
        ))
    }
}

fn bucket_arn(bucket: &str) -> String {
    format!("arn:aws:s3:::{bucket}")
}

fn object_arn(bucket: &str, key: &str) -> String {
    format!("arn:aws:s3:::{bucket}/{key}")
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn respond(status: u16, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r
}

fn set(r: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

fn xml_ok(body: String) -> Response<Body> {
    let mut r = respond(
        200,
        full(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{body}"
        )),
    );
    set(&mut r, "content-type", "application/xml");
    r
}

fn error_response(e: &S3Error, head: bool, request_id: &str) -> Response<Body> {
    if head {
        return respond(e.status, empty());
    }
    let extra: String = e.extra.iter().map(|(k, v)| el(k, v)).collect();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message>{extra}<RequestId>{request_id}</RequestId></Error>",
        e.code,
        esc(&e.message)
    );
    let mut r = respond(e.status, full(body));
    set(&mut r, "content-type", "application/xml");
    r
}

/// Handles one S3 request.
pub async fn handle(
    state: Arc<S3State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let request_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_ascii_uppercase();
    let head = req.method() == Method::HEAD;
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let mut resp = match serve_one(&state, peer, req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%method, %path, code = e.code, message = %e.message, "S3 request refused");
            error_response(&e, head, &request_id)
        }
    };
    set(&mut resp, "x-amz-request-id", &request_id);
    Ok(resp)
}

/// The bucket and key a request addresses: virtual-hosted (`<bucket>.s3.<region>.<domain>`)
/// or path-style (`/<bucket>/<key>`).
fn address(ep: &Endpoints, host: &str, path: &str) -> Result<Address, S3Error> {
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    }
    .to_ascii_lowercase();
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| S3Error::new(400, "InvalidURI", "Couldn't parse the specified URI."))
    };
    let rest = path.strip_prefix('/').unwrap_or(path);
    let suffix = format!(".s3.{}.{}", ep.region, ep.domain);
    if let Some(b) = host.strip_suffix(&suffix).filter(|b| !b.is_empty()) {
        let key = if rest.is_empty() {
            None
        } else {
            Some(decode(rest)?)
        };
        return Ok(Address {
            bucket: Some(b.to_owned()),
            key,
            resource: format!("/{b}{path}"),
        });
    }
    if rest.is_empty() {
        return Ok(Address {
            bucket: None,
            key: None,
            resource: path.to_owned(),
        });
    }
    let (b, k) = rest.split_once('/').unwrap_or((rest, ""));
    let key = if k.is_empty() { None } else { Some(decode(k)?) };
    Ok(Address {
        bucket: Some(decode(b)?),
        key,
        resource: path.to_owned(),
    })
}

/// What a request addresses.
#[derive(Debug, PartialEq)]
struct Address {
    bucket: Option<String>,
    key: Option<String>,
    /// `/<bucket>/<key>` as encoded on the wire, whatever the addressing (SigV2 signs it).
    resource: String,
}

/// Authenticates with SigV4 (header or presigned) and says how the body is protected.
fn authenticate(
    state: &S3State,
    method: &str,
    path: &str,
    raw_query: &str,
    headers: &[(String, String)],
    presigned: bool,
) -> Result<(Caller, Payload), S3Error> {
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    if !presigned && header("authorization").is_none() {
        // Anonymous requests: nothing here is public.
        return Err(access_denied());
    }
    let claimed = match header("x-amz-content-sha256") {
        Some(h) => h,
        None if presigned => "UNSIGNED-PAYLOAD",
        None => {
            return Err(S3Error::new(
                400,
                "InvalidRequest",
                "Missing required header for this request: x-amz-content-sha256",
            ));
        }
    };
    let sreq = sekisho_sigv4::Request {
        method,
        path,
        query: raw_query,
        headers,
        // The signature covers the claimed hash; the body is checked against it as it arrives.
        body_sha256: claimed,
    };
    // Parsed once: the claim is verified, then (aws-chunked) seeds the chunk signer.
    let fail = |f| auth_error(f, &state.endpoints.region, presigned);
    let claim = sekisho_sigv4::parse(&sreq).map_err(|e| fail(AuthFailure::Signature(e)))?;
    authn::precheck(&state.registry, &claim, &["s3"]).map_err(fail)?;
    let (caller, _) = authn::verify_claim(
        &state.registry,
        &state.endpoints.region,
        &sreq,
        claim.clone(),
        sekisho_sigv4::Options {
            s3: true,
            token_outside_signature: false,
        },
    )
    .map_err(fail)?;
    let signer = || -> Result<ChunkSigner, S3Error> {
        let claim = claim.clone();
        let cred = state
            .registry
            .credential(&claim.access_key)
            .ok_or_else(access_denied)?;
        Ok(ChunkSigner {
            key: sekisho_sigv4::signing_key(
                &cred.secret_access_key,
                &claim.date,
                &claim.region,
                &claim.service,
            ),
            amz_date: claim.amz_date.clone(),
            scope: claim.scope(),
            previous: claim.signature,
        })
    };
    let payload = match claimed {
        "UNSIGNED-PAYLOAD" => Payload::Unsigned,
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER" => Payload::Chunked(None),
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD" | "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER" => {
            Payload::Chunked(Some(signer()?))
        }
        h if h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()) => {
            Payload::Sha256(h.to_ascii_lowercase())
        }
        _ => {
            return Err(invalid_argument(
                "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER or a valid sha256 value.",
                "x-amz-content-sha256",
                claimed,
            ));
        }
    };
    Ok((caller, payload))
}

/// Query parameters that select an S3 sub-resource (what is not listed is a plain parameter).
const SUBRESOURCES: &[&str] = &[
    "accelerate",
    "acl",
    "analytics",
    "attributes",
    "cors",
    "delete",
    "encryption",
    "intelligent-tiering",
    "inventory",
    "legal-hold",
    "lifecycle",
    "location",
    "logging",
    "metadataConfiguration",
    "metrics",
    "notification",
    "object-lock",
    "ownershipControls",
    "partNumber",
    "policy",
    "policyStatus",
    "publicAccessBlock",
    "renameObject",
    "replication",
    "requestPayment",
    "restore",
    "retention",
    "select",
    "session",
    "tagging",
    "torrent",
    "uploadId",
    "uploads",
    "versionId",
    "versioning",
    "versions",
    "website",
];

async fn serve_one(
    state: &S3State,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, S3Error> {
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path().to_owned();
    let raw_query = parts.uri.query().unwrap_or("").to_owned();
    let query = parse_query(&raw_query);
    let host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.host())
        .unwrap_or("")
        .to_owned();
    let addressed = address(&state.endpoints, &host, &raw_path)?;
    let resource = addressed.resource.clone();
    let headers = authn::header_pairs(&parts.headers);
    let presigned = query.iter().any(|(k, _)| k == "X-Amz-Credential");
    let v2 = !presigned
        && query.iter().any(|(k, _)| k == "AWSAccessKeyId")
        && !parts.headers.contains_key("authorization");
    let (caller, payload) = if v2 {
        let sreq = sekisho_sigv4::Request {
            method: parts.method.as_str(),
            path: &raw_path,
            query: &raw_query,
            headers: &headers,
            body_sha256: "UNSIGNED-PAYLOAD",
        };
        let caller = authn::authenticate_v2_presigned(&state.registry, &sreq, &resource)
            .map_err(|f| auth_error(f, &state.endpoints.region, true))?;
        (caller, Payload::Unsigned)
    } else {
        authenticate(
            state,
            parts.method.as_str(),
            &raw_path,
            &raw_query,
            &headers,
            presigned,
        )?
    };
    let subs = ops::subresources(&query)?;
    let mut headers = parts.headers;
    if v2 {
        // A SigV2 presigned URL carries signed x-amz-* values in its query (botocore moves
        // them there): S3 acts on them as headers. The signature covered every value of each
        // name, so a name sent both ways was refused above unless signed so.
        for (k, v) in &query {
            let name = k.to_ascii_lowercase();
            if name.starts_with("x-amz-")
                && name != "x-amz-security-token"
                && !headers.contains_key(name.as_str())
                && let (Ok(n), Ok(v)) = (
                    hyper::header::HeaderName::from_bytes(name.as_bytes()),
                    hyper::header::HeaderValue::from_str(v),
                )
            {
                headers.insert(n, v);
            }
        }
    }
    let op = Op {
        state,
        caller,
        peer,
        method: parts.method,
        headers,
        query,
        payload,
        host,
        incarnations: Default::default(),
    };
    let planned = ops::plan(
        &op.method,
        addressed,
        &subs,
        op.headers.contains_key("x-amz-copy-source"),
    )?;
    // The resource authorized is built from the bucket and key the handler receives.
    let operation = planned.operation;
    let resource = planned.resource();
    let extra = (operation.context)(&op.query);
    let (bucket, key) = (planned.bucket.as_str(), planned.key.as_str());
    tracing::trace!(operation = operation.name, %resource, "S3 operation");
    let owner = match operation.grant {
        Grant::Owned => {
            let owner = op.owner(bucket)?;
            op.allow(&owner, operation.action, &resource, &extra)?;
            owner
        }
        Grant::OwnAccount => {
            op.allow(&op.caller.account, operation.action, &resource, &extra)?;
            op.caller.account.clone()
        }
        Grant::PerElement => {
            let owner = op.owner(bucket)?;
            // Nobody outside the bucket's account may make us read a body at all (there are
            // no bucket policies, so another account can act on nothing in it).
            if op.caller.account != owner {
                return Err(access_denied());
            }
            owner
        }
    };
    match operation.kind {
        Kind::ListBuckets => list_buckets(&op),
        Kind::CreateBucket => create_bucket(&op, bucket, body).await,
        Kind::DeleteBucket => delete_bucket(&op, bucket),
        Kind::HeadBucket => head_bucket(&op),
        Kind::GetBucketLocation => bucket_location(&op),
        Kind::ListObjects => list_objects(&op, bucket, &owner),
        Kind::ListMultipartUploads => list_uploads(&op, bucket),
        Kind::DeleteObjects => delete_objects(&op, bucket, &owner, body).await,
        Kind::GetObject => get_object(&op, bucket, key, &owner, false).await,
        Kind::HeadObject => get_object(&op, bucket, key, &owner, true).await,
        Kind::PutObject => put_object(&op, bucket, key, body).await,
        Kind::CopyObject => copy_object(&op, bucket, key).await,
        Kind::DeleteObject => delete_object(&op, bucket, key),
        Kind::CreateMultipartUpload => create_upload(&op, bucket, key).await,
        Kind::UploadPart => upload_part(&op, bucket, key, body).await,
        Kind::CompleteMultipartUpload => complete_upload(&op, bucket, key, body).await,
        Kind::AbortMultipartUpload => abort_upload(&op, bucket, key),
        Kind::ListParts => list_parts(&op, bucket, key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing() {
        let ep = Endpoints {
            region: "us-east-1".into(),
            domain: "localhost".into(),
        };
        let a = |h: &str, p: &str| {
            let a = address(&ep, h, p).unwrap();
            (a.bucket, a.key)
        };
        assert_eq!(a("localhost:9444", "/"), (None, None));
        assert_eq!(a("localhost:9444", "/b"), (Some("b".into()), None));
        assert_eq!(a("localhost", "/b/"), (Some("b".into()), None));
        assert_eq!(
            a("127.0.0.1:1", "/b/dir/a%20b%2Bc"),
            (Some("b".into()), Some("dir/a b+c".into()))
        );
        assert_eq!(
            a("b.s3.us-east-1.localhost:9444", "/k/x"),
            (Some("b".into()), Some("k/x".into()))
        );
        assert_eq!(a("B.S3.us-east-1.localhost", "/"), (Some("b".into()), None));
        assert_eq!(
            a("[::1]:9444", "/b/k"),
            (Some("b".into()), Some("k".into()))
        );
        assert!(address(&ep, "localhost", "/b/%ff").is_err());
        assert_eq!(
            address(&ep, "b.s3.us-east-1.localhost", "/k%20x")
                .unwrap()
                .resource,
            "/b/k%20x"
        );
        assert_eq!(
            address(&ep, "localhost", "/b/k%20x").unwrap().resource,
            "/b/k%20x"
        );
    }

    /// Temporary credentials (as the credential provider hands out) stop working at their
    /// expiry, with S3's ExpiredToken; before it, they need their session token.
    #[test]
    fn expired_credentials_are_refused() {
        let registry = Registry::in_memory("us-east-1").unwrap();
        let (info, _) = registry.create_account("a").unwrap();
        let dir = std::env::temp_dir().join(format!("sekisho-s3-auth-{}", uuid::Uuid::new_v4()));
        let state = S3State {
            registry: Arc::new(registry),
            store: Arc::new(Store::open(&dir).unwrap()),
            endpoints: Endpoints {
                region: "us-east-1".into(),
                domain: "localhost".into(),
            },
            max_uploads: Box::new(|_| 1000),
        };
        let session = state
            .registry
            .create_session(&info.id, sekisho_registry::IamPrincipal::Root, 1, None)
            .unwrap();
        let check = |token: &str| {
            let amz_date = time::OffsetDateTime::now_utc()
                .format(time::macros::format_description!(
                    "[year][month][day]T[hour][minute][second]Z"
                ))
                .unwrap();
            let mut headers = vec![
                ("host".to_string(), "localhost".to_string()),
                ("x-amz-date".to_string(), amz_date.clone()),
                (
                    "x-amz-content-sha256".to_string(),
                    "UNSIGNED-PAYLOAD".to_string(),
                ),
                ("x-amz-security-token".to_string(), token.to_string()),
            ];
            let req = sekisho_sigv4::Request {
                method: "GET",
                path: "/b/k",
                query: "",
                headers: &headers,
                body_sha256: "UNSIGNED-PAYLOAD",
            };
            let auth = sekisho_sigv4::sign_header(
                &req,
                &session.access_key_id,
                &session.secret_access_key,
                "us-east-1",
                "s3",
                &amz_date,
                &[
                    "host",
                    "x-amz-content-sha256",
                    "x-amz-date",
                    "x-amz-security-token",
                ],
            );
            headers.push(("authorization".to_string(), auth));
            authenticate(&state, "GET", "/b/k", "", &headers, false)
                .map(|(c, _)| c.account)
                .map_err(|e| (e.status, e.code))
        };
        assert_eq!(check(&session.token), Ok(info.id.clone()));
        assert_eq!(check("forged"), Err((403, "InvalidAccessKeyId")));
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(check(&session.token), Err((400, "ExpiredToken")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
