//! The Jobs device API over MQTT: `$aws/things/{thing}/jobs/{get, start-next, {jobId}/get,
//! {jobId}/update}` answered on the request topic's `/accepted` or `/rejected`, delivered to
//! the requesting connection only (as AWS does: other subscribers never see them, and the
//! requester needs no subscription, only `iot:Receive`); and the `notify` and `notify-next`
//! topics, published to subscribers when a thing's pending executions change (from the
//! registry's change feed).
//!
//! A request that changes an execution writes the registry (synced) on the connection's
//! thread before it is answered; jobs requests are rare next to messages, so this is accepted
//! rather than handed to another thread.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sekisho_broker::{Broker, Message};
use sekisho_mqtt::{Properties, QoS};
use sekisho_registry::{ExecStatus, Execution, ExecutionUpdate, Job, Registry, RegistryError};
use serde_json::{Map, Value, json};

use crate::Shared;

/// A jobs request topic, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// `jobs/get`: the pending executions.
    Get,
    /// `jobs/start-next`.
    StartNext,
    /// `jobs/{jobId}/get` (`$next` allowed).
    Describe(&'a str),
    /// `jobs/{jobId}/update`.
    Update(&'a str),
    /// Under the jobs namespace but no API (answered `InvalidTopic`).
    Invalid,
}

/// The thing and request of a topic under `$aws/things/{thing}/jobs/`, if it is one a
/// device publishes to (`notify` topics and responses are not requests).
pub fn parse_topic(topic: &str) -> Option<(&str, Request<'_>)> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let (thing, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("jobs/")?;
    let levels: Vec<&str> = rest.split('/').collect();
    if rest.ends_with("/accepted")
        || rest.ends_with("/rejected")
        || matches!(levels.as_slice(), ["notify" | "notify-next"])
        || matches!(levels.as_slice(), [_, n] if n.starts_with("notify-namespace-"))
    {
        return None;
    }
    let req = match rest.split('/').collect::<Vec<_>>().as_slice() {
        ["get"] => Request::Get,
        ["start-next"] => Request::StartNext,
        [id, "get"] if valid_job_id(id) || *id == "$next" => Request::Describe(id),
        [id, "update"] if valid_job_id(id) => Request::Update(id),
        _ => Request::Invalid,
    };
    Some((thing, req))
}

fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
}

fn secs(t: f64) -> u64 {
    t.max(0.0) as u64
}

/// The job document as a JSON object (MQTT carries it as one), its presigned-URL placeholders
/// replaced.
fn document(shared: &Shared, account: &str, job: &Job) -> Value {
    let text = shared.presigner.substitute(shared, account, job);
    serde_json::from_str(&text).unwrap_or_else(|_| json!({}))
}

/// Device requests per second per thing (jobs requests write the registry, synced).
pub const REQUESTS_PER_THING: u32 = 10;

/// Token buckets of device jobs requests, per (account, thing).
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<(String, String), sekisho_broker::throttle::Bucket>>,
}

impl Limiter {
    /// Whether a request for `thing` may go ahead now.
    pub fn admit(&self, account: &str, thing: &str) -> bool {
        let now = std::time::Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() > 10_000 {
            b.retain(|_, bucket| !bucket.is_full(now));
        }
        b.entry((account.to_owned(), thing.to_owned()))
            .or_insert_with(|| {
                sekisho_broker::throttle::Bucket::new(REQUESTS_PER_THING, 2 * REQUESTS_PER_THING)
            })
            .take(now, 1)
    }
}

/// The placeholder AWS's job documents name an object with.
const PLACEHOLDER: &str = "${aws:iot:s3-presigned-url:";

/// Temporary credentials of a job's presigned-URL role, reused while they outlive a URL.
#[derive(Debug, Default)]
pub struct Presigner {
    sessions: Mutex<HashMap<(String, String), sekisho_registry::Session>>,
}

/// How long the presigned-URL role's sessions last: twice the longest URL (`expiresInSec` is
/// at most 3600), so one session serves every URL for an hour, and an account's stored
/// sessions grow by one per role and hour however many devices ask for documents.
const PRESIGNER_SESSION_SECS: u32 = 7200;

