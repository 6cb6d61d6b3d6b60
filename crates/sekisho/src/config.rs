//! Configuration: a TOML file, then command-line flags on top. Parsed once into typed values.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

/// Ports of the listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    /// MQTT over mutual TLS.
    pub mqtt: u16,
    /// Device HTTPS (reserved for the HTTPS data plane).
    pub https: u16,
    /// Control plane (AWS APIs) and `/health`.
    pub api: u16,
    /// The S3-compatible object store.
    pub s3: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            mqtt: 8883,
            https: 8443,
            api: 9443,
            s3: 9444,
        }
    }
}

/// What an extra device listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// MQTT over mutual TLS.
    Mqtt,
    /// Device HTTPS (mutual TLS).
    Https,
}

/// The keys of an OpenID Connect issuer (`[[oidc_providers]]`): accounts that register the
/// issuer in IAM (CreateOpenIDConnectProvider) have its ID tokens verified with them; nothing
/// is fetched from the issuer. The file is read again when it changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcProviderConfig {
    /// The issuer URL, as tokens name it in `iss` and IAM registers it (`https://host[/path]`).
    pub url: String,
    /// A JWKS document (`{"keys": [...]}`) with the issuer's signing keys.
    pub jwks_file: PathBuf,
}

/// An extra device listener (`[[endpoints]]`): its own port, TLS security policy, and for a
/// private endpoint (AWS's VPC interface endpoint) the ids its connections carry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// A name for logs.
    pub name: String,
    /// Port.
    pub port: u16,
    /// Addresses; default: the top-level `bind`.
    #[serde(default)]
    pub bind: Vec<IpAddr>,
    /// `mqtt` (default) or `https`.
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// AWS TLS security policy name; default `IoTSecurityPolicy_TLS13_1_2_2022_10`.
    pub tls_policy: Option<String>,
    /// Makes the endpoint private: the `aws:SourceVpce` value (`vpce-...`).
    pub vpc_endpoint_id: Option<String>,
    /// The `aws:SourceVpc` value (`vpc-...`); required with `vpc_endpoint_id`.
    pub vpc_id: Option<String>,
    /// Most concurrent connections (default 100,000, AWS's per-endpoint cap).
    pub max_connections: Option<usize>,
}

fn default_protocol() -> Protocol {
    Protocol::Mqtt
}

/// What one account may keep (`[limits]`), by count and by bytes; `[limits.accounts.<id>]`
/// overrides any of them for one account. Defaults: `sekisho_broker::Quotas::default()` and
/// 1,000 multipart uploads in progress per account, which expire after 7 days.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Retained messages per account.
    pub retained_messages: usize,
    /// Bytes of an account's retained messages (topic and payload).
    pub retained_bytes: u64,
    /// MQTT sessions (connected or persisted) per account.
    pub sessions: usize,
    /// QoS 1 messages queued for one offline persistent session.
    pub offline_messages: usize,
    /// Bytes queued in all of an account's offline sessions.
    pub offline_bytes: u64,
    /// S3 multipart uploads in progress per account.
    pub multipart_uploads: usize,
    /// Days after which an unfinished multipart upload is aborted.
    pub multipart_upload_days: u32,
    /// PUBLISH packets a connection may send per second (AWS: 100; 0: no limit).
    pub publishes_per_connection: u32,
    /// Bytes a connection may send per second; beyond, reading waits (AWS: 512 KiB).
    pub bytes_per_connection: u32,
    /// CONNECT attempts per second per client id (AWS: 1).
    pub connects_per_client_id: u32,
    /// CONNECT attempts per second per account (AWS: 500).
    pub connects_per_account: u32,
    /// Subscriptions per second per account (AWS: 500).
    pub subscriptions_per_account: u32,
    /// Inbound publishes per second per account (AWS: 20,000).
    pub publishes_per_account: u32,
    /// Stored messages sent per second to a resumed persistent session, besides live traffic
    /// (AWS: 10).
    pub replay_per_second: u32,
    /// Stored messages of shared subscription groups sent per second to a member that comes
    /// back (AWS: 20).
    pub shared_replay_per_second: u32,
    /// Device Shadow requests per second per thing (AWS: 20).
    pub shadow_requests_per_thing: u32,
    /// Named shadows per thing (Sekisho's own bound: AWS sets none). As many deleted ones
    /// keep their versions; beyond that, the thing's deleted shadows are forgotten.
    pub named_shadows_per_thing: usize,
    /// Shadows an account may store, whatever their things (Sekisho's own bound).
    pub shadows_per_account: usize,
    /// Per-account overrides, by account id.
    pub accounts: std::collections::BTreeMap<String, AccountLimits>,
}

