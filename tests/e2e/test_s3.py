"""The S3-compatible object store with the stock AWS CLI, boto3 and curl (issue 6): the
"authorizing direct calls" walkthrough with credential-provider credentials, buckets and objects,
listings, ranges, checksums, multipart uploads, presigned URLs, IAM authorization, limits at N and
N+1, and a crash in the middle of an upload."""

import base64
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import boto3
import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import Device, Server, faketime, unique

TRUST_CREDENTIALS = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "credentials.iot.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def srv(workdir):
    s = Server(workdir / unique("s3"), accounts=("tenant-b",)).start()
    yield s
    s.stop()


def code(e):
    return e.response["Error"]["Code"]


def status(e):
    return e.response["ResponseMetadata"]["HTTPStatusCode"]


def s3_client(s, profile="sekisho", **config):
    c = s.boto("s3", profile=profile)
    if config:
        c = boto3.client("s3", region_name="us-east-1", endpoint_url=f"https://localhost:{s.s3_port}", verify=s.ca,
                         config=Config(**config), aws_access_key_id=c._request_signer._credentials.access_key,
                         aws_secret_access_key=c._request_signer._credentials.secret_key)
    return c


def keyed_client(s, creds, **config):
    return boto3.client("s3", region_name="us-east-1", endpoint_url=f"https://localhost:{s.s3_port}", verify=s.ca,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config),
                        **creds)


def cli(s, *args, env=None):
    return subprocess.run(["aws", *args], env=env or s.env, capture_output=True, text=True, timeout=120)


def device_env(s, workdir, c):
    """What a device does with credential-provider credentials: its own AWS config (endpoint,
    CA, path style), and the credentials in the environment."""
    cfg = workdir / unique("device-aws-config")
    cfg.write_text(f"[default]\nregion = us-east-1\nca_bundle = {s.ca}\nservices = dev\ns3 =\n"
                   f"  addressing_style = path\n  signature_version = s3v4\n\n"
                   f"[services dev]\ns3 =\n  endpoint_url = https://localhost:{s.s3_port}\n")
    env = dict(s.env)
    env.update({"AWS_CONFIG_FILE": str(cfg), "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "none"),
                "AWS_ACCESS_KEY_ID": c["accessKeyId"], "AWS_SECRET_ACCESS_KEY": c["secretAccessKey"],
                "AWS_SESSION_TOKEN": c["sessionToken"]})
    return env


def test_walkthrough_device_credentials_download_a_file(srv, workdir):
    """The AWS IoT developer guide's "authorizing direct calls" walkthrough, unchanged but for the
    endpoint: the device's certificate buys credentials of role-s3-read, which may read the file
    but not list the bucket."""
    s = srv
    iot, iam = s.boto(), s.boto("iam")
    bucket = unique("firmware").lower().replace("_", "-")
    assert cli(s, "--profile", "sekisho", "s3", "mb", f"s3://{bucket}").returncode == 0
    src = workdir / unique("hoge.txt")
    src.write_text("hoge hoge\n")
    cp = cli(s, "--profile", "sekisho", "s3", "cp", str(src), f"s3://{bucket}/hoge.txt", "--only-show-errors")
    assert cp.returncode == 0, cp.stderr

    role = iam.create_role(RoleName="role-s3-read", AssumeRolePolicyDocument=json.dumps(TRUST_CREDENTIALS))["Role"]
    iam.put_role_policy(RoleName="role-s3-read", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"},
            # Each device may upload logs into its own folder only.
            {"Effect": "Allow", "Action": "s3:PutObject",
             "Resource": f"arn:aws:s3:::{bucket}/logs/${{credentials-iot:ThingName}}/*"}]}))
    alias = iot.create_role_alias(roleAlias="iot-role-alias-s3-read", roleArn=role["Arn"])
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:AssumeRoleWithCertificate", "Resource": alias["roleAliasArn"]}]}
    dev = Device(s, iot, "test-thing", policy, workdir)
    out = cli(s, "--profile", "sekisho", "--output", "json", "iot", "describe-endpoint", "--endpoint-type",
              "iot:CredentialProvider")
    assert out.returncode == 0, out.stderr
    endpoint = json.loads(out.stdout)["endpointAddress"]
    cp = subprocess.run(["curl", "-s", "--fail-with-body", "--cacert", s.ca, "--cert", str(dev.cert), "--key",
                         str(dev.key), "-H", "x-amzn-iot-thingname: test-thing",
                         f"https://{endpoint}:{s.https_port}/role-aliases/iot-role-alias-s3-read/credentials"],
                        capture_output=True, text=True, timeout=20)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    creds = json.loads(cp.stdout)["credentials"]
    env = device_env(s, workdir, creds)

    dest = workdir / unique("downloaded")
    cp = cli(s, "s3", "cp", f"s3://{bucket}/hoge.txt", str(dest), "--only-show-errors", env=env)
    assert cp.returncode == 0, cp.stderr
    assert dest.read_text() == "hoge hoge\n"
    cp = cli(s, "s3", "ls", f"s3://{bucket}/", env=env)
    assert cp.returncode != 0
    assert "AccessDenied" in cp.stderr and "ListObjectsV2" in cp.stderr, cp.stderr
    assert "s3:ListBucket" in cp.stderr
    # Nor may the role write, but for the device's own log folder.
    cp = cli(s, "s3", "cp", str(src), f"s3://{bucket}/evil.txt", "--only-show-errors", env=env)
    assert cp.returncode != 0 and "AccessDenied" in cp.stderr
    cp = cli(s, "s3", "cp", str(src), f"s3://{bucket}/logs/test-thing/boot.log", "--only-show-errors", env=env)
    assert cp.returncode == 0, cp.stderr
    cp = cli(s, "s3", "cp", str(src), f"s3://{bucket}/logs/other-thing/boot.log", "--only-show-errors", env=env)
    assert cp.returncode != 0 and "AccessDenied" in cp.stderr
    # A link handed out with the device's temporary credentials (session token in the URL).
    cp = cli(s, "s3", "presign", f"s3://{bucket}/hoge.txt", "--expires-in", "300", env=env)
    url = cp.stdout.strip()
    assert "X-Amz-Security-Token" in url, url
    assert subprocess.run(["curl", "-s", "--fail", "--cacert", s.ca, url], capture_output=True, text=True,
                          timeout=20).stdout == "hoge hoge\n"
    # Deactivating the certificate does not revoke credentials already issued (as AWS), but the
    # certificate buys no more.
    iot.update_certificate(certificateId=dev.cert_id, newStatus="INACTIVE")
    cp = subprocess.run(["curl", "-s", "--cacert", s.ca, "--cert", str(dev.cert), "--key", str(dev.key),
                         f"https://{endpoint}:{s.https_port}/role-aliases/iot-role-alias-s3-read/credentials"],
                        capture_output=True, text=True, timeout=20)
    assert cp.returncode != 0


