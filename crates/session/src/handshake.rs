//! From the first byte to an admitted CONNECT: the CONNECT deadline, AWS's CONNECT rules, and
//! the authorization of the connection and its will.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use sekisho_broker::aws;
use sekisho_ids::ClientId;
use sekisho_mqtt::{
    ConnAck, Connect, DecodeError, Packet, Properties, ProtocolVersion, QoS, decode, encode, reason,
};

use crate::{Config, Env, IDLE_BUF};

/// A connection that has not sent CONNECT yet.
#[derive(Debug)]
pub struct Handshake {
    deadline: Instant,
    rbuf: BytesMut,
}

/// What the first bytes amount to.
#[derive(Debug)]
pub enum HandshakeStep {
    /// More bytes are needed (before [`Handshake::deadline`]).
    Wait,
    /// A CONNECT arrived; the bytes behind it stay buffered for the session.
    Connect(Box<Connect>, BytesMut),
    /// The connection is refused with these bytes (a CONNACK), then closed.
    Refuse(BytesMut),
    /// The connection is closed without a word (not MQTT, malformed, or too late).
    Drop(&'static str),
}

impl Handshake {
    /// A new connection at `now`.
    pub fn new(config: &Config, now: Instant) -> Handshake {
        Handshake {
            deadline: now + config.connect_timeout,
            rbuf: BytesMut::with_capacity(IDLE_BUF),
        }
    }

    /// When the connection is dropped if no CONNECT has come.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Where the driver reads into (room reserved when full).
    pub fn read_buf(&mut self) -> &mut BytesMut {
        reserve(&mut self.rbuf);
        &mut self.rbuf
    }

    /// Looks at what has been read by `now`.
    pub fn poll(&mut self, config: &Config, now: Instant) -> HandshakeStep {
        match decode(&mut self.rbuf, ProtocolVersion::V311, &config.codec) {
            Ok(Some(Packet::Connect(c))) => {
                HandshakeStep::Connect(c, std::mem::take(&mut self.rbuf))
            }
            Ok(Some(_)) => HandshakeStep::Drop("[MQTT-3.1.0-1] first packet is not CONNECT"),
            Ok(None) if now >= self.deadline => HandshakeStep::Drop("no CONNECT in time"),
            Ok(None) => HandshakeStep::Wait,
            Err(DecodeError::UnsupportedProtocolVersion(_)) => {
                let mut out = BytesMut::new();
                let _ = encode(
                    &connack(
                        ProtocolVersion::V311,
                        reason::UNSUPPORTED_PROTOCOL_VERSION,
                        false,
                        Properties::default(),
                    ),
                    ProtocolVersion::V311,
                    &mut out,
                );
                HandshakeStep::Refuse(out)
            }
            Err(_) => HandshakeStep::Drop("malformed CONNECT"),
        }
    }
}

/// Room to read into: a full buffer grows by what traffic suggests, within 4 to 64 KiB.
pub(crate) fn reserve(buf: &mut BytesMut) {
    if buf.capacity() == buf.len() {
        buf.reserve(buf.len().clamp(4096, 64 * 1024));
    }
}

/// The CONNACK for `version` (MQTT 3.1.1 return codes mapped from MQTT 5 reason codes).
pub(crate) fn connack(
    version: ProtocolVersion,
    code_v5: u8,
    session_present: bool,
    properties: Properties,
) -> Packet {
    let code = if version == ProtocolVersion::V5 {
        code_v5
    } else {
        reason::connack_v3_from_v5(code_v5)
    };
    Packet::ConnAck(ConnAck {
        session_present,
        code,
        properties,
    })
}

/// A refused CONNECT: the CONNACK's reason and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Protocol version of the CONNECT.
    pub version: ProtocolVersion,
    /// MQTT 5 reason code (mapped for MQTT 3.1.1 when encoded).
    pub code: u8,
    /// Why, for the log.
    pub why: String,
}

impl Refusal {
    /// The CONNACK to send.
    pub fn connack(&self) -> BytesMut {
        let mut out = BytesMut::new();
        let _ = encode(
            &connack(self.version, self.code, false, Properties::default()),
            self.version,
            &mut out,
        );
        out
    }
}

/// A CONNECT that passed AWS's rules, before and after its principal is authorized.
#[derive(Debug)]
pub struct Admission {
    pub(crate) connect: Box<Connect>,
    /// The client id (assigned when the client sent none).
    pub client_id: ClientId,
    /// Whether the server assigned the client id.
    pub assigned_id: bool,
    /// Session expiry after AWS's caps.
    pub session_expiry: Duration,
    /// Keep-alive after AWS's clamp.
    pub keep_alive: Duration,
    pub(crate) keep_alive_changed: bool,
    /// `iot:ConnectAttributes` of the CONNECT (`PersistentConnect`, `LastWill`).
    pub connect_attributes: Vec<String>,
}

