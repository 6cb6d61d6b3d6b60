//! An S3-compatible object store, for what devices spend credential-provider credentials on
//! (firmware downloads, log uploads). The S3 REST API over HTTPS on its own port: path-style
//! and virtual-hosted addressing, SigV4 in a header or a presigned URL, payloads signed,
//! unsigned or streamed in signed or unsigned aws-chunked encoding with trailing checksums.
//! Every request is authorized by the caller's IAM policies on `arn:aws:s3:::bucket[/key]`;
//! buckets belong to one account and no other account reaches them (there are no bucket
//! policies or ACLs here, decision 0006).
//!
//! Module map: `store` (disk layout, atomic writes, listings), `chunked` and `checksum` (pure
//! body decoding), `xml` (request bodies and response writers), this file (routing, auth,
//! operations).

pub mod checksum;
pub mod chunked;
pub mod store;
pub mod xml;

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
use sekisho_gateway::authn::{self, AuthFailure, Caller};
use sekisho_registry::Registry;
use sekisho_sigv4::SigError;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use self::checksum::{Algorithm, Hasher};
use self::chunked::{ChunkError, ChunkSigner, Decoder};
use self::store::{MAX_KEY_LEN, MAX_PART_NUMBER, MAX_PUT_SIZE, ObjectMeta, Store, StoreError};
use self::xml::{el, esc};
use crate::Endpoints;

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
}

