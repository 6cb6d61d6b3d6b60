"""Findings of a security review, each turned into an attack next to a positive control, with
real clients (boto3, botocore's signers, awsiotsdk, paho-mqtt, http.client, raw TLS where the
attack needs bytes no client sends), asserting AWS's specific refusal:

1. IAM service condition keys (`iam:PolicyARN`) are evaluated, not ignored.
2. One IAM policy, one decision on every surface: the global condition keys (aws:SourceIp,
   aws:username, aws:SecureTransport, aws:CurrentTime, aws:EpochTime, aws:userid,
   aws:PrincipalArn, aws:RequestedRegion) decide the same on the control plane, iot-data over
   HTTPS, MQTT over WebSocket (iot:Connect included) and S3.
3. A SigV2 presigned URL signs every value of each x-amz-* header: a duplicated header is a
   different request (SignatureDoesNotMatch).
4. A delayed will is authorized again when it fires: not published once its certificate is
   revoked during the delay.
5. WebSocket credentials are checked again at MQTT CONNECT, not only at the upgrade.
6. REVOKED is final: UpdateCertificate cannot bring a revoked certificate back.
7. Principal ARNs carry the IAM path; trust policies name a principal by its unique id (a
   re-created user of the same name is someone else); an IAM path must be /.../.
8. S3 DeleteObjects by another account is refused on its headers, before its body is read.
"""

import base64
import hashlib
import http.client
import json
import os
import queue
import socket
import ssl
import struct
import time
import uuid

import boto3
import pytest
from botocore.auth import HmacV1QueryAuth, S3SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import ALLOW_ALL, Device, Paho, Server, unique
from helpers import allow, code, doc, drain_for, keys, outcome, s16, s3_error, varint, wait_for

REGION = "us-east-1"


@pytest.fixture(scope="module")
def rv(workdir):
    """One server for the whole file, with a second account `b` (profile "b")."""
    s = Server(workdir / unique("review"), accounts=("b",)).start()
    yield s
    s.stop()


# --- helpers ---------------------------------------------------------------------------------

def client(server, service, creds, endpoint_url=None):
    """boto3 with explicit credentials: control plane (iot, iam, sts), or `endpoint_url`."""
    return boto3.client(service, region_name=REGION,
                        endpoint_url=endpoint_url or f"https://localhost:{server.api_port}", verify=server.ca,
                        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}), **creds)


def s3_client(server, creds):
    return client(server, "s3", creds, f"https://localhost:{server.s3_port}")


def data_client(server, creds):
    return client(server, "iot-data", creds, f"https://{server.endpoint()}:{server.https_port}")


def root_creds(server, profile="sekisho"):
    c = server.boto("sts", profile=profile)._request_signer._credentials
    return {"aws_access_key_id": c.access_key, "aws_secret_access_key": c.secret_key}


def account_of(server, profile="sekisho"):
    return server.boto("sts", profile=profile).get_caller_identity()["Account"]


def deny(action, resource="*", **extra):
    return {"Effect": "Deny", "Action": action, "Resource": resource, **extra}


def make_user(server, policy=None, name=None, path=None, profile="sekisho"):
    """An IAM user with an inline policy and an access key: (name, boto3 credential kwargs, key id)."""
    iam = server.boto("iam", profile=profile)
    name = name or unique("u")
    iam.create_user(UserName=name, **({"Path": path} if path else {}))
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=policy)
    k = iam.create_access_key(UserName=name)["AccessKey"]
    return name, keys(k), k["AccessKeyId"]


def delete_user(server, name, profile="sekisho"):
    iam = server.boto("iam", profile=profile)
    for p in iam.list_user_policies(UserName=name)["PolicyNames"]:
        iam.delete_user_policy(UserName=name, PolicyName=p)
    for k in iam.list_access_keys(UserName=name)["AccessKeyMetadata"]:
        iam.delete_access_key(UserName=name, AccessKeyId=k["AccessKeyId"])
    iam.delete_user(UserName=name)


def tls_socket(server, port, host, cert=None, key=None, timeout=10):
    ctx = ssl.create_default_context(cafile=server.ca)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(sock, server_hostname=host)



# --- raw MQTT ---------------------------------------------------------------------------------

def mqtt_connect(client_id, v5, keepalive=60):
    """A clean CONNECT, MQTT 5 (no properties) or 3.1.1."""
    body = s16(b"MQTT") + bytes([5 if v5 else 4, 0x02]) + struct.pack(">H", keepalive)
    if v5:
        body += b"\x00"
    body += s16(client_id.encode())
    return bytes([0x10]) + varint(len(body)) + body


