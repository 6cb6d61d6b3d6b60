"""Registry writes through a running server (or cluster): N sequential CreateThing calls with
boto3 against the first control-plane port, then N more split over every port given, in one
thread per port (in a cluster: writers on several nodes, ordered by the registry log).
Prints one line of JSON. Usage:
  registry_writes.py DATA_DIR N API_PORT [API_PORT...]
DATA_DIR is the first node's data directory (its profile `sekisho` and CA are used)."""
import configparser
import json
import sys
import threading
import time

import boto3

data_dir, n, ports = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
creds = configparser.ConfigParser()
creds.read(f"{data_dir}/aws/credentials")


def client(port):
    return boto3.client("iot", region_name="us-east-1", endpoint_url=f"https://localhost:{port}",
                        verify=f"{data_dir}/ca.pem", aws_access_key_id=creds["sekisho"]["aws_access_key_id"],
                        aws_secret_access_key=creds["sekisho"]["aws_secret_access_key"])


tag = str(int(time.time()))
first = client(ports[0])
first.create_thing(thingName=f"warm-{tag}")
t = time.perf_counter()
for i in range(n):
    first.create_thing(thingName=f"seq-{tag}-{i}")
sequential = time.perf_counter() - t

errors = []


def write(port, k):
    iot = client(port)
    for i in range(n // len(ports)):
        try:
            iot.create_thing(thingName=f"par-{tag}-{k}-{i}")
        except Exception as e:  # counted, not fatal: the run says how many failed
            errors.append(repr(e))


threads = [threading.Thread(target=write, args=(p, k)) for k, p in enumerate(ports)]
t = time.perf_counter()
for th in threads:
    th.start()
for th in threads:
    th.join()
parallel = time.perf_counter() - t
print(json.dumps({"ports": ports, "n": n, "sequential_per_s": round(n / sequential),
                  "sequential_ms_each": round(sequential / n * 1000, 2),
                  "one_writer_per_port_per_s": round((n // len(ports)) * len(ports) / parallel),
                  "errors": len(errors), "first_error": errors[0] if errors else None}))
