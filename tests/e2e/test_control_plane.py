"""The AWS IoT control plane through boto3: shapes, errors, paging, preconditions, limits,
TestAuthorization, and SigV4 refusals."""

import datetime
import hashlib
import hmac
import json
import subprocess
import urllib.parse

import botocore.exceptions
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conftest import ALLOW_ALL, Device, thing_policy, unique


def sign_by_hand(url, key, secret, when, region="us-east-1", service="iot"):
    """Headers for a SigV4-signed GET of `url` (no query, empty body) made at time `when`,
    computed here from the specification rather than by botocore, so that the request's time
    can be anything while the signature stays valid."""
    u = urllib.parse.urlsplit(url)
    amz_date = when.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    host = u.netloc
    signed_headers = "host;x-amz-date"
    canonical = "\n".join(["GET", u.path or "/", "", f"host:{host}\nx-amz-date:{amz_date}\n", signed_headers,
                           hashlib.sha256(b"").hexdigest()])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (day, region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return {"Host": host, "X-Amz-Date": amz_date,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders={signed_headers}, "
                             f"Signature={signature}"}


def err(excinfo):
    e = excinfo.value.response
    return e["Error"]["Code"], e["ResponseMetadata"]["HTTPStatusCode"], e["Error"]["Message"]


def test_things_and_types(server):
    iot = server.boto()
    tt = unique("type")
    r = iot.create_thing_type(thingTypeName=tt, thingTypeProperties={"thingTypeDescription": "sensors",
                                                                      "searchableAttributes": ["floor"]})
    assert r["thingTypeArn"].endswith(f":thingtype/{tt}")
    name = unique("t")
    r = iot.create_thing(thingName=name, thingTypeName=tt, attributePayload={"attributes": {"floor": "3", "room": "a"}})
    assert set(r) >= {"thingName", "thingArn", "thingId"}
    # Idempotent for the same configuration; conflict for a different one.
    assert iot.create_thing(thingName=name, thingTypeName=tt,
                            attributePayload={"attributes": {"floor": "3", "room": "a"}})["thingId"] == r["thingId"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_thing(thingName=name)
    assert err(e)[:2] == ("ResourceAlreadyExistsException", 409)
    assert e.value.response["Error"]["Message"]
    d = iot.describe_thing(thingName=name)
    assert d["defaultClientId"] == name and d["version"] == 1 and d["thingTypeName"] == tt
    iot.update_thing(thingName=name, attributePayload={"attributes": {"room": "", "desk": "7"}, "merge": True},
                     expectedVersion=1)
    d = iot.describe_thing(thingName=name)
    assert d["attributes"] == {"floor": "3", "desk": "7"} and d["version"] == 2
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.update_thing(thingName=name, attributePayload={"attributes": {"x": "1"}}, expectedVersion=1)
    assert err(e)[:2] == ("VersionConflictException", 409)
    listed = iot.list_things(attributeName="floor", attributeValue="3", thingTypeName=tt)["things"]
    assert [t["thingName"] for t in listed] == [name]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.describe_thing(thingName=unique("absent"))
    assert err(e)[:2] == ("ResourceNotFoundException", 404)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_thing(thingName="bad name!")
    assert err(e)[:2] == ("InvalidRequestException", 400)
    # Thing types: delete needs deprecation and no things.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_thing_type(thingTypeName=tt)
    assert err(e)[0] == "InvalidRequestException"
    iot.deprecate_thing_type(thingTypeName=tt)
    assert iot.describe_thing_type(thingTypeName=tt)["thingTypeMetadata"]["deprecated"] is True
    with pytest.raises(botocore.exceptions.ClientError):
        iot.create_thing(thingName=unique("t"), thingTypeName=tt)
    iot.update_thing(thingName=name, removeThingType=True)
    iot.delete_thing_type(thingTypeName=tt)
    iot.delete_thing(thingName=name)
    iot.delete_thing(thingName=name)  # absent: still success


def test_list_things_pages(server):
    iot = server.boto()
    prefix = unique("page")
    names = sorted(f"{prefix}-{i:02d}" for i in range(7))
    for n in names:
        iot.create_thing(thingName=n, attributePayload={"attributes": {"batch": prefix}})
    seen = []
    for page in iot.get_paginator("list_things").paginate(attributeName="batch", attributeValue=prefix,
                                                           PaginationConfig={"PageSize": 3}):
        assert len(page["things"]) <= 3
        seen += [t["thingName"] for t in page["things"]]
    assert seen == names
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.list_things(maxResults=251)
    assert err(e)[0] == "InvalidRequestException"


def test_certificates(server, workdir):
    iot = server.boto()
    c = iot.create_keys_and_certificate(setAsActive=False)
    d = iot.describe_certificate(certificateId=c["certificateId"])["certificateDescription"]
    assert d["status"] == "INACTIVE" and d["certificateMode"] == "DEFAULT"
    assert d["validity"]["notAfter"].year == 2049
    # The private key is RSA 2048, as AWS issues.
    key = workdir / "rsa.key"
    key.write_text(c["keyPair"]["PrivateKey"])
    out = subprocess.run(["openssl", "pkey", "-in", str(key), "-noout", "-text"], capture_output=True, text=True)
    assert "2048 bit" in out.stdout
    # CSR with openssl (EC P-256).
    csr_key, csr = workdir / "csr.key", workdir / "req.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(csr_key), "-out", str(csr), "-subj", "/CN=from-csr"], check=True, capture_output=True)
    r = iot.create_certificate_from_csr(certificateSigningRequest=csr.read_text(), setAsActive=True)
    assert r["certificatePem"].startswith("-----BEGIN CERTIFICATE-----")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_certificate_from_csr(certificateSigningRequest="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    assert err(e)[0] == "InvalidRequestException"
    # Statuses: PENDING_* cannot be set.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.update_certificate(certificateId=c["certificateId"], newStatus="PENDING_TRANSFER")
    assert err(e)[0] == "InvalidRequestException"
    # Deletion preconditions, with AWS's messages.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_certificate(certificateId=r["certificateId"])
    assert err(e)[:2] == ("CertificateStateException", 406)
    assert "must be deactivated" in err(e)[2]
    iot.update_certificate(certificateId=r["certificateId"], newStatus="REVOKED")
    iot.delete_certificate(certificateId=r["certificateId"])
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.describe_certificate(certificateId=r["certificateId"])
    assert err(e)[:2] == ("ResourceNotFoundException", 404)
    ids = [x["certificateId"] for x in iot.list_certificates(pageSize=250)["certificates"]]
    assert c["certificateId"] in ids and r["certificateId"] not in ids


def test_policies_versions_and_attachments(server, workdir):
    iot = server.boto()
    name = unique("pol")
    doc = json.dumps(ALLOW_ALL)
    r = iot.create_policy(policyName=name, policyDocument=doc)
    assert r["policyVersionId"] == "1"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_policy(policyName=name, policyDocument=doc)
    assert err(e)[:2] == ("ResourceAlreadyExistsException", 409)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_policy(policyName=unique("bad"), policyDocument='{"Version":"2012-10-17","Statement":{"Effect":"Allow"}}')
    assert err(e)[:2] == ("MalformedPolicyException", 400) and "Action" in err(e)[2]
    for _ in range(4):
        iot.create_policy_version(policyName=name, policyDocument=doc)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_policy_version(policyName=name, policyDocument=doc)
    assert err(e)[:2] == ("VersionsLimitExceededException", 409)
    versions = iot.list_policy_versions(policyName=name)["policyVersions"]
    assert sorted(v["versionId"] for v in versions) == ["1", "2", "3", "4", "5"]
    assert [v["versionId"] for v in versions if v["isDefaultVersion"]] == ["1"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_policy_version(policyName=name, policyVersionId="1")
    assert err(e)[:2] == ("DeleteConflictException", 409)
    iot.set_default_policy_version(policyName=name, policyVersionId="3")
    assert iot.get_policy(policyName=name)["defaultVersionId"] == "3"
    assert iot.get_policy_version(policyName=name, policyVersionId="3")["isDefaultVersion"] is True
    # Attachments.
    dev = Device(server, iot, unique("att"), None, workdir)
    iot.attach_policy(policyName=name, target=dev.cert_arn)
    assert [p["policyName"] for p in iot.list_attached_policies(target=dev.cert_arn)["policies"]] == [name]
    assert iot.list_targets_for_policy(policyName=name)["targets"] == [dev.cert_arn]
    eff = iot.get_effective_policies(principal=dev.cert_arn, thingName=dev.name)["effectivePolicies"]
    assert [p["policyName"] for p in eff] == [name] and json.loads(eff[0]["policyDocument"]) == ALLOW_ALL
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_policy(policyName=name)
    assert err(e)[:2] == ("DeleteConflictException", 409)
    iot.detach_policy(policyName=name, target=dev.cert_arn)
    assert iot.list_attached_policies(target=dev.cert_arn)["policies"] == []
    for v in ["1", "2", "4", "5"]:
        iot.delete_policy_version(policyName=name, policyVersionId=v)
    iot.delete_policy(policyName=name)
    # Thing principals, V1 and V2.
    assert iot.list_thing_principals(thingName=dev.name)["principals"] == [dev.cert_arn]
    assert iot.list_principal_things(principal=dev.cert_arn)["things"] == [dev.name]
    v2 = iot.list_thing_principals_v2(thingName=dev.name)["thingPrincipalObjects"]
    assert v2 == [{"principal": dev.cert_arn, "thingPrincipalType": "NON_EXCLUSIVE_THING"}]


def test_ten_policies_per_certificate_then_limit(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("ten"), None, workdir)
    for i in range(10):
        n = unique(f"p{i}")
        iot.create_policy(policyName=n, policyDocument=json.dumps(ALLOW_ALL))
        iot.attach_policy(policyName=n, target=dev.cert_arn)
    n = unique("p11")
    iot.create_policy(policyName=n, policyDocument=json.dumps(ALLOW_ALL))
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.attach_policy(policyName=n, target=dev.cert_arn)
    assert err(e)[:2] == ("LimitExceededException", 410)


def test_policy_size_2048_and_2049(server):
    iot = server.boto()
    base = '{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"arn:'
    tail = '"}}'
    fill = 2048 - len(base) - len(tail)
    iot.create_policy(policyName=unique("size"), policyDocument="  " + base + "x" * fill + tail + "\n")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_policy(policyName=unique("size"), policyDocument=base + "x" * (fill + 1) + tail)
    assert err(e)[:2] == ("MalformedPolicyException", 400)


def test_test_authorization(server, workdir):
    iot = server.boto()
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    dev = Device(server, iot, unique("ta"), thing_policy(account), workdir)
    res = iot.test_authorization(principal=dev.cert_arn, clientId=dev.name, authInfos=[
        {"actionType": "PUBLISH", "resources": [f"{arn}:topic/topic/{dev.name}"]},
        {"actionType": "PUBLISH", "resources": [f"{arn}:topic/topic/other"]},
        {"actionType": "CONNECT", "resources": [f"{arn}:client/{dev.name}"]},
    ])["authResults"]
    assert [r["authDecision"] for r in res] == ["ALLOWED", "IMPLICIT_DENY", "ALLOWED"]
    assert res[0]["allowed"]["policies"][0]["policyName"] == dev.policy
    deny = unique("deny")
    iot.create_policy(policyName=deny, policyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Action": "iot:Publish", "Resource": "*"}]}))
    res = iot.test_authorization(principal=dev.cert_arn, clientId=dev.name, policyNamesToAdd=[deny], authInfos=[
        {"actionType": "PUBLISH", "resources": [f"{arn}:topic/topic/{dev.name}"]}])["authResults"]
    assert res[0]["authDecision"] == "EXPLICIT_DENY"
    assert res[0]["denied"]["explicitDeny"]["policies"][0]["policyName"] == deny


def test_sigv4_refusals(server):
    """A bad or missing signature gets AWS's 403, never a silent pass."""
    import urllib.request
    import ssl
    url = f"https://localhost:{server.api_port}/things"
    ctx = ssl.create_default_context(cafile=server.ca)

    def call(headers):
        req = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(req, context=ctx) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    status, headers, body = call({})
    assert status == 403 and headers.get("x-amzn-ErrorType") == "MissingAuthenticationTokenException"
    assert json.loads(body)["message"]

    def signed(key, secret, service="iot", region="us-east-1"):
        req = AWSRequest(method="GET", url=url)
        SigV4Auth(Credentials(key, secret), service, region).add_auth(req)
        return dict(req.headers)

    creds = {}
    for line in open(server.env["AWS_SHARED_CREDENTIALS_FILE"]):
        if "=" in line:
            k, v = line.split("=", 1)
            creds[k.strip()] = v.strip()
    key, secret = creds["aws_access_key_id"], creds["aws_secret_access_key"]
    assert call(signed(key, secret))[0] == 200
    status, headers, _ = call(signed(key, secret + "x"))
    assert status == 403 and headers.get("x-amzn-ErrorType") == "InvalidSignatureException"
    status, headers, _ = call(signed("AKIAUNKNOWNKEY000000", secret))
    assert status == 403 and headers.get("x-amzn-ErrorType") == "UnrecognizedClientException"
    status, headers, _ = call(signed(key, secret, service="s3"))
    assert status == 403
    # Clock skew: requests correctly signed (by hand, apart from botocore and the server) at a
    # time 20 minutes off are refused for the time, with AWS's code and a message naming the
    # request's time; 10 minutes off and now are accepted (AWS allows 15 minutes).
    now = datetime.datetime.now(datetime.timezone.utc)
    assert call(sign_by_hand(url, key, secret, now))[0] == 200
    assert call(sign_by_hand(url, key, secret, now - datetime.timedelta(minutes=10)))[0] == 200
    assert call(sign_by_hand(url, key, secret, now + datetime.timedelta(minutes=10)))[0] == 200
    for off in (-20, +20):
        h = sign_by_hand(url, key, secret, now + datetime.timedelta(minutes=off))
        status, headers, body = call(h)
        message = json.loads(body)["message"]
        assert status == 403 and headers.get("x-amzn-ErrorType") == "InvalidSignatureException", (status, body)
        assert h["X-Amz-Date"] in message and "15 min" in message, message
        if off < 0:
            assert message.startswith("Signature expired"), message
        assert "does not match" not in message, message
    # The stock CLI with a wrong secret fails with the same code.
    bad_creds = server.data_dir.parent / "bad-credentials"
    bad_creds.write_text(f"[sekisho]\naws_access_key_id = {key}\naws_secret_access_key = wrong{secret}\n")
    env = {**server.env, "AWS_SHARED_CREDENTIALS_FILE": str(bad_creds)}
    cp = subprocess.run(["aws", "--profile", "sekisho", "iot", "list-things"], env=env, capture_output=True, text=True)
    assert cp.returncode != 0 and "InvalidSignatureException" in cp.stderr, cp.stderr


def test_health_and_metrics_need_no_signature(server, workdir):
    import ssl
    import urllib.request
    ctx = ssl.create_default_context(cafile=server.ca)

    def get(path):
        with urllib.request.urlopen(f"https://localhost:{server.api_port}{path}", context=ctx) as r:
            return r.status, r.headers.get("content-type"), r.read().decode()

    assert get("/health")[0] == 200

    def metric(text, name):
        return int(next(l.split()[1] for l in text.splitlines() if l.startswith(name + " ")))

    status, ctype, before = get("/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    from conftest import ALLOW_ALL, Device, Paho, unique
    dev = Device(server, server.boto(), unique("metrics"), ALLOW_ALL, workdir)
    p = Paho(server, server.endpoint(), dev, dev.name, v5=True)
    assert p.connect()[0] == 0
    p.subscribe("metrics/t", qos=1)
    p.c.publish("metrics/t", b"x", qos=1)
    assert p.messages.get(timeout=5).payload == b"x"
    _, _, during = get("/metrics")
    assert metric(during, "sekisho_deliveries_total") > metric(before, "sekisho_deliveries_total")
    assert metric(during, "sekisho_connections") >= 1
    assert metric(during, "sekisho_subscriptions") >= 1
    p.close()
