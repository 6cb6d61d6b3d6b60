//! Custom authorizers: a function that decides who a device is from the token it presents, and
//! the keys its tokens are signed with. Keyed by name within an account; the account's default
//! authorizer is a name kept beside them.

use serde::{Deserialize, Serialize};

use crate::store::Kind;
use crate::*;

/// Authorizers an account may have (AWS's quota).
pub const MAX_AUTHORIZERS: usize = 10;

/// A custom authorizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Authorizer {
    /// Name.
    pub name: String,
    /// The function's ARN.
    pub function_arn: String,
    /// The header / query parameter / username query key that carries the token.
    pub token_key_name: Option<String>,
    /// Key name → public key PEM.
    pub signing_keys: BTreeMap<String, String>,
    /// ACTIVE (true) or INACTIVE.
    pub active: bool,
    /// Whether tokens go to the function unsigned (immutable).
    pub signing_disabled: bool,
    /// Whether HTTP results are cached for `refreshAfterInSeconds`.
    pub caching_for_http: bool,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// Last change.
    pub modified: f64,
}

/// A change (UpdateAuthorizer); `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct AuthorizerUpdate {
    /// The function's ARN.
    pub function_arn: Option<String>,
    /// Token key name.
    pub token_key_name: Option<String>,
    /// Public keys (whole).
    pub signing_keys: Option<BTreeMap<String, String>>,
    /// ACTIVE / INACTIVE.
    pub active: Option<bool>,
    /// Caching for HTTP.
    pub caching_for_http: Option<bool>,
}

fn not_found(name: &str) -> RegistryError {
    RegistryError::NotFound(format!("Authorizer {name} does not exist"))
}

const DEFAULT_KEY: &str = "";

impl Registry {
    /// The ARN of an authorizer.
    pub fn authorizer_arn(&self, account: &str, name: &str) -> String {
        self.arn(account, &format!("authorizer/{name}"))
    }

    /// CreateAuthorizer.
    pub fn create_authorizer(&self, account: &str, mut a: Authorizer) -> Result<Authorizer> {
        check_name("authorizerName", &a.name, 128, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '=' | ',' | '@' | '-')
        })?;
        a.created = now_secs();
        a.modified = a.created;
        let arn = self.authorizer_arn(account, &a.name);
        self.write(account, |acct, tx| {
            if acct.authorizers.contains_key(&a.name) {
                return Err(RegistryError::AlreadyExists {
                    message: format!("Authorizer {} already exists", a.name),
                    resource_id: a.name.clone(),
                    resource_arn: arn.clone(),
                });
            }
            if acct.authorizers.len() >= MAX_AUTHORIZERS {
                return Err(RegistryError::LimitExceeded(format!(
                    "An account can have at most {MAX_AUTHORIZERS} authorizers"
                )));
            }
            tx.put(Kind::Authorizer, &a.name, &a)?;
            acct.authorizers.insert(a.name.clone(), a.clone());
            Ok(a.clone())
        })
    }

    /// DescribeAuthorizer.
    pub fn authorizer(&self, account: &str, name: &str) -> Result<Authorizer> {
        self.read(account, |a| {
            a.authorizers
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(name))
        })
    }

    /// ListAuthorizers, in name order (or the reverse), optionally of one status.
    pub fn list_authorizers(
        &self,
        account: &str,
        active: Option<bool>,
        ascending: bool,
        marker: Option<&str>,
        max: usize,
    ) -> Result<Page<Authorizer>> {
        self.read(account, |a| {
            let mut items: Vec<(String, Authorizer)> = a
                .authorizers
                .values()
                .filter(|x| active.is_none_or(|s| s == x.active))
                .map(|x| (x.name.clone(), x.clone()))
                .collect();
            if !ascending {
                items.reverse();
            }
            paginate(items, marker, max)
        })
    }

    /// UpdateAuthorizer.
    pub fn update_authorizer(
        &self,
        account: &str,
        name: &str,
        u: AuthorizerUpdate,
    ) -> Result<Authorizer> {
        self.write(account, |acct, tx| {
            let mut a = acct
                .authorizers
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(name))?;
            if let Some(v) = u.function_arn.clone() {
                a.function_arn = v;
            }
            if let Some(v) = u.token_key_name.clone() {
                a.token_key_name = Some(v);
            }
            if let Some(v) = u.signing_keys.clone() {
                a.signing_keys = v;
            }
            if let Some(v) = u.active {
                a.active = v;
            }
            if let Some(v) = u.caching_for_http {
                a.caching_for_http = v;
            }
            if !a.signing_disabled && (a.token_key_name.is_none() || a.signing_keys.is_empty()) {
                return Err(RegistryError::InvalidRequest(
                    "An authorizer with signing enabled needs tokenKeyName and tokenSigningPublicKeys".into(),
                ));
            }
            a.modified = now_secs();
            // Live connections it authenticated hold only while it is ACTIVE.
            tx.bump();
            tx.put(Kind::Authorizer, name, &a)?;
            acct.authorizers.insert(name.to_owned(), a.clone());
            Ok(a)
        })
    }

    /// DeleteAuthorizer: an INACTIVE one that is not the default.
    pub fn delete_authorizer(&self, account: &str, name: &str) -> Result<()> {
        self.write(account, |acct, tx| {
            let a = acct.authorizers.get(name).ok_or_else(|| not_found(name))?;
            if a.active {
                return Err(RegistryError::DeleteConflict(format!(
                    "Authorizer {name} is ACTIVE; set it INACTIVE first"
                )));
            }
            if acct.default_authorizer.as_deref() == Some(name) {
                return Err(RegistryError::DeleteConflict(format!(
                    "Authorizer {name} is the default authorizer; clear it first"
                )));
            }
            tx.delete(Kind::Authorizer, name);
            tx.bump();
            acct.authorizers.remove(name);
            Ok(())
        })
    }

    /// SetDefaultAuthorizer.
    pub fn set_default_authorizer(&self, account: &str, name: &str) -> Result<Authorizer> {
        self.write(account, |acct, tx| {
            let a = acct
                .authorizers
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(name))?;
            if acct.default_authorizer.as_deref() == Some(name) {
                return Err(RegistryError::AlreadyExists {
                    message: format!("Authorizer {name} is already the default authorizer"),
                    resource_id: name.to_owned(),
                    resource_arn: String::new(),
                });
            }
            tx.put(Kind::DefaultAuthorizer, DEFAULT_KEY, &name)?;
            acct.default_authorizer = Some(name.to_owned());
            Ok(a)
        })
    }

    /// The default authorizer (DescribeDefaultAuthorizer).
    pub fn default_authorizer(&self, account: &str) -> Result<Authorizer> {
        self.read(account, |a| {
            a.default_authorizer
                .as_ref()
                .and_then(|n| a.authorizers.get(n))
                .cloned()
                .ok_or_else(|| RegistryError::NotFound("No default authorizer is set".into()))
        })
    }

    /// ClearDefaultAuthorizer.
    pub fn clear_default_authorizer(&self, account: &str) -> Result<()> {
        self.write(account, |acct, tx| {
            if acct.default_authorizer.take().is_none() {
                return Err(RegistryError::NotFound(
                    "No default authorizer is set".into(),
                ));
            }
            tx.delete(Kind::DefaultAuthorizer, DEFAULT_KEY);
            Ok(())
        })
    }
}
