"""Fleet provisioning by claim: templates with the stock AWS CLI and boto3, the device side with
the AWS IoT Device SDK's identity client (awsiotsdk) and paho-mqtt."""

import io
import json
import queue
import subprocess
import sys
import time
import zipfile

import pytest
from awscrt import mqtt as crt_mqtt
from botocore.config import Config
from awsiot import iotidentity, mqtt_connection_builder

from conftest import ALLOW_ALL, Paho, Server, unique

Q1 = crt_mqtt.QoS.AT_LEAST_ONCE


# What AWS's managed AWSIoTThingsRegistration policy grants a provisioning role.
REGISTRATION = ["iot:CreateThing", "iot:UpdateThing", "iot:AddThingToThingGroup", "iot:CreatePolicy",
                "iot:AttachPolicy", "iot:AttachThingPrincipal", "iot:UpdateCertificate", "iot:DescribeCertificate"]


def provisioning_role(server, actions=REGISTRATION):
    """A role IoT may assume, allowed `actions` (AWSIoTThingsRegistration's by default)."""
    iam = server.boto("iam")
    name = unique("prov")
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    if actions:
        iam.put_role_policy(RoleName=name, PolicyName="registration", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    return arn


def fleet_template(group, policy):
    """The developer guide's fleet template, with our group and policy."""
    return json.dumps({
        "Parameters": {"SerialNumber": {"Type": "String"}, "DeviceLocation": {"Type": "String"},
                       "AWS::IoT::Certificate::Id": {"Type": "String"}},
        "Mappings": {"LocationTable": {"Seattle": {"LocationUrl": "https://example.aws"}}},
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Fn::Join": ["", ["ThingPrefix_", {"Ref": "SerialNumber"}]]},
                "AttributePayload": {"version": "v1"}, "ThingGroups": [group]},
                "OverrideSettings": {"AttributePayload": "MERGE", "ThingTypeName": "REPLACE", "ThingGroups": "DO_NOTHING"}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": policy}}},
        "DeviceConfiguration": {"FallbackUrl": "https://www.example.com/test-site",
                                "LocationUrl": {"Fn::FindInMap": ["LocationTable", {"Ref": "DeviceLocation"}, "LocationUrl"]}}})


def claim_policy(account, template):
    """The developer guide's claim-certificate policy: provisioning and nothing else."""
    arn = f"arn:aws:iot:us-east-1:{account}"
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [
            f"{arn}:topic/$aws/certificates/create/*", f"{arn}:topic/$aws/certificates/create-from-csr/*",
            f"{arn}:topic/$aws/provisioning-templates/{template}/provision/*"]},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
            f"{arn}:topicfilter/$aws/certificates/create/*", f"{arn}:topicfilter/$aws/certificates/create-from-csr/*",
            f"{arn}:topicfilter/$aws/provisioning-templates/{template}/provision/*"]}]})


class Claim:
    """A claim certificate (created by the operator) on disk."""

    def __init__(self, server, iot, workdir, template):
        c = iot.create_keys_and_certificate(setAsActive=True)
        self.arn = c["certificateArn"]
        self.name = unique("claim")
        self.cert, self.key = workdir / f"{self.name}.crt", workdir / f"{self.name}.key"
        self.cert.write_text(c["certificatePem"])
        self.key.write_text(c["keyPair"]["PrivateKey"])
        pol = unique("claim-pol")
        iot.create_policy(policyName=pol, policyDocument=claim_policy(server.account_id(), template))
        iot.attach_policy(policyName=pol, target=c["certificateArn"])


def setup(server, workdir, role=None):
    iot = server.boto()
    account = server.account_id()
    group = unique("v1-lightbulbs")
    iot.create_thing_group(thingGroupName=group)
    policy = unique("DevicePolicy")
    arn = f"arn:aws:iot:us-east-1:{account}"
    iot.create_policy(policyName=policy, policyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/${{iot:Connection.Thing.ThingName}}"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/devices/${{iot:Connection.Thing.ThingName}}"}]}))
    template = unique("FleetTpl")[:36]
    server.aws("iot", "create-provisioning-template", "--template-name", template,
               "--provisioning-role-arn", role or provisioning_role(server), "--enabled",
               "--template-body", fleet_template(group, policy))
    return iot, group, template, Claim(server, iot, workdir, template)