def test_buckets(srv):
    s = srv
    c, other = s3_client(s), s3_client(s, profile="tenant-b")
    name = unique("bkt").lower().replace("_", "-")
    c.create_bucket(Bucket=name)
    assert c.head_bucket(Bucket=name)["ResponseMetadata"]["HTTPHeaders"]["x-amz-bucket-region"] == "us-east-1"
    with pytest.raises(ClientError) as e:
        c.create_bucket(Bucket=name)
    assert code(e.value) == "BucketAlreadyOwnedByYou" and status(e.value) == 409
    # One namespace for all accounts; buckets are private to their account.
    with pytest.raises(ClientError) as e:
        other.create_bucket(Bucket=name)
    assert code(e.value) == "BucketAlreadyExists"
    assert name in [b["Name"] for b in c.list_buckets()["Buckets"]]
    assert name not in [b["Name"] for b in other.list_buckets()["Buckets"]]
    with pytest.raises(ClientError) as e:
        other.head_bucket(Bucket=name)
    assert status(e.value) == 403
    with pytest.raises(ClientError) as e:
        other.list_objects_v2(Bucket=name)
    assert code(e.value) == "AccessDenied"
    assert c.get_bucket_location(Bucket=name)["LocationConstraint"] is None
    with pytest.raises(ClientError) as e:
        c.create_bucket(Bucket=unique("b").lower().replace("_", "-"),
                        CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    assert code(e.value) == "IllegalLocationConstraintException"
    # Names: 63 characters is the longest.
    n63 = ("n" + name)[:50].ljust(63, "x")
    c.create_bucket(Bucket=n63)
    with pytest.raises(ClientError) as e:
        c.create_bucket(Bucket=n63 + "x")
    assert code(e.value) == "InvalidBucketName"
    for bad in ("ab", "Upper-case", "192.168.5.4", "a..b"):
        with pytest.raises(ClientError) as e:
            c.create_bucket(Bucket=bad)
        assert code(e.value) == "InvalidBucketName", bad
    c.put_object(Bucket=name, Key="k", Body=b"x")
    with pytest.raises(ClientError) as e:
        c.delete_bucket(Bucket=name)
    assert code(e.value) == "BucketNotEmpty"
    c.delete_object(Bucket=name, Key="k")
    c.delete_bucket(Bucket=name)
    c.delete_bucket(Bucket=n63)
    with pytest.raises(ClientError) as e:
        c.head_bucket(Bucket=name)
    assert status(e.value) == 404
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=name, Key="k")
    assert code(e.value) == "NoSuchBucket"


@pytest.fixture(scope="module")
def bucket(srv):
    name = unique("data").lower().replace("_", "-")
    s3_client(srv).create_bucket(Bucket=name)
    return name


