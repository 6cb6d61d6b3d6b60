//! Parsing and validation of policy documents, and variable substitution.

use serde_json::{Map, Value as Json};

use crate::condition::{Operator, Qualifier};
use crate::pattern::Tok;
use crate::*;

/// AWS IoT's limit: 2048 characters, not counting white space.
pub const MAX_IOT_POLICY_CHARS: usize = 2048;

/// Which policy language the document is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// AWS IoT policies: `Resource` required, no `Principal`.
    Iot,
    /// IAM identity policies: `Resource` required, no `Principal`.
    IamIdentity,
    /// IAM trust (and resource) policies: `Principal` required, `Resource` optional.
    IamTrust,
}

/// Why a document is not a valid policy. The message is what `MalformedPolicyException` says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError(msg.into()))
}

/// Characters of a document that are not white space (AWS IoT's size measure).
pub fn non_whitespace_len(doc: &str) -> usize {
    doc.chars().filter(|c| !c.is_whitespace()).count()
}

impl Policy {
    /// Parses and validates a policy document.
    pub fn parse(doc: &str, dialect: Dialect) -> Result<Policy, PolicyError> {
        let json: Json = match serde_json::from_str(doc) {
            Ok(j) => j,
            Err(e) => return err(format!("Policy document is not valid JSON: {e}")),
        };
        let Json::Object(top) = json else {
            return err("Policy document must be a JSON object");
        };
        let mut variables = false;
        let mut statements_json = None;
        for (k, v) in &top {
            match k.as_str() {
                "Version" => match v.as_str() {
                    Some("2012-10-17") => variables = true,
                    Some("2008-10-17") => variables = false,
                    _ => {
                        return err(format!(
                            "Unsupported policy version {v}; use \"2012-10-17\""
                        ));
                    }
                },
                "Id" => {
                    if !v.is_string() {
                        return err("Id must be a string");
                    }
                }
                "Statement" => statements_json = Some(v),
                other => return err(format!("Unknown field {other:?} in policy document")),
            }
        }
        let stmts: Vec<&Map<String, Json>> = match statements_json {
            None => return err("Policy document is missing the Statement element"),
            Some(Json::Object(o)) => vec![o],
            Some(Json::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for (i, s) in a.iter().enumerate() {
                    match s {
                        Json::Object(o) => out.push(o),
                        _ => return err(format!("Statement {} must be a JSON object", i + 1)),
                    }
                }
                out
            }
            Some(_) => return err("Statement must be an object or a list of objects"),
        };
        if stmts.is_empty() {
            return err("Policy document must contain at least one statement");
        }
        let statements = stmts
            .into_iter()
            .enumerate()
            .map(|(i, s)| parse_statement(i + 1, s, dialect))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            variables,
            statements,
        })
    }
}

fn strings(n: usize, field: &str, v: &Json) -> Result<Vec<String>, PolicyError> {
    let one = |x: &Json| match x {
        Json::String(s) => Ok(s.clone()),
        _ => err(format!("Statement {n}: {field} entries must be strings")),
    };
    let out = match v {
        Json::Array(a) => a.iter().map(one).collect::<Result<Vec<_>, _>>()?,
        other => vec![one(other)?],
    };
    if out.is_empty() {
        return err(format!("Statement {n}: {field} must not be empty"));
    }
    Ok(out)
}

