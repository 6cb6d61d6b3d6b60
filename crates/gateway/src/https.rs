//! Device HTTPS (port 8443), the iot-data plane.
//!
//! - With a client certificate: `POST /topics/{topic}?qos=&retain=`, authorized by the
//!   certificate's IoT policies. As AWS documents, HTTPS has no client id, so `iot:ClientId`
//!   and the thing variables are not available here.
//! - Without one, every request is signed (SigV4, signing name `iotdata` or
//!   `iotdevicegateway`) and authorized by the caller's IAM policies: Publish (with MQTT 5
//!   properties), GetRetainedMessage, ListRetainedMessages, DeleteConnection. The server name
//!   chooses the account; credentials of another account are refused.
//! - Without either, on an account's data endpoint, a request that names a custom authorizer
//!   (or meets the account's default one) is authorized by the policies its function answers,
//!   as a certificate's would be (`crate::custom_auth`); the answer is kept for the HTTP
//!   connection's next requests for `refreshAfterInSeconds` if the authorizer caches for
//!   HTTP.
//! - Both: the Device Shadow REST API (`/things/{thing}/shadow`, ListNamedShadowsForThing),
//!   answered by the shadow service (`crate::shadow`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use sekisho_broker::{Message, PublishError, aws};
use sekisho_mqtt::{Properties, QoS};
use serde_json::json;

use crate::authz::Principal;
use crate::conn::ConnInfo;
use crate::{DeviceStream, Shared, events};
use sekisho_registry::{AccountId, ClientId};

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

/// An error as the iot-data REST protocol carries it (the type in `x-amzn-ErrorType`).
fn error(status: u16, kind: &'static str, message: &str) -> Response<Full<Bytes>> {
    let mut r = reply(status, message);
    r.headers_mut().insert(
        "x-amzn-errortype",
        hyper::header::HeaderValue::from_static(kind),
    );
    r
}

fn json_reply(body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A query parameter's raw value; names are compared percent-decoded (`n%61me` is `name`).
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| percent_encoding::percent_decode_str(k).decode_utf8_lossy() == name)
        .map(|(_, v)| v)
}

/// Who an HTTPS request acts as, when its policies are IoT policies.
#[derive(Debug)]
enum Who {
    /// The connection's client certificate.
    Certificate(sekisho_registry::CertificateId),
    /// A custom authorizer's answer, and the authorizer's name and creation time.
    Custom(Box<((String, f64), sekisho_functions::authorizer::Decision)>),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Certificate(c) => write!(f, "certificate {c}"),
            Who::Custom(c) => write!(f, "custom principal {}", c.1.principal_id),
        }
    }
}

impl Who {
    /// The principal for one request (no client id, so no thing variables), its policies
    /// bound now; `None` if it may not act.
    fn principal(&self, shared: &Shared, info: &ConnInfo) -> Option<Principal> {
        match self {
            Who::Certificate(c) => cert_principal(shared, info, c),
            Who::Custom(c) => Principal::custom(
                shared.registry.clone(),
                &info.account,
                (c.0.0.as_str(), c.0.1),
                &c.1.principal_id,
                &c.1.policies,
                None,
                Some(info.peer.ip()),
                info.endpoint.private.as_ref(),
                sekisho_registry::now_secs() + f64::from(c.1.disconnect_after),
            )
            .ok(),
        }
    }
}

/// A custom authorizer's answer kept for an HTTP connection (`enableCachingForHttp`): for
/// which incarnation of which authorizer (name, creation and last change: a key rotated or
/// the authorizer re-created asks again), token and signature, and until when.
struct HttpCached {
    key: HttpCacheKey,
    decision: sekisho_functions::authorizer::Decision,
    until: std::time::Instant,
}

type HttpCacheKey = (String, u64, u64, String, Option<String>);

/// A connection's cache of its custom authorizer's answer.
type HttpCache = Arc<std::sync::Mutex<Option<HttpCached>>>;

/// Whether a request carries a SigV4 signature (header or query).
fn sigv4_signed(headers: &[(String, String)], query: &str) -> bool {
    headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        || query.split('&').any(|kv| {
            let k = kv.split_once('=').map_or(kv, |(k, _)| k);
            k.eq_ignore_ascii_case("X-Amz-Signature") || k.eq_ignore_ascii_case("X-Amz-Credential")
        })
}

/// What custom authentication makes of a request without a certificate.
enum CustomOutcome {
    /// Not for a custom authorizer: signed, or no authorizer to ask.
    NotCustom,
    /// Refused, with the answer.
    Refused(Response<Full<Bytes>>),
    /// Authenticated by the authorizer named (name, creation time).
    Decided((String, f64), sekisho_functions::authorizer::Decision),
}

/// Whether a request is for a route a custom authorizer's principal may use (publish, the
/// shadow and jobs APIs): the function is never invoked for anything else.
fn custom_route(parts: &hyper::http::request::Parts) -> bool {
    let path = parts.uri.path();
    (parts.method == Method::POST && path.starts_with("/topics/"))
        || shadow_call(&parts.method, path, parts.uri.query().unwrap_or("")).is_some()
        || crate::jobs::HttpCall::parse(&parts.method, path).is_some()
}