def test_objects_metadata_ranges_and_keys(srv, bucket):
    c = s3_client(srv)
    body = bytes(range(256)) * 40
    put = c.put_object(Bucket=bucket, Key="dir/blob.bin", Body=body, ContentType="application/x-test",
                       Metadata={"Firmware-Version": "1.2.3"}, CacheControl="no-cache")
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    got = c.get_object(Bucket=bucket, Key="dir/blob.bin")
    assert got["Body"].read() == body
    assert got["ContentType"] == "application/x-test" and got["Metadata"] == {"firmware-version": "1.2.3"}
    assert got["CacheControl"] == "no-cache" and got["ContentLength"] == len(body)
    head = c.head_object(Bucket=bucket, Key="dir/blob.bin")
    assert head["ContentLength"] == len(body) and head["ETag"] == put["ETag"]
    for rng, want in (("bytes=0-9", body[:10]), ("bytes=100-", body[100:]), ("bytes=-7", body[-7:]),
                      (f"bytes={len(body) - 1}-{len(body) + 50}", body[-1:])):
        r = c.get_object(Bucket=bucket, Key="dir/blob.bin", Range=rng)
        assert r["Body"].read() == want, rng
        assert r["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert c.get_object(Bucket=bucket, Key="dir/blob.bin", Range=f"bytes=0-{len(body) - 1}")["ContentRange"] == \
        f"bytes 0-{len(body) - 1}/{len(body)}"
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=bucket, Key="dir/blob.bin", Range=f"bytes={len(body)}-")
    assert code(e.value) == "InvalidRange" and status(e.value) == 416
    # Conditional reads, as s3transfer's ranged downloads send them.
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=bucket, Key="dir/blob.bin", IfMatch='"0000"')
    assert code(e.value) == "PreconditionFailed"
    assert c.get_object(Bucket=bucket, Key="dir/blob.bin", IfMatch=put["ETag"])["ContentLength"] == len(body)
    # Keys: any UTF-8 up to 1024 bytes, stored as given.
    for key in ("a b+c=d&e?f#g", "日本語/ファイル.txt", "../../etc/passwd", "dir//double", "x" * 1024):
        c.put_object(Bucket=bucket, Key=key, Body=key.encode())
        assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode(), key
        c.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="x" * 1025, Body=b"")
    assert code(e.value) == "KeyTooLongError"
    # 5 GiB is the most one PUT may declare; one byte more is refused before any is read.
    assert declared_put(srv, c, bucket, "too-big", 5 * 1024 * MIB + 1) == (400, "EntityTooLarge")
    # User metadata: 2 KB at most.
    c.put_object(Bucket=bucket, Key="meta-ok", Body=b"", Metadata={"m": "v" * 2047})
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="meta-big", Body=b"", Metadata={"m": "v" * 2048})
    assert code(e.value) == "MetadataTooLarge"
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=bucket, Key="missing")
    assert code(e.value) == "NoSuchKey"
    c.delete_object(Bucket=bucket, Key="missing")  # deleting a missing key succeeds
    # Objects belong to the bucket's account: no ACLs but the ones that say so.
    c.put_object(Bucket=bucket, Key="acl", Body=b"", ACL="bucket-owner-full-control")
    for acl in ("public-read", "authenticated-read"):
        with pytest.raises(ClientError) as e:
            c.put_object(Bucket=bucket, Key="acl", Body=b"", ACL=acl)
        assert code(e.value) == "AccessControlListNotSupported"
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="acl", Body=b"", GrantRead='uri="http://acs.amazonaws.com/groups/global/AllUsers"')
    assert code(e.value) == "AccessControlListNotSupported"
    # Encryption: S3's default is accepted; a KMS key is refused rather than ignored.
    c.put_object(Bucket=bucket, Key="sse", Body=b"", ServerSideEncryption="AES256")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="sse", Body=b"", ServerSideEncryption="aws:kms", SSEKMSKeyId="alias/x")
    assert code(e.value) == "NotImplemented"
    # Server-side copies keep the metadata unless told to replace it.
    copied = c.copy_object(Bucket=bucket, Key="dir/copy.bin", CopySource={"Bucket": bucket, "Key": "dir/blob.bin"})
    assert copied["CopyObjectResult"]["ETag"] == put["ETag"]
    got = c.get_object(Bucket=bucket, Key="dir/copy.bin")
    assert got["Body"].read() == body and got["Metadata"] == {"firmware-version": "1.2.3"}
    c.copy_object(Bucket=bucket, Key="dir/copy.bin", CopySource=f"{bucket}/dir/copy.bin",
                  MetadataDirective="REPLACE", Metadata={"v": "2"}, ContentType="text/plain")
    head = c.head_object(Bucket=bucket, Key="dir/copy.bin")
    assert head["Metadata"] == {"v": "2"} and head["ContentType"] == "text/plain"
    with pytest.raises(ClientError) as e:
        c.copy_object(Bucket=bucket, Key="dir/copy.bin", CopySource=f"{bucket}/dir/copy.bin")
    assert code(e.value) == "InvalidRequest"
    with pytest.raises(ClientError) as e:
        c.copy_object(Bucket=bucket, Key="dir/x", CopySource=f"{bucket}/dir/nothing")
    assert code(e.value) == "NoSuchKey"
    # Copies on condition of the source's ETag.
    with pytest.raises(ClientError) as e:
        c.copy_object(Bucket=bucket, Key="dir/x", CopySource=f"{bucket}/dir/blob.bin", CopySourceIfMatch='"0"')
    assert code(e.value) == "PreconditionFailed"
    with pytest.raises(ClientError) as e:
        c.copy_object(Bucket=bucket, Key="dir/x", CopySource=f"{bucket}/dir/blob.bin",
                      CopySourceIfNoneMatch=put["ETag"])
    assert code(e.value) == "PreconditionFailed"
    c.copy_object(Bucket=bucket, Key="dir/x", CopySource=f"{bucket}/dir/blob.bin", CopySourceIfMatch=put["ETag"])
    cp = cli(srv, "--profile", "sekisho", "s3", "mv", f"s3://{bucket}/dir/copy.bin", f"s3://{bucket}/dir/moved.bin",
             "--only-show-errors")
    assert cp.returncode == 0, cp.stderr
    assert c.head_object(Bucket=bucket, Key="dir/moved.bin")["ContentLength"] == len(body)
    # A download link may say how the file is to be saved.
    url = c.generate_presigned_url("get_object", ExpiresIn=60, Params={
        "Bucket": bucket, "Key": "dir/moved.bin", "ResponseContentDisposition": 'attachment; filename="fw.bin"'})
    r = requests.get(url, verify=srv.ca, timeout=10)
    assert r.status_code == 200 and r.headers["content-disposition"] == 'attachment; filename="fw.bin"'


