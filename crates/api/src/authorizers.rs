//! Custom authorizers' control plane: Create/Describe/List/Update/Delete, the default
//! authorizer, and TestInvokeAuthorizer (the function run as a device's connection would run
//! it, signature check and resource policy included).

use std::collections::BTreeMap;

use sekisho_functions::authorizer::{self, Failure, Presented};
use sekisho_registry::{Authorizer, AuthorizerUpdate};
use serde_json::{Map, Value, json};

use crate::iot::{Out, seg, str_field};
use crate::{ApiError, ApiState, Call};

/// Public keys an authorizer may have.
const MAX_KEYS: usize = 5;

fn arn(state: &ApiState, account: &str, name: &str) -> String {
    state.registry.authorizer_arn(account, name)
}

/// The function an authorizer names: one of the caller's account (functions run here are an
/// account's own).
fn function_arn(state: &ApiState, call: &Call, arn: &str) -> Result<String, ApiError> {
    let prefix = format!(
        "arn:aws:lambda:{}:{}:function:",
        state.endpoints.region, call.account
    );
    // Unqualified (or `$LATEST`): the function that runs is the one whose policy is checked.
    let name = arn
        .strip_prefix(&prefix)
        .map(|n| n.strip_suffix(":$LATEST").unwrap_or(n));
    match name {
        Some(name)
            if !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')) =>
        {
            Ok(arn.to_owned())
        }
        _ => Err(ApiError::invalid(format!(
            "authorizerFunctionArn {arn} is not a function of this account"
        ))),
    }
}

fn token_key(b: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match str_field(b, "tokenKeyName")? {
        Some(k)
            if k.is_empty()
                || k.len() > 128
                || !k
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-') =>
        {
            Err(ApiError::invalid(
                "tokenKeyName must be 1 to 128 of [a-zA-Z0-9_-]",
            ))
        }
        k => Ok(k.map(str::to_owned)),
    }
}

fn keys(b: &Map<String, Value>) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    let Some(m) = b.get("tokenSigningPublicKeys").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let m = m
        .as_object()
        .ok_or_else(|| ApiError::invalid("tokenSigningPublicKeys must be a map"))?;
    // Each device connection may try every key: a few (for rotation) are all it needs.
    if m.len() > MAX_KEYS {
        return Err(ApiError::invalid(format!(
            "tokenSigningPublicKeys may hold at most {MAX_KEYS} keys"
        )));
    }
    let mut out = BTreeMap::new();
    for (name, pem) in m {
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b':' | b'_' | b'-'));
        let pem = pem.as_str().filter(|p| p.len() <= 5120).ok_or_else(|| {
            ApiError::invalid(format!(
                "The public key {name} must be a PEM of at most 5120 characters"
            ))
        })?;
        if !name_ok {
            return Err(ApiError::invalid(format!(
                "The key name {name} must be of [a-zA-Z0-9:_-]"
            )));
        }
        if !authorizer::public_key_usable(pem) {
            return Err(ApiError::invalid(format!(
                "The public key {name} is not an RSA public key of at least 2048 bits"
            )));
        }
        out.insert(name.clone(), pem.to_owned());
    }
    Ok(Some(out))
}

fn status(b: &Map<String, Value>) -> Result<Option<bool>, ApiError> {
    match str_field(b, "status")? {
        None => Ok(None),
        Some("ACTIVE") => Ok(Some(true)),
        Some("INACTIVE") => Ok(Some(false)),
        Some(s) => Err(ApiError::invalid(format!(
            "status {s:?} is not valid: ACTIVE or INACTIVE"
        ))),
    }
}

fn optional_bool(b: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match b.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(v)) => Ok(Some(*v)),
        Some(_) => Err(ApiError::invalid(format!("{k} must be a boolean"))),
    }
}

