"""docs/compatibility.md, "Your own CA": registering CAs and device certificates with boto3,
including two accounts racing for the same DEFAULT-mode registration (threads released together
by a barrier), which the registry must decide for exactly one of them."""

import json
import threading

import pytest
from botocore.exceptions import ClientError

from conftest import Openssl, Paho, Server, unique
from test_compat_tls import TLS12, UNKNOWN, cert_id, default_ca, ec_certificate, give_policy, sni_only_ca, tls_outcome


@pytest.fixture(scope="module")
def two(workdir):
    s = Server(workdir / unique("compat-reg"), accounts=["tenant-b"]).start()
    yield s
    s.stop()


def code_of(e):
    return e.response["Error"]["Code"], e.response["Error"]["Message"]


def race(calls):
    """Runs the calls at the same moment, one thread each; returns ("ok", result) or
    ("error", ClientError) per call, in order."""
    barrier = threading.Barrier(len(calls))
    out = [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            out[i] = ("ok", call())
        except ClientError as e:
            out[i] = ("error", e)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None for o in out), "a racing call did not finish"
    return out


ROUNDS = 8


def test_default_mode_ca_registration_race(two, workdir):
    """Row "the CA in DEFAULT mode in another account": A and B register the same CA in DEFAULT
    mode at the same moment (each with its own registration code's verification certificate),
    eight times with eight CAs. Each time exactly one wins; the other gets
    InvalidRequestException "Cannot accept this CACertificate", and holds no registration of it.
    Positive control: the loser may still register the CA in SNI_ONLY mode."""
    s = two
    a, b = s.boto(), s.boto(profile="tenant-b")
    pki = Openssl(workdir / unique("carace"))
    code_a, code_b = a.get_registration_code()["registrationCode"], b.get_registration_code()["registrationCode"]
    winners = []
    for i in range(ROUNDS):
        ca = pki.ca(f"race-{i}", f"Race CA {i}")
        va, vb = pki.leaf(f"race-{i}-va", code_a, ca), pki.leaf(f"race-{i}-vb", code_b, ca)
        out = race([
            lambda: a.register_ca_certificate(caCertificate=ca[0].read_text(),
                                              verificationCertificate=va[0].read_text(), setAsActive=True),
            lambda: b.register_ca_certificate(caCertificate=ca[0].read_text(),
                                              verificationCertificate=vb[0].read_text(), setAsActive=True),
        ])
        oks = [j for j, (kind, _) in enumerate(out) if kind == "ok"]
        assert len(oks) == 1, f"round {i}: {len(oks)} accounts hold the CA in DEFAULT mode: {out}"
        winner, loser = oks[0], 1 - oks[0]
        assert code_of(out[loser][1]) == ("InvalidRequestException", "Cannot accept this CACertificate"), out[loser]
        winners.append(winner)
        ca_id = out[winner][1]["certificateId"]
        clients = (a, b)
        desc = clients[winner].describe_ca_certificate(certificateId=ca_id)["certificateDescription"]
        assert (desc["certificateMode"], desc["status"]) == ("DEFAULT", "ACTIVE")
        with pytest.raises(ClientError) as e:
            clients[loser].describe_ca_certificate(certificateId=ca_id)
        assert code_of(e.value)[0] == "ResourceNotFoundException"
        # The loser is not shut out: SNI_ONLY is not limited.
        got = clients[loser].register_ca_certificate(caCertificate=ca[0].read_text(), certificateMode="SNI_ONLY")
        assert got["certificateId"] == ca_id
    print(f"\nwinners by round (0 = A, 1 = B): {winners}")


