//! The `cognito-identity` API (awsJson1.1, `X-Amz-Target: AWSCognitoIdentityService.<Op>`) as
//! AWS IoT apps use it: identity pools and their roles (SigV4, `cognito-identity:<Op>` on
//! the pool), developer-authenticated identities (`GetOpenIdTokenForDeveloperIdentity`,
//! SigV4, from the app's backend), and the unsigned calls an app makes (`GetId`,
//! `GetCredentialsForIdentity`, `GetOpenIdToken`).
//!
//! The logins Sekisho verifies are the tokens it issued itself (`cognito-identity.amazonaws.com`,
//! signed with the pool's own key, HS256): a developer provider vouches for a user through its
//! backend's credentials, and the app presents the token. Tokens of other providers (user
//! pools, Google, OIDC, SAML) cannot be verified here and are refused, as are pools configured
//! with them (docs/decisions/0010-cognito-identities.md).
//!
//! Credentials: the pool's `authenticated` or `unauthenticated` role, which must trust
//! `cognito-identity.amazonaws.com` (`sts:AssumeRoleWithWebIdentity`, with the
//! `cognito-identity.amazonaws.com:aud` and `:amr` keys); a one-hour session named
//! `CognitoIdentityCredentials` that carries `cognito-identity.amazonaws.com:sub`, `:aud`
//! and `:amr`, so that policies can name the identity and IoT can require the policies
//! attached to an authenticated identity.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use serde_json::{Map, Value, json};

use crate::{ApiError, ApiState, Call};
use sekisho_registry::{IamPrincipal, IdentityPoolSpec, RegistryError};

/// The target prefix of every operation.
pub const TARGET_PREFIX: &str = "AWSCognitoIdentityService.";
/// The provider name of Sekisho's (and Cognito's) own OpenID tokens.
pub const COGNITO_PROVIDER: &str = "cognito-identity.amazonaws.com";
/// The `iss` of the tokens Sekisho's pools issue.
pub const COGNITO_ISSUER: &str = "https://cognito-identity.amazonaws.com";
/// The operations an app calls without a signature.
pub const UNSIGNED: &[&str] = &["GetId", "GetCredentialsForIdentity", "GetOpenIdToken"];
/// The largest body of an unsigned call.
pub const MAX_UNSIGNED_BODY: usize = 64 * 1024;
/// The largest body of an unsigned STS call (AssumeRoleWithWebIdentity's token is at most
/// 20,000 characters).
pub const MAX_UNSIGNED_STS_BODY: usize = 32 * 1024;
/// How long the credentials of GetCredentialsForIdentity last.
const CREDENTIAL_SECONDS: u32 = 3600;
/// How long GetOpenIdToken's tokens last.
const OPEN_ID_TOKEN_SECONDS: u64 = 600;
/// The longest login token taken (AWS: 50,000).
const MAX_LOGIN_TOKEN: usize = 50_000;
/// Credentials of the same identity and role are given again while this much of them is left,
/// seconds: an app asking again (or anyone looping on an identity id) gets the same session
/// rather than a new one each time.
const REUSE_WHILE_LEFT: f64 = 900.0;
/// Unsigned calls one source address may make per second, and in a burst.
const UNSIGNED_RATE: f64 = 10.0;
const UNSIGNED_BURST: f64 = 50.0;
/// Source addresses and sessions remembered at most (then forgotten, all at once).
const MAX_REMEMBERED: usize = 100_000;
/// The session policy of an unauthenticated identity's credentials: whatever the role
/// allows, but never IAM or STS (a guest must not make itself lasting credentials).
const GUEST_SESSION_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","NotAction":["iam:*","sts:*"],"Resource":"*"}]}"#;

type Buckets = std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>;
type Sessions = std::collections::HashMap<(String, String, String), sekisho_registry::Session>;

/// Per source address: tokens left and when they were counted.
static UNSIGNED_BUCKETS: std::sync::LazyLock<std::sync::Mutex<Buckets>> =
    std::sync::LazyLock::new(Default::default);

/// Sessions given to identities: (account, identity, role id, session name and duration) →
/// the session.
static SESSIONS: std::sync::LazyLock<std::sync::Mutex<Sessions>> =
    std::sync::LazyLock::new(Default::default);

/// Whether `ip` may make one more unsigned call now.
/// An IPv6 address counts by its /64 (one host's usual share), IPv4 by the address.
fn unsigned_allowed(ip: std::net::IpAddr) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    };
    let now = std::time::Instant::now();
    let mut m = UNSIGNED_BUCKETS.lock().unwrap_or_else(|p| p.into_inner());
    if m.len() >= MAX_REMEMBERED && !m.contains_key(&ip) {
        // Forget only the addresses whose allowance is whole again (they are as new); if
        // none is, a new address waits: the bound holds without resetting anyone's count.
        m.retain(|_, (tokens, at)| {
            *tokens + now.duration_since(*at).as_secs_f64() * UNSIGNED_RATE < UNSIGNED_BURST
        });
        if m.len() >= MAX_REMEMBERED {
            return false;
        }
    }
    let (tokens, at) = m.entry(ip).or_insert((UNSIGNED_BURST, now));
    *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * UNSIGNED_RATE).min(UNSIGNED_BURST);
    *at = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

/// The operation a request names, if it is a Cognito identity request.
pub fn operation(headers: &[(String, String)]) -> Option<&str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-amz-target"))
        .and_then(|(_, v)| v.strip_prefix(TARGET_PREFIX))
}

fn error(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(status, code, message)
}

