//! IAM (`iam/2010-05-08`) and STS (`sts/2011-06-15`) over the query protocol: form-encoded
//! `Action=...` requests, XML responses. Every IAM call by a user or role session is
//! authorized with its IAM policies (`iam:<Action>`); GetCallerIdentity needs no permission.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use sekisho_policy::{Caller as TrustCaller, Decision, Dialect, Policy, decide_trust};
use sekisho_registry::{
    AccessKey, IamPrincipal, IamRole, IamUser, ManagedPolicy, Registry, RegistryError,
};

use crate::xml::{self, el, esc};
use crate::{ApiError, ApiState, Call, Caller, RequestContext, authorize};

/// Most seconds of an assumed-role session when the caller is itself a role session (role
/// chaining), as AWS limits it.
const CHAINED_MAX: u32 = 3600;

struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn req(&self, k: &str) -> Result<&str, ApiError> {
        self.get(k).filter(|v| !v.is_empty()).ok_or_else(|| {
            ApiError::new(400, "ValidationError", format!("1 validation error detected: Value null at '{k}' failed to satisfy constraint: Member must not be null"))
        })
    }

    fn int(&self, k: &str) -> Result<Option<u32>, ApiError> {
        self.get(k)
            .map(|v| {
                v.parse::<u32>().map_err(|_| {
                    ApiError::new(400, "ValidationError", format!("{k} must be an integer"))
                })
            })
            .transpose()
    }
}

/// IAM's names for registry refusals.
fn iam_error(e: RegistryError) -> ApiError {
    let (status, code) = match &e {
        RegistryError::NotFound(_) => (404, "NoSuchEntity"),
        RegistryError::AlreadyExists { .. } => (409, "EntityAlreadyExists"),
        RegistryError::MalformedPolicy(_) => (400, "MalformedPolicyDocument"),
        RegistryError::DeleteConflict(_) => (409, "DeleteConflict"),
        RegistryError::LimitExceeded(_) => (409, "LimitExceeded"),
        RegistryError::Internal(_) => (500, "ServiceFailure"),
        _ => (400, "ValidationError"),
    };
    ApiError::new(status, code, e.to_string())
}

/// Handles one IAM or STS request.
pub(crate) fn dispatch(
    state: &ApiState,
    caller: &Caller,
    service: &str,
    call: &Call,
) -> Response<Full<Bytes>> {
    let mut params = crate::parse_query(&String::from_utf8_lossy(&call.body));
    params.extend(call.query.iter().cloned());
    let params = Params(params);
    let ns = if service == "sts" {
        xml::STS_NS
    } else {
        xml::IAM_NS
    };
    let Some(action) = params.get("Action").map(str::to_owned) else {
        return xml::error_response(ns, &ApiError::new(400, "MissingAction", "Missing Action"));
    };
    let req = &call.request;
    // GetSessionToken credentials without MFA may not call IAM (AWS answers so).
    if service == "iam" && caller.from_get_session_token {
        return xml::error_response(
            ns,
            &ApiError::new(
                403,
                "InvalidClientTokenId",
                "The security token included in the request is invalid: GetSessionToken credentials cannot call IAM without MFA",
            ),
        );
    }
    let out = if service == "sts" {
        sts(state, caller, req, &action, &params)
    } else {
        iam(state, caller, req, &action, &params)
    };
    match out {
        Ok(inner) => xml::ok(ns, &action, &inner),
        Err(e) => {
            tracing::debug!(%service, %action, code = e.code, message = %e.message, "request refused");
            xml::error_response(ns, &e)
        }
    }
}

fn user_xml(account: &str, u: &IamUser) -> String {
    format!(
        "{}{}{}{}{}",
        el("Path", &u.path),
        el("UserName", &u.name),
        el("UserId", &u.id),
        el(
            "Arn",
            &Registry::iam_arn(account, &format!("user{}{}", u.path, u.name))
        ),
        el("CreateDate", &xml::time(u.created))
    )
}

fn role_xml(account: &str, r: &IamRole) -> String {
    let mut s = format!(
        "{}{}{}{}{}{}{}",
        el("Path", &r.path),
        el("RoleName", &r.name),
        el("RoleId", &r.id),
        el("Arn", &role_arn(account, r)),
        el("CreateDate", &xml::time(r.created)),
        el("AssumeRolePolicyDocument", &xml::policy_doc(&r.trust)),
        el("MaxSessionDuration", &r.max_session.to_string())
    );
    if let Some(d) = &r.description {
        s.push_str(&el("Description", d));
    }
    s
}

fn role_arn(account: &str, r: &IamRole) -> String {
    Registry::iam_arn(account, &format!("role{}{}", r.path, r.name))
}

fn policy_arn(account: &str, p: &ManagedPolicy) -> String {
    Registry::iam_arn(account, &format!("policy{}{}", p.path, p.name))
}

fn policy_xml(account: &str, p: &ManagedPolicy, attachments: usize) -> String {
    format!(
        "{}{}{}{}{}{}{}{}{}",
        el("PolicyName", &p.name),
        el("PolicyId", &p.id),
        el("Arn", &policy_arn(account, p)),
        el("Path", &p.path),
        el("DefaultVersionId", "v1"),
        el("AttachmentCount", &attachments.to_string()),
        el("IsAttachable", "true"),
        el("CreateDate", &xml::time(p.created)),
        el("UpdateDate", &xml::time(p.created))
    )
}

