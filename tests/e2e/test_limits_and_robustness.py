"""AWS IoT's limits at N and N+1 on the wire, and hostile input that must never crash the
server. Raw packets are built by hand here, independently of our own codec."""

import random
import socket
import ssl
import struct
import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import ALLOW_ALL, Device, Paho, unique


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s16(b):
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect_v5(client_id, keepalive=60):
    body = s16(b"MQTT") + bytes([5, 0x02]) + struct.pack(">H", keepalive) + b"\x00" + s16(client_id.encode())
    return packet(0x10, body)


def connect_v311(client_id, keepalive=60, clean=True):
    flags = 0x02 if clean else 0x00
    body = s16(b"MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive) + s16(client_id.encode())
    return packet(0x10, body)


class Raw:
    """A TLS socket with a client certificate, speaking bytes."""

    def __init__(self, server, device):
        ctx = ssl.create_default_context(cafile=server.ca)
        ctx.load_cert_chain(str(device.cert), str(device.key))
        sock = socket.create_connection(("127.0.0.1", server.mqtt_port), timeout=5)
        self.s = ctx.wrap_socket(sock, server_hostname=server.endpoint())

    def send(self, b):
        self.s.sendall(b)

    def read_all(self, timeout=3.0):
        """Everything until the server closes (or `timeout`)."""
        self.s.settimeout(timeout)
        out = bytearray()
        try:
            while True:
                chunk = self.s.recv(65536)
                if not chunk:
                    return bytes(out), True
                out += chunk
        except (socket.timeout, TimeoutError):
            return bytes(out), False
        except (ConnectionResetError, ssl.SSLError, OSError):
            return bytes(out), True

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_garbage_after_handshake_never_crashes(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("garbage"), ALLOW_ALL, workdir)
    rng = random.Random(1234)
    rss_before = rss_kib(server.proc.pid)
    cases = [
        b"\x00" * 10,
        b"\xff" * 64,
        b"\x10\xff\xff\xff\xff\x7f",                      # malformed remaining length
        b"\x10\xff\xff\xff\x7f",                          # 256 MiB announced: refused before buffering
        b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x3c\x00\x00",   # reserved CONNECT flag
        b"\x10\x02\x00",                                  # truncated
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] + [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(60)]
    for case in cases:
        r = Raw(server, dev)
        r.send(case)
        _, closed = r.read_all(timeout=0.2)
        r.close()
        assert server.alive(), f"server died on {case[:20]!r}"
    # Valid CONNECT followed by random junk.
    for i in range(40):
        r = Raw(server, dev)
        r.send(connect_v5(dev.name) + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))))
        r.read_all(timeout=0.2)
        r.close()
    assert server.alive()
    # Still serves, and memory did not balloon.
    p = Paho(server, server.endpoint(), dev, dev.name, v5=True)
    assert p.connect()[0] == 0
    p.close()
    assert rss_kib(server.proc.pid) - rss_before < 64 * 1024, "RSS grew by more than 64 MiB"


def test_invalid_utf8_topic_gets_malformed_disconnect(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("utf8"), ALLOW_ALL, workdir)
    r = Raw(server, dev)
    r.send(connect_v5(dev.name))
    bad_publish = packet(0x30, s16(b"a/\xff\xfe") + b"\x00" + b"payload")
    r.send(bad_publish)
    data, closed = r.read_all()
    r.close()
    assert data[:2] == b"\x20\x0b" or data[0] == 0x20, "CONNACK first"
    # CONNACK, then DISCONNECT with reason 0x81 (Malformed Packet), then close.
    assert b"\xe0" in data and data[data.index(b"\xe0", 2) + 2] == 0x81, data.hex()
    assert closed


def test_oversized_announcement_is_refused_without_buffering(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("big"), ALLOW_ALL, workdir)
    r = Raw(server, dev)
    r.send(connect_v5(dev.name))
    r.send(b"\x30" + varint(200 * 1024 * 1024))  # announces 200 MiB, sends nothing more
    data, closed = r.read_all()
    r.close()
    i = data.index(b"\xe0", 2)
    assert data[i + 2] == 0x95, "DISCONNECT Packet too large"
    assert closed


def test_unsupported_protocol_level(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("lvl"), ALLOW_ALL, workdir)
    r = Raw(server, dev)
    body = s16(b"MQTT") + bytes([3, 0x02]) + struct.pack(">H", 60) + s16(b"x")
    r.send(packet(0x10, body))
    data, closed = r.read_all()
    r.close()
    assert data == b"\x20\x02\x00\x01", "CONNACK: unacceptable protocol version"


def test_connect_timeout_closes_silent_clients(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("silent"), ALLOW_ALL, workdir)
    r = Raw(server, dev)
    data, closed = r.read_all(timeout=15)
    r.close()
    assert closed and data == b""


def v5_client(server, dev, client_id=None):
    p = Paho(server, server.endpoint(), dev, client_id or dev.name, v5=True)
    rc, flags, props = p.connect()
    assert rc == 0
    return p, props


