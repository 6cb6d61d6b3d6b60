//! Cognito identity pools and their identities, as AWS IoT leans on them: an app gets an
//! identity id (`{region}:{uuid}`) from a pool, then temporary credentials of the pool's
//! authenticated or unauthenticated role. An authenticated identity is one a developer
//! provider vouched for (`GetOpenIdTokenForDeveloperIdentity`); its id is the IoT principal
//! that IoT policies attach to. Pools are keyed by id within an account (ids are unique across
//! accounts: an unsigned request names only the pool); identities by id.

use serde::{Deserialize, Serialize};

use crate::store::Kind;
use crate::*;

/// Identity pools an account may have (AWS's quota).
pub const MAX_IDENTITY_POOLS: usize = 1000;
/// Identities one pool may hold: GetId is unauthenticated, so this bounds what anyone can make
/// the registry keep (AWS's pools have no such bound).
pub const MAX_IDENTITIES_PER_POOL: usize = 100_000;

/// An identity pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityPool {
    /// `{region}:{uuid}`.
    pub id: String,
    /// Name.
    pub name: String,
    /// Whether identities without logins get credentials.
    pub allow_unauthenticated: bool,
    /// Whether the basic (classic) flow is allowed.
    pub allow_classic_flow: bool,
    /// The developer provider's name (immutable once set).
    pub developer_provider: Option<String>,
    /// `authenticated` / `unauthenticated` → role ARN.
    pub roles: BTreeMap<String, String>,
    /// The key the pool's OpenID tokens are signed with (hex); never shown.
    pub token_key: String,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// The ARNs of the IAM OpenID Connect providers whose ID tokens are logins here.
    #[serde(default)]
    pub oidc_providers: Vec<String>,
}

/// What CreateIdentityPool and UpdateIdentityPool set.
#[derive(Debug, Clone, Default)]
pub struct IdentityPoolSpec {
    /// Name.
    pub name: String,
    /// Whether identities without logins get credentials.
    pub allow_unauthenticated: bool,
    /// Whether the basic (classic) flow is allowed.
    pub allow_classic_flow: bool,
    /// The developer provider's name.
    pub developer_provider: Option<String>,
    /// ARNs of IAM OpenID Connect providers of the account (`OpenIdConnectProviderARNs`).
    pub oidc_providers: Vec<String>,
}

/// An identity of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CognitoIdentity {
    /// `{region}:{uuid}`.
    pub id: String,
    /// Its pool's id.
    pub pool: String,
    /// Its developer logins, `{provider}\n{user id}`; none: unauthenticated.
    pub logins: Vec<String>,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// Last change.
    pub modified: f64,
}

fn pool_not_found(id: &str) -> RegistryError {
    RegistryError::NotFound(format!("IdentityPool '{id}' not found."))
}

fn identity_not_found(id: &str) -> RegistryError {
    RegistryError::NotFound(format!("Identity '{id}' not found."))
}

/// The OIDC providers a pool names must be the account's, at most 10, distinct, and none may
/// share its name with the developer provider (their logins would name the same users).
fn check_oidc_providers(
    account: &str,
    acct: &Account,
    arns: &[String],
    developer: Option<&str>,
) -> Result<()> {
    if arns.len() > 10 {
        return Err(RegistryError::InvalidRequest(
            "OpenIdConnectProviderARNs: at most 10".into(),
        ));
    }
    for (i, arn) in arns.iter().enumerate() {
        let name = crate::oidc::oidc_provider_of_arn(account, arn)
            .filter(|n| acct.oidc_providers.contains_key(*n))
            .ok_or_else(|| {
                RegistryError::InvalidRequest(format!(
                    "{arn} is not an OpenID Connect provider of this account"
                ))
            })?;
        if arns[..i].contains(arn) {
            return Err(RegistryError::InvalidRequest(format!(
                "OpenIdConnectProviderARNs names {arn} twice"
            )));
        }
        if developer == Some(name) {
            return Err(RegistryError::InvalidRequest(format!(
                "DeveloperProviderName {name} is also an OpenID Connect provider of the pool"
            )));
        }
    }
    Ok(())
}

/// Checks a pool's name and developer provider name.
fn check_spec(spec: &IdentityPoolSpec) -> Result<()> {
    check_name("IdentityPoolName", &spec.name, 128, |c| {
        c.is_alphanumeric() || matches!(c, ' ' | '+' | '=' | ',' | '.' | '@' | '-' | '_')
    })?;
    if let Some(p) = &spec.developer_provider {
        check_name("DeveloperProviderName", p, 128, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
        })?;
    }
    Ok(())
}

impl Registry {
    /// A new identity or pool id: `{region}:{uuid}`.
    fn cognito_id(&self) -> String {
        format!("{}:{}", self.region, crate::things::uuid_like())
    }