/// One account's overrides of [`Limits`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountLimits {
    /// See [`Limits::retained_messages`].
    pub retained_messages: Option<usize>,
    /// See [`Limits::retained_bytes`].
    pub retained_bytes: Option<u64>,
    /// See [`Limits::sessions`].
    pub sessions: Option<usize>,
    /// See [`Limits::offline_messages`].
    pub offline_messages: Option<usize>,
    /// See [`Limits::offline_bytes`].
    pub offline_bytes: Option<u64>,
    /// See [`Limits::multipart_uploads`].
    pub multipart_uploads: Option<usize>,
    /// See [`Limits::publishes_per_connection`].
    pub publishes_per_connection: Option<u32>,
    /// See [`Limits::bytes_per_connection`].
    pub bytes_per_connection: Option<u32>,
    /// See [`Limits::connects_per_client_id`].
    pub connects_per_client_id: Option<u32>,
    /// See [`Limits::connects_per_account`].
    pub connects_per_account: Option<u32>,
    /// See [`Limits::subscriptions_per_account`].
    pub subscriptions_per_account: Option<u32>,
    /// See [`Limits::publishes_per_account`].
    pub publishes_per_account: Option<u32>,
    /// See [`Limits::replay_per_second`].
    pub replay_per_second: Option<u32>,
    /// See [`Limits::shared_replay_per_second`].
    pub shared_replay_per_second: Option<u32>,
    /// See [`Limits::shadow_requests_per_thing`].
    pub shadow_requests_per_thing: Option<u32>,
    /// See [`Limits::named_shadows_per_thing`].
    pub named_shadows_per_thing: Option<usize>,
    /// See [`Limits::shadows_per_account`].
    pub shadows_per_account: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        let q = sekisho_broker::Quotas::default();
        let t = sekisho_broker::throttle::Throttles::default();
        Limits {
            publishes_per_connection: t.publishes_per_connection,
            bytes_per_connection: t.bytes_per_connection,
            connects_per_client_id: t.connects_per_client_id,
            connects_per_account: t.connects_per_account,
            subscriptions_per_account: t.subscriptions_per_account,
            publishes_per_account: t.publishes_per_account,
            replay_per_second: t.replay_per_second,
            shared_replay_per_second: t.shared_replay_per_second,
            shadow_requests_per_thing: t.shadow_requests_per_thing,
            retained_messages: q.retained_messages,
            retained_bytes: q.retained_bytes,
            sessions: q.sessions,
            offline_messages: q.offline_messages,
            offline_bytes: q.offline_bytes,
            named_shadows_per_thing: q.named_shadows_per_thing,
            shadows_per_account: q.shadows_per_account,
            multipart_uploads: 1000,
            multipart_upload_days: 7,
            accounts: Default::default(),
        }
    }
}

