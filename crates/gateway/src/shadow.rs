//! The Device Shadow service: the I/O around `sekisho_shadow`.
//!
//! One thread owns every shadow request, so requests for one shadow, from MQTT and HTTPS
//! alike, are applied one after another in the order they arrived. It takes what is waiting
//! (up to [`BATCH`] requests or [`BATCH_BYTES`] of payload, taking from each account in
//! turn), applies each request to the
//! stored shadow (a shadow changed earlier in the same batch is read from the batch), and
//! stores the changed shadows in one synced transaction before it answers: MQTT requests
//! through the broker on the shadow's `/accepted`, `/rejected`, `/update/delta` and
//! `/update/documents` topics, HTTPS requests through their reply channel. Answers are
//! serialized as soon as they are computed, and a batch whose answers pass
//! [`FLUSH_BYTES`] is committed and answered at that point, so the thread's memory stays
//! bounded whatever the documents (their metadata grows with every array element). A failed
//! commit answers 500 to every request of the segment that changed a shadow or read one the
//! segment changed, and publishes nothing of them.
//!
//! What waits for the thread is bounded by count ([`QUEUE`]) and by payload bytes, overall
//! ([`QUEUE_BYTES`]) and per account ([`ACCOUNT_BYTES`]), so one tenant cannot fill it for
//! the others; a request that does not fit is answered 429 at once (MQTT: on `/rejected`).
//!
//! AWS's 20 requests per second per thing (all its shadows, both protocols;
//! `shadow_requests_per_thing`) are token buckets here, and an update counts as four of the
//! account's inbound publishes; past either a request gets 429 `Too Many Requests`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sekisho_broker::throttle::Bucket;
use sekisho_broker::{Broker, Message};
use sekisho_mqtt::{Properties, QoS};
use sekisho_registry::{Registry, ShadowWrite};
use sekisho_shadow::{Error, Op, Shadow};
use serde_json::Value;

/// What a shadow update counts against the account's inbound publish rate, as AWS counts it.
pub const UPDATE_PUBLISHES: u32 = 4;
/// Requests taken into one batch (one commit).
const BATCH: usize = 256;
/// Payload bytes taken into one batch.
const BATCH_BYTES: usize = 256 * 1024;
/// Answer bytes after which a batch is committed and answered before it goes on.
const FLUSH_BYTES: usize = 4 * 1024 * 1024;
/// Requests waiting for the thread.
const QUEUE: usize = 10_000;
/// Payload bytes waiting for the thread.
const QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// Payload bytes of one account waiting for the thread.
const ACCOUNT_BYTES: usize = 8 * 1024 * 1024;

/// How a request is answered.
enum Reply {
    /// Publish the responses on the shadow's topics.
    Mqtt,
    /// Send the response document (or the error) back to an HTTPS request.
    Http(tokio::sync::oneshot::Sender<Result<Bytes, Error>>),
}

struct Job {
    account: String,
    thing: String,
    name: Option<String>,
    op: Op,
    payload: Bytes,
    reply: Reply,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("thing", &self.thing)
            .field("op", &self.op)
            .finish_non_exhaustive()
    }
}

/// Payload bytes waiting for the thread, overall and per account.
#[derive(Debug, Default)]
struct Queued {
    total: AtomicUsize,
    accounts: Mutex<HashMap<String, usize>>,
}

impl Queued {
    fn reserve(&self, account: &str, n: usize) -> bool {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = accounts.get(account).copied().unwrap_or(0);
        if mine + n > ACCOUNT_BYTES || self.total.load(Ordering::Relaxed) + n > QUEUE_BYTES {
            return false;
        }
        accounts.insert(account.to_owned(), mine + n);
        self.total.fetch_add(n, Ordering::Relaxed);
        true
    }

    fn release(&self, account: &str, n: usize) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = accounts.get_mut(account) {
            *m = m.saturating_sub(n);
            if *m == 0 {
                accounts.remove(account);
            }
        }
        self.total
            .fetch_sub(n.min(self.total.load(Ordering::Relaxed)), Ordering::Relaxed);
    }
}

/// The handle the gateway submits shadow requests through.
#[derive(Debug, Clone)]
pub struct Shadows {
    tx: SyncSender<Job>,
    broker: Arc<Broker>,
    queued: Arc<Queued>,
}

impl Shadows {
    /// Starts the shadow thread. It ends when every handle is dropped.
    pub fn start(registry: Arc<Registry>, broker: Arc<Broker>) -> Shadows {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let queued = Arc::new(Queued::default());
        let worker = Worker::new(registry, broker.clone(), queued.clone());
        let spawned = std::thread::Builder::new()
            .name("shadows".into())
            .spawn(move || worker.run(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "shadow thread did not start; shadow requests will fail");
        }
        Shadows { tx, broker, queued }
    }

