//! OpenID Connect ID tokens from identity providers registered in IAM
//! (CreateOpenIDConnectProvider), verified with keys the operator configured for the issuer
//! (`[[oidc_providers]]`: a JWKS file), so that nothing is fetched from the internet. The
//! verification is pure: a token, the keys and the time in, the claims or why not out.
//!
//! Taken: JWS compact tokens signed RS256/RS384/RS512 (RSA 2048 bits or more) or ES256/ES384;
//! `none`, HMAC and anything else are refused. `iss`, `sub`, `aud` and `exp` are required;
//! `exp` is not in the past and `nbf`/`iat` not more than a minute ahead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use base64::Engine as _;
use serde_json::Value;

/// Longest token taken (STS's `WebIdentityToken` bound).
pub const MAX_TOKEN: usize = 20_000;

/// How far ahead of this clock a token's `nbf` or `iat` may be.
const SKEW: i64 = 60;

/// Why a token was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token that can be checked (form, algorithm, claims missing).
    Malformed(&'static str),
    /// No configured key verifies its signature.
    Signature,
    /// Expired (or not yet valid).
    Expired,
}

/// One verification key.
#[derive(Debug, Clone)]
enum Key {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    P256(Vec<u8>),
    P384(Vec<u8>),
}

/// An issuer's keys (a JWKS).
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: Vec<(Option<String>, Key)>,
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`). Keys of other types, or for encryption
    /// only (`"use": "enc"`), are skipped; a document with no usable key is an error.
    pub fn parse(text: &str) -> Result<Jwks, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let keys = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("no \"keys\" array")?;
        let mut out = Vec::new();
        for k in keys {
            if k.get("use").and_then(Value::as_str) == Some("enc") {
                continue;
            }
            let kid = k.get("kid").and_then(Value::as_str).map(str::to_owned);
            let field = |name: &str| k.get(name).and_then(Value::as_str).and_then(b64url);
            let key = match (
                k.get("kty").and_then(Value::as_str),
                k.get("crv").and_then(Value::as_str),
            ) {
                (Some("RSA"), _) => match (field("n"), field("e")) {
                    (Some(n), Some(e)) if n.len() >= 256 => Key::Rsa { n, e },
                    _ => continue,
                },
                (Some("EC"), Some(crv @ ("P-256" | "P-384"))) => {
                    let size = if crv == "P-256" { 32 } else { 48 };
                    match (field("x"), field("y")) {
                        (Some(x), Some(y)) if x.len() == size && y.len() == size => {
                            let mut p = Vec::with_capacity(1 + 2 * size);
                            p.push(4);
                            p.extend_from_slice(&x);
                            p.extend_from_slice(&y);
                            if size == 32 {
                                Key::P256(p)
                            } else {
                                Key::P384(p)
                            }
                        }
                        _ => continue,
                    }
                }
                _ => continue,
            };
            out.push((kid, key));
        }
        if out.is_empty() {
            return Err("no RSA (2048 bits or more), P-256 or P-384 signing key".into());
        }
        Ok(Jwks { keys: out })
    }
}

/// A verified token's claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `iss`.
    pub iss: String,
    /// `sub`.
    pub sub: String,
    /// `aud`, as one or several.
    pub aud: Vec<String>,
    /// `exp`, epoch seconds.
    pub exp: i64,
}

/// The `iss` a token claims, unverified: which issuer's keys to check it with.
pub fn issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let v: Value = serde_json::from_slice(&b64url(payload)?).ok()?;
    v.get("iss").and_then(Value::as_str).map(str::to_owned)
}

/// Verifies `token` with `keys` at `now` (epoch seconds).
pub fn verify(token: &str, keys: &Jwks, now: i64) -> Result<Claims, TokenError> {
    use aws_lc_rs::signature;
    if token.len() > MAX_TOKEN {
        return Err(TokenError::Malformed("the token is too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not a JWS in compact form"));
    };
    let header: Value = b64url(h)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed("the header is not base64url JSON"))?;
    let sig = b64url(s).ok_or(TokenError::Malformed("the signature is not base64url"))?;
    let kid = header.get("kid").and_then(Value::as_str);
    let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
    let verified = match header.get("alg").and_then(Value::as_str) {
        Some(alg @ ("RS256" | "RS384" | "RS512")) => {
            let params = match alg {
                "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
                _ => &signature::RSA_PKCS1_2048_8192_SHA512,
            };
            keys.keys.iter().any(|(k, key)| {
                kid.is_none_or(|want| k.as_deref() == Some(want))
                    && matches!(key, Key::Rsa { n, e }
                        if signature::RsaPublicKeyComponents { n, e }.verify(params, signed, &sig).is_ok())
            })
        }
        Some("ES256") => keys.keys.iter().any(|(k, key)| {
            kid.is_none_or(|want| k.as_deref() == Some(want))
                && matches!(key, Key::P256(pt)
                    if signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, pt)
                        .verify(signed, &sig).is_ok())
        }),
        Some("ES384") => keys.keys.iter().any(|(k, key)| {
            kid.is_none_or(|want| k.as_deref() == Some(want))
                && matches!(key, Key::P384(pt)
                    if signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, pt)
                        .verify(signed, &sig).is_ok())
        }),
        _ => {
            return Err(TokenError::Malformed(
                "the algorithm is not RS256/384/512 or ES256/384",
            ));
        }
    };
    if !verified {
        return Err(TokenError::Signature);
    }
    let claims: Value = b64url(p)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed("the payload is not base64url JSON"))?;
    let text = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let time = |k: &str| claims.get(k).and_then(Value::as_f64).map(|f| f as i64);
    let iss = text("iss").ok_or(TokenError::Malformed("no iss"))?;
    let sub = text("sub").ok_or(TokenError::Malformed("no sub"))?;
    let aud = match claims.get("aud") {
        Some(Value::String(a)) if !a.is_empty() => vec![a.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    if aud.is_empty() {
        return Err(TokenError::Malformed("no aud"));
    }
    let exp = time("exp").ok_or(TokenError::Malformed("no exp"))?;
    if exp <= now
        || time("nbf").is_some_and(|t| t > now + SKEW)
        || time("iat").is_some_and(|t| t > now + SKEW)
    {
        return Err(TokenError::Expired);
    }
    Ok(Claims { iss, sub, aud, exp })
}

/// The keys the operator configured, by provider name (the issuer URL without `https://`),
/// each read from its JWKS file and read again when the file changes, so that rotating keys
/// needs no restart.
#[derive(Debug, Default)]
pub struct Keys {
    files: BTreeMap<String, PathBuf>,
    /// What each file held when last read (none: unusable), by the file's stamp.
    loaded: Mutex<BTreeMap<String, (Stamp, Option<Jwks>)>>,
}

