//! Durable broker state: the storage seam and the journal that commits to it in groups.
//!
//! The broker records every change to what must survive a crash (persistent sessions and their
//! subscriptions, the QoS 1 messages queued or in flight for them, retained messages, delayed wills) as a
//! [`Change`], in order, under its lock. A writer thread takes what has accumulated, commits it
//! to the [`Storage`] in one transaction and advances the durable watermark. A connection that
//! must not acknowledge before its changes are durable (PUBACK of a QoS 1 publish that reached
//! a persistent session or set a retained message, SUBACK of a persistent session, CONNACK of a
//! new persistent session) waits for its ticket with [`Journal::wait`]. Everything else
//! (acknowledgements, disconnects, drops) is recorded without waiting.
//!
//! The seam names what a distributed engine must provide: claim a client id (single node: the
//! broker's own map), append to a session queue ([`Change::Append`]), note the packet id of a
//! message sent and not acknowledged ([`Change::Sent`]), read and acknowledge
//! ([`Storage::load`], [`Change::Ack`]), set and scan retained messages
//! ([`Change::SetRetained`], [`Storage::load`]), keep delayed wills ([`Change::PutWill`]), and
//! watch changes (single node: none, the broker is the only writer).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sekisho_mqtt::{QoS, SubscriptionOptions};
use tokio::sync::watch;

use crate::Message;

/// How long a stored QoS 1 message is kept for redelivery (AWS: up to an hour).
pub const REDELIVERY_WINDOW: Duration = Duration::from_secs(3600);

/// Most changes committed in one transaction.
const MAX_BATCH: usize = 8192;

/// A persistent session as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    /// Session expiry interval.
    pub expiry: Duration,
    /// Subscriptions, by filter.
    pub subscriptions: Vec<(String, SubscriptionOptions)>,
    /// Whether a connection holds it. A stored session that is not connected records when it
    /// was left ([`Loaded::disconnected_at_ms`]).
    pub connected: bool,
}

/// One change to durable state.
#[derive(Debug, Clone)]
pub enum Change {
    /// Creates or replaces a persistent session.
    PutSession {
        /// Account.
        account: Arc<str>,
        /// Client id.
        client_id: Arc<str>,
        /// The session.
        session: StoredSession,
    },
    /// Ends a session and drops its queue.
    DeleteSession {
        /// Account.
        account: Arc<str>,
        /// Client id.
        client_id: Arc<str>,
    },
    /// A QoS 1 message for a persistent session, under a sequence number unique across the
    /// broker's life (so an acknowledgement for a session that ended never matches a later
    /// one's message).
    Append {
        /// Account.
        account: Arc<str>,
        /// Client id.
        client_id: Arc<str>,
        /// Sequence number.
        seq: u64,
        /// RETAIN flag to deliver with.
        retain: bool,
        /// Queued for a shared subscription group.
        shared: bool,
        /// The message.
        message: Arc<Message>,
    },
    /// A stored message was sent and not acknowledged when its connection ended: it is sent
    /// again with this packet id and DUP, after a restart too ([MQTT-4.4.0-1]).
    Sent {
        /// Account.
        account: Arc<str>,
        /// Client id.
        client_id: Arc<str>,
        /// Sequence number.
        seq: u64,
        /// The packet id it was sent with.
        packet_id: u16,
    },
    /// A stored message was acknowledged by the client, expired or was dropped.
    Ack {
        /// Account.
        account: Arc<str>,
        /// Client id.
        client_id: Arc<str>,
        /// Sequence number.
        seq: u64,
    },
    /// A will that waits for its Will Delay Interval, until `at`.
    PutWill {
        /// Account.
        account: Arc<str>,
        /// Its id, unique across the broker's life.
        id: u64,
        /// When it is due.
        at: Instant,
        /// The will.
        will: StoredWill,
    },
    /// A delayed will was sent or cancelled.
    DeleteWill {
        /// Account.
        account: Arc<str>,
        /// Its id.
        id: u64,
    },
    /// Sets (`Some`) or clears (`None`) a topic's retained message.
    SetRetained {
        /// Account.
        account: Arc<str>,
        /// Topic.
        topic: Arc<str>,
        /// The message.
        message: Option<Arc<Message>>,
        /// Set or cleared by a publish on this node (the other nodes of a cluster learn it from
        /// this node); false for this node's copy following the cluster, or dropped at load.
        published: bool,
    },
}

