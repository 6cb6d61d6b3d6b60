"""Attacks on the S3-compatible object store (decision 0006), with real clients (boto3, requests,
raw TLS sockets): each test states the hole it probes, does the attack next to a positive
control, and asserts S3's specific answer (status, error Code, and the message where S3's is
fixed).

- Presigned SigV4 URLs must refuse x-amz-* headers that the URL does not sign (S3:
  403 AccessDenied "There were headers present in the request which were not signed"):
  otherwise whoever holds an upload link can turn it into a server-side copy of another object
  (`x-amz-copy-source`) or attach metadata the signer never agreed to.
- A write authorized against a bucket must not land in a different bucket that took the same
  name meanwhile (another account's): a slow PUT whose bucket is deleted and re-created by
  account B must fail (404 NoSuchBucket) and leave B's bucket empty.
- SigV4 presigned URLs need X-Amz-Expires (1..604800); without it S3 answers 400
  AuthorizationQueryParametersError instead of treating the link as valid for 7 days.
- ListMultipartUploads shows an account only its own uploads (regression test).
"""

import hashlib
import hmac
import os
import socket
import ssl
import time
import uuid
from urllib.parse import quote

import boto3
import pytest
import requests
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import Server, unique
from helpers import bucket_name, code, s3_error

MIB = 1024 * 1024
REGION = "us-east-1"
UNSIGNED_HEADERS_MESSAGE = "There were headers present in the request which were not signed"


@pytest.fixture(scope="module")
def srv(workdir):
    s = Server(workdir / unique("s3sec"), accounts=("b",)).start()
    yield s
    s.stop()


def s3(srv, profile="sekisho"):
    """boto3 with the generated profile: path-style, SigV4 (also for presigning)."""
    return srv.boto("s3", profile=profile)


def creds_of(client):
    return client._request_signer._credentials


def status(e):
    return e.response["ResponseMetadata"]["HTTPStatusCode"]


def get_body(client, bucket, key):
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


# --------------------------------------------------------------------------------------------
# 1. Presigned uploads replayed with x-amz-* headers the URL does not sign
# --------------------------------------------------------------------------------------------


@pytest.fixture
def presign_setup(srv):
    """Bucket A with `secret` (unreadable for the link's holder, who has no credentials) and a
    SigV4 presigned PUT for `up/x` made by the account root."""
    root = s3(srv)
    bucket = bucket_name("presign")
    root.create_bucket(Bucket=bucket)
    root.put_object(Bucket=bucket, Key="secret", Body=b"TOP SECRET firmware signing key")
    url = root.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "up/x"}, ExpiresIn=300)
    assert "X-Amz-Credential=" in url and "X-Amz-SignedHeaders=host" in url, url
    # The holder of the link cannot read `secret` on its own.
    r = requests.get(f"https://localhost:{srv.s3_port}/{bucket}/secret", verify=srv.ca, timeout=10)
    assert r.status_code == 403 and s3_error(r.content)[0] == "AccessDenied", r.content
    # Positive control: the link uploads what its holder sends, as intended.
    r = requests.put(url, data=b"control body", verify=srv.ca, timeout=10)
    assert r.status_code == 200, r.content
    assert get_body(root, bucket, "up/x") == b"control body"
    return root, bucket, url


def test_presigned_v4_put_refuses_unsigned_copy_source(srv, presign_setup):
    """A presigned PUT link plus an unsigned `x-amz-copy-source` header must not become a
    server-side CopyObject of an object the holder cannot read (S3 refuses every x-amz-*
    header that a presigned URL does not list in X-Amz-SignedHeaders)."""
    root, bucket, url = presign_setup
    r = requests.put(url, data=b"", headers={"x-amz-copy-source": f"{bucket}/secret"}, verify=srv.ca,
                     timeout=10)
    now = get_body(root, bucket, "up/x")
    assert r.status_code == 403, f"answered {r.status_code} {r.content!r}; up/x now holds {now!r}"
    assert s3_error(r.content) == ("AccessDenied", UNSIGNED_HEADERS_MESSAGE), r.content
    # `up/x` is still what the control uploaded, not a copy of `secret`.
    assert now == b"control body"


