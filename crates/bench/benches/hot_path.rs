//! Micro-benchmarks of the per-message hot path: codec, topic matching, policy checks.
//! Run: `cargo bench -p sekisho-bench --bench hot_path`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, criterion_group, criterion_main};
use sekisho_broker::trie::{SubEntry, Trie};
use sekisho_mqtt::{
    Limits, Packet, Properties, ProtocolVersion, Publish, QoS, Subscribe, SubscribeFilter,
    SubscriptionOptions, decode, encode,
};
use sekisho_policy::{Dialect, MapContext, Policy, decide};

fn publish(qos: QoS) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: "topic/device-0042/telemetry".into(),
        packet_id: (qos != QoS::AtMostOnce).then_some(7),
        properties: Properties::default(),
        payload: Bytes::from(vec![0x5a; 64]),
    })
}

fn codec(c: &mut Criterion) {
    let limits = Limits::default();
    for (name, p, v) in [
        (
            "publish_qos0_64B_v311",
            publish(QoS::AtMostOnce),
            ProtocolVersion::V311,
        ),
        (
            "publish_qos1_64B_v5",
            publish(QoS::AtLeastOnce),
            ProtocolVersion::V5,
        ),
        (
            "subscribe_3_filters_v5",
            Packet::Subscribe(Subscribe {
                packet_id: 3,
                filters: ["a/b/c", "d/+/f", "g/#"]
                    .iter()
                    .map(|f| SubscribeFilter {
                        filter: f.to_string(),
                        options: SubscriptionOptions::default(),
                    })
                    .collect(),
                properties: Properties::default(),
            }),
            ProtocolVersion::V5,
        ),
    ] {
        let mut wire = BytesMut::new();
        encode(&p, v, &mut wire).unwrap_or_default();
        let wire = wire.freeze();
        c.bench_function(&format!("decode/{name}"), |b| {
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                black_box(decode(&mut buf, v, &limits).ok())
            })
        });
        let mut out = BytesMut::with_capacity(256);
        c.bench_function(&format!("encode/{name}"), |b| {
            b.iter(|| {
                out.clear();
                encode(black_box(&p), v, &mut out).unwrap_or_default();
                black_box(out.len())
            })
        });
    }
}

fn topics(c: &mut Criterion) {
    // 10,000 devices each subscribed to its own topic, plus some wildcard subscribers.
    let mut t = Trie::default();
    let e = SubEntry {
        options: SubscriptionOptions::default(),
    };
    for i in 0..10_000u64 {
        t.insert(i, &format!("topic/device-{i:04}/telemetry"), e);
    }
    t.insert(20_000, "topic/+/telemetry", e);
    t.insert(20_001, "topic/#", e);
    t.insert(20_002, "$aws/events/#", e);
    c.bench_function("trie/match_10k_subscribers_3_hits", |b| {
        b.iter(|| {
            let mut n = 0;
            t.matches(black_box("topic/device-0042/telemetry"), &mut |_| n += 1);
            black_box(n)
        })
    });
}

const TYPICAL: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}"},
    {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": "arn:aws:iot:us-east-1:123456789012:topic/topic/${iot:Connection.Thing.ThingName}/*"},
    {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": "arn:aws:iot:us-east-1:123456789012:topicfilter/topic/${iot:Connection.Thing.ThingName}/*"}
  ]
}"#;

fn policy(c: &mut Criterion) {
    let mut ctx = MapContext::new();
    ctx.set("iot:ClientId", "device-0042")
        .set("iot:Connection.Thing.ThingName", "device-0042");
    let parsed = Policy::parse(TYPICAL, Dialect::Iot).unwrap_or_else(|e| panic!("{e}"));
    let bound = parsed.bind(&ctx);
    let allowed = "arn:aws:iot:us-east-1:123456789012:topic/topic/device-0042/telemetry";
    let denied = "arn:aws:iot:us-east-1:123456789012:topic/topic/device-0043/telemetry";
    c.bench_function("policy/decide_publish_allowed", |b| {
        b.iter(|| black_box(decide([&bound], "iot:publish", black_box(allowed), &ctx)))
    });
    c.bench_function("policy/decide_publish_denied", |b| {
        b.iter(|| black_box(decide([&bound], "iot:publish", black_box(denied), &ctx)))
    });
    c.bench_function("policy/parse_typical", |b| {
        b.iter(|| black_box(Policy::parse(black_box(TYPICAL), Dialect::Iot).ok()))
    });
    c.bench_function("policy/bind_typical", |b| {
        b.iter(|| black_box(parsed.bind(&ctx)))
    });
}

criterion_group!(benches, codec, topics, policy);
criterion_main!(benches);
