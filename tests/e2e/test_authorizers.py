"""Custom authorizers' control plane and decision, with boto3: a Python Lambda handler written
as for AWS (a device table in code) decides; tokens signed with the authorizer's key reach
it, others never do; its answer is checked as AWS checks it. (Devices connecting with tokens
over MQTT, WebSocket and HTTPS come with the next step of issue 14.)"""

import base64
import io
import json
import sys
import zipfile

import pytest
from botocore.config import Config
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from conftest import Server, unique

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
                {"Effect": "Allow", "Action": "iot:Publish",
                 "Resource": "arn:aws:iot:us-east-1:%s:topic/dev/%s" % (account, device)}]}]}
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


@pytest.fixture(scope="module")
def fx(workdir):
    s = Server(workdir / "authorizers", config=f'[functions]\nenabled = true\npython = "{sys.executable}"\n').start()
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
    yield s, iot, lam, fn, key, name
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