def test_presigned_v4_put_refuses_unsigned_metadata(srv, presign_setup):
    """An unsigned `x-amz-meta-*` header on a presigned PUT is refused and nothing of it is
    stored; an unsigned Content-Type (not x-amz-*) is accepted, as by S3."""
    root, bucket, url = presign_setup
    r = requests.put(url, data=b"evil body", headers={"x-amz-meta-evil": "1"}, verify=srv.ca, timeout=10)
    head = root.head_object(Bucket=bucket, Key="up/x")
    assert r.status_code == 403, f"answered {r.status_code} {r.content!r}; stored metadata {head['Metadata']}"
    assert s3_error(r.content) == ("AccessDenied", UNSIGNED_HEADERS_MESSAGE), r.content
    assert "evil" not in head["Metadata"], head["Metadata"]
    assert "x-amz-meta-evil" not in head["ResponseMetadata"]["HTTPHeaders"]
    assert get_body(root, bucket, "up/x") == b"control body"
    # Positive control: headers outside x-amz-* need not be signed on a presigned PUT.
    r = requests.put(url, data=b"typed body", headers={"Content-Type": "text/plain"}, verify=srv.ca, timeout=10)
    assert r.status_code == 200, r.content
    got = root.get_object(Bucket=bucket, Key="up/x")
    assert got["Body"].read() == b"typed body" and got["ContentType"] == "text/plain"


def test_presigned_v2_put_refuses_unsigned_amz_headers(srv):
    """The same replay on a Signature Version 2 presigned PUT (botocore's default for S3).

    In SigV2 every x-amz-* header of the request is part of the string to sign
    (CanonicalizedAmzHeaders), so the server's computed signature differs from the URL's and S3
    answers 403 SignatureDoesNotMatch (not the SigV4-only "headers ... not signed" AccessDenied).
    This already holds; it is kept as a regression test next to the SigV4 ones."""
    root = s3(srv)
    bucket = bucket_name("presign2")
    root.create_bucket(Bucket=bucket)
    root.put_object(Bucket=bucket, Key="secret", Body=b"TOP SECRET")
    c = creds_of(root)
    plain = boto3.client("s3", region_name=REGION, endpoint_url=f"https://localhost:{srv.s3_port}",
                         verify=srv.ca, aws_access_key_id=c.access_key, aws_secret_access_key=c.secret_key)
    url = plain.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "up/x"}, ExpiresIn=300)
    assert "AWSAccessKeyId=" in url and "X-Amz-Credential" not in url, url
    r = requests.put(url, data=b"v2 control", verify=srv.ca, timeout=10)
    assert r.status_code == 200, r.content
    assert get_body(root, bucket, "up/x") == b"v2 control"
    for extra in ({"x-amz-meta-evil": "1"}, {"x-amz-copy-source": f"{bucket}/secret"}):
        r = requests.put(url, data=b"v2 evil", headers=extra, verify=srv.ca, timeout=10)
        assert r.status_code == 403, (extra, r.status_code, r.content)
        assert s3_error(r.content)[0] == "SignatureDoesNotMatch", (extra, r.content)
    head = root.head_object(Bucket=bucket, Key="up/x")
    assert head["Metadata"] == {} and get_body(root, bucket, "up/x") == b"v2 control"


# --------------------------------------------------------------------------------------------
# 2. A write authorized on a bucket that is deleted and re-created by another account
# --------------------------------------------------------------------------------------------


class SlowRequest:
    """One request over a raw TLS socket, signed with botocore's S3SigV4Auth (header auth,
    `x-amz-content-sha256: UNSIGNED-PAYLOAD`), whose body is sent in two steps.

    It asks `Expect: 100-continue` (unsigned, as botocore never signs it): the server answers
    "100 Continue" only once the handler starts reading the body, i.e. after it authenticated
    and authorized the request. That is the synchronization point (no sleeps)."""

    def __init__(self, srv, creds, method, path, query, body):
        self.srv, self.body = srv, body
        self.target = path + (f"?{query}" if query else "")
        req = AWSRequest(method=method, url=f"https://localhost:{srv.s3_port}{self.target}",
                         headers={"Content-Length": str(len(body))})
        req.context["client_config"] = Config(s3={"payload_signing_enabled": False})
        S3SigV4Auth(creds, "s3", REGION).add_auth(req)
        assert req.headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
        self.head = (f"{method} {self.target} HTTP/1.1\r\nHost: localhost:{srv.s3_port}\r\n"
                     + "".join(f"{k}: {v}\r\n" for k, v in req.headers.items())
                     + "Expect: 100-continue\r\n\r\n").encode()
        self.sock = None
        self.buf = b""
        self.final = None

    def _head(self):
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed; received {self.buf!r}")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        st = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        return st, headers

    def _final(self, st, headers):
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        body, self.buf = self.buf[:n], self.buf[n:]
        return st, headers, body

    def start(self, first):
        """Sends the headers, waits until the server reads the body, sends `first` bytes."""
        ctx = ssl.create_default_context(cafile=self.srv.ca)
        raw = socket.create_connection(("127.0.0.1", self.srv.s3_port), timeout=15)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.sock.sendall(self.head)
        st, headers = self._head()
        if st != 100:
            self.final = self._final(st, headers)
            raise AssertionError(f"the server answered before reading the body: {self.final}")
        self.sock.sendall(self.body[:first])
        self.sent = first
        return self

    def finish(self):
        """Sends the rest of the body; returns (status, S3 error code or None, headers, body)."""
        try:
            self.sock.sendall(self.body[self.sent:])
        except OSError:
            pass  # the server may have answered and closed early; its answer is still read
        try:
            while True:
                st, headers = self._head()
                if st >= 200:
                    break
            st, headers, body = self._final(st, headers)
        finally:
            self.sock.close()
        err = s3_error(body)[0] if st >= 300 and body else None
        return st, err, headers, body


