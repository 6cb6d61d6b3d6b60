//! The AWS policy language, as AWS IoT Core and IAM use it.
//!
//! Three steps, all pure:
//! 1. [`Policy::parse`] checks a JSON document and gives `MalformedPolicy` messages that say
//!    what is wrong.
//! 2. [`Policy::bind`] substitutes policy variables from a [`Context`] (for IoT: the
//!    connection's client id, thing and certificate) and compiles every `Action`, `Resource` and
//!    condition value into a [`Pattern`]. Unresolved variables stay literal and so fail to match.
//! 3. [`decide`] / [`explain`] evaluate bound policies for one action on one resource: an
//!    explicit Deny wins, then any Allow, else the default deny.
//!
//! It must never panic on any input, do I/O, or know about MQTT or sockets.

#![warn(missing_docs)]

mod condition;
mod eval;
mod parse;
mod pattern;

use std::collections::HashMap;

pub use condition::{Operator, Qualifier, parse_date};
pub use eval::{Caller, Decision, Evaluation, MAX_DECIDED_LEN, decide, decide_trust, explain};
pub use parse::{Dialect, MAX_IOT_POLICY_CHARS, PolicyError, non_whitespace_len};
pub use pattern::Pattern;

/// Allow or Deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Allow.
    Allow,
    /// Deny.
    Deny,
}

/// A parsed (not yet bound) policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Whether `${...}` variables are substituted (`Version` 2012-10-17).
    pub variables: bool,
    /// Statements in document order.
    pub statements: Vec<Statement>,
}

/// A list of patterns as written, or its negation (`NotAction`, `NotResource`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets<T> {
    /// True for the `Not...` form.
    pub negated: bool,
    /// The entries.
    pub items: Vec<T>,
}

/// The `Principal` element (IAM dialect: trust and resource policies).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Principals {
    /// `"Principal": "*"` or `{"AWS": "*"}`.
    pub any: bool,
    /// `AWS` entries: account ids, account root ARNs, user or role ARNs.
    pub aws: Vec<String>,
    /// `Service` entries, e.g. `credentials.iot.amazonaws.com`.
    pub service: Vec<String>,
    /// `Federated` entries.
    pub federated: Vec<String>,
}

/// One statement as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// `Sid`.
    pub sid: Option<String>,
    /// `Effect`.
    pub effect: Effect,
    /// `Action` / `NotAction`.
    pub action: Targets<String>,
    /// `Resource` / `NotResource` (absent only in IAM trust policies).
    pub resource: Option<Targets<String>>,
    /// `Principal` / `NotPrincipal` (IAM dialect only).
    pub principal: Option<Targets<Principals>>,
    /// `Condition` blocks.
    pub conditions: Vec<Condition>,
}

/// One condition: `"Operator": {"key": [values]}` for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The operator.
    pub operator: Operator,
    /// `ForAnyValue:` / `ForAllValues:`.
    pub qualifier: Option<Qualifier>,
    /// The `...IfExists` suffix.
    pub if_exists: bool,
    /// The condition key as written.
    pub key: String,
    /// The values as written (booleans and numbers as their JSON text).
    pub values: Vec<String>,
}

/// A value from the request context.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// A single-valued key.
    One(&'a str),
    /// A multi-valued key (for `ForAnyValue` / `ForAllValues`).
    Many(&'a [String]),
}

/// The request context: policy variables and condition keys.
pub trait Context {
    /// The value of `key`, or `None` when the key is absent.
    fn get(&self, key: &str) -> Option<Value<'_>>;
}

/// A context backed by a map; keys compare case-insensitively.
#[derive(Debug, Clone, Default)]
pub struct MapContext {
    values: HashMap<String, Vec<String>>,
    multi: HashMap<String, bool>,
}

impl MapContext {
    /// An empty context.
    pub fn new() -> MapContext {
        MapContext::default()
    }

    /// Sets a single-valued key.
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        let k = key.to_ascii_lowercase();
        self.multi.insert(k.clone(), false);
        self.values.insert(k, vec![value.into()]);
        self
    }

    /// Sets a multi-valued key.
    pub fn set_many(&mut self, key: &str, values: Vec<String>) -> &mut Self {
        let k = key.to_ascii_lowercase();
        self.multi.insert(k.clone(), true);
        self.values.insert(k, values);
        self
    }
}

