//! Static thing groups: a hierarchy (one parent, set at creation), thing membership, and the
//! policies attached to a group, which apply to the certificates of its things and of the
//! things of its descendant groups.
//!
//! Rules (AWS IoT Developer Guide, thing-groups): a thing is in at most
//! [`MAX_GROUPS_PER_THING`] groups and in at most one group of a hierarchy (groups sharing a
//! root); a group has at most [`MAX_POLICIES_PER_GROUP`] policies; a hierarchy is at most
//! [`MAX_DEPTH`] deep, a group has at most [`MAX_CHILDREN`] direct children. Deleting a group
//! with children is refused; deleting one with things is not, and takes its memberships and
//! policy attachments with it, as does deleting a thing its memberships: a group or thing of
//! the same name created later starts with none.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::store::Kind;
use crate::things::uuid_like;
use crate::*;

/// Thing groups a thing may be in.
pub const MAX_GROUPS_PER_THING: usize = 10;
/// Policies attached to one thing group.
pub const MAX_POLICIES_PER_GROUP: usize = 2;
/// The deepest a hierarchy may be (a root group is level 1).
pub const MAX_DEPTH: usize = 7;
/// Direct children of one group.
pub const MAX_CHILDREN: usize = 100;
/// The longest description.
pub const MAX_DESCRIPTION: usize = 2028;

/// A static thing group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThingGroup {
    /// Name.
    pub name: String,
    /// Opaque id.
    pub id: String,
    /// The parent group, set at creation.
    pub parent: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
    /// Version, 1 at creation.
    pub version: i64,
    /// Creation time, epoch seconds.
    pub created: f64,
}

/// The changes of UpdateThingGroup.
#[derive(Debug, Clone, Default)]
pub struct GroupUpdate {
    /// New description (`Some("")` clears it).
    pub description: Option<String>,
    /// New attributes.
    pub attributes: Option<BTreeMap<String, String>>,
    /// Merge with existing attributes (an empty value removes one).
    pub merge: bool,
    /// Optimistic locking.
    pub expected_version: Option<i64>,
}

fn group_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')
}

fn member_key(group: &str, thing: &str) -> String {
    format!("{group}\n{thing}")
}

fn group_not_found(name: &str) -> RegistryError {
    RegistryError::NotFound(format!("Thing Group {name} does not exist"))
}

fn check_group_attributes(attrs: &BTreeMap<String, String>) -> Result<()> {
    if attrs.len() > 50 {
        return Err(RegistryError::InvalidRequest(
            "A thing group can have at most 50 attributes".into(),
        ));
    }
    crate::things::check_attribute_pairs(attrs)
}

impl Account {
    /// A group and its ancestors, the group first.
    pub fn group_lineage<'a>(&'a self, group: &'a str) -> Vec<&'a str> {
        let mut out = vec![group];
        let mut cur = group;
        while let Some(p) = self.thing_groups.get(cur).and_then(|g| g.parent.as_deref()) {
            // A stored cycle cannot happen (a parent is set once, at creation, and must
            // exist then); the bound keeps a corrupted database from looping.
            if out.len() > MAX_DEPTH || out.contains(&p) {
                break;
            }
            out.push(p);
            cur = p;
        }
        out
    }

    fn group_root<'a>(&'a self, group: &'a str) -> &'a str {
        self.group_lineage(group).last().copied().unwrap_or(group)
    }

    /// Every group below `group` (not itself), in one pass over the groups.
    fn descendants(&self, group: &str) -> Vec<String> {
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        for (name, tg) in &self.thing_groups {
            if let Some(p) = &tg.parent {
                children.entry(p.as_str()).or_default().push(name);
            }
        }
        let mut out = Vec::new();
        let mut frontier = vec![group];
        while let Some(g) = frontier.pop() {
            for c in children.get(g).into_iter().flatten() {
                out.push((*c).to_owned());
                frontier.push(c);
            }
        }
        out
    }

