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
    /// The IAM ARN of the user, role or root, with its path (for a role session, the role's
    /// ARN, as `aws:PrincipalArn` is on AWS).
    pub principal_arn: String,
    /// Credentials from GetSessionToken (no MFA here): refused by IAM, as on AWS.
    pub from_get_session_token: bool,
}

impl Caller {
    /// The caller's ARN as IAM and STS show it (GetCallerIdentity): the user's (with its
    /// path), the root's, or the role session's `assumed-role/<role>/<session>`.
    pub fn arn(&self) -> String {
        match &self.principal {
            IamPrincipal::Role { role, session } => {
                format!(
                    "arn:aws:sts::{}:assumed-role/{role}/{session}",
                    self.account
                )
            }
            _ if !self.principal_arn.is_empty() => self.principal_arn.clone(),
            IamPrincipal::Root => format!("arn:aws:iam::{}:root", self.account),
            IamPrincipal::User(u) => format!("arn:aws:iam::{}:user/{u}", self.account),
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
    precheck(registry, &claim, services)?;
    verify_claim(registry, region, req, claim, opts)
}

/// What can be decided from a claim before the body is read: a service served here and a key
/// that exists. A request that fails this is refused without reading its body.
pub fn precheck(
    registry: &Registry,
    claim: &sekisho_sigv4::Claim,
    services: &[&str],
) -> Result<(), AuthFailure> {
    if !services.contains(&claim.service.as_str()) {
        return Err(AuthFailure::Service(claim.service.clone()));
    }
    if registry.credential(&claim.access_key).is_none() {
        return Err(AuthFailure::UnknownKey);
    }
    Ok(())
}

/// Verifies a claim already parsed (and [`precheck`]ed) against the whole request: region,
/// signature, and the credentials' token and expiry.
pub fn verify_claim(
    registry: &Registry,
    region: &str,
    req: &Request<'_>,
    claim: sekisho_sigv4::Claim,
    opts: sekisho_sigv4::Options,
) -> Result<(Caller, String), AuthFailure> {
    let Some(cred) = registry.credential(&claim.access_key) else {
        return Err(AuthFailure::UnknownKey);
    };
    if !(claim.region == region || (claim.service == "iam" && claim.region == "us-east-1")) {
        return Err(AuthFailure::Region(claim.region));
    }
    let now = now_secs() as i64;
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
        principal_arn: cred.principal_arn,
        from_get_session_token: cred.from_get_session_token,
    })
}

/// Why credentials authenticated earlier no longer stand ([`still_valid`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The key was deleted or deactivated, or its user or role was deleted.
    Gone,
    /// The user or role was deleted and another of the same name created.
    Replaced,
    /// Temporary credentials past their expiry.
    Expired,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Invalid::Gone => "access key deleted or deactivated, or its user or role deleted",
            Invalid::Replaced => "the user or role was deleted and re-created",
            Invalid::Expired => "credentials expired",
        })
    }
}

impl std::error::Error for Invalid {}

/// Whether credentials authenticated earlier (by a long-lived connection) still stand: the
/// key still exists and is active (a session still has its token and has not expired), and it
/// still stands for the same user or role (by unique id, not by name).
pub fn still_valid(registry: &Registry, caller: &Caller) -> Result<(), Invalid> {
    let Some(cred) = registry.credential(&caller.access_key_id) else {
        return Err(Invalid::Gone);
    };
    if cred.principal_id != caller.principal_id || cred.account_id != caller.account {
        return Err(Invalid::Replaced);
    }
    if cred.expiration.is_some_and(|e| now_secs() >= e) {
        return Err(Invalid::Expired);
    }
    Ok(())
}

/// Where and how a request arrived: the request's half of the condition keys, the same for
/// every protocol (control plane, iot-data, MQTT over WebSocket, S3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    /// The client's address: `aws:SourceIp` on a public endpoint, `aws:VpcSourceIp` on a
    /// private one.
    pub source_ip: Option<std::net::IpAddr>,
    /// A private endpoint's `aws:SourceVpce` and `aws:SourceVpc`.
    pub vpc: Option<(String, String)>,
    /// `aws:SecureTransport`: whether the request came over TLS (every Sekisho listener).
    pub secure_transport: bool,
    /// The time of the request, epoch seconds: `aws:CurrentTime` and `aws:EpochTime`.
    pub now: i64,
    /// `aws:RequestedRegion`, where the service knows it.
    pub region: Option<String>,
}

