//! The `lambda` API subset that custom authorizers and provisioning hooks need (rest-json,
//! SigV4 service `lambda`), wire-compatible with `aws lambda` and boto3: functions from a zip,
//! their configuration, Invoke (RequestResponse, Event, DryRun) through the function host,
//! and the resource policy (AddPermission, RemovePermission, GetPolicy).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use sekisho_functions::{Host, HostError, Outcome};
use sekisho_registry::{Function, FunctionUpdate, RegistryError};
use serde_json::{Map, Value, json};

use crate::{ApiError, ApiState, Call, json_response};

/// The largest request body of the lambda API's code uploads: a 50 MB zip, base64, in JSON.
pub const MAX_BODY: usize = 70 * 1024 * 1024;
/// The largest request body of its other operations (Invoke's payload is 6 MB).
pub const MAX_OTHER_BODY: usize = 7 * 1024 * 1024;
/// Distinct codes an account may store (its functions' current ones).
const MAX_STORED_CODE: usize = 1000;

/// Whether a request may carry function code (CreateFunction, UpdateFunctionCode): only those
/// get `MAX_BODY`.
pub fn uploads_code(method: &str, path: &str) -> bool {
    let p = path.trim_end_matches('/');
    (method == "POST" && p == "/2015-03-31/functions")
        || (method == "PUT" && p.starts_with("/2015-03-31/functions/") && p.ends_with("/code"))
}
/// The largest synchronous Invoke payload.
const MAX_PAYLOAD: usize = 6 * 1024 * 1024;
/// The largest asynchronous (Event) Invoke payload.
const MAX_EVENT_PAYLOAD: usize = 1024 * 1024;

const RUNTIMES: &[&str] = &[
    "python3.9",
    "python3.10",
    "python3.11",
    "python3.12",
    "python3.13",
    "python3.14",
    "nodejs18.x",
    "nodejs20.x",
    "nodejs22.x",
    "nodejs24.x",
    "provided.al2",
    "provided.al2023",
];

fn err(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
    let message = message.into();
    let mut e = ApiError::new(status, code, message.clone());
    e.extra.push(("Type", "User".into()));
    // ResourceNotFoundException and ServiceException name it with a capital M.
    e.extra.push(("Message", message));
    e
}

fn invalid(message: impl Into<String>) -> ApiError {
    err(400, "InvalidParameterValueException", message)
}

fn registry_error(e: RegistryError) -> ApiError {
    let m = e.to_string();
    match e {
        RegistryError::NotFound(_) => err(404, "ResourceNotFoundException", m),
        RegistryError::AlreadyExists { .. } | RegistryError::Conflict(_) => {
            err(409, "ResourceConflictException", m)
        }
        RegistryError::PreconditionFailed(_) => err(412, "PreconditionFailedException", m),
        RegistryError::LimitExceeded(_) => err(400, "PolicyLengthExceededException", m),
        RegistryError::InvalidRequest(_) => invalid(m),
        other => ApiError::from(other),
    }
}

/// The function a path names (a name, an ARN, or a partial ARN `{account}:function:{name}`),
/// within the caller's account; a qualifier other than `$LATEST` names nothing here.
fn function_name(state: &ApiState, call: &Call, raw: &str) -> Result<String, ApiError> {
    let not_found = || {
        err(
            404,
            "ResourceNotFoundException",
            format!(
                "Function not found: {}",
                state.registry.function_arn(&call.account, raw)
            ),
        )
    };
    let (name, qualifier) = if let Some(rest) = raw.strip_prefix("arn:aws:lambda:") {
        // region:account:function:name[:qualifier]
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        match parts.as_slice() {
            [region, account, "function", name, q @ ..]
                if *region == state.endpoints.region && *account == call.account =>
            {
                ((*name).to_owned(), q.first().map(|q| (*q).to_owned()))
            }
            _ => return Err(not_found()),
        }
    } else if let Some((account, rest)) = raw.split_once(":function:") {
        if account != call.account {
            return Err(not_found());
        }
        match rest.split_once(':') {
            Some((n, q)) => (n.to_owned(), Some(q.to_owned())),
            None => (rest.to_owned(), None),
        }
    } else {
        match raw.split_once(':') {
            Some((n, q)) => (n.to_owned(), Some(q.to_owned())),
            None => (raw.to_owned(), None),
        }
    };
    let qualifier = qualifier.or_else(|| call.q("Qualifier").map(str::to_owned));
    if qualifier.as_deref().is_some_and(|q| q != "$LATEST") {
        return Err(not_found());
    }
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(format!(
            "1 validation error detected: Value '{raw}' at 'functionName' failed to satisfy constraint: Member must satisfy regular expression pattern: (arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{{2}}(-gov)?-[a-z]+-\\d{{1}}:)?(\\d{{12}}:)?(function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?"
        )));
    }
    Ok(name)
}

