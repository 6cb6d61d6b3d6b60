//! One MQTT connection, from CONNECT to close: authentication result in, packets through the
//! Authorizer and the Broker, deliveries out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sekisho_broker::aws::{self, AwsReject};
use sekisho_broker::throttle::{Bucket, Throttled};
use sekisho_broker::{Attached, Blocked, Delivery, Kick, Message, PublishError};
use sekisho_mqtt::{
    Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, ProtocolVersion, Publish,
    PublishRef, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe, Will, decode, encode,
    encode_publish, reason,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Shared;
use crate::authz::Principal;
use crate::events::{self, EventSource};
use sekisho_registry::{AccountId, CertificateId, ClientId};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_MESSAGE_EXPIRY: u32 = 604_800;
/// How long a publisher waits for room in full subscriber queues before the deliveries are
/// dropped: QoS 0 briefly, QoS 1 longer. While it waits it reads nothing more, so TCP slows the
/// publisher down (backpressure) instead of the broker buffering without bound.
const QOS0_WAIT: Duration = Duration::from_millis(50);
const QOS1_WAIT: Duration = Duration::from_secs(2);

/// Waits (until one deadline) for room for blocked deliveries; drops what does not fit.
pub(crate) async fn wait_for_room(
    broker: &sekisho_broker::Broker,
    account: &str,
    blocked: Vec<Blocked>,
) {
    if blocked.is_empty() {
        return;
    }
    let qos1 = blocked.iter().any(|b| b.delivery.qos == QoS::AtLeastOnce);
    let deadline = tokio::time::Instant::now() + if qos1 { QOS1_WAIT } else { QOS0_WAIT };
    for b in blocked {
        match tokio::time::timeout_at(deadline, b.tx.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(b.delivery);
                broker.note_blocked(true);
            }
            // Given up: a stored delivery goes back to its session or is forgotten.
            _ => broker.give_up(account, b.session, b.delivery),
        }
    }
}

/// Who is on the other end, as the listener established it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Remote address.
    pub peer: SocketAddr,
    /// Account the certificate (or, over WebSocket, the signature) authenticated in; empty on
    /// device HTTPS without a certificate and a server name (each request signs for itself).
    pub account: AccountId,
    /// The client certificate; `None` on device HTTPS without one (SigV4 requests) and over
    /// WebSocket (the IAM caller is in `caller`).
    pub certificate: Option<CertificateId>,
    /// The listener it came through.
    pub endpoint: Arc<crate::Endpoint>,
    /// For MQTT over WebSocket: the IAM caller that signed the upgrade.
    pub caller: Option<Box<crate::authn::Caller>>,
    /// The listener's connection slot, held while anything serves this connection (also by
    /// a WebSocket upgraded from it).
    pub slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

/// Longest life of a WebSocket connection (AWS: 24 hours).
const WEBSOCKET_MAX: Duration = Duration::from_secs(24 * 3600);

/// Why a connection ends, as the lifecycle event names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ClientDisconnect {
        will: bool,
    },
    ConnectionLost,
    KeepAlive,
    TakenOver,
    Shutdown,
    Administrative,
    AuthError,
    Forbidden,
    ClientError(u8),
    /// WebSocket lifetime or the credentials behind it ran out.
    Expired,
}

impl End {
    fn lifecycle(self) -> &'static str {
        match self {
            End::ClientDisconnect { .. } => "CLIENT_INITIATED_DISCONNECT",
            End::ConnectionLost => "CONNECTION_LOST",
            End::KeepAlive => "MQTT_KEEP_ALIVE_TIMEOUT",
            End::TakenOver => "DUPLICATE_CLIENTID",
            End::Shutdown => "SERVER_INITIATED_DISCONNECT",
            End::Administrative => "API_INITIATED_DISCONNECT",
            End::AuthError => "AUTH_ERROR",
            End::Forbidden => "FORBIDDEN_ACCESS",
            End::ClientError(_) => "CLIENT_ERROR",
            End::Expired => "WEBSOCKET_TTL_EXPIRATION",
        }
    }

    /// The reason code of the server's MQTT 5 DISCONNECT, if one is sent.
    fn disconnect_code(self) -> Option<u8> {
        match self {
            End::ClientDisconnect { .. } | End::ConnectionLost => None,
            End::KeepAlive => Some(reason::KEEP_ALIVE_TIMEOUT),
            End::TakenOver => Some(reason::SESSION_TAKEN_OVER),
            End::Shutdown => Some(reason::SERVER_SHUTTING_DOWN),
            End::Administrative => Some(reason::ADMINISTRATIVE_ACTION),
            End::AuthError | End::Forbidden => Some(reason::NOT_AUTHORIZED),
            End::Expired => Some(reason::ADMINISTRATIVE_ACTION),
            End::ClientError(c) => Some(c),
        }
    }

    fn sends_will(self) -> bool {
        match self {
            End::ClientDisconnect { will } => will,
            _ => true,
        }
    }
}

/// Buffers of idle connections are this small; they grow while traffic needs it (the decoder
/// reserves room for a whole packet) and shrink back after `SHRINK_AFTER` without traffic.
const IDLE_BUF: usize = 256;
const SHRINK_AFTER: Duration = Duration::from_secs(1);

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(buf.len().clamp(4096, 64 * 1024));
    }
    stream.read_buf(buf).await
}

