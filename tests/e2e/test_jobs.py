"""Jobs: the control plane with the stock AWS CLI and boto3, the device side with the AWS IoT
Device SDK's jobs client (awsiotsdk) and paho-mqtt for raw topics."""

import json
import queue
import signal
import subprocess
import ssl
import time
import urllib.error
import urllib.request

import pytest
from awscrt import mqtt as crt_mqtt
from awsiot import iotjobs, mqtt_connection_builder

from conftest import ALLOW_ALL, Device, Paho, Server, unique

Q1 = crt_mqtt.QoS.AT_LEAST_ONCE


def sdk(server, dev):
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=server.endpoint(), port=server.mqtt_port, cert_filepath=str(dev.cert),
        pri_key_filepath=str(dev.key), ca_filepath=server.ca, client_id=dev.name,
        clean_session=True, keep_alive_secs=30)
    conn.connect().result(10)
    return conn, iotjobs.IotJobsClient(conn)


class Agent:
    """A device running the SDK's jobs sample loop by hand: notify-next, start-next, update."""

    def __init__(self, server, dev):
        self.conn, self.jobs = sdk(server, dev)
        self.thing = dev.name
        self.next, self.started, self.updated, self.rejected = (queue.Queue() for _ in range(4))
        t = self.thing
        for fut, _ in (
            self.jobs.subscribe_to_next_job_execution_changed_events(
                iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=t), Q1, self.next.put),
            self.jobs.subscribe_to_start_next_pending_job_execution_accepted(
                iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=t), Q1, self.started.put),
            self.jobs.subscribe_to_update_job_execution_accepted(
                iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=t, job_id="+"), Q1, self.updated.put),
            self.jobs.subscribe_to_update_job_execution_rejected(
                iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=t, job_id="+"), Q1, self.rejected.put),
        ):
            fut.result(10)

    def start_next(self, **kw):
        self.jobs.publish_start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(thing_name=self.thing, **kw), Q1).result(10)
        return self.started.get(timeout=5)

    def update(self, job_id, status, **kw):
        self.jobs.publish_update_job_execution(
            iotjobs.UpdateJobExecutionRequest(thing_name=self.thing, job_id=job_id, status=status, **kw), Q1).result(10)

    def close(self):
        self.conn.disconnect().result(10)


