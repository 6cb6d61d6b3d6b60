//! The Jobs control plane (service `iot`): CreateJob, DescribeJob, ListJobs, UpdateJob,
//! CancelJob, DeleteJob, GetJobDocument, DescribeJobExecution, ListJobExecutionsForJob,
//! ListJobExecutionsForThing, CancelJobExecution, DeleteJobExecution. Routes are declared in
//! `iot::ROUTES`; the resources named in a body (CreateJob's targets) or by two path labels
//! (a thing's execution of a job) come from the functions here, which the handlers use too.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};

use sekisho_registry::{
    CancelExecution, ExecStatus, Execution, Job, JobCounts, JobUpdate, NewJob, PresignedUrlConfig,
    now_secs,
};
use serde_json::{Map, Value, json};

use crate::iot::{Out, required, seg, str_field};
use crate::{ApiError, ApiState, Call};

/// Configurations CreateJob and UpdateJob keep and return as given.
const KEPT: &[&str] = &[
    "jobExecutionsRolloutConfig",
    "abortConfig",
    "jobExecutionsRetryConfig",
    "schedulingConfig",
];

/// The `(kind, name)` of a target ARN of this account (`thing` or `thinggroup`).
fn target(state: &ApiState, call: &Call, arn: &str) -> Result<(&'static str, String), ApiError> {
    for kind in ["thing", "thinggroup"] {
        let prefix = state.registry.arn(&call.account, &format!("{kind}/"));
        if let Some(name) = arn.strip_prefix(&prefix)
            && !name.is_empty()
            && !name.contains('/')
        {
            return Ok((kind, name.to_owned()));
        }
    }
    Err(ApiError::invalid(format!(
        "Target {arn} is not a thing or thing group of this account"
    )))
}

fn targets(b: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match b.get("targets") {
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| {
                v.as_str()
                    .filter(|s| s.len() <= 2048)
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::invalid("targets must list ARNs"))
            })
            .collect(),
        _ => Err(ApiError::invalid("targets is required")),
    }
}

/// CreateJob's resources: the job, and every target it names.
pub(crate) fn create_resources(
    state: &ApiState,
    call: &Call,
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let b = call.json()?;
    let mut out = vec![("job", seg(call, 1).to_owned())];
    for t in targets(&b)? {
        out.push(target(state, call, &t)?);
    }
    Ok(out)
}

/// The resources of an operation on one thing's execution of a job (`/things/{thing}/jobs/{job}`).
pub(crate) fn execution_resources(
    _: &ApiState,
    call: &Call,
) -> Result<Vec<(&'static str, String)>, ApiError> {
    Ok(vec![
        ("job", seg(call, 3).to_owned()),
        ("thing", seg(call, 1).to_owned()),
    ])
}

/// The caller must be allowed to pass a role to IoT (`iam:PassRole`), and the role must be
/// one of its account's, as for role aliases: IoT acts with the role's permissions on the
/// caller's behalf.
pub(crate) fn pass_role(state: &ApiState, call: &Call, role_arn: &str) -> Result<(), ApiError> {
    if !role_arn.starts_with(&format!("arn:aws:iam::{}:role/", call.account)) {
        return Err(ApiError::invalid(format!(
            "The role {role_arn} is not a role of this account"
        )));
    }
    crate::authorize_with(
        state,
        &call.caller,
        &call.request,
        "iam:PassRole",
        role_arn,
        &[("iam:PassedToService", "iot.amazonaws.com".to_string())],
    )
}

fn presigned(b: &Map<String, Value>) -> Result<Option<PresignedUrlConfig>, ApiError> {
    match b.get("presignedUrlConfig") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(p)) => {
            let role_arn = required(p, "roleArn")?.to_owned();
            if !(20..=2048).contains(&role_arn.len()) {
                return Err(ApiError::invalid("roleArn must have 20 to 2048 characters"));
            }
            let expires_in_sec = match p.get("expiresInSec") {
                None | Some(Value::Null) => 3600,
                Some(v) => v
                    .as_u64()
                    .filter(|s| (60..=3600).contains(s))
                    .ok_or_else(|| ApiError::invalid("expiresInSec must be 60 to 3600"))?,
            };
            Ok(Some(PresignedUrlConfig {
                role_arn,
                expires_in_sec,
            }))
        }
        Some(_) => Err(ApiError::invalid("presignedUrlConfig must be an object")),
    }
}