fn description(state: &ApiState, account: &str, a: &Authorizer) -> Value {
    json!({
        "authorizerName": a.name,
        "authorizerArn": arn(state, account, &a.name),
        "authorizerFunctionArn": a.function_arn,
        "tokenKeyName": a.token_key_name,
        "tokenSigningPublicKeys": a.signing_keys,
        "status": if a.active { "ACTIVE" } else { "INACTIVE" },
        "creationDate": a.created,
        "lastModifiedDate": a.modified,
        "signingDisabled": a.signing_disabled,
        "enableCachingForHttp": a.caching_for_http,
    })
}

/// CreateAuthorizer.
pub(crate) fn create(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let name = seg(call, 1);
    let f = str_field(&b, "authorizerFunctionArn")?
        .ok_or_else(|| ApiError::invalid("authorizerFunctionArn is required"))?;
    let signing_disabled = optional_bool(&b, "signingDisabled")?.unwrap_or(false);
    let token_key_name = token_key(&b)?;
    let signing_keys = keys(&b)?.unwrap_or_default();
    if !signing_disabled && (token_key_name.is_none() || signing_keys.is_empty()) {
        return Err(ApiError::invalid(
            "An authorizer with signing enabled needs tokenKeyName and tokenSigningPublicKeys",
        ));
    }
    let a = state.registry.create_authorizer(
        &call.account,
        Authorizer {
            name: name.to_owned(),
            function_arn: function_arn(state, call, f)?,
            token_key_name,
            signing_keys,
            active: status(&b)?.unwrap_or(true),
            signing_disabled,
            caching_for_http: optional_bool(&b, "enableCachingForHttp")?.unwrap_or(false),
            created: 0.0,
            modified: 0.0,
        },
    )?;
    Ok(json!({"authorizerName": a.name, "authorizerArn": arn(state, &call.account, &a.name)}))
}

/// DescribeAuthorizer.
pub(crate) fn describe(state: &ApiState, call: &Call) -> Out {
    let a = state.registry.authorizer(&call.account, seg(call, 1))?;
    Ok(json!({"authorizerDescription": description(state, &call.account, &a)}))
}

/// ListAuthorizers.
pub(crate) fn list(state: &ApiState, call: &Call) -> Out {
    let active = match call.q("status") {
        None => None,
        Some("ACTIVE") => Some(true),
        Some("INACTIVE") => Some(false),
        Some(s) => {
            return Err(ApiError::invalid(format!(
                "status {s:?} is not valid: ACTIVE or INACTIVE"
            )));
        }
    };
    let page = state.registry.list_authorizers(
        &call.account,
        active,
        call.q("isAscendingOrder") != Some("false"),
        call.q("marker"),
        call.q_int("pageSize", 1, 250, 250)? as usize,
    )?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|a| json!({"authorizerName": a.name, "authorizerArn": arn(state, &call.account, &a.name)}))
        .collect();
    let mut out = json!({"authorizers": items});
    if let Some(n) = page.next {
        out["nextMarker"] = json!(n);
    }
    Ok(out)
}

/// UpdateAuthorizer.
pub(crate) fn update(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let function_arn = match str_field(&b, "authorizerFunctionArn")? {
        Some(f) => Some(function_arn(state, call, f)?),
        None => None,
    };
    let a = state.registry.update_authorizer(
        &call.account,
        seg(call, 1),
        AuthorizerUpdate {
            function_arn,
            token_key_name: token_key(&b)?,
            signing_keys: keys(&b)?,
            active: status(&b)?,
            caching_for_http: optional_bool(&b, "enableCachingForHttp")?,
        },
    )?;
    Ok(json!({"authorizerName": a.name, "authorizerArn": arn(state, &call.account, &a.name)}))
}

/// DeleteAuthorizer.
pub(crate) fn delete(state: &ApiState, call: &Call) -> Out {
    state
        .registry
        .delete_authorizer(&call.account, seg(call, 1))?;
    Ok(json!({}))
}

/// SetDefaultAuthorizer's resource: the authorizer its body names.
pub(crate) fn default_resources(
    _: &ApiState,
    call: &Call,
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let b = call.json()?;
    let name = str_field(&b, "authorizerName")?
        .ok_or_else(|| ApiError::invalid("authorizerName is required"))?;
    Ok(vec![("authorizer", name.to_owned())])
}