/// An S3 error: status, code, message and extra elements.
#[derive(Debug)]
pub struct S3Error {
    status: u16,
    code: &'static str,
    message: String,
    extra: Vec<(&'static str, String)>,
}

impl S3Error {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> S3Error {
        S3Error {
            status,
            code,
            message: message.into(),
            extra: Vec::new(),
        }
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> S3Error {
        self.extra.push((name, value.into()));
        self
    }
}

fn access_denied() -> S3Error {
    S3Error::new(403, "AccessDenied", "Access Denied")
}

fn internal(e: impl std::fmt::Display) -> S3Error {
    tracing::error!(error = %e, "S3 request failed inside");
    S3Error::new(
        500,
        "InternalError",
        "We encountered an internal error. Please try again.",
    )
}

fn not_implemented() -> S3Error {
    S3Error::new(
        501,
        "NotImplemented",
        "A header or query you provided requested a function that is not implemented.",
    )
}

fn malformed_xml() -> S3Error {
    S3Error::new(
        400,
        "MalformedXML",
        "The XML you provided was not well-formed or did not validate against our published schema",
    )
}

/// `InvalidArgument` naming the argument and its value.
fn invalid_argument(message: &str, name: &str, value: &str) -> S3Error {
    S3Error::new(400, "InvalidArgument", message)
        .with("ArgumentName", name)
        .with("ArgumentValue", value)
}

fn no_such_upload(id: &str) -> S3Error {
    S3Error::new(
        404,
        "NoSuchUpload",
        "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.",
    )
    .with("UploadId", id)
}

fn too_large(max: u64) -> S3Error {
    S3Error::new(
        400,
        "EntityTooLarge",
        "Your proposed upload exceeds the maximum allowed size",
    )
    .with("MaxSizeAllowed", max.to_string())
}

fn store_error(e: StoreError, bucket: &str) -> S3Error {
    match e {
        StoreError::NoSuchBucket => no_such_bucket(bucket),
        StoreError::BucketExists { owned: true } => S3Error::new(
            409,
            "BucketAlreadyOwnedByYou",
            "Your previous request to create the named bucket succeeded and you already own it.",
        )
        .with("BucketName", bucket),
        StoreError::BucketExists { owned: false } => S3Error::new(
            409,
            "BucketAlreadyExists",
            "The requested bucket name is not available. The bucket namespace is shared by all users of the system. Please select a different name and try again.",
        )
        .with("BucketName", bucket),
        StoreError::BucketNotEmpty => S3Error::new(
            409,
            "BucketNotEmpty",
            "The bucket you tried to delete is not empty",
        )
        .with("BucketName", bucket),
        StoreError::NoSuchUpload => no_such_upload(""),
        StoreError::InvalidPart(n) => S3Error::new(
            400,
            "InvalidPart",
            "One or more of the specified parts could not be found.  The part may not have been uploaded, or the specified entity tag may not match the part's entity tag.",
        )
        .with("PartNumber", n.to_string()),
        StoreError::InvalidPartOrder => S3Error::new(
            400,
            "InvalidPartOrder",
            "The list of parts was not in ascending order. Parts must be ordered by part number.",
        ),
        StoreError::PreconditionFailed => S3Error::new(
            412,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        ),
        StoreError::NoSuchKey => {
            S3Error::new(404, "NoSuchKey", "The specified key does not exist.")
        }
        StoreError::EntityTooSmall => S3Error::new(
            400,
            "EntityTooSmall",
            "Your proposed upload is smaller than the minimum allowed object size.",
        ),
        StoreError::Io(e) => internal(e),
    }
}

/// A store error during a multipart upload: NoSuchUpload names the upload.
fn upload_error(e: StoreError, id: &str, bucket: &str) -> S3Error {
    match e {
        StoreError::NoSuchUpload => no_such_upload(id),
        e => store_error(e, bucket),
    }
}

fn no_such_bucket(bucket: &str) -> S3Error {
    S3Error::new(404, "NoSuchBucket", "The specified bucket does not exist")
        .with("BucketName", bucket)
}

fn auth_error(f: AuthFailure, region: &str, presigned: bool) -> S3Error {
    match f {
        AuthFailure::Signature(SigError::Missing) => access_denied(),
        AuthFailure::Signature(SigError::Incomplete(m)) => {
            if presigned {
                S3Error::new(400, "AuthorizationQueryParametersError", m)
            } else {
                S3Error::new(400, "AuthorizationHeaderMalformed", m)
            }
        }
        AuthFailure::Signature(SigError::Mismatch) => S3Error::new(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your key and signing method.",
        ),
        AuthFailure::Signature(SigError::Skewed(t)) => S3Error::new(
            403,
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
        )
        .with("RequestTime", t),
        AuthFailure::Signature(SigError::Expired) => {
            S3Error::new(403, "AccessDenied", "Request has expired")
        }
        AuthFailure::Signature(SigError::PayloadHash) => sha_mismatch(),
        AuthFailure::UnknownKey => S3Error::new(
            403,
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
        ),
        AuthFailure::Expired => {
            S3Error::new(400, "ExpiredToken", "The provided token has expired.")
        }
        AuthFailure::Service(s) => S3Error::new(
            400,
            "AuthorizationHeaderMalformed",
            format!(
                "The authorization header is malformed; incorrect service \"{s}\". This endpoint belongs to \"s3\"."
            ),
        ),
        AuthFailure::Region(r) => S3Error::new(
            400,
            "AuthorizationHeaderMalformed",
            format!(
                "The authorization header is malformed; the region '{r}' is wrong; expecting '{region}'"
            ),
        )
        .with("Region", region),
    }
}

fn sha_mismatch() -> S3Error {
    S3Error::new(
        400,
        "XAmzContentSHA256Mismatch",
        "The provided 'x-amz-content-sha256' header does not match what was computed.",
    )
}

fn chunk_error(e: ChunkError) -> S3Error {
    match e {
        ChunkError::Signature => S3Error::new(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your key and signing method.",
        ),
        ChunkError::Malformed(m) => S3Error::new(400, "IncompleteBody", m),
    }
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

    /// The bucket's owner, once `action` on `resource` in it is authorized.
    fn authorize(&self, bucket: &str, action: &str, resource: &str) -> Result<String, S3Error> {
        let owner = self.owner(bucket)?;
        self.allow(&owner, action, resource, &[])?;
        Ok(owner)
    }

    /// The bucket's owner, or NoSuchBucket; AccessDenied when the caller expects another
    /// owner (`x-amz-expected-bucket-owner`).
    fn owner(&self, bucket: &str) -> Result<String, S3Error> {
        let owner = self
            .state
            .store
            .bucket_owner(bucket)
            .ok_or_else(|| no_such_bucket(bucket))?;
        match self.header("x-amz-expected-bucket-owner") {
            Some(expected) if expected != owner => Err(access_denied()),
            _ => Ok(owner),
        }
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
        let mut ctx = vec![
            ("aws:SourceIp", self.peer.ip().to_string()),
            ("aws:SecureTransport", "true".to_string()),
        ];
        ctx.extend(extra.iter().cloned());
        self.caller.account == owner
            && authn::is_authorized_in(&self.state.registry, &self.caller, action, resource, &ctx)
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
    let (caller, _) = authn::authenticate(
        &state.registry,
        &state.endpoints.region,
        &sreq,
        &["s3"],
        sekisho_sigv4::Options {
            s3: true,
            token_outside_signature: false,
        },
    )
    .map_err(|f| auth_error(f, &state.endpoints.region, presigned))?;
    let signer = || -> Result<ChunkSigner, S3Error> {
        let claim = sekisho_sigv4::parse(&sreq).map_err(|_| access_denied())?;
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
    let query = crate::parse_query(&raw_query);
    let host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.host())
        .unwrap_or("")
        .to_owned();
    let Address {
        bucket,
        key,
        resource,
    } = address(&state.endpoints, &host, &raw_path)?;
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
    let mut subs: Vec<&str> = query
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| SUBRESOURCES.contains(k))
        .collect();
    subs.sort_unstable();
    subs.dedup();
    let subs = subs.join(",");
    let op = Op {
        state,
        caller,
        peer,
        method: parts.method,
        headers: parts.headers,
        query,
        payload,
        host,
    };
    let Some(bucket) = bucket else {
        return match (&op.method, subs.as_str()) {
            (&Method::GET, "") => list_buckets(&op),
            _ => Err(S3Error::new(
                405,
                "MethodNotAllowed",
                "The specified method is not allowed against this resource.",
            )),
        };
    };
    match key {
        None => match (op.method.clone(), subs.as_str()) {
            (Method::GET, "") => list_objects(&op, &bucket),
            (Method::GET, "location") => bucket_location(&op, &bucket),
            (Method::GET, "uploads") => list_uploads(&op, &bucket),
            (Method::PUT, "") => create_bucket(&op, &bucket, body).await,
            (Method::DELETE, "") => delete_bucket(&op, &bucket),
            (Method::HEAD, "") => head_bucket(&op, &bucket),
            (Method::POST, "delete") => delete_objects(&op, &bucket, body).await,
            _ => Err(not_implemented()),
        },
        Some(key) => {
            if key.len() > MAX_KEY_LEN {
                return Err(S3Error::new(400, "KeyTooLongError", "Your key is too long")
                    .with("MaxSizeAllowed", MAX_KEY_LEN.to_string())
                    .with("Size", key.len().to_string()));
            }
            match (op.method.clone(), subs.as_str()) {
                (Method::GET, "") => get_object(&op, &bucket, &key, false).await,
                (Method::HEAD, "") => get_object(&op, &bucket, &key, true).await,
                (Method::PUT, "") if op.headers.contains_key("x-amz-copy-source") => {
                    copy_object(&op, &bucket, &key).await
                }
                (Method::PUT, "") => put_object(&op, &bucket, &key, body).await,
                (Method::DELETE, "") => delete_object(&op, &bucket, &key),
                (Method::POST, "uploads") => create_upload(&op, &bucket, &key).await,
                (Method::PUT, "partNumber,uploadId") => upload_part(&op, &bucket, &key, body).await,
                (Method::POST, "uploadId") => complete_upload(&op, &bucket, &key, body).await,
                (Method::DELETE, "uploadId") => abort_upload(&op, &bucket, &key),
                (Method::GET, "uploadId") => list_parts(&op, &bucket, &key),
                _ => Err(not_implemented()),
            }
        }
    }
}

/// Where a received body went.
struct Received {
    tmp: Option<store::TempFile>,
    data: Vec<u8>,
    size: u64,
    md5: String,
    checksum: Option<(Algorithm, String)>,
}

/// Which checksum the request carries: at most one `x-amz-checksum-*` header, or one named by
/// `x-amz-trailer`. Returns the algorithm and the value when given as a header.
fn requested_checksum(op: &Op<'_>) -> Result<Option<(Algorithm, Option<String>)>, S3Error> {
    let mut found = None;
    for (name, value) in op.headers.iter() {
        let name = name.as_str();
        if let Some(rest) = name.strip_prefix("x-amz-checksum-") {
            if rest == "algorithm" || rest == "type" || rest == "mode" {
                continue;
            }
            let a = Algorithm::from_header(name).ok_or_else(|| {
                S3Error::new(
                    400,
                    "InvalidRequest",
                    format!("Unsupported checksum header {name}"),
                )
            })?;
            if found.is_some() {
                return Err(S3Error::new(
                    400,
                    "InvalidRequest",
                    "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.",
                ));
            }
            found = Some((a, Some(value.to_str().unwrap_or("").to_owned())));
        }
    }
    if let Some(t) = op.header("x-amz-trailer") {
        let a = Algorithm::from_header(t.trim()).ok_or_else(|| {
            S3Error::new(400, "InvalidRequest", format!("Unsupported trailer {t}"))
        })?;
        if found.is_some() {
            return Err(S3Error::new(
                400,
                "InvalidRequest",
                "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.",
            ));
        }
        if !matches!(op.payload, Payload::Chunked(_)) {
            return Err(S3Error::new(
                400,
                "InvalidRequest",
                "x-amz-trailer needs an aws-chunked body",
            ));
        }
        found = Some((a, None));
    }
    Ok(found)
}

/// Reads the request body, to a temporary file (`to_file`) or to memory, at most `max` bytes,
/// checking everything the request claims about it: its SHA-256, chunk signatures, length,
/// Content-MD5 and checksum. Nothing is kept unless every check passes.
async fn receive(
    op: &Op<'_>,
    mut body: Incoming,
    max: u64,
    to_file: bool,
) -> Result<Received, S3Error> {
    let parse_len = |name: &str| -> Result<Option<u64>, S3Error> {
        match op.header(name) {
            None => Ok(None),
            Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                S3Error::new(400, "InvalidArgument", format!("{name} is not a number"))
            }),
        }
    };
    let declared = match op.payload {
        Payload::Chunked(_) => {
            Some(parse_len("x-amz-decoded-content-length")?.ok_or_else(|| {
                S3Error::new(
                    411,
                    "MissingContentLength",
                    "You must provide the Content-Length HTTP header.",
                )
            })?)
        }
        _ => parse_len("content-length")?,
    };
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    let checksum = requested_checksum(op)?;
    let content_md5 = match op.header("content-md5") {
        None => None,
        Some(v) => Some(
            B64.decode(v.trim())
                .ok()
                .filter(|d| d.len() == 16)
                .ok_or_else(|| {
                    S3Error::new(
                        400,
                        "InvalidDigest",
                        "The Content-MD5 you specified was invalid.",
                    )
                })?,
        ),
    };
    let mut tmp = if to_file {
        Some(op.state.store.temp().map_err(internal)?)
    } else {
        None
    };
    let mut file = match &mut tmp {
        Some(t) => Some(tokio::fs::File::from_std(
            t.file().and_then(|f| f.try_clone()).map_err(internal)?,
        )),
        None => None,
    };
    let mut md5 = md5::Md5::new();
    let mut sha = match &op.payload {
        Payload::Sha256(_) => Some(digest::Context::new(&digest::SHA256)),
        _ => None,
    };
    let mut ck = checksum.as_ref().map(|(a, _)| Hasher::new(*a));
    let mut decoder = match &op.payload {
        Payload::Chunked(signer) => Some(Decoder::new(signer.clone())),
        _ => None,
    };
    let mut data = Vec::new();
    let mut size = 0u64;
    let mut decoded = Vec::new();
    loop {
        let frame = match tokio::time::timeout(BODY_TIMEOUT, body.frame()).await {
            Err(_) => {
                return Err(S3Error::new(
                    400,
                    "RequestTimeout",
                    "Your socket connection to the server was not read from or written to within the timeout period. Idle connections will be closed.",
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(S3Error::new(
                    400,
                    "IncompleteBody",
                    format!("The request body could not be read: {e}"),
                ));
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        if let Some(s) = &mut sha {
            s.update(&chunk);
        }
        let piece: &[u8] = match &mut decoder {
            Some(d) => {
                decoded.clear();
                d.feed(&chunk, &mut decoded).map_err(chunk_error)?;
                &decoded
            }
            None => &chunk,
        };
        size += piece.len() as u64;
        if size > max {
            return Err(too_large(max));
        }
        md5.update(piece);
        if let Some(h) = &mut ck {
            h.update(piece);
        }
        match &mut file {
            Some(f) => f.write_all(piece).await.map_err(internal)?,
            None => data.extend_from_slice(piece),
        }
    }
    if let Some(f) = &mut file {
        f.flush().await.map_err(internal)?;
    }
    let trailers = match decoder {
        Some(d) => d.finish().map_err(chunk_error)?,
        None => Vec::new(),
    };
    if declared.is_some_and(|n| n != size) {
        return Err(S3Error::new(
            400,
            "IncompleteBody",
            "You did not provide the number of bytes specified by the Content-Length HTTP header.",
        ));
    }
    if let (Some(s), Payload::Sha256(claimed)) = (sha, &op.payload) {
        let computed = hex::encode(s.finish());
        if &computed != claimed {
            return Err(sha_mismatch()
                .with("ClientComputedContentSHA256", claimed.clone())
                .with("S3ComputedContentSHA256", computed));
        }
    }
    let md5 = md5.finalize();
    if content_md5.is_some_and(|m| m[..] != md5[..]) {
        return Err(S3Error::new(
            400,
            "BadDigest",
            "The Content-MD5 you specified did not match what we received.",
        ));
    }
    let checksum = match (checksum, ck) {
        (Some((a, given)), Some(h)) => {
            let computed = h.finish();
            let given = match given {
                Some(g) => g,
                None => trailers
                    .iter()
                    .find(|(k, _)| k == a.header())
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| {
                        S3Error::new(
                            400,
                            "InvalidRequest",
                            format!(
                                "The body has no {} trailer though x-amz-trailer names it.",
                                a.header()
                            ),
                        )
                    })?,
            };
            if given.trim() != computed {
                return Err(S3Error::new(
                    400,
                    "BadDigest",
                    format!(
                        "The {} you specified did not match the calculated checksum.",
                        a.name()
                    ),
                ));
            }
            Some((a, computed))
        }
        _ => None,
    };
    Ok(Received {
        tmp,
        data,
        size,
        md5: hex::encode(md5),
        checksum,
    })
}

/// The headers stored with an object, and its content type.
/// An object's content type and the other headers stored with it.
type StoredHeaders = (Option<String>, Vec<(String, String)>);

fn object_headers(op: &Op<'_>) -> Result<StoredHeaders, S3Error> {
    let mut out = Vec::new();
    let mut user = 0usize;
    for (name, value) in op.headers.iter() {
        let n = name.as_str();
        let keep = matches!(
            n,
            "cache-control" | "content-disposition" | "content-language" | "expires"
        ) || n.starts_with("x-amz-meta-");
        let Ok(v) = value.to_str() else {
            continue;
        };
        if n == "content-encoding" {
            let rest: Vec<&str> = v
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("aws-chunked"))
                .collect();
            if !rest.is_empty() {
                out.push((n.to_owned(), rest.join(", ")));
            }
        } else if keep {
            if let Some(m) = n.strip_prefix("x-amz-meta-") {
                user += m.len() + v.len();
            }
            out.push((n.to_owned(), v.to_owned()));
        }
    }
    if user > MAX_USER_METADATA {
        return Err(S3Error::new(
            400,
            "MetadataTooLarge",
            "Your metadata headers exceed the maximum allowed metadata size.",
        )
        .with("MaxSizeAllowed", MAX_USER_METADATA.to_string())
        .with("Size", user.to_string()));
    }
    let ct = op
        .header("content-type")
        .unwrap_or("binary/octet-stream")
        .to_owned();
    Ok((Some(ct), out))
}

fn list_buckets(op: &Op<'_>) -> Result<Response<Body>, S3Error> {
    op.allow(
        &op.caller.account,
        "s3:ListAllMyBuckets",
        "arn:aws:s3:::*",
        &[],
    )?;
    let region = &op.state.endpoints.region;
    let buckets: String = op
        .state
        .store
        .buckets_of(&op.caller.account)
        .into_iter()
        .map(|(name, created)| {
            format!(
                "<Bucket>{}{}{}</Bucket>",
                el("Name", &name),
                el("CreationDate", &xml::time(created)),
                el("BucketRegion", region)
            )
        })
        .collect();
    Ok(xml_ok(format!(
        "<ListAllMyBucketsResult xmlns=\"{}\"><Owner>{}{}</Owner><Buckets>{buckets}</Buckets></ListAllMyBucketsResult>",
        xml::NS,
        el("ID", &canonical_id(&op.caller.account)),
        el("DisplayName", &op.caller.account),
    )))
}

/// An account's canonical user id, as S3 shows owners: 64 hex digits.
fn canonical_id(account: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, account.as_bytes()))
}