impl Context for MapContext {
    fn get(&self, key: &str) -> Option<Value<'_>> {
        let k = key.to_ascii_lowercase();
        let v = self.values.get(&k)?;
        if self.multi.get(&k).copied().unwrap_or(false) {
            Some(Value::Many(v))
        } else {
            v.first().map(|s| Value::One(s))
        }
    }
}

/// A context with nothing in it.
pub struct EmptyContext;

impl Context for EmptyContext {
    fn get(&self, _: &str) -> Option<Value<'_>> {
        None
    }
}

/// A policy with its variables bound and its patterns compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPolicy {
    pub(crate) statements: Vec<BoundStatement>,
}

impl BoundPolicy {
    /// Whether any condition of the policy reads `key` (case-insensitive): lets a caller
    /// supply costly keys (the time) only to policies that use them.
    pub fn reads_key(&self, key: &str) -> bool {
        self.statements
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.key.eq_ignore_ascii_case(key))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BoundStatement {
    pub(crate) effect: Effect,
    pub(crate) action: Targets<Pattern>,
    pub(crate) resource: Option<Targets<Pattern>>,
    pub(crate) conditions: Vec<BoundCondition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BoundCondition {
    pub(crate) operator: Operator,
    pub(crate) qualifier: Option<Qualifier>,
    pub(crate) if_exists: bool,
    pub(crate) key: String,
    pub(crate) values: Vec<String>,
    pub(crate) patterns: Vec<Pattern>,
    /// The outcome when a value holds an unresolved variable: false in an Allow, true in a
    /// Deny (the condition cannot be decided, so it never widens access).
    pub(crate) forced: Option<bool>,
}

impl Policy {
    /// Binds variables from `ctx` and compiles the patterns.
    pub fn bind(&self, ctx: &dyn Context) -> BoundPolicy {
        let subst = |s: &str| parse::substitute(s, self.variables, ctx);
        // An element with an unresolved variable never matches (AWS: access denied), and
        // never widens a grant: a negated list (`NotAction`, `NotResource`) of an Allow that
        // holds one grants nothing, and a condition value that holds one fails the condition
        // of an Allow and holds for a Deny.
        let targets = |t: &Targets<String>, allow: bool, lowercase: bool| {
            let mut broken = false;
            let items = t
                .items
                .iter()
                .map(|x| {
                    let (toks, unresolved) = subst(x);
                    broken |= unresolved;
                    if unresolved {
                        Pattern::Never
                    } else {
                        Pattern::from_toks(toks, lowercase)
                    }
                })
                .collect();
            if broken && t.negated && allow {
                Targets {
                    negated: false,
                    items: Vec::new(),
                }
            } else {
                Targets {
                    negated: t.negated,
                    items,
                }
            }
        };
        let statements = self
            .statements
            .iter()
            .map(|st| {
                let allow = st.effect == Effect::Allow;
                BoundStatement {
                    effect: st.effect,
                    action: targets(&st.action, allow, true),
                    resource: st.resource.as_ref().map(|r| targets(r, allow, false)),
                    conditions: st
                        .conditions
                        .iter()
                        .map(|c| {
                            let mut unresolved = false;
                            let toks: Vec<_> = c
                                .values
                                .iter()
                                .map(|v| {
                                    let (t, u) = subst(v);
                                    unresolved |= u;
                                    t
                                })
                                .collect();
                            BoundCondition {
                                operator: c.operator,
                                qualifier: c.qualifier,
                                if_exists: c.if_exists,
                                key: c.key.clone(),
                                values: toks.iter().map(|t| parse::literal(t)).collect(),
                                patterns: toks
                                    .into_iter()
                                    .map(|t| Pattern::from_toks(t, c.operator.case_insensitive()))
                                    .collect(),
                                forced: unresolved.then_some(!allow),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        BoundPolicy { statements }
    }
}