def test_conditional_writes_and_expected_owner(srv, bucket):
    c = s3_client(srv)
    first = c.put_object(Bucket=bucket, Key="cond/x", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="cond/x", Body=b"2", IfNoneMatch="*")
    assert code(e.value) == "PreconditionFailed" and status(e.value) == 412
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="cond/x", Body=b"2", IfMatch='"00000000000000000000000000000000"')
    assert code(e.value) == "PreconditionFailed"
    c.put_object(Bucket=bucket, Key="cond/x", Body=b"2", IfMatch=first["ETag"])
    assert c.get_object(Bucket=bucket, Key="cond/x")["Body"].read() == b"2"
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="cond/none", Body=b"2", IfMatch=first["ETag"])
    assert code(e.value) == "NoSuchKey"
    # Multipart completion honours If-None-Match too.
    up = c.create_multipart_upload(Bucket=bucket, Key="cond/x")["UploadId"]
    etag = c.upload_part(Bucket=bucket, Key="cond/x", UploadId=up, PartNumber=1, Body=b"p")["ETag"]
    with pytest.raises(ClientError) as e:
        c.complete_multipart_upload(Bucket=bucket, Key="cond/x", UploadId=up, IfNoneMatch="*",
                                    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    assert code(e.value) == "PreconditionFailed"
    c.abort_multipart_upload(Bucket=bucket, Key="cond/x", UploadId=up)
    # x-amz-expected-bucket-owner: the request fails unless the bucket is the named account's.
    me = srv.account_id()
    assert c.head_object(Bucket=bucket, Key="cond/x", ExpectedBucketOwner=me)["ContentLength"] == 1
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=bucket, Key="cond/x", ExpectedBucketOwner="111122223333")
    assert code(e.value) == "AccessDenied"


def test_signed_streaming_upload(srv, bucket):
    """`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`, as the Java and Go SDKs send uploads: botocore signs
    the request (the seed signature); the chunk signatures are computed here, apart from the
    server's code, and the body goes over the wire chunk by chunk. A changed byte is refused and
    leaves the object as it was."""
    import hmac
    creds = s3_client(srv)._request_signer._credentials
    data = os.urandom(150_000)
    url = f"https://localhost:{srv.s3_port}/{bucket}/stream/chunked.bin"

    def signed_body(payload):
        req = AWSRequest(method="PUT", url=url, headers={
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "content-encoding": "aws-chunked",
            "x-amz-decoded-content-length": str(len(payload))})
        SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
        amz_date = req.headers["X-Amz-Date"]
        scope = f"{amz_date[:8]}/us-east-1/s3/aws4_request"
        key = ("AWS4" + creds.secret_key).encode()
        for part in (amz_date[:8], "us-east-1", "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        previous = req.headers["Authorization"].rsplit("Signature=", 1)[1]
        body = b""
        pieces = [payload[i:i + 65536] for i in range(0, len(payload), 65536)] + [b""]
        for piece in pieces:
            sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, previous,
                             hashlib.sha256(b"").hexdigest(), hashlib.sha256(piece).hexdigest()])
            previous = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
            body += f"{len(piece):x};chunk-signature={previous}\r\n".encode() + piece + b"\r\n"
        return dict(req.headers), body

    headers, body = signed_body(data)
    r = requests.put(url, data=body, headers=headers, verify=srv.ca, timeout=20)
    assert r.status_code == 200, r.content
    c = s3_client(srv)
    assert c.get_object(Bucket=bucket, Key="stream/chunked.bin")["Body"].read() == data
    headers, body = signed_body(os.urandom(1000))
    tampered = bytearray(body)
    tampered[200] ^= 1
    r = requests.put(url, data=bytes(tampered), headers=headers, verify=srv.ca, timeout=20)
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content, r.content
    assert c.get_object(Bucket=bucket, Key="stream/chunked.bin")["Body"].read() == data


