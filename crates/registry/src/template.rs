//! AWS IoT provisioning templates, evaluated without I/O: parameters (with defaults),
//! mappings, the intrinsic functions (`Ref`, `Fn::Join`, `Fn::Select`, `Fn::Split`,
//! `Fn::FindInMap`, `Fn::Sub`), and the resources a template declares (a thing, the
//! certificate, policies) with their `OverrideSettings`, into a [`Plan`] the registry applies
//! in one write. Errors are AWS's `ResourceRegistrationFailure` messages.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The largest template body.
pub const MAX_BODY: usize = 10_240;
/// The longest string the engine builds (a joined or substituted value).
pub const MAX_VALUE: usize = 4096;
/// The most items of a list the engine builds (`Fn::Split`).
pub const MAX_ITEMS: usize = 100;
/// The most parameters a request may give.
pub const MAX_PARAMETERS: usize = 50;
/// The longest parameter value.
pub const MAX_PARAMETER_VALUE: usize = 2048;

/// What to do with a property of a thing that exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    /// Leave it.
    DoNothing,
    /// Replace it.
    Replace,
    /// Refuse the provisioning.
    Fail,
    /// Merge (attributes and groups).
    Merge,
}

/// The thing a template declares.
#[derive(Debug, Clone, PartialEq)]
pub struct ThingPlan {
    /// Logical name.
    pub logical: String,
    /// Its name.
    pub name: String,
    /// Attributes.
    pub attributes: Option<BTreeMap<String, String>>,
    /// Thing type.
    pub thing_type: Option<String>,
    /// Static groups to be in.
    pub groups: Option<Vec<String>>,
    /// `OverrideSettings` by property name (`AttributePayload`, `ThingTypeName`,
    /// `ThingGroups`); absent: DO_NOTHING.
    pub overrides: BTreeMap<String, Override>,
}

/// The certificate a template declares (it must be the one provisioning: `CertificateId`).
#[derive(Debug, Clone, PartialEq)]
pub struct CertificatePlan {
    /// Logical name.
    pub logical: String,
    /// The certificate id.
    pub id: String,
    /// ACTIVE (true) or INACTIVE.
    pub active: bool,
}

/// A policy a template declares: an existing one by name, or a new one by document.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyPlan {
    /// Logical name.
    pub logical: String,
    /// Its name (for a document without a name: a hash of the document).
    pub name: String,
    /// A document, for a policy to create.
    pub document: Option<String>,
}

/// What a template, evaluated, asks the registry to do.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// The thing.
    pub thing: Option<ThingPlan>,
    /// The certificate.
    pub certificate: Option<CertificatePlan>,
    /// Policies to attach to the certificate.
    pub policies: Vec<PolicyPlan>,
    /// `DeviceConfiguration`, evaluated.
    pub device_configuration: BTreeMap<String, String>,
}

fn fail(m: impl Into<String>) -> String {
    m.into()
}

/// Checks a template body's shape (what CreateProvisioningTemplate refuses).
pub fn check(body: &str) -> Result<(), String> {
    if body.len() > MAX_BODY {
        return Err(fail(format!(
            "The template body can be at most {MAX_BODY} characters"
        )));
    }
    let v: Value =
        serde_json::from_str(body).map_err(|_| fail("The template body is not valid JSON"))?;
    let Value::Object(m) = v else {
        return Err(fail("The template body must be a JSON object"));
    };
    for k in m.keys() {
        if !matches!(
            k.as_str(),
            "Parameters" | "Mappings" | "Resources" | "DeviceConfiguration"
        ) {
            return Err(fail(format!("The template has an unknown section {k}")));
        }
    }
    match m.get("Resources") {
        Some(Value::Object(r)) => {
            for (name, res) in r {
                let t = res.get("Type").and_then(Value::as_str).unwrap_or("");
                if !matches!(
                    t,
                    "AWS::IoT::Thing" | "AWS::IoT::Certificate" | "AWS::IoT::Policy"
                ) {
                    return Err(fail(format!(
                        "Resource {name} has an unsupported type {t:?}"
                    )));
                }
            }
            Ok(())
        }
        _ => Err(fail("The template must have a Resources section")),
    }
}