def test_a_device_with_a_claim_certificate_provisions_itself(server, workdir):
    """The walkthrough with the SDK's identity client: CreateKeysAndCertificate, then
    RegisterThing with the ownership token; the device gets its thing name and configuration,
    and reconnects with its own certificate, which its thing's policy now governs."""
    iot, group, template, claim = setup(server, workdir)
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=server.endpoint(), port=server.mqtt_port, cert_filepath=str(claim.cert),
        pri_key_filepath=str(claim.key), ca_filepath=server.ca, client_id=unique("boot"),
        clean_session=True, keep_alive_secs=30)
    conn.connect().result(10)
    identity = iotidentity.IotIdentityClient(conn)
    created, registered, errors = queue.Queue(), queue.Queue(), queue.Queue()
    for fut, _ in (
        identity.subscribe_to_create_keys_and_certificate_accepted(
            iotidentity.CreateKeysAndCertificateSubscriptionRequest(), Q1, created.put),
        identity.subscribe_to_create_keys_and_certificate_rejected(
            iotidentity.CreateKeysAndCertificateSubscriptionRequest(), Q1, errors.put),
        identity.subscribe_to_register_thing_accepted(
            iotidentity.RegisterThingSubscriptionRequest(template_name=template), Q1, registered.put),
        identity.subscribe_to_register_thing_rejected(
            iotidentity.RegisterThingSubscriptionRequest(template_name=template), Q1, errors.put),
    ):
        fut.result(10)
    identity.publish_create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest(), Q1).result(10)
    keys = created.get(timeout=15)
    assert len(keys.certificate_id) == 64 and keys.private_key.startswith("-----BEGIN")
    desc = iot.describe_certificate(certificateId=keys.certificate_id)["certificateDescription"]
    assert desc["status"] == "PENDING_ACTIVATION"
    serial = unique("sn")
    identity.publish_register_thing(iotidentity.RegisterThingRequest(
        template_name=template, certificate_ownership_token=keys.certificate_ownership_token,
        parameters={"SerialNumber": serial, "DeviceLocation": "Seattle"}), Q1).result(10)
    reg = registered.get(timeout=10)
    thing = f"ThingPrefix_{serial}"
    assert reg.thing_name == thing
    assert reg.device_configuration == {"FallbackUrl": "https://www.example.com/test-site",
                                        "LocationUrl": "https://example.aws"}
    # The token is single-use.
    identity.publish_register_thing(iotidentity.RegisterThingRequest(
        template_name=template, certificate_ownership_token=keys.certificate_ownership_token,
        parameters={"SerialNumber": serial + "x", "DeviceLocation": "Seattle"}), Q1).result(10)
    err = errors.get(timeout=10)
    assert (err.status_code, err.error_code) == (400, "InvalidCertificateOwnershipToken")
    conn.disconnect().result(10)

    assert iot.describe_certificate(certificateId=keys.certificate_id)["certificateDescription"]["status"] == "ACTIVE"
    assert iot.describe_thing(thingName=thing)["attributes"] == {"version": "v1"}
    assert [g["groupName"] for g in iot.list_thing_groups_for_thing(thingName=thing)["thingGroups"]] == [group]
    assert iot.list_thing_principals(thingName=thing)["principals"][0].endswith(keys.certificate_id)
    # Reconnect with the new certificate: the thing's policy applies.
    cert, key = workdir / f"{thing}.crt", workdir / f"{thing}.key"
    cert.write_text(keys.certificate_pem)
    key.write_text(keys.private_key)

    class Own:
        pass
    own = Own()
    own.cert, own.key = cert, key
    p = Paho(server, server.endpoint(), own, thing, v5=True)
    assert p.connect()[0] == 0
    p.c.publish(f"devices/{thing}", b"hello", qos=1)
    assert p.pubacks.get(timeout=5)[1].value == 0
    p.c.publish("devices/someone-else", b"no", qos=1)
    assert p.pubacks.get(timeout=5)[1].value == 0x87
    p.close()