def test_node_aws_sdk(srv):
    """aws-sdk for JavaScript (v2): its own SigV4, payload hashing, managed multipart upload and
    presigned URLs."""
    creds = s3_client(srv)._request_signer._credentials
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=srv.ca, SEKISHO_S3=f"https://localhost:{srv.s3_port}",
               REGION="us-east-1", ACCESS_KEY=creds.access_key, SECRET_KEY=creds.secret_key,
               BUCKET=unique("node").lower().replace("_", "-"))
    cp = subprocess.run(["node", str(Path(__file__).resolve().parent / "node" / "s3_roundtrip.js")], env=env,
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    assert out == {"multipartETag": out["multipartETag"], "bigSame": True, "smallLength": 1024 * 1024,
                   "smallType": "application/x-node", "keys": ["node/big.bin", "node/small.bin"],
                   "presignedStatus": 200, "presignedSame": True, "missing": "NoSuchKey"}, out
    assert out["multipartETag"].endswith('-3"')


def declared_put(srv, c, bucket, key, length):
    """A signed PUT that declares `length` bytes and sends none, over a raw TLS socket."""
    url = f"https://localhost:{srv.s3_port}/{bucket}/{key}"
    req = AWSRequest(method="PUT", url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD",
                                                     "Content-Length": str(length)})
    SigV4Auth(c._request_signer._credentials, "s3", "us-east-1").add_auth(req)
    ctx = ssl.create_default_context(cafile=srv.ca)
    with socket.create_connection(("127.0.0.1", srv.s3_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as t:
            head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items())
            t.sendall(f"PUT /{bucket}/{key} HTTP/1.1\r\nHost: localhost:{srv.s3_port}\r\n{head}\r\n".encode())
            data = b""
            while b"</Error>" not in data:
                chunk = t.recv(65536)
                if not chunk:
                    break
                data += chunk
    err = data.split(b"<Code>", 1)[1].split(b"</Code>", 1)[0].decode() if b"<Code>" in data else ""
    return int(data.split(b" ", 2)[1]), err


def test_listing_pages_prefixes_and_cli(srv, bucket, workdir):
    c = s3_client(srv)
    keys = [f"list/{p}/{i}" for p in ("a", "b") for i in range(3)] + ["list/top1", "list/top2", "list/with space"]
    for k in keys:
        c.put_object(Bucket=bucket, Key=k, Body=b"1")
    pages = list(c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="list/",
                                                             PaginationConfig={"PageSize": 2}))
    assert len(pages) == 5
    assert [o["Key"] for p in pages for o in p.get("Contents", [])] == sorted(keys)
    r = c.list_objects_v2(Bucket=bucket, Prefix="list/", Delimiter="/")
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["list/a/", "list/b/"]
    assert [o["Key"] for o in r["Contents"]] == ["list/top1", "list/top2", "list/with space"]
    assert r["KeyCount"] == 5
    # Pages of a delimited listing never repeat a prefix.
    seen = [x for p in c.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="list/", Delimiter="/", PaginationConfig={"PageSize": 1})
        for x in [q["Prefix"] for q in p.get("CommonPrefixes", [])] + [o["Key"] for o in p.get("Contents", [])]]
    assert seen == ["list/a/", "list/b/", "list/top1", "list/top2", "list/with space"]
    assert c.list_objects_v2(Bucket=bucket, StartAfter="list/top1", Prefix="list/")["KeyCount"] == 2
    # max-keys: 1000 is the most; more is served as 1000; negative is refused.
    assert c.list_objects_v2(Bucket=bucket, MaxKeys=1000)["MaxKeys"] == 1000
    assert c.list_objects_v2(Bucket=bucket, MaxKeys=1001)["MaxKeys"] == 1000
    assert c.list_objects_v2(Bucket=bucket, MaxKeys=0)["KeyCount"] == 0
    with pytest.raises(ClientError) as e:
        s3_client(srv, parameter_validation=False).list_objects_v2(Bucket=bucket, MaxKeys=-1)
    assert code(e.value) == "InvalidArgument"
    with pytest.raises(ClientError) as e:
        c.list_objects_v2(Bucket=bucket, ContinuationToken="!!!")
    assert code(e.value) == "InvalidArgument"
    v1 = c.list_objects(Bucket=bucket, Prefix="list/", MaxKeys=4)
    assert v1["IsTruncated"] and len(v1["Contents"]) == 4
    # The CLI asks for url-encoded keys.
    cp = cli(srv, "--profile", "sekisho", "s3", "ls", f"s3://{bucket}/list/")
    assert cp.returncode == 0, cp.stderr
    assert "PRE a/" in cp.stdout and "with space" in cp.stdout
    cp = cli(srv, "--profile", "sekisho", "s3", "rm", f"s3://{bucket}/list/", "--recursive", "--only-show-errors")
    assert cp.returncode == 0, cp.stderr
    assert c.list_objects_v2(Bucket=bucket, Prefix="list/")["KeyCount"] == 0


def test_integrity_checks(srv, bucket):
    c = s3_client(srv)
    # botocore's default: aws-chunked with a CRC32 trailer; the checksum comes back on request.
    c.put_object(Bucket=bucket, Key="ck/default", Body=b"payload")
    got = c.get_object(Bucket=bucket, Key="ck/default", ChecksumMode="ENABLED")
    assert got["Body"].read() == b"payload"
    for alg in ("CRC32", "CRC32C", "SHA1", "SHA256"):
        put = c.put_object(Bucket=bucket, Key=f"ck/{alg}", Body=b"data " * 1000, ChecksumAlgorithm=alg)
        assert put[f"Checksum{alg}"]
        assert c.head_object(Bucket=bucket, Key=f"ck/{alg}", ChecksumMode="ENABLED")[f"Checksum{alg}"] == \
            put[f"Checksum{alg}"]
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="ck/bad", Body=b"data", ChecksumCRC32="AAAAAA==")
    assert code(e.value) == "BadDigest"
    good_md5 = base64.b64encode(hashlib.md5(b"data").digest()).decode()
    c.put_object(Bucket=bucket, Key="ck/md5", Body=b"data", ContentMD5=good_md5)
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="ck/md5", Body=b"datX", ContentMD5=good_md5)
    assert code(e.value) == "BadDigest"
    # A signed payload hash (payload signing on) works; a body that differs from it is refused.
    signed = s3_client(srv, s3={"addressing_style": "path", "payload_signing_enabled": True},
                       request_checksum_calculation="when_required")
    signed.put_object(Bucket=bucket, Key="ck/signed", Body=b"signed body")
    creds = c._request_signer._credentials
    url = f"https://localhost:{srv.s3_port}/{bucket}/ck/tampered"
    req = AWSRequest(method="PUT", url=url, data=b"original",
                     headers={"x-amz-content-sha256": hashlib.sha256(b"original").hexdigest()})
    SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
    prepared = req.prepare()
    r = requests.put(url, data=b"tampered", headers=dict(prepared.headers), verify=srv.ca, timeout=10)
    assert r.status_code == 400 and b"XAmzContentSHA256Mismatch" in r.content, r.content
    with pytest.raises(ClientError) as e:
        c.head_object(Bucket=bucket, Key="ck/tampered")
    assert status(e.value) == 404
    # One checksum per request.
    req = AWSRequest(method="PUT", url=f"https://localhost:{srv.s3_port}/{bucket}/ck/two", data=b"x", headers={
        "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-checksum-crc32": "jNwWgw==",
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(b"x").digest()).decode()})
    SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
    r = requests.put(req.url, data=b"x", headers=dict(req.prepare().headers), verify=srv.ca, timeout=10)
    assert r.status_code == 400 and b"Multiple checksum" in r.content, r.content
    # Anonymous requests are refused in S3's XML.
    r = requests.get(f"https://localhost:{srv.s3_port}/{bucket}/ck/default", verify=srv.ca, timeout=10)
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content
    # Unsupported sub-resources say so instead of doing something else.
    with pytest.raises(ClientError) as e:
        c.get_object_tagging(Bucket=bucket, Key="ck/default")
    assert code(e.value) == "NotImplemented"


