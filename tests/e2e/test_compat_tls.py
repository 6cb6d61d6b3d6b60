"""docs/compatibility.md, "TLS and endpoints" (and the authentication rows of "Your own CA"):
which TLS alert a refused device certificate gets, how the server name picks the account, and
what the device listeners offer. Raw TLS with Python's ssl (OpenSSL), certificates made with the
openssl command line and the cryptography package.

How a refusal shows: with TLS 1.2 the server verifies the client certificate inside the
handshake, so the alert ends `do_handshake`; with TLS 1.3 the client's side of the handshake is
over before the server has looked at its certificate, so the alert arrives on the first read.
`tls_outcome` sends an MQTT CONNECT and reads, so both versions end in the same outcome:
"accepted" (a CONNACK came back), "alert <name>" (OpenSSL's name for the alert received), or
"closed" (TCP closed or reset without an alert)."""

import datetime
import hashlib
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ALLOW_ALL, Device, FileDevice, Openssl, Paho, Server, faketime, unique
from test_limits_and_robustness import connect_v311

TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
UNKNOWN = "alert certificate_unknown"
EXPIRED = "alert certificate_expired"


# --- helpers, also used by the other test_compat_* files ---------------------------------------

def client_context(server, dev=None, version=None, verify_name=True):
    ctx = ssl.create_default_context(cafile=server.ca)
    ctx.check_hostname = verify_name
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if dev is not None:
        ctx.load_cert_chain(str(dev.cert), str(dev.key))
    return ctx


def alert_name(e):
    """OpenSSL's reason for a received alert, as `alert certificate_unknown`; None otherwise."""
    reason = (getattr(e, "reason", None) or "").upper()
    if "ALERT_" in reason:
        return "alert " + reason.split("ALERT_", 1)[1].lower()
    return None


def tls_outcome(server, dev, sni, port=None, version=None, address="127.0.0.1", ctx=None):
    """Connects to a device port with `dev`'s certificate and server name `sni` (None: no SNI),
    sends an MQTT 3.1.1 CONNECT and reads. Returns "accepted" (a CONNACK arrived, whatever its
    code), "alert <name>", or "closed"."""
    ctx = ctx or client_context(server, dev, version, verify_name=sni is not None and sni != address)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.settimeout(10)
    try:
        raw.connect((address, port or server.mqtt_port))
        t = ctx.wrap_socket(raw, server_hostname=sni)
        t.sendall(connect_v311(unique("tls")))
        data = t.recv(4)
        t.close()
        return "accepted" if data[:1] == b"\x20" else "closed"
    except ssl.SSLCertVerificationError:
        raise  # the client refused the server: not an outcome of the server's decision
    except ssl.SSLError as e:
        return alert_name(e) or "closed"
    except (ConnectionError, socket.timeout, TimeoutError, OSError):
        return "closed"
    finally:
        raw.close()


def cert_id(path):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(Path(path).read_text())).hexdigest()


def ec_certificate(directory, name, ca, cn=None, not_before=None, not_after=None, serial=None,
                   subject=None, extensions=()):
    """A device certificate (ECDSA P-256) signed by `ca` (an Openssl (cert, key) pair), with any
    validity period: openssl's command line cannot back-date, cryptography can. Returns a
    FileDevice."""
    directory = Path(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert = x509.load_pem_x509_certificate(Path(ca[0]).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca[1]).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    name = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or name)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
         .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
         .not_valid_after(not_after or now + datetime.timedelta(days=30)))
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    cert = b.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name_slug(name)}-{unique('c')}.pem", directory / f"{unique('k')}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return FileDevice(cert_path, key_path)


def name_slug(name):
    return "".join(c for c in name.rfc4514_string() if c.isalnum())[:40] or "cert"


def sni_only_ca(iot, pki, name, auto_registration=False):
    """A CA made with openssl, registered SNI_ONLY and ACTIVE: returns ((cert, key), ca id)."""
    ca = pki.ca(name, f"{name} CA")
    ca_id = iot.register_ca_certificate(caCertificate=ca[0].read_text(), certificateMode="SNI_ONLY",
                                        setAsActive=True,
                                        allowAutoRegistration=auto_registration)["certificateId"]
    return ca, ca_id


def default_ca(iot, pki, name):
    """A CA made with openssl, registered DEFAULT (with a verification certificate) and ACTIVE."""
    ca = pki.ca(name, f"{name} CA")
    code = iot.get_registration_code()["registrationCode"]
    verification = pki.leaf(f"{name}-verification", code, ca)
    ca_id = iot.register_ca_certificate(caCertificate=ca[0].read_text(),
                                        verificationCertificate=verification[0].read_text(),
                                        setAsActive=True)["certificateId"]
    return ca, ca_id