/// What tells a file's versions apart: its modification and change times, size and inode (a
/// copy that keeps the old modification time still changes the change time or the inode).
type Stamp = (std::time::SystemTime, i64, i64, u64, u64);

fn stamp(m: &std::fs::Metadata) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    Some((
        m.modified().ok()?,
        m.ctime(),
        m.ctime_nsec(),
        m.len(),
        m.ino(),
    ))
}

impl Keys {
    /// From `(issuer URL, JWKS file)` pairs.
    pub fn new(providers: impl IntoIterator<Item = (String, PathBuf)>) -> Keys {
        Keys {
            files: providers
                .into_iter()
                .map(|(url, file)| (provider_name(&url), file))
                .collect(),
            loaded: Mutex::default(),
        }
    }

    /// The keys of provider `name`, if any are configured and readable.
    pub fn of(&self, name: &str) -> Option<Jwks> {
        let file = self.files.get(name)?;
        let now = std::fs::metadata(file).ok().as_ref().and_then(stamp)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, jwks)) = loaded.get(name)
            && *at == now
        {
            return jwks.clone();
        }
        // Read (and, when unusable, logged) once per version of the file.
        let jwks = match std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|t| Jwks::parse(&t))
        {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::warn!(provider = name, file = %file.display(), error = %e, "OIDC keys unusable");
                None
            }
        };
        loaded.insert(name.to_owned(), (now, jwks.clone()));
        jwks
    }
}