fn timeout(b: &Map<String, Value>) -> Result<Option<u64>, ApiError> {
    match b.get("timeoutConfig") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(t)) => match t.get("inProgressTimeoutInMinutes") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Ok(Some(v.as_u64().ok_or_else(|| {
                ApiError::invalid("inProgressTimeoutInMinutes must be a number")
            })?)),
        },
        Some(_) => Err(ApiError::invalid("timeoutConfig must be an object")),
    }
}

/// The largest kept configuration, serialized.
const MAX_CONFIG: usize = 4096;

/// The configurations kept as given: each must be a JSON object of at most [`MAX_CONFIG`]
/// bytes (their members are the model's; they are not applied yet).
fn kept(b: &Map<String, Value>) -> Result<BTreeMap<String, Value>, ApiError> {
    let mut out = BTreeMap::new();
    for k in KEPT {
        match b.get(*k) {
            None | Some(Value::Null) => {}
            Some(v @ Value::Object(_)) if v.to_string().len() <= MAX_CONFIG => {
                out.insert(k.to_string(), v.clone());
            }
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "{k} must be an object of at most {MAX_CONFIG} bytes"
                )));
            }
        }
    }
    Ok(out)
}

fn description(b: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let d = str_field(b, "description")?;
    if d.is_some_and(|d| d.len() > 2028) {
        return Err(ApiError::invalid(
            "description can have at most 2028 characters",
        ));
    }
    Ok(d.map(str::to_owned))
}

/// Reads a job document from the object store: the bucket must be the caller's and the
/// caller must be allowed `s3:GetObject` on the object.
fn read_document(state: &ApiState, call: &Call, url: &str) -> Result<String, ApiError> {
    let (bucket, key) = sekisho_registry::s3_location(url)
        .ok_or_else(|| ApiError::invalid("documentSource must be an S3 URL of a bucket and key"))?;
    let store = state
        .objects
        .as_ref()
        .ok_or_else(|| ApiError::invalid("The object store is not available"))?;
    let missing = || ApiError::invalid(format!("The job document {url} cannot be read"));
    if store.bucket_owner(&bucket).as_deref() != Some(call.account.as_str()) {
        return Err(missing());
    }
    crate::authorize(
        state,
        &call.caller,
        &call.request,
        "s3:GetObject",
        &format!("arn:aws:s3:::{bucket}/{key}"),
    )?;
    let Ok(Some((mut f, meta))) = store.open_object(&bucket, &key) else {
        return Err(missing());
    };
    if meta.size > sekisho_registry::MAX_JOB_DOCUMENT as u64 {
        return Err(ApiError::invalid(
            "The job document can be at most 32768 bytes",
        ));
    }
    let mut buf = Vec::with_capacity(meta.size as usize);
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.take(meta.size).read_to_end(&mut buf))
        .map_err(|_| missing())?;
    String::from_utf8(buf).map_err(|_| ApiError::invalid("The job document must be UTF-8 JSON"))
}

