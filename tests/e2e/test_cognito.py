"""Cognito identities as AWS IoT apps use them, with boto3 and the AWS IoT Device SDK: a
backend vouches for a user (GetOpenIdTokenForDeveloperIdentity), the app trades the token for
the pool's authenticated role's credentials (unsigned GetCredentialsForIdentity) and connects
over MQTT over WebSocket, where both that role's IAM policy and the IoT policy attached to the
identity must allow; an unauthenticated identity gets the unauthenticated role, decided by IAM
alone. Tokens Sekisho did not issue for the pool, and other identity providers, are refused."""

import json
import os
import queue
import time

import pytest
from botocore import UNSIGNED
from botocore.config import Config

from conftest import ALLOW_ALL, Device, Paho, Server, unique

DEV = "login.example.app"


def trust(pool_id, amr):
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Federated": "cognito-identity.amazonaws.com"},
        "Action": "sts:AssumeRoleWithWebIdentity",
        "Condition": {"StringEquals": {"cognito-identity.amazonaws.com:aud": pool_id},
                      "ForAnyValue:StringLike": {"cognito-identity.amazonaws.com:amr": amr}}}]})


@pytest.fixture(scope="module")
def fx(workdir):
    s = Server(workdir / "cognito").start()
    cog = s.boto("cognito-identity")
    iam = s.boto("iam")
    pool = cog.create_identity_pool(IdentityPoolName="app pool", AllowUnauthenticatedIdentities=True,
                                    DeveloperProviderName=DEV)
    pid = pool["IdentityPoolId"]
    roles = {}
    # The guest role also allows an IAM read: the guest session policy must still refuse it.
    for kind, actions, resource in (("authenticated", ["iot:*", "sts:AssumeRole"], "*"),
                                    ("unauthenticated", ["iot:Connect", "iot:Publish", "iam:ListUsers"], "*")):
        arn = iam.create_role(RoleName=f"cog-{kind}", AssumeRolePolicyDocument=trust(pid, kind))["Role"]["Arn"]
        iam.put_role_policy(RoleName=f"cog-{kind}", PolicyName="iot", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resource}]}))
        roles[kind] = arn
    cog.set_identity_pool_roles(IdentityPoolId=pid, Roles=roles)
    app = s.boto("cognito-identity", config=Config(signature_version=UNSIGNED))
    yield s, cog, app, pid, roles
    s.stop()


def developer_login(cog, pid, user):
    out = cog.get_open_id_token_for_developer_identity(IdentityPoolId=pid, Logins={DEV: user})
    return out["IdentityId"], out["Token"]


def ws(s, creds, client_id):
    from awscrt import auth
    from awsiot import mqtt_connection_builder
    provider = auth.AwsCredentialsProvider.new_static(creds["AccessKeyId"], creds["SecretKey"], creds["SessionToken"])
    return mqtt_connection_builder.websockets_with_default_aws_signing(
        endpoint=s.endpoint(), port=s.https_port, region="us-east-1", credentials_provider=provider,
        ca_filepath=s.ca, client_id=client_id, clean_session=True, keep_alive_secs=30)


def test_the_pool_and_its_roles_with_boto3(fx):
    s, cog, app, pid, roles = fx
    d = cog.describe_identity_pool(IdentityPoolId=pid)
    assert (d["IdentityPoolName"], d["AllowUnauthenticatedIdentities"], d["DeveloperProviderName"]) == (
        "app pool", True, DEV)
    assert pid.startswith("us-east-1:")
    assert pid in [p["IdentityPoolId"] for p in cog.list_identity_pools(MaxResults=60)["IdentityPools"]]
    assert cog.get_identity_pool_roles(IdentityPoolId=pid)["Roles"] == roles
    # Providers whose tokens Sekisho cannot verify are refused, not ignored.
    with pytest.raises(cog.exceptions.InvalidParameterException):
        cog.create_identity_pool(IdentityPoolName="google", AllowUnauthenticatedIdentities=False,
                                 SupportedLoginProviders={"accounts.google.com": "client-id"})
    with pytest.raises(cog.exceptions.InvalidParameterException):
        cog.set_identity_pool_roles(IdentityPoolId=pid, Roles={"authenticated": "arn:aws:iam::999999999999:role/x"})
    with pytest.raises(cog.exceptions.ResourceNotFoundException):
        cog.describe_identity_pool(IdentityPoolId="us-east-1:00000000-0000-0000-0000-000000000000")
    # The developer provider, once set, stays.
    with pytest.raises(cog.exceptions.InvalidParameterException):
        cog.update_identity_pool(IdentityPoolId=pid, IdentityPoolName="app pool", AllowUnauthenticatedIdentities=True,
                                 DeveloperProviderName="other.provider")