    /// CreateIdentityPool.
    pub fn create_identity_pool(
        &self,
        account: &str,
        spec: IdentityPoolSpec,
    ) -> Result<IdentityPool> {
        check_spec(&spec)?;
        let pool = IdentityPool {
            id: self.cognito_id(),
            name: spec.name,
            allow_unauthenticated: spec.allow_unauthenticated,
            allow_classic_flow: spec.allow_classic_flow,
            developer_provider: spec.developer_provider,
            roles: BTreeMap::new(),
            token_key: random_string(b"0123456789abcdef", 64),
            created: now_secs(),
            oidc_providers: spec.oidc_providers,
        };
        self.write(account, |acct, tx| {
            check_oidc_providers(
                account,
                acct,
                &pool.oidc_providers,
                pool.developer_provider.as_deref(),
            )?;
            if acct.identity_pools.len() >= MAX_IDENTITY_POOLS {
                return Err(RegistryError::LimitExceeded(format!(
                    "An account can have at most {MAX_IDENTITY_POOLS} identity pools"
                )));
            }
            tx.put(Kind::IdentityPool, &pool.id, &pool)?;
            acct.identity_pools.insert(pool.id.clone(), pool.clone());
            Ok(pool.clone())
        })
    }

    /// DescribeIdentityPool (and the pool behind every identity operation).
    pub fn identity_pool(&self, account: &str, id: &str) -> Result<IdentityPool> {
        self.read(account, |a| {
            a.identity_pools
                .get(id)
                .cloned()
                .ok_or_else(|| pool_not_found(id))
        })
    }

    /// The account an identity pool is of (its id is unique across accounts).
    pub fn identity_pool_account(&self, id: &str) -> Option<String> {
        self.read_state(|st| {
            st.accounts
                .iter()
                .find(|(_, a)| a.identity_pools.contains_key(id))
                .map(|(k, _)| k.to_string())
        })
    }

    /// ListIdentityPools, by id.
    pub fn list_identity_pools(
        &self,
        account: &str,
        marker: Option<&str>,
        max: usize,
    ) -> Result<Page<IdentityPool>> {
        self.read(account, |a| {
            let items = a
                .identity_pools
                .values()
                .map(|p| (p.id.clone(), p.clone()))
                .collect();
            paginate(items, marker, max)
        })
    }

    /// UpdateIdentityPool: name, flags and developer provider (which, once set, may not
    /// change).
    pub fn update_identity_pool(
        &self,
        account: &str,
        id: &str,
        spec: IdentityPoolSpec,
    ) -> Result<IdentityPool> {
        check_spec(&spec)?;
        self.write(account, |acct, tx| {
            let mut p = acct
                .identity_pools
                .get(id)
                .cloned()
                .ok_or_else(|| pool_not_found(id))?;
            if p.developer_provider.is_some() && p.developer_provider != spec.developer_provider {
                return Err(RegistryError::InvalidRequest(
                    "Cannot change or remove the DeveloperProviderName once it is set".into(),
                ));
            }
            check_oidc_providers(
                account,
                acct,
                &spec.oidc_providers,
                spec.developer_provider.as_deref(),
            )?;
            p.name = spec.name.clone();
            p.allow_unauthenticated = spec.allow_unauthenticated;
            p.allow_classic_flow = spec.allow_classic_flow;
            p.developer_provider = spec.developer_provider.clone();
            p.oidc_providers = spec.oidc_providers.clone();
            tx.put(Kind::IdentityPool, id, &p)?;
            acct.identity_pools.insert(id.to_owned(), p.clone());
            Ok(p)
        })
    }

    /// SetIdentityPoolRoles: the whole map (`authenticated`, `unauthenticated`).
    pub fn set_identity_pool_roles(
        &self,
        account: &str,
        id: &str,
        roles: BTreeMap<String, String>,
    ) -> Result<()> {
        if let Some(k) = roles
            .keys()
            .find(|k| !matches!(k.as_str(), "authenticated" | "unauthenticated"))
        {
            return Err(RegistryError::InvalidRequest(format!(
                "Roles may be authenticated or unauthenticated, not {k}"
            )));
        }
        self.write(account, |acct, tx| {
            let mut p = acct
                .identity_pools
                .get(id)
                .cloned()
                .ok_or_else(|| pool_not_found(id))?;
            p.roles = roles.clone();
            tx.put(Kind::IdentityPool, id, &p)?;
            acct.identity_pools.insert(id.to_owned(), p);
            Ok(())
        })
    }

    /// DeleteIdentityPool, with its identities (and so every token it signed).
    pub fn delete_identity_pool(&self, account: &str, id: &str) -> Result<()> {
        self.write(account, |acct, tx| {
            if !acct.identity_pools.contains_key(id) {
                return Err(pool_not_found(id));
            }
            let gone: Vec<String> = acct
                .cognito_identities
                .values()
                .filter(|i| i.pool == id)
                .map(|i| i.id.clone())
                .collect();
            for i in &gone {
                tx.delete(Kind::CognitoIdentity, i);
            }
            tx.delete(Kind::IdentityPool, id);
            // Credentials of its identities hold no more.
            tx.bump();
            for i in &gone {
                acct.cognito_identities.remove(i);
            }
            acct.identity_pools.remove(id);
            Ok(())
        })
    }

