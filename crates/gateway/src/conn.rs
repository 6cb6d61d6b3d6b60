//! The driver of one MQTT connection: the socket, the timers and the broker handle around the
//! sans-I/O session (`sekisho-session`), which holds the protocol logic. The driver reads the
//! clock and passes `now` in; it waits for storage before acknowledgements go out, and for room
//! in full subscriber queues before it reads on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sekisho_broker::throttle::Throttled;
use sekisho_broker::{
    Attached, Blocked, DelayedWill, Kick, Message, PublishError, SessionId, weight,
};
use sekisho_mqtt::{QoS, SubscriptionOptions};
use sekisho_session::{
    Admission, Attachment, DueWill, End, Env, Handshake, HandshakeStep, Published, Rates, Refusal,
    Session, WEBSOCKET_MAX,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Shared;
use crate::authz::Principal;
use crate::events::{self, EventSource};
use sekisho_registry::{AccountId, CertificateId, ClientId};

const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a SUBACK waits for a cluster to route a new filter to this node.
const INTEREST_WAIT: Duration = Duration::from_secs(2);
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
    /// Custom authentication (no certificate, no signature): at CONNECT by its username and
    /// password (MQTT with ALPN `mqtt` on the device HTTPS port, or a WebSocket whose upgrade
    /// named no authorizer), or already decided on the WebSocket upgrade.
    pub custom: Option<crate::custom_auth::CustomAuth>,
    /// The server name the client asked for (custom authentication passes it on).
    pub server_name: Option<String>,
}

/// The session's surroundings in the gateway: the connection's principal, the broker and the
/// lifecycle events.
struct Port {
    shared: Arc<Shared>,
    principal: Principal,
    account: AccountId,
    client_id: ClientId,
    session: SessionId,
    session_identifier: String,
    peer: SocketAddr,
    /// The client certificate (`None` over WebSocket, where the principal is an IAM caller).
    certificate: Option<CertificateId>,
    /// Deliveries of this connection's publishes that wait for room in full queues; the driver
    /// waits for them before it reads on (and before the PUBACK goes out).
    pending: Vec<Blocked>,
    /// A custom authorizer's connection: what it presented, to present again after the
    /// seconds the authorizer said.
    reauth: Option<Box<(crate::custom_auth::Credentials, u32)>>,
    /// The broker connection's epoch (once attached).
    epoch: u64,
    /// In a cluster: the interest mark the next SUBACK waits for (0: none).
    interest_mark: u64,
    /// A provisioning claim's connection: it may not take a client id over from another node.
    provisioning_claim: bool,
}

impl Port {
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
            principal: self.principal.event_identifier(),
        }
    }

    async fn wait_for_room(&mut self) {
        if !self.pending.is_empty() {
            let blocked = std::mem::take(&mut self.pending);
            Box::pin(sekisho_broker::wait_for_room(
                &self.shared.broker,
                &self.account,
                blocked,
                tokio::time::Instant::now(),
            ))
            .await;
        }
    }
}

impl Env for Port {
    fn refresh(&mut self) -> Result<(), String> {
        self.principal.refresh().map_err(|r| format!("{r:?}"))
    }

    fn allowed(&mut self, action: &str, kind: &str, name: &str) -> bool {
        self.principal.allowed(action, kind, name)
    }

    fn admit_connect(&mut self, now: Instant) -> Result<(), Throttled> {
        self.shared
            .broker
            .admit_connect(&self.account, &self.client_id, now)
    }

    fn session_allowed(&mut self) -> bool {
        self.shared
            .broker
            .session_allowed(&self.account, &self.client_id)
    }

