"""AWS IoT's rate limits at N and N+1 a second, over the wire (raw MQTT over mutual TLS, so
that every packet of a burst arrives in one write and is judged at one instant).

AWS: 100 publishes a second per connection (excess discarded; MQTT 5 hears PUBACK 0x96), one
CONNECT a second per client id (MQTT 5 CONNACK 0x9F, 3.1.1 return code 3), 500 subscriptions a
second per account (SUBACK 0x97), 20,000 inbound publishes a second per account. Each limit can
be set per deployment and per account; `/metrics` counts what was throttled, by reason.
"""

import socket
import ssl
import struct
import time

import pytest
import requests

from conftest import ALLOW_ALL, Device, Server, unique
from test_limits_and_robustness import connect_v5, connect_v311, packet, s16


class Wire:
    """A raw MQTT connection that reads packets as they come."""

    def __init__(self, server, dev):
        ctx = ssl.create_default_context(cafile=server.ca)
        ctx.load_cert_chain(str(dev.cert), str(dev.key))
        sock = socket.create_connection(("127.0.0.1", server.mqtt_port), timeout=5)
        self.s = ctx.wrap_socket(sock, server_hostname=server.endpoint())
        self.buf = b""

    def send(self, b):
        self.s.sendall(b)

    def packets(self, n=None, quiet=0.5):
        """Packets (type byte, body) until `n` arrived or nothing came for `quiet` seconds."""
        out = []
        self.s.settimeout(quiet)
        while n is None or len(out) < n:
            while True:
                p = self._one()
                if p is None:
                    break
                out.append(p)
                if n is not None and len(out) >= n:
                    return out
            try:
                chunk = self.s.recv(65536)
            except (socket.timeout, TimeoutError):
                return out
            if not chunk:
                return out
            self.buf += chunk
        return out

    def _one(self):
        b = self.buf
        if len(b) < 2:
            return None
        mult, length, i = 1, 0, 1
        while True:
            if i >= len(b):
                return None
            length += (b[i] & 0x7F) * mult
            mult *= 128
            i += 1
            if not b[i - 1] & 0x80:
                break
        if len(b) < i + length:
            return None
        self.buf = b[i + length:]
        return b[0], b[i:i + length]

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def publish(topic, pid, v5, payload=b"x"):
    body = s16(topic.encode()) + struct.pack(">H", pid) + (b"\x00" if v5 else b"") + payload
    return packet(0x32, body)


def subscribe(pid, filters, v5):
    body = struct.pack(">H", pid) + (b"\x00" if v5 else b"")
    for f in filters:
        body += s16(f.encode()) + b"\x01"
    return packet(0x82, body)


def pubacks(pkts, v5):
    """{packet id: reason code} of the PUBACKs among `pkts`."""
    out = {}
    for t, body in pkts:
        if t == 0x40:
            pid = struct.unpack(">H", body[:2])[0]
            out[pid] = body[2] if v5 and len(body) > 2 else 0
    return out


def connected(server, dev, cid, v5=True):
    w = Wire(server, dev)
    w.send(connect_v5(cid) if v5 else connect_v311(cid))
    (t, body), = w.packets(1, quiet=5)
    assert t == 0x20
    return w, body[1]


def metric(server, reason):
    r = requests.get(f"https://localhost:{server.api_port}/metrics", verify=server.ca, timeout=10)
    for line in r.text.splitlines():
        if line.startswith(f'sekisho_throttled_total{{reason="{reason}"}}'):
            return int(line.split()[-1])
    raise AssertionError(f"no {reason} in /metrics")


@pytest.fixture(scope="module")
def aws_server(workdir):
    """A server with AWS's default rate limits."""
    s = Server(workdir / unique("throttled"), throttles=True).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(workdir):
    """A server with small limits, so that N and N+1 are a few packets apart."""
    s = Server(workdir / unique("small"), throttles=True, config="""
[limits]
publishes_per_connection = 5
subscriptions_per_account = 8
""").start()
    yield s
    s.stop()


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_publishes_per_connection_5_and_6(small_server, workdir, v5):
    s = small_server
    dev = Device(s, s.boto(), unique("rate"), ALLOW_ALL, workdir)
    w, code = connected(s, dev, dev.name, v5)
    assert code == 0
    w.send(b"".join(publish(f"rate/{dev.name}", i, v5) for i in range(1, 7)))
    acks = pubacks(w.packets(quiet=1.0), v5)
    ok = {i: 0 for i in range(1, 6)}
    if v5:
        assert acks == {**ok, 6: 0x96}
    else:
        assert acks == ok, "3.1.1: the sixth is discarded without a PUBACK"
    # The connection lives on, and a second later publishes again.
    time.sleep(1.1)
    w.send(publish(f"rate/{dev.name}", 7, v5))
    assert pubacks(w.packets(1, quiet=5), v5) == {7: 0}
    w.close()