def firmware(server, name, data):
    """A bucket with one object, and a role IoT may assume to read it: (bucket, role ARN)."""
    s3 = server.boto("s3")
    bucket = unique("fw").lower()
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=name, Body=data)
    iam = server.boto("iam")
    role = unique("jobs-url")
    arn = iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    iam.put_role_policy(RoleName=role, PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject",
                                                "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    return bucket, arn


def download(server, url):
    ctx = ssl.create_default_context(cafile=server.ca)
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_job_reaches_two_things_of_a_group_one_succeeds_one_fails(server, workdir):
    """The walkthrough: a job for a thing group, whose document names the firmware with a
    presigned-URL placeholder, reaches both its things (notify-next); each starts it
    (start-next) and downloads the firmware from the object store with the URL it was given;
    one reports SUCCEEDED, the other FAILED with details; describe-job counts them and the
    snapshot job is COMPLETED."""
    iot = server.boto()
    blob = b"\x7fELF firmware 2.0" * 100
    bucket, role = firmware(server, "fw/v2.bin", blob)
    group = unique("fleet")
    iot.create_thing_group(thingGroupName=group)
    devs = [Device(server, iot, unique("dev"), ALLOW_ALL, workdir) for _ in range(2)]
    for d in devs:
        iot.add_thing_to_thing_group(thingGroupName=group, thingName=d.name)
    agents = [Agent(server, d) for d in devs]
    job_id = unique("fw")
    doc = workdir / f"{job_id}.json"
    placeholder = f"${{aws:iot:s3-presigned-url:https://s3.amazonaws.com/{bucket}/fw/v2.bin}}"
    doc.write_text(json.dumps({"operation": "update", "version": "2.0", "url": placeholder}))
    group_arn = iot.describe_thing_group(thingGroupName=group)["thingGroupArn"]
    out = server.aws("iot", "create-job", "--job-id", job_id, "--targets", group_arn,
                     "--document", f"file://{doc}", "--description", "firmware 2.0",
                     "--presigned-url-config", f"roleArn={role},expiresInSec=300")
    assert out["jobArn"].endswith(f":job/{job_id}") and out["description"] == "firmware 2.0"

    for a in agents:
        ev = a.next.get(timeout=5)
        assert (ev.execution.job_id, ev.execution.status) == (job_id, "QUEUED")
        url = ev.execution.job_document["url"]
        assert url.startswith(f"https://localhost:{server.s3_port}/{bucket}/fw/v2.bin?X-Amz-Algorithm=")
        assert "X-Amz-Expires=300" in url
        assert download(server, url) == (200, blob)
        # The URL is for that object only.
        assert download(server, url.replace("/fw/v2.bin?", "/fw/other.bin?"))[0] == 403
        started = a.start_next(client_token="s1", step_timeout_in_minutes=10)
        assert (started.execution.job_id, started.execution.status, started.client_token) == \
            (job_id, "IN_PROGRESS", "s1")
        assert started.execution.version_number == 2
    agents[0].update(job_id, "SUCCEEDED", expected_version=2, include_job_execution_state=True)
    u = agents[0].updated.get(timeout=5)
    assert (u.execution_state.status, u.execution_state.version_number) == ("SUCCEEDED", 3)
    agents[1].update(job_id, "FAILED", status_details={"reason": "checksum"})
    agents[1].updated.get(timeout=5)
    # Nothing is pending any more: notify-next says so.
    for a in agents:
        ev = a.next.get(timeout=5)
        assert ev.execution is None

    job = server.aws("iot", "describe-job", "--job-id", job_id)["job"]
    assert job["status"] == "COMPLETED" and job["targets"] == [group_arn]
    counts = job["jobProcessDetails"]
    assert (counts["numberOfSucceededThings"], counts["numberOfFailedThings"], counts["numberOfQueuedThings"]) == (1, 1, 0)
    ex = server.aws("iot", "describe-job-execution", "--job-id", job_id, "--thing-name", devs[1].name)["execution"]
    assert ex["status"] == "FAILED" and ex["statusDetails"] == {"detailsMap": {"reason": "checksum"}}
    listed = server.aws("iot", "list-job-executions-for-job", "--job-id", job_id)["executionSummaries"]
    assert sorted(e["jobExecutionSummary"]["status"] for e in listed) == ["FAILED", "SUCCEEDED"]
    mine = server.aws("iot", "list-job-executions-for-thing", "--thing-name", devs[0].name)["executionSummaries"]
    assert [e["jobId"] for e in mine] == [job_id]
    # The control plane shows the document as stored, placeholder and all.
    assert json.loads(server.aws("iot", "get-job-document", "--job-id", job_id)["document"])["url"] == placeholder
    assert job_id in [j["jobId"] for j in server.aws("iot", "list-jobs", "--status", "COMPLETED")["jobs"]]
    for a in agents:
        a.close()


def test_mqtt_answers_go_to_the_requester_only_with_aws_errors(server, workdir):
    """Answers reach the requesting client without a subscription, and nobody else (another
    client subscribed to the thing's whole jobs namespace sees the requests, not the answers);
    errors carry AWS's codes, and the execution's state for version and state refusals."""
    iot = server.boto()
    dev = Device(server, iot, unique("raw"), ALLOW_ALL, workdir)
    job_id = unique("j")
    iot.create_job(jobId=job_id, targets=[iot.describe_thing(thingName=dev.name)["thingArn"]],
                   document=json.dumps({"x": 1}))
    spy = Paho(server, server.endpoint(), Device(server, iot, unique("spy"), ALLOW_ALL, workdir), unique("spy"))
    assert spy.connect()[0] == 0
    spy.subscribe(f"$aws/things/{dev.name}/jobs/#", qos=1)
    p = Paho(server, server.endpoint(), dev, dev.name)
    assert p.connect()[0] == 0
    prefix = f"$aws/things/{dev.name}/jobs"

    def ask(topic, body):
        p.c.publish(f"{prefix}/{topic}", body if isinstance(body, bytes) else json.dumps(body), qos=1)
        m = p.messages.get(timeout=5)
        return m.topic[len(prefix) + 1:], json.loads(m.payload)

    topic, body = ask("get", {"clientToken": "g"})
    assert topic == "get/accepted" and body["clientToken"] == "g"
    assert [j["jobId"] for j in body["queuedJobs"]] == [job_id] and body["inProgressJobs"] == []
    topic, body = ask(f"{job_id}/get", {})
    assert topic == f"{job_id}/get/accepted" and body["execution"]["jobDocument"] == {"x": 1}
    topic, body = ask(f"{job_id}/update", {"status": "IN_PROGRESS", "expectedVersion": 7, "clientToken": "v"})
    assert topic == f"{job_id}/update/rejected"
    assert (body["code"], body["clientToken"], body["executionState"]["versionNumber"]) == ("VersionMismatch", "v", 1)
    assert ask(f"{job_id}/update", {"status": "REJECTED"})[0] == f"{job_id}/update/accepted"
    topic, body = ask(f"{job_id}/update", {"status": "IN_PROGRESS"})
    assert (body["code"], body["executionState"]["status"]) == ("InvalidStateTransition", "REJECTED")
    assert ask(f"{job_id}/get", {})[1]["code"] == "TerminalStateReached"
    assert ask("nope/get", {})[1]["code"] == "ResourceNotFound"
    assert ask("get", b"{not json")[1]["code"] == "InvalidJson"
    assert ask(f"{job_id}/update", {"status": "TIMED_OUT"})[1]["code"] == "InvalidRequest"
    assert ask("a/b/c", {})[1]["code"] == "InvalidTopic"
    topic, body = ask("start-next", {})
    assert topic == "start-next/accepted" and "execution" not in body

    # The spy saw the requests (and the notifications), never an answer.
    seen = []
    while True:
        try:
            seen.append(spy.messages.get(timeout=0.5).topic)
        except queue.Empty:
            break
    assert f"{prefix}/get" in seen
    assert not [t for t in seen if t.endswith("/accepted") or t.endswith("/rejected")], seen
    p.close()
    spy.close()


def test_cancel_delete_and_continuous_jobs(server, workdir):
    iot = server.boto()
    group = unique("cont")
    iot.create_thing_group(thingGroupName=group)
    group_arn = iot.describe_thing_group(thingGroupName=group)["thingGroupArn"]
    first = Device(server, iot, unique("c1"), ALLOW_ALL, workdir)
    iot.add_thing_to_thing_group(thingGroupName=group, thingName=first.name)
    job_id = unique("cj")
    iot.create_job(jobId=job_id, targets=[group_arn], document="{}", targetSelection="CONTINUOUS",
                   timeoutConfig={"inProgressTimeoutInMinutes": 30})
    # A thing that joins the group later gets the job, and hears of it on notify.
    late = Device(server, iot, unique("c2"), ALLOW_ALL, workdir)
    p = Paho(server, server.endpoint(), late, late.name)
    assert p.connect()[0] == 0
    p.subscribe(f"$aws/things/{late.name}/jobs/notify", qos=1)
    iot.add_thing_to_thing_group(thingGroupName=group, thingName=late.name)
    note = json.loads(p.messages.get(timeout=5).payload)
    assert [j["jobId"] for j in note["jobs"]["QUEUED"]] == [job_id]
    p.c.publish(f"$aws/things/{late.name}/jobs/start-next", b"{}", qos=1)
    started = json.loads(p.messages.get(timeout=5).payload)
    assert 0 < started["execution"]["queuedAt"] <= started["execution"]["startedAt"]
    ex = iot.describe_job_execution(jobId=job_id, thingName=late.name)["execution"]
    assert ex["status"] == "IN_PROGRESS" and 1700 < ex["approximateSecondsBeforeTimedOut"] <= 1800

    # An IN_PROGRESS execution is canceled only with force; a running job deleted only with it.
    with pytest.raises(iot.exceptions.InvalidStateTransitionException):
        iot.cancel_job_execution(jobId=job_id, thingName=late.name)
    with pytest.raises(iot.exceptions.InvalidStateTransitionException):
        iot.delete_job(jobId=job_id)
    iot.cancel_job(jobId=job_id, reasonCode="BAD_BUILD", comment="stop")
    d = iot.describe_job(jobId=job_id)["job"]
    assert (d["status"], d["reasonCode"], d["jobProcessDetails"]["numberOfCanceledThings"],
            d["jobProcessDetails"]["numberOfInProgressThings"]) == ("CANCELED", "BAD_BUILD", 1, 1)
    iot.cancel_job(jobId=job_id, force=True)
    assert iot.describe_job_execution(jobId=job_id, thingName=late.name)["execution"]["forceCanceled"] is True
    iot.delete_job(jobId=job_id)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_job(jobId=job_id)
    with pytest.raises(iot.exceptions.ResourceAlreadyExistsException):
        iot.create_job(jobId="dup-" + job_id, targets=[group_arn], document="{}")
        iot.create_job(jobId="dup-" + job_id, targets=[group_arn], document="{}")
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.create_job(jobId=unique("x"), targets=[group_arn.replace(group, "no-such-group")], document="{}")
    with pytest.raises(iot.exceptions.InvalidRequestException):
        iot.create_job(jobId=unique("x"), targets=[group_arn], document="[1, 2]")
    p.close()


def test_devices_cannot_touch_other_things_jobs(server, workdir):
    """With a policy for its own jobs topics only, a device cannot ask about or update another
    thing's executions (MQTT 5: PUBACK 0x87, no answer), and an IAM user allowed
    DescribeJobExecution on one thing cannot describe another's."""
    iot = server.boto()
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    me = "${iot:Connection.Thing.ThingName}"
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/{me}"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": f"{arn}:topic/$aws/things/{me}/jobs/*"}]}
    mine = Device(server, iot, unique("own"), policy, workdir, exclusive=True)
    other = Device(server, iot, unique("oth"), ALLOW_ALL, workdir)
    job_id = unique("pj")
    iot.create_job(jobId=job_id, targets=[iot.describe_thing(thingName=t)["thingArn"] for t in (mine.name, other.name)],
                   document="{}")
    p = Paho(server, server.endpoint(), mine, mine.name, v5=True)
    assert p.connect()[0] == 0
    p.c.publish(f"$aws/things/{mine.name}/jobs/get", b"{}", qos=1)
    assert json.loads(p.messages.get(timeout=5).payload)["queuedJobs"][0]["jobId"] == job_id
    p.pubacks.get(timeout=5)
    for topic in (f"$aws/things/{other.name}/jobs/get", f"$aws/things/{other.name}/jobs/{job_id}/update"):
        p.c.publish(topic, b'{"status":"SUCCEEDED"}', qos=1)
        assert p.pubacks.get(timeout=5)[1].value == 0x87
    with pytest.raises(queue.Empty):
        p.messages.get(timeout=0.5)
    assert iot.describe_job_execution(jobId=job_id, thingName=other.name)["execution"]["status"] == "QUEUED"
    p.close()


