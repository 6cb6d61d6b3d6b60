//! An accepted connection: packets in, acknowledgements and deliveries out, the keep-alive,
//! credential and WebSocket deadlines, AWS's per-connection rates, and the stored messages of a
//! resumed session sent at the replay rate.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sekisho_broker::aws::{self, AwsReject};
use sekisho_broker::throttle::{Bucket, Throttled};
use sekisho_broker::{Delivery, Message, PublishError, SessionId};
use sekisho_ids::ClientId;
use sekisho_mqtt::{
    Ack, Disconnect, Packet, Properties, ProtocolVersion, Publish, PublishRef, QoS, SubAck,
    Subscribe, UnsubAck, Unsubscribe, decode, encode, encode_publish, reason,
};

use crate::handshake::{Admission, connack, reserve};
use crate::{Config, End, Env, IDLE_BUF, MAX_MESSAGE_EXPIRY, SHRINK_AFTER, forwarded};

/// AWS's per-connection rates, as the account's settings give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// PUBLISH packets a second, inbound and outbound together (AWS: 100; the excess is
    /// discarded).
    pub publishes: u32,
    /// Bytes read a second (AWS: 512 KiB); the excess is delayed.
    pub bytes: u32,
    /// A resumed session's stored messages a second (AWS: 10), besides live traffic.
    pub replay: u32,
    /// Stored messages of shared subscription groups a second (AWS: 20), paced apart from the
    /// session's own.
    pub shared_replay: u32,
}

/// How much output is written in one go before the driver flushes it.
const BATCH_BYTES: usize = 64 * 1024;

/// An active MQTT session: one connection after its CONNACK.
#[derive(Debug)]
pub struct Session {
    config: Arc<Config>,
    version: ProtocolVersion,
    client_id: ClientId,
    session: SessionId,
    session_expiry: Duration,
    session_expiry_zero_at_connect: bool,
    keep_alive: Duration,
    /// Boxed: most connections have none, and a `Will` is large.
    will: Option<Box<sekisho_mqtt::Will>>,
    /// When the connection must end regardless (WebSocket: 24 h, or its credentials' expiry).
    deadline: Option<Instant>,
    inflight: HashMap<u16, Delivery>,
    next_pid: u16,
    client_receive_max: usize,
    client_max_packet: usize,
    aliases: HashMap<u16, Arc<str>>,
    last_recv: Instant,
    /// Last traffic in either direction (for shrinking idle buffers).
    last_io: Instant,
    /// The journal ticket that must be durable before what is in the output goes out
    /// (PUBACK, SUBACK, CONNACK of a persistent session); 0: none.
    ticket: u64,
    publish_rate: Bucket,
    byte_rate: Bucket,
    /// A delivery taken from the queue but not sent because the connection is ending (its
    /// credentials no longer hold): handed back to the session with the unacknowledged ones.
    held: Vec<Delivery>,
    /// A resumed session's stored messages not yet sent.
    replay: VecDeque<Delivery>,
    replay_rate: Bucket,
    shared_replay_rate: Bucket,
    rbuf: BytesMut,
    out: BytesMut,
}

/// A will to publish at `at` (now, or after the Will Delay Interval), already authorized with
/// what was in force when the connection ended. A delayed will is authorized again when sent.
#[derive(Debug, Clone, PartialEq)]
pub struct DueWill {
    /// When it is published.
    pub at: Instant,
    /// The message: forwarded properties, `expires_at` unset and its Message Expiry Interval
    /// (counted from publication) in its properties; [`Message::from_will`] publishes it.
    pub template: Message,
}

/// What is left to do when a session has ended.
#[derive(Debug)]
pub struct Closed {
    /// Why it ended.
    pub end: End,
    /// The last bytes (acknowledgements, the MQTT 5 DISCONNECT), to write once `ticket` is
    /// durable.
    pub out: BytesMut,
    /// The journal ticket the last bytes wait for (0: none).
    pub ticket: u64,
    /// QoS 1 deliveries not acknowledged, sent ones first (oldest packet id first, each with
    /// its packet id to send again), for the broker to keep with the session.
    pub unacked: Vec<Delivery>,
    /// The session expiry the MQTT 5 DISCONNECT set (or the CONNECT's), for the broker.
    pub expiry: Option<Duration>,
    /// The will, if it is to be published.
    pub will: Option<DueWill>,
}

