"""Static thing groups with the stock AWS CLI and boto3: the hierarchy, membership, and policies
attached to a group reaching the certificates of its things (and of its descendants' things)
over MQTT with paho, as GetEffectivePolicies and TestAuthorization say."""

import json
import time

import boto3
import pytest
from botocore.config import Config

from conftest import Device, Paho, unique
from helpers import keys


def test_hierarchy_with_the_cli(server):
    root, mid, leaf = unique("root"), unique("mid"), unique("leaf")
    out = server.aws("iot", "create-thing-group", "--thing-group-name", root,
                     "--thing-group-properties", "thingGroupDescription=top,attributePayload={attributes={site=a}}")
    assert out["thingGroupArn"].endswith(f":thinggroup/{root}")
    root_id = out["thingGroupId"]
    server.aws("iot", "create-thing-group", "--thing-group-name", mid, "--parent-group-name", root)
    server.aws("iot", "create-thing-group", "--thing-group-name", leaf, "--parent-group-name", mid)
    # Idempotent for the same properties; refused for others.
    again = server.aws("iot", "create-thing-group", "--thing-group-name", root, "--thing-group-properties",
                       "thingGroupDescription=top,attributePayload={attributes={site=a}}")
    assert again["thingGroupId"] == root_id
    cp = server.aws("iot", "create-thing-group", "--thing-group-name", root, check=False)
    assert cp.returncode != 0 and "ResourceAlreadyExistsException" in cp.stderr
    cp = server.aws("iot", "create-thing-group", "--thing-group-name", unique("orphan"),
                    "--parent-group-name", "no-such-group", check=False)
    assert cp.returncode != 0 and "InvalidRequestException" in cp.stderr

    d = server.aws("iot", "describe-thing-group", "--thing-group-name", leaf)
    assert d["version"] == 1 and d["thingGroupMetadata"]["parentGroupName"] == mid
    assert [g["groupName"] for g in d["thingGroupMetadata"]["rootToParentThingGroups"]] == [root, mid]
    d = server.aws("iot", "describe-thing-group", "--thing-group-name", root)
    assert d["thingGroupProperties"] == {"thingGroupDescription": "top", "attributePayload": {"attributes": {"site": "a"}}}

    names = lambda out: [g["groupName"] for g in out["thingGroups"]]  # noqa: E731
    assert names(server.aws("iot", "list-thing-groups", "--parent-group", root)) == [mid]
    assert sorted(names(server.aws("iot", "list-thing-groups", "--parent-group", root, "--recursive"))) == sorted([mid, leaf])
    assert {root, mid, leaf} <= set(names(server.aws("iot", "list-thing-groups")))
    assert names(server.aws("iot", "list-thing-groups", "--name-prefix-filter", leaf)) == [leaf]

    v = server.aws("iot", "update-thing-group", "--thing-group-name", mid, "--thing-group-properties",
                   "attributePayload={attributes={floor=2}}")
    assert v["version"] == 2
    cp = server.aws("iot", "update-thing-group", "--thing-group-name", mid, "--expected-version", "1",
                    "--thing-group-properties", "thingGroupDescription=x", check=False)
    assert cp.returncode != 0 and "VersionConflictException" in cp.stderr

    cp = server.aws("iot", "delete-thing-group", "--thing-group-name", mid, check=False)
    assert cp.returncode != 0
    assert f"Cannot delete thing group : {mid} when there are still child groups attached to it." in cp.stderr
    server.aws("iot", "delete-thing-group", "--thing-group-name", leaf)
    server.aws("iot", "delete-thing-group", "--thing-group-name", leaf)  # gone already: still fine
    cp = server.aws("iot", "describe-thing-group", "--thing-group-name", leaf, check=False)
    assert cp.returncode != 0 and "ResourceNotFoundException" in cp.stderr


