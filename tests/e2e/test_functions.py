"""Lambda-compatible functions hosted by Sekisho, driven by boto3 and the AWS CLI: a Python
handler written as for AWS runs unchanged under the stock runtime interface client
(awslambdaric) against the Runtime API Sekisho serves it."""

import io
import json
import sys
import time
import zipfile
from pathlib import Path

import pytest
from botocore.config import Config

from conftest import Server, unique

HANDLER = '''
import json, os, time

def handler(event, context):
    op = event.get("op")
    if op == "raise":
        raise ValueError("bad input: " + str(event.get("n")))
    if op == "sleep":
        time.sleep(event["s"])
    if op == "exit":
        os._exit(7)
    if op == "whoami":
        import boto3
        return boto3.client("sts").get_caller_identity()["Arn"]
    print("handling", json.dumps(event))
    return {"event": event, "pid": os.getpid(), "my": os.environ.get("MY"),
            "request_id": context.aws_request_id, "arn": context.invoked_function_arn,
            "remaining_ok": 0 < context.get_remaining_time_in_millis() <= 3000,
            "name": os.environ["AWS_LAMBDA_FUNCTION_NAME"], "region": os.environ["AWS_REGION"]}
'''


def zip_of(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fx(workdir):
    s = Server(workdir / "functions", config=f'[functions]\nenabled = true\npython = "{sys.executable}"\nmax_per_function = 2\n').start()
    iam = s.boto("iam")
    role = iam.create_role(RoleName="fn-exec", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    iam.put_role_policy(RoleName="fn-exec", PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"}]}))
    lam = s.boto("lambda", config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
    yield s, lam, role
    s.stop()


def invoke(lam, name, event, **kw):
    out = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), **kw)
    return out, json.loads(out["Payload"].read() or b"null")


def test_a_python_handler_runs_warm_and_reports_its_errors_as_lambda_does(fx):
    s, lam, role = fx
    name = unique("echo")
    cfg = lam.create_function(FunctionName=name, Runtime="python3.11", Role=role, Handler="app.handler",
                              Code={"ZipFile": zip_of({"app.py": HANDLER})}, Timeout=3,
                              Environment={"Variables": {"MY": "value"}}, Description="echo")
    assert (cfg["FunctionName"], cfg["Runtime"], cfg["Handler"], cfg["Timeout"], cfg["MemorySize"], cfg["State"]) == (
        name, "python3.11", "app.handler", 3, 128, "Active")
    assert cfg["FunctionArn"].endswith(f":function:{name}") and cfg["Environment"] == {"Variables": {"MY": "value"}}
    out, first = invoke(lam, name, {"n": 1})
    assert out["StatusCode"] == 200 and "FunctionError" not in out and out["ExecutedVersion"] == "$LATEST"
    assert (first["event"], first["my"], first["name"], first["region"], first["arn"], first["remaining_ok"]) == (
        {"n": 1}, "value", name, "us-east-1", cfg["FunctionArn"], True)
    _, second = invoke(lam, name, {"n": 2})
    assert second["pid"] == first["pid"], "a warm instance answers"
    assert second["request_id"] != first["request_id"]
    # The handler's exception: 200, FunctionError, the runtime's error document.
    out, e = invoke(lam, name, {"op": "raise", "n": 5})
    assert out["StatusCode"] == 200 and out["FunctionError"] == "Unhandled"
    assert (e["errorType"], e["errorMessage"]) == ("ValueError", "bad input: 5")
    # The execution role's credentials are the function's; its SDK calls Sekisho.
    _, arn = invoke(lam, name, {"op": "whoami"})
    assert arn.startswith(f"arn:aws:sts::{s.account_id()}:assumed-role/fn-exec/{name}")
    # DryRun and Event.
    assert lam.invoke(FunctionName=name, InvocationType="DryRun")["StatusCode"] == 204
    assert lam.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"n":3}')["StatusCode"] == 202
    # A payload that is not JSON.
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke(FunctionName=name, Payload=b"not json")


def test_timeouts_and_crashes_end_only_their_invocation(fx):
    s, lam, role = fx
    name = unique("fragile")
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=role, Handler="app.handler",
                        Code={"ZipFile": zip_of({"app.py": HANDLER})}, Timeout=2)
    _, before = invoke(lam, name, {"n": 0})
    out, e = invoke(lam, name, {"op": "sleep", "s": 5})
    assert out["FunctionError"] == "Unhandled" and e["errorType"] == "Sandbox.Timedout"
    assert e["errorMessage"].endswith("Task timed out after 2.00 seconds")
    _, after = invoke(lam, name, {"n": 1})
    assert after["pid"] != before["pid"], "the timed-out instance was killed"
    out, e = invoke(lam, name, {"op": "exit"})
    assert out["FunctionError"] == "Unhandled" and e["errorType"] == "Runtime.ExitError"
    _, again = invoke(lam, name, {"n": 2})
    assert again["event"] == {"n": 2}
    # A handler that does not exist: the runtime's own report.
    broken = unique("broken")
    lam.create_function(FunctionName=broken, Runtime="python3.11", Role=role, Handler="nope.handler",
                        Code={"ZipFile": zip_of({"app.py": HANDLER})})
    out, e = invoke(lam, broken, {})
    assert out["FunctionError"] == "Unhandled" and e["errorType"] == "Runtime.ImportModuleError"


