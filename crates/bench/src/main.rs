//! `sekisho-bench`: a load generator for MQTT brokers with mutual TLS, on Sekisho's own codec.
//!
//! - `provision`: creates N devices in Sekisho through its API (thing, certificate from a CSR,
//!   one policy, attachments) and writes `DIR/dev-<i>.crt|key`.
//! - `gen-certs`: makes a local CA and N device certificates (CN `dev-<i>`) for other brokers.
//! - `conn`: opens N connections, holds them, reports connects/s and CONNACK latency (with
//!   client certificates, or with `--custom-auth` through a custom authorizer).
//!
//! `sekisho-authorizer-bootstrap` (src/bin) is the `bootstrap` of a compiled (`provided`)
//! Lambda function that answers custom-authorizer events as `bench/authorizers.py`'s Python
//! handler does.
//! - `pubsub`: P publishers and S subscribers; reports delivered msg/s, losses, latency.
//!
//! It talks only to the address it is given (loopback in the project's scripts), and every
//! run is bounded in count and time. A progress line goes to stderr every second; the result
//! is one JSON object on stdout.

mod api;
mod bare;
mod client;
mod load;
mod run;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use sekisho_mqtt::ProtocolVersion;

#[derive(Parser)]
#[command(
    name = "sekisho-bench",
    about = "Load generator for MQTT over mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone, Debug)]
struct Common {
    /// Broker address (loopback).
    #[arg(long, default_value = "127.0.0.1:8883")]
    addr: SocketAddr,
    /// Server name for SNI and certificate checks.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// CA certificate that signs the broker's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Directory with `dev-<i>.crt` and `dev-<i>.key` (not needed with `--custom-auth`).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Authenticate through this custom authorizer instead of a client certificate, as the
    /// AWS IoT Device SDKs do on port 443: ALPN `mqtt`, username
    /// `dev-<i>?x-amz-customauthorizer-name=<name>`, password `pw-dev-<i>`.
    #[arg(long)]
    custom_auth: Option<String>,
    /// MQTT version: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4)]
    mqtt: u8,
    /// Spread connections over 127.0.0.1-127.0.0.250 as source addresses.
    #[arg(long)]
    spread_sources: bool,
}

impl Common {
    fn version(&self) -> ProtocolVersion {
        if self.mqtt == 5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Creates devices in Sekisho through its API.
    Provision {
        /// Sekisho's data directory (for the profile's credentials and ca.pem).
        #[arg(long)]
        data_dir: PathBuf,
        /// Control-plane address.
        #[arg(long, default_value = "127.0.0.1:9443")]
        api: SocketAddr,
        /// Output directory for certificates and keys.
        #[arg(long)]
        out: PathBuf,
        /// Number of devices.
        #[arg(long)]
        count: usize,
        /// Policy document (JSON file) attached to every certificate.
        #[arg(long)]
        policy: PathBuf,
    },
    /// Makes a local CA (`ca.pem`, `ca.key`) and N device certificates.
    GenCerts {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Number of devices.
        #[arg(long)]
        count: usize,
    },
    /// A bare rustls mutual-TLS server answering CONNECT with CONNACK (the handshake ceiling).
    BareServer {
        /// Listen address (loopback).
        #[arg(long, default_value = "127.0.0.1:18885")]
        addr: SocketAddr,
        /// Server certificate chain (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Server key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// CA that signs the client certificates.
        #[arg(long)]
        client_ca: PathBuf,
    },
    /// Loads a generated registry of many devices straight into a data directory (no server
    /// may have it open): things, certificates, attachments, one thing-name policy.
    LoadRegistry {
        /// Sekisho's data directory (run `sekisho serve` on it once first).
        #[arg(long)]
        data_dir: PathBuf,
        /// The registry's region.
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// Devices to add (`dev-<start>` on).
        #[arg(long)]
        devices: usize,
        /// The first device's number.
        #[arg(long, default_value_t = 0)]
        start: usize,
        /// Devices per transaction.
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        /// Write the keys and certificates of this many devices (from the first) to `out`.
        #[arg(long, default_value_t = 100)]
        keep: usize,
        /// Where the kept keys go.
        #[arg(long)]
        out: PathBuf,
    },
    /// Connection storm and idle hold.
    Conn {
        #[command(flatten)]
        common: Common,
        /// Connections.
        #[arg(long)]
        count: usize,
        /// Connection attempts in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds to hold the connections after the last one connected.
        #[arg(long, default_value_t = 5)]
        hold: u64,
        /// Keep-alive in seconds.
        #[arg(long, default_value_t = 60)]
        keep_alive: u16,
        /// Process id of the broker, to report its RSS while the connections are held.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// The first device's number (devices `dev-<first>` on).
        #[arg(long, default_value_t = 0)]
        first: usize,
    },
    /// Publishers and subscribers.
    Pubsub {
        #[command(flatten)]
        common: Common,
        /// Publishers (devices dev-0 .. dev-(P-1)).
        #[arg(long, default_value_t = 10)]
        publishers: usize,
        /// Subscribers (the next S devices).
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// `own`: subscriber i listens to publisher i mod P; `shared`: everyone listens to publisher 0.
        #[arg(long, default_value = "own")]
        topics: String,
        /// QoS 0 or 1.
        #[arg(long, default_value_t = 0)]
        qos: u8,
        /// Payload bytes (at least 16: a timestamp and a sequence number).
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Total publish rate in messages/s (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Subscribers keep persistent sessions.
        #[arg(long)]
        persistent: bool,
        /// Process id of the broker, to report its CPU time and RSS.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Where the subscribers connect, if not to `--addr` (other nodes of a cluster);
        /// repeatable: subscriber j connects to the (j mod n)-th.
        #[arg(long)]
        subscriber_addr: Vec<std::net::SocketAddr>,
        /// More processes whose CPU time counts as the broker's (a cluster's other nodes and
        /// its NATS server); repeatable.
        #[arg(long)]
        also_pid: Vec<u32>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Provision {
                data_dir,
                api,
                out,
                count,
                policy,
            } => api::provision(&data_dir, api, &out, count, &policy).await,
            Cmd::GenCerts { out, count } => api::gen_certs(&out, count),
            Cmd::LoadRegistry {
                data_dir,
                region,
                devices,
                start,
                batch,
                keep,
                out,
            } => load::load(&data_dir, &region, start, devices, batch, keep, &out),
            Cmd::BareServer {
                addr,
                cert,
                key,
                client_ca,
            } => bare::serve(addr, &cert, &key, &client_ca).await,
            Cmd::Conn {
                common,
                count,
                concurrency,
                hold,
                keep_alive,
                broker_pid,
                first,
            } => {
                run::conn(
                    &common,
                    first..first + count,
                    concurrency,
                    hold,
                    keep_alive,
                    broker_pid,
                )
                .await
            }
            Cmd::Pubsub {
                common,
                publishers,
                subscribers,
                topics,
                qos,
                payload,
                duration,
                rate,
                persistent,
                broker_pid,
                subscriber_addr,
                also_pid,
            } => {
                let spec = run::PubSub {
                    publishers,
                    subscribers,
                    shared: topics == "shared",
                    qos,
                    payload: payload.max(16),
                    duration,
                    rate,
                    persistent,
                };
                run::pubsub(&common, spec, broker_pid, &subscriber_addr, &also_pid).await
            }
        }
    })?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
