"""Bring your own CA to many accounts: a CA made with openssl, registered DEFAULT in one account
and SNI_ONLY in another; the same device certificate in both, chosen by the TLS server name;
just-in-time registration; and the refusals (issue 4)."""

import hashlib
import json
import queue
import ssl
import subprocess
import time

import pytest
from awscrt import mqtt as crt_mqtt
from awsiot import mqtt_connection_builder
from botocore.exceptions import ClientError

from conftest import ALLOW_ALL, Device, FileDevice, Openssl, Paho, Server, unique


def cert_id(path):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


def code_of(e):
    return e.response["Error"]["Code"], e.response["Error"]["Message"]


def mosquitto_pub(server, host, dev, client_id, port=None, extra=(), topic="t/x"):
    cmd = ["mosquitto_pub", "-h", host, "-p", str(port or server.mqtt_port), "--cafile", server.ca,
           "--cert", str(dev.cert), "--key", str(dev.key), "-i", client_id, "-t", topic, "-m", "x", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="module")
def tenants(workdir):
    """One server with two accounts: `sekisho` (A, the default) and `tenant-b` (B)."""
    s = Server(workdir / unique("tenants"), accounts=["tenant-b"]).start()
    yield s
    s.stop()


def register_default_ca(iot, pki, ca, name):
    code = iot.get_registration_code()["registrationCode"]
    verification = pki.leaf(f"{name}-verification", code, ca)
    return iot.register_ca_certificate(caCertificate=ca[0].read_text(),
                                       verificationCertificate=verification[0].read_text(),
                                       setAsActive=True)["certificateId"]


