//! The registry's log (decision 0013): a JetStream stream `{NAME}_REGISTRY` on the one subject
//! `{name}.registry`, so that its sequence numbers order every registry write of the cluster.
//! A node appends with `Nats-Expected-Last-Sequence` set to the last entry its replica holds
//! (JetStream refuses the append if anybody appended since), and follows the stream in order
//! from there, applying the other nodes' entries ([`Registry::apply_entry`]).

use std::path::{Path, PathBuf};
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

/// How long a write waits for its append to be acknowledged: a node on the minority side of
/// a partition (or one whose connection went silent) refuses control-plane writes after
/// this, and its look for the entry ([`INFO_TIMEOUT`]), about 2 s in all.
const APPEND_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a look at the log's end may take.
const INFO_TIMEOUT: Duration = Duration::from_millis(500);

/// How long start-up waits for the replica to apply the log before it gives up.
const JOIN: Duration = Duration::from_secs(120);

struct RegistryLog {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    subject: String,
    registry: Weak<Registry>,
    /// The registry log's own runtime, which drives its NATS connection.
    handle: tokio::runtime::Handle,
}

/// The registry log's runtime. Its NATS connection and follower run here, on workers of their
/// own: a write waits for its append holding the registry's lock, and the threads of the
/// other runtimes may all be blocked on that lock meanwhile (CONNECTs and API calls read the
/// registry), so nothing an append needs may depend on them. Never dropped.
static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

fn runtime() -> anyhow::Result<tokio::runtime::Handle> {
    if RUNTIME.get().is_none() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("registry-log")
            .enable_all()
            .build()
            .context("cluster: the registry log's runtime")?;
        // A runtime may not be dropped inside another's context: one that lost a race to
        // be set is leaked instead (start-up runs this once).
        if let Err(rt) = RUNTIME.set(rt) {
            std::mem::forget(rt);
        }
    }
    RUNTIME
        .get()
        .map(|rt| rt.handle().clone())
        .context("cluster: the registry log's runtime")
}

/// How long a caller waits for an answer from the registry log's runtime (its own requests
/// time out after 2 s).
const ANSWER: Duration = Duration::from_secs(5);