def test_executions_survive_sigkill(workdir):
    s = Server(workdir / unique("jobskill")).start()
    try:
        iot = s.boto()
        dev = Device(s, iot, unique("k"), ALLOW_ALL, workdir)
        thing_arn = iot.describe_thing(thingName=dev.name)["thingArn"]
        for j in ("first", "second"):
            iot.create_job(jobId=j, targets=[thing_arn], document=json.dumps({"j": j}))
        a = Agent(s, dev)
        assert a.start_next(step_timeout_in_minutes=5).execution.job_id == "first"
        s.stop(signal.SIGKILL)
        s.start()
        a = Agent(s, dev)
        # The IN_PROGRESS one comes first, with its version, then the queued one.
        ex = a.start_next().execution
        assert (ex.job_id, ex.status, ex.version_number) == ("first", "IN_PROGRESS", 2)
        a.update("first", "SUCCEEDED", expected_version=2)
        assert a.start_next().execution.job_id == "second"
        a.close()
        time.sleep(0.1)
    finally:
        s.stop()


def test_the_https_jobs_data_plane(server, workdir):
    """`aws iot-jobs-data` (SigV4, signing name iot-jobs-data, on the iot:Jobs endpoint that
    DescribeEndpoint names) and curl with the device's certificate: pending executions,
    start-next, describe (the document as a string), update with AWS's errors; a signature for
    another service is refused; a certificate reaches only the things its policy names."""
    iot = server.boto()
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    dev = Device(server, iot, unique("hj"), ALLOW_ALL, workdir)
    other = Device(server, iot, unique("hj-other"), ALLOW_ALL, workdir)
    job_id = unique("hj")
    iot.create_job(jobId=job_id, targets=[iot.describe_thing(thingName=t)["thingArn"] for t in (dev.name, other.name)],
                   document=json.dumps({"step": 1}))
    endpoint = iot.describe_endpoint(endpointType="iot:Jobs")["endpointAddress"]
    assert endpoint.split(".")[1:3] == ["jobs", "iot"]

    def cli(*args, check=True):
        return server.aws("iot-jobs-data", *args, check=check)
    pending = cli("get-pending-job-executions", "--thing-name", dev.name)
    assert [j["jobId"] for j in pending["queuedJobs"]] == [job_id] and pending["inProgressJobs"] == []
    ex = cli("start-next-pending-job-execution", "--thing-name", dev.name, "--step-timeout-in-minutes", "5",
             "--status-details", "phase=download")["execution"]
    assert (ex["jobId"], ex["status"], ex["statusDetails"], json.loads(ex["jobDocument"])) == \
        (job_id, "IN_PROGRESS", {"phase": "download"}, {"step": 1})
    assert 240 < ex["approximateSecondsBeforeTimedOut"] <= 300
    d = cli("describe-job-execution", "--thing-name", dev.name, "--job-id", job_id, "--no-include-job-document")
    assert "jobDocument" not in d["execution"] and d["execution"]["versionNumber"] == 2
    out = cli("update-job-execution", "--thing-name", dev.name, "--job-id", job_id, "--status", "SUCCEEDED",
              "--expected-version", "2", "--include-job-execution-state")
    assert out["executionState"] == {"status": "SUCCEEDED", "statusDetails": {"phase": "download"}, "versionNumber": 3}
    cp = cli("update-job-execution", "--thing-name", dev.name, "--job-id", job_id, "--status", "IN_PROGRESS", check=False)
    assert cp.returncode != 0 and "InvalidStateTransitionException" in cp.stderr
    cp = cli("describe-job-execution", "--thing-name", dev.name, "--job-id", job_id, check=False)
    assert cp.returncode != 0 and "TerminalStateException" in cp.stderr
    cp = cli("describe-job-execution", "--thing-name", dev.name, "--job-id", "nope", check=False)
    assert cp.returncode != 0 and "ResourceNotFoundException" in cp.stderr

    # A SigV4 signature for iot-data does not reach the jobs data plane (nor the reverse).
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    import urllib.request as ur
    sess = server.boto("sts")._request_signer._credentials
    url = f"https://{endpoint}:{server.https_port}/things/{dev.name}/jobs"
    req = AWSRequest(method="GET", url=url)
    SigV4Auth(sess, "iotdata", "us-east-1").add_auth(req)
    ctx = ssl.create_default_context(cafile=server.ca)
    with pytest.raises(urllib.error.HTTPError) as e:
        ur.urlopen(ur.Request(url, headers=dict(req.headers.items())), context=ctx, timeout=10)
    assert e.value.code == 401

    # With the device's certificate: its own thing only (the policy names it).
    name = unique("hj-cert")
    limited = Device(server, iot, name, {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iot:GetPendingJobExecutions", "iot:StartNextPendingJobExecution"],
         "Resource": f"{arn}:thing/{name}"}]}, workdir)

    def curl(method, path, cert_dev):
        cp = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--cacert", server.ca, "--cert", str(cert_dev.cert),
                             "--key", str(cert_dev.key), "-X", method, f"https://{endpoint}:{server.https_port}{path}"],
                            capture_output=True, text=True, timeout=15)
        body, code = cp.stdout.rsplit("\n", 1)
        return int(code), json.loads(body) if body else None
    code, body = curl("GET", f"/things/{other.name}/jobs", dev)
    assert code == 200 and [j["jobId"] for j in body["queuedJobs"]] == [job_id]
    code, body = curl("GET", f"/things/{name}/jobs", limited)
    assert code == 200 and body == {"inProgressJobs": [], "queuedJobs": []}
    code, _ = curl("GET", f"/things/{other.name}/jobs", limited)
    assert code == 403
    code, _ = curl("PUT", f"/things/{other.name}/jobs/%24next", limited)
    assert code == 403

    # An IAM caller is held to the data plane's own actions (iotjobsdata:*): the control
    # plane's iot:DescribeJobExecution (a read) does not let it act as the device.
    import boto3
    from botocore.config import Config
    from helpers import keys
    iam = server.boto("iam")
    user = unique("reader")
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
            "iot:DescribeJobExecution", "iot:GetPendingJobExecutions", "iot:StartNextPendingJobExecution"]}]}))
    creds = keys(iam.create_access_key(UserName=user)["AccessKey"])
    jd = boto3.client("iot-jobs-data", region_name="us-east-1", endpoint_url=f"https://{endpoint}:{server.https_port}",
                      verify=server.ca, config=Config(retries={"total_max_attempts": 1}), **creds)
    time.sleep(0.1)
    with pytest.raises(jd.exceptions.ClientError) as e:
        jd.get_pending_job_executions(thingName=other.name)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "iotjobsdata:GetPendingJobExecutions" in e.value.response["Error"]["Message"]
    with pytest.raises(jd.exceptions.ClientError):
        jd.describe_job_execution(thingName=other.name, jobId=job_id)
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": f"{arn}:thing/{other.name}",
                                                "Action": "iotjobsdata:DescribeJobExecution"}]}))
    time.sleep(0.1)
    assert jd.describe_job_execution(thingName=other.name, jobId=job_id)["execution"]["jobId"] == job_id
    with pytest.raises(jd.exceptions.ClientError):
        jd.get_pending_job_executions(thingName=other.name)


