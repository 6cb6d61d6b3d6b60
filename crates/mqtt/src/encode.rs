//! Encoding. Each packet body is written by one generic writer that runs twice: once over a
//! byte counter (to learn the remaining length and property lengths), once into the buffer.

use bytes::{BufMut, BytesMut};

use crate::*;

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field is longer than 65,535 bytes.
    #[error("field {0} is longer than 65535 bytes")]
    FieldTooLong(&'static str),
    /// The packet is larger than the 268,435,455 bytes a remaining length can express.
    #[error("packet too large to encode")]
    PacketTooLarge,
    /// The packet has no meaning in this protocol version (AUTH on 3.1.1).
    #[error("{0} cannot be sent with this protocol version")]
    NotInVersion(&'static str),
}

trait Sink {
    fn bytes(&mut self, b: &[u8]);
    fn byte(&mut self, b: u8) {
        self.bytes(&[b]);
    }
}

struct Counter(usize);

impl Sink for Counter {
    fn bytes(&mut self, b: &[u8]) {
        self.0 += b.len();
    }
}

impl Sink for BytesMut {
    fn bytes(&mut self, b: &[u8]) {
        self.put_slice(b);
    }
}

fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn varint(s: &mut impl Sink, mut v: usize) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        s.byte(b);
        if v == 0 {
            break;
        }
    }
}

struct W<'a, S: Sink> {
    s: &'a mut S,
    err: Option<EncodeError>,
}