def delete_bucket_status(client, bucket):
    """(HTTP status, error code) of DeleteBucket."""
    try:
        r = client.delete_bucket(Bucket=bucket)
        return r["ResponseMetadata"]["HTTPStatusCode"], None
    except ClientError as e:
        return status(e), code(e)


def assert_empty_for_b(b, bucket, key, context=""):
    listed = b.list_objects_v2(Bucket=bucket)
    assert listed["KeyCount"] == 0, f"A's write landed in B's bucket: {listed.get('Contents')} {context}"
    with pytest.raises(ClientError) as e:
        b.get_object(Bucket=bucket, Key=key)
    assert code(e.value) == "NoSuchKey"


def test_slow_put_does_not_land_in_a_bucket_recreated_by_another_account(srv):
    """A authorizes a PUT into its bucket, and while the body is in flight the bucket is
    deleted and B creates one of the same name: the PUT must fail with 404 NoSuchBucket (the
    bucket it was authorized for is gone) and B's bucket must stay empty."""
    a, b = s3(srv), s3(srv, profile="b")
    body = os.urandom(2 * MIB)
    # Positive control: the same slow technique, nothing deleted, stores the object.
    ctl = bucket_name("race-ctl")
    a.create_bucket(Bucket=ctl)
    put = SlowRequest(srv, creds_of(a), "PUT", f"/{ctl}/slow.bin", "", body).start(1024)
    st, err, headers, resp = put.finish()
    assert st == 200, (st, resp)
    assert get_body(a, ctl, "slow.bin") == body

    name = f"race-{uuid.uuid4().hex}"
    a.create_bucket(Bucket=name)
    put = SlowRequest(srv, creds_of(a), "PUT", f"/{name}/slow.bin", "", body).start(1024)
    deleted = delete_bucket_status(a, name)
    print(f"DeleteBucket with a PUT in flight: {deleted}")
    if deleted[0] == 204:
        b.create_bucket(Bucket=name)
        st, err, headers, resp = put.finish()
        # The security property first: nothing of A's arrives in B's bucket.
        assert_empty_for_b(b, name, "slow.bin", f"(A's PUT answered {st} {resp!r})")
        assert (st, err) == (404, "NoSuchBucket"), (st, resp)
    else:
        # A server may instead refuse to delete a bucket with a write in flight (409); then
        # the name stays A's, B cannot take it, and A's PUT completes into A's own bucket.
        assert deleted in ((409, "BucketNotEmpty"), (409, "OperationAborted")), deleted
        with pytest.raises(ClientError) as e:
            b.create_bucket(Bucket=name)
        assert code(e.value) == "BucketAlreadyExists"
        st, err, headers, resp = put.finish()
        assert st == 200, (st, resp)
        assert get_body(a, name, "slow.bin") == body
        assert name not in [x["Name"] for x in b.list_buckets()["Buckets"]]


def complete_xml(parts):
    return ("<CompleteMultipartUpload>" + "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>" for n, etag in parts)
        + "</CompleteMultipartUpload>").encode()


