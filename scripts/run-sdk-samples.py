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

The Python custom-authorizer samples run against a Python Lambda handler as a custom
authorizer: the current set's `mqtt/mqtt5_custom_auth_signed.py` and `_unsigned.py` (found
beside service_clients/), the set before a1db4b5's `mqtt5_custom_authorizer_connect.py`
(MQTT 5, direct and over WebSocket) and the set before f2cf627's `custom_authorizer_connect.py`
(MQTT 3.1.1; with a signature of another key it must fail). That older set's
`cognito_connect.py` runs against a second server with `domain = "amazonaws.com"`, in a mount
namespace whose /etc/hosts points `cognito-identity.us-east-1.amazonaws.com` and the data
endpoint at 127.0.0.1: the sample builds the Cognito API's name itself and dials it on 443.

Only what AWS's samples leave to the user changes: the endpoint, the credentials, and the CA
(through SSL_CERT_FILE, as the samples trust the system store; NODE_EXTRA_CA_CERTS for the
JavaScript SDK's control-plane client). They dial AWS's ports, 8883 and 443, so the server
takes those (root, or CAP_NET_BIND_SERVICE) and nothing else may listen there.
Exits non-zero if a sample fails."""

import json
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
from test_authorizers import FUNCTIONS, keypair, sign, zip_of  # noqa: E402

# A custom authorizer as a user writes it for AWS: a token, or a username and password.
SAMPLE_AUTHORIZER = '''
import base64

def handler(event, context):
    mqtt = event.get("protocolData", {}).get("mqtt", {})
    user = mqtt.get("username", "").split("?", 1)[0]
    password = base64.b64decode(mqtt["password"]) if mqtt.get("password") else b""
    if event.get("token") != "sample-token" and (user, password) != ("sample-user", b"sample-password"):
        return {"isAuthenticated": False}
    arn = "arn:aws:iot:us-east-1:%s:" % context.invoked_function_arn.split(":")[4]
    return {"isAuthenticated": True, "principalId": "sample", "refreshAfterInSeconds": 300,
            "disconnectAfterInSeconds": 3600,
            "policyDocuments": [{"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": arn + "client/*"},
                {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": arn + "topic/test/topic"},
                {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": arn + "topicfilter/test/topic"}]}]}
'''


def sample_authorizers(s):
    """The handler as a function, a signed authorizer (token key `token`) and an unsigned one;
    the signing key."""
    iam, lam, iot = s.boto("iam"), s.boto("lambda"), s.boto()
    role = iam.create_role(RoleName="sample-authz", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    fn = lam.create_function(FunctionName="sample-authz", Runtime="python3.11", Role=role, Handler="app.handler",
                             Code={"ZipFile": zip_of({"app.py": SAMPLE_AUTHORIZER})}, Timeout=5)["FunctionArn"]
    key, pem = keypair()
    for name, extra in (("sample-signed", {"tokenKeyName": "token", "tokenSigningPublicKeys": {"k1": pem}}),
                        ("sample-unsigned", {"signingDisabled": True})):
        arn = iot.create_authorizer(authorizerName=name, authorizerFunctionArn=fn, status="ACTIVE",
                                    **extra)["authorizerArn"]
        lam.add_permission(FunctionName="sample-authz", StatementId=name, Action="lambda:InvokeFunction",
                           Principal="iot.amazonaws.com", SourceArn=arn)
    return key


def main(samples: Path, node: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="sekisho-samples-"))
    s = Server(work / "srv", config=FUNCTIONS)
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

        def run(name, args, stdin="", expect_failure=False):
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
            if expect_failure:
                ok = cp.returncode != 0
            print(f"{name}{' (refused, as it must be)' if expect_failure else ''}: {'ok' if ok else 'FAILED'}")
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
            # (The set before f2cf627, with its command-line utilities, sends 10.)
            want = 10 if (samples / "utils" / "command_line_utils.py").exists() else 5
            if got != want or out.count("GRANTED_QOS_1") < 2:
                failed.append(f"mqtt5_shared_subscription: {got} of {want} received")
        if node and have("shared_subscription"):
            out = run("shared_subscription", auth)
            got = out.count("Received a publish")
            if got != 10 or "Complete!" not in out:
                failed.append(f"shared_subscription: {got} of 10 received")
        if not node:
            custom_auth_samples(s, samples, run, failed)
    finally:
        s.stop()
    if not node and (samples / "cognito_connect.py").exists():
        cognito_sample(work, samples, failed)
    print("FAILED: " + ", ".join(failed) if failed else "all samples passed")
    return 1 if failed else 0


def custom_auth_samples(s, samples, run, failed):
    """The custom-authorizer samples of whichever sets `samples` has (see the module doc)."""
    current = samples.parent / "mqtt"
    have = {p.name: p for p in (current / "mqtt5_custom_auth_signed.py", current / "mqtt5_custom_auth_unsigned.py",
                                samples / "mqtt5_custom_authorizer_connect.py", samples / "custom_authorizer_connect.py")
            if p.exists()}
    if not have:
        return
    key = sample_authorizers(s)
    ep = s.endpoint()
    signature = sign(key, "sample-token")
    rel = lambda p: os.path.relpath(p.with_suffix(""), samples)  # noqa: E731 - run() takes names
    if "mqtt5_custom_auth_signed.py" in have:
        out = run(rel(have["mqtt5_custom_auth_signed.py"]), [
            "--endpoint", ep, "--authorizer_name", "sample-signed", "--auth_signature", signature,
            "--auth_token_key_name", "token", "--auth_token_key_value", "sample-token", "--count", "3"])
        if "3 message(s) received" not in out:
            failed.append("mqtt5_custom_auth_signed: not 3 received")
    if "mqtt5_custom_auth_unsigned.py" in have:
        out = run(rel(have["mqtt5_custom_auth_unsigned.py"]), [
            "--endpoint", ep, "--authorizer_name", "sample-unsigned", "--auth_username", "sample-user",
            "--auth_password", "sample-password", "--count", "3"])
        if "3 message(s) received" not in out:
            failed.append("mqtt5_custom_auth_unsigned: not 3 received")
    signed = ["--endpoint", ep, "--custom_auth_authorizer_name", "sample-signed",
              "--custom_auth_authorizer_signature", signature, "--custom_auth_token_key_name", "token",
              "--custom_auth_token_value", "sample-token"]
    unsigned = ["--endpoint", ep, "--custom_auth_authorizer_name", "sample-unsigned",
                "--custom_auth_username", "sample-user", "--custom_auth_password", "sample-password"]
    if "mqtt5_custom_authorizer_connect.py" in have:
        # A flag in the set before a1db4b5, an option with a value in the one before f2cf627.
        ws = ["--use_websockets", "true"] if (samples / "utils" / "command_line_utils.py").exists() else [
            "--use_websockets"]
        for args in (signed, unsigned, [*signed, *ws], [*unsigned, *ws]):
            out = run("mqtt5_custom_authorizer_connect", args)
            if "Client Connected" not in out:
                failed.append(f"mqtt5_custom_authorizer_connect {args[2:4]}: not connected")
    if "custom_authorizer_connect.py" in have:
        for args in (signed, unsigned):
            out = run("custom_authorizer_connect", args)
            if "Connected!" not in out:
                failed.append(f"custom_authorizer_connect {args[2:4]}: not connected")
        other, _ = keypair()
        bad = [*signed]
        bad[bad.index(signature)] = sign(other, "sample-token")
        run("custom_authorizer_connect", bad, expect_failure=True)


def cognito_sample(work, samples, failed):
    """The Cognito connect sample, unchanged: an unauthenticated identity of a pool whose role
    allows connecting, on a server named like AWS (`domain = "amazonaws.com"`), AWS's names
    resolved to it in a mount namespace of the sample's own."""
    s = Server(work / "cognito", config='domain = "amazonaws.com"\n')
    s.https_port = 443
    s.start(attempts=1)
    try:
        cog, iam = s.boto("cognito-identity"), s.boto("iam")
        pid = cog.create_identity_pool(IdentityPoolName="sample", AllowUnauthenticatedIdentities=True)[
            "IdentityPoolId"]
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Federated": "cognito-identity.amazonaws.com"},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {"cognito-identity.amazonaws.com:aud": pid},
                          "ForAnyValue:StringLike": {"cognito-identity.amazonaws.com:amr": "unauthenticated"}}}]}
        arn = iam.create_role(RoleName="sample-guest", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        iam.put_role_policy(RoleName="sample-guest", PolicyName="connect", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}))
        cog.set_identity_pool_roles(IdentityPoolId=pid, Roles={"unauthenticated": arn})
        identity = cog.get_id(IdentityPoolId=pid)["IdentityId"]
        ep = s.endpoint()
        hosts = work / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text()
                         + f"\n127.0.0.1 cognito-identity.us-east-1.amazonaws.com {ep}\n")
        env = {**os.environ, "SSL_CERT_FILE": s.ca}
        cp = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$@"', "sh",
                             sys.executable, str(samples / "cognito_connect.py"), "--endpoint", ep,
                             "--signing_region", "us-east-1", "--cognito_identity", identity],
                            capture_output=True, text=True, env=env, timeout=120)
        ok = cp.returncode == 0 and "Connected!" in cp.stdout and "Disconnected!" in cp.stdout
        print(f"cognito_connect: {'ok' if ok else 'FAILED'}")
        if not ok or os.environ.get("SAMPLES_VERBOSE"):
            print(cp.stdout[-3000:], cp.stderr[-3000:])
        if not ok:
            failed.append("cognito_connect")
    finally:
        s.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--node"]:
        sys.exit(main(Path(sys.argv[2]), node=True))
    sys.exit(main(Path(sys.argv[1])))
