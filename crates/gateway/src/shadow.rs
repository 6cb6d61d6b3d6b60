//! The Device Shadow service: the I/O around `sekisho_shadow`.
//!
//! One thread owns every shadow request, so requests for one shadow, from MQTT and HTTPS
//! alike, are applied one after another in the order they arrived. It takes what is waiting
//! (up to [`BATCH`]), applies each request to the stored shadow (a shadow changed earlier in
//! the same batch is read from the batch), stores the changed shadows in one synced
//! transaction, and only then answers: MQTT requests through the broker on the shadow's
//! `/accepted`, `/rejected`, `/update/delta` and `/update/documents` topics, HTTPS requests
//! through their reply channel. A failed commit answers every request of the batch that
//! changed a shadow with 500 and publishes nothing of it.
//!
//! AWS's 20 requests per second per thing (all its shadows, both protocols;
//! `shadow_requests_per_thing`) are token buckets here, and an update counts as four of the
//! account's inbound publishes; past either a request gets 429 `Too Many Requests`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
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
/// Requests waiting for the thread before new ones are refused.
const QUEUE: usize = 10_000;

/// How a request is answered.
enum Reply {
    /// Publish the responses on the shadow's topics.
    Mqtt,
    /// Send the response document (or the error) back to an HTTPS request.
    Http(tokio::sync::oneshot::Sender<Result<Value, Error>>),
}

struct Job {
    account: String,
    thing: String,
    name: Option<String>,
    op: Op,
    payload: Bytes,
    reply: Reply,
}

/// The handle the gateway submits shadow requests through.
#[derive(Debug, Clone)]
pub struct Shadows {
    tx: SyncSender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("thing", &self.thing)
            .field("op", &self.op)
            .finish_non_exhaustive()
    }
}

impl Shadows {
    /// Starts the shadow thread. It ends when every handle is dropped.
    pub fn start(registry: Arc<Registry>, broker: Arc<Broker>) -> Shadows {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("shadows".into())
            .spawn(move || Worker::new(registry, broker).run(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "shadow thread did not start; shadow requests will fail");
        }
        Shadows { tx }
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
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(job) {
            tracing::warn!(%topic, "shadow service busy; request dropped");
        }
    }

    /// An HTTPS request (GetThingShadow, UpdateThingShadow, DeleteThingShadow).
    pub async fn request(
        &self,
        account: &str,
        thing: &str,
        name: Option<&str>,
        op: Op,
        payload: Bytes,
    ) -> Result<Value, Error> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            account: account.to_owned(),
            thing: thing.to_owned(),
            name: name.map(str::to_owned),
            op,
            payload,
            reply: Reply::Http(reply),
        };
        match self.tx.try_send(job) {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(Error::internal())),
            Err(TrySendError::Full(_)) => Err(Error::throttled()),
            Err(TrySendError::Disconnected(_)) => Err(Error::internal()),
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What one request came to, before the commit decides whether it stands.
struct Outcome {
    job: Job,
    result: Result<Answer, Error>,
    /// Whether it changed a shadow (and so depends on the commit).
    writes: bool,
}

struct Answer {
    /// (topic suffix, document) to publish for MQTT; the first is the reply for HTTPS.
    docs: Vec<(&'static str, Value)>,
}

struct Worker {
    registry: Arc<Registry>,
    broker: Arc<Broker>,
    buckets: HashMap<(String, String), Bucket>,
    swept: Instant,
}

impl Worker {
    fn new(registry: Arc<Registry>, broker: Arc<Broker>) -> Worker {
        Worker {
            registry,
            broker,
            buckets: HashMap::new(),
            swept: Instant::now(),
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            self.batch(jobs);
        }
    }