    /// GetId: the identity of a developer login (`(provider, user id)`) in a pool, made if it
    /// is new; without one, a new unauthenticated identity.
    pub fn get_cognito_id(
        &self,
        account: &str,
        pool: &str,
        login: Option<(&str, &str)>,
    ) -> Result<String> {
        let login = login.map(|(p, u)| format!("{p}\n{u}"));
        let id = self.cognito_id();
        self.write(account, |acct, tx| {
            if !acct.identity_pools.contains_key(pool) {
                return Err(pool_not_found(pool));
            }
            if let Some(l) = &login
                && let Some(found) = acct
                    .cognito_identities
                    .values()
                    .find(|i| i.pool == pool && i.logins.contains(l))
            {
                return Ok(found.id.clone());
            }
            let count = acct
                .cognito_identities
                .values()
                .filter(|i| i.pool == pool)
                .count();
            if count >= MAX_IDENTITIES_PER_POOL {
                return Err(RegistryError::LimitExceeded(format!(
                    "An identity pool can have at most {MAX_IDENTITIES_PER_POOL} identities here"
                )));
            }
            let now = now_secs();
            let i = CognitoIdentity {
                id: id.clone(),
                pool: pool.to_owned(),
                logins: login.clone().into_iter().collect(),
                created: now,
                modified: now,
            };
            tx.put(Kind::CognitoIdentity, &id, &i)?;
            acct.cognito_identities.insert(id.clone(), i);
            Ok(id.clone())
        })
    }

    /// Adds a developer login to an existing identity of `pool` (GetOpenIdTokenForDeveloperIdentity
    /// with an IdentityId): refused if that login is another identity's.
    pub fn link_developer_login(
        &self,
        account: &str,
        pool: &str,
        id: &str,
        login: (&str, &str),
    ) -> Result<()> {
        let login = format!("{}\n{}", login.0, login.1);
        self.write(account, |acct, tx| {
            if acct
                .cognito_identities
                .values()
                .any(|i| i.pool == pool && i.id != id && i.logins.contains(&login))
            {
                return Err(RegistryError::Conflict(
                    "The developer user identifier is already registered with another identity"
                        .into(),
                ));
            }
            let mut i = acct
                .cognito_identities
                .get(id)
                .filter(|i| i.pool == pool)
                .cloned()
                .ok_or_else(|| identity_not_found(id))?;
            if i.logins.contains(&login) {
                return Ok(());
            }
            i.logins.push(login.clone());
            i.modified = now_secs();
            tx.put(Kind::CognitoIdentity, id, &i)?;
            acct.cognito_identities.insert(id.to_owned(), i);
            Ok(())
        })
    }

    /// DeleteIdentities: the identities of this account named (others are ignored), and so
    /// their logins, tokens and credentials.
    pub fn delete_cognito_identities(&self, account: &str, ids: &[String]) -> Result<()> {
        self.write(account, |acct, tx| {
            let gone: Vec<&String> = ids
                .iter()
                .filter(|i| acct.cognito_identities.contains_key(*i))
                .collect();
            for i in &gone {
                tx.delete(Kind::CognitoIdentity, i);
            }
            if !gone.is_empty() {
                tx.bump();
            }
            for i in gone {
                acct.cognito_identities.remove(i);
            }
            Ok(())
        })
    }

    /// DescribeIdentity.
    pub fn cognito_identity(&self, account: &str, id: &str) -> Result<CognitoIdentity> {
        self.read(account, |a| {
            a.cognito_identities
                .get(id)
                .cloned()
                .ok_or_else(|| identity_not_found(id))
        })
    }

    /// ListIdentities of a pool, by id.
    pub fn list_cognito_identities(
        &self,
        account: &str,
        pool: &str,
        marker: Option<&str>,
        max: usize,
    ) -> Result<Page<CognitoIdentity>> {
        self.read(account, |a| {
            if !a.identity_pools.contains_key(pool) {
                return Err(pool_not_found(pool));
            }
            let items = a
                .cognito_identities
                .values()
                .filter(|i| i.pool == pool)
                .map(|i| (i.id.clone(), i.clone()))
                .collect();
            paginate(items, marker, max)
        })
    }

    /// The IoT policies attached to a principal given by name (a Cognito identity id), as
    /// documents.
    pub fn attached_iot_policies(
        &self,
        account: &str,
        target: &str,
    ) -> Vec<(String, Arc<sekisho_policy::Policy>)> {
        self.read(account, |a| {
            Ok(a.policy_targets
                .get(target)
                .into_iter()
                .flatten()
                .filter_map(|n| {
                    a.policies
                        .get(&**n)
                        .and_then(|p| p.default_parsed().map(|d| (n.to_string(), d)))
                })
                .collect())
        })
        .unwrap_or_default()
    }
}
