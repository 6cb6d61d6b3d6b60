use super::*;
use proptest::prelude::*;

fn up(cur: Option<&Shadow>, req: Value, now: u64) -> Result<Updated, Error> {
    update(cur, req.to_string().as_bytes(), now)
}

fn err(code: u16, msg: &str) -> Error {
    Error {
        code,
        message: msg.into(),
    }
}

#[test]
fn topics() {
    let r = parse_topic("$aws/things/lamp/shadow/update").unwrap();
    assert_eq!((r.thing, r.name, r.op), ("lamp", None, Op::Update));
    let r = parse_topic("$aws/things/lamp/shadow/name/$cfg:1/get").unwrap();
    assert_eq!((r.thing, r.name, r.op), ("lamp", Some("$cfg:1"), Op::Get));
    assert_eq!(r.prefix(), "$aws/things/lamp/shadow/name/$cfg:1");
    for t in [
        "$aws/things/lamp/shadow/update/accepted",
        "$aws/things/lamp/shadow/name/x/update/delta",
        "$aws/things/lamp/shadow/name//get",
        "$aws/things/lamp/shadow/name/a.b/get",
        "$aws/things/la.mp/shadow/get",
        "$aws/things//shadow/get",
        "$aws/things/lamp/shadow",
        "$aws/things/lamp/jobs/get",
        "things/lamp/shadow/get",
    ] {
        assert_eq!(parse_topic(t), None, "{t}");
    }
    // Names at their limits and one past them.
    let thing = "t".repeat(MAX_THING_NAME);
    assert!(parse_topic(&format!("$aws/things/{thing}/shadow/get")).is_some());
    assert!(parse_topic(&format!("$aws/things/{thing}x/shadow/get")).is_none());
    let name = "n".repeat(MAX_SHADOW_NAME);
    assert!(parse_topic(&format!("$aws/things/t/shadow/name/{name}/get")).is_some());
    assert!(parse_topic(&format!("$aws/things/t/shadow/name/{name}x/get")).is_none());
}

#[test]
fn partial_updates_null_deletes_and_metadata() {
    let a = up(
        None,
        json!({"state":{"desired":{"color":"red","pos":{"x":1,"y":2}},"reported":{"color":"blue"}}}),
        100,
    )
    .unwrap();
    assert_eq!(a.shadow.version, 1);
    assert_eq!(
        a.accepted["metadata"],
        json!({"desired":{"color":{"timestamp":100},"pos":{"x":{"timestamp":100},"y":{"timestamp":100}}},
               "reported":{"color":{"timestamp":100}}})
    );
    let b = up(
        Some(&a.shadow),
        json!({"state":{"desired":{"pos":{"y":null,"z":[1,2]}}},"clientToken":"tok"}),
        200,
    )
    .unwrap();
    let s = &b.shadow;
    assert_eq!(s.version, 2);
    assert_eq!(
        Value::Object(s.desired.clone().unwrap()),
        json!({"color":"red","pos":{"x":1,"z":[1,2]}})
    );
    // The untouched leaf keeps its time; the new array has one per element.
    assert_eq!(
        Value::Object(s.meta_desired.clone().unwrap()),
        json!({"color":{"timestamp":100},"pos":{"x":{"timestamp":100},"z":[{"timestamp":200},{"timestamp":200}]}})
    );
    // The accepted document echoes the request's state (nulls included) and the token.
    assert_eq!(
        b.accepted,
        json!({"state":{"desired":{"pos":{"y":null,"z":[1,2]}}},
               "metadata":{"desired":{"pos":{"y":{"timestamp":200},"z":[{"timestamp":200},{"timestamp":200}]}}},
               "version":2,"timestamp":200,"clientToken":"tok"})
    );
    assert_eq!(b.documents["previous"]["version"], 1);
    assert_eq!(b.documents["current"]["version"], 2);
    assert_eq!(b.documents["clientToken"], "tok");
    // A whole section set to null goes, with its metadata.
    let c = up(Some(s), json!({"state":{"reported":null}}), 300).unwrap();
    assert_eq!(c.shadow.reported, None);
    assert_eq!(c.shadow.meta_reported, None);
    assert!(c.shadow.desired.is_some());
}