async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, buf: &mut BytesMut) -> bool {
    if buf.is_empty() {
        return true;
    }
    // Flushed too: a WebSocket stream sends its frames only on flush.
    let ok = matches!(
        tokio::time::timeout(WRITE_TIMEOUT, async {
            stream.write_all(buf).await?;
            stream.flush().await
        })
        .await,
        Ok(Ok(()))
    );
    buf.clear();
    ok
}

fn connack(
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

/// The MQTT 5 properties a message carries from its publisher to its receivers (message
/// expiry travels separately, as a deadline).
fn forwarded(p: &Properties) -> Properties {
    Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..Properties::default()
    }
}

/// Serves one MQTT connection until it ends.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut stream: S,
    info: ConnInfo,
) {
    let limits = shared.config.codec_limits;
    let mut rbuf = BytesMut::with_capacity(IDLE_BUF);
    let mut wbuf = BytesMut::new();

    // CONNECT first, within a deadline. Transient states are boxed so that they do not
    // inflate the connection task, which lives (and holds its size) as long as the connection.
    let first = Box::pin(tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match decode(&mut rbuf, ProtocolVersion::V311, &limits) {
                Ok(Some(p)) => return Ok(Some(p)),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            match read_more(&mut stream, &mut rbuf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }))
    .await;
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Err(DecodeError::UnsupportedProtocolVersion(level))) => {
            tracing::info!(peer = %info.peer, level, "unsupported MQTT protocol level");
            let _ = encode(
                &connack(
                    ProtocolVersion::V311,
                    reason::UNSUPPORTED_PROTOCOL_VERSION,
                    false,
                    Properties::default(),
                ),
                ProtocolVersion::V311,
                &mut wbuf,
            );
            write_all(&mut stream, &mut wbuf).await;
            return;
        }
        Ok(Ok(Some(p))) => {
            tracing::info!(peer = %info.peer, packet = p.name(), "[MQTT-3.1.0-1] first packet is not CONNECT");
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(peer = %info.peer, error = %e, "malformed CONNECT");
            return;
        }
        Ok(Ok(None)) | Err(_) => return,
    };
    // Moving out of the box does not free it; the block does (else its ~700 bytes would stay
    // for the connection's life).
    let accepted = {
        let connect = connect;
        Connection::accept(shared.clone(), *connect, &info, &mut wbuf)
    };
    let mut conn = match accepted {
        Ok(c) => c,
        Err(()) => {
            write_all(&mut stream, &mut wbuf).await;
            return;
        }
    };
    let mut attached = conn.attach(&mut wbuf);
    let end = conn
        .run(&mut stream, &mut rbuf, &mut wbuf, &mut attached)
        .await;
    Box::pin(conn.finish(end, &mut stream, &mut wbuf, attached)).await;
}

struct Connection {
    shared: Arc<Shared>,
    version: ProtocolVersion,
    client_id: ClientId,
    assigned_id: bool,
    clean_start: bool,
    session_expiry: Duration,
    session_expiry_zero_at_connect: bool,
    keep_alive: Duration,
    keep_alive_changed: bool,
    will: Option<Will>,
    principal: Principal,
    account: AccountId,
    peer: SocketAddr,
    session: u64,
    epoch: u64,
    session_identifier: String,
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
    /// Deliveries of our publishes that wait for room in full queues.
    pending: Vec<Blocked>,
    /// The journal ticket that must be durable before what is in the write buffer goes out
    /// (PUBACK, SUBACK, CONNACK of a persistent session); 0: none.
    durable: u64,
    /// AWS's per-connection rates: PUBLISH packets and bytes received per second.
    publish_rate: Bucket,
    byte_rate: Bucket,
    /// A delivery taken from the queue but not sent because the connection is ending (its
    /// credentials no longer hold): handed back to the session with the unacknowledged ones.
    held: Vec<Delivery>,
    /// A resumed session's stored messages not yet sent, and AWS's rate for them (10 a second,
    /// besides live traffic).
    replay: std::collections::VecDeque<Delivery>,
    replay_rate: Bucket,
}

enum Flow {
    Continue,
    Close(End),
}

impl Connection {
    fn v5(&self) -> bool {
        self.version == ProtocolVersion::V5
    }

