//! The Authorizer: a connection's principal, its policy variables, and the decisions.
//!
//! Policies are bound once per registry generation (not per message): a change of policy,
//! attachment, thing or certificate status bumps the generation, and the next check rebinds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use sekisho_policy::{BoundPolicy, Context, Decision, Value, decide};
use sekisho_registry::{
    AccountId, CertStatus, CertificateId, CertificateIdentity, ClientId, PrincipalId, Registry,
    RegistryError,
};

/// The variables and condition keys of one connection.
#[derive(Debug, Clone, Default)]
pub struct ConnContext {
    /// `iot:ClientId` (absent over HTTPS).
    pub client_id: Option<String>,
    /// `aws:SourceIp` (public endpoints only).
    pub source_ip: Option<String>,
    /// `aws:SourceVpce`, `aws:SourceVpc` and `aws:VpcSourceIp` (private endpoints only).
    pub vpc: Option<(String, String, String)>,
    /// `iot:ConnectAttributes`.
    pub connect_attributes: Vec<String>,
    /// `iot:CertificateId`.
    pub certificate_id: Option<String>,
    thing_name: Option<String>,
    thing_type: Option<String>,
    is_attached: &'static str,
    attributes: HashMap<String, String>,
    /// Where the certificate's identity fields are read from (memory does not hold them).
    cert: Option<CertSource>,
    /// An IAM caller's keys ([`crate::authn::principal_keys`]), by lower-cased name.
    iam_keys: Option<Arc<HashMap<String, String>>>,
    /// `aws:EpochTime` and `aws:CurrentTime` as of the last [`ConnContext::set_time`] (boxed:
    /// only connections whose policies read the time pay for it).
    time: Option<Box<(i64, String, String)>>,
    /// Lower-cased `iot:certificate.*` keys to (values, multi-valued), built on first use.
    cert_vars: std::sync::OnceLock<CertVars>,
    /// Set when the certificate's fields could not be read (a database error): until a bind
    /// reads them, every decision of this context denies.
    cert_unreadable: Flag,
}

/// A flag a shared reference can set (`Context::get` takes `&self`).
#[derive(Debug, Default)]
struct Flag(std::sync::atomic::AtomicBool);

impl Clone for Flag {
    fn clone(&self) -> Self {
        Flag(std::sync::atomic::AtomicBool::new(self.get()))
    }
}

impl Flag {
    fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self, v: bool) {
        self.0.store(v, std::sync::atomic::Ordering::Relaxed);
    }
}

type CertVars = HashMap<String, (Vec<String>, bool)>;

/// The registry and account a certificate's PEM is read from, on the first use of an
/// `iot:Certificate.*` variable (most policies name none, and a million certificates' PEMs and
/// parsed fields in memory cost 2.5 GB).
#[derive(Clone)]
struct CertSource {
    registry: Arc<Registry>,
    account: String,
}

impl std::fmt::Debug for CertSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSource")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// Every `iot:Certificate.*` variable of a certificate, by lower-cased key.
fn cert_vars(info: &sekisho_pki::CertInfo) -> CertVars {
    let mut out = CertVars::new();
    let mut add = |key: String, vals: Vec<String>, multi: bool| {
        out.insert(
            format!("iot:certificate.{key}").to_ascii_lowercase(),
            (vals, multi),
        );
    };
    add("SerialNumber".into(), vec![info.serial.clone()], false);
    add("AvailableKeys".into(), info.available_keys(), true);
    for (prefix, fields) in [
        ("Subject", &info.subject),
        ("Issuer", &info.issuer),
        ("Subject.AlternativeName", &info.subject_alt),
        ("Issuer.AlternativeName", &info.issuer_alt),
    ] {
        for name in fields.keys() {
            let base = format!("{prefix}.{name}");
            let owned = |v: Vec<&str>| v.iter().map(|s| s.to_string()).collect();
            if let Some((v, _)) = info.lookup(&base) {
                add(base.clone(), owned(v), false);
            }
            if let Some((v, _)) = info.lookup(&format!("{base}.List")) {
                add(format!("{base}.List"), owned(v), true);
            }
            for i in 1..=5 {
                if let Some((v, _)) = info.lookup(&format!("{base}.{i}")) {
                    add(format!("{base}.{i}"), owned(v), false);
                }
            }
        }
    }
    out
}

fn strip_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

