//! Cluster mode (issue 15; decision 0012): Sekisho nodes that route each other's messages
//! through NATS, so that a device on one node receives what a device on another publishes.
//!
//! - **Interest**: the broker tells [`Peers::interest`] when a filter gets its first
//!   subscription on this node and when it loses its last; this node then holds one core-NATS
//!   subscription per distinct filter ([`subject::filter_subject`]), a queue subscription for a
//!   shared one (`$share/{group}/{filter}`: NATS picks one node of the group, that node picks
//!   the member).
//! - **Messages**: every message published on this node goes out once on its topic's subject
//!   ([`subject::topic_subject`]), carried as the MQTT 5 PUBLISH our codec writes, with the
//!   sending node, its number and the publication time in headers. A receiving node drops its
//!   own messages on plain subscriptions (it routed them already), drops second copies
//!   ([`dedup`]) and routes the rest with its own trie, which decides AWS's matching exactly.
//! - **Retained messages**: also written to a JetStream stream that keeps the last message per
//!   subject; every node follows it from the start (last per subject, then live) and sets its
//!   copy in the stream's order, its own messages included, so that all nodes agree on the
//!   last writer.
//!
//! Nothing here decides authorization: the publishing node authorized `iot:Publish`, and the
//! receiving connection checks `iot:Receive` as for any delivery. The NATS cluster is trusted
//! infrastructure: whoever can publish on its subjects can inject messages into any account.

pub mod dedup;
pub mod subject;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream;
use futures_util::StreamExt as _;
use sekisho_broker::{Broker, Message, peers::Peers};
use tokio::sync::mpsc;

use crate::subject::Kind;

/// What a node needs to join a cluster.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server URLs (`nats://host:port`, comma-separated for several).
    pub url: String,
    /// Subject prefix and stream name of this cluster (several clusters may share one NATS).
    pub name: String,
    /// JetStream replicas of the retained stream (3 on a three-server NATS cluster).
    pub replicas: usize,
    /// This node's name, for NATS's connection list and the logs.
    pub node: String,
}

/// Counters of this node's traffic with the others.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages sent to the cluster.
    pub sent: AtomicU64,
    /// Messages from other nodes routed here.
    pub received: AtomicU64,
    /// Second copies dropped.
    pub duplicates: AtomicU64,
    /// Messages not sent because the queue to NATS was full, or NATS refused them.
    pub send_dropped: AtomicU64,
    /// Times NATS's client found a subscription of this node too slow (it drops what does not
    /// fit its buffer).
    pub slow_consumer: AtomicU64,
    /// Retained messages applied from the stream.
    pub retained_applied: AtomicU64,
    /// Messages received that could not be read (subject or payload).
    pub unreadable: AtomicU64,
}

/// Messages waiting to go to NATS. Past it, a message is dropped and counted.
const OUTBOUND_QUEUE: usize = 65_536;

/// How long start-up waits for the retained stream to be read before serving.
const RETAINED_CATCH_UP: Duration = Duration::from_secs(10);

const H_SOURCE: &str = "Sekisho-Node";
const H_SEQ: &str = "Sekisho-Seq";
const H_TIME: &str = "Sekisho-Time";

enum Out {
    Interest {
        account: String,
        filter: String,
        on: bool,
    },
    Message {
        account: String,
        message: Arc<Message>,
    },
}

/// The broker's [`Peers`]: queues what the broker says for the tasks that talk to NATS.
#[derive(Debug)]
struct Link {
    interest: mpsc::UnboundedSender<Out>,
    messages: mpsc::Sender<Out>,
    stats: Arc<Stats>,
}

impl Peers for Link {
    fn interest(&self, account: &str, filter: &str, on: bool) {
        let _ = self.interest.send(Out::Interest {
            account: account.to_owned(),
            filter: filter.to_owned(),
            on,
        });
    }

    fn forward(&self, account: &str, message: &Arc<Message>) {
        let out = Out::Message {
            account: account.to_owned(),
            message: message.clone(),
        };
        if self.messages.try_send(out).is_err() {
            let n = self.stats.send_dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n + 1,
                    "cluster: the queue to NATS is full; messages to other nodes are dropped"
                );
            }
        }
    }
}