    /// The names of the policies that reach a thing through its groups and their ancestors,
    /// nearest group first, each once.
    pub fn group_policy_names(&self, thing: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let Some(groups) = self.thing_memberships.get(thing) else {
            return out;
        };
        for g in groups {
            for anc in self.group_lineage(g) {
                let Some(arn) = self.group_arns.get(anc) else {
                    continue;
                };
                for p in self.policy_targets.get(arn.as_str()).into_iter().flatten() {
                    if !out.iter().any(|o| **o == **p) {
                        out.push(p.to_string());
                    }
                }
            }
        }
        out
    }

    pub(crate) fn link_member(&mut self, group: &str, thing: &str) {
        self.group_members
            .entry(group.to_owned())
            .or_default()
            .insert(thing.to_owned());
        self.thing_memberships
            .entry(thing.to_owned())
            .or_default()
            .insert(group.to_owned());
    }

    pub(crate) fn unlink_member(&mut self, group: &str, thing: &str) {
        if let Some(s) = self.group_members.get_mut(group) {
            s.remove(thing);
            if s.is_empty() {
                self.group_members.remove(group);
            }
        }
        if let Some(s) = self.thing_memberships.get_mut(thing) {
            s.remove(group);
            if s.is_empty() {
                self.thing_memberships.remove(thing);
            }
        }
    }
}

impl Registry {
    /// The ARN of a thing group.
    pub fn group_arn(&self, account: &str, name: &str) -> String {
        self.arn(account, &format!("thinggroup/{name}"))
    }

    /// CreateThingGroup: idempotent for the same parent and properties.
    pub fn create_thing_group(
        &self,
        account: &str,
        name: &str,
        parent: Option<&str>,
        description: Option<&str>,
        attributes: BTreeMap<String, String>,
    ) -> Result<ThingGroup> {
        check_name("Thing group name", name, 128, group_name_char)?;
        if let Some(p) = parent {
            check_name("Parent group name", p, 128, group_name_char)?;
        }
        if description.is_some_and(|d| d.len() > MAX_DESCRIPTION) {
            return Err(RegistryError::InvalidRequest(format!(
                "The description can have at most {MAX_DESCRIPTION} characters"
            )));
        }
        check_group_attributes(&attributes)?;
        let arn = self.group_arn(account, name);
        self.write(account, |a, tx| {
            if let Some(existing) = a.thing_groups.get(name) {
                if existing.parent.as_deref() == parent
                    && existing.description.as_deref() == description
                    && existing.attributes == attributes
                {
                    return Ok(existing.clone());
                }
                return Err(RegistryError::AlreadyExists {
                    message: format!(
                        "Thing Group {name} already exists in account with different properties"
                    ),
                    resource_id: existing.id.clone(),
                    resource_arn: arn.clone(),
                });
            }
            if let Some(p) = parent {
                if !a.thing_groups.contains_key(p) {
                    return Err(RegistryError::InvalidRequest(format!(
                        "Parent thing group {p} does not exist"
                    )));
                }
                if a.group_lineage(p).len() >= MAX_DEPTH {
                    return Err(RegistryError::InvalidRequest(format!(
                        "A thing group hierarchy can be at most {MAX_DEPTH} levels deep"
                    )));
                }
                let children = a
                    .thing_groups
                    .values()
                    .filter(|g| g.parent.as_deref() == Some(p))
                    .count();
                if children >= MAX_CHILDREN {
                    return Err(RegistryError::LimitExceeded(format!(
                        "Thing group {p} already has {MAX_CHILDREN} child groups"
                    )));
                }
            }
            let g = ThingGroup {
                name: name.to_owned(),
                id: uuid_like(),
                parent: parent.map(str::to_owned),
                description: description.map(str::to_owned),
                attributes: attributes.clone(),
                version: 1,
                created: now_secs(),
            };
            tx.put(Kind::ThingGroup, name, &g)?;
            a.thing_groups.insert(name.to_owned(), g.clone());
            crate::events::thing_group(tx, a, &g, "CREATED");
            if let Some(p) = &g.parent {
                crate::events::hierarchy(tx, a, p, &g, true);
            }
            a.group_arns.insert(name.to_owned(), arn.clone());
            Ok(g)
        })
    }