impl Presigner {
    /// Credentials of `role_arn` for IoT, valid at least `seconds` more: the role must exist
    /// and trust `iot.amazonaws.com`. Credentials of a role since deleted (even if re-created
    /// under the same name) are not reused.
    fn credentials(
        &self,
        registry: &Registry,
        account: &str,
        role_arn: &str,
        seconds: u64,
        now: f64,
    ) -> Option<sekisho_registry::Session> {
        let key = (account.to_owned(), role_arn.to_owned());
        let role = registry.role_by_arn(account, role_arn)?;
        let mut ctx = sekisho_policy::MapContext::new();
        ctx.set("aws:SourceAccount", account);
        if !role.trusts_service("iot.amazonaws.com", &ctx) {
            tracing::warn!(%account, role = %role_arn, "job presigned URLs: the role does not trust iot.amazonaws.com");
            return None;
        }
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.retain(|_, s| s.expiration > now);
            if let Some(s) = sessions.get(&key)
                && s.expiration - now >= seconds as f64 + 60.0
                && s.principal_id.as_deref() == Some(role.id.as_str())
            {
                return Some(s.clone());
            }
        }
        // Issued without the lock held: a stored write must not hold up every account's
        // documents. Two requests that miss at once may each issue one.
        let session = registry
            .create_session_with(
                account,
                sekisho_registry::IamPrincipal::Role {
                    role: role.name.clone(),
                    session: "iot-jobs-presigned-url".into(),
                },
                PRESIGNER_SESSION_SECS,
                None,
                BTreeMap::new(),
            )
            .ok()?;
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, session.clone());
        Some(session)
    }

    /// The document with every `${aws:iot:s3-presigned-url:<S3 URL>}` replaced by a presigned
    /// GET URL of the object store, signed with the job's role; the document as stored when
    /// the job has no presigned-URL settings, or they cannot be used.
    pub fn substitute(&self, shared: &Shared, account: &str, job: &Job) -> String {
        let (Some(cfg), Some(base)) = (&job.presigned, &shared.config.object_store_url) else {
            return job.document.clone();
        };
        if !job.document.contains(PLACEHOLDER) {
            return job.document.clone();
        }
        let now = sekisho_registry::now_secs();
        let Some(creds) = self.credentials(
            &shared.registry,
            account,
            &cfg.role_arn,
            cfg.expires_in_sec,
            now,
        ) else {
            return job.document.clone();
        };
        let Ok(date) = time::OffsetDateTime::from_unix_timestamp(now as i64) else {
            return job.document.clone();
        };
        let amz_date = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            date.year(),
            u8::from(date.month()),
            date.day(),
            date.hour(),
            date.minute(),
            date.second()
        );
        let mut out = String::with_capacity(job.document.len());
        let mut rest = job.document.as_str();
        while let Some(i) = rest.find(PLACEHOLDER) {
            out.push_str(&rest[..i]);
            let after = &rest[i + PLACEHOLDER.len()..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[i..]);
                rest = "";
                break;
            };
            match sekisho_registry::s3_location(&after[..end]) {
                Some((bucket, key)) => out.push_str(&sekisho_sigv4::presign_s3_get(
                    base,
                    &format!("/{bucket}/{key}"),
                    &creds.access_key_id,
                    &creds.secret_access_key,
                    Some(&creds.token),
                    shared.registry.region(),
                    &amz_date,
                    cfg.expires_in_sec,
                )),
                None => out.push_str(&rest[i..i + PLACEHOLDER.len() + end + 1]),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// `JobExecutionSummary` of the MQTT API.
pub fn summary(e: &Execution) -> Value {
    let mut v = json!({"jobId": e.job_id, "queuedAt": secs(e.queued_at),
        "lastUpdatedAt": secs(e.last_updated_at), "versionNumber": e.version,
        "executionNumber": e.execution_number});
    if let Some(s) = e.started_at {
        v["startedAt"] = json!(secs(s));
    }
    v
}

/// `JobExecution` of the MQTT API (the document as an object).
pub fn execution(
    shared: &Shared,
    account: &str,
    e: &Execution,
    job: &Job,
    with_document: bool,
) -> Value {
    let mut v = summary(e);
    v["thingName"] = json!(e.thing);
    v["status"] = json!(e.status.as_str());
    v["statusDetails"] = json!(e.status_details);
    if with_document {
        v["jobDocument"] = document(shared, account, job);
    }
    v
}

/// GetPendingJobExecutions, the same over MQTT and HTTPS.
fn pending(registry: &Registry, account: &str, thing: &str) -> Result<Value, RegistryError> {
    let pending = registry.pending_job_executions(account, thing)?;
    let (running, queued): (Vec<_>, Vec<_>) = pending
        .iter()
        .partition(|(e, _)| e.status == ExecStatus::InProgress);
    Ok(json!({
        "inProgressJobs": running.iter().map(|(e, _)| summary(e)).collect::<Vec<_>>(),
        "queuedJobs": queued.iter().map(|(e, _)| summary(e)).collect::<Vec<_>>(),
    }))
}

fn state(e: &Execution) -> Value {
    json!({"status": e.status.as_str(), "statusDetails": e.status_details, "versionNumber": e.version})
}

/// One MQTT error response.
fn rejected(code: &str, message: &str, token: Option<&str>, now: u64) -> Value {
    let mut v = json!({"code": code, "message": message, "timestamp": now});
    if let Some(t) = token {
        v["clientToken"] = json!(t);
    }
    v
}

fn mqtt_code(e: &RegistryError) -> &'static str {
    match e {
        RegistryError::NotFound(_) => "ResourceNotFound",
        RegistryError::VersionConflict(_) => "VersionMismatch",
        RegistryError::InvalidStateTransition(_) => "InvalidStateTransition",
        RegistryError::TerminalState(_) => "TerminalStateReached",
        RegistryError::InvalidRequest(_) => "InvalidRequest",
        _ => "InternalError",
    }
}