fn invalid(message: impl Into<String>) -> ApiError {
    error(400, "InvalidParameterException", message)
}

fn not_authorized(message: impl Into<String>) -> ApiError {
    error(400, "NotAuthorizedException", message)
}

/// A registry error in Cognito's terms.
fn cognito_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::NotFound(m) => error(400, "ResourceNotFoundException", m),
        RegistryError::LimitExceeded(m) => error(400, "LimitExceededException", m),
        RegistryError::Conflict(m) => error(400, "DeveloperUserAlreadyRegisteredException", m),
        RegistryError::InvalidRequest(m) => invalid(m),
        other => error(500, "InternalErrorException", other.to_string()),
    }
}

/// An answer in awsJson1.1's form: errors as `{"__type", "message"}` with the type in
/// `x-amzn-ErrorType` too.
fn respond(result: Result<Value, ApiError>) -> Response<Full<Bytes>> {
    match result {
        Ok(v) => {
            let mut r = crate::json_response(200, &v);
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/x-amz-json-1.1"),
            );
            r
        }
        Err(e) => {
            let mut r =
                crate::json_response(e.status, &json!({"__type": e.code, "message": e.message}));
            if let Ok(v) = e.code.parse() {
                r.headers_mut().insert("x-amzn-errortype", v);
            }
            r
        }
    }
}

fn body_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|_| invalid("The request body is not JSON"))?
    };
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(invalid("The request body is not a JSON object")),
    }
}

fn text<'a>(o: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{k} must be a string"))),
    }
}

fn required<'a>(o: &'a Map<String, Value>, k: &str) -> Result<&'a str, ApiError> {
    text(o, k)?.ok_or_else(|| invalid(format!("{k} is required")))
}

fn flag(o: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(format!("{k} must be a boolean"))),
    }
}

/// A map of strings (Logins, Roles), at most `max` entries.
fn string_map(
    o: &Map<String, Value>,
    k: &str,
    max: usize,
) -> Result<BTreeMap<String, String>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) if m.len() <= max => m
            .iter()
            .map(|(k2, v)| match v {
                Value::String(s) => Ok((k2.clone(), s.clone())),
                _ => Err(invalid(format!("{k} values must be strings"))),
            })
            .collect(),
        Some(_) => Err(invalid(format!(
            "{k} must be a map of at most {max} strings"
        ))),
    }
}

/// Whether a member that configures an identity provider Sekisho cannot verify is set (not
/// empty).
fn names_other_providers(o: &Map<String, Value>) -> bool {
    [
        "SupportedLoginProviders",
        "CognitoIdentityProviders",
        "SamlProviderARNs",
    ]
    .iter()
    .any(|k| match o.get(*k) {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    })
}

fn pool_json(p: &sekisho_registry::IdentityPool) -> Value {
    let mut v = json!({
        "IdentityPoolId": p.id,
        "IdentityPoolName": p.name,
        "AllowUnauthenticatedIdentities": p.allow_unauthenticated,
        "AllowClassicFlow": p.allow_classic_flow,
        "SupportedLoginProviders": {},
        "OpenIdConnectProviderARNs": p.oidc_providers,
        "CognitoIdentityProviders": [],
        "SamlProviderARNs": [],
        "IdentityPoolTags": {},
    });
    if let Some(d) = &p.developer_provider {
        v["DeveloperProviderName"] = json!(d);
    }
    v
}

/// How an OpenID Connect provider's login is kept in an identity's logins: `oidc:` before the
/// provider's name (a developer provider's name has no `:`), so that the two kinds never name
/// the same user.
const OIDC_LOGIN: &str = "oidc:";

/// The OpenID Connect login of an identity, if it has one: the provider's name and the user.
fn oidc_login(i: &sekisho_registry::CognitoIdentity) -> Option<(&str, &str)> {
    i.logins
        .iter()
        .find_map(|l| l.strip_prefix(OIDC_LOGIN)?.split_once('\n'))
}

fn identity_json(i: &sekisho_registry::CognitoIdentity) -> Value {
    let logins: Vec<&str> = i
        .logins
        .iter()
        .filter_map(|l| l.split_once('\n').map(|(p, _)| p))
        .map(|p| p.strip_prefix(OIDC_LOGIN).unwrap_or(p))
        .collect();
    json!({"IdentityId": i.id, "Logins": logins, "CreationDate": i.created,
        "LastModifiedDate": i.modified})
}

fn spec(o: &Map<String, Value>) -> Result<IdentityPoolSpec, ApiError> {
    if names_other_providers(o) {
        return Err(invalid(
            "Sekisho verifies only its own tokens (developer-authenticated identities) and \
             those of OpenID Connect providers registered in IAM: SupportedLoginProviders, \
             CognitoIdentityProviders and SamlProviderARNs are not supported",
        ));
    }
    let oidc_providers = match o.get("OpenIdConnectProviderARNs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid("OpenIdConnectProviderARNs must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("OpenIdConnectProviderARNs must be a list")),
    };
    Ok(IdentityPoolSpec {
        name: required(o, "IdentityPoolName")?.to_owned(),
        allow_unauthenticated: flag(o, "AllowUnauthenticatedIdentities")?
            .ok_or_else(|| invalid("AllowUnauthenticatedIdentities is required"))?,
        allow_classic_flow: flag(o, "AllowClassicFlow")?.unwrap_or(false),
        developer_provider: text(o, "DeveloperProviderName")?.map(str::to_owned),
        oidc_providers,
    })
}

// --- Tokens ---------------------------------------------------------------------------------

