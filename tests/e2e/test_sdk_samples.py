"""The AWS IoT Device SDKs' own samples, unchanged, against Sekisho: the sample sets that ship in
the packages' registries, so CI can run them (the current major versions' samples live only on
GitHub; scripts/run-sdk-samples.py runs those by hand).

- AWS IoT Device SDK for Python v1 (`AWSIoTPythonSDK`, its source distribution's `samples/`,
  unpacked by scripts/install-test-deps.sh): basicShadow's updater and delta listener,
  ThingShadowEcho, and jobsSample, over MQTT with a certificate, over WebSocket signed with
  SigV4 from the environment's credentials, and on port 443, where the SDK turns on ALPN
  `x-amzn-mqtt-ca` by itself.
- AWS IoT Device SDK for JavaScript v1 (`aws-iot-device-sdk` on npm, its `examples/`):
  thing-example's device and mobile app, and jobs-example.

Only what the samples leave to the user changes: endpoint, port, CA, credentials, thing name."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ALLOW_ALL, Device, Server, unique

PY_SAMPLES = Path(sys.prefix) / "sdk-samples" / "awsiotpythonsdk-1.6.2" / "samples"
JS_EXAMPLES = Path(__file__).resolve().parent / "node" / "node_modules" / "aws-iot-device-sdk" / "examples"


@pytest.fixture(scope="module")
def srv(workdir):
    s = Server(workdir / "sdk-samples").start()
    yield s
    s.stop()


class Sample:
    """A sample run in its own process group, its output collected in a file."""

    def __init__(self, argv, env, out: Path):
        # What the sample prints and what its SDK logs, apart (interleaved, a log line can cut
        # into a printed one).
        self.out, self.err = out, out.with_suffix(".log")
        self.log, self.errlog = open(self.out, "w"), open(self.err, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.errlog, env=env, text=True,
                                     start_new_session=True)

    def printed(self):
        return self.out.read_text()

    def text(self):
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, needle, timeout=30, count=1):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.text().count(needle) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} (x{count}) not seen:\n{self.text()[-4000:]}")

    def wait(self, timeout=60):
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.stop()
        return rc

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()
        self.errlog.close()


def py_sample(s, name, args, out, env_extra=None):
    assert PY_SAMPLES.is_dir(), f"run scripts/install-test-deps.sh: {PY_SAMPLES}"
    env = {**s.env, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return Sample([sys.executable, str(PY_SAMPLES / name), *args], env, out)


def py_auth(s, dev, port=None):
    return ["-e", s.endpoint(), "-r", s.ca, "-c", str(dev.cert), "-k", str(dev.key), "-p", str(port or s.mqtt_port)]


def shadow_pair(s, workdir, thing, updater_auth, listener_auth, env_extra=None, tag=""):
    """basicShadowDeltaListener reports what basicShadowUpdater desires, through the deltas."""
    listener = py_sample(s, "basicShadow/basicShadowDeltaListener.py",
                         [*listener_auth, "-n", thing, "-id", f"listener{tag}"], workdir / f"listener{tag}.out", env_extra)
    try:
        listener.wait_for("Adding a new subscription record: $aws/things/" + thing + "/shadow/update/delta", timeout=30)
        updater = py_sample(s, "basicShadow/basicShadowUpdater.py",
                            [*updater_auth, "-n", thing, "-id", f"updater{tag}"], workdir / f"updater{tag}.out",
                            env_extra)
        try:
            updater.wait_for("accepted!", count=3, timeout=40)
            listener.wait_for("++++++++DELTA++++++++++", count=2, timeout=30)
        finally:
            updater.stop()
    finally:
        listener.stop()
    return updater.printed(), listener.printed()


def test_python_v1_shadow_samples_with_certificates(srv, workdir):
    """basicShadowUpdater deletes the shadow, then desires property=0,1,2,... once a second;
    basicShadowDeltaListener, subscribed to the deltas, reports each value back."""
    iot = srv.boto()
    thing = unique("Bot")
    dev = Device(srv, iot, thing, ALLOW_ALL, workdir)
    up, lis = shadow_pair(srv, workdir, thing, py_auth(srv, dev), py_auth(srv, dev), tag="-cert")
    check_shadow_pair(srv.boto("iot-data"), thing, up, lis)


def check_shadow_pair(data, thing, up, lis):
    assert "Traceback" not in up + lis
    # The updater starts by deleting the shadow, which does not exist yet: rejected (404), as on
    # AWS. No update is rejected, and nothing times out.
    assert re.search(r"Delete request \S+ rejected!", up), up[-3000:]
    assert not re.search(r"Update request \S+ rejected!", up) and "time out!" not in up, up[-3000:]
    # Each desired value reached the listener as a delta, in order, with the shadow's version.
    desired = [int(x) for x in re.findall(r"accepted!\nproperty: (\d+)", up)]
    deltas = [(int(p), int(v)) for p, v in re.findall(r"DELTA\+*\nproperty: (\d+)\nversion: (\d+)", lis)]
    assert desired[:3] == [0, 1, 2], up[-2000:]
    assert [p for p, _ in deltas] == desired[:len(deltas)], lis[-2000:]
    assert [v for _, v in deltas] == list(range(deltas[0][1], deltas[0][1] + len(deltas)))
    doc = json.loads(data.get_thing_shadow(thingName=thing)["payload"].read())
    assert doc["state"]["desired"]["property"] == desired[-1]
    assert doc["state"]["delta"]["property"] == desired[-1]


def test_python_v1_shadow_samples_over_websocket_with_sigv4(workdir):
    """The same samples with `-w`: MQTT over WebSocket, signed with the IAM user's keys from the
    environment, held to the user's IAM policy (only this thing's shadow topics). This SDK
    refuses a WebSocket endpoint whose name does not match `*.iot.<region>.amazonaws.*` (it
    reads the signing region from it), so this server's domain is `amazonaws.localhost`."""
    srv = Server(workdir / "sdk-samples-wss", config='domain = "amazonaws.localhost"\n').start()
    try:
        websocket_pair(srv, workdir)
    finally:
        srv.stop()