    fn publish(&mut self, message: Message, now: Instant) -> Result<Published, PublishError> {
        let message = Arc::new(message);
        // A fleet provisioning request goes to the service only (it carries an ownership
        // token or a CSR, no business of other subscribers), and its answer to this connection
        // only (it may carry a private key and a token). It counts against the account's rate.
        if let Some((req, format)) = crate::provision::parse_topic(&message.topic) {
            if !self.shared.broker.charge_publishes(&self.account, 1, now) {
                return Err(PublishError::Throttled);
            }
            // At QoS 0: an unacknowledged answer would otherwise wait in the session, and go to
            // whoever takes over the client id (claims are shared by whole fleets).
            let answer = crate::provision::answer(
                &self.shared,
                &self.account,
                &req,
                format,
                &message.payload,
                crate::provision::Asker {
                    certificate: self.certificate.as_ref().map(|c| c.as_str()),
                    client_id: &self.client_id,
                },
            );
            let own = match answer {
                crate::provision::Answer::Now(ok, doc) => {
                    vec![provisioning_answer(&message.topic, ok, doc)]
                }
                // The template's pre-provisioning hook decides first (up to 5 s): the answer
                // goes to this connection alone when it has, while the connection goes on.
                crate::provision::Answer::Later(pending) => {
                    let (shared, account) = (self.shared.clone(), self.account.clone());
                    let (client_id, epoch) = (self.client_id.clone(), self.epoch);
                    let topic = message.topic.clone();
                    tokio::spawn(async move {
                        let (ok, doc) = pending.run(&shared).await;
                        let mut d = provisioning_answer(&topic, ok, doc);
                        // The answer may be the device's only copy of what it was given (the
                        // token is spent): a full queue is waited out for a while (10 s), not
                        // a reason to drop it.
                        for _ in 0..200 {
                            match shared
                                .broker
                                .deliver_to_connection(&account, &client_id, epoch, d)
                            {
                                sekisho_broker::Direct::Delivered => return,
                                sekisho_broker::Direct::Full(back) => {
                                    d = back;
                                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                                }
                                sekisho_broker::Direct::Gone => {
                                    tracing::info!(%account, %client_id, "provisioning answer not delivered: the connection is gone");
                                    return;
                                }
                            }
                        }
                        tracing::warn!(%account, %client_id, "provisioning answer not delivered: the connection's queue stayed full for 10 s");
                    });
                    Vec::new()
                }
            };
            return Ok(Published { ticket: 0, own });
        }
        let routed = self
            .shared
            .broker
            .publish_from_client(&self.account, message.clone(), now)?;
        // A request to the shadow service is a message like any other, answered after it is
        // routed (so a subscriber of the request topic sees it before the answer).
        self.shared
            .shadows
            .on_publish(&self.account, &message.topic, &message.payload);
        let mut own = Vec::new();
        // A jobs request is answered to this connection only, whether it subscribed or not.
        if let Some((thing, req)) = crate::jobs::parse_topic(&message.topic) {
            let (ok, doc) = crate::jobs::answer(
                &self.shared,
                &self.account,
                thing,
                &req,
                &message.payload,
                sekisho_registry::now_secs(),
            );
            let topic = format!(
                "{}/{}",
                message.topic,
                if ok { "accepted" } else { "rejected" }
            );
            own.push(sekisho_broker::Delivery {
                message: Arc::new(crate::jobs::message(topic, &doc, message.qos)),
                qos: message.qos,
                retain: false,
                resend: None,
                seq: 0,
                shared: false,
            });
        }
        for b in routed.blocked {
            if b.session == self.session {
                // Our own subscription: the session writes it now rather than wait on itself.
                self.shared.broker.note_blocked(true);
                own.push(b.delivery);
            } else {
                self.pending.push(b);
            }
        }
        Ok(Published {
            ticket: routed.ticket,
            own,
        })
    }

    fn subscribe(&mut self, filter: &str, options: SubscriptionOptions) -> (bool, u64) {
        let (new, ticket, mark) =
            self.shared
                .broker
                .subscribe_marked(&self.account, self.session, filter, options);
        self.interest_mark = self.interest_mark.max(mark);
        (new, ticket)
    }

    fn unsubscribe(&mut self, filter: &str) -> (bool, u64) {
        self.shared
            .broker
            .unsubscribe(&self.account, self.session, filter)
    }

    fn subscription_count(&mut self) -> usize {
        self.shared
            .broker
            .subscription_count(&self.account, self.session)
    }

    fn admit_subscriptions(&mut self, n: u32, now: Instant) -> bool {
        self.shared
            .broker
            .admit_subscriptions(&self.account, n, now)
    }

    fn retained_for(&mut self, filter: &str, now: Instant) -> Option<Arc<Message>> {
        self.shared.broker.retained_for(&self.account, filter, now)
    }

    fn acked(&mut self, seq: u64) {
        self.shared
            .broker
            .acked(&self.account, &self.client_id, seq);
    }

    fn throttled(&mut self, why: Throttled) {
        self.shared.broker.stats.throttled(why);
    }

    fn subscriptions_changed(&mut self, subscribed: bool, filters: &[String]) {
        events::subscriptions(
            &self.shared.broker,
            &self.event_source(),
            subscribed,
            filters,
        );
    }

    fn connect_failed(&mut self) {
        events::connect_failed(
            &self.shared.broker,
            &self.event_source(),
            &self.peer.ip().to_string(),
            "AUTHORIZATION_FAILED",
        );
    }

    fn timestamp_ms(&mut self) -> u64 {
        events::now_ms()
    }
}

