//! Function code the nodes share (decision 0014): each zip once in the `{name}_CODE` object
//! store, named `{account}/{sha256}`. A node that stores a function's code puts its zip here
//! before the function is written to the registry log; a node asked to run code it does not
//! hold takes it from here (the functions host checks it against the hash the function names
//! before it unpacks it). Code no function names any more is swept once it was last written
//! more than the host's grace ago.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::object_store::{InfoErrorKind, ObjectStore};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::io::AsyncReadExt as _;

/// Object store chunks (under NATS's default `max_payload` of 1 MiB).
const CHUNK: usize = 512 * 1024;

/// The most the share holds in all (a put beyond it fails, and so does the function's write):
/// code never crowds out the registry log and the sessions in JetStream's storage.
const MAX_BYTES: i64 = 8 << 30;

/// The error of a put beyond the account's bound ([`crate::Config::code_bytes_per_account`]).
#[derive(Debug)]
pub struct QuotaExceeded(pub u64);

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the account's function code would take more than {} bytes of the cluster's code store (code no function uses any more is removed an hour after it was last written)",
            self.0
        )
    }
}

impl std::error::Error for QuotaExceeded {}

/// A put of code the share holds, written less than this long ago, writes nothing.
const FRESH: Duration = Duration::from_secs(1800);

/// The cluster's shared function code.
#[derive(Clone)]
pub struct SharedCode {
    js: jetstream::Context,
    name: String,
    replicas: usize,
    /// The most one account's zips may take.
    per_account: u64,
    /// Opened (or made) on first use, so that a node starts while JetStream elects a leader.
    bucket: std::sync::Arc<tokio::sync::OnceCell<ObjectStore>>,
}

impl std::fmt::Debug for SharedCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCode").finish_non_exhaustive()
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn object(account: &str, sha: &str) -> String {
    format!("{account}/{sha}")
}

impl SharedCode {
    /// The `{name}_CODE` object store, opened when first used.
    pub(crate) fn new(js: jetstream::Context, config: &crate::Config) -> SharedCode {
        SharedCode {
            js,
            name: format!("{}_CODE", config.name),
            replicas: config.replicas,
            per_account: config.code_bytes_per_account,
            bucket: Default::default(),
        }
    }

    /// The object store, made if it is not there.
    async fn bucket(&self) -> anyhow::Result<&ObjectStore> {
        self.bucket
            .get_or_try_init(|| async {
                match self.js.get_object_store(&self.name).await {
                    Ok(b) => Ok(b),
                    Err(_) => self
                        .js
                        .create_object_store(jetstream::object_store::Config {
                            bucket: self.name.clone(),
                            description: Some("Sekisho function code (decision 0014)".into()),
                            num_replicas: self.replicas,
                            max_bytes: MAX_BYTES,
                            storage: jetstream::stream::StorageType::File,
                            ..Default::default()
                        })
                        .await
                        .context("cluster: the shared function code's object store"),
                }
            })
            .await
    }

    /// Keeps `zip` for `account` under its hash `sha`. Written again if it is there but was
    /// last written more than half an hour ago: it is then recent again for
    /// [`SharedCode::sweep`], which removes only what is older than its grace (an hour).
    /// Refused ([`QuotaExceeded`]) if new and the account's zips would then take more than
    /// its bound: every zip of the account counts, including those no function names that
    /// the sweep has not removed yet (or creating and deleting functions would get past it).
    pub async fn put(&self, account: &str, sha: &str, zip: Bytes) -> anyhow::Result<()> {
        let bucket = self.bucket().await?;
        let there = match bucket.info(object(account, sha)).await {
            Ok(i) if !i.deleted && i.size == zip.len() => {
                let fresh = i.modified.is_some_and(|m| {
                    let age = now_secs().saturating_sub(m.unix_timestamp());
                    age >= 0 && (age as u64) < FRESH.as_secs()
                });
                if fresh {
                    return Ok(());
                }
                true
            }
            _ => false,
        };
        if !there && self.usage(bucket, account).await? + zip.len() as u64 > self.per_account {
            return Err(QuotaExceeded(self.per_account).into());
        }
        let meta = jetstream::object_store::ObjectMetadata {
            name: object(account, sha),
            chunk_size: Some(CHUNK),
            ..Default::default()
        };
        bucket.put(meta, &mut zip.as_ref()).await?;
        Ok(())
    }

    /// The bytes of `account`'s zips in the share.
    async fn usage(&self, bucket: &ObjectStore, account: &str) -> anyhow::Result<u64> {
        let prefix = format!("{account}/");
        let mut list = bucket.list().await?;
        let mut total = 0u64;
        while let Some(info) = list.next().await {
            let info = info?;
            if !info.deleted && info.name.starts_with(&prefix) {
                total = total.saturating_add(info.size as u64);
            }
        }
        Ok(total)
    }

    /// The zip kept for `account` under `sha`, if any; an error if it is larger than `limit`.
    pub async fn get(
        &self,
        account: &str,
        sha: &str,
        limit: usize,
    ) -> anyhow::Result<Option<Bytes>> {
        let name = object(account, sha);
        let bucket = self.bucket().await?;
        match bucket.info(&name).await {
            Ok(i) if i.size > limit => anyhow::bail!("shared code of {} bytes", i.size),
            Ok(_) => {}
            Err(e) if e.kind() == InfoErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let object = match bucket.get(&name).await {
            Ok(o) => o,
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let mut zip = Vec::new();
        object.take(limit as u64 + 1).read_to_end(&mut zip).await?;
        anyhow::ensure!(zip.len() <= limit, "shared code larger than {limit} bytes");
        Ok(Some(zip.into()))
    }

    /// Removes `account`'s zips that `keep` does not name and that were last written more
    /// than `older_than` ago; how many it removed.
    pub async fn sweep(
        &self,
        account: &str,
        keep: &BTreeSet<String>,
        older_than: Duration,
    ) -> anyhow::Result<usize> {
        let prefix = format!("{account}/");
        let now = now_secs();
        let due = |modified: Option<i64>| {
            modified.is_some_and(|m| m + older_than.as_secs() as i64 <= now)
        };
        let bucket = self.bucket().await?;
        let mut list = bucket.list().await?;
        let mut stale = Vec::new();
        while let Some(info) = list.next().await {
            let info = info?;
            let Some(sha) = info.name.strip_prefix(&prefix) else {
                continue;
            };
            if !info.deleted
                && !keep.contains(sha)
                && due(info.modified.map(|m| m.unix_timestamp()))
            {
                stale.push(info.name.clone());
            }
        }
        let mut removed = 0;
        for name in stale {
            // Looked at again just before: written meanwhile (a function about to name it,
            // on another node), it stays.
            match bucket.info(&name).await {
                Ok(i) if due(i.modified.map(|m| m.unix_timestamp())) => {}
                _ => continue,
            }
            match bucket.delete(&name).await {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(object = %name, error = %e, "removing shared code"),
            }
        }
        Ok(removed)
    }
}
