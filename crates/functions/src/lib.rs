//! Lambda-compatible functions, hosted by Sekisho as local processes.
//!
//! A function's code is a zip stored (and unpacked, bounded) under the host's directory, one
//! directory per code hash. An invocation goes to a warm instance of the function if one is
//! idle, else to a new one: a process started with Lambda's environment, running the stock
//! runtime interface client (`python -m awslambdaric <handler>`, `aws-lambda-ric <handler>`)
//! or the function's own `bootstrap`, and talking to a Lambda Runtime API that this crate
//! serves to that instance alone on a loopback port of its own (`AWS_LAMBDA_RUNTIME_API`).
//! So unmodified Lambda handlers run. Instances are bounded per function and in all; a
//! timeout kills the instance (its process group); a crash ends only the invocation it was
//! running; the instance's output goes to the server log with the request id.
//!
//! Isolation is that of a local process of the server's user (see docs/functions.md): no
//! microVM, no network namespace.

pub mod authorizer;
mod code;
pub mod hook;
mod invoker;
mod runtime_api;

pub use invoker::Invoker;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub use code::{CodeError, MAX_UNZIPPED, MAX_ZIP};

/// How the host runs functions.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where code is stored and unpacked.
    pub dir: PathBuf,
    /// The Python interpreter that runs `python3.x` functions (it must have `awslambdaric`).
    pub python: String,
    /// The command that runs `nodejs*` functions (the `aws-lambda-ric` of npm).
    pub node_ric: String,
    /// Instances in all.
    pub max_instances: usize,
    /// Instances of one function.
    pub max_per_function: usize,
    /// Instances of one account's functions together.
    pub max_per_account: usize,
    /// Accounts whose functions may run; `None`: every account.
    pub accounts: Option<std::collections::BTreeSet<String>>,
    /// Extra environment every instance gets (e.g. `AWS_ENDPOINT_URL`, `AWS_CA_BUNDLE`, so
    /// that the SDKs in functions reach Sekisho rather than AWS).
    pub env: BTreeMap<String, String>,
    /// The least `refreshAfterInSeconds` and `disconnectAfterInSeconds` an authorizer may
    /// answer (AWS: 300; lower only to test what happens when they pass).
    pub authorizer_min_seconds: u32,
}

/// A future of a [`CodeShare`] call.
pub type ShareFuture<T> = Pin<Box<dyn Future<Output = std::io::Result<T>> + Send>>;

/// Where the nodes of a cluster keep function code for one another (cluster mode: a
/// JetStream object store). A node that stores code puts its zip here before the function
/// that names it is written; a node asked to run code it does not hold takes the zip from
/// here, checks it against the hash the function names, and unpacks it as its own.
pub trait CodeShare: Send + Sync {
    /// Keeps `zip` (whose SHA-256 is `sha`, hex) for `account`; written again if it is there
    /// (which makes it recent again for [`CodeShare::sweep`]). An error of kind
    /// `QuotaExceeded` if the account's code would take more of the share than it may.
    fn put(&self, account: &str, sha: &str, zip: Bytes) -> ShareFuture<()>;
    /// The zip kept for `account` and `sha`, if any (at most `limit` bytes: a larger one is
    /// an error).
    fn get(&self, account: &str, sha: &str, limit: usize) -> ShareFuture<Option<Bytes>>;
    /// Removes `account`'s zips that `keep` does not name and that were last written more
    /// than `older_than` ago; returns how many it removed.
    fn sweep(
        &self,
        account: &str,
        keep: BTreeSet<String>,
        older_than: Duration,
    ) -> ShareFuture<usize>;
}

/// How long shared code nobody names is kept: longer than a function's write takes to reach
/// every node after its code was shared, so that a sweep on one node never removes code that
/// a function being written on another is about to name.
pub const SHARED_CODE_GRACE: Duration = Duration::from_secs(3600);

/// Temporary credentials of the execution role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret.
    pub secret_access_key: String,
    /// Session token.
    pub session_token: String,
}

