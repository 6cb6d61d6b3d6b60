//! `sekisho`: a self-hosted, AWS IoT Core-compatible device gateway.

mod config;
mod init;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sekisho_broker::Broker;
use sekisho_gateway::{GatewayConfig, Shared, tls};
use tokio::net::TcpListener;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "sekisho",
    version,
    about = "A self-hosted, AWS IoT Core-compatible device gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// Data directory (registry, CAs, AWS CLI profiles); created on first start.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the gateway.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on (repeatable); default: loopback.
        #[arg(long)]
        bind: Vec<std::net::IpAddr>,
        /// MQTT over TLS port.
        #[arg(long)]
        mqtt_port: Option<u16>,
        /// Device HTTPS port.
        #[arg(long)]
        https_port: Option<u16>,
        /// Control-plane HTTPS port.
        #[arg(long)]
        api_port: Option<u16>,
        /// S3-compatible object store HTTPS port.
        #[arg(long)]
        s3_port: Option<u16>,
        /// Joins a cluster through these NATS servers (`nats://host:4222`, comma-separated);
        /// the rest of `[cluster]` keeps its defaults or the config file's values.
        #[arg(long, value_name = "URL")]
        cluster: Option<String>,
    },
    /// Manages accounts.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Looks at a cluster (docs/cluster.md).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Lists the nodes that answer within a second: connections, sessions, subscriptions,
    /// retained messages and their traffic with the other nodes.
    Status {
        /// A NATS server of the cluster (`nats://host:4222`).
        #[arg(long)]
        cluster: String,
        /// The cluster's name (`[cluster] name`).
        #[arg(long, default_value = "sekisho")]
        name: String,
        /// Prints the nodes' answers as JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AccountCommand {
    /// Creates an account and its AWS CLI profile.
    Create {
        /// Account (and profile) name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Lists accounts.
    List {
        #[command(flatten)]
        common: Common,
    },
}

fn load_config(common: &Common) -> anyhow::Result<Config> {
    let mut c = match &common.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(d) = &common.data_dir {
        c.data_dir = Some(d.clone());
    }
    Ok(c)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sekisho: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            common,
            bind,
            mqtt_port,
            https_port,
            api_port,
            s3_port,
            cluster,
        } => {
            let mut config = load_config(&common)?;
            if !bind.is_empty() {
                config.bind = bind;
            }
            if let Some(p) = mqtt_port {
                config.ports.mqtt = p;
            }
            if let Some(p) = https_port {
                config.ports.https = p;
            }
            if let Some(p) = api_port {
                config.ports.api = p;
            }
            if let Some(p) = s3_port {
                config.ports.s3 = p;
            }
            if let Some(url) = cluster {
                match &mut config.cluster {
                    Some(c) => c.url = url,
                    None => {
                        config.cluster = Some(config::ClusterConfig {
                            url,
                            name: "sekisho".into(),
                            replicas: 1,
                            node: None,
                            isolation_seconds: 30,
                            snapshot_every: 1000,
                            log_keep_seconds: 3600,
                            code_bytes_per_account: config::default_code_bytes_per_account(),
                        })
                    }
                }
            }
            config.validate()?;
            init_logging(&config.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let again = rt.block_on(serve(config))?;
            rt.shutdown_timeout(Duration::from_secs(2));
            if again {
                return Err(start_again());
            }
            Ok(())
        }
        Command::Cluster {
            command:
                ClusterCommand::Status {
                    cluster,
                    name,
                    json,
                },
        } => {
            init_logging("warn");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let nodes = rt.block_on(sekisho_cluster::status(
                &cluster,
                &name,
                Duration::from_secs(1),
            ))?;
            if json {
                for n in &nodes {
                    println!("{n}");
                }
            } else {
                println!(
                    "NODE\tCONNECTIONS\tSESSIONS\tSUBSCRIPTIONS\tRETAINED\tSENT\tRECEIVED\tSEND_DROPPED\tSLOW_CONSUMER\tUPTIME_S\tREGISTRY_POSITION"
                );
                for n in &nodes {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        n["node"].as_str().unwrap_or("?"),
                        n["connections"],
                        n["sessions"],
                        n["subscriptions"],
                        n["retained"],
                        n["sent"],
                        n["received"],
                        n["send_dropped"],
                        n["slow_consumer"],
                        n["uptime_seconds"],
                        n["registry_position"],
                    );
                }
            }
            anyhow::ensure!(!nodes.is_empty(), "no node of cluster {name} answered");
            Ok(())
        }
        Command::Account { command } => match command {
            AccountCommand::Create { name, common } => {
                let mut config = load_config(&common)?;
                init_logging("warn");
                let (layout, material) = init::open(&config)?;
                // The profile points at the control plane of the server using this directory
                // (it records its port at start), else at the configured one.
                let recorded = |name: &str| {
                    std::fs::read_to_string(layout.path(name))
                        .ok()
                        .and_then(|p| p.trim().parse().ok())
                };
                if let Some(port) = recorded("api.port") {
                    config.ports.api = port;
                }
                if let Some(port) = recorded("https.port") {
                    config.ports.https = port;
                }
                if let Some(port) = recorded("s3.port") {
                    config.ports.s3 = port;
                }
                let (info, key) = material.registry.create_account(&name)?;
                init::write_profile(&layout, &config, &info, &key)?;
                println!(
                    "account {} ({}) created; profile {name} added to {}",
                    info.id,
                    name,
                    layout.path("aws/config").display()
                );
                Ok(())
            }
            AccountCommand::List { common } => {
                let config = load_config(&common)?;
                init_logging("warn");
                let (_, material) = init::open(&config)?;
                for a in material.registry.accounts() {
                    println!(
                        "{}\t{}\t{}-ats.{}",
                        a.id,
                        a.name,
                        a.endpoint_prefix,
                        config.data_suffix()
                    );
                }
                Ok(())
            }
        },
    }
}

