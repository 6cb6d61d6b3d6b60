//! Custom authentication: a device's token (signed, when the authorizer says so) goes to the
//! authorizer's function, which answers who the device is and which policies it has.
//!
//! The order of checks is AWS's: the authorizer must be ACTIVE; with signing enabled the
//! token's signature must verify with one of the authorizer's public keys (RSA, SHA-256) or
//! the function is never invoked; the function's resource policy must let
//! `iot.amazonaws.com` invoke it for this authorizer; the function runs at most 5 seconds;
//! its answer must be well formed (else the authentication fails, as an invalid response).

use std::time::Duration;

use bytes::Bytes;
use sekisho_registry::{Authorizer, Function, Registry};
use serde_json::{Map, Value, json};

use crate::invoker::Invoker;
use crate::{HostError, Outcome};

/// How long a custom authorizer's function may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest token (AWS's bound).
pub const MAX_TOKEN: usize = 6144;
/// The longest signature, base64 (AWS's bound).
pub const MAX_SIGNATURE: usize = 2560;

/// What a device presented, as the function's event carries it.
#[derive(Debug, Clone, Default)]
pub struct Presented {
    /// The token.
    pub token: Option<String>,
    /// The token's signature, base64.
    pub signature: Option<String>,
    /// HTTP headers (names as sent) and the query string (`?a=b`), for HTTP and WebSocket.
    pub http: Option<(Vec<(String, String)>, String)>,
    /// MQTT: username, password, client id.
    pub mqtt: Option<MqttCredentials>,
    /// The TLS server name.
    pub server_name: Option<String>,
    /// The connection's id in the event (`connectionMetadata.id`): one per connection, the
    /// same at each refresh; a new one if `None`.
    pub connection_id: Option<String>,
}

/// What an MQTT CONNECT carried: username, password, client id.
pub type MqttCredentials = (Option<String>, Option<Vec<u8>>, Option<String>);

/// What the function decided, once checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Whether the device is authenticated.
    pub authenticated: bool,
    /// Who it is.
    pub principal_id: String,
    /// Its IoT policies (JSON documents).
    pub policies: Vec<String>,
    /// When to ask the function again, seconds.
    pub refresh_after: u32,
    /// When to end the connection, seconds.
    pub disconnect_after: u32,
}

/// Why custom authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The authorizer is INACTIVE.
    #[error("The authorizer is not active")]
    Inactive,
    /// No token, or its signature does not verify (the function was not invoked).
    #[error("The token's signature does not verify")]
    Signature,
    /// The function is not this account's, or its resource policy does not let IoT invoke it.
    #[error("AWS IoT is not allowed to invoke the authorizer's function")]
    NotPermitted,
    /// The function failed, timed out or answered something else than a decision.
    #[error("{0}")]
    InvalidResponse(String),
    /// Every instance of the function is busy.
    #[error("The authorizer's function is throttled")]
    Throttled,
}

fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()
}

/// Whether `signature` (base64) is an RSA-SHA256 signature of `token` by one of `keys`
/// (public keys, PEM, 2048 to 8192 bits).
pub fn signature_verifies(keys: &[&str], token: &str, signature: &str) -> bool {
    use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
    use base64::Engine as _;
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    keys.iter().filter_map(|k| pem_der(k)).any(|der| {
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
            .verify(token.as_bytes(), &sig)
            .is_ok()
    })
}

/// Whether a public key (PEM) is an RSA key AWS would take (2048 bits at least).
pub fn public_key_usable(pem: &str) -> bool {
    let Some(der) = pem_der(pem) else {
        return false;
    };
    aws_lc_rs::rsa::PublicEncryptingKey::from_der(&der)
        .map(|k| k.key_size_bits() >= 2048)
        .unwrap_or(false)
}

fn glob(pattern: &str, s: &str) -> bool {
    sekisho_policy::Pattern::new(pattern).matches(s)
}

/// Whether the function's resource policy lets `iot.amazonaws.com` invoke it for this
/// authorizer (an Allow whose principal is that service or `*`, whose action covers
/// `lambda:InvokeFunction`, and whose `AWS:SourceArn` / `AWS:SourceAccount` conditions, if
/// any, name this authorizer and account).
pub fn iot_may_invoke(f: &Function, account: &str, authorizer_arn: &str) -> bool {
    f.policy.iter().any(|s| {
        let allow = s.get("Effect").and_then(Value::as_str) == Some("Allow");
        let principal = match s.get("Principal") {
            Some(Value::String(p)) => p == "*",
            Some(Value::Object(m)) => {
                m.get("Service").and_then(Value::as_str) == Some("iot.amazonaws.com")
                    || m.get("AWS").and_then(Value::as_str) == Some("*")
            }
            _ => false,
        };
        let action = s
            .get("Action")
            .and_then(Value::as_str)
            .is_some_and(|a| matches!(a, "lambda:InvokeFunction" | "lambda:*" | "*"));
        let conditions = match s.get("Condition") {
            None => true,
            Some(Value::Object(c)) => c.iter().all(|(op, kv)| {
                let Some(kv) = kv.as_object() else {
                    return false;
                };
                kv.iter().all(|(k, v)| {
                    let v = v.as_str().unwrap_or_default();
                    match (op.as_str(), k.as_str()) {
                        ("ArnLike", "AWS:SourceArn") => glob(v, authorizer_arn),
                        ("StringEquals", "AWS:SourceAccount") => v == account,
                        _ => false,
                    }
                })
            }),
            Some(_) => false,
        };
        allow && principal && action && conditions
    })
}