def give_policy(iot, cert_arn, doc=ALLOW_ALL):
    pol = unique("pol")
    iot.create_policy(policyName=pol, policyDocument=json.dumps(doc))
    iot.attach_policy(policyName=pol, target=cert_arn)
    return pol


@pytest.fixture(scope="module")
def two(workdir):
    """A server with two accounts: `sekisho` (A) and `tenant-b` (B)."""
    s = Server(workdir / unique("compat-tls"), accounts=["tenant-b"]).start()
    yield s
    s.stop()


# --- certificate status ---------------------------------------------------------------------

@pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls12", "tls13"])
@pytest.mark.parametrize("status", ["INACTIVE", "REVOKED", "deleted", "unregistered"])
def test_refused_certificate_gets_certificate_unknown(two, workdir, status, version):
    """Row "certificate unknown, inactive, revoked, deleted, PENDING_ACTIVATION": the TLS alert
    is certificate_unknown. Positive control: the same certificate is accepted while ACTIVE (and,
    for "unregistered", a registered one is accepted on the same connection settings)."""
    s = two
    iot = s.boto()
    host = s.endpoint()
    dev = Device(s, iot, unique("st"), ALLOW_ALL, workdir)
    assert tls_outcome(s, dev, host, version=version) == "accepted"
    if status in ("INACTIVE", "REVOKED"):
        iot.update_certificate(certificateId=dev.cert_id, newStatus=status)
        assert iot.describe_certificate(certificateId=dev.cert_id)["certificateDescription"]["status"] == status
    elif status == "deleted":
        iot.update_certificate(certificateId=dev.cert_id, newStatus="INACTIVE")
        iot.detach_thing_principal(thingName=dev.name, principal=dev.cert_arn)
        iot.detach_policy(policyName=dev.policy, target=dev.cert_arn)
        iot.delete_certificate(certificateId=dev.cert_id)
    else:
        # A certificate the registry has never seen, from a CA nobody registered.
        pki = Openssl(workdir / unique("stray"))
        dev = ec_certificate(pki.dir, "stray", pki.ca("stray-ca"))
    assert tls_outcome(s, dev, host, version=version) == UNKNOWN
    # Also without SNI (routed by certificate): the same alert.
    assert tls_outcome(s, dev, None, version=version) == UNKNOWN


def test_pending_activation_certificate_gets_certificate_unknown(two, workdir):
    """Row "... PENDING_ACTIVATION": a just-in-time registered certificate is refused with
    certificate_unknown each time it is presented, on TLS 1.2 and 1.3, until it is activated
    (positive control: then it is accepted)."""
    s = two
    iot = s.boto()
    host = s.endpoint()
    pki = Openssl(workdir / unique("pend"))
    ca, ca_id = sni_only_ca(iot, pki, "pend", auto_registration=True)
    dev = ec_certificate(pki.dir, "pend-dev", ca)
    # The first presentation registers it (and fails, as AWS's first JITR connection does).
    assert tls_outcome(s, dev, host, version=TLS12) == UNKNOWN
    desc = iot.describe_certificate(certificateId=cert_id(dev.cert))["certificateDescription"]
    assert desc["status"] == "PENDING_ACTIVATION"
    for version in (TLS12, TLS13):
        assert tls_outcome(s, dev, host, version=version) == UNKNOWN
    iot.update_certificate(certificateId=desc["certificateId"], newStatus="ACTIVE")
    give_policy(iot, desc["certificateArn"])
    assert tls_outcome(s, dev, host, version=TLS13) == "accepted"


