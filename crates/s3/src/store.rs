//! The object store on disk, under `DIR/s3` (decision 0006):
//!
//! - `<bucket>/bucket.json`: the owner account and creation time;
//! - `<bucket>/o/<hh>/<sha256(key)>`: one file per object: the data, then its metadata as JSON,
//!   the JSON's length (u32 LE) and the magic `SKS3OBJ1`;
//! - `.uploads/<id>/upload.json` and `.uploads/<id>/<part number>`: multipart uploads;
//! - `.tmp/`: files being written, emptied at start.
//!
//! Every object is written to `.tmp`, synced, then renamed into place, so a reader (or a
//! restart after a crash) sees the old object or the new one, never a torn one. An in-memory
//! index of each bucket's keys, rebuilt from the files at start, serves listings.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aws_lc_rs::digest;
use md5::Digest as _;
use serde::{Deserialize, Serialize};

/// Largest object a single PutObject (or one part) may carry: 5 GiB.
pub const MAX_PUT_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// Smallest part of a multipart upload, except the last: 5 MiB.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Highest part number.
pub const MAX_PART_NUMBER: u32 = 10_000;
/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;

const MAGIC: &[u8; 8] = b"SKS3OBJ1";
const MAX_META: u32 = 1024 * 1024;

/// What a write requires of the object it replaces (`If-None-Match: *`, `If-Match`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Condition {
    /// Nothing.
    #[default]
    None,
    /// That there is none.
    Absent,
    /// That it exists with one of these ETags (`*`: any).
    Matches(Vec<String>),
}

/// An object's (or a part's) metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjectMeta {
    /// Key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// ETag without quotes: the MD5 of the data, or of the parts' MD5s with `-<parts>`.
    pub etag: String,
    /// Epoch seconds.
    pub last_modified: f64,
    /// Content-Type.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Headers stored and returned with the object (`content-encoding`, `x-amz-meta-*`, ...).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The full-object checksum sent with a single PutObject: (algorithm name, value).
    #[serde(default)]
    pub checksum: Option<(String, String)>,
}

/// A multipart upload in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadInfo {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// The account that started it.
    pub account: String,
    /// Epoch seconds.
    pub initiated: f64,
    /// Content type and headers of the object to be.
    pub template: ObjectMeta,
}

