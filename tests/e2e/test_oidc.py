"""OpenID Connect providers registered in IAM, with boto3: an account registers its factory's
identity provider (CreateOpenIDConnectProvider and the rest of its IAM API), the operator
configures the provider's keys (`[[oidc_providers]]`, a JWKS file: nothing is fetched), and a
device or app trades the provider's ID token for a role's credentials with STS
AssumeRoleWithWebIdentity, held to the role's trust (`<provider>:aud`, `<provider>:sub`) and
policies. Tokens that do not hold are refused with STS's errors, and credentials end with
their provider."""

import base64
import hashlib
import hmac
import json
import time

import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from conftest import Server, unique

ISSUER = "https://idp.factory.example/realms/plant"
NAME = "idp.factory.example/realms/plant"
UNCONFIGURED = "https://idp.elsewhere.example"


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def uint(n):
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class Issuer:
    """An identity provider's signing keys (RSA, kid `rsa1`; P-256, kid `ec1`) and tokens."""

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())

    def jwks(self):
        n = self.rsa.public_key().public_numbers()
        p = self.ec.public_key().public_numbers()
        return json.dumps({"keys": [
            {"kty": "RSA", "kid": "rsa1", "use": "sig", "alg": "RS256", "n": uint(n.n), "e": uint(n.e)},
            {"kty": "EC", "kid": "ec1", "use": "sig", "crv": "P-256",
             "x": b64(p.x.to_bytes(32, "big")), "y": b64(p.y.to_bytes(32, "big"))}]})

    def token(self, sub="device-7", aud="fleet-app", iss=ISSUER, exp_in=600, alg="RS256", **extra):
        now = int(time.time())
        claims = {"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + exp_in, **extra}
        kid = "ec1" if alg == "ES256" else "rsa1"
        signing_input = (b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode()) + "."
                         + b64(json.dumps(claims).encode())).encode()
        if alg == "ES256":
            r, s = decode_dss_signature(self.ec.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        elif alg == "HS256":
            # The classic confusion: the RSA public key's bytes as an HMAC secret.
            pem = self.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
            sig = hmac.new(pem, signing_input, hashlib.sha256).digest()
        else:
            sig = self.rsa.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return signing_input.decode() + "." + b64(sig)


def trust(provider_arn):
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Federated": provider_arn},
        "Action": "sts:AssumeRoleWithWebIdentity",
        "Condition": {"StringEquals": {f"{NAME}:aud": "fleet-app"},
                      "StringLike": {f"{NAME}:sub": "device-*"}}}]})


@pytest.fixture(scope="module")
def fx(workdir):
    idp = Issuer()
    jwks = workdir / "plant-jwks.json"
    jwks.write_text(idp.jwks())
    s = Server(workdir / "oidc", accounts=["tenant-b"], config=(
        f'[[oidc_providers]]\nurl = "{ISSUER}"\njwks_file = "{jwks}"\n')).start()
    iam = s.boto("iam")
    arn = iam.create_open_id_connect_provider(Url=ISSUER, ClientIDList=["fleet-app"],
                                              ThumbprintList=["a" * 40])["OpenIDConnectProviderArn"]
    role = iam.create_role(RoleName="plant-device", AssumeRolePolicyDocument=trust(arn))["Role"]["Arn"]
    iam.put_role_policy(RoleName="plant-device", PolicyName="own-topic", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Publish",
             "Resource": f"arn:aws:iot:us-east-1:*:topic/plant/${{{NAME}:sub}}"}]}))
    sts = s.boto("sts", config=Config(signature_version=UNSIGNED))
    yield s, idp, iam, arn, role, sts
    s.stop()


def assume(sts, role, token, name="session-1", **kw):
    return sts.assume_role_with_web_identity(RoleArn=role, RoleSessionName=name, WebIdentityToken=token, **kw)


def code(e):
    return e.value.response["Error"]["Code"]


