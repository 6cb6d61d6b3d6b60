//! The message broker: sessions, the subscription index, retained messages, and delivery into
//! bounded per-connection queues.
//!
//! The broker routes; it does not authorize. The connection that publishes has already been
//! allowed `iot:Publish`; the connection that receives checks `iot:Receive` before it writes a
//! delivery to its socket, with the policies in force at that moment.
//!
//! It must never block (all sends are `try_send`), hold its lock across an `.await`, or let one
//! account's sessions, subscriptions or retained messages be seen from another.

#![warn(missing_docs)]

pub mod aws;
pub mod durable;
pub mod peers;
pub mod throttle;
pub mod trie;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use sekisho_mqtt::{Properties, QoS, SubscriptionOptions};
use tokio::sync::{mpsc, oneshot};
pub use trie::SessionId;
use trie::{SubEntry, Trie};

/// A published application message, shared by every delivery of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Topic.
    pub topic: Arc<str>,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// RETAIN flag as published.
    pub retain: bool,
    /// Forwarded MQTT 5 properties (payload format, content type, response topic, correlation
    /// data, user properties). Message expiry is kept in `expires_at`.
    pub properties: Properties,
    /// When it expires (MQTT 5 Message Expiry Interval).
    pub expires_at: Option<Instant>,
    /// The publishing session (for No Local), if any.
    pub origin: Option<SessionId>,
    /// Publication time, epoch milliseconds.
    pub timestamp_ms: u64,
}

impl Message {
    /// The MQTT 5 PUBLISH that carries it (topic, payload, QoS, RETAIN, forwarded properties;
    /// no expiry, no publication time: the caller keeps those beside it). How storage and
    /// other nodes carry a message.
    pub fn to_publish_bytes(&self) -> Result<Vec<u8>, sekisho_mqtt::EncodeError> {
        let mut buf = bytes::BytesMut::with_capacity(self.topic.len() + self.payload.len() + 16);
        let p = sekisho_mqtt::PublishRef {
            dup: false,
            qos: self.qos,
            retain: self.retain,
            topic: &self.topic,
            packet_id: (self.qos != QoS::AtMostOnce).then_some(1),
            properties: &self.properties,
            payload: &self.payload,
        };
        sekisho_mqtt::encode_publish(&p, sekisho_mqtt::ProtocolVersion::V5, &mut buf)?;
        Ok(buf.to_vec())
    }

    /// The message [`Message::to_publish_bytes`] encoded, published at `timestamp_ms`, with
    /// no expiry and no origin. `None` for bytes that are not one whole PUBLISH.
    pub fn from_publish_bytes(bytes: &[u8], timestamp_ms: u64) -> Option<Message> {
        let mut buf = bytes::BytesMut::from(bytes);
        let limits = sekisho_mqtt::Limits {
            max_packet_size: bytes.len().max(16),
            ..sekisho_mqtt::Limits::default()
        };
        match sekisho_mqtt::decode(&mut buf, sekisho_mqtt::ProtocolVersion::V5, &limits) {
            Ok(Some(sekisho_mqtt::Packet::Publish(p))) if buf.is_empty() => Some(Message {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties: p.properties,
                expires_at: None,
                origin: None,
                timestamp_ms,
            }),
            _ => None,
        }
    }

    /// A will published at `now` from `template`, whose Message Expiry Interval (in its
    /// properties, not yet a deadline) counts from then; stamped `timestamp_ms`.
    pub fn from_will(template: &Message, now: Instant, timestamp_ms: u64) -> Message {
        let mut m = template.clone();
        let expiry = m.properties.message_expiry_interval.take();
        m.expires_at = expiry.map(|e| now + Duration::from_secs(u64::from(e)));
        m.timestamp_ms = timestamp_ms;
        m
    }

    /// True when past its expiry at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub message: Arc<Message>,
    /// QoS granted for this delivery.
    pub qos: QoS,
    /// RETAIN flag to send.
    pub retain: bool,
    /// The packet identifier of an earlier send that was not acknowledged: the session sends
    /// it again with this identifier and DUP set ([MQTT-4.4.0-1]), if the identifier is free.
    pub resend: Option<u16>,
    /// Its sequence number in durable storage (0: not stored). The receiving connection
    /// acknowledges it with [`Broker::acked`] once the client has.
    pub seq: u64,
    /// It reached its session through a shared subscription group only: stored for an offline
    /// member, it is sent at the group's replay rate (AWS: 20 a second) instead of the
    /// session's (10).
    pub shared: bool,
}

/// What became of a delivery to one connection ([`Broker::deliver_to_connection`]).
#[derive(Debug)]
pub enum Direct {
    /// Queued for the connection.
    Delivered,
    /// The connection's queue is full: the delivery, to try again.
    Full(Delivery),
    /// That connection is gone.
    Gone,
}

/// Why the broker ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Another connection took the client id.
    TakenOver,
    /// The server is shutting down.
    Shutdown,
    /// An administrative action (certificate revoked, DeleteConnection).
    Administrative,
    /// In a cluster, another node adopted the connection as one of a dead node's (this node
    /// was cut off long enough to look dead): it sent the disconnection event and the will.
    Adopted,
}

/// What a new connection gets from [`Broker::connect`].
#[derive(Debug)]
pub struct Attached {
    /// The session.
    pub session: SessionId,
    /// This connection's epoch within the session.
    pub epoch: u64,
    /// Whether an existing session was resumed.
    pub session_present: bool,
    /// Deliveries for this connection.
    pub rx: mpsc::Receiver<Delivery>,
    /// Fires when the broker ends the connection.
    pub kick: oneshot::Receiver<Kick>,
    /// The journal ticket to wait for before CONNACK (0: none).
    pub ticket: u64,
    /// A resumed session's stored messages, oldest first: the connection sends them at the
    /// account's replay rate besides its live traffic, and hands back what it has not sent.
    pub replay: VecDeque<Delivery>,
}

/// What one account may keep in the broker, by count and by bytes (a message's bytes are its
/// topic and payload). Defaults in [`Quotas::default`]; each account may have its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Retained messages.
    pub retained_messages: usize,
    /// Bytes of all retained messages.
    pub retained_bytes: u64,
    /// Sessions, connected or persisted.
    pub sessions: usize,
    /// QoS 1 messages kept for one offline persistent session (oldest dropped first).
    pub offline_messages: usize,
    /// Bytes of all offline sessions' queued messages together (oldest of the session
    /// dropped first; a message that alone does not fit is dropped).
    pub offline_bytes: u64,
    /// Named shadows one thing may have (live; and as many deleted ones kept for their
    /// versions, beyond which those are dropped). AWS sets no such quota.
    pub named_shadows_per_thing: usize,
    /// Shadows an account may store (classic, named and deleted ones kept for their
    /// versions), whatever their things' names. AWS sets no such quota.
    pub shadows_per_account: usize,
}

impl Default for Quotas {
    /// 100,000 retained messages (AWS's documented default) in at most 1 GiB; 100,000 sessions
    /// (one endpoint's connection cap); 1,000 queued messages per offline session, and 1 GiB
    /// of queued messages in all the account's offline sessions; 1,000 named shadows per
    /// thing and 1,000,000 shadows per account.
    fn default() -> Self {
        Quotas {
            retained_messages: 100_000,
            retained_bytes: 1 << 30,
            sessions: 100_000,
            offline_messages: 1000,
            offline_bytes: 1 << 30,
            named_shadows_per_thing: 1000,
            shadows_per_account: 1_000_000,
        }
    }
}

/// Bytes of an account's offline quota held by something outside the broker's queues (a
/// delayed will); given back when dropped.
pub struct OfflineReservation {
    broker: Arc<Broker>,
    account: String,
    bytes: u64,
}

impl Drop for OfflineReservation {
    fn drop(&mut self) {
        let mut inner = self.broker.lock();
        if let Some(acct) = inner.get_mut(&self.account) {
            acct.offline_bytes = acct.offline_bytes.saturating_sub(self.bytes);
        }
    }
}

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Deliveries buffered per connected client before new ones are dropped.
    pub queue_capacity: usize,
    /// Every account's quotas, unless it has its own.
    pub quotas: Quotas,
    /// Accounts with quotas of their own, by account id.
    pub account_quotas: HashMap<String, Quotas>,
    /// Every account's rate limits, unless it has its own.
    pub throttles: throttle::Throttles,
    /// Accounts with rate limits of their own, by account id.
    pub account_throttles: HashMap<String, throttle::Throttles>,
}

impl Default for BrokerConfig {
    /// 1,024 deliveries per connection queue, [`Quotas::default`] for every account.
    fn default() -> Self {
        BrokerConfig {
            queue_capacity: 1024,
            quotas: Quotas::default(),
            account_quotas: HashMap::new(),
            throttles: throttle::Throttles::default(),
            account_throttles: HashMap::new(),
        }
    }
}

impl BrokerConfig {
    /// The quotas of `account`.
    pub fn quotas(&self, account: &str) -> &Quotas {
        self.account_quotas.get(account).unwrap_or(&self.quotas)
    }

    /// The rate limits of `account`.
    pub fn throttles(&self, account: &str) -> &throttle::Throttles {
        self.account_throttles
            .get(account)
            .unwrap_or(&self.throttles)
    }
}

/// The bytes a message holds for quota purposes: its topic, payload and the properties it
/// carries (so that user properties and correlation data do not ride free).
pub fn weight(m: &Message) -> u64 {
    let p = &m.properties;
    let props = p.content_type.as_ref().map_or(0, |s| s.len())
        + p.response_topic.as_ref().map_or(0, |s| s.len())
        + p.correlation_data.as_ref().map_or(0, |b| b.len())
        + p.user_properties
            .iter()
            .map(|u| u.key.len() + u.value.len())
            .sum::<usize>();
    (m.topic.len() + m.payload.len() + props) as u64
}

struct Conn {
    tx: mpsc::Sender<Delivery>,
    kick: Option<oneshot::Sender<Kick>>,
    epoch: u64,
}

struct Session {
    client_id: Arc<str>,
    /// Whether durable storage holds it (a persistent session, on a durable broker).
    stored: bool,
    subscriptions: HashMap<String, SubscriptionOptions>,
    conn: Option<Conn>,
    /// The epoch of the last connection attached to it.
    epoch: u64,
    expiry: Duration,
    disconnected_at: Option<Instant>,
    queue: VecDeque<Delivery>,
}

/// Hashes the broker's own sequential session ids with one multiplication (Fibonacci hashing).
/// Only for keys the server assigns; client-chosen strings keep SipHash.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<SessionId, V, std::hash::BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct AccountState {
    /// The account id, shared by the changes journaled for it.
    name: Arc<str>,
    trie: Trie,
    sessions: IdMap<Session>,
    by_client: HashMap<String, SessionId>,
    retained: BTreeMap<String, Arc<Message>>,
    /// Bytes of `retained`.
    retained_bytes: u64,
    /// Bytes queued in all offline sessions.
    offline_bytes: u64,
    /// Rate limits: CONNECTs, subscriptions and inbound publishes of the account, and CONNECTs
    /// per client id (entries pruned once they are full again).
    connects: Option<throttle::Bucket>,
    subscribes: Option<throttle::Bucket>,
    publishes: Option<throttle::Bucket>,
    client_connects: HashMap<String, throttle::Bucket>,
    /// Delayed wills waiting, by client id: (id, whether stored, the sender whose drop tells
    /// the waiting task it was cancelled). A connection of the client id cancels them.
    wills: HashMap<String, Vec<(u64, bool, oneshot::Sender<()>)>>,
    /// How many of this account's subscriptions use each filter (as subscribed), for the
    /// interest told to `peers`.
    /// (count, the interest number the cluster gave its first subscription).
    filters: HashMap<Box<str>, (u32, u64)>,
    /// The cluster's other nodes, if any.
    peers: Option<Arc<dyn peers::Peers>>,
}

/// Storage forgets a stored delivery (acknowledged, expired or given up).
fn forget(journal: Option<&durable::Journal>, account: &Arc<str>, client_id: &Arc<str>, seq: u64) {
    if let Some(j) = journal
        && seq != 0
    {
        j.record_quietly(durable::Change::Ack {
            account: account.clone(),
            client_id: client_id.clone(),
            seq,
        });
    }
}

/// Storage keeps a persistent session as it now is (nothing for a session that is not
/// stored). With `wait`, returns the journal ticket to wait for; else 0.
fn record_session(
    journal: Option<&durable::Journal>,
    account: &Arc<str>,
    s: &Session,
    wait: bool,
) -> u64 {
    let Some(j) = journal.filter(|_| s.stored) else {
        return 0;
    };
    let change = durable::Change::PutSession {
        account: account.clone(),
        client_id: s.client_id.clone(),
        session: AccountState::stored(s),
    };
    if wait {
        j.record(change)
    } else {
        j.record_quietly(change);
        0
    }
}

impl AccountState {
    fn new(name: &str, peers: Option<&Arc<dyn peers::Peers>>) -> AccountState {
        AccountState {
            name: Arc::from(name),
            peers: peers.cloned(),
            ..AccountState::default()
        }
    }

    /// Adds (or replaces) a session's subscription, counting its filter for the interest.
    /// Returns the interest number the cluster gave the filter (0: no cluster), which the
    /// SUBACK waits for.
    fn add_subscription(&mut self, id: SessionId, filter: &str, entry: SubEntry) -> u64 {
        if !self.trie.insert(id, filter, entry) {
            return self.filters.get(filter).map_or(0, |f| f.1);
        }
        let (n, mark) = self.filters.entry(filter.into()).or_insert((0, 0));
        *n += 1;
        if *n == 1
            && let Some(p) = &self.peers
        {
            *mark = p.interest(&self.name, filter, true);
        }
        *mark
    }

    /// Removes a session's subscription, if it has it.
    fn remove_subscription(&mut self, id: SessionId, filter: &str) {
        if !self.trie.remove(id, filter) {
            return;
        }
        if let Some((n, _)) = self.filters.get_mut(filter) {
            *n -= 1;
            if *n == 0 {
                self.filters.remove(filter);
                if let Some(p) = &self.peers {
                    p.interest(&self.name, filter, false);
                }
            }
        }
    }