struct Ctx<'a> {
    params: BTreeMap<String, String>,
    mappings: &'a Map<String, Value>,
    /// Bytes the evaluation has built so far, at most eight template bodies' worth: every
    /// value is bounded, and so is their sum, whatever the nesting.
    built: std::cell::Cell<usize>,
}

fn too_long() -> String {
    fail(format!(
        "A template value is longer than {MAX_VALUE} characters"
    ))
}

/// An evaluated value: a string or a list of strings.
#[derive(Debug, Clone)]
enum Val {
    S(String),
    L(Vec<Val>),
    /// An object that is no function (usable only where an object is expected).
    O,
}

impl Val {
    fn string(self, what: &str) -> Result<String, String> {
        match self {
            Val::S(s) => Ok(s),
            _ => Err(fail(format!("{what} must be a string"))),
        }
    }
}

impl Ctx<'_> {
    fn eval(&self, v: &Value, depth: usize) -> Result<Val, String> {
        if depth > 16 {
            return Err(fail("The template nests functions too deeply"));
        }
        match v {
            Value::String(s) => Ok(Val::S(s.clone())),
            Value::Number(n) => Ok(Val::S(n.to_string())),
            Value::Bool(b) => Ok(Val::S(b.to_string())),
            Value::Array(a) => a
                .iter()
                .map(|x| self.eval(x, depth + 1))
                .collect::<Result<_, _>>()
                .map(Val::L),
            Value::Null => Err(fail("A template value is null")),
            Value::Object(m) if m.len() == 1 => {
                let (k, arg) = m.iter().next().ok_or_else(|| fail("empty"))?;
                match k.as_str() {
                    "Ref" => {
                        let name = arg.as_str().ok_or_else(|| fail("Ref takes a name"))?;
                        self.params
                            .get(name)
                            .cloned()
                            .map(Val::S)
                            .ok_or_else(|| fail(format!("Parameter {name} has no value")))
                    }
                    "Fn::Join" => {
                        let [delim, list] = two(arg, "Fn::Join")?;
                        let delim = self
                            .eval(delim, depth + 1)?
                            .string("Fn::Join's delimiter")?;
                        let Val::L(items) = self.eval(list, depth + 1)? else {
                            return Err(fail("Fn::Join takes a list"));
                        };
                        let parts = items
                            .into_iter()
                            .map(|i| i.string("Fn::Join's items"))
                            .collect::<Result<Vec<_>, _>>()?;
                        // Checked before it is built: the delimiter between every two parts.
                        let len = parts.iter().map(String::len).sum::<usize>()
                            + delim.len() * parts.len().saturating_sub(1);
                        if len > MAX_VALUE {
                            return Err(too_long());
                        }
                        self.spend(len)?;
                        Ok(Val::S(parts.join(&delim)))
                    }
                    "Fn::Split" => {
                        let [delim, s] = two(arg, "Fn::Split")?;
                        let delim = self
                            .eval(delim, depth + 1)?
                            .string("Fn::Split's delimiter")?;
                        let s = self.eval(s, depth + 1)?.string("Fn::Split's string")?;
                        if delim.is_empty() {
                            return Err(fail("Fn::Split needs a delimiter"));
                        }
                        if s.matches(&delim).count() >= MAX_ITEMS {
                            return Err(fail(format!(
                                "Fn::Split would make more than {MAX_ITEMS} items"
                            )));
                        }
                        self.spend(s.len())?;
                        Ok(Val::L(
                            s.split(&delim).map(|p| Val::S(p.to_owned())).collect(),
                        ))
                    }
                    "Fn::Select" => {
                        let [i, list] = two(arg, "Fn::Select")?;
                        let i = self.eval(i, depth + 1)?.string("Fn::Select's index")?;
                        let i: usize = i
                            .parse()
                            .map_err(|_| fail("Fn::Select's index must be a number"))?;
                        let Val::L(items) = self.eval(list, depth + 1)? else {
                            return Err(fail("Fn::Select takes a list"));
                        };
                        items
                            .into_iter()
                            .nth(i)
                            .ok_or_else(|| fail("Fn::Select's index is out of range"))
                    }
                    "Fn::FindInMap" => {
                        let a = arg
                            .as_array()
                            .filter(|a| a.len() == 3)
                            .ok_or_else(|| fail("Fn::FindInMap takes a map name and two keys"))?;
                        let names = a
                            .iter()
                            .map(|x| {
                                self.eval(x, depth + 1)
                                    .and_then(|v| v.string("Fn::FindInMap's keys"))
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        self.mappings
                            .get(&names[0])
                            .and_then(|m| m.get(&names[1]))
                            .and_then(|m| m.get(&names[2]))
                            .and_then(Value::as_str)
                            .map(|s| Val::S(s.to_owned()))
                            .ok_or_else(|| {
                                fail(format!(
                                    "Fn::FindInMap found nothing at {}/{}/{}",
                                    names[0], names[1], names[2]
                                ))
                            })
                    }
                    "Fn::Sub" => {
                        let s = match arg {
                            Value::String(s) => s.clone(),
                            _ => return Err(fail("Fn::Sub takes a string")),
                        };
                        let mut out = String::new();
                        let mut rest = s.as_str();
                        while let Some(i) = rest.find("${") {
                            out.push_str(&rest[..i]);
                            let after = &rest[i + 2..];
                            let end = after
                                .find('}')
                                .ok_or_else(|| fail("Fn::Sub has an unclosed ${"))?;
                            let name = &after[..end];
                            let v = self
                                .params
                                .get(name)
                                .ok_or_else(|| fail(format!("Parameter {name} has no value")))?;
                            out.push_str(v);
                            if out.len() > MAX_VALUE {
                                return Err(too_long());
                            }
                            rest = &after[end + 1..];
                        }
                        out.push_str(rest);
                        if out.len() > MAX_VALUE {
                            return Err(too_long());
                        }
                        self.spend(out.len())?;
                        Ok(Val::S(out))
                    }
                    _ => Ok(Val::O),
                }
            }
            Value::Object(_) => Ok(Val::O),
        }
    }

    fn string(&self, v: &Value, what: &str) -> Result<String, String> {
        self.eval(v, 0)?.string(what)
    }

    fn spend(&self, n: usize) -> Result<(), String> {
        let total = self.built.get().saturating_add(n);
        if total > MAX_BODY * 8 {
            return Err(fail("The template builds too much"));
        }
        self.built.set(total);
        Ok(())
    }

    /// A flat object of strings (attributes, device configuration).
    fn flat(&self, v: &Value, what: &str) -> Result<BTreeMap<String, String>, String> {
        let Value::Object(m) = v else {
            return Err(fail(format!("{what} must be an object")));
        };
        m.iter()
            .map(|(k, v)| Ok((k.clone(), self.string(v, what)?)))
            .collect()
    }
}

fn two<'a>(arg: &'a Value, f: &str) -> Result<[&'a Value; 2], String> {
    match arg.as_array().map(Vec::as_slice) {
        Some([a, b]) => Ok([a, b]),
        _ => Err(fail(format!("{f} takes two arguments"))),
    }
}

