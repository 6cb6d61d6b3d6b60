"""Custom authorizers' control plane and decision, with boto3: a Python Lambda handler written
as for AWS (a device table in code) decides; tokens signed with the authorizer's key reach
it, others never do; its answer is checked as AWS checks it. Devices present tokens over MQTT (ALPN `mqtt` on
the HTTPS port, as the AWS IoT Device SDKs do), over MQTT over WebSocket (on the upgrade, or in
the CONNECT) and with HTTPS requests, and are held to the policies the function returned; open
connections ask the function again when it said, and end when it refuses or their time is
over."""

import base64
import io
import json
import os
import queue
import subprocess
import sys
import time
import urllib.parse
import zipfile

import pytest
import requests
from botocore.config import Config
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from conftest import ALLOW_ALL, Device, Paho, Server, unique

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
    # "as-<id>": a principal of that id (a device choosing its own name, as some fleets do).
    device = token[3:] if token and token.startswith("as-") else DEVICES.get(token)
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


def test_an_authorizer_made_inactive_cuts_its_open_connections(fx):
    s, iot, lam, fn, key, name = fx
    other = unique("cut")
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    out = iot.create_authorizer(authorizerName=other, authorizerFunctionArn=fn, tokenKeyName="token",
                                tokenSigningPublicKeys={"k1": pem}, status="ACTIVE")
    lam.add_permission(FunctionName="device-authz", StatementId=unique("cut"), Action="lambda:InvokeFunction",
                       Principal="iot.amazonaws.com", SourceArn=out["authorizerArn"])
    kept = token_client(s, "dev2-kept", token_username(name, key, "tok-2"))
    cut = token_client(s, "dev2-cut", token_username(other, key, "tok-2"))
    try:
        assert kept.connect()[0] == 0 and cut.connect()[0] == 0
        t = time.time()
        iot.update_authorizer(authorizerName=other, status="INACTIVE")
        assert cut.disconnects.get(timeout=10).value == 0x98  # administrative action
        assert time.time() - t < 5
        # Another authorizer's connections go on.
        assert [r.value for r in kept.subscribe("dev/dev2", qos=1)] == [1]
    finally:
        kept.close()
        cut.close()
    iot.delete_authorizer(authorizerName=other)


def test_a_custom_principal_named_like_a_certificate_is_not_that_certificate(fx, workdir):
    """A function may answer any principalId, one equal to a certificate's id too: revoking that
    certificate does not touch the custom connection, nor the other way round."""
    s, iot, lam, fn, key, name = fx
    dev = Device(s, iot, unique("named"), ALLOW_ALL, workdir)
    c = token_client(s, f"{dev.cert_id}-x", token_username(name, key, f"as-{dev.cert_id}"))
    cert = Paho(s, s.endpoint(), dev, unique("cert"), v5=True)
    try:
        assert c.connect()[0] == 0 and cert.connect()[0] == 0
        iot.update_certificate(certificateId=dev.cert_id, newStatus="REVOKED")
        assert cert.disconnects.get(timeout=10) is not None
        time.sleep(1.5)
        assert c.disconnects.empty()
        assert [r.value for r in c.subscribe(f"dev/{dev.cert_id}", qos=1)] == [1]
    finally:
        c.close()
        cert.close()


# --- MQTT over WebSocket with tokens -------------------------------------------------------

def token_headers(name, key, token):
    return {"x-amz-customauthorizer-name": name, "x-amz-customauthorizer-signature": sign(key, token),
            "token": token}


def ws_client(s, client_id, **kw):
    return Paho(s, s.endpoint(), None, client_id, v5=True, port=s.https_port, websocket=True, **kw)


