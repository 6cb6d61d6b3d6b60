"""Findings of a second security review, each turned into an attack next to a positive control,
with real clients (boto3, botocore's signers, paho-mqtt, raw TLS where the attack needs bytes or
timing no client gives), asserting AWS's specific refusal:

1. Long names cost nothing: policy matching is linear and IAM names are bounded before they
   are authorized, so a 900,000-character UserName (IAM) or resource (TestAuthorization) is
   answered at once while the server keeps answering others.
2. Policy dates out of range (year 999999999999, offset +3000000000000000:00) are a malformed
   policy, not an overflow: IoT CreatePolicy, IAM PutUserPolicy and AssumeRole's session policy.
3. GetSessionToken credentials cannot call IAM (InvalidClientTokenId), as on AWS without MFA.
4. Trust pinning reads the parsed trust policy: a JSON-escaped ARN (`user\\/mallory`) naming a
   user who does not exist yet trusts nobody, even after that user is created.
5. MQTT over WebSocket through a private endpoint carries the VPC keys (aws:SourceVpce), not
   aws:SourceIp, as requests through it do.
6. Session policies are at most 2,048 characters.
7. Sekisho's own device CA cannot be registered as an account's CA.
8. On a dual-stack socket (bind ::), IPv4 clients are IPv4 for aws:SourceIp on MQTT (certificate)
   and MQTT over WebSocket too.
"""

import base64
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from conftest import ALLOW_ALL, Device, Openssl, Server, free_port, unique
from test_security_review import (REGION, account_of, allow, client, code, deny, doc, make_user, mqtt_connect,
                                  presigned_mqtt_url, read_mqtt, root_creds, tls_socket)

VPCE = "vpce-0a1b2c3d4e5f67890"
VPC = "vpc-0123456789abcdef0"
LONG = 900_000  # characters of the long name / resource (the request body stays under 1 MiB)
# Long requests sent at once: one per runtime worker thread (tokio starts one per CPU), so that a
# server that computes on them for long has no thread left for anyone else.
AT_ONCE = min(max(os.cpu_count() or 2, 2), 8)


@pytest.fixture(scope="module")
def rv2(workdir):
    """One server for most of the file: a second account `b` (profile "b") and a private
    endpoint speaking device HTTPS (so MQTT over WebSocket) on `rv2.private_port`."""
    port = free_port()
    config = f"""
[[endpoints]]
name = "review-vpce"
port = {port}
protocol = "https"
vpc_endpoint_id = "{VPCE}"
vpc_id = "{VPC}"
"""
    s = Server(workdir / unique("review2"), config=config, accounts=("b",))
    s.private_port = port
    s.start()
    yield s
    s.stop()


@pytest.fixture
def lone(workdir):
    """A server of the test's own, for the tests that try to tie up the server's threads: a
    server that falls for it does not take the rest of the file down with it."""
    s = Server(workdir / unique("lone"), accounts=("b",)).start()
    yield s
    s.stop()


# --- helpers ---------------------------------------------------------------------------------

def result(call):
    """Runs a boto3 call: ("ok", 200), (error code, HTTP status), or ("no answer", why) when the
    connection failed (e.g. the server's task died)."""
    try:
        call()
        return "ok", 200
    except ClientError as e:
        return code(e), e.response["ResponseMetadata"]["HTTPStatusCode"]
    except BotoCoreError as e:
        return "no answer", repr(e)


def unvalidated(server, service, creds):
    """boto3 for the control plane without botocore's own parameter checks (which would refuse
    the long names before the server sees them)."""
    return boto3.client(service, region_name=REGION, endpoint_url=f"https://localhost:{server.api_port}",
                        verify=server.ca, config=Config(retries={"max_attempts": 1}, parameter_validation=False),
                        **creds)


class _Prepared(Exception):
    def __init__(self, request):
        super().__init__("prepared")
        self.request = request


