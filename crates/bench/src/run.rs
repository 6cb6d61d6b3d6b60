//! The scenarios: connection storm / idle hold, and publish/subscribe throughput and latency.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use sekisho_mqtt::{
    Ack, Packet, Properties, Publish, QoS, Subscribe, SubscribeFilter, SubscriptionOptions, encode,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, Semaphore};

use crate::Common;
use crate::client::{self, Target};

fn target(c: &Common, keep_alive: u16) -> Target {
    Target {
        host: c.host.clone(),
        addr: c.addr,
        version: c.version(),
        keep_alive,
        clean_start: true,
        custom_auth: c.custom_auth.clone(),
    }
}

fn tls_for(c: &Common, i: usize) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    if c.custom_auth.is_some() {
        return client::custom_auth_tls_config(&c.ca);
    }
    let certs = c
        .certs
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("--certs (or --custom-auth) is needed"))?;
    client::tls_config(
        &c.ca,
        &certs.join(format!("dev-{i}.crt")),
        &certs.join(format!("dev-{i}.key")),
    )
}

fn source(c: &Common, i: usize) -> Option<IpAddr> {
    c.spread_sources
        .then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 250) as u8)))
}

/// (user + system CPU seconds, RSS KiB) of a process, from /proc.
/// The process's CPU seconds (user and kernel), resident KiB, and kernel CPU seconds alone.
fn proc_stats(pid: u32) -> Option<(f64, u64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state(0) ... utime(11) stime(12); clock ticks of 1/100 s.
    let kernel: f64 = f.get(12)?.parse::<f64>().ok()?;
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + kernel;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks / 100.0, rss, kernel / 100.0))
}

fn percentiles(v: &mut [u64], ps: &[f64]) -> Vec<f64> {
    v.sort_unstable();
    ps.iter()
        .map(|p| {
            if v.is_empty() {
                return 0.0;
            }
            let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
            v[i.min(v.len() - 1)] as f64
        })
        .collect()
}

/// Opens `count` connections with at most `concurrency` handshakes in flight, holds them for
/// `hold` seconds, and reports rate, CONNACK latency, failures and the broker's memory.
pub async fn conn(
    c: &Common,
    devices: std::ops::Range<usize>,
    concurrency: usize,
    hold: u64,
    keep_alive: u16,
    pid: Option<u32>,
) -> anyhow::Result<Value> {
    let first = devices.start;
    let count = devices.len();
    let tls: Vec<_> = devices
        .map(|i| tls_for(c, i))
        .collect::<anyhow::Result<_>>()?;
    let t = Arc::new(target(c, keep_alive));
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::default();
    let before = pid.and_then(proc_stats);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for (i, cfg) in tls.into_iter().enumerate() {
        let (t, sem, stop, connected, failures, latencies) = (
            t.clone(),
            sem.clone(),
            stop.clone(),
            connected.clone(),
            failures.clone(),
            latencies.clone(),
        );
        let src = source(c, i);
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let t0 = Instant::now();
            let r = client::connect(&t, cfg, &format!("dev-{}", first + i), src).await;
            let elapsed = t0.elapsed().as_micros() as u64;
            drop(permit);
            let mut conn = match r {
                Ok(conn) => conn,
                Err(e) => {
                    let key = e.split(':').next().unwrap_or("error").to_owned();
                    *failures.lock().await.entry(key).or_default() += 1;
                    return;
                }
            };
            latencies.lock().await.push(elapsed);
            connected.fetch_add(1, Ordering::Relaxed);
            let ping = Duration::from_secs((t.keep_alive as u64 * 3 / 4).max(1));
            let mut buf = BytesMut::new();
            let _ = encode(&Packet::PingReq, t.version, &mut buf);
            while !stop.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = tokio::time::sleep(ping) => {
                        if conn.stream.write_all(&buf).await.is_err() { return; }
                    }
                    p = conn.next() => if !matches!(p, Ok(Some(_))) { return; },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }));
    }
    // Progress until every attempt has finished.
    let attempted = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ok = connected.load(Ordering::Relaxed);
        let failed: u64 = failures.lock().await.values().sum();
        eprint!(
            "\rconnected {ok}/{count} failed {failed} ({:.1}s)",
            start.elapsed().as_secs_f64()
        );
        if ok + failed >= count as u64 {
            break start.elapsed();
        }
    };
    let after_connect = pid.and_then(proc_stats);
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let held = pid.and_then(proc_stats);
    let still = connected.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    eprintln!();
    let mut lat = latencies.lock().await.clone();
    let p = percentiles(&mut lat, &[50.0, 99.0, 100.0]);
    let ok = connected.load(Ordering::Relaxed);
    let cpu_per_connect_ms = match (before, after_connect) {
        (Some((a, _, _)), Some((b, _, _))) if ok > 0 => Some((b - a) * 1000.0 / ok as f64),
        _ => None,
    };
    let rss_idle = match (before, held) {
        (Some((_, a, _)), Some((_, b, _))) if ok > 0 => Some((b as f64 - a as f64) / ok as f64),
        _ => None,
    };
    Ok(json!({
        "scenario": "conn", "connections": count, "connected": ok, "held": still,
        "failures": *failures.lock().await,
        "seconds_to_connect": attempted.as_secs_f64(),
        "connects_per_s": ok as f64 / attempted.as_secs_f64(),
        "connack_ms": {"p50": p[0] / 1000.0, "p99": p[1] / 1000.0, "max": p[2] / 1000.0},
        "broker_cpu_ms_per_connect": cpu_per_connect_ms,
        "broker_rss_kib": held.map(|h| h.1),
        "broker_rss_kib_per_connection": rss_idle,
    }))
}

