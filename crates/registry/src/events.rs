//! Registry and job events (`$aws/events/thing/...`, `thingGroup...`, `job...`), sent only for
//! the event types an account enabled with UpdateEventConfigurations, as AWS does. A write
//! that makes one puts it in its transaction's changes, so it goes out on the change feed only
//! once the write is stored; the gateway publishes it.

use serde_json::{Value, json};

use crate::store::Kind;
use crate::*;

/// The event types AWS names (EventType).
pub const EVENT_TYPES: &[&str] = &[
    "THING",
    "THING_GROUP",
    "THING_TYPE",
    "THING_GROUP_MEMBERSHIP",
    "THING_GROUP_HIERARCHY",
    "THING_TYPE_ASSOCIATION",
    "JOB",
    "JOB_EXECUTION",
    "POLICY",
    "CERTIFICATE",
    "CA_CERTIFICATE",
];

fn event_id() -> String {
    crate::things::uuid_like()
}

fn now_ms() -> u64 {
    (now_secs() * 1000.0) as u64
}

impl Tx {
    /// Queues an event of `kind` if the account enabled it.
    pub(crate) fn event(&mut self, a: &Account, kind: &str, topic: String, mut payload: Value) {
        if !a.event_config.get(kind).copied().unwrap_or(false) {
            return;
        }
        payload["eventId"] = json!(event_id());
        payload["accountId"] = json!(a.id());
        self.change(Change::Event {
            account: a.id().to_owned(),
            topic,
            payload: payload.to_string(),
        });
    }
}

/// `$aws/events/thing/{name}/{created|updated|deleted}`.
pub(crate) fn thing(tx: &mut Tx, a: &Account, t: &Thing, operation: &str) {
    tx.event(
        a,
        "THING",
        format!(
            "$aws/events/thing/{}/{}",
            t.name,
            operation.to_ascii_lowercase()
        ),
        json!({"eventType": "THING_EVENT", "timestamp": now_ms(), "operation": operation,
            "thingId": t.id, "thingName": t.name, "versionNumber": t.version,
            "thingTypeName": t.thing_type, "attributes": t.attributes}),
    );
}

/// `$aws/events/thingGroup/{name}/{created|updated|deleted}`.
pub(crate) fn thing_group(tx: &mut Tx, a: &Account, g: &crate::ThingGroup, operation: &str) {
    let mut v = json!({"eventType": "THING_GROUP_EVENT", "timestamp": now_ms(), "operation": operation,
        "thingGroupId": g.id, "thingGroupName": g.name, "versionNumber": g.version,
        "description": g.description, "attributes": g.attributes});
    if let Some(p) = &g.parent {
        v["parentGroupName"] = json!(p);
        if let Some(pg) = a.thing_groups.get(p) {
            v["parentGroupId"] = json!(pg.id);
        }
    }
    tx.event(
        a,
        "THING_GROUP",
        format!(
            "$aws/events/thingGroup/{}/{}",
            g.name,
            operation.to_ascii_lowercase()
        ),
        v,
    );
}

/// `$aws/events/thingType/{name}/{created|updated|deleted}` (a deprecation, or its undoing, is
/// an update).
pub(crate) fn thing_type(tx: &mut Tx, a: &Account, t: &crate::ThingType, operation: &str) {
    tx.event(
        a,
        "THING_TYPE",
        format!(
            "$aws/events/thingType/{}/{}",
            t.name,
            operation.to_ascii_lowercase()
        ),
        json!({"eventType": "THING_TYPE_EVENT", "timestamp": now_ms(), "operation": operation,
            "thingTypeId": t.id, "thingTypeName": t.name, "isDeprecated": t.deprecated,
            "deprecationDate": t.deprecation_date.map(|d| (d * 1000.0) as u64),
            "searchableAttributes": t.searchable_attributes, "propagatingAttributes": [],
            "description": t.description}),
    );
}

/// `$aws/events/thingTypeAssociation/thing/{thing}/{type}`: a thing took (`ADDED`) or left
/// (`REMOVED`) a type.
pub(crate) fn type_association(tx: &mut Tx, a: &Account, t: &Thing, thing_type: &str, added: bool) {
    let op = if added { "ADDED" } else { "REMOVED" };
    tx.event(
        a,
        "THING_TYPE_ASSOCIATION",
        format!(
            "$aws/events/thingTypeAssociation/thing/{}/{thing_type}",
            t.name
        ),
        json!({"eventType": "THING_TYPE_ASSOCIATION_EVENT", "timestamp": now_ms(), "operation": op,
            "thingId": t.id, "thingName": t.name, "thingTypeName": thing_type}),
    );
}