impl ConnContext {
    /// Fills the thing and certificate parts from an identity of `registry`.
    pub fn set_identity(&mut self, id: &CertificateIdentity, registry: &Arc<Registry>) {
        // `iot:CertificateId` names a certificate only: an IAM principal has none.
        let certificate_id = id.principal.certificate().map(|c| c.as_str().to_owned());
        // Certificate variables are tabulated on first use only: most policies never name
        // them, and a table per connection would cost about 2 KB of every idle connection.
        // A certificate's fields never change (its id is the hash of its DER), so a rebind
        // for the same certificate keeps the table instead of reading the PEM again.
        let same = certificate_id == self.certificate_id
            && self
                .cert
                .as_ref()
                .is_some_and(|s| s.account == id.account_id.as_str());
        if !same {
            self.cert_vars = std::sync::OnceLock::new();
            self.cert = certificate_id.as_ref().map(|_| CertSource {
                registry: registry.clone(),
                account: id.account_id.as_str().to_owned(),
            });
        }
        self.certificate_id = certificate_id;
        self.cert_unreadable.set(false);
        self.thing_name = id.thing.as_ref().map(|t| t.name.clone());
        self.thing_type = id.thing.as_ref().and_then(|t| t.thing_type.clone());
        self.is_attached = if id.thing.is_some() { "true" } else { "false" };
        self.attributes = id
            .thing
            .as_ref()
            .map(|t| t.attributes.clone().into_iter().collect())
            .unwrap_or_default();
    }

    /// Sets `aws:EpochTime` and `aws:CurrentTime` (text rebuilt only when the second changes).
    pub fn set_time(&mut self, now: i64) {
        if self.time.as_ref().is_some_and(|t| t.0 == now) {
            return;
        }
        let iso = time::OffsetDateTime::from_unix_timestamp(now)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        self.time = Some(Box::new((now, now.to_string(), iso)));
    }

    /// The thing associated with the connection.
    pub fn thing_name(&self) -> Option<&str> {
        self.thing_name.as_deref()
    }

    /// Whether a certificate variable was asked for and its certificate could not be read
    /// (a database error): decisions taken with this context must deny.
    pub fn cert_unreadable(&self) -> bool {
        self.cert_unreadable.get()
    }

    /// The certificate's variables: read and tabulated on first use (and kept), or `None`
    /// when they could not be read, which is flagged rather than kept, so that the next
    /// bind reads again.
    fn cert_vars(&self) -> Option<&CertVars> {
        if let Some(vars) = self.cert_vars.get() {
            return Some(vars);
        }
        // No certificate (an IAM or custom principal): no certificate variables.
        let Some((src, id)) = self.cert.as_ref().zip(self.certificate_id.as_ref()) else {
            return Some(self.cert_vars.get_or_init(CertVars::new));
        };
        match src.registry.certificate_info(&src.account, id) {
            Ok(info) => Some(self.cert_vars.get_or_init(|| cert_vars(&info))),
            Err(e) => {
                // At most one line a second, however many connections fail.
                static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
                let now = sekisho_registry::now_secs() as i64;
                if LAST.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
                    tracing::error!(error = %e, certificate = %id, "certificate fields unreadable; the connection's decisions deny until they are read");
                }
                self.cert_unreadable.set(true);
                None
            }
        }
    }
}

impl Context for ConnContext {
    fn get(&self, key: &str) -> Option<Value<'_>> {
        fn one(v: &Option<String>) -> Option<Value<'_>> {
            v.as_deref().map(Value::One)
        }
        if key.eq_ignore_ascii_case("iot:ClientId") {
            return one(&self.client_id);
        }
        if key.eq_ignore_ascii_case("aws:SourceIp") {
            return one(&self.source_ip);
        }
        // The same request keys as every other protocol (authn::RequestContext::keys).
        if key.eq_ignore_ascii_case("aws:SecureTransport") {
            return Some(Value::One("true"));
        }
        if key.eq_ignore_ascii_case("aws:EpochTime") {
            return self.time.as_ref().map(|t| Value::One(t.1.as_str()));
        }
        if key.eq_ignore_ascii_case("aws:CurrentTime") {
            return self
                .time
                .as_ref()
                .map(|t| Value::One(t.2.as_str()))
                .filter(|v| !matches!(v, Value::One("")));
        }
        if let Some(keys) = &self.iam_keys
            && let Some(v) = keys.get(&key.to_ascii_lowercase())
        {
            return Some(Value::One(v));
        }
        if let Some((vpce, vpc, ip)) = &self.vpc {
            if key.eq_ignore_ascii_case("aws:SourceVpce") {
                return Some(Value::One(vpce));
            }
            if key.eq_ignore_ascii_case("aws:SourceVpc") {
                return Some(Value::One(vpc));
            }
            if key.eq_ignore_ascii_case("aws:VpcSourceIp") {
                return Some(Value::One(ip));
            }
        }
        if key.eq_ignore_ascii_case("iot:CertificateId") {
            return one(&self.certificate_id);
        }
        if key.eq_ignore_ascii_case("iot:ConnectAttributes") {
            return Some(Value::Many(&self.connect_attributes));
        }
        if let Some(rest) = strip_ci(key, "iot:Connection.Thing.") {
            if rest.eq_ignore_ascii_case("ThingName") {
                return one(&self.thing_name);
            }
            if rest.eq_ignore_ascii_case("ThingTypeName") {
                return one(&self.thing_type);
            }
            if rest.eq_ignore_ascii_case("IsAttached") {
                return Some(Value::One(self.is_attached)).filter(|_| !self.is_attached.is_empty());
            }
            if let Some(attr) = strip_ci(rest, "Attributes[").and_then(|a| a.strip_suffix(']')) {
                return self.attributes.get(attr).map(|v| Value::One(v));
            }
            return None;
        }
        if strip_ci(key, "iot:Certificate.").is_some() {
            let (v, multi) = self.cert_vars()?.get(&key.to_ascii_lowercase())?;
            return if *multi {
                Some(Value::Many(v))
            } else {
                v.first().map(|s| Value::One(s))
            };
        }
        None
    }
}

