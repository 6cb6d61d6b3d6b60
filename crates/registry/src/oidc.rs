//! OpenID Connect identity providers registered in IAM (CreateOpenIDConnectProvider): an
//! account names an issuer it trusts and the client ids (audiences) its tokens may carry;
//! roles trust it as `{"Federated": "arn:aws:iam::<account>:oidc-provider/<name>"}`. Keyed by
//! name: the URL without `https://` (the host in lower case). The keys that verify its tokens
//! are the operator's configuration, not the registry's (nothing is fetched).

use serde::{Deserialize, Serialize};

use crate::store::Kind;
use crate::*;

/// OIDC providers an account may register (AWS: 100).
pub const MAX_OIDC_PROVIDERS: usize = 100;
/// Client ids one provider may list (AWS: 100), each 1 to 255 characters.
pub const MAX_CLIENT_IDS: usize = 100;
/// Thumbprints one provider may list (AWS: 5), each 40 hex digits.
pub const MAX_THUMBPRINTS: usize = 5;

/// A registered provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OidcProvider {
    /// The URL without `https://`: `host[/path]`.
    pub name: String,
    /// Audiences its tokens may name.
    pub client_ids: Vec<String>,
    /// TLS certificate thumbprints (kept and shown; the keys come from configuration).
    pub thumbprints: Vec<String>,
    /// Creation time, epoch seconds: a provider deleted and registered again is another one.
    pub created: f64,
}

impl OidcProvider {
    /// `arn:aws:iam::<account>:oidc-provider/<name>`.
    pub fn arn(&self, account: &str) -> String {
        oidc_provider_arn(account, &self.name)
    }
}

/// The ARN of provider `name` of `account`: `arn:aws:iam::<account>:oidc-provider/<name>`.
pub fn oidc_provider_arn(account: &str, name: &str) -> String {
    format!("arn:aws:iam::{account}:oidc-provider/{name}")
}

/// The provider name an ARN of `account` names, if it is one of that account's provider ARNs.
pub fn oidc_provider_of_arn<'a>(account: &str, arn: &'a str) -> Option<&'a str> {
    arn.strip_prefix("arn:aws:iam::")?
        .strip_prefix(account)?
        .strip_prefix(":oidc-provider/")
}

/// The provider name of an IAM URL (`https://host[/path]`, no query, fragment, port or user),
/// the host in lower case and no trailing `/`.
pub fn oidc_provider_name(url: &str) -> Result<String> {
    let bad = || {
        RegistryError::InvalidRequest(format!(
            "Url {url:?} is not valid: https://host[/path], 1-255 characters"
        ))
    };
    if url.is_empty() || url.len() > 255 {
        return Err(bad());
    }
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(bad)?
        .trim_end_matches('/');
    if rest.is_empty()
        || rest
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '@' | '\\'))
    {
        return Err(bad());
    }
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        || path
            .split('/')
            .any(|seg| seg.is_empty() && !path.is_empty())
    {
        return Err(bad());
    }
    let host = host.to_ascii_lowercase();
    // Cognito's own issuer names the pools' tokens, which Sekisho signs itself.
    if host == "cognito-identity.amazonaws.com" {
        return Err(bad());
    }
    Ok(if path.is_empty() {
        host
    } else {
        format!("{host}/{path}")
    })
}

fn not_found(arn: &str) -> RegistryError {
    RegistryError::NotFound(format!("OpenIDConnect Provider not found for arn {arn}"))
}

fn check_client_ids(ids: &[String]) -> Result<()> {
    if ids.len() > MAX_CLIENT_IDS || ids.iter().any(|c| c.is_empty() || c.len() > 255) {
        return Err(RegistryError::InvalidRequest(format!(
            "ClientIDList: at most {MAX_CLIENT_IDS} client ids of 1-255 characters"
        )));
    }
    Ok(())
}

fn check_thumbprints(t: &[String]) -> Result<()> {
    if t.len() > MAX_THUMBPRINTS
        || t.iter()
            .any(|p| p.len() != 40 || !p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(RegistryError::InvalidRequest(format!(
            "ThumbprintList: at most {MAX_THUMBPRINTS} thumbprints of 40 hex digits"
        )));
    }
    Ok(())
}

