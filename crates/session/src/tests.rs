//! Every timed behaviour of a session, on a virtual clock: a [`Pair`] drives a client end
//! (our codec, encoding what a client sends and decoding what it receives) and the server's
//! session against one clock that only moves when a test says so, the way the gateway's
//! driver would (read, handle, write; sleep until `poll_timeout`, then `on_timeout`).

#![allow(clippy::disallowed_methods)] // the virtual clock starts at one real instant
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sekisho_broker::throttle::Throttled;
use sekisho_broker::{Delivery, Message, PublishError};
use sekisho_mqtt::{
    Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS, Subscribe,
    SubscribeFilter, SubscriptionOptions, Will, decode, encode, reason,
};

use crate::{
    Admission, Attachment, Closed, Config, End, Env, Handshake, HandshakeStep, Published, Rates,
    Session, admit,
};

/// The broker, principal and events of one connection, in memory.
#[derive(Default)]
struct FakeEnv {
    /// Actions (or `action resource`) refused.
    denied: Vec<String>,
    /// Set to make the next refresh fail (revoked certificate, expired credentials).
    revoked: bool,
    published: Vec<Message>,
    subscriptions: HashMap<String, SubscriptionOptions>,
    retained: HashMap<String, Arc<Message>>,
    acked: Vec<u64>,
    throttled: Vec<Throttled>,
    connect_failed: usize,
    /// Deliveries to the session itself returned by `publish`.
    loopback: bool,
}

impl Env for FakeEnv {
    fn refresh(&mut self) -> Result<(), String> {
        if self.revoked {
            Err("revoked".into())
        } else {
            Ok(())
        }
    }
    fn allowed(&mut self, action: &str, _kind: &str, name: &str) -> bool {
        !self
            .denied
            .iter()
            .any(|d| d == action || *d == format!("{action} {name}"))
    }
    fn admit_connect(&mut self, _now: Instant) -> Result<(), Throttled> {
        Ok(())
    }
    fn session_allowed(&mut self) -> bool {
        true
    }
    fn publish(&mut self, message: Message, _now: Instant) -> Result<Published, PublishError> {
        let own = if self.loopback {
            vec![Delivery {
                message: Arc::new(message.clone()),
                qos: message.qos,
                retain: false,
                resend: None,
                seq: 0,
                shared: false,
            }]
        } else {
            Vec::new()
        };
        self.published.push(message);
        Ok(Published { ticket: 0, own })
    }
    fn subscribe(&mut self, filter: &str, options: SubscriptionOptions) -> (bool, u64) {
        (
            self.subscriptions
                .insert(filter.to_string(), options)
                .is_none(),
            0,
        )
    }
    fn unsubscribe(&mut self, filter: &str) -> (bool, u64) {
        (self.subscriptions.remove(filter).is_some(), 0)
    }
    fn subscription_count(&mut self) -> usize {
        self.subscriptions.len()
    }
    fn admit_subscriptions(&mut self, _n: u32, _now: Instant) -> bool {
        true
    }
    fn retained_for(&mut self, filter: &str, _now: Instant) -> Option<Arc<Message>> {
        // Expired ones too: the session itself must not send them.
        self.retained.get(filter).cloned()
    }
    fn acked(&mut self, seq: u64) {
        self.acked.push(seq);
    }
    fn throttled(&mut self, why: Throttled) {
        self.throttled.push(why);
    }
    fn subscriptions_changed(&mut self, _subscribed: bool, _filters: &[String]) {}
    fn connect_failed(&mut self) {
        self.connect_failed += 1;
    }
    fn timestamp_ms(&mut self) -> u64 {
        1_700_000_000_000
    }
}

/// The server end's protocol state.
enum Server {
    Handshake(Handshake),
    Active(Box<Session>),
    Closed(Box<Closed>),
    Refused,
}

/// A client and a server session on one virtual clock.
struct Pair {
    config: Arc<Config>,
    t0: Instant,
    now: Instant,
    version: ProtocolVersion,
    server: Server,
    env: FakeEnv,
    rates: Rates,
    /// When the connection must end regardless (WebSocket).
    deadline: Option<Instant>,
    private: bool,
    /// Bytes on the way from server to client, and decoded packets the client received.
    to_client: BytesMut,
    received: VecDeque<Packet>,
    /// The driver's read pause (AWS's byte rate): no reading before this.
    read_after: Instant,
    attachment: Option<Attachment>,
}

const AWS_RATES: Rates = Rates {
    publishes: 100,
    bytes: 512 * 1024,
    replay: 10,
    shared_replay: 20,
};

impl Pair {
    fn new(version: ProtocolVersion) -> Pair {
        let t0 = Instant::now();
        let config = Arc::new(Config::default());
        Pair {
            server: Server::Handshake(Handshake::new(&config, t0)),
            config,
            t0,
            now: t0,
            version,
            env: FakeEnv::default(),
            rates: AWS_RATES,
            deadline: None,
            private: false,
            to_client: BytesMut::new(),
            received: VecDeque::new(),
            read_after: t0,
            attachment: None,
        }
    }

