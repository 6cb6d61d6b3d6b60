"""The AWS IoT getting-started walkthrough, end to end, with the stock AWS CLI, the AWS IoT
Device SDK for Python (awsiotsdk) and paho-mqtt."""

import json
import queue
import threading

import pytest
from awscrt import mqtt as crt_mqtt
from awsiot import mqtt_connection_builder

from conftest import ALLOW_ALL, Device, Paho, thing_policy, unique


def test_cli_walkthrough_then_sdk_and_paho(server, workdir):
    thing = unique("thing")
    # 1. Registry objects with the stock AWS CLI.
    out = server.aws("iot", "create-thing", "--thing-name", thing)
    assert out["thingName"] == thing
    account = out["thingArn"].split(":")[4]
    assert len(account) == 12 and account.isdigit()
    cert_file, key_file = workdir / f"{thing}.crt", workdir / f"{thing}.key"
    cert = server.aws("iot", "create-keys-and-certificate", "--set-as-active",
                      "--certificate-pem-outfile", str(cert_file), "--private-key-outfile", str(key_file))
    assert len(cert["certificateId"]) == 64
    assert cert["keyPair"]["PrivateKey"].startswith("-----BEGIN PRIVATE KEY-----")
    policy_file = workdir / f"{thing}-policy.json"
    policy_file.write_text(json.dumps(thing_policy(account)))
    pol = unique("thing-policy")
    out = server.aws("iot", "create-policy", "--policy-name", pol, "--policy-document", f"file://{policy_file}")
    assert out["policyVersionId"] == "1"
    server.aws("iot", "attach-policy", "--policy-name", pol, "--target", cert["certificateArn"])
    server.aws("iot", "attach-thing-principal", "--thing-name", thing, "--principal", cert["certificateArn"])
    endpoint = server.aws("iot", "describe-endpoint", "--endpoint-type", "iot:Data-ATS")["endpointAddress"]
    assert endpoint.endswith("-ats.iot.us-east-1.localhost")
    described = server.aws("iot", "describe-certificate", "--certificate-id", cert["certificateId"])
    assert described["certificateDescription"]["status"] == "ACTIVE"

    # 2. A subscriber that may read everything (its own certificate and policy).
    iot = server.boto()
    monitor = Device(server, iot, unique("monitor"), ALLOW_ALL, workdir)
    sub = Paho(server, endpoint, monitor, monitor.name, v5=True)
    assert sub.connect()[0] == 0
    sub.subscribe("topic/#", qos=1)

    # 3. The device connects with the AWS IoT Device SDK (client id = thing name).
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=endpoint, port=server.mqtt_port, cert_filepath=str(cert_file), pri_key_filepath=str(key_file),
        ca_filepath=server.ca, client_id=thing, clean_session=True, keep_alive_secs=30)
    conn.connect().result(10)
    own = queue.Queue()
    fut, _ = conn.subscribe(f"topic/{thing}", crt_mqtt.QoS.AT_LEAST_ONCE,
                            callback=lambda topic, payload, **kw: own.put((topic, payload)))
    sub_result = fut.result(10)
    assert sub_result["qos"] == crt_mqtt.QoS.AT_LEAST_ONCE
    pub_fut, _ = conn.publish(f"topic/{thing}", b"hello from the sdk", crt_mqtt.QoS.AT_LEAST_ONCE)
    pub_fut.result(10)
    m = sub.messages.get(timeout=5)
    assert (m.topic, m.payload) == (f"topic/{thing}", b"hello from the sdk")
    assert own.get(timeout=5) == (f"topic/{thing}", b"hello from the sdk")

    # Subscribing to another device's topic is refused in the SUBACK.
    fut, _ = conn.subscribe("topic/someone-else", crt_mqtt.QoS.AT_LEAST_ONCE, callback=lambda **kw: None)
    with pytest.raises(crt_mqtt.SubscribeError):
        fut.result(10)
    conn.disconnect().result(10)

    # 4. paho-mqtt, MQTT 3.1.1, same certificate: its own topic works...
    dev = Device.__new__(Device)
    dev.cert, dev.key = cert_file, key_file
    p = Paho(server, endpoint, dev, thing)
    assert p.connect()[0] == 0
    p.c.publish(f"topic/{thing}", b"from paho", qos=1).wait_for_publish(5)
    m = sub.messages.get(timeout=5)
    assert m.payload == b"from paho"
    # ...another device's topic is denied: AWS IoT closes an MQTT 3.1.1 connection for that.
    p.c.publish("topic/other-device", b"denied", qos=1)
    assert p.disconnects.get(timeout=5) != 0
    p.close()
    leaked = []
    while True:
        try:
            leaked.append(sub.messages.get(timeout=1).topic)
        except queue.Empty:
            break
    assert "topic/other-device" not in leaked, "a denied publish must not be delivered"

    # 5. A client id that is not the thing's name is refused at CONNECT (MQTT 5: 0x87).
    wrong = Paho(server, endpoint, dev, unique("not-the-thing"), v5=True)
    rc, _, _ = wrong.connect()
    assert rc == 135, f"expected Not authorized, got {rc}"
    wrong.close()
    wrong3 = Paho(server, endpoint, dev, unique("not-the-thing"))
    rc, _, _ = wrong3.connect()
    # paho 2 maps the MQTT 3.1.1 return code 5 onto the reason code "Not authorized" (0x87).
    assert rc == 135 and rc.getName() == "Not authorized", f"expected MQTT 3.1.1 not authorized, got {rc}"
    wrong3.close()
    sub.close()