async fn create_bucket(
    op: &Op<'_>,
    bucket: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
    if !store::valid_bucket_name(bucket) {
        return Err(S3Error::new(
            400,
            "InvalidBucketName",
            "The specified bucket is not valid.",
        )
        .with("BucketName", bucket));
    }
    op.allow(
        &op.caller.account,
        "s3:CreateBucket",
        &bucket_arn(bucket),
        &[],
    )?;
    let got = receive(op, body, MAX_XML_BODY, false).await?;
    let region = op.state.endpoints.region.as_str();
    let constraint = if got.data.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let doc = xml::parse(&got.data).map_err(|_| malformed_xml())?;
        if doc.name != "CreateBucketConfiguration" {
            return Err(malformed_xml());
        }
        doc.text_of("LocationConstraint")
            .map(|s| s.trim().to_owned())
    };
    let ok = match constraint.as_deref() {
        None | Some("") => region == "us-east-1",
        Some(c) => c == region,
    };
    if !ok {
        return Err(S3Error::new(
            400,
            "IllegalLocationConstraintException",
            match constraint.as_deref() {
                None | Some("") => format!(
                    "The unspecified location constraint is incompatible for the region specific endpoint this request was sent to ({region})."
                ),
                Some(c) => format!(
                    "The {c} location constraint is incompatible for the region specific endpoint this request was sent to ({region})."
                ),
            },
        ));
    }
    if op.state.store.buckets_of(&op.caller.account).len() >= MAX_BUCKETS {
        return Err(S3Error::new(
            400,
            "TooManyBuckets",
            "You have attempted to create more buckets than allowed",
        ));
    }
    op.state
        .store
        .create_bucket(bucket, &op.caller.account, now())
        .map_err(|e| store_error(e, bucket))?;
    tracing::info!(bucket, account = %op.caller.account, "bucket created");
    let mut r = respond(200, empty());
    set(&mut r, "location", &format!("/{bucket}"));
    Ok(r)
}

