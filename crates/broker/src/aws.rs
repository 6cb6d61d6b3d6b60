//! AWS IoT's own rules on top of MQTT: topic size and depth, reserved `$` topics, and the
//! per-connection quotas. Each rejection is one variant, so the compatibility table can be
//! generated from this enum.

use sekisho_mqtt::reason;

/// AWS IoT message broker quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwsLimits {
    /// Client id bytes.
    pub max_client_id: usize,
    /// Topic bytes.
    pub max_topic: usize,
    /// Forward slashes in a topic or filter.
    pub max_slashes: usize,
    /// Payload bytes per PUBLISH.
    pub max_payload: usize,
    /// Filters per SUBSCRIBE.
    pub max_filters_per_subscribe: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Unacknowledged outbound QoS 1 messages per connection.
    pub max_inflight: usize,
    /// Keep-alive bounds in seconds.
    pub keep_alive_min: u16,
    /// Upper keep-alive bound (also used for 0).
    pub keep_alive_max: u16,
    /// Topic aliases a v5 client may use.
    pub topic_alias_max: u16,
    /// Largest session expiry in seconds (v5; 7 days).
    pub max_session_expiry: u32,
    /// Session expiry for MQTT 3.1.1 persistent sessions (1 hour).
    pub default_session_expiry: u32,
    /// Messages kept for an offline persistent session.
    pub max_queued: usize,
}

impl Default for AwsLimits {
    fn default() -> Self {
        AwsLimits {
            max_client_id: 128,
            max_topic: 256,
            max_slashes: 7,
            max_payload: 128 * 1024,
            max_filters_per_subscribe: 8,
            max_subscriptions: 50,
            max_inflight: 100,
            keep_alive_min: 30,
            keep_alive_max: 1200,
            topic_alias_max: 8,
            max_session_expiry: 7 * 24 * 3600,
            default_session_expiry: 3600,
            max_queued: 1000,
        }
    }
}

/// Why AWS IoT refuses a topic, filter or client id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsReject {
    /// Topic longer than 256 bytes.
    #[error("topic is {0} bytes; the limit is 256")]
    TopicTooLong(usize),
    /// More than seven forward slashes.
    #[error("topic has {0} forward slashes; the limit is 7")]
    TooManySlashes(usize),
    /// A `$` topic clients may not use in this direction.
    #[error("reserved topic {0:?} is not available to clients for this operation")]
    ReservedTopic(String),
    /// Payload over 128 KB.
    #[error("payload is {0} bytes; the limit is 131072")]
    PayloadTooLarge(usize),
    /// Client id over 128 bytes or starting with `$`.
    #[error("client id is not valid: {0}")]
    ClientId(String),
    /// More than 8 filters in one SUBSCRIBE.
    #[error("{0} topic filters in one SUBSCRIBE; the limit is 8")]
    TooManyFilters(usize),
    /// More than 50 subscriptions on one connection.
    #[error("the connection has reached 50 subscriptions")]
    TooManySubscriptions,
}

impl AwsReject {
    /// The MQTT 5 reason code AWS answers with.
    pub fn reason_code(&self) -> u8 {
        match self {
            AwsReject::TopicTooLong(_) | AwsReject::TooManySlashes(_) => reason::TOPIC_NAME_INVALID,
            AwsReject::ReservedTopic(_) => reason::NOT_AUTHORIZED,
            AwsReject::PayloadTooLarge(_) => reason::PACKET_TOO_LARGE,
            AwsReject::ClientId(_) => reason::CLIENT_IDENTIFIER_NOT_VALID,
            AwsReject::TooManyFilters(_) | AwsReject::TooManySubscriptions => {
                reason::QUOTA_EXCEEDED
            }
        }
    }
}

/// The slashes that count: the `$aws/rules/{rule}/` prefix and the `$share/{name}/` prefix are
/// not counted.
fn counted_slashes(t: &str) -> usize {
    let t = match t.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
        Some((_, rest)) => rest,
        None => t,
    };
    let t = match t
        .strip_prefix("$aws/rules/")
        .and_then(|r| r.split_once('/'))
    {
        Some((_, rest)) => rest,
        None => t,
    };
    t.matches('/').count()
}