    fn admit(&mut self, account: &str, thing: &str, now: Instant) -> bool {
        if now.duration_since(self.swept) > Duration::from_secs(10) {
            // A bucket that has had a second to refill is as good as a new one.
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
        // Shadows read or changed in this batch, by (account, thing, name).
        let mut seen: HashMap<(String, String, Option<String>), Option<Shadow>> = HashMap::new();
        let mut changed: Vec<(String, String, Option<String>)> = Vec::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
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
                outcomes.push(Outcome {
                    job,
                    result: Err(Error::throttled()),
                    writes: false,
                });
                continue;
            }
            let key = (job.account.clone(), job.thing.clone(), job.name.clone());
            if !seen.contains_key(&key) {
                match self
                    .registry
                    .shadow(&job.account, &job.thing, job.name.as_deref())
                {
                    Ok(doc) => {
                        seen.insert(key.clone(), doc.as_deref().and_then(Shadow::from_json));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "shadow read failed");
                        outcomes.push(Outcome {
                            job,
                            result: Err(Error::internal()),
                            writes: false,
                        });
                        continue;
                    }
                }
            }
            let current = seen.get(&key).and_then(Option::as_ref);
            let (result, next) = match job.op {
                Op::Get => (
                    sekisho_shadow::get(current, &label, &job.payload, secs).map(|d| Answer {
                        docs: vec![("get/accepted", d)],
                    }),
                    None,
                ),
                Op::Update => match sekisho_shadow::update(current, &job.payload, secs) {
                    Ok(u) => {
                        let mut docs = vec![("update/accepted", u.accepted)];
                        if let Some(d) = u.delta {
                            docs.push(("update/delta", d));
                        }
                        docs.push(("update/documents", u.documents));
                        (Ok(Answer { docs }), Some(u.shadow))
                    }
                    Err(e) => (Err(e), None),
                },
                Op::Delete => match sekisho_shadow::delete(current, &label, &job.payload, secs) {
                    Ok(d) => (
                        Ok(Answer {
                            docs: vec![("delete/accepted", d.accepted)],
                        }),
                        Some(d.shadow),
                    ),
                    Err(e) => (Err(e), None),
                },
            };
            let writes = next.is_some();
            if let Some(s) = next {
                seen.insert(key.clone(), Some(s));
                if !changed.contains(&key) {
                    changed.push(key);
                }
            }
            outcomes.push(Outcome {
                job,
                result,
                writes,
            });
        }
        let writes: Vec<ShadowWrite> = changed
            .iter()
            .filter_map(|k| {
                let s = seen.get(k)?.as_ref()?;
                Some(ShadowWrite {
                    account: k.0.clone(),
                    thing: k.1.clone(),
                    name: k.2.clone(),
                    doc: s.to_json(),
                })
            })
            .collect();
        let committed = match self.registry.put_shadows(&writes) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "shadow commit failed; the batch is answered 500");
                false
            }
        };
        for o in outcomes {
            let result = if o.writes && !committed {
                Err(Error::internal())
            } else {
                o.result
            };
            self.answer(o.job, result, secs);
        }
    }

    fn answer(&self, job: Job, result: Result<Answer, Error>, secs: u64) {
        match job.reply {
            Reply::Http(tx) => {
                // An accepted change goes to the shadow's subscribers whichever protocol made
                // it; the requester gets the first document as its response.
                let prefix = sekisho_shadow::prefix(&job.thing, job.name.as_deref());
                let result = result.map(|a| {
                    let mut docs = a.docs.into_iter();
                    let first = docs.next();
                    if job.op != Op::Get {
                        if let Some((suffix, doc)) = &first {
                            self.publish(&job.account, format!("{prefix}/{suffix}"), doc);
                        }
                        for (suffix, doc) in docs {
                            self.publish(&job.account, format!("{prefix}/{suffix}"), &doc);
                        }
                    }
                    first.map(|(_, d)| d).unwrap_or_default()
                });
                let _ = tx.send(result);
            }
            Reply::Mqtt => {
                let prefix = sekisho_shadow::prefix(&job.thing, job.name.as_deref());
                match result {
                    Ok(a) => {
                        for (suffix, doc) in a.docs {
                            self.publish(&job.account, format!("{prefix}/{suffix}"), &doc);
                        }
                    }
                    Err(e) => {
                        let token = sekisho_shadow::client_token(&job.payload);
                        let doc = e.document(token.as_deref(), secs);
                        let topic = format!("{prefix}/{}/rejected", job.op.as_str());
                        self.publish(&job.account, topic, &doc);
                    }
                }
            }
        }
    }

    fn publish(&self, account: &str, topic: String, doc: &Value) {
        let msg = Message {
            topic: topic.into(),
            payload: Bytes::from(doc.to_string()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            expires_at: None,
            origin: None,
            timestamp_ms: crate::events::now_ms(),
        };
        if let Ok(routed) = self.broker.publish(account, Arc::new(msg), Instant::now()) {
            // The service never waits for a slow subscriber.
            for b in routed.blocked {
                self.broker.give_up(account, b.session, b.delivery);
            }
        }
    }
}