def test_one_device_certificate_in_two_accounts(tenants, workdir):
    s = tenants
    a, b = s.boto(), s.boto(profile="tenant-b")
    pki = Openssl(workdir / unique("walk"))
    ca = pki.ca("plant-ca", "Plant Root CA")
    dev = FileDevice(*pki.leaf("dev-1", "dev-1", ca))

    # A registers the CA in DEFAULT mode with a verification certificate, then the device.
    ca_id = register_default_ca(a, pki, ca, "a")
    d = a.describe_ca_certificate(certificateId=ca_id)["certificateDescription"]
    assert (d["status"], d["certificateMode"], d["autoRegistrationStatus"]) == ("ACTIVE", "DEFAULT", "DISABLE")
    assert d["ownedBy"] == s.account_id()
    got = a.register_certificate(certificatePem=dev.cert.read_text(), caCertificatePem=ca[0].read_text(),
                                 setAsActive=True)
    assert got["certificateId"] == cert_id(dev.cert)
    desc = a.describe_certificate(certificateId=got["certificateId"])["certificateDescription"]
    assert (desc["certificateMode"], desc["caCertificateId"], desc["status"]) == ("DEFAULT", ca_id, "ACTIVE")
    listed = a.list_certificates_by_ca(caCertificateId=ca_id)["certificates"]
    assert [c["certificateId"] for c in listed] == [got["certificateId"]]

    # B cannot take the CA in DEFAULT mode (AWS's message), but can in SNI_ONLY mode.
    with pytest.raises(ClientError) as e:
        register_default_ca(b, pki, ca, "b")
    assert code_of(e.value) == ("InvalidRequestException", "Cannot accept this CACertificate")
    b_ca = b.register_ca_certificate(caCertificate=ca[0].read_text(), certificateMode="SNI_ONLY",
                                     setAsActive=True)["certificateId"]
    assert b_ca == ca_id
    got_b = b.register_certificate(certificatePem=dev.cert.read_text(), status="ACTIVE")
    assert got_b["certificateId"] == got["certificateId"]
    assert b.describe_certificate(certificateId=got_b["certificateId"])["certificateDescription"][
        "certificateMode"] == "SNI_ONLY"

    # The same thing name, policy and subscriber topic in both accounts.
    watchers = {}
    for name, iot in (("a", a), ("b", b)):
        iot.create_thing(thingName="dev-1")
        iot.attach_thing_principal(thingName="dev-1", principal=(got if name == "a" else got_b)["certificateArn"])
        pol = unique("pol")
        iot.create_policy(policyName=pol, policyDocument=json.dumps(ALLOW_ALL))
        iot.attach_policy(policyName=pol, target=(got if name == "a" else got_b)["certificateArn"])
        mon = Device(s, iot, unique(f"mon-{name}"), ALLOW_ALL, workdir)
        host = s.endpoint(profile="sekisho" if name == "a" else "tenant-b")
        w = Paho(s, host, mon, mon.name)
        assert w.connect()[0] == 0
        w.subscribe("factory/line", qos=1)
        watchers[name] = (w, host)
    assert watchers["a"][1] != watchers["b"][1]

    # The device connects to A's endpoint with the AWS IoT Device SDK, then to B's by changing
    # only the host name; each account sees only its own message.
    for name in ("a", "b"):
        host = watchers[name][1]
        conn = mqtt_connection_builder.mtls_from_path(
            endpoint=host, port=s.mqtt_port, cert_filepath=str(dev.cert), pri_key_filepath=str(dev.key),
            ca_filepath=s.ca, client_id="dev-1", clean_session=True, keep_alive_secs=30)
        conn.connect().result(10)
        conn.publish("factory/line", f"from-{name}".encode(), crt_mqtt.QoS.AT_LEAST_ONCE)[0].result(10)
        conn.disconnect().result(10)
        m = watchers[name][0].messages.get(timeout=5)
        assert m.payload == f"from-{name}".encode()
    for name in ("a", "b"):
        with pytest.raises(queue.Empty):
            watchers[name][0].messages.get(timeout=0.5)

    # paho too, on B's endpoint; and without SNI (an IP literal) the DEFAULT registration
    # chooses A.
    p = Paho(s, watchers["b"][1], dev, "dev-1")
    assert p.connect()[0] == 0
    p.c.publish("factory/line", b"paho-b", qos=1).wait_for_publish(5)
    p.close()
    assert watchers["b"][0].messages.get(timeout=5).payload == b"paho-b"
    r = mosquitto_pub(s, "127.0.0.1", dev, "dev-1", extra=["--insecure", "-q", "1"], topic="factory/line")
    assert r.returncode == 0, r.stderr
    assert watchers["a"][0].messages.get(timeout=5).payload == b"x"

    # A certificate registered only in B (SNI_ONLY) needs SNI: refused without, accepted with.
    only_b = FileDevice(*pki.leaf("dev-2", "dev-2", ca))
    reg = b.register_certificate(certificatePem=only_b.cert.read_text(), status="ACTIVE")
    pol = unique("pol")
    b.create_policy(policyName=pol, policyDocument=json.dumps(ALLOW_ALL))
    b.attach_policy(policyName=pol, target=reg["certificateArn"])
    assert mosquitto_pub(s, "127.0.0.1", only_b, "dev-2", extra=["--insecure"]).returncode != 0
    assert mosquitto_pub(s, watchers["a"][1], only_b, "dev-2").returncode != 0
    r = mosquitto_pub(s, watchers["b"][1], only_b, "dev-2")
    assert r.returncode == 0, r.stderr

    # Deactivating the CA stops new connections and cuts live ones; activating restores them.
    live = Paho(s, watchers["a"][1], dev, "dev-1", v5=True)
    assert live.connect()[0] == 0
    a.update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE")
    assert live.disconnects.get(timeout=5).value == 0x98
    live.close()
    assert mosquitto_pub(s, watchers["a"][1], dev, "dev-1").returncode != 0
    r = mosquitto_pub(s, watchers["b"][1], dev, "dev-1")
    assert r.returncode == 0, "B's registration of the CA is unaffected: " + r.stderr
    a.update_ca_certificate(certificateId=ca_id, newStatus="ACTIVE")
    r = mosquitto_pub(s, watchers["a"][1], dev, "dev-1")
    assert r.returncode == 0, r.stderr
    for w, _ in watchers.values():
        w.close()