impl AwsLimits {
    /// Size and depth of a topic name or filter.
    pub fn check_topic(&self, t: &str) -> Result<(), AwsReject> {
        if t.len() > self.max_topic {
            return Err(AwsReject::TopicTooLong(t.len()));
        }
        let n = counted_slashes(t);
        if n > self.max_slashes {
            return Err(AwsReject::TooManySlashes(n));
        }
        Ok(())
    }

    /// A client id: at most 128 bytes, not starting with `$`.
    pub fn check_client_id(&self, id: &str) -> Result<(), AwsReject> {
        if id.len() > self.max_client_id {
            return Err(AwsReject::ClientId(format!(
                "{} bytes; the limit is {}",
                id.len(),
                self.max_client_id
            )));
        }
        if id.starts_with('$') {
            return Err(AwsReject::ClientId(
                "client ids starting with '$' are reserved".into(),
            ));
        }
        Ok(())
    }

    /// AWS's keep-alive clamp: 0 or above the maximum → maximum, below the minimum → minimum.
    pub fn clamp_keep_alive(&self, requested: u16) -> u16 {
        if requested == 0 || requested > self.keep_alive_max {
            self.keep_alive_max
        } else {
            requested.max(self.keep_alive_min)
        }
    }
}

fn things_suffix(t: &str) -> Option<&str> {
    let rest = t.strip_prefix("$aws/things/")?;
    let (_thing, suffix) = rest.split_once('/')?;
    Some(suffix)
}

/// Whether a client may publish to reserved topic `t` (any topic not starting with `$` is not
/// reserved).
pub fn may_publish(t: &str) -> bool {
    if !t.starts_with('$') {
        return true;
    }
    // The services' answers and notifications (`/accepted`, `/rejected`, a shadow's delta
    // and documents, jobs' notify topics, streams' data) are theirs alone: a client that
    // could publish them would forge what other clients take for the service's word.
    let answer = t.ends_with("/accepted") || t.ends_with("/rejected");
    if let Some(s) = things_suffix(t) {
        if let Some(op) = s.strip_prefix("shadow/") {
            let op = match op.strip_prefix("name/") {
                Some(named) => named.split_once('/').map_or("", |(_, op)| op),
                None => op,
            };
            return matches!(op, "get" | "update" | "delete");
        }
        if let Some(rest) = s.strip_prefix("jobs/") {
            // `notify`, `notify-next` and `{jobId}/notify-namespace-…` are the service's; a job
            // id may begin with "notify" all the same.
            let levels: Vec<&str> = rest.split('/').collect();
            let notify = matches!(levels.as_slice(), ["notify" | "notify-next"])
                || matches!(levels.as_slice(), [_, n] if n.starts_with("notify-namespace-"));
            return !answer && !notify;
        }
        if let Some(rest) = s.strip_prefix("streams/") {
            let mut levels = rest.split('/').skip(1);
            return matches!(levels.next(), Some("get" | "describe"))
                && matches!(levels.next(), Some("json" | "cbor"))
                && levels.next().is_none();
        }
        return s.starts_with("defender/metrics/") && !answer;
    }
    !answer
        && (t.starts_with("$aws/rules/")
            || t.starts_with("$aws/certificates/create/")
            || t.starts_with("$aws/certificates/create-from-csr/")
            || t.starts_with("$aws/provisioning-templates/"))
}

/// Whether `t` is a fleet provisioning request topic: answered only to an MQTT client that
/// publishes it, never routed (its payload carries CSRs and ownership tokens), so it is no
/// topic for an HTTPS publish or a will.
pub fn is_provisioning_request(t: &str) -> bool {
    t.starts_with("$aws/certificates/create/")
        || t.starts_with("$aws/certificates/create-from-csr/")
        || t.starts_with("$aws/provisioning-templates/")
}