/// A private (VPC interface) endpoint's identity, as AWS's condition keys name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateEndpoint {
    /// `aws:SourceVpce`, e.g. `vpce-0a1b2c3d4e5f67890`.
    pub vpce_id: String,
    /// `aws:SourceVpc`, e.g. `vpc-0123456789abcdef0`.
    pub vpc_id: String,
}

/// The network keys of a connection, as [`crate::authn::RequestContext::keys`] gives them:
/// `aws:SourceIp` on a public endpoint; through a private one `aws:SourceVpce`,
/// `aws:SourceVpc` and `aws:VpcSourceIp` and no `aws:SourceIp`. IPv4 clients of a dual-stack
/// socket are named as IPv4.
type NetworkKeys = (Option<String>, Option<(String, String, String)>);

fn network_keys(source_ip: Option<IpAddr>, private: Option<&PrivateEndpoint>) -> NetworkKeys {
    let ip = source_ip.map(|i| crate::authn::unmapped(i).to_string());
    match private {
        Some(p) => (
            None,
            Some((p.vpce_id.clone(), p.vpc_id.clone(), ip.unwrap_or_default())),
        ),
        None => (ip, None),
    }
}

/// Why a principal can no longer act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The certificate is no longer ACTIVE, was deleted, or its CA was.
    Certificate(sekisho_registry::Unusable),
    /// IAM credentials expired, were deleted or deactivated, or their user or role was.
    Credentials(crate::authn::Invalid),
}

/// The IAM side of a principal connected with SigV4 (MQTT over WebSocket).
struct IamParts {
    caller: crate::authn::Caller,
    /// The session policy, bound: decisions must be allowed by it too.
    session: Option<(Arc<sekisho_policy::Policy>, BoundPolicy)>,
    /// For an authenticated Cognito identity: the IoT policies attached to it, bound; AWS IoT
    /// requires them to allow too.
    cognito: Option<(Vec<Arc<sekisho_policy::Policy>>, Vec<BoundPolicy>)>,
}

/// The Cognito identity id of credentials an identity pool gave an authenticated identity.
pub fn cognito_authenticated(caller: &crate::authn::Caller) -> Option<&str> {
    let amr = caller.context.get("cognito-identity.amazonaws.com:amr")?;
    (amr == "authenticated")
        .then(|| caller.context.get("cognito-identity.amazonaws.com:sub"))
        .flatten()
        .map(String::as_str)
}

/// The IoT policies attached to an authenticated Cognito identity, parsed (none for any other
/// caller).
fn cognito_policies(
    registry: &Registry,
    caller: &crate::authn::Caller,
) -> Option<Vec<Arc<sekisho_policy::Policy>>> {
    let id = cognito_authenticated(caller)?;
    Some(
        registry
            .attached_iot_policies(&caller.account, id)
            .into_iter()
            .map(|(_, p)| p)
            .collect(),
    )
}

/// Whether the credentials of a Cognito identity still stand: its identity exists (a deleted
/// pool takes its identities with it). Other credentials: always.
pub fn cognito_identity_exists(registry: &Registry, caller: &crate::authn::Caller) -> bool {
    caller
        .context
        .get("cognito-identity.amazonaws.com:sub")
        .is_none_or(|id| registry.cognito_identity(&caller.account, id).is_ok())
}

/// For an HTTPS request by an authenticated Cognito identity: whether the IoT policies
/// attached to it allow `action` (lower case) on `arn` too, with the request's keys (AWS IoT
/// requires both its IAM and its IoT policies). True for every other caller.
pub fn cognito_iot_allowed(
    registry: &Registry,
    caller: &crate::authn::Caller,
    request: &crate::authn::RequestContext,
    action: &str,
    arn: &str,
) -> bool {
    if !cognito_identity_exists(registry, caller) {
        return false;
    }
    let Some(policies) = cognito_policies(registry, caller) else {
        return true;
    };
    let mut ctx = sekisho_policy::MapContext::new();
    for (k, v) in crate::authn::context_keys(caller, request) {
        ctx.set(&k, v);
    }
    let bound: Vec<BoundPolicy> = policies.iter().map(|p| p.bind(&ctx)).collect();
    decide(bound.iter(), action, arn, &ctx).is_allowed()
}

