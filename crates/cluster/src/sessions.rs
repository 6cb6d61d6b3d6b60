//! Persistent sessions in JetStream (decision 0012, "Persistent sessions"): in cluster mode a
//! node's persistent sessions and their QoS 1 queues are stored in the replicated stream
//! `{NAME}_SESSIONS` instead of its own disk, so that when the node dies another node resumes
//! them: a device that reconnects elsewhere asks the dead node for its session, nobody answers,
//! and the new node reads it from the stream ([`Replica::take`]).
//!
//! The stream keeps the last message per subject. Under `{name}.ss.{node}.{account}.{client id}`
//! (each one token, escaped as a level is):
//! - `.s`: the session (expiry, subscriptions, when it was left), as [`encode_loaded`] writes
//!   a session with an empty queue;
//! - `.q.{seq}`: one queued message, as [`encode_loaded`] writes a session with only it;
//! - `.p.{seq}`: the packet id a queued message was sent with and not acknowledged (2 bytes).
//!
//! An acknowledged message's subjects get an empty message that NATS removes after a second
//! (`Nats-TTL`); a session that ends is purged whole. `{name}.ss.{node}.seeded` says the node's
//! sessions live here: a node's first start in cluster mode moves the sessions of its own
//! storage into the stream. Retained messages and delayed wills stay in the node's storage;
//! retained messages are also written, in the same commit, to the cluster's retained stream
//! ([`crate::RetainedLink`]), so that a PUBACK (which waits for the commit) means the cluster
//! has the message, not only this node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt as _;
use sekisho_broker::Message;
use sekisho_broker::durable::{
    Change, Loaded, LoadedMessage, LoadedQueued, REDELIVERY_WINDOW, Snapshot, Storage,
    StorageError, StoredSession, WallClock, decode_loaded, encode_loaded,
};

use crate::subject::token;

/// Set at shutdown: past it, a commit that NATS does not take is no longer tried again (the
/// journal fails, so shutdown does not wait for NATS for ever).
static GIVE_UP_AT: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Commits NATS does not take are tried again for `within` more at most; called at shutdown,
/// before the journal is closed.
pub fn shutting_down(within: Duration) {
    let _ = GIVE_UP_AT.set(Instant::now() + within);
}

/// How long NATS keeps a stored entry of a session no node touches any more (its node died
/// for good and its device never came back): beyond the session's expiry (a session held by a
/// connection: AWS's longest, 7 days), and the redelivery window for a queued message.
const KEPT_BEYOND: Duration = Duration::from_secs(600);
const CONNECTED_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);
const QUEUED_KEPT: Duration = REDELIVERY_WINDOW.saturating_add(KEPT_BEYOND);

/// How long NATS keeps a session's entry written now.
fn session_kept(s: &StoredSession, connected: bool) -> Duration {
    if connected { CONNECTED_KEPT } else { s.expiry }.saturating_add(KEPT_BEYOND)
}

/// How long a read waits for the next message of the stream.
const READ_WAIT: Duration = Duration::from_secs(5);

/// One write to the stream.
#[derive(Debug)]
enum Op {
    /// A value, kept for at most so long (`None`: until replaced).
    Put(String, Bytes, Option<Duration>),
    /// An empty message removed by NATS after a second.
    Forget(String),
    /// Everything under a filter.
    Purge(String),
    /// A message with its own headers (a retained message for the retained stream).
    Publish(String, HeaderMap, Bytes),
}

/// The sessions stream.
#[derive(Debug, Clone)]
pub struct Replica {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    client: async_nats::Client,
    prefix: String,
}

