"""Registry and job events on `$aws/events/...`, sent only for the event types an account
enabled with UpdateEventConfigurations (the AWS CLI), received with paho."""

import json
import queue

import pytest
from botocore.config import Config

from conftest import ALLOW_ALL, Device, Paho, unique


def drain(p, seconds=1.0):
    out = []
    while True:
        try:
            m = p.messages.get(timeout=seconds)
        except queue.Empty:
            return out
        out.append((m.topic, json.loads(m.payload)))


def test_registry_and_job_events_follow_the_event_configuration(server, workdir):
    iot = server.boto()
    account = server.account_id()
    mon = Paho(server, server.endpoint(), Device(server, iot, unique("evmon"), ALLOW_ALL, workdir), unique("evmon"))
    assert mon.connect()[0] == 0
    mon.subscribe("$aws/events/#", qos=1)
    drain(mon, 0.3)

    # Off by default, as on AWS.
    cfg = server.aws("iot", "describe-event-configurations")["eventConfigurations"]
    assert cfg["THING"] == {"Enabled": False} and len(cfg) == 11
    quiet = unique("quiet")
    iot.create_thing(thingName=quiet)
    assert [t for t, _ in drain(mon, 0.5) if "/thing/" in t] == []

    server.aws("iot", "update-event-configurations", "--event-configurations",
               '{"THING":{"Enabled":true},"THING_GROUP":{"Enabled":true},"THING_GROUP_MEMBERSHIP":{"Enabled":true},'
               '"JOB":{"Enabled":true},"JOB_EXECUTION":{"Enabled":true}}')
    assert server.aws("iot", "describe-event-configurations")["eventConfigurations"]["JOB"] == {"Enabled": True}
    thing, group, job = unique("evt"), unique("evg"), unique("evj")
    iot.create_thing(thingName=thing, attributePayload={"attributes": {"a": "1"}})
    iot.update_thing(thingName=thing, attributePayload={"attributes": {"a": "2"}})
    iot.create_thing_group(thingGroupName=group)
    iot.add_thing_to_thing_group(thingGroupName=group, thingName=thing)
    iot.create_job(jobId=job, targets=[iot.describe_thing(thingName=thing)["thingArn"]], document="{}")
    iot.cancel_job(jobId=job)
    iot.delete_job(jobId=job)
    iot.remove_thing_from_thing_group(thingGroupName=group, thingName=thing)
    iot.delete_thing(thingName=thing)
    events = drain(mon)
    topics = [t for t, _ in events]
    assert topics == [
        f"$aws/events/thing/{thing}/created",
        f"$aws/events/thing/{thing}/updated",
        f"$aws/events/thingGroup/{group}/created",
        f"$aws/events/thingGroupMembership/thingGroup/{group}/thing/{thing}/added",
        f"$aws/events/jobExecution/{job}/canceled",
        f"$aws/events/job/{job}/canceled",
        f"$aws/events/job/{job}/deleted",
        f"$aws/events/thingGroupMembership/thingGroup/{group}/thing/{thing}/removed",
        f"$aws/events/thing/{thing}/deleted",
    ], topics
    by = dict(events)
    created = by[f"$aws/events/thing/{thing}/created"]
    assert (created["eventType"], created["operation"], created["accountId"], created["thingName"],
            created["attributes"]) == ("THING_EVENT", "CREATED", account, thing, {"a": "1"})
    assert by[f"$aws/events/thing/{thing}/updated"]["versionNumber"] == 2
    ex = by[f"$aws/events/jobExecution/{job}/canceled"]
    assert (ex["eventType"], ex["status"], ex["thingArn"].endswith(f":thing/{thing}")) == ("JOB_EXECUTION", "CANCELED", True)
    assert len({e["eventId"] for _, e in events}) == len(events)

    # Turned off again: nothing more.
    server.aws("iot", "update-event-configurations", "--event-configurations", '{"THING":{"Enabled":false}}')
    iot.create_thing(thingName=unique("after"))
    assert [t for t, _ in drain(mon, 0.5) if "/thing/" in t] == []
    # An unknown type is the server's refusal too (boto3's own check is skipped here).
    raw = server.boto(config=Config(parameter_validation=False))
    with pytest.raises(raw.exceptions.InvalidRequestException):
        raw.update_event_configurations(eventConfigurations={"NOPE": {"Enabled": True}})
    mon.close()


