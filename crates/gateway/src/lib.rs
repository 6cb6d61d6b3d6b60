//! The Device Gateway: listeners, the authenticator (TLS client certificates against the
//! registry), the authorizer (policies per connection) and the MQTT connection driver that
//! feeds the broker.
//!
//! Data flow of one connection: TCP accept → ClientHello (SNI chooses the account) →
//! handshake with [`tls::RegistryVerifier`] (registered and ACTIVE, or `certificate_unknown`)
//! → CONNECT → [`authz::Principal`] (thing association, policies bound) → `iot:Connect` →
//! broker session → every PUBLISH/SUBSCRIBE/delivery checked.

#![warn(missing_docs)]

pub use sekisho_auth::authz::PrivateEndpoint;
pub use sekisho_auth::http::{BODY_DEADLINE, BodyError, HEADER_DEADLINE, accept, read_body};
pub use sekisho_auth::{authn, authz};

pub mod conn;
pub mod custom_auth;
pub mod events;
pub mod https;
pub mod jobs;
pub mod provision;
pub mod shadow;
pub mod tls;
pub mod tls_io;
pub mod ws;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sekisho_broker::aws::AwsLimits;
use sekisho_broker::{Broker, Kick};
use sekisho_mqtt::Limits;
use sekisho_registry::{AccountId, CaStatus, CertStatus, CertificateId, Change, Registry};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// AWS IoT quotas.
    pub aws: AwsLimits,
    /// Codec limits.
    pub codec_limits: Limits,
    /// SNI routing.
    pub sni: tls::SniRouter,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// The object store's URL as devices reach it (`https://host:port`), for the presigned
    /// URLs of job documents; `None`: placeholders stay as they are.
    pub object_store_url: Option<String>,
}

/// What a device listener is: its TLS security policy, whether it is a private endpoint, and
/// its connection cap.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// A name for logs.
    pub name: String,
    /// TLS versions offered.
    pub tls_policy: tls::TlsPolicy,
    /// Set for a private endpoint: connections carry `aws:SourceVpce`, `aws:SourceVpc` and
    /// `aws:VpcSourceIp` instead of `aws:SourceIp`, and keep-alive is capped at 230 s.
    pub private: Option<PrivateEndpoint>,
    /// Most concurrent connections through this endpoint (AWS: 100,000 per VPC endpoint).
    pub max_connections: usize,
    /// Device HTTPS: clients without a certificate may connect and sign their requests with
    /// SigV4 (`aws iot-data`). Never set for MQTT listeners.
    pub client_cert_optional: bool,
    /// The connection slots, shared by all of the endpoint's listeners (one per bound
    /// address), `max_connections` of them.
    pub slots: Arc<Semaphore>,
    /// Device HTTPS only: server names this listener hands over to another front end.
    pub handover: Option<Arc<Handover>>,
}

/// A future that serves one handed-over connection.
pub type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Server names a device HTTPS listener does not serve itself but hands over, the TLS
/// handshake done with its own configuration, to another front end: AWS's service host names
/// (`cognito-identity.<region>.amazonaws.com`) that SDKs build themselves and dial on 443,
/// the device port, so that one address serves them as AWS's front doors do.
pub struct Handover {
    /// The server names, lower case.
    pub names: Vec<String>,
    /// The TLS configuration for them: the server's certificate, no client certificate.
    pub tls: Arc<rustls::ServerConfig>,
    /// Serves one connection handed over, until it ends.
    pub serve: Box<dyn Fn(DeviceStream, std::net::SocketAddr) -> Serving + Send + Sync>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("names", &self.names)
            .finish()
    }
}