/// What an OpenID token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The identity id.
    pub sub: String,
    /// The pool id.
    pub aud: String,
    /// `authenticated` and the providers, or `unauthenticated`.
    pub amr: Vec<String>,
    /// Expiry, epoch seconds.
    pub exp: u64,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An OpenID token for `claims`, signed with the pool's key (HS256), issued at `now`.
pub fn issue_token(key_hex: &str, claims: &Claims, now: u64) -> String {
    let header = json!({"kid": "sekisho-1", "typ": "JWS", "alg": "HS256"});
    let payload = json!({"iss": COGNITO_ISSUER, "sub": claims.sub,
        "aud": claims.aud, "amr": claims.amr, "exp": claims.exp, "iat": now,
        "https://cognito-identity.amazonaws.com/identity-pool-arn": claims.aud});
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    );
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key_hex.as_bytes());
    let tag = aws_lc_rs::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", b64(tag.as_ref()))
}

/// The claims of a token signed with the pool's key, for that pool, not expired at `now`.
pub fn verify_token(key_hex: &str, pool: &str, token: &str, now: u64) -> Option<Claims> {
    if token.len() > MAX_LOGIN_TOKEN {
        return None;
    }
    let (signed, tag) = token.rsplit_once('.')?;
    let (header, payload) = signed.split_once('.')?;
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tag)
        .ok()?;
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key_hex.as_bytes());
    aws_lc_rs::hmac::verify(&key, signed.as_bytes(), &tag).ok()?;
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .ok()?,
    )
    .ok()?;
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return None;
    }
    let p: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?,
    )
    .ok()?;
    let claims = Claims {
        sub: p.get("sub")?.as_str()?.to_owned(),
        aud: p.get("aud")?.as_str()?.to_owned(),
        amr: p
            .get("amr")?
            .as_array()?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        exp: p.get("exp")?.as_u64()?,
    };
    (claims.aud == pool && claims.exp > now).then_some(claims)
}

fn now() -> u64 {
    sekisho_registry::now_secs() as u64
}

// --- Unsigned calls -------------------------------------------------------------------------

/// The pool and its account for an identity id (`{region}:{uuid}` names no account: the
/// identity is looked up in the account of the pool that holds it).
fn identity_and_pool(
    state: &ApiState,
    identity: &str,
) -> Result<
    (
        String,
        sekisho_registry::CognitoIdentity,
        sekisho_registry::IdentityPool,
    ),
    ApiError,
> {
    let gone = || {
        error(
            400,
            "ResourceNotFoundException",
            format!("Identity '{identity}' not found."),
        )
    };
    let account = state
        .registry
        .accounts()
        .into_iter()
        .map(|a| a.id)
        .find(|a| state.registry.cognito_identity(a, identity).is_ok())
        .ok_or_else(gone)?;
    let i = state
        .registry
        .cognito_identity(&account, identity)
        .map_err(|_| gone())?;
    let p = state
        .registry
        .identity_pool(&account, &i.pool)
        .map_err(cognito_error)?;
    Ok((account, i, p))
}

/// The condition keys of an identity of `pool`: for its role's trust policy (`amr` with the
/// providers, as Cognito sets it) and for its session (`amr` as its type), both with `sub`
/// and `aud`.
fn identity_keys(
    identity: &str,
    pool: &sekisho_registry::IdentityPool,
    authenticated: bool,
    login: Option<&Login>,
) -> (sekisho_policy::MapContext, BTreeMap<String, String>) {
    let mut ctx = sekisho_policy::MapContext::new();
    ctx.set("cognito-identity.amazonaws.com:aud", pool.id.clone());
    ctx.set("cognito-identity.amazonaws.com:sub", identity.to_owned());
    ctx.set_many(
        "cognito-identity.amazonaws.com:amr",
        amr(authenticated, pool, login),
    );
    let kind = if authenticated {
        "authenticated"
    } else {
        "unauthenticated"
    };
    let keys = BTreeMap::from([
        (
            "cognito-identity.amazonaws.com:sub".to_string(),
            identity.to_owned(),
        ),
        (
            "cognito-identity.amazonaws.com:aud".to_string(),
            pool.id.clone(),
        ),
        (
            "cognito-identity.amazonaws.com:amr".to_string(),
            kind.to_string(),
        ),
    ]);
    (ctx, keys)
}

/// Whether `role` trusts Cognito for `pool` and this identity (`ctx`), and only for that pool:
/// a trust policy that would let any pool's identities assume the role (no
/// `cognito-identity.amazonaws.com:aud` condition, as AWS requires) trusts none.
fn role_trusts_pool(role: &sekisho_registry::IamRole, ctx: &sekisho_policy::MapContext) -> bool {
    let mut elsewhere = ctx.clone();
    elsewhere.set("cognito-identity.amazonaws.com:aud", "sekisho:another-pool");
    role.trusts_federated(COGNITO_PROVIDER, ctx)
        && !role.trusts_federated(COGNITO_PROVIDER, &elsewhere)
}