impl Limits {
    /// The broker's quotas: the defaults, and each account's own.
    pub fn broker(&self) -> sekisho_broker::BrokerConfig {
        let base = sekisho_broker::Quotas {
            retained_messages: self.retained_messages,
            retained_bytes: self.retained_bytes,
            sessions: self.sessions,
            offline_messages: self.offline_messages,
            offline_bytes: self.offline_bytes,
            named_shadows_per_thing: self.named_shadows_per_thing,
            shadows_per_account: self.shadows_per_account,
        };
        let account_quotas = self
            .accounts
            .iter()
            .map(|(id, a)| {
                (
                    id.clone(),
                    sekisho_broker::Quotas {
                        retained_messages: a.retained_messages.unwrap_or(base.retained_messages),
                        retained_bytes: a.retained_bytes.unwrap_or(base.retained_bytes),
                        sessions: a.sessions.unwrap_or(base.sessions),
                        offline_messages: a.offline_messages.unwrap_or(base.offline_messages),
                        offline_bytes: a.offline_bytes.unwrap_or(base.offline_bytes),
                        named_shadows_per_thing: a
                            .named_shadows_per_thing
                            .unwrap_or(base.named_shadows_per_thing),
                        shadows_per_account: a
                            .shadows_per_account
                            .unwrap_or(base.shadows_per_account),
                    },
                )
            })
            .collect();
        let rates = sekisho_broker::throttle::Throttles {
            publishes_per_connection: self.publishes_per_connection,
            bytes_per_connection: self.bytes_per_connection,
            connects_per_client_id: self.connects_per_client_id,
            connects_per_account: self.connects_per_account,
            subscriptions_per_account: self.subscriptions_per_account,
            publishes_per_account: self.publishes_per_account,
            replay_per_second: self.replay_per_second,
            shared_replay_per_second: self.shared_replay_per_second,
            shadow_requests_per_thing: self.shadow_requests_per_thing,
        };
        let account_throttles = self
            .accounts
            .iter()
            .map(|(id, a)| {
                (
                    id.clone(),
                    sekisho_broker::throttle::Throttles {
                        publishes_per_connection: a
                            .publishes_per_connection
                            .unwrap_or(rates.publishes_per_connection),
                        bytes_per_connection: a
                            .bytes_per_connection
                            .unwrap_or(rates.bytes_per_connection),
                        connects_per_client_id: a
                            .connects_per_client_id
                            .unwrap_or(rates.connects_per_client_id),
                        connects_per_account: a
                            .connects_per_account
                            .unwrap_or(rates.connects_per_account),
                        subscriptions_per_account: a
                            .subscriptions_per_account
                            .unwrap_or(rates.subscriptions_per_account),
                        publishes_per_account: a
                            .publishes_per_account
                            .unwrap_or(rates.publishes_per_account),
                        replay_per_second: a.replay_per_second.unwrap_or(rates.replay_per_second),
                        shared_replay_per_second: a
                            .shared_replay_per_second
                            .unwrap_or(rates.shared_replay_per_second),
                        shadow_requests_per_thing: a
                            .shadow_requests_per_thing
                            .unwrap_or(rates.shadow_requests_per_thing),
                    },
                )
            })
            .collect();
        sekisho_broker::BrokerConfig {
            quotas: base,
            account_quotas,
            throttles: rates,
            account_throttles,
            ..Default::default()
        }
    }

    /// Multipart uploads in progress allowed to `account`.
    pub fn multipart_uploads_of(&self, account: &str) -> usize {
        self.accounts
            .get(account)
            .and_then(|a| a.multipart_uploads)
            .unwrap_or(self.multipart_uploads)
    }
}

/// Everything `sekisho serve` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Data directory (registry, CAs, profiles).
    pub data_dir: Option<PathBuf>,
    /// Addresses to listen on. The default is loopback (IPv4 and, when available, IPv6).
    pub bind: Vec<IpAddr>,
    /// Listener ports.
    pub ports: Ports,
    /// The region this deployment pretends to be.
    pub region: String,
    /// Base domain of endpoint names: `<prefix>-ats.iot.<region>.<domain>`.
    pub domain: String,
    /// Server names that reach the default route (besides no SNI at all).
    pub default_server_names: Vec<String>,
    /// Whether the device HTTPS port also serves the Cognito API under its AWS name,
    /// `cognito-identity.<region>.<domain>` (default true; decision 0010).
    pub cognito_on_device_port: bool,
    /// Most concurrent device connections.
    pub max_connections: usize,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` wins when set.
    pub log: String,
    /// TLS security policy of the default device listeners (AWS name).
    pub tls_policy: Option<String>,
    /// Extra device listeners (private endpoints, other TLS policies).
    pub endpoints: Vec<EndpointConfig>,
    /// Per-account quotas.
    pub limits: Limits,
    /// Networks that may read the unsigned `/metrics` (default: loopback only), whose totals
    /// span every account.
    pub metrics_allow: Vec<ipnet::IpNet>,
    /// The object store's URL as devices reach it (`https://host:port`), used in the
    /// presigned URLs of job documents; default `https://localhost:<s3 port>`.
    pub object_store_url: Option<String>,
    /// How Lambda-compatible functions run.
    pub functions: FunctionsConfig,
    /// OpenID Connect issuers' keys.
    pub oidc_providers: Vec<OidcProviderConfig>,
    /// Cluster mode: absent, a single node (the default).
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this node routes messages with the other nodes through NATS (docs/cluster.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs, comma-separated (`nats://host:4222`); credentials in the URL.
    pub url: String,
    /// Subject prefix and stream name (several clusters may share one NATS).
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// JetStream replicas of the cluster's streams, retained and claims (3 on a three-server
    /// NATS cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// This node's name in NATS's connection list and the logs (default: the host name and
    /// the MQTT port).
    pub node: Option<String>,
    /// Seconds this node may be cut off from NATS before it ends its device connections
    /// (default 30).
    #[serde(default = "default_isolation")]
    pub isolation_seconds: u64,
    /// A node writes a snapshot of the registry for nodes that join after this many registry
    /// log entries since the last one (and one as soon as there is none); 0: never.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// Seconds the registry log keeps an entry once a snapshot holds it and every node has
    /// applied it (default 3,600): a node away for less catches up from the log, one away
    /// longer starts again from the latest snapshot when it comes back.
    #[serde(default = "default_log_keep")]
    pub log_keep_seconds: u64,
    /// The most an account's function code may take in the cluster's shared code store, in
    /// zip bytes (default 1 GiB; the store holds 8 GiB in all): beyond it CreateFunction and
    /// UpdateFunctionCode answer CodeStorageExceededException, so one account cannot fill the
    /// store for the others.
    #[serde(default = "default_code_bytes_per_account")]
    pub code_bytes_per_account: u64,
}

