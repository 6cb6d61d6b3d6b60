"""Debian's mosquitto clients, live registry changes on open connections, and restarts."""

import json
import queue
import subprocess
import time

import pytest

from conftest import ALLOW_ALL, Device, Paho, Server, thing_policy, unique


def mosquitto(server, tool, device, client_id, *args, host=None, version="mqttv311", timeout=10):
    cmd = [tool, "-h", host or server.endpoint(), "-p", str(server.mqtt_port), "--cafile", server.ca,
           "--cert", str(device.cert), "--key", str(device.key), "-i", client_id, "-V", version, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_pub_sub(server, workdir, version):
    iot = server.boto()
    account = server.account_id()
    dev = Device(server, iot, unique("mosq"), thing_policy(account), workdir)
    mon = Device(server, iot, unique("mosqmon"), ALLOW_ALL, workdir)
    topic = f"topic/{dev.name}"
    ep = server.endpoint()
    # Barrier: the broker announces mosquitto_sub's subscription as a lifecycle event.
    watcher = Paho(server, ep, mon, unique("watch"), v5=True)
    assert watcher.connect()[0] == 0
    watcher.subscribe(f"$aws/events/subscriptions/subscribed/{mon.name}", qos=1)
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", ep, "-p", str(server.mqtt_port), "--cafile", server.ca, "--cert", str(mon.cert),
         "--key", str(mon.key), "-i", mon.name, "-V", version, "-t", topic, "-C", "2", "-v", "-q", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(watcher.messages.get(timeout=10).payload)["topics"] == [topic]
    watcher.close()
    r = mosquitto(server, "mosquitto_pub", dev, dev.name, "-t", topic, "-m", "one", "-q", "1", version=version)
    assert r.returncode == 0, r.stderr
    r = mosquitto(server, "mosquitto_pub", dev, dev.name, "-t", topic, "-m", "two", "-q", "0", version=version)
    assert r.returncode == 0, r.stderr
    out, err = sub.communicate(timeout=10)
    assert out.splitlines() == [f"{topic} one", f"{topic} two"], err
    # Not the thing's client id: refused with "not authorised".
    r = mosquitto(server, "mosquitto_pub", dev, unique("imposter"), "-t", topic, "-m", "x", version=version)
    assert r.returncode != 0
    assert "not authori" in r.stderr.lower(), r.stderr


def test_connects_with_localhost_and_without_sni(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("sni"), ALLOW_ALL, workdir)
    r = mosquitto(server, "mosquitto_pub", dev, dev.name, "-t", "a/b", "-m", "x", host="localhost")
    assert r.returncode == 0, r.stderr
    # An IP address literal sends no SNI at all; the DEFAULT-mode certificate names its account.
    r = mosquitto(server, "mosquitto_pub", dev, dev.name, "-t", "a/b", "-m", "x", "--insecure", host="127.0.0.1")
    assert r.returncode == 0, r.stderr


def test_unknown_server_name_and_unregistered_certificate_are_refused(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("unk"), ALLOW_ALL, workdir)
    r = mosquitto(server, "mosquitto_pub", dev, dev.name, "-t", "a", "-m", "x", "--insecure",
                  host="nosuchprefix-ats.iot.us-east-1.localhost")
    assert r.returncode != 0
    # A certificate deleted from the registry fails in the TLS handshake.
    iot.update_certificate(certificateId=dev.cert_id, newStatus="INACTIVE")
    iot.detach_thing_principal(thingName=dev.name, principal=dev.cert_arn)
    iot.delete_certificate(certificateId=dev.cert_id, forceDelete=True)
    r = mosquitto(server, "mosquitto_pub", dev, dev.name, "-t", "a", "-m", "x")
    assert r.returncode != 0
    assert server.alive()


def test_deactivating_certificate_cuts_live_connection_within_a_second(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("cut"), ALLOW_ALL, workdir)
    p = Paho(server, server.endpoint(), dev, dev.name, v5=True)
    assert p.connect()[0] == 0
    t0 = time.monotonic()
    iot.update_certificate(certificateId=dev.cert_id, newStatus="INACTIVE")
    rc = p.disconnects.get(timeout=5)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"connection cut after {elapsed:.2f}s"
    assert rc.value == 0x98, f"expected DISCONNECT Administrative action, got {rc}"
    p.close()
    # It cannot reconnect: the TLS handshake refuses an inactive certificate.
    r = mosquitto(server, "mosquitto_pub", dev, dev.name, "-t", "a", "-m", "x")
    assert r.returncode != 0
    # REVOKED behaves the same; ACTIVE again connects.
    iot.update_certificate(certificateId=dev.cert_id, newStatus="ACTIVE")
    r = mosquitto(server, "mosquitto_pub", dev, dev.name, "-t", "a", "-m", "x")
    assert r.returncode == 0, r.stderr


def test_new_default_policy_version_governs_live_connection_within_a_second(server, workdir):
    iot = server.boto()
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    dev = Device(server, iot, unique("live"), ALLOW_ALL, workdir)
    mon = Device(server, iot, unique("livemon"), ALLOW_ALL, workdir)
    sub = Paho(server, server.endpoint(), mon, mon.name, v5=True)
    assert sub.connect()[0] == 0
    topic = f"live/{dev.name}"
    sub.subscribe(topic, qos=1)
    p = Paho(server, server.endpoint(), dev, dev.name, v5=True)
    assert p.connect()[0] == 0
    info = p.c.publish(topic, b"before", qos=1)
    info.wait_for_publish(5)
    assert sub.messages.get(timeout=5).payload == b"before"
    deny = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "iot:Publish", "Resource": f"{arn}:topic/{topic}"}]}
    # In force when the call returns, which is well within AWS's "within a second".
    iot.create_policy_version(policyName=dev.policy, policyDocument=json.dumps(deny), setAsDefault=True)
    p.c.publish(topic, b"after", qos=1)
    mid, rc = p.pubacks.get(timeout=5)  # the "before" one
    mid, rc = p.pubacks.get(timeout=5)
    assert rc.value == 0x87, f"expected Not authorized, got {rc}"
    # Back to version 1: allowed again without reconnecting.
    iot.set_default_policy_version(policyName=dev.policy, policyVersionId="1")
    p.c.publish(topic, b"again", qos=1).wait_for_publish(5)
    assert sub.messages.get(timeout=5).payload == b"again"
    # Detaching the policy takes everything away, including receiving.
    iot.detach_policy(policyName=mon.policy, target=mon.cert_arn)
    p.c.publish(topic, b"unseen", qos=1).wait_for_publish(5)
    with pytest.raises(queue.Empty):
        sub.messages.get(timeout=1.0)
    p.close()
    sub.close()