def test_a_websocket_upgrade_carries_the_token_in_headers_or_query(fx):
    s, iot, lam, fn, key, name = fx
    # Headers on the upgrade; no username at all.
    c = ws_client(s, "dev1-ws", ws_headers=token_headers(name, key, "tok-1"))
    try:
        rc, _, _ = c.connect()
        assert rc == 0, rc
        e = events(s)[-1]
        assert e["protocols"] == ["tls", "http"] and e["token"] == "tok-1" and e["signatureVerified"] is True
        assert e["protocolData"]["http"]["headers"]["token"] == "tok-1"
        assert e["protocolData"]["tls"] == {"serverName": s.endpoint()}
        assert [r.value for r in c.subscribe("dev/dev1", qos=1)] == [1]
        assert [r.value for r in c.subscribe("dev/dev2", qos=1)] == [0x87]
        c.c.publish("dev/dev1", b"over ws", qos=1)
        assert c.messages.get(timeout=10).payload == b"over ws"
    finally:
        c.close()
    # The query string of the upgrade, the signature URL-encoded.
    q = urllib.parse.urlencode({"x-amz-customauthorizer-name": name,
                                "x-amz-customauthorizer-signature": sign(key, "tok-2"), "token": "tok-2"})
    c = ws_client(s, "dev2-ws", ws_path=f"/mqtt?{q}")
    try:
        rc, _, _ = c.connect()
        assert rc == 0, rc
        assert events(s)[-1]["protocolData"]["http"]["queryString"] == f"?{q}"
        assert [r.value for r in c.subscribe("dev/dev2", qos=1)] == [1]
    finally:
        c.close()
    # A bad signature, or an authorizer that does not exist: the upgrade is refused, and the
    # function never runs.
    before = len(events(s))
    other, _ = keypair()
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(), "Sec-WebSocket-Protocol": "mqtt"}
    for headers in (token_headers(name, other, "tok-1"), token_headers("nope", key, "tok-1")):
        c = ws_client(s, "dev1-ws2", ws_headers=headers)
        try:
            with pytest.raises(Exception, match="WebSocket handshake"):
                c.connect()
        finally:
            c.close()
        r = requests.get(f"https://{s.endpoint()}:{s.https_port}/mqtt", headers={**upgrade, **headers}, verify=s.ca,
                         timeout=15)
        assert r.status_code == 401, r.text
    assert len(events(s)) == before


def test_a_websocket_without_a_token_on_the_upgrade_authenticates_at_connect(fx):
    s, iot, lam, fn, key, name = fx
    c = ws_client(s, "dev3-ws", username=token_username(name, key, "tok-3"), password="pw")
    try:
        rc, _, _ = c.connect()
        assert rc == 0, rc
        e = events(s)[-1]
        assert e["protocols"] == ["tls", "mqtt"] and e["protocolData"]["mqtt"]["clientId"] == "dev3-ws"
        assert [r.value for r in c.subscribe("dev/dev3", qos=1)] == [1]
    finally:
        c.close()
    c = ws_client(s, "dev3-ws2", username=token_username(name, key, "nobody"))
    try:
        rc, _, _ = c.connect()
        assert rc.value == 0x87, rc
    finally:
        c.close()


JS_CUSTOM_AUTH = '''
const awsIot = require("aws-iot-device-sdk");
const [host, port, headers] = [process.argv[1], Number(process.argv[2]), JSON.parse(process.argv[3])];  // node -e: no script path
const d = awsIot.device({host, port, region: "us-east-1", protocol: "wss-custom-auth",
                         customAuthHeaders: headers, clientId: "dev1-js", keepalive: 30});
d.on("connect", () => d.subscribe("dev/dev1", {qos: 1}, (err) => {
  if (err) { console.log("SUBSCRIBE-ERROR " + err); process.exit(2); }
  d.publish("dev/dev1", "from the js sdk", {qos: 1});
}));
d.on("message", (topic, payload) => { console.log("GOT " + topic + " " + payload); process.exit(0); });
d.on("error", (e) => { console.log("ERROR " + e); process.exit(2); });
setTimeout(() => { console.log("TIMEOUT"); process.exit(3); }, 20000);
'''


