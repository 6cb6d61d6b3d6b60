"""docs/compatibility.md, "IAM, STS and the HTTPS data plane" and "Role aliases and the
credential provider": the rows no other test pins down, with boto3, botocore's signer, requests,
curl, paho over a raw WebSocket, and libfaketime for expiry. Each refusal is asserted with its
specific code next to a positive control."""

import base64
import datetime
import hashlib
import hmac
import json
import os
import queue
import socket
import ssl
import struct
import subprocess
import urllib.parse

import boto3
import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from conftest import ALLOW_ALL, Device, Openssl, Paho, Server, faketime, unique
from helpers import allow, code, doc, keys, temp
from test_limits_and_robustness import connect_v311

REGION = "us-east-1"
TRUST_CREDENTIALS = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "credentials.iot.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


@pytest.fixture(scope="module")
def two(workdir):
    s = Server(workdir / unique("compat-iam"), accounts=["tenant-b"]).start()
    yield s
    s.stop()


def client(s, service, creds, validate=True):
    return boto3.client(service, region_name=REGION, endpoint_url=f"https://localhost:{s.api_port}", verify=s.ca,
                        config=Config(retries={"max_attempts": 1}, parameter_validation=validate), **creds)


def account_of(s, profile="sekisho"):
    return s.boto("sts", profile=profile).get_caller_identity()["Account"]


def user(s, policy=None, profile="sekisho"):
    iam = s.boto("iam", profile=profile)
    name = unique("u")
    iam.create_user(UserName=name)
    if policy:
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=policy)
    return name, keys(iam.create_access_key(UserName=name)["AccessKey"])


def refused(call):
    with pytest.raises(ClientError) as e:
        call()
    return code(e.value), e.value.response["ResponseMetadata"]["HTTPStatusCode"], e.value.response["Error"]["Message"]


# --- the IoT control plane under IAM -----------------------------------------------------------

def test_iot_calls_are_authorized_on_the_resource_they_name(two, workdir):
    """Row "control-plane call by an IAM user or role session": authorized as iot:<Operation> on
    thing/<name>, policy/<name>, cert/<id>, cacert/<id>, thingtype/<name>, and `*` for list
    operations; a refusal is AccessDeniedException (403) with AWS's "User: … is not authorized
    to perform: … on resource: …". Positive control: the same user on the resource its policy
    names. Row "control-plane call by the account root": allowed, everything (same calls)."""
    s = two
    root = s.boto()
    acct = account_of(s)
    arn = f"arn:aws:iot:{REGION}:{acct}"
    pki = Openssl(workdir / unique("iamca"))
    ca = pki.ca("iam-ca")
    ca_id = root.register_ca_certificate(caCertificate=ca[0].read_text(), certificateMode="SNI_ONLY")["certificateId"]
    dev = Device(s, root, unique("mine"), ALLOW_ALL, workdir)
    other = Device(s, root, unique("other"), ALLOW_ALL, workdir)
    tt = unique("type")
    root.create_thing_type(thingTypeName=tt)
    name, creds = user(s, doc(
        allow("iot:DescribeThing", f"{arn}:thing/{dev.name}"),
        allow("iot:GetPolicy", f"{arn}:policy/{dev.policy}"),
        allow("iot:DescribeCertificate", f"{arn}:cert/{dev.cert_id}"),
        allow("iot:DescribeThingType", f"{arn}:thingtype/other-type"),
        allow("iot:ListPolicies")))
    iot = client(s, "iot", creds)
    who = f"arn:aws:iam::{acct}:user/{name}"
    iot.describe_thing(thingName=dev.name)
    iot.get_policy(policyName=dev.policy)
    iot.describe_certificate(certificateId=dev.cert_id)
    iot.list_policies()
    for call, action, resource in (
            (lambda: iot.describe_thing(thingName=other.name), "iot:DescribeThing", f"thing/{other.name}"),
            (lambda: iot.get_policy(policyName=other.policy), "iot:GetPolicy", f"policy/{other.policy}"),
            (lambda: iot.describe_certificate(certificateId=other.cert_id), "iot:DescribeCertificate",
             f"cert/{other.cert_id}"),
            (lambda: iot.describe_ca_certificate(certificateId=ca_id), "iot:DescribeCACertificate", f"cacert/{ca_id}"),
            (lambda: iot.describe_thing_type(thingTypeName=tt), "iot:DescribeThingType", f"thingtype/{tt}"),
            (lambda: iot.list_things(), "iot:ListThings", "*")):
        resource = resource if resource == "*" else f"{arn}:{resource}"
        assert refused(call) == ("AccessDeniedException", 403,
                                 f"User: {who} is not authorized to perform: {action} on resource: {resource}")
    # The root: the same calls, all allowed.
    root.describe_thing(thingName=other.name)
    root.describe_ca_certificate(certificateId=ca_id)
    root.describe_thing_type(thingTypeName=tt)
    root.list_things()


