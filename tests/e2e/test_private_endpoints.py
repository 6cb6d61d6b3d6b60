"""Private endpoints (AWS's VPC interface endpoint pattern) and TLS security policies per
listener (issue 4)."""

import socket
import ssl
import subprocess

import paho.mqtt.client as mqtt
import pytest

from conftest import ALLOW_ALL, Device, Paho, Server, free_port, unique

VPCE = "vpce-0a1b2c3d4e5f67890"
VPC = "vpc-0123456789abcdef0"


@pytest.fixture(scope="module")
def plant(workdir):
    ports = {name: free_port() for name in ("private", "tls13", "tls12")}
    config = f"""
[[endpoints]]
name = "plant-vpce"
port = {ports["private"]}
vpc_endpoint_id = "{VPCE}"
vpc_id = "{VPC}"
max_connections = 2

[[endpoints]]
name = "tls13-only"
port = {ports["tls13"]}
tls_policy = "IoTSecurityPolicy_TLS13_1_3_2022_10"

[[endpoints]]
name = "tls12-only"
port = {ports["tls12"]}
tls_policy = "IoTSecurityPolicy_TLS12_1_2_2022_10"
"""
    s = Server(workdir / unique("plant"), config=config).start()
    s.ports = ports
    yield s
    s.stop()


def policy(condition):
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*", "Condition": condition},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Subscribe", "iot:Receive"], "Resource": "*"}]}


def connect_rc(server, dev, port, v5=False, keepalive=60):
    p = Paho(server, server.endpoint(), dev, dev.name, v5=v5, port=port, keepalive=keepalive)
    try:
        rc, _, props = p.connect()
        return rc, props, p
    except Exception:
        p.close()
        raise


def rc_of(server, dev, port):
    rc, _, p = connect_rc(server, dev, port)
    p.close()
    return rc


def test_source_vpce_condition_allows_private_and_denies_public(plant, workdir):
    iot = plant.boto()
    dev = Device(plant, iot, unique("vpce"), policy({"StringEquals": {"aws:SourceVpce": VPCE}}), workdir)
    rc, _, p = connect_rc(plant, dev, plant.ports["private"])
    assert rc == 0
    p.close()
    rc, _, p = connect_rc(plant, dev, plant.mqtt_port)
    assert rc == "Not authorized", "public listener"
    p.close()

    # aws:SourceVpc and aws:VpcSourceIp are there too; aws:SourceIp is not (as on AWS).
    dev2 = Device(plant, iot, unique("vpc"), policy(
        {"StringEquals": {"aws:SourceVpc": VPC}, "IpAddress": {"aws:VpcSourceIp": ["127.0.0.0/8", "::1/128"]}}),
        workdir)
    assert rc_of(plant, dev2, plant.ports["private"]) == 0
    assert rc_of(plant, dev2, plant.mqtt_port) == "Not authorized"
    dev3 = Device(plant, iot, unique("pub"), policy({"IpAddress": {"aws:SourceIp": ["127.0.0.0/8", "::1/128"]}}),
                  workdir)
    assert rc_of(plant, dev3, plant.mqtt_port) == 0
    assert rc_of(plant, dev3, plant.ports["private"]) == "Not authorized"
    # A wrong endpoint id is denied everywhere.
    dev4 = Device(plant, iot, unique("other"), policy({"StringEquals": {"aws:SourceVpce": "vpce-ffffffffffffffff0"}}),
                  workdir)
    assert rc_of(plant, dev4, plant.ports["private"]) == "Not authorized"


def test_private_keep_alive_is_capped_at_230(plant, workdir):
    iot = plant.boto()
    dev = Device(plant, iot, unique("ka"), ALLOW_ALL, workdir)
    rc, props, p = connect_rc(plant, dev, plant.ports["private"], v5=True, keepalive=1000)
    assert rc == 0 and props.ServerKeepAlive == 230
    p.close()
    rc, props, p = connect_rc(plant, dev, plant.ports["private"], v5=True, keepalive=230)
    assert rc == 0 and not hasattr(props, "ServerKeepAlive"), "230 is within the cap"
    p.close()
    rc, props, p = connect_rc(plant, dev, plant.mqtt_port, v5=True, keepalive=1000)
    assert rc == 0 and not hasattr(props, "ServerKeepAlive"), "public endpoints allow up to 1200"
    p.close()


def test_private_endpoint_connection_cap(plant, workdir):
    iot = plant.boto()
    devs = [Device(plant, iot, unique("cap"), ALLOW_ALL, workdir) for _ in range(3)]
    held = []
    for d in devs[:2]:  # N = 2: both accepted
        rc, _, p = connect_rc(plant, d, plant.ports["private"])
        assert rc == 0
        held.append(p)
    # N + 1: refused at accept; the public listener is unaffected.
    cmd = ["mosquitto_pub", "-h", plant.endpoint(), "-p", str(plant.ports["private"]), "--cafile", plant.ca,
           "--cert", str(devs[2].cert), "--key", str(devs[2].key), "-i", devs[2].name, "-t", "a", "-m", "x"]
    assert subprocess.run(cmd, capture_output=True, timeout=20).returncode != 0
    assert rc_of(plant, devs[2], plant.mqtt_port) == 0
    held.pop().close()
    for _ in range(50):  # the slot frees once the server sees the close
        if subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0:
            break
    else:
        pytest.fail("the freed slot was not reused")
    for p in held:
        p.close()


def handshake(server, port, dev, version):
    ctx = ssl.create_default_context(cafile=server.ca)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_cert_chain(str(dev.cert), str(dev.key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server.endpoint()) as t:
            return t.version()


@pytest.mark.parametrize("listener,allowed,refused", [
    ("tls13", ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2),
    ("tls12", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
    (None, ssl.TLSVersion.TLSv1_3, None),
])
def test_tls_security_policies(plant, workdir, listener, allowed, refused):
    iot = plant.boto()
    dev = Device(plant, iot, unique("tls"), ALLOW_ALL, workdir)
    port = plant.ports[listener] if listener else plant.mqtt_port
    names = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}
    assert handshake(plant, port, dev, allowed) == names[allowed]
    if refused:
        with pytest.raises(ssl.SSLError):
            handshake(plant, port, dev, refused)
    else:  # the default policy offers both
        assert handshake(plant, port, dev, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    # A full MQTT session over the allowed version.
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev.name)
    ctx = ssl.create_default_context(cafile=plant.ca)
    ctx.minimum_version = ctx.maximum_version = allowed
    ctx.load_cert_chain(str(dev.cert), str(dev.key))
    c.tls_set_context(ctx)
    assert c.connect(plant.endpoint(), port) == 0
    assert c.loop(timeout=5) == 0
    c.disconnect()