# A `provided` runtime's bootstrap, as one writes it without any runtime library: the Runtime
# API by hand (next invocation, then its response or its error).
BOOTSTRAP = r"""#!/bin/sh
set -eu
api="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation"
headers=$(mktemp)
while true; do
  event=$(curl -sS -D "$headers" "$api/next")
  id=$(grep -i '^lambda-runtime-aws-request-id:' "$headers" | tr -d '\r' | cut -d' ' -f2)
  case "$event" in
    *fail*) curl -sS -X POST "$api/$id/error" -H 'Lambda-Runtime-Function-Error-Type: Unhandled' \
              -d '{"errorType":"BootstrapError","errorMessage":"asked to fail"}' > /dev/null ;;
    *) curl -sS -X POST "$api/$id/response" -d "{\"echo\": $event, \"handler\": \"$_HANDLER\", \"pid\": $$}" > /dev/null ;;
  esac
done
"""


def test_a_provided_runtime_runs_its_own_bootstrap(fx):
    """`provided.al2023`: the zip's executable `bootstrap` is the runtime; it is reused warm,
    and the errors it reports come back as Lambda returns them."""
    s, lam, role = fx
    name = unique("provided")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("bootstrap")
        info.external_attr = 0o100755 << 16
        z.writestr(info, BOOTSTRAP)
    lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=role, Handler="my.handler",
                        Code={"ZipFile": buf.getvalue()}, Timeout=5)
    _, first = invoke(lam, name, {"n": 1})
    assert first["echo"] == {"n": 1} and first["handler"] == "my.handler"
    _, second = invoke(lam, name, {"n": 2})
    assert second["echo"] == {"n": 2} and second["pid"] == first["pid"], "a warm instance is reused"
    out, e = invoke(lam, name, {"fail": True})
    assert out["FunctionError"] == "Unhandled" and e == {"errorType": "BootstrapError", "errorMessage": "asked to fail"}
    # A zip without a bootstrap cannot start: a function error, as Lambda reports it.
    empty = unique("no-bootstrap")
    lam.create_function(FunctionName=empty, Runtime="provided.al2023", Role=role, Handler="x",
                        Code={"ZipFile": zip_of({"README": "no bootstrap here"})})
    out, e = invoke(lam, empty, {})
    assert out["StatusCode"] == 200 and out["FunctionError"] == "Unhandled"
    assert e["errorType"] == "Runtime.InvalidEntrypoint" and "bootstrap" in e["errorMessage"], e


NODE_HANDLER = """
exports.handler = async (event, context) => {
  if (event.op === "raise") throw new TypeError("bad input: " + event.n);
  console.log("node handling", JSON.stringify(event));
  return {event, pid: process.pid, requestId: context.awsRequestId, arn: context.invokedFunctionArn,
          name: process.env.AWS_LAMBDA_FUNCTION_NAME};
};
"""


