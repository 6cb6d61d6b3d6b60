//! Decoding: fixed header framing, then a bounded reader over exactly one packet.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use crate::properties::Ctx;
use crate::topic::{validate_filter, validate_topic_name};
use crate::*;

/// Limits every decoder must be given. There is no "unlimited".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole packet (fixed header included) accepted, in bytes.
    pub max_packet_size: usize,
    /// Most topic filters in one SUBSCRIBE or UNSUBSCRIBE.
    pub max_filters: usize,
    /// Most user properties in one property list.
    pub max_user_properties: usize,
}

impl Default for Limits {
    /// Room for AWS IoT Core's 128 KiB payloads plus their header, topic and properties
    /// (AWS's limit is on the payload, which the broker checks with its own reason code). The
    /// filter and property counts are generous bounds on memory; the broker applies AWS's
    /// per-SUBSCRIBE rule with a reason code.
    fn default() -> Self {
        Limits {
            max_packet_size: 128 * 1024 + 4096,
            max_filters: 64,
            max_user_properties: 64,
        }
    }
}

/// Decodes one packet from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet (nothing is consumed), and
/// consumes exactly one packet otherwise. A packet whose announced size exceeds
/// `limits.max_packet_size` is refused before it is buffered. CONNECT is decoded on the
/// protocol level it carries, whatever `version` says; other packets use `version`.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    limits: &Limits,
) -> Result<Option<Packet>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut remaining: usize = 0;
    let mut header_len = 1;
    let mut shift = 0;
    loop {
        if header_len > 4 {
            return Err(DecodeError::MalformedVarInt);
        }
        let Some(&b) = buf.get(header_len) else {
            return Ok(None);
        };
        remaining |= ((b & 0x7f) as usize) << shift;
        header_len += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let total = header_len + remaining;
    if total > limits.max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: limits.max_packet_size,
        });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let first = buf[0];
    let mut frame = buf.split_to(total).freeze();
    frame.advance(header_len);
    decode_body(first, frame, version, limits).map(Some)
}

fn decode_body(
    first: u8,
    body: Bytes,
    version: ProtocolVersion,
    limits: &Limits,
) -> Result<Packet, DecodeError> {
    let packet_type = first >> 4;
    let flags = first & 0x0f;
    let expect_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(DecodeError::InvalidHeaderFlags { packet_type, flags })
        }
    };
    let v5 = version == ProtocolVersion::V5;
    let mut r = Reader { buf: body, limits };
    let packet = match packet_type {
        1 => {
            expect_flags(0)?;
            Packet::Connect(Box::new(r.connect()?))
        }
        2 => {
            expect_flags(0)?;
            r.connack(v5)?
        }
        3 => r.publish(flags, v5)?,
        4 => {
            expect_flags(0)?;
            Packet::PubAck(r.ack(v5)?)
        }
        5 => {
            expect_flags(0)?;
            Packet::PubRec(r.ack(v5)?)
        }
        6 => {
            expect_flags(2)?;
            Packet::PubRel(r.ack(v5)?)
        }
        7 => {
            expect_flags(0)?;
            Packet::PubComp(r.ack(v5)?)
        }
        8 => {
            expect_flags(2)?;
            r.subscribe(v5)?
        }
        9 => {
            expect_flags(0)?;
            r.suback(v5)?
        }
        10 => {
            expect_flags(2)?;
            r.unsubscribe(v5)?
        }
        11 => {
            expect_flags(0)?;
            r.unsuback(v5)?
        }
        12 => {
            expect_flags(0)?;
            Packet::PingReq
        }
        13 => {
            expect_flags(0)?;
            Packet::PingResp
        }
        14 => {
            expect_flags(0)?;
            r.disconnect(v5)?
        }
        15 if v5 => {
            expect_flags(0)?;
            r.auth()?
        }
        t => return Err(DecodeError::InvalidPacketType(t)),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::TrailingBytes(r.buf.len()));
    }
    Ok(packet)
}

struct Reader<'a> {
    buf: Bytes,
    limits: &'a Limits,
}