fn key_xml(k: &AccessKey, owner: &str, secret: bool) -> String {
    let mut s = format!(
        "{}{}{}",
        el("UserName", owner),
        el("AccessKeyId", &k.access_key_id),
        el("Status", &k.status)
    );
    if secret {
        s.push_str(&el("SecretAccessKey", &k.secret_access_key));
    }
    s.push_str(&el("CreateDate", &xml::time(k.created)));
    s
}

fn members(items: impl IntoIterator<Item = String>) -> String {
    items
        .into_iter()
        .map(|i| format!("<member>{i}</member>"))
        .collect()
}

/// What an IAM action acts on: the kind of entity and the one request parameter that names
/// it. The ARN that is authorized and the entity the handler changes are both derived from
/// that single parsed value ([`Target`]), so no other parameter of the request can steer
/// either (a request carrying both `UserName` and `RoleName` acts, and is authorized, only on
/// the one its action names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Names {
    /// `UserName`, required.
    User,
    /// `UserName`, or the calling user itself (access keys, GetUser).
    UserOrCaller,
    /// `RoleName`, required.
    Role,
    /// The ARN in this parameter, required (`PolicyArn`, `OpenIDConnectProviderArn`).
    Arn(&'static str),
    /// `PolicyName` (and `Path`) of a policy about to be created.
    NewPolicy,
    /// Nothing in particular (`*`): the account's lists.
    Nothing,
    /// `Url` of an OpenID Connect provider about to be registered.
    NewOidc,
}

/// Every IAM action served, with what it names. An action not listed is `InvalidAction`.
const IAM_ACTIONS: &[(&str, Names)] = &[
    ("CreateUser", Names::User),
    ("GetUser", Names::UserOrCaller),
    ("ListUsers", Names::Nothing),
    ("DeleteUser", Names::User),
    ("CreateAccessKey", Names::UserOrCaller),
    ("ListAccessKeys", Names::UserOrCaller),
    ("UpdateAccessKey", Names::UserOrCaller),
    ("DeleteAccessKey", Names::UserOrCaller),
    ("CreateRole", Names::Role),
    ("GetRole", Names::Role),
    ("ListRoles", Names::Nothing),
    ("DeleteRole", Names::Role),
    ("UpdateAssumeRolePolicy", Names::Role),
    ("UpdateRole", Names::Role),
    ("PutUserPolicy", Names::User),
    ("PutRolePolicy", Names::Role),
    ("GetUserPolicy", Names::User),
    ("GetRolePolicy", Names::Role),
    ("DeleteUserPolicy", Names::User),
    ("DeleteRolePolicy", Names::Role),
    ("ListUserPolicies", Names::User),
    ("ListRolePolicies", Names::Role),
    ("CreatePolicy", Names::NewPolicy),
    ("GetPolicy", Names::Arn("PolicyArn")),
    ("DeletePolicy", Names::Arn("PolicyArn")),
    ("AttachUserPolicy", Names::User),
    ("DetachUserPolicy", Names::User),
    ("AttachRolePolicy", Names::Role),
    ("DetachRolePolicy", Names::Role),
    ("ListAttachedUserPolicies", Names::User),
    ("ListAttachedRolePolicies", Names::Role),
    ("CreateOpenIDConnectProvider", Names::NewOidc),
    (
        "GetOpenIDConnectProvider",
        Names::Arn("OpenIDConnectProviderArn"),
    ),
    ("ListOpenIDConnectProviders", Names::Nothing),
    (
        "DeleteOpenIDConnectProvider",
        Names::Arn("OpenIDConnectProviderArn"),
    ),
    (
        "AddClientIDToOpenIDConnectProvider",
        Names::Arn("OpenIDConnectProviderArn"),
    ),
    (
        "RemoveClientIDFromOpenIDConnectProvider",
        Names::Arn("OpenIDConnectProviderArn"),
    ),
    (
        "UpdateOpenIDConnectProviderThumbprint",
        Names::Arn("OpenIDConnectProviderArn"),
    ),
];

/// The `Name.member.N` values of a list parameter, in order of N (1 up to 1,000).
fn list_param(p: &Params, name: &str) -> Vec<String> {
    let prefix = format!("{name}.member.");
    let mut v: Vec<(u32, String)> =
        p.0.iter()
            .filter_map(|(k, v)| {
                let n: u32 = k.strip_prefix(&prefix)?.parse().ok()?;
                (1..=1000).contains(&n).then(|| (n, v.clone()))
            })
            .collect();
    v.sort_by_key(|(n, _)| *n);
    v.into_iter().map(|(_, v)| v).collect()
}

fn oidc_xml(o: &sekisho_registry::OidcProvider) -> String {
    format!(
        "{}<ClientIDList>{}</ClientIDList><ThumbprintList>{}</ThumbprintList>{}<Tags></Tags>",
        el("Url", &o.name),
        members(o.client_ids.iter().map(|c| esc(c))),
        members(o.thumbprints.iter().map(|t| esc(t))),
        el("CreateDate", &xml::time(o.created)),
    )
}