/// `$aws/events/thingGroupHierarchy/thingGroup/{parent}/childThingGroup/{child}/{added|removed}`.
pub(crate) fn hierarchy(
    tx: &mut Tx,
    a: &Account,
    parent: &str,
    child: &crate::ThingGroup,
    added: bool,
) {
    let op = if added { "ADDED" } else { "REMOVED" };
    tx.event(
        a,
        "THING_GROUP_HIERARCHY",
        format!(
            "$aws/events/thingGroupHierarchy/thingGroup/{parent}/childThingGroup/{}/{}",
            child.name,
            op.to_ascii_lowercase()
        ),
        json!({"eventType": "THING_GROUP_HIERARCHY_EVENT", "timestamp": now_ms(), "operation": op,
            "thingGroupId": a.thing_groups.get(parent).map(|g| g.id.clone()), "thingGroupName": parent,
            "childGroupId": child.id, "childGroupName": child.name}),
    );
}

/// `$aws/events/thingGroupMembership/thingGroup/{group}/thing/{thing}/{added|removed}`.
pub(crate) fn membership(
    tx: &mut Tx,
    a: &Account,
    arns: (&str, &str),
    group: &str,
    thing: &str,
    added: bool,
) {
    let (group_arn, thing_arn) = arns;
    let op = if added { "ADDED" } else { "REMOVED" };
    tx.event(
        a,
        "THING_GROUP_MEMBERSHIP",
        format!(
            "$aws/events/thingGroupMembership/thingGroup/{group}/thing/{thing}/{}",
            op.to_ascii_lowercase()
        ),
        json!({"eventType": "THING_GROUP_MEMBERSHIP_EVENT", "timestamp": now_ms(), "operation": op,
            "groupArn": group_arn, "groupId": a.thing_groups.get(group).map(|g| g.id.clone()),
            "thingArn": thing_arn, "thingId": a.things.get(thing).map(|t| t.id.clone()),
            "membershipId": event_id()}),
    );
}

/// `$aws/events/job/{jobId}/{completed|canceled|deleted}`.
pub(crate) fn job(tx: &mut Tx, a: &Account, j: &crate::Job, operation: &str) {
    tx.event(
        a,
        "JOB",
        format!("$aws/events/job/{}/{}", j.id, operation.to_ascii_lowercase()),
        json!({"eventType": "JOB", "timestamp": now_secs() as u64, "operation": operation,
            "jobId": j.id, "status": operation, "targetSelection": if j.continuous { "CONTINUOUS" } else { "SNAPSHOT" },
            "targets": j.targets, "description": j.description,
            "createdAt": (j.created_at * 1000.0) as u64, "lastUpdatedAt": (j.last_updated_at * 1000.0) as u64,
            "completedAt": j.completed_at.map(|c| (c * 1000.0) as u64)}),
    );
}

/// `$aws/events/jobExecution/{jobId}/{status}` for an execution that ended.
pub(crate) fn execution(tx: &mut Tx, a: &Account, thing_arn: &str, e: &crate::Execution) {
    let status = e.status.as_str();
    tx.event(
        a,
        "JOB_EXECUTION",
        format!(
            "$aws/events/jobExecution/{}/{}",
            e.job_id,
            status.to_ascii_lowercase()
        ),
        json!({"eventType": "JOB_EXECUTION", "timestamp": now_secs() as u64, "operation": status,
            "jobId": e.job_id, "thingArn": thing_arn, "status": status, "statusDetails": e.status_details}),
    );
}

impl Registry {
    /// UpdateEventConfigurations: turns event types on or off.
    pub fn update_event_configurations(
        &self,
        account: &str,
        changes: &[(String, bool)],
    ) -> Result<()> {
        for (k, _) in changes {
            if !EVENT_TYPES.contains(&k.as_str()) {
                return Err(RegistryError::InvalidRequest(format!(
                    "{k} is not an event type"
                )));
            }
        }
        self.write(account, |a, tx| {
            for (k, on) in changes {
                a.event_config.insert(k.clone(), *on);
            }
            tx.put(Kind::EventConfig, "", &a.event_config)?;
            Ok(())
        })
    }

    /// DescribeEventConfigurations: every type, enabled or not.
    pub fn event_configurations(&self, account: &str) -> Result<Vec<(&'static str, bool)>> {
        self.read(account, |a| {
            Ok(EVENT_TYPES
                .iter()
                .map(|t| (*t, a.event_config.get(*t).copied().unwrap_or(false)))
                .collect())
        })
    }
}