fn details(v: Option<&Value>) -> Result<Option<BTreeMap<String, String>>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(format!("statusDetails value for {k} must be a string")),
            })
            .collect::<Result<_, _>>()
            .map(Some),
        Some(_) => Err("statusDetails must be an object".into()),
    }
}

/// A non-negative integer member. A string of decimal digits counts too: AWS's developer
/// guide writes `"expectedVersion": "number"`, and the AWS IoT Device SDK for Python v1 sends
/// `expectedVersion` and `executionNumber` as strings.
fn number(m: &Map<String, Value>, k: &str) -> Result<Option<u64>, String> {
    let bad = || format!("{k} must be a non-negative integer");
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map(Some).map_err(|_| bad())
        }
        Some(v) => v.as_u64().map(Some).ok_or_else(bad),
    }
}

fn flag(m: &Map<String, Value>, k: &str, default: bool) -> Result<bool, String> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("{k} must be a boolean")),
    }
}

/// Answers one MQTT jobs request: whether it was accepted, and the response document.
pub fn answer(
    shared: &Shared,
    account: &str,
    thing: &str,
    req: &Request<'_>,
    payload: &[u8],
    now: f64,
) -> (bool, Value) {
    let ts = secs(now);
    let body: Map<String, Value> = if payload.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice(payload) {
            Ok(Value::Object(m)) => m,
            _ => {
                return (
                    false,
                    rejected("InvalidJson", "The payload is not a JSON object", None, ts),
                );
            }
        }
    };
    let token = match body.get("clientToken") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if t.len() <= 64 => Some(t.as_str()),
        Some(_) => {
            return (
                false,
                rejected(
                    "InvalidRequest",
                    "clientToken must be a string of at most 64 characters",
                    None,
                    ts,
                ),
            );
        }
    };
    let bad = |m: String| (false, rejected("InvalidRequest", &m, token, ts));
    if !shared.jobs_limiter.admit(account, thing) {
        return (
            false,
            rejected(
                "RequestThrottled",
                "Too many requests for this thing",
                token,
                ts,
            ),
        );
    }
    let mut out = match run(shared, account, thing, req, &body, now) {
        Ok(v) => (true, v),
        Err(Refusal::Bad(m)) => return bad(m),
        Err(Refusal::Registry(e, exec)) => {
            let mut v = rejected(mqtt_code(&e), &e.to_string(), token, ts);
            if let Some(s) = exec {
                v["executionState"] = s;
            }
            return (false, v);
        }
        Err(Refusal::Topic) => {
            return (
                false,
                rejected(
                    "InvalidTopic",
                    "The topic does not name a jobs API",
                    token,
                    ts,
                ),
            );
        }
    };
    out.1["timestamp"] = json!(ts);
    if let Some(t) = token {
        out.1["clientToken"] = json!(t);
    }
    out
}