def websocket_pair(srv, workdir):
    iot = srv.boto()
    assert srv.endpoint().endswith("-ats.iot.us-east-1.amazonaws.localhost")
    iam = srv.boto("iam")
    acct = srv.account_id()
    thing = unique("Bot")
    iot.create_thing(thingName=thing)
    arn = f"arn:aws:iot:us-east-1:{acct}"
    user = unique("ws-user")
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="shadow", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/*"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": f"{arn}:topic/$aws/things/{thing}/shadow/*"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": f"{arn}:topicfilter/$aws/things/{thing}/shadow/*"}]}))
    k = iam.create_access_key(UserName=user)["AccessKey"]
    env = {"AWS_ACCESS_KEY_ID": k["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": k["SecretAccessKey"],
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_PROFILE": ""}
    ws = ["-e", srv.endpoint(), "-r", srv.ca, "-w", "-p", str(srv.https_port)]
    up, lis = shadow_pair(srv, workdir, thing, ws, ws, env_extra=env, tag="-ws")
    check_shadow_pair(srv.boto("iot-data"), thing, up, lis)
    # Denied: the same sample for a thing outside the user's policy gets nothing accepted.
    other = unique("Bot")
    iot.create_thing(thingName=other)
    denied = py_sample(srv, "basicShadow/basicShadowUpdater.py", [*ws, "-n", other, "-id", "updater-denied"],
                       workdir / "updater-denied.out", env)
    assert denied.wait(30) != 0
    # The broker refused its first subscription (SUBACK 0x80); the sample gives up there.
    assert "AWSIoTExceptions.subackError" in denied.text()
    assert "accepted!" not in denied.text()


def test_python_v1_thing_shadow_echo(srv, workdir):
    """ThingShadowEcho answers every delta by reporting it: after an update of desired state
    through iot-data, reported catches up and the delta is gone."""
    iot = srv.boto()
    thing = unique("Echo")
    dev = Device(srv, iot, thing, ALLOW_ALL, workdir)
    echo = py_sample(srv, "ThingShadowEcho/ThingShadowEcho.py", [*py_auth(srv, dev), "-n", thing, "-id", thing],
                     workdir / "echo.out")
    data = srv.boto("iot-data")
    try:
        time.sleep(3)  # connected and subscribed to the deltas
        data.update_thing_shadow(thingName=thing, payload=json.dumps({"state": {"desired": {"led": "on", "n": 7}}}))
        echo.wait_for("Received a delta message", timeout=20)
        deadline = time.time() + 20
        while time.time() < deadline:
            doc = json.loads(data.get_thing_shadow(thingName=thing)["payload"].read())
            if doc["state"].get("reported") == {"led": "on", "n": 7}:
                break
            time.sleep(0.3)
        assert doc["state"].get("reported") == {"led": "on", "n": 7}, doc
        assert "delta" not in doc["state"]
    finally:
        echo.stop()


def _job(iot, thing_arn, job_id, doc):
    iot.create_job(jobId=job_id, targets=[thing_arn], document=json.dumps(doc))


def test_python_v1_jobs_sample(srv, workdir):
    """jobsSample starts the next job, reports SUCCEEDED with statusDetails, repeats until none is
    left, and prints its counts; the control plane shows each execution SUCCEEDED."""
    iot = srv.boto()
    thing = unique("jobs-py")
    dev = Device(srv, iot, thing, ALLOW_ALL, workdir)
    arn = iot.describe_thing(thingName=thing)["thingArn"]
    jobs = [unique("pyjob") for _ in range(3)]
    for j in jobs:
        _job(iot, arn, j, {"operation": "update", "n": j})
    run = py_sample(srv, "jobs/jobsSample.py", [*py_auth(srv, dev), "-n", thing, "-id", thing], workdir / "jobs.out")
    assert run.wait(90) == 0, run.text()[-4000:]
    out = run.printed()
    stats = json.loads(out.split("Stats: ", 1)[1].splitlines()[0])
    assert stats == {"jobsStarted": 3, "jobsSucceeded": 3, "jobsRejected": 0}, out[-3000:]
    for j in jobs:
        ex = iot.describe_job_execution(jobId=j, thingName=thing)["execution"]
        assert ex["status"] == "SUCCEEDED"
        assert ex["statusDetails"]["detailsMap"]["HandledBy"] == f"ClientToken: {thing}"


def test_python_v1_samples_on_port_443_with_alpn(workdir):
    """On port 443 the v1 SDK offers ALPN `x-amzn-mqtt-ca` by itself (no option for it): the
    device HTTPS listener on 443 takes it as MQTT. Skipped where 443 cannot be bound."""
    s = Server(workdir / "sdk-samples-443")
    s.https_port = 443
    try:
        s.start(attempts=1)
    except Exception as e:  # noqa: BLE001 - not root, or 443 in use
        pytest.skip(f"cannot serve on port 443 here: {str(e).splitlines()[0]}")
    try:
        iot = s.boto()
        thing = unique("jobs-443")
        dev = Device(s, iot, thing, ALLOW_ALL, workdir)
        _job(iot, iot.describe_thing(thingName=thing)["thingArn"], unique("j443"), {"operation": "x"})
        run = py_sample(s, "jobs/jobsSample.py", [*py_auth(s, dev, port=443), "-n", thing, "-id", thing],
                        workdir / "jobs443.out")
        assert run.wait(60) == 0, run.text()[-4000:]
        assert "Configuring alpn protocols" in run.text()
        assert '"jobsSucceeded": 1' in run.printed(), run.text()[-3000:]
    finally:
        s.stop()


def js_example(s, name, args, out):
    assert JS_EXAMPLES.is_dir(), f"run scripts/install-test-deps.sh: {JS_EXAMPLES}"
    return Sample(["node", str(JS_EXAMPLES / name), *args], {**s.env}, out)


def js_auth(s, dev, client_id):
    return ["-H", s.endpoint(), "-p", str(s.mqtt_port), "-a", s.ca, "-c", str(dev.cert), "-k", str(dev.key),
            "-i", client_id]


def test_javascript_v1_thing_example(srv, workdir):
    """thing-example's device (test mode 2) updates the RGBLedLamp shadow with random colours;
    its mobile app (test mode 1) registers the same shadow and prints the deltas."""
    iot = srv.boto()
    dev = Device(srv, iot, "RGBLedLamp", ALLOW_ALL, workdir)
    app = js_example(srv, "thing-example.js", [*js_auth(srv, dev, "lamp-app"), "-t", "1"], workdir / "app.out")
    try:
        app.wait_for("Mobile thing registered.", timeout=30)
        device = js_example(srv, "thing-example.js", [*js_auth(srv, dev, "lamp-device"), "-t", "2"],
                            workdir / "lamp.out")
        try:
            device.wait_for("got 'accepted' status on: RGBLedLamp", timeout=30)
            app.wait_for("delta on: RGBLedLamp", timeout=30)
        finally:
            device.stop()
    finally:
        app.stop()
    assert "timeout on" not in device.text() + app.text()
    delta = json.loads(app.printed().split("delta on: RGBLedLamp", 1)[1].splitlines()[0])
    doc = json.loads(srv.boto("iot-data").get_thing_shadow(thingName="RGBLedLamp")["payload"].read())
    assert set(delta["state"]) == {"red", "green", "blue"}
    assert set(doc["state"]["desired"]) == {"red", "green", "blue"}


def test_javascript_v1_jobs_example(srv, workdir):
    """jobs-example runs `customJob` documents (IN_PROGRESS, then SUCCEEDED) and fails the rest;
    both outcomes reach the control plane with the example's status details."""
    iot = srv.boto()
    thing = unique("jobs-js")
    dev = Device(srv, iot, thing, ALLOW_ALL, workdir)
    arn = iot.describe_thing(thingName=thing)["thingArn"]
    ok, other = unique("custom"), unique("other")
    _job(iot, arn, ok, {"operation": "customJob"})
    _job(iot, arn, other, {"operation": "reboot"})
    run = js_example(srv, "jobs-example.js", [*js_auth(srv, dev, thing), "-T", thing], workdir / "jobsjs.out")
    try:
        run.wait_for("startJobNotifications completed", timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline:
            st = {j: iot.describe_job_execution(jobId=j, thingName=thing)["execution"] for j in (ok, other)}
            if st[ok]["status"] == "SUCCEEDED" and st[other]["status"] == "FAILED":
                break
            time.sleep(0.5)
    finally:
        run.stop()
    assert st[ok]["status"] == "SUCCEEDED", (st, run.text()[-3000:])
    assert st[ok]["statusDetails"]["detailsMap"] == {"operation": "customJob", "step": "finished all steps"}
    assert st[other]["status"] == "FAILED"
    assert st[other]["statusDetails"]["detailsMap"] == {"operation": "reboot", "errorCondition": "not yet implemented"}
