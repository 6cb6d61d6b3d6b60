//! Provisioning templates (service `iot`): Create/Describe/Update/Delete/List and their
//! versions. Routes are declared in `iot::ROUTES`.

use sekisho_registry::{NewTemplate, ProvisioningTemplate, TemplateType, TemplateUpdate};
use serde_json::{Map, Value, json};

use crate::iot::{Out, bool_field, required, seg, str_field};
use crate::{ApiError, ApiState, Call};

/// CreateProvisioningTemplate's resource: the template the body names.
pub(crate) fn create_resources(
    _: &ApiState,
    call: &Call,
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let b = call.json()?;
    Ok(vec![(
        "provisioningtemplate",
        required(&b, "templateName")?.to_owned(),
    )])
}

fn arn(state: &ApiState, account: &str, name: &str) -> String {
    state
        .registry
        .arn(account, &format!("provisioningtemplate/{name}"))
}

/// The role must exist in the caller's account and trust `iot.amazonaws.com`.
pub(crate) fn check_role(state: &ApiState, account: &str, role_arn: &str) -> Result<(), ApiError> {
    let role = state
        .registry
        .role_by_arn(account, role_arn)
        .ok_or_else(|| ApiError::invalid(format!("The role {role_arn} does not exist")))?;
    if !role.trusts_service("iot.amazonaws.com", &sekisho_policy::MapContext::new()) {
        return Err(ApiError::invalid(format!(
            "The role {role_arn} does not trust iot.amazonaws.com"
        )));
    }
    Ok(())
}

fn hook(b: &Map<String, Value>) -> Option<Value> {
    b.get("preProvisioningHook")
        .filter(|v| !v.is_null())
        .cloned()
}

/// CreateProvisioningTemplate.
pub(crate) fn create(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let role_arn = required(&b, "provisioningRoleArn")?.to_owned();
    crate::jobs::pass_role(state, call, &role_arn)?;
    check_role(state, &call.account, &role_arn)?;
    let kind = match str_field(&b, "type")? {
        None | Some("FLEET_PROVISIONING") => TemplateType::FleetProvisioning,
        Some("JITP") => TemplateType::Jitp,
        Some(_) => return Err(ApiError::invalid("type must be FLEET_PROVISIONING or JITP")),
    };
    let t = state.registry.create_template(
        &call.account,
        NewTemplate {
            name: required(&b, "templateName")?.to_owned(),
            description: str_field(&b, "description")?.map(str::to_owned),
            body: required(&b, "templateBody")?.to_owned(),
            enabled: bool_field(&b, "enabled")?,
            role_arn,
            kind,
            hook: hook(&b),
        },
    )?;
    Ok(
        json!({"templateArn": arn(state, &call.account, &t.name), "templateName": t.name,
        "defaultVersionId": t.default_version}),
    )
}

fn describe_json(state: &ApiState, account: &str, t: &ProvisioningTemplate) -> Value {
    let mut v = json!({"templateArn": arn(state, account, &t.name), "templateName": t.name,
        "creationDate": t.created, "lastModifiedDate": t.modified, "defaultVersionId": t.default_version,
        "templateBody": t.body(), "enabled": t.enabled, "provisioningRoleArn": t.role_arn,
        "type": t.kind.as_str()});
    if let Some(d) = &t.description {
        v["description"] = json!(d);
    }
    if let Some(h) = &t.hook {
        v["preProvisioningHook"] = h.clone();
    }
    v
}

/// DescribeProvisioningTemplate.
pub(crate) fn describe(state: &ApiState, call: &Call) -> Out {
    let t = state.registry.template(&call.account, seg(call, 1))?;
    Ok(describe_json(state, &call.account, &t))
}

/// ListProvisioningTemplates.
pub(crate) fn list(state: &ApiState, call: &Call) -> Out {
    let page = state.registry.list_templates(
        &call.account,
        call.q("nextToken"),
        call.q_int("maxResults", 1, 250, 250)? as usize,
    )?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|t| {
            let mut v = json!({"templateArn": arn(state, &call.account, &t.name), "templateName": t.name,
                "creationDate": t.created, "lastModifiedDate": t.modified, "enabled": t.enabled,
                "type": t.kind.as_str()});
            if let Some(d) = &t.description {
                v["description"] = json!(d);
            }
            v
        })
        .collect();
    Ok(json!({"templates": items, "nextToken": page.next}))
}