enum Refusal {
    Bad(String),
    Topic,
    /// A registry refusal, with the execution's state when the refusal concerns it.
    Registry(RegistryError, Option<Value>),
}

impl From<String> for Refusal {
    fn from(m: String) -> Refusal {
        Refusal::Bad(m)
    }
}

fn run(
    shared: &Shared,
    account: &str,
    thing: &str,
    req: &Request<'_>,
    body: &Map<String, Value>,
    now: f64,
) -> Result<Value, Refusal> {
    let registry = &shared.registry;
    let plain = |e: RegistryError| Refusal::Registry(e, None);
    match req {
        Request::Invalid => Err(Refusal::Topic),
        Request::Get => pending(registry, account, thing).map_err(plain),
        Request::StartNext => {
            let d = details(body.get("statusDetails"))?;
            let step = number(body, "stepTimeoutInMinutes")?;
            let next = registry
                .start_next_job_execution(account, thing, d, step, now)
                .map_err(plain)?;
            Ok(match next {
                Some((e, j)) => json!({"execution": execution(shared, account, &e, &j, true)}),
                None => json!({}),
            })
        }
        Request::Describe(id) => {
            let with_doc = flag(body, "includeJobDocument", true)?;
            let number = number(body, "executionNumber")?;
            let found = if *id == "$next" {
                registry
                    .pending_job_executions(account, thing)
                    .map_err(plain)?
                    .into_iter()
                    .next()
            } else {
                Some(
                    registry
                        .job_execution(account, id, thing, number)
                        .map_err(plain)?,
                )
            };
            match found {
                None => Ok(json!({})),
                Some((e, _)) if e.status.is_terminal() => Err(Refusal::Registry(
                    RegistryError::TerminalState(format!(
                        "Job execution of job {} on thing {thing} has ended ({})",
                        e.job_id,
                        e.status.as_str()
                    )),
                    None,
                )),
                Some((e, j)) => {
                    Ok(json!({"execution": execution(shared, account, &e, &j, with_doc)}))
                }
            }
        }
        Request::Update(id) => {
            let status = match body.get("status") {
                Some(Value::String(s)) => s.clone(),
                _ => return Err(Refusal::Bad("status is required".into())),
            };
            let u = ExecutionUpdate {
                status,
                status_details: details(body.get("statusDetails"))?,
                expected_version: number(body, "expectedVersion")?,
                execution_number: number(body, "executionNumber")?,
                step_timeout_minutes: number(body, "stepTimeoutInMinutes")?,
            };
            let with_state = flag(body, "includeJobExecutionState", false)?;
            let with_doc = flag(body, "includeJobDocument", false)?;
            match registry.update_job_execution(account, id, thing, u, now) {
                Ok((e, j)) => {
                    let mut v = json!({});
                    if with_state {
                        v["executionState"] = state(&e);
                    }
                    if with_doc {
                        v["jobDocument"] = document(shared, account, &j);
                    }
                    Ok(v)
                }
                Err(
                    e @ (RegistryError::VersionConflict(_)
                    | RegistryError::InvalidStateTransition(_)),
                ) => {
                    let current = registry
                        .job_execution(account, id, thing, None)
                        .ok()
                        .map(|(x, _)| state(&x));
                    Err(Refusal::Registry(e, current))
                }
                Err(e) => Err(plain(e)),
            }
        }
    }
}