/// What an invocation needs to know of its function.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// Account id.
    pub account: String,
    /// Function name.
    pub name: String,
    /// Function ARN.
    pub arn: String,
    /// `python3.12`, `nodejs20.x`, `provided.al2023`, ...
    pub runtime: String,
    /// `module.function` (the RICs' form; unused by `provided`).
    pub handler: String,
    /// The invocation's limit.
    pub timeout: Duration,
    /// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`.
    pub memory_mb: u32,
    /// The function's own variables.
    pub env: BTreeMap<String, String>,
    /// The code's SHA-256, hex.
    pub code_sha: String,
    /// Region.
    pub region: String,
    /// The execution role's credentials, if it could be assumed.
    pub credentials: Option<Credentials>,
    /// Changes whenever the configuration changes: instances of an older one are not reused.
    pub revision: String,
}

/// What an invocation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The function's response.
    Response(Bytes),
    /// A function error (Invoke answers 200 with `X-Amz-Function-Error: Unhandled` and this
    /// body, an `ErrorRequest` JSON).
    Error(Bytes),
}

/// Why an invocation did not run.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Every instance allowed is busy (`TooManyRequestsException`).
    #[error("Rate Exceeded.")]
    TooMany,
    /// The function's runtime is not one the host runs.
    #[error("The runtime {0} is not supported")]
    Runtime(String),
    /// The instance could not be started.
    #[error("The function could not be started: {0}")]
    Spawn(String),
    /// The function's own code cannot start (a `provided` runtime without an executable
    /// `bootstrap`): a function error, as Lambda reports it (`Runtime.InvalidEntrypoint`).
    #[error("{0}")]
    Entrypoint(String),
    /// Functions do not run for this account on this server (`[functions]`).
    #[error("Functions are not enabled for this account on this server")]
    Disabled,
}

/// A running invocation, as the runtime API hands it out.
struct Invocation {
    id: String,
    payload: Bytes,
    deadline_ms: u64,
    arn: String,
    reply: oneshot::Sender<Outcome>,
}

type PoolKey = (String, String, String);

/// One process of a function, and the runtime API it talks to.
struct Instance {
    tx: mpsc::Sender<Invocation>,
    api: Arc<runtime_api::Api>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    dead: Arc<AtomicBool>,
    /// Whether it has been taken off the count of instances (once, by whoever ends it first).
    uncounted: Arc<AtomicBool>,
    born: Instant,
    revision: String,
    /// The function's generation when it started (see `Host::retire`).
    generation: u64,
    /// When it last finished an invocation.
    idle_since: Mutex<Instant>,
}

impl Instance {
    /// Kills it; its place counts as free at once.
    fn retire(&self, host: &Host, key: &PoolKey) {
        self.dead.store(true, Ordering::Release);
        host.release(key, &self.uncounted);
        if let Some(k) = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = k.send(());
        }
    }
}

/// Instances older than this are not reused (their credentials were issued when they began).
const MAX_AGE: Duration = Duration::from_secs(30 * 60);
/// Idle instances are ended after this long.
const MAX_IDLE: Duration = Duration::from_secs(10 * 60);

/// The function host.
pub struct Host {
    cfg: Config,
    idle: Mutex<HashMap<PoolKey, Vec<Arc<Instance>>>>,
    /// Instances alive, in all, per function, per account.
    alive: Mutex<Alive>,
    /// Each function's generation: bumped when it is deleted or changed, so that instances of
    /// an older one, busy then, are ended when they finish rather than kept.
    generations: Mutex<HashMap<(String, String), u64>>,
    /// The cluster's shared code, in cluster mode.
    share: OnceLock<Arc<dyn CodeShare>>,
    /// One fetch from the share at a time per (account, code): the others wait for it.
    fetching: Mutex<HashMap<(String, String), FetchTurn>>,
    /// Fetches from the share at once, in all.
    fetch_slots: tokio::sync::Semaphore,
}

/// Whose turn it is to fetch one code from the share.
type FetchTurn = Arc<tokio::sync::Mutex<()>>;

/// How many codes are fetched from the share at once.
const FETCHES: usize = 2;

#[derive(Default)]
struct Alive {
    all: usize,
    per_function: HashMap<PoolKey, usize>,
    per_account: HashMap<String, usize>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("dir", &self.cfg.dir)
            .finish_non_exhaustive()
    }
}

fn error_body(kind: &str, message: &str) -> Bytes {
    Bytes::from(serde_json::json!({"errorType": kind, "errorMessage": message}).to_string())
}

