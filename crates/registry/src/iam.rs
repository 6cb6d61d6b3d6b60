//! IAM identities of an account: users, roles (with trust policies), managed policies, user
//! access keys, and the temporary credentials STS issues.
//!
//! Policies are stored as given and parsed when read (identity policies with the IAM identity
//! dialect, trust policies with the trust dialect); a document that does not parse is refused
//! at write time, so reads cannot fail on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sekisho_policy::{Dialect, Policy};
use serde::{Deserialize, Serialize};

use crate::store::Kind;
use crate::*;

/// An IAM user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IamUser {
    /// Name.
    pub name: String,
    /// `AIDA...`.
    pub id: String,
    /// Path, `/` by default.
    pub path: String,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// Inline policies by name.
    pub inline: BTreeMap<String, String>,
    /// Attached managed policy ARNs.
    pub attached: BTreeSet<String>,
}

/// An IAM role.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IamRole {
    /// Name.
    pub name: String,
    /// `AROA...`.
    pub id: String,
    /// Path, `/` by default.
    pub path: String,
    /// Description.
    pub description: Option<String>,
    /// The trust policy (AssumeRolePolicyDocument).
    pub trust: String,
    /// The unique ids of the users and roles the trust policy named, as they were when it was
    /// written: as on AWS, a named principal that is deleted and re-created is not trusted
    /// (a name written before its entity existed trusts nobody).
    #[serde(default)]
    pub trust_ids: BTreeMap<String, String>,
    /// Most seconds a session may last (3600 to 43200).
    pub max_session: u32,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// Inline policies by name.
    pub inline: BTreeMap<String, String>,
    /// Attached managed policy ARNs.
    pub attached: BTreeSet<String>,
}

impl IamRole {
    /// Whether the trust policy lets the federated provider `provider` assume the role with a
    /// web identity (`sts:AssumeRoleWithWebIdentity`), given the provider's keys in `ctx`.
    pub fn trusts_federated(&self, provider: &str, ctx: &sekisho_policy::MapContext) -> bool {
        Policy::parse(&self.trust, Dialect::IamTrust)
            .map(|t| {
                sekisho_policy::decide_trust(
                    &t,
                    &sekisho_policy::Caller::Federated(provider),
                    "sts:assumerolewithwebidentity",
                    ctx,
                )
                .is_allowed()
            })
            .unwrap_or(false)
    }

    /// Whether the role's trust policy lets `service` (`iot.amazonaws.com`, ...) assume it,
    /// with the condition keys of `ctx`.
    pub fn trusts_service(&self, service: &str, ctx: &sekisho_policy::MapContext) -> bool {
        Policy::parse(&self.trust, Dialect::IamTrust)
            .map(|t| {
                sekisho_policy::decide_trust(
                    &t,
                    &sekisho_policy::Caller::Service(service),
                    "sts:assumerole",
                    ctx,
                )
                .is_allowed()
            })
            .unwrap_or(false)
    }
}

/// A customer managed policy (one version, `v1`, is kept).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManagedPolicy {
    /// Name.
    pub name: String,
    /// `ANPA...`.
    pub id: String,
    /// Path.
    pub path: String,
    /// Description.
    pub description: Option<String>,
    /// The document.
    pub document: String,
    /// Creation time, epoch seconds.
    pub created: f64,
}

/// Who a set of credentials stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IamPrincipal {
    /// The account's root.
    Root,
    /// An IAM user, by name.
    User(String),
    /// A session of a role (STS AssumeRole).
    Role {
        /// Role name.
        role: String,
        /// `RoleSessionName`.
        session: String,
    },
}