/// The function's event.
pub fn event(p: &Presented, signature_verified: bool, connection_id: &str) -> Value {
    let mut protocols = vec!["tls"];
    let mut data = Map::new();
    data.insert("tls".into(), json!({"serverName": p.server_name}));
    if let Some((headers, query)) = &p.http {
        protocols.push("http");
        let headers: Map<String, Value> =
            headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        data.insert(
            "http".into(),
            json!({"headers": headers, "queryString": query}),
        );
    }
    if let Some((username, password, client_id)) = &p.mqtt {
        protocols.push("mqtt");
        let mut m = Map::new();
        if let Some(u) = username {
            m.insert("username".into(), json!(u));
        }
        if let Some(pw) = password {
            use base64::Engine as _;
            m.insert(
                "password".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(pw)),
            );
        }
        if let Some(c) = client_id {
            m.insert("clientId".into(), json!(c));
        }
        data.insert("mqtt".into(), Value::Object(m));
    }
    let mut e = json!({
        "signatureVerified": signature_verified,
        "protocols": protocols,
        "protocolData": data,
        "connectionMetadata": {"id": connection_id},
    });
    if let Some(t) = &p.token {
        e["token"] = json!(t);
    }
    e
}

/// AWS's least `refreshAfterInSeconds` and `disconnectAfterInSeconds`.
pub const MIN_SECONDS: u32 = 300;

