//! The object store on an S3 backend (decision 0015): what [`crate::store::Store`] does on
//! disk, done in one bucket of an S3 store that every node shares. Layout in that bucket:
//!
//! - `b/{name}`: a bucket's record (JSON: owner, creation time, incarnation), made with
//!   `If-None-Match: *`, so that of two nodes creating one name, one wins;
//! - `a/{account}/{name}`: empty, one per bucket of the account (ListBuckets);
//! - `o/{incarnation:016x}/{key}`: an object, its data as is, its Content-Type the backend's
//!   own and its other stored headers and checksum in `x-amz-meta-sekisho` (base64 JSON);
//! - `u/{incarnation:016x}/{id}`: a multipart upload's record (JSON: the upload, the
//!   backend's upload id), and `ua/{account}/{id}` (empty) to count an account's uploads.
//!
//! An upload id starts with its bucket's incarnation (16 hex digits), so any node finds its
//! record from the id. A bucket's incarnation is random and new each time the name is made:
//! nothing written for one bucket is ever found under a later bucket of the same name.
//! Bucket records are kept for a second on each node (a miss is not kept); everything else
//! is read from the backend each time, which decides conditional writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, Data, bytes_body};
use crate::store::{Condition, Listing, MIN_PART_SIZE, ObjectMeta, StoreError, UploadInfo};

/// How long a node keeps a bucket record it read.
const CACHED: Duration = Duration::from_secs(1);
/// The metadata header that carries what the front end stores beside the Content-Type.
const META: &str = "x-amz-meta-sekisho";
/// The most of a record read.
const MAX_RECORD: usize = 1024 * 1024;
/// The longest key: the backend's 1,024 bytes, less the prefix `o/{16 hex}/`.
pub const MAX_REMOTE_KEY_LEN: usize = 1024 - 19;

/// A bucket's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketRecord {
    /// The owner account.
    pub owner: String,
    /// Epoch seconds.
    pub created: f64,
    /// Which life of the name it is.
    pub incarnation: u64,
}

/// A multipart upload's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadRecord {
    info: UploadInfo,
    incarnation: u64,
    /// The backend's upload id.
    backend: String,
}

/// What an object keeps besides its data and Content-Type.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Extra {
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    checksum: Option<(String, String)>,
}

fn io(e: BackendError) -> StoreError {
    match e {
        // SeaweedFS keeps at most 255 bytes between two slashes.
        BackendError::Refused { code, .. } if code == "KeyTooLongError" => {
            StoreError::KeyTooLong(MAX_REMOTE_KEY_LEN)
        }
        e => StoreError::Io(std::io::Error::other(e)),
    }
}

/// The backend key of an object. Keys with a `.` or `..` segment, or an empty one before
/// the last (`a//b`, `/a`), are refused: a store or a proxy that collapses path segments
/// would take them for another object, or for a record (`../../b/{bucket}`).
fn object_key(incarnation: u64, key: &str) -> Result<String, StoreError> {
    let mut segments = key.split('/').peekable();
    while let Some(s) = segments.next() {
        let last = segments.peek().is_none();
        if s == "." || s == ".." || (s.is_empty() && !last) {
            return Err(StoreError::UnsupportedKey);
        }
    }
    Ok(format!("o/{incarnation:016x}/{key}"))
}

fn upload_key(incarnation: u64, id: &str) -> String {
    format!("u/{incarnation:016x}/{id}")
}

/// The incarnation an upload id starts with, if it is one this store made.
fn incarnation_of(id: &str) -> Option<u64> {
    if id.len() != 48 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(id.get(..16)?, 16).ok()
}

fn extra_header(meta: &ObjectMeta) -> Result<(String, String), StoreError> {
    let extra = Extra {
        headers: meta.headers.clone(),
        checksum: meta.checksum.clone(),
    };
    let json = serde_json::to_vec(&extra).map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
    Ok((
        META.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(json),
    ))
}

