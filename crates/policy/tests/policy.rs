#![allow(clippy::unwrap_used)]
use proptest::prelude::*;
use sekisho_policy::*;

const ARN: &str = "arn:aws:iot:us-east-1:123456789012";

fn bind(doc: &str, ctx: &MapContext) -> BoundPolicy {
    Policy::parse(doc, Dialect::Iot)
        .expect("valid policy")
        .bind(ctx)
}

fn thing_ctx(client: &str, thing: Option<&str>) -> MapContext {
    let mut c = MapContext::new();
    c.set("iot:ClientId", client);
    if let Some(t) = thing {
        c.set("iot:Connection.Thing.ThingName", t);
        c.set("iot:Connection.Thing.IsAttached", "true");
        c.set("iot:Connection.Thing.Attributes[floor]", "3");
    }
    c
}

const THING_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}"},
    {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": "arn:aws:iot:us-east-1:123456789012:topic/topic/${iot:Connection.Thing.ThingName}"},
    {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": "arn:aws:iot:us-east-1:123456789012:topicfilter/topic/*"}
  ]
}"#;

#[test]
fn thing_name_variable() {
    let ctx = thing_ctx("dev1", Some("dev1"));
    let p = bind(THING_POLICY, &ctx);
    let d = |a: &str, r: &str| decide([&p], a, &format!("{ARN}:{r}"), &ctx);
    assert_eq!(d("iot:connect", "client/dev1"), Decision::Allowed);
    assert_eq!(d("iot:connect", "client/dev2"), Decision::ImplicitDeny);
    assert_eq!(d("iot:publish", "topic/topic/dev1"), Decision::Allowed);
    assert_eq!(d("iot:publish", "topic/topic/dev2"), Decision::ImplicitDeny);
    assert_eq!(d("iot:subscribe", "topicfilter/topic/#"), Decision::Allowed);
    assert_eq!(
        d("iot:retainpublish", "topic/topic/dev1"),
        Decision::ImplicitDeny
    );
}

#[test]
fn unresolved_variable_matches_nothing_not_even_its_own_text() {
    let ctx = thing_ctx("dev1", None);
    let p = bind(THING_POLICY, &ctx);
    assert_eq!(
        decide([&p], "iot:connect", &format!("{ARN}:client/dev1"), &ctx),
        Decision::ImplicitDeny
    );
    // AWS: an unresolved variable results in access denied. Its literal text is not a name
    // every thing-less client could share.
    assert_eq!(
        decide(
            [&p],
            "iot:connect",
            &format!("{ARN}:client/${{iot:Connection.Thing.ThingName}}"),
            &ctx
        ),
        Decision::ImplicitDeny
    );
}

#[test]
fn unresolved_variable_never_widens_a_grant() {
    let ctx = thing_ctx("dev1", None);
    let d = |doc: &str, resource: &str| {
        let p = bind(doc, &ctx);
        decide(
            [&p],
            "iot:publish",
            &format!("{ARN}:topic/{resource}"),
            &ctx,
        )
    };
    // NotResource naming an unresolved variable in an Allow grants nothing.
    let not_resource = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Publish","NotResource":"arn:aws:iot:us-east-1:123456789012:topic/${iot:Connection.Thing.ThingName}"}}"#;
    assert_eq!(d(not_resource, "anything"), Decision::ImplicitDeny);
    // A condition value holding one fails in an Allow ...
    let cond = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Publish","Resource":"*","Condition":{"StringEquals":{"iot:ClientId":"${iot:Connection.Thing.ThingName}"}}}}"#;
    let lit = thing_ctx("${iot:Connection.Thing.ThingName}", None);
    let p = bind(cond, &lit);
    assert_eq!(
        decide([&p], "iot:publish", &format!("{ARN}:topic/t"), &lit),
        Decision::ImplicitDeny
    );
    let not_eq = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Publish","Resource":"*","Condition":{"StringNotEquals":{"iot:ClientId":"${iot:Connection.Thing.ThingName}"}}}}"#;
    assert_eq!(d(not_eq, "t"), Decision::ImplicitDeny);
    // ... and holds in a Deny.
    let deny = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Publish","Resource":"*"},{"Effect":"Deny","Action":"iot:Publish","Resource":"*","Condition":{"StringNotEquals":{"iot:ClientId":"${iot:Connection.Thing.ThingName}"}}}]}"#;
    assert_eq!(d(deny, "t"), Decision::ExplicitDeny);
    // Positive control: resolved, the same policies decide on the value.
    let ctx2 = thing_ctx("dev1", Some("dev1"));
    let p = bind(not_resource, &ctx2);
    assert_eq!(
        decide([&p], "iot:publish", &format!("{ARN}:topic/other"), &ctx2),
        Decision::Allowed
    );
    assert_eq!(
        decide([&p], "iot:publish", &format!("{ARN}:topic/dev1"), &ctx2),
        Decision::ImplicitDeny
    );
}

#[test]
fn client_id_loophole() {
    // With ${iot:ClientId}, a client id of "+" widens a topic filter: AWS's documented warning.
    let doc = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:us-east-1:123456789012:topicfilter/my/${iot:ClientId}/topic"}}"#;
    let ctx = thing_ctx("+", None);
    let p = bind(doc, &ctx);
    assert!(
        decide(
            [&p],
            "iot:subscribe",
            &format!("{ARN}:topicfilter/my/+/topic"),
            &ctx
        )
        .is_allowed()
    );
}

#[test]
fn variables_need_version_2012() {
    let doc = r#"{"Version":"2008-10-17","Statement":{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:us-east-1:123456789012:client/${iot:ClientId}"}}"#;
    let ctx = thing_ctx("a", None);
    let p = bind(doc, &ctx);
    assert!(!decide([&p], "iot:connect", &format!("{ARN}:client/a"), &ctx).is_allowed());
}

#[test]
fn explicit_deny_wins_and_mqtt_wildcards_are_literal() {
    let doc = r#"{"Version":"2012-10-17","Statement":[
        {"Effect":"Allow","Action":"iot:*","Resource":"*"},
        {"Effect":"Deny","Action":"iot:Subscribe","Resource":"arn:aws:iot:us-east-1:123456789012:topicfilter/a/restricted/*"}]}"#;
    let ctx = MapContext::new();
    let p = bind(doc, &ctx);
    assert_eq!(
        decide(
            [&p],
            "iot:subscribe",
            &format!("{ARN}:topicfilter/a/restricted/x"),
            &ctx
        ),
        Decision::ExplicitDeny
    );
    // The DG's pitfall: "a/#" is not covered by the deny.
    assert_eq!(
        decide(
            [&p],
            "iot:subscribe",
            &format!("{ARN}:topicfilter/a/#"),
            &ctx
        ),
        Decision::Allowed
    );
    let e = explain(
        [&p, &p],
        "iot:subscribe",
        &format!("{ARN}:topicfilter/a/restricted/x"),
        &ctx,
    );
    assert_eq!(e.denied_by, vec![0, 1]);
    assert_eq!(e.allowed_by, vec![0, 1]);
}

#[test]
fn actions_are_case_insensitive_and_not_forms() {
    let doc = r#"{"Version":"2012-10-17","Statement":[
        {"Effect":"Allow","NotAction":"iot:Publish","Resource":"*"},
        {"Effect":"Allow","Action":"iot:Publish","NotResource":"arn:aws:iot:*:topic/secret/*"}]}"#;
    let ctx = MapContext::new();
    let p = bind(doc, &ctx);
    assert!(decide([&p], "iot:subscribe", "x", &ctx).is_allowed());
    assert!(decide([&p], "iot:publish", &format!("{ARN}:topic/open"), &ctx).is_allowed());
    assert!(!decide([&p], "iot:publish", &format!("{ARN}:topic/secret/x"), &ctx).is_allowed());
    let p2 = bind(
        r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"IoT:PUBLISH","Resource":"*"}}"#,
        &ctx,
    );
    assert!(decide([&p2], "iot:publish", "x", &ctx).is_allowed());
}

#[test]
fn connect_attributes_conditions() {
    // Only default features: an empty ForAllValues list.
    let doc = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Connect","Resource":"*",
        "Condition":{"ForAllValues:StringEquals":{"iot:ConnectAttributes":[]}}}}"#;
    let p = bind(doc, &MapContext::new());
    let mut clean = MapContext::new();
    clean.set_many("iot:ConnectAttributes", vec![]);
    assert!(decide([&p], "iot:connect", "c", &clean).is_allowed());
    let mut persistent = MapContext::new();
    persistent.set_many("iot:ConnectAttributes", vec!["PersistentConnect".into()]);
    assert!(!decide([&p], "iot:connect", "c", &persistent).is_allowed());

    let doc = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Connect","Resource":"*",
        "Condition":{"ForAllValues:StringEquals":{"iot:ConnectAttributes":["PersistentConnect"]}}}}"#;
    let p = bind(doc, &MapContext::new());
    assert!(decide([&p], "iot:connect", "c", &persistent).is_allowed());
    let mut will = MapContext::new();
    will.set_many(
        "iot:ConnectAttributes",
        vec!["PersistentConnect".into(), "LastWill".into()],
    );
    assert!(!decide([&p], "iot:connect", "c", &will).is_allowed());
}

#[test]
fn ip_bool_null_arn_numeric_conditions() {
    let doc = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Connect","Resource":"*",
        "Condition":{"IpAddress":{"aws:SourceIp":["10.0.0.0/8","192.168.1.5"]},
                     "Bool":{"iot:Connection.Thing.IsAttached":true},
                     "Null":{"iot:Connection.Thing.ThingTypeName":"true"},
                     "NumericGreaterThanEquals":{"iot:Connection.Thing.Attributes[floor]":"3"}}}}"#;
    let p = bind(doc, &MapContext::new());
    let mut c = thing_ctx("d", Some("d"));
    c.set("aws:SourceIp", "10.1.2.3");
    assert!(decide([&p], "iot:connect", "x", &c).is_allowed());
    c.set("aws:SourceIp", "192.168.1.6");
    assert!(!decide([&p], "iot:connect", "x", &c).is_allowed());
    c.set("aws:SourceIp", "192.168.1.5");
    assert!(decide([&p], "iot:connect", "x", &c).is_allowed());
    c.set("iot:Connection.Thing.ThingTypeName", "sensor");
    assert!(!decide([&p], "iot:connect", "x", &c).is_allowed());

    let doc = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Publish","Resource":"*",
        "Condition":{"ArnLike":{"aws:SourceArn":"arn:aws:iot:*:*:thing/*"},"StringNotEquals":{"aws:Missing":"x"}}}}"#;
    let p = bind(doc, &MapContext::new());
    let mut c = MapContext::new();
    c.set("aws:SourceArn", "arn:aws:iot:us-east-1:1:thing/t");
    assert!(
        decide([&p], "iot:publish", "x", &c).is_allowed(),
        "negated operator on a missing key is true"
    );
    c.set("aws:SourceArn", "arn:aws:iot:us-east-1:1:client/t");
    assert!(!decide([&p], "iot:publish", "x", &c).is_allowed());
}

#[test]
fn certificate_variables_and_literals() {
    let doc = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Publish",
        "Resource":"arn:aws:iot:us-east-1:123456789012:topic/${iot:Certificate.Subject.CommonName}/${*}/${iot:CertificateId}"}}"#;
    let mut c = MapContext::new();
    c.set("iot:Certificate.Subject.CommonName", "cn1");
    c.set("iot:CertificateId", "abc");
    let p = bind(doc, &c);
    assert!(decide([&p], "iot:publish", &format!("{ARN}:topic/cn1/*/abc"), &c).is_allowed());
    assert!(
        !decide([&p], "iot:publish", &format!("{ARN}:topic/cn1/x/abc"), &c).is_allowed(),
        "${{*}} is a literal star"
    );
}

#[test]
fn malformed_documents_say_what_is_wrong() {
    let cases = [
        ("not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (r#"{"Version":"2012-10-17"}"#, "missing the Statement"),
        (
            r#"{"Version":"2012-10-17","Statement":[]}"#,
            "at least one statement",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Permit","Action":"iot:*","Resource":"*"}}"#,
            "Effect must be",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Resource":"*"}}"#,
            "missing Action",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*"}}"#,
            "missing Resource",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"publish","Resource":"*"}}"#,
            "invalid action",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"topic/x"}}"#,
            "must be an ARN",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*","Condition":{"StringSorta":{"a":"b"}}}}"#,
            "unknown condition operator",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*","Condition":{"IpAddress":{"aws:SourceIp":"nope"}}}}"#,
            "not valid for condition",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*","Principal":"*"}}"#,
            "not allowed",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*","Bogus":1}}"#,
            "unknown element",
        ),
        (
            r#"{"Version":"2099-01-01","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*"}}"#,
            "Unsupported policy version",
        ),
        (
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*","NotResource":"*"}}"#,
            "conflicts",
        ),
    ];
    for (doc, want) in cases {
        let e = Policy::parse(doc, Dialect::Iot).expect_err(doc);
        assert!(e.0.contains(want), "{doc}: {e} should mention {want:?}");
    }
}