/// A certificate principal with its bound policies.
pub struct Principal {
    registry: Arc<Registry>,
    /// Account id.
    pub account: AccountId,
    /// Resolved identity.
    pub identity: CertificateIdentity,
    /// The variables and condition keys.
    pub ctx: ConnContext,
    bound: Vec<BoundPolicy>,
    arn_prefix: String,
    scratch: String,
    iam: Option<Box<IamParts>>,
    /// For a custom authorizer's principal: when its connection must end
    /// (`disconnectAfterInSeconds`), epoch seconds.
    custom: Option<Box<CustomParts>>,
    /// Whether a bound policy reads `aws:CurrentTime` or `aws:EpochTime`.
    reads_time: bool,
}

impl Principal {
    /// Who this principal is in lifecycle events (`principalIdentifier`): a Cognito
    /// identity's id (the IoT principal its policies are attached to) for credentials an
    /// identity pool gave, else the identity's own (certificate id, access key id, a custom
    /// authorizer's principalId).
    pub fn event_identifier(&self) -> &str {
        self.iam
            .as_ref()
            .and_then(|i| i.caller.context.get("cognito-identity.amazonaws.com:sub"))
            .map_or_else(|| self.identity.principal.as_str(), String::as_str)
    }
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// What a custom authorizer's principal holds besides its policies.
#[derive(Debug, Clone)]
struct CustomParts {
    /// When its connection must end (`disconnectAfterInSeconds`), epoch seconds.
    disconnect_at: f64,
    /// The authorizer that decided, and its creation time (one incarnation of its name):
    /// while it is not ACTIVE, or gone, or another of the same name, the principal may not act.
    authorizer: String,
    created: f64,
}

impl Principal {
    /// A principal of `identity` in `ctx`, its policies bound.
    fn assemble(
        registry: Arc<Registry>,
        account: AccountId,
        identity: CertificateIdentity,
        ctx: ConnContext,
        iam: Option<Box<IamParts>>,
        custom: Option<Box<CustomParts>>,
    ) -> Principal {
        let arn_prefix = registry.arn(&account, "");
        let mut p = Principal {
            registry,
            account,
            identity,
            ctx,
            bound: Vec::new(),
            arn_prefix,
            scratch: String::with_capacity(128),
            iam,
            custom,
            reads_time: false,
        };
        p.bind();
        p
    }
}

/// A custom authorizer's policy documents, parsed, named by their place in its answer.
fn custom_policies(
    policies: &[String],
) -> Result<Vec<(String, Arc<sekisho_policy::Policy>)>, RegistryError> {
    policies
        .iter()
        .enumerate()
        .map(|(i, d)| {
            sekisho_policy::Policy::parse(d, sekisho_policy::Dialect::Iot)
                .map(|p| (format!("authorizer-{i}"), Arc::new(p)))
                .map_err(|e| RegistryError::InvalidRequest(e.to_string()))
        })
        .collect()
}

impl Principal {
    /// Resolves the certificate principal and binds its policies.
    pub fn certificate(
        registry: Arc<Registry>,
        account: &AccountId,
        certificate_id: &CertificateId,
        client_id: Option<&ClientId>,
        source_ip: Option<IpAddr>,
        private: Option<&PrivateEndpoint>,
    ) -> Result<Principal, RegistryError> {
        // The certificate (and its CA) may have left ACTIVE since the handshake.
        registry
            .certificate_usable(account, certificate_id)
            .map_err(|why| RegistryError::NotFound(why.to_string()))?;
        let identity = registry.certificate_identity(account, certificate_id, client_id)?;
        let (source_ip, vpc) = network_keys(source_ip, private);
        let ctx = ConnContext {
            client_id: client_id.map(|c| c.as_str().to_owned()),
            source_ip,
            vpc,
            ..ConnContext::default()
        };
        Ok(Principal::assemble(
            registry,
            account.clone(),
            identity,
            ctx,
            None,
            None,
        ))
    }

    /// An IAM caller (SigV4) as an MQTT principal: its identity policies (and session policy)
    /// decide `iot:Connect`, `iot:Publish`, `iot:Subscribe` and `iot:Receive` on IoT ARNs.
    pub fn iam(
        registry: Arc<Registry>,
        caller: crate::authn::Caller,
        client_id: Option<&ClientId>,
        source_ip: Option<IpAddr>,
        private: Option<&PrivateEndpoint>,
    ) -> Result<Principal, RegistryError> {
        // Credentials may have been revoked since the upgrade was authenticated.
        crate::authn::still_valid(&registry, &caller)
            .map_err(|why| RegistryError::NotFound(why.to_string()))?;
        if !cognito_identity_exists(&registry, &caller) {
            return Err(RegistryError::NotFound(
                "the Cognito identity no longer exists".into(),
            ));
        }
        let cognito = cognito_policies(&registry, &caller).map(|p| (p, Vec::new()));
        let account = AccountId::new(caller.account.clone());
        let identity = iam_identity(&registry, &caller).ok_or_else(|| {
            RegistryError::NotFound("the caller's user or role no longer exists".into())
        })?;
        let session = caller
            .session_policy
            .as_deref()
            .and_then(|d| {
                sekisho_policy::Policy::parse(d, sekisho_policy::Dialect::IamIdentity).ok()
            })
            .map(|p| {
                let p = Arc::new(p);
                (p.clone(), p.bind(&ConnContext::default()))
            });
        let mut iam_keys: HashMap<String, String> = crate::authn::principal_keys(&caller)
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        iam_keys.insert(
            "aws:requestedregion".to_string(),
            registry.region().to_owned(),
        );
        let (source_ip, vpc) = network_keys(source_ip, private);
        let ctx = ConnContext {
            client_id: client_id.map(|c| c.as_str().to_owned()),
            source_ip,
            vpc,
            iam_keys: Some(Arc::new(iam_keys)),
            ..ConnContext::default()
        };
        let iam = IamParts {
            caller,
            session,
            cognito,
        };
        Ok(Principal::assemble(
            registry,
            account,
            identity,
            ctx,
            Some(Box::new(iam)),
            None,
        ))
    }