def test_the_javascript_device_sdk_presents_a_token_on_the_websocket_upgrade(fx):
    """aws-iot-device-sdk (JavaScript v1) with `protocol: 'wss-custom-auth'`: the token and its
    signature as headers of the upgrade, as its README describes."""
    s, iot, lam, fn, key, name = fx
    node_dir = os.path.join(os.path.dirname(__file__), "node")
    if not os.path.isdir(os.path.join(node_dir, "node_modules", "aws-iot-device-sdk")):
        pytest.skip("aws-iot-device-sdk is not installed (scripts/install-test-deps.sh)")
    r = subprocess.run(["node", "-e", JS_CUSTOM_AUTH, s.endpoint(), str(s.https_port),
                        json.dumps(token_headers(name, key, "tok-1"))],
                       cwd=node_dir, env={**os.environ, "NODE_EXTRA_CA_CERTS": str(s.ca)},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "GOT dev/dev1 from the js sdk" in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert events(s)[-1]["protocolData"]["http"]["headers"]["token"] == "tok-1"


def test_the_device_sdk_connects_over_websocket_through_a_custom_authorizer(fx):
    """The SDK's websockets_with_custom_authorizer: an unsigned upgrade, the token in the
    CONNECT's username."""
    from awscrt import mqtt
    from awsiot import mqtt_connection_builder
    s, iot, lam, fn, key, name = fx
    conn = mqtt_connection_builder.websockets_with_custom_authorizer(
        endpoint=s.endpoint(), port=s.https_port, ca_filepath=s.ca, region="us-east-1", client_id="dev2-sdkws",
        clean_session=True, auth_username="device", auth_authorizer_name=name,
        auth_authorizer_signature=sign(key, "tok-2"), auth_token_key_name="token", auth_token_value="tok-2")
    conn.connect().result(15)
    try:
        got = queue.Queue()
        sub, _ = conn.subscribe("dev/dev2", mqtt.QoS.AT_LEAST_ONCE,
                                callback=lambda topic, payload, **kw: got.put(payload))
        assert sub.result(10)["qos"] == mqtt.QoS.AT_LEAST_ONCE
        pub, _ = conn.publish("dev/dev2", b"sdk over ws", mqtt.QoS.AT_LEAST_ONCE)
        pub.result(10)
        assert got.get(timeout=10) == b"sdk over ws"
    finally:
        conn.disconnect().result(10)
    assert events(s)[-1]["protocolData"]["mqtt"]["clientId"] == "dev2-sdkws"


# --- HTTPS publish with tokens -------------------------------------------------------------

def test_https_requests_carry_the_token_in_headers_or_query(fx):
    s, iot, lam, fn, key, name = fx
    base = f"https://{s.endpoint()}:{s.https_port}"
    sub = token_client(s, "dev1-http", token_username(name, key, "tok-1"))
    try:
        assert sub.connect()[0] == 0
        assert [r.value for r in sub.subscribe("dev/dev1", qos=1)] == [1]
        r = requests.post(f"{base}/topics/dev%2Fdev1?qos=1", data=b"by header",
                          headers=token_headers(name, key, "tok-1"), verify=s.ca, timeout=15)
        assert r.status_code == 200, r.text
        assert sub.messages.get(timeout=10).payload == b"by header"
        e = events(s)[-1]
        assert e["protocols"] == ["tls", "http"] and e["token"] == "tok-1"
        q = urllib.parse.urlencode({"qos": "1", "x-amz-customauthorizer-name": name,
                                    "x-amz-customauthorizer-signature": sign(key, "tok-1"), "token": "tok-1"})
        r = requests.post(f"{base}/topics/dev%2Fdev1?{q}", data=b"by query", verify=s.ca, timeout=15)
        assert r.status_code == 200, r.text
        assert sub.messages.get(timeout=10).payload == b"by query"
    finally:
        sub.close()
    # Not its topic: 403, as the function's policy says.
    r = requests.post(f"{base}/topics/dev%2Fdev2", data=b"x", headers=token_headers(name, key, "tok-1"),
                      verify=s.ca, timeout=15)
    assert r.status_code == 403, r.text
    # The shadow REST API is held to the same policies (they allow no shadow action).
    r = requests.get(f"{base}/things/dev1/shadow", headers=token_headers(name, key, "tok-1"), verify=s.ca,
                     timeout=15)
    assert r.status_code == 403, r.text
    # The credential provider takes certificates only: a token is no credential there.
    r = requests.get(f"{base}/role-aliases/any/credentials", headers=token_headers(name, key, "tok-1"),
                     verify=s.ca, timeout=15)
    assert r.status_code == 401, r.text
    # A bad signature or an unknown authorizer: 401, and the function does not run.
    before = len(events(s))
    other, _ = keypair()
    for headers in (token_headers(name, other, "tok-1"), token_headers("nope", key, "tok-1")):
        r = requests.post(f"{base}/topics/dev%2Fdev1", data=b"x", headers=headers, verify=s.ca, timeout=15)
        assert r.status_code == 401, r.text
        assert r.headers["x-amzn-errortype"] == "UnauthorizedException"
    assert len(events(s)) == before
    # The function says no: 401.
    r = requests.post(f"{base}/topics/dev%2Fdev1", data=b"x", headers=token_headers(name, key, "nobody"),
                      verify=s.ca, timeout=15)
    assert r.status_code == 401, r.text
    # A token in a header and another in the query: which one would the function read? Refused,
    # before it runs.
    before = len(events(s))
    r = requests.post(f"{base}/topics/dev%2Fdev1?token=tok-2", data=b"x", headers=token_headers(name, key, "tok-1"),
                      verify=s.ca, timeout=15)
    assert r.status_code == 401, r.text
    # A route no custom principal may use does not run the function either.
    r = requests.get(f"{base}/retainedMessage", headers=token_headers(name, key, "tok-1"), verify=s.ca, timeout=15)
    assert r.status_code == 401, r.text
    assert len(events(s)) == before
    # No authorizer named and none by default: an unsigned request, refused as before.
    r = requests.post(f"{base}/topics/dev%2Fdev1", data=b"x", verify=s.ca, timeout=15)
    assert r.status_code == 401, r.text


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_and_curl_present_tokens(fx, version):
    """mosquitto_pub with the token in its username (ALPN `mqtt` on the HTTPS port), and curl
    with the token in headers, as a migrating fleet's tools would."""
    s, iot, lam, fn, key, name = fx
    sub = token_client(s, f"dev1-{version}", token_username(name, key, "tok-1"))
    try:
        assert sub.connect()[0] == 0
        assert [r.value for r in sub.subscribe("dev/dev1", qos=1)] == [1]

        def mosquitto_pub(token, topic, message):
            return subprocess.run(
                ["mosquitto_pub", "-h", s.endpoint(), "-p", str(s.https_port), "--cafile", s.ca, "--tls-alpn", "mqtt",
                 "-i", f"dev1-mosq-{version}", "-V", version, "-u", token_username(name, key, token), "-P", "pw",
                 "-t", topic, "-m", message, "-q", "1"], capture_output=True, text=True, timeout=15)

        r = mosquitto_pub("tok-1", "dev/dev1", "from mosquitto")
        assert r.returncode == 0, r.stderr
        assert sub.messages.get(timeout=10).payload == b"from mosquitto"
        # The function does not know this token: the connection is refused.
        r = mosquitto_pub("nobody", "dev/dev1", "x")
        assert r.returncode != 0 and "not authori" in (r.stderr + r.stdout).lower(), (r.returncode, r.stderr)
        r = subprocess.run(
            ["curl", "-sS", "--cacert", s.ca, "-o", "/dev/null", "-w", "%{http_code}",
             "-H", f"x-amz-customauthorizer-name: {name}",
             "-H", f"x-amz-customauthorizer-signature: {sign(key, 'tok-1')}", "-H", "token: tok-1",
             "--data-binary", "from curl", f"https://{s.endpoint()}:{s.https_port}/topics/dev%2Fdev1?qos=1"],
            capture_output=True, text=True, timeout=15)
        assert r.stdout == "200", (r.stdout, r.stderr)
        assert sub.messages.get(timeout=10).payload == b"from curl"
    finally:
        sub.close()


def test_an_authorizer_caching_for_http_is_asked_once_per_connection(fx):
    s, iot, lam, fn, key, name = fx
    cached = unique("cached")
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    out = iot.create_authorizer(authorizerName=cached, authorizerFunctionArn=fn, tokenKeyName="token",
                                tokenSigningPublicKeys={"k1": pem}, status="ACTIVE", enableCachingForHttp=True)
    lam.add_permission(FunctionName="device-authz", StatementId=unique("cached"), Action="lambda:InvokeFunction",
                       Principal="iot.amazonaws.com", SourceArn=out["authorizerArn"])
    url = f"https://{s.endpoint()}:{s.https_port}/topics/dev%2Fdev1"

    def post(session, authorizer):
        return session.post(url, data=b"x", headers=token_headers(authorizer, key, "tok-1"), verify=s.ca,
                            timeout=15)

    before = len(events(s))
    with requests.Session() as one:
        assert post(one, cached).status_code == 200
        assert post(one, cached).status_code == 200
    assert len(events(s)) == before + 1
    # Another connection asks again; an authorizer that does not cache is asked every time.
    with requests.Session() as two:
        assert post(two, cached).status_code == 200
        assert post(two, name).status_code == 200
        assert post(two, name).status_code == 200
    assert len(events(s)) == before + 4
    # Made INACTIVE, its answers no longer count, cached or not.
    with requests.Session() as three:
        assert post(three, cached).status_code == 200
        iot.update_authorizer(authorizerName=cached, status="INACTIVE")
        assert post(three, cached).status_code == 401


# --- Refreshes and the end of a connection's time -----------------------------------------

REFRESHING = '''
import json, os

def handler(event, context):
    print("AUTHZ-EVENT " + json.dumps(event, sort_keys=True))
    if os.path.exists(os.environ["DENY_FILE"]):
        return {"isAuthenticated": False}
    account = context.invoked_function_arn.split(":")[4]
    topics = ["dev/dev9"] + (["dev/alt"] if os.path.exists(os.environ["ALT_FILE"]) else [])
    short = event.get("token") == "short"
    return {"isAuthenticated": True, "principalId": "dev9", "refreshAfterInSeconds": 2,
            "disconnectAfterInSeconds": 4 if short else 600,
            "policyDocuments": [{"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
                {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
                 "Resource": ["arn:aws:iot:us-east-1:%s:topic/%s" % (account, t) for t in topics]}]}]}
'''


def test_open_connections_ask_the_authorizer_again_and_end_when_it_says(workdir):
    """With the least refresh and disconnect times lowered to 1 s (`[functions]
    authorizer_min_seconds`, AWS: 300): the function is asked again every 2 s while the
    connection lasts, its new policies apply at once, a refusal ends the connection (AUTH_ERROR)
    and its will with it, and disconnectAfterInSeconds ends it (CUSTOMAUTH_TTL_EXPIRATION)."""
    s = Server(workdir / "authorizers-refresh", config=FUNCTIONS + "authorizer_min_seconds = 1\n").start()
    deny, alt = workdir / "refresh-deny", workdir / "refresh-alt"
    try:
        iam = s.boto("iam")
        role = iam.create_role(RoleName="authz-exec", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                    "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
        lam = s.boto("lambda", config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
        fn = lam.create_function(FunctionName="refreshing", Runtime="python3.11", Role=role, Handler="app.handler",
                                 Code={"ZipFile": zip_of({"app.py": REFRESHING})}, Timeout=10,
                                 Environment={"Variables": {"DENY_FILE": str(deny), "ALT_FILE": str(alt)}})["FunctionArn"]
        iot = s.boto()
        out = iot.create_authorizer(authorizerName="refreshing", authorizerFunctionArn=fn, tokenKeyName="token",
                                    signingDisabled=True, status="ACTIVE")
        lam.add_permission(FunctionName="refreshing", StatementId="iot", Action="lambda:InvokeFunction",
                           Principal="iot.amazonaws.com", SourceArn=out["authorizerArn"])
        mon = Paho(s, s.endpoint(), Device(s, iot, unique("mon"), ALLOW_ALL, workdir), unique("mon"), v5=True)
        assert mon.connect()[0] == 0
        assert mon.subscribe("$aws/events/presence/disconnected/+", qos=1)[0].value == 1
        assert mon.subscribe("dev/dev9", qos=1)[0].value == 1

        def reason(client_id):
            while True:
                m = mon.messages.get(timeout=15)
                assert m.topic != "dev/dev9", "a will was sent"
                e = json.loads(m.payload)
                if e["clientId"] == client_id:
                    return e["disconnectReason"]

        c = token_client(s, "refreshed", "dev?x-amz-customauthorizer-name=refreshing&token=long")
        c.c.will_set("dev/dev9", b"will", qos=1)
        try:
            assert c.connect()[0] == 0
            asked = len(events(s))
            c.c.publish("dev/alt", b"x", qos=1)
            assert c.pubacks.get(timeout=10)[1].value == 0x87
            # The function now allows dev/alt: after the next refresh, so does the connection.
            alt.touch()
            deadline = time.time() + 20
            while len(events(s)) < asked + 2 and time.time() < deadline:
                time.sleep(0.2)
            assert len(events(s)) >= asked + 2
            assert c.disconnects.empty()
            c.c.publish("dev/alt", b"x", qos=1)
            assert c.pubacks.get(timeout=10)[1].value == 0
            # Now it refuses: the connection ends at the next refresh, not authorized.
            deny.touch()
            assert c.disconnects.get(timeout=10).value == 0x87
        finally:
            c.close()
        assert reason("refreshed") == "AUTH_ERROR"
        # No will either: the principal the authorizer refused may not act again.
        time.sleep(1)
        while not mon.messages.empty():
            assert mon.messages.get().topic != "dev/dev9", "a will was sent"
        deny.unlink()
        c = token_client(s, "short-lived", "dev?x-amz-customauthorizer-name=refreshing&token=short")
        try:
            t = time.time()
            assert c.connect()[0] == 0
            c.disconnects.get(timeout=10)
            assert 3 <= time.time() - t < 8
        finally:
            c.close()
        assert reason("short-lived") == "CUSTOMAUTH_TTL_EXPIRATION"
        mon.close()
    finally:
        s.stop()


# The migration walkthrough's authorizer, as a team moving its fleet would write it for AWS:
# the device table lives in a bucket, read with the execution role's credentials.
FLEET_HANDLER = '''
import json, os, time
import boto3
from botocore.config import Config

s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))

def handler(event, context):
    token = event.get("token")
    print("FLEET-AUTH %s %s" % (token, event.get("protocolData", {}).get("mqtt", {}).get("clientId")))
    if token == "hang":
        time.sleep(30)
    if token == "crash":
        raise RuntimeError("the device table is corrupt")
    table = json.loads(s3.get_object(Bucket=os.environ["TABLE_BUCKET"], Key="devices.json")["Body"].read())
    device = table.get(token)
    if device is None:
        return {"isAuthenticated": False}
    arn = "arn:aws:iot:%s:%s:" % (os.environ["AWS_REGION"], context.invoked_function_arn.split(":")[4])
    return {"isAuthenticated": True, "principalId": device, "refreshAfterInSeconds": 2,
            "disconnectAfterInSeconds": 3600,
            "policyDocuments": [json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": arn + "client/" + device},
                {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": arn + "topic/meters/" + device},
                {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": arn + "topicfilter/meters/" + device}]})]}
'''


def test_the_migration_walkthrough(workdir):
    """A fleet moves from its old platform with its tokens: the authorizer reads the device
    table from a bucket; three devices connect with signed tokens and a fourth is refused; each
    is held to the policy returned (its own topic, not a neighbour's); a token signed with the
    wrong key never reaches the function; a function that hangs past its timeout or crashes
    refuses that connection and nothing else; a device taken out of the table is cut at the
    next refresh while the others stay."""
    s = Server(workdir / "migration", config=FUNCTIONS + "authorizer_min_seconds = 2\n").start()
    try:
        s3, iam = s.boto("s3"), s.boto("iam")
        s3.create_bucket(Bucket="fleet-table")
        table = {"tok-a": "meter1", "tok-b": "meter2", "tok-c": "meter3"}
        s3.put_object(Bucket="fleet-table", Key="devices.json", Body=json.dumps(table).encode())
        role = iam.create_role(RoleName="fleet-authz", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                    "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
        iam.put_role_policy(RoleName="fleet-authz", PolicyName="table", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject",
                                                    "Resource": "arn:aws:s3:::fleet-table/*"}]}))
        lam = s.boto("lambda", config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
        fn = lam.create_function(
            FunctionName="fleet-authz", Runtime="python3.12", Role=role, Handler="app.handler", Timeout=3,
            Code={"ZipFile": zip_of({"app.py": FLEET_HANDLER})},
            Environment={"Variables": {"TABLE_BUCKET": "fleet-table",
                                       "AWS_ENDPOINT_URL_S3": f"https://localhost:{s.s3_port}"}})["FunctionArn"]
        iot = s.boto(config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
        key, pem = keypair()
        arn = iot.create_authorizer(authorizerName="fleet", authorizerFunctionArn=fn, tokenKeyName="token",
                                    tokenSigningPublicKeys={"old-platform": pem}, status="ACTIVE")["authorizerArn"]
        lam.add_permission(FunctionName="fleet-authz", StatementId="iot", Action="lambda:InvokeFunction",
                           Principal="iot.amazonaws.com", SourceArn=arn)

        def asked():
            """(token, client id) of each invocation, refreshes included."""
            return [tuple(line.split("FLEET-AUTH ", 1)[1].split()[:2])
                    for line in s.log_text().splitlines() if "FLEET-AUTH " in line]

        meters = {}
        for token, device in table.items():
            c = token_client(s, device, token_username("fleet", key, token))
            assert c.connect()[0] == 0, device
            meters[device] = c
        # The fourth device is not in the table.
        stranger = token_client(s, "meter4", token_username("fleet", key, "tok-d"))
        assert stranger.connect()[0].value == 0x87
        stranger.close()
        # Each meter is held to the policy returned for it.
        m1 = meters["meter1"]
        assert [r.value for r in m1.subscribe("meters/meter1", qos=1)] == [1]
        assert [r.value for r in m1.subscribe("meters/meter2", qos=1)] == [0x87]
        m1.c.publish("meters/meter1", b"42 kWh", qos=1)
        assert m1.pubacks.get(timeout=10)[1].value == 0
        assert m1.messages.get(timeout=10).payload == b"42 kWh"
        m1.c.publish("meters/meter3", b"forged", qos=1)
        assert m1.pubacks.get(timeout=10)[1].value == 0x87
        # Signed with another key: refused, and the function never hears of it.
        other, _ = keypair()
        forged = token_client(s, "meter1-forged", token_username("fleet", other, "tok-a"))
        assert forged.connect()[0].value == 0x87
        forged.close()
        assert ("tok-a", "meter1") in asked() and not [a for a in asked() if a[1] == "meter1-forged"]
        # A function that hangs past its timeout, or crashes: that connection is refused...
        for token in ("hang", "crash"):
            c = token_client(s, "meter1", token_username("fleet", key, token))
            t = time.time()
            assert c.connect(timeout=15)[0].value == 0x87, token
            assert time.time() - t < 10
            c.close()
        # ...and nothing else: the meters connected still work, and the next device connects.
        assert all(c.disconnects.empty() for c in meters.values())
        m1.c.publish("meters/meter1", b"still here", qos=1)
        assert m1.pubacks.get(timeout=10)[1].value == 0
        table["tok-e"] = "meter5"
        s3.put_object(Bucket="fleet-table", Key="devices.json", Body=json.dumps(table).encode())
        meters["meter5"] = token_client(s, "meter5", token_username("fleet", key, "tok-e"))
        assert meters["meter5"].connect()[0] == 0
        # meter2 leaves the fleet: the table no longer has it, and the next refresh cuts it.
        del table["tok-b"]
        s3.put_object(Bucket="fleet-table", Key="devices.json", Body=json.dumps(table).encode())
        assert meters["meter2"].disconnects.get(timeout=15).value == 0x87
        time.sleep(3)
        assert all(meters[m].disconnects.empty() for m in ("meter1", "meter3", "meter5"))
        for c in meters.values():
            c.close()
    finally:
        s.stop()