def test_the_provider_api_with_boto3(fx):
    s, idp, iam, arn, role, sts = fx
    account = arn.split(":")[4]
    assert arn == f"arn:aws:iam::{account}:oidc-provider/{NAME}"
    got = iam.get_open_id_connect_provider(OpenIDConnectProviderArn=arn)
    assert (got["Url"], got["ClientIDList"], got["ThumbprintList"]) == (NAME, ["fleet-app"], ["a" * 40])
    assert arn in [p["Arn"] for p in iam.list_open_id_connect_providers()["OpenIDConnectProviderList"]]
    iam.add_client_id_to_open_id_connect_provider(OpenIDConnectProviderArn=arn, ClientID="console")
    iam.update_open_id_connect_provider_thumbprint(OpenIDConnectProviderArn=arn, ThumbprintList=["b" * 40])
    got = iam.get_open_id_connect_provider(OpenIDConnectProviderArn=arn)
    assert (got["ClientIDList"], got["ThumbprintList"]) == (["fleet-app", "console"], ["b" * 40])
    iam.remove_client_id_from_open_id_connect_provider(OpenIDConnectProviderArn=arn, ClientID="console")
    assert iam.get_open_id_connect_provider(OpenIDConnectProviderArn=arn)["ClientIDList"] == ["fleet-app"]
    # The same URL again (the host's case and a trailing slash do not make it another).
    with pytest.raises(iam.exceptions.EntityAlreadyExistsException):
        iam.create_open_id_connect_provider(Url="https://IDP.factory.example/realms/plant/", ClientIDList=["x"])
    for url in ("http://idp.factory.example", "https://idp.factory.example:8443", "https://idp.example?x=1"):
        with pytest.raises(ClientError) as e:
            iam.create_open_id_connect_provider(Url=url, ClientIDList=["x"])
        assert code(e) == "ValidationError", url
    with pytest.raises(ClientError) as e:
        iam.create_open_id_connect_provider(Url="https://tagged.example", ClientIDList=["x"],
                                            Tags=[{"Key": "k", "Value": "v"}])
    assert code(e) == "ValidationError"
    # Thumbprints: 40 hex digits, at most 5.
    with pytest.raises(ClientError) as e:
        iam.update_open_id_connect_provider_thumbprint(OpenIDConnectProviderArn=arn, ThumbprintList=["c" * 41])
    assert code(e) == "ValidationError"
    with pytest.raises(ClientError) as e:
        iam.update_open_id_connect_provider_thumbprint(OpenIDConnectProviderArn=arn,
                                                       ThumbprintList=[f"{i:040x}" for i in range(6)])
    assert code(e) == "ValidationError"
    iam.update_open_id_connect_provider_thumbprint(OpenIDConnectProviderArn=arn,
                                                   ThumbprintList=[f"{i:040x}" for i in range(5)])
    # Another account sees none of it, and cannot touch it.
    other = s.boto("iam", profile="tenant-b")
    assert other.list_open_id_connect_providers()["OpenIDConnectProviderList"] == []
    with pytest.raises(other.exceptions.NoSuchEntityException):
        other.get_open_id_connect_provider(OpenIDConnectProviderArn=arn)
    with pytest.raises(ClientError):
        other.delete_open_id_connect_provider(OpenIDConnectProviderArn=arn)