/// A provider's name as IAM keys it: its URL without `https://` and without a trailing `/`,
/// the host in lower case.
pub fn provider_name(url: &str) -> String {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    match rest.split_once('/') {
        Some((host, path)) => format!("{}/{path}", host.to_ascii_lowercase()),
        None => rest.to_ascii_lowercase(),
    }
}

/// A role session for an OpenID Connect token, and what STS says of it.
pub(crate) struct OidcSession {
    pub session: sekisho_registry::Session,
    /// The role's name and id.
    pub role: (String, String),
    /// `sub`.
    pub subject: String,
    /// `iss` as the token gave it.
    pub issuer: String,
    /// The audience that matched one of the provider's client ids.
    pub audience: String,
}

/// Live sessions bought with one provider's token for one subject, at most: the call is
/// unsigned, so a token's holder could otherwise fill the account's sessions.
pub(crate) const MAX_SESSIONS_PER_SUBJECT: usize = 16;

/// A session given again while more than this is left of it (seconds).
const REUSE_WHILE_LEFT: f64 = 900.0;

/// Sessions remembered for reuse, in all.
const MAX_REMEMBERED: usize = 100_000;

/// (account, provider name, subject) → the live sessions given, by (role id, session name,
/// audience, seconds, provider's creation).
type Given = std::collections::HashMap<
    (String, String, String),
    Vec<(
        (String, String, String, u32, u64),
        sekisho_registry::Session,
    )>,
>;

static GIVEN: std::sync::LazyLock<Mutex<Given>> = std::sync::LazyLock::new(Mutex::default);

