//! The control plane: the AWS IoT REST API (restJson1) over HTTPS, every request
//! authenticated with SigV4 against the account's access keys.
//!
//! Only this crate knows the control plane's JSON. Errors go out as AWS sends them: the status
//! of the exception, `x-amzn-ErrorType: <Exception>`, and `{"message": ...}`.

#![warn(missing_docs)]

mod authorizers;
mod cognito;
mod iam;
mod iot;
mod jobs;
pub mod lambda;
mod oidc;
mod provisioning;
mod xml;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use sekisho_broker::Broker;
use sekisho_pki::Ca;
use sekisho_registry::{Registry, RegistryError};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use sekisho_auth::http::MAX_HTTPS_CONNECTIONS;

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 1024 * 1024;

/// Where the account endpoints live.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Region, e.g. `us-east-1`.
    pub region: String,
    /// Base domain, e.g. `localhost`.
    pub domain: String,
}

impl Endpoints {
    /// The address DescribeEndpoint returns for an account prefix and endpoint type.
    pub fn address(&self, prefix: &str, endpoint_type: Option<&str>) -> Option<String> {
        let (r, d) = (&self.region, &self.domain);
        Some(match endpoint_type {
            None | Some("iot:Data") => format!("{prefix}.iot.{r}.{d}"),
            Some("iot:Data-ATS") => format!("{prefix}-ats.iot.{r}.{d}"),
            Some("iot:CredentialProvider") => format!("{prefix}.credentials.iot.{r}.{d}"),
            Some("iot:Jobs") => format!("{prefix}.jobs.iot.{r}.{d}"),
            _ => return None,
        })
    }
}

/// What the control plane works on.
pub struct ApiState {
    /// Registry.
    pub registry: Arc<Registry>,
    /// Broker.
    pub broker: Arc<Broker>,
    /// The built-in CA that issues device certificates.
    pub device_ca: Arc<Ca>,
    /// Endpoint naming.
    pub endpoints: Endpoints,
    /// The object store, for its sizes in `/metrics`.
    pub objects: Option<Arc<sekisho_s3::store::Store>>,
    /// Who may read `/metrics` (unsigned, like Prometheus scrapes): its totals span every
    /// account, so by default only the machine itself (loopback).
    pub metrics_allow: Vec<ipnet::IpNet>,
    /// The function host (the `lambda` API, custom authorizers), when functions are served.
    pub functions: Option<Arc<sekisho_functions::Invoker>>,
    /// The keys of OpenID Connect issuers, as the operator configured them.
    pub oidc_keys: Arc<OidcKeys>,
    /// More counters for `/metrics` (cluster mode's): name, help and value of each.
    pub more_metrics: Option<Arc<MoreMetrics>>,
}

/// Counters that a part of the server outside the control plane adds to `/metrics`.
pub type MoreMetrics = dyn Fn() -> Vec<(&'static str, &'static str, u64)> + Send + Sync;

pub use oidc::Keys as OidcKeys;

/// The default `/metrics` audience: loopback only.
pub fn loopback_only() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// An error in AWS's wire form.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Exception name.
    pub code: &'static str,
    /// Message.
    pub message: String,
    /// Extra members (resourceId, resourceArn).
    pub extra: Vec<(&'static str, String)>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Vec::new(),
        }
    }

    /// `InvalidRequestException`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "InvalidRequestException", message)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        let (code, status) = e.aws_code();
        let mut out = ApiError::new(status, code, e.to_string());
        if let RegistryError::AlreadyExists {
            resource_id,
            resource_arn,
            ..
        } = e
        {
            out.extra.push(("resourceId", resource_id));
            if !resource_arn.is_empty() {
                out.extra.push(("resourceArn", resource_arn));
            }
        }
        out
    }
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(crate) fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let h = r.headers_mut();
    h.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = request_id().parse() {
        h.insert("x-amzn-requestid", v);
    }
    r
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let mut body = json!({"message": e.message});
    for (k, v) in &e.extra {
        body[*k] = json!(v);
    }
    let mut r = json_response(e.status, &body);
    if let Ok(v) = e.code.parse() {
        r.headers_mut().insert("x-amzn-errortype", v);
    }
    r
}

