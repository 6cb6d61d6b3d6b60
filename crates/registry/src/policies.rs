//! IoT policies, their versions and attachments.

use std::collections::BTreeMap;
use std::sync::Arc;

use sekisho_policy::{Dialect, MAX_IOT_POLICY_CHARS, Policy, non_whitespace_len};

use crate::store::Kind;
use crate::*;

/// Versions a policy may have.
pub const MAX_POLICY_VERSIONS: usize = 5;
/// Policies one certificate (or identity) may have attached.
pub const MAX_POLICIES_PER_TARGET: usize = 10;

pub(crate) fn reparse(p: &mut IotPolicy) {
    for v in p.versions.values_mut() {
        v.parsed = Policy::parse(&v.document, Dialect::Iot).ok().map(Arc::new);
    }
}

pub(crate) fn parse_doc(doc: &str) -> Result<Arc<Policy>> {
    let n = non_whitespace_len(doc);
    if n > MAX_IOT_POLICY_CHARS {
        return Err(RegistryError::MalformedPolicy(format!(
            "Policy document is {n} characters long (excluding white space); the limit is {MAX_IOT_POLICY_CHARS}"
        )));
    }
    Policy::parse(doc, Dialect::Iot)
        .map(Arc::new)
        .map_err(|e| RegistryError::MalformedPolicy(e.0))
}

pub(crate) fn policy_name_char(c: char) -> bool {
    c.is_alphanumeric() || "_+=,.@-".contains(c)
}

fn not_found(name: &str) -> RegistryError {
    RegistryError::NotFound(format!("Policy not found (name={name})"))
}

impl Registry {
    /// CreatePolicy: version "1", the default.
    pub fn create_policy(&self, account: &str, name: &str, document: &str) -> Result<IotPolicy> {
        check_name("Policy name", name, 128, policy_name_char)?;
        let parsed = parse_doc(document)?;
        self.write(account, |a, tx| {
            if a.policies.contains_key(name) {
                return Err(RegistryError::AlreadyExists {
                    message: format!(
                        "Policy cannot be created - name already exists (name={name})"
                    ),
                    resource_id: name.to_owned(),
                    resource_arn: self.arn(account, &format!("policy/{name}")),
                });
            }
            let now = now_secs();
            let mut versions = BTreeMap::new();
            versions.insert(
                1,
                PolicyVersion {
                    document: document.to_owned(),
                    created: now,
                    parsed: Some(parsed.clone()),
                },
            );
            let p = IotPolicy {
                name: name.to_owned(),
                versions,
                default_version: 1,
                next_version: 2,
                created: now,
                modified: now,
                generation_id: random_string(b"0123456789abcdef", 64),
            };
            tx.put(Kind::Policy, name, &p)?;
            a.policies.insert(name.into(), p.clone());
            Ok(p)
        })
    }

    /// GetPolicy.
    pub fn get_policy(&self, account: &str, name: &str) -> Result<IotPolicy> {
        self.read(account, |a| {
            a.policies.get(name).cloned().ok_or_else(|| not_found(name))
        })
    }

