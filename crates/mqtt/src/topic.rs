//! Topic names and topic filters: MQTT validity and matching.

use crate::DecodeError;

/// Checks an MQTT topic name: non-empty, no `+` or `#`. [MQTT-3.3.2-2] [MQTT-4.7.3-1]
pub fn validate_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.is_empty() {
        return Err(DecodeError::EmptyTopicName);
    }
    if topic.contains(['+', '#']) {
        return Err(DecodeError::WildcardInTopicName);
    }
    Ok(())
}

/// Checks an MQTT topic filter: non-empty; `#` only as the whole last level; `+` only as a
/// whole level. A `$share/{name}/{filter}` prefix is checked as a shared subscription.
/// [MQTT-4.7.1-1] [MQTT-4.7.1-2] [MQTT-4.7.3-1] [MQTT-4.8.2-1] [MQTT-4.8.2-2]
pub fn validate_filter(filter: &str) -> Result<(), DecodeError> {
    let bad = || DecodeError::InvalidTopicFilter(filter.chars().take(64).collect());
    let inner = match filter.strip_prefix("$share/") {
        Some(rest) => {
            let (name, f) = rest.split_once('/').ok_or_else(bad)?;
            if name.is_empty() || name.contains(['+', '#']) || f.is_empty() {
                return Err(bad());
            }
            f
        }
        None => filter,
    };
    if inner.is_empty() {
        return Err(bad());
    }
    let mut levels = inner.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(bad());
        }
        if level.contains('+') && level != "+" {
            return Err(bad());
        }
    }
    Ok(())
}

/// How `#` treats its parent level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashRule {
    /// MQTT: `a/#` matches `a` itself as well as everything below it.
    Mqtt,
    /// AWS IoT: `a/#` matches `a/`, `a/x`, `a/x/y` but not `a`.
    Aws,
}

/// Whether topic name `topic` matches filter `filter` (no `$share` prefix).
///
/// Wildcards at the first level do not match topics that begin with `$`. [MQTT-4.7.2-1]
pub fn matches(filter: &str, topic: &str, rule: HashRule) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), Some(_)) => return true,
            (Some("#"), None) => return rule == HashRule::Mqtt,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_hash_rule() {
        assert!(matches("sensor/#", "sensor/", HashRule::Aws));
        assert!(matches("sensor/#", "sensor/x", HashRule::Aws));
        assert!(matches("sensor/#", "sensor/x/y", HashRule::Aws));
        assert!(!matches("sensor/#", "sensor", HashRule::Aws));
        assert!(matches("sensor/#", "sensor", HashRule::Mqtt));
        assert!(matches("#", "a", HashRule::Aws));
    }

    #[test]
    fn plus_and_dollar() {
        assert!(matches("a/+/c", "a/b/c", HashRule::Aws));
        assert!(matches("a/+", "a/", HashRule::Aws));
        assert!(!matches("a/+", "a/b/c", HashRule::Aws));
        assert!(!matches("+/x", "$aws/x", HashRule::Aws));
        assert!(!matches("#", "$aws/x", HashRule::Aws));
        assert!(matches("$aws/+", "$aws/x", HashRule::Aws));
    }

    #[test]
    fn filter_validity() {
        for ok in ["a", "#", "+", "a/+/b", "a/#", "/", "$share/g/a/#", "+/+"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "a+",
            "a/b+",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
        ] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
    }
}