/// The entity one IAM request acts on: its name (as the handler uses it) and its ARN (as it is
/// authorized), from the same parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// The user, role or policy ARN acted on; `None` for the account's root keys and lists.
    name: Option<String>,
    /// The ARN authorized.
    arn: String,
}

/// The path an entity's ARN carries: the existing entity's, else the request's `Path` (for a
/// create), else `/`.
fn arn_path(existing: Option<String>, p: &Params) -> String {
    existing
        .or_else(|| p.get("Path").map(str::to_owned))
        .filter(|x| x.starts_with('/') && x.ends_with('/'))
        .unwrap_or_else(|| "/".to_string())
}

/// What `action` acts on, derived from the one parameter that names it.
fn target(reg: &Registry, caller: &Caller, action: &str, p: &Params) -> Result<Target, ApiError> {
    let acct = caller.account.as_str();
    let Some(&(_, names)) = IAM_ACTIONS.iter().find(|(a, _)| *a == action) else {
        return Err(ApiError::new(
            400,
            "InvalidAction",
            format!("Could not find operation {action} for version 2010-05-08"),
        ));
    };
    // Names are bounded before anything is authorized (IAM's limits): the authorized ARN is
    // built from them.
    let bounded = |what: &str, v: &str, max: usize| {
        if v.chars().count() > max {
            Err(ApiError::new(
                400,
                "ValidationError",
                format!(
                    "1 validation error detected: Value at '{what}' failed to satisfy constraint: Member must have length less than or equal to {max}"
                ),
            ))
        } else {
            Ok(())
        }
    };
    for (what, max) in [
        ("UserName", 64),
        ("RoleName", 64),
        ("PolicyName", 128),
        ("PolicyArn", 2048),
        ("Path", 512),
        ("OpenIDConnectProviderArn", 2048),
        ("Url", 255),
    ] {
        if let Some(v) = p.get(what) {
            bounded(what, v, max)?;
        }
    }
    let user = |name: &str| {
        let path = arn_path(reg.get_user(acct, name).ok().map(|u| u.path), p);
        Target {
            name: Some(name.to_owned()),
            arn: Registry::iam_arn(acct, &format!("user{path}{name}")),
        }
    };
    Ok(match names {
        Names::User => user(p.req("UserName")?),
        Names::UserOrCaller => match (p.get("UserName"), &caller.principal) {
            (Some(u), _) if !u.is_empty() => user(u),
            (_, IamPrincipal::User(u)) => user(u),
            (_, IamPrincipal::Root) => Target {
                name: None,
                arn: Registry::iam_arn(acct, "root"),
            },
            (_, IamPrincipal::Role { .. }) => {
                return Err(ApiError::new(
                    400,
                    "ValidationError",
                    "Must specify userName when calling with non-User credentials",
                ));
            }
        },
        Names::Role => {
            let name = p.req("RoleName")?;
            let path = arn_path(reg.get_role(acct, name).ok().map(|r| r.path), p);
            Target {
                name: Some(name.to_owned()),
                arn: Registry::iam_arn(acct, &format!("role{path}{name}")),
            }
        }
        Names::Arn(param) => {
            let arn = p.req(param)?;
            Target {
                name: Some(arn.to_owned()),
                arn: arn.to_owned(),
            }
        }
        Names::NewPolicy => {
            let name = p.req("PolicyName")?;
            let path = arn_path(None, p);
            Target {
                name: Some(name.to_owned()),
                arn: Registry::iam_arn(acct, &format!("policy{path}{name}")),
            }
        }
        Names::Nothing => Target {
            name: None,
            arn: "*".to_string(),
        },
        Names::NewOidc => {
            let name = sekisho_registry::oidc_provider_name(p.req("Url")?).map_err(iam_error)?;
            let arn = sekisho_registry::oidc_provider_arn(acct, &name);
            Target {
                name: Some(arn.clone()),
                arn,
            }
        }
    })
}

/// IAM's refusal of an unauthorized call (code `AccessDenied`, as IAM and STS send it).
fn iam_denied(caller: &Caller, action: &str, resource: &str) -> ApiError {
    ApiError::new(
        403,
        "AccessDenied",
        format!(
            "User: {} is not authorized to perform: {action} on resource: {resource}",
            caller.arn()
        ),
    )
}