/// What the broker gave the connection when it attached to its session.
#[derive(Debug, Default)]
pub struct Attachment {
    /// The session's id.
    pub session: SessionId,
    /// Whether a stored session was resumed.
    pub session_present: bool,
    /// A resumed session's stored messages, oldest first.
    pub replay: VecDeque<Delivery>,
    /// The journal ticket to wait for before CONNACK (0: none).
    pub ticket: u64,
}

impl Session {
    /// The session of an admitted, authorized CONNECT, attached to its broker session at
    /// `now`; the CONNACK is in the output. `rbuf` holds what the client sent behind CONNECT;
    /// `deadline` is when the connection must end regardless (WebSocket).
    pub fn new(
        config: Arc<Config>,
        admission: Admission,
        attachment: Attachment,
        rbuf: BytesMut,
        rates: Rates,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Session {
        let c = admission.connect;
        let limits = config.aws;
        let v5 = c.version == ProtocolVersion::V5;
        let mut s = Session {
            version: c.version,
            client_id: admission.client_id,
            session: attachment.session,
            session_expiry: admission.session_expiry,
            session_expiry_zero_at_connect: admission.session_expiry.is_zero(),
            keep_alive: admission.keep_alive,
            will: c.will.map(Box::new),
            deadline,
            inflight: HashMap::new(),
            next_pid: 1,
            client_receive_max: c
                .properties
                .receive_maximum
                .map_or(limits.max_inflight, |r| {
                    (r as usize).min(limits.max_inflight)
                }),
            client_max_packet: c
                .properties
                .maximum_packet_size
                .map_or(usize::MAX, |m| m as usize),
            aliases: HashMap::new(),
            last_recv: now,
            last_io: now,
            ticket: attachment.ticket,
            publish_rate: Bucket::new(rates.publishes, rates.publishes),
            byte_rate: Bucket::new(rates.bytes, rates.bytes),
            held: Vec::new(),
            replay: attachment.replay,
            replay_rate: Bucket::new(rates.replay, rates.replay),
            shared_replay_rate: Bucket::new(rates.shared_replay, rates.shared_replay),
            rbuf,
            out: BytesMut::new(),
            config,
        };
        let mut props = Properties::default();
        if v5 {
            props.maximum_qos = Some(1);
            props.retain_available = Some(1);
            props.wildcard_subscription_available = Some(1);
            props.subscription_identifier_available = Some(0);
            props.shared_subscription_available = Some(1);
            props.topic_alias_maximum = Some(limits.topic_alias_max);
            props.receive_maximum = Some(limits.max_inflight as u16);
            props.maximum_packet_size = Some(s.config.codec.max_packet_size as u32);
            if admission.keep_alive_changed {
                props.server_keep_alive = Some(s.keep_alive.as_secs() as u16);
            }
            props.session_expiry_interval = Some(s.session_expiry.as_secs() as u32);
            if admission.assigned_id {
                props.assigned_client_identifier = Some(s.client_id.as_str().into());
            }
        }
        s.send(&connack(
            s.version,
            reason::SUCCESS,
            attachment.session_present,
            props,
        ));
        s
    }

    fn v5(&self) -> bool {
        self.version == ProtocolVersion::V5
    }

    /// The client id.
    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    /// Protocol version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The keep-alive in force (after AWS's clamp).
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive
    }

    /// Where the driver reads into (room reserved when full).
    pub fn read_buf(&mut self) -> &mut BytesMut {
        reserve(&mut self.rbuf);
        &mut self.rbuf
    }

