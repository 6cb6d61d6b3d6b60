//! From a registered function to an invocation: the host's view of the function, and its
//! execution role's credentials (a session of the role, reused while it outlives an instance).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sekisho_registry::{Function, Registry, Session};

use crate::{Credentials, FunctionSpec, Host, HostError, Outcome};

/// Invokes registered functions through the host.
pub struct Invoker {
    /// The host.
    pub host: Arc<Host>,
    registry: Arc<Registry>,
    creds: Mutex<HashMap<(String, String), Session>>,
}

impl std::fmt::Debug for Invoker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invoker").finish_non_exhaustive()
    }
}

impl Invoker {
    /// Functions of `registry`, run by `host`.
    pub fn new(host: Arc<Host>, registry: Arc<Registry>) -> Arc<Invoker> {
        Arc::new(Invoker {
            host,
            registry,
            creds: Mutex::new(HashMap::new()),
        })
    }

    /// The execution role's credentials: a role of the account that trusts Lambda.
    fn credentials(&self, account: &str, f: &Function) -> Option<Credentials> {
        let role = self.registry.role_by_arn(account, &f.role)?;
        let mut ctx = sekisho_policy::MapContext::new();
        ctx.set("aws:SourceAccount", account);
        ctx.set(
            "aws:SourceArn",
            self.registry.function_arn(account, &f.name),
        );
        if !role.trusts_service("lambda.amazonaws.com", &ctx) {
            tracing::warn!(function = %f.name, role = %f.role, "the execution role does not trust lambda.amazonaws.com: no credentials");
            return None;
        }
        // A session per function (it is named after the function).
        let key = (account.to_owned(), format!("{}\n{}", f.role, f.name));
        let now = sekisho_registry::now_secs();
        let cached = self
            .creds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            // More than an instance's life left, and the same role (not one re-created under
            // its name).
            .filter(|s| {
                s.expiration - now > 45.0 * 60.0
                    && s.principal_id.as_deref() == Some(role.id.as_str())
            })
            .cloned();
        let session = match cached {
            Some(s) => s,
            None => {
                let s = self
                    .registry
                    .create_session_with(
                        account,
                        sekisho_registry::IamPrincipal::Role {
                            role: role.name.clone(),
                            session: f.name.clone(),
                        },
                        7200,
                        None,
                        BTreeMap::new(),
                    )
                    .map_err(|e| {
                        tracing::warn!(function = %f.name, error = %e, "no session of the execution role: no credentials");
                    })
                    .ok()?;
                self.creds
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, s.clone());
                s
            }
        };
        Some(Credentials {
            access_key_id: session.access_key_id,
            secret_access_key: session.secret_access_key,
            session_token: session.token,
        })
    }

    /// The host's view of a function; `timeout` caps the function's own (a custom authorizer
    /// has 5 seconds whatever the function says).
    pub fn spec(&self, account: &str, f: &Function, timeout: Option<Duration>) -> FunctionSpec {
        let own = Duration::from_secs(u64::from(f.timeout));
        FunctionSpec {
            account: account.to_owned(),
            name: f.name.clone(),
            arn: self.registry.function_arn(account, &f.name),
            runtime: f.runtime.clone(),
            handler: f.handler.clone(),
            timeout: timeout.map_or(own, |t| t.min(own)),
            memory_mb: f.memory,
            env: f.env.clone(),
            code_sha: f.code_sha.clone(),
            region: self.registry.region().to_owned(),
            credentials: self.credentials(account, f),
            revision: f.revision.clone(),
        }
    }

    /// Runs a function synchronously: (request id, outcome).
    pub async fn invoke(
        &self,
        account: &str,
        f: &Function,
        payload: Bytes,
        timeout: Option<Duration>,
    ) -> Result<(String, Outcome), HostError> {
        let spec = self.spec(account, f, timeout);
        self.host.invoke(&spec, payload).await
    }
}
