//! AWS IoT control-plane operations (botocore model `iot/2015-05-28`).

use std::collections::BTreeMap;

use hyper::Method;
use sekisho_auth::authz::ConnContext;
use sekisho_pki::KeyKind;
use sekisho_policy::{Decision, explain};
use sekisho_registry::*;
use serde_json::{Map, Value, json};

use crate::{ApiError, ApiState, Call};

pub(crate) type Out = Result<Value, ApiError>;

pub(crate) fn str_field<'a>(
    m: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(format!("{name} must be a string"))),
    }
}

pub(crate) fn required<'a>(m: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    str_field(m, name)?.ok_or_else(|| ApiError::invalid(format!("{name} is required")))
}

pub(crate) fn bool_field(m: &Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(format!("{name} must be a boolean"))),
    }
}

fn attributes(
    m: &Map<String, Value>,
) -> Result<(Option<BTreeMap<String, String>>, bool), ApiError> {
    let Some(p) = m.get("attributePayload") else {
        return Ok((None, false));
    };
    let Value::Object(p) = p else {
        return Err(ApiError::invalid("attributePayload must be an object"));
    };
    let merge = bool_field(p, "merge")?;
    let attrs = match p.get("attributes") {
        None | Some(Value::Null) => None,
        Some(Value::Object(a)) => Some(
            a.iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(ApiError::invalid(format!("attribute {k} must be a string"))),
                })
                .collect::<Result<BTreeMap<_, _>, _>>()?,
        ),
        Some(_) => return Err(ApiError::invalid("attributes must be an object")),
    };
    Ok((attrs, merge))
}

pub(crate) fn seg(call: &Call, i: usize) -> &str {
    call.segments.get(i).map(String::as_str).unwrap_or("")
}

