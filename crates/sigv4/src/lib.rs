//! AWS Signature Version 4 verification, for the Authorization header and presigned URLs.
//!
//! Pure: the caller passes the request's parts, the secret it looked up, and the current time.
//! The canonical request follows the SigV4 rules for non-S3 services (the path is URI-encoded a
//! second time) unless [`Options::s3`] is set.

#![warn(missing_docs)]

use aws_lc_rs::{digest, hmac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// Allowed difference between the client's clock and ours, in seconds (AWS: 15 minutes).
pub const MAX_SKEW_SECS: i64 = 15 * 60;
/// Longest lifetime of a presigned URL, in seconds (7 days).
pub const MAX_PRESIGN_EXPIRES: i64 = 7 * 24 * 3600;
/// SHA-256 of the empty string, hex.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
const PATH: &AsciiSet = &UNRESERVED.remove(b'/');

/// Why a request's signature was refused. The variants follow AWS's error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// No Authorization header and no presigned query.
    #[error("Missing Authentication Token")]
    Missing,
    /// The Authorization header or presigned query is not well formed.
    #[error("{0}")]
    Incomplete(String),
    /// The signature does not match.
    #[error(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
    )]
    Mismatch,
    /// The request time is too far from ours.
    #[error("Signature expired: {0} is now earlier than the allowed window (15 minutes).")]
    Skewed(String),
    /// A presigned URL past its expiry.
    #[error("Request has expired")]
    Expired,
    /// The payload does not match `x-amz-content-sha256`.
    #[error("The provided 'x-amz-content-sha256' header does not match what was computed.")]
    PayloadHash,
    /// An `x-amz-*` header that the signature does not cover (a presigned URL, or any S3
    /// request): it would let the holder of a signature change what the request does.
    #[error("There were headers present in the request which were not signed")]
    UnsignedHeaders(String),
}

/// The request as received.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// The path exactly as on the request line (percent-encoded).
    pub path: &'a str,
    /// The raw query string (without `?`).
    pub query: &'a str,
    /// Headers; names compared case-insensitively.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the body as received.
    pub body_sha256: &'a str,
}

/// Verification options.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// S3 rules: the path is not encoded twice.
    pub s3: bool,
    /// Presigned URLs: accept a signature computed without `X-Amz-Security-Token` in the
    /// canonical query (AWS IoT's WebSocket quirk).
    pub token_outside_signature: bool,
}

/// What the signature claims, parsed from the header or the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Access key id.
    pub access_key: String,
    /// Credential scope date, `yyyymmdd`.
    pub date: String,
    /// Region.
    pub region: String,
    /// Service signing name.
    pub service: String,
    /// Signed header names, lower case, as listed.
    pub signed_headers: Vec<String>,
    /// Hex signature.
    pub signature: String,
    /// `X-Amz-Date`.
    pub amz_date: String,
    /// True for a presigned URL.
    pub presigned: bool,
    /// `X-Amz-Expires` of a presigned URL.
    pub expires: Option<i64>,
    /// `X-Amz-Security-Token`, when given.
    pub security_token: Option<String>,
}

fn header<'a>(req: &'a Request<'_>, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| {
                percent_decode_str(&s.replace('+', "%20"))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn parse_credential(c: &str) -> Result<(String, String, String, String), SigError> {
    let parts: Vec<&str> = c.split('/').collect();
    match parts.as_slice() {
        [ak, date, region, service, "aws4_request"] if !ak.is_empty() => Ok((
            ak.to_string(),
            date.to_string(),
            region.to_string(),
            service.to_string(),
        )),
        _ => Err(SigError::Incomplete(format!(
            "Credential should be scoped to a valid region, not {c:?}"
        ))),
    }
}