def test_thing_type_association_and_hierarchy_events(server, workdir):
    """THING_TYPE (`thingType/<name>/{created,updated,deleted}`, a deprecation being an update),
    THING_TYPE_ASSOCIATION (`thingTypeAssociation/thing/<thing>/<type>`, ADDED or REMOVED as a
    thing takes or leaves a type, also by its creation and deletion) and THING_GROUP_HIERARCHY
    (`thingGroupHierarchy/thingGroup/<parent>/childThingGroup/<child>/{added,removed}`)."""
    iot = server.boto()
    account = server.account_id()
    mon = Paho(server, server.endpoint(), Device(server, iot, unique("evmon2"), ALLOW_ALL, workdir), unique("evmon2"))
    assert mon.connect()[0] == 0
    mon.subscribe("$aws/events/#", qos=1)
    kinds = ("THING_TYPE", "THING_TYPE_ASSOCIATION", "THING_GROUP_HIERARCHY")
    server.aws("iot", "update-event-configurations", "--event-configurations",
               json.dumps({k: {"Enabled": True} for k in kinds}))
    drain(mon, 0.3)
    ty, ty2, thing, parent, child = unique("evty"), unique("evty2"), unique("evtt"), unique("evp"), unique("evc")
    iot.create_thing_type(thingTypeName=ty, thingTypeProperties={"searchableAttributes": ["model"],
                                                                 "thingTypeDescription": "lamps"})
    iot.create_thing_type(thingTypeName=ty2)
    iot.create_thing(thingName=thing, thingTypeName=ty)
    iot.update_thing(thingName=thing, thingTypeName=ty2)
    iot.update_thing(thingName=thing, removeThingType=True)
    iot.update_thing(thingName=thing, thingTypeName=ty)
    iot.delete_thing(thingName=thing)
    iot.deprecate_thing_type(thingTypeName=ty)
    iot.delete_thing_type(thingTypeName=ty)
    iot.create_thing_group(thingGroupName=parent)
    iot.create_thing_group(thingGroupName=child, parentGroupName=parent)
    iot.delete_thing_group(thingGroupName=child)
    # (Other tests may have left other event types on.)
    ours = ("$aws/events/thingType/", "$aws/events/thingTypeAssociation/", "$aws/events/thingGroupHierarchy/")
    events = [(t, e) for t, e in drain(mon)
              if t.startswith(ours) and not t.startswith(f"$aws/events/thingType/{ty2}")]
    assoc = f"$aws/events/thingTypeAssociation/thing/{thing}"
    hier = f"$aws/events/thingGroupHierarchy/thingGroup/{parent}/childThingGroup/{child}"
    assert [(t, e["operation"]) for t, e in events] == [
        (f"$aws/events/thingType/{ty}/created", "CREATED"),
        (f"{assoc}/{ty}", "ADDED"),
        (f"{assoc}/{ty}", "REMOVED"), (f"{assoc}/{ty2}", "ADDED"),
        (f"{assoc}/{ty2}", "REMOVED"),
        (f"{assoc}/{ty}", "ADDED"),
        (f"{assoc}/{ty}", "REMOVED"),
        (f"$aws/events/thingType/{ty}/updated", "UPDATED"),
        (f"$aws/events/thingType/{ty}/deleted", "DELETED"),
        (f"{hier}/added", "ADDED"),
        (f"{hier}/removed", "REMOVED"),
    ], events
    by = dict(events)
    created = by[f"$aws/events/thingType/{ty}/created"]
    assert (created["eventType"], created["accountId"], created["thingTypeName"], created["isDeprecated"],
            created["searchableAttributes"], created["description"]) == (
        "THING_TYPE_EVENT", account, ty, False, ["model"], "lamps")
    assert by[f"$aws/events/thingType/{ty}/updated"]["isDeprecated"] is True
    a = events[1][1]
    assert (a["eventType"], a["thingName"], a["thingTypeName"]) == ("THING_TYPE_ASSOCIATION_EVENT", thing, ty)
    h = by[f"{hier}/added"]
    assert (h["eventType"], h["thingGroupName"], h["childGroupName"]) == ("THING_GROUP_HIERARCHY_EVENT", parent, child)
    assert h["thingGroupId"] == iot.describe_thing_group(thingGroupName=parent)["thingGroupId"]
    server.aws("iot", "update-event-configurations", "--event-configurations",
               json.dumps({k: {"Enabled": False} for k in kinds}))
    mon.close()