def test_membership_rules(server):
    iot = server.boto()
    a, a1, a2, b = unique("a"), unique("a1"), unique("a2"), unique("b")
    iot.create_thing_group(thingGroupName=a)
    iot.create_thing_group(thingGroupName=a1, parentGroupName=a)
    iot.create_thing_group(thingGroupName=a2, parentGroupName=a)
    iot.create_thing_group(thingGroupName=b)
    thing = unique("member")
    arn = iot.create_thing(thingName=thing)["thingArn"]
    iot.add_thing_to_thing_group(thingGroupName=a1, thingArn=arn)
    iot.add_thing_to_thing_group(thingGroupName=a1, thingName=thing)  # already there: fine
    # Not in two groups of one hierarchy.
    with pytest.raises(iot.exceptions.InvalidRequestException):
        iot.add_thing_to_thing_group(thingGroupName=a2, thingName=thing)
    iot.add_thing_to_thing_group(thingGroupName=b, thingName=thing)
    groups = iot.list_thing_groups_for_thing(thingName=thing)["thingGroups"]
    assert sorted(g["groupName"] for g in groups) == sorted([a1, b])
    assert iot.list_things_in_thing_group(thingGroupName=a)["things"] == []
    assert iot.list_things_in_thing_group(thingGroupName=a, recursive=True)["things"] == [thing]
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.add_thing_to_thing_group(thingGroupName="no-such-group", thingName=thing)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.add_thing_to_thing_group(thingGroupName=a, thingName="no-such-thing")

    # UpdateThingGroupsForThing moves it within a hierarchy in one step.
    iot.update_thing_groups_for_thing(thingName=thing, thingGroupsToAdd=[a2], thingGroupsToRemove=[a1])
    assert sorted(g["groupName"] for g in iot.list_thing_groups_for_thing(thingName=thing)["thingGroups"]) == sorted([a2, b])
    iot.remove_thing_from_thing_group(thingGroupName=b, thingName=thing)
    assert [g["groupName"] for g in iot.list_thing_groups_for_thing(thingName=thing)["thingGroups"]] == [a2]

    # Ten groups at most (N accepted, N+1 refused).
    extra = [unique(f"g{i}") for i in range(10)]
    for g in extra:
        iot.create_thing_group(thingGroupName=g)
    for g in extra[:9]:
        iot.add_thing_to_thing_group(thingGroupName=g, thingName=thing)
    with pytest.raises(iot.exceptions.InvalidRequestException):
        iot.add_thing_to_thing_group(thingGroupName=extra[9], thingName=thing)

    # A deleted thing leaves its groups: the same name created again is in none.
    iot.delete_thing(thingName=thing)
    iot.create_thing(thingName=thing)
    assert iot.list_thing_groups_for_thing(thingName=thing)["thingGroups"] == []
    assert iot.list_things_in_thing_group(thingGroupName=a2)["things"] == []