fn default_log_keep() -> u64 {
    3600
}

/// 1 GiB.
pub fn default_code_bytes_per_account() -> u64 {
    1 << 30
}

fn default_isolation() -> u64 {
    30
}

fn default_snapshot_every() -> u64 {
    1000
}

fn default_cluster_name() -> String {
    "sekisho".into()
}

fn default_replicas() -> usize {
    1
}

/// `[functions]`: how Lambda-compatible functions run (see docs/functions.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionsConfig {
    /// Whether functions run at all (default false: a function runs as the server's user, so
    /// the operator turns them on, for every account or for `accounts`).
    pub enabled: bool,
    /// The accounts whose functions may run; empty: every account.
    pub accounts: Vec<String>,
    /// The interpreter of `python3.x` functions; it must have `awslambdaric` installed.
    pub python: String,
    /// The command that runs `nodejs*` functions (npm's `aws-lambda-ric`).
    pub node_ric: String,
    /// Function instances in all.
    pub max_instances: usize,
    /// Instances of one function (its concurrency).
    pub max_per_function: usize,
    /// Instances of one account's functions together.
    pub max_per_account: usize,
    /// The least `refreshAfterInSeconds` and `disconnectAfterInSeconds` a custom authorizer
    /// may answer: AWS's 300 by default; lower only to test what happens when they pass.
    pub authorizer_min_seconds: u32,
}

impl Default for FunctionsConfig {
    fn default() -> Self {
        FunctionsConfig {
            enabled: false,
            accounts: Vec::new(),
            python: "python3".into(),
            node_ric: "aws-lambda-ric".into(),
            max_instances: 64,
            max_per_function: 10,
            max_per_account: 32,
            authorizer_min_seconds: 300,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: None,
            bind: vec![
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ],
            ports: Ports::default(),
            region: "us-east-1".into(),
            domain: "localhost".into(),
            default_server_names: vec!["localhost".into()],
            cognito_on_device_port: true,
            max_connections: 100_000,
            log: "info".into(),
            tls_policy: None,
            endpoints: Vec::new(),
            limits: Limits::default(),
            functions: FunctionsConfig::default(),
            oidc_providers: Vec::new(),
            metrics_allow: sekisho_api::loopback_only(),
            object_store_url: None,
            cluster: None,
        }
    }
}