/// The parts of a request the operations need.
pub struct Call {
    /// Method.
    pub method: hyper::Method,
    /// Path labels, percent-decoded.
    pub segments: Vec<String>,
    /// Query parameters, decoded.
    pub query: Vec<(String, String)>,
    /// Headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
    /// The caller's account.
    pub account: String,
    /// The caller.
    pub caller: Caller,
    /// Where and how the request arrived (condition keys).
    pub request: RequestContext,
}

impl Call {
    /// A query parameter.
    pub fn q(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean query parameter (`true`/`false`).
    pub fn q_bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.q(name) {
            None => Ok(false),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
            Some(v) => Err(ApiError::invalid(format!(
                "{name} must be true or false, not {v:?}"
            ))),
        }
    }

    /// An integer query parameter within a range.
    pub fn q_int(&self, name: &str, min: i64, max: i64, default: i64) -> Result<i64, ApiError> {
        match self.q(name) {
            None => Ok(default),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::invalid(format!(
                    "{name} must be an integer from {min} to {max}"
                ))),
            },
        }
    }

    /// A header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as a JSON object (an empty body is `{}`).
    pub fn json(&self) -> Result<serde_json::Map<String, Value>, ApiError> {
        if self.body.is_empty() {
            return Ok(serde_json::Map::new());
        }
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(ApiError::invalid("Request body must be a JSON object")),
            Err(e) => Err(ApiError::invalid(format!(
                "Request body is not valid JSON: {e}"
            ))),
        }
    }
}

fn decode_segment(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The XML namespace of a query-protocol service (IAM, STS), from the claim's credential
/// scope, so that even authentication errors come in the protocol's own form.
fn query_namespace(service: &str) -> Option<&'static str> {
    match service {
        "iam" => Some(xml::IAM_NS),
        "sts" => Some(xml::STS_NS),
        _ => None,
    }
}

pub(crate) use sekisho_auth::http::parse_query;

fn sigv4_error(e: &sekisho_sigv4::SigError) -> ApiError {
    use sekisho_sigv4::SigError::*;
    let code = match e {
        Missing => "MissingAuthenticationTokenException",
        Incomplete(_) | UnsignedHeaders(_) => "IncompleteSignatureException",
        Mismatch | Skewed(_) | PayloadHash => "InvalidSignatureException",
        Expired => "InvalidSignatureException",
    };
    ApiError::new(403, code, e.to_string())
}

use sekisho_auth::authn::AuthFailure;
pub use sekisho_auth::authn::{Caller, RequestContext};

/// Function code uploads (bodies of up to 70 MiB) read at once, in all.
static UPLOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Services the control plane serves.
const SERVICES: &[&str] = &["iot", "iam", "sts", "lambda", "cognito-identity"];

/// Authenticates a control-plane request (services `iot`, `iam`, `sts`), with each protocol's
/// error wording.
#[cfg(test)]
fn authenticate(
    state: &ApiState,
    req: &sekisho_sigv4::Request<'_>,
) -> Result<(Caller, String), ApiError> {
    let service = sekisho_sigv4::parse(req)
        .map(|c| c.service)
        .unwrap_or_default();
    sekisho_auth::authn::authenticate(
        &state.registry,
        &state.endpoints.region,
        req,
        SERVICES,
        sekisho_sigv4::Options::default(),
    )
    .map_err(|f| auth_error(f, query_namespace(&service).is_some()))
}

/// An authentication failure in the control plane's words (`query`: IAM and STS's).
fn auth_error(f: AuthFailure, query: bool) -> ApiError {
    match f {
        AuthFailure::Signature(e) => {
            let mut err = sigv4_error(&e);
            if query && err.code == "InvalidSignatureException" {
                err.code = "SignatureDoesNotMatch";
            }
            err
        }
        AuthFailure::UnknownKey => ApiError::new(
            403,
            if query {
                "InvalidClientTokenId"
            } else {
                "UnrecognizedClientException"
            },
            "The security token included in the request is invalid.",
        ),
        AuthFailure::Expired => ApiError::new(
            if query { 400 } else { 403 },
            "ExpiredToken",
            "The security token included in the request is expired",
        ),
        AuthFailure::Service(s) => ApiError::new(
            403,
            if query {
                "SignatureDoesNotMatch"
            } else {
                "InvalidSignatureException"
            },
            format!("Credential should be scoped to correct service: '{s}' is not served here."),
        ),
        AuthFailure::Region(r) => ApiError::new(
            403,
            if query {
                "SignatureDoesNotMatch"
            } else {
                "InvalidSignatureException"
            },
            format!("Credential should be scoped to a valid region, not '{r}'."),
        ),
    }
}