def test_roles_groups_and_ids_after_review(server, workdir):
    """A job's presigned-URL role needs iam:PassRole (IoT would act with it for the caller); a
    CONTINUOUS job does not follow a deleted group's name to a new group; a job id may begin
    with "notify"."""
    import boto3
    from botocore.config import Config
    from helpers import keys
    iot = server.boto()
    iam = server.boto("iam")
    bucket, role = firmware(server, "secret.txt", b"TOPSECRET")
    dev = Device(server, iot, unique("pr"), ALLOW_ALL, workdir)
    thing_arn = iot.describe_thing(thingName=dev.name)["thingArn"]
    user = unique("jobber")
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["iot:CreateJob", "iot:UpdateJob"],
                                                "Resource": "*"}]}))
    c = boto3.client("iot", region_name="us-east-1", endpoint_url=f"https://localhost:{server.api_port}",
                     verify=server.ca, config=Config(retries={"max_attempts": 1}),
                     **keys(iam.create_access_key(UserName=user)["AccessKey"]))
    time.sleep(0.1)
    doc = json.dumps({"url": f"${{aws:iot:s3-presigned-url:https://s3.amazonaws.com/{bucket}/secret.txt}}"})
    with pytest.raises(c.exceptions.ClientError) as e:
        c.create_job(jobId=unique("steal"), targets=[thing_arn], document=doc,
                     presignedUrlConfig={"roleArn": role})
    assert e.value.response["Error"]["Code"] == "AccessDeniedException" and "iam:PassRole" in e.value.response["Error"]["Message"]
    plain = unique("plain")
    c.create_job(jobId=plain, targets=[thing_arn], document=doc)
    with pytest.raises(c.exceptions.ClientError):
        c.update_job(jobId=plain, presignedUrlConfig={"roleArn": role})
    with pytest.raises(iot.exceptions.InvalidRequestException):
        iot.create_job(jobId=unique("x"), targets=[thing_arn], document="{}",
                       presignedUrlConfig={"roleArn": f"arn:aws:iam::999999999999:role/{role.split('/')[-1]}"})
    # Kept configurations are bounded (boto3 checks their shape but not this: skip its checks).
    raw = server.boto(config=Config(parameter_validation=False))
    crit = {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 10, "minNumberOfExecutedThings": 1}
    with pytest.raises(raw.exceptions.InvalidRequestException):
        raw.create_job(jobId=unique("x"), targets=[thing_arn], document="{}", abortConfig={"criteriaList": [crit] * 100})
    ok = unique("ok")
    raw.create_job(jobId=ok, targets=[thing_arn], document="{}", abortConfig={"criteriaList": [crit]})
    assert iot.describe_job(jobId=ok)["job"]["abortConfig"]["criteriaList"][0]["action"] == "CANCEL"

    # A continuous job's group deleted and created again elsewhere: the job does not follow.
    group = unique("beta")
    iot.create_thing_group(thingGroupName=group)
    cont = unique("cont")
    iot.create_job(jobId=cont, targets=[iot.describe_thing_group(thingGroupName=group)["thingGroupArn"]],
                   document="{}", targetSelection="CONTINUOUS")
    iot.delete_thing_group(thingGroupName=group)
    iot.create_thing_group(thingGroupName=group)
    newcomer = Device(server, iot, unique("new"), ALLOW_ALL, workdir)
    iot.add_thing_to_thing_group(thingGroupName=group, thingName=newcomer.name)
    assert iot.list_job_executions_for_thing(thingName=newcomer.name)["executionSummaries"] == []
    assert cont not in [j["jobId"] for j in iot.list_jobs(thingGroupName=group)["jobs"]]

    # A job id beginning with "notify" works over MQTT.
    nid = unique("notify-fw")
    iot.create_job(jobId=nid, targets=[thing_arn], document="{}")
    p = Paho(server, server.endpoint(), dev, dev.name)
    assert p.connect()[0] == 0
    p.c.publish(f"$aws/things/{dev.name}/jobs/{nid}/update", json.dumps({"status": "IN_PROGRESS"}), qos=1)
    m = p.messages.get(timeout=5)
    assert m.topic.endswith(f"/{nid}/update/accepted")
    p.close()