def test_client_id_policy_loophole(server, workdir):
    """With ${iot:ClientId} instead of the thing name, any client id the certificate chooses
    gets its own topic space: the weakness AWS's documentation warns about."""
    iot = server.boto()
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/${{iot:ClientId}}"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": f"{arn}:topic/topic/${{iot:ClientId}}"},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": f"{arn}:topicfilter/topic/${{iot:ClientId}}"},
    ]}
    d = Device(server, iot, unique("loophole"), doc, workdir)
    victim = unique("victim")
    # The same certificate connects as any client id, e.g. another device's name...
    p = Paho(server, server.endpoint(), d, victim, v5=True)
    assert p.connect()[0] == 0
    # ...and may use that device's topics.
    assert p.subscribe(f"topic/{victim}", qos=1)[0].value in (0, 1)
    p.c.publish(f"topic/{victim}", b"impersonated", qos=1)
    assert p.messages.get(timeout=5).payload == b"impersonated"
    p.close()
    # With the thing-name policy the same attempt is refused.
    d2 = Device(server, iot, unique("strict"), thing_policy(account), workdir)
    p2 = Paho(server, server.endpoint(), d2, victim, v5=True)
    assert p2.connect()[0] == 135
    p2.close()


def test_concurrent_devices_isolated_by_policy(server, workdir):
    """Several devices with the thing-name policy each receive only their own topic."""
    iot = server.boto()
    account = server.account_id()
    devs = [Device(server, iot, unique("fleet"), thing_policy(account), workdir) for _ in range(3)]
    clients = []
    for d in devs:
        c = Paho(server, server.endpoint(), d, d.name, v5=True)
        assert c.connect()[0] == 0
        assert c.subscribe(f"topic/{d.name}", qos=1)[0].value == 1
        # Subscribing to a neighbour's topic is refused with 0x87.
        assert c.subscribe(f"topic/{devs[0].name if d is not devs[0] else devs[1].name}", qos=1)[0].value == 0x87
        clients.append(c)
    barrier = threading.Barrier(len(clients))

    def send(c, d):
        barrier.wait()
        c.c.publish(f"topic/{d.name}", d.name.encode(), qos=1)

    ts = [threading.Thread(target=send, args=(c, d)) for c, d in zip(clients, devs)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for c, d in zip(clients, devs):
        m = c.messages.get(timeout=5)
        assert m.payload == d.name.encode()
        with pytest.raises(queue.Empty):
            c.messages.get(timeout=0.3)
        c.close()