def test_csr_flow_privacy_and_refusals(server, workdir):
    """CreateCertificateFromCsr with openssl's CSR; answers reach the requester only (another
    client subscribed to the answer topics with every permission sees no key or token); bad
    tokens, disabled templates and bad parameters are refused with AWS's error form."""
    iot, group, template, claim = setup(server, workdir)
    spy_dev = type("D", (), {})()
    c = iot.create_keys_and_certificate(setAsActive=True)
    spy_dev.cert, spy_dev.key = workdir / "spy.crt", workdir / "spy.key"
    spy_dev.cert.write_text(c["certificatePem"])
    spy_dev.key.write_text(c["keyPair"]["PrivateKey"])
    pol = unique("spy")
    iot.create_policy(policyName=pol, policyDocument=json.dumps(ALLOW_ALL))
    iot.attach_policy(policyName=pol, target=c["certificateArn"])
    spy = Paho(server, server.endpoint(), spy_dev, unique("spy"))
    assert spy.connect()[0] == 0
    spy.subscribe("$aws/certificates/#", qos=1)
    spy.subscribe("$aws/provisioning-templates/#", qos=1)

    p = Paho(server, server.endpoint(), claim, unique("boot"))
    assert p.connect()[0] == 0
    key = workdir / "dev.key"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
    csr = subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=sensor"],
                         capture_output=True, text=True, check=True).stdout

    def ask(topic, body):
        p.c.publish(topic, json.dumps(body), qos=1)
        m = p.messages.get(timeout=15)
        return m.topic.rsplit("/", 1)[1], json.loads(m.payload)

    verdict, out = ask("$aws/certificates/create-from-csr/json", {"certificateSigningRequest": csr})
    assert verdict == "accepted" and "privateKey" not in out
    token = out["certificateOwnershipToken"]
    prov = f"$aws/provisioning-templates/{template}/provision/json"
    verdict, err = ask(prov, {"certificateOwnershipToken": token, "parameters": {"SerialNumber": "1", "DeviceLocation": "Paris"}})
    assert verdict == "rejected" and err["statusCode"] == 400 and err["errorCode"] == "InvalidParameters"
    verdict, err = ask(prov, {"parameters": {}})
    assert err == {"statusCode": 400, "errorCode": "InvalidCertificateOwnershipToken",
                   "errorMessage": "Certificate ownership token cannot be empty."}
    verdict, err = ask(prov, {"certificateOwnershipToken": "forged", "parameters": {"SerialNumber": "1", "DeviceLocation": "Seattle"}})
    assert err["errorCode"] == "InvalidCertificateOwnershipToken"
    verdict, err = ask(prov, {"certificateOwnershipToken": token,
                              "parameters": {"SerialNumber": "1", "AWS::IoT::Certificate::Id": "x"}})
    assert err["errorCode"] == "InvalidPayload"
    iot.update_provisioning_template(templateName=template, enabled=False)
    verdict, err = ask(prov, {"certificateOwnershipToken": token, "parameters": {"SerialNumber": "2", "DeviceLocation": "Seattle"}})
    assert verdict == "rejected" and err["errorCode"] == "InvalidRequest"
    iot.update_provisioning_template(templateName=template, enabled=True)
    # The token was not spent by the refusals before it was checked.
    verdict, out = ask(prov, {"certificateOwnershipToken": token, "parameters": {"SerialNumber": "2", "DeviceLocation": "Seattle"}})
    assert verdict == "accepted" and out["thingName"] == "ThingPrefix_2"

    seen = []
    while True:
        try:
            seen.append(spy.messages.get(timeout=0.5))
        except queue.Empty:
            break
    answers = [m.topic for m in seen if m.topic.endswith("/accepted") or m.topic.endswith("/rejected")]
    assert answers == [], answers
    assert not any(b"certificateOwnershipToken" in m.payload for m in seen)
    p.close()
    spy.close()


