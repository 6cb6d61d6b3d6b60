//! Drops the second copy of a message that reached this node through two of its
//! subscriptions (NATS delivers a message once per matching subscription; a node subscribed to
//! `a/+` and `a/#` gets `a/b` twice).
//!
//! Each node numbers what it publishes (per start, under a random node id); the receiving node
//! remembers the last [`WINDOW`] numbers of each sending node. A copy older than the window is
//! taken as seen (dropped and counted): both copies of one message travel on one connection
//! back to back, so only a subscription that fell `WINDOW` messages behind another could make
//! one, and dropping is the at-most-once choice for a message the node cannot tell.

use std::collections::HashMap;

/// How many of a node's latest numbers are remembered.
pub const WINDOW: u64 = 8192;
const WORDS: usize = (WINDOW / 64) as usize;

/// Most sending nodes remembered; past it, all are forgotten (a node id is new at each start,
/// so old ones pile up only over many restarts).
const MAX_SOURCES: usize = 1024;

#[derive(Debug)]
struct Window {
    max: u64,
    bits: [u64; WORDS],
}

impl Window {
    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn first(&mut self, seq: u64) -> Verdict {
        if seq > self.max {
            if seq - self.max >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                // Slots of the numbers passed, this one's included (each held the number
                // WINDOW below it).
                for s in self.max + 1..=seq {
                    let (w, b) = Window::bit(s);
                    self.bits[w] &= !b;
                }
            }
            self.max = seq;
        } else if self.max - seq >= WINDOW {
            return Verdict::Stale;
        }
        let (w, b) = Window::bit(seq);
        if self.bits[w] & b != 0 {
            return Verdict::Duplicate;
        }
        self.bits[w] |= b;
        Verdict::First
    }
}

/// What [`Seen::check`] says of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first copy: route it.
    First,
    /// A copy already routed.
    Duplicate,
    /// Older than the window: dropped.
    Stale,
}

/// The numbers seen, per sending node.
#[derive(Debug, Default)]
pub struct Seen {
    sources: HashMap<u64, Window>,
}

impl Seen {
    /// Whether the copy numbered `seq` from node `source` is the first seen. Numbers start at 1.
    pub fn check(&mut self, source: u64, seq: u64) -> Verdict {
        if !self.sources.contains_key(&source) && self.sources.len() >= MAX_SOURCES {
            self.sources.clear();
        }
        self.sources
            .entry(source)
            .or_insert(Window {
                max: 0,
                bits: [0; WORDS],
            })
            .first(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn second_copies_are_dropped_per_source() {
        let mut s = Seen::default();
        assert_eq!(s.check(1, 1), Verdict::First);
        assert_eq!(s.check(1, 1), Verdict::Duplicate);
        assert_eq!(s.check(2, 1), Verdict::First);
        assert_eq!(s.check(1, 3), Verdict::First);
        assert_eq!(s.check(1, 2), Verdict::First);
        assert_eq!(s.check(1, 2), Verdict::Duplicate);
    }

    #[test]
    fn the_window_is_n_numbers() {
        let mut s = Seen::default();
        assert_eq!(s.check(1, WINDOW + 1), Verdict::First);
        // N - 1 behind: remembered; N behind: stale.
        assert_eq!(s.check(1, 2), Verdict::First);
        assert_eq!(s.check(1, 2), Verdict::Duplicate);
        assert_eq!(s.check(1, 1), Verdict::Stale);
        // A number whose slot an older one held (found by the property test below).
        let mut s = Seen::default();
        assert_eq!(s.check(1, 5), Verdict::First);
        assert_eq!(s.check(1, 6), Verdict::First);
        assert_eq!(s.check(1, 5 + WINDOW), Verdict::First);
        assert_eq!(s.check(1, 6), Verdict::Duplicate);
        // A jump past the window forgets everything before it.
        assert_eq!(s.check(1, 3 * WINDOW), Verdict::First);
        assert_eq!(s.check(1, 2 * WINDOW + 1), Verdict::First);
        assert_eq!(s.check(1, 2 * WINDOW), Verdict::Stale);
    }

    proptest! {
        /// Against a set of everything seen: within the window, the verdict is exact.
        #[test]
        fn matches_a_set(seqs in prop::collection::vec(1u64..3 * WINDOW, 1..400)) {
            let mut s = Seen::default();
            let mut all = std::collections::BTreeSet::new();
            let mut max = 0;
            for q in seqs {
                let v = s.check(7, q);
                max = max.max(q);
                if max - q >= WINDOW {
                    prop_assert_eq!(v, Verdict::Stale);
                } else if all.contains(&q) {
                    prop_assert_eq!(v, Verdict::Duplicate);
                } else {
                    prop_assert_eq!(v, Verdict::First);
                }
                all.insert(q);
            }
        }
    }
}