/// A session of `role` for identity `identity` (named `name`, lasting `secs`, with the Cognito
/// `keys`, a guest's restricted): the live one given before for the same identity, role, name
/// and duration while more than [`REUSE_WHILE_LEFT`] of it is left, so that asking again (or
/// anyone looping on an identity) does not store a new session each time.
#[allow(clippy::too_many_arguments)]
fn identity_session(
    state: &ApiState,
    account: &str,
    identity: &str,
    role: &sekisho_registry::IamRole,
    name: &str,
    secs: u32,
    authenticated: bool,
    keys: BTreeMap<String, String>,
    provider: Option<&sekisho_registry::OidcProvider>,
) -> Result<sekisho_registry::Session, ApiError> {
    let key = (
        account.to_owned(),
        identity.to_owned(),
        format!(
            "{}\n{name}\n{secs}\n{:?}",
            role.id,
            provider.map(|p| (&p.name, p.created.to_bits()))
        ),
    );
    let reusable = SESSIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .filter(|s| {
            s.expiration - sekisho_registry::now_secs() > REUSE_WHILE_LEFT
                && s.context == keys
                && state.registry.credential(&s.access_key_id).is_some()
        })
        .cloned();
    if let Some(s) = reusable {
        return Ok(s);
    }
    let s = state
        .registry
        .create_web_identity_session(
            account,
            IamPrincipal::Role {
                role: role.name.clone(),
                session: name.to_owned(),
            },
            secs,
            (!authenticated).then_some(GUEST_SESSION_POLICY),
            keys,
            provider,
        )
        .map_err(cognito_error)?;
    let mut m = SESSIONS.lock().unwrap_or_else(|p| p.into_inner());
    if m.len() >= MAX_REMEMBERED {
        let now = sekisho_registry::now_secs();
        m.retain(|_, s| s.expiration - now > REUSE_WHILE_LEFT);
        if m.len() >= MAX_REMEMBERED {
            m.clear();
        }
    }
    m.insert(key, s.clone());
    Ok(s)
}

/// A login an app presented, verified.
#[derive(Debug, Clone)]
enum Login {
    /// A token the pool issued (`cognito-identity.amazonaws.com`).
    Pool(Claims),
    /// An ID token of an OpenID Connect provider the pool names: the provider's name, the
    /// token's `sub`, and when it expires.
    Oidc {
        provider: String,
        user: String,
        exp: u64,
    },
}

impl Login {
    fn exp(&self) -> u64 {
        match self {
            Login::Pool(c) => c.exp,
            Login::Oidc { exp, .. } => *exp,
        }
    }
}

/// Checks the Logins an app presents for `pool` of `account` (at most one): a token the pool
/// issued, or an ID token of one of the pool's OpenID Connect providers (still registered in
/// IAM), verified with the keys configured for it and naming one of its client ids.
fn check_logins(
    state: &ApiState,
    account: &str,
    pool: &sekisho_registry::IdentityPool,
    logins: &BTreeMap<String, String>,
) -> Result<Option<Login>, ApiError> {
    let mut presented = logins.iter();
    let (Some((provider, token)), None) = (presented.next(), presented.next()) else {
        return if logins.is_empty() {
            Ok(None)
        } else {
            Err(not_authorized(
                "Invalid login token. One login at a time is taken here.",
            ))
        };
    };
    if provider == COGNITO_PROVIDER {
        return verify_token(&pool.token_key, &pool.id, token, now())
            .map(|c| Some(Login::Pool(c)))
            .ok_or_else(|| {
                not_authorized("Invalid login token. Token is not valid or is expired.")
            });
    }
    let arn = sekisho_registry::oidc_provider_arn(account, provider);
    if !pool.oidc_providers.contains(&arn) {
        return Err(not_authorized(format!(
            "Invalid login token. {provider} is not an identity provider of this pool"
        )));
    }
    let registered = state
        .registry
        .oidc_provider_by_name(account, provider)
        .ok_or_else(|| {
            not_authorized(format!(
                "Invalid login token. No OpenID Connect provider {provider} is registered"
            ))
        })?;
    let keys = state.oidc_keys.of(provider).ok_or_else(|| {
        not_authorized(format!(
            "Invalid login token. Couldn't retrieve verification key from {provider}"
        ))
    })?;
    let claims = crate::oidc::verify(token, &keys, now() as i64)
        .map_err(|_| not_authorized("Invalid login token. Token is not valid or is expired."))?;
    if claims.iss != format!("https://{provider}") {
        return Err(not_authorized(
            "Invalid login token. Issuer doesn't match providerName",
        ));
    }
    if !claims.aud.iter().any(|a| registered.client_ids.contains(a)) {
        return Err(not_authorized(
            "Invalid login token. Incorrect token audience.",
        ));
    }
    Ok(Some(Login::Oidc {
        provider: provider.clone(),
        user: claims.sub,
        exp: u64::try_from(claims.exp).unwrap_or(0),
    }))
}

/// The OpenID Connect provider an identity's user logs in with, if any: it must still be
/// registered in IAM and named by the pool, whatever token is presented (a pool's token traded
/// for the provider's login holds no longer than the provider does); its sessions are bound to
/// it.
fn identity_provider(
    state: &ApiState,
    account: &str,
    pool: &sekisho_registry::IdentityPool,
    i: &sekisho_registry::CognitoIdentity,
) -> Result<Option<sekisho_registry::OidcProvider>, ApiError> {
    let Some((name, _)) = oidc_login(i) else {
        return Ok(None);
    };
    state
        .registry
        .oidc_provider_by_name(account, name)
        .filter(|p| pool.oidc_providers.contains(&p.arn(account)))
        .map(Some)
        .ok_or_else(|| {
            not_authorized(format!(
                "Access to Identity '{}' is forbidden: its identity provider is no longer the pool's.",
                i.id
            ))
        })
}