    /// The next CONNECT resumes a stored session (id 9) with `replay` to send again.
    fn resume(&mut self, replay: VecDeque<Delivery>) {
        self.attachment = Some(Attachment {
            session: 9,
            session_present: true,
            replay,
            ticket: 0,
        });
    }

    fn connect_packet(&self, keep_alive: u16) -> Connect {
        Connect {
            version: self.version,
            clean_start: true,
            keep_alive,
            client_id: "device-1".into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }
    }

    /// Connects with `connect`; returns the CONNACK.
    fn connect_with(&mut self, connect: Connect) -> Packet {
        self.send(Packet::Connect(Box::new(connect)));
        self.recv().expect("a CONNACK")
    }

    fn connect(&mut self, keep_alive: u16) -> Packet {
        let c = self.connect_packet(keep_alive);
        self.connect_with(c)
    }

    /// The client sends a packet; the server reads it at the current time.
    fn send(&mut self, p: Packet) {
        let mut bytes = BytesMut::new();
        encode(&p, self.version, &mut bytes).unwrap();
        self.send_bytes(&bytes);
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        assert!(self.now >= self.read_after, "the driver would not read yet");
        let now = self.now;
        match std::mem::replace(&mut self.server, Server::Refused) {
            Server::Handshake(mut h) => {
                h.read_buf().extend_from_slice(bytes);
                self.server = match h.poll(&self.config, now) {
                    HandshakeStep::Wait => Server::Handshake(h),
                    HandshakeStep::Connect(c, rest) => self.accept(c, rest),
                    HandshakeStep::Refuse(out) => {
                        self.to_client.extend_from_slice(&out);
                        Server::Refused
                    }
                    HandshakeStep::Drop(_) => Server::Refused,
                };
            }
            Server::Active(mut s) => {
                s.read_buf().extend_from_slice(bytes);
                // As the driver does: past the byte rate, it sleeps before it handles them.
                let wait = s.on_read(bytes.len(), now);
                self.now += wait;
                self.read_after = self.now;
                self.server = match s.drain(self.now, &mut self.env) {
                    Ok(()) => Server::Active(s),
                    Err(end) => self.close(s, end),
                };
            }
            other => self.server = other,
        }
        self.flush();
    }

    fn accept(&mut self, c: Box<Connect>, rest: BytesMut) -> Server {
        let now = self.now;
        let admitted = admit(c, &self.config, self.private, || "assigned-1".into())
            .and_then(|a: Admission| a.authorize(&mut self.env, now));
        match admitted {
            Ok(a) => {
                let mut s = Session::new(
                    self.config.clone(),
                    a,
                    self.attachment.take().unwrap_or_default(),
                    rest,
                    self.rates,
                    self.deadline,
                    now,
                );
                match s.drain(now, &mut self.env) {
                    Ok(()) => Server::Active(Box::new(s)),
                    Err(end) => self.close(Box::new(s), end),
                }
            }
            Err(refusal) => {
                self.to_client.extend_from_slice(&refusal.connack());
                Server::Refused
            }
        }
    }

    fn close(&mut self, s: Box<Session>, end: End) -> Server {
        let mut closed = s.close(end, self.now, &mut self.env);
        self.to_client
            .extend_from_slice(&std::mem::take(&mut closed.out));
        Server::Closed(Box::new(closed))
    }

    /// Moves what the server wrote to the client and decodes it.
    fn flush(&mut self) {
        if let Server::Active(s) = &mut self.server {
            let out = s.transmit();
            self.to_client.extend_from_slice(out);
            out.clear();
        }
        while let Some(p) = decode(&mut self.to_client, self.version, &self.config.codec).unwrap() {
            self.received.push_back(p);
        }
    }

    fn recv(&mut self) -> Option<Packet> {
        self.received.pop_front()
    }

    fn drain_received(&mut self) -> Vec<Packet> {
        self.received.drain(..).collect()
    }

    /// Lets virtual time pass to `t0 + at`, firing the server's timers as its driver would.
    fn advance_to(&mut self, at: Duration) {
        let target = self.t0 + at;
        let mut spins = 0;
        loop {
            let next = match &self.server {
                Server::Handshake(h) => h.deadline(),
                Server::Active(s) => s.poll_timeout(self.now),
                _ => target,
            };
            if next > target {
                break;
            }
            spins = if next <= self.now { spins + 1 } else { 0 };
            assert!(
                spins < 1000,
                "the session's timer fires again and again at one instant"
            );
            self.now = self.now.max(next);
            let now = self.now;
            match std::mem::replace(&mut self.server, Server::Refused) {
                Server::Handshake(mut h) => {
                    self.server = match h.poll(&self.config, now) {
                        HandshakeStep::Wait => Server::Handshake(h),
                        _ => Server::Refused,
                    };
                }
                Server::Active(mut s) => {
                    self.server = match s.on_timeout(now, &mut self.env) {
                        Ok(()) => Server::Active(s),
                        Err(end) => self.close(s, end),
                    };
                }
                other => {
                    self.server = other;
                    break;
                }
            }
            self.flush();
        }
        self.now = target;
    }

