//! Condition operators and their evaluation against the request context.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::pattern::Pattern;
use crate::{BoundCondition, Context, Value};

/// A condition operator (without its qualifier or `IfExists` suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Operator {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    NumericEquals,
    NumericNotEquals,
    NumericLessThan,
    NumericLessThanEquals,
    NumericGreaterThan,
    NumericGreaterThanEquals,
    DateEquals,
    DateNotEquals,
    DateLessThan,
    DateLessThanEquals,
    DateGreaterThan,
    DateGreaterThanEquals,
    Bool,
    IpAddress,
    NotIpAddress,
    ArnEquals,
    ArnLike,
    ArnNotEquals,
    ArnNotLike,
    Null,
}

/// `ForAnyValue:` or `ForAllValues:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qualifier {
    /// True if any request value matches.
    ForAnyValue,
    /// True if every request value matches (and when there are none).
    ForAllValues,
}

impl Operator {
    pub(crate) fn from_name(s: &str) -> Option<Operator> {
        use Operator::*;
        Some(match s {
            "StringEquals" => StringEquals,
            "StringNotEquals" => StringNotEquals,
            "StringEqualsIgnoreCase" => StringEqualsIgnoreCase,
            "StringNotEqualsIgnoreCase" => StringNotEqualsIgnoreCase,
            "StringLike" => StringLike,
            "StringNotLike" => StringNotLike,
            "NumericEquals" => NumericEquals,
            "NumericNotEquals" => NumericNotEquals,
            "NumericLessThan" => NumericLessThan,
            "NumericLessThanEquals" => NumericLessThanEquals,
            "NumericGreaterThan" => NumericGreaterThan,
            "NumericGreaterThanEquals" => NumericGreaterThanEquals,
            "DateEquals" => DateEquals,
            "DateNotEquals" => DateNotEquals,
            "DateLessThan" => DateLessThan,
            "DateLessThanEquals" => DateLessThanEquals,
            "DateGreaterThan" => DateGreaterThan,
            "DateGreaterThanEquals" => DateGreaterThanEquals,
            "Bool" => Bool,
            "IpAddress" => IpAddress,
            "NotIpAddress" => NotIpAddress,
            "ArnEquals" => ArnEquals,
            "ArnLike" => ArnLike,
            "ArnNotEquals" => ArnNotEquals,
            "ArnNotLike" => ArnNotLike,
            "Null" => Null,
            _ => return None,
        })
    }

    /// Negated operators are true when the key is absent.
    fn negated(self) -> bool {
        use Operator::*;
        matches!(
            self,
            StringNotEquals
                | StringNotEqualsIgnoreCase
                | StringNotLike
                | NumericNotEquals
                | DateNotEquals
                | NotIpAddress
                | ArnNotEquals
                | ArnNotLike
        )
    }

    pub(crate) fn case_insensitive(self) -> bool {
        matches!(
            self,
            Operator::StringEqualsIgnoreCase | Operator::StringNotEqualsIgnoreCase
        )
    }

    pub(crate) fn validate_values(self, values: &[String]) -> Result<(), String> {
        use Operator::*;
        for v in values {
            let ok = match self {
                Bool | Null => v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("false"),
                IpAddress | NotIpAddress => parse_net(v).is_some() || v.contains("${"),
                NumericEquals
                | NumericNotEquals
                | NumericLessThan
                | NumericLessThanEquals
                | NumericGreaterThan
                | NumericGreaterThanEquals => v.parse::<f64>().is_ok() || v.contains("${"),
                DateEquals
                | DateNotEquals
                | DateLessThan
                | DateLessThanEquals
                | DateGreaterThan
                | DateGreaterThanEquals => parse_date(v).is_some() || v.contains("${"),
                _ => true,
            };
            if !ok {
                return Err(format!(
                    "value {v:?} is not valid for condition operator {self:?}"
                ));
            }
        }
        Ok(())
    }

