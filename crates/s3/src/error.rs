//! S3's errors: the codes, statuses and messages S3 answers with, and the mapping of store,
//! authentication and body-decoding failures onto them.

use super::*;

/// An S3 error: status, code, message and extra elements.
#[derive(Debug)]
pub struct S3Error {
    pub(super) status: u16,
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) extra: Vec<(&'static str, String)>,
}

impl S3Error {
    pub(super) fn new(status: u16, code: &'static str, message: impl Into<String>) -> S3Error {
        S3Error {
            status,
            code,
            message: message.into(),
            extra: Vec::new(),
        }
    }

    pub(super) fn with(mut self, name: &'static str, value: impl Into<String>) -> S3Error {
        self.extra.push((name, value.into()));
        self
    }
}

pub(super) fn access_denied() -> S3Error {
    S3Error::new(403, "AccessDenied", "Access Denied")
}

pub(super) fn internal(e: impl std::fmt::Display) -> S3Error {
    tracing::error!(error = %e, "S3 request failed inside");
    S3Error::new(
        500,
        "InternalError",
        "We encountered an internal error. Please try again.",
    )
}

pub(super) fn not_implemented() -> S3Error {
    S3Error::new(
        501,
        "NotImplemented",
        "A header or query you provided requested a function that is not implemented.",
    )
}

pub(super) fn malformed_xml() -> S3Error {
    S3Error::new(
        400,
        "MalformedXML",
        "The XML you provided was not well-formed or did not validate against our published schema",
    )
}

/// `InvalidArgument` naming the argument and its value.
pub(super) fn invalid_argument(message: &str, name: &str, value: &str) -> S3Error {
    S3Error::new(400, "InvalidArgument", message)
        .with("ArgumentName", name)
        .with("ArgumentValue", value)
}

pub(super) fn no_such_upload(id: &str) -> S3Error {
    S3Error::new(
        404,
        "NoSuchUpload",
        "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.",
    )
    .with("UploadId", id)
}

pub(super) fn too_large(max: u64) -> S3Error {
    S3Error::new(
        400,
        "EntityTooLarge",
        "Your proposed upload exceeds the maximum allowed size",
    )
    .with("MaxSizeAllowed", max.to_string())
}

pub(super) fn store_error(e: StoreError, bucket: &str) -> S3Error {
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
        StoreError::TooManyUploads(max) => S3Error::new(
            400,
            "InvalidRequest",
            format!(
                "This account already has {max} multipart uploads in progress (the most it may have); complete or abort some first."
            ),
        ),
        StoreError::KeyTooLong(max) => S3Error::new(
            400,
            "KeyTooLongError",
            format!(
                "Your key is too long: this store keeps keys of at most {max} bytes, and at most what its S3 backend keeps."
            ),
        ),
        StoreError::UnsupportedKey => S3Error::new(
            400,
            "InvalidArgument",
            "This store does not keep keys with a '.' or '..' segment or an empty segment before the last.",
        ),
        StoreError::Io(e) => internal(e),
    }
}

/// A store error during a multipart upload: NoSuchUpload names the upload.
pub(super) fn upload_error(e: StoreError, id: &str, bucket: &str) -> S3Error {
    match e {
        StoreError::NoSuchUpload => no_such_upload(id),
        e => store_error(e, bucket),
    }
}

pub(super) fn no_such_bucket(bucket: &str) -> S3Error {
    S3Error::new(404, "NoSuchBucket", "The specified bucket does not exist")
        .with("BucketName", bucket)
}

pub(super) fn auth_error(f: AuthFailure, region: &str, presigned: bool) -> S3Error {
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
        AuthFailure::Signature(e @ SigError::UnsignedHeaders(_)) => {
            S3Error::new(403, "AccessDenied", e.to_string())
        }
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

pub(super) fn sha_mismatch() -> S3Error {
    S3Error::new(
        400,
        "XAmzContentSHA256Mismatch",
        "The provided 'x-amz-content-sha256' header does not match what was computed.",
    )
}

pub(super) fn chunk_error(e: ChunkError) -> S3Error {
    match e {
        ChunkError::Signature => S3Error::new(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your key and signing method.",
        ),
        ChunkError::Malformed(m) => S3Error::new(400, "IncompleteBody", m),
    }
}