impl Reader<'_> {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    fn varint(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8(what)?;
            value |= ((b & 0x7f) as u32) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::MalformedVarInt)
    }

    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16("packet identifier")? {
            0 => Err(DecodeError::ZeroPacketId),
            id => Ok(id),
        }
    }

    fn binary(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u16(what)? as usize;
        self.need(len, what)?;
        Ok(self.buf.split_to(len))
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let raw = self.binary(what)?;
        let s = std::str::from_utf8(&raw).map_err(|_| DecodeError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(DecodeError::NullCharacter);
        }
        Ok(s.to_owned())
    }

    fn arc_string(&mut self, what: &'static str) -> Result<Arc<str>, DecodeError> {
        Ok(Arc::from(self.string(what)?))
    }

    /// Reads a property list (length-prefixed) and checks each identifier against `ctx`.
    fn properties(&mut self, ctx: Ctx) -> Result<Properties, DecodeError> {
        let len = self.varint("property length")? as usize;
        self.need(len, "properties")?;
        let mut inner = Reader {
            buf: self.buf.split_to(len),
            limits: self.limits,
        };
        let mut p = Properties::default();
        let mut seen: u64 = 0;
        while !inner.buf.is_empty() {
            let id = inner.varint("property identifier")?;
            let id = u8::try_from(id).map_err(|_| DecodeError::UnknownProperty(0xff))?;
            if !ctx.allows(id) {
                if Ctx::Connect.allows(id)
                    || Ctx::ConnAck.allows(id)
                    || Ctx::Publish.allows(id)
                    || Ctx::Will.allows(id)
                {
                    return Err(DecodeError::PropertyNotAllowed {
                        id,
                        packet: ctx.name(),
                    });
                }
                return Err(DecodeError::UnknownProperty(id));
            }
            let repeatable = id == 0x26 || (id == 0x0B && ctx == Ctx::Publish);
            if !repeatable {
                if seen & (1u64 << id) != 0 {
                    return Err(DecodeError::DuplicateProperty(id));
                }
                seen |= 1u64 << id;
            }
            let flag = |v: u8| {
                if v <= 1 {
                    Ok(v)
                } else {
                    Err(DecodeError::InvalidPropertyValue(id))
                }
            };
            match id {
                0x01 => p.payload_format_indicator = Some(flag(inner.u8("property")?)?),
                0x02 => p.message_expiry_interval = Some(inner.u32("property")?),
                0x03 => p.content_type = Some(inner.arc_string("property")?),
                0x08 => {
                    let t = inner.arc_string("property")?;
                    if t.is_empty() || t.contains(['+', '#']) {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    p.response_topic = Some(t)
                }
                0x09 => p.correlation_data = Some(inner.binary("property")?),
                0x0B => {
                    let v = inner.varint("property")?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    if p.subscription_identifiers.len() >= self.limits.max_user_properties {
                        return Err(DecodeError::TooManyUserProperties(
                            self.limits.max_user_properties,
                        ));
                    }
                    p.subscription_identifiers.push(v)
                }
                0x11 => p.session_expiry_interval = Some(inner.u32("property")?),
                0x12 => p.assigned_client_identifier = Some(inner.arc_string("property")?),
                0x13 => p.server_keep_alive = Some(inner.u16("property")?),
                0x15 => p.authentication_method = Some(inner.arc_string("property")?),
                0x16 => p.authentication_data = Some(inner.binary("property")?),
                0x17 => p.request_problem_information = Some(flag(inner.u8("property")?)?),
                0x18 => p.will_delay_interval = Some(inner.u32("property")?),
                0x19 => p.request_response_information = Some(flag(inner.u8("property")?)?),
                0x1A => p.response_information = Some(inner.arc_string("property")?),
                0x1C => p.server_reference = Some(inner.arc_string("property")?),
                0x1F => p.reason_string = Some(inner.arc_string("property")?),
                0x21 => {
                    let v = inner.u16("property")?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    p.receive_maximum = Some(v)
                }
                0x22 => p.topic_alias_maximum = Some(inner.u16("property")?),
                0x23 => {
                    let v = inner.u16("property")?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    p.topic_alias = Some(v)
                }
                0x24 => p.maximum_qos = Some(flag(inner.u8("property")?)?),
                0x25 => p.retain_available = Some(flag(inner.u8("property")?)?),
                0x26 => {
                    if p.user_properties.len() >= self.limits.max_user_properties {
                        return Err(DecodeError::TooManyUserProperties(
                            self.limits.max_user_properties,
                        ));
                    }
                    let key = inner.arc_string("user property")?;
                    let value = inner.arc_string("user property")?;
                    p.user_properties.push(UserProperty { key, value })
                }
                0x27 => {
                    let v = inner.u32("property")?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    p.maximum_packet_size = Some(v)
                }
                0x28 => p.wildcard_subscription_available = Some(flag(inner.u8("property")?)?),
                0x29 => p.subscription_identifier_available = Some(flag(inner.u8("property")?)?),
                0x2A => p.shared_subscription_available = Some(flag(inner.u8("property")?)?),
                _ => return Err(DecodeError::UnknownProperty(id)),
            }
        }
        Ok(p)
    }

    fn connect(&mut self) -> Result<Connect, DecodeError> {
        let name = self.binary("protocol name")?;
        let level = self.u8("protocol level")?;
        if &name[..] != b"MQTT" {
            // MQTT 3.1 ("MQIsdp", level 3) is not supported: answer as an unsupported level.
            if &name[..] == b"MQIsdp" {
                return Err(DecodeError::UnsupportedProtocolVersion(level));
            }
            return Err(DecodeError::InvalidProtocolName);
        }
        let version = match level {
            4 => ProtocolVersion::V311,
            5 => ProtocolVersion::V5,
            l => return Err(DecodeError::UnsupportedProtocolVersion(l)),
        };
        let v5 = version == ProtocolVersion::V5;
        let flags = self.u8("connect flags")?;
        if flags & 0x01 != 0 {
            return Err(DecodeError::ConnectReservedFlag);
        }
        let clean_start = flags & 0x02 != 0;
        let will_flag = flags & 0x04 != 0;
        let will_qos_bits = (flags >> 3) & 0x03;
        let will_retain = flags & 0x20 != 0;
        let password_flag = flags & 0x40 != 0;
        let username_flag = flags & 0x80 != 0;
        if !will_flag && (will_qos_bits != 0 || will_retain) {
            return Err(DecodeError::InvalidWillFlags);
        }
        let will_qos = QoS::from_bits(will_qos_bits).ok_or(DecodeError::InvalidWillFlags)?;
        if !v5 && password_flag && !username_flag {
            return Err(DecodeError::PasswordWithoutUsername);
        }
        let keep_alive = self.u16("keep alive")?;
        let properties = if v5 {
            self.properties(Ctx::Connect)?
        } else {
            Properties::default()
        };
        let client_id = self.string("client identifier")?;
        let will = if will_flag {
            let wprops = if v5 {
                self.properties(Ctx::Will)?
            } else {
                Properties::default()
            };
            let topic = self.string("will topic")?;
            validate_topic_name(&topic)?;
            let payload = self.binary("will payload")?;
            Some(Will {
                topic: topic.into(),
                payload,
                qos: will_qos,
                retain: will_retain,
                properties: wprops,
            })
        } else {
            None
        };
        let username = if username_flag {
            Some(self.string("user name")?)
        } else {
            None
        };
        let password = if password_flag {
            Some(self.binary("password")?)
        } else {
            None
        };
        Ok(Connect {
            version,
            clean_start,
            keep_alive,
            client_id,
            will,
            username,
            password,
            properties,
        })
    }

    fn connack(&mut self, v5: bool) -> Result<Packet, DecodeError> {
        let ack_flags = self.u8("connack flags")?;
        if ack_flags & 0xfe != 0 {
            return Err(DecodeError::InvalidHeaderFlags {
                packet_type: 2,
                flags: ack_flags,
            });
        }
        let code = self.u8("connack code")?;
        let properties = if v5 && !self.buf.is_empty() {
            self.properties(Ctx::ConnAck)?
        } else {
            Properties::default()
        };
        Ok(Packet::ConnAck(ConnAck {
            session_present: ack_flags & 1 != 0,
            code,
            properties,
        }))
    }

    fn publish(&mut self, flags: u8, v5: bool) -> Result<Packet, DecodeError> {
        let dup = flags & 0x08 != 0;
        let qos = QoS::from_bits((flags >> 1) & 0x03).ok_or(DecodeError::InvalidQoS)?;
        let retain = flags & 0x01 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::DupOnQoS0);
        }
        let topic = self.string("topic name")?;
        let packet_id = if qos != QoS::AtMostOnce {
            Some(self.packet_id()?)
        } else {
            None
        };
        let properties = if v5 {
            self.properties(Ctx::Publish)?
        } else {
            Properties::default()
        };
        if !(topic.is_empty() && properties.topic_alias.is_some()) {
            validate_topic_name(&topic)?;
        }
        let payload = std::mem::take(&mut self.buf);
        Ok(Packet::Publish(Publish {
            dup,
            qos,
            retain,
            topic: topic.into(),
            packet_id,
            properties,
            payload,
        }))
    }

    fn ack(&mut self, v5: bool) -> Result<Ack, DecodeError> {
        let packet_id = self.packet_id()?;
        let (reason, properties) = if v5 && !self.buf.is_empty() {
            let reason = self.u8("reason code")?;
            let props = if self.buf.is_empty() {
                Properties::default()
            } else {
                self.properties(Ctx::Ack)?
            };
            (reason, props)
        } else {
            (0, Properties::default())
        };
        Ok(Ack {
            packet_id,
            reason,
            properties,
        })
    }

    fn filters_guard(&self, count: usize) -> Result<(), DecodeError> {
        if count >= self.limits.max_filters {
            Err(DecodeError::TooManyFilters {
                count: count + 1,
                max: self.limits.max_filters,
            })
        } else {
            Ok(())
        }
    }

    fn subscribe(&mut self, v5: bool) -> Result<Packet, DecodeError> {
        let packet_id = self.packet_id()?;
        let properties = if v5 {
            self.properties(Ctx::Subscribe)?
        } else {
            Properties::default()
        };
        let mut filters = Vec::new();
        while !self.buf.is_empty() {
            self.filters_guard(filters.len())?;
            let filter = self.string("topic filter")?;
            validate_filter(&filter)?;
            let o = self.u8("subscription options")?;
            let reserved = if v5 { o & 0xc0 } else { o & 0xfc };
            let retain_handling = (o >> 4) & 0x03;
            if reserved != 0 || retain_handling == 3 {
                return Err(DecodeError::InvalidSubscriptionOptions(o));
            }
            let qos = QoS::from_bits(o & 0x03).ok_or(DecodeError::InvalidSubscriptionOptions(o))?;
            let options = SubscriptionOptions {
                qos,
                no_local: v5 && o & 0x04 != 0,
                retain_as_published: v5 && o & 0x08 != 0,
                retain_handling: if v5 { retain_handling } else { 0 },
            };
            filters.push(SubscribeFilter { filter, options });
        }
        if filters.is_empty() {
            return Err(DecodeError::NoTopicFilters);
        }
        Ok(Packet::Subscribe(Subscribe {
            packet_id,
            filters,
            properties,
        }))
    }

    fn suback(&mut self, v5: bool) -> Result<Packet, DecodeError> {
        let packet_id = self.packet_id()?;
        let properties = if v5 {
            self.properties(Ctx::SubAck)?
        } else {
            Properties::default()
        };
        let codes = std::mem::take(&mut self.buf).to_vec();
        Ok(Packet::SubAck(SubAck {
            packet_id,
            codes,
            properties,
        }))
    }

    fn unsubscribe(&mut self, v5: bool) -> Result<Packet, DecodeError> {
        let packet_id = self.packet_id()?;
        let properties = if v5 {
            self.properties(Ctx::Unsubscribe)?
        } else {
            Properties::default()
        };
        let mut filters = Vec::new();
        while !self.buf.is_empty() {
            self.filters_guard(filters.len())?;
            let filter = self.string("topic filter")?;
            validate_filter(&filter)?;
            filters.push(filter);
        }
        if filters.is_empty() {
            return Err(DecodeError::NoTopicFilters);
        }
        Ok(Packet::Unsubscribe(Unsubscribe {
            packet_id,
            filters,
            properties,
        }))
    }

    fn unsuback(&mut self, v5: bool) -> Result<Packet, DecodeError> {
        let packet_id = self.packet_id()?;
        let (codes, properties) = if v5 {
            let props = self.properties(Ctx::UnsubAck)?;
            (std::mem::take(&mut self.buf).to_vec(), props)
        } else {
            (Vec::new(), Properties::default())
        };
        Ok(Packet::UnsubAck(UnsubAck {
            packet_id,
            codes,
            properties,
        }))
    }

    fn disconnect(&mut self, v5: bool) -> Result<Packet, DecodeError> {
        if !v5 || self.buf.is_empty() {
            return Ok(Packet::Disconnect(Disconnect::default()));
        }
        let reason = self.u8("reason code")?;
        let properties = if self.buf.is_empty() {
            Properties::default()
        } else {
            self.properties(Ctx::Disconnect)?
        };
        Ok(Packet::Disconnect(Disconnect { reason, properties }))
    }

    fn auth(&mut self) -> Result<Packet, DecodeError> {
        if self.buf.is_empty() {
            return Ok(Packet::Auth(Auth::default()));
        }
        let reason = self.u8("reason code")?;
        if !matches!(reason, 0x00 | 0x18 | 0x19) {
            return Err(DecodeError::InvalidReasonCode {
                code: reason,
                packet: "AUTH",
            });
        }
        let properties = if self.buf.is_empty() {
            Properties::default()
        } else {
            self.properties(Ctx::Auth)?
        };
        Ok(Packet::Auth(Auth { reason, properties }))
    }
}
