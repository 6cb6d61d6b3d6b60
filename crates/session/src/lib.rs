//! One MQTT connection's protocol logic, without I/O and without a clock, in the manner of
//! `quinn-proto`: bytes and `now` go in; bytes to write, the next deadline and the way the
//! connection ends come out. The gateway's driver owns the socket, the timers and the broker
//! handle; everything the session asks of its surroundings (authorization, routing, storage
//! tickets) goes through [`Env`], which a test implements in memory.
//!
//! The protocol states are types consumed by value:
//! [`Handshake`] (awaiting CONNECT) → [`Admission`] (CONNECT checked, principal to be made and
//! authorized) → [`Session`] (active) → [`Closed`] (what the driver still has to do: the last
//! bytes, the unacknowledged deliveries to hand back, a will to send at a time).

mod handshake;
mod session;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sekisho_broker::aws::AwsLimits;
use sekisho_broker::throttle::Throttled;
use sekisho_broker::{Delivery, Message, PublishError};
use sekisho_mqtt::{Limits, Properties, SubscriptionOptions, reason};

pub use handshake::{Admission, Handshake, HandshakeStep, Refusal, admit};
pub use session::{Attachment, Closed, DueWill, Rates, Session};

/// Settings every connection of a gateway shares.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// AWS IoT's broker limits (topic sizes, keep-alive bounds, in-flight window...).
    pub aws: AwsLimits,
    /// The codec's bounds (packet size, filters, user properties).
    pub codec: Limits,
    /// How long a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// The keep-alive cap on private (VPC) endpoints, in seconds (AWS: 230).
    pub private_keep_alive_max: u16,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            aws: AwsLimits::default(),
            codec: Limits::default(),
            connect_timeout: CONNECT_TIMEOUT,
            private_keep_alive_max: PRIVATE_KEEP_ALIVE_MAX,
        }
    }
}

/// How long a new connection has to send CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// AWS's keep-alive cap on private endpoints, in seconds.
pub const PRIVATE_KEEP_ALIVE_MAX: u16 = 230;
/// Longest life of a WebSocket connection (AWS: 24 hours).
pub const WEBSOCKET_MAX: Duration = Duration::from_secs(24 * 3600);
/// Longest message expiry interval a message keeps (AWS: 7 days).
pub const MAX_MESSAGE_EXPIRY: u32 = 604_800;
/// Buffers of idle connections are this small; they grow while traffic needs it and shrink
/// back after [`SHRINK_AFTER`] without traffic.
pub const IDLE_BUF: usize = 256;
/// Quiet time after which a connection's buffers shrink.
pub const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// Why a connection ends, as the lifecycle event names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent DISCONNECT (MQTT 5: with reason 0x04, the will goes out).
    ClientDisconnect {
        /// Whether the will is sent anyway.
        will: bool,
    },
    /// The socket closed or failed.
    ConnectionLost,
    /// Silent for 1.5 keep-alives.
    KeepAlive,
    /// Another connection took the client id.
    TakenOver,
    /// The server is shutting down (or its storage failed).
    Shutdown,
    /// An administrative action (DeleteConnection, revocation by the broker).
    Administrative,
    /// The principal's credentials no longer hold.
    AuthError,
    /// An MQTT 3.1.1 client published where it may not.
    Forbidden,
    /// A protocol error, with the MQTT 5 reason code.
    ClientError(u8),
    /// The WebSocket lifetime or the credentials behind it ran out.
    Expired,
    /// In a cluster, another node took the connection for one of a node that died (this
    /// one, cut off from the others long enough to look dead): that node published its
    /// disconnection event and its will already.
    Adopted,
}

impl End {
    /// The `disconnectReason` of the lifecycle event.
    pub fn lifecycle(self) -> &'static str {
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
            End::Adopted => "SERVER_ERROR",
        }
    }

    /// The reason code of the server's MQTT 5 DISCONNECT, if one is sent.
    pub fn disconnect_code(self) -> Option<u8> {
        match self {
            End::ClientDisconnect { .. } | End::ConnectionLost => None,
            End::KeepAlive => Some(reason::KEEP_ALIVE_TIMEOUT),
            End::TakenOver | End::Adopted => Some(reason::SESSION_TAKEN_OVER),
            End::Shutdown => Some(reason::SERVER_SHUTTING_DOWN),
            End::Administrative => Some(reason::ADMINISTRATIVE_ACTION),
            End::AuthError | End::Forbidden => Some(reason::NOT_AUTHORIZED),
            End::Expired => Some(reason::ADMINISTRATIVE_ACTION),
            End::ClientError(c) => Some(c),
        }
    }

    /// Whether the will is published.
    pub fn sends_will(self) -> bool {
        match self {
            End::ClientDisconnect { will } => will,
            End::Adopted => false,
            _ => true,
        }
    }
}

/// What routing one publish gave the session back.
#[derive(Debug, Default)]
pub struct Published {
    /// The journal ticket that must be durable before the PUBACK goes out (0: none).
    pub ticket: u64,
    /// Deliveries to this very session that found its queue full: the session writes them
    /// itself rather than wait on itself. (Other sessions' blocked deliveries stay with the
    /// environment, which waits for room before the driver reads on.)
    pub own: Vec<Delivery>,
}

/// Everything a session asks of its surroundings: the connection's principal, the broker and
/// the lifecycle events. The gateway implements it; tests implement it in memory.
pub trait Env {
    /// Re-checks the principal (revoked certificate, expired credentials, changed policy);
    /// an error ends the connection with `AUTH_ERROR`.
    fn refresh(&mut self) -> Result<(), String>;
    /// Whether the principal may do `action` on the resource of `kind` named `name`.
    fn allowed(&mut self, action: &str, kind: &str, name: &str) -> bool;
    /// AWS's CONNECT rates for this client id and account.
    fn admit_connect(&mut self, now: Instant) -> Result<(), Throttled>;
    /// Whether the account's session quota has room for this client id.
    fn session_allowed(&mut self) -> bool;
    /// Routes a client's publish (the account's inbound rate applies).
    fn publish(&mut self, message: Message, now: Instant) -> Result<Published, PublishError>;
    /// Subscribes; returns whether the filter is new and the journal ticket.
    fn subscribe(&mut self, filter: &str, options: SubscriptionOptions) -> (bool, u64);
    /// Unsubscribes; returns whether it existed and the journal ticket.
    fn unsubscribe(&mut self, filter: &str) -> (bool, u64);
    /// How many subscriptions the session holds.
    fn subscription_count(&mut self) -> usize;
    /// AWS's subscription rate for the account: whether `n` more may subscribe now.
    fn admit_subscriptions(&mut self, n: u32, now: Instant) -> bool;
    /// The retained message a new subscription receives, if any.
    fn retained_for(&mut self, filter: &str, now: Instant) -> Option<Arc<Message>>;
    /// A stored delivery is done with (acknowledged, expired or not receivable).
    fn acked(&mut self, seq: u64);
    /// Counts a throttled operation.
    fn throttled(&mut self, why: Throttled);
    /// Lifecycle event: filters subscribed or unsubscribed.
    fn subscriptions_changed(&mut self, subscribed: bool, filters: &[String]);
    /// Lifecycle event: a CONNECT refused by authorization.
    fn connect_failed(&mut self);
    /// Wall-clock time in epoch milliseconds, stamped on published messages.
    fn timestamp_ms(&mut self) -> u64;
}

/// The MQTT 5 properties a message carries from its publisher to its receivers (message
/// expiry travels separately, as a deadline).
pub fn forwarded(p: &Properties) -> Properties {
    Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..Properties::default()
    }
}
