"""Attacks on the device side: keep-alive HTTPS connections that outlive their credentials,
slow unauthenticated clients, WebSocket messages buffered before CONNECT, wills published for a
revoked certificate, and retained wills on reserved topics.

Every refusal is asserted with its specific reason next to a positive control in the same test."""

import base64
import datetime
import hashlib
import hmac
import http.client
import json
import os
import queue
import socket
import ssl
import struct
import threading
import time
import urllib.parse

import pytest

from conftest import ALLOW_ALL, Device, FileDevice, Openssl, Paho, Server, unique
from helpers import drain, s16, varint

TRUST_CREDENTIALS = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "credentials.iot.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


@pytest.fixture(scope="module")
def sec(workdir):
    s = Server(workdir / unique("secdev")).start()
    yield s
    s.stop()


# ---------------------------------------------------------------------------------------------
# helpers


def cert_id(path):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def own_ca_device(s, iot, pki, name, policy_doc):
    """A CA made with openssl, registered DEFAULT and ACTIVE, and a device certificate it signed,
    registered ACTIVE with `policy_doc` attached. Returns (ca id, FileDevice, certificate id)."""
    ca = pki.ca(f"{name}-ca", f"{name} Root CA")
    code = iot.get_registration_code()["registrationCode"]
    verification = pki.leaf(f"{name}-verification", code, ca)
    ca_id = iot.register_ca_certificate(caCertificate=ca[0].read_text(),
                                        verificationCertificate=verification[0].read_text(),
                                        setAsActive=True)["certificateId"]
    dev = FileDevice(*pki.leaf(f"{name}-dev", name, ca))
    reg = iot.register_certificate(certificatePem=dev.cert.read_text(), caCertificatePem=ca[0].read_text(),
                                   setAsActive=True)
    assert reg["certificateId"] == cert_id(dev.cert)
    pol = unique("pol")
    iot.create_policy(policyName=pol, policyDocument=json.dumps(policy_doc))
    iot.attach_policy(policyName=pol, target=reg["certificateArn"])
    return ca_id, dev, reg["certificateId"]


class KeepAlive:
    """One HTTP/1.1 connection (http.client), reused for every request; each request checks that
    it went over the very same TLS socket (same object, same local port)."""

    def __init__(self, server, host, dev=None):
        ctx = ssl.create_default_context(cafile=server.ca)
        if dev is not None:
            ctx.load_cert_chain(str(dev.cert), str(dev.key))
        self.conn = http.client.HTTPSConnection(host, server.https_port, context=ctx, timeout=10)
        self.sock = None
        self.local_port = None

    def request(self, method, path, body=None, headers=None):
        self.conn.request(method, path, body=body, headers=headers or {})
        if self.sock is None:
            self.sock = self.conn.sock
            self.local_port = self.sock.getsockname()[1]
        else:
            assert self.conn.sock is self.sock and self.sock.getsockname()[1] == self.local_port, \
                "http.client opened a new connection: the test must reuse one"
        r = self.conn.getresponse()
        data = r.read()
        assert not r.will_close or r.status != 200, "the server asked to close the keep-alive connection"
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def close(self):
        self.conn.close()


def refused_on_same_connection(ka, method, path, body=None):
    """A request on the kept-alive connection; a server-side close instead of an answer fails the
    test with that reason (the expected refusal is an HTTP 403)."""
    try:
        return ka.request(method, path, body=body)
    except (http.client.RemoteDisconnected, ConnectionError, ssl.SSLError) as e:
        pytest.fail(f"the server closed the kept-alive connection ({e!r}) instead of answering 403")


def new_tls_request_error(server, host, dev, path):
    """A request on a NEW connection with `dev`'s certificate: returns the error text (the TLS
    alert), or the HTTP status if the handshake was accepted."""
    ctx = ssl.create_default_context(cafile=server.ca)
    ctx.load_cert_chain(str(dev.cert), str(dev.key))
    c = http.client.HTTPSConnection(host, server.https_port, context=ctx, timeout=10)
    try:
        c.request("POST", path, body=b"x")
        return c.getresponse().status
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected) as e:
        return str(e)
    finally:
        c.close()


