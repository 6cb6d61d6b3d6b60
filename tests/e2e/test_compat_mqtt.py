"""docs/compatibility.md, "MQTT": refusals and their reason codes for both protocol versions,
client ids, wills, retained messages, the delivery queue and offline sessions, each next to a
positive control. paho-mqtt where a client library can say it, raw packets (built here) where
a library would refuse to send them or would hide the answer."""

import json
import re
import ssl
import struct
import time

import pytest
import requests
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from conftest import ALLOW_ALL, Device, Paho, Server, faketime, unique
from helpers import arn_of, drain
from test_limits_and_robustness import Raw, connect_v311, connect_v5, packet, s16


@pytest.fixture(scope="module")
def srv(workdir):
    s = Server(workdir / unique("compat-mqtt")).start()
    yield s
    s.stop()



def v5(s, dev, cid=None, **kw):
    p = Paho(s, s.endpoint(), dev, cid or unique("c"), v5=True, **kw)
    assert p.connect()[0] == 0
    return p


def v311(s, dev, cid=None, **kw):
    p = Paho(s, s.endpoint(), dev, cid or unique("c"), **kw)
    assert p.connect()[0] == 0
    return p


def monitor(s, workdir, *filters):
    p = v5(s, Device(s, s.boto(), unique("mon"), ALLOW_ALL, workdir))
    for f in filters:
        assert p.subscribe(f, qos=1)[0].value == 1
    return p


class Wire(Raw):
    """Raw's TLS socket, reading whole MQTT packets."""

    def packet(self, timeout=5.0):
        """(first byte, body), or None when the server closed the connection."""
        self.s.settimeout(timeout)

        def exact(n):
            out = b""
            while len(out) < n:
                try:
                    chunk = self.s.recv(n - len(out))
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
        return None if body is None else (first[0], body)

    def connack(self, connect):
        self.send(connect)
        p = self.packet()
        assert p is not None and p[0] == 0x20, p
        return p[1]


def publish(topic, payload=b"x", qos=0, pid=1, v5=True, retain=False, dup=False):
    first = 0x30 | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    body = s16(topic.encode()) + (struct.pack(">H", pid) if qos else b"") + (b"\x00" if v5 else b"") + payload
    return packet(first, body)


def disconnect_reason(w):
    """After an offending packet: the reason code of the server's DISCONNECT, or "closed" when
    the connection ended without one. Fails if the connection stays open."""
    while True:
        p = w.packet(timeout=5)
        if p is None:
            return "closed"
        if p[0] == 0xE0:
            code = p[1][0] if p[1] else 0
            assert w.packet(timeout=5) is None, "the server must close after its DISCONNECT"
            return code


# --- refusals of PUBLISH, SUBSCRIBE, delivery --------------------------------------------------