impl Replica {
    /// Makes (or finds) the sessions stream on `client`.
    pub(crate) async fn open(
        client: async_nats::Client,
        name: &str,
        replicas: usize,
    ) -> anyhow::Result<Replica> {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(10));
        let stream = crate::create_stream(
            &js,
            jetstream::stream::Config {
                name: format!("{name}_SESSIONS"),
                subjects: vec![format!("{name}.ss.>")],
                max_messages_per_subject: 1,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                allow_message_ttl: true,
                ..Default::default()
            },
        )
        .await
        .context("cluster: the sessions stream")?;
        Ok(Replica {
            js,
            stream,
            client,
            prefix: name.to_owned(),
        })
    }

    fn node(&self, node: &str) -> String {
        format!("{}.ss.{}", self.prefix, token(node))
    }

    fn session(&self, node: &str, account: &str, client_id: &str) -> String {
        format!(
            "{}.{}.{}",
            self.node(node),
            token(account),
            token(client_id)
        )
    }

    /// Applies `ops` in order; every write acknowledged by JetStream before it returns.
    async fn apply(&self, ops: &[Op]) -> Result<(), String> {
        let mut acks = Vec::new();
        let mut i = 0;
        while i < ops.len() {
            match &ops[i] {
                Op::Put(subject, bytes, ttl) => {
                    let mut h = HeaderMap::new();
                    if let Some(ttl) = ttl {
                        h.insert("Nats-TTL", format!("{}s", ttl.as_secs().max(1)).as_str());
                    }
                    acks.push(
                        self.js
                            .publish_with_headers(subject.clone(), h, bytes.clone())
                            .await
                            .map_err(|e| e.to_string())?,
                    )
                }
                Op::Publish(subject, headers, bytes) => acks.push(
                    self.js
                        .publish_with_headers(subject.clone(), headers.clone(), bytes.clone())
                        .await
                        .map_err(|e| e.to_string())?,
                ),
                Op::Forget(subject) => {
                    let mut h = HeaderMap::new();
                    h.insert("Nats-TTL", "1s");
                    acks.push(
                        self.js
                            .publish_with_headers(subject.clone(), h, Bytes::new())
                            .await
                            .map_err(|e| e.to_string())?,
                    );
                }
                Op::Purge(_) => {
                    // Writes before them land first (a session ended and begun again in one
                    // batch keeps the new one); purges in a row (sessions of different
                    // client ids) go at once.
                    for a in acks.drain(..) {
                        a.await.map_err(|e| e.to_string())?;
                    }
                    let mut purges = futures_util::stream::FuturesUnordered::new();
                    while let Some(Op::Purge(filter)) = ops.get(i) {
                        purges.push(self.stream.purge().filter(filter.clone()).into_future());
                        i += 1;
                    }
                    while let Some(r) = purges.next().await {
                        r.map_err(|e| e.to_string())?;
                    }
                    continue;
                }
            }
            i += 1;
        }
        for a in acks {
            a.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Whether a non-empty message is stored on `subject`.
    async fn has(&self, subject: &str) -> Result<bool, String> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(!m.payload.is_empty()),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(false)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The sessions stored under `filter` (a node's `.>`, or one session's when `one`), which
    /// holds at least one message (checked by the caller: an empty filter delivers nothing).
    async fn read(&self, filter: String, one: bool) -> Result<Vec<Loaded>, String> {
        let mut messages = self
            .stream
            .create_consumer(jetstream::consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: filter.clone(),
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let mut parts = Parts::default();
        let base = filter.trim_end_matches(".>").len();
        loop {
            // The filter holds a message (the caller saw one): a silence is a failure, never
            // an empty answer.
            let m = match tokio::time::timeout(READ_WAIT, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) => return Err("the sessions stream ended".into()),
                Err(_) => return Err("no message of the sessions stream came for 5 s".into()),
            };
            parts.read += 1;
            let pending = m.info().map_or(0, |i| i.pending);
            if let Some(tail) = m.subject.as_str().get(base..) {
                parts.add(tail.trim_start_matches('.'), &m.payload, one);
            }
            if pending == 0 {
                break;
            }
        }
        Ok(parts.sessions())
    }

    /// Takes the session of `client_id` that node `node` stored (a node that does not answer:
    /// it is dead or cut off): reads it, for the caller to resume; [`Replica::forget`] removes
    /// it once the caller stored it.
    pub(crate) async fn take(
        &self,
        node: &str,
        account: &str,
        client_id: &str,
    ) -> Result<Option<Loaded>, String> {
        let base = self.session(node, account, client_id);
        if !self.has(&format!("{base}.s")).await? {
            return Ok(None);
        }
        let mut found = self.read(format!("{base}.>"), true).await?;
        Ok(found
            .pop()
            .filter(|l| l.account == account && l.client_id == client_id))
    }

    /// Removes the session of `client_id` that node `node` stored.
    pub(crate) async fn forget(
        &self,
        node: &str,
        account: &str,
        client_id: &str,
    ) -> Result<(), String> {
        let base = self.session(node, account, client_id);
        self.apply(&[Op::Purge(format!("{base}.>"))]).await
    }
}

/// Messages of the stream gathered into sessions.
#[derive(Default)]
struct Parts {
    read: usize,
    /// By (account, client id) tokens: the session and its queue by sequence, with packet ids.
    sessions: BTreeMap<(String, String), Gathered>,
}

#[derive(Default)]
struct Gathered {
    session: Option<Loaded>,
    queue: BTreeMap<u64, LoadedQueued>,
    sent: HashMap<u64, u16>,
}

impl Parts {
    /// One message: `tail` is its subject after the node's (`{account}.{client}.{kind}...`),
    /// or after the session's when `one` (`{kind}...`).
    fn add(&mut self, tail: &str, payload: &[u8], one: bool) {
        if payload.is_empty() {
            return;
        }
        let mut t = tail.split('.');
        let key = if one {
            (String::new(), String::new())
        } else {
            match (t.next(), t.next()) {
                (Some(a), Some(c)) => (a.to_owned(), c.to_owned()),
                _ => return,
            }
        };
        let (kind, seq) = (t.next(), t.next().and_then(|s| s.parse::<u64>().ok()));
        let g = self.sessions.entry(key).or_default();
        match (kind, seq) {
            (Some("s"), None) => g.session = decode_loaded(payload),
            (Some("q"), Some(seq)) => {
                if let Some(q) = decode_loaded(payload).and_then(|mut l| l.queue.pop()) {
                    g.queue.insert(seq, q);
                }
            }
            (Some("p"), Some(seq)) => {
                if let Ok(id) = <[u8; 2]>::try_from(payload) {
                    g.sent.insert(seq, u16::from_be_bytes(id));
                }
            }
            _ => tracing::warn!(
                subject = tail,
                "cluster: an unreadable entry of the sessions stream"
            ),
        }
    }

    /// The sessions (queue entries without their session are left out: it ended).
    fn sessions(self) -> Vec<Loaded> {
        self.sessions
            .into_values()
            .filter_map(|g| {
                let mut l = g.session?;
                l.queue = g
                    .queue
                    .into_iter()
                    .map(|(seq, mut q)| {
                        q.seq = seq;
                        q.packet_id = g.sent.get(&seq).copied();
                        q
                    })
                    .collect();
                Some(l)
            })
            .collect()
    }
}

/// A node's storage in cluster mode: persistent sessions and queues in the sessions stream,
/// the rest (retained messages, delayed wills) in `local`.
pub struct Replicated<S> {
    local: S,
    replica: Replica,
    node: String,
    runtime: tokio::runtime::Handle,
    /// When each session not connected was left (a session left earlier keeps its time).
    left: HashMap<(Arc<str>, Arc<str>), u64>,
    /// Queued messages with a packet id stored, by session.
    sent: HashMap<(Arc<str>, Arc<str>), HashSet<u64>>,
    /// Where retained messages go once the node has joined ([`crate::start`]).
    retained: crate::RetainedLink,
}

impl<S> std::fmt::Debug for Replicated<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn session_bytes(
    account: &str,
    client_id: &str,
    s: &StoredSession,
    left: Option<u64>,
) -> Option<Bytes> {
    encode_loaded(&Loaded {
        account: account.to_owned(),
        client_id: client_id.to_owned(),
        session: s.clone(),
        disconnected_at_ms: left,
        queue: Vec::new(),
    })
    .map(Bytes::from)
}

fn queued_bytes(account: &str, client_id: &str, q: LoadedQueued) -> Option<Bytes> {
    encode_loaded(&Loaded {
        account: account.to_owned(),
        client_id: client_id.to_owned(),
        session: StoredSession {
            expiry: Duration::ZERO,
            subscriptions: Vec::new(),
            connected: false,
        },
        disconnected_at_ms: None,
        queue: vec![q],
    })
    .map(Bytes::from)
}

impl<S: Storage> Replicated<S> {
    /// Opens `local` and this node's sessions in the stream (moving `local`'s sessions there
    /// on the node's first start in cluster mode); returns what to start the broker with.
    pub async fn open(
        replica: Replica,
        node: &str,
        mut local: S,
    ) -> anyhow::Result<(Replicated<S>, Snapshot)> {
        let mut snapshot = local.load().context("loading the broker's storage")?;
        let seeded = format!("{}.seeded", replica.node(node));
        let mine = replica.has(&seeded).await.map_err(anyhow::Error::msg)?;
        let clock = WallClock::read();
        let mut s = Replicated {
            local,
            replica,
            node: node.to_owned(),
            runtime: tokio::runtime::Handle::current(),
            left: HashMap::new(),
            sent: HashMap::new(),
            retained: crate::RetainedLink::default(),
        };
        let ours = std::mem::take(&mut snapshot.sessions);
        let sessions = if mine {
            if !ours.is_empty() {
                tracing::warn!(
                    sessions = ours.len(),
                    "cluster: sessions in this node's own storage are not its sessions (those are in the sessions stream); dropped"
                );
            }
            s.replica
                .read(format!("{}.>", s.replica.node(node)), false)
                .await
                .map_err(anyhow::Error::msg)?
        } else {
            let mut ops = Vec::new();
            for l in &ours {
                let base = s.replica.session(node, &l.account, &l.client_id);
                if let Some(b) =
                    session_bytes(&l.account, &l.client_id, &l.session, l.disconnected_at_ms)
                {
                    let connected = l.disconnected_at_ms.is_none();
                    ops.push(Op::Put(
                        format!("{base}.s"),
                        b,
                        Some(session_kept(&l.session, connected)),
                    ));
                }
                for q in &l.queue {
                    if let Some(id) = q.packet_id {
                        ops.push(Op::Put(
                            format!("{base}.p.{}", q.seq),
                            Bytes::copy_from_slice(&id.to_be_bytes()),
                            Some(QUEUED_KEPT),
                        ));
                    }
                    if let Some(b) = queued_bytes(&l.account, &l.client_id, q.clone()) {
                        ops.push(Op::Put(format!("{base}.q.{}", q.seq), b, Some(QUEUED_KEPT)));
                    }
                }
            }
            ops.push(Op::Put(seeded, Bytes::from_static(b"1"), None));
            s.replica.apply(&ops).await.map_err(anyhow::Error::msg)?;
            if !ours.is_empty() {
                tracing::info!(
                    sessions = ours.len(),
                    "cluster: this node's sessions moved into the sessions stream"
                );
            }
            ours.clone()
        };
        // Sessions are no longer kept in the node's own storage.
        let gone: Vec<Change> = ours
            .iter()
            .map(|l| Change::DeleteSession {
                account: Arc::from(l.account.as_str()),
                client_id: Arc::from(l.client_id.as_str()),
            })
            .collect();
        if !gone.is_empty() {
            s.local.commit(&gone, clock)?;
        }
        for l in &sessions {
            let key: (Arc<str>, Arc<str>) = (
                Arc::from(l.account.as_str()),
                Arc::from(l.client_id.as_str()),
            );
            if let Some(at) = l.disconnected_at_ms {
                s.left.insert(key.clone(), at);
            }
            let sent: HashSet<u64> = l
                .queue
                .iter()
                .filter(|q| q.packet_id.is_some())
                .map(|q| q.seq)
                .collect();
            if !sent.is_empty() {
                s.sent.insert(key, sent);
            }
        }
        snapshot.sessions = sessions;
        Ok((s, snapshot))
    }

    /// Where this storage writes retained messages: handed to [`crate::start`], which fills
    /// it in when the node joins. Before then no client is served (nothing is written).
    pub fn retained_link(&self) -> crate::RetainedLink {
        self.retained.clone()
    }

    fn ops(&mut self, changes: &[Change], clock: WallClock, local: &mut Vec<Change>) -> Vec<Op> {
        let mut ops = Vec::new();
        for c in changes {
            match c {
                Change::PutSession {
                    account,
                    client_id,
                    session,
                } => {
                    let key = (account.clone(), client_id.clone());
                    let left = if session.connected {
                        self.left.remove(&key);
                        None
                    } else {
                        Some(*self.left.entry(key).or_insert(clock.now_ms))
                    };
                    let base = self.replica.session(&self.node, account, client_id);
                    if let Some(b) = session_bytes(account, client_id, session, left) {
                        ops.push(Op::Put(
                            format!("{base}.s"),
                            b,
                            Some(session_kept(session, session.connected)),
                        ));
                    }
                }
                Change::DeleteSession { account, client_id } => {
                    self.left.remove(&(account.clone(), client_id.clone()));
                    self.sent.remove(&(account.clone(), client_id.clone()));
                    let base = self.replica.session(&self.node, account, client_id);
                    ops.push(Op::Purge(format!("{base}.>")));
                }
                Change::Append {
                    account,
                    client_id,
                    seq,
                    retain,
                    shared,
                    message,
                } => {
                    let q = LoadedQueued {
                        seq: *seq,
                        retain: *retain,
                        shared: *shared,
                        packet_id: None,
                        message: LoadedMessage {
                            message: Message {
                                expires_at: None,
                                origin: None,
                                ..(**message).clone()
                            },
                            expires_at_ms: message.expires_at.map(|e| clock.ms(e)),
                        },
                    };
                    let base = self.replica.session(&self.node, account, client_id);
                    match queued_bytes(account, client_id, q) {
                        Some(b) => {
                            ops.push(Op::Put(format!("{base}.q.{seq}"), b, Some(QUEUED_KEPT)))
                        }
                        None => {
                            tracing::warn!(%client_id, seq, "cluster: a message that cannot be encoded is not stored")
                        }
                    }
                }
                Change::Sent {
                    account,
                    client_id,
                    seq,
                    packet_id,
                } => {
                    self.sent
                        .entry((account.clone(), client_id.clone()))
                        .or_default()
                        .insert(*seq);
                    let base = self.replica.session(&self.node, account, client_id);
                    ops.push(Op::Put(
                        format!("{base}.p.{seq}"),
                        Bytes::copy_from_slice(&packet_id.to_be_bytes()),
                        Some(QUEUED_KEPT),
                    ));
                }
                Change::Ack {
                    account,
                    client_id,
                    seq,
                } => {
                    let base = self.replica.session(&self.node, account, client_id);
                    ops.push(Op::Forget(format!("{base}.q.{seq}")));
                    let key = (account.clone(), client_id.clone());
                    let had = self.sent.get_mut(&key).is_some_and(|s| s.remove(seq));
                    if self.sent.get(&key).is_some_and(HashSet::is_empty) {
                        self.sent.remove(&key);
                    }
                    if had {
                        ops.push(Op::Forget(format!("{base}.p.{seq}")));
                    }
                }
                Change::SetRetained {
                    account,
                    topic,
                    message,
                    published,
                } => {
                    local.push(c.clone());
                    // Only what a publish here set: a copy following the stream came from it.
                    if *published
                        && let Some((subject, headers, bytes)) =
                            self.retained.write(account, topic, message.as_ref())
                    {
                        ops.push(Op::Publish(subject, headers, bytes));
                    }
                }
                Change::PutWill { .. } | Change::DeleteWill { .. } => local.push(c.clone()),
            }
        }
        ops
    }
}

/// `ops` with only the last retained write of each subject: the writes of a batch go out
/// together and are acknowledged after, so if an earlier one were lost and a later stored,
/// writing the batch again would put the earlier one back over the later (the later then
/// counts as a duplicate).
fn last_retained_write(ops: Vec<Op>) -> Vec<Op> {
    let mut seen = HashSet::new();
    let mut kept: Vec<Op> = ops
        .into_iter()
        .rev()
        .filter(|op| match op {
            Op::Publish(subject, ..) => seen.insert(subject.clone()),
            _ => true,
        })
        .collect();
    kept.reverse();
    kept
}

impl<S: Storage> Storage for Replicated<S> {
    /// Loaded when opened ([`Replicated::open`]).
    fn load(&mut self) -> Result<Snapshot, StorageError> {
        Err(StorageError("loaded when opened".into()))
    }

    fn commit(&mut self, changes: &[Change], clock: WallClock) -> Result<(), StorageError> {
        let mut local = Vec::new();
        let ops = last_retained_write(self.ops(changes, clock, &mut local));
        if !local.is_empty() {
            self.local.commit(&local, clock)?;
        }
        if ops.is_empty() {
            return Ok(());
        }
        // Writes are idempotent (the last message per subject): a batch is written again whole
        // until NATS takes it, however long NATS is away (a node cut off from NATS ends its
        // connections meanwhile, so little more comes in). Meanwhile nothing more is
        // acknowledged (PUBACKs wait). At shutdown, a batch NATS does not take fails.
        let mut warned: Option<Instant> = None;
        loop {
            match self.runtime.block_on(self.replica.apply(&ops)) {
                Ok(()) => {
                    if warned.is_some() {
                        tracing::info!("cluster: the sessions stream takes writes again");
                    }
                    return Ok(());
                }
                Err(e) if GIVE_UP_AT.get().is_some_and(|at| Instant::now() >= *at) => {
                    return Err(StorageError(format!(
                        "the sessions stream, at shutdown: {e}"
                    )));
                }
                Err(e) => {
                    if warned.is_none_or(|w| w.elapsed() > Duration::from_secs(30)) {
                        tracing::warn!(error = %e, "cluster: the sessions stream does not take writes; trying again");
                        warned = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sekisho_mqtt::{QoS, SubscriptionOptions};

    #[test]
    fn a_batch_writes_only_the_last_retained_message_of_a_topic() {
        let publish = |s: &str, b: &'static [u8]| {
            Op::Publish(s.to_owned(), HeaderMap::new(), Bytes::from_static(b))
        };
        let ops = vec![
            publish("r.a", b"1"),
            Op::Forget("q.1".into()),
            publish("r.b", b"x"),
            publish("r.a", b"2"),
            Op::Forget("q.1".into()),
        ];
        let kept: Vec<String> = last_retained_write(ops)
            .iter()
            .map(|op| match op {
                Op::Publish(s, _, b) => format!("{s}={}", String::from_utf8_lossy(b)),
                Op::Forget(s) => format!("forget {s}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kept, ["forget q.1", "r.b=x", "r.a=2", "forget q.1"]);
    }

    fn message(payload: &'static [u8]) -> Message {
        Message {
            topic: Arc::from("t/1"),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            origin: None,
            timestamp_ms: 7,
        }
    }

    fn queued(seq: u64, payload: &'static [u8]) -> LoadedQueued {
        LoadedQueued {
            seq,
            retain: false,
            shared: seq == 3,
            packet_id: None,
            message: LoadedMessage {
                message: message(payload),
                expires_at_ms: Some(99),
            },
        }
    }

    #[test]
    fn stream_entries_gather_into_sessions_in_sequence_order() {
        let session = StoredSession {
            expiry: Duration::from_secs(3600),
            subscriptions: vec![("t/#".into(), SubscriptionOptions::default())],
            connected: false,
        };
        let s = session_bytes("acct", "dev-1", &session, Some(5)).unwrap();
        let mut parts = Parts::default();
        // Out of order, with an acknowledged message's empty entries and an ended session's
        // leftover queue entry.
        parts.add(
            "acct.dev~2D1.q.3",
            &queued_bytes("acct", "dev-1", queued(3, b"c")).unwrap(),
            false,
        );
        parts.add("acct.dev~2D1.s", &s, false);
        parts.add(
            "acct.dev~2D1.q.1",
            &queued_bytes("acct", "dev-1", queued(1, b"a")).unwrap(),
            false,
        );
        parts.add("acct.dev~2D1.q.2", b"", false);
        parts.add("acct.dev~2D1.p.2", b"", false);
        parts.add("acct.dev~2D1.p.3", &[0, 9], false);
        parts.add(
            "acct.gone.q.4",
            &queued_bytes("acct", "gone", queued(4, b"d")).unwrap(),
            false,
        );
        parts.add("acct.dev~2D1.p.1", &[1, 2, 3], false);
        parts.add("acct.dev~2D1.x", b"junk", false);
        let got = parts.sessions();
        assert_eq!(got.len(), 1, "the ended session's entry is left out");
        let l = &got[0];
        assert_eq!(
            (l.account.as_str(), l.client_id.as_str()),
            ("acct", "dev-1")
        );
        assert_eq!(l.session, session);
        assert_eq!(l.disconnected_at_ms, Some(5));
        let q: Vec<_> = l
            .queue
            .iter()
            .map(|q| (q.seq, q.packet_id, q.shared))
            .collect();
        assert_eq!(q, [(1, None, false), (3, Some(9), true)]);
        assert_eq!(l.queue[1].message.message.payload, Bytes::from_static(b"c"));
        assert_eq!(l.queue[1].message.expires_at_ms, Some(99));
    }

    #[test]
    fn one_sessions_entries_are_read_without_its_names() {
        let session = StoredSession {
            expiry: Duration::from_secs(60),
            subscriptions: Vec::new(),
            connected: true,
        };
        let mut parts = Parts::default();
        parts.add("s", &session_bytes("a", "c", &session, None).unwrap(), true);
        parts.add(
            "q.8",
            &queued_bytes("a", "c", queued(8, b"x")).unwrap(),
            true,
        );
        let got = parts.sessions();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].disconnected_at_ms, None);
        assert_eq!(got[0].queue.len(), 1);
        assert_eq!(got[0].queue[0].seq, 8);
    }
}