/// UpdateProvisioningTemplate.
pub(crate) fn update(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let role_arn = str_field(&b, "provisioningRoleArn")?.map(str::to_owned);
    if let Some(r) = &role_arn {
        crate::jobs::pass_role(state, call, r)?;
        check_role(state, &call.account, r)?;
    }
    let default_version = match b.get("defaultVersionId") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| ApiError::invalid("defaultVersionId must be a number"))?,
        ),
    };
    let enabled = match b.get("enabled") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(e)) => Some(*e),
        Some(_) => return Err(ApiError::invalid("enabled must be a boolean")),
    };
    state.registry.update_template(
        &call.account,
        seg(call, 1),
        TemplateUpdate {
            description: str_field(&b, "description")?.map(str::to_owned),
            enabled,
            default_version,
            role_arn,
            hook: hook(&b),
            remove_hook: bool_field(&b, "removePreProvisioningHook")?,
        },
    )?;
    Ok(json!({}))
}

/// DeleteProvisioningTemplate.
pub(crate) fn delete(state: &ApiState, call: &Call) -> Out {
    state
        .registry
        .delete_template(&call.account, seg(call, 1))?;
    Ok(json!({}))
}

fn version_id(call: &Call) -> Result<u32, ApiError> {
    seg(call, 3)
        .parse::<u32>()
        .map_err(|_| ApiError::invalid("versionId must be a number"))
}

/// CreateProvisioningTemplateVersion.
pub(crate) fn create_version(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let (t, id) = state.registry.create_template_version(
        &call.account,
        seg(call, 1),
        required(&b, "templateBody")?,
        call.q_bool("setAsDefault")?,
    )?;
    Ok(
        json!({"templateArn": arn(state, &call.account, &t.name), "templateName": t.name,
        "versionId": id, "isDefaultVersion": t.default_version == id}),
    )
}

/// ListProvisioningTemplateVersions.
pub(crate) fn list_versions(state: &ApiState, call: &Call) -> Out {
    let t = state.registry.template(&call.account, seg(call, 1))?;
    let v: Vec<Value> = t
        .versions
        .iter()
        .map(|(id, v)| json!({"versionId": id, "creationDate": v.created, "isDefaultVersion": *id == t.default_version}))
        .collect();
    Ok(json!({"versions": v}))
}

/// DescribeProvisioningTemplateVersion.
pub(crate) fn describe_version(state: &ApiState, call: &Call) -> Out {
    let t = state.registry.template(&call.account, seg(call, 1))?;
    let id = version_id(call)?;
    let v = t.versions.get(&id).ok_or_else(|| {
        ApiError::new(
            404,
            "ResourceNotFoundException",
            format!(
                "Version {id} of the provisioning template {} does not exist",
                t.name
            ),
        )
    })?;
    Ok(
        json!({"versionId": id, "creationDate": v.created, "templateBody": v.body,
        "isDefaultVersion": id == t.default_version}),
    )
}

/// DeleteProvisioningTemplateVersion.
pub(crate) fn delete_version(state: &ApiState, call: &Call) -> Out {
    state
        .registry
        .delete_template_version(&call.account, seg(call, 1), version_id(call)?)?;
    Ok(json!({}))
}

/// How long a provisioning claim lasts (AWS: five minutes).
const CLAIM_SECONDS: i64 = 300;

/// CreateProvisioningClaim: a temporary certificate that may only provision with this
/// template, for five minutes (not listed among the account's certificates).
pub(crate) fn create_claim(state: &ApiState, call: &Call) -> Out {
    let t = state.registry.template(&call.account, seg(call, 1))?;
    if !t.enabled || t.kind != TemplateType::FleetProvisioning {
        return Err(ApiError::invalid(format!(
            "The template {} is not an enabled fleet provisioning template",
            t.name
        )));
    }
    let now = time::OffsetDateTime::now_utc();
    let until = now + time::Duration::seconds(CLAIM_SECONDS);
    let issued = state
        .device_ca
        .issue_claim(sekisho_pki::KeyKind::Rsa2048, now, until)
        .map_err(|e| ApiError::new(500, "InternalFailureException", e.to_string()))?;
    let (c, pem) = state.registry.add_certificate(
        &call.account,
        sekisho_registry::NewCertificate {
            pem: issued.cert_pem,
            status: sekisho_registry::CertStatus::Active,
            ca_certificate_id: None,
            mode: sekisho_registry::CertMode::Default,
            claim_template: Some(t.name.clone()),
        },
    )?;
    Ok(json!({"certificateId": c.id, "certificatePem": pem,
        "keyPair": {"PublicKey": issued.public_key_pem, "PrivateKey": issued.private_key_pem},
        "expiration": until.unix_timestamp()}))
}