impl Config {
    /// Reads a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The data directory: configured, else `$XDG_DATA_HOME/sekisho`, else
    /// `~/.local/share/sekisho`, else `./sekisho-data`.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(x).join("sekisho");
        }
        if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(h).join(".local/share/sekisho");
        }
        PathBuf::from("sekisho-data")
    }

    /// `iot.<region>.<domain>`.
    pub fn data_suffix(&self) -> String {
        format!("iot.{}.{}", self.region, self.domain)
    }

    /// The object store's URL as devices reach it.
    pub fn object_store_url(&self) -> String {
        self.object_store_url
            .clone()
            .unwrap_or_else(|| format!("https://localhost:{}", self.ports.s3))
    }

    /// `cognito-identity.<region>.<domain>`: the Cognito API's name, which the SDKs' Cognito
    /// credential providers build themselves; served on the device HTTPS port (443 as on AWS).
    pub fn cognito_host(&self) -> String {
        format!("cognito-identity.{}.{}", self.region, self.domain)
    }

    /// `s3.<region>.<domain>`: the object store's name; buckets are its subdomains.
    pub fn s3_host(&self) -> String {
        format!("s3.{}.{}", self.region, self.domain)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.bind.is_empty(),
            "bind: at least one address is required"
        );
        anyhow::ensure!(self.max_connections > 0, "max_connections must be positive");
        anyhow::ensure!(
            (1..=300).contains(&self.functions.authorizer_min_seconds),
            "functions.authorizer_min_seconds must be from 1 to 300 (AWS: 300)"
        );
        let label_ok = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        };
        anyhow::ensure!(
            label_ok(&self.region),
            "region {:?} is not a valid DNS label",
            self.region
        );
        anyhow::ensure!(
            label_ok(&self.domain),
            "domain {:?} is not a valid DNS name",
            self.domain
        );
        let mut issuers = std::collections::BTreeSet::new();
        for p in &self.oidc_providers {
            let name = sekisho_registry::oidc_provider_name(&p.url)
                .map_err(|e| anyhow::anyhow!("oidc_providers: {e}"))?;
            anyhow::ensure!(
                issuers.insert(name),
                "oidc_providers: {} is configured twice",
                p.url
            );
        }
        anyhow::ensure!(
            !(self.cognito_on_device_port
                && self.default_server_names.iter().any(|n| n
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case(&self.cognito_host()))),
            "default_server_names names {:?}, which the device HTTPS port serves as the Cognito API (cognito_on_device_port)",
            self.cognito_host()
        );
        let policy_ok = |p: &Option<String>, what: &str| -> anyhow::Result<()> {
            if let Some(p) = p {
                anyhow::ensure!(
                    sekisho_gateway::tls::TlsPolicy::parse(p).is_some(),
                    "{what}: TLS policy {p:?} is not one of {}",
                    sekisho_gateway::tls::TlsPolicy::ALL
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(())
        };
        policy_ok(&self.tls_policy, "tls_policy")?;
        let mut names = std::collections::HashSet::new();
        for e in &self.endpoints {
            let what = format!("endpoint {:?}", e.name);
            anyhow::ensure!(names.insert(&e.name), "{what}: duplicate name");
            policy_ok(&e.tls_policy, &what)?;
            anyhow::ensure!(
                e.max_connections != Some(0),
                "{what}: max_connections must be positive"
            );
            match (&e.vpc_endpoint_id, &e.vpc_id) {
                (None, None) => {}
                (Some(vpce), Some(vpc)) => {
                    anyhow::ensure!(
                        vpce.starts_with("vpce-") && vpce.len() > 5,
                        "{what}: vpc_endpoint_id {vpce:?} must look like vpce-..."
                    );
                    anyhow::ensure!(
                        vpc.starts_with("vpc-") && vpc.len() > 4,
                        "{what}: vpc_id {vpc:?} must look like vpc-..."
                    );
                }
                _ => anyhow::bail!("{what}: vpc_endpoint_id and vpc_id go together"),
            }
        }
        Ok(())
    }

    /// The endpoint settings of an extra listener.
    pub fn endpoint(&self, e: &EndpointConfig) -> sekisho_gateway::Endpoint {
        sekisho_gateway::Endpoint {
            name: e.name.clone(),
            tls_policy: e
                .tls_policy
                .as_deref()
                .and_then(sekisho_gateway::tls::TlsPolicy::parse)
                .unwrap_or_default(),
            private: match (&e.vpc_endpoint_id, &e.vpc_id) {
                (Some(vpce), Some(vpc)) => Some(sekisho_gateway::PrivateEndpoint {
                    vpce_id: vpce.clone(),
                    vpc_id: vpc.clone(),
                }),
                _ => None,
            },
            max_connections: e.max_connections.unwrap_or(100_000),
            client_cert_optional: e.protocol == Protocol::Https,
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(
                e.max_connections.unwrap_or(100_000),
            )),
            handover: None,
        }
    }

    /// The endpoint settings of the default device listeners.
    pub fn default_endpoint(&self, name: &str) -> sekisho_gateway::Endpoint {
        let mut e = sekisho_gateway::Endpoint::public(name, self.max_connections);
        e.tls_policy = self
            .tls_policy
            .as_deref()
            .and_then(sekisho_gateway::tls::TlsPolicy::parse)
            .unwrap_or_default();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<Config>("bnd = []").is_err());
        assert!(toml::from_str::<Config>("[ports]\nmqtt = 1\nwebsocket = 2").is_err());
        let c: Config = toml::from_str("region = \"eu-west-1\"\n[ports]\nmqtt = 18883").unwrap();
        assert_eq!(c.ports.mqtt, 18883);
        assert_eq!(c.ports.api, 9443);
        assert_eq!(c.data_suffix(), "iot.eu-west-1.localhost");
        c.validate().unwrap();
    }

    #[test]
    fn limits_default_and_per_account() {
        let c: Config = toml::from_str(
            "metrics_allow = [\"10.0.0.0/8\"]\n[limits]\nretained_bytes = 1000\n[limits.accounts.123456789012]\nsessions = 5\nmultipart_uploads = 2",
        )
        .unwrap();
        let b = c.limits.broker();
        assert_eq!(b.quotas.retained_bytes, 1000);
        assert_eq!(b.quotas.sessions, 100_000);
        let own = b.quotas("123456789012");
        assert_eq!(
            (own.sessions, own.retained_bytes),
            (5, 1000),
            "inherits what it does not set"
        );
        assert_eq!(b.quotas("999999999999").sessions, 100_000);
        assert_eq!(c.limits.multipart_uploads_of("123456789012"), 2);
        assert_eq!(c.limits.multipart_uploads_of("999999999999"), 1000);
        assert_eq!(c.metrics_allow.len(), 1);
        assert_eq!(
            Config::default().metrics_allow.len(),
            2,
            "loopback by default"
        );
        assert!(toml::from_str::<Config>("[limits.accounts.1]\nsesions = 5").is_err());
    }

    #[test]
    fn endpoints_are_checked() {
        let ok: Config = toml::from_str(
            "[[endpoints]]\nname = \"plant\"\nport = 18884\nvpc_endpoint_id = \"vpce-0a1\"\nvpc_id = \"vpc-0b2\"\ntls_policy = \"IoTSecurityPolicy_TLS13_1_3_2022_10\"",
        )
        .unwrap();
        ok.validate().unwrap();
        let e = ok.endpoint(&ok.endpoints[0]);
        assert_eq!(e.tls_policy, sekisho_gateway::tls::TlsPolicy::Tls13Only);
        assert_eq!(e.private.unwrap().vpce_id, "vpce-0a1");
        assert_eq!(e.max_connections, 100_000);
        for bad in [
            "[[endpoints]]\nname = \"p\"\nport = 1\nvpc_endpoint_id = \"vpce-1\"",
            "[[endpoints]]\nname = \"p\"\nport = 1\nvpc_endpoint_id = \"x\"\nvpc_id = \"vpc-1\"",
            "[[endpoints]]\nname = \"p\"\nport = 1\ntls_policy = \"IoTSecurityPolicy_TLS12_1_0_2016_01\"",
            "tls_policy = \"TLS13\"",
            "[[endpoints]]\nname = \"p\"\nport = 1\n[[endpoints]]\nname = \"p\"\nport = 2",
        ] {
            let c: Config = toml::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(
            toml::from_str::<Config>("[[endpoints]]\nname = \"p\"\nport = 1\nvpce = \"x\"")
                .is_err()
        );
    }

    #[test]
    fn the_least_authorizer_times_are_bounded() {
        for (n, ok) in [(0, false), (1, true), (300, true), (301, false)] {
            let c: Config =
                toml::from_str(&format!("[functions]\nauthorizer_min_seconds = {n}")).unwrap();
            assert_eq!(c.validate().is_ok(), ok, "{n}");
        }
        assert_eq!(Config::default().functions.authorizer_min_seconds, 300);
    }

    #[test]
    fn the_cognito_name_is_not_also_a_default_server_name() {
        for (text, ok) in [
            ("", true),
            (
                "default_server_names = [\"cognito-identity.us-east-1.localhost\"]",
                false,
            ),
            (
                "default_server_names = [\"Cognito-Identity.us-east-1.localhost.\"]",
                false,
            ),
            (
                "cognito_on_device_port = false\ndefault_server_names = [\"cognito-identity.us-east-1.localhost\"]",
                true,
            ),
        ] {
            let c: Config = toml::from_str(text).unwrap();
            assert_eq!(c.validate().is_ok(), ok, "{text}");
        }
        assert!(Config::default().cognito_on_device_port);
    }
}