def prepared(boto_client, call):
    """The HTTP request `call` (a call on `boto_client`) would send, built and signed by
    botocore, but not sent."""
    def grab(request, **_):
        raise _Prepared(request)

    boto_client.meta.events.register_first("before-send", grab)
    try:
        call()
    except _Prepared as p:
        return p.request
    finally:
        boto_client.meta.events.unregister("before-send", grab)
    raise AssertionError("botocore sent nothing")


def send_raw(server, port, req):
    """Sends a botocore-prepared request as it is over a TLS socket of its own; returns the
    socket (the request entirely handed to the kernel)."""
    url = urllib.parse.urlsplit(req.url)
    body = req.body or b""
    if isinstance(body, str):
        body = body.encode()
    target = url.path + (f"?{url.query}" if url.query else "")
    headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "content-length")}
    head = (f"{req.method} {target} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v.decode() if isinstance(v, bytes) else v}\r\n" for k, v in headers.items())
            + "\r\n").encode()
    sock = tls_socket(server, port, "localhost", timeout=15)
    sock.sendall(head + body)
    return sock


def read_http(sock, timeout):
    """One HTTP response: (status, body), or ("no answer", why) if none came within `timeout`."""
    end = time.monotonic() + timeout
    buf = b""
    while True:
        if b"\r\n\r\n" in buf:
            head, rest = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            hdrs = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            n = int(hdrs.get("content-length", "-1"))
            if 0 <= n <= len(rest):
                return int(lines[0].split(" ", 2)[1]), rest[:n]
        left = end - time.monotonic()
        if left <= 0:
            return "no answer", f"nothing complete within {timeout} s ({len(buf)} bytes)"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            continue
        except (ConnectionError, ssl.SSLError, OSError) as e:
            return "no answer", str(e)
        if not chunk:
            if b"\r\n\r\n" in buf:
                head, rest = buf.split(b"\r\n\r\n", 1)
                return int(head.split(b" ", 2)[1]), rest
            return "no answer", "EOF"
        buf += chunk


def health(server, timeout):
    """GET /health on a connection of its own: the status, or ("no answer", why)."""
    try:
        sock = tls_socket(server, server.api_port, "localhost", timeout=timeout)
    except (OSError, ssl.SSLError) as e:
        return "no answer", str(e)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        got = read_http(sock, timeout)
        return got[0] if got[0] != "no answer" else got
    finally:
        sock.close()


def long_requests_and_health(server, requests, timeout=12.0):
    """Sends `requests` (prepared, each on its own connection, all at once), then GET /health on
    another connection while they are in. Returns ([(answer, seconds)] for the requests,
    (health answer, seconds, whether it came before every request's answer))."""
    socks = [send_raw(server, server.api_port, r) for r in requests]
    sent = time.monotonic()
    answers, done = [None] * len(socks), [None] * len(socks)
    health_out = {}

    def read(i):
        answers[i] = read_http(socks[i], timeout)
        done[i] = time.monotonic()

    def check():
        health_out["answer"] = health(server, timeout)
        health_out["done"] = time.monotonic()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(socks))]
    h = threading.Thread(target=check)
    h.start()
    for t in threads:
        t.start()
    h.join()
    for t in threads:
        t.join()
    for s in socks:
        s.close()
    first_long = min(done)
    return ([(a, d - sent) for a, d in zip(answers, done)],
            (health_out["answer"], health_out["done"] - sent, health_out["done"] < first_long))


def query_error(body):
    """The <Code> of an IAM/STS XML error body."""
    text = body.decode("utf-8", "replace")
    return text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else text[:200]


def health_in_time(h):
    """GET /health was answered 200 before the long requests were, or within 2 s of their
    sending."""
    answer, took, first = h
    return answer == 200 and (first or took < 2.0)


# --- 1. Long names cost nothing --------------------------------------------------------------

