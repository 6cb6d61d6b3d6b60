"""End-to-end fixtures: a real `sekisho serve` process on free loopback ports, and helpers that
drive it with clients nobody here wrote (AWS CLI, boto3, paho-mqtt, awsiotsdk, mosquitto)."""

import atexit
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SEKISHO_BIN", ROOT / "target" / "debug" / "sekisho"))

# What Rust's panic hook prints (`thread '...' panicked at src/...:`). A panic in a connection
# task does not stop the server, so a client may never notice it: every server's log is read
# after each test and when the server stops, and a panic fails the test.
PANIC = "panicked at"


def panic_excerpt(text, context=6):
    """The lines around each panic in `text`, or None when there is none."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()
    hits = [i for i, line in enumerate(lines) if PANIC in line]
    if not hits:
        return None
    out, last = [], -1
    for i in hits:
        lo, hi = max(i - 1, last + 1), min(i + context, len(lines))
        if lo > last + 1 and out:
            out.append("...")
        out.extend(lines[lo:hi])
        last = hi - 1
    return "\n".join(out)


def assert_no_panic(text, what="sekisho"):
    """Fails the test if `text` (a process's output) has a Rust panic in it."""
    excerpt = panic_excerpt(text or "")
    if excerpt is not None:
        pytest.fail(f"{what} panicked:\n{excerpt}", pytrace=False)


def _live_members(pgid):
    """Processes (not zombies) in process group `pgid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# Every Server started in this run, to check their logs after each test and to kill any left
# running when the run ends (they run in their own sessions, so a terminal's ^C does not reach them).
_SERVERS = []


def faketime(spec):
    """A command prefix that runs its command under libfaketime with `spec` (`+20m`, `+0 x100`):
    `env` preloading the library, not the `faketime` wrapper. The wrapper makes a named
    semaphore `/faketime_sem_<its pid>` that outlives it when its group is killed (SIGKILL), so a
    later wrapper given the same pid fails with "sem_open: File exists" (it did in CI)."""
    libs = [p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                        "/usr/lib/faketime/libfaketime.so.1") if os.path.exists(p)]
    assert libs, "libfaketime is not installed (scripts/install-test-deps.sh installs it)"
    return ("env", f"LD_PRELOAD={libs[0]}", f"FAKETIME={spec}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(data_dir):
    """The caller's environment with our AWS profile files, minus anything that overrides the
    profile's ca_bundle."""
    env = dict(os.environ)
    for k in ("AWS_CA_BUNDLE", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL"):
        env.pop(k, None)
    env["AWS_CONFIG_FILE"] = str(Path(data_dir) / "aws" / "config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(Path(data_dir) / "aws" / "credentials")
    return env


# Most tests connect, reconnect and publish faster than AWS's rate limits allow (AWS would
# throttle them too): their servers run without the limits. Tests of the limits themselves
# start a server with `throttles=True`, which keeps AWS's defaults.
NO_THROTTLES = {
    "publishes_per_connection": 0,
    "bytes_per_connection": 0,
    "connects_per_client_id": 0,
    "connects_per_account": 0,
    "subscriptions_per_account": 0,
    "publishes_per_account": 0,
    "replay_per_second": 0,
    "shared_replay_per_second": 0,
    "shadow_requests_per_thing": 0,
}


def with_limits(config, limits):
    """`config` (TOML text) with `limits` added to its `[limits]` table (made if absent)."""
    lines = [f"{k} = {v}" for k, v in limits.items()]
    text = config or ""
    if "\n[limits]\n" in "\n" + text:
        head, _, tail = ("\n" + text).partition("\n[limits]\n")
        return (head + "\n[limits]\n" + "\n".join(lines) + "\n" + tail).lstrip("\n")
    return text + ("\n" if text and not text.endswith("\n") else "") + "[limits]\n" + "\n".join(lines) + "\n"


class PortTaken(Exception):
    """The server could not bind a port chosen for it."""


class Server:
    def __init__(self, data_dir, config=None, accounts=(), throttles=False):
        """`config`: TOML text for --config; `accounts`: names created (with profiles) before
        the first start; `throttles`: keep AWS's rate limits (default: none, see NO_THROTTLES)."""
        if not throttles:
            config = with_limits(config, NO_THROTTLES)
        self.data_dir = Path(data_dir)
        self.mqtt_port = free_port()
        self.api_port = free_port()
        self.https_port = free_port()
        self.s3_port = free_port()
        self.proc = None
        self.log = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._checked = 0  # bytes of the log already searched for panics
        self.config = None
        if config is not None:
            self.config = self.data_dir.parent / f"{self.data_dir.name}.toml"
            self.config.write_text(config)
        for name in accounts:
            cp = subprocess.run([str(BIN), "account", "create", name, "--data-dir", str(self.data_dir)],
                                capture_output=True, text=True, timeout=30)
            assert cp.returncode == 0, cp.stderr
            assert_no_panic(cp.stderr, f"sekisho account create {name}")

    def start(self, wrapper=(), attempts=3):
        """`wrapper`: a command that runs the server (e.g. `faketime("+20m")`). The server (and its
        wrapper) run in a process group of their own, which `stop` ends whole. A port taken
        between `free_port` and the server's bind (by another process's ephemeral port) is not
        the server's fault: the ports are chosen again, up to `attempts` times."""
        for attempt in range(attempts):
            try:
                return self._start(wrapper)
            except PortTaken:
                if attempt == attempts - 1:
                    raise
                self.mqtt_port, self.api_port = free_port(), free_port()
                self.https_port, self.s3_port = free_port(), free_port()

    def _start(self, wrapper):
        seen = len(self.log_text())
        if self.log:
            self.log.close()
        self.log = open(self.log_path, "ab")
        extra = ["--config", str(self.config)] if self.config else []
        self.proc = subprocess.Popen(
            [*wrapper, str(BIN), "serve", "--data-dir", str(self.data_dir), "--mqtt-port", str(self.mqtt_port),
             "--api-port", str(self.api_port), "--https-port", str(self.https_port), "--s3-port", str(self.s3_port), *extra],
            stdout=self.log, stderr=self.log, env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
            start_new_session=True,
        )
        if self not in _SERVERS:
            _SERVERS.append(self)
        deadline = time.time() + 30
        ctx = ssl.create_default_context(cafile=None)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                if "Address already in use" in self.log_text()[seen:]:
                    raise PortTaken()
                raise AssertionError(f"sekisho exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.api_port), timeout=1) as s:
                    with ctx.wrap_socket(s, server_hostname="localhost") as t:
                        t.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                        if b"200 OK" in t.recv(1024):
                            return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"sekisho did not become healthy:\n{self.log_text()[-4000:]}")

    def stop(self, sig=signal.SIGTERM, check=True):
        """Sends `sig` to the server's whole process group (the server and any wrapper), waits for
        them to exit (SIGKILL after 10 s), and fails the test if the server's log shows a panic
        (`check=False`: don't look). Returns the exit code of the process started."""
        if self.proc:
            pgid = self.proc.pid  # start_new_session: the group's id is the leader's pid
            if self.proc.poll() is None or _live_members(pgid):
                _kill_group(pgid, sig)
            deadline = time.time() + 10
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            # A wrapper may exit before the server it started: wait for the whole group.
            while _live_members(pgid) and time.time() < deadline:
                time.sleep(0.05)
            if self.proc.poll() is None or _live_members(pgid):
                _kill_group(pgid, signal.SIGKILL)
                self.proc.wait()
                kill_deadline = time.time() + 5
                while _live_members(pgid) and time.time() < kill_deadline:
                    time.sleep(0.05)
        if self.log:
            self.log.close()
            self.log = None
        if check:
            self.check_panics()
        return self.proc.returncode if self.proc else None

    def log_text(self):
        """Everything the server has written (stdout and stderr, all its starts)."""
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def new_panics(self):
        """The panics written to the log since the last look (an excerpt), or None."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._checked)
                new = f.read()
        except FileNotFoundError:
            return None
        if not self.alive():
            end = len(new)
        else:  # a line still being written is read next time
            end = new.rfind(b"\n") + 1
        self._checked += end
        return panic_excerpt(new[:end].decode("utf-8", "replace"))

    def check_panics(self):
        """Fails the test if the log shows a panic written since the last check."""
        excerpt = self.new_panics()
        if excerpt is not None:
            pytest.fail(f"sekisho panicked (log: {self.log_path}):\n{excerpt}", pytrace=False)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def ca(self):
        return str(self.data_dir / "ca.pem")

    @property
    def env(self):
        return clean_env(self.data_dir)

    def aws(self, *args, profile="sekisho", check=True):
        """Runs the stock AWS CLI; returns parsed JSON output (or the CompletedProcess when check=False)."""
        cp = subprocess.run(["aws", "--profile", profile, "--output", "json", *args], env=self.env,
                            capture_output=True, text=True, timeout=60)
        if not check:
            return cp
        assert cp.returncode == 0, f"aws {' '.join(args)} failed: {cp.stderr}"
        return json.loads(cp.stdout) if cp.stdout.strip() else {}

    def boto(self, service="iot", profile="sekisho", **client_args):
        old = {k: os.environ.get(k) for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE")}
        try:
            os.environ.pop("AWS_CA_BUNDLE", None)
            os.environ["AWS_CONFIG_FILE"] = self.env["AWS_CONFIG_FILE"]
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = self.env["AWS_SHARED_CREDENTIALS_FILE"]
            return boto3.Session(profile_name=profile).client(service, **client_args)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def endpoint(self, profile="sekisho"):
        return self.boto(profile=profile).describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]

    def account_id(self, profile="sekisho"):
        arn = self.boto(profile=profile).create_thing(thingName="whoami")["thingArn"]
        return arn.split(":")[4]


@pytest.fixture(scope="session")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="sekisho-e2e-"))
    yield d
    if os.environ.get("SEKISHO_KEEP_TMP") is None:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def server(workdir):
    assert BIN.exists(), f"build sekisho first: {BIN}"
    s = Server(workdir / "shared").start()
    yield s
    s.stop()  # fails on a panic not yet reported


@pytest.fixture
def fresh_server(workdir):
    s = Server(workdir / f"fresh-{uuid.uuid4().hex[:8]}").start()
    yield s
    s.stop()  # fails on a panic


@pytest.fixture(autouse=True)
def _no_server_panics():
    """After each test, every server's log (shared, module-scoped and the test's own) is read for
    panics written during the test: a panic in a connection task leaves the server running, and
    the test that caused it fails."""
    yield
    reports = []
    for s in list(_SERVERS):
        try:
            s.check_panics()
        except pytest.fail.Exception as e:
            reports.append(str(e))
    if reports:
        pytest.fail("\n\n".join(reports), pytrace=False)


def _kill_leftover_servers():
    for s in list(_SERVERS):
        if s.proc is not None:
            pgid = s.proc.pid
            if s.proc.poll() is None or _live_members(pgid):
                _kill_group(pgid, signal.SIGKILL)
                try:
                    s.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass


atexit.register(_kill_leftover_servers)


def _strict():
    """SEKISHO_STRICT=1 (scripts/test.sh) or CI=true: a skipped test fails the run."""
    return any(os.environ.get(k, "").lower() not in ("", "0", "false", "no") for k in ("SEKISHO_STRICT", "CI"))


def _skip_reason(report):
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return f"{lr[0]}:{lr[1]}: {lr[2]}"
    return str(lr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _strict():
        report.outcome = "failed"
        report.longrepr = f"skipped, which fails the run when SEKISHO_STRICT or CI is set: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _strict():
        report.outcome = "failed"
        report.longrepr = f"skipped, which fails the run when SEKISHO_STRICT or CI is set: {_skip_reason(report)}"


def pytest_configure(config):
    # A CI job ended with SIGTERM: kill the servers (in sessions of their own) before dying of it.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def on_term(signum, frame):
            _kill_leftover_servers()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_term)


def pytest_sessionfinish(session, exitstatus):
    leftover = [s for s in _SERVERS if s.alive()]
    _kill_leftover_servers()
    if leftover:
        print(f"\nconftest: killed {len(leftover)} sekisho server(s) a test left running: "
              + ", ".join(str(s.data_dir) for s in leftover))
    for s in leftover:
        excerpt = s.new_panics()
        if excerpt is not None:
            print(f"\nconftest: sekisho panicked (log: {s.log_path}):\n{excerpt}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Device:
    """A thing with an ACTIVE certificate and an attached policy."""

    def __init__(self, server, iot, name, policy_doc, workdir, exclusive=False):
        self.name = name
        iot.create_thing(thingName=name)
        c = iot.create_keys_and_certificate(setAsActive=True)
        self.cert_arn, self.cert_id = c["certificateArn"], c["certificateId"]
        self.cert = workdir / f"{name}.crt"
        self.key = workdir / f"{name}.key"
        self.cert.write_text(c["certificatePem"])
        self.key.write_text(c["keyPair"]["PrivateKey"])
        self.key.chmod(0o600)
        if policy_doc is not None:
            self.policy = unique("pol")
            iot.create_policy(policyName=self.policy, policyDocument=json.dumps(policy_doc))
            iot.attach_policy(policyName=self.policy, target=self.cert_arn)
        kwargs = {"thingPrincipalType": "EXCLUSIVE_THING"} if exclusive else {}
        iot.attach_thing_principal(thingName=name, principal=self.cert_arn, **kwargs)


def thing_policy(account, region="us-east-1"):
    """The developer guide's policy: each device may use only its own client id and topic."""
    arn = f"arn:aws:iot:{region}:{account}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/${{iot:Connection.Thing.ThingName}}"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": f"{arn}:topic/topic/${{iot:Connection.Thing.ThingName}}"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": f"{arn}:topicfilter/topic/${{iot:Connection.Thing.ThingName}}"},
        ],
    }


ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}