def test_a_token_buys_the_roles_credentials_and_its_policy_holds(fx):
    s, idp, iam, arn, role, sts = fx
    for alg in ("RS256", "ES256"):
        out = assume(sts, role, idp.token(alg=alg), DurationSeconds=900)
        assert out["SubjectFromWebIdentityToken"] == "device-7"
        assert (out["Provider"], out["Audience"]) == (ISSUER, "fleet-app")
        assert out["AssumedRoleUser"]["Arn"].endswith(":assumed-role/plant-device/session-1")
    c = out["Credentials"]
    keys = dict(aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                aws_session_token=c["SessionToken"])
    assert s.boto("sts", **keys).get_caller_identity()["Arn"].endswith(":assumed-role/plant-device/session-1")
    data = s.boto("iot-data", **keys)
    data.publish(topic="plant/device-7", payload=b"21.5")
    # The policy variable is the token's subject: another device's topic is refused.
    with pytest.raises(ClientError) as e:
        data.publish(topic="plant/device-8", payload=b"forged")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_tokens_that_do_not_hold_are_refused(fx, workdir):
    s, idp, iam, arn, role, sts = fx
    cases = [
        (Issuer().token(), "InvalidIdentityToken"),  # signed by another key
        (idp.token(exp_in=-5), "ExpiredTokenException"),
        (idp.token(aud="another-app"), "InvalidIdentityToken"),
        (idp.token(alg="HS256"), "InvalidIdentityToken"),
        (idp.token(iss="https://idp.unknown.example"), "IDPCommunicationError"),  # no keys for it
        (idp.token(sub="intruder"), "AccessDenied"),  # the trust's sub condition
        (idp.token(iss="https://IDP.factory.example/realms/plant"), "InvalidIdentityToken"),
        (idp.token(iss=ISSUER + "/"), "InvalidIdentityToken"),
        (idp.token(iss=NAME), "InvalidIdentityToken"),
        (idp.token().rsplit(".", 1)[0] + "." + b64(b"\0" * 256), "InvalidIdentityToken"),
    ]
    for token, want in cases:
        with pytest.raises(ClientError) as e:
            assume(sts, role, token)
        assert code(e) == want, (want, e.value.response["Error"])
    # A token whose signature held, then changed: refused.
    t = idp.token().split(".")
    t[1] = b64(json.dumps({"iss": ISSUER, "sub": "device-1", "aud": "fleet-app",
                           "exp": int(time.time()) + 600}).encode())
    with pytest.raises(ClientError) as e:
        assume(sts, role, ".".join(t))
    assert code(e) == "InvalidIdentityToken"
    # A provider registered without keys configured for it: the keys cannot be had.
    iam.create_open_id_connect_provider(Url=UNCONFIGURED, ClientIDList=["fleet-app"])
    with pytest.raises(ClientError) as e:
        assume(sts, role, idp.token(iss=UNCONFIGURED))
    assert code(e) == "IDPCommunicationError"
    # The provider is the role's account's: another account's role cannot be assumed with it,
    # even where that role trusts this account's provider ARN; not even once that account has
    # registered the same issuer (its own provider is another ARN).
    other = s.boto("iam", profile="tenant-b")
    other_role = other.create_role(RoleName="plant-device", AssumeRolePolicyDocument=trust(arn))["Role"]["Arn"]
    with pytest.raises(ClientError) as e:
        assume(sts, other_role, idp.token())
    assert code(e) == "InvalidIdentityToken"
    other.create_open_id_connect_provider(Url=ISSUER, ClientIDList=["fleet-app"])
    with pytest.raises(ClientError) as e:
        assume(sts, other_role, idp.token())
    assert code(e) == "AccessDenied"
    # Session policies are refused, not ignored; durations past the role's are refused.
    with pytest.raises(ClientError) as e:
        assume(sts, role, idp.token(), Policy=json.dumps({"Version": "2012-10-17", "Statement": []}))
    assert code(e) == "ValidationError"
    with pytest.raises(ClientError) as e:
        assume(sts, role, idp.token(), DurationSeconds=3601)
    assert code(e) == "ValidationError"


def test_one_subjects_sessions_are_reused_and_bounded(fx):
    """The call is unsigned: the same request gets the same live session, and one subject
    holds at most 16 sessions at once."""
    s, idp, iam, arn, role, sts = fx
    token = idp.token(sub="device-cap")
    first = assume(sts, role, token, name="cap-0")["Credentials"]
    assert assume(sts, role, token, name="cap-0")["Credentials"]["AccessKeyId"] == first["AccessKeyId"]
    for i in range(1, 16):
        assume(sts, role, token, name=f"cap-{i}")
    with pytest.raises(ClientError) as e:
        assume(sts, role, token, name="cap-16")
    assert code(e) == "LimitExceeded"
    # Another subject is not held back by this one.
    assume(sts, role, idp.token(sub="device-other"), name="cap-16")