    fn advance(&mut self, by: Duration) {
        let at = self.now - self.t0 + by;
        self.advance_to(at);
    }

    fn session(&mut self) -> &mut Session {
        match &mut self.server {
            Server::Active(s) => s,
            _ => panic!("the session is not active"),
        }
    }

    fn is_active(&self) -> bool {
        matches!(self.server, Server::Active(_))
    }

    fn ended(&self) -> Option<End> {
        match &self.server {
            Server::Closed(c) => Some(c.end),
            _ => None,
        }
    }

    fn closed(&self) -> &Closed {
        match &self.server {
            Server::Closed(c) => c,
            _ => panic!("not closed"),
        }
    }

    /// The broker hands the session a delivery now.
    fn deliver(&mut self, d: Delivery) {
        let now = self.now;
        if let Server::Active(mut s) = std::mem::replace(&mut self.server, Server::Refused) {
            self.server = match s.deliver(d, now, &mut self.env) {
                Ok(()) => Server::Active(s),
                Err(end) => self.close(s, end),
            };
        }
        self.flush();
    }

    fn disconnect_now(&mut self, reason: u8, session_expiry: Option<u32>) {
        self.send(Packet::Disconnect(Disconnect {
            reason,
            properties: Properties {
                session_expiry_interval: session_expiry,
                ..Properties::default()
            },
        }));
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn connack_of(p: &Packet) -> &sekisho_mqtt::ConnAck {
    match p {
        Packet::ConnAck(c) => c,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &[u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    })
}

fn message(topic: &str, qos: QoS, expires_at: Option<Instant>) -> Arc<Message> {
    Arc::new(Message {
        topic: topic.into(),
        payload: Bytes::from_static(b"m"),
        qos,
        retain: false,
        properties: Properties::default(),
        expires_at,
        origin: None,
        timestamp_ms: 0,
    })
}

fn delivery(m: Arc<Message>, seq: u64) -> Delivery {
    Delivery {
        qos: m.qos,
        message: m,
        retain: false,
        resend: None,
        seq,
        shared: false,
    }
}

fn pubacks(packets: &[Packet]) -> Vec<u8> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .collect()
}

// --- CONNECT deadline -------------------------------------------------------------------

#[test]
fn connect_deadline_is_ten_seconds_to_the_instant() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.send_bytes(&[0x10]); // the first byte of a CONNECT, and no more
    p.advance_to(secs(9.999));
    assert!(matches!(p.server, Server::Handshake(_)), "still waiting");
    p.advance_to(secs(10.0));
    assert!(matches!(p.server, Server::Refused), "dropped at 10 s");
    assert!(p.drain_received().is_empty(), "dropped without a CONNACK");
}

#[test]
fn a_connect_just_before_the_deadline_is_served() {
    let mut p = Pair::new(ProtocolVersion::V311);
    p.advance_to(secs(9.999));
    let ack = p.connect(60);
    assert_eq!(connack_of(&ack).code, 0);
    assert!(p.is_active());
}

// --- keep-alive -------------------------------------------------------------------------

#[test]
fn keep_alive_ends_a_silent_client_at_one_and_a_half_times() {
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut p = Pair::new(version);
        p.connect(60);
        p.advance_to(secs(89.999));
        assert!(p.is_active(), "{version:?}: alive before 90 s");
        p.advance_to(secs(90.0));
        assert_eq!(p.ended(), Some(End::KeepAlive), "{version:?}");
        let got = p.drain_received();
        if version == ProtocolVersion::V5 {
            assert!(
                matches!(got.as_slice(), [Packet::Disconnect(d)] if d.reason == reason::KEEP_ALIVE_TIMEOUT)
            );
        } else {
            assert!(
                got.is_empty(),
                "MQTT 3.1.1 has no DISCONNECT from the server"
            );
        }
    }
}

#[test]
fn pings_keep_a_client_alive_for_a_day() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    for i in 1..=1440 {
        p.advance_to(secs(60.0 * i as f64 - 1.0));
        p.send(Packet::PingReq);
        assert_eq!(p.recv(), Some(Packet::PingResp));
    }
    assert!(p.is_active());
    // Silent from the last ping (at 86,399 s): ends 90 s later.
    p.advance_to(secs(86_399.0 + 89.9));
    assert!(p.is_active());
    p.advance_to(secs(86_399.0 + 90.0));
    assert_eq!(p.ended(), Some(End::KeepAlive));
}

#[test]
fn keep_alive_is_clamped_and_announced() {
    // 0 and above 1200 become 1200 (AWS), below 30 becomes 30; MQTT 5 hears the value.
    for (asked, used) in [
        (0u16, 1200u64),
        (1201, 1200),
        (29, 30),
        (30, 30),
        (1200, 1200),
    ] {
        let mut p = Pair::new(ProtocolVersion::V5);
        let ack = p.connect(asked);
        let announced = connack_of(&ack).properties.server_keep_alive;
        assert_eq!(
            announced,
            (u64::from(asked) != used).then_some(used as u16),
            "asked {asked}"
        );
        p.advance_to(secs(used as f64 * 1.5 - 0.001));
        assert!(p.is_active(), "asked {asked}");
        p.advance_to(secs(used as f64 * 1.5));
        assert_eq!(p.ended(), Some(End::KeepAlive), "asked {asked}");
    }
}