def publish_policy(account, topic):
    arn = f"arn:aws:iot:us-east-1:{account}"
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/*"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"{arn}:topic/{topic}"}]})


def connects(server, dev, client_id):
    p = Paho(server, server.endpoint(), dev, client_id, v5=True)
    try:
        rc = p.connect()[0]
        return rc == 0
    finally:
        p.close()


def test_group_policies_reach_the_things_certificates(server, workdir):
    """A certificate with no policy of its own connects once its thing's grandparent group has
    a policy, only as that thing (the client id names it), and loses it when the thing leaves
    the group or the group is deleted; a group created again under the same name has none.
    GetEffectivePolicies and TestAuthorization show the inherited policy."""
    iot = server.boto()
    account = server.account_id()
    top, mid, leaf = unique("top"), unique("mid"), unique("leaf")
    iot.create_thing_group(thingGroupName=top)
    iot.create_thing_group(thingGroupName=mid, parentGroupName=top)
    iot.create_thing_group(thingGroupName=leaf, parentGroupName=mid)
    dev = Device(server, iot, unique("grp"), None, workdir)
    iot.add_thing_to_thing_group(thingGroupName=leaf, thingName=dev.name)
    assert not connects(server, dev, dev.name), "no policy yet"

    pol = unique("grp-pol")
    iot.create_policy(policyName=pol, policyDocument=publish_policy(account, "grp/*"))
    top_arn = iot.describe_thing_group(thingGroupName=top)["thingGroupArn"]
    iot.attach_policy(policyName=pol, target=top_arn)
    time.sleep(0.2)
    assert connects(server, dev, dev.name)
    assert not connects(server, dev, unique("not-the-thing")), "group policies reach only the thing's connection"

    eff = iot.get_effective_policies(principal=dev.cert_arn, thingName=dev.name)["effectivePolicies"]
    assert [p["policyName"] for p in eff] == [pol]
    assert iot.get_effective_policies(principal=dev.cert_arn)["effectivePolicies"] == []
    leaf_arn = iot.describe_thing_group(thingGroupName=leaf)["thingGroupArn"]
    assert iot.list_attached_policies(target=leaf_arn)["policies"] == []
    assert [p["policyName"] for p in iot.list_attached_policies(target=leaf_arn, recursive=True)["policies"]] == [pol]
    res = f"arn:aws:iot:us-east-1:{account}:topic/grp/x"
    out = iot.test_authorization(principal=dev.cert_arn, clientId=dev.name,
                                 authInfos=[{"actionType": "PUBLISH", "resources": [res]}])
    assert out["authResults"][0]["authDecision"] == "ALLOWED"
    assert out["authResults"][0]["allowed"]["policies"][0]["policyName"] == pol

    # A live connection loses the inherited permission when the thing leaves the group.
    p = Paho(server, server.endpoint(), dev, dev.name, v5=True)
    assert p.connect()[0] == 0
    p.c.publish("grp/x", b"1", qos=1)
    assert p.pubacks.get(timeout=5)[1].value == 0
    iot.remove_thing_from_thing_group(thingGroupName=leaf, thingName=dev.name)
    time.sleep(1.2)
    p.c.publish("grp/x", b"2", qos=1)
    assert p.pubacks.get(timeout=5)[1].value == 0x87
    p.close()

    # Two policies per group (N accepted, N+1 refused).
    extra = [unique("extra") for _ in range(2)]
    for e in extra:
        iot.create_policy(policyName=e, policyDocument=publish_policy(account, "other"))
    iot.attach_policy(policyName=extra[0], target=top_arn)
    with pytest.raises(iot.exceptions.LimitExceededException):
        iot.attach_policy(policyName=extra[1], target=top_arn)

    # Deleting a group takes its attachments: the same name created again grants nothing.
    iot.add_thing_to_thing_group(thingGroupName=leaf, thingName=dev.name)
    assert connects(server, dev, dev.name)
    iot.delete_thing_group(thingGroupName=leaf)
    iot.delete_thing_group(thingGroupName=mid)
    iot.delete_thing_group(thingGroupName=top)
    iot.create_thing_group(thingGroupName=top)
    iot.add_thing_to_thing_group(thingGroupName=top, thingName=dev.name)
    assert iot.list_attached_policies(target=top_arn)["policies"] == []
    assert not connects(server, dev, dev.name)


def test_membership_is_authorized_on_the_group_and_the_thing(server):
    """IAM: AddThingToThingGroup is authorized on both the group and the thing the request
    names, by name or by ARN."""
    iot = server.boto()
    iam = server.boto("iam")
    account = server.account_id()
    ok, other, thing = unique("ok"), unique("other"), unique("t")
    for g in (ok, other):
        iot.create_thing_group(thingGroupName=g)
    iot.create_thing(thingName=thing)
    user = unique("grouper")
    iam.create_user(UserName=user)
    arn = f"arn:aws:iot:us-east-1:{account}"
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:AddThingToThingGroup",
                                                "Resource": [f"{arn}:thinggroup/{ok}", f"{arn}:thing/{thing}"]}]}))
    creds = keys(iam.create_access_key(UserName=user)["AccessKey"])
    time.sleep(0.1)
    c = boto3.client("iot", region_name="us-east-1", endpoint_url=f"https://localhost:{server.api_port}",
                     verify=server.ca, config=Config(retries={"max_attempts": 1}), **creds)
    c.add_thing_to_thing_group(thingGroupName=ok, thingName=thing)
    with pytest.raises(c.exceptions.ClientError) as e:
        c.add_thing_to_thing_group(thingGroupArn=f"{arn}:thinggroup/{other}", thingName=thing)
    assert e.value.response["Error"]["Code"] == "AccessDeniedException"
    assert f"thinggroup/{other}" in e.value.response["Error"]["Message"]
    # A name and an ARN that disagree are refused before anything is authorized or done.
    with pytest.raises(c.exceptions.ClientError) as e:
        c.add_thing_to_thing_group(thingGroupName=ok, thingGroupArn=f"{arn}:thinggroup/{other}", thingName=thing)
    assert e.value.response["Error"]["Code"] == "InvalidRequestException"
    assert [g["groupName"] for g in iot.list_thing_groups_for_thing(thingName=thing)["thingGroups"]] == [ok]


def test_a_new_groups_parent_is_authorized_too(server):
    """What a parent group has (policies, continuous jobs) reaches its children's things, so
    CreateThingGroup authorizes the parent it names as well as the new group: a user allowed
    only `team-*` groups cannot hang one under `admins`."""
    iot = server.boto()
    iam = server.boto("iam")
    account = server.account_id()
    admins, team = unique("admins"), unique("team")
    iot.create_thing_group(thingGroupName=admins)
    iot.create_thing_group(thingGroupName=team)
    user = unique("teamlead")
    iam.create_user(UserName=user)
    arn = f"arn:aws:iot:us-east-1:{account}"
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:CreateThingGroup",
                                                "Resource": f"{arn}:thinggroup/{team}*"}]}))
    creds = keys(iam.create_access_key(UserName=user)["AccessKey"])
    time.sleep(0.1)
    c = boto3.client("iot", region_name="us-east-1", endpoint_url=f"https://localhost:{server.api_port}",
                     verify=server.ca, config=Config(retries={"max_attempts": 1}), **creds)
    c.create_thing_group(thingGroupName=f"{team}-a", parentGroupName=team)
    with pytest.raises(c.exceptions.ClientError) as e:
        c.create_thing_group(thingGroupName=f"{team}-b", parentGroupName=admins)
    assert e.value.response["Error"]["Code"] == "AccessDeniedException"
    assert f"thinggroup/{admins}" in e.value.response["Error"]["Message"]
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_thing_group(thingGroupName=f"{team}-b")