def test_multipart_rules(srv, bucket):
    c = s3_client(srv)
    up = c.create_multipart_upload(Bucket=bucket, Key="mp/obj", ContentType="application/x-fw")["UploadId"]
    p5 = os.urandom(5 * MIB)
    e1 = c.upload_part(Bucket=bucket, Key="mp/obj", UploadId=up, PartNumber=1, Body=p5[:-1])["ETag"]
    e2 = c.upload_part(Bucket=bucket, Key="mp/obj", UploadId=up, PartNumber=2, Body=b"tail")["ETag"]
    with pytest.raises(ClientError) as e:
        c.complete_multipart_upload(Bucket=bucket, Key="mp/obj", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    assert code(e.value) == "EntityTooSmall"
    e1 = c.upload_part(Bucket=bucket, Key="mp/obj", UploadId=up, PartNumber=1, Body=p5)["ETag"]
    # Part numbers run 1..10000.
    c.upload_part(Bucket=bucket, Key="mp/obj", UploadId=up, PartNumber=10000, Body=b"last")
    with pytest.raises(ClientError) as e:
        c.upload_part(Bucket=bucket, Key="mp/obj", UploadId=up, PartNumber=10001, Body=b"x")
    assert code(e.value) == "InvalidArgument"
    assert [p["PartNumber"] for p in c.list_parts(Bucket=bucket, Key="mp/obj", UploadId=up)["Parts"]] == \
        [1, 2, 10000]
    assert up in [u["UploadId"] for u in c.list_multipart_uploads(Bucket=bucket)["Uploads"]]
    with pytest.raises(ClientError) as e:
        c.complete_multipart_upload(Bucket=bucket, Key="mp/obj", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}]})
    assert code(e.value) == "InvalidPartOrder"
    with pytest.raises(ClientError) as e:
        c.complete_multipart_upload(Bucket=bucket, Key="mp/obj", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": e2}, {"PartNumber": 2, "ETag": e2}]})
    assert code(e.value) == "InvalidPart"
    done = c.complete_multipart_upload(Bucket=bucket, Key="mp/obj", UploadId=up, MultipartUpload={
        "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    assert done["ETag"].endswith('-2"')
    got = c.get_object(Bucket=bucket, Key="mp/obj")
    assert got["Body"].read() == p5 + b"tail" and got["ContentType"] == "application/x-fw"
    with pytest.raises(ClientError) as e:
        c.upload_part(Bucket=bucket, Key="mp/obj", UploadId=up, PartNumber=3, Body=b"late")
    assert code(e.value) == "NoSuchUpload"
    up2 = c.create_multipart_upload(Bucket=bucket, Key="mp/aborted")["UploadId"]
    c.upload_part(Bucket=bucket, Key="mp/aborted", UploadId=up2, PartNumber=1, Body=b"x")
    c.abort_multipart_upload(Bucket=bucket, Key="mp/aborted", UploadId=up2)
    with pytest.raises(ClientError) as e:
        c.list_parts(Bucket=bucket, Key="mp/aborted", UploadId=up2)
    assert code(e.value) == "NoSuchUpload"
    with pytest.raises(ClientError) as e:
        c.list_parts(Bucket=bucket, Key="mp/obj", UploadId="../../../etc")
    assert code(e.value) == "NoSuchUpload"


def test_100_mb_with_the_cli(srv, bucket, workdir):
    src, back = workdir / unique("big"), workdir / unique("big-back")
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(MIB))
    cp = cli(srv, "--profile", "sekisho", "s3", "cp", str(src), f"s3://{bucket}/big/firmware.bin", "--only-show-errors")
    assert cp.returncode == 0, cp.stderr
    head = s3_client(srv).head_object(Bucket=bucket, Key="big/firmware.bin")
    assert head["ContentLength"] == 100 * MIB and head["ETag"].endswith('-13"')  # 8 MiB parts
    cp = cli(srv, "--profile", "sekisho", "s3", "cp", f"s3://{bucket}/big/firmware.bin", str(back), "--only-show-errors")
    assert cp.returncode == 0, cp.stderr
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    # A server-side copy of that size goes part by part (UploadPartCopy with ranges).
    cp = cli(srv, "--profile", "sekisho", "s3", "cp", f"s3://{bucket}/big/firmware.bin",
             f"s3://{bucket}/big/copy.bin", "--only-show-errors")
    assert cp.returncode == 0, cp.stderr
    h = hashlib.sha256()
    for chunk in s3_client(srv).get_object(Bucket=bucket, Key="big/copy.bin")["Body"].iter_chunks(MIB):
        h.update(chunk)
    assert h.digest() == hashlib.sha256(src.read_bytes()).digest()
    # The store's size is on /metrics.
    metrics = requests.get(f"https://localhost:{srv.api_port}/metrics", verify=srv.ca, timeout=10).text
    sizes = {line.split()[0]: int(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("sekisho_s3_")}
    assert sizes["sekisho_s3_bytes"] >= 200 * MIB and sizes["sekisho_s3_objects"] >= 2, sizes
    assert sizes["sekisho_s3_buckets"] >= 1
    src.unlink()
    back.unlink()


def test_presigned_urls(srv, bucket):
    c = s3_client(srv)
    c.put_object(Bucket=bucket, Key="pre/file.txt", Body=b"presigned")
    cp = cli(srv, "--profile", "sekisho", "s3", "presign", f"s3://{bucket}/pre/file.txt", "--expires-in", "60")
    url = cp.stdout.strip()
    r = requests.get(url, verify=srv.ca, timeout=10)
    assert r.status_code == 200 and r.content == b"presigned"
    # Tampering with the key or the expiry breaks the signature.
    r = requests.get(url.replace("file.txt", "other.txt"), verify=srv.ca, timeout=10)
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    r = requests.get(url.replace("X-Amz-Expires=60", "X-Amz-Expires=600"), verify=srv.ca, timeout=10)
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    short = c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "pre/file.txt"}, ExpiresIn=1)
    time.sleep(2.1)
    r = requests.get(short, verify=srv.ca, timeout=10)
    assert r.status_code == 403 and b"Request has expired" in r.content
    # botocore's default for S3 presigned URLs is still Signature Version 2.
    creds = c._request_signer._credentials
    plain = boto3.client("s3", region_name="us-east-1", endpoint_url=f"https://localhost:{srv.s3_port}",
                         verify=srv.ca, aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key)
    v2 = plain.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "pre/file.txt"}, ExpiresIn=60)
    assert "AWSAccessKeyId=" in v2 and "X-Amz-Credential" not in v2
    r = requests.get(v2, verify=srv.ca, timeout=10)
    assert r.status_code == 200 and r.content == b"presigned"
    r = requests.get(v2.replace("file.txt", "other.txt"), verify=srv.ca, timeout=10)
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    # A presigned upload.
    up = c.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "pre/uploaded"}, ExpiresIn=60)
    assert requests.put(up, data=b"via url", verify=srv.ca, timeout=10).status_code == 200
    assert c.get_object(Bucket=bucket, Key="pre/uploaded")["Body"].read() == b"via url"


