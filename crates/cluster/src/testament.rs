//! A dead node's connections (decision 0012, "When a node dies"): what a claim carries so that
//! another node can publish their disconnection events and wills, and how nodes tell that
//! one of them died. Pure: no sockets, no clock of its own.
//!
//! A claim's payload is `{run id:x} {node name}`, then, for a connection that holds the claim
//! now, a line of JSON (its [`Testament`] and how long its session lives) and its will as the
//! MQTT 5 PUBLISH our codec writes. A claim without the second part holds nothing to adopt:
//! the connection ended (the node wrote it at the disconnection), or another node adopted it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sekisho_broker::Message;
use sekisho_broker::peers::Testament;
use serde_json::{Value, json};

/// How long a node's heartbeats may be missing before it counts as dead. Longer than a
/// reconnection to another NATS server (a second or so), so that a node whose NATS server
/// died is not taken for dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);

/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// A claim's payload, read.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimBody {
    /// The run of the node that made it (random at each start).
    pub run: u64,
    /// The node's name (where the client id's session lives).
    pub node: String,
    /// What the connection leaves if its node dies, and its session's expiry: `None` for a
    /// claim that holds nothing to adopt.
    pub testament: Option<(Testament, Duration)>,
}

/// A claim's payload: by run `run` of node `node`, with `testament` while its connection lives.
pub fn encode(run: u64, node: &str, testament: Option<(&Testament, Duration)>) -> Vec<u8> {
    let mut out = format!("{run:x} {node}").into_bytes();
    let Some((t, keep)) = testament else {
        return out;
    };
    let will = t
        .will
        .as_ref()
        .and_then(|(delay, m)| Some((delay.as_secs(), m.to_publish_bytes().ok()?)));
    let head = json!({
        "s": t.session_identifier,
        "p": t.principal,
        "t": t.thing_name,
        "c": t.certificate,
        "a": t.connect_attributes,
        "k": keep.as_secs(),
        "d": will.as_ref().map(|(d, _)| *d),
        "u": t.will_due_ms,
    });
    out.push(b'\n');
    out.extend_from_slice(head.to_string().as_bytes());
    out.push(b'\n');
    if let Some((_, bytes)) = will {
        out.extend_from_slice(&bytes);
    }
    out
}

/// The longest a testament's session is kept (a session lives at most 7 days).
const KEEP_MOST: Duration = Duration::from_secs(7 * 24 * 3600);

/// A claim's first line only (cheap: what following the claims needs): its run, its node's
/// name, and whether a testament follows.
pub fn head(payload: &[u8]) -> Option<(u64, &str, bool)> {
    let (first, more) = match payload.iter().position(|&b| b == b'\n') {
        Some(i) => (&payload[..i], true),
        None => (payload, false),
    };
    let first = std::str::from_utf8(first).ok()?;
    let (run, node) = first.split_once(' ')?;
    Some((u64::from_str_radix(run, 16).ok()?, node, more))
}

/// Reads a claim's payload; `None` if it is not one. A testament that cannot be read is
/// taken as none (nothing is published for it).
pub fn decode(payload: &[u8]) -> Option<ClaimBody> {
    let (first, rest) = match payload.iter().position(|&b| b == b'\n') {
        Some(i) => (&payload[..i], Some(&payload[i + 1..])),
        None => (payload, None),
    };
    let first = std::str::from_utf8(first).ok()?;
    let (run, node) = first.split_once(' ')?;
    let run = u64::from_str_radix(run, 16).ok()?;
    let testament = rest.and_then(read_testament);
    Some(ClaimBody {
        run,
        node: node.to_owned(),
        testament,
    })
}

fn read_testament(rest: &[u8]) -> Option<(Testament, Duration)> {
    let i = rest.iter().position(|&b| b == b'\n')?;
    let head: Value = serde_json::from_slice(&rest[..i]).ok()?;
    let will_bytes = &rest[i + 1..];
    let text = |k: &str| head.get(k).and_then(Value::as_str).map(str::to_owned);
    let will = match head.get("d").and_then(Value::as_u64) {
        Some(delay) => Some((
            Duration::from_secs(delay),
            Message::from_publish_bytes(will_bytes, 0)?,
        )),
        None => None,
    };
    let connect_attributes = head
        .get("a")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Some((
        Testament {
            session_identifier: text("s")?,
            principal: text("p")?,
            thing_name: text("t"),
            certificate: text("c"),
            will,
            connect_attributes,
            will_due_ms: head.get("u").and_then(Value::as_u64),
        },
        Duration::from_secs(head.get("k").and_then(Value::as_u64)?).min(KEEP_MOST),
    ))
}

