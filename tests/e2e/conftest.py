"""End-to-end fixtures: a real `sekisho serve` process on free loopback ports, and helpers that
drive it with clients nobody here wrote (AWS CLI, boto3, paho-mqtt, awsiotsdk, mosquitto)."""

import json
import os
import queue
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

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SEKISHO_BIN", ROOT / "target" / "debug" / "sekisho"))


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


class Server:
    def __init__(self, data_dir, config=None, accounts=()):
        """`config`: TOML text for --config; `accounts`: names created (with profiles) before
        the first start."""
        self.data_dir = Path(data_dir)
        self.mqtt_port = free_port()
        self.api_port = free_port()
        self.https_port = free_port()
        self.s3_port = free_port()
        self.proc = None
        self.log = None
        self.config = None
        if config is not None:
            self.config = self.data_dir.parent / f"{self.data_dir.name}.toml"
            self.config.write_text(config)
        for name in accounts:
            cp = subprocess.run([str(BIN), "account", "create", name, "--data-dir", str(self.data_dir)],
                                capture_output=True, text=True, timeout=30)
            assert cp.returncode == 0, cp.stderr

    def start(self, wrapper=()):
        """`wrapper`: a command that runs the server (e.g. `faketime -f +20m`)."""
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        extra = ["--config", str(self.config)] if self.config else []
        self.proc = subprocess.Popen(
            [*wrapper, str(BIN), "serve", "--data-dir", str(self.data_dir), "--mqtt-port", str(self.mqtt_port),
             "--api-port", str(self.api_port), "--https-port", str(self.https_port), "--s3-port", str(self.s3_port), *extra],
            stdout=self.log, stderr=self.log, env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        )
        deadline = time.time() + 30
        ctx = ssl.create_default_context(cafile=None)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        while time.time() < deadline:
            assert self.proc.poll() is None, f"sekisho exited with {self.proc.returncode}"
            try:
                with socket.create_connection(("127.0.0.1", self.api_port), timeout=1) as s:
                    with ctx.wrap_socket(s, server_hostname="localhost") as t:
                        t.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                        if b"200 OK" in t.recv(1024):
                            return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("sekisho did not become healthy")

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
        return self.proc.returncode if self.proc else None

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

    def boto(self, service="iot", profile="sekisho"):
        old = {k: os.environ.get(k) for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE")}
        try:
            os.environ.pop("AWS_CA_BUNDLE", None)
            os.environ["AWS_CONFIG_FILE"] = self.env["AWS_CONFIG_FILE"]
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = self.env["AWS_SHARED_CREDENTIALS_FILE"]
            return boto3.Session(profile_name=profile).client(service)
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
    s.stop()


@pytest.fixture
def fresh_server(workdir):
    s = Server(workdir / f"fresh-{uuid.uuid4().hex[:8]}").start()
    yield s
    s.stop()


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
    """A paho-mqtt client over mutual TLS that records what happens to it."""

    def __init__(self, server, host, device, client_id, v5=False, clean=True, keepalive=60, will=None, port=None,
                 tls_version=None):
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kwargs = {} if v5 else {"clean_session": clean}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kwargs)
        if tls_version is None:
            self.c.tls_set(ca_certs=server.ca, certfile=str(device.cert), keyfile=str(device.key))
        else:
            ctx = ssl.create_default_context(cafile=server.ca)
            ctx.minimum_version = ctx.maximum_version = tls_version
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