impl<S: Sink> W<'_, S> {
    fn u8(&mut self, v: u8) {
        self.s.byte(v);
    }
    fn u16(&mut self, v: u16) {
        self.s.bytes(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.s.bytes(&v.to_be_bytes());
    }
    fn binary(&mut self, what: &'static str, b: &[u8]) {
        match u16::try_from(b.len()) {
            Ok(n) => {
                self.u16(n);
                self.s.bytes(b);
            }
            Err(_) => self.err = Some(EncodeError::FieldTooLong(what)),
        }
    }
    fn str(&mut self, what: &'static str, v: &str) {
        self.binary(what, v.as_bytes());
    }
    fn raw(&mut self, b: &[u8]) {
        self.s.bytes(b);
    }

    fn props(&mut self, p: &Properties) {
        let mut c = Counter(0);
        let mut cw = W {
            s: &mut c,
            err: None,
        };
        cw.props_body(p);
        if let Some(e) = cw.err {
            self.err = Some(e);
        }
        varint(self.s, c.0);
        self.props_body(p);
    }

    fn props_body(&mut self, p: &Properties) {
        if let Some(v) = p.payload_format_indicator {
            self.u8(0x01);
            self.u8(v);
        }
        if let Some(v) = p.message_expiry_interval {
            self.u8(0x02);
            self.u32(v);
        }
        if let Some(v) = &p.content_type {
            self.u8(0x03);
            self.str("content type", v);
        }
        if let Some(v) = &p.response_topic {
            self.u8(0x08);
            self.str("response topic", v);
        }
        if let Some(v) = &p.correlation_data {
            self.u8(0x09);
            self.binary("correlation data", v);
        }
        for v in &p.subscription_identifiers {
            self.u8(0x0B);
            varint(self.s, *v as usize);
        }
        if let Some(v) = p.session_expiry_interval {
            self.u8(0x11);
            self.u32(v);
        }
        if let Some(v) = &p.assigned_client_identifier {
            self.u8(0x12);
            self.str("assigned client identifier", v);
        }
        if let Some(v) = p.server_keep_alive {
            self.u8(0x13);
            self.u16(v);
        }
        if let Some(v) = &p.authentication_method {
            self.u8(0x15);
            self.str("authentication method", v);
        }
        if let Some(v) = &p.authentication_data {
            self.u8(0x16);
            self.binary("authentication data", v);
        }
        if let Some(v) = p.request_problem_information {
            self.u8(0x17);
            self.u8(v);
        }
        if let Some(v) = p.will_delay_interval {
            self.u8(0x18);
            self.u32(v);
        }
        if let Some(v) = p.request_response_information {
            self.u8(0x19);
            self.u8(v);
        }
        if let Some(v) = &p.response_information {
            self.u8(0x1A);
            self.str("response information", v);
        }
        if let Some(v) = &p.server_reference {
            self.u8(0x1C);
            self.str("server reference", v);
        }
        if let Some(v) = &p.reason_string {
            self.u8(0x1F);
            self.str("reason string", v);
        }
        if let Some(v) = p.receive_maximum {
            self.u8(0x21);
            self.u16(v);
        }
        if let Some(v) = p.topic_alias_maximum {
            self.u8(0x22);
            self.u16(v);
        }
        if let Some(v) = p.topic_alias {
            self.u8(0x23);
            self.u16(v);
        }
        if let Some(v) = p.maximum_qos {
            self.u8(0x24);
            self.u8(v);
        }
        if let Some(v) = p.retain_available {
            self.u8(0x25);
            self.u8(v);
        }
        for up in &p.user_properties {
            self.u8(0x26);
            self.str("user property", &up.key);
            self.str("user property", &up.value);
        }
        if let Some(v) = p.maximum_packet_size {
            self.u8(0x27);
            self.u32(v);
        }
        if let Some(v) = p.wildcard_subscription_available {
            self.u8(0x28);
            self.u8(v);
        }
        if let Some(v) = p.subscription_identifier_available {
            self.u8(0x29);
            self.u8(v);
        }
        if let Some(v) = p.shared_subscription_available {
            self.u8(0x2A);
            self.u8(v);
        }
    }

    fn publish_body(&mut self, p: &PublishRef<'_>, v5: bool) {
        self.str("topic name", p.topic);
        if let Some(id) = p.packet_id {
            self.u16(id);
        }
        if v5 {
            self.props(p.properties);
        }
        self.raw(p.payload);
    }

    fn body(&mut self, packet: &Packet, v5: bool) {
        match packet {
            Packet::Connect(c) => {
                self.str("protocol name", "MQTT");
                self.u8(c.version.level());
                let mut flags = 0u8;
                if c.clean_start {
                    flags |= 0x02;
                }
                if let Some(w) = &c.will {
                    flags |= 0x04 | ((w.qos as u8) << 3);
                    if w.retain {
                        flags |= 0x20;
                    }
                }
                if c.password.is_some() {
                    flags |= 0x40;
                }
                if c.username.is_some() {
                    flags |= 0x80;
                }
                self.u8(flags);
                self.u16(c.keep_alive);
                let cv5 = c.version == ProtocolVersion::V5;
                if cv5 {
                    self.props(&c.properties);
                }
                self.str("client identifier", &c.client_id);
                if let Some(w) = &c.will {
                    if cv5 {
                        self.props(&w.properties);
                    }
                    self.str("will topic", &w.topic);
                    self.binary("will payload", &w.payload);
                }
                if let Some(u) = &c.username {
                    self.str("user name", u);
                }
                if let Some(p) = &c.password {
                    self.binary("password", p);
                }
            }
            Packet::ConnAck(a) => {
                self.u8(a.session_present as u8);
                self.u8(a.code);
                if v5 {
                    self.props(&a.properties);
                }
            }
            Packet::Publish(p) => self.publish_body(&PublishRef::from(p), v5),
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                self.u16(a.packet_id);
                if v5 && (a.reason != 0 || !a.properties.is_empty()) {
                    self.u8(a.reason);
                    if !a.properties.is_empty() {
                        self.props(&a.properties);
                    }
                }
            }
            Packet::Subscribe(s) => {
                self.u16(s.packet_id);
                if v5 {
                    self.props(&s.properties);
                }
                for f in &s.filters {
                    self.str("topic filter", &f.filter);
                    let o = &f.options;
                    let mut b = o.qos as u8;
                    if v5 {
                        b |= (o.no_local as u8) << 2
                            | (o.retain_as_published as u8) << 3
                            | (o.retain_handling & 3) << 4;
                    }
                    self.u8(b);
                }
            }
            Packet::SubAck(s) => {
                self.u16(s.packet_id);
                if v5 {
                    self.props(&s.properties);
                }
                self.raw(&s.codes);
            }
            Packet::Unsubscribe(u) => {
                self.u16(u.packet_id);
                if v5 {
                    self.props(&u.properties);
                }
                for f in &u.filters {
                    self.str("topic filter", f);
                }
            }
            Packet::UnsubAck(u) => {
                self.u16(u.packet_id);
                if v5 {
                    self.props(&u.properties);
                    self.raw(&u.codes);
                }
            }
            Packet::PingReq | Packet::PingResp => {}
            Packet::Disconnect(d) => {
                if v5 && (d.reason != 0 || !d.properties.is_empty()) {
                    self.u8(d.reason);
                    if !d.properties.is_empty() {
                        self.props(&d.properties);
                    }
                }
            }
            Packet::Auth(a) => {
                if a.reason != 0 || !a.properties.is_empty() {
                    self.u8(a.reason);
                    self.props(&a.properties);
                }
            }
        }
    }
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => 0x30 | ((p.dup as u8) << 3) | ((p.qos as u8) << 1) | p.retain as u8,
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xA2,
        Packet::UnsubAck(_) => 0xB0,
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(_) => 0xE0,
        Packet::Auth(_) => 0xF0,
    }
}

