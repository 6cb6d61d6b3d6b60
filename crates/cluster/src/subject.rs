//! MQTT topics and filters as NATS subjects, reversibly.
//!
//! A topic's levels become a subject's tokens under `{prefix}.{kind}.{account}`. A NATS token
//! is non-empty and holds no `.`, `*`, `>` or white space, while an MQTT level may be empty or
//! hold any UTF-8: a level made only of ASCII letters, digits, `-`, `_` and `$` is its own
//! token; any other byte is written `~` and two upper-case hex digits, and an empty level is
//! the token `~` alone (which no escaped level can be, as `~` itself is escaped). So every
//! topic has exactly one subject and every subject made here has exactly one topic.
//!
//! A filter maps `+` to `*` and a trailing `#` to `>`. NATS's `>` matches one or more tokens,
//! as AWS's `#` matches one or more levels (`a/#` matches `a/` and `a/b`, not `a`), so the
//! subject a filter maps to matches the subject of every topic the filter matches. NATS's
//! wildcards also match `$` tokens at the first level, which AWS's do not: the receiving
//! node's trie makes the exact decision; the subject only narrows what travels.

use std::fmt::Write as _;

/// What a subject carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Messages as published, to the nodes with interest (core NATS).
    Message,
    /// Retained messages, in the retained stream (JetStream, last per subject).
    Retained,
}

impl Kind {
    fn token(self) -> &'static str {
        match self {
            Kind::Message => "m",
            Kind::Retained => "r",
        }
    }
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'$')
}

/// Appends one level as one token.
fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('~');
        return;
    }
    for &b in level.as_bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "~{b:02X}");
        }
    }
}

/// The level a token holds; `None` for a token no level maps to.
fn level_of(token: &str) -> Option<String> {
    if token == "~" {
        return Some(String::new());
    }
    let b = token.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'~' {
            let hex = token.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            // Only what push_level escapes, written as it writes it: one spelling per level.
            if plain(v) || hex.bytes().any(|c| c.is_ascii_lowercase()) {
                return None;
            }
            out.push(v);
            i += 3;
        } else if plain(b[i]) {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    if out.is_empty() {
        return None;
    }
    String::from_utf8(out).ok()
}

fn head(prefix: &str, kind: Kind, account: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + account.len() + 64);
    s.push_str(prefix);
    s.push('.');
    s.push_str(kind.token());
    s.push('.');
    push_level(&mut s, account);
    s
}

/// The subject of `topic` in `account`.
pub fn topic_subject(prefix: &str, kind: Kind, account: &str, topic: &str) -> String {
    let mut s = head(prefix, kind, account);
    for level in topic.split('/') {
        s.push('.');
        push_level(&mut s, level);
    }
    s
}

/// The subject pattern of `filter` (without any `$share/{group}/` prefix) in `account`.
pub fn filter_subject(prefix: &str, account: &str, filter: &str) -> String {
    let mut s = head(prefix, Kind::Message, account);
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        s.push('.');
        match level {
            "+" => s.push('*'),
            "#" if levels.peek().is_none() => s.push('>'),
            _ => push_level(&mut s, level),
        }
    }
    s
}

/// The account and topic of a subject [`topic_subject`] made with `prefix` and `kind`.
pub fn parse_subject(prefix: &str, kind: Kind, subject: &str) -> Option<(String, String)> {
    let rest = subject
        .strip_prefix(prefix)?
        .strip_prefix('.')?
        .strip_prefix(kind.token())?
        .strip_prefix('.')?;
    let (account, levels) = rest.split_once('.')?;
    let account = level_of(account)?;
    let mut topic = String::new();
    for (i, t) in levels.split('.').enumerate() {
        if i > 0 {
            topic.push('/');
        }
        topic.push_str(&level_of(t)?);
    }
    Some((account, topic))
}

/// The subject of a claim of `client_id` in `account`: `{prefix}.c.{account}.{client id}`, the
/// client id one token (escaped as a level is).
pub fn claim_subject(prefix: &str, account: &str, client_id: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + account.len() + client_id.len() + 8);
    s.push_str(prefix);
    s.push_str(".c.");
    push_level(&mut s, account);
    s.push('.');
    push_level(&mut s, client_id);
    s
}

/// `name` as one subject token (escaped as a level is).
pub fn token(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 4);
    push_level(&mut s, name);
    s
}

/// The subject on which node `node` is asked for sessions: `{prefix}.h.{node}`, the name one
/// token (escaped as a level is).
pub fn handover_subject(prefix: &str, node: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + node.len() + 8);
    s.push_str(prefix);
    s.push_str(".h.");
    push_level(&mut s, node);
    s
}

/// The account and client id of a subject [`claim_subject`] made.
pub fn parse_claim(prefix: &str, subject: &str) -> Option<(String, String)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix(".c.")?;
    let (account, client) = rest.split_once('.')?;
    Some((level_of(account)?, level_of(client)?))
}