/// The `(kind, name)` resources a request's body names.
pub(crate) type BodyResources =
    fn(&ApiState, &Call) -> Result<Vec<(&'static str, String)>, ApiError>;

/// What a thing group's properties say: description, attributes, whether to merge them.
type GroupProperties = (Option<String>, Option<BTreeMap<String, String>>, bool);

/// What a route's IAM resource is (AWS's service authorization reference: list and
/// account-wide operations take `*`).
#[derive(Clone, Copy)]
pub(crate) enum Res {
    /// `*`.
    Any,
    /// `arn:aws:iot:<region>:<account>:<kind>/<path label at this index>`.
    Label(&'static str, usize),
    /// Resources named in the body: `(kind, name)` pairs from the same function the
    /// handler reads them with, each authorized.
    Body(BodyResources),
}

type Run = fn(&ApiState, &Call) -> Out;

/// One control-plane operation, declared once: its route, the IAM action it is
/// (`iot:<operation>`), the resource that action is authorized on (from the same path label
/// the handler acts on), and the handler.
pub(crate) struct Route {
    method: Method,
    path: &'static [&'static str],
    /// The operation name, as botocore names it (and the IAM action's).
    pub(crate) operation: &'static str,
    pub(crate) resource: Res,
    run: Run,
}

/// A path label in [`Route::path`].
const L: &str = "{}";

macro_rules! route {
    ($m:ident, [$($p:expr),*], $op:literal, $res:expr, $run:expr) => {
        Route {
            method: Method::$m,
            path: &[$($p),*],
            operation: $op,
            resource: $res,
            run: $run,
        }
    };
}

const fn label(kind: &'static str) -> Res {
    Res::Label(kind, 1)
}

const ANY: Res = Res::Any;

/// Every IoT control-plane operation served.
static ROUTES: &[Route] = &[
    route!(
        POST,
        ["things", L],
        "CreateThing",
        label("thing"),
        create_thing
    ),
    route!(
        GET,
        ["things", L],
        "DescribeThing",
        label("thing"),
        describe_thing
    ),
    route!(
        PATCH,
        ["things", L],
        "UpdateThing",
        label("thing"),
        update_thing
    ),
    route!(
        DELETE,
        ["things", L],
        "DeleteThing",
        label("thing"),
        delete_thing
    ),
    route!(GET, ["things"], "ListThings", ANY, list_things),
    route!(
        PUT,
        ["things", L, "principals"],
        "AttachThingPrincipal",
        label("thing"),
        attach_thing_principal
    ),
    route!(
        DELETE,
        ["things", L, "principals"],
        "DetachThingPrincipal",
        label("thing"),
        detach_thing_principal
    ),
    route!(
        GET,
        ["things", L, "principals"],
        "ListThingPrincipals",
        label("thing"),
        |s, c| list_thing_principals(s, c, false)
    ),
    route!(
        GET,
        ["things", L, "principals-v2"],
        "ListThingPrincipals",
        label("thing"),
        |s, c| list_thing_principals(s, c, true)
    ),
    route!(
        GET,
        ["principals", "things"],
        "ListPrincipalThings",
        ANY,
        |s, c| list_principal_things(s, c, false)
    ),
    route!(
        GET,
        ["principals", "things-v2"],
        "ListPrincipalThings",
        ANY,
        |s, c| list_principal_things(s, c, true)
    ),
    route!(
        POST,
        ["thing-types", L],
        "CreateThingType",
        label("thingtype"),
        create_thing_type
    ),
    route!(
        GET,
        ["thing-types", L],
        "DescribeThingType",
        label("thingtype"),
        describe_thing_type
    ),
    route!(
        POST,
        ["thing-types", L, "deprecate"],
        "DeprecateThingType",
        label("thingtype"),
        deprecate_thing_type
    ),
    route!(
        DELETE,
        ["thing-types", L],
        "DeleteThingType",
        label("thingtype"),
        |s, c| {
            s.registry.delete_thing_type(&c.account, seg(c, 1))?;
            Ok(json!({}))
        }
    ),
    route!(
        GET,
        ["thing-types"],
        "ListThingTypes",
        ANY,
        list_thing_types
    ),
    route!(
        POST,
        ["thing-groups", L],
        "CreateThingGroup",
        // The parent too: what a group's parent has (policies, jobs) reaches its things.
        Res::Body(|_, c| {
            let mut v = vec![("thinggroup", seg(c, 1).to_owned())];
            if let Some(p) = str_field(&c.json()?, "parentGroupName")? {
                v.push(("thinggroup", p.to_owned()));
            }
            Ok(v)
        }),
        create_thing_group
    ),
    route!(
        GET,
        ["thing-groups", L],
        "DescribeThingGroup",
        label("thinggroup"),
        describe_thing_group
    ),
    route!(
        PATCH,
        ["thing-groups", L],
        "UpdateThingGroup",
        label("thinggroup"),
        update_thing_group
    ),
    route!(
        DELETE,
        ["thing-groups", L],
        "DeleteThingGroup",
        label("thinggroup"),
        |s, c| {
            let v = c
                .q("expectedVersion")
                .map(|v| v.parse::<i64>())
                .transpose()
                .map_err(|_| ApiError::invalid("expectedVersion must be a number"))?;
            s.registry.delete_thing_group(&c.account, seg(c, 1), v)?;
            Ok(json!({}))
        }
    ),
    route!(GET, ["thing-groups"], "ListThingGroups", ANY, |s, c| {
        let page = s.registry.list_thing_groups(
            &c.account,
            c.q("parentGroup"),
            c.q("namePrefixFilter"),
            c.q_bool("recursive")?,
            c.q("nextToken"),
            c.q_int("maxResults", 1, 250, 250)? as usize,
        )?;
        let groups: Vec<Value> = page
            .items
            .iter()
            .map(|(n, a)| json!({"groupName": n, "groupArn": a}))
            .collect();
        Ok(json!({"thingGroups": groups, "nextToken": page.next}))
    }),
    route!(
        PUT,
        ["thing-groups", "addThingToThingGroup"],
        "AddThingToThingGroup",
        Res::Body(|s, c| membership(s, c).map(|(g, t)| vec![("thinggroup", g), ("thing", t)])),
        |s, c| {
            let (g, t) = membership(s, c)?;
            s.registry.add_thing_to_group(&c.account, &g, &t)?;
            Ok(json!({}))
        }
    ),
    route!(
        PUT,
        ["thing-groups", "removeThingFromThingGroup"],
        "RemoveThingFromThingGroup",
        Res::Body(|s, c| membership(s, c).map(|(g, t)| vec![("thinggroup", g), ("thing", t)])),
        |s, c| {
            let (g, t) = membership(s, c)?;
            s.registry.remove_thing_from_group(&c.account, &g, &t)?;
            Ok(json!({}))
        }
    ),
    route!(
        PUT,
        ["thing-groups", "updateThingGroupsForThing"],
        "UpdateThingGroupsForThing",
        Res::Body(|_, c| {
            let (thing, add, remove) = groups_for_thing(c)?;
            let mut v = vec![("thing", thing)];
            v.extend(add.into_iter().chain(remove).map(|g| ("thinggroup", g)));
            Ok(v)
        }),
        |s, c| {
            let (thing, add, remove) = groups_for_thing(c)?;
            s.registry
                .update_groups_for_thing(&c.account, &thing, &add, &remove)?;
            Ok(json!({}))
        }
    ),
    route!(
        GET,
        ["thing-groups", L, "things"],
        "ListThingsInThingGroup",
        label("thinggroup"),
        |s, c| {
            let page = s.registry.list_things_in_group(
                &c.account,
                seg(c, 1),
                c.q_bool("recursive")?,
                c.q("nextToken"),
                c.q_int("maxResults", 1, 250, 250)? as usize,
            )?;
            Ok(json!({"things": page.items, "nextToken": page.next}))
        }
    ),
    route!(
        GET,
        ["things", L, "thing-groups"],
        "ListThingGroupsForThing",
        label("thing"),
        |s, c| {
            let page = s.registry.list_groups_for_thing(
                &c.account,
                seg(c, 1),
                c.q("nextToken"),
                c.q_int("maxResults", 1, 250, 250)? as usize,
            )?;
            let groups: Vec<Value> = page
                .items
                .iter()
                .map(|(n, a)| json!({"groupName": n, "groupArn": a}))
                .collect();
            Ok(json!({"thingGroups": groups, "nextToken": page.next}))
        }
    ),
    route!(
        PUT,
        ["jobs", L],
        "CreateJob",
        Res::Body(crate::jobs::create_resources),
        crate::jobs::create_job
    ),
    route!(
        GET,
        ["jobs", L],
        "DescribeJob",
        label("job"),
        crate::jobs::describe_job
    ),
    route!(
        PATCH,
        ["jobs", L],
        "UpdateJob",
        label("job"),
        crate::jobs::update_job
    ),
    route!(
        PUT,
        ["jobs", L, "cancel"],
        "CancelJob",
        label("job"),
        crate::jobs::cancel_job
    ),
    route!(
        DELETE,
        ["jobs", L],
        "DeleteJob",
        label("job"),
        crate::jobs::delete_job
    ),
    route!(GET, ["jobs"], "ListJobs", ANY, crate::jobs::list_jobs),
    route!(
        POST,
        ["authorizer", L],
        "CreateAuthorizer",
        label("authorizer"),
        crate::authorizers::create
    ),
    route!(
        GET,
        ["authorizer", L],
        "DescribeAuthorizer",
        label("authorizer"),
        crate::authorizers::describe
    ),
    route!(
        PUT,
        ["authorizer", L],
        "UpdateAuthorizer",
        label("authorizer"),
        crate::authorizers::update
    ),
    route!(
        DELETE,
        ["authorizer", L],
        "DeleteAuthorizer",
        label("authorizer"),
        crate::authorizers::delete
    ),
    route!(
        POST,
        ["authorizer", L, "test"],
        "TestInvokeAuthorizer",
        label("authorizer"),
        crate::authorizers::test_invoke
    ),
    // (`/authorizers/`: the model's route ends with a slash.)
    route!(
        GET,
        ["authorizers", ""],
        "ListAuthorizers",
        ANY,
        crate::authorizers::list
    ),
    route!(
        POST,
        ["default-authorizer"],
        "SetDefaultAuthorizer",
        Res::Body(crate::authorizers::default_resources),
        crate::authorizers::set_default
    ),
    route!(
        GET,
        ["default-authorizer"],
        "DescribeDefaultAuthorizer",
        ANY,
        crate::authorizers::describe_default
    ),
    route!(
        DELETE,
        ["default-authorizer"],
        "ClearDefaultAuthorizer",
        ANY,
        crate::authorizers::clear_default
    ),
    route!(
        PUT,
        ["job-templates", L],
        "CreateJobTemplate",
        label("jobtemplate"),
        crate::jobs::create_job_template
    ),
    route!(
        GET,
        ["job-templates", L],
        "DescribeJobTemplate",
        label("jobtemplate"),
        crate::jobs::describe_job_template
    ),
    route!(
        DELETE,
        ["job-templates", L],
        "DeleteJobTemplate",
        label("jobtemplate"),
        crate::jobs::delete_job_template
    ),
    route!(
        GET,
        ["job-templates"],
        "ListJobTemplates",
        ANY,
        crate::jobs::list_job_templates
    ),
    route!(
        GET,
        ["jobs", L, "job-document"],
        "GetJobDocument",
        label("job"),
        crate::jobs::get_job_document
    ),
    route!(
        GET,
        ["jobs", L, "things"],
        "ListJobExecutionsForJob",
        label("job"),
        crate::jobs::executions_of_job
    ),
    route!(
        GET,
        ["things", L, "jobs"],
        "ListJobExecutionsForThing",
        label("thing"),
        crate::jobs::executions_of_thing
    ),
    route!(
        GET,
        ["things", L, "jobs", L],
        "DescribeJobExecution",
        Res::Body(crate::jobs::execution_resources),
        crate::jobs::describe_execution
    ),
    route!(
        PUT,
        ["things", L, "jobs", L, "cancel"],
        "CancelJobExecution",
        Res::Body(crate::jobs::execution_resources),
        crate::jobs::cancel_execution
    ),
    route!(
        DELETE,
        ["things", L, "jobs", L, "executionNumber", L],
        "DeleteJobExecution",
        Res::Body(crate::jobs::execution_resources),
        crate::jobs::delete_execution
    ),
    route!(
        POST,
        ["provisioning-templates"],
        "CreateProvisioningTemplate",
        Res::Body(crate::provisioning::create_resources),
        crate::provisioning::create
    ),
    route!(
        GET,
        ["provisioning-templates", L],
        "DescribeProvisioningTemplate",
        label("provisioningtemplate"),
        crate::provisioning::describe
    ),
    route!(
        PATCH,
        ["provisioning-templates", L],
        "UpdateProvisioningTemplate",
        label("provisioningtemplate"),
        crate::provisioning::update
    ),
    route!(
        DELETE,
        ["provisioning-templates", L],
        "DeleteProvisioningTemplate",
        label("provisioningtemplate"),
        crate::provisioning::delete
    ),
    route!(
        GET,
        ["provisioning-templates"],
        "ListProvisioningTemplates",
        ANY,
        crate::provisioning::list
    ),
    route!(
        POST,
        ["provisioning-templates", L, "versions"],
        "CreateProvisioningTemplateVersion",
        label("provisioningtemplate"),
        crate::provisioning::create_version
    ),
    route!(
        GET,
        ["provisioning-templates", L, "versions"],
        "ListProvisioningTemplateVersions",
        label("provisioningtemplate"),
        crate::provisioning::list_versions
    ),
    route!(
        GET,
        ["provisioning-templates", L, "versions", L],
        "DescribeProvisioningTemplateVersion",
        label("provisioningtemplate"),
        crate::provisioning::describe_version
    ),
    route!(
        DELETE,
        ["provisioning-templates", L, "versions", L],
        "DeleteProvisioningTemplateVersion",
        label("provisioningtemplate"),
        crate::provisioning::delete_version
    ),
    route!(
        POST,
        ["provisioning-templates", L, "provisioning-claim"],
        "CreateProvisioningClaim",
        label("provisioningtemplate"),
        crate::provisioning::create_claim
    ),
    route!(
        PATCH,
        ["event-configurations"],
        "UpdateEventConfigurations",
        ANY,
        |s, c| {
            let b = c.json()?;
            let Some(Value::Object(cfg)) = b.get("eventConfigurations") else {
                return Err(ApiError::invalid("eventConfigurations is required"));
            };
            let mut changes = Vec::new();
            for (k, v) in cfg {
                let on = v
                    .get("Enabled")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| ApiError::invalid(format!("{k}.Enabled must be a boolean")))?;
                changes.push((k.clone(), on));
            }
            s.registry
                .update_event_configurations(&c.account, &changes)?;
            Ok(json!({}))
        }
    ),
    route!(
        GET,
        ["event-configurations"],
        "DescribeEventConfigurations",
        ANY,
        |s, c| {
            let cfg: Map<String, Value> = s
                .registry
                .event_configurations(&c.account)?
                .into_iter()
                .map(|(k, on)| (k.to_string(), json!({"Enabled": on})))
                .collect();
            Ok(json!({"eventConfigurations": cfg}))
        }
    ),
    route!(
        POST,
        ["keys-and-certificate"],
        "CreateKeysAndCertificate",
        ANY,
        create_keys_and_certificate
    ),
    route!(
        POST,
        ["certificates"],
        "CreateCertificateFromCsr",
        ANY,
        create_certificate_from_csr
    ),
    route!(
        GET,
        ["certificates", L],
        "DescribeCertificate",
        label("cert"),
        describe_certificate
    ),
    route!(
        GET,
        ["certificates"],
        "ListCertificates",
        ANY,
        list_certificates
    ),
    route!(
        PUT,
        ["certificates", L],
        "UpdateCertificate",
        label("cert"),
        update_certificate
    ),
    route!(
        DELETE,
        ["certificates", L],
        "DeleteCertificate",
        label("cert"),
        |s, c| {
            s.registry
                .delete_certificate(&c.account, seg(c, 1), c.q_bool("forceDelete")?)?;
            Ok(json!({}))
        }
    ),
    route!(
        GET,
        ["registrationcode"],
        "GetRegistrationCode",
        ANY,
        |s, c| { Ok(json!({"registrationCode": s.registry.registration_code(&c.account)?})) }
    ),
    route!(
        DELETE,
        ["registrationcode"],
        "DeleteRegistrationCode",
        ANY,
        |s, c| {
            s.registry.delete_registration_code(&c.account)?;
            Ok(json!({}))
        }
    ),
    route!(
        POST,
        ["cacertificate"],
        "RegisterCACertificate",
        ANY,
        register_ca_certificate
    ),
    route!(
        GET,
        ["cacertificate", L],
        "DescribeCACertificate",
        label("cacert"),
        describe_ca_certificate
    ),
    route!(
        PUT,
        ["cacertificate", L],
        "UpdateCACertificate",
        label("cacert"),
        update_ca_certificate
    ),
    route!(
        DELETE,
        ["cacertificate", L],
        "DeleteCACertificate",
        label("cacert"),
        |s, c| {
            s.registry.delete_ca_certificate(&c.account, seg(c, 1))?;
            Ok(json!({}))
        }
    ),
    route!(
        GET,
        ["cacertificates"],
        "ListCACertificates",
        ANY,
        list_ca_certificates
    ),
    route!(
        POST,
        ["certificate", "register"],
        "RegisterCertificate",
        ANY,
        |s, c| register_certificate(s, c, true)
    ),
    route!(
        POST,
        ["certificate", "register-no-ca"],
        "RegisterCertificateWithoutCA",
        ANY,
        |s, c| register_certificate(s, c, false)
    ),
    route!(
        GET,
        ["certificates-by-ca", L],
        "ListCertificatesByCA",
        ANY,
        list_certificates
    ),
    route!(
        POST,
        ["policies", L],
        "CreatePolicy",
        label("policy"),
        create_policy
    ),
    route!(
        GET,
        ["policies", L],
        "GetPolicy",
        label("policy"),
        get_policy
    ),
    route!(GET, ["policies"], "ListPolicies", ANY, list_policies),
    route!(
        DELETE,
        ["policies", L],
        "DeletePolicy",
        label("policy"),
        |s, c| {
            s.registry.delete_policy(&c.account, seg(c, 1))?;
            Ok(json!({}))
        }
    ),
    route!(
        POST,
        ["policies", L, "version"],
        "CreatePolicyVersion",
        label("policy"),
        create_policy_version
    ),
    route!(
        GET,
        ["policies", L, "version"],
        "ListPolicyVersions",
        label("policy"),
        list_policy_versions
    ),
    route!(
        GET,
        ["policies", L, "version", L],
        "GetPolicyVersion",
        label("policy"),
        get_policy_version
    ),
    route!(
        PATCH,
        ["policies", L, "version", L],
        "SetDefaultPolicyVersion",
        label("policy"),
        |s, c| {
            s.registry
                .set_default_policy_version(&c.account, seg(c, 1), seg(c, 3))?;
            Ok(json!({}))
        }
    ),
    route!(
        DELETE,
        ["policies", L, "version", L],
        "DeletePolicyVersion",
        label("policy"),
        |s, c| {
            s.registry
                .delete_policy_version(&c.account, seg(c, 1), seg(c, 3))?;
            Ok(json!({}))
        }
    ),
    route!(
        PUT,
        ["target-policies", L],
        "AttachPolicy",
        label("policy"),
        |s, c| {
            let b = c.json()?;
            s.registry
                .attach_policy(&c.account, seg(c, 1), required(&b, "target")?)?;
            Ok(json!({}))
        }
    ),
    route!(
        POST,
        ["target-policies", L],
        "DetachPolicy",
        label("policy"),
        |s, c| {
            let b = c.json()?;
            s.registry
                .detach_policy(&c.account, seg(c, 1), required(&b, "target")?)?;
            Ok(json!({}))
        }
    ),
    route!(
        PUT,
        ["principal-policies", L],
        "AttachPrincipalPolicy",
        label("policy"),
        |s, c| {
            let p = principal_header(c, "x-amzn-iot-principal")?;
            s.registry.attach_policy(&c.account, seg(c, 1), p)?;
            Ok(json!({}))
        }
    ),
    route!(
        DELETE,
        ["principal-policies", L],
        "DetachPrincipalPolicy",
        label("policy"),
        |s, c| {
            let p = principal_header(c, "x-amzn-iot-principal")?;
            s.registry.detach_policy(&c.account, seg(c, 1), p)?;
            Ok(json!({}))
        }
    ),
    route!(
        POST,
        ["attached-policies", L],
        "ListAttachedPolicies",
        ANY,
        |s, c| {
            let target = seg(c, 1).to_owned();
            list_attached(s, c, &target)
        }
    ),
    route!(
        GET,
        ["principal-policies"],
        "ListPrincipalPolicies",
        ANY,
        |s, c| {
            let p = principal_header(c, "x-amzn-iot-principal")?.to_owned();
            list_attached(s, c, &p)
        }
    ),
    route!(
        POST,
        ["policy-targets", L],
        "ListTargetsForPolicy",
        label("policy"),
        |s, c| list_targets(s, c, "targets")
    ),
    route!(
        GET,
        ["policy-principals"],
        "ListPolicyPrincipals",
        ANY,
        |s, c| {
            let name = principal_header(c, "x-amzn-iot-policy")?.to_owned();
            let (marker, size) = (c.q("marker"), c.q_int("pageSize", 1, 250, 250)? as usize);
            let page = s
                .registry
                .list_targets_for_policy(&c.account, &name, marker, size)?;
            Ok(json!({"principals": page.items, "nextMarker": page.next}))
        }
    ),
    route!(
        POST,
        ["effective-policies"],
        "GetEffectivePolicies",
        ANY,
        effective_policies
    ),
    route!(
        POST,
        ["role-aliases", L],
        "CreateRoleAlias",
        label("rolealias"),
        put_role_alias
    ),
    route!(
        GET,
        ["role-aliases", L],
        "DescribeRoleAlias",
        label("rolealias"),
        |s, c| {
            let r = s.registry.describe_role_alias(&c.account, seg(c, 1))?;
            Ok(json!({"roleAliasDescription": {"roleAlias": r.name,
            "roleAliasArn": s.registry.arn(&c.account, &format!("rolealias/{}", r.name)),
            "roleArn": r.role_arn, "owner": c.account, "credentialDurationSeconds": r.duration,
            "creationDate": r.created, "lastModifiedDate": r.modified}}))
        }
    ),
    route!(
        PUT,
        ["role-aliases", L],
        "UpdateRoleAlias",
        label("rolealias"),
        put_role_alias
    ),
    route!(
        DELETE,
        ["role-aliases", L],
        "DeleteRoleAlias",
        label("rolealias"),
        |s, c| {
            s.registry.delete_role_alias(&c.account, seg(c, 1))?;
            Ok(json!({}))
        }
    ),
    route!(GET, ["role-aliases"], "ListRoleAliases", ANY, |s, c| {
        let page = s.registry.list_role_aliases(
            &c.account,
            c.q_bool("isAscendingOrder")?,
            c.q("marker"),
            c.q_int("pageSize", 1, 250, 250)? as usize,
        )?;
        Ok(json!({"roleAliases": page.items, "nextMarker": page.next}))
    }),
    route!(
        GET,
        ["endpoint"],
        "DescribeEndpoint",
        ANY,
        describe_endpoint
    ),
    route!(
        POST,
        ["test-authorization"],
        "TestAuthorization",
        ANY,
        test_authorization
    ),
];