#[test]
fn private_endpoints_cap_keep_alive_at_230_seconds() {
    for (asked, used) in [
        (230u16, 230u64),
        (231, 230),
        (1200, 230),
        (0, 230),
        (60, 60),
    ] {
        let mut p = Pair::new(ProtocolVersion::V5);
        p.private = true;
        p.connect(asked);
        assert_eq!(
            p.session().keep_alive(),
            Duration::from_secs(used),
            "asked {asked}"
        );
        p.advance_to(secs(used as f64 * 1.5 - 0.001));
        assert!(p.is_active());
        p.advance_to(secs(used as f64 * 1.5));
        assert_eq!(p.ended(), Some(End::KeepAlive));
    }
}

// --- WebSocket lifetime and credential expiry -------------------------------------------

#[test]
fn a_websocket_connection_ends_at_its_deadline_however_busy() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.deadline = Some(p.t0 + crate::WEBSOCKET_MAX);
    p.connect(1200);
    // Busy all day: a ping every 20 minutes.
    let day = crate::WEBSOCKET_MAX.as_secs_f64();
    let mut t = 0.0;
    while t + 1200.0 < day {
        t += 1200.0;
        p.advance_to(secs(t));
        p.send(Packet::PingReq);
    }
    p.advance_to(secs(day - 0.001));
    assert!(p.is_active());
    p.advance_to(secs(day));
    assert_eq!(p.ended(), Some(End::Expired));
    assert_eq!(End::Expired.lifecycle(), "WEBSOCKET_TTL_EXPIRATION");
    let last = p.drain_received().pop();
    assert!(
        matches!(last, Some(Packet::Disconnect(d)) if d.reason == reason::ADMINISTRATIVE_ACTION)
    );
}

#[test]
fn credentials_that_expire_first_end_the_connection_then() {
    // The driver passes the earlier of 24 h and the credentials' expiry.
    let mut p = Pair::new(ProtocolVersion::V311);
    p.deadline = Some(p.t0 + Duration::from_secs(900));
    p.connect(60);
    for i in 1..15 {
        p.advance_to(secs(60.0 * i as f64));
        p.send(Packet::PingReq);
    }
    p.advance_to(secs(899.999));
    assert!(p.is_active());
    p.advance_to(secs(900.0));
    assert_eq!(p.ended(), Some(End::Expired));
}

#[test]
fn a_deadline_holds_at_every_packet_and_delivery_even_if_the_timer_never_fires() {
    // A driver busy with reads or deliveries may not get to its timer: the session checks its
    // deadline at every packet and delivery too.
    let mut p = Pair::new(ProtocolVersion::V5);
    p.deadline = Some(p.t0 + Duration::from_secs(900));
    p.connect(1200);
    p.now = p.t0 + Duration::from_secs(899);
    p.send(Packet::PingReq);
    assert!(p.is_active());
    p.now = p.t0 + Duration::from_secs(900);
    p.send(Packet::PingReq);
    assert_eq!(
        p.ended(),
        Some(End::Expired),
        "the packet after the deadline ends it"
    );

    let mut p = Pair::new(ProtocolVersion::V5);
    p.deadline = Some(p.t0 + Duration::from_secs(900));
    p.connect(1200);
    p.now = p.t0 + Duration::from_secs(900);
    p.deliver(delivery(message("t", QoS::AtLeastOnce, None), 3));
    assert_eq!(p.ended(), Some(End::Expired), "so does a delivery");
    assert!(
        p.closed().unacked.iter().any(|d| d.seq == 3),
        "and the delivery stays with the session"
    );
}

#[test]
fn revoked_credentials_end_the_connection_at_the_next_operation() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    p.env.revoked = true;
    p.send(publish("t", QoS::AtLeastOnce, Some(1), b"x"));
    assert_eq!(p.ended(), Some(End::AuthError));
    assert!(p.env.published.is_empty());
    let got = p.drain_received();
    assert!(
        matches!(got.as_slice(), [Packet::Disconnect(d)] if d.reason == reason::NOT_AUTHORIZED)
    );
}

// --- message expiry ---------------------------------------------------------------------

#[test]
fn message_expiry_counts_down_and_expired_messages_are_dropped() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(1200);
    let expires = p.t0 + Duration::from_secs(100);
    p.advance_to(secs(40.0));
    p.deliver(delivery(message("t", QoS::AtMostOnce, Some(expires)), 0));
    match p.recv() {
        Some(Packet::Publish(m)) => assert_eq!(m.properties.message_expiry_interval, Some(60)),
        other => panic!("{other:?}"),
    }
    // Under a second left: 0, as AWS writes it (still delivered).
    p.advance_to(secs(99.5));
    p.deliver(delivery(message("t", QoS::AtMostOnce, Some(expires)), 0));
    match p.recv() {
        Some(Packet::Publish(m)) => assert_eq!(m.properties.message_expiry_interval, Some(0)),
        other => panic!("{other:?}"),
    }
    // At the expiry: not sent, and storage forgets it.
    p.advance_to(secs(100.0));
    p.deliver(delivery(message("t", QoS::AtLeastOnce, Some(expires)), 7));
    assert_eq!(p.recv(), None);
    assert_eq!(p.env.acked, vec![7]);
}