def test_virtual_hosted_addressing(srv, bucket, monkeypatch):
    """`<bucket>.s3.us-east-1.localhost`: the endpoint certificate covers it; this machine has no
    DNS for it, so the name is resolved to loopback here, in the client process only."""
    real = socket.getaddrinfo

    def resolve(host, *a, **k):
        if isinstance(host, str) and host.endswith(".localhost"):
            host = "127.0.0.1"
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    root = s3_client(srv)
    creds = root._request_signer._credentials
    v = boto3.client("s3", region_name="us-east-1", endpoint_url=f"https://s3.us-east-1.localhost:{srv.s3_port}",
                     verify=srv.ca, config=Config(s3={"addressing_style": "virtual"}),
                     aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key)
    v.put_object(Bucket=bucket, Key="vhost/a.txt", Body=b"virtual")
    assert root.get_object(Bucket=bucket, Key="vhost/a.txt")["Body"].read() == b"virtual"
    assert v.list_objects_v2(Bucket=bucket, Prefix="vhost/")["Contents"][0]["Key"] == "vhost/a.txt"
    url = v.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "vhost/a.txt"}, ExpiresIn=60)
    assert url.startswith(f"https://{bucket}.s3.us-east-1.localhost:")
    cp = subprocess.run(["curl", "-s", "--fail", "--cacert", srv.ca, "--resolve",
                         f"{bucket}.s3.us-east-1.localhost:{srv.s3_port}:127.0.0.1", url],
                        capture_output=True, text=True, timeout=20)
    assert cp.stdout == "virtual", cp.stderr


