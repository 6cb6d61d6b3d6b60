"""docs/compatibility.md, "Policies": versions and substitution, malformed documents, certificate
variables (serial number, values AWS does not substitute), CreateCertificateFromCsr's subject and
extensions, and TestAuthorization with thing attributes, each checked through TestAuthorization
(boto3) and, where the row is about connections, with a real MQTT client next to it."""

import datetime
import json
import subprocess

import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from conftest import Device, Openssl, Paho, Server, unique
from helpers import allow, arn_of
from test_compat_tls import ec_certificate, give_policy, sni_only_ca


@pytest.fixture(scope="module")
def srv(workdir):
    s = Server(workdir / unique("compat-pol")).start()
    yield s
    s.stop()


def decisions(iot, cert_arn, infos, client_id=None, **kw):
    """TestAuthorization: the decisions for (actionType, resource) pairs, in order."""
    if client_id is not None:
        kw["clientId"] = client_id
    res = iot.test_authorization(principal=cert_arn, authInfos=[
        {"actionType": t, "resources": [r]} for t, r in infos], **kw)["authResults"]
    return [r["authDecision"] for r in res]


def doc(*statements, version="2012-10-17"):
    d = {"Statement": list(statements)}
    if version is not None:
        d = {"Version": version, **d}
    return d


def test_test_authorization_with_thing_attributes(srv, workdir):
    """TestAuthorization binds the thing's attributes as a connection does: the thing attached
    to the certificate whose name is the client id (or an exclusively attached one). Decisions
    follow the attribute's current value; with a client id that names no attached thing the
    variable is unresolved and matches nothing (row "unresolved variables"), not even its own
    text. A real MQTT 5 connection with the same certificate and client id gets the same answers
    (PUBACK 0 / 0x87)."""
    s = srv
    iot = s.boto()
    arn = arn_of(s)
    room = "${iot:Connection.Thing.Attributes[room]}"
    policy = doc(
        allow("iot:Connect", f"{arn}:client/${{iot:Connection.Thing.ThingName}}",
              Condition={"StringEquals": {"iot:Connection.Thing.Attributes[floor]": "3"}}),
        allow("iot:Publish", f"{arn}:topic/room/{room}/*"),
        allow("iot:Subscribe", f"{arn}:topicfilter/room/{room}/*"))
    dev = Device(s, iot, unique("attrs"), policy, workdir)
    iot.update_thing(thingName=dev.name, attributePayload={"attributes": {"room": "r42", "floor": "3"}})
    infos = [("CONNECT", f"{arn}:client/{dev.name}"), ("PUBLISH", f"{arn}:topic/room/r42/temp"),
             ("PUBLISH", f"{arn}:topic/room/r43/temp"), ("SUBSCRIBE", f"{arn}:topicfilter/room/r42/#"),
             ("PUBLISH", f"{arn}:topic/room/{room}/temp")]
    assert decisions(iot, dev.cert_arn, infos, dev.name) == [
        "ALLOWED", "ALLOWED", "IMPLICIT_DENY", "ALLOWED", "IMPLICIT_DENY"]
    p = Paho(s, s.endpoint(), dev, dev.name, v5=True)
    assert p.connect()[0] == 0
    for topic, want in (("room/r42/temp", 0), ("room/r43/temp", 0x87)):
        info = p.c.publish(topic, b"x", qos=1)
        mid, rc = p.pubacks.get(timeout=5)
        assert (mid, rc.value) == (info.mid, want), topic

    # The attribute changes: TestAuthorization follows at once, and so does the live connection.
    iot.update_thing(thingName=dev.name, attributePayload={"attributes": {"room": "r43"}, "merge": True})
    assert decisions(iot, dev.cert_arn, infos[1:3], dev.name) == ["IMPLICIT_DENY", "ALLOWED"]
    for topic, want in (("room/r42/temp", 0x87), ("room/r43/temp", 0)):
        info = p.c.publish(topic, b"x", qos=1)
        mid, rc = p.pubacks.get(timeout=5)
        assert (mid, rc.value) == (info.mid, want), topic
    p.close()

    # A condition on an attribute: floor 4 fails CONNECT, in TestAuthorization and on the wire.
    iot.update_thing(thingName=dev.name, attributePayload={"attributes": {"floor": "4"}, "merge": True})
    assert decisions(iot, dev.cert_arn, infos[:1], dev.name) == ["IMPLICIT_DENY"]
    q = Paho(s, s.endpoint(), dev, dev.name, v5=True)
    assert q.connect()[0] == 0x87
    q.close()

    # Another client id: the non-exclusive thing is not associated, the variables stay unresolved.
    assert decisions(iot, dev.cert_arn, infos[1:3] + infos[4:], "someone-else") == ["IMPLICIT_DENY"] * 3
    assert decisions(iot, dev.cert_arn, infos[1:3]) == ["IMPLICIT_DENY"] * 2
    # Attached exclusively, the thing is associated whatever the client id.
    iot.detach_thing_principal(thingName=dev.name, principal=dev.cert_arn)
    iot.attach_thing_principal(thingName=dev.name, principal=dev.cert_arn, thingPrincipalType="EXCLUSIVE_THING")
    assert decisions(iot, dev.cert_arn, infos[1:3], "someone-else") == ["IMPLICIT_DENY", "ALLOWED"]