def read_mqtt(sock, timeout=5.0):
    """One MQTT packet from a TLS socket: (first byte, body); None on EOF, reset or TLS alert
    (the error text is in `read_mqtt.error`)."""
    sock.settimeout(timeout)
    read_mqtt.error = None

    def exact(n):
        out = b""
        while len(out) < n:
            try:
                chunk = sock.recv(n - len(out))
            except (ConnectionError, ssl.SSLError, OSError) as e:
                read_mqtt.error = str(e)
                return None
            if not chunk:
                read_mqtt.error = "EOF"
                return None
            out += chunk
        return out

    first = exact(1)
    if first is None:
        return None
    n, mult = 0, 1
    while True:
        b = exact(1)
        if b is None:
            return None
        n += (b[0] & 0x7F) * mult
        mult *= 128
        if not b[0] & 0x80:
            break
    body = exact(n) if n else b""
    return None if body is None else (first[0], body)


def mqtt_tls_outcome(server, host, cert, key, client_id):
    """CONNECT over mutual TLS on the MQTT port: ("connack", return code) or ("refused", why)
    when the TLS handshake (or the connection) was refused before any CONNACK."""
    try:
        sock = tls_socket(server, server.mqtt_port, host, cert, key)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        return "refused", str(e)
    try:
        try:
            sock.sendall(mqtt_connect(client_id, v5=False))
        except (ssl.SSLError, ConnectionError, OSError) as e:
            return "refused", str(e)
        p = read_mqtt(sock)
        if p is None:
            return "refused", read_mqtt.error
        assert p[0] == 0x20, f"expected CONNACK, got {p[0]:#x}"
        return "connack", p[1][1]
    finally:
        sock.close()


def refused_handshake(why):
    """The TLS handshake of the connection was refused: the certificate_unknown alert, or (when
    the server closes before the client reads the alert) EOF or reset."""
    e = (why or "").lower().replace("_", " ")
    return "certificate unknown" in e or "eof" in e or "reset" in e


# --- MQTT over WebSocket ----------------------------------------------------------------------

class Ws:
    """awsiotsdk MQTT 3.1.1 over WebSocket (SigV4 presigned upgrade) with static credentials."""

    def __init__(self, server, creds, client_id):
        from awscrt import auth
        from awsiot import mqtt_connection_builder

        self.messages = queue.Queue()
        provider = auth.AwsCredentialsProvider.new_static(
            creds["aws_access_key_id"], creds["aws_secret_access_key"], creds.get("aws_session_token"))
        self.conn = mqtt_connection_builder.websockets_with_default_aws_signing(
            endpoint=server.endpoint(), port=server.https_port, region=REGION, credentials_provider=provider,
            ca_filepath=server.ca, client_id=client_id, clean_session=True, keep_alive_secs=30,
            reconnect_min_timeout_secs=30, reconnect_max_timeout_secs=60)

    def connect(self):
        self.conn.connect().result(10)
        return self

    def subscribe(self, topic):
        from awscrt import mqtt as crt_mqtt
        fut, _ = self.conn.subscribe(topic, crt_mqtt.QoS.AT_LEAST_ONCE,
                                     callback=lambda topic, payload, **kw: self.messages.put((topic, payload)))
        return fut.result(10)

    def publish(self, topic, payload):
        from awscrt import mqtt as crt_mqtt
        fut, _ = self.conn.publish(topic, payload, crt_mqtt.QoS.AT_LEAST_ONCE)
        return fut.result(10)

    def close(self):
        try:
            self.conn.disconnect().result(5)
        except Exception:
            pass


def presigned_mqtt_url(host, port, creds):
    """wss:// upgrade URL presigned by botocore (service iotdevicegateway, as the SDKs sign)."""
    req = AWSRequest(method="GET", url=f"https://{host}:{port}/mqtt")
    SigV4QueryAuth(Credentials(creds["aws_access_key_id"], creds["aws_secret_access_key"]),
                   "iotdevicegateway", REGION, expires=300).add_auth(req)
    return req.url