    /// DescribeThingGroup.
    pub fn describe_thing_group(
        &self,
        account: &str,
        name: &str,
    ) -> Result<(ThingGroup, Vec<String>)> {
        self.read(account, |a| {
            let g = a
                .thing_groups
                .get(name)
                .cloned()
                .ok_or_else(|| group_not_found(name))?;
            // Root first, parent last.
            let mut ancestors: Vec<String> = a
                .group_lineage(name)
                .into_iter()
                .skip(1)
                .map(str::to_owned)
                .collect();
            ancestors.reverse();
            Ok((g, ancestors))
        })
    }

    /// UpdateThingGroup: returns the new version.
    pub fn update_thing_group(&self, account: &str, name: &str, u: GroupUpdate) -> Result<i64> {
        if u.description
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DESCRIPTION)
        {
            return Err(RegistryError::InvalidRequest(format!(
                "The description can have at most {MAX_DESCRIPTION} characters"
            )));
        }
        self.write(account, |a, tx| {
            let cur = a
                .thing_groups
                .get(name)
                .ok_or_else(|| group_not_found(name))?;
            if let Some(v) = u.expected_version
                && v != cur.version
            {
                return Err(RegistryError::VersionConflict(format!(
                    "The version for thing group {name} does not match the expected version."
                )));
            }
            let mut next = cur.clone();
            if let Some(d) = u.description.clone() {
                next.description = (!d.is_empty()).then_some(d);
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
            check_group_attributes(&next.attributes)?;
            next.version += 1;
            let version = next.version;
            tx.put(Kind::ThingGroup, name, &next)?;
            crate::events::thing_group(tx, a, &next, "UPDATED");
            a.thing_groups.insert(name.to_owned(), next);
            Ok(version)
        })
    }

    /// DeleteThingGroup: succeeds for a group that does not exist; refused while it has child
    /// groups. Its memberships and policy attachments go with it.
    pub fn delete_thing_group(
        &self,
        account: &str,
        name: &str,
        expected_version: Option<i64>,
    ) -> Result<()> {
        let arn = self.group_arn(account, name);
        self.write(account, |a, tx| {
            let Some(cur) = a.thing_groups.get(name) else {
                return Ok(());
            };
            if let Some(v) = expected_version
                && v != cur.version
            {
                return Err(RegistryError::VersionConflict(format!(
                    "The version for thing group {name} does not match the expected version."
                )));
            }
            if a
                .thing_groups
                .values()
                .any(|g| g.parent.as_deref() == Some(name))
            {
                return Err(RegistryError::InvalidRequest(format!(
                    "Cannot delete thing group : {name} when there are still child groups attached to it."
                )));
            }
            let members = a.group_members.get(name).cloned().unwrap_or_default();
            for thing in &members {
                tx.delete(Kind::ThingGroupMember, &member_key(name, thing));
                a.unlink_member(name, thing);
            }
            for policy in a.policy_targets.remove(arn.as_str()).unwrap_or_default() {
                tx.delete(Kind::PolicyAttachment, &format!("{policy}\n{arn}"));
            }
            // Jobs that targeted it no longer do: a group created later under the same name
            // (anywhere in any hierarchy) is not the one those jobs were meant for.
            let targeting: Vec<String> = a
                .jobs
                .values()
                .filter(|j| j.targets.contains(&arn))
                .map(|j| j.id.clone())
                .collect();
            for id in targeting {
                if let Some(j) = a.jobs.get_mut(&id) {
                    j.targets.retain(|t| t != &arn);
                    tx.put(Kind::Job, &id, &*j)?;
                }
            }
            tx.delete(Kind::ThingGroup, name);
            tx.bump();
            if let Some(g) = a.thing_groups.remove(name) {
                crate::events::thing_group(tx, a, &g, "DELETED");
                if let Some(p) = &g.parent {
                    crate::events::hierarchy(tx, a, p, &g, false);
                }
            }
            a.group_arns.remove(name);
            // Things that waited in rollouts through it no longer do.
            for thing in &members {
                a.prune_rollouts(tx, thing, now_secs())?;
            }
            Ok(())
        })
    }