/// Whether an identity is authenticated by `claims`, or may go unauthenticated: the claims
/// (if any) must be for this identity; an identity with logins needs them.
fn identity_type(
    i: &sekisho_registry::CognitoIdentity,
    pool: &sekisho_registry::IdentityPool,
    login: Option<&Login>,
) -> Result<bool, ApiError> {
    let claims = match login {
        // A provider's login holds for the identity it is linked to.
        Some(Login::Oidc { provider, user, .. }) => {
            return if i
                .logins
                .contains(&format!("{OIDC_LOGIN}{provider}\n{user}"))
            {
                Ok(true)
            } else {
                Err(not_authorized(
                    "Invalid login token. The token is for another identity.",
                ))
            };
        }
        Some(Login::Pool(c)) => Some(c),
        None => None,
    };
    match claims {
        Some(c) if c.sub != i.id => Err(not_authorized(
            "Invalid login token. The token is for another identity.",
        )),
        // An authenticated token holds while its identity has a login; a guest token only for a
        // guest identity of a pool that still takes guests.
        Some(c) => {
            let authenticated = c.amr.iter().any(|a| a == "authenticated");
            if authenticated == i.logins.is_empty() {
                return Err(not_authorized(format!(
                    "Access to Identity '{}' is forbidden.",
                    i.id
                )));
            }
            if !authenticated && !pool.allow_unauthenticated {
                return Err(not_authorized(
                    "Unauthenticated access is not supported for this identity pool.",
                ));
            }
            Ok(authenticated)
        }
        None if !i.logins.is_empty() => Err(not_authorized(format!(
            "Access to Identity '{}' is forbidden.",
            i.id
        ))),
        None if !pool.allow_unauthenticated => Err(not_authorized(
            "Unauthenticated access is not supported for this identity pool.",
        )),
        None => Ok(false),
    }
}

fn amr(
    authenticated: bool,
    pool: &sekisho_registry::IdentityPool,
    login: Option<&Login>,
) -> Vec<String> {
    if authenticated {
        let mut v = vec!["authenticated".to_string()];
        match login {
            Some(Login::Oidc { provider, .. }) => v.push(provider.clone()),
            // A pool's token keeps the providers it was signed with, those the pool still
            // has: trading a provider's login for a pool token never changes who vouched.
            Some(Login::Pool(c)) => v.extend(
                c.amr
                    .iter()
                    .filter(|a| {
                        pool.developer_provider.as_deref() == Some(a.as_str())
                            || pool.oidc_providers.iter().any(|arn| {
                                arn.rsplit_once(":oidc-provider/")
                                    .is_some_and(|(_, n)| n == a.as_str())
                            })
                    })
                    .cloned(),
            ),
            None => {
                if let Some(d) = &pool.developer_provider {
                    v.push(d.clone());
                }
            }
        }
        v
    } else {
        vec!["unauthenticated".to_string()]
    }
}

/// One unsigned call (GetId, GetCredentialsForIdentity, GetOpenIdToken), already charged to
/// its address ([`unsigned_call_allowed`]) before its body was read.
pub fn dispatch_unsigned(state: &ApiState, op: &str, body: &[u8]) -> Response<Full<Bytes>> {
    respond(unsigned(state, op, body))
}

/// The answer to an unsigned call its address has no allowance left for.
pub fn throttled() -> Response<Full<Bytes>> {
    respond(Err(error(429, "TooManyRequestsException", "Rate exceeded")))
}

fn unsigned(state: &ApiState, op: &str, body: &[u8]) -> Result<Value, ApiError> {
    let o = body_object(body)?;
    match op {
        "GetId" => {
            let pool_id = required(&o, "IdentityPoolId")?;
            let account = state
                .registry
                .identity_pool_account(pool_id)
                .ok_or_else(|| {
                    error(
                        400,
                        "ResourceNotFoundException",
                        format!("IdentityPool '{pool_id}' not found."),
                    )
                })?;
            if let Some(a) = text(&o, "AccountId")?
                && a != account
            {
                return Err(not_authorized("The identity pool is not of that account."));
            }
            let pool = state
                .registry
                .identity_pool(&account, pool_id)
                .map_err(cognito_error)?;
            let logins = string_map(&o, "Logins", 10)?;
            let id = match check_logins(state, &account, &pool, &logins)? {
                // A pool's token names its identity.
                Some(Login::Pool(c)) => {
                    state
                        .registry
                        .cognito_identity(&account, &c.sub)
                        .map_err(cognito_error)?
                        .id
                }
                // A provider's user is one identity of the pool, made at its first login.
                Some(Login::Oidc { provider, user, .. }) => state
                    .registry
                    .get_cognito_id(
                        &account,
                        pool_id,
                        Some((&format!("{OIDC_LOGIN}{provider}"), &user)),
                    )
                    .map_err(cognito_error)?,
                None if !pool.allow_unauthenticated => {
                    return Err(not_authorized(
                        "Unauthenticated access is not supported for this identity pool.",
                    ));
                }
                None => state
                    .registry
                    .get_cognito_id(&account, pool_id, None)
                    .map_err(cognito_error)?,
            };
            Ok(json!({"IdentityId": id}))
        }
        "GetOpenIdToken" => {
            let id = required(&o, "IdentityId")?;
            let (account, i, pool) = identity_and_pool(state, id)?;
            let login = check_logins(state, &account, &pool, &string_map(&o, "Logins", 10)?)?;
            let authenticated = identity_type(&i, &pool, login.as_ref())?;
            identity_provider(state, &account, &pool, &i)?;
            // A token given for a token lasts no longer than the one presented: what a
            // backend or a provider vouched for cannot be renewed past it.
            let exp = login
                .as_ref()
                .map_or(u64::MAX, Login::exp)
                .min(now() + OPEN_ID_TOKEN_SECONDS);
            let token = issue_token(
                &pool.token_key,
                &Claims {
                    sub: i.id.clone(),
                    aud: pool.id.clone(),
                    amr: amr(authenticated, &pool, login.as_ref()),
                    exp,
                },
                now(),
            );
            Ok(json!({"IdentityId": i.id, "Token": token}))
        }
        "GetCredentialsForIdentity" => {
            let id = required(&o, "IdentityId")?;
            if text(&o, "CustomRoleArn")?.is_some() {
                return Err(invalid(
                    "CustomRoleArn needs role mappings, which are not supported",
                ));
            }
            let (account, i, pool) = identity_and_pool(state, id)?;
            let login = check_logins(state, &account, &pool, &string_map(&o, "Logins", 10)?)?;
            let authenticated = identity_type(&i, &pool, login.as_ref())?;
            let provider = identity_provider(state, &account, &pool, &i)?;
            let kind = if authenticated {
                "authenticated"
            } else {
                "unauthenticated"
            };
            let misconfigured = || {
                error(
                    400,
                    "InvalidIdentityPoolConfigurationException",
                    "Invalid identity pool configuration. Check assigned IAM roles for this pool.",
                )
            };
            let role = pool
                .roles
                .get(kind)
                .and_then(|arn| state.registry.role_by_arn(&account, arn))
                .ok_or_else(misconfigured)?;
            let (ctx, keys) = identity_keys(&i.id, &pool, authenticated, login.as_ref());
            if !role_trusts_pool(&role, &ctx) {
                return Err(misconfigured());
            }
            let s = identity_session(
                state,
                &account,
                &i.id,
                &role,
                "CognitoIdentityCredentials",
                CREDENTIAL_SECONDS,
                authenticated,
                keys,
                provider.as_ref(),
            )?;
            Ok(json!({"IdentityId": i.id, "Credentials": {
                "AccessKeyId": s.access_key_id, "SecretKey": s.secret_access_key,
                "SessionToken": s.token, "Expiration": s.expiration.floor()}}))
        }
        _ => Err(invalid(format!("{op} is signed"))),
    }
}