def test_just_in_time_registration(tenants, workdir):
    s = tenants
    a = s.boto()
    account = s.account_id()
    host = s.endpoint()
    pki = Openssl(workdir / unique("jitr"))
    ca = pki.ca("jitr-ca", "JITR Root CA")
    ca_id = a.register_ca_certificate(caCertificate=ca[0].read_text(), certificateMode="SNI_ONLY",
                                      setAsActive=True, allowAutoRegistration=True)["certificateId"]
    assert a.describe_ca_certificate(certificateId=ca_id)["certificateDescription"][
        "autoRegistrationStatus"] == "ENABLE"
    mon = Device(s, a, unique("jitr-mon"), ALLOW_ALL, workdir)
    w = Paho(s, host, mon, mon.name)
    assert w.connect()[0] == 0
    w.subscribe(f"$aws/events/certificates/registered/{ca_id}", qos=1)

    dev = FileDevice(*pki.leaf("jitr-dev", "jitr-dev", ca))
    before = time.time() * 1000
    # The first connection registers the certificate and fails.
    assert mosquitto_pub(s, host, dev, "jitr-dev").returncode != 0
    message = w.messages.get(timeout=5)
    assert message.qos == 1, "the event is published at QoS 1"
    event = json.loads(message.payload)
    assert set(event) == {"certificateId", "caCertificateId", "timestamp", "certificateStatus", "awsAccountId",
                          "certificateRegistrationTimestamp"}
    assert event["certificateId"] == cert_id(dev.cert)
    assert (event["caCertificateId"], event["certificateStatus"], event["awsAccountId"]) == (
        ca_id, "PENDING_ACTIVATION", account)
    assert before - 1000 <= event["certificateRegistrationTimestamp"] <= event["timestamp"] <= time.time() * 1000
    desc = a.describe_certificate(certificateId=event["certificateId"])["certificateDescription"]
    assert (desc["status"], desc["caCertificateId"], desc["certificateMode"]) == (
        "PENDING_ACTIVATION", ca_id, "SNI_ONLY")

    # Presenting it again (this time with the CA in the chain) fails and announces it again.
    chain = pki.dir / "jitr-dev-chain.pem"
    chain.write_text(dev.cert.read_text() + ca[0].read_text())
    with_chain = FileDevice(chain, dev.key)
    assert mosquitto_pub(s, host, with_chain, "jitr-dev").returncode != 0
    assert json.loads(w.messages.get(timeout=5).payload)["certificateId"] == event["certificateId"]

    # Activated and given a policy, the device connects, with and without the chain.
    a.update_certificate(certificateId=event["certificateId"], newStatus="ACTIVE")
    pol = unique("pol")
    a.create_policy(policyName=pol, policyDocument=json.dumps(ALLOW_ALL))
    a.attach_policy(policyName=pol, target=desc["certificateArn"])
    for d in (dev, with_chain):
        r = mosquitto_pub(s, host, d, "jitr-dev")
        assert r.returncode == 0, r.stderr

    # A second device whose chain includes the CA registers on its first attempt too.
    dev2 = FileDevice(*pki.leaf("jitr-dev2", "jitr-dev2", ca))
    chain2 = pki.dir / "jitr-dev2-chain.pem"
    chain2.write_text(dev2.cert.read_text() + ca[0].read_text())
    assert mosquitto_pub(s, host, FileDevice(chain2, dev2.key), "jitr-dev2").returncode != 0
    assert json.loads(w.messages.get(timeout=5).payload)["certificateId"] == cert_id(dev2.cert)

    # No auto-registration without SNI, through another account, or once disabled.
    dev3 = FileDevice(*pki.leaf("jitr-dev3", "jitr-dev3", ca))
    assert mosquitto_pub(s, "127.0.0.1", dev3, "jitr-dev3", extra=["--insecure"]).returncode != 0
    assert mosquitto_pub(s, s.endpoint(profile="tenant-b"), dev3, "jitr-dev3").returncode != 0
    a.update_ca_certificate(certificateId=ca_id, newAutoRegistrationStatus="DISABLE")
    assert mosquitto_pub(s, host, dev3, "jitr-dev3").returncode != 0
    with pytest.raises(queue.Empty):
        w.messages.get(timeout=0.5)
    with pytest.raises(ClientError) as e:
        a.describe_certificate(certificateId=cert_id(dev3.cert))
    assert code_of(e.value)[0] == "ResourceNotFoundException"
    w.close()


