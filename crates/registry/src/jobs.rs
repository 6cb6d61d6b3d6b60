//! Jobs and job executions: the control plane's jobs, one execution per targeted thing, and
//! the execution state machine the devices drive (AWS IoT Developer Guide, iot-jobs-lifecycle
//! and jobs-mqtt-api). Every operation takes the time (`now`, epoch seconds) as a parameter;
//! [`Registry::expire_job_executions`] applies the timeouts when the caller's timer says.
//!
//! - An execution is QUEUED when created; a device moves it to IN_PROGRESS (start-next, or an
//!   update) and ends it SUCCEEDED, FAILED or REJECTED; Jobs end it TIMED_OUT (the job's
//!   in-progress timeout, or the step timeout a device set) or CANCELED. Ended is final.
//! - "Next pending": IN_PROGRESS executions first, then QUEUED, each in job creation order.
//! - A SNAPSHOT job is COMPLETED once every execution has ended; a CONTINUOUS job also gives
//!   an execution to a thing that joins a target group later, and stays IN_PROGRESS.
//! - Every change to a thing's executions goes out on the change feed
//!   ([`Change::JobExecutions`]), from which the gateway publishes `notify` and `notify-next`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::Kind;
use crate::*;

/// The most jobs one account keeps (ended ones included, until deleted).
pub const MAX_JOBS: usize = 10_000;
/// The most targets a job may name.
pub const MAX_TARGETS: usize = 100;
/// The largest job document, in bytes.
pub const MAX_DOCUMENT: usize = 32 * 1024;
/// The most `statusDetails` entries.
pub const MAX_STATUS_DETAILS: usize = 10;

/// A job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Waiting for its `schedulingConfig.startTime`.
    Scheduled,
    /// Executions are under way.
    InProgress,
    /// Canceled.
    Canceled,
    /// Every execution ended (SNAPSHOT jobs).
    Completed,
}

impl JobStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Scheduled => "SCHEDULED",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Canceled => "CANCELED",
            JobStatus::Completed => "COMPLETED",
        }
    }
}

/// A job execution's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecStatus {
    /// Waiting for the device.
    Queued,
    /// The device is working on it.
    InProgress,
    /// The device succeeded.
    Succeeded,
    /// The device failed.
    Failed,
    /// A timeout passed.
    TimedOut,
    /// The device rejected it.
    Rejected,
    /// The thing left a dynamic target group.
    Removed,
    /// Canceled by CancelJob or CancelJobExecution.
    Canceled,
}

impl ExecStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecStatus::Queued => "QUEUED",
            ExecStatus::InProgress => "IN_PROGRESS",
            ExecStatus::Succeeded => "SUCCEEDED",
            ExecStatus::Failed => "FAILED",
            ExecStatus::TimedOut => "TIMED_OUT",
            ExecStatus::Rejected => "REJECTED",
            ExecStatus::Removed => "REMOVED",
            ExecStatus::Canceled => "CANCELED",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<ExecStatus> {
        Some(match s {
            "QUEUED" => ExecStatus::Queued,
            "IN_PROGRESS" => ExecStatus::InProgress,
            "SUCCEEDED" => ExecStatus::Succeeded,
            "FAILED" => ExecStatus::Failed,
            "TIMED_OUT" => ExecStatus::TimedOut,
            "REJECTED" => ExecStatus::Rejected,
            "REMOVED" => ExecStatus::Removed,
            "CANCELED" => ExecStatus::Canceled,
            _ => return None,
        })
    }

    /// Whether the execution has ended.
    pub fn is_terminal(self) -> bool {
        !matches!(self, ExecStatus::Queued | ExecStatus::InProgress)
    }
}

/// `presignedUrlConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresignedUrlConfig {
    /// The role IoT assumes to sign the URLs.
    pub role_arn: String,
    /// How long a URL is valid, in seconds (60 to 3600).
    pub expires_in_sec: u64,
}

/// A job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Its id.
    pub id: String,
    /// Creation order within the account (the order of "next pending").
    pub seq: u64,
    /// Description.
    pub description: Option<String>,
    /// The job document (`documentSource` is read into it at creation).
    pub document: String,
    /// Where the document came from, if it was read from the object store.
    pub document_source: Option<String>,
    /// Target ARNs (things and thing groups), as given.
    pub targets: Vec<String>,
    /// SNAPSHOT (false) or CONTINUOUS (true).
    pub continuous: bool,
    /// Status.
    pub status: JobStatus,
    /// Canceled with `force`.
    pub force_canceled: bool,
    /// CancelJob's reason code.
    pub reason_code: Option<String>,
    /// CancelJob's comment.
    pub comment: Option<String>,
    /// Presigned URL settings.
    pub presigned: Option<PresignedUrlConfig>,
    /// `timeoutConfig.inProgressTimeoutInMinutes`.
    pub in_progress_timeout_minutes: Option<u64>,
    /// Configurations kept and returned as given (rollout, abort, retry, scheduling).
    pub configs: BTreeMap<String, Value>,
    /// Times, epoch seconds.
    pub created_at: f64,
    /// Last change.
    pub last_updated_at: f64,
    /// When it completed or was canceled.
    pub completed_at: Option<f64>,
    /// With `jobExecutionsRolloutConfig`: the staged rollout's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutState>,
    /// The job template it was made from, if any (its ARN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_arn: Option<String>,
    /// With `schedulingConfig`: when it starts and ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
}

/// `schedulingConfig`: the job starts (its targets are resolved and notified) at `start`, and
/// at `end` does what `end_behavior` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Epoch seconds; `None`: it started at creation.
    pub start: Option<f64>,
    /// Epoch seconds.
    pub end: Option<f64>,
    /// STOP_ROLLOUT, CANCEL or FORCE_CANCEL.
    pub end_behavior: String,
    /// Whether `end` has come (no more things join it).
    #[serde(default)]
    pub ended: bool,
}

/// `YYYY-MM-DDTHH:MM` (seconds and a `Z` may follow), UTC, as epoch seconds.
fn schedule_time(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = s.split_once('T')?;
    let num = |x: &str, len: usize| -> Option<i64> {
        (x.len() == len && x.bytes().all(|b| b.is_ascii_digit())).then(|| x.parse().ok())?
    };
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    let mut t = time.split(':');
    let (h, min) = (num(t.next()?, 2)?, num(t.next()?, 2)?);
    let sec = match t.next() {
        Some(x) => num(x, 2)?,
        None => 0,
    };
    if d.next().is_some() || t.next().is_some() || h > 23 || min > 59 || sec > 59 {
        return None;
    }
    let month = time::Month::try_from(u8::try_from(m).ok()?).ok()?;
    let date =
        time::Date::from_calendar_date(i32::try_from(y).ok()?, month, u8::try_from(day).ok()?)
            .ok()?;
    Some((date.midnight().assume_utc().unix_timestamp() + h * 3600 + min * 60 + sec) as f64)
}

/// `schedulingConfig`, checked against `now` as AWS bounds it: the start at least 30 minutes
/// and at most a year ahead, the end at least 30 minutes after the start (or now) and at most
/// two years ahead. Maintenance windows are refused (not served).
fn schedule_config(configs: &BTreeMap<String, Value>, now: f64) -> Result<Option<Schedule>> {
    let Some(c) = configs.get("schedulingConfig") else {
        return Ok(None);
    };
    let bad = |m: &str| RegistryError::InvalidRequest(format!("schedulingConfig: {m}"));
    if c.get("maintenanceWindows")
        .and_then(Value::as_array)
        .is_some_and(|w| !w.is_empty())
    {
        return Err(bad("maintenanceWindows are not supported"));
    }
    let when = |k: &str| -> Result<Option<f64>> {
        match c.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => schedule_time(s)
                .map(Some)
                .ok_or_else(|| bad(&format!("{k} must be YYYY-MM-DDTHH:MM"))),
            Some(_) => Err(bad(&format!("{k} must be YYYY-MM-DDTHH:MM"))),
        }
    };
    let (start, end) = (when("startTime")?, when("endTime")?);
    const HALF_HOUR: f64 = 1800.0;
    const YEAR: f64 = 365.0 * 86_400.0;
    if let Some(s) = start
        && !(now + HALF_HOUR..=now + YEAR).contains(&s)
    {
        return Err(bad("startTime must be 30 minutes to a year from now"));
    }
    if let Some(e) = end {
        let from = start.unwrap_or(now);
        if !(from + HALF_HOUR..=from + 2.0 * YEAR).contains(&e) || e > now + 2.0 * YEAR {
            return Err(bad(
                "endTime must be at least 30 minutes after startTime (or now) and within two years",
            ));
        }
    }
    let end_behavior = match c.get("endBehavior").and_then(Value::as_str) {
        None => "STOP_ROLLOUT",
        Some(b @ ("STOP_ROLLOUT" | "CANCEL" | "FORCE_CANCEL")) => b,
        Some(_) => {
            return Err(bad(
                "endBehavior must be STOP_ROLLOUT, CANCEL or FORCE_CANCEL",
            ));
        }
    };
    if start.is_none() && end.is_none() {
        return Ok(None);
    }
    Ok(Some(Schedule {
        start,
        end,
        end_behavior: end_behavior.to_owned(),
        ended: false,
    }))
}

/// Job templates an account may have.
pub const MAX_JOB_TEMPLATES: usize = 1000;

/// A job template (CreateJobTemplate): what CreateJob takes from it when the request does not
/// say otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobTemplate {
    /// Its id.
    pub id: String,
    /// Description.
    pub description: Option<String>,
    /// The job document (`documentSource` read into it at creation).
    pub document: String,
    /// Where the document came from, if it was read from the object store.
    pub document_source: Option<String>,
    /// Presigned URL settings.
    pub presigned: Option<PresignedUrlConfig>,
    /// `timeoutConfig.inProgressTimeoutInMinutes`.
    pub in_progress_timeout_minutes: Option<u64>,
    /// Rollout, abort, retry and scheduling configurations, as for a job.
    pub configs: BTreeMap<String, Value>,
    /// Creation time, epoch seconds.
    pub created_at: f64,
}

/// A staged rollout (`jobExecutionsRolloutConfig`): the things a job targets get their
/// executions (and so are notified) at most `rate` a minute; with `exponentialRate` the rate
/// starts at `baseRatePerMinute` and is multiplied by `incrementFactor` each time
/// `rateIncreaseCriteria` is met, up to `maximumPerMinute` (or 1,000).
///
/// The things waiting their turn are not in the job's document (which a job's every change
/// rewrites) but rows of their own (`Account::job_waiting`, kind `job_waiting`), written once
/// when they join and deleted when they leave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The order the next thing to join will have.
    #[serde(default)]
    pub next_order: u64,
    /// Executions a minute, now.
    pub rate: u64,
    /// When the current minute began.
    pub window: f64,
    /// Executions created in the current minute.
    pub in_window: u64,
    /// Executions created in all (things notified).
    pub notified: u64,
    /// Things notified, and executions succeeded, when the rate last grew.
    pub mark: (u64, u64),
}

/// `jobExecutionsRolloutConfig`, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rollout {
    maximum: Option<u64>,
    base: u64,
    factor: f64,
    notified: Option<u64>,
    succeeded: Option<u64>,
}

/// The most executions a minute a rollout may create.
const MAX_ROLLOUT_RATE: u64 = 1000;

fn rollout_config(configs: &BTreeMap<String, Value>) -> Result<Option<Rollout>> {
    let Some(c) = configs.get("jobExecutionsRolloutConfig") else {
        return Ok(None);
    };
    let bad = |m: &str| {
        Err(RegistryError::InvalidRequest(format!(
            "jobExecutionsRolloutConfig: {m}"
        )))
    };
    let int = |v: Option<&Value>, name: &str, max: u64| -> Result<Option<u64>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
                _ => Err(RegistryError::InvalidRequest(format!(
                    "jobExecutionsRolloutConfig: {name} must be an integer from 1 to {max}"
                ))),
            },
        }
    };
    let maximum = int(
        c.get("maximumPerMinute"),
        "maximumPerMinute",
        MAX_ROLLOUT_RATE,
    )?;
    let Some(e) = c.get("exponentialRate").filter(|v| !v.is_null()) else {
        return match maximum {
            Some(m) => Ok(Some(Rollout {
                maximum,
                base: m,
                factor: 1.0,
                notified: None,
                succeeded: None,
            })),
            None => Ok(None),
        };
    };
    let Some(base) = int(
        e.get("baseRatePerMinute"),
        "baseRatePerMinute",
        MAX_ROLLOUT_RATE,
    )?
    else {
        return bad("exponentialRate needs baseRatePerMinute");
    };
    let factor = match e.get("incrementFactor").and_then(Value::as_f64) {
        Some(f) if (1.1..=5.0).contains(&f) => f,
        _ => return bad("incrementFactor must be a number from 1.1 to 5.0"),
    };
    let criteria = e.get("rateIncreaseCriteria");
    let notified = int(
        criteria.and_then(|c| c.get("numberOfNotifiedThings")),
        "numberOfNotifiedThings",
        u64::from(u32::MAX),
    )?;
    let succeeded = int(
        criteria.and_then(|c| c.get("numberOfSucceededThings")),
        "numberOfSucceededThings",
        u64::from(u32::MAX),
    )?;
    if notified.is_some() == succeeded.is_some() {
        return bad(
            "rateIncreaseCriteria needs one of numberOfNotifiedThings and numberOfSucceededThings",
        );
    }
    if maximum.is_some_and(|m| m < base) {
        return bad("maximumPerMinute must be at least baseRatePerMinute");
    }
    Ok(Some(Rollout {
        maximum,
        base,
        factor,
        notified,
        succeeded,
    }))
}