def test_multipart_upload_does_not_land_in_a_bucket_recreated_by_another_account(srv):
    """The multipart variant: A's upload has part 1; an UploadPart and a CompleteMultipartUpload
    are in flight (authorized, bodies pending) when the bucket is deleted and B re-creates the
    name. Neither may write into B's bucket: both in-flight calls end 404 (NoSuchUpload or
    NoSuchBucket), B sees no object and no upload, and A's fresh calls on the name are
    AccessDenied (the bucket is B's now; S3 checks that before the upload id)."""
    a, b = s3(srv), s3(srv, profile="b")
    part1 = os.urandom(5 * MIB)
    part2 = os.urandom(64 * 1024)

    def start(bucket):
        up = a.create_multipart_upload(Bucket=bucket, Key="mp/x")["UploadId"]
        e1 = a.upload_part(Bucket=bucket, Key="mp/x", UploadId=up, PartNumber=1, Body=part1)["ETag"]
        slow_part = SlowRequest(srv, creds_of(a), "PUT", f"/{bucket}/mp/x", f"partNumber=2&uploadId={up}",
                                part2).start(1024)
        return up, e1, slow_part

    # Positive control: the same in-flight part and completion succeed when nothing happens.
    ctl = bucket_name("race-mp-ctl")
    a.create_bucket(Bucket=ctl)
    up, e1, slow_part = start(ctl)
    st, err, headers, resp = slow_part.finish()
    assert st == 200, (st, resp)
    xml = complete_xml([(1, e1), (2, headers["etag"])])
    done = SlowRequest(srv, creds_of(a), "POST", f"/{ctl}/mp/x", f"uploadId={up}", xml).start(10)
    st, err, _, resp = done.finish()
    assert st == 200 and b"<CompleteMultipartUploadResult" in resp, (st, resp)
    assert get_body(a, ctl, "mp/x") == part1 + part2

    name = f"race-{uuid.uuid4().hex}"
    a.create_bucket(Bucket=name)
    up, e1, slow_part = start(name)
    slow_complete = SlowRequest(srv, creds_of(a), "POST", f"/{name}/mp/x", f"uploadId={up}",
                                complete_xml([(1, e1)])).start(10)
    deleted = delete_bucket_status(a, name)
    print(f"DeleteBucket with a multipart upload (and a part, a completion) in flight: {deleted}")
    if deleted[0] == 204:
        b.create_bucket(Bucket=name)
        part_result = slow_part.finish()
        complete_result = slow_complete.finish()
        print(f"in-flight UploadPart: {part_result[:2]}, CompleteMultipartUpload: {complete_result[:2]}")
        assert_empty_for_b(b, name, "mp/x", f"(UploadPart {part_result[:2]}, Complete {complete_result[:2]})")
        assert not b.list_multipart_uploads(Bucket=name).get("Uploads"), "A's upload shows in B's bucket"
        assert part_result[0] == 404 and part_result[1] in ("NoSuchUpload", "NoSuchBucket"), part_result
        assert complete_result[0] == 404 and complete_result[1] in ("NoSuchUpload", "NoSuchBucket"), \
            complete_result
        # Fresh calls by A on the name now address B's bucket: refused before the upload id.
        with pytest.raises(ClientError) as e:
            a.upload_part(Bucket=name, Key="mp/x", UploadId=up, PartNumber=3, Body=b"late")
        assert (status(e.value), code(e.value)) == (403, "AccessDenied")
        with pytest.raises(ClientError) as e:
            a.complete_multipart_upload(Bucket=name, Key="mp/x", UploadId=up,
                                        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}]})
        assert (status(e.value), code(e.value)) == (403, "AccessDenied")
        assert_empty_for_b(b, name, "mp/x")
    else:
        # Refusing to delete a bucket with uploads in progress is also safe: B cannot take the
        # name and A's calls finish in A's own bucket.
        assert deleted in ((409, "BucketNotEmpty"), (409, "OperationAborted")), deleted
        with pytest.raises(ClientError) as e:
            b.create_bucket(Bucket=name)
        assert code(e.value) == "BucketAlreadyExists"
        assert slow_part.finish()[0] == 200
        st, err, _, resp = slow_complete.finish()
        assert st == 200, (st, resp)
        assert get_body(a, name, "mp/x") == part1


# --------------------------------------------------------------------------------------------
# 3. SigV4 presigned URLs without (or with out-of-range) X-Amz-Expires
# --------------------------------------------------------------------------------------------


