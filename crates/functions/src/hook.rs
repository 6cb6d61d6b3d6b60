//! Fleet provisioning's pre-provisioning hook: before a template provisions a device by claim
//! (RegisterThing), the template's function decides whether it may, and may override the
//! parameters the device sent.
//!
//! As AWS: the function must be the account's and its resource policy must let
//! `iot.amazonaws.com` invoke it (with `AWS:SourceArn` / `AWS:SourceAccount` conditions naming
//! this template and account, if any); it runs at most 5 seconds; its event is
//! `{claimCertificateId, certificateId, certificatePem, templateArn, clientId, parameters}`;
//! its answer must say `"allowProvisioning": true`, and its `parameterOverrides` (strings) are
//! merged into the parameters. Anything else (an error, a timeout, an answer that is not
//! exactly that) refuses the provisioning.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use sekisho_registry::Registry;
use serde_json::{Value, json};

use crate::invoker::Invoker;
use crate::{HostError, Outcome};

/// How long a pre-provisioning hook may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The most parameters an answer may override, and the longest name and value.
pub const MAX_OVERRIDES: usize = 100;
const MAX_OVERRIDE_LEN: usize = 4096;

/// What the device asked for, as the hook's event carries it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The claim certificate the device connected with.
    pub claim_certificate_id: String,
    /// The certificate being provisioned.
    pub certificate_id: String,
    /// Its PEM.
    pub certificate_pem: String,
    /// The template's ARN.
    pub template_arn: String,
    /// The device's client id.
    pub client_id: String,
    /// The parameters it sent.
    pub parameters: BTreeMap<String, String>,
}

/// The event a hook gets.
pub fn event(r: &Request) -> Value {
    json!({"claimCertificateId": r.claim_certificate_id, "certificateId": r.certificate_id,
        "certificatePem": r.certificate_pem, "templateArn": r.template_arn,
        "clientId": r.client_id, "parameters": r.parameters})
}

/// Checks a hook's answer: the parameters it overrides, if it allows provisioning.
pub fn decision(body: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| "the hook's answer is not JSON".to_string())?;
    if v.get("allowProvisioning") != Some(&Value::Bool(true)) {
        return Err("the pre-provisioning hook did not allow provisioning".into());
    }
    let mut out = BTreeMap::new();
    match v.get("parameterOverrides") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.len() <= MAX_OVERRIDES => {
            for (k, val) in m {
                let Some(s) = val.as_str() else {
                    return Err("parameterOverrides must map names to strings".into());
                };
                if k.starts_with("AWS::") {
                    return Err(format!("the hook may not override {k}"));
                }
                if k.len() > MAX_OVERRIDE_LEN || s.len() > MAX_OVERRIDE_LEN {
                    return Err("a parameter override is too long".into());
                }
                out.insert(k.clone(), s.to_owned());
            }
        }
        Some(_) => {
            return Err(format!(
                "parameterOverrides must map at most {MAX_OVERRIDES} names to strings"
            ));
        }
    }
    Ok(out)
}

/// Runs `account`'s hook `hook` (the template's `preProvisioningHook`) for `request`: the
/// parameters it overrides, or why provisioning is refused.
pub async fn run(
    invoker: &Invoker,
    registry: &Registry,
    account: &str,
    hook: &Value,
    request: &Request,
) -> Result<BTreeMap<String, String>, String> {
    let name = registry
        .hook_function(account, hook)
        .ok_or_else(|| "the hook is not a function of this account".to_string())?;
    let f = registry
        .function(account, &name)
        .map_err(|_| format!("the hook's function {name} does not exist"))?;
    if !crate::authorizer::iot_may_invoke(&f, account, &request.template_arn) {
        return Err("AWS IoT is not allowed to invoke the hook's function".into());
    }
    let payload = Bytes::from(event(request).to_string());
    let (_, outcome) = invoker
        .invoke(account, &f, payload, Some(TIMEOUT))
        .await
        .map_err(|e| match e {
            HostError::TooMany => "the hook's function is throttled".to_string(),
            other => other.to_string(),
        })?;
    match outcome {
        Outcome::Response(body) => decision(&body),
        Outcome::Error(_) => Err("the pre-provisioning hook failed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_explicit_allow_provisions_and_overrides_are_strings_of_the_devices_names() {
        let ok = |v: Value| decision(v.to_string().as_bytes());
        assert_eq!(ok(json!({"allowProvisioning": true})), Ok(BTreeMap::new()));
        assert_eq!(
            ok(json!({"allowProvisioning": true, "parameterOverrides": {"A": "b"}})),
            Ok(BTreeMap::from([("A".to_string(), "b".to_string())]))
        );
        for bad in [
            json!({"allowProvisioning": false}),
            json!({"allowProvisioning": "true"}),
            json!({}),
            json!({"allowProvisioning": true, "parameterOverrides": {"A": 1}}),
            json!({"allowProvisioning": true, "parameterOverrides": ["A"]}),
            json!({"allowProvisioning": true, "parameterOverrides": {"AWS::IoT::Certificate::Id": "x"}}),
            json!({"allowProvisioning": true, "parameterOverrides": {"A": "x".repeat(4097)}}),
        ] {
            assert!(ok(bad.clone()).is_err(), "{bad}");
        }
        assert!(decision(b"not json").is_err());
        let at = |n: usize| {
            let m: serde_json::Map<String, Value> =
                (0..n).map(|i| (format!("p{i}"), json!("v"))).collect();
            ok(json!({"allowProvisioning": true, "parameterOverrides": m}))
        };
        assert!(at(MAX_OVERRIDES).is_ok());
        assert!(at(MAX_OVERRIDES + 1).is_err());
    }
}