fn delete_bucket(op: &Op<'_>, bucket: &str) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:DeleteBucket", &bucket_arn(bucket))?;
    op.state
        .store
        .delete_bucket(bucket)
        .map_err(|e| store_error(e, bucket))?;
    tracing::info!(bucket, "bucket deleted");
    Ok(respond(204, empty()))
}

fn head_bucket(op: &Op<'_>, bucket: &str) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:ListBucket", &bucket_arn(bucket))?;
    let mut r = respond(200, empty());
    set(&mut r, "x-amz-bucket-region", &op.state.endpoints.region);
    Ok(r)
}

fn bucket_location(op: &Op<'_>, bucket: &str) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:GetBucketLocation", &bucket_arn(bucket))?;
    let region = &op.state.endpoints.region;
    let shown = if region == "us-east-1" { "" } else { region };
    Ok(xml_ok(format!(
        "<LocationConstraint xmlns=\"{}\">{}</LocationConstraint>",
        xml::NS,
        esc(shown)
    )))
}

/// URL-encodes a listed name when the client asked for `encoding-type=url`.
fn listed(name: &str, url: bool) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    if url {
        percent_encoding::utf8_percent_encode(name, KEEP).to_string()
    } else {
        name.to_owned()
    }
}

fn list_objects(op: &Op<'_>, bucket: &str) -> Result<Response<Body>, S3Error> {
    let owner = op.owner(bucket)?;
    let v2 = match op.q("list-type") {
        None => false,
        Some("2") => true,
        Some(v) => {
            return Err(invalid_argument(
                "Invalid List Type specified",
                "list-type",
                v,
            ));
        }
    };
    let prefix = op.q("prefix").unwrap_or("");
    let delimiter = op.q("delimiter").filter(|d| !d.is_empty());
    let max_keys = match op.q("max-keys") {
        None => 1000,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 => n.min(1000) as usize,
            _ => {
                return Err(invalid_argument(
                    "Provided max-keys not an integer or within integer range",
                    "max-keys",
                    v,
                ));
            }
        },
    };
    let url = match op.q("encoding-type") {
        None => false,
        Some("url") => true,
        Some(v) => {
            return Err(invalid_argument(
                "Invalid Encoding Method specified in Request",
                "encoding-type",
                v,
            ));
        }
    };
    let mut ctx = vec![
        ("s3:prefix", prefix.to_owned()),
        ("s3:max-keys", max_keys.to_string()),
    ];
    if let Some(d) = delimiter {
        ctx.push(("s3:delimiter", d.to_owned()));
    }
    op.allow(&owner, "s3:ListBucket", &bucket_arn(bucket), &ctx)?;
    let token = op.q("continuation-token");
    let after = if v2 {
        match token {
            Some(t) => Some(
                B64URL
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        S3Error::new(
                            400,
                            "InvalidArgument",
                            "The continuation token provided is incorrect",
                        )
                        .with("ArgumentName", "continuation-token")
                    })?,
            ),
            None => op.q("start-after").map(str::to_owned),
        }
    } else {
        op.q("marker").map(str::to_owned)
    };
    let page = op
        .state
        .store
        .list(bucket, prefix, delimiter, after.as_deref(), max_keys)
        .map_err(|e| store_error(e, bucket))?;
    let mut out = format!(
        "<ListBucketResult xmlns=\"{}\">{}{}",
        xml::NS,
        el("Name", bucket),
        el("Prefix", &listed(prefix, url))
    );
    if let Some(d) = delimiter {
        out.push_str(&el("Delimiter", &listed(d, url)));
    }
    out.push_str(&el("MaxKeys", &max_keys.to_string()));
    if url {
        out.push_str(&el("EncodingType", "url"));
    }
    out.push_str(&el(
        "IsTruncated",
        if page.truncated { "true" } else { "false" },
    ));
    if v2 {
        out.push_str(&el(
            "KeyCount",
            &(page.objects.len() + page.prefixes.len()).to_string(),
        ));
        if let Some(t) = token {
            out.push_str(&el("ContinuationToken", t));
        }
        if let (true, Some(last)) = (page.truncated, &page.last) {
            out.push_str(&el("NextContinuationToken", &B64URL.encode(last)));
        }
        if let Some(s) = op.q("start-after") {
            out.push_str(&el("StartAfter", &listed(s, url)));
        }
    } else {
        out.push_str(&el("Marker", &listed(op.q("marker").unwrap_or(""), url)));
        if let (true, Some(last)) = (page.truncated, &page.last) {
            out.push_str(&el("NextMarker", &listed(last, url)));
        }
    }
    let owner_xml = format!(
        "<Owner>{}{}</Owner>",
        el("ID", &canonical_id(&owner)),
        el("DisplayName", &owner)
    );
    for m in &page.objects {
        out.push_str(&format!(
            "<Contents>{}{}{}{}{}<StorageClass>STANDARD</StorageClass></Contents>",
            el("Key", &listed(&m.key, url)),
            el("LastModified", &xml::time(m.last_modified)),
            el("ETag", &format!("\"{}\"", m.etag)),
            el("Size", &m.size.to_string()),
            if v2 { String::new() } else { owner_xml.clone() }
        ));
    }
    for p in &page.prefixes {
        out.push_str(&format!(
            "<CommonPrefixes>{}</CommonPrefixes>",
            el("Prefix", &listed(p, url))
        ));
    }
    out.push_str("</ListBucketResult>");
    Ok(xml_ok(out))
}