# --- STS -------------------------------------------------------------------------------------

def test_assume_role_identity_permission_and_trust(two):
    """Row "AssumeRole: identity permission": the caller needs sts:AssumeRole in its own
    policies unless the role's trust policy names it (its ARN, or `*`) in its own account; the
    root of the caller's account is allowed. Row "AssumeRole: unknown role or account":
    AccessDenied, like a denial."""
    s = two
    iam, b_iam = s.boto("iam"), s.boto("iam", profile="tenant-b")
    acct, b_acct = account_of(s), account_of(s, "tenant-b")
    name, creds = user(s)  # no policy at all
    user_arn = f"arn:aws:iam::{acct}:user/{name}"
    sts = client(s, "sts", creds)

    def role(client_iam, principal):
        r = unique("r")
        return client_iam.create_role(RoleName=r, AssumeRolePolicyDocument=doc(
            {"Effect": "Allow", "Principal": {"AWS": principal}, "Action": "sts:AssumeRole"}))["Role"]["Arn"]

    names_user, names_star, names_root = role(iam, user_arn), role(iam, "*"), role(iam, f"arn:aws:iam::{acct}:root")
    assert sts.assume_role(RoleArn=names_user, RoleSessionName="sa")["AssumedRoleUser"]["Arn"].endswith("/sa")
    sts.assume_role(RoleArn=names_star, RoleSessionName="sb")
    assert refused(lambda: sts.assume_role(RoleArn=names_root, RoleSessionName="sc"))[:2] == ("AccessDenied", 403)
    s.boto("sts").assume_role(RoleArn=names_root, RoleSessionName="by-root")
    # In another account the trust policy naming the user is not enough without the permission.
    allowed_name, allowed = user(s, doc(allow("sts:AssumeRole")))
    cross = role(b_iam, [user_arn, f"arn:aws:iam::{acct}:user/{allowed_name}"])
    assert refused(lambda: sts.assume_role(RoleArn=cross, RoleSessionName="sd"))[:2] == ("AccessDenied", 403)
    client(s, "sts", allowed).assume_role(RoleArn=cross, RoleSessionName="se")
    # Unknown role, unknown account: the same AccessDenied.
    for unknown in (f"arn:aws:iam::{b_acct}:role/{unique('none')}", "arn:aws:iam::999999999999:role/any"):
        assert refused(lambda: client(s, "sts", allowed).assume_role(RoleArn=unknown, RoleSessionName="sf"))[:2] == (
            "AccessDenied", 403), unknown