def test_certificate_of_an_inactive_or_deleted_ca_gets_certificate_unknown(two, workdir):
    """Row "certificate registered under a CA that is INACTIVE or was deleted": the alert is
    certificate_unknown; deactivating the CA closes the live connection (MQTT 5 DISCONNECT 0x98);
    after DeleteCACertificate the device certificate is still registered but cannot connect.
    Positive controls: accepted while the CA is ACTIVE, and again after re-activation."""
    s = two
    iot = s.boto()
    host = s.endpoint()
    pki = Openssl(workdir / unique("caoff"))
    ca, ca_id = sni_only_ca(iot, pki, "caoff")
    dev = ec_certificate(pki.dir, "caoff-dev", ca)
    reg = iot.register_certificate(certificatePem=dev.cert.read_text(), setAsActive=True)
    give_policy(iot, reg["certificateArn"])
    assert tls_outcome(s, dev, host) == "accepted"
    live = Paho(s, host, dev, unique("live"), v5=True)
    assert live.connect()[0] == 0

    iot.update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE")
    assert live.disconnects.get(timeout=5).value == 0x98, "live connection closed: Administrative action"
    live.close()
    for version in (TLS12, TLS13):
        assert tls_outcome(s, dev, host, version=version) == UNKNOWN
    iot.update_ca_certificate(certificateId=ca_id, newStatus="ACTIVE")
    assert tls_outcome(s, dev, host) == "accepted"

    iot.update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE")
    iot.delete_ca_certificate(certificateId=ca_id)
    desc = iot.describe_certificate(certificateId=reg["certificateId"])["certificateDescription"]
    assert desc["status"] == "ACTIVE" and desc["caCertificateId"] == ca_id, "it stays registered"
    for version in (TLS12, TLS13):
        assert tls_outcome(s, dev, host, version=version) == UNKNOWN


# --- validity period ------------------------------------------------------------------------

def test_expired_certificate_gets_certificate_expired(two, workdir):
    """Row "certificate outside its validity period": TLS alert certificate_expired. A
    certificate valid for a few seconds is registered ACTIVE and accepted (positive control),
    then refused with certificate_expired once its notAfter has passed; a sibling certificate
    with a long validity stays accepted meanwhile."""
    s = two
    iot = s.boto()
    host = s.endpoint()
    pki = Openssl(workdir / unique("exp"))
    ca, _ = sni_only_ca(iot, pki, "exp")
    now = datetime.datetime.now(datetime.timezone.utc)
    short = ec_certificate(pki.dir, "short-lived", ca, not_after=now + datetime.timedelta(seconds=6))
    lasting = ec_certificate(pki.dir, "lasting", ca)
    for dev in (short, lasting):
        reg = iot.register_certificate(certificatePem=dev.cert.read_text(), setAsActive=True)
        give_policy(iot, reg["certificateArn"])
    assert tls_outcome(s, short, host) == "accepted"
    # Certificate times have one-second resolution: wait until notAfter is clearly past.
    time.sleep(max(0.0, (now + datetime.timedelta(seconds=8) - datetime.datetime.now(datetime.timezone.utc))
                   .total_seconds()))
    for version in (TLS12, TLS13):
        assert tls_outcome(s, short, host, version=version) == EXPIRED
        assert tls_outcome(s, lasting, host, version=version) == "accepted"
    # Still registered ACTIVE: the refusal is the validity period, not the registry.
    assert iot.describe_certificate(certificateId=cert_id(short.cert))["certificateDescription"][
        "status"] == "ACTIVE"