def test_presigned_url_credentials_are_reused_and_follow_the_role(server, workdir):
    """Every delivery of a document with presigned URLs (get, start-next, notify-next, HTTPS)
    needs the role's credentials: one session serves them all, also for the default and
    longest expiresInSec (3600), so an account's stored sessions do not grow with requests.
    A role deleted and re-created under the same name gets a session of its own."""
    from urllib.parse import parse_qs, urlparse
    iot = server.boto()
    iam = server.boto("iam")
    bucket, role = firmware(server, "fw.bin", b"firmware")
    dev = Device(server, iot, unique("reuse"), ALLOW_ALL, workdir)
    job_id = unique("reuse")
    iot.create_job(jobId=job_id, targets=[iot.describe_thing(thingName=dev.name)["thingArn"]],
                   document=json.dumps({"url": f"${{aws:iot:s3-presigned-url:https://s3.amazonaws.com/{bucket}/fw.bin}}"}),
                   presignedUrlConfig={"roleArn": role})

    def url():
        ex = server.aws("iot-jobs-data", "describe-job-execution", "--thing-name", dev.name, "--job-id", job_id,
                        "--include-job-document")["execution"]
        u = json.loads(ex["jobDocument"])["url"]
        q = parse_qs(urlparse(u).query)
        assert q["X-Amz-Expires"] == ["3600"]
        return u, q["X-Amz-Credential"][0].split("/")[0]
    first, key = url()
    assert key.startswith("ASIA")
    assert {url()[1] for _ in range(3)} == {key}
    assert download(server, first) == (200, b"firmware")
    # Deleted and re-created: the old session's URLs stop working, a new session is issued.
    name = role.split("/")[-1]
    iam.delete_role_policy(RoleName=name, PolicyName="read")
    iam.delete_role(RoleName=name)
    assert download(server, first)[0] == 403
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))
    iam.put_role_policy(RoleName=name, PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject",
                                                "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    second, key2 = url()
    assert key2 != key
    assert download(server, second) == (200, b"firmware")


def test_a_staged_rollout_with_the_cli(server, workdir):
    """`--job-executions-rollout-config`: the things a job targets get their executions (and
    their notify-next) at most maximumPerMinute a minute; describe-job returns the setting;
    values out of AWS's range are refused. (The minutes after the first are tested on a
    virtual clock: crates/registry/src/jobs.rs.)"""
    iot = server.boto()
    devs = [Device(server, iot, unique("roll"), ALLOW_ALL, workdir) for _ in range(3)]
    arns = [iot.describe_thing(thingName=d.name)["thingArn"] for d in devs]
    job_id = unique("staged")
    out = server.aws("iot", "create-job", "--job-id", job_id, "--targets", *arns, "--document", '{"op":"x"}',
                     "--job-executions-rollout-config", "maximumPerMinute=2")
    assert out["jobId"] == job_id
    job = iot.describe_job(jobId=job_id)["job"]
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 2}
    assert job["status"] == "IN_PROGRESS" and job["jobProcessDetails"]["numberOfQueuedThings"] == 2
    listed = iot.list_job_executions_for_job(jobId=job_id)["executionSummaries"]
    assert len(listed) == 2
    # Which two: the first in order; the third has nothing yet, not even a pending job.
    waiting = [d for d in devs if d.name not in {e["thingArn"].split("/")[-1] for e in listed}]
    assert len(waiting) == 1
    pending = server.aws("iot-jobs-data", "get-pending-job-executions", "--thing-name", waiting[0].name)
    assert pending["queuedJobs"] == []
    cp = server.aws("iot", "create-job", "--job-id", unique("x"), "--targets", arns[0], "--document", "{}",
                    "--job-executions-rollout-config", "maximumPerMinute=1001", check=False)
    assert cp.returncode != 0 and "InvalidRequestException" in cp.stderr and "maximumPerMinute" in cp.stderr
    # The CLI checks incrementFactor's range itself; the server checks it too.
    from botocore.config import Config
    raw = server.boto(config=Config(parameter_validation=False))
    with pytest.raises(raw.exceptions.InvalidRequestException) as e:
        raw.create_job(jobId=unique("x"), targets=[arns[0]], document="{}", jobExecutionsRolloutConfig={
            "exponentialRate": {"baseRatePerMinute": 5, "incrementFactor": 1.05,
                                "rateIncreaseCriteria": {"numberOfNotifiedThings": 2}}})
    assert "incrementFactor" in str(e.value)
    iot.cancel_job(jobId=job_id)


