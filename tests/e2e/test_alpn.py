"""AWS's port 443: the device HTTPS listener carries MQTT as well, chosen by ALPN
(`x-amzn-mqtt-ca` for MQTT with a client certificate, `x-amzn-http-ca` or `http/1.1` or none
for HTTPS), so a device configured for AWS's 443 works with only the port changed."""

import json
import queue
import socket
import ssl
import subprocess

from awscrt import io as crt_io
from awscrt import mqtt as crt_mqtt

from conftest import ALLOW_ALL, Device, Paho, unique


def test_the_sdk_speaks_mqtt_on_the_https_port_by_alpn(server, workdir):
    """The AWS IoT Device SDK's connection with ALPN `x-amzn-mqtt-ca` (what it sends on port
    443) on the HTTPS port: connects, subscribes, and gets what curl publishes over HTTPS with
    the same certificate on the same port."""
    dev = Device(server, server.boto(), unique("alpn"), ALLOW_ALL, workdir)
    opts = crt_io.TlsContextOptions.create_client_with_mtls_from_path(str(dev.cert), str(dev.key))
    opts.override_default_trust_store_from_path(None, server.ca)
    opts.alpn_list = ["x-amzn-mqtt-ca"]
    conn = crt_mqtt.Connection(client=crt_mqtt.Client(None, crt_io.ClientTlsContext(opts)),
                               host_name=server.endpoint(), port=server.https_port, client_id=dev.name,
                               clean_session=True, keep_alive_secs=30)
    conn.connect().result(10)
    got = queue.Queue()
    topic = f"alpn/{dev.name}"
    conn.subscribe(topic, crt_mqtt.QoS.AT_LEAST_ONCE, lambda topic, payload, **kw: got.put(payload))[0].result(10)
    cp = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", server.ca,
                         "--cert", str(dev.cert), "--key", str(dev.key), "--data-binary", "over https",
                         f"https://{server.endpoint()}:{server.https_port}/topics/{topic}?qos=1"],
                        capture_output=True, text=True, timeout=15)
    assert cp.stdout == "200"
    assert got.get(timeout=5) == b"over https"
    conn.disconnect().result(10)


def negotiated(server, dev, protocols):
    """The protocol the HTTPS port agrees on for a client offering `protocols` (None: refused)."""
    ctx = ssl.create_default_context(cafile=server.ca)
    ctx.load_cert_chain(str(dev.cert), str(dev.key))
    ctx.set_alpn_protocols(protocols)
    try:
        with socket.create_connection(("127.0.0.1", server.https_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=server.endpoint()) as s:
                return s.selected_alpn_protocol()
    except ssl.SSLError:
        return None


def test_alpn_choices_and_refusals(server, workdir):
    """HTTPS for `x-amzn-http-ca`, `http/1.1` (curl's and browsers' `h2, http/1.1` included);
    MQTT only when asked for; a client offering only protocols we do not speak is refused; MQTT
    by ALPN without a client certificate gets no MQTT session; paho with the ALPN works."""
    dev = Device(server, server.boto(), unique("alpn2"), ALLOW_ALL, workdir)
    assert negotiated(server, dev, ["x-amzn-http-ca"]) == "x-amzn-http-ca"
    assert negotiated(server, dev, ["h2", "http/1.1"]) == "http/1.1"
    assert negotiated(server, dev, ["http/1.1", "x-amzn-mqtt-ca"]) == "x-amzn-mqtt-ca"
    assert negotiated(server, dev, ["h2"]) is None

    # paho-mqtt over the HTTPS port with the ALPN.
    p = Paho(server, server.endpoint(), dev, dev.name, port=server.https_port, alpn=["x-amzn-mqtt-ca"])
    assert p.connect()[0] == 0
    p.subscribe(f"alpn/{dev.name}", qos=1)
    p.c.publish(f"alpn/{dev.name}", b"loop", qos=1)
    assert p.messages.get(timeout=5).payload == b"loop"
    p.close()

    # Without a certificate: the TLS handshake succeeds (SigV4 clients need it), MQTT does not.
    ctx = ssl.create_default_context(cafile=server.ca)
    ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])
    with socket.create_connection(("127.0.0.1", server.https_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server.endpoint()) as s:
            assert s.selected_alpn_protocol() == "x-amzn-mqtt-ca"
            # CONNECT, MQTT 3.1.1, client id "x".
            s.sendall(bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 1]) + b"x")
            s.settimeout(5)
            assert s.recv(16) == b"", "the connection closes without a CONNACK"
    # HTTPS on the same port still answers SigV4 clients.
    data = server.boto("iot-data")
    data.publish(topic=f"alpn/{dev.name}", payload=json.dumps({"ok": 1}).encode())
