//! Provisioning templates (fleet provisioning and JITP) and RegisterThing: a template,
//! evaluated by [`crate::template`], applied to the registry.
//!
//! RegisterThing checks everything it can before it changes anything (the certificate is the
//! one the template names, the thing's type and groups and the named policies exist, the
//! override settings allow the change, the policy documents parse), then creates or updates
//! the thing, puts it in its groups, creates and attaches the policies, attaches the
//! certificate to the thing, and only last sets the certificate's status: a run that fails
//! half-way leaves the certificate PENDING_ACTIVATION, which no device can connect with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::Kind;
use crate::template::{Override, Plan};
use crate::*;

/// Versions one template keeps.
pub const MAX_TEMPLATE_VERSIONS: usize = 5;

/// FLEET_PROVISIONING or JITP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TemplateType {
    /// Provisioning by claim (and by trusted user).
    FleetProvisioning,
    /// Just-in-time provisioning on a CA.
    Jitp,
}

impl TemplateType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateType::FleetProvisioning => "FLEET_PROVISIONING",
            TemplateType::Jitp => "JITP",
        }
    }
}

/// One version of a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateVersion {
    /// Its body.
    pub body: String,
    /// When it was made, epoch seconds.
    pub created: f64,
}

/// A provisioning template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisioningTemplate {
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Whether devices may use it.
    pub enabled: bool,
    /// The role IoT provisions with.
    pub role_arn: String,
    /// FLEET_PROVISIONING or JITP.
    pub kind: TemplateType,
    /// Versions by id.
    pub versions: BTreeMap<u32, TemplateVersion>,
    /// The default version.
    pub default_version: u32,
    /// The pre-provisioning hook, as given.
    pub hook: Option<serde_json::Value>,
    /// Times, epoch seconds.
    pub created: f64,
    /// Last change.
    pub modified: f64,
}

impl ProvisioningTemplate {
    /// The default version's body.
    pub fn body(&self) -> &str {
        self.versions
            .get(&self.default_version)
            .map(|v| v.body.as_str())
            .unwrap_or("{}")
    }
}

/// What CreateProvisioningTemplate asks for.
#[derive(Debug, Clone)]
pub struct NewTemplate {
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Body.
    pub body: String,
    /// Enabled.
    pub enabled: bool,
    /// Role.
    pub role_arn: String,
    /// Type.
    pub kind: TemplateType,
    /// Pre-provisioning hook.
    pub hook: Option<serde_json::Value>,
}

/// What UpdateProvisioningTemplate changes.
#[derive(Debug, Clone, Default)]
pub struct TemplateUpdate {
    /// Description.
    pub description: Option<String>,
    /// Enabled.
    pub enabled: Option<bool>,
    /// Default version.
    pub default_version: Option<u32>,
    /// Role.
    pub role_arn: Option<String>,
    /// Hook.
    pub hook: Option<serde_json::Value>,
    /// Remove the hook.
    pub remove_hook: bool,
}

/// What RegisterThing did.
#[derive(Debug, Clone, Default)]
pub struct Registered {
    /// The thing's name, if the template declares one.
    pub thing: Option<String>,
    /// Logical resource name → ARN.
    pub resource_arns: BTreeMap<String, String>,
    /// The template's device configuration.
    pub device_configuration: BTreeMap<String, String>,
}

fn template_not_found(name: &str) -> RegistryError {
    RegistryError::NotFound(format!("The provisioning template {name} does not exist"))
}

fn failure(m: impl Into<String>) -> RegistryError {
    RegistryError::InvalidRequest(m.into())
}

impl Registry {
    /// The function a pre-provisioning hook names (`targetArn`): one of this account's, by
    /// unqualified ARN (or `:$LATEST`), as what runs must be what its resource policy allows.
    pub fn hook_function(&self, account: &str, hook: &serde_json::Value) -> Option<String> {
        let arn = hook.get("targetArn")?.as_str()?;
        let prefix = format!("arn:aws:lambda:{}:{account}:function:", self.region);
        let name = arn.strip_prefix(&prefix)?;
        let name = name.strip_suffix(":$LATEST").unwrap_or(name);
        (!name.is_empty() && !name.contains(':')).then(|| name.to_owned())
    }

