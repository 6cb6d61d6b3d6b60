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

mod adopt;
pub mod code;
pub mod dedup;
mod registry;
pub mod sessions;
pub mod subject;
pub mod testament;

pub use registry::join_registry;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt as _;
use sekisho_broker::peers::{ClaimError, Orphans, Peers, Previous, Testament};
use sekisho_broker::{Broker, Message};
use tokio::sync::{mpsc, oneshot, watch};

use crate::subject::Kind;

/// What a node needs to join a cluster.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server URLs (`nats://host:port`, comma-separated for several).
    pub url: String,
    /// Subject prefix and stream name of this cluster (several clusters may share one NATS).
    pub name: String,
    /// JetStream replicas of the retained and claims streams (3 on a three-server NATS
    /// cluster).
    pub replicas: usize,
    /// This node's name, for NATS's connection list and the logs.
    pub node: String,
    /// How long this node may be cut off from NATS before it ends its connections (it can no
    /// longer learn of takeovers elsewhere; decision 0012).
    pub isolation: Duration,
    /// Registry log entries after which this node writes a new registry snapshot (0: never).
    pub snapshot_every: u64,
    /// How long the registry log keeps an entry that a snapshot holds and every node has
    /// applied: a node away for less catches up from the log; away longer, it starts again
    /// from the snapshot.
    pub log_keep: Duration,
    /// The most an account's function code may take in the cluster's share (zip bytes).
    pub code_bytes_per_account: u64,
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
    /// Copies too old for the duplicate window, routed (possibly a second time).
    pub stale: AtomicU64,
    /// Messages not sent because the queue to NATS was full, or NATS refused them.
    pub send_dropped: AtomicU64,
    /// Times NATS's client found a subscription of this node too slow (it drops what does not
    /// fit its buffer).
    pub slow_consumer: AtomicU64,
    /// Retained messages applied from the stream.
    pub retained_applied: AtomicU64,
    /// Retained messages (set or cleared) this node wrote to the stream.
    pub retained_written: AtomicU64,
    /// Messages received that could not be read (subject or payload).
    pub unreadable: AtomicU64,
    /// Messages not sent because they waited too long for NATS (this node was cut off).
    pub send_late: AtomicU64,
}

/// A message that waited this long for NATS (this node cut off) is not sent when NATS is back:
/// the other nodes took this node for dead by then, and published its devices' wills
/// themselves (see `adopt`); a will of this side's would reach them a second time.
const SEND_LATE: Duration = testament::DEAD_AFTER;

/// Bytes of messages waiting to go to NATS (payload and topic). Past it, a message is dropped
/// and counted.
const OUTBOUND_BYTES: u64 = 64 << 20;

/// Messages NATS's client buffers per subscription of this node before it drops (and counts a
/// slow consumer).
const SUBSCRIPTION_BUFFER: usize = 8192;

/// How long start-up waits for the retained stream to be read before serving.
const RETAINED_CATCH_UP: Duration = Duration::from_secs(10);

/// How long the stream keeps a cleared retained message's tombstone. A node away for longer
/// drops, at its next start, what the stream no longer has.
const TOMBSTONE_TTL: &str = "1h";

const H_SOURCE: &str = "Sekisho-Node";
const H_SEQ: &str = "Sekisho-Seq";
const H_TIME: &str = "Sekisho-Time";
const H_EXPIRES: &str = "Sekisho-Expires";

struct Outbound {
    account: String,
    message: Arc<Message>,
    weight: u64,
    /// When the broker handed it over.
    at: Instant,
}

/// The broker's [`Peers`]: queues what the broker says for the tasks that talk to NATS.
#[derive(Debug)]
struct Link {
    interest: mpsc::UnboundedSender<Interest>,
    /// Interest changes told so far, and the last one in force.
    told: AtomicU64,
    done: watch::Receiver<u64>,
    messages: mpsc::UnboundedSender<Outbound>,
    queued: Arc<AtomicU64>,
    up: Arc<AtomicBool>,
    groups_up: Arc<AtomicBool>,
    stats: Arc<Stats>,
}

impl Peers for Link {
    fn interest(&self, account: &str, filter: &str, on: bool) -> u64 {
        // Numbered under the broker's lock, so in the order sent.
        let n = self.told.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self
            .interest
            .send((account.to_owned(), filter.to_owned(), on, n));
        n
    }

    fn interest_done(
        &self,
        mark: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let mut done = self.done.clone();
        let waiting = *done.borrow() < mark && self.routes_groups();
        Box::pin(async move {
            if waiting {
                let _ = done.wait_for(|d| *d >= mark).await;
            }
        })
    }

    fn forward(&self, account: &str, message: &Arc<Message>) {
        let weight = sekisho_broker::weight(message);
        let queued = self.queued.fetch_add(weight, Ordering::Relaxed);
        let out = Outbound {
            account: account.to_owned(),
            message: message.clone(),
            weight,
            at: Instant::now(),
        };
        if queued + weight > OUTBOUND_BYTES || self.messages.send(out).is_err() {
            self.queued.fetch_sub(weight, Ordering::Relaxed);
            let n = self.stats.send_dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n + 1,
                    "cluster: the queue to NATS is full; messages to other nodes are dropped"
                );
            }
        }
    }

    fn routes_groups(&self) -> bool {
        self.up.load(Ordering::Relaxed) && self.groups_up.load(Ordering::Relaxed)
    }
}

/// A node's membership of the cluster.
#[derive(Debug)]
pub struct Cluster {
    /// This node's id in message headers (random at each start).
    pub node_id: u64,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Who owns each client id (for the gateway).
    pub claims: Arc<Owners>,
    client: async_nats::Client,
    groups: async_nats::Client,
    /// How this node joined.
    config: Config,
    /// Whether the registry log is followed (the node counts as cut off while it is not).
    registry_alive: Arc<AtomicBool>,
    /// The registry once it follows the log (its position is in this node's status).
    registry: Arc<std::sync::OnceLock<std::sync::Weak<sekisho_registry::Registry>>>,
    /// Told when this node must start again to catch up ([`Cluster::restart_needed`]).
    restart: Arc<tokio::sync::Notify>,
}

impl Cluster {
    /// Resolves when this node cannot catch up with the cluster while it runs: the registry
    /// log was compacted past its replica while it was cut off from NATS. The process then
    /// shuts down as for SIGTERM and starts again (`main`), and at start-up it restores the
    /// latest snapshot, as a node stopped for as long does; no operator step is needed.
    pub async fn restart_needed(&self) {
        self.restart.notified().await
    }
}

/// Numbers this node's claims (with its id, each claim's message id).
static CLAIM_IDS: AtomicU64 = AtomicU64::new(1);

/// Longest a round trip that confirms new subscriptions may take.
const ROUND_TRIP: Duration = Duration::from_secs(1);

/// How long a CONNECT waits for its claim to be stored before it is refused.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the claims stream keeps a claim beyond its session's expiry: its arrival at every
/// node orders takeovers (each claim's own `Nats-TTL`).
const CLAIM_KEPT: Duration = Duration::from_secs(600);

/// The longest a claim is kept: a claim names the node that may hold the client id's
/// persistent session, which lives up to 7 days.
const CLAIM_KEPT_MOST: Duration = Duration::from_secs(7 * 24 * 3600 + 600);

/// A claim's `Nats-TTL` for a session kept `keep`.
fn claim_ttl(keep: Duration) -> String {
    format!(
        "{}s",
        keep.saturating_add(CLAIM_KEPT)
            .min(CLAIM_KEPT_MOST)
            .as_secs()
    )
}

/// This node's client-id claims: for each client id connected or connecting here, its claims
/// on their way, the live connection and its claim, and the latest claim another node made.
#[derive(Debug, Default)]
struct Owned {
    /// Claims sent and not yet attached (or refused).
    pending: u32,
    /// The live connection here: (its claim, its epoch). The broker keeps one connection per
    /// client id on a node, the one it attached last, which has the highest epoch (two
    /// connections here may report their attachment in the other order).
    live: Option<(u64, u64)>,
    /// The highest epoch attached here.
    last_epoch: u64,
    /// The latest claim granted here: the node owns the client id as of it, whichever of its
    /// connections the broker kept.
    mine: u64,
    /// The latest claim seen from another node (kept while anything here is pending or live).
    others: u64,
    /// The session expiry the latest granted claim's connection asked for.
    keep: Duration,
}

impl Owned {
    fn idle(&self) -> bool {
        self.pending == 0 && self.live.is_none()
    }
}