/// The request's operation, its IAM action, and the function it names (`None`: the account).
fn route(state: &ApiState, call: &Call) -> Result<(&'static str, Option<String>), ApiError> {
    let seg: Vec<&str> = call.segments.iter().map(String::as_str).collect();
    let m = call.method.as_str();
    let name = |raw: &str| function_name(state, call, raw).map(Some);
    Ok(match (m, seg.as_slice()) {
        ("POST", ["2015-03-31", "functions"]) | ("POST", ["2015-03-31", "functions", ""]) => {
            ("CreateFunction", None)
        }
        ("GET", ["2015-03-31", "functions"]) | ("GET", ["2015-03-31", "functions", ""]) => {
            ("ListFunctions", None)
        }
        ("GET", ["2015-03-31", "functions", f]) => ("GetFunction", name(f)?),
        ("DELETE", ["2015-03-31", "functions", f]) => ("DeleteFunction", name(f)?),
        ("GET", ["2015-03-31", "functions", f, "configuration"]) => {
            ("GetFunctionConfiguration", name(f)?)
        }
        ("PUT", ["2015-03-31", "functions", f, "configuration"]) => {
            ("UpdateFunctionConfiguration", name(f)?)
        }
        ("PUT", ["2015-03-31", "functions", f, "code"]) => ("UpdateFunctionCode", name(f)?),
        ("POST", ["2015-03-31", "functions", f, "invocations"]) => ("InvokeFunction", name(f)?),
        ("POST", ["2015-03-31", "functions", f, "policy"]) => ("AddPermission", name(f)?),
        ("GET", ["2015-03-31", "functions", f, "policy"]) => ("GetPolicy", name(f)?),
        ("DELETE", ["2015-03-31", "functions", f, "policy", _]) => ("RemovePermission", name(f)?),
        _ => {
            return Err(err(
                404,
                "UnknownOperationException",
                format!("No operation is served at {} {}", m, seg.join("/")),
            ));
        }
    })
}

/// Serves one lambda API call (already authenticated).
pub async fn dispatch(state: &Arc<ApiState>, call: &Call) -> Response<Full<Bytes>> {
    match run(state, call).await {
        Ok(r) => r,
        Err(e) => crate::error_response(&e),
    }
}