impl Handover {
    /// Whether `server_name` is handed over (DNS names are case-insensitive; a trailing dot
    /// names the same host).
    pub fn serves(&self, server_name: &str) -> bool {
        let name = server_name.trim_end_matches('.');
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

impl Endpoint {
    /// A public endpoint with the default TLS policy.
    pub fn public(name: &str, max_connections: usize) -> Endpoint {
        Endpoint {
            name: name.to_owned(),
            tls_policy: tls::TlsPolicy::default(),
            private: None,
            max_connections,
            client_cert_optional: false,
            slots: Arc::new(Semaphore::new(max_connections)),
            handover: None,
        }
    }
}

/// Keep-alive ceiling on private endpoints (AWS: 230 s on VPC endpoints).
pub use sekisho_session::PRIVATE_KEEP_ALIVE_MAX;

/// (account, certificate id) → the connections (client id, epoch) authenticated with it.
/// Live connections by (account, certificate id or access key id): the IAM caller behind them
/// (MQTT over WebSocket), and their (client id, epoch).
type ConnIndex = HashMap<(String, String), IndexEntry>;

#[derive(Default)]
struct IndexEntry {
    caller: Option<Arc<authn::Caller>>,
    conns: HashSet<(String, u64)>,
}

/// State shared by every connection.
pub struct Shared {
    /// The registry.
    pub registry: Arc<Registry>,
    /// The broker.
    pub broker: Arc<Broker>,
    /// Settings.
    pub config: GatewayConfig,
    /// Flips to true at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// What every MQTT session is configured with (from `config`).
    pub session: Arc<sekisho_session::Config>,
    /// The Device Shadow service.
    pub shadows: shadow::Shadows,
    /// Presigned URLs for job documents.
    pub presigner: jobs::Presigner,
    /// Device jobs requests per thing.
    pub jobs_limiter: jobs::Limiter,
    /// The CA that issues device certificates (fleet provisioning), once set.
    pub device_ca: std::sync::OnceLock<Arc<sekisho_pki::Ca>>,
    /// Fleet provisioning's certificate ownership tokens.
    pub tokens: provision::Tokens,
    /// RSA keys generated ahead for CreateKeysAndCertificate over MQTT.
    pub keys: Arc<provision::KeyPool>,
    /// The threads device connections run on (unset: the caller's runtime).
    pub threads: std::sync::OnceLock<Arc<ConnThreads>>,
    /// The function host's invoker (custom authorizers), once set.
    pub functions: std::sync::OnceLock<Arc<sekisho_functions::Invoker>>,
    /// In cluster mode: who owns each client id across the cluster.
    pub claims: std::sync::OnceLock<Arc<dyn sekisho_broker::peers::Claims>>,
    /// MQTT connections being served (from CONNECT to the end of their bookkeeping).
    live: std::sync::atomic::AtomicUsize,
    by_cert: Mutex<ConnIndex>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// New shared state.
    pub fn new(
        registry: Arc<Registry>,
        broker: Arc<Broker>,
        config: GatewayConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Shared> {
        let session = Arc::new(sekisho_session::Config {
            aws: config.aws,
            codec: config.codec_limits,
            ..sekisho_session::Config::default()
        });
        Arc::new(Shared {
            shadows: shadow::Shadows::start(registry.clone(), broker.clone()),
            presigner: jobs::Presigner::default(),
            jobs_limiter: jobs::Limiter::default(),
            device_ca: std::sync::OnceLock::new(),
            tokens: provision::Tokens::default(),
            keys: Arc::new(provision::KeyPool::default()),
            registry,
            broker,
            session,
            threads: std::sync::OnceLock::new(),
            functions: std::sync::OnceLock::new(),
            claims: std::sync::OnceLock::new(),
            config,
            shutdown,
            by_cert: Mutex::new(HashMap::new()),
            live: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Counts an MQTT connection as served until the guard drops.
    pub(crate) fn serving(self: &Arc<Self>) -> LiveGuard {
        self.live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        LiveGuard(self.clone())
    }

    /// Waits (polling, at shutdown) until no MQTT connection is being served, or `limit` has
    /// passed: what the connections record as they close (their sessions, unacknowledged
    /// deliveries, delayed wills) then reaches the journal before it closes.
    pub async fn wait_idle(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.live.load(std::sync::atomic::Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn index_add(
        &self,
        account: &str,
        cert: &str,
        client: &str,
        epoch: u64,
        caller: Option<&authn::Caller>,
    ) {
        let mut m = self.by_cert.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry((account.to_owned(), cert.to_owned())).or_default();
        if e.caller.is_none() {
            e.caller = caller.map(|c| Arc::new(c.clone()));
        }
        e.conns.insert((client.to_owned(), epoch));
    }

    /// Whether `cert` has a connection of `client` in `account` now.
    pub(crate) fn connected_with(&self, account: &str, cert: &str, client: &str) -> bool {
        let m = self.by_cert.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(account.to_owned(), cert.to_owned()))
            .is_some_and(|e| e.conns.iter().any(|(c, _)| c == client))
    }

    pub(crate) fn index_remove(&self, account: &str, cert: &str, client: &str, epoch: u64) {
        let mut m = self.by_cert.lock().unwrap_or_else(|p| p.into_inner());
        let key = (account.to_owned(), cert.to_owned());
        if let Some(e) = m.get_mut(&key) {
            e.conns.remove(&(client.to_owned(), epoch));
            if e.conns.is_empty() {
                m.remove(&key);
            }
        }
    }

    /// Closes every connection authenticated with a certificate; returns how many.
    pub fn kick_certificate(&self, account: &str, cert: &str) -> usize {
        self.connections_of(account, cert)
            .into_iter()
            .filter(|(client, epoch)| {
                self.broker
                    .kick_connection(account, client, *epoch, Kick::Administrative)
            })
            .count()
    }

    /// The connections (client id, epoch) authenticated with a certificate.
    pub fn connections_of(&self, account: &str, cert: &str) -> Vec<(String, u64)> {
        let m = self.by_cert.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(account.to_owned(), cert.to_owned()))
            .map(|e| e.conns.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Re-checks what every live connection was authenticated with: a certificate must still
    /// be ACTIVE with its CA ACTIVE; IAM credentials must still exist, be active and unexpired,
    /// and stand for the same user or role (by unique id). Cuts the connections of those that
    /// no longer hold; returns how many were cut.
    pub fn recheck(&self) -> usize {
        type Entry = ((String, String), Option<Arc<authn::Caller>>);
        let entries: Vec<Entry> = {
            let m = self.by_cert.lock().unwrap_or_else(|p| p.into_inner());
            m.iter()
                .map(|(k, e)| (k.clone(), e.caller.clone()))
                .collect()
        };
        let mut cut = 0;
        for ((account, id), caller) in entries {
            let why = match &caller {
                Some(c) => authn::still_valid(&self.registry, c)
                    .err()
                    .map(|e| e.to_string())
                    .or_else(|| {
                        (!authz::cognito_identity_exists(&self.registry, c))
                            .then(|| "its Cognito identity no longer exists".to_string())
                    }),
                None if id.starts_with(CUSTOM_KEY) => {
                    (!custom_still_valid(&self.registry, &account, &id))
                        .then(|| "its custom authorizer is no longer active".to_string())
                }
                None => self
                    .registry
                    .certificate_usable(
                        &AccountId::new(account.clone()),
                        &CertificateId::new(id.clone()),
                    )
                    .err()
                    .map(|e| e.to_string()),
            };
            if let Some(why) = why {
                let n = self.kick_certificate(&account, &id);
                if n > 0 {
                    tracing::info!(%account, principal = %id, %why, connections = n, "credentials no longer valid; connections closed");
                }
                cut += n;
            }
        }
        cut
    }
}

/// How a custom authorizer's connections are filed in the connection index: apart from
/// certificates and access keys (whose ids an authorizer's `principalId` could equal), by
/// authorizer incarnation and principal.
const CUSTOM_KEY: &str = "custom\n";

/// The key a connection's principal is filed under in the connection index: its certificate
/// id or access key id, or, for a custom authorizer's principal, [`CUSTOM_KEY`], the
/// authorizer's name and creation time (as bits) and the principal id, one per line.
pub(crate) fn index_key(p: &authz::Principal) -> String {
    match p.custom_authorizer() {
        Some((name, created)) => format!(
            "{CUSTOM_KEY}{name}\n{:x}\n{}",
            created.to_bits(),
            p.identity.principal.as_str()
        ),
        None => p.identity.principal.as_str().to_owned(),
    }
}

/// Whether a custom authorizer's connection (by its index key) still has its authorizer:
/// the same incarnation, ACTIVE.
fn custom_still_valid(registry: &sekisho_registry::Registry, account: &str, key: &str) -> bool {
    let Some(rest) = key.strip_prefix(CUSTOM_KEY) else {
        return false;
    };
    let mut parts = rest.splitn(3, '\n');
    let (Some(name), Some(created)) = (parts.next(), parts.next()) else {
        return false;
    };
    registry
        .authorizer(account, name)
        .is_ok_and(|a| a.active && format!("{:x}", a.created.to_bits()) == created)
}

/// How often live connections are re-checked when the registry changed ([`Shared::recheck`]).
pub const RECHECK_EVERY: Duration = Duration::from_millis(500);

/// Re-checks every live connection's credentials whenever the registry has changed (at most
/// every [`RECHECK_EVERY`]), and every 30 s regardless, so that neither a lagged change feed
/// nor a change that has no feed event (an access key deactivated, a role deleted) leaves a
/// connection open on credentials that no longer hold.
pub async fn recheck_connections(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(RECHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = shared.registry.generation();
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let generation = shared.registry.generation();
        if generation == seen && last_full.elapsed() < Duration::from_secs(30) {
            continue;
        }
        seen = generation;
        last_full = Instant::now();
        shared.recheck();
    }
}

/// Follows the registry's change feed: a certificate that leaves ACTIVE (or is deleted) has
/// its connections cut at once.
pub async fn follow_changes(shared: Arc<Shared>) {
    let mut rx = shared.registry.subscribe();
    let mut shutdown = shared.shutdown.clone();
    let mut notifier = jobs::Notifier::default();
    loop {
        let change = tokio::select! {
            c = rx.recv() => c,
            _ = shutdown.changed() => return,
        };
        match change {
            Ok(Change::Certificate {
                account,
                certificate_id,
                status,
            }) => {
                if status != Some(CertStatus::Active) {
                    let n = shared.kick_certificate(&account, &certificate_id);
                    if n > 0 {
                        tracing::info!(%account, certificate = %certificate_id, connections = n, "certificate no longer active; connections closed");
                    }
                }
            }
            Ok(Change::Event {
                account,
                topic,
                payload,
            }) => {
                let m = jobs::message_bytes(
                    topic,
                    bytes::Bytes::from(payload),
                    sekisho_mqtt::QoS::AtLeastOnce,
                );
                if let Ok(routed) = shared.broker.publish(&account, Arc::new(m), Instant::now()) {
                    // Events never wait for slow subscribers.
                    for b in routed.blocked {
                        shared.broker.give_up(&account, b.session, b.delivery);
                    }
                }
            }
            Ok(Change::JobExecutions { account, things }) => {
                for thing in things {
                    notifier.changed(&shared, &account, &thing);
                }
            }
            Ok(Change::CaCertificate {
                account,
                ca_certificate_id,
                status,
            }) => {
                if status != Some(CaStatus::Active) {
                    let n: usize = shared
                        .registry
                        .certificates_of_ca(&account, &ca_certificate_id)
                        .iter()
                        .map(|cert| shared.kick_certificate(&account, cert))
                        .sum();
                    if n > 0 {
                        tracing::info!(%account, ca = %ca_certificate_id, connections = n, "CA certificate no longer active; connections closed");
                    }
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                // Missed changes: re-check every connection now, and tell things what changed
                // in their pending jobs (missed registry events are lost).
                tracing::warn!(
                    missed = n,
                    "change feed lagged; re-checking every connection and pending jobs"
                );
                shared.recheck();
                notifier.catch_up(&shared);
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Schedules the delayed wills stored before a restart, then removes expired persistent
/// sessions every few seconds.
pub async fn sweep_sessions(shared: Arc<Shared>) {
    // Delayed wills stored before a restart are due again.
    conn::resume_wills(&shared);
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let n = shared.broker.sweep(Instant::now());
                if n > 0 {
                    tracing::debug!(sessions = n, "expired persistent sessions removed");
                }
                provision::sweep(&shared, sekisho_registry::now_secs());
                // Job executions past their timeouts (AWS: up to a minute late).
                let n = shared.registry.expire_job_executions(sekisho_registry::now_secs());
                if n > 0 {
                    tracing::debug!(executions = n, "job executions timed out");
                }
                // Scheduled jobs' starts and ends.
                let n = shared.registry.run_job_schedules(sekisho_registry::now_secs());
                if n > 0 {
                    tracing::debug!(jobs = n, "job schedules ran");
                }
                // Staged rollouts' next minute.
                let n = shared.registry.roll_out_jobs(sekisho_registry::now_secs());
                if n > 0 {
                    tracing::debug!(executions = n, "job rollouts went on");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// A device connection after its mutual-TLS handshake. Boxed: the TLS state (about 1.2 KB)
/// would otherwise be copied into several slots of every connection's task.
pub type DeviceStream = Box<tls_io::TlsIo>;

/// Accepts MQTT over mutual TLS on `listener` until shutdown.
pub async fn serve_mqtt_tls(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Arc<tls::TlsConfigs>,
    endpoint: Arc<Endpoint>,
) {
    accept_loop(shared, listener, tls, endpoint, true, conn::serve).await
}

/// Accepts device HTTPS (mutual TLS) on `listener` until shutdown.
pub async fn serve_device_https(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Arc<tls::TlsConfigs>,
    endpoint: Arc<Endpoint>,
) {
    // Device HTTPS stays on the main runtime: its requests may write the registry (the
    // credential provider) and wait for the disk, which would stall a device thread.
    accept_loop(shared, listener, tls, endpoint, false, https::serve).await
}

/// The accept loop of a device listener: connection limit, SNI routing, the mutual-TLS
/// handshake within a deadline, then `handler` with the authenticated connection.
async fn accept_loop<F, Fut>(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Arc<tls::TlsConfigs>,
    endpoint: Arc<Endpoint>,
    on_device_threads: bool,
    handler: F,
) where
    F: Fn(Arc<Shared>, DeviceStream, conn::ConnInfo) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // Handed-over names are served on the main runtime, never on a device thread.
    debug_assert!(!on_device_threads || endpoint.handover.is_none());
    let permits = endpoint.slots.clone();
    let mut shutdown = shared.shutdown.clone();
    while let Some((tcp, peer)) = accept(&listener, &mut shutdown).await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, endpoint = %endpoint.name, limit = endpoint.max_connections, "connection limit reached; refusing");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (shared, tls, handler, endpoint) = (
            shared.clone(),
            tls.clone(),
            handler.clone(),
            endpoint.clone(),
        );
        let threads = shared.threads.get().filter(|_| on_device_threads).cloned();
        let serve = async move |tcp: tokio::net::TcpStream| {
            let slot = Arc::new(permit);
            let deadline = shared.config.handshake_timeout;
            // The task keeps its size for the connection's life: the handshake's state (about
            // 2.8 KB) lives in its own allocation, freed when the handshake ends.
            let hs = Box::pin(handshake(&shared, &tls, &endpoint, tcp, peer));
            let (stream, account, certificate, server_name) =
                match tokio::time::timeout(deadline, hs).await {
                    Ok(Some(Shook::Device(stream, account, certificate, server_name))) => {
                        (stream, account, certificate, server_name)
                    }
                    Ok(Some(Shook::HandedOver(stream))) => {
                        if let Some(h) = &endpoint.handover {
                            (h.serve)(stream, peer).await;
                        }
                        drop(slot);
                        return;
                    }
                    _ => return,
                };
            handler(
                shared,
                stream,
                conn::ConnInfo {
                    peer,
                    account,
                    certificate,
                    endpoint,
                    caller: None,
                    slot: Some(slot),
                    custom: None,
                    server_name,
                },
            )
            .await;
        };
        match threads {
            // The socket moves to the reactor of the thread that serves it.
            Some(t) => match tcp.into_std() {
                Ok(std) => t.spawn(async move {
                    match tokio::net::TcpStream::from_std(std) {
                        Ok(tcp) => serve(tcp).await,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "could not take the connection over")
                        }
                    }
                }),
                Err(e) => tracing::warn!(%peer, error = %e, "could not hand the connection over"),
            },
            None => {
                tokio::spawn(serve(tcp));
            }
        }
    }
}

/// Counts a connection in [`Shared::wait_idle`] while it lives.
pub(crate) struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0
            .live
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Single-threaded runtimes, one per core, that MQTT connections run on (each connection on
/// one of them, round robin): a connection's socket, timers and task stay on one thread, and a
/// delivery wakes another thread only when its subscriber lives there. On a multi-threaded
/// runtime every wake-up could also wake an idle worker to steal work, which at realistic
/// rates (a message now and then per connection) cost more CPU than the messages themselves
/// (BENCHMARKS.md, issue 12).
pub struct ConnThreads {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for ConnThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnThreads")
            .field("threads", &self.handles.len())
            .finish()
    }
}

impl ConnThreads {
    /// Starts `n` threads (at least one), each running a single-threaded runtime until the
    /// process ends.
    pub fn start(n: usize) -> std::io::Result<Arc<ConnThreads>> {
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("devices-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        }
        Ok(Arc::new(ConnThreads {
            handles,
            next: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, f: F) {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(f);
    }
}

/// A device listener's connection after its TLS handshake.
enum Shook {
    /// A device's: its stream, account, certificate (if it presented one) and the server name
    /// it asked for (when it presented none).
    Device(
        DeviceStream,
        AccountId,
        Option<CertificateId>,
        Option<String>,
    ),
    /// For a server name the listener hands over ([`Endpoint::handover`]).
    HandedOver(DeviceStream),
}

async fn handshake(
    shared: &Shared,
    tls: &tls::TlsConfigs,
    endpoint: &Endpoint,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<Shook> {
    let mut chosen = None;
    let mut server_name = None;
    let mut handed_over = false;
    let choose = |hello: &rustls::server::ClientHello<'_>| {
        let sni = hello.server_name().map(str::to_owned);
        server_name.clone_from(&sni);
        if let (Some(h), Some(name)) = (&endpoint.handover, sni.as_deref())
            && h.serves(name)
        {
            handed_over = true;
            return Some(h.tls.clone());
        }
        let Some(target) = shared.config.sni.route(&shared.registry, sni.as_deref()) else {
            tracing::info!(%peer, sni = ?sni, "unknown server name; refusing");
            return None;
        };
        match tls.mtls(&target, endpoint.tls_policy, endpoint.client_cert_optional) {
            Ok((cfg, verifier)) => {
                chosen = Some((target, verifier));
                Some(cfg)
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS configuration failed");
                None
            }
        }
    };
    let stream = match tls_io::accept(tcp, choose).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
    };
    if handed_over {
        return Some(Shook::HandedOver(Box::new(stream)));
    }
    let (target, verifier) = chosen?;
    if stream.peer_certificates().is_none() {
        // Only on listeners where the certificate is optional: the requests authenticate
        // themselves (SigV4) or name a custom authorizer, which is told the server name. The
        // account is the server name's, if it named one.
        let account = match &target {
            tls::Target::Account(a) => AccountId::new(a.clone()),
            tls::Target::ByCertificate => AccountId::default(),
        };
        return endpoint
            .client_cert_optional
            .then(|| Shook::Device(Box::new(stream), account, None, server_name));
    };
    // The verifier asked the registry once, when the certificate arrived.
    let (account, certificate) = verifier.authenticated()?;
    Some(Shook::Device(
        Box::new(stream),
        account,
        Some(certificate),
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handover_serves_its_names_in_any_case_with_or_without_the_root_dot() {
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        let h = Handover {
            names: vec!["cognito-identity.us-east-1.amazonaws.com".into()],
            tls: Arc::new(tls),
            serve: Box::new(|_, _| Box::pin(async {})),
        };
        assert!(h.serves("cognito-identity.us-east-1.amazonaws.com"));
        assert!(h.serves("Cognito-Identity.US-EAST-1.amazonaws.com."));
        assert!(!h.serves("cognito-identity.us-west-2.amazonaws.com"));
        assert!(!h.serves("x.cognito-identity.us-east-1.amazonaws.com"));
        assert!(!h.serves("cognito-identity.us-east-1.amazonaws.com.evil"));
        assert!(!h.serves(""));
    }
}
