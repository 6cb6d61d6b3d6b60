"""Nothing acknowledged is lost across a crash (issue 12), with paho-mqtt.

Several publishers flood QoS 1 messages to persistent-session subscribers (one online and
acknowledging, one online and never acknowledging, one offline) after setting retained
messages; the server is killed with SIGKILL mid-flood (and, in a second test, stopped with
SIGTERM), restarted on the same data directory, and every subscriber reconnects. Counted:
every message a publisher got a PUBACK for reaches every subscriber (before the crash or
after), every retained message is there, every session is present.
"""

import queue
import signal
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import ALLOW_ALL, Device, Paho, Server, connect_with_delayed_will, unique
from helpers import drain_for, wait_for


class Client:
    """A paho v5 client over mutual TLS with a persistent session."""

    def __init__(self, server, dev, client_id, manual_ack=False):
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             manual_ack=manual_ack)
        self.c.tls_set(ca_certs=server.ca, certfile=str(dev.cert), keyfile=str(dev.key))
        self.c.max_inflight_messages_set(20)
        self.received = set()
        self.connack = queue.Queue()
        self.subacks = queue.Queue()
        self.acked_mids = set()
        self.sent = {}
        self.lock = threading.Lock()
        self.last_message = time.time()

        def on_message(c, u, m):
            with self.lock:
                self.received.add(m.payload.decode())
                self.last_message = time.time()

        def on_publish(c, u, mid, rc, p=None):
            # Called with paho's own lock held: only our lock inside it, never the reverse.
            if not rc.is_failure:
                with self.lock:
                    self.acked_mids.add(mid)

        self.c.on_message = on_message
        self.c.on_publish = on_publish
        self.c.on_connect = lambda c, u, f, rc, p=None: self.connack.put((rc, f))
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self.subacks.put(rcs)
        self.server, self.client_id = server, client_id

    def connect(self):
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.connect(self.server.endpoint(), self.server.mqtt_port, clean_start=False, properties=props)
        self.c.loop_start()
        rc, flags = self.connack.get(timeout=15)
        assert rc == 0, rc
        return flags.session_present

    def subscribe(self, topic):
        self.c.subscribe(topic, 1)
        assert self.subacks.get(timeout=10)[0].value == 1

    def publish(self, topic, payload, retain=False):
        info = self.c.publish(topic, payload.encode(), qos=1, retain=retain)
        with self.lock:
            self.sent[info.mid] = payload
        return info

    @property
    def acked(self):
        """The payloads a PUBACK arrived for (mids are unique: fewer than 65,535 sends)."""
        with self.lock:
            return {self.sent[m] for m in self.acked_mids if m in self.sent}

    def stop(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()

    def drop(self):
        """Stops the network loop without a DISCONNECT (the server is gone)."""
        self.c.loop_stop()
        try:
            self.c.socket() and self.c.socket().close()
        except Exception:
            pass


def quiet(clients, idle=2.0, limit=30):
    """Waits until no client has received anything for `idle` seconds."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if all(time.time() - c.last_message > idle for c in clients):
            return
        time.sleep(0.2)


def crash_and_recover(workdir, sig):
    server = Server(workdir / f"durable-{unique('d')}").start()
    try:
        dev = Device(server, server.boto(), unique("dur"), ALLOW_ALL, workdir)
        topic = f"flood/{dev.name}"
        online = Client(server, dev, unique("online"))
        silent = Client(server, dev, unique("silent"), manual_ack=True)
        offline = Client(server, dev, unique("offline"))
        for s in (online, silent, offline):
            assert s.connect() is False
            s.subscribe(topic)
        offline.stop()

        # Retained messages first, each acknowledged.
        setter = Client(server, dev, unique("setter"))
        setter.connect()
        retained = {f"retained/{dev.name}/{i}": f"r{i}" for i in range(20)}
        for t, v in retained.items():
            setter.publish(t, v, retain=True).wait_for_publish(10)
        assert setter.acked == set(retained.values())

        publishers = [Client(server, dev, unique(f"pub{i}")) for i in range(3)]
        for p in publishers:
            p.connect()

        def flood(p, n):
            for k in range(300):
                try:
                    p.publish(topic, f"p{n}-{k}")
                except Exception:
                    return

        threads = [threading.Thread(target=flood, args=(p, n), daemon=True) for n, p in enumerate(publishers)]
        for t in threads:
            t.start()
        # Mid-flood: once some messages are acknowledged and before all are.
        deadline = time.time() + 30
        while time.time() < deadline and sum(len(p.acked) for p in publishers) < 150:
            time.sleep(0.005)
        server.stop(sig)
        for c in (*publishers, online, silent, setter):
            c.drop()
        acked = set().union(*(p.acked for p in publishers))
        assert len(acked) >= 150
        if sig == signal.SIGKILL:
            assert len(acked) < 900, "the flood ended before the crash: nothing was tested mid-flood"

        server.start()
        again = {name: Client(server, dev, c.client_id) for name, c in
                 (("online", online), ("silent", silent), ("offline", offline))}
        for name, c in again.items():
            assert c.connect() is True, f"{name}: session not present after the restart"
        quiet(list(again.values()))
        for name, before in (("online", online), ("silent", silent), ("offline", offline)):
            got = before.received | again[name].received
            missing = acked - got
            assert not missing, f"{name}: {len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
        # The sessions' subscriptions survived too: a new message reaches all three.
        p = Client(server, dev, unique("after"))
        p.connect()
        p.publish(topic, "after-restart").wait_for_publish(10)
        deadline = time.time() + 10
        while time.time() < deadline and not all("after-restart" in c.received for c in again.values()):
            time.sleep(0.1)
        assert all("after-restart" in c.received for c in again.values())
        # Every retained message is there.
        reader = Client(server, dev, unique("reader"))
        reader.connect()
        for t in retained:
            reader.subscribe(t)
        deadline = time.time() + 10
        while time.time() < deadline and reader.received != set(retained.values()):
            time.sleep(0.1)
        assert reader.received == set(retained.values())
        for c in (*again.values(), p, reader):
            c.stop()
    finally:
        server.stop()


def test_sigkill_mid_flood_loses_nothing_acknowledged(workdir):
    crash_and_recover(workdir, signal.SIGKILL)


def test_sigterm_mid_flood_loses_nothing_acknowledged(workdir):
    crash_and_recover(workdir, signal.SIGTERM)


def test_aws_iot_device_sdk_persistent_session_survives_sigkill(workdir):
    """The AWS IoT Device SDK (awscrt MQTT 3.1.1) on both sides: its QoS 1 publishes that
    completed (PUBACK) before a SIGKILL reach its persistent-session subscriber, offline across
    the crash, after the restart; the session is present."""
    from awscrt import mqtt as crt_mqtt
    from awsiot import mqtt_connection_builder

    server = Server(workdir / f"durable-{unique('sdk')}").start()
    try:
        dev = Device(server, server.boto(), unique("sdk"), ALLOW_ALL, workdir)
        topic, sub_id = f"sdk/{dev.name}", unique("sdk-sub")

        def connection(client_id, clean):
            return mqtt_connection_builder.mtls_from_path(
                endpoint=server.endpoint(), port=server.mqtt_port, cert_filepath=str(dev.cert),
                pri_key_filepath=str(dev.key), ca_filepath=server.ca, client_id=client_id,
                clean_session=clean, keep_alive_secs=30)

        received = queue.Queue()
        sub = connection(sub_id, False)
        assert sub.connect().result(10)["session_present"] is False
        fut, _ = sub.subscribe(topic, crt_mqtt.QoS.AT_LEAST_ONCE,
                               callback=lambda topic, payload, **kw: received.put(payload))
        fut.result(10)
        sub.disconnect().result(10)

        pub = connection(unique("sdk-pub"), True)
        pub.connect().result(10)
        acked = set()
        for i in range(50):
            payload = f"m{i}".encode()
            f, _ = pub.publish(topic, payload, crt_mqtt.QoS.AT_LEAST_ONCE)
            f.result(10)  # completes on PUBACK
            acked.add(payload)
        server.stop(signal.SIGKILL)
        try:
            pub.disconnect().result(5)
        except Exception:
            pass

        server.start()
        sub = connection(sub_id, False)
        # The stored subscription is the server's: this connection object never subscribed, so
        # its messages come to the connection-wide handler.
        sub.on_message(lambda topic, payload, **kw: received.put(payload))
        assert sub.connect().result(15)["session_present"] is True
        got = set()
        deadline = time.time() + 15
        while got != acked and time.time() < deadline:
            try:
                got.add(received.get(timeout=1))
            except queue.Empty:
                pass
        assert got == acked, f"lost {sorted(acked - got)[:5]}"
        sub.disconnect().result(10)
    finally:
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_delayed_wills_survive_a_restart(workdir, sig):
    """Three MQTT 5 devices leave a will delayed WILL_DELAY s (session expiry 600 s) and drop
    their TCP connections. `back` connects again (and leaves) before the server is killed with
    SIGKILL; `late` connects again after the restart, before the delay is over. After the
    restart (and the same after SIGTERM), `gone`'s will arrives when its delay is over (never before); the other two never
    do (a connection of the client id cancels its delayed will, across the restart too)."""
    will_delay = 8
    server = Server(workdir / f"wills-{unique('w')}").start()
    try:
        dev = Device(server, server.boto(), unique("wdur"), ALLOW_ALL, workdir)
        host = server.endpoint()
        names = {k: unique(k) for k in ("gone", "back", "late")}

        clients = [connect_with_delayed_will(server, dev, cid, f"wills/{dev.name}/{cid}", will_delay)
                   for cid in names.values()]
        # Taken before the first drop: paho's loop_stop may take a while for each client, and
        # the server sees the first one gone (and starts its delay) before the last is dropped.
        dropped = time.monotonic()
        for p in clients:
            p.drop()
        time.sleep(0.3)
        back = Client(server, dev, names["back"])
        assert back.connect() is True
        back.stop()
        time.sleep(0.5)
        server.stop(sig)

        server.start()
        watcher = Paho(server, host, dev, unique("watch"), v5=True)
        assert watcher.connect()[0] == 0
        assert watcher.subscribe(f"wills/{dev.name}/#", qos=1)[0].value == 1
        late = Client(server, dev, names["late"])
        assert late.connect() is True
        late.stop()
        assert time.monotonic() - dropped < will_delay - 1, "too slow: the restart took the whole delay"

        topics = []
        got = wait_for(watcher.messages, lambda m: topics.append(m.topic) or m.topic.endswith(names["gone"]),
                       will_delay + 10)
        assert got is not None, f"the delayed will did not survive the crash ({topics})"
        assert time.monotonic() - dropped >= will_delay - 0.5, "the will came before its delay"
        topics += [m.topic for m in drain_for(watcher.messages, 1.5)]
        for k in ("back", "late"):
            assert f"wills/{dev.name}/{names[k]}" not in topics, f"{k}: a cancelled will was published"
        watcher.close()
    finally:
        server.stop()


def test_an_unacknowledged_message_keeps_its_packet_id_across_a_restart(workdir):
    """MQTT-4.4.0-1: a QoS 1 message sent to a persistent session and not acknowledged when its
    connection ended is sent again with its packet id and DUP set, after a restart (SIGTERM)
    too. Raw MQTT 3.1.1 over mutual TLS, so the packet id and flags are seen as sent."""
    import struct

    from test_limits_and_robustness import connect_v311
    from test_throttles import Wire, connected, publish, pubacks, subscribe

    server = Server(workdir / f"dup-{unique('d')}").start()
    try:
        dev = Device(server, server.boto(), unique("dup"), ALLOW_ALL, workdir)
        cid = unique("sub")
        topic = f"dup/{dev.name}"
        connect = connect_v311(cid, clean=False)
        w = Wire(server, dev)
        w.send(connect)
        (t, body), = w.packets(1, quiet=5)
        assert t == 0x20 and body[1] == 0
        w.send(subscribe(1, [topic], False))
        w.packets(1, quiet=5)
        pub, _ = connected(server, dev, unique("pub"))
        pub.send(publish(topic, 1, True, payload=b"once"))
        assert pubacks(pub.packets(1, quiet=5), True) == {1: 0}
        (t, body), = w.packets(1, quiet=5)
        assert t & 0xF0 == 0x30 and not t & 0x08, "first sent without DUP"
        n = struct.unpack(">H", body[:2])[0]
        pid = struct.unpack(">H", body[2 + n:4 + n])[0]
        # Not acknowledged: the connection ends, then the server restarts.
        w.close()
        pub.close()
        time.sleep(1)
        server.stop(signal.SIGTERM)
        server.start()
        w = Wire(server, dev)
        w.send(connect)
        (t, body), = w.packets(1, quiet=5)
        assert t == 0x20 and body[0] == 1, "session present"
        (t, again), = w.packets(1, quiet=5)
        assert t & 0xF0 == 0x30 and t & 0x08, "sent again with DUP"
        assert struct.unpack(">H", again[2 + n:4 + n])[0] == pid, "with its packet id"
        assert again.endswith(b"once")
        w.close()
    finally:
        server.stop()