impl RegistryLog {
    /// Runs `f` on the log's runtime and waits for it from synchronous code (any thread).
    fn wait<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, LogError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        let wait = || {
            rx.recv_timeout(ANSWER)
                .map_err(|_| LogError::Unavailable("the registry log did not answer".into()))
        };
        // A worker of a multi-threaded runtime (the control plane's) hands its other tasks
        // over while it waits; a device connection's single-threaded runtime just waits.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
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
        let (js, subject) = (self.js.clone(), self.subject.clone());
        let sent = self
            .wait(async move {
                js.publish_with_headers(subject, headers, entry.into())
                    .await?
                    .await
            })
            .map_err(|e| match e {
                LogError::Unavailable(why) => LogError::Unknown(why),
                other => other,
            })?;
        match sent {
            Ok(ack) => Ok(ack.sequence),
            Err(e) => Err(match e.kind() {
                PublishErrorKind::WrongLastSequence => LogError::Conflict,
                // Sent, perhaps stored, not acknowledged.
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    LogError::Unknown(e.to_string())
                }
                _ => LogError::Unavailable(e.to_string()),
            }),
        }
    }

    fn catch_up(&self) -> Result<(), LogError> {
        let stream = self.stream.clone();
        let last = self
            .wait(async move {
                match tokio::time::timeout(INFO_TIMEOUT, stream.get_info()).await {
                    Ok(Ok(info)) => Ok(info.state.last_sequence),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("the registry log did not answer".to_string()),
                }
            })?
            .map_err(LogError::Unavailable)?;
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

/// Whether the log (its `state`) was compacted past a replica at `position`: its first entry
/// is beyond the next one the replica needs. If so, says so and tells `restart`.
fn compacted_past(
    state: &jetstream::stream::State,
    position: u64,
    restart: &tokio::sync::Notify,
) -> bool {
    if state.first_sequence <= position + 1 {
        return false;
    }
    tracing::error!(
        applied = position,
        first = state.first_sequence,
        "cluster: the registry log was compacted past this replica while it was cut off; this node starts again (from the latest snapshot)"
    );
    restart.notify_one();
    true
}

/// Applies the log's entries to `registry` in order, for ever: made again from the replica's
/// position after an error, a gap, or a reconnection to NATS. `alive` is true only while the
/// replica is known to hold the log up to its end (after applying an entry with nothing
/// pending, or finding the log ends where the replica does). `restart` is told when the log
/// was compacted past the replica: only a new start (from the snapshot) catches up.
async fn follow(
    stream: jetstream::stream::Stream,
    client: async_nats::Client,
    subject: String,
    registry: Arc<Registry>,
    reconnected: Arc<tokio::sync::Notify>,
    alive: Arc<AtomicBool>,
    restart: Arc<tokio::sync::Notify>,
) {
    loop {
        let mut entries = match feed(&stream, &client, &subject, registry.log_position()).await {
            Ok(f) => f,
            Err(e) => {
                alive.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "cluster: following the registry log again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Alive again once the replica is seen at the log's end (looked at every second while
        // it is not: right after a failover the stream may not answer yet, and no entry may
        // come to say so).
        let mut look = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = reconnected.notified() => break,
                _ = look.tick(), if !alive.load(Ordering::Relaxed) => {
                    if let Ok(Ok(info)) = tokio::time::timeout(INFO_TIMEOUT, stream.get_info()).await {
                        if info.state.last_sequence <= registry.log_position() {
                            alive.store(true, Ordering::Relaxed);
                        } else if compacted_past(&info.state, registry.log_position(), &restart) {
                            // Nothing may come to say so: the log may hold no entry at all.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                m = entries.next() => match m {
                    Some(Ok(m)) => {
                        let (position, pending) =
                            m.info().map_or((0, 1), |i| (i.stream_sequence, i.pending));
                        let r = registry.clone();
                        let payload = m.payload.clone();
                        let applied = tokio::task::spawn_blocking(move || r.apply_entry(position, &payload))
                            .await
                            .unwrap_or_else(|e| Err(sekisho_registry::RegistryError::Internal(e.to_string())));
                        match applied {
                            Ok(()) => {
                                if pending == 0 {
                                    alive.store(true, Ordering::Relaxed);
                                }
                            }
                            Err(e) => {
                                // Not applied: the replica stands still, and counts as cut off
                                // until the entry is (CONNECT refused; connections end after
                                // isolation_seconds).
                                alive.store(false, Ordering::Relaxed);
                                tracing::error!(error = %e, position, "cluster: applying a registry log entry");
                                if let Ok(Ok(info)) = tokio::time::timeout(INFO_TIMEOUT, stream.get_info()).await {
                                    compacted_past(&info.state, registry.log_position(), &restart);
                                }
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                break;
                            }
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
pub async fn join_registry(
    cluster: &Cluster,
    registry: Arc<Registry>,
    scratch: &Path,
) -> anyhow::Result<()> {
    let handle = runtime()?;
    let log = handle
        .spawn(join(
            cluster.config.clone(),
            registry.clone(),
            cluster.registry_alive.clone(),
            cluster.restart.clone(),
            handle.clone(),
            scratch.to_owned(),
        ))
        .await
        .context("cluster: joining the registry log")??;
    registry.attach_log(log);
    let _ = cluster.registry.set(Arc::downgrade(&registry));
    Ok(())
}

/// [`join_registry`] on the log's runtime, with a NATS connection of its own.
async fn join(
    config: crate::Config,
    registry: Arc<Registry>,
    alive: Arc<AtomicBool>,
    restart: Arc<tokio::sync::Notify>,
    handle: tokio::runtime::Handle,
    scratch: PathBuf,
) -> anyhow::Result<Arc<RegistryLog>> {
    let subject = format!("{}.registry", config.name);
    let name = format!("{}_REGISTRY", config.name);
    let reconnected = Arc::new(tokio::sync::Notify::new());
    let (told, down) = (reconnected.clone(), alive.clone());
    let client = async_nats::ConnectOptions::new()
        .name(format!("sekisho {} registry", config.node))
        .event_callback(move |e| {
            let (told, down) = (told.clone(), down.clone());
            async move {
                match e {
                    async_nats::Event::Connected => told.notify_one(),
                    async_nats::Event::Disconnected => {
                        down.store(false, Ordering::Relaxed);
                        tracing::warn!("cluster: the registry log's connection to NATS is down");
                    }
                    other => tracing::warn!(connection = "registry", "cluster: {other}"),
                }
            }
        })
        .connect(crate::servers(&config.url))
        .await
        .with_context(|| format!("cluster: connecting to {}", config.url))?;
    let mut js_start = jetstream::new(client.clone());
    js_start.set_timeout(Duration::from_secs(10));
    let mut js = jetstream::new(client.clone());
    js.set_timeout(APPEND_TIMEOUT);
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
    let info = stream
        .get_info()
        .await
        .context("cluster: the registry log")?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut applied = registry.log_position();
    let identity = info.created.unix_timestamp_nanos().to_string();
    if applied > 0 && registry.log_identity().as_deref() != Some(identity.as_str()) {
        anyhow::bail!(
            "cluster: this node's registry is a replica of another registry log than the one \
             cluster {} has now (its stream was made again?); start this node with an empty \
             registry (move registry.db away) to join",
            config.name
        );
    }
    if applied > last {
        anyhow::bail!(
            "cluster: this node's registry holds the registry log up to entry {applied}, but \
             the log of cluster {} ends at {last}; start this node with an empty registry \
             (move registry.db away) to join",
            config.name
        );
    }
    // The entries after this replica's position were compacted away while it was down: it
    // starts again from the latest snapshot, as a node that joins empty.
    if applied > 0 && applied < last && applied + 1 < first {
        tracing::warn!(
            applied,
            first,
            "cluster: the registry log was compacted past this replica; it starts again from the latest snapshot"
        );
        let r = registry.clone();
        tokio::task::spawn_blocking(move || r.clear_replica()).await??;
        applied = 0;
    }
    // What a crash left of snapshots on their way.
    if let Ok(mut dir) = tokio::fs::read_dir(&scratch).await {
        while let Ok(Some(e)) = dir.next_entry().await {
            if e.file_name().to_string_lossy().starts_with(".snapshot-") {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
    }
    let snapshots = snapshot_bucket(&js_start, &config).await;
    // An empty replica of a log that holds entries starts from the latest snapshot, if any.
    if applied == 0 && registry.is_empty() && last > 0 {
        match &snapshots {
            Ok(bucket) => {
                let deadline = tokio::time::Instant::now() + RESTORE_TIMEOUT;
                let restored =
                    restore_snapshot(bucket, &registry, &identity, last, &scratch, deadline).await;
                match restored {
                    Ok(Some(at)) => {
                        tracing::info!(
                            position = at,
                            "cluster: the registry starts from a snapshot"
                        )
                    }
                    // The log's start was purged: only a snapshot can carry this node there.
                    Ok(None) if first > 1 => anyhow::bail!(
                        "cluster: the registry log starts at entry {first} (compacted) and no snapshot of it was found"
                    ),
                    Ok(None) => {}
                    Err(e) if first > 1 => {
                        return Err(e.context(format!(
                            "cluster: the registry log starts at entry {first} (compacted) and its snapshot could not be restored"
                        )));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: no registry snapshot could be used; applying the whole log")
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cluster: the registry snapshots"),
        }
    }
    registry.set_log_identity(&identity)?;
    if registry.log_position() == 0 && !registry.is_empty() {
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
    let _ = futures_util::FutureExt::now_or_never(reconnected.notified());
    tokio::spawn(follow(
        stream.clone(),
        client.clone(),
        subject.clone(),
        registry.clone(),
        reconnected,
        alive,
        restart,
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
    tracing::info!(
        position = registry.log_position(),
        seconds = started.elapsed().as_secs_f64(),
        "cluster: the registry follows the cluster's log"
    );
    match snapshots {
        Ok(bucket) if config.snapshot_every > 0 => {
            tokio::spawn(write_snapshots(
                bucket,
                registry.clone(),
                identity,
                config.snapshot_every,
                scratch,
                (stream.clone(), client.clone(), config.name.clone()),
                config.log_keep,
            ));
        }
        _ => {}
    }
    Ok(Arc::new(RegistryLog {
        client,
        js,
        stream,
        subject,
        registry: Arc::downgrade(&registry),
        handle,
    }))
}

/// The snapshot object in the bucket `{NAME}_SNAPSHOTS`: the database of a replica (a compact
/// SQLite copy), with its log position and the log's identity in the object's metadata;
/// compressed with zstd when its metadata says `encoding: zstd` (a registry's database
/// shrinks about four times: a joining node downloads a quarter of it, and decompresses
/// while it downloads).
const SNAPSHOT_OBJECT: &str = "registry";

/// The zstd level snapshots are written with (the fastest: the writing node serves meanwhile).
const SNAPSHOT_ZSTD_LEVEL: i32 = 1;

/// Compresses the file `from` into a new file `to` (blocking).
fn compress(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut input = std::fs::File::open(from)?;
    let out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(to)?);
    let mut encoder = zstd::stream::write::Encoder::new(out, SNAPSHOT_ZSTD_LEVEL)?;
    std::io::copy(&mut input, &mut encoder)?;
    let mut out = encoder.finish()?;
    std::io::Write::flush(&mut out)?;
    Ok(())
}

/// The largest database a snapshot may decompress to.
const MAX_SNAPSHOT_BYTES: u64 = 256 << 30;

/// What a blocking reader gets from an async download: the chunks sent to it, in order, then
/// the end.
struct Chunks {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl std::io::Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.current = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Downloads `object` into the new file `path` (not synced: [`Registry::restore_file`] syncs
/// it while it loads it), decompressing it on a thread of its
/// own while it arrives when `zstd`; the bytes downloaded.
async fn download(
    mut object: jetstream::object_store::Object,
    path: &Path,
    zstd: bool,
) -> anyhow::Result<u64> {
    use tokio::io::AsyncReadExt as _;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
    let to = path.to_owned();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&to)?);
        let mut chunks = Chunks {
            rx,
            current: bytes::Bytes::new(),
        };
        let written = if zstd {
            // A frame cut short is an error, not a shorter database.
            let decoder = zstd::stream::read::Decoder::new(chunks)?;
            std::io::copy(
                &mut std::io::Read::take(decoder, MAX_SNAPSHOT_BYTES + 1),
                &mut file,
            )?
        } else {
            std::io::copy(&mut chunks, &mut file)?
        };
        if written > MAX_SNAPSHOT_BYTES {
            return Err(std::io::Error::other(format!(
                "a registry snapshot larger than {MAX_SNAPSHOT_BYTES} bytes"
            )));
        }
        std::io::Write::flush(&mut file)
    });
    let mut bytes = 0u64;
    let read = async {
        loop {
            let mut chunk = bytes::BytesMut::with_capacity(SNAPSHOT_CHUNK);
            if object.read_buf(&mut chunk).await? == 0 {
                return Ok::<_, anyhow::Error>(());
            }
            bytes += chunk.len() as u64;
            if tx.send(chunk.freeze()).await.is_err() {
                return Ok(()); // the writer failed: its error is the one told
            }
        }
    }
    .await;
    drop(tx);
    let written = writer.await?;
    read?;
    written?;
    Ok(bytes)
}

/// How often a node looks whether a new snapshot is due (give or take a random half: nodes
/// seldom write one at the same moment).
const SNAPSHOT_CHECK: Duration = Duration::from_secs(10);

/// The snapshot object's chunks.
const SNAPSHOT_CHUNK: usize = 512 * 1024;

/// Longest a joining node spends downloading a snapshot before it applies the whole log
/// instead (once downloaded, the snapshot is restored to the end: a restore cannot be left
/// running beside the replay that would follow it).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

async fn snapshot_bucket(
    js: &jetstream::Context,
    config: &crate::Config,
) -> anyhow::Result<jetstream::object_store::ObjectStore> {
    let bucket = format!("{}_SNAPSHOTS", config.name);
    if let Ok(b) = js.get_object_store(&bucket).await {
        return Ok(b);
    }
    Ok(js
        .create_object_store(jetstream::object_store::Config {
            bucket,
            description: Some("Sekisho registry snapshots (decision 0013)".into()),
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?)
}

/// A unique file name in `dir` for a snapshot on its way.
fn scratch_file(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!(".{what}-{:016x}.db", rand::random::<u64>()))
}

/// The latest snapshot, into the empty `registry`, if it is of this log and not beyond its
/// end: the position it holds.
async fn restore_snapshot(
    bucket: &jetstream::object_store::ObjectStore,
    registry: &Arc<Registry>,
    identity: &str,
    last: u64,
    scratch: &Path,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Option<u64>> {
    let late = || anyhow::anyhow!("the registry snapshot not downloaded in {RESTORE_TIMEOUT:?}");
    let info = match tokio::time::timeout_at(deadline, bucket.info(SNAPSHOT_OBJECT))
        .await
        .map_err(|_| late())?
    {
        Ok(i) => i,
        Err(e) if e.kind() == jetstream::object_store::InfoErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let position: u64 = info
        .metadata
        .get("position")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    if info.metadata.get("identity").map(String::as_str) != Some(identity)
        || position == 0
        || position > last
    {
        return Ok(None);
    }
    let path = scratch_file(scratch, "snapshot-in");
    let downloaded = tokio::time::timeout_at(deadline, async {
        let object = bucket.get(SNAPSHOT_OBJECT).await?;
        // What was fetched may be a later snapshot than the one looked at: its own metadata
        // says how to read it (and the database itself says which position it holds).
        anyhow::ensure!(
            object.info.metadata.get("identity").map(String::as_str) == Some(identity),
            "the registry snapshot changed to another log's"
        );
        let zstd = match object.info.metadata.get("encoding").map(String::as_str) {
            None => false,
            Some("zstd") => true,
            Some(other) => anyhow::bail!("a registry snapshot in an unknown encoding ({other})"),
        };
        let began = Instant::now();
        let bytes = download(object, &path, zstd).await?;
        tracing::info!(
            bytes,
            zstd,
            seconds = began.elapsed().as_secs_f64(),
            "cluster: a registry snapshot downloaded"
        );
        Ok::<_, anyhow::Error>(())
    })
    .await
    .map_err(|_| late())
    .and_then(|r| r);
    // The downloaded file becomes the node's database (no copy of its rows), past any
    // deadline: the restore holds the registry until it is done either way.
    let got = match downloaded {
        Ok(()) => {
            let (r, p) = (registry.clone(), path.clone());
            tokio::task::spawn_blocking(move || r.restore_file(&p))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r.map_err(anyhow::Error::from))
        }
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_file(&path).await;
    Ok(Some(got?))
}

/// Removes the registry log's entries that no node needs any more: those up to the stored
/// snapshot's position (`snapshot`) that every node answering `sekisho cluster status` has
/// applied. Nothing while a node answers without a position (it is joining, perhaps from the
/// log's start). A node that was away meanwhile (stopped, or cut off) and comes back behind
/// the log's first entry starts again from the snapshot ([`join`]). Returns the last entry
/// removed, if any.
async fn compact(
    stream: &jetstream::stream::Stream,
    client: &async_nats::Client,
    name: &str,
    snapshot: u64,
    keep: Duration,
) -> anyhow::Result<Option<u64>> {
    let first = tokio::time::timeout(INFO_TIMEOUT, stream.get_info())
        .await??
        .state
        .first_sequence;
    if snapshot < first {
        return Ok(None);
    }
    let nodes = crate::ask_status(client, name, COMPACT_ASK).await?;
    let mut upto = snapshot;
    for n in &nodes {
        match n["registry_position"].as_u64() {
            Some(p) => upto = upto.min(p),
            None => return Ok(None),
        }
    }
    if nodes.is_empty() || upto < first {
        return Ok(None);
    }
    // Only entries stored more than `keep` ago (by NATS's clock): the last of them, found by
    // bisection (the log's times grow with its sequence).
    let before = std::time::SystemTime::now()
        .checked_sub(keep)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    let (mut lo, mut hi, mut found) = (first, upto, None);
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        let m = tokio::time::timeout(INFO_TIMEOUT, stream.get_raw_message(mid)).await??;
        if m.time.unix_timestamp_nanos() < before {
            found = Some(mid);
            lo = mid + 1;
        } else if mid == 0 {
            break;
        } else {
            hi = mid - 1;
        }
    }
    let Some(upto) = found else {
        return Ok(None);
    };
    stream.purge().sequence(upto + 1).await?;
    Ok(Some(upto))
}

/// How long a node waits before it looks again at a log it could not compact.
const COMPACT_QUIET: Duration = Duration::from_secs(60);

/// How long compaction waits for the nodes' positions.
const COMPACT_ASK: Duration = Duration::from_secs(1);

/// Writes a snapshot when none is there, or the registry went `every` entries beyond the one
/// there (whichever node does it; two at once write two good ones), and compacts the log
/// ([`compact`]).
async fn write_snapshots(
    bucket: jetstream::object_store::ObjectStore,
    registry: Arc<Registry>,
    identity: String,
    every: u64,
    scratch: PathBuf,
    (stream, client, name): (jetstream::stream::Stream, async_nats::Client, String),
    keep: Duration,
) {
    let mut quiet: Option<(u64, Instant)> = None;
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::time::sleep(wait).await;
        wait = SNAPSHOT_CHECK / 2 + SNAPSHOT_CHECK.mul_f64(rand::random::<f64>());
        let stored = match bucket.info(SNAPSHOT_OBJECT).await {
            Ok(i) if i.metadata.get("identity") == Some(&identity) => i
                .metadata
                .get("position")
                .and_then(|p| p.parse::<u64>().ok())
                .unwrap_or(0),
            Ok(_) => 0,
            Err(e) if e.kind() == jetstream::object_store::InfoErrorKind::NotFound => 0,
            Err(_) => continue,
        };
        // Every node's status is asked for (a count under each broker's lock): for the same
        // snapshot, at most once a minute while nothing comes of it.
        if stored > 0 && quiet.is_none_or(|(s, t)| s != stored || Instant::now() >= t) {
            quiet = None;
            match compact(&stream, &client, &name, stored, keep).await {
                Ok(Some(upto)) => tracing::info!(upto, "cluster: registry log compacted"),
                Ok(None) => quiet = Some((stored, Instant::now() + COMPACT_QUIET)),
                Err(e) => {
                    quiet = Some((stored, Instant::now() + COMPACT_QUIET));
                    tracing::warn!(error = %e, "cluster: compacting the registry log")
                }
            }
        }
        let now = registry.log_position();
        if now == 0 || (stored > 0 && now < stored + every) || now <= stored {
            continue;
        }
        let path = scratch_file(&scratch, "snapshot-out");
        let packed = scratch_file(&scratch, "snapshot-zst");
        let written = async {
            let (r, p, z) = (registry.clone(), path.clone(), packed.clone());
            let position = tokio::task::spawn_blocking(move || {
                let position = r.snapshot_to(&p)?;
                compress(&p, &z)?;
                Ok::<_, anyhow::Error>(position)
            })
            .await??;
            // Another node may have stored a later one meanwhile: never replaced by an older
            // one (the log may be compacted up to the later one already).
            if let Ok(i) = bucket.info(SNAPSHOT_OBJECT).await
                && i.metadata.get("identity") == Some(&identity)
                && i.metadata
                    .get("position")
                    .and_then(|p| p.parse::<u64>().ok())
                    .is_some_and(|p| p >= position)
            {
                return Ok(position);
            }
            let mut file = tokio::fs::File::open(&packed).await?;
            let meta = jetstream::object_store::ObjectMetadata {
                name: SNAPSHOT_OBJECT.into(),
                description: Some(format!("registry at log position {position}")),
                // Fewer, larger chunks: a joining node downloads it faster (under NATS's
                // default max_payload of 1 MiB).
                chunk_size: Some(SNAPSHOT_CHUNK),
                metadata: [
                    ("position".to_string(), position.to_string()),
                    ("identity".to_string(), identity.clone()),
                    ("encoding".to_string(), "zstd".to_string()),
                ]
                .into(),
                ..Default::default()
            };
            bucket.put(meta, &mut file).await?;
            Ok::<_, anyhow::Error>(position)
        }
        .await;
        let _ = tokio::fs::remove_file(&path).await;
        let _ = tokio::fs::remove_file(&packed).await;
        match written {
            Ok(position) => tracing::info!(position, "cluster: a registry snapshot written"),
            Err(e) => tracing::warn!(error = %e, "cluster: writing a registry snapshot"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read as _;

    /// `data`'s chunks through a channel, as a download hands them to the decompressing
    /// thread.
    fn chunks_of(data: Vec<u8>, size: usize) -> Chunks {
        let (tx, rx) = tokio::sync::mpsc::channel(data.len() / size + 2);
        for c in data.chunks(size) {
            tx.try_send(bytes::Bytes::copy_from_slice(c)).unwrap();
        }
        Chunks {
            rx,
            current: bytes::Bytes::new(),
        }
    }

    #[test]
    fn a_compressed_snapshot_comes_back_whole_and_a_cut_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("sekisho-snap-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        // Pages of a database: repeated structure and random bytes (keys, signatures).
        let mut data = Vec::new();
        for i in 0..20_000u32 {
            data.extend_from_slice(
                format!("arn:aws:iot:us-east-1:123456789012:cert/{i:064}").as_bytes(),
            );
            data.extend((0..32).map(|_| rand::random::<u8>()));
        }
        let (raw, packed) = (dir.join("raw"), dir.join("packed"));
        std::fs::write(&raw, &data).unwrap();
        compress(&raw, &packed).unwrap();
        let z = std::fs::read(&packed).unwrap();
        assert!(z.len() < data.len() / 2, "{} of {}", z.len(), data.len());

        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(chunks_of(z.clone(), 1000))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == data);

        let cut = z[..z.len() - 100].to_vec();
        let mut out = Vec::new();
        let r = zstd::stream::read::Decoder::new(chunks_of(cut, 1000))
            .unwrap()
            .read_to_end(&mut out);
        assert!(r.is_err(), "a cut frame decoded to {} bytes", out.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