/// Temporary credentials issued by STS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// `ASIA...`.
    pub access_key_id: String,
    /// The secret.
    pub secret_access_key: String,
    /// The session token the caller must present.
    pub token: String,
    /// Account.
    pub account_id: String,
    /// Expiry, epoch seconds.
    pub expiration: f64,
    /// Who they stand for.
    pub principal: IamPrincipal,
    /// The session policy given to AssumeRole, if any.
    pub session_policy: Option<String>,
    /// Condition keys the session carries into policy evaluation (the credential provider's
    /// `credentials-iot:ThingName`, `credentials-iot:ThingTypeName`,
    /// `credentials-iot:AwsCertificateId`).
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    /// The unique id of the user or role (or the account id for the root) when the session
    /// was issued. A session is honoured only while its principal exists with this same id, so
    /// that deleting a role or user and creating another of the same name does not revive the
    /// old one's sessions. Sessions stored without it (before it existed) are not honoured.
    #[serde(default)]
    pub principal_id: Option<String>,
    /// Issued by GetSessionToken (without MFA): as on AWS, such credentials may not call IAM.
    #[serde(default)]
    pub from_get_session_token: bool,
    /// Issued for a token of an OpenID Connect provider: its name and creation time. The
    /// session holds only while that provider (not another registered since under the same
    /// name) stays registered.
    #[serde(default)]
    pub oidc_provider: Option<(String, f64)>,
}

/// Most unexpired STS sessions one account may hold (every session is kept in memory and on
/// disk); beyond it AssumeRole, GetSessionToken and the credential provider answer
/// LimitExceeded until some expire.
pub const MAX_SESSIONS_PER_ACCOUNT: usize = 200_000;

/// Longest session policy (AWS: 2,048 characters of plaintext).
pub const MAX_SESSION_POLICY_CHARS: usize = 2048;

/// The ARNs a trust policy names in `Principal` or `NotPrincipal` `AWS` entries, as parsed
/// (JSON escapes resolved).
pub fn trust_principal_arns(trust: &str) -> Vec<String> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(trust) else {
        return Vec::new();
    };
    let statements = match &doc["Statement"] {
        serde_json::Value::Array(v) => v.clone(),
        v => vec![v.clone()],
    };
    let mut arns = Vec::new();
    for st in &statements {
        for element in ["Principal", "NotPrincipal"] {
            match &st[element]["AWS"] {
                serde_json::Value::String(a) => arns.push(a.clone()),
                serde_json::Value::Array(v) => {
                    arns.extend(v.iter().filter_map(|a| a.as_str().map(str::to_owned)))
                }
                _ => {}
            }
        }
    }
    arns
}

/// The unique id of a principal as it exists now: the account id for the root, the user's or
/// role's id; `None` once it no longer exists.
fn principal_id(st: &State, account: &str, principal: &IamPrincipal) -> Option<String> {
    principal_entity(st, account, principal).map(|(id, _)| id)
}

/// The unique id and the IAM ARN (with its path) of the entity behind a principal: the
/// account root, the user, or the role of a role session.
fn principal_entity(
    st: &State,
    account: &str,
    principal: &IamPrincipal,
) -> Option<(String, String)> {
    let a = st.accounts.get(account)?;
    match principal {
        IamPrincipal::Root => Some((account.to_owned(), Registry::iam_arn(account, "root"))),
        IamPrincipal::User(u) => a.users.get(u).map(|u| {
            (
                u.id.clone(),
                Registry::iam_arn(account, &format!("user{}{}", u.path, u.name)),
            )
        }),
        IamPrincipal::Role { role, .. } => a.roles.get(role).map(|r| {
            (
                r.id.clone(),
                Registry::iam_arn(account, &format!("role{}{}", r.path, r.name)),
            )
        }),
    }
}

/// A verified caller's long-term or temporary credentials.
#[derive(Debug, Clone)]
pub struct Credential {
    /// Account.
    pub account_id: String,
    /// Secret for SigV4.
    pub secret_access_key: String,
    /// The session token that must accompany temporary credentials.
    pub token: Option<String>,
    /// Expiry of temporary credentials, epoch seconds.
    pub expiration: Option<f64>,
    /// Who they stand for.
    pub principal: IamPrincipal,
    /// Session policy (temporary credentials of AssumeRole).
    pub session_policy: Option<String>,
    /// Condition keys carried by the session.
    pub context: BTreeMap<String, String>,
    /// The unique id of the principal they stand for (user id, role id, or the account id
    /// for the root): a long-lived connection compares it to detect a re-created name.
    pub principal_id: String,
    /// The IAM ARN of that entity, with its path (for a role session, the role's ARN):
    /// `aws:PrincipalArn`.
    pub principal_arn: String,
    /// Issued by GetSessionToken: may not call IAM.
    pub from_get_session_token: bool,
}

/// Most seconds STS credentials may last without a role (GetSessionToken).
pub const MAX_SESSION_TOKEN_SECONDS: u32 = 129_600;