@pytest.mark.parametrize("version", ["2012-10-17", "2008-10-17", None], ids=["2012", "2008", "none"])
def test_policy_version_decides_substitution(srv, workdir, version):
    """Row "Version": 2012-10-17 substitutes variables; 2008-10-17 or no Version does not, so
    `${iot:ClientId}` is then plain text. Checked with TestAuthorization (the literal text
    matches only without substitution) and with an MQTT 5 CONNECT (0 with substitution, 0x87
    without)."""
    s = srv
    iot = s.boto()
    arn = arn_of(s)
    dev = Device(s, iot, unique("ver"), doc(allow("iot:Connect", f"{arn}:client/${{iot:ClientId}}"), version=version),
                 workdir)
    substitutes = version == "2012-10-17"
    got = decisions(iot, dev.cert_arn, [("CONNECT", f"{arn}:client/{dev.name}"),
                                        ("CONNECT", f"{arn}:client/${{iot:ClientId}}")], dev.name)
    assert got == (["ALLOWED", "IMPLICIT_DENY"] if substitutes else ["IMPLICIT_DENY", "ALLOWED"])
    p = Paho(s, s.endpoint(), dev, dev.name, v5=True)
    assert p.connect()[0] == (0 if substitutes else 0x87)
    p.close()


def test_other_versions_and_unknown_elements_are_malformed(srv):
    """Rows "Version" (anything else is malformed) and "unknown elements or fields"
    (MalformedPolicyException naming the element). Positive control: the same document with a
    valid version and no extra element is accepted."""
    iot = srv.boto()
    good = doc(allow("iot:Connect"))
    iot.create_policy(policyName=unique("ok"), policyDocument=json.dumps(good))
    cases = [
        ({**good, "Version": "2099-01-01"}, "2099-01-01"),
        ({**good, "Version": "2012-10-18"}, "2012-10-18"),
        ({**good, "Extra": 1}, '"Extra"'),
        ({**good, "Statement": [{**good["Statement"][0], "Bogus": "x"}]}, '"Bogus"'),
        ({**good, "Statement": [{**good["Statement"][0], "Sid": "s1", "Conditions": {}}]}, '"Conditions"'),
    ]
    for bad, named in cases:
        with pytest.raises(ClientError) as e:
            iot.create_policy(policyName=unique("bad"), policyDocument=json.dumps(bad))
        err = e.value.response["Error"]
        assert (err["Code"], e.value.response["ResponseMetadata"]["HTTPStatusCode"]) == ("MalformedPolicyException", 400)
        assert named in err["Message"], (bad, err["Message"])


def test_certificate_serial_number_is_decimal(srv, workdir):
    """Row "iot:Certificate.SerialNumber": decimal. A certificate with serial 0x0123ABCD
    (19114957) may publish to serial/19114957 only, not to the hexadecimal spellings."""
    s = srv
    iot = s.boto()
    arn = arn_of(s)
    pki = Openssl(workdir / unique("serial"))
    ca, _ = sni_only_ca(iot, pki, "serial")
    dev = ec_certificate(pki.dir, "serial-dev", ca, serial=0x0123ABCD)
    assert x509.load_pem_x509_certificate(dev.cert.read_bytes()).serial_number == 19114957
    reg = iot.register_certificate(certificatePem=dev.cert.read_text(), setAsActive=True)
    give_policy(iot, reg["certificateArn"], doc(allow("iot:Connect"),
                                                allow("iot:Publish", f"{arn}:topic/serial/${{iot:Certificate.SerialNumber}}")))
    topics = ["serial/19114957", "serial/123ABCD", "serial/0123ABCD", "serial/0123abcd", "serial/01:23:AB:CD"]
    assert decisions(iot, reg["certificateArn"], [("PUBLISH", f"{arn}:topic/{t}") for t in topics], "sn") == \
        ["ALLOWED"] + ["IMPLICIT_DENY"] * 4
    p = Paho(s, s.endpoint(), dev, unique("sn"), v5=True)
    assert p.connect()[0] == 0
    for t in topics[:3]:
        info = p.c.publish(t, b"x", qos=1)
        mid, rc = p.pubacks.get(timeout=5)
        assert (mid, rc.value) == (info.mid, 0 if t == topics[0] else 0x87), t
    p.close()