/// [`Claims`] on a JetStream stream: a claim is a message on `{name}.c.{account}.{client id}`
/// (its sequence number is its place in the cluster's order); every node follows the stream
/// from when it joined and ends its own connection of a client id that another node claimed
/// later.
#[derive(Debug)]
pub struct Owners {
    js: jetstream::Context,
    prefix: String,
    node_id: u64,
    broker: Arc<Broker>,
    owned: Arc<Mutex<OwnedMap>>,
    /// The claims stream (the last claim of a client id is read from it).
    stream: jetstream::stream::Stream,
    /// This node's name (where sessions are asked for).
    node: String,
    /// The main NATS connection (handovers are asked for on it).
    client: async_nats::Client,
    /// Client ids whose sessions are being moved here now.
    moving: Arc<Moving>,
    /// Whether this node's registry follows the cluster's log: while it does not, no one is
    /// let in (a revocation made elsewhere would not be seen).
    registry_alive: Arc<AtomicBool>,
    /// Publishes what dead nodes' connections left (set once the gateway is up).
    orphans: std::sync::OnceLock<Arc<dyn Orphans>>,
    /// Claims written at disconnections and not yet acknowledged (waited for at shutdown).
    ending: Arc<AtomicU64>,
    /// Where nodes store their persistent sessions (a dead node's are read from it).
    replica: sessions::Replica,
    /// Itself (for tasks that outlive a call).
    self_ref: std::sync::OnceLock<std::sync::Weak<Owners>>,
}

type OwnedMap = HashMap<(String, String), Owned>;

fn lock_owned(m: &Mutex<OwnedMap>) -> std::sync::MutexGuard<'_, OwnedMap> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Forgets `key` if nothing here needs it any more.
fn tidy(owned: &mut OwnedMap, key: &(String, String)) {
    if owned.get(key).is_some_and(Owned::idle) {
        owned.remove(key);
    }
}

impl Owners {
    fn lock(&self) -> std::sync::MutexGuard<'_, OwnedMap> {
        lock_owned(&self.owned)
    }

    /// Client ids connected or connecting here (for `/metrics`).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Who publishes what dead nodes' connections left. Until it is set, nothing is adopted.
    pub fn set_orphans(&self, orphans: Arc<dyn Orphans>) {
        let _ = self.orphans.set(orphans);
    }

    /// Waits (at most `wait`) until the claims written at disconnections are stored: a node
    /// that stops leaves no claim that another node would take for a dead node's connection.
    pub async fn settle(&self, wait: Duration) {
        let end = Instant::now() + wait;
        while self.ending.load(Ordering::Relaxed) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A claim from the stream: another node's, later than this node's live connection, ends
    /// it; one while a claim here is on its way decides that claim (see `claim`). A claim
    /// another node made for this node's connection (in this node's name) adopted it: this
    /// node was cut off long enough to look dead, and the connection ends without its event
    /// or will, which that node published.
    fn seen(&self, subject: &str, payload: &[u8], seq: u64) {
        let Some((run, node, carries)) = testament::head(payload) else {
            return;
        };
        if run == self.node_id {
            return;
        }
        // An adopting claim carries no testament; another run's connection claim in this
        // node's name (two runs of one name at once) does, and is a takeover.
        let how = if node == self.node && !carries {
            sekisho_broker::Kick::Adopted
        } else {
            sekisho_broker::Kick::TakenOver
        };
        let Some(key) = subject::parse_claim(&self.prefix, subject) else {
            return;
        };
        let mut owned = self.lock();
        let Some(o) = owned.get_mut(&key) else {
            return;
        };
        o.others = o.others.max(seq);
        let kick = match o.live {
            Some((claim, epoch)) if seq > claim => {
                o.live = None;
                Some(epoch)
            }
            _ => None,
        };
        tidy(&mut owned, &key);
        drop(owned);
        if let Some(epoch) = kick {
            tracing::info!(client_id = %key.1, ?how, "cluster: client id claimed on another node");
            self.broker.kick_connection(&key.0, &key.1, epoch, how);
        }
    }
}

/// The name of the node that made a claim.
fn claimer(payload: &[u8]) -> Option<String> {
    testament::head(payload).map(|(_, node, _)| node.to_owned())
}

/// Most bytes of a session sent in one NATS message.
const HANDOVER_PART: usize = 512 * 1024;

/// Most parts (and so bytes: 512 MiB) a session may come in.
const HANDOVER_MAX_PARTS: usize = 1024;

/// How long either side of a move waits for the other's next message.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a requester waits for a move's first part (the other node may be answering
/// others first).
const HANDOVER_FIRST: Duration = Duration::from_secs(10);

/// Moves answered at once; the others wait (each holds a session's bytes twice).
const HANDOVERS_AT_ONCE: usize = 16;

/// The request of a move or a discard: `{account}\n{client id}`, the requester's claim in
/// `Sekisho-Claim`, `Sekisho-Discard: 1` for a discard.
fn handover_request(
    payload: &[u8],
    headers: Option<&HeaderMap>,
) -> Option<((String, String), u64, bool)> {
    let (a, c) = std::str::from_utf8(payload).ok()?.split_once('\n')?;
    let claim = header_u64(headers, "Sekisho-Claim", 10)?;
    let discard = headers
        .and_then(|h| h.get("Sekisho-Discard"))
        .is_some_and(|v| v.as_str() == "1");
    Some(((a.to_owned(), c.to_owned()), claim, discard))
}

/// Answers other nodes' requests for this node's sessions (`{name}.h.{node}`): unless this
/// node's own connection of the client id claimed it later than the requester, ends that
/// connection, takes the persistent session out of the broker and sends it in parts to the
/// reply subject (headers `Sekisho-Part`, `Sekisho-Parts` (0: none here) and `Sekisho-Ack`,
/// where the requester acknowledges). Without that acknowledgement the session is put back.
async fn answer_handovers(
    client: async_nats::Client,
    broker: Arc<Broker>,
    owners: Arc<Owners>,
    mut requests: async_nats::Subscriber,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(HANDOVERS_AT_ONCE));
    while let Some(req) = requests.next().await {
        let Some((key, claim, discard)) = handover_request(&req.payload, req.headers.as_ref())
        else {
            continue;
        };
        if discard {
            if !owners.newer_here(&key, claim) {
                broker.take_session(&key.0, &key.1, sekisho_broker::durable::WallClock::read());
            }
            // Answered, so that the asker knows this node is there.
            if let Some(reply) = req
                .reply
                .as_ref()
                .filter(|r| r.as_str().starts_with("_INBOX."))
            {
                let _ = client.publish(reply.clone(), Bytes::new()).await;
            }
            continue;
        }
        // Only replies to a requester's inbox (not the cluster's own subjects).
        let Some(reply) = req
            .reply
            .clone()
            .filter(|r| r.as_str().starts_with("_INBOX."))
        else {
            continue;
        };
        let (client, broker, owners, permits) = (
            client.clone(),
            broker.clone(),
            owners.clone(),
            permits.clone(),
        );
        tokio::spawn(async move {
            let asked = Instant::now();
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            // The requester gave up waiting for the first part.
            if asked.elapsed() > HANDOVER_FIRST - Duration::from_secs(1) {
                return;
            }
            let none = || {
                let mut h = HeaderMap::new();
                h.insert("Sekisho-Part", "0");
                h.insert("Sekisho-Parts", "0");
                client.publish_with_headers(reply.clone(), h, Bytes::new())
            };
            // A move of the same client id into this node finishes first.
            let end = Instant::now() + HANDOVER_TIMEOUT;
            while owners.moving_in(&key) && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // A connection here whose claim is later than the requester's (or one on its
            // way) keeps the client id, and its session.
            if owners.newer_here(&key, claim) {
                let _ = none().await;
                return;
            }
            // Its connection here ends first (its unacknowledged messages go back to the
            // session's queue as it detaches).
            broker.kick_client(&key.0, &key.1, sekisho_broker::Kick::TakenOver);
            let end = Instant::now() + Duration::from_secs(1);
            while broker.is_connected(&key.0, &key.1) && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let Some(taken) =
                broker.take_session(&key.0, &key.1, sekisho_broker::durable::WallClock::read())
            else {
                let _ = none().await;
                return;
            };
            let queued = taken.queue.len();
            let Some(bytes) = sekisho_broker::durable::encode_loaded(&taken)
                .map(Bytes::from)
                .filter(|b| b.len() <= HANDOVER_PART * HANDOVER_MAX_PARTS)
            else {
                tracing::warn!(client_id = %key.1, "cluster: a session too large to move stays here");
                broker.put_session(taken, sekisho_broker::durable::WallClock::read());
                let _ = none().await;
                return;
            };
            let ack_inbox = client.new_inbox();
            let Ok(mut ack) = client.subscribe(ack_inbox.clone()).await else {
                broker.put_session(taken, sekisho_broker::durable::WallClock::read());
                return;
            };
            let n = bytes.len().div_ceil(HANDOVER_PART);
            let mut sent = true;
            for i in 0..n {
                let part =
                    bytes.slice(i * HANDOVER_PART..((i + 1) * HANDOVER_PART).min(bytes.len()));
                let mut h = HeaderMap::new();
                h.insert("Sekisho-Part", i.to_string().as_str());
                h.insert("Sekisho-Parts", n.to_string().as_str());
                h.insert("Sekisho-Ack", ack_inbox.as_str());
                sent &= client
                    .publish_with_headers(reply.clone(), h, part)
                    .await
                    .is_ok();
            }
            // Time for the parts to leave and the requester to store them (20 MB/s at least).
            let allowed = HANDOVER_TIMEOUT + Duration::from_millis(bytes.len() as u64 / 20_000);
            let acked = sent
                && tokio::time::timeout(allowed, ack.next())
                    .await
                    .is_ok_and(|m| m.is_some());
            if acked {
                tracing::info!(client_id = %key.1, queued, "cluster: session handed to another node");
            } else if broker.has_session(&key.0, &key.1) {
                // The device came back here meanwhile: its session now is the one it has.
                tracing::warn!(client_id = %key.1, queued, "cluster: a session handover was not acknowledged; the client id has a newer session here");
            } else {
                tracing::warn!(client_id = %key.1, queued, "cluster: a session handover was not acknowledged; the session stays here");
                broker.put_session(taken, sekisho_broker::durable::WallClock::read());
            }
        });
    }
}

