//! Fleet provisioning by claim over MQTT, in JSON or CBOR (the topic's last level says which;
//! the answer comes in the same):
//! `$aws/certificates/create/{json,cbor}` (CreateKeysAndCertificate),
//! `$aws/certificates/create-from-csr/{json,cbor}` (CreateCertificateFromCsr) and
//! `$aws/provisioning-templates/{name}/provision/{json,cbor}` (RegisterThing), answered on the
//! request topic's `/accepted` or `/rejected`.
//!
//! Answers go to the requesting connection only: `create/json/accepted` carries a private key
//! and an ownership token, which no other subscriber of that topic may see. A new certificate
//! is PENDING_ACTIVATION until RegisterThing activates it; its ownership token is random,
//! single-use, bound to the account, and expires after an hour, when a certificate that was
//! never provisioned is deleted. Tokens live in memory: after a restart a device starts over.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sekisho_pki::{DeviceKey, KeyKind, PkiError};

use sekisho_registry::{CertMode, CertStatus, NewCertificate, TemplateType};
use serde_json::{Map, Value, json};

use crate::Shared;

/// How long an ownership token is good for, in seconds.
pub const TOKEN_SECONDS: f64 = 3600.0;
/// Provisioning requests per second per account (key generation is costly).
pub const REQUESTS_PER_ACCOUNT: u32 = 10;
/// Certificates an account may have waiting for provisioning (PENDING_ACTIVATION, issued here).
pub const MAX_PENDING: usize = 10_000;

/// Keys the pool keeps ready.
const POOL_KEYS: usize = 4;

/// RSA 2048 keys for CreateKeysAndCertificate over MQTT, generated ahead on a thread of their
/// own: one takes tens of milliseconds, which on a device connection thread would stall every
/// connection sharing that thread. The pool starts filling at the first request (a server
/// that never provisions spends nothing) and keeps [`POOL_KEYS`]. A request that finds it
/// empty generates a key in place if no other connection is doing so, and is throttled
/// otherwise: at most one connection thread is ever busy generating keys.
#[derive(Debug, Default)]
pub struct KeyPool {
    keys: Mutex<Vec<DeviceKey>>,
    wake: Condvar,
    started: AtomicBool,
    in_place: Mutex<()>,
}

impl KeyPool {
    /// A key, or `None` when none is ready and another request is generating one.
    pub fn take(self: &Arc<Self>) -> Option<Result<DeviceKey, PkiError>> {
        self.start();
        let key = self.keys.lock().unwrap_or_else(|p| p.into_inner()).pop();
        self.wake.notify_one();
        if let Some(k) = key {
            return Some(Ok(k));
        }
        let _only_one = self.in_place.try_lock().ok()?;
        Some(DeviceKey::generate(KeyKind::Rsa2048))
    }

    fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("sekisho-keys".into())
            .spawn(move || {
                // Holds the pool only between waits: it ends once the pool is dropped.
                while let Some(pool) = weak.upgrade() {
                    let full = {
                        let keys = pool.keys.lock().unwrap_or_else(|p| p.into_inner());
                        if keys.len() >= POOL_KEYS {
                            let _ = pool.wake.wait_timeout(keys, Duration::from_secs(1));
                            true
                        } else {
                            false
                        }
                    };
                    if full {
                        continue;
                    }
                    match DeviceKey::generate(KeyKind::Rsa2048) {
                        Ok(k) => pool.keys.lock().unwrap_or_else(|p| p.into_inner()).push(k),
                        Err(e) => {
                            tracing::error!(error = %e, "key generation failed");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "the key generation thread did not start");
            self.started.store(false, Ordering::Release);
        }
    }
}

/// What a provisioning topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// CreateKeysAndCertificate.
    CreateKeys,
    /// CreateCertificateFromCsr.
    CreateFromCsr,
    /// RegisterThing with this template.
    Register(&'a str),
}

/// The payload format a topic names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.../json`
    Json,
    /// `.../cbor`
    Cbor,
}

/// Parses a provisioning request topic.
pub fn parse_topic(topic: &str) -> Option<(Request<'_>, Format)> {
    let (base, format) = match topic.rsplit_once('/')? {
        (b, "json") => (b, Format::Json),
        (b, "cbor") => (b, Format::Cbor),
        _ => return None,
    };
    let req = match base {
        "$aws/certificates/create" => Request::CreateKeys,
        "$aws/certificates/create-from-csr" => Request::CreateFromCsr,
        _ => {
            let name = base
                .strip_prefix("$aws/provisioning-templates/")?
                .strip_suffix("/provision")?;
            if name.is_empty() || name.contains('/') {
                return None;
            }
            Request::Register(name)
        }
    };
    Some((req, format))
}

/// A request payload as a JSON object (CBOR maps read as JSON objects); `None` if it is not
/// one. An empty payload is an empty object.
fn decode(payload: &[u8], format: Format) -> Option<Map<String, Value>> {
    if payload.is_empty() || (format == Format::Json && payload.iter().all(u8::is_ascii_whitespace))
    {
        return Some(Map::new());
    }
    let v: Value = match format {
        Format::Json => serde_json::from_slice(payload).ok()?,
        Format::Cbor => ciborium::de::from_reader(payload).ok()?,
    };
    match v {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// An answer in the request's format.
pub fn encode(v: &Value, format: Format) -> bytes::Bytes {
    match format {
        Format::Json => bytes::Bytes::from(v.to_string()),
        Format::Cbor => {
            let mut out = Vec::new();
            // Writing a JSON value to a Vec cannot fail.
            let _ = ciborium::ser::into_writer(v, &mut out);
            bytes::Bytes::from(out)
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    account: String,
    certificate: String,
    expires: f64,
    /// How many times a pre-provisioning hook refused it.
    hook_refusals: u8,
}

/// Refusals by a pre-provisioning hook a token survives: past them it is spent, so that one
/// claim cannot drive the hook with new parameters for the token's whole hour.
const MAX_HOOK_REFUSALS: u8 = 3;

/// Ownership tokens handed out and not yet used, and each account's request rate.
#[derive(Debug, Default)]
pub struct Tokens {
    live: Mutex<HashMap<String, Token>>,
    rates: Mutex<HashMap<String, sekisho_broker::throttle::Bucket>>,
}

impl Tokens {
    fn issue(&self, account: &str, certificate: &str, now: f64) -> String {
        let token = sekisho_registry::random_string(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            48,
        );
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.insert(
            token.clone(),
            Token {
                account: account.to_owned(),
                certificate: certificate.to_owned(),
                expires: now + TOKEN_SECONDS,
                hook_refusals: 0,
            },
        );
        token
    }

    /// Takes a token (once), if it is this account's and live.
    fn take(&self, account: &str, token: &str, now: f64) -> Option<Token> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let t = live.get(token)?;
        if t.account != account || t.expires <= now {
            return None;
        }
        live.remove(token)
    }

    /// Gives back a token whose provisioning failed, so the device may try again.
    fn give_back(&self, token: &str, t: Token) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.insert(token.to_owned(), t);
    }

    /// Whether an account may make another provisioning request now.
    fn admit(&self, account: &str) -> bool {
        let now = std::time::Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        rates
            .entry(account.to_owned())
            .or_insert_with(|| {
                sekisho_broker::throttle::Bucket::new(
                    REQUESTS_PER_ACCOUNT,
                    2 * REQUESTS_PER_ACCOUNT,
                )
            })
            .take(now, 1)
    }

    /// Forgets expired tokens; returns the (account, certificate) of each.
    pub fn expire(&self, now: f64) -> Vec<(String, String)> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<String> = live
            .iter()
            .filter(|(_, t)| t.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        gone.into_iter()
            .filter_map(|k| live.remove(&k))
            .map(|t| (t.account, t.certificate))
            .collect()
    }
}

/// Deletes the certificates of expired tokens that were never provisioned (still
/// PENDING_ACTIVATION, attached to nothing), as AWS does after an hour.
pub fn sweep(shared: &Shared, now: f64) {
    // Provisioning claims live five minutes.
    for (account, cert) in shared.registry.expired_claims(now) {
        let _ = shared
            .registry
            .update_certificate(&account, &cert, CertStatus::Inactive);
        if let Err(e) = shared.registry.delete_certificate(&account, &cert, true) {
            tracing::debug!(%cert, error = %e, "expired provisioning claim kept");
        }
    }
    // Tokens are kept in memory: after a restart, certificates issued here and never
    // provisioned are found by their age.
    for (account, cert) in shared
        .registry
        .stale_pending_certificates(now - TOKEN_SECONDS)
        .into_iter()
        .chain(shared.tokens.expire(now))
    {
        let pending = shared
            .registry
            .describe_certificate(&account, &cert)
            .is_ok_and(|c| c.status == CertStatus::PendingActivation);
        if pending && let Err(e) = shared.registry.delete_certificate(&account, &cert, false) {
            tracing::debug!(%cert, error = %e, "unprovisioned claim certificate kept");
        }
    }
}

fn rejected(status: u16, code: &str, message: impl Into<String>) -> (bool, Value) {
    (
        false,
        json!({"statusCode": status, "errorCode": code, "errorMessage": message.into()}),
    )
}

/// Who asks: the claim certificate a device connected with, and its client id (a
/// pre-provisioning hook is told both).
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    /// The connection's certificate.
    pub certificate: Option<&'a str>,
    /// Its client id.
    pub client_id: &'a str,
}

/// A provisioning answer: now, or once a template's pre-provisioning hook has decided.
pub enum Answer {
    /// Whether it was accepted, and the answer encoded as the request was.
    Now(bool, bytes::Bytes),
    /// A RegisterThing whose template has a hook: [`Pending::run`] gives the answer.
    Later(Box<Pending>),
}

/// A RegisterThing waiting on its template's pre-provisioning hook (its ownership token held).
pub struct Pending {
    account: String,
    token: String,
    held: Token,
    template: sekisho_registry::ProvisioningTemplate,
    hook: Value,
    request: sekisho_functions::hook::Request,
    format: Format,
}

impl Pending {
    /// Runs the hook, then provisions with the parameters it let through (and overrode), or
    /// refuses (`403 AccessDenied`) and gives the token back.
    pub async fn run(self, shared: &Shared) -> (bool, bytes::Bytes) {
        let Pending {
            account,
            token,
            held,
            template,
            hook,
            request,
            format,
        } = self;
        let decided = match shared.functions.get() {
            Some(invoker) => {
                sekisho_functions::hook::run(invoker, &shared.registry, &account, &hook, &request)
                    .await
            }
            None => Err("functions are not served".to_string()),
        };
        let (ok, doc) = match decided {
            // What may have changed while the hook ran is looked at again: the template (still
            // enabled for fleet provisioning) and the claim (still usable).
            Ok(overrides) => match shared.registry.template(&account, &template.name) {
                Ok(now) if now.enabled && now.kind == TemplateType::FleetProvisioning => {
                    let claim_usable = shared
                        .registry
                        .certificate_usable(
                            &sekisho_registry::AccountId::new(account.clone()),
                            &sekisho_registry::CertificateId::new(
                                request.claim_certificate_id.clone(),
                            ),
                        )
                        .is_ok();
                    if claim_usable {
                        let mut params = request.parameters;
                        params.extend(overrides);
                        params.insert(
                            "AWS::IoT::Certificate::Id".into(),
                            request.certificate_id.clone(),
                        );
                        provision(shared, &account, &now, &params, &token, held)
                    } else {
                        rejected(403, "AccessDenied", "The claim certificate is not usable")
                    }
                }
                _ => {
                    shared.tokens.give_back(&token, held);
                    rejected(
                        400,
                        "InvalidRequest",
                        format!(
                            "The template {} is not enabled for fleet provisioning",
                            template.name
                        ),
                    )
                }
            },
            // The device learns only that the hook refused; the server's log says why.
            Err(why) => {
                tracing::info!(%account, template = %template.name, %why, "pre-provisioning hook refused");
                let mut held = held;
                held.hook_refusals += 1;
                if held.hook_refusals < MAX_HOOK_REFUSALS {
                    shared.tokens.give_back(&token, held);
                }
                rejected(
                    403,
                    "AccessDenied",
                    "The pre-provisioning hook did not allow provisioning",
                )
            }
        };
        (ok, encode(&doc, format))
    }
}

/// Answers one provisioning request, encoded as the request was (later, for a template with a
/// pre-provisioning hook).
pub fn answer(
    shared: &Shared,
    account: &str,
    req: &Request<'_>,
    format: Format,
    payload: &[u8],
    asker: Asker<'_>,
) -> Answer {
    let mut later = None;
    let (ok, doc) = answer_value(shared, account, req, format, payload, asker, &mut later);
    match later {
        Some(pending) => Answer::Later(pending),
        None => Answer::Now(ok, encode(&doc, format)),
    }
}

/// Evaluates a template with the parameters and registers what it says (the token spent
/// whatever the outcome, or given back if the parameters do not fit the template).
fn provision(
    shared: &Shared,
    account: &str,
    template: &sekisho_registry::ProvisioningTemplate,
    params: &BTreeMap<String, String>,
    token: &str,
    held: Token,
) -> (bool, Value) {
    let cert = held.certificate.clone();
    let plan = match sekisho_registry::template::evaluate(template.body(), params) {
        Ok(p) => p,
        Err(m) => {
            shared.tokens.give_back(token, held);
            return rejected(400, "InvalidParameters", m);
        }
    };
    // Spent from here on, whatever the outcome: what a failed run did stays, and a token must
    // not drive it again.
    drop(held);
    match shared
        .registry
        .register_thing(account, plan, &cert, &template.role_arn)
    {
        Ok(r) => {
            let mut v = json!({"deviceConfiguration": r.device_configuration});
            if let Some(t) = r.thing {
                v["thingName"] = json!(t);
            }
            (true, v)
        }
        Err(e) => rejected(400, "ResourceRegistrationFailure", e.to_string()),
    }
}

/// The answer to a request; for a RegisterThing whose template has a pre-provisioning hook,
/// `later` gets what the hook must decide (its answer then is the hook's, not this one).
fn answer_value(
    shared: &Shared,
    account: &str,
    req: &Request<'_>,
    format: Format,
    payload: &[u8],
    asker: Asker<'_>,
    later: &mut Option<Box<Pending>>,
) -> (bool, Value) {
    let now = sekisho_registry::now_secs();
    if !shared.tokens.admit(account) {
        return rejected(429, "Throttled", "Too many provisioning requests");
    }
    let Some(body) = decode(payload, format) else {
        return rejected(
            400,
            "InvalidPayload",
            "The payload is not a JSON or CBOR map",
        );
    };
    let Some(ca) = shared.device_ca.get() else {
        return rejected(500, "InternalError", "Certificates cannot be issued here");
    };
    let utc = time::OffsetDateTime::now_utc();
    let register = |pem: String| {
        if shared.registry.pending_certificates(account) >= MAX_PENDING {
            return Err(sekisho_registry::RegistryError::LimitExceeded(format!(
                "{MAX_PENDING} certificates are waiting to be provisioned"
            )));
        }
        shared.registry.add_certificate(
            account,
            NewCertificate {
                pem,
                status: CertStatus::PendingActivation,
                ca_certificate_id: None,
                mode: CertMode::Default,
                claim_template: None,
            },
        )
    };
    match req {
        Request::CreateKeys => {
            // A key is not spent on a request that could not register its certificate.
            if shared.registry.pending_certificates(account) >= MAX_PENDING {
                return rejected(
                    400,
                    "LimitExceeded",
                    format!("{MAX_PENDING} certificates are waiting to be provisioned"),
                );
            }
            let key = match shared.keys.take() {
                Some(Ok(k)) => k,
                Some(Err(e)) => return rejected(500, "InternalError", e.to_string()),
                None => return rejected(429, "Throttled", "Too many provisioning requests"),
            };
            let issued = match ca.issue_device_with(key, utc) {
                Ok(i) => i,
                Err(e) => return rejected(500, "InternalError", e.to_string()),
            };
            match register(issued.cert_pem) {
                Ok((c, pem)) => (
                    true,
                    json!({"certificateId": c.id, "certificatePem": pem,
                        "privateKey": issued.private_key_pem,
                        "certificateOwnershipToken": shared.tokens.issue(account, &c.id, now)}),
                ),
                Err(e @ sekisho_registry::RegistryError::LimitExceeded(_)) => {
                    rejected(400, "LimitExceeded", e.to_string())
                }
                Err(e) => rejected(500, "InternalError", e.to_string()),
            }
        }
        Request::CreateFromCsr => {
            let Some(csr) = body
                .get("certificateSigningRequest")
                .and_then(Value::as_str)
            else {
                return rejected(
                    400,
                    "InvalidPayload",
                    "certificateSigningRequest is required",
                );
            };
            let pem = match ca.sign_csr(csr, utc) {
                Ok((pem, _)) => pem,
                Err(e) => return rejected(400, "InvalidCertificateSigningRequest", e.to_string()),
            };
            match register(pem) {
                Ok((c, pem)) => (
                    true,
                    json!({"certificateId": c.id, "certificatePem": pem,
                        "certificateOwnershipToken": shared.tokens.issue(account, &c.id, now)}),
                ),
                Err(e @ sekisho_registry::RegistryError::LimitExceeded(_)) => {
                    rejected(400, "LimitExceeded", e.to_string())
                }
                Err(e) => rejected(400, "InvalidCertificate", e.to_string()),
            }
        }
        Request::Register(name) => {
            let token = match body
                .get("certificateOwnershipToken")
                .and_then(Value::as_str)
            {
                Some(t) if !t.is_empty() => t,
                _ => {
                    return rejected(
                        400,
                        "InvalidCertificateOwnershipToken",
                        "Certificate ownership token cannot be empty.",
                    );
                }
            };
            let mut params: BTreeMap<String, String> = BTreeMap::new();
            match body.get("parameters") {
                None | Some(Value::Null) => {}
                Some(Value::Object(p)) => {
                    for (k, v) in p {
                        let Some(v) = v.as_str() else {
                            return rejected(
                                400,
                                "InvalidPayload",
                                "parameters must map strings to strings",
                            );
                        };
                        if k.starts_with("AWS::") {
                            return rejected(
                                400,
                                "InvalidPayload",
                                format!("parameter {k} is reserved"),
                            );
                        }
                        params.insert(k.clone(), v.to_owned());
                    }
                }
                Some(_) => return rejected(400, "InvalidPayload", "parameters must be an object"),
            }
            let template = match shared.registry.template(account, name) {
                Ok(t) if t.enabled && t.kind == TemplateType::FleetProvisioning => t,
                Ok(_) => {
                    return rejected(
                        400,
                        "InvalidRequest",
                        format!("The template {name} is not enabled for fleet provisioning"),
                    );
                }
                Err(_) => {
                    return rejected(
                        404,
                        "ResourceNotFound",
                        format!("The template {name} does not exist"),
                    );
                }
            };
            // Taken while this request provisions (two at once cannot both use it), given back
            // if provisioning fails.
            let Some(held) = shared.tokens.take(account, token, now) else {
                return rejected(
                    400,
                    "InvalidCertificateOwnershipToken",
                    "The certificate ownership token is not valid.",
                );
            };
            let cert = held.certificate.clone();
            // A hook decides first, asynchronously; the token stays held meanwhile.
            if let Some(hook) = template.hook.clone() {
                let pem = match shared.registry.certificate_pem(account, &cert) {
                    Ok(pem) => pem,
                    Err(e) => {
                        // The token stays the device's: a retry may succeed.
                        shared.tokens.give_back(token, held);
                        return match e {
                            sekisho_registry::RegistryError::NotFound(_) => rejected(
                                400,
                                "InvalidCertificateOwnershipToken",
                                "The certificate of this ownership token no longer exists.",
                            ),
                            e => {
                                tracing::error!(error = %e, "provisioning: certificate unreadable");
                                rejected(500, "InternalError", "Internal error")
                            }
                        };
                    }
                };
                let template_arn = shared
                    .registry
                    .arn(account, &format!("provisioningtemplate/{}", template.name));
                *later = Some(Box::new(Pending {
                    account: account.to_owned(),
                    token: token.to_owned(),
                    held,
                    hook,
                    request: sekisho_functions::hook::Request {
                        claim_certificate_id: asker.certificate.unwrap_or_default().to_owned(),
                        certificate_id: cert,
                        certificate_pem: pem,
                        template_arn,
                        client_id: asker.client_id.to_owned(),
                        parameters: params,
                    },
                    template,
                    format,
                }));
                return (false, Value::Null);
            }
            params.insert("AWS::IoT::Certificate::Id".into(), cert);
            provision(shared, account, &template, &params, token, held)
        }
    }
}

/// Just-in-time provisioning: a certificate just registered PENDING_ACTIVATION by a CA whose
/// `registrationConfig` names a template (`templateBody`, or `templateName` of a JITP
/// template) is provisioned with it: the parameters `AWS::IoT::Certificate::*` come from the
/// certificate's subject (each one the template declares must be there) and `::Id` is the
/// certificate id. The connection that caused it is still refused (as AWS drops it); the
/// device's next connection finds its certificate as the template left it. Returns the thing
/// provisioned, if any; `None` when the CA has no template.
pub fn jitp(
    registry: &sekisho_registry::Registry,
    account: &str,
    ca_certificate_id: &str,
    cert: &sekisho_registry::Certificate,
) -> Option<Result<Option<String>, String>> {
    let ca = registry
        .describe_ca_certificate(account, ca_certificate_id)
        .ok()?;
    let config = ca.registration_config?;
    let (body, role) = match (&config.template_body, &config.template_name) {
        (Some(b), _) => match &config.role_arn {
            Some(r) => (b.clone(), r.clone()),
            None => return Some(Err("registrationConfig has no roleArn".into())),
        },
        (None, Some(name)) => match registry.template(account, name) {
            Ok(t) if t.kind == TemplateType::Jitp && t.enabled => {
                (t.body().to_owned(), t.role_arn.clone())
            }
            Ok(t) if t.kind == TemplateType::Jitp => {
                return Some(Err(format!("template {name} is not enabled")));
            }
            Ok(_) => return Some(Err(format!("template {name} is not a JITP template"))),
            Err(e) => return Some(Err(e.to_string())),
        },
        (None, None) => return None,
    };
    let mut params = BTreeMap::new();
    params.insert("AWS::IoT::Certificate::Id".to_string(), cert.id.clone());
    let info = match registry.certificate_info(account, &cert.id) {
        Ok(info) => info,
        Err(e) => return Some(Err(format!("the certificate could not be read: {e}"))),
    };
    {
        for (field, name) in [
            ("CommonName", "CommonName"),
            ("Country", "Country"),
            ("Organization", "Organization"),
            ("OrganizationalUnit", "OrganizationalUnit"),
            ("DistinguishedNameQualifier", "DistinguishedNameQualifier"),
            ("State", "StateName"),
            ("SerialNumber", "SerialNumber"),
        ] {
            if let Some(v) = info.subject.get(field).and_then(|v| v.first()) {
                params.insert(format!("AWS::IoT::Certificate::{name}"), v.clone());
            }
        }
    }
    // Every certificate parameter the template declares must have come from the subject.
    if let Ok(Value::Object(t)) = serde_json::from_str::<Value>(&body)
        && let Some(Value::Object(decl)) = t.get("Parameters")
    {
        for name in decl.keys() {
            if name.starts_with("AWS::IoT::Certificate::") && !params.contains_key(name) {
                return Some(Err(format!(
                    "the certificate's subject has no value for {name}"
                )));
            }
        }
    }
    let plan = match sekisho_registry::template::evaluate(&body, &params) {
        Ok(p) => p,
        Err(m) => return Some(Err(m)),
    };
    Some(
        registry
            .register_thing(account, plan, &cert.id, &role)
            .map(|r| r.thing)
            .map_err(|e| e.to_string()),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_key_pool_fills_ahead_and_never_generates_twice_in_place() {
        // No filler thread, and another request generating in place: throttled at once.
        let pool = Arc::new(KeyPool::default());
        pool.started.store(true, Ordering::Release);
        let busy = pool.in_place.lock().unwrap();
        assert!(pool.take().is_none());
        drop(busy);
        // Free: the request generates its own key.
        assert!(matches!(pool.take(), Some(Ok(_))));

        // With its thread: the first request starts it, and the pool fills to POOL_KEYS.
        let pool = Arc::new(KeyPool::default());
        assert!(matches!(pool.take(), Some(Ok(_))));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while pool.keys.lock().unwrap().len() < POOL_KEYS {
            assert!(
                std::time::Instant::now() < deadline,
                "the pool did not fill"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Taken from the pool even while in-place generation is held by someone else.
        let busy = pool.in_place.lock().unwrap();
        assert!(matches!(pool.take(), Some(Ok(_))));
        drop(busy);
        // Dropped: its thread ends (it holds the pool only between waits).
        let weak = Arc::downgrade(&pool);
        drop(pool);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while weak.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread kept the pool"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
