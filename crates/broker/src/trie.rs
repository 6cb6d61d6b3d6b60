//! The subscription index: a trie over topic levels, one per account.
//!
//! Matching follows AWS IoT: `#` matches one or more levels below its parent (`a/#` matches
//! `a/` and `a/x`, not `a`), and first-level wildcards do not match `$` topics.

use std::collections::HashMap;

use sekisho_mqtt::SubscriptionOptions;

/// Identifies a live or persisted session.
pub type SessionId = u64;

/// One subscription of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubEntry {
    /// Options as granted.
    pub options: SubscriptionOptions,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscribers whose filter ends here.
    here: HashMap<(SessionId, Option<Box<str>>), SubEntry>,
    /// Subscribers of `<this node>/#`.
    hash: HashMap<(SessionId, Option<Box<str>>), SubEntry>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.here.is_empty()
            && self.hash.is_empty()
    }
}

/// A match: the session, its share group (for `$share/...`), and the options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// Session.
    pub session: SessionId,
    /// Share group name, for shared subscriptions.
    pub group: Option<Box<str>>,
    /// Options.
    pub entry: SubEntry,
}

/// Subscription index of one account.
#[derive(Debug, Default)]
pub struct Trie {
    root: Node,
    len: usize,
}

/// Splits `$share/{group}/{filter}` into its parts.
pub fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match filter
        .strip_prefix("$share/")
        .and_then(|r| r.split_once('/'))
    {
        Some((g, f)) => (Some(g), f),
        None => (None, filter),
    }
}

impl Trie {
    /// Number of (session, filter) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces a subscription. `filter` may carry a `$share/` prefix. True if it is
    /// new (not a replacement).
    pub fn insert(&mut self, session: SessionId, filter: &str, entry: SubEntry) -> bool {
        let (group, f) = split_shared(filter);
        let key = (session, group.map(Into::into));
        let mut node = &mut self.root;
        let mut levels = f.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                let new = node.hash.insert(key, entry).is_none();
                self.len += usize::from(new);
                return new;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        let new = node.here.insert(key, entry).is_none();
        self.len += usize::from(new);
        new
    }

    /// Removes a subscription; true if it existed.
    pub fn remove(&mut self, session: SessionId, filter: &str) -> bool {
        let (group, f) = split_shared(filter);
        let key = (session, group.map(Into::into));
        let levels: Vec<&str> = f.split('/').collect();
        let removed = remove_rec(&mut self.root, &levels, &key);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `out` for every subscription matching `topic`. Allocates nothing.
    pub fn matches(&self, topic: &str, out: &mut impl FnMut(Match)) {
        let dollar = topic.starts_with('$');
        match_rec(&self.root, topic.split('/'), 0, dollar, out);
    }
}

fn remove_rec(node: &mut Node, levels: &[&str], key: &(SessionId, Option<Box<str>>)) -> bool {
    match levels {
        [] => node.here.remove(key).is_some(),
        ["#"] => node.hash.remove(key).is_some(),
        [first, rest @ ..] => {
            let (removed, empty) = if *first == "+" {
                match node.plus.as_deref_mut() {
                    Some(child) => {
                        let r = remove_rec(child, rest, key);
                        (r, child.is_empty())
                    }
                    None => return false,
                }
            } else {
                match node.children.get_mut(*first) {
                    Some(child) => {
                        let r = remove_rec(child, rest, key);
                        (r, child.is_empty())
                    }
                    None => return false,
                }
            };
            if empty {
                if *first == "+" {
                    node.plus = None;
                } else {
                    node.children.remove(*first);
                }
            }
            removed
        }
    }
}

fn emit(map: &HashMap<(SessionId, Option<Box<str>>), SubEntry>, out: &mut impl FnMut(Match)) {
    for ((session, group), entry) in map {
        out(Match {
            session: *session,
            group: group.clone(),
            entry: *entry,
        });
    }
}

fn match_rec(
    node: &Node,
    mut levels: std::str::Split<'_, char>,
    depth: usize,
    dollar: bool,
    out: &mut impl FnMut(Match),
) {
    let wild_ok = !(depth == 0 && dollar);
    match levels.next() {
        None => emit(&node.here, out),
        Some(first) => {
            if wild_ok {
                // `#` here matches one or more remaining levels (AWS: not zero).
                emit(&node.hash, out);
                if let Some(p) = node.plus.as_deref() {
                    match_rec(p, levels.clone(), depth + 1, dollar, out);
                }
            }
            if let Some(c) = node.children.get(first) {
                match_rec(c, levels, depth + 1, dollar, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sekisho_mqtt::topic::{HashRule, matches};

    fn e() -> SubEntry {
        SubEntry {
            options: SubscriptionOptions::default(),
        }
    }

    fn hits(t: &Trie, topic: &str) -> Vec<SessionId> {
        let mut v = Vec::new();
        t.matches(topic, &mut |m| v.push(m.session));
        v.sort();
        v
    }

    #[test]
    fn basic() {
        let mut t = Trie::default();
        t.insert(1, "a/b", e());
        t.insert(2, "a/+", e());
        t.insert(3, "a/#", e());
        t.insert(4, "#", e());
        t.insert(5, "$aws/events/#", e());
        assert_eq!(hits(&t, "a/b"), vec![1, 2, 3, 4]);
        assert_eq!(hits(&t, "a"), vec![4]);
        assert_eq!(hits(&t, "a/"), vec![2, 3, 4]);
        assert_eq!(hits(&t, "$aws/events/x"), vec![5]);
        assert!(t.remove(3, "a/#"));
        assert!(!t.remove(3, "a/#"));
        assert_eq!(hits(&t, "a/b"), vec![1, 2, 4]);
        assert_eq!(t.len(), 4);
    }

    use proptest::prelude::*;

    proptest! {
        /// The trie agrees with the reference matcher for every filter/topic pair.
        #[test]
        fn agrees_with_reference(filters in proptest::collection::vec("[ab$+#]{0,2}(/[ab+#]{0,2}){0,3}", 1..12),
                                 topic in "[ab$]{0,2}(/[ab]{0,2}){0,3}") {
            let mut t = Trie::default();
            let mut valid = Vec::new();
            for (i, f) in filters.iter().enumerate() {
                if sekisho_mqtt::topic::validate_filter(f).is_ok() && !f.starts_with("$share") {
                    t.insert(i as u64, f, e());
                    valid.push((i as u64, f.clone()));
                }
            }
            let mut want: Vec<u64> = valid.iter().filter(|(_, f)| matches(f, &topic, HashRule::Aws)).map(|(i, _)| *i).collect();
            want.sort();
            prop_assert_eq!(hits(&t, &topic), want);
            for (i, f) in &valid {
                prop_assert!(t.remove(*i, f));
            }
            prop_assert!(t.is_empty());
            prop_assert!(t.root.is_empty());
        }
    }
}