/// Parses the claim of a request: the `Authorization` header, else the presigned query.
pub fn parse(req: &Request<'_>) -> Result<Claim, SigError> {
    if let Some(auth) = header(req, "authorization") {
        let rest = auth.strip_prefix("AWS4-HMAC-SHA256").ok_or_else(|| {
            SigError::Incomplete(
                "Authorization header requires the AWS4-HMAC-SHA256 algorithm".into(),
            )
        })?;
        let mut cred = None;
        let mut signed = None;
        let mut sig = None;
        for part in rest.split(',') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("Credential=") {
                cred = Some(v);
            } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
                signed = Some(v);
            } else if let Some(v) = part.strip_prefix("Signature=") {
                sig = Some(v);
            }
        }
        let (Some(cred), Some(signed), Some(sig)) = (cred, signed, sig) else {
            return Err(SigError::Incomplete(
                "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters".into(),
            ));
        };
        let (access_key, date, region, service) = parse_credential(cred)?;
        let amz_date = header(req, "x-amz-date")
            .ok_or_else(|| {
                SigError::Incomplete("Authorization requires the 'X-Amz-Date' header".into())
            })?
            .to_owned();
        return Ok(Claim {
            access_key,
            date,
            region,
            service,
            signed_headers: signed.split(';').map(|s| s.to_ascii_lowercase()).collect(),
            signature: sig.to_owned(),
            amz_date,
            presigned: false,
            expires: None,
            security_token: header(req, "x-amz-security-token").map(str::to_owned),
        });
    }
    let q = query_pairs(req.query);
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(alg) = get("X-Amz-Algorithm") else {
        return Err(SigError::Missing);
    };
    if alg != "AWS4-HMAC-SHA256" {
        return Err(SigError::Incomplete(
            "X-Amz-Algorithm must be AWS4-HMAC-SHA256".into(),
        ));
    }
    let missing = |k: &str| SigError::Incomplete(format!("Presigned request is missing {k}"));
    let cred = get("X-Amz-Credential").ok_or_else(|| missing("X-Amz-Credential"))?;
    let (access_key, date, region, service) = parse_credential(&cred)?;
    let expires = match get("X-Amz-Expires") {
        Some(e) => Some(
            e.parse::<i64>()
                .map_err(|_| SigError::Incomplete("X-Amz-Expires must be a number".into()))?,
        ),
        None => None,
    };
    Ok(Claim {
        access_key,
        date,
        region,
        service,
        signed_headers: get("X-Amz-SignedHeaders")
            .ok_or_else(|| missing("X-Amz-SignedHeaders"))?
            .split(';')
            .map(|s| s.to_ascii_lowercase())
            .collect(),
        signature: get("X-Amz-Signature").ok_or_else(|| missing("X-Amz-Signature"))?,
        amz_date: get("X-Amz-Date").ok_or_else(|| missing("X-Amz-Date"))?,
        presigned: true,
        expires,
        security_token: get("X-Amz-Security-Token"),
    })
}

/// `yyyymmddThhmmssZ` as epoch seconds.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::PrimitiveDateTime::parse(s, &fmt)
        .ok()
        .map(|d| d.assume_utc().unix_timestamp())
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, b))
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg)
        .as_ref()
        .to_vec()
}

/// The signing key for a secret and a scope.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    hmac(&k, b"aws4_request")
}

/// A path (`/bucket/key`, not encoded) encoded as S3 signs it: what a client of an S3 store
/// sends, so that both sides sign the same bytes.
pub fn s3_path(unencoded: &str) -> String {
    utf8_percent_encode(unencoded, PATH).to_string()
}

/// A query name or value encoded as SigV4 signs it.
pub fn query_escape(v: &str) -> String {
    utf8_percent_encode(v, UNRESERVED).to_string()
}