    fn submit(&self, job: Job) -> Result<(), Box<(Job, Error)>> {
        let n = job.payload.len();
        if !self.queued.reserve(&job.account, n) {
            return Err(Box::new((job, Error::throttled())));
        }
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) => {
                self.queued.release(&job.account, n);
                Err(Box::new((job, Error::throttled())))
            }
            Err(TrySendError::Disconnected(job)) => {
                self.queued.release(&job.account, n);
                Err(Box::new((job, Error::internal())))
            }
        }
    }

    /// A message published on `topic` (already authorized and routed): a shadow request if the
    /// topic is one, answered on the shadow's response topics.
    pub fn on_publish(&self, account: &str, topic: &str, payload: &Bytes) {
        let Some(r) = sekisho_shadow::parse_topic(topic) else {
            return;
        };
        let job = Job {
            account: account.to_owned(),
            thing: r.thing.to_owned(),
            name: r.name.map(str::to_owned),
            op: r.op,
            payload: payload.clone(),
            reply: Reply::Mqtt,
        };
        if let Err(refused) = self.submit(job) {
            let (job, e) = *refused;
            tracing::warn!(%topic, "shadow service busy; request refused");
            let doc = e.document(
                sekisho_shadow::client_token(&job.payload).as_deref(),
                now_secs(),
            );
            publish(
                &self.broker,
                &job.account,
                format!("{}/{}/rejected", r.prefix(), job.op.as_str()),
                Bytes::from(doc.to_string()),
            );
        }
    }

    /// An HTTPS request (GetThingShadow, UpdateThingShadow, DeleteThingShadow): the response
    /// document.
    pub async fn request(
        &self,
        account: &str,
        thing: &str,
        name: Option<&str>,
        op: Op,
        payload: Bytes,
    ) -> Result<Bytes, Error> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            account: account.to_owned(),
            thing: thing.to_owned(),
            name: name.map(str::to_owned),
            op,
            payload,
            reply: Reply::Http(reply),
        };
        match self.submit(job) {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(Error::internal())),
            Err(refused) => Err(refused.1),
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn publish(broker: &Broker, account: &str, topic: String, payload: Bytes) {
    let msg = Message {
        topic: topic.into(),
        payload,
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        origin: None,
        timestamp_ms: crate::events::now_ms(),
    };
    if let Ok(routed) = broker.publish(account, Arc::new(msg), Instant::now()) {
        // The service never waits for a slow subscriber.
        for b in routed.blocked {
            broker.give_up(account, b.session, b.delivery);
        }
    }
}

type Key = (String, String, Option<String>);