async fn run(state: &Arc<ApiState>, call: &Call) -> Result<Response<Full<Bytes>>, ApiError> {
    // Functions run code as the server's user: only where the operator turned them on.
    if !state
        .functions
        .as_ref()
        .is_some_and(|f| f.host.allows(&call.account))
    {
        return Err(err(
            403,
            "AccessDeniedException",
            "Functions are not enabled for this account on this server (see [functions] in the configuration)",
        ));
    }
    let (op, name) = route(state, call)?;
    // CreateFunction names its function in the body.
    let name = match (op, name) {
        ("CreateFunction", _) => {
            let b = call.json()?;
            let raw = b
                .get("FunctionName")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("FunctionName is required"))?;
            Some(function_name(state, call, raw)?)
        }
        (_, n) => n,
    };
    let resource = match &name {
        Some(n) => state.registry.function_arn(&call.account, n),
        None => "*".to_owned(),
    };
    crate::authorize(
        state,
        &call.caller,
        &call.request,
        &format!("lambda:{op}"),
        &resource,
    )?;
    let name = name.unwrap_or_default();
    let ok = |status: u16, v: Value| Ok(json_response(status, &v));
    match op {
        "CreateFunction" => ok(201, create(state, call, &name)?),
        "ListFunctions" => ok(200, list(state, call)?),
        "GetFunction" => {
            let f = state
                .registry
                .function(&call.account, &name)
                .map_err(registry_error)?;
            ok(
                200,
                json!({"Configuration": configuration(state, &call.account, &f),
                    "Code": {"RepositoryType": "S3", "Location": ""}, "Tags": {}}),
            )
        }
        "GetFunctionConfiguration" => {
            let f = state
                .registry
                .function(&call.account, &name)
                .map_err(registry_error)?;
            ok(200, configuration(state, &call.account, &f))
        }
        "UpdateFunctionCode" => ok(200, update_code(state, call, &name)?),
        "UpdateFunctionConfiguration" => ok(200, update_configuration(state, call, &name)?),
        "DeleteFunction" => {
            state
                .registry
                .delete_function(&call.account, &name)
                .map_err(registry_error)?;
            if let Some(f) = &state.functions {
                f.host.retire(&call.account, &name);
            }
            let mut r = json_response(204, &json!({}));
            *r.body_mut() = Full::new(Bytes::new());
            Ok(r)
        }
        "InvokeFunction" => invoke(state, call, &name).await,
        "AddPermission" => ok(201, add_permission(state, call, &name)?),
        "GetPolicy" => {
            let f = state
                .registry
                .function(&call.account, &name)
                .map_err(registry_error)?;
            if f.policy.is_empty() {
                return Err(err(
                    404,
                    "ResourceNotFoundException",
                    "The resource you requested does not exist.",
                ));
            }
            let policy = json!({"Version": "2012-10-17", "Id": "default", "Statement": f.policy});
            ok(
                200,
                json!({"Policy": policy.to_string(), "RevisionId": f.policy_revision}),
            )
        }
        "RemovePermission" => {
            let sid = call.segments.get(4).map(String::as_str).unwrap_or("");
            state
                .registry
                .remove_function_permission(&call.account, &name, sid, call.q("RevisionId"))
                .map_err(registry_error)?;
            let mut r = json_response(204, &json!({}));
            *r.body_mut() = Full::new(Bytes::new());
            Ok(r)
        }
        _ => Err(err(404, "UnknownOperationException", op)),
    }
}

/// `FunctionConfiguration`.
fn configuration(state: &ApiState, account: &str, f: &Function) -> Value {
    let mut v = json!({
        "FunctionName": f.name,
        "FunctionArn": state.registry.function_arn(account, &f.name),
        "Runtime": f.runtime,
        "Role": f.role,
        "Handler": f.handler,
        "CodeSize": f.code_size,
        "Description": f.description,
        "Timeout": f.timeout,
        "MemorySize": f.memory,
        "LastModified": f.last_modified,
        "CodeSha256": Host::code_sha_base64(&f.code_sha),
        "Version": "$LATEST",
        "RevisionId": f.revision,
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
        "EphemeralStorage": {"Size": 512},
        "TracingConfig": {"Mode": "PassThrough"},
    });
    if !f.env.is_empty() {
        v["Environment"] = json!({"Variables": f.env});
    }
    v
}

fn list(state: &ApiState, call: &Call) -> Result<Value, ApiError> {
    let max = call.q_int("MaxItems", 1, 10_000, 50)? as usize;
    let page = state
        .registry
        .list_functions(&call.account, call.q("Marker"), max)
        .map_err(registry_error)?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|f| configuration(state, &call.account, f))
        .collect();
    let mut out = json!({"Functions": items});
    if let Some(n) = page.next {
        out["NextMarker"] = json!(n);
    }
    Ok(out)
}

fn str_of<'a>(b: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, ApiError> {
    match b.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{k} must be a string"))),
    }
}

fn int_of(b: &Map<String, Value>, k: &str, min: u64, max: u64) -> Result<Option<u32>, ApiError> {
    match b.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n as u32)),
            _ => Err(invalid(format!(
                "1 validation error detected: Value '{v}' at '{}' failed to satisfy constraint: Member must have value between {min} and {max}",
                k[..1].to_ascii_lowercase() + &k[1..]
            ))),
        },
    }
}