def presign_v4(srv, creds, bucket, key, expires="60", method="GET"):
    """A SigV4 query-signed URL built by hand (AWS's "Authenticating Requests: Using Query
    Parameters"); `expires=None` leaves X-Amz-Expires out, which botocore never does."""
    now = time.gmtime()
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", now)
    date = amz_date[:8]
    scope = f"{date}/{REGION}/s3/aws4_request"
    host = f"localhost:{srv.s3_port}"
    path = quote(f"/{bucket}/{key}", safe="/-_.~")
    params = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Credential": f"{creds.access_key}/{scope}",
              "X-Amz-Date": amz_date, "X-Amz-SignedHeaders": "host"}
    if expires is not None:
        params["X-Amz-Expires"] = str(expires)
    enc = lambda s: quote(s, safe="-_.~")  # noqa: E731
    query = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(params.items()))
    canonical = "\n".join([method, path, query, f"host:{host}\n", "host", "UNSIGNED-PAYLOAD"])
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + creds.secret_key).encode()
    for part in (date, REGION, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    return f"https://{host}{path}?{query}&X-Amz-Signature={sig}"


def test_presigned_v4_expiry_is_required_and_bounded(srv):
    root = s3(srv)
    bucket = bucket_name("expires")
    root.create_bucket(Bucket=bucket)
    root.put_object(Bucket=bucket, Key="fw.bin", Body=b"firmware")
    creds = creds_of(root)
    # Positive control, and a check of the hand-made signer: X-Amz-Expires=60 is accepted...
    r = requests.get(presign_v4(srv, creds, bucket, "fw.bin", 60), verify=srv.ca, timeout=10)
    assert r.status_code == 200 and r.content == b"firmware", r.content
    # ...and 604800 (7 days, the most) too.
    r = requests.get(presign_v4(srv, creds, bucket, "fw.bin", 604800), verify=srv.ca, timeout=10)
    assert r.status_code == 200 and r.content == b"firmware", r.content
    # Without X-Amz-Expires the URL is not a valid SigV4 query authentication (S3 lists it
    # among the required parameters); it must not be served as a 7-day link.
    r = requests.get(presign_v4(srv, creds, bucket, "fw.bin", None), verify=srv.ca, timeout=10)
    assert r.status_code == 400, (r.status_code, r.content)
    err, msg = s3_error(r.content)
    assert err == "AuthorizationQueryParametersError" and "X-Amz-Expires" in msg, r.content
    # Out of range: one second more than 7 days, and negative.
    for bad in (604801, -1):
        r = requests.get(presign_v4(srv, creds, bucket, "fw.bin", bad), verify=srv.ca, timeout=10)
        assert r.status_code == 400, (bad, r.status_code, r.content)
        assert s3_error(r.content)[0] == "AuthorizationQueryParametersError", (bad, r.content)


# --------------------------------------------------------------------------------------------
# 4. ListMultipartUploads across accounts (regression test: this holds already)
# --------------------------------------------------------------------------------------------


def test_list_multipart_uploads_shows_only_the_accounts_own(srv):
    a, b = s3(srv), s3(srv, profile="b")
    ba, bb = bucket_name("mpu-a"), bucket_name("mpu-b")
    a.create_bucket(Bucket=ba)
    b.create_bucket(Bucket=bb)
    up_a = a.create_multipart_upload(Bucket=ba, Key="shared/key")["UploadId"]
    up_b = b.create_multipart_upload(Bucket=bb, Key="shared/key")["UploadId"]
    # Positive control: each account sees its own upload in its own bucket...
    assert [u["UploadId"] for u in a.list_multipart_uploads(Bucket=ba).get("Uploads", [])] == [up_a]
    # ...and nothing of the other's, with or without a prefix that matches the other's key.
    for kwargs in ({}, {"Prefix": "shared/"}):
        assert [u["UploadId"] for u in b.list_multipart_uploads(Bucket=bb, **kwargs).get("Uploads", [])] == [up_b]
    # B may not list A's bucket at all.
    with pytest.raises(ClientError) as e:
        b.list_multipart_uploads(Bucket=ba)
    assert (status(e.value), code(e.value)) == (403, "AccessDenied")
    with pytest.raises(ClientError) as e:
        b.list_parts(Bucket=ba, Key="shared/key", UploadId=up_a)
    assert (status(e.value), code(e.value)) == (403, "AccessDenied")
    # Nor use A's upload id against B's own bucket.
    with pytest.raises(ClientError) as e:
        b.list_parts(Bucket=bb, Key="shared/key", UploadId=up_a)
    assert (status(e.value), code(e.value)) == (404, "NoSuchUpload")
    a.abort_multipart_upload(Bucket=ba, Key="shared/key", UploadId=up_a)
    b.abort_multipart_upload(Bucket=bb, Key="shared/key", UploadId=up_b)