/// Custom authentication of one HTTPS request: on an account's data endpoint, an unsigned
/// request for a route a custom principal may use goes to the authorizer it names, or to the
/// account's default.
async fn custom_request(
    shared: &Shared,
    info: &ConnInfo,
    parts: &hyper::http::request::Parts,
    cache: &HttpCache,
) -> CustomOutcome {
    let headers = crate::authn::header_pairs(&parts.headers);
    let query = parts.uri.query().unwrap_or("");
    if info.account.is_empty() || sigv4_signed(&headers, query) || !custom_route(parts) {
        return CustomOutcome::NotCustom;
    }
    let account = info.account.as_str();
    let unauthorized =
        || CustomOutcome::Refused(error(401, "UnauthorizedException", "Unauthorized"));
    let name = crate::custom_auth::http_name(&headers, query);
    let authorizer = match crate::custom_auth::resolve(shared, account, name.as_deref()) {
        Ok(a) => a,
        Err(_) if name.is_none() => return CustomOutcome::NotCustom,
        Err(_) => {
            tracing::info!(peer = %info.peer, name = ?name, "HTTPS request names no authorizer of the account");
            return unauthorized();
        }
    };
    let presented = match crate::custom_auth::http_presented(
        &authorizer,
        &headers,
        query,
        info.server_name.clone(),
    ) {
        Ok(p) => p,
        Err(why) => {
            tracing::info!(peer = %info.peer, why = ?why, "HTTPS request refused by custom authentication");
            return unauthorized();
        }
    };
    // Cached only for a token (the credential the answer is for), and only while the same
    // incarnation of the authorizer is ACTIVE; any miss or refusal forgets what was kept.
    let key = presented.token.clone().map(|token| {
        (
            authorizer.name.clone(),
            authorizer.created.to_bits(),
            authorizer.modified.to_bits(),
            token,
            presented.signature.clone(),
        )
    });
    let now = std::time::Instant::now();
    let caching = authorizer.caching_for_http && authorizer.active;
    if let Ok(mut c) = cache.lock() {
        let hit = c
            .as_ref()
            .filter(|c| caching && Some(&c.key) == key.as_ref() && c.until > now)
            .map(|c| c.decision.clone());
        if let Some(d) = hit {
            return CustomOutcome::Decided((authorizer.name, authorizer.created), d);
        }
        *c = None;
    }
    match crate::custom_auth::run(shared, account, &authorizer, &presented).await {
        Ok(d) => {
            if caching
                && let Some(key) = key
                && let Ok(mut c) = cache.lock()
            {
                let secs = d.refresh_after.min(d.disconnect_after);
                *c = Some(HttpCached {
                    key,
                    decision: d.clone(),
                    until: now + std::time::Duration::from_secs(u64::from(secs)),
                });
            }
            CustomOutcome::Decided((authorizer.name, authorizer.created), d)
        }
        Err(crate::custom_auth::Refused::Busy) => {
            CustomOutcome::Refused(error(429, "ThrottlingException", "Rate exceeded"))
        }
        Err(why) => {
            tracing::info!(peer = %info.peer, authorizer = %authorizer.name, why = ?why, "HTTPS request refused by custom authentication");
            unauthorized()
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    cache: HttpCache,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/mqtt" && crate::ws::is_upgrade(req.headers()) {
        return Ok(websocket(shared, info, &mut req).await);
    }
    let (parts, body) = req.into_parts();
    let who = match &info.certificate {
        Some(certificate) => {
            // A keep-alive connection outlives its handshake: the certificate and its CA are
            // checked again on every request, so a revocation or deactivation refuses the
            // very next one.
            if let Err(why) = shared
                .registry
                .certificate_usable(&info.account, certificate)
            {
                tracing::info!(%certificate, %why, "HTTPS request refused: certificate no longer usable");
                return Ok(if parts.uri.path().starts_with("/role-aliases/") {
                    cred_error(403, "AccessDeniedException", "Access Denied")
                } else {
                    reply(403, "Forbidden")
                });
            }
            Who::Certificate(certificate.clone())
        }
        None => match custom_request(&shared, &info, &parts, &cache).await {
            CustomOutcome::NotCustom => {
                return Ok(signed_request(&shared, &info, parts, body).await);
            }
            CustomOutcome::Refused(r) => return Ok(r),
            CustomOutcome::Decided(a, d) => Who::Custom(Box::new((a, d))),
        },
    };
    let path = parts.uri.path();
    if let Some(alias) = path
        .strip_prefix("/role-aliases/")
        .and_then(|r| r.strip_suffix("/credentials"))
    {
        if parts.method != Method::GET {
            return Ok(reply(405, "Method Not Allowed"));
        }
        // The credential provider takes certificates only.
        let Who::Certificate(_) = &who else {
            return Ok(cred_error(403, "AccessDeniedException", "Access Denied"));
        };
        let alias = percent_encoding::percent_decode_str(alias)
            .decode_utf8_lossy()
            .into_owned();
        let thing = parts
            .headers
            .get("x-amzn-iot-thingname")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return Ok(credentials(&shared, &info, &alias, thing.as_deref()));
    }
    let limits = &shared.config.aws;
    if let Some(call) = shadow_call(&parts.method, path, parts.uri.query().unwrap_or("")) {
        let call = match call {
            Ok(c) => c,
            Err((status, kind, m)) => return Ok(error(status, kind, &m)),
        };
        // Errors in the shadow service's own form (`{"code","message"}` and the error type).
        let refuse = |code: u16, message: &str| {
            shadow_error(&sekisho_shadow::Error {
                code,
                message: message.into(),
            })
        };
        let body = match crate::read_body(body, limits.max_payload, crate::BODY_DEADLINE).await {
            Ok(b) => b,
            Err(crate::BodyError::TooLarge) => {
                return Ok(refuse(413, "The payload exceeds the maximum size allowed"));
            }
            Err(_) => return Ok(reply(408, "Request Timeout")),
        };
        let Some(mut principal) = who.principal(&shared, &info) else {
            return Ok(refuse(403, "Forbidden"));
        };
        let (action, resource) = call.action();
        if !principal.allowed(&action.to_ascii_lowercase(), "thing", &resource) {
            tracing::info!(%who, %action, %resource, "HTTPS shadow request not authorized");
            return Ok(refuse(403, "Forbidden"));
        }
        return Ok(shadow_rest(&shared, &info.account, call, body).await);
    }
    if let Some(call) = crate::jobs::HttpCall::parse(&parts.method, path) {
        let call = match call {
            Ok(c) => c,
            Err(m) => return Ok(jobs_refusal(m)),
        };
        let body = match crate::read_body(body, limits.max_payload, crate::BODY_DEADLINE).await {
            Ok(b) => b,
            Err(crate::BodyError::TooLarge) => {
                return Ok(error(
                    413,
                    "InvalidRequestException",
                    "The payload is too large",
                ));
            }
            Err(_) => return Ok(reply(408, "Request Timeout")),
        };
        let Some(mut principal) = who.principal(&shared, &info) else {
            return Ok(error(403, "ForbiddenException", "Forbidden"));
        };
        let (action, thing) = call.action();
        if !principal.allowed(&action.to_ascii_lowercase(), "thing", thing) {
            tracing::info!(%who, %action, %thing, "HTTPS jobs request not authorized");
            return Ok(error(403, "ForbiddenException", "Forbidden"));
        }
        let query = parts.uri.query().unwrap_or("");
        return Ok(jobs_answer(&shared, &info.account, &call, query, &body));
    }
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
    if sekisho_mqtt::topic::validate_topic_name(&topic).is_err()
        || limits.check_topic(&topic).is_err()
    {
        return Ok(reply(400, "Invalid topic name"));
    }
    let payload = match crate::read_body(body, limits.max_payload, crate::BODY_DEADLINE).await {
        Ok(b) => b,
        Err(crate::BodyError::TooLarge) => {
            return Ok(reply(413, "The payload exceeds the maximum size allowed"));
        }
        Err(_) => return Ok(reply(408, "Request Timeout")),
    };
    let Some(mut principal) = who.principal(&shared, &info) else {
        return Ok(reply(403, "Forbidden"));
    };
    let allowed = aws::may_publish(&topic)
        && !aws::is_provisioning_request(&topic)
        && !(retain && topic.starts_with('$'))
        && principal.allowed("iot:publish", "topic", &topic)
        && (!retain || principal.allowed("iot:retainpublish", "topic", &topic));
    if !allowed {
        tracing::info!(%who, %topic, "HTTPS publish not authorized");
        return Ok(reply(403, "Forbidden"));
    }
    let msg = Arc::new(Message {
        topic: topic.into(),
        payload,
        qos,
        retain,
        properties: Properties::default(),
        expires_at: None,
        origin: None,
        timestamp_ms: events::now_ms(),
    });
    match shared
        .broker
        .publish_from_client(&info.account, msg.clone(), std::time::Instant::now())
    {
        Ok(routed) => {
            sekisho_broker::wait_for_room(
                &shared.broker,
                &info.account,
                routed.blocked,
                tokio::time::Instant::now(),
            )
            .await;
            // Acknowledged only once durable (stored for persistent sessions, retained).
            if !shared.broker.durable_until(routed.ticket).await {
                return Ok(reply(503, "Service Unavailable"));
            }
            shared
                .shadows
                .on_publish(&info.account, &msg.topic, &msg.payload);
            Ok(reply(200, "OK"))
        }
        Err(PublishError::RetainedQuota | PublishError::Throttled) => {
            Ok(reply(429, "Too Many Requests"))
        }
    }
}

/// The certificate's principal for one HTTPS request (no client id, so no thing variables),
/// its policies bound now; `None` if the certificate may not act.
fn cert_principal(
    shared: &Shared,
    info: &ConnInfo,
    certificate: &sekisho_registry::CertificateId,
) -> Option<Principal> {
    let mut principal = Principal::certificate(
        shared.registry.clone(),
        &info.account,
        certificate,
        None,
        Some(info.peer.ip()),
        info.endpoint.private.as_ref(),
    )
    .ok()?;
    principal.refresh().ok()?;
    Some(principal)
}

/// Serves HTTP/1.1 on one authenticated device connection, or MQTT if the client chose it by
/// ALPN (`x-amzn-mqtt-ca`, which needs a client certificate), as on AWS's port 443.
pub async fn serve(shared: Arc<Shared>, stream: DeviceStream, mut info: ConnInfo) {
    // MQTT by ALPN `mqtt`: custom authentication (the username names the authorizer), on
    // one of an account's data endpoints (the server name says which).
    if stream.alpn_protocol() == Some(crate::tls::ALPN_MQTT_CUSTOM) {
        if info.account.as_str().is_empty() {
            tracing::info!(peer = %info.peer, "MQTT by ALPN mqtt without an account's server name; refusing");
            return;
        }
        // With a certificate, the account would be the certificate's, not the server name's
        // (and AWS's X.509 custom authentication is a domain configuration's, not served).
        if info.certificate.is_some() {
            tracing::info!(peer = %info.peer, "MQTT by ALPN mqtt with a client certificate; refusing");
            return;
        }
        info.custom = Some(crate::custom_auth::CustomAuth::AtConnect);
        return crate::conn::serve(shared, stream, info).await;
    }
    if stream.alpn_protocol() == Some(crate::tls::ALPN_MQTT) {
        if info.certificate.is_none() {
            tracing::info!(peer = %info.peer, "MQTT by ALPN without a client certificate; refusing");
            return;
        }
        return crate::conn::serve(shared, stream, info).await;
    }
    let info = Arc::new(info);
    let peer = info.peer;
    let cache: HttpCache = Arc::default();
    let svc = hyper::service::service_fn(move |req| {
        handle(shared.clone(), info.clone(), cache.clone(), req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(crate::HEADER_DEADLINE)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "device HTTPS connection ended");
    }
}

/// One SigV4-signed iot-data request (no client certificate).
async fn signed_request(
    shared: &Shared,
    info: &ConnInfo,
    parts: hyper::http::request::Parts,
    body: Incoming,
) -> Response<Full<Bytes>> {
    let limits = &shared.config.aws;
    const SERVICES: &[&str] = &["iotdata", "iotdevicegateway", "iot-jobs-data"];
    let refuse = |f: crate::authn::AuthFailure| {
        tracing::info!(peer = %info.peer, failure = ?f, "iot-data request not authenticated");
        let msg = match f {
            crate::authn::AuthFailure::Expired => {
                "The security token included in the request is expired".to_string()
            }
            crate::authn::AuthFailure::UnknownKey => {
                "The security token included in the request is invalid".to_string()
            }
            crate::authn::AuthFailure::Signature(e) => e.to_string(),
            crate::authn::AuthFailure::Service(s) => {
                format!("Credential should be scoped to correct service, not '{s}'")
            }
            crate::authn::AuthFailure::Region(r) => {
                format!("Credential should be scoped to a valid region, not '{r}'")
            }
        };
        error(401, "UnauthorizedException", &msg)
    };
    let headers = crate::authn::header_pairs(&parts.headers);
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    // The claim is parsed once, and looked at before the body is read: nothing is read from a
    // client that did not sign, or signed with a key nobody has.
    let claim = match sekisho_sigv4::parse(&sekisho_sigv4::Request {
        method: parts.method.as_str(),
        path: &path,
        query: &query,
        headers: &headers,
        body_sha256: "",
    }) {
        Ok(c) => c,
        Err(e) => return refuse(crate::authn::AuthFailure::Signature(e)),
    };
    if let Err(f) = crate::authn::precheck(&shared.registry, &claim, SERVICES) {
        return refuse(f);
    }
    // A signature is for one service: the jobs data plane's routes take `iot-jobs-data`, the
    // others `iotdata` or `iotdevicegateway`.
    let jobs_call = crate::jobs::HttpCall::parse(&parts.method, &path);
    if jobs_call.is_some() != (claim.service == "iot-jobs-data") {
        return refuse(crate::authn::AuthFailure::Service(claim.service.clone()));
    }
    let body = match crate::read_body(body, limits.max_payload, crate::BODY_DEADLINE).await {
        Ok(b) => b,
        Err(crate::BodyError::TooLarge) => {
            return error(
                413,
                "RequestEntityTooLargeException",
                "The payload exceeds the maximum size allowed",
            );
        }
        Err(_) => return error(408, "RequestTimeoutException", "Request Timeout"),
    };
    let sha = {
        use aws_lc_rs::digest;
        hex::encode(digest::digest(&digest::SHA256, &body))
    };
    let sreq = sekisho_sigv4::Request {
        method: parts.method.as_str(),
        path: &path,
        query: &query,
        headers: &headers,
        body_sha256: &sha,
    };
    let caller = match crate::authn::verify_claim(
        &shared.registry,
        shared.registry.region(),
        &sreq,
        claim,
        sekisho_sigv4::Options::default(),
    ) {
        Ok((c, _)) => c,
        Err(f) => return refuse(f),
    };
    // The endpoint's account: credentials of another account do not reach it.
    if !info.account.is_empty() && info.account != caller.account {
        return error(403, "ForbiddenException", "Forbidden");
    }
    let account = caller.account.clone();
    let request = crate::authn::RequestContext {
        region: Some(shared.registry.region().to_owned()),
        ..crate::authn::RequestContext::tls(
            info.peer.ip(),
            info.endpoint
                .private
                .as_ref()
                .map(|p| (p.vpce_id.as_str(), p.vpc_id.as_str())),
            sekisho_registry::now_secs() as i64,
        )
    };
    let arn = |kind: &str, name: &str| shared.registry.arn(&account, &format!("{kind}/{name}"));
    // An authenticated Cognito identity needs the IoT policies attached to it to allow too.
    let allowed = |action: &str, resource: &str| {
        crate::authn::is_authorized(&shared.registry, &caller, &request, action, resource, &[])
            && crate::authz::cognito_iot_allowed(
                &shared.registry,
                &caller,
                &request,
                &action.to_ascii_lowercase(),
                resource,
            )
    };
    let denied = |action: &str, resource: &str| {
        tracing::info!(caller = %caller.arn(), %action, %resource, "iot-data request not authorized");
        error(
            403,
            "ForbiddenException",
            &format!(
                "User: {} is not authorized to perform: {action} on resource: {resource}",
                caller.arn()
            ),
        )
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let q = |name: &str| query_value(&query, name).map(decode);
    if let Some(call) = jobs_call {
        let call = match call {
            Ok(c) => c,
            Err(m) => return jobs_refusal(m),
        };
        let (action, thing) = call.iam_action();
        let resource = arn("thing", thing);
        if !allowed(action, &resource) {
            return denied(action, &resource);
        }
        return jobs_answer(shared, &account, &call, &query, &body);
    }
    if let Some(call) = shadow_call(&parts.method, &path, &query) {
        let call = match call {
            Ok(c) => c,
            Err((status, kind, m)) => return error(status, kind, &m),
        };
        let (action, resource) = call.action();
        let resource = arn("thing", &resource);
        if !allowed(action, &resource) {
            return denied(action, &resource);
        }
        return shadow_rest(shared, &account, call, body).await;
    }
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    match (&parts.method, segs.as_slice()) {
        (&Method::POST, ["topics", raw]) => {
            let topic = decode(raw);
            let qos = match q("qos").as_deref() {
                None | Some("0") => QoS::AtMostOnce,
                Some("1") => QoS::AtLeastOnce,
                Some(_) => return error(400, "InvalidRequestException", "qos must be 0 or 1"),
            };
            let retain = match q("retain").as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(_) => {
                    return error(
                        400,
                        "InvalidRequestException",
                        "retain must be true or false",
                    );
                }
            };
            if sekisho_mqtt::topic::validate_topic_name(&topic).is_err()
                || limits.check_topic(&topic).is_err()
                || !aws::may_publish(&topic)
                || aws::is_provisioning_request(&topic)
                || (retain && topic.starts_with('$'))
            {
                return error(400, "InvalidRequestException", "Invalid topic name");
            }
            let resource = arn("topic", &topic);
            if !allowed("iot:Publish", &resource) {
                return denied("iot:Publish", &resource);
            }
            if retain && !allowed("iot:RetainPublish", &resource) {
                return denied("iot:RetainPublish", &resource);
            }
            let props = match mqtt5_properties(&headers, &q) {
                Ok(p) => p,
                Err(m) => return error(400, "InvalidRequestException", &m),
            };
            let expiry = props.message_expiry_interval;
            let msg = Arc::new(Message {
                topic: topic.into(),
                payload: body,
                qos,
                retain,
                properties: props,
                expires_at: expiry.map(|e| {
                    std::time::Instant::now() + std::time::Duration::from_secs(u64::from(e))
                }),
                origin: None,
                timestamp_ms: events::now_ms(),
            });
            match shared.broker.publish_from_client(
                &account,
                msg.clone(),
                std::time::Instant::now(),
            ) {
                Ok(routed) => {
                    sekisho_broker::wait_for_room(
                        &shared.broker,
                        &info.account,
                        routed.blocked,
                        tokio::time::Instant::now(),
                    )
                    .await;
                    if !shared.broker.durable_until(routed.ticket).await {
                        return error(503, "ServiceUnavailableException", "Storage is unavailable");
                    }
                    shared
                        .shadows
                        .on_publish(&account, &msg.topic, &msg.payload);
                    json_reply(json!({}))
                }
                Err(PublishError::RetainedQuota) => error(
                    429,
                    "ThrottlingException",
                    "Retained message quota exceeded",
                ),
                Err(PublishError::Throttled) => error(429, "ThrottlingException", "Rate exceeded"),
            }
        }
        (&Method::GET, ["retainedMessage", raw]) => {
            let topic = decode(raw);
            let resource = arn("topic", &topic);
            if !allowed("iot:GetRetainedMessage", &resource) {
                return denied("iot:GetRetainedMessage", &resource);
            }
            match shared
                .broker
                .retained_for(&account, &topic, std::time::Instant::now())
            {
                Some(m) => {
                    use base64::Engine as _;
                    json_reply(json!({"topic": &*m.topic,
                        "payload": base64::engine::general_purpose::STANDARD.encode(&m.payload),
                        "qos": m.qos as u8, "lastModifiedTime": m.timestamp_ms}))
                }
                None => error(
                    404,
                    "ResourceNotFoundException",
                    "No retained message exists for the topic",
                ),
            }
        }
        (&Method::GET, ["retainedMessage"]) => {
            if !allowed("iot:ListRetainedMessages", "*") {
                return denied("iot:ListRetainedMessages", "*");
            }
            let max = match q("maxResults").map(|v| v.parse::<usize>()) {
                None => 200,
                Some(Ok(n)) if (1..=200).contains(&n) => n,
                Some(_) => {
                    return error(
                        400,
                        "InvalidRequestException",
                        "maxResults must be 1 to 200",
                    );
                }
            };
            let token = q("nextToken");
            let (page, next) = shared.broker.retained_page(
                &account,
                token.as_deref(),
                max,
                std::time::Instant::now(),
            );
            let topics: Vec<serde_json::Value> = page
                .iter()
                .map(|m| {
                    json!({"topic": &*m.topic, "payloadSize": m.payload.len(),
                    "qos": m.qos as u8, "lastModifiedTime": m.timestamp_ms})
                })
                .collect();
            json_reply(json!({"retainedTopics": topics, "nextToken": next}))
        }
        (&Method::DELETE, ["connections", raw]) => {
            let client = decode(raw);
            let resource = arn("client", &client);
            if !allowed("iot:DeleteConnection", &resource) {
                return denied("iot:DeleteConnection", &resource);
            }
            if client.starts_with('$') || client.is_empty() {
                return error(400, "InvalidRequestException", "Invalid client id");
            }
            if shared
                .broker
                .kick_client(&account, &client, sekisho_broker::Kick::Administrative)
            {
                json_reply(json!({}))
            } else {
                error(
                    404,
                    "ResourceNotFoundException",
                    "No connection with this client id",
                )
            }
        }
        _ => error(405, "MethodNotAllowedException", "Method Not Allowed"),
    }
}

/// The MQTT 5 properties iot-data Publish carries in headers and query parameters.
fn mqtt5_properties(
    headers: &[(String, String)],
    q: &dyn Fn(&str) -> Option<String>,
) -> Result<Properties, String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    let mut p = Properties::default();
    if let Some(v) = header("x-amz-mqtt5-user-properties") {
        let raw = b64
            .decode(v)
            .map_err(|_| "x-amz-mqtt5-user-properties is not base64".to_string())?;
        let bad = || "x-amz-mqtt5-user-properties must be a JSON list of objects".to_string();
        // A JSON list, or (as some clients double-encode) a JSON string holding one.
        let mut value: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
        if let serde_json::Value::String(inner) = &value {
            value = serde_json::from_str(inner).map_err(|_| bad())?;
        }
        let list: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_value(value).map_err(|_| bad())?;
        for obj in list {
            for (k, v) in obj {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                p.user_properties.push(sekisho_mqtt::UserProperty {
                    key: k.into(),
                    value: v.into(),
                });
            }
        }
    }
    match header("x-amz-mqtt5-payload-format-indicator") {
        None => {}
        Some("UNSPECIFIED_BYTES") => p.payload_format_indicator = Some(0),
        Some("UTF8_DATA") => p.payload_format_indicator = Some(1),
        Some(other) => return Err(format!("payloadFormatIndicator {other:?} is not valid")),
    }
    if let Some(v) = header("x-amz-mqtt5-correlation-data") {
        p.correlation_data =
            Some(Bytes::from(b64.decode(v).map_err(|_| {
                "x-amz-mqtt5-correlation-data is not base64".to_string()
            })?));
    }
    if let Some(v) = q("contentType") {
        p.content_type = Some(v.into());
    }
    if let Some(v) = q("responseTopic") {
        if sekisho_mqtt::topic::validate_topic_name(&v).is_err() {
            return Err("responseTopic is not a valid topic".into());
        }
        p.response_topic = Some(v.into());
    }
    if let Some(v) = q("messageExpiry") {
        let secs: u32 = v
            .parse()
            .ok()
            .filter(|s| (1..=604_800).contains(s))
            .ok_or_else(|| "messageExpiry must be 1 to 604800 seconds".to_string())?;
        p.message_expiry_interval = Some(secs);
    }
    // What MQTT can carry: every string and binary property at most 65,535 bytes (a larger
    // one could be neither delivered nor stored).
    const MAX: usize = u16::MAX as usize;
    let too_long = p
        .user_properties
        .iter()
        .any(|u| u.key.len() > MAX || u.value.len() > MAX)
        || p.correlation_data.as_ref().is_some_and(|c| c.len() > MAX)
        || p.content_type.as_ref().is_some_and(|c| c.len() > MAX)
        || p.response_topic.as_ref().is_some_and(|c| c.len() > MAX);
    if too_long {
        return Err("an MQTT 5 property is longer than 65,535 bytes".into());
    }
    Ok(p)
}

/// MQTT over WebSocket: `GET /mqtt` with `Upgrade: websocket` and subprotocol `mqtt`, signed
/// with a SigV4 presigned URL (signing name `iotdevicegateway`; the session token may be
/// appended after signing, as AWS's SDKs do). The MQTT connection is then authorized by the
/// caller's IAM policies and ends when its credentials expire (at most 24 h).
async fn websocket(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    req: &mut Request<Incoming>,
) -> Response<Full<Bytes>> {
    let headers = crate::authn::header_pairs(req.headers());
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    // Unsigned, on an account's data endpoint: custom authentication, by what the upgrade
    // carries, or at CONNECT if it carries nothing for an authorizer.
    let custom = if info.account.is_empty() || sigv4_signed(&headers, &query) {
        None
    } else {
        let account = info.account.as_str();
        let name = crate::custom_auth::http_name(&headers, &query);
        match crate::custom_auth::resolve(&shared, account, name.as_deref()) {
            // No authorizer named and none by default: the CONNECT's username may name one,
            // if the account has one ACTIVE; otherwise this is a SigV4 upgrade that lacks its
            // signature.
            Err(_) if name.is_none() => shared
                .registry
                .list_authorizers(account, Some(true), true, None, 1)
                .is_ok_and(|p| !p.items.is_empty())
                .then_some(crate::custom_auth::CustomAuth::AtConnect),
            Err(_) => {
                tracing::info!(peer = %info.peer, name = ?name, "WebSocket upgrade names no authorizer of the account");
                return error(401, "UnauthorizedException", "Unauthorized");
            }
            Ok(a) if !crate::custom_auth::http_carries(&a, &headers, &query) => {
                Some(crate::custom_auth::CustomAuth::AtConnect)
            }
            Ok(a) => {
                let decided = match crate::custom_auth::http_presented(
                    &a,
                    &headers,
                    &query,
                    info.server_name.clone(),
                ) {
                    Ok(presented) => crate::custom_auth::run(&shared, account, &a, &presented)
                        .await
                        .map(|d| (presented, d)),
                    Err(why) => Err(why),
                };
                match decided {
                    Ok((presented, d)) => {
                        Some(crate::custom_auth::CustomAuth::Decided(Box::new((
                            crate::custom_auth::Credentials {
                                authorizer: a.name,
                                created: a.created,
                                presented,
                            },
                            d,
                        ))))
                    }
                    Err(crate::custom_auth::Refused::Busy) => {
                        return error(429, "ThrottlingException", "Rate exceeded");
                    }
                    Err(why) => {
                        tracing::info!(peer = %info.peer, authorizer = %a.name, why = ?why, "WebSocket upgrade refused by custom authentication");
                        return error(401, "UnauthorizedException", "Unauthorized");
                    }
                }
            }
        }
    };
    let (account, caller) = match &custom {
        Some(_) => (info.account.clone(), None),
        None => match sigv4_upgrade(&shared, &info, req, &headers, &path, &query) {
            Some(caller) => (
                AccountId::new(caller.account.clone()),
                Some(Box::new(caller)),
            ),
            None => return error(403, "ForbiddenException", "Forbidden"),
        },
    };
    let Some(accept) = crate::ws::accept_key(req.headers()) else {
        return error(
            400,
            "InvalidRequestException",
            "Sec-WebSocket-Key is missing",
        );
    };
    let Some(subprotocol) = crate::ws::mqtt_subprotocol(req.headers()) else {
        return error(
            400,
            "InvalidRequestException",
            "The WebSocket subprotocol must be mqtt",
        );
    };
    let on_upgrade = hyper::upgrade::on(req);
    let conn_info = ConnInfo {
        peer: info.peer,
        account,
        certificate: None,
        endpoint: info.endpoint.clone(),
        caller,
        slot: info.slot.clone(),
        custom,
        server_name: info.server_name.clone(),
    };
    upgrade(shared, on_upgrade, conn_info, subprotocol, &accept)
}

/// The IAM caller of a SigV4-signed WebSocket upgrade, of the endpoint's account (`None`:
/// forbidden).
fn sigv4_upgrade(
    shared: &Shared,
    info: &ConnInfo,
    req: &Request<Incoming>,
    headers: &[(String, String)],
    path: &str,
    query: &str,
) -> Option<crate::authn::Caller> {
    let empty = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b""));
    let sreq = sekisho_sigv4::Request {
        method: req.method().as_str(),
        path,
        query,
        headers,
        body_sha256: &empty,
    };
    let region = shared.registry.region().to_owned();
    let caller = match crate::authn::authenticate(
        &shared.registry,
        &region,
        &sreq,
        &["iotdevicegateway", "iotdata"],
        sekisho_sigv4::Options {
            s3: false,
            token_outside_signature: true,
        },
    ) {
        Ok((c, _)) => c,
        Err(f) => {
            tracing::info!(peer = %info.peer, failure = ?f, "WebSocket upgrade not authenticated");
            return None;
        }
    };
    if !info.account.is_empty() && info.account != caller.account {
        return None;
    }
    Some(caller)
}

