"""Role aliases and the credential provider: a device certificate traded for temporary
credentials of an IAM role, with curl as the AWS developer guide shows it (issue 6, first part)."""

import json
import subprocess

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import Device, Server, unique

TRUST_CREDENTIALS = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "credentials.iot.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


@pytest.fixture(scope="module")
def cp(workdir):
    s = Server(workdir / unique("credprov")).start()
    yield s
    s.stop()


def code(e):
    return e.response["Error"]["Code"]


def curl_credentials(s, endpoint, dev, alias, thing=None):
    cmd = ["curl", "-s", "-w", "\n%{http_code}", "--cacert", s.ca, "--cert", str(dev.cert), "--key", str(dev.key)]
    if thing:
        cmd += ["-H", f"x-amzn-iot-thingname: {thing}"]
    cmd.append(f"https://{endpoint}:{s.https_port}/role-aliases/{alias}/credentials")
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if cp.returncode != 0:
        return None, None
    body, status = cp.stdout.rsplit("\n", 1)
    return int(status), json.loads(body) if body else None


def test_certificate_buys_role_credentials(cp, workdir):
    s = cp
    iot, iam = s.boto(), s.boto("iam")
    account = s.account_id()
    role = iam.create_role(RoleName="role-thing-reader", AssumeRolePolicyDocument=json.dumps(TRUST_CREDENTIALS),
                           MaxSessionDuration=7200)["Role"]
    # The role may describe only the thing named when the credentials were requested.
    iam.put_role_policy(RoleName="role-thing-reader", PolicyName="own-thing", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:DescribeThing",
                                                "Resource": f"arn:aws:iot:us-east-1:{account}:thing/${{credentials-iot:ThingName}}"}]}))
    alias = iot.create_role_alias(roleAlias="iot-role-alias-reader", roleArn=role["Arn"],
                                  credentialDurationSeconds=3600)
    assert alias["roleAliasArn"] == f"arn:aws:iot:us-east-1:{account}:rolealias/iot-role-alias-reader"
    d = iot.describe_role_alias(roleAlias="iot-role-alias-reader")["roleAliasDescription"]
    assert (d["roleArn"], d["credentialDurationSeconds"], d["owner"]) == (role["Arn"], 3600, account)
    assert "iot-role-alias-reader" in iot.list_role_aliases()["roleAliases"]

    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:AssumeRoleWithCertificate", "Resource": alias["roleAliasArn"]}]}
    dev = Device(s, iot, "test-thing", policy, workdir)
    endpoint = iot.describe_endpoint(endpointType="iot:CredentialProvider")["endpointAddress"]
    assert endpoint.endswith(".credentials.iot.us-east-1.localhost")

    status, body = curl_credentials(s, endpoint, dev, "iot-role-alias-reader", thing="test-thing")
    assert status == 200, body
    c = body["credentials"]
    assert set(c) == {"accessKeyId", "secretAccessKey", "sessionToken", "expiration"}
    assert c["accessKeyId"].startswith("ASIA") and c["expiration"].endswith("Z") and "." not in c["expiration"]
    creds = {"aws_access_key_id": c["accessKeyId"], "aws_secret_access_key": c["secretAccessKey"],
             "aws_session_token": c["sessionToken"]}
    kw = {"region_name": "us-east-1", "endpoint_url": f"https://localhost:{s.api_port}", "verify": s.ca,
          "config": Config(retries={"max_attempts": 1}), **creds}
    who = boto3.client("sts", **kw).get_caller_identity()
    assert who["Arn"] == f"arn:aws:sts::{account}:assumed-role/role-thing-reader/{dev.cert_id}"
    as_role = boto3.client("iot", **kw)
    assert as_role.describe_thing(thingName="test-thing")["thingName"] == "test-thing"
    iot.create_thing(thingName="other-thing")
    with pytest.raises(ClientError) as e:
        as_role.describe_thing(thingName="other-thing")
    assert code(e.value) == "AccessDeniedException"

    # Denials, with the credential provider's own answers.
    # Not allowed on that alias: 403 before anything about the alias is told.
    assert curl_credentials(s, endpoint, dev, "no-such-alias", thing="test-thing") == (
        403, {"message": "Access Denied"})
    iot.create_thing(thingName="not-mine")
    assert curl_credentials(s, endpoint, dev, "iot-role-alias-reader", thing="not-mine") == (
        403, {"message": "Invalid thing name passed"})
    stranger = Device(s, iot, unique("stranger"), {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}, workdir)
    assert curl_credentials(s, endpoint, stranger, "iot-role-alias-reader") == (403, {"message": "Access Denied"})
    untrusted = iam.create_role(RoleName="role-untrusting", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": account}, "Action": "sts:AssumeRole"}]}))["Role"]
    iot.create_role_alias(roleAlias="alias-untrusted", roleArn=untrusted["Arn"])
    policy_all = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:AssumeRoleWithCertificate", "Resource": "*"}]}
    dev2 = Device(s, iot, unique("dev2"), policy_all, workdir)
    assert curl_credentials(s, endpoint, dev2, "alias-untrusted") == (
        400, {"message": "Unable to assume the role, or the role to assume does not exist"})
    assert curl_credentials(s, endpoint, dev2, "no-such-alias") == (404, {"message": "Role alias does not exist"})
    # An inactive certificate is refused in the TLS handshake.
    iot.update_certificate(certificateId=dev2.cert_id, newStatus="INACTIVE")
    assert curl_credentials(s, endpoint, dev2, "alias-untrusted") == (None, None)


def test_role_alias_limits_and_pass_role(cp, workdir):
    s = cp
    iot, iam = s.boto(), s.boto("iam")
    role = iam.create_role(RoleName="role-long", AssumeRolePolicyDocument=json.dumps(TRUST_CREDENTIALS),
                           MaxSessionDuration=43200)["Role"]
    short = iam.create_role(RoleName="role-short", AssumeRolePolicyDocument=json.dumps(TRUST_CREDENTIALS))["Role"]
    # credentialDurationSeconds: 900..43200 and not above the role's MaxSessionDuration.
    iot.create_role_alias(roleAlias="a-900", roleArn=role["Arn"], credentialDurationSeconds=900)
    iot.create_role_alias(roleAlias="a-43200", roleArn=role["Arn"], credentialDurationSeconds=43200)
    # boto3 would refuse 899 itself: a client without its parameter validation reaches the server.
    unchecked = boto3.client("iot", region_name="us-east-1", endpoint_url=f"https://localhost:{s.api_port}",
                             verify=s.ca, config=Config(parameter_validation=False),
                             aws_access_key_id=iot._request_signer._credentials.access_key,
                             aws_secret_access_key=iot._request_signer._credentials.secret_key)
    for alias, arn, secs in (("a-899", role["Arn"], 899), ("a-43201", role["Arn"], 43201),
                             ("a-short", short["Arn"], 3601)):
        with pytest.raises(ClientError) as e:
            unchecked.create_role_alias(roleAlias=alias, roleArn=arn, credentialDurationSeconds=secs)
        assert code(e.value) == "InvalidRequestException", alias
    with pytest.raises(ClientError) as e:
        iot.create_role_alias(roleAlias="a-900", roleArn=role["Arn"])
    assert code(e.value) == "ResourceAlreadyExistsException"
    iot.update_role_alias(roleAlias="a-900", credentialDurationSeconds=1800)
    assert iot.describe_role_alias(roleAlias="a-900")["roleAliasDescription"]["credentialDurationSeconds"] == 1800
    iot.delete_role_alias(roleAlias="a-900")
    with pytest.raises(ClientError) as e:
        iot.describe_role_alias(roleAlias="a-900")
    assert code(e.value) == "ResourceNotFoundException"

    # A user may create role aliases only for roles it may pass.
    iam.create_user(UserName="ops")
    iam.put_user_policy(UserName="ops", PolicyName="aliases", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:CreateRoleAlias", "Resource": "*"},
            {"Effect": "Allow", "Action": "iam:PassRole", "Resource": role["Arn"]}]}))
    k = iam.create_access_key(UserName="ops")["AccessKey"]
    ops = boto3.client("iot", region_name="us-east-1", endpoint_url=f"https://localhost:{s.api_port}",
                       verify=s.ca, aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"])
    ops.create_role_alias(roleAlias="by-ops", roleArn=role["Arn"])
    with pytest.raises(ClientError) as e:
        ops.create_role_alias(roleAlias="by-ops-2", roleArn=short["Arn"])
    assert code(e.value) == "AccessDeniedException"
    assert "iam:PassRole" in e.value.response["Error"]["Message"]
