//! The Authenticator for IAM callers: SigV4 over long-term keys (an account's root or its IAM
//! users) and STS temporary credentials (with their session token and expiry), and the
//! authorization of such callers by their IAM policies. Used by the control plane and by the
//! device HTTPS data plane; the protocols map [`AuthFailure`] to their own error shapes.

use sekisho_policy::{Decision, Dialect, MapContext, Policy, decide};
use sekisho_registry::{IamPrincipal, Registry, now_secs};
use sekisho_sigv4::{Request, SigError};

/// A verified IAM caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Account.
    pub account: String,
    /// Who the credentials stand for.
    pub principal: IamPrincipal,
    /// The session policy of AssumeRole credentials.
    pub session_policy: Option<String>,
    /// True for temporary (STS) credentials.
    pub temporary: bool,
    /// Expiry of temporary credentials, epoch seconds.
    pub expiration: Option<f64>,
    /// The access key id used.
    pub access_key_id: String,
    /// Condition keys carried by the credentials (credential provider sessions).
    pub context: std::collections::BTreeMap<String, String>,
    /// The unique id of the user or role (the account id for the root) when authenticated:
    /// a long-lived connection is cut once its credentials stand for anyone else.
    pub principal_id: String,
}

impl Caller {
    /// The caller's ARN as IAM and STS show it.
    pub fn arn(&self) -> String {
        match &self.principal {
            IamPrincipal::Root => format!("arn:aws:iam::{}:root", self.account),
            IamPrincipal::User(u) => format!("arn:aws:iam::{}:user/{u}", self.account),
            IamPrincipal::Role { role, session } => {
                format!(
                    "arn:aws:sts::{}:assumed-role/{role}/{session}",
                    self.account
                )
            }
        }
    }
}

/// A request's headers as SigV4 reads them: lower-case names, values that are text.
pub fn header_pairs(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_ascii_lowercase(), v.to_owned()))
        })
        .collect()
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// The signature is missing, malformed, stale or wrong.
    Signature(SigError),
    /// Unknown or inactive access key, or a temporary key without its token.
    UnknownKey,
    /// Temporary credentials past their expiry.
    Expired,
    /// Signed for a service not served here.
    Service(String),
    /// Signed for another region.
    Region(String),
}