type Moving = Mutex<HashSet<(String, String)>>;

fn lock_moving(m: &Moving) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Owners {
    /// Whether a session of this client id is being moved here now.
    fn moving_in(&self, key: &(String, String)) -> bool {
        lock_moving(&self.moving).contains(key)
    }

    /// Whether this node claimed the client id after `claim`, or has a claim of it on its way.
    fn newer_here(&self, key: &(String, String), claim: u64) -> bool {
        self.lock().get(key).is_some_and(|o| {
            o.pending > 0 || o.mine > claim || o.live.is_some_and(|(c, _)| c > claim)
        })
    }
}

/// Longest a node spends reading a dead node's session from the sessions stream.
const RESUME_TIMEOUT: Duration = Duration::from_secs(2);

/// Resumes here the session that node `from` stored for `key` and that it cannot hand over
/// (it is down): stored here first, then removed from `from`'s sessions.
async fn resume_stored(
    replica: &sessions::Replica,
    broker: &Broker,
    from: &str,
    key: &(String, String),
) -> Option<sekisho_broker::peers::Moved> {
    // Within the time a node that asks for the session after this one waits for this move
    // (`answer_handovers`), so that it finds the session here.
    let taken = tokio::time::timeout(RESUME_TIMEOUT, replica.take(from, &key.0, &key.1))
        .await
        .unwrap_or_else(|_| Err(format!("not read in {RESUME_TIMEOUT:?}")));
    let l = match taken {
        Ok(l) => l?,
        Err(why) => {
            tracing::warn!(client_id = %key.1, %from, %why, "cluster: the session of a node that does not answer could not be read");
            return None;
        }
    };
    let queued = l.queue.len();
    let mark = broker.put_session(l, sekisho_broker::durable::WallClock::read());
    // Removed from the dead node's only once stored here: a crash in between leaves it in
    // both (its messages come twice, at least once), never in neither.
    let stored = match broker.journal() {
        Some(j) => j.wait(j.barrier()).await,
        None => true,
    };
    if stored && let Err(why) = replica.forget(from, &key.0, &key.1).await {
        tracing::warn!(client_id = %key.1, %from, %why, "cluster: a resumed session could not be removed from its dead node's");
    }
    tracing::info!(client_id = %key.1, %from, queued, "cluster: the session of a node that does not answer resumed here");
    Some(sekisho_broker::peers::Moved { queued, mark })
}

/// What asking another node for a session came to.
enum Fetched {
    /// The session, and where to acknowledge it.
    Moved(sekisho_broker::durable::Loaded, String),
    /// The node answered that it has none.
    None,
    /// Nobody listens there (the node is down).
    Unreachable,
    /// The node is starting up: it has its sessions and cannot hand them over yet.
    Busy,
}

/// Asks for a session ([`answer_handovers`]) and gathers its parts.
async fn fetch_session(
    client: &async_nats::Client,
    subject: String,
    payload: Bytes,
    claim: u64,
    key: &(String, String),
) -> Result<Fetched, String> {
    let inbox = client.new_inbox();
    let mut parts = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    let mut h = HeaderMap::new();
    h.insert("Sekisho-Claim", claim.to_string().as_str());
    client
        .publish_with_reply_and_headers(subject, inbox, h, payload)
        .await
        .map_err(|e| e.to_string())?;
    let mut got: Vec<Option<Bytes>> = Vec::new();
    let mut ack = None;
    loop {
        let wait = if got.is_empty() {
            HANDOVER_FIRST
        } else {
            HANDOVER_TIMEOUT
        };
        let m = match tokio::time::timeout(wait, parts.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Err("the answer ended".into()),
            Err(_) => return Err("no part came for 3 s".into()),
        };
        // No node listens there (it is down): no session to be had.
        if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Ok(Fetched::Unreachable);
        }
        if m.headers
            .as_ref()
            .and_then(|h| h.get("Sekisho-Busy"))
            .is_some()
        {
            return Ok(Fetched::Busy);
        }
        let (Some(i), Some(n)) = (
            header_u64(m.headers.as_ref(), "Sekisho-Part", 10),
            header_u64(m.headers.as_ref(), "Sekisho-Parts", 10),
        ) else {
            continue;
        };
        let (i, n) = (i as usize, n as usize);
        if n == 0 {
            return Ok(Fetched::None);
        }
        if n > HANDOVER_MAX_PARTS || i >= n || (!got.is_empty() && got.len() != n) {
            return Err("parts that do not add up".into());
        }
        if got.is_empty() {
            got = vec![None; n];
        }
        ack = ack.or_else(|| {
            m.headers
                .as_ref()
                .and_then(|h| h.get("Sekisho-Ack"))
                .map(|v| v.as_str().to_owned())
                .filter(|a| a.starts_with("_INBOX."))
        });
        got[i] = Some(m.payload);
        if got.iter().all(Option::is_some) {
            break;
        }
    }
    let ack = ack.ok_or("no acknowledgement subject")?;
    let mut bytes = Vec::with_capacity(got.iter().flatten().map(Bytes::len).sum());
    for p in got.into_iter().flatten() {
        bytes.extend_from_slice(&p);
    }
    let l = sekisho_broker::durable::decode_loaded(&bytes)
        .filter(|l| l.account == key.0 && l.client_id == key.1)
        .ok_or("not a session of this client id")?;
    Ok(Fetched::Moved(l, ack))
}

impl sekisho_broker::peers::Claims for Owners {
    fn handover(
        &self,
        from: &str,
        account: &str,
        client_id: &str,
        claim: u64,
    ) -> sekisho_broker::peers::HandoverFuture {
        let subject = subject::handover_subject(&self.prefix, from);
        let payload = Bytes::from(format!("{account}\n{client_id}"));
        let key = (account.to_owned(), client_id.to_owned());
        let (client, broker, moving, replica) = (
            self.client.clone(),
            self.broker.clone(),
            self.moving.clone(),
            self.replica.clone(),
        );
        let here = from == self.node;
        let from = from.to_owned();
        Box::pin(async move {
            lock_moving(&moving).insert(key.clone());
            // A node starting up answers "busy" until it can hand its sessions over.
            let asked = Instant::now();
            let moved = loop {
                match fetch_session(&client, subject.clone(), payload.clone(), claim, &key).await {
                    Ok(Fetched::Busy) if asked.elapsed() < HANDOVER_FIRST => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(Fetched::Busy) => break Err("the node stayed busy starting up".into()),
                    other => break other,
                }
            };
            let out = match moved {
                Ok(Fetched::Moved(l, ack)) => {
                    let queued = l.queue.len();
                    let _ = client.publish(ack, Bytes::new()).await;
                    let mark = broker.put_session(l, sekisho_broker::durable::WallClock::read());
                    Some(sekisho_broker::peers::Moved { queued, mark })
                }
                Ok(Fetched::None) => {
                    // The node that had the client id last has no session of it: one left
                    // here before is older than that, and MQTT ended it then.
                    broker.take_session(&key.0, &key.1, sekisho_broker::durable::WallClock::read());
                    None
                }
                // The node is down (or cut off): its session is read from the sessions stream.
                Ok(Fetched::Unreachable) if !here => {
                    resume_stored(&replica, &broker, &from, &key).await
                }
                Ok(Fetched::Unreachable) | Ok(Fetched::Busy) => None,
                Err(why) => {
                    tracing::warn!(client_id = %key.1, from = %from, %why, "cluster: the session could not be moved here");
                    None
                }
            };
            lock_moving(&moving).remove(&key);
            out
        })
    }

    fn reclaim_will(
        &self,
        account: &str,
        client_id: &str,
        due_ms: u64,
        hold: bool,
    ) -> sekisho_broker::peers::ReclaimFuture {
        let owners = self.self_ref.get().and_then(std::sync::Weak::upgrade);
        let (account, client_id) = (account.to_owned(), client_id.to_owned());
        Box::pin(async move {
            match owners {
                Some(o) => o.reclaim_will(&account, &client_id, due_ms, hold).await,
                None => false,
            }
        })
    }

