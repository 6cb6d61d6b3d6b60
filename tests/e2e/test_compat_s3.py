"""docs/compatibility.md, "The S3-compatible object store": the parts of its rows that
test_s3.py does not assert (bucket names with dots and the certificate, error shapes, SigV2
headers, DeleteObjects' 1,000 keys, DeleteBucket and unfinished uploads, sub-resources that are
not provided), with boto3, requests and hand-made requests."""

import datetime
import hashlib
import socket
import ssl

import boto3
import pytest
import requests
from botocore.auth import HmacV1Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from conftest import Server, unique
from helpers import bucket_name, code


@pytest.fixture(scope="module")
def srv(workdir):
    s = Server(workdir / unique("compat-s3")).start()
    yield s
    s.stop()


def root(s):
    c = s.boto("s3")
    return c, c._request_signer._credentials


def signed(s, method, path, creds, region="us-east-1", data=b""):
    url = f"https://localhost:{s.s3_port}{path}"
    req = AWSRequest(method=method, url=url, data=data, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    SigV4Auth(Credentials(creds.access_key, creds.secret_key), "s3", region).add_auth(req)
    return requests.request(method, url, data=data, headers=dict(req.headers), verify=s.ca, timeout=10)


def signed_at(s, path, creds, when):
    """A GET signed by hand at time `when` (botocore signs only at the current time)."""
    from test_compat_control_plane import signed_get
    url = f"https://localhost:{s.s3_port}{path}"
    empty = hashlib.sha256(b"").hexdigest()
    h = signed_get(url, {"x-amz-content-sha256": empty}, key=creds.access_key, secret=creds.secret_key,
                   service="s3", when=when, signed_headers=("host", "x-amz-content-sha256", "x-amz-date"))
    return requests.get(url, headers=h, verify=s.ca, timeout=10)


def test_bucket_names_with_dots_fail_tls_virtual_hosted(srv):
    """Row "where": the endpoint certificate names s3.<region>.<domain> and *.s3.<region>.<domain>,
    so a bucket name with dots fails TLS virtual-hosted (as on AWS) and works path-style.
    Positive control: a dotless bucket's virtual-hosted name passes certificate verification."""
    s = srv
    c, _ = root(s)
    dotted, plain = bucket_name("a.b"), bucket_name("plain")
    for b in (dotted, plain):
        c.create_bucket(Bucket=b)
    c.put_object(Bucket=dotted, Key="k", Body=b"path-style")
    assert c.get_object(Bucket=dotted, Key="k")["Body"].read() == b"path-style"

    def handshake(name):
        ctx = ssl.create_default_context(cafile=s.ca)
        with socket.create_connection(("127.0.0.1", s.s3_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name):
                return "ok"

    assert handshake(f"{plain}.s3.us-east-1.localhost") == "ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(f"{dotted}.s3.us-east-1.localhost")


def test_error_shapes_and_authentication_codes(srv):
    """Row "errors": S3's XML <Error> with Code, Message and RequestId; HEAD errors carry no body;
    RequestTimeTooSkewed (a time 20 minutes off), AuthorizationHeaderMalformed (another region's
    scope). Positive control: the same request signed now for us-east-1 succeeds."""
    s = srv
    c, creds = root(s)
    b = bucket_name("err")
    c.create_bucket(Bucket=b)
    c.put_object(Bucket=b, Key="there", Body=b"x")
    assert signed(s, "GET", f"/{b}/there", creds).status_code == 200
    r = signed(s, "GET", f"/{b}/missing", creds)
    assert r.status_code == 404 and "<Error>" in r.text, r.text
    for part in ("<Code>NoSuchKey</Code>", "<Message>", "<RequestId>"):
        assert part in r.text, r.text
    r = signed(s, "HEAD", f"/{b}/missing", creds)
    assert r.status_code == 404 and r.content == b""
    now = datetime.datetime.now(datetime.timezone.utc)
    assert signed_at(s, f"/{b}/there", creds, now).status_code == 200, "the hand-made signature is right"
    r = signed_at(s, f"/{b}/there", creds, now - datetime.timedelta(minutes=20))
    assert r.status_code == 403 and "<Code>RequestTimeTooSkewed</Code>" in r.text, r.text
    r = signed(s, "GET", f"/{b}/there", creds, region="eu-west-1")
    assert r.status_code == 400 and "<Code>AuthorizationHeaderMalformed</Code>" in r.text, r.text


def test_sigv2_authorization_header_is_refused(srv):
    """Row "presigned URLs": SigV2 `Authorization: AWS key:signature` headers are refused
    (AccessDenied), although SigV2 presigned URLs work (positive control)."""
    s = srv
    c, creds = root(s)
    b = bucket_name("v2")
    c.create_bucket(Bucket=b)
    c.put_object(Bucket=b, Key="k", Body=b"v2")
    plain = boto3.client("s3", region_name="us-east-1", endpoint_url=f"https://localhost:{s.s3_port}", verify=s.ca,
                         aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key)
    url = plain.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "k"}, ExpiresIn=60)
    assert "Signature=" in url and requests.get(url, verify=s.ca, timeout=10).content == b"v2"
    req = AWSRequest(method="GET", url=f"https://localhost:{s.s3_port}/{b}/k")
    HmacV1Auth(Credentials(creds.access_key, creds.secret_key)).add_auth(req)
    assert req.headers["Authorization"].startswith("AWS ")
    r = requests.get(req.url, headers=dict(req.headers), verify=s.ca, timeout=10)
    assert r.status_code in (400, 403) and r.content != b"v2", r.text
    assert "<Code>" in r.text, r.text