fn runtime(b: &Map<String, Value>, required: bool) -> Result<Option<String>, ApiError> {
    match str_of(b, "Runtime")? {
        None if required => Err(invalid("Runtime is required for a Zip function")),
        None => Ok(None),
        Some(r) if RUNTIMES.contains(&r) => Ok(Some(r.to_owned())),
        Some(r) => Err(invalid(format!(
            "Value {r} at 'runtime' failed to satisfy constraint: Member must satisfy enum value set: [{}]",
            RUNTIMES.join(", ")
        ))),
    }
}

fn handler(b: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match str_of(b, "Handler")? {
        Some(h) if h.is_empty() || h.len() > 128 || h.chars().any(char::is_whitespace) => {
            Err(invalid(format!(
                "Value {h} at 'handler' failed to satisfy constraint: Member must have length between 1 and 128 and no spaces"
            )))
        }
        h => Ok(h.map(str::to_owned)),
    }
}

fn environment(b: &Map<String, Value>) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    let Some(e) = b.get("Environment").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let vars = match e.get("Variables") {
        None | Some(Value::Null) => return Ok(Some(BTreeMap::new())),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(invalid("Environment.Variables must be an object")),
    };
    let mut out = BTreeMap::new();
    let mut size = 0;
    for (k, v) in vars {
        let Some(v) = v.as_str() else {
            return Err(invalid(format!("The value of {k} must be a string")));
        };
        let mut chars = k.chars();
        let well_formed = k.len() >= 2
            && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !well_formed {
            return Err(invalid(format!(
                "Environment variable name {k} does not match [a-zA-Z]([a-zA-Z0-9_])+"
            )));
        }
        if sekisho_functions::RESERVED_ENV.contains(&k.as_str()) {
            return Err(invalid(format!(
                "Lambda was unable to configure your environment variables because the environment variables you have provided contains reserved keys that are currently not supported for modification. Reserved keys used in this request: {k}"
            )));
        }
        size += k.len() + v.len();
        out.insert(k.clone(), v.to_owned());
    }
    if size > 4096 {
        return Err(invalid(
            "Lambda was unable to configure your environment variables because the environment variables you have provided exceeded the 4KB limit.",
        ));
    }
    Ok(Some(out))
}

/// The execution role: one of the caller's account that the caller may pass to Lambda, and
/// that trusts Lambda.
fn role(state: &ApiState, call: &Call, arn: &str) -> Result<String, ApiError> {
    if !arn.starts_with(&format!("arn:aws:iam::{}:role/", call.account)) {
        return Err(invalid(format!(
            "The role defined for the function cannot be assumed by Lambda: {arn} is not a role of this account"
        )));
    }
    crate::authorize_with(
        state,
        &call.caller,
        &call.request,
        "iam:PassRole",
        arn,
        &[("iam:PassedToService", "lambda.amazonaws.com".to_string())],
    )?;
    let r = state
        .registry
        .role_by_arn(&call.account, arn)
        .ok_or_else(|| invalid("The role defined for the function cannot be assumed by Lambda."))?;
    if !r.trusts_service("lambda.amazonaws.com", &sekisho_policy::MapContext::new()) {
        return Err(invalid(
            "The role defined for the function cannot be assumed by Lambda.",
        ));
    }
    Ok(arn.to_owned())
}