def test_an_authenticated_identity_needs_its_iot_policy_and_its_roles(fx, workdir):
    from awscrt import mqtt
    s, cog, app, pid, roles = fx
    iot = s.boto()
    identity, token = developer_login(cog, pid, "alice")
    # The same user is the same identity; the backend can look it up either way.
    assert developer_login(cog, pid, "alice")[0] == identity
    found = cog.lookup_developer_identity(IdentityPoolId=pid, DeveloperUserIdentifier="alice")
    assert (found["IdentityId"], found["DeveloperUserIdentifierList"]) == (identity, ["alice"])
    assert cog.lookup_developer_identity(IdentityPoolId=pid, IdentityId=identity)["IdentityId"] == identity
    with pytest.raises(cog.exceptions.ResourceNotFoundException):
        cog.lookup_developer_identity(IdentityPoolId=pid, DeveloperUserIdentifier="nobody")
    creds = app.get_credentials_for_identity(IdentityId=identity,
                                             Logins={"cognito-identity.amazonaws.com": token})
    assert creds["IdentityId"] == identity
    c = creds["Credentials"]
    assert c["AccessKeyId"].startswith("ASIA") and c["SecretKey"] and c["SessionToken"]
    sts = s.boto("sts", aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretKey"],
                 aws_session_token=c["SessionToken"])
    assert sts.get_caller_identity()["Arn"].endswith(":assumed-role/cog-authenticated/CognitoIdentityCredentials")
    # The role allows iot:*, but no IoT policy is attached to the identity yet: refused.
    with pytest.raises(Exception):
        ws(s, c, identity).connect().result(10)
    account = s.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    policy = unique("user")
    iot.create_policy(policyName=policy, policyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/${{cognito-identity.amazonaws.com:sub}}"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": f"{arn}:topic/users/${{cognito-identity.amazonaws.com:sub}}/*"},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": f"{arn}:topicfilter/users/${{cognito-identity.amazonaws.com:sub}}/*"}]}))
    iot.attach_policy(policyName=policy, target=identity)
    assert policy in [p["policyName"] for p in iot.list_attached_policies(target=identity)["policies"]]
    conn = ws(s, c, identity)
    conn.connect().result(10)
    try:
        got = queue.Queue()
        sub, _ = conn.subscribe(f"users/{identity}/inbox", mqtt.QoS.AT_LEAST_ONCE,
                                callback=lambda topic, payload, **kw: got.put(payload))
        sub.result(10)
        conn.publish(f"users/{identity}/inbox", b"hello alice", mqtt.QoS.AT_LEAST_ONCE)[0].result(10)
        assert got.get(timeout=10) == b"hello alice"
        # Another user's topics: the IoT policy does not reach them (the role alone would).
        sub, _ = conn.subscribe("users/someone-else/inbox", mqtt.QoS.AT_LEAST_ONCE, callback=lambda *a, **k: None)
        with pytest.raises(mqtt.SubscribeError):
            sub.result(10)
    finally:
        conn.disconnect().result(10)
    # Another client id than the identity's: refused by the IoT policy.
    with pytest.raises(Exception):
        ws(s, c, "not-the-identity").connect().result(10)
    # HTTPS publish with the same credentials: both policies decide there too.
    data = s.boto("iot-data", aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretKey"],
                  aws_session_token=c["SessionToken"])
    data.publish(topic=f"users/{identity}/inbox", qos=1, payload=b"over https")
    with pytest.raises(data.exceptions.ForbiddenException):
        data.publish(topic="users/someone-else/inbox", qos=1, payload=b"x")
    iot.detach_policy(policyName=policy, target=identity)
    with pytest.raises(data.exceptions.ForbiddenException):
        data.publish(topic=f"users/{identity}/inbox", qos=1, payload=b"x")


def test_an_unauthenticated_identity_is_decided_by_its_role_alone(fx):
    s, cog, app, pid, roles = fx
    identity = app.get_id(IdentityPoolId=pid)["IdentityId"]
    c = app.get_credentials_for_identity(IdentityId=identity)["Credentials"]
    data = s.boto("iot-data", aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretKey"],
                  aws_session_token=c["SessionToken"])
    data.publish(topic="public/news", qos=1, payload=b"anyone")
    with pytest.raises(data.exceptions.ForbiddenException):
        data.get_retained_message(topic="public/news")
    conn = ws(s, c, "guest-1")
    conn.connect().result(10)
    conn.disconnect().result(10)
    sts = s.boto("sts", aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretKey"],
                 aws_session_token=c["SessionToken"])
    assert ":assumed-role/cog-unauthenticated/" in sts.get_caller_identity()["Arn"]
    # The role allows iam:ListUsers; a guest's session never reaches IAM.
    guest_iam = s.boto("iam", aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretKey"],
                       aws_session_token=c["SessionToken"])
    with pytest.raises(guest_iam.exceptions.ClientError, match="AccessDenied"):
        guest_iam.list_users()
    # Asking again gives the same session, not a new one.
    assert app.get_credentials_for_identity(IdentityId=identity)["Credentials"]["AccessKeyId"] == c["AccessKeyId"]


def test_a_guest_token_does_not_outlive_its_guest_and_no_token_is_renewed_past_its_own(fx):
    s, cog, app, pid, roles = fx
    guest = app.get_id(IdentityPoolId=pid)["IdentityId"]
    guest_token = app.get_open_id_token(IdentityId=guest)["Token"]
    logins = {"cognito-identity.amazonaws.com": guest_token}
    assert app.get_credentials_for_identity(IdentityId=guest, Logins=logins)["IdentityId"] == guest
    # The backend links a user to that identity: it is authenticated now, and its guest token
    # no longer buys anything.
    out = cog.get_open_id_token_for_developer_identity(IdentityPoolId=pid, IdentityId=guest, Logins={DEV: "erin"},
                                                       TokenDuration=2)
    assert out["IdentityId"] == guest
    with pytest.raises(app.exceptions.NotAuthorizedException):
        app.get_credentials_for_identity(IdentityId=guest, Logins=logins)
    # A token traded for a token lasts no longer than the one the backend gave (2 s).
    renewed = app.get_open_id_token(IdentityId=guest, Logins={"cognito-identity.amazonaws.com": out["Token"]})["Token"]
    time.sleep(3)
    for t in (out["Token"], renewed):
        with pytest.raises(app.exceptions.NotAuthorizedException):
            app.get_credentials_for_identity(IdentityId=guest, Logins={"cognito-identity.amazonaws.com": t})


def test_cognito_credentials_do_not_chain_into_other_roles_and_die_with_their_identity(fx):
    s, cog, app, pid, roles = fx
    account = s.account_id()
    target = s.boto("iam").create_role(RoleName=unique("chained"), AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": account},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    identity, token = developer_login(cog, pid, "dave")
    c = app.get_credentials_for_identity(IdentityId=identity,
                                         Logins={"cognito-identity.amazonaws.com": token})["Credentials"]
    sts = s.boto("sts", aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretKey"],
                 aws_session_token=c["SessionToken"])
    # The role allows sts:AssumeRole and the target trusts the account: still refused, as the
    # chained session would shed the identity's IoT policies and its revocation.
    with pytest.raises(sts.exceptions.ClientError, match="AccessDenied"):
        sts.assume_role(RoleArn=target, RoleSessionName="chain")
    assert sts.get_caller_identity()["Account"] == account
    out = cog.delete_identities(IdentityIdsToDelete=[identity])
    assert out["UnprocessedIdentityIds"] == []
    with pytest.raises(sts.exceptions.ClientError, match="InvalidClientTokenId"):
        sts.get_caller_identity()
    with pytest.raises(app.exceptions.ResourceNotFoundException):
        app.get_credentials_for_identity(IdentityId=identity, Logins={"cognito-identity.amazonaws.com": token})


def test_unsigned_calls_are_rate_limited_per_address(workdir):
    """GetId and its kin need no signature, so one address may make 10 a second (bursts of
    50): a loop gets TooManyRequestsException, not an identity per call."""
    s = Server(workdir / "cognito-rate").start()
    try:
        pid = s.boto("cognito-identity").create_identity_pool(
            IdentityPoolName="guests", AllowUnauthenticatedIdentities=True)["IdentityPoolId"]
        app = s.boto("cognito-identity", config=Config(signature_version=UNSIGNED,
                                                       retries={"total_max_attempts": 1}))
        made, refused = 0, 0
        for _ in range(60):
            try:
                app.get_id(IdentityPoolId=pid)
                made += 1
            except app.exceptions.TooManyRequestsException:
                refused += 1
        assert 50 <= made < 60 and refused > 0, (made, refused)
        listed = s.boto("cognito-identity").list_identities(IdentityPoolId=pid, MaxResults=60)["Identities"]
        assert len(listed) == made
        time.sleep(0.5)
        app.get_id(IdentityPoolId=pid)
    finally:
        s.stop()


def test_tokens_and_logins_that_do_not_hold_are_refused(fx):
    s, cog, app, pid, roles = fx
    alice, token = developer_login(cog, pid, "alice")
    bob, bob_token = developer_login(cog, pid, "bob")
    assert bob != alice
    cases = [
        # An authenticated identity without its login.
        {"IdentityId": alice},
        # Bob's token for Alice's identity.
        {"IdentityId": alice, "Logins": {"cognito-identity.amazonaws.com": bob_token}},
        # A token changed in transit.
        {"IdentityId": alice, "Logins": {"cognito-identity.amazonaws.com": token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]}},
        # A provider whose tokens Sekisho cannot verify.
        {"IdentityId": alice, "Logins": {"accounts.google.com": "eyJ..."}},
    ]
    for args in cases:
        with pytest.raises(app.exceptions.NotAuthorizedException):
            app.get_credentials_for_identity(**args)
    # A token of another pool is not this pool's.
    other = cog.create_identity_pool(IdentityPoolName="other", AllowUnauthenticatedIdentities=False,
                                     DeveloperProviderName=DEV)["IdentityPoolId"]
    o_id, o_token = developer_login(cog, other, "alice")
    assert o_id != alice
    with pytest.raises(app.exceptions.NotAuthorizedException):
        app.get_credentials_for_identity(IdentityId=alice, Logins={"cognito-identity.amazonaws.com": o_token})
    # A pool without unauthenticated identities gives none.
    with pytest.raises(app.exceptions.NotAuthorizedException):
        app.get_id(IdentityPoolId=other)
    # A pool without roles (or whose role does not trust Cognito for it) gives no credentials.
    with pytest.raises(app.exceptions.InvalidIdentityPoolConfigurationException):
        app.get_credentials_for_identity(IdentityId=o_id, Logins={"cognito-identity.amazonaws.com": o_token})
    cog.set_identity_pool_roles(IdentityPoolId=other, Roles={"authenticated": roles["authenticated"]})
    with pytest.raises(app.exceptions.InvalidIdentityPoolConfigurationException):
        app.get_credentials_for_identity(IdentityId=o_id, Logins={"cognito-identity.amazonaws.com": o_token})
    cog.delete_identity_pool(IdentityPoolId=other)
    with pytest.raises(app.exceptions.ResourceNotFoundException):
        app.get_credentials_for_identity(IdentityId=o_id, Logins={"cognito-identity.amazonaws.com": o_token})
    # The backend's call is signed and authorized like any other.
    user = s.boto("iam").create_user(UserName=unique("nobody"))["User"]["UserName"]
    k = s.boto("iam").create_access_key(UserName=user)["AccessKey"]
    nobody = s.boto("cognito-identity", aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"])
    time.sleep(0.2)
    with pytest.raises(nobody.exceptions.NotAuthorizedException):
        nobody.get_open_id_token_for_developer_identity(IdentityPoolId=pid, Logins={DEV: "mallory"})
    with pytest.raises(Exception):
        app.get_open_id_token_for_developer_identity(IdentityPoolId=pid, Logins={DEV: "mallory"})


def test_deleting_the_pool_cuts_its_identities_connections(workdir):
    from awscrt import mqtt
    s = Server(workdir / "cognito-delete").start()
    try:
        cog, iam, iot = s.boto("cognito-identity"), s.boto("iam"), s.boto()
        pid = cog.create_identity_pool(IdentityPoolName="short", AllowUnauthenticatedIdentities=False,
                                       DeveloperProviderName=DEV)["IdentityPoolId"]
        arn = iam.create_role(RoleName="cog-auth", AssumeRolePolicyDocument=trust(pid, "authenticated"))["Role"]["Arn"]
        iam.put_role_policy(RoleName="cog-auth", PolicyName="iot", PolicyDocument=json.dumps(ALLOW_ALL))
        cog.set_identity_pool_roles(IdentityPoolId=pid, Roles={"authenticated": arn})
        identity, token = developer_login(cog, pid, "carol")
        iot.create_policy(policyName="all", policyDocument=json.dumps(ALLOW_ALL))
        iot.attach_policy(policyName="all", target=identity)
        app = s.boto("cognito-identity", config=Config(signature_version=UNSIGNED))
        c = app.get_credentials_for_identity(IdentityId=identity,
                                             Logins={"cognito-identity.amazonaws.com": token})["Credentials"]
        mon = Paho(s, s.endpoint(), Device(s, iot, unique("mon"), ALLOW_ALL, workdir), unique("mon"), v5=True)
        assert mon.connect()[0] == 0
        assert mon.subscribe("$aws/events/presence/disconnected/+", qos=1)[0].value == 1
        conn = ws(s, c, "carol-phone")
        conn.connect().result(10)
        conn.subscribe("x", mqtt.QoS.AT_LEAST_ONCE, callback=lambda *a, **k: None)[0].result(10)
        cog.delete_identity_pool(IdentityPoolId=pid)
        e = json.loads(mon.messages.get(timeout=10).payload)
        assert e["clientId"] == "carol-phone"
        # The identity is the principal, as for attaching its IoT policies.
        assert e["principalIdentifier"] == identity, e
        with pytest.raises(Exception):
            ws(s, c, "carol-phone").connect().result(10)
        mon.close()
    finally:
        s.stop()


def test_the_basic_flow_assumes_the_pools_role_with_its_token(fx):
    """STS AssumeRoleWithWebIdentity (unsigned, as on AWS) with a pool's token, when the pool
    allows the basic flow: the role must trust Cognito for that pool and identity type, and the
    session is held to the same rules as the enhanced flow's."""
    s, cog, app, pid, roles = fx
    identity, token = developer_login(cog, pid, "frank")
    sts = s.boto("sts", config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}))

    def assume(role, t):
        return sts.assume_role_with_web_identity(RoleArn=role, RoleSessionName="app", WebIdentityToken=t)

    with pytest.raises(sts.exceptions.ClientError, match="AccessDenied"):
        assume(roles["authenticated"], token)
    cog.update_identity_pool(IdentityPoolId=pid, IdentityPoolName="app pool", AllowUnauthenticatedIdentities=True,
                             AllowClassicFlow=True, DeveloperProviderName=DEV)
    try:
        out = assume(roles["authenticated"], token)
        assert (out["SubjectFromWebIdentityToken"], out["Provider"], out["Audience"]) == (
            identity, "cognito-identity.amazonaws.com", pid)
        assert out["AssumedRoleUser"]["Arn"].endswith(":assumed-role/cog-authenticated/app")
        c = out["Credentials"]
        data = s.boto("iot-data", aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                      aws_session_token=c["SessionToken"])
        # The IoT rule holds here too: no IoT policy is attached to frank's identity.
        with pytest.raises(data.exceptions.ForbiddenException):
            data.publish(topic=f"users/{identity}/inbox", qos=1, payload=b"x")
        # The guest role does not trust authenticated identities.
        with pytest.raises(sts.exceptions.ClientError, match="AccessDenied"):
            assume(roles["unauthenticated"], token)
        # A token changed in transit, or not a pool's token at all.
        for bad in (token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:], "not.a.token"):
            with pytest.raises(sts.exceptions.InvalidIdentityTokenException):
                assume(roles["authenticated"], bad)
        # Asking again gives the same session; a parameter that would change it is refused,
        # not ignored.
        assert assume(roles["authenticated"], token)["Credentials"]["AccessKeyId"] == c["AccessKeyId"]
        with pytest.raises(sts.exceptions.ClientError, match="ValidationError"):
            sts.assume_role_with_web_identity(RoleArn=roles["authenticated"], RoleSessionName="app",
                                              WebIdentityToken=token, ProviderId="www.amazon.com")
        # A role whose trust names Cognito for every pool (no aud condition) trusts none.
        loose = s.boto("iam").create_role(RoleName=unique("loose"), AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                                                    "Principal": {"Federated": "cognito-identity.amazonaws.com"},
                                                    "Action": "sts:AssumeRoleWithWebIdentity"}]}))["Role"]["Arn"]
        with pytest.raises(sts.exceptions.ClientError, match="AccessDenied"):
            assume(loose, token)
        cog.set_identity_pool_roles(IdentityPoolId=pid, Roles={**roles, "authenticated": loose})
        try:
            with pytest.raises(app.exceptions.InvalidIdentityPoolConfigurationException):
                app.get_credentials_for_identity(IdentityId=identity,
                                                 Logins={"cognito-identity.amazonaws.com": token})
        finally:
            cog.set_identity_pool_roles(IdentityPoolId=pid, Roles=roles)
    finally:
        cog.update_identity_pool(IdentityPoolId=pid, IdentityPoolName="app pool",
                                 AllowUnauthenticatedIdentities=True, AllowClassicFlow=False,
                                 DeveloperProviderName=DEV)


# What the SDK's Cognito connect sample does (aws-iot-device-sdk-python-v2, cognito_connect.py):
# it builds the Cognito API's AWS name itself and dials it on 443, trusting the system store.
COGNITO_SAMPLE = '''
import sys
import boto3
from botocore import UNSIGNED
from botocore.config import Config
from awscrt import auth, io, mqtt
from awsiot import mqtt_connection_builder

endpoint, pool_id, region = sys.argv[1:4]
# An app's first call, with no endpoint configured: boto3 resolves AWS's own name.
app = boto3.client("cognito-identity", region_name=region, config=Config(signature_version=UNSIGNED))
identity = app.get_id(IdentityPoolId=pool_id)["IdentityId"]
print("IDENTITY", identity, flush=True)
cognito_endpoint = f"cognito-identity.{region}.amazonaws.com"
credentials_provider = auth.AwsCredentialsProvider.new_cognito(
    endpoint=cognito_endpoint, identity=identity, tls_ctx=io.ClientTlsContext(io.TlsContextOptions()))
conn = mqtt_connection_builder.websockets_with_default_aws_signing(
    endpoint=endpoint, region=region, credentials_provider=credentials_provider,
    client_id="cognito-sample", clean_session=False, keep_alive_secs=30)
conn.connect().result(30)
print("CONNECTED", flush=True)
conn.publish(topic="guests/hello", payload=b"hi", qos=mqtt.QoS.AT_LEAST_ONCE)[0].result(30)
print("PUBLISHED", flush=True)
conn.disconnect().result(30)
# The name serves the Cognito API and nothing else of the control plane.
iam = boto3.client("iam", region_name=region, endpoint_url=f"https://{cognito_endpoint}",
                   aws_access_key_id=sys.argv[4], aws_secret_access_key=sys.argv[5])
try:
    iam.list_users()
    print("IAM SERVED", flush=True)
except iam.exceptions.ClientError as e:
    print("IAM REFUSED", e.response["Error"]["Code"], e.response["Error"]["Message"], flush=True)
import requests
base = f"https://{cognito_endpoint}"
for path in ("/metrics", "/health"):
    print("GET", path, requests.get(base + path, timeout=10).status_code, flush=True)
r = requests.post(base + "/", data={"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
                                    "RoleArn": "arn:aws:iam::000000000000:role/x", "RoleSessionName": "s",
                                    "WebIdentityToken": "t"}, timeout=10)
print("STS", r.status_code, "AssumeRoleWithWebIdentityResult" in r.text, flush=True)
'''


def test_the_sdks_cognito_provider_reaches_aws_own_name_on_443(workdir):
    """Air-gapped, as an SDK sample sees it: with `domain = "amazonaws.com"`, name resolution
    pointing AWS's names at Sekisho (here /etc/hosts in a mount namespace of the client's own)
    and Sekisho's CA trusted as the system store, the Cognito connect sample's calls run
    unchanged: boto3 with no endpoint configured gets an identity, the CRT's Cognito
    credential provider dials `cognito-identity.us-east-1.amazonaws.com:443` (the device
    HTTPS port), and the identity connects over MQTT over WebSocket and publishes. Under that
    name only the Cognito API answers. Skipped where 443 or a mount namespace is not there."""
    import configparser
    import socket
    import subprocess
    import sys
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", 443))
    except OSError as e:  # not root, or 443 in use
        pytest.skip(f"cannot serve on port 443 here: {e}")
    s = Server(workdir / "cognito-443", config='domain = "amazonaws.com"\n')
    s.https_port = 443
    s.start(attempts=1)
    try:
        hosts = workdir / "cognito-443-hosts"
        endpoint = s.endpoint()
        assert endpoint.endswith(".iot.us-east-1.amazonaws.com")
        hosts.write_text(open("/etc/hosts").read()
                         + f"\n127.0.0.1 cognito-identity.us-east-1.amazonaws.com {endpoint}\n")
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {hosts} /etc/hosts && "
                                "getent hosts cognito-identity.us-east-1.amazonaws.com"],
                               capture_output=True, text=True)
        if probe.returncode != 0 or "127.0.0.1" not in probe.stdout:
            pytest.skip(f"no mount namespace here: {probe.stderr.strip()[:200]}")
        cog, iam = s.boto("cognito-identity"), s.boto("iam")
        pid = cog.create_identity_pool(IdentityPoolName="guests", AllowUnauthenticatedIdentities=True)[
            "IdentityPoolId"]
        arn = iam.create_role(RoleName="guest", AssumeRolePolicyDocument=trust(pid, "unauthenticated"))["Role"]["Arn"]
        iam.put_role_policy(RoleName="guest", PolicyName="iot", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
                {"Effect": "Allow", "Action": "iot:Publish",
                 "Resource": "arn:aws:iot:us-east-1:*:topic/guests/*"}]}))
        cog.set_identity_pool_roles(IdentityPoolId=pid, Roles={"unauthenticated": arn})
        watcher = Paho(s, "localhost", Device(s, s.boto(), unique("watch"), ALLOW_ALL, workdir), "cognito-443-watch")
        assert watcher.connect()[0] == 0
        watcher.subscribe("guests/#")
        script = workdir / "cognito_sample.py"
        script.write_text(COGNITO_SAMPLE)
        creds = configparser.ConfigParser()
        creds.read(s.env["AWS_SHARED_CREDENTIALS_FILE"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"SSL_CERT_FILE": s.ca, "AWS_CA_BUNDLE": s.ca, "REQUESTS_CA_BUNDLE": s.ca, "AWS_CONFIG_FILE": "/dev/null",
                    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"})
        out = subprocess.run(
            ["unshare", "-m", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$@"', "sh",
             sys.executable, str(script), endpoint, pid, "us-east-1",
             creds["sekisho"]["aws_access_key_id"], creds["sekisho"]["aws_secret_access_key"]],
            capture_output=True, text=True, env=env, timeout=120)
        assert "CONNECTED" in out.stdout and "PUBLISHED" in out.stdout, out.stdout + out.stderr[-3000:]
        m = watcher.messages.get(timeout=10)
        assert (m.topic, m.payload) == ("guests/hello", b"hi")
        assert "IAM REFUSED SignatureDoesNotMatch" in out.stdout and "'iam' is not served here" in out.stdout, out.stdout
        assert "GET /metrics 404" in out.stdout and "GET /health 404" in out.stdout, out.stdout
        assert "STS 403 False" in out.stdout, out.stdout
        # The identity the sample used is the pool's.
        identity = out.stdout.split("IDENTITY ", 1)[1].split()[0]
        assert cog.describe_identity(IdentityId=identity)["IdentityId"] == identity
        watcher.close()
    finally:
        s.stop()
    # Turned off, the name is unknown to the device port: the handshake is refused.
    import ssl
    off = Server(workdir / "cognito-443-off", config='domain = "amazonaws.com"\ncognito_on_device_port = false\n')
    off.https_port = 443
    off.start(attempts=1)
    try:
        ctx = ssl.create_default_context(cafile=off.ca)
        with socket.create_connection(("127.0.0.1", 443), timeout=10) as raw:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname="cognito-identity.us-east-1.amazonaws.com")
        # (The same handshake for the data endpoint's name succeeds: the refusal is the name's.)
        with socket.create_connection(("127.0.0.1", 443), timeout=10) as raw:
            ctx.wrap_socket(raw, server_hostname=off.endpoint()).close()
    finally:
        off.stop()