fn parse_statement(
    n: usize,
    s: &Map<String, Json>,
    dialect: Dialect,
) -> Result<Statement, PolicyError> {
    let mut sid = None;
    let mut effect = None;
    let mut action = None;
    let mut resource = None;
    let mut principal = None;
    let mut conditions = Vec::new();
    let set = |slot: &mut Option<_>, val, name: &str| {
        if slot.is_some() {
            return err(format!(
                "Statement {n}: {name} conflicts with another element"
            ));
        }
        *slot = Some(val);
        Ok(())
    };
    for (k, v) in s {
        match k.as_str() {
            "Sid" => match v {
                Json::String(x) => sid = Some(x.clone()),
                _ => return err(format!("Statement {n}: Sid must be a string")),
            },
            "Effect" => match v.as_str() {
                Some("Allow") => effect = Some(Effect::Allow),
                Some("Deny") => effect = Some(Effect::Deny),
                _ => {
                    return err(format!(
                        "Statement {n}: Effect must be \"Allow\" or \"Deny\", not {v}"
                    ));
                }
            },
            "Action" | "NotAction" => {
                let items = strings(n, k, v)?;
                for a in &items {
                    validate_action(n, a)?;
                }
                set(
                    &mut action,
                    Targets {
                        negated: k == "NotAction",
                        items,
                    },
                    "Action/NotAction",
                )?;
            }
            "Resource" | "NotResource" => {
                let items = strings(n, k, v)?;
                for r in &items {
                    if r != "*" && !r.starts_with("arn:") {
                        return err(format!(
                            "Statement {n}: Resource {r:?} must be an ARN or \"*\""
                        ));
                    }
                }
                set(
                    &mut resource,
                    Targets {
                        negated: k == "NotResource",
                        items,
                    },
                    "Resource/NotResource",
                )?;
            }
            "Principal" | "NotPrincipal" => {
                if dialect != Dialect::IamTrust {
                    return err(format!(
                        "Statement {n}: {k} is not allowed in this kind of policy"
                    ));
                }
                let p = parse_principal(n, v)?;
                if principal.is_some() {
                    return err(format!(
                        "Statement {n}: Principal conflicts with NotPrincipal"
                    ));
                }
                principal = Some(Targets {
                    negated: k == "NotPrincipal",
                    items: vec![p],
                });
            }
            "Condition" => conditions = parse_conditions(n, v)?,
            other => return err(format!("Statement {n}: unknown element {other:?}")),
        }
    }
    let Some(effect) = effect else {
        return err(format!("Statement {n}: missing Effect"));
    };
    let Some(action) = action else {
        return err(format!("Statement {n}: missing Action"));
    };
    if resource.is_none() && dialect != Dialect::IamTrust {
        return err(format!("Statement {n}: missing Resource"));
    }
    if principal.is_none() && dialect == Dialect::IamTrust {
        return err(format!("Statement {n}: missing Principal"));
    }
    Ok(Statement {
        sid,
        effect,
        action,
        resource,
        principal,
        conditions,
    })
}

fn validate_action(n: usize, a: &str) -> Result<(), PolicyError> {
    if a == "*" {
        return Ok(());
    }
    let ok = match a.split_once(':') {
        Some((svc, op)) => {
            !svc.is_empty()
                && !op.is_empty()
                && svc.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && op
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '*' || c == '?')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        err(format!(
            "Statement {n}: invalid action {a:?}; expected \"service:Action\""
        ))
    }
}

fn parse_principal(n: usize, v: &Json) -> Result<Principals, PolicyError> {
    match v {
        Json::String(s) if s == "*" => Ok(Principals {
            any: true,
            ..Default::default()
        }),
        Json::Object(o) => {
            let mut p = Principals::default();
            for (k, v) in o {
                let vals = strings(n, "Principal", v)?;
                match k.as_str() {
                    "AWS" => {
                        if vals.iter().any(|x| x == "*") {
                            p.any = true;
                        }
                        p.aws.extend(vals);
                    }
                    "Service" => p.service.extend(vals),
                    "Federated" => p.federated.extend(vals),
                    other => {
                        return err(format!("Statement {n}: unknown principal type {other:?}"));
                    }
                }
            }
            Ok(p)
        }
        _ => err(format!(
            "Statement {n}: Principal must be \"*\" or an object"
        )),
    }
}

