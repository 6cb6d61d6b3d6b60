"""Attacks on IAM, STS and IoT authorization with real clients (boto3, botocore's SigV4 signer,
awsiotsdk, paho-mqtt). Each test first shows that the same identity can do the legitimate
thing (positive control), then tries the attack and asserts AWS's specific refusal."""

import json
import queue
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from conftest import ALLOW_ALL, Device, FileDevice, Paho, unique
from helpers import doc, drain_for, keys, outcome, temp, wait_for

REGION = "us-east-1"


# --- helpers ---------------------------------------------------------------------------------

def client(server, service, creds):
    """A boto3 client with explicit credentials against the server's control plane."""
    return boto3.client(service, region_name=REGION, endpoint_url=f"https://localhost:{server.api_port}",
                        verify=server.ca, config=Config(retries={"max_attempts": 1}), **creds)


def account_of(server):
    return server.boto("sts").get_caller_identity()["Account"]


def allow(action, resource="*"):
    return {"Effect": "Allow", "Action": action, "Resource": resource}


def trust_account(account):
    return doc({"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"}, "Action": "sts:AssumeRole"})


def make_user(server, policy=None, name=None):
    """An IAM user with an inline policy and an access key: (name, boto3 credential kwargs, key id)."""
    iam = server.boto("iam")
    name = name or unique("u")
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=policy)
    k = iam.create_access_key(UserName=name)["AccessKey"]
    return name, keys(k), k["AccessKeyId"]