/// A node's membership of the cluster.
#[derive(Debug)]
pub struct Cluster {
    /// This node's id in message headers (random at each start).
    pub node_id: u64,
    /// Counters.
    pub stats: Arc<Stats>,
    client: async_nats::Client,
}

impl Cluster {
    /// Whether the connection to NATS is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The counters for `/metrics`: name, help, value.
    pub fn metrics(&self) -> Vec<(&'static str, &'static str, u64)> {
        let s = &self.stats;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "sekisho_cluster_sent_total",
                "Messages sent to the other nodes.",
                load(&s.sent),
            ),
            (
                "sekisho_cluster_received_total",
                "Messages from other nodes routed here.",
                load(&s.received),
            ),
            (
                "sekisho_cluster_duplicates_total",
                "Second copies of a message dropped.",
                load(&s.duplicates),
            ),
            (
                "sekisho_cluster_send_dropped_total",
                "Messages not sent: the queue to NATS was full, or NATS refused them.",
                load(&s.send_dropped),
            ),
            (
                "sekisho_cluster_slow_consumer_total",
                "Times NATS's client dropped messages for a subscription of this node that fell behind.",
                load(&s.slow_consumer),
            ),
            (
                "sekisho_cluster_retained_applied_total",
                "Retained messages applied from the cluster's stream.",
                load(&s.retained_applied),
            ),
            (
                "sekisho_cluster_unreadable_total",
                "Messages from NATS whose subject or payload could not be read.",
                load(&s.unreadable),
            ),
            (
                "sekisho_cluster_connected",
                "1 while the connection to NATS is up.",
                u64::from(self.connected()),
            ),
        ]
    }
}