/// A store failure, in S3's terms.
#[derive(Debug)]
pub enum StoreError {
    /// The bucket does not exist.
    NoSuchBucket,
    /// The name is taken (`owned`: by the caller's account).
    BucketExists {
        /// Whether the caller owns it.
        owned: bool,
    },
    /// The bucket still holds objects.
    BucketNotEmpty,
    /// Unknown upload id.
    NoSuchUpload,
    /// A listed part is missing or its ETag differs.
    InvalidPart(u32),
    /// Parts not in ascending order.
    InvalidPartOrder,
    /// A part other than the last is under 5 MiB.
    EntityTooSmall,
    /// A conditional write's condition does not hold.
    PreconditionFailed,
    /// A conditional write (If-Match) names an object that does not exist.
    NoSuchKey,
    /// The account has as many multipart uploads in progress as it may.
    TooManyUploads(usize),
    /// The key is longer than the store keeps (an S3 backend's, decision 0015).
    KeyTooLong(usize),
    /// A key with a `.` or `..` segment, or an empty one before the last, which an S3
    /// backend's path could collapse (decision 0015).
    UnsupportedKey,
    /// Disk trouble.
    Io(io::Error),
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> StoreError {
        StoreError::Io(e)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct BucketFile {
    owner: String,
    created: f64,
}

struct Bucket {
    /// Which life of this name it is: a new number every time a bucket is created (or
    /// loaded), so a write authorized on one bucket can never land in a later bucket of the
    /// same name (deleted and re-created, perhaps by another account).
    incarnation: u64,
    /// Bytes in all objects (kept with `objects`).
    bytes: u64,
    owner: String,
    created: f64,
    objects: BTreeMap<String, ObjectMeta>,
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct Listing {
    /// Objects, in key order.
    pub objects: Vec<ObjectMeta>,
    /// Common prefixes, in order.
    pub prefixes: Vec<String>,
    /// More keys follow.
    pub truncated: bool,
    /// The last key or prefix on this page (where the next page starts after).
    pub last: Option<String>,
}

/// The store.
pub struct Store {
    root: PathBuf,
    buckets: Mutex<BTreeMap<String, Bucket>>,
    /// Multipart uploads in progress, by id (their `upload.json`, indexed at open): listings
    /// and quotas never scan the disk, nor another account's uploads.
    uploads: Mutex<BTreeMap<String, UploadInfo>>,
}

/// The next bucket incarnation.
static INCARNATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_incarnation() -> u64 {
    INCARNATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Whether `name` is a valid bucket name (S3's general-purpose bucket rules).
pub fn valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    if !(3..=63).contains(&b.len()) {
        return false;
    }
    let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-';
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.iter().all(|&c| ok_char(c))
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && !name.contains("..")
        && !name.contains(".-")
        && !name.contains("-.")
        && name.parse::<std::net::Ipv4Addr>().is_err()
        && !name.starts_with("xn--")
        && !name.starts_with("sthree-")
        && !name.ends_with("-s3alias")
        && !name.ends_with("--ol-s3")
}

/// Whether an upload id is one this store could have made (it becomes a path component).
fn valid_upload_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|c| c.is_ascii_alphanumeric())
}

fn key_hash(key: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, key.as_bytes()))
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Appends the metadata trailer to a file of data and syncs it.
pub fn seal(file: &mut File, meta: &ObjectMeta) -> io::Result<()> {
    let json = serde_json::to_vec(meta).map_err(io::Error::other)?;
    file.write_all(&json)?;
    file.write_all(&(json.len() as u32).to_le_bytes())?;
    file.write_all(MAGIC)?;
    file.sync_all()
}

/// Reads the metadata trailer of an object file; the data is its first `meta.size` bytes.
pub fn read_meta(file: &mut File) -> io::Result<ObjectMeta> {
    let len = file.metadata()?.len();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a sealed object file");
    if len < 12 {
        return Err(bad());
    }
    file.seek(SeekFrom::Start(len - 12))?;
    let mut tail = [0u8; 12];
    file.read_exact(&mut tail)?;
    if &tail[4..] != MAGIC {
        return Err(bad());
    }
    let meta_len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if meta_len > MAX_META || u64::from(meta_len) + 12 > len {
        return Err(bad());
    }
    file.seek(SeekFrom::Start(len - 12 - u64::from(meta_len)))?;
    let mut json = vec![0u8; meta_len as usize];
    file.read_exact(&mut json)?;
    let meta: ObjectMeta = serde_json::from_slice(&json).map_err(|_| bad())?;
    if meta.size + u64::from(meta_len) + 12 != len {
        return Err(bad());
    }
    Ok(meta)
}

impl Store {
    /// Opens the store under `root`, creating it, discarding unfinished writes and indexing
    /// every bucket.
    pub fn open(root: &Path) -> io::Result<Store> {
        fs::create_dir_all(root.join(".tmp"))?;
        fs::create_dir_all(root.join(".uploads"))?;
        for e in fs::read_dir(root.join(".tmp"))? {
            let p = e?.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        let mut buckets = BTreeMap::new();
        for e in fs::read_dir(root)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().is_dir() {
                continue;
            }
            let Ok(text) = fs::read(e.path().join("bucket.json")) else {
                continue;
            };
            let Ok(b) = serde_json::from_slice::<BucketFile>(&text) else {
                tracing::warn!(bucket = %name, "bucket.json unreadable; bucket skipped");
                continue;
            };
            let mut objects = BTreeMap::new();
            if let Ok(dirs) = fs::read_dir(e.path().join("o")) {
                for d in dirs.flatten() {
                    // A stray file where a directory belongs is skipped, not fatal.
                    let Ok(files) = fs::read_dir(d.path()) else {
                        continue;
                    };
                    for f in files.flatten() {
                        match File::open(f.path()).and_then(|mut f| read_meta(&mut f)) {
                            Ok(m) => {
                                objects.insert(m.key.clone(), m);
                            }
                            Err(err) => {
                                tracing::warn!(path = %f.path().display(), error = %err, "object file unreadable; skipped")
                            }
                        }
                    }
                }
            }
            buckets.insert(
                name,
                Bucket {
                    incarnation: next_incarnation(),
                    owner: b.owner,
                    created: b.created,
                    bytes: objects.values().map(|m| m.size).sum(),
                    objects,
                },
            );
        }
        let mut uploads = BTreeMap::new();
        for e in fs::read_dir(root.join(".uploads"))?.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let info = fs::read(e.path().join("upload.json"))
                .ok()
                .and_then(|t| serde_json::from_slice::<UploadInfo>(&t).ok());
            match info {
                Some(u) if valid_upload_id(&id) && buckets.contains_key(&u.bucket) => {
                    uploads.insert(id, u);
                }
                _ => {
                    // Unreadable, or its bucket is gone: nothing can complete it.
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(Store {
            root: root.to_owned(),
            buckets: Mutex::new(buckets),
            uploads: Mutex::new(uploads),
        })
    }

    fn uploads_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, UploadInfo>> {
        self.uploads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bucket>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        let h = key_hash(key);
        self.root.join(bucket).join("o").join(&h[..2]).join(h)
    }

    /// A new file in `.tmp`, removed when the guard drops uncommitted.
    pub fn temp(&self) -> io::Result<TempFile> {
        let path = self
            .root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let file = File::create(&path)?;
        Ok(TempFile {
            path,
            file: Some(file),
        })
    }

    /// Buckets, objects and bytes stored, for `/metrics`.
    pub fn totals(&self) -> (usize, usize, u64) {
        let buckets = self.lock();
        (
            buckets.len(),
            buckets.values().map(|b| b.objects.len()).sum(),
            buckets.values().map(|b| b.bytes).sum(),
        )
    }

    /// The owner account of a bucket.
    pub fn bucket_owner(&self, bucket: &str) -> Option<String> {
        self.lock().get(bucket).map(|b| b.owner.clone())
    }

    #[cfg(test)]
    fn inc(&self, bucket: &str) -> u64 {
        self.bucket_ref(bucket).map_or(0, |(_, i)| i)
    }

    /// The owner account of a bucket and which incarnation of the name it is: writes name
    /// the incarnation they were authorized on ([`Store::put`]).
    pub fn bucket_ref(&self, bucket: &str) -> Option<(String, u64)> {
        self.lock()
            .get(bucket)
            .map(|b| (b.owner.clone(), b.incarnation))
    }

    /// An account's buckets with their creation times.
    pub fn buckets_of(&self, account: &str) -> Vec<(String, f64)> {
        self.lock()
            .iter()
            .filter(|(_, b)| b.owner == account)
            .map(|(n, b)| (n.clone(), b.created))
            .collect()
    }

    /// Creates a bucket (the name must be valid).
    pub fn create_bucket(&self, name: &str, owner: &str, now: f64) -> Result<(), StoreError> {
        let mut buckets = self.lock();
        if let Some(b) = buckets.get(name) {
            return Err(StoreError::BucketExists {
                owned: b.owner == owner,
            });
        }
        let dir = self.root.join(name);
        let staging = self
            .root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        fs::create_dir_all(staging.join("o"))?;
        let mut f = File::create(staging.join("bucket.json"))?;
        f.write_all(
            &serde_json::to_vec(&BucketFile {
                owner: owner.to_owned(),
                created: now,
            })
            .map_err(io::Error::other)?,
        )?;
        f.sync_all()?;
        fs::rename(&staging, &dir)?;
        sync_dir(&self.root)?;
        buckets.insert(
            name.to_owned(),
            Bucket {
                incarnation: next_incarnation(),
                owner: owner.to_owned(),
                created: now,
                bytes: 0,
                objects: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Deletes an empty bucket, and aborts the multipart uploads still open in it.
    pub fn delete_bucket(&self, name: &str) -> Result<(), StoreError> {
        let mut buckets = self.lock();
        let b = buckets.get(name).ok_or(StoreError::NoSuchBucket)?;
        if !b.objects.is_empty() {
            return Err(StoreError::BucketNotEmpty);
        }
        // Renamed away first, so a crash never leaves a half-deleted bucket.
        let gone = self
            .root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        fs::rename(self.root.join(name), &gone)?;
        buckets.remove(name);
        // Its uploads go with it, taken out of the index under the bucket lock: no upload can
        // be started in it meanwhile (create_upload checks the bucket under the same lock).
        let ids: Vec<String> = {
            let mut uploads = self.uploads_lock();
            let ids: Vec<String> = uploads
                .iter()
                .filter(|(_, u)| u.bucket == name)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                uploads.remove(id);
            }
            ids
        };
        drop(buckets);
        let _ = fs::remove_dir_all(&gone);
        for id in ids {
            let _ = self.remove_upload_dir(&id);
        }
        Ok(())
    }

    /// An object's metadata.
    pub fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let buckets = self.lock();
        let b = buckets.get(bucket).ok_or(StoreError::NoSuchBucket)?;
        Ok(b.objects.get(key).cloned())
    }

    /// Opens an object: the file (positioned anywhere) and the metadata read from that same
    /// file, so the two agree even if the key is overwritten meanwhile.
    pub fn open_object(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<(File, ObjectMeta)>, StoreError> {
        if !self.lock().contains_key(bucket) {
            return Err(StoreError::NoSuchBucket);
        }
        let mut f = match File::open(self.object_path(bucket, key)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let meta = read_meta(&mut f)?;
        if meta.key != key {
            return Ok(None);
        }
        Ok(Some((f, meta)))
    }

    /// Makes a sealed temporary file the object `meta.key`.
    pub fn commit(
        &self,
        bucket: &str,
        incarnation: u64,
        mut tmp: TempFile,
        meta: ObjectMeta,
        condition: &Condition,
    ) -> Result<(), StoreError> {
        let path = self.object_path(bucket, &meta.key);
        let dir = path
            .parent()
            .ok_or_else(|| io::Error::other("object path has no parent"))?;
        {
            let mut buckets = self.lock();
            // The very bucket the write was authorized on: not a later one of the same name.
            let b = buckets
                .get_mut(bucket)
                .filter(|b| b.incarnation == incarnation)
                .ok_or(StoreError::NoSuchBucket)?;
            // Checked and replaced under one lock, so two conditional writers cannot both win.
            match (condition, b.objects.get(&meta.key)) {
                (Condition::None, _) => {}
                (Condition::Absent, None) => {}
                (Condition::Absent, Some(_)) => return Err(StoreError::PreconditionFailed),
                (Condition::Matches(_), None) => return Err(StoreError::NoSuchKey),
                (Condition::Matches(etags), Some(old)) => {
                    if !etags
                        .iter()
                        .any(|e| e == "*" || e.trim_matches('"') == old.etag)
                    {
                        return Err(StoreError::PreconditionFailed);
                    }
                }
            }
            fs::create_dir_all(dir)?;
            fs::rename(&tmp.path, &path)?;
            tmp.file = None;
            tmp.path = PathBuf::new();
            b.bytes += meta.size;
            if let Some(old) = b.objects.insert(meta.key.clone(), meta) {
                b.bytes -= old.size;
            }
        }
        // Synced before the write is acknowledged, outside the lock.
        sync_dir(dir)?;
        Ok(())
    }

    /// Copies bytes `range` (inclusive; all when `None`) of an object into a new temporary
    /// file, for CopyObject and UploadPartCopy. Returns the file, the source's metadata, and
    /// the MD5 of what was copied; `None` if the object is gone or shorter than the range.
    /// Blocking.
    pub fn copy_out(
        &self,
        bucket: &str,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<Option<(TempFile, ObjectMeta, String)>, StoreError> {
        let Some((mut src, meta)) = self.open_object(bucket, key)? else {
            return Ok(None);
        };
        let (start, len) = match range {
            None => (0, meta.size),
            Some((a, b)) if a <= b && b < meta.size => (a, b - a + 1),
            Some(_) => return Ok(None),
        };
        src.seek(SeekFrom::Start(start))?;
        let mut tmp = self.temp()?;
        let mut md5 = md5::Md5::new();
        let mut buf = vec![0u8; 1024 * 1024];
        let mut left = len;
        let out = tmp.file()?;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = src.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "object file shorter than its size",
                )
                .into());
            }
            md5.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(Some((tmp, meta, hex::encode(md5.finalize()))))
    }

    /// Seals a temporary file of data with `meta` and makes it the object `meta.key`, if the
    /// object it replaces meets `condition`.
    pub fn put(
        &self,
        bucket: &str,
        incarnation: u64,
        mut tmp: TempFile,
        meta: ObjectMeta,
        condition: &Condition,
    ) -> Result<(), StoreError> {
        seal(tmp.file()?, &meta)?;
        self.commit(bucket, incarnation, tmp, meta, condition)
    }

    /// Seals a temporary file of data with `meta` and makes it part `n` of upload `id`.
    pub fn put_part(
        &self,
        id: &str,
        n: u32,
        mut tmp: TempFile,
        meta: &ObjectMeta,
    ) -> Result<(), StoreError> {
        seal(tmp.file()?, meta)?;
        self.commit_part(id, n, tmp)
    }

    /// Deletes an object; deleting a missing key succeeds, as in S3.
    pub fn delete_object(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        let mut buckets = self.lock();
        let b = buckets.get_mut(bucket).ok_or(StoreError::NoSuchBucket)?;
        if let Some(old) = b.objects.remove(key) {
            b.bytes -= old.size;
            match fs::remove_file(self.object_path(bucket, key)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Lists keys after `after` that start with `prefix`, rolling keys up at `delimiter`, at
    /// most `max` entries (objects and prefixes together).
    pub fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> Result<Listing, StoreError> {
        let buckets = self.lock();
        let b = buckets.get(bucket).ok_or(StoreError::NoSuchBucket)?;
        let mut out = Listing::default();
        let start = match after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a.to_owned()),
            _ => std::ops::Bound::Included(prefix.to_owned()),
        };
        for (key, meta) in b.objects.range((start, std::ops::Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            let rolled = delimiter.filter(|d| !d.is_empty()).and_then(|d| {
                key[prefix.len()..]
                    .find(d)
                    .map(|i| key[..prefix.len() + i + d.len()].to_owned())
            });
            if let Some(cp) = &rolled {
                let seen = out.prefixes.last() == Some(cp)
                    || after.is_some_and(|a| a.starts_with(cp.as_str()));
                if seen {
                    continue;
                }
            }
            if out.objects.len() + out.prefixes.len() >= max {
                out.truncated = true;
                break;
            }
            match rolled {
                Some(cp) => {
                    out.last = Some(cp.clone());
                    out.prefixes.push(cp);
                }
                None => {
                    out.last = Some(key.clone());
                    out.objects.push(meta.clone());
                }
            }
        }
        Ok(out)
    }

    fn upload_dir(&self, id: &str) -> Option<PathBuf> {
        valid_upload_id(id).then(|| self.root.join(".uploads").join(id))
    }

    /// Starts a multipart upload, unless its account already has `max` in progress; returns
    /// its id.
    pub fn create_upload(&self, info: &UploadInfo, max: usize) -> Result<String, StoreError> {
        let id = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        {
            // Reserved under the bucket lock, so DeleteBucket either sees it or comes first.
            let buckets = self.lock();
            if !buckets.contains_key(&info.bucket) {
                return Err(StoreError::NoSuchBucket);
            }
            let mut uploads = self.uploads_lock();
            if uploads
                .values()
                .filter(|u| u.account == info.account)
                .count()
                >= max
            {
                return Err(StoreError::TooManyUploads(max));
            }
            uploads.insert(id.clone(), info.clone());
        }
        let written = (|| -> io::Result<()> {
            let staging = self.root.join(".tmp").join(&id);
            fs::create_dir_all(&staging)?;
            let mut f = File::create(staging.join("upload.json"))?;
            f.write_all(&serde_json::to_vec(info).map_err(io::Error::other)?)?;
            f.sync_all()?;
            fs::rename(&staging, self.root.join(".uploads").join(&id))?;
            sync_dir(&self.root.join(".uploads"))
        })();
        // The bucket may have been deleted while the file was written: then it took the
        // reservation with it, and the upload must not exist.
        let still = self.uploads_lock().contains_key(&id);
        if let Err(e) = written {
            self.uploads_lock().remove(&id);
            let _ = self.remove_upload_dir(&id);
            return Err(e.into());
        }
        if !still {
            let _ = self.remove_upload_dir(&id);
            return Err(StoreError::NoSuchBucket);
        }
        Ok(id)
    }

    /// An upload's description.
    pub fn upload(&self, id: &str) -> Result<UploadInfo, StoreError> {
        self.uploads_lock()
            .get(id)
            .cloned()
            .ok_or(StoreError::NoSuchUpload)
    }

    /// The uploads in progress in `bucket` whose key starts with `prefix`, by key then
    /// initiation time.
    pub fn uploads_in(&self, bucket: &str, prefix: &str) -> Vec<(String, UploadInfo)> {
        let mut out: Vec<_> = self
            .uploads_lock()
            .iter()
            .filter(|(_, u)| u.bucket == bucket && u.key.starts_with(prefix))
            .map(|(id, u)| (id.clone(), u.clone()))
            .collect();
        out.sort_by(|a, b| {
            (&a.1.key, a.1.initiated)
                .partial_cmp(&(&b.1.key, b.1.initiated))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        out
    }

    /// Aborts every upload initiated before `cutoff` (epoch seconds); returns how many.
    pub fn expire_uploads(&self, cutoff: f64) -> usize {
        let old: Vec<String> = self
            .uploads_lock()
            .iter()
            .filter(|(_, u)| u.initiated < cutoff)
            .map(|(id, _)| id.clone())
            .collect();
        old.iter().filter(|id| self.abort(id).is_ok()).count()
    }

    /// Makes a sealed temporary file part `n` of upload `id` (replacing an earlier one).
    pub fn commit_part(&self, id: &str, n: u32, mut tmp: TempFile) -> Result<(), StoreError> {
        let dir = self.upload_dir(id).ok_or(StoreError::NoSuchUpload)?;
        if !self.uploads_lock().contains_key(id) || !dir.join("upload.json").exists() {
            return Err(StoreError::NoSuchUpload);
        }
        fs::rename(&tmp.path, dir.join(n.to_string()))?;
        tmp.file = None;
        tmp.path = PathBuf::new();
        Ok(())
    }

    /// The parts uploaded so far, by number.
    pub fn parts(&self, id: &str) -> Result<BTreeMap<u32, ObjectMeta>, StoreError> {
        let dir = self.upload_dir(id).ok_or(StoreError::NoSuchUpload)?;
        let entries = fs::read_dir(&dir).map_err(|_| StoreError::NoSuchUpload)?;
        let mut out = BTreeMap::new();
        for e in entries.flatten() {
            let Ok(n) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(m) = File::open(e.path()).and_then(|mut f| read_meta(&mut f)) {
                out.insert(n, m);
            }
        }
        Ok(out)
    }

    /// Completes an upload from the listed parts (number, ETag): concatenates them into a new
    /// object, atomically, and removes the upload. Blocking: run it off the async threads.
    pub fn complete(
        &self,
        id: &str,
        incarnation: u64,
        listed: &[(u32, String)],
        now: f64,
        condition: &Condition,
    ) -> Result<ObjectMeta, StoreError> {
        let info = self.upload(id)?;
        let parts = self.parts(id)?;
        if listed.is_empty() {
            return Err(StoreError::InvalidPart(0));
        }
        if listed.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(StoreError::InvalidPartOrder);
        }
        let mut chosen = Vec::with_capacity(listed.len());
        for (i, (n, etag)) in listed.iter().enumerate() {
            let p = parts.get(n).ok_or(StoreError::InvalidPart(*n))?;
            if p.etag != etag.trim_matches('"') {
                return Err(StoreError::InvalidPart(*n));
            }
            if i + 1 < listed.len() && p.size < MIN_PART_SIZE {
                return Err(StoreError::EntityTooSmall);
            }
            chosen.push((*n, p.clone()));
        }
        let dir = self.upload_dir(id).ok_or(StoreError::NoSuchUpload)?;
        let mut tmp = self.temp()?;
        let mut md5s = md5::Md5::new();
        let mut size = 0u64;
        {
            let out = tmp.file()?;
            for (n, p) in &chosen {
                let mut f = File::open(dir.join(n.to_string()))?;
                io::copy(&mut (&mut f).take(p.size), out)?;
                size += p.size;
                md5s.update(hex::decode(&p.etag).map_err(|_| StoreError::InvalidPart(*n))?);
            }
        }
        let meta = ObjectMeta {
            key: info.key.clone(),
            size,
            etag: format!("{}-{}", hex::encode(md5s.finalize()), chosen.len()),
            last_modified: now,
            checksum: None,
            ..info.template
        };
        self.put(&info.bucket, incarnation, tmp, meta.clone(), condition)?;
        self.uploads_lock().remove(id);
        let _ = self.remove_upload_dir(id);
        Ok(meta)
    }

    /// Aborts an upload and frees its parts.
    pub fn abort(&self, id: &str) -> Result<(), StoreError> {
        if self.uploads_lock().remove(id).is_none() {
            return Err(StoreError::NoSuchUpload);
        }
        self.remove_upload_dir(id)?;
        Ok(())
    }

    /// Removes an upload's directory (renamed away first, so a crash never leaves a
    /// half-deleted upload).
    fn remove_upload_dir(&self, id: &str) -> io::Result<()> {
        let Some(dir) = self.upload_dir(id) else {
            return Ok(());
        };
        let gone = self
            .root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        match fs::rename(&dir, &gone) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        sync_dir(&self.root.join(".uploads"))?;
        let _ = fs::remove_dir_all(&gone);
        Ok(())
    }
}

/// A file in `.tmp` that is deleted unless committed.
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// The open file.
    pub fn file(&mut self) -> io::Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("temporary file already committed"))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary file holding `data`, and metadata for it under `key`.
    fn data_file(s: &Store, key: &str, data: &[u8]) -> (TempFile, ObjectMeta) {
        let mut t = s.temp().unwrap();
        t.file().unwrap().write_all(data).unwrap();
        let meta = ObjectMeta {
            key: key.into(),
            size: data.len() as u64,
            etag: hex::encode(md5::Md5::digest(data)),
            last_modified: 1.0,
            content_type: None,
            headers: vec![],
            checksum: None,
        };
        (t, meta)
    }

    fn put(s: &Store, bucket: &str, key: &str, data: &[u8]) -> ObjectMeta {
        let (t, meta) = data_file(s, key, data);
        s.put(bucket, s.inc(bucket), t, meta.clone(), &Condition::None)
            .unwrap();
        meta
    }

    #[test]
    fn bucket_names() {
        for ok in ["abc", "my-bucket.logs", "a1b", &"a".repeat(63)] {
            assert!(valid_bucket_name(ok), "{ok}");
        }
        for bad in [
            "ab",
            &"a".repeat(64),
            "Abc",
            "-ab",
            "ab-",
            "a..b",
            "192.168.1.1",
            "xn--ab",
            "a_b",
            "ab-s3alias",
            "a.-b",
        ] {
            assert!(!valid_bucket_name(bad), "{bad}");
        }
    }

    /// A write authorized on one bucket never lands in a later bucket of the same name, even
    /// of the same owner: the name was deleted and re-created while the body was in flight.
    #[test]
    fn a_write_commits_only_into_the_bucket_it_was_authorized_on() {
        let dir = tempfile_dir();
        let s = Store::open(&dir).unwrap();
        s.create_bucket("bkt", "111", 5.0).unwrap();
        let authorized = s.inc("bkt");
        let (t, meta) = data_file(&s, "k", b"from A");
        s.delete_bucket("bkt").unwrap();
        s.create_bucket("bkt", "222", 6.0).unwrap();
        assert!(matches!(
            s.put("bkt", authorized, t, meta, &Condition::None),
            Err(StoreError::NoSuchBucket)
        ));
        assert!(s.head("bkt", "k").unwrap().is_none(), "nothing landed");
        // The same for a multipart completion.
        let info = UploadInfo {
            bucket: "bkt".into(),
            key: "m".into(),
            account: "222".into(),
            initiated: 1.0,
            template: data_file(&s, "m", b"").1,
        };
        let id = s.create_upload(&info, 1000).unwrap();
        let (t, m) = data_file(&s, "m", b"part");
        s.put_part(&id, 1, t, &m).unwrap();
        assert!(matches!(
            s.complete(
                &id,
                authorized,
                &[(1, m.etag.clone())],
                1.0,
                &Condition::None
            ),
            Err(StoreError::NoSuchBucket)
        ));
        assert!(s.head("bkt", "m").unwrap().is_none());
        // Positive control: the current incarnation takes it.
        s.complete(&id, s.inc("bkt"), &[(1, m.etag)], 1.0, &Condition::None)
            .unwrap();
        assert!(s.head("bkt", "m").unwrap().is_some());
    }

    #[test]
    fn objects_survive_a_reopen_and_temp_files_do_not() {
        let dir = tempfile_dir();
        let s = Store::open(&dir).unwrap();
        s.create_bucket("bkt", "111", 5.0).unwrap();
        assert!(matches!(
            s.create_bucket("bkt", "111", 5.0),
            Err(StoreError::BucketExists { owned: true })
        ));
        assert!(matches!(
            s.create_bucket("bkt", "222", 5.0),
            Err(StoreError::BucketExists { owned: false })
        ));
        let m = put(&s, "bkt", "a/b.txt", b"hello");
        // Conditional writes, decided under the lock.
        let cond = |c: Condition, key: &str| {
            let (t, meta) = data_file(&s, key, b"c");
            s.put("bkt", s.inc("bkt"), t, meta, &c)
        };
        assert!(matches!(
            cond(Condition::Absent, "a/b.txt"),
            Err(StoreError::PreconditionFailed)
        ));
        assert!(matches!(
            cond(Condition::Matches(vec!["\"nope\"".into()]), "a/b.txt"),
            Err(StoreError::PreconditionFailed)
        ));
        assert!(matches!(
            cond(Condition::Matches(vec!["*".into()]), "new"),
            Err(StoreError::NoSuchKey)
        ));
        cond(
            Condition::Matches(vec![format!("\"{}\"", m.etag)]),
            "a/b.txt",
        )
        .unwrap();
        cond(Condition::Absent, "new").unwrap();
        s.delete_object("bkt", "new").unwrap();
        put(&s, "bkt", "a/b.txt", b"hello2");
        // A write cut off before commit.
        let mut t = s.temp().unwrap();
        t.file().unwrap().write_all(b"partial").unwrap();
        std::mem::forget(t);
        drop(s);
        // Debris the store did not write: a stray file among the object directories, a torn
        // object file, an upload directory without its description.
        fs::write(dir.join("bkt/o/stray"), b"x").unwrap();
        fs::create_dir_all(dir.join("bkt/o/zz")).unwrap();
        fs::write(dir.join("bkt/o/zz/torn"), b"no trailer").unwrap();
        fs::create_dir_all(dir.join(".uploads/abc")).unwrap();
        let s = Store::open(&dir).unwrap();
        assert!(s.uploads_in("bkt", "").is_empty());
        assert_eq!(s.totals(), (1, 1, 6));
        assert_eq!(fs::read_dir(dir.join(".tmp")).unwrap().count(), 0);
        let (mut f, meta) = s.open_object("bkt", "a/b.txt").unwrap().unwrap();
        assert_eq!(meta.size, 6);
        assert_ne!(meta.etag, m.etag);
        let mut data = vec![0; 6];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut data).unwrap();
        assert_eq!(data, b"hello2");
        assert!(matches!(
            s.delete_bucket("bkt"),
            Err(StoreError::BucketNotEmpty)
        ));
        s.delete_object("bkt", "a/b.txt").unwrap();
        s.delete_object("bkt", "a/b.txt").unwrap();
        s.delete_bucket("bkt").unwrap();
        assert!(s.bucket_owner("bkt").is_none());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn listing_with_delimiter_and_pages() {
        let dir = tempfile_dir();
        let s = Store::open(&dir).unwrap();
        s.create_bucket("bkt", "1", 0.0).unwrap();
        for k in ["a/1", "a/2", "b", "c/x/1", "c/y", "d"] {
            put(&s, "bkt", k, b"x");
        }
        let l = s.list("bkt", "", Some("/"), None, 1000).unwrap();
        let keys: Vec<_> = l.objects.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["b", "d"]);
        assert_eq!(l.prefixes, ["a/", "c/"]);
        assert!(!l.truncated);
        // Page by two: a/, b | c/, d.
        let p1 = s.list("bkt", "", Some("/"), None, 2).unwrap();
        assert!(p1.truncated);
        assert_eq!(p1.last.as_deref(), Some("b"));
        let p2 = s.list("bkt", "", Some("/"), p1.last.as_deref(), 2).unwrap();
        assert_eq!(p2.prefixes, ["c/"]);
        assert_eq!(p2.objects.len(), 1);
        assert!(!p2.truncated);
        // A page that ends on a prefix resumes after all of it.
        let q1 = s.list("bkt", "", Some("/"), None, 1).unwrap();
        assert_eq!(q1.prefixes, ["a/"]);
        let q2 = s.list("bkt", "", Some("/"), q1.last.as_deref(), 1).unwrap();
        assert_eq!(q2.objects[0].key, "b");
        let c = s.list("bkt", "c/", Some("/"), None, 1000).unwrap();
        assert_eq!(c.prefixes, ["c/x/"]);
        assert_eq!(c.objects[0].key, "c/y");
        assert!(s.list("bkt", "", None, None, 0).unwrap().truncated);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn multipart_rules() {
        let dir = tempfile_dir();
        let s = Store::open(&dir).unwrap();
        s.create_bucket("bkt", "1", 0.0).unwrap();
        let info = UploadInfo {
            bucket: "bkt".into(),
            key: "big".into(),
            account: "1".into(),
            initiated: 0.0,
            template: ObjectMeta {
                key: "big".into(),
                size: 0,
                etag: String::new(),
                last_modified: 0.0,
                content_type: Some("text/plain".into()),
                headers: vec![],
                checksum: None,
            },
        };
        let id = s.create_upload(&info, 1000).unwrap();
        assert!(matches!(
            s.upload("../../etc"),
            Err(StoreError::NoSuchUpload)
        ));
        let part = |n: u32, data: &[u8]| {
            let (t, m) = data_file(&s, "", data);
            s.put_part(&id, n, t, &m).unwrap();
            m.etag
        };
        let small = vec![1u8; (MIN_PART_SIZE - 1) as usize];
        let exact = vec![2u8; MIN_PART_SIZE as usize];
        let e1 = part(1, &small);
        let e2 = part(2, b"tail");
        assert!(matches!(
            s.complete(
                &id,
                s.inc("bkt"),
                &[(1, e1.clone()), (2, e2.clone())],
                1.0,
                &Condition::None
            ),
            Err(StoreError::EntityTooSmall)
        ));
        let e1 = part(1, &exact);
        assert!(matches!(
            s.complete(
                &id,
                s.inc("bkt"),
                &[(2, e2.clone()), (1, e1.clone())],
                1.0,
                &Condition::None
            ),
            Err(StoreError::InvalidPartOrder)
        ));
        assert!(matches!(
            s.complete(&id, s.inc("bkt"), &[(1, e2.clone())], 1.0, &Condition::None),
            Err(StoreError::InvalidPart(1))
        ));
        let m = s
            .complete(
                &id,
                s.inc("bkt"),
                &[(1, format!("\"{e1}\"")), (2, e2)],
                1.0,
                &Condition::None,
            )
            .unwrap();
        assert_eq!(m.size, MIN_PART_SIZE + 4);
        assert!(m.etag.ends_with("-2"));
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
        assert!(matches!(s.upload(&id), Err(StoreError::NoSuchUpload)));
        let (mut f, _) = s.open_object("bkt", "big").unwrap().unwrap();
        let mut data = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        (&mut f).take(m.size).read_to_end(&mut data).unwrap();
        assert_eq!(&data[..MIN_PART_SIZE as usize], &exact[..]);
        assert_eq!(&data[MIN_PART_SIZE as usize..], b"tail");
        let _ = fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sekisho-s3-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Multipart uploads: at most N per account (N+1 refused, others unaffected), indexed in
    /// memory across a reopen, expired by age, and gone with their bucket.
    #[test]
    fn upload_quota_index_and_expiry() {
        let dir = tempfile_dir();
        let s = Store::open(&dir).unwrap();
        s.create_bucket("bkt", "111", 5.0).unwrap();
        let info = |account: &str, key: &str, initiated: f64| UploadInfo {
            bucket: "bkt".into(),
            key: key.into(),
            account: account.into(),
            initiated,
            template: data_file(&s, key, b"").1,
        };
        let old = s.create_upload(&info("111", "a", 1.0), 2).unwrap();
        let new = s.create_upload(&info("111", "b", 100.0), 2).unwrap();
        assert!(matches!(
            s.create_upload(&info("111", "c", 100.0), 2),
            Err(StoreError::TooManyUploads(2))
        ));
        s.create_upload(&info("222", "c", 100.0), 2).unwrap();
        assert_eq!(s.uploads_in("bkt", "").len(), 3);
        assert_eq!(s.uploads_in("bkt", "a").len(), 1);
        drop(s);
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.uploads_in("bkt", "").len(), 3, "indexed again at open");
        assert_eq!(s.expire_uploads(50.0), 1);
        assert!(matches!(s.upload(&old), Err(StoreError::NoSuchUpload)));
        assert!(s.upload(&new).is_ok());
        s.delete_bucket("bkt").unwrap();
        assert!(matches!(s.upload(&new), Err(StoreError::NoSuchUpload)));
        assert!(fs::read_dir(dir.join(".uploads")).unwrap().next().is_none());
    }
}
