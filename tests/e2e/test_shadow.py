"""Device Shadow, classic and named, with the AWS IoT Device SDK's shadow client, the stock AWS
CLI (`aws iot-data`), boto3, paho-mqtt and curl with a client certificate."""

import json
import queue
import signal
import subprocess
import time

import pytest

import botocore.config

from awscrt import mqtt as crt_mqtt
from awsiot import iotshadow, mqtt_connection_builder

from conftest import ALLOW_ALL, Device, Paho, Server, unique


def shadow_policy(account, region="us-east-1"):
    """A device may use only its own shadows, as the developer guide's shadow policy allows."""
    arn = f"arn:aws:iot:{region}:{account}"
    me = "${iot:Connection.Thing.ThingName}"
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/{me}"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": f"{arn}:topic/$aws/things/{me}/shadow/*"},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": f"{arn}:topicfilter/$aws/things/{me}/shadow/*"},
        # Over HTTPS there are no thing variables: the thing is named.
        {"Effect": "Allow", "Action": ["iot:GetThingShadow", "iot:UpdateThingShadow"],
         "Resource": f"{arn}:thing/{{THING}}"},
    ]}


def sdk_connection(server, dev, client_id):
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=server.endpoint(), port=server.mqtt_port, cert_filepath=str(dev.cert),
        pri_key_filepath=str(dev.key), ca_filepath=server.ca, client_id=client_id,
        clean_session=True, keep_alive_secs=30)
    conn.connect().result(10)
    return conn


def test_device_syncs_desired_and_reported_through_the_delta(server, workdir):
    """The walkthrough: the device (AWS IoT Device SDK shadow client) reports its state, an app
    (`aws iot-data update-thing-shadow`) sets the desired state, the device gets the delta with
    the app's client token, reports it, and the app sees no delta left."""
    iot = server.boto()
    dev = Device(server, iot, unique("lamp"), ALLOW_ALL, workdir)
    conn = sdk_connection(server, dev, dev.name)
    shadow = iotshadow.IotShadowClient(conn)
    accepted, rejected, deltas = queue.Queue(), queue.Queue(), queue.Queue()
    thing = dev.name
    for fut, _ in (
        shadow.subscribe_to_update_shadow_accepted(
            iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), crt_mqtt.QoS.AT_LEAST_ONCE, accepted.put),
        shadow.subscribe_to_update_shadow_rejected(
            iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), crt_mqtt.QoS.AT_LEAST_ONCE, rejected.put),
        shadow.subscribe_to_shadow_delta_updated_events(
            iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=thing), crt_mqtt.QoS.AT_LEAST_ONCE, deltas.put),
    ):
        fut.result(10)
    shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, state=iotshadow.ShadowState(reported={"color": "white", "on": False}),
        client_token="dev-1"), crt_mqtt.QoS.AT_LEAST_ONCE).result(10)
    a = accepted.get(timeout=5)
    assert (a.version, a.client_token, a.state.reported) == (1, "dev-1", {"color": "white", "on": False})
    assert a.metadata.reported["color"]["timestamp"] > 0

    # The app, with the stock CLI over HTTPS (SigV4).
    out = workdir / f"{thing}-out.json"
    server.aws("iot-data", "update-thing-shadow", "--thing-name", thing,
               "--payload", json.dumps({"state": {"desired": {"color": "green", "on": False}},
                                        "clientToken": "app-7"}), str(out))
    doc = json.loads(out.read_text())
    assert doc["version"] == 2 and doc["state"] == {"desired": {"color": "green", "on": False}}
    d = deltas.get(timeout=5)
    # Only what differs from reported, with the requester's token and the desired metadata.
    assert (d.version, d.state, d.client_token) == (2, {"color": "green"}, "app-7")
    assert d.metadata["color"]["timestamp"] == doc["metadata"]["desired"]["color"]["timestamp"]
    assert accepted.get(timeout=5).version == 2  # every accepted update goes to the subscribers

    shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, state=iotshadow.ShadowState(reported={"color": "green"}), client_token="dev-2"),
        crt_mqtt.QoS.AT_LEAST_ONCE).result(10)
    assert accepted.get(timeout=5).version == 3
    server.aws("iot-data", "get-thing-shadow", "--thing-name", thing, str(out))
    doc = json.loads(out.read_text())
    assert doc["version"] == 3
    assert doc["state"] == {"desired": {"color": "green", "on": False}, "reported": {"color": "green", "on": False}}
    assert "delta" not in doc["state"]
    with_delta = deltas.qsize()
    assert with_delta == 0, "a report that resolves the delta publishes none"

    # Optimistic locking through MQTT: a stale version is rejected with AWS's error document.
    shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, state=iotshadow.ShadowState(reported={"on": True}), version=1, client_token="stale"),
        crt_mqtt.QoS.AT_LEAST_ONCE).result(10)
    e = rejected.get(timeout=5)
    assert (e.code, e.message, e.client_token) == (409, "Version conflict", "stale")
    conn.disconnect().result(10)


def test_named_shadows_get_delete_and_list(server, workdir):
    """Named shadows beside the classic one: get before any update is 404 in AWS's words, the
    SDK's get/delete round trips, delete keeps the version, and ListNamedShadowsForThing lists
    the named ones only (never the classic shadow, never a deleted one), page by page."""
    iot = server.boto()
    data = server.boto("iot-data")
    dev = Device(server, iot, unique("multi"), ALLOW_ALL, workdir)
    thing = dev.name
    try:
        data.get_thing_shadow(thingName=thing, shadowName="cfg")
        raise AssertionError("a shadow that does not exist was read")
    except data.exceptions.ResourceNotFoundException as e:
        assert e.response["Error"]["Message"] == "No shadow exists with name: cfg"

    conn = sdk_connection(server, dev, dev.name)
    shadow = iotshadow.IotShadowClient(conn)
    got, deleted = queue.Queue(), queue.Queue()
    shadow.subscribe_to_get_named_shadow_accepted(
        iotshadow.GetNamedShadowSubscriptionRequest(thing_name=thing, shadow_name="cfg"),
        crt_mqtt.QoS.AT_LEAST_ONCE, got.put)[0].result(10)
    shadow.subscribe_to_delete_named_shadow_accepted(
        iotshadow.DeleteNamedShadowSubscriptionRequest(thing_name=thing, shadow_name="cfg"),
        crt_mqtt.QoS.AT_LEAST_ONCE, deleted.put)[0].result(10)
    for name in ("cfg", "net", "$fw", "zz"):
        data.update_thing_shadow(thingName=thing, shadowName=name,
                                 payload=json.dumps({"state": {"desired": {"n": name}}}).encode())
    data.update_thing_shadow(thingName=thing, payload=b'{"state":{"reported":{"classic":true}}}')
    data.update_thing_shadow(thingName=thing, shadowName="cfg", payload=b'{"state":{"reported":{"n":"cfg"}}}')
    shadow.publish_get_named_shadow(iotshadow.GetNamedShadowRequest(
        thing_name=thing, shadow_name="cfg", client_token="g1"), crt_mqtt.QoS.AT_LEAST_ONCE).result(10)
    g = got.get(timeout=5)
    assert (g.version, g.client_token, g.state.desired, g.state.reported, g.state.delta) == \
        (2, "g1", {"n": "cfg"}, {"n": "cfg"}, None)

    names = data.list_named_shadows_for_thing(thingName=thing)["results"]
    assert names == ["$fw", "cfg", "net", "zz"]
    page = data.list_named_shadows_for_thing(thingName=thing, pageSize=3)
    assert page["results"] == ["$fw", "cfg", "net"] and page["nextToken"]
    rest = data.list_named_shadows_for_thing(thingName=thing, pageSize=3, nextToken=page["nextToken"])
    assert rest["results"] == ["zz"] and "nextToken" not in rest

    shadow.publish_delete_named_shadow(iotshadow.DeleteNamedShadowRequest(
        thing_name=thing, shadow_name="cfg", client_token="d1"), crt_mqtt.QoS.AT_LEAST_ONCE).result(10)
    d = deleted.get(timeout=5)
    assert (d.version, d.client_token) == (2, "d1")
    assert data.list_named_shadows_for_thing(thingName=thing)["results"] == ["$fw", "net", "zz"]
    try:
        data.delete_thing_shadow(thingName=thing, shadowName="cfg")
        raise AssertionError("a deleted shadow was deleted again")
    except data.exceptions.ResourceNotFoundException:
        pass
    # The version goes on from the deleted shadow's.
    out = json.loads(data.update_thing_shadow(thingName=thing, shadowName="cfg",
                                              payload=b'{"state":{"desired":{"n":2}}}')["payload"].read())
    assert out["version"] == 3
    conn.disconnect().result(10)


def test_shadow_errors_and_limits_at_n_and_n_plus_one(server, workdir):
    """Over HTTPS (boto3): AWS's error shapes and messages; the 8 KB state, depth and client
    token limits at N and N+1. Over MQTT (paho): the same refusals as `/update/rejected`
    documents, and AWS's 20 requests per second per thing."""
    iot = server.boto()
    data = server.boto("iot-data")
    thing = unique("lim")

    def update(doc, name=None):
        kw = {"shadowName": name} if name else {}
        payload = doc if isinstance(doc, bytes) else json.dumps(doc, separators=(",", ":")).encode()
        try:
            r = data.update_thing_shadow(thingName=thing, payload=payload, **kw)
            return 200, json.loads(r["payload"].read())
        except data.exceptions.ClientError as e:
            return e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]

    def state_of(n):
        overhead = len(json.dumps({"desired": {"v": ""}}, separators=(",", ":")))
        return {"desired": {"v": "x" * (n - overhead)}}

    r = update({"state": state_of(8192)})
    assert r[0] == 200, r
    code, err = update({"state": state_of(8193)})
    assert (code, err["Message"]) == (413, "The payload exceeds the maximum size allowed")
    assert err["Code"] == "RequestEntityTooLargeException"

    def nest(n):
        v = 1
        for _ in range(n):
            v = {"k": v}
        return v
    assert update({"state": {"reported": nest(5)}}, name="depth")[0] == 200
    code, err = update({"state": {"reported": nest(6)}}, name="depth")
    assert (code, err["Message"]) == (400, "JSON contains too many levels of nesting; maximum is 6")
    assert update({"state": {}, "clientToken": "t" * 64}, name="tok")[0] == 200
    assert update({"state": {}, "clientToken": "t" * 65}, name="tok")[1]["Message"] == "Invalid clientToken"
    for bad, msg in ((b"not json", "Invalid JSON"), (b"{}", "Missing required node: state"),
                     (b'{"state":{"desired":5}}', "Desired node must be an object")):
        code, err = update(bad)
        assert (code, err["Code"], err["Message"]) == (400, "InvalidRequestException", msg)
    code, err = update({"state": {}, "version": 7}, name="tok")
    assert (code, err["Code"], err["Message"]) == (409, "ConflictException", "Version conflict")
    code, _ = update({"state": {}}, name="bad.name")
    assert code == 400

    # The same over MQTT, answered on /update/rejected with the client token.
    dev = Device(server, iot, unique("limdev"), ALLOW_ALL, workdir)
    p = Paho(server, server.endpoint(), dev, dev.name)
    assert p.connect()[0] == 0
    prefix = f"$aws/things/{thing}/shadow/name/mqtt"
    p.subscribe(f"{prefix}/update/+", qos=1)
    p.c.publish(f"{prefix}/update", json.dumps({"state": state_of(8193), "clientToken": "big"}), qos=1)
    m = p.messages.get(timeout=5)
    body = json.loads(m.payload)
    assert m.topic == f"{prefix}/update/rejected"
    assert (body["code"], body["message"], body["clientToken"]) == \
        (413, "The payload exceeds the maximum size allowed", "big")

    p.close()


def test_devices_cannot_touch_other_things_shadows(server, workdir):
    """With the developer guide's shadow policy a device updates its own shadow, over MQTT and
    over HTTPS with its certificate, and another thing's shadow neither way: MQTT 5 gets
    PUBACK 0x87 and the shadow is unchanged; HTTPS gets 403."""
    iot = server.boto()
    data = server.boto("iot-data")
    account = server.account_id()
    mine, theirs = unique("mine"), unique("theirs")
    policy = json.loads(json.dumps(shadow_policy(account)).replace("{THING}", mine))
    dev = Device(server, iot, mine, policy, workdir, exclusive=True)
    data.update_thing_shadow(thingName=theirs, payload=b'{"state":{"reported":{"owner":"them"}}}')

    # TestAuthorization answers for the reserved shadow topics as the broker decides them.
    topic = f"arn:aws:iot:us-east-1:{account}:topic/$aws/things/{{}}/shadow/update"
    out = iot.test_authorization(principal=dev.cert_arn, clientId=mine, authInfos=[
        {"actionType": "PUBLISH", "resources": [topic.format(mine)]},
        {"actionType": "PUBLISH", "resources": [topic.format(theirs)]}])
    assert [r["authDecision"] for r in out["authResults"]] == ["ALLOWED", "IMPLICIT_DENY"]

    p = Paho(server, server.endpoint(), dev, mine, v5=True)
    assert p.connect()[0] == 0
    assert p.subscribe(f"$aws/things/{mine}/shadow/update/accepted", qos=1)[0].value == 1
    p.c.publish(f"$aws/things/{mine}/shadow/update", b'{"state":{"reported":{"ok":1}}}', qos=1)
    assert json.loads(p.messages.get(timeout=5).payload)["version"] == 1
    p.c.publish(f"$aws/things/{theirs}/shadow/update", b'{"state":{"reported":{"owner":"me"}}}', qos=1)
    _, rc = p.pubacks.get(timeout=5)
    _, rc = p.pubacks.get(timeout=5)
    assert rc.value == 0x87
    # Neither the answer to another thing's get.
    assert p.subscribe(f"$aws/things/{theirs}/shadow/get/accepted", qos=1)[0].value == 0x87
    p.close()

    base = f"https://{server.endpoint()}:{server.https_port}"

    def curl(method, path, data=None):
        args = ["curl", "-s", "-w", "\n%{http_code}", "--cacert", server.ca, "--cert", str(dev.cert),
                "--key", str(dev.key), "-X", method, base + path]
        if data is not None:
            args += ["--data-binary", data]
        cp = subprocess.run(args, capture_output=True, text=True, timeout=15)
        body, code = cp.stdout.rsplit("\n", 1)
        return int(code), json.loads(body) if body else None

    code, body = curl("GET", f"/things/{mine}/shadow")
    assert code == 200 and body["state"]["reported"] == {"ok": 1}
    code, body = curl("POST", f"/things/{mine}/shadow", '{"state":{"reported":{"ok":2}}}')
    assert code == 200 and body["version"] == 2
    assert curl("GET", f"/things/{theirs}/shadow")[0] == 403
    assert curl("POST", f"/things/{theirs}/shadow", '{"state":{"reported":{"owner":"me"}}}')[0] == 403
    # Not granted DeleteThingShadow even on its own thing.
    assert curl("DELETE", f"/things/{mine}/shadow")[0] == 403
    doc = json.loads(data.get_thing_shadow(thingName=theirs)["payload"].read())
    assert doc["state"]["reported"] == {"owner": "them"} and doc["version"] == 1


def test_shadows_survive_sigkill(workdir):
    """An update answered on /update/accepted is durable: after SIGKILL the shadow is there with
    its version and metadata, and a deleted shadow stays deleted with its version kept."""
    server = Server(workdir / f"shadow-{unique('kill')}").start()
    try:
        iot = server.boto()
        dev = Device(server, iot, unique("dur"), ALLOW_ALL, workdir)
        p = Paho(server, server.endpoint(), dev, dev.name)
        assert p.connect()[0] == 0
        prefix = f"$aws/things/{dev.name}/shadow"
        p.subscribe(f"{prefix}/+/accepted", qos=1)
        p.subscribe(f"{prefix}/name/gone/+/accepted", qos=1)
        for i in range(1, 6):
            p.c.publish(f"{prefix}/update", json.dumps({"state": {"desired": {"i": i}}}), qos=1)
            assert json.loads(p.messages.get(timeout=5).payload)["version"] == i
        p.c.publish(f"{prefix}/name/gone/update", b'{"state":{"reported":{"x":1}}}', qos=1)
        p.messages.get(timeout=5)
        p.c.publish(f"{prefix}/name/gone/delete", b"", qos=1)
        assert json.loads(p.messages.get(timeout=5).payload)["version"] == 1
        server.stop(signal.SIGKILL)
        p.close()
        server.start()
        data = server.boto("iot-data")
        doc = json.loads(data.get_thing_shadow(thingName=dev.name)["payload"].read())
        assert doc["version"] == 5 and doc["state"]["desired"] == {"i": 5}
        assert doc["metadata"]["desired"]["i"]["timestamp"] > 0
        try:
            data.get_thing_shadow(thingName=dev.name, shadowName="gone")
            raise AssertionError("a deleted shadow came back")
        except data.exceptions.ResourceNotFoundException:
            pass
        out = json.loads(data.update_thing_shadow(thingName=dev.name, shadowName="gone",
                                                  payload=b'{"state":{}}')["payload"].read())
        assert out["version"] == 2
    finally:
        server.stop()


def test_an_update_counts_as_four_of_the_accounts_publishes(workdir):
    """AWS counts a shadow update as four inbound publishes of the account: with four a second,
    one update passes and the next, within the second, is throttled (429)."""
    s = Server(workdir / unique("shadowacct"), throttles=True, config="""
[limits]
publishes_per_account = 4
""").start()
    try:
        # Without the SDK's retries, which would wait out a throttle.
        data = s.boto("iot-data", config=botocore.config.Config(retries={"total_max_attempts": 1}))
        codes = []
        for _ in range(2):
            try:
                data.update_thing_shadow(thingName="acct-rate", payload=b'{"state":{}}')
                codes.append(200)
            except data.exceptions.ThrottlingException:
                codes.append(429)
        assert codes == [200, 429]
    finally:
        s.stop()


def test_twenty_requests_a_second_per_thing(workdir):
    """AWS's 20 shadow requests a second per thing (all its shadows together): past them a
    request is rejected with 429 on the operation's /rejected topic."""
    s = Server(workdir / unique("shadowrate"), throttles=True, config="""
[limits]
publishes_per_connection = 0
""").start()
    try:
        dev = Device(s, s.boto(), unique("rate"), ALLOW_ALL, workdir)
        p = Paho(s, s.endpoint(), dev, dev.name)
        assert p.connect()[0] == 0
        prefix = f"$aws/things/{dev.name}/shadow"
        p.subscribe(f"{prefix}/name/+/get/+", qos=1)
        time.sleep(1.1)
        # 30 back to back for two shadows of one thing: 20 answers (or one more, if a token came
        # back while they were sent) and 429 for the rest. Not found (404) is an answer.
        for i in range(30):
            name = "a" if i % 2 else "b"
            p.c.publish(f"{prefix}/name/{name}/get", b"", qos=0)
        codes = []
        deadline = time.time() + 10
        while len(codes) < 30 and time.time() < deadline:
            try:
                m = p.messages.get(timeout=1)
            except queue.Empty:
                continue
            codes.append(json.loads(m.payload).get("code"))
        assert len(codes) == 30
        assert 20 <= codes.count(404) <= 21 and codes.count(429) == 30 - codes.count(404), codes
        p.close()
    finally:
        s.stop()


def test_clients_cannot_forge_the_services_answers(server, workdir):
    """A device allowed to publish on its shadow's topics (the developer guide's `shadow/*`)
    may still not publish the service's answers: MQTT 5 gets PUBACK 0x87 and nothing reaches
    the app subscribed to them; the same over HTTPS with its certificate is refused."""
    iot = server.boto()
    account = server.account_id()
    mine = unique("forger")
    policy = json.loads(json.dumps(shadow_policy(account)).replace("{THING}", mine))
    policy["Statement"].append({"Effect": "Allow", "Action": "iot:Publish",
                                "Resource": f"arn:aws:iot:us-east-1:{account}:topic/$aws/things/{mine}/jobs/*"})
    dev = Device(server, iot, mine, policy, workdir, exclusive=True)
    app = Paho(server, server.endpoint(), Device(server, iot, unique("app"), ALLOW_ALL, workdir), unique("app"))
    assert app.connect()[0] == 0
    app.subscribe(f"$aws/things/{mine}/#", qos=1)
    p = Paho(server, server.endpoint(), dev, mine, v5=True)
    assert p.connect()[0] == 0
    forged = json.dumps({"state": {"desired": {"unlock": True}}, "version": 999})
    prefix = f"$aws/things/{mine}"
    for suffix in ("shadow/update/accepted", "shadow/update/delta", "shadow/update/documents",
                   "shadow/get/accepted", "shadow/name/x/update/delta", "shadow/delete/rejected",
                   "jobs/notify", "jobs/notify-next", "jobs/j1/update/accepted"):
        p.c.publish(f"{prefix}/{suffix}", forged, qos=1)
        assert p.pubacks.get(timeout=5)[1].value == 0x87, suffix
    with pytest.raises(queue.Empty):
        app.messages.get(timeout=0.5)
    # The same device's real request still works, and its answer reaches the app.
    p.c.publish(f"{prefix}/shadow/update", b'{"state":{"reported":{"ok":true}}}', qos=1)
    assert p.pubacks.get(timeout=5)[1].value == 0
    topics = {app.messages.get(timeout=5).topic for _ in range(3)}
    assert f"{prefix}/shadow/update/accepted" in topics
    p.close()
    app.close()
    code = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", server.ca, "--cert", str(dev.cert),
         "--key", str(dev.key), "--data-binary", forged,
         f"https://{server.endpoint()}:{server.https_port}/topics/%24aws%2Fthings%2F{mine}%2Fshadow%2Fupdate%2Faccepted"],
        capture_output=True, text=True, timeout=15).stdout
    assert code == "403"


def test_the_shadow_service_bounds_memory_and_shares_its_queue(workdir):
    """A flood of 8 KB updates whose arrays make metadata a hundred times their size, from
    several connections of one account: the server's memory stays bounded (the service
    commits and answers in bounded segments), and a request from another account is still
    answered promptly."""
    s = Server(workdir / unique("shadowflood"), accounts=("other",)).start()
    try:
        iot = s.boto()
        dev = Device(s, iot, unique("flood"), ALLOW_ALL, workdir)
        big = json.dumps({"state": {"reported": {"a": [0] * 4000}}}, separators=(",", ":")).encode()
        assert len(big) < 8192 + 40
        clients = []
        for i in range(4):
            c = Paho(s, s.endpoint(), dev, f"{dev.name}-{i}")
            assert c.connect()[0] == 0
            clients.append(c)
        deadline = time.time() + 8
        sent = 0
        while time.time() < deadline:
            for c in clients:
                c.c.publish(f"$aws/things/flood-{sent % 64}/shadow/update", big, qos=0)
                sent += 1
            time.sleep(0.002)
        # Meanwhile, another account's request is answered.
        other = s.boto("iot-data", profile="other")
        start = time.time()
        other.update_thing_shadow(thingName="calm", payload=b'{"state":{"reported":{"x":1}}}')
        waited = time.time() - start
        print("other account waited", waited)
        assert waited < 5
        rss_kb = int(open(f"/proc/{s.proc.pid}/status").read().split("VmRSS:")[1].split()[0])
        print("RSS KiB", rss_kb, "sent", sent)
        assert rss_kb < 300 * 1024, f"server RSS {rss_kb} KiB after {sent} flood requests"
        for c in clients:
            c.close()
    finally:
        s.stop()


def test_the_sdks_mqtt5_request_response_shadow_client(server, workdir):
    """The SDK's newer shadow client (MQTT 5, request-response: it subscribes to the answer
    topics and matches answers by client token), as its own samples use it."""
    from concurrent.futures import Future

    from awscrt import mqtt_request_response
    from awsiot import mqtt5_client_builder
    dev = Device(server, server.boto(), unique("v2"), ALLOW_ALL, workdir)
    connected = Future()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint=server.endpoint(), port=server.mqtt_port, cert_filepath=str(dev.cert), pri_key_filepath=str(dev.key),
        ca_filepath=server.ca, clean_session=True, keep_alive_secs=1200,
        on_lifecycle_connection_success=lambda e: connected.set_result(True))
    client.start()
    connected.result(10)
    shadow = iotshadow.IotShadowClientV2(client, mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=2, max_streaming_subscriptions=2, operation_timeout_in_seconds=10))
    up = shadow.update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=dev.name, state=iotshadow.ShadowState(desired={"color": "green"}))).result(10)
    assert up.version == 1 and up.state.desired == {"color": "green"}
    got = shadow.get_shadow(iotshadow.GetShadowRequest(thing_name=dev.name)).result(10)
    assert got.state.delta == {"color": "green"} and got.version == 1
    gone = shadow.delete_shadow(iotshadow.DeleteShadowRequest(thing_name=dev.name)).result(10)
    assert gone.version == 1
    with pytest.raises(Exception) as e:
        shadow.get_shadow(iotshadow.GetShadowRequest(thing_name=dev.name)).result(10)
    assert "404" in str(e.value) or "No shadow" in str(e.value)
    client.stop()


def test_named_shadows_per_thing_are_bounded_at_n_and_n_plus_one(workdir):
    """A thing may have `named_shadows_per_thing` named shadows (Sekisho's own bound; AWS sets
    none, but a device allowed `shadow/name/*` could otherwise fill the disk): the Nth is
    created, the N+1th refused with 400 over HTTPS and MQTT, the classic shadow and updates of
    existing ones are not counted, and a deleted one frees its place. Deleted shadows keep
    their versions up to N of them; the N+1th deletion forgets the thing's deleted shadows,
    whose names then start again at version 1. All of it survives a restart."""
    s = Server(workdir / unique("shadowcap"), config="[limits]\nnamed_shadows_per_thing = 3\n").start()
    try:
        iot = s.boto()
        data = s.boto("iot-data")
        thing = unique("cap")

        def update(name, n=1):
            out = data.update_thing_shadow(thingName=thing, shadowName=name,
                                           payload=json.dumps({"state": {"reported": {"n": n}}}))
            return json.loads(out["payload"].read())["version"]

        def listed():
            return sorted(data.list_named_shadows_for_thing(thingName=thing)["results"])

        for name in ("a", "b", "c"):
            assert update(name) == 1
        with pytest.raises(data.exceptions.InvalidRequestException) as e:
            update("d")
        assert str(e.value).endswith(f"The thing {thing} has 3 named shadows, the most it may have")
        assert update("a", 2) == 2, "an existing one is updated"
        data.update_thing_shadow(thingName=thing, payload=b'{"state":{"reported":{"classic":1}}}')
        # Over MQTT: the refusal on /rejected with AWS's error document.
        dev = Device(s, iot, thing, ALLOW_ALL, workdir)
        p = Paho(s, s.endpoint(), dev, thing)
        assert p.connect()[0] == 0
        p.subscribe(f"$aws/things/{thing}/shadow/name/e/update/rejected", qos=1)
        p.c.publish(f"$aws/things/{thing}/shadow/name/e/update", b'{"state":{},"clientToken":"t1"}', qos=1)
        rej = json.loads(p.messages.get(timeout=5).payload)
        assert (rej["code"], rej["clientToken"]) == (400, "t1")
        p.close()
        # A deleted one frees its place and keeps its version.
        data.delete_thing_shadow(thingName=thing, shadowName="a")
        assert listed() == ["b", "c"]
        assert update("d") == 1
        with pytest.raises(data.exceptions.InvalidRequestException):
            update("a")
        data.delete_thing_shadow(thingName=thing, shadowName="d")
        assert update("a", 3) == 3, "its version continues after its deletion"
        s.stop()
        s.start()
        # Deleted ones, kept for their versions: up to 3 (d, a, b), at N still kept.
        for name in ("a", "b"):
            data.delete_thing_shadow(thingName=thing, shadowName=name)
        assert listed() == ["c"]
        assert update("b") == 2, "kept at N"
        data.delete_thing_shadow(thingName=thing, shadowName="b")
        data.delete_thing_shadow(thingName=thing, shadowName="c")  # d, a, b, c: N+1 forgets them
        assert listed() == []
        assert update("a") == 1 and update("b") == 1 and update("c") == 1
        assert listed() == ["a", "b", "c"]
    finally:
        s.stop()


def test_shadows_per_account_are_bounded_at_n_and_n_plus_one(workdir):
    """An account stores at most `shadows_per_account` shadows whatever their things' names
    (Sekisho's own bound: shadows need no registered thing, so a policy allowing
    `$aws/things/*/shadow/...` could otherwise fill the disk with made-up names). At the
    bound, deleted shadows kept for their versions make room first (those names start again
    at version 1); updates of existing shadows are never refused. Counted across a restart."""
    s = Server(workdir / unique("shadowacct"), config="[limits]\nshadows_per_account = 3\n").start()
    try:
        data = s.boto("iot-data")

        def update(thing, name=None, n=1):
            kw = {"shadowName": name} if name else {}
            out = data.update_thing_shadow(thingName=thing, payload=json.dumps({"state": {"reported": {"n": n}}}), **kw)
            return json.loads(out["payload"].read())["version"]

        assert update("t1") == 1 and update("t2") == 1 and update("t1", "cfg") == 1
        with pytest.raises(data.exceptions.InvalidRequestException) as e:
            update("t3")
        assert str(e.value).endswith("The account has 3 shadows, the most it may store")
        assert update("t1", n=2) == 2, "an existing one is updated"
        s.stop()
        s.start()
        with pytest.raises(data.exceptions.InvalidRequestException):
            update("t4", "x")
        # A deleted one makes room (its version forgotten once room is needed).
        data.delete_thing_shadow(thingName="t2")
        assert update("t3") == 1
        with pytest.raises(data.exceptions.InvalidRequestException):
            update("t2")
        data.delete_thing_shadow(thingName="t3")
        assert update("t2") == 1, "t2's deleted shadow was forgotten to make room"
    finally:
        s.stop()