def expires_in(creds):
    return (creds["Expiration"] - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


def test_assume_role_duration_and_role_chaining(two):
    """Row "AssumeRole: duration": 900 s to the role's MaxSessionDuration; 1 h at most when a role
    session assumes a role (role chaining). N and N+1 at each bound (boto3's own validation off
    for 899)."""
    s = two
    iam = s.boto("iam")
    acct = account_of(s)
    trust = doc({"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{acct}:root"}, "Action": "sts:AssumeRole"})
    first, second = unique("hop1"), unique("hop2")
    for r in (first, second):
        iam.create_role(RoleName=r, AssumeRolePolicyDocument=trust, MaxSessionDuration=7200)
        iam.put_role_policy(RoleName=r, PolicyName="assume", PolicyDocument=doc(allow("sts:AssumeRole")))
    rk = s.boto()._request_signer._credentials
    sts = client(s, "sts", {"aws_access_key_id": rk.access_key, "aws_secret_access_key": rk.secret_key},
                 validate=False)
    role_arn = f"arn:aws:iam::{acct}:role/{first}"
    assert code(pytest.raises(ClientError, sts.assume_role, RoleArn=role_arn, RoleSessionName="sx",
                              DurationSeconds=899).value) == "ValidationError"
    assert 850 < expires_in(sts.assume_role(RoleArn=role_arn, RoleSessionName="sx", DurationSeconds=900)[
        "Credentials"]) <= 900
    c = sts.assume_role(RoleArn=role_arn, RoleSessionName="sx", DurationSeconds=7200)["Credentials"]
    assert 7100 < expires_in(c) <= 7200
    assert code(pytest.raises(ClientError, sts.assume_role, RoleArn=role_arn, RoleSessionName="sx",
                              DurationSeconds=7201).value) == "ValidationError"
    # Chaining: the role session assumes the second role (MaxSessionDuration 7200): 1 h at most.
    chained = client(s, "sts", temp(c), validate=False)
    hop = f"arn:aws:iam::{acct}:role/{second}"
    assert 3500 < expires_in(chained.assume_role(RoleArn=hop, RoleSessionName="sy", DurationSeconds=3600)[
        "Credentials"]) <= 3600
    assert code(pytest.raises(ClientError, chained.assume_role, RoleArn=hop, RoleSessionName="sy",
                              DurationSeconds=3601).value) == "ValidationError"


def test_get_session_token_bounds_for_users(two):
    """Row "GetSessionToken": 900 s to 36 h for users (N and N+1 at both ends; the root's 1 h and
    the refusal with temporary credentials are in test_iam_sts)."""
    s = two
    _, creds = user(s)
    sts = client(s, "sts", creds, validate=False)
    for secs, ok in ((899, False), (900, True), (129600, True), (129601, False)):
        if ok:
            assert secs - 100 < expires_in(sts.get_session_token(DurationSeconds=secs)["Credentials"]) <= secs
        else:
            assert refused(lambda: sts.get_session_token(DurationSeconds=secs))[:2] == ("ValidationError", 400), secs


def sign_query(url, body, key, secret, token, service, when, region=REGION):
    """A SigV4 POST (form body) signed by hand at time `when`, with a session token."""
    u = urllib.parse.urlsplit(url)
    amz = when.strftime("%Y%m%dT%H%M%SZ")
    day = amz[:8]
    h = {"content-type": "application/x-www-form-urlencoded", "host": u.netloc, "x-amz-date": amz,
         "x-amz-security-token": token}
    names = sorted(h)
    canonical = "\n".join(["POST", u.path or "/", "", "".join(f"{n}:{h[n]}\n" for n in names), ";".join(names),
                           hashlib.sha256(body).hexdigest()])
    scope = f"{day}/{region}/{service}/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (day, region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    out = {k2: v for k2, v in h.items() if k2 != "host"}
    out["Authorization"] = f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders={';'.join(names)}, Signature={sig}"
    return out


def test_expired_token_by_protocol_and_credentials_survive_a_restart(workdir):
    """Rows "SigV4 errors, query protocol" (ExpiredToken, 400, in <ErrorResponse> XML), "SigV4
    errors, IoT control plane" (ExpiredToken, 403, JSON) and "temporary credentials" (kept in the
    registry: they survive a restart). Session credentials of 900 s work after a restart; then
    the server runs 20 minutes ahead under libfaketime, and requests signed at that time with
    them are refused for expiry, while the account's long-term key signed the same way works
    (positive control: the refusal is the expiry, not the clock)."""
    s = Server(workdir / unique("expiry")).start()
    try:
        name, creds = user(s, doc(allow("iot:ListThings")))
        tok = client(s, "sts", creds).get_session_token(DurationSeconds=900)["Credentials"]
        s.stop()
        s.start()
        assert client(s, "sts", temp(tok)).get_caller_identity()["Arn"].endswith(f":user/{name}")
        client(s, "iot", temp(tok)).list_things()
        s.stop()
        s.start(wrapper=faketime("+20m"))
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=20)
        base = f"https://localhost:{s.api_port}/"
        body = b"Action=GetCallerIdentity&Version=2011-06-15"
        h = sign_query(base, body, tok["AccessKeyId"], tok["SecretAccessKey"], tok["SessionToken"], "sts", later)
        r = requests.post(base, data=body, headers=h, verify=s.ca, timeout=10)
        assert r.status_code == 400 and r.text.lstrip().startswith("<ErrorResponse"), r.text
        assert "<Code>ExpiredToken</Code>" in r.text, r.text
        # IoT (restJson): the same credentials, 403 JSON.
        from test_compat_control_plane import signed_get
        url = f"https://localhost:{s.api_port}/things"
        h = signed_get(url, {"X-Amz-Security-Token": tok["SessionToken"]}, key=tok["AccessKeyId"],
                       secret=tok["SecretAccessKey"], when=later,
                       signed_headers=("host", "x-amz-date", "x-amz-security-token"))
        r = requests.get(url, headers=h, verify=s.ca, timeout=10)
        assert (r.status_code, r.headers.get("x-amzn-ErrorType")) == (403, "ExpiredToken"), r.text
        assert r.json()["message"]
        # Control: the root's long-term key, signed at the same (future) time, is accepted.
        rk = s.boto()._request_signer._credentials
        assert requests.get(url, headers=signed_get(url, key=rk.access_key, secret=rk.secret_key, when=later),
                            verify=s.ca, timeout=10).status_code == 200
    finally:
        s.stop()