def test_iam_policies_decide(srv, bucket):
    """Users get exactly what their policies say, with S3's condition keys, and learn that a key
    is missing only if they may list the bucket."""
    iam = srv.boto("iam")
    user = unique("s3user")
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": f"arn:aws:s3:::{bucket}/public/*"},
            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
             "Condition": {"StringLike": {"s3:prefix": "public/*"}}},
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/public/locked/*"}]}))
    k = iam.create_access_key(UserName=user)["AccessKey"]
    u = keyed_client(srv, {"aws_access_key_id": k["AccessKeyId"], "aws_secret_access_key": k["SecretAccessKey"]})
    root = s3_client(srv)
    root.put_object(Bucket=bucket, Key="private/secret", Body=b"s")
    u.put_object(Bucket=bucket, Key="public/readme", Body=b"r")
    assert u.get_object(Bucket=bucket, Key="public/readme")["Body"].read() == b"r"
    for call in (lambda: u.get_object(Bucket=bucket, Key="private/secret"),
                 lambda: u.put_object(Bucket=bucket, Key="private/x", Body=b""),
                 lambda: u.put_object(Bucket=bucket, Key="public/locked/x", Body=b""),
                 lambda: u.list_objects_v2(Bucket=bucket),
                 lambda: u.list_objects_v2(Bucket=bucket, Prefix="private/"),
                 lambda: u.delete_object(Bucket=bucket, Key="public/readme"),
                 lambda: u.list_buckets()):
        with pytest.raises(ClientError) as e:
            call()
        assert code(e.value) == "AccessDenied"
    assert u.list_objects_v2(Bucket=bucket, Prefix="public/")["KeyCount"] == 1
    # A missing key: NoSuchKey only for callers who may list the bucket; this user's ListBucket
    # needs an s3:prefix, which a GetObject does not carry, so it is told AccessDenied (as S3).
    with pytest.raises(ClientError) as e:
        u.get_object(Bucket=bucket, Key="public/missing")
    assert code(e.value) == "AccessDenied"
    with pytest.raises(ClientError) as e:
        root.get_object(Bucket=bucket, Key="public/missing")
    assert code(e.value) == "NoSuchKey"
    # Wrong secret, unknown key: S3's own codes.
    bad = keyed_client(srv, {"aws_access_key_id": k["AccessKeyId"], "aws_secret_access_key": "wrong"})
    with pytest.raises(ClientError) as e:
        bad.get_object(Bucket=bucket, Key="public/readme")
    assert code(e.value) == "SignatureDoesNotMatch"
    unknown = keyed_client(srv, {"aws_access_key_id": "AKIAUNKNOWNUNKNOWN00", "aws_secret_access_key": "x"})
    with pytest.raises(ClientError) as e:
        unknown.list_buckets()
    assert code(e.value) == "InvalidAccessKeyId"


def test_crash_mid_upload_leaves_nothing_visible(workdir):
    s = Server(workdir / unique("s3crash")).start()
    try:
        c = s3_client(s)
        c.create_bucket(Bucket="crashme")
        c.put_object(Bucket="crashme", Key="firmware.bin", Body=b"version 1")
        src = workdir / unique("crash-src")
        with open(src, "wb") as f:
            for _ in range(60):
                f.write(os.urandom(MIB))
        # A single PUT streamed slowly, and a multipart upload, both cut off by SIGKILL.
        slow = subprocess.Popen(["curl", "-s", "--cacert", s.ca, "-T", "-", "--limit-rate", "2M",
                                 "--aws-sigv4", "aws:amz:us-east-1:s3", "--user",
                                 f"{c._request_signer._credentials.access_key}:{c._request_signer._credentials.secret_key}",
                                 "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                                 f"https://localhost:{s.s3_port}/crashme/firmware.bin"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        multi = subprocess.Popen(["aws", "--profile", "sekisho", "s3", "cp", str(src), "s3://crashme/big.bin",
                                  "--only-show-errors"], env=s.env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        tmp = s.data_dir / "s3" / ".tmp"
        deadline = time.time() + 30
        slow.stdin.write(b"version 2 " * 100_000)
        slow.stdin.flush()
        while time.time() < deadline and len(list(tmp.iterdir())) < 2:
            time.sleep(0.05)
        # Both uploads in flight: the PUT's file and at least one part's.
        assert len(list(tmp.iterdir())) >= 2, "the uploads were not both in flight"
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait()
        for p in (slow, multi):
            try:
                p.kill()
            except OSError:
                pass
            p.wait()
        s.log.close()
        s.start()
        c = s3_client(s)
        assert c.get_object(Bucket="crashme", Key="firmware.bin")["Body"].read() == b"version 1"
        assert [o["Key"] for o in c.list_objects_v2(Bucket="crashme")["Contents"]] == ["firmware.bin"]
        with pytest.raises(ClientError) as e:
            c.head_object(Bucket="crashme", Key="big.bin")
        assert status(e.value) == 404
        assert list(tmp.iterdir()) == []
        # The unfinished multipart upload is still listed, and can be aborted.
        uploads = c.list_multipart_uploads(Bucket="crashme").get("Uploads", [])
        assert [u["Key"] for u in uploads] == ["big.bin"], uploads
        for u in uploads:
            c.abort_multipart_upload(Bucket="crashme", Key=u["Key"], UploadId=u["UploadId"])
        assert not c.list_multipart_uploads(Bucket="crashme").get("Uploads")
        src.unlink()
    finally:
        s.stop()


def test_expired_credentials_are_refused(workdir):
    """Credential-provider credentials stop working at their expiry (15 minutes at the least).
    Instead of waiting, the server and the AWS CLI are both moved 20 minutes into the future
    with libfaketime; the account's long-term key still works there, so the refusal is the
    expiry, not the clock."""
    s = Server(workdir / unique("s3expiry")).start()
    try:
        iot, iam = s.boto(), s.boto("iam")
        s3_client(s).create_bucket(Bucket="expiry")
        s3_client(s).put_object(Bucket="expiry", Key="fw.bin", Body=b"firmware")
        role = iam.create_role(RoleName="reader", AssumeRolePolicyDocument=json.dumps(TRUST_CREDENTIALS))["Role"]
        iam.put_role_policy(RoleName="reader", PolicyName="read", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::expiry/*"}]}))
        alias = iot.create_role_alias(roleAlias="reader", roleArn=role["Arn"], credentialDurationSeconds=900)
        dev = Device(s, iot, "expiring-thing", {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:AssumeRoleWithCertificate", "Resource": alias["roleAliasArn"]}]},
            workdir)
        endpoint = iot.describe_endpoint(endpointType="iot:CredentialProvider")["endpointAddress"]
        cp = subprocess.run(["curl", "-s", "--fail", "--cacert", s.ca, "--cert", str(dev.cert), "--key",
                             str(dev.key), f"https://{endpoint}:{s.https_port}/role-aliases/reader/credentials"],
                            capture_output=True, text=True, timeout=20)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        env = device_env(s, workdir, json.loads(cp.stdout)["credentials"])
        now = cli(s, "s3", "cp", "s3://expiry/fw.bin", "-", env=env)
        assert now.returncode == 0 and now.stdout == "firmware", now.stderr

        s.stop()
        future = faketime("+20m")
        s.start(wrapper=future)
        later = subprocess.run([*future, "aws", "s3api", "get-object", "--bucket", "expiry", "--key", "fw.bin",
                                str(workdir / unique("expired-get"))], env=env, capture_output=True, text=True,
                               timeout=120)
        assert later.returncode != 0 and "(ExpiredToken)" in later.stderr, later.stdout + later.stderr
        # `aws s3 cp` asks HeadObject first: the same 400, without a body (HEAD), as S3 answers.
        later = subprocess.run([*future, "aws", "s3", "cp", "s3://expiry/fw.bin", "-"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert later.returncode != 0 and "(400)" in later.stderr, later.stdout + later.stderr
        root = subprocess.run([*future, "aws", "--profile", "sekisho", "s3", "cp", "s3://expiry/fw.bin", "-"],
                              env=s.env, capture_output=True, text=True, timeout=120)
        assert root.returncode == 0 and root.stdout == "firmware", root.stderr
    finally:
        s.stop()
