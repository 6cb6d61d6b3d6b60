//! Object operations: get (ranges, conditions), put, copy, delete.

use super::*;

pub(super) fn etag_matches(condition: &str, etag: &str) -> bool {
    condition
        .split(',')
        .map(|c| c.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|c| c == "*" || c == etag)
}

/// A `Range: bytes=...` header against an object of `size` bytes: the inclusive byte range,
/// `None` to send the whole object (no or unusable header), or InvalidRange.
pub(super) fn parse_range(header: &str, size: u64) -> Result<Option<(u64, u64)>, S3Error> {
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

pub(super) async fn get_object(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
    owner: &str,
    head: bool,
) -> Result<Response<Body>, S3Error> {
    let (b, k) = (bucket.to_owned(), key.to_owned());
    let found = op
        .on_store(move |s| s.open_object(&b, &k))
        .await
        .map_err(|e| store_error(e, bucket))?;
    let Some((mut file, meta)) = found else {
        return Err(op.missing_key(owner, bucket, key));
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
        // 64 KiB per download in flight: 10,000 connections (the listener's cap) stay within
        // about 640 MiB of buffers.
        let stream = tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024)
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

pub(super) async fn put_object(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
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
    let inc = op.incarnation(bucket);
    op.on_store(move |s| s.put(&b, inc, tmp, m, &condition))
        .await
        .map_err(|e| store_error(e, bucket))?;
    tracing::debug!(bucket, key, size = meta.size, "object stored");
    Ok(stored(&meta))
}

/// The answer to a copy (CopyObject, UploadPartCopy): `<element>` with the new ETag.
pub(super) fn copied(element: &str, meta: &ObjectMeta) -> Response<Body> {
    xml_ok(format!(
        "<{element} xmlns=\"{}\">{}{}</{element}>",
        xml::NS,
        el("LastModified", &xml::time(meta.last_modified)),
        el("ETag", &format!("\"{}\"", meta.etag))
    ))
}

/// The answer to an upload (PutObject, UploadPart): its ETag and checksum.
pub(super) fn stored(meta: &ObjectMeta) -> Response<Body> {
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
/// A copy source read into a temporary file.
pub(super) struct Copied {
    pub(super) tmp: store::TempFile,
    /// Bytes copied.
    pub(super) size: u64,
    /// MD5 of what was copied, hex.
    pub(super) md5: String,
    /// The source's metadata, read from the same file as the data.
    pub(super) source: ObjectMeta,
}

pub(super) async fn copy_source(op: &Op<'_>, ranged: bool) -> Result<Copied, S3Error> {
    let (src_bucket, src_key) = copy_source_name(op)?;
    let src_owner = op.owner(&src_bucket)?;
    op.allow(
        &src_owner,
        "s3:GetObject",
        &object_arn(&src_bucket, &src_key),
        &[],
    )?;
    let missing = || op.missing_key(&src_owner, &src_bucket, &src_key);
    let head = op
        .state
        .store
        .head(&src_bucket, &src_key)
        .map_err(|e| store_error(e, &src_bucket))?
        .ok_or_else(missing)?;
    copy_conditions(op, &head.etag)?;
    let size = head.size;
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
    let (tmp, source, md5) = op
        .on_store(move |s| s.copy_out(&b, &k, range))
        .await
        .map_err(|e| store_error(e, &src_bucket))?
        .ok_or_else(missing)?;
    // Again on what was copied, in case the source changed in between.
    copy_conditions(op, &source.etag)?;
    Ok(Copied {
        tmp,
        size: copied,
        md5,
        source,
    })
}

/// `x-amz-copy-source-if-match` and `-if-none-match` against the source's ETag.
fn copy_conditions(op: &Op<'_>, etag: &str) -> Result<(), S3Error> {
    let failed = |header: &str| {
        S3Error::new(
            412,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        )
        .with("Condition", header)
    };
    if let Some(c) = op.header("x-amz-copy-source-if-match")
        && !etag_matches(c, etag)
    {
        return Err(failed("x-amz-copy-source-If-Match"));
    }
    if let Some(c) = op.header("x-amz-copy-source-if-none-match")
        && etag_matches(c, etag)
    {
        return Err(failed("x-amz-copy-source-If-None-Match"));
    }
    Ok(())
}

/// `x-amz-copy-source`: `[/]bucket/key[?versionId=null]`, URL-encoded.
pub(super) fn copy_source_name(op: &Op<'_>) -> Result<(String, String), S3Error> {
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

pub(super) async fn copy_object(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
) -> Result<Response<Body>, S3Error> {
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
    no_acls(op)?;
    let (src_bucket, src_key) = copy_source_name(op)?;
    if (src_bucket.as_str(), src_key.as_str()) == (bucket, key) && !replace {
        return Err(S3Error::new(
            400,
            "InvalidRequest",
            "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes.",
        ));
    }
    // Checked before any byte is copied.
    let replaced = if replace {
        Some(object_headers(op)?)
    } else {
        None
    };
    let Copied {
        tmp,
        size,
        md5,
        source,
    } = copy_source(op, false).await?;
    let (content_type, headers) = replaced.unwrap_or((source.content_type, source.headers));
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
    let inc = op.incarnation(bucket);
    op.on_store(move |s| s.put(&b, inc, tmp, m, &store::Condition::None))
        .await
        .map_err(|e| store_error(e, bucket))?;
    Ok(copied("CopyObjectResult", &meta))
}

pub(super) fn delete_object(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
) -> Result<Response<Body>, S3Error> {
    op.state
        .store
        .delete_object(bucket, key)
        .map_err(|e| store_error(e, bucket))?;
    Ok(respond(204, empty()))
}

pub(super) async fn delete_objects(
    op: &Op<'_>,
    bucket: &str,
    owner: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
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
        if !op.permits(owner, "s3:DeleteObject", &object_arn(bucket, key), &[]) {
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
    fn etag_conditions() {
        assert!(etag_matches("\"abc\"", "abc"));
        assert!(etag_matches("\"x\", \"abc\"", "abc"));
        assert!(etag_matches("*", "abc"));
        assert!(!etag_matches("\"abd\"", "abc"));
    }
}