def test_default_mode_certificate_registration_race(two, workdir):
    """Row "RegisterCertificate: the certificate is DEFAULT-mode in another account". Two CA
    certificates with the same subject and key (a re-issued CA) are registered DEFAULT, one in A
    and one in B, so a device certificate verifies under both and would be DEFAULT in each.
    Sequentially: the second account gets InvalidRequestException "This request is not valid:
    …". Racing (eight devices, both accounts at the same moment): exactly one registration wins.
    Positive controls: the loser may register it SNI_ONLY (RegisterCertificateWithoutCA), and the
    winner's registration is the one a connection without SNI reaches."""
    s = two
    a, b = s.boto(), s.boto(profile="tenant-b")
    pki = Openssl(workdir / unique("certrace"))
    ca_a, _ = default_ca(a, pki, "reissued")
    reissued = pki.dir / "reissued-2.pem"
    pki.run("req", "-x509", "-key", str(ca_a[1]), "-out", str(reissued), "-days", "400", "-subj",
            "/O=Factory/CN=reissued CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    code_b = b.get_registration_code()["registrationCode"]
    ca_b = (reissued, ca_a[1])
    verification = pki.leaf("reissued-vb", code_b, ca_b)
    b.register_ca_certificate(caCertificate=reissued.read_text(), verificationCertificate=verification[0].read_text(),
                              setAsActive=True)

    # Sequential: A first, then B.
    dev = ec_certificate(pki.dir, "seq-dev", ca_a)
    got = a.register_certificate(certificatePem=dev.cert.read_text(), setAsActive=True)
    assert a.describe_certificate(certificateId=got["certificateId"])["certificateDescription"][
        "certificateMode"] == "DEFAULT"
    with pytest.raises(ClientError) as e:
        b.register_certificate(certificatePem=dev.cert.read_text(), setAsActive=True)
    err, msg = code_of(e.value)
    assert err == "InvalidRequestException" and msg.startswith("This request is not valid"), (err, msg)
    sni_only = b.register_certificate_without_ca(certificatePem=dev.cert.read_text(), status="ACTIVE")
    assert b.describe_certificate(certificateId=sni_only["certificateId"])["certificateDescription"][
        "certificateMode"] == "SNI_ONLY"

    # Racing.
    for i in range(ROUNDS):
        d = ec_certificate(pki.dir, f"race-dev-{i}", ca_a)
        pem = d.cert.read_text()
        out = race([lambda: a.register_certificate(certificatePem=pem, setAsActive=True),
                    lambda: b.register_certificate(certificatePem=pem, setAsActive=True)])
        oks = [j for j, (kind, _) in enumerate(out) if kind == "ok"]
        assert len(oks) == 1, f"device {i}: {len(oks)} DEFAULT-mode registrations: {out}"
        winner, loser = oks[0], 1 - oks[0]
        err, msg = code_of(out[loser][1])
        assert err == "InvalidRequestException" and msg.startswith("This request is not valid"), (err, msg)
        if i == 0:
            # Without SNI the connection goes to the winner's account: give only the winner a
            # policy that allows connecting, and see it accepted.
            clients = (a, b)
            give_policy(clients[winner], out[winner][1]["certificateArn"])
            p = Paho(s, "127.0.0.1", d, unique("race"))
            p.c.tls_insecure_set(True)  # an IP literal sends no SNI; the CA check stays on
            assert p.connect()[0] == 0
            p.close()


def test_ca_already_registered_names_it(two, workdir):
    """Row "the CA already registered in this account": ResourceAlreadyExistsException with
    resourceId and resourceArn (boto3 exposes the error's members). Positive control: the first
    registration succeeds with that id and ARN."""
    s = two
    iot = s.boto(profile="tenant-b")
    pki = Openssl(workdir / unique("again"))
    ca = pki.ca("again-ca")
    first = iot.register_ca_certificate(caCertificate=ca[0].read_text(), certificateMode="SNI_ONLY")
    with pytest.raises(ClientError) as e:
        iot.register_ca_certificate(caCertificate=ca[0].read_text(), certificateMode="SNI_ONLY")
    assert code_of(e.value)[0] == "ResourceAlreadyExistsException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    assert e.value.response.get("resourceId") == first["certificateId"], e.value.response
    assert e.value.response.get("resourceArn") == first["certificateArn"], e.value.response


def test_no_registration_code_is_a_code_validation_error(workdir):
    """Row "verification certificate's CN is not the registration code (or there is no code)":
    after DeleteRegistrationCode, a DEFAULT registration is RegistrationCodeValidationException.
    Positive control: with a new code and a verification certificate for it, it registers."""
    s = Server(workdir / unique("nocode")).start()
    try:
        iot = s.boto()
        pki = Openssl(workdir / unique("nocode-pki"))
        ca = pki.ca("nocode-ca")
        old = iot.get_registration_code()["registrationCode"]
        verification = pki.leaf("nocode-v", old, ca)
        iot.delete_registration_code()
        with pytest.raises(ClientError) as e:
            iot.register_ca_certificate(caCertificate=ca[0].read_text(),
                                        verificationCertificate=verification[0].read_text())
        assert code_of(e.value)[0] == "RegistrationCodeValidationException"
        new = iot.get_registration_code()["registrationCode"]
        assert new != old
        ok = pki.leaf("nocode-v2", new, ca)
        iot.register_ca_certificate(caCertificate=ca[0].read_text(), verificationCertificate=ok[0].read_text())
    finally:
        s.stop()


def test_register_certificate_status(two, workdir):
    """Row "RegisterCertificate without status": setAsActive decides (ACTIVE, else INACTIVE);
    status accepts ACTIVE, INACTIVE, REVOKED and wins over setAsActive; anything else is
    InvalidRequestException. Each registration's status is what the TLS handshake then does:
    ACTIVE accepted, the others certificate_unknown."""
    s = two
    iot = s.boto()
    pki = Openssl(workdir / unique("status"))
    ca, _ = sni_only_ca(iot, pki, "status")
    cases = [({}, "INACTIVE"), ({"setAsActive": True}, "ACTIVE"), ({"setAsActive": False}, "INACTIVE"),
             ({"status": "ACTIVE"}, "ACTIVE"), ({"status": "INACTIVE"}, "INACTIVE"),
             ({"status": "REVOKED"}, "REVOKED"), ({"status": "REVOKED", "setAsActive": True}, "REVOKED"),
             ({"status": "INACTIVE", "setAsActive": True}, "INACTIVE")]
    for i, (kwargs, want) in enumerate(cases):
        dev = ec_certificate(pki.dir, f"status-{i}", ca)
        got = iot.register_certificate(certificatePem=dev.cert.read_text(), **kwargs)
        desc = iot.describe_certificate(certificateId=got["certificateId"])["certificateDescription"]
        assert desc["status"] == want, (kwargs, desc["status"])
        give_policy(iot, got["certificateArn"])
        assert tls_outcome(s, dev, s.endpoint(), version=TLS12) == ("accepted" if want == "ACTIVE" else UNKNOWN), kwargs
    for bad in ("PENDING_ACTIVATION", "PENDING_TRANSFER", "REGISTER_INACTIVE"):
        dev = ec_certificate(pki.dir, f"status-{bad}", ca)
        with pytest.raises(ClientError) as e:
            iot.register_certificate(certificatePem=dev.cert.read_text(), status=bad)
        assert code_of(e.value)[0] == "InvalidRequestException", bad
        with pytest.raises(ClientError) as e:
            iot.describe_certificate(certificateId=cert_id(dev.cert))
        assert code_of(e.value)[0] == "ResourceNotFoundException", "a refused registration registers nothing"


def test_jitp_provisions_a_device_on_its_first_connection(two, workdir):
    """Row "registrationConfig (JITP templates)": kept and returned (and replaced by
    UpdateCACertificate); on a device's first connection the template runs with the values of
    its certificate's subject: the thing named by its CN is created, the policy created and
    attached, the certificate attached and made ACTIVE. That first connection is refused (as
    AWS drops it); the second is accepted. A template declaring a subject field the
    certificate lacks provisions nothing: the certificate stays PENDING_ACTIVATION."""
    s = two
    iot = s.boto()
    account = s.account_id()
    pki = Openssl(workdir / unique("jitp"))
    ca = pki.ca("jitp-ca", "JITP CA")
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect",
         "Resource": f"arn:aws:iot:us-east-1:{account}:client/${{iot:Connection.Thing.ThingName}}"}]})
    template = json.dumps({
        "Parameters": {"AWS::IoT::Certificate::CommonName": {"Type": "String"},
                       "AWS::IoT::Certificate::Id": {"Type": "String"}},
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"}, "AttributePayload": {"via": "jitp"}}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": policy}}}})
    iam = s.boto("iam")
    role_name = unique("JITPRole")
    role = iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    # What AWS's AWSIoTThingsRegistration grants: provisioning acts with the role.
    iam.put_role_policy(RoleName=role_name, PolicyName="registration", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
            "iot:CreateThing", "iot:UpdateThing", "iot:CreatePolicy", "iot:AttachPolicy",
            "iot:AttachThingPrincipal", "iot:UpdateCertificate"]}]}))
    ca_id = iot.register_ca_certificate(caCertificate=ca[0].read_text(), certificateMode="SNI_ONLY", setAsActive=True,
                                        allowAutoRegistration=True,
                                        registrationConfig={"templateBody": template, "roleArn": role})["certificateId"]
    desc = iot.describe_ca_certificate(certificateId=ca_id)
    assert desc["registrationConfig"]["templateBody"] == template and desc["registrationConfig"]["roleArn"] == role
    cn = unique("jitp-thing")
    dev = ec_certificate(pki.dir, cn, ca, cn=cn)
    assert tls_outcome(s, dev, s.endpoint(), version=TLS12) == UNKNOWN, "the first connection is refused"
    got = iot.describe_certificate(certificateId=cert_id(dev.cert))["certificateDescription"]
    assert got["status"] == "ACTIVE" and got["caCertificateId"] == ca_id
    assert iot.describe_thing(thingName=cn)["attributes"] == {"via": "jitp"}
    assert iot.list_principal_things(principal=got["certificateArn"])["things"] == [cn]
    assert len(iot.list_attached_policies(target=got["certificateArn"])["policies"]) == 1
    assert tls_outcome(s, dev, s.endpoint(), version=TLS12) == "accepted"
    p = Paho(s, s.endpoint(), dev, cn)
    assert p.connect()[0] == 0, "the template's policy lets the thing connect"
    p.close()

    # A declared subject field the certificate does not have: nothing is provisioned.
    strict = json.dumps({"Parameters": {"AWS::IoT::Certificate::Country": {"Type": "String"},
                                        "AWS::IoT::Certificate::Id": {"Type": "String"}},
                         "Resources": {"certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                             "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}}}}})
    iot.update_ca_certificate(certificateId=ca_id, registrationConfig={"templateBody": strict, "roleArn": role})
    assert iot.describe_ca_certificate(certificateId=ca_id)["registrationConfig"]["templateBody"] == strict
    other = ec_certificate(pki.dir, unique("nocountry"), ca, cn=unique("nc"))
    assert tls_outcome(s, other, s.endpoint(), version=TLS12) == UNKNOWN
    got = iot.describe_certificate(certificateId=cert_id(other.cert))["certificateDescription"]
    assert got["status"] == "PENDING_ACTIVATION"
    assert tls_outcome(s, other, s.endpoint(), version=TLS12) == UNKNOWN