fn iam(
    state: &ApiState,
    caller: &Caller,
    req: &RequestContext,
    action: &str,
    p: &Params,
) -> Result<String, ApiError> {
    let acct = caller.account.as_str();
    let reg = &state.registry;
    let t = target(reg, caller, action, p)?;
    let iam_action = format!("iam:{action}");
    // The action's own condition keys: which managed policy is attached or detached.
    let mut extra = Vec::new();
    if (action.starts_with("Attach") || action.starts_with("Detach"))
        && let Some(arn) = p.get("PolicyArn")
    {
        extra.push(("iam:PolicyARN", arn.to_owned()));
    }
    crate::authorize_with(state, caller, req, &iam_action, &t.arn, &extra)
        .map_err(|_| iam_denied(caller, &iam_action, &t.arn))?;
    // The one name this action acts on; present for every action that names something.
    let name = || {
        t.name.as_deref().ok_or_else(|| {
            ApiError::new(
                400,
                "ValidationError",
                "Must specify userName when calling with non-User credentials",
            )
        })
    };
    let owner = t.name.as_deref();
    let e = iam_error;
    Ok(match action {
        "CreateUser" => {
            let u = reg.create_user(acct, name()?, p.get("Path")).map_err(e)?;
            format!("<User>{}</User>", user_xml(acct, &u))
        }
        "GetUser" => {
            let u = reg.get_user(acct, name()?).map_err(e)?;
            format!("<User>{}</User>", user_xml(acct, &u))
        }
        "ListUsers" => {
            let v = reg.list_users(acct).map_err(e)?;
            format!(
                "<Users>{}</Users><IsTruncated>false</IsTruncated>",
                members(v.iter().map(|u| user_xml(acct, u)))
            )
        }
        "DeleteUser" => {
            reg.delete_user(acct, name()?).map_err(e)?;
            String::new()
        }
        "CreateAccessKey" => {
            let k = reg.create_access_key(acct, owner).map_err(e)?;
            format!(
                "<AccessKey>{}</AccessKey>",
                key_xml(&k, owner.unwrap_or("root"), true)
            )
        }
        "ListAccessKeys" => {
            let v = reg.list_access_keys(acct, owner).map_err(e)?;
            format!(
                "<AccessKeyMetadata>{}</AccessKeyMetadata><IsTruncated>false</IsTruncated>",
                members(v.iter().map(|k| key_xml(k, owner.unwrap_or("root"), false)))
            )
        }
        "UpdateAccessKey" => {
            reg.update_access_key(acct, owner, p.req("AccessKeyId")?, p.req("Status")?)
                .map_err(e)?;
            String::new()
        }
        "DeleteAccessKey" => {
            reg.delete_access_key(acct, owner, p.req("AccessKeyId")?)
                .map_err(e)?;
            String::new()
        }
        "CreateRole" => {
            let r = reg
                .create_role(
                    acct,
                    name()?,
                    p.get("Path"),
                    p.req("AssumeRolePolicyDocument")?,
                    p.get("Description"),
                    p.int("MaxSessionDuration")?,
                )
                .map_err(e)?;
            format!("<Role>{}</Role>", role_xml(acct, &r))
        }
        "GetRole" => {
            let r = reg.get_role(acct, name()?).map_err(e)?;
            format!("<Role>{}</Role>", role_xml(acct, &r))
        }
        "ListRoles" => {
            let v = reg.list_roles(acct).map_err(e)?;
            format!(
                "<Roles>{}</Roles><IsTruncated>false</IsTruncated>",
                members(v.iter().map(|r| role_xml(acct, r)))
            )
        }
        "DeleteRole" => {
            reg.delete_role(acct, name()?).map_err(e)?;
            String::new()
        }
        "UpdateAssumeRolePolicy" => {
            reg.update_role(acct, name()?, Some(p.req("PolicyDocument")?), None, None)
                .map_err(e)?;
            String::new()
        }
        "UpdateRole" => {
            reg.update_role(
                acct,
                name()?,
                None,
                p.get("Description"),
                p.int("MaxSessionDuration")?,
            )
            .map_err(e)?;
            String::new()
        }
        "PutUserPolicy" | "PutRolePolicy" => {
            let role = action == "PutRolePolicy";
            reg.put_inline_policy(
                acct,
                role,
                name()?,
                p.req("PolicyName")?,
                p.req("PolicyDocument")?,
            )
            .map_err(e)?;
            String::new()
        }
        "GetUserPolicy" | "GetRolePolicy" => {
            let role = action == "GetRolePolicy";
            let (owner_key, owner) = (if role { "RoleName" } else { "UserName" }, name()?);
            let policy = p.req("PolicyName")?;
            let doc = reg
                .get_inline_policy(acct, role, owner, policy)
                .map_err(e)?;
            format!(
                "{}{}{}",
                el(owner_key, owner),
                el("PolicyName", policy),
                el("PolicyDocument", &xml::policy_doc(&doc))
            )
        }
        "DeleteUserPolicy" | "DeleteRolePolicy" => {
            let role = action == "DeleteRolePolicy";
            reg.delete_inline_policy(acct, role, name()?, p.req("PolicyName")?)
                .map_err(e)?;
            String::new()
        }
        "ListRolePolicies" | "ListUserPolicies" => {
            let role = action == "ListRolePolicies";
            let names: Vec<String> = if role {
                reg.get_role(acct, name()?)
                    .map_err(e)?
                    .inline
                    .into_keys()
                    .collect()
            } else {
                reg.get_user(acct, name()?)
                    .map_err(e)?
                    .inline
                    .into_keys()
                    .collect()
            };
            format!(
                "<PolicyNames>{}</PolicyNames><IsTruncated>false</IsTruncated>",
                members(names.iter().map(|n| esc(n)))
            )
        }
        "CreatePolicy" => {
            let pol = reg
                .create_managed_policy(
                    acct,
                    name()?,
                    p.get("Path"),
                    p.req("PolicyDocument")?,
                    p.get("Description"),
                )
                .map_err(e)?;
            format!("<Policy>{}</Policy>", policy_xml(acct, &pol, 0))
        }
        "GetPolicy" => {
            let (pol, n) = reg.get_managed_policy(acct, name()?).map_err(e)?;
            format!("<Policy>{}</Policy>", policy_xml(acct, &pol, n))
        }
        "DeletePolicy" => {
            reg.delete_managed_policy(acct, name()?).map_err(e)?;
            String::new()
        }
        "AttachUserPolicy" | "AttachRolePolicy" | "DetachRolePolicy" | "DetachUserPolicy" => {
            let role = action.ends_with("RolePolicy");
            reg.set_attached(
                acct,
                role,
                name()?,
                p.req("PolicyArn")?,
                action.starts_with("Attach"),
            )
            .map_err(e)?;
            String::new()
        }
        "ListAttachedRolePolicies" | "ListAttachedUserPolicies" => {
            let arns: Vec<String> = if action == "ListAttachedRolePolicies" {
                reg.get_role(acct, name()?)
                    .map_err(e)?
                    .attached
                    .into_iter()
                    .collect()
            } else {
                reg.get_user(acct, name()?)
                    .map_err(e)?
                    .attached
                    .into_iter()
                    .collect()
            };
            format!(
                "<AttachedPolicies>{}</AttachedPolicies><IsTruncated>false</IsTruncated>",
                members(arns.iter().map(|a| {
                    let name = a.rsplit('/').next().unwrap_or_default();
                    format!("{}{}", el("PolicyName", name), el("PolicyArn", a))
                }))
            )
        }
        "CreateOpenIDConnectProvider" => {
            if p.0.iter().any(|(k, _)| k.starts_with("Tags.")) {
                return Err(ApiError::new(
                    400,
                    "ValidationError",
                    "Tags on OpenID Connect providers are not supported here",
                ));
            }
            let o = reg
                .create_oidc_provider(
                    acct,
                    p.req("Url")?,
                    list_param(p, "ClientIDList"),
                    list_param(p, "ThumbprintList"),
                )
                .map_err(e)?;
            format!(
                "{}<Tags></Tags>",
                el("OpenIDConnectProviderArn", &o.arn(acct))
            )
        }
        "GetOpenIDConnectProvider" => oidc_xml(&reg.oidc_provider(acct, name()?).map_err(e)?),
        "ListOpenIDConnectProviders" => format!(
            "<OpenIDConnectProviderList>{}</OpenIDConnectProviderList>",
            members(
                reg.oidc_providers(acct)
                    .map_err(e)?
                    .iter()
                    .map(|o| el("Arn", &o.arn(acct)))
            )
        ),
        "DeleteOpenIDConnectProvider" => {
            reg.delete_oidc_provider(acct, name()?).map_err(e)?;
            String::new()
        }
        "AddClientIDToOpenIDConnectProvider" => {
            let id = p.req("ClientID")?.to_owned();
            reg.update_oidc_provider(acct, name()?, |o| o.client_ids.push(id.clone()))
                .map_err(e)?;
            String::new()
        }
        "RemoveClientIDFromOpenIDConnectProvider" => {
            let id = p.req("ClientID")?.to_owned();
            reg.update_oidc_provider(acct, name()?, |o| o.client_ids.retain(|c| *c != id))
                .map_err(e)?;
            String::new()
        }
        "UpdateOpenIDConnectProviderThumbprint" => {
            let t = list_param(p, "ThumbprintList");
            reg.update_oidc_provider(acct, name()?, |o| o.thumbprints = t.clone())
                .map_err(e)?;
            String::new()
        }
        other => {
            return Err(ApiError::new(
                400,
                "InvalidAction",
                format!("Could not find operation {other} for version 2010-05-08"),
            ));
        }
    })
}