/// A delayed will as stored: who left it, and its message. It is authorized again with the
/// certificate's policies when it is sent, so only wills of certificate principals are stored
/// (an IAM principal's credentials are not kept).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWill {
    /// Client id of the connection that left it.
    pub client_id: Arc<str>,
    /// The certificate that connection authenticated with.
    pub certificate: Arc<str>,
    /// The message; `expires_at` unset, its Message Expiry Interval (counted from publication)
    /// in its properties.
    pub message: Arc<Message>,
}

/// A delayed will as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedWill {
    /// Account.
    pub account: String,
    /// Its id.
    pub id: u64,
    /// When it is due, epoch milliseconds.
    pub at_ms: u64,
    /// The will.
    pub will: StoredWill,
}

/// A message as loaded: its wall-clock expiry instead of an `Instant`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedMessage {
    /// The message; `expires_at` and `origin` are unset.
    pub message: Message,
    /// When it expires, epoch milliseconds.
    pub expires_at_ms: Option<u64>,
}

/// A stored queue entry, as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedQueued {
    /// Sequence number.
    pub seq: u64,
    /// RETAIN flag to deliver with.
    pub retain: bool,
    /// Queued for a shared subscription group (sent at the group's replay rate).
    pub shared: bool,
    /// The packet id it was sent with before, not acknowledged (sent again with it and DUP).
    pub packet_id: Option<u16>,
    /// The message.
    pub message: LoadedMessage,
}

/// A stored session with its queue, as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Account.
    pub account: String,
    /// Client id.
    pub client_id: String,
    /// The session.
    pub session: StoredSession,
    /// When it was left, epoch milliseconds (`None`: it was connected when the server stopped).
    pub disconnected_at_ms: Option<u64>,
    /// Queued and unacknowledged messages, in order.
    pub queue: Vec<LoadedQueued>,
}

/// Everything stored, as loaded at start-up.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// Persistent sessions.
    pub sessions: Vec<Loaded>,
    /// Retained messages: (account, message).
    pub retained: Vec<(String, LoadedMessage)>,
    /// Delayed wills.
    pub wills: Vec<LoadedWill>,
}

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
#[error("broker storage: {0}")]
pub struct StorageError(pub String);

/// Wall-clock time and the monotonic instant it corresponds to, read once per commit by the
/// journal's writer (the only place this module reads a clock), so stored expiries are wall
/// times.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// Now, monotonic.
    pub now: Instant,
    /// Now, epoch milliseconds.
    pub now_ms: u64,
}