/// One thing's execution of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    /// The job.
    pub job_id: String,
    /// The thing.
    pub thing: String,
    /// The job's creation order.
    pub job_seq: u64,
    /// Status.
    pub status: ExecStatus,
    /// What the device reported.
    pub status_details: BTreeMap<String, String>,
    /// Times, epoch seconds.
    pub queued_at: f64,
    /// When it went IN_PROGRESS.
    pub started_at: Option<f64>,
    /// Last change.
    pub last_updated_at: f64,
    /// Incremented by every update.
    pub version: u64,
    /// Which execution of the job on this thing (1).
    pub execution_number: u64,
    /// Canceled with `force` while IN_PROGRESS.
    pub force_canceled: bool,
    /// When it times out, if IN_PROGRESS with a timeout.
    pub deadline: Option<f64>,
    /// Retries so far (`jobExecutionsRetryConfig`): after FAILED and after TIMED_OUT.
    #[serde(default)]
    pub retries: (u64, u64),
}

impl Execution {
    /// Which attempt this is: 0 for the first execution, then one more for each retry.
    pub fn retry_attempt(&self) -> u64 {
        self.retries.0 + self.retries.1
    }
}

impl Execution {
    /// Seconds until it times out, if it may.
    pub fn seconds_before_timeout(&self, now: f64) -> Option<u64> {
        self.deadline.map(|d| (d - now).max(0.0) as u64)
    }
}

/// What CreateJob asks for (validated by [`Registry::create_job`]).
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    /// Target ARNs.
    pub targets: Vec<String>,
    /// The document.
    pub document: String,
    /// Where it came from.
    pub document_source: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// CONTINUOUS.
    pub continuous: bool,
    /// Presigned URL settings.
    pub presigned: Option<PresignedUrlConfig>,
    /// In-progress timeout.
    pub in_progress_timeout_minutes: Option<u64>,
    /// Other configurations, kept as given.
    pub configs: BTreeMap<String, Value>,
    /// The job template it is made from (its ARN), if any.
    pub template_arn: Option<String>,
}

/// What UpdateJob changes (what is `None` stays).
#[derive(Debug, Clone, Default)]
pub struct JobUpdate {
    /// Description.
    pub description: Option<String>,
    /// Presigned URL settings.
    pub presigned: Option<PresignedUrlConfig>,
    /// In-progress timeout.
    pub in_progress_timeout_minutes: Option<u64>,
    /// Other configurations, replacing those of the same name.
    pub configs: BTreeMap<String, Value>,
}

/// CancelJobExecution's arguments.
#[derive(Debug, Clone, Default)]
pub struct CancelExecution {
    /// Cancel an IN_PROGRESS execution too.
    pub force: bool,
    /// Must equal the execution's version.
    pub expected_version: Option<u64>,
    /// Replaces the status details.
    pub status_details: Option<BTreeMap<String, String>>,
}

/// Counts of a job's executions by status (`jobProcessDetails`).
pub type JobCounts = BTreeMap<ExecStatus, usize>;

/// A device's update of its execution (UpdateJobExecution).
#[derive(Debug, Clone, Default)]
pub struct ExecutionUpdate {
    /// The new status: IN_PROGRESS, SUCCEEDED, FAILED or REJECTED.
    pub status: String,
    /// Replaces the status details, if given.
    pub status_details: Option<BTreeMap<String, String>>,
    /// Must equal the execution's version.
    pub expected_version: Option<u64>,
    /// Must equal the execution's number.
    pub execution_number: Option<u64>,
    /// A new step timeout (IN_PROGRESS only).
    pub step_timeout_minutes: Option<u64>,
}

fn exec_key(job: &str, thing: &str) -> String {
    format!("{job}\n{thing}")
}

fn job_not_found(id: &str) -> RegistryError {
    RegistryError::NotFound(format!("Job {id} does not exist"))
}

fn execution_not_found(job: &str, thing: &str) -> RegistryError {
    RegistryError::NotFound(format!(
        "Job execution of job {job} on thing {thing} does not exist"
    ))
}

/// Checks a device's status details: at most ten entries, keys `[a-zA-Z0-9:_-]+` (1 to 128),
/// values of 1 to 1,024 characters without control characters.
pub fn check_status_details(d: &BTreeMap<String, String>) -> Result<()> {
    if d.len() > MAX_STATUS_DETAILS {
        return Err(RegistryError::InvalidRequest(format!(
            "statusDetails can have at most {MAX_STATUS_DETAILS} entries"
        )));
    }
    for (k, v) in d {
        check_name("statusDetails key", k, 128, |c| {
            c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')
        })?;
        if v.is_empty() || v.chars().count() > 1024 || v.chars().any(char::is_control) {
            return Err(RegistryError::InvalidRequest(format!(
                "statusDetails value for {k} is not valid"
            )));
        }
    }
    Ok(())
}

/// Checks a step timeout (1 to 10,080 minutes).
fn check_step_timeout(m: Option<u64>) -> Result<()> {
    if m.is_some_and(|m| !(1..=10_080).contains(&m)) {
        return Err(RegistryError::InvalidRequest(
            "stepTimeoutInMinutes must be between 1 and 10080".into(),
        ));
    }
    Ok(())
}

impl Account {
    /// A thing's executions that have not ended, in "next pending" order: IN_PROGRESS first,
    /// then QUEUED, each in job creation order.
    pub fn pending_executions(&self, thing: &str) -> Vec<&Execution> {
        let mut v: Vec<&Execution> = self
            .executions
            .range((thing.to_owned(), String::new())..)
            .take_while(|((t, _), _)| t == thing)
            .map(|(_, e)| e)
            .filter(|e| !e.status.is_terminal())
            .collect();
        v.sort_by_key(|e| (e.status != ExecStatus::InProgress, e.job_seq));
        v
    }

    /// Things a target names now: a thing, or every thing of a group and its descendants.
    fn things_of_target(
        &self,
        target: &str,
        thing_prefix: &str,
        group_prefix: &str,
    ) -> Vec<String> {
        if let Some(t) = target.strip_prefix(thing_prefix) {
            return self
                .things
                .contains_key(t)
                .then(|| t.to_owned())
                .into_iter()
                .collect();
        }
        let Some(g) = target.strip_prefix(group_prefix) else {
            return Vec::new();
        };
        let mut out = BTreeSet::new();
        for (name, _) in self.thing_groups.iter() {
            if self.group_lineage(name).contains(&g) {
                out.extend(self.group_members.get(name).into_iter().flatten().cloned());
            }
        }
        out.into_iter().collect()
    }

    fn job_counts(&self, job: &str) -> JobCounts {
        let mut c = JobCounts::new();
        for e in self.executions_of(job) {
            *c.entry(e.status).or_default() += 1;
        }
        c
    }

    /// A job's executions, in thing order.
    pub(crate) fn executions_of<'a>(&'a self, job: &'a str) -> impl Iterator<Item = &'a Execution> {
        self.job_things
            .get(job)
            .into_iter()
            .flatten()
            .filter_map(move |t| self.executions.get(&(t.clone(), job.to_owned())))
    }

    /// Puts an execution in memory (and in the index by job).
    pub(crate) fn put_execution(&mut self, e: Execution) {
        self.job_things
            .entry(e.job_id.clone())
            .or_default()
            .insert(e.thing.clone());
        self.executions
            .insert((e.thing.clone(), e.job_id.clone()), e);
    }

    /// Takes an execution out of memory (and of the index by job).
    pub(crate) fn remove_execution(&mut self, thing: &str, job: &str) -> Option<Execution> {
        if let Some(things) = self.job_things.get_mut(job) {
            things.remove(thing);
            if things.is_empty() {
                self.job_things.remove(job);
            }
        }
        self.executions.remove(&(thing.to_owned(), job.to_owned()))
    }

    /// Puts an execution in memory and in the transaction.
    fn save_execution(&mut self, tx: &mut Tx, e: Execution) -> Result<()> {
        tx.put(Kind::JobExecution, &exec_key(&e.job_id, &e.thing), &e)?;
        self.put_execution(e);
        Ok(())
    }

    /// A SNAPSHOT job whose executions have all ended is COMPLETED.
    pub(crate) fn maybe_complete(&mut self, tx: &mut Tx, job: &str, now: f64) -> Result<()> {
        self.maybe_abort(tx, job, now)?;
        let Some(j) = self.jobs.get(job) else {
            return Ok(());
        };
        if j.continuous || j.status != JobStatus::InProgress {
            return Ok(());
        }
        if self.job_waiting.get(job).is_some_and(|w| !w.is_empty()) {
            return Ok(());
        }
        if self.executions_of(job).any(|e| !e.status.is_terminal()) {
            return Ok(());
        }
        let mut j = j.clone();
        j.status = JobStatus::Completed;
        j.completed_at = Some(now);
        j.last_updated_at = now;
        tx.put(Kind::Job, job, &j)?;
        crate::events::job(tx, self, &j, "COMPLETED");
        self.jobs.insert(job.to_owned(), j);
        Ok(())
    }
}

impl Account {
    /// `abortConfig`: once at least `minNumberOfExecutedThings` executions have ended, a job
    /// whose share of ended executions of `failureType` (FAILED, REJECTED, TIMED_OUT, or ALL
    /// three) reaches `thresholdPercentage` is canceled: its QUEUED executions are canceled,
    /// those IN_PROGRESS finish (as CancelJob without force).
    fn maybe_abort(&mut self, tx: &mut Tx, job: &str, now: f64) -> Result<()> {
        let Some(j) = self.jobs.get(job) else {
            return Ok(());
        };
        if j.status != JobStatus::InProgress {
            return Ok(());
        }
        let Some(criteria) = j
            .configs
            .get("abortConfig")
            .and_then(|c| c.get("criteriaList"))
            .and_then(Value::as_array)
        else {
            return Ok(());
        };
        let ended: Vec<ExecStatus> = self
            .executions_of(job)
            .map(|e| e.status)
            .filter(|s| {
                matches!(
                    s,
                    ExecStatus::Succeeded
                        | ExecStatus::Failed
                        | ExecStatus::Rejected
                        | ExecStatus::TimedOut
                )
            })
            .collect();
        let abort = criteria.iter().any(|c| {
            let min = c
                .get("minNumberOfExecutedThings")
                .and_then(Value::as_u64)
                .unwrap_or(1) as usize;
            let threshold = c
                .get("thresholdPercentage")
                .and_then(Value::as_f64)
                .unwrap_or(100.0);
            let kind = c
                .get("failureType")
                .and_then(Value::as_str)
                .unwrap_or("ALL");
            let failures = ended
                .iter()
                .filter(|s| match kind {
                    "FAILED" => **s == ExecStatus::Failed,
                    "REJECTED" => **s == ExecStatus::Rejected,
                    "TIMED_OUT" => **s == ExecStatus::TimedOut,
                    _ => **s != ExecStatus::Succeeded,
                })
                .count();
            ended.len() >= min.max(1) && failures as f64 * 100.0 >= threshold * ended.len() as f64
        });
        if !abort {
            return Ok(());
        }
        let queued: Vec<Execution> = self
            .executions_of(job)
            .filter(|e| e.status == ExecStatus::Queued)
            .cloned()
            .collect();
        for mut e in queued {
            e.status = ExecStatus::Canceled;
            e.last_updated_at = now;
            let thing_arn = format!("{}thing/{}", self.arn_prefix, e.thing);
            crate::events::execution(tx, self, &thing_arn, &e);
            tx.change(Change::JobExecutions {
                account: self.id().to_owned(),
                things: vec![e.thing.clone()],
            });
            self.save_execution(tx, e)?;
        }
        let Some(mut j) = self.jobs.get(job).cloned() else {
            return Ok(());
        };
        j.status = JobStatus::Canceled;
        self.wait_clear(tx, job);
        j.comment = Some("Canceled by its abortConfig".into());
        j.last_updated_at = now;
        j.completed_at = Some(now);
        tx.put(Kind::Job, job, &j)?;
        crate::events::job(tx, self, &j, "CANCELED");
        self.jobs.insert(job.to_owned(), j);
        Ok(())
    }
}

