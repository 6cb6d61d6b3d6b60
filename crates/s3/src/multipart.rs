//! Multipart uploads: create, upload parts (or copy them), complete, abort, list.

use super::*;

/// The upload named by `uploadId`, which must be for this bucket and key.
pub(super) fn this_upload(
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

pub(super) async fn create_upload(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
) -> Result<Response<Body>, S3Error> {
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
        .on_store({
            let max = (op.state.max_uploads)(&op.caller.account);
            move |s| s.create_upload(&info, max)
        })
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

pub(super) async fn upload_part(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
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
    let (id, _) = this_upload(op, bucket, key)?;
    let copying = op.headers.contains_key("x-amz-copy-source");
    let (tmp, size, md5, checksum) = if copying {
        let c = copy_source(op, true).await?;
        (c.tmp, c.size, c.md5, None)
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

pub(super) async fn complete_upload(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
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
            let inc = op.incarnation(bucket);
            move |s| s.complete(&upload, inc, &listed, now(), &condition)
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

pub(super) fn abort_upload(
    op: &Op<'_>,
    bucket: &str,
    key: &str,
) -> Result<Response<Body>, S3Error> {
    let (id, _) = this_upload(op, bucket, key)?;
    op.state.store.abort(&id).map_err(|_| no_such_upload(&id))?;
    Ok(respond(204, empty()))
}

pub(super) fn list_parts(op: &Op<'_>, bucket: &str, key: &str) -> Result<Response<Body>, S3Error> {
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

pub(super) fn list_uploads(op: &Op<'_>, bucket: &str) -> Result<Response<Body>, S3Error> {
    let prefix = op.q("prefix").unwrap_or("");
    let uploads: String = op
        .state
        .store
        .uploads_in(bucket, prefix)
        .into_iter()
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