fn check_policy(doc: &str, dialect: Dialect) -> Result<()> {
    Policy::parse(doc, dialect)
        .map(|_| ())
        .map_err(|e| RegistryError::MalformedPolicy(e.to_string()))
}

/// An IAM path: `/` by default; otherwise `/.../`, at most 512 characters of printable ASCII
/// (IAM's rule), so that every ARN built from it is the one IAM would build.
fn iam_path(path: Option<&str>) -> Result<String> {
    let p = path.unwrap_or("/");
    if p.len() <= 512
        && p.starts_with('/')
        && p.ends_with('/')
        && p.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        Ok(p.to_owned())
    } else {
        Err(RegistryError::InvalidRequest(format!(
            "The specified value for path is invalid: {p:?}. It must begin and end with / and contain only printable ASCII characters."
        )))
    }
}

fn iam_name(what: &str, name: &str, max: usize) -> Result<()> {
    check_name(what, name, max, |c| {
        c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)
    })
}

fn no_such(what: &str, name: &str) -> RegistryError {
    RegistryError::NotFound(format!("The {what} with name {name} cannot be found."))
}

fn exists(what: &str, name: &str) -> RegistryError {
    RegistryError::AlreadyExists {
        message: format!("{what} with name {name} already exists."),
        resource_id: name.to_owned(),
        resource_arn: String::new(),
    }
}

const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

impl Registry {
    /// `arn:aws:iam::<account>:<resource>`.
    pub fn iam_arn(account: &str, resource: &str) -> String {
        format!("arn:aws:iam::{account}:{resource}")
    }

    /// CreateUser.
    pub fn create_user(&self, account: &str, name: &str, path: Option<&str>) -> Result<IamUser> {
        iam_name("UserName", name, 64)?;
        self.write(account, |a, tx| {
            if a.users.contains_key(name) {
                return Err(exists("User", name));
            }
            let u = IamUser {
                name: name.to_owned(),
                id: format!("AIDA{}", random_string(ID_ALPHABET, 17)),
                path: iam_path(path)?,
                created: now_secs(),
                inline: BTreeMap::new(),
                attached: BTreeSet::new(),
            };
            tx.put(Kind::IamUser, name, &u)?;
            a.users.insert(name.to_owned(), u.clone());
            Ok(u)
        })
    }

    /// GetUser.
    pub fn get_user(&self, account: &str, name: &str) -> Result<IamUser> {
        self.read(account, |a| {
            a.users
                .get(name)
                .cloned()
                .ok_or_else(|| no_such("user", name))
        })
    }

    /// ListUsers.
    pub fn list_users(&self, account: &str) -> Result<Vec<IamUser>> {
        self.read(account, |a| Ok(a.users.values().cloned().collect()))
    }

    /// DeleteUser: refused while it has access keys or policies (AWS's DeleteConflict).
    pub fn delete_user(&self, account: &str, name: &str) -> Result<()> {
        let has_keys = self.read_state(|st| {
            st.access_keys
                .values()
                .any(|k| k.account_id == account && k.user.as_deref() == Some(name))
        });
        self.write(account, |a, tx| {
            let u = a.users.get(name).ok_or_else(|| no_such("user", name))?;
            if has_keys || !u.inline.is_empty() || !u.attached.is_empty() {
                return Err(RegistryError::DeleteConflict(
                    "Cannot delete entity, must delete access keys and policies first.".into(),
                ));
            }
            tx.delete(Kind::IamUser, name);
            tx.bump();
            a.users.remove(name);
            Ok(())
        })
    }

    /// CreateAccessKey for a user (or the root when `user` is `None`).
    pub fn create_access_key(&self, account: &str, user: Option<&str>) -> Result<AccessKey> {
        if let Some(u) = user {
            self.get_user(account, u)?;
            let n = self.read_state(|st| {
                st.access_keys
                    .values()
                    .filter(|k| k.account_id == account && k.user.as_deref() == Some(u))
                    .count()
            });
            if n >= 2 {
                return Err(RegistryError::LimitExceeded(
                    "Cannot exceed quota for AccessKeysPerUser: 2".into(),
                ));
            }
        }
        let key = AccessKey {
            access_key_id: format!("AKIA{}", random_string(UPPER_ALNUM, 16)),
            secret_access_key: random_string(SECRET, 40),
            account_id: account.to_owned(),
            status: "Active".into(),
            created: now_secs(),
            user: user.map(str::to_owned),
        };
        self.write_global(account, |st, tx| {
            tx.put(Kind::AccessKey, &key.access_key_id, &key)?;
            st.access_keys
                .insert(key.access_key_id.clone(), key.clone());
            Ok(key.clone())
        })
    }