// --- The basic flow: STS AssumeRoleWithWebIdentity with a pool's token -----------------------

/// What AssumeRoleWithWebIdentity gave: the session, the role it is of (name, id), the
/// identity, and the pool.
pub(crate) struct WebIdentitySession {
    pub session: sekisho_registry::Session,
    pub role: (String, String),
    pub identity: String,
    pub pool: String,
}

/// STS AssumeRoleWithWebIdentity (unsigned, as on AWS) for a token one of Sekisho's pools
/// issued (the basic flow, which the pool must allow): the role named must be of the pool's
/// account and trust `cognito-identity.amazonaws.com` for that pool and identity type; the
/// session carries the same Cognito keys as the enhanced flow's. Errors are STS's
/// (`InvalidIdentityToken`, `AccessDenied`, `ValidationError`).
pub(crate) fn assume_role_with_web_identity(
    state: &ApiState,
    role_arn: &str,
    session_name: &str,
    token: &str,
    duration: Option<u32>,
    ip: std::net::IpAddr,
) -> Result<WebIdentitySession, ApiError> {
    let bad_token = || {
        error(
            400,
            "InvalidIdentityToken",
            "The ID Token provided is not a valid Cognito identity token",
        )
    };
    let denied = || {
        error(
            403,
            "AccessDenied",
            "Not authorized to perform sts:AssumeRoleWithWebIdentity",
        )
    };
    // The pool is the token's audience, read before the signature is checked only to find the
    // key that must verify it.
    let aud = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .and_then(|p| p.get("aud").and_then(Value::as_str).map(str::to_owned))
        .ok_or_else(bad_token)?;
    let account = state
        .registry
        .identity_pool_account(&aud)
        .ok_or_else(bad_token)?;
    let pool = state
        .registry
        .identity_pool(&account, &aud)
        .map_err(|_| bad_token())?;
    let claims = verify_token(&pool.token_key, &pool.id, token, now()).ok_or_else(bad_token)?;
    let i = state
        .registry
        .cognito_identity(&account, &claims.sub)
        .ok()
        .filter(|i| i.pool == pool.id)
        .ok_or_else(bad_token)?;
    if !pool.allow_classic_flow {
        return Err(error(
            403,
            "AccessDenied",
            "Basic (classic) flow is not enabled for this identity pool",
        ));
    }
    let login = Login::Pool(claims);
    let authenticated = identity_type(&i, &pool, Some(&login)).map_err(|_| denied())?;
    let provider = identity_provider(state, &account, &pool, &i).map_err(|_| denied())?;
    let role = state
        .registry
        .role_by_arn(&account, role_arn)
        .ok_or_else(denied)?;
    let (mut ctx, keys) = identity_keys(&i.id, &pool, authenticated, Some(&login));
    crate::request_time_and_ip(&mut ctx, now() as i64, ip);
    if !role_trusts_pool(&role, &ctx) {
        return Err(denied());
    }
    let secs = duration.unwrap_or(3600);
    if !(900..=role.max_session).contains(&secs) {
        return Err(error(
            400,
            "ValidationError",
            "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
        ));
    }
    let session = identity_session(
        state,
        &account,
        &i.id,
        &role,
        session_name,
        secs,
        authenticated,
        keys,
        provider.as_ref(),
    )?;
    Ok(WebIdentitySession {
        session,
        role: (role.name, role.id),
        identity: i.id,
        pool: pool.id,
    })
}