/// Serves MQTT on an upgraded WebSocket; the answer that switches protocols.
fn upgrade(
    shared: Arc<Shared>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    conn_info: ConnInfo,
    subprotocol: &'static str,
    accept: &str,
) -> Response<Full<Bytes>> {
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        // No frame or message larger than the largest MQTT packet this endpoint accepts: the
        // library checks a frame's declared length before reading it, and a fragmented
        // message's total as it grows, so nothing larger is ever buffered.
        let max = shared.config.codec_limits.max_packet_size;
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_frame_size(Some(max))
            .max_message_size(Some(max));
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            Some(config),
        )
        .await;
        crate::conn::serve(shared, crate::ws::WsIo::new(ws), conn_info).await;
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        "upgrade",
        hyper::header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        "connection",
        hyper::header::HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        "sec-websocket-protocol",
        hyper::header::HeaderValue::from_static(subprotocol),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

/// The credential provider's error: `{"message": ...}` only, as it answers.
fn cred_error(status: u16, kind: &'static str, message: &str) -> Response<Full<Bytes>> {
    let mut r = json_reply(json!({ "message": message }));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "x-amzn-errortype",
        hyper::header::HeaderValue::from_static(kind),
    );
    r
}

/// The credential provider: `GET /role-aliases/{alias}/credentials` with a client certificate
/// (on the account's `iot:CredentialProvider` endpoint, or any of its names). The certificate's
/// IoT policy must allow `iot:AssumeRoleWithCertificate` on the role alias, a thing named in
/// `x-amzn-iot-thingname` must be attached to the certificate, and the role must trust the
/// service principal `credentials.iot.amazonaws.com`. Errors as AWS's credential provider
/// answers them.
fn credentials(
    shared: &Shared,
    info: &ConnInfo,
    alias: &str,
    thing: Option<&str>,
) -> Response<Full<Bytes>> {
    let reg = &shared.registry;
    let account = info.account.as_str();
    // The IoT policy, with the thing's variables when a thing was named (the header plays the
    // client id's part in choosing the thing).
    let Some(certificate) = &info.certificate else {
        return cred_error(403, "AccessDeniedException", "Access Denied");
    };
    // As AWS: the thing-name header chooses among the certificate's things as a client id would.
    let as_client = thing.map(ClientId::new);
    let mut principal = match Principal::certificate(
        shared.registry.clone(),
        &info.account,
        certificate,
        as_client.as_ref(),
        Some(info.peer.ip()),
        info.endpoint.private.as_ref(),
    ) {
        Ok(p) => p,
        Err(_) => return cred_error(403, "AccessDeniedException", "Access Denied"),
    };
    if let Some(t) = thing
        && principal
            .identity
            .thing
            .as_ref()
            .is_none_or(|x| x.name != t)
    {
        return cred_error(403, "AccessDeniedException", "Invalid thing name passed");
    }
    if principal.refresh().is_err()
        || !principal.allowed("iot:assumerolewithcertificate", "rolealias", alias)
    {
        tracing::info!(%certificate, %alias, "credential provider: not authorized");
        return cred_error(403, "AccessDeniedException", "Access Denied");
    }
    let Ok(ra) = reg.describe_role_alias(account, alias) else {
        return cred_error(
            404,
            "ResourceNotFoundException",
            "Role alias does not exist",
        );
    };
    let unable = || {
        cred_error(
            400,
            "InvalidRequestException",
            "Unable to assume the role, or the role to assume does not exist",
        )
    };
    let Some(role) = reg.role_by_arn(account, &ra.role_arn) else {
        return unable();
    };
    let alias_arn = reg.arn(account, &format!("rolealias/{alias}"));
    let mut ctx = sekisho_policy::MapContext::new();
    ctx.set("aws:SourceAccount", account);
    ctx.set("aws:SourceArn", alias_arn);
    if !role.trusts_service("credentials.iot.amazonaws.com", &ctx) {
        return unable();
    }
    if ra.duration > role.max_session {
        return cred_error(
            400,
            "InvalidRequestException",
            "The requested CredentialDurationSeconds exceeds the MaxSessionDuration set for the role",
        );
    }
    let mut keys = std::collections::BTreeMap::new();
    keys.insert(
        "credentials-iot:AwsCertificateId".to_string(),
        certificate.to_string(),
    );
    if let Some(t) = &principal.identity.thing
        && thing.is_some()
    {
        keys.insert("credentials-iot:ThingName".to_string(), t.name.clone());
        if let Some(tt) = &t.thing_type {
            keys.insert("credentials-iot:ThingTypeName".to_string(), tt.clone());
        }
    }
    let session = match reg.create_session_with(
        account,
        sekisho_registry::IamPrincipal::Role {
            role: role.name.clone(),
            session: certificate.to_string(),
        },
        ra.duration,
        None,
        keys,
    ) {
        Ok(s) => s,
        Err(_) => return unable(),
    };
    let expiration = time::OffsetDateTime::from_unix_timestamp(session.expiration as i64)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
            ))
            .ok()
        })
        .unwrap_or_default();
    json_reply(json!({"credentials": {"accessKeyId": session.access_key_id,
        "secretAccessKey": session.secret_access_key, "sessionToken": session.token,
        "expiration": expiration}}))
}

