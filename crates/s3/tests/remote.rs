//! The object store on an S3 backend (decision 0015) against a real SeaweedFS: two stores on
//! one backend stand for two nodes. Buckets (made once, owned, re-created as another
//! incarnation), objects with their metadata, conditional writes decided by the backend,
//! listings as the disk store lists, multipart uploads, and the key-length bound at N and N+1.

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::{Weed, md5_of};
use http_body_util::BodyExt as _;
use sekisho_s3::remote::{MAX_REMOTE_KEY_LEN, RemoteStore};
use sekisho_s3::store::{Condition, MIN_PART_SIZE, ObjectMeta, StoreError, UploadInfo};

/// A file holding `data`, opened for reading from its start.
fn file_of(dir: &std::path::Path, data: &[u8]) -> tokio::fs::File {
    let path = dir.join(format!("{}", uuid::Uuid::new_v4().simple()));
    let mut f = std::fs::File::create(&path).expect("a file");
    f.write_all(data).expect("written");
    tokio::fs::File::from_std(std::fs::File::open(&path).expect("opened"))
}

fn meta(key: &str, data: &[u8]) -> ObjectMeta {
    ObjectMeta {
        key: key.into(),
        size: data.len() as u64,
        etag: hex::encode(md5_of(data)),
        last_modified: 0.0,
        content_type: Some("text/plain".into()),
        headers: vec![
            ("x-amz-meta-note".into(), "caf\u{e9} \u{1f600}".into()),
            ("content-encoding".into(), "identity".into()),
        ],
        checksum: Some(("CRC32".into(), "AAAAAA==".into())),
    }
}

async fn put(
    s: &RemoteStore,
    dir: &std::path::Path,
    bucket: &str,
    inc: u64,
    key: &str,
    data: &[u8],
    cond: &Condition,
) -> Result<(), StoreError> {
    s.put(
        bucket,
        inc,
        file_of(dir, data),
        &meta(key, data),
        md5_of(data),
        cond,
    )
    .await
}

async fn read_all(s: &RemoteStore, bucket: &str, key: &str, range: Option<(u64, u64)>) -> Vec<u8> {
    let head = s.head(bucket, key).await.expect("head").expect("there");
    let body = s
        .read(bucket, key, &head.etag, range)
        .await
        .expect("read")
        .expect("unchanged");
    body.collect().await.expect("its body").to_bytes().to_vec()
}