def test_delete_objects_takes_at_most_1000_keys(srv):
    """Row "limits": 1,000 keys per DeleteObjects; 1,001 is MalformedXML and deletes nothing."""
    s = srv
    c, _ = root(s)
    b = bucket_name("del")
    c.create_bucket(Bucket=b)
    c.put_object(Bucket=b, Key="keep", Body=b"x")
    with pytest.raises(ClientError) as e:
        c.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "keep"}] + [{"Key": f"k{i}"} for i in range(1000)]})
    assert code(e.value) == "MalformedXML"
    assert c.head_object(Bucket=b, Key="keep")["ContentLength"] == 1
    out = c.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "keep"}] + [{"Key": f"k{i}"} for i in range(999)]})
    assert len(out["Deleted"]) == 1000
    with pytest.raises(ClientError):
        c.head_object(Bucket=b, Key="keep")


def test_delete_bucket_aborts_unfinished_uploads(srv):
    """Row "DeleteBucket": refused with objects in it (BucketNotEmpty); unfinished multipart uploads
    do not keep it, they are aborted: re-created, the bucket lists no upload, and the old upload id
    is NoSuchUpload."""
    s = srv
    c, _ = root(s)
    b = bucket_name("mpdel")
    c.create_bucket(Bucket=b)
    up = c.create_multipart_upload(Bucket=b, Key="big")["UploadId"]
    c.upload_part(Bucket=b, Key="big", UploadId=up, PartNumber=1, Body=b"part")
    c.put_object(Bucket=b, Key="obj", Body=b"x")
    with pytest.raises(ClientError) as e:
        c.delete_bucket(Bucket=b)
    assert code(e.value) == "BucketNotEmpty"
    c.delete_object(Bucket=b, Key="obj")
    c.delete_bucket(Bucket=b)
    c.create_bucket(Bucket=b)
    assert not c.list_multipart_uploads(Bucket=b).get("Uploads")
    with pytest.raises(ClientError) as e:
        c.list_parts(Bucket=b, Key="big", UploadId=up)
    assert code(e.value) == "NoSuchUpload"


@pytest.mark.parametrize("sub", ["acl", "versioning", "policy", "lifecycle", "website", "object-lock"])
def test_other_sub_resources_are_not_implemented(srv, sub):
    """Row "operations": any other sub-resource is NotImplemented (501), never a different
    operation: GET /<bucket>?<sub> does not list the bucket. Positive control: GET /<bucket> lists."""
    s = srv
    c, creds = root(s)
    b = bucket_name("sub")
    c.create_bucket(Bucket=b)
    c.put_object(Bucket=b, Key="listed", Body=b"x")
    assert "<Key>listed</Key>" in signed(s, "GET", f"/{b}", creds).text
    r = signed(s, "GET", f"/{b}?{sub}", creds)
    assert r.status_code == 501 and "<Code>NotImplemented</Code>" in r.text, r.text
    assert "<Key>listed</Key>" not in r.text