fn zip_of(
    state: &ApiState,
    call: &Call,
    code: &Map<String, Value>,
) -> Result<(String, u64), ApiError> {
    let Some(host) = &state.functions else {
        return Err(err(
            500,
            "ServiceException",
            "Functions are not served here",
        ));
    };
    if code.get("S3Bucket").is_some_and(|v| !v.is_null())
        || code.get("ImageUri").is_some_and(|v| !v.is_null())
    {
        return Err(invalid("Only Code.ZipFile is supported"));
    }
    let Some(b64) = str_of(code, "ZipFile")? else {
        return Err(invalid("Code.ZipFile is required"));
    };
    use base64::Engine as _;
    let zip = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| invalid("Code.ZipFile is not base64"))?;
    // What the account's functions no longer use goes first; what is left is bounded.
    let keep: std::collections::BTreeSet<String> = state
        .registry
        .list_functions(&call.account, None, usize::MAX)
        .map(|p| p.items.into_iter().map(|f| f.code_sha).collect())
        .unwrap_or_default();
    if host.host.collect_code(&call.account, &keep) >= MAX_STORED_CODE {
        return Err(err(
            400,
            "CodeStorageExceededException",
            format!("The account stores {MAX_STORED_CODE} function codes, the most it may"),
        ));
    }
    // Hashing and unpacking (up to 250 MB) off the runtime's reactor.
    let (sha, size) = tokio::task::block_in_place(|| host.host.store_code(&call.account, &zip))
        .map_err(|e| match e {
            sekisho_functions::CodeError::Invalid(m) => invalid(m),
            sekisho_functions::CodeError::TooLarge(m) => err(413, "RequestTooLargeException", m),
            sekisho_functions::CodeError::Io(e) => err(500, "ServiceException", e.to_string()),
        })?;
    // In a cluster, the code reaches the share before the function naming it is written, so
    // that every node can run it ([`sweep_shared_code`] takes away what nothing names).
    if let Some(share) = host.host.share() {
        let put = share.put(&call.account, &sha, zip.into());
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(put)).map_err(
            |e| match e.kind() {
                std::io::ErrorKind::QuotaExceeded => {
                    err(400, "CodeStorageExceededException", e.to_string())
                }
                _ => err(
                    500,
                    "ServiceException",
                    format!("The code could not be shared with the cluster: {e}"),
                ),
            },
        )?;
    }
    Ok((sha, size))
}

/// After a function's code changed (the write in the log, so this node's registry holds every
/// function up to it): the account's shared code that none of its functions names and that
/// was last written more than the grace ago leaves the cluster's share. Nothing is removed if
/// the functions cannot be listed.
fn sweep_shared_code(state: &ApiState, account: &str) {
    let Some(share) = state.functions.as_ref().and_then(|f| f.host.share()) else {
        return;
    };
    let Ok(page) = state.registry.list_functions(account, None, usize::MAX) else {
        return;
    };
    let keep = page.items.into_iter().map(|f| f.code_sha).collect();
    let sweep = share.sweep(account, keep, sekisho_functions::SHARED_CODE_GRACE);
    let account = account.to_owned();
    tokio::spawn(async move {
        match sweep.await {
            Ok(0) => {}
            Ok(n) => tracing::info!(account, removed = n, "shared function code swept"),
            Err(e) => tracing::warn!(account, error = %e, "sweeping shared function code"),
        }
    });
}

fn create(state: &ApiState, call: &Call, name: &str) -> Result<Value, ApiError> {
    let b = call.json()?;
    if str_of(&b, "PackageType")?.is_some_and(|p| p != "Zip") {
        return Err(invalid("Only PackageType Zip is supported"));
    }
    let runtime = runtime(&b, true)?.unwrap_or_default();
    let handler = handler(&b)?;
    if handler.is_none() && !runtime.starts_with("provided") {
        return Err(invalid("Handler is required for this runtime"));
    }
    let role_arn = str_of(&b, "Role")?.ok_or_else(|| invalid("Role is required"))?;
    let role_arn = role(state, call, role_arn)?;
    let code = b
        .get("Code")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("Code is required"))?;
    // Every other field is checked before the code is stored.
    let description: String = str_of(&b, "Description")?
        .unwrap_or("")
        .chars()
        .take(256)
        .collect();
    let timeout = int_of(&b, "Timeout", 1, 900)?.unwrap_or(3);
    let memory = int_of(&b, "MemorySize", 128, 10_240)?.unwrap_or(128);
    let env = environment(&b)?.unwrap_or_default();
    if state.registry.function(&call.account, name).is_ok() {
        return Err(err(
            409,
            "ResourceConflictException",
            format!("Function already exist: {name}"),
        ));
    }
    let (sha, size) = zip_of(state, call, code)?;
    let f = state
        .registry
        .create_function(
            &call.account,
            Function {
                name: name.to_owned(),
                runtime,
                handler: handler.unwrap_or_default(),
                role: role_arn,
                description,
                timeout,
                memory,
                env,
                code_sha: sha,
                code_size: size,
                last_modified: String::new(),
                revision: String::new(),
                policy: Vec::new(),
                policy_revision: String::new(),
            },
        )
        .map_err(registry_error)?;
    sweep_shared_code(state, &call.account);
    Ok(configuration(state, &call.account, &f))
}

