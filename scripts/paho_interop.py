#!/usr/bin/env python3
"""Runs the Eclipse Paho MQTT interoperability suites (eclipse/paho.mqtt.testing,
`interoperability/client_test.py` for 3.1.1 and `client_test5.py` for 5) against Sekisho.

The suites speak plain TCP without client certificates; Sekisho speaks only mutual TLS. A small
bridge in this script accepts the suites' plain connections and carries each over mutual TLS,
with a device certificate whose policy allows everything, to a Sekisho started for the run
(AWS's rate limits off: the suites reconnect faster than AWS allows).

    .venv/bin/python scripts/paho_interop.py /path/to/paho.mqtt.testing [Test.test_name ...]

Prints each suite's result and the failing tests; `docs/compatibility.md` records which fail
and why. Needs a debug build (`target/debug/sekisho`) and the test virtual environment.
"""

import re
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from conftest import ALLOW_ALL, Device, Server, unique  # noqa: E402


def bridge(listen, server, dev):
    """Accepts plain TCP on `listen` and pipes each connection over mutual TLS to Sekisho."""
    ctx = ssl.create_default_context(cafile=server.ca)
    ctx.load_cert_chain(str(dev.cert), str(dev.key))
    host = server.endpoint()

    def pipe(a):
        try:
            raw = socket.create_connection(("127.0.0.1", server.mqtt_port))
            b = ctx.wrap_socket(raw, server_hostname=host)
        except OSError:
            a.close()
            return
        socks = [a, b]
        try:
            while True:
                ready, _, _ = select.select(socks, [], [], 60)
                if not ready:
                    continue
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
                    # TLS may hold decrypted bytes that select() does not see.
                    while s is b and b.pending():
                        a.sendall(b.recv(b.pending()))
        except OSError:
            return
        finally:
            for s in socks:
                try:
                    s.close()
                except OSError:
                    pass

    while True:
        conn, _ = listen.accept()
        threading.Thread(target=pipe, args=(conn,), daemon=True).start()


def clear_retained(server):
    """Removes every retained message (iot-data ListRetainedMessages, then an empty retained
    publish). The suites clean up by subscribing to `#` and clearing what arrives retained, which
    finds nothing on AWS (no retained messages for wildcard filters): without this, one test's
    retained messages would be the next test's unexpected extra messages."""
    data = server.boto("iot-data")
    while True:
        topics = [t["topic"] for t in data.list_retained_messages().get("retainedTopics", [])]
        if not topics:
            return
        for t in topics:
            data.publish(topic=t, retain=True, payload=b"", qos=1)


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    paho = Path(sys.argv[1]) / "interoperability"
    work = Path(tempfile.mkdtemp(prefix="sekisho-paho-"))
    server = Server(work / "server").start()
    try:
        # Everything, except subscribing to the filter the suites expect a broker to refuse
        # (`test/nosubscribe`): an IoT policy says so.
        policy = {"Version": "2012-10-17", "Statement": [
            *ALLOW_ALL["Statement"],
            {"Effect": "Deny", "Action": "iot:Subscribe",
             "Resource": f"arn:aws:iot:us-east-1:{server.account_id()}:topicfilter/test/nosubscribe"}]}
        dev = Device(server, server.boto(), unique("paho"), policy, work)
        # The suites' own option parsing is fragile (`-h` reads as `--help`): they run with
        # their defaults, localhost:1883, where the bridge listens.
        listen = socket.socket()
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind(("127.0.0.1", 1883))
        listen.listen(64)
        port = listen.getsockname()[1]
        threading.Thread(target=bridge, args=(listen, server, dev), daemon=True).start()
        status = 0
        for suite in ("client_test.py", "client_test5.py"):
            # One test at a time, each with a deadline: a test that waits for something AWS
            # does not do (QoS 2 flows) would otherwise hold the whole suite.
            names = re.findall(r"^    def (test\w*)\(", (paho / suite).read_text(), re.M)
            only = [a for a in sys.argv[2:] if not a.startswith("-")]
            print(f"== {suite} through the TLS bridge on port {port}", flush=True)
            for name in names:
                if only and name not in only:
                    continue
                clear_retained(server)
                try:
                    cp = subprocess.run([sys.executable, suite, f"Test.{name}"], cwd=paho,
                                        capture_output=True, text=True, timeout=120)
                    out, verdict = cp.stdout + cp.stderr, "ok" if cp.returncode == 0 else "FAIL"
                except subprocess.TimeoutExpired as e:
                    out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                    verdict = "TIMEOUT"
                (work / f"{suite}.{name}.log").write_text(out)
                print(f"  {verdict:8} {name}", flush=True)
                status |= verdict != "ok"
        print(f"logs in {work}")
        return status
    finally:
        server.stop(check=False)


if __name__ == "__main__":
    sys.exit(main())
