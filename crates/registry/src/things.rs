//! Things, thing types and thing-principal attachments.

use std::collections::BTreeMap;

use crate::store::Kind;
use crate::*;

pub(crate) fn thing_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')
}

fn check_attributes(attrs: &BTreeMap<String, String>, with_type: bool) -> Result<()> {
    let max = if with_type { 50 } else { 3 };
    if attrs.len() > max {
        return Err(RegistryError::InvalidRequest(format!(
            "A thing {} a thing type can have at most {max} attributes",
            if with_type { "with" } else { "without" }
        )));
    }
    check_attribute_pairs(attrs)
}

/// Attribute names and values as AWS allows them (things and thing groups alike).
pub(crate) fn check_attribute_pairs(attrs: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in attrs {
        check_name("Attribute name", k, 128, |c| {
            c.is_ascii_alphanumeric() || "_.,@/:#-".contains(c)
        })?;
        if v.len() > 800
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.,@/:#=[]-".contains(c))
        {
            return Err(RegistryError::InvalidRequest(format!(
                "Attribute value for {k:?} is not valid"
            )));
        }
    }
    Ok(())
}

/// Filters and paging of ListThings.
#[derive(Debug, Clone, Default)]
pub struct ThingQuery {
    /// Attribute name to filter on.
    pub attribute_name: Option<String>,
    /// Attribute value to filter on.
    pub attribute_value: Option<String>,
    /// Match the value as a prefix.
    pub use_prefix_attribute_value: bool,
    /// Thing type to filter on.
    pub thing_type: Option<String>,
    /// Page token.
    pub next_token: Option<String>,
    /// Page size (1-250).
    pub max_results: usize,
}

/// The changes of UpdateThing.
#[derive(Debug, Clone, Default)]
pub struct ThingUpdate {
    /// New thing type.
    pub thing_type: Option<String>,
    /// Remove the thing type.
    pub remove_thing_type: bool,
    /// New attributes.
    pub attributes: Option<BTreeMap<String, String>>,
    /// Merge with existing attributes (an empty value removes one).
    pub merge: bool,
    /// Optimistic locking.
    pub expected_version: Option<i64>,
}