/// A NATS queue group name for a shared subscription: one per account, share name and filter
/// (hex, so that any name is a valid token and no two differ only in escaping).
pub fn queue_name(account: &str, group: &str, filter: &str) -> String {
    let mut s = String::with_capacity(2 * (account.len() + group.len() + filter.len() + 2) + 2);
    s.push_str("q-");
    for b in account
        .bytes()
        .chain([0])
        .chain(group.bytes())
        .chain([0])
        .chain(filter.bytes())
    {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// NATS's own matching of a literal subject against a pattern.
    fn nats_matches(pattern: &str, subject: &str) -> bool {
        let p: Vec<&str> = pattern.split('.').collect();
        let s: Vec<&str> = subject.split('.').collect();
        for (i, t) in p.iter().enumerate() {
            match *t {
                ">" => return s.len() > i,
                "*" => {
                    if i >= s.len() {
                        return false;
                    }
                }
                lit => {
                    if s.get(i) != Some(&lit) {
                        return false;
                    }
                }
            }
        }
        p.len() == s.len()
    }

    /// AWS's matching, as the broker's trie does it (without the `$` rule: NATS narrows, the
    /// trie decides).
    fn aws_matches(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        for (i, l) in f.iter().enumerate() {
            match *l {
                "#" if i == f.len() - 1 => return t.len() > i,
                "+" => {
                    if i >= t.len() {
                        return false;
                    }
                }
                lit => {
                    if t.get(i) != Some(&lit) {
                        return false;
                    }
                }
            }
        }
        f.len() == t.len()
    }

    fn valid_token(t: &str) -> bool {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>'))
    }

    #[test]
    fn odd_levels_round_trip() {
        for topic in [
            "a/b",
            "a/",
            "/a",
            "/",
            "a//b",
            "$aws/things/t-1/shadow/update",
            "a.b/c*d/e>f/g h",
            "~/~7E/~~",
            "日本/é",
            "x\u{0}y",
        ] {
            let s = topic_subject("sk", Kind::Message, "123456789012", topic);
            assert!(s.split('.').all(valid_token), "{s}");
            assert_eq!(
                parse_subject("sk", Kind::Message, &s),
                Some(("123456789012".into(), topic.into())),
                "{s}"
            );
            assert_eq!(parse_subject("sk", Kind::Retained, &s), None);
        }
        assert_eq!(topic_subject("sk", Kind::Message, "1", "a/"), "sk.m.1.a.~");
        assert_eq!(
            topic_subject("sk", Kind::Retained, "1", "a.b"),
            "sk.r.1.a~2Eb"
        );
    }

    #[test]
    fn subjects_no_topic_maps_to_are_refused() {
        for s in [
            "sk.m.1",
            "sk.m.1.a~2e",
            "sk.m.1.a~41",
            "sk.m.1.a~4",
            "sk.m.1.a~ZZ",
            "sk.m.1.~FF",
            "sk.m.1.a..b",
            "sk.x.1.a",
            "other.m.1.a",
        ] {
            assert_eq!(parse_subject("sk", Kind::Message, s), None, "{s}");
        }
    }

    #[test]
    fn filters_map_wildcards() {
        assert_eq!(filter_subject("sk", "1", "a/+/c"), "sk.m.1.a.*.c");
        assert_eq!(filter_subject("sk", "1", "a/#"), "sk.m.1.a.>");
        assert_eq!(filter_subject("sk", "1", "#"), "sk.m.1.>");
        assert_eq!(filter_subject("sk", "1", "a/b.c/"), "sk.m.1.a.b~2Ec.~");
    }

    #[test]
    fn claims_name_any_client_id() {
        for id in ["dev-1", "a/b.c", "", "x y*>", "日本"] {
            let s = claim_subject("sk", "123", id);
            assert_eq!(s.split('.').count(), 4, "{s}");
            assert_eq!(parse_claim("sk", &s), Some(("123".into(), id.into())));
        }
        assert_eq!(parse_claim("sk", "sk.c.1.a.b"), None);
        assert_eq!(parse_claim("sk", "sk.m.1.a"), None);
    }

    #[test]
    fn queue_names_are_tokens_and_distinct() {
        let a = queue_name("1", "g", "a/b");
        let b = queue_name("1", "g/a", "b");
        assert_ne!(a, b);
        assert!(valid_token(&a));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-c]{1,2}",
            "[a.~*> $é/+#]{1,3}".prop_map(|s| s.replace(['/', '+', '#'], "x")),
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|v| v.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![level(), Just("+".to_string())], 1..5),
            any::<bool>(),
        )
            .prop_map(|(mut v, hash)| {
                if hash {
                    v.push("#".into());
                }
                v.join("/")
            })
    }

    proptest! {
        #[test]
        fn every_topic_round_trips(account in "[0-9a-z]{1,12}", t in topic()) {
            let s = topic_subject("sk", Kind::Message, &account, &t);
            prop_assert!(s.split('.').all(valid_token));
            prop_assert_eq!(parse_subject("sk", Kind::Message, &s), Some((account, t)));
        }

        /// The subject narrows exactly: it matches if and only if AWS's filter does.
        #[test]
        fn filter_subjects_match_as_aws_filters(f in filter(), t in topic()) {
            let fs = filter_subject("sk", "1", &f);
            let ts = topic_subject("sk", Kind::Message, "1", &t);
            prop_assert_eq!(nats_matches(&fs, &ts), aws_matches(&f, &t), "{} {}", fs, ts);
        }
    }
}