/// A request of the HTTPS jobs data plane (`iot-jobs-data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpCall {
    /// GetPendingJobExecutions: `GET /things/{thing}/jobs`.
    Pending {
        /// The thing.
        thing: String,
    },
    /// StartNextPendingJobExecution: `PUT /things/{thing}/jobs/$next`.
    StartNext {
        /// The thing.
        thing: String,
    },
    /// DescribeJobExecution: `GET /things/{thing}/jobs/{jobId}` (`$next` allowed).
    Describe {
        /// The thing.
        thing: String,
        /// The job, or `$next`.
        job: String,
    },
    /// UpdateJobExecution: `POST /things/{thing}/jobs/{jobId}`.
    Update {
        /// The thing.
        thing: String,
        /// The job.
        job: String,
    },
}

impl HttpCall {
    /// Parses a data-plane path; `None` if it is not one.
    pub fn parse(method: &hyper::Method, path: &str) -> Option<Result<HttpCall, &'static str>> {
        use hyper::Method;
        let segs: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let (thing, rest) = match segs.as_slice() {
            ["things", thing, "jobs", rest @ ..] => (thing.to_string(), rest),
            _ => return None,
        };
        if !sekisho_shadow::valid_thing_name(&thing) {
            return Some(Err("Invalid thing name"));
        }
        Some(match (method, rest) {
            (&Method::GET, []) => Ok(HttpCall::Pending { thing }),
            (&Method::PUT, ["$next"]) => Ok(HttpCall::StartNext { thing }),
            (&Method::GET, [job]) if valid_job_id(job) || *job == "$next" => {
                Ok(HttpCall::Describe {
                    thing,
                    job: job.to_string(),
                })
            }
            (&Method::POST, [job]) if valid_job_id(job) => Ok(HttpCall::Update {
                thing,
                job: job.to_string(),
            }),
            (_, [] | [_]) => Err("Method Not Allowed"),
            _ => return None,
        })
    }

    /// The IoT policy action (for a device's certificate) and the thing it acts on.
    pub fn action(&self) -> (&'static str, &str) {
        match self {
            HttpCall::Pending { thing } => ("iot:GetPendingJobExecutions", thing),
            HttpCall::StartNext { thing } => ("iot:StartNextPendingJobExecution", thing),
            HttpCall::Describe { thing, .. } => ("iot:DescribeJobExecution", thing),
            HttpCall::Update { thing, .. } => ("iot:UpdateJobExecution", thing),
        }
    }

    /// The IAM action (for a SigV4 caller) and the thing it acts on: the jobs data plane's
    /// own `iotjobsdata:` prefix, so that an IAM policy allowing the control plane's
    /// `iot:DescribeJobExecution` (a read of the execution) does not also let its holder act
    /// as the device, or read the job document with its presigned URLs.
    pub fn iam_action(&self) -> (&'static str, &str) {
        let (action, thing) = self.action();
        let action = match action {
            "iot:GetPendingJobExecutions" => "iotjobsdata:GetPendingJobExecutions",
            "iot:StartNextPendingJobExecution" => "iotjobsdata:StartNextPendingJobExecution",
            "iot:DescribeJobExecution" => "iotjobsdata:DescribeJobExecution",
            _ => "iotjobsdata:UpdateJobExecution",
        };
        (action, thing)
    }
}

/// The data plane's `JobExecution`: the document as a string, times in epoch seconds.
fn http_execution(
    shared: &Shared,
    account: &str,
    e: &Execution,
    job: &Job,
    with_doc: bool,
) -> Value {
    let mut v = summary(e);
    v["thingName"] = json!(e.thing);
    v["status"] = json!(e.status.as_str());
    v["statusDetails"] = json!(e.status_details);
    if let Some(t) = e.seconds_before_timeout(sekisho_registry::now_secs()) {
        v["approximateSecondsBeforeTimedOut"] = json!(t);
    }
    if with_doc {
        v["jobDocument"] = json!(shared.presigner.substitute(shared, account, job));
    }
    v
}

fn query_flag(query: &str, name: &str, default: bool) -> Result<bool, RegistryError> {
    match query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
    {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(RegistryError::InvalidRequest(format!(
            "{name} must be true or false"
        ))),
    }
}