fn etag_matches(condition: &str, etag: &str) -> bool {
    condition
        .split(',')
        .map(|c| c.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|c| c == "*" || c == etag)
}

/// A `Range: bytes=...` header against an object of `size` bytes: the inclusive byte range,
/// `None` to send the whole object (no or unusable header), or InvalidRange.
fn parse_range(header: &str, size: u64) -> Result<Option<(u64, u64)>, S3Error> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let invalid = || {
        S3Error::new(
            416,
            "InvalidRange",
            "The requested range is not satisfiable",
        )
        .with("RangeRequested", header)
        .with("ActualObjectSize", size.to_string())
    };
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(invalid());
        }
        return Ok(Some((size.saturating_sub(n), size - 1)));
    }
    let Ok(start) = a.parse::<u64>() else {
        return Ok(None);
    };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e,
            _ => return Ok(None),
        }
    };
    if start >= size {
        return Err(invalid());
    }
    Ok(Some((start, end.min(size - 1))))
}

async fn get_object(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
    head: bool,
) -> Result<Response<Body>, S3Error> {
    let owner = op.authorize(bucket, "s3:GetObject", &object_arn(bucket, key))?;
    let (b, k) = (bucket.to_owned(), key.to_owned());
    let found = op
        .on_store(move |s| s.open_object(&b, &k))
        .await
        .map_err(|e| store_error(e, bucket))?;
    let Some((mut file, meta)) = found else {
        // As S3: only a caller who may list the bucket learns that the key is absent.
        return Err(
            if op.permits(&owner, "s3:ListBucket", &bucket_arn(bucket), &[]) {
                S3Error::new(404, "NoSuchKey", "The specified key does not exist.").with("Key", key)
            } else {
                access_denied()
            },
        );
    };
    let etag = format!("\"{}\"", meta.etag);
    if let Some(c) = op.header("if-match")
        && !etag_matches(c, &meta.etag)
    {
        return Err(S3Error::new(
            412,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        )
        .with("Condition", "If-Match"));
    }
    if let Some(c) = op.header("if-none-match")
        && etag_matches(c, &meta.etag)
    {
        let mut r = respond(304, empty());
        set(&mut r, "etag", &etag);
        return Ok(r);
    }
    let range = match op.header("range") {
        Some(h) => parse_range(h, meta.size)?,
        None => None,
    };
    let (start, len) = match range {
        Some((a, b)) => (a, b - a + 1),
        None => (0, meta.size),
    };
    let body = if head {
        empty()
    } else {
        file.seek(SeekFrom::Start(start)).map_err(internal)?;
        let reader = tokio::fs::File::from_std(file).take(len);
        let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024)
            .map(|r| r.map(Frame::data));
        BodyExt::boxed(StreamBody::new(stream))
    };
    let mut r = respond(if range.is_some() { 206 } else { 200 }, body);
    set(&mut r, "content-length", &len.to_string());
    set(&mut r, "etag", &etag);
    set(&mut r, "last-modified", &xml::http_date(meta.last_modified));
    set(&mut r, "accept-ranges", "bytes");
    set(
        &mut r,
        "content-type",
        meta.content_type
            .as_deref()
            .unwrap_or("binary/octet-stream"),
    );
    if let Some((a, b)) = range {
        set(
            &mut r,
            "content-range",
            &format!("bytes {a}-{b}/{}", meta.size),
        );
    }
    for (k, v) in &meta.headers {
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(v),
        ) {
            r.headers_mut().insert(name, value);
        }
    }
    // Presigned download links may choose how the browser sees the file.
    for (param, header) in [
        ("response-content-type", "content-type"),
        ("response-content-language", "content-language"),
        ("response-expires", "expires"),
        ("response-cache-control", "cache-control"),
        ("response-content-disposition", "content-disposition"),
        ("response-content-encoding", "content-encoding"),
    ] {
        if let Some(v) = op.q(param) {
            set(&mut r, header, v);
        }
    }
    if range.is_none()
        && op
            .header("x-amz-checksum-mode")
            .is_some_and(|m| m.eq_ignore_ascii_case("enabled"))
        && let Some((alg, value)) = &meta.checksum
        && let Some(a) = Algorithm::from_name(alg)
    {
        set(&mut r, a.header(), value);
        set(&mut r, "x-amz-checksum-type", "FULL_OBJECT");
    }
    Ok(r)
}

