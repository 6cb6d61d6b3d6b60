//! The S3 store that holds objects when `[s3.backend]` is set (decision 0015): a client for
//! one bucket of an S3-compatible service (SeaweedFS in the tests), path-style, every request
//! signed with SigV4 (Sekisho's own signer) and every body sent with its `Content-MD5`. The
//! front end has authenticated, authorized and checked the request before; this client only
//! moves bytes and maps the backend's answers. Nothing a Sekisho client sent reaches the
//! backend except as a key (encoded), a header value the front end stored, or a body.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::TryStreamExt as _;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncReadExt as _;

use crate::store::Condition;
use crate::xml;

/// A request body.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// The longest a request may take until the backend's answer starts (its body streams after).
const ANSWER_WITHIN: Duration = Duration::from_secs(300);
/// The most of an error's or a listing's body read.
const MAX_SMALL_BODY: usize = 8 * 1024 * 1024;

/// Where the backend is and how to sign for it.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// `http://host:port` (no path).
    pub endpoint: String,
    /// The backend bucket that holds everything.
    pub bucket: String,
    /// The region to sign for.
    pub region: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

/// What went wrong with a backend request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// No such object or upload (404).
    NotFound,
    /// A condition (`If-None-Match`, `If-Match`) does not hold (412).
    PreconditionFailed,
    /// Any other refusal: HTTP status, S3 error code, message.
    Refused {
        /// HTTP status.
        status: u16,
        /// S3 error code, if the body had one.
        code: String,
        /// Its message.
        message: String,
    },
    /// No usable answer: connection, timeout, or a body that could not be read.
    Unreachable(String),
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::NotFound => write!(f, "the backend has no such object"),
            BackendError::PreconditionFailed => write!(f, "the backend's condition failed"),
            BackendError::Refused {
                status,
                code,
                message,
            } => write!(f, "the backend answered {status} {code}: {message}"),
            BackendError::Unreachable(e) => write!(f, "the backend did not answer: {e}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// An object's metadata as the backend returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectHead {
    /// The whole object's size.
    pub size: u64,
    /// ETag without quotes.
    pub etag: String,
    /// Epoch seconds.
    pub last_modified: f64,
    /// Content-Type.
    pub content_type: Option<String>,
    /// Stored headers (`content-encoding`, `content-disposition`, `cache-control`,
    /// `content-language`, `expires`, `x-amz-meta-*`), names in lower case.
    pub headers: Vec<(String, String)>,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    /// The backend key.
    pub key: String,
    /// Size.
    pub size: u64,
    /// ETag without quotes.
    pub etag: String,
    /// Epoch seconds.
    pub last_modified: f64,
}

/// A part of a multipart upload.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Its number.
    pub number: u32,
    /// Size.
    pub size: u64,
    /// ETag without quotes.
    pub etag: String,
    /// Epoch seconds.
    pub last_modified: f64,
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListPage {
    /// Objects in key order.
    pub objects: Vec<Listed>,
    /// Common prefixes (with a delimiter).
    pub prefixes: Vec<String>,
    /// More follow.
    pub truncated: bool,
    /// The token for the next page.
    pub next: Option<String>,
}

/// The headers an object keeps besides its Content-Type.
fn stored_header(name: &str) -> bool {
    matches!(
        name,
        "content-encoding"
            | "content-disposition"
            | "cache-control"
            | "content-language"
            | "expires"
    ) || name.starts_with("x-amz-meta-")
}

/// A client for one backend bucket.
#[derive(Clone)]
pub struct Backend {
    config: BackendConfig,
    host: String,
    client: Client<HttpConnector, Body>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("endpoint", &self.config.endpoint)
            .field("bucket", &self.config.bucket)
            .finish_non_exhaustive()
    }
}

/// A body of bytes.
pub fn bytes_body(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A body of the first `len` bytes of `file` from where it stands.
pub fn file_body(file: tokio::fs::File, len: u64) -> Body {
    let stream =
        tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024).map_ok(Frame::data);
    http_body_util::BodyExt::boxed(StreamBody::new(stream))
}