#[test]
fn a_published_message_expiry_becomes_a_deadline() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    p.advance_to(secs(5.0));
    let mut pkt = publish("t", QoS::AtMostOnce, None, b"x");
    if let Packet::Publish(pb) = &mut pkt {
        pb.properties.message_expiry_interval = Some(30);
    }
    p.send(pkt);
    let m = &p.env.published[0];
    assert_eq!(m.expires_at, Some(p.t0 + Duration::from_secs(35)));
    assert_eq!(
        m.properties.message_expiry_interval, None,
        "kept as a deadline"
    );
}

#[test]
fn retained_messages_expire_before_a_new_subscription_sees_them() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    p.env.retained.insert(
        "r".into(),
        message("r", QoS::AtMostOnce, Some(p.t0 + Duration::from_secs(10))),
    );
    let sub = |id| {
        Packet::Subscribe(Subscribe {
            packet_id: id,
            filters: vec![SubscribeFilter {
                filter: "r".into(),
                options: SubscriptionOptions::default(),
            }],
            properties: Properties::default(),
        })
    };
    p.advance_to(secs(9.0));
    p.send(sub(1));
    let got = p.drain_received();
    assert!(
        matches!(&got[..], [Packet::SubAck(_), Packet::Publish(m)] if m.retain && m.properties.message_expiry_interval == Some(1))
    );
    p.advance_to(secs(9.5));
    p.send(sub(3));
    let got = p.drain_received();
    assert!(
        matches!(&got[..], [Packet::SubAck(_), Packet::Publish(m)] if m.properties.message_expiry_interval == Some(0)),
        "{got:?}"
    );
    p.advance_to(secs(10.0));
    p.send(sub(2));
    let got = p.drain_received();
    assert!(matches!(&got[..], [Packet::SubAck(_)]), "{got:?}");
}

// --- wills ------------------------------------------------------------------------------

fn with_will(p: &Pair, delay: Option<u32>, session_expiry: u32) -> Connect {
    let mut c = p.connect_packet(60);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(session_expiry);
    c.will = Some(Will {
        topic: "last/will".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties {
            will_delay_interval: delay,
            message_expiry_interval: Some(60),
            ..Properties::default()
        },
    });
    c
}

#[test]
fn the_will_waits_its_delay_but_never_past_the_session() {
    for (delay, expiry, wait) in [
        (None, 300, 0u64),
        (Some(30), 300, 30),
        (Some(600), 300, 300),
        (Some(30), 0, 0),
    ] {
        let mut p = Pair::new(ProtocolVersion::V5);
        let c = with_will(&p, delay, expiry);
        p.connect_with(c);
        p.advance_to(secs(20.0));
        p.send(Packet::PingReq);
        p.advance_to(secs(200.0)); // silent past 90 s: keep-alive ends it at 110 s
        assert_eq!(p.ended(), Some(End::KeepAlive));
        let will = p.closed().will.clone().expect("a will");
        let ended_at = p.t0 + Duration::from_secs(110);
        assert_eq!(
            will.at,
            ended_at + Duration::from_secs(wait),
            "{delay:?} {expiry}"
        );
        // Published at `at`, its expiry counts from then.
        let m = Message::from_will(&will.template, will.at, 1);
        assert_eq!(m.expires_at, Some(will.at + Duration::from_secs(60)));
        assert_eq!(&*m.topic, "last/will");
    }
}

#[test]
fn a_normal_disconnect_sends_no_will_but_reason_4_does() {
    for (code, sent) in [
        (reason::SUCCESS, false),
        (reason::DISCONNECT_WITH_WILL, true),
    ] {
        let mut p = Pair::new(ProtocolVersion::V5);
        let c = with_will(&p, None, 300);
        p.connect_with(c);
        p.disconnect_now(code, None);
        assert_eq!(p.ended(), Some(End::ClientDisconnect { will: sent }));
        assert_eq!(p.closed().will.is_some(), sent);
    }
}

#[test]
fn a_will_is_authorized_again_when_the_connection_ends() {
    let mut p = Pair::new(ProtocolVersion::V5);
    let c = with_will(&p, None, 300);
    p.connect_with(c);
    p.env.denied.push("iot:publish last/will".into());
    p.advance_to(secs(100.0));
    assert_eq!(p.ended(), Some(End::KeepAlive));
    assert!(p.closed().will.is_none(), "the policy changed: no will");

    let mut p = Pair::new(ProtocolVersion::V5);
    let c = with_will(&p, None, 300);
    p.connect_with(c);
    p.env.revoked = true;
    p.advance_to(secs(100.0));
    assert!(p.closed().will.is_none(), "revoked: no will");
}