/// Which runs of the cluster's nodes are alive, from their heartbeats as this node hears them.
/// A run is dead once nothing was heard from it for [`DEAD_AFTER`] while this node itself
/// listened (was connected to NATS) the whole time: a node that was cut off itself declares
/// no one dead until it has listened again that long.
#[derive(Debug, Default)]
pub struct Liveness {
    /// The last heartbeat of each run heard, and whether it was declared dead already.
    heard: HashMap<u64, (Instant, bool)>,
    /// Since when this node has listened without a break.
    listening: Option<Instant>,
    /// Runs that said they were leaving (stopped normally): never dead, their connections
    /// ended on their node. Kept for the process's life (one per node restart).
    left: HashSet<u64>,
}

impl Liveness {
    /// A heartbeat of `run` at `now`. A run declared dead that is heard again (a partition that
    /// healed) is alive again; its connections adopted meanwhile stay adopted.
    pub fn heard(&mut self, run: u64, now: Instant) {
        self.heard.insert(run, (now, false));
    }

    /// `run` said it is leaving: its node stopped normally, after its connections ended.
    pub fn left(&mut self, run: u64) {
        self.heard.remove(&run);
        self.left.insert(run);
    }

    /// Whether this node is connected to NATS at `now` (called often: every check).
    pub fn listening(&mut self, up: bool, now: Instant) {
        if !up {
            self.listening = None;
        } else if self.listening.is_none() {
            self.listening = Some(now);
        }
    }

    /// Whether this node has listened long enough to tell the dead from the quiet.
    pub fn sure(&self, now: Instant) -> bool {
        self.listening
            .is_some_and(|since| now.saturating_duration_since(since) >= DEAD_AFTER)
    }

    /// The runs that died since the last call (each once).
    pub fn newly_dead(&mut self, now: Instant) -> Vec<u64> {
        if !self.sure(now) {
            return Vec::new();
        }
        let mut dead = Vec::new();
        for (run, (last, declared)) in &mut self.heard {
            if !*declared && now.saturating_duration_since(*last) >= DEAD_AFTER {
                *declared = true;
                dead.push(*run);
            }
        }
        // Forgotten an hour after they died (a run id is never used again).
        self.heard.retain(|_, (last, declared)| {
            !*declared || now.saturating_duration_since(*last) < Duration::from_secs(3600)
        });
        dead
    }

    /// Which runs are dead at `now`, fixed for a sweep that may take a while (heartbeats are
    /// not read meanwhile): `None` unless this node is sure.
    pub fn verdict(&self, now: Instant) -> Option<Verdict> {
        if !self.sure(now) {
            return None;
        }
        let mut v = Verdict {
            alive: self.left.clone(),
            ..Verdict::default()
        };
        for (run, (last, _)) in &self.heard {
            if now.saturating_duration_since(*last) >= DEAD_AFTER {
                v.dead.insert(*run);
            } else {
                v.alive.insert(*run);
            }
        }
        Some(v)
    }
}

/// Which runs were dead when a sweep began ([`Liveness::verdict`]).
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    dead: HashSet<u64>,
    alive: HashSet<u64>,
}