/// Applies AWS's CONNECT rules (client id, will QoS and topic, session expiry and keep-alive
/// caps). `private` is true on private (VPC) endpoints; `assign` names a client that sent no
/// client id.
pub fn admit(
    connect: Box<Connect>,
    config: &Config,
    private: bool,
    assign: impl FnOnce() -> String,
) -> Result<Admission, Refusal> {
    let c = connect;
    let version = c.version;
    let v5 = version == ProtocolVersion::V5;
    let limits = &config.aws;
    let refuse = |code: u8, why: &str| Refusal {
        version,
        code,
        why: why.to_string(),
    };
    let (client_id, assigned_id) = if c.client_id.is_empty() {
        if !c.clean_start && !v5 {
            return Err(refuse(
                reason::CLIENT_IDENTIFIER_NOT_VALID,
                "[MQTT-3.1.3-8] empty client id needs a clean session",
            ));
        }
        (ClientId::new(assign()), true)
    } else {
        (ClientId::new(c.client_id.clone()), false)
    };
    if let Err(e) = limits.check_client_id(&client_id) {
        return Err(refuse(e.reason_code(), &e.to_string()));
    }
    if let Some(w) = &c.will {
        if w.qos == QoS::ExactlyOnce {
            return Err(refuse(
                reason::QOS_NOT_SUPPORTED,
                "will QoS 2 is not supported",
            ));
        }
        if let Err(e) = limits.check_topic(&w.topic) {
            return Err(refuse(reason::TOPIC_NAME_INVALID, &e.to_string()));
        }
    }
    let requested_expiry = if v5 {
        c.properties.session_expiry_interval.unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        limits.default_session_expiry
    };
    let session_expiry = requested_expiry.min(limits.max_session_expiry);
    let mut attrs = Vec::new();
    if session_expiry > 0 {
        attrs.push("PersistentConnect".to_string());
    }
    if c.will.is_some() {
        attrs.push("LastWill".to_string());
    }
    let mut keep_alive = limits.clamp_keep_alive(c.keep_alive);
    if private {
        keep_alive = keep_alive.min(config.private_keep_alive_max);
    }
    Ok(Admission {
        client_id,
        assigned_id,
        session_expiry: Duration::from_secs(u64::from(session_expiry)),
        keep_alive: Duration::from_secs(u64::from(keep_alive)),
        keep_alive_changed: keep_alive != c.keep_alive,
        connect_attributes: attrs,
        connect: c,
    })
}

impl Admission {
    /// Protocol version of the CONNECT.
    pub fn version(&self) -> ProtocolVersion {
        self.connect.version
    }

    /// Whether the client asked for a clean start.
    pub fn clean_start(&self) -> bool {
        self.connect.clean_start
    }

    /// The connection's will, if it has one: its delay and its message, as the session would
    /// publish it (in a cluster, what another node publishes if this one dies).
    pub fn will(&self) -> Option<(Duration, sekisho_broker::Message)> {
        let w = self.connect.will.as_ref()?;
        Some(crate::session::will_template(w, self.session_expiry))
    }

    /// Authorizes the connection with its principal (in `env`): `iot:Connect` on the client
    /// id, AWS's CONNECT rates (counted only for clients allowed to use the client id, so
    /// nobody can spend another's), the will's `iot:Publish` (and `iot:RetainPublish`), and
    /// the account's session quota.
    pub fn authorize(self, env: &mut impl Env, now: Instant) -> Result<Admission, Refusal> {
        let version = self.version();
        let refuse = |code: u8, why: &str| Refusal {
            version,
            code,
            why: why.to_string(),
        };
        if !env.allowed("iot:connect", "client", &self.client_id) {
            env.connect_failed();
            return Err(refuse(reason::NOT_AUTHORIZED, "iot:Connect denied"));
        }
        if let Err(why) = env.admit_connect(now) {
            return Err(refuse(reason::CONNECTION_RATE_EXCEEDED, why.label()));
        }
        if let Some(w) = &self.connect.will {
            // The same rules as a PUBLISH: no retained message on a reserved topic.
            let ok = aws::may_publish(&w.topic)
                && !aws::is_provisioning_request(&w.topic)
                && !(w.retain && w.topic.starts_with('$'))
                && env.allowed("iot:publish", "topic", &w.topic)
                && (!w.retain || env.allowed("iot:retainpublish", "topic", &w.topic));
            if !ok {
                env.connect_failed();
                return Err(refuse(
                    reason::NOT_AUTHORIZED,
                    "not authorized to publish the will",
                ));
            }
        }
        // A client id that has a session already may always take it back.
        if !env.session_allowed() {
            return Err(refuse(
                reason::QUOTA_EXCEEDED,
                "the account's session quota is full",
            ));
        }
        Ok(self)
    }
}