async fn put_object(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:PutObject", &object_arn(bucket, key))?;
    let (content_type, headers) = object_headers(op)?;
    let got = receive(op, body, MAX_PUT_SIZE, true).await?;
    let meta = ObjectMeta {
        key: key.to_owned(),
        size: got.size,
        etag: got.md5,
        last_modified: now(),
        content_type,
        headers,
        checksum: got.checksum.map(|(a, v)| (a.name().to_owned(), v)),
    };
    let tmp = got.tmp.ok_or_else(|| internal("no temporary file"))?;
    let (b, m) = (bucket.to_owned(), meta.clone());
    let condition = op.write_condition();
    op.on_store(move |s| s.put(&b, tmp, m, &condition))
        .await
        .map_err(|e| store_error(e, bucket))?;
    tracing::debug!(bucket, key, size = meta.size, "object stored");
    Ok(stored(&meta))
}

/// The answer to a copy (CopyObject, UploadPartCopy): `<element>` with the new ETag.
fn copied(element: &str, meta: &ObjectMeta) -> Response<Body> {
    xml_ok(format!(
        "<{element} xmlns=\"{}\">{}{}</{element}>",
        xml::NS,
        el("LastModified", &xml::time(meta.last_modified)),
        el("ETag", &format!("\"{}\"", meta.etag))
    ))
}

/// The answer to an upload (PutObject, UploadPart): its ETag and checksum.
fn stored(meta: &ObjectMeta) -> Response<Body> {
    let mut r = respond(200, empty());
    set(&mut r, "etag", &format!("\"{}\"", meta.etag));
    if let Some((alg, v)) = &meta.checksum
        && let Some(a) = Algorithm::from_name(alg)
    {
        set(&mut r, a.header(), v);
    }
    r
}

/// Reads the object named by `x-amz-copy-source` (authorized as a GetObject), the range in
/// `x-amz-copy-source-range` when `ranged`, into a temporary file: (file, size, MD5).
async fn copy_source(op: &Op<'_>, ranged: bool) -> Result<(store::TempFile, u64, String), S3Error> {
    let (src_bucket, src_key) = copy_source_name(op)?;
    let src_owner = op.owner(&src_bucket)?;
    op.allow(
        &src_owner,
        "s3:GetObject",
        &object_arn(&src_bucket, &src_key),
        &[],
    )?;
    let missing = || {
        if op.permits(&src_owner, "s3:ListBucket", &bucket_arn(&src_bucket), &[]) {
            S3Error::new(404, "NoSuchKey", "The specified key does not exist.")
                .with("Key", src_key.clone())
        } else {
            access_denied()
        }
    };
    let size = op
        .state
        .store
        .head(&src_bucket, &src_key)
        .map_err(|e| store_error(e, &src_bucket))?
        .ok_or_else(missing)?
        .size;
    let range = match op.header("x-amz-copy-source-range").filter(|_| ranged) {
        None => None,
        Some(h) => {
            let parsed = h
                .trim()
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| {
                    Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?))
                });
            match parsed {
                Some((a, b)) if a <= b && b < size => Some((a, b)),
                Some(_) => {
                    return Err(S3Error::new(
                        400,
                        "InvalidRange",
                        format!("Range specified is not valid for source object of size: {size}"),
                    ));
                }
                None => {
                    return Err(S3Error::new(
                        400,
                        "InvalidArgument",
                        "The x-amz-copy-source-range value must be of the form bytes=first-last where first and last are the zero-based offsets of the first and last bytes to copy",
                    ));
                }
            }
        }
    };
    let copied = range.map_or(size, |(a, b)| b - a + 1);
    if copied > MAX_PUT_SIZE {
        return Err(S3Error::new(
            400,
            "InvalidRequest",
            format!(
                "The specified copy source is larger than the maximum allowable size for a copy source: {MAX_PUT_SIZE}"
            ),
        ));
    }
    let (b, k) = (src_bucket.clone(), src_key.clone());
    let (tmp, _, md5) = op
        .on_store(move |s| s.copy_out(&b, &k, range))
        .await
        .map_err(|e| store_error(e, &src_bucket))?
        .ok_or_else(missing)?;
    Ok((tmp, copied, md5))
}

/// `x-amz-copy-source`: `[/]bucket/key[?versionId=null]`, URL-encoded.
fn copy_source_name(op: &Op<'_>) -> Result<(String, String), S3Error> {
    let raw = op.header("x-amz-copy-source").unwrap_or("");
    let (path, version) = raw.split_once('?').unwrap_or((raw, ""));
    if !version.is_empty() && version != "versionId=null" {
        return Err(not_implemented());
    }
    let decoded = percent_encoding::percent_decode_str(path.trim_start_matches('/'))
        .decode_utf8()
        .map_err(|_| S3Error::new(400, "InvalidArgument", "Invalid copy source encoding"))?;
    match decoded.split_once('/') {
        Some((b, k)) if !b.is_empty() && !k.is_empty() && k.len() <= MAX_KEY_LEN => {
            Ok((b.to_owned(), k.to_owned()))
        }
        _ => Err(invalid_argument(
            "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            "x-amz-copy-source",
            raw,
        )),
    }
}