impl Verdict {
    /// Whether a claim of run `run`, stored `age` before the sweep began, is a dead node's:
    /// the run was not heard for [`DEAD_AFTER`], or was never heard and its claim is at least
    /// that old (it stopped before this node started, or never reached it: a live node that
    /// stored a claim that long ago has been heard since).
    pub fn orphaned(&self, run: u64, age: Duration) -> bool {
        self.dead.contains(&run) || (!self.alive.contains(&run) && age >= DEAD_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sekisho_mqtt::{Properties, QoS};

    fn testament(will: bool) -> Testament {
        let properties = Properties {
            message_expiry_interval: Some(60),
            content_type: Some("application/json".into()),
            ..Properties::default()
        };
        Testament {
            session_identifier: "5f1b-…".into(),
            principal: "abc123".into(),
            thing_name: Some("thing one".into()),
            certificate: Some("abc123".into()),
            will: will.then(|| {
                (
                    Duration::from_secs(5),
                    Message {
                        topic: "wills/\n odd/é".into(),
                        payload: Bytes::from_static(b"\n{\"gone\":true}\n\0"),
                        qos: QoS::AtLeastOnce,
                        retain: true,
                        properties,
                        expires_at: None,
                        origin: None,
                        timestamp_ms: 0,
                    },
                )
            }),
            connect_attributes: vec!["PersistentConnect".into(), "LastWill".into()],
            will_due_ms: None,
        }
    }

    #[test]
    fn a_claim_round_trips_with_and_without_its_testament() {
        let mut ended = testament(true);
        ended.will_due_ms = Some(1_764_800_000_123);
        for t in [testament(true), testament(false), ended] {
            let b = decode(&encode(
                0xabc,
                "node a",
                Some((&t, Duration::from_secs(3600))),
            ))
            .unwrap();
            assert_eq!((b.run, b.node.as_str()), (0xabc, "node a"));
            let (got, keep) = b.testament.unwrap();
            assert_eq!(keep, Duration::from_secs(3600));
            assert_eq!(got, t);
        }
        let bare = decode(&encode(7, "n1", None)).unwrap();
        assert_eq!(
            (bare.run, bare.node.as_str(), bare.testament),
            (7, "n1", None)
        );
        // What older builds wrote.
        assert_eq!(decode(b"ff n2").unwrap().node, "n2");
        // The first line alone.
        let t = testament(true);
        assert_eq!(
            head(&encode(0xabc, "node a", Some((&t, Duration::ZERO)))),
            Some((0xabc, "node a", true))
        );
        assert_eq!(head(b"7 n1"), Some((7, "n1", false)));
        assert_eq!(head(b"x n1"), None);
        // A session kept longer than any can live is kept 7 days.
        let long = encode(1, "n", Some((&t, Duration::from_secs(u64::MAX))));
        assert_eq!(decode(&long).unwrap().testament.unwrap().1, KEEP_MOST);
    }

    #[test]
    fn a_damaged_testament_is_none_and_garbage_no_claim() {
        let t = testament(true);
        let good = encode(1, "n", Some((&t, Duration::ZERO)));
        for cut in 1..good.len() {
            // Never a panic; a cut testament is no testament, never a different one.
            if let Some(b) = decode(&good[..cut]) {
                assert_eq!(b.testament, None, "cut at {cut}");
            }
        }
        assert!(decode(b"").is_none());
        assert!(decode(b"zz n").is_none());
        assert!(decode(b"12").is_none());
        assert!(decode(&[0xff, b' ', b'n']).is_none());
        assert_eq!(decode(b"1 n\nnot json\n").unwrap().testament, None);
    }

    #[test]
    fn a_node_is_dead_after_three_silent_seconds_while_this_one_listens() {
        let t0 = Instant::now();
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        let mut l = Liveness::default();
        l.listening(true, t0);
        l.heard(1, t0);
        l.heard(2, t0);
        // Not sure yet: this node has listened less than 3 s.
        assert!(l.newly_dead(s(2999)).is_empty());
        assert!(l.verdict(s(2999)).is_none());
        l.heard(2, s(2500));
        assert_eq!(l.newly_dead(s(3000)), vec![1]);
        assert!(l.newly_dead(s(3100)).is_empty(), "once");
        let v = l.verdict(s(3000)).unwrap();
        assert!(v.orphaned(1, Duration::ZERO));
        assert!(!v.orphaned(2, Duration::from_secs(60)));
        // Never heard: only a claim at least 3 s old.
        assert!(!v.orphaned(9, Duration::from_millis(2999)));
        assert!(v.orphaned(9, DEAD_AFTER));
        // The verdict stays what it was however long the sweep takes.
        assert!(!v.orphaned(2, Duration::from_secs(600)));
        // Heard again: alive.
        l.heard(1, s(3200));
        assert!(!l.verdict(s(3300)).unwrap().orphaned(1, Duration::ZERO));
        // A run that left normally is never dead, however old its claims.
        l.left(2);
        assert!(!l.newly_dead(s(60_000)).contains(&2));
        assert!(
            !l.verdict(s(60_000))
                .unwrap()
                .orphaned(2, Duration::from_secs(3600))
        );
    }

    #[test]
    fn a_node_cut_off_itself_declares_no_one_dead_until_it_listened_again() {
        let t0 = Instant::now();
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        let mut l = Liveness::default();
        l.listening(true, t0);
        l.heard(1, s(10_000));
        l.listening(false, s(10_100));
        assert!(l.newly_dead(s(20_000)).is_empty());
        l.listening(true, s(20_000));
        // Back: the other node's heartbeat is old, but this one has not listened 3 s yet.
        assert!(l.newly_dead(s(22_000)).is_empty());
        assert!(l.verdict(s(22_000)).is_none());
        l.heard(1, s(20_400));
        assert!(l.newly_dead(s(23_000)).is_empty());
        assert_eq!(l.newly_dead(s(23_400)), vec![1]);
    }
}
