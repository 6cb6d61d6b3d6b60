//! Lifecycle events on `$aws/events/...`, with AWS's payloads.

use std::sync::Arc;

use bytes::Bytes;
use sekisho_broker::{Broker, Message};
use sekisho_mqtt::{Properties, QoS};
use serde_json::{Value, json};

/// Epoch milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Who an event is about.
#[derive(Debug, Clone)]
pub struct EventSource<'a> {
    /// Account.
    pub account: &'a str,
    /// Client id.
    pub client_id: &'a str,
    /// Exclusively associated thing.
    pub thing_name: Option<&'a str>,
    /// Session id (a UUID per connection).
    pub session_identifier: &'a str,
    /// Certificate id.
    pub principal: &'a str,
}

fn emit(broker: &Broker, src: &EventSource<'_>, topic: String, mut body: Value) {
    // AWS does not deliver lifecycle events for client ids with wildcard characters.
    if src.client_id.contains(['#', '+']) {
        return;
    }
    if let (Some(t), Some(o)) = (src.thing_name, body.as_object_mut()) {
        o.insert("thingName".into(), json!(t));
    }
    let msg = Message {
        topic: topic.into(),
        payload: Bytes::from(body.to_string()),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        origin: None,
        timestamp_ms: now_ms(),
    };
    if let Ok(routed) = broker.publish(src.account, Arc::new(msg), std::time::Instant::now()) {
        // Lifecycle events never wait for slow subscribers.
        for b in routed.blocked {
            broker.give_up(src.account, b.session, b.delivery);
        }
    }
}

/// `$aws/events/presence/connected/{clientId}`.
pub fn connected(broker: &Broker, src: &EventSource<'_>, ip: &str) {
    let body = json!({"clientId": src.client_id, "timestamp": now_ms(), "eventType": "connected",
        "sessionIdentifier": src.session_identifier, "principalIdentifier": src.principal,
        "ipAddress": ip, "versionNumber": 0});
    emit(
        broker,
        src,
        format!("$aws/events/presence/connected/{}", src.client_id),
        body,
    );
}

/// `$aws/events/presence/disconnected/{clientId}`.
pub fn disconnected(broker: &Broker, src: &EventSource<'_>, reason: &str) {
    let body = json!({"clientId": src.client_id, "timestamp": now_ms(), "eventType": "disconnected",
        "sessionIdentifier": src.session_identifier, "principalIdentifier": src.principal,
        "clientInitiatedDisconnect": reason == "CLIENT_INITIATED_DISCONNECT",
        "disconnectReason": reason, "versionNumber": 0});
    emit(
        broker,
        src,
        format!("$aws/events/presence/disconnected/{}", src.client_id),
        body,
    );
}

/// `$aws/events/presence/connect_failed/{clientId}`.
pub fn connect_failed(broker: &Broker, src: &EventSource<'_>, ip: &str, reason: &str) {
    let body = json!({"clientId": src.client_id, "timestamp": now_ms(), "eventType": "connect_failed",
        "connectFailureReason": reason, "principalIdentifier": src.principal,
        "sessionIdentifier": src.session_identifier, "ipAddress": ip});
    emit(
        broker,
        src,
        format!("$aws/events/presence/connect_failed/{}", src.client_id),
        body,
    );
}

/// `$aws/events/subscriptions/subscribed|unsubscribed/{clientId}`.
pub fn subscriptions(broker: &Broker, src: &EventSource<'_>, subscribed: bool, topics: &[String]) {
    if topics.is_empty() {
        return;
    }
    let kind = if subscribed {
        "subscribed"
    } else {
        "unsubscribed"
    };
    let body = json!({"clientId": src.client_id, "timestamp": now_ms(), "eventType": kind,
        "sessionIdentifier": src.session_identifier, "principalIdentifier": src.principal, "topics": topics});
    emit(
        broker,
        src,
        format!("$aws/events/subscriptions/{kind}/{}", src.client_id),
        body,
    );
}

/// `$aws/events/certificates/registered/{caCertificateId}`: just-in-time registration put a
/// certificate in PENDING_ACTIVATION (sent again whenever such a certificate is presented).
/// Timestamps are epoch milliseconds; `registered` is the registration time in epoch seconds.
pub fn certificate_registered(
    broker: &Broker,
    account: &str,
    certificate_id: &str,
    ca_certificate_id: &str,
    registered: f64,
) {
    let body = json!({"certificateId": certificate_id, "caCertificateId": ca_certificate_id,
        "timestamp": now_ms(), "certificateStatus": "PENDING_ACTIVATION", "awsAccountId": account,
        "certificateRegistrationTimestamp": (registered * 1000.0) as u64});
    let msg = Message {
        topic: format!("$aws/events/certificates/registered/{ca_certificate_id}").into(),
        payload: Bytes::from(body.to_string()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        origin: None,
        timestamp_ms: now_ms(),
    };
    if let Ok(routed) = broker.publish(account, Arc::new(msg), std::time::Instant::now()) {
        for b in routed.blocked {
            broker.give_up(account, b.session, b.delivery);
        }
    }
}
