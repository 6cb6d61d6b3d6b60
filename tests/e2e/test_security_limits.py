"""Resource limits per account, configured in `[limits]` (docs/security.md, resource exhaustion),
each at N and N+1 with real clients, and who may read the unsigned /metrics."""

import uuid

import pytest
import requests
from botocore.exceptions import ClientError

from conftest import ALLOW_ALL, Device, Paho, Server, unique

LIMITS = """
[limits]
retained_messages = 2
sessions = 3
multipart_uploads = 1
"""


@pytest.fixture(scope="module")
def limited(workdir):
    s = Server(workdir / f"limits-{uuid.uuid4().hex[:6]}", config='metrics_allow = ["10.0.0.0/8"]\n' + LIMITS).start()
    yield s
    s.stop()


def s3(server):
    return server.boto("s3")


def test_retained_messages_quota_at_n_and_n_plus_1(limited, workdir):
    """Two retained messages fit; the third new topic gets MQTT 5 PUBACK 0x97 (quota exceeded);
    replacing one of the two still works."""
    iot = limited.boto()
    dev = Device(limited, iot, unique("ret"), ALLOW_ALL, workdir)
    p = Paho(limited, limited.endpoint(), dev, dev.name, v5=True)
    assert p.connect()[0] == 0
    codes = []
    for topic in ["r/1", "r/2", "r/3", "r/1"]:
        info = p.c.publish(topic, b"state", qos=1, retain=True)
        info.wait_for_publish(10)
        codes.append(p.pubacks.get(timeout=10)[1].value)
    p.close()
    assert codes == [0, 0, 0x97, 0], codes


def test_session_quota_at_n_and_n_plus_1(limited, workdir):
    """Three sessions fit (the retained test's clean session ended with it); the fourth client
    id gets CONNACK 0x97 (MQTT 5) / 3 (3.1.1), and a client id that already has a session may
    come back."""
    iot = limited.boto()
    dev = Device(limited, iot, unique("ses"), ALLOW_ALL, workdir)
    host = limited.endpoint()
    held = []
    refused = None
    for i in range(4):
        p = Paho(limited, host, dev, f"{dev.name}-{i}", v5=True)
        rc = p.connect()[0]
        if rc != 0:
            refused = (i, rc.value)
            break
        held.append(p)
    assert refused == (3, 0x97), (refused, len(held))
    v3 = Paho(limited, host, dev, f"{dev.name}-v3")
    # paho reports 3.1.1 return code 3 (server unavailable) as reason 0x88.
    assert v3.connect()[0].value == 0x88, "MQTT 3.1.1: server unavailable"
    v3.close()
    # Positive control: an existing session's client id takes it back (takeover).
    again = Paho(limited, host, dev, f"{dev.name}-0", v5=True)
    assert again.connect()[0] == 0
    again.close()
    for p in held:
        p.close()


def test_multipart_uploads_quota_at_n_and_n_plus_1(limited):
    """One upload in progress fits; the second is refused (400 InvalidRequest); aborting frees
    the slot."""
    c = s3(limited)
    bucket = unique("mpu").lower()
    c.create_bucket(Bucket=bucket)
    first = c.create_multipart_upload(Bucket=bucket, Key="a")["UploadId"]
    with pytest.raises(ClientError) as e:
        c.create_multipart_upload(Bucket=bucket, Key="b")
    assert e.value.response["Error"]["Code"] == "InvalidRequest"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    c.abort_multipart_upload(Bucket=bucket, Key="a", UploadId=first)
    c.abort_multipart_upload(Bucket=bucket, Key="b", UploadId=c.create_multipart_upload(Bucket=bucket, Key="b")["UploadId"])


def test_metrics_only_for_allowed_networks(limited, server):
    """/metrics sums every account: a server that allows only 10.0.0.0/8 refuses a loopback
    reader with 403; the default server (loopback allowed) serves it."""
    r = requests.get(f"https://localhost:{limited.api_port}/metrics", verify=limited.ca, timeout=10)
    assert r.status_code == 403 and r.headers.get("x-amzn-errortype") == "AccessDeniedException", r.text
    ok = requests.get(f"https://localhost:{server.api_port}/metrics", verify=server.ca, timeout=10)
    assert ok.status_code == 200 and "sekisho_connections" in ok.text
