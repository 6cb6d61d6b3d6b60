#!/usr/bin/env python3
"""Custom-authorizer connects per second and what a function invocation adds to a CONNECT,
against X.509 connects in the same run.

    SEKISHO_BIN=target/release/sekisho .venv/bin/python bench/authorizers.py [connections]

Needs a release build of `sekisho-bench` (and its `sekisho-authorizer-bootstrap`):
`cargo build --release -p sekisho -p sekisho-bench`.

A fresh server (AWS's rate limits off; `[functions]` on, 10 instances per function as by
default) gets three ways in for the same `connections` devices, `dev-<i>`:
- X.509: a certificate each (`sekisho-bench provision`), MQTT over mutual TLS;
- `py`: an unsigned custom authorizer on a Python Lambda handler run by `awslambdaric`;
- `rs`: the same decision compiled, a `provided.al2023` function whose `bootstrap` is
  `sekisho-authorizer-bootstrap` (Rust, std and serde_json).
The custom-authorizer devices connect as the AWS IoT Device SDKs do on port 443: TLS without a
client certificate, ALPN `mqtt`, username `dev-<i>?x-amz-customauthorizer-name=<authorizer>`,
password `pw-dev-<i>`; every CONNECT invokes the function once (nothing is cached between
connections). Each is measured twice, in turn: a storm (`connections`, 8 handshakes in flight,
fewer than the function's 10 instances) for connects/s and CPU per connect (the server and
every process under it, function instances included, from /proc), and one connection at a
time (200) for the CONNACK latency, whose difference from X.509's is what the invocation adds.
Prints a Markdown table; the raw JSON goes to bench/results/<time>-authorizers/."""

import io
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
os.environ.pop("AWS_CA_BUNDLE", None)
from conftest import Server  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
BENCH, BOOTSTRAP = TARGET / "sekisho-bench", TARGET / "sekisho-authorizer-bootstrap"

HANDLER = '''
import base64, json

def handler(event, context):
    mqtt = event.get("protocolData", {}).get("mqtt", {})
    user = mqtt.get("username", "").split("?", 1)[0]
    n = user[4:] if user.startswith("dev-") else ""
    if not (n.isascii() and n.isdigit()
            and mqtt.get("password") == base64.b64encode(("pw-" + user).encode()).decode()):
        return {"isAuthenticated": False}
    res = "arn:aws:iot:us-east-1:" + context.invoked_function_arn.split(":")[4]
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": res + ":client/" + user},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": res + ":topic/bench/" + user},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": res + ":topicfilter/bench/" + user}]}
    return {"isAuthenticated": True, "principalId": "dev" + n, "refreshAfterInSeconds": 300,
            "disconnectAfterInSeconds": 3600, "policyDocuments": [json.dumps(policy)]}
'''


def zip_of(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buf.getvalue()


def tree_cpu(pid):
    """CPU seconds (user + system) of `pid` and every live process under it."""
    tick = os.sysconf("SC_CLK_TCK")
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(f[1]), []).append((int(p), (int(f[11]) + int(f[12])) / tick))
    total, todo = 0.0, [pid]
    own = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    total += (int(own[11]) + int(own[12])) / tick
    while todo:
        for child, secs in children.get(todo.pop(), []):
            total += secs
            todo.append(child)
    return total


def conn(s, way, count, concurrency, host):
    args = [str(BENCH), "conn", "--ca", s.ca, "--count", str(count), "--concurrency", str(concurrency),
            "--hold", "0"]
    if way == "x509":
        args += ["--addr", f"127.0.0.1:{s.mqtt_port}", "--host", "localhost", "--certs", str(s.certs)]
    else:
        args += ["--addr", f"127.0.0.1:{s.https_port}", "--host", host, "--custom-auth", way]
    before = tree_cpu(s.proc.pid)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    r["server_cpu_ms_per_connect"] = (tree_cpu(s.proc.pid) - before) * 1000 / max(r["connected"], 1)
    return r