/// Whether one more unsigned call may come from `ip` now (the same allowance as the Cognito
/// calls').
pub(crate) fn unsigned_call_allowed(ip: std::net::IpAddr) -> bool {
    unsigned_allowed(ip)
}

// --- Signed calls ---------------------------------------------------------------------------

/// One SigV4-signed call, authorized as `cognito-identity:<Op>` on the pool it names (`*` for
/// CreateIdentityPool and ListIdentityPools).
pub fn dispatch(state: &ApiState, call: &Call) -> Response<Full<Bytes>> {
    let op = operation(&call.headers).unwrap_or_default().to_owned();
    respond(signed(state, call, &op))
}

fn signed(state: &ApiState, call: &Call, op: &str) -> Result<Value, ApiError> {
    let o = body_object(&call.body)?;
    let account = call.account.as_str();
    let pool_arn = |id: &str| {
        format!(
            "arn:aws:cognito-identity:{}:{account}:identitypool/{id}",
            state.endpoints.region
        )
    };
    let allow = |resource: &str| {
        crate::authorize(
            state,
            &call.caller,
            &call.request,
            &format!("cognito-identity:{op}"),
            resource,
        )
        .map_err(|e| not_authorized(e.message))
    };
    // The pool a request names, authorized before it is looked at.
    let pool = |key: &str| -> Result<sekisho_registry::IdentityPool, ApiError> {
        let id = required(&o, key)?;
        allow(&pool_arn(id))?;
        state
            .registry
            .identity_pool(account, id)
            .map_err(cognito_error)
    };
    match op {
        "CreateIdentityPool" => {
            allow("*")?;
            let p = state
                .registry
                .create_identity_pool(account, spec(&o)?)
                .map_err(cognito_error)?;
            Ok(pool_json(&p))
        }
        "DescribeIdentityPool" => Ok(pool_json(&pool("IdentityPoolId")?)),
        "ListIdentityPools" => {
            allow("*")?;
            let max = o
                .get("MaxResults")
                .and_then(Value::as_u64)
                .filter(|n| (1..=60).contains(n))
                .ok_or_else(|| invalid("MaxResults must be from 1 to 60"))?;
            let page = state
                .registry
                .list_identity_pools(account, text(&o, "NextToken")?, max as usize)
                .map_err(cognito_error)?;
            let items: Vec<Value> = page
                .items
                .iter()
                .map(|p| json!({"IdentityPoolId": p.id, "IdentityPoolName": p.name}))
                .collect();
            let mut v = json!({"IdentityPools": items});
            if let Some(n) = page.next {
                v["NextToken"] = json!(n);
            }
            Ok(v)
        }
        "UpdateIdentityPool" => {
            let p = pool("IdentityPoolId")?;
            let p = state
                .registry
                .update_identity_pool(account, &p.id, spec(&o)?)
                .map_err(cognito_error)?;
            Ok(pool_json(&p))
        }
        "DeleteIdentityPool" => {
            let p = pool("IdentityPoolId")?;
            state
                .registry
                .delete_identity_pool(account, &p.id)
                .map_err(cognito_error)?;
            Ok(json!({}))
        }
        "SetIdentityPoolRoles" => {
            let p = pool("IdentityPoolId")?;
            if o.get("RoleMappings")
                .is_some_and(|m| m.as_object().is_none_or(|m| !m.is_empty()))
            {
                return Err(invalid("RoleMappings are not supported"));
            }
            let roles = string_map(&o, "Roles", 2)?;
            // Each role is the caller's account's, and passed to Cognito by the caller.
            for arn in roles.values() {
                if state.registry.role_by_arn(account, arn).is_none() {
                    return Err(invalid(format!("{arn} is not a role of this account")));
                }
                crate::authorize_with(
                    state,
                    &call.caller,
                    &call.request,
                    "iam:PassRole",
                    arn,
                    &[("iam:PassedToService", COGNITO_PROVIDER.to_string())],
                )
                .map_err(|e| not_authorized(e.message))?;
            }
            state
                .registry
                .set_identity_pool_roles(account, &p.id, roles)
                .map_err(cognito_error)?;
            Ok(json!({}))
        }
        "GetIdentityPoolRoles" => {
            let p = pool("IdentityPoolId")?;
            Ok(json!({"IdentityPoolId": p.id, "Roles": p.roles, "RoleMappings": {}}))
        }
        "GetOpenIdTokenForDeveloperIdentity" => {
            let p = pool("IdentityPoolId")?;
            let Some(provider) = &p.developer_provider else {
                return Err(not_authorized(
                    "The identity pool has no developer provider",
                ));
            };
            let logins = string_map(&o, "Logins", 10)?;
            let (Some(user), 1) = (logins.get(provider), logins.len()) else {
                return Err(invalid(format!(
                    "Logins must hold exactly one login, of the pool's developer provider {provider}"
                )));
            };
            if user.is_empty() || user.len() > 128 {
                return Err(invalid(
                    "The developer user identifier must be 1 to 128 characters",
                ));
            }
            let duration = match o.get("TokenDuration") {
                None | Some(Value::Null) => 900,
                Some(v) => v
                    .as_u64()
                    .filter(|n| (1..=86_400).contains(n))
                    .ok_or_else(|| invalid("TokenDuration must be from 1 to 86400"))?,
            };
            let id = match text(&o, "IdentityId")? {
                Some(id) => {
                    state
                        .registry
                        .link_developer_login(account, &p.id, id, (provider, user))
                        .map_err(cognito_error)?;
                    id.to_owned()
                }
                None => state
                    .registry
                    .get_cognito_id(account, &p.id, Some((provider, user)))
                    .map_err(cognito_error)?,
            };
            let token = issue_token(
                &p.token_key,
                &Claims {
                    sub: id.clone(),
                    aud: p.id.clone(),
                    amr: amr(true, &p, None),
                    exp: now() + duration,
                },
                now(),
            );
            Ok(json!({"IdentityId": id, "Token": token}))
        }
        "DeleteIdentities" => {
            let ids = match o.get("IdentityIdsToDelete") {
                Some(Value::Array(a)) if (1..=60).contains(&a.len()) => a
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<String>>>()
                    .ok_or_else(|| invalid("IdentityIdsToDelete must list identity ids"))?,
                _ => {
                    return Err(invalid(
                        "IdentityIdsToDelete must list 1 to 60 identity ids",
                    ));
                }
            };
            // Each identity is deleted only if the caller may do so on its pool.
            let mut unprocessed = Vec::new();
            let mut allowed = Vec::new();
            for id in ids {
                match state.registry.cognito_identity(account, &id) {
                    Ok(i) if allow(&pool_arn(&i.pool)).is_ok() => allowed.push(id),
                    Ok(_) => {
                        unprocessed.push(json!({"IdentityId": id, "ErrorCode": "AccessDenied"}))
                    }
                    // Not this account's, or gone already: nothing to delete.
                    Err(_) => {}
                }
            }
            state
                .registry
                .delete_cognito_identities(account, &allowed)
                .map_err(cognito_error)?;
            Ok(json!({"UnprocessedIdentityIds": unprocessed}))
        }
        "LookupDeveloperIdentity" => {
            let p = pool("IdentityPoolId")?;
            let Some(provider) = &p.developer_provider else {
                return Err(invalid("The identity pool has no developer provider"));
            };
            let by_user = text(&o, "DeveloperUserIdentifier")?;
            let by_id = text(&o, "IdentityId")?;
            if by_user.is_none() && by_id.is_none() {
                return Err(invalid(
                    "Either IdentityId or DeveloperUserIdentifier is required",
                ));
            }
            let prefix = format!("{provider}\n");
            let found = state
                .registry
                .list_cognito_identities(
                    account,
                    &p.id,
                    None,
                    sekisho_registry::MAX_IDENTITIES_PER_POOL,
                )
                .map_err(cognito_error)?
                .items
                .into_iter()
                .find(|i| {
                    by_id.is_none_or(|id| i.id == id)
                        && by_user.is_none_or(|u| i.logins.contains(&format!("{prefix}{u}")))
                })
                .ok_or_else(|| {
                    error(
                        400,
                        "ResourceNotFoundException",
                        "No matching identity found.",
                    )
                })?;
            let users: Vec<&str> = found
                .logins
                .iter()
                .filter_map(|l| l.strip_prefix(&prefix))
                .collect();
            Ok(json!({"IdentityId": found.id, "DeveloperUserIdentifierList": users}))
        }
        "DescribeIdentity" => {
            let id = required(&o, "IdentityId")?;
            let i = state
                .registry
                .cognito_identity(account, id)
                .map_err(cognito_error)?;
            allow(&pool_arn(&i.pool))?;
            Ok(identity_json(&i))
        }
        "ListIdentities" => {
            let p = pool("IdentityPoolId")?;
            let max = o
                .get("MaxResults")
                .and_then(Value::as_u64)
                .filter(|n| (1..=60).contains(n))
                .ok_or_else(|| invalid("MaxResults must be from 1 to 60"))?;
            let page = state
                .registry
                .list_cognito_identities(account, &p.id, text(&o, "NextToken")?, max as usize)
                .map_err(cognito_error)?;
            let items: Vec<Value> = page.items.iter().map(identity_json).collect();
            let mut v = json!({"IdentityPoolId": p.id, "Identities": items});
            if let Some(n) = page.next {
                v["NextToken"] = json!(n);
            }
            Ok(v)
        }
        "GetId" | "GetCredentialsForIdentity" | "GetOpenIdToken" => unsigned(state, op, &call.body),
        other => Err(invalid(format!(
            "{other} is not supported by Sekisho's cognito-identity"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_their_pools_key_for_their_pool_until_they_expire() {
        let c = Claims {
            sub: "us-east-1:i".into(),
            aud: "us-east-1:p".into(),
            amr: vec!["authenticated".into(), "dev".into()],
            exp: 1_000,
        };
        let t = issue_token("k1", &c, 900);
        assert_eq!(verify_token("k1", "us-east-1:p", &t, 999), Some(c.clone()));
        assert_eq!(verify_token("k1", "us-east-1:p", &t, 1_000), None);
        assert_eq!(verify_token("k2", "us-east-1:p", &t, 999), None);
        assert_eq!(verify_token("k1", "us-east-1:q", &t, 999), None);
        // A payload changed under the same tag, or garbage: refused.
        let (h, rest) = t.split_once('.').unwrap();
        let (_, tag) = rest.split_once('.').unwrap();
        let forged = b64(json!({"sub": "us-east-1:other", "aud": "us-east-1:p",
            "amr": ["authenticated"], "exp": 2000})
        .to_string()
        .as_bytes());
        assert_eq!(
            verify_token("k1", "us-east-1:p", &format!("{h}.{forged}.{tag}"), 999),
            None
        );
        for bad in ["", "a.b", "a.b.c", "...", &"x".repeat(MAX_LOGIN_TOKEN + 1)] {
            assert_eq!(verify_token("k1", "us-east-1:p", bad, 999), None, "{bad}");
        }
    }
}