def refused_handshake(err):
    """The TLS handshake of a new connection was refused: the certificate_unknown alert, or (when
    the server closes before the client reads the alert) EOF or reset; not an HTTP answer."""
    if not isinstance(err, str):
        return False
    e = err.lower().replace("_", " ")
    return "certificate unknown" in e or "eof occurred" in e or "reset" in e or "remote end closed" in e


def tls_socket(server, port, host, dev=None):
    ctx = ssl.create_default_context(cafile=server.ca)
    if dev is not None:
        ctx.load_cert_chain(str(dev.cert), str(dev.key))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname=host)


def trickle_until_closed(sock, head, chunks, limit=16.0, controls=()):
    """Sends `head`, then one chunk a second until the server closes the connection (EOF, reset,
    or a response). `controls`: (second, callable) run once in the same window. Returns
    (seconds until closed or None, response bytes, bytes trickled)."""
    start = time.monotonic()
    sock.sendall(head)
    sent = 0
    pending = list(controls)
    response = b""
    i = 0
    while time.monotonic() - start < limit:
        now = time.monotonic() - start
        for c in [c for c in pending if c[0] <= now]:
            pending.remove(c)
            c[1]()
        sock.settimeout(1.0)
        try:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - start, response, sent
            response += data
            if b"\r\n\r\n" in response:
                # An answer (408 expected): read what follows until close, briefly.
                sock.settimeout(2.0)
                try:
                    while True:
                        more = sock.recv(4096)
                        if not more:
                            break
                        response += more
                except (socket.timeout, TimeoutError, OSError):
                    pass
                return time.monotonic() - start, response, sent
            continue
        except (socket.timeout, TimeoutError):
            pass
        except (ConnectionError, ssl.SSLError, OSError):
            return time.monotonic() - start, response, sent
        try:
            chunk = chunks[i % len(chunks)]
            sock.sendall(chunk)
            sent += len(chunk)
            i += 1
        except (ConnectionError, ssl.SSLError, OSError):
            return time.monotonic() - start, response, sent
    for c in pending:
        c[1]()
    return None, response, sent


def status_of(response):
    line = response.split(b"\r\n", 1)[0]
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


# raw MQTT over TLS with a client certificate