async fn copy_object(op: &Op<'_>, bucket: &str, key: &str) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:PutObject", &object_arn(bucket, key))?;
    let replace = match op.header("x-amz-metadata-directive") {
        None | Some("COPY") => false,
        Some("REPLACE") => true,
        Some(v) => {
            return Err(invalid_argument(
                "Unknown metadata directive.",
                "x-amz-metadata-directive",
                v,
            ));
        }
    };
    let (src_bucket, src_key) = copy_source_name(op)?;
    if (src_bucket.as_str(), src_key.as_str()) == (bucket, key) && !replace {
        return Err(S3Error::new(
            400,
            "InvalidRequest",
            "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes.",
        ));
    }
    let source = op
        .state
        .store
        .head(&src_bucket, &src_key)
        .map_err(|e| store_error(e, &src_bucket))?;
    let (tmp, size, md5) = copy_source(op, false).await?;
    let (content_type, headers) = match (replace, source) {
        (false, Some(src)) => (src.content_type, src.headers),
        _ => object_headers(op)?,
    };
    let meta = ObjectMeta {
        key: key.to_owned(),
        size,
        etag: md5,
        last_modified: now(),
        content_type,
        headers,
        checksum: None,
    };
    let (b, m) = (bucket.to_owned(), meta.clone());
    op.on_store(move |s| s.put(&b, tmp, m, &store::Condition::None))
        .await
        .map_err(|e| store_error(e, bucket))?;
    Ok(copied("CopyObjectResult", &meta))
}

fn delete_object(op: &Op<'_>, bucket: &str, key: &str) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:DeleteObject", &object_arn(bucket, key))?;
    op.state
        .store
        .delete_object(bucket, key)
        .map_err(|e| store_error(e, bucket))?;
    Ok(respond(204, empty()))
}

async fn delete_objects(
    op: &Op<'_>,
    bucket: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
    let owner = op.owner(bucket)?;
    let got = receive(op, body, MAX_XML_BODY, false).await?;
    let doc = xml::parse(&got.data).map_err(|_| malformed_xml())?;
    if doc.name != "Delete" {
        return Err(malformed_xml());
    }
    let keys: Vec<&str> = doc.all("Object").filter_map(|o| o.text_of("Key")).collect();
    if keys.is_empty() || keys.len() > 1000 {
        return Err(malformed_xml());
    }
    let quiet = doc.text_of("Quiet").is_some_and(|q| q.trim() == "true");
    let mut out = format!("<DeleteResult xmlns=\"{}\">", xml::NS);
    for key in keys {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            out.push_str(&format!(
                "<Error>{}<Code>InvalidArgument</Code><Message>Invalid key</Message></Error>",
                el("Key", key)
            ));
            continue;
        }
        if !op.permits(&owner, "s3:DeleteObject", &object_arn(bucket, key), &[]) {
            out.push_str(&format!(
                "<Error>{}<Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
                el("Key", key)
            ));
            continue;
        }
        match op.state.store.delete_object(bucket, key) {
            Ok(()) if quiet => {}
            Ok(()) => out.push_str(&format!("<Deleted>{}</Deleted>", el("Key", key))),
            Err(e) => {
                let e = store_error(e, bucket);
                out.push_str(&format!(
                    "<Error>{}{}{}</Error>",
                    el("Key", key),
                    el("Code", e.code),
                    el("Message", &e.message)
                ));
            }
        }
    }
    out.push_str("</DeleteResult>");
    Ok(xml_ok(out))
}

/// The upload named by `uploadId`, which must be for this bucket and key.
fn this_upload(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
) -> Result<(String, store::UploadInfo), S3Error> {
    let id = op.q("uploadId").unwrap_or("").to_owned();
    match op.state.store.upload(&id) {
        Ok(u) if u.bucket == bucket && u.key == key => Ok((id, u)),
        _ => Err(no_such_upload(&id)),
    }
}

async fn create_upload(op: &Op<'_>, bucket: &str, key: &str) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:PutObject", &object_arn(bucket, key))?;
    let (content_type, headers) = object_headers(op)?;
    let info = store::UploadInfo {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        account: op.caller.account.clone(),
        initiated: now(),
        template: ObjectMeta {
            key: key.to_owned(),
            size: 0,
            etag: String::new(),
            last_modified: 0.0,
            content_type,
            headers,
            checksum: None,
        },
    };
    let id = op
        .on_store(move |s| s.create_upload(&info))
        .await
        .map_err(|e| store_error(e, bucket))?;
    Ok(xml_ok(format!(
        "<InitiateMultipartUploadResult xmlns=\"{}\">{}{}{}</InitiateMultipartUploadResult>",
        xml::NS,
        el("Bucket", bucket),
        el("Key", key),
        el("UploadId", &id)
    )))
}

async fn upload_part(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
    let owner = op.owner(bucket)?;
    let raw = op.q("partNumber").unwrap_or("");
    let n = match raw.parse::<u32>() {
        Ok(n) if (1..=MAX_PART_NUMBER).contains(&n) => n,
        _ => {
            return Err(invalid_argument(
                "Part number must be an integer between 1 and 10000, inclusive",
                "partNumber",
                raw,
            ));
        }
    };
    op.allow(&owner, "s3:PutObject", &object_arn(bucket, key), &[])?;
    let (id, _) = this_upload(op, bucket, key)?;
    let copying = op.headers.contains_key("x-amz-copy-source");
    let (tmp, size, md5, checksum) = if copying {
        let (tmp, size, md5) = copy_source(op, true).await?;
        (tmp, size, md5, None)
    } else {
        let got = receive(op, body, MAX_PUT_SIZE, true).await?;
        let tmp = got.tmp.ok_or_else(|| internal("no temporary file"))?;
        (tmp, got.size, got.md5, got.checksum)
    };
    let meta = ObjectMeta {
        key: String::new(),
        size,
        etag: md5,
        last_modified: now(),
        content_type: None,
        headers: Vec::new(),
        checksum: checksum.map(|(a, v)| (a.name().to_owned(), v)),
    };
    let (m, upload) = (meta.clone(), id.clone());
    op.on_store(move |s| s.put_part(&upload, n, tmp, &m))
        .await
        .map_err(|e| upload_error(e, &id, bucket))?;
    if copying {
        return Ok(copied("CopyPartResult", &meta));
    }
    Ok(stored(&meta))
}