/// Carries out an authorized data-plane call: the response document, or the refusal (its
/// HTTP status and error type from [`RegistryError::aws_code`]).
pub fn http(
    shared: &Shared,
    account: &str,
    call: &HttpCall,
    query: &str,
    body: &[u8],
) -> Result<Value, RegistryError> {
    let registry = &shared.registry;
    let now = sekisho_registry::now_secs();
    let bad = |m: String| RegistryError::InvalidRequest(m);
    let obj: Map<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice(body) {
            Ok(Value::Object(m)) => m,
            _ => return Err(bad("The body is not a JSON object".into())),
        }
    };
    let number_q = |name: &str| -> Result<Option<u64>, RegistryError> {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{name} must be a number")))
            })
            .transpose()
    };
    match call {
        HttpCall::Pending { thing } => pending(registry, account, thing),
        HttpCall::StartNext { thing } => {
            let d = details(obj.get("statusDetails")).map_err(bad)?;
            let step = number(&obj, "stepTimeoutInMinutes").map_err(bad)?;
            Ok(
                match registry.start_next_job_execution(account, thing, d, step, now)? {
                    Some((e, j)) => {
                        json!({"execution": http_execution(shared, account, &e, &j, true)})
                    }
                    None => json!({}),
                },
            )
        }
        HttpCall::Describe { thing, job } => {
            let with_doc = query_flag(query, "includeJobDocument", true)?;
            let found = if job == "$next" {
                registry
                    .pending_job_executions(account, thing)?
                    .into_iter()
                    .next()
            } else {
                Some(registry.job_execution(account, job, thing, number_q("executionNumber")?)?)
            };
            match found {
                None => Ok(json!({})),
                Some((e, _)) if e.status.is_terminal() => {
                    Err(RegistryError::TerminalState(format!(
                        "Job execution of job {} on thing {thing} has ended ({})",
                        e.job_id,
                        e.status.as_str()
                    )))
                }
                Some((e, j)) => {
                    Ok(json!({"execution": http_execution(shared, account, &e, &j, with_doc)}))
                }
            }
        }
        HttpCall::Update { thing, job } => {
            let status = match obj.get("status") {
                Some(Value::String(s)) => s.clone(),
                _ => return Err(bad("status is required".into())),
            };
            let u = ExecutionUpdate {
                status,
                status_details: details(obj.get("statusDetails")).map_err(bad)?,
                expected_version: number(&obj, "expectedVersion").map_err(bad)?,
                execution_number: number(&obj, "executionNumber").map_err(bad)?,
                step_timeout_minutes: number(&obj, "stepTimeoutInMinutes").map_err(bad)?,
            };
            let with_state = flag(&obj, "includeJobExecutionState", false).map_err(bad)?;
            let with_doc = flag(&obj, "includeJobDocument", false).map_err(bad)?;
            // The data plane has no version-mismatch shape: a stale version is a conflict.
            let (e, j) = registry
                .update_job_execution(account, job, thing, u, now)
                .map_err(|e| match e {
                    RegistryError::VersionConflict(m) => RegistryError::InvalidStateTransition(m),
                    e => e,
                })?;
            let mut v = json!({});
            if with_state {
                v["executionState"] = state(&e);
            }
            if with_doc {
                v["jobDocument"] = json!(shared.presigner.substitute(shared, account, &j));
            }
            Ok(v)
        }
    }
}

/// A message from the Jobs service.
pub fn message(topic: String, doc: &Value, qos: QoS) -> Message {
    message_bytes(topic, Bytes::from(doc.to_string()), qos)
}

/// A message from a service, its payload already encoded.
pub fn message_bytes(topic: String, payload: Bytes, qos: QoS) -> Message {
    Message {
        topic: topic.into(),
        payload,
        qos,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        origin: None,
        timestamp_ms: crate::events::now_ms(),
    }
}

/// What a thing was last told on `notify` and `notify-next`.
#[derive(Debug, Default, Clone, PartialEq)]
struct Told {
    /// (job id, status) of every pending execution.
    pending: Vec<(String, ExecStatus)>,
    /// The job id `$next` names.
    next: Option<String>,
}