def test_a_providers_users_are_identities_of_a_cognito_pool(fx):
    """An identity pool that names the provider (`OpenIdConnectProviderARNs`) takes its ID
    tokens as logins (`Logins: {"<host/path>": token}`): a user is one authenticated identity,
    made at its first login; its credentials are the pool's authenticated role's; it publishes
    over iot-data only where both that role and the IoT policy attached to the identity allow.
    Tokens of other users, audiences or providers are refused."""
    s, idp, iam, arn, role, sts = fx
    account = arn.split(":")[4]
    cog = s.boto("cognito-identity")
    app = s.boto("cognito-identity", config=Config(signature_version=UNSIGNED))
    pid = cog.create_identity_pool(IdentityPoolName="plant app", AllowUnauthenticatedIdentities=False,
                                   OpenIdConnectProviderARNs=[arn])["IdentityPoolId"]
    assert cog.describe_identity_pool(IdentityPoolId=pid)["OpenIdConnectProviderARNs"] == [arn]
    auth_role = iam.create_role(RoleName="plant-app-user", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Federated": "cognito-identity.amazonaws.com"},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {"cognito-identity.amazonaws.com:aud": pid},
                          "ForAnyValue:StringLike": {"cognito-identity.amazonaws.com:amr": "authenticated"}}}]}))
    iam.put_role_policy(RoleName="plant-app-user", PolicyName="iot", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}))
    cog.set_identity_pool_roles(IdentityPoolId=pid, Roles={"authenticated": auth_role["Role"]["Arn"]})
    logins = {NAME: idp.token(sub="operator-1")}
    identity = app.get_id(IdentityPoolId=pid, AccountId=account, Logins=logins)["IdentityId"]
    # The same user again (a new token): the same identity.
    again = app.get_id(IdentityPoolId=pid, Logins={NAME: idp.token(sub="operator-1")})["IdentityId"]
    assert again == identity
    other = app.get_id(IdentityPoolId=pid, Logins={NAME: idp.token(sub="operator-2")})["IdentityId"]
    assert other != identity
    assert cog.describe_identity(IdentityId=identity)["Logins"] == [NAME]
    c = app.get_credentials_for_identity(IdentityId=identity, Logins=logins)["Credentials"]
    keys = dict(aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretKey"],
                aws_session_token=c["SessionToken"])
    assert ":assumed-role/plant-app-user/CognitoIdentityCredentials" in s.boto(
        "sts", **keys).get_caller_identity()["Arn"]
    token = app.get_open_id_token(IdentityId=identity, Logins=logins)["Token"]
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["sub"] == identity and "authenticated" in claims["amr"] and NAME in claims["amr"]
    # Authenticated: the IoT policy attached to the identity must allow too.
    data = s.boto("iot-data", **keys)
    with pytest.raises(ClientError) as e:
        data.publish(topic=f"operators/{identity}", payload=b"x")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    iot = s.boto()
    pol = unique("op")
    iot.create_policy(policyName=pol, policyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "iot:Publish",
        "Resource": "arn:aws:iot:us-east-1:*:topic/operators/${cognito-identity.amazonaws.com:sub}"}]}))
    iot.attach_policy(policyName=pol, target=identity)
    data.publish(topic=f"operators/{identity}", payload=b"x")
    # Refusals: another user's token for this identity, another audience, an expired token, a
    # provider the pool does not name, and a login Sekisho cannot verify.
    bad = [
        (identity, {NAME: idp.token(sub="operator-2")}),
        (identity, {NAME: idp.token(sub="operator-1", aud="another-app")}),
        (identity, {NAME: idp.token(sub="operator-1", exp_in=-5)}),
        (identity, {NAME: Issuer().token(sub="operator-1")}),
        (identity, {"idp.elsewhere.example": idp.token(sub="operator-1", iss=UNCONFIGURED)}),
        (identity, {}),
    ]
    for ident, lg in bad:
        with pytest.raises(app.exceptions.NotAuthorizedException):
            app.get_credentials_for_identity(IdentityId=ident, Logins=lg)
    with pytest.raises(app.exceptions.NotAuthorizedException):
        app.get_id(IdentityPoolId=pid, Logins={"accounts.google.com": idp.token()})
    # Pools may name only this account's providers, and not one named like the developer provider.
    with pytest.raises(ClientError) as e:
        s.boto("cognito-identity", profile="tenant-b").create_identity_pool(
            IdentityPoolName="theirs", AllowUnauthenticatedIdentities=False, OpenIdConnectProviderARNs=[arn])
    assert code(e) == "InvalidParameterException"
    try:
        iam.create_open_id_connect_provider(Url=UNCONFIGURED, ClientIDList=["fleet-app"])
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    elsewhere = f"arn:aws:iam::{account}:oidc-provider/idp.elsewhere.example"
    with pytest.raises(cog.exceptions.InvalidParameterException):
        cog.create_identity_pool(IdentityPoolName="clash", AllowUnauthenticatedIdentities=False,
                                 DeveloperProviderName="idp.elsewhere.example", OpenIdConnectProviderARNs=[elsewhere])