def test_long_user_name_is_validation_error_at_once(lone):
    """A user with the self-service policy (Resource arn:aws:iam::*:user/${aws:username}) sends
    ListAccessKeys with a UserName of 900,000 characters, AT_ONCE times at once: each is 400
    ValidationError at once, and GET /health on another connection answers meanwhile. Positive
    control: the same raw request with its own name is 200 and lists its key."""
    s = lone
    name, creds, key_id = make_user(s, doc(allow(["iam:ListAccessKeys", "iam:CreateAccessKey"],
                                                 "arn:aws:iam::*:user/${aws:username}")))
    iam = unvalidated(s, "iam", creds)

    # Positive control, the same way (built by botocore, sent raw).
    sock = send_raw(s, s.api_port, prepared(iam, lambda: iam.list_access_keys(UserName=name)))
    try:
        status, body = read_http(sock, 10)
    finally:
        sock.close()
    assert status == 200 and f"<AccessKeyId>{key_id}</AccessKeyId>".encode() in body, (status, body[:300])

    long_req = prepared(iam, lambda: iam.list_access_keys(UserName="x" * LONG))
    assert len(long_req.body) > LONG
    answers, h = long_requests_and_health(s, [long_req] * AT_ONCE)
    got = [(a[0], query_error(a[1]) if a[0] != "no answer" else a[1], round(t, 2)) for a, t in answers]
    assert all(st == 400 and err == "ValidationError" and t < 2.0 for st, err, t in got), (
        f"ListAccessKeys with a {LONG}-character UserName: {got}; GET /health meanwhile: {h}")
    assert health_in_time(h), f"GET /health while the long names were in: {h}; the long requests: {got}"


def test_long_test_authorization_resource_answered_at_once(lone):
    """Account b's root asks TestAuthorization about a 900,000-character topic resource against
    an ordinary multi-wildcard policy (topic/*/x), AT_ONCE times at once: each is answered
    promptly (IMPLICIT_DENY, or 400), and GET /health answers meanwhile. Positive control:
    a short resource the policy names is ALLOWED."""
    s = lone
    iot = unvalidated(s, "iot", root_creds(s, "b"))
    account = account_of(s, "b")
    pol = unique("glob")
    iot.create_policy(policyName=pol, policyDocument=doc(allow("iot:Publish", "arn:aws:iot:*:*:topic/*/x")))
    cert = iot.create_keys_and_certificate(setAsActive=True)["certificateArn"]

    def ask(resource):
        return lambda: iot.test_authorization(principal=cert, policyNamesToAdd=[pol], authInfos=[
            {"actionType": "PUBLISH", "resources": [resource]}])

    short = f"arn:aws:iot:{REGION}:{account}:topic/a/x"
    assert ask(short)()["authResults"][0]["authDecision"] == "ALLOWED"
    # What a resource the policy does not name gets (AWS's enum value).
    assert ask(short[:-1] + "y")()["authResults"][0]["authDecision"] == "IMPLICIT_DENY"

    long_req = prepared(iot, ask(f"arn:aws:iot:{REGION}:{account}:topic/" + "a" * LONG + "/x"))
    answers, h = long_requests_and_health(s, [long_req] * AT_ONCE)

    def verdict(answer):
        status, body = answer
        if status == 200:
            return json.loads(body)["authResults"][0]["authDecision"]
        return status, body[:200]

    got = [(verdict(a) if a[0] != "no answer" else a, round(t, 2)) for a, t in answers]
    assert all((v == "IMPLICIT_DENY" or v[0] == 400) and t < 2.0 for v, t in got), (
        f"TestAuthorization with a {LONG}-character resource: {got}; GET /health meanwhile: {h}")
    assert health_in_time(h), f"GET /health while the long resources were in: {h}; TestAuthorization: {got}"


# --- 2. Policy dates out of range ------------------------------------------------------------

BAD_DATES = ["999999999999-01-01", "2020-01-01T00:00:00+3000000000000000:00"]


def dated(value, action):
    return doc(allow(action, "*", Condition={"DateLessThan": {"aws:CurrentTime": value}}))