def test_topic_length_256_and_257(server, workdir):
    dev = Device(server, server.boto(), unique("topiclen"), ALLOW_ALL, workdir)
    p, _ = v5_client(server, dev)
    ok = "t" * 256
    p.subscribe(ok, qos=1)
    p.c.publish(ok, b"x", qos=1)
    assert p.messages.get(timeout=5).topic == ok
    # A filter of 257 bytes: refused in the SUBACK (0x8F), the connection kept.
    assert p.subscribe("t" * 257, qos=1)[0].value == 0x8F
    p.c.publish("t" * 257, b"x", qos=1)
    rc = p.disconnects.get(timeout=5)
    assert rc.value == 0x90, f"Topic Name invalid, got {rc}"
    p.close()


def test_topic_slashes_7_and_8(server, workdir):
    dev = Device(server, server.boto(), unique("slash"), ALLOW_ALL, workdir)
    p, _ = v5_client(server, dev)
    seven = "/".join("abcdefgh")
    assert seven.count("/") == 7
    p.subscribe(seven, qos=1)
    p.c.publish(seven, b"x", qos=1)
    assert p.messages.get(timeout=5).topic == seven
    # Eight slashes in a filter: refused in the SUBACK.
    assert p.subscribe("/".join("abcdefghi"), qos=1)[0].value == 0x8F
    p.c.publish("/".join("abcdefghi"), b"x", qos=1)
    assert p.disconnects.get(timeout=5).value == 0x90
    p.close()


def test_client_id_128_and_129(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("cid"), ALLOW_ALL, workdir)
    p = Paho(server, server.endpoint(), dev, "c" * 128, v5=True)
    assert p.connect()[0] == 0
    p.close()
    p = Paho(server, server.endpoint(), dev, "c" * 129, v5=True)
    assert p.connect()[0].value == 0x85, "Client Identifier not valid"
    p.close()


def test_filters_per_subscribe_8_and_9(server, workdir):
    dev = Device(server, server.boto(), unique("filters"), ALLOW_ALL, workdir)
    p, _ = v5_client(server, dev)
    p.c.subscribe([(f"f/{i}", 1) for i in range(8)])
    codes = p.subacks.get(timeout=5)
    assert [c.value for c in codes] == [1] * 8
    p.c.subscribe([(f"g/{i}", 1) for i in range(9)])
    codes = p.subacks.get(timeout=5)
    assert [c.value for c in codes] == [1] * 8 + [0x97]
    p.close()


def test_subscriptions_per_connection_50_and_51(server, workdir):
    dev = Device(server, server.boto(), unique("subs"), ALLOW_ALL, workdir)
    p, _ = v5_client(server, dev)
    for batch in range(7):
        p.c.subscribe([(f"s/{batch}/{i}", 0) for i in range(8) if batch * 8 + i < 50])
        p.subacks.get(timeout=5)
    codes = p.subscribe("s/one-too-many", qos=0)
    assert codes[0].value == 0x97
    # Re-subscribing to an existing filter is not a new subscription.
    assert p.subscribe("s/0/0", qos=1)[0].value == 1
    p.close()


def test_payload_128k_and_one_more(server, workdir):
    dev = Device(server, server.boto(), unique("payload"), ALLOW_ALL, workdir)
    p, _ = v5_client(server, dev)
    p.subscribe("big/t", qos=1)
    p.c.publish("big/t", b"x" * 131072, qos=1)
    assert len(p.messages.get(timeout=10).payload) == 131072
    p.c.publish("big/t", b"x" * 131073, qos=1)
    assert p.disconnects.get(timeout=5).value == 0x95
    p.close()


def test_keep_alive_clamped_and_announced(server, workdir):
    dev = Device(server, server.boto(), unique("ka"), ALLOW_ALL, workdir)
    for asked, granted in [(10, 30), (30, None), (1200, None), (1201, 1200)]:
        p = Paho(server, server.endpoint(), dev, dev.name, v5=True, keepalive=asked)
        rc, _, props = p.connect()
        assert rc == 0
        got = getattr(props, "ServerKeepAlive", None)
        assert got == granted, f"keep alive {asked}: server said {got}"
        p.close()


def test_connack_capabilities_v5(server, workdir):
    dev = Device(server, server.boto(), unique("caps"), ALLOW_ALL, workdir)
    p, props = v5_client(server, dev)
    assert props.MaximumQoS == 1
    assert props.RetainAvailable == 1
    assert props.SubscriptionIdentifierAvailable == 0
    assert props.SharedSubscriptionAvailable == 1
    assert props.TopicAliasMaximum == 8
    # A subscription identifier is refused with DISCONNECT 0xA1, as AWS does.
    sp = Properties(PacketTypes.SUBSCRIBE)
    sp.SubscriptionIdentifier = 7
    p.c.subscribe("x/y", 0, properties=sp)
    assert p.disconnects.get(timeout=5).value == 0xA1
    p.close()


def test_keep_alive_enforced_at_one_and_a_half(server, workdir):
    """30 s keep-alive (the minimum): the server closes a silent client after 45 s."""
    dev = Device(server, server.boto(), unique("kaenf"), ALLOW_ALL, workdir)
    r = Raw(server, dev)
    r.send(connect_v311(dev.name, keepalive=30))
    t0 = time.monotonic()
    data, closed = r.read_all(timeout=60)
    elapsed = time.monotonic() - t0
    r.close()
    assert data[:4] == b"\x20\x02\x00\x00"
    assert closed and 44 <= elapsed <= 50, f"closed after {elapsed:.1f}s"