def test_a_nodejs_handler_runs_under_the_stock_runtime_interface_client(workdir):
    """`nodejs20.x`: an unmodified handler under npm's aws-lambda-ric (`[functions] node_ric`),
    warm between invocations, its thrown errors returned as Lambda returns them."""
    ric = Path(__file__).parent / "node" / "node_modules" / ".bin" / "aws-lambda-ric"
    assert ric.exists(), "scripts/install-test-deps.sh installs aws-lambda-ric"
    s = Server(workdir / "functions-node", config=f'[functions]\nenabled = true\nnode_ric = "{ric}"\n').start()
    try:
        iam = s.boto("iam")
        role = iam.create_role(RoleName="fn-node", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                    "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
        lam = s.boto("lambda", config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
        fn = lam.create_function(FunctionName="node-fn", Runtime="nodejs20.x", Role=role, Handler="index.handler",
                                 Code={"ZipFile": zip_of({"index.js": NODE_HANDLER})}, Timeout=10)["FunctionArn"]
        _, first = invoke(lam, "node-fn", {"n": 1})
        assert first["event"] == {"n": 1} and first["arn"] == fn and first["name"] == "node-fn"
        _, second = invoke(lam, "node-fn", {"n": 2})
        assert second["pid"] == first["pid"] and second["requestId"] != first["requestId"]
        out, e = invoke(lam, "node-fn", {"op": "raise", "n": 3})
        assert out["FunctionError"] == "Unhandled"
        assert (e["errorType"], e["errorMessage"]) == ("TypeError", "bad input: 3"), e
        assert "node handling" in s.log_text()
    finally:
        s.stop()


def test_the_function_lifecycle_and_its_policy(fx):
    s, lam, role = fx
    name = unique("life")
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=role, Handler="app.handler",
                        Code={"ZipFile": zip_of({"app.py": HANDLER})}, Environment={"Variables": {"MY": "one"}})
    with pytest.raises(lam.exceptions.ResourceConflictException):
        lam.create_function(FunctionName=name, Runtime="python3.11", Role=role, Handler="app.handler",
                            Code={"ZipFile": zip_of({"app.py": HANDLER})})
    got = lam.get_function(FunctionName=name)
    assert got["Configuration"]["FunctionName"] == name
    assert name in [f["FunctionName"] for f in lam.list_functions()["Functions"]]
    assert invoke(lam, name, {})[1]["my"] == "one"
    # New configuration, new instances.
    rev = lam.update_function_configuration(FunctionName=name, Environment={"Variables": {"MY": "two"}})["RevisionId"]
    assert invoke(lam, name, {})[1]["my"] == "two"
    with pytest.raises(lam.exceptions.PreconditionFailedException):
        lam.update_function_configuration(FunctionName=name, Timeout=5, RevisionId="stale")
    # New code.
    lam.update_function_code(FunctionName=name, ZipFile=zip_of({"app.py": "def handler(e, c):\n    return 'v2'\n"}),
                             RevisionId=rev)
    assert invoke(lam, name, {})[1] == "v2"
    # The resource policy IoT's authorizers need.
    st = json.loads(lam.add_permission(FunctionName=name, StatementId="iot", Action="lambda:InvokeFunction",
                                       Principal="iot.amazonaws.com",
                                       SourceArn="arn:aws:iot:us-east-1:123456789012:authorizer/a")["Statement"])
    assert st["Principal"] == {"Service": "iot.amazonaws.com"}
    assert st["Condition"] == {"ArnLike": {"AWS:SourceArn": "arn:aws:iot:us-east-1:123456789012:authorizer/a"}}
    with pytest.raises(lam.exceptions.ResourceConflictException):
        lam.add_permission(FunctionName=name, StatementId="iot", Action="lambda:InvokeFunction",
                           Principal="iot.amazonaws.com")
    policy = json.loads(lam.get_policy(FunctionName=name)["Policy"])
    assert [x["Sid"] for x in policy["Statement"]] == ["iot"]
    lam.remove_permission(FunctionName=name, StatementId="iot")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_policy(FunctionName=name)
    lam.delete_function(FunctionName=name)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName=name)


