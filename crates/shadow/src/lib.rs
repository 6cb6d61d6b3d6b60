//! AWS IoT Device Shadow documents, without I/O or clock.
//!
//! A shadow is its `desired` and `reported` state, the metadata that mirrors them (a
//! `{"timestamp": T}` for every leaf, arrays element by element), a version and whether it
//! exists (a deleted shadow keeps its version: the next update continues from it). The three
//! operations take the stored shadow, the request's bytes and the time in epoch seconds, and
//! return the documents AWS answers with (`/accepted`, `/update/delta`, `/update/documents`)
//! and the shadow to store, or AWS's error (code and exact message).
//!
//! Semantics (AWS IoT Developer Guide, device-shadow-document and device-shadow-mqtt):
//! - an update changes only the fields it names; `null` removes a field, and a section set to
//!   `null` removes the whole section;
//! - objects merge recursively; arrays (and every other value) replace what was there;
//! - the delta is every desired field absent from or different in reported, nested objects
//!   recursing with their path kept, arrays compared whole; it is published when an update
//!   that names desired state leaves a non-empty delta;
//! - `version` in a request must equal the shadow's (409 `Version conflict`);
//! - limits: the state (desired and reported, compact JSON, metadata excluded) at most
//!   [`MAX_STATE_BYTES`]; each section at most [`MAX_DEPTH`] levels deep (AWS's message counts
//!   the `state` node too, hence "maximum is 6"); a client token at most
//!   [`MAX_CLIENT_TOKEN`] bytes.

use serde_json::{Map, Value, json};

/// The largest state document: desired and reported, compact, without metadata.
pub const MAX_STATE_BYTES: usize = 8 * 1024;
/// The deepest a desired or reported section may be (the section's own object is level 1).
pub const MAX_DEPTH: usize = 5;
/// The longest client token, in bytes.
pub const MAX_CLIENT_TOKEN: usize = 64;
/// The longest shadow name.
pub const MAX_SHADOW_NAME: usize = 64;
/// The longest thing name.
pub const MAX_THING_NAME: usize = 128;

/// An error as the shadow service reports it: the HTTP status and AWS's exact message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// HTTP status (400, 404, 409, 413, 429, 500).
    pub code: u16,
    /// AWS's message.
    pub message: String,
}

impl Error {
    fn new(code: u16, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    fn bad(message: &str) -> Error {
        Error::new(400, message)
    }

    /// 404 for a shadow that does not exist (the thing's name for the classic shadow).
    pub fn not_found(name: &str) -> Error {
        Error::new(404, format!("No shadow exists with name: {name}"))
    }

    /// 400, a new named shadow beyond the most a thing may have (a quota of Sekisho's: AWS
    /// sets none, but storage must be bounded).
    pub fn too_many_shadows(thing: &str, most: usize) -> Error {
        Error::new(
            400,
            format!("The thing {thing} has {most} named shadows, the most it may have"),
        )
    }

    /// 400, a new shadow beyond the most an account may store (Sekisho's own quota).
    pub fn too_many_account_shadows(most: usize) -> Error {
        Error::new(
            400,
            format!("The account has {most} shadows, the most it may store"),
        )
    }

    /// 429, more requests for one thing than AWS allows per second.
    pub fn throttled() -> Error {
        Error::new(429, "Too Many Requests")
    }

    /// 500, the shadow could not be stored or read.
    pub fn internal() -> Error {
        Error::new(500, "Internal service failure")
    }

    /// The name of the error shape iot-data reports for this status.
    pub fn kind(&self) -> &'static str {
        match self.code {
            404 => "ResourceNotFoundException",
            409 => "ConflictException",
            413 => "RequestEntityTooLargeException",
            415 => "UnsupportedDocumentEncodingException",
            429 => "ThrottlingException",
            401 => "UnauthorizedException",
            403 => "ForbiddenException",
            500 => "InternalFailureException",
            _ => "InvalidRequestException",
        }
    }

    /// The error document of `/rejected` topics: `{"code","message","timestamp","clientToken"?}`.
    pub fn document(&self, client_token: Option<&str>, now: u64) -> Value {
        let mut d = json!({"code": self.code, "message": self.message, "timestamp": now});
        if let Some(t) = client_token {
            d["clientToken"] = json!(t);
        }
        d
    }
}

/// Which request a reserved shadow topic makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `.../get`
    Get,
    /// `.../update`
    Update,
    /// `.../delete`
    Delete,
}