class Paho:
    """A paho-mqtt client over mutual TLS that records what happens to it (over TLS without a
    client certificate if `device` is None: custom authentication, with `username` and
    `password`; over WebSocket with `ws_path` and `ws_headers` on the upgrade if `websocket`)."""

    def __init__(self, server, host, device, client_id, v5=False, clean=True, keepalive=60, will=None, port=None,
                 tls_version=None, alpn=None, username=None, password=None, websocket=False, ws_path="/mqtt",
                 ws_headers=None):
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kwargs = {} if v5 else {"clean_session": clean}
        if websocket:
            kwargs["transport"] = "websockets"
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kwargs)
        if websocket:
            self.c.ws_set_options(path=ws_path, headers=ws_headers)
        if username is not None or password is not None:
            self.c.username_pw_set(username, password)
        if tls_version is None and alpn is None and device is not None and not websocket:
            self.c.tls_set(ca_certs=server.ca, certfile=str(device.cert), keyfile=str(device.key))
        else:
            ctx = ssl.create_default_context(cafile=server.ca)
            if tls_version is not None:
                ctx.minimum_version = ctx.maximum_version = tls_version
            if alpn is not None:
                ctx.set_alpn_protocols(alpn)
            if device is not None:
                ctx.load_cert_chain(str(device.cert), str(device.key))
            self.c.tls_set_context(ctx)
        self.messages = queue.Queue()
        self.connack = queue.Queue()
        self.disconnects = queue.Queue()
        self.subacks = queue.Queue()
        self.pubacks = queue.Queue()
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p=None: self.connack.put((rc, f, p))
        self.c.on_disconnect = lambda c, u, f, rc, p=None: self.disconnects.put(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self.subacks.put(rcs)
        self.c.on_publish = lambda c, u, mid, rc, p=None: self.pubacks.put((mid, rc))
        if will:
            self.c.will_set(*will)
        self.v5 = v5
        self.host, self.port, self.keepalive, self.clean = host, port or server.mqtt_port, keepalive, clean

    def connect(self, timeout=10, properties=None):
        if self.v5:
            self.c.connect(self.host, self.port, keepalive=self.keepalive, clean_start=self.clean, properties=properties)
        else:
            self.c.connect(self.host, self.port, keepalive=self.keepalive)
        self.c.loop_start()
        rc, flags, props = self.connack.get(timeout=timeout)
        return rc, flags, props

    def subscribe(self, topic, qos=0, timeout=10):
        self.c.subscribe(topic, qos)
        return self.subacks.get(timeout=timeout)

    def close(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()

    def drop(self):
        """Closes the TCP connection without DISCONNECT (as a device that loses its network)."""
        self.c.loop_stop()
        self.c.socket().close()


def connect_with_delayed_will(server, dev, client_id, topic, delay, session_expiry=600):
    """An MQTT 5 client connected with a persistent session and a QoS 1 will on `topic` delayed
    `delay` seconds (`.drop()` it to leave the will pending)."""
    wp = Properties(PacketTypes.WILLMESSAGE)
    wp.WillDelayInterval = delay
    cp = Properties(PacketTypes.CONNECT)
    cp.SessionExpiryInterval = session_expiry
    p = Paho(server, server.endpoint(), dev, client_id, v5=True, clean=False, will=(topic, b"gone", 1, False, wp))
    assert p.connect(properties=cp)[0] == 0
    return p


class Openssl:
    """Certificates made with the openssl command line, as a factory's own CA (Easy-RSA) makes them."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def run(self, *args):
        cp = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, f"openssl {' '.join(args)}: {cp.stderr}"

    def ca(self, name, cn=None):
        """A self-signed CA: returns (cert path, key path)."""
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        self.run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                 "-days", "365", "-subj", f"/O=Factory/CN={cn or name}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return cert, key

    def leaf(self, name, cn, ca, ca_key=None, days=30):
        """A certificate for `cn` signed by `ca` (a (cert, key) pair): returns (cert path, key path)."""
        cert, key, csr = self.dir / f"{name}.pem", self.dir / f"{name}.key", self.dir / f"{name}.csr"
        self.run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={cn}")
        ca_cert, ca_key = ca
        self.run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-out", str(cert), "-days", str(days), "-sha256")
        key.chmod(0o600)
        return cert, key


class FileDevice:
    """Certificate and key files, for `Paho`."""

    def __init__(self, cert, key):
        self.cert, self.key = cert, key
