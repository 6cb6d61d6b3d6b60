//! Lambda-compatible functions: their configuration and resource policy (the code itself is
//! kept by the function host, by hash). Keyed by name within an account.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::Kind;
use crate::things::uuid_like;
use crate::*;

/// Functions an account may have.
pub const MAX_FUNCTIONS: usize = 1000;

/// A function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Function {
    /// Name.
    pub name: String,
    /// Runtime (`python3.12`, `nodejs20.x`, `provided.al2023`, ...).
    pub runtime: String,
    /// Handler.
    pub handler: String,
    /// Execution role ARN.
    pub role: String,
    /// Description.
    pub description: String,
    /// Timeout, seconds.
    pub timeout: u32,
    /// Memory, MB.
    pub memory: u32,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// The code's SHA-256, hex.
    pub code_sha: String,
    /// The zip's size.
    pub code_size: u64,
    /// `LastModified`, in Lambda's form.
    pub last_modified: String,
    /// Changes with every change of code or configuration.
    pub revision: String,
    /// Resource policy statements (AddPermission).
    pub policy: Vec<Value>,
    /// The policy's own revision.
    pub policy_revision: String,
}

/// A change of configuration (UpdateFunctionConfiguration); `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct FunctionUpdate {
    /// Runtime.
    pub runtime: Option<String>,
    /// Handler.
    pub handler: Option<String>,
    /// Role.
    pub role: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Timeout.
    pub timeout: Option<u32>,
    /// Memory.
    pub memory: Option<u32>,
    /// Environment (whole).
    pub env: Option<BTreeMap<String, String>>,
    /// New code: (sha hex, size).
    pub code: Option<(String, u64)>,
    /// Refused unless it is the function's revision.
    pub expected_revision: Option<String>,
}

fn not_found(account: &str, region: &str, name: &str) -> RegistryError {
    RegistryError::NotFound(format!(
        "Function not found: arn:aws:lambda:{region}:{account}:function:{name}"
    ))
}

fn lambda_time(secs: f64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let ms = ((secs.fract()) * 1000.0) as u32;
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{ms:03}+0000",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn revision() -> String {
    uuid_like()
}

impl Registry {
    /// The ARN of a function.
    pub fn function_arn(&self, account: &str, name: &str) -> String {
        format!("arn:aws:lambda:{}:{account}:function:{name}", self.region)
    }

    /// CreateFunction.
    pub fn create_function(&self, account: &str, mut f: Function) -> Result<Function> {
        f.last_modified = lambda_time(now_secs());
        f.revision = revision();
        f.policy_revision = revision();
        let region = self.region.clone();
        self.write(account, |a, tx| {
            if a.functions.contains_key(&f.name) {
                return Err(RegistryError::AlreadyExists {
                    message: format!("Function already exist: {}", f.name),
                    resource_id: f.name.clone(),
                    resource_arn: format!("arn:aws:lambda:{region}:{account}:function:{}", f.name),
                });
            }
            if a.functions.len() >= MAX_FUNCTIONS {
                return Err(RegistryError::LimitExceeded(format!(
                    "An account can have at most {MAX_FUNCTIONS} functions"
                )));
            }
            tx.put(Kind::Function, &f.name, &f)?;
            a.functions.insert(f.name.clone(), f.clone());
            Ok(f.clone())
        })
    }