impl Op {
    /// The topic suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// A shadow request topic, parsed: `$aws/things/{thing}/shadow[/name/{name}]/{get|update|delete}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The thing's name.
    pub thing: &'a str,
    /// The shadow's name; `None` for the classic shadow.
    pub name: Option<&'a str>,
    /// The operation.
    pub op: Op,
}

impl Request<'_> {
    /// The topic prefix of this shadow (`$aws/things/{thing}/shadow[/name/{name}]`).
    pub fn prefix(&self) -> String {
        prefix(self.thing, self.name)
    }
}

/// The topic prefix of a shadow.
pub fn prefix(thing: &str, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("$aws/things/{thing}/shadow/name/{n}"),
        None => format!("$aws/things/{thing}/shadow"),
    }
}

/// Whether `thing` is a valid thing name (`[a-zA-Z0-9:_-]+`, at most 128 bytes).
pub fn valid_thing_name(thing: &str) -> bool {
    !thing.is_empty()
        && thing.len() <= MAX_THING_NAME
        && thing
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b':' | b'_' | b'-'))
}

/// Whether `name` is a valid shadow name (`[$a-zA-Z0-9:_-]+`, at most 64 bytes).
pub fn valid_shadow_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SHADOW_NAME
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'$' | b':' | b'_' | b'-'))
}

/// Parses a request topic; `None` for any other topic (responses included) or invalid names.
pub fn parse_topic(topic: &str) -> Option<Request<'_>> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let (thing, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("shadow/")?;
    let (name, op) = match rest.strip_prefix("name/") {
        Some(r) => {
            let (n, op) = r.split_once('/')?;
            (Some(n), op)
        }
        None => (None, rest),
    };
    let op = match op {
        "get" => Op::Get,
        "update" => Op::Update,
        "delete" => Op::Delete,
        _ => return None,
    };
    if !valid_thing_name(thing) || name.is_some_and(|n| !valid_shadow_name(n)) {
        return None;
    }
    Some(Request { thing, name, op })
}

/// A shadow as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shadow {
    /// Desired state, if any.
    pub desired: Option<Map<String, Value>>,
    /// Reported state, if any.
    pub reported: Option<Map<String, Value>>,
    /// Metadata of desired.
    pub meta_desired: Option<Map<String, Value>>,
    /// Metadata of reported.
    pub meta_reported: Option<Map<String, Value>>,
    /// The version of the last accepted update (kept across a delete).
    pub version: u64,
    /// Whether the shadow exists (false once deleted; the version stays).
    pub exists: bool,
}

impl Shadow {
    /// The stored form.
    pub fn to_json(&self) -> String {
        json!({
            "state": sections(&self.desired, &self.reported),
            "metadata": sections(&self.meta_desired, &self.meta_reported),
            "version": self.version,
            "exists": self.exists,
        })
        .to_string()
    }

    /// Reads the stored form; `None` if it is not one.
    pub fn from_json(s: &str) -> Option<Shadow> {
        let v: Value = serde_json::from_str(s).ok()?;
        let obj = |v: &Value, k: &str| v.get(k).and_then(Value::as_object).cloned();
        Some(Shadow {
            desired: obj(&v["state"], "desired"),
            reported: obj(&v["state"], "reported"),
            meta_desired: obj(&v["metadata"], "desired"),
            meta_reported: obj(&v["metadata"], "reported"),
            version: v.get("version")?.as_u64()?,
            exists: v.get("exists")?.as_bool()?,
        })
    }

    /// The delta: desired fields absent from or different in reported.
    pub fn delta(&self) -> Option<(Map<String, Value>, Map<String, Value>)> {
        let desired = self.desired.as_ref()?;
        let empty = Map::new();
        let reported = self.reported.as_ref().unwrap_or(&empty);
        let meta = self.meta_desired.as_ref().unwrap_or(&empty);
        let (d, m) = delta(desired, reported, meta);
        (!d.is_empty()).then_some((d, m))
    }

    fn full(&self) -> Value {
        json!({
            "state": sections(&self.desired, &self.reported),
            "metadata": sections(&self.meta_desired, &self.meta_reported),
            "version": self.version,
        })
    }
}

fn sections(desired: &Option<Map<String, Value>>, reported: &Option<Map<String, Value>>) -> Value {
    let mut m = Map::new();
    if let Some(d) = desired {
        m.insert("desired".into(), Value::Object(d.clone()));
    }
    if let Some(r) = reported {
        m.insert("reported".into(), Value::Object(r.clone()));
    }
    Value::Object(m)
}