def test_a_failed_execution_is_retried(server, workdir):
    """`--job-executions-retry-config`: an execution the device reports FAILED comes back
    QUEUED as its next execution number (retryAttempt 1), as many times as allowed; then the
    failure stands and the job completes."""
    iot = server.boto()
    dev = Device(server, iot, unique("retry"), ALLOW_ALL, workdir)
    job_id = unique("retry")
    server.aws("iot", "create-job", "--job-id", job_id, "--targets", iot.describe_thing(thingName=dev.name)["thingArn"],
               "--document", '{"op":"flash"}', "--job-executions-retry-config",
               '{"criteriaList":[{"failureType":"FAILED","numberOfRetries":1}]}')
    assert iot.describe_job(jobId=job_id)["job"]["jobExecutionsRetryConfig"] == {
        "criteriaList": [{"failureType": "FAILED", "numberOfRetries": 1}]}

    def data(*args):
        return server.aws("iot-jobs-data", *args)
    ex = data("start-next-pending-job-execution", "--thing-name", dev.name)["execution"]
    assert ex["executionNumber"] == 1
    data("update-job-execution", "--thing-name", dev.name, "--job-id", job_id, "--status", "FAILED")
    pending = data("get-pending-job-executions", "--thing-name", dev.name)
    assert [(j["jobId"], j["executionNumber"]) for j in pending["queuedJobs"]] == [(job_id, 2)]
    summary = iot.list_job_executions_for_thing(thingName=dev.name)["executionSummaries"][0]["jobExecutionSummary"]
    assert (summary["status"], summary["executionNumber"], summary["retryAttempt"]) == ("QUEUED", 2, 1)
    data("update-job-execution", "--thing-name", dev.name, "--job-id", job_id, "--status", "FAILED")
    assert data("get-pending-job-executions", "--thing-name", dev.name)["queuedJobs"] == []
    job = iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "COMPLETED" and job["jobProcessDetails"]["numberOfFailedThings"] == 1
    cp = server.aws("iot", "create-job", "--job-id", unique("x"), "--targets", iot.describe_thing(thingName=dev.name)["thingArn"],
                    "--document", "{}", "--job-executions-retry-config",
                    '{"criteriaList":[{"failureType":"FAILED","numberOfRetries":1},{"failureType":"FAILED","numberOfRetries":2}]}',
                    check=False)
    assert cp.returncode != 0 and "InvalidRequestException" in cp.stderr