/// CreateJob.
pub(crate) fn create_job(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let id = seg(call, 1);
    let source = str_field(&b, "documentSource")?;
    let document = match (str_field(&b, "document")?, source) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "Give document or documentSource, not both",
            ));
        }
        (Some(d), None) => d.to_owned(),
        (None, Some(url)) => read_document(state, call, url)?,
        (None, None) => return Err(ApiError::invalid("document or documentSource is required")),
    };
    let continuous = match str_field(&b, "targetSelection")? {
        None | Some("SNAPSHOT") => false,
        Some("CONTINUOUS") => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "targetSelection must be SNAPSHOT or CONTINUOUS",
            ));
        }
    };
    for unsupported in [
        "namespaceId",
        "jobTemplateArn",
        "documentParameters",
        "destinationPackageVersions",
    ] {
        if b.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(format!("{unsupported} is not supported")));
        }
    }
    let presigned = presigned(&b)?;
    if let Some(p) = &presigned {
        pass_role(state, call, &p.role_arn)?;
    }
    let spec = NewJob {
        targets: targets(&b)?,
        document,
        document_source: source.map(str::to_owned),
        description: description(&b)?,
        continuous,
        presigned,
        in_progress_timeout_minutes: timeout(&b)?,
        configs: kept(&b)?,
    };
    let j = state
        .registry
        .create_job(&call.account, id, spec, now_secs())?;
    let mut out = json!({"jobArn": state.registry.job_arn(&call.account, &j.id), "jobId": j.id});
    if let Some(d) = &j.description {
        out["description"] = json!(d);
    }
    Ok(out)
}

fn process_details(counts: &JobCounts) -> Value {
    let n = |s: ExecStatus| counts.get(&s).copied().unwrap_or(0);
    json!({
        "numberOfCanceledThings": n(ExecStatus::Canceled),
        "numberOfSucceededThings": n(ExecStatus::Succeeded),
        "numberOfFailedThings": n(ExecStatus::Failed),
        "numberOfRejectedThings": n(ExecStatus::Rejected),
        "numberOfQueuedThings": n(ExecStatus::Queued),
        "numberOfInProgressThings": n(ExecStatus::InProgress),
        "numberOfRemovedThings": n(ExecStatus::Removed),
        "numberOfTimedOutThings": n(ExecStatus::TimedOut),
    })
}

fn job_json(state: &ApiState, account: &str, j: &Job, counts: Option<&JobCounts>) -> Value {
    let mut v = json!({
        "jobArn": state.registry.job_arn(account, &j.id),
        "jobId": j.id,
        "targetSelection": if j.continuous { "CONTINUOUS" } else { "SNAPSHOT" },
        "status": j.status.as_str(),
        "forceCanceled": j.force_canceled,
        "targets": j.targets,
        "createdAt": j.created_at,
        "lastUpdatedAt": j.last_updated_at,
        "isConcurrent": false,
    });
    let set = |v: &mut Value, k: &str, x: Value| {
        v[k] = x;
    };
    if let Some(d) = &j.description {
        set(&mut v, "description", json!(d));
    }
    if let Some(t) = j.completed_at {
        set(&mut v, "completedAt", json!(t));
    }
    if let Some(r) = &j.reason_code {
        set(&mut v, "reasonCode", json!(r));
    }
    if let Some(c) = &j.comment {
        set(&mut v, "comment", json!(c));
    }
    if let Some(p) = &j.presigned {
        set(
            &mut v,
            "presignedUrlConfig",
            json!({"roleArn": p.role_arn, "expiresInSec": p.expires_in_sec}),
        );
    }
    if let Some(m) = j.in_progress_timeout_minutes {
        set(
            &mut v,
            "timeoutConfig",
            json!({"inProgressTimeoutInMinutes": m}),
        );
    }
    for (k, x) in &j.configs {
        set(&mut v, k, x.clone());
    }
    if let Some(c) = counts {
        set(&mut v, "jobProcessDetails", process_details(c));
    }
    v
}

/// DescribeJob.
pub(crate) fn describe_job(state: &ApiState, call: &Call) -> Out {
    let (j, counts) = state.registry.describe_job(&call.account, seg(call, 1))?;
    let mut out = json!({"job": job_json(state, &call.account, &j, Some(&counts))});
    if let Some(s) = &j.document_source {
        out["documentSource"] = json!(s);
    }
    Ok(out)
}