    /// A custom authorizer's principal: the `principalId` and policy documents its function
    /// returned (already checked), held until `disconnect_at` (epoch seconds) and while the
    /// authorizer stays ACTIVE. Its policies are the function's word, bound to the connection
    /// like any IoT policy; the registry does not change them.
    #[allow(clippy::too_many_arguments)]
    pub fn custom(
        registry: Arc<Registry>,
        account: &AccountId,
        authorizer: (&str, f64),
        principal_id: &str,
        policies: &[String],
        client_id: Option<&ClientId>,
        source_ip: Option<IpAddr>,
        private: Option<&PrivateEndpoint>,
        disconnect_at: f64,
    ) -> Result<Principal, RegistryError> {
        let parsed = custom_policies(policies)?;
        let identity = CertificateIdentity {
            account_id: account.clone(),
            principal: PrincipalId::Custom(principal_id.to_owned()),
            status: CertStatus::Active,
            thing: None,
            thing_exclusive: false,
            policies: parsed,
            generation: registry.generation(),
        };
        let (source_ip, vpc) = network_keys(source_ip, private);
        let ctx = ConnContext {
            client_id: client_id.map(|c| c.as_str().to_owned()),
            source_ip,
            vpc,
            ..ConnContext::default()
        };
        let custom = CustomParts {
            disconnect_at,
            authorizer: authorizer.0.to_owned(),
            created: authorizer.1,
        };
        Ok(Principal::assemble(
            registry,
            account.clone(),
            identity,
            ctx,
            None,
            Some(Box::new(custom)),
        ))
    }

    /// A principal built afresh from the same inputs (certificate or IAM caller, client id,
    /// address, endpoint, connect attributes), for a decision taken later and elsewhere (a
    /// delayed will): it fails if the certificate or credentials no longer hold, and its
    /// [`Principal::refresh`] re-checks them as the registry changes.
    pub fn fresh(&self) -> Result<Principal, RegistryError> {
        let client = self.ctx.client_id.clone().map(ClientId::new);
        let client = client.as_ref();
        let parse = |s: &Option<String>| s.as_deref().and_then(|i| i.parse::<IpAddr>().ok());
        let (ip, private) = match &self.ctx.vpc {
            Some((vpce, vpc, ip)) => (
                ip.parse::<IpAddr>().ok(),
                Some(PrivateEndpoint {
                    vpce_id: vpce.clone(),
                    vpc_id: vpc.clone(),
                }),
            ),
            None => (parse(&self.ctx.source_ip), None),
        };
        if let Some(custom) = &self.custom {
            if sekisho_registry::now_secs() >= custom.disconnect_at {
                return Err(RegistryError::NotFound(
                    "the custom authorizer's connection time is over".into(),
                ));
            }
            if !self.authorizer_active(custom) {
                return Err(RegistryError::NotFound(
                    "the custom authorizer is no longer active".into(),
                ));
            }
            let mut identity = self.identity.clone();
            identity.generation = self.registry.generation();
            let ctx = ConnContext {
                client_id: self.ctx.client_id.clone(),
                source_ip: self.ctx.source_ip.clone(),
                vpc: self.ctx.vpc.clone(),
                connect_attributes: self.ctx.connect_attributes.clone(),
                ..ConnContext::default()
            };
            return Ok(Principal::assemble(
                self.registry.clone(),
                self.account.clone(),
                identity,
                ctx,
                None,
                Some(custom.clone()),
            ));
        }
        let mut p = match &self.iam {
            Some(iam) => Principal::iam(
                self.registry.clone(),
                iam.caller.clone(),
                client,
                ip,
                private.as_ref(),
            )?,
            None => Principal::certificate(
                self.registry.clone(),
                &self.account,
                self.identity.principal.certificate().ok_or_else(|| {
                    RegistryError::NotFound("the principal has no certificate".into())
                })?,
                client,
                ip,
                private.as_ref(),
            )?,
        };
        p.ctx.connect_attributes = self.ctx.connect_attributes.clone();
        p.bind();
        Ok(p)
    }