def test_iam_signing_region_us_east_1_or_the_configured_one(workdir):
    """Row "IAM signing region": IAM requests are accepted signed for us-east-1 (what botocore
    uses for IAM whatever the region) or for the configured region, here eu-west-1; another region
    is refused (SignatureDoesNotMatch, as a query-protocol signature error). Positive contrast:
    the IoT control plane takes only the configured region."""
    s = Server(workdir / unique("euw1"), config='region = "eu-west-1"\n').start()
    try:
        rk = s.boto()._request_signer._credentials
        body = b"Action=ListUsers&Version=2010-05-08"
        url = f"https://localhost:{s.api_port}/"

        def iam_in(region):
            req = AWSRequest(method="POST", url=url, data=body,
                             headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
            SigV4Auth(Credentials(rk.access_key, rk.secret_key), "iam", region).add_auth(req)
            r = requests.post(url, data=body, headers=dict(req.headers), verify=s.ca, timeout=10)
            return r.status_code, r.text

        for region, ok in (("us-east-1", True), ("eu-west-1", True), ("ap-south-1", False)):
            status, text = iam_in(region)
            if ok:
                assert status == 200 and "<ListUsersResult>" in text, (region, text)
            else:
                # A query-protocol <ErrorResponse> with IAM's code for a wrongly scoped signature.
                assert status == 403 and text.startswith("<ErrorResponse"), (region, text)
                assert "<Code>SignatureDoesNotMatch</Code>" in text and region in text, (region, text)

        def iot_in(region):
            url2 = f"https://localhost:{s.api_port}/things"
            req = AWSRequest(method="GET", url=url2)
            SigV4Auth(Credentials(rk.access_key, rk.secret_key), "iot", region).add_auth(req)
            return requests.get(url2, headers=dict(req.headers), verify=s.ca, timeout=10).status_code

        assert iot_in("eu-west-1") == 200 and iot_in("us-east-1") == 403
    finally:
        s.stop()


# --- iot-data over HTTPS -------------------------------------------------------------------------

def test_iot_data_signing_names_and_user_properties(two, workdir):
    """Rows "iot-data over HTTPS" (a client without a certificate signs its requests, with
    signing name iotdata or iotdevicegateway) and "iot-data user properties" (base64 JSON: a list
    of objects, or a JSON string holding one). Refusal: another signing name is
    UnauthorizedException 401. Publishes are checked at a subscriber."""
    s = two
    rk = s.boto()._request_signer._credentials
    host = s.endpoint()
    mon_dev = Device(s, s.boto(), unique("datamon"), ALLOW_ALL, workdir)
    mon = Paho(s, host, mon_dev, unique("datamon"), v5=True)
    assert mon.connect()[0] == 0
    topic = unique("data/t")
    mon.subscribe(topic, qos=1)
    url = f"https://{host}:{s.https_port}/topics/{urllib.parse.quote(topic, safe='')}?qos=1"

    def post(service, payload, props=None):
        headers = {}
        if props is not None:
            headers["x-amz-mqtt5-user-properties"] = base64.b64encode(json.dumps(props).encode()).decode()
        req = AWSRequest(method="POST", url=url, data=payload, headers=headers)
        SigV4Auth(Credentials(rk.access_key, rk.secret_key), service, REGION).add_auth(req)
        r = requests.post(url, data=payload, headers=dict(req.headers), verify=s.ca, timeout=10)
        return r.status_code, r.headers.get("x-amzn-ErrorType")

    as_list = [{"deviceName": "alpha"}, {"deviceCnt": "45"}]
    for service, props in (("iotdata", as_list), ("iotdevicegateway", json.dumps(as_list))):
        payload = f"via {service}".encode()
        assert post(service, payload, props)[0] == 200, service
        m = mon.messages.get(timeout=5)
        assert m.payload == payload
        assert m.properties.UserProperty == [("deviceName", "alpha"), ("deviceCnt", "45")], service
    assert post("iot", b"wrong name") == (401, "UnauthorizedException")
    assert post("s3", b"wrong name") == (401, "UnauthorizedException")
    with pytest.raises(queue.Empty):
        mon.messages.get(timeout=0.5)
    mon.close()


# --- MQTT over WebSocket ------------------------------------------------------------------------

def presign_mqtt(host, port, key, secret, service, token=None, token_in_signature=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    amz, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    scope = f"{day}/{REGION}/{service}/aws4_request"
    params = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Credential": f"{key}/{scope}", "X-Amz-Date": amz,
              "X-Amz-Expires": "300", "X-Amz-SignedHeaders": "host"}
    if token and token_in_signature:
        params["X-Amz-Security-Token"] = token
    enc = lambda v: urllib.parse.quote(v, safe="-_.~")  # noqa: E731
    q = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(params.items()))
    canonical = "\n".join(["GET", "/mqtt", q, f"host:{host}:{port}\n", "host", hashlib.sha256(b"").hexdigest()])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (day, REGION, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    path = f"/mqtt?{q}&X-Amz-Signature={hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()}"
    if token and not token_in_signature:
        path += f"&X-Amz-Security-Token={enc(token)}"  # appended after signing, as AWS's SDKs do
    return path


class WebSocket:
    """A minimal RFC 6455 client over TLS: the upgrade, then binary frames."""

    def __init__(self, s, host, path, protocols):
        ctx = ssl.create_default_context(cafile=s.ca)
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", s.https_port), timeout=10),
                                    server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{s.https_port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Sec-WebSocket-Protocol: {protocols}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        head, _, self.rest = head.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else None
        self.headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}

    def send_binary(self, data):
        mask = os.urandom(4)
        n = len(data)
        head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv_frame(self):
        buf = self.rest
        while len(buf) < 2:
            buf += self.sock.recv(4096)
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        i = 2
        if n == 126:
            while len(buf) < 4:
                buf += self.sock.recv(4096)
            n, i = struct.unpack(">H", buf[2:4])[0], 4
        while len(buf) < i + n:
            buf += self.sock.recv(4096)
        self.rest = buf[i + n:]
        return opcode, buf[i:i + n]

    def close(self):
        self.sock.close()


def test_websocket_signing_names_subprotocols_token_and_principal(two, workdir):
    """Rows "MQTT over WebSocket" and "WebSocket principal": GET /mqtt presigned with signing name
    iotdevicegateway or iotdata; a session token appended after signing is accepted; subprotocol
    `mqtt`, or `mqttv3.1` when the client offers only that; MQTT in binary frames (CONNECT →
    CONNACK); the lifecycle event names the access key id as principalIdentifier. Refusals: a
    signature for another service (401, no upgrade); a connection whose client id the IAM policy
    does not allow (CONNACK return code 5)."""
    s = two
    acct = account_of(s)
    host = s.endpoint()
    name, creds = user(s, doc(allow("iot:Connect", f"arn:aws:iot:{REGION}:{acct}:client/ws-*"),
                              allow("sts:GetSessionToken")))
    tok = client(s, "sts", creds).get_session_token(DurationSeconds=900)["Credentials"]
    mon = Paho(s, host, Device(s, s.boto(), unique("wsmon"), ALLOW_ALL, workdir), unique("wsmon"), v5=True)
    assert mon.connect()[0] == 0
    mon.subscribe("$aws/events/presence/connected/+", qos=1)
    cases = [("iotdevicegateway", "mqtt", creds["aws_access_key_id"], creds["aws_secret_access_key"], None),
             ("iotdata", "mqttv3.1", creds["aws_access_key_id"], creds["aws_secret_access_key"], None),
             ("iotdevicegateway", "mqtt, mqttv3.1", tok["AccessKeyId"], tok["SecretAccessKey"], tok["SessionToken"])]
    for service, offered, key, secret, token in cases:
        ws = WebSocket(s, host, presign_mqtt(host, s.https_port, key, secret, service, token), offered)
        assert ws.status == 101, (service, offered, ws.status)
        chosen = "mqttv3.1" if offered == "mqttv3.1" else "mqtt"
        assert ws.headers.get("sec-websocket-protocol") == chosen, ws.headers
        cid = unique("ws-c")
        ws.send_binary(connect_v311(cid))
        opcode, data = ws.recv_frame()
        assert (opcode, data[:1], data[-1:]) == (2, b"\x20", b"\x00"), (opcode, data)
        event = next(json.loads(m.payload) for m in iter(lambda: mon.messages.get(timeout=5), None)
                     if json.loads(m.payload)["clientId"] == cid)
        assert event["principalIdentifier"] == key, event
        ws.close()
    # Refusals.
    ws = WebSocket(s, host, presign_mqtt(host, s.https_port, creds["aws_access_key_id"],
                                         creds["aws_secret_access_key"], "iot"), "mqtt")
    assert (ws.status, ws.headers.get("x-amzn-errortype")) == (403, "ForbiddenException"), (ws.status, ws.headers)
    ws.close()
    ws = WebSocket(s, host, presign_mqtt(host, s.https_port, creds["aws_access_key_id"],
                                         creds["aws_secret_access_key"], "iotdevicegateway"), "mqtt")
    assert ws.status == 101
    ws.send_binary(connect_v311(unique("not-ws")))
    opcode, data = ws.recv_frame()
    assert (opcode, data) == (2, b"\x20\x02\x00\x05"), data
    ws.close()
    mon.close()


# --- the credential provider --------------------------------------------------------------------

def curl_credentials(s, endpoint, dev, alias, thing=None):
    cmd = ["curl", "-s", "-D", "-", "--cacert", s.ca]
    if dev is not None:
        cmd += ["--cert", str(dev.cert), "--key", str(dev.key)]
    if thing:
        cmd += ["-H", f"x-amzn-iot-thingname: {thing}"]
    cmd.append(f"https://{endpoint}:{s.https_port}/role-aliases/{alias}/credentials")
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert cp.returncode == 0, cp.stderr
    head, _, body = cp.stdout.partition("\n\n")  # text mode: curl's CRLFs arrive as LFs
    status = int(head.split()[1])
    headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in head.split("\n")[1:] if ":" in l}
    return status, headers, json.loads(body) if body.strip() else None