def test_outbound_publishes_count_in_the_connection_rate(small_server, workdir):
    """AWS counts a connection's publishes in and out together: a subscriber whose two
    publishers (each within its own rate) send it 6 messages at once receives 5 (N) and the
    sixth (N+1) is discarded; a second later it receives again."""
    s = small_server
    dev = Device(s, s.boto(), unique("out"), ALLOW_ALL, workdir)
    sub, _ = connected(s, dev, unique("sub"))
    sub.send(subscribe(1, [f"out/{dev.name}"], True))
    assert [t for t, _ in sub.packets(1, quiet=5)] == [0x90]
    pubs = [connected(s, dev, unique(f"p{i}"))[0] for i in range(2)]
    time.sleep(1.1)  # every bucket full
    before = metric(s, "connection_publish_rate")
    for n, p in enumerate(pubs):
        p.send(b"".join(publish(f"out/{dev.name}", i, True, b"m%d" % (3 * n + i)) for i in range(1, 4)))
    for p in pubs:
        assert pubacks(p.packets(3, quiet=5), True) == {1: 0, 2: 0, 3: 0}, "each publisher within its rate"
    got = [body for t, body in sub.packets(quiet=1.0) if t & 0xF0 == 0x30]
    assert len(got) == 5, f"5 of 6 delivered, got {len(got)}"
    assert metric(s, "connection_publish_rate") >= before + 1
    time.sleep(1.1)
    pubs[0].send(publish(f"out/{dev.name}", 4, True, b"later"))
    assert [t & 0xF0 for t, _ in sub.packets(1, quiet=5)] == [0x30]
    for w in (sub, *pubs):
        w.close()


def test_publishes_per_connection_aws_default_100(aws_server, workdir):
    s = aws_server
    dev = Device(s, s.boto(), unique("rate100"), ALLOW_ALL, workdir)
    w, _ = connected(s, dev, dev.name)
    w.send(b"".join(publish(f"rate/{dev.name}", i, True) for i in range(1, 121)))
    acks = pubacks(w.packets(quiet=1.0), True)
    assert len(acks) == 120
    assert all(acks[i] == 0 for i in range(1, 101)), "the first 100 in a second pass"
    throttled = [i for i in range(101, 121) if acks[i] == 0x96]
    # The bucket refills at one per 10 ms while the burst is read: most of the rest is refused.
    assert len(throttled) >= 10, acks
    assert metric(s, "connection_publish_rate") >= len(throttled)
    w.close()


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_one_connect_per_second_per_client_id(aws_server, workdir, v5):
    s = aws_server
    dev = Device(s, s.boto(), unique("cps"), ALLOW_ALL, workdir)
    cid = unique("cid")
    w, code = connected(s, dev, cid, v5)
    assert code == 0
    w.send(b"\xe0\x00")  # DISCONNECT
    w.close()
    w, code = connected(s, dev, cid, v5)
    assert code == (0x9F if v5 else 3), "a second CONNECT within the second"
    w.close()
    # Another client id is not affected; the same one is, a second later, accepted again.
    w, code = connected(s, dev, unique("other"), v5)
    assert code == 0
    w.close()
    time.sleep(1.1)
    w, code = connected(s, dev, cid, v5)
    assert code == 0
    w.close()
    assert metric(s, "client_connect_rate") >= 1


def test_subscriptions_per_account_8_and_9(small_server, workdir):
    s = small_server
    dev = Device(s, s.boto(), unique("subs"), ALLOW_ALL, workdir)
    w, _ = connected(s, dev, dev.name)
    filters = [f"subs/{dev.name}/{i}" for i in range(8)]
    w.send(subscribe(1, filters, True) + subscribe(2, [f"subs/{dev.name}/8"], True))
    acks = {struct.unpack(">H", body[:2])[0]: list(body[3:]) for t, body in w.packets(2, quiet=5) if t == 0x90}
    assert acks == {1: [1] * 8, 2: [0x97]}
    time.sleep(0.3)  # a little over two tokens' worth (8 a second)
    w.send(subscribe(3, [f"subs/{dev.name}/9", f"subs/{dev.name}/10"], True))
    (t, body), = w.packets(1, quiet=5)
    assert t == 0x90 and list(body[3:]) == [1, 1]
    assert metric(s, "account_subscribe_rate") >= 1
    w.close()