struct Inbound {
    broker: Arc<Broker>,
    prefix: String,
    node_id: u64,
    seen: Mutex<dedup::Seen>,
    stats: Arc<Stats>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn header_u64(h: Option<&HeaderMap>, name: &str, radix: u32) -> Option<u64> {
    u64::from_str_radix(h?.get(name)?.as_str(), radix).ok()
}

/// The message a NATS message carries, and the account its subject names; `None` if either
/// cannot be read. Its Message Expiry Interval (from publication) becomes its deadline.
fn read(prefix: &str, kind: Kind, m: &async_nats::Message) -> Option<(String, Message, u64)> {
    let (account, topic) = subject::parse_subject(prefix, kind, m.subject.as_str())?;
    let published = header_u64(m.headers.as_ref(), H_TIME, 10).unwrap_or_else(now_ms);
    let mut msg = Message::from_publish_bytes(&m.payload, published)?;
    if *msg.topic != *topic {
        return None;
    }
    if let Some(secs) = msg.properties.message_expiry_interval.take() {
        let age = Duration::from_millis(now_ms().saturating_sub(published));
        let left = Duration::from_secs(u64::from(secs)).saturating_sub(age);
        msg.expires_at = Some(Instant::now() + left);
    }
    Some((account, msg, published))
}

impl Inbound {
    /// A message through a plain subscription, or (with `group`) a queue subscription.
    async fn message(&self, m: async_nats::Message, group: Option<&str>) {
        let source = header_u64(m.headers.as_ref(), H_SOURCE, 16);
        // This node routed its own messages when they were published (a shared group's come
        // back on purpose: NATS chose this node).
        if group.is_none() && source == Some(self.node_id) {
            return;
        }
        let Some((account, msg, _)) = read(&self.prefix, Kind::Message, &m) else {
            self.stats.unreadable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let msg = Arc::new(msg);
        let now = Instant::now();
        let routed = match group {
            Some(g) => self
                .broker
                .publish_to_group_from_peer(&account, g, msg, now),
            None => {
                // A message that reached this node through two subscriptions is routed once.
                // Checked and routed under one lock, so that the first copy of a message is
                // routed before the first copy of the next one from the same node, whichever
                // subscription's task sees which first.
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                if let (Some(src), Some(seq)) = (source, header_u64(m.headers.as_ref(), H_SEQ, 10))
                    && seen.check(src, seq) != dedup::Verdict::First
                {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.broker.publish_from_peer(&account, msg, now)
            }
        };
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if let Ok(r) = routed {
            // Waiting here slows this subscription down (NATS's buffer takes the rest).
            sekisho_broker::wait_for_room(
                &self.broker,
                &account,
                r.blocked,
                tokio::time::Instant::now(),
            )
            .await;
        }
    }

    /// A retained message from the stream (its own node's too: the stream's order decides).
    fn retained(&self, m: &async_nats::Message) {
        let Some((account, mut msg, _)) = read(&self.prefix, Kind::Retained, m) else {
            self.stats.unreadable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if msg.expired(Instant::now()) {
            msg.payload = bytes::Bytes::new();
        }
        self.broker.set_retained_from_peer(&account, Arc::new(msg));
        self.stats.retained_applied.fetch_add(1, Ordering::Relaxed);
    }
}

/// Joins the cluster: connects to NATS, reads the retained stream (up to 10 s), then attaches
/// to `broker` as its [`Peers`]. Fails if NATS cannot be reached.
pub async fn start(config: &Config, broker: Arc<Broker>) -> anyhow::Result<Arc<Cluster>> {
    anyhow::ensure!(
        !config.name.is_empty()
            && config
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "cluster.name must be letters, digits, '-' or '_'"
    );
    let stats = Arc::new(Stats::default());
    let events = stats.clone();
    let client = async_nats::ConnectOptions::new()
        .name(format!("sekisho {}", config.node))
        .subscription_capacity(64 * 1024)
        .event_callback(move |e| {
            let stats = events.clone();
            async move {
                match e {
                    async_nats::Event::SlowConsumer(sid) => {
                        stats.slow_consumer.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            sid,
                            "cluster: a subscription is too slow; NATS's client dropped messages"
                        );
                    }
                    async_nats::Event::Connected => tracing::info!("cluster: connected to NATS"),
                    other => tracing::warn!("cluster: {other}"),
                }
            }
        })
        .connect(config.url.as_str())
        .await
        .with_context(|| format!("cluster: connecting to {}", config.url))?;
    let node_id: u64 = rand::random();
    let prefix = config.name.clone();

    // Retained messages: the last per subject, then live, in the stream's order.
    let js = jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("{}_RETAINED", config.name),
            subjects: vec![format!("{prefix}.r.>")],
            max_messages_per_subject: 1,
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("cluster: the retained stream")?;
    let inbound = Arc::new(Inbound {
        broker: broker.clone(),
        prefix: prefix.clone(),
        node_id,
        seen: Mutex::new(dedup::Seen::default()),
        stats: stats.clone(),
    });
    let consumer = stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{prefix}.r.>"),
            deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .context("cluster: following the retained stream")?;
    let mut retained = consumer
        .messages()
        .await
        .context("cluster: following the retained stream")?;
    let (caught_up_tx, caught_up) = tokio::sync::oneshot::channel();
    let mut caught_up_tx = Some(caught_up_tx);
    let empty = stream
        .get_info()
        .await
        .map(|i| i.state.messages == 0)
        .unwrap_or(true);
    if empty && let Some(tx) = caught_up_tx.take() {
        let _ = tx.send(());
    }
    let r = inbound.clone();
    tokio::spawn(async move {
        while let Some(m) = retained.next().await {
            match m {
                Ok(m) => {
                    r.retained(&m);
                    let pending = m.info().map_or(0, |i| i.pending);
                    if pending == 0
                        && let Some(tx) = caught_up_tx.take()
                    {
                        let _ = tx.send(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cluster: the retained stream"),
            }
        }
        tracing::error!("cluster: the retained stream ended");
    });
    if tokio::time::timeout(RETAINED_CATCH_UP, caught_up)
        .await
        .is_err()
    {
        tracing::warn!("cluster: the retained stream was not read in 10 s; serving anyway");
    }

    let (interest_tx, interest_rx) = mpsc::unbounded_channel();
    let (messages_tx, messages_rx) = mpsc::channel(OUTBOUND_QUEUE);
    tokio::spawn(subscriptions(client.clone(), inbound.clone(), interest_rx));
    tokio::spawn(send(
        client.clone(),
        js,
        prefix,
        node_id,
        stats.clone(),
        messages_rx,
    ));
    broker.attach_peers(Arc::new(Link {
        interest: interest_tx,
        messages: messages_tx,
        stats: stats.clone(),
    }));
    tracing::info!(node = %config.node, node_id = format!("{node_id:016x}"), "cluster: joined");
    Ok(Arc::new(Cluster {
        node_id,
        stats,
        client,
    }))
}

/// Holds one NATS subscription per distinct filter this node's sessions hold.
async fn subscriptions(
    client: async_nats::Client,
    inbound: Arc<Inbound>,
    mut rx: mpsc::UnboundedReceiver<Out>,
) {
    let mut held: HashMap<(String, String), tokio::task::AbortHandle> = HashMap::new();
    while let Some(out) = rx.recv().await {
        let Out::Interest {
            account,
            filter,
            on,
        } = out
        else {
            continue;
        };
        let key = (account, filter);
        if !on {
            if let Some(h) = held.remove(&key) {
                h.abort();
            }
            continue;
        }
        let (account, filter) = &key;
        let (group, plain) = sekisho_broker::trie::split_shared(filter);
        let subject = subject::filter_subject(&inbound.prefix, account, plain);
        let sub = match group {
            Some(g) => {
                client
                    .queue_subscribe(subject, subject::queue_name(account, g, plain))
                    .await
            }
            None => client.subscribe(subject).await,
        };
        let mut sub = match sub {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, %filter, "cluster: subscribing");
                continue;
            }
        };
        let inbound = inbound.clone();
        let group = group.map(str::to_owned);
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                inbound.message(m, group.as_deref()).await;
            }
        });
        if let Some(old) = held.insert(key, task.abort_handle()) {
            old.abort();
        }
    }
}

/// Sends what this node publishes: every message on its topic's subject, a retained one also
/// to the retained stream.
async fn send(
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    node_id: u64,
    stats: Arc<Stats>,
    mut rx: mpsc::Receiver<Out>,
) {
    let mut seq = 0u64;
    let source = format!("{node_id:x}");
    while let Some(out) = rx.recv().await {
        let Out::Message { account, message } = out else {
            continue;
        };
        seq += 1;
        // The expiry travels as the interval from publication.
        let bytes = match message.expires_at {
            Some(at) => {
                let mut m = (*message).clone();
                let secs = at.saturating_duration_since(Instant::now()).as_secs();
                m.properties.message_expiry_interval =
                    Some(secs.clamp(1, u64::from(u32::MAX)) as u32);
                m.to_publish_bytes()
            }
            None => message.to_publish_bytes(),
        };
        let Ok(bytes) = bytes else {
            stats.send_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let bytes = bytes::Bytes::from(bytes);
        let mut headers = HeaderMap::new();
        headers.insert(H_SOURCE, source.as_str());
        headers.insert(H_SEQ, seq.to_string().as_str());
        headers.insert(H_TIME, message.timestamp_ms.to_string().as_str());
        if message.retain {
            let subject = subject::topic_subject(&prefix, Kind::Retained, &account, &message.topic);
            match js
                .publish_with_headers(subject, headers.clone(), bytes.clone())
                .await
            {
                Ok(ack) => {
                    let stats = stats.clone();
                    tokio::spawn(async move {
                        if let Err(e) = ack.await {
                            stats.send_dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "cluster: a retained message was not stored");
                        }
                    });
                }
                Err(e) => {
                    stats.send_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cluster: a retained message was not sent");
                }
            }
        }
        let subject = subject::topic_subject(&prefix, Kind::Message, &account, &message.topic);
        match client.publish_with_headers(subject, headers, bytes).await {
            Ok(()) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.send_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cluster: a message was not sent");
            }
        }
    }
}