/// STS AssumeRoleWithWebIdentity, which AWS serves unsigned: a Cognito pool's token for the
/// pool's role (the basic flow, `crate::cognito`). Other tokens are refused; so is `Policy`.
pub(crate) fn web_identity(
    state: &ApiState,
    params: Vec<(String, String)>,
    ip: std::net::IpAddr,
) -> Response<Full<Bytes>> {
    let p = Params(params);
    let out = (|| -> Result<String, ApiError> {
        let role_arn = p.req("RoleArn")?;
        let session = p.req("RoleSessionName")?;
        let token = p.req("WebIdentityToken")?;
        check_session_name(session)?;
        // Nothing else is taken: session policies (`Policy`, `PolicyArns.member.N.arn`) and
        // `ProviderId` would narrow or qualify the credentials, so they are refused rather than
        // ignored.
        if let Some((k, _)) = p.0.iter().find(|(k, _)| {
            !matches!(
                k.as_str(),
                "Action"
                    | "Version"
                    | "RoleArn"
                    | "RoleSessionName"
                    | "WebIdentityToken"
                    | "DurationSeconds"
            )
        }) {
            return Err(ApiError::new(
                400,
                "ValidationError",
                format!("{k} is not supported with web identities here"),
            ));
        }
        // A token of one of Sekisho's pools (its issuer Cognito's), or of an OpenID Connect
        // provider registered in the role's account.
        if crate::oidc::issuer(token).is_some_and(|i| i != crate::cognito::COGNITO_ISSUER) {
            let o = crate::oidc::assume_role(
                state,
                role_arn,
                session,
                token,
                p.int("DurationSeconds")?,
                sekisho_registry::now_secs() as i64,
                ip,
            )?;
            let account = &o.session.account_id;
            return Ok(format!(
                "{}{}<AssumedRoleUser>{}{}</AssumedRoleUser>{}{}",
                credentials_xml(&o.session),
                el("SubjectFromWebIdentityToken", &o.subject),
                el("AssumedRoleId", &format!("{}:{session}", o.role.1)),
                el(
                    "Arn",
                    &format!("arn:aws:sts::{account}:assumed-role/{}/{session}", o.role.0)
                ),
                el("Provider", &o.issuer),
                el("Audience", &o.audience),
            ));
        }
        let w = crate::cognito::assume_role_with_web_identity(
            state,
            role_arn,
            session,
            token,
            p.int("DurationSeconds")?,
            ip,
        )?;
        let account = &w.session.account_id;
        Ok(format!(
            "{}{}<AssumedRoleUser>{}{}</AssumedRoleUser>{}{}",
            credentials_xml(&w.session),
            el("SubjectFromWebIdentityToken", &w.identity),
            el("AssumedRoleId", &format!("{}:{session}", w.role.1)),
            el(
                "Arn",
                &format!("arn:aws:sts::{account}:assumed-role/{}/{session}", w.role.0)
            ),
            el("Provider", crate::cognito::COGNITO_PROVIDER),
            el("Audience", &w.pool),
        ))
    })();
    match out {
        Ok(inner) => xml::ok(xml::STS_NS, "AssumeRoleWithWebIdentity", &inner),
        Err(e) => {
            tracing::info!(code = e.code, message = %e.message, "AssumeRoleWithWebIdentity refused");
            xml::error_response(xml::STS_NS, &e)
        }
    }
}