/// Authorizes a caller for `action` on `resource` with its IAM policies, or says
/// AccessDeniedException as AWS does.
pub fn authorize(
    state: &ApiState,
    caller: &Caller,
    request: &RequestContext,
    action: &str,
    resource: &str,
) -> Result<(), ApiError> {
    authorize_with(state, caller, request, action, resource, &[])
}

/// [`authorize`] with the action's own condition keys (`iam:PolicyARN`, ...).
pub fn authorize_with(
    state: &ApiState,
    caller: &Caller,
    request: &RequestContext,
    action: &str,
    resource: &str,
    extra: &[(&str, String)],
) -> Result<(), ApiError> {
    if sekisho_auth::authn::is_authorized(&state.registry, caller, request, action, resource, extra)
    {
        Ok(())
    } else {
        Err(ApiError::new(
            403,
            "AccessDeniedException",
            format!(
                "User: {} is not authorized to perform: {action} on resource: {resource}",
                caller.arn()
            ),
        ))
    }
}

/// The request's condition keys (`aws:SourceIp`, `aws:CurrentTime`, `aws:EpochTime`,
/// `aws:SecureTransport`) in the context of a decision made without a signed caller (the
/// trust policy of a web identity's role).
pub(crate) fn request_time_and_ip(
    ctx: &mut sekisho_policy::MapContext,
    now: i64,
    ip: std::net::IpAddr,
) {
    for (k, v) in RequestContext::tls(ip, None, now).keys() {
        ctx.set(k, v);
    }
}

/// Where a control-plane request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// The control-plane listener: every service, `/health` and `/metrics`.
    ControlPlane,
    /// A device HTTPS listener, for the server name `cognito-identity.<region>.<domain>`
    /// (which apps and the SDKs' Cognito credential providers build themselves and dial on
    /// 443): the Cognito API only, nothing else of the control plane.
    Cognito,
}

impl Front {
    fn services(self) -> &'static [&'static str] {
        match self {
            Front::ControlPlane => SERVICES,
            Front::Cognito => &["cognito-identity"],
        }
    }
}

/// Handles one control-plane request.
pub async fn handle(
    state: Arc<ApiState>,
    peer: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    handle_at(state, peer, req, Front::ControlPlane).await
}

