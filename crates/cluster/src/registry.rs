//! The registry's log (decision 0013): a JetStream stream `{NAME}_REGISTRY` on the one subject
//! `{name}.registry`, so that its sequence numbers order every registry write of the cluster.
//! A node appends with `Nats-Expected-Last-Sequence` set to the last entry its replica holds
//! (JetStream refuses the append if anybody appended since), and follows the stream in order
//! from there, applying the other nodes' entries ([`Registry::apply_entry`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use futures_util::StreamExt as _;
use sekisho_registry::{Log, LogError, Registry};

use crate::{Cluster, create_stream};

/// How long a write waits for this replica to catch up with the log (after another node
/// wrote first) before it is refused.
const CATCH_UP: Duration = Duration::from_secs(5);

/// How long start-up waits for the replica to apply the log before it gives up.
const JOIN: Duration = Duration::from_secs(120);

struct RegistryLog {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    subject: String,
    registry: Weak<Registry>,
    handle: tokio::runtime::Handle,
}

/// Runs `f` to completion from synchronous code: on a worker of a multi-threaded runtime
/// (the control plane's) the worker is handed over while it waits; on a single-threaded one
/// (a device connection's) or outside any runtime, on a helper thread driven by the cluster's
/// runtime, whose workers keep the NATS connection going.
fn block<F>(handle: &tokio::runtime::Handle, f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(f))
        }
        _ => std::thread::scope(|s| {
            s.spawn(|| handle.block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        }),
    }
}

impl Log for RegistryLog {
    fn append(&self, entry: Vec<u8>, expected: u64) -> Result<u64, LogError> {
        // Known to be cut off: refused at once rather than after a timeout (the registry's
        // write lock is held meanwhile, and CONNECTs read the registry).
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(LogError::Unavailable("not connected to NATS".into()));
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Sequence", expected.to_string().as_str());
        let sent = block(&self.handle, async {
            self.js
                .publish_with_headers(self.subject.clone(), headers, entry.into())
                .await?
                .await
        });
        match sent {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(LogError::Conflict),
            Err(e) => Err(LogError::Unavailable(e.to_string())),
        }
    }

    fn catch_up(&self) -> Result<(), LogError> {
        let last = block(&self.handle, async {
            let stream = self.js.get_stream(&self.stream).await?;
            Ok::<_, anyhow::Error>(stream.get_info().await?.state.last_sequence)
        })
        .map_err(|e| LogError::Unavailable(e.to_string()))?;
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let Some(registry) = self.registry.upgrade() else {
                return Err(LogError::Unavailable("shutting down".into()));
            };
            if registry.log_position() >= last {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LogError::Unavailable(format!(
                    "this node holds the registry log up to {}, the log ends at {last}",
                    registry.log_position()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The registry stream from after `after`, as an ordered consumer.
async fn feed(
    stream: &jetstream::stream::Stream,
    client: &async_nats::Client,
    subject: &str,
    after: u64,
) -> anyhow::Result<jetstream::consumer::push::Ordered> {
    Ok(stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: subject.to_owned(),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        })
        .await?
        .messages()
        .await?)
}

/// Applies the log's entries to `registry` in order, for ever: made again from the replica's
/// position after an error, a gap, or a reconnection to NATS.
async fn follow(
    stream: jetstream::stream::Stream,
    client: async_nats::Client,
    subject: String,
    registry: Arc<Registry>,
    reconnected: Arc<tokio::sync::Notify>,
    alive: Arc<AtomicBool>,
) {
    loop {
        let mut entries = match feed(&stream, &client, &subject, registry.log_position()).await {
            Ok(f) => {
                alive.store(true, Ordering::Relaxed);
                f
            }
            Err(e) => {
                alive.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "cluster: following the registry log again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = reconnected.notified() => break,
                m = entries.next() => match m {
                    Some(Ok(m)) => {
                        let position = m.info().map_or(0, |i| i.stream_sequence);
                        let r = registry.clone();
                        let applied = tokio::task::block_in_place(|| r.apply_entry(position, &m.payload));
                        if let Err(e) = applied {
                            // Not applied: the replica stands still, and counts as cut off
                            // until the entry is (its connections end after isolation_seconds).
                            alive.store(false, Ordering::Relaxed);
                            tracing::error!(error = %e, position, "cluster: applying a registry log entry");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cluster: the registry log; following it again");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

/// Makes this node's registry a replica of the cluster's log: a new log is seeded from this
/// node's registry; a node that joins applies the log (from where its replica stopped, or from
/// the start with an empty registry) before it serves. Refuses a registry that holds objects
/// the log does not (another cluster's, or a single node's made before it joined).
pub async fn join_registry(cluster: &Cluster, registry: Arc<Registry>) -> anyhow::Result<()> {
    let config = &cluster.config;
    let subject = format!("{}.registry", config.name);
    let name = format!("{}_REGISTRY", config.name);
    let mut js_start = jetstream::new(cluster.client.clone());
    js_start.set_timeout(Duration::from_secs(10));
    let mut js = jetstream::new(cluster.client.clone());
    js.set_timeout(Duration::from_secs(2));
    let stream = create_stream(
        &js_start,
        jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
    )
    .await
    .context("cluster: the registry log")?;
    let last = stream
        .get_info()
        .await
        .context("cluster: the registry log")?
        .state
        .last_sequence;
    let applied = registry.log_position();
    if applied > last {
        anyhow::bail!(
            "cluster: this node's registry holds the registry log up to entry {applied}, but \
             the log of cluster {} ends at {last} (was its stream deleted?); start this node \
             with an empty registry (move registry.db away) to join",
            config.name
        );
    }
    if applied == 0 && !registry.is_empty() {
        if last > 0 {
            anyhow::bail!(
                "cluster: this node's registry holds objects that are not in the registry log \
                 of cluster {}; start it with an empty registry (move registry.db away) to \
                 join, or seed a new cluster from it",
                config.name
            );
        }
        // A new cluster starts from this node's registry.
        let mut position = 0;
        for entry in registry.log_seed()? {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Expected-Last-Sequence", position.to_string().as_str());
            let ack = js_start
                .publish_with_headers(subject.clone(), headers, entry.into())
                .await
                .context("cluster: seeding the registry log")?
                .await
                .context(
                    "cluster: seeding the registry log (did another node seed it at the same time?)",
                )?;
            position = ack.sequence;
        }
        registry.set_log_position(position)?;
        tracing::info!(
            entries = position,
            "cluster: a new registry log, seeded from this node"
        );
    }
    // The connection's first Connected came before: no reason to make the follower again.
    let _ = futures_util::FutureExt::now_or_never(cluster.registry_reconnected.notified());
    tokio::spawn(follow(
        stream,
        cluster.client.clone(),
        subject.clone(),
        registry.clone(),
        cluster.registry_reconnected.clone(),
        cluster.registry_alive.clone(),
    ));
    let started = Instant::now();
    while registry.log_position() < last {
        anyhow::ensure!(
            started.elapsed() < JOIN,
            "cluster: the registry log was not applied in {} s (at {} of {last})",
            JOIN.as_secs(),
            registry.log_position()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    registry.attach_log(Arc::new(RegistryLog {
        client: cluster.client.clone(),
        js,
        stream: name,
        subject,
        registry: Arc::downgrade(&registry),
        handle: tokio::runtime::Handle::current(),
    }));
    tracing::info!(
        position = registry.log_position(),
        seconds = started.elapsed().as_secs_f64(),
        "cluster: the registry follows the cluster's log"
    );
    Ok(())
}