impl Host {
    /// A host storing code under `cfg.dir`.
    pub fn new(cfg: Config) -> Arc<Host> {
        Arc::new(Host {
            cfg,
            idle: Mutex::new(HashMap::new()),
            alive: Mutex::new(Alive::default()),
            generations: Mutex::new(HashMap::new()),
            share: OnceLock::new(),
            fetching: Mutex::new(HashMap::new()),
            fetch_slots: tokio::sync::Semaphore::new(FETCHES),
        })
    }

    /// Shares code with the other nodes of a cluster through `share` (set once, at start).
    pub fn set_share(&self, share: Arc<dyn CodeShare>) {
        let _ = self.share.set(share);
    }

    /// The cluster's shared code, in cluster mode.
    pub fn share(&self) -> Option<&Arc<dyn CodeShare>> {
        self.share.get()
    }

    /// Makes sure the code `spec` names is unpacked here: in cluster mode, code stored on
    /// another node is taken from the share, checked against its hash and unpacked (one
    /// fetch per code, a few at once in all, hashed and unpacked off the caller's thread,
    /// within the function's timeout).
    async fn ensure_code(&self, spec: &FunctionSpec) -> Result<(), HostError> {
        let here = || code::task_dir(&self.cfg.dir, &spec.account, &spec.code_sha).is_dir();
        if here() {
            return Ok(());
        }
        let Some(share) = self.share.get() else {
            return Ok(()); // `start` says it is missing
        };
        let key = (spec.account.clone(), spec.code_sha.clone());
        let one = self
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let fetched = tokio::time::timeout(spec.timeout, async {
            let _one = one.lock().await;
            if here() {
                return Ok(()); // fetched by the one before
            }
            let _slot = self
                .fetch_slots
                .acquire()
                .await
                .map_err(|e| HostError::Spawn(e.to_string()))?;
            let zip = share
                .get(&spec.account, &spec.code_sha, MAX_ZIP)
                .await
                .map_err(|e| HostError::Spawn(format!("fetching the function's code: {e}")))?
                .ok_or_else(|| HostError::Spawn("the function's code is missing".into()))?;
            let (dir, account, want) = (
                self.cfg.dir.clone(),
                spec.account.clone(),
                spec.code_sha.clone(),
            );
            let unpacked = tokio::task::spawn_blocking(move || {
                if code::sha256_hex(&zip) != want {
                    return Err(HostError::Spawn(
                        "the shared code does not match the function's hash".into(),
                    ));
                }
                code::store(&dir, &account, &zip)
                    .map(|_| ())
                    .map_err(|e| HostError::Spawn(format!("unpacking the function's code: {e}")))
            })
            .await;
            unpacked.unwrap_or_else(|e| Err(HostError::Spawn(e.to_string())))
        })
        .await
        .unwrap_or_else(|_| {
            Err(HostError::Spawn(
                "fetching the function's code took longer than its timeout".into(),
            ))
        });
        self.fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        fetched
    }

    /// The least `refreshAfterInSeconds` and `disconnectAfterInSeconds` an authorizer may
    /// answer.
    pub fn authorizer_min_seconds(&self) -> u32 {
        self.cfg.authorizer_min_seconds
    }

    /// Stores a function's code (a zip), unpacked: returns its SHA-256 (hex) and size.
    pub fn store_code(&self, account: &str, zip: &[u8]) -> Result<(String, u64), CodeError> {
        code::store(&self.cfg.dir, account, zip)
    }

    /// Removes an account's stored code that no function of it uses any more (`keep`: the
    /// hashes its functions name); returns how many are left.
    pub fn collect_code(&self, account: &str, keep: &std::collections::BTreeSet<String>) -> usize {
        code::collect(&self.cfg.dir, account, keep)
    }

    /// The code's SHA-256 in Lambda's form (base64).
    pub fn code_sha_base64(sha_hex: &str) -> String {
        code::sha_base64(sha_hex)
    }