impl Route {
    /// The ARNs this route's IAM action is authorized on, from the same path label or body
    /// members its handler acts on.
    pub(crate) fn resource_arns(
        &self,
        state: &ApiState,
        call: &Call,
    ) -> Result<Vec<String>, ApiError> {
        Ok(match self.resource {
            Res::Any => vec!["*".to_string()],
            Res::Label(kind, i) => vec![
                state
                    .registry
                    .arn(&call.account, &format!("{kind}/{}", seg(call, i))),
            ],
            Res::Body(f) => f(state, call)?
                .into_iter()
                .map(|(kind, name)| state.registry.arn(&call.account, &format!("{kind}/{name}")))
                .collect(),
        })
    }

    /// Runs the operation (once it is authorized).
    pub(crate) fn run(&self, state: &ApiState, call: &Call) -> Out {
        (self.run)(state, call)
    }
}

/// The operation a request names, if any.
pub(crate) fn route(call: &Call) -> Option<&'static Route> {
    ROUTES.iter().find(|r| {
        r.method == call.method
            && r.path.len() == call.segments.len()
            && r.path
                .iter()
                .zip(&call.segments)
                .all(|(p, s)| *p == L || p == s)
    })
}

/// The error for a request that names no operation.
pub(crate) fn unknown(call: &Call) -> ApiError {
    ApiError::new(
        404,
        "UnknownOperationException",
        format!(
            "No operation matches {} /{}",
            call.method,
            call.segments.join("/")
        ),
    )
}