/// A provisioning answer for the request on `topic`: at QoS 0, to the requester only.
fn provisioning_answer(topic: &str, ok: bool, doc: bytes::Bytes) -> sekisho_broker::Delivery {
    let topic = format!("{topic}/{}", if ok { "accepted" } else { "rejected" });
    sekisho_broker::Delivery {
        message: Arc::new(crate::jobs::message_bytes(topic, doc, QoS::AtMostOnce)),
        qos: QoS::AtMostOnce,
        retain: false,
        resend: None,
        seq: 0,
        shared: false,
    }
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

/// Waits until journal `ticket` is durable; false if storage failed.
async fn durable(shared: &Shared, ticket: u64) -> bool {
    ticket == 0 || shared.broker.durable_until(ticket).await
}

/// Serves one MQTT connection until it ends.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut stream: S,
    info: ConnInfo,
) {
    let _live = shared.serving();
    // Everything before the session is active runs in its own allocation, freed when the
    // session starts: the connection's task keeps its size for the connection's life, so it
    // holds only what the session needs.
    let Some((mut session, mut port, mut attached)) =
        Box::pin(open(&shared, &mut stream, &info)).await
    else {
        return;
    };
    let end = run(&shared, &mut stream, &mut session, &mut port, &mut attached).await;
    Box::pin(finish(&shared, end, &mut stream, session, port, attached)).await;
}

/// CONNECT within its deadline, AWS's rules, the principal and its authorization, and the
/// broker session: the active session, or `None` when the connection was refused or dropped
/// (the refusal written).
async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    stream: &mut S,
    info: &ConnInfo,
) -> Option<(Session, Port, Attached)> {
    let mut hs = Handshake::new(&shared.session, Instant::now());
    let step = loop {
        match hs.poll(&shared.session, Instant::now()) {
            HandshakeStep::Wait => {}
            other => break other,
        }
        let deadline = tokio::time::Instant::from(hs.deadline());
        match tokio::time::timeout_at(deadline, stream.read_buf(hs.read_buf())).await {
            Ok(Ok(0)) | Ok(Err(_)) => break HandshakeStep::Drop("closed before CONNECT"),
            Ok(Ok(_)) | Err(_) => {}
        }
    };
    let (connect, rbuf) = match step {
        HandshakeStep::Connect(c, rest) => (c, rest),
        HandshakeStep::Refuse(mut out) => {
            tracing::info!(peer = %info.peer, "unsupported MQTT protocol level");
            write_all(stream, &mut out).await;
            return None;
        }
        HandshakeStep::Drop(why) => {
            tracing::info!(peer = %info.peer, why, "connection dropped before CONNECT");
            return None;
        }
        HandshakeStep::Wait => return None,
    };
    // Custom authentication: the account's authorizer decides on the CONNECT's username and
    // password before anything else is looked at.
    let mut custom = None;
    if let Some(how) = &info.custom {
        let decided = match how {
            crate::custom_auth::CustomAuth::Decided(d) => Ok((**d).clone()),
            crate::custom_auth::CustomAuth::AtConnect => {
                crate::custom_auth::connect(
                    shared,
                    info.account.as_str(),
                    connect.username.as_deref(),
                    connect.password.as_deref(),
                    &connect.client_id,
                    info.server_name.clone(),
                )
                .await
            }
        };
        match decided {
            Ok(d) => custom = Some(d),
            Err(refused) => {
                let code = match refused {
                    crate::custom_auth::Refused::NoAuthorizer => {
                        sekisho_mqtt::reason::BAD_USER_NAME_OR_PASSWORD
                    }
                    crate::custom_auth::Refused::Denied(_) => sekisho_mqtt::reason::NOT_AUTHORIZED,
                    crate::custom_auth::Refused::Busy => sekisho_mqtt::reason::SERVER_BUSY,
                };
                let refusal = Refusal {
                    version: connect.version,
                    code,
                    why: format!("custom authentication: {refused:?}"),
                };
                tracing::info!(peer = %info.peer, code = refusal.code, why = %refusal.why, "CONNECT refused");
                write_all(stream, &mut refusal.connack()).await;
                return None;
            }
        }
    }
    let version = connect.version;
    match accept(shared, connect, info, custom.as_ref()) {
        Ok((admission, mut port)) => {
            port.reauth = custom.map(|(c, d)| Box::new((c, d.refresh_after)));
            // In a cluster, the client id is claimed cluster-wide before the session attaches.
            // A CONNECT asks who had the client id before: a session to resume may be there,
            // and a clean start discards it. A provisioning claim is refused if another node
            // had it (the claim would end that device's connection, as on one node).
            let previous = if port.provisioning_claim {
                sekisho_broker::peers::Previous::Refuse
            } else {
                sekisho_broker::peers::Previous::Tell
            };
            let resumes = !admission.clean_start();
            let claim = match shared.claims.get() {
                Some(claims) => match claims
                    .claim(
                        &port.account,
                        &port.client_id,
                        previous,
                        admission.session_expiry,
                        Some(testament(&port, &admission)),
                    )
                    .await
                {
                    Ok(claimed) => {
                        if let Some(from) = &claimed.previous {
                            if resumes {
                                // The session there is newer than any here.
                                if let Some(moved) = claims
                                    .handover(from, &port.account, &port.client_id, claimed.number)
                                    .await
                                {
                                    if let Some(peers) = shared.broker.peers() {
                                        peers.interest_done(moved.mark).await;
                                    }
                                    tracing::info!(client_id = %port.client_id, from = %from, queued = moved.queued, "session moved here from another node");
                                }
                            } else {
                                claims.discard(
                                    from,
                                    &port.account,
                                    &port.client_id,
                                    claimed.number,
                                );
                            }
                        }
                        Some((claims, claimed.number))
                    }
                    Err(e) => {
                        let (code, why) = match e {
                            sekisho_broker::peers::ClaimError::Refused(why) => {
                                (sekisho_mqtt::reason::NOT_AUTHORIZED, why)
                            }
                            sekisho_broker::peers::ClaimError::Unavailable(why) => {
                                (sekisho_mqtt::reason::SERVER_UNAVAILABLE, why)
                            }
                        };
                        let refusal = Refusal {
                            version,
                            code,
                            why: format!("client id not claimed in the cluster: {why}"),
                        };
                        tracing::info!(peer = %info.peer, code = refusal.code, why = %refusal.why, "CONNECT refused");
                        write_all(stream, &mut refusal.connack()).await;
                        return None;
                    }
                },
                None => None,
            };
            let (session, attached) = attach(shared, admission, rbuf, &mut port, info);
            if let Some((claims, n)) = claim {
                claims.attached(&port.account, &port.client_id, n, attached.epoch);
            }
            Some((session, port, attached))
        }
        Err(refusal) => {
            tracing::info!(peer = %info.peer, code = refusal.code, why = %refusal.why, "CONNECT refused");
            write_all(stream, &mut refusal.connack()).await;
            None
        }
    }
}