/// SetDefaultAuthorizer.
pub(crate) fn set_default(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let name = str_field(&b, "authorizerName")?
        .ok_or_else(|| ApiError::invalid("authorizerName is required"))?;
    let a = state.registry.set_default_authorizer(&call.account, name)?;
    Ok(json!({"authorizerName": a.name, "authorizerArn": arn(state, &call.account, &a.name)}))
}

/// DescribeDefaultAuthorizer.
pub(crate) fn describe_default(state: &ApiState, call: &Call) -> Out {
    let a = state.registry.default_authorizer(&call.account)?;
    Ok(json!({"authorizerDescription": description(state, &call.account, &a)}))
}

/// ClearDefaultAuthorizer.
pub(crate) fn clear_default(state: &ApiState, call: &Call) -> Out {
    state.registry.clear_default_authorizer(&call.account)?;
    Ok(json!({}))
}

fn presented_too_large(b: &Map<String, Value>) -> bool {
    let len = |v: Option<&Value>| v.and_then(Value::as_str).map_or(0, str::len);
    len(b.get("tokenSignature")) > 2560
        || len(b.get("httpContext").and_then(|h| h.get("queryString"))) > 4096
        || len(b.get("tlsContext").and_then(|t| t.get("serverName"))) > 253
}

/// TestInvokeAuthorizer: what the authorizer decides for these credentials.
pub(crate) fn test_invoke(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let a = state.registry.authorizer(&call.account, seg(call, 1))?;
    let Some(invoker) = state.functions.clone() else {
        return Err(ApiError::new(
            500,
            "InternalFailureException",
            "Functions are not served here",
        ));
    };
    let obj = |k: &str| b.get(k).and_then(Value::as_object).cloned();
    let text =
        |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let token = str_field(&b, "token")?.map(str::to_owned);
    if token.as_ref().is_some_and(|t| t.len() > 6144) {
        return Err(ApiError::invalid("token is longer than 6144 characters"));
    }
    let http = obj("httpContext").map(|h| {
        let headers = h
            .get("headers")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        (headers, text(&h, "queryString").unwrap_or_default())
    });
    let mqtt = match obj("mqttContext") {
        Some(m) => {
            let password = match text(&m, "password") {
                Some(p) => {
                    use base64::Engine as _;
                    Some(
                        base64::engine::general_purpose::STANDARD
                            .decode(p)
                            .map_err(|_| ApiError::invalid("mqttContext.password is not base64"))?,
                    )
                }
                None => None,
            };
            Some((text(&m, "username"), password, text(&m, "clientId")))
        }
        None => None,
    };
    if presented_too_large(&b) {
        return Err(ApiError::invalid(
            "queryString (4096), tlsContext.serverName (253) or tokenSignature (2560) is too long",
        ));
    }
    let presented = Presented {
        token,
        signature: str_field(&b, "tokenSignature")?.map(str::to_owned),
        http,
        mqtt,
        server_name: obj("tlsContext").and_then(|t| text(&t, "serverName")),
        connection_id: None,
    };
    let registry = state.registry.clone();
    let account = call.account.clone();
    let decided = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(authorizer::authenticate(
            &invoker, &registry, &account, &a, &presented,
        ))
    });
    match decided {
        Ok(d) => Ok(json!({
            "isAuthenticated": d.authenticated,
            "principalId": d.principal_id,
            "policyDocuments": d.policies,
            "refreshAfterInSeconds": d.refresh_after,
            "disconnectAfterInSeconds": d.disconnect_after,
        })),
        Err(Failure::InvalidResponse(m)) => Err(ApiError::new(400, "InvalidResponseException", m)),
        Err(Failure::Throttled) => Err(ApiError::new(400, "ThrottlingException", "Rate exceeded")),
        Err(other) => Err(ApiError::invalid(other.to_string())),
    }
}