def test_ca_registration_refusals(tenants, workdir):
    s = tenants
    a, b = s.boto(), s.boto(profile="tenant-b")
    pki = Openssl(workdir / unique("neg"))
    ca = pki.ca("neg-ca", "Negative CA")
    other = pki.ca("other-ca", "Other CA")
    code = a.get_registration_code()["registrationCode"]
    assert a.get_registration_code()["registrationCode"] == code

    def register(**kw):
        with pytest.raises(ClientError) as e:
            a.register_ca_certificate(**kw)
        return code_of(e.value)

    # Wrong registration code.
    wrong = pki.leaf("wrong-code", "0" * 64, ca)
    assert register(caCertificate=ca[0].read_text(),
                    verificationCertificate=wrong[0].read_text())[0] == "RegistrationCodeValidationException"
    # Verification certificate not signed by the CA.
    forged = pki.leaf("forged", code, other)
    assert register(caCertificate=ca[0].read_text(),
                    verificationCertificate=forged[0].read_text())[0] == "CertificateValidationException"
    # DEFAULT without a verification certificate; SNI_ONLY with one.
    assert register(caCertificate=ca[0].read_text())[0] == "InvalidRequestException"
    good = pki.leaf("good", code, ca)
    assert register(caCertificate=ca[0].read_text(), verificationCertificate=good[0].read_text(),
                    certificateMode="SNI_ONLY")[0] == "InvalidRequestException"
    # Not a CA; not a certificate; expired.
    assert register(caCertificate=good[0].read_text(), certificateMode="SNI_ONLY")[0] == \
        "CertificateValidationException"
    assert register(caCertificate="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                    certificateMode="SNI_ONLY")[0] == "CertificateValidationException"
    expired = expired_ca(pki)
    assert register(caCertificate=expired, certificateMode="SNI_ONLY")[0] == "CertificateValidationException"

    # A device certificate from an unregistered CA: refused by the API and at connect.
    stray = FileDevice(*pki.leaf("stray", "stray", other))
    with pytest.raises(ClientError) as e:
        a.register_certificate(certificatePem=stray.cert.read_text(), setAsActive=True)
    assert code_of(e.value)[0] == "CertificateValidationException"
    assert mosquitto_pub(s, s.endpoint(), stray, "stray").returncode != 0

    # Registered while INACTIVE: its devices cannot be registered; an ACTIVE CA cannot be deleted.
    ca_id = a.register_ca_certificate(caCertificate=ca[0].read_text(),
                                      verificationCertificate=good[0].read_text())["certificateId"]
    assert a.describe_ca_certificate(certificateId=ca_id)["certificateDescription"]["status"] == "INACTIVE"
    dev = pki.leaf("neg-dev", "neg-dev", ca)
    with pytest.raises(ClientError) as e:
        a.register_certificate(certificatePem=dev[0].read_text(), setAsActive=True)
    assert code_of(e.value)[0] == "CertificateStateException"
    a.update_ca_certificate(certificateId=ca_id, newStatus="ACTIVE")
    dev_id = a.register_certificate(certificatePem=dev[0].read_text(), setAsActive=True)["certificateId"]
    with pytest.raises(ClientError) as e:
        a.register_certificate(certificatePem=dev[0].read_text(), setAsActive=True)
    assert code_of(e.value)[0] == "ResourceAlreadyExistsException"
    with pytest.raises(ClientError) as e:
        a.delete_ca_certificate(certificateId=ca_id)
    assert code_of(e.value)[0] == "CertificateStateException"

    # Another account sees none of it: 404, not 403.
    for call in (lambda: b.describe_ca_certificate(certificateId=ca_id),
                 lambda: b.update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE"),
                 lambda: b.delete_ca_certificate(certificateId=ca_id),
                 lambda: b.describe_certificate(certificateId=dev_id),
                 lambda: b.update_certificate(certificateId=dev_id, newStatus="INACTIVE")):
        with pytest.raises(ClientError) as e:
            call()
        assert code_of(e.value)[0] == "ResourceNotFoundException"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert ca_id not in [c["certificateId"] for c in b.list_ca_certificates()["certificates"]]
    assert b.list_certificates_by_ca(caCertificateId=ca_id)["certificates"] == []
    # Still ACTIVE in A after B's attempts.
    assert a.describe_ca_certificate(certificateId=ca_id)["certificateDescription"]["status"] == "ACTIVE"

    # Deleting: deactivate first; then DescribeCACertificate is 404 and the code can be renewed.
    a.update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE")
    a.delete_ca_certificate(certificateId=ca_id)
    with pytest.raises(ClientError) as e:
        a.describe_ca_certificate(certificateId=ca_id)
    assert code_of(e.value)[0] == "ResourceNotFoundException"
    a.delete_registration_code()
    with pytest.raises(ClientError) as e:
        a.delete_registration_code()
    assert code_of(e.value)[0] == "ResourceNotFoundException"
    assert a.get_registration_code()["registrationCode"] != code


def test_ca_list_pages_and_same_subject_limit(tenants, workdir):
    s = tenants
    iot = s.boto(profile="tenant-b")
    pki = Openssl(workdir / unique("limit"))
    ids = []
    for i in range(10):
        cert, _ = pki.ca(f"same-{i}", "Same Subject CA")
        ids.append(iot.register_ca_certificate(caCertificate=cert.read_text(), certificateMode="SNI_ONLY")[
            "certificateId"])
    cert, _ = pki.ca("same-10", "Same Subject CA")
    with pytest.raises(ClientError) as e:
        iot.register_ca_certificate(caCertificate=cert.read_text(), certificateMode="SNI_ONLY")
    assert code_of(e.value) == ("LimitExceededException",
                                "Limit reached for number of CA Certificates with same subject")
    # boto3's paginator pages through ListCACertificates three at a time, newest first.
    pages = list(iot.get_paginator("list_ca_certificates").paginate(PaginationConfig={"PageSize": 3}))
    seen = [c["certificateId"] for p in pages for c in p["certificates"]]
    assert all(len(p["certificates"]) <= 3 for p in pages) and len(pages) >= 4
    assert len(seen) == len(set(seen)) and set(ids) <= set(seen)
    assert [i for i in seen if i in ids] == ids[::-1]
    # The stock CLI lists them too.
    listed = s.aws("iot", "list-ca-certificates", profile="tenant-b")["certificates"]
    assert set(ids) <= {c["certificateId"] for c in listed}


def expired_ca(pki):
    """A CA certificate that expired yesterday (openssl's CLI cannot back-date, so cryptography)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Expired CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_retained_messages_and_sessions_stay_in_their_account(tenants, workdir):
    s = tenants
    a, b = s.boto(), s.boto(profile="tenant-b")
    host_a, host_b = s.endpoint(), s.endpoint(profile="tenant-b")
    da = Device(s, a, unique("iso"), ALLOW_ALL, workdir)
    db = Device(s, b, unique("iso"), ALLOW_ALL, workdir)
    topic = f"iso/{unique('t')}"
    # A retained message in A is not retained in B under the same topic.
    pa = Paho(s, host_a, da, "same-client", v5=True)
    assert pa.connect()[0] == 0
    pa.c.publish(topic, b"only-in-a", qos=1, retain=True).wait_for_publish(5)
    pb = Paho(s, host_b, db, "same-client", v5=True)
    assert pb.connect()[0] == 0, "the same client id in another account is not a takeover"
    pb.subscribe(topic, qos=1)
    with pytest.raises(queue.Empty):
        pb.messages.get(timeout=0.5)
    with pytest.raises(queue.Empty):
        pa.disconnects.get(timeout=0.2)
    # B's persistent session does not receive A's messages, and A's session survives B's.
    pa.subscribe(topic, qos=1)
    assert pa.messages.get(timeout=5).payload == b"only-in-a"
    pb.c.publish(topic, b"only-in-b", qos=1).wait_for_publish(5)
    assert pb.messages.get(timeout=5).payload == b"only-in-b"
    with pytest.raises(queue.Empty):
        pa.messages.get(timeout=0.5)
    pa.close()
    pb.close()


def test_two_registered_cas_with_the_same_key_need_the_ca_pem(tenants, workdir):
    """Two CA certificates with the same subject and key (a re-issued CA): a device certificate
    verifies under both, so RegisterCertificate needs caCertificatePem (AWS's
    CertificateConflictException)."""
    s = tenants
    iot = s.boto(profile="tenant-b")
    pki = Openssl(workdir / unique("conflict"))
    ca = pki.ca("conflict-ca", "Reissued CA")
    again = pki.dir / "conflict-ca-2.pem"
    pki.run("req", "-x509", "-key", str(ca[1]), "-out", str(again), "-days", "400", "-subj", "/O=Factory/CN=Reissued CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ids = [iot.register_ca_certificate(caCertificate=p.read_text(), certificateMode="SNI_ONLY",
                                       setAsActive=True)["certificateId"] for p in (ca[0], again)]
    assert ids[0] != ids[1]
    dev = pki.leaf("conflict-dev", "conflict-dev", ca)
    with pytest.raises(ClientError) as e:
        iot.register_certificate(certificatePem=dev[0].read_text(), setAsActive=True)
    assert code_of(e.value)[0] == "CertificateConflictException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    got = iot.register_certificate(certificatePem=dev[0].read_text(), caCertificatePem=again.read_text(),
                                   setAsActive=True)
    desc = iot.describe_certificate(certificateId=got["certificateId"])["certificateDescription"]
    assert desc["caCertificateId"] == ids[1]