#[test]
fn delta_is_nested_and_arrays_compare_whole() {
    let a = up(
        None,
        json!({"state":{"desired":{"on":true,"cfg":{"a":1,"b":[1,2]},"same":5},
                        "reported":{"on":false,"cfg":{"a":1,"b":[1]},"same":5,"extra":1}}}),
        10,
    )
    .unwrap();
    let d = a.delta.unwrap();
    assert_eq!(d["state"], json!({"on":true,"cfg":{"b":[1,2]}}));
    assert_eq!(
        d["metadata"],
        json!({"on":{"timestamp":10},"cfg":{"b":[{"timestamp":10},{"timestamp":10}]}})
    );
    assert_eq!(d["version"], 1);
    // A report that does not resolve the delta publishes none; get still shows it.
    let b = up(
        Some(&a.shadow),
        json!({"state":{"reported":{"on":true}}}),
        20,
    )
    .unwrap();
    assert_eq!(b.delta, None);
    let g = get(Some(&b.shadow), "t", b"", 30).unwrap();
    assert_eq!(g["state"]["delta"], json!({"cfg":{"b":[1,2]}}));
    assert_eq!(g["version"], 2);
    // Resolved: no delta anywhere.
    let c = up(
        Some(&b.shadow),
        json!({"state":{"reported":{"cfg":{"b":[1,2]}}}}),
        40,
    )
    .unwrap();
    let g = get(Some(&c.shadow), "t", b"{\"clientToken\":\"x\"}", 50).unwrap();
    assert!(g["state"].get("delta").is_none());
    assert!(g["metadata"].get("delta").is_none());
    assert_eq!(g["clientToken"], "x");
    // Desired named again but equal to reported: no delta.
    let d = up(
        Some(&c.shadow),
        json!({"state":{"desired":{"on":true}}}),
        60,
    )
    .unwrap();
    assert_eq!(d.delta, None);
}

#[test]
fn versions_and_delete() {
    let a = up(None, json!({"state":{"reported":{"x":1}}}), 1).unwrap();
    assert_eq!(
        up(Some(&a.shadow), json!({"state":{},"version":5}), 2),
        Err(err(409, "Version conflict"))
    );
    let b = up(Some(&a.shadow), json!({"state":{},"version":1}), 2).unwrap();
    assert_eq!(b.shadow.version, 2);
    for bad in [json!(-1), json!("1"), json!(1.5)] {
        assert_eq!(
            up(Some(&a.shadow), json!({"state":{},"version":bad}), 2),
            Err(err(400, "Invalid version"))
        );
    }
    let d = delete(Some(&b.shadow), "t", b"{\"clientToken\":\"c\"}", 3).unwrap();
    assert_eq!(
        d.accepted,
        json!({"version":2,"timestamp":3,"clientToken":"c"})
    );
    assert!(!d.shadow.exists);
    assert_eq!(
        get(Some(&d.shadow), "t", b"", 4),
        Err(Error::not_found("t"))
    );
    assert_eq!(delete(Some(&d.shadow), "t", b"", 4).unwrap_err().code, 404);
    // The version goes on from where it was.
    let e = up(Some(&d.shadow), json!({"state":{"desired":{"y":1}}}), 5).unwrap();
    assert_eq!(e.shadow.version, 3);
    assert_eq!(e.shadow.reported, None);
    assert!(e.documents.get("previous").is_none());
}

#[test]
fn malformed_requests() {
    let cases: Vec<(&[u8], Error)> = vec![
        (b"nope", err(400, "Invalid JSON")),
        (b"[1]", err(400, "Invalid JSON")),
        (b"{}", err(400, "Missing required node: state")),
        (b"{\"state\":1}", err(400, "State node must be an object")),
        (
            b"{\"state\":{\"desired\":[1]}}",
            err(400, "Desired node must be an object"),
        ),
        (
            b"{\"state\":{\"reported\":\"x\"}}",
            err(400, "Reported node must be an object"),
        ),
        (
            b"{\"state\":{\"delta\":{}}}",
            err(400, "State contains an invalid node"),
        ),
        (
            b"{\"state\":{\"desired\":{\"a\":[1,null]}}}",
            err(400, "State contains an invalid node"),
        ),
        (
            b"{\"state\":{},\"clientToken\":5}",
            err(400, "Invalid clientToken"),
        ),
        (
            b"{\"state\":{\"desired\":{\"a\":\"\xff\"}}}",
            err(
                415,
                "Unsupported documented encoding; supported encoding is UTF-8",
            ),
        ),
    ];
    for (req, e) in cases {
        assert_eq!(
            update(None, req, 1).map(|_| ()),
            Err(e),
            "{}",
            String::from_utf8_lossy(req)
        );
    }
    assert_eq!(get(None, "t", b"{", 1).unwrap_err().code, 400);
}