def test_templates_with_the_cli(server):
    iot = server.boto()
    role = provisioning_role(server)
    name = unique("tpl")[:36]
    body = json.dumps({"Parameters": {"AWS::IoT::Certificate::Id": {"Type": "String"}},
                       "Resources": {"certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                           "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}}}}})
    out = server.aws("iot", "create-provisioning-template", "--template-name", name, "--provisioning-role-arn", role,
                     "--template-body", body, "--description", "first")
    assert out["defaultVersionId"] == 1 and out["templateArn"].endswith(f":provisioningtemplate/{name}")
    d = server.aws("iot", "describe-provisioning-template", "--template-name", name)
    assert (d["enabled"], d["type"], d["description"], json.loads(d["templateBody"])) == (False, "FLEET_PROVISIONING", "first", json.loads(body))
    assert name in [t["templateName"] for t in server.aws("iot", "list-provisioning-templates")["templates"]]
    for i in range(2, 6):
        v = server.aws("iot", "create-provisioning-template-version", "--template-name", name,
                       "--template-body", body, *(["--set-as-default"] if i == 3 else []))
        assert v["versionId"] == i and v["isDefaultVersion"] == (i == 3)
    cp = server.aws("iot", "create-provisioning-template-version", "--template-name", name, "--template-body", body, check=False)
    assert cp.returncode != 0 and "VersionsLimitExceededException" in cp.stderr
    cp = server.aws("iot", "delete-provisioning-template-version", "--template-name", name, "--version-id", "3", check=False)
    assert cp.returncode != 0 and "DeleteConflictException" in cp.stderr
    server.aws("iot", "delete-provisioning-template-version", "--template-name", name, "--version-id", "1")
    vs = server.aws("iot", "list-provisioning-template-versions", "--template-name", name)["versions"]
    assert [v["versionId"] for v in vs] == [2, 3, 4, 5]
    # Refusals: bad bodies, a role that does not trust IoT, a duplicate, a hook naming another
    # account's function.
    for bad in ("[]", json.dumps({"Resources": {"b": {"Type": "AWS::S3::Bucket"}}})):
        cp = server.aws("iot", "create-provisioning-template", "--template-name", unique("bad")[:36],
                        "--provisioning-role-arn", role, "--template-body", bad, check=False)
        assert cp.returncode != 0 and "InvalidRequestException" in cp.stderr
    with pytest.raises(iot.exceptions.ResourceAlreadyExistsException):
        iot.create_provisioning_template(templateName=name, templateBody=body, provisioningRoleArn=role)
    with pytest.raises(iot.exceptions.InvalidRequestException):
        iot.create_provisioning_template(templateName=unique("hook")[:36], templateBody=body, provisioningRoleArn=role,
                                         preProvisioningHook={"targetArn": "arn:aws:lambda:us-east-1:123456789012:function:f"})
    server.aws("iot", "delete-provisioning-template", "--template-name", name)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_provisioning_template(templateName=name)