def test_jobs_requests_per_thing_are_throttled_over_mqtt_and_https(workdir):
    """Ten requests a second per thing (a burst of twenty), MQTT and HTTPS drawing on one
    bucket: a burst of MQTT requests beyond it is rejected with RequestThrottled, then HTTPS
    requests for the same thing get 429 ThrottlingException once the bucket is empty, and in
    all no more pass than the burst and what refilled meanwhile; another thing is not affected.
    (Bounds from the measured time, so that a slow machine does not make the test flaky.)"""
    import http.client
    s = Server(workdir / unique("jobsrate"), throttles=True).start()
    try:
        iot = s.boto()
        dev = Device(s, iot, unique("rate"), ALLOW_ALL, workdir)
        other = Device(s, iot, unique("rate2"), ALLOW_ALL, workdir)
        p = Paho(s, s.endpoint(), dev, dev.name)
        assert p.connect()[0] == 0
        prefix = f"$aws/things/{dev.name}/jobs"
        p.subscribe(f"{prefix}/get/+", qos=0)
        endpoint = iot.describe_endpoint(endpointType="iot:Jobs")["endpointAddress"]

        def https(d):
            ctx = ssl.create_default_context(cafile=s.ca)
            ctx.load_cert_chain(str(d.cert), str(d.key))
            return http.client.HTTPSConnection(endpoint, s.https_port, context=ctx, timeout=10)
        conn = https(dev)
        conn.request("GET", f"/things/{dev.name}/jobs")
        assert conn.getresponse().read() and True  # connected (and one request spent)
        start = time.time()
        for i in range(30):
            p.c.publish(f"{prefix}/get", json.dumps({"clientToken": str(i)}), qos=0)
        got = []
        while len(got) < 30 and time.time() < start + 10:
            try:
                m = p.messages.get(timeout=1)
            except queue.Empty:
                continue
            got.append((m.topic.rsplit("/", 1)[1], json.loads(m.payload)))
        assert len(got) == 30
        rejected = [d for kind, d in got if kind == "rejected"]
        assert rejected and {d["code"] for d in rejected} == {"RequestThrottled"}
        passed = 30 - len(rejected)
        codes = []
        while len(codes) < 40 and (not codes or codes[-1] != 429):
            conn.request("GET", f"/things/{dev.name}/jobs")
            r = conn.getresponse()
            r.read()
            kind = r.getheader("x-amzn-ErrorType")
            codes.append(r.status)
        elapsed = time.time() - start
        assert codes[-1] == 429 and kind == "ThrottlingException"
        passed += codes.count(200)
        # One was spent before; the burst is twenty; ten a second came back meanwhile.
        assert passed + 1 <= 20 + 10 * elapsed + 1, (passed, elapsed)
        c2 = https(other)
        c2.request("GET", f"/things/{other.name}/jobs")
        assert c2.getresponse().status == 200
        p.close()
    finally:
        s.stop()