fn override_of(v: &Value) -> Result<Override, String> {
    Ok(match v.as_str().unwrap_or("") {
        "DO_NOTHING" => Override::DoNothing,
        "REPLACE" => Override::Replace,
        "FAIL" => Override::Fail,
        "MERGE" => Override::Merge,
        other => return Err(fail(format!("Unknown override setting {other:?}"))),
    })
}

/// Evaluates a template with the request's parameters (and the built-in ones, such as
/// `AWS::IoT::Certificate::Id`).
pub fn evaluate(body: &str, given: &BTreeMap<String, String>) -> Result<Plan, String> {
    check(body)?;
    if given.len() > MAX_PARAMETERS
        || given
            .iter()
            .any(|(k, v)| k.len() > 128 || v.len() > MAX_PARAMETER_VALUE)
    {
        return Err(fail(format!(
            "At most {MAX_PARAMETERS} parameters, with names of at most 128 and values of at most {MAX_PARAMETER_VALUE} characters"
        )));
    }
    let v: Value =
        serde_json::from_str(body).map_err(|_| fail("The template body is not valid JSON"))?;
    let empty = Map::new();
    let mappings = v
        .get("Mappings")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut params = BTreeMap::new();
    if let Some(Value::Object(decl)) = v.get("Parameters") {
        for (name, d) in decl {
            match given.get(name) {
                Some(x) => {
                    params.insert(name.clone(), x.clone());
                }
                None => {
                    if let Some(def) = d.get("Default") {
                        let s = match def {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        params.insert(name.clone(), s);
                    }
                }
            }
        }
    }
    let ctx = Ctx {
        params,
        mappings,
        built: std::cell::Cell::new(0),
    };
    let mut plan = Plan::default();
    let resources = v
        .get("Resources")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (logical, res) in resources {
        let props = res
            .get("Properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        match res.get("Type").and_then(Value::as_str).unwrap_or("") {
            "AWS::IoT::Thing" => {
                if plan.thing.is_some() {
                    return Err(fail("A template can declare one thing"));
                }
                let name = ctx.string(
                    props
                        .get("ThingName")
                        .ok_or_else(|| fail("The thing has no ThingName"))?,
                    "ThingName",
                )?;
                let attributes = props
                    .get("AttributePayload")
                    .map(|a| ctx.flat(a, "AttributePayload"))
                    .transpose()?;
                let thing_type = props
                    .get("ThingTypeName")
                    .map(|t| ctx.string(t, "ThingTypeName"))
                    .transpose()?;
                let groups = match props.get("ThingGroups") {
                    None => None,
                    Some(g) => match ctx.eval(g, 0)? {
                        Val::L(items) => Some(
                            items
                                .into_iter()
                                .map(|i| i.string("ThingGroups"))
                                .collect::<Result<Vec<_>, _>>()?,
                        ),
                        _ => return Err(fail("ThingGroups must be a list")),
                    },
                };
                let mut overrides = BTreeMap::new();
                if let Some(Value::Object(o)) = res.get("OverrideSettings") {
                    for (k, v) in o {
                        overrides.insert(k.clone(), override_of(v)?);
                    }
                }
                plan.thing = Some(ThingPlan {
                    logical: logical.clone(),
                    name,
                    attributes,
                    thing_type,
                    groups,
                    overrides,
                });
            }
            "AWS::IoT::Certificate" => {
                if plan.certificate.is_some() {
                    return Err(fail("A template can declare one certificate"));
                }
                let id = props
                    .get("CertificateId")
                    .ok_or_else(|| fail("The certificate must be given by CertificateId"))?;
                let id = ctx.string(id, "CertificateId")?;
                let active = match props
                    .get("Status")
                    .map(|s| ctx.string(s, "Status"))
                    .transpose()?
                {
                    None => true,
                    Some(s) if s.eq_ignore_ascii_case("ACTIVE") => true,
                    Some(s) if s.eq_ignore_ascii_case("INACTIVE") => false,
                    Some(s) => {
                        return Err(fail(format!(
                            "Certificate status {s:?} is not ACTIVE or INACTIVE"
                        )));
                    }
                };
                plan.certificate = Some(CertificatePlan {
                    logical: logical.clone(),
                    id,
                    active,
                });
            }
            _ => {
                let name = props
                    .get("PolicyName")
                    .map(|n| ctx.string(n, "PolicyName"))
                    .transpose()?;
                let document = match props.get("PolicyDocument") {
                    None => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Object(o)) => Some(Value::Object(o.clone()).to_string()),
                    Some(_) => return Err(fail("PolicyDocument must be a JSON document")),
                };
                let name = match (name, &document) {
                    (Some(_), Some(_)) => {
                        return Err(fail(
                            "A policy has a PolicyName or a PolicyDocument, not both",
                        ));
                    }
                    (Some(n), None) => n,
                    (None, Some(d)) => hex_sha256(d),
                    (None, None) => {
                        return Err(fail("A policy needs a PolicyName or a PolicyDocument"));
                    }
                };
                plan.policies.push(PolicyPlan {
                    logical: logical.clone(),
                    name,
                    document,
                });
            }
        }
    }
    if let Some(dc) = v.get("DeviceConfiguration") {
        plan.device_configuration = ctx.flat(dc, "DeviceConfiguration")?;
    }
    Ok(plan)
}