impl Registry {
    fn check_type(a: &Account, t: &str) -> Result<()> {
        match a.thing_types.get(t) {
            None => Err(RegistryError::NotFound(format!(
                "Thing type {t} does not exist"
            ))),
            Some(tt) if tt.deprecated => Err(RegistryError::InvalidRequest(format!(
                "Thing type {t} is deprecated; it cannot take new things"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// CreateThing: idempotent for the same name and configuration.
    pub fn create_thing(
        &self,
        account: &str,
        name: &str,
        thing_type: Option<&str>,
        attributes: BTreeMap<String, String>,
    ) -> Result<Thing> {
        check_name("Thing name", name, 128, thing_name_char)?;
        check_attributes(&attributes, thing_type.is_some())?;
        self.write(account, |a, tx| {
            if let Some(existing) = a.things.get(name) {
                if existing.thing_type.as_deref() == thing_type && existing.attributes == attributes
                {
                    return Ok(existing.clone());
                }
                return Err(RegistryError::AlreadyExists {
                    message: format!(
                        "Thing {name} already exists in account with different attributes"
                    ),
                    resource_id: existing.id.to_string(),
                    resource_arn: self.arn(account, &format!("thing/{name}")),
                });
            }
            if let Some(t) = thing_type {
                Registry::check_type(a, t)?;
            }
            let thing = Thing {
                name: name.to_owned(),
                id: ThingId::random(),
                thing_type: thing_type.map(str::to_owned),
                attributes: attributes.clone(),
                version: 1,
                created: now_secs(),
            };
            tx.put(Kind::Thing, name, &thing)?;
            tx.bump();
            a.things.insert(name.into(), thing.clone());
            crate::events::thing(tx, a, &thing, "CREATED");
            if let Some(ty) = &thing.thing_type {
                crate::events::type_association(tx, a, &thing, ty, true);
            }
            Ok(thing)
        })
    }

    /// DescribeThing.
    pub fn describe_thing(&self, account: &str, name: &str) -> Result<Thing> {
        self.read(account, |a| {
            a.things
                .get(name)
                .cloned()
                .ok_or_else(|| RegistryError::NotFound(format!("Thing {name} cannot be found.")))
        })
    }

    /// UpdateThing.
    pub fn update_thing(&self, account: &str, name: &str, u: ThingUpdate) -> Result<()> {
        self.write(account, |a, tx| {
            let cur = a
                .things
                .get(name)
                .ok_or_else(|| RegistryError::NotFound(format!("Thing {name} cannot be found.")))?;
            if let Some(v) = u.expected_version
                && v != cur.version
            {
                return Err(RegistryError::VersionConflict(format!(
                    "The version for thing {name} does not match the expected version."
                )));
            }
            if u.remove_thing_type && u.thing_type.is_some() {
                return Err(RegistryError::InvalidRequest(
                    "Cannot set and remove the thing type at once".into(),
                ));
            }
            let mut next = cur.clone();
            if let Some(t) = &u.thing_type {
                Registry::check_type(a, t)?;
                next.thing_type = Some(t.clone());
            }
            if u.remove_thing_type {
                next.thing_type = None;
            }
            if let Some(attrs) = u.attributes.clone() {
                if u.merge {
                    for (k, v) in attrs {
                        if v.is_empty() {
                            next.attributes.remove(&k);
                        } else {
                            next.attributes.insert(k, v);
                        }
                    }
                } else {
                    next.attributes = attrs.into_iter().filter(|(_, v)| !v.is_empty()).collect();
                }
            }
            check_attributes(&next.attributes, next.thing_type.is_some())?;
            next.version += 1;
            tx.put(Kind::Thing, name, &next)?;
            tx.bump();
            crate::events::thing(tx, a, &next, "UPDATED");
            if cur.thing_type != next.thing_type {
                if let Some(old) = &cur.thing_type {
                    crate::events::type_association(tx, a, &next, old, false);
                }
                if let Some(new) = &next.thing_type {
                    crate::events::type_association(tx, a, &next, new, true);
                }
            }
            a.things.insert(name.into(), next);
            Ok(())
        })
    }

    /// DeleteThing: succeeds for a thing that does not exist; refused while principals are
    /// attached (AWS's message).
    pub fn delete_thing(
        &self,
        account: &str,
        name: &str,
        expected_version: Option<i64>,
    ) -> Result<()> {
        let had_jobs = self.write(account, |a, tx| {
            let Some(cur) = a.things.get(name) else {
                return Ok(false);
            };
            if let Some(v) = expected_version
                && v != cur.version
            {
                return Err(RegistryError::VersionConflict(format!(
                    "The version for thing {name} does not match the expected version."
                )));
            }
            if a.thing_principals.get(name).is_some_and(|p| !p.is_empty()) {
                return Err(RegistryError::InvalidRequest(format!(
                    "Cannot delete. Thing {name} is still attached to one or more principals"
                )));
            }
            // Its memberships go with it: a thing created later under the same name is in no
            // group (and inherits no group's policies).
            for g in a.thing_memberships.get(name).cloned().unwrap_or_default() {
                tx.delete(Kind::ThingGroupMember, &format!("{g}\n{name}"));
                a.unlink_member(&g, name);
            }
            // And its job executions: a thing created later under the same name gets none of
            // them (nor their documents).
            let jobs: Vec<String> = a
                .executions
                .range((name.to_owned(), String::new())..)
                .take_while(|((t, _), _)| t == name)
                .map(|((_, j), _)| j.clone())
                .collect();
            for j in &jobs {
                tx.delete(Kind::JobExecution, &format!("{j}\n{name}"));
                a.remove_execution(name, j);
                a.maybe_complete(tx, j, now_secs())?;
            }
            a.leave_rollouts(tx, name, now_secs())?;
            tx.delete(Kind::Thing, name);
            tx.bump();
            if let Some(t) = a.things.remove(name) {
                crate::events::thing(tx, a, &t, "DELETED");
                if let Some(ty) = &t.thing_type {
                    crate::events::type_association(tx, a, &t, ty, false);
                }
            }
            Ok(!jobs.is_empty())
        })?;
        if had_jobs {
            self.executions_changed(account, name);
        }
        Ok(())
    }

    /// ListThings.
    pub fn list_things(&self, account: &str, q: &ThingQuery) -> Result<Page<Thing>> {
        self.read(account, |a| {
            let keep = |_: &str, t: &Thing| {
                q.thing_type
                    .as_ref()
                    .is_none_or(|tt| t.thing_type.as_ref() == Some(tt))
                    && match (&q.attribute_name, &q.attribute_value) {
                        (Some(n), Some(v)) => t.attributes.get(n).is_some_and(|x| {
                            if q.use_prefix_attribute_value {
                                x.starts_with(v.as_str())
                            } else {
                                x == v
                            }
                        }),
                        (Some(n), None) => t.attributes.contains_key(n),
                        _ => true,
                    }
            };
            Ok(page_ordered(
                &a.things,
                q.next_token.as_deref(),
                q.max_results,
                keep,
                |_, t| t.clone(),
            ))
        })
    }

    /// CreateThingType (idempotent for the same properties).
    pub fn create_thing_type(
        &self,
        account: &str,
        name: &str,
        description: Option<String>,
        searchable_attributes: Vec<String>,
    ) -> Result<ThingType> {
        check_name("Thing type name", name, 128, thing_name_char)?;
        if description.as_ref().is_some_and(|d| d.len() > 2028) {
            return Err(RegistryError::InvalidRequest(
                "thingTypeDescription is longer than 2028 characters".into(),
            ));
        }
        self.write(account, |a, tx| {
            if let Some(t) = a.thing_types.get(name) {
                if t.description == description && t.searchable_attributes == searchable_attributes
                {
                    return Ok(t.clone());
                }
                return Err(RegistryError::AlreadyExists {
                    message: format!("Thing type {name} already exists with different properties"),
                    resource_id: t.id.clone(),
                    resource_arn: self.arn(account, &format!("thingtype/{name}")),
                });
            }
            let t = ThingType {
                name: name.to_owned(),
                id: uuid_like(),
                description: description.clone(),
                searchable_attributes: searchable_attributes.clone(),
                deprecated: false,
                deprecation_date: None,
                created: now_secs(),
            };
            tx.put(Kind::ThingType, name, &t)?;
            a.thing_types.insert(name.to_owned(), t.clone());
            crate::events::thing_type(tx, a, &t, "CREATED");
            Ok(t)
        })
    }

    /// DescribeThingType.
    pub fn describe_thing_type(&self, account: &str, name: &str) -> Result<ThingType> {
        self.read(account, |a| {
            a.thing_types.get(name).cloned().ok_or_else(|| {
                RegistryError::NotFound(format!("Thing type {name} cannot be found."))
            })
        })
    }

    /// DeprecateThingType (or undo it).
    pub fn deprecate_thing_type(&self, account: &str, name: &str, undo: bool) -> Result<()> {
        self.write(account, |a, tx| {
            let t = a.thing_types.get_mut(name).ok_or_else(|| {
                RegistryError::NotFound(format!("Thing type {name} cannot be found."))
            })?;
            let mut next = t.clone();
            next.deprecated = !undo;
            next.deprecation_date = if undo { None } else { Some(now_secs()) };
            tx.put(Kind::ThingType, name, &next)?;
            *t = next.clone();
            crate::events::thing_type(tx, a, &next, "UPDATED");
            Ok(())
        })
    }

    /// DeleteThingType: the type must be deprecated and no thing may use it.
    pub fn delete_thing_type(&self, account: &str, name: &str) -> Result<()> {
        self.write(account, |a, tx| {
            let t = a.thing_types.get(name).ok_or_else(|| {
                RegistryError::NotFound(format!("Thing type {name} cannot be found."))
            })?;
            if !t.deprecated {
                return Err(RegistryError::InvalidRequest(format!(
                    "Thing type {name} must be deprecated before it can be deleted"
                )));
            }
            if a.things
                .values()
                .any(|th| th.thing_type.as_deref() == Some(name))
            {
                return Err(RegistryError::InvalidRequest(format!(
                    "Thing type {name} cannot be deleted while things are associated with it"
                )));
            }
            tx.delete(Kind::ThingType, name);
            if let Some(t) = a.thing_types.remove(name) {
                crate::events::thing_type(tx, a, &t, "DELETED");
            }
            Ok(())
        })
    }

    /// ListThingTypes.
    pub fn list_thing_types(
        &self,
        account: &str,
        name: Option<&str>,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<ThingType>> {
        self.read(account, |a| {
            let items = a
                .thing_types
                .values()
                .filter(|t| name.is_none_or(|n| t.name == n))
                .map(|t| (t.name.clone(), t.clone()))
                .collect();
            paginate(items, token, max)
        })
    }

    /// AttachThingPrincipal. The principal must be a certificate of this account. An exclusive
    /// attachment requires that the principal has no other thing, and no other attachment may
    /// follow it.
    pub fn attach_thing_principal(
        &self,
        account: &str,
        thing: &str,
        principal: &str,
        kind: ThingPrincipalType,
    ) -> Result<()> {
        self.attach_thing_principal_when(account, thing, principal, kind, |_| Ok(()))
    }

    /// [`Registry::attach_thing_principal`] if `check` passes on the account in the same write
    /// (in a cluster: against the state every earlier write of any node left).
    pub(crate) fn attach_thing_principal_when(
        &self,
        account: &str,
        thing: &str,
        principal: &str,
        kind: ThingPrincipalType,
        check: impl Fn(&Account) -> Result<()>,
    ) -> Result<()> {
        self.write(account, |a, tx| {
            if !a.things.contains_key(thing) {
                return Err(RegistryError::NotFound(format!("Thing {thing} cannot be found.")));
            }
            check(a)?;
            self.check_principal(a, account, principal)?;
            // Counted and looked up, not listed (a principal may have a million things); an
            // exclusive attachment is always its principal's only one.
            let attached = a.principal_things.get(principal);
            let others = attached.map_or(0, |m| m.len() - usize::from(m.contains_key(thing)));
            if kind == ThingPrincipalType::ExclusiveThing && others > 0 {
                return Err(RegistryError::InvalidRequest(
                    "The principal is already attached to another thing; it cannot be attached exclusively".into(),
                ));
            }
            let exclusive_elsewhere = attached.filter(|m| m.len() == 1).is_some_and(|m| {
                m.iter()
                    .any(|(t, k)| **t != *thing && *k == ThingPrincipalType::ExclusiveThing)
            });
            if exclusive_elsewhere {
                return Err(RegistryError::InvalidRequest(
                    "The principal is exclusively attached to another thing".into(),
                ));
            }
            tx.put(Kind::ThingPrincipal, &format!("{thing}\n{principal}"), &kind)?;
            tx.bump();
            a.link(thing, principal, kind);
            Ok(())
        })
    }

    /// DetachThingPrincipal.
    pub fn detach_thing_principal(
        &self,
        account: &str,
        thing: &str,
        principal: &str,
    ) -> Result<()> {
        self.write(account, |a, tx| {
            if !a.things.contains_key(thing) {
                return Err(RegistryError::NotFound(format!(
                    "Thing {thing} cannot be found."
                )));
            }
            tx.delete(Kind::ThingPrincipal, &format!("{thing}\n{principal}"));
            tx.bump();
            a.unlink(thing, principal);
            Ok(())
        })
    }

    /// ListThingPrincipals(V2): (principal ARN, type).
    pub fn list_thing_principals(
        &self,
        account: &str,
        thing: &str,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<(String, ThingPrincipalType)>> {
        self.read(account, |a| {
            if !a.things.contains_key(thing) {
                return Err(RegistryError::NotFound(format!(
                    "Thing {thing} cannot be found."
                )));
            }
            let items = a
                .thing_principals
                .get(thing)
                .map(|ps| {
                    ps.iter()
                        .map(|(p, k)| (p.to_string(), (p.to_string(), *k)))
                        .collect()
                })
                .unwrap_or_default();
            paginate(items, token, max)
        })
    }

    /// ListPrincipalThings(V2): (thing name, type).
    pub fn list_principal_things(
        &self,
        account: &str,
        principal: &str,
        token: Option<&str>,
        max: usize,
    ) -> Result<Page<(String, ThingPrincipalType)>> {
        self.read(account, |a| {
            self.check_principal(a, account, principal)?;
            // Only the page is copied (a principal may have a million things).
            let things = a
                .principal_things
                .get(principal)
                .into_iter()
                .flat_map(|m| m.iter());
            Ok(page_sorted(
                things.map(|(t, k)| (&**t, (t, *k))),
                token,
                max,
                |(t, k)| (t.to_string(), k),
            ))
        })
    }

    /// A principal of this account: a certificate ARN (Cognito identities are accepted as
    /// opaque `region:uuid` ids).
    pub(crate) fn check_principal(
        &self,
        a: &Account,
        account: &str,
        principal: &str,
    ) -> Result<()> {
        let cert_prefix = self.arn(account, "cert/");
        if let Some(id) = principal.strip_prefix(&cert_prefix) {
            if a.certificates.contains_key(id) {
                return Ok(());
            }
            return Err(RegistryError::NotFound(format!(
                "The certificate {id} does not exist"
            )));
        }
        if principal.starts_with("arn:") {
            return Err(RegistryError::InvalidRequest(format!(
                "Principal {principal} is not a principal of this account"
            )));
        }
        let cognito = principal.split_once(':').is_some_and(|(r, id)| {
            !r.is_empty() && id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        });
        if cognito {
            Ok(())
        } else {
            Err(RegistryError::InvalidRequest(format!(
                "Principal {principal} is not valid"
            )))
        }
    }
}

/// A random UUID-shaped id.
pub(crate) fn uuid_like() -> String {
    ThingId::random().to_string()
}