/// A role session's name as STS takes it: 2 to 64 of `[\w+=,.@-]`.
fn check_session_name(session: &str) -> Result<(), ApiError> {
    if (2..=64).contains(&session.len())
        && session
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
    {
        Ok(())
    } else {
        Err(ApiError::new(
            400,
            "ValidationError",
            "RoleSessionName must be 2 to 64 characters of [\\w+=,.@-]",
        ))
    }
}

fn credentials_xml(s: &sekisho_registry::Session) -> String {
    format!(
        "<Credentials>{}{}{}{}</Credentials>",
        el("AccessKeyId", &s.access_key_id),
        el("SecretAccessKey", &s.secret_access_key),
        el("SessionToken", &s.token),
        el("Expiration", &xml::time(s.expiration))
    )
}

/// What an STS action acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StsNames {
    /// The caller's own identity or credentials (no IAM permission is needed, as on AWS).
    Caller,
    /// The role `RoleArn` names, exactly: `sts:AssumeRole` is authorized on that ARN, and the
    /// role whose ARN it is is the one assumed.
    RoleArn,
}

/// Every STS action served. An action not listed is `InvalidAction`.
const STS_ACTIONS: &[(&str, StsNames)] = &[
    ("GetCallerIdentity", StsNames::Caller),
    ("GetSessionToken", StsNames::Caller),
    ("AssumeRole", StsNames::RoleArn),
];

/// The account and role a `RoleArn` (`arn:aws:iam::<account>:role[/path]/<name>`) names:
/// only a role whose ARN is exactly this one, so the ARN authorized is the ARN of the role
/// assumed. `None` for a malformed ARN or one that names no role (answered as a denial:
/// nothing leaks across accounts).
fn assumed_role(reg: &Registry, role_arn: &str) -> Option<(String, IamRole)> {
    let (account, rest) = role_arn
        .strip_prefix("arn:aws:iam::")
        .and_then(|r| r.split_once(":role/"))?;
    let name = rest.rsplit('/').next().unwrap_or(rest);
    let role = reg.get_role(account, name).ok()?;
    (role_arn == self::role_arn(account, &role)).then(|| (account.to_owned(), role))
}

fn sts(
    state: &ApiState,
    caller: &Caller,
    req: &RequestContext,
    action: &str,
    p: &Params,
) -> Result<String, ApiError> {
    let reg = &state.registry;
    if !STS_ACTIONS.iter().any(|(a, _)| *a == action) {
        return Err(ApiError::new(
            400,
            "InvalidAction",
            format!("Could not find operation {action} for version 2011-06-15"),
        ));
    }
    match action {
        "GetCallerIdentity" => {
            let user_id = match &caller.principal {
                IamPrincipal::Root => caller.account.clone(),
                IamPrincipal::User(u) => reg
                    .get_user(&caller.account, u)
                    .map(|u| u.id)
                    .unwrap_or_default(),
                IamPrincipal::Role { role, session } => {
                    let id = reg
                        .get_role(&caller.account, role)
                        .map(|r| r.id)
                        .unwrap_or_default();
                    format!("{id}:{session}")
                }
            };
            Ok(format!(
                "{}{}{}",
                el("Arn", &caller.arn()),
                el("UserId", &user_id),
                el("Account", &caller.account)
            ))
        }
        "GetSessionToken" => {
            if caller.temporary {
                return Err(ApiError::new(
                    403,
                    "AccessDenied",
                    "Cannot call GetSessionToken with session credentials",
                ));
            }
            let secs = p.int("DurationSeconds")?.unwrap_or(43_200);
            let max = if caller.principal == IamPrincipal::Root {
                3600
            } else {
                sekisho_registry::MAX_SESSION_TOKEN_SECONDS
            };
            if !(900..=max).contains(&secs) {
                return Err(ApiError::new(
                    400,
                    "ValidationError",
                    format!("The requested DurationSeconds exceeds the allowed range 900 to {max}"),
                ));
            }
            let s = reg
                .create_session_token(&caller.account, caller.principal.clone(), secs)
                .map_err(iam_error)?;
            Ok(credentials_xml(&s))
        }
        "AssumeRole" => assume_role(state, caller, req, p),
        other => Err(ApiError::new(
            400,
            "InvalidAction",
            format!("Could not find operation {other} for version 2011-06-15"),
        )),
    }
}

