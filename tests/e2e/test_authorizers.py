"""Custom authorizers' control plane and decision, with boto3: a Python Lambda handler written
as for AWS (a device table in code) decides; tokens signed with the authorizer's key reach
it, others never do; its answer is checked as AWS checks it. Devices connect with
tokens over MQTT (ALPN `mqtt` on the HTTPS port, as the AWS IoT Device SDKs do) and are held
to the policies the function returned. (WebSocket and HTTPS with tokens come with the next
step of issue 14.)"""

import base64
import io
import json
import queue
import sys
import urllib.parse
import zipfile

import pytest
from botocore.config import Config
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from conftest import Paho, Server, unique

HANDLER = '''
import json, time

DEVICES = {"tok-1": "dev1", "tok-2": "dev2", "tok-3": "dev3"}

def handler(event, context):
    print("AUTHZ-EVENT " + json.dumps(event, sort_keys=True))
    token = event.get("token")
    if token == "slow":
        time.sleep(10)
    if token == "boom":
        raise RuntimeError("boom")
    if token == "bad-answer":
        return {"isAuthenticated": True, "principalId": "has-dash", "refreshAfterInSeconds": 300,
                "disconnectAfterInSeconds": 3600, "policyDocuments": []}
    device = DEVICES.get(token)
    if device is None:
        return {"isAuthenticated": False}
    arn = context.invoked_function_arn.split(":")
    account = arn[4]
    return {"isAuthenticated": True, "principalId": device, "refreshAfterInSeconds": 300,
            "disconnectAfterInSeconds": 3600,
            "policyDocuments": [{"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
                 "Resource": "arn:aws:iot:us-east-1:%s:topic/dev/%s" % (account, device)},
                {"Effect": "Allow", "Action": "iot:Subscribe",
                 "Resource": "arn:aws:iot:us-east-1:%s:topicfilter/dev/%s" % (account, device)},
                {"Effect": "Allow", "Action": "iot:Connect",
                 "Resource": "arn:aws:iot:us-east-1:%s:client/%s-*" % (account, device)}]}]}
'''