    /// ListPolicies, by name.
    pub fn list_policies(
        &self,
        account: &str,
        ascending: bool,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<IotPolicy>> {
        self.read(account, |a| {
            let mut items: Vec<_> = a
                .policies
                .values()
                .map(|p| (p.name.clone(), p.clone()))
                .collect();
            if !ascending {
                items.reverse();
            }
            paginate(items, marker, size)
        })
    }

    /// DeletePolicy: refused while attached or while non-default versions exist.
    pub fn delete_policy(&self, account: &str, name: &str) -> Result<()> {
        self.write(account, |a, tx| {
            let p = a.policies.get(name).ok_or_else(|| not_found(name))?;
            if a.policy_targets.values().any(|s| s.contains(name)) {
                return Err(RegistryError::DeleteConflict(format!(
                    "The policy cannot be deleted as the policy is attached to one or more principals (name={name})"
                )));
            }
            if p.versions.len() > 1 {
                return Err(RegistryError::DeleteConflict(format!(
                    "Cannot delete the policy because it has one or more policy versions attached to it (name={name})"
                )));
            }
            tx.delete(Kind::Policy, name);
            a.policies.remove(name);
            Ok(())
        })
    }

    /// CreatePolicyVersion: at most five versions.
    pub fn create_policy_version(
        &self,
        account: &str,
        name: &str,
        document: &str,
        set_default: bool,
    ) -> Result<(IotPolicy, u32)> {
        let parsed = parse_doc(document)?;
        self.write(account, |a, tx| {
            let p = a.policies.get_mut(name).ok_or_else(|| not_found(name))?;
            if p.versions.len() >= MAX_POLICY_VERSIONS {
                return Err(RegistryError::VersionsLimitExceeded(format!(
                    "The policy {name} already has the maximum number of versions ({MAX_POLICY_VERSIONS})"
                )));
            }
            let mut next = p.clone();
            let v = next.next_version;
            next.next_version += 1;
            next.versions.insert(v, PolicyVersion { document: document.to_owned(), created: now_secs(), parsed: Some(parsed.clone()) });
            if set_default {
                next.default_version = v;
                tx.bump();
            }
            next.modified = now_secs();
            next.generation_id = random_string(b"0123456789abcdef", 64);
            tx.put(Kind::Policy, name, &next)?;
            *p = next.clone();
            Ok((next, v))
        })
    }

    /// SetDefaultPolicyVersion: live connections follow at once.
    pub fn set_default_policy_version(
        &self,
        account: &str,
        name: &str,
        version: &str,
    ) -> Result<()> {
        self.write(account, |a, tx| {
            let p = a.policies.get_mut(name).ok_or_else(|| not_found(name))?;
            let v = version_number(p, version)?;
            let mut next = p.clone();
            next.default_version = v;
            next.modified = now_secs();
            next.generation_id = random_string(b"0123456789abcdef", 64);
            tx.put(Kind::Policy, name, &next)?;
            tx.bump();
            *p = next;
            Ok(())
        })
    }

    /// DeletePolicyVersion: the default version cannot be deleted.
    pub fn delete_policy_version(&self, account: &str, name: &str, version: &str) -> Result<()> {
        self.write(account, |a, tx| {
            let p = a.policies.get_mut(name).ok_or_else(|| not_found(name))?;
            let v = version_number(p, version)?;
            if v == p.default_version {
                return Err(RegistryError::DeleteConflict(format!(
                    "Cannot delete the default version of a policy (name={name}, version={v})"
                )));
            }
            let mut next = p.clone();
            next.versions.remove(&v);
            next.generation_id = random_string(b"0123456789abcdef", 64);
            tx.put(Kind::Policy, name, &next)?;
            *p = next;
            Ok(())
        })
    }

    /// AttachPolicy: at most ten policies per target.
    pub fn attach_policy(&self, account: &str, name: &str, target: &str) -> Result<()> {
        self.write(account, |a, tx| {
            if !a.policies.contains_key(name) {
                return Err(not_found(name));
            }
            let max = match self.group_target(a, account, target)? {
                Some(_) => crate::MAX_POLICIES_PER_GROUP,
                None => {
                    self.check_principal(a, account, target)?;
                    MAX_POLICIES_PER_TARGET
                }
            };
            let set = a.policy_targets.get(target);
            if set.is_some_and(|s| s.contains(name)) {
                return Ok(());
            }
            if set.is_some_and(|s| s.len() >= max) {
                return Err(RegistryError::LimitExceeded(format!(
                    "A target can have at most {max} policies attached"
                )));
            }
            tx.put(Kind::PolicyAttachment, &format!("{name}\n{target}"), &"")?;
            tx.bump();
            let (key, name) = (a.intern(target), a.policy_name(name));
            a.policy_targets.entry(key).or_default().insert(name);
            Ok(())
        })
    }

    /// DetachPolicy.
    pub fn detach_policy(&self, account: &str, name: &str, target: &str) -> Result<()> {
        self.write(account, |a, tx| {
            if !a.policies.contains_key(name) {
                return Err(not_found(name));
            }
            tx.delete(Kind::PolicyAttachment, &format!("{name}\n{target}"));
            tx.bump();
            if let Some(s) = a.policy_targets.get_mut(target) {
                s.remove(name);
                if s.is_empty() {
                    a.policy_targets.remove(target);
                }
            }
            Ok(())
        })
    }

    /// ListAttachedPolicies (and the deprecated ListPrincipalPolicies); with `recursive`, a
    /// thing group's ancestors' policies too.
    pub fn list_attached_policies(
        &self,
        account: &str,
        target: &str,
        recursive: bool,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<IotPolicy>> {
        self.read(account, |a| {
            let targets: Vec<String> = match self.group_target(a, account, target)? {
                Some(group) if recursive => a
                    .group_lineage(&group)
                    .into_iter()
                    .filter_map(|g| a.group_arns.get(g).cloned())
                    .collect(),
                Some(_) => vec![target.to_owned()],
                None => {
                    self.check_principal(a, account, target)?;
                    vec![target.to_owned()]
                }
            };
            let mut items: Vec<(String, IotPolicy)> = Vec::new();
            for t in &targets {
                for n in a.policy_targets.get(t.as_str()).into_iter().flatten() {
                    if let Some(p) = a.policies.get(&**n)
                        && !items.iter().any(|(k, _)| **k == **n)
                    {
                        items.push((p.name.clone(), p.clone()));
                    }
                }
            }
            items.sort_by(|x, y| x.0.cmp(&y.0));
            paginate(items, marker, size)
        })
    }

    /// The group a policy target names, if it is a thing group ARN of this account (`None`
    /// for any other target); an error if the group does not exist.
    pub(crate) fn group_target(
        &self,
        a: &Account,
        account: &str,
        target: &str,
    ) -> Result<Option<String>> {
        let prefix = self.arn(account, "thinggroup/");
        let Some(group) = target.strip_prefix(&prefix) else {
            return Ok(None);
        };
        if !a.thing_groups.contains_key(group) {
            return Err(RegistryError::NotFound(format!(
                "Thing Group {group} does not exist"
            )));
        }
        Ok(Some(group.to_owned()))
    }

    /// ListTargetsForPolicy.
    pub fn list_targets_for_policy(
        &self,
        account: &str,
        name: &str,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<String>> {
        self.read(account, |a| {
            if !a.policies.contains_key(name) {
                return Err(not_found(name));
            }
            Ok(page_ordered(
                &a.policy_targets,
                marker,
                size,
                |_, s| s.contains(name),
                |t, _| t.to_owned(),
            ))
        })
    }

    /// GetEffectivePolicies: the policies attached to the principal (thing groups come later).
    pub fn effective_policies(
        &self,
        account: &str,
        principal: Option<&str>,
        thing: Option<&str>,
    ) -> Result<Vec<IotPolicy>> {
        self.read(account, |a| {
            let mut names: Vec<String> = Vec::new();
            if let Some(p) = principal {
                self.check_principal(a, account, p)?;
                names.extend(
                    a.policy_targets
                        .get(p)
                        .into_iter()
                        .flatten()
                        .map(|n| n.to_string()),
                );
            }
            if let Some(t) = thing {
                if !a.things.contains_key(t) {
                    return Err(RegistryError::NotFound(format!(
                        "Thing {t} cannot be found."
                    )));
                }
                for n in a.group_policy_names(t) {
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
            Ok(names
                .iter()
                .filter_map(|n| a.policies.get(n.as_str()).cloned())
                .collect())
        })
    }
}

fn version_number(p: &IotPolicy, version: &str) -> Result<u32> {
    version
        .parse::<u32>()
        .ok()
        .filter(|v| p.versions.contains_key(v))
        .ok_or_else(|| {
            RegistryError::NotFound(format!(
                "Policy version {version} of policy {} does not exist",
                p.name
            ))
        })
}
