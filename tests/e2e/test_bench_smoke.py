"""A short pass of the load tool against a test server, so that it cannot rot. Not a benchmark:
it asserts that the tool provisions, connects, publishes and counts correctly."""

import json
import subprocess

from conftest import BIN, assert_no_panic

BENCH = BIN.parent / "sekisho-bench"


def run(*args, timeout=120):
    cp = subprocess.run([str(BENCH), *args], capture_output=True, text=True, timeout=timeout)
    assert cp.returncode == 0, cp.stderr
    assert_no_panic(cp.stderr, f"sekisho-bench {args[0]}")
    return json.loads(cp.stdout.strip().splitlines()[-1])


def test_load_tool_smoke(server, workdir):
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    policy = workdir / "bench-policy.json"
    policy.write_text(json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/${{iot:Connection.Thing.ThingName}}"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/bench/${{iot:Connection.Thing.ThingName}}"},
        {"Effect": "Allow", "Action": ["iot:Subscribe"], "Resource": f"{arn}:topicfilter/bench/*"},
        {"Effect": "Allow", "Action": ["iot:Receive"], "Resource": f"{arn}:topic/bench/*"}]}))
    certs = workdir / "bench-certs"
    r = run("provision", "--data-dir", str(server.data_dir), "--api", f"127.0.0.1:{server.api_port}",
            "--out", str(certs), "--count", "4", "--policy", str(policy))
    assert r["provisioned"] == 4
    common = ["--addr", f"127.0.0.1:{server.mqtt_port}", "--host", "localhost", "--ca", server.ca, "--certs", str(certs)]
    r = run("conn", *common, "--count", "4", "--hold", "0", "--broker-pid", str(server.proc.pid))
    assert r["connected"] == 4 and r["failures"] == {}
    for mqtt in ("4", "5"):
        # Clean sessions, then subscribers with persistent sessions (stored before PUBACK).
        for persistent in ([], ["--persistent"]):
            r = run("pubsub", *common, "--mqtt", mqtt, "--publishers", "2", "--subscribers", "2", "--qos", "1",
                    "--duration", "1", "--rate", "200", *persistent)
            assert r["delivered"] > 0 and r["lost"] == 0, (persistent, r)