fn principal_header<'a>(call: &'a Call, name: &str) -> Result<&'a str, ApiError> {
    call.header(name)
        .ok_or_else(|| ApiError::invalid(format!("The {name} header is required")))
}

fn thing_arn(state: &ApiState, account: &str, name: &str) -> String {
    state.registry.arn(account, &format!("thing/{name}"))
}

fn create_thing(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let (attrs, _) = attributes(&b)?;
    if str_field(&b, "billingGroupName")?.is_some() {
        return Err(ApiError::new(
            404,
            "ResourceNotFoundException",
            "Billing groups are not supported",
        ));
    }
    let name = seg(call, 1);
    let t = state.registry.create_thing(
        &call.account,
        name,
        str_field(&b, "thingTypeName")?,
        attrs.unwrap_or_default(),
    )?;
    Ok(
        json!({"thingName": t.name, "thingArn": thing_arn(state, &call.account, &t.name), "thingId": t.id}),
    )
}

fn describe_thing(state: &ApiState, call: &Call) -> Out {
    let t = state.registry.describe_thing(&call.account, seg(call, 1))?;
    let mut v = json!({"defaultClientId": t.name, "thingName": t.name, "thingId": t.id,
        "thingArn": thing_arn(state, &call.account, &t.name), "attributes": t.attributes, "version": t.version});
    if let Some(tt) = t.thing_type {
        v["thingTypeName"] = json!(tt);
    }
    Ok(v)
}

fn update_thing(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let (attributes, merge) = attributes(&b)?;
    let expected_version = match b.get("expectedVersion") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| ApiError::invalid("expectedVersion must be an integer"))?,
        ),
    };
    let u = ThingUpdate {
        thing_type: str_field(&b, "thingTypeName")?.map(str::to_owned),
        remove_thing_type: bool_field(&b, "removeThingType")?,
        attributes,
        merge,
        expected_version,
    };
    state
        .registry
        .update_thing(&call.account, seg(call, 1), u)?;
    Ok(json!({}))
}

fn delete_thing(state: &ApiState, call: &Call) -> Out {
    let v = match call.q("expectedVersion") {
        None => None,
        Some(s) => Some(
            s.parse::<i64>()
                .map_err(|_| ApiError::invalid("expectedVersion must be an integer"))?,
        ),
    };
    state
        .registry
        .delete_thing(&call.account, seg(call, 1), v)?;
    Ok(json!({}))
}

fn list_things(state: &ApiState, call: &Call) -> Out {
    let q = ThingQuery {
        attribute_name: call.q("attributeName").map(str::to_owned),
        attribute_value: call.q("attributeValue").map(str::to_owned),
        use_prefix_attribute_value: call.q_bool("usePrefixAttributeValue")?,
        thing_type: call.q("thingTypeName").map(str::to_owned),
        next_token: call.q("nextToken").map(str::to_owned),
        max_results: call.q_int("maxResults", 1, 250, 50)? as usize,
    };
    if q.attribute_value.is_some() && q.attribute_name.is_none() {
        return Err(ApiError::invalid("attributeValue requires attributeName"));
    }
    let page = state.registry.list_things(&call.account, &q)?;
    let things: Vec<Value> = page
        .items
        .iter()
        .map(|t| {
            let mut v = json!({"thingName": t.name, "thingArn": thing_arn(state, &call.account, &t.name),
                "attributes": t.attributes, "version": t.version});
            if let Some(tt) = &t.thing_type {
                v["thingTypeName"] = json!(tt);
            }
            v
        })
        .collect();
    Ok(json!({"things": things, "nextToken": page.next}))
}

fn thing_type_json(state: &ApiState, account: &str, t: &ThingType) -> Value {
    let mut props = json!({"searchableAttributes": t.searchable_attributes});
    if let Some(d) = &t.description {
        props["thingTypeDescription"] = json!(d);
    }
    let mut meta = json!({"deprecated": t.deprecated, "creationDate": t.created});
    if let Some(d) = t.deprecation_date {
        meta["deprecationDate"] = json!(d);
    }
    json!({"thingTypeName": t.name, "thingTypeId": t.id,
        "thingTypeArn": state.registry.arn(account, &format!("thingtype/{}", t.name)),
        "thingTypeProperties": props, "thingTypeMetadata": meta})
}

fn create_thing_type(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let (desc, searchable) = match b.get("thingTypeProperties") {
        Some(Value::Object(p)) => {
            let s = match p.get("searchableAttributes") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            };
            (str_field(p, "thingTypeDescription")?.map(str::to_owned), s)
        }
        _ => (None, Vec::new()),
    };
    let t = state
        .registry
        .create_thing_type(&call.account, seg(call, 1), desc, searchable)?;
    Ok(json!({"thingTypeName": t.name, "thingTypeId": t.id,
        "thingTypeArn": state.registry.arn(&call.account, &format!("thingtype/{}", t.name))}))
}

fn describe_thing_type(state: &ApiState, call: &Call) -> Out {
    let t = state
        .registry
        .describe_thing_type(&call.account, seg(call, 1))?;
    Ok(thing_type_json(state, &call.account, &t))
}

fn deprecate_thing_type(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    state.registry.deprecate_thing_type(
        &call.account,
        seg(call, 1),
        bool_field(&b, "undoDeprecate")?,
    )?;
    Ok(json!({}))
}

fn list_thing_types(state: &ApiState, call: &Call) -> Out {
    let page = state.registry.list_thing_types(
        &call.account,
        call.q("thingTypeName"),
        call.q("nextToken"),
        call.q_int("maxResults", 1, 250, 50)? as usize,
    )?;
    let v: Vec<Value> = page
        .items
        .iter()
        .map(|t| thing_type_json(state, &call.account, t))
        .collect();
    Ok(json!({"thingTypes": v, "nextToken": page.next}))
}

fn cert_arn(state: &ApiState, account: &str, id: &str) -> String {
    state.registry.arn(account, &format!("cert/{id}"))
}

fn status_from(set_as_active: bool) -> CertStatus {
    if set_as_active {
        CertStatus::Active
    } else {
        CertStatus::Inactive
    }
}