def test_cbor_payloads(server, workdir):
    """The CBOR topics (as the embedded SDKs use them): requests and answers in CBOR, encoded
    and decoded here with the AWS CRT's own CBOR codec."""
    from awscrt import cbor

    def enc(v):
        e = cbor.AwsCborEncoder()
        e.write_data_item(v)
        return e.get_encoded_data()

    def dec(b):
        return cbor.AwsCborDecoder(b).pop_next_data_item()

    iot, group, template, claim = setup(server, workdir)
    p = Paho(server, server.endpoint(), claim, unique("cbor"))
    assert p.connect()[0] == 0
    p.c.publish("$aws/certificates/create/cbor", enc({}), qos=1)
    m = p.messages.get(timeout=15)
    assert m.topic == "$aws/certificates/create/cbor/accepted"
    keys = dec(m.payload)
    assert keys["privateKey"].startswith("-----BEGIN") and len(keys["certificateId"]) == 64
    p.c.publish(f"$aws/provisioning-templates/{template}/provision/cbor",
                enc({"certificateOwnershipToken": keys["certificateOwnershipToken"],
                     "parameters": {"SerialNumber": "cbor1", "DeviceLocation": "Seattle"}}), qos=1)
    m = p.messages.get(timeout=10)
    assert m.topic.endswith("/provision/cbor/accepted")
    assert dec(m.payload)["thingName"] == "ThingPrefix_cbor1"
    # Not CBOR (or not a map): refused, in CBOR.
    p.c.publish(f"$aws/provisioning-templates/{template}/provision/cbor", b"\xff\x00garbage", qos=1)
    m = p.messages.get(timeout=10)
    assert m.topic.endswith("/provision/cbor/rejected") and dec(m.payload)["errorCode"] == "InvalidPayload"
    p.c.publish(f"$aws/provisioning-templates/{template}/provision/cbor", enc([1, 2]), qos=1)
    assert dec(p.messages.get(timeout=10).payload)["statusCode"] == 400
    p.close()
    assert iot.describe_certificate(certificateId=keys["certificateId"])["certificateDescription"]["status"] == "ACTIVE"


def test_provisioning_by_trusted_user(server, workdir):
    """CreateProvisioningClaim (the AWS CLI, as a trusted user's app calls it): a certificate
    valid five minutes, not among the account's certificates, that may provision with its
    template and do nothing else."""
    import datetime

    from cryptography import x509
    iot, group, template, _ = setup(server, workdir)
    out = server.aws("iot", "create-provisioning-claim", "--template-name", template)
    cert = x509.load_pem_x509_certificate(out["certificatePem"].encode())
    now = datetime.datetime.now(datetime.timezone.utc)
    assert 240 < (cert.not_valid_after_utc - now).total_seconds() <= 300
    assert abs(out["expiration"] - cert.not_valid_after_utc.timestamp()) < 2
    listed = [c["certificateId"] for c in iot.list_certificates(pageSize=250)["certificates"]]
    assert out["certificateId"] not in listed
    claim = type("Claim", (), {})()
    claim.cert, claim.key = workdir / "tu.crt", workdir / "tu.key"
    claim.cert.write_text(out["certificatePem"])
    claim.key.write_text(out["keyPair"]["PrivateKey"])
    p = Paho(server, server.endpoint(), claim, unique("tu"), v5=True)
    assert p.connect()[0] == 0
    p.c.publish("devices/anything", b"x", qos=1)
    assert p.pubacks.get(timeout=5)[1].value == 0x87
    p.c.publish("$aws/provisioning-templates/another/provision/json", b"{}", qos=1)
    assert p.pubacks.get(timeout=5)[1].value == 0x87
    p.c.publish("$aws/certificates/create/json", b"{}", qos=1)
    keys = json.loads(p.messages.get(timeout=15).payload)
    p.pubacks.get(timeout=5)
    p.c.publish(f"$aws/provisioning-templates/{template}/provision/json", json.dumps(
        {"certificateOwnershipToken": keys["certificateOwnershipToken"],
         "parameters": {"SerialNumber": "tu1", "DeviceLocation": "Seattle"}}), qos=1)
    m = p.messages.get(timeout=10)
    assert m.topic.endswith("/accepted") and json.loads(m.payload)["thingName"] == "ThingPrefix_tu1"
    p.close()
    # The claim may not take over a client id that has a session (connected, or persistent
    # and offline): it would cut that device off and swallow its queued messages.
    from conftest import Device
    victim = Device(server, iot, unique("victim"), ALLOW_ALL, workdir)
    v = Paho(server, server.endpoint(), victim, victim.name, clean=False)
    assert v.connect()[0] == 0
    thief = Paho(server, server.endpoint(), claim, victim.name, v5=True)
    assert thief.connect()[0] == 0x87
    thief.close()
    assert v.disconnects.empty(), "the device stays connected"
    v.close()
    thief = Paho(server, server.endpoint(), claim, victim.name, v5=True)
    assert thief.connect()[0] == 0x87, "nor resume its persistent session"
    thief.close()
    # A client id without a session is the claim's to use, again and again: its own session
    # (even one it asked to keep, as the SDK's sample does) ends with its connection, and a
    # reconnect may take over its own connection still open.
    mine = unique("claim-own")
    first = Paho(server, server.endpoint(), claim, mine, clean=False)
    assert first.connect()[0] == 0
    second = Paho(server, server.endpoint(), claim, mine, clean=False)
    assert second.connect()[0] == 0, "takes over its own connection"
    second.close()
    third = Paho(server, server.endpoint(), claim, mine, clean=False)
    assert third.connect()[0] == 0, "its session did not outlive it"
    third.close()
    iot.update_provisioning_template(templateName=template, enabled=False)
    cp = server.aws("iot", "create-provisioning-claim", "--template-name", template, check=False)
    assert cp.returncode != 0 and "InvalidRequestException" in cp.stderr