@pytest.mark.parametrize("value", BAD_DATES, ids=["year", "offset"])
def test_policy_date_out_of_range_is_malformed(rv2, value):
    """DateLessThan aws:CurrentTime `value` in an IoT policy (CreatePolicy), an IAM inline
    policy (PutUserPolicy) and an AssumeRole session policy: MalformedPolicyException /
    MalformedPolicyDocument (400), nothing stored, the server answering. Positive control:
    2030-01-01T00:00:00Z is accepted by all three."""
    s = rv2
    root = root_creds(s)
    iot, iam, sts = client(s, "iot", root), client(s, "iam", root), client(s, "sts", root)
    account = account_of(s)
    user = unique("dated")
    iam.create_user(UserName=user)
    role = unique("dated")
    iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"}, "Action": "sts:AssumeRole"}]}))
    iam.put_role_policy(RoleName=role, PolicyName="p", PolicyDocument=doc(allow("iot:*")))
    role_arn = f"arn:aws:iam::{account}:role/{role}"

    def attempts(date, tag):
        return {
            "iot CreatePolicy": result(lambda: iot.create_policy(policyName=f"{user}-{tag}",
                                                                 policyDocument=dated(date, "iot:Connect"))),
            "iam PutUserPolicy": result(lambda: iam.put_user_policy(UserName=user, PolicyName=tag,
                                                                    PolicyDocument=dated(date, "iot:*"))),
            "sts AssumeRole": result(lambda: sts.assume_role(RoleArn=role_arn, RoleSessionName=tag,
                                                             Policy=dated(date, "iot:*"))),
        }

    control = attempts("2030-01-01T00:00:00Z", "good")
    got = attempts(value, "bad")
    assert control == dict.fromkeys(control, ("ok", 200)), (
        f"control: DateLessThan 2030-01-01T00:00:00Z refused: {control} (DateLessThan {value}: {got})")
    assert got == {"iot CreatePolicy": ("MalformedPolicyException", 400),
                   "iam PutUserPolicy": ("MalformedPolicyDocument", 400),
                   "sts AssumeRole": ("MalformedPolicyDocument", 400)}, f"DateLessThan {value}: {got}"
    assert result(lambda: iot.get_policy(policyName=f"{user}-bad")) == ("ResourceNotFoundException", 404)
    assert iam.list_user_policies(UserName=user)["PolicyNames"] == ["good"]
    assert health(s, 5) == 200


# --- 3. GetSessionToken credentials cannot call IAM ------------------------------------------

def test_get_session_token_credentials_cannot_call_iam(rv2):
    """A user allowed iam:* gets a GetSessionToken session: with it ListUsers and
    CreateAccessKey are 403 InvalidClientTokenId and no key is created. Positive controls: the
    session's GetCallerIdentity names the user; the user's long-term key calls IAM."""
    s = rv2
    account = account_of(s)
    name, creds, key_id = make_user(s, doc(allow("iam:*")))
    st = client(s, "sts", creds).get_session_token(DurationSeconds=3600)["Credentials"]
    session = {"aws_access_key_id": st["AccessKeyId"], "aws_secret_access_key": st["SecretAccessKey"],
               "aws_session_token": st["SessionToken"]}

    assert client(s, "sts", session).get_caller_identity()["Arn"] == f"arn:aws:iam::{account}:user/{name}"
    long_term = client(s, "iam", creds)
    assert result(lambda: long_term.list_users()) == ("ok", 200)

    iam = client(s, "iam", session)
    got = {"ListUsers": result(lambda: iam.list_users()),
           "CreateAccessKey": result(lambda: iam.create_access_key(UserName=name))}
    assert got == dict.fromkeys(got, ("InvalidClientTokenId", 403)), f"IAM with GetSessionToken credentials: {got}"
    keys_now = [k["AccessKeyId"] for k in long_term.list_access_keys(UserName=name)["AccessKeyMetadata"]]
    assert keys_now == [key_id], keys_now
    # Positive control: the long-term key may create one.
    assert result(lambda: long_term.create_access_key(UserName=name)) == ("ok", 200)


