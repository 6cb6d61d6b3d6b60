"""Registry writes end to end: N sequential CreateThing calls with boto3 against a server binary
(each one a synced SQLite commit). Usage: create_things.py BINARY N"""
import os, shutil, subprocess, sys, tempfile, time, socket
import boto3
binary, n = sys.argv[1], int(sys.argv[2])
def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
d = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR", "."))  # on the disk under test
ports = [port() for _ in range(4)]
proc = subprocess.Popen([binary, "serve", "--data-dir", d, "--mqtt-port", str(ports[0]), "--https-port", str(ports[1]),
                         "--api-port", str(ports[2]), "--s3-port", str(ports[3])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", ports[2]), timeout=1).close(); break
        except OSError:
            time.sleep(0.1)
    time.sleep(0.5)
    os.environ["AWS_CONFIG_FILE"] = f"{d}/aws/config"; os.environ["AWS_SHARED_CREDENTIALS_FILE"] = f"{d}/aws/credentials"
    os.environ.pop("AWS_CA_BUNDLE", None)
    iot = boto3.Session(profile_name="sekisho").client("iot")
    iot.create_thing(thingName="warm")
    t = time.perf_counter()
    for i in range(n):
        iot.create_thing(thingName=f"t{i}")
    dt = time.perf_counter() - t
    print(f"{binary}: {n} CreateThing in {dt:.2f} s = {n/dt:.0f}/s, {dt/n*1000:.2f} ms each")
finally:
    proc.terminate(); proc.wait()
    shutil.rmtree(d, ignore_errors=True)
