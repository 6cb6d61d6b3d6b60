//! AWS IoT's rate limits as token buckets, on a clock the caller passes in.
//!
//! AWS's values are the defaults ([`Throttles::default`]); each account may have its own
//! (`[limits]` and `[limits.accounts.<id>]`). What exceeding one does is the caller's: a
//! connection discards an inbound publish over its rate (MQTT 5: PUBACK 0x96), delays reading
//! past its byte rate, refuses a CONNECT over the client id's or the account's rate (MQTT 5:
//! CONNACK 0x9F) and a subscription over the account's rate (SUBACK 0x97).

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens a second, at most `burst` saved up. A rate of 0 never limits.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    rate: u32,
    burst: u32,
    /// Tokens, in millionths (integer arithmetic; may go negative for byte debts).
    micro: i64,
    last: Option<Instant>,
}

const MICRO: i64 = 1_000_000;

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Bucket {
        Bucket {
            rate,
            burst: burst.max(1),
            micro: i64::from(burst.max(1)) * MICRO,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let last = *self.last.get_or_insert(now);
        if now > last {
            let gained = now.duration_since(last).as_micros() as i64 * i64::from(self.rate);
            let cap = i64::from(self.burst) * MICRO;
            self.micro = self.micro.saturating_add(gained).min(cap);
            self.last = Some(now);
        }
    }

    /// Whether the bucket has refilled completely by `now` (forgetting it changes nothing).
    pub fn is_full(&mut self, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(now);
        self.micro >= i64::from(self.burst) * MICRO
    }

    /// Takes `n` tokens if there are that many at `now`; false (and nothing taken) if not.
    pub fn take(&mut self, now: Instant, n: u32) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(now);
        let need = i64::from(n) * MICRO;
        if self.micro >= need {
            self.micro -= need;
            true
        } else {
            false
        }
    }

    /// How long from `now` until one token is there (zero if one is).
    pub fn until_next(&mut self, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.micro >= MICRO {
            Duration::ZERO
        } else {
            Duration::from_micros(((MICRO - self.micro) / i64::from(self.rate)).max(1) as u64)
        }
    }

    /// Takes `n` tokens even if that runs into debt; returns how long until the debt is paid
    /// (how long the caller waits before it takes more). For byte rates.
    pub fn spend(&mut self, now: Instant, n: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.micro = self
            .micro
            .saturating_sub((n.min(i64::MAX as u64 / 2) as i64).saturating_mul(MICRO));
        if self.micro >= 0 {
            Duration::ZERO
        } else {
            Duration::from_micros((-self.micro / i64::from(self.rate)) as u64)
        }
    }
}

/// The rate limits of one account, as AWS IoT Core sets them by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttles {
    /// PUBLISH packets a connection may send or receive per second, together (AWS: 100,
    /// inbound and outbound; stored messages sent to a resumed session are paced by
    /// `replay_per_second` instead).
    pub publishes_per_connection: u32,
    /// Bytes a connection may send per second (AWS: 512 KiB; excess is delayed).
    pub bytes_per_connection: u32,
    /// CONNECT attempts per second per client id (AWS: 1).
    pub connects_per_client_id: u32,
    /// CONNECT attempts per second per account (AWS: 500).
    pub connects_per_account: u32,
    /// Subscriptions per second per account (AWS: 500).
    pub subscriptions_per_account: u32,
    /// Inbound publishes per second per account (AWS: 20,000).
    pub publishes_per_account: u32,
    /// Stored messages sent per second to a resumed session, besides live traffic (AWS: 10).
    pub replay_per_second: u32,
    /// Stored messages of shared subscription groups sent per second to a member (AWS: 20).
    pub shared_replay_per_second: u32,
    /// Device Shadow requests per second per thing, all its shadows and both protocols
    /// together (AWS: 20).
    pub shadow_requests_per_thing: u32,
}

impl Default for Throttles {
    fn default() -> Self {
        Throttles {
            publishes_per_connection: 100,
            bytes_per_connection: 512 * 1024,
            connects_per_client_id: 1,
            connects_per_account: 500,
            subscriptions_per_account: 500,
            publishes_per_account: 20_000,
            replay_per_second: 10,
            shared_replay_per_second: 20,
            shadow_requests_per_thing: 20,
        }
    }
}

/// Why something was throttled, as `/metrics` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// A connection's publish rate.
    ConnectionPublishRate,
    /// A client id's CONNECT rate.
    ClientConnectRate,
    /// An account's CONNECT rate.
    AccountConnectRate,
    /// An account's subscription rate.
    AccountSubscribeRate,
    /// An account's inbound publish rate.
    AccountPublishRate,
}

impl Throttled {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [Throttled; 5] = [
        Throttled::ConnectionPublishRate,
        Throttled::ClientConnectRate,
        Throttled::AccountConnectRate,
        Throttled::AccountSubscribeRate,
        Throttled::AccountPublishRate,
    ];

    /// The `reason` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Throttled::ConnectionPublishRate => "connection_publish_rate",
            Throttled::ClientConnectRate => "client_connect_rate",
            Throttled::AccountConnectRate => "account_connect_rate",
            Throttled::AccountSubscribeRate => "account_subscribe_rate",
            Throttled::AccountPublishRate => "account_publish_rate",
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for the virtual clock
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 100);
        for _ in 0..100 {
            assert!(b.take(t0, 1));
        }
        assert!(!b.take(t0, 1), "the 101st in the same instant");
        assert!(!b.take(t0 + Duration::from_millis(9), 1));
        assert!(
            b.take(t0 + Duration::from_millis(10), 1),
            "one token per 10 ms"
        );
        assert!(!b.take(t0 + Duration::from_millis(10), 1));
        // Never more than the burst saved up.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..100 {
            assert!(b.take(later, 1));
        }
        assert!(!b.take(later, 1));
    }

    #[test]
    fn one_per_second() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1, 1);
        assert!(b.take(t0, 1));
        assert!(!b.take(t0 + Duration::from_millis(999), 1));
        assert!(b.take(t0 + Duration::from_millis(1000), 1));
    }

    #[test]
    fn the_next_token_is_announced() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 10);
        assert!(b.take(t0, 10));
        assert_eq!(b.until_next(t0), Duration::from_millis(100));
        assert_eq!(
            b.until_next(t0 + Duration::from_millis(60)),
            Duration::from_millis(40)
        );
        assert_eq!(
            b.until_next(t0 + Duration::from_millis(100)),
            Duration::ZERO
        );
    }

    #[test]
    fn byte_debts_are_paid_in_time() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 1000);
        assert_eq!(b.spend(t0, 1000), Duration::ZERO);
        assert_eq!(b.spend(t0, 500), Duration::from_millis(500));
        assert_eq!(b.spend(t0 + Duration::from_millis(500), 0), Duration::ZERO);
    }

    #[test]
    fn rate_zero_never_limits() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0, 0);
        for _ in 0..10_000 {
            assert!(b.take(t0, 1));
        }
        assert_eq!(b.spend(t0, u64::MAX), Duration::ZERO);
    }
}
