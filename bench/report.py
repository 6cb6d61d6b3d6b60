"""Renders bench/compare.sh results into the table in BENCHMARKS.md (between the markers)."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

out, mosq_version, scale = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
root = Path(__file__).resolve().parents[1]


def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def ratio(a, b, higher_is_better=True):
    if a is None or b is None or a == 0 or b == 0:
        return "n/a"
    r = a / b if higher_is_better else b / a
    return f"{r:.2f}x"


def fmt(v, digits=0):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


rows = []


def get(d, path):
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
        if d is None:
            return None
    return d


def row(label, key, path, digits=0, higher=True):
    s, m, r = (load(f"{b}-{key}") for b in ("sekisho", "mosquitto", "rumqttd"))
    sv, mv, rv = get(s, path), get(m, path), get(r, path)
    rows.append(f"| {label} | {fmt(sv, digits)} | {fmt(mv, digits)} | {fmt(rv, digits)} "
                f"| {ratio(sv, mv, higher)} | {ratio(sv, rv, higher)} |")


row("mTLS connection storm: connects/s", "storm", ["connects_per_s"])
row("storm: broker CPU ms per connect", "storm", ["broker_cpu_ms_per_connect"], 2, higher=False)
bare = load("bare-storm")
s_storm = load("sekisho-storm")
if bare and s_storm:
    rows.append(f"| storm: bare rustls mTLS ceiling, connects/s (Sekisho = {100 * s_storm['connects_per_s'] / bare['connects_per_s']:.0f} % of it) "
                f"| {fmt(bare['connects_per_s'])} | | | | |")
row("storm: CONNACK p99 ms", "storm", ["connack_ms", "p99"], 1, higher=False)
for i, n in enumerate(sorted({int(p.stem.split("-")[-1]) for p in out.glob("sekisho-idle-*.json")})):
    # Only the first idle run is on a fresh process; later ones reuse the heap the previous
    # run freed, so their per-connection figure is a lower bound.
    note = "" if i == 0 else " (same process after the smaller run: reuses its freed heap)"
    row(f"idle {n:,} mTLS connections (PINGREQ every 15 s): KiB per connection{note}", f"idle-{n}", ["broker_rss_kib_per_connection"], 1,
        higher=False)
    row(f"idle {n:,}: connected", f"idle-{n}", ["connected"])
row("10→10 QoS 0: delivered msg/s", "p2p-qos0", ["delivered_per_s"])
row("10→10 QoS 0: broker CPU s per million delivered", "p2p-qos0", ["broker_cpu_s_per_million_delivered"], 2, higher=False)
row("10→10 QoS 0: lost (dropped by rule under overload)", "p2p-qos0", ["lost"], higher=False)
row("10→10 QoS 1: delivered msg/s", "p2p-qos1", ["delivered_per_s"])
row("10→10 QoS 1: broker CPU s per million delivered", "p2p-qos1", ["broker_cpu_s_per_million_delivered"], 2, higher=False)
row("10→10 QoS 1: lost", "p2p-qos1", ["lost"], higher=False)
row("10→10 QoS 1, persistent sessions: delivered msg/s", "persistent-qos1", ["delivered_per_s"])
row("persistent sessions: broker CPU s per million delivered", "persistent-qos1", ["broker_cpu_s_per_million_delivered"], 2, higher=False)
row("persistent sessions: lost", "persistent-qos1", ["lost"], higher=False)
row("1→100 fan-out QoS 0: delivered msg/s", "fanout", ["delivered_per_s"])
row("fan-out: broker CPU s per million delivered", "fanout", ["broker_cpu_s_per_million_delivered"], 2, higher=False)
row("latency at 10,000 msg/s: p50 µs", "latency", ["latency_us", "p50"], higher=False)
row("latency at 10,000 msg/s: p99 µs", "latency", ["latency_us", "p99"], higher=False)
row("10,000 msg/s QoS 0: broker CPU s per million delivered", "latency", ["broker_cpu_s_per_million_delivered"], 2, higher=False)
row("10,000 msg/s QoS 0: of which in the kernel", "latency", ["broker_kernel_cpu_s_per_million_delivered"], 2, higher=False)
row("10,000 msg/s QoS 1: p50 µs", "latency-qos1", ["latency_us", "p50"], higher=False)
row("10,000 msg/s QoS 1: p99 µs", "latency-qos1", ["latency_us", "p99"], higher=False)
row("10,000 msg/s QoS 1: broker CPU s per million delivered", "latency-qos1", ["broker_cpu_s_per_million_delivered"], 2, higher=False)
row("10,000 msg/s QoS 1: of which in the kernel", "latency-qos1", ["broker_kernel_cpu_s_per_million_delivered"], 2, higher=False)

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"

cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
mem = sh("free -g | awk '/Mem:/ {print $2}'")
table = "\n".join([
    f"Run {out.name} (`SCALE={scale} bench/compare.sh`), Sekisho {sh('git -C ' + str(root) + ' rev-parse --short HEAD')}, "
    f"Mosquitto {mosq_version}, rumqttd {'0.20.0' if (out / 'rumqttd-storm.json').exists() else 'not run'}, {sh('rustc --version')}; {os.cpu_count()} cores ({cpu}), {mem} GiB, Linux {platform.release()}. "
    "The load tool runs on the same two cores as the broker. Raw JSON: `"
    + (str(out.relative_to(root)) if out.is_relative_to(root) else str(out)) + "`.",
    "",
    "| scenario | Sekisho | Mosquitto | rumqttd | Sekisho vs Mosquitto | Sekisho vs rumqttd |",
    "|---|---:|---:|---:|---:|---:|",
    *rows,
])
bm = root / "BENCHMARKS.md"
text = bm.read_text()
begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
i, j = text.index(begin) + len(begin), text.index(end)
bm.write_text(text[:i] + "\n" + table + "\n" + text[j:])
print(table)