/// A jobs data-plane path with a bad method or argument.
fn jobs_refusal(m: &str) -> Response<Full<Bytes>> {
    if m == "Method Not Allowed" {
        error(405, "MethodNotAllowedException", m)
    } else {
        error(400, "InvalidRequestException", m)
    }
}

/// Answers a jobs data-plane call, held to the thing's rate (the same bucket as its MQTT
/// requests: 10 a second per thing).
fn jobs_answer(
    shared: &Shared,
    account: &str,
    call: &crate::jobs::HttpCall,
    query: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    if !shared.jobs_limiter.admit(account, call.action().1) {
        return error(429, "ThrottlingException", "Rate exceeded");
    }
    jobs_reply(crate::jobs::http(shared, account, call, query, body))
}

/// A jobs data-plane answer in the REST protocol's form.
fn jobs_reply(
    r: Result<serde_json::Value, sekisho_registry::RegistryError>,
) -> Response<Full<Bytes>> {
    match r {
        Ok(v) => json_reply(v),
        Err(e) => {
            let (kind, status) = e.aws_code();
            error(status, kind, &e.to_string())
        }
    }
}

/// A Device Shadow REST call: `GET|POST|DELETE /things/{thing}/shadow[?name=]`, or
/// `GET /api/things/shadow/ListNamedShadowsForThing/{thing}`.
#[derive(Debug)]
pub(crate) enum ShadowCall {
    /// Get, update or delete one shadow.
    One {
        thing: String,
        name: Option<String>,
        op: sekisho_shadow::Op,
    },
    /// ListNamedShadowsForThing.
    List {
        thing: String,
        next: Option<String>,
        size: usize,
    },
}