fn assert_err<T: std::fmt::Debug>(r: Result<T, StoreError>, want: &str) {
    match r {
        Err(e) if format!("{e:?}").starts_with(want) => {}
        other => panic!("wanted {want}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_on_seaweedfs() {
    let weed = Weed::start();
    let backend = weed.ready().await;
    let one = RemoteStore::open(backend.clone()).await.expect("node one");
    let two = RemoteStore::open(backend).await.expect("node two");
    let tmp = tempdir();
    let dir = tmp.as_path();

    // Buckets: made once, owned, seen from the other node.
    one.create_bucket("alpha", "111111111111", 1.0)
        .await
        .expect("create");
    assert_err(
        one.create_bucket("alpha", "111111111111", 2.0).await,
        "BucketExists { owned: true }",
    );
    assert_err(
        two.create_bucket("alpha", "222222222222", 2.0).await,
        "BucketExists { owned: false }",
    );
    let (owner, inc) = two.bucket_ref("alpha").await.expect("read").expect("there");
    assert_eq!(owner, "111111111111");
    let names: Vec<String> = two
        .buckets_of("111111111111")
        .await
        .expect("list")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["alpha"]);
    assert!(
        two.buckets_of("222222222222")
            .await
            .expect("list")
            .is_empty()
    );

    // An object with its metadata, read back on the other node, whole and in part.
    put(
        &one,
        dir,
        "alpha",
        inc,
        "dir/a b",
        b"hello world",
        &Condition::None,
    )
    .await
    .expect("put");
    let head = two
        .head("alpha", "dir/a b")
        .await
        .expect("head")
        .expect("there");
    let want = meta("dir/a b", b"hello world");
    assert_eq!(
        (
            &head.key,
            head.size,
            &head.etag,
            &head.content_type,
            &head.headers,
            &head.checksum
        ),
        (
            &want.key,
            want.size,
            &want.etag,
            &want.content_type,
            &want.headers,
            &want.checksum
        )
    );
    assert!(head.last_modified > 1.7e9);
    assert_eq!(
        read_all(&two, "alpha", "dir/a b", None).await,
        b"hello world"
    );
    assert_eq!(
        read_all(&two, "alpha", "dir/a b", Some((6, 10))).await,
        b"world"
    );
    assert!(
        two.read("alpha", "dir/a b", "0123", None)
            .await
            .expect("read")
            .is_none(),
        "a read of an ETag the object no longer has"
    );
    assert!(two.head("alpha", "missing").await.expect("head").is_none());

    // Conditional writes, decided by the backend.
    assert_err(
        put(&two, dir, "alpha", inc, "dir/a b", b"x", &Condition::Absent).await,
        "PreconditionFailed",
    );
    assert_err(
        put(
            &two,
            dir,
            "alpha",
            inc,
            "dir/a b",
            b"x",
            &Condition::Matches(vec!["0123".into()]),
        )
        .await,
        "PreconditionFailed",
    );
    assert_err(
        put(
            &two,
            dir,
            "alpha",
            inc,
            "nothing",
            b"x",
            &Condition::Matches(vec!["*".into()]),
        )
        .await,
        "NoSuchKey",
    );
    put(
        &two,
        dir,
        "alpha",
        inc,
        "dir/a b",
        b"hello again",
        &Condition::Matches(vec![head.etag.clone()]),
    )
    .await
    .expect("If-Match holds");
    assert_eq!(
        read_all(&one, "alpha", "dir/a b", None).await,
        b"hello again"
    );
    // A write authorized on another incarnation of the name lands nowhere.
    assert_err(
        put(&one, dir, "alpha", inc ^ 1, "stray", b"x", &Condition::None).await,
        "NoSuchBucket",
    );

    // Keys: the backend's prefix counts against its 1,024 bytes (and SeaweedFS keeps at most
    // 255 bytes between two slashes).
    let mut longest = String::new();
    while longest.len() < MAX_REMOTE_KEY_LEN {
        let left = MAX_REMOTE_KEY_LEN - longest.len();
        longest.push_str(&if left > 201 {
            format!("{}/", "k".repeat(200))
        } else {
            "k".repeat(left)
        });
    }
    assert_eq!(longest.len(), MAX_REMOTE_KEY_LEN);
    put(&one, dir, "alpha", inc, &longest, b"l", &Condition::None)
        .await
        .expect("N");
    assert_err(
        put(
            &one,
            dir,
            "alpha",
            inc,
            &format!("{longest}k"),
            b"l",
            &Condition::None,
        )
        .await,
        "KeyTooLong",
    );
    one.delete_object("alpha", &longest).await.expect("delete");
    assert_err(
        put(
            &one,
            dir,
            "alpha",
            inc,
            &"k".repeat(256),
            b"l",
            &Condition::None,
        )
        .await,
        "KeyTooLong",
    );

    // Keys a path could be collapsed out of never reach the backend.
    for bad in ["../../b/alpha", "a/./b", "a//b"] {
        assert_err(
            put(&one, dir, "alpha", inc, bad, b"x", &Condition::None).await,
            "UnsupportedKey",
        );
    }
    let owner_now = two.bucket_ref("alpha").await.expect("read").map(|r| r.0);
    assert_eq!(owner_now.as_deref(), Some("111111111111"));

    // Listings, as the disk store lists: common prefixes, pages that go on past them.
    for k in ["a", "dir/x", "dir/y", "z"] {
        put(&one, dir, "alpha", inc, k, k.as_bytes(), &Condition::None)
            .await
            .expect("put");
    }
    let all = two
        .list("alpha", "", Some("/"), None, 1000)
        .await
        .expect("list");
    let keys: Vec<&str> = all.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(
        (keys, all.prefixes.clone(), all.truncated),
        (vec!["a", "z"], vec!["dir/".to_owned()], false)
    );
    assert_eq!(all.objects[0].etag, hex::encode(md5_of(b"a")));
    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = two
            .list("alpha", "", Some("/"), after.as_deref(), 1)
            .await
            .expect("list");
        walked.extend(page.objects.iter().map(|o| o.key.clone()));
        walked.extend(page.prefixes.iter().cloned());
        if !page.truncated {
            break;
        }
        after = page.last.clone();
        assert!(walked.len() < 10, "{walked:?}");
    }
    assert_eq!(walked, ["a", "dir/", "z"]);
    let inside = two
        .list("alpha", "dir/", None, Some("dir/x"), 10)
        .await
        .expect("list");
    assert_eq!(
        inside
            .objects
            .iter()
            .map(|o| o.key.as_str())
            .collect::<Vec<_>>(),
        ["dir/y"]
    );
    assert!(
        two.list("alpha", "", None, None, 0)
            .await
            .expect("list")
            .objects
            .is_empty()
    );
    // A marker that is not under the prefix (S3 allows any; byte 4 is inside a character).
    let odd = two
        .list("alpha", "dir/", Some("/"), Some("z\u{e9}\u{e9}"), 10)
        .await
        .expect("list");
    assert!(odd.objects.is_empty() && odd.prefixes.is_empty(), "{odd:?}");

    // Multipart: any node goes on with an upload; the account's bound holds.
    let info = |key: &str| UploadInfo {
        bucket: "alpha".into(),
        key: key.into(),
        account: "111111111111".into(),
        initiated: 5.0,
        template: ObjectMeta {
            content_type: Some("application/x-firmware".into()),
            ..meta(key, b"")
        },
    };
    let id = one.create_upload(&info("fw.bin"), 2).await.expect("create");
    let other = two
        .create_upload(&info("fw-small.bin"), 2)
        .await
        .expect("create");
    assert_err(
        one.create_upload(&info("third"), 2).await,
        "TooManyUploads(2)",
    );
    assert_eq!(two.upload(&id).await.expect("upload").key, "fw.bin");
    assert_err(
        two.upload("00000000000000000000000000000000000000000000000g")
            .await,
        "NoSuchUpload",
    );
    let listed: Vec<String> = one
        .uploads_in("alpha", "fw")
        .await
        .expect("uploads")
        .into_iter()
        .map(|(_, u)| u.key)
        .collect();
    assert_eq!(listed, ["fw-small.bin", "fw.bin"]);
    let (p1, p2) = (vec![7u8; MIN_PART_SIZE as usize], b"end".to_vec());
    one.put_part(&id, 1, file_of(dir, &p1), p1.len() as u64, md5_of(&p1))
        .await
        .expect("part 1");
    two.put_part(&id, 2, file_of(dir, &p2), 3, md5_of(&p2))
        .await
        .expect("part 2");
    let parts = one.parts(&id).await.expect("parts");
    assert_eq!(parts.keys().copied().collect::<Vec<_>>(), [1, 2]);
    let (e1, e2) = (parts[&1].etag.clone(), parts[&2].etag.clone());
    assert_err(
        one.complete(
            &id,
            inc,
            &[(1, e1.clone()), (2, "0000".into())],
            9.0,
            &Condition::None,
        )
        .await,
        "InvalidPart(2)",
    );
    assert_err(
        one.complete(
            &id,
            inc,
            &[(2, e2.clone()), (1, e1.clone())],
            9.0,
            &Condition::None,
        )
        .await,
        "InvalidPartOrder",
    );
    assert_err(
        one.complete(
            &id,
            inc ^ 1,
            &[(1, e1.clone()), (2, e2.clone())],
            9.0,
            &Condition::None,
        )
        .await,
        "NoSuchBucket",
    );
    let small = b"tiny".to_vec();
    two.put_part(&other, 1, file_of(dir, &small), 4, md5_of(&small))
        .await
        .expect("part");
    two.put_part(&other, 2, file_of(dir, &small), 4, md5_of(&small))
        .await
        .expect("part");
    let t = hex::encode(md5_of(&small));
    assert_err(
        two.complete(
            &other,
            inc,
            &[(1, t.clone()), (2, t)],
            9.0,
            &Condition::None,
        )
        .await,
        "EntityTooSmall",
    );
    let done = two
        .complete(&id, inc, &[(1, e1), (2, e2)], 9.0, &Condition::None)
        .await
        .expect("complete");
    let mut both = md5_of(&p1);
    both.extend(md5_of(&p2));
    assert_eq!(done.etag, format!("{}-2", hex::encode(md5_of(&both))));
    assert_eq!(done.size, p1.len() as u64 + 3);
    let head = one
        .head("alpha", "fw.bin")
        .await
        .expect("head")
        .expect("there");
    assert_eq!(
        (head.size, head.etag.as_str()),
        (done.size, done.etag.as_str())
    );
    assert_eq!(head.content_type.as_deref(), Some("application/x-firmware"));
    assert_err(one.upload(&id).await, "NoSuchUpload");
    one.abort(&other).await.expect("abort");
    assert_err(two.upload(&other).await, "NoSuchUpload");
    assert!(
        one.uploads_in("alpha", "")
            .await
            .expect("uploads")
            .is_empty()
    );

    // DeleteBucket: only empty; the name made again is another bucket.
    assert_err(two.delete_bucket("alpha").await, "BucketNotEmpty");
    for k in ["a", "dir/x", "dir/y", "z", "dir/a b", "fw.bin"] {
        one.delete_object("alpha", k).await.expect("delete");
    }
    let pending = two
        .create_upload(&info("left"), 2)
        .await
        .expect("an upload left open");
    two.delete_bucket("alpha").await.expect("delete bucket");
    assert_err(one.upload(&pending).await, "NoSuchUpload");
    tokio::time::sleep(Duration::from_millis(1100)).await; // node one's record expires
    assert!(one.bucket_ref("alpha").await.expect("read").is_none());
    assert_err(one.head("alpha", "a").await, "NoSuchBucket");
    two.create_bucket("alpha", "222222222222", 3.0)
        .await
        .expect("made again, by another account");
    let (owner, again) = one.bucket_ref("alpha").await.expect("read").expect("there");
    assert_eq!(owner, "222222222222");
    assert_ne!(again, inc);
    assert_err(
        put(&one, dir, "alpha", inc, "late", b"x", &Condition::None).await,
        "NoSuchBucket",
    );
    assert!(
        one.buckets_of("111111111111")
            .await
            .expect("list")
            .is_empty()
    );
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn as_path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let d = std::env::temp_dir().join(format!("sekisho-remote-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).expect("a directory");
    TempDir(d)
}
