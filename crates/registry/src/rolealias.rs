//! Role aliases: the names by which a certificate may trade itself for credentials of an IAM
//! role through the credential provider.

use serde::{Deserialize, Serialize};

use crate::store::Kind;
use crate::*;

/// Most role aliases per account (AWS's quota).
pub const MAX_ROLE_ALIASES: usize = 100;

/// A role alias.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoleAlias {
    /// Name.
    pub name: String,
    /// The IAM role's ARN.
    pub role_arn: String,
    /// Lifetime of the credentials it hands out (900 to 43,200 s).
    pub duration: u32,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// Last modification, epoch seconds.
    pub modified: f64,
}

fn check_duration(d: u32) -> Result<u32> {
    if (900..=43_200).contains(&d) {
        Ok(d)
    } else {
        Err(RegistryError::InvalidRequest(format!(
            "credentialDurationSeconds {d} must be between 900 and 43200"
        )))
    }
}

impl Registry {
    /// The role an ARN of this account names (`arn:aws:iam::<account>:role[/path]/<name>`).
    pub fn role_by_arn(&self, account: &str, arn: &str) -> Option<IamRole> {
        let rest = arn.strip_prefix(&format!("arn:aws:iam::{account}:role/"))?;
        let name = rest.rsplit('/').next()?;
        self.get_role(account, name)
            .ok()
            .filter(|r| Registry::iam_arn(account, &format!("role{}{}", r.path, r.name)) == arn)
    }

    fn check_alias_role(&self, account: &str, role_arn: &str, duration: u32) -> Result<()> {
        if !role_arn.starts_with("arn:aws:iam::") || !role_arn.contains(":role/") {
            return Err(RegistryError::InvalidRequest(format!(
                "roleArn {role_arn:?} is not an IAM role ARN"
            )));
        }
        if let Some(role) = self.role_by_arn(account, role_arn)
            && duration > role.max_session
        {
            return Err(RegistryError::InvalidRequest(
                "The requested CredentialDurationSeconds exceeds the MaxSessionDuration set for the role".into(),
            ));
        }
        Ok(())
    }

    /// CreateRoleAlias.
    pub fn create_role_alias(
        &self,
        account: &str,
        name: &str,
        role_arn: &str,
        duration: Option<u32>,
    ) -> Result<RoleAlias> {
        check_name("roleAlias", name, 128, |c| {
            c.is_ascii_alphanumeric() || "_=,@-".contains(c)
        })?;
        let duration = check_duration(duration.unwrap_or(3600))?;
        self.check_alias_role(account, role_arn, duration)?;
        let arn = self.arn(account, &format!("rolealias/{name}"));
        self.write(account, |a, tx| {
            if a.role_aliases.contains_key(name) {
                return Err(RegistryError::AlreadyExists {
                    message: format!("Role alias {name} already exists"),
                    resource_id: name.to_owned(),
                    resource_arn: arn.clone(),
                });
            }
            if a.role_aliases.len() >= MAX_ROLE_ALIASES {
                return Err(RegistryError::LimitExceeded(format!(
                    "Limit of {MAX_ROLE_ALIASES} role aliases per account reached"
                )));
            }
            let now = now_secs();
            let r = RoleAlias {
                name: name.to_owned(),
                role_arn: role_arn.to_owned(),
                duration,
                created: now,
                modified: now,
            };
            tx.put(Kind::RoleAlias, name, &r)?;
            a.role_aliases.insert(name.to_owned(), r.clone());
            Ok(r)
        })
    }

    /// DescribeRoleAlias.
    pub fn describe_role_alias(&self, account: &str, name: &str) -> Result<RoleAlias> {
        self.read(account, |a| {
            a.role_aliases
                .get(name)
                .cloned()
                .ok_or_else(|| RegistryError::NotFound(format!("Role alias {name} does not exist")))
        })
    }

    /// UpdateRoleAlias.
    pub fn update_role_alias(
        &self,
        account: &str,
        name: &str,
        role_arn: Option<&str>,
        duration: Option<u32>,
    ) -> Result<RoleAlias> {
        let cur = self.describe_role_alias(account, name)?;
        let role_arn = role_arn.unwrap_or(&cur.role_arn).to_owned();
        let duration = check_duration(duration.unwrap_or(cur.duration))?;
        self.check_alias_role(account, &role_arn, duration)?;
        self.write(account, |a, tx| {
            let r = a.role_aliases.get_mut(name).ok_or_else(|| {
                RegistryError::NotFound(format!("Role alias {name} does not exist"))
            })?;
            let mut next = r.clone();
            next.role_arn = role_arn.clone();
            next.duration = duration;
            next.modified = now_secs();
            tx.put(Kind::RoleAlias, name, &next)?;
            *r = next.clone();
            Ok(next)
        })
    }

    /// DeleteRoleAlias.
    pub fn delete_role_alias(&self, account: &str, name: &str) -> Result<()> {
        self.write(account, |a, tx| {
            if a.role_aliases.remove(name).is_none() {
                return Err(RegistryError::NotFound(format!(
                    "Role alias {name} does not exist"
                )));
            }
            tx.delete(Kind::RoleAlias, name);
            Ok(())
        })
    }

    /// ListRoleAliases, by creation date (descending unless `ascending`).
    pub fn list_role_aliases(
        &self,
        account: &str,
        ascending: bool,
        marker: Option<&str>,
        page_size: usize,
    ) -> Result<Page<String>> {
        self.read(account, |a| {
            page_by_creation(
                a.role_aliases.values(),
                |r| (r.created, r.name.as_str()),
                |r| r.name.clone(),
                ascending,
                marker,
                page_size,
            )
        })
    }
}