fn delta(
    desired: &Map<String, Value>,
    reported: &Map<String, Value>,
    meta: &Map<String, Value>,
) -> (Map<String, Value>, Map<String, Value>) {
    let mut d = Map::new();
    let mut m = Map::new();
    for (k, v) in desired {
        let r = reported.get(k);
        if r == Some(v) {
            continue;
        }
        if let (Value::Object(dv), Some(Value::Object(rv))) = (v, r) {
            let empty = Map::new();
            let mv = meta.get(k).and_then(Value::as_object).unwrap_or(&empty);
            let (sd, sm) = delta(dv, rv, mv);
            if !sd.is_empty() {
                d.insert(k.clone(), Value::Object(sd));
                m.insert(k.clone(), Value::Object(sm));
            }
            continue;
        }
        d.insert(k.clone(), v.clone());
        if let Some(mv) = meta.get(k) {
            m.insert(k.clone(), mv.clone());
        }
    }
    (d, m)
}

/// What an accepted update produces.
#[derive(Debug, Clone, PartialEq)]
pub struct Updated {
    /// `/update/accepted`.
    pub accepted: Value,
    /// `/update/delta`, when the update named desired state and a delta remains.
    pub delta: Option<Value>,
    /// `/update/documents`.
    pub documents: Value,
    /// The shadow to store.
    pub shadow: Shadow,
}

/// The client token of a request, if it has a valid one (for error documents).
pub fn client_token(request: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(request).ok()?;
    let t = v.get("clientToken")?.as_str()?;
    (t.len() <= MAX_CLIENT_TOKEN).then(|| t.to_owned())
}

fn parse_request(request: &[u8]) -> Result<Map<String, Value>, Error> {
    if std::str::from_utf8(request).is_err() {
        return Err(Error::new(
            415,
            "Unsupported documented encoding; supported encoding is UTF-8",
        ));
    }
    match serde_json::from_slice(request) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Error::bad("Invalid JSON")),
    }
}

fn token_of(req: &Map<String, Value>) -> Result<Option<String>, Error> {
    match req.get("clientToken") {
        None => Ok(None),
        Some(Value::String(t)) if t.len() <= MAX_CLIENT_TOKEN => Ok(Some(t.clone())),
        Some(_) => Err(Error::bad("Invalid clientToken")),
    }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Arrays may not hold `null` at any depth.
fn no_null_in_arrays(v: &Value, in_array: bool) -> bool {
    match v {
        Value::Null => !in_array,
        Value::Object(m) => m.values().all(|v| no_null_in_arrays(v, false)),
        Value::Array(a) => a.iter().all(|v| no_null_in_arrays(v, true)),
        _ => true,
    }
}

/// The metadata of a value: `{"timestamp": now}` per leaf, objects and arrays mirrored.
fn meta_of(v: &Value, now: u64) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), meta_of(v, now)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| meta_of(v, now)).collect()),
        _ => json!({"timestamp": now}),
    }
}

/// Merges `patch` into `state` and its metadata (`null` removes).
fn merge(
    state: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now: u64,
) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                state.remove(k);
                meta.remove(k);
            }
            Value::Object(p) => {
                // What was not an object (a leaf's metadata is `{"timestamp"}`, an object
                // too) starts over, metadata and all.
                if !matches!(state.get(k), Some(Value::Object(_))) {
                    state.insert(k.clone(), Value::Object(Map::new()));
                    meta.insert(k.clone(), Value::Object(Map::new()));
                }
                if !matches!(meta.get(k), Some(Value::Object(_))) {
                    meta.insert(k.clone(), Value::Object(Map::new()));
                }
                if let (Some(Value::Object(s)), Some(Value::Object(m))) =
                    (state.get_mut(k), meta.get_mut(k))
                {
                    merge(s, m, p, now);
                }
            }
            other => {
                state.insert(k.clone(), other.clone());
                meta.insert(k.clone(), meta_of(other, now));
            }
        }
    }
}

