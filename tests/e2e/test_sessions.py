"""Persistent sessions with real clients (paho-mqtt): what the Eclipse Paho interoperability
suite found, MQTT 3.1.1 and 5.

- [MQTT-4.4.0-1] QoS 1 messages a persistent session received but did not acknowledge before
  it disconnected are sent again, with their packet ids and DUP set, when it resumes; so are
  those still waiting behind the client's Receive Maximum.
- [MQTT-3.1.2-23] a session whose Session Expiry Interval has passed is not resumed, even
  before the server's periodic sweep removes it.
"""

import queue
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import ALLOW_ALL, Device, Paho, connect_with_delayed_will, unique
from helpers import drain_for, wait_for


class Subscriber:
    """A paho client with a persistent session that acknowledges only when told to."""

    def __init__(self, server, dev, client_id, v5, manual_ack, expiry=300, receive_max=None):
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kwargs = {} if v5 else {"clean_session": False}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto,
                             manual_ack=manual_ack, **kwargs)
        self.c.tls_set(ca_certs=server.ca, certfile=str(dev.cert), keyfile=str(dev.key))
        self.messages = queue.Queue()
        self.connack = queue.Queue()
        self.subacks = queue.Queue()
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p=None: self.connack.put((rc, f))
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self.subacks.put(rcs)
        self.server, self.v5, self.expiry, self.receive_max = server, v5, expiry, receive_max

    def connect(self):
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.expiry
            if self.receive_max:
                props.ReceiveMaximum = self.receive_max
            self.c.connect(self.server.endpoint(), self.server.mqtt_port, clean_start=False, properties=props)
        else:
            self.c.connect(self.server.endpoint(), self.server.mqtt_port)
        self.c.loop_start()
        rc, flags = self.connack.get(timeout=10)
        assert rc == 0, rc
        return flags.session_present

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def publisher(server, dev):
    p = Paho(server, server.endpoint(), dev, unique("pub"), v5=True)
    assert p.connect()[0] == 0
    return p


@pytest.mark.parametrize("v5", [False, True], ids=["mqtt311", "mqtt5"])
def test_unacknowledged_qos1_is_sent_again_on_resumption(server, workdir, v5):
    dev = Device(server, server.boto(), unique("sess"), ALLOW_ALL, workdir)
    topic, cid = f"sess/{dev.name}", unique("sub")
    sub = Subscriber(server, dev, cid, v5, manual_ack=True)
    assert sub.connect() is False
    sub.c.subscribe(topic, 1)
    sub.subacks.get(timeout=10)
    pub = publisher(server, dev)
    pub.c.publish(topic, b"m1", qos=1).wait_for_publish(5)
    first = sub.messages.get(timeout=10)
    assert (first.payload, first.dup) == (b"m1", False)
    sub.close()  # never acknowledged

    again = Subscriber(server, dev, cid, v5, manual_ack=False)
    assert again.connect() is True
    m = again.messages.get(timeout=10)
    assert (m.payload, m.dup, m.mid) == (b"m1", True, first.mid)
    # Acknowledged now: a third connection gets nothing more.
    time.sleep(0.3)
    again.close()
    third = Subscriber(server, dev, cid, v5, manual_ack=False)
    assert third.connect() is True
    with pytest.raises(queue.Empty):
        third.messages.get(timeout=1.0)
    third.close()
    pub.close()


def test_messages_waiting_behind_receive_maximum_survive_the_disconnect(server, workdir):
    dev = Device(server, server.boto(), unique("rmax"), ALLOW_ALL, workdir)
    topic, cid = f"rmax/{dev.name}", unique("sub")
    sub = Subscriber(server, dev, cid, True, manual_ack=True, receive_max=1)
    sub.connect()
    sub.c.subscribe(topic, 1)
    sub.subacks.get(timeout=10)
    pub = publisher(server, dev)
    for payload in (b"m1", b"m2", b"m3"):
        pub.c.publish(topic, payload, qos=1).wait_for_publish(5)
    assert sub.messages.get(timeout=10).payload == b"m1"
    # Only one in flight: m2 and m3 wait on the server.
    with pytest.raises(queue.Empty):
        sub.messages.get(timeout=0.5)
    sub.close()

    again = Subscriber(server, dev, cid, True, manual_ack=False)
    assert again.connect() is True
    got = [again.messages.get(timeout=10) for _ in range(3)]
    assert [(m.payload, m.dup) for m in got] == [(b"m1", True), (b"m2", False), (b"m3", False)]
    again.close()
    pub.close()