impl WallClock {
    /// The epoch milliseconds of `at`.
    pub fn ms(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.now) {
            Some(ahead) => self.now_ms.saturating_add(ahead.as_millis() as u64),
            None => self
                .now_ms
                .saturating_sub(self.now.duration_since(at).as_millis() as u64),
        }
    }

    /// The instant of epoch milliseconds `ms`.
    pub fn instant(&self, ms: u64) -> Instant {
        if ms >= self.now_ms {
            self.now + Duration::from_millis(ms - self.now_ms)
        } else {
            self.now
                .checked_sub(Duration::from_millis(self.now_ms - ms))
                .unwrap_or(self.now)
        }
    }

    /// Reads the clocks: the journal's writer thread is a driver, the one place in this crate
    /// that may.
    #[allow(clippy::disallowed_methods)]
    pub fn read() -> WallClock {
        WallClock {
            now: Instant::now(),
            now_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

/// Where durable broker state lives. Implementations: `sekisho-store` (SQLite under the data
/// directory); a distributed engine later.
pub trait Storage: Send + 'static {
    /// Everything stored.
    fn load(&mut self) -> Result<Snapshot, StorageError>;
    /// Applies `changes` in order, atomically and durably (on disk, not just in a cache,
    /// before it returns). `clock` stamps disconnections and converts expiries.
    fn commit(&mut self, changes: &[Change], clock: WallClock) -> Result<(), StorageError>;
}

/// A change (none for a [`Journal::barrier`]) and its ticket (0: nobody waits for it).
type Recorded = (u64, Option<Change>);

/// The ordered, group-committed log of changes in front of a [`Storage`].
pub struct Journal {
    tx: Mutex<Option<mpsc::Sender<Recorded>>>,
    next: AtomicU64,
    durable: watch::Receiver<u64>,
    failed: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Commits made (for metrics and benchmarks).
    pub commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Starts the writer thread over `storage`.
    pub fn start(mut storage: impl Storage) -> Journal {
        let (tx, rx) = mpsc::channel::<Recorded>();
        let (durable_tx, durable) = watch::channel(0u64);
        let failed = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let (f, c) = (failed.clone(), commits.clone());
        let writer = std::thread::Builder::new()
            .name("broker-journal".into())
            .spawn(move || {
                let mut batch: Vec<Change> = Vec::new();
                while let Ok((ticket, change)) = rx.recv() {
                    let mut last = ticket;
                    batch.extend(change);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok((t, change)) => {
                                last = last.max(t);
                                batch.extend(change);
                            }
                            Err(_) => break,
                        }
                    }
                    // Fail-stop: after one failed commit nothing more is written (a later commit
                    // would apply changes whose predecessors were lost), and nothing more is
                    // acknowledged as durable.
                    if !f.load(Ordering::SeqCst)
                        && !batch.is_empty()
                        && let Err(e) = storage.commit(&batch, WallClock::read())
                    {
                        tracing::error!(error = %e, "broker storage failed; nothing more is stored or acknowledged as durable until a restart");
                        f.store(true, Ordering::SeqCst);
                    }
                    if !batch.is_empty() {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    batch.clear();
                    durable_tx.send_if_modified(|d| {
                        if last > *d {
                            *d = last;
                            true
                        } else {
                            false
                        }
                    });
                }
            })
            .ok();
        Journal {
            tx: Mutex::new(Some(tx)),
            next: AtomicU64::new(1),
            durable,
            failed,
            writer: Mutex::new(writer),
            commits,
        }
    }

    /// Records a change that something will wait for; returns its ticket. Callers record under
    /// the broker's lock, so tickets are in the order the changes were made.
    pub fn record(&self, change: Change) -> u64 {
        self.send(true, Some(change))
    }

    /// A ticket that is durable once everything recorded before it is (no change of its own).
    /// Callable without the broker's lock: tickets are taken under the channel's lock, so
    /// they reach the writer in their order (a later ticket never moves the watermark past an
    /// earlier change still on its way).
    pub fn barrier(&self) -> u64 {
        self.send(true, None)
    }

    /// Records a change nobody waits for (ticket 0: it does not move the watermark).
    pub fn record_quietly(&self, change: Change) {
        self.send(false, Some(change));
    }

    /// Sends `change` to the writer with a new ticket (`ticketed`) or ticket 0; returns it.
    fn send(&self, ticketed: bool, change: Option<Change>) -> u64 {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = if ticketed {
            self.next.fetch_add(1, Ordering::SeqCst)
        } else {
            0
        };
        let sent = tx
            .as_ref()
            .is_some_and(|tx| tx.send((ticket, change)).is_ok());
        if !sent {
            self.failed.store(true, Ordering::SeqCst);
        }
        ticket
    }

    /// Waits until every change up to `ticket` is durable. False when storage failed.
    pub async fn wait(&self, ticket: u64) -> bool {
        if ticket == 0 {
            return !self.failed.load(Ordering::SeqCst);
        }
        let mut rx = self.durable.clone();
        let reached = rx.wait_for(|d| *d >= ticket).await.is_ok();
        reached && !self.failed.load(Ordering::SeqCst)
    }

    /// Whether storage has failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Commits what is recorded and stops the writer (at shutdown). Later records fail.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

/// The storage of a broker that keeps nothing (tests, benchmarks of the memory-only path).
#[derive(Debug, Default)]
pub struct NoStorage;

impl Storage for NoStorage {
    fn load(&mut self) -> Result<Snapshot, StorageError> {
        Ok(Snapshot::default())
    }
    fn commit(&mut self, _: &[Change], _: WallClock) -> Result<(), StorageError> {
        Ok(())
    }
}

/// The QoS a stored queue entry is delivered at: always 1 (only QoS 1 is stored).
pub const STORED_QOS: QoS = QoS::AtLeastOnce;

/// A session moving between nodes ([`crate::Broker::take_session`]) as bytes: version 1,
/// account and client id (u16 length each), expiry and the time it was left (epoch ms, u64;
/// `u64::MAX` for none), the subscriptions (u32 count; u16 length, filter, the MQTT 5 options
/// byte) and the queue (u32 count; sequence u64, flags u8 (retain, shared, sent, expires),
/// packet id u16, expiry and publication epoch ms u64, u32 length and the message as the
/// MQTT 5 PUBLISH our codec writes). All big-endian.
pub fn encode_loaded(l: &Loaded) -> Option<Vec<u8>> {
    let mut out = vec![1u8];
    let text = |out: &mut Vec<u8>, s: &str| -> Option<()> {
        out.extend_from_slice(&u16::try_from(s.len()).ok()?.to_be_bytes());
        out.extend_from_slice(s.as_bytes());
        Some(())
    };
    text(&mut out, &l.account)?;
    text(&mut out, &l.client_id)?;
    out.extend_from_slice(&(l.session.expiry.as_millis() as u64).to_be_bytes());
    out.extend_from_slice(&l.disconnected_at_ms.unwrap_or(u64::MAX).to_be_bytes());
    out.extend_from_slice(
        &u32::try_from(l.session.subscriptions.len())
            .ok()?
            .to_be_bytes(),
    );
    for (filter, o) in &l.session.subscriptions {
        text(&mut out, filter)?;
        out.push(
            (o.qos as u8)
                | (u8::from(o.no_local) << 2)
                | (u8::from(o.retain_as_published) << 3)
                | ((o.retain_handling & 3) << 4),
        );
    }
    out.extend_from_slice(&u32::try_from(l.queue.len()).ok()?.to_be_bytes());
    for q in &l.queue {
        let bytes = q.message.message.to_publish_bytes().ok()?;
        out.extend_from_slice(&q.seq.to_be_bytes());
        out.push(
            u8::from(q.retain)
                | (u8::from(q.shared) << 1)
                | (u8::from(q.packet_id.is_some()) << 2)
                | (u8::from(q.message.expires_at_ms.is_some()) << 3),
        );
        out.extend_from_slice(&q.packet_id.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&q.message.expires_at_ms.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&q.message.message.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&u32::try_from(bytes.len()).ok()?.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    Some(out)
}

/// [`encode_loaded`]'s bytes back; `None` if they are not such bytes.
pub fn decode_loaded(mut b: &[u8]) -> Option<Loaded> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    fn int<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
        take(b, N)?.try_into().ok()
    }
    fn text(b: &mut &[u8]) -> Option<String> {
        let n = u16::from_be_bytes(int(b)?) as usize;
        Some(std::str::from_utf8(take(b, n)?).ok()?.to_owned())
    }
    if take(&mut b, 1)? != [1] {
        return None;
    }
    let account = text(&mut b)?;
    let client_id = text(&mut b)?;
    let expiry = Duration::from_millis(u64::from_be_bytes(int(&mut b)?));
    let left = u64::from_be_bytes(int(&mut b)?);
    let n = u32::from_be_bytes(int(&mut b)?) as usize;
    let mut subscriptions = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let filter = text(&mut b)?;
        let [o] = int::<1>(&mut b)?;
        subscriptions.push((
            filter,
            SubscriptionOptions {
                qos: if o & 3 == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                },
                no_local: o & 4 != 0,
                retain_as_published: o & 8 != 0,
                retain_handling: (o >> 4) & 3,
            },
        ));
    }
    let n = u32::from_be_bytes(int(&mut b)?) as usize;
    let mut queue = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let seq = u64::from_be_bytes(int(&mut b)?);
        let [flags] = int::<1>(&mut b)?;
        let packet_id = u16::from_be_bytes(int(&mut b)?);
        let expires = u64::from_be_bytes(int(&mut b)?);
        let timestamp_ms = u64::from_be_bytes(int(&mut b)?);
        let len = u32::from_be_bytes(int(&mut b)?) as usize;
        let message = Message::from_publish_bytes(take(&mut b, len)?, timestamp_ms)?;
        queue.push(LoadedQueued {
            seq,
            retain: flags & 1 != 0,
            shared: flags & 2 != 0,
            packet_id: (flags & 4 != 0).then_some(packet_id),
            message: LoadedMessage {
                message,
                expires_at_ms: (flags & 8 != 0).then_some(expires),
            },
        });
    }
    if !b.is_empty() {
        return None;
    }
    Some(Loaded {
        account,
        client_id,
        session: StoredSession {
            expiry,
            subscriptions,
            connected: false,
        },
        disconnected_at_ms: (left != u64::MAX).then_some(left),
        queue,
    })
}