/// What one request came to, before the commit decides whether it stands.
struct Outcome {
    job: Job,
    /// (topic suffix, serialized document); for HTTPS the first is the response.
    result: Result<Vec<(&'static str, Bytes)>, Error>,
    /// Whether it depends on the commit (it changed a shadow, or read one changed in the same
    /// uncommitted segment).
    depends: bool,
}

struct Worker {
    registry: Arc<Registry>,
    broker: Arc<Broker>,
    queued: Arc<Queued>,
    buckets: HashMap<(String, String), Bucket>,
    swept: Instant,
    /// Shadow rows each account stores, counted once (then kept by this thread, the only
    /// writer) for the account's quota.
    rows: HashMap<String, usize>,
    /// Accounts whose tombstones were dropped and that deleted no shadow since: dropping them
    /// again would find nothing.
    purged: HashSet<String>,
}

/// One commit's worth of work.
#[derive(Default)]
struct Segment {
    /// Shadows read or changed, by (account, thing, name).
    seen: HashMap<Key, Option<Shadow>>,
    /// Those changed and not yet committed.
    dirty: HashSet<Key>,
    /// Named shadows this segment made exist, per (account, thing), not yet committed.
    created: HashMap<(String, String), usize>,
    /// Shadow rows this segment adds, per account, not yet committed.
    new_rows: HashMap<String, usize>,
    /// Accounts whose shadow rows are to be counted again after this segment.
    recount: HashSet<String>,
    outcomes: Vec<Outcome>,
    answer_bytes: usize,
}

impl Worker {
    fn new(registry: Arc<Registry>, broker: Arc<Broker>, queued: Arc<Queued>) -> Worker {
        Worker {
            registry,
            broker,
            queued,
            buckets: HashMap::new(),
            swept: Instant::now(),
            rows: HashMap::new(),
            purged: HashSet::new(),
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        // What arrived, per account, served round robin: one account's backlog delays
        // another's request by one batch at most.
        let mut waiting: HashMap<String, VecDeque<Job>> = HashMap::new();
        let mut turn: VecDeque<String> = VecDeque::new();
        fn take(j: Job, waiting: &mut HashMap<String, VecDeque<Job>>, turn: &mut VecDeque<String>) {
            let q = waiting.entry(j.account.clone()).or_default();
            if q.is_empty() {
                turn.push_back(j.account.clone());
            }
            q.push_back(j);
        }
        loop {
            if waiting.is_empty() {
                match rx.recv() {
                    Ok(j) => take(j, &mut waiting, &mut turn),
                    Err(_) => return,
                }
            }
            while let Ok(j) = rx.try_recv() {
                take(j, &mut waiting, &mut turn);
            }
            let mut jobs = Vec::new();
            let mut bytes = 0;
            while jobs.len() < BATCH && bytes < BATCH_BYTES {
                let Some(account) = turn.pop_front() else {
                    break;
                };
                let Some(q) = waiting.get_mut(&account) else {
                    continue;
                };
                if let Some(j) = q.pop_front() {
                    bytes += j.payload.len();
                    jobs.push(j);
                }
                if q.is_empty() {
                    waiting.remove(&account);
                } else {
                    turn.push_back(account);
                }
            }
            for j in &jobs {
                self.queued.release(&j.account, j.payload.len());
            }
            // A request that panicked the core would otherwise end the service for everyone;
            // its batch's HTTPS callers get 500 (their reply channels drop).
            let caught =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.batch(jobs)));
            if caught.is_err() {
                tracing::error!("shadow batch panicked; its requests were not answered");
            }
        }
    }

    fn admit(&mut self, account: &str, thing: &str, now: Instant) -> bool {
        if now.duration_since(self.swept) > Duration::from_secs(10) {
            // A bucket that has refilled is as good as a new one.
            self.buckets.retain(|_, b| !b.is_full(now));
            self.swept = now;
        }
        self.buckets
            .entry((account.to_owned(), thing.to_owned()))
            .or_insert_with(|| {
                let rate = self.broker.throttles(account).shadow_requests_per_thing;
                Bucket::new(rate, rate)
            })
            .take(now, 1)
    }

    fn batch(&mut self, jobs: Vec<Job>) {
        let now = Instant::now();
        let secs = now_secs();
        let mut seg = Segment::default();
        for job in jobs {
            let o = self.apply(&mut seg, job, now, secs);
            seg.answer_bytes += o
                .result
                .as_ref()
                .map(|docs| docs.iter().map(|(_, b)| b.len()).sum())
                .unwrap_or(0);
            seg.outcomes.push(o);
            if seg.answer_bytes > FLUSH_BYTES {
                let done = std::mem::take(&mut seg);
                // Committed state stays known to the rest of the batch.
                seg.seen = self.flush(done, secs);
            }
        }
        self.flush(seg, secs);
    }