impl Account {
    /// CancelJob's change: QUEUED executions are canceled (and with `force` IN_PROGRESS ones
    /// too), the rollout queue emptied. Returns the job and the things whose executions
    /// changed.
    fn cancel(
        &mut self,
        tx: &mut Tx,
        id: &str,
        force: bool,
        reason_code: Option<String>,
        comment: Option<String>,
        now: f64,
    ) -> Result<(Job, Vec<String>)> {
        let mut j = self
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| job_not_found(id))?;
        if j.status == JobStatus::Completed {
            return Err(RegistryError::InvalidStateTransition(format!(
                "Job {id} has completed and cannot be canceled"
            )));
        }
        if j.status == JobStatus::Canceled && !force {
            return Ok((j, Vec::new()));
        }
        let mut things = Vec::new();
        let targets: Vec<Execution> = self
            .executions_of(id)
            .filter(|e| {
                e.status == ExecStatus::Queued || (force && e.status == ExecStatus::InProgress)
            })
            .cloned()
            .collect();
        for mut e in targets {
            e.force_canceled = e.status == ExecStatus::InProgress;
            e.status = ExecStatus::Canceled;
            e.last_updated_at = now;
            e.deadline = None;
            things.push(e.thing.clone());
            let thing_arn = format!("{}thing/{}", self.arn_prefix, e.thing);
            crate::events::execution(tx, self, &thing_arn, &e);
            self.save_execution(tx, e)?;
        }
        j.status = JobStatus::Canceled;
        self.wait_clear(tx, id);
        j.force_canceled |= force;
        j.reason_code = reason_code.or(j.reason_code);
        j.comment = comment.or(j.comment);
        j.last_updated_at = now;
        j.completed_at = Some(now);
        tx.put(Kind::Job, id, &j)?;
        crate::events::job(tx, self, &j, "CANCELED");
        self.jobs.insert(id.to_owned(), j.clone());
        Ok((j, things))
    }

    /// A scheduled job's end, in one write: no more things join it (STOP_ROLLOUT, and those
    /// waiting are dropped), or it is canceled (CANCEL, FORCE_CANCEL). Returns the things
    /// whose executions changed.
    fn end_schedule(&mut self, tx: &mut Tx, id: &str, now: f64) -> Result<Vec<String>> {
        let Some(mut j) = self.jobs.get(id).cloned() else {
            return Ok(Vec::new());
        };
        let Some(s) = j.schedule.as_mut() else {
            return Ok(Vec::new());
        };
        s.ended = true;
        let behavior = s.end_behavior.clone();
        self.wait_clear(tx, id);
        j.last_updated_at = now;
        tx.put(Kind::Job, id, &j)?;
        self.jobs.insert(id.to_owned(), j);
        if behavior == "STOP_ROLLOUT" {
            self.maybe_complete(tx, id, now)?;
            return Ok(Vec::new());
        }
        let (_, things) = self.cancel(
            tx,
            id,
            behavior == "FORCE_CANCEL",
            Some("SCHEDULED_END".into()),
            Some(format!("Ended by its schedule ({behavior})")),
            now,
        )?;
        Ok(things)
    }

    /// A job starts: its things get their executions now, or with a staged rollout join its
    /// queue. Returns the things given one.
    fn launch(
        &mut self,
        tx: &mut Tx,
        id: &str,
        things: BTreeSet<String>,
        staged: Option<Rollout>,
        now: f64,
    ) -> Result<BTreeSet<String>> {
        let Some(mut job) = self.jobs.get(id).cloned() else {
            return Ok(BTreeSet::new());
        };
        job.status = JobStatus::InProgress;
        job.last_updated_at = now;
        job.rollout = staged.map(|c| new_rollout(c, now));
        tx.put(Kind::Job, id, &job)?;
        self.jobs.insert(id.to_owned(), job.clone());
        let things: BTreeSet<String> = if job.rollout.is_some() {
            for thing in &things {
                self.wait_push(tx, id, thing)?;
            }
            // The document (its queue's next order) once, not once per thing.
            if let Some(j) = self.jobs.get(id) {
                tx.put(Kind::Job, id, j)?;
            }
            self.roll_out(tx, id, now)?.into_iter().collect()
        } else {
            for thing in &things {
                self.save_execution(tx, new_execution(&job, thing, now))?;
            }
            things
        };
        self.maybe_complete(tx, id, now)?;
        Ok(things)
    }

    /// A staged rollout's next step: as many waiting things as the current minute still
    /// allows get their executions (a thing deleted meanwhile is skipped). Returns them.
    fn roll_out(&mut self, tx: &mut Tx, job: &str, now: f64) -> Result<Vec<String>> {
        let Some(mut j) = self.jobs.get(job).cloned() else {
            return Ok(Vec::new());
        };
        let Some(mut r) = j.rollout.clone() else {
            return Ok(Vec::new());
        };
        let config = rollout_config(&j.configs).ok().flatten();
        if j.status != JobStatus::InProgress {
            self.wait_clear(tx, job);
        }
        if now - r.window >= 60.0 {
            r.window = now;
            r.in_window = 0;
        }
        // exponentialRate: the rate grows each time its criteria are met.
        if let Some(c) = config
            && c.factor > 1.0
        {
            let succeeded = self
                .executions_of(job)
                .filter(|e| e.status == ExecStatus::Succeeded)
                .count() as u64;
            let met = c.notified.is_some_and(|n| r.notified - r.mark.0 >= n)
                || c.succeeded
                    .is_some_and(|n| succeeded.saturating_sub(r.mark.1) >= n);
            if met {
                let top = c.maximum.unwrap_or(MAX_ROLLOUT_RATE);
                r.rate = ((r.rate as f64 * c.factor).ceil() as u64).clamp(1, top);
                r.mark = (r.notified, succeeded);
            }
        }
        let mut released = Vec::new();
        while r.in_window < r.rate {
            let Some(thing) = self.wait_pop(tx, job) else {
                break;
            };
            if !self.things.contains_key(thing.as_str())
                || self
                    .executions
                    .contains_key(&(thing.clone(), job.to_owned()))
            {
                continue;
            }
            self.save_execution(tx, new_execution(&j, &thing, now))?;
            r.in_window += 1;
            r.notified += 1;
            released.push(thing);
        }
        // The document (counters only) is written when they changed.
        if j.rollout.as_ref() != Some(&r) {
            j.rollout = Some(r);
            tx.put(Kind::Job, job, &j)?;
            self.jobs.insert(job.to_owned(), j);
        }
        self.maybe_complete(tx, job, now)?;
        Ok(released)
    }

    /// A thing leaves every rollout it waits in (deleted: a thing re-created under its name is
    /// not the one the jobs targeted).
    pub(crate) fn leave_rollouts(&mut self, tx: &mut Tx, thing: &str, now: f64) -> Result<()> {
        let ids: Vec<String> = self
            .waiting_by_thing
            .get(thing)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for id in ids {
            self.wait_retain(tx, &id, |t| t != thing);
            self.maybe_complete(tx, &id, now)?;
        }
        Ok(())
    }

    /// After `thing` left a group (or a group of it went): the staged rollouts it waits in
    /// whose targets no longer reach it let it go.
    pub(crate) fn prune_rollouts(&mut self, tx: &mut Tx, thing: &str, now: f64) -> Result<()> {
        let ids: Vec<String> = self
            .waiting_by_thing
            .get(thing)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let thing_arn = format!("{}thing/{thing}", self.arn_prefix);
        let reach: BTreeSet<String> = self
            .thing_memberships
            .get(thing)
            .into_iter()
            .flatten()
            .flat_map(|g| self.group_lineage(g))
            .filter_map(|g| self.group_arns.get(g).cloned())
            .chain(std::iter::once(thing_arn))
            .collect();
        for id in ids {
            let reached = self
                .jobs
                .get(&id)
                .is_some_and(|j| j.targets.iter().any(|t| reach.contains(t)));
            if !reached {
                self.wait_retain(tx, &id, |t| t != thing);
                self.maybe_complete(tx, &id, now)?;
            }
        }
        Ok(())
    }

    /// A thing joins the end of a job's rollout queue (a row of its own). The job's next
    /// order changes in memory only: the caller writes the document once.
    fn wait_push(&mut self, tx: &mut Tx, job: &str, thing: &str) -> Result<()> {
        let Some(r) = self.jobs.get_mut(job).and_then(|j| j.rollout.as_mut()) else {
            return Ok(());
        };
        if self
            .waiting_by_thing
            .get(thing)
            .is_some_and(|jobs| jobs.contains(job))
        {
            return Ok(());
        }
        let order = r.next_order;
        r.next_order += 1;
        tx.put(Kind::JobWaiting, &waiting_key(job, order), &thing)?;
        self.job_waiting
            .entry(job.to_owned())
            .or_default()
            .push_back((order, thing.to_owned()));
        self.waiting_by_thing
            .entry(thing.to_owned())
            .or_default()
            .insert(job.to_owned());
        Ok(())
    }

    fn unindex_waiting(&mut self, job: &str, thing: &str) {
        if let Some(jobs) = self.waiting_by_thing.get_mut(thing) {
            jobs.remove(job);
            if jobs.is_empty() {
                self.waiting_by_thing.remove(thing);
            }
        }
    }

    /// The first thing of a job's rollout queue, taken out.
    fn wait_pop(&mut self, tx: &mut Tx, job: &str) -> Option<String> {
        let w = self.job_waiting.get_mut(job)?;
        let (order, thing) = w.pop_front()?;
        if w.is_empty() {
            self.job_waiting.remove(job);
        }
        tx.delete(Kind::JobWaiting, &waiting_key(job, order));
        self.unindex_waiting(job, &thing);
        Some(thing)
    }

    /// Keeps the things of a job's rollout queue for which `keep` says so.
    fn wait_retain(&mut self, tx: &mut Tx, job: &str, keep: impl Fn(&str) -> bool) {
        let Some(w) = self.job_waiting.get_mut(job) else {
            return;
        };
        let mut gone = Vec::new();
        w.retain(|(order, t)| {
            let k = keep(t);
            if !k {
                tx.delete(Kind::JobWaiting, &waiting_key(job, *order));
                gone.push(t.clone());
            }
            k
        });
        if w.is_empty() {
            self.job_waiting.remove(job);
        }
        for t in gone {
            self.unindex_waiting(job, &t);
        }
    }

    /// Empties a job's rollout queue (canceled, deleted, ended).
    pub(crate) fn wait_clear(&mut self, tx: &mut Tx, job: &str) {
        self.wait_retain(tx, job, |_| false);
    }
}

/// The key of a thing waiting in a job's rollout: `{job}\n{order, 16 hex digits}`, so that
/// the rows load in queue order.
fn waiting_key(job: &str, order: u64) -> String {
    format!("{job}\n{order:016x}")
}

/// A job's order in its queue from a waiting row's key.
pub(crate) fn parse_waiting_key(key: &str) -> Option<(&str, u64)> {
    let (job, order) = key.split_once('\n')?;
    Some((job, u64::from_str_radix(order, 16).ok()?))
}

fn new_rollout(c: Rollout, now: f64) -> RolloutState {
    RolloutState {
        next_order: 0,
        rate: c.base,
        window: now,
        in_window: 0,
        notified: 0,
        mark: (0, 0),
    }
}