fn create_keys_and_certificate(state: &ApiState, call: &Call) -> Out {
    let active = call.q_bool("setAsActive")?;
    let now = time::OffsetDateTime::now_utc();
    let issued = state
        .device_ca
        .issue_device(KeyKind::Rsa2048, now)
        .map_err(|e| ApiError::new(500, "InternalFailureException", e.to_string()))?;
    let (c, pem) = state.registry.add_certificate(
        &call.account,
        NewCertificate {
            pem: issued.cert_pem,
            status: status_from(active),
            ca_certificate_id: None,
            mode: CertMode::Default,
            claim_template: None,
        },
    )?;
    Ok(
        json!({"certificateArn": cert_arn(state, &call.account, &c.id), "certificateId": c.id, "certificatePem": pem,
        "keyPair": {"PublicKey": issued.public_key_pem, "PrivateKey": issued.private_key_pem}}),
    )
}

fn create_certificate_from_csr(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let csr = required(&b, "certificateSigningRequest")?;
    let now = time::OffsetDateTime::now_utc();
    let (pem, _) = state
        .device_ca
        .sign_csr(csr, now)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let (c, pem) = state.registry.add_certificate(
        &call.account,
        NewCertificate {
            pem,
            status: status_from(call.q_bool("setAsActive")?),
            ca_certificate_id: None,
            mode: CertMode::Default,
            claim_template: None,
        },
    )?;
    Ok(
        json!({"certificateArn": cert_arn(state, &call.account, &c.id), "certificateId": c.id, "certificatePem": pem}),
    )
}

fn describe_certificate(state: &ApiState, call: &Call) -> Out {
    let c = state
        .registry
        .describe_certificate(&call.account, seg(call, 1))?;
    let pem = state.registry.certificate_pem(&call.account, &c.id)?;
    let mut d = json!({"certificateArn": cert_arn(state, &call.account, &c.id), "certificateId": c.id,
        "status": c.status.as_str(), "certificatePem": pem, "ownedBy": call.account,
        "creationDate": c.created, "lastModifiedDate": c.modified, "customerVersion": c.generation,
        "generationId": c.generation.to_string(), "validity": {"notBefore": c.not_before, "notAfter": c.not_after},
        "certificateMode": c.mode.as_str(), "transferData": {}});
    if let Some(ca) = &c.ca_certificate_id {
        d["caCertificateId"] = json!(ca);
    }
    Ok(json!({"certificateDescription": d}))
}

/// ListCertificates, and ListCertificatesByCA (`/certificates-by-ca/{caCertificateId}`).
fn list_certificates(state: &ApiState, call: &Call) -> Out {
    let by_ca = (call.segments.first().map(String::as_str) == Some("certificates-by-ca"))
        .then(|| seg(call, 1));
    let page = state.registry.list_certificates(
        &call.account,
        by_ca,
        call.q_bool("isAscendingOrder")?,
        call.q("marker"),
        call.q_int("pageSize", 1, 250, 25)? as usize,
    )?;
    let v: Vec<Value> = page
        .items
        .iter()
        .map(|c| {
            json!({"certificateArn": cert_arn(state, &call.account, &c.id), "certificateId": c.id,
                "status": c.status.as_str(), "certificateMode": c.mode.as_str(), "creationDate": c.created})
        })
        .collect();
    Ok(json!({"certificates": v, "nextMarker": page.next}))
}

/// CreateRoleAlias (POST) and UpdateRoleAlias (PUT). The caller must be allowed to pass the
/// role (`iam:PassRole`), as on AWS.
fn put_role_alias(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let duration = match b.get("credentialDurationSeconds") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ApiError::invalid("credentialDurationSeconds must be an integer"))?,
        ),
    };
    let name = seg(call, 1);
    let role_arn = str_field(&b, "roleArn")?;
    if let Some(role) = role_arn {
        // The role is passed to the credential provider.
        crate::authorize_with(
            state,
            &call.caller,
            &call.request,
            "iam:PassRole",
            role,
            &[(
                "iam:PassedToService",
                "credentials.iot.amazonaws.com".to_string(),
            )],
        )?;
    }
    let r = if call.method == Method::POST {
        let role = role_arn.ok_or_else(|| ApiError::invalid("roleArn is required"))?;
        state
            .registry
            .create_role_alias(&call.account, name, role, duration)?
    } else {
        state
            .registry
            .update_role_alias(&call.account, name, role_arn, duration)?
    };
    Ok(json!({"roleAlias": r.name,
        "roleAliasArn": state.registry.arn(&call.account, &format!("rolealias/{}", r.name))}))
}

fn ca_arn(state: &ApiState, account: &str, id: &str) -> String {
    state.registry.arn(account, &format!("cacert/{id}"))
}

/// A CA's `registrationConfig`. Its role is the one just-in-time provisioning acts with, so
/// naming it is passing it: the caller needs `iam:PassRole` on it (as for a provisioning
/// template), and the role must trust `iot.amazonaws.com`.
fn registration_config(
    state: &ApiState,
    call: &Call,
    b: &Map<String, Value>,
) -> Result<Option<RegistrationConfig>, ApiError> {
    let config = registration_config_fields(b)?;
    if let Some(role) = config.as_ref().and_then(|c| c.role_arn.as_deref()) {
        crate::jobs::pass_role(state, call, role)?;
        crate::provisioning::check_role(state, &call.account, role)?;
    }
    Ok(config)
}

fn registration_config_fields(
    b: &Map<String, Value>,
) -> Result<Option<RegistrationConfig>, ApiError> {
    match b.get("registrationConfig") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(c)) => {
            let body = str_field(c, "templateBody")?;
            if body.is_some_and(|t| t.len() > 10240) {
                return Err(ApiError::invalid(
                    "registrationConfig.templateBody is longer than 10240 characters",
                ));
            }
            Ok(Some(RegistrationConfig {
                template_body: body.map(str::to_owned),
                role_arn: str_field(c, "roleArn")?.map(str::to_owned),
                template_name: str_field(c, "templateName")?.map(str::to_owned),
            }))
        }
        Some(_) => Err(ApiError::invalid("registrationConfig must be an object")),
    }
}

fn registration_config_json(c: &RegistrationConfig) -> Value {
    let mut v = json!({});
    if let Some(t) = &c.template_body {
        v["templateBody"] = json!(t);
    }
    if let Some(t) = &c.role_arn {
        v["roleArn"] = json!(t);
    }
    if let Some(t) = &c.template_name {
        v["templateName"] = json!(t);
    }
    v
}

/// The certificate id (SHA-256 of the DER) of the first certificate in a PEM text.
fn pem_certificate_id(pem: &str) -> Option<String> {
    sekisho_pki::pem_to_der(pem)
        .ok()
        .map(|der| sekisho_pki::certificate_id(&der))
}

fn register_ca_certificate(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let mode = match str_field(&b, "certificateMode")? {
        None | Some("DEFAULT") => CertMode::Default,
        Some("SNI_ONLY") => CertMode::SniOnly,
        Some(m) => {
            return Err(ApiError::invalid(format!(
                "certificateMode {m:?} is not valid: DEFAULT or SNI_ONLY"
            )));
        }
    };
    let pem = required(&b, "caCertificate")?;
    // Sekisho's own device CA (it signs every account's CreateKeysAndCertificate and CSRs)
    // is no account's to register: with auto-registration, one tenant would claim the
    // certificates issued to all others.
    if pem_certificate_id(pem).as_deref()
        == Some(sekisho_pki::certificate_id(state.device_ca.cert_der()).as_str())
    {
        return Err(ApiError::new(
            400,
            "CertificateValidationException",
            "This CA certificate is Sekisho's own device CA and cannot be registered",
        ));
    }
    let ca = state.registry.register_ca_certificate(
        &call.account,
        NewCaCertificate {
            pem: pem.to_owned(),
            verification_pem: str_field(&b, "verificationCertificate")?.map(str::to_owned),
            mode,
            active: call.q_bool("setAsActive")?,
            auto_registration: call.q_bool("allowAutoRegistration")?,
            registration_config: registration_config(state, call, &b)?,
        },
        time::OffsetDateTime::now_utc(),
    )?;
    Ok(json!({"certificateArn": ca_arn(state, &call.account, &ca.id), "certificateId": ca.id}))
}

