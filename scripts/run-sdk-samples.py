#!/usr/bin/env python3
"""Runs the AWS IoT Device SDK for Python v2's own service-client samples (shadow, jobs, fleet
provisioning basic and CSR), unchanged, against a fresh Sekisho on port 8883.

The samples are not on PyPI; get them from GitHub (aws/aws-iot-device-sdk-python-v2,
samples/service_clients/) and pass their directory:

    .venv/bin/python scripts/run-sdk-samples.py /path/to/samples/service_clients

Only what AWS's samples leave to the user changes: the endpoint, the credentials, and the CA
(through SSL_CERT_FILE, as the samples trust the system store). They dial port 8883, so nothing
else may listen there. Exits non-zero if a sample fails."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
os.environ.pop("AWS_CA_BUNDLE", None)

from conftest import ALLOW_ALL, Device, Server, unique  # noqa: E402
import test_fleet_provisioning as fp  # noqa: E402


def main(samples: Path) -> int:
    work = Path(tempfile.mkdtemp(prefix="sekisho-samples-"))
    s = Server(work / "srv")
    s.mqtt_port = 8883
    s.start(attempts=1)
    py = sys.executable
    failed = []
    try:
        iot = s.boto()
        dev = Device(s, iot, unique("sample"), ALLOW_ALL, work)
        env = {**s.env, "SSL_CERT_FILE": s.ca, "AWS_PROFILE": "sekisho"}
        ep = s.endpoint()
        auth = ["--endpoint", ep, "--cert", str(dev.cert), "--key", str(dev.key)]

        def run(name, args, stdin=""):
            cp = subprocess.run([py, str(samples / f"{name}.py"), *args], input=stdin, capture_output=True,
                                text=True, timeout=120, env=env)
            ok = cp.returncode == 0 and "Traceback" not in cp.stdout + cp.stderr
            print(f"{name}: {'ok' if ok else 'FAILED'}")
            if not ok:
                print(cp.stdout[-3000:], cp.stderr[-3000:])
                failed.append(name)
            return cp.stdout

        out = run("shadow", [*auth, "--thing", dev.name],
                  'get\nupdate-desired {"color":"green"}\nupdate-reported {"color":"green"}\nget\ndelete\nquit\n')
        for want in ("update-desired response", "ShadowDeltaUpdatedEvent", "delete response"):
            if want not in out:
                failed.append(f"shadow: no {want}")
        out = run("jobs", [*auth, "--thing", dev.name, "--region", "us-east-1"],
                  'create-job sj1 {"op":"reboot"}\nget-pending-job-executions\nstart-next-pending-job-execution\n'
                  'describe-job-execution sj1\nupdate-job-execution sj1 SUCCEEDED\nget-pending-job-executions\n'
                  'delete-job sj1\nquit\n')
        for want in ("NextJobExecutionChangedEvent", "StartNextPendingJobExecutionResponse", "UpdateJobExecutionResponse"):
            if want not in out:
                failed.append(f"jobs: no {want}")
        _, _, template, claim = fp.setup(s, work)
        claim_auth = ["--endpoint", ep, "--cert", str(claim.cert), "--key", str(claim.key), "--template_name", template]
        out = run("fleet_provisioning_basic",
                  [*claim_auth, "--template_parameters", '{"SerialNumber":"S1","DeviceLocation":"Seattle"}'])
        if "thing_name='ThingPrefix_S1'" not in out:
            failed.append("fleet_provisioning_basic: no thing")
        key, csr = work / "csr.key", work / "dev.csr"
        subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
        subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=s", "-out", str(csr)], check=True)
        out = run("fleet_provisioning_csr",
                  [*claim_auth, "--csr_file", str(csr), "--template_parameters", '{"SerialNumber":"S2","DeviceLocation":"Seattle"}'])
        if "thing_name='ThingPrefix_S2'" not in out:
            failed.append("fleet_provisioning_csr: no thing")
    finally:
        s.stop()
    print("FAILED: " + ", ".join(failed) if failed else "all samples passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