/// Publishes `notify` and `notify-next` when a thing's pending executions change.
#[derive(Debug, Default)]
pub struct Notifier {
    told: HashMap<(String, String), Told>,
}

impl Notifier {
    /// After missed changes: every thing that has pending executions, or had when last told,
    /// is looked at again (and told only what differs from what it was told).
    pub fn catch_up(&mut self, shared: &Shared) {
        let mut things = shared.registry.things_with_pending_jobs();
        things.extend(self.told.keys().cloned());
        for (account, thing) in things {
            self.changed(shared, &account, &thing);
        }
    }

    /// Looks at a thing's pending executions and tells its subscribers what changed.
    pub fn changed(&mut self, shared: &Shared, account: &str, thing: &str) {
        let broker = &shared.broker;
        let Ok(pending) = shared.registry.pending_job_executions(account, thing) else {
            // The account is gone: nothing to tell, nothing to remember.
            self.told.remove(&(account.to_owned(), thing.to_owned()));
            return;
        };
        let now = secs(sekisho_registry::now_secs());
        let key = (account.to_owned(), thing.to_owned());
        let before = self.told.get(&key).cloned().unwrap_or_default();
        let told = Told {
            pending: pending
                .iter()
                .map(|(e, _)| (e.job_id.clone(), e.status))
                .collect(),
            next: pending.first().map(|(e, _)| e.job_id.clone()),
        };
        let prefix = format!("$aws/things/{thing}/jobs");
        if told.pending != before.pending {
            let mut jobs: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
            for (e, _) in &pending {
                jobs.entry(e.status.as_str()).or_default().push(summary(e));
            }
            let doc = json!({"timestamp": now, "jobs": jobs});
            publish(
                broker,
                account,
                message(format!("{prefix}/notify"), &doc, QoS::AtLeastOnce),
            );
        }
        if told.next != before.next {
            let mut doc = json!({"timestamp": now});
            if let Some((e, j)) = pending.first() {
                doc["execution"] = execution(shared, account, e, j, true);
            }
            publish(
                broker,
                account,
                message(format!("{prefix}/notify-next"), &doc, QoS::AtLeastOnce),
            );
        }
        if told.pending.is_empty() {
            self.told.remove(&key);
        } else {
            self.told.insert(key, told);
        }
    }
}

