#!/usr/bin/env python3
"""Device Shadow throughput and broker CPU per update, through MQTT and through HTTPS.

    SEKISHO_BIN=target/release/sekisho .venv/bin/python bench/shadow.py [seconds]

A fresh server (AWS's rate limits off, so the per-thing 20/s does not bound the run); MQTT:
4 paho connections, each publishing QoS 1 updates (`{"state":{"reported":{"n":i}}}`, ~40 B)
round robin over 256 things with up to 100 unanswered, counting `/update/accepted` answers;
HTTPS: 4 keep-alive connections with the device's certificate, UpdateThingShadow in a loop.
Prints updates/s and the server's CPU per update (user+system, /proc).
Every update is committed (synced) before it is answered; commits are grouped."""

import http.client
import json
import os
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
os.environ.pop("AWS_CA_BUNDLE", None)
from conftest import ALLOW_ALL, Device, Paho, Server, unique  # noqa: E402

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 10
THINGS = 256  # a multiple of the 4 clients: each thing belongs to one


def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mqtt(s, dev):
    done = [0]
    lock = threading.Lock()
    clients = []
    for i in range(4):
        p = Paho(s, s.endpoint(), dev, f"{dev.name}-{i}")
        assert p.connect()[0] == 0
        p.subscribe("$aws/things/+/shadow/update/accepted", qos=1)
        sem = threading.Semaphore(100)

        def on_message(c, u, m, sem=sem, k=i):
            # Every client hears every answer (one wildcard); each counts its own things'.
            if int(m.topic.split("/")[2].rsplit("-", 1)[1]) % 4 != k:
                return
            with lock:
                done[0] += 1
            sem.release()
        p.c.on_message = on_message
        clients.append((p, sem))
    stop = time.time() + SECONDS
    start_cpu, start = cpu(s.proc.pid), time.time()

    def pump(p, sem, k):
        i = 0
        while time.time() < stop:
            sem.acquire()
            p.c.publish(f"$aws/things/shadow-bench-{(i * 4 + k) % THINGS}/shadow/update",
                        json.dumps({"state": {"reported": {"n": i}}}), qos=1)
            i += 1
    threads = [threading.Thread(target=pump, args=(p, sem, k)) for k, (p, sem) in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.5)
    elapsed, used = time.time() - start, cpu(s.proc.pid) - start_cpu
    for p, _ in clients:
        p.close()
    return done[0] / elapsed, used / done[0] * 1000


def https(s, dev):
    ctx = ssl.create_default_context(cafile=s.ca)
    ctx.load_cert_chain(str(dev.cert), str(dev.key))
    done = [0]
    lock = threading.Lock()
    stop = time.time() + SECONDS
    start_cpu, start = cpu(s.proc.pid), time.time()

    def worker(k):
        c = http.client.HTTPSConnection(s.endpoint(), s.https_port, context=ctx)
        i = 0
        while time.time() < stop:
            c.request("POST", f"/things/shadow-http-{(i * 4 + k) % THINGS}/shadow",
                      body=json.dumps({"state": {"reported": {"n": i}}}))
            r = c.getresponse()
            r.read()
            assert r.status == 200, r.status
            with lock:
                done[0] += 1
            i += 1
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, used = time.time() - start, cpu(s.proc.pid) - start_cpu
    return done[0] / elapsed, used / done[0] * 1000


def main():
    work = Path(tempfile.mkdtemp(prefix="sekisho-shadow-bench-"))
    s = Server(work / "srv").start()
    try:
        dev = Device(s, s.boto(), unique("bench"), ALLOW_ALL, work)
        for name, run in (("MQTT", mqtt), ("HTTPS", https)):
            rate, cpu_per_k = run(s, dev)
            print(f"{name}: {rate:,.0f} shadow updates/s, {cpu_per_k * 1000:.0f} µs server CPU per update")
    finally:
        s.stop()


if __name__ == "__main__":
    main()
