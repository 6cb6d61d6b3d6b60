//! Evaluation: explicit Deny wins, then Allow, else the default (implicit) deny.

use crate::condition::holds;
use crate::{BoundPolicy, BoundStatement, Context, Effect, Targets};

/// The outcome of an authorization check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// At least one Allow matched and no Deny did.
    Allowed,
    /// A Deny statement matched.
    ExplicitDeny,
    /// Nothing matched.
    ImplicitDeny,
}

impl Decision {
    /// True for [`Decision::Allowed`].
    pub fn is_allowed(self) -> bool {
        self == Decision::Allowed
    }
}

/// A decision with the policies (by index) that made it, for TestAuthorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The decision.
    pub decision: Decision,
    /// Indices of policies with a matching Allow statement.
    pub allowed_by: Vec<usize>,
    /// Indices of policies with a matching Deny statement.
    pub denied_by: Vec<usize>,
}

fn targets_match(t: &Targets<crate::Pattern>, s: &str) -> bool {
    t.items.iter().any(|p| p.matches(s)) != t.negated
}

fn statement_matches(st: &BoundStatement, action: &str, resource: &str, ctx: &dyn Context) -> bool {
    targets_match(&st.action, action)
        && st
            .resource
            .as_ref()
            .is_none_or(|r| targets_match(r, resource))
        && st.conditions.iter().all(|c| holds(c, ctx))
}

/// Decides whether `action` (lower case, `service:action`) on `resource` is allowed by the
/// policies. Stops at the first matching Deny.
pub fn decide<'a>(
    policies: impl IntoIterator<Item = &'a BoundPolicy>,
    action: &str,
    resource: &str,
    ctx: &dyn Context,
) -> Decision {
    let mut allowed = false;
    for p in policies {
        for st in &p.statements {
            if (st.effect == Effect::Deny || !allowed)
                && statement_matches(st, action, resource, ctx)
            {
                match st.effect {
                    Effect::Deny => return Decision::ExplicitDeny,
                    Effect::Allow => allowed = true,
                }
            }
        }
    }
    if allowed {
        Decision::Allowed
    } else {
        Decision::ImplicitDeny
    }
}

/// Like [`decide`], but reports which policies allowed and denied.
pub fn explain<'a>(
    policies: impl IntoIterator<Item = &'a BoundPolicy>,
    action: &str,
    resource: &str,
    ctx: &dyn Context,
) -> Evaluation {
    let mut allowed_by = Vec::new();
    let mut denied_by = Vec::new();
    for (i, p) in policies.into_iter().enumerate() {
        let mut allow = false;
        let mut deny = false;
        for st in &p.statements {
            if statement_matches(st, action, resource, ctx) {
                match st.effect {
                    Effect::Deny => deny = true,
                    Effect::Allow => allow = true,
                }
            }
        }
        if deny {
            denied_by.push(i);
        }
        if allow {
            allowed_by.push(i);
        }
    }
    let decision = if !denied_by.is_empty() {
        Decision::ExplicitDeny
    } else if !allowed_by.is_empty() {
        Decision::Allowed
    } else {
        Decision::ImplicitDeny
    };
    Evaluation {
        decision,
        allowed_by,
        denied_by,
    }
}