/// Authenticates a SigV4 request. `services` are the signing names accepted; the one used is
/// returned with the caller. IAM (`iam`) is global: botocore signs it for us-east-1.
pub fn authenticate(
    registry: &Registry,
    region: &str,
    req: &Request<'_>,
    services: &[&str],
    opts: sekisho_sigv4::Options,
) -> Result<(Caller, String), AuthFailure> {
    let claim = sekisho_sigv4::parse(req).map_err(AuthFailure::Signature)?;
    if !services.contains(&claim.service.as_str()) {
        return Err(AuthFailure::Service(claim.service));
    }
    let Some(cred) = registry.credential(&claim.access_key) else {
        return Err(AuthFailure::UnknownKey);
    };
    if !(claim.region == region || (claim.service == "iam" && claim.region == "us-east-1")) {
        return Err(AuthFailure::Region(claim.region));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    sekisho_sigv4::verify(req, &claim, &cred.secret_access_key, now, opts)
        .map_err(AuthFailure::Signature)?;
    let caller = caller_of(cred, claim.access_key, claim.security_token.as_deref())?;
    Ok((caller, claim.service))
}

/// Authenticates an S3 presigned URL of Signature Version 2 (what botocore presigns for S3 by
/// default). `resource` is `/<bucket>/<key>` as encoded on the wire.
pub fn authenticate_v2_presigned(
    registry: &Registry,
    req: &Request<'_>,
    resource: &str,
) -> Result<Caller, AuthFailure> {
    let claim = sekisho_sigv4::parse_v2_query(req.query)
        .ok_or(AuthFailure::Signature(SigError::Missing))?;
    let Some(cred) = registry.credential(&claim.access_key) else {
        return Err(AuthFailure::UnknownKey);
    };
    let now = now_secs() as i64;
    sekisho_sigv4::verify_v2_query(req, resource, &claim, &cred.secret_access_key, now)
        .map_err(AuthFailure::Signature)?;
    caller_of(cred, claim.access_key, claim.security_token.as_deref())
}

/// The caller a verified signature stands for; temporary credentials need their session token
/// and must not have expired.
fn caller_of(
    cred: sekisho_registry::Credential,
    access_key_id: String,
    token: Option<&str>,
) -> Result<Caller, AuthFailure> {
    if let Some(t) = &cred.token {
        // Constant-time: the token is a bearer secret.
        let presented = token.unwrap_or_default().as_bytes();
        if presented.len() != t.len()
            || aws_lc_rs::constant_time::verify_slices_are_equal(presented, t.as_bytes()).is_err()
        {
            return Err(AuthFailure::UnknownKey);
        }
        if cred.expiration.is_some_and(|e| now_secs() >= e) {
            return Err(AuthFailure::Expired);
        }
    }
    Ok(Caller {
        account: cred.account_id,
        temporary: cred.token.is_some(),
        expiration: cred.expiration,
        principal: cred.principal,
        session_policy: cred.session_policy,
        access_key_id,
        context: cred.context,
        principal_id: cred.principal_id,
    })
}

/// Whether credentials authenticated earlier (by a long-lived connection) still stand: the
/// key still exists and is active (a session still has its token and has not expired), and it
/// still stands for the same user or role (by unique id, not by name). The error says why not.
pub fn still_valid(registry: &Registry, caller: &Caller) -> Result<(), &'static str> {
    let Some(cred) = registry.credential(&caller.access_key_id) else {
        return Err("access key deleted or deactivated, or its user or role deleted");
    };
    if cred.principal_id != caller.principal_id || cred.account_id != caller.account {
        return Err("the user or role was deleted and re-created");
    }
    if cred.expiration.is_some_and(|e| now_secs() >= e) {
        return Err("credentials expired");
    }
    Ok(())
}

/// Whether the caller's IAM policies allow `action` on `resource`: the account root may do
/// everything in its account; users and role sessions need an Allow in their identity
/// policies (and in the session policy, if any) and no Deny.
pub fn is_authorized(registry: &Registry, caller: &Caller, action: &str, resource: &str) -> bool {
    is_authorized_in(registry, caller, action, resource, &[])
}

/// [`is_authorized`] with request condition keys (`s3:prefix`, `aws:SourceIp`, ...).
pub fn is_authorized_in(
    registry: &Registry,
    caller: &Caller,
    action: &str,
    resource: &str,
    request: &[(&str, String)],
) -> bool {
    if caller.principal == IamPrincipal::Root {
        return true;
    }
    let Some(policies) = registry.identity_policies(&caller.account, &caller.principal) else {
        return false;
    };
    let mut ctx = MapContext::new();
    ctx.set("aws:PrincipalAccount", caller.account.clone());
    ctx.set("aws:PrincipalArn", caller.arn());
    if let IamPrincipal::User(u) = &caller.principal {
        ctx.set("aws:username", u.clone());
    }
    for (k, v) in &caller.context {
        ctx.set(k, v.clone());
    }
    for (k, v) in request {
        ctx.set(k, v.clone());
    }
    let action = action.to_ascii_lowercase();
    let bound: Vec<_> = policies.iter().map(|p| p.bind(&ctx)).collect();
    let identity = decide(&bound, &action, resource, &ctx);
    let session = match &caller.session_policy {
        None => Decision::Allowed,
        Some(doc) => match Policy::parse(doc, Dialect::IamIdentity) {
            Ok(p) => decide([&p.bind(&ctx)], &action, resource, &ctx),
            Err(_) => Decision::ImplicitDeny,
        },
    };
    identity.is_allowed() && session.is_allowed()
}