def pool_trust(pid, amr):
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Federated": "cognito-identity.amazonaws.com"},
        "Action": "sts:AssumeRoleWithWebIdentity",
        "Condition": {"StringEquals": {"cognito-identity.amazonaws.com:aud": pid},
                      "ForAnyValue:StringLike": {"cognito-identity.amazonaws.com:amr": amr}}}]})


def test_a_provider_login_keeps_its_provider_in_the_pools_token(fx):
    """A pool with a developer provider and an OIDC provider, whose authenticated role trusts
    only the developer provider's users (amr): the OIDC user gets nothing, with its login or
    with a pool token traded for it (GetOpenIdToken), in the enhanced or the basic flow; the
    developer's user does."""
    s, idp, iam, arn, role, sts = fx
    cog = s.boto("cognito-identity")
    app = s.boto("cognito-identity", config=Config(signature_version=UNSIGNED))
    pid = cog.create_identity_pool(IdentityPoolName="mixed", AllowUnauthenticatedIdentities=False,
                                   AllowClassicFlow=True, DeveloperProviderName="login.corp",
                                   OpenIdConnectProviderARNs=[arn])["IdentityPoolId"]
    corp = iam.create_role(RoleName="corp-only", AssumeRolePolicyDocument=pool_trust(pid, "login.corp"))["Role"]["Arn"]
    cog.set_identity_pool_roles(IdentityPoolId=pid, Roles={"authenticated": corp})
    dev = cog.get_open_id_token_for_developer_identity(IdentityPoolId=pid, Logins={"login.corp": "alice"})
    app.get_credentials_for_identity(IdentityId=dev["IdentityId"], Logins={"cognito-identity.amazonaws.com": dev["Token"]})
    logins = {NAME: idp.token(sub="partner-1")}
    oid = app.get_id(IdentityPoolId=pid, Logins=logins)["IdentityId"]
    with pytest.raises(app.exceptions.InvalidIdentityPoolConfigurationException):
        app.get_credentials_for_identity(IdentityId=oid, Logins=logins)
    traded = app.get_open_id_token(IdentityId=oid, Logins=logins)["Token"]
    with pytest.raises(app.exceptions.InvalidIdentityPoolConfigurationException):
        app.get_credentials_for_identity(IdentityId=oid, Logins={"cognito-identity.amazonaws.com": traded})
    # Traded again, the pool's token still names the provider, not the developer.
    again = app.get_open_id_token(IdentityId=oid, Logins={"cognito-identity.amazonaws.com": traded})["Token"]
    amr = json.loads(base64.urlsafe_b64decode(again.split(".")[1] + "=="))["amr"]
    assert NAME in amr and "login.corp" not in amr, amr
    with pytest.raises(ClientError) as e:
        assume(sts, corp, traded, name="traded")
    assert code(e) == "AccessDenied"