    fn discard(&self, from: &str, account: &str, client_id: &str, claim: u64) {
        let subject = subject::handover_subject(&self.prefix, from);
        let payload = Bytes::from(format!("{account}\n{client_id}"));
        let mut h = HeaderMap::new();
        h.insert("Sekisho-Claim", claim.to_string().as_str());
        h.insert("Sekisho-Discard", "1");
        let (client, replica) = (self.client.clone(), self.replica.clone());
        let (from, key) = (from.to_owned(), (account.to_owned(), client_id.to_owned()));
        tokio::spawn(async move {
            // A node starting up answers "busy": asked again until it takes the discard.
            let began = Instant::now();
            let answer = loop {
                let asked = async_nats::Request::new()
                    .headers(h.clone())
                    .payload(payload.clone())
                    .timeout(Some(HANDOVER_FIRST));
                match client.send_request(subject.clone(), asked).await {
                    Ok(m)
                        if m.headers
                            .as_ref()
                            .and_then(|h| h.get("Sekisho-Busy"))
                            .is_some()
                            && began.elapsed() < HANDOVER_FIRST =>
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    other => break other,
                }
            };
            // A node that does not answer (down or cut off): its stored session is dropped
            // from the sessions stream, or it would come back with the node.
            if let Err(e) = answer
                && e.kind() == async_nats::client::RequestErrorKind::NoResponders
                && let Err(why) = replica.forget(&from, &key.0, &key.1).await
            {
                tracing::warn!(client_id = %key.1, %from, %why, "cluster: the session of a node that does not answer could not be dropped");
            }
        });
    }