/// Applies an update request (`{"state":{"desired":…,"reported":…},"clientToken"?,"version"?}`).
pub fn update(current: Option<&Shadow>, request: &[u8], now: u64) -> Result<Updated, Error> {
    let req = parse_request(request)?;
    let token = token_of(&req)?;
    let empty = Shadow::default();
    let prior = current.unwrap_or(&empty);
    if let Some(v) = req.get("version") {
        let Some(v) = v.as_u64() else {
            return Err(Error::bad("Invalid version"));
        };
        if v != prior.version {
            return Err(Error::new(409, "Version conflict"));
        }
    }
    let Some(state) = req.get("state") else {
        return Err(Error::bad("Missing required node: state"));
    };
    let Value::Object(state) = state else {
        return Err(Error::bad("State node must be an object"));
    };
    for (k, v) in state {
        let what = match k.as_str() {
            "desired" => "Desired node must be an object",
            "reported" => "Reported node must be an object",
            _ => return Err(Error::bad("State contains an invalid node")),
        };
        if !matches!(v, Value::Object(_) | Value::Null) {
            return Err(Error::bad(what));
        }
        if depth(v) > MAX_DEPTH {
            return Err(Error::bad(
                "JSON contains too many levels of nesting; maximum is 6",
            ));
        }
        if !no_null_in_arrays(v, false) {
            return Err(Error::bad("State contains an invalid node"));
        }
    }
    let too_large = || Error::new(413, "The payload exceeds the maximum size allowed");
    if Value::Object(state.clone()).to_string().len() > MAX_STATE_BYTES {
        return Err(too_large());
    }
    let mut next = if prior.exists {
        prior.clone()
    } else {
        Shadow {
            version: prior.version,
            ..Shadow::default()
        }
    };
    let mut accepted_meta = Map::new();
    for (section, patch) in state {
        let (s, m) = if section == "desired" {
            (&mut next.desired, &mut next.meta_desired)
        } else {
            (&mut next.reported, &mut next.meta_reported)
        };
        match patch {
            Value::Object(p) => {
                let st = s.get_or_insert_with(Map::new);
                let mt = m.get_or_insert_with(Map::new);
                merge(st, mt, p, now);
                accepted_meta.insert(section.clone(), meta_of(patch, now));
            }
            _ => {
                *s = None;
                *m = None;
                accepted_meta.insert(section.clone(), json!({"timestamp": now}));
            }
        }
    }
    let size = sections(&next.desired, &next.reported).to_string().len();
    if size > MAX_STATE_BYTES {
        return Err(too_large());
    }
    next.version = prior.version + 1;
    next.exists = true;

    let mut accepted = json!({
        "state": Value::Object(state.clone()),
        "metadata": Value::Object(accepted_meta),
        "version": next.version,
        "timestamp": now,
    });
    let mut documents = json!({"current": next.full(), "timestamp": now});
    if prior.exists {
        documents["previous"] = prior.full();
    }
    let names_desired = matches!(state.get("desired"), Some(Value::Object(_)));
    let mut delta = match (names_desired, next.delta()) {
        (true, Some((d, m))) => Some(json!({
            "state": d,
            "metadata": m,
            "version": next.version,
            "timestamp": now,
        })),
        _ => None,
    };
    if let Some(t) = &token {
        accepted["clientToken"] = json!(t);
        documents["clientToken"] = json!(t);
        if let Some(d) = &mut delta {
            d["clientToken"] = json!(t);
        }
    }
    Ok(Updated {
        accepted,
        delta,
        documents,
        shadow: next,
    })
}

/// Answers a get request (an empty payload, or `{"clientToken": …}`).
pub fn get(current: Option<&Shadow>, name: &str, request: &[u8], now: u64) -> Result<Value, Error> {
    let token = if request.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        token_of(&parse_request(request)?)?
    };
    let shadow = match current {
        Some(s) if s.exists => s,
        _ => return Err(Error::not_found(name)),
    };
    let mut state = sections(&shadow.desired, &shadow.reported);
    let mut metadata = sections(&shadow.meta_desired, &shadow.meta_reported);
    if let Some((d, m)) = shadow.delta() {
        state["delta"] = Value::Object(d);
        metadata["delta"] = Value::Object(m);
    }
    let mut doc = json!({
        "state": state,
        "metadata": metadata,
        "version": shadow.version,
        "timestamp": now,
    });
    if let Some(t) = token {
        doc["clientToken"] = json!(t);
    }
    Ok(doc)
}

/// What an accepted delete produces.
#[derive(Debug, Clone, PartialEq)]
pub struct Deleted {
    /// `/delete/accepted`: `{"version","timestamp","clientToken"?}`.
    pub accepted: Value,
    /// What to store: no state, the version kept.
    pub shadow: Shadow,
}

/// Deletes a shadow; its version is kept for the next update. The payload's content is
/// ignored but for a client token.
pub fn delete(
    current: Option<&Shadow>,
    name: &str,
    request: &[u8],
    now: u64,
) -> Result<Deleted, Error> {
    let shadow = match current {
        Some(s) if s.exists => s,
        _ => return Err(Error::not_found(name)),
    };
    let mut accepted = json!({"version": shadow.version, "timestamp": now});
    if let Some(t) = client_token(request) {
        accepted["clientToken"] = json!(t);
    }
    Ok(Deleted {
        accepted,
        shadow: Shadow {
            version: shadow.version,
            ..Shadow::default()
        },
    })
}

#[cfg(test)]
mod tests;