/// Handles one request that arrived at `front`.
async fn handle_at(
    state: Arc<ApiState>,
    peer: std::net::SocketAddr,
    req: Request<Incoming>,
    front: Front,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let services = front.services();
    if front != Front::ControlPlane
        && parts.method == hyper::Method::GET
        && matches!(parts.uri.path(), "/health" | "/metrics")
    {
        return Ok(error_response(&ApiError::new(
            404,
            "ResourceNotFoundException",
            "Not served under this name",
        )));
    }
    if parts.method == hyper::Method::GET && parts.uri.path() == "/health" {
        return Ok(json_response(200, &json!({"status": "ok"})));
    }
    if parts.method == hyper::Method::GET && parts.uri.path() == "/metrics" {
        // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match peer.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        if !state.metrics_allow.iter().any(|n| n.contains(&ip)) {
            tracing::info!(%peer, "/metrics refused: not in metrics_allow");
            return Ok(error_response(&ApiError::new(
                403,
                "AccessDeniedException",
                "/metrics is not served to this address",
            )));
        }
        return Ok(metrics(&state));
    }
    let headers = sekisho_auth::authn::header_pairs(&parts.headers);
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    // The Cognito calls an app makes before it has credentials are unsigned (AWS: no auth):
    // a small body, read within its deadline, and nothing else.
    if let Some(op) = cognito::operation(&headers)
        && cognito::UNSIGNED.contains(&op)
        && parts.method == hyper::Method::POST
        && path == "/"
    {
        let op = op.to_owned();
        // Charged before anything is read, so a throttled address cannot keep reads going.
        if !cognito::unsigned_call_allowed(peer.ip()) {
            return Ok(cognito::throttled());
        }
        return Ok(
            match sekisho_auth::http::read_body(
                body,
                cognito::MAX_UNSIGNED_BODY,
                sekisho_auth::http::BODY_DEADLINE,
            )
            .await
            {
                Ok(b) => cognito::dispatch_unsigned(&state, &op, &b),
                Err(sekisho_auth::http::BodyError::TooLarge) => error_response(&ApiError::new(
                    413,
                    "RequestEntityTooLargeException",
                    "The request body is too large",
                )),
                Err(_) => error_response(&ApiError::new(
                    408,
                    "RequestTimeoutException",
                    "The request body was not received in time",
                )),
            },
        );
    }
    // The claim is parsed once, and looked at before any body byte is read: a request that is
    // not signed, or signed for another service or with a key nobody has, is refused at once
    // and holds nothing.
    let head = sekisho_sigv4::Request {
        method: parts.method.as_str(),
        path: &path,
        query: &query,
        headers: &headers,
        body_sha256: "",
    };
    let claim = sekisho_sigv4::parse(&head);
    // STS AssumeRoleWithWebIdentity is unsigned too (the Cognito basic flow): an unsigned form
    // POST is read (64 KB at most, within its deadline) only to see whether it is that call.
    if matches!(claim, Err(sekisho_sigv4::SigError::Missing))
        && services.contains(&"sts")
        && parts.method == hyper::Method::POST
        && path == "/"
        && headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("content-type")
                && v.starts_with("application/x-www-form-urlencoded")
        })
    {
        // Charged before anything is read: unsigned callers get 10 a second per address.
        if !cognito::unsigned_call_allowed(peer.ip()) {
            return Ok(xml::error_response(
                xml::STS_NS,
                &ApiError::new(400, "Throttling", "Rate exceeded"),
            ));
        }
        let Ok(b) = sekisho_auth::http::read_body(
            body,
            cognito::MAX_UNSIGNED_STS_BODY,
            sekisho_auth::http::BODY_DEADLINE,
        )
        .await
        else {
            return Ok(error_response(&auth_error(
                AuthFailure::Signature(sekisho_sigv4::SigError::Missing),
                false,
            )));
        };
        let mut params = parse_query(&String::from_utf8_lossy(&b));
        params.extend(parse_query(&query));
        let action = params
            .iter()
            .find(|(k, _)| k == "Action")
            .map(|(_, v)| v.as_str());
        if action == Some("AssumeRoleWithWebIdentity") {
            return Ok(iam::web_identity(&state, params, peer.ip()));
        }
        // Anything else unsigned is refused as before.
        tracing::info!(method = %parts.method, %path, "request not authenticated");
        return Ok(error_response(&auth_error(
            AuthFailure::Signature(sekisho_sigv4::SigError::Missing),
            false,
        )));
    }
    let ns = claim
        .as_ref()
        .ok()
        .and_then(|c| query_namespace(&c.service));
    let refuse = |f: AuthFailure| {
        let e = auth_error(f, ns.is_some());
        tracing::info!(method = %parts.method, %path, code = e.code, "request not authenticated");
        match ns {
            Some(ns) => xml::error_response(ns, &e),
            None => error_response(&e),
        }
    };
    let claim = match claim {
        Ok(c) => c,
        Err(e) => return Ok(refuse(AuthFailure::Signature(e))),
    };
    if let Err(f) = sekisho_auth::authn::precheck(&state.registry, &claim, services) {
        return Ok(refuse(f));
    }
    // A function's code comes in the body (a 50 MB zip, base64): only the two operations
    // that upload code get the lambda API's large bound, and few at a time.
    let uploading = claim.service == "lambda" && lambda::uploads_code(parts.method.as_str(), &path);
    let max_body = match (claim.service.as_str(), uploading) {
        ("lambda", true) => lambda::MAX_BODY,
        ("lambda", false) => lambda::MAX_OTHER_BODY,
        // Under the Cognito name on the device port (whose key ids anyone can learn from a
        // guest pool), no more than a Cognito call needs.
        _ if front == Front::Cognito => cognito::MAX_UNSIGNED_BODY,
        _ => MAX_BODY,
    };
    let _upload_slot = if uploading {
        match UPLOADS.try_acquire() {
            Ok(p) => Some(p),
            Err(_) => {
                return Ok(error_response(&ApiError::new(
                    429,
                    "TooManyRequestsException",
                    "Too many function code uploads at once",
                )));
            }
        }
    } else {
        None
    };
    let body = match sekisho_auth::http::read_body(
        body,
        max_body,
        sekisho_auth::http::BODY_DEADLINE,
    )
    .await
    {
        Ok(b) => b,
        Err(sekisho_auth::http::BodyError::TooLarge) => {
            return Ok(error_response(&ApiError::new(
                413,
                "RequestEntityTooLargeException",
                "The request body is too large",
            )));
        }
        Err(_) => {
            return Ok(error_response(&ApiError::new(
                408,
                "RequestTimeoutException",
                "The request body was not received in time",
            )));
        }
    };
    let body_sha = hex::encode(sha256(&body));
    let sreq = sekisho_sigv4::Request {
        method: parts.method.as_str(),
        path: &path,
        query: &query,
        headers: &headers,
        body_sha256: &body_sha,
    };
    let verified = sekisho_auth::authn::verify_claim(
        &state.registry,
        &state.endpoints.region,
        &sreq,
        claim,
        sekisho_sigv4::Options::default(),
    );
    let (caller, service) = match verified {
        Ok(a) => a,
        Err(f) => return Ok(refuse(f)),
    };
    let call = Call {
        method: parts.method.clone(),
        segments: path.split('/').skip(1).map(decode_segment).collect(),
        query: parse_query(&query),
        headers,
        body,
        account: caller.account.clone(),
        caller: caller.clone(),
        request: RequestContext {
            region: Some(state.endpoints.region.clone()),
            ..RequestContext::tls(peer.ip(), None, sekisho_registry::now_secs() as i64)
        },
    };
    if service == "iam" || service == "sts" {
        return Ok(iam::dispatch(&state, &caller, &service, &call));
    }
    if service == "lambda" {
        return Ok(lambda::dispatch(&state, &call).await);
    }
    if service == "cognito-identity" {
        return Ok(cognito::dispatch(&state, &call));
    }
    // One declaration per operation (iot::ROUTES): the IAM action, the resource derived from
    // the path label the handler acts on, and the handler.
    let result = match iot::route(&call) {
        None => Err(iot::unknown(&call)),
        Some(route) => route
            .resource_arns(&state, &call)
            .and_then(|arns| {
                let action = format!("iot:{}", route.operation);
                arns.iter()
                    .try_for_each(|arn| authorize(&state, &caller, &call.request, &action, arn))
            })
            .and_then(|()| route.run(&state, &call)),
    };
    Ok(match result {
        Ok(v) => json_response(200, &v),
        Err(e) => {
            tracing::debug!(method = %parts.method, %path, code = e.code, message = %e.message, "request refused");
            error_response(&e)
        }
    })
}