def test_keys_rotate_without_a_restart_and_credentials_end_with_their_provider(fx, workdir):
    s, idp, iam, arn, role, sts = fx
    # The operator rotates the issuer's keys: new tokens verify, the old key's do not.
    rotated = Issuer()
    old_token = idp.token()
    jwks = workdir / "plant-jwks.json"
    before = jwks.read_text()
    jwks.write_text(rotated.jwks())
    time.sleep(0.05)
    try:
        with pytest.raises(ClientError) as e:
            assume(sts, role, old_token)
        assert code(e) == "InvalidIdentityToken"
        c = assume(sts, role, rotated.token(), name=unique("rot"))["Credentials"]
    finally:
        jwks.write_text(before)
    keys = dict(aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                aws_session_token=c["SessionToken"])
    who = s.boto("sts", **keys)
    assert who.get_caller_identity()["Account"] == arn.split(":")[4]
    # A pool's user of that provider, with credentials and a pool token.
    cog = s.boto("cognito-identity")
    app = s.boto("cognito-identity", config=Config(signature_version=UNSIGNED))
    pid = cog.create_identity_pool(IdentityPoolName="short-lived", AllowUnauthenticatedIdentities=False,
                                   OpenIdConnectProviderARNs=[arn])["IdentityPoolId"]
    user_role = iam.create_role(RoleName="short-lived-user",
                                AssumeRolePolicyDocument=pool_trust(pid, "authenticated"))["Role"]["Arn"]
    cog.set_identity_pool_roles(IdentityPoolId=pid, Roles={"authenticated": user_role})
    logins = {NAME: idp.token(sub="operator-9")}
    oid = app.get_id(IdentityPoolId=pid, Logins=logins)["IdentityId"]
    pc = app.get_credentials_for_identity(IdentityId=oid, Logins=logins)["Credentials"]
    pool_token = app.get_open_id_token(IdentityId=oid, Logins=logins)["Token"]
    pool_who = s.boto("sts", aws_access_key_id=pc["AccessKeyId"], aws_secret_access_key=pc["SecretKey"],
                      aws_session_token=pc["SessionToken"])
    pool_who.get_caller_identity()
    # Deleting the provider ends the sessions it vouched for, directly or through a pool (whose
    # tokens buy nothing more, and which no longer names it); registering it again does not
    # bring them back.
    iam.delete_open_id_connect_provider(OpenIDConnectProviderArn=arn)
    with pytest.raises(ClientError) as e:
        pool_who.get_caller_identity()
    assert code(e) == "InvalidClientTokenId"
    with pytest.raises(app.exceptions.NotAuthorizedException):
        app.get_credentials_for_identity(IdentityId=oid, Logins={"cognito-identity.amazonaws.com": pool_token})
    assert cog.describe_identity_pool(IdentityPoolId=pid)["OpenIdConnectProviderARNs"] == []
    try:
        with pytest.raises(ClientError) as e:
            who.get_caller_identity()
        assert code(e) == "InvalidClientTokenId"
        with pytest.raises(ClientError) as e:
            assume(sts, role, idp.token())
        assert code(e) == "InvalidIdentityToken"
    finally:
        again = iam.create_open_id_connect_provider(Url=ISSUER, ClientIDList=["fleet-app"])
        assert again["OpenIDConnectProviderArn"] == arn
    with pytest.raises(ClientError) as e:
        who.get_caller_identity()
    assert code(e) == "InvalidClientTokenId"
    assert assume(sts, role, idp.token())["SubjectFromWebIdentityToken"] == "device-7"