/// The machine's name, for the default cluster node name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sekisho".into())
}

async fn bind_all(
    bind: &[std::net::IpAddr],
    port: u16,
    what: &str,
) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for ip in bind {
        let addr = SocketAddr::new(*ip, port);
        match TcpListener::bind(addr).await {
            Ok(l) => out.push(l),
            // IPv6 loopback may be missing on some hosts; the default list tolerates that.
            Err(e) if ip.is_ipv6() && ip.is_loopback() && bind.len() > 1 => {
                tracing::warn!(%addr, error = %e, "{what}: IPv6 loopback unavailable; skipped");
            }
            Err(e) => return Err(e).with_context(|| format!("{what}: binding {addr}")),
        }
    }
    Ok(out)
}

/// Replaces this process with a new run of the same command (same arguments, environment and
/// process id), for a node that must start again to catch up with its cluster. Returns only
/// if that fails.
fn start_again() -> anyhow::Error {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => return anyhow::Error::new(e).context("starting again: this program's path"),
        };
        let e = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec();
        anyhow::Error::new(e).context("starting again")
    }
    #[cfg(not(unix))]
    anyhow::anyhow!(
        "this node must be started again (it cannot catch up with its cluster otherwise)"
    )
}

/// Serves until a signal (false) or until the cluster says this node must start again (true).
async fn serve(config: Config) -> anyhow::Result<bool> {
    let (layout, material) = init::open(&config)?;
    // Written alone, a replica would differ from the cluster's registry without anything
    // noticing when it rejoined.
    anyhow::ensure!(
        config.cluster.is_some() || material.registry.log_position() == 0,
        "{} is a replica of a cluster's registry log (entry {}): serve it with [cluster] (or \
         --cluster), or move it away to start a single node afresh",
        layout.path("registry.db").display(),
        material.registry.log_position()
    );
    std::fs::write(layout.path("api.port"), config.ports.api.to_string())
        .context("recording the control-plane port")?;
    std::fs::write(layout.path("https.port"), config.ports.https.to_string())
        .context("recording the device HTTPS port")?;
    std::fs::write(layout.path("s3.port"), config.ports.s3.to_string())
        .context("recording the S3 port")?;
    let store = Arc::new(
        sekisho_s3::store::Store::open(&layout.path("s3")).context("opening the object store")?,
    );
    let registry = Arc::new(material.registry);
    let cluster_config = config.cluster.as_ref().map(|c| sekisho_cluster::Config {
        url: c.url.clone(),
        name: c.name.clone(),
        replicas: c.replicas,
        isolation: Duration::from_secs(c.isolation_seconds.max(1)),
        snapshot_every: c.snapshot_every,
        log_keep: Duration::from_secs(c.log_keep_seconds),
        code_bytes_per_account: c.code_bytes_per_account,
        node: c
            .node
            .clone()
            .unwrap_or_else(|| format!("{}:{}", hostname(), config.ports.mqtt)),
    });
    // Persistent sessions, their QoS 1 messages and retained messages survive a restart; in a
    // cluster, sessions are in the cluster's sessions stream (another node resumes them if
    // this one dies).
    let mut retained_link = None;
    let broker = {
        let mut storage = sekisho_store::SqliteStorage::open(&layout.path("broker.db"))
            .context("opening the broker's storage")?;
        let (journal, snapshot) = match &cluster_config {
            Some(c) => {
                let (storage, snapshot) = sekisho_cluster::session_storage(c, storage).await?;
                retained_link = Some(storage.retained_link());
                (sekisho_broker::durable::Journal::start(storage), snapshot)
            }
            None => {
                let snapshot = {
                    use sekisho_broker::durable::Storage as _;
                    storage.load().context("loading the broker's storage")?
                };
                (sekisho_broker::durable::Journal::start(storage), snapshot)
            }
        };
        let (sessions, retained) = (snapshot.sessions.len(), snapshot.retained.len());
        let broker = Broker::durable(
            config.limits.broker(),
            journal,
            snapshot,
            sekisho_broker::durable::WallClock::read(),
        );
        tracing::info!(sessions, retained, "broker state loaded");
        Arc::new(broker)
    };
    // In a cluster, before any listener: the retained messages of the cluster are read and
    // the subscriptions loaded from storage are announced before a client connects.
    let cluster = match &cluster_config {
        Some(c) => Some(
            sekisho_cluster::start(c, broker.clone(), &retained_link.unwrap_or_default()).await?,
        ),
        None => None,
    };
    if let Some(c) = &cluster {
        sekisho_cluster::join_registry(c, registry.clone(), &layout.path("")).await?;
        if registry.is_empty() {
            // The cluster's first node, with nothing to seed it: the default account, made
            // through the log (a node that raced it to this finds it there).
            match registry.create_account("default") {
                Ok((info, _)) => {
                    tracing::info!(account = %info.id, "created the default account")
                }
                Err(sekisho_registry::RegistryError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e).context("creating the default account"),
            }
        }
    }
    // Profiles follow the ports this run listens on.
    for account in registry.accounts() {
        if let Some(key) = registry
            .access_keys_of(&account.id)
            .into_iter()
            .find(|k| k.status == "Active")
        {
            init::write_profile(&layout, &config, &account, &key)?;
        }
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let tls = Arc::new(tls::TlsConfigs::new(
        registry.clone(),
        broker.clone(),
        &material.server_chain,
        &material.server_key,
    )?);
    let gateway_config = GatewayConfig {
        aws: Default::default(),
        codec_limits: Default::default(),
        sni: tls::SniRouter {
            data_suffix: config.data_suffix(),
            default_names: config.default_server_names.clone(),
        },
        handshake_timeout: Duration::from_secs(10),
        object_store_url: Some(config.object_store_url()),
    };
    let shared = Shared::new(
        registry.clone(),
        broker.clone(),
        gateway_config,
        shutdown_rx.clone(),
    );
    // Device connections run on one single-threaded runtime per core (ConnThreads).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = shared
        .threads
        .set(sekisho_gateway::ConnThreads::start(cores)?);
    let device_ca = Arc::new(material.device_ca);
    let _ = shared.device_ca.set(device_ca.clone());
    // One function host for the lambda API and the custom authorizers of device connections.
    let invoker = sekisho_functions::Invoker::new(
        sekisho_functions::Host::new(sekisho_functions::Config {
            dir: layout.path("functions"),
            python: config.functions.python.clone(),
            node_ric: config.functions.node_ric.clone(),
            max_instances: config.functions.max_instances,
            max_per_function: config.functions.max_per_function,
            max_per_account: config.functions.max_per_account,
            // Off unless turned on; on, for every account or the ones named.
            accounts: match (
                &config.functions.enabled,
                config.functions.accounts.is_empty(),
            ) {
                (false, _) => Some(Default::default()),
                (true, true) => None,
                (true, false) => Some(config.functions.accounts.iter().cloned().collect()),
            },
            // The SDKs in functions call Sekisho, trusting its CA.
            env: std::collections::BTreeMap::from([
                (
                    "AWS_ENDPOINT_URL".to_string(),
                    format!("https://localhost:{}", config.ports.api),
                ),
                (
                    "AWS_CA_BUNDLE".to_string(),
                    layout.path("ca.pem").display().to_string(),
                ),
            ]),
            authorizer_min_seconds: config.functions.authorizer_min_seconds,
        }),
        registry.clone(),
    );
    let _ = shared.functions.set(invoker.clone());
    if let Some(c) = &cluster {
        invoker
            .host
            .set_share(Arc::new(SharedCode(c.shared_code())));
        let _ = shared.claims.set(c.claims.clone());
        c.claims
            .set_orphans(Arc::new(sekisho_gateway::conn::Orphans(shared.clone())));
    }
    let oidc_keys = Arc::new(sekisho_api::OidcKeys::new(
        config
            .oidc_providers
            .iter()
            .map(|p| (p.url.clone(), p.jwks_file.clone())),
    ));
    for p in &config.oidc_providers {
        let name = sekisho_registry::oidc_provider_name(&p.url)?;
        anyhow::ensure!(
            oidc_keys.of(&name).is_some(),
            "oidc_providers: no usable key in {} for {}",
            p.jwks_file.display(),
            p.url
        );
    }
    let api_state = Arc::new(sekisho_api::ApiState {
        registry: registry.clone(),
        broker: broker.clone(),
        device_ca,
        endpoints: sekisho_api::Endpoints {
            region: config.region.clone(),
            domain: config.domain.clone(),
        },
        objects: Some(store.clone()),
        metrics_allow: config.metrics_allow.clone(),
        functions: Some(invoker.clone()),
        oidc_keys,
        more_metrics: cluster
            .clone()
            .map(|c| Arc::new(move || c.metrics()) as Arc<sekisho_api::MoreMetrics>),
    });

    let limits = config.limits.clone();
    let s3_state = Arc::new(sekisho_s3::S3State {
        registry: registry.clone(),
        store: store.clone(),
        endpoints: sekisho_s3::Endpoints {
            region: config.region.clone(),
            domain: config.domain.clone(),
        },
        max_uploads: Box::new(move |account| limits.multipart_uploads_of(account)),
    });

    let mut tasks = tokio::task::JoinSet::new();
    let mqtt = Arc::new(config.default_endpoint("mqtt"));
    for l in bind_all(&config.bind, config.ports.mqtt, "MQTT").await? {
        tasks.spawn(sekisho_gateway::serve_mqtt_tls(
            shared.clone(),
            l,
            tls.clone(),
            mqtt.clone(),
        ));
    }
    // The device HTTPS port also answers to the Cognito API's own name, for the SDKs'
    // Cognito credential providers (they build `cognito-identity.<region>.<domain>` and dial
    // 443): the Cognito API only, nothing else of the control plane.
    let https = config.default_endpoint("https");
    let cognito = if config.cognito_on_device_port {
        let api_state = api_state.clone();
        Some(Arc::new(sekisho_gateway::Handover {
            names: vec![config.cognito_host()],
            tls: tls.service(https.tls_policy)?,
            serve: Box::new(move |stream, peer| {
                Box::pin(sekisho_api::serve_handed_over(
                    api_state.clone(),
                    stream,
                    peer,
                    sekisho_api::Front::Cognito,
                ))
            }),
        }))
    } else {
        None
    };
    let https = Arc::new(sekisho_gateway::Endpoint {
        client_cert_optional: true,
        handover: cognito,
        ..https
    });
    for l in bind_all(&config.bind, config.ports.https, "device HTTPS").await? {
        tasks.spawn(sekisho_gateway::serve_device_https(
            shared.clone(),
            l,
            tls.clone(),
            https.clone(),
        ));
    }
    for e in &config.endpoints {
        let endpoint = Arc::new(config.endpoint(e));
        let bind = if e.bind.is_empty() {
            &config.bind
        } else {
            &e.bind
        };
        for l in bind_all(bind, e.port, &format!("endpoint {}", e.name)).await? {
            match e.protocol {
                config::Protocol::Mqtt => tasks.spawn(sekisho_gateway::serve_mqtt_tls(
                    shared.clone(),
                    l,
                    tls.clone(),
                    endpoint.clone(),
                )),
                config::Protocol::Https => tasks.spawn(sekisho_gateway::serve_device_https(
                    shared.clone(),
                    l,
                    tls.clone(),
                    endpoint.clone(),
                )),
            };
        }
        tracing::info!(endpoint = %e.name, port = e.port, private = endpoint.private.is_some(), tls_policy = endpoint.tls_policy.name(), "extra device endpoint");
    }
    for l in bind_all(&config.bind, config.ports.api, "control plane").await? {
        tasks.spawn(sekisho_api::serve(
            api_state.clone(),
            l,
            tls.plain(),
            shutdown_rx.clone(),
        ));
    }
    for l in bind_all(&config.bind, config.ports.s3, "S3").await? {
        tasks.spawn(sekisho_s3::serve(
            s3_state.clone(),
            l,
            tls.plain(),
            shutdown_rx.clone(),
        ));
    }
    {
        // Accounts made by `sekisho account create` while this server runs are served within
        // a couple of seconds, with profiles pointing at this run's ports.
        let (registry, layout, config, mut shutdown) = (
            registry.clone(),
            layout.clone(),
            config.clone(),
            shutdown_rx.clone(),
        );
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                match registry.load_new_accounts() {
                    Ok(new) => {
                        for (info, key) in new {
                            tracing::info!(account = %info.id, name = %info.name, "account created by another process; now served");
                            if let Err(e) = init::write_profile(&layout, &config, &info, &key) {
                                tracing::warn!(error = %e, "writing the profile failed");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "checking for new accounts failed"),
                }
            }
        });
    }
    tasks.spawn(sekisho_gateway::follow_changes(shared.clone()));
    tasks.spawn(sekisho_gateway::recheck_connections(shared.clone()));
    tasks.spawn(expire_uploads(
        store.clone(),
        config.limits.multipart_upload_days,
        shutdown_rx.clone(),
    ));
    tasks.spawn(sekisho_gateway::sweep_sessions(shared.clone()));

    let default = registry.accounts().into_iter().next();
    let endpoint = default
        .as_ref()
        .map(|a| format!("{}-ats.{}", a.endpoint_prefix, config.data_suffix()))
        .unwrap_or_default();
    let dir = layout.dir.display();
    println!("Sekisho is running (data directory {dir})");
    println!(
        "  MQTT over TLS   {endpoint}:{}  (trust {dir}/ca.pem)",
        config.ports.mqtt
    );
    println!(
        "  Device HTTPS    https://{endpoint}:{}/topics/<topic>  (client certificate)",
        config.ports.https
    );
    println!(
        "  Control plane   https://localhost:{}  (GET /health, /metrics)",
        config.ports.api
    );
    println!(
        "  S3              https://localhost:{}  (path style; virtual-hosted: <bucket>.{})",
        config.ports.s3,
        config.s3_host()
    );
    if let Some(a) = &default {
        println!("  Default account {}", a.id);
    }
    println!(
        "  AWS CLI:        AWS_CONFIG_FILE={dir}/aws/config AWS_SHARED_CREDENTIALS_FILE={dir}/aws/credentials aws --profile sekisho iot list-things"
    );
    tracing::info!(mqtt = config.ports.mqtt, api = config.ports.api, %endpoint, "ready");

    let again = match &cluster {
        Some(c) => tokio::select! {
            _ = wait_for_signal() => false,
            _ = c.restart_needed() => true,
        },
        None => {
            wait_for_signal().await;
            false
        }
    };
    if again {
        tracing::warn!("shutting down to start again from the cluster's latest registry snapshot");
    } else {
        tracing::info!("shutting down");
    }
    let _ = shutdown_tx.send(true);
    broker.shutdown();
    // Connections send their DISCONNECT, close, and record what they leave (their sessions,
    // unacknowledged deliveries, delayed wills) before the journal closes: at most 5 s (a
    // connection stuck writing to a dead peer is not waited for longer).
    tokio::time::sleep(Duration::from_millis(50)).await;
    shared.wait_idle(Duration::from_secs(5)).await;
    // In a cluster, the claims those connections ended are stored: no other node takes them
    // for a dead node's connections.
    if let Some(c) = &cluster {
        c.claims.settle(Duration::from_secs(2)).await;
        c.leave().await;
    }
    tasks.abort_all();
    // What the connections recorded as they closed is committed before the process ends.
    if let Some(j) = broker.journal() {
        // In a cluster, what NATS does not take within 5 s is given up.
        sekisho_cluster::sessions::shutting_down(Duration::from_secs(5));
        // Blocks until the journal's last commit is done, which in a cluster waits on NATS:
        // off this runtime's workers, so the runtime goes on driving NATS's I/O meanwhile.
        tokio::task::block_in_place(|| j.close());
    }
    registry.flush()?;
    tracing::info!("stopped");
    Ok(again)
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Aborts multipart uploads left unfinished for `days` days, at start and every hour.
async fn expire_uploads(
    store: Arc<sekisho_s3::store::Store>,
    days: u32,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let cutoff = sekisho_registry::now_secs() - f64::from(days) * 86_400.0;
        let store = store.clone();
        let n = tokio::task::spawn_blocking(move || store.expire_uploads(cutoff))
            .await
            .unwrap_or(0);
        if n > 0 {
            tracing::info!(uploads = n, days, "unfinished multipart uploads expired");
        }
    }
}