/// Prometheus text exposition of the broker's and registry's counters and sizes.
fn metrics(state: &ApiState) -> Response<Full<Bytes>> {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let st = &state.broker.stats;
    let (sessions, connected, subscriptions, retained) = state.broker.sizes();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    };
    metric(
        "sekisho_deliveries_total",
        "counter",
        "Deliveries handed to a connection's queue.",
        st.delivered.load(Relaxed),
    );
    metric(
        "sekisho_deliveries_dropped_total",
        "counter",
        "Deliveries given up because a connection's queue stayed full.",
        st.dropped_full.load(Relaxed),
    );
    metric(
        "sekisho_deliveries_queued_offline_total",
        "counter",
        "QoS 1 deliveries stored for offline sessions.",
        st.queued_offline.load(Relaxed),
    );
    metric(
        "sekisho_sessions",
        "gauge",
        "Sessions, connected or persisted.",
        sessions as u64,
    );
    metric(
        "sekisho_connections",
        "gauge",
        "Connected MQTT sessions.",
        connected as u64,
    );
    metric(
        "sekisho_subscriptions",
        "gauge",
        "Subscriptions.",
        subscriptions as u64,
    );
    metric(
        "sekisho_retained_messages",
        "gauge",
        "Retained messages.",
        retained as u64,
    );
    if let Some(store) = &state.objects {
        let (buckets, objects, bytes) = store.totals();
        metric("sekisho_s3_buckets", "gauge", "S3 buckets.", buckets as u64);
        metric("sekisho_s3_objects", "gauge", "S3 objects.", objects as u64);
        metric("sekisho_s3_bytes", "gauge", "Bytes in S3 objects.", bytes);
    }
    metric(
        "sekisho_registry_generation",
        "counter",
        "Registry changes that may affect policies.",
        state.registry.generation(),
    );
    if let Some(more) = &state.more_metrics {
        for (name, help, value) in more() {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            metric(name, kind, help, value);
        }
    }
    {
        let name = "sekisho_throttled_total";
        let _ = write!(
            out,
            "# HELP {name} Operations refused or discarded by a rate limit, by reason.\n# TYPE {name} counter\n"
        );
        for (i, why) in sekisho_broker::throttle::Throttled::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                why.label(),
                st.throttled[i].load(Relaxed)
            );
        }
    }
    let mut r = Response::new(Full::new(Bytes::from(out)));
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// SHA-256 of `b`.
pub fn sha256(b: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// Serves the control plane over HTTPS on `listener` until shutdown.
pub async fn serve(
    state: Arc<ApiState>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: watch::Receiver<bool>,
) {
    sekisho_auth::http::serve_https(
        listener,
        tls,
        shutdown,
        "control plane",
        MAX_HTTPS_CONNECTIONS,
        move |peer, req| handle(state.clone(), peer, req),
    )
    .await
}

/// Connections handed over by device listeners, open at once: as many as the control-plane
/// listener takes, besides the device listener's own slot, so that they cannot crowd out
/// devices.
static HANDED_OVER: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(sekisho_auth::http::MAX_HTTPS_CONNECTIONS);

/// Serves one connection a device HTTPS listener handed over (its TLS handshake done) because
/// its server name is `front`'s.
pub async fn serve_handed_over<S>(
    state: Arc<ApiState>,
    io: S,
    peer: std::net::SocketAddr,
    front: Front,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok(_slot) = HANDED_OVER.try_acquire() else {
        tracing::warn!(%peer, "{} connections handed over are open; connection refused", sekisho_auth::http::MAX_HTTPS_CONNECTIONS);
        return;
    };
    sekisho_auth::http::serve_connection(
        io,
        peer,
        "service name on a device port",
        move |peer, req| handle_at(state.clone(), peer, req, front),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (ApiState, String) {
        let registry = Registry::in_memory("us-east-1").unwrap();
        let (info, _) = registry.create_account("a").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let st = ApiState {
            registry: Arc::new(registry),
            broker: Arc::new(Broker::new(Default::default())),
            device_ca: Arc::new(Ca::generate("t", "t", now).unwrap()),
            endpoints: Endpoints {
                region: "us-east-1".into(),
                domain: "localhost".into(),
            },
            objects: None,
            functions: None,
            metrics_allow: loopback_only(),
            oidc_keys: Default::default(),
            more_metrics: None,
        };
        (st, info.id)
    }

    /// A signed STS request with temporary credentials, as boto3 sends it.
    fn signed(s: &sekisho_registry::Session, token: &str) -> (Vec<(String, String)>, String) {
        let amz_date = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .unwrap();
        let body = "Action=GetCallerIdentity&Version=2011-06-15";
        let sha = hex::encode(sha256(body.as_bytes()));
        let mut headers = vec![
            ("host".to_string(), "localhost".to_string()),
            ("x-amz-date".to_string(), amz_date.clone()),
            ("x-amz-security-token".to_string(), token.to_string()),
        ];
        let auth = {
            let req = sekisho_sigv4::Request {
                method: "POST",
                path: "/",
                query: "",
                headers: &headers,
                body_sha256: &sha,
            };
            sekisho_sigv4::sign_header(
                &req,
                &s.access_key_id,
                &s.secret_access_key,
                "us-east-1",
                "sts",
                &amz_date,
                &["host", "x-amz-date", "x-amz-security-token"],
            )
        };
        headers.push(("authorization".to_string(), auth));
        (headers, sha)
    }

    #[test]
    fn temporary_credentials_need_their_token_and_expire() {
        let (st, acct) = state();
        let s = st
            .registry
            .create_session(&acct, sekisho_registry::IamPrincipal::Root, 1, None)
            .unwrap();
        let check = |token: &str| {
            let (headers, sha) = signed(&s, token);
            let req = sekisho_sigv4::Request {
                method: "POST",
                path: "/",
                query: "",
                headers: &headers,
                body_sha256: &sha,
            };
            authenticate(&st, &req).map(|(c, _)| c).map_err(|e| e.code)
        };
        let ok = check(&s.token).unwrap();
        assert!(ok.temporary && ok.account == acct);
        assert_eq!(check("forged").unwrap_err(), "InvalidClientTokenId");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(check(&s.token).unwrap_err(), "ExpiredToken");
    }
}