def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def mqtt_connect(client_id, v5, will=None, keepalive=60):
    """CONNECT (clean); `will`: (topic, payload, qos, retain)."""
    flags = 0x02
    tail = b""
    if will:
        topic, payload, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        tail = (b"\x00" if v5 else b"") + s16(topic.encode()) + s16(payload)
    body = s16(b"MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack(">H", keepalive)
    if v5:
        body += b"\x00"
    body += s16(client_id.encode()) + tail
    return packet(0x10, body)


def read_packet(sock, timeout=5.0):
    """One MQTT packet: (first byte, body), or None on EOF."""
    sock.settimeout(timeout)

    def exact(n):
        out = b""
        while len(out) < n:
            try:
                chunk = sock.recv(n - len(out))
            except (ConnectionError, ssl.SSLError, OSError):
                return None
            if not chunk:
                return None
            out += chunk
        return out

    first = exact(1)
    if first is None:
        return None
    n, mult = 0, 1
    while True:
        b = exact(1)
        if b is None:
            return None
        n += (b[0] & 0x7F) * mult
        mult *= 128
        if not b[0] & 0x80:
            break
    body = exact(n) if n else b""
    if body is None:
        return None
    return first[0], body


class RawMqtt:
    def __init__(self, server, dev):
        self.s = tls_socket(server, server.mqtt_port, server.endpoint(), dev)

    def connack(self, client_id, v5, will=None):
        """Sends CONNECT; returns the CONNACK's return code (3.1.1) or reason code (5)."""
        self.s.sendall(mqtt_connect(client_id, v5, will))
        p = read_packet(self.s)
        assert p is not None, "no CONNACK: the server closed the connection"
        first, body = p
        assert first == 0x20, f"expected CONNACK, got {first:#x}"
        return body[1]

    def disconnect(self):
        try:
            self.s.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.close()

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass



# ---------------------------------------------------------------------------------------------
# 1. A device HTTPS keep-alive connection must not outlive its credentials.


def https_policy(account, topic_prefix):
    arn = f"arn:aws:iot:us-east-1:{account}"
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/{topic_prefix}/*"}]}


def test_https_keepalive_refused_once_its_ca_is_deactivated(sec, workdir):
    """A device publishes over one kept-alive HTTPS connection; its CA is then deactivated.
    Expected: the next POST on that same connection is 403 {"message": "Forbidden"} (not a
    server-side close). Positive controls: the POST before deactivation is 200 and delivered; a
    NEW connection after deactivation is refused in the TLS handshake (certificate_unknown)."""
    s = sec
    iot = s.boto()
    host = s.endpoint()
    prefix = unique("kaca")
    _, dev, _ = own_ca_device(s, iot, Openssl(workdir / prefix), prefix, https_policy(s.account_id(), prefix))
    mon = Paho(s, host, Device(s, iot, unique("kamon"), ALLOW_ALL, workdir), unique("kamon"))
    assert mon.connect()[0] == 0
    mon.subscribe(f"{prefix}/#", qos=1)

    ka = KeepAlive(s, host, dev)
    status, _, body = ka.request("POST", f"/topics/{prefix}/t?qos=1", body=b"before")
    assert status == 200 and json.loads(body)["message"] == "OK", body
    m = mon.messages.get(timeout=5)
    assert (m.topic, m.payload) == (f"{prefix}/t", b"before")

    ca_id = iot.describe_certificate(certificateId=cert_id(dev.cert))["certificateDescription"]["caCertificateId"]
    iot.update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE")
    # Control: the deactivation is in force for new connections.
    err = new_tls_request_error(s, host, dev, f"/topics/{prefix}/t")
    assert refused_handshake(err), err

    status, _, body = refused_on_same_connection(ka, "POST", f"/topics/{prefix}/t?qos=1", body=b"after")
    assert status == 403, (f"POST on the kept-alive connection after its CA was deactivated: got {status} "
                           f"{body!r}, expected 403 Forbidden")
    assert json.loads(body)["message"] == "Forbidden", body
    ka.close()
    mon.close()


@pytest.mark.parametrize("new_status", ["INACTIVE", "REVOKED"])
def test_https_keepalive_refused_once_its_certificate_is_deactivated(sec, workdir, new_status):
    """The device certificate itself leaves ACTIVE: the next POST on the same kept-alive
    connection is 403 {"message": "Forbidden"}. Positive control: 200 before; a new connection
    is refused in the handshake after."""
    s = sec
    iot = s.boto()
    host = s.endpoint()
    prefix = unique("kacert")
    _, dev, cid = own_ca_device(s, iot, Openssl(workdir / prefix), prefix, https_policy(s.account_id(), prefix))
    ka = KeepAlive(s, host, dev)
    status, _, body = ka.request("POST", f"/topics/{prefix}/t?qos=1", body=b"before")
    assert status == 200 and json.loads(body)["message"] == "OK", body

    iot.update_certificate(certificateId=cid, newStatus=new_status)
    err = new_tls_request_error(s, host, dev, f"/topics/{prefix}/t")
    assert refused_handshake(err), err

    status, _, body = refused_on_same_connection(ka, "POST", f"/topics/{prefix}/t?qos=1", body=b"after")
    assert status == 403, f"POST after the certificate became {new_status}: got {status} {body!r}"
    assert json.loads(body)["message"] == "Forbidden", body
    ka.close()


def credential_provider_setup(s, iot, workdir, name):
    iam = s.boto("iam")
    role = iam.create_role(RoleName=unique("role"), AssumeRolePolicyDocument=json.dumps(TRUST_CREDENTIALS))["Role"]
    alias = unique("alias")
    alias_arn = iot.create_role_alias(roleAlias=alias, roleArn=role["Arn"])["roleAliasArn"]
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:AssumeRoleWithCertificate", "Resource": alias_arn}]}
    ca_id, dev, cid = own_ca_device(s, iot, Openssl(workdir / name), name, policy)
    host = iot.describe_endpoint(endpointType="iot:CredentialProvider")["endpointAddress"]
    return ca_id, dev, cid, alias, host


@pytest.mark.parametrize("what", ["certificate", "ca"])
def test_credential_provider_keepalive_refused_once_deactivated(sec, workdir, what):
    """GET /role-aliases/<alias>/credentials twice on one kept-alive connection: 200 with
    credentials, then (certificate, or its CA, set INACTIVE) 403 with x-amzn-errortype
    AccessDeniedException. Positive control: a new connection is refused in the handshake."""
    s = sec
    iot = s.boto()
    name = unique(f"cp{what}")
    ca_id, dev, cid, alias, host = credential_provider_setup(s, iot, workdir, name)
    ka = KeepAlive(s, host, dev)
    status, headers, body = ka.request("GET", f"/role-aliases/{alias}/credentials")
    assert status == 200, body
    assert json.loads(body)["credentials"]["accessKeyId"].startswith("ASIA")

    if what == "certificate":
        iot.update_certificate(certificateId=cid, newStatus="INACTIVE")
    else:
        iot.update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE")
    err = new_tls_request_error(s, host, dev, f"/role-aliases/{alias}/credentials")
    assert refused_handshake(err), err

    status, headers, body = refused_on_same_connection(ka, "GET", f"/role-aliases/{alias}/credentials")
    assert status == 403, (f"credentials on the kept-alive connection after the {what} was deactivated: got "
                           f"{status} {body[:200]!r}, expected 403 AccessDeniedException")
    assert headers.get("x-amzn-errortype") == "AccessDeniedException", headers
    assert "credentials" not in json.loads(body)
    ka.close()


# ---------------------------------------------------------------------------------------------
# 2. Slow unauthenticated clients are cut within 15 s.

SLOW_LIMIT = 15.0


def report_slow(name, took, response, sent):
    print(f"\n[{name}] closed after {'%.1f s' % took if took is not None else 'more than 16 s (still open)'}; "
          f"trickled {sent} bytes; response {response[:60]!r}")


def assert_cut(name, took, response):
    assert took is not None and took <= SLOW_LIMIT, (
        f"{name}: the server kept the unauthenticated slow connection open "
        f"{'for %.1f s' % took if took is not None else 'for more than 16 s'} (limit {SLOW_LIMIT:.0f} s)")
    if response:
        assert status_of(response) == 408, f"{name}: answered {response[:80]!r}, expected 408 or a close"


def signed_head(server, method, host, port, path, body, service):
    """Request headers signed with the profile's root key for `body` (which is then sent
    slowly): the signature is only checkable once the whole body has arrived."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    credentials = server.boto()._request_signer._credentials
    req = AWSRequest(method=method, url=f"https://{host}:{port}{path}", data=body,
                     headers={"Content-Type": "application/json"})
    SigV4Auth(credentials, service, "us-east-1").add_auth(req)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in req.headers.items() if k.lower() not in ("host", "content-length")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_control_plane_slow_body_is_cut(sec):
    """Control plane. An unsigned request is refused before any body byte is read (403
    MissingAuthenticationTokenException at once). A request whose headers are signed with a
    real key, whose body then trickles at 16 bytes a second, is cut with 408 within 15 s.
    Positive control: signed boto3 calls on other connections succeed during the same period."""
    s = sec
    iot = s.boto()
    head = (f"POST /things/slow HTTP/1.1\r\nHost: localhost:{s.api_port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    sock = tls_socket(s, s.api_port, "localhost")
    took, response, _ = trickle_until_closed(sock, head, [b"{" + b"a" * 15])
    sock.close()
    assert took is not None and took < 3, f"unsigned request held {took} s"
    assert status_of(response) == 403, response[:200]
    assert b"MissingAuthenticationTokenException" in response, response[:300]

    oks = []
    body = b"{" + b" " * 99998 + b"}"
    sock = tls_socket(s, s.api_port, "localhost")
    head = signed_head(s, "POST", "localhost", s.api_port, "/things/slow", body, "iot")
    took, response, sent = trickle_until_closed(
        sock, head, [b" " * 16], controls=[(2, lambda: oks.append(iot.list_things()["things"] is not None)),
                                           (9, lambda: oks.append(iot.list_things()["things"] is not None))])
    sock.close()
    report_slow("control plane slow signed body", took, response, sent)
    assert oks == [True, True], "signed requests on other connections must work meanwhile"
    assert_cut("control plane slow signed body", took, response)
    assert status_of(response) == 408, response[:200]


def test_device_https_slow_body_without_certificate_is_cut(sec, workdir):
    """Device HTTPS without a client certificate: an unsigned POST /topics/x is refused at once
    (401, before the body); one signed with a real key whose body trickles at 16 bytes a second
    is cut with 408 within 15 s. Positive control: signed iot-data publishes on other
    connections are delivered during the same period."""
    s = sec
    iot = s.boto()
    data = s.boto("iot-data")
    host = s.endpoint()
    mon = Paho(s, host, Device(s, iot, unique("slowmon"), ALLOW_ALL, workdir), unique("slowmon"))
    assert mon.connect()[0] == 0
    topic = f"slow/{unique('t')}"
    mon.subscribe(topic, qos=1)
    oks = []

    def control(i):
        data.publish(topic=topic, qos=1, payload=f"control-{i}".encode())
        m = mon.messages.get(timeout=5)
        oks.append(m.payload == f"control-{i}".encode())

    sock = tls_socket(s, s.https_port, host)
    assert sock.getpeercert() and sock.version(), "TLS without a client certificate is accepted"
    head = (f"POST /topics/x HTTP/1.1\r\nHost: {host}:{s.https_port}\r\nContent-Length: 100000\r\n\r\n").encode()
    took, response, _ = trickle_until_closed(sock, head, [b"b" * 16])
    sock.close()
    assert took is not None and took < 3, f"unsigned request held {took} s"
    assert status_of(response) == 401, response[:200]

    body = b"b" * 100000
    sock = tls_socket(s, s.https_port, host)
    head = signed_head(s, "POST", host, s.https_port, "/topics/x", body, "iotdata")
    took, response, sent = trickle_until_closed(sock, head, [b"b" * 16],
                                                controls=[(2, lambda: control(1)), (9, lambda: control(2))])
    sock.close()
    mon.close()
    report_slow("device HTTPS slow signed body", took, response, sent)
    assert oks == [True, True], "signed iot-data publishes must work meanwhile"
    assert_cut("device HTTPS slow signed body", took, response)
    assert status_of(response) == 408, response[:200]


@pytest.mark.parametrize("port", ["api", "device"])
def test_slowloris_headers_are_cut(sec, port):
    """Request headers trickled one byte a second, never finished: closed (or 408) within 15 s.
    Positive control: a complete request on another connection is answered meanwhile."""
    s = sec
    if port == "api":
        host, p = "localhost", s.api_port
        request_line = b"GET /health HTTP/1.1\r\n"
    else:
        host, p = s.endpoint(), s.https_port
        request_line = b"POST /topics/x HTTP/1.1\r\n"
    oks = []

    def control():
        c = http.client.HTTPSConnection(host, p, context=ssl.create_default_context(cafile=s.ca), timeout=5)
        if port == "api":
            c.request("GET", "/health")
        else:
            c.request("POST", "/topics/x", body=b"x")  # unsigned: 401, answered at once
        r = c.getresponse()
        r.read()
        c.close()
        oks.append(r.status == (200 if port == "api" else 401))

    sock = tls_socket(s, p, host)
    head = request_line + f"Host: {host}:{p}\r\nX-Slow: ".encode()
    took, response, sent = trickle_until_closed(sock, head, [b"a"], controls=[(2, control), (9, control)])
    sock.close()
    report_slow(f"slowloris on the {port} port", took, response, sent)
    assert oks == [True, True], "complete requests on other connections must be answered meanwhile"
    assert_cut(f"slowloris on the {port} port", took, response)


# ---------------------------------------------------------------------------------------------
# 3. WebSocket messages are not buffered without bound before CONNECT.


def presigned_mqtt_path(host, port, access_key, secret_key, region="us-east-1"):
    """/mqtt with a SigV4 presigned query (service iotdevicegateway, signed header host), as
    the AWS IoT Device SDKs make it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    scope = f"{day}/{region}/iotdevicegateway/aws4_request"
    params = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Credential": f"{access_key}/{scope}",
              "X-Amz-Date": amz_date, "X-Amz-Expires": "300", "X-Amz-SignedHeaders": "host"}
    q = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                 for k, v in sorted(params.items()))
    host_header = f"{host}:{port}"
    canonical = "\n".join(["GET", "/mqtt", q, f"host:{host_header}\n", "host", hashlib.sha256(b"").hexdigest()])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])

    def h(k, m):
        return hmac.new(k, m.encode(), hashlib.sha256).digest()

    k = h(h(h(h(("AWS4" + secret_key).encode(), day), region), "iotdevicegateway"), "aws4_request")
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"/mqtt?{q}&X-Amz-Signature={sig}", host_header


def ws_upgrade(s, host, creds):
    """A signed WebSocket upgrade on the device HTTPS port (no client certificate); asserts 101."""
    path, host_header = presigned_mqtt_path(host, s.https_port, creds.access_key, creds.secret_key)
    sock = tls_socket(s, s.https_port, host)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
                 .encode())
    resp = b""
    sock.settimeout(5)
    while b"\r\n\r\n" not in resp:
        chunk = sock.recv(4096)
        assert chunk, f"no upgrade response: {resp!r}"
        resp += chunk
    assert resp.startswith(b"HTTP/1.1 101"), resp
    return sock


def ws_frame_header(opcode, fin, length):
    """A client frame header (masked, all-zero mask key: the payload goes as is)."""
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | 127]) + struct.pack(">Q", length) + b"\x00\x00\x00\x00"


def ws_outcome(sock, timeout):
    """After the attack: 'close <code>' (a WebSocket close frame), 'eof', or 'open'."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except (socket.timeout, TimeoutError):
        if not buf:
            return "open"
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    i = buf.find(b"\x88")
    if i >= 0 and len(buf) >= i + 4 and (buf[i + 1] & 0x7F) >= 2:
        return f"close {struct.unpack('>H', buf[i + 2:i + 4])[0]}"
    return "eof"


class RssSampler:
    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except OSError:
                return
            time.sleep(0.01)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.t.join()


def stream(sock, total, chunk, make):
    """Sends `total` bytes in pieces made by make(i) until done or the server stops it; returns
    the number of bytes the socket took."""
    sent = 0
    try:
        while sent < total:
            piece = make(sent)
            sock.sendall(piece)
            sent += len(piece)
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    return sent


def test_websocket_message_before_connect_is_not_buffered(workdir):
    """After a signed 101, 30 MiB sent as WebSocket data before any MQTT CONNECT must make the
    server close the connection (close 1009 or TCP close) without buffering it: server RSS grows
    by less than 8 MiB. Phase 1 sends one frame whose header declares 30 MiB; phase 2 sends the
    30 MiB as one binary message fragmented into 64 KiB frames that never finishes (no FIN), so
    neither a frame cap alone nor a message cap alone is enough. Positive control: the AWS IoT
    Device SDK's MQTT over WSS publishes and receives, before and after."""
    from awscrt import auth
    from awscrt import mqtt as crt_mqtt
    from awsiot import mqtt_connection_builder

    s = Server(workdir / unique("secws")).start()
    try:
        host = s.endpoint()
        creds = s.boto()._request_signer._credentials

        def control(tag):
            provider = auth.AwsCredentialsProvider.new_static(creds.access_key, creds.secret_key)
            conn = mqtt_connection_builder.websockets_with_default_aws_signing(
                endpoint=host, port=s.https_port, region="us-east-1", credentials_provider=provider,
                ca_filepath=s.ca, client_id=unique("wsctl"), clean_session=True, keep_alive_secs=30)
            conn.connect().result(10)
            got = queue.Queue()
            conn.subscribe(f"wsctl/{tag}", crt_mqtt.QoS.AT_LEAST_ONCE,
                           callback=lambda topic, payload, **kw: got.put((topic, payload)))[0].result(10)
            conn.publish(f"wsctl/{tag}", tag.encode(), crt_mqtt.QoS.AT_LEAST_ONCE)[0].result(10)
            assert got.get(timeout=5) == (f"wsctl/{tag}", tag.encode())
            conn.disconnect().result(10)

        control("before")
        time.sleep(0.5)
        mib = 1 << 20
        total = 30 * mib
        results = {}

        # Phase 1: one frame declaring 30 MiB.
        base = rss_kib(s.proc.pid)
        sock = ws_upgrade(s, host, creds)
        with RssSampler(s.proc.pid) as rs:
            header = ws_frame_header(0x2, True, total)
            filler = b"\x00" * mib
            sent = stream(sock, total + len(header), mib, lambda n: header if n == 0 else filler)
            outcome = ws_outcome(sock, 3.0)
        sock.close()
        results["one 30 MiB frame"] = (sent, outcome, rs.peak - base)

        # Phase 2: 30 MiB of 64 KiB fragments of one unfinished binary message.
        time.sleep(0.5)
        base = rss_kib(s.proc.pid)
        sock = ws_upgrade(s, host, creds)
        frag = 64 * 1024
        frame0 = ws_frame_header(0x2, False, frag) + b"\x00" * frag
        frame_n = ws_frame_header(0x0, False, frag) + b"\x00" * frag
        t0 = time.monotonic()
        with RssSampler(s.proc.pid) as rs:
            sent = stream(sock, total, frag, lambda n: frame0 if n == 0 else frame_n)
            took = time.monotonic() - t0
            outcome = ws_outcome(sock, 3.0)
        sock.close()
        results["30 MiB in 64 KiB fragments"] = (sent, outcome, rs.peak - base)

        for name, (sent, outcome, grew) in results.items():
            print(f"\n[{name}] sent {sent / mib:.1f} MiB, then {outcome}; server RSS grew {grew / 1024:.1f} MiB")
        print(f"(phase 2 streaming took {took:.2f} s)")
        assert s.alive()
        control("after")
        for name, (sent, outcome, grew) in results.items():
            assert grew < 8 * 1024, (f"{name}: server RSS grew by {grew / 1024:.1f} MiB (limit 8 MiB) while a "
                                     f"WebSocket peer that never sent CONNECT streamed {sent / mib:.1f} MiB")
            assert outcome in ("eof", "close 1009"), f"{name}: connection still {outcome} after the attack"
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------
# 4. A revoked certificate's will is not published.


def test_will_not_published_when_certificate_is_revoked(sec, workdir):
    """D (paho, MQTT 3.1.1, client certificate) has a retained will on wills/<D>; its certificate
    is revoked and the server cuts it: the will must be neither delivered nor retained. Positive
    control in the same window: E's connection dropped without DISCONNECT delivers (and retains)
    E's will."""
    s = sec
    iot = s.boto()
    host = s.endpoint()
    arn = f"arn:aws:iot:us-east-1:{s.account_id()}"
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/${{iot:Connection.Thing.ThingName}}"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:RetainPublish"],
         "Resource": f"{arn}:topic/wills/${{iot:Connection.Thing.ThingName}}"}]}
    d = Device(s, iot, unique("willd"), doc, workdir)
    e = Device(s, iot, unique("wille"), doc, workdir)
    watcher_dev = Device(s, iot, unique("willw"), ALLOW_ALL, workdir)
    watcher = Paho(s, host, watcher_dev, unique("willw"), v5=True)
    assert watcher.connect()[0] == 0
    assert watcher.subscribe("wills/#", qos=1)[0].value == 1

    pd = Paho(s, host, d, d.name, will=(f"wills/{d.name}", b"D died", 1, True))
    assert pd.connect()[0] == 0
    re_ = RawMqtt(s, e)
    assert re_.connack(e.name, False, will=(f"wills/{e.name}", b"E died", 1, True)) == 0

    iot.update_certificate(certificateId=d.cert_id, newStatus="REVOKED")
    pd.disconnects.get(timeout=5)  # the server cut D (it does so today)
    pd.close()
    re_.close()  # E: dropped without DISCONNECT

    got = []
    deadline = time.time() + 5
    while time.time() < deadline and not any(m.topic == f"wills/{e.name}" for m in got):
        try:
            got.append(watcher.messages.get(timeout=0.2))
        except queue.Empty:
            pass
    got += drain(watcher.messages, 1.0)
    topics = [m.topic for m in got]
    assert f"wills/{e.name}" in topics, f"control: E's will was not delivered ({topics})"
    assert f"wills/{d.name}" not in topics, "the will of a REVOKED certificate was published"

    # Retained: a new exact subscriber gets E's will, not D's.
    late = Paho(s, host, watcher_dev, unique("willlate"), v5=True)
    assert late.connect()[0] == 0
    late.subscribe(f"wills/{d.name}", qos=1)
    late.subscribe(f"wills/{e.name}", qos=1)
    retained = {m.topic: (m.payload, m.retain) for m in drain(late.messages, 1.5)}
    assert retained.get(f"wills/{e.name}") == (b"E died", True), f"control: E's will not retained ({retained})"
    assert f"wills/{d.name}" not in retained, "the will of a REVOKED certificate was retained"
    late.close()
    watcher.close()


# ---------------------------------------------------------------------------------------------
# 5. A retained will on a reserved topic is refused at CONNECT.


@pytest.mark.parametrize("v5", [False, True], ids=["mqtt311", "mqtt5"])
def test_retained_will_on_reserved_topic_is_refused(sec, workdir, v5):
    """A PUBLISH with RETAIN on $aws/... is refused (MQTT 5: PUBACK 0x87; 3.1.1: disconnected);
    so must a will with RETAIN on $aws/things/<other>/shadow/update be, at CONNECT, as the server
    refuses a will it may not publish: CONNACK 0x87 (MQTT 5) / return code 5 (3.1.1). Positive
    controls: the same will without RETAIN, and a retained will on a normal topic, are accepted."""
    s = sec
    iot = s.boto()
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iot:Connect", "iot:Publish", "iot:RetainPublish", "iot:Subscribe",
                                       "iot:Receive"], "Resource": "*"}]}
    dev = Device(s, iot, unique("rsvwill"), doc, workdir)
    other = unique("other")
    reserved = f"$aws/things/{other}/shadow/update"
    not_authorized = 0x87 if v5 else 5

    # The PUBLISH rule this mirrors.
    r = RawMqtt(s, dev)
    assert r.connack(unique("pub"), v5) == 0
    r.s.sendall(packet(0x33, s16(reserved.encode()) + b"\x00\x01" + (b"\x00" if v5 else b"") + b"{}"))
    p = read_packet(r.s)
    if v5:
        assert p is not None and p[0] == 0x40 and p[1][:2] == b"\x00\x01" and p[1][2] == 0x87, p
        r.s.sendall(packet(0x32, s16(reserved.encode()) + b"\x00\x02" + b"\x00" + b"{}"))
        p = read_packet(r.s)
        assert p is not None and p[0] == 0x40 and (len(p[1]) == 2 or p[1][2] == 0), p
    else:
        assert p is None, f"MQTT 3.1.1: a retained PUBLISH on $aws/ must disconnect, got {p}"
    r.disconnect()

    # Controls: accepted.
    for topic, retain in ((reserved, False), (f"wills/{dev.name}", True)):
        r = RawMqtt(s, dev)
        rc = r.connack(unique("ok"), v5, will=(topic, b"{}", 1, retain))
        r.disconnect()
        assert rc == 0, f"will on {topic} retain={retain}: CONNACK {rc:#x}"

    # The attack.
    r = RawMqtt(s, dev)
    rc = r.connack(unique("atk"), v5, will=(reserved, b'{"state":{"reported":{"owned":true}}}', 1, True))
    r.disconnect()
    assert rc == not_authorized, (f"a RETAINED will on {reserved} was accepted at CONNECT (code {rc:#x}); "
                                  f"expected {not_authorized:#x}, as for a will it may not publish")