/// An issuer as it may appear in a message or a log line: at most 200 characters, controls
/// replaced.
fn shown(iss: &str) -> String {
    iss.chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// STS AssumeRoleWithWebIdentity (unsigned, as on AWS) with an ID token of an OpenID Connect
/// provider registered in the role's account: the token must verify with the keys configured
/// for its issuer (checked before anything of any account is looked at, so a forged token
/// learns nothing of which providers exist), its `iss` must be the provider's URL exactly,
/// its `aud` one of the provider's client ids, and the role must trust the provider
/// (`Federated` its ARN) with the token's `<provider>:aud` and `<provider>:sub` (and the
/// request's `aws:SourceIp` and time), which the session carries for policies. The session
/// ends if the provider is deleted; a live one is given again for the same request, and one
/// subject holds at most [`MAX_SESSIONS_PER_SUBJECT`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn assume_role(
    state: &crate::ApiState,
    role_arn: &str,
    session_name: &str,
    token: &str,
    duration: Option<u32>,
    now: i64,
    ip: std::net::IpAddr,
) -> Result<OidcSession, crate::ApiError> {
    use crate::ApiError;
    let invalid = |m: &str| ApiError::new(400, "InvalidIdentityToken", m);
    let denied = || {
        ApiError::new(
            403,
            "AccessDenied",
            "Not authorized to perform sts:AssumeRoleWithWebIdentity",
        )
    };
    let iss = issuer(token).ok_or_else(|| invalid("Couldn't parse the web identity token"))?;
    let name = provider_name(&iss);
    // The issuer as the provider is registered (`https://host[/path]`, the host in lower
    // case), exactly.
    if iss != format!("https://{name}") {
        return Err(invalid(&format!(
            "The token's issuer {} is not a provider's URL",
            shown(&iss)
        )));
    }
    let keys = state.oidc_keys.of(&name).ok_or_else(|| {
        ApiError::new(
            400,
            "IDPCommunicationError",
            "Couldn't retrieve verification key from your identity provider, please reference AssumeRoleWithWebIdentity documentation for requirements",
        )
    })?;
    let claims = match verify(token, &keys, now) {
        Ok(c) => c,
        Err(TokenError::Expired) => {
            return Err(ApiError::new(
                400,
                "ExpiredTokenException",
                "Token expired or not yet valid",
            ));
        }
        Err(TokenError::Signature) => {
            return Err(invalid(
                "The web identity token that was passed could not be validated by AWS. Get a new identity token from the identity provider and then retry the request.",
            ));
        }
        Err(TokenError::Malformed(m)) => return Err(invalid(m)),
    };
    // The role's account is the one whose provider must vouch for the token.
    let account = role_arn
        .strip_prefix("arn:aws:iam::")
        .and_then(|r| r.split_once(':'))
        .map(|(a, _)| a.to_owned())
        .ok_or_else(denied)?;
    let provider = state
        .registry
        .oidc_provider_by_name(&account, &name)
        .ok_or_else(|| {
            invalid(&format!(
                "No OpenIDConnect provider found in your account for {}",
                shown(&iss)
            ))
        })?;
    let audience = claims
        .aud
        .iter()
        .find(|a| provider.client_ids.contains(a))
        .cloned()
        .ok_or_else(|| invalid("Incorrect token audience"))?;
    let role = state
        .registry
        .role_by_arn(&account, role_arn)
        .ok_or_else(denied)?;
    let provider_arn = provider.arn(&account);
    let mut ctx = sekisho_policy::MapContext::new();
    ctx.set(&format!("{name}:aud"), audience.clone());
    ctx.set(&format!("{name}:sub"), claims.sub.clone());
    crate::request_time_and_ip(&mut ctx, now, ip);
    if !role.trusts_federated(&provider_arn, &ctx) {
        return Err(denied());
    }
    let secs = duration.unwrap_or(3600);
    if !(900..=role.max_session).contains(&secs) {
        return Err(ApiError::new(
            400,
            "ValidationError",
            "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
        ));
    }
    let subject = (account.clone(), name.clone(), claims.sub.clone());
    let wanted = (
        role.id.clone(),
        session_name.to_owned(),
        audience.clone(),
        secs,
        provider.created.to_bits(),
    );
    let session = {
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        let live = given.entry(subject.clone()).or_default();
        let nowf = now as f64;
        live.retain(|(_, s)| {
            s.expiration > nowf && state.registry.credential(&s.access_key_id).is_some()
        });
        if let Some((_, s)) = live
            .iter()
            .find(|(k, s)| *k == wanted && s.expiration - nowf > REUSE_WHILE_LEFT)
        {
            s.clone()
        } else {
            if live.len() >= MAX_SESSIONS_PER_SUBJECT {
                return Err(ApiError::new(
                    400,
                    "LimitExceeded",
                    format!(
                        "This web identity already holds {MAX_SESSIONS_PER_SUBJECT} live sessions; use one until it expires"
                    ),
                ));
            }
            let keys = BTreeMap::from([
                (format!("{name}:aud"), audience.clone()),
                (format!("{name}:sub"), claims.sub.clone()),
            ]);
            let s = state
                .registry
                .create_web_identity_session(
                    &account,
                    sekisho_registry::IamPrincipal::Role {
                        role: role.name.clone(),
                        session: session_name.to_owned(),
                    },
                    secs,
                    None,
                    keys,
                    Some(&provider),
                )
                .map_err(|e| match e {
                    sekisho_registry::RegistryError::LimitExceeded(m) => {
                        ApiError::new(400, "LimitExceeded", m)
                    }
                    other => ApiError::new(500, "ServiceFailure", other.to_string()),
                })?;
            live.push((wanted, s.clone()));
            if given.len() > MAX_REMEMBERED {
                given.retain(|_, v| v.iter().any(|(_, s)| s.expiration > nowf));
            }
            s
        }
    };
    Ok(OidcSession {
        session,
        role: (role.name, role.id),
        subject: claims.sub,
        issuer: iss,
        audience,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self, KeyPair as _};

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// An ES256 key, its JWKS (kid `k1`), and a signer of tokens.
    pub(crate) fn es256() -> (String, impl Fn(&Value, Option<&str>) -> String) {
        let rng = SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let key = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
        )
        .unwrap();
        let pt = key.public_key().as_ref().to_vec();
        let jwks =
            serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
            "x": b64(&pt[1..33]), "y": b64(&pt[33..])}]})
            .to_string();
        let sign = move |claims: &Value, alg: Option<&str>| {
            let header =
                serde_json::json!({"alg": alg.unwrap_or("ES256"), "kid": "k1", "typ": "JWT"});
            let input = format!(
                "{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let sig = key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
            format!("{input}.{}", b64(sig.as_ref()))
        };
        (jwks, sign)
    }

    #[test]
    fn a_token_verifies_with_its_issuers_key_until_it_expires() {
        let (jwks, sign) = es256();
        let keys = Jwks::parse(&jwks).unwrap();
        let claims = serde_json::json!({"iss": "https://idp.example/r", "sub": "u1", "aud": "app", "exp": 1000, "iat": 900});
        let t = sign(&claims, None);
        assert_eq!(issuer(&t).as_deref(), Some("https://idp.example/r"));
        let c = verify(&t, &keys, 999).unwrap();
        assert_eq!(
            (c.iss.as_str(), c.sub.as_str(), c.aud.clone(), c.exp),
            ("https://idp.example/r", "u1", vec!["app".to_string()], 1000)
        );
        // Expired at exp exactly; not valid before its iat (a minute's skew).
        assert_eq!(verify(&t, &keys, 1000), Err(TokenError::Expired));
        assert_eq!(verify(&t, &keys, 839), Err(TokenError::Expired));
        assert!(verify(&t, &keys, 840).is_ok());
        // Another key's JWKS: the signature does not verify.
        let (other, _) = es256();
        assert_eq!(
            verify(&t, &Jwks::parse(&other).unwrap(), 999),
            Err(TokenError::Signature)
        );
        // A claim changed after signing.
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        parts[1] = b64(serde_json::json!({"iss": "https://idp.example/r", "sub": "admin", "aud": "app", "exp": 1000}).to_string().as_bytes());
        assert_eq!(
            verify(&parts.join("."), &keys, 999),
            Err(TokenError::Signature)
        );
    }

    #[test]
    fn unsigned_hmac_and_malformed_tokens_are_refused() {
        let (jwks, sign) = es256();
        let keys = Jwks::parse(&jwks).unwrap();
        let claims = serde_json::json!({"iss": "https://idp.example", "sub": "u1", "aud": "app", "exp": 1000});
        for alg in ["none", "HS256", "RS256", "ES384"] {
            assert!(
                verify(&sign(&claims, Some(alg)), &keys, 1).is_err(),
                "{alg}"
            );
        }
        let good = sign(&claims, None);
        let (h, rest) = good.split_once('.').unwrap();
        let none_header = b64(br#"{"alg":"none"}"#);
        for t in [
            "".to_string(),
            "a.b".to_string(),
            format!("{good}.x"),
            format!("{none_header}.{}", rest.rsplit_once('.').unwrap().0) + ".",
            format!("{h}.!!!.{}", rest.rsplit_once('.').unwrap().1),
            "x".repeat(MAX_TOKEN + 1),
        ] {
            assert!(verify(&t, &keys, 1).is_err(), "{t:.40}");
        }
        for missing in ["iss", "sub", "aud", "exp"] {
            let mut c = claims.clone();
            c.as_object_mut().unwrap().remove(missing);
            assert!(
                matches!(
                    verify(&sign(&c, None), &keys, 1),
                    Err(TokenError::Malformed(_))
                ),
                "{missing}"
            );
        }
        // aud as a list.
        let mut c = claims.clone();
        c["aud"] = serde_json::json!(["a", "app"]);
        assert_eq!(
            verify(&sign(&c, None), &keys, 1).unwrap().aud,
            vec!["a", "app"]
        );
    }

    #[test]
    fn jwks_documents_and_provider_names() {
        assert!(Jwks::parse("{}").is_err());
        assert!(Jwks::parse(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
        // A short RSA modulus is not a key taken.
        assert!(Jwks::parse(r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#).is_err());
        assert_eq!(
            provider_name("https://IdP.Example.com/realms/Plant/"),
            "idp.example.com/realms/Plant"
        );
        assert_eq!(provider_name("https://idp.example.com"), "idp.example.com");
    }
}