fn describe_ca_certificate(state: &ApiState, call: &Call) -> Out {
    let c = state
        .registry
        .describe_ca_certificate(&call.account, seg(call, 1))?;
    let d = json!({"certificateArn": ca_arn(state, &call.account, &c.id), "certificateId": c.id,
        "status": c.status.as_str(), "certificatePem": c.pem, "ownedBy": call.account,
        "creationDate": c.created, "lastModifiedDate": c.modified, "customerVersion": c.generation,
        "generationId": c.generation.to_string(),
        "autoRegistrationStatus": if c.auto_registration { "ENABLE" } else { "DISABLE" },
        "validity": {"notBefore": c.not_before, "notAfter": c.not_after},
        "certificateMode": c.mode.as_str()});
    let mut out = json!({"certificateDescription": d});
    if let Some(r) = &c.registration_config {
        out["registrationConfig"] = registration_config_json(r);
    }
    Ok(out)
}

fn update_ca_certificate(state: &ApiState, call: &Call) -> Out {
    let status = match call.q("newStatus") {
        None => None,
        Some(s) => Some(CaStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(format!("newStatus {s:?} is not valid: ACTIVE or INACTIVE"))
        })?),
    };
    let auto_registration = match call.q("newAutoRegistrationStatus") {
        None => None,
        Some("ENABLE") => Some(true),
        Some("DISABLE") => Some(false),
        Some(s) => {
            return Err(ApiError::invalid(format!(
                "newAutoRegistrationStatus {s:?} is not valid: ENABLE or DISABLE"
            )));
        }
    };
    let b = call.json()?;
    state.registry.update_ca_certificate(
        &call.account,
        seg(call, 1),
        CaUpdate {
            status,
            auto_registration,
            registration_config: registration_config(state, call, &b)?,
            remove_auto_registration: bool_field(&b, "removeAutoRegistration")?,
        },
    )?;
    Ok(json!({}))
}

fn list_ca_certificates(state: &ApiState, call: &Call) -> Out {
    let page = state.registry.list_ca_certificates(
        &call.account,
        call.q_bool("isAscendingOrder")?,
        call.q("marker"),
        call.q_int("pageSize", 1, 250, 25)? as usize,
    )?;
    let v: Vec<Value> = page
        .items
        .iter()
        .map(|c| {
            json!({"certificateArn": ca_arn(state, &call.account, &c.id), "certificateId": c.id,
                "status": c.status.as_str(), "creationDate": c.created})
        })
        .collect();
    Ok(json!({"certificates": v, "nextMarker": page.next}))
}

/// RegisterCertificate (`with_ca`) and RegisterCertificateWithoutCA. The status comes from
/// `status`, else from the deprecated `setAsActive`; only ACTIVE, INACTIVE and REVOKED can be
/// asked for.
fn register_certificate(state: &ApiState, call: &Call, with_ca: bool) -> Out {
    let b = call.json()?;
    let pem = required(&b, "certificatePem")?;
    let status = match str_field(&b, "status")? {
        None => status_from(with_ca && call.q_bool("setAsActive")?),
        Some(s) => match CertStatus::parse(s) {
            Some(st @ (CertStatus::Active | CertStatus::Inactive | CertStatus::Revoked)) => st,
            _ => {
                return Err(ApiError::invalid(format!(
                    "status {s:?} is not valid: ACTIVE, INACTIVE or REVOKED"
                )));
            }
        },
    };
    let now = time::OffsetDateTime::now_utc();
    let c = if with_ca {
        state.registry.register_certificate(
            &call.account,
            pem,
            str_field(&b, "caCertificatePem")?,
            status,
            now,
        )?
    } else {
        state
            .registry
            .register_certificate_without_ca(&call.account, pem, status, now)?
    };
    Ok(json!({"certificateArn": cert_arn(state, &call.account, &c.id), "certificateId": c.id}))
}

fn update_certificate(state: &ApiState, call: &Call) -> Out {
    let s = call
        .q("newStatus")
        .ok_or_else(|| ApiError::invalid("newStatus is required"))?;
    let status = CertStatus::parse(s)
        .ok_or_else(|| ApiError::invalid(format!("newStatus {s:?} is not valid")))?;
    state
        .registry
        .update_certificate(&call.account, seg(call, 1), status)?;
    Ok(json!({}))
}

fn policy_arn(state: &ApiState, account: &str, name: &str) -> String {
    state.registry.arn(account, &format!("policy/{name}"))
}

fn create_policy(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let doc = required(&b, "policyDocument")?;
    let p = state
        .registry
        .create_policy(&call.account, seg(call, 1), doc)?;
    Ok(
        json!({"policyName": p.name, "policyArn": policy_arn(state, &call.account, &p.name),
        "policyDocument": doc, "policyVersionId": "1"}),
    )
}

fn get_policy(state: &ApiState, call: &Call) -> Out {
    let p = state.registry.get_policy(&call.account, seg(call, 1))?;
    let doc = p
        .versions
        .get(&p.default_version)
        .map(|v| v.document.clone())
        .unwrap_or_default();
    Ok(
        json!({"policyName": p.name, "policyArn": policy_arn(state, &call.account, &p.name), "policyDocument": doc,
        "defaultVersionId": p.default_version.to_string(), "creationDate": p.created,
        "lastModifiedDate": p.modified, "generationId": p.generation_id}),
    )
}

fn list_policies(state: &ApiState, call: &Call) -> Out {
    let page = state.registry.list_policies(
        &call.account,
        call.q("isAscendingOrder").is_none() || call.q_bool("isAscendingOrder")?,
        call.q("marker"),
        call.q_int("pageSize", 1, 250, 250)? as usize,
    )?;
    let v: Vec<Value> =
        page.items.iter().map(|p| json!({"policyName": p.name, "policyArn": policy_arn(state, &call.account, &p.name)})).collect();
    Ok(json!({"policies": v, "nextMarker": page.next}))
}

fn create_policy_version(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let doc = required(&b, "policyDocument")?;
    let name = seg(call, 1);
    let (p, v) = state.registry.create_policy_version(
        &call.account,
        name,
        doc,
        call.q_bool("setAsDefault")?,
    )?;
    Ok(
        json!({"policyArn": policy_arn(state, &call.account, name), "policyDocument": doc,
        "policyVersionId": v.to_string(), "isDefaultVersion": p.default_version == v}),
    )
}

fn list_policy_versions(state: &ApiState, call: &Call) -> Out {
    let p = state.registry.get_policy(&call.account, seg(call, 1))?;
    let v: Vec<Value> = p
        .versions
        .iter()
        .rev()
        .map(|(n, v)| json!({"versionId": n.to_string(), "isDefaultVersion": *n == p.default_version, "createDate": v.created}))
        .collect();
    Ok(json!({"policyVersions": v}))
}

fn get_policy_version(state: &ApiState, call: &Call) -> Out {
    let name = seg(call, 1);
    let p = state.registry.get_policy(&call.account, name)?;
    let id = seg(call, 3);
    let (n, v) = id
        .parse::<u32>()
        .ok()
        .and_then(|n| p.versions.get(&n).map(|v| (n, v)))
        .ok_or_else(|| {
            ApiError::new(
                404,
                "ResourceNotFoundException",
                format!("Policy version {id} of policy {name} does not exist"),
            )
        })?;
    Ok(
        json!({"policyArn": policy_arn(state, &call.account, name), "policyName": name, "policyDocument": v.document,
        "policyVersionId": n.to_string(), "isDefaultVersion": n == p.default_version, "creationDate": v.created,
        "lastModifiedDate": p.modified, "generationId": p.generation_id}),
    )
}

fn list_attached(state: &ApiState, call: &Call, target: &str) -> Out {
    let page = state.registry.list_attached_policies(
        &call.account,
        target,
        call.q_bool("recursive")?,
        call.q("marker"),
        call.q_int("pageSize", 1, 250, 250)? as usize,
    )?;
    let v: Vec<Value> =
        page.items.iter().map(|p| json!({"policyName": p.name, "policyArn": policy_arn(state, &call.account, &p.name)})).collect();
    Ok(json!({"policies": v, "nextMarker": page.next}))
}

fn list_targets(state: &ApiState, call: &Call, member: &str) -> Out {
    let page = state.registry.list_targets_for_policy(
        &call.account,
        seg(call, 1),
        call.q("marker"),
        call.q_int("pageSize", 1, 250, 250)? as usize,
    )?;
    let mut out = Map::new();
    out.insert(member.into(), json!(page.items));
    out.insert("nextMarker".into(), json!(page.next));
    Ok(Value::Object(out))
}

