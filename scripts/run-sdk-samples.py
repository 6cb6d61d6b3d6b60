#!/usr/bin/env python3
"""Runs the AWS IoT Device SDKs' own service-client samples (shadow, jobs, fleet provisioning
basic and CSR), unchanged, against a fresh Sekisho on port 8883: the Python v2 SDK's, or with
`--node` the JavaScript (Node.js) v2 SDK's, compiled.

The samples are not in the packages' registries; get them from GitHub:
- Python: aws/aws-iot-device-sdk-python-v2, samples/service_clients/; pass that directory.
- Node.js: aws/aws-iot-device-sdk-js-v2, samples/node/service_clients/{shadow,jobs,
  fleet_provisioning/basic,fleet_provisioning/csr}/index.ts, each compiled with its tsconfig
  against aws-iot-device-sdk-v2 and @aws-sdk/client-iot from npm; pass a directory holding
  shadow/, jobs/, fleet_provisioning_basic/ and fleet_provisioning_csr/, each with
  dist/index.js.

    .venv/bin/python scripts/run-sdk-samples.py /path/to/samples/service_clients
    .venv/bin/python scripts/run-sdk-samples.py --node /path/to/compiled

With a directory of a previous sample set (the Python v2 repository's samples/ before commit
a1db4b5; the Node.js v2 repository's samples/node/ before 7500cd2, compiled), its MQTT 5
shared-subscription sample runs too, and what of the service samples it has: the Python one
dials 443 with ALPN. Samples a set does not have are skipped.

Only what AWS's samples leave to the user changes: the endpoint, the credentials, and the CA
(through SSL_CERT_FILE, as the samples trust the system store; NODE_EXTRA_CA_CERTS for the
JavaScript SDK's control-plane client). They dial AWS's ports, 8883 and 443, so the server
takes those (root, or CAP_NET_BIND_SERVICE) and nothing else may listen there.
Exits non-zero if a sample fails."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
os.environ.pop("AWS_CA_BUNDLE", None)

from conftest import ALLOW_ALL, Device, Server, unique  # noqa: E402
import test_fleet_provisioning as fp  # noqa: E402


def main(samples: Path, node: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="sekisho-samples-"))
    s = Server(work / "srv")
    # AWS's ports: MQTT on 8883, and 443 for HTTPS and for MQTT chosen by ALPN
    # (`x-amzn-mqtt-ca`), which the CRT's MQTT 5 builder dials by default where ALPN is there.
    s.mqtt_port = 8883
    s.https_port = 443
    s.start(attempts=1)
    py = sys.executable
    failed = []
    try:
        iot = s.boto()
        dev = Device(s, iot, unique("sample"), ALLOW_ALL, work)
        env = {**s.env, "SSL_CERT_FILE": s.ca, "AWS_PROFILE": "sekisho", "NODE_EXTRA_CA_CERTS": s.ca}
        ep = s.endpoint()
        auth = ["--endpoint", ep, "--cert", str(dev.cert), "--key", str(dev.key)]

        def run(name, args, stdin=""):
            argv = ["node", str(samples / name / "dist" / "index.js")] if node else [py, str(samples / f"{name}.py")]
            # Typed a line at a time, as a user would: the Node.js samples' readline stops
            # asking once its input ends, whatever is still to come.
            proc = subprocess.Popen([*argv, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
            time.sleep(3 if stdin else 0)
            for line in stdin.splitlines(keepends=True):
                proc.stdin.write(line)
                proc.stdin.flush()
                time.sleep(1.5)
            try:
                stdout, stderr = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            cp = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
            ok = (cp.returncode == 0 and "Traceback" not in cp.stdout + cp.stderr
                  and "ERR_USE_AFTER_CLOSE" not in cp.stdout + cp.stderr)
            print(f"{name}: {'ok' if ok else 'FAILED'}")
            if os.environ.get("SAMPLES_VERBOSE"):
                print(cp.stdout[-3000:], cp.stderr[-2000:])
            if not ok:
                print(cp.stdout[-3000:], cp.stderr[-3000:])
                failed.append(name)
            return cp.stdout

        def have(name):
            return (samples / name / "dist" / "index.js").exists() if node else (samples / f"{name}.py").exists()

        thing = "--thing_name" if node else "--thing"
        if have("shadow"):
            out = run("shadow", [*auth, thing, dev.name],
                      'get\nupdate-desired {"color":"green"}\nupdate-reported {"color":"green"}\nget\ndelete\nquit\n')
            shadow_wants = (("Update Desired response", "Received ShadowDeltaUpdated event", "Delete response")
                            if node else ("update-desired response", "ShadowDeltaUpdatedEvent", "delete response"))
            for want in shadow_wants:
                if want not in out:
                    failed.append(f"shadow: no {want}")
        if have("jobs"):
            out = run("jobs", [*auth, thing, dev.name, "--region", "us-east-1"],
                      'create-job sj1 {"op":"reboot"}\nget-pending-job-executions\nstart-next-pending-job-execution\n'
                      'describe-job-execution sj1\nupdate-job-execution sj1 SUCCEEDED\nget-pending-job-executions\n'
                      'delete-job sj1\nquit\n')
            jobs_wants = (("Received NextJobExecutionChanged event", "StartNextPendingJobExecution Response",
                           "UpdateJobExecution Response") if node
                          else ("NextJobExecutionChangedEvent", "StartNextPendingJobExecutionResponse",
                                "UpdateJobExecutionResponse"))
            for want in jobs_wants:
                if want not in out:
                    failed.append(f"jobs: no {want}")
        _, _, template, claim = fp.setup(s, work)
        claim_auth = ["--endpoint", ep, "--cert", str(claim.cert), "--key", str(claim.key), "--template_name", template]
        if have("fleet_provisioning_basic"):
            out = run("fleet_provisioning_basic",
                      [*claim_auth, "--template_parameters", '{"SerialNumber":"S1","DeviceLocation":"Seattle"}'])
            if ('"thingName":"ThingPrefix_S1"' if node else "thing_name='ThingPrefix_S1'") not in out:
                failed.append("fleet_provisioning_basic: no thing")
        if have("fleet_provisioning_csr"):
            key, csr = work / "csr.key", work / "dev.csr"
            subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
                           check=True)
            subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=s", "-out", str(csr)], check=True)
            out = run("fleet_provisioning_csr", [*claim_auth, "--csr_file", str(csr), "--template_parameters",
                                                 '{"SerialNumber":"S2","DeviceLocation":"Seattle"}'])
            if ('"thingName":"ThingPrefix_S2"' if node else "thing_name='ThingPrefix_S2'") not in out:
                failed.append("fleet_provisioning_csr: no thing")
        # The previous sample sets also have a shared-subscription sample: two subscribers in
        # one group share what a publisher sends.
        if not node and have("mqtt5_shared_subscription"):
            # (Its --count arrives as a string the sample then compares with a number: its
            # default, 5, is used.)
            out = run("mqtt5_shared_subscription", auth)
            got = out.count("Received a publish")
            if got != 5 or out.count("GRANTED_QOS_1") < 2:
                failed.append(f"mqtt5_shared_subscription: {got} of 5 received")
        if node and have("shared_subscription"):
            out = run("shared_subscription", auth)
            got = out.count("Received a publish")
            if got != 10 or "Complete!" not in out:
                failed.append(f"shared_subscription: {got} of 10 received")
    finally:
        s.stop()
    print("FAILED: " + ", ".join(failed) if failed else "all samples passed")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--node"]:
        sys.exit(main(Path(sys.argv[2]), node=True))
    sys.exit(main(Path(sys.argv[1])))