    /// GetFunction.
    pub fn function(&self, account: &str, name: &str) -> Result<Function> {
        self.read(account, |a| {
            a.functions
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(account, &self.region, name))
        })
    }

    /// ListFunctions, in name order.
    pub fn list_functions(
        &self,
        account: &str,
        marker: Option<&str>,
        max: usize,
    ) -> Result<Page<Function>> {
        self.read(account, |a| {
            let items = a
                .functions
                .values()
                .map(|f| (f.name.clone(), f.clone()))
                .collect();
            paginate(items, marker, max)
        })
    }

    /// UpdateFunctionCode / UpdateFunctionConfiguration.
    pub fn update_function(
        &self,
        account: &str,
        name: &str,
        u: FunctionUpdate,
    ) -> Result<Function> {
        self.write(account, |a, tx| {
            let mut f = a
                .functions
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(account, &self.region, name))?;
            if let Some(r) = &u.expected_revision
                && *r != f.revision
            {
                return Err(RegistryError::PreconditionFailed(
                    "The Revision Id provided does not match the latest Revision Id. Call the GetFunction/GetAlias API to retrieve the latest Revision Id".into(),
                ));
            }
            if let Some(v) = u.runtime.clone() {
                f.runtime = v;
            }
            if let Some(v) = u.handler.clone() {
                f.handler = v;
            }
            if let Some(v) = u.role.clone() {
                f.role = v;
            }
            if let Some(v) = u.description.clone() {
                f.description = v;
            }
            if let Some(v) = u.timeout {
                f.timeout = v;
            }
            if let Some(v) = u.memory {
                f.memory = v;
            }
            if let Some(v) = u.env.clone() {
                f.env = v;
            }
            if let Some((sha, size)) = u.code.clone() {
                f.code_sha = sha;
                f.code_size = size;
            }
            f.last_modified = lambda_time(now_secs());
            f.revision = revision();
            tx.put(Kind::Function, name, &f)?;
            a.functions.insert(name.to_owned(), f.clone());
            Ok(f)
        })
    }

    /// DeleteFunction.
    pub fn delete_function(&self, account: &str, name: &str) -> Result<()> {
        self.write(account, |a, tx| {
            if a.functions.remove(name).is_none() {
                return Err(not_found(account, &self.region, name));
            }
            tx.delete(Kind::Function, name);
            Ok(())
        })
    }

    /// AddPermission: a statement with a new id.
    pub fn add_function_permission(
        &self,
        account: &str,
        name: &str,
        statement: Value,
        expected_revision: Option<&str>,
    ) -> Result<()> {
        self.write(account, |a, tx| {
            let mut f = a
                .functions
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(account, &self.region, name))?;
            if expected_revision.is_some_and(|r| r != f.policy_revision) {
                return Err(RegistryError::PreconditionFailed(
                    "The Revision Id provided does not match the latest Revision Id.".into(),
                ));
            }
            let sid = statement.get("Sid").and_then(Value::as_str).unwrap_or("");
            if f.policy
                .iter()
                .any(|s| s.get("Sid").and_then(Value::as_str) == Some(sid))
            {
                return Err(RegistryError::Conflict(format!(
                    "The statement id ({sid}) provided already exists. Please provide a new statement id, or remove the existing statement."
                )));
            }
            if f.policy.len() >= 100 || serde_json::to_string(&f.policy).map_or(0, |s| s.len()) > 20_000 {
                return Err(RegistryError::LimitExceeded(
                    "The final policy size is bigger than the limit.".into(),
                ));
            }
            f.policy.push(statement.clone());
            f.policy_revision = revision();
            tx.put(Kind::Function, name, &f)?;
            a.functions.insert(name.to_owned(), f);
            Ok(())
        })
    }

    /// RemovePermission.
    pub fn remove_function_permission(
        &self,
        account: &str,
        name: &str,
        sid: &str,
        expected_revision: Option<&str>,
    ) -> Result<()> {
        self.write(account, |a, tx| {
            let mut f = a
                .functions
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(account, &self.region, name))?;
            if expected_revision.is_some_and(|r| r != f.policy_revision) {
                return Err(RegistryError::PreconditionFailed(
                    "The Revision Id provided does not match the latest Revision Id.".into(),
                ));
            }
            let before = f.policy.len();
            f.policy
                .retain(|s| s.get("Sid").and_then(Value::as_str) != Some(sid));
            if f.policy.len() == before {
                return Err(RegistryError::NotFound(
                    "No policy is associated with the given resource.".into(),
                ));
            }
            f.policy_revision = revision();
            tx.put(Kind::Function, name, &f)?;
            a.functions.insert(name.to_owned(), f);
            Ok(())
        })
    }
}