    /// A pre-provisioning hook as AWS takes it: `targetArn` (a function of this account, at
    /// most 2,048 characters) and an optional `payloadVersion` (10–32 of `[0-9-]`), nothing
    /// else.
    fn check_hook(&self, account: &str, hook: &serde_json::Value) -> Result<()> {
        let Some(o) = hook.as_object() else {
            return Err(failure("preProvisioningHook must be an object"));
        };
        if let Some(k) = o
            .keys()
            .find(|k| !matches!(k.as_str(), "targetArn" | "payloadVersion"))
        {
            return Err(failure(format!("preProvisioningHook has no member {k}")));
        }
        let arn = o
            .get("targetArn")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        if arn.len() > 2048 || self.hook_function(account, hook).is_none() {
            return Err(failure(
                "preProvisioningHook.targetArn must be the ARN of a function of this account",
            ));
        }
        match o.get("payloadVersion") {
            None => Ok(()),
            Some(serde_json::Value::String(v))
                if (10..=32).contains(&v.len())
                    && v.chars().all(|c| c.is_ascii_digit() || c == '-') =>
            {
                Ok(())
            }
            Some(_) => Err(failure(
                "preProvisioningHook.payloadVersion must be 10 to 32 digits and dashes",
            )),
        }
    }

    /// CreateProvisioningTemplate.
    pub fn create_template(&self, account: &str, t: NewTemplate) -> Result<ProvisioningTemplate> {
        check_name("Template name", &t.name, 36, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
        })?;
        if t.description.as_ref().is_some_and(|d| d.len() > 500) {
            return Err(failure("The description can have at most 500 characters"));
        }
        crate::template::check(&t.body).map_err(failure)?;
        if let Some(h) = &t.hook {
            self.check_hook(account, h)?;
        }
        self.write(account, |a, tx| {
            if a.templates.contains_key(&t.name) {
                return Err(RegistryError::AlreadyExists {
                    message: format!("The provisioning template {} already exists", t.name),
                    resource_id: t.name.clone(),
                    resource_arn: self.arn(account, &format!("provisioningtemplate/{}", t.name)),
                });
            }
            let now = now_secs();
            let tpl = ProvisioningTemplate {
                name: t.name.clone(),
                description: t.description.clone(),
                enabled: t.enabled,
                role_arn: t.role_arn.clone(),
                kind: t.kind,
                versions: BTreeMap::from([(
                    1,
                    TemplateVersion {
                        body: t.body.clone(),
                        created: now,
                    },
                )]),
                default_version: 1,
                hook: t.hook.clone(),
                created: now,
                modified: now,
            };
            tx.put(Kind::ProvisioningTemplate, &tpl.name, &tpl)?;
            a.templates.insert(tpl.name.clone(), tpl.clone());
            Ok(tpl)
        })
    }

    /// DescribeProvisioningTemplate.
    pub fn template(&self, account: &str, name: &str) -> Result<ProvisioningTemplate> {
        self.read(account, |a| {
            a.templates
                .get(name)
                .cloned()
                .ok_or_else(|| template_not_found(name))
        })
    }

    /// ListProvisioningTemplates.
    pub fn list_templates(
        &self,
        account: &str,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<ProvisioningTemplate>> {
        self.read(account, |a| {
            paginate(
                a.templates
                    .values()
                    .map(|t| (t.name.clone(), t.clone()))
                    .collect(),
                marker,
                size,
            )
        })
    }

    /// UpdateProvisioningTemplate.
    pub fn update_template(&self, account: &str, name: &str, u: TemplateUpdate) -> Result<()> {
        if let Some(h) = &u.hook {
            self.check_hook(account, h)?;
        }
        self.write(account, |a, tx| {
            let mut t = a
                .templates
                .get(name)
                .cloned()
                .ok_or_else(|| template_not_found(name))?;
            if let Some(d) = u.description.clone() {
                t.description = Some(d);
            }
            if let Some(e) = u.enabled {
                t.enabled = e;
            }
            if let Some(v) = u.default_version {
                if !t.versions.contains_key(&v) {
                    return Err(RegistryError::NotFound(format!(
                        "Version {v} of the provisioning template {name} does not exist"
                    )));
                }
                t.default_version = v;
            }
            if let Some(r) = u.role_arn.clone() {
                t.role_arn = r;
            }
            if u.remove_hook {
                t.hook = None;
            }
            t.modified = now_secs();
            tx.put(Kind::ProvisioningTemplate, name, &t)?;
            a.templates.insert(name.to_owned(), t);
            Ok(())
        })
    }

    /// DeleteProvisioningTemplate.
    pub fn delete_template(&self, account: &str, name: &str) -> Result<()> {
        self.write(account, |a, tx| {
            if a.templates.remove(name).is_none() {
                return Err(template_not_found(name));
            }
            tx.delete(Kind::ProvisioningTemplate, name);
            Ok(())
        })
    }

    /// CreateProvisioningTemplateVersion: returns the template and the new version's id.
    pub fn create_template_version(
        &self,
        account: &str,
        name: &str,
        body: &str,
        set_default: bool,
    ) -> Result<(ProvisioningTemplate, u32)> {
        crate::template::check(body).map_err(failure)?;
        self.write(account, |a, tx| {
            let mut t = a
                .templates
                .get(name)
                .cloned()
                .ok_or_else(|| template_not_found(name))?;
            if t.versions.len() >= MAX_TEMPLATE_VERSIONS {
                return Err(RegistryError::VersionsLimitExceeded(format!(
                    "The provisioning template {name} has {MAX_TEMPLATE_VERSIONS} versions; delete one first"
                )));
            }
            let id = t.versions.keys().next_back().copied().unwrap_or(0) + 1;
            t.versions.insert(
                id,
                TemplateVersion {
                    body: body.to_owned(),
                    created: now_secs(),
                },
            );
            if set_default {
                t.default_version = id;
            }
            t.modified = now_secs();
            tx.put(Kind::ProvisioningTemplate, name, &t)?;
            a.templates.insert(name.to_owned(), t.clone());
            Ok((t, id))
        })
    }

    /// DeleteProvisioningTemplateVersion (not the default one).
    pub fn delete_template_version(&self, account: &str, name: &str, version: u32) -> Result<()> {
        self.write(account, |a, tx| {
            let mut t = a
                .templates
                .get(name)
                .cloned()
                .ok_or_else(|| template_not_found(name))?;
            if t.default_version == version {
                return Err(RegistryError::DeleteConflict(format!(
                    "Version {version} is the default version of {name}"
                )));
            }
            if t.versions.remove(&version).is_none() {
                return Err(RegistryError::NotFound(format!(
                    "Version {version} of the provisioning template {name} does not exist"
                )));
            }
            tx.put(Kind::ProvisioningTemplate, name, &t)?;
            a.templates.insert(name.to_owned(), t);
            Ok(())
        })
    }

    /// (account, certificate id) of every certificate `keep` accepts, in every account.
    /// Among the certificates fleet provisioning looks after (an index: not every certificate),
    /// those `keep` takes.
    fn certificates_where(&self, keep: impl Fn(&Certificate) -> bool) -> Vec<(String, String)> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        st.accounts
            .iter()
            .flat_map(|(id, a)| {
                a.provisioning_certs
                    .iter()
                    .filter_map(|c| a.certificates.get(c))
                    .filter(|c| keep(c))
                    .map(|c| (id.to_string(), c.id.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Certificates issued for fleet provisioning still waiting for it, created before
    /// `before`.
    pub fn stale_pending_certificates(&self, before: f64) -> Vec<(String, String)> {
        self.certificates_where(|c| c.awaits_provisioning() && c.created < before)
    }

    /// How many certificates issued for fleet provisioning wait for it in `account`.
    pub fn pending_certificates(&self, account: &str) -> usize {
        self.read(account, |a| {
            Ok(a.provisioning_certs
                .iter()
                .filter_map(|c| a.certificates.get(c))
                .filter(|c| c.awaits_provisioning())
                .count())
        })
        .unwrap_or(0)
    }

    /// Provisioning claim certificates past their validity, as (account, certificate id).
    pub fn expired_claims(&self, now: f64) -> Vec<(String, String)> {
        self.certificates_where(|c| c.claim_template.is_some() && c.not_after <= now)
    }

    /// Whether the provisioning role may do all of `checks` (action, resource path): IoT acts
    /// with the role, so what the role's IAM policies do not allow, provisioning may not do.
    fn role_allows(&self, account: &str, role_arn: &str, checks: &[(&str, String)]) -> Result<()> {
        let role = self
            .role_by_arn(account, role_arn)
            .ok_or_else(|| failure(format!("The provisioning role {role_arn} does not exist")))?;
        let ctx = sekisho_policy::MapContext::new();
        if !role.trusts_service("iot.amazonaws.com", &ctx) {
            return Err(failure(format!(
                "The provisioning role {role_arn} does not trust iot.amazonaws.com"
            )));
        }
        let policies = self
            .identity_policies(
                account,
                &IamPrincipal::Role {
                    role: role.name.clone(),
                    session: "iot-provisioning".into(),
                },
            )
            .unwrap_or_default();
        let bound: Vec<_> = policies.iter().map(|p| p.bind(&ctx)).collect();
        for (action, resource) in checks {
            let arn = self.arn(account, resource);
            if !sekisho_policy::decide(bound.iter(), &action.to_ascii_lowercase(), &arn, &ctx)
                .is_allowed()
            {
                return Err(failure(format!(
                    "The provisioning role {role_arn} is not allowed {action} on {arn}"
                )));
            }
        }
        Ok(())
    }

    /// RegisterThing: applies an evaluated template for the certificate `certificate_id`
    /// (PENDING_ACTIVATION), acting with `role_arn`'s permissions.
    pub fn register_thing(
        &self,
        account: &str,
        plan: Plan,
        certificate_id: &str,
        role_arn: &str,
    ) -> Result<Registered> {
        let cert_arn = self.arn(account, &format!("cert/{certificate_id}"));
        let lock = self
            .provisioning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(account.to_owned())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().unwrap_or_else(|p| p.into_inner());
        // Everything checked first.
        let mut checks: Vec<(&str, String)> = Vec::new();
        let existing = self.read(account, |a| {
            let Some(cert) = a.certificates.get(certificate_id) else {
                return Err(failure("The certificate to provision does not exist"));
            };
            // Only a certificate waiting for it: an administrator's INACTIVE or REVOKED stands.
            if cert.status != CertStatus::PendingActivation {
                return Err(failure(format!(
                    "The certificate is {}, not PENDING_ACTIVATION",
                    cert.status.as_str()
                )));
            }
            match &plan.certificate {
                Some(c) if c.id == certificate_id => {}
                _ => {
                    return Err(failure(
                        "The template's certificate must be the one being provisioned (CertificateId: {\"Ref\": \"AWS::IoT::Certificate::Id\"})",
                    ));
                }
            }
            checks.push(("iot:UpdateCertificate", format!("cert/{certificate_id}")));

            let mut existing = None;
            if let Some(t) = &plan.thing {
                if let Some(tt) = &t.thing_type
                    && !a.thing_types.contains_key(tt)
                {
                    return Err(failure(format!("Thing type {tt} does not exist")));
                }
                for g in t.groups.iter().flatten() {
                    if !a.thing_groups.contains_key(g) {
                        return Err(failure(format!("Thing group {g} does not exist")));
                    }
                }
                checks.push(("iot:AttachThingPrincipal", format!("thing/{}", t.name)));
                for g in t.groups.iter().flatten() {
                    checks.push(("iot:AddThingToThingGroup", format!("thinggroup/{g}")));
                }
                if let Some(cur) = a.things.get(t.name.as_str()) {
                    // A thing that already has a certificate is some device's: a claim (shared
                    // by a whole fleet) must not give another one its identity. AWS leaves this
                    // to a pre-provisioning hook; here it is refused, hook or not.
                    if a.thing_principals.get(t.name.as_str()).is_some_and(|p| !p.is_empty()) {
                        return Err(failure(format!(
                            "Thing {} exists and has a certificate already; provisioning does not give it another",
                            t.name
                        )));
                    }
                    checks.push(("iot:UpdateThing", format!("thing/{}", t.name)));
                    let fails = |k: &str| t.overrides.get(k) == Some(&Override::Fail);
                    if (t.attributes.is_some() && fails("AttributePayload"))
                        || (t.thing_type.is_some() && fails("ThingTypeName"))
                        || (t.groups.is_some() && fails("ThingGroups"))
                    {
                        return Err(failure(format!(
                            "ResourceConflictsException: thing {} exists and the template's override settings say FAIL",
                            t.name
                        )));
                    }
                    existing = Some(cur.clone());
                } else {
                    checks.push(("iot:CreateThing", format!("thing/{}", t.name)));
                }
            }
            for p in &plan.policies {
                match &p.document {
                    None if !a.policies.contains_key(p.name.as_str()) => {
                        return Err(failure(format!("Policy {} does not exist", p.name)));
                    }
                    None => {}
                    Some(doc) => {
                        // A document creates its policy: never one that exists already.
                        if a.policies.contains_key(p.name.as_str()) {
                            return Err(failure(format!(
                                "Policy {} exists already; name an existing policy with PolicyName",
                                p.name
                            )));
                        }
                        check_name("Policy name", &p.name, 128, crate::policies::policy_name_char)?;
                        crate::policies::parse_doc(doc)?;
                        checks.push(("iot:CreatePolicy", format!("policy/{}", p.name)));
                    }
                }
                checks.push(("iot:AttachPolicy", format!("cert/{certificate_id}")));
            }
            Ok(existing)
        })?;
        self.role_allows(account, role_arn, &checks)?;
        let mut out = Registered {
            device_configuration: plan.device_configuration.clone(),
            ..Registered::default()
        };
        if let Some(t) = &plan.thing {
            let over = |k: &str| t.overrides.get(k).copied().unwrap_or(Override::DoNothing);
            match &existing {
                None => {
                    self.create_thing(
                        account,
                        &t.name,
                        t.thing_type.as_deref(),
                        t.attributes.clone().unwrap_or_default(),
                    )?;
                }
                Some(_) => {
                    let mut u = ThingUpdate::default();
                    match (over("AttributePayload"), &t.attributes) {
                        (Override::Replace, Some(a)) => u.attributes = Some(a.clone()),
                        (Override::Merge, Some(a)) => {
                            u.attributes = Some(a.clone());
                            u.merge = true;
                        }
                        _ => {}
                    }
                    if over("ThingTypeName") == Override::Replace {
                        u.thing_type = t.thing_type.clone();
                    }
                    if u.attributes.is_some() || u.thing_type.is_some() {
                        self.update_thing(account, &t.name, u)?;
                    }
                }
            }
            if let Some(groups) = &t.groups {
                let add = existing.is_none()
                    || matches!(over("ThingGroups"), Override::Merge | Override::Replace);
                if add {
                    let current: Vec<String> = self
                        .list_groups_for_thing(account, &t.name, None, 100)?
                        .items
                        .into_iter()
                        .map(|(n, _)| n)
                        .collect();
                    let remove: Vec<String> = if over("ThingGroups") == Override::Replace {
                        current
                            .iter()
                            .filter(|g| !groups.contains(g))
                            .cloned()
                            .collect()
                    } else {
                        Vec::new()
                    };
                    self.update_groups_for_thing(account, &t.name, groups, &remove)?;
                }
            }
            out.resource_arns.insert(
                t.logical.clone(),
                self.arn(account, &format!("thing/{}", t.name)),
            );
            out.thing = Some(t.name.clone());
        }
        for p in &plan.policies {
            // Checked absent above: one created since (by an administrator) is not taken over.
            if let Some(doc) = &p.document {
                self.create_policy(account, &p.name, doc)?;
            }
            self.attach_policy(account, &p.name, &cert_arn)?;
            out.resource_arns.insert(
                p.logical.clone(),
                self.arn(account, &format!("policy/{}", p.name)),
            );
        }
        if let Some(t) = &out.thing {
            // Checked without a certificate above; one attached since is some device's. In
            // the attachment's own write: the per-account lock is one node's, and another
            // node may provision the same thing meanwhile.
            self.attach_thing_principal_when(
                account,
                t,
                &cert_arn,
                ThingPrincipalType::NonExclusiveThing,
                |a| {
                    let taken = a
                        .thing_principals
                        .get(t.as_str())
                        .is_some_and(|p| p.iter().any(|(c, _)| **c != *cert_arn));
                    if taken {
                        return Err(failure(format!(
                            "Thing {t} was given a certificate while it was being provisioned"
                        )));
                    }
                    Ok(())
                },
            )?;
        }
        let active = plan.certificate.as_ref().is_some_and(|c| c.active);
        // Only from PENDING_ACTIVATION: an administrator's change meanwhile stands.
        self.set_certificate_status(
            account,
            certificate_id,
            if active {
                CertStatus::Active
            } else {
                CertStatus::Inactive
            },
            Some(CertStatus::PendingActivation),
        )?;
        if let Some(c) = &plan.certificate {
            out.resource_arns.insert(c.logical.clone(), cert_arn);
        }
        Ok(out)
    }
}