/// The cluster's shared function code, as the functions host asks for it.
struct SharedCode(sekisho_cluster::code::SharedCode);

/// A call on the share, in the host's terms.
fn share_call<T>(
    call: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> sekisho_functions::ShareFuture<T> {
    Box::pin(async move {
        call.await.map_err(|e| {
            if e.is::<sekisho_cluster::code::QuotaExceeded>() {
                std::io::Error::new(std::io::ErrorKind::QuotaExceeded, e.to_string())
            } else {
                std::io::Error::other(e)
            }
        })
    })
}

impl sekisho_functions::CodeShare for SharedCode {
    fn put(
        &self,
        account: &str,
        sha: &str,
        zip: bytes::Bytes,
    ) -> sekisho_functions::ShareFuture<()> {
        let (share, account, sha) = (self.0.clone(), account.to_owned(), sha.to_owned());
        share_call(async move { share.put(&account, &sha, zip).await })
    }

    fn get(
        &self,
        account: &str,
        sha: &str,
        limit: usize,
    ) -> sekisho_functions::ShareFuture<Option<bytes::Bytes>> {
        let (share, account, sha) = (self.0.clone(), account.to_owned(), sha.to_owned());
        share_call(async move { share.get(&account, &sha, limit).await })
    }

    fn sweep(
        &self,
        account: &str,
        keep: std::collections::BTreeSet<String>,
        older_than: Duration,
    ) -> sekisho_functions::ShareFuture<usize> {
        let (share, account) = (self.0.clone(), account.to_owned());
        share_call(async move { share.sweep(&account, &keep, older_than).await })
    }
}