def test_refusals_and_authorization(fx, workdir):
    """Reserved variables, unknown runtimes, a role that does not trust Lambda or that the
    caller may not pass, code that is not a zip or escapes its directory; an IAM user is held
    to lambda:* actions on the function's ARN."""
    import boto3
    from helpers import keys
    s, lam, role = fx
    z = zip_of({"app.py": HANDLER})
    base = {"Runtime": "python3.11", "Role": role, "Handler": "app.handler", "Code": {"ZipFile": z}}
    raw = s.boto("lambda", config=Config(parameter_validation=False, retries={"total_max_attempts": 1}))
    for bad in ({"Environment": {"Variables": {"AWS_REGION": "x"}}}, {"Runtime": "java21"},
                {"Code": {"ZipFile": b"not a zip"}}, {"Code": {"ZipFile": zip_of({"../evil.py": "x"})}},
                {"Timeout": 901}, {"MemorySize": 127}):
        with pytest.raises(raw.exceptions.InvalidParameterValueException):
            raw.create_function(FunctionName=unique("bad"), **{**base, **bad})
    iam = s.boto("iam")
    untrusting = iam.create_role(RoleName=unique("notlambda"), AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.create_function(FunctionName=unique("x"), **{**base, "Role": untrusting})
    name = unique("guarded")
    lam.create_function(FunctionName=name, **base)
    user = unique("fnuser")
    iam.create_user(UserName=user)
    arn = lam.get_function(FunctionName=name)["Configuration"]["FunctionArn"]
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["lambda:InvokeFunction", "lambda:CreateFunction"], "Resource": arn}]}))
    c = boto3.client("lambda", region_name="us-east-1", endpoint_url=f"https://localhost:{s.api_port}", verify=s.ca,
                     config=Config(retries={"total_max_attempts": 1}), **keys(iam.create_access_key(UserName=user)["AccessKey"]))
    time.sleep(0.1)
    assert json.loads(c.invoke(FunctionName=name, Payload=b'{"n":9}')["Payload"].read())["event"] == {"n": 9}
    with pytest.raises(c.exceptions.ClientError) as e:
        c.get_function(FunctionName=name)
    assert e.value.response["Error"]["Code"] == "AccessDeniedException"
    # Creating a function passes its role: iam:PassRole is needed.
    with pytest.raises(c.exceptions.ClientError) as e:
        c.create_function(FunctionName=name + "2", **base)
    assert e.value.response["Error"]["Code"] == "AccessDeniedException"
    # Another account's function ARN names nothing here.
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName=f"arn:aws:lambda:us-east-1:999999999999:function:{name}")


def test_the_cli_invokes(fx, workdir):
    s, lam, role = fx
    name = unique("cli")
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=role, Handler="app.handler",
                        Code={"ZipFile": zip_of({"app.py": HANDLER})})
    out = workdir / f"{name}.json"
    # (AWS CLI v1 sends --payload as given; v2 would want base64 or --cli-binary-format.)
    meta = s.aws("lambda", "invoke", "--function-name", name, "--payload", '{"n":42}', str(out))
    assert meta["StatusCode"] == 200
    assert json.loads(out.read_text())["event"] == {"n": 42}


def test_functions_are_off_unless_the_operator_turns_them_on(workdir):
    """A function runs as the server's user: without `[functions] enabled` the lambda API
    refuses every call; with `accounts`, only those accounts' functions run."""
    plain = Server(workdir / "functions-off").start()
    try:
        lam = plain.boto("lambda", config=Config(retries={"total_max_attempts": 1}))
        with pytest.raises(lam.exceptions.ClientError) as e:
            lam.list_functions()
        assert e.value.response["Error"]["Code"] == "AccessDeniedException"
        assert "[functions]" in e.value.response["Error"]["Message"]
    finally:
        plain.stop()
    some = Server(workdir / "functions-some", accounts=["tenant-b"],
                  config=f'[functions]\nenabled = true\naccounts = ["000000000000"]\npython = "{sys.executable}"\n').start()
    try:
        for profile in ("sekisho", "tenant-b"):
            lam = some.boto("lambda", profile=profile, config=Config(retries={"total_max_attempts": 1}))
            with pytest.raises(lam.exceptions.ClientError) as e:
                lam.list_functions()
            assert e.value.response["Error"]["Code"] == "AccessDeniedException"
    finally:
        some.stop()