@pytest.mark.parametrize("qos", [0, 1])
def test_publish_not_authorized_mqtt311_closes_with_forbidden_access(srv, workdir, qos):
    """Row "PUBLISH not authorized, MQTT 3.1.1": the connection is closed (no PUBACK), and the
    lifecycle event says FORBIDDEN_ACCESS. Positive control: a permitted publish on the same
    connection just before is acknowledged and delivered."""
    s = srv
    arn = arn_of(s)
    dev = Device(s, s.boto(), unique("fb"), {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/ok/*"}]}, workdir)
    cid = unique("fb311")
    mon = monitor(s, workdir, "ok/#", "no/#", f"$aws/events/presence/disconnected/{cid}")
    w = Wire(s, dev)
    assert w.connack(connect_v311(cid)) == b"\x00\x00"
    w.send(publish("ok/x", b"fine", qos=1, pid=1, v5=False))
    assert w.packet() == (0x40, b"\x00\x01")
    w.send(publish("no/x", b"denied", qos=qos, pid=2, v5=False))
    assert w.packet() is None, "MQTT 3.1.1: closed, no PUBACK"
    w.close()
    got = {m.topic: m for m in drain(mon.messages, 1.5)}
    assert got["ok/x"].payload == b"fine"
    assert "no/x" not in got
    event = json.loads(got[f"$aws/events/presence/disconnected/{cid}"].payload)
    assert event["disconnectReason"] == "FORBIDDEN_ACCESS", event
    assert event["clientInitiatedDisconnect"] is False
    mon.close()


def test_publish_not_authorized_mqtt5(srv, workdir):
    """Rows "PUBLISH not authorized, MQTT 5 QoS 1" (PUBACK 0x87, connection kept) and "... QoS 0"
    (dropped and logged; no acknowledgement exists). Positive control: permitted publishes
    before and after on the same connection are acknowledged with 0 and delivered."""
    s = srv
    arn = arn_of(s)
    dev = Device(s, s.boto(), unique("deny5"), {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/ok/*"}]}, workdir)
    mon = monitor(s, workdir, "ok/#", "no/#")
    p = v5(s, dev)
    denied = unique("no/denied-qos0")
    for topic, qos, want in (("ok/1", 1, 0), ("no/x", 1, 0x87), (denied, 0, None), ("ok/2", 1, 0)):
        info = p.c.publish(topic, topic.encode(), qos=qos)
        mid, rc = p.pubacks.get(timeout=5)  # paho reports a QoS 0 message as published once sent
        assert mid == info.mid, topic
        if want is not None:
            assert rc.value == want, topic
    assert p.disconnects.empty(), "the connection is kept"
    assert sorted(m.topic for m in drain(mon.messages, 1.0)) == ["ok/1", "ok/2"]
    assert re.search(r"publish not authorized.*" + re.escape(denied), s.log_text()), "the QoS 0 refusal is logged"
    p.close()
    mon.close()


@pytest.mark.parametrize("version", ["mqtt311", "mqtt5"])
def test_subscribe_not_authorized_fails_that_filter(srv, workdir, version):
    """Row "SUBSCRIBE not authorized": SUBACK 0x80 (3.1.1) / 0x87 (5) for that filter; the other
    filters of the same SUBSCRIBE are granted (positive control) and the connection stays."""
    s = srv
    arn = arn_of(s)
    dev = Device(s, s.boto(), unique("sub"), {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": f"{arn}:topicfilter/ok/*"}]}, workdir)
    p = (v5 if version == "mqtt5" else v311)(s, dev)
    p.c.subscribe([("ok/a", 1), ("no/b", 1), ("ok/c", 0)])
    codes = [c.value for c in p.subacks.get(timeout=5)]
    assert codes == [1, 0x87 if version == "mqtt5" else 0x80, 0], codes
    assert p.subscribe("ok/d", qos=1)[0].value == 1, "still connected"
    p.close()


@pytest.mark.parametrize("version", ["mqtt311", "mqtt5"])
def test_receive_denied_skips_the_delivery_silently(srv, workdir, version):
    """Row "iot:Receive denied": the delivery is skipped, with no error and no disconnect.
    Positive control: a message on a topic it may receive, published after the denied one,
    arrives."""
    s = srv
    arn = arn_of(s)
    sub_dev = Device(s, s.boto(), unique("recv"), {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": f"{arn}:topicfilter/recv/*"},
        {"Effect": "Allow", "Action": "iot:Receive", "Resource": f"{arn}:topic/recv/ok"}]}, workdir)
    sub = (v5 if version == "mqtt5" else v311)(s, sub_dev)
    assert sub.subscribe("recv/#", qos=1)[0].value == 1
    pub = v5(s, Device(s, s.boto(), unique("recvpub"), ALLOW_ALL, workdir))
    for topic in ("recv/no", "recv/ok"):
        pub.c.publish(topic, topic.encode(), qos=1).wait_for_publish(5)
    got = [m.topic for m in drain(sub.messages, 1.0)]
    assert got == ["recv/ok"], got
    assert sub.disconnects.empty()
    pub.c.publish("recv/ok", b"again", qos=1).wait_for_publish(5)
    assert sub.messages.get(timeout=5).payload == b"again"
    sub.close()
    pub.close()


# --- QoS 2 and packets AWS does not support ----------------------------------------------------

@pytest.mark.parametrize("version", ["mqtt311", "mqtt5"])
def test_subscribe_with_qos2_is_granted_qos1(srv, workdir, version):
    """Row "SUBSCRIBE with QoS 2": granted QoS 1 (in the SUBACK), and deliveries come at QoS 1.
    Positive control: QoS 0 and 1 are granted as asked."""
    s = srv
    dev = Device(s, s.boto(), unique("q2"), ALLOW_ALL, workdir)
    p = (v5 if version == "mqtt5" else v311)(s, dev)
    topic = unique("q2/t")
    p.c.subscribe([(topic, 2), (topic + "/zero", 0), (topic + "/one", 1)])
    assert [c.value for c in p.subacks.get(timeout=5)] == [1, 0, 1]
    p.c.publish(topic, b"x", qos=1)
    m = p.messages.get(timeout=5)
    assert (m.payload, m.qos) == (b"x", 1)
    p.close()


@pytest.mark.parametrize("version", ["mqtt311", "mqtt5"])
def test_publish_with_qos2_is_refused(srv, workdir, version):
    """Row "PUBLISH with QoS 2": MQTT 5 DISCONNECT 0x9B (QoS not supported); MQTT 3.1.1 the
    connection is closed. Positive control: a QoS 1 PUBLISH first is acknowledged."""
    s = srv
    dev = Device(s, s.boto(), unique("pq2"), ALLOW_ALL, workdir)
    is5 = version == "mqtt5"
    w = Wire(s, dev)
    w.connack(connect_v5(unique("pq2")) if is5 else connect_v311(unique("pq2")))
    w.send(publish("pq2/t", qos=1, pid=1, v5=is5))
    assert w.packet()[0] == 0x40
    w.send(publish("pq2/t", qos=2, pid=2, v5=is5))
    assert disconnect_reason(w) == (0x9B if is5 else "closed")
    w.close()


QOS2_FLOW = {"PUBREC": 0x50, "PUBREL": 0x62, "PUBCOMP": 0x70}


@pytest.mark.parametrize("version", ["mqtt311", "mqtt5"])
@pytest.mark.parametrize("kind", ["PUBREC", "PUBREL", "PUBCOMP", "AUTH"])
def test_qos2_flow_and_auth_packets_are_refused(srv, workdir, kind, version):
    """Row "PUBREC/PUBREL/PUBCOMP/AUTH from a client": MQTT 5 DISCONNECT 0x82 (Protocol Error);
    MQTT 3.1.1 close (AUTH does not exist in 3.1.1: a reserved packet type). Positive control: a
    PINGREQ first is answered with PINGRESP."""
    s = srv
    dev = Device(s, s.boto(), unique("flow"), ALLOW_ALL, workdir)
    is5 = version == "mqtt5"
    w = Wire(s, dev)
    w.connack(connect_v5(unique("flow")) if is5 else connect_v311(unique("flow")))
    w.send(b"\xc0\x00")
    assert w.packet() == (0xD0, b"")
    if kind == "AUTH":
        w.send(packet(0xF0, b"\x18\x00") if is5 else b"\xf0\x00")  # AUTH: Continue authentication
    else:
        body = b"\x00\x07" + (b"\x00\x00" if is5 else b"")
        w.send(packet(QOS2_FLOW[kind], body))
    assert disconnect_reason(w) == (0x82 if is5 else "closed")
    w.close()


# --- AWS's limits on MQTT 3.1.1 (MQTT 5 is in test_limits_and_robustness) -----------------------

@pytest.mark.parametrize("what", ["topic-257", "slashes-8", "payload-131073"])
def test_limit_violations_close_an_mqtt311_connection(srv, workdir, what):
    """Rows "topic > 256 bytes or > 7 slashes in PUBLISH" and "payload > 128 KiB", MQTT 3.1.1:
    the connection is closed (MQTT 3.1.1 has no DISCONNECT from the server). Positive control:
    the same at the limit (256 bytes, 7 slashes, 131,072 bytes) is acknowledged and delivered."""
    s = srv
    dev = Device(s, s.boto(), unique("lim"), ALLOW_ALL, workdir)
    at, over = {
        "topic-257": (("t" * 256, b"x"), ("t" * 257, b"x")),
        "slashes-8": (("/".join("abcdefgh"), b"x"), ("/".join("abcdefghi"), b"x")),
        "payload-131073": (("big/t", b"p" * 131072), ("big/t", b"p" * 131073)),
    }[what]
    mon = monitor(s, workdir, at[0])
    w = Wire(s, dev)
    w.connack(connect_v311(unique("lim")))
    w.send(publish(at[0], at[1], qos=1, pid=1, v5=False))
    assert w.packet(timeout=10) == (0x40, b"\x00\x01")
    assert mon.messages.get(timeout=10).payload == at[1]
    w.send(publish(over[0], over[1], qos=1, pid=2, v5=False))
    assert disconnect_reason(w) == "closed"
    w.close()
    mon.close()


# --- client ids and keep-alive ----------------------------------------------------------------

def test_empty_client_id(srv, workdir):
    """Row "empty client id": MQTT 5 gets `sekisho-<uuid>` in the CONNACK's Assigned Client
    Identifier; MQTT 3.1.1 with a clean session is accepted; MQTT 3.1.1 with clean session 0 is
    refused with return code 2 (identifier rejected)."""
    s = srv
    dev = Device(s, s.boto(), unique("empty"), ALLOW_ALL, workdir)
    p = Paho(s, s.endpoint(), dev, "", v5=True)
    rc, _, props = p.connect()
    assert rc == 0
    assert re.fullmatch(r"sekisho-[0-9a-f]{32}", props.AssignedClientIdentifier), props.AssignedClientIdentifier
    p.close()
    w = Wire(s, dev)
    assert w.connack(connect_v311("")) == b"\x00\x00"
    w.close()
    w = Wire(s, dev)
    body = s16(b"MQTT") + bytes([4, 0x00]) + struct.pack(">H", 60) + s16(b"")
    assert w.connack(packet(0x10, body)) == b"\x00\x02"
    assert w.packet() is None
    w.close()


def test_keep_alive_zero_becomes_1200(srv, workdir):
    """Row "keep-alive": 0 → 1200, announced as Server Keep Alive (the other clamps are in
    test_limits_and_robustness). Positive control: 60 is kept as asked (no Server Keep Alive)."""
    s = srv
    dev = Device(s, s.boto(), unique("ka0"), ALLOW_ALL, workdir)
    for asked, granted in ((0, 1200), (60, None)):
        p = Paho(s, s.endpoint(), dev, unique("ka"), v5=True, keepalive=asked)
        rc, _, props = p.connect()
        assert rc == 0 and getattr(props, "ServerKeepAlive", None) == granted, asked
        p.close()


# --- wills ------------------------------------------------------------------------------------

def connect_with_will(client_id, topic, payload=b"gone", v5=True, retain=False, keepalive=60):
    flags = 0x02 | 0x04 | 0x08 | (0x20 if retain else 0)  # clean, will, will QoS 1
    if v5:
        body = (s16(b"MQTT") + bytes([5, flags]) + struct.pack(">H", keepalive) + b"\x00" + s16(client_id.encode())
                + b"\x00" + s16(topic.encode()) + s16(payload))
    else:
        body = (s16(b"MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive) + s16(client_id.encode())
                + s16(topic.encode()) + s16(payload))
    return packet(0x10, body)


def test_will_needs_last_will_connect_attribute(srv, workdir):
    """Row "a will", at CONNECT: a will adds `LastWill` to iot:ConnectAttributes. A policy that
    allows only connections without attributes refuses a CONNECT with a will (0x87) and accepts
    one without; a policy that lists LastWill accepts it."""
    s = srv
    arn = arn_of(s)

    def device(attrs):
        return Device(s, s.boto(), unique("lw"), {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*",
             "Condition": {"ForAllValues:StringEquals": {"iot:ConnectAttributes": attrs}}},
            {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/will/*"}]}, workdir)

    plain, with_will = device([]), device(["LastWill"])
    for dev, will_code in ((plain, 0x87), (with_will, 0)):
        w = Wire(s, dev)
        assert w.connack(connect_v5(unique("nowill")))[1] == 0
        w.close()
        w = Wire(s, dev)
        assert w.connack(connect_with_will(unique("will"), "will/x"))[1] == will_code
        w.close()


def test_will_is_authorized_again_when_sent(srv, workdir):
    """Row "a will": authorized at CONNECT, and again with the policies in force when it is
    sent. A will allowed at CONNECT is not published once a new default policy version denies
    its topic before the connection drops; positive control: an identical device whose policy
    did not change has its will delivered in the same window."""
    s = srv
    iot = s.boto()
    arn = arn_of(s)
    allowing = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iot:Connect", "iot:Publish"], "Resource": "*"}]}
    changed, same = (Device(s, iot, unique("wc"), allowing, workdir) for _ in range(2))
    mon = monitor(s, workdir, "wills/#")
    conns = {}
    for dev in (changed, same):
        w = Wire(s, dev)
        assert w.connack(connect_with_will(dev.name, f"wills/{dev.name}"))[1] == 0
        conns[dev.name] = w
    iot.create_policy_version(policyName=changed.policy, setAsDefault=True, policyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["iot:Connect", "iot:Publish"], "Resource": "*"},
            {"Effect": "Deny", "Action": "iot:Publish", "Resource": f"{arn}:topic/wills/*"}]}))
    for w in conns.values():
        w.close()  # dropped without DISCONNECT: the wills are due
    got = [m.topic for m in drain(mon.messages, 2.0)]
    assert f"wills/{same.name}" in got, f"control: the unchanged device's will was not delivered ({got})"
    assert f"wills/{changed.name}" not in got, "a will denied by the policy in force was published"
    mon.close()


# --- retained messages ---------------------------------------------------------------------------

def test_retain_as_published(srv, workdir):
    """Row "retained messages": live deliveries carry RETAIN=0, unless the MQTT 5 subscription
    asked for Retain As Published; the stored copy arrives with RETAIN=1 on a new exact
    subscription either way."""
    s = srv
    dev = Device(s, s.boto(), unique("rap"), ALLOW_ALL, workdir)
    topic = unique("rap/t")
    plain, rap = v5(s, dev), v5(s, dev)
    assert plain.subscribe(topic, qos=1)[0].value == 1
    rap.c.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
    assert rap.subacks.get(timeout=5)[0].value == 1
    pub = v5(s, dev)
    pub.c.publish(topic, b"live", qos=1, retain=True).wait_for_publish(5)
    m1, m2 = plain.messages.get(timeout=5), rap.messages.get(timeout=5)
    assert (m1.payload, m1.retain) == (b"live", False)
    assert (m2.payload, m2.retain) == (b"live", True)
    late = v5(s, dev)
    late.subscribe(topic, qos=1)
    m = late.messages.get(timeout=5)
    assert (m.payload, m.retain) == (b"live", True)
    for c in (plain, rap, pub, late):
        c.close()


def test_retained_messages_at_most_100000_per_account(workdir):
    """Row "retained messages": at most 100,000 per account. With 100,000 retained, a retained
    PUBLISH to a new topic gets MQTT 5 PUBACK 0x97 (Quota exceeded) and is not stored; replacing
    an existing one and non-retained publishes still succeed; clearing one makes room."""
    s = Server(workdir / unique("retq")).start()
    try:
        dev = Device(s, s.boto(), unique("retq"), ALLOW_ALL, workdir)
        w = Wire(s, dev)
        w.connack(connect_v5(unique("retq")))
        batch = bytearray()
        for i in range(99_999):
            batch += publish(f"r/{i}", b"v", qos=0, retain=True)
            if len(batch) > 1 << 20:
                w.send(bytes(batch))
                batch.clear()
        w.send(bytes(batch))

        def acked(topic, payload=b"v", retain=True, pid=1):
            w.send(publish(topic, payload, qos=1, pid=pid, retain=retain))
            p = w.packet(timeout=60)
            assert p is not None and p[0] == 0x40 and p[1][:2] == struct.pack(">H", pid), p
            return p[1][2] if len(p[1]) > 2 else 0

        assert acked("r/99999") == 0, "the 100,000th"
        metrics = requests.get(f"https://localhost:{s.api_port}/metrics", verify=s.ca, timeout=10).text
        assert re.search(r"^sekisho_retained_messages 100000$", metrics, re.M), "100,000 stored"
        assert acked("r/100000", pid=2) == 0x97, "the 100,001st"
        assert acked("r/5", b"replaced", pid=3) == 0, "replacing an existing retained message"
        assert acked("r/100000", retain=False, pid=4) == 0, "non-retained"
        sub = v5(s, dev)
        sub.subscribe("r/100000", qos=1)
        assert drain(sub.messages, 0.5) == [], "the refused one was not stored"
        assert acked("r/0", b"", pid=5) == 0, "clearing one"
        assert acked("r/100000", b"now", pid=6) == 0
        sub2 = v5(s, dev)
        sub2.subscribe("r/100000", qos=1)
        assert sub2.messages.get(timeout=5).payload == b"now"
        w.close()
        sub.close()
        sub2.close()
    finally:
        s.stop()


# --- the delivery queue and offline sessions ------------------------------------------------------

def metric(s, name):
    text = requests.get(f"https://localhost:{s.api_port}/metrics", verify=s.ca, timeout=10).text
    return int(re.search(rf"^{name} (\d+)$", text, re.M).group(1))


def test_delivery_queue_1024_backpressure_then_drop(workdir):
    """Row "per-connection delivery queue": 1,024 messages. A QoS 1 subscriber that never
    acknowledges holds 100 in flight (the in-flight window) and then 1,024 queued; until then each
    QoS 1 PUBLISH is acknowledged at once (positive control). The next one makes the publisher
    wait 2 s for room, then the delivery is dropped and counted, and only then comes its PUBACK;
    a QoS 0 one waits 50 ms, then is dropped."""
    s = Server(workdir / unique("queue")).start()
    try:
        iot = s.boto()
        topic = unique("q/t")
        sub = Wire(s, Device(s, iot, unique("slowsub"), ALLOW_ALL, workdir))
        sub.connack(connect_v311(unique("slowsub")))
        sub.send(packet(0x82, b"\x00\x01" + s16(topic.encode()) + b"\x01"))
        assert sub.packet()[0] == 0x90
        pub = Wire(s, Device(s, iot, unique("fastpub"), ALLOW_ALL, workdir))
        pub.connack(connect_v5(unique("fastpub")))
        dropped_before = metric(s, "sekisho_deliveries_dropped_total")

        def timed(qos, pid):
            t0 = time.monotonic()
            pub.send(publish(topic, b"m", qos=qos, pid=pid))
            if qos:
                p = pub.packet(timeout=10)
                assert p is not None and p[0] == 0x40, p
            else:  # QoS 0 has no answer: a PINGREQ behind it is answered once it was handled
                pub.send(b"\xc0\x00")
                assert pub.packet(timeout=10) == (0xD0, b"")
            return time.monotonic() - t0

        quick = [timed(1, i + 1) for i in range(100 + 1024)]
        assert max(quick) < 1.0, f"a publish waited {max(quick):.2f} s before the queue was full"
        assert metric(s, "sekisho_deliveries_dropped_total") == dropped_before
        waited = timed(1, 2000)
        assert 1.8 <= waited < 5, f"QoS 1 publish into a full queue: PUBACK after {waited:.2f} s, expected ~2 s"
        assert metric(s, "sekisho_deliveries_dropped_total") == dropped_before + 1
        waited0 = timed(0, 0)
        assert 0.04 <= waited0 < 1.0, f"QoS 0 publish into a full queue waited {waited0:.3f} s, expected ~50 ms"
        assert metric(s, "sekisho_deliveries_dropped_total") == dropped_before + 2
        sub.close()
        pub.close()
    finally:
        s.stop()


def test_offline_session_keeps_the_newest_1000_qos1_messages(srv, workdir):
    """Row "offline persistent session": QoS 1 messages for QoS 1 subscriptions, at most 1,000
    (oldest dropped). 1,001 QoS 1 messages published while the session is offline come back as
    the newest 1,000 (m1..m1000, in order); a QoS 1 message for a QoS 0 subscription and a QoS 0
    message are not kept."""
    s = srv
    iot = s.boto()
    dev = Device(s, iot, unique("off"), ALLOW_ALL, workdir)
    cid = unique("offline")
    topic, topic0 = unique("off/q1"), unique("off/q0")
    mon = monitor(s, workdir, f"$aws/events/presence/disconnected/{cid}")
    p = Paho(s, s.endpoint(), dev, cid, clean=False)
    assert p.connect()[0] == 0
    p.c.subscribe([(topic, 1), (topic0, 0)])
    p.subacks.get(timeout=5)
    p.close()
    mon.messages.get(timeout=5)  # the session is detached
    w = Wire(s, Device(s, iot, unique("offpub"), ALLOW_ALL, workdir))
    w.connack(connect_v5(unique("offpub")))
    msgs = [publish(topic, f"m{i}".encode(), qos=1, pid=i + 1) for i in range(1001)]
    msgs.append(publish(topic0, b"for-qos0-subscription", qos=1, pid=2000))
    for i in range(0, len(msgs), 50):  # within the server's Receive Maximum (100)
        w.send(b"".join(msgs[i:i + 50]))
        acks = [w.packet(timeout=10) for _ in msgs[i:i + 50]]
        assert all(a is not None and a[0] == 0x40 for a in acks), acks
    w.send(publish(topic, b"qos0-message", qos=0) + b"\xc0\x00")
    assert w.packet(timeout=10) == (0xD0, b"")
    w.close()
    p = Paho(s, s.endpoint(), dev, cid, clean=False)
    rc, flags, _ = p.connect()
    assert rc == 0 and flags.session_present
    got = [m.payload.decode() for m in drain(p.messages, 2.0)]
    p.close()
    mon.close()
    assert len(got) == 1000, f"{len(got)} queued messages came back"
    assert got == [f"m{i}" for i in range(1, 1001)], got[:3]


def test_mqtt5_session_expiry_at_most_seven_days(srv, workdir):
    """Row "offline persistent session": MQTT 5 sessions last up to 7 days: a Session Expiry
    Interval above 604,800 s is answered with 604,800 in the CONNACK; one below is kept."""
    s = srv
    dev = Device(s, s.boto(), unique("exp"), ALLOW_ALL, workdir)
    for asked, granted in ((8 * 86400, 604800), (604800, 604800), (3600, 3600)):
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = asked
        p = Paho(s, s.endpoint(), dev, unique("exp"), v5=True, clean=False)
        rc, _, got = p.connect(properties=props)
        assert rc == 0 and got.SessionExpiryInterval == granted, (asked, got)
        p.close()


def test_mqtt311_persistent_session_lasts_one_hour(workdir):
    """Row "offline persistent session": an MQTT 3.1.1 persistent session lasts 1 h. The server
    runs with its clock sped up 100 times (libfaketime `x100`: an hour passes in 36 s; the
    devices are made beforehand at normal speed, since SigV4 would see the skew). Two sessions
    are left at the same moment: one is resumed (session present) 45 minutes later, the other is
    gone 75 minutes later (session present = 0, a clean new session)."""
    s = Server(workdir / unique("expiry311")).start()
    try:
        iot = s.boto()
        devs = [Device(s, iot, unique("sess"), ALLOW_ALL, workdir) for _ in range(2)]
        host = s.endpoint()
        s.stop()
        s.start(wrapper=faketime("+0 x100"))
        for d in devs:
            p = Paho(s, host, d, d.name, clean=False, keepalive=1200)
            rc, flags, _ = p.connect()
            assert rc == 0 and not flags.session_present
            p.subscribe(f"sess/{d.name}", qos=1)
            p.close()
        left = time.monotonic()

        def present_after(d, minutes):
            time.sleep(max(0.0, left + minutes * 60 / 100 - time.monotonic()))
            p = Paho(s, host, d, d.name, clean=False, keepalive=1200)
            rc, flags, _ = p.connect()
            p.close()
            assert rc == 0
            return flags.session_present

        assert present_after(devs[0], 45) is True, "a 3.1.1 session must outlive 45 minutes"
        assert present_after(devs[1], 75) is False, "a 3.1.1 session must be gone after 75 minutes"
    finally:
        s.stop()


@pytest.mark.parametrize("version", ["mqtt311", "mqtt5"])
def test_connect_not_authorized_gets_connack_then_close(srv, workdir, version):
    """Rows "CONNECT not authorized, MQTT 5" (CONNACK 0x87, close) and "..., MQTT 3.1.1" (return
    code 5, close). Positive control: the client id the policy allows gets CONNACK 0 and the
    connection stays (PINGREQ answered)."""
    s = srv
    arn = arn_of(s)
    allowed = unique("allowed")
    dev = Device(s, s.boto(), unique("cn"), {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/{allowed}"}]}, workdir)
    is5 = version == "mqtt5"
    make = connect_v5 if is5 else connect_v311
    w = Wire(s, dev)
    assert w.connack(make(allowed))[1] == 0
    w.send(b"\xc0\x00")
    assert w.packet() == (0xD0, b"")
    w.close()
    w = Wire(s, dev)
    assert w.connack(make(unique("denied")))[1] == (0x87 if is5 else 5)
    assert w.packet() is None, "closed after the CONNACK"
    w.close()
