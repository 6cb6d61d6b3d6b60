"""Small helpers shared by the end-to-end test modules (boto3 results, IAM documents, raw MQTT
encoding, S3 error bodies). Fixtures and servers live in conftest.py."""

import json
import queue
import struct
import time
import xml.etree.ElementTree as ET

from botocore.exceptions import ClientError

from conftest import unique

def code(e):
    return e.response["Error"]["Code"]


def keys(k):
    return {"aws_access_key_id": k["AccessKeyId"], "aws_secret_access_key": k["SecretAccessKey"]}


def temp(c):
    return {"aws_access_key_id": c["AccessKeyId"], "aws_secret_access_key": c["SecretAccessKey"],
            "aws_session_token": c["SessionToken"]}


def arn_of(s):
    return f"arn:aws:iot:us-east-1:{s.account_id()}"


def bucket_name(prefix):
    return unique(prefix).lower().replace("_", "-")


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s16(b):
    return struct.pack(">H", len(b)) + b


def outcome(call):
    """Runs a boto3 call: ("ok", 200) if it succeeded, else (error code, HTTP status)."""
    try:
        call()
        return "ok", 200
    except ClientError as e:
        return code(e), e.response["ResponseMetadata"]["HTTPStatusCode"]


def drain(q, timeout=0.5):
    """Items of `q` until none has come for `timeout` seconds."""
    out = []
    while True:
        try:
            out.append(q.get(timeout=timeout))
        except queue.Empty:
            return out


def drain_for(q, seconds):
    """Items of `q` that come within `seconds`."""
    out = []
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return out
        try:
            out.append(q.get(timeout=left))
        except queue.Empty:
            return out


def wait_for(q, pred, timeout):
    """The first item of `q` satisfying `pred` within `timeout` seconds, else None."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return None
        try:
            item = q.get(timeout=left)
        except queue.Empty:
            return None
        if pred(item):
            return item


def s3_error(body):
    """(Code, Message) of an S3 XML error body."""
    assert body, "expected an S3 error body, got an empty one"
    root = ET.fromstring(body)
    return root.findtext("Code"), root.findtext("Message")


def doc(*statements):
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(action, resource="*", **extra):
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}