fn attach_thing_principal(state: &ApiState, call: &Call) -> Out {
    let p = principal_header(call, "x-amzn-principal")?;
    let kind = match call.q("thingPrincipalType") {
        None | Some("NON_EXCLUSIVE_THING") => ThingPrincipalType::NonExclusiveThing,
        Some("EXCLUSIVE_THING") => ThingPrincipalType::ExclusiveThing,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "thingPrincipalType {other:?} is not valid"
            )));
        }
    };
    state
        .registry
        .attach_thing_principal(&call.account, seg(call, 1), p, kind)?;
    Ok(json!({}))
}

fn detach_thing_principal(state: &ApiState, call: &Call) -> Out {
    let p = principal_header(call, "x-amzn-principal")?;
    state
        .registry
        .detach_thing_principal(&call.account, seg(call, 1), p)?;
    Ok(json!({}))
}

/// The V1 (names only) or V2 (with the attachment type) form of a principal/thing listing.
/// `members` is (V1 list member, V2 list member, V2 item key).
fn attachment_page(
    call: &Call,
    page: Page<(String, ThingPrincipalType)>,
    v2: bool,
    members: (&str, &str, &str),
) -> Out {
    let (v1_list, v2_list, key) = members;
    let want = call.q("thingPrincipalType");
    let items: Vec<Value> = if v2 {
        page.items
            .iter()
            .filter(|(_, k)| want.is_none_or(|w| w == k.as_str()))
            .map(|(n, k)| json!({key: n, "thingPrincipalType": k.as_str()}))
            .collect()
    } else {
        page.items.iter().map(|(n, _)| json!(n)).collect()
    };
    let mut out = Map::new();
    out.insert(
        if v2 { v2_list } else { v1_list }.into(),
        Value::Array(items),
    );
    out.insert("nextToken".into(), json!(page.next));
    Ok(Value::Object(out))
}

fn list_thing_principals(state: &ApiState, call: &Call, v2: bool) -> Out {
    let page = state.registry.list_thing_principals(
        &call.account,
        seg(call, 1),
        call.q("nextToken"),
        call.q_int("maxResults", 1, 250, 50)? as usize,
    )?;
    attachment_page(
        call,
        page,
        v2,
        ("principals", "thingPrincipalObjects", "principal"),
    )
}

fn list_principal_things(state: &ApiState, call: &Call, v2: bool) -> Out {
    let p = principal_header(call, "x-amzn-principal")?;
    let page = state.registry.list_principal_things(
        &call.account,
        p,
        call.q("nextToken"),
        call.q_int("maxResults", 1, 250, 50)? as usize,
    )?;
    attachment_page(
        call,
        page,
        v2,
        ("things", "principalThingObjects", "thingName"),
    )
}

/// A name given as `{member}Name` or as `{member}Arn` (an ARN of this account's `kind`).
fn name_or_arn(
    state: &ApiState,
    call: &Call,
    b: &Map<String, Value>,
    member: &str,
    kind: &str,
) -> Result<Option<String>, ApiError> {
    let name = str_field(b, &format!("{member}Name"))?;
    let arn = str_field(b, &format!("{member}Arn"))?;
    let from_arn = match arn {
        None => None,
        Some(a) => Some(
            a.strip_prefix(&state.registry.arn(&call.account, &format!("{kind}/")))
                .ok_or_else(|| {
                    ApiError::invalid(format!("{member}Arn is not a {kind} of this account"))
                })?
                .to_owned(),
        ),
    };
    match (name, from_arn) {
        (Some(n), Some(a)) if n != a => Err(ApiError::invalid(format!(
            "{member}Name and {member}Arn name different resources"
        ))),
        (Some(n), _) => Ok(Some(n.to_owned())),
        (None, a) => Ok(a),
    }
}

/// The group and the thing of AddThingToThingGroup and RemoveThingFromThingGroup.
fn membership(state: &ApiState, call: &Call) -> Result<(String, String), ApiError> {
    let b = call.json()?;
    let group = name_or_arn(state, call, &b, "thingGroup", "thinggroup")?
        .ok_or_else(|| ApiError::invalid("thingGroupName or thingGroupArn is required"))?;
    let thing = name_or_arn(state, call, &b, "thing", "thing")?
        .ok_or_else(|| ApiError::invalid("thingName or thingArn is required"))?;
    Ok((group, thing))
}

/// The thing and the groups of UpdateThingGroupsForThing.
fn groups_for_thing(call: &Call) -> Result<(String, Vec<String>, Vec<String>), ApiError> {
    let b = call.json()?;
    let thing = required(&b, "thingName")?.to_owned();
    let list = |k: &str| -> Result<Vec<String>, ApiError> {
        match b.get(k) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) if a.len() <= MAX_GROUPS_PER_THING => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| ApiError::invalid(format!("{k} must list names")))
                })
                .collect(),
            Some(_) => Err(ApiError::invalid(format!(
                "{k} must be a list of at most {MAX_GROUPS_PER_THING} names"
            ))),
        }
    };
    Ok((
        thing,
        list("thingGroupsToAdd")?,
        list("thingGroupsToRemove")?,
    ))
}

fn group_properties(b: &Map<String, Value>) -> Result<GroupProperties, ApiError> {
    let Some(p) = b.get("thingGroupProperties") else {
        return Ok((None, None, false));
    };
    let Value::Object(p) = p else {
        return Err(ApiError::invalid("thingGroupProperties must be an object"));
    };
    let description = str_field(p, "thingGroupDescription")?.map(str::to_owned);
    let (attrs, merge) = attributes(p)?;
    Ok((description, attrs, merge))
}

fn create_thing_group(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let name = seg(call, 1);
    let (description, attrs, _) = group_properties(&b)?;
    let g = state.registry.create_thing_group(
        &call.account,
        name,
        str_field(&b, "parentGroupName")?,
        description.as_deref(),
        attrs.unwrap_or_default(),
    )?;
    Ok(
        json!({"thingGroupName": g.name, "thingGroupArn": state.registry.group_arn(&call.account, &g.name), "thingGroupId": g.id}),
    )
}

fn describe_thing_group(state: &ApiState, call: &Call) -> Out {
    let (g, ancestors) = state
        .registry
        .describe_thing_group(&call.account, seg(call, 1))?;
    let mut props = json!({"attributePayload": {"attributes": g.attributes}});
    if let Some(d) = &g.description {
        props["thingGroupDescription"] = json!(d);
    }
    let mut meta = json!({"creationDate": g.created});
    if let Some(p) = &g.parent {
        meta["parentGroupName"] = json!(p);
        meta["rootToParentThingGroups"] = json!(ancestors
            .iter()
            .map(|a| json!({"groupName": a, "groupArn": state.registry.group_arn(&call.account, a)}))
            .collect::<Vec<_>>());
    }
    Ok(json!({"thingGroupName": g.name, "thingGroupId": g.id,
        "thingGroupArn": state.registry.group_arn(&call.account, &g.name), "version": g.version,
        "thingGroupProperties": props, "thingGroupMetadata": meta}))
}

fn update_thing_group(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    if !b.contains_key("thingGroupProperties") {
        return Err(ApiError::invalid("thingGroupProperties is required"));
    }
    let (description, attributes, merge) = group_properties(&b)?;
    let expected_version = match b.get("expectedVersion") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| ApiError::invalid("expectedVersion must be a number"))?,
        ),
    };
    let version = state.registry.update_thing_group(
        &call.account,
        seg(call, 1),
        GroupUpdate {
            description,
            attributes,
            merge,
            expected_version,
        },
    )?;
    Ok(json!({"version": version}))
}

fn effective_policies(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let principal = str_field(&b, "principal")?;
    let thing = call.q("thingName");
    if principal.is_none() && thing.is_none() {
        return Err(ApiError::invalid("principal or thingName is required"));
    }
    let ps = state
        .registry
        .effective_policies(&call.account, principal, thing)?;
    let v: Vec<Value> = ps
        .iter()
        .map(|p| {
            let doc = p.versions.get(&p.default_version).map(|v| v.document.clone()).unwrap_or_default();
            json!({"policyName": p.name, "policyArn": policy_arn(state, &call.account, &p.name), "policyDocument": doc})
        })
        .collect();
    Ok(json!({"effectivePolicies": v}))
}