def main():
    for b in (BENCH, BOOTSTRAP):
        if not b.exists():
            sys.exit(f"{b} is missing: cargo build --release -p sekisho -p sekisho-bench")
    work = Path(tempfile.mkdtemp(prefix="sekisho-authz-bench-"))
    s = Server(work / "srv", config=f'[functions]\nenabled = true\npython = "{sys.executable}"\n')
    s.start()
    results = {}
    try:
        policy = work / "policy.json"
        policy.write_text(json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}))
        s.certs = work / "certs"
        subprocess.run([str(BENCH), "provision", "--data-dir", str(s.data_dir), "--api", f"127.0.0.1:{s.api_port}",
                        "--out", str(s.certs), "--count", str(N), "--policy", str(policy)],
                       check=True, capture_output=True)
        iam, lam, iot = s.boto("iam"), s.boto("lambda"), s.boto()
        role = iam.create_role(RoleName="bench-authz", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                    "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
        for way, runtime, handler, code in (
                ("py", "python3.12", "app.handler", {"app.py": (HANDLER, 0o644)}),
                ("rs", "provided.al2023", "bootstrap", {"bootstrap": (BOOTSTRAP.read_bytes(), 0o755)})):
            fn = lam.create_function(FunctionName=f"authz-{way}", Runtime=runtime, Role=role, Handler=handler,
                                     Code={"ZipFile": zip_of(code)}, Timeout=5)["FunctionArn"]
            arn = iot.create_authorizer(authorizerName=way, authorizerFunctionArn=fn, signingDisabled=True,
                                        status="ACTIVE")["authorizerArn"]
            lam.add_permission(FunctionName=f"authz-{way}", StatementId="iot", Action="lambda:InvokeFunction",
                               Principal="iot.amazonaws.com", SourceArn=arn)
        host = s.endpoint()
        # Warm: the functions' instances started, the server's code paths paged in.
        for way in ("x509", "py", "rs"):
            r = conn(s, way, 100, 8, host)
            assert r["connected"] == 100, (way, r)
        for rnd in (1, 2):
            for way in ("x509", "py", "rs"):
                results[f"{way} storm {rnd}"] = conn(s, way, N, 8, host)
                results[f"{way} serial {rnd}"] = conn(s, way, 200, 1, host)
    finally:
        s.stop()
    out_dir = ROOT / "bench" / "results" / (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-authorizers")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{N} connections; raw JSON in {out_dir.relative_to(ROOT)}\n")
    print("| way in | run | connects/s (8 in flight) | server CPU ms per connect (functions included) "
          "| failed | CONNACK p50 ms, one at a time | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {"x509": "X.509 (mutual TLS)", "py": "custom authorizer, Python function",
             "rs": "custom authorizer, compiled (`provided`) function"}
    for way in ("x509", "py", "rs"):
        for rnd in (1, 2):
            st, se = results[f"{way} storm {rnd}"], results[f"{way} serial {rnd}"]
            failed = sum(st["failures"].values()) + sum(se["failures"].values())
            print(f"| {names[way]} | {rnd} | {st['connects_per_s']:,.0f} | {st['server_cpu_ms_per_connect']:.2f} "
                  f"| {failed} | {se['connack_ms']['p50']:.2f} | {se['connack_ms']['p99']:.2f} |")
    for way in ("py", "rs"):
        d50 = sum(results[f"{way} serial {r}"]["connack_ms"]["p50"] - results[f"x509 serial {r}"]["connack_ms"]["p50"]
                  for r in (1, 2)) / 2
        d99 = sum(results[f"{way} serial {r}"]["connack_ms"]["p99"] - results[f"x509 serial {r}"]["connack_ms"]["p99"]
                  for r in (1, 2)) / 2
        print(f"\n{names[way]}: the invocation adds {d50:.2f} ms at p50, {d99:.2f} ms at p99 (mean of the two runs)")


if __name__ == "__main__":
    main()