/// The name AWS gives a policy declared by its document only: a hash of the document.
fn hex_sha256(s: &str) -> String {
    sekisho_pki::certificate_id(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = r#"{"Parameters":{"SerialNumber":{"Type":"String"},"DeviceLocation":{"Type":"String"},
        "Site":{"Type":"String","Default":"north"},"AWS::IoT::Certificate::Id":{"Type":"String"}},
      "Mappings":{"LocationTable":{"Seattle":{"LocationUrl":"https://example.aws"}}},
      "Resources":{
        "thing":{"Type":"AWS::IoT::Thing","Properties":{"ThingName":{"Fn::Join":["",["ThingPrefix_",{"Ref":"SerialNumber"}]]},
          "AttributePayload":{"version":"v1","site":{"Ref":"Site"}},"ThingGroups":["v1-lightbulbs"]},
          "OverrideSettings":{"AttributePayload":"MERGE","ThingTypeName":"REPLACE","ThingGroups":"DO_NOTHING"}},
        "certificate":{"Type":"AWS::IoT::Certificate","Properties":{"CertificateId":{"Ref":"AWS::IoT::Certificate::Id"},"Status":"Active"}},
        "policy":{"Type":"AWS::IoT::Policy","Properties":{"PolicyName":"DevicePolicy"}}},
      "DeviceConfiguration":{"FallbackUrl":"https://www.example.com/test-site",
        "LocationUrl":{"Fn::FindInMap":["LocationTable",{"Ref":"DeviceLocation"},"LocationUrl"]},
        "Region":{"Fn::Select":[1,{"Fn::Split":["-","eu-west-1"]}]},
        "Hello":{"Fn::Sub":"device ${SerialNumber} at ${Site}"}}}"#;

    fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_developer_guides_fleet_template() {
        let p = evaluate(
            FLEET,
            &params(&[
                ("SerialNumber", "123"),
                ("DeviceLocation", "Seattle"),
                ("AWS::IoT::Certificate::Id", "abc"),
            ]),
        )
        .unwrap();
        let t = p.thing.unwrap();
        assert_eq!(t.name, "ThingPrefix_123");
        assert_eq!(
            t.attributes.unwrap().get("site").map(String::as_str),
            Some("north")
        );
        assert_eq!(t.groups, Some(vec!["v1-lightbulbs".to_string()]));
        assert_eq!(t.overrides.get("AttributePayload"), Some(&Override::Merge));
        let c = p.certificate.unwrap();
        assert_eq!((c.id.as_str(), c.active), ("abc", true));
        assert_eq!(p.policies[0].name, "DevicePolicy");
        assert_eq!(p.device_configuration["LocationUrl"], "https://example.aws");
        assert_eq!(p.device_configuration["Region"], "west");
        assert_eq!(p.device_configuration["Hello"], "device 123 at north");
    }

    #[test]
    fn failures() {
        let ok = params(&[
            ("SerialNumber", "1"),
            ("DeviceLocation", "Seattle"),
            ("AWS::IoT::Certificate::Id", "c"),
        ]);
        assert!(
            evaluate(FLEET, &params(&[("DeviceLocation", "Seattle")])).is_err(),
            "a parameter without a value"
        );
        assert!(
            evaluate(
                FLEET,
                &params(&[
                    ("SerialNumber", "1"),
                    ("DeviceLocation", "Paris"),
                    ("AWS::IoT::Certificate::Id", "c")
                ])
            )
            .is_err()
        );
        assert!(evaluate(FLEET, &ok).is_ok());
        assert!(check("[]").is_err());
        assert!(check(r#"{"Resources":{"x":{"Type":"AWS::S3::Bucket"}}}"#).is_err());
        assert!(check(r#"{"Outputs":{},"Resources":{}}"#).is_err());
        assert!(
            check(&format!(
                r#"{{"Resources":{{}},"DeviceConfiguration":{{"a":"{}"}}}}"#,
                "x".repeat(MAX_BODY)
            ))
            .is_err()
        );
        let select = r#"{"Resources":{},"DeviceConfiguration":{"a":{"Fn::Select":[5,["x"]]}}}"#;
        assert!(evaluate(select, &BTreeMap::new()).is_err());
        // Deep nesting is refused, not a stack overflow.
        let mut deep = String::from(r#""x""#);
        for _ in 0..40 {
            deep = format!(r#"{{"Fn::Join":["",[{deep}]]}}"#);
        }
        let body = format!(r#"{{"Resources":{{}},"DeviceConfiguration":{{"a":{deep}}}}}"#);
        assert!(evaluate(&body, &BTreeMap::new()).is_err());
        // What a template or its parameters could make grow is bounded, not allocated.
        let body = r#"{"Parameters":{"Sep":{"Type":"String"},"Tags":{"Type":"String"}},"Resources":{},
            "DeviceConfiguration":{"a":{"Fn::Join":[{"Ref":"Sep"},{"Fn::Split":[",",{"Ref":"Tags"}]}]}}}"#;
        let p = |sep: usize, commas: usize| {
            params(&[("Sep", &"x".repeat(sep)), ("Tags", &",".repeat(commas))])
        };
        assert!(evaluate(body, &p(10, 10)).is_ok());
        assert!(
            evaluate(body, &p(2000, 98)).is_err(),
            "a join past MAX_VALUE"
        );
        assert!(
            evaluate(body, &p(1, MAX_ITEMS)).is_err(),
            "a split past MAX_ITEMS"
        );
        assert!(
            evaluate(body, &p(1, MAX_ITEMS - 1)).is_ok(),
            "a split at MAX_ITEMS"
        );
        assert!(
            evaluate(body, &p(MAX_PARAMETER_VALUE + 1, 1)).is_err(),
            "a parameter past its length"
        );
        let commas = ",".repeat(99);
        let nested = format!(
            r#"{{"Resources":{{}},"DeviceConfiguration":{{"a":{{"Fn::Join":[{{"Fn::Join":["{commas}",{{"Fn::Split":[",","{commas}"]}}]}},{{"Fn::Split":[",","{commas}"]}}]}}}}}}"#
        );
        assert!(
            evaluate(&nested, &BTreeMap::new()).is_err(),
            "nested joins stay bounded"
        );
        let both = r#"{"Resources":{"p":{"Type":"AWS::IoT::Policy","Properties":{"PolicyName":"a","PolicyDocument":"{}"}}}}"#;
        assert!(evaluate(both, &BTreeMap::new()).is_err());
        // A policy document without a name is named by its hash.
        let doc = r#"{"Resources":{"p":{"Type":"AWS::IoT::Policy","Properties":{"PolicyDocument":"{\"Version\":\"2012-10-17\"}"}}}}"#;
        assert_eq!(
            evaluate(doc, &BTreeMap::new()).unwrap().policies[0]
                .name
                .len(),
            64
        );
    }
}
