//! The registry as a replica of a shared, ordered log (cluster mode; decision 0013).
//!
//! In a cluster every registry write is first appended to the cluster's log, on the condition
//! that the log ends where this node's replica does ([`Log::append`]'s `expected`): a write is
//! decided against the state every earlier write left, on whichever node it was made. Only
//! then is it committed to the node's own database, with the log position it took. Every node
//! applies the entries of the others in log order ([`crate::Registry::apply_entry`]): the
//! documents go to its database, and memory follows them document by document
//! ([`apply_doc`]), which is also how a write that lost the race is taken back out of memory
//! before it is tried again.
//!
//! An entry is the write's batch of document operations (the same [`Op`]s the database
//! applies), as JSON.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::{Kind, Op};
use crate::{
    CertStatus, Change, RegistryError, Result, State, ThingPrincipalType, account_mut, cert_key,
    decode,
};

/// Where a cluster keeps the registry's log.
pub trait Log: Send + Sync {
    /// Appends `entry` if the log's last position is `expected`, returning the entry's
    /// position. Blocks, for a bounded time: the registry calls it holding its write lock.
    fn append(&self, entry: Vec<u8>, expected: u64) -> std::result::Result<u64, LogError>;

    /// Blocks (for a bounded time) until this node has applied the log up to its end as it is
    /// now.
    fn catch_up(&self) -> std::result::Result<(), LogError>;
}

/// Why an append did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogError {
    /// The log does not end at the expected position: another node wrote first.
    Conflict,
    /// The log could not be reached, or refused the entry: it is not in the log.
    Unavailable(String),
    /// No answer came: the entry may be in the log or not.
    Unknown(String),
}

/// The most entries' bytes a start-up seed puts in one entry.
pub const SEED_ENTRY_BYTES: usize = 512 * 1024;

#[derive(Serialize, Deserialize)]
struct Entry {
    ops: Vec<WireOp>,
    /// Whether effective policies may have changed (the writer bumped its generation).
    #[serde(default = "yes")]
    b: bool,
    /// A number drawn by the writer, by which it finds its entry in the log after an append
    /// whose outcome it did not learn.
    #[serde(default)]
    n: u64,
}

fn yes() -> bool {
    true
}

/// One operation: `o` is `p` (put), `d` (delete) or `m` (merge patch).
#[derive(Serialize, Deserialize)]
struct WireOp {
    o: char,
    k: String,
    a: String,
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<String>,
}

pub(crate) fn encode_entry(ops: &[Op], bump: bool, nonce: u64) -> Result<Vec<u8>> {
    let ops = ops
        .iter()
        .map(|op| match op {
            Op::Put {
                kind,
                account,
                key,
                doc,
            } => wire('p', *kind, account, key, Some(doc)),
            Op::Delete { kind, account, key } => wire('d', *kind, account, key, None),
            Op::Patch {
                kind,
                account,
                key,
                doc,
            } => wire('m', *kind, account, key, Some(doc)),
        })
        .collect();
    serde_json::to_vec(&Entry {
        ops,
        b: bump,
        n: nonce,
    })
    .map_err(|e| RegistryError::Internal(e.to_string()))
}

fn wire(o: char, kind: Kind, account: &str, key: &str, doc: Option<&str>) -> WireOp {
    WireOp {
        o,
        k: kind.as_str().to_owned(),
        a: account.to_owned(),
        key: key.to_owned(),
        d: doc.map(str::to_owned),
    }
}