    /// The session as stored.
    fn stored(s: &Session) -> durable::StoredSession {
        durable::StoredSession {
            expiry: s.expiry,
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(f, o)| (f.clone(), *o))
                .collect(),
            connected: s.conn.is_some(),
        }
    }

    /// Ends a session: dropped from memory, and from storage if it was stored. Returns the
    /// journal ticket of the deletion (0: nothing stored).
    fn end_session(&mut self, id: SessionId, journal: Option<&durable::Journal>) -> u64 {
        match (self.drop_session(id), journal) {
            (Some(s), Some(j)) if s.stored => j.record(durable::Change::DeleteSession {
                account: self.name.clone(),
                client_id: s.client_id.clone(),
            }),
            _ => 0,
        }
    }

    fn drop_session(&mut self, id: SessionId) -> Option<Session> {
        let s = self.sessions.remove(&id)?;
        self.offline_bytes = self
            .offline_bytes
            .saturating_sub(s.queue.iter().map(|d| weight(&d.message)).sum::<u64>());
        for f in s.subscriptions.keys() {
            self.remove_subscription(id, f);
        }
        if self.by_client.get(&*s.client_id) == Some(&id) {
            self.by_client.remove(&*s.client_id);
        }
        Some(s)
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Deliveries handed to a connection's queue.
    pub delivered: AtomicU64,
    /// Deliveries dropped because a queue was full.
    pub dropped_full: AtomicU64,
    /// Deliveries queued for offline persistent sessions.
    pub queued_offline: AtomicU64,
    /// Operations refused by a rate limit, by [`throttle::Throttled::ALL`] order.
    pub throttled: [AtomicU64; 5],
}