/// A PUBLISH made of borrowed parts, so that a message shared by many receivers is encoded
/// without building an owned [`Packet`] per delivery.
#[derive(Debug, Clone, Copy)]
pub struct PublishRef<'a> {
    /// DUP flag.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name.
    pub topic: &'a str,
    /// Packet identifier (QoS > 0).
    pub packet_id: Option<u16>,
    /// Properties (MQTT 5; ignored on 3.1.1).
    pub properties: &'a Properties,
    /// Payload.
    pub payload: &'a [u8],
}

impl<'a> From<&'a Publish> for PublishRef<'a> {
    fn from(p: &'a Publish) -> Self {
        PublishRef {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: &p.topic,
            packet_id: p.packet_id,
            properties: &p.properties,
            payload: &p.payload,
        }
    }
}

/// Appends a PUBLISH given by reference; the same bytes as [`encode`] of the owned packet.
pub fn encode_publish(
    p: &PublishRef<'_>,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let first = 0x30 | ((p.dup as u8) << 3) | ((p.qos as u8) << 1) | p.retain as u8;
    frame(first, Body::Publish(p), version == ProtocolVersion::V5, buf)
}

/// What a packet body is written from.
enum Body<'a> {
    Packet(&'a Packet),
    Publish(&'a PublishRef<'a>),
}

impl Body<'_> {
    fn write<S: Sink>(&self, w: &mut W<'_, S>, v5: bool) {
        match self {
            Body::Packet(p) => w.body(p, v5),
            Body::Publish(p) => w.publish_body(p, v5),
        }
    }
}

/// Writes one packet: the body runs once over a byte counter to learn its length, then after
/// the fixed header into `buf`. On error nothing is written.
fn frame(first: u8, body: Body<'_>, v5: bool, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let mut c = Counter(0);
    let mut cw = W {
        s: &mut c,
        err: None,
    };
    body.write(&mut cw, v5);
    if let Some(e) = cw.err {
        return Err(e);
    }
    let len = c.0;
    if len > 268_435_455 {
        return Err(EncodeError::PacketTooLarge);
    }
    buf.reserve(1 + varint_len(len) + len);
    buf.put_u8(first);
    varint(buf, len);
    body.write(&mut W { s: buf, err: None }, v5);
    Ok(())
}

/// Appends `packet` to `buf` as `version` frames it (CONNECT uses its own version).
/// On error nothing is written.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v5 = version == ProtocolVersion::V5;
    if !v5 && matches!(packet, Packet::Auth(_)) {
        return Err(EncodeError::NotInVersion("AUTH"));
    }
    frame(first_byte(packet), Body::Packet(packet), v5, buf)
}