/// Whether a client may subscribe to reserved filter `f` (shared prefix removed).
pub fn may_subscribe(f: &str) -> bool {
    if !f.starts_with('$') {
        return true;
    }
    if f.starts_with("$aws/rules/") {
        return false;
    }
    f.starts_with("$aws/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_limits_at_n_and_n_plus_1() {
        let l = AwsLimits::default();
        assert!(l.check_topic(&"a".repeat(256)).is_ok());
        assert_eq!(
            l.check_topic(&"a".repeat(257)),
            Err(AwsReject::TopicTooLong(257))
        );
        assert!(l.check_topic("a/b/c/d/e/f/g/h").is_ok());
        assert_eq!(
            l.check_topic("a/b/c/d/e/f/g/h/i"),
            Err(AwsReject::TooManySlashes(8))
        );
        assert!(
            l.check_topic("$aws/rules/r/a/b/c/d/e/f/g/h").is_ok(),
            "the Basic Ingest prefix is not counted"
        );
        assert!(
            l.check_topic("$share/g/a/b/c/d/e/f/g/h").is_ok(),
            "the share prefix is not counted"
        );
    }

    #[test]
    fn client_id_at_n_and_n_plus_1() {
        let l = AwsLimits::default();
        assert!(l.check_client_id(&"c".repeat(128)).is_ok());
        assert!(l.check_client_id(&"c".repeat(129)).is_err());
        assert!(l.check_client_id("$x").is_err());
    }

    #[test]
    fn keep_alive_clamp() {
        let l = AwsLimits::default();
        assert_eq!(l.clamp_keep_alive(0), 1200);
        assert_eq!(l.clamp_keep_alive(1201), 1200);
        assert_eq!(l.clamp_keep_alive(1200), 1200);
        assert_eq!(l.clamp_keep_alive(29), 30);
        assert_eq!(l.clamp_keep_alive(30), 30);
        assert_eq!(l.clamp_keep_alive(60), 60);
    }

    #[test]
    fn reserved_topics() {
        assert!(may_publish("a/b"));
        assert!(may_publish("$aws/things/t/shadow/update"));
        assert!(may_publish("$aws/things/t/shadow/name/n/delete"));
        assert!(may_publish("$aws/things/t/jobs/get"));
        assert!(may_publish("$aws/things/t/jobs/j1/update"));
        assert!(may_publish("$aws/things/t/jobs/notify-fw/update"));
        assert!(may_publish("$aws/things/t/jobs/notify-fw/get"));
        assert!(may_publish("$aws/things/t/streams/s1/get/json"));
        assert!(may_publish("$aws/certificates/create/json"));
        assert!(may_publish("$aws/provisioning-templates/p/provision/cbor"));
        // The services' answers and notifications are not the clients' to publish.
        for t in [
            "$aws/things/t/shadow/update/accepted",
            "$aws/things/t/shadow/update/delta",
            "$aws/things/t/shadow/update/documents",
            "$aws/things/t/shadow/get/rejected",
            "$aws/things/t/shadow/name/n/update/delta",
            "$aws/things/t/shadow/name/n",
            "$aws/things/t/shadow/x",
            "$aws/things/t/jobs/notify",
            "$aws/things/t/jobs/notify-next",
            "$aws/things/t/jobs/j1/update/accepted",
            "$aws/things/t/jobs/j1/notify-namespace-x",
            "$aws/things/t/jobs/notify-fw/update/accepted",
            "$aws/things/t/streams/s1/data/json",
            "$aws/things/t/defender/metrics/json/accepted",
            "$aws/certificates/create/json/accepted",
            "$aws/provisioning-templates/p/provision/json/rejected",
        ] {
            assert!(!may_publish(t), "{t}");
        }
        assert!(may_publish("$aws/rules/r/x"));
        assert!(!may_publish("$aws/events/presence/connected/x"));
        assert!(!may_publish("$SYS/x"));
        assert!(may_subscribe("$aws/events/presence/connected/+"));
        assert!(may_subscribe("$aws/things/t/shadow/update/accepted"));
        assert!(!may_subscribe("$SYS/#"));
        assert!(!may_subscribe("$aws/rules/r"));
    }
}