/// Checks the function's answer (its times at least `min_seconds`, AWS: [`MIN_SECONDS`]).
pub fn decision(body: &[u8], min_seconds: u32) -> Result<Decision, Failure> {
    let bad =
        |m: &str| Failure::InvalidResponse(format!("Invalid response from the authorizer: {m}"));
    let v: Value = serde_json::from_slice(body).map_err(|_| bad("not JSON"))?;
    let o = v.as_object().ok_or_else(|| bad("not an object"))?;
    let authenticated = o
        .get("isAuthenticated")
        .and_then(Value::as_bool)
        .ok_or_else(|| bad("isAuthenticated must be a boolean"))?;
    let principal_id = o
        .get("principalId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if authenticated
        && (principal_id.is_empty()
            || principal_id.len() > 128
            || !principal_id.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        return Err(bad("principalId must be 1 to 128 letters and digits"));
    }
    let seconds = |k: &str| -> Result<u32, Failure> {
        match o.get(k).filter(|v| !v.is_null()) {
            None if !authenticated => Ok(0),
            None => Err(bad(&format!("{k} is required"))),
            Some(v) => v
                .as_u64()
                .filter(|n| (u64::from(min_seconds)..=86_400).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| bad(&format!("{k} must be from {min_seconds} to 86400"))),
        }
    };
    let refresh_after = seconds("refreshAfterInSeconds")?;
    let disconnect_after = seconds("disconnectAfterInSeconds")?;
    let docs = match o.get("policyDocuments") {
        None | Some(Value::Null) if !authenticated => Vec::new(),
        Some(Value::Array(a)) if a.len() <= 10 => a.clone(),
        _ => return Err(bad("policyDocuments must list at most 10 documents")),
    };
    let mut policies = Vec::with_capacity(docs.len());
    for d in docs {
        let text = match d {
            Value::String(s) => s,
            Value::Object(_) => d.to_string(),
            _ => return Err(bad("a policy document must be an object or a string")),
        };
        if sekisho_policy::non_whitespace_len(&text) > 2048 {
            return Err(bad("a policy document is longer than 2048 characters"));
        }
        sekisho_policy::Policy::parse(&text, sekisho_policy::Dialect::Iot)
            .map_err(|e| bad(&format!("a policy document is not valid: {e}")))?;
        // Kept compact: white space does not count against the bound, so it is not kept.
        let compact = serde_json::from_str::<Value>(&text)
            .map(|v| v.to_string())
            .unwrap_or(text);
        policies.push(compact);
    }
    Ok(Decision {
        authenticated,
        principal_id,
        policies,
        refresh_after,
        disconnect_after,
    })
}

/// Runs custom authentication for `account` with `authorizer`.
pub async fn authenticate(
    invoker: &Invoker,
    registry: &Registry,
    account: &str,
    authorizer: &Authorizer,
    presented: &Presented,
) -> Result<Decision, Failure> {
    if !authorizer.active {
        return Err(Failure::Inactive);
    }
    // AWS's bounds, before any work is spent on what a device sent.
    if presented
        .token
        .as_ref()
        .is_some_and(|t| t.len() > MAX_TOKEN)
        || presented
            .signature
            .as_ref()
            .is_some_and(|s| s.len() > MAX_SIGNATURE)
    {
        return Err(Failure::Signature);
    }
    let verified = if authorizer.signing_disabled {
        false
    } else {
        let keys: Vec<&str> = authorizer
            .signing_keys
            .values()
            .map(String::as_str)
            .collect();
        match (&presented.token, &presented.signature) {
            (Some(t), Some(s)) if signature_verifies(&keys, t, s) => true,
            _ => return Err(Failure::Signature),
        }
    };
    let arn = registry.authorizer_arn(account, &authorizer.name);
    let prefix = format!("arn:aws:lambda:{}:{account}:function:", registry.region());
    let name = authorizer
        .function_arn
        .strip_prefix(&prefix)
        .map(|n| n.strip_suffix(":$LATEST").unwrap_or(n))
        .filter(|n| !n.contains(':'))
        .ok_or(Failure::NotPermitted)?;
    let f = registry
        .function(account, name)
        .map_err(|_| Failure::NotPermitted)?;
    if !iot_may_invoke(&f, account, &arn) {
        return Err(Failure::NotPermitted);
    }
    let connection_id = presented
        .connection_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let payload = event(presented, verified, &connection_id);
    let (_, outcome) = invoker
        .invoke(account, &f, Bytes::from(payload.to_string()), Some(TIMEOUT))
        .await
        .map_err(|e| match e {
            HostError::TooMany => Failure::Throttled,
            other => Failure::InvalidResponse(other.to_string()),
        })?;
    match outcome {
        Outcome::Response(body) => decision(&body, invoker.host.authorizer_min_seconds()),
        Outcome::Error(body) => Err(Failure::InvalidResponse(format!(
            "The authorizer's function failed: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(512)
                .collect::<String>()
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_at_their_bounds() {
        let ok = |v: Value| decision(v.to_string().as_bytes(), MIN_SECONDS);
        let doc = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]});
        let base = json!({"isAuthenticated": true, "principalId": "dev1", "refreshAfterInSeconds": 300,
            "disconnectAfterInSeconds": 86400, "policyDocuments": [doc.clone()]});
        let d = ok(base.clone()).unwrap();
        assert_eq!(
            (
                d.authenticated,
                d.principal_id.as_str(),
                d.refresh_after,
                d.disconnect_after,
                d.policies.len()
            ),
            (true, "dev1", 300, 86400, 1)
        );
        // Documents as strings too (as TestInvokeAuthorizer shows them).
        let mut s = base.clone();
        s["policyDocuments"] = json!([doc.to_string()]);
        assert!(ok(s).is_ok());
        for (k, v) in [
            ("refreshAfterInSeconds", json!(299)),
            ("refreshAfterInSeconds", json!(86401)),
            ("disconnectAfterInSeconds", json!(299)),
            ("principalId", json!("dev-1")),
            ("principalId", json!("a".repeat(129))),
            ("isAuthenticated", json!("yes")),
            ("policyDocuments", json!(vec![doc.clone(); 11])),
            ("policyDocuments", json!([{"Version": "x"}])),
        ] {
            let mut b = base.clone();
            b[k] = v;
            assert!(ok(b).is_err(), "{k}");
        }
        let mut b = base.clone();
        b["principalId"] = json!("a".repeat(128));
        b["policyDocuments"] = json!(vec![doc.clone(); 10]);
        assert!(ok(b).is_ok(), "at N");
        assert!(!ok(json!({"isAuthenticated": false})).unwrap().authenticated);
        assert!(decision(b"not json", MIN_SECONDS).is_err());
    }

    #[test]
    fn the_resource_policy_must_name_iot_and_this_authorizer() {
        let mut f = Function {
            name: "f".into(),
            runtime: "python3.11".into(),
            handler: "a.h".into(),
            role: String::new(),
            description: String::new(),
            timeout: 3,
            memory: 128,
            env: Default::default(),
            code_sha: String::new(),
            code_size: 0,
            last_modified: String::new(),
            revision: String::new(),
            policy: vec![],
            policy_revision: String::new(),
        };
        let arn = "arn:aws:iot:us-east-1:123456789012:authorizer/a";
        assert!(!iot_may_invoke(&f, "123456789012", arn));
        f.policy = vec![
            json!({"Sid": "s", "Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"},
            "Action": "lambda:InvokeFunction", "Resource": "x",
            "Condition": {"ArnLike": {"AWS:SourceArn": "arn:aws:iot:us-east-1:123456789012:authorizer/*"}}}),
        ];
        assert!(iot_may_invoke(&f, "123456789012", arn));
        assert!(!iot_may_invoke(
            &f,
            "123456789012",
            "arn:aws:iot:us-east-1:999999999999:authorizer/a"
        ));
        f.policy[0]["Principal"] = json!({"Service": "s3.amazonaws.com"});
        assert!(!iot_may_invoke(&f, "123456789012", arn));
    }
}