/// GetJobDocument: the document as stored (placeholders not replaced).
pub(crate) fn get_job_document(state: &ApiState, call: &Call) -> Out {
    let (j, _) = state.registry.describe_job(&call.account, seg(call, 1))?;
    Ok(json!({"document": j.document}))
}

/// ListJobs.
pub(crate) fn list_jobs(state: &ApiState, call: &Call) -> Out {
    let continuous = match call.q("targetSelection") {
        None => None,
        Some("SNAPSHOT") => Some(false),
        Some("CONTINUOUS") => Some(true),
        Some(_) => {
            return Err(ApiError::invalid(
                "targetSelection must be SNAPSHOT or CONTINUOUS",
            ));
        }
    };
    let group = call
        .q("thingGroupName")
        .map(|g| state.registry.group_arn(&call.account, g));
    let page = state.registry.list_jobs(
        &call.account,
        call.q("status"),
        continuous,
        group.as_deref(),
        call.q("nextToken"),
        call.q_int("maxResults", 1, 250, 250)? as usize,
    )?;
    let jobs: Vec<Value> = page
        .items
        .iter()
        .map(|j| {
            let mut v = json!({"jobArn": state.registry.job_arn(&call.account, &j.id), "jobId": j.id,
                "targetSelection": if j.continuous { "CONTINUOUS" } else { "SNAPSHOT" },
                "status": j.status.as_str(), "createdAt": j.created_at, "lastUpdatedAt": j.last_updated_at,
                "isConcurrent": false});
            if let Some(t) = j.completed_at {
                v["completedAt"] = json!(t);
            }
            v
        })
        .collect();
    Ok(json!({"jobs": jobs, "nextToken": page.next}))
}

/// UpdateJob.
pub(crate) fn update_job(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let presigned = presigned(&b)?;
    if let Some(p) = &presigned {
        pass_role(state, call, &p.role_arn)?;
    }
    state.registry.update_job(
        &call.account,
        seg(call, 1),
        JobUpdate {
            description: description(&b)?,
            presigned,
            in_progress_timeout_minutes: timeout(&b)?,
            configs: kept(&b)?,
        },
        now_secs(),
    )?;
    Ok(json!({}))
}

/// CancelJob.
pub(crate) fn cancel_job(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let reason = str_field(&b, "reasonCode")?;
    if reason.is_some_and(|r| {
        r.len() > 128
            || !r
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    }) {
        return Err(ApiError::invalid(
            "reasonCode must be up to 128 of [A-Z0-9_]",
        ));
    }
    let comment = str_field(&b, "comment")?;
    if comment.is_some_and(|c| c.len() > 2028) {
        return Err(ApiError::invalid(
            "comment can have at most 2028 characters",
        ));
    }
    let j = state.registry.cancel_job(
        &call.account,
        seg(call, 1),
        call.q_bool("force")?,
        reason.map(str::to_owned),
        comment.map(str::to_owned),
        now_secs(),
    )?;
    let mut out = json!({"jobArn": state.registry.job_arn(&call.account, &j.id), "jobId": j.id});
    if let Some(d) = &j.description {
        out["description"] = json!(d);
    }
    Ok(out)
}

/// DeleteJob.
pub(crate) fn delete_job(state: &ApiState, call: &Call) -> Out {
    if call.q("namespaceId").is_some() {
        return Err(ApiError::invalid("namespaceId is not supported"));
    }
    state
        .registry
        .delete_job(&call.account, seg(call, 1), call.q_bool("force")?)?;
    Ok(json!({}))
}

/// The control plane's `JobExecution` (status details under `detailsMap`).
fn execution_json(state: &ApiState, account: &str, e: &Execution, now: f64) -> Value {
    let mut v = json!({
        "jobId": e.job_id,
        "status": e.status.as_str(),
        "forceCanceled": e.force_canceled,
        "statusDetails": {"detailsMap": e.status_details},
        "thingArn": state.registry.arn(account, &format!("thing/{}", e.thing)),
        "queuedAt": e.queued_at,
        "lastUpdatedAt": e.last_updated_at,
        "executionNumber": e.execution_number,
        "versionNumber": e.version,
    });
    if let Some(s) = e.started_at {
        v["startedAt"] = json!(s);
    }
    if let Some(t) = e.seconds_before_timeout(now) {
        v["approximateSecondsBeforeTimedOut"] = json!(t);
    }
    v
}