impl Registry {
    /// CreateJobTemplate.
    pub fn create_job_template(&self, account: &str, t: JobTemplate) -> Result<JobTemplate> {
        let id = t.id.clone();
        check_name("jobTemplateId", &id, 64, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
        })?;
        if t.document.len() > MAX_DOCUMENT {
            return Err(RegistryError::InvalidRequest(format!(
                "The job document can be at most {MAX_DOCUMENT} bytes"
            )));
        }
        if serde_json::from_str::<serde_json::Map<String, Value>>(&t.document).is_err() {
            return Err(RegistryError::InvalidRequest(
                "The job document must be a JSON object".into(),
            ));
        }
        if t.in_progress_timeout_minutes
            .is_some_and(|m| !(1..=10_080).contains(&m))
        {
            return Err(RegistryError::InvalidRequest(
                "inProgressTimeoutInMinutes must be between 1 and 10080".into(),
            ));
        }
        rollout_config(&t.configs)?;
        retry_config(&t.configs)?;
        self.write(account, |a, tx| {
            if a.job_templates.contains_key(&id) {
                return Err(RegistryError::Conflict(format!(
                    "Job template {id} already exists"
                )));
            }
            if a.job_templates.len() >= MAX_JOB_TEMPLATES {
                return Err(RegistryError::LimitExceeded(format!(
                    "An account can have at most {MAX_JOB_TEMPLATES} job templates"
                )));
            }
            tx.put(Kind::JobTemplate, &id, &t)?;
            a.job_templates.insert(id.clone(), t.clone());
            Ok(t.clone())
        })
    }

    /// DescribeJobTemplate.
    pub fn job_template(&self, account: &str, id: &str) -> Result<JobTemplate> {
        self.read(account, |a| {
            a.job_templates
                .get(id)
                .cloned()
                .ok_or_else(|| RegistryError::NotFound(format!("Job template {id} does not exist")))
        })
    }

    /// ListJobTemplates, in id order.
    pub fn list_job_templates(
        &self,
        account: &str,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<JobTemplate>> {
        self.read(account, |a| {
            let items = a
                .job_templates
                .values()
                .map(|t| (t.id.clone(), t.clone()))
                .collect();
            paginate(items, token, max)
        })
    }

    /// DeleteJobTemplate (jobs made from it keep what they took).
    pub fn delete_job_template(&self, account: &str, id: &str) -> Result<()> {
        self.write(account, |a, tx| {
            if a.job_templates.remove(id).is_none() {
                return Err(RegistryError::NotFound(format!(
                    "Job template {id} does not exist"
                )));
            }
            tx.delete(Kind::JobTemplate, id);
            Ok(())
        })
    }

    /// Scheduled jobs whose time has come, when the caller's timer says: a SCHEDULED job past
    /// its start starts (its targets resolved now); an IN_PROGRESS job past its end does what
    /// its `endBehavior` says (STOP_ROLLOUT: no more things join it, those waiting are dropped;
    /// CANCEL; FORCE_CANCEL). Returns how many jobs changed.
    pub fn run_job_schedules(&self, now: f64) -> usize {
        let due: Vec<(String, String)> = {
            let st = self.state.read().unwrap_or_else(|p| p.into_inner());
            st.accounts
                .iter()
                .flat_map(|(id, a)| {
                    a.jobs
                        .values()
                        .filter(|j| {
                            j.schedule.as_ref().is_some_and(|s| match j.status {
                                JobStatus::Scheduled => s.start.is_some_and(|t| t <= now),
                                JobStatus::InProgress => {
                                    !s.ended && s.end.is_some_and(|t| t <= now)
                                }
                                _ => false,
                            })
                        })
                        .map(|j| (id.to_string(), j.id.clone()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let mut n = 0;
        for (account, id) in due {
            let thing_prefix = self.arn(&account, "thing/");
            let group_prefix = self.arn(&account, "thinggroup/");
            let step = self.write(&account, |a, tx| {
                // Looked at again under the write lock: the job may have changed since.
                let Some(j) = a.jobs.get(&id).cloned() else {
                    return Ok(None);
                };
                let Some(s) = j.schedule.clone() else {
                    return Ok(None);
                };
                let ends = s.end.is_some_and(|t| t <= now);
                let mut changed = Vec::new();
                match j.status {
                    JobStatus::Scheduled if s.start.is_some_and(|t| t <= now) => {
                        // A start found past the end (the server was down) reaches no one.
                        let mut things = BTreeSet::new();
                        if !ends {
                            for t in &j.targets {
                                things.extend(a.things_of_target(t, &thing_prefix, &group_prefix));
                            }
                        }
                        let staged = rollout_config(&j.configs).ok().flatten();
                        changed.extend(a.launch(tx, &id, things, staged, now)?);
                        if ends {
                            changed.extend(a.end_schedule(tx, &id, now)?);
                        }
                    }
                    JobStatus::InProgress if !s.ended && ends => {
                        changed.extend(a.end_schedule(tx, &id, now)?);
                    }
                    _ => return Ok(None),
                }
                Ok(Some(changed))
            });
            match step {
                Ok(Some(changed)) => {
                    n += 1;
                    self.jobs_changed(&account, changed);
                }
                Ok(None) => {}
                Err(e) => tracing::error!(%account, job = %id, error = %e, "job schedule failed"),
            }
        }
        n
    }

    /// Staged rollouts' next steps, when the caller's timer says: returns how many executions
    /// were created.
    pub fn roll_out_jobs(&self, now: f64) -> usize {
        let due: Vec<(String, String)> = {
            let st = self.state.read().unwrap_or_else(|p| p.into_inner());
            st.accounts
                .iter()
                .flat_map(|(id, a)| {
                    a.jobs
                        .values()
                        .filter(|j| a.job_waiting.get(&j.id).is_some_and(|w| !w.is_empty()))
                        .map(|j| (id.to_string(), j.id.clone()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let mut n = 0;
        for (account, job) in due {
            match self.write(&account, |a, tx| a.roll_out(tx, &job, now)) {
                Ok(things) => {
                    n += things.len();
                    self.jobs_changed(&account, things);
                }
                Err(e) => tracing::error!(%account, %job, error = %e, "job rollout failed"),
            }
        }
        n
    }

    /// The ARN of a job.
    pub fn job_arn(&self, account: &str, id: &str) -> String {
        self.arn(account, &format!("job/{id}"))
    }

    /// CreateJob: the job and a QUEUED execution for every thing its targets name now.
    pub fn create_job(&self, account: &str, id: &str, spec: NewJob, now: f64) -> Result<Job> {
        check_name("jobId", id, 64, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
        })?;
        if spec.targets.is_empty() || spec.targets.len() > MAX_TARGETS {
            return Err(RegistryError::InvalidRequest(format!(
                "targets must name 1 to {MAX_TARGETS} things or thing groups"
            )));
        }
        if spec.document.len() > MAX_DOCUMENT {
            return Err(RegistryError::InvalidRequest(format!(
                "The job document can be at most {MAX_DOCUMENT} bytes"
            )));
        }
        if serde_json::from_str::<serde_json::Map<String, Value>>(&spec.document).is_err() {
            return Err(RegistryError::InvalidRequest(
                "The job document must be a JSON object".into(),
            ));
        }
        if spec
            .in_progress_timeout_minutes
            .is_some_and(|m| !(1..=10_080).contains(&m))
        {
            return Err(RegistryError::InvalidRequest(
                "inProgressTimeoutInMinutes must be between 1 and 10080".into(),
            ));
        }
        let staged = rollout_config(&spec.configs)?;
        retry_config(&spec.configs)?;
        let schedule = schedule_config(&spec.configs, now)?;
        let thing_prefix = self.arn(account, "thing/");
        let group_prefix = self.arn(account, "thinggroup/");
        let out = self.write(account, |a, tx| {
            if a.jobs.len() >= MAX_JOBS && !a.jobs.contains_key(id) {
                return Err(RegistryError::LimitExceeded(format!(
                    "An account can have at most {MAX_JOBS} jobs; delete some first"
                )));
            }
            if a.jobs.contains_key(id) {
                return Err(RegistryError::AlreadyExists {
                    message: format!("Job {id} already exists"),
                    resource_id: id.to_owned(),
                    resource_arn: self.job_arn(account, id),
                });
            }
            let mut things = BTreeSet::new();
            for t in &spec.targets {
                if let Some(name) = t.strip_prefix(&thing_prefix) {
                    if !a.things.contains_key(name) {
                        return Err(RegistryError::NotFound(format!(
                            "Thing {name} cannot be found."
                        )));
                    }
                } else if let Some(g) = t.strip_prefix(&group_prefix) {
                    if !a.thing_groups.contains_key(g) {
                        return Err(RegistryError::NotFound(format!(
                            "Thing Group {g} does not exist"
                        )));
                    }
                } else {
                    return Err(RegistryError::InvalidRequest(format!(
                        "Target {t} is not a thing or thing group of this account"
                    )));
                }
                things.extend(a.things_of_target(t, &thing_prefix, &group_prefix));
            }
            a.job_seq += 1;
            let job = Job {
                id: id.to_owned(),
                seq: a.job_seq,
                description: spec.description.clone(),
                document: spec.document.clone(),
                document_source: spec.document_source.clone(),
                targets: spec.targets.clone(),
                continuous: spec.continuous,
                status: if schedule.as_ref().is_some_and(|s| s.start.is_some()) {
                    JobStatus::Scheduled
                } else {
                    JobStatus::InProgress
                },
                force_canceled: false,
                reason_code: None,
                comment: None,
                presigned: spec.presigned.clone(),
                in_progress_timeout_minutes: spec.in_progress_timeout_minutes,
                configs: spec.configs.clone(),
                created_at: now,
                last_updated_at: now,
                completed_at: None,
                template_arn: spec.template_arn.clone(),
                schedule: schedule.clone(),
                rollout: None,
            };
            tx.put(Kind::Job, id, &job)?;
            tx.put(Kind::JobSeq, "", &a.job_seq)?;
            a.jobs.insert(id.to_owned(), job.clone());
            let things = if job.status == JobStatus::Scheduled {
                BTreeSet::new()
            } else {
                a.launch(tx, id, things, staged, now)?
            };
            let job = a.jobs.get(id).cloned().unwrap_or(job);
            Ok((job, things))
        })?;
        self.jobs_changed(account, out.1);
        Ok(out.0)
    }

    /// Tells the change feed whose executions changed.
    fn jobs_changed(&self, account: &str, things: impl IntoIterator<Item = String>) {
        let things: Vec<String> = things.into_iter().collect();
        if !things.is_empty() {
            let _ = self.feed.send(Change::JobExecutions {
                account: account.to_owned(),
                things,
            });
        }
    }

    /// A job and the counts of its executions by status.
    pub fn describe_job(&self, account: &str, id: &str) -> Result<(Job, JobCounts)> {
        self.read(account, |a| {
            let j = a.jobs.get(id).cloned().ok_or_else(|| job_not_found(id))?;
            Ok((j, a.job_counts(id)))
        })
    }

    /// ListJobs, newest first.
    pub fn list_jobs(
        &self,
        account: &str,
        status: Option<&str>,
        continuous: Option<bool>,
        group_arn: Option<&str>,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<Job>> {
        self.read(account, |a| {
            let mut jobs: Vec<&Job> = a
                .jobs
                .values()
                .filter(|j| status.is_none_or(|s| j.status.as_str() == s))
                .filter(|j| continuous.is_none_or(|c| j.continuous == c))
                .filter(|j| group_arn.is_none_or(|g| j.targets.iter().any(|t| t == g)))
                .collect();
            jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
            paginate(
                jobs.into_iter()
                    .map(|j| (j.id.clone(), j.clone()))
                    .collect(),
                marker,
                size,
            )
        })
    }

    /// UpdateJob: description, presigned URL settings, timeout and kept configurations.
    pub fn update_job(&self, account: &str, id: &str, u: JobUpdate, now: f64) -> Result<()> {
        if u.in_progress_timeout_minutes
            .is_some_and(|m| !(1..=10_080).contains(&m))
        {
            return Err(RegistryError::InvalidRequest(
                "inProgressTimeoutInMinutes must be between 1 and 10080".into(),
            ));
        }
        let staged = rollout_config(&u.configs)?;
        retry_config(&u.configs)?;
        self.write(account, |a, tx| {
            let mut j = a.jobs.get(id).cloned().ok_or_else(|| job_not_found(id))?;
            // A new rollout rate applies to the things still waiting (a job that was not
            // staged stays as it is: its executions all exist).
            match (staged, &mut j.rollout) {
                (Some(c), Some(r)) => {
                    r.rate = c.base;
                    r.mark = (r.notified, r.mark.1);
                }
                // Staged from now on: things that join later wait their turn.
                (Some(c), None) if j.status == JobStatus::InProgress => {
                    j.rollout = Some(new_rollout(c, now));
                }
                _ => {}
            }
            if u.description.is_some() {
                j.description = u.description.clone();
            }
            if u.presigned.is_some() {
                j.presigned = u.presigned.clone();
            }
            if u.in_progress_timeout_minutes.is_some() {
                j.in_progress_timeout_minutes = u.in_progress_timeout_minutes;
            }
            j.configs.extend(u.configs.clone());
            j.last_updated_at = now;
            tx.put(Kind::Job, id, &j)?;
            a.jobs.insert(id.to_owned(), j);
            Ok(())
        })
    }

    /// CancelJob: QUEUED executions are canceled, and with `force` IN_PROGRESS ones too.
    pub fn cancel_job(
        &self,
        account: &str,
        id: &str,
        force: bool,
        reason_code: Option<String>,
        comment: Option<String>,
        now: f64,
    ) -> Result<Job> {
        let (job, things) = self.write(account, |a, tx| {
            a.cancel(tx, id, force, reason_code.clone(), comment.clone(), now)
        })?;
        self.jobs_changed(account, things);
        Ok(job)
    }

    /// DeleteJob: a job that ended (COMPLETED or CANCELED), or any with `force`; its
    /// executions go with it. A job with IN_PROGRESS executions needs `force`.
    pub fn delete_job(&self, account: &str, id: &str, force: bool) -> Result<()> {
        let things = self.write(account, |a, tx| {
            let j = a.jobs.get(id).ok_or_else(|| job_not_found(id))?;
            let running = a
                .executions_of(id)
                .any(|e| e.status == ExecStatus::InProgress);
            if !force && (j.status == JobStatus::InProgress || running) {
                return Err(RegistryError::InvalidStateTransition(format!(
                    "Job {id} is in progress; delete it with force, or cancel it first"
                )));
            }
            let things: Vec<String> = a
                .job_things
                .get(id)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            for thing in &things {
                tx.delete(Kind::JobExecution, &exec_key(id, thing));
                a.remove_execution(thing, id);
            }
            a.wait_clear(tx, id);
            tx.delete(Kind::Job, id);
            if let Some(j) = a.jobs.remove(id) {
                crate::events::job(tx, a, &j, "DELETED");
            }
            Ok(things)
        })?;
        self.jobs_changed(account, things);
        Ok(())
    }

    /// One execution (`execution_number`, if given, must be its number).
    pub fn job_execution(
        &self,
        account: &str,
        job: &str,
        thing: &str,
        execution_number: Option<u64>,
    ) -> Result<(Execution, Job)> {
        self.read(account, |a| {
            let e = a
                .executions
                .get(&(thing.to_owned(), job.to_owned()))
                .filter(|e| execution_number.is_none_or(|n| n == e.execution_number))
                .cloned()
                .ok_or_else(|| execution_not_found(job, thing))?;
            let j = a.jobs.get(job).cloned().ok_or_else(|| job_not_found(job))?;
            Ok((e, j))
        })
    }

    /// ListJobExecutionsForJob.
    pub fn executions_of_job(
        &self,
        account: &str,
        job: &str,
        status: Option<&str>,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<Execution>> {
        self.read(account, |a| {
            if !a.jobs.contains_key(job) {
                return Err(job_not_found(job));
            }
            let key = |t: &String| (t.clone(), job.to_owned());
            let kept = from_marker(a.job_things.get(job), marker)
                .filter_map(|t| a.executions.get(&key(t)))
                .filter(|e| status.is_none_or(|s| e.status.as_str() == s))
                .map(|e| (e.thing.as_str(), e));
            Ok(page_sorted(kept, marker, size, Execution::clone))
        })
    }

    /// ListJobExecutionsForThing, in job creation order.
    pub fn executions_of_thing(
        &self,
        account: &str,
        thing: &str,
        status: Option<&str>,
        job: Option<&str>,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<Execution>> {
        self.read(account, |a| {
            if !a.things.contains_key(thing) {
                return Err(RegistryError::NotFound(format!(
                    "Thing {thing} cannot be found."
                )));
            }
            let mut v: Vec<&Execution> = a
                .executions
                .range((thing.to_owned(), String::new())..)
                .take_while(|((t, _), _)| t == thing)
                .map(|(_, e)| e)
                .filter(|e| status.is_none_or(|s| e.status.as_str() == s))
                .filter(|e| job.is_none_or(|j| e.job_id == j))
                .collect();
            v.sort_by_key(|e| e.job_seq);
            paginate(
                v.into_iter()
                    .map(|e| (e.job_id.clone(), e.clone()))
                    .collect(),
                marker,
                size,
            )
        })
    }

    /// CancelJobExecution: a QUEUED execution, or an IN_PROGRESS one with `force`.
    pub fn cancel_job_execution(
        &self,
        account: &str,
        job: &str,
        thing: &str,
        c: CancelExecution,
        now: f64,
    ) -> Result<()> {
        let CancelExecution {
            force,
            expected_version,
            status_details,
        } = c;
        if let Some(d) = &status_details {
            check_status_details(d)?;
        }
        self.write(account, |a, tx| {
            let mut e = a
                .executions
                .get(&(thing.to_owned(), job.to_owned()))
                .cloned()
                .ok_or_else(|| execution_not_found(job, thing))?;
            if let Some(v) = expected_version
                && v != e.version
            {
                return Err(RegistryError::VersionConflict(format!(
                    "The expected version {v} does not match the execution's version {}",
                    e.version
                )));
            }
            match e.status {
                ExecStatus::Queued => {}
                ExecStatus::InProgress if force => e.force_canceled = true,
                ExecStatus::InProgress => {
                    return Err(RegistryError::InvalidStateTransition(format!(
                        "Job execution of job {job} on thing {thing} is IN_PROGRESS; cancel it with force"
                    )));
                }
                s => {
                    return Err(RegistryError::InvalidStateTransition(format!(
                        "Job execution of job {job} on thing {thing} has ended ({})",
                        s.as_str()
                    )));
                }
            }
            e.status = ExecStatus::Canceled;
            if let Some(d) = status_details.clone() {
                e.status_details = d;
            }
            e.version += 1;
            e.last_updated_at = now;
            e.deadline = None;
            let thing_arn = self.arn(account, &format!("thing/{thing}"));
            crate::events::execution(tx, a, &thing_arn, &e);
            a.save_execution(tx, e)?;
            a.maybe_complete(tx, job, now)
        })?;
        self.jobs_changed(account, [thing.to_owned()]);
        Ok(())
    }

    /// DeleteJobExecution: an ended execution, or any with `force`.
    pub fn delete_job_execution(
        &self,
        account: &str,
        job: &str,
        thing: &str,
        execution_number: u64,
        force: bool,
        now: f64,
    ) -> Result<()> {
        self.write(account, |a, tx| {
            let key = (thing.to_owned(), job.to_owned());
            let e = a
                .executions
                .get(&key)
                .filter(|e| e.execution_number == execution_number)
                .ok_or_else(|| execution_not_found(job, thing))?;
            if !force && !e.status.is_terminal() {
                return Err(RegistryError::InvalidStateTransition(format!(
                    "Job execution of job {job} on thing {thing} has not ended; delete it with force"
                )));
            }
            tx.delete(Kind::JobExecution, &exec_key(job, thing));
            a.remove_execution(thing, job);
            a.maybe_complete(tx, job, now)
        })?;
        self.jobs_changed(account, [thing.to_owned()]);
        Ok(())
    }

    /// Every (account, thing) with a pending execution: what to look at again after the
    /// change feed was missed.
    pub fn things_with_pending_jobs(&self) -> BTreeSet<(String, String)> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        st.accounts
            .iter()
            .flat_map(|(id, a)| {
                a.executions
                    .values()
                    .filter(|e| !e.status.is_terminal())
                    .map(move |e| (id.to_string(), e.thing.clone()))
            })
            .collect()
    }

    /// A thing's pending executions (IN_PROGRESS, then QUEUED), with their jobs.
    pub fn pending_job_executions(
        &self,
        account: &str,
        thing: &str,
    ) -> Result<Vec<(Execution, Job)>> {
        self.read(account, |a| {
            Ok(a.pending_executions(thing)
                .into_iter()
                .filter_map(|e| Some((e.clone(), a.jobs.get(&e.job_id)?.clone())))
                .collect())
        })
    }

    /// StartNextPendingJobExecution: the next pending execution, moved to IN_PROGRESS with
    /// the given details and step timeout if it was QUEUED (an IN_PROGRESS one is returned
    /// as it is); `None` when nothing is pending.
    pub fn start_next_job_execution(
        &self,
        account: &str,
        thing: &str,
        status_details: Option<BTreeMap<String, String>>,
        step_timeout_minutes: Option<u64>,
        now: f64,
    ) -> Result<Option<(Execution, Job)>> {
        if let Some(d) = &status_details {
            check_status_details(d)?;
        }
        check_step_timeout(step_timeout_minutes)?;
        let out = self.write(account, |a, tx| {
            let Some(next) = a.pending_executions(thing).first().map(|e| (*e).clone()) else {
                return Ok(None);
            };
            let job = a
                .jobs
                .get(&next.job_id)
                .cloned()
                .ok_or_else(|| job_not_found(&next.job_id))?;
            if next.status == ExecStatus::InProgress {
                return Ok(Some((next, job)));
            }
            let mut e = next;
            start(&mut e, &job, step_timeout_minutes, now);
            if let Some(d) = status_details.clone() {
                e.status_details = d;
            }
            a.save_execution(tx, e.clone())?;
            Ok(Some((e, job)))
        })?;
        if out.is_some() {
            self.jobs_changed(account, [thing.to_owned()]);
        }
        Ok(out)
    }

    /// UpdateJobExecution by the device. On a version or state refusal the error says why;
    /// the caller reads the execution again to report its state.
    pub fn update_job_execution(
        &self,
        account: &str,
        job: &str,
        thing: &str,
        u: ExecutionUpdate,
        now: f64,
    ) -> Result<(Execution, Job)> {
        let status = match u.status.as_str() {
            "IN_PROGRESS" => ExecStatus::InProgress,
            "SUCCEEDED" => ExecStatus::Succeeded,
            "FAILED" => ExecStatus::Failed,
            "REJECTED" => ExecStatus::Rejected,
            other => {
                return Err(RegistryError::InvalidRequest(format!(
                    "status {other:?} is not one a device may set (IN_PROGRESS, SUCCEEDED, FAILED, REJECTED)"
                )));
            }
        };
        if let Some(d) = &u.status_details {
            check_status_details(d)?;
        }
        check_step_timeout(u.step_timeout_minutes)?;
        let out = self.write(account, |a, tx| {
            let mut e = a
                .executions
                .get(&(thing.to_owned(), job.to_owned()))
                .filter(|e| u.execution_number.is_none_or(|n| n == e.execution_number))
                .cloned()
                .ok_or_else(|| execution_not_found(job, thing))?;
            let j = a.jobs.get(job).cloned().ok_or_else(|| job_not_found(job))?;
            if let Some(v) = u.expected_version
                && v != e.version
            {
                return Err(RegistryError::VersionConflict(format!(
                    "The expected version {v} does not match the execution's version {}",
                    e.version
                )));
            }
            if e.status.is_terminal() {
                return Err(RegistryError::InvalidStateTransition(format!(
                    "Job execution of job {job} on thing {thing} has ended ({}) and cannot become {}",
                    e.status.as_str(),
                    status.as_str()
                )));
            }
            if status == ExecStatus::InProgress {
                if e.status == ExecStatus::Queued {
                    start(&mut e, &j, u.step_timeout_minutes, now);
                } else {
                    e.version += 1;
                    e.deadline = deadline(&e, &j, u.step_timeout_minutes, now);
                }
            } else {
                e.status = status;
                e.version += 1;
                e.deadline = None;
            }
            if let Some(d) = u.status_details.clone() {
                e.status_details = d;
            }
            e.last_updated_at = now;
            if e.status.is_terminal() {
                let thing_arn = self.arn(account, &format!("thing/{thing}"));
                crate::events::execution(tx, a, &thing_arn, &e);
            }
            a.save_execution(tx, e.clone())?;
            a.maybe_retry(tx, &j, &e, now)?;
            a.maybe_complete(tx, job, now)?;
            Ok((e, j))
        })?;
        self.jobs_changed(account, [thing.to_owned()]);
        Ok(out)
    }

    /// Ends with TIMED_OUT every IN_PROGRESS execution whose deadline has passed; returns how
    /// many.
    pub fn expire_job_executions(&self, now: f64) -> usize {
        let due: Vec<(String, String, String)> = {
            let st = self.state.read().unwrap_or_else(|p| p.into_inner());
            st.accounts
                .iter()
                .flat_map(|(id, a)| {
                    a.executions
                        .values()
                        .filter(|e| e.status == ExecStatus::InProgress)
                        .filter(|e| e.deadline.is_some_and(|d| d <= now))
                        .map(|e| (id.to_string(), e.job_id.clone(), e.thing.clone()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let mut n = 0;
        for (account, job, thing) in due {
            let done = self.write(&account, |a, tx| {
                let Some(mut e) = a
                    .executions
                    .get(&(thing.clone(), job.clone()))
                    .cloned()
                    .filter(|e| e.status == ExecStatus::InProgress)
                    .filter(|e| e.deadline.is_some_and(|d| d <= now))
                else {
                    return Ok(false);
                };
                e.status = ExecStatus::TimedOut;
                e.version += 1;
                e.deadline = None;
                e.last_updated_at = now;
                let thing_arn = self.arn(&account, &format!("thing/{thing}"));
                crate::events::execution(tx, a, &thing_arn, &e);
                a.save_execution(tx, e.clone())?;
                if let Some(j) = a.jobs.get(&job).cloned() {
                    a.maybe_retry(tx, &j, &e, now)?;
                }
                a.maybe_complete(tx, &job, now)?;
                Ok(true)
            });
            if let Ok(true) = done {
                n += 1;
                self.jobs_changed(&account, [thing]);
            }
        }
        n
    }

    /// A thing joined `group`: every CONTINUOUS job in progress that targets the group or
    /// one of its ancestors gives it an execution, if it has none.
    pub(crate) fn continuous_jobs_for(
        &self,
        a: &mut Account,
        tx: &mut Tx,
        account: &str,
        group: &str,
        thing: &str,
        now: f64,
    ) -> Result<BTreeSet<String>> {
        let lineage: Vec<String> = a
            .group_lineage(group)
            .into_iter()
            .map(|g| self.group_arn(account, g))
            .collect();
        let jobs: Vec<Job> = a
            .jobs
            .values()
            .filter(|j| j.continuous && j.status == JobStatus::InProgress)
            // Past a STOP_ROLLOUT end, no more things join.
            .filter(|j| !j.schedule.as_ref().is_some_and(|s| s.ended))
            .filter(|j| j.targets.iter().any(|t| lineage.contains(t)))
            .filter(|j| !a.executions.contains_key(&(thing.to_owned(), j.id.clone())))
            .cloned()
            .collect();
        let mut given = BTreeSet::new();
        for j in &jobs {
            if j.rollout.is_some() {
                // Staged: it waits its turn (and whoever's turn it is now gets an execution).
                a.wait_push(tx, &j.id, thing)?;
                if let Some(doc) = a.jobs.get(&j.id) {
                    tx.put(Kind::Job, &j.id, doc)?;
                }
                given.extend(a.roll_out(tx, &j.id, now)?);
            } else {
                a.save_execution(tx, new_execution(j, thing, now))?;
                given.insert(thing.to_owned());
            }
        }
        Ok(given)
    }

    /// Publishes a change of a thing's executions on the feed (after a write that queued
    /// some outside this module).
    pub(crate) fn executions_changed(&self, account: &str, thing: &str) {
        self.jobs_changed(account, [thing.to_owned()]);
    }
}

/// `(bucket, key)` of an S3 URL as AWS's job documents name them: path style
/// (`https://s3[.region].amazonaws.com/bucket/key`) or virtual-hosted style
/// (`https://bucket.s3[.region].amazonaws.com/key`).
pub fn s3_location(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("https://")?;
    let (host, path) = rest.split_once('/')?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    let (bucket, key) = if host == "s3.amazonaws.com"
        || (host.starts_with("s3.") && host.ends_with(".amazonaws.com"))
    {
        let (b, k) = path.split_once('/')?;
        (b.to_owned(), k)
    } else {
        let (b, tail) = host.split_once(".s3")?;
        if !tail.ends_with(".amazonaws.com") {
            return None;
        }
        (b.to_owned(), path)
    };
    let key = decode(key.split('?').next().unwrap_or(key))?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

fn new_execution(job: &Job, thing: &str, now: f64) -> Execution {
    Execution {
        job_id: job.id.clone(),
        thing: thing.to_owned(),
        job_seq: job.seq,
        status: ExecStatus::Queued,
        status_details: BTreeMap::new(),
        queued_at: now,
        started_at: None,
        last_updated_at: now,
        version: 1,
        execution_number: 1,
        force_canceled: false,
        deadline: None,
        retries: (0, 0),
    }
}

/// `jobExecutionsRetryConfig`, checked: the retries allowed after FAILED, after TIMED_OUT, and
/// after either (ALL), each 0 to 10.
fn retry_config(
    configs: &BTreeMap<String, Value>,
) -> Result<(Option<u64>, Option<u64>, Option<u64>)> {
    let mut out = (None, None, None);
    let Some(c) = configs.get("jobExecutionsRetryConfig") else {
        return Ok(out);
    };
    let bad = |m: &str| RegistryError::InvalidRequest(format!("jobExecutionsRetryConfig: {m}"));
    let list = c
        .get("criteriaList")
        .and_then(Value::as_array)
        .filter(|l| (1..=2).contains(&l.len()))
        .ok_or_else(|| bad("criteriaList must list 1 or 2 criteria"))?;
    for k in list {
        let n = k
            .get("numberOfRetries")
            .and_then(Value::as_u64)
            .filter(|n| *n <= 10)
            .ok_or_else(|| bad("numberOfRetries must be an integer from 0 to 10"))?;
        let slot = match k.get("failureType").and_then(Value::as_str) {
            Some("FAILED") => &mut out.0,
            Some("TIMED_OUT") => &mut out.1,
            Some("ALL") => &mut out.2,
            _ => return Err(bad("failureType must be FAILED, TIMED_OUT or ALL")),
        };
        if slot.replace(n).is_some() {
            return Err(bad("a failureType may appear once"));
        }
    }
    Ok(out)
}

impl Account {
    /// After an execution ended FAILED or TIMED_OUT: if the job's retry settings allow another
    /// attempt, a new QUEUED execution (the next execution number, attempt counted) takes its
    /// place and the thing is notified again, as AWS retries. The ended one stays in `e` for
    /// the caller's answer and events.
    fn maybe_retry(&mut self, tx: &mut Tx, job: &Job, e: &Execution, now: f64) -> Result<bool> {
        if job.status != JobStatus::InProgress {
            return Ok(false);
        }
        let (failed, timed_out, all) = retry_config(&job.configs).unwrap_or_default();
        let (own, done) = match e.status {
            ExecStatus::Failed => (failed, e.retries.0),
            ExecStatus::TimedOut => (timed_out, e.retries.1),
            _ => return Ok(false),
        };
        let allowed = match (own, all) {
            (Some(n), _) => done < n,
            (None, Some(n)) => e.retry_attempt() < n,
            (None, None) => false,
        };
        if !allowed {
            return Ok(false);
        }
        let mut next = new_execution(job, &e.thing, now);
        next.execution_number = e.execution_number + 1;
        next.retries = e.retries;
        if e.status == ExecStatus::Failed {
            next.retries.0 += 1;
        } else {
            next.retries.1 += 1;
        }
        self.save_execution(tx, next)?;
        Ok(true)
    }
}

/// QUEUED → IN_PROGRESS.
fn start(e: &mut Execution, job: &Job, step_timeout_minutes: Option<u64>, now: f64) {
    e.status = ExecStatus::InProgress;
    e.started_at = Some(now);
    e.last_updated_at = now;
    e.version += 1;
    e.deadline = deadline(e, job, step_timeout_minutes, now);
}

/// The earlier of the job's in-progress timeout (from the start) and a step timeout (from
/// now); without a new step timeout, the one already set stays.
fn deadline(e: &Execution, job: &Job, step_timeout_minutes: Option<u64>, now: f64) -> Option<f64> {
    let job_end = job
        .in_progress_timeout_minutes
        .zip(e.started_at)
        .map(|(m, s)| s + m as f64 * 60.0);
    let step_end = match step_timeout_minutes {
        Some(m) => Some(now + m as f64 * 60.0),
        None => e.deadline,
    };
    match (job_end, step_end) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Registry, String) {
        let reg = Registry::in_memory("us-east-1").unwrap();
        let (info, _) = reg.create_account("a").unwrap();
        (reg, info.id)
    }

    fn job(reg: &Registry, acct: &str, id: &str, targets: &[String], now: f64) -> Job {
        reg.create_job(
            acct,
            id,
            NewJob {
                targets: targets.to_vec(),
                document: r#"{"op":"x"}"#.into(),
                ..NewJob::default()
            },
            now,
        )
        .unwrap()
    }

    /// The index by job is exactly what the executions say, after every kind of change.
    #[test]
    fn the_index_by_job_follows_the_executions() {
        let (reg, a) = setup();
        let things: Vec<String> = (0..4)
            .map(|i| {
                let t = format!("t{i}");
                reg.create_thing(&a, &t, None, BTreeMap::new()).unwrap();
                reg.arn(&a, &format!("thing/{t}"))
            })
            .collect();
        let check = |reg: &Registry| {
            reg.read(&a, |acct| {
                let mut derived: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for (t, j) in acct.executions.keys() {
                    derived.entry(j.clone()).or_default().insert(t.clone());
                }
                assert_eq!(acct.job_things, derived);
                Ok(())
            })
            .unwrap();
        };
        job(&reg, &a, "j1", &things, 1.0);
        job(&reg, &a, "j2", &things[..2], 2.0);
        job(&reg, &a, "j3", &things[2..], 3.0);
        check(&reg);
        reg.update_job_execution(&a, "j1", "t0", update("SUCCEEDED"), 4.0)
            .unwrap();
        reg.delete_job_execution(&a, "j1", "t0", 1, false, 5.0)
            .unwrap();
        check(&reg);
        reg.delete_thing(&a, "t1", None).unwrap();
        check(&reg);
        reg.cancel_job(&a, "j2", true, None, None, 6.0).unwrap();
        reg.delete_job(&a, "j2", true).unwrap();
        check(&reg);
        assert_eq!(
            reg.describe_job(&a, "j1")
                .unwrap()
                .1
                .values()
                .sum::<usize>(),
            2
        );
        reg.delete_job(&a, "j3", true).unwrap();
        check(&reg);
    }

    fn staged(
        reg: &Registry,
        a: &str,
        id: &str,
        targets: &[String],
        rollout: Value,
        now: f64,
    ) -> Result<Job> {
        reg.create_job(
            a,
            id,
            NewJob {
                targets: targets.to_vec(),
                document: "{}".into(),
                configs: BTreeMap::from([("jobExecutionsRolloutConfig".to_string(), rollout)]),
                ..NewJob::default()
            },
            now,
        )
    }

    fn things(reg: &Registry, a: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let t = format!("r{i}");
                reg.create_thing(a, &t, None, BTreeMap::new()).unwrap();
                reg.arn(a, &format!("thing/{t}"))
            })
            .collect()
    }

    fn executions(reg: &Registry, a: &str, job: &str) -> usize {
        reg.read(a, |acct| Ok(acct.executions_of(job).count()))
            .unwrap()
    }

    #[test]
    fn a_staged_rollout_notifies_at_most_maximum_per_minute() {
        let (reg, a) = setup();
        let t = things(&reg, &a, 5);
        let j = staged(
            &reg,
            &a,
            "r",
            &t,
            serde_json::json!({"maximumPerMinute": 2}),
            0.0,
        )
        .unwrap();
        assert_eq!(j.status, JobStatus::InProgress);
        assert_eq!(executions(&reg, &a, "r"), 2);
        assert_eq!(reg.roll_out_jobs(59.9), 0, "the same minute");
        assert_eq!(reg.roll_out_jobs(60.0), 2);
        // Every execution so far ends: still IN_PROGRESS, one thing waits.
        for thing in ["r0", "r1", "r2", "r3"] {
            reg.update_job_execution(&a, "r", thing, update("SUCCEEDED"), 61.0)
                .unwrap();
        }
        assert_eq!(
            reg.describe_job(&a, "r").unwrap().0.status,
            JobStatus::InProgress
        );
        assert_eq!(reg.roll_out_jobs(120.0), 1);
        reg.update_job_execution(&a, "r", "r4", update("SUCCEEDED"), 121.0)
            .unwrap();
        assert_eq!(
            reg.describe_job(&a, "r").unwrap().0.status,
            JobStatus::Completed
        );
        assert_eq!(reg.roll_out_jobs(1000.0), 0);
    }

    #[test]
    fn an_exponential_rollout_grows_by_its_criteria_up_to_the_maximum() {
        let (reg, a) = setup();
        let t = things(&reg, &a, 10);
        let cfg = serde_json::json!({"maximumPerMinute": 3, "exponentialRate": {
            "baseRatePerMinute": 1, "incrementFactor": 2.0,
            "rateIncreaseCriteria": {"numberOfNotifiedThings": 1}}});
        staged(&reg, &a, "e", &t, cfg, 0.0).unwrap();
        assert_eq!(executions(&reg, &a, "e"), 1);
        assert_eq!(reg.roll_out_jobs(60.0), 2, "doubled");
        assert_eq!(reg.roll_out_jobs(120.0), 3, "4, held to maximumPerMinute");
        assert_eq!(reg.roll_out_jobs(180.0), 3);
        assert_eq!(reg.roll_out_jobs(240.0), 1);
        // By succeeded things: the rate grows only once one has succeeded.
        let cfg = serde_json::json!({"exponentialRate": {"baseRatePerMinute": 1, "incrementFactor": 2.0,
            "rateIncreaseCriteria": {"numberOfSucceededThings": 1}}});
        staged(&reg, &a, "s", &t, cfg, 1000.0).unwrap();
        assert_eq!(reg.roll_out_jobs(1060.0), 1, "nothing succeeded yet");
        reg.update_job_execution(&a, "s", "r0", update("SUCCEEDED"), 1061.0)
            .unwrap();
        assert_eq!(reg.roll_out_jobs(1120.0), 2);
    }

    #[test]
    fn rollout_settings_are_checked_at_their_bounds() {
        let (reg, a) = setup();
        let t = things(&reg, &a, 1);
        let try_cfg = |id: &str, cfg: Value| staged(&reg, &a, id, &t, cfg, 0.0).map(|_| ());
        let exp = |base: Value, factor: Value, criteria: Value| {
            serde_json::json!({"exponentialRate": {"baseRatePerMinute": base, "incrementFactor": factor,
                "rateIncreaseCriteria": criteria}})
        };
        let n = serde_json::json!({"numberOfNotifiedThings": 1});
        assert!(try_cfg("m1", serde_json::json!({"maximumPerMinute": 1000})).is_ok());
        assert!(try_cfg("m2", serde_json::json!({"maximumPerMinute": 1001})).is_err());
        assert!(try_cfg("m3", serde_json::json!({"maximumPerMinute": 0})).is_err());
        assert!(try_cfg("m4", serde_json::json!({"maximumPerMinute": "5"})).is_err());
        assert!(try_cfg("f1", exp(1.into(), 1.1.into(), n.clone())).is_ok());
        assert!(try_cfg("f2", exp(1.into(), 1.0.into(), n.clone())).is_err());
        assert!(try_cfg("f3", exp(1.into(), 5.0.into(), n.clone())).is_ok());
        assert!(try_cfg("f4", exp(1.into(), 5.1.into(), n.clone())).is_err());
        assert!(try_cfg("b1", exp(1000.into(), 2.0.into(), n.clone())).is_ok());
        assert!(try_cfg("b2", exp(1001.into(), 2.0.into(), n.clone())).is_err());
        assert!(try_cfg("c1", exp(1.into(), 2.0.into(), serde_json::json!({}))).is_err());
        assert!(
            try_cfg(
                "c2",
                exp(
                    1.into(),
                    2.0.into(),
                    serde_json::json!({"numberOfNotifiedThings": 1, "numberOfSucceededThings": 1})
                )
            )
            .is_err()
        );
        let mut over = exp(5.into(), 2.0.into(), n);
        over["maximumPerMinute"] = 4.into();
        assert!(try_cfg("c3", over).is_err());
    }

    #[test]
    fn a_rollout_stops_at_cancel_and_forgets_deleted_things() {
        let (reg, a) = setup();
        let t = things(&reg, &a, 4);
        staged(
            &reg,
            &a,
            "c",
            &t,
            serde_json::json!({"maximumPerMinute": 1}),
            0.0,
        )
        .unwrap();
        // r1 is deleted and re-created: the job never reaches the new r1.
        reg.delete_thing(&a, "r1", None).unwrap();
        reg.create_thing(&a, "r1", None, BTreeMap::new()).unwrap();
        assert_eq!(reg.roll_out_jobs(60.0), 1);
        assert!(reg.job_execution(&a, "c", "r1", None).is_err());
        assert!(reg.job_execution(&a, "c", "r2", None).is_ok());
        reg.cancel_job(&a, "c", false, None, None, 61.0).unwrap();
        assert_eq!(reg.roll_out_jobs(120.0), 0);
        assert!(reg.job_execution(&a, "c", "r3", None).is_err());
    }

    fn with_retries(
        reg: &Registry,
        a: &str,
        id: &str,
        targets: &[String],
        retry: Value,
    ) -> Result<Job> {
        reg.create_job(
            a,
            id,
            NewJob {
                targets: targets.to_vec(),
                document: "{}".into(),
                in_progress_timeout_minutes: Some(1),
                configs: BTreeMap::from([("jobExecutionsRetryConfig".to_string(), retry)]),
                ..NewJob::default()
            },
            0.0,
        )
    }

    #[test]
    fn failed_and_timed_out_executions_are_retried_as_configured() {
        let (reg, a) = setup();
        let t = things(&reg, &a, 1);
        let cfg =
            serde_json::json!({"criteriaList": [{"failureType": "FAILED", "numberOfRetries": 2}]});
        with_retries(&reg, &a, "f", &t, cfg).unwrap();
        for attempt in 1..=3u64 {
            let (e, _) = reg.job_execution(&a, "f", "r0", None).unwrap();
            assert_eq!(
                (e.status, e.execution_number, e.retry_attempt()),
                (ExecStatus::Queued, attempt, attempt - 1)
            );
            // The device's update answers with the ended execution.
            let (done, _) = reg
                .update_job_execution(&a, "f", "r0", update("FAILED"), attempt as f64)
                .unwrap();
            assert_eq!(
                (done.status, done.execution_number),
                (ExecStatus::Failed, attempt)
            );
        }
        // Two retries, then it stays FAILED and the job completes.
        let (e, _) = reg.job_execution(&a, "f", "r0", None).unwrap();
        assert_eq!((e.status, e.execution_number), (ExecStatus::Failed, 3));
        assert_eq!(
            reg.describe_job(&a, "f").unwrap().0.status,
            JobStatus::Completed
        );
        // An update naming an earlier attempt's number finds nothing.
        assert!(reg.job_execution(&a, "f", "r0", Some(1)).is_err());

        // ALL counts both kinds; TIMED_OUT is retried from the sweep.
        let cfg =
            serde_json::json!({"criteriaList": [{"failureType": "ALL", "numberOfRetries": 1}]});
        with_retries(&reg, &a, "t", &t, cfg).unwrap();
        reg.start_next_job_execution(&a, "r0", None, None, 10.0)
            .unwrap();
        assert_eq!(reg.expire_job_executions(70.0), 1);
        let (e, _) = reg.job_execution(&a, "t", "r0", None).unwrap();
        assert_eq!(
            (e.status, e.execution_number, e.retries),
            (ExecStatus::Queued, 2, (0, 1))
        );
        reg.update_job_execution(&a, "t", "r0", update("FAILED"), 71.0)
            .unwrap();
        let (e, _) = reg.job_execution(&a, "t", "r0", None).unwrap();
        assert_eq!(e.status, ExecStatus::Failed, "no retry left");
        // SUCCEEDED and REJECTED are never retried.
        let cfg =
            serde_json::json!({"criteriaList": [{"failureType": "ALL", "numberOfRetries": 10}]});
        with_retries(&reg, &a, "r", &t, cfg).unwrap();
        reg.update_job_execution(&a, "r", "r0", update("REJECTED"), 80.0)
            .unwrap();
        assert_eq!(
            reg.job_execution(&a, "r", "r0", None).unwrap().0.status,
            ExecStatus::Rejected
        );
    }

    #[test]
    fn retry_settings_are_checked_at_their_bounds() {
        let (reg, a) = setup();
        let t = things(&reg, &a, 1);
        let c =
            |n: Value, kind: &str| serde_json::json!({"failureType": kind, "numberOfRetries": n});
        let ok = |id: &str, list: Vec<Value>| {
            with_retries(
                &reg,
                &a,
                id,
                &t,
                serde_json::json!({ "criteriaList": list }),
            )
            .is_ok()
        };
        assert!(ok("a", vec![c(10.into(), "FAILED")]));
        assert!(!ok("b", vec![c(11.into(), "FAILED")]));
        assert!(ok(
            "c",
            vec![c(0.into(), "TIMED_OUT"), c(3.into(), "FAILED")]
        ));
        assert!(!ok("d", vec![c(1.into(), "FAILED"), c(1.into(), "FAILED")]));
        assert!(!ok(
            "e",
            vec![
                c(1.into(), "FAILED"),
                c(1.into(), "TIMED_OUT"),
                c(1.into(), "ALL")
            ]
        ));
        assert!(!ok("f", vec![]));
        assert!(!ok("g", vec![c(1.into(), "REJECTED")]));
        assert!(!ok("h", vec![c((-1).into(), "ALL")]));
    }

    fn scheduled(
        reg: &Registry,
        a: &str,
        id: &str,
        targets: &[String],
        cfg: Value,
        now: f64,
    ) -> Result<Job> {
        reg.create_job(
            a,
            id,
            NewJob {
                targets: targets.to_vec(),
                document: "{}".into(),
                continuous: true,
                configs: BTreeMap::from([("schedulingConfig".to_string(), cfg)]),
                ..NewJob::default()
            },
            now,
        )
    }

    #[test]
    fn schedule_times_are_read_as_aws_writes_them() {
        assert_eq!(schedule_time("1970-01-01T00:00"), Some(0.0));
        assert_eq!(schedule_time("2026-12-01T10:30"), Some(1_796_121_000.0));
        assert_eq!(schedule_time("2026-12-01T10:30:15Z"), Some(1_796_121_015.0));
        for bad in [
            "2026-12-01",
            "2026-12-01T24:00",
            "2026-13-01T10:00",
            "2026-02-30T10:00",
            "2026-12-01T10:60",
            "2026-12-1T10:00",
            "2026-12-01T10:00:00:00",
            "x",
            "+2026-12-01T10:00",
        ] {
            assert_eq!(schedule_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_scheduled_job_starts_and_ends_on_time() {
        let (reg, a) = setup();
        let t = things(&reg, &a, 2);
        // 1796121000 is 2026-12-01T10:30Z; now is half an hour before.
        let now = 1_796_119_200.0;
        let cfg = serde_json::json!({"startTime": "2026-12-01T10:30", "endTime": "2026-12-01T11:00",
            "endBehavior": "CANCEL"});
        let j = scheduled(&reg, &a, "s", &t[..1], cfg, now).unwrap();
        assert_eq!(j.status, JobStatus::Scheduled);
        assert_eq!(executions(&reg, &a, "s"), 0);
        assert_eq!(reg.run_job_schedules(now + 1799.0), 0);
        assert_eq!(
            reg.describe_job(&a, "s").unwrap().0.status,
            JobStatus::Scheduled
        );
        // At the start its targets are resolved and get their executions.
        assert_eq!(reg.run_job_schedules(now + 1800.0), 1);
        assert_eq!(
            reg.describe_job(&a, "s").unwrap().0.status,
            JobStatus::InProgress
        );
        assert_eq!(executions(&reg, &a, "s"), 1);
        // At the end, CANCEL: the QUEUED execution is canceled with the job.
        assert_eq!(reg.run_job_schedules(now + 3599.0), 0);
        assert_eq!(reg.run_job_schedules(now + 3600.0), 1);
        let (j, _) = reg.describe_job(&a, "s").unwrap();
        assert_eq!(
            (j.status, j.reason_code.as_deref()),
            (JobStatus::Canceled, Some("SCHEDULED_END"))
        );
        assert_eq!(
            reg.job_execution(&a, "s", "r0", None).unwrap().0.status,
            ExecStatus::Canceled
        );
        assert_eq!(reg.run_job_schedules(now + 9999.0), 0, "once");
    }

    /// A start found after the end (the server was down through both) reaches no thing.
    #[test]
    fn a_start_found_past_the_end_reaches_no_one() {
        let (reg, a) = setup();
        let t = things(&reg, &a, 1);
        let now = 1_796_119_200.0;
        let cfg = serde_json::json!({"startTime": "2026-12-01T10:30", "endTime": "2026-12-01T11:00",
            "endBehavior": "CANCEL"});
        scheduled(&reg, &a, "late", &t, cfg, now).unwrap();
        assert_eq!(reg.run_job_schedules(now + 7200.0), 1);
        let (j, _) = reg.describe_job(&a, "late").unwrap();
        assert_eq!(j.status, JobStatus::Canceled);
        assert_eq!(executions(&reg, &a, "late"), 0);
        assert_eq!(reg.run_job_schedules(now + 9000.0), 0);
    }

    #[test]
    fn schedules_are_checked_at_their_bounds() {
        let (reg, a) = setup();
        let t = things(&reg, &a, 1);
        let now = 1_796_119_200.0; // 2026-12-01T10:00Z
        let at = |start: &str, end: Option<&str>| {
            let mut c = serde_json::json!({ "startTime": start });
            if let Some(e) = end {
                c["endTime"] = e.into();
            }
            c
        };
        let ok = |id: &str, cfg: Value| scheduled(&reg, &a, id, &t, cfg, now).is_ok();
        assert!(ok("a", at("2026-12-01T10:30", None)), "30 minutes ahead");
        assert!(!ok("b", at("2026-12-01T10:29", None)), "29 minutes ahead");
        assert!(ok("c", at("2027-12-01T10:00", None)), "a year ahead");
        assert!(
            !ok("d", at("2027-12-01T10:01", None)),
            "a year and a minute"
        );
        assert!(ok("e", at("2026-12-01T10:30", Some("2026-12-01T11:00"))));
        assert!(!ok("f", at("2026-12-01T10:30", Some("2026-12-01T10:59"))));
        assert!(!ok(
            "g",
            serde_json::json!({"startTime": "2026-12-01T10:30", "endBehavior": "STOP"})
        ));
        assert!(!ok(
            "h",
            serde_json::json!({"startTime": "2026-12-01T10:30",
            "maintenanceWindows": [{"startTime": "cron(0 0 * * ? *)", "durationInMinutes": 30}]})
        ));
        assert!(!ok("i", serde_json::json!({"startTime": "tomorrow"})));
    }

    #[test]
    fn stop_rollout_at_the_end_keeps_executions_and_stops_new_things() {
        let (reg, a) = setup();
        things(&reg, &a, 1);
        reg.create_thing_group(&a, "g", None, None, BTreeMap::new())
            .unwrap();
        reg.add_thing_to_group(&a, "g", "r0").unwrap();
        let now = 1_796_119_200.0;
        let cfg = serde_json::json!({"endTime": "2026-12-01T10:30"});
        let group = reg.arn(&a, "thinggroup/g");
        scheduled(&reg, &a, "c", &[group], cfg, now).unwrap();
        assert_eq!(
            executions(&reg, &a, "c"),
            1,
            "no startTime: it starts at once"
        );
        assert_eq!(reg.run_job_schedules(now + 1800.0), 1);
        assert_eq!(
            reg.describe_job(&a, "c").unwrap().0.status,
            JobStatus::InProgress
        );
        reg.create_thing(&a, "late", None, BTreeMap::new()).unwrap();
        reg.add_thing_to_group(&a, "g", "late").unwrap();
        assert!(
            reg.job_execution(&a, "c", "late", None).is_err(),
            "joined after the end"
        );
        assert!(reg.job_execution(&a, "c", "r0", None).is_ok());
    }

    /// The rollout queue is rows of its own: it survives a reopen, in order, and the job's
    /// document does not carry it.
    #[test]
    fn a_rollout_queue_survives_a_reopen_in_order() {
        let dir = std::env::temp_dir().join(format!("sekisho-rollout-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("registry.db");
        let _ = std::fs::remove_file(&path);
        let a = {
            let reg = Registry::open(&path, "us-east-1").unwrap();
            let (info, _) = reg.create_account("a").unwrap();
            let t = things(&reg, &info.id, 20);
            staged(
                &reg,
                &info.id,
                "q",
                &t,
                serde_json::json!({"maximumPerMinute": 3}),
                0.0,
            )
            .unwrap();
            let (j, _) = reg.describe_job(&info.id, "q").unwrap();
            let doc = serde_json::to_string(&j).unwrap();
            assert!(
                !doc.contains("waiting") && !doc.contains("\"r19\""),
                "no queue in the document: {doc}"
            );
            info.id
        };
        let reg = Registry::open(&path, "us-east-1").unwrap();
        let waiting: Vec<String> = reg
            .read(&a, |acct| {
                Ok(acct.job_waiting["q"]
                    .iter()
                    .map(|(_, t)| t.clone())
                    .collect())
            })
            .unwrap();
        let mut want: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
        want.sort();
        assert_eq!(waiting, want[3..]);
        assert_eq!(reg.roll_out_jobs(60.0), 3);
        assert!(reg.job_execution(&a, "q", &want[3], None).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A thing joining a staged CONTINUOUS job's group after the minute turned releases the
    /// things at the front of the queue, and each of them is told (on the feed).
    #[test]
    fn things_released_by_a_join_are_told() {
        let (reg, a) = setup();
        things(&reg, &a, 3);
        reg.create_thing_group(&a, "g", None, None, BTreeMap::new())
            .unwrap();
        for t in ["r0", "r1"] {
            reg.add_thing_to_group(&a, "g", t).unwrap();
        }
        let g = reg.arn(&a, "thinggroup/g");
        reg.create_job(
            &a,
            "c",
            NewJob {
                targets: vec![g],
                document: "{}".into(),
                continuous: true,
                configs: BTreeMap::from([(
                    "jobExecutionsRolloutConfig".to_string(),
                    serde_json::json!({"maximumPerMinute": 1}),
                )]),
                ..NewJob::default()
            },
            0.0,
        )
        .unwrap();
        let mut feed = reg.subscribe();
        // The join happens in a later minute (real time is far past 0 + 60 s).
        reg.add_thing_to_group(&a, "g", "r2").unwrap();
        let mut told = Vec::new();
        while let Ok(c) = feed.try_recv() {
            if let Change::JobExecutions { things, .. } = c {
                told.extend(things);
            }
        }
        assert!(told.contains(&"r1".to_string()), "{told:?}");
        assert!(reg.job_execution(&a, "c", "r1", None).is_ok());
        assert!(
            reg.job_execution(&a, "c", "r2", None).is_err(),
            "r2 waits its turn"
        );
    }

    /// Things that waited through a group leave the queue when they leave the group, or the
    /// group goes; a rollout added by UpdateJob stages the things that join later.
    #[test]
    fn rollout_queues_follow_groups_and_updates() {
        let (reg, a) = setup();
        things(&reg, &a, 4);
        reg.create_thing_group(&a, "g", None, None, BTreeMap::new())
            .unwrap();
        for t in ["r0", "r1", "r2"] {
            reg.add_thing_to_group(&a, "g", t).unwrap();
        }
        let cont = |_: &str, configs: BTreeMap<String, Value>| NewJob {
            targets: vec![reg.arn(&a, "thinggroup/g")],
            document: "{}".into(),
            continuous: true,
            configs,
            ..NewJob::default()
        };
        let staged_cfg = BTreeMap::from([(
            "jobExecutionsRolloutConfig".to_string(),
            serde_json::json!({"maximumPerMinute": 1}),
        )]);
        reg.create_job(&a, "s", cont("s", staged_cfg.clone()), 0.0)
            .unwrap();
        let waiting = |reg: &Registry| -> Vec<String> {
            reg.read(&a, |acct| {
                Ok(acct
                    .job_waiting
                    .get("s")
                    .map(|w| w.iter().map(|(_, t)| t.clone()).collect())
                    .unwrap_or_default())
            })
            .unwrap()
        };
        assert_eq!(waiting(&reg), ["r1", "r2"]);
        reg.remove_thing_from_group(&a, "g", "r1").unwrap();
        assert_eq!(waiting(&reg), ["r2"]);
        reg.delete_thing_group(&a, "g", None).unwrap();
        assert!(waiting(&reg).is_empty());
        assert_eq!(reg.roll_out_jobs(1.0e12), 0);
        // A job made without a rollout, given one by UpdateJob: later joiners wait.
        reg.create_thing_group(&a, "g", None, None, BTreeMap::new())
            .unwrap();
        reg.create_job(&a, "u", cont("u", BTreeMap::new()), 0.0)
            .unwrap();
        reg.update_job(
            &a,
            "u",
            JobUpdate {
                configs: staged_cfg,
                ..JobUpdate::default()
            },
            1.0e12,
        )
        .unwrap();
        for t in ["r0", "r1", "r3"] {
            reg.add_thing_to_group(&a, "g", t).unwrap();
        }
        let n = reg
            .read(&a, |acct| Ok(acct.executions_of("u").count()))
            .unwrap();
        assert_eq!(n, 1, "one a minute");
    }

    fn update(status: &str) -> ExecutionUpdate {
        ExecutionUpdate {
            status: status.into(),
            ..ExecutionUpdate::default()
        }
    }

    #[test]
    fn targets_next_pending_and_the_state_machine() {
        let (reg, a) = setup();
        for t in ["t1", "t2", "t3"] {
            reg.create_thing(&a, t, None, BTreeMap::new()).unwrap();
        }
        reg.create_thing_group(&a, "top", None, None, BTreeMap::new())
            .unwrap();
        reg.create_thing_group(&a, "sub", Some("top"), None, BTreeMap::new())
            .unwrap();
        reg.add_thing_to_group(&a, "sub", "t2").unwrap();
        let thing = |t: &str| reg.arn(&a, &format!("thing/{t}"));
        let group = |g: &str| reg.group_arn(&a, g);
        // A group target reaches the things of its descendants.
        job(&reg, &a, "j1", &[thing("t1"), group("top")], 0.0);
        job(&reg, &a, "j2", &[thing("t1")], 1.0);
        let (_, counts) = reg.describe_job(&a, "j1").unwrap();
        assert_eq!(counts.get(&ExecStatus::Queued), Some(&2));
        assert!(reg.job_execution(&a, "j1", "t3", None).is_err());

        // Next pending: creation order, IN_PROGRESS first.
        let next = |t: &str| {
            reg.pending_job_executions(&a, t)
                .unwrap()
                .into_iter()
                .map(|(e, _)| e.job_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(next("t1"), ["j1", "j2"]);
        reg.update_job_execution(&a, "j2", "t1", update("IN_PROGRESS"), 2.0)
            .unwrap();
        assert_eq!(next("t1"), ["j2", "j1"]);
        // start-next returns the IN_PROGRESS one unchanged.
        let (e, _) = reg
            .start_next_job_execution(&a, "t1", None, None, 3.0)
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.job_id.as_str(), e.version, e.status),
            ("j2", 2, ExecStatus::InProgress)
        );

        // Versions and terminal states.
        let stale = ExecutionUpdate {
            expected_version: Some(1),
            ..update("SUCCEEDED")
        };
        assert!(matches!(
            reg.update_job_execution(&a, "j2", "t1", stale, 4.0),
            Err(RegistryError::VersionConflict(_))
        ));
        let done = ExecutionUpdate {
            expected_version: Some(2),
            status_details: Some([("k".to_string(), "v".to_string())].into()),
            ..update("SUCCEEDED")
        };
        let (e, _) = reg.update_job_execution(&a, "j2", "t1", done, 5.0).unwrap();
        assert_eq!((e.status, e.version), (ExecStatus::Succeeded, 3));
        assert!(matches!(
            reg.update_job_execution(&a, "j2", "t1", update("IN_PROGRESS"), 6.0),
            Err(RegistryError::InvalidStateTransition(_))
        ));
        assert!(matches!(
            reg.update_job_execution(&a, "j1", "t1", update("TIMED_OUT"), 6.0),
            Err(RegistryError::InvalidRequest(_))
        ));
        // A SNAPSHOT job completes when its last execution ends.
        assert_eq!(
            reg.describe_job(&a, "j2").unwrap().0.status,
            JobStatus::Completed
        );
        reg.update_job_execution(&a, "j1", "t1", update("FAILED"), 7.0)
            .unwrap();
        assert_eq!(
            reg.describe_job(&a, "j1").unwrap().0.status,
            JobStatus::InProgress
        );
        reg.update_job_execution(&a, "j1", "t2", update("REJECTED"), 8.0)
            .unwrap();
        let (j, counts) = reg.describe_job(&a, "j1").unwrap();
        assert_eq!(
            (j.status, j.completed_at),
            (JobStatus::Completed, Some(8.0))
        );
        assert_eq!(counts.get(&ExecStatus::Failed), Some(&1));
        assert_eq!(counts.get(&ExecStatus::Rejected), Some(&1));
        assert!(
            reg.start_next_job_execution(&a, "t1", None, None, 9.0)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn timeouts_on_a_virtual_clock() {
        let (reg, a) = setup();
        reg.create_thing(&a, "t", None, BTreeMap::new()).unwrap();
        let t = reg.arn(&a, "thing/t");
        reg.create_job(
            &a,
            "slow",
            NewJob {
                targets: vec![t.clone()],
                document: "{}".into(),
                in_progress_timeout_minutes: Some(10),
                ..NewJob::default()
            },
            0.0,
        )
        .unwrap();
        job(&reg, &a, "step", &[t], 0.0);
        // The step timeout (1 minute) from start-next; the job's own (10 minutes) from the start.
        reg.start_next_job_execution(&a, "t", None, Some(1), 100.0)
            .unwrap();
        reg.update_job_execution(
            &a,
            "step",
            "t",
            ExecutionUpdate {
                step_timeout_minutes: Some(2),
                ..update("IN_PROGRESS")
            },
            100.0,
        )
        .unwrap();
        assert_eq!(reg.expire_job_executions(159.0), 0);
        assert_eq!(reg.expire_job_executions(160.0), 1);
        let status = |j: &str| reg.job_execution(&a, j, "t", None).unwrap().0.status;
        assert_eq!(
            (status("slow"), status("step")),
            (ExecStatus::TimedOut, ExecStatus::InProgress)
        );
        // A new step timeout replaces the old one.
        reg.update_job_execution(
            &a,
            "step",
            "t",
            ExecutionUpdate {
                step_timeout_minutes: Some(5),
                ..update("IN_PROGRESS")
            },
            200.0,
        )
        .unwrap();
        assert_eq!(reg.expire_job_executions(499.0), 0);
        assert_eq!(reg.expire_job_executions(500.0), 1);
        assert_eq!(status("step"), ExecStatus::TimedOut);
        assert_eq!(reg.expire_job_executions(10_000.0), 0);
    }

    #[test]
    fn cancel_delete_continuous_and_deleted_things() {
        let (reg, a) = setup();
        for t in ["t1", "t2", "late"] {
            reg.create_thing(&a, t, None, BTreeMap::new()).unwrap();
        }
        reg.create_thing_group(&a, "g", None, None, BTreeMap::new())
            .unwrap();
        reg.add_thing_to_group(&a, "g", "t1").unwrap();
        reg.add_thing_to_group(&a, "g", "t2").unwrap();
        let mut rx = reg.subscribe();
        reg.create_job(
            &a,
            "cont",
            NewJob {
                targets: vec![reg.group_arn(&a, "g")],
                document: "{}".into(),
                continuous: true,
                ..NewJob::default()
            },
            0.0,
        )
        .unwrap();
        match rx.try_recv() {
            Ok(Change::JobExecutions { things, .. }) => assert_eq!(things, ["t1", "t2"]),
            other => panic!("{other:?}"),
        }
        // A thing joining the group later gets an execution.
        reg.add_thing_to_group(&a, "g", "late").unwrap();
        assert_eq!(
            reg.job_execution(&a, "cont", "late", None)
                .unwrap()
                .0
                .status,
            ExecStatus::Queued
        );
        reg.update_job_execution(&a, "cont", "t1", update("IN_PROGRESS"), 1.0)
            .unwrap();
        assert!(matches!(
            reg.delete_job(&a, "cont", false),
            Err(RegistryError::InvalidStateTransition(_))
        ));
        assert!(matches!(
            reg.cancel_job_execution(&a, "cont", "t1", CancelExecution::default(), 2.0),
            Err(RegistryError::InvalidStateTransition(_))
        ));
        // CancelJob without force leaves IN_PROGRESS executions running.
        reg.cancel_job(&a, "cont", false, None, Some("stop".into()), 3.0)
            .unwrap();
        let st = |t: &str| reg.job_execution(&a, "cont", t, None).unwrap().0;
        assert_eq!(
            (st("t1").status, st("t2").status),
            (ExecStatus::InProgress, ExecStatus::Canceled)
        );
        reg.cancel_job(&a, "cont", true, None, None, 4.0).unwrap();
        assert!(st("t1").force_canceled && st("t1").status == ExecStatus::Canceled);
        // Nor does a canceled job reach a thing that joins later.
        reg.create_thing_group(&a, "g2", None, None, BTreeMap::new())
            .unwrap();
        reg.delete_job(&a, "cont", false).unwrap();
        assert!(reg.job_execution(&a, "cont", "t1", None).is_err());

        // A deleted thing's executions go with it.
        job(&reg, &a, "j", &[reg.arn(&a, "thing/t2")], 5.0);
        reg.delete_thing(&a, "t2", None).unwrap();
        reg.create_thing(&a, "t2", None, BTreeMap::new()).unwrap();
        assert!(reg.pending_job_executions(&a, "t2").unwrap().is_empty());
    }

    #[test]
    fn s3_urls() {
        let l = |u| s3_location(u);
        let bk = |b: &str, k: &str| Some((b.to_owned(), k.to_owned()));
        assert_eq!(
            l("https://s3.amazonaws.com/b/fw/v1.bin"),
            bk("b", "fw/v1.bin")
        );
        assert_eq!(
            l("https://s3.us-east-1.amazonaws.com/b/k%20x"),
            bk("b", "k x")
        );
        assert_eq!(l("https://b.s3.amazonaws.com/dir/k"), bk("b", "dir/k"));
        assert_eq!(l("https://b.s3.eu-west-1.amazonaws.com/k"), bk("b", "k"));
        assert_eq!(l("https://evil.example.com/b/k"), None);
        assert_eq!(l("http://s3.amazonaws.com/b/k"), None);
        assert_eq!(l("https://s3.amazonaws.com/b/"), None);
        assert_eq!(l("https://s3.amazonaws.com/b"), None);
    }

    #[test]
    fn abort_config_cancels_at_its_threshold_and_not_below() {
        for (threshold, aborts) in [(50.0, true), (50.01, false)] {
            let (reg, a) = setup();
            let mut targets = Vec::new();
            for t in ["t1", "t2", "t3", "t4"] {
                reg.create_thing(&a, t, None, BTreeMap::new()).unwrap();
                targets.push(reg.arn(&a, &format!("thing/{t}")));
            }
            let abort = serde_json::json!({"criteriaList": [{"failureType": "FAILED", "action": "CANCEL",
                "thresholdPercentage": threshold, "minNumberOfExecutedThings": 2}]});
            reg.create_job(
                &a,
                "j",
                NewJob {
                    targets,
                    document: "{}".into(),
                    configs: BTreeMap::from([("abortConfig".to_string(), abort)]),
                    ..NewJob::default()
                },
                0.0,
            )
            .unwrap();
            reg.update_job_execution(&a, "j", "t3", update("IN_PROGRESS"), 1.0)
                .unwrap();
            reg.update_job_execution(&a, "j", "t1", update("FAILED"), 2.0)
                .unwrap();
            // One ended: fewer than minNumberOfExecutedThings.
            assert_eq!(
                reg.describe_job(&a, "j").unwrap().0.status,
                JobStatus::InProgress
            );
            reg.update_job_execution(&a, "j", "t2", update("SUCCEEDED"), 3.0)
                .unwrap();
            let (j, counts) = reg.describe_job(&a, "j").unwrap();
            let st = |t: &str| reg.job_execution(&a, "j", t, None).unwrap().0.status;
            if aborts {
                assert_eq!(j.status, JobStatus::Canceled, "50% failed reaches 50%");
                assert_eq!(st("t4"), ExecStatus::Canceled);
                assert_eq!(
                    st("t3"),
                    ExecStatus::InProgress,
                    "running executions finish"
                );
                assert_eq!(counts.get(&ExecStatus::Canceled), Some(&1));
            } else {
                assert_eq!(j.status, JobStatus::InProgress, "50% is below 50.01%");
                assert_eq!(st("t4"), ExecStatus::Queued);
            }
        }
    }

    #[test]
    fn status_details_limits_at_n_and_n_plus_one() {
        let entries = |n: usize| -> BTreeMap<String, String> {
            (0..n).map(|i| (format!("k{i}"), "v".to_string())).collect()
        };
        assert!(check_status_details(&entries(MAX_STATUS_DETAILS)).is_ok());
        assert!(check_status_details(&entries(MAX_STATUS_DETAILS + 1)).is_err());
        let value = |n: usize| BTreeMap::from([("k".to_string(), "x".repeat(n))]);
        assert!(check_status_details(&value(1024)).is_ok());
        assert!(check_status_details(&value(1025)).is_err());
        assert!(check_status_details(&value(0)).is_err());
        assert!(check_status_details(&BTreeMap::from([("bad key".into(), "v".into())])).is_err());
    }

    #[test]
    fn jobs_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("sekisho-jobs-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("registry.db");
        let _ = std::fs::remove_file(&path);
        let a = {
            let reg = Registry::open(&path, "us-east-1").unwrap();
            let (info, _) = reg.create_account("a").unwrap();
            reg.create_thing(&info.id, "t", None, BTreeMap::new())
                .unwrap();
            job(&reg, &info.id, "j1", &[reg.arn(&info.id, "thing/t")], 0.0);
            job(&reg, &info.id, "j2", &[reg.arn(&info.id, "thing/t")], 0.0);
            reg.start_next_job_execution(&info.id, "t", None, None, 1.0)
                .unwrap();
            info.id
        };
        let reg = Registry::open(&path, "us-east-1").unwrap();
        let pending: Vec<(String, ExecStatus)> = reg
            .pending_job_executions(&a, "t")
            .unwrap()
            .into_iter()
            .map(|(e, _)| (e.job_id, e.status))
            .collect();
        assert_eq!(
            pending,
            [
                ("j1".into(), ExecStatus::InProgress),
                ("j2".into(), ExecStatus::Queued)
            ]
        );
        // Creation order goes on after a restart.
        job(&reg, &a, "j3", &[reg.arn(&a, "thing/t")], 2.0);
        assert!(
            reg.describe_job(&a, "j3").unwrap().0.seq > reg.describe_job(&a, "j2").unwrap().0.seq
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