    fn bind(&mut self) {
        // Thing variables exist only for MQTT connections (AWS: not over HTTPS, which has no
        // client id).
        if self.ctx.client_id.is_none() {
            self.identity.thing = None;
        }
        self.ctx.set_identity(&self.identity, &self.registry);
        self.bound = self
            .identity
            .policies
            .iter()
            .map(|(_, p)| p.bind(&self.ctx))
            .collect();
        if let Some(iam) = &mut self.iam {
            if let Some((doc, bound)) = &mut iam.session {
                *bound = doc.bind(&self.ctx);
            }
            if let Some((docs, bound)) = &mut iam.cognito {
                *bound = docs.iter().map(|d| d.bind(&self.ctx)).collect();
            }
        }
        let reads_time =
            |b: &BoundPolicy| b.reads_key("aws:CurrentTime") || b.reads_key("aws:EpochTime");
        self.reads_time = self.bound.iter().any(reads_time)
            || self
                .iam
                .as_ref()
                .and_then(|i| i.session.as_ref())
                .is_some_and(|(_, b)| reads_time(b))
            || self
                .iam
                .as_ref()
                .and_then(|i| i.cognito.as_ref())
                .is_some_and(|(_, b)| b.iter().any(reads_time));
        if self.reads_time {
            self.ctx.set_time(sekisho_registry::now_secs() as i64);
        } else {
            self.ctx.time = None;
        }
    }

    /// Re-reads the identity if the registry changed since it was bound (every change of
    /// policy, attachment, thing or certificate status moves the generation), and fails once
    /// the certificate is no longer ACTIVE. Costs one atomic load when nothing changed.
    pub fn refresh(&mut self) -> Result<(), Revoked> {
        // The clock is read only for policies that decide on it (hot path: one flag).
        if self.reads_time {
            self.ctx.set_time(sekisho_registry::now_secs() as i64);
        }
        // A custom authorizer's principal holds until its disconnect time, and while its
        // authorizer is ACTIVE (looked at when the registry changed); the registry does not
        // change its policies.
        if let Some(custom) = &self.custom {
            if sekisho_registry::now_secs() >= custom.disconnect_at {
                return Err(Revoked::Credentials(crate::authn::Invalid::Expired));
            }
            let generation = self.registry.generation();
            if generation != self.identity.generation {
                if !self.authorizer_active(custom) {
                    return Err(Revoked::Credentials(crate::authn::Invalid::Gone));
                }
                self.identity.generation = generation;
            }
            return Ok(());
        }
        if let Some(iam) = &self.iam {
            if iam
                .caller
                .expiration
                .is_some_and(|e| sekisho_registry::now_secs() >= e)
            {
                return Err(Revoked::Credentials(crate::authn::Invalid::Expired));
            }
            if self.registry.generation() != self.identity.generation {
                crate::authn::still_valid(&self.registry, &iam.caller)
                    .map_err(Revoked::Credentials)?;
                let Some(id) = iam_identity(&self.registry, &iam.caller) else {
                    return Err(Revoked::Credentials(crate::authn::Invalid::Gone));
                };
                if !cognito_identity_exists(&self.registry, &iam.caller) {
                    return Err(Revoked::Credentials(crate::authn::Invalid::Gone));
                }
                let cognito = cognito_policies(&self.registry, &iam.caller);
                self.identity = id;
                if let (Some(iam), Some(p)) = (&mut self.iam, cognito) {
                    iam.cognito = Some((p, Vec::new()));
                }
                self.bind();
            }
            return Ok(());
        }
        // After a failed read of the certificate's fields, every refresh binds again.
        if self.registry.generation() != self.identity.generation || self.ctx.cert_unreadable() {
            let Some(certificate) = self.identity.principal.certificate().cloned() else {
                return Err(Revoked::Certificate(sekisho_registry::Unusable::Deleted));
            };
            // The certificate and its CA must both still be ACTIVE.
            self.registry
                .certificate_usable(&self.account, &certificate)
                .map_err(Revoked::Certificate)?;
            let client = self.ctx.client_id.clone().map(ClientId::new);
            match self
                .registry
                .certificate_identity(&self.account, &certificate, client.as_ref())
            {
                Ok(id) => {
                    self.identity = id;
                    self.bind();
                }
                Err(_) => {
                    return Err(Revoked::Certificate(sekisho_registry::Unusable::Deleted));
                }
            }
        }
        match self.identity.status {
            CertStatus::Active => Ok(()),
            s => Err(Revoked::Certificate(sekisho_registry::Unusable::NotActive(
                s,
            ))),
        }
    }