    /// Applies one request to the segment's view of its shadow.
    fn apply(&mut self, seg: &mut Segment, job: Job, now: Instant, secs: u64) -> Outcome {
        let label = job.name.clone().unwrap_or_else(|| job.thing.clone());
        // AWS counts a shadow update as four inbound publishes of the account (an MQTT
        // request was counted once already, as the publish that carried it).
        let charge = match (&job.op, &job.reply) {
            (Op::Update, Reply::Mqtt) => UPDATE_PUBLISHES - 1,
            (Op::Update, Reply::Http(_)) => UPDATE_PUBLISHES,
            _ => 0,
        };
        if !self.admit(&job.account, &job.thing, now)
            || (charge > 0 && !self.broker.charge_publishes(&job.account, charge, now))
        {
            return Outcome {
                job,
                result: Err(Error::throttled()),
                depends: false,
            };
        }
        let key = (job.account.clone(), job.thing.clone(), job.name.clone());
        if !seg.seen.contains_key(&key) {
            match self
                .registry
                .shadow(&job.account, &job.thing, job.name.as_deref())
            {
                Ok(doc) => {
                    seg.seen
                        .insert(key.clone(), doc.as_deref().and_then(Shadow::from_json));
                }
                Err(e) => {
                    tracing::error!(error = %e, "shadow read failed");
                    return Outcome {
                        job,
                        result: Err(Error::internal()),
                        depends: false,
                    };
                }
            }
        }
        let current = seg.seen.get(&key).and_then(Option::as_ref);
        let creates =
            job.op == Op::Update && job.name.is_some() && !current.is_some_and(|s| s.exists);
        if creates {
            let most = self.broker.quotas(&job.account).named_shadows_per_thing;
            let pending = seg
                .created
                .get(&(job.account.clone(), job.thing.clone()))
                .copied()
                .unwrap_or(0);
            let stored = match self.registry.named_shadow_count(
                &job.account,
                &job.thing,
                most.saturating_add(1),
            ) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "shadow count failed");
                    return Outcome {
                        job,
                        result: Err(Error::internal()),
                        depends: false,
                    };
                }
            };
            if stored.saturating_add(pending) >= most {
                let e = Error::too_many_shadows(&job.thing, most);
                return Outcome {
                    job,
                    result: Err(e),
                    depends: false,
                };
            }
        }
        // A new row (no shadow by that name was ever stored) counts against the account.
        let new_row = job.op == Op::Update && current.is_none();
        if new_row {
            let most = self.broker.quotas(&job.account).shadows_per_account;
            let pending = seg.new_rows.get(&job.account).copied().unwrap_or(0);
            let stored = match self.rows.get(&job.account) {
                Some(n) => Ok(*n),
                None => self
                    .registry
                    .shadow_rows(&job.account, most.saturating_add(1))
                    .inspect(|n| {
                        self.rows.insert(job.account.clone(), *n);
                    }),
            };
            // At the quota, deleted shadows kept for their versions make room first (their
            // names start again at version 1), once per round of deletions.
            let stored = match stored {
                Ok(n)
                    if n.saturating_add(pending) >= most
                        && self.purged.insert(job.account.clone()) =>
                {
                    match self.registry.drop_account_shadow_tombstones(&job.account) {
                        Ok(dropped) => {
                            tracing::info!(account = %job.account, dropped, "deleted shadows forgotten at the account's quota");
                            let left = n.saturating_sub(dropped);
                            // Counted again from the database after this batch (what the
                            // batch read of the dropped ones may still be written back).
                            seg.recount.insert(job.account.clone());
                            self.rows.insert(job.account.clone(), left);
                            Ok(left)
                        }
                        Err(e) => Err(e),
                    }
                }
                other => other,
            };
            let refusal = match stored {
                Ok(n) if n.saturating_add(pending) >= most => {
                    Some(Error::too_many_account_shadows(most))
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(error = %e, "shadow count failed");
                    Some(Error::internal())
                }
            };
            if let Some(e) = refusal {
                return Outcome {
                    job,
                    result: Err(e),
                    depends: false,
                };
            }
        }
        let ser = |v: Value| Bytes::from(v.to_string());
        let (result, next) = match job.op {
            Op::Get => (
                sekisho_shadow::get(current, &label, &job.payload, secs)
                    .map(|d| vec![("get/accepted", ser(d))]),
                None,
            ),
            Op::Update => match sekisho_shadow::update(current, &job.payload, secs) {
                Ok(u) => {
                    let mut docs = vec![("update/accepted", ser(u.accepted))];
                    if let Some(d) = u.delta {
                        docs.push(("update/delta", ser(d)));
                    }
                    docs.push(("update/documents", ser(u.documents)));
                    (Ok(docs), Some(u.shadow))
                }
                Err(e) => (Err(e), None),
            },
            Op::Delete => match sekisho_shadow::delete(current, &label, &job.payload, secs) {
                Ok(d) => (
                    Ok(vec![("delete/accepted", ser(d.accepted))]),
                    Some(d.shadow),
                ),
                Err(e) => (Err(e), None),
            },
        };
        // What it answered from (or what it wrote) stands only if the commit does.
        let depends = next.is_some() || seg.dirty.contains(&key);
        if new_row && next.is_some() {
            *seg.new_rows.entry(job.account.clone()).or_default() += 1;
        }
        if creates && next.as_ref().is_some_and(|s| s.exists) {
            *seg.created
                .entry((job.account.clone(), job.thing.clone()))
                .or_default() += 1;
        }
        if let Some(s) = next {
            seg.seen.insert(key.clone(), Some(s));
            seg.dirty.insert(key);
        }
        Outcome {
            job,
            result,
            depends,
        }
    }

    /// Commits the segment's changes, then answers its requests; returns what it knows of
    /// the shadows, as committed (or as stored, after a failure).
    fn flush(&mut self, seg: Segment, secs: u64) -> HashMap<Key, Option<Shadow>> {
        let writes: Vec<ShadowWrite> = seg
            .dirty
            .iter()
            .filter_map(|k| {
                let s = seg.seen.get(k)?.as_ref()?;
                Some(ShadowWrite {
                    account: k.0.clone(),
                    thing: k.1.clone(),
                    name: k.2.clone(),
                    doc: s.to_json(),
                    exists: s.exists,
                })
            })
            .collect();
        let mut forget: Vec<(String, Option<String>)> = Vec::new();
        let committed = match self.registry.put_shadows(&writes) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "shadow commit failed; the segment is answered 500");
                false
            }
        };
        if committed {
            for w in writes.iter().filter(|w| !w.exists) {
                self.purged.remove(&w.account);
            }
            for (account, n) in &seg.new_rows {
                if let Some(rows) = self.rows.get_mut(account) {
                    *rows += n;
                }
            }
            for account in &seg.recount {
                self.rows.remove(account);
            }
            let dropped = self.bound_tombstones(&writes);
            // What the batch read of dropped tombstones is read again from the database (and
            // the account's rows counted again), so that nothing is written back from it.
            for (account, thing) in &dropped {
                self.rows.remove(account);
                forget.push((account.clone(), Some(thing.clone())));
            }
            for account in &seg.recount {
                forget.push((account.clone(), None));
            }
        }
        for o in seg.outcomes {
            let result = if o.depends && !committed {
                Err(Error::internal())
            } else {
                o.result
            };
            self.answer(o.job, result, secs);
        }
        let mut seen = seg.seen;
        if !committed {
            // Forget what was not stored: the next request reads the database again.
            for k in &seg.dirty {
                seen.remove(k);
            }
        }
        // Tombstones dropped from the database are forgotten here too.
        if !forget.is_empty() {
            seen.retain(|k, s| {
                s.as_ref().is_none_or(|s| s.exists)
                    || !forget
                        .iter()
                        .any(|(a, t)| *a == k.0 && t.as_ref().is_none_or(|t| *t == k.1))
            });
        }
        seen
    }

    /// A thing keeps at most as many deleted named shadows (for their versions) as it may
    /// have live ones: past that, its deleted shadows are forgotten together, so names that
    /// come and go cannot fill the disk.
    fn bound_tombstones(&mut self, writes: &[ShadowWrite]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let things: HashSet<(&str, &str)> = writes
            .iter()
            .filter(|w| !w.exists && w.name.is_some())
            .map(|w| (w.account.as_str(), w.thing.as_str()))
            .collect();
        for (account, thing) in things {
            let most = self.broker.quotas(account).named_shadows_per_thing;
            let over = self
                .registry
                .shadow_tombstone_count(account, thing, most.saturating_add(1))
                .is_ok_and(|n| n > most);
            if over {
                match self.registry.drop_shadow_tombstones(account, thing) {
                    Ok(n) => {
                        if let Some(rows) = self.rows.get_mut(account) {
                            *rows = rows.saturating_sub(n);
                        }
                        tracing::info!(%account, %thing, dropped = n, "deleted named shadows forgotten");
                        out.push((account.to_owned(), thing.to_owned()));
                    }
                    Err(e) => tracing::error!(error = %e, "dropping shadow tombstones failed"),
                }
            }
        }
        out
    }

    fn answer(&self, job: Job, result: Result<Vec<(&'static str, Bytes)>, Error>, secs: u64) {
        let prefix = sekisho_shadow::prefix(&job.thing, job.name.as_deref());
        match (job.reply, result) {
            (Reply::Http(tx), result) => {
                // An accepted change goes to the shadow's subscribers whichever protocol made
                // it; the requester gets the first document as its response.
                let result = result.map(|docs| {
                    let first = docs.first().map(|(_, b)| b.clone()).unwrap_or_default();
                    if job.op != Op::Get {
                        for (suffix, doc) in docs {
                            publish(
                                &self.broker,
                                &job.account,
                                format!("{prefix}/{suffix}"),
                                doc,
                            );
                        }
                    }
                    first
                });
                let _ = tx.send(result);
            }
            (Reply::Mqtt, Ok(docs)) => {
                for (suffix, doc) in docs {
                    publish(
                        &self.broker,
                        &job.account,
                        format!("{prefix}/{suffix}"),
                        doc,
                    );
                }
            }
            (Reply::Mqtt, Err(e)) => {
                let token = sekisho_shadow::client_token(&job.payload);
                let doc = e.document(token.as_deref(), secs);
                publish(
                    &self.broker,
                    &job.account,
                    format!("{prefix}/{}/rejected", job.op.as_str()),
                    Bytes::from(doc.to_string()),
                );
            }
        }
    }
}