def test_credential_provider_session_and_trust(two, workdir):
    """Rows "where" (a client certificate is required on this path), "session" (the session
    lasts credentialDurationSeconds and carries credentials-iot:AwsCertificateId, ThingName and
    ThingTypeName for the role's policies), "trust conditions" (aws:SourceAccount and
    aws:SourceArn set when the trust policy is evaluated), "order of checks" (a role whose
    MaxSessionDuration is below the alias's duration: 400) and "error bodies" ({"message"} only,
    the type in x-amzn-ErrorType)."""
    s = two
    iot, iam = s.boto(), s.boto("iam")
    acct = account_of(s)
    arn = f"arn:aws:iot:{REGION}:{acct}"
    endpoint = iot.describe_endpoint(endpointType="iot:CredentialProvider")["endpointAddress"]
    alias_name, other_alias = unique("alias"), unique("alias-other")
    alias_arn = f"{arn}:rolealias/{alias_name}"
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "credentials.iot.amazonaws.com"}, "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"aws:SourceAccount": acct}, "ArnEquals": {"aws:SourceArn": alias_arn}}}]}
    role = iam.create_role(RoleName=unique("cp"), AssumeRolePolicyDocument=json.dumps(trust),
                           MaxSessionDuration=7200)["Role"]
    iam.put_role_policy(RoleName=role["RoleName"], PolicyName="keys", PolicyDocument=doc(
        allow("iot:DescribeCertificate", f"{arn}:cert/${{credentials-iot:AwsCertificateId}}"),
        allow("iot:DescribeThing", f"{arn}:thing/${{credentials-iot:ThingName}}"),
        allow("iot:DescribeThingType", f"{arn}:thingtype/${{credentials-iot:ThingTypeName}}")))
    iot.create_role_alias(roleAlias=alias_name, roleArn=role["Arn"], credentialDurationSeconds=7200)
    # The same role behind another alias: aws:SourceArn is that alias's ARN, so the trust fails.
    iot.create_role_alias(roleAlias=other_alias, roleArn=role["Arn"], credentialDurationSeconds=900)
    tt = unique("tt")
    iot.create_thing_type(thingTypeName=tt)
    iot.create_thing_type(thingTypeName=unique("tt-other"))
    dev = Device(s, iot, unique("cpdev"), {"Version": "2012-10-17", "Statement": [
        allow("iot:AssumeRoleWithCertificate", [alias_arn, f"{arn}:rolealias/{other_alias}"])]}, workdir)
    iot.update_thing(thingName=dev.name, thingTypeName=tt)
    other = Device(s, iot, unique("cpother"), None, workdir)

    # No client certificate on this path: refused (a signed-request client has no certificate).
    status, headers, body = curl_credentials(s, endpoint, None, alias_name, dev.name)
    assert status == 401 and "credentials" not in (body or {}), (status, body)

    status, headers, body = curl_credentials(s, endpoint, dev, alias_name, dev.name)
    assert status == 200, body
    c = body["credentials"]
    left = (datetime.datetime.strptime(c["expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc) - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 7100 < left <= 7200, left
    as_role = client(s, "iot", {"aws_access_key_id": c["accessKeyId"], "aws_secret_access_key": c["secretAccessKey"],
                                "aws_session_token": c["sessionToken"]})
    as_role.describe_certificate(certificateId=dev.cert_id)
    as_role.describe_thing(thingName=dev.name)
    as_role.describe_thing_type(thingTypeName=tt)
    for call in (lambda: as_role.describe_certificate(certificateId=other.cert_id),
                 lambda: as_role.describe_thing(thingName=other.name),
                 lambda: as_role.describe_thing_type(thingTypeName=unique("tt-none"))):
        assert refused(call)[:2] == ("AccessDeniedException", 403)

    status, headers, body = curl_credentials(s, endpoint, dev, other_alias, dev.name)
    assert (status, body) == (400, {"message": "Unable to assume the role, or the role to assume does not exist"})
    assert headers.get("x-amzn-errortype") == "InvalidRequestException"

    # The role's MaxSessionDuration lowered below the alias's 7200 s: 400 at request time.
    # boto3's own update_role: it needs the (empty) <UpdateRoleResult/> element to parse the reply.
    iam.update_role(RoleName=role["RoleName"], MaxSessionDuration=3600)
    assert iam.get_role(RoleName=role["RoleName"])["Role"]["MaxSessionDuration"] == 3600
    status, headers, body = curl_credentials(s, endpoint, dev, alias_name, dev.name)
    assert status == 400 and set(body) == {"message"} and "MaxSessionDuration" in body["message"], body
    assert headers.get("x-amzn-errortype") == "InvalidRequestException"


def test_one_hundred_role_aliases_per_account(workdir):
    """Row "CreateRoleAlias / UpdateRoleAlias": 100 aliases per account; the 101st is
    LimitExceededException; deleting one makes room again."""
    s = Server(workdir / unique("aliases")).start()
    try:
        iot, iam = s.boto(), s.boto("iam")
        role = iam.create_role(RoleName="r", AssumeRolePolicyDocument=json.dumps(TRUST_CREDENTIALS))["Role"]
        for i in range(100):
            iot.create_role_alias(roleAlias=f"a{i}", roleArn=role["Arn"])
        with pytest.raises(ClientError) as e:
            iot.create_role_alias(roleAlias="a100", roleArn=role["Arn"])
        assert code(e.value) == "LimitExceededException", e.value.response
        iot.delete_role_alias(roleAlias="a0")
        iot.create_role_alias(roleAlias="a100", roleArn=role["Arn"])
    finally:
        s.stop()