    /// Bytes to write. The driver writes them once [`Session::take_ticket`] is durable, then
    /// clears the buffer.
    pub fn transmit(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// The journal ticket what is in the output acknowledges; 0: none.
    pub fn take_ticket(&mut self) -> u64 {
        std::mem::take(&mut self.ticket)
    }

    /// Storage failed: nothing in the output may go out.
    pub fn withhold(&mut self) {
        self.out.clear();
    }

    /// Whether the client's receive window has room for another QoS 1 delivery.
    pub fn can_deliver(&self) -> bool {
        self.inflight.len() < self.client_receive_max
    }

    /// Whether more queued deliveries fit in this batch of output.
    pub fn wants_more(&self) -> bool {
        self.can_deliver() && self.out.len() < BATCH_BYTES
    }

    /// `n` bytes were read into [`Session::read_buf`] at `now`. Returns how long the driver
    /// must wait before it handles them with [`Session::drain`] (AWS's 512 KiB/s per
    /// connection delays, it does not drop).
    pub fn on_read(&mut self, n: usize, now: Instant) -> Duration {
        self.last_recv = now;
        self.last_io = now;
        self.byte_rate.spend(now, n as u64)
    }

    /// Handles every whole packet read (and those buffered behind CONNECT).
    pub fn drain(&mut self, now: Instant, env: &mut impl Env) -> Result<(), End> {
        self.check_deadline(now)?;
        loop {
            match decode(&mut self.rbuf, self.version, &self.config.codec) {
                Ok(Some(p)) => self.handle(p, now, env)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::info!(client_id = %self.client_id, error = %e, "malformed packet; closing");
                    return Err(End::ClientError(e.reason_code()));
                }
            }
        }
    }