#[test]
fn trust_policy_dialect() {
    let doc = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Principal":{"Service":"credentials.iot.amazonaws.com"},"Action":"sts:AssumeRole"}}"#;
    let p = Policy::parse(doc, Dialect::IamTrust).unwrap();
    assert_eq!(
        p.statements[0].principal.as_ref().unwrap().items[0].service,
        vec!["credentials.iot.amazonaws.com"]
    );
    assert!(Policy::parse(doc, Dialect::Iot).is_err());
}

#[test]
fn size_measure_ignores_whitespace() {
    assert_eq!(non_whitespace_len(" a b\n\tc "), 3);
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        "[a-zA-Z:*?/${}.]{0,12}".prop_map(serde_json::Value::String),
        any::<i32>().prop_map(|n| serde_json::json!(n)),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("Version".to_string()),
                    Just("Statement".to_string()),
                    Just("Effect".to_string()),
                    Just("Action".to_string()),
                    Just("Resource".to_string()),
                    Just("Condition".to_string()),
                    Just("StringLike".to_string()),
                    Just("ForAllValues:StringEquals".to_string()),
                    "[a-z]{1,4}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Total: any JSON parses or fails cleanly, and any parsed policy binds and evaluates.
    #[test]
    fn parser_and_evaluator_are_total(j in arb_json(), action in "[a-z:*]{0,10}", res in "[a-z:/*+#]{0,20}") {
        let doc = j.to_string();
        if let Ok(p) = Policy::parse(&doc, Dialect::Iot) {
            let ctx = thing_ctx("c", Some("t"));
            let b = p.bind(&ctx);
            let _ = decide([&b], &action, &res, &ctx);
            let _ = explain([&b], &action, &res, &ctx);
        }
    }

    /// A literal resource matches exactly itself; `prefix*` matches exactly the strings with that prefix.
    #[test]
    fn resource_matching_agrees_with_strings(a in "[a-z/+#]{0,12}", b in "[a-z/+#]{0,12}") {
        let lit = Pattern::new(&a);
        prop_assert_eq!(lit.matches(&b), a == b);
        let pre = Pattern::new(&format!("{a}*"));
        prop_assert_eq!(pre.matches(&b), b.starts_with(&a));
        let both = Pattern::new(&format!("*{a}*"));
        prop_assert_eq!(both.matches(&b), b.contains(&a));
    }

    /// Adding a Deny statement can only take permissions away; adding an Allow only adds.
    #[test]
    fn deny_is_monotone(res in "[a-c/]{1,8}", pat in "[a-c/*]{1,6}") {
        let allow = format!(r#"{{"Version":"2012-10-17","Statement":{{"Effect":"Allow","Action":"iot:*","Resource":"arn:{pat}"}}}}"#);
        let deny = format!(r#"{{"Version":"2012-10-17","Statement":{{"Effect":"Deny","Action":"iot:Publish","Resource":"arn:{pat}"}}}}"#);
        let ctx = MapContext::new();
        let a = Policy::parse(&allow, Dialect::Iot).unwrap().bind(&ctx);
        let d = Policy::parse(&deny, Dialect::Iot).unwrap().bind(&ctx);
        let r = format!("arn:{res}");
        let base = decide([&a], "iot:publish", &r, &ctx);
        let with_deny = decide([&a, &d], "iot:publish", &r, &ctx);
        prop_assert!(!with_deny.is_allowed() || base.is_allowed());
        prop_assert_eq!(with_deny.is_allowed(), base.is_allowed() && !Pattern::new(&format!("arn:{pat}")).matches(&r));
    }
}

#[test]
fn dates_parse_as_iam_takes_them() {
    assert_eq!(parse_date("1970-01-01"), Some(0.0));
    assert_eq!(parse_date("2026-11-30T12:00:00Z"), Some(1_796_040_000.0));
    assert_eq!(
        parse_date("2026-11-30T13:00:00+01:00"),
        Some(1_796_040_000.0)
    );
    assert_eq!(parse_date("2026-11-30T12:00:00.5Z"), Some(1_796_040_000.5));
    assert_eq!(parse_date("1796040000"), Some(1_796_040_000.0));
    for bad in [
        "",
        "2026-13-01",
        "2026-11-30T25:00:00Z",
        "2026-11-30T12:00:00",
        "tomorrow",
        "2026-11-30T12:00:00+x",
    ] {
        assert_eq!(parse_date(bad), None, "{bad}");
    }
}

#[test]
fn date_conditions_compare_times() {
    let doc = |op: &str| {
        format!(
            r#"{{"Version":"2012-10-17","Statement":{{"Effect":"Allow","Action":"s3:GetObject","Resource":"*","Condition":{{"{op}":{{"aws:CurrentTime":"2026-01-01T00:00:00Z"}}}}}}}}"#
        )
    };
    let at = |now: &str, op: &str| {
        let mut c = MapContext::new();
        c.set("aws:CurrentTime", now);
        let p = bind(&doc(op), &c);
        decide([&p], "s3:getobject", "arn:aws:s3:::b/k", &c) == Decision::Allowed
    };
    assert!(at("2026-11-30T12:00:00Z", "DateGreaterThan"));
    assert!(!at("2025-11-30T12:00:00Z", "DateGreaterThan"));
    assert!(at("2025-11-30T12:00:00Z", "DateLessThan"));
    assert!(at("2026-01-01T00:00:00Z", "DateEquals"));
    assert!(at("2026-01-01T00:00:00Z", "DateGreaterThanEquals"));
    assert!(!at("2026-01-01T00:00:00Z", "DateNotEquals"));
    // A malformed date in a policy is refused when the policy is written.
    assert!(Policy::parse(r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"DateLessThan":{"aws:CurrentTime":"soon"}}}}"#, Dialect::IamIdentity).is_err());
}

/// Matching cost is bounded: a resource over MAX_DECIDED_LEN is denied outright (wildcard
/// matching is O(pattern x input); it was quadratic in the input, re-validating the rest of the
/// string per step).
#[test]
fn huge_inputs_cost_little_and_are_denied() {
    let doc = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iam:*","Resource":"arn:aws:iam::*:user/${aws:username}"}}"#;
    let mut c = MapContext::new();
    c.set("aws:username", "alice");
    let p = bind(doc, &c);
    let huge = format!("arn:aws:iam::1:user/{}", "a".repeat(900_000));
    assert_eq!(
        decide([&p], "iam:listaccesskeys", &huge, &c),
        Decision::ImplicitDeny
    );
    assert_eq!(MAX_DECIDED_LEN, 4096);
    // Under the bound, a long input is matched in linear time.
    let long = format!("arn:aws:iam::1:user/{}", "a".repeat(4000));
    assert!(Pattern::new("arn:aws:iam::*:user/*b").matches(&format!("{long}b")));
    assert!(!Pattern::new("arn:aws:iam::*:user/*b").matches(&long));
    assert_eq!(
        decide([&p], "iam:listaccesskeys", "arn:aws:iam::1:user/alice", &c),
        Decision::Allowed
    );
}