fn canonical_query(query: &str, drop_token: bool) -> String {
    let mut pairs: Vec<(String, String)> = query_pairs(query)
        .into_iter()
        .filter(|(k, _)| k != "X-Amz-Signature" && !(drop_token && k == "X-Amz-Security-Token"))
        .map(|(k, v)| {
            (
                utf8_percent_encode(&k, UNRESERVED).to_string(),
                utf8_percent_encode(&v, UNRESERVED).to_string(),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn canonical_path(path: &str, s3: bool) -> String {
    if path.is_empty() {
        return "/".into();
    }
    if s3 {
        // S3: the path as sent, normalized to encoded form once.
        let decoded = percent_decode_str(path).decode_utf8_lossy();
        return utf8_percent_encode(&decoded, PATH).to_string();
    }
    utf8_percent_encode(path, PATH).to_string()
}

/// The canonical request and string to sign (exposed for tests and diagnostics).
pub fn string_to_sign(req: &Request<'_>, claim: &Claim, opts: Options, drop_token: bool) -> String {
    let mut canon_headers = String::new();
    for name in &claim.signed_headers {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        canon_headers.push_str(name);
        canon_headers.push(':');
        canon_headers.push_str(&values.join(","));
        canon_headers.push('\n');
    }
    let payload = if claim.presigned {
        header(req, "x-amz-content-sha256")
            .map(str::to_owned)
            .unwrap_or_else(|| {
                if opts.s3 {
                    "UNSIGNED-PAYLOAD".to_owned()
                } else {
                    req.body_sha256.to_owned()
                }
            })
    } else {
        header(req, "x-amz-content-sha256")
            .map(str::to_owned)
            .unwrap_or_else(|| req.body_sha256.to_owned())
    };
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        canonical_path(req.path, opts.s3),
        canonical_query(req.query, drop_token),
        canon_headers,
        claim.signed_headers.join(";"),
        payload
    );
    format!(
        "AWS4-HMAC-SHA256\n{}\n{}/{}/{}/aws4_request\n{}",
        claim.amz_date,
        claim.date,
        claim.region,
        claim.service,
        sha256_hex(canonical.as_bytes())
    )
}

/// Verifies `claim` against the request with the secret of its access key, at time `now`
/// (epoch seconds).
pub fn verify(
    req: &Request<'_>,
    claim: &Claim,
    secret: &str,
    now: i64,
    opts: Options,
) -> Result<(), SigError> {
    let t = parse_amz_date(&claim.amz_date).ok_or_else(|| {
        SigError::Incomplete(format!(
            "X-Amz-Date {:?} is not in yyyymmddThhmmssZ format",
            claim.amz_date
        ))
    })?;
    if !claim.amz_date.starts_with(&claim.date) {
        return Err(SigError::Incomplete(
            "Credential date does not match X-Amz-Date".into(),
        ));
    }
    if !claim.signed_headers.iter().any(|h| h == "host") {
        return Err(SigError::Incomplete(
            "'Host' must be a signed header".into(),
        ));
    }
    // Every `x-amz-*` header must be signed where a signature may be replayed by someone else
    // (presigned URLs) and everywhere on S3, where such headers change the operation
    // (`x-amz-copy-source`), what is stored (`x-amz-meta-*`) or who may read it.
    if claim.presigned || opts.s3 {
        for (name, _) in req.headers {
            let name = name.to_ascii_lowercase();
            if name.starts_with("x-amz-") && !claim.signed_headers.contains(&name) {
                return Err(SigError::UnsignedHeaders(name));
            }
        }
    }
    if claim.presigned {
        // S3 requires X-Amz-Expires. Elsewhere (AWS IoT's WebSocket URLs, which its SDKs sign
        // without it) a URL without one is good only within the clock-skew window.
        let exp = match claim.expires {
            Some(e) => e,
            None if opts.s3 => {
                return Err(SigError::Incomplete(
                    "Query-string authentication version 4 requires the X-Amz-Algorithm, X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and X-Amz-Expires parameters.".into(),
                ));
            }
            None => MAX_SKEW_SECS,
        };
        if !(1..=MAX_PRESIGN_EXPIRES).contains(&exp) {
            return Err(SigError::Incomplete(
                "X-Amz-Expires must be between 1 and 604800 seconds".into(),
            ));
        }
        if now > t + exp {
            return Err(SigError::Expired);
        }
        if t > now + MAX_SKEW_SECS {
            return Err(SigError::Skewed(claim.amz_date.clone()));
        }
    } else if (now - t).abs() > MAX_SKEW_SECS {
        return Err(SigError::Skewed(claim.amz_date.clone()));
    }
    if let Some(h) = header(req, "x-amz-content-sha256")
        && !h.starts_with("UNSIGNED-PAYLOAD")
        && !h.starts_with("STREAMING-")
        && !h.eq_ignore_ascii_case(req.body_sha256)
    {
        return Err(SigError::PayloadHash);
    }
    let given = hex::decode(&claim.signature).map_err(|_| SigError::Mismatch)?;
    let key = signing_key(secret, &claim.date, &claim.region, &claim.service);
    let check = |drop_token: bool| {
        let sts = string_to_sign(req, claim, opts, drop_token);
        let expected = hmac(&key, sts.as_bytes());
        aws_lc_rs::constant_time::verify_slices_are_equal(&expected, &given).is_ok()
    };
    if check(false)
        || (claim.presigned
            && opts.token_outside_signature
            && claim.security_token.is_some()
            && check(true))
    {
        Ok(())
    } else {
        Err(SigError::Mismatch)
    }
}

/// A legacy S3 presigned URL (Signature Version 2 query authentication), which botocore
/// still makes by default for S3: `AWSAccessKeyId`, `Signature` (base64 HMAC-SHA1), `Expires`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Claim {
    /// Access key id.
    pub access_key: String,
    /// The signature, base64.
    pub signature: String,
    /// Expiry, epoch seconds.
    pub expires: i64,
    /// `x-amz-security-token`, when given.
    pub security_token: Option<String>,
}

/// Query parameters that S3 signs as sub-resources in a SigV2 canonical resource.
const V2_SUBRESOURCES: &[&str] = &[
    "accelerate",
    "acl",
    "analytics",
    "cors",
    "defaultObjectAcl",
    "delete",
    "inventory",
    "lifecycle",
    "location",
    "logging",
    "metrics",
    "notification",
    "object-lock",
    "partNumber",
    "policy",
    "replication",
    "requestPayment",
    "response-cache-control",
    "response-content-disposition",
    "response-content-encoding",
    "response-content-language",
    "response-content-type",
    "response-expires",
    "restore",
    "select",
    "select-type",
    "storageClass",
    "tagging",
    "torrent",
    "uploadId",
    "uploads",
    "versionId",
    "versioning",
    "versions",
    "website",
];

/// Parses a SigV2 presigned query; `None` when the query is not one.
pub fn parse_v2_query(query: &str) -> Option<V2Claim> {
    let pairs = query_pairs(query);
    let get = |n: &str| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    Some(V2Claim {
        access_key: get("AWSAccessKeyId")?,
        signature: get("Signature")?,
        expires: get("Expires")?.parse().ok()?,
        security_token: get("x-amz-security-token"),
    })
}

/// Verifies a SigV2 presigned request. `resource` is `/<bucket>/<key>` as encoded on the wire
/// (for a virtual-hosted request, the bucket prepended to the path). URLs that live longer than
/// [`MAX_PRESIGN_EXPIRES`] from now are refused, as SigV4's are.
pub fn verify_v2_query(
    req: &Request<'_>,
    resource: &str,
    claim: &V2Claim,
    secret: &str,
    now: i64,
) -> Result<(), SigError> {
    if now > claim.expires {
        return Err(SigError::Expired);
    }
    if claim.expires > now + MAX_PRESIGN_EXPIRES {
        return Err(SigError::Incomplete(
            "Expires must be at most 604800 seconds from now".into(),
        ));
    }
    let pairs = query_pairs(req.query);
    let value = |name: &str| {
        header(req, name)
            .map(|v| v.trim().to_owned())
            .or_else(|| {
                pairs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_default()
    };
    let mut amz: Vec<(String, String)> = req
        .headers
        .iter()
        .filter(|(k, _)| k.to_ascii_lowercase().starts_with("x-amz-"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
        .chain(
            pairs
                .iter()
                .filter(|(k, _)| k.to_ascii_lowercase().starts_with("x-amz-"))
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        )
        .collect();
    // Every value of a name counts, joined with commas in order (headers, then query), as
    // S3 signs them: a second value the signer never saw changes the string to sign.
    let amz: Vec<(String, String)> = {
        let mut by_name: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (k, v) in amz.drain(..) {
            by_name.entry(k).or_default().push(v);
        }
        by_name
            .into_iter()
            .map(|(k, vs)| (k, vs.join(",")))
            .collect()
    };
    let mut subs: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| V2_SUBRESOURCES.contains(&k.as_str()))
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    subs.sort();
    let mut sts = format!(
        "{}\n{}\n{}\n{}\n",
        req.method,
        value("content-md5"),
        value("content-type"),
        claim.expires
    );
    for (k, v) in &amz {
        sts.push_str(&format!("{k}:{v}\n"));
    }
    sts.push_str(resource);
    if !subs.is_empty() {
        sts.push('?');
        sts.push_str(&subs.join("&"));
    }
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes()),
        sts.as_bytes(),
    );
    use base64::Engine as _;
    let expected = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    if signatures_equal(&expected, &claim.signature) {
        Ok(())
    } else {
        Err(SigError::Mismatch)
    }
}

impl Claim {
    /// The credential scope, `date/region/service/aws4_request`.
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// The signature of one chunk of a `STREAMING-AWS4-HMAC-SHA256-PAYLOAD` body: each chunk is
/// chained to the one before it (the first to the request's own signature).
pub fn chunk_signature(
    key: &[u8],
    amz_date: &str,
    scope: &str,
    previous: &str,
    chunk_sha256_hex: &str,
) -> String {
    let sts = format!(
        "AWS4-HMAC-SHA256-PAYLOAD\n{amz_date}\n{scope}\n{previous}\n{EMPTY_SHA256}\n{chunk_sha256_hex}"
    );
    hex::encode(hmac(key, sts.as_bytes()))
}

/// The signature of the trailing headers of a `STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER`
/// body; `trailer_sha256_hex` hashes the trailers as `name:value\n` lines.
pub fn trailer_signature(
    key: &[u8],
    amz_date: &str,
    scope: &str,
    previous: &str,
    trailer_sha256_hex: &str,
) -> String {
    let sts =
        format!("AWS4-HMAC-SHA256-TRAILER\n{amz_date}\n{scope}\n{previous}\n{trailer_sha256_hex}");
    hex::encode(hmac(key, sts.as_bytes()))
}

/// Compares two signatures in constant time.
pub fn signatures_equal(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

/// Signs a request (for tests and for our own clients): returns the `Authorization` header.
pub fn sign_header(
    req: &Request<'_>,
    access_key: &str,
    secret: &str,
    region: &str,
    service: &str,
    amz_date: &str,
    signed_headers: &[&str],
) -> String {
    sign_header_with(
        req,
        access_key,
        secret,
        (region, service),
        amz_date,
        signed_headers,
        Options::default(),
    )
}

/// [`sign_header`] under S3's rules (the path, already encoded, is not encoded again): for
/// requests to an S3 store (the object store's backend, decision 0015).
pub fn sign_s3_header(
    req: &Request<'_>,
    access_key: &str,
    secret: &str,
    region: &str,
    amz_date: &str,
    signed_headers: &[&str],
) -> String {
    sign_header_with(
        req,
        access_key,
        secret,
        (region, "s3"),
        amz_date,
        signed_headers,
        Options {
            s3: true,
            ..Options::default()
        },
    )
}

fn sign_header_with(
    req: &Request<'_>,
    access_key: &str,
    secret: &str,
    (region, service): (&str, &str),
    amz_date: &str,
    signed_headers: &[&str],
    opts: Options,
) -> String {
    let claim = Claim {
        access_key: access_key.to_owned(),
        date: amz_date.get(..8).unwrap_or_default().to_owned(),
        region: region.to_owned(),
        service: service.to_owned(),
        signed_headers: signed_headers.iter().map(|s| s.to_string()).collect(),
        signature: String::new(),
        amz_date: amz_date.to_owned(),
        presigned: false,
        expires: None,
        security_token: None,
    };
    let key = signing_key(secret, &claim.date, region, service);
    let sig = hex::encode(hmac(
        &key,
        string_to_sign(req, &claim, opts, false).as_bytes(),
    ));
    format!(
        "AWS4-HMAC-SHA256 Credential={access_key}/{}/{region}/{service}/aws4_request, SignedHeaders={}, Signature={sig}",
        claim.date,
        signed_headers.join(";")
    )
}

/// A presigned S3 GET URL: `base` is the store's scheme and authority
/// (`https://host:port`), `path` the path-style object path (`/bucket/key`, unencoded),
/// `amz_date` the signing time (`yyyymmddThhmmssZ`), valid `expires` seconds; a session
/// token, if any, is signed into the query as S3 expects.
#[allow(clippy::too_many_arguments)]
pub fn presign_s3_get(
    base: &str,
    path: &str,
    access_key: &str,
    secret: &str,
    token: Option<&str>,
    region: &str,
    amz_date: &str,
    expires: u64,
) -> String {
    let date = amz_date.get(..8).unwrap_or_default();
    let host = base
        .split_once("://")
        .map_or(base, |(_, rest)| rest)
        .trim_end_matches('/');
    let enc = |v: &str| utf8_percent_encode(v, UNRESERVED).to_string();
    let mut query = format!(
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={}&X-Amz-Date={amz_date}&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host",
        enc(&format!("{access_key}/{date}/{region}/s3/aws4_request"))
    );
    if let Some(t) = token {
        query.push_str(&format!("&X-Amz-Security-Token={}", enc(t)));
    }
    let encoded_path = utf8_percent_encode(path, PATH).to_string();
    let claim = Claim {
        access_key: access_key.to_owned(),
        date: date.to_owned(),
        region: region.to_owned(),
        service: "s3".to_owned(),
        signed_headers: vec!["host".to_owned()],
        signature: String::new(),
        amz_date: amz_date.to_owned(),
        presigned: true,
        expires: i64::try_from(expires).ok(),
        security_token: token.map(str::to_owned),
    };
    let headers = vec![("host".to_owned(), host.to_owned())];
    let req = Request {
        method: "GET",
        path: &encoded_path,
        query: &query,
        headers: &headers,
        body_sha256: "UNSIGNED-PAYLOAD",
    };
    let opts = Options {
        s3: true,
        token_outside_signature: false,
    };
    let key = signing_key(secret, date, region, "s3");
    let sig = hex::encode(hmac(
        &key,
        string_to_sign(&req, &claim, opts, false).as_bytes(),
    ));
    format!(
        "{}{encoded_path}?{query}&X-Amz-Signature={sig}",
        base.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL we presign verifies as a presigned request, and not once changed.
    #[test]
    fn presigned_s3_urls_verify() {
        let url = presign_s3_get(
            "https://localhost:9444",
            "/fw/build 1.bin",
            "AKIDEXAMPLE",
            "secret",
            Some("tok/en+="),
            "us-east-1",
            "20261201T000000Z",
            600,
        );
        let (path, query) = url
            .strip_prefix("https://localhost:9444")
            .and_then(|u| u.split_once('?'))
            .unwrap();
        assert_eq!(path, "/fw/build%201.bin");
        let headers = vec![("host".to_string(), "localhost:9444".to_string())];
        let check = |path: &str, query: &str| {
            let r = Request {
                method: "GET",
                path,
                query,
                headers: &headers,
                body_sha256: "UNSIGNED-PAYLOAD",
            };
            let claim = parse(&r).unwrap();
            let opts = Options {
                s3: true,
                token_outside_signature: false,
            };
            verify(
                &r,
                &claim,
                "secret",
                parse_amz_date("20261201T000100Z").unwrap(),
                opts,
            )
        };
        assert!(check(path, query).is_ok());
        assert!(check("/fw/other.bin", query).is_err());
        assert!(
            check(
                path,
                &query.replace("X-Amz-Expires=600", "X-Amz-Expires=6000")
            )
            .is_err()
        );
    }

    /// The chunk signatures of AWS's streaming PutObject example (S3 API reference,
    /// "Signature Calculations for the Authorization Header: Transferring Payload in Multiple
    /// Chunks").
    #[test]
    fn aws_streaming_example_chunks() {
        let key = signing_key(
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "20130524",
            "us-east-1",
            "s3",
        );
        let scope = "20130524/us-east-1/s3/aws4_request";
        let date = "20130524T000000Z";
        let seed = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9";
        let c1 = chunk_signature(&key, date, scope, seed, &sha256_hex(&[b'a'; 65536]));
        assert_eq!(
            c1,
            "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"
        );
        let c2 = chunk_signature(&key, date, scope, &c1, &sha256_hex(&[b'a'; 1024]));
        assert_eq!(
            c2,
            "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"
        );
        let c3 = chunk_signature(&key, date, scope, &c2, EMPTY_SHA256);
        assert_eq!(
            c3,
            "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"
        );
        assert!(signatures_equal(&c3, &c3.clone()) && !signatures_equal(&c3, &c2));
    }

    /// The S3 developer guide's SigV2 query-string example (a presigned GET of
    /// `/johnsmith/photos/puppy.jpg`, expiring at 1175139620).
    #[test]
    fn s3_v2_presigned_example() {
        let q = "AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=1175139620&Signature=NpgCjnDzrM%2BWFzoENXmpNDUsSn8%3D";
        let claim = parse_v2_query(q).unwrap();
        let req = Request {
            method: "GET",
            path: "/photos/puppy.jpg",
            query: q,
            headers: &[],
            body_sha256: EMPTY_SHA256,
        };
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let at = 1175139620 - 10;
        assert_eq!(
            verify_v2_query(&req, "/johnsmith/photos/puppy.jpg", &claim, secret, at),
            Ok(())
        );
        assert_eq!(
            verify_v2_query(&req, "/johnsmith/photos/kitten.jpg", &claim, secret, at),
            Err(SigError::Mismatch)
        );
        assert_eq!(
            verify_v2_query(
                &req,
                "/johnsmith/photos/puppy.jpg",
                &claim,
                secret,
                1175139621
            ),
            Err(SigError::Expired)
        );
        assert!(parse_v2_query("X-Amz-Credential=x").is_none());
    }

    /// The AWS SigV4 test suite's "get-vanilla" case.
    #[test]
    fn aws_suite_get_vanilla() {
        let headers = vec![
            ("Host".to_string(), "example.amazonaws.com".to_string()),
            ("X-Amz-Date".to_string(), "20150830T123600Z".to_string()),
            (
                "Authorization".to_string(),
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31".to_string(),
            ),
        ];
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body_sha256: EMPTY_SHA256,
        };
        let claim = parse(&req).unwrap();
        let now = parse_amz_date("20150830T123600Z").unwrap();
        assert_eq!(
            verify(
                &req,
                &claim,
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                now,
                Options::default()
            ),
            Ok(())
        );
        assert_eq!(
            verify(&req, &claim, "wrong", now, Options::default()),
            Err(SigError::Mismatch)
        );
        assert!(matches!(
            verify(&req, &claim, "x", now + 901, Options::default()),
            Err(SigError::Skewed(_))
        ));
        assert!(
            verify(
                &req,
                &claim,
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                now + 900,
                Options::default()
            )
            .is_ok()
        );
    }

    /// The suite's "get-vanilla-query-order-key-case" case: query sorting.
    #[test]
    fn aws_suite_query_order() {
        let headers = vec![
            ("Host".to_string(), "example.amazonaws.com".to_string()),
            ("X-Amz-Date".to_string(), "20150830T123600Z".to_string()),
            (
                "Authorization".to_string(),
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500".to_string(),
            ),
        ];
        let req = Request {
            method: "GET",
            path: "/",
            query: "Param2=value2&Param1=value1",
            headers: &headers,
            body_sha256: EMPTY_SHA256,
        };
        let claim = parse(&req).unwrap();
        let now = parse_amz_date("20150830T123600Z").unwrap();
        assert_eq!(
            verify(
                &req,
                &claim,
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                now,
                Options::default()
            ),
            Ok(())
        );
    }

    #[test]
    fn sign_then_verify_roundtrip_and_tamper() {
        let mut headers = vec![
            ("host".to_string(), "localhost:9443".to_string()),
            ("x-amz-date".to_string(), "20261122T120000Z".to_string()),
        ];
        let body = sha256_hex(b"{\"a\":1}");
        let req = Request {
            method: "POST",
            path: "/things/a%3Ab",
            query: "x=1",
            headers: &headers,
            body_sha256: &body,
        };
        let auth = sign_header(
            &req,
            "AKIA1",
            "secret",
            "us-east-1",
            "iot",
            "20261122T120000Z",
            &["host", "x-amz-date"],
        );
        headers.push(("authorization".into(), auth));
        let now = parse_amz_date("20261122T120000Z").unwrap();
        let req = Request {
            method: "POST",
            path: "/things/a%3Ab",
            query: "x=1",
            headers: &headers,
            body_sha256: &body,
        };
        let claim = parse(&req).unwrap();
        assert_eq!(
            verify(&req, &claim, "secret", now, Options::default()),
            Ok(())
        );
        let other = sha256_hex(b"{\"a\":2}");
        let tampered = Request {
            body_sha256: &other,
            ..req.clone()
        };
        assert_eq!(
            verify(&tampered, &claim, "secret", now, Options::default()),
            Err(SigError::Mismatch)
        );
        let moved = Request {
            path: "/things/other",
            ..req
        };
        assert_eq!(
            verify(&moved, &claim, "secret", now, Options::default()),
            Err(SigError::Mismatch)
        );
    }

    #[test]
    fn missing_and_malformed() {
        let headers = vec![("host".to_string(), "h".to_string())];
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body_sha256: EMPTY_SHA256,
        };
        assert_eq!(parse(&req), Err(SigError::Missing));
        let headers = vec![(
            "authorization".to_string(),
            "AWS4-HMAC-SHA256 Credential=x".to_string(),
        )];
        let req = Request {
            headers: &headers,
            ..req
        };
        assert!(matches!(parse(&req), Err(SigError::Incomplete(_))));
    }
}