fn update_code(state: &ApiState, call: &Call, name: &str) -> Result<Value, ApiError> {
    let b = call.json()?;
    state
        .registry
        .function(&call.account, name)
        .map_err(registry_error)?;
    let code = zip_of(state, call, &b)?;
    let f = state
        .registry
        .update_function(
            &call.account,
            name,
            FunctionUpdate {
                code: Some(code),
                expected_revision: str_of(&b, "RevisionId")?.map(str::to_owned),
                ..FunctionUpdate::default()
            },
        )
        .map_err(registry_error)?;
    if let Some(fs) = &state.functions {
        fs.host.retire(&call.account, name);
    }
    sweep_shared_code(state, &call.account);
    Ok(configuration(state, &call.account, &f))
}

fn update_configuration(state: &ApiState, call: &Call, name: &str) -> Result<Value, ApiError> {
    let b = call.json()?;
    let role = match str_of(&b, "Role")? {
        Some(r) => Some(role(state, call, r)?),
        None => None,
    };
    let f = state
        .registry
        .update_function(
            &call.account,
            name,
            FunctionUpdate {
                runtime: runtime(&b, false)?,
                handler: handler(&b)?,
                role,
                description: str_of(&b, "Description")?.map(|d| d.chars().take(256).collect()),
                timeout: int_of(&b, "Timeout", 1, 900)?,
                memory: int_of(&b, "MemorySize", 128, 10_240)?,
                env: environment(&b)?,
                code: None,
                expected_revision: str_of(&b, "RevisionId")?.map(str::to_owned),
            },
        )
        .map_err(registry_error)?;
    if let Some(fs) = &state.functions {
        fs.host.retire(&call.account, name);
    }
    Ok(configuration(state, &call.account, &f))
}

fn add_permission(state: &ApiState, call: &Call, name: &str) -> Result<Value, ApiError> {
    let b = call.json()?;
    let sid = str_of(&b, "StatementId")?.ok_or_else(|| invalid("StatementId is required"))?;
    if sid.is_empty()
        || sid.len() > 100
        || !sid
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        return Err(invalid(format!(
            "1 validation error detected: Value '{sid}' at 'statementId' failed to satisfy constraint: Member must satisfy regular expression pattern: ([a-zA-Z0-9-_]+)"
        )));
    }
    let action = str_of(&b, "Action")?.ok_or_else(|| invalid("Action is required"))?;
    let action_ok = action == "*"
        || action == "lambda:*"
        || action
            .strip_prefix("lambda:")
            .is_some_and(|a| !a.is_empty() && a.bytes().all(|c| c.is_ascii_alphabetic()));
    if !action_ok {
        return Err(invalid(format!(
            "1 validation error detected: Value '{action}' at 'action' failed to satisfy constraint: Member must satisfy regular expression pattern: (lambda:[*]|lambda:[a-zA-Z]+|[*])"
        )));
    }
    let principal = str_of(&b, "Principal")?.ok_or_else(|| invalid("Principal is required"))?;
    let principal = if principal.len() == 12 && principal.bytes().all(|c| c.is_ascii_digit()) {
        json!({"AWS": format!("arn:aws:iam::{principal}:root")})
    } else if principal.starts_with("arn:") || principal == "*" {
        json!({"AWS": principal})
    } else if principal.contains('.') {
        json!({"Service": principal})
    } else {
        return Err(invalid(format!(
            "The provided principal was invalid: {principal}"
        )));
    };
    let mut statement = json!({
        "Sid": sid,
        "Effect": "Allow",
        "Principal": principal,
        "Action": action,
        "Resource": state.registry.function_arn(&call.account, name),
    });
    let mut condition = Map::new();
    if let Some(a) = str_of(&b, "SourceAccount")? {
        condition.insert("StringEquals".into(), json!({"AWS:SourceAccount": a}));
    }
    if let Some(a) = str_of(&b, "SourceArn")? {
        condition.insert("ArnLike".into(), json!({"AWS:SourceArn": a}));
    }
    if !condition.is_empty() {
        statement["Condition"] = Value::Object(condition);
    }
    state
        .registry
        .add_function_permission(
            &call.account,
            name,
            statement.clone(),
            str_of(&b, "RevisionId")?,
        )
        .map_err(registry_error)?;
    Ok(json!({"Statement": statement.to_string()}))
}