/// Applies AWS's CONNECT rules, makes the principal and authorizes the connection.
fn accept(
    shared: &Arc<Shared>,
    connect: Box<sekisho_mqtt::Connect>,
    info: &ConnInfo,
    custom: Option<&(
        crate::custom_auth::Credentials,
        sekisho_functions::authorizer::Decision,
    )>,
) -> Result<(Admission, Port), Refusal> {
    let version = connect.version;
    let mut admission = sekisho_session::admit(
        connect,
        &shared.session,
        info.endpoint.private.is_some(),
        || format!("sekisho-{}", uuid::Uuid::new_v4().simple()),
    )?;
    let client_id = admission.client_id.clone();
    let made = match (&info.caller, custom) {
        (_, Some((c, d))) => Principal::custom(
            shared.registry.clone(),
            &info.account,
            (c.authorizer.as_str(), c.created),
            &d.principal_id,
            &d.policies,
            Some(&client_id),
            Some(info.peer.ip()),
            info.endpoint.private.as_ref(),
            sekisho_registry::now_secs() + f64::from(d.disconnect_after),
        ),
        (Some(caller), None) => Principal::iam(
            shared.registry.clone(),
            (**caller).clone(),
            Some(&client_id),
            Some(info.peer.ip()),
            info.endpoint.private.as_ref(),
        ),
        (None, None) => match &info.certificate {
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
    let mut principal = made.map_err(|e| Refusal {
        version,
        code: sekisho_mqtt::reason::NOT_AUTHORIZED,
        why: e.to_string(),
    })?;
    principal.ctx.connect_attributes = admission.connect_attributes.clone();
    let mut provisioning_claim = false;
    // A provisioning claim (CreateProvisioningClaim) may connect with any client id, but not
    // with one whose session is someone else's: it would disconnect that device and,
    // resuming its persistent session, swallow its queued messages (the claim may not receive
    // them). A claim never leaves a session behind (its sessions end with their connection),
    // so a session of its client id is another's unless the claim itself is connected there
    // now (a reconnect that takes over its own half-open connection).
    if let Some(certificate) = &info.certificate
        && info.caller.is_none()
        && shared
            .registry
            .describe_certificate(&info.account, certificate.as_str())
            .is_ok_and(|c| c.claim_template.is_some())
    {
        admission.session_expiry = Duration::ZERO;
        provisioning_claim = true;
        if shared.broker.has_session(&info.account, &client_id)
            && !shared.connected_with(&info.account, certificate.as_str(), &client_id)
        {
            return Err(Refusal {
                version,
                code: sekisho_mqtt::reason::NOT_AUTHORIZED,
                why: "a provisioning claim may not take over another's session".into(),
            });
        }
    }
    let mut port = Port {
        shared: shared.clone(),
        principal,
        account: info.account.clone(),
        client_id,
        session: 0,
        session_identifier: uuid::Uuid::new_v4().to_string(),
        peer: info.peer,
        certificate: info.certificate.clone(),
        pending: Vec::new(),
        reauth: None,
        epoch: 0,
        interest_mark: 0,
        provisioning_claim,
    };
    let admission = admission.authorize(&mut port, Instant::now())?;
    Ok((admission, port))
}

/// Attaches the connection to its broker session; the session's CONNACK is in its output.
fn attach(
    shared: &Shared,
    admission: Admission,
    rbuf: BytesMut,
    port: &mut Port,
    info: &ConnInfo,
) -> (Session, Attached) {
    let now = Instant::now();
    let mut attached = shared.broker.connect(
        &port.account,
        &port.client_id,
        admission.clean_start(),
        admission.session_expiry,
        now,
    );
    port.session = attached.session;
    port.epoch = attached.epoch;
    shared.index_add(
        &port.account,
        &crate::index_key(&port.principal),
        &port.client_id,
        attached.epoch,
        port.principal.iam_caller(),
    );
    // A WebSocket connection ends after 24 hours, or when its credentials expire if sooner; a
    // custom authorizer's connection when the authorizer said.
    let at = |e: f64| now + Duration::from_secs_f64((e - sekisho_registry::now_secs()).max(0.0));
    let websocket = info.caller.as_ref().map(|c| {
        let max = now + WEBSOCKET_MAX;
        c.expiration.map(at).map_or(max, |e| e.min(max))
    });
    let custom = port.principal.disconnect_at().map(at);
    let deadline = match (websocket, custom) {
        (Some(w), Some(c)) => Some(w.min(c)),
        (w, c) => w.or(c),
    };
    let t = shared.broker.throttles(&port.account);
    let rates = Rates {
        publishes: t.publishes_per_connection,
        bytes: t.bytes_per_connection,
        replay: t.replay_per_second,
        shared_replay: t.shared_replay_per_second,
    };
    let attachment = Attachment {
        session: attached.session,
        session_present: attached.session_present,
        replay: std::mem::take(&mut attached.replay),
        ticket: attached.ticket,
    };
    let session_present = attachment.session_present;
    let session = Session::new(
        shared.session.clone(),
        admission,
        attachment,
        rbuf,
        rates,
        deadline,
        now,
    );
    tracing::debug!(client_id = %port.client_id, account = %port.account, session_present, "connected");
    events::connected(
        &shared.broker,
        &port.event_source(),
        &port.peer.ip().to_string(),
    );
    (session, attached)
}

/// Writes what the session has to say once what it acknowledges is durable, after the
/// connection's blocked deliveries found room (or were given up).
async fn flush<S: AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    session: &mut Session,
    port: &mut Port,
) -> Result<(), End> {
    port.wait_for_room().await;
    // In a cluster, a SUBACK goes out once the other nodes route this node what it matches.
    if port.interest_mark > 0 {
        if let Some(p) = shared.broker.peers() {
            let _ = tokio::time::timeout(INTEREST_WAIT, p.interest_done(port.interest_mark)).await;
        }
        port.interest_mark = 0;
    }
    if !durable(shared, session.take_ticket()).await {
        tracing::error!(client_id = %port.client_id, "storage failed; acknowledgements withheld");
        session.withhold();
        return Err(End::Shutdown);
    }
    if !write_all(stream, session.transmit()).await {
        return Err(End::ConnectionLost);
    }
    Ok(())
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    session: &mut Session,
    port: &mut Port,
    attached: &mut Attached,
) -> End {
    let mut shutdown = shared.shutdown.clone();
    // Packets already buffered behind CONNECT.
    if let Err(e) = session.drain(Instant::now(), port) {
        return e;
    }
    // One lazy timer for every deadline of the session: armed for the earliest, re-armed
    // when it fires, never touched per packet.
    let timer = tokio::time::sleep_until(session.poll_timeout(Instant::now()).into());
    tokio::pin!(timer);
    // A custom authorizer is asked again when it said, while the connection goes on.
    let reauth = port.reauth.take();
    let account = port.account.clone();
    let every = reauth.as_ref().map_or(0, |r| r.1);
    let refresh = reauthenticate(shared, account.as_str(), reauth.as_deref(), every);
    tokio::pin!(refresh);
    loop {
        if let Err(e) = flush(shared, stream, session, port).await {
            return e;
        }
        let next = tokio::time::Instant::from(session.poll_timeout(Instant::now()));
        if next < timer.deadline() {
            timer.as_mut().reset(next);
        }
        let can_deliver = session.can_deliver();
        tokio::select! {
            biased;
            k = &mut attached.kick => {
                return match k {
                    Ok(Kick::TakenOver) => End::TakenOver,
                    Ok(Kick::Shutdown) => End::Shutdown,
                    Ok(Kick::Adopted) => End::Adopted,
                    Ok(Kick::Administrative) | Err(_) => End::Administrative,
                };
            }
            _ = shutdown.changed() => return End::Shutdown,
            // Before reads and deliveries: a connection that always has one or the other
            // ready would otherwise never reach its deadlines.
            _ = &mut timer => {
                let now = Instant::now();
                if let Err(e) = session.on_timeout(now, port) {
                    return e;
                }
                timer.as_mut().reset(session.poll_timeout(now).into());
            }
            r = &mut refresh => {
                // The same principal with the policies answered now. Busy functions are asked
                // again soon, the connection keeping what it has meanwhile (until its time is
                // over). Anything else (a refusal, a failure, another principal) ends the
                // connection, and its principal may not act again, not even for its will.
                let refreshed = match r {
                    Err(crate::custom_auth::Refused::Busy) => Ok(BUSY_RETRY),
                    r => r.map_err(|e| format!("{e:?}")).and_then(|d| {
                        port.principal
                            .refresh_custom(&d.principal_id, &d.policies)
                            .map(|()| d.refresh_after)
                            .map_err(|e| e.to_string())
                    }),
                };
                match refreshed {
                    Ok(next) => refresh.set(reauthenticate(shared, account.as_str(), reauth.as_deref(), next)),
                    Err(why) => {
                        tracing::info!(client_id = %port.client_id, %why, "custom authorizer refused on refresh; disconnecting");
                        port.principal.revoke_custom();
                        return End::AuthError;
                    }
                }
            }
            r = stream.read_buf(session.read_buf()) => {
                let n = match r {
                    Ok(0) | Err(_) => return End::ConnectionLost,
                    Ok(n) => n,
                };
                // AWS's 512 KiB/s per connection: past it, what was read waits before it is
                // handled (and acknowledged), and nothing more is read meanwhile.
                let wait = session.on_read(n, Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                if let Err(e) = session.drain(Instant::now(), port) {
                    return e;
                }
            }
            d = attached.rx.recv(), if can_deliver => {
                let Some(d) = d else { return End::Administrative };
                let now = Instant::now();
                if let Err(e) = session.deliver(d, now, port) {
                    return e;
                }
                // Batch what is already queued, within the in-flight window.
                while session.wants_more() {
                    match attached.rx.try_recv() {
                        Ok(d) => if let Err(e) = session.deliver(d, now, port) { return e; },
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

/// How soon a custom authorizer whose function was busy at a refresh is asked again, seconds.
const BUSY_RETRY: u32 = 5;

/// After `after` seconds, asks a custom authorizer again what it decided for a connection
/// (never, for a connection that is not a custom authorizer's).
async fn reauthenticate(
    shared: &Shared,
    account: &str,
    reauth: Option<&(crate::custom_auth::Credentials, u32)>,
    after: u32,
) -> Result<sekisho_functions::authorizer::Decision, crate::custom_auth::Refused> {
    let Some((credentials, _)) = reauth else {
        return std::future::pending().await;
    };
    tokio::time::sleep(Duration::from_secs(u64::from(after))).await;
    crate::custom_auth::again(shared, account, credentials).await
}

async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    end: End,
    stream: &mut S,
    session: Session,
    mut port: Port,
    attached: Attached,
) {
    let mut closed = session.close(end, Instant::now(), &mut port);
    // Whatever the output acknowledges (a PUBACK read in the same packet burst as the error
    // that ends the connection) goes out only once durable, after the publisher's blocked
    // deliveries found room or were given up.
    port.wait_for_room().await;
    if durable(shared, closed.ticket).await {
        write_all(stream, &mut closed.out).await;
    }
    let _ = stream.shutdown().await;
    // Unacknowledged QoS 1 deliveries, sent or still waiting in the queue, go back to the
    // session under the same lock that detaches this connection ([MQTT-4.4.0-1]).
    shared.broker.disconnect(
        &port.account,
        attached.session,
        attached.epoch,
        closed.expiry,
        std::mem::take(&mut closed.unacked),
        Some(attached.rx),
        Instant::now(),
    );
    shared.index_remove(
        &port.account,
        &crate::index_key(&port.principal),
        &port.client_id,
        attached.epoch,
    );
    // A delayed will of a certificate principal waits: in a cluster, its claim keeps it, so
    // that another node publishes it if this one dies first.
    let waits = closed
        .will
        .take()
        .and_then(|w| publish_will(shared, &port, w, attached.epoch));
    if let Some(claims) = shared.claims.get() {
        claims.ended(&port.account, &port.client_id, attached.epoch, waits);
    }
    // The deadline a custom authorizer set has its own reason.
    let reason = match end {
        End::Expired
            if port
                .principal
                .disconnect_at()
                .is_some_and(|d| sekisho_registry::now_secs() + 1.0 >= d) =>
        {
            "CUSTOMAUTH_TTL_EXPIRATION"
        }
        _ => end.lifecycle(),
    };
    tracing::debug!(client_id = %port.client_id, reason, "disconnected");
    // An adopted connection's event went out from the node that adopted it.
    if end != End::Adopted {
        events::disconnected(&shared.broker, &port.event_source(), reason);
    }
}

/// What the cluster publishes for this connection if this node dies while it is connected.
fn testament(port: &Port, admission: &Admission) -> sekisho_broker::peers::Testament {
    let src = port.event_source();
    sekisho_broker::peers::Testament {
        session_identifier: src.session_identifier.to_string(),
        principal: src.principal.to_string(),
        thing_name: src.thing_name.map(str::to_string),
        certificate: port.certificate.as_ref().map(|c| c.to_string()),
        will: admission.will(),
        connect_attributes: admission.connect_attributes.clone(),
        will_due_ms: None,
    }
}

/// Publishes what the connections of a dead node of the cluster left: their disconnection
/// events, and their wills (authorized with their certificates' policies as they are now,
/// without the connection's source address or VPC endpoint, as a will stored across a
/// restart is).
#[derive(Debug)]
pub struct Orphans(pub Arc<Shared>);

impl sekisho_broker::peers::Orphans for Orphans {
    fn disconnected(&self, account: &str, client_id: &str, t: &sekisho_broker::peers::Testament) {
        let src = events::EventSource {
            account,
            client_id,
            thing_name: t.thing_name.as_deref(),
            session_identifier: &t.session_identifier,
            principal: &t.principal,
        };
        events::disconnected(&self.0.broker, &src, End::Adopted.lifecycle());
    }

    fn will(&self, account: &str, client_id: &str, t: &sekisho_broker::peers::Testament) {
        let (Some(certificate), Some((_, will))) = (&t.certificate, &t.will) else {
            return;
        };
        let shared = &self.0;
        let made = Principal::certificate(
            shared.registry.clone(),
            &AccountId::new(account.to_string()),
            &CertificateId::new(certificate.to_string()),
            Some(&ClientId::new(client_id.to_string())),
            None,
            None,
        );
        let mut principal = match made {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(client_id, error = %e, "a dead node's will: its certificate is no longer usable; not published");
                return;
            }
        };
        principal.ctx.connect_attributes = t.connect_attributes.clone();
        if !will_allowed(&mut principal, will) {
            tracing::info!(
                client_id,
                "a dead node's will is no longer authorized; not published"
            );
            return;
        }
        let message = Message::from_will(will, Instant::now(), events::now_ms());
        tokio::spawn(publish_now(
            shared.broker.clone(),
            account.to_string(),
            message,
        ));
    }
}

/// Whether `principal` may still publish `will` (its credentials hold, and its policies allow
/// the topic, and retaining it if it is retained).
fn will_allowed(principal: &mut Principal, will: &Message) -> bool {
    principal.refresh().is_ok()
        && principal.allowed("iot:publish", "topic", &will.topic)
        && (!will.retain || principal.allowed("iot:retainpublish", "topic", &will.topic))
}

/// Publishes a will in `account`, waiting (as a publisher does) for room at slow subscribers.
async fn publish_now(broker: Arc<sekisho_broker::Broker>, account: String, message: Message) {
    if let Ok(routed) = broker.publish(&account, Arc::new(message), Instant::now()) {
        sekisho_broker::wait_for_room(
            &broker,
            &account,
            routed.blocked,
            tokio::time::Instant::now(),
        )
        .await;
    }
}

/// Publishes a will the session authorized when the connection ended: now, or when its delay
/// is over (held by the broker meanwhile, stored for a certificate principal, and cancelled by
/// a connection of the client id). Returns what waits for another node to publish if this one
/// dies first: a certificate principal's delayed will.
fn publish_will(
    shared: &Arc<Shared>,
    port: &Port,
    w: DueWill,
    epoch: u64,
) -> Option<sekisho_broker::peers::Testament> {
    let now = Instant::now();
    if w.at <= now {
        let m = Message::from_will(&w.template, now, events::now_ms());
        tokio::spawn(publish_now(
            shared.broker.clone(),
            port.account.to_string(),
            m,
        ));
        return None;
    }
    // Authorized again when it is sent: the certificate, CA or credentials may be revoked, or
    // the policy changed, during the delay.
    let Ok(later) = port.principal.fresh() else {
        return None;
    };
    let waits = port.certificate.as_ref().map(|c| {
        let src = port.event_source();
        let delay = w.at.saturating_duration_since(now);
        sekisho_broker::peers::Testament {
            session_identifier: src.session_identifier.to_string(),
            principal: src.principal.to_string(),
            thing_name: src.thing_name.map(str::to_string),
            certificate: Some(c.to_string()),
            will: Some((delay, w.template.clone())),
            connect_attributes: later.ctx.connect_attributes.clone(),
            will_due_ms: Some(events::now_ms().saturating_add(delay.as_millis() as u64)),
        }
    });
    let mut will = DelayedWill {
        id: 0,
        account: port.account.to_string(),
        client_id: port.client_id.to_string(),
        certificate: port.certificate.as_ref().map(|c| c.to_string()),
        epoch,
        at: w.at,
        template: w.template,
        cancelled: None,
    };
    // None: a newer connection of the client id (one that took the session over while this
    // one was ending) has cancelled it already.
    will.cancelled = shared.broker.defer_will(&mut will);
    if will.cancelled.is_some() && schedule_will(shared.clone(), will, later) {
        waits
    } else {
        None
    }
}

/// Sends a delayed will when it is due, unless a connection of its client id cancelled it
/// meanwhile ([MQTT-3.1.3-9]) or its principal may no longer publish it. Its bytes count
/// against the account's offline quota while it waits, as queued messages do. False when it
/// was dropped at once (cancelled already, or the quota is full).
fn schedule_will(shared: Arc<Shared>, mut will: DelayedWill, mut principal: Principal) -> bool {
    let broker = shared.broker.clone();
    let Some(mut cancelled) = will.cancelled.take() else {
        broker.claim_will(&will);
        return false;
    };
    let Some(reservation) = broker.reserve_offline(&will.account, weight(&will.template)) else {
        tracing::info!(client_id = %will.client_id, "offline quota full; delayed will dropped");
        broker.claim_will(&will);
        return false;
    };
    // In a cluster, a certificate's delayed will is also on its claim, for another node to
    // publish if this one dies first: it is taken off the claim before it is published here,
    // and not published here if another node adopted it (this node was cut off or stalled).
    let claims = shared
        .claims
        .get()
        .cloned()
        .filter(|_| will.certificate.is_some());
    let due_ms = events::now_ms().saturating_add(
        will.at
            .saturating_duration_since(Instant::now())
            .as_millis() as u64,
    );
    tokio::spawn(async move {
        let _reservation = reservation;
        let mut shutdown = shared.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(will.at.into()) => {}
            // A connection of the client id: the will, its bytes and its quota go now.
            _ = &mut cancelled => return,
            // Kept in storage for the next start (in a cluster, on its claim too: a node that
            // adopts it before this one is back publishes it, and this one then does not).
            _ = shutdown.changed() => return,
        }
        if !broker.claim_will(&will) {
            return;
        }
        if let Some(c) = &claims
            && !c
                .reclaim_will(&will.account, &will.client_id, due_ms, false)
                .await
        {
            tracing::info!(client_id = %will.client_id, "a delayed will was adopted by another node (or its device came back); not published here");
            return;
        }
        if !will_allowed(&mut principal, &will.template) {
            tracing::info!(client_id = %will.client_id, "delayed will no longer authorized; not published");
            return;
        }
        let message = will.message(Instant::now(), events::now_ms());
        publish_now(broker, will.account.clone(), message).await;
    });
    true
}

/// Schedules the delayed wills stored before a restart, each authorized with its certificate's
/// policies as they are now (without the connection's source address or VPC endpoint, which
/// are not stored: a policy that needs them denies the will).
pub(crate) fn resume_wills(shared: &Arc<Shared>) {
    for will in shared.broker.take_restored_wills() {
        let Some(cert) = will.certificate.clone() else {
            shared.broker.claim_will(&will);
            continue;
        };
        let made = Principal::certificate(
            shared.registry.clone(),
            &AccountId::new(will.account.clone()),
            &CertificateId::new(cert),
            Some(&ClientId::new(will.client_id.clone())),
            None,
            None,
        );
        match made {
            Ok(mut principal) => {
                // What its connection declared (a delayed will needs a persistent session).
                principal.ctx.connect_attributes =
                    vec!["PersistentConnect".to_string(), "LastWill".to_string()];
                match shared.claims.get().cloned() {
                    // In a cluster, another node may have adopted it (this node died) and
                    // published it: only if its claim still carries it is it this node's.
                    Some(claims) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            let due_ms = events::now_ms().saturating_add(
                                will.at
                                    .saturating_duration_since(Instant::now())
                                    .as_millis() as u64,
                            );
                            if claims
                                .reclaim_will(&will.account, &will.client_id, due_ms, true)
                                .await
                            {
                                schedule_will(shared, will, principal);
                            } else {
                                tracing::info!(client_id = %will.client_id, "a stored delayed will was adopted by another node (or its device came back); not published here");
                                shared.broker.claim_will(&will);
                            }
                        });
                    }
                    None => {
                        schedule_will(shared.clone(), will, principal);
                    }
                }
            }
            Err(e) => {
                tracing::info!(client_id = %will.client_id, error = %e, "stored will's certificate no longer usable; not published");
                shared.broker.claim_will(&will);
            }
        }
    }
}