def test_registry_survives_restart(workdir):
    s = Server(workdir / unique("restart")).start()
    try:
        iot = s.boto()
        account = s.account_id()
        dev = Device(s, iot, unique("persist"), thing_policy(account), workdir)
        iot.create_thing_type(thingTypeName="sensor", thingTypeProperties={"thingTypeDescription": "d"})
        iot.update_thing(thingName=dev.name, thingTypeName="sensor", attributePayload={"attributes": {"floor": "3"}})
        iot.create_policy_version(policyName=dev.policy, policyDocument=json.dumps(thing_policy(account)), setAsDefault=True)
        endpoint = s.endpoint()
        assert s.stop() == 0, "SIGTERM must shut down cleanly"
        s.start()
        iot = s.boto()
        assert s.endpoint() == endpoint
        t = iot.describe_thing(thingName=dev.name)
        assert t["attributes"] == {"floor": "3"} and t["thingTypeName"] == "sensor"
        assert iot.get_policy(policyName=dev.policy)["defaultVersionId"] == "2"
        assert iot.describe_certificate(certificateId=dev.cert_id)["certificateDescription"]["status"] == "ACTIVE"
        p = Paho(s, endpoint, dev, dev.name, v5=True)
        assert p.connect()[0] == 0, "the device connects after a restart"
        p.close()
    finally:
        s.stop()


def test_shutdown_sends_disconnect(workdir):
    s = Server(workdir / unique("shutdown")).start()
    iot = s.boto()
    dev = Device(s, iot, unique("bye"), ALLOW_ALL, workdir)
    p = Paho(s, s.endpoint(), dev, dev.name, v5=True)
    assert p.connect()[0] == 0
    assert s.stop() == 0
    rc = p.disconnects.get(timeout=5)
    assert rc.value == 0x8B, f"expected Server shutting down, got {rc}"
    p.close()