def test_hardening_after_review(server, workdir):
    """Provisioning acts with its role (what the role may not do, it may not do); a thing that
    already has a certificate is not given another by a claim; only a PENDING_ACTIVATION
    certificate is provisioned; a template names a policy or gives its document, not both, and
    a document never reuses an existing policy's name; answers come at QoS 0 (never kept for
    whoever takes the client id over); HTTPS publishes and wills cannot use provisioning topics."""
    import subprocess as sp
    iot, group, template, claim = setup(server, workdir)
    # This claim may use every template of the account (the tests below use several).
    arn = f"arn:aws:iot:us-east-1:{server.account_id()}"
    wide = unique("wide")
    iot.create_policy(policyName=wide, policyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": f"{arn}:topic/$aws/provisioning-templates/*"}]}))
    iot.attach_policy(policyName=wide, target=claim.arn)
    p = Paho(server, server.endpoint(), claim, unique("h"))
    assert p.connect()[0] == 0

    def create():
        p.c.publish("$aws/certificates/create/json", b"{}", qos=1)
        m = p.messages.get(timeout=15)
        assert m.qos == 0, "provisioning answers are QoS 0"
        return json.loads(m.payload)

    def register(tpl, token, serial):
        p.c.publish(f"$aws/provisioning-templates/{tpl}/provision/json", json.dumps(
            {"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial, "DeviceLocation": "Seattle"}}), qos=1)
        m = p.messages.get(timeout=10)
        return m.topic.rsplit("/", 1)[1], json.loads(m.payload)

    # A role without the registration permissions provisions nothing.
    weak_tpl = unique("weak")[:36]
    weak_pol = unique("weakpol")
    iot.create_policy(policyName=weak_pol, policyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}))
    server.aws("iot", "create-provisioning-template", "--template-name", weak_tpl, "--enabled",
               "--provisioning-role-arn", provisioning_role(server, ["iot:CreateThing"]),
               "--template-body", fleet_template(group, weak_pol))
    keys = create()
    verdict, err = register(weak_tpl, keys["certificateOwnershipToken"], "w1")
    assert verdict == "rejected" and "not allowed" in err["errorMessage"], err
    assert iot.describe_certificate(certificateId=keys["certificateId"])["certificateDescription"]["status"] == "PENDING_ACTIVATION"

    # A device's thing cannot be taken over by another claim device.
    keys = create()
    assert register(template, keys["certificateOwnershipToken"], "victim")[0] == "accepted"
    keys2 = create()
    verdict, err = register(template, keys2["certificateOwnershipToken"], "victim")
    assert verdict == "rejected" and "has a certificate already" in err["errorMessage"]
    assert len(iot.list_thing_principals(thingName="ThingPrefix_victim")["principals"]) == 1

    # An administrator's decision stands: an INACTIVE certificate is not activated.
    keys3 = create()
    iot.update_certificate(certificateId=keys3["certificateId"], newStatus="INACTIVE")
    verdict, err = register(template, keys3["certificateOwnershipToken"], "inactive")
    assert verdict == "rejected" and "INACTIVE" in err["errorMessage"]
    assert iot.describe_certificate(certificateId=keys3["certificateId"])["certificateDescription"]["status"] == "INACTIVE"
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_thing(thingName="ThingPrefix_inactive")

    # A document never takes an existing policy's name; a policy is named or given, not both.
    for body in (
        {"Resources": {"certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
            "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}}},
            "p": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "x", "PolicyDocument": "{}"}}},
         "Parameters": {"AWS::IoT::Certificate::Id": {"Type": "String"}}},
    ):
        bad = unique("bad")[:36]
        server.aws("iot", "create-provisioning-template", "--template-name", bad, "--enabled",
                   "--provisioning-role-arn", provisioning_role(server), "--template-body", json.dumps(body))
        keys4 = create()
        verdict, err = register(bad, keys4["certificateOwnershipToken"], "b")
        assert verdict == "rejected"
    p.close()

    # HTTPS cannot publish on provisioning topics (it would route a token to subscribers).
    dev = type("D", (), {})()
    c = iot.create_keys_and_certificate(setAsActive=True)
    dev.cert, dev.key = workdir / "hp.crt", workdir / "hp.key"
    dev.cert.write_text(c["certificatePem"])
    dev.key.write_text(c["keyPair"]["PrivateKey"])
    pol = unique("hp")
    iot.create_policy(policyName=pol, policyDocument=json.dumps(ALLOW_ALL))
    iot.attach_policy(policyName=pol, target=c["certificateArn"])
    code = sp.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", server.ca,
                   "--cert", str(dev.cert), "--key", str(dev.key), "--data-binary", '{"certificateOwnershipToken":"t"}',
                   f"https://{server.endpoint()}:{server.https_port}/topics/%24aws%2Fprovisioning-templates%2F{template}%2Fprovision%2Fjson"],
                  capture_output=True, text=True, timeout=15).stdout
    assert code == "403"


HOOK = '''
import json

def handler(event, context):
    print("HOOK-EVENT " + json.dumps(event, sort_keys=True))
    serial = event["parameters"].get("SerialNumber", "")
    if serial.startswith("slow-"):
        import time
        time.sleep(10)
    if not serial.startswith("ok-"):
        return {"allowProvisioning": False}
    return {"allowProvisioning": True,
            "parameterOverrides": {"SerialNumber": serial + "-checked", "DeviceLocation": "Seattle"}}
'''


def test_a_pre_provisioning_hook_decides_and_overrides(workdir):
    """A template's pre-provisioning hook (a Python Lambda handler hosted by Sekisho) sees the
    claim, the new certificate and the parameters; it refuses serials it does not know
    (rejected, 403 AccessDenied, nothing provisioned) and overrides parameters of those it
    allows. A hook IoT may not invoke, or one that takes more than 5 s, refuses too."""
    s = Server(workdir / "prov-hook", config=f'[functions]\nenabled = true\npython = "{sys.executable}"\n').start()
    try:
        iot, lam = s.boto(), s.boto("lambda", config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
        role = s.boto("iam").create_role(RoleName="hook-exec", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                    "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("app.py", HOOK)
        fn = lam.create_function(FunctionName="prov-hook", Runtime="python3.11", Role=role, Handler="app.handler",
                                 Code={"ZipFile": buf.getvalue()}, Timeout=30)["FunctionArn"]
        group, policy = unique("hooked"), unique("DevicePolicy")
        iot.create_thing_group(thingGroupName=group)
        iot.create_policy(policyName=policy, policyDocument=json.dumps(ALLOW_ALL))
        template = unique("HookTpl")[:36]
        arn = iot.create_provisioning_template(
            templateName=template, templateBody=fleet_template(group, policy), enabled=True,
            provisioningRoleArn=provisioning_role(s), preProvisioningHook={"targetArn": fn})["templateArn"]
        assert iot.describe_provisioning_template(templateName=template)["preProvisioningHook"]["targetArn"] == fn
        claim = Claim(s, iot, workdir, template)
        claim_id = claim.arn.rsplit("/", 1)[1]
        p = Paho(s, s.endpoint(), claim, "boot-1")
        assert p.connect()[0] == 0

        def ask(topic, body):
            p.c.publish(topic, json.dumps(body), qos=1)
            m = p.messages.get(timeout=20)
            return m.topic.rsplit("/", 1)[1], json.loads(m.payload)

        prov = f"$aws/provisioning-templates/{template}/provision/json"

        def register(serial):
            verdict, keys = ask("$aws/certificates/create/json", {})
            assert verdict == "accepted"
            return keys, ask(prov, {"certificateOwnershipToken": keys["certificateOwnershipToken"],
                                    "parameters": {"SerialNumber": serial, "DeviceLocation": "Nowhere"}})

        # Not yet allowed to invoke: refused.
        keys, (verdict, err) = register("ok-1")
        assert (verdict, err["statusCode"], err["errorCode"]) == ("rejected", 403, "AccessDenied"), err
        lam.add_permission(FunctionName="prov-hook", StatementId="iot", Action="lambda:InvokeFunction",
                           Principal="iot.amazonaws.com", SourceArn=arn)
        keys, (verdict, out) = register("ok-2")
        assert verdict == "accepted", out
        # The hook's overrides: its serial, and a location the template knows.
        assert out["thingName"] == "ThingPrefix_ok-2-checked"
        assert out["deviceConfiguration"]["LocationUrl"] == "https://example.aws"
        e = [json.JSONDecoder().raw_decode(line.split("HOOK-EVENT ", 1)[1])[0]
             for line in s.log_text().splitlines() if "HOOK-EVENT " in line][-1]
        assert (e["claimCertificateId"], e["certificateId"], e["templateArn"], e["clientId"]) == (
            claim_id, keys["certificateId"], arn, "boot-1")
        assert e["certificatePem"].startswith("-----BEGIN CERTIFICATE-----")
        assert e["parameters"] == {"SerialNumber": "ok-2", "DeviceLocation": "Nowhere"}
        # An unknown serial: refused (the device is told no more than that), nothing made, the
        # certificate not activated.
        keys, (verdict, err) = register("bad-3")
        assert err == {"statusCode": 403, "errorCode": "AccessDenied",
                       "errorMessage": "The pre-provisioning hook did not allow provisioning"}, err
        assert "ThingPrefix_bad-3" not in [t["thingName"] for t in iot.list_things()["things"]]
        assert iot.describe_certificate(certificateId=keys["certificateId"])["certificateDescription"]["status"] == \
            "PENDING_ACTIVATION"
        # The same token may try again with other parameters, three refusals in all; then it is
        # spent.
        again = {"certificateOwnershipToken": keys["certificateOwnershipToken"],
                 "parameters": {"SerialNumber": "bad-again", "DeviceLocation": "Nowhere"}}
        assert ask(prov, again)[1]["errorCode"] == "AccessDenied"
        assert ask(prov, again)[1]["errorCode"] == "AccessDenied"
        assert ask(prov, again)[1]["errorCode"] == "InvalidCertificateOwnershipToken"
        # A hook that takes too long refuses within about 5 s; the connection went on meanwhile.
        t = time.time()
        keys, (verdict, err) = register("slow-4")
        assert verdict == "rejected" and err["errorCode"] == "AccessDenied" and time.time() - t < 9
        p.close()
    finally:
        s.stop()