fn describe_endpoint(state: &ApiState, call: &Call) -> Out {
    let info = state
        .registry
        .accounts()
        .into_iter()
        .find(|a| a.id == call.account)
        .ok_or_else(|| ApiError::new(500, "InternalFailureException", "account vanished"))?;
    let t = call.q("endpointType");
    let addr = state
        .endpoints
        .address(&info.endpoint_prefix, t)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "Endpoint type {} is not supported",
                t.unwrap_or("")
            ))
        })?;
    Ok(json!({"endpointAddress": addr}))
}

/// TestAuthorization: evaluates the principal's policies (plus `policyNamesToAdd`, minus
/// `policyNamesToSkip`) for each action and resource, with the connection variables a device
/// with `clientId` would have.
fn test_authorization(state: &ApiState, call: &Call) -> Out {
    let b = call.json()?;
    let principal = required(&b, "principal")?;
    let cert_prefix = state.registry.arn(&call.account, "cert/");
    let cert_id = principal
        .strip_prefix(&cert_prefix)
        .ok_or_else(|| ApiError::invalid("principal must be a certificate ARN of this account"))?;
    let client_id = call.q("clientId").map(sekisho_registry::ClientId::new);
    let identity = state.registry.certificate_identity(
        &sekisho_registry::AccountId::new(call.account.clone()),
        &sekisho_registry::CertificateId::new(cert_id),
        client_id.as_ref(),
    )?;
    let names = |k: &str| -> Result<Vec<String>, ApiError> {
        match b.get(k) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()),
            Some(_) => Err(ApiError::invalid(format!("{k} must be a list"))),
        }
    };
    let skip = names("policyNamesToSkip")?;
    let mut policies: Vec<(String, std::sync::Arc<sekisho_policy::Policy>)> = identity
        .policies
        .iter()
        .filter(|(n, _)| !skip.contains(n))
        .cloned()
        .collect();
    for n in names("policyNamesToAdd")? {
        let p = state.registry.get_policy(&call.account, &n)?;
        if let Some(d) = p.default_parsed() {
            policies.push((n, d));
        }
    }
    let mut ctx = ConnContext::default();
    ctx.client_id = client_id.map(sekisho_registry::ClientId::into_string);
    ctx.set_identity(&identity, &state.registry);
    let bound: Vec<_> = policies.iter().map(|(_, p)| p.bind(&ctx)).collect();
    let Some(Value::Array(infos)) = b.get("authInfos") else {
        return Err(ApiError::invalid("authInfos is required"));
    };
    if infos.is_empty() || infos.len() > 10 {
        return Err(ApiError::invalid("authInfos must have 1 to 10 entries"));
    }
    let mut results = Vec::new();
    for info in infos {
        let action_type = info.get("actionType").and_then(Value::as_str).unwrap_or("");
        let action = match action_type {
            "PUBLISH" => "iot:publish",
            "SUBSCRIBE" => "iot:subscribe",
            "RECEIVE" => "iot:receive",
            "CONNECT" => "iot:connect",
            other => {
                return Err(ApiError::invalid(format!(
                    "actionType {other:?} is not valid"
                )));
            }
        };
        let resources: Vec<&str> = info
            .get("resources")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if resources.is_empty() {
            return Err(ApiError::invalid(
                "each authInfo needs at least one resource",
            ));
        }
        let mut decision = Decision::Allowed;
        let (mut allow, mut deny) = (Vec::new(), Vec::new());
        for r in &resources {
            let e = explain(bound.iter(), action, r, &ctx);
            allow.extend(e.allowed_by);
            deny.extend(e.denied_by);
            decision = match (decision, e.decision) {
                (Decision::ExplicitDeny, _) | (_, Decision::ExplicitDeny) => Decision::ExplicitDeny,
                (Decision::ImplicitDeny, _) | (_, Decision::ImplicitDeny) => Decision::ImplicitDeny,
                _ => Decision::Allowed,
            };
        }
        allow.sort();
        allow.dedup();
        deny.sort();
        deny.dedup();
        let pol = |idx: &[usize]| -> Vec<Value> {
            idx.iter()
                .filter_map(|i| policies.get(*i))
                .map(|(n, _)| json!({"policyName": n, "policyArn": policy_arn(state, &call.account, n)}))
                .collect()
        };
        let implicit: Vec<Value> = if decision == Decision::ImplicitDeny {
            policies.iter().map(|(n, _)| json!({"policyName": n, "policyArn": policy_arn(state, &call.account, n)})).collect()
        } else {
            Vec::new()
        };
        results.push(json!({
            "authInfo": {"actionType": action_type, "resources": resources},
            "allowed": {"policies": pol(&allow)},
            "denied": {"implicitDeny": {"policies": implicit}, "explicitDeny": {"policies": pol(&deny)}},
            "authDecision": match decision {
                Decision::Allowed => "ALLOWED",
                Decision::ExplicitDeny => "EXPLICIT_DENY",
                Decision::ImplicitDeny => "IMPLICIT_DENY",
            },
            "missingContextValues": [],
        }));
    }
    // A certificate variable whose certificate could not be read would have decided as if
    // absent: no answer rather than a wrong one.
    if ctx.cert_unreadable() {
        return Err(ApiError::new(
            500,
            "InternalFailureException",
            "The certificate's fields could not be read",
        ));
    }
    Ok(json!({"authResults": results}))
}

#[cfg(test)]
mod route_tests {
    use super::*;

    fn call(method: Method, segments: Vec<String>) -> Call {
        Call {
            method,
            segments,
            query: vec![],
            headers: vec![],
            body: bytes::Bytes::new(),
            account: "123456789012".into(),
            caller: crate::Caller {
                account: "123456789012".into(),
                principal: IamPrincipal::Root,
                session_policy: None,
                temporary: false,
                expiration: None,
                access_key_id: "AKIA".into(),
                context: Default::default(),
                principal_id: "123456789012".into(),
                principal_arn: String::new(),
                from_get_session_token: false,
            },
            request: Default::default(),
        }
    }

    /// Every declared operation: its request finds exactly it (no two routes overlap), and the
    /// ARN it is authorized on names the very path label its handler reads (`seg(call, 1)`),
    /// whatever other labels say.
    #[test]
    fn every_route_authorizes_the_label_it_acts_on() {
        let registry = Registry::in_memory("us-east-1").unwrap();
        let state = ApiState {
            registry: std::sync::Arc::new(registry),
            broker: std::sync::Arc::new(sekisho_broker::Broker::new(Default::default())),
            device_ca: std::sync::Arc::new(
                sekisho_pki::Ca::generate("t", "t", time::OffsetDateTime::now_utc()).unwrap(),
            ),
            endpoints: crate::Endpoints {
                region: "us-east-1".into(),
                domain: "localhost".into(),
            },
            objects: None,
            functions: None,
            metrics_allow: vec![],
            oidc_keys: Default::default(),
            more_metrics: None,
        };
        let mut names = std::collections::BTreeSet::new();
        for r in ROUTES {
            let segments: Vec<String> = r
                .path
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    if *p == L {
                        format!("name{i}")
                    } else {
                        (*p).to_string()
                    }
                })
                .collect();
            let c = call(r.method.clone(), segments);
            let found = route(&c).unwrap();
            assert!(
                std::ptr::eq(found, r),
                "{} is shadowed by {}",
                r.operation,
                found.operation
            );
            match r.resource {
                Res::Any => assert_eq!(r.resource_arns(&state, &c).unwrap(), ["*"]),
                // Body resources are checked by the handlers' own tests (groups.rs e2e).
                Res::Body(_) => {}
                Res::Label(kind, i) => {
                    assert_eq!(
                        r.path[i], L,
                        "{}: the resource must come from a label",
                        r.operation
                    );
                    assert_eq!(i, 1, "{}: handlers act on seg(call, 1)", r.operation);
                    assert_eq!(
                        r.resource_arns(&state, &c).unwrap(),
                        [format!("arn:aws:iot:us-east-1:123456789012:{kind}/name1")],
                        "{}",
                        r.operation
                    );
                }
            }
            names.insert(r.operation);
        }
        assert!(names.len() >= 55, "{} operations declared", names.len());
        // Nothing else is served.
        assert!(
            route(&call(
                Method::GET,
                vec!["things".into(), "a".into(), "b".into()]
            ))
            .is_none()
        );
        assert!(route(&call(Method::PATCH, vec!["things".into()])).is_none());
    }
}