    /// The access keys of a user (or the root).
    pub fn list_access_keys(&self, account: &str, user: Option<&str>) -> Result<Vec<AccessKey>> {
        if let Some(u) = user {
            self.get_user(account, u)?;
        }
        Ok(self.read_state(|st| {
            let mut v: Vec<AccessKey> = st
                .access_keys
                .values()
                .filter(|k| k.account_id == account && k.user.as_deref() == user)
                .cloned()
                .collect();
            v.sort_by(|a, b| a.created.total_cmp(&b.created));
            v
        }))
    }

    fn own_key<'a>(
        st: &'a mut State,
        account: &str,
        user: Option<&str>,
        id: &str,
    ) -> Result<&'a mut AccessKey> {
        match st.access_keys.get_mut(id) {
            Some(k) if k.account_id == account && k.user.as_deref() == user => Ok(k),
            _ => Err(RegistryError::NotFound(format!(
                "The Access Key with id {id} cannot be found."
            ))),
        }
    }

    /// UpdateAccessKey (`Active` / `Inactive`).
    pub fn update_access_key(
        &self,
        account: &str,
        user: Option<&str>,
        id: &str,
        status: &str,
    ) -> Result<()> {
        if status != "Active" && status != "Inactive" {
            return Err(RegistryError::InvalidRequest(format!(
                "Status {status:?} is not valid: Active or Inactive"
            )));
        }
        self.write_global(account, |st, tx| {
            let k = Self::own_key(st, account, user, id)?;
            k.status = status.to_owned();
            let k = k.clone();
            tx.put(Kind::AccessKey, id, &k)?;
            // Connections signed with this key re-check it.
            tx.bump();
            Ok(())
        })
    }

    /// DeleteAccessKey.
    pub fn delete_access_key(&self, account: &str, user: Option<&str>, id: &str) -> Result<()> {
        self.write_global(account, |st, tx| {
            Self::own_key(st, account, user, id)?;
            tx.delete(Kind::AccessKey, id);
            st.access_keys.remove(id);
            tx.bump();
            Ok(())
        })
    }

    /// CreateRole.
    pub fn create_role(
        &self,
        account: &str,
        name: &str,
        path: Option<&str>,
        trust: &str,
        description: Option<&str>,
        max_session: Option<u32>,
    ) -> Result<IamRole> {
        iam_name("RoleName", name, 64)?;
        check_policy(trust, Dialect::IamTrust)?;
        let max_session = check_max_session(max_session.unwrap_or(3600))?;
        let trust_ids = self.principal_ids(trust);
        self.write(account, |a, tx| {
            if a.roles.contains_key(name) {
                return Err(exists("Role", name));
            }
            let r = IamRole {
                name: name.to_owned(),
                id: format!("AROA{}", random_string(ID_ALPHABET, 17)),
                path: iam_path(path)?,
                description: description.map(str::to_owned),
                trust: trust.to_owned(),
                trust_ids: trust_ids.clone(),
                max_session,
                created: now_secs(),
                inline: BTreeMap::new(),
                attached: BTreeSet::new(),
            };
            tx.put(Kind::IamRole, name, &r)?;
            a.roles.insert(name.to_owned(), r.clone());
            Ok(r)
        })
    }

    /// The unique ids of the IAM users and roles a trust policy names by ARN (in any account
    /// of this registry), as they exist now.
    fn principal_ids(&self, trust: &str) -> BTreeMap<String, String> {
        let arns = trust_principal_arns(trust);
        self.read_state(|st| {
            arns.into_iter()
                .filter_map(|arn| {
                    let (acct, rest) = arn.strip_prefix("arn:aws:iam::")?.split_once(':')?;
                    let a = st.accounts.get(acct)?;
                    let name = rest.rsplit('/').next()?;
                    let id = if rest.starts_with("user/") {
                        a.users
                            .get(name)
                            .filter(|u| format!("user{}{}", u.path, u.name) == rest)?
                            .id
                            .clone()
                    } else if rest.starts_with("role/") {
                        a.roles
                            .get(name)
                            .filter(|r| format!("role{}{}", r.path, r.name) == rest)?
                            .id
                            .clone()
                    } else {
                        return None;
                    };
                    Some((arn, id))
                })
                .collect()
        })
    }

    /// GetRole.
    pub fn get_role(&self, account: &str, name: &str) -> Result<IamRole> {
        self.read(account, |a| {
            a.roles
                .get(name)
                .cloned()
                .ok_or_else(|| no_such("role", name))
        })
    }

    /// ListRoles.
    pub fn list_roles(&self, account: &str) -> Result<Vec<IamRole>> {
        self.read(account, |a| Ok(a.roles.values().cloned().collect()))
    }

    /// Changes a role (UpdateAssumeRolePolicy, UpdateRole).
    pub fn update_role(
        &self,
        account: &str,
        name: &str,
        trust: Option<&str>,
        description: Option<&str>,
        max_session: Option<u32>,
    ) -> Result<()> {
        if let Some(t) = trust {
            check_policy(t, Dialect::IamTrust)?;
        }
        let max_session = max_session.map(check_max_session).transpose()?;
        let trust_ids = trust.map(|t| self.principal_ids(t));
        self.write(account, |a, tx| {
            let r = a.roles.get_mut(name).ok_or_else(|| no_such("role", name))?;
            let mut next = r.clone();
            if let Some(t) = trust {
                next.trust = t.to_owned();
            }
            if let Some(ids) = trust_ids.clone() {
                next.trust_ids = ids;
            }
            if let Some(d) = description {
                next.description = Some(d.to_owned());
            }
            if let Some(m) = max_session {
                next.max_session = m;
            }
            tx.put(Kind::IamRole, name, &next)?;
            tx.bump();
            *r = next;
            Ok(())
        })
    }

    /// DeleteRole: refused while policies are attached or embedded.
    pub fn delete_role(&self, account: &str, name: &str) -> Result<()> {
        self.write(account, |a, tx| {
            let r = a.roles.get(name).ok_or_else(|| no_such("role", name))?;
            if !r.inline.is_empty() || !r.attached.is_empty() {
                return Err(RegistryError::DeleteConflict(
                    "Cannot delete entity, must delete policies first.".into(),
                ));
            }
            tx.delete(Kind::IamRole, name);
            tx.bump();
            a.roles.remove(name);
            Ok(())
        })
    }

    /// PutUserPolicy / PutRolePolicy (`role` selects which).
    pub fn put_inline_policy(
        &self,
        account: &str,
        role: bool,
        owner: &str,
        policy: &str,
        document: &str,
    ) -> Result<()> {
        iam_name("PolicyName", policy, 128)?;
        check_policy(document, Dialect::IamIdentity)?;
        self.write(account, |a, tx| {
            update_owner(a, tx, role, owner, |inline, _| {
                inline.insert(policy.to_owned(), document.to_owned());
                Ok(())
            })
        })
    }

    /// GetRolePolicy / GetUserPolicy.
    pub fn get_inline_policy(
        &self,
        account: &str,
        role: bool,
        owner: &str,
        policy: &str,
    ) -> Result<String> {
        self.read(account, |a| {
            let inline = if role {
                &a.roles
                    .get(owner)
                    .ok_or_else(|| no_such("role", owner))?
                    .inline
            } else {
                &a.users
                    .get(owner)
                    .ok_or_else(|| no_such("user", owner))?
                    .inline
            };
            inline.get(policy).cloned().ok_or_else(|| {
                RegistryError::NotFound(format!(
                    "The {} policy with name {policy} cannot be found.",
                    if role { "role" } else { "user" }
                ))
            })
        })
    }

    /// DeleteRolePolicy / DeleteUserPolicy.
    pub fn delete_inline_policy(
        &self,
        account: &str,
        role: bool,
        owner: &str,
        policy: &str,
    ) -> Result<()> {
        self.write(account, |a, tx| {
            update_owner(a, tx, role, owner, |inline, _| {
                inline.remove(policy).map(|_| ()).ok_or_else(|| {
                    RegistryError::NotFound(format!(
                        "The {} policy with name {policy} cannot be found.",
                        if role { "role" } else { "user" }
                    ))
                })
            })
        })
    }

    /// CreatePolicy (customer managed).
    pub fn create_managed_policy(
        &self,
        account: &str,
        name: &str,
        path: Option<&str>,
        document: &str,
        description: Option<&str>,
    ) -> Result<ManagedPolicy> {
        iam_name("PolicyName", name, 128)?;
        check_policy(document, Dialect::IamIdentity)?;
        self.write(account, |a, tx| {
            if a.managed_policies.contains_key(name) {
                return Err(exists("A policy", name));
            }
            let p = ManagedPolicy {
                name: name.to_owned(),
                id: format!("ANPA{}", random_string(ID_ALPHABET, 17)),
                path: iam_path(path)?,
                description: description.map(str::to_owned),
                document: document.to_owned(),
                created: now_secs(),
            };
            tx.put(Kind::ManagedPolicy, name, &p)?;
            a.managed_policies.insert(name.to_owned(), p.clone());
            Ok(p)
        })
    }

    /// The managed policy of this account with `arn`, and how many identities it is attached to.
    pub fn get_managed_policy(&self, account: &str, arn: &str) -> Result<(ManagedPolicy, usize)> {
        self.read(account, |a| {
            let p = managed_by_arn(a, account, arn)?;
            let n = a
                .users
                .values()
                .filter(|u| u.attached.contains(arn))
                .count()
                + a.roles
                    .values()
                    .filter(|r| r.attached.contains(arn))
                    .count();
            Ok((p.clone(), n))
        })
    }

    /// DeletePolicy: refused while attached.
    pub fn delete_managed_policy(&self, account: &str, arn: &str) -> Result<()> {
        let (p, n) = self.get_managed_policy(account, arn)?;
        if n > 0 {
            return Err(RegistryError::DeleteConflict(
                "Cannot delete a policy attached to entities.".into(),
            ));
        }
        self.write(account, |a, tx| {
            tx.delete(Kind::ManagedPolicy, &p.name);
            a.managed_policies.remove(&p.name);
            Ok(())
        })
    }

    /// AttachUserPolicy / AttachRolePolicy / DetachRolePolicy.
    pub fn set_attached(
        &self,
        account: &str,
        role: bool,
        owner: &str,
        arn: &str,
        attach: bool,
    ) -> Result<()> {
        self.write(account, |a, tx| {
            managed_by_arn(a, account, arn)?;
            update_owner(a, tx, role, owner, |_, attached| {
                if attach {
                    attached.insert(arn.to_owned());
                    Ok(())
                } else if attached.remove(arn) {
                    Ok(())
                } else {
                    Err(RegistryError::NotFound(format!(
                        "Policy {arn} was not found."
                    )))
                }
            })
        })
    }

    /// Issues temporary credentials (STS).
    pub fn create_session(
        &self,
        account: &str,
        principal: IamPrincipal,
        seconds: u32,
        session_policy: Option<&str>,
    ) -> Result<Session> {
        self.create_session_with(account, principal, seconds, session_policy, BTreeMap::new())
    }

    /// GetSessionToken: temporary credentials of a user or the root, which may not call IAM.
    pub fn create_session_token(
        &self,
        account: &str,
        principal: IamPrincipal,
        seconds: u32,
    ) -> Result<Session> {
        self.create_session_inner(
            account,
            principal,
            seconds,
            None,
            BTreeMap::new(),
            true,
            None,
        )
    }

    /// Issues temporary credentials that carry condition keys (the credential provider).
    pub fn create_session_with(
        &self,
        account: &str,
        principal: IamPrincipal,
        seconds: u32,
        session_policy: Option<&str>,
        context: BTreeMap<String, String>,
    ) -> Result<Session> {
        self.create_web_identity_session(account, principal, seconds, session_policy, context, None)
    }

    /// A role session for a token `provider` vouched for (`None`: an ordinary session) (AssumeRoleWithWebIdentity, or a
    /// Cognito identity of that provider's user): it ends when the provider is deleted.
    pub fn create_web_identity_session(
        &self,
        account: &str,
        principal: IamPrincipal,
        seconds: u32,
        session_policy: Option<&str>,
        context: BTreeMap<String, String>,
        provider: Option<&crate::OidcProvider>,
    ) -> Result<Session> {
        self.create_session_inner(
            account,
            principal,
            seconds,
            session_policy,
            context,
            false,
            provider.map(|p| (p.name.clone(), p.created)),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn create_session_inner(
        &self,
        account: &str,
        principal: IamPrincipal,
        seconds: u32,
        session_policy: Option<&str>,
        context: BTreeMap<String, String>,
        from_get_session_token: bool,
        oidc_provider: Option<(String, f64)>,
    ) -> Result<Session> {
        if let Some(p) = session_policy {
            check_policy(p, Dialect::IamIdentity)?;
        }
        let s = Session {
            access_key_id: format!("ASIA{}", random_string(UPPER_ALNUM, 16)),
            secret_access_key: random_string(SECRET, 40),
            token: random_string(SECRET, 356),
            account_id: account.to_owned(),
            expiration: now_secs() + f64::from(seconds),
            principal,
            session_policy: session_policy.map(str::to_owned),
            context,
            principal_id: None,
            from_get_session_token,
            oidc_provider,
        };
        if session_policy.is_some_and(|p| p.chars().count() > MAX_SESSION_POLICY_CHARS) {
            return Err(RegistryError::InvalidRequest(format!(
                "1 validation error detected: Value at 'policy' failed to satisfy constraint: Member must have length less than or equal to {MAX_SESSION_POLICY_CHARS}"
            )));
        }
        self.write_global(account, |st, tx| {
            let mut s = s.clone();
            s.principal_id = Some(principal_id(st, account, &s.principal).ok_or_else(|| {
                RegistryError::NotFound("The principal of the session no longer exists".into())
            })?);
            // Expired sessions are swept as new ones are issued.
            let now = now_secs();
            let expired: Vec<String> = if now - st.sessions_swept >= 1.0 {
                st.sessions_swept = now;
                st.sessions
                    .values()
                    .filter(|x| x.expiration < now)
                    .map(|x| x.access_key_id.clone())
                    .collect()
            } else {
                Vec::new()
            };
            for k in expired {
                if let Some(old) = st.sessions.remove(&k) {
                    tx.ops.push(crate::store::Op::Delete {
                        kind: Kind::Session,
                        account: old.account_id,
                        key: k,
                    });
                }
            }
            // (One account can hold the most only when all together hold as many: the walk
            // is needed only then.)
            if st.sessions.len() >= MAX_SESSIONS_PER_ACCOUNT
                && st
                    .sessions
                    .values()
                    .filter(|x| x.account_id == account && x.expiration >= now)
                    .count()
                    >= MAX_SESSIONS_PER_ACCOUNT
            {
                return Err(RegistryError::LimitExceeded(format!(
                    "The account holds {MAX_SESSIONS_PER_ACCOUNT} unexpired sessions, the most it may"
                )));
            }
            tx.put(Kind::Session, &s.access_key_id, &s)?;
            st.sessions.insert(s.access_key_id.clone(), s.clone());
            Ok(s.clone())
        })
    }

    /// The credentials behind an access key id: long-term keys (root or user) or an STS
    /// session (with its token and expiry; expired sessions are still returned, so that the
    /// caller can say `ExpiredToken`).
    pub fn credential(&self, access_key_id: &str) -> Option<Credential> {
        self.read_state(|st| {
            if let Some(k) = st.access_keys.get(access_key_id) {
                if k.status != "Active" {
                    return None;
                }
                let principal = match &k.user {
                    Some(u) => IamPrincipal::User(u.clone()),
                    None => IamPrincipal::Root,
                };
                let (principal_id, principal_arn) =
                    principal_entity(st, &k.account_id, &principal)?;
                return Some(Credential {
                    account_id: k.account_id.clone(),
                    secret_access_key: k.secret_access_key.clone(),
                    token: None,
                    expiration: None,
                    principal,
                    session_policy: None,
                    context: BTreeMap::new(),
                    principal_id,
                    principal_arn,
                    from_get_session_token: false,
                });
            }
            let s = st.sessions.get(access_key_id)?;
            // The principal must still be the one the session was issued to.
            let (now_id, principal_arn) = principal_entity(st, &s.account_id, &s.principal)?;
            if s.principal_id.as_deref() != Some(now_id.as_str()) {
                return None;
            }
            // A Cognito identity's session holds only while the identity exists (a deleted
            // identity or pool takes its credentials with it, on every surface).
            if let Some(id) = s.context.get("cognito-identity.amazonaws.com:sub")
                && !st
                    .accounts
                    .get(s.account_id.as_str())
                    .is_some_and(|a| a.cognito_identities.contains_key(id))
            {
                return None;
            }
            // Likewise a session an OpenID Connect provider vouched for, while that provider
            // (registered at that time) is.
            if let Some((name, created)) = &s.oidc_provider
                && !st
                    .accounts
                    .get(s.account_id.as_str())
                    .and_then(|a| a.oidc_providers.get(name))
                    .is_some_and(|p| p.created == *created)
            {
                return None;
            }
            Some(Credential {
                account_id: s.account_id.clone(),
                secret_access_key: s.secret_access_key.clone(),
                token: Some(s.token.clone()),
                expiration: Some(s.expiration),
                principal: s.principal.clone(),
                session_policy: s.session_policy.clone(),
                context: s.context.clone(),
                principal_id: now_id,
                principal_arn,
                from_get_session_token: s.from_get_session_token,
            })
        })
    }

    /// The identity policies of a principal (inline, then attached), parsed. `None` when the
    /// principal no longer exists (a deleted user or role: its credentials are worthless).
    pub fn identity_policies(
        &self,
        account: &str,
        principal: &IamPrincipal,
    ) -> Option<Vec<Arc<Policy>>> {
        self.read(account, |a| {
            let (inline, attached) = match principal {
                IamPrincipal::Root => return Ok(Some(Vec::new())),
                IamPrincipal::User(u) => match a.users.get(u) {
                    Some(u) => (&u.inline, &u.attached),
                    None => return Ok(None),
                },
                IamPrincipal::Role { role, .. } => match a.roles.get(role) {
                    Some(r) => (&r.inline, &r.attached),
                    None => return Ok(None),
                },
            };
            let docs = inline
                .values()
                .cloned()
                .chain(attached.iter().filter_map(|arn| {
                    managed_by_arn(a, account, arn)
                        .ok()
                        .map(|p| p.document.clone())
                }));
            Ok(Some(
                docs.filter_map(|d| Policy::parse(&d, Dialect::IamIdentity).ok().map(Arc::new))
                    .collect(),
            ))
        })
        .ok()
        .flatten()
    }
}

/// Changes the inline policies or attachments of a user or role (`role` selects which): `f`
/// works on a copy, which is persisted and then replaces the original, so that a refusal
/// leaves memory unchanged.
fn update_owner(
    a: &mut Account,
    tx: &mut Tx,
    role: bool,
    owner: &str,
    f: impl FnOnce(&mut BTreeMap<String, String>, &mut BTreeSet<String>) -> Result<()>,
) -> Result<()> {
    if role {
        let r = a
            .roles
            .get_mut(owner)
            .ok_or_else(|| no_such("role", owner))?;
        let mut next = r.clone();
        f(&mut next.inline, &mut next.attached)?;
        tx.put(Kind::IamRole, owner, &next)?;
        *r = next;
    } else {
        let u = a
            .users
            .get_mut(owner)
            .ok_or_else(|| no_such("user", owner))?;
        let mut next = u.clone();
        f(&mut next.inline, &mut next.attached)?;
        tx.put(Kind::IamUser, owner, &next)?;
        *u = next;
    }
    tx.bump();
    Ok(())
}

fn managed_by_arn<'a>(a: &'a Account, account: &str, arn: &str) -> Result<&'a ManagedPolicy> {
    let prefix = format!("arn:aws:iam::{account}:policy/");
    arn.strip_prefix(&prefix)
        .and_then(|rest| rest.rsplit('/').next())
        .and_then(|name| a.managed_policies.get(name))
        .filter(|p| Registry::iam_arn(account, &format!("policy{}{}", p.path, p.name)) == arn)
        .ok_or_else(|| {
            RegistryError::NotFound(format!("Policy {arn} does not exist or is not attachable."))
        })
}

fn check_max_session(s: u32) -> Result<u32> {
    if (3600..=43200).contains(&s) {
        Ok(s)
    } else {
        Err(RegistryError::InvalidRequest(format!(
            "The MaxSessionDuration {s} must be between 3600 and 43200 seconds"
        )))
    }
}