#[test]
fn a_will_not_authorized_at_connect_refuses_the_connection() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.env.denied.push("iot:publish last/will".into());
    let c = with_will(&p, None, 300);
    let ack = p.connect_with(c);
    assert_eq!(connack_of(&ack).code, reason::NOT_AUTHORIZED);
    assert_eq!(p.env.connect_failed, 1);
}

#[test]
fn session_expiry_set_at_disconnect_is_what_the_broker_gets() {
    let mut p = Pair::new(ProtocolVersion::V5);
    let c = with_will(&p, None, 300);
    p.connect_with(c);
    p.disconnect_now(reason::SUCCESS, Some(10));
    assert_eq!(p.closed().expiry, Some(Duration::from_secs(10)));
    // Zero at CONNECT cannot become non-zero at DISCONNECT ([MQTT-3.14.2-2]).
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    p.disconnect_now(reason::SUCCESS, Some(10));
    assert_eq!(p.ended(), Some(End::ClientError(reason::PROTOCOL_ERROR)));
}

// --- throttles --------------------------------------------------------------------------

#[test]
fn the_100th_publish_in_a_second_passes_and_the_101st_is_refused() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    p.advance_to(secs(1.0)); // the bucket is full
    for i in 1..=100u16 {
        p.send(publish("t", QoS::AtLeastOnce, Some(i), b"x"));
    }
    assert_eq!(pubacks(&p.drain_received()), vec![0; 100]);
    p.send(publish("t", QoS::AtLeastOnce, Some(101), b"x"));
    assert_eq!(
        pubacks(&p.drain_received()),
        vec![reason::MESSAGE_RATE_TOO_HIGH]
    );
    assert_eq!(p.env.throttled, vec![Throttled::ConnectionPublishRate]);
    assert_eq!(p.env.published.len(), 100);
    // 10 ms later, one more token.
    p.advance(secs(0.010));
    p.send(publish("t", QoS::AtLeastOnce, Some(102), b"x"));
    assert_eq!(pubacks(&p.drain_received()), vec![0]);
}

#[test]
fn an_mqtt_3_client_over_the_rate_gets_no_puback() {
    let mut p = Pair::new(ProtocolVersion::V311);
    p.connect(60);
    p.advance_to(secs(1.0));
    for i in 1..=101u16 {
        p.send(publish("t", QoS::AtLeastOnce, Some(i), b"x"));
    }
    assert_eq!(pubacks(&p.drain_received()).len(), 100);
    assert!(p.is_active(), "discarded, not disconnected");
}

#[test]
fn reading_past_512_kib_a_second_waits() {
    let mut p = Pair::new(ProtocolVersion::V311);
    p.connect(60);
    p.advance_to(secs(1.0));
    let payload = vec![b'x'; 100 * 1024];
    let mut total = 0;
    for i in 1..=5u16 {
        p.send(publish("t", QoS::AtLeastOnce, Some(i), &payload));
        total += 1;
    }
    // Five 100 KiB publishes fit in 512 KiB, handled at once; the sixth is handled (and
    // acknowledged) only after the driver's pause.
    assert_eq!(p.now, p.t0 + secs(1.0), "no wait within the rate");
    assert_eq!(pubacks(&p.drain_received()).len(), 5);
    p.send(publish("t", QoS::AtLeastOnce, Some(6), &payload));
    total += 1;
    let wait = p.now - (p.t0 + secs(1.0));
    assert!(wait > Duration::ZERO, "a pause past the rate");
    assert!(wait <= Duration::from_millis(200), "{wait:?}");
    assert_eq!(pubacks(&p.drain_received()).len(), 1, "then acknowledged");
    assert_eq!(p.env.published.len(), total, "delayed, not dropped");
}

#[test]
fn stored_messages_replay_at_ten_a_second_besides_live_traffic() {
    let mut p = Pair::new(ProtocolVersion::V311);
    let stored: VecDeque<Delivery> = (1..=25)
        .map(|i| delivery(message("stored", QoS::AtLeastOnce, None), i))
        .collect();
    p.resume(stored);
    let ack = p.connect(1200);
    assert!(connack_of(&ack).session_present);
    p.advance_to(secs(0.0));
    let first = p.drain_received();
    assert_eq!(first.len(), 10, "the first second's ten");
    // Live traffic is not held back behind the replay.
    p.deliver(delivery(message("live", QoS::AtMostOnce, None), 0));
    assert!(matches!(p.recv(), Some(Packet::Publish(m)) if &*m.topic == "live"));
    p.advance_to(secs(0.999));
    assert_eq!(p.drain_received().len(), 9);
    p.advance_to(secs(1.5));
    assert_eq!(p.drain_received().len(), 6, "the rest, as the rate refills");
    p.advance_to(secs(10.0));
    assert!(p.drain_received().is_empty());
}