impl Stats {
    /// Counts one throttled operation.
    pub fn throttled(&self, why: throttle::Throttled) {
        if let Some(i) = throttle::Throttled::ALL.iter().position(|t| *t == why) {
            self.throttled[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A delivery that did not fit into its connection's queue.
#[derive(Debug)]
pub struct Blocked {
    /// The receiving session.
    pub session: SessionId,
    /// Its queue.
    pub tx: mpsc::Sender<Delivery>,
    /// The delivery.
    pub delivery: Delivery,
}

/// The result of [`Broker::publish`].
#[derive(Debug, Default)]
pub struct Routed {
    /// Sessions that got the message (queued, or stored offline).
    pub reached: usize,
    /// Deliveries waiting for room in a full queue.
    pub blocked: Vec<Blocked>,
    /// The journal ticket to wait for before acknowledging the publish (0: none).
    pub ticket: u64,
}

/// Errors of [`Broker::publish`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The account's retained-message quota is full.
    #[error("retained message quota exceeded")]
    RetainedQuota,
    /// The account's inbound publish rate is exceeded.
    #[error("publish rate exceeded")]
    Throttled,
}

/// Where a routed message comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source<'a> {
    /// A client: counted against the account's publish rate.
    Client,
    /// This node's services, events and wills.
    Local,
    /// Another node of the cluster.
    Peer,
    /// Another node of the cluster (or this one, back through NATS), for one member of this
    /// shared subscription (`$share/{group}/{filter}`, exactly).
    PeerGroup(&'a str),
}

/// How long a publish waits for room in full queues before giving up its deliveries: at QoS 0
/// briefly, at QoS 1 long enough to slow the publisher down (backpressure) instead of the
/// broker buffering without bound.
const QOS0_WAIT: Duration = Duration::from_millis(50);
const QOS1_WAIT: Duration = Duration::from_secs(2);

/// Waits (until one deadline from `now`) for room for blocked deliveries
/// ([`Routed::blocked`]); gives up what does not fit ([`Broker::give_up`]).
pub async fn wait_for_room(
    broker: &Broker,
    account: &str,
    blocked: Vec<Blocked>,
    now: tokio::time::Instant,
) {
    if blocked.is_empty() {
        return;
    }
    let qos1 = blocked.iter().any(|b| b.delivery.qos == QoS::AtLeastOnce);
    let deadline = now + if qos1 { QOS1_WAIT } else { QOS0_WAIT };
    for b in blocked {
        match tokio::time::timeout_at(deadline, b.tx.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(b.delivery);
                broker.note_blocked(true);
            }
            // Given up: a stored delivery goes back to its session or is forgotten.
            _ => broker.give_up(account, b.session, b.delivery),
        }
    }
}

/// The broker. Cheap to share behind an `Arc`.
pub struct Broker {
    config: BrokerConfig,
    inner: Mutex<HashMap<String, AccountState>>,
    next_id: AtomicU64,
    /// Durable state, when the broker keeps any.
    journal: Option<Arc<durable::Journal>>,
    /// Delayed wills loaded from storage, until the gateway takes them.
    restored_wills: Mutex<Vec<DelayedWill>>,
    /// The cluster's other nodes, once attached.
    peers: OnceLock<Arc<dyn peers::Peers>>,
    /// Counters.
    pub stats: Stats,
}

/// A will that waits for its Will Delay Interval (or its session's end, if sooner). Any
/// connection of its client id before it is due cancels it ([`Broker::claim_will`]).
#[derive(Debug)]
pub struct DelayedWill {
    /// Its id (for [`Broker::claim_will`]).
    pub id: u64,
    /// Account.
    pub account: String,
    /// Client id of the connection that left it.
    pub client_id: String,
    /// The certificate that connection authenticated with (`None`: an IAM principal; such a
    /// will is not stored, as its credentials are not).
    pub certificate: Option<String>,
    /// The connection that left it (0 for a will loaded from storage).
    pub epoch: u64,
    /// When it is due.
    pub at: Instant,
    /// The message: `expires_at` unset, its Message Expiry Interval (from publication) in its
    /// properties. [`DelayedWill::message`] makes the message to publish.
    pub template: Message,
    /// For a will loaded from storage: resolves when a connection of its client id cancels it
    /// (a deferred will gets its own from [`Broker::defer_will`]).
    pub cancelled: Option<oneshot::Receiver<()>>,
}

impl DelayedWill {
    /// The message, published at `now` (its expiry counts from then), stamped `timestamp_ms`.
    pub fn message(&self, now: Instant, timestamp_ms: u64) -> Message {
        Message::from_will(&self.template, now, timestamp_ms)
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker with `config`.
    pub fn new(config: BrokerConfig) -> Broker {
        Broker {
            config,
            inner: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            journal: None,
            restored_wills: Mutex::new(Vec::new()),
            peers: OnceLock::new(),
            stats: Stats::default(),
        }
    }

    /// Holds a delayed will until it is due: stored, for a certificate principal on a durable
    /// broker, so that it survives a restart. Call it after [`Broker::disconnect`] of the
    /// connection that leaves it (a delayed will needs a persistent session, which outlives
    /// that). Sets `will.id`; returns what resolves when a connection of the client id
    /// cancels it, or `None` if one already has: a connection newer than `will.epoch` holds
    /// the session (it took it over while this one was ending), or the session is gone (a
    /// clean-start connection ended it).
    pub fn defer_will(&self, will: &mut DelayedWill) -> Option<oneshot::Receiver<()>> {
        will.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let acct = inner
            .entry(will.account.clone())
            .or_insert_with(|| AccountState::new(&will.account, self.peers.get()));
        let superseded = acct
            .by_client
            .get(&will.client_id)
            .and_then(|id| acct.sessions.get(id))
            .is_none_or(|s| s.epoch > will.epoch);
        if superseded {
            return None;
        }
        let stored = self.journal.is_some() && will.certificate.is_some();
        if let (Some(j), Some(cert)) = (&self.journal, &will.certificate) {
            j.record_quietly(durable::Change::PutWill {
                account: acct.name.clone(),
                id: will.id,
                at: will.at,
                will: durable::StoredWill {
                    client_id: Arc::from(will.client_id.as_str()),
                    certificate: Arc::from(cert.as_str()),
                    message: Arc::new(will.template.clone()),
                },
            });
        }
        let (wake, cancelled) = oneshot::channel();
        acct.wills
            .entry(will.client_id.clone())
            .or_default()
            .push((will.id, stored, wake));
        Some(cancelled)
    }

    /// A delayed will is due: true if it is still to be sent, false if a connection of its
    /// client id cancelled it meanwhile, or the client id is connected now ([MQTT-3.1.3-9]).
    /// Either way storage forgets it.
    pub fn claim_will(&self, will: &DelayedWill) -> bool {
        let mut inner = self.lock();
        let Some(acct) = inner.get_mut(&will.account) else {
            return false;
        };
        let Some(wills) = acct.wills.get_mut(&will.client_id) else {
            return false;
        };
        let Some(i) = wills.iter().position(|(id, _, _)| *id == will.id) else {
            return false;
        };
        let (_, stored, _) = wills.swap_remove(i);
        if wills.is_empty() {
            acct.wills.remove(&will.client_id);
        }
        if let Some(j) = self.journal.as_deref().filter(|_| stored) {
            j.record_quietly(durable::Change::DeleteWill {
                account: acct.name.clone(),
                id: will.id,
            });
        }
        let connected = acct
            .by_client
            .get(&will.client_id)
            .and_then(|id| acct.sessions.get(id))
            .is_some_and(|s| s.conn.is_some());
        !connected
    }

    /// The delayed wills loaded from storage at start-up (once: the caller schedules them).
    pub fn take_restored_wills(&self) -> Vec<DelayedWill> {
        std::mem::take(
            &mut *self
                .restored_wills
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// A broker that keeps persistent sessions, their queued and unacknowledged QoS 1 messages
    /// and retained messages in `journal`'s storage, starting from what it held (`snapshot`,
    /// loaded at `clock`). Sessions that were connected when the server stopped are taken as
    /// left at `clock` (their expiry never comes early); expired sessions and messages, and
    /// messages older than [`durable::REDELIVERY_WINDOW`], are dropped (and from storage too).
    pub fn durable(
        config: BrokerConfig,
        journal: durable::Journal,
        snapshot: durable::Snapshot,
        clock: durable::WallClock,
    ) -> Broker {
        let mut b = Broker::new(config);
        let journal = Arc::new(journal);
        b.journal = Some(journal.clone());
        let mut max_seq = 0;
        let oldest_ms = clock
            .now_ms
            .saturating_sub(durable::REDELIVERY_WINDOW.as_millis() as u64);
        let message = |m: durable::LoadedMessage| -> Option<Arc<Message>> {
            let expires_at = m.expires_at_ms.map(|ms| clock.instant(ms));
            if m.expires_at_ms.is_some_and(|ms| ms <= clock.now_ms) {
                return None;
            }
            Some(Arc::new(Message {
                expires_at,
                origin: None,
                ..m.message
            }))
        };
        {
            let mut inner = b.lock();
            for (account, m) in snapshot.retained {
                let topic: Arc<str> = m.message.topic.clone();
                let acct = inner
                    .entry(account.clone())
                    .or_insert_with(|| AccountState::new(&account, None));
                match message(m) {
                    Some(m) => {
                        acct.retained_bytes += weight(&m);
                        acct.retained.insert(topic.to_string(), m);
                    }
                    None => journal.record_quietly(durable::Change::SetRetained {
                        account: acct.name.clone(),
                        topic,
                        message: None,
                        published: false,
                    }),
                }
            }
            for l in snapshot.sessions {
                let acct = inner
                    .entry(l.account.clone())
                    .or_insert_with(|| AccountState::new(&l.account, None));
                let client_id: Arc<str> = Arc::from(l.client_id.as_str());
                let left_ms = l.disconnected_at_ms.unwrap_or(clock.now_ms);
                let expired =
                    left_ms.saturating_add(l.session.expiry.as_millis() as u64) <= clock.now_ms;
                if expired || l.session.expiry.is_zero() {
                    journal.record_quietly(durable::Change::DeleteSession {
                        account: acct.name.clone(),
                        client_id,
                    });
                    continue;
                }
                let id = b.next_id.fetch_add(1, Ordering::Relaxed);
                let mut queue = VecDeque::new();
                for q in l.queue {
                    let seq = q.seq;
                    max_seq = max_seq.max(seq);
                    let too_old = q.message.message.timestamp_ms < oldest_ms;
                    match message(q.message).filter(|_| !too_old) {
                        Some(message) => {
                            acct.offline_bytes += weight(&message);
                            queue.push_back(Delivery {
                                message,
                                qos: QoS::AtLeastOnce,
                                retain: q.retain,
                                resend: q.packet_id,
                                seq,
                                shared: q.shared,
                            });
                        }
                        None => journal.record_quietly(durable::Change::Ack {
                            account: acct.name.clone(),
                            client_id: client_id.clone(),
                            seq,
                        }),
                    }
                }
                let mut subscriptions = HashMap::new();
                for (filter, options) in l.session.subscriptions.iter().cloned() {
                    acct.add_subscription(id, &filter, SubEntry { options });
                    subscriptions.insert(filter, options);
                }
                // The clock restarts: left now if it was connected (and stored so, or every
                // restart would start it again), else when it was left.
                let left = clock.instant(left_ms);
                if l.disconnected_at_ms.is_none() {
                    journal.record_quietly(durable::Change::PutSession {
                        account: acct.name.clone(),
                        client_id: client_id.clone(),
                        session: durable::StoredSession {
                            connected: false,
                            ..l.session.clone()
                        },
                    });
                }
                acct.by_client.insert(l.client_id, id);
                acct.sessions.insert(
                    id,
                    Session {
                        client_id,
                        stored: true,
                        subscriptions,
                        conn: None,
                        epoch: 0,
                        expiry: l.session.expiry,
                        disconnected_at: Some(left),
                        queue,
                    },
                );
            }
        }
        let mut wills = Vec::with_capacity(snapshot.wills.len());
        for w in snapshot.wills {
            max_seq = max_seq.max(w.id);
            let (wake, cancelled) = oneshot::channel();
            b.lock()
                .entry(w.account.clone())
                .or_insert_with(|| AccountState::new(&w.account, None))
                .wills
                .entry(w.will.client_id.to_string())
                .or_default()
                .push((w.id, true, wake));
            wills.push(DelayedWill {
                id: w.id,
                account: w.account,
                client_id: w.will.client_id.to_string(),
                certificate: Some(w.will.certificate.to_string()),
                epoch: 0,
                at: clock.instant(w.at_ms),
                template: (*w.will.message).clone(),
                cancelled: Some(cancelled),
            });
        }
        b.restored_wills = Mutex::new(wills);
        b.next_id.fetch_max(max_seq + 1, Ordering::Relaxed);
        b
    }

    /// Admits a CONNECT of `client_id` at `now`, or says which rate it exceeds (the account's,
    /// or the client id's: AWS allows one a second).
    pub fn admit_connect(
        &self,
        account: &str,
        client_id: &str,
        now: Instant,
    ) -> Result<(), throttle::Throttled> {
        let t = *self.config.throttles(account);
        let mut inner = self.lock();
        let acct = inner
            .entry(account.to_owned())
            .or_insert_with(|| AccountState::new(account, self.peers.get()));
        let why = if !acct
            .connects
            .get_or_insert_with(|| {
                throttle::Bucket::new(t.connects_per_account, t.connects_per_account)
            })
            .take(now, 1)
        {
            Some(throttle::Throttled::AccountConnectRate)
        } else {
            if acct.client_connects.len() >= 10_000 {
                // Forget client ids whose bucket has refilled: they are no longer limited.
                acct.client_connects
                    .retain(|_, b| !b.clone().take(now, t.connects_per_client_id.max(1)));
            }
            let ok = acct
                .client_connects
                .entry(client_id.to_owned())
                .or_insert_with(|| {
                    throttle::Bucket::new(t.connects_per_client_id, t.connects_per_client_id)
                })
                .take(now, 1);
            (!ok).then_some(throttle::Throttled::ClientConnectRate)
        };
        match why {
            Some(w) => {
                self.stats.throttled(w);
                Err(w)
            }
            None => Ok(()),
        }
    }

    /// Admits `n` subscriptions of the account at `now` (AWS: 500 a second per account).
    pub fn admit_subscriptions(&self, account: &str, n: u32, now: Instant) -> bool {
        let t = *self.config.throttles(account);
        let mut inner = self.lock();
        let acct = inner
            .entry(account.to_owned())
            .or_insert_with(|| AccountState::new(account, self.peers.get()));
        let ok = acct
            .subscribes
            .get_or_insert_with(|| {
                throttle::Bucket::new(t.subscriptions_per_account, t.subscriptions_per_account)
            })
            .take(now, n);
        if !ok {
            self.stats
                .throttled(throttle::Throttled::AccountSubscribeRate);
        }
        ok
    }

    /// The quotas of `account`.
    pub fn quotas(&self, account: &str) -> &Quotas {
        self.config.quotas(account)
    }

    /// The rate limits of `account`.
    pub fn throttles(&self, account: &str) -> throttle::Throttles {
        *self.config.throttles(account)
    }

    /// The journal of a durable broker.
    pub fn journal(&self) -> Option<&Arc<durable::Journal>> {
        self.journal.as_ref()
    }

    /// Waits until the changes up to `ticket` are durable (at once without a journal). False
    /// when storage failed: the caller must not acknowledge.
    pub async fn durable_until(&self, ticket: u64) -> bool {
        match &self.journal {
            Some(j) => j.wait(ticket).await,
            None => true,
        }
    }

    /// The client acknowledged a stored delivery (or the connection dropped it for good):
    /// storage forgets it. Needs no lock; the message was appended before it was delivered.
    pub fn acked(&self, account: &str, client_id: &str, seq: u64) {
        if seq == 0 {
            return;
        }
        if let Some(j) = &self.journal {
            j.record_quietly(durable::Change::Ack {
                account: Arc::from(account),
                client_id: Arc::from(client_id),
                seq,
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AccountState>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a connection to the session of `client_id` in `account`. An existing
    /// connection with that client id is kicked ([`Kick::TakenOver`]). With `clean_start`, or
    /// when no session exists, a new session starts; otherwise the stored session resumes and
    /// its queued messages are delivered first. `expiry` is how long the session outlives
    /// the connection (zero: a clean session). A session whose expiry has passed at `now` is
    /// not resumed, whether or not a sweep has removed it yet ([MQTT-3.1.2-23]).
    pub fn connect(
        &self,
        account: &str,
        client_id: &str,
        clean_start: bool,
        expiry: Duration,
        now: Instant,
    ) -> Attached {
        let (tx, rx) = mpsc::channel(self.config.queue_capacity);
        let (kick_tx, kick_rx) = oneshot::channel();
        let mut inner = self.lock();
        // Under the lock: a later epoch is a later attachment to the client id.
        let epoch = self.next_id.fetch_add(1, Ordering::Relaxed);
        let acct = inner
            .entry(account.to_owned())
            .or_insert_with(|| AccountState::new(account, self.peers.get()));
        // A connection of the client id cancels its delayed wills ([MQTT-3.1.3-9]), durably
        // before its CONNACK (else a crash could bring a cancelled will back). Dropping their
        // senders wakes the tasks that hold them.
        let mut cancelled = 0;
        if let Some(wills) = acct.wills.remove(client_id) {
            for (id, stored, _wake) in wills {
                if let Some(j) = self.journal.as_deref().filter(|_| stored) {
                    cancelled = j.record(durable::Change::DeleteWill {
                        account: acct.name.clone(),
                        id,
                    });
                }
            }
        }
        let existing = acct.by_client.get(client_id).copied();
        if let Some(id) = existing
            && let Some(s) = acct.sessions.get_mut(&id)
            && let Some(mut old) = s.conn.take()
            && let Some(k) = old.kick.take()
        {
            let _ = k.send(Kick::TakenOver);
        }
        let resumable = existing.filter(|id| {
            !clean_start
                && acct.sessions.get(id).is_some_and(|s| {
                    !s.expiry.is_zero() && s.disconnected_at.is_none_or(|d| now < d + s.expiry)
                })
        });
        let conn = Conn {
            tx,
            kick: Some(kick_tx),
            epoch,
        };
        match resumable {
            Some(id) => {
                let s = acct.sessions.get_mut(&id).expect("checked above");
                s.expiry = expiry;
                s.disconnected_at = None;
                let mut replay = VecDeque::with_capacity(s.queue.len());
                while let Some(d) = s.queue.pop_front() {
                    acct.offline_bytes = acct.offline_bytes.saturating_sub(weight(&d.message));
                    if d.message.expired(now) {
                        if let Some(j) = &self.journal
                            && d.seq != 0
                        {
                            j.record_quietly(durable::Change::Ack {
                                account: acct.name.clone(),
                                client_id: s.client_id.clone(),
                                seq: d.seq,
                            });
                        }
                        continue;
                    }
                    replay.push_back(d);
                }
                s.conn = Some(conn);
                s.epoch = epoch;
                let ticket =
                    record_session(self.journal.as_deref(), &acct.name, s, true).max(cancelled);
                Attached {
                    session: id,
                    epoch,
                    session_present: true,
                    rx,
                    kick: kick_rx,
                    ticket,
                    replay,
                }
            }
            None => {
                // A clean start ends the stored session: its CONNACK waits for that too.
                let ended = existing.map_or(0, |id| acct.end_session(id, self.journal.as_deref()));
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let session = Session {
                    client_id: Arc::from(client_id),
                    stored: self.journal.is_some() && !expiry.is_zero(),
                    subscriptions: HashMap::new(),
                    conn: Some(conn),
                    epoch,
                    expiry,
                    disconnected_at: None,
                    queue: VecDeque::new(),
                };
                // Waiting for the new session's write waits for the deletion before it too.
                let ticket = record_session(self.journal.as_deref(), &acct.name, &session, true)
                    .max(ended)
                    .max(cancelled);
                acct.sessions.insert(id, session);
                acct.by_client.insert(client_id.to_owned(), id);
                Attached {
                    session: id,
                    epoch,
                    session_present: false,
                    rx,
                    kick: kick_rx,
                    ticket,
                    replay: VecDeque::new(),
                }
            }
        }
    }

    /// Detaches connection `epoch` from its session at `now`, with the QoS 1 deliveries it
    /// sent but that were not acknowledged (oldest first) and its delivery queue `rx`, which is
    /// closed and emptied under the broker's lock (so no delivery falls between the two). A
    /// connection that was taken over hands its QoS 1 deliveries to the connection that took
    /// the session; otherwise a persistent session keeps them at the front of its offline
    /// queue, to be sent again on resumption, and a clean session ends with them. `expiry`
    /// replaces the session expiry when given (MQTT 5 DISCONNECT). Returns the journal ticket
    /// of a session that ended (0: none).
    #[allow(clippy::too_many_arguments)]
    pub fn disconnect(
        &self,
        account: &str,
        session: SessionId,
        epoch: u64,
        expiry: Option<Duration>,
        mut unacked: Vec<Delivery>,
        rx: Option<mpsc::Receiver<Delivery>>,
        now: Instant,
    ) -> u64 {
        let quotas = *self.config.quotas(account);
        let journal = self.journal.as_deref();
        let mut inner = self.lock();
        let Some(acct) = inner.get_mut(account) else {
            return 0;
        };
        let Some(s) = acct.sessions.get_mut(&session) else {
            return 0;
        };
        if let Some(mut rx) = rx {
            rx.close();
            while let Ok(d) = rx.try_recv() {
                if d.qos == QoS::AtLeastOnce {
                    unacked.push(d);
                }
            }
        }
        if let Some(c) = &s.conn
            && c.epoch != epoch
        {
            // Taken over: the new connection sends them.
            for d in unacked {
                if let Err(e) = c.tx.try_send(d) {
                    self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                    forget(journal, &acct.name, &s.client_id, e.into_inner().seq);
                }
            }
            return 0;
        }
        let was_connected = s.conn.take().is_some();
        if let Some(e) = expiry {
            s.expiry = e;
        }
        if s.expiry.is_zero() {
            return acct.end_session(session, journal);
        }
        if was_connected || s.disconnected_at.is_none() {
            s.disconnected_at = Some(now);
        }
        let mut full = false;
        for d in unacked.into_iter().rev() {
            let w = weight(&d.message);
            if full
                || d.message.expired(now)
                || s.queue.len() >= quotas.offline_messages
                || acct.offline_bytes + w > quotas.offline_bytes
            {
                if !d.message.expired(now) {
                    full = true;
                    self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                }
                forget(journal, &acct.name, &s.client_id, d.seq);
                continue;
            }
            if let (Some(packet_id), Some(j)) = (d.resend, journal)
                && d.seq != 0
            {
                j.record_quietly(durable::Change::Sent {
                    account: acct.name.clone(),
                    client_id: s.client_id.clone(),
                    seq: d.seq,
                    packet_id,
                });
            }
            acct.offline_bytes += w;
            s.queue.push_front(d);
        }
        record_session(journal, &acct.name, s, false);
        0
    }

    /// A delivery that waited for room in a connection's queue and got none: a stored one goes
    /// back to its session if the session has gone offline meanwhile (sent on resumption),
    /// else storage forgets it too; counted in [`Stats::dropped_full`].
    pub fn give_up(&self, account: &str, session: SessionId, d: Delivery) {
        self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
        if d.seq == 0 {
            return;
        }
        let quotas = *self.config.quotas(account);
        let mut inner = self.lock();
        let Some(acct) = inner.get_mut(account) else {
            return;
        };
        let Some(s) = acct.sessions.get_mut(&session) else {
            return;
        };
        let w = weight(&d.message);
        if s.conn.is_none()
            && s.queue.len() < quotas.offline_messages
            && acct.offline_bytes + w <= quotas.offline_bytes
        {
            acct.offline_bytes += w;
            s.queue.push_back(d);
        } else {
            forget(self.journal.as_deref(), &acct.name, &s.client_id, d.seq);
        }
    }

    /// Ends one specific connection (client id and epoch), if it is still the session's
    /// current connection. Returns whether it was.
    pub fn kick_connection(&self, account: &str, client_id: &str, epoch: u64, kick: Kick) -> bool {
        let mut inner = self.lock();
        let Some(acct) = inner.get_mut(account) else {
            return false;
        };
        let Some(id) = acct.by_client.get(client_id).copied() else {
            return false;
        };
        let Some(conn) = acct.sessions.get_mut(&id).and_then(|s| s.conn.as_mut()) else {
            return false;
        };
        if conn.epoch != epoch {
            return false;
        }
        conn.kick
            .take()
            .map(|k| k.send(kick).is_ok())
            .unwrap_or(false)
    }

    /// Hands `d` to connection `epoch` of a client id only (a service's answer meant for that
    /// connection alone, such as a provisioning answer), if that connection is there and its
    /// queue has room (else `d` comes back, for the caller to try again). Nothing is stored
    /// for the session.
    pub fn deliver_to_connection(
        &self,
        account: &str,
        client_id: &str,
        epoch: u64,
        d: Delivery,
    ) -> Direct {
        let inner = self.lock();
        let Some(conn) = inner
            .get(account)
            .and_then(|acct| {
                let id = acct.by_client.get(client_id)?;
                acct.sessions.get(id)
            })
            .and_then(|s| s.conn.as_ref())
            .filter(|c| c.epoch == epoch)
        else {
            return Direct::Gone;
        };
        match conn.tx.try_send(d) {
            Ok(()) => Direct::Delivered,
            Err(mpsc::error::TrySendError::Full(d)) => Direct::Full(d),
            Err(mpsc::error::TrySendError::Closed(_)) => Direct::Gone,
        }
    }

    /// Ends the current connection of a client id, whatever its epoch (iot-data
    /// DeleteConnection). Returns whether there was one.
    pub fn kick_client(&self, account: &str, client_id: &str, kick: Kick) -> bool {
        let mut inner = self.lock();
        let Some(acct) = inner.get_mut(account) else {
            return false;
        };
        let Some(id) = acct.by_client.get(client_id).copied() else {
            return false;
        };
        acct.sessions
            .get_mut(&id)
            .and_then(|s| s.conn.as_mut())
            .and_then(|c| c.kick.take())
            .is_some_and(|k| k.send(kick).is_ok())
    }

    /// One page of an account's retained messages in topic order, starting after `after`;
    /// returns the page and the last topic when more follow (iot-data ListRetainedMessages).
    pub fn retained_page(
        &self,
        account: &str,
        after: Option<&str>,
        max: usize,
        now: Instant,
    ) -> (Vec<Arc<Message>>, Option<String>) {
        let inner = self.lock();
        let Some(acct) = inner.get(account) else {
            return (Vec::new(), None);
        };
        let mut live = acct
            .retained
            .iter()
            .filter(|(t, _)| after.is_none_or(|a| t.as_str() > a))
            .filter(|(_, m)| !m.expired(now));
        let page: Vec<Arc<Message>> = live.by_ref().take(max).map(|(_, m)| m.clone()).collect();
        let next = if live.next().is_some() {
            page.last().map(|m| m.topic.to_string())
        } else {
            None
        };
        (page, next)
    }

    /// Every retained message of every account (for a cluster node's start-up, which makes
    /// its copy agree with the cluster's).
    pub fn retained_all(&self) -> Vec<(String, Arc<Message>)> {
        let inner = self.lock();
        inner
            .iter()
            .flat_map(|(a, acct)| acct.retained.values().map(|m| (a.clone(), m.clone())))
            .collect()
    }

    /// Ends every connection with [`Kick::Shutdown`].
    pub fn shutdown(&self) {
        self.kick_all(Kick::Shutdown);
    }

    /// Ends every connection with `kick` (a cluster node cut off from the others ends its
    /// connections as shutting down, so that they reconnect to a node that is not). Returns
    /// how many.
    pub fn kick_all(&self, kick: Kick) -> usize {
        let mut inner = self.lock();
        let mut n = 0;
        for acct in inner.values_mut() {
            for s in acct.sessions.values_mut() {
                if let Some(conn) = s.conn.as_mut()
                    && let Some(k) = conn.kick.take()
                {
                    n += usize::from(k.send(kick).is_ok());
                }
            }
        }
        n
    }

    /// Removes persistent sessions whose expiry has passed at `now`. Returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        let mut n = 0;
        for acct in inner.values_mut() {
            let expired: Vec<SessionId> = acct
                .sessions
                .iter()
                .filter(|(_, s)| {
                    s.conn.is_none() && s.disconnected_at.is_some_and(|d| now >= d + s.expiry)
                })
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                let _ = acct.end_session(id, self.journal.as_deref());
                n += 1;
            }
        }
        n
    }

    /// Number of subscriptions of a session.
    pub fn subscription_count(&self, account: &str, session: SessionId) -> usize {
        self.lock()
            .get(account)
            .and_then(|a| a.sessions.get(&session))
            .map_or(0, |s| s.subscriptions.len())
    }

    /// Adds (or replaces) a subscription. Returns whether it is new, and the journal ticket to
    /// wait for before SUBACK (0: none).
    pub fn subscribe(
        &self,
        account: &str,
        session: SessionId,
        filter: &str,
        options: SubscriptionOptions,
    ) -> (bool, u64) {
        let (new, ticket, _) = self.subscribe_marked(account, session, filter, options);
        (new, ticket)
    }

    /// [`Broker::subscribe`], and the cluster's interest number for the filter (0: none), for
    /// [`peers::Peers::interest_done`]: the other nodes route the filter here once it is done.
    pub fn subscribe_marked(
        &self,
        account: &str,
        session: SessionId,
        filter: &str,
        options: SubscriptionOptions,
    ) -> (bool, u64, u64) {
        let mut inner = self.lock();
        let acct = inner
            .entry(account.to_owned())
            .or_insert_with(|| AccountState::new(account, self.peers.get()));
        let Some(s) = acct.sessions.get_mut(&session) else {
            return (false, 0, 0);
        };
        let new = s.subscriptions.insert(filter.to_owned(), options).is_none();
        let ticket = record_session(self.journal.as_deref(), &acct.name, s, true);
        let mark = acct.add_subscription(session, filter, SubEntry { options });
        (new, ticket, mark)
    }

    /// Removes a subscription. Returns whether it existed, and the journal ticket to wait for
    /// before UNSUBACK (0: none).
    pub fn unsubscribe(&self, account: &str, session: SessionId, filter: &str) -> (bool, u64) {
        let mut inner = self.lock();
        let Some(acct) = inner.get_mut(account) else {
            return (false, 0);
        };
        let Some(s) = acct.sessions.get_mut(&session) else {
            return (false, 0);
        };
        if s.subscriptions.remove(filter).is_some() {
            let ticket = record_session(self.journal.as_deref(), &acct.name, s, true);
            acct.remove_subscription(session, filter);
            (true, ticket)
        } else {
            (false, 0)
        }
    }

    /// The retained message AWS delivers for a new subscription: only for a filter equal to
    /// the topic (no wildcards, no `$share`).
    pub fn retained_for(&self, account: &str, filter: &str, now: Instant) -> Option<Arc<Message>> {
        if filter.contains(['+', '#']) || filter.starts_with("$share/") {
            return None;
        }
        let inner = self.lock();
        inner
            .get(account)?
            .retained
            .get(filter)
            .filter(|m| !m.expired(now))
            .cloned()
    }

    /// Publishes a message: stores or clears the retained copy, then delivers it to every
    /// matching session (once per session, at the highest granted QoS; one member per shared
    /// group). Deliveries whose connection queue is full come back in [`Routed::blocked`]:
    /// the publisher waits for room (backpressure) or drops them by its own rule. Never blocks.
    pub fn publish(
        &self,
        account: &str,
        msg: Arc<Message>,
        now: Instant,
    ) -> Result<Routed, PublishError> {
        self.route(account, msg, Source::Local, now)
    }

    /// [`Broker::publish`] for a message a client sent: counted against the account's inbound
    /// publish rate first ([`PublishError::Throttled`] when over it, nothing routed).
    pub fn publish_from_client(
        &self,
        account: &str,
        msg: Arc<Message>,
        now: Instant,
    ) -> Result<Routed, PublishError> {
        self.route(account, msg, Source::Client, now)
    }

    /// Takes `n` publishes from the account's publish rate without routing anything (what a
    /// service counts for a request, as the Device Shadow service's update counts several);
    /// false, and nothing taken, past the rate.
    pub fn charge_publishes(&self, account: &str, n: u32, now: Instant) -> bool {
        let rate = self.config.throttles(account).publishes_per_account;
        let mut inner = self.lock();
        let acct = inner
            .entry(account.to_owned())
            .or_insert_with(|| AccountState::new(account, self.peers.get()));
        let ok = acct
            .publishes
            .get_or_insert_with(|| throttle::Bucket::new(rate, rate))
            .take(now, n);
        if !ok {
            self.stats
                .throttled(throttle::Throttled::AccountPublishRate);
        }
        ok
    }

    /// Attaches the cluster's other nodes: tells them the interest of every subscription held
    /// now (sessions loaded from storage), then of every change, and forwards every message
    /// published here from now on. Once; false if peers were attached already.
    pub fn attach_peers(&self, peers: Arc<dyn peers::Peers>) -> bool {
        let mut inner = self.lock();
        if self.peers.set(peers.clone()).is_err() {
            return false;
        }
        for acct in inner.values_mut() {
            for (filter, (_, mark)) in acct.filters.iter_mut() {
                *mark = peers.interest(&acct.name, filter, true);
            }
            acct.peers = Some(peers.clone());
        }
        true
    }

    /// The cluster's other nodes, if any are attached.
    pub fn peers(&self) -> Option<&Arc<dyn peers::Peers>> {
        self.peers.get()
    }

    /// Routes a message another node published, to this node's subscribers only (never sent
    /// on): no publish rate (the publishing node charged it), and no retained copy (that
    /// comes through [`Broker::set_retained_from_peer`], in the cluster's order).
    pub fn publish_from_peer(
        &self,
        account: &str,
        msg: Arc<Message>,
        now: Instant,
    ) -> Result<Routed, PublishError> {
        self.route(account, msg, Source::Peer, now)
    }

    /// Routes a message that the cluster gave this node for one member of the shared
    /// subscription `filter` (`$share/{group}/{filter}`; NATS chose this node among those with
    /// members): to one of the sessions here holding exactly that subscription, nobody else.
    pub fn publish_to_group_from_peer(
        &self,
        account: &str,
        filter: &str,
        msg: Arc<Message>,
        now: Instant,
    ) -> Result<Routed, PublishError> {
        self.route(account, msg, Source::PeerGroup(filter), now)
    }

    /// Sets (or, with an empty payload, clears) this node's copy of a retained message as the
    /// cluster ordered it, delivering nothing. The publishing node checked the account's
    /// quota; this copy follows it.
    pub fn set_retained_from_peer(&self, account: &str, msg: Arc<Message>) {
        let mut inner = self.lock();
        let acct = inner
            .entry(account.to_owned())
            .or_insert_with(|| AccountState::new(account, self.peers.get()));
        let old = if msg.payload.is_empty() {
            acct.retained.remove(&*msg.topic)
        } else {
            acct.retained_bytes += weight(&msg);
            acct.retained.insert(msg.topic.to_string(), msg.clone())
        };
        if let Some(old) = &old {
            acct.retained_bytes = acct.retained_bytes.saturating_sub(weight(old));
        }
        if let Some(j) = &self.journal
            && (old.is_some() || !msg.payload.is_empty())
        {
            j.record_quietly(durable::Change::SetRetained {
                account: acct.name.clone(),
                topic: msg.topic.clone(),
                message: (!msg.payload.is_empty()).then_some(msg),
                published: false,
            });
        }
    }

    fn route(
        &self,
        account: &str,
        msg: Arc<Message>,
        source: Source<'_>,
        now: Instant,
    ) -> Result<Routed, PublishError> {
        let quotas = *self.config.quotas(account);
        let rate = self.config.throttles(account).publishes_per_account;
        let mut inner = self.lock();
        let acct = inner
            .entry(account.to_owned())
            .or_insert_with(|| AccountState::new(account, self.peers.get()));
        if source == Source::Client
            && !acct
                .publishes
                .get_or_insert_with(|| throttle::Bucket::new(rate, rate))
                .take(now, 1)
        {
            self.stats
                .throttled(throttle::Throttled::AccountPublishRate);
            return Err(PublishError::Throttled);
        }
        let mut ticket = 0;
        if msg.retain && matches!(source, Source::Client | Source::Local) {
            if msg.payload.is_empty() {
                let old = acct.retained.remove(&*msg.topic);
                if let Some(old) = &old {
                    acct.retained_bytes = acct.retained_bytes.saturating_sub(weight(old));
                }
                // In a cluster the clear is recorded even with no copy here: another node's
                // message may not have reached this one yet, and the cluster's stream must
                // still be cleared (the journal writes it there).
                if (old.is_some() || acct.peers.is_some())
                    && let Some(j) = &self.journal
                {
                    ticket = j.record(durable::Change::SetRetained {
                        account: acct.name.clone(),
                        topic: msg.topic.clone(),
                        message: None,
                        published: true,
                    });
                }
            } else {
                let replaced = acct.retained.get(&*msg.topic).map(|m| weight(m));
                let count = acct.retained.len() + usize::from(replaced.is_none());
                let bytes =
                    acct.retained_bytes.saturating_sub(replaced.unwrap_or(0)) + weight(&msg);
                if count > quotas.retained_messages || bytes > quotas.retained_bytes {
                    return Err(PublishError::RetainedQuota);
                }
                acct.retained_bytes = bytes;
                acct.retained.insert(msg.topic.to_string(), msg.clone());
                if let Some(j) = &self.journal {
                    ticket = j.record(durable::Change::SetRetained {
                        account: acct.name.clone(),
                        topic: msg.topic.clone(),
                        message: Some(msg.clone()),
                        published: true,
                    });
                }
            }
        }
        // Accepted: the other nodes get it in the order this node routes it.
        if matches!(source, Source::Client | Source::Local)
            && let Some(p) = &acct.peers
        {
            p.forward(&acct.name, &msg);
        }
        // Matches, then one delivery per session at the highest granted QoS: a sorted Vec
        // (no hashing on the fan-out path).
        // (session, QoS, retain as published, through shared groups only)
        let mut direct: Vec<(SessionId, QoS, bool, bool)> = Vec::new();
        let mut groups: HashMap<Box<str>, Vec<(SessionId, SubEntry)>> = HashMap::new();
        // In a cluster, NATS picks the node of a shared group's member (queue subscriptions,
        // this node's own included), and that node picks the member.
        // (A node whose link to the cluster is down picks among its own members, as one node.)
        let only_group = match source {
            Source::PeerGroup(filter) => Some((trie::split_shared(filter).0, filter)),
            _ => None,
        };
        let cluster = acct.peers.as_ref().is_some_and(|p| p.routes_groups());
        let sessions = &acct.sessions;
        acct.trie.matches(&msg.topic, &mut |m| {
            if m.entry.options.no_local && msg.origin == Some(m.session) {
                return;
            }
            match (m.group, only_group) {
                (Some(g), Some((Some(want), filter)))
                    if *g == *want
                        && sessions
                            .get(&m.session)
                            .is_some_and(|s| s.subscriptions.contains_key(filter)) =>
                {
                    groups.entry(g).or_default().push((m.session, m.entry));
                }
                (_, Some(_)) => {}
                (Some(_), None) if cluster => {}
                (Some(g), None) => groups.entry(g).or_default().push((m.session, m.entry)),
                (None, None) => direct.push((
                    m.session,
                    m.entry.options.qos,
                    m.entry.options.retain_as_published,
                    false,
                )),
            }
        });
        if !groups.is_empty() {
            let mut rng = rand::rng();
            for (_, members) in groups {
                let online: Vec<_> = members
                    .iter()
                    .filter(|(id, _)| acct.sessions.get(id).is_some_and(|s| s.conn.is_some()))
                    .collect();
                let pool: Vec<_> = if online.is_empty() {
                    members.iter().collect()
                } else {
                    online
                };
                let (id, entry) = pool[rng.random_range(0..pool.len())];
                direct.push((*id, entry.options.qos, false, true));
            }
        }
        direct.sort_unstable_by_key(|e| e.0);
        direct.dedup_by(|later, kept| {
            if later.0 == kept.0 {
                kept.1 = kept.1.max(later.1);
                kept.2 |= later.2;
                kept.3 &= later.3;
                true
            } else {
                false
            }
        });
        let mut reached = 0;
        let mut blocked = Vec::new();
        for (id, sub_qos, rap, shared) in direct {
            let Some(s) = acct.sessions.get_mut(&id) else {
                continue;
            };
            let qos = msg.qos.min(sub_qos);
            let mut d = Delivery {
                message: msg.clone(),
                qos,
                retain: rap && msg.retain,
                resend: None,
                seq: 0,
                shared,
            };
            // A QoS 1 delivery to a persistent session is stored before anyone acknowledges
            // it: online or not, it survives a crash until the client acknowledges it.
            let store =
                s.stored && qos == QoS::AtLeastOnce && (s.conn.is_some() || !msg.expired(now));
            if store && let Some(j) = &self.journal {
                d.seq = self.next_id.fetch_add(1, Ordering::Relaxed);
                ticket = j.record(durable::Change::Append {
                    account: acct.name.clone(),
                    client_id: s.client_id.clone(),
                    seq: d.seq,
                    retain: d.retain,
                    shared,
                    message: msg.clone(),
                });
            }
            // A connection whose queue is closed (it is ending) counts as offline.
            let offline = match &s.conn {
                Some(c) => match c.tx.try_send(d) {
                    Ok(()) => {
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                        reached += 1;
                        None
                    }
                    Err(mpsc::error::TrySendError::Full(d)) => {
                        blocked.push(Blocked {
                            session: id,
                            tx: c.tx.clone(),
                            delivery: d,
                        });
                        None
                    }
                    Err(mpsc::error::TrySendError::Closed(d)) => Some(d),
                },
                None => Some(d),
            };
            match offline {
                Some(d) if qos == QoS::AtLeastOnce && !s.expiry.is_zero() && !msg.expired(now) => {
                    // Bounded by count per session and by bytes per account: the session's
                    // oldest go first; a message that still does not fit is dropped.
                    let w = weight(&msg);
                    let journal = self.journal.as_deref();
                    let (name, client) = (acct.name.clone(), s.client_id.clone());
                    let forget = |seq: u64| forget(journal, &name, &client, seq);
                    while !s.queue.is_empty()
                        && (s.queue.len() >= quotas.offline_messages
                            || acct.offline_bytes + w > quotas.offline_bytes)
                    {
                        if let Some(old) = s.queue.pop_front() {
                            acct.offline_bytes =
                                acct.offline_bytes.saturating_sub(weight(&old.message));
                            self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                            forget(old.seq);
                        }
                    }
                    if s.queue.len() < quotas.offline_messages
                        && acct.offline_bytes + w <= quotas.offline_bytes
                    {
                        acct.offline_bytes += w;
                        s.queue.push_back(d);
                        self.stats.queued_offline.fetch_add(1, Ordering::Relaxed);
                        reached += 1;
                    } else {
                        self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                        forget(d.seq);
                    }
                }
                Some(d) => forget(self.journal.as_deref(), &acct.name, &s.client_id, d.seq),
                None => {}
            }
        }
        Ok(Routed {
            reached,
            blocked,
            ticket,
        })
    }

    /// Records the fate of a delivery that was blocked: it got through after waiting, or it was
    /// given up (counted in [`Stats::dropped_full`]).
    pub fn note_blocked(&self, delivered: bool) {
        let c = if delivered {
            &self.stats.delivered
        } else {
            &self.stats.dropped_full
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Current sizes: (sessions, connected sessions, subscriptions, retained messages), summed
    /// over accounts. O(sessions): for metrics, not for the hot path.
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        let inner = self.lock();
        inner.values().fold((0, 0, 0, 0), |(s, c, sub, r), a| {
            (
                s + a.sessions.len(),
                c + a.sessions.values().filter(|x| x.conn.is_some()).count(),
                sub + a.trie.len(),
                r + a.retained.len(),
            )
        })
    }

    /// Reserves `bytes` of the account's offline quota for something held for a disconnected
    /// client (a delayed will); `None` when the quota cannot take them. The bytes return when
    /// the reservation is dropped.
    pub fn reserve_offline(
        self: &Arc<Self>,
        account: &str,
        bytes: u64,
    ) -> Option<OfflineReservation> {
        let max = self.config.quotas(account).offline_bytes;
        let mut inner = self.lock();
        let acct = inner
            .entry(account.to_owned())
            .or_insert_with(|| AccountState::new(account, self.peers.get()));
        if acct.offline_bytes + bytes > max {
            return None;
        }
        acct.offline_bytes += bytes;
        Some(OfflineReservation {
            broker: self.clone(),
            account: account.to_owned(),
            bytes,
        })
    }

    /// Whether `client_id` may have a session: it has one already, or the account holds fewer
    /// sessions (connected or persisted) than its quota.
    pub fn session_allowed(&self, account: &str, client_id: &str) -> bool {
        let max = self.config.quotas(account).sessions;
        self.lock()
            .get(account)
            .is_none_or(|a| a.by_client.contains_key(client_id) || a.sessions.len() < max)
    }

    /// Whether a session (connected or persisted) exists for a client id.
    pub fn has_session(&self, account: &str, client_id: &str) -> bool {
        self.lock()
            .get(account)
            .is_some_and(|a| a.by_client.contains_key(client_id))
    }

    /// Takes a persistent session that no connection holds out of this broker, to move to
    /// another node: its expiry, subscriptions (their interest withdrawn) and queue, with
    /// wall-clock times from `clock`. `None` if the client id has no such session here (none,
    /// a clean one, one connected, or one expired).
    pub fn take_session(
        &self,
        account: &str,
        client_id: &str,
        clock: durable::WallClock,
    ) -> Option<durable::Loaded> {
        let mut inner = self.lock();
        let acct = inner.get_mut(account)?;
        let id = acct.by_client.get(client_id).copied()?;
        let s = acct.sessions.get(&id)?;
        let left = s.disconnected_at?;
        if s.conn.is_some() || s.expiry.is_zero() || clock.now >= left + s.expiry {
            return None;
        }
        let s = acct.drop_session(id)?;
        if let Some(j) = self.journal.as_deref().filter(|_| s.stored) {
            j.record_quietly(durable::Change::DeleteSession {
                account: acct.name.clone(),
                client_id: s.client_id.clone(),
            });
        }
        // The device resumes elsewhere: its delayed wills here are cancelled, as a connection
        // of the client id here would (dropping their senders wakes the tasks that hold them).
        if let Some(wills) = acct.wills.remove(client_id) {
            for (will, stored, _wake) in wills {
                if let Some(j) = self.journal.as_deref().filter(|_| stored) {
                    j.record_quietly(durable::Change::DeleteWill {
                        account: acct.name.clone(),
                        id: will,
                    });
                }
            }
        }
        let queue = s
            .queue
            .iter()
            .filter(|d| !d.message.expired(clock.now))
            .map(|d| durable::LoadedQueued {
                seq: d.seq,
                retain: d.retain,
                shared: d.shared,
                packet_id: d.resend,
                message: durable::LoadedMessage {
                    expires_at_ms: d.message.expires_at.map(|at| clock.ms(at)),
                    message: Message {
                        expires_at: None,
                        origin: None,
                        ..(*d.message).clone()
                    },
                },
            })
            .collect();
        Some(durable::Loaded {
            account: account.to_owned(),
            client_id: client_id.to_owned(),
            session: durable::StoredSession {
                expiry: s.expiry,
                subscriptions: s.subscriptions.into_iter().collect(),
                connected: false,
            },
            disconnected_at_ms: Some(clock.ms(left)),
            queue,
        })
    }

    /// Puts a session taken from another node ([`Broker::take_session`]) here, replacing any
    /// session of its client id, stored if this broker is durable (its messages under this
    /// broker's sequence numbers). Returns the highest interest number its filters got from
    /// the cluster (0: none new), for the CONNACK to wait for.
    pub fn put_session(&self, l: durable::Loaded, clock: durable::WallClock) -> u64 {
        let mut inner = self.lock();
        let acct = inner
            .entry(l.account.clone())
            .or_insert_with(|| AccountState::new(&l.account, self.peers.get()));
        if let Some(old) = acct.by_client.get(&l.client_id).copied() {
            acct.end_session(old, self.journal.as_deref());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let client_id: Arc<str> = Arc::from(l.client_id.as_str());
        let session = Session {
            client_id: client_id.clone(),
            stored: self.journal.is_some() && !l.session.expiry.is_zero(),
            subscriptions: HashMap::new(),
            conn: None,
            epoch: 0,
            expiry: l.session.expiry,
            disconnected_at: Some(
                l.disconnected_at_ms
                    .map_or(clock.now, |ms| clock.instant(ms)),
            ),
            queue: VecDeque::new(),
        };
        record_session(self.journal.as_deref(), &acct.name, &session, false);
        acct.sessions.insert(id, session);
        acct.by_client.insert(l.client_id.clone(), id);
        let mut mark = 0;
        let mut subscriptions = HashMap::new();
        for (filter, options) in l.session.subscriptions {
            mark = mark.max(acct.add_subscription(id, &filter, SubEntry { options }));
            subscriptions.insert(filter, options);
        }
        // The account's offline quotas hold as for any session: the newest messages are kept.
        let quotas = *self.config.quotas(&l.account);
        let mut kept = Vec::new();
        let mut bytes = 0u64;
        for q in l.queue.into_iter().rev() {
            if q.message.expires_at_ms.is_some_and(|ms| ms <= clock.now_ms) {
                continue;
            }
            let w = weight(&q.message.message);
            if kept.len() >= quotas.offline_messages
                || acct.offline_bytes + bytes + w > quotas.offline_bytes
            {
                self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            bytes += w;
            kept.push(q);
        }
        let mut queue = VecDeque::with_capacity(kept.len());
        for q in kept.into_iter().rev() {
            let message = Arc::new(Message {
                expires_at: q.message.expires_at_ms.map(|ms| clock.instant(ms)),
                ..q.message.message
            });
            let seq = self.next_id.fetch_add(1, Ordering::Relaxed);
            acct.offline_bytes += weight(&message);
            if let Some(j) = self
                .journal
                .as_deref()
                .filter(|_| !l.session.expiry.is_zero())
            {
                j.record_quietly(durable::Change::Append {
                    account: acct.name.clone(),
                    client_id: client_id.clone(),
                    seq,
                    retain: q.retain,
                    shared: q.shared,
                    message: message.clone(),
                });
                if let Some(packet_id) = q.packet_id {
                    j.record_quietly(durable::Change::Sent {
                        account: acct.name.clone(),
                        client_id: client_id.clone(),
                        seq,
                        packet_id,
                    });
                }
            }
            queue.push_back(Delivery {
                message,
                qos: QoS::AtLeastOnce,
                retain: q.retain,
                resend: q.packet_id,
                seq,
                shared: q.shared,
            });
        }
        if let Some(s) = acct.sessions.get_mut(&id) {
            s.subscriptions = subscriptions;
            s.queue = queue;
            record_session(self.journal.as_deref(), &acct.name, s, false);
        }
        mark
    }

    /// Whether a client id is connected now.
    pub fn is_connected(&self, account: &str, client_id: &str) -> bool {
        self.lock().get(account).is_some_and(|a| {
            a.by_client
                .get(client_id)
                .and_then(|id| a.sessions.get(id))
                .is_some_and(|s| s.conn.is_some())
        })
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the clock; the broker does not
mod tests {
    use super::*;

    /// Connection `a` leaves at `now`, with nothing unacknowledged and no new expiry.
    fn leave(b: &Broker, a: &Attached, now: Instant) {
        b.disconnect("acct", a.session, a.epoch, None, Vec::new(), None, now);
    }

    fn msg(topic: &str, qos: QoS, retain: bool, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos,
            retain,
            properties: Properties::default(),
            expires_at: None,
            origin: None,
            timestamp_ms: 0,
        })
    }

    fn opts(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        }
    }

    /// A service's answer to one connection: queued while there is room, handed back when the
    /// queue is full (to try again, not lost), refused for an epoch that is not the client's
    /// connection any more.
    #[test]
    fn a_direct_delivery_comes_back_when_the_queue_is_full() {
        let b = Broker::new(BrokerConfig {
            queue_capacity: 1,
            ..BrokerConfig::default()
        });
        let mut a = b.connect("acct", "c1", true, Duration::ZERO, Instant::now());
        let d = |p| Delivery {
            message: msg(
                "$aws/provisioning-templates/t/provision/json/accepted",
                QoS::AtMostOnce,
                false,
                p,
            ),
            qos: QoS::AtMostOnce,
            retain: false,
            resend: None,
            seq: 0,
            shared: false,
        };
        assert!(matches!(
            b.deliver_to_connection("acct", "c1", a.epoch, d(b"1")),
            Direct::Delivered
        ));
        let Direct::Full(back) = b.deliver_to_connection("acct", "c1", a.epoch, d(b"2")) else {
            panic!("a full queue hands the delivery back");
        };
        assert_eq!(&back.message.payload[..], b"2");
        assert_eq!(&a.rx.try_recv().unwrap().message.payload[..], b"1");
        assert!(matches!(
            b.deliver_to_connection("acct", "c1", a.epoch, back),
            Direct::Delivered
        ));
        assert!(matches!(
            b.deliver_to_connection("acct", "c1", a.epoch + 1, d(b"3")),
            Direct::Gone
        ));
        assert!(matches!(
            b.deliver_to_connection("acct", "c2", a.epoch, d(b"3")),
            Direct::Gone
        ));
        let a2 = b.connect("acct", "c1", true, Duration::ZERO, Instant::now());
        assert!(matches!(
            b.deliver_to_connection("acct", "c1", a.epoch, d(b"4")),
            Direct::Gone
        ));
        assert!(matches!(
            b.deliver_to_connection("acct", "c1", a2.epoch, d(b"4")),
            Direct::Delivered
        ));
    }

    #[test]
    fn routes_once_per_session_at_max_qos() {
        let b = Broker::new(BrokerConfig::default());
        let mut a = b.connect("acct", "c1", true, Duration::ZERO, Instant::now());
        b.subscribe("acct", a.session, "t/#", opts(QoS::AtMostOnce));
        b.subscribe("acct", a.session, "t/x", opts(QoS::AtLeastOnce));
        assert_eq!(
            b.publish(
                "acct",
                msg("t/x", QoS::AtLeastOnce, false, b"1"),
                Instant::now()
            )
            .map(|r| r.reached)
            .ok(),
            Some(1)
        );
        let d = a.rx.try_recv().unwrap();
        assert_eq!(d.qos, QoS::AtLeastOnce);
        assert!(a.rx.try_recv().is_err(), "one delivery per session");
        // Another account sees nothing.
        let mut other = b.connect("other", "c1", true, Duration::ZERO, Instant::now());
        b.subscribe("other", other.session, "#", opts(QoS::AtMostOnce));
        b.publish(
            "acct",
            msg("t/x", QoS::AtMostOnce, false, b"2"),
            Instant::now(),
        )
        .unwrap();
        assert!(other.rx.try_recv().is_err());
    }

    /// A persistent session left on one broker moves to another as bytes: subscriptions,
    /// its queue in order (a message sent and not acknowledged keeps its packet id), its
    /// expiry; the first broker no longer has it, and one connected cannot be taken.
    #[test]
    fn a_session_moves_between_brokers() {
        let clock = durable::WallClock::read();
        let (one, two) = (
            Broker::new(BrokerConfig::default()),
            Broker::new(BrokerConfig::default()),
        );
        let mut a = one.connect("acct", "c1", false, Duration::from_secs(3600), clock.now);
        one.subscribe("acct", a.session, "q/+", opts(QoS::AtLeastOnce));
        assert!(one.take_session("acct", "c1", clock).is_none(), "connected");
        // One message sent under packet id 7 and not acknowledged when the connection ends.
        one.publish(
            "acct",
            msg("q/x", QoS::AtLeastOnce, false, b"sent"),
            clock.now,
        )
        .unwrap();
        let mut sent = a.rx.try_recv().unwrap();
        sent.resend = Some(7);
        one.disconnect(
            "acct",
            a.session,
            a.epoch,
            None,
            vec![sent],
            None,
            clock.now,
        );
        for i in 0..100u8 {
            let m = Message {
                payload: Bytes::from(vec![i]),
                ..(*msg("q/x", QoS::AtLeastOnce, false, b"")).clone()
            };
            one.publish("acct", Arc::new(m), clock.now).unwrap();
        }
        assert!(one.take_session("acct", "other", clock).is_none());
        let taken = one.take_session("acct", "c1", clock).unwrap();
        assert!(!one.has_session("acct", "c1"));
        assert_eq!(taken.queue.len(), 101);
        assert_eq!(taken.queue[0].packet_id, Some(7));
        let bytes = durable::encode_loaded(&taken).unwrap();
        let back = durable::decode_loaded(&bytes).unwrap();
        assert_eq!(back, taken);
        assert!(durable::decode_loaded(&bytes[..bytes.len() - 1]).is_none());
        two.put_session(back, clock);
        let mut b = two.connect("acct", "c1", false, Duration::from_secs(3600), clock.now);
        assert!(b.session_present);
        assert_eq!(b.replay[0].resend, Some(7));
        assert_eq!(&b.replay[0].message.payload[..], b"sent");
        let got: Vec<u8> = b
            .replay
            .iter()
            .skip(1)
            .map(|d| d.message.payload[0])
            .collect();
        assert_eq!(got, (0..100).collect::<Vec<u8>>());
        // Its subscription came along.
        two.publish(
            "acct",
            msg("q/y", QoS::AtLeastOnce, false, b"after"),
            clock.now,
        )
        .unwrap();
        assert_eq!(&b.rx.try_recv().unwrap().message.payload[..], b"after");
        // A broker whose quota holds 10 offline messages keeps the newest 10.
        let small = Broker::new(BrokerConfig {
            quotas: Quotas {
                offline_messages: 10,
                ..Quotas::default()
            },
            ..BrokerConfig::default()
        });
        small.put_session(durable::decode_loaded(&bytes).unwrap(), clock);
        let c = small.connect("acct", "c1", false, Duration::from_secs(3600), clock.now);
        let got: Vec<u8> = c.replay.iter().map(|d| d.message.payload[0]).collect();
        assert_eq!(got, (90..100).collect::<Vec<u8>>());
    }

    #[test]
    fn takeover_kicks_and_persistent_sessions_queue() {
        let b = Broker::new(BrokerConfig::default());
        let a = b.connect(
            "acct",
            "c1",
            false,
            Duration::from_secs(3600),
            Instant::now(),
        );
        b.subscribe("acct", a.session, "q", opts(QoS::AtLeastOnce));
        let mut a2 = b.connect(
            "acct",
            "c1",
            false,
            Duration::from_secs(3600),
            Instant::now(),
        );
        assert!(a2.session_present);
        assert_eq!(a.kick.blocking_recv(), Ok(Kick::TakenOver));
        // The old connection's disconnect changes nothing.
        b.disconnect(
            "acct",
            a.session,
            a.epoch,
            None,
            Vec::new(),
            None,
            Instant::now(),
        );
        assert!(b.is_connected("acct", "c1"));
        b.disconnect(
            "acct",
            a2.session,
            a2.epoch,
            None,
            Vec::new(),
            None,
            Instant::now(),
        );
        b.publish(
            "acct",
            msg("q", QoS::AtLeastOnce, false, b"queued"),
            Instant::now(),
        )
        .unwrap();
        b.publish(
            "acct",
            msg("q", QoS::AtMostOnce, false, b"lost"),
            Instant::now(),
        )
        .unwrap();
        let mut a3 = b.connect(
            "acct",
            "c1",
            false,
            Duration::from_secs(3600),
            Instant::now(),
        );
        assert!(a3.session_present);
        assert_eq!(
            &a3.replay.pop_front().unwrap().message.payload[..],
            b"queued"
        );
        assert!(a3.replay.is_empty(), "QoS 0 is not queued offline");
        let _ = a2.rx.try_recv();
        // Clean start discards the session.
        let a4 = b.connect("acct", "c1", true, Duration::ZERO, Instant::now());
        assert!(!a4.session_present);
        assert_eq!(b.subscription_count("acct", a4.session), 0);
    }

    #[test]
    fn kick_connection_spares_a_newer_connection() {
        let b = Broker::new(BrokerConfig::default());
        let old = b.connect("acct", "c1", true, Duration::ZERO, Instant::now());
        let mut new = b.connect("acct", "c1", true, Duration::ZERO, Instant::now());
        assert!(!b.kick_connection("acct", "c1", old.epoch, Kick::Administrative));
        assert!(
            new.kick.try_recv().is_err(),
            "the newer connection is untouched"
        );
        assert!(b.kick_connection("acct", "c1", new.epoch, Kick::Administrative));
        assert_eq!(new.kick.try_recv(), Ok(Kick::Administrative));
    }

    #[test]
    fn takeover_hands_unacked_to_the_new_connection() {
        let b = Broker::new(BrokerConfig::default());
        let a = b.connect("acct", "c1", false, Duration::from_secs(60), Instant::now());
        let mut a2 = b.connect("acct", "c1", false, Duration::from_secs(60), Instant::now());
        let d = Delivery {
            message: msg("t", QoS::AtLeastOnce, false, b"unacked"),
            qos: QoS::AtLeastOnce,
            retain: false,
            resend: Some(7),
            seq: 0,
            shared: false,
        };
        b.disconnect(
            "acct",
            a.session,
            a.epoch,
            None,
            vec![d],
            None,
            Instant::now(),
        );
        assert_eq!(&a2.rx.try_recv().unwrap().message.payload[..], b"unacked");
    }

    #[test]
    fn sessions_expire() {
        let b = Broker::new(BrokerConfig::default());
        let a = b.connect("acct", "c1", false, Duration::from_secs(10), Instant::now());
        let t0 = Instant::now();
        leave(&b, &a, t0);
        assert_eq!(b.sweep(t0 + Duration::from_secs(9)), 0);
        assert!(b.has_session("acct", "c1"));
        assert_eq!(b.sweep(t0 + Duration::from_secs(10)), 1);
        assert!(!b.has_session("acct", "c1"));
    }

    /// A persistent session for `client_id` that its connection has left, and the delayed
    /// will that connection deferred.
    fn left_with_will(b: &Broker, client_id: &str, at: Instant) -> DelayedWill {
        let ten = Duration::from_secs(10);
        let a = b.connect("acct", client_id, false, ten, at);
        leave(b, &a, at);
        let mut w = DelayedWill {
            id: 0,
            account: "acct".into(),
            client_id: client_id.into(),
            certificate: Some("cert".into()),
            epoch: a.epoch,
            at: at + ten,
            template: (*msg("last/will", QoS::AtLeastOnce, false, b"gone")).clone(),
            cancelled: None,
        };
        w.cancelled = b.defer_will(&mut w);
        assert!(w.cancelled.is_some());
        w
    }

    /// [MQTT-3.1.3-9]: a delayed will is cancelled by any later connection of its client id,
    /// even one that has ended again before the will is due.
    #[test]
    fn a_later_connection_cancels_a_delayed_will() {
        use tokio::sync::oneshot::error::TryRecvError;
        let b = Broker::new(BrokerConfig::default());
        let t0 = Instant::now();
        let ten = Duration::from_secs(10);
        let (kept, cancelled) = (left_with_will(&b, "c2", t0), left_with_will(&b, "c1", t0));
        let again = b.connect("acct", "c1", false, ten, t0);
        leave(&b, &again, t0);
        assert!(
            !b.claim_will(&cancelled),
            "came back and left again: cancelled"
        );
        assert!(b.claim_will(&kept), "nobody came back: sent");
        assert!(!b.claim_will(&kept), "claimed once");

        // The task holding a will hears of its cancellation at once.
        let mut w = left_with_will(&b, "c3", t0);
        let rx = w.cancelled.as_mut().unwrap();
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        let c3 = b.connect("acct", "c3", true, Duration::ZERO, t0);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
        assert!(!b.claim_will(&w));
        leave(&b, &c3, t0);

        // A will deferred after a newer connection took the session over (the old
        // connection's end is slow) is cancelled at once ...
        let old = b.connect("acct", "c4", false, ten, t0);
        let new = b.connect("acct", "c4", false, ten, t0);
        let template = w.template.clone();
        let deferred = |epoch: u64, client_id: &str| DelayedWill {
            id: 0,
            account: "acct".into(),
            client_id: client_id.into(),
            certificate: None,
            epoch,
            at: t0 + ten,
            template: template.clone(),
            cancelled: None,
        };
        assert!(
            b.defer_will(&mut deferred(old.epoch, "c4")).is_none(),
            "taken over"
        );
        // ... also when the newer connection was a clean start that has ended the session.
        let c5 = b.connect("acct", "c5", false, ten, t0);
        let clean = b.connect("acct", "c5", true, Duration::ZERO, t0);
        leave(&b, &clean, t0);
        assert!(!b.has_session("acct", "c5"));
        assert!(
            b.defer_will(&mut deferred(c5.epoch, "c5")).is_none(),
            "clean start"
        );
        // And one due while its client id is connected is not sent.
        let mut due = deferred(new.epoch, "c4");
        assert!(b.defer_will(&mut due).is_some());
        assert!(!b.claim_will(&due), "c4 is connected");
    }

    /// [MQTT-3.1.2-23]: a session whose expiry has passed is gone at that instant, not at the
    /// next sweep.
    #[test]
    fn an_expired_session_is_not_resumed_before_the_sweep() {
        let b = Broker::new(BrokerConfig::default());
        let t0 = Instant::now();
        let a = b.connect("acct", "c1", false, Duration::from_secs(10), t0);
        leave(&b, &a, t0);
        let early = b.connect(
            "acct",
            "c1",
            false,
            Duration::from_secs(10),
            t0 + Duration::from_secs(9),
        );
        assert!(early.session_present, "within the expiry: resumed");
        b.disconnect(
            "acct",
            early.session,
            early.epoch,
            None,
            Vec::new(),
            None,
            t0 + Duration::from_secs(9),
        );
        let late = b.connect(
            "acct",
            "c1",
            false,
            Duration::from_secs(10),
            t0 + Duration::from_secs(19),
        );
        assert!(
            !late.session_present,
            "expired at 19 s, though no sweep ran"
        );
    }

    /// [MQTT-4.4.0-1]: QoS 1 messages a persistent session's connection had not acknowledged
    /// when it ended are sent again, oldest first and with their packet ids, when the session
    /// resumes.
    #[test]
    fn unacknowledged_deliveries_are_sent_again_on_resumption() {
        let b = Broker::new(BrokerConfig::default());
        let t0 = Instant::now();
        let a = b.connect("acct", "c1", false, Duration::from_secs(60), t0);
        let unacked = |payload: &'static [u8], id| Delivery {
            message: msg("t", QoS::AtLeastOnce, false, payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            resend: Some(id),
            seq: 0,
            shared: false,
        };
        b.disconnect(
            "acct",
            a.session,
            a.epoch,
            None,
            vec![unacked(b"one", 1), unacked(b"two", 2)],
            None,
            t0,
        );
        let mut again = b.connect("acct", "c1", false, Duration::from_secs(60), t0);
        assert!(again.session_present);
        let first = again.replay.pop_front().unwrap();
        assert_eq!(
            (&first.message.payload[..], first.resend),
            (&b"one"[..], Some(1))
        );
        let second = again.replay.pop_front().unwrap();
        assert_eq!(
            (&second.message.payload[..], second.resend),
            (&b"two"[..], Some(2))
        );
        // A clean session ends with its unacknowledged messages.
        b.disconnect(
            "acct",
            again.session,
            again.epoch,
            Some(Duration::ZERO),
            vec![unacked(b"x", 3)],
            None,
            t0,
        );
        let clean = b.connect("acct", "c1", false, Duration::from_secs(60), t0);
        assert!(!clean.session_present);
    }

    /// Deliveries still queued for an ending connection, and messages published while it
    /// ends, stay with its persistent session: the queue is closed and emptied under the lock
    /// that detaches the connection, and a closed queue counts as offline.
    #[test]
    fn nothing_falls_between_an_ending_connection_and_its_session() {
        let b = Broker::new(BrokerConfig::default());
        let t0 = Instant::now();
        let a = b.connect("acct", "c1", false, Duration::from_secs(60), t0);
        let _ = b.subscribe("acct", a.session, "t", opts(QoS::AtLeastOnce));
        b.publish(
            "acct",
            msg("t", QoS::AtLeastOnce, false, b"queued"),
            Instant::now(),
        )
        .unwrap();
        b.publish(
            "acct",
            msg("t", QoS::AtMostOnce, false, b"q0"),
            Instant::now(),
        )
        .unwrap();
        let mut rx = a.rx;
        rx.close();
        // Published after the queue closed, before the connection is detached.
        b.publish(
            "acct",
            msg("t", QoS::AtLeastOnce, false, b"late"),
            Instant::now(),
        )
        .unwrap();
        b.disconnect("acct", a.session, a.epoch, None, Vec::new(), Some(rx), t0);
        let again = b.connect("acct", "c1", false, Duration::from_secs(60), t0);
        let got: Vec<_> = again
            .replay
            .iter()
            .map(|d| d.message.payload.clone())
            .collect();
        assert_eq!(got, [&b"queued"[..], &b"late"[..]], "QoS 0 is not kept");
    }

    /// A storage that keeps the changes it is given, for the tests of what the broker records.
    struct Recording(Arc<Mutex<Vec<durable::Change>>>);

    impl durable::Storage for Recording {
        fn load(&mut self) -> Result<durable::Snapshot, durable::StorageError> {
            Ok(durable::Snapshot::default())
        }
        fn commit(
            &mut self,
            changes: &[durable::Change],
            _: durable::WallClock,
        ) -> Result<(), durable::StorageError> {
            self.0.lock().unwrap().extend(changes.iter().cloned());
            Ok(())
        }
    }

    fn durable_broker(
        snapshot: durable::Snapshot,
        clock: durable::WallClock,
    ) -> (Broker, Arc<Mutex<Vec<durable::Change>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let journal = durable::Journal::start(Recording(log.clone()));
        (
            Broker::durable(BrokerConfig::default(), journal, snapshot, clock),
            log,
        )
    }

    fn kinds(log: &Mutex<Vec<durable::Change>>) -> Vec<String> {
        log.lock()
            .unwrap()
            .iter()
            .map(|c| match c {
                durable::Change::PutSession {
                    client_id, session, ..
                } => {
                    format!(
                        "put {client_id} {}",
                        if session.connected { "on" } else { "off" }
                    )
                }
                durable::Change::DeleteSession { client_id, .. } => format!("delete {client_id}"),
                durable::Change::Append { client_id, seq, .. } => {
                    format!("append {client_id} {seq}")
                }
                durable::Change::Ack { client_id, seq, .. } => format!("ack {client_id} {seq}"),
                durable::Change::Sent {
                    client_id,
                    seq,
                    packet_id,
                    ..
                } => format!("sent {client_id} {seq} {packet_id}"),
                durable::Change::SetRetained { topic, message, .. } => {
                    format!("retained {topic} {}", message.is_some())
                }
                durable::Change::PutWill { id, will, .. } => {
                    format!("will {} {id}", will.client_id)
                }
                durable::Change::DeleteWill { id, .. } => format!("will done {id}"),
            })
            .collect()
    }

    /// A retained clear of a topic this node holds nothing for is recorded only in a cluster:
    /// another node's message may not have reached this one yet, and the cluster's stream
    /// (written from the journal) must be cleared all the same.
    #[tokio::test]
    async fn a_clear_with_no_copy_here_is_recorded_only_in_a_cluster() {
        #[derive(Debug)]
        struct Quiet;
        impl peers::Peers for Quiet {
            fn interest(&self, _: &str, _: &str, _: bool) -> u64 {
                0
            }
            fn forward(&self, _: &str, _: &Arc<Message>) {}
            fn routes_groups(&self) -> bool {
                true
            }
            fn interest_done(
                &self,
                _: u64,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
                Box::pin(async {})
            }
        }
        let now = Instant::now();
        let (single, log) =
            durable_broker(durable::Snapshot::default(), durable::WallClock::read());
        let r = single
            .publish("acct", msg("r/none", QoS::AtLeastOnce, true, b""), now)
            .unwrap();
        assert_eq!(r.ticket, 0);
        assert!(
            single
                .durable_until(single.journal().unwrap().barrier())
                .await
        );
        assert!(kinds(&log).is_empty());

        let (node, log) = durable_broker(durable::Snapshot::default(), durable::WallClock::read());
        assert!(node.attach_peers(Arc::new(Quiet)));
        let r = node
            .publish("acct", msg("r/none", QoS::AtLeastOnce, true, b""), now)
            .unwrap();
        assert!(r.ticket > 0);
        assert!(node.durable_until(r.ticket).await);
        assert_eq!(kinds(&log), ["retained r/none false"]);
        assert!(matches!(
            log.lock().unwrap()[0],
            durable::Change::SetRetained {
                published: true,
                ..
            }
        ));
    }

    /// A barrier is durable once what was recorded quietly before it is committed, and adds
    /// nothing of its own.
    #[tokio::test]
    async fn a_barrier_waits_for_what_was_recorded_before_it() {
        let (b, log) = durable_broker(durable::Snapshot::default(), durable::WallClock::read());
        let j = b.journal().unwrap().clone();
        let t = j.barrier();
        assert!(j.wait(t).await);
        assert!(kinds(&log).is_empty());
        let loaded = durable::Loaded {
            account: "acct".into(),
            client_id: "moved".into(),
            session: durable::StoredSession {
                expiry: Duration::from_secs(60),
                subscriptions: vec![("t".into(), opts(QoS::AtLeastOnce))],
                connected: false,
            },
            disconnected_at_ms: None,
            queue: Vec::new(),
        };
        b.put_session(loaded, durable::WallClock::read());
        let t = j.barrier();
        assert!(j.wait(t).await);
        let k = kinds(&log);
        assert!(
            !k.is_empty() && k.iter().all(|k| k == "put moved off"),
            "{k:?}"
        );
    }

    /// What must survive is recorded, with a ticket for what a client waits on; clean
    /// sessions and QoS 0 record nothing.
    #[tokio::test]
    async fn a_durable_broker_records_what_must_survive() {
        let (b, log) = durable_broker(durable::Snapshot::default(), durable::WallClock::read());
        let t0 = Instant::now();
        let clean = b.connect("acct", "clean", true, Duration::ZERO, t0);
        assert_eq!(clean.ticket, 0);
        let (_, t) = b.subscribe("acct", clean.session, "t", opts(QoS::AtLeastOnce));
        assert_eq!(t, 0);
        let mut p = b.connect("acct", "p", false, Duration::from_secs(60), t0);
        assert!(p.ticket > 0);
        let (_, t) = b.subscribe("acct", p.session, "t", opts(QoS::AtLeastOnce));
        assert!(t > 0);
        let routed = b
            .publish(
                "acct",
                msg("t", QoS::AtMostOnce, false, b"q0"),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(routed.ticket, 0, "QoS 0 is not stored");
        let routed = b
            .publish(
                "acct",
                msg("t", QoS::AtLeastOnce, false, b"q1"),
                Instant::now(),
            )
            .unwrap();
        assert!(routed.ticket > 0);
        assert!(b.durable_until(routed.ticket).await);
        let d = p.rx.try_recv().unwrap();
        let d = if d.seq == 0 {
            p.rx.try_recv().unwrap()
        } else {
            d
        };
        assert!(d.seq > 0);
        b.acked("acct", "p", d.seq);
        // Sent with packet id 5 and not acknowledged when the connection ends: the id is
        // stored with the message.
        let routed = b
            .publish(
                "acct",
                msg("t", QoS::AtLeastOnce, false, b"unacked"),
                Instant::now(),
            )
            .unwrap();
        assert!(b.durable_until(routed.ticket).await);
        let mut unacked = p.rx.try_recv().unwrap();
        unacked.resend = Some(5);
        let useq = unacked.seq;
        b.disconnect("acct", p.session, p.epoch, None, vec![unacked], None, t0);
        let mut p = b.connect("acct", "p", false, Duration::from_secs(60), t0);
        let again = p.replay.pop_front().unwrap();
        assert_eq!((again.seq, again.resend), (useq, Some(5)));
        b.acked("acct", "p", useq);
        let routed = b
            .publish(
                "acct",
                msg("r", QoS::AtLeastOnce, true, b"kept"),
                Instant::now(),
            )
            .unwrap();
        assert!(b.durable_until(routed.ticket).await);
        leave(&b, &p, t0);
        leave(&b, &clean, t0);
        let late = b.connect("acct", "p", true, Duration::ZERO, t0);
        leave(&b, &late, t0);
        b.journal().unwrap().close();
        let seq = d.seq;
        assert_eq!(
            kinds(&log),
            [
                "put p on".to_string(),
                "put p on".into(),
                format!("append p {seq}"),
                format!("ack p {seq}"),
                format!("append p {useq}"),
                format!("sent p {useq} 5"),
                "put p off".into(),
                "put p on".into(),
                format!("ack p {useq}"),
                "retained r true".into(),
                "put p off".into(),
                "delete p".into(),
            ]
        );
    }

    struct Failing;

    impl durable::Storage for Failing {
        fn load(&mut self) -> Result<durable::Snapshot, durable::StorageError> {
            Ok(durable::Snapshot::default())
        }
        fn commit(
            &mut self,
            _: &[durable::Change],
            _: durable::WallClock,
        ) -> Result<(), durable::StorageError> {
            Err(durable::StorageError("disk full".into()))
        }
    }

    /// When storage fails, nothing that needs it is acknowledged, then or later.
    #[tokio::test]
    async fn a_failed_commit_is_never_acknowledged() {
        let b = Broker::durable(
            BrokerConfig::default(),
            durable::Journal::start(Failing),
            durable::Snapshot::default(),
            durable::WallClock::read(),
        );
        let a = b.connect("acct", "p", false, Duration::from_secs(60), Instant::now());
        assert!(!b.durable_until(a.ticket).await);
        let routed = b
            .publish(
                "acct",
                msg("r", QoS::AtLeastOnce, true, b"x"),
                Instant::now(),
            )
            .unwrap();
        assert!(!b.durable_until(routed.ticket).await);
        assert!(b.journal().unwrap().failed());
        // A broker without storage acknowledges at once.
        assert!(Broker::new(BrokerConfig::default()).durable_until(7).await);
    }

    /// At start-up: sessions come back left (never expiring early), expired ones and messages
    /// past their expiry or the redelivery window are dropped from storage too, and sequence
    /// numbers continue above the stored ones.
    #[tokio::test]
    async fn a_durable_broker_starts_from_what_was_stored() {
        let clock = durable::WallClock::read();
        let loaded = |topic: &str, ts: u64, exp: Option<u64>| durable::LoadedMessage {
            message: Message {
                timestamp_ms: ts,
                ..(*msg(topic, QoS::AtLeastOnce, false, b"x")).clone()
            },
            expires_at_ms: exp,
        };
        let now = clock.now_ms;
        let queued = |seq, retain, packet_id, message| durable::LoadedQueued {
            seq,
            retain,
            shared: false,
            packet_id,
            message,
        };
        let session = |id: &str, left: Option<u64>, queue| durable::Loaded {
            account: "acct".into(),
            client_id: id.into(),
            session: durable::StoredSession {
                expiry: Duration::from_secs(60),
                subscriptions: vec![("t".into(), opts(QoS::AtLeastOnce))],
                connected: left.is_none(),
            },
            disconnected_at_ms: left,
            queue,
        };
        let snapshot = durable::Snapshot {
            sessions: vec![
                session(
                    "live",
                    None,
                    vec![
                        queued(40, false, Some(7), loaded("t", now - 1000, None)),
                        queued(41, false, None, loaded("t", now - 2 * 3600 * 1000, None)),
                        queued(42, true, None, loaded("t", now - 1000, Some(now - 1))),
                        queued(43, false, None, loaded("t", now - 1000, Some(now + 60_000))),
                    ],
                ),
                session("gone", Some(now - 61_000), vec![]),
                session("left", Some(now - 30_000), vec![]),
            ],
            retained: vec![
                ("acct".into(), loaded("r/1", now, None)),
                ("acct".into(), loaded("r/2", now, Some(now - 1))),
            ],
            wills: ["left", "live"]
                .iter()
                .enumerate()
                .map(|(i, c)| durable::LoadedWill {
                    account: "acct".into(),
                    id: 50 + i as u64,
                    at_ms: now + 10_000,
                    will: durable::StoredWill {
                        client_id: Arc::from(*c),
                        certificate: Arc::from("cert"),
                        message: msg("last/will", QoS::AtLeastOnce, false, b"gone"),
                    },
                })
                .collect(),
        };
        let (b, log) = durable_broker(snapshot, clock);
        let wills = b.take_restored_wills();
        assert_eq!(wills.len(), 2);
        assert!(b.take_restored_wills().is_empty(), "taken once");
        assert_eq!(wills[0].at, clock.instant(now + 10_000));
        assert_eq!(wills[0].certificate.as_deref(), Some("cert"));
        assert!(b.has_session("acct", "live") && b.has_session("acct", "left"));
        assert!(!b.has_session("acct", "gone"));
        assert!(b.retained_for("acct", "r/1", clock.now).is_some());
        assert!(b.retained_for("acct", "r/2", clock.now).is_none());
        // `left` expires 60 s after it was left, `live` 60 s after the restart.
        assert_eq!(b.sweep(clock.now + Duration::from_secs(31)), 1);
        assert!(b.has_session("acct", "live"));
        let mut a = b.connect("acct", "live", false, Duration::from_secs(60), clock.now);
        assert!(a.session_present);
        let seqs: Vec<u64> = a.replay.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, [40, 43]);
        // Sent before the restart and not acknowledged: sent again with its packet id.
        let resend: Vec<Option<u16>> = a.replay.iter().map(|d| d.resend).collect();
        assert_eq!(resend, [Some(7), None]);
        // New messages get numbers above the stored ones.
        b.publish(
            "acct",
            msg("t", QoS::AtLeastOnce, false, b"new"),
            Instant::now(),
        )
        .unwrap();
        assert!(a.rx.try_recv().unwrap().seq > 43);
        // `live` connected: its stored will is cancelled (and storage forgets it); `left`'s
        // is still due.
        assert!(!b.claim_will(&wills[1]));
        assert!(b.claim_will(&wills[0]));
        b.journal().unwrap().close();
        let k = kinds(&log);
        for expected in [
            "retained r/2 false",
            "delete gone",
            "ack live 41",
            "ack live 42",
            "delete left",
            "will done 51",
            "will done 50",
        ] {
            assert!(k.contains(&expected.to_string()), "{expected} in {k:?}");
        }
    }

    #[test]
    fn retained_semantics() {
        let b = Broker::new(BrokerConfig {
            quotas: Quotas {
                retained_messages: 2,
                ..Quotas::default()
            },
            ..BrokerConfig::default()
        });
        let now = Instant::now();
        b.publish("a", msg("r/1", QoS::AtMostOnce, true, b"x"), Instant::now())
            .unwrap();
        assert!(b.retained_for("a", "r/1", now).is_some());
        assert!(
            b.retained_for("a", "r/+", now).is_none(),
            "only exact filters get retained messages"
        );
        assert!(b.retained_for("b", "r/1", now).is_none());
        b.publish("a", msg("r/2", QoS::AtMostOnce, true, b"x"), Instant::now())
            .unwrap();
        assert!(matches!(
            b.publish("a", msg("r/3", QoS::AtMostOnce, true, b"x"), Instant::now()),
            Err(PublishError::RetainedQuota)
        ));
        b.publish("a", msg("r/2", QoS::AtMostOnce, true, b"y"), Instant::now())
            .unwrap();
        b.publish("a", msg("r/1", QoS::AtMostOnce, true, b""), Instant::now())
            .unwrap();
        assert!(
            b.retained_for("a", "r/1", now).is_none(),
            "an empty retained payload clears"
        );
    }

    #[test]
    fn full_queue_hands_back_blocked_deliveries() {
        let b = Broker::new(BrokerConfig {
            queue_capacity: 2,
            ..BrokerConfig::default()
        });
        let mut a = b.connect("acct", "c", true, Duration::ZERO, Instant::now());
        b.subscribe("acct", a.session, "t", opts(QoS::AtMostOnce));
        let mut blocked = Vec::new();
        for _ in 0..5 {
            blocked.extend(
                b.publish(
                    "acct",
                    msg("t", QoS::AtMostOnce, false, b"x"),
                    Instant::now(),
                )
                .unwrap()
                .blocked,
            );
        }
        assert_eq!(b.stats.delivered.load(Ordering::Relaxed), 2);
        assert_eq!(
            blocked.len(),
            3,
            "the publisher decides: wait for room or drop"
        );
        assert!(blocked.iter().all(|x| x.session == a.session));
        // Room again: a blocked delivery goes through.
        a.rx.try_recv().unwrap();
        let first = blocked.remove(0);
        first.tx.try_send(first.delivery).unwrap();
    }

    #[test]
    fn peers_hear_interest_once_per_filter_and_every_local_message() {
        #[derive(Debug, Default)]
        struct Log(Mutex<Vec<String>>);
        impl peers::Peers for Log {
            fn interest(&self, account: &str, filter: &str, on: bool) -> u64 {
                let mut l = self.0.lock().unwrap();
                l.push(format!("{account} {filter} {on}"));
                l.len() as u64
            }
            fn forward(&self, account: &str, m: &Arc<Message>) {
                let mut l = self.0.lock().unwrap();
                l.push(format!("{account} -> {}", m.topic));
            }
            fn routes_groups(&self) -> bool {
                true
            }
            fn interest_done(
                &self,
                _: u64,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
                Box::pin(async {})
            }
        }
        let b = Broker::new(BrokerConfig::default());
        let now = Instant::now();
        let x = b.connect("acct", "x", true, Duration::ZERO, now);
        b.subscribe("acct", x.session, "a/#", opts(QoS::AtMostOnce));
        let log = Arc::new(Log::default());
        assert!(b.attach_peers(log.clone()));
        assert!(!b.attach_peers(log.clone()));
        let mut y = b.connect("acct", "y", true, Duration::ZERO, now);
        b.subscribe("acct", y.session, "a/#", opts(QoS::AtMostOnce));
        b.subscribe("acct", y.session, "$share/g/a/b", opts(QoS::AtMostOnce));
        b.subscribe("acct", y.session, "$share/g/a/b", opts(QoS::AtLeastOnce));
        let mut z = b.connect("acct", "z", true, Duration::ZERO, now);
        b.subscribe("acct", z.session, "$share/g/a/+", opts(QoS::AtMostOnce));
        b.publish("acct", msg("a/b", QoS::AtMostOnce, false, b"1"), now)
            .unwrap();
        b.publish_from_peer("acct", msg("a/c", QoS::AtMostOnce, false, b"2"), now)
            .unwrap();
        // A shared group is left to NATS: a local publish reaches y once, for a/#.
        let mut got = Vec::new();
        while let Ok(d) = y.rx.try_recv() {
            got.push((d.message.topic.to_string(), d.shared));
        }
        assert_eq!(got, [("a/b".into(), false), ("a/c".into(), false)]);
        assert!(z.rx.try_recv().is_err());
        // For that shared subscription only (group and filter): one delivery, marked shared.
        for _ in 0..20 {
            let m = msg("a/b", QoS::AtMostOnce, false, b"3");
            b.publish_to_group_from_peer("acct", "$share/g/a/b", m, now)
                .unwrap();
            let d = y.rx.try_recv().unwrap();
            assert!(d.shared && &d.message.payload[..] == b"3");
        }
        for other in ["$share/h/a/b", "$share/g/a/#", "a/b"] {
            let m = msg("a/b", QoS::AtMostOnce, false, b"4");
            b.publish_to_group_from_peer("acct", other, m, now).unwrap();
        }
        assert!(y.rx.try_recv().is_err() && z.rx.try_recv().is_err());
        b.unsubscribe("acct", x.session, "a/#");
        leave(&b, &z, now);
        leave(&b, &y, now);
        let mut log = log.0.lock().unwrap().clone();
        // x's a/# is not the last one (y holds it too); a session's subscriptions end in no
        // particular order.
        log[5..].sort();
        assert_eq!(
            log,
            [
                "acct a/# true",
                "acct $share/g/a/b true",
                "acct $share/g/a/+ true",
                "acct -> a/b",
                "acct $share/g/a/+ false",
                "acct $share/g/a/b false",
                "acct a/# false",
            ]
        );
    }

    #[test]
    fn retained_copies_from_peers_replace_and_clear() {
        let b = Broker::new(BrokerConfig::default());
        let now = Instant::now();
        b.set_retained_from_peer("acct", msg("t", QoS::AtMostOnce, true, b"one"));
        b.set_retained_from_peer("acct", msg("t", QoS::AtMostOnce, true, b"two"));
        let r = b.retained_for("acct", "t", now).unwrap();
        assert_eq!(&r.payload[..], b"two");
        assert_eq!(b.sizes().3, 1);
        b.set_retained_from_peer("acct", msg("t", QoS::AtMostOnce, true, b""));
        assert!(b.retained_for("acct", "t", now).is_none());
        assert_eq!(b.sizes().3, 0);
    }

    #[test]
    fn messages_travel_as_publish_packets() {
        let mut m = (*msg("a/b", QoS::AtLeastOnce, true, b"payload")).clone();
        m.properties.content_type = Some("text/plain".into());
        let bytes = m.to_publish_bytes().unwrap();
        let back = Message::from_publish_bytes(&bytes, 42).unwrap();
        assert_eq!(back.topic, m.topic);
        assert_eq!(back.payload, m.payload);
        assert_eq!(
            (back.qos, back.retain, back.timestamp_ms),
            (m.qos, true, 42)
        );
        assert_eq!(back.properties.content_type, m.properties.content_type);
        assert!(Message::from_publish_bytes(&bytes[..bytes.len() - 1], 0).is_none());
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        assert!(Message::from_publish_bytes(&two, 0).is_none());
        assert!(Message::from_publish_bytes(b"", 0).is_none());
    }

    #[test]
    fn shared_subscriptions_deliver_once_per_group() {
        let b = Broker::new(BrokerConfig::default());
        let mut x = b.connect("acct", "x", true, Duration::ZERO, Instant::now());
        let mut y = b.connect("acct", "y", true, Duration::ZERO, Instant::now());
        b.subscribe("acct", x.session, "$share/g/t", opts(QoS::AtMostOnce));
        b.subscribe("acct", y.session, "$share/g/t", opts(QoS::AtMostOnce));
        for _ in 0..10 {
            b.publish(
                "acct",
                msg("t", QoS::AtMostOnce, false, b"x"),
                Instant::now(),
            )
            .unwrap();
        }
        let mut n = 0;
        while x.rx.try_recv().is_ok() {
            n += 1;
        }
        while y.rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 10);
    }

    /// What a shared group stores for an offline member is marked as the group's (sent at the
    /// group's replay rate); a message the session also takes through its own subscription is
    /// its own.
    #[test]
    fn a_shared_groups_stored_messages_are_marked_as_the_groups() {
        let b = Broker::new(BrokerConfig::default());
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let a = b.connect("acct", "m", false, hour, t0);
        b.subscribe("acct", a.session, "$share/g/t/+", opts(QoS::AtLeastOnce));
        b.subscribe("acct", a.session, "t/own", opts(QoS::AtLeastOnce));
        leave(&b, &a, t0);
        b.publish("acct", msg("t/group", QoS::AtLeastOnce, false, b"g"), t0)
            .unwrap();
        b.publish("acct", msg("t/own", QoS::AtLeastOnce, false, b"o"), t0)
            .unwrap();
        let again = b.connect("acct", "m", false, hour, t0);
        let got: Vec<(&[u8], bool)> = again
            .replay
            .iter()
            .map(|d| (&d.message.payload[..], d.shared))
            .collect();
        assert_eq!(got, [(&b"g"[..], true), (&b"o"[..], false)]);
    }

    fn quota_broker(q: Quotas) -> Broker {
        Broker::new(BrokerConfig {
            quotas: q,
            ..BrokerConfig::default()
        })
    }

    /// Retained messages are bounded in bytes (topic + payload) at N and N+1; replacing or
    /// clearing one gives its bytes back; other accounts are not affected.
    #[test]
    fn retained_bytes_quota() {
        // "r/1" + 7 bytes = 10; two such fit in 20 bytes.
        let b = quota_broker(Quotas {
            retained_bytes: 20,
            ..Quotas::default()
        });
        let m = |t: &str| {
            Arc::new(Message {
                topic: t.into(),
                payload: Bytes::from_static(b"1234567"),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: Properties::default(),
                expires_at: None,
                origin: None,
                timestamp_ms: 0,
            })
        };
        b.publish("a", m("r/1"), Instant::now()).unwrap();
        b.publish("a", m("r/2"), Instant::now()).unwrap();
        assert!(matches!(
            b.publish("a", m("r/3"), Instant::now()),
            Err(PublishError::RetainedQuota)
        ));
        b.publish("a", m("r/2"), Instant::now()).unwrap(); // a replacement: same bytes
        b.publish("b", m("r/3"), Instant::now()).unwrap(); // another account has its own quota
        b.publish("a", msg("r/1", QoS::AtMostOnce, true, b""), Instant::now())
            .unwrap(); // cleared
        b.publish("a", m("r/3"), Instant::now()).unwrap();
    }

    /// Offline queues are bounded by bytes across the account's sessions: the session's
    /// oldest go first, and a message that alone does not fit is dropped.
    #[test]
    fn offline_bytes_quota() {
        // Each "q" + 9-byte payload weighs 10: at most 3 queued in the account.
        let b = quota_broker(Quotas {
            offline_bytes: 30,
            ..Quotas::default()
        });
        let t0 = Instant::now();
        for c in ["c1", "c2"] {
            let a = b.connect("acct", c, false, Duration::from_secs(60), Instant::now());
            b.subscribe("acct", a.session, "q", opts(QoS::AtLeastOnce));
            leave(&b, &a, t0);
        }
        // Two sessions, 2 deliveries each per message: the second message pushes out oldest.
        b.publish(
            "acct",
            msg("q", QoS::AtLeastOnce, false, b"111111111"),
            Instant::now(),
        )
        .unwrap();
        b.publish(
            "acct",
            msg("q", QoS::AtLeastOnce, false, b"222222222"),
            Instant::now(),
        )
        .unwrap();
        let inner = b.lock();
        let acct = &inner["acct"];
        assert!(acct.offline_bytes <= 30, "{}", acct.offline_bytes);
        assert_eq!(
            acct.offline_bytes,
            acct.sessions
                .values()
                .flat_map(|s| s.queue.iter())
                .map(|d| weight(&d.message))
                .sum::<u64>()
        );
        drop(inner);
        // Resuming a session gives its queue's bytes back.
        let a = b.connect("acct", "c1", false, Duration::from_secs(60), Instant::now());
        let left = b.lock()["acct"].offline_bytes;
        assert!(left <= 10, "{left}");
        drop(a);
    }

    /// Sessions per account at N and N+1: a client id that has a session may always return.
    #[test]
    fn session_quota() {
        let b = quota_broker(Quotas {
            sessions: 2,
            ..Quotas::default()
        });
        assert!(b.session_allowed("acct", "c1"));
        let _a = b.connect("acct", "c1", true, Duration::ZERO, Instant::now());
        assert!(b.session_allowed("acct", "c2"));
        let _b = b.connect("acct", "c2", true, Duration::ZERO, Instant::now());
        assert!(!b.session_allowed("acct", "c3"), "N+1");
        assert!(b.session_allowed("acct", "c1"), "an existing session");
        assert!(b.session_allowed("other", "c3"), "another account");
    }

    /// Delayed wills hold their bytes against the offline quota until they are sent or dropped.
    #[test]
    fn offline_reservations_count_and_return() {
        let b = Arc::new(quota_broker(Quotas {
            offline_bytes: 100,
            ..Quotas::default()
        }));
        let r1 = b.reserve_offline("acct", 60).unwrap();
        assert!(b.reserve_offline("acct", 41).is_none(), "N+1");
        let r2 = b.reserve_offline("acct", 40).unwrap();
        assert!(b.reserve_offline("other", 100).is_some(), "per account");
        drop(r1);
        assert!(b.reserve_offline("acct", 60).is_some());
        drop(r2);
    }
}