/// The base64 `Content-MD5` of an MD5 digest.
pub fn content_md5(md5: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5)
}

fn now_amz_date() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn unquote(etag: &str) -> String {
    etag.trim().trim_matches('"').to_owned()
}

/// Epoch seconds of an HTTP date (`Thu, 03 Dec 2026 20:07:11 GMT`) or an ISO 8601 time.
fn epoch_of(s: &str) -> Option<f64> {
    use time::format_description::well_known::{Rfc2822, Rfc3339};
    let t = time::OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| time::OffsetDateTime::parse(s, &Rfc2822))
        .or_else(|_| {
            // Rfc2822 wants a numeric zone; HTTP dates say GMT.
            let s = s.strip_suffix(" GMT").unwrap_or(s);
            time::OffsetDateTime::parse(&format!("{s} +0000"), &Rfc2822)
        })
        .ok()?;
    Some(t.unix_timestamp() as f64 + f64::from(t.millisecond()) / 1000.0)
}

fn header<'a>(r: &'a Response<Incoming>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

fn condition_headers(cond: &Condition, out: &mut Vec<(String, String)>) {
    match cond {
        Condition::None => {}
        Condition::Absent => out.push(("if-none-match".into(), "*".into())),
        Condition::Matches(etags) => {
            let v = if etags.iter().any(|e| e == "*") {
                "*".to_owned()
            } else {
                etags
                    .iter()
                    .map(|e| format!("\"{}\"", unquote(e)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push(("if-match".into(), v));
        }
    }
}

/// Reads a small body whole (at most [`MAX_SMALL_BODY`]).
async fn small_body(r: Response<Incoming>) -> Result<Bytes, BackendError> {
    let limited = http_body_util::Limited::new(r.into_body(), MAX_SMALL_BODY);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| BackendError::Unreachable(format!("reading the answer: {e}")))
}

/// The error an answer that is not a success stands for.
async fn refusal(r: Response<Incoming>) -> BackendError {
    let status = r.status().as_u16();
    match status {
        404 => return BackendError::NotFound,
        412 => return BackendError::PreconditionFailed,
        _ => {}
    }
    let body = small_body(r).await.unwrap_or_default();
    let (code, message) = xml::parse(&body)
        .map(|n| {
            (
                n.text_of("Code").unwrap_or_default().to_owned(),
                n.text_of("Message").unwrap_or_default().to_owned(),
            )
        })
        .unwrap_or_default();
    BackendError::Refused {
        status,
        code,
        message,
    }
}

fn head_of(r: &Response<Incoming>) -> ObjectHead {
    let size = match header(r, "content-range").and_then(|c| c.rsplit_once('/')) {
        Some((_, total)) => total.trim().parse().unwrap_or(0),
        None => header(r, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    };
    let mut headers: Vec<(String, String)> = r
        .headers()
        .iter()
        .filter(|(n, _)| stored_header(n.as_str()))
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    headers.sort();
    ObjectHead {
        size,
        etag: header(r, "etag").map(unquote).unwrap_or_default(),
        last_modified: header(r, "last-modified").and_then(epoch_of).unwrap_or(0.0),
        content_type: header(r, "content-type").map(str::to_owned),
        headers,
    }
}

impl Backend {
    /// A client for `config`'s bucket. Only `http://` endpoints for now (decision 0015: TLS to
    /// the backend is a later stage; keep the backend on a network of its own until then).
    pub fn new(config: BackendConfig) -> Result<Backend, String> {
        let host = config
            .endpoint
            .strip_prefix("http://")
            .ok_or("the S3 backend's endpoint must be http://host:port")?
            .trim_end_matches('/')
            .to_owned();
        if host.is_empty() || host.contains(['/', '?', '#', '@']) {
            return Err("the S3 backend's endpoint must be http://host:port, with no path".into());
        }
        if !crate::store::valid_bucket_name(&config.bucket) {
            return Err(format!(
                "the S3 backend's bucket {:?} is not a valid bucket name",
                config.bucket
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Backend {
            config,
            host,
            client,
        })
    }

    /// The backend bucket's name.
    pub fn bucket(&self) -> &str {
        &self.config.bucket
    }

    /// Sends a signed request: `key` names an object (`None`: the bucket), `query` pairs
    /// unencoded, `headers` in lower case, and the body ([`Out`]).
    async fn send(
        &self,
        method: &str,
        key: Option<&str>,
        query: &[(&str, &str)],
        mut headers: Vec<(String, String)>,
        out: Out<'_>,
    ) -> Result<Response<Incoming>, BackendError> {
        let Out {
            body,
            length,
            payload,
        } = out;
        let path = match key {
            Some(k) => sekisho_sigv4::s3_path(&format!("/{}/{k}", self.config.bucket)),
            None => sekisho_sigv4::s3_path(&format!("/{}", self.config.bucket)),
        };
        let query = query
            .iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    format!("{}=", sekisho_sigv4::query_escape(k))
                } else {
                    format!(
                        "{}={}",
                        sekisho_sigv4::query_escape(k),
                        sekisho_sigv4::query_escape(v)
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("&");
        let amz_date = now_amz_date();
        headers.push(("host".into(), self.host.clone()));
        headers.push(("x-amz-date".into(), amz_date.clone()));
        headers.push(("x-amz-content-sha256".into(), payload.to_owned()));
        headers.sort();
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        let mut signed: Vec<&str> = names.clone();
        signed.dedup();
        let authorization = sekisho_sigv4::sign_s3_header(
            &sekisho_sigv4::Request {
                method,
                path: &path,
                query: &query,
                headers: &headers,
                body_sha256: payload,
            },
            &self.config.access_key,
            &self.config.secret_key,
            &self.config.region,
            &amz_date,
            &signed,
        );
        let uri = if query.is_empty() {
            format!("http://{}{path}", self.host)
        } else {
            format!("http://{}{path}?{query}", self.host)
        };
        let mut req = Request::builder().method(method).uri(uri);
        for (n, v) in &headers {
            if n != "host" {
                req = req.header(n.as_str(), v.as_str());
            }
        }
        req = req.header("authorization", authorization);
        if let Some(len) = length {
            req = req.header("content-length", len);
        }
        let req = req
            .body(body)
            .map_err(|e| BackendError::Unreachable(format!("building a request: {e}")))?;
        match tokio::time::timeout(ANSWER_WITHIN, self.client.request(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(BackendError::Unreachable(e.to_string())),
            Err(_) => Err(BackendError::Unreachable(format!(
                "no answer in {} s",
                ANSWER_WITHIN.as_secs()
            ))),
        }
    }

    /// Creates the backend bucket if it is not there (at start-up).
    pub async fn ensure_bucket(&self) -> Result<(), BackendError> {
        let r = self
            .send("PUT", None, &[], Vec::new(), Out::empty(Some(0)))
            .await?;
        if r.status().is_success() {
            return Ok(());
        }
        match refusal(r).await {
            BackendError::Refused { code, .. }
                if code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists" =>
            {
                Ok(())
            }
            e => Err(e),
        }
    }

    /// Writes an object (`data`), with its Content-Type and stored headers, if `cond` holds
    /// (checked by the backend, atomically). Returns its ETag.
    pub async fn put(
        &self,
        key: &str,
        data: Data,
        content_type: Option<&str>,
        stored: &[(String, String)],
        cond: &Condition,
    ) -> Result<String, BackendError> {
        let mut headers = vec![("content-md5".to_owned(), content_md5(&data.md5))];
        if let Some(ct) = content_type {
            headers.push(("content-type".into(), ct.to_owned()));
        }
        headers.extend(
            stored
                .iter()
                .filter(|(n, _)| stored_header(n))
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone())),
        );
        condition_headers(cond, &mut headers);
        let r = self
            .send("PUT", Some(key), &[], headers, Out::data(data))
            .await?;
        if !r.status().is_success() {
            return Err(refusal(r).await);
        }
        Ok(header(&r, "etag").map(unquote).unwrap_or_default())
    }

    /// An object's metadata.
    pub async fn head(&self, key: &str) -> Result<ObjectHead, BackendError> {
        let r = self
            .send("HEAD", Some(key), &[], Vec::new(), Out::empty(None))
            .await?;
        if !r.status().is_success() {
            return Err(match r.status().as_u16() {
                404 => BackendError::NotFound,
                status => BackendError::Refused {
                    status,
                    code: String::new(),
                    message: "HEAD refused".into(),
                },
            });
        }
        Ok(head_of(&r))
    }

    /// An object (bytes `first..=last` of it with `range`), if its ETag is `if_match` when
    /// given (else [`BackendError::PreconditionFailed`]): its metadata and its body, which
    /// streams from the backend.
    pub async fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        if_match: Option<&str>,
    ) -> Result<(ObjectHead, Incoming), BackendError> {
        let mut headers: Vec<(String, String)> = range
            .map(|(a, b)| vec![("range".to_owned(), format!("bytes={a}-{b}"))])
            .unwrap_or_default();
        if let Some(etag) = if_match {
            headers.push(("if-match".into(), format!("\"{}\"", unquote(etag))));
        }
        let r = self
            .send("GET", Some(key), &[], headers, Out::empty(None))
            .await?;
        if !r.status().is_success() {
            return Err(refusal(r).await);
        }
        let head = head_of(&r);
        Ok((head, r.into_body()))
    }

    /// Deletes an object (one that is not there is no error, as in S3).
    pub async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let r = self
            .send("DELETE", Some(key), &[], Vec::new(), Out::empty(None))
            .await?;
        if r.status().is_success() || r.status().as_u16() == 404 {
            return Ok(());
        }
        Err(refusal(r).await)
    }

    /// One page of the keys under `prefix` (ListObjectsV2), grouped by `delimiter`, after
    /// `start_after` or from `token`, at most `max` (up to 1,000).
    pub async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        token: Option<&str>,
        max: usize,
    ) -> Result<ListPage, BackendError> {
        let max = max.min(1000).to_string();
        let mut query = vec![
            ("list-type", "2"),
            ("encoding-type", "url"),
            ("prefix", prefix),
            ("max-keys", max.as_str()),
        ];
        if let Some(d) = delimiter {
            query.push(("delimiter", d));
        }
        if let Some(s) = start_after {
            query.push(("start-after", s));
        }
        if let Some(t) = token {
            query.push(("continuation-token", t));
        }
        query.sort();
        let r = self
            .send("GET", None, &query, Vec::new(), Out::empty(None))
            .await?;
        if !r.status().is_success() {
            return Err(refusal(r).await);
        }
        let body = small_body(r).await?;
        let root = xml::parse(&body)
            .map_err(|e| BackendError::Unreachable(format!("an unreadable listing: {e:?}")))?;
        let url = root.text_of("EncodingType") == Some("url");
        let decode = |s: &str| -> String {
            if url {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            } else {
                s.to_owned()
            }
        };
        let mut page = ListPage {
            truncated: root.text_of("IsTruncated") == Some("true"),
            next: root.text_of("NextContinuationToken").map(str::to_owned),
            ..ListPage::default()
        };
        for c in root.all("Contents") {
            page.objects.push(Listed {
                key: decode(c.text_of("Key").unwrap_or_default()),
                size: c.text_of("Size").and_then(|s| s.parse().ok()).unwrap_or(0),
                etag: unquote(c.text_of("ETag").unwrap_or_default()),
                last_modified: c.text_of("LastModified").and_then(epoch_of).unwrap_or(0.0),
            });
        }
        for p in root.all("CommonPrefixes") {
            page.prefixes
                .push(decode(p.text_of("Prefix").unwrap_or_default()));
        }
        Ok(page)
    }

    /// Starts a multipart upload of `key` with the object's Content-Type and stored headers.
    /// Returns the backend's upload id.
    pub async fn create_upload(
        &self,
        key: &str,
        content_type: Option<&str>,
        stored: &[(String, String)],
    ) -> Result<String, BackendError> {
        let mut headers = Vec::new();
        if let Some(ct) = content_type {
            headers.push(("content-type".to_owned(), ct.to_owned()));
        }
        headers.extend(
            stored
                .iter()
                .filter(|(n, _)| stored_header(n))
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone())),
        );
        let r = self
            .send(
                "POST",
                Some(key),
                &[("uploads", "")],
                headers,
                Out::empty(Some(0)),
            )
            .await?;
        if !r.status().is_success() {
            return Err(refusal(r).await);
        }
        let body = small_body(r).await?;
        xml::parse(&body)
            .ok()
            .and_then(|n| n.text_of("UploadId").map(str::to_owned))
            .filter(|id| !id.is_empty())
            .ok_or_else(|| BackendError::Unreachable("no UploadId in the answer".into()))
    }

    /// Writes part `n` of an upload. Returns its ETag.
    pub async fn upload_part(
        &self,
        key: &str,
        upload: &str,
        n: u32,
        data: Data,
    ) -> Result<String, BackendError> {
        let md5 = content_md5(&data.md5);
        let part = n.to_string();
        let r = self
            .send(
                "PUT",
                Some(key),
                &[("partNumber", part.as_str()), ("uploadId", upload)],
                vec![("content-md5".to_owned(), md5)],
                Out::data(data),
            )
            .await?;
        if !r.status().is_success() {
            return Err(refusal(r).await);
        }
        Ok(header(&r, "etag").map(unquote).unwrap_or_default())
    }

    /// Completes an upload with `parts` (number, ETag) in order, if `cond` holds. Returns the
    /// object's ETag.
    pub async fn complete_upload(
        &self,
        key: &str,
        upload: &str,
        parts: &[(u32, String)],
        cond: &Condition,
    ) -> Result<String, BackendError> {
        let mut doc = String::from("<CompleteMultipartUpload>");
        for (n, etag) in parts {
            doc.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>\"{}\"</ETag></Part>",
                xml::esc(&unquote(etag))
            ));
        }
        doc.push_str("</CompleteMultipartUpload>");
        let sha = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            doc.as_bytes(),
        ));
        let mut headers = vec![("content-type".to_owned(), "application/xml".to_owned())];
        condition_headers(cond, &mut headers);
        let len = doc.len() as u64;
        let r = self
            .send(
                "POST",
                Some(key),
                &[("uploadId", upload)],
                headers,
                Out {
                    body: bytes_body(doc),
                    length: Some(len),
                    payload: &sha,
                },
            )
            .await?;
        if !r.status().is_success() {
            return Err(refusal(r).await);
        }
        // S3 may answer 200 and put an error in the body (the completion failed late).
        let body = small_body(r).await?;
        let root = xml::parse(&body)
            .map_err(|e| BackendError::Unreachable(format!("an unreadable completion: {e:?}")))?;
        if root.name == "Error" {
            let code = root.text_of("Code").unwrap_or_default().to_owned();
            return Err(if code == "PreconditionFailed" {
                BackendError::PreconditionFailed
            } else {
                BackendError::Refused {
                    status: 200,
                    message: root.text_of("Message").unwrap_or_default().to_owned(),
                    code,
                }
            });
        }
        Ok(unquote(root.text_of("ETag").unwrap_or_default()))
    }

    /// The parts of an upload so far (every page), by number.
    pub async fn list_parts(&self, key: &str, upload: &str) -> Result<Vec<Part>, BackendError> {
        let mut out = Vec::new();
        let mut marker = 0u32;
        loop {
            let after = marker.to_string();
            let r = self
                .send(
                    "GET",
                    Some(key),
                    &[
                        ("max-parts", "1000"),
                        ("part-number-marker", after.as_str()),
                        ("uploadId", upload),
                    ],
                    Vec::new(),
                    Out::empty(None),
                )
                .await?;
            if !r.status().is_success() {
                return Err(refusal(r).await);
            }
            let body = small_body(r).await?;
            let root = xml::parse(&body).map_err(|e| {
                BackendError::Unreachable(format!("an unreadable part list: {e:?}"))
            })?;
            for p in root.all("Part") {
                let n = p.text_of("PartNumber").and_then(|n| n.parse().ok());
                let size = p.text_of("Size").and_then(|s| s.parse().ok());
                if let (Some(number), Some(size)) = (n, size) {
                    out.push(Part {
                        number,
                        size,
                        etag: unquote(p.text_of("ETag").unwrap_or_default()),
                        last_modified: p.text_of("LastModified").and_then(epoch_of).unwrap_or(0.0),
                    });
                }
            }
            let next = root
                .text_of("NextPartNumberMarker")
                .and_then(|n| n.parse::<u32>().ok());
            match next {
                Some(n) if root.text_of("IsTruncated") == Some("true") && n > marker => marker = n,
                _ => break,
            }
        }
        out.sort_by_key(|p| p.number);
        out.dedup_by_key(|p| p.number);
        Ok(out)
    }

    /// Aborts an upload (one that is not there is no error).
    pub async fn abort_upload(&self, key: &str, upload: &str) -> Result<(), BackendError> {
        let r = self
            .send(
                "DELETE",
                Some(key),
                &[("uploadId", upload)],
                Vec::new(),
                Out::empty(None),
            )
            .await?;
        if r.status().is_success() || r.status().as_u16() == 404 {
            return Ok(());
        }
        Err(refusal(r).await)
    }
}