#[test]
fn a_shared_groups_stored_messages_replay_at_twenty_a_second_on_their_own_rate() {
    let mut p = Pair::new(ProtocolVersion::V311);
    let shared = |i| {
        let mut d = delivery(message("group", QoS::AtLeastOnce, None), i);
        d.shared = true;
        d
    };
    // 30 a shared group stored, then 12 of the session's own.
    let stored: VecDeque<Delivery> = (1..=30)
        .map(shared)
        .chain((31..=42).map(|i| delivery(message("own", QoS::AtLeastOnce, None), i)))
        .collect();
    p.resume(stored);
    p.connect(1200);
    p.advance_to(secs(0.0));
    let topics = |got: Vec<Packet>| -> Vec<String> {
        got.into_iter()
            .filter_map(|p| match p {
                Packet::Publish(m) => Some(m.topic.to_string()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        topics(p.drain_received()),
        vec!["group"; 20],
        "the group's burst of 20"
    );
    // One every 50 ms: five by a quarter second, where the session's 10 would give two.
    p.advance_to(secs(0.27));
    assert_eq!(topics(p.drain_received()), vec!["group"; 5]);
    // The last five of the group, then the session's own, at their own rate with its burst.
    p.advance_to(secs(0.52));
    let got = topics(p.drain_received());
    assert_eq!(&got[..5], vec!["group"; 5]);
    assert_eq!(&got[5..], vec!["own"; 10], "the session's burst of ten");
    p.advance_to(secs(0.73));
    assert_eq!(
        topics(p.drain_received()),
        vec!["own"; 2],
        "then ten a second"
    );
    p.advance_to(secs(10.0));
    assert!(p.drain_received().is_empty());
}

#[test]
fn replay_stops_at_the_clients_receive_maximum() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.resume(
        (1..=5)
            .map(|i| delivery(message("s", QoS::AtLeastOnce, None), i))
            .collect(),
    );
    let mut c = p.connect_packet(1200);
    c.properties.receive_maximum = Some(2);
    p.connect_with(c);
    p.advance_to(secs(5.0));
    let got = p.drain_received();
    assert_eq!(got.len(), 2, "two in flight at most");
    for pkt in got {
        if let Packet::Publish(m) = pkt {
            p.send(Packet::PubAck(sekisho_mqtt::Ack {
                packet_id: m.packet_id.unwrap(),
                reason: 0,
                properties: Properties::default(),
            }));
        }
    }
    assert_eq!(p.env.acked, vec![1, 2]);
    p.advance_to(secs(6.0));
    assert_eq!(p.drain_received().len(), 2);
}

// --- unacknowledged messages and the end of a connection -------------------------------

#[test]
fn unacknowledged_deliveries_go_back_oldest_first_with_their_packet_ids() {
    let mut p = Pair::new(ProtocolVersion::V311);
    p.connect(60);
    for seq in 1..=3 {
        p.deliver(delivery(message("t", QoS::AtLeastOnce, None), seq));
    }
    let ids: Vec<u16> = p
        .drain_received()
        .iter()
        .filter_map(|x| match x {
            Packet::Publish(m) => m.packet_id,
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    p.send(Packet::PubAck(sekisho_mqtt::Ack {
        packet_id: 2,
        reason: 0,
        properties: Properties::default(),
    }));
    p.advance_to(secs(200.0));
    let closed = p.closed();
    let back: Vec<(u64, Option<u16>)> = closed.unacked.iter().map(|d| (d.seq, d.resend)).collect();
    assert_eq!(back, vec![(1, Some(1)), (3, Some(3))]);
}

#[test]
fn a_resent_delivery_keeps_its_packet_id_and_sets_dup() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    let mut d = delivery(message("t", QoS::AtLeastOnce, None), 4);
    d.resend = Some(7);
    p.deliver(d);
    match p.recv() {
        Some(Packet::Publish(m)) => {
            assert_eq!(m.packet_id, Some(7));
            assert!(m.dup);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn new_packet_ids_skip_those_stored_messages_wait_to_be_sent_again_with() {
    let mut p = Pair::new(ProtocolVersion::V311);
    // Ten sent at once (the replay burst), the eleventh later with the id it had before.
    let mut stored: VecDeque<Delivery> = (1..=10)
        .map(|i| delivery(message("new", QoS::AtLeastOnce, None), i))
        .collect();
    let mut again = delivery(message("again", QoS::AtLeastOnce, None), 11);
    again.resend = Some(1);
    stored.push_back(again);
    p.resume(stored);
    p.connect(1200);
    p.advance_to(secs(0.0));
    let ids: Vec<u16> = p
        .drain_received()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(m) => m.packet_id,
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 10);
    assert!(
        !ids.contains(&1),
        "id 1 is kept for the stored message: {ids:?}"
    );
    p.advance_to(secs(0.1));
    match p.recv() {
        Some(Packet::Publish(m)) => {
            assert_eq!((&*m.topic, m.packet_id, m.dup), ("again", Some(1), true));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn idle_buffers_shrink_after_a_quiet_second() {
    let mut p = Pair::new(ProtocolVersion::V311);
    p.connect(60);
    p.advance_to(secs(1.0));
    p.send(publish("t", QoS::AtMostOnce, None, &vec![0u8; 20_000]));
    let mut big = (*message("t", QoS::AtMostOnce, None)).clone();
    big.payload = Bytes::from(vec![0u8; 20_000]);
    p.deliver(delivery(Arc::new(big), 0));
    let (_, w) = p.session().buffer_capacity();
    assert!(w >= 20_000, "the write buffer grew for the big packet: {w}");
    p.advance_to(secs(1.999));
    assert!(p.session().buffer_capacity().1 >= 20_000);
    p.advance_to(secs(2.0));
    let (r, w) = p.session().buffer_capacity();
    assert!(r <= crate::IDLE_BUF && w == 0, "shrunk: {r} {w}");
    // And the timer does not fire again for it: the next wake-up is the keep-alive.
    let now = p.now;
    assert_eq!(p.session().poll_timeout(now), p.t0 + secs(1.0 + 90.0));
}

#[test]
fn an_mqtt_3_client_that_publishes_where_it_may_not_is_disconnected() {
    let mut p = Pair::new(ProtocolVersion::V311);
    p.connect(60);
    p.env.denied.push("iot:publish".into());
    p.send(publish("t", QoS::AtLeastOnce, Some(1), b"x"));
    assert_eq!(p.ended(), Some(End::Forbidden));
    assert_eq!(End::Forbidden.lifecycle(), "FORBIDDEN_ACCESS");
    // MQTT 5 hears PUBACK 0x87 and stays.
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    p.env.denied.push("iot:publish".into());
    p.send(publish("t", QoS::AtLeastOnce, Some(1), b"x"));
    assert_eq!(pubacks(&p.drain_received()), vec![reason::NOT_AUTHORIZED]);
    assert!(p.is_active());
}

#[test]
fn a_message_to_its_own_full_queue_is_written_directly() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    p.env.loopback = true;
    p.send(publish("t", QoS::AtLeastOnce, Some(1), b"x"));
    let got = p.drain_received();
    assert!(
        matches!(&got[..], [Packet::Publish(_), Packet::PubAck(_)]),
        "{got:?}"
    );
}

#[test]
fn inbound_and_outbound_publishes_share_the_100_a_second() {
    let mut p = Pair::new(ProtocolVersion::V5);
    p.connect(60);
    p.advance_to(secs(1.0)); // the bucket is full
    for _ in 0..60 {
        p.send(publish("in", QoS::AtMostOnce, None, b"x"));
    }
    for seq in 1..=41 {
        p.deliver(delivery(message("out", QoS::AtLeastOnce, None), seq));
    }
    let out = p
        .drain_received()
        .into_iter()
        .filter(|x| matches!(x, Packet::Publish(_)))
        .count();
    assert_eq!(out, 40, "60 in + 40 out = 100; the 41st out is discarded");
    assert_eq!(p.env.acked, vec![41], "and forgotten by storage");
    assert_eq!(p.env.throttled, vec![Throttled::ConnectionPublishRate]);
    assert!(p.is_active());
    // 10 ms later, one more.
    p.advance(secs(0.010));
    p.deliver(delivery(message("out", QoS::AtMostOnce, None), 0));
    assert!(matches!(p.recv(), Some(Packet::Publish(_))));
}

#[test]
fn stored_messages_are_not_discarded_by_the_publish_rate() {
    let mut p = Pair::new(ProtocolVersion::V311);
    p.resume(
        (1..=5)
            .map(|i| delivery(message("stored", QoS::AtLeastOnce, None), i))
            .collect(),
    );
    p.connect(60);
    for _ in 0..100 {
        p.send(publish("in", QoS::AtMostOnce, None, b"x"));
    }
    p.advance_to(secs(0.0));
    let stored = p
        .drain_received()
        .into_iter()
        .filter(|x| matches!(x, Packet::Publish(m) if &*m.topic == "stored"))
        .count();
    assert_eq!(stored, 5, "paced by the replay rate only");
    assert!(p.env.acked.is_empty());
}

#[test]
fn the_admission_knows_the_will_the_session_would_publish() {
    // What a cluster keeps for a dead node's connection is what the session itself publishes.
    for (delay, expiry) in [(None, 300), (Some(30), 300), (Some(600), 300)] {
        let mut p = Pair::new(ProtocolVersion::V5);
        let c = with_will(&p, delay, expiry);
        let admitted = admit(Box::new(c.clone()), &p.config, false, || "x".into()).unwrap();
        let (wait, template) = admitted.will().expect("a will");
        p.connect_with(c);
        p.advance_to(secs(200.0));
        assert_eq!(p.ended(), Some(End::KeepAlive));
        let will = p.closed().will.clone().expect("a will");
        assert_eq!(will.template, template);
        assert_eq!(will.at, p.t0 + Duration::from_secs(90) + wait);
    }
    let p = Pair::new(ProtocolVersion::V5);
    let admitted = admit(Box::new(p.connect_packet(60)), &p.config, false, || {
        "x".into()
    })
    .unwrap();
    assert!(admitted.will().is_none());
    // A connection another node adopted ends without a will (that node sent it).
    assert!(!End::Adopted.sends_will());
    assert_eq!(
        End::Adopted.disconnect_code(),
        Some(reason::SESSION_TAKEN_OVER)
    );
}