# --- 4. Trust pinning reads the parsed trust policy -------------------------------------------

def test_escaped_trust_arn_of_a_later_user_trusts_nobody(rv2):
    """Roles trust a user by ARN written with a JSON-escaped slash (`user\\/<name>`, as PHP's
    json_encode writes it; the document text is sent as is). Positive control: the user existed
    when the role was made and assumes it. Attack: mallory did not exist yet; once created, his
    AssumeRole is 403 AccessDenied (the plain spelling of the same trust too)."""
    s = rv2
    iam = client(s, "iam", root_creds(s))
    account = account_of(s)
    assume = doc(allow("sts:AssumeRole"))

    def trust(user, escaped):
        text = ('{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":'
                f'"arn:aws:iam::{account}:user/{user}"}},"Action":"sts:AssumeRole"}}]}}')
        return text.replace(":user/", ":user\\/") if escaped else text

    def role_for(user, escaped):
        role = unique("esc" if escaped else "plain")
        document = trust(user, escaped)
        assert ("\\/" in document) == escaped and json.loads(document)["Statement"][0]["Principal"]["AWS"] == (
            f"arn:aws:iam::{account}:user/{user}")
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=document)
        iam.put_role_policy(RoleName=role, PolicyName="p", PolicyDocument=doc(allow("iot:ListThings")))
        return f"arn:aws:iam::{account}:role/{role}"

    # Positive control: the user exists first.
    alice, alice_creds, _ = make_user(s, assume, name=unique("alice"))
    role = role_for(alice, escaped=True)
    got = client(s, "sts", alice_creds).assume_role(RoleArn=role, RoleSessionName="ok")
    assert got["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::{account}:assumed-role/{role.split('/')[-1]}/ok"

    mallory = unique("mallory")
    roles = {"escaped": role_for(mallory, escaped=True), "plain": role_for(mallory, escaped=False)}
    _, m_creds, _ = make_user(s, assume, name=mallory)
    sts = client(s, "sts", m_creds)
    got = {k: result(lambda r=r: sts.assume_role(RoleArn=r, RoleSessionName="mallory")) for k, r in roles.items()}
    assert got == dict.fromkeys(roles, ("AccessDenied", 403)), (
        f"a user created after the role that trusts his name assumed it: {got}")


# --- 5. MQTT over WebSocket through a private endpoint carries the VPC keys --------------------

def ws_connack(server, port, creds, client_id):
    """An MQTT 3.1.1 CONNECT over a WebSocket on `port`, upgraded with a URL presigned with
    `creds`: (upgrade status, CONNACK return code) or (status, ("closed", why) / None)."""
    host = server.endpoint()
    url = presigned_mqtt_url(host, port, creds)
    path = url.split(f":{port}", 1)[1]
    sock = tls_socket(server, port, host)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
                      ).encode())
        sock.settimeout(5)
        resp = b""
        while b"\r\n\r\n" not in resp:
            chunk = sock.recv(4096)
            if not chunk:
                return resp.split(b"\r\n", 1)[0].decode() or "EOF", None
            resp += chunk
        head, _, buf = resp.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode().split(" ", 2)[1]
        if status != "101":
            return status, None
        payload = mqtt_connect(client_id, v5=False)
        mask = os.urandom(4)
        sock.sendall(bytes([0x82, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        end = time.monotonic() + 5
        while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
            left = end - time.monotonic()
            if left <= 0:
                return status, None
            sock.settimeout(left)
            try:
                chunk = sock.recv(4096)
            except (socket.timeout, TimeoutError):
                continue
            except (ConnectionError, ssl.SSLError, OSError) as e:
                return status, ("closed", str(e))
            if not chunk:
                return status, ("closed", "EOF")
            buf += chunk
        op, n = buf[0] & 0x0F, buf[1] & 0x7F
        frame = buf[2:2 + n]
        assert n < 126 and op == 0x2 and frame[:1] == b"\x20", f"expected a binary frame with CONNACK, got {buf[:20]!r}"
        return status, frame[3]
    finally:
        sock.close()


def test_websocket_through_private_endpoint_carries_vpc_keys(rv2):
    """Two users whose iot:Connect Allow is conditioned: one on StringEquals aws:SourceVpce
    <the endpoint's id>, one on IpAddress aws:SourceIp 127.0.0.0/8 (and ::1/128). Over MQTT over
    WebSocket through the private endpoint the first connects (CONNACK 0) and the second is
    refused (CONNACK 5, not authorized); on the public port it is the other way round."""
    s = rv2
    conditions = {"vpce": {"StringEquals": {"aws:SourceVpce": VPCE}},
                  "ip": {"IpAddress": {"aws:SourceIp": ["127.0.0.0/8", "::1/128"]}}}
    users = {}
    for label, cond in conditions.items():
        policy = doc(allow("iot:Connect", "*", Condition=cond),
                     allow(["iot:Publish", "iot:Subscribe", "iot:Receive"]))
        users[label] = make_user(s, policy, name=unique(f"ws-{label}"))[1]

    got = {(label, where): ws_connack(s, port, creds, unique("wsvpc"))
           for label, creds in users.items()
           for where, port in (("private", s.private_port), ("public", s.https_port))}
    assert got == {("vpce", "private"): ("101", 0), ("vpce", "public"): ("101", 5),
                   ("ip", "private"): ("101", 5), ("ip", "public"): ("101", 0)}, (
        f"(condition, listener): (upgrade status, CONNACK return code): {got}")


# --- 6. Session policy size -------------------------------------------------------------------

def session_policy(chars):
    """A valid session policy of exactly `chars` characters (a long Sid)."""
    def text(sid):
        return json.dumps({"Version": "2012-10-17", "Statement": [
            {"Sid": sid, "Effect": "Allow", "Action": "iot:ListThings", "Resource": "*"}]}, separators=(",", ":"))
    out = text("S" * (chars - len(text(""))))
    assert len(out) == chars
    return out


def test_session_policy_over_2048_characters_is_validation_error(rv2):
    """AssumeRole with a session policy of 2,049 characters: 400 ValidationError. Positive
    control: 2,048 characters is 200 and the session works within it."""
    s = rv2
    root = root_creds(s)
    iam, sts = client(s, "iam", root), client(s, "sts", root)
    account = account_of(s)
    role = unique("sized")
    iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"}, "Action": "sts:AssumeRole"}]}))
    iam.put_role_policy(RoleName=role, PolicyName="p", PolicyDocument=doc(allow("iot:*")))
    arn = f"arn:aws:iam::{account}:role/{role}"

    creds = sts.assume_role(RoleArn=arn, RoleSessionName="fits", Policy=session_policy(2048))["Credentials"]
    session = {"aws_access_key_id": creds["AccessKeyId"], "aws_secret_access_key": creds["SecretAccessKey"],
               "aws_session_token": creds["SessionToken"]}
    assert result(lambda: client(s, "iot", session).list_things()) == ("ok", 200)
    assert result(lambda: client(s, "iot", session).list_policies()) == ("AccessDeniedException", 403)

    got = result(lambda: sts.assume_role(RoleArn=arn, RoleSessionName="over", Policy=session_policy(2049)))
    assert got == ("ValidationError", 400), f"AssumeRole with a 2,049-character session policy: {got}"


# --- 7. Sekisho's own device CA is no account's ----------------------------------------------

def test_own_device_ca_cannot_be_registered(rv2, workdir):
    """Account b gets a verification certificate for Sekisho's device CA (CreateCertificateFromCsr
    with its registration code as CN, as the review did) and registers that CA, DEFAULT mode
    with auto-registration, or SNI_ONLY: 400 CertificateValidationException both times, and b
    lists no CA. Positive control: a CA made with openssl registers in b (DEFAULT with its
    verification certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    s = rv2
    b = client(s, "iot", root_creds(s, "b"))
    device_ca = (s.data_dir / "device-ca.pem").read_text()
    registration_code = b.get_registration_code()["registrationCode"]

    # Positive control.
    pki = Openssl(workdir / unique("ownca"))
    ca = pki.ca("factory-ca")
    verification = pki.leaf("factory-verification", registration_code, ca)
    own = b.register_ca_certificate(caCertificate=ca[0].read_text(),
                                    verificationCertificate=verification[0].read_text(),
                                    setAsActive=True)["certificateId"]

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_code)])).sign(key, hashes.SHA256())
    signed = b.create_certificate_from_csr(
        certificateSigningRequest=csr.public_bytes(serialization.Encoding.PEM).decode(), setAsActive=False)
    got = {
        "DEFAULT": result(lambda: b.register_ca_certificate(
            caCertificate=device_ca, verificationCertificate=signed["certificatePem"], setAsActive=True,
            allowAutoRegistration=True)),
        "SNI_ONLY": result(lambda: b.register_ca_certificate(caCertificate=device_ca, certificateMode="SNI_ONLY",
                                                             setAsActive=True)),
    }
    assert got == dict.fromkeys(got, ("CertificateValidationException", 400)), (
        f"registering Sekisho's own device CA in account b: {got}")
    assert [c["certificateId"] for c in b.list_ca_certificates()["certificates"]] == [own]


# --- 8. Dual-stack: IPv4 clients are IPv4 on every surface ------------------------------------

def mqtt5_connack(server, host, cert, key, client_id):
    """An MQTT 5 CONNECT over mutual TLS from 127.0.0.1: the CONNACK reason code, or
    ("refused", why)."""
    try:
        sock = tls_socket(server, server.mqtt_port, host, cert, key)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        return "refused", str(e)
    try:
        sock.sendall(mqtt_connect(client_id, v5=True))
        p = read_mqtt(sock)
        if p is None:
            return "refused", read_mqtt.error
        assert p[0] == 0x20, f"expected CONNACK, got {p[0]:#x}"
        return p[1][1]
    finally:
        sock.close()


def test_dual_stack_ipv4_clients_match_ipv4_source_ip(workdir):
    """A server bound to :: (dual stack): IPv4 clients arrive as ::ffff:127.0.0.1. A Deny on
    aws:SourceIp 127.0.0.0/8 refuses a certificate's MQTT CONNECT from 127.0.0.1 (CONNACK 0x87)
    and an IAM user's CONNECT over WebSocket (CONNACK 5). Positive controls: a device and a user
    with the same Allow and no Deny connect (CONNACK 0)."""
    s = Server(workdir / unique("dual"), config='bind = ["::"]\n').start()
    try:
        iot = client(s, "iot", root_creds(s))
        host = s.endpoint()
        blocked = deny("*", "*", Condition={"IpAddress": {"aws:SourceIp": "127.0.0.0/8"}})
        dev_ok = Device(s, iot, unique("dual-ok"), ALLOW_ALL, workdir)
        dev_no = Device(s, iot, unique("dual-no"), json.loads(doc(allow("iot:*"), blocked)), workdir)
        _, user_ok, _ = make_user(s, doc(allow("iot:*")))
        _, user_no, _ = make_user(s, doc(allow("iot:*"), blocked))

        got = {"device": mqtt5_connack(s, host, dev_ok.cert, dev_ok.key, dev_ok.name),
               "device with Deny": mqtt5_connack(s, host, dev_no.cert, dev_no.key, dev_no.name),
               "user": ws_connack(s, s.https_port, user_ok, unique("dualws")),
               "user with Deny": ws_connack(s, s.https_port, user_no, unique("dualws"))}
        assert got == {"device": 0, "device with Deny": 0x87, "user": ("101", 0), "user with Deny": ("101", 5)}, (
            f"from 127.0.0.1 to a server on [::], with and without a Deny on aws:SourceIp 127.0.0.0/8: {got}")
    finally:
        s.stop()