    fn event_source(&self) -> EventSource<'_> {
        EventSource {
            account: &self.account,
            client_id: &self.client_id,
            thing_name: if self.principal.identity.thing_exclusive {
                self.principal.ctx.thing_name()
            } else {
                None
            },
            session_identifier: &self.session_identifier,
            principal: self.principal.identity.principal.as_str(),
        }
    }

    /// Checks CONNECT against AWS's rules and the principal's policy. On refusal, the CONNACK
    /// is in `wbuf`.
    fn accept(
        shared: Arc<Shared>,
        c: Connect,
        info: &ConnInfo,
        wbuf: &mut BytesMut,
    ) -> Result<Connection, ()> {
        let version = c.version;
        let v5 = version == ProtocolVersion::V5;
        let limits = &shared.config.aws;
        let refuse = |wbuf: &mut BytesMut, code: u8, why: &str| {
            tracing::info!(peer = %info.peer, client_id = %c.client_id, code, why, "CONNECT refused");
            let _ = encode(
                &connack(version, code, false, Properties::default()),
                version,
                wbuf,
            );
        };
        let (client_id, assigned_id) = if c.client_id.is_empty() {
            if !c.clean_start && !v5 {
                refuse(
                    wbuf,
                    reason::CLIENT_IDENTIFIER_NOT_VALID,
                    "[MQTT-3.1.3-8] empty client id needs a clean session",
                );
                return Err(());
            }
            (
                ClientId::new(format!("sekisho-{}", uuid::Uuid::new_v4().simple())),
                true,
            )
        } else {
            (ClientId::new(c.client_id.clone()), false)
        };
        if let Err(e) = limits.check_client_id(&client_id) {
            refuse(wbuf, e.reason_code(), &e.to_string());
            return Err(());
        }
        if let Some(w) = &c.will {
            if w.qos == QoS::ExactlyOnce {
                refuse(
                    wbuf,
                    reason::QOS_NOT_SUPPORTED,
                    "will QoS 2 is not supported",
                );
                return Err(());
            }
            if let Err(e) = limits.check_topic(&w.topic) {
                refuse(wbuf, reason::TOPIC_NAME_INVALID, &e.to_string());
                return Err(());
            }
        }
        let made = match &info.caller {
            Some(caller) => Principal::iam(
                shared.registry.clone(),
                (**caller).clone(),
                Some(&client_id),
                Some(info.peer.ip()),
                info.endpoint.private.as_ref(),
            ),
            None => match &info.certificate {
                Some(certificate) => Principal::certificate(
                    shared.registry.clone(),
                    &info.account,
                    certificate,
                    Some(&client_id),
                    Some(info.peer.ip()),
                    info.endpoint.private.as_ref(),
                ),
                None => Err(sekisho_registry::RegistryError::NotFound(
                    "no certificate and no signature".into(),
                )),
            },
        };
        let mut principal = match made {
            Ok(p) => p,
            Err(e) => {
                refuse(wbuf, reason::NOT_AUTHORIZED, &e.to_string());
                return Err(());
            }
        };
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
        principal.ctx.connect_attributes = attrs;
        let session_identifier = uuid::Uuid::new_v4().to_string();
        let fail_event = |principal: &Principal| {
            let src = EventSource {
                account: &info.account,
                client_id: &client_id,
                thing_name: None,
                session_identifier: &session_identifier,
                principal: principal.identity.principal.as_str(),
            };
            events::connect_failed(
                &shared.broker,
                &src,
                &info.peer.ip().to_string(),
                "AUTHORIZATION_FAILED",
            );
        };
        if !principal.allowed("iot:connect", "client", &client_id) {
            refuse(wbuf, reason::NOT_AUTHORIZED, "iot:Connect denied");
            fail_event(&principal);
            return Err(());
        }
        // AWS's CONNECT rates (1 a second per client id, 500 per account), counted only for
        // clients allowed to use the client id, so nobody can spend another's.
        let throttles = shared.broker.throttles(&info.account);
        if let Err(why) = shared
            .broker
            .admit_connect(&info.account, &client_id, Instant::now())
        {
            refuse(wbuf, reason::CONNECTION_RATE_EXCEEDED, why.label());
            return Err(());
        }
        if let Some(w) = &c.will {
            // The same rules as a PUBLISH: no retained message on a reserved topic.
            let ok = aws::may_publish(&w.topic)
                && !(w.retain && w.topic.starts_with('$'))
                && principal.allowed("iot:publish", "topic", &w.topic)
                && (!w.retain || principal.allowed("iot:retainpublish", "topic", &w.topic));
            if !ok {
                refuse(
                    wbuf,
                    reason::NOT_AUTHORIZED,
                    "not authorized to publish the will",
                );
                fail_event(&principal);
                return Err(());
            }
        }
        // The account's session quota (connected and persisted sessions); a client id that
        // has a session already may always take it back.
        if !shared.broker.session_allowed(&info.account, &client_id) {
            refuse(
                wbuf,
                reason::QUOTA_EXCEEDED,
                "the account's session quota is full",
            );
            return Err(());
        }
        let mut keep_alive = limits.clamp_keep_alive(c.keep_alive);
        if info.endpoint.private.is_some() {
            keep_alive = keep_alive.min(crate::PRIVATE_KEEP_ALIVE_MAX);
        }
        Ok(Connection {
            version,
            clean_start: c.clean_start,
            assigned_id,
            session_expiry: Duration::from_secs(session_expiry as u64),
            session_expiry_zero_at_connect: session_expiry == 0,
            keep_alive: Duration::from_secs(keep_alive as u64),
            keep_alive_changed: keep_alive != c.keep_alive,
            will: c.will,
            account: info.account.clone(),
            peer: info.peer,
            session: 0,
            epoch: 0,
            session_identifier,
            deadline: info.caller.as_ref().map(|c| {
                let max = Instant::now() + WEBSOCKET_MAX;
                c.expiration
                    .map(|e| {
                        let left = (e - sekisho_registry::now_secs()).max(0.0);
                        Instant::now() + Duration::from_secs_f64(left)
                    })
                    .map_or(max, |e| e.min(max))
            }),
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
            last_recv: Instant::now(),
            last_io: Instant::now(),
            pending: Vec::new(),
            durable: 0,
            publish_rate: Bucket::new(
                throttles.publishes_per_connection,
                throttles.publishes_per_connection,
            ),
            byte_rate: Bucket::new(
                throttles.bytes_per_connection,
                throttles.bytes_per_connection,
            ),
            held: Vec::new(),
            replay: Default::default(),
            replay_rate: Bucket::new(throttles.replay_per_second, throttles.replay_per_second),
            client_id,
            principal,
            shared,
        })
    }

    fn attach(&mut self, wbuf: &mut BytesMut) -> Attached {
        let mut attached = self.shared.broker.connect(
            &self.account,
            &self.client_id,
            self.clean_start,
            self.session_expiry,
            Instant::now(),
        );
        self.replay = std::mem::take(&mut attached.replay);
        self.session = attached.session;
        self.durable = self.durable.max(attached.ticket);
        self.epoch = attached.epoch;
        self.shared.index_add(
            &self.account,
            self.principal.identity.principal.as_str(),
            &self.client_id,
            self.epoch,
            self.principal.iam_caller(),
        );
        let limits = &self.shared.config.aws;
        let mut props = Properties::default();
        if self.v5() {
            props.maximum_qos = Some(1);
            props.retain_available = Some(1);
            props.wildcard_subscription_available = Some(1);
            props.subscription_identifier_available = Some(0);
            props.shared_subscription_available = Some(1);
            props.topic_alias_maximum = Some(limits.topic_alias_max);
            props.receive_maximum = Some(limits.max_inflight as u16);
            props.maximum_packet_size =
                Some(self.shared.config.codec_limits.max_packet_size as u32);
            if self.keep_alive_changed {
                props.server_keep_alive = Some(self.keep_alive.as_secs() as u16);
            }
            props.session_expiry_interval = Some(self.session_expiry.as_secs() as u32);
            if self.assigned_id {
                props.assigned_client_identifier = Some(self.client_id.as_str().into());
            }
        }
        let _ = encode(
            &connack(
                self.version,
                reason::SUCCESS,
                attached.session_present,
                props,
            ),
            self.version,
            wbuf,
        );
        tracing::debug!(client_id = %self.client_id, account = %self.account, session_present = attached.session_present, "connected");
        events::connected(
            &self.shared.broker,
            &self.event_source(),
            &self.peer.ip().to_string(),
        );
        attached
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
        attached: &mut Attached,
    ) -> End {
        let limits = self.shared.config.codec_limits;
        let mut shutdown = self.shared.shutdown.clone();
        // Packets already buffered behind CONNECT.
        if let Flow::Close(e) = self.drain(rbuf, wbuf, &limits) {
            return e;
        }
        if !self.pending.is_empty() {
            Box::pin(wait_for_room(
                &self.shared.broker,
                &self.account,
                std::mem::take(&mut self.pending),
            ))
            .await;
        }
        if let Err(e) = self.until_durable(wbuf).await {
            return e;
        }
        // One lazy timer for keep-alive and buffer shrinking: armed for the earliest event,
        // re-checked and re-armed when it fires, never touched per packet.
        let timer = tokio::time::sleep_until(self.next_timer(rbuf, wbuf).into());
        tokio::pin!(timer);
        loop {
            // Stored messages of a resumed session, as the replay rate and the window allow;
            // the timer wakes the loop for the next one.
            match self.replay_some(wbuf) {
                Err(e) => return e,
                Ok(Some(next)) if tokio::time::Instant::from(next) < timer.deadline() => {
                    timer.as_mut().reset(next.into());
                }
                Ok(_) => {}
            }
            if !write_all(stream, wbuf).await {
                return End::ConnectionLost;
            }
            let can_deliver = self.inflight.len() < self.client_receive_max;
            tokio::select! {
                biased;
                k = &mut attached.kick => {
                    return match k {
                        Ok(Kick::TakenOver) => End::TakenOver,
                        Ok(Kick::Shutdown) => End::Shutdown,
                        Ok(Kick::Administrative) | Err(_) => End::Administrative,
                    };
                }
                _ = shutdown.changed() => return End::Shutdown,
                r = read_more(stream, rbuf) => {
                    match r {
                        Ok(0) | Err(_) => return End::ConnectionLost,
                        Ok(n) => {
                            self.last_recv = Instant::now();
                            self.last_io = self.last_recv;
                            // AWS's 512 KiB/s per connection: past it, reading waits.
                            let wait = self.byte_rate.spend(self.last_recv, n as u64);
                            if !wait.is_zero() {
                                tokio::time::sleep(wait).await;
                            }
                            if let Flow::Close(e) = self.drain(rbuf, wbuf, &limits) {
                                return e;
                            }
                            // Backpressure: no further reading until our deliveries found room.
                            if !self.pending.is_empty() {
                                Box::pin(wait_for_room(&self.shared.broker, &self.account, std::mem::take(&mut self.pending))).await;
                            }
                            // Nothing is acknowledged before it is durable.
                            if let Err(e) = self.until_durable(wbuf).await {
                                return e;
                            }
                        }
                    }
                }
                d = attached.rx.recv(), if can_deliver => {
                    let Some(d) = d else { return End::Administrative };
                    self.last_io = Instant::now();
                    if let Flow::Close(e) = self.deliver(d, wbuf) {
                        return e;
                    }
                    // Batch what is already queued, within the in-flight window.
                    while self.inflight.len() < self.client_receive_max && wbuf.len() < 64 * 1024 {
                        match attached.rx.try_recv() {
                            Ok(d) => if let Flow::Close(e) = self.deliver(d, wbuf) { return e; },
                            Err(_) => break,
                        }
                    }
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= self.keep_alive_deadline() {
                        return End::KeepAlive;
                    }
                    if self.deadline.is_some_and(|d| now >= d) {
                        return End::Expired;
                    }
                    if now >= self.last_io + SHRINK_AFTER {
                        if rbuf.is_empty() && rbuf.capacity() > IDLE_BUF {
                            *rbuf = BytesMut::with_capacity(IDLE_BUF);
                        }
                        if wbuf.is_empty() {
                            *wbuf = BytesMut::new();
                        }
                    }
                    timer.as_mut().reset(self.next_timer(rbuf, wbuf).into());
                }
            }
        }
    }

    /// Waits until the changes the write buffer acknowledges are durable. If storage failed,
    /// nothing in the buffer goes out and the connection ends (the client sends again).
    async fn until_durable(&mut self, wbuf: &mut BytesMut) -> Result<(), End> {
        let ticket = std::mem::take(&mut self.durable);
        if ticket == 0 || self.shared.broker.durable_until(ticket).await {
            return Ok(());
        }
        tracing::error!(client_id = %self.client_id, "storage failed; acknowledgements withheld");
        wbuf.clear();
        Err(End::Shutdown)
    }

    /// When a silent client has exceeded 1.5 times its keep-alive.
    fn keep_alive_deadline(&self) -> Instant {
        self.last_recv + self.keep_alive + self.keep_alive / 2
    }

    /// The next time the connection's timer must look: the keep-alive deadline, or the moment
    /// the buffers of a connection gone quiet can shrink.
    /// Sends what the replay rate allows of the resumed session's stored messages; returns
    /// when the next one may go, if some wait.
    fn replay_some(&mut self, wbuf: &mut BytesMut) -> Result<Option<Instant>, End> {
        if self.replay.is_empty() {
            return Ok(None);
        }
        let now = Instant::now();
        while self.inflight.len() < self.client_receive_max && !self.replay.is_empty() {
            if !self.replay_rate.take(now, 1) {
                return Ok(Some(now + self.replay_rate.until_next(now)));
            }
            if let Some(d) = self.replay.pop_front()
                && let Flow::Close(e) = self.deliver(d, wbuf)
            {
                return Err(e);
            }
        }
        Ok(None)
    }

    fn next_timer(&self, rbuf: &BytesMut, wbuf: &BytesMut) -> Instant {
        let ka = self.keep_alive_deadline();
        let ka = self.deadline.map_or(ka, |d| ka.min(d));
        let shrink = self.last_io + SHRINK_AFTER;
        let big = rbuf.capacity() > IDLE_BUF || wbuf.capacity() > 0;
        if big && shrink > Instant::now() {
            ka.min(shrink)
        } else {
            ka
        }
    }

    fn drain(
        &mut self,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
        limits: &sekisho_mqtt::Limits,
    ) -> Flow {
        loop {
            match decode(rbuf, self.version, limits) {
                Ok(Some(p)) => {
                    if let Flow::Close(e) = self.handle(p, wbuf) {
                        return Flow::Close(e);
                    }
                }
                Ok(None) => return Flow::Continue,
                Err(e) => {
                    tracing::info!(client_id = %self.client_id, error = %e, "malformed packet; closing");
                    return Flow::Close(End::ClientError(e.reason_code()));
                }
            }
        }
    }

    fn send(&self, p: &Packet, wbuf: &mut BytesMut) {
        if let Err(e) = encode(p, self.version, wbuf) {
            tracing::warn!(error = %e, packet = p.name(), "could not encode");
        }
    }

    /// Refreshes the principal; a revoked certificate ends the connection.
    fn authorized(&mut self) -> Result<(), End> {
        self.principal.refresh().map_err(|r| {
            tracing::info!(client_id = %self.client_id, reason = ?r, "principal revoked");
            End::AuthError
        })
    }

    fn handle(&mut self, p: Packet, wbuf: &mut BytesMut) -> Flow {
        match p {
            Packet::Publish(p) => self.publish(p, wbuf),
            Packet::PubAck(a) => {
                if let Some(d) = self.inflight.remove(&a.packet_id) {
                    self.shared
                        .broker
                        .acked(&self.account, &self.client_id, d.seq);
                }
                Flow::Continue
            }
            Packet::Subscribe(s) => self.subscribe(s, wbuf),
            Packet::Unsubscribe(u) => self.unsubscribe(u, wbuf),
            Packet::PingReq => {
                self.send(&Packet::PingResp, wbuf);
                Flow::Continue
            }
            Packet::Disconnect(d) => {
                if self.v5() {
                    if let Some(e) = d.properties.session_expiry_interval {
                        if self.session_expiry_zero_at_connect && e > 0 {
                            return Flow::Close(End::ClientError(reason::PROTOCOL_ERROR));
                        }
                        self.session_expiry = Duration::from_secs(
                            e.min(self.shared.config.aws.max_session_expiry) as u64,
                        );
                    }
                    return Flow::Close(End::ClientDisconnect {
                        will: d.reason == reason::DISCONNECT_WITH_WILL,
                    });
                }
                Flow::Close(End::ClientDisconnect { will: false })
            }
            Packet::Connect(_) => {
                tracing::info!(client_id = %self.client_id, "[MQTT-3.1.0-2] second CONNECT");
                Flow::Close(End::ClientError(reason::PROTOCOL_ERROR))
            }
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                tracing::info!(client_id = %self.client_id, "QoS 2 flow is not supported");
                Flow::Close(End::ClientError(reason::PROTOCOL_ERROR))
            }
            Packet::Auth(_) => Flow::Close(End::ClientError(reason::PROTOCOL_ERROR)),
            other => {
                tracing::info!(client_id = %self.client_id, packet = other.name(), "server-to-client packet from a client");
                Flow::Close(End::ClientError(reason::PROTOCOL_ERROR))
            }
        }
    }

    fn publish(&mut self, mut p: Publish, wbuf: &mut BytesMut) -> Flow {
        if p.qos == QoS::ExactlyOnce {
            return Flow::Close(End::ClientError(reason::QOS_NOT_SUPPORTED));
        }
        if !p.properties.subscription_identifiers.is_empty() {
            // [MQTT-3.3.4-6] a client must not send Subscription Identifiers.
            return Flow::Close(End::ClientError(reason::PROTOCOL_ERROR));
        }
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias > self.shared.config.aws.topic_alias_max {
                return Flow::Close(End::ClientError(reason::TOPIC_ALIAS_INVALID));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Flow::Close(End::ClientError(reason::PROTOCOL_ERROR)),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        if let Err(e) = self.shared.config.aws.check_topic(&p.topic) {
            tracing::info!(client_id = %self.client_id, error = %e, "publish refused");
            return Flow::Close(End::ClientError(e.reason_code()));
        }
        // AWS's 100 publishes a second per connection: the excess is discarded (after its
        // topic alias was taken, so later packets still resolve).
        if !self.publish_rate.take(Instant::now(), 1) {
            self.shared
                .broker
                .stats
                .throttled(Throttled::ConnectionPublishRate);
            return self.throttled_publish(p.packet_id, wbuf);
        }
        if p.payload.len() > self.shared.config.aws.max_payload {
            let e = AwsReject::PayloadTooLarge(p.payload.len());
            return Flow::Close(End::ClientError(e.reason_code()));
        }
        if let Err(e) = self.authorized() {
            return Flow::Close(e);
        }
        let reserved_ok = aws::may_publish(&p.topic) && !(p.retain && p.topic.starts_with('$'));
        let allowed = reserved_ok
            && self.principal.allowed("iot:publish", "topic", &p.topic)
            && (!p.retain
                || self
                    .principal
                    .allowed("iot:retainpublish", "topic", &p.topic));
        if !allowed {
            tracing::info!(client_id = %self.client_id, topic = %p.topic, retain = p.retain, "publish not authorized");
            if !self.v5() {
                // AWS IoT disconnects an MQTT 3.1.1 client that publishes where it may not.
                return Flow::Close(End::Forbidden);
            }
            if let Some(id) = p.packet_id {
                self.send(
                    &Packet::PubAck(Ack {
                        packet_id: id,
                        reason: reason::NOT_AUTHORIZED,
                        properties: Properties::default(),
                    }),
                    wbuf,
                );
            }
            return Flow::Continue;
        }
        let now = Instant::now();
        let expiry = p
            .properties
            .message_expiry_interval
            .map(|e| e.clamp(1, MAX_MESSAGE_EXPIRY));
        let props = forwarded(&p.properties);
        if props.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            if let Some(id) = p.packet_id {
                self.send(
                    &Packet::PubAck(Ack {
                        packet_id: id,
                        reason: reason::PAYLOAD_FORMAT_INVALID,
                        properties: Properties::default(),
                    }),
                    wbuf,
                );
            }
            return Flow::Continue;
        }
        let msg = Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: props,
            expires_at: expiry.map(|e| now + Duration::from_secs(e as u64)),
            origin: Some(self.session),
            timestamp_ms: events::now_ms(),
        };
        let result = self
            .shared
            .broker
            .publish_from_client(&self.account, Arc::new(msg), now);
        if let Err(PublishError::Throttled) = result {
            return self.throttled_publish(p.packet_id, wbuf);
        }
        let code = match &result {
            Err(PublishError::RetainedQuota) if self.v5() => reason::QUOTA_EXCEEDED,
            _ => reason::SUCCESS,
        };
        if let Ok(routed) = result {
            // QoS 1 waits before its PUBACK; a retained QoS 0 publish waits too before this
            // connection reads on, so storage paces it rather than buffering without bound.
            if p.qos == QoS::AtLeastOnce || p.retain {
                self.durable = self.durable.max(routed.ticket);
            }
            for b in routed.blocked {
                if b.session == self.session {
                    // Our own subscription: write it now rather than wait on ourselves.
                    self.shared.broker.note_blocked(true);
                    if let Flow::Close(e) = self.deliver(b.delivery, wbuf) {
                        return Flow::Close(e);
                    }
                } else {
                    self.pending.push(b);
                }
            }
        }
        // The PUBACK goes out after blocked deliveries found room (or were given up): see `run`.
        if let Some(id) = p.packet_id {
            self.send(
                &Packet::PubAck(Ack {
                    packet_id: id,
                    reason: code,
                    properties: Properties::default(),
                }),
                wbuf,
            );
        }
        Flow::Continue
    }

    /// A publish over a rate is discarded: MQTT 5 QoS 1 hears so (PUBACK 0x96); MQTT 3.1.1
    /// has no way to say it, and gets no PUBACK (AWS: discarded).
    fn throttled_publish(&mut self, packet_id: Option<u16>, wbuf: &mut BytesMut) -> Flow {
        tracing::debug!(client_id = %self.client_id, "publish rate exceeded; discarded");
        if let Some(id) = packet_id
            && self.v5()
        {
            self.send(
                &Packet::PubAck(Ack {
                    packet_id: id,
                    reason: reason::MESSAGE_RATE_TOO_HIGH,
                    properties: Properties::default(),
                }),
                wbuf,
            );
        }
        Flow::Continue
    }

    fn subscribe(&mut self, s: Subscribe, wbuf: &mut BytesMut) -> Flow {
        if !s.properties.subscription_identifiers.is_empty() {
            return Flow::Close(End::ClientError(
                reason::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
            ));
        }
        if let Err(e) = self.authorized() {
            return Flow::Close(e);
        }
        let limits = self.shared.config.aws;
        let fail = |code: u8, v5: bool| if v5 { code } else { reason::V3_SUBACK_FAILURE };
        // AWS's 500 subscriptions a second per account: over it, the whole SUBSCRIBE fails.
        let n = s.filters.len().min(limits.max_filters_per_subscribe) as u32;
        let throttled = !self
            .shared
            .broker
            .admit_subscriptions(&self.account, n, Instant::now());
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut subscribed = Vec::new();
        let mut retained = Vec::new();
        let now = Instant::now();
        for (i, f) in s.filters.iter().enumerate() {
            if throttled || i >= limits.max_filters_per_subscribe {
                codes.push(fail(reason::QUOTA_EXCEEDED, self.v5()));
                continue;
            }
            let (_, inner) = sekisho_broker::trie::split_shared(&f.filter);
            if let Err(e) = limits.check_topic(&f.filter) {
                tracing::info!(client_id = %self.client_id, error = %e, "subscription refused");
                codes.push(fail(reason::TOPIC_FILTER_INVALID, self.v5()));
                continue;
            }
            if !aws::may_subscribe(inner)
                || !self
                    .principal
                    .allowed("iot:subscribe", "topicfilter", &f.filter)
            {
                tracing::info!(client_id = %self.client_id, filter = %f.filter, "subscribe not authorized");
                codes.push(fail(reason::NOT_AUTHORIZED, self.v5()));
                continue;
            }
            let existing = self
                .shared
                .broker
                .subscription_count(&self.account, self.session);
            let mut options = f.options;
            // QoS 2 is granted as QoS 1 (AWS IoT supports QoS 0 and 1).
            options.qos = options.qos.min(QoS::AtLeastOnce);
            let (fresh, ticket) =
                self.shared
                    .broker
                    .subscribe(&self.account, self.session, &f.filter, options);
            self.durable = self.durable.max(ticket);
            if fresh && existing >= limits.max_subscriptions {
                self.shared
                    .broker
                    .unsubscribe(&self.account, self.session, &f.filter);
                codes.push(fail(reason::QUOTA_EXCEEDED, self.v5()));
                continue;
            }
            codes.push(options.qos as u8);
            subscribed.push(f.filter.clone());
            let send_retained = match options.retain_handling {
                0 => true,
                1 => fresh,
                _ => false,
            };
            if send_retained
                && let Some(m) = self
                    .shared
                    .broker
                    .retained_for(&self.account, &f.filter, now)
            {
                let qos = m.qos.min(options.qos);
                retained.push(Delivery {
                    message: m,
                    qos,
                    retain: true,
                    resend: None,
                    seq: 0,
                });
            }
        }
        self.send(
            &Packet::SubAck(SubAck {
                packet_id: s.packet_id,
                codes,
                properties: Properties::default(),
            }),
            wbuf,
        );
        events::subscriptions(&self.shared.broker, &self.event_source(), true, &subscribed);
        for d in retained {
            if let Flow::Close(e) = self.deliver(d, wbuf) {
                return Flow::Close(e);
            }
        }
        Flow::Continue
    }

    fn unsubscribe(&mut self, u: Unsubscribe, wbuf: &mut BytesMut) -> Flow {
        let mut codes = Vec::new();
        let mut removed = Vec::new();
        for f in &u.filters {
            let (existed, ticket) = self
                .shared
                .broker
                .unsubscribe(&self.account, self.session, f);
            self.durable = self.durable.max(ticket);
            if existed {
                codes.push(reason::SUCCESS);
                removed.push(f.clone());
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        let codes = if self.v5() { codes } else { Vec::new() };
        self.send(
            &Packet::UnsubAck(UnsubAck {
                packet_id: u.packet_id,
                codes,
                properties: Properties::default(),
            }),
            wbuf,
        );
        events::subscriptions(&self.shared.broker, &self.event_source(), false, &removed);
        Flow::Continue
    }

    fn next_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_pid;
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }

    /// A stored delivery this connection drops for good (expired, not to be received, too
    /// large for the client): storage forgets it too.
    fn forget(&self, d: &Delivery) {
        self.shared
            .broker
            .acked(&self.account, &self.client_id, d.seq);
    }

    fn deliver(&mut self, d: Delivery, wbuf: &mut BytesMut) -> Flow {
        // The clock is read only for messages that can expire.
        let now = d.message.expires_at.map(|_| Instant::now());
        if let Some(now) = now
            && d.message.expired(now)
        {
            self.forget(&d);
            return Flow::Continue;
        }
        if let Err(e) = self.authorized() {
            self.held.push(d);
            return Flow::Close(e);
        }
        let m = &d.message;
        if !self.principal.allowed("iot:receive", "topic", &m.topic) {
            self.forget(&d);
            return Flow::Continue;
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
        let properties = match (self.v5(), m.expires_at, now) {
            (false, _, _) => &Properties::EMPTY,
            (true, Some(exp), Some(now)) => {
                let mut p = m.properties.clone();
                p.message_expiry_interval =
                    Some(exp.saturating_duration_since(now).as_secs() as u32);
                with_expiry = p;
                &with_expiry
            }
            (true, _, _) => &m.properties,
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
        let before = wbuf.len();
        if let Err(e) = encode_publish(&p, self.version, wbuf) {
            tracing::warn!(error = %e, "could not encode a delivery");
            self.forget(&d);
            return Flow::Continue;
        }
        if wbuf.len() - before > self.client_max_packet {
            // [MQTT-3.1.2-25] never send more than the client's Maximum Packet Size.
            wbuf.truncate(before);
            self.forget(&d);
            return Flow::Continue;
        }
        if let Some(id) = packet_id {
            self.inflight.insert(id, d);
        }
        Flow::Continue
    }

    async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
        mut self,
        end: End,
        stream: &mut S,
        wbuf: &mut BytesMut,
        attached: Attached,
    ) {
        if self.v5()
            && let Some(code) = end.disconnect_code()
        {
            self.send(
                &Packet::Disconnect(Disconnect {
                    reason: code,
                    properties: Properties::default(),
                }),
                wbuf,
            );
        }
        // Whatever the buffer acknowledges (a PUBACK read in the same packet burst as the
        // error that ends the connection) goes out only once durable, after the publisher's
        // blocked deliveries found room or were given up.
        if !self.pending.is_empty() {
            Box::pin(wait_for_room(
                &self.shared.broker,
                &self.account,
                std::mem::take(&mut self.pending),
            ))
            .await;
        }
        if self.until_durable(wbuf).await.is_ok() {
            write_all(stream, wbuf).await;
        }
        let _ = stream.shutdown().await;
        // Unacknowledged QoS 1 deliveries, sent (oldest packet id first, to be sent again with
        // it) or still waiting in the queue, go back to the session under the same lock that
        // detaches this connection ([MQTT-4.4.0-1]).
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
        let expiry = if self.v5() {
            Some(self.session_expiry)
        } else {
            None
        };
        // The queue is closed and emptied under the broker's lock, with the rest.
        self.shared.broker.disconnect(
            &self.account,
            self.session,
            self.epoch,
            expiry,
            unacked,
            Some(attached.rx),
            Instant::now(),
        );
        self.shared.index_remove(
            &self.account,
            self.principal.identity.principal.as_str(),
            &self.client_id,
            self.epoch,
        );
        tracing::debug!(client_id = %self.client_id, reason = end.lifecycle(), "disconnected");
        if end.sends_will()
            && let Some(w) = self.will.take()
        {
            self.publish_will(w);
        }
        events::disconnected(&self.shared.broker, &self.event_source(), end.lifecycle());
    }

    fn publish_will(&mut self, w: Will) {
        // Authorized again with what is in force now: a revoked certificate, a deactivated CA
        // or key, or a changed policy sends no will (docs/compatibility.md).
        if let Err(why) = self.principal.refresh() {
            tracing::info!(client_id = %self.client_id, reason = ?why, "principal revoked; will not published");
            return;
        }
        if !self.principal.allowed("iot:publish", "topic", &w.topic)
            || (w.retain
                && !self
                    .principal
                    .allowed("iot:retainpublish", "topic", &w.topic))
        {
            tracing::info!(client_id = %self.client_id, "will no longer authorized; not published");
            return;
        }
        let delay = w
            .properties
            .will_delay_interval
            .unwrap_or(0)
            .min(self.session_expiry.as_secs() as u32);
        let expiry = w
            .properties
            .message_expiry_interval
            .map(|e| e.clamp(1, MAX_MESSAGE_EXPIRY));
        let props = forwarded(&w.properties);
        let (topic, retain) = (w.topic.clone(), w.retain);
        let weight = (w.topic.len() + w.payload.len()) as u64;
        let broker = self.shared.broker.clone();
        let account = self.account.clone();
        let client = self.client_id.clone();
        let make = move || {
            let now = Instant::now();
            Arc::new(Message {
                topic: w.topic.clone(),
                payload: w.payload.clone(),
                qos: w.qos,
                retain: w.retain,
                properties: props.clone(),
                expires_at: expiry.map(|e| now + Duration::from_secs(e as u64)),
                origin: None,
                timestamp_ms: events::now_ms(),
            })
        };
        if delay == 0 {
            tokio::spawn(async move {
                if let Ok(routed) = broker.publish(&account, make(), Instant::now()) {
                    wait_for_room(&broker, &account, routed.blocked).await;
                }
            });
        } else {
            // Authorized again when it is sent: the certificate, CA or credentials may be
            // revoked, or the policy changed, during the delay.
            let Ok(mut later) = self.principal.fresh() else {
                return;
            };
            // Held for up to the session expiry: its bytes count against the account's
            // offline quota meanwhile, as queued messages do.
            let Some(reservation) = self.shared.broker.reserve_offline(&self.account, weight)
            else {
                tracing::info!(client_id = %self.client_id, "offline quota full; delayed will dropped");
                return;
            };
            tokio::spawn(async move {
                let _reservation = reservation;
                tokio::time::sleep(Duration::from_secs(delay as u64)).await;
                let allowed = later.refresh().is_ok()
                    && later.allowed("iot:publish", "topic", &topic)
                    && (!retain || later.allowed("iot:retainpublish", "topic", &topic));
                if !allowed {
                    tracing::info!(client_id = %client, "delayed will no longer authorized; not published");
                    return;
                }
                // [MQTT-3.1.3-9] not sent if the client reconnected in the meantime.
                if !broker.is_connected(&account, &client)
                    && let Ok(routed) = broker.publish(&account, make(), Instant::now())
                {
                    wait_for_room(&broker, &account, routed.blocked).await;
                }
            });
        }
    }
}