    /// One request value against the policy's values (OR over the policy values), before
    /// negation.
    fn positive(self, v: &str, c: &BoundCondition) -> bool {
        use Operator::*;
        match self {
            StringEquals | StringNotEquals | ArnEquals | ArnNotEquals => {
                c.values.iter().any(|p| p == v)
            }
            StringEqualsIgnoreCase | StringNotEqualsIgnoreCase => {
                c.values.iter().any(|p| p.eq_ignore_ascii_case(v))
            }
            StringLike | StringNotLike | ArnLike | ArnNotLike => {
                c.patterns.iter().any(|p: &Pattern| p.matches(v))
            }
            NumericEquals
            | NumericNotEquals
            | NumericLessThan
            | NumericLessThanEquals
            | NumericGreaterThan
            | NumericGreaterThanEquals => {
                let Ok(x) = v.trim().parse::<f64>() else {
                    return false;
                };
                c.values
                    .iter()
                    .filter_map(|p| p.parse::<f64>().ok())
                    .any(|p| match self {
                        NumericEquals | NumericNotEquals => x == p,
                        NumericLessThan => x < p,
                        NumericLessThanEquals => x <= p,
                        NumericGreaterThan => x > p,
                        _ => x >= p,
                    })
            }
            DateEquals
            | DateNotEquals
            | DateLessThan
            | DateLessThanEquals
            | DateGreaterThan
            | DateGreaterThanEquals => {
                let Some(x) = parse_date(v) else {
                    return false;
                };
                c.values
                    .iter()
                    .filter_map(|p| parse_date(p))
                    .any(|p| match self {
                        DateEquals | DateNotEquals => x == p,
                        DateLessThan => x < p,
                        DateLessThanEquals => x <= p,
                        DateGreaterThan => x > p,
                        _ => x >= p,
                    })
            }
            Bool => c.values.iter().any(|p| p.eq_ignore_ascii_case(v)),
            IpAddress | NotIpAddress => {
                let Ok(ip) = v.trim().parse::<IpAddr>() else {
                    return false;
                };
                c.values
                    .iter()
                    .filter_map(|p| parse_net(p))
                    .any(|n| n.contains(&ip))
            }
            Null => false,
        }
    }

    /// The operator applied to one request value, negation included.
    fn test(self, v: &str, c: &BoundCondition) -> bool {
        self.positive(v, c) != self.negated()
    }
}

/// A date as IAM's Date operators take it, in seconds since the epoch: ISO 8601
/// (`2026-11-30`, `2026-11-30T12:00:00Z`, with fractions of a second or a `+hh:mm` offset) or
/// epoch seconds.
pub fn parse_date(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<f64>()
        && !s.contains('-')
    {
        return n.is_finite().then_some(n);
    }
    let num = |t: &str| -> Option<i64> {
        (!t.is_empty() && t.len() <= 9 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let (date, rest) = s.split_at(s.find('T').unwrap_or(s.len()));
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    // Years 0 to 9999 (ISO 8601 without expansion): the arithmetic below cannot overflow.
    if d.next().is_some() || y > 9999 || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut secs = (days * 86_400) as f64;
    let Some(time) = rest.strip_prefix('T') else {
        return rest.is_empty().then_some(secs);
    };
    let (clock, offset) = match time.find(['Z', 'z', '+', '-']) {
        Some(i) => time.split_at(i),
        None => return None,
    };
    let mut parts = clock.split(':');
    let h = num(parts.next()?)?;
    let mi = num(parts.next()?)?;
    let sec: f64 = match parts.next() {
        Some(x) => {
            let (whole, frac) = x.split_once('.').unwrap_or((x, ""));
            num(whole)? as f64
                + if frac.is_empty() {
                    0.0
                } else {
                    format!("0.{frac}").parse::<f64>().ok()?
                }
        }
        None => 0.0,
    };
    if parts.next().is_some() || h > 23 || mi > 59 || !(0.0..61.0).contains(&sec) {
        return None;
    }
    secs += (h * 3600 + mi * 60) as f64 + sec;
    match offset {
        "Z" | "z" => {}
        o => {
            let sign = if o.starts_with('-') { 1.0 } else { -1.0 };
            let (oh, om) = o[1..].split_once(':').unwrap_or((&o[1..], "0"));
            let (oh, om) = (num(oh)?, num(om)?);
            if oh > 23 || om > 59 {
                return None;
            }
            secs += sign * ((oh * 3600 + om * 60) as f64);
        }
    }
    Some(secs)
}

fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Evaluates one bound condition.
pub(crate) fn holds(c: &BoundCondition, ctx: &dyn Context) -> bool {
    if let Some(forced) = c.forced {
        return forced;
    }
    let value = ctx.get(&c.key);
    if c.operator == Operator::Null {
        let want_absent = c.values.iter().any(|v| v.eq_ignore_ascii_case("true"));
        let absent = match value {
            None => true,
            Some(Value::Many(vs)) => vs.is_empty(),
            Some(Value::One(_)) => false,
        };
        return absent == want_absent;
    }
    let values: &[String];
    let single: [&str; 1];
    let vals: Vec<&str>;
    let list: &[&str] = match value {
        None => {
            return match c.qualifier {
                Some(Qualifier::ForAllValues) => true,
                Some(Qualifier::ForAnyValue) => false,
                None => c.if_exists || c.operator.negated(),
            };
        }
        Some(Value::One(v)) => {
            single = [v];
            &single
        }
        Some(Value::Many(vs)) => {
            values = vs;
            vals = values.iter().map(String::as_str).collect();
            &vals
        }
    };
    match c.qualifier {
        Some(Qualifier::ForAllValues) => list.iter().all(|v| c.operator.test(v, c)),
        Some(Qualifier::ForAnyValue) => list.iter().any(|v| c.operator.test(v, c)),
        None => {
            if c.operator.negated() {
                // No request value may match any policy value.
                !list.iter().any(|v| c.operator.positive(v, c))
            } else {
                list.iter().any(|v| c.operator.positive(v, c))
            }
        }
    }
}
