"""Broker behaviour with real clients: retained messages, wills, persistent sessions, takeover,
lifecycle events, shared subscriptions, cross-version delivery, policy variables and conditions,
reserved topics."""

import json
import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import ALLOW_ALL, Device, Paho, unique
from helpers import drain
from test_limits_and_robustness import Raw, packet, s16



def v5(server, dev, cid=None, **kw):
    p = Paho(server, server.endpoint(), dev, cid or dev.name, v5=True, **kw)
    rc = p.connect()[0]
    assert rc == 0, rc
    return p


def test_retained_messages(server, workdir):
    dev = Device(server, server.boto(), unique("ret"), ALLOW_ALL, workdir)
    topic = f"ret/{dev.name}"
    p = v5(server, dev)
    p.c.publish(topic, b"stored", qos=1, retain=True).wait_for_publish(5)
    # An exact subscription gets it, flagged RETAIN.
    s1 = v5(server, dev, unique("s1"))
    s1.subscribe(topic, qos=1)
    m = s1.messages.get(timeout=5)
    assert (m.payload, m.retain) == (b"stored", True)
    # A wildcard subscription does not (AWS's rule), but sees live messages without RETAIN.
    s2 = v5(server, dev, unique("s2"))
    s2.subscribe("ret/#", qos=1)
    assert drain(s2.messages) == []
    p.c.publish(topic, b"live", qos=1).wait_for_publish(5)
    m = s2.messages.get(timeout=5)
    assert (m.payload, m.retain) == (b"live", False)
    # An empty retained payload clears it.
    p.c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    s3 = v5(server, dev, unique("s3"))
    s3.subscribe(topic, qos=1)
    assert drain(s3.messages) == []
    for c in (p, s1, s2, s3):
        c.close()


def test_retain_needs_retain_publish_permission(server, workdir):
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"], "Resource": "*"}]}
    dev = Device(server, server.boto(), unique("noret"), doc, workdir)
    p = v5(server, dev)
    topic = f"noret/{dev.name}"
    p.c.publish(topic, b"x", qos=1, retain=True)
    mid, rc = p.pubacks.get(timeout=5)
    assert rc.value == 0x87
    p.c.publish(topic, b"x", qos=1, retain=False)
    mid, rc = p.pubacks.get(timeout=5)
    assert rc.value == 0
    p.close()