def test_publishes_per_account(workdir):
    s = Server(workdir / unique("acct"), throttles=True, config="""
[limits]
publishes_per_connection = 0
publishes_per_account = 5
""").start()
    try:
        dev = Device(s, s.boto(), unique("acct"), ALLOW_ALL, workdir)
        a, _ = connected(s, dev, unique("a"))
        b, _ = connected(s, dev, unique("b"))
        # Two connections share the account's five a second.
        a.send(b"".join(publish("acct/x", i, True) for i in range(1, 4)))
        assert pubacks(a.packets(3, quiet=5), True) == {1: 0, 2: 0, 3: 0}
        b.send(b"".join(publish("acct/x", i, True) for i in range(1, 4)))
        assert pubacks(b.packets(3, quiet=5), True) == {1: 0, 2: 0, 3: 0x96}
        assert metric(s, "account_publish_rate") >= 1
        a.close()
        b.close()
    finally:
        s.stop()


def test_stored_messages_replay_at_10_a_second_besides_live_traffic(aws_server, workdir):
    """AWS: a resumed session's stored messages go out at 10 a second, and live messages are
    not held behind them."""
    s = aws_server
    dev = Device(s, s.boto(), unique("replay"), ALLOW_ALL, workdir)
    cid = unique("sub")
    # A persistent 3.1.1 session (clean session 0) subscribed at QoS 1, then offline.
    w = Wire(s, dev)
    w.send(connect_v311(cid, clean=False))
    (t, body), = w.packets(1, quiet=5)
    assert t == 0x20 and body[1] == 0
    w.send(subscribe(1, [f"replay/{dev.name}"], False))
    w.packets(1, quiet=5)
    w.send(b"\xe0\x00")
    w.close()
    pub, _ = connected(s, dev, unique("pub"))
    pub.send(b"".join(publish(f"replay/{dev.name}", i, True) for i in range(1, 16)))
    assert len(pubacks(pub.packets(15, quiet=5), True)) == 15
    time.sleep(1.1)  # one CONNECT a second per client id
    w = Wire(s, dev)
    w.send(connect_v311(cid, clean=False))
    start = time.time()
    (t, body), = w.packets(1, quiet=5)
    assert t == 0x20 and body[0] == 1, "session present"
    stored = w.packets(10, quiet=2)
    first_ten = time.time() - start
    # A live message is not held behind the five stored ones still waiting.
    pub.send(publish(f"replay/{dev.name}", 99, True, payload=b"live"))
    rest = w.packets(6, quiet=3)
    elapsed = time.time() - start
    assert [p[0] & 0xF0 for p in stored + rest] == [0x30] * 16
    assert first_ten < 0.5, f"the first ten (the bucket's burst) at once: {first_ten:.2f} s"
    assert elapsed >= 0.4, f"five more at 10 a second take about half a second: {elapsed:.2f} s"
    live = [i for i, (_, body) in enumerate(rest) if body.endswith(b"live")]
    assert live and live[0] < 5, "the live message is not held behind the stored ones"
    w.close()
    pub.close()


def test_a_shared_groups_stored_messages_replay_at_20_a_second(aws_server, workdir):
    """AWS: what a shared subscription group queued for its offline persistent member is
    dequeued at up to 20 a second (twice a session's own 10): 20 at once, the 21st later."""
    s = aws_server
    dev = Device(s, s.boto(), unique("sreplay"), ALLOW_ALL, workdir)
    cid = unique("member")
    topic = f"sreplay/{dev.name}"
    w = Wire(s, dev)
    w.send(connect_v311(cid, clean=False))
    (t, body), = w.packets(1, quiet=5)
    assert t == 0x20 and body[1] == 0
    w.send(subscribe(1, [f"$share/g/{topic}"], False))
    w.packets(1, quiet=5)
    w.send(b"\xe0\x00")
    w.close()
    pub, _ = connected(s, dev, unique("pub"))
    pub.send(b"".join(publish(topic, i, True) for i in range(1, 26)))
    assert len(pubacks(pub.packets(25, quiet=5), True)) == 25
    time.sleep(1.1)  # one CONNECT a second per client id
    w = Wire(s, dev)
    w.send(connect_v311(cid, clean=False))
    start = time.time()
    (t, body), = w.packets(1, quiet=5)
    assert t == 0x20 and body[0] == 1, "session present"
    first = w.packets(20, quiet=2)
    first_twenty = time.time() - start
    rest = w.packets(5, quiet=3)
    elapsed = time.time() - start
    assert [p[0] & 0xF0 for p in first + rest] == [0x30] * 25
    # At a session's 10 a second, 20 would take about a second.
    assert first_twenty < 0.5, f"the first twenty (the group's burst) at once: {first_twenty:.2f} s"
    assert elapsed >= 0.2, f"five more at 20 a second take about a quarter second: {elapsed:.2f} s"
    w.close()
    pub.close()