def test_not_yet_valid_certificate_gets_certificate_expired(workdir):
    """Row "certificate outside its validity period", the other side: a certificate whose
    notBefore is still ahead. RegisterCertificate refuses a certificate that is not yet valid,
    so it is registered while the server (and the AWS CLI) run a day ahead under libfaketime;
    back at the real time, the handshake ends with certificate_expired (RFC 8446: "expired or
    is not currently valid"). Positive control: accepted while the server runs a day ahead."""
    s = Server(workdir / unique("notyet")).start()
    future = faketime("+1d")
    try:
        iot = s.boto()
        pki = Openssl(workdir / unique("notyet-pki"))
        ca, _ = sni_only_ca(iot, pki, "notyet")
        now = datetime.datetime.now(datetime.timezone.utc)
        dev = ec_certificate(pki.dir, "tomorrow", ca, not_before=now + datetime.timedelta(hours=2))
        host = s.endpoint()
        s.stop()
        s.start(wrapper=future)
        env = s.env
        cp = subprocess.run([*future, "aws", "--profile", "sekisho", "--output", "json", "iot", "register-certificate",
                             "--certificate-pem", dev.cert.read_text(), "--set-as-active"],
                            env=env, capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        arn = json.loads(cp.stdout)["certificateArn"]
        policy = workdir / f"{unique('allow')}.json"
        policy.write_text(json.dumps(ALLOW_ALL))
        pol = unique("pol")
        for args in (("create-policy", "--policy-name", pol, "--policy-document", f"file://{policy}"),
                     ("attach-policy", "--policy-name", pol, "--target", arn)):
            cp = subprocess.run([*future, "aws", "--profile", "sekisho", "iot", *args], env=env,
                                capture_output=True, text=True, timeout=60)
            assert cp.returncode == 0, cp.stderr
        assert tls_outcome(s, dev, host) == "accepted", "valid in the server's (future) time"
        s.stop()
        s.start()
        for version in (TLS12, TLS13):
            assert tls_outcome(s, dev, host, version=version) == EXPIRED
    finally:
        s.stop()


# --- server names ---------------------------------------------------------------------------

def test_endpoint_name_forms_choose_the_account(two, workdir):
    """Row "SNI <prefix>-ats.iot.<region>.<domain> (or without -ats, or <prefix>.credentials.iot…,
    <prefix>.jobs.iot…)": each form reaches account A. The certificate is SNI_ONLY in A only, so
    only a name that routes to A is accepted; account B's names refuse it (certificate_unknown)."""
    s = two
    a = s.boto()
    pki = Openssl(workdir / unique("names"))
    ca, _ = sni_only_ca(a, pki, "names")
    dev = ec_certificate(pki.dir, "names-dev", ca)
    reg = a.register_certificate(certificatePem=dev.cert.read_text(), setAsActive=True)
    give_policy(a, reg["certificateArn"])
    for profile, expected in (("sekisho", "accepted"), ("tenant-b", UNKNOWN)):
        prefix = s.endpoint(profile=profile).split("-ats.", 1)[0]
        for name in (f"{prefix}-ats.iot.us-east-1.localhost", f"{prefix}.iot.us-east-1.localhost",
                     f"{prefix}.credentials.iot.us-east-1.localhost", f"{prefix}.jobs.iot.us-east-1.localhost"):
            assert tls_outcome(s, dev, name) == expected, (profile, name)
    # The credential provider's name, as DescribeEndpoint gives it, is one of these forms.
    cred = a.describe_endpoint(endpointType="iot:CredentialProvider")["endpointAddress"]
    assert tls_outcome(s, dev, cred) == "accepted"


def test_without_sni_the_default_registration_decides(two, workdir):
    """Row "no SNI, or a name in default_server_names (localhost)": the account of the
    certificate's DEFAULT-mode registration; an SNI_ONLY certificate is refused with
    certificate_unknown. Controls: the DEFAULT-mode certificate connects without SNI and with
    `localhost`; the SNI_ONLY one connects with its account's name."""
    s = two
    a, b = s.boto(), s.boto(profile="tenant-b")
    default_dev = Device(s, a, unique("dflt"), ALLOW_ALL, workdir)   # CreateKeysAndCertificate: DEFAULT
    assert a.describe_certificate(certificateId=default_dev.cert_id)["certificateDescription"][
        "certificateMode"] == "DEFAULT"
    for sni in (None, "localhost"):
        assert tls_outcome(s, default_dev, sni) == "accepted", sni

    pki = Openssl(workdir / unique("snionly"))
    ca = pki.ca("snionly-ca")
    dev = ec_certificate(pki.dir, "snionly-dev", ca)
    reg = b.register_certificate_without_ca(certificatePem=dev.cert.read_text(), status="ACTIVE")
    assert b.describe_certificate(certificateId=reg["certificateId"])["certificateDescription"][
        "certificateMode"] == "SNI_ONLY"
    give_policy(b, reg["certificateArn"])
    assert tls_outcome(s, dev, s.endpoint(profile="tenant-b")) == "accepted"
    for version in (TLS12, TLS13):
        for sni in (None, "localhost"):
            assert tls_outcome(s, dev, sni, version=version) == UNKNOWN, (sni, version)


def test_unknown_server_name_is_closed_before_the_handshake_completes(two, workdir):
    """Row "any other SNI": TCP closed before the handshake completes; the client gets no TLS
    alert and no server certificate. Positive control: the account's own name completes."""
    s = two
    dev = Device(s, s.boto(), unique("sni"), ALLOW_ALL, workdir)
    assert tls_outcome(s, dev, s.endpoint()) == "accepted"
    for name in ("nosuchprefix-ats.iot.us-east-1.localhost", "example.com", "iot.us-east-1.localhost"):
        ctx = client_context(s, dev, verify_name=False)
        raw = socket.create_connection(("127.0.0.1", s.mqtt_port), timeout=10)
        try:
            with pytest.raises((ssl.SSLError, ConnectionError)) as e:
                ctx.wrap_socket(raw, server_hostname=name)
            assert alert_name(e.value) is None, f"{name}: expected a bare close, got {e.value!r}"
            assert isinstance(e.value, (ssl.SSLEOFError, ConnectionError)), repr(e.value)
        finally:
            raw.close()


# --- what the listeners offer ---------------------------------------------------------------

def test_x509_v1_device_certificate_is_accepted(two, workdir):
    """Row "X.509 v1 device certificates": `openssl x509 -req` without extensions (the
    developer guide's recipe) makes a version 1 certificate; registered under its CA it connects
    over TLS 1.2 and TLS 1.3 (the handshake signature is checked with its key directly)."""
    s = two
    iot = s.boto()
    pki = Openssl(workdir / unique("v1"))
    ca, _ = sni_only_ca(iot, pki, "v1")
    cert, key = pki.leaf("v1-dev", "v1-dev", ca)
    assert x509.load_pem_x509_certificate(cert.read_bytes()).version == x509.Version.v1, \
        "this openssl made a v3 certificate: the test needs a v1 one"
    reg = iot.register_certificate(certificatePem=cert.read_text(), setAsActive=True)
    give_policy(iot, reg["certificateArn"])
    dev = FileDevice(cert, key)
    for version in (TLS12, TLS13):
        assert tls_outcome(s, dev, s.endpoint(), version=version) == "accepted", version
    p = Paho(s, s.endpoint(), dev, "v1-dev", v5=True)
    assert p.connect()[0] == 0
    p.close()


def test_only_ecdhe_aead_suites_and_no_session_resumption(two, workdir):
    """Row "TLS versions": ECDHE with AEAD only (a CBC suite or static RSA key exchange ends in
    a handshake_failure alert), and no session resumption: a TLS 1.2 session offered again is
    not resumed, and TLS 1.3 gets no session ticket. Positive control: ECDHE AES-GCM and
    ChaCha20 suites connect."""
    s = two
    dev = Device(s, s.boto(), unique("suites"), ALLOW_ALL, workdir)
    host = s.endpoint()
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        ctx = client_context(s, dev, TLS12)
        ctx.set_ciphers(suite)
        assert tls_outcome(s, dev, host, ctx=ctx) == "accepted", suite
    for suite in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-GCM-SHA256", "AES256-SHA"):
        ctx = client_context(s, dev, TLS12)
        ctx.set_ciphers(suite)
        assert tls_outcome(s, dev, host, ctx=ctx) == "alert handshake_failure", suite

    def session_after_connack(ctx, session=None):
        raw = socket.create_connection(("127.0.0.1", s.mqtt_port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=host, session=session) as t:
            t.sendall(connect_v311(unique("res")))
            assert t.recv(4)[:1] == b"\x20"
            return t.session, t.session_reused

    ctx12 = client_context(s, dev, TLS12)
    first, reused = session_after_connack(ctx12)
    assert not reused and first is not None
    _, reused = session_after_connack(ctx12, first)
    assert reused is False, "a TLS 1.2 session was resumed"
    ctx13 = client_context(s, dev, TLS13)
    first, _ = session_after_connack(ctx13)
    assert first is None or not first.has_ticket, "the server issued a TLS 1.3 session ticket"


def test_max_connections_counts_every_bound_address(workdir):
    """Row "connection caps": the top-level max_connections caps the default MQTT listener and
    the default device HTTPS listener each, counting the connections of all bound addresses
    (here 127.0.0.1 and ::1) together; beyond it a new TCP connection is closed at accept.
    Positive controls: N = 1 is accepted; the HTTPS listener still takes its own one; the slot
    freed is reused."""
    s = Server(workdir / unique("cap"), config='bind = ["127.0.0.1", "::1"]\nmax_connections = 1\n').start()
    try:
        dev = Device(s, s.boto(), unique("cap"), ALLOW_ALL, workdir)
        host = s.endpoint()
        held = Paho(s, host, dev, unique("held"), v5=True)   # over 127.0.0.1
        assert held.connect()[0] == 0
        assert tls_outcome(s, dev, host, address="::1") == "closed", "N + 1 over the other address"
        assert tls_outcome(s, dev, host, address="127.0.0.1") == "closed", "N + 1 over the same address"
        # The device HTTPS listener has its own cap of one.
        ctx = client_context(s, dev)
        raw = socket.create_connection(("::1", s.https_port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=host) as t:
            t.sendall(f"GET /nothing HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert t.recv(12).startswith(b"HTTP/1.1 "), "the HTTPS listener counts its own connections"
        held.close()
        # Each probe holds the slot until the server sees it close: probe until one is
        # accepted (a second probe right after an accepted one may find its slot still held).
        deadline, outcome = time.time() + 10, None
        while time.time() < deadline:
            outcome = tls_outcome(s, dev, host, address="::1")
            if outcome == "accepted":
                break
            time.sleep(0.1)
        assert outcome == "accepted", "the freed slot is reused"
        assert "connection limit" in s.log_text().lower() or "max_connections" in s.log_text().lower(), \
            "refusals are logged"
    finally:
        s.stop()
