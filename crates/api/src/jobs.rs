//! The Jobs control plane (service `iot`): CreateJob, DescribeJob, ListJobs, UpdateJob,
//! CancelJob, DeleteJob, GetJobDocument, DescribeJobExecution, ListJobExecutionsForJob,
//! ListJobExecutionsForThing, CancelJobExecution, DeleteJobExecution. Routes are declared in
//! `iot::ROUTES`; the resources named in a body (CreateJob's targets) or by two path labels
//! (a thing's execution of a job) come from the functions here, which the handlers use too.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};

use sekisho_registry::{
    CancelExecution, ExecStatus, Execution, Job, JobCounts, JobTemplate, JobUpdate, NewJob,
    PresignedUrlConfig, now_secs,
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

/// CreateJob's resources: the job, every target it names, and the job template it is made
/// from.
pub(crate) fn create_resources(
    state: &ApiState,
    call: &Call,
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let b = call.json()?;
    let mut out = vec![("job", seg(call, 1).to_owned())];
    for t in targets(&b)? {
        out.push(target(state, call, &t)?);
    }
    if let Some(arn) = str_field(&b, "jobTemplateArn")? {
        out.push(("jobtemplate", template_id(state, call, arn)?.to_owned()));
    }
    Ok(out)
}

/// The id a job template ARN of the caller's account names.
fn template_id<'a>(state: &ApiState, call: &Call, arn: &'a str) -> Result<&'a str, ApiError> {
    let prefix = state.registry.arn(&call.account, "jobtemplate/");
    arn.strip_prefix(&prefix)
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "jobTemplateArn {arn} is not a job template of this account"
            ))
        })
}

/// The document a request names (`document`, or `documentSource` read from the object store)
/// with its source; `None` when it names none.
fn requested_document(
    state: &ApiState,
    call: &Call,
    b: &Map<String, Value>,
) -> Result<Option<(String, Option<String>)>, ApiError> {
    let source = str_field(b, "documentSource")?;
    match (str_field(b, "document")?, source) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "Give document or documentSource, not both",
        )),
        (Some(d), None) => Ok(Some((d.to_owned(), None))),
        (None, Some(url)) => Ok(Some((
            read_document(state, call, url)?,
            Some(url.to_owned()),
        ))),
        (None, None) => Ok(None),
    }
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
    // A job template gives what the request leaves out.
    let template = match str_field(&b, "jobTemplateArn")? {
        Some(arn) => Some((
            arn.to_owned(),
            state
                .registry
                .job_template(&call.account, template_id(state, call, arn)?)?,
        )),
        None => None,
    };
    let (document, source) = match (requested_document(state, call, &b)?, &template) {
        (Some(d), _) => d,
        (None, Some((_, t))) => (t.document.clone(), t.document_source.clone()),
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
        "documentParameters",
        "destinationPackageVersions",
    ] {
        if b.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(format!("{unsupported} is not supported")));
        }
    }
    let t = template.as_ref().map(|(_, t)| t);
    // The role signs documents for this job: whoever makes the job passes it, template or not.
    let presigned = presigned(&b)?.or_else(|| t.and_then(|t| t.presigned.clone()));
    if let Some(p) = &presigned {
        pass_role(state, call, &p.role_arn)?;
    }
    let mut configs = t.map(|t| t.configs.clone()).unwrap_or_default();
    configs.extend(kept(&b)?);
    let spec = NewJob {
        targets: targets(&b)?,
        document,
        document_source: source,
        description: description(&b)?.or_else(|| t.and_then(|t| t.description.clone())),
        continuous,
        presigned,
        in_progress_timeout_minutes: timeout(&b)?
            .or_else(|| t.and_then(|t| t.in_progress_timeout_minutes)),
        configs,
        template_arn: template.as_ref().map(|(arn, _)| arn.clone()),
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
    if let Some(t) = &j.template_arn {
        set(&mut v, "jobTemplateArn", json!(t));
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
            configs: {
                // A job's schedule is set when it is made (UpdateJob has no schedulingConfig).
                let mut k = kept(&b)?;
                k.remove("schedulingConfig");
                k
            },
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

/// CreateJobTemplate: from a document (or `documentSource`), or from an existing job
/// (`jobArn`), whose settings the request may override.
pub(crate) fn create_job_template(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let id = seg(call, 1);
    for unsupported in ["maintenanceWindows", "destinationPackageVersions"] {
        if b.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(format!("{unsupported} is not supported")));
        }
    }
    let from_job = match str_field(&b, "jobArn")? {
        Some(arn) => {
            let prefix = state.registry.arn(&call.account, "job/");
            let job = arn
                .strip_prefix(&prefix)
                .filter(|j| !j.is_empty() && !j.contains('/'))
                .ok_or_else(|| {
                    ApiError::invalid(format!("jobArn {arn} is not a job of this account"))
                })?;
            // Copying a job is reading it, its document included.
            crate::authorize(state, &call.caller, &call.request, "iot:DescribeJob", arn)?;
            crate::authorize(
                state,
                &call.caller,
                &call.request,
                "iot:GetJobDocument",
                arn,
            )?;
            Some(state.registry.describe_job(&call.account, job)?.0)
        }
        None => None,
    };
    let (document, source) = match (requested_document(state, call, &b)?, &from_job) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("Give jobArn or a document, not both"));
        }
        (Some(d), None) => d,
        (None, Some(j)) => (j.document.clone(), j.document_source.clone()),
        (None, None) => {
            return Err(ApiError::invalid(
                "jobArn, document or documentSource is required",
            ));
        }
    };
    let presigned = presigned(&b)?.or_else(|| from_job.as_ref().and_then(|j| j.presigned.clone()));
    if let Some(p) = &presigned {
        pass_role(state, call, &p.role_arn)?;
    }
    let mut configs = from_job
        .as_ref()
        .map(|j| j.configs.clone())
        .unwrap_or_default();
    configs.remove("schedulingConfig");
    configs.extend(kept(&b)?);
    let Some(described) = description(&b)? else {
        return Err(ApiError::invalid("description is required"));
    };
    let t = state.registry.create_job_template(
        &call.account,
        JobTemplate {
            id: id.to_owned(),
            description: Some(described),
            document,
            document_source: source,
            presigned,
            in_progress_timeout_minutes: timeout(&b)?.or_else(|| {
                from_job
                    .as_ref()
                    .and_then(|j| j.in_progress_timeout_minutes)
            }),
            configs,
            created_at: now_secs(),
        },
    )?;
    Ok(json!({"jobTemplateArn": template_arn(state, &call.account, &t.id), "jobTemplateId": t.id}))
}