def query_call(server, creds, service, params):
    """A query-protocol (IAM/STS) request signed with SigV4 by botocore, with exactly the form
    parameters given (boto3 itself never sends parameters outside the operation's model).
    Returns (HTTP status, error code or None, body)."""
    url = f"https://localhost:{server.api_port}/"
    body = urllib.parse.urlencode(params).encode()
    req = AWSRequest(method="POST", url=url, data=body,
                     headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    SigV4Auth(Credentials(creds["aws_access_key_id"], creds["aws_secret_access_key"],
                          creds.get("aws_session_token")), service, REGION).add_auth(req)
    raw = urllib.request.Request(url, data=body, method="POST", headers=dict(req.headers.items()))
    ctx = ssl.create_default_context(cafile=server.ca)
    try:
        with urllib.request.urlopen(raw, context=ctx, timeout=10) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    m = re.search(r"<Code>(.*?)</Code>", text)
    return status, (m.group(1) if m else None), text



def first_of(waits, timeout):
    """Which of several (queue, predicate) events happens first within `timeout` seconds
    (`None` if none does)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for name, (q, pred) in waits.items():
            try:
                while True:
                    if pred(q.get(timeout=0.02)):
                        return name
            except queue.Empty:
                pass
    return None


class Ws:
    """awsiotsdk MQTT over WebSocket (SigV4 presigned upgrade) with static credentials; records
    interruptions (the server closing the connection)."""

    def __init__(self, server, creds, client_id):
        from awscrt import auth
        from awsiot import mqtt_connection_builder

        self.interrupted = queue.Queue()
        self.messages = queue.Queue()
        provider = auth.AwsCredentialsProvider.new_static(
            creds["aws_access_key_id"], creds["aws_secret_access_key"], creds.get("aws_session_token"))
        self.conn = mqtt_connection_builder.websockets_with_default_aws_signing(
            endpoint=server.endpoint(), port=server.https_port, region=REGION, credentials_provider=provider,
            ca_filepath=server.ca, client_id=client_id, clean_session=True, keep_alive_secs=30,
            reconnect_min_timeout_secs=30, reconnect_max_timeout_secs=60,
            on_connection_interrupted=lambda connection, error, **kw: self.interrupted.put(error))

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
        return fut

    def close(self):
        try:
            self.conn.disconnect().result(5)
        except Exception:
            pass


def monitor(server, workdir, topic_filter):
    """A certificate device allowed everything, subscribed to `topic_filter` (MQTT 5)."""
    dev = Device(server, server.boto(), unique("mon"), ALLOW_ALL, workdir)
    m = Paho(server, server.endpoint(), dev, dev.name, v5=True)
    assert m.connect()[0] == 0
    assert m.subscribe(topic_filter, qos=1)[0].value == 1
    return m


# --- 1. IAM privilege escalation through conflicting parameters ------------------------------

@pytest.mark.parametrize("action", ["PutRolePolicy", "UpdateAssumeRolePolicy"])
def test_role_action_authorized_on_role_name_not_on_extra_user_name(server, action):
    """A user allowed iam:PutRolePolicy / iam:UpdateAssumeRolePolicy on role/sandbox-* only
    names another role in RoleName and a sandbox name in UserName: the request must be judged
    on the role it changes (403 AccessDenied) and leave that role unchanged."""
    s = server
    iam = s.boto("iam")
    account = account_of(s)
    sandbox, admin = unique("sandbox"), unique("admin-role")
    for r in (sandbox, admin):
        iam.create_role(RoleName=r, AssumeRolePolicyDocument=trust_account(account))
    attacker, creds, _ = make_user(s, doc(allow(["iam:PutRolePolicy", "iam:UpdateAssumeRolePolicy"],
                                                f"arn:aws:iam::{account}:role/sandbox-*")))
    if action == "PutRolePolicy":
        payload = {"PolicyName": "pwn", "PolicyDocument": doc(allow("*"))}

        def state(role):
            return iam.list_role_policies(RoleName=role)["PolicyNames"]
    else:
        payload = {"PolicyDocument": doc({"Effect": "Allow", "Action": "sts:AssumeRole",
                                          "Principal": {"AWS": f"arn:aws:iam::{account}:user/{attacker}"}})}

        def state(role):
            return iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
    base = {"Action": action, "Version": "2010-05-08", **payload}
    admin_before = state(admin)

    # Positive control: the same signer and user may change the sandbox role.
    status, err, body = query_call(s, creds, "iam", {**base, "RoleName": sandbox})
    assert status == 200, body
    assert state(sandbox) == (["pwn"] if action == "PutRolePolicy" else json.loads(payload["PolicyDocument"]))
    # Baseline: the admin role by itself is refused.
    status, err, body = query_call(s, creds, "iam", {**base, "RoleName": admin})
    assert status == 403, body

    # Attack: RoleName names the admin role, UserName a sandbox name.
    status, err, body = query_call(s, creds, "iam", {**base, "RoleName": admin, "UserName": sandbox})
    admin_after = state(admin)
    assert (status, err, admin_after) == (403, "AccessDenied", admin_before), (
        f"{action} on {admin} with UserName={sandbox}: HTTP {status} {err}; {admin}'s "
        f"{'inline policies' if action == 'PutRolePolicy' else 'trust policy'} went from {admin_before} to {admin_after}")


def test_create_access_key_authorized_on_user_not_on_extra_role_name(server):
    """A user allowed iam:* on role/* only calls CreateAccessKey for another user, adding a
    RoleName: it must be refused (403 AccessDenied) and the other user must get no key."""
    s = server
    iam = s.boto("iam")
    account = account_of(s)
    victim = unique("admin-user")
    iam.create_user(UserName=victim)
    iam.put_user_policy(UserName=victim, PolicyName="admin", PolicyDocument=doc(allow("*")))
    _, creds, _ = make_user(s, doc(allow("iam:*", f"arn:aws:iam::{account}:role/*")))

    # Positive control: the user manages roles, with boto3 and with the raw signer.
    mine = unique("ops")
    client(s, "iam", creds).create_role(RoleName=mine, AssumeRolePolicyDocument=trust_account(account))
    status, err, body = query_call(s, creds, "iam", {"Action": "GetRole", "Version": "2010-05-08", "RoleName": mine})
    assert status == 200 and f"<RoleName>{mine}</RoleName>" in body, body
    # Baseline: a key for the victim, asked plainly, is refused.
    status, err, body = query_call(s, creds, "iam", {"Action": "CreateAccessKey", "Version": "2010-05-08",
                                                     "UserName": victim})
    assert status == 403, body

    # Attack: the same with a RoleName alongside.
    status, err, body = query_call(s, creds, "iam", {"Action": "CreateAccessKey", "Version": "2010-05-08",
                                                     "UserName": victim, "RoleName": "anything"})
    victim_keys = [k["AccessKeyId"] for k in iam.list_access_keys(UserName=victim)["AccessKeyMetadata"]]
    assert (status, err, victim_keys) == (403, "AccessDenied", []), (
        f"CreateAccessKey UserName={victim} RoleName=anything: HTTP {status} {err}; {victim} now has keys {victim_keys}")


# --- 2. Credentials tied to the unique id of their user or role ------------------------------

def test_role_session_dies_with_its_role_not_revived_by_same_name(server):
    """Temporary credentials of role R, after R is deleted and a new role of the same name is
    created, must be refused (InvalidClientTokenId on STS, UnrecognizedClientException on IoT)."""
    s = server
    iam = s.boto("iam")
    account = account_of(s)
    role = unique("ephemeral")
    role_arn = f"arn:aws:iam::{account}:role/{role}"
    reader = doc(allow("iot:ListThings"))

    def create():
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust_account(account))
        iam.put_role_policy(RoleName=role, PolicyName="reader", PolicyDocument=reader)

    create()
    _, user, _ = make_user(s, doc(allow("sts:AssumeRole", role_arn)))
    old = temp(client(s, "sts", user).assume_role(RoleArn=role_arn, RoleSessionName="old")["Credentials"])
    assert client(s, "sts", old).get_caller_identity()["Arn"] == f"arn:aws:sts::{account}:assumed-role/{role}/old"
    client(s, "iot", old).list_things()

    iam.delete_role_policy(RoleName=role, PolicyName="reader")
    iam.delete_role(RoleName=role)
    create()

    # Positive control: a session of the new role works.
    new = temp(client(s, "sts", user).assume_role(RoleArn=role_arn, RoleSessionName="new")["Credentials"])
    assert client(s, "sts", new).get_caller_identity()["Arn"] == f"arn:aws:sts::{account}:assumed-role/{role}/new"
    client(s, "iot", new).list_things()

    got = outcome(lambda: client(s, "sts", old).get_caller_identity())
    assert got == ("InvalidClientTokenId", 403), f"the deleted role's session is still accepted by STS: {got}"
    got = outcome(lambda: client(s, "iot", old).list_things())
    assert got == ("UnrecognizedClientException", 403), f"the deleted role's session still lists things: {got}"


def test_user_recreated_with_same_name_old_credentials_refused(server):
    """A user deleted and re-created under the same name: its old access key and the session
    token it got from GetSessionToken must not work for the new user (InvalidClientTokenId)."""
    s = server
    iam = s.boto("iam")
    account = account_of(s)
    name, old_key, old_key_id = make_user(s, doc(allow("iot:ListThings")))
    old_session = temp(client(s, "sts", old_key).get_session_token(DurationSeconds=900)["Credentials"])
    assert client(s, "sts", old_session).get_caller_identity()["Arn"] == f"arn:aws:iam::{account}:user/{name}"
    client(s, "iot", old_session).list_things()

    iam.delete_user_policy(UserName=name, PolicyName="p")
    iam.delete_access_key(UserName=name, AccessKeyId=old_key_id)
    iam.delete_user(UserName=name)
    _, new_key, _ = make_user(s, doc(allow("iot:ListThings")), name=name)

    # Positive control: the new user's own key works.
    assert client(s, "sts", new_key).get_caller_identity()["Arn"] == f"arn:aws:iam::{account}:user/{name}"
    client(s, "iot", new_key).list_things()

    got = outcome(lambda: client(s, "sts", old_key).get_caller_identity())
    assert got == ("InvalidClientTokenId", 403), f"the deleted user's access key still works: {got}"
    got = outcome(lambda: client(s, "sts", old_session).get_caller_identity())
    assert got == ("InvalidClientTokenId", 403), f"the deleted user's session token works for the new user: {got}"


# --- 3. MQTT over WebSocket must not outlive its credentials ---------------------------------

CUT_WITHIN = 2.5  # seconds: "within 2 s" of the IAM call returning, plus scheduling slack


def _ws_revocation(server, workdir, creds, revoke, what):
    """Connects over WebSocket with `creds`, proves the connection works, calls `revoke()` and
    asserts that the server closes the connection within CUT_WITHIN seconds."""
    s = server
    tag = unique("wsrev")
    mon = monitor(s, workdir, f"{tag}/#")
    ws = Ws(s, creds, unique("ws")).connect()
    try:
        ws.subscribe(f"{tag}/echo")
        ws.publish(f"{tag}/echo", b"before").result(10)
        assert ws.messages.get(timeout=5) == (f"{tag}/echo", b"before")
        assert wait_for(mon.messages, lambda m: m.payload == b"before", 5) is not None

        revoke()
        t0 = time.monotonic()
        cut = wait_for(ws.interrupted, lambda e: True, CUT_WITHIN)
        took = time.monotonic() - t0
        if cut is None:
            # For the failure message: does the stale connection still publish?
            ws.publish(f"{tag}/echo", b"after")
            leaked = wait_for(mon.messages, lambda m: m.payload == b"after", 3) is not None
            late = wait_for(ws.interrupted, lambda e: True, 0.5)
            pytest.fail(f"MQTT over WebSocket still open {CUT_WITHIN} s after {what}; a publish after it was "
                        f"{'delivered' if leaked else 'not delivered'}"
                        f"{'' if late is None else ' and then the connection was closed (' + str(late) + ')'}")
        assert took <= CUT_WITHIN
        # The monitor (control path) is still served.
        assert mon.c.is_connected()
    finally:
        ws.close()
        mon.close()


def test_websocket_closed_when_access_key_deactivated(server, workdir):
    s = server
    iam = s.boto("iam")
    name, creds, key_id = make_user(s, doc(allow("iot:*")))

    def revoke():
        iam.update_access_key(UserName=name, AccessKeyId=key_id, Status="Inactive")
        # The deactivation is in force on the control plane.
        assert outcome(lambda: client(s, "sts", creds).get_caller_identity()) == ("InvalidClientTokenId", 403)

    _ws_revocation(s, workdir, creds, revoke, "its access key was deactivated")


def test_websocket_closed_when_access_key_deleted(server, workdir):
    s = server
    iam = s.boto("iam")
    name, creds, key_id = make_user(s, doc(allow("iot:*")))

    def revoke():
        iam.delete_access_key(UserName=name, AccessKeyId=key_id)
        assert outcome(lambda: client(s, "sts", creds).get_caller_identity()) == ("InvalidClientTokenId", 403)

    _ws_revocation(s, workdir, creds, revoke, "its access key was deleted")


def test_websocket_closed_when_assumed_role_deleted(server, workdir):
    s = server
    iam = s.boto("iam")
    account = account_of(s)
    role = unique("wsrole")
    role_arn = f"arn:aws:iam::{account}:role/{role}"
    iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust_account(account))
    iam.put_role_policy(RoleName=role, PolicyName="mqtt", PolicyDocument=doc(allow("iot:*")))
    _, user, _ = make_user(s, doc(allow("sts:AssumeRole", role_arn)))
    creds = temp(client(s, "sts", user).assume_role(RoleArn=role_arn, RoleSessionName="ws")["Credentials"])

    def revoke():
        iam.delete_role_policy(RoleName=role, PolicyName="mqtt")
        iam.delete_role(RoleName=role)
        assert outcome(lambda: client(s, "iot", creds).list_things())[0] != "ok"

    _ws_revocation(s, workdir, creds, revoke, "its role was deleted")


# --- 4. An unresolved IoT policy variable must not match its own text ------------------------

THING_VAR = "${iot:Connection.Thing.ThingName}"


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_unresolved_thing_variable_matches_nothing(server, workdir, v5):
    """A certificate with no thing, whose policy allows topic/dev/${iot:Connection.Thing.ThingName}/cmd,
    publishes to that literal topic: AWS leaves the variable unresolved and denies. Sekisho's
    refusal of an unauthorized publish: MQTT 5 PUBACK 0x87 (Not authorized); MQTT 3.1.1 the
    connection is closed (as AWS IoT does)."""
    s = server
    iot = s.boto()
    account = account_of(s)
    arn = f"arn:aws:iot:{REGION}:{account}"
    tag = unique("open")
    policy = {"Version": "2012-10-17", "Statement": [
        allow("iot:Connect", f"{arn}:client/*"),
        allow(["iot:Publish", "iot:Receive"], [f"{arn}:topic/dev/{THING_VAR}/cmd", f"{arn}:topic/{tag}"]),
        allow("iot:Subscribe", [f"{arn}:topicfilter/dev/{THING_VAR}/cmd", f"{arn}:topicfilter/{tag}"])]}

    # The certificate without a thing, with that policy.
    c = iot.create_keys_and_certificate(setAsActive=True)
    name = unique("nothing")
    cert, key = workdir / f"{name}.crt", workdir / f"{name}.key"
    cert.write_text(c["certificatePem"])
    key.write_text(c["keyPair"]["PrivateKey"])
    key.chmod(0o600)
    pol = unique("pol")
    iot.create_policy(policyName=pol, policyDocument=json.dumps(policy))
    iot.attach_policy(policyName=pol, target=c["certificateArn"])
    assert iot.list_principal_things(principal=c["certificateArn"])["things"] == []
    # A device with a thing and the same policy.
    thing = Device(s, iot, unique("cmdthing"), policy, workdir)

    mon = monitor(s, workdir, "dev/#")
    assert mon.subscribe(tag, qos=1)[0].value == 1
    host = s.endpoint()
    owner = Paho(s, host, thing, thing.name, v5=True)
    assert owner.connect()[0] == 0
    p = Paho(s, host, FileDevice(cert, key), name, v5=v5)
    try:
        assert p.connect()[0] == 0

        # Positive controls: the variable resolves for the thing's connection ...
        owner.c.publish(f"dev/{thing.name}/cmd", b"owner-1", qos=1)
        assert owner.pubacks.get(timeout=5)[1].value == 0
        got = wait_for(mon.messages, lambda m: m.payload == b"owner-1", 5)
        assert got is not None and got.topic == f"dev/{thing.name}/cmd"
        # ... and the thingless certificate may publish where its policy has no variable.
        p.c.publish(tag, b"free", qos=1)
        assert p.pubacks.get(timeout=5)[1].value == 0
        assert wait_for(mon.messages, lambda m: m.payload == b"free", 5) is not None

        # Attack: the variable's own text as the topic.
        literal = f"dev/{THING_VAR}/cmd"
        info = p.c.publish(literal, b"injected", qos=1)
        if v5:
            mid, rc = p.pubacks.get(timeout=5)
            assert mid == info.mid
            assert rc.value == 0x87, f"publish to the literal {literal!r} without a thing: PUBACK {rc}"
        else:
            # MQTT 3.1.1: the server closes the connection; no PUBACK comes.
            first = first_of({"disconnect": (p.disconnects, lambda rc: True),
                              "puback": (p.pubacks, lambda a: a[0] == info.mid)}, 5)
            assert first == "disconnect", f"publish to the literal {literal!r} without a thing: {first}"
        # Control path in the same window: the owner's next command arrives, the injected one never.
        owner.c.publish(f"dev/{thing.name}/cmd", b"owner-2", qos=1)
        seen = []
        assert wait_for(mon.messages, lambda m: seen.append(m.payload) or m.payload == b"owner-2", 5) is not None
        seen += [m.payload for m in drain_for(mon.messages, 0.3)]
        assert b"injected" not in seen, f"the injected command was delivered: {seen}"
        if v5:
            rcs = p.subscribe(literal, qos=1)
            assert rcs[0].value == 0x87, f"subscribe to the literal {literal!r} without a thing: SUBACK {rcs}"
    finally:
        p.close()
        owner.close()
        mon.close()


# --- 5. IAM's own AccessDenied ---------------------------------------------------------------

def test_iam_denial_is_access_denied(server):
    """An IAM user denied an IAM action gets IAM's error: HTTP 403, code AccessDenied (not the
    restJson AccessDeniedException)."""
    s = server
    account = account_of(s)
    name, creds, _ = make_user(s, None)
    s.boto("iam").put_user_policy(UserName=name, PolicyName="self", PolicyDocument=doc(
        allow("iam:GetUser", f"arn:aws:iam::{account}:user/{name}")))
    iam = client(s, "iam", creds)
    # Positive control: allowed IAM call.
    assert iam.get_user(UserName=name)["User"]["Arn"] == f"arn:aws:iam::{account}:user/{name}"
    # Denied: another IAM action; with boto3 and with the AWS query protocol's raw reply.
    got = outcome(lambda: iam.list_users())
    assert got == ("AccessDenied", 403), f"ListUsers denied with {got}"
    status, err, body = query_call(s, creds, "iam", {"Action": "CreateUser", "Version": "2010-05-08",
                                                     "UserName": unique("x")})
    assert (status, err) == (403, "AccessDenied"), body
    assert "<Type>Sender</Type>" in body, body