    /// ListThingGroups: every group, or the direct children of `parent` (every descendant
    /// with `recursive`), with a name prefix filter, as (name, ARN).
    pub fn list_thing_groups(
        &self,
        account: &str,
        parent: Option<&str>,
        prefix: Option<&str>,
        recursive: bool,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<(String, String)>> {
        self.read(account, |a| {
            let names: Vec<String> = match parent {
                None => a.thing_groups.keys().cloned().collect(),
                Some(p) => {
                    if !a.thing_groups.contains_key(p) {
                        return Err(group_not_found(p));
                    }
                    let mut v = if recursive {
                        a.descendants(p)
                    } else {
                        a.thing_groups
                            .values()
                            .filter(|g| g.parent.as_deref() == Some(p))
                            .map(|g| g.name.clone())
                            .collect()
                    };
                    v.sort();
                    v
                }
            };
            let items = names
                .into_iter()
                .filter(|n| prefix.is_none_or(|p| n.starts_with(p)))
                .map(|n| {
                    let arn = self.group_arn(account, &n);
                    (n.clone(), (n, arn))
                })
                .collect();
            paginate(items, marker, size)
        })
    }

    /// AddThingToThingGroup (a CONTINUOUS job targeting the group or an ancestor gives the
    /// thing an execution).
    pub fn add_thing_to_group(&self, account: &str, group: &str, thing: &str) -> Result<()> {
        let now = now_secs();
        let queued = self.write(account, |a, tx| {
            if !a.thing_groups.contains_key(group) {
                return Err(group_not_found(group));
            }
            if !a.things.contains_key(thing) {
                return Err(RegistryError::NotFound(format!(
                    "Thing {thing} cannot be found."
                )));
            }
            let current = a.thing_memberships.get(thing).cloned().unwrap_or_default();
            if current.contains(group) {
                return Ok(BTreeSet::new());
            }
            if current.len() >= MAX_GROUPS_PER_THING {
                return Err(RegistryError::InvalidRequest(format!(
                    "Thing {thing} is already in {MAX_GROUPS_PER_THING} thing groups"
                )));
            }
            let root = a.group_root(group);
            if let Some(other) = current.iter().find(|g| a.group_root(g) == root) {
                return Err(RegistryError::InvalidRequest(format!(
                    "Thing {thing} cannot be added to thing group {group}: it is already in thing group {other} of the same hierarchy"
                )));
            }
            tx.put(Kind::ThingGroupMember, &member_key(group, thing), &"")?;
            tx.bump();
            a.link_member(group, thing);
            let arns = (self.group_arn(account, group), self.arn(account, &format!("thing/{thing}")));
            crate::events::membership(tx, a, (&arns.0, &arns.1), group, thing, true);
            self.continuous_jobs_for(a, tx, account, group, thing, now)
        })?;
        for t in queued {
            self.executions_changed(account, &t);
        }
        Ok(())
    }

    /// RemoveThingFromThingGroup.
    pub fn remove_thing_from_group(&self, account: &str, group: &str, thing: &str) -> Result<()> {
        self.write(account, |a, tx| {
            if !a.thing_groups.contains_key(group) {
                return Err(group_not_found(group));
            }
            if !a.things.contains_key(thing) {
                return Err(RegistryError::NotFound(format!(
                    "Thing {thing} cannot be found."
                )));
            }
            if a.group_members
                .get(group)
                .is_some_and(|s| s.contains(thing))
            {
                tx.delete(Kind::ThingGroupMember, &member_key(group, thing));
                tx.bump();
                a.unlink_member(group, thing);
                let arns = (
                    self.group_arn(account, group),
                    self.arn(account, &format!("thing/{thing}")),
                );
                crate::events::membership(tx, a, (&arns.0, &arns.1), group, thing, false);
                // Nor does it wait any more in rollouts that reached it through the group.
                a.prune_rollouts(tx, thing, now_secs())?;
            }
            Ok(())
        })
    }

    /// UpdateThingGroupsForThing: removals, then additions, all or nothing.
    pub fn update_groups_for_thing(
        &self,
        account: &str,
        thing: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<()> {
        let now = now_secs();
        let queued = self.write(account, |a, tx| {
            if !a.things.contains_key(thing) {
                return Err(RegistryError::NotFound(format!(
                    "Thing {thing} cannot be found."
                )));
            }
            for g in add.iter().chain(remove) {
                if !a.thing_groups.contains_key(g) {
                    return Err(group_not_found(g));
                }
            }
            let mut groups = a.thing_memberships.get(thing).cloned().unwrap_or_default();
            for g in remove {
                groups.remove(g);
            }
            for g in add {
                if groups.contains(g) {
                    continue;
                }
                let root = a.group_root(g);
                if let Some(other) = groups.iter().find(|o| a.group_root(o) == root) {
                    return Err(RegistryError::InvalidRequest(format!(
                        "Thing {thing} cannot be added to thing group {g}: it is already in thing group {other} of the same hierarchy"
                    )));
                }
                groups.insert(g.clone());
            }
            if groups.len() > MAX_GROUPS_PER_THING {
                return Err(RegistryError::InvalidRequest(format!(
                    "Thing {thing} can be in at most {MAX_GROUPS_PER_THING} thing groups"
                )));
            }
            let before = a.thing_memberships.get(thing).cloned().unwrap_or_default();
            for g in before.difference(&groups) {
                tx.delete(Kind::ThingGroupMember, &member_key(g, thing));
            }
            for g in groups.difference(&before) {
                tx.put(Kind::ThingGroupMember, &member_key(g, thing), &"")?;
            }
            for g in before.difference(&groups) {
                a.unlink_member(g, thing);
                let arns = (self.group_arn(account, g), self.arn(account, &format!("thing/{thing}")));
                crate::events::membership(tx, a, (&arns.0, &arns.1), g, thing, false);
            }
            let mut queued = BTreeSet::new();
            for g in groups.difference(&before) {
                a.link_member(g, thing);
                let arns = (self.group_arn(account, g), self.arn(account, &format!("thing/{thing}")));
                crate::events::membership(tx, a, (&arns.0, &arns.1), g, thing, true);
                queued.extend(self.continuous_jobs_for(a, tx, account, g, thing, now)?);
            }
            // A thing that left a group leaves the rollouts that reached it through it.
            if !before.is_subset(&groups) {
                a.prune_rollouts(tx, thing, now)?;
            }
            tx.bump();
            Ok(queued)
        })?;
        for t in queued {
            self.executions_changed(account, &t);
        }
        Ok(())
    }

    /// ListThingsInThingGroup (with `recursive`, the things of descendant groups too).
    pub fn list_things_in_group(
        &self,
        account: &str,
        group: &str,
        recursive: bool,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<String>> {
        self.read(account, |a| {
            if !a.thing_groups.contains_key(group) {
                return Err(group_not_found(group));
            }
            let mut groups = vec![group.to_owned()];
            if recursive {
                groups.extend(a.descendants(group));
            }
            // Only the page is copied: one group's members are already a sorted set; several
            // groups' are merged as references first.
            let page = if let [only] = groups.as_slice() {
                let members = from_marker(a.group_members.get(only), marker);
                page_sorted(
                    members.map(|t| (t.as_str(), t)),
                    marker,
                    size,
                    String::clone,
                )
            } else {
                let things: BTreeSet<&str> = groups
                    .iter()
                    .filter_map(|g| a.group_members.get(g))
                    .flatten()
                    .map(String::as_str)
                    .collect();
                page_sorted(
                    things.into_iter().map(|t| (t, t)),
                    marker,
                    size,
                    str::to_owned,
                )
            };
            Ok(page)
        })
    }

    /// ListThingGroupsForThing: the groups a thing is directly in, as (name, ARN).
    pub fn list_groups_for_thing(
        &self,
        account: &str,
        thing: &str,
        marker: Option<&str>,
        size: usize,
    ) -> Result<Page<(String, String)>> {
        self.read(account, |a| {
            if !a.things.contains_key(thing) {
                return Err(RegistryError::NotFound(format!(
                    "Thing {thing} cannot be found."
                )));
            }
            let items = a
                .thing_memberships
                .get(thing)
                .into_iter()
                .flatten()
                .map(|g| (g.clone(), (g.clone(), self.group_arn(account, g))))
                .collect();
            paginate(items, marker, size)
        })
    }
}