fn meta_of(key: &str, head: &crate::backend::ObjectHead) -> ObjectMeta {
    let extra = head
        .headers
        .iter()
        .find(|(n, _)| n == META)
        .and_then(|(_, v)| base64::engine::general_purpose::STANDARD.decode(v).ok())
        .and_then(|j| serde_json::from_slice::<Extra>(&j).ok())
        .unwrap_or_default();
    ObjectMeta {
        key: key.to_owned(),
        size: head.size,
        etag: head.etag.clone(),
        last_modified: head.last_modified,
        content_type: head.content_type.clone(),
        headers: extra.headers,
        checksum: extra.checksum,
    }
}

/// The greatest key that starts with `prefix` (for a listing that goes on after a common
/// prefix: every key in it is before this one).
fn past(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

/// The object store on an S3 backend.
pub struct RemoteStore {
    backend: Backend,
    buckets: Mutex<HashMap<String, (Instant, Option<BucketRecord>)>>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl RemoteStore {
    /// The store on `backend` (its bucket made if it is not there).
    pub async fn open(backend: Backend) -> Result<RemoteStore, StoreError> {
        backend.ensure_bucket().await.map_err(io)?;
        Ok(RemoteStore {
            backend,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<BucketRecord>)>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A small object's bytes, or `None`.
    async fn read_small(&self, key: &str) -> Result<Option<bytes::Bytes>, StoreError> {
        match self.backend.get(key, None, None).await {
            Ok((_, body)) => {
                let limited = http_body_util::Limited::new(body, MAX_RECORD);
                let bytes = limited
                    .collect()
                    .await
                    .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
                    .to_bytes();
                Ok(Some(bytes))
            }
            Err(BackendError::NotFound) => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    async fn write_small(
        &self,
        key: &str,
        bytes: Vec<u8>,
        cond: &Condition,
    ) -> Result<(), BackendError> {
        use md5::Digest as _;
        let md5 = md5::Md5::digest(&bytes).to_vec();
        let len = bytes.len() as u64;
        self.backend
            .put(
                key,
                Data {
                    body: bytes_body(bytes),
                    len,
                    md5,
                },
                Some("application/json"),
                &[],
                cond,
            )
            .await
            .map(|_| ())
    }

    /// A bucket's record: kept a second, read from the backend after (`fresh`: always read).
    async fn record(&self, name: &str, fresh: bool) -> Result<Option<BucketRecord>, StoreError> {
        if !fresh
            && let Some((at, r)) = self.cache().get(name)
            && at.elapsed() < CACHED
        {
            return Ok(r.clone());
        }
        let record = match self.read_small(&format!("b/{name}")).await? {
            Some(b) => Some(
                serde_json::from_slice::<BucketRecord>(&b)
                    .map_err(|e| StoreError::Io(std::io::Error::other(e)))?,
            ),
            None => None,
        };
        // Only what exists is kept: a bucket made on another node is seen here at once.
        let mut cache = self.cache();
        if cache.len() > 100_000 {
            cache.retain(|_, (at, _)| at.elapsed() < CACHED);
        }
        match &record {
            Some(r) => {
                cache.insert(name.to_owned(), (Instant::now(), Some(r.clone())));
            }
            None => {
                cache.remove(name);
            }
        }
        Ok(record)
    }

    async fn existing(&self, name: &str) -> Result<BucketRecord, StoreError> {
        self.record(name, false)
            .await?
            .ok_or(StoreError::NoSuchBucket)
    }

    /// The owner account of a bucket and which incarnation of the name it is.
    pub async fn bucket_ref(&self, name: &str) -> Result<Option<(String, u64)>, StoreError> {
        Ok(self
            .record(name, false)
            .await?
            .map(|r| (r.owner, r.incarnation)))
    }

    /// An account's buckets with their creation times.
    pub async fn buckets_of(&self, account: &str) -> Result<Vec<(String, f64)>, StoreError> {
        let prefix = format!("a/{account}/");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .backend
                .list(&prefix, None, None, token.as_deref(), 1000)
                .await
                .map_err(io)?;
            for o in page.objects {
                if let Some(name) = o.key.strip_prefix(&prefix) {
                    out.push((name.to_owned(), o.last_modified));
                }
            }
            match page.next {
                Some(t) if page.truncated => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Creates a bucket (the name must be valid): the record first, with `If-None-Match: *`.
    pub async fn create_bucket(&self, name: &str, owner: &str, now: f64) -> Result<(), StoreError> {
        let record = BucketRecord {
            owner: owner.to_owned(),
            created: now,
            incarnation: u64::from_le_bytes(
                uuid::Uuid::new_v4().as_bytes()[..8]
                    .try_into()
                    .unwrap_or([1; 8]),
            ),
        };
        let json =
            serde_json::to_vec(&record).map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        self.cache().remove(name);
        match self
            .write_small(&format!("b/{name}"), json, &Condition::Absent)
            .await
        {
            Ok(()) => {}
            Err(BackendError::PreconditionFailed) => {
                let owned = self
                    .record(name, true)
                    .await?
                    .is_some_and(|r| r.owner == owner);
                return Err(StoreError::BucketExists { owned });
            }
            Err(e) => return Err(io(e)),
        }
        self.write_small(&format!("a/{owner}/{name}"), Vec::new(), &Condition::None)
            .await
            .map_err(io)?;
        self.cache()
            .insert(name.to_owned(), (Instant::now(), Some(record)));
        Ok(())
    }

    /// Deletes an empty bucket, and aborts the multipart uploads still open in it.
    pub async fn delete_bucket(&self, name: &str) -> Result<(), StoreError> {
        let record = self
            .record(name, true)
            .await?
            .ok_or(StoreError::NoSuchBucket)?;
        let inc = record.incarnation;
        let some = self
            .backend
            .list(&format!("o/{inc:016x}/"), None, None, None, 1)
            .await
            .map_err(io)?;
        if !some.objects.is_empty() {
            return Err(StoreError::BucketNotEmpty);
        }
        for (id, _) in self.uploads_in(name, "").await? {
            let _ = self.abort(&id).await;
        }
        self.backend
            .delete(&format!("a/{}/{name}", record.owner))
            .await
            .map_err(io)?;
        self.backend
            .delete(&format!("b/{name}"))
            .await
            .map_err(io)?;
        self.cache().remove(name);
        Ok(())
    }

    /// An object's metadata.
    pub async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let inc = self.existing(bucket).await?.incarnation;
        match self.backend.head(&object_key(inc, key)?).await {
            Ok(h) => Ok(Some(meta_of(key, &h))),
            Err(BackendError::NotFound) => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// Bytes `range` of the object (all with `None`) if its ETag is still `etag` (what a
    /// [`RemoteStore::head`] before said): `None` if it changed or is gone meanwhile.
    pub async fn read(
        &self,
        bucket: &str,
        key: &str,
        etag: &str,
        range: Option<(u64, u64)>,
    ) -> Result<Option<Incoming>, StoreError> {
        let inc = self.existing(bucket).await?.incarnation;
        match self
            .backend
            .get(&object_key(inc, key)?, range, Some(etag))
            .await
        {
            Ok((_, body)) => Ok(Some(body)),
            Err(BackendError::NotFound | BackendError::PreconditionFailed) => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// Writes `file` (`meta.size` bytes from where it stands, whose MD5 is `md5`) as the
    /// object `meta.key` of the very bucket the write was authorized on (`incarnation`), if
    /// the object it replaces meets `condition` (the backend decides, atomically).
    pub async fn put(
        &self,
        bucket: &str,
        incarnation: u64,
        file: tokio::fs::File,
        meta: &ObjectMeta,
        md5: Vec<u8>,
        condition: &Condition,
    ) -> Result<(), StoreError> {
        if self.existing(bucket).await?.incarnation != incarnation {
            return Err(StoreError::NoSuchBucket);
        }
        if meta.key.len() > MAX_REMOTE_KEY_LEN {
            return Err(StoreError::KeyTooLong(MAX_REMOTE_KEY_LEN));
        }
        let stored = [extra_header(meta)?];
        let put = self
            .backend
            .put(
                &object_key(incarnation, &meta.key)?,
                Data {
                    body: crate::backend::file_body(file, meta.size),
                    len: meta.size,
                    md5,
                },
                meta.content_type.as_deref(),
                &stored,
                condition,
            )
            .await;
        match put {
            Ok(etag) => {
                if etag != meta.etag {
                    tracing::warn!(key = %meta.key, ours = %meta.etag, backend = %etag, "the S3 backend's ETag differs");
                }
                Ok(())
            }
            Err(BackendError::PreconditionFailed) => {
                Err(self.failed(incarnation, &meta.key, condition).await)
            }
            Err(BackendError::NotFound) if matches!(condition, Condition::Matches(_)) => {
                Err(StoreError::NoSuchKey)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// What a write whose condition the backend refused answers: S3 says NoSuchKey for an
    /// `If-Match` on a key that is not there (SeaweedFS answers 412 for both).
    async fn failed(&self, incarnation: u64, key: &str, condition: &Condition) -> StoreError {
        if matches!(condition, Condition::Matches(_))
            && let Ok(k) = object_key(incarnation, key)
            && let Err(BackendError::NotFound) = self.backend.head(&k).await
        {
            return StoreError::NoSuchKey;
        }
        StoreError::PreconditionFailed
    }

    /// Deletes an object; deleting a missing key succeeds, as in S3.
    pub async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        let inc = self.existing(bucket).await?.incarnation;
        self.backend
            .delete(&object_key(inc, key)?)
            .await
            .map_err(io)
    }

    /// Lists keys after `after` that start with `prefix`, rolling keys up at `delimiter`, at
    /// most `max` entries (objects and prefixes together), as [`crate::store::Store::list`].
    pub async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> Result<Listing, StoreError> {
        let inc = self.existing(bucket).await?.incarnation;
        let base = format!("o/{inc:016x}/");
        let delimiter = delimiter.filter(|d| !d.is_empty());
        let start = after.filter(|a| *a >= prefix).map(|a| {
            // After a common prefix, go on past every key in it.
            let rolled = a.strip_prefix(prefix).and_then(|rest| {
                let d = delimiter?;
                rest.find(d).map(|i| &a[..prefix.len() + i + d.len()])
            });
            match rolled {
                Some(cp) => past(&format!("{base}{cp}")),
                None => format!("{base}{a}"),
            }
        });
        let mut out = Listing::default();
        if max == 0 {
            return Ok(out);
        }
        let page = self
            .backend
            .list(
                &format!("{base}{prefix}"),
                delimiter,
                start.as_deref(),
                None,
                max,
            )
            .await
            .map_err(io)?;
        let strip = |k: &str| k.strip_prefix(&base).unwrap_or(k).to_owned();
        for o in &page.objects {
            out.objects.push(ObjectMeta {
                key: strip(&o.key),
                size: o.size,
                etag: o.etag.clone(),
                last_modified: o.last_modified,
                content_type: None,
                headers: Vec::new(),
                checksum: None,
            });
        }
        // A store that keeps keys as folders (SeaweedFS) may list a folder whose last object
        // was just deleted as a common prefix for a while: only prefixes holding an object
        // are S3's.
        for p in &page.prefixes {
            let held = self
                .backend
                .list(p, None, None, None, 1)
                .await
                .map_err(io)?;
            if !held.objects.is_empty() {
                out.prefixes.push(strip(p));
            }
        }
        out.truncated = page.truncated;
        // The next page starts after what the backend listed last, kept or not.
        out.last = page
            .objects
            .last()
            .map(|o| strip(&o.key))
            .into_iter()
            .chain(page.prefixes.last().map(|p| strip(p)))
            .max();
        Ok(out)
    }

    async fn upload_record(&self, id: &str) -> Result<UploadRecord, StoreError> {
        let inc = incarnation_of(id).ok_or(StoreError::NoSuchUpload)?;
        let bytes = self
            .read_small(&upload_key(inc, id))
            .await?
            .ok_or(StoreError::NoSuchUpload)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Io(std::io::Error::other(e)))
    }

    /// Starts a multipart upload, unless its account already has `max` in progress; returns
    /// its id.
    pub async fn create_upload(&self, info: &UploadInfo, max: usize) -> Result<String, StoreError> {
        let inc = self.existing(&info.bucket).await?.incarnation;
        if info.key.len() > MAX_REMOTE_KEY_LEN {
            return Err(StoreError::KeyTooLong(MAX_REMOTE_KEY_LEN));
        }
        let marks = format!("ua/{}/", info.account);
        let held = self
            .backend
            .list(&marks, None, None, None, max.saturating_add(1))
            .await
            .map_err(io)?;
        if held.objects.len() >= max {
            return Err(StoreError::TooManyUploads(max));
        }
        let stored = [extra_header(&info.template)?];
        let backend = self
            .backend
            .create_upload(
                &object_key(inc, &info.key)?,
                info.template.content_type.as_deref(),
                &stored,
            )
            .await
            .map_err(io)?;
        let id = format!("{inc:016x}{}", uuid::Uuid::new_v4().simple());
        let record = UploadRecord {
            info: info.clone(),
            incarnation: inc,
            backend,
        };
        let json =
            serde_json::to_vec(&record).map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        self.write_small(&upload_key(inc, &id), json, &Condition::Absent)
            .await
            .map_err(io)?;
        self.write_small(&format!("{marks}{id}"), Vec::new(), &Condition::None)
            .await
            .map_err(io)?;
        Ok(id)
    }

    /// An upload's description.
    pub async fn upload(&self, id: &str) -> Result<UploadInfo, StoreError> {
        Ok(self.upload_record(id).await?.info)
    }

    /// The uploads in progress in `bucket` whose key starts with `prefix`, by key then
    /// initiation time.
    pub async fn uploads_in(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, UploadInfo)>, StoreError> {
        let inc = self.existing(bucket).await?.incarnation;
        let base = format!("u/{inc:016x}/");
        let mut ids = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .backend
                .list(&base, None, None, token.as_deref(), 1000)
                .await
                .map_err(io)?;
            ids.extend(
                page.objects
                    .iter()
                    .filter_map(|o| o.key.strip_prefix(&base).map(str::to_owned)),
            );
            match page.next {
                Some(t) if page.truncated => token = Some(t),
                _ => break,
            }
        }
        let mut out = Vec::new();
        for id in ids {
            match self.upload_record(&id).await {
                Ok(r) if r.info.key.starts_with(prefix) => out.push((id, r.info)),
                Ok(_) | Err(StoreError::NoSuchUpload) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| {
            (&a.1.key, a.1.initiated)
                .partial_cmp(&(&b.1.key, b.1.initiated))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        Ok(out)
    }

    /// Writes `file` (`len` bytes whose MD5 is `md5`) as part `n` of upload `id`.
    pub async fn put_part(
        &self,
        id: &str,
        n: u32,
        file: tokio::fs::File,
        len: u64,
        md5: Vec<u8>,
    ) -> Result<(), StoreError> {
        let r = self.upload_record(id).await?;
        let data = Data {
            body: crate::backend::file_body(file, len),
            len,
            md5,
        };
        match self
            .backend
            .upload_part(
                &object_key(r.incarnation, &r.info.key)?,
                &r.backend,
                n,
                data,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(BackendError::NotFound) => Err(StoreError::NoSuchUpload),
            Err(e) => Err(io(e)),
        }
    }

    /// The parts uploaded so far, by number.
    pub async fn parts(&self, id: &str) -> Result<BTreeMap<u32, ObjectMeta>, StoreError> {
        let r = self.upload_record(id).await?;
        let parts = match self
            .backend
            .list_parts(&object_key(r.incarnation, &r.info.key)?, &r.backend)
            .await
        {
            Ok(p) => p,
            Err(BackendError::NotFound) => return Err(StoreError::NoSuchUpload),
            Err(e) => return Err(io(e)),
        };
        Ok(parts
            .into_iter()
            .map(|p| {
                (
                    p.number,
                    ObjectMeta {
                        key: r.info.key.clone(),
                        size: p.size,
                        etag: p.etag,
                        last_modified: p.last_modified,
                        content_type: None,
                        headers: Vec::new(),
                        checksum: None,
                    },
                )
            })
            .collect())
    }

    /// Completes an upload from the listed parts (number, ETag), checked as
    /// [`crate::store::Store::complete`] checks them, in the very bucket it was authorized on
    /// (`incarnation`), if `condition` holds; removes the upload.
    pub async fn complete(
        &self,
        id: &str,
        incarnation: u64,
        listed: &[(u32, String)],
        now: f64,
        condition: &Condition,
    ) -> Result<ObjectMeta, StoreError> {
        let r = self.upload_record(id).await?;
        if r.incarnation != incarnation {
            return Err(StoreError::NoSuchBucket);
        }
        let parts = self.parts(id).await?;
        if listed.is_empty() {
            return Err(StoreError::InvalidPart(0));
        }
        if listed.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(StoreError::InvalidPartOrder);
        }
        let mut size = 0u64;
        for (i, (n, etag)) in listed.iter().enumerate() {
            let p = parts.get(n).ok_or(StoreError::InvalidPart(*n))?;
            if p.etag != etag.trim_matches('"') {
                return Err(StoreError::InvalidPart(*n));
            }
            if i + 1 < listed.len() && p.size < MIN_PART_SIZE {
                return Err(StoreError::EntityTooSmall);
            }
            size += p.size;
        }
        let key = object_key(r.incarnation, &r.info.key)?;
        let etag = match self
            .backend
            .complete_upload(&key, &r.backend, listed, condition)
            .await
        {
            Ok(e) => e,
            Err(BackendError::PreconditionFailed) => {
                return Err(self.failed(r.incarnation, &r.info.key, condition).await);
            }
            Err(BackendError::NotFound) if matches!(condition, Condition::Matches(_)) => {
                return Err(StoreError::NoSuchKey);
            }
            Err(BackendError::NotFound) => return Err(StoreError::NoSuchUpload),
            Err(e) => return Err(io(e)),
        };
        self.forget_upload(id, &r).await;
        Ok(ObjectMeta {
            key: r.info.key.clone(),
            size,
            etag,
            last_modified: now,
            checksum: None,
            ..r.info.template
        })
    }

    async fn forget_upload(&self, id: &str, r: &UploadRecord) {
        for key in [
            upload_key(r.incarnation, id),
            format!("ua/{}/{id}", r.info.account),
        ] {
            if let Err(e) = self.backend.delete(&key).await {
                tracing::warn!(%key, error = %e, "removing a finished upload's record");
            }
        }
    }

    /// Aborts an upload and frees its parts.
    pub async fn abort(&self, id: &str) -> Result<(), StoreError> {
        let r = self.upload_record(id).await?;
        self.backend
            .abort_upload(&object_key(r.incarnation, &r.info.key)?, &r.backend)
            .await
            .map_err(io)?;
        self.forget_upload(id, &r).await;
        Ok(())
    }

    /// Aborts every upload initiated before `cutoff` (epoch seconds); returns how many.
    pub async fn expire_uploads(&self, cutoff: f64) -> Result<usize, StoreError> {
        let mut old = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .backend
                .list("u/", None, None, token.as_deref(), 1000)
                .await
                .map_err(io)?;
            old.extend(
                page.objects
                    .iter()
                    .filter(|o| o.last_modified < cutoff)
                    .filter_map(|o| o.key.rsplit('/').next().map(str::to_owned)),
            );
            match page.next {
                Some(t) if page.truncated => token = Some(t),
                _ => break,
            }
        }
        let mut n = 0;
        for id in old {
            if self.abort(&id).await.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_ids_carry_their_incarnation() {
        let id = format!("{:016x}{}", 0xfeed_u64, "0".repeat(32));
        assert_eq!(incarnation_of(&id), Some(0xfeed));
        assert_eq!(incarnation_of(&id[1..]), None);
        assert_eq!(incarnation_of(&format!("{id}0")), None);
        assert_eq!(incarnation_of(&id.replace('0', "g")), None);
        assert_eq!(incarnation_of("../../b/x"), None);
    }

    #[test]
    fn keys_a_path_could_be_collapsed_out_of_are_refused() {
        for bad in [
            "..",
            "../../b/alpha",
            "a/../b",
            "./a",
            "a/.",
            "a//b",
            "/a",
            "//",
        ] {
            assert!(
                matches!(object_key(1, bad), Err(StoreError::UnsupportedKey)),
                "{bad}"
            );
        }
        for good in ["a", "dir/", "a.b/..c/...", "a/b/c", ".hidden", "x/.y"] {
            assert_eq!(
                object_key(1, good).ok(),
                Some(format!("o/0000000000000001/{good}"))
            );
        }
    }

    #[test]
    fn a_common_prefix_is_passed_whole() {
        assert!(past("o/1/dir/").as_str() > "o/1/dir/zzz~");
        assert!(past("o/1/dir/").as_str() < "o/1/dis");
    }
}