/// Runs a function synchronously: (request id, outcome).
pub async fn invoke_function(
    state: &Arc<ApiState>,
    account: &str,
    f: &Function,
    payload: Bytes,
) -> Result<(String, Outcome), ApiError> {
    let Some(fs) = &state.functions else {
        return Err(err(
            500,
            "ServiceException",
            "Functions are not served here",
        ));
    };
    fs.invoke(account, f, payload, None)
        .await
        .map_err(|e| match e {
            HostError::TooMany => {
                let mut e = err(429, "TooManyRequestsException", "Rate Exceeded.");
                e.extra
                    .push(("Reason", "ConcurrentInvocationLimitExceeded".into()));
                e
            }
            HostError::Runtime(r) => err(
                502,
                "InvalidRuntimeException",
                format!("The runtime parameter of {r} is not supported here"),
            ),
            HostError::Spawn(m) | HostError::Entrypoint(m) => err(500, "ServiceException", m),
            HostError::Disabled => err(
                403,
                "AccessDeniedException",
                HostError::Disabled.to_string(),
            ),
        })
}

async fn invoke(
    state: &Arc<ApiState>,
    call: &Call,
    name: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let f = state
        .registry
        .function(&call.account, name)
        .map_err(registry_error)?;
    let kind = call
        .header("x-amz-invocation-type")
        .unwrap_or("RequestResponse");
    let limit = if kind == "Event" {
        MAX_EVENT_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if call.body.len() > limit {
        return Err(err(
            413,
            "RequestTooLargeException",
            format!("Request must be smaller than {limit} bytes for the InvokeFunction operation"),
        ));
    }
    if !call.body.is_empty() && serde_json::from_slice::<Value>(&call.body).is_err() {
        return Err(err(
            400,
            "InvalidRequestContentException",
            "Could not parse request body into json",
        ));
    }
    let payload = if call.body.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        call.body.clone()
    };
    let empty = |status: u16| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
        r
    };
    match kind {
        "DryRun" => Ok(empty(204)),
        "Event" => {
            let (state, account) = (state.clone(), call.account.clone());
            tokio::spawn(async move {
                if let Err(e) = invoke_function(&state, &account, &f, payload).await {
                    tracing::warn!(function = %f.name, error = %e.message, "asynchronous invocation failed");
                }
            });
            Ok(empty(202))
        }
        "RequestResponse" => {
            let (id, outcome) = invoke_function(state, &call.account, &f, payload).await?;
            let (body, failed) = match outcome {
                Outcome::Response(b) => (b, false),
                Outcome::Error(b) => (b, true),
            };
            let mut r = Response::new(Full::new(body));
            let h = r.headers_mut();
            let mut set = |k: &'static str, v: &str| {
                if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                    h.insert(k, v);
                }
            };
            set("content-type", "application/json");
            set("x-amz-executed-version", "$LATEST");
            set("x-amzn-requestid", &id);
            if failed {
                set("x-amz-function-error", "Unhandled");
            }
            Ok(r)
        }
        other => Err(invalid(format!(
            "1 validation error detected: Value '{other}' at 'invocationType' failed to satisfy constraint: Member must satisfy enum value set: [Event, RequestResponse, DryRun]"
        ))),
    }
}