impl RequestContext {
    /// A request over TLS from `peer` at `now` (epoch seconds), through a private endpoint
    /// when `vpc` is set.
    pub fn tls(peer: std::net::IpAddr, vpc: Option<(&str, &str)>, now: i64) -> RequestContext {
        RequestContext {
            source_ip: Some(peer),
            vpc: vpc.map(|(e, v)| (e.to_owned(), v.to_owned())),
            secure_transport: true,
            now,
            region: None,
        }
    }

    /// The request's condition keys.
    pub fn keys(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(6);
        match (&self.vpc, self.source_ip) {
            (Some((vpce, vpc)), ip) => {
                out.push(("aws:SourceVpce", vpce.clone()));
                out.push(("aws:SourceVpc", vpc.clone()));
                if let Some(ip) = ip {
                    out.push(("aws:VpcSourceIp", ip.to_string()));
                }
            }
            (None, Some(ip)) => out.push(("aws:SourceIp", unmapped(ip).to_string())),
            (None, None) => {}
        }
        out.push(("aws:SecureTransport", self.secure_transport.to_string()));
        if let Some(r) = &self.region {
            out.push(("aws:RequestedRegion", r.clone()));
        }
        out.push(("aws:EpochTime", self.now.to_string()));
        if let Ok(t) = time::OffsetDateTime::from_unix_timestamp(self.now)
            && let Ok(s) = t.format(&time::format_description::well_known::Rfc3339)
        {
            out.push(("aws:CurrentTime", s));
        }
        out
    }
}

/// An IPv4 client on a dual-stack socket shows as `::ffff:a.b.c.d`; policies name it as IPv4.
pub fn unmapped(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// The caller's half of the condition keys: `aws:PrincipalAccount`, `aws:PrincipalArn`,
/// `aws:PrincipalType`, `aws:userid`, `aws:username` (users), and the keys its credentials
/// carry (the credential provider's `credentials-iot:*`).
pub fn principal_keys(caller: &Caller) -> Vec<(String, String)> {
    let (kind, userid) = match &caller.principal {
        IamPrincipal::Root => ("Account", caller.account.clone()),
        IamPrincipal::User(_) => ("User", caller.principal_id.clone()),
        IamPrincipal::Role { session, .. } => {
            ("AssumedRole", format!("{}:{session}", caller.principal_id))
        }
    };
    let mut out = vec![
        ("aws:PrincipalAccount".to_string(), caller.account.clone()),
        (
            "aws:PrincipalArn".to_string(),
            if caller.principal_arn.is_empty() {
                caller.arn()
            } else {
                caller.principal_arn.clone()
            },
        ),
        ("aws:PrincipalType".to_string(), kind.to_string()),
        ("aws:userid".to_string(), userid),
    ];
    if let IamPrincipal::User(u) = &caller.principal {
        out.push(("aws:username".to_string(), u.clone()));
    }
    out.extend(caller.context.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// Every condition key of one request by `caller`: [`principal_keys`] and
/// [`RequestContext::keys`]. The one set used by every protocol.
pub fn context_keys(caller: &Caller, request: &RequestContext) -> Vec<(String, String)> {
    let mut out = principal_keys(caller);
    out.extend(request.keys().into_iter().map(|(k, v)| (k.to_string(), v)));
    out
}

/// The one IAM decision, for every kind of caller and every protocol: whether the caller's
/// IAM policies allow `action` on `resource` for this request. The account root may do
/// everything in its account; users and role sessions need an Allow in their identity policies
/// (and in the session policy, if any) and no Deny. `extra` adds the service's own keys
/// (`s3:prefix`, ...).
pub fn is_authorized(
    registry: &Registry,
    caller: &Caller,
    request: &RequestContext,
    action: &str,
    resource: &str,
    extra: &[(&str, String)],
) -> bool {
    if caller.principal == IamPrincipal::Root {
        return true;
    }
    let Some(policies) = registry.identity_policies(&caller.account, &caller.principal) else {
        return false;
    };
    let mut ctx = MapContext::new();
    for (k, v) in context_keys(caller, request) {
        ctx.set(&k, v);
    }
    for (k, v) in extra {
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
