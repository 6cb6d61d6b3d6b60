//! Bucket operations and listings.

use super::*;

pub(super) fn list_buckets(op: &Op<'_>) -> Result<Response<Body>, S3Error> {
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
pub(super) fn canonical_id(account: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, account.as_bytes()))
}

pub(super) async fn create_bucket(
    op: &Op<'_>,
    bucket: &str,
    body: Incoming,
) -> Result<Response<Body>, S3Error> {
    no_acls(op)?;
    if !store::valid_bucket_name(bucket) {
        return Err(S3Error::new(
            400,
            "InvalidBucketName",
            "The specified bucket is not valid.",
        )
        .with("BucketName", bucket));
    }
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

pub(super) fn delete_bucket(op: &Op<'_>, bucket: &str) -> Result<Response<Body>, S3Error> {
    op.state
        .store
        .delete_bucket(bucket)
        .map_err(|e| store_error(e, bucket))?;
    tracing::info!(bucket, "bucket deleted");
    Ok(respond(204, empty()))
}

pub(super) fn head_bucket(op: &Op<'_>) -> Result<Response<Body>, S3Error> {
    let mut r = respond(200, empty());
    set(&mut r, "x-amz-bucket-region", &op.state.endpoints.region);
    Ok(r)
}

pub(super) fn bucket_location(op: &Op<'_>) -> Result<Response<Body>, S3Error> {
    let region = &op.state.endpoints.region;
    let shown = if region == "us-east-1" { "" } else { region };
    Ok(xml_ok(format!(
        "<LocationConstraint xmlns=\"{}\">{}</LocationConstraint>",
        xml::NS,
        esc(shown)
    )))
}

/// URL-encodes a listed name when the client asked for `encoding-type=url`.
pub(super) fn listed(name: &str, url: bool) -> String {
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

pub(super) fn list_objects(
    op: &Op<'_>,
    bucket: &str,
    owner: &str,
) -> Result<Response<Body>, S3Error> {
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
        el("ID", &canonical_id(owner)),
        el("DisplayName", owner)
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
