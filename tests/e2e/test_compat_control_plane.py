"""docs/compatibility.md, "Control plane": AWS's preconditions with AWS's messages, SigV4
refusals by cause, the request body limit, and AWS_CA_BUNDLE against the profile's ca_bundle,
with boto3, botocore's signer, hand-made signatures and the stock AWS CLI."""

import datetime
import hashlib
import hmac
import json
import subprocess
import urllib.parse

import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from conftest import ALLOW_ALL, Device, Openssl, Server, unique


@pytest.fixture(scope="module")
def srv(workdir):
    s = Server(workdir / unique("compat-cp")).start()
    yield s
    s.stop()


def err(e):
    r = e.value.response
    return r["Error"]["Code"], r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Message"]


def root_keys(s):
    c = s.boto()._request_signer._credentials
    return c.access_key, c.secret_key


def test_delete_preconditions_with_aws_messages(srv, workdir):
    """Rows "DeleteThing with principals attached", "DeleteCertificate while ACTIVE", "DeletePolicy
    while attached": the exception and AWS's message, word for word. Positive control: once
    detached / deactivated, each delete succeeds."""
    s = srv
    iot = s.boto()
    dev = Device(s, iot, unique("del"), ALLOW_ALL, workdir)
    with pytest.raises(ClientError) as e:
        iot.delete_thing(thingName=dev.name)
    assert err(e)[:3] == ("InvalidRequestException", 400,
                          f"Cannot delete. Thing {dev.name} is still attached to one or more principals")
    with pytest.raises(ClientError) as e:
        iot.delete_certificate(certificateId=dev.cert_id)
    assert err(e)[0] == "CertificateStateException"
    assert err(e)[2] == f"Certificate must be deactivated (not ACTIVE) before deletion. Id: {dev.cert_id}"
    with pytest.raises(ClientError) as e:
        iot.delete_policy(policyName=dev.policy)
    assert err(e)[:3] == ("DeleteConflictException", 409,
                          "The policy cannot be deleted as the policy is attached to one or more principals "
                          f"(name={dev.policy})")
    iot.detach_thing_principal(thingName=dev.name, principal=dev.cert_arn)
    iot.delete_thing(thingName=dev.name)
    iot.detach_policy(policyName=dev.policy, target=dev.cert_arn)
    iot.delete_policy(policyName=dev.policy)
    iot.update_certificate(certificateId=dev.cert_id, newStatus="INACTIVE")
    iot.delete_certificate(certificateId=dev.cert_id)


def signed_get(url, headers_extra=None, key=None, secret=None, service="iot", region="us-east-1", when=None,
               signed_headers=("host", "x-amz-date")):
    """A SigV4 GET signed by hand (no query, empty body), so that scope, time and the signed
    headers can be anything."""
    u = urllib.parse.urlsplit(url)
    when = when or datetime.datetime.now(datetime.timezone.utc)
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    values = {"host": u.netloc, "x-amz-date": amz_date, **{k.lower(): v for k, v in (headers_extra or {}).items()}}
    names = sorted(signed_headers)
    canonical = "\n".join(["GET", u.path or "/", "", "".join(f"{h}:{values[h]}\n" for h in names), ";".join(names),
                           hashlib.sha256(b"").hexdigest()])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (day, region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    h = {"X-Amz-Date": amz_date, **(headers_extra or {}),
         "Authorization": f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders={';'.join(names)}, Signature={sig}"}
    return h


def test_sigv4_refusals_by_cause(srv):
    """Row "SigV4 missing / unknown key / bad signature / wrong service or region / skew": 403
    with MissingAuthenticationTokenException (no signature), UnrecognizedClientException
    (unknown key), InvalidSignatureException (bad signature, another service's or region's
    scope, a time more than 15 minutes off), IncompleteSignatureException (a malformed
    signature: no X-Amz-Date, Host not signed). Positive control: the same request correctly
    signed is 200."""
    s = srv
    key, secret = root_keys(s)
    url = f"https://localhost:{s.api_port}/things"

    def call(headers):
        r = requests.get(url, headers=headers, verify=s.ca, timeout=10)
        return r.status_code, r.headers.get("x-amzn-ErrorType"), r.json().get("message") if r.content else None

    assert call(signed_get(url, key=key, secret=secret))[0] == 200
    assert call({})[:2] == (403, "MissingAuthenticationTokenException")
    assert call(signed_get(url, key="AKIAUNKNOWNKEY000000", secret=secret))[:2] == (403, "UnrecognizedClientException")
    assert call(signed_get(url, key=key, secret=secret + "x"))[:2] == (403, "InvalidSignatureException")
    status, code, message = call(signed_get(url, key=key, secret=secret, service="s3"))
    assert (status, code) == (403, "InvalidSignatureException") and "service" in message, message
    status, code, message = call(signed_get(url, key=key, secret=secret, region="eu-west-1"))
    assert (status, code) == (403, "InvalidSignatureException") and "region" in message, message
    late = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=16)
    assert call(signed_get(url, key=key, secret=secret, when=late))[:2] == (403, "InvalidSignatureException")
    # Malformed: the Host header not signed; no X-Amz-Date at all.
    h = signed_get(url, key=key, secret=secret, signed_headers=("x-amz-date",))
    assert call(h)[:2] == (403, "IncompleteSignatureException"), call(h)
    h = signed_get(url, key=key, secret=secret)
    del h["X-Amz-Date"]
    assert call(h)[:2] == (403, "IncompleteSignatureException"), call(h)


def test_request_body_at_most_1_mib(srv):
    """Row "request body": at most 1 MiB; one byte more is 413. The 1 MiB body is a real
    CreateThing (JSON padded with spaces), created (positive control)."""
    s = srv
    key, secret = root_keys(s)
    creds = Credentials(key, secret)

    def create(name, size):
        doc = json.dumps({"attributePayload": {"attributes": {"k": "v"}}})
        body = (doc[:-1] + " " * (size - len(doc)) + "}").encode()
        assert len(body) == size
        url = f"https://localhost:{s.api_port}/things/{name}"
        req = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
        SigV4Auth(creds, "iot", "us-east-1").add_auth(req)
        return requests.post(url, data=body, headers=dict(req.headers), verify=s.ca, timeout=30)

    name = unique("big")
    r = create(name, 1024 * 1024)
    assert r.status_code == 200, r.text
    assert s.boto().describe_thing(thingName=name)["attributes"] == {"k": "v"}
    r = create(unique("big"), 1024 * 1024 + 1)
    assert r.status_code == 413, r.text
    assert r.headers.get("x-amzn-ErrorType") == "RequestEntityTooLargeException"


def test_aws_ca_bundle_overrides_the_profile(srv, workdir):
    """Row "AWS_CA_BUNDLE in the environment": it overrides the profile's ca_bundle (botocore's
    rule): pointed at another CA the stock CLI fails certificate verification; pointed at
    DIR/ca.pem, or unset, it works."""
    s = srv
    other = Openssl(workdir / unique("otherca")).ca("other-ca")[0]
    for bundle, works in ((None, True), (str(other), False), (s.ca, True)):
        env = dict(s.env)
        if bundle is not None:
            env["AWS_CA_BUNDLE"] = bundle
        cp = subprocess.run(["aws", "--profile", "sekisho", "iot", "list-things"], env=env, capture_output=True,
                            text=True, timeout=60)
        assert (cp.returncode == 0) == works, (bundle, cp.stderr)
        if not works:
            assert "SSL" in cp.stderr and "verify" in cp.stderr.lower(), cp.stderr