    /// When the driver must call [`Session::on_timeout`] next.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let mut next = self.keep_alive_deadline();
        if let Some(d) = self.deadline {
            next = next.min(d);
        }
        if let Some(d) = self.replay.front()
            && self.can_deliver()
        {
            let rate = if d.shared {
                &self.shared_replay_rate
            } else {
                &self.replay_rate
            };
            next = next.min(now + rate.clone().until_next(now));
        }
        let big = self.rbuf.capacity() > IDLE_BUF || self.out.capacity() > 0;
        let shrink = self.last_io + SHRINK_AFTER;
        if big && shrink > now {
            next = next.min(shrink);
        }
        next
    }

    /// Time has come to `now`: the keep-alive and connection deadlines, idle buffers, and the
    /// stored messages of a resumed session as the replay rate allows.
    pub fn on_timeout(&mut self, now: Instant, env: &mut impl Env) -> Result<(), End> {
        if now >= self.keep_alive_deadline() {
            return Err(End::KeepAlive);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(End::Expired);
        }
        if now >= self.last_io + SHRINK_AFTER {
            if self.rbuf.is_empty() && self.rbuf.capacity() > IDLE_BUF {
                self.rbuf = BytesMut::with_capacity(IDLE_BUF);
            }
            if self.out.is_empty() {
                self.out = BytesMut::new();
            }
        }
        self.replay_some(now, env)
    }

    /// The read and write buffers' capacities (idle connections keep them small).
    pub fn buffer_capacity(&self) -> (usize, usize) {
        (self.rbuf.capacity(), self.out.capacity())
    }

    /// The connection's deadline (credentials, the WebSocket's 24 hours) is checked at every
    /// packet and delivery too, not only when the driver's timer fires: a connection kept busy
    /// (a client sending without pause, a flood to its subscriptions) ends at its deadline all
    /// the same, however the driver schedules its timer.
    fn check_deadline(&self, now: Instant) -> Result<(), End> {
        match self.deadline {
            Some(d) if now >= d => Err(End::Expired),
            _ => Ok(()),
        }
    }

    /// When a silent client has exceeded 1.5 times its keep-alive.
    fn keep_alive_deadline(&self) -> Instant {
        self.last_recv + self.keep_alive + self.keep_alive / 2
    }

    /// Sends what the replay rate allows of the resumed session's stored messages.
    fn replay_some(&mut self, now: Instant, env: &mut impl Env) -> Result<(), End> {
        while self.can_deliver()
            && let Some(front) = self.replay.front()
        {
            // In order: the next stored message waits for its own rate.
            let rate = if front.shared {
                &mut self.shared_replay_rate
            } else {
                &mut self.replay_rate
            };
            if !rate.take(now, 1) {
                return Ok(());
            }
            if let Some(d) = self.replay.pop_front() {
                // Paced by the replay rate, not counted in the publish rate (a stored
                // message is never discarded for live traffic's sake).
                self.send_delivery(d, now, env, false)?;
            }
        }
        Ok(())
    }

    fn send(&mut self, p: &Packet) {
        if let Err(e) = encode(p, self.version, &mut self.out) {
            tracing::warn!(error = %e, packet = p.name(), "could not encode");
        }
    }

    fn puback(&mut self, packet_id: u16, code: u8) {
        self.send(&Packet::PubAck(Ack {
            packet_id,
            reason: code,
            properties: Properties::default(),
        }));
    }

    /// Refreshes the principal; a revoked certificate ends the connection.
    fn authorized(&self, env: &mut impl Env) -> Result<(), End> {
        env.refresh().map_err(|why| {
            tracing::info!(client_id = %self.client_id, reason = %why, "principal revoked");
            End::AuthError
        })
    }

    fn handle(&mut self, p: Packet, now: Instant, env: &mut impl Env) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.publish(p, now, env),
            Packet::PubAck(a) => {
                if let Some(d) = self.inflight.remove(&a.packet_id) {
                    env.acked(d.seq);
                }
                Ok(())
            }
            Packet::Subscribe(s) => self.subscribe(s, now, env),
            Packet::Unsubscribe(u) => {
                self.unsubscribe(u, env);
                Ok(())
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if !self.v5() {
                    return Err(End::ClientDisconnect { will: false });
                }
                if let Some(e) = d.properties.session_expiry_interval {
                    if self.session_expiry_zero_at_connect && e > 0 {
                        return Err(End::ClientError(reason::PROTOCOL_ERROR));
                    }
                    self.session_expiry =
                        Duration::from_secs(u64::from(e.min(self.config.aws.max_session_expiry)));
                }
                Err(End::ClientDisconnect {
                    will: d.reason == reason::DISCONNECT_WITH_WILL,
                })
            }
            Packet::Connect(_) => {
                tracing::info!(client_id = %self.client_id, "[MQTT-3.1.0-2] second CONNECT");
                Err(End::ClientError(reason::PROTOCOL_ERROR))
            }
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                tracing::info!(client_id = %self.client_id, "QoS 2 flow is not supported");
                Err(End::ClientError(reason::PROTOCOL_ERROR))
            }
            Packet::Auth(_) => Err(End::ClientError(reason::PROTOCOL_ERROR)),
            other => {
                tracing::info!(client_id = %self.client_id, packet = other.name(), "server-to-client packet from a client");
                Err(End::ClientError(reason::PROTOCOL_ERROR))
            }
        }
    }

    fn publish(&mut self, mut p: Publish, now: Instant, env: &mut impl Env) -> Result<(), End> {
        let limits = self.config.aws;
        if p.qos == QoS::ExactlyOnce {
            return Err(End::ClientError(reason::QOS_NOT_SUPPORTED));
        }
        if !p.properties.subscription_identifiers.is_empty() {
            // [MQTT-3.3.4-6] a client must not send Subscription Identifiers.
            return Err(End::ClientError(reason::PROTOCOL_ERROR));
        }
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias > limits.topic_alias_max {
                return Err(End::ClientError(reason::TOPIC_ALIAS_INVALID));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(End::ClientError(reason::PROTOCOL_ERROR)),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        if let Err(e) = limits.check_topic(&p.topic) {
            tracing::info!(client_id = %self.client_id, error = %e, "publish refused");
            return Err(End::ClientError(e.reason_code()));
        }
        // AWS's 100 publishes a second per connection: the excess is discarded (after its
        // topic alias was taken, so later packets still resolve).
        if !self.publish_rate.take(now, 1) {
            env.throttled(Throttled::ConnectionPublishRate);
            self.throttled_publish(p.packet_id);
            return Ok(());
        }
        if p.payload.len() > limits.max_payload {
            let e = AwsReject::PayloadTooLarge(p.payload.len());
            return Err(End::ClientError(e.reason_code()));
        }
        self.authorized(env)?;
        let reserved_ok = aws::may_publish(&p.topic) && !(p.retain && p.topic.starts_with('$'));
        let allowed = reserved_ok
            && env.allowed("iot:publish", "topic", &p.topic)
            && (!p.retain || env.allowed("iot:retainpublish", "topic", &p.topic));
        if !allowed {
            tracing::info!(client_id = %self.client_id, topic = %p.topic, retain = p.retain, "publish not authorized");
            if !self.v5() {
                // AWS IoT disconnects an MQTT 3.1.1 client that publishes where it may not.
                return Err(End::Forbidden);
            }
            if let Some(id) = p.packet_id {
                self.puback(id, reason::NOT_AUTHORIZED);
            }
            return Ok(());
        }
        let expiry = p
            .properties
            .message_expiry_interval
            .map(|e| e.clamp(1, MAX_MESSAGE_EXPIRY));
        let props = forwarded(&p.properties);
        if props.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            if let Some(id) = p.packet_id {
                self.puback(id, reason::PAYLOAD_FORMAT_INVALID);
            }
            return Ok(());
        }
        let msg = Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: props,
            expires_at: expiry.map(|e| now + Duration::from_secs(u64::from(e))),
            origin: Some(self.session),
            timestamp_ms: env.timestamp_ms(),
        };
        let result = env.publish(msg, now);
        let code = match &result {
            Err(PublishError::Throttled) => {
                self.throttled_publish(p.packet_id);
                return Ok(());
            }
            Err(PublishError::RetainedQuota) if self.v5() => reason::QUOTA_EXCEEDED,
            _ => reason::SUCCESS,
        };
        if let Ok(routed) = result {
            // QoS 1 waits before its PUBACK; a retained QoS 0 publish waits too before this
            // connection reads on, so storage paces it rather than buffering without bound.
            if p.qos == QoS::AtLeastOnce || p.retain {
                self.ticket = self.ticket.max(routed.ticket);
            }
            for d in routed.own {
                self.deliver(d, now, env)?;
            }
        }
        // The driver sends the PUBACK after the environment's blocked deliveries found room
        // (or were given up), and once the ticket is durable.
        if let Some(id) = p.packet_id {
            self.puback(id, code);
        }
        Ok(())
    }

    /// A publish over a rate is discarded: MQTT 5 QoS 1 hears so (PUBACK 0x96); MQTT 3.1.1
    /// has no way to say it, and gets no PUBACK (AWS: discarded).
    fn throttled_publish(&mut self, packet_id: Option<u16>) {
        tracing::debug!(client_id = %self.client_id, "publish rate exceeded; discarded");
        if let Some(id) = packet_id
            && self.v5()
        {
            self.puback(id, reason::MESSAGE_RATE_TOO_HIGH);
        }
    }

    fn subscribe(&mut self, s: Subscribe, now: Instant, env: &mut impl Env) -> Result<(), End> {
        if !s.properties.subscription_identifiers.is_empty() {
            return Err(End::ClientError(
                reason::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
            ));
        }
        self.authorized(env)?;
        let limits = self.config.aws;
        let v5 = self.v5();
        let fail = |code: u8| if v5 { code } else { reason::V3_SUBACK_FAILURE };
        // AWS's 500 subscriptions a second per account: over it, the whole SUBSCRIBE fails.
        let n = s.filters.len().min(limits.max_filters_per_subscribe) as u32;
        let throttled = !env.admit_subscriptions(n, now);
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut subscribed = Vec::new();
        let mut retained = Vec::new();
        for (i, f) in s.filters.iter().enumerate() {
            if throttled || i >= limits.max_filters_per_subscribe {
                codes.push(fail(reason::QUOTA_EXCEEDED));
                continue;
            }
            let (_, inner) = sekisho_broker::trie::split_shared(&f.filter);
            if let Err(e) = limits.check_topic(&f.filter) {
                tracing::info!(client_id = %self.client_id, error = %e, "subscription refused");
                codes.push(fail(reason::TOPIC_FILTER_INVALID));
                continue;
            }
            if !aws::may_subscribe(inner) || !env.allowed("iot:subscribe", "topicfilter", &f.filter)
            {
                tracing::info!(client_id = %self.client_id, filter = %f.filter, "subscribe not authorized");
                codes.push(fail(reason::NOT_AUTHORIZED));
                continue;
            }
            let existing = env.subscription_count();
            let mut options = f.options;
            // QoS 2 is granted as QoS 1 (AWS IoT supports QoS 0 and 1).
            options.qos = options.qos.min(QoS::AtLeastOnce);
            let (fresh, ticket) = env.subscribe(&f.filter, options);
            self.ticket = self.ticket.max(ticket);
            if fresh && existing >= limits.max_subscriptions {
                env.unsubscribe(&f.filter);
                codes.push(fail(reason::QUOTA_EXCEEDED));
                continue;
            }
            codes.push(options.qos as u8);
            subscribed.push(f.filter.clone());
            let send_retained = match options.retain_handling {
                0 => true,
                1 => fresh,
                _ => false,
            };
            if send_retained && let Some(m) = env.retained_for(&f.filter, now) {
                let qos = m.qos.min(options.qos);
                retained.push(Delivery {
                    message: m,
                    qos,
                    retain: true,
                    resend: None,
                    seq: 0,
                    shared: false,
                });
            }
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            codes,
            properties: Properties::default(),
        }));
        env.subscriptions_changed(true, &subscribed);
        for d in retained {
            self.deliver(d, now, env)?;
        }
        Ok(())
    }

    fn unsubscribe(&mut self, u: Unsubscribe, env: &mut impl Env) {
        let mut codes = Vec::new();
        let mut removed = Vec::new();
        for f in &u.filters {
            let (existed, ticket) = env.unsubscribe(f);
            self.ticket = self.ticket.max(ticket);
            if existed {
                codes.push(reason::SUCCESS);
                removed.push(f.clone());
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        let codes = if self.v5() { codes } else { Vec::new() };
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            codes,
            properties: Properties::default(),
        }));
        env.subscriptions_changed(false, &removed);
    }

    fn next_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_pid;
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            // Not one in flight, nor one a stored message waits to be sent again with.
            if !self.inflight.contains_key(&id) && !self.replay.iter().any(|d| d.resend == Some(id))
            {
                return id;
            }
        }
    }

    /// Sends one delivery from the broker at `now`: dropped if expired (the remaining expiry
    /// is written for MQTT 5), or if the principal may no longer receive it.
    /// AWS's 100 publishes a second per connection counts outbound ones too (inbound and
    /// outbound share the bucket): a delivery over the rate is discarded, as AWS discards it.
    pub fn deliver(&mut self, d: Delivery, now: Instant, env: &mut impl Env) -> Result<(), End> {
        if let Err(e) = self.check_deadline(now) {
            // Kept with the session, as a delivery refused for revoked credentials is.
            self.held.push(d);
            return Err(e);
        }
        self.send_delivery(d, now, env, true)
    }

    fn send_delivery(
        &mut self,
        d: Delivery,
        now: Instant,
        env: &mut impl Env,
        counted: bool,
    ) -> Result<(), End> {
        self.last_io = now;
        if d.message.expired(now) {
            env.acked(d.seq);
            return Ok(());
        }
        if counted && !self.publish_rate.take(now, 1) {
            env.throttled(Throttled::ConnectionPublishRate);
            env.acked(d.seq);
            return Ok(());
        }
        if let Err(e) = self.authorized(env) {
            self.held.push(d);
            return Err(e);
        }
        let m = &d.message;
        if !env.allowed("iot:receive", "topic", &m.topic) {
            env.acked(d.seq);
            return Ok(());
        }
        // A message sent before and not acknowledged goes again with its packet id and DUP
        // set, unless that id is taken meanwhile (then it is a new send).
        let (packet_id, dup) = match (d.qos, d.resend) {
            (QoS::AtLeastOnce, Some(id)) if id != 0 && !self.inflight.contains_key(&id) => {
                (Some(id), true)
            }
            (QoS::AtLeastOnce, _) => (Some(self.next_packet_id()), false),
            _ => (None, false),
        };
        // Borrow the shared message's properties; copy them only when the remaining expiry
        // must be written (MQTT 5).
        let with_expiry;
        let properties = match (self.v5(), m.expires_at) {
            (false, _) => &Properties::EMPTY,
            (true, Some(exp)) => {
                let mut p = m.properties.clone();
                // Whole seconds left, rounded down: under a second says 0, as AWS does.
                p.message_expiry_interval =
                    Some(exp.saturating_duration_since(now).as_secs() as u32);
                with_expiry = p;
                &with_expiry
            }
            (true, None) => &m.properties,
        };
        let p = PublishRef {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic: &m.topic,
            packet_id,
            properties,
            payload: &m.payload,
        };
        let before = self.out.len();
        if let Err(e) = encode_publish(&p, self.version, &mut self.out) {
            tracing::warn!(error = %e, "could not encode a delivery");
            env.acked(d.seq);
            return Ok(());
        }
        if self.out.len() - before > self.client_max_packet {
            // [MQTT-3.1.2-25] never send more than the client's Maximum Packet Size.
            self.out.truncate(before);
            env.acked(d.seq);
            return Ok(());
        }
        if let Some(id) = packet_id {
            self.inflight.insert(id, d);
        }
        Ok(())
    }

    /// Ends the session at `now` for `end`: the MQTT 5 DISCONNECT goes into the output, the
    /// unacknowledged deliveries are collected, and the will is authorized again with what is
    /// in force now (a revoked certificate, a deactivated CA or key, or a changed policy sends
    /// no will).
    pub fn close(mut self, end: End, now: Instant, env: &mut impl Env) -> Closed {
        if self.v5()
            && let Some(code) = end.disconnect_code()
        {
            self.send(&Packet::Disconnect(Disconnect {
                reason: code,
                properties: Properties::default(),
            }));
        }
        let mut sent: Vec<(u16, Delivery)> = self.inflight.drain().collect();
        sent.sort_by_key(|(id, _)| *id);
        let mut unacked: Vec<Delivery> = sent
            .into_iter()
            .map(|(id, mut d)| {
                d.resend = Some(id);
                d
            })
            .collect();
        unacked.extend(
            std::mem::take(&mut self.held)
                .into_iter()
                .chain(std::mem::take(&mut self.replay))
                .filter(|d| d.qos == QoS::AtLeastOnce),
        );
        let will = match self.will.take() {
            Some(w) if end.sends_will() => self.authorize_will(*w, now, env),
            _ => None,
        };
        Closed {
            end,
            ticket: self.ticket,
            unacked,
            expiry: self.v5().then_some(self.session_expiry),
            will,
            out: self.out,
        }
    }

    fn authorize_will(
        &self,
        w: sekisho_mqtt::Will,
        now: Instant,
        env: &mut impl Env,
    ) -> Option<DueWill> {
        if let Err(why) = env.refresh() {
            tracing::info!(client_id = %self.client_id, reason = %why, "principal revoked; will not published");
            return None;
        }
        if !env.allowed("iot:publish", "topic", &w.topic)
            || (w.retain && !env.allowed("iot:retainpublish", "topic", &w.topic))
        {
            tracing::info!(client_id = %self.client_id, "will no longer authorized; not published");
            return None;
        }
        let (delay, template) = will_template(&w, self.session_expiry);
        Some(DueWill {
            at: now + delay,
            template,
        })
    }
}

/// A will's delay (its Will Delay Interval, never later than the session's end: MQTT 5 sends
/// the will when the session ends) and the message it publishes ([`DueWill::template`]).
pub fn will_template(w: &sekisho_mqtt::Will, session_expiry: Duration) -> (Duration, Message) {
    let delay = w
        .properties
        .will_delay_interval
        .unwrap_or(0)
        .min(session_expiry.as_secs().min(u64::from(u32::MAX)) as u32);
    let mut properties = forwarded(&w.properties);
    properties.message_expiry_interval = w
        .properties
        .message_expiry_interval
        .map(|e| e.clamp(1, MAX_MESSAGE_EXPIRY));
    (
        Duration::from_secs(u64::from(delay)),
        Message {
            topic: w.topic.clone(),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            properties,
            expires_at: None,
            origin: None,
            timestamp_ms: 0,
        },
    )
}