impl ShadowCall {
    /// The IoT action and the thing resource (`{thing}` or `{thing}/{shadow}`) it is on.
    pub(crate) fn action(&self) -> (&'static str, String) {
        use sekisho_shadow::Op;
        match self {
            ShadowCall::One { thing, name, op } => (
                match op {
                    Op::Get => "iot:GetThingShadow",
                    Op::Update => "iot:UpdateThingShadow",
                    Op::Delete => "iot:DeleteThingShadow",
                },
                match name {
                    Some(n) => format!("{thing}/{n}"),
                    None => thing.clone(),
                },
            ),
            ShadowCall::List { thing, .. } => ("iot:ListNamedShadowsForThing", thing.clone()),
        }
    }
}

fn shadow_error(e: &sekisho_shadow::Error) -> Response<Full<Bytes>> {
    let body = json!({"code": e.code, "message": e.message});
    let mut r = json_reply(body);
    *r.status_mut() = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "x-amzn-errortype",
        hyper::header::HeaderValue::from_static(e.kind()),
    );
    r
}

/// An error answer: status, error type, message.
pub(crate) type Refusal = (u16, &'static str, String);

/// Parses a shadow REST path; `None` if the path is not one, an error response if it is one
/// with a bad method or argument.
pub(crate) fn shadow_call(
    method: &Method,
    path: &str,
    query: &str,
) -> Option<Result<ShadowCall, Refusal>> {
    use sekisho_shadow::Op;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let bad = |m: &str| Err((400, "InvalidRequestException", m.to_owned()));
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let q = |name: &str| query_value(query, name).map(decode);
    match segs.as_slice() {
        ["things", thing, "shadow"] => {
            let thing = decode(thing);
            let op = match *method {
                Method::GET => Op::Get,
                Method::POST => Op::Update,
                Method::DELETE => Op::Delete,
                _ => {
                    return Some(Err((
                        405,
                        "MethodNotAllowedException",
                        "Method Not Allowed".into(),
                    )));
                }
            };
            if !sekisho_shadow::valid_thing_name(&thing) {
                return Some(bad("Invalid thing name"));
            }
            let name = q("name");
            if name
                .as_deref()
                .is_some_and(|n| !sekisho_shadow::valid_shadow_name(n))
            {
                return Some(bad("Invalid shadow name"));
            }
            Some(Ok(ShadowCall::One { thing, name, op }))
        }
        ["api", "things", "shadow", "ListNamedShadowsForThing", thing] => {
            if *method != Method::GET {
                return Some(Err((
                    405,
                    "MethodNotAllowedException",
                    "Method Not Allowed".into(),
                )));
            }
            let thing = decode(thing);
            if !sekisho_shadow::valid_thing_name(&thing) {
                return Some(bad("Invalid thing name"));
            }
            let size = match q("pageSize").map(|v| v.parse::<usize>()) {
                None => 100,
                Some(Ok(n)) if (1..=100).contains(&n) => n,
                Some(_) => return Some(bad("pageSize must be 1 to 100")),
            };
            let next = q("nextToken");
            if next
                .as_deref()
                .is_some_and(|n| !sekisho_shadow::valid_shadow_name(n))
            {
                return Some(bad("Invalid nextToken"));
            }
            Some(Ok(ShadowCall::List { thing, next, size }))
        }
        _ => None,
    }
}

/// Carries out an authorized shadow call.
pub(crate) async fn shadow_rest(
    shared: &Shared,
    account: &str,
    call: ShadowCall,
    body: Bytes,
) -> Response<Full<Bytes>> {
    match call {
        ShadowCall::One { thing, name, op } => {
            match shared
                .shadows
                .request(account, &thing, name.as_deref(), op, body)
                .await
            {
                Ok(doc) => {
                    let mut r = Response::new(Full::new(doc));
                    r.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Err(e) => shadow_error(&e),
            }
        }
        ShadowCall::List { thing, next, size } => {
            // Deleted shadows keep a row (their version); only those that exist are listed.
            let mut names = Vec::new();
            let mut after = next;
            loop {
                let rows =
                    match shared
                        .registry
                        .named_shadows(account, &thing, after.as_deref(), 100)
                    {
                        Ok(r) => r,
                        Err(_) => return shadow_error(&sekisho_shadow::Error::internal()),
                    };
                let done = rows.len() < 100;
                for (name, doc) in rows {
                    after = Some(name.clone());
                    if sekisho_shadow::Shadow::from_json(&doc).is_some_and(|s| s.exists) {
                        names.push(name);
                    }
                }
                if done || names.len() > size {
                    break;
                }
            }
            let mut out = json!({"timestamp": events::now_ms() / 1000});
            if names.len() > size {
                out["nextToken"] = json!(names[size - 1]);
                names.truncate(size);
            }
            out["results"] = json!(names);
            json_reply(out)
        }
    }
}