fn publish(broker: &Arc<Broker>, account: &str, m: Message) {
    if let Ok(routed) = broker.publish(account, Arc::new(m), std::time::Instant::now()) {
        for b in routed.blocked {
            broker.give_up(account, b.session, b.delivery);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After missed changes, `catch_up` tells a thing about a job it was never told of, and a
    /// thing whose last pending job ended that nothing is pending.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn catching_up_after_missed_changes() {
        use std::time::{Duration, Instant};
        let registry = Arc::new(Registry::in_memory("us-east-1").unwrap());
        let (info, _) = registry.create_account("a").unwrap();
        let account = info.id;
        for t in ["t1", "t2"] {
            registry
                .create_thing(&account, t, None, Default::default())
                .unwrap();
        }
        let broker = Arc::new(Broker::new(sekisho_broker::BrokerConfig::default()));
        let (_stop, rx) = tokio::sync::watch::channel(false);
        let config = crate::GatewayConfig {
            aws: Default::default(),
            codec_limits: Default::default(),
            sni: crate::tls::SniRouter {
                data_suffix: "iot.us-east-1.localhost".into(),
                default_names: vec![],
            },
            object_store_url: None,
            handshake_timeout: Duration::from_secs(10),
        };
        let shared = crate::Shared::new(registry.clone(), broker.clone(), config, rx);
        let mut sub = broker.connect(&account, "watcher", true, Duration::ZERO, Instant::now());
        broker.subscribe(
            &account,
            sub.session,
            "$aws/things/+/jobs/notify-next",
            sekisho_mqtt::SubscriptionOptions::default(),
        );
        let arn = |t: &str| format!("arn:aws:iot:us-east-1:{account}:thing/{t}");
        let mut notifier = Notifier::default();
        let new = |targets: Vec<String>| sekisho_registry::NewJob {
            targets,
            document: "{}".into(),
            ..Default::default()
        };
        // t1 was told of j1; then j1 ended and j2 (for t2) came, both missed.
        registry
            .create_job(&account, "j1", new(vec![arn("t1")]), 1.0)
            .unwrap();
        notifier.changed(&shared, &account, "t1");
        assert!(
            sub.rx
                .try_recv()
                .unwrap()
                .message
                .topic
                .ends_with("t1/jobs/notify-next")
        );
        registry
            .cancel_job(&account, "j1", false, None, None, 2.0)
            .unwrap();
        registry
            .create_job(&account, "j2", new(vec![arn("t2")]), 3.0)
            .unwrap();
        assert!(sub.rx.try_recv().is_err());
        notifier.catch_up(&shared);
        let mut told: Vec<(String, String)> = std::iter::from_fn(|| sub.rx.try_recv().ok())
            .map(|d| {
                let doc: Value = serde_json::from_slice(&d.message.payload).unwrap();
                (
                    d.message.topic.to_string(),
                    doc["execution"]["jobId"].to_string(),
                )
            })
            .collect();
        told.sort();
        assert_eq!(
            told,
            [
                (
                    "$aws/things/t1/jobs/notify-next".to_string(),
                    "null".to_string()
                ),
                (
                    "$aws/things/t2/jobs/notify-next".to_string(),
                    "\"j2\"".to_string()
                ),
            ]
        );
        // Nothing new since: catching up again tells nobody anything.
        notifier.catch_up(&shared);
        assert!(sub.rx.try_recv().is_err());
    }

    #[test]
    fn numbers_may_be_decimal_strings() {
        let m = |v: Value| json!({ "n": v }).as_object().cloned().unwrap_or_default();
        assert_eq!(number(&m(json!(2)), "n"), Ok(Some(2)));
        assert_eq!(number(&m(json!("2")), "n"), Ok(Some(2)));
        assert_eq!(
            number(&m(json!(u64::MAX.to_string())), "n"),
            Ok(Some(u64::MAX))
        );
        assert_eq!(number(&m(json!(null)), "n"), Ok(None));
        // u64::MAX + 1, a sign, a fraction, an empty string, spaces: refused.
        for bad in ["18446744073709551616", "-1", "+1", "1.0", "", " 1", "1e3"] {
            assert!(number(&m(json!(bad)), "n").is_err(), "{bad}");
        }
        assert!(number(&m(json!(-1)), "n").is_err());
        assert!(number(&m(json!(1.5)), "n").is_err());
        assert!(number(&m(json!(true)), "n").is_err());
    }

    #[test]
    fn topics() {
        let p = |t| parse_topic(t);
        assert_eq!(p("$aws/things/t/jobs/get"), Some(("t", Request::Get)));
        assert_eq!(
            p("$aws/things/t/jobs/start-next"),
            Some(("t", Request::StartNext))
        );
        assert_eq!(
            p("$aws/things/t/jobs/j-1/get"),
            Some(("t", Request::Describe("j-1")))
        );
        assert_eq!(
            p("$aws/things/t/jobs/$next/get"),
            Some(("t", Request::Describe("$next")))
        );
        assert_eq!(
            p("$aws/things/t/jobs/j_1/update"),
            Some(("t", Request::Update("j_1")))
        );
        assert_eq!(
            p("$aws/things/t/jobs/$next/update"),
            Some(("t", Request::Invalid))
        );
        assert_eq!(p("$aws/things/t/jobs/a/b/c"), Some(("t", Request::Invalid)));
        assert_eq!(p("$aws/things/t/jobs/get/accepted"), None);
        assert_eq!(p("$aws/things/t/jobs/notify-next"), None);
        assert_eq!(p("$aws/things/t/jobs/notify"), None);
        assert_eq!(
            p("$aws/things/t/jobs/notify-fw/update"),
            Some(("t", Request::Update("notify-fw")))
        );
        assert_eq!(p("$aws/things/t/shadow/get"), None);
        let long = "j".repeat(65);
        assert_eq!(
            p(&format!("$aws/things/t/jobs/{long}/get")),
            Some(("t", Request::Invalid))
        );
    }
}