fn summary_json(e: &Execution) -> Value {
    let mut v = json!({"status": e.status.as_str(), "queuedAt": e.queued_at,
        "lastUpdatedAt": e.last_updated_at, "executionNumber": e.execution_number,
        "retryAttempt": e.retry_attempt()});
    if let Some(s) = e.started_at {
        v["startedAt"] = json!(s);
    }
    v
}

fn execution_number(call: &Call) -> Result<Option<u64>, ApiError> {
    call.q("executionNumber")
        .map(|n| {
            n.parse::<u64>()
                .map_err(|_| ApiError::invalid("executionNumber must be a number"))
        })
        .transpose()
}

/// DescribeJobExecution (control plane).
pub(crate) fn describe_execution(state: &ApiState, call: &Call) -> Out {
    let (e, _) = state.registry.job_execution(
        &call.account,
        seg(call, 3),
        seg(call, 1),
        execution_number(call)?,
    )?;
    Ok(json!({"execution": execution_json(state, &call.account, &e, now_secs())}))
}

/// ListJobExecutionsForJob.
pub(crate) fn executions_of_job(state: &ApiState, call: &Call) -> Out {
    let page = state.registry.executions_of_job(
        &call.account,
        seg(call, 1),
        call.q("status"),
        call.q("nextToken"),
        call.q_int("maxResults", 1, 250, 250)? as usize,
    )?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|e| {
            json!({"thingArn": state.registry.arn(&call.account, &format!("thing/{}", e.thing)),
            "jobExecutionSummary": summary_json(e)})
        })
        .collect();
    Ok(json!({"executionSummaries": items, "nextToken": page.next}))
}

/// ListJobExecutionsForThing.
pub(crate) fn executions_of_thing(state: &ApiState, call: &Call) -> Out {
    if call.q("namespaceId").is_some() {
        return Err(ApiError::invalid("namespaceId is not supported"));
    }
    let page = state.registry.executions_of_thing(
        &call.account,
        seg(call, 1),
        call.q("status"),
        call.q("jobId"),
        call.q("nextToken"),
        call.q_int("maxResults", 1, 250, 250)? as usize,
    )?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|e| json!({"jobId": e.job_id, "jobExecutionSummary": summary_json(e)}))
        .collect();
    Ok(json!({"executionSummaries": items, "nextToken": page.next}))
}

/// CancelJobExecution.
pub(crate) fn cancel_execution(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let expected_version = match b.get("expectedVersion") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| ApiError::invalid("expectedVersion must be a number"))?,
        ),
    };
    let status_details = match b.get("statusDetails") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(
            m.iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|s| (k.clone(), s.to_owned()))
                        .ok_or_else(|| ApiError::invalid("statusDetails values must be strings"))
                })
                .collect::<Result<BTreeMap<_, _>, _>>()?,
        ),
        Some(_) => return Err(ApiError::invalid("statusDetails must be an object")),
    };
    state.registry.cancel_job_execution(
        &call.account,
        seg(call, 3),
        seg(call, 1),
        CancelExecution {
            force: call.q_bool("force")?,
            expected_version,
            status_details,
        },
        now_secs(),
    )?;
    Ok(json!({}))
}

/// DeleteJobExecution.
pub(crate) fn delete_execution(state: &ApiState, call: &Call) -> Out {
    let n = seg(call, 5)
        .parse::<u64>()
        .map_err(|_| ApiError::invalid("executionNumber must be a number"))?;
    state.registry.delete_job_execution(
        &call.account,
        seg(call, 3),
        seg(call, 1),
        n,
        call.q_bool("force")?,
        now_secs(),
    )?;
    Ok(json!({}))
}