def zip_of(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def keypair(bits=2048):
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return key, pem


def sign(key, token):
    return base64.b64encode(key.sign(token.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


FUNCTIONS = f'[functions]\nenabled = true\npython = "{sys.executable}"\n'


def with_authorizer(s):
    """The handler as a function, its authorizer `tokens` (signing with a new key), and the
    permission that lets IoT invoke it."""
    iam = s.boto("iam")
    role = iam.create_role(RoleName="authz-exec", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    lam = s.boto("lambda", config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
    fn = lam.create_function(FunctionName="device-authz", Runtime="python3.11", Role=role, Handler="app.handler",
                             Code={"ZipFile": zip_of({"app.py": HANDLER})}, Timeout=30)["FunctionArn"]
    iot = s.boto(config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
    key, pem = keypair()
    name = "tokens"
    out = iot.create_authorizer(authorizerName=name, authorizerFunctionArn=fn, tokenKeyName="token",
                                tokenSigningPublicKeys={"k1": pem}, status="ACTIVE")
    lam.add_permission(FunctionName="device-authz", StatementId="iot-invoke", Action="lambda:InvokeFunction",
                       Principal="iot.amazonaws.com", SourceArn=out["authorizerArn"])
    return iot, lam, fn, key, name


@pytest.fixture(scope="module")
def fx(workdir):
    s = Server(workdir / "authorizers", config=FUNCTIONS).start()
    yield (s, *with_authorizer(s))
    s.stop()


def events(s):
    """The events the function printed, from the server's log (a line's fields follow it)."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(line.split("AUTHZ-EVENT ", 1)[1])[0]
            for line in s.log_text().splitlines() if "AUTHZ-EVENT " in line]


def test_a_signed_token_reaches_the_function_and_its_decision_comes_back(fx):
    s, iot, lam, fn, key, name = fx
    d = iot.describe_authorizer(authorizerName=name)["authorizerDescription"]
    assert (d["authorizerFunctionArn"], d["tokenKeyName"], d["status"], d["signingDisabled"]) == (
        fn, "token", "ACTIVE", False)
    out = iot.test_invoke_authorizer(authorizerName=name, token="tok-1", tokenSignature=sign(key, "tok-1"),
                                     mqttContext={"username": "u?x=1", "password": b"secret", "clientId": "c1"},
                                     tlsContext={"serverName": "example.iot.us-east-1.localhost"})
    assert (out["isAuthenticated"], out["principalId"], out["refreshAfterInSeconds"],
            out["disconnectAfterInSeconds"]) == (True, "dev1", 300, 3600)
    doc = json.loads(out["policyDocuments"][0])
    assert doc["Statement"][0]["Resource"].endswith(":topic/dev/dev1")
    # The event as AWS documents it.
    e = events(s)[-1]
    assert e["token"] == "tok-1" and e["signatureVerified"] is True
    assert e["protocols"] == ["tls", "mqtt"]
    assert e["protocolData"]["mqtt"] == {"username": "u?x=1", "password": base64.b64encode(b"secret").decode(),
                                         "clientId": "c1"}
    assert e["protocolData"]["tls"] == {"serverName": "example.iot.us-east-1.localhost"}
    assert e["connectionMetadata"]["id"]
    # An unknown token: not authenticated (the function's word).
    out = iot.test_invoke_authorizer(authorizerName=name, token="nobody", tokenSignature=sign(key, "nobody"))
    assert out["isAuthenticated"] is False


def test_a_bad_signature_never_reaches_the_function(fx):
    s, iot, lam, fn, key, name = fx
    before = len(events(s))
    other, _ = keypair()
    for sig in (sign(other, "tok-2"), sign(key, "tok-3"), "not base64!", None):
        kw = {"tokenSignature": sig} if sig else {}
        with pytest.raises(iot.exceptions.InvalidRequestException):
            iot.test_invoke_authorizer(authorizerName=name, token="tok-2", **kw)
    assert len(events(s)) == before


def test_failures_of_the_function_are_invalid_responses(fx):
    s, iot, lam, fn, key, name = fx
    for token in ("boom", "bad-answer"):
        with pytest.raises(iot.exceptions.InvalidResponseException):
            iot.test_invoke_authorizer(authorizerName=name, token=token, tokenSignature=sign(key, token))
    # Five seconds at most, whatever the function's own timeout (30 s).
    import time
    t = time.time()
    with pytest.raises(iot.exceptions.InvalidResponseException):
        iot.test_invoke_authorizer(authorizerName=name, token="slow", tokenSignature=sign(key, "slow"))
    assert time.time() - t < 9


def test_the_functions_resource_policy_must_let_iot_invoke(fx, workdir):
    s, iot, lam, fn, key, name = fx
    lam.remove_permission(FunctionName="device-authz", StatementId="iot-invoke")
    try:
        with pytest.raises(iot.exceptions.InvalidRequestException):
            iot.test_invoke_authorizer(authorizerName=name, token="tok-1", tokenSignature=sign(key, "tok-1"))
        # Another authorizer's ARN in the condition is not this one.
        lam.add_permission(FunctionName="device-authz", StatementId="other", Action="lambda:InvokeFunction",
                           Principal="iot.amazonaws.com",
                           SourceArn=iot.describe_authorizer(authorizerName=name)["authorizerDescription"]["authorizerArn"] + "x")
        with pytest.raises(iot.exceptions.InvalidRequestException):
            iot.test_invoke_authorizer(authorizerName=name, token="tok-1", tokenSignature=sign(key, "tok-1"))
        lam.remove_permission(FunctionName="device-authz", StatementId="other")
    finally:
        lam.add_permission(FunctionName="device-authz", StatementId="iot-invoke", Action="lambda:InvokeFunction",
                           Principal="iot.amazonaws.com",
                           SourceArn=iot.describe_authorizer(authorizerName=name)["authorizerDescription"]["authorizerArn"])


def test_the_authorizer_lifecycle_defaults_and_refusals(fx):
    s, iot, lam, fn, key, name = fx
    raw = s.boto(config=Config(parameter_validation=False, retries={"total_max_attempts": 1}))
    _, pem = keypair()
    _, small = keypair(1024)
    unsigned = unique("unsigned")
    iot.create_authorizer(authorizerName=unsigned, authorizerFunctionArn=fn, signingDisabled=True)
    lam.add_permission(FunctionName="device-authz", StatementId=unique("s"), Action="lambda:InvokeFunction",
                       Principal="iot.amazonaws.com")
    out = iot.test_invoke_authorizer(authorizerName=unsigned, token="tok-3",
                                     httpContext={"headers": {"token": "tok-3"}, "queryString": "?a=b"})
    assert out["principalId"] == "dev3"
    e = events(s)[-1]
    assert e["signatureVerified"] is False and e["protocols"] == ["tls", "http"]
    assert e["protocolData"]["http"] == {"headers": {"token": "tok-3"}, "queryString": "?a=b"}
    # Refusals at creation.
    for bad in ({"tokenSigningPublicKeys": {"k": small}, "tokenKeyName": "token"},
                {"tokenSigningPublicKeys": {"k": "not a key"}, "tokenKeyName": "token"},
                {},  # signing enabled without keys
                {"authorizerFunctionArn": "arn:aws:lambda:us-east-1:999999999999:function:x", "signingDisabled": True}):
        args = {"authorizerName": unique("bad"), "authorizerFunctionArn": fn, **bad}
        with pytest.raises(raw.exceptions.InvalidRequestException):
            raw.create_authorizer(**args)
    # At most 5 keys (each connection may try them all): 5 taken, 6 refused.
    five = {f"k{i}": pem for i in range(5)}
    ok = unique("five")
    iot.create_authorizer(authorizerName=ok, authorizerFunctionArn=fn, tokenKeyName="token",
                          tokenSigningPublicKeys=five, status="INACTIVE")
    with pytest.raises(raw.exceptions.InvalidRequestException):
        raw.create_authorizer(authorizerName=unique("six"), authorizerFunctionArn=fn, tokenKeyName="token",
                              tokenSigningPublicKeys={**five, "k5": pem})
    iot.delete_authorizer(authorizerName=ok)
    # A qualified function (a version or alias) is refused: what runs is what is checked.
    with pytest.raises(raw.exceptions.InvalidRequestException):
        raw.create_authorizer(authorizerName=unique("q"), authorizerFunctionArn=fn + ":prod", signingDisabled=True)
    latest = unique("latest")
    iot.create_authorizer(authorizerName=latest, authorizerFunctionArn=fn + ":$LATEST", signingDisabled=True,
                          status="INACTIVE")
    iot.delete_authorizer(authorizerName=latest)
    with pytest.raises(iot.exceptions.ResourceAlreadyExistsException):
        iot.create_authorizer(authorizerName=name, authorizerFunctionArn=fn, tokenKeyName="token",
                              tokenSigningPublicKeys={"k1": pem})
    names = [a["authorizerName"] for a in iot.list_authorizers()["authorizers"]]
    assert name in names and unsigned in names
    # The default authorizer.
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_default_authorizer()
    iot.set_default_authorizer(authorizerName=unsigned)
    assert iot.describe_default_authorizer()["authorizerDescription"]["authorizerName"] == unsigned
    # Deleting: ACTIVE refused, the default refused.
    iot.update_authorizer(authorizerName=unsigned, status="INACTIVE")
    with pytest.raises(iot.exceptions.DeleteConflictException):
        iot.delete_authorizer(authorizerName=unsigned)
    with pytest.raises(iot.exceptions.InvalidRequestException):
        iot.test_invoke_authorizer(authorizerName=unsigned, token="tok-3")
    iot.clear_default_authorizer()
    iot.delete_authorizer(authorizerName=unsigned)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_authorizer(authorizerName=unsigned)
    with pytest.raises(iot.exceptions.DeleteConflictException):
        iot.delete_authorizer(authorizerName=name)


# --- Devices connecting with tokens: MQTT with ALPN `mqtt` on the HTTPS port ------------------

def token_username(name, key, token, user="dev", extra=""):
    """The username the AWS IoT Device SDKs build: the authorizer, the signature URL-encoded,
    the token under the authorizer's key name, and SDK metrics after."""
    sig = urllib.parse.quote(sign(key, token), safe="")
    named = f"x-amz-customauthorizer-name={name}&" if name else ""
    return f"{user}?{named}x-amz-customauthorizer-signature={sig}&token={token}{extra}"


def token_client(s, client_id, username, v5=True, password=None):
    return Paho(s, s.endpoint(), None, client_id, v5=v5, port=s.https_port, alpn=["mqtt"], username=username,
                password=password)


def test_a_device_connects_with_a_token_and_is_held_to_the_functions_policies(fx):
    s, iot, lam, fn, key, name = fx
    c = token_client(s, "dev1-a", token_username(name, key, "tok-1", extra="&SDK=PythonV2&Version=1.31.0"),
                     password="s3cret")
    rc, _, _ = c.connect()
    try:
        assert rc == 0, rc
        # The function saw the CONNECT as sent: username, password (base64), client id, and the
        # server name the device dialled.
        e = events(s)[-1]
        assert e["token"] == "tok-1" and e["signatureVerified"] is True
        assert e["protocols"] == ["tls", "mqtt"]
        mqtt_data = e["protocolData"]["mqtt"]
        assert mqtt_data["clientId"] == "dev1-a"
        assert mqtt_data["username"].startswith("dev?x-amz-customauthorizer-name=tokens&")
        assert base64.b64decode(mqtt_data["password"]) == b"s3cret"
        assert e["protocolData"]["tls"] == {"serverName": s.endpoint()}
        # Its own topic: subscribed, published, received.
        assert [r.value for r in c.subscribe("dev/dev1", qos=1)] == [1]
        c.c.publish("dev/dev1", b"hello", qos=1)
        _, rc = c.pubacks.get(timeout=10)
        assert rc.value == 0, rc
        assert c.messages.get(timeout=10).payload == b"hello"
        # Another device's topic: refused, as the returned policy says.
        assert [r.value for r in c.subscribe("dev/dev2", qos=1)] == [0x87]
        c.c.publish("dev/dev2", b"x", qos=1)
        _, rc = c.pubacks.get(timeout=10)
        assert rc.value == 0x87, rc
    finally:
        c.close()
    # The function's policy allows only client ids `dev1-*` for this token.
    c = token_client(s, "other", token_username(name, key, "tok-1"))
    try:
        rc, _, _ = c.connect()
        assert rc.value == 0x87, rc
    finally:
        c.close()


def test_tokens_that_fail_are_refused_at_connect(fx):
    s, iot, lam, fn, key, name = fx
    other, _ = keypair()
    before = len(events(s))
    # A signature by another key: refused, and the function is never invoked.
    bad = token_username(name, other, "tok-1")
    c = token_client(s, "dev1-b", bad)
    try:
        rc, _, _ = c.connect()
        assert rc.value == 0x87, rc
    finally:
        c.close()
    # MQTT 3.1.1: CONNACK 5, not authorized (paho reports it as MQTT 5's 0x87).
    c = token_client(s, "dev1-c", bad, v5=False)
    try:
        rc, _, _ = c.connect()
        assert rc == 0x87 and not c.v5, rc
    finally:
        c.close()
    assert len(events(s)) == before
    # An unknown token: the function says no.
    c = token_client(s, "dev1-d", token_username(name, key, "nobody"))
    try:
        rc, _, _ = c.connect()
        assert rc.value == 0x87, rc
    finally:
        c.close()
    assert len(events(s)) == before + 1
    # No authorizer named and none by default, or one that does not exist: bad user name or
    # password (MQTT 3.1.1: 4, which paho reports as 0x86).
    for username, v5 in ((token_username(None, key, "tok-1"), True), (token_username("nope", key, "tok-1"), False)):
        c = token_client(s, "dev1-e", username, v5=v5)
        try:
            rc, _, _ = c.connect()
            assert rc == 0x86, rc
        finally:
            c.close()


def test_the_default_authorizer_decides_when_none_is_named(fx):
    s, iot, lam, fn, key, name = fx
    iot.set_default_authorizer(authorizerName=name)
    try:
        c = token_client(s, "dev2-a", token_username(None, key, "tok-2"))
        try:
            rc, _, _ = c.connect()
            assert rc == 0, rc
            assert [r.value for r in c.subscribe("dev/dev2", qos=1)] == [1]
        finally:
            c.close()
    finally:
        iot.clear_default_authorizer()


def test_alpn_mqtt_without_an_accounts_server_name_is_refused(fx):
    s, iot, lam, fn, key, name = fx
    # `localhost` names no account: nothing to look the authorizer up in.
    c = Paho(s, "localhost", None, "dev1-f", v5=True, port=s.https_port, alpn=["mqtt"],
             username=token_username(name, key, "tok-1"))
    try:
        try:
            rc, _, _ = c.connect(timeout=5)
        except (queue.Empty, OSError):
            rc = None  # closed without a CONNACK
        assert rc is None or rc != 0, rc
    finally:
        c.close()
    assert "MQTT by ALPN mqtt without an account's server name" in s.log_text()


def test_the_device_sdk_connects_through_a_custom_authorizer(workdir):
    """The AWS IoT Device SDK for Python v2's custom-authorizer builder, as its sample uses it:
    port 443 and ALPN `mqtt` (which it sets itself), the signature URL-encoded by the SDK, its
    metrics appended to the username. Skipped where 443 cannot be bound."""
    from awscrt import mqtt
    from awsiot import mqtt_connection_builder
    s = Server(workdir / "authorizers-443", config=FUNCTIONS)
    s.https_port = 443
    try:
        s.start()
    except Exception as e:  # noqa: BLE001 - not root, or 443 in use
        pytest.skip(f"cannot serve on port 443 here: {str(e).splitlines()[0]}")
    try:
        iot, lam, fn, key, name = with_authorizer(s)
        conn = mqtt_connection_builder.direct_with_custom_authorizer(
            endpoint=s.endpoint(), ca_filepath=s.ca, client_id="dev3-sdk", clean_session=True,
            auth_username="device", auth_authorizer_name=name, auth_authorizer_signature=sign(key, "tok-3"),
            auth_token_key_name="token", auth_token_value="tok-3", auth_password=b"pw")
        conn.connect().result(15)
        try:
            got = queue.Queue()
            sub, _ = conn.subscribe("dev/dev3", mqtt.QoS.AT_LEAST_ONCE,
                                    callback=lambda topic, payload, **kw: got.put(payload))
            assert sub.result(10)["qos"] == mqtt.QoS.AT_LEAST_ONCE
            pub, _ = conn.publish("dev/dev3", b"via the sdk", mqtt.QoS.AT_LEAST_ONCE)
            pub.result(10)
            assert got.get(timeout=10) == b"via the sdk"
            # Not its topic: the subscription is refused.
            sub, _ = conn.subscribe("dev/dev1", mqtt.QoS.AT_LEAST_ONCE, callback=lambda *a, **kw: None)
            with pytest.raises(mqtt.SubscribeError):
                sub.result(10)
        finally:
            conn.disconnect().result(10)
        e = events(s)[-1]
        assert e["protocolData"]["mqtt"]["username"].startswith("device?x-amz-customauthorizer-name=tokens&")
        assert "&SDK=" in e["protocolData"]["mqtt"]["username"]
        assert base64.b64decode(e["protocolData"]["mqtt"]["password"]) == b"pw"
        assert e["signatureVerified"] is True
    finally:
        s.stop()