/// Distinct, in order of first appearance.
fn distinct(v: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

impl Registry {
    /// CreateOpenIDConnectProvider.
    pub fn create_oidc_provider(
        &self,
        account: &str,
        url: &str,
        client_ids: Vec<String>,
        thumbprints: Vec<String>,
    ) -> Result<OidcProvider> {
        let name = oidc_provider_name(url)?;
        let client_ids = distinct(client_ids);
        let thumbprints = distinct(
            thumbprints
                .into_iter()
                .map(|t| t.to_ascii_lowercase())
                .collect(),
        );
        check_client_ids(&client_ids)?;
        check_thumbprints(&thumbprints)?;
        let p = OidcProvider {
            name,
            client_ids,
            thumbprints,
            created: now_secs(),
        };
        self.write(account, |acct, tx| {
            if acct.oidc_providers.contains_key(&p.name) {
                let arn = p.arn(account);
                return Err(RegistryError::AlreadyExists {
                    message: format!("Provider with url https://{} already exists.", p.name),
                    resource_id: p.name.clone(),
                    resource_arn: arn,
                });
            }
            if acct.oidc_providers.len() >= MAX_OIDC_PROVIDERS {
                return Err(RegistryError::LimitExceeded(format!(
                    "Cannot exceed quota for OpenIdConnectProvidersPerAccount: {MAX_OIDC_PROVIDERS}"
                )));
            }
            tx.put(Kind::OidcProvider, &p.name, &p)?;
            acct.oidc_providers.insert(p.name.clone(), p.clone());
            Ok(p.clone())
        })
    }

    /// The provider an ARN of `account` names.
    pub fn oidc_provider(&self, account: &str, arn: &str) -> Result<OidcProvider> {
        let name = oidc_provider_of_arn(account, arn).ok_or_else(|| not_found(arn))?;
        self.read(account, |a| {
            a.oidc_providers
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(arn))
        })
    }

    /// The provider of `account` registered under `name`, if any.
    pub fn oidc_provider_by_name(&self, account: &str, name: &str) -> Option<OidcProvider> {
        self.read(account, |a| Ok(a.oidc_providers.get(name).cloned()))
            .ok()
            .flatten()
    }

    /// ListOpenIDConnectProviders.
    pub fn oidc_providers(&self, account: &str) -> Result<Vec<OidcProvider>> {
        self.read(account, |a| {
            Ok(a.oidc_providers.values().cloned().collect())
        })
    }

    /// Changes a provider's client ids or thumbprints (`change` returns the new lists).
    pub fn update_oidc_provider(
        &self,
        account: &str,
        arn: &str,
        mut change: impl FnMut(&mut OidcProvider),
    ) -> Result<OidcProvider> {
        let name = self.oidc_provider(account, arn)?.name;
        self.write(account, |acct, tx| {
            let mut p = acct
                .oidc_providers
                .get(&name)
                .cloned()
                .ok_or_else(|| not_found(arn))?;
            change(&mut p);
            p.client_ids = distinct(std::mem::take(&mut p.client_ids));
            p.thumbprints = distinct(
                std::mem::take(&mut p.thumbprints)
                    .into_iter()
                    .map(|t| t.to_ascii_lowercase())
                    .collect(),
            );
            check_client_ids(&p.client_ids)?;
            check_thumbprints(&p.thumbprints)?;
            tx.put(Kind::OidcProvider, &p.name, &p)?;
            acct.oidc_providers.insert(p.name.clone(), p.clone());
            Ok(p)
        })
    }

    /// DeleteOpenIDConnectProvider. Sessions it vouched for end with it (live connections are
    /// checked again at once), and identity pools no longer name it.
    pub fn delete_oidc_provider(&self, account: &str, arn: &str) -> Result<()> {
        let name = self.oidc_provider(account, arn)?.name;
        let full = oidc_provider_arn(account, &name);
        self.write(account, |acct, tx| {
            if acct.oidc_providers.remove(&name).is_none() {
                return Err(not_found(arn));
            }
            tx.delete(Kind::OidcProvider, &name);
            for pool in acct.identity_pools.values_mut() {
                if pool.oidc_providers.contains(&full) {
                    pool.oidc_providers.retain(|a| *a != full);
                    tx.put(Kind::IdentityPool, &pool.id, &*pool)?;
                }
            }
            tx.bump();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_urls_as_iam_takes_them() {
        for (url, name) in [
            ("https://idp.example.com", "idp.example.com"),
            (
                "https://IdP.Example.com/realms/Plant/",
                "idp.example.com/realms/Plant",
            ),
        ] {
            assert_eq!(oidc_provider_name(url).unwrap(), name);
        }
        for bad in [
            "",
            "http://idp.example.com",
            "https://",
            "https://idp.example.com?x=1",
            "https://idp.example.com#f",
            "https://user@idp.example.com",
            "https://idp.example.com:8443",
            "https://idp.example.com//a",
            "https://idp example.com",
            "https://cognito-identity.amazonaws.com",
        ] {
            assert!(oidc_provider_name(bad).is_err(), "{bad}");
        }
        let long = format!("https://{}", "a".repeat(247));
        assert_eq!(long.len(), 255);
        assert!(oidc_provider_name(&long).is_ok());
        assert!(oidc_provider_name(&format!("{long}a")).is_err());
    }

    #[test]
    fn providers_are_created_listed_changed_and_deleted() {
        let r = Registry::in_memory("us-east-1").unwrap();
        let (a, _) = r.create_account("a").unwrap();
        let p = r
            .create_oidc_provider(
                &a.id,
                "https://idp.example.com/r",
                vec!["app".into(), "app".into()],
                vec![],
            )
            .unwrap();
        assert_eq!(p.client_ids, vec!["app"]);
        let arn = p.arn(&a.id);
        assert!(matches!(
            r.create_oidc_provider(&a.id, "https://IDP.example.com/r/", vec![], vec![]),
            Err(RegistryError::AlreadyExists { .. })
        ));
        assert_eq!(r.oidc_providers(&a.id).unwrap().len(), 1);
        let p = r
            .update_oidc_provider(&a.id, &arn, |p| p.client_ids.push("other".into()))
            .unwrap();
        assert_eq!(p.client_ids, vec!["app", "other"]);
        assert!(
            r.update_oidc_provider(&a.id, &arn, |p| p.thumbprints = vec!["x".into()])
                .is_err()
        );
        // Another account's ARN is not found here.
        let (b, _) = r.create_account("b").unwrap();
        assert!(r.oidc_provider(&b.id, &arn).is_err());
        assert!(r.delete_oidc_provider(&b.id, &arn).is_err());
        r.delete_oidc_provider(&a.id, &arn).unwrap();
        assert!(r.oidc_provider(&a.id, &arn).is_err());
        for i in 0..MAX_OIDC_PROVIDERS {
            r.create_oidc_provider(
                &a.id,
                &format!("https://idp{i}.example.com"),
                vec![],
                vec![],
            )
            .unwrap();
        }
        assert!(matches!(
            r.create_oidc_provider(&a.id, "https://one-more.example.com", vec![], vec![]),
            Err(RegistryError::LimitExceeded(_))
        ));
    }
}