/// An object's or a part's bytes: the body, its length and its MD5 (sent as `Content-MD5`,
/// signed; the body itself is sent unsigned).
pub struct Data {
    /// The bytes.
    pub body: Body,
    /// How many.
    pub len: u64,
    /// Their MD5.
    pub md5: Vec<u8>,
}

/// A request's body as sent: its length if known, and what is signed for it (its hex SHA-256,
/// or `UNSIGNED-PAYLOAD` with a signed `Content-MD5` header).
struct Out<'a> {
    body: Body,
    length: Option<u64>,
    payload: &'a str,
}

impl Out<'_> {
    fn empty(length: Option<u64>) -> Out<'static> {
        Out {
            body: bytes_body(""),
            length,
            payload: EMPTY_SHA256,
        }
    }

    fn data(d: Data) -> Out<'static> {
        Out {
            body: d.body,
            length: Some(d.len),
            payload: UNSIGNED,
        }
    }
}

/// The SHA-256 of no bytes.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// A body sent unsigned (its `Content-MD5` is signed instead).
const UNSIGNED: &str = "UNSIGNED-PAYLOAD";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_of_both_forms_are_read() {
        assert_eq!(epoch_of("Thu, 01 Jan 1970 00:01:00 GMT"), Some(60.0));
        assert_eq!(epoch_of("1970-01-01T00:01:00.500Z"), Some(60.5));
        assert_eq!(epoch_of("yesterday"), None);
    }

    #[test]
    fn conditions_become_the_backends_headers() {
        let mut h = Vec::new();
        condition_headers(&Condition::Absent, &mut h);
        condition_headers(
            &Condition::Matches(vec!["abc".into(), "\"def\"".into()]),
            &mut h,
        );
        assert_eq!(
            h,
            vec![
                ("if-none-match".to_owned(), "*".to_owned()),
                ("if-match".to_owned(), "\"abc\", \"def\"".to_owned())
            ]
        );
        let mut any = Vec::new();
        condition_headers(&Condition::Matches(vec!["*".into()]), &mut any);
        assert_eq!(any, vec![("if-match".to_owned(), "*".to_owned())]);
    }

    #[test]
    fn only_http_endpoints_without_a_path() {
        let config = |endpoint: &str| BackendConfig {
            endpoint: endpoint.into(),
            bucket: "objects".into(),
            region: "us-east-1".into(),
            access_key: "a".into(),
            secret_key: "s".into(),
        };
        assert!(Backend::new(config("http://127.0.0.1:8333")).is_ok());
        assert!(Backend::new(config("http://127.0.0.1:8333/")).is_ok());
        for bad in [
            "https://x:1",
            "127.0.0.1:8333",
            "http://",
            "http://x/y",
            "http://u@x",
        ] {
            assert!(Backend::new(config(bad)).is_err(), "{bad}");
        }
        let mut c = config("http://x:1");
        c.bucket = "Not_A_Bucket".into();
        assert!(Backend::new(c).is_err());
    }
}