    fn claim(
        &self,
        account: &str,
        client_id: &str,
        previous: Previous,
        keep: Duration,
        testament: Option<Testament>,
    ) -> sekisho_broker::peers::ClaimFuture {
        let key = (account.to_owned(), client_id.to_owned());
        // Known before the claim is sent: any later claim elsewhere is then seen.
        self.lock().entry(key.clone()).or_default().pending += 1;
        let subject = subject::claim_subject(&self.prefix, account, client_id);
        // Who claims: this node's id (this run's) and name (its sessions' home across runs),
        // and what the connection leaves if this node dies.
        let payload = Bytes::from(testament::encode(
            self.node_id,
            &self.node,
            testament.as_ref().map(|t| (t, keep)),
        ));
        // One id per CONNECT: a retry of a claim that was stored after all is the same claim
        // to JetStream (its duplicate window), not a second one.
        let mut headers = HeaderMap::new();
        let id = format!(
            "{:x}-{:x}",
            self.node_id,
            CLAIM_IDS.fetch_add(1, Ordering::Relaxed)
        );
        headers.insert("Nats-Msg-Id", id.as_str());
        // Kept as long as the session it may name lives, and ten minutes at least (its
        // arrival at every node orders takeovers).
        headers.insert("Nats-TTL", claim_ttl(keep).as_str());
        let js = self.js.clone();
        let owned = self.owned.clone();
        let registry_alive = self.registry_alive.clone();
        let run = self.node_id;
        let (stream, me) = (self.stream.clone(), self.node.clone());
        Box::pin(async move {
            // Within the time allowed, a refusal is tried again: JetStream refuses for a moment
            // while a stream's leader is elected or its subjects reach every server. When the
            // node that claimed the client id before is wanted, its claim is read first and
            // ours is stored only if it still follows that one (the stream keeps one claim per
            // client id): no other claim came between.
            let mut last = String::from("the cluster did not answer in 2 s");
            let mut before: Option<String> = None;
            let stored = tokio::time::timeout(CLAIM_TIMEOUT, async {
                loop {
                    let mut headers = headers.clone();
                    if previous != Previous::Ignore {
                        let seq = match stream.get_last_raw_message_by_subject(&subject).await {
                            Ok(m) => {
                                // Our own first try, stored after all: the claim before ours
                                // is the one read then.
                                let read = claimer(&m.payload);
                                if read.as_deref() != Some(me.as_str()) {
                                    before = read;
                                }
                                m.sequence
                            }
                            Err(e)
                                if e.kind()
                                    == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                            {
                                before = None;
                                0
                            }
                            Err(e) => {
                                last = format!("reading the last claim: {e}");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                        if previous == Previous::Refuse && before.is_some() {
                            return Err(true);
                        }
                        headers.insert(
                            "Nats-Expected-Last-Subject-Sequence",
                            seq.to_string().as_str(),
                        );
                    }
                    let r = match js
                        .publish_with_headers(subject.clone(), headers, payload.clone())
                        .await
                    {
                        Ok(ack) => ack.await,
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(ack) => return Ok(ack),
                        // Another claim came between: read again.
                        Err(e)
                            if e.kind()
                                == jetstream::context::PublishErrorKind::WrongLastSequence => {}
                        Err(e) => {
                            last = e.to_string();
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
            .await;
            let stored = match stored {
                Ok(Ok(ack)) => Ok(ack),
                Ok(Err(_)) => Err(ClaimError::Refused(
                    "the client id was last used on another node".into(),
                )),
                Err(_) => Err(ClaimError::Unavailable(last)),
            };
            // A claim stored and then refused here must not leave its testament behind.
            if let Ok(ack) = &stored
                && !registry_alive.load(Ordering::Relaxed)
            {
                tokio::spawn(adopt::retire(
                    js.clone(),
                    subject.clone(),
                    ack.sequence,
                    Bytes::from(testament::encode(run, &me, None)),
                    keep,
                ));
            }
            let mut owned = lock_owned(&owned);
            let o = owned.entry(key.clone()).or_default();
            let out = match stored {
                Ok(ack) if o.others > ack.sequence => Err(ClaimError::Unavailable(
                    "a later connection on another node claimed it".to_string(),
                )),
                Ok(_) if !registry_alive.load(Ordering::Relaxed) => Err(ClaimError::Unavailable(
                    "this node does not follow the cluster's registry log".to_string(),
                )),
                Ok(ack) => {
                    o.mine = o.mine.max(ack.sequence);
                    o.keep = keep;
                    Ok(sekisho_broker::peers::Claimed {
                        number: ack.sequence,
                        previous: before,
                    })
                }
                Err(e) => Err(e),
            };
            // A claim granted stays pending until its connection attaches, so that a later
            // claim elsewhere seen meanwhile is kept for it.
            if out.is_err() {
                o.pending = o.pending.saturating_sub(1);
                tidy(&mut owned, &key);
            }
            out
        })
    }

    fn attached(&self, account: &str, client_id: &str, claim: u64, epoch: u64) {
        let key = (account.to_owned(), client_id.to_owned());
        let mut owned = self.lock();
        let o = owned.entry(key.clone()).or_default();
        o.pending = o.pending.saturating_sub(1);
        let claim = claim.max(o.mine);
        // The broker ended any connection of this client id here that attached before (a
        // lower epoch); one that attached after it is the live one.
        if epoch > o.last_epoch {
            o.last_epoch = epoch;
            o.live = Some((claim, epoch));
        }
        let overtaken = o.others > claim;
        if overtaken && o.live.is_some_and(|(_, e)| e == epoch) {
            o.live = None;
        }
        tidy(&mut owned, &key);
        drop(owned);
        if overtaken {
            self.broker
                .kick_connection(account, client_id, epoch, sekisho_broker::Kick::TakenOver);
        }
    }

    fn ended(&self, account: &str, client_id: &str, epoch: u64, leaves: Option<Testament>) {
        let key = (account.to_owned(), client_id.to_owned());
        let mut owned = self.lock();
        let mut refresh = None;
        if let Some(o) = owned.get_mut(&key)
            && let Some((claim, e)) = o.live
            && e == epoch
        {
            o.live = None;
            // The connection's testament no longer holds, and a session outlives its
            // connection: the claim that names its home is kept from now on for the session's
            // expiry, if no later claim came meanwhile.
            if o.pending == 0 && claim >= o.mine {
                refresh = Some((claim, o.keep));
            }
        }
        tidy(&mut owned, &key);
        drop(owned);
        if let (Some((claim, keep)), Ok(rt)) = (refresh, tokio::runtime::Handle::try_current()) {
            let subject = subject::claim_subject(&self.prefix, account, client_id);
            // A delayed will that waits stays on the claim, for another node to publish if
            // this one dies before it is due.
            let payload = Bytes::from(testament::encode(
                self.node_id,
                &self.node,
                leaves.as_ref().map(|t| (t, keep)),
            ));
            let mut h = HeaderMap::new();
            h.insert("Nats-TTL", claim_ttl(keep).as_str());
            h.insert(
                "Nats-Expected-Last-Subject-Sequence",
                claim.to_string().as_str(),
            );
            let js = self.js.clone();
            let ending = self.ending.clone();
            ending.fetch_add(1, Ordering::Relaxed);
            rt.spawn(async move {
                // Tried again for a while (a stream electing its leader): a testament left on
                // a live node's claim would be published if the node died later. A later
                // claim (wrong last sequence) makes it moot.
                for _ in 0..5 {
                    let r = match js
                        .publish_with_headers(subject.clone(), h.clone(), payload.clone())
                        .await
                    {
                        Ok(ack) => ack.await.map(|_| ()),
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(()) => break,
                        Err(e)
                            if e.kind()
                                == jetstream::context::PublishErrorKind::WrongLastSequence =>
                        {
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
                ending.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

impl Owners {
    /// [`Claims::reclaim_will`]: the claim of `client_id` carries a delayed will in this
    /// node's name (an earlier run's), taken off conditionally on its sequence (a node adopting
    /// it at the same moment wins or loses as a whole).
    async fn reclaim_will(&self, account: &str, client_id: &str, due_ms: u64, hold: bool) -> bool {
        let subject = subject::claim_subject(&self.prefix, account, client_id);
        for _ in 0..10 {
            let m = match self.stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => m,
                // No claim: nobody adopted the will while its claim was kept (adoption
                // replaces the claim, kept at least CLAIM_KEPT); long overdue, it may have
                // been.
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    return now_ms() < due_ms.saturating_add(CLAIM_KEPT.as_millis() as u64);
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let Some(body) = testament::decode(&m.payload) else {
                return false;
            };
            // The will on it (left at the disconnection, or still the connection's testament
            // if that write failed), in this node's name.
            let Some((t, keep)) = body.testament.filter(|_| body.node == self.node) else {
                return false;
            };
            if t.will.is_none() {
                return false;
            }
            let mut held = t.clone();
            held.will_due_ms = Some(due_ms);
            let payload = Bytes::from(testament::encode(
                self.node_id,
                &self.node,
                hold.then_some((&held, keep)),
            ));
            match adopt::retire_now(&self.js, &subject, m.sequence, payload, keep).await {
                Ok(()) => return true,
                Err(true) => continue,
                Err(false) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        // Not known: not published here (a will twice is worse than a will an adopter sends).
        false
    }
}

impl Cluster {
    /// Tells the other nodes that this one stops normally (after its connections ended and
    /// [`Owners::settle`]): they do not take it for dead and adopt nothing of it.
    pub async fn leave(&self) {
        let bye = adopt::leaving(self.node_id, &self.config.node);
        let _ = self
            .client
            .publish(format!("{}.hb", self.config.name), bye)
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
    }

    /// The function code the nodes share ([`code`]).
    pub fn shared_code(&self) -> code::SharedCode {
        code::SharedCode::new(jetstream::new(self.client.clone()), &self.config)
    }

    /// Whether the connection to NATS is up.
    pub fn connected(&self) -> bool {
        [&self.client, &self.groups]
            .iter()
            .all(|c| c.connection_state() == async_nats::connection::State::Connected)
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
                "sekisho_cluster_stale_total",
                "Copies older than the duplicate window, routed.",
                load(&s.stale),
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
                "sekisho_cluster_retained_written_total",
                "Retained messages set or cleared on this node and written to the cluster's stream.",
                load(&s.retained_written),
            ),
            (
                "sekisho_cluster_send_late_total",
                "Messages not sent: they waited for NATS longer than 3 s (this node was cut off).",
                load(&s.send_late),
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
            (
                "sekisho_cluster_claims",
                "Client ids this node holds or is making a claim for.",
                self.claims.len() as u64,
            ),
        ]
    }
}

/// What this node does with what comes from NATS.
struct Inbound {
    broker: Arc<Broker>,
    prefix: String,
    node_id: u64,
    seen: Mutex<dedup::Seen>,
    /// This node's retained writes not yet back from the stream: the number of the latest per
    /// (account, topic). An older one of its own coming back is not applied (it would bring
    /// back, for a moment, what this node has since replaced).
    pending: Mutex<HashMap<(String, String), u64>>,
    /// While start-up reads the stream: the (account, topic) pairs it holds.
    catching_up: Mutex<Option<HashSet<(String, String)>>>,
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
/// cannot be read. Its expiry (wall clock, from the header) becomes its deadline here.
fn read(
    prefix: &str,
    kind: Kind,
    subject: &str,
    payload: &[u8],
    headers: Option<&HeaderMap>,
) -> Option<(String, Message)> {
    let (account, topic) = subject::parse_subject(prefix, kind, subject)?;
    let published = header_u64(headers, H_TIME, 10).unwrap_or_else(now_ms);
    let mut msg = Message::from_publish_bytes(payload, published)?;
    if *msg.topic != *topic {
        return None;
    }
    msg.properties.message_expiry_interval = None;
    if let Some(at) = header_u64(headers, H_EXPIRES, 10) {
        let left = Duration::from_millis(at.saturating_sub(now_ms()));
        msg.expires_at = Some(Instant::now() + left);
    }
    Some((account, msg))
}

impl Inbound {
    /// A message through a plain subscription, or (with `shared`, `$share/{group}/{filter}`)
    /// a queue subscription.
    async fn message(&self, m: async_nats::Message, shared: Option<&str>) {
        let source = header_u64(m.headers.as_ref(), H_SOURCE, 16);
        // This node routed its own messages when they were published (a shared group's come
        // back on purpose: NATS chose this node).
        if shared.is_none() && source == Some(self.node_id) {
            return;
        }
        let read = read(
            &self.prefix,
            Kind::Message,
            m.subject.as_str(),
            &m.payload,
            m.headers.as_ref(),
        );
        let Some((account, msg)) = read else {
            self.stats.unreadable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let msg = Arc::new(msg);
        let now = Instant::now();
        let routed = match shared {
            Some(filter) => self
                .broker
                .publish_to_group_from_peer(&account, filter, msg, now),
            None => {
                // A message that reached this node through two subscriptions is routed once.
                // Checked and routed under one lock, so that the first copy of a message is
                // routed before the first copy of the next one from the same node, whichever
                // subscription's task sees which first.
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                if let (Some(src), Some(seq)) = (source, header_u64(m.headers.as_ref(), H_SEQ, 10))
                {
                    match seen.check(src, seq) {
                        dedup::Verdict::First => {}
                        dedup::Verdict::Duplicate => {
                            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        // Not known: at least once rather than lost.
                        dedup::Verdict::Stale => {
                            self.stats.stale.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                self.broker.publish_from_peer(&account, msg, now)
            }
        };
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if let Ok(r) = routed {
            // Waiting here slows this subscription down, as a publisher is slowed on one node
            // (NATS's buffer takes what comes meanwhile).
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
    fn retained(&self, subject: &str, payload: &[u8], headers: Option<&HeaderMap>) {
        let Some((account, mut msg)) =
            read(&self.prefix, Kind::Retained, subject, payload, headers)
        else {
            self.stats.unreadable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let key = (account, msg.topic.to_string());
        if header_u64(headers, H_SOURCE, 16) == Some(self.node_id) {
            let seq = header_u64(headers, H_SEQ, 10).unwrap_or(0);
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get(&key) {
                Some(&latest) if seq < latest => return,
                Some(_) => {
                    pending.remove(&key);
                }
                None => {}
            }
        }
        if let Some(seen) = self
            .catching_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            seen.insert(key.clone());
        }
        if msg.expired(Instant::now()) {
            msg.payload = Bytes::new();
        }
        self.broker.set_retained_from_peer(&key.0, Arc::new(msg));
        self.stats.retained_applied.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where the broker's journal writes this node's retained messages to the cluster's retained
/// stream ([`sessions::Replicated`]): empty until [`start`] has read the stream and fills it.
/// Writing them in the journal's commit, rather than when they are sent to the other nodes,
/// makes a PUBACK (which waits for the commit) mean that the stream has the message: a retained
/// message acknowledged just before its node's NATS server died was once lost.
#[derive(Debug, Clone, Default)]
pub struct RetainedLink(Arc<std::sync::OnceLock<RetainedWriter>>);

struct RetainedWriter {
    inbound: Arc<Inbound>,
    /// The number of this node's latest retained write (its `Sekisho-Seq`).
    seq: AtomicU64,
}

impl std::fmt::Debug for RetainedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetainedWriter")
            .field("node_id", &self.inbound.node_id)
            .field("seq", &self.seq)
            .finish()
    }
}

impl RetainedLink {
    /// The stream write for a retained message set (`Some`) or cleared (`None`) on this node:
    /// its subject, headers and bytes, or `None` before the node has joined or if the message
    /// cannot be encoded. Marks it as this node's latest for its topic, so that an older write
    /// of this node coming back from the stream is not applied over it. The write carries a
    /// `Nats-Msg-Id`, so writing it again after a failure that NATS in fact took stores it
    /// once (within the stream's two-minute duplicate window).
    pub(crate) fn write(
        &self,
        account: &str,
        topic: &str,
        message: Option<&Arc<Message>>,
    ) -> Option<(String, HeaderMap, Bytes)> {
        let w = self.0.get()?;
        let inbound = &w.inbound;
        let cleared;
        let message = match message {
            Some(m) => &**m,
            None => {
                cleared = Message {
                    topic: topic.into(),
                    payload: Bytes::new(),
                    qos: sekisho_mqtt::QoS::AtMostOnce,
                    retain: true,
                    properties: Default::default(),
                    expires_at: None,
                    origin: None,
                    timestamp_ms: now_ms(),
                };
                &cleared
            }
        };
        let seq = w.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok((bytes, mut headers)) = encode(message, inbound.node_id, seq) else {
            tracing::warn!(%topic, "cluster: a retained message that cannot be encoded is not written to the stream");
            return None;
        };
        if message.payload.is_empty() {
            headers.insert("Nats-TTL", TOMBSTONE_TTL);
        }
        headers.insert(
            "Nats-Msg-Id",
            format!("{:x}-{seq}", inbound.node_id).as_str(),
        );
        inbound
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((account.to_owned(), topic.to_owned()), seq);
        inbound
            .stats
            .retained_written
            .fetch_add(1, Ordering::Relaxed);
        let subject = subject::topic_subject(&inbound.prefix, Kind::Retained, account, topic);
        Some((subject, headers, bytes))
    }
}

/// The servers of a comma-separated URL list (async-nats takes one URL per string).
fn servers(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// Makes (or finds) a stream, for up to 30 s: a NATS cluster that has just started may still
/// be placing its first replicated streams.
async fn create_stream(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
) -> anyhow::Result<jetstream::stream::Stream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, stream = %config.name, "cluster: stream not ready; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The claims stream from after `after`, as an ordered consumer.
async fn claim_feed(
    stream: &jetstream::stream::Stream,
    client: &async_nats::Client,
    prefix: &str,
    after: u64,
) -> anyhow::Result<jetstream::consumer::push::Ordered> {
    Ok(stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{prefix}.c.>"),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        })
        .await?
        .messages()
        .await?)
}

/// Follows the claims stream. After a reconnection to NATS (perhaps to another server, the
/// one that held this node's consumer gone) the consumer is made again from the last claim
/// seen, at once, instead of after the ordered consumer's missed heartbeats (seconds in which
/// a takeover elsewhere would go unseen). While it cannot be made, `alive` is false (the
/// watchdog counts the node as cut off).
async fn follow_claims(
    mut feed: jetstream::consumer::push::Ordered,
    stream: jetstream::stream::Stream,
    client: async_nats::Client,
    claims: Arc<Owners>,
    mut last: u64,
    reconnected: Arc<tokio::sync::Notify>,
    alive: Arc<AtomicBool>,
) {
    loop {
        loop {
            tokio::select! {
                _ = reconnected.notified() => break,
                m = feed.next() => match m {
                    Some(Ok(m)) => {
                        let seq = m.info().map_or(0, |i| i.stream_sequence);
                        claims.seen(m.subject.as_str(), &m.payload, seq);
                        last = last.max(seq);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cluster: the claims stream; following it again");
                        break;
                    }
                    None => break,
                },
            }
        }
        loop {
            match claim_feed(&stream, &client, &claims.prefix, last).await {
                Ok(f) => {
                    feed = f;
                    alive.store(true, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    alive.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cluster: following the claims stream again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// One connection to NATS, named `sekisho {name}`, that keeps `up` and counts slow consumers.
async fn connect(
    config: &Config,
    name: &str,
    no_echo: bool,
    stats: Arc<Stats>,
    up: Arc<AtomicBool>,
    reconnected: Vec<Arc<tokio::sync::Notify>>,
) -> anyhow::Result<async_nats::Client> {
    // Back within a second of NATS being back, and a dead NATS server noticed by its missed
    // pings within about 3 s (NATS's default is minutes): a node that stays away longer than
    // 3 s is taken for dead by the others (see `adopt`).
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("sekisho {name}"))
        .subscription_capacity(SUBSCRIPTION_BUFFER)
        .ping_interval(Duration::from_secs(1))
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64).saturating_mul(100).min(1000))
        });
    if no_echo {
        options = options.no_echo();
    }
    let what = name.to_owned();
    options
        .event_callback(move |e| {
            let (stats, up, what, reconnected) =
                (stats.clone(), up.clone(), what.clone(), reconnected.clone());
            async move {
                match e {
                    async_nats::Event::SlowConsumer(sid) => {
                        stats.slow_consumer.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            sid,
                            connection = %what,
                            "cluster: a subscription is too slow; NATS's client dropped messages"
                        );
                    }
                    async_nats::Event::Connected => {
                        up.store(true, Ordering::Relaxed);
                        for r in &reconnected {
                            r.notify_one();
                        }
                        tracing::info!(connection = %what, "cluster: connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        up.store(false, Ordering::Relaxed);
                        tracing::warn!(connection = %what, "cluster: disconnected from NATS");
                    }
                    other => tracing::warn!(connection = %what, "cluster: {other}"),
                }
            }
        })
        .connect(servers(&config.url))
        .await
        .with_context(|| format!("cluster: connecting to {}", config.url))
}

/// The broker's storage in cluster mode, and what the broker starts with: persistent sessions
/// and their queues in the sessions stream ([`sessions`]), the rest in `local`. On a NATS
/// connection of its own (the journal's writer waits on it).
pub async fn session_storage<S: sekisho_broker::durable::Storage>(
    config: &Config,
    local: S,
) -> anyhow::Result<(sessions::Replicated<S>, sekisho_broker::durable::Snapshot)> {
    validate(config)?;
    let client = connect(
        config,
        &format!("{} sessions", config.node),
        false,
        Arc::new(Stats::default()),
        Arc::new(AtomicBool::new(true)),
        Vec::new(),
    )
    .await?;
    // Until `start` answers for this node's sessions, a node that asks for one (a device
    // resuming elsewhere meanwhile) hears "busy" and asks again, rather than taking it from
    // the sessions stream while this node loads it.
    let mut asks = subscribed(
        &client,
        subject::handover_subject(&config.name, &config.node),
        "cluster: answering session handovers",
    )
    .await?;
    let busy_client = client.clone();
    let busy = tokio::spawn(async move {
        while let Some(m) = asks.next().await {
            if let Some(reply) = m.reply.filter(|r| r.as_str().starts_with("_INBOX.")) {
                let mut h = HeaderMap::new();
                h.insert("Sekisho-Busy", "1");
                let _ = busy_client
                    .publish_with_headers(reply, h, Bytes::new())
                    .await;
            }
        }
    });
    *BUSY.lock().unwrap_or_else(|p| p.into_inner()) = Some(busy.abort_handle());
    let replica = sessions::Replica::open(client, &config.name, config.replicas).await?;
    sessions::Replicated::open(replica, &config.node, local).await
}

/// The task that answers "busy" for this node's sessions while it starts ([`session_storage`]).
static BUSY: Mutex<Option<tokio::task::AbortHandle>> = Mutex::new(None);

/// A subscription the NATS server has (flushed) when this returns.
async fn subscribed(
    client: &async_nats::Client,
    subject: String,
    what: &'static str,
) -> anyhow::Result<async_nats::Subscriber> {
    let sub = client.subscribe(subject).await.context(what)?;
    client.flush().await.context(what)?;
    Ok(sub)
}

fn validate(config: &Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.name.is_empty()
            && config
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "cluster.name must be letters, digits, '-' or '_'"
    );
    anyhow::ensure!(
        !config.node.is_empty()
            && config.node.len() <= 128
            && !config.node.chars().any(char::is_control),
        "cluster.node must be 1 to 128 characters, none of them control characters"
    );
    Ok(())
}

/// Joins the cluster: connects to NATS, reads the retained stream (up to 10 s) and makes this
/// node's retained messages agree with it, then attaches to `broker` as its [`Peers`] and
/// fills `retained_link` (the broker's journal writes retained messages to the stream from then on).
/// Fails if NATS cannot be reached.
pub async fn start(
    config: &Config,
    broker: Arc<Broker>,
    retained_link: &RetainedLink,
) -> anyhow::Result<Arc<Cluster>> {
    validate(config)?;
    let stats = Arc::new(Stats::default());
    // What this node publishes never comes back to its plain subscriptions (no echo: it
    // routed it already); its shared groups' queue subscriptions are on a second connection,
    // which gets this node's messages too when NATS picks it. Each has its own "up".
    let (up, groups_up) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(true)),
    );
    let reconnected = Arc::new(tokio::sync::Notify::new());
    let client = connect(
        config,
        &config.node,
        true,
        stats.clone(),
        up.clone(),
        vec![reconnected.clone()],
    )
    .await?;
    let groups = connect(
        config,
        &format!("{} groups", config.node),
        false,
        stats.clone(),
        groups_up.clone(),
        Vec::new(),
    )
    .await?;
    let node_id: u64 = rand::random();
    let prefix = config.name.clone();

    // Retained messages: the last per subject, then live, in the stream's order.
    // Start-up waits for a NATS cluster that is still electing its leaders (up to 10 s per
    // request); afterwards a request that gets no answer in 2 s is tried again rather than
    // waited on (a claim has 2 s in all; a follower made again after a failover retries).
    let mut js_start = jetstream::new(client.clone());
    js_start.set_timeout(Duration::from_secs(10));
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(2));
    let stream = create_stream(
        &js_start,
        jetstream::stream::Config {
            name: format!("{}_RETAINED", config.name),
            subjects: vec![format!("{prefix}.r.>")],
            max_messages_per_subject: 1,
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            allow_message_ttl: true,
            ..Default::default()
        },
    )
    .await
    .context("cluster: the retained stream")?;
    let empty = stream
        .get_info()
        .await
        .context("cluster: the retained stream")?
        .state
        .messages
        == 0;
    let inbound = Arc::new(Inbound {
        broker: broker.clone(),
        prefix: prefix.clone(),
        node_id,
        seen: Mutex::new(dedup::Seen::default()),
        pending: Mutex::new(HashMap::new()),
        catching_up: Mutex::new(Some(HashSet::new())),
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
    let (caught_up_tx, caught_up) = oneshot::channel();
    let mut caught_up_tx = (!empty).then_some(caught_up_tx);
    let r = inbound.clone();
    tokio::spawn(async move {
        while let Some(m) = retained.next().await {
            match m {
                Ok(m) => {
                    r.retained(m.subject.as_str(), &m.payload, m.headers.as_ref());
                    if m.info().map_or(0, |i| i.pending) == 0
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
    let caught_up = empty
        || tokio::time::timeout(RETAINED_CATCH_UP, caught_up)
            .await
            .is_ok();
    let held = inbound
        .catching_up
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    if empty {
        // A new cluster starts with what this node kept (its single-node retained messages).
        let mut seeded = 0;
        for (account, m) in broker.retained_all() {
            let subject = subject::topic_subject(&prefix, Kind::Retained, &account, &m.topic);
            let (bytes, headers) = encode(&m, node_id, 0)?;
            js_start
                .publish_with_headers(subject, headers, bytes)
                .await
                .context("cluster: seeding the retained stream")?
                .await
                .context("cluster: seeding the retained stream")?;
            seeded += 1;
        }
        tracing::info!(
            seeded,
            "cluster: a new retained stream, seeded from this node"
        );
    } else if caught_up {
        // The stream is the truth: what this node kept and the stream no longer has was
        // cleared while it was away.
        let mut dropped = 0;
        for (account, m) in broker.retained_all() {
            if !held.contains(&(account.clone(), m.topic.to_string())) {
                let mut cleared = (*m).clone();
                cleared.payload = Bytes::new();
                broker.set_retained_from_peer(&account, Arc::new(cleared));
                dropped += 1;
            }
        }
        tracing::info!(
            applied = held.len(),
            dropped,
            "cluster: retained messages agree with the stream"
        );
    } else {
        tracing::warn!("cluster: the retained stream was not read in 10 s; serving anyway");
    }

    // Client-id claims: followed from now on (earlier ones concern no connection here).
    let claims_config = jetstream::stream::Config {
        name: format!("{}_CLAIMS", config.name),
        subjects: vec![format!("{prefix}.c.>")],
        max_messages_per_subject: 1,
        max_age: CLAIM_KEPT_MOST,
        allow_message_ttl: true,
        num_replicas: config.replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    create_stream(&js_start, claims_config.clone())
        .await
        .context("cluster: the claims stream")?;
    // A stream an older build made keeps its settings otherwise.
    if let Err(e) = js_start.update_stream(&claims_config).await {
        tracing::warn!(error = %e, "cluster: updating the claims stream's settings");
    }
    // Start-up reads with the patient context; the follower, made again later, with the quick one.
    let claims_start = js_start
        .get_stream(format!("{}_CLAIMS", config.name))
        .await
        .context("cluster: the claims stream")?;
    let claims_stream = js
        .get_stream(format!("{}_CLAIMS", config.name))
        .await
        .context("cluster: the claims stream")?;
    let last = claims_start
        .get_info()
        .await
        .context("cluster: the claims stream")?
        .state
        .last_sequence;
    // False while the registry log cannot be followed (its replica would miss revocations).
    let registry_alive = Arc::new(AtomicBool::new(true));
    let claims = Arc::new(Owners {
        js: js.clone(),
        prefix: prefix.clone(),
        node_id,
        broker: broker.clone(),
        owned: Arc::new(Mutex::new(HashMap::new())),
        stream: claims_stream.clone(),
        node: config.node.clone(),
        client: client.clone(),
        moving: Arc::default(),
        registry_alive: registry_alive.clone(),
        orphans: std::sync::OnceLock::new(),
        ending: Arc::default(),
        replica: sessions::Replica::open(client.clone(), &config.name, config.replicas).await?,
        self_ref: std::sync::OnceLock::new(),
    });
    let _ = claims.self_ref.set(Arc::downgrade(&claims));
    let feed = claim_feed(&claims_start, &client, &prefix, last)
        .await
        .context("cluster: following the claims stream")?;
    // The connection's first Connected came before: no reason to make the follower again.
    let _ = futures_util::FutureExt::now_or_never(reconnected.notified());
    let feed_alive = Arc::new(AtomicBool::new(true));
    tokio::spawn(follow_claims(
        feed,
        claims_stream.clone(),
        client.clone(),
        claims.clone(),
        last,
        reconnected,
        feed_alive.clone(),
    ));

    let (interest_tx, interest_rx) = mpsc::unbounded_channel();
    let (messages_tx, messages_rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = watch::channel(0);
    tokio::spawn(subscriptions(
        [client.clone(), groups.clone()],
        inbound.clone(),
        interest_rx,
        done_tx,
    ));
    // From now on the broker's journal writes this node's retained messages to the stream.
    let _ = retained_link.0.set(RetainedWriter {
        inbound: inbound.clone(),
        seq: AtomicU64::new(0),
    });
    tokio::spawn(send(client.clone(), inbound, queued.clone(), messages_rx));
    anyhow::ensure!(
        broker.attach_peers(Arc::new(Link {
            interest: interest_tx,
            told: AtomicU64::new(0),
            done: done_rx,
            messages: messages_tx,
            queued,
            up: up.clone(),
            groups_up,
            stats: stats.clone(),
        })),
        "cluster: the broker has peers already"
    );
    tokio::spawn(isolation_watch(
        broker.clone(),
        [client.clone(), groups.clone()],
        claims_stream,
        feed_alive,
        registry_alive.clone(),
        config.isolation,
    ));
    let requests = subscribed(
        &client,
        subject::handover_subject(&prefix, &config.node),
        "cluster: answering session handovers",
    )
    .await?;
    tokio::spawn(answer_handovers(
        client.clone(),
        broker.clone(),
        claims.clone(),
        requests,
    ));
    // This node answers for its sessions now, no longer "busy".
    if let Some(busy) = BUSY.lock().unwrap_or_else(|p| p.into_inner()).take() {
        busy.abort();
    }
    tokio::spawn(adopt::heartbeat(
        client.clone(),
        format!("{prefix}.hb"),
        node_id,
        config.node.clone(),
    ));
    tokio::spawn(adopt::watch(
        client.clone(),
        up.clone(),
        claims.clone(),
        format!("{prefix}.hb"),
    ));
    let registry = Arc::new(std::sync::OnceLock::new());
    // Subscribed before this node joins the registry log: a node that compacts the log sees
    // it joining (no position yet) and waits.
    let asks = subscribed(
        &client,
        format!("{prefix}.status"),
        "cluster: answering status requests",
    )
    .await?;
    tokio::spawn(answer_status(
        client.clone(),
        broker.clone(),
        stats.clone(),
        asks,
        (config.node.clone(), node_id),
        registry.clone(),
    ));
    tracing::info!(node = %config.node, node_id = format!("{node_id:016x}"), "cluster: joined");
    Ok(Arc::new(Cluster {
        node_id,
        stats,
        claims,
        client,
        groups,
        config: config.clone(),
        registry_alive,
        registry,
        restart: Arc::new(tokio::sync::Notify::new()),
    }))
}

/// Answers `sekisho cluster status` (requests on `{name}.status`, which every node answers).
async fn answer_status(
    client: async_nats::Client,
    broker: Arc<Broker>,
    stats: Arc<Stats>,
    mut sub: async_nats::Subscriber,
    (node, node_id): (String, u64),
    registry: Arc<std::sync::OnceLock<std::sync::Weak<sekisho_registry::Registry>>>,
) {
    let started = Instant::now();
    // At most one count every half second, however often anyone asks (a count walks every
    // session under the broker's lock).
    let mut cached: Option<(Instant, Bytes)> = None;
    while let Some(m) = sub.next().await {
        // Answers go to a requester's inbox only, never onto the cluster's own subjects.
        let Some(reply) = m.reply.filter(|r| r.as_str().starts_with("_INBOX.")) else {
            continue;
        };
        if let Some((at, body)) = &cached
            && at.elapsed() < Duration::from_millis(500)
        {
            let _ = client.publish(reply, body.clone()).await;
            continue;
        }
        let (sessions, connections, subscriptions, retained) = broker.sizes();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let body = serde_json::json!({
            "node": node,
            "node_id": format!("{node_id:016x}"),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": started.elapsed().as_secs(),
            "connections": connections,
            "sessions": sessions,
            "subscriptions": subscriptions,
            "retained": retained,
            "sent": load(&stats.sent),
            "received": load(&stats.received),
            "send_dropped": load(&stats.send_dropped),
            "slow_consumer": load(&stats.slow_consumer),
            "retained_applied": load(&stats.retained_applied),
            "retained_written": load(&stats.retained_written),
            // The registry log entries this node's registry has applied.
            "registry_position": registry
                .get()
                .and_then(std::sync::Weak::upgrade)
                .map(|r| r.log_position()),
        });
        let body = Bytes::from(body.to_string());
        cached = Some((Instant::now(), body.clone()));
        let _ = client.publish(reply, body).await;
    }
}

/// What `sekisho cluster status` prints: every node's answer (within `wait`), by node name.
pub async fn status(
    url: &str,
    name: &str,
    wait: Duration,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let client = async_nats::connect(servers(url))
        .await
        .with_context(|| format!("connecting to {url}"))?;
    ask_status(&client, name, wait).await
}

/// Every node's status answer within `wait`, by node name.
pub(crate) async fn ask_status(
    client: &async_nats::Client,
    name: &str,
    wait: Duration,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(format!("{name}.status"), inbox, Bytes::new())
        .await?;
    client.flush().await?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, replies.next()).await {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
            out.push(v);
        }
    }
    out.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    Ok(out)
}

/// Ends this node's connections once it has been cut off from NATS for `after`: it can no
/// longer order client-id claims, so a device's takeover on another node would not reach it,
/// nor follow the registry log, so a revocation made elsewhere would not either.
/// Once per time it is cut off; CONNECTs are refused meanwhile (their claims fail).
/// Connected is not enough: the claims stream must answer (a NATS server on the minority
/// side of a partition has no JetStream quorum) and this node must still follow it.
async fn isolation_watch(
    broker: Arc<Broker>,
    clients: [async_nats::Client; 2],
    claims: jetstream::stream::Stream,
    feed_alive: Arc<AtomicBool>,
    registry_alive: Arc<AtomicBool>,
    after: Duration,
) {
    let mut since: Option<Instant> = None;
    let mut done = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let healthy = clients
            .iter()
            .all(|c| c.connection_state() == async_nats::connection::State::Connected)
            && feed_alive.load(Ordering::Relaxed)
            && registry_alive.load(Ordering::Relaxed)
            && tokio::time::timeout(Duration::from_millis(1500), claims.get_info())
                .await
                .is_ok_and(|r| r.is_ok());
        if healthy {
            since = None;
            done = false;
            continue;
        }
        let at = *since.get_or_insert_with(Instant::now);
        if !done && at.elapsed() >= after {
            done = true;
            let n = broker.kick_all(sekisho_broker::Kick::Shutdown);
            tracing::warn!(
                connections = n,
                "cluster: cut off from NATS; connections ended"
            );
        }
    }
}

/// An interest change, numbered in the order the broker told it.
type Interest = (String, String, bool, u64);

/// Holds one NATS subscription per distinct filter this node's sessions hold. A subscription
/// ends between two messages, never in the middle of routing one. Changes are taken in
/// batches; after a batch that subscribed, a round trip through NATS on each connection used
/// (a request nobody answers: the server's "no responders" comes after it processed the
/// SUBs before it) proves them in force, and `done` becomes the batch's last number.
async fn subscriptions(
    clients: [async_nats::Client; 2],
    inbound: Arc<Inbound>,
    mut rx: mpsc::UnboundedReceiver<Interest>,
    done: watch::Sender<u64>,
) {
    let mut held: HashMap<(String, String), oneshot::Sender<()>> = HashMap::new();
    let mut batch = Vec::with_capacity(256);
    let probe = format!("{}.roundtrip", inbound.prefix);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, 256).await == 0 {
            return;
        }
        let mut used = [false; 2];
        let mut last = 0;
        for (account, filter, on, n) in batch.drain(..) {
            last = n;
            let key = (account, filter);
            // Dropping the sender ends the task (and with it the NATS subscription).
            held.remove(&key);
            if on && let Some(stop) = subscribe(&clients, &inbound, &key).await {
                used[usize::from(key.1.starts_with("$share/"))] = true;
                held.insert(key, stop);
            }
        }
        let trips = clients.iter().zip(used).filter(|(_, u)| *u).map(|(c, _)| {
            let (c, probe) = (c.clone(), probe.clone());
            async move {
                let r = tokio::time::timeout(ROUND_TRIP, c.request(probe, Bytes::new())).await;
                if r.is_err() {
                    tracing::warn!("cluster: NATS did not confirm new subscriptions in 1 s");
                }
            }
        });
        futures_util::future::join_all(trips).await;
        done.send_replace(last);
    }
}

/// Subscribes to what `(account, filter)` needs and routes what comes until the returned
/// sender is dropped; `None` if NATS refused five times.
async fn subscribe(
    [plain_client, groups_client]: &[async_nats::Client; 2],
    inbound: &Arc<Inbound>,
    (account, filter): &(String, String),
) -> Option<oneshot::Sender<()>> {
    let (group, plain) = sekisho_broker::trie::split_shared(filter);
    let subject = subject::filter_subject(&inbound.prefix, account, plain);
    let mut sub = None;
    for attempt in 1..=5u64 {
        let r = match group {
            Some(g) => {
                groups_client
                    .queue_subscribe(subject.clone(), subject::queue_name(account, g, plain))
                    .await
            }
            None => plain_client.subscribe(subject.clone()).await,
        };
        match r {
            Ok(s) => {
                sub = Some(s);
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, %filter, attempt, "cluster: subscribing");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
        }
    }
    let Some(mut sub) = sub else {
        tracing::error!(%filter, "cluster: not subscribed; this node misses other nodes' messages for it");
        return None;
    };
    let (stop_tx, mut stop) = oneshot::channel::<()>();
    let inbound = inbound.clone();
    let shared = group.map(|_| filter.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop => break,
                m = sub.next() => match m {
                    Some(m) => inbound.message(m, shared.as_deref()).await,
                    None => break,
                },
            }
        }
    });
    Some(stop_tx)
}

/// A message as it travels: the PUBLISH bytes and the headers (sending node, number,
/// publication time, expiry).
fn encode(m: &Message, node_id: u64, seq: u64) -> anyhow::Result<(Bytes, HeaderMap)> {
    let bytes = Bytes::from(m.to_publish_bytes()?);
    let mut headers = HeaderMap::new();
    headers.insert(H_SOURCE, format!("{node_id:x}").as_str());
    headers.insert(H_SEQ, seq.to_string().as_str());
    headers.insert(H_TIME, m.timestamp_ms.to_string().as_str());
    if let Some(at) = m.expires_at {
        let left = at.saturating_duration_since(Instant::now()).as_millis() as u64;
        headers.insert(H_EXPIRES, (now_ms() + left).to_string().as_str());
    }
    Ok((bytes, headers))
}

/// Sends what this node publishes: every message on its topic's subject (a retained one is
/// written to the retained stream by the broker's journal, [`RetainedLink`]).
async fn send(
    client: async_nats::Client,
    inbound: Arc<Inbound>,
    queued: Arc<AtomicU64>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
) {
    let stats = inbound.stats.clone();
    let mut seq = 0u64;
    // When the connection to NATS last came back.
    let mut back: Option<Instant> = None;
    while let Some(Outbound {
        account,
        message,
        weight,
        at,
    }) = rx.recv().await
    {
        // Held here, not in NATS's client, while the connection is down: what waited longer
        // than SEND_LATE is dropped when it is back (retained messages are in their stream
        // already).
        if client.connection_state() != async_nats::connection::State::Connected {
            while client.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            back = Some(Instant::now());
        }
        // Queued before NATS was back, and long ago.
        let late = back.is_some_and(|b| at < b) && at.elapsed() > SEND_LATE;
        queued.fetch_sub(weight, Ordering::Relaxed);
        seq += 1;
        let Ok((bytes, headers)) = encode(&message, inbound.node_id, seq) else {
            stats.send_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if late {
            let n = stats.send_late.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    late = n + 1,
                    "cluster: messages that waited for NATS longer than 3 s were not sent"
                );
            }
            continue;
        }
        let subject =
            subject::topic_subject(&inbound.prefix, Kind::Message, &account, &message.topic);
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