def test_an_expired_session_is_not_resumed_before_the_sweep(server, workdir):
    dev = Device(server, server.boto(), unique("exp"), ALLOW_ALL, workdir)
    cid = unique("sub")
    sub = Subscriber(server, dev, cid, True, manual_ack=False, expiry=1)
    assert sub.connect() is False
    sub.close()
    # Control: within its expiry the session resumes.
    sub = Subscriber(server, dev, cid, True, manual_ack=False, expiry=1)
    assert sub.connect() is True
    sub.close()
    # The server sweeps every 5 s; 1.2 s after the disconnect the session has expired, and
    # most often no sweep has run yet (the broker's unit test pins this on a virtual clock).
    time.sleep(1.2)
    late = Subscriber(server, dev, cid, True, manual_ack=False, expiry=1)
    assert late.connect() is False
    late.close()


def test_a_delayed_will_is_cancelled_by_a_reconnection_that_has_ended_too(server, workdir):
    """[MQTT-3.1.3-9] a client that connects again within the Will Delay Interval cancels its
    will, even if that second connection has ended before the delay is over. Positive control:
    a device that does not come back has its will published after the delay."""
    delay = 3
    dev = Device(server, server.boto(), unique("dwc"), ALLOW_ALL, workdir)
    host = server.endpoint()
    watcher = Paho(server, host, dev, unique("watch"), v5=True)
    assert watcher.connect()[0] == 0
    assert watcher.subscribe(f"dwc/{dev.name}/#", qos=1)[0].value == 1

    back, gone = unique("back"), unique("gone")
    clients = [connect_with_delayed_will(server, dev, cid, f"dwc/{dev.name}/{cid}", delay) for cid in (back, gone)]
    for p in clients:
        p.drop()
    dropped = time.monotonic()
    time.sleep(0.5)
    again = Subscriber(server, dev, back, True, manual_ack=False, expiry=600)
    assert again.connect() is True
    again.close()  # a normal DISCONNECT, well before the delay is over
    topics = []
    wait_for(watcher.messages, lambda m: topics.append(m.topic) or m.topic.endswith(gone), delay + 5)
    assert f"dwc/{dev.name}/{gone}" in topics, f"control: the will did not come ({topics})"
    assert time.monotonic() - dropped >= delay - 0.5, "the will came before its delay"
    topics += [m.topic for m in drain_for(watcher.messages, 1.5)]
    assert f"dwc/{dev.name}/{back}" not in topics, "a will cancelled by a reconnection was published"
    watcher.close()


def test_a_shared_group_of_offline_persistent_members_queues_for_them(server, workdir):
    """AWS: QoS 1 messages for a shared group whose members are all offline are queued when a
    member has a persistent session. Two persistent members of one group go offline; 20 QoS 1
    messages are published; when both come back (session present), every message arrives
    exactly once in the group. Then with one member online and one offline, the online one
    gets every message (one copy per group, never queued for the absent member)."""
    dev = Device(server, server.boto(), unique("shq"), ALLOW_ALL, workdir)
    group, topic = f"$share/g/shq/{dev.name}", f"shq/{dev.name}"
    ids = [unique("m1"), unique("m2")]
    for cid in ids:
        m = Subscriber(server, dev, cid, True, manual_ack=False, expiry=600)
        assert m.connect() is False
        m.c.subscribe(group, 1)
        assert m.subacks.get(timeout=10)[0].value == 1
        m.close()
    pub = publisher(server, dev)
    for i in range(20):
        pub.c.publish(topic, str(i).encode(), qos=1).wait_for_publish(5)
    back = [Subscriber(server, dev, cid, True, manual_ack=False, expiry=600) for cid in ids]
    for m in back:
        assert m.connect() is True
    # The replay rate is off in the test server; a few seconds cover it anyway.
    got = [int(m.payload) for b in back for m in drain_for(b.messages, 3)]
    assert sorted(got) == list(range(20)), f"each queued message once in the group: {sorted(got)}"

    # One member online, the other offline: the online one gets them all.
    back[1].close()
    for i in range(20, 30):
        pub.c.publish(topic, str(i).encode(), qos=1).wait_for_publish(5)
    online = [int(m.payload) for m in drain_for(back[0].messages, 1.5)]
    assert sorted(online) == list(range(20, 30)), online
    again = Subscriber(server, dev, ids[1], True, manual_ack=False, expiry=600)
    assert again.connect() is True
    assert drain_for(again.messages, 1.0) == [], "nothing was queued for the absent member"
    for c in (back[0], again, pub):
        c.close()