    /// Decides `action` (e.g. `iot:publish`) on the resource `kind/name` (e.g. `topic`,
    /// `a/b`). The ARN is built in a reused buffer: no allocation per check.
    pub fn decide(&mut self, action: &str, kind: &str, name: &str) -> Decision {
        let mut arn = std::mem::take(&mut self.scratch);
        arn.clear();
        arn.push_str(&self.arn_prefix);
        arn.push_str(kind);
        arn.push('/');
        arn.push_str(name);
        let mut d = decide(self.bound.iter(), action, &arn, &self.ctx);
        if d.is_allowed()
            && let Some(iam) = &self.iam
            && let Some((_, bound)) = &iam.session
        {
            d = decide([bound], action, &arn, &self.ctx);
        }
        // An authenticated Cognito identity: the IoT policies attached to it must allow too.
        if d.is_allowed()
            && let Some(iam) = &self.iam
            && let Some((_, bound)) = &iam.cognito
        {
            d = decide(bound.iter(), action, &arn, &self.ctx);
        }
        self.scratch = arn;
        // A certificate variable that could not be read decides nothing: deny, rather than
        // evaluate a condition as if the value were absent (which can allow).
        if self.ctx.cert_unreadable() {
            return Decision::ImplicitDeny;
        }
        d
    }

    /// When a custom authorizer's principal must disconnect (epoch seconds), if it is one.
    pub fn disconnect_at(&self) -> Option<f64> {
        self.custom.as_ref().map(|c| c.disconnect_at)
    }

    /// Whether the custom authorizer that decided is still there (the same incarnation) and
    /// ACTIVE.
    fn authorizer_active(&self, custom: &CustomParts) -> bool {
        self.registry
            .authorizer(self.account.as_str(), &custom.authorizer)
            .is_ok_and(|a| a.active && a.created == custom.created)
    }

    /// For a custom authorizer's principal: the authorizer's name and creation time.
    pub fn custom_authorizer(&self) -> Option<(&str, f64)> {
        self.custom
            .as_ref()
            .map(|c| (c.authorizer.as_str(), c.created))
    }

    /// Ends a custom authorizer's principal now (its authorizer refused it): from here on it
    /// may not act, not even for its will.
    pub fn revoke_custom(&mut self) {
        if let Some(c) = &mut self.custom {
            c.disconnect_at = f64::MIN;
        }
        self.bound.clear();
        self.identity.policies.clear();
    }

    /// A custom authorizer's principal takes the policies its function answered when asked
    /// again (`refreshAfterInSeconds`); its disconnect time stays. Refused (and nothing
    /// changed) if this is not a custom principal, if the function now names another
    /// principal (a connection's identity does not change while it lasts), or if a document
    /// does not parse.
    pub fn refresh_custom(
        &mut self,
        principal_id: &str,
        policies: &[String],
    ) -> Result<(), RegistryError> {
        if self.custom.is_none() {
            return Err(RegistryError::InvalidRequest(
                "not a custom authorizer's principal".into(),
            ));
        }
        if self.identity.principal != PrincipalId::Custom(principal_id.to_owned()) {
            return Err(RegistryError::InvalidRequest(
                "the authorizer answered another principal".into(),
            ));
        }
        let parsed = custom_policies(policies)?;
        self.identity.policies = parsed;
        self.bind();
        Ok(())
    }

    /// The IAM caller of a SigV4 principal (MQTT over WebSocket).
    pub fn iam_caller(&self) -> Option<&crate::authn::Caller> {
        self.iam.as_ref().map(|i| &i.caller)
    }

    /// When IAM credentials of this principal expire (MQTT over WebSocket).
    pub fn expiration(&self) -> Option<f64> {
        self.iam.as_ref().and_then(|i| i.caller.expiration)
    }