def test_certificate_values_with_wildcards_or_over_1024_characters_are_not_substituted(srv, workdir):
    """Row "certificate values with * $ + ? # or over 1,024 characters": not substituted, so a
    policy naming them grants nothing. CommonName `dev<c>x` for each of the five characters:
    CONNECT client/${iot:Certificate.Subject.CommonName} is denied (TestAuthorization, and an
    MQTT CONNECT for `+`), while CommonName `devx` is allowed. Organization of 1,024 characters
    is substituted and of 1,025 is not: an Allow with NotResource topic/${...Organization}
    allows topic `t` for the first and nothing for the second."""
    s = srv
    iot = s.boto()
    arn = arn_of(s)
    pki = Openssl(workdir / unique("subst"))
    ca, _ = sni_only_ca(iot, pki, "subst")
    connect_by_cn = doc(allow("iot:Connect", f"{arn}:client/${{iot:Certificate.Subject.CommonName}}"))
    devs = {}
    for cn in ["devx"] + [f"dev{c}x" for c in "*$+?#"]:
        d = ec_certificate(pki.dir, unique("cn"), ca, cn=cn)
        reg = iot.register_certificate(certificatePem=d.cert.read_text(), setAsActive=True)
        give_policy(iot, reg["certificateArn"], connect_by_cn)
        devs[cn] = (d, reg["certificateArn"])
        want = "ALLOWED" if cn == "devx" else "IMPLICIT_DENY"
        assert decisions(iot, reg["certificateArn"], [("CONNECT", f"{arn}:client/{cn}")], cn) == [want], cn
    for cn, want in (("devx", 0), ("dev+x", 0x87)):
        p = Paho(s, s.endpoint(), devs[cn][0], cn, v5=True)
        assert p.connect()[0] == want, cn
        p.close()

    not_resource = doc({"Effect": "Allow", "Action": "iot:Publish",
                        "NotResource": f"{arn}:topic/${{iot:Certificate.Subject.Organization}}"})
    for n, want in ((1024, "ALLOWED"), (1025, "IMPLICIT_DENY")):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"org{n}"),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o" * n)])
        d = ec_certificate(pki.dir, f"org{n}", ca, subject=subject)
        reg = iot.register_certificate(certificatePem=d.cert.read_text(), setAsActive=True)
        give_policy(iot, reg["certificateArn"], not_resource)
        assert decisions(iot, reg["certificateArn"], [("PUBLISH", f"{arn}:topic/t")], f"org{n}") == [want], n


def test_csr_subject_kept_extensions_ignored_repeated_attribute_first(srv, workdir):
    """Row "CreateCertificateFromCsr": the certificate takes the CSR's subject, never its
    extensions (a requested subjectAltName and CA:TRUE are not in it), and an attribute repeated
    in the CSR keeps its first value (OU=first, not second). The kept subject drives
    ${iot:Certificate.Subject.*}: publishing to first/... is allowed, second/... denied."""
    s = srv
    iot = s.boto()
    arn = arn_of(s)
    cn = unique("csr")
    key, csr = workdir / f"{cn}.key", workdir / f"{cn}.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}/O=Acme/OU=first/OU=second",
                    "-addext", "subjectAltName=DNS:evil.example,URI:spiffe://evil",
                    "-addext", "basicConstraints=critical,CA:TRUE"], check=True, capture_output=True)
    requested = x509.load_pem_x509_csr(csr.read_bytes())
    assert [a.value for a in requested.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == \
        ["first", "second"]
    assert requested.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    c = iot.create_certificate_from_csr(certificateSigningRequest=csr.read_text(), setAsActive=True)
    cert = x509.load_pem_x509_certificate(c["certificatePem"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Acme"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == ["first"]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    try:
        assert cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca is False
    except x509.ExtensionNotFound:
        pass
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc)
    give_policy(iot, c["certificateArn"], doc(
        allow("iot:Connect", f"{arn}:client/${{iot:Certificate.Subject.CommonName}}"),
        allow("iot:Publish", f"{arn}:topic/${{iot:Certificate.Subject.OrganizationalUnit}}/*")))
    dev = Device.__new__(Device)
    dev.cert, dev.key = workdir / f"{cn}.crt", key
    dev.cert.write_text(c["certificatePem"])
    p = Paho(s, s.endpoint(), dev, cn, v5=True)
    assert p.connect()[0] == 0
    for topic, want in (("first/x", 0), ("second/x", 0x87)):
        info = p.c.publish(topic, b"x", qos=1)
        mid, rc = p.pubacks.get(timeout=5)
        assert (mid, rc.value) == (info.mid, want), topic
    p.close()