/// The publish/subscribe scenario.
#[derive(Debug, Clone, Copy)]
pub struct PubSub {
    /// Publishers.
    pub publishers: usize,
    /// Subscribers.
    pub subscribers: usize,
    /// All subscribers on publisher 0's topic (fan-out) rather than one topic each.
    pub shared: bool,
    /// QoS 0 or 1.
    pub qos: u8,
    /// Payload bytes.
    pub payload: usize,
    /// Seconds of publishing.
    pub duration: u64,
    /// Total messages/s (0: unlimited).
    pub rate: u64,
    /// Subscribers keep persistent sessions (their QoS 1 messages are stored until
    /// acknowledged, on a broker that persists them).
    pub persistent: bool,
}

fn topic_of(i: usize) -> String {
    format!("bench/dev-{i}")
}

/// Runs publishers and subscribers and reports throughput, losses and latency.
pub async fn pubsub(
    c: &Common,
    s: PubSub,
    pid: Option<u32>,
    subscriber_addrs: &[std::net::SocketAddr],
    also: &[u32],
) -> anyhow::Result<Value> {
    let qos = if s.qos >= 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let t = Arc::new(target(c, 60));
    // Subscriber j connects to the (j mod n)-th subscriber address, else where publishers do.
    let sub_targets: Vec<Target> = if subscriber_addrs.is_empty() {
        vec![c.addr]
    } else {
        subscriber_addrs.to_vec()
    }
    .into_iter()
    .map(|addr| Target {
        clean_start: !s.persistent,
        addr,
        ..target(c, 60)
    })
    .collect();
    // CPU seconds of the broker and the processes that count with it.
    // (None if any of them cannot be read: a sum over fewer processes would be too low.)
    let cpu_of = |main: Option<(f64, u64, f64)>| {
        let (mut cpu, rss, mut kernel) = main?;
        for p in also {
            let (c, _, k) = proc_stats(*p)?;
            cpu += c;
            kernel += k;
        }
        Some((cpu, rss, kernel))
    };
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop_subs = Arc::new(AtomicBool::new(false));
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut listeners = vec![0u64; s.publishers];
    // Subscribers first.
    let mut sub_tasks = Vec::new();
    for j in 0..s.subscribers {
        let dev = s.publishers + j;
        let follows = if s.shared { 0 } else { j % s.publishers.max(1) };
        listeners[follows] += 1;
        let mut conn = client::connect(
            &sub_targets[j % sub_targets.len()],
            tls_for(c, dev)?,
            &format!("dev-{dev}"),
            source(c, dev),
        )
        .await
        .map_err(|e| anyhow::anyhow!("subscriber dev-{dev}: {e}"))?;
        let mut buf = BytesMut::new();
        let sub = Subscribe {
            packet_id: 1,
            filters: vec![SubscribeFilter {
                filter: topic_of(follows),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            }],
            properties: Properties::default(),
        };
        encode(&Packet::Subscribe(sub), t.version, &mut buf)?;
        conn.stream.write_all(&buf).await?;
        match conn.next().await? {
            Some(Packet::SubAck(a)) if a.codes.first().is_some_and(|c| *c < 0x80) => {}
            other => anyhow::bail!("subscriber dev-{dev}: subscription refused: {other:?}"),
        }
        let (delivered, latencies, stop, version) = (
            delivered.clone(),
            latencies.clone(),
            stop_subs.clone(),
            t.version,
        );
        sub_tasks.push(tokio::spawn(async move {
            let mut local = Vec::with_capacity(1 << 16);
            let mut acks = BytesMut::new();
            while !stop.load(Ordering::Relaxed) {
                let next = tokio::time::timeout(Duration::from_millis(200), conn.next()).await;
                let Ok(next) = next else { continue };
                match next {
                    Ok(Some(Packet::Publish(p))) => {
                        if p.payload.len() >= 8 {
                            let sent_ns =
                                u64::from_be_bytes(p.payload[..8].try_into().unwrap_or_default());
                            let now_ns = epoch.elapsed().as_nanos() as u64;
                            if local.len() < 2_000_000 {
                                local.push(now_ns.saturating_sub(sent_ns) / 1000);
                            }
                        }
                        delivered.fetch_add(1, Ordering::Relaxed);
                        if let Some(id) = p.packet_id {
                            let _ = encode(&Packet::PubAck(Ack::new(id)), version, &mut acks);
                            // Batch acknowledgements: flush when a few are pending or nothing is buffered.
                            if acks.len() >= 64 || conn.rbuf.is_empty() {
                                if conn.stream.write_all(&acks).await.is_err() {
                                    break;
                                }
                                acks.clear();
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            latencies.lock().await.extend(local);
        }));
    }
    let before = cpu_of(pid.and_then(proc_stats));
    let deadline = Instant::now() + Duration::from_secs(s.duration);
    let mut pub_tasks = Vec::new();
    for i in 0..s.publishers {
        let mut conn = client::connect(&t, tls_for(c, i)?, &format!("dev-{i}"), source(c, i))
            .await
            .map_err(|e| anyhow::anyhow!("publisher dev-{i}: {e}"))?;
        let (sent, version, spec) = (sent.clone(), t.version, s);
        pub_tasks.push(tokio::spawn(async move {
            let window = Arc::new(Semaphore::new(100));
            let (mut rd, mut wr) = tokio::io::split(conn.stream);
            let mut rbuf = std::mem::take(&mut conn.rbuf);
            let w2 = window.clone();
            let mut reader = tokio::spawn(async move {
                while let Ok(Some(p)) = client::read_packet(&mut rd, &mut rbuf, version).await {
                    if matches!(p, Packet::PubAck(_)) {
                        w2.add_permits(1);
                    }
                }
            });
            let topic: Arc<str> = topic_of(i).into();
            let per_pub_rate = if spec.rate > 0 {
                spec.rate as f64 / spec.publishers as f64
            } else {
                0.0
            };
            let start = Instant::now();
            let mut seq: u64 = 0;
            let mut next_id: u16 = 1;
            let mut out = BytesMut::with_capacity(64 * 1024);
            while Instant::now() < deadline {
                let batch = if per_pub_rate > 0.0 {
                    let due = (start.elapsed().as_secs_f64() * per_pub_rate) as u64;
                    if due <= seq {
                        tokio::time::sleep(Duration::from_micros(500)).await;
                        continue;
                    }
                    (due - seq).min(256)
                } else {
                    64
                };
                for _ in 0..batch {
                    let packet_id = if qos == QoS::AtLeastOnce {
                        match window.clone().acquire_owned().await {
                            Ok(p) => p.forget(),
                            Err(_) => return,
                        }
                        next_id = next_id.checked_add(1).unwrap_or(1);
                        Some(next_id)
                    } else {
                        None
                    };
                    let mut payload = BytesMut::with_capacity(spec.payload);
                    payload.put_u64(epoch.elapsed().as_nanos() as u64);
                    payload.put_u64(seq);
                    payload.resize(spec.payload, 0x5a);
                    let p = Publish {
                        dup: false,
                        qos,
                        retain: false,
                        topic: topic.clone(),
                        packet_id,
                        properties: Properties::default(),
                        payload: Bytes::from(payload),
                    };
                    let _ = encode(&Packet::Publish(p), version, &mut out);
                    seq += 1;
                    if qos == QoS::AtLeastOnce && window.available_permits() == 0 {
                        break;
                    }
                }
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                out.clear();
            }
            sent.fetch_add(seq, Ordering::Relaxed);
            // Close gracefully: send close_notify, then read (acknowledgements) until the broker
            // closes. Dropping a socket with unread data makes the kernel send a RST, which
            // would discard the last publishes still in flight.
            let _ = wr.shutdown().await;
            if tokio::time::timeout(Duration::from_secs(10), &mut reader)
                .await
                .is_err()
            {
                reader.abort();
            }
        }));
    }
    // Progress.
    let t0 = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprint!(
            "\r{:.0}s delivered {}",
            t0.elapsed().as_secs_f64(),
            delivered.load(Ordering::Relaxed)
        );
    }
    for p in pub_tasks {
        let _ = p.await;
    }
    let publish_seconds = t0.elapsed().as_secs_f64();
    // Let in-flight deliveries land: stop after 1 s without a new delivery (a broker may hold a
    // QoS 1 delivery up to 2 s for a full queue), at most 5 s.
    let mut last = delivered.load(Ordering::Relaxed);
    let mut quiet = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = delivered.load(Ordering::Relaxed);
        quiet = if now == last { quiet + 1 } else { 0 };
        if quiet >= 4 {
            break;
        }
        last = now;
    }
    let after = cpu_of(pid.and_then(proc_stats));
    stop_subs.store(true, Ordering::Relaxed);
    for t in sub_tasks {
        let _ = t.await;
    }
    eprintln!();
    let sent = sent.load(Ordering::Relaxed);
    let delivered = delivered.load(Ordering::Relaxed);
    let per_publisher = sent as f64 / s.publishers.max(1) as f64;
    let expected = (listeners
        .iter()
        .map(|l| *l as f64 * per_publisher)
        .sum::<f64>())
    .round() as u64;
    let mut lat = latencies.lock().await.clone();
    let p = percentiles(&mut lat, &[50.0, 99.0, 99.9]);
    let cpu = match (before, after) {
        (Some((a, _, _)), Some((b, _, _))) => Some(b - a),
        _ => None,
    };
    let kernel = match (before, after) {
        (Some((_, _, a)), Some((_, _, b))) => Some(b - a),
        _ => None,
    };
    Ok(json!({
        "scenario": "pubsub", "publishers": s.publishers, "subscribers": s.subscribers,
        "topics": if s.shared { "shared" } else { "own" }, "qos": s.qos, "payload": s.payload,
        "rate_target": s.rate, "seconds": publish_seconds,
        "subscriber_addrs": subscriber_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "sent": sent, "delivered": delivered, "expected": expected, "lost": expected.saturating_sub(delivered),
        "sent_per_s": sent as f64 / publish_seconds, "delivered_per_s": delivered as f64 / publish_seconds,
        "latency_us": {"p50": p[0], "p99": p[1], "p999": p[2]},
        "broker_cpu_s": cpu,
        "broker_cpu_s_per_million_delivered": cpu.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64),
        "broker_kernel_cpu_s_per_million_delivered": kernel.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64),
        "broker_rss_kib": after.map(|a| a.1),
    }))
}