    /// Ends every idle instance of a function (deleted, or its code or configuration
    /// changed; busy ones are not reused once their invocation ends, as their revision is old).
    pub fn retire(&self, account: &str, name: &str) {
        *self
            .generations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((account.to_owned(), name.to_owned()))
            .or_default() += 1;
        let gone: Vec<(PoolKey, Vec<Arc<Instance>>)> = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<PoolKey> = idle
                .keys()
                .filter(|(a, n, _)| a == account && n == name)
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| idle.remove(&k).map(|l| (k, l)))
                .collect()
        };
        for (key, list) in gone {
            for i in list {
                i.retire(self, &key);
            }
        }
    }

    /// Whether functions run for `account`.
    pub fn allows(&self, account: &str) -> bool {
        self.cfg
            .accounts
            .as_ref()
            .is_none_or(|a| a.contains(account))
    }

    fn generation(&self, account: &str, name: &str) -> u64 {
        self.generations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(account.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Runs one invocation (RequestResponse). The invocation runs in a task of its own, so
    /// that its timeout (and the killing of a hung instance) holds even if the caller goes.
    pub async fn invoke(
        self: &Arc<Self>,
        spec: &FunctionSpec,
        payload: Bytes,
    ) -> Result<(String, Outcome), HostError> {
        if !self.allows(&spec.account) {
            return Err(HostError::Disabled);
        }
        let (host, spec) = (self.clone(), spec.clone());
        match tokio::spawn(async move { host.run(&spec, payload).await }).await {
            Ok(r) => r,
            Err(e) => Err(HostError::Spawn(format!("the invocation failed: {e}"))),
        }
    }

    async fn run(
        self: &Arc<Self>,
        spec: &FunctionSpec,
        payload: Bytes,
    ) -> Result<(String, Outcome), HostError> {
        self.reap();
        self.ensure_code(spec).await?;
        let key = (
            spec.account.clone(),
            spec.name.clone(),
            spec.code_sha.clone(),
        );
        let id = uuid::Uuid::new_v4().to_string();
        let instance = match self.take_idle(&key, spec) {
            Some(i) => i,
            None => match self.spawn(&key, spec) {
                Ok(i) => i,
                Err(HostError::Entrypoint(m)) => {
                    let body = error_body(
                        "Runtime.InvalidEntrypoint",
                        &format!("RequestId: {id} Error: {m}"),
                    );
                    return Ok((id, Outcome::Error(body)));
                }
                Err(e) => return Err(e),
            },
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let (reply, answer) = oneshot::channel();
        let invocation = Invocation {
            id: id.clone(),
            payload,
            deadline_ms: now_ms + spec.timeout.as_millis() as u64,
            arn: spec.arn.clone(),
            reply,
        };
        if instance.tx.try_send(invocation).is_err() {
            instance.retire(self, &key);
            return Err(HostError::Spawn("the instance stopped".into()));
        }
        let outcome = match tokio::time::timeout(spec.timeout, answer).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => {
                // The process ended (or the runtime API closed) during the invocation.
                instance.retire(self, &key);
                let why = instance.api.init_error().unwrap_or_else(|| {
                    error_body(
                        "Runtime.ExitError",
                        &format!(
                            "RequestId: {id} Error: Runtime exited without providing a reason"
                        ),
                    )
                });
                return Ok((id, Outcome::Error(why)));
            }
            Err(_) => {
                instance.retire(self, &key);
                let secs = spec.timeout.as_secs_f64();
                return Ok((
                    id.clone(),
                    Outcome::Error(error_body(
                        "Sandbox.Timedout",
                        &format!("RequestId: {id} Error: Task timed out after {secs:.2} seconds"),
                    )),
                ));
            }
        };
        // An instance that failed to start, or of a function deleted or changed meanwhile, is
        // not used again.
        let stale = instance.generation != self.generation(&spec.account, &spec.name);
        if stale || instance.api.init_error().is_some() || instance.dead.load(Ordering::Acquire) {
            instance.retire(self, &key);
        } else {
            *instance
                .idle_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Instant::now();
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_default()
                .push(instance);
        }
        Ok((id, outcome))
    }

    /// Ends instances idle for too long.
    fn reap(&self) {
        let gone: Vec<(PoolKey, Arc<Instance>)> = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let mut out = Vec::new();
            for (key, list) in idle.iter_mut() {
                list.retain(|i| {
                    let old = i
                        .idle_since
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .elapsed()
                        >= MAX_IDLE;
                    if old {
                        out.push((key.clone(), i.clone()));
                    }
                    !old
                });
            }
            idle.retain(|_, l| !l.is_empty());
            out
        };
        for (key, i) in gone {
            i.retire(self, &key);
        }
    }

    /// Ends the instance idle the longest (of any function), to make room.
    fn evict_one(&self) -> bool {
        let victim = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let oldest = idle
                .iter()
                .flat_map(|(k, l)| l.iter().enumerate().map(move |(n, i)| (k.clone(), n, i)))
                .min_by_key(|(_, _, i)| *i.idle_since.lock().unwrap_or_else(|p| p.into_inner()))
                .map(|(k, n, _)| (k, n));
            oldest.and_then(|(k, n)| {
                let list = idle.get_mut(&k)?;
                let i = list.remove(n);
                if list.is_empty() {
                    idle.remove(&k);
                }
                Some((k, i))
            })
        };
        match victim {
            Some((k, i)) => {
                i.retire(self, &k);
                true
            }
            None => false,
        }
    }

    fn take_idle(&self, key: &PoolKey, spec: &FunctionSpec) -> Option<Arc<Instance>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(i) = list.pop() {
            let usable = !i.dead.load(Ordering::Acquire)
                && i.born.elapsed() < MAX_AGE
                && i.revision == spec.revision;
            if usable {
                return Some(i);
            }
            i.retire(self, key);
        }
        None
    }

    fn spawn(
        self: &Arc<Self>,
        key: &PoolKey,
        spec: &FunctionSpec,
    ) -> Result<Arc<Instance>, HostError> {
        // Room for one more: the function's and the account's own bounds are hard; the bound
        // in all first makes room by ending the instance idle the longest.
        loop {
            let mut alive = self.alive.lock().unwrap_or_else(|p| p.into_inner());
            let function = alive.per_function.get(key).copied().unwrap_or(0);
            let account = alive.per_account.get(&key.0).copied().unwrap_or(0);
            if function >= self.cfg.max_per_function || account >= self.cfg.max_per_account {
                return Err(HostError::TooMany);
            }
            if alive.all >= self.cfg.max_instances {
                drop(alive);
                if self.evict_one() {
                    continue;
                }
                return Err(HostError::TooMany);
            }
            alive.all += 1;
            *alive.per_function.entry(key.clone()).or_default() += 1;
            *alive.per_account.entry(key.0.clone()).or_default() += 1;
            break;
        }
        match self.start(key, spec) {
            Ok(i) => Ok(i),
            Err(e) => {
                self.gone(key);
                Err(e)
            }
        }
    }

    /// Takes an instance off the count, once.
    fn release(&self, key: &PoolKey, uncounted: &AtomicBool) {
        if !uncounted.swap(true, Ordering::AcqRel) {
            self.gone(key);
        }
    }

    fn gone(&self, key: &PoolKey) {
        let mut alive = self.alive.lock().unwrap_or_else(|p| p.into_inner());
        alive.all = alive.all.saturating_sub(1);
        if let Some(n) = alive.per_function.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                alive.per_function.remove(key);
            }
        }
        if let Some(n) = alive.per_account.get_mut(&key.0) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                alive.per_account.remove(&key.0);
            }
        }
    }

    fn start(
        self: &Arc<Self>,
        key: &PoolKey,
        spec: &FunctionSpec,
    ) -> Result<Arc<Instance>, HostError> {
        let task = code::task_dir(&self.cfg.dir, &spec.account, &spec.code_sha);
        if !task.is_dir() {
            return Err(HostError::Spawn("the function's code is missing".into()));
        }
        let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| HostError::Spawn(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HostError::Spawn(e.to_string()))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| HostError::Spawn(e.to_string()))?;
        let (tx, rx) = mpsc::channel(1);
        let api = runtime_api::Api::new(rx, spec.name.clone());
        // The instance's own HOME and TMPDIR: its code's directory stays as stored.
        let tmp = self
            .cfg
            .dir
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&tmp).map_err(|e| HostError::Spawn(e.to_string()))?;
        let mut cmd = match spec.runtime.as_str() {
            r if r.starts_with("python3") => {
                let mut c = tokio::process::Command::new(&self.cfg.python);
                c.args(["-m", "awslambdaric", &spec.handler]);
                c
            }
            r if r.starts_with("nodejs") => {
                let mut c = tokio::process::Command::new(&self.cfg.node_ric);
                c.arg(&spec.handler);
                c
            }
            r if r.starts_with("provided") => tokio::process::Command::new(task.join("bootstrap")),
            other => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(HostError::Runtime(other.to_owned()));
            }
        };
        cmd.current_dir(&task)
            .env_clear()
            .envs(self.environment(spec, &task, &tmp, addr))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                // The function's own entry point, missing or not executable, is its error;
                // anything else (an interpreter the operator configured) is the server's.
                if spec.runtime.starts_with("provided")
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                    )
                {
                    return Err(HostError::Entrypoint(
                        "Couldn't find valid bootstrap(s): [bootstrap]".into(),
                    ));
                }
                return Err(HostError::Spawn(e.to_string()));
            }
        };
        let pid = child.id();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            tokio::spawn(runtime_api::log_lines(out, api.clone()));
        }
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let dead = Arc::new(AtomicBool::new(false));
        let uncounted = Arc::new(AtomicBool::new(false));
        let server = tokio::spawn(runtime_api::serve(listener, api.clone()));
        {
            let (host, key, dead, api, uncounted, tmp_dir) = (
                self.clone(),
                key.clone(),
                dead.clone(),
                api.clone(),
                uncounted.clone(),
                tmp.clone(),
            );
            tokio::spawn(async move {
                tokio::select! {
                    status = child.wait() => {
                        tracing::info!(function = %key.1, ?status, "function instance ended");
                    }
                    _ = kill_rx => {
                        // The whole process group: a runtime may have started others.
                        if let Some(pid) = pid {
                            let _ = tokio::process::Command::new("kill")
                                .args(["-KILL", "--", &format!("-{pid}")])
                                .status()
                                .await;
                        }
                        let _ = child.kill().await;
                    }
                }
                // What the process left behind (a runtime's children included) goes too.
                if let Some(pid) = pid {
                    let _ = tokio::process::Command::new("kill")
                        .args(["-KILL", "--", &format!("-{pid}")])
                        .stderr(std::process::Stdio::null())
                        .status()
                        .await;
                }
                dead.store(true, Ordering::Release);
                server.abort();
                api.close().await;
                host.release(&key, &uncounted);
                let _ = tokio::fs::remove_dir_all(&tmp_dir).await;
            });
        }
        Ok(Arc::new(Instance {
            tx,
            api,
            kill: Mutex::new(Some(kill_tx)),
            dead,
            uncounted,
            born: Instant::now(),
            revision: spec.revision.clone(),
            generation: self.generation(&spec.account, &spec.name),
            idle_since: Mutex::new(Instant::now()),
        }))
    }

    /// Lambda's environment for an instance (the server's own is not passed on, but `PATH`).
    fn environment(
        &self,
        spec: &FunctionSpec,
        task: &std::path::Path,
        tmp: &std::path::Path,
        api: SocketAddr,
    ) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        if let Ok(path) = std::env::var("PATH") {
            env.insert("PATH".into(), path);
        }
        env.extend(self.cfg.env.clone());
        env.extend(spec.env.clone());
        let task = task.display().to_string();
        let stream = uuid::Uuid::new_v4().simple().to_string();
        for (k, v) in [
            ("AWS_LAMBDA_RUNTIME_API", api.to_string()),
            ("_HANDLER", spec.handler.clone()),
            ("LAMBDA_TASK_ROOT", task.clone()),
            ("LAMBDA_RUNTIME_DIR", task.clone()),
            ("PYTHONPATH", task.clone()),
            ("HOME", tmp.display().to_string()),
            ("TMPDIR", tmp.display().to_string()),
            ("AWS_LAMBDA_FUNCTION_NAME", spec.name.clone()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                spec.memory_mb.to_string(),
            ),
            ("AWS_REGION", spec.region.clone()),
            ("AWS_DEFAULT_REGION", spec.region.clone()),
            ("AWS_EXECUTION_ENV", format!("AWS_Lambda_{}", spec.runtime)),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{}", spec.name),
            ),
            (
                "AWS_LAMBDA_LOG_STREAM_NAME",
                format!("2026/01/01/[$LATEST]{stream}"),
            ),
            ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".into()),
            ("TZ", "UTC".into()),
            ("LANG", "en_US.UTF-8".into()),
        ] {
            env.insert(k.into(), v);
        }
        if let Some(c) = &spec.credentials {
            env.insert("AWS_ACCESS_KEY_ID".into(), c.access_key_id.clone());
            env.insert("AWS_SECRET_ACCESS_KEY".into(), c.secret_access_key.clone());
            env.insert("AWS_SESSION_TOKEN".into(), c.session_token.clone());
        }
        env
    }
}

/// Variables a function may not set (Lambda reserves them).
pub const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];