pub(crate) fn decode_entry(bytes: &[u8]) -> Result<(Vec<Op>, bool, u64)> {
    let bad = |why: String| RegistryError::Internal(format!("registry log entry: {why}"));
    let entry: Entry = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let (bump, nonce) = (entry.b, entry.n);
    let ops = entry
        .ops
        .into_iter()
        .map(|w| {
            let kind = Kind::parse(&w.k)
                .filter(|k| !matches!(k, Kind::LogPosition | Kind::AccountProposal))
                .ok_or_else(|| bad(format!("unknown kind {:?}", w.k)))?;
            let doc = || {
                w.d.clone()
                    .ok_or_else(|| bad("an operation without a document".into()))
            };
            Ok(match w.o {
                'p' => Op::Put {
                    kind,
                    account: w.a.clone(),
                    key: w.key.clone(),
                    doc: doc()?,
                },
                'm' => Op::Patch {
                    kind,
                    account: w.a.clone(),
                    key: w.key.clone(),
                    doc: doc()?,
                },
                'd' => Op::Delete {
                    kind,
                    account: w.a,
                    key: w.key,
                },
                other => return Err(bad(format!("unknown operation {other:?}"))),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((ops, bump, nonce))
}

/// Whether an operation concerns this node alone (never in the log).
pub(crate) fn local_only(op: &Op) -> bool {
    let kind = match op {
        Op::Put { kind, .. } | Op::Patch { kind, .. } | Op::Delete { kind, .. } => *kind,
    };
    matches!(kind, Kind::LogPosition | Kind::AccountProposal)
}

/// The documents `ops` touch, each once, in the order first touched.
pub(crate) fn touched(ops: &[Op]) -> Vec<(Kind, String, String)> {
    let mut out: Vec<(Kind, String, String)> = Vec::new();
    for op in ops {
        let (kind, account, key) = match op {
            Op::Put {
                kind, account, key, ..
            }
            | Op::Patch {
                kind, account, key, ..
            }
            | Op::Delete { kind, account, key } => (*kind, account, key),
        };
        if !out
            .iter()
            .any(|(k, a, x)| *k == kind && a == account && x == key)
        {
            out.push((kind, account.clone(), key.clone()));
        }
    }
    out
}

/// Makes memory hold what the database holds for one document: `doc` is the stored document,
/// `None` when there is none. Certificate and CA status changes are added to `changes` (so that
/// live connections follow a revocation made on another node).
pub(crate) fn apply_doc(
    st: &mut State,
    region: &str,
    kind: Kind,
    account: &str,
    key: &str,
    doc: Option<&str>,
    changes: &mut Vec<Change>,
) -> Result<()> {
    match kind {
        Kind::Account => {
            match doc {
                Some(doc) => {
                    let info: crate::AccountInfo = decode(doc)?;
                    st.prefixes
                        .insert(info.endpoint_prefix.clone(), info.id.clone());
                    let a = st.accounts.entry(info.id.as_str().into()).or_default();
                    a.arn_prefix = format!("arn:aws:iot:{region}:{}:", info.id);
                    a.info = Some(info);
                }
                // Accounts are never deleted; this is a creation taken back.
                None => {
                    if let Some(info) = st.accounts.remove(key).and_then(|a| a.info) {
                        st.prefixes.remove(&info.endpoint_prefix);
                    }
                }
            }
            return Ok(());
        }
        Kind::AccessKey => {
            match doc {
                Some(doc) => {
                    st.access_keys.insert(key.to_owned(), decode(doc)?);
                }
                None => {
                    st.access_keys.remove(key);
                }
            }
            return Ok(());
        }
        Kind::Session => {
            match doc {
                Some(doc) => {
                    st.sessions.insert(key.to_owned(), decode(doc)?);
                }
                None => {
                    st.sessions.remove(key);
                }
            }
            return Ok(());
        }
        Kind::Certificate => return apply_certificate(st, account, key, doc, changes),
        Kind::CaCertificate => {
            let old = account_mut(st, account)?
                .ca_certificates
                .remove(key)
                .map(|c| c.status);
            let new = match doc {
                Some(doc) => {
                    let mut c: crate::CaCertificate = decode(doc)?;
                    c.rehydrate();
                    let status = c.status;
                    account_mut(st, account)?
                        .ca_certificates
                        .insert(key.to_owned(), c);
                    st.ca_accounts
                        .entry(key.to_owned())
                        .or_default()
                        .insert(account.to_owned());
                    Some(status)
                }
                None => {
                    if let Some(s) = st.ca_accounts.get_mut(key) {
                        s.remove(account);
                        if s.is_empty() {
                            st.ca_accounts.remove(key);
                        }
                    }
                    None
                }
            };
            if old.is_some() && old != new {
                changes.push(Change::CaCertificate {
                    account: account.to_owned(),
                    ca_certificate_id: key.to_owned(),
                    status: new,
                });
            }
            return Ok(());
        }
        Kind::LogPosition | Kind::Shadow | Kind::AccountProposal => return Ok(()),
        _ => {}
    }
    let a = account_mut(st, account)?;
    match kind {
        Kind::Thing => match doc {
            Some(doc) => {
                let t: crate::Thing = decode(doc)?;
                let name = match a.thing_principals.get_key_value(key) {
                    Some((k, _)) => k.clone(),
                    None => Arc::from(key),
                };
                a.things.insert(name, t);
            }
            None => {
                a.things.remove(key);
            }
        },
        Kind::ThingType => put_or_remove(&mut a.thing_types, key, doc)?,
        Kind::Policy => match doc {
            Some(doc) => {
                let mut p: crate::IotPolicy = decode(doc)?;
                crate::policies::reparse(&mut p);
                let name = a.policy_name(key);
                a.policies.insert(name, p);
            }
            None => {
                a.policies.remove(key);
            }
        },
        Kind::PolicyAttachment => {
            let (policy, target) = key.split_once('\n').unwrap_or((key, ""));
            match doc {
                Some(_) => {
                    let (target, policy) = (a.intern(target), a.policy_name(policy));
                    a.policy_targets.entry(target).or_default().insert(policy);
                }
                None => {
                    if let Some(ps) = a.policy_targets.get_mut(target) {
                        ps.remove(policy);
                        if ps.is_empty() {
                            a.policy_targets.remove(target);
                        }
                    }
                }
            }
        }
        Kind::ThingPrincipal => {
            let (thing, principal) = key.split_once('\n').unwrap_or((key, ""));
            match doc {
                Some(doc) => {
                    let kind: ThingPrincipalType = decode(doc)?;
                    a.unlink(thing, principal);
                    a.link(thing, principal, kind);
                }
                None => a.unlink(thing, principal),
            }
        }
        Kind::RegistrationCode => {
            a.registration_code = doc.map(decode).transpose()?;
        }
        Kind::IamUser => put_or_remove(&mut a.users, key, doc)?,
        Kind::IamRole => put_or_remove(&mut a.roles, key, doc)?,
        Kind::ManagedPolicy => put_or_remove(&mut a.managed_policies, key, doc)?,
        Kind::RoleAlias => put_or_remove(&mut a.role_aliases, key, doc)?,
        Kind::ThingGroup => {
            put_or_remove(&mut a.thing_groups, key, doc)?;
            if doc.is_some() {
                a.group_arns.insert(
                    key.to_owned(),
                    format!("arn:aws:iot:{region}:{account}:thinggroup/{key}"),
                );
            } else {
                a.group_arns.remove(key);
            }
        }
        Kind::ThingGroupMember => {
            let (group, thing) = key.split_once('\n').unwrap_or((key, ""));
            match doc {
                Some(_) => a.link_member(group, thing),
                None => a.unlink_member(group, thing),
            }
        }
        Kind::Job => put_or_remove(&mut a.jobs, key, doc)?,
        Kind::JobExecution => {
            let (job, thing) = key.split_once('\n').unwrap_or((key, ""));
            a.remove_execution(thing, job);
            if let Some(doc) = doc {
                a.put_execution(decode(doc)?);
            }
        }
        Kind::JobSeq => a.job_seq = doc.map(decode).transpose()?.unwrap_or(0),
        Kind::JobWaiting => {
            let Some((job, order)) = crate::jobs::parse_waiting_key(key) else {
                return Ok(());
            };
            // Out of the queue (with the thing it held), then back in order if stored.
            if let Some(queue) = a.job_waiting.get_mut(job) {
                if let Some(i) = queue.iter().position(|(o, _)| *o == order)
                    && let Some((_, thing)) = queue.remove(i)
                    && let Some(jobs) = a.waiting_by_thing.get_mut(&thing)
                {
                    jobs.remove(job);
                    if jobs.is_empty() {
                        a.waiting_by_thing.remove(&thing);
                    }
                }
                if queue.is_empty() {
                    a.job_waiting.remove(job);
                }
            }
            if let Some(doc) = doc {
                let thing: String = decode(doc)?;
                a.waiting_by_thing
                    .entry(thing.clone())
                    .or_default()
                    .insert(job.to_owned());
                let queue = a.job_waiting.entry(job.to_owned()).or_default();
                let at = queue.partition_point(|(o, _)| *o < order);
                queue.insert(at, (order, thing));
            }
        }
        Kind::ProvisioningTemplate => put_or_remove(&mut a.templates, key, doc)?,
        Kind::EventConfig => a.event_config = doc.map(decode).transpose()?.unwrap_or_default(),
        Kind::JobTemplate => put_or_remove(&mut a.job_templates, key, doc)?,
        Kind::Function => put_or_remove(&mut a.functions, key, doc)?,
        Kind::Authorizer => put_or_remove(&mut a.authorizers, key, doc)?,
        Kind::DefaultAuthorizer => a.default_authorizer = doc.map(decode).transpose()?,
        Kind::IdentityPool => put_or_remove(&mut a.identity_pools, key, doc)?,
        Kind::CognitoIdentity => put_or_remove(&mut a.cognito_identities, key, doc)?,
        Kind::OidcProvider => put_or_remove(&mut a.oidc_providers, key, doc)?,
        Kind::Account
        | Kind::AccessKey
        | Kind::Session
        | Kind::Certificate
        | Kind::CaCertificate
        | Kind::LogPosition
        | Kind::AccountProposal
        | Kind::Shadow => {}
    }
    Ok(())
}

fn put_or_remove<T: serde::de::DeserializeOwned>(
    map: &mut std::collections::BTreeMap<String, T>,
    key: &str,
    doc: Option<&str>,
) -> Result<()> {
    match doc {
        Some(doc) => {
            map.insert(key.to_owned(), decode(doc)?);
        }
        None => {
            map.remove(key);
        }
    }
    Ok(())
}

fn apply_certificate(
    st: &mut State,
    account: &str,
    key: &str,
    doc: Option<&str>,
    changes: &mut Vec<Change>,
) -> Result<()> {
    let shared = st
        .accounts
        .get_key_value(account)
        .map(|(k, _)| k.clone())
        .ok_or_else(|| RegistryError::NotFound(format!("Account {account} does not exist")))?;
    let a = account_mut(st, account)?;
    let old: Option<CertStatus> = a.certificates.remove(key).map(|c| c.status);
    a.provisioning_certs.remove(key);
    let new = match doc {
        Some(doc) => {
            let c: crate::Certificate = decode(doc)?;
            let status = c.status;
            a.track_certificate(&c);
            a.certificates.insert(c);
            Some(status)
        }
        None => None,
    };
    if let Some(k) = cert_key(key) {
        match new {
            Some(_) => {
                st.cert_accounts.entry(k).or_default().insert(shared);
            }
            None => {
                if let Some(s) = st.cert_accounts.get_mut(&k) {
                    s.remove(account);
                    if s.is_empty() {
                        st.cert_accounts.remove(&k);
                    }
                }
            }
        }
    }
    if old.is_some() && old != new {
        changes.push(Change::Certificate {
            account: account.to_owned(),
            certificate_id: key.to_owned(),
            status: new,
        });
    }
    Ok(())
}