def test_job_templates_with_the_cli(server, workdir):
    """Job templates: create from a document or from an existing job, describe, list, delete;
    CreateJob with --job-template-arn takes the template's document and settings unless the
    request gives its own; a template's presigned-URL role needs iam:PassRole from whoever
    makes a job of it; a template of another account is refused."""
    import boto3
    from botocore.config import Config
    from helpers import keys
    iot = server.boto()
    dev = Device(server, iot, unique("tpl"), ALLOW_ALL, workdir)
    thing_arn = iot.describe_thing(thingName=dev.name)["thingArn"]
    tid = unique("tpl")
    out = server.aws("iot", "create-job-template", "--job-template-id", tid, "--description", "firmware",
                     "--document", '{"op":"flash","v":2}', "--timeout-config", "inProgressTimeoutInMinutes=30",
                     "--job-executions-retry-config", '{"criteriaList":[{"failureType":"FAILED","numberOfRetries":2}]}')
    assert out["jobTemplateArn"].endswith(f":jobtemplate/{tid}") and out["jobTemplateId"] == tid
    d = server.aws("iot", "describe-job-template", "--job-template-id", tid)
    assert (d["description"], json.loads(d["document"]), d["timeoutConfig"]) == (
        "firmware", {"op": "flash", "v": 2}, {"inProgressTimeoutInMinutes": 30})
    assert tid in [t["jobTemplateId"] for t in server.aws("iot", "list-job-templates")["jobTemplates"]]
    cp = server.aws("iot", "create-job-template", "--job-template-id", tid, "--document", "{}", "--description", "d",
                    check=False)
    assert cp.returncode != 0 and "ConflictException" in cp.stderr

    job = unique("fromtpl")
    server.aws("iot", "create-job", "--job-id", job, "--targets", thing_arn, "--job-template-arn", out["jobTemplateArn"])
    j = iot.describe_job(jobId=job)["job"]
    assert (j["jobTemplateArn"], j["description"], j["timeoutConfig"], j["jobExecutionsRetryConfig"]) == (
        out["jobTemplateArn"], "firmware", {"inProgressTimeoutInMinutes": 30},
        {"criteriaList": [{"failureType": "FAILED", "numberOfRetries": 2}]})
    assert json.loads(iot.get_job_document(jobId=job)["document"]) == {"op": "flash", "v": 2}
    # The request's own document and description win.
    own = unique("own")
    iot.create_job(jobId=own, targets=[thing_arn], jobTemplateArn=out["jobTemplateArn"], document='{"op":"x"}',
                   description="mine")
    assert json.loads(iot.get_job_document(jobId=own)["document"]) == {"op": "x"}
    assert iot.describe_job(jobId=own)["job"]["description"] == "mine"
    # From an existing job.
    copy = unique("copy")
    server.aws("iot", "create-job-template", "--job-template-id", copy, "--job-arn", j["jobArn"], "--description", "c")
    assert json.loads(server.aws("iot", "describe-job-template", "--job-template-id", copy)["document"]) == {
        "op": "flash", "v": 2}
    # A description is required (the server says so too).
    raw = server.boto(config=Config(parameter_validation=False))
    with pytest.raises(raw.exceptions.InvalidRequestException):
        raw.create_job_template(jobTemplateId=unique("nodesc"), document="{}")
    # Another account's template (or a made-up ARN) is refused.
    cp = server.aws("iot", "create-job", "--job-id", unique("x"), "--targets", thing_arn, "--job-template-arn",
                    f"arn:aws:iot:us-east-1:999999999999:jobtemplate/{tid}", check=False)
    assert cp.returncode != 0 and "InvalidRequestException" in cp.stderr
    # A template with a presigned-URL role: a user allowed CreateJob but not iam:PassRole may
    # not make a job of it.
    bucket, role = firmware(server, "fw.bin", b"x")
    signed = unique("signed")
    iot.create_job_template(jobTemplateId=signed, document=json.dumps({"url": f"${{aws:iot:s3-presigned-url:https://s3.amazonaws.com/{bucket}/fw.bin}}"}),
                            description="signed", presignedUrlConfig={"roleArn": role})
    iam = server.boto("iam")
    user = unique("tpluser")
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:CreateJob", "Resource": "*"}]}))
    c = boto3.client("iot", region_name="us-east-1", endpoint_url=f"https://localhost:{server.api_port}",
                     verify=server.ca, config=Config(retries={"total_max_attempts": 1}),
                     **keys(iam.create_access_key(UserName=user)["AccessKey"]))
    time.sleep(0.1)
    tarn = iot.describe_job_template(jobTemplateId=signed)["jobTemplateArn"]
    with pytest.raises(c.exceptions.ClientError) as e:
        c.create_job(jobId=unique("steal"), targets=[thing_arn], jobTemplateArn=tarn)
    assert "iam:PassRole" in e.value.response["Error"]["Message"]
    for t in (tid, copy, signed):
        server.aws("iot", "delete-job-template", "--job-template-id", t)
    cp = server.aws("iot", "describe-job-template", "--job-template-id", tid, check=False)
    assert cp.returncode != 0 and "ResourceNotFoundException" in cp.stderr
    for x in (job, own):
        iot.cancel_job(jobId=x)


def test_a_scheduled_job_with_the_cli(server, workdir):
    """`--scheduling-config`: a job with a startTime is SCHEDULED, reaches no thing before it,
    and can be canceled; times out of AWS's bounds and maintenance windows are refused. (Its
    start and end are tested on a virtual clock: crates/registry/src/jobs.rs.)"""
    import datetime
    iot = server.boto()
    dev = Device(server, iot, unique("sched"), ALLOW_ALL, workdir)
    thing_arn = iot.describe_thing(thingName=dev.name)["thingArn"]
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)
    start = soon.strftime("%Y-%m-%dT%H:%M")
    end = (soon + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    job = unique("sched")
    server.aws("iot", "create-job", "--job-id", job, "--targets", thing_arn, "--document", "{}",
               "--scheduling-config", f"startTime={start},endTime={end},endBehavior=CANCEL")
    j = iot.describe_job(jobId=job)["job"]
    assert j["status"] == "SCHEDULED" and j["schedulingConfig"]["startTime"] == start
    assert j["jobProcessDetails"]["numberOfQueuedThings"] == 0
    assert server.aws("iot-jobs-data", "get-pending-job-executions", "--thing-name", dev.name)["queuedJobs"] == []
    assert job in [x["jobId"] for x in iot.list_jobs(status="SCHEDULED")["jobs"]]
    iot.cancel_job(jobId=job)
    assert iot.describe_job(jobId=job)["job"]["status"] == "CANCELED"
    too_soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M")
    cp = server.aws("iot", "create-job", "--job-id", unique("x"), "--targets", thing_arn, "--document", "{}",
                    "--scheduling-config", f"startTime={too_soon}", check=False)
    assert cp.returncode != 0 and "InvalidRequestException" in cp.stderr and "startTime" in cp.stderr
    cp = server.aws("iot", "create-job", "--job-id", unique("x"), "--targets", thing_arn, "--document", "{}",
                    "--scheduling-config", json.dumps({"startTime": start, "maintenanceWindows": [
                        {"startTime": "cron(0 0 * * ? *)", "durationInMinutes": 30}]}), check=False)
    assert cp.returncode != 0 and "maintenanceWindows" in cp.stderr