def test_a_registration_config_passes_its_role(two, workdir):
    """Naming a role in a CA's registrationConfig hands it to just-in-time provisioning, which
    acts with the role's permissions: RegisterCACertificate and UpdateCACertificate need
    `iam:PassRole` on it (as CreateProvisioningTemplate does), and the role must trust
    iot.amazonaws.com. A JITP template named by templateName provisions only while enabled."""
    import boto3
    from botocore.config import Config

    s = two
    iot, iam = s.boto(), s.boto("iam")
    account = s.account_id()
    trust = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
    role_name = unique("jitp-pass")
    role = iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=trust)["Role"]["Arn"]
    iam.put_role_policy(RoleName=role_name, PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}))
    untrusting = iam.create_role(RoleName=unique("no-iot"), AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    user = unique("ca-admin")
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="ca", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
            "iot:RegisterCACertificate", "iot:UpdateCACertificate", "iot:DescribeCACertificate"]}]}))
    k = iam.create_access_key(UserName=user)["AccessKey"]
    admin = boto3.client("iot", region_name="us-east-1", endpoint_url=f"https://localhost:{s.api_port}", verify=s.ca,
                         aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"],
                         config=Config(retries={"total_max_attempts": 1}))
    pki = Openssl(workdir / unique("jitp-pass"))
    ca = pki.ca("pass-ca", "Pass CA")
    body = json.dumps({"Parameters": {"AWS::IoT::Certificate::Id": {"Type": "String"}},
                       "Resources": {"certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                           "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}}}})
    config = {"templateBody": body, "roleArn": role}

    def refused(call, code, **kw):
        with pytest.raises(ClientError) as e:
            call(**kw)
        assert e.value.response["Error"]["Code"] == code, e.value.response
        return e.value.response["Error"]["Message"]

    msg = refused(admin.register_ca_certificate, "AccessDeniedException", caCertificate=ca[0].read_text(),
                  certificateMode="SNI_ONLY", setAsActive=True, allowAutoRegistration=True,
                  registrationConfig=config)
    assert "iam:PassRole" in msg and role in msg, msg
    assert all(c["certificateId"] != cert_id(ca[0]) for c in iot.list_ca_certificates()["certificates"])
    # Without a registrationConfig the same user registers the CA; adding one later is passing.
    ca_id = admin.register_ca_certificate(caCertificate=ca[0].read_text(), certificateMode="SNI_ONLY",
                                          setAsActive=True, allowAutoRegistration=True)["certificateId"]
    refused(admin.update_ca_certificate, "AccessDeniedException", certificateId=ca_id, registrationConfig=config)
    assert "registrationConfig" not in iot.describe_ca_certificate(certificateId=ca_id)
    # Allowed to pass it: accepted. A role that does not trust IoT: refused, even for the admin.
    iam.put_user_policy(UserName=user, PolicyName="pass", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iam:PassRole", "Resource": [role, untrusting]}]}))
    admin.update_ca_certificate(certificateId=ca_id, registrationConfig=config)
    assert iot.describe_ca_certificate(certificateId=ca_id)["registrationConfig"]["roleArn"] == role
    msg = refused(iot.update_ca_certificate, "InvalidRequestException", certificateId=ca_id,
                  registrationConfig={"templateBody": body, "roleArn": untrusting})
    assert "does not trust iot.amazonaws.com" in msg
    # A JITP template named instead: provisions only while enabled.
    name = unique("jitp-tpl")
    iot.create_provisioning_template(templateName=name, templateBody=body, provisioningRoleArn=role,
                                     enabled=False, type="JITP")
    iot.update_ca_certificate(certificateId=ca_id, registrationConfig={"templateName": name})
    dev = ec_certificate(pki.dir, unique("off"), ca, cn=unique("off"))
    assert tls_outcome(s, dev, s.endpoint(), version=TLS12) == UNKNOWN
    assert iot.describe_certificate(certificateId=cert_id(dev.cert))["certificateDescription"]["status"] == \
        "PENDING_ACTIVATION"
    iot.update_provisioning_template(templateName=name, enabled=True)
    dev2 = ec_certificate(pki.dir, unique("on"), ca, cn=unique("on"))
    assert tls_outcome(s, dev2, s.endpoint(), version=TLS12) == UNKNOWN
    assert iot.describe_certificate(certificateId=cert_id(dev2.cert))["certificateDescription"]["status"] == "ACTIVE"
