//! The query protocol's XML (IAM, STS): responses, errors, escaping.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use crate::ApiError;

/// IAM's namespace.
pub const IAM_NS: &str = "https://iam.amazonaws.com/doc/2010-05-08/";
/// STS's namespace.
pub const STS_NS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";

/// Escaping and elements: the same XML writers as the object store's.
pub use sekisho_s3::xml::{el, esc};

/// An ISO 8601 timestamp (`2026-11-23T01:02:03Z`) from epoch seconds.
pub fn time(epoch: f64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(epoch as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A policy document as IAM returns it: URL-encoded (boto3 decodes it).
pub fn policy_doc(doc: &str) -> String {
    percent_encoding::utf8_percent_encode(doc, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn respond(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/xml"),
    );
    r
}

/// `<{action}Response><{action}Result>inner</...><ResponseMetadata/></...>`.
pub fn ok(ns: &str, action: &str, inner: &str) -> Response<Full<Bytes>> {
    let id = uuid::Uuid::new_v4();
    // Always present, even empty: botocore requires the result element of every operation
    // that declares an output (UpdateRole's is empty), and ignores it for the others.
    let result = format!("<{action}Result>{inner}</{action}Result>");
    respond(
        200,
        format!(
            "<{action}Response xmlns=\"{ns}\">{result}<ResponseMetadata><RequestId>{id}</RequestId></ResponseMetadata></{action}Response>"
        ),
    )
}

/// `<ErrorResponse><Error><Type/><Code/><Message/></Error><RequestId/></ErrorResponse>`.
pub fn error_response(ns: &str, e: &ApiError) -> Response<Full<Bytes>> {
    let id = uuid::Uuid::new_v4();
    let kind = if e.status >= 500 {
        "Receiver"
    } else {
        "Sender"
    };
    respond(
        e.status,
        format!(
            "<ErrorResponse xmlns=\"{ns}\"><Error><Type>{kind}</Type>{}{}</Error><RequestId>{id}</RequestId></ErrorResponse>",
            el("Code", e.code),
            el("Message", &e.message)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_time() {
        assert_eq!(esc("<a&'\">"), "&lt;a&amp;&apos;&quot;&gt;");
        assert_eq!(time(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(policy_doc("{\"a\": 1}"), "%7B%22a%22%3A%201%7D");
    }
}