    /// Shorthand: whether `action` on `kind/name` is allowed.
    pub fn allowed(&mut self, action: &str, kind: &str, name: &str) -> bool {
        self.decide(action, kind, name).is_allowed()
    }
}

/// A principal identity for an IAM caller: its identity policies; the "certificate id" slot
/// names the caller (lifecycle events' principalIdentifier). `None` once the user or role is
/// gone.
fn iam_identity(registry: &Registry, caller: &crate::authn::Caller) -> Option<CertificateIdentity> {
    let generation = registry.generation();
    let policies = registry.identity_policies(&caller.account, &caller.principal)?;
    // The root may do everything in its account.
    let policies = if caller.principal == sekisho_registry::IamPrincipal::Root {
        let all = sekisho_policy::Policy::parse(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#,
            sekisho_policy::Dialect::IamIdentity,
        )
        .ok()?;
        vec![("root".to_string(), Arc::new(all))]
    } else {
        policies
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("iam-{i}"), p))
            .collect()
    };
    Some(CertificateIdentity {
        account_id: AccountId::new(caller.account.clone()),
        principal: PrincipalId::AccessKey(caller.access_key_id.clone()),
        status: CertStatus::Active,
        thing: None,
        thing_exclusive: false,
        policies,
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `iot:Certificate.*` variables come from the certificate's stored PEM, read on first
    /// use; a rebind for the same certificate keeps them (a certificate's fields never
    /// change), another certificate's identity reads its own, and an IAM principal has none.
    /// A registry with one account and a way to register ACTIVE certificates in it by
    /// common name (returning their ids).
    fn registry_with_certificates() -> (Arc<Registry>, String, impl Fn(&str) -> String) {
        let registry = Arc::new(Registry::in_memory("us-east-1").unwrap());
        let (account, _) = registry.create_account("a").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = sekisho_pki::Ca::generate("t", "t", now).unwrap();
        let (r, a) = (registry.clone(), account.id.clone());
        let add = move |name: &str| {
            let pem = ca
                .issue_named(name, sekisho_pki::KeyKind::EcdsaP256, now)
                .unwrap()
                .cert_pem;
            let new = sekisho_registry::NewCertificate {
                pem,
                status: CertStatus::Active,
                ca_certificate_id: None,
                mode: sekisho_registry::CertMode::Default,
                claim_template: None,
            };
            r.add_certificate(&a, new).unwrap().0.id
        };
        (registry, account.id, add)
    }

    #[test]
    fn certificate_variables_are_read_on_first_use() {
        let (registry, account_id, add) = registry_with_certificates();
        let (one, two) = (add("dev-1"), add("dev-2"));
        let acct = AccountId::new(account_id.clone());
        let identity = |id: &str| {
            registry
                .certificate_identity(&acct, &CertificateId::new(id), None)
                .unwrap()
        };
        let cn = "iot:Certificate.Subject.CommonName";
        let mut ctx = ConnContext::default();
        ctx.set_identity(&identity(&one), &registry);
        assert!(matches!(ctx.get(cn), Some(Value::One("dev-1"))));
        // Gone from the database, the same certificate's table stays: it was not read again.
        registry
            .update_certificate(&account_id, &one, CertStatus::Inactive)
            .unwrap();
        let before = identity(&one);
        registry
            .delete_certificate(&account_id, &one, true)
            .unwrap();
        ctx.set_identity(&before, &registry);
        assert!(matches!(ctx.get(cn), Some(Value::One("dev-1"))));
        ctx.set_identity(&identity(&two), &registry);
        assert!(matches!(ctx.get(cn), Some(Value::One("dev-2"))));
        let (_, key) = registry.create_account("b").unwrap();
        let mut iam = before.clone();
        iam.principal = PrincipalId::AccessKey(key.access_key_id.clone());
        ctx.set_identity(&iam, &registry);
        assert!(ctx.get(cn).is_none());
        assert!(ctx.get("iot:CertificateId").is_none());
    }

    /// A certificate variable that cannot be read (a broken database) makes decisions deny,
    /// not decide as if the value were absent: here a Deny conditioned on the common name
    /// would otherwise no longer match, and the Allow beside it would let the publish through.
    #[test]
    fn unreadable_certificate_variables_deny() {
        let (registry, account_id, add) = registry_with_certificates();
        let id = add("guest");
        let doc = r#"{"Version":"2012-10-17","Statement":[
            {"Effect":"Allow","Action":"iot:Publish","Resource":"*"},
            {"Effect":"Deny","Action":"iot:Publish","Resource":"arn:aws:iot:*:*:topic/admin/*",
             "Condition":{"StringEquals":{"iot:Certificate.Subject.CommonName":"guest"}}}]}"#;
        registry.create_policy(&account_id, "p", doc).unwrap();
        let arn = registry.arn(&account_id, &format!("cert/{id}"));
        registry.attach_policy(&account_id, "p", &arn).unwrap();
        let acct = AccountId::new(account_id.clone());
        let principal = || {
            Principal::certificate(
                registry.clone(),
                &acct,
                &CertificateId::new(id.clone()),
                Some(&ClientId::new("c")),
                None,
                None,
            )
            .unwrap()
        };
        let mut readable = principal();
        assert_eq!(
            readable.decide("iot:publish", "topic", "admin/x"),
            Decision::ExplicitDeny
        );
        assert_eq!(
            readable.decide("iot:publish", "topic", "other"),
            Decision::Allowed
        );
        let mut broken = principal();
        registry.break_database();
        assert_eq!(
            broken.decide("iot:publish", "topic", "admin/x"),
            Decision::ImplicitDeny
        );
        assert_eq!(
            broken.decide("iot:publish", "topic", "other"),
            Decision::ImplicitDeny
        );
        // The connection that read them before keeps them.
        assert_eq!(
            readable.decide("iot:publish", "topic", "other"),
            Decision::Allowed
        );
    }

    /// Connections name their network as requests do: IPv4 clients of a dual-stack socket as
    /// IPv4, and through a private endpoint the VPC keys instead of aws:SourceIp.
    #[test]
    fn network_keys_match_request_keys() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            network_keys(Some(mapped), None),
            (Some("127.0.0.1".into()), None)
        );
        let private = PrivateEndpoint {
            vpce_id: "vpce-1".into(),
            vpc_id: "vpc-1".into(),
        };
        assert_eq!(
            network_keys(Some(mapped), Some(&private)),
            (
                None,
                Some(("vpce-1".into(), "vpc-1".into(), "127.0.0.1".into()))
            )
        );
        let request = crate::authn::RequestContext::tls(mapped, None, 0);
        assert!(
            request
                .keys()
                .contains(&("aws:SourceIp", "127.0.0.1".to_string()))
        );
    }
}