#[test]
fn limits_at_n_and_n_plus_one() {
    // Client token: 64 bytes accepted, 65 refused.
    let ok = "t".repeat(MAX_CLIENT_TOKEN);
    assert!(up(None, json!({"state":{},"clientToken":ok}), 1).is_ok());
    assert_eq!(
        up(None, json!({"state":{},"clientToken":format!("{ok}t")}), 1).map(|_| ()),
        Err(err(400, "Invalid clientToken"))
    );
    // Depth: the section's object is level 1; five levels accepted, six refused.
    let nest = |n: usize| {
        let mut v = json!(1);
        for _ in 0..n {
            v = json!({ "k": v });
        }
        v
    };
    assert!(up(None, json!({"state":{"desired":nest(MAX_DEPTH)}}), 1).is_ok());
    assert_eq!(
        up(None, json!({"state":{"reported":nest(MAX_DEPTH + 1)}}), 1).map(|_| ()),
        Err(err(
            400,
            "JSON contains too many levels of nesting; maximum is 6"
        ))
    );
    // Size: the state document at 8192 bytes accepted, 8193 refused.
    let state_of = |len: usize| {
        let overhead = json!({"desired":{"v":""}}).to_string().len();
        json!({"desired":{"v":"x".repeat(len - overhead)}})
    };
    assert_eq!(state_of(MAX_STATE_BYTES).to_string().len(), MAX_STATE_BYTES);
    let a = up(None, json!({"state": state_of(MAX_STATE_BYTES)}), 1).unwrap();
    assert_eq!(
        up(None, json!({"state": state_of(MAX_STATE_BYTES + 1)}), 1).map(|_| ()),
        Err(err(413, "The payload exceeds the maximum size allowed"))
    );
    // The limit holds for the merged document too: a small update onto a full shadow.
    assert_eq!(
        up(Some(&a.shadow), json!({"state":{"reported":{"r":1}}}), 2).map(|_| ()),
        Err(err(413, "The payload exceeds the maximum size allowed"))
    );
}

#[test]
fn error_documents() {
    let e = err(409, "Version conflict");
    assert_eq!(
        e.document(Some("abc"), 9),
        json!({"code":409,"message":"Version conflict","timestamp":9,"clientToken":"abc"})
    );
    assert_eq!(e.kind(), "ConflictException");
    assert_eq!(
        client_token(b"{\"clientToken\":\"z\"}").as_deref(),
        Some("z")
    );
    assert_eq!(client_token(b"garbage"), None);
}

proptest! {
    #[test]
    fn never_panics_and_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = get(None, "t", &bytes, 1);
        let _ = delete(None, "t", &bytes, 1);
        if let Ok(u) = update(None, &bytes, 1) {
            prop_assert_eq!(Shadow::from_json(&u.shadow.to_json()), Some(u.shadow.clone()));
        }
    }

    #[test]
    fn updates_round_trip(keys in proptest::collection::vec(("[a-c]{1,2}", proptest::option::of(0i64..3)), 0..12)) {
        let mut shadow: Option<Shadow> = None;
        for (i, (k, v)) in keys.iter().enumerate() {
            let req = json!({"state":{"desired":{k: v}, "reported":{k: v.map(|x| x + 1)}}});
            let u = up(shadow.as_ref(), req, i as u64).unwrap();
            prop_assert_eq!(u.shadow.version, i as u64 + 1);
            prop_assert_eq!(Shadow::from_json(&u.shadow.to_json()), Some(u.shadow.clone()));
            shadow = Some(u.shadow);
        }
    }
}

#[test]
fn a_leaf_that_becomes_an_object_loses_its_old_metadata() {
    let a = up(None, json!({"state":{"desired":{"x":1}}}), 1).unwrap();
    let b = up(
        Some(&a.shadow),
        json!({"state":{"desired":{"x":{"y":2}}}}),
        2,
    )
    .unwrap();
    assert_eq!(
        Value::Object(b.shadow.meta_desired.unwrap()),
        json!({"x":{"y":{"timestamp":2}}})
    );
}