fn parse_conditions(n: usize, v: &Json) -> Result<Vec<Condition>, PolicyError> {
    let Json::Object(ops) = v else {
        return err(format!("Statement {n}: Condition must be an object"));
    };
    let mut out = Vec::new();
    for (op_name, keys) in ops {
        let (qualifier, rest) = if let Some(r) = op_name.strip_prefix("ForAnyValue:") {
            (Some(Qualifier::ForAnyValue), r)
        } else if let Some(r) = op_name.strip_prefix("ForAllValues:") {
            (Some(Qualifier::ForAllValues), r)
        } else {
            (None, op_name.as_str())
        };
        let (base, if_exists) = match rest.strip_suffix("IfExists") {
            Some(b) => (b, true),
            None => (rest, false),
        };
        let Some(operator) = Operator::from_name(base) else {
            return err(format!(
                "Statement {n}: unknown condition operator {op_name:?}"
            ));
        };
        if if_exists && operator == Operator::Null {
            return err(format!("Statement {n}: Null cannot take IfExists"));
        }
        let Json::Object(keys) = keys else {
            return err(format!(
                "Statement {n}: condition {op_name} must map keys to values"
            ));
        };
        if keys.is_empty() {
            return err(format!("Statement {n}: condition {op_name} has no keys"));
        }
        for (key, vals) in keys {
            let scalar = |x: &Json| match x {
                Json::String(s) => Ok(s.clone()),
                Json::Bool(b) => Ok(b.to_string()),
                Json::Number(num) => Ok(num.to_string()),
                _ => err(format!(
                    "Statement {n}: condition values for {key:?} must be strings, numbers or booleans"
                )),
            };
            let values = match vals {
                Json::Array(a) => a.iter().map(scalar).collect::<Result<Vec<_>, _>>()?,
                other => vec![scalar(other)?],
            };
            if values.is_empty() {
                // An empty list is meaningful with ForAllValues ("only default features").
                if qualifier != Some(Qualifier::ForAllValues) {
                    return err(format!(
                        "Statement {n}: condition {op_name} for {key:?} has no values"
                    ));
                }
            }
            operator
                .validate_values(&values)
                .map_err(|m| PolicyError(format!("Statement {n}: {m}")))?;
            out.push(Condition {
                operator,
                qualifier,
                if_exists,
                key: key.clone(),
                values,
            });
        }
    }
    Ok(out)
}

/// Substitutes `${...}` variables (when `enabled`) and returns wildcard tokens, and whether
/// some variable could not be resolved (its text is kept, but the caller must not let it
/// match: see [`crate::Pattern::Never`]). `${*}`, `${?}`, `${$}` are literal `*`, `?`, `$`.
pub(crate) fn substitute(s: &str, enabled: bool, ctx: &dyn Context) -> (Vec<Tok>, bool) {
    let mut unresolved = false;
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s;
    let push_wild = |out: &mut Vec<Tok>, text: &str| {
        for c in text.chars() {
            out.push(match c {
                '*' => Tok::Star,
                '?' => Tok::One,
                c => Tok::Char(c),
            });
        }
    };
    while !rest.is_empty() {
        let found = if enabled { rest.find("${") } else { None };
        let Some(start) = found else {
            push_wild(&mut out, rest);
            break;
        };
        push_wild(&mut out, &rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            push_wild(&mut out, &rest[start..]);
            break;
        };
        let inner = &after[..end];
        let whole = &rest[start..start + 2 + end + 1];
        match inner {
            "*" => out.push(Tok::Char('*')),
            "?" => out.push(Tok::Char('?')),
            "$" => out.push(Tok::Char('$')),
            _ => {
                // `${key, 'default'}` (IAM) is honoured when the key is absent.
                let (key, default) = match inner.split_once(',') {
                    Some((k, d)) => {
                        let d = d.trim();
                        let d = d.strip_prefix('\'').and_then(|d| d.strip_suffix('\''));
                        (k.trim(), d)
                    }
                    None => (inner.trim(), None),
                };
                match (ctx.get(key), default) {
                    (Some(Value::One(v)), _) => out.extend(v.chars().map(Tok::Char)),
                    (None, Some(d)) => out.extend(d.chars().map(Tok::Char)),
                    _ => {
                        unresolved = true;
                        out.extend(whole.chars().map(Tok::Char));
                    }
                }
            }
        }
        rest = &after[end + 1..];
    }
    (out, unresolved)
}

/// The tokens as plain text (`*` and `?` as themselves).
pub(crate) fn literal(toks: &[Tok]) -> String {
    toks.iter()
        .map(|t| match t {
            Tok::Char(c) => *c,
            Tok::Star => '*',
            Tok::One => '?',
        })
        .collect()
}
