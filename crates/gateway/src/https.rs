//! Device HTTPS (port 8443): `POST /topics/{topic}?qos=&retain=` with a client certificate,
//! authorized by the certificate's IoT policies. As AWS documents, HTTPS has no client id, so
//! `iot:ClientId` and the thing variables are not available here.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use sekisho_broker::{Message, PublishError, aws};
use sekisho_mqtt::{Properties, QoS};
use serde_json::json;

use crate::authz::Principal;
use crate::conn::ConnInfo;
use crate::{DeviceStream, Shared, events};

fn reply(status: u16, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"message": message, "traceId": uuid::Uuid::new_v4().to_string()});
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn handle(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let Some(raw_topic) = path.strip_prefix("/topics/") else {
        return Ok(reply(404, "Not Found"));
    };
    if parts.method != Method::POST {
        return Ok(reply(405, "Method Not Allowed"));
    }
    let topic = percent_encoding::percent_decode_str(raw_topic)
        .decode_utf8_lossy()
        .into_owned();
    let query = parts.uri.query().unwrap_or("");
    let qos = match query_value(query, "qos") {
        None | Some("0") => QoS::AtMostOnce,
        Some("1") => QoS::AtLeastOnce,
        Some(_) => return Ok(reply(400, "qos must be 0 or 1")),
    };
    let retain = match query_value(query, "retain") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Ok(reply(400, "retain must be true or false")),
    };
    let limits = &shared.config.aws;
    if sekisho_mqtt::topic::validate_topic_name(&topic).is_err()
        || limits.check_topic(&topic).is_err()
    {
        return Ok(reply(400, "Invalid topic name"));
    }
    let payload = match Limited::new(body, limits.max_payload).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply(413, "The payload exceeds the maximum size allowed")),
    };
    let mut principal = match Principal::certificate(
        shared.registry.clone(),
        &info.account,
        &info.certificate_id,
        None,
        Some(info.peer.ip()),
        info.endpoint.private.as_ref(),
    ) {
        Ok(p) => p,
        Err(_) => return Ok(reply(403, "Forbidden")),
    };
    if principal.refresh().is_err() {
        return Ok(reply(403, "Forbidden"));
    }
    let allowed = aws::may_publish(&topic)
        && !(retain && topic.starts_with('$'))
        && principal.allowed("iot:publish", "topic", &topic)
        && (!retain || principal.allowed("iot:retainpublish", "topic", &topic));
    if !allowed {
        tracing::info!(certificate = %info.certificate_id, %topic, "HTTPS publish not authorized");
        return Ok(reply(403, "Forbidden"));
    }
    let msg = Message {
        topic: topic.into(),
        payload,
        qos,
        retain,
        properties: Properties::default(),
        expires_at: None,
        origin: None,
        timestamp_ms: events::now_ms(),
    };
    match shared.broker.publish(&info.account, Arc::new(msg)) {
        Ok(routed) => {
            crate::conn::wait_for_room(&shared.broker, routed.blocked).await;
            Ok(reply(200, "OK"))
        }
        Err(PublishError::RetainedQuota) => Ok(reply(429, "Too Many Requests")),
    }
}

/// Serves HTTP/1.1 on one authenticated device connection.
pub async fn serve(shared: Arc<Shared>, stream: DeviceStream, info: ConnInfo) {
    let info = Arc::new(info);
    let peer = info.peer;
    let svc = hyper::service::service_fn(move |req| handle(shared.clone(), info.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30))
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "device HTTPS connection ended");
    }
}
