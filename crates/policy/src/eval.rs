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
    first_decision(
        policies.into_iter().flat_map(|p| p.statements.iter()),
        action,
        resource,
        ctx,
    )
}

/// Longest resource (an ARN, at most 2048 characters on AWS) and action a decision looks at: a
/// longer one is denied outright, so that no request can make matching cost more than a
/// bounded amount (wildcard matching is O(pattern x input)).
pub const MAX_DECIDED_LEN: usize = 4096;

/// Explicit Deny wins (and stops), then any Allow, else the default deny. Allow statements are
/// not evaluated once one has matched.
fn first_decision<'a>(
    statements: impl Iterator<Item = &'a BoundStatement>,
    action: &str,
    resource: &str,
    ctx: &dyn Context,
) -> Decision {
    if resource.len() > MAX_DECIDED_LEN || action.len() > MAX_DECIDED_LEN {
        return Decision::ImplicitDeny;
    }
    let mut allowed = false;
    for st in statements {
        if (st.effect == Effect::Deny || !allowed) && statement_matches(st, action, resource, ctx) {
            match st.effect {
                Effect::Deny => return Decision::ExplicitDeny,
                Effect::Allow => allowed = true,
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
    if resource.len() > MAX_DECIDED_LEN || action.len() > MAX_DECIDED_LEN {
        return Evaluation {
            decision: Decision::ImplicitDeny,
            allowed_by,
            denied_by,
        };
    }
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

/// Who is asking, for the `Principal` element of a trust (resource) policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// An IAM identity: the account root, a user, or a role session.
    Aws {
        /// Its account id.
        account: &'a str,
        /// Its ARN (`arn:aws:iam::A:root`, `arn:aws:iam::A:user/N`,
        /// `arn:aws:sts::A:assumed-role/R/S`).
        arn: &'a str,
        /// For a role session, the role's ARN (`arn:aws:iam::A:role/R`).
        role_arn: Option<&'a str>,
    },
    /// An AWS service principal, e.g. `credentials.iot.amazonaws.com`.
    Service(&'a str),
    /// A federated identity provider, e.g. `cognito-identity.amazonaws.com`.
    Federated(&'a str),
}

fn aws_principal_matches(entry: &str, caller: &Caller<'_>) -> bool {
    let Caller::Aws {
        account,
        arn,
        role_arn,
    } = *caller
    else {
        return false;
    };
    if entry == "*" {
        return true;
    }
    // An account id, or its root ARN, names every identity of the account (whose own
    // policies must then allow the action too).
    if entry == account || entry == format!("arn:aws:iam::{account}:root") {
        return true;
    }
    entry == arn || role_arn == Some(entry)
}

fn principal_matches(p: &crate::Principals, caller: &Caller<'_>) -> bool {
    if p.any {
        return true;
    }
    match caller {
        Caller::Aws { .. } => p.aws.iter().any(|e| aws_principal_matches(e, caller)),
        Caller::Service(s) => p.service.iter().any(|e| e == s),
        Caller::Federated(s) => p.federated.iter().any(|e| e == s),
    }
}

/// Evaluates a trust policy (IAM dialect, parsed with `Dialect::IamTrust`) for `caller` doing
/// `action` (lower case, e.g. `sts:assumerole`): statements apply when their `Principal` (or
/// `NotPrincipal`) matches the caller. Explicit Deny wins, then Allow, else the default deny.
pub fn decide_trust(
    policy: &crate::Policy,
    caller: &Caller<'_>,
    action: &str,
    ctx: &dyn Context,
) -> Decision {
    let bound = policy.bind(ctx);
    // Trust statements have no Resource; one that has one matches nothing.
    let naming_caller = policy
        .statements
        .iter()
        .zip(&bound.statements)
        .filter(|(st, _)| {
            st.principal
                .as_ref()
                .is_some_and(|t| t.items.iter().any(|p| principal_matches(p, caller)) != t.negated)
        })
        .map(|(_, b)| b);
    first_decision(naming_caller, action, "", ctx)
}

#[cfg(test)]
mod trust_tests {
    use super::*;
    use crate::{Dialect, EmptyContext, Policy};

    fn trust(principal: &str) -> Policy {
        let doc = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{principal},"Action":"sts:AssumeRole"}}]}}"#
        );
        Policy::parse(&doc, Dialect::IamTrust).unwrap()
    }

    const USER: Caller<'static> = Caller::Aws {
        account: "111111111111",
        arn: "arn:aws:iam::111111111111:user/alice",
        role_arn: None,
    };
    const SESSION: Caller<'static> = Caller::Aws {
        account: "111111111111",
        arn: "arn:aws:sts::111111111111:assumed-role/ops/s1",
        role_arn: Some("arn:aws:iam::111111111111:role/ops"),
    };

    #[test]
    fn principals_by_account_user_role_and_service() {
        let ctx = EmptyContext;
        let d = |p: &str, c: &Caller<'_>| decide_trust(&trust(p), c, "sts:assumerole", &ctx);
        for p in [
            r#"{"AWS":"111111111111"}"#,
            r#"{"AWS":"arn:aws:iam::111111111111:root"}"#,
            r#"{"AWS":"arn:aws:iam::111111111111:user/alice"}"#,
            r#"{"AWS":["arn:aws:iam::222222222222:root","arn:aws:iam::111111111111:user/alice"]}"#,
            r#""*""#,
        ] {
            assert_eq!(d(p, &USER), Decision::Allowed, "{p}");
        }
        for p in [
            r#"{"AWS":"222222222222"}"#,
            r#"{"AWS":"arn:aws:iam::111111111111:user/bob"}"#,
            r#"{"AWS":"arn:aws:iam::111111111111:role/ops"}"#,
            r#"{"Service":"credentials.iot.amazonaws.com"}"#,
        ] {
            assert_eq!(d(p, &USER), Decision::ImplicitDeny, "{p}");
        }
        assert_eq!(
            d(r#"{"AWS":"arn:aws:iam::111111111111:role/ops"}"#, &SESSION),
            Decision::Allowed
        );
        let svc = Caller::Service("credentials.iot.amazonaws.com");
        assert_eq!(
            d(r#"{"Service":"credentials.iot.amazonaws.com"}"#, &svc),
            Decision::Allowed
        );
        assert_eq!(d(r#"{"AWS":"111111111111"}"#, &svc), Decision::ImplicitDeny);
    }

    #[test]
    fn a_federated_provider_is_trusted_only_where_named_and_its_conditions_hold() {
        let doc = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow",
            "Principal":{"Federated":"cognito-identity.amazonaws.com"},
            "Action":"sts:AssumeRoleWithWebIdentity",
            "Condition":{"StringEquals":{"cognito-identity.amazonaws.com:aud":"us-east-1:pool"},
                "ForAnyValue:StringLike":{"cognito-identity.amazonaws.com:amr":"authenticated"}}}]}"#;
        let p = Policy::parse(doc, Dialect::IamTrust).unwrap();
        let cognito = Caller::Federated("cognito-identity.amazonaws.com");
        let ctx = |aud: &str, amr: &[&str]| {
            let mut c = crate::MapContext::new();
            c.set("cognito-identity.amazonaws.com:aud", aud);
            c.set_many(
                "cognito-identity.amazonaws.com:amr",
                amr.iter().map(|s| s.to_string()).collect(),
            );
            c
        };
        let act = "sts:assumerolewithwebidentity";
        let good = ctx("us-east-1:pool", &["authenticated", "dev"]);
        assert_eq!(decide_trust(&p, &cognito, act, &good), Decision::Allowed);
        for bad in [
            ctx("us-east-1:other", &["authenticated"]),
            ctx("us-east-1:pool", &["unauthenticated"]),
        ] {
            assert_eq!(
                decide_trust(&p, &cognito, act, &bad),
                Decision::ImplicitDeny
            );
        }
        // Another provider, a service, or another action: not trusted.
        let other = Caller::Federated("accounts.google.com");
        assert_eq!(decide_trust(&p, &other, act, &good), Decision::ImplicitDeny);
        let svc = Caller::Service("cognito-identity.amazonaws.com");
        assert_eq!(decide_trust(&p, &svc, act, &good), Decision::ImplicitDeny);
        assert_eq!(
            decide_trust(&p, &cognito, "sts:assumerole", &good),
            Decision::ImplicitDeny
        );
    }

    #[test]
    fn deny_wins_and_actions_and_conditions_count() {
        let ctx = EmptyContext;
        let doc = r#"{"Version":"2012-10-17","Statement":[
            {"Effect":"Allow","Principal":{"AWS":"111111111111"},"Action":"sts:AssumeRole"},
            {"Effect":"Deny","Principal":{"AWS":"arn:aws:iam::111111111111:user/alice"},"Action":"sts:*"}]}"#;
        let p = Policy::parse(doc, Dialect::IamTrust).unwrap();
        assert_eq!(
            decide_trust(&p, &USER, "sts:assumerole", &ctx),
            Decision::ExplicitDeny
        );
        assert_eq!(
            decide_trust(&p, &SESSION, "sts:assumerole", &ctx),
            Decision::Allowed
        );
        assert_eq!(
            decide_trust(&p, &SESSION, "sts:tagsession", &ctx),
            Decision::ImplicitDeny
        );
        let cond = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},
            "Action":"sts:AssumeRole","Condition":{"StringEquals":{"sts:ExternalId":"x"}}}]}"#;
        let p = Policy::parse(cond, Dialect::IamTrust).unwrap();
        assert_eq!(
            decide_trust(&p, &USER, "sts:assumerole", &ctx),
            Decision::ImplicitDeny
        );
        let mut m = crate::MapContext::new();
        m.set("sts:ExternalId", "x");
        assert_eq!(
            decide_trust(&p, &USER, "sts:assumerole", &m),
            Decision::Allowed
        );
    }
}