fn template_arn(state: &ApiState, account: &str, id: &str) -> String {
    state.registry.arn(account, &format!("jobtemplate/{id}"))
}

/// DescribeJobTemplate.
pub(crate) fn describe_job_template(state: &ApiState, call: &Call) -> Out {
    let t = state.registry.job_template(&call.account, seg(call, 1))?;
    let mut v = json!({
        "jobTemplateArn": template_arn(state, &call.account, &t.id),
        "jobTemplateId": t.id,
        "document": t.document,
        "createdAt": t.created_at,
    });
    if let Some(d) = &t.description {
        v["description"] = json!(d);
    }
    if let Some(s) = &t.document_source {
        v["documentSource"] = json!(s);
    }
    if let Some(p) = &t.presigned {
        v["presignedUrlConfig"] = json!({"roleArn": p.role_arn, "expiresInSec": p.expires_in_sec});
    }
    if let Some(m) = t.in_progress_timeout_minutes {
        v["timeoutConfig"] = json!({"inProgressTimeoutInMinutes": m});
    }
    for (k, x) in &t.configs {
        v[k] = x.clone();
    }
    Ok(v)
}

/// ListJobTemplates.
pub(crate) fn list_job_templates(state: &ApiState, call: &Call) -> Out {
    let page = state.registry.list_job_templates(
        &call.account,
        call.q("nextToken"),
        call.q_int("maxResults", 1, 250, 50)? as usize,
    )?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|t| {
            let mut v = json!({"jobTemplateArn": template_arn(state, &call.account, &t.id),
                "jobTemplateId": t.id, "createdAt": t.created_at});
            if let Some(d) = &t.description {
                v["description"] = json!(d);
            }
            v
        })
        .collect();
    Ok(json!({"jobTemplates": items, "nextToken": page.next}))
}

/// DeleteJobTemplate.
pub(crate) fn delete_job_template(state: &ApiState, call: &Call) -> Out {
    state
        .registry
        .delete_job_template(&call.account, seg(call, 1))?;
    Ok(json!({}))
}