def connect_with_will(server, dev, will_topic, v5_proto=True, retain=False):
    """A raw client with a will, so that the connection can be dropped without DISCONNECT."""
    r = Raw(server, dev)
    flags = 0x02 | 0x04 | (0x20 if retain else 0)
    if v5_proto:
        body = (s16(b"MQTT") + bytes([5, flags]) + (60).to_bytes(2, "big") + b"\x00" + s16(dev.name.encode())
                + b"\x00" + s16(will_topic.encode()) + s16(b"gone"))
    else:
        body = s16(b"MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + s16(dev.name.encode()) + s16(will_topic.encode()) + s16(b"gone")
    r.send(packet(0x10, body))
    r.s.settimeout(5)
    connack = r.s.recv(64)
    return r, connack


def test_last_will(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("will"), ALLOW_ALL, workdir)
    mon = v5(server, Device(server, iot, unique("willmon"), ALLOW_ALL, workdir))
    will_topic = f"will/{dev.name}"
    mon.subscribe(will_topic, qos=1)
    # Dropped connection: the will is published.
    r, connack = connect_with_will(server, dev, will_topic)
    assert connack[0] == 0x20 and connack[3] == 0
    r.close()
    m = mon.messages.get(timeout=5)
    assert (m.topic, m.payload) == (will_topic, b"gone")
    # A clean DISCONNECT: no will.
    r, connack = connect_with_will(server, dev, will_topic, v5_proto=False)
    assert connack == b"\x20\x02\x00\x00"
    r.send(b"\xe0\x00")
    r.read_all(timeout=1)
    r.close()
    assert drain(mon.messages, 1.0) == []
    mon.close()


def test_will_must_be_authorized(server, workdir):
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/allowed/*"}]}
    dev = Device(server, server.boto(), unique("willauth"), doc, workdir)
    _, connack = connect_with_will(server, dev, "forbidden/will")
    assert connack[0] == 0x20 and connack[3] == 0x87, connack.hex()
    _, connack = connect_with_will(server, dev, "allowed/will")
    assert connack[3] == 0
    # A retained will also needs iot:RetainPublish.
    _, connack = connect_with_will(server, dev, "allowed/will", retain=True)
    assert connack[3] == 0x87


def test_persistent_session_queues_qos1(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("persist"), ALLOW_ALL, workdir)
    pub = v5(server, Device(server, iot, unique("ppub"), ALLOW_ALL, workdir))
    topic = f"persist/{dev.name}"
    s = Paho(server, server.endpoint(), dev, dev.name, clean=False)
    rc, flags, _ = s.connect()
    assert rc == 0 and not flags.session_present
    s.subscribe(topic, qos=1)
    # Barrier: the broker has detached the session once it announces the disconnect.
    pub.subscribe(f"$aws/events/presence/disconnected/{dev.name}", qos=1)
    s.close()
    assert json.loads(pub.messages.get(timeout=5).payload)["clientId"] == dev.name
    for i in range(3):
        pub.c.publish(topic, f"m{i}".encode(), qos=1).wait_for_publish(5)
    pub.c.publish(topic, b"qos0-lost", qos=0).wait_for_publish(5)
    s = Paho(server, server.endpoint(), dev, dev.name, clean=False)
    rc, flags, _ = s.connect()
    assert rc == 0 and flags.session_present
    got = [m.payload for m in drain(s.messages, 1.5)]
    assert got == [b"m0", b"m1", b"m2"]
    s.close()
    # A clean session discards it.
    s = Paho(server, server.endpoint(), dev, dev.name, clean=True)
    rc, flags, _ = s.connect()
    assert not flags.session_present
    s.close()
    pub.close()


def test_connect_attributes_gate_persistent_sessions(server, workdir):
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*",
         "Condition": {"ForAllValues:StringEquals": {"iot:ConnectAttributes": []}}}]}
    dev = Device(server, server.boto(), unique("attrs"), doc, workdir)
    clean = Paho(server, server.endpoint(), dev, dev.name, clean=True)
    assert clean.connect()[0] == 0
    clean.close()
    persistent = Paho(server, server.endpoint(), dev, dev.name, clean=False)
    assert persistent.connect()[0] != 0, "a persistent session needs PersistentConnect"
    persistent.close()


def test_takeover_disconnects_the_old_connection(server, workdir):
    dev = Device(server, server.boto(), unique("take"), ALLOW_ALL, workdir)
    a = v5(server, dev)
    b = v5(server, dev)
    rc = a.disconnects.get(timeout=5)
    assert rc.value == 0x8E, f"Session taken over, got {rc}"
    b.subscribe(f"take/{dev.name}", qos=1)
    b.c.publish(f"take/{dev.name}", b"still here", qos=1)
    assert b.messages.get(timeout=5).payload == b"still here"
    a.close()
    b.close()


def test_lifecycle_events(server, workdir):
    iot = server.boto()
    mon = v5(server, Device(server, iot, unique("evmon"), ALLOW_ALL, workdir))
    dev = Device(server, iot, unique("ev"), ALLOW_ALL, workdir, exclusive=True)
    mon.subscribe(f"$aws/events/presence/+/{dev.name}", qos=1)
    mon.subscribe(f"$aws/events/subscriptions/+/{dev.name}", qos=1)
    d = v5(server, dev)
    d.subscribe("ev/topic", qos=0)
    d.close()
    events = {m.topic.split("/")[3]: json.loads(m.payload) for m in drain(mon.messages, 1.5)}
    assert events["connected"]["clientId"] == dev.name
    assert events["connected"]["principalIdentifier"] == dev.cert_id
    assert events["connected"]["thingName"] == dev.name, "exclusive association names the thing"
    assert events["connected"]["ipAddress"] in ("127.0.0.1", "::1")
    assert events["subscribed"]["topics"] == ["ev/topic"]
    assert events["disconnected"]["disconnectReason"] == "CLIENT_INITIATED_DISCONNECT"
    assert events["disconnected"]["clientInitiatedDisconnect"] is True
    mon.close()


def test_shared_subscriptions_split_the_load(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("share"), ALLOW_ALL, workdir)
    a, b = v5(server, dev, unique("a")), v5(server, dev, unique("b"))
    group = f"$share/g1/shared/{dev.name}"
    assert a.subscribe(group, qos=1)[0].value == 1
    assert b.subscribe(group, qos=1)[0].value == 1
    p = v5(server, dev)
    for i in range(30):
        p.c.publish(f"shared/{dev.name}", str(i).encode(), qos=1)
    got_a, got_b = drain(a.messages, 1.5), drain(b.messages, 0.5)
    assert len(got_a) + len(got_b) == 30
    assert sorted(int(m.payload) for m in got_a + got_b) == list(range(30))
    # Split between the members (all 30 to one of them: probability 2^-29).
    assert got_a and got_b, (len(got_a), len(got_b))
    for c in (a, b, p):
        c.close()


def test_cross_version_delivery_and_properties(server, workdir):
    iot = server.boto()
    dev = Device(server, iot, unique("xv"), ALLOW_ALL, workdir)
    topic = f"xv/{dev.name}"
    s5 = v5(server, dev, unique("s5"))
    s5.subscribe(topic, qos=1)
    s3 = Paho(server, server.endpoint(), dev, unique("s3"))
    assert s3.connect()[0] == 0
    s3.subscribe(topic, qos=1)
    p5 = v5(server, dev)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("deviceName", "alpha"), ("deviceCnt", "45")]
    props.ContentType = "text/plain"
    props.ResponseTopic = "reply/here"
    p5.c.publish(topic, b"from v5", qos=1, properties=props)
    m5 = s5.messages.get(timeout=5)
    assert m5.payload == b"from v5"
    assert m5.properties.UserProperty == [("deviceName", "alpha"), ("deviceCnt", "45")], "order preserved"
    assert m5.properties.ContentType == "text/plain" and m5.properties.ResponseTopic == "reply/here"
    m3 = s3.messages.get(timeout=5)
    assert m3.payload == b"from v5"
    p3 = Paho(server, server.endpoint(), dev, unique("p3"))
    assert p3.connect()[0] == 0
    p3.c.publish(topic, b"from v311", qos=1)
    assert s5.messages.get(timeout=5).payload == b"from v311"
    for c in (s5, s3, p5, p3):
        c.close()


def test_policy_variables_and_conditions(server, workdir):
    iot = server.boto()
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/${{iot:Connection.Thing.ThingName}}",
         "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"},
                       "IpAddress": {"aws:SourceIp": ["127.0.0.0/8", "::1/128"]}}},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Subscribe", "iot:Receive"],
         "Resource": [f"{arn}:topic/room/${{iot:Connection.Thing.Attributes[room]}}/*",
                      f"{arn}:topicfilter/room/${{iot:Connection.Thing.Attributes[room]}}/*",
                      f"{arn}:topic/cert/${{iot:CertificateId}}",
                      f"{arn}:topicfilter/cert/${{iot:CertificateId}}"]}]}
    dev = Device(server, iot, unique("vars"), doc, workdir)
    iot.update_thing(thingName=dev.name, attributePayload={"attributes": {"room": "r42"}})
    p = v5(server, dev)
    assert p.subscribe("room/r42/#", qos=1)[0].value == 1
    assert p.subscribe("room/r43/#", qos=1)[0].value == 0x87
    assert p.subscribe(f"cert/{dev.cert_id}", qos=1)[0].value == 1
    p.c.publish("room/r42/temp", b"21", qos=1)
    assert p.messages.get(timeout=5).payload == b"21"
    p.c.publish(f"cert/{dev.cert_id}", b"mine", qos=1)
    assert p.messages.get(timeout=5).payload == b"mine"
    # Changing the attribute moves the permission on the live connection.
    # Registry changes are in force when the API call returns: no waiting.
    iot.update_thing(thingName=dev.name, attributePayload={"attributes": {"room": "r43"}, "merge": True})
    p.c.publish("room/r42/temp", b"x", qos=1)
    _ = p.pubacks.get(timeout=5)
    _ = p.pubacks.get(timeout=5)
    mid, rc = p.pubacks.get(timeout=5)
    assert rc.value == 0x87
    p.close()
    # A source-address condition that does not match refuses the connection.
    far = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*",
                                                   "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}]}
    d2 = Device(server, iot, unique("far"), far, workdir)
    q = Paho(server, server.endpoint(), d2, d2.name, v5=True)
    assert q.connect()[0] == 135
    q.close()


def test_reserved_topics(server, workdir):
    dev = Device(server, server.boto(), unique("rsv"), ALLOW_ALL, workdir)
    p = v5(server, dev)
    assert p.subscribe("$SYS/#", qos=1)[0].value == 0x87
    assert p.subscribe("$aws/events/presence/connected/+", qos=1)[0].value == 1
    p.c.publish("$aws/events/presence/connected/fake", b"spoof", qos=1)
    mid, rc = p.pubacks.get(timeout=5)
    assert rc.value == 0x87
    assert drain(p.messages, 0.5) == []
    p.c.publish(f"$aws/things/{dev.name}/shadow/update", b"{}", qos=1)
    mid, rc = p.pubacks.get(timeout=5)
    assert rc.value == 0
    p.close()


def test_device_https_publish_with_curl(server, workdir):
    """POST /topics/{topic} on the device HTTPS port with a client certificate (curl)."""
    import subprocess
    iot = server.boto()
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/http/*"},
        # Thing variables are not available over HTTPS: this statement never matches there.
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/thing/${{iot:Connection.Thing.ThingName}}"}]}
    dev = Device(server, iot, unique("http"), doc, workdir, exclusive=True)
    mon = v5(server, Device(server, iot, unique("httpmon"), ALLOW_ALL, workdir))
    mon.subscribe("http/#", qos=1)
    mon.subscribe(f"thing/{dev.name}", qos=1)
    base = f"https://{server.endpoint()}:{server.https_port}"

    def curl(path, *extra):
        cp = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--cacert", server.ca, "--cert", str(dev.cert),
                             "--key", str(dev.key), "-X", "POST", *extra, base + path],
                            capture_output=True, text=True, timeout=15)
        body, code = cp.stdout.rsplit("\n", 1)
        return int(code), json.loads(body) if body else None

    code, body = curl("/topics/http/a%2Fb?qos=1", "--data-binary", "hello over https")
    assert code == 200 and body["message"] == "OK" and body["traceId"]
    m = mon.messages.get(timeout=5)
    assert (m.topic, m.payload) == ("http/a/b", b"hello over https")
    code, body = curl("/topics/denied/x", "--data-binary", "no")
    assert code == 403 and body["message"] == "Forbidden"
    code, _ = curl(f"/topics/thing/{dev.name}", "--data-binary", "no thing variables over https")
    assert code == 403
    code, _ = curl("/topics/http/x?qos=2", "--data-binary", "x")
    assert code == 400
    big = workdir / "big.bin"
    big.write_bytes(b"x" * 131073)
    code, _ = curl("/topics/http/big", "--data-binary", f"@{big}")
    assert code == 413
    big.write_bytes(b"x" * 131072)
    code, _ = curl("/topics/http/big", "--data-binary", f"@{big}")
    assert code == 200
    assert len(mon.messages.get(timeout=5).payload) == 131072
    assert drain(mon.messages, 0.5) == []
    # Without a client certificate a request must be signed (SigV4): unsigned is 401.
    cp = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--cacert", server.ca, "-X", "POST",
                         base + "/topics/http/x", "--data-binary", "x"], capture_output=True, text=True, timeout=15)
    body, status = cp.stdout.rsplit("\n", 1)
    assert status == "401" and "Missing" in json.loads(body)["message"], cp.stdout
    assert drain(mon.messages, 0.5) == []
    mon.close()


def test_certificate_variables_from_a_csr(server, workdir):
    """A CSR made with openssl keeps its subject; ${iot:Certificate.Subject.*} policies use it."""
    import subprocess
    iot = server.boto()
    account = server.account_id()
    arn = f"arn:aws:iot:us-east-1:{account}"
    cn = unique("sensor")
    key, csr = workdir / f"{cn}.key", workdir / f"{cn}.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", f"/CN={cn}/O=Acme/OU=Line2"], check=True, capture_output=True)
    c = iot.create_certificate_from_csr(certificateSigningRequest=csr.read_text(), setAsActive=True)
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/${{iot:Certificate.Subject.CommonName}}"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": f"{arn}:topic/${{iot:Certificate.Subject.Organization}}/${{iot:Certificate.Subject.OrganizationalUnit.1}}/*",
         "Condition": {"ForAnyValue:StringEquals": {"iot:Certificate.Subject.OrganizationalUnit.List": ["Line2"]}}},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": f"{arn}:topicfilter/Acme/*"}]}
    pol = unique("certvars")
    iot.create_policy(policyName=pol, policyDocument=json.dumps(doc))
    iot.attach_policy(policyName=pol, target=c["certificateArn"])
    dev = Device.__new__(Device)
    dev.cert, dev.key = workdir / f"{cn}.crt", key
    dev.cert.write_text(c["certificatePem"])
    p = Paho(server, server.endpoint(), dev, cn, v5=True)
    assert p.connect()[0] == 0, "client id = the certificate's CN"
    assert p.subscribe("Acme/Line2/#", qos=1)[0].value == 1
    p.c.publish("Acme/Line2/x", b"ok", qos=1)
    assert p.messages.get(timeout=5).payload == b"ok"
    p.c.publish("Acme/Line1/x", b"no", qos=1)
    _ = p.pubacks.get(timeout=5)
    mid, rc = p.pubacks.get(timeout=5)
    assert rc.value == 0x87
    p.close()
    other = Paho(server, server.endpoint(), dev, unique("not-cn"), v5=True)
    assert other.connect()[0] == 135
    other.close()


def test_inflight_window_100_then_101(server, workdir):
    """At most 100 unacknowledged QoS 1 deliveries per connection; one PUBACK frees one slot."""
    iot = server.boto()
    dev = Device(server, iot, unique("inflight"), ALLOW_ALL, workdir)
    topic = f"inflight/{dev.name}"
    r = Raw(server, dev)
    body = s16(b"MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big") + s16(dev.name.encode())
    r.send(packet(0x10, body))
    r.send(packet(0x82, (1).to_bytes(2, "big") + s16(topic.encode()) + b"\x01"))
    r.s.settimeout(5)
    buf = bytearray()
    while len(buf) < 4 + 5:
        buf += r.s.recv(4096)
    assert buf[:4] == b"\x20\x02\x00\x00" and buf[4] == 0x90, buf.hex()
    pub = v5(server, Device(server, iot, unique("inflightpub"), ALLOW_ALL, workdir))
    for i in range(150):
        pub.c.publish(topic, f"{i}".encode(), qos=1)

    def publishes(data):
        ids, i = [], 0
        while i < len(data):
            t = data[i]
            n, mult, j = 0, 1, i + 1
            while True:
                b = data[j]
                n += (b & 0x7F) * mult
                mult *= 128
                j += 1
                if not b & 0x80:
                    break
            if t >> 4 == 3:
                tl = int.from_bytes(data[j:j + 2], "big")
                ids.append(int.from_bytes(data[j + 2 + tl:j + 4 + tl], "big"))
            i = j + n
        return ids

    data, _ = r.read_all(timeout=2.0)
    data = bytes(buf[9:]) + data
    ids = publishes(data)
    assert len(ids) == 100, f"{len(ids)} deliveries without PUBACK"
    r.send(packet(0x40, ids[0].to_bytes(2, "big")))
    more, _ = r.read_all(timeout=1.0)
    assert len(publishes(more)) == 1, "one PUBACK, one more delivery"
    r.close()
    pub.close()


def test_lifecycle_connect_failed_unsubscribed_and_duplicate_client_id(server, workdir):
    """The lifecycle events the first test does not see: `connect_failed` with
    AUTHORIZATION_FAILED (a client id the policy does not allow), `unsubscribed`, and
    `disconnected` with DUPLICATE_CLIENTID for the connection a second one took over."""
    iot = server.boto()
    account = server.account_id()
    mon = v5(server, Device(server, iot, unique("lcmon"), ALLOW_ALL, workdir))
    only_own = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect",
         "Resource": f"arn:aws:iot:us-east-1:{account}:client/${{iot:Connection.Thing.ThingName}}"},
        {"Effect": "Allow", "Action": ["iot:Subscribe", "iot:Receive", "iot:Publish"], "Resource": "*"}]}
    dev = Device(server, iot, unique("lc"), only_own, workdir)
    stranger = unique("stranger")
    for f in (f"$aws/events/presence/+/{dev.name}", f"$aws/events/subscriptions/+/{dev.name}",
              f"$aws/events/presence/connect_failed/{stranger}"):
        assert mon.subscribe(f, qos=1)[0].value == 1

    # A client id its policy does not allow: refused, and announced.
    bad = Paho(server, server.endpoint(), dev, stranger, v5=True)
    assert bad.connect()[0] != 0
    bad.close()
    # Subscribe, unsubscribe, then a second connection with the same client id.
    first = v5(server, dev)
    # paho reconnects on its own: not within this test, or the two would take turns.
    first.c.reconnect_delay_set(min_delay=120, max_delay=120)
    first.subscribe("lc/topic", qos=1)
    first.c.unsubscribe("lc/topic")
    time.sleep(0.3)
    second = v5(server, dev)
    assert first.disconnects.get(timeout=5) is not None
    first.c.loop_stop()
    events = {}
    for m in drain(mon.messages, 1.5):
        events.setdefault(m.topic.split("/")[3], []).append(json.loads(m.payload))
    failed = events["connect_failed"][0]
    assert failed["clientId"] == stranger
    assert failed["connectFailureReason"] == "AUTHORIZATION_FAILED"
    assert failed["principalIdentifier"] == dev.cert_id
    assert failed["eventType"] == "connect_failed" and "ipAddress" in failed
    assert events["unsubscribed"][0]["topics"] == ["lc/topic"]
    assert events["unsubscribed"][0]["clientId"] == dev.name
    reasons = [e["disconnectReason"] for e in events["disconnected"]]
    assert reasons == ["DUPLICATE_CLIENTID"], reasons
    assert events["disconnected"][0]["clientInitiatedDisconnect"] is False
    # Each connection has its own session identifier.
    connected = [e["sessionIdentifier"] for e in events["connected"]]
    assert len(connected) == 2 and connected[0] != connected[1]
    for c in (mon, second):
        c.close()