class RawWs:
    """One WebSocket connection on the device HTTPS port, upgraded with a presigned URL; carries
    MQTT packets in masked binary frames."""

    def __init__(self, server, host, creds):
        url = presigned_mqtt_url(host, server.https_port, creds)
        path = url.split(f":{server.https_port}", 1)[1]
        self.sock = tls_socket(server, server.https_port, host)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{server.https_port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Sec-WebSocket-Protocol: mqtt\r\n\r\n").encode())
        resp = b""
        self.sock.settimeout(5)
        while b"\r\n\r\n" not in resp:
            chunk = self.sock.recv(4096)
            assert chunk, f"no upgrade response: {resp!r}"
            resp += chunk
        head, _, self.buf = resp.partition(b"\r\n\r\n")
        self.status_line = head.split(b"\r\n", 1)[0].decode()

    def send(self, payload):
        mask = os.urandom(4)
        n = len(payload)
        h = bytes([0x82])
        if n < 126:
            h += bytes([0x80 | n])
        else:
            h += bytes([0x80 | 126]) + struct.pack(">H", n)
        self.sock.sendall(h + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def frame(self, timeout=5.0):
        """The next server frame: (opcode, payload); ("closed", why) on EOF/reset; None on timeout."""
        end = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                n, off = self.buf[1] & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, off = struct.unpack(">H", self.buf[2:4])[0], 4
                elif n == 127 and len(self.buf) >= 10:
                    n, off = struct.unpack(">Q", self.buf[2:10])[0], 10
                if (self.buf[1] & 0x7F) < 126 or off > 2:
                    if len(self.buf) >= off + n:
                        op, payload = self.buf[0] & 0x0F, self.buf[off:off + n]
                        self.buf = self.buf[off + n:]
                        return op, payload
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            except (ConnectionError, ssl.SSLError, OSError) as e:
                return "closed", str(e)
            if not chunk:
                return "closed", "EOF"
            self.buf += chunk

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --- 1. IAM service condition keys -----------------------------------------------------------

def test_iam_policy_arn_condition_key_denies_attaching_admin(rv):
    """User dlg may attach managed policies to itself, except (Deny with ArnEquals on
    iam:PolicyARN) the Admin policy: attaching Admin is 403 AccessDenied and leaves it
    unattached; attaching a harmless policy works (positive control)."""
    s = rv
    iam = s.boto("iam")
    account = account_of(s)
    admin = iam.create_policy(PolicyName=unique("Admin"), PolicyDocument=doc(allow("*")))["Policy"]["Arn"]
    harmless = iam.create_policy(PolicyName=unique("ReadOnly"),
                                 PolicyDocument=doc(allow("iot:Describe*")))["Policy"]["Arn"]
    name = unique("dlg")
    policy = doc(allow(["iam:AttachUserPolicy", "iam:ListAttachedUserPolicies"], f"arn:aws:iam::{account}:user/{name}"),
                 deny("iam:AttachUserPolicy", "*", Condition={"ArnEquals": {"iam:PolicyARN": admin}}))
    _, creds, _ = make_user(s, policy, name=name)
    dlg = client(s, "iam", creds)

    # Positive control: the harmless managed policy is attached.
    assert outcome(lambda: dlg.attach_user_policy(UserName=name, PolicyArn=harmless)) == ("ok", 200)

    got = outcome(lambda: dlg.attach_user_policy(UserName=name, PolicyArn=admin))
    attached = [p["PolicyArn"] for p in iam.list_attached_user_policies(UserName=name)["AttachedPolicies"]]
    assert got == ("AccessDenied", 403), (
        f"attaching {admin} to itself despite the iam:PolicyARN Deny: {got}; attached now {attached}")
    assert attached == [harmless], attached
    # Not escalated: an action only Admin would grant is still refused.
    assert outcome(lambda: dlg.create_user(UserName=unique("esc"))) == ("AccessDenied", 403)


# --- 2. One policy, one decision on four surfaces --------------------------------------------

# (condition key, condition that holds, condition that fails); "{name}", "{arn}" and "{other}"
# are the user's name, the user's ARN and another user's ARN.
CONDITIONS = {
    # The endpoint name may resolve to ::1 as well as to 127.0.0.1: the holding condition names both.
    "aws:SourceIp": ({"IpAddress": {"aws:SourceIp": ["127.0.0.0/8", "::1/128"]}},
                     {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}),
    "aws:username": ({"StringEquals": {"aws:username": "{name}"}},
                     {"StringEquals": {"aws:username": "someone-else"}}),
    "aws:SecureTransport": ({"Bool": {"aws:SecureTransport": "true"}},
                            {"Bool": {"aws:SecureTransport": "false"}}),
    "aws:CurrentTime": ({"DateGreaterThan": {"aws:CurrentTime": "2020-01-01T00:00:00Z"}},
                        {"DateLessThan": {"aws:CurrentTime": "2020-01-01T00:00:00Z"}}),
    "aws:EpochTime": ({"NumericGreaterThan": {"aws:EpochTime": "1577836800"}},
                      {"NumericLessThan": {"aws:EpochTime": "1577836800"}}),
    "aws:userid": ({"StringLike": {"aws:userid": "AIDA*"}},
                   {"StringLike": {"aws:userid": "AROA*"}}),
    "aws:PrincipalArn": ({"ArnEquals": {"aws:PrincipalArn": "{arn}"}},
                         {"ArnEquals": {"aws:PrincipalArn": "{other}"}}),
    "aws:RequestedRegion": ({"StringEquals": {"aws:RequestedRegion": "us-east-1"}},
                            {"StringEquals": {"aws:RequestedRegion": "eu-west-1"}}),
}

SURFACE_ACTIONS = ["iot:ListThings", "iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive",
                   "s3:PutObject", "s3:GetObject", "s3:ListBucket"]


def fill(value, **names):
    if isinstance(value, dict):
        return {k: fill(v, **names) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, **names) for v in value]
    return value.format(**names)


@pytest.fixture(scope="module")
def surfaces_bucket(rv):
    bucket = f"cond-{uuid.uuid4().hex[:16]}"
    rv.boto("s3").create_bucket(Bucket=bucket)
    return bucket


def surfaces(s, creds, bucket, tag):
    """The four surfaces, each as one user would use them: {surface: outcome}. A surface
    that works returns "ok" (after checking that what it did took effect)."""
    out = {}
    # Control plane.
    out["control plane"] = outcome(lambda: client(s, "iot", creds).list_things())
    # MQTT over WebSocket (iot:Connect, then Subscribe/Receive, Publish): also the witness of
    # the iot-data publish.
    topic = f"cond/{tag}"
    ws = Ws(s, creds, unique("wscond"))
    try:
        ws.connect()
    except Exception as e:  # noqa: BLE001 - the refusal is what the caller looks at
        # awscrt reports a refused CONNACK as AWS_ERROR_MQTT_PROTOCOL_ERROR (the return code is
        # not passed on): the same CONNECT, by hand over a WebSocket upgraded with the same
        # credentials, shows the server's return code.
        raw = RawWs(s, s.endpoint(), creds)
        try:
            raw.send(mqtt_connect(unique("wsraw"), v5=False))
            f = raw.frame(5)
        finally:
            raw.close()
        rc = f[1][3] if f and f[0] == 0x2 and f[1][:1] == b"\x20" else f
        out["websocket"] = (getattr(e, "name", repr(e)), raw.status_line.split(" ", 2)[1], rc)
        ws = None
    # iot-data over HTTPS.
    try:
        if ws is not None:
            ws.subscribe(topic)
        out["iot-data"] = outcome(lambda: data_client(s, creds).publish(topic=topic, qos=1, payload=b"via https"))
        if ws is not None:
            if out["iot-data"][0] == "ok":
                assert wait_for(ws.messages, lambda m: m == (topic, b"via https"), 5), "iot-data publish not delivered"
            ws.publish(topic, b"via websocket")
            assert wait_for(ws.messages, lambda m: m == (topic, b"via websocket"), 5), "WebSocket publish not echoed"
            out["websocket"] = ("ok", 200)
    finally:
        if ws is not None:
            ws.close()
    # S3.
    s3 = s3_client(s, creds)
    key = f"{tag}.txt"
    put = outcome(lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"cond"))
    get = outcome(lambda: s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    lst = outcome(lambda: s3.list_objects_v2(Bucket=bucket, Prefix=key))
    out["s3"] = put if put == get == lst else ("mixed", {"put": put, "get": get, "list": lst})
    return out


@pytest.mark.parametrize("key", list(CONDITIONS))
def test_one_policy_one_decision_on_four_surfaces(rv, surfaces_bucket, key):
    """Two users whose only Allow carries a condition on `key`: one where it holds, one where it
    fails. The first may list things (control plane), publish with iot-data over HTTPS, connect,
    subscribe, receive and publish over MQTT over WebSocket, and put, get and list in S3; the
    second is refused on all four, each with its own error: control plane 403
    AccessDeniedException, iot-data 403 ForbiddenException, WebSocket CONNACK 5 (not
    authorized: iot:Connect is governed too), S3 403 AccessDenied."""
    from awscrt.mqtt import ConnectReturnCode

    s = rv
    account = account_of(s)
    holds, fails = CONDITIONS[key]
    results = {}
    for which, cond in (("holds", holds), ("fails", fails)):
        name = unique(f"cond-{which}")
        names = {"name": name, "arn": f"arn:aws:iam::{account}:user/{name}",
                 "other": f"arn:aws:iam::{account}:user/{name}-other"}
        policy = doc(allow(SURFACE_ACTIONS, "*", Condition=fill(cond, **names)))
        _, creds, _ = make_user(s, policy, name=name)
        results[which] = surfaces(s, creds, surfaces_bucket, name)

    # The condition holds: every surface works.
    assert all(v == ("ok", 200) for v in results["holds"].values()), (
        f"{key}: a holding condition was not honoured everywhere: {results['holds']} "
        f"(the failing condition's user got {results['fails']})")
    # The condition fails: every surface refuses, with its own error.
    got = results["fails"]
    # WebSocket: awsiotsdk's connect fails on the refused CONNACK; the upgrade itself is 101 and
    # the CONNACK's return code is 5, not authorized.
    expected_ws = ("AWS_ERROR_MQTT_PROTOCOL_ERROR", "101", int(ConnectReturnCode.NOT_AUTHORIZED))
    assert (got["control plane"], got["iot-data"], got["websocket"], got["s3"]) == (
        ("AccessDeniedException", 403), ("ForbiddenException", 403), expected_ws, ("AccessDenied", 403)), (
        f"{key}: a failing condition did not refuse on every surface: {got}")
    # Nothing the refused user tried to store is there.
    root = s.boto("s3")
    assert root.list_objects_v2(Bucket=surfaces_bucket, Prefix="cond-fails").get("KeyCount") == 0


# --- 3. SigV2 presigned URL with a duplicated x-amz header -----------------------------------

def v2_presign(server, creds, method, path, headers, expires=600):
    """A Signature Version 2 presigned URL made by botocore (HmacV1QueryAuth), signing `headers`."""
    req = AWSRequest(method=method, url=f"https://localhost:{server.s3_port}{path}", headers=dict(headers))
    HmacV1QueryAuth(Credentials(creds["aws_access_key_id"], creds["aws_secret_access_key"]),
                    expires=expires).add_auth(req)
    return req.url


def put_with_headers(server, url, headers, body=b""):
    """PUT `url` with http.client, sending `headers` (a list: names may repeat) as given.
    Returns (status, body)."""
    target = url.split(f":{server.s3_port}", 1)[1]
    c = http.client.HTTPSConnection("localhost", server.s3_port,
                                    context=ssl.create_default_context(cafile=server.ca), timeout=10)
    try:
        c.putrequest("PUT", target, skip_accept_encoding=True)
        for k, v in headers:
            c.putheader(k, v)
        c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_presigned_v2_duplicated_amz_header_is_signature_mismatch(rv):
    """Root presigns (SigV2, botocore's HmacV1QueryAuth) a PUT copy with
    x-amz-copy-source=<bucket>/public.txt. Positive control: the request as signed (the URL with
    that header) copies public.txt. Attack: the same URL with a second x-amz-copy-source naming
    secret.txt (before or after the signed one), or with it replaced, is 403
    SignatureDoesNotMatch and the target does not hold the secret. Likewise a presigned PUT
    signed with x-amz-meta-a: 1 sent with two values of x-amz-meta-a: 403, the stored object
    and metadata unchanged."""
    s = rv
    root = s.boto("s3")
    bucket = f"v2dup-{uuid.uuid4().hex[:16]}"
    root.create_bucket(Bucket=bucket)
    root.put_object(Bucket=bucket, Key="public.txt", Body=b"public data")
    root.put_object(Bucket=bucket, Key="secret.txt", Body=b"TOP SECRET")
    creds = root_creds(s)
    public, secret = ("x-amz-copy-source", f"{bucket}/public.txt"), ("x-amz-copy-source", f"{bucket}/secret.txt")

    def attempt(url, headers, key, body=b""):
        st, resp = put_with_headers(s, url, headers, body)
        err = s3_error(resp)[0] if st >= 300 else None
        try:
            got = root.get_object(Bucket=bucket, Key=key)
            now = (got["Body"].read(), got["Metadata"])
        except ClientError as e:
            now = code(e)
        return st, err, now

    url = v2_presign(s, creds, "PUT", f"/{bucket}/copy.txt", [public])
    assert "AWSAccessKeyId=" in url and "Signature=" in url and "X-Amz-Credential" not in url, url
    # Positive control: the request as signed copies public.txt. botocore put the signed
    # x-amz-copy-source in the query string as well; either form of the request (that header
    # sent along, or the URL alone) may be the one the server honours, but one must be.
    forms = {"URL + signed header": [public], "URL alone": []}
    controls = {}
    for form, headers in forms.items():
        controls[form] = attempt(url, headers, "copy.txt")
        if controls[form] == (200, None, (b"public data", {})):
            break
    else:
        pytest.fail("control: the SigV2 presigned copy did not copy public.txt in either form: "
                    + "; ".join(f"{f}: {c[:2]}, copy.txt then {c[2]!r}" for f, c in controls.items()), pytrace=False)

    for headers in ([secret, public], [public, secret], [secret]):
        got = attempt(url, headers, "copy.txt")
        assert got == (403, "SignatureDoesNotMatch", (b"public data", {})), (
            f"x-amz-copy-source sent as {[v for _, v in headers]}: answered {got[:2]}; copy.txt now {got[2]!r}")

    # Metadata: signed with one value, sent with two.
    url = v2_presign(s, creds, "PUT", f"/{bucket}/meta.txt", [("x-amz-meta-a", "1")])
    controls = {}
    for form, headers in {"URL + signed header": [("x-amz-meta-a", "1")], "URL alone": []}.items():
        controls[form] = attempt(url, headers, "meta.txt", b"hi")
        if controls[form] == (200, None, (b"hi", {"a": "1"})):
            break
    else:
        pytest.fail("control: the SigV2 presigned PUT did not store its signed metadata in either form: "
                    + "; ".join(f"{f}: {c[:2]}, meta.txt then {c[2]!r}" for f, c in controls.items()), pytrace=False)
    got = attempt(url, [("x-amz-meta-a", "1"), ("x-amz-meta-a", "injected")], "meta.txt", b"hx")
    assert got == (403, "SignatureDoesNotMatch", (b"hi", {"a": "1"})), (
        f"two values of x-amz-meta-a: answered {got[:2]}; meta.txt now {got[2]!r}")


# --- 4. A delayed will is authorized again when it fires -------------------------------------

WILL_DELAY = 3


def test_delayed_will_not_published_after_certificate_revoked(rv, workdir):
    """Two MQTT 5 devices with a retained will delayed WILL_DELAY s (session expiry 600 s) drop
    their TCP connections without DISCONNECT; 0.5 s later D's certificate is revoked. E's will
    (positive control) arrives once the delay is over; D's must not, neither live nor retained."""
    s = rv
    iot = s.boto()
    host = s.endpoint()
    d = Device(s, iot, unique("dwill"), ALLOW_ALL, workdir)
    e = Device(s, iot, unique("ewill"), ALLOW_ALL, workdir)
    watcher_dev = Device(s, iot, unique("wwill"), ALLOW_ALL, workdir)
    watcher = Paho(s, host, watcher_dev, unique("wwill"), v5=True)
    assert watcher.connect()[0] == 0
    assert watcher.subscribe("wills/#", qos=1)[0].value == 1

    def will_device(dev, payload):
        wp = Properties(PacketTypes.WILLMESSAGE)
        wp.WillDelayInterval = WILL_DELAY
        cp = Properties(PacketTypes.CONNECT)
        cp.SessionExpiryInterval = 600
        p = Paho(s, host, dev, dev.name, v5=True, will=(f"wills/{dev.name}", payload, 1, True, wp))
        assert p.connect(properties=cp)[0] == 0
        return p

    pd, pe = will_device(d, b"D died"), will_device(e, b"E died")
    for p in (pd, pe):  # TCP dropped, no DISCONNECT
        p.drop()
    dropped = time.monotonic()
    time.sleep(0.5)  # the revocation comes during the will delay
    iot.update_certificate(certificateId=d.cert_id, newStatus="REVOKED")
    assert time.monotonic() - dropped < WILL_DELAY - 1, "too slow: the revocation came after the delay"

    # E's will comes when the delay is over; then wait until 1.5 s past the moment D's would have.
    got = []
    e_will = wait_for(watcher.messages, lambda m: got.append(m) or m.topic == f"wills/{e.name}", WILL_DELAY + 5)
    assert e_will is not None, f"control: E's delayed will did not arrive ({[m.topic for m in got]})"
    assert time.monotonic() - dropped >= WILL_DELAY - 0.5, "E's will came before its delay"
    got += drain_for(watcher.messages, max(0.0, WILL_DELAY + 1.5 - (time.monotonic() - dropped)))
    topics = [m.topic for m in got]
    assert f"wills/{d.name}" not in topics, "the delayed will of a certificate REVOKED during the delay was published"

    # Retained: a new subscriber gets E's will, not D's. D's topic is subscribed first, so a
    # retained D will would be sent before E's.
    late = Paho(s, host, watcher_dev, unique("wlate"), v5=True)
    assert late.connect()[0] == 0
    late.subscribe(f"wills/{d.name}", qos=1)
    late.subscribe(f"wills/{e.name}", qos=1)
    retained = {}
    wait_for(late.messages,
             lambda m: retained.update({m.topic: (m.payload, m.retain)}) or m.topic == f"wills/{e.name}", 5)
    late.close()
    watcher.close()
    assert retained.get(f"wills/{e.name}") == (b"E died", True), f"control: E's will not retained ({retained})"
    assert f"wills/{d.name}" not in retained, "the delayed will of a REVOKED certificate was retained"


# --- 5. WebSocket credentials checked again at CONNECT ----------------------------------------

@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_websocket_connect_refused_when_key_deleted_after_upgrade(rv, v5):
    """A WebSocket upgraded with a user's key, whose key is then deleted, sends CONNECT: refused
    (CONNACK 0x87 on MQTT 5 / return code 5 on 3.1.1, or the connection closed before any
    CONNACK). Positive control: the same flow with the key kept gets CONNACK 0."""
    s = rv
    iam = s.boto("iam")
    host = s.endpoint()
    refused_code = 0x87 if v5 else 5

    def upgraded(creds):
        ws = RawWs(s, host, creds)
        assert ws.status_line.startswith("HTTP/1.1 101"), ws.status_line
        return ws

    def connack(ws, client_id):
        ws.send(mqtt_connect(client_id, v5))
        f = ws.frame(5)
        assert f is not None, "no answer to CONNECT within 5 s, connection still open"
        if f[0] == "closed" or f[0] == 0x8:
            return "closed", f[1]
        assert f[0] == 0x2 and f[1][0] == 0x20, f"expected a binary frame with CONNACK, got {f}"
        return "connack", f[1][3] if f[1][1] >= 2 else None

    # Positive control.
    name, creds, _ = make_user(s, doc(allow("iot:*")))
    ws = upgraded(creds)
    try:
        assert connack(ws, name) == ("connack", 0)
    finally:
        ws.close()

    name, creds, key_id = make_user(s, doc(allow("iot:*")))
    ws = upgraded(creds)
    try:
        iam.delete_access_key(UserName=name, AccessKeyId=key_id)
        # The deletion is in force on the control plane.
        assert outcome(lambda: client(s, "sts", creds).get_caller_identity()) == ("InvalidClientTokenId", 403)
        got = connack(ws, name)
        if got[0] == "connack":
            assert got == ("connack", refused_code), (
                f"CONNECT after the upgrading key was deleted: CONNACK {got[1]:#x}, expected {refused_code:#x}")
            after = ws.frame(3)
            assert after is not None and (after[0] == "closed" or after[0] == 0x8), (
                f"the connection stayed open after the refused CONNACK: {after}")
        else:
            assert got[0] == "closed", got
    finally:
        ws.close()


# --- 6. REVOKED is final ---------------------------------------------------------------------

def test_revoked_certificate_cannot_be_reactivated(rv, workdir):
    """INACTIVE -> ACTIVE works and the certificate connects again (positive control); REVOKED ->
    ACTIVE is 406 CertificateStateException, the status stays REVOKED and the certificate is
    refused in the TLS handshake."""
    s = rv
    iot = s.boto()
    host = s.endpoint()
    dev = Device(s, iot, unique("final"), ALLOW_ALL, workdir)
    assert mqtt_tls_outcome(s, host, dev.cert, dev.key, dev.name) == ("connack", 0)

    # Positive control: INACTIVE is not final.
    iot.update_certificate(certificateId=dev.cert_id, newStatus="INACTIVE")
    got = mqtt_tls_outcome(s, host, dev.cert, dev.key, dev.name)
    assert got[0] == "refused" and refused_handshake(got[1]), got
    iot.update_certificate(certificateId=dev.cert_id, newStatus="ACTIVE")
    assert mqtt_tls_outcome(s, host, dev.cert, dev.key, dev.name) == ("connack", 0)

    iot.update_certificate(certificateId=dev.cert_id, newStatus="REVOKED")
    got = outcome(lambda: iot.update_certificate(certificateId=dev.cert_id, newStatus="ACTIVE"))
    status = iot.describe_certificate(certificateId=dev.cert_id)["certificateDescription"]["status"]
    connect = mqtt_tls_outcome(s, host, dev.cert, dev.key, dev.name)
    assert got == ("CertificateStateException", 406), (
        f"REVOKED -> ACTIVE answered {got}; status now {status}; the certificate's CONNECT: {connect}")
    assert status == "REVOKED", status
    assert connect[0] == "refused" and refused_handshake(connect[1]), connect


# --- 7. Principal ARNs with their path; trust pinned to unique ids; valid paths ---------------

def test_principal_arn_has_path_and_arnlike_deny_applies(rv):
    """A user created with Path=/contractors/ is arn:aws:iam::<acct>:user/contractors/<name> in
    GetCallerIdentity, and a Deny on ArnLike aws:PrincipalArn .../user/contractors/* stops it
    (AccessDeniedException) despite Allow *. Positive control: the same policy on a user
    without the path lets it list things."""
    s = rv
    account = account_of(s)
    policy = doc(allow("*"), deny("iot:ListThings", "*", Condition={
        "ArnLike": {"aws:PrincipalArn": f"arn:aws:iam::{account}:user/contractors/*"}}))
    plain, plain_creds, _ = make_user(s, policy)
    contractor, creds, _ = make_user(s, policy, path="/contractors/")

    assert client(s, "sts", plain_creds).get_caller_identity()["Arn"] == f"arn:aws:iam::{account}:user/{plain}"
    assert outcome(lambda: client(s, "iot", plain_creds).list_things()) == ("ok", 200)

    expected = f"arn:aws:iam::{account}:user/contractors/{contractor}"
    iam_arn = s.boto("iam").get_user(UserName=contractor)["User"]["Arn"]
    sts_arn = client(s, "sts", creds).get_caller_identity()["Arn"]
    got = outcome(lambda: client(s, "iot", creds).list_things())
    assert (iam_arn, sts_arn, got) == (expected, expected, ("AccessDeniedException", 403)), (
        f"user with Path=/contractors/: GetUser Arn {iam_arn}, GetCallerIdentity Arn {sts_arn}, ListThings "
        f"despite the Deny on aws:PrincipalArn user/contractors/*: {got}")
    # Allow * still applies to what the Deny does not name.
    assert outcome(lambda: client(s, "iot", creds).describe_endpoint(endpointType="iot:Data-ATS")) == ("ok", 200)


@pytest.mark.parametrize("where", ["same-account", "cross-account"])
def test_trust_names_the_user_not_a_recreated_namesake(rv, where):
    """A role trusts user X by ARN: X assumes it (positive control). X is deleted and a new X
    of the same name created: its AssumeRole is 403 AccessDenied (the trust named the old X's
    unique id). X is in the role's account, or in account b."""
    s = rv
    profile = "sekisho" if where == "same-account" else "b"
    account, x_account = account_of(s), account_of(s, profile)
    x = unique("x")
    x_policy = doc(allow("sts:AssumeRole", "*"))
    _, x_creds, _ = make_user(s, x_policy, name=x, profile=profile)
    role = unique("trusting")
    role_arn = f"arn:aws:iam::{account}:role/{role}"
    iam = s.boto("iam")
    iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{x_account}:user/{x}"}, "Action": "sts:AssumeRole"}]}))
    iam.put_role_policy(RoleName=role, PolicyName="p", PolicyDocument=doc(allow("iot:ListThings")))

    got = client(s, "sts", x_creds).assume_role(RoleArn=role_arn, RoleSessionName="first")
    assert got["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::{account}:assumed-role/{role}/first"

    delete_user(s, x, profile)
    _, new_creds, _ = make_user(s, x_policy, name=x, profile=profile)
    assert client(s, "sts", new_creds).get_caller_identity()["Arn"] == f"arn:aws:iam::{x_account}:user/{x}"
    got = outcome(lambda: client(s, "sts", new_creds).assume_role(RoleArn=role_arn, RoleSessionName="second"))
    assert got == ("AccessDenied", 403), f"a re-created user of the same name assumed the role: {got}"


def test_iam_path_without_slashes_is_validation_error(rv):
    """CreateUser with Path=team (no leading and trailing slash) is 400 ValidationError and
    creates nothing; Path=/team/ works (positive control)."""
    s = rv
    iam = s.boto("iam")
    good = unique("pathok")
    assert iam.create_user(UserName=good, Path="/team/")["User"]["Path"] == "/team/"
    bad = unique("pathbad")
    got = outcome(lambda: iam.create_user(UserName=bad, Path="team"))
    assert got == ("ValidationError", 400), f"CreateUser Path=team answered {got}"
    assert outcome(lambda: iam.get_user(UserName=bad)) == ("NoSuchEntity", 404)


# --- 8. S3 DeleteObjects from another account, refused before its body ------------------------

class SlowPost:
    """POST /<bucket>?delete over a raw TLS socket, signed (S3SigV4Auth, payload SHA-256 and
    Content-MD5 of the whole body) for `creds`; the headers and the first bytes of the body go
    at once, the rest only when `finish` is called."""

    def __init__(self, server, creds, bucket, body):
        self.server, self.body = server, body
        target = f"/{bucket}?delete="
        req = AWSRequest(method="POST", url=f"https://localhost:{server.s3_port}{target}", data=body,
                         headers={"Content-Length": str(len(body)), "Content-Type": "application/xml",
                                  "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode()})
        S3SigV4Auth(Credentials(creds["aws_access_key_id"], creds["aws_secret_access_key"]), "s3",
                    REGION).add_auth(req)
        self.head = (f"POST {target} HTTP/1.1\r\nHost: localhost:{server.s3_port}\r\n"
                     + "".join(f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() != "host")
                     + "\r\n").encode()
        self.buf = b""

    def start(self, first):
        self.sock = tls_socket(self.server, self.server.s3_port, "localhost")
        self.sock.sendall(self.head + self.body[:first])
        self.sent = first
        self.t0 = time.monotonic()
        return self

    def response(self, timeout):
        """(status, body, seconds since start) or None if nothing complete came within `timeout`."""
        end = time.monotonic() + timeout
        while True:
            if b"\r\n\r\n" in self.buf:
                head, rest = self.buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                st = int(lines[0].split(" ", 2)[1])
                hdrs = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                n = int(hdrs.get("content-length", "0"))
                if st != 100 and len(rest) >= n:
                    return st, rest[:n], time.monotonic() - self.t0
                if st == 100:
                    self.buf = rest
                    continue
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            except (ConnectionError, ssl.SSLError, OSError):
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk

    def finish(self):
        self.sock.sendall(self.body[self.sent:])

    def close(self):
        self.sock.close()


def delete_xml(*keys_):
    return ("<Delete>" + "".join(f"<Object><Key>{k}</Key></Object>" for k in keys_) + "</Delete>").encode()


def test_delete_objects_from_another_account_refused_before_body(rv):
    """Account B's root POSTs /<A's bucket>?delete with signed headers and a body it sends
    slowly: 403 AccessDenied comes at once (within 2 s), before the body is complete, and A's
    object stays. Positive controls: A's own DeleteObjects (boto3), and A's own slow POST, which
    completes with 200 once its body is in."""
    s = rv
    a, b = s.boto("s3"), s.boto("s3", profile="b")
    bucket = f"delobj-{uuid.uuid4().hex[:16]}"
    a.create_bucket(Bucket=bucket)
    for k in ("k", "ctl-1", "ctl-2"):
        a.put_object(Bucket=bucket, Key=k, Body=b"data")

    # Positive control: A's own DeleteObjects, with boto3 ...
    r = a.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "ctl-1"}]})
    assert [d["Key"] for d in r.get("Deleted", [])] == ["ctl-1"], r
    # ... and with the slow raw request (its signing and body are right).
    body = delete_xml("ctl-2")
    post = SlowPost(s, root_creds(s), bucket, body).start(10)
    try:
        post.finish()
        got = post.response(10)
    finally:
        post.close()
    assert got is not None and got[0] == 200 and b"<Key>ctl-2</Key>" in got[1], got
    assert outcome(lambda: a.head_object(Bucket=bucket, Key="ctl-2")) == ("404", 404)

    # B: headers and 10 bytes of the body; the answer must not wait for the rest.
    post = SlowPost(s, root_creds(s, "b"), bucket, delete_xml("k")).start(10)
    try:
        got = post.response(2.0)
    finally:
        post.close()
    assert got is not None, "no answer within 2 s to another account's DeleteObjects whose body is incomplete"
    st, resp, took = got
    assert (st, s3_error(resp)[0]) == (403, "AccessDenied"), (st, resp)
    assert took < 2.0, took
    assert a.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"
    # B is refused with boto3 too (complete request).
    assert outcome(lambda: b.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "k"}]})) == ("AccessDenied", 403)
    assert a.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"
