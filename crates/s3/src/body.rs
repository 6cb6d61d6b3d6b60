//! Request bodies: read to a temporary file or to memory, with every claim about them checked
//! (payload hash, chunk signatures, length, Content-MD5, checksums); the headers stored with an
//! object.

use super::*;

/// Where a received body went.
pub(super) struct Received {
    pub(super) tmp: Option<store::TempFile>,
    pub(super) data: Vec<u8>,
    pub(super) size: u64,
    pub(super) md5: String,
    pub(super) checksum: Option<(Algorithm, String)>,
}

/// Which checksum the request carries: at most one `x-amz-checksum-*` header, or one named by
/// `x-amz-trailer`. Returns the algorithm and the value when given as a header.
pub(super) fn requested_checksum(
    op: &Op<'_>,
) -> Result<Option<(Algorithm, Option<String>)>, S3Error> {
    let invalid = |m: String| S3Error::new(400, "InvalidRequest", m);
    let mut found = Vec::new();
    for (name, value) in op.headers.iter() {
        let name = name.as_str();
        if let Some(rest) = name.strip_prefix("x-amz-checksum-") {
            if rest == "algorithm" || rest == "type" || rest == "mode" {
                continue;
            }
            let a = Algorithm::from_header(name)
                .ok_or_else(|| invalid(format!("Unsupported checksum header {name}")))?;
            found.push((a, Some(value.to_str().unwrap_or("").to_owned())));
        }
    }
    if let Some(t) = op.header("x-amz-trailer") {
        let a = Algorithm::from_header(t.trim())
            .ok_or_else(|| invalid(format!("Unsupported trailer {t}")))?;
        if !matches!(op.payload, Payload::Chunked(_)) {
            return Err(invalid("x-amz-trailer needs an aws-chunked body".into()));
        }
        found.push((a, None));
    }
    if found.len() > 1 {
        return Err(invalid(
            "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed."
                .into(),
        ));
    }
    Ok(found.pop())
}

/// Reads the request body, to a temporary file (`to_file`) or to memory, at most `max` bytes,
/// checking everything the request claims about it: its SHA-256, chunk signatures, length,
/// Content-MD5 and checksum. Nothing is kept unless every check passes.
pub(super) async fn receive(
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
pub(super) type StoredHeaders = (Option<String>, Vec<(String, String)>);

/// Buckets here are what S3 calls "bucket owner enforced" (its default since 2023): objects
/// belong to the bucket's account and ACLs are refused, except the two that say just that.
pub(super) fn no_acls(op: &Op<'_>) -> Result<(), S3Error> {
    let acl_ok = op
        .header("x-amz-acl")
        .is_none_or(|a| matches!(a.trim(), "private" | "bucket-owner-full-control"));
    let grants = op
        .headers
        .keys()
        .any(|k| k.as_str().starts_with("x-amz-grant-"));
    if acl_ok && !grants {
        Ok(())
    } else {
        Err(S3Error::new(
            400,
            "AccessControlListNotSupported",
            "The bucket does not allow ACLs",
        ))
    }
}

/// Server-side encryption: `AES256` (S3's default, invisible to access control) is accepted;
/// KMS keys and customer-provided keys are refused rather than ignored, since a client that
/// names a key relies on its key policy.
fn no_kms(op: &Op<'_>) -> Result<(), S3Error> {
    let kms = op
        .header("x-amz-server-side-encryption")
        .is_some_and(|v| v.trim() != "AES256");
    let customer = op.headers.keys().any(|k| {
        k.as_str()
            .starts_with("x-amz-server-side-encryption-customer-")
    });
    if kms || customer {
        return Err(S3Error::new(
            501,
            "NotImplemented",
            "Server-side encryption with KMS or customer-provided keys is not available here.",
        ));
    }
    Ok(())
}

pub(super) fn object_headers(op: &Op<'_>) -> Result<StoredHeaders, S3Error> {
    no_acls(op)?;
    no_kms(op)?;
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