async fn complete_upload(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:PutObject", &object_arn(bucket, key))?;
    let (id, _) = this_upload(op, bucket, key)?;
    let got = receive(op, body, MAX_XML_BODY, false).await?;
    let doc = xml::parse(&got.data).map_err(|_| malformed_xml())?;
    if doc.name != "CompleteMultipartUpload" {
        return Err(malformed_xml());
    }
    let mut listed = Vec::new();
    for p in doc.all("Part") {
        let n = p
            .text_of("PartNumber")
            .and_then(|n| n.trim().parse::<u32>().ok())
            .ok_or_else(malformed_xml)?;
        let etag = p
            .text_of("ETag")
            .ok_or_else(malformed_xml)?
            .trim()
            .to_owned();
        listed.push((n, etag));
    }
    if listed.is_empty() || listed.len() > MAX_PART_NUMBER as usize {
        return Err(malformed_xml());
    }
    let upload = id.clone();
    let meta = op
        .on_store({
            let condition = op.write_condition();
            move |s| s.complete(&upload, &listed, now(), &condition)
        })
        .await
        .map_err(|e| upload_error(e, &id, bucket))?;
    tracing::debug!(bucket, key, size = meta.size, "multipart upload completed");
    Ok(xml_ok(format!(
        "<CompleteMultipartUploadResult xmlns=\"{}\">{}{}{}{}</CompleteMultipartUploadResult>",
        xml::NS,
        el("Location", &format!("https://{}/{bucket}/{key}", op.host)),
        el("Bucket", bucket),
        el("Key", key),
        el("ETag", &format!("\"{}\"", meta.etag))
    )))
}

fn abort_upload(op: &Op<'_>, bucket: &str, key: &str) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:AbortMultipartUpload", &object_arn(bucket, key))?;
    let (id, _) = this_upload(op, bucket, key)?;
    op.state.store.abort(&id).map_err(|_| no_such_upload(&id))?;
    Ok(respond(204, empty()))
}

fn list_parts(op: &Op<'_>, bucket: &str, key: &str) -> Result<Response<Body>, S3Error> {
    op.authorize(
        bucket,
        "s3:ListMultipartUploadParts",
        &object_arn(bucket, key),
    )?;
    let (id, _) = this_upload(op, bucket, key)?;
    let marker = op
        .q("part-number-marker")
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    let max = op
        .q("max-parts")
        .and_then(|m| m.parse::<usize>().ok())
        .unwrap_or(1000)
        .min(1000);
    let parts = op.state.store.parts(&id).map_err(|_| no_such_upload(&id))?;
    let mut body = String::new();
    let mut last = marker;
    for (n, p) in parts.range(marker.saturating_add(1)..).take(max) {
        body.push_str(&format!(
            "<Part>{}{}{}{}</Part>",
            el("PartNumber", &n.to_string()),
            el("LastModified", &xml::time(p.last_modified)),
            el("ETag", &format!("\"{}\"", p.etag)),
            el("Size", &p.size.to_string())
        ));
        last = *n;
    }
    let truncated = parts.range(last.saturating_add(1)..).next().is_some();
    Ok(xml_ok(format!(
        "<ListPartsResult xmlns=\"{}\">{}{}{}{}{}{}{}<StorageClass>STANDARD</StorageClass>{body}</ListPartsResult>",
        xml::NS,
        el("Bucket", bucket),
        el("Key", key),
        el("UploadId", &id),
        el("PartNumberMarker", &marker.to_string()),
        el("NextPartNumberMarker", &last.to_string()),
        el("MaxParts", &max.to_string()),
        el("IsTruncated", if truncated { "true" } else { "false" }),
    )))
}

fn list_uploads(op: &Op<'_>, bucket: &str) -> Result<Response<Body>, S3Error> {
    op.authorize(bucket, "s3:ListBucketMultipartUploads", &bucket_arn(bucket))?;
    let prefix = op.q("prefix").unwrap_or("");
    let uploads: String = op
        .state
        .store
        .uploads()
        .into_iter()
        .filter(|(_, u)| u.bucket == bucket && u.key.starts_with(prefix))
        .take(1000)
        .map(|(id, u)| {
            format!(
                "<Upload>{}{}{}<StorageClass>STANDARD</StorageClass></Upload>",
                el("Key", &u.key),
                el("UploadId", &id),
                el("Initiated", &xml::time(u.initiated))
            )
        })
        .collect();
    Ok(xml_ok(format!(
        "<ListMultipartUploadsResult xmlns=\"{}\">{}<KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>{}<MaxUploads>1000</MaxUploads><IsTruncated>false</IsTruncated>{uploads}</ListMultipartUploadsResult>",
        xml::NS,
        el("Bucket", bucket),
        el("Prefix", prefix),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some((90, 99)));
        assert_eq!(parse_range("bytes=90-200", 100).unwrap(), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some((90, 99)));
        assert_eq!(parse_range("bytes=-200", 100).unwrap(), Some((0, 99)));
        assert_eq!(parse_range("bytes=99-99", 100).unwrap(), Some((99, 99)));
        assert_eq!(parse_range("bytes=100-", 100).unwrap_err().status, 416);
        assert_eq!(parse_range("bytes=-0", 100).unwrap_err().status, 416);
        assert_eq!(parse_range("bytes=0-", 0).unwrap_err().status, 416);
        assert_eq!(parse_range("bytes=5-1", 100).unwrap(), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(parse_range("items=0-1", 100).unwrap(), None);
        assert_eq!(parse_range("bytes=x-1", 100).unwrap(), None);
    }

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

    #[test]
    fn etag_conditions() {
        assert!(etag_matches("\"abc\"", "abc"));
        assert!(etag_matches("\"x\", \"abc\"", "abc"));
        assert!(etag_matches("*", "abc"));
        assert!(!etag_matches("\"abd\"", "abc"));
    }
}