fn assume_role(
    state: &ApiState,
    caller: &Caller,
    req: &RequestContext,
    p: &Params,
) -> Result<String, ApiError> {
    let reg = &state.registry;
    let role_arn = p.req("RoleArn")?;
    let session = p.req("RoleSessionName")?;
    check_session_name(session)?;
    let denied = || {
        ApiError::new(
            403,
            "AccessDenied",
            format!(
                "User: {} is not authorized to perform: sts:AssumeRole on resource: {role_arn}",
                caller.arn()
            ),
        )
    };
    if role_arn
        .strip_prefix("arn:aws:iam::")
        .and_then(|r| r.split_once(":role/"))
        .is_none()
    {
        return Err(ApiError::new(
            400,
            "ValidationError",
            format!("{role_arn} is not a role ARN"),
        ));
    }
    // A Cognito identity's credentials do not chain into other roles: the chained session would
    // shed what binds it to the identity (its IoT policies, its revocation with the identity).
    if caller
        .context
        .contains_key("cognito-identity.amazonaws.com:sub")
    {
        tracing::info!(caller = %caller.arn(), role = %role_arn, "AssumeRole with a Cognito identity's credentials refused");
        return Err(denied());
    }
    let (target_account, role) = assumed_role(reg, role_arn).ok_or_else(denied)?;
    let target_account = target_account.as_str();
    let caller_arn = caller.arn();
    let caller_role_arn = match &caller.principal {
        IamPrincipal::Role { role, .. } => reg
            .get_role(&caller.account, role)
            .ok()
            .map(|r| self::role_arn(&caller.account, &r)),
        _ => None,
    };
    // A trust policy that names this user or role by ARN names the entity that had that name
    // when the policy was written (its unique id), not a later one of the same name.
    let entity = &caller.principal_arn;
    let pinned = caller.principal == IamPrincipal::Root
        || match role.trust_ids.get(entity) {
            Some(id) => *id == caller.principal_id,
            None => !sekisho_registry::trust_principal_arns(&role.trust).contains(entity),
        };
    let (caller_arn, caller_role_arn) = if pinned {
        (caller_arn, caller_role_arn)
    } else {
        tracing::info!(caller = %caller_arn, role = %role_arn, "trust names a deleted or later principal of this name");
        (
            "arn:aws:iam::000000000000:deleted-principal".to_string(),
            None,
        )
    };
    let who = TrustCaller::Aws {
        account: &caller.account,
        arn: &caller_arn,
        role_arn: caller_role_arn.as_deref(),
    };
    let trust = Policy::parse(&role.trust, Dialect::IamTrust).map_err(|_| denied())?;
    // The trust policy sees the same condition keys as any other decision.
    let mut ctx = sekisho_policy::MapContext::new();
    for (k, v) in sekisho_auth::authn::context_keys(caller, req) {
        ctx.set(&k, v);
    }
    if let Some(x) = p.get("ExternalId") {
        ctx.set("sts:ExternalId", x);
    }
    if decide_trust(&trust, &who, "sts:assumerole", &ctx) != Decision::Allowed {
        return Err(denied());
    }
    // The caller's own policies must allow it too, unless the trust policy names this very
    // caller in its own account (a resource policy grants to a same-account principal directly).
    let named_directly = caller.account == target_account && {
        let exact = TrustCaller::Aws {
            account: "-",
            arn: &caller_arn,
            role_arn: caller_role_arn.as_deref(),
        };
        decide_trust(&trust, &exact, "sts:assumerole", &ctx) == Decision::Allowed
    };
    if !named_directly {
        authorize(state, caller, req, "sts:AssumeRole", role_arn).map_err(|_| denied())?;
    }
    let max = if caller.temporary && matches!(caller.principal, IamPrincipal::Role { .. }) {
        CHAINED_MAX.min(role.max_session)
    } else {
        role.max_session
    };
    let secs = p.int("DurationSeconds")?.unwrap_or(3600);
    if !(900..=max).contains(&secs) {
        return Err(ApiError::new(
            400,
            "ValidationError",
            "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
        ));
    }
    let s = reg
        .create_session(
            target_account,
            IamPrincipal::Role {
                role: role.name.clone(),
                session: session.to_owned(),
            },
            secs,
            p.get("Policy"),
        )
        .map_err(|e| match e {
            RegistryError::MalformedPolicy(m) => ApiError::new(400, "MalformedPolicyDocument", m),
            other => iam_error(other),
        })?;
    Ok(format!(
        "{}<AssumedRoleUser>{}{}</AssumedRoleUser><PackedPolicySize>{}</PackedPolicySize>",
        credentials_xml(&s),
        el("AssumedRoleId", &format!("{}:{session}", role.id)),
        el(
            "Arn",
            &format!(
                "arn:aws:sts::{target_account}:assumed-role/{}/{session}",
                role.name
            )
        ),
        p.get("Policy").map_or(0, |d| d.len() * 100 / 2048)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every declared IAM action is authorized on the very entity it acts on, whatever other
    /// naming parameters the request carries.
    #[test]
    fn every_action_authorizes_what_it_names_despite_conflicting_parameters() {
        let reg = Registry::in_memory("us-east-1").unwrap();
        let (info, _) = reg.create_account("a").unwrap();
        let acct = info.id.clone();
        reg.create_user(&acct, "alice", Some("/team/")).unwrap();
        let caller = Caller {
            account: acct.clone(),
            principal: IamPrincipal::User("mallory".into()),
            session_policy: None,
            temporary: false,
            expiration: None,
            access_key_id: "AKIAX".into(),
            context: Default::default(),
            principal_id: "AIDAX".into(),
            principal_arn: String::new(),
            from_get_session_token: false,
        };
        let carol = format!("arn:aws:iam::{acct}:policy/carol");
        let params = Params(vec![
            ("UserName".into(), "alice".into()),
            ("RoleName".into(), "bob".into()),
            ("PolicyArn".into(), carol.clone()),
            ("PolicyName".into(), "dave".into()),
            (
                "OpenIDConnectProviderArn".into(),
                format!("arn:aws:iam::{acct}:oidc-provider/idp.example/erin"),
            ),
            ("Url".into(), "https://IdP.example/frank/".into()),
        ]);
        for (action, names) in IAM_ACTIONS {
            let t = target(&reg, &caller, action, &params).unwrap();
            let (name, arn) = match names {
                Names::User | Names::UserOrCaller => (
                    "alice".to_string(),
                    format!("arn:aws:iam::{acct}:user/team/alice"),
                ),
                Names::Role => ("bob".to_string(), format!("arn:aws:iam::{acct}:role/bob")),
                Names::Arn("PolicyArn") => (carol.clone(), carol.clone()),
                Names::NewPolicy => (
                    "dave".to_string(),
                    format!("arn:aws:iam::{acct}:policy/dave"),
                ),
                Names::Arn(_) => {
                    let erin = format!("arn:aws:iam::{acct}:oidc-provider/idp.example/erin");
                    (erin.clone(), erin)
                }
                Names::NewOidc => {
                    let frank = format!("arn:aws:iam::{acct}:oidc-provider/idp.example/frank");
                    (frank.clone(), frank)
                }
                Names::Nothing => {
                    assert_eq!(
                        t,
                        Target {
                            name: None,
                            arn: "*".into()
                        },
                        "{action}"
                    );
                    continue;
                }
            };
            assert_eq!(
                t,
                Target {
                    name: Some(name),
                    arn
                },
                "{action}"
            );
        }
        // Without UserName, access-key actions act on the calling user, and are authorized so.
        let t = target(
            &reg,
            &caller,
            "CreateAccessKey",
            &Params(vec![("RoleName".into(), "bob".into())]),
        )
        .unwrap();
        assert_eq!(t.arn, format!("arn:aws:iam::{acct}:user/mallory"));
        assert_eq!(t.name.as_deref(), Some("mallory"));
        // An action not declared is refused before anything is authorized or done.
        let err = target(&reg, &caller, "CreateLoginProfile", &params).unwrap_err();
        assert_eq!(err.code, "InvalidAction");
    }

    /// AssumeRole authorizes the ARN of exactly the role it assumes: a `RoleArn` with another
    /// path, account or name assumes nothing, and `RoleName` plays no part.
    #[test]
    fn assume_role_acts_on_the_role_its_arn_names() {
        let reg = Registry::in_memory("us-east-1").unwrap();
        let (a, _) = reg.create_account("a").unwrap();
        let (b, _) = reg.create_account("b").unwrap();
        let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}"#;
        reg.create_role(&a.id, "ops", Some("/team/"), trust, None, None)
            .unwrap();
        reg.create_role(&b.id, "ops", None, trust, None, None)
            .unwrap();
        let declared: Vec<&str> = STS_ACTIONS.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            declared,
            ["GetCallerIdentity", "GetSessionToken", "AssumeRole"]
        );
        let arn_a = format!("arn:aws:iam::{}:role/team/ops", a.id);
        let (acct, role) = assumed_role(&reg, &arn_a).unwrap();
        assert_eq!(
            (acct.as_str(), role_arn(&acct, &role)),
            (a.id.as_str(), arn_a)
        );
        let arn_b = format!("arn:aws:iam::{}:role/ops", b.id);
        let (acct, role) = assumed_role(&reg, &arn_b).unwrap();
        assert_eq!(
            (acct.as_str(), role_arn(&acct, &role)),
            (b.id.as_str(), arn_b)
        );
        for wrong in [
            format!("arn:aws:iam::{}:role/ops", a.id),
            format!("arn:aws:iam::{}:role/other/ops", a.id),
            format!("arn:aws:iam::{}:role/team/ops", b.id),
            format!("arn:aws:iam::{}:role/team/ops2", a.id),
            format!("arn:aws:iam::{}:user/team/ops", a.id),
        ] {
            assert!(assumed_role(&reg, &wrong).is_none(), "{wrong}");
        }
    }
}
