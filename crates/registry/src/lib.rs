//! The registry: accounts, things, thing types, certificates, policies and their attachments.
//!
//! Reads are served from memory (the hot path: certificate lookups and effective policies at
//! CONNECT). Every write goes through [`Registry::write`], which applies the change in memory and
//! persists it to SQLite in one transaction, then bumps the policy generation and publishes
//! [`Change`]s on the change feed so that live connections follow within a second.
//!
//! It must never: hold its lock across an `.await`, or leak one account's objects to another
//! (every operation names its account).

#![warn(missing_docs)]

mod authorizers;
mod bulk;
mod cas;
mod certs;
mod cognito;
pub mod compact;
mod error;
mod events;
mod functions;
mod groups;
mod iam;
mod jobs;
pub mod model;
mod oidc;
mod policies;
mod provisioning;
mod replica;
mod rolealias;
mod shadows;
mod store;
pub mod template;
mod things;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

pub use authorizers::{Authorizer, AuthorizerUpdate, MAX_AUTHORIZERS};
pub use bulk::BulkDevice;
pub use cas::{Authentication, CaUpdate, MAX_CAS_PER_SUBJECT, NewCaCertificate, Route, Unusable};
pub use certs::NewCertificate;
pub use cognito::{
    CognitoIdentity, IdentityPool, IdentityPoolSpec, MAX_IDENTITIES_PER_POOL, MAX_IDENTITY_POOLS,
};
pub use error::RegistryError;
pub use functions::{Function, FunctionUpdate, MAX_FUNCTIONS};
pub use groups::{GroupUpdate, MAX_GROUPS_PER_THING, MAX_POLICIES_PER_GROUP, ThingGroup};
pub use iam::{
    Credential, IamPrincipal, IamRole, IamUser, MAX_SESSION_POLICY_CHARS,
    MAX_SESSION_TOKEN_SECONDS, MAX_SESSIONS_PER_ACCOUNT, ManagedPolicy, Session,
    trust_principal_arns,
};
pub use jobs::{
    CancelExecution, ExecStatus, Execution, ExecutionUpdate, Job, JobCounts, JobStatus,
    JobTemplate, JobUpdate, MAX_JOB_TEMPLATES, NewJob, PresignedUrlConfig,
};
pub use jobs::{MAX_DOCUMENT as MAX_JOB_DOCUMENT, s3_location};
pub use model::*;
pub use oidc::{
    MAX_OIDC_PROVIDERS, OidcProvider, oidc_provider_arn, oidc_provider_name, oidc_provider_of_arn,
};
pub use policies::{MAX_POLICIES_PER_TARGET, MAX_POLICY_VERSIONS};
pub use provisioning::{
    MAX_TEMPLATE_VERSIONS, NewTemplate, ProvisioningTemplate, Registered, TemplateType,
    TemplateUpdate, TemplateVersion,
};
pub use replica::{Log, LogError};
pub use rolealias::{MAX_ROLE_ALIASES, RoleAlias};
pub use sekisho_ids::{AccountId, CertificateId, ClientId};
pub use shadows::ShadowWrite;
use store::{Kind, Op, Store};
pub use things::{ThingQuery, ThingUpdate};

/// Result of registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// A change that live connections must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A certificate's status changed (or it was deleted: `status` is `None`).
    Certificate {
        /// Account.
        account: String,
        /// Certificate id.
        certificate_id: String,
        /// New status.
        status: Option<CertStatus>,
    },
    /// A registry or job event an account enabled (UpdateEventConfigurations), to publish.
    Event {
        /// Account.
        account: String,
        /// The `$aws/events/...` topic.
        topic: String,
        /// The JSON payload.
        payload: String,
    },
    /// Job executions of these things were added, changed or removed.
    JobExecutions {
        /// Account.
        account: String,
        /// The things.
        things: Vec<String>,
    },
    /// A CA certificate's status changed (or it was deleted: `status` is `None`).
    CaCertificate {
        /// Account.
        account: String,
        /// CA certificate id.
        ca_certificate_id: String,
        /// New status.
        status: Option<CaStatus>,
    },
}

/// The only policy of a provisioning claim certificate (CreateProvisioningClaim): connect,
/// and the fleet provisioning topics of its template (and the certificate topics).
pub fn claim_policy(region: &str, account: &str, template: &str) -> String {
    let arn = format!("arn:aws:iot:{region}:{account}");
    serde_json::json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [
            format!("{arn}:topic/$aws/certificates/create/*"),
            format!("{arn}:topic/$aws/certificates/create-from-csr/*"),
            format!("{arn}:topic/$aws/provisioning-templates/{template}/provision/*")]},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
            format!("{arn}:topicfilter/$aws/certificates/create/*"),
            format!("{arn}:topicfilter/$aws/certificates/create-from-csr/*"),
            format!("{arn}:topicfilter/$aws/provisioning-templates/{template}/provision/*")]}]})
    .to_string()
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The marker / token for the next page.
    pub next: Option<String>,
}

/// Seconds since the epoch, as AWS's JSON timestamps are.
pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A random string over `alphabet`.
pub fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

const LOWER_ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const UPPER_ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const SECRET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

#[derive(Default)]
pub(crate) struct State {
    /// Accounts by id (the key shared by `cert_accounts`).
    accounts: BTreeMap<Arc<str>, Account>,
    access_keys: HashMap<String, AccessKey>,
    /// Endpoint prefix to account id.
    prefixes: HashMap<String, String>,
    /// Certificate id to the accounts that registered it.
    /// Keyed by the id's 32 bytes ([`cert_key`]), not its 64 hex characters: one of these per
    /// certificate, so the text would cost 80 bytes of heap per device.
    /// Each account id is the one `accounts` holds, and a certificate of one account holds it
    /// inline. A B-tree rather than a hash table: a table sized for a million entries has two
    /// million slots.
    cert_accounts: BTreeMap<[u8; 32], compact::OneOrMore<Arc<str>>>,
    /// CA certificate id to the accounts that registered it.
    ca_accounts: HashMap<String, BTreeSet<String>>,
    /// STS temporary credentials by access key id.
    sessions: HashMap<String, Session>,
    /// When expired sessions were last swept (epoch seconds): at most once a second, since a
    /// sweep walks every session under the write lock.
    sessions_swept: f64,
}

/// The batch of writes and events one operation produces.
pub(crate) struct Tx {
    account: String,
    ops: Vec<Op>,
    changes: Vec<Change>,
    bump: bool,
    certs_added: Vec<String>,
    certs_removed: Vec<String>,
    cas_added: Vec<String>,
    cas_removed: Vec<String>,
}

impl Tx {
    fn new(account: &str) -> Tx {
        Tx {
            account: account.to_owned(),
            ops: Vec::new(),
            changes: Vec::new(),
            bump: false,
            certs_added: Vec::new(),
            certs_removed: Vec::new(),
            cas_added: Vec::new(),
            cas_removed: Vec::new(),
        }
    }

    pub(crate) fn put(&mut self, kind: Kind, key: &str, value: &impl Serialize) -> Result<()> {
        let doc = encode(value)?;
        self.ops.push(Op::Put {
            kind,
            account: self.account.clone(),
            key: key.to_owned(),
            doc,
        });
        Ok(())
    }

    /// Updates the members of a stored document that `value` has, keeping the others (a
    /// certificate's PEM, which memory does not hold).
    pub(crate) fn patch(&mut self, kind: Kind, key: &str, value: &impl Serialize) -> Result<()> {
        let doc = encode(value)?;
        self.ops.push(Op::Patch {
            kind,
            account: self.account.clone(),
            key: key.to_owned(),
            doc,
        });
        Ok(())
    }

    pub(crate) fn delete(&mut self, kind: Kind, key: &str) {
        self.ops.push(Op::Delete {
            kind,
            account: self.account.clone(),
            key: key.to_owned(),
        });
    }

    /// Marks that effective policies of live connections may have changed.
    pub(crate) fn bump(&mut self) {
        self.bump = true;
    }

    pub(crate) fn change(&mut self, c: Change) {
        self.changes.push(c);
    }
}

/// The registry. Cheap to share behind an `Arc`.
pub struct Registry {
    region: String,
    state: RwLock<State>,
    store: Mutex<Store>,
    /// A read-only connection for reads on the device path (certificate PEMs at CONNECT), so
    /// that they never wait behind a write's commit; `None` in memory (tests), where reads
    /// use `store`.
    reader: Option<Mutex<Store>>,
    feed: broadcast::Sender<Change>,
    generation: AtomicU64,
    /// One per account, held by RegisterThing from its checks to its last write: two
    /// provisionings of an account never interleave (both finding a thing without a
    /// certificate, say, and both attaching), and one account's never wait for another's.
    provisioning: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// In a cluster, the log every write goes through first ([`replica`]).
    log: OnceLock<Arc<dyn Log>>,
    /// The database file (`None` in memory).
    path: Option<std::path::PathBuf>,
    /// In a cluster, the position of the last log entry this replica holds (stored with it).
    applied: AtomicU64,
    /// The shadow documents the latest entries applied from the log touched, so that a shadow
    /// write that lost the race to the log can tell whether it still holds.
    recent_shadows: Mutex<RecentShadows>,
    /// The nonces of the latest entries applied from the log (a write whose append was not
    /// answered looks for its own there).
    recent_nonces: Mutex<std::collections::VecDeque<u64>>,
}

/// Shadow documents touched by the latest entries applied from the log.
#[derive(Default)]
struct RecentShadows {
    /// (position, [(account, key)]) of entries that touched shadows, oldest first.
    entries: std::collections::VecDeque<(u64, Vec<(String, String)>)>,
    /// Every entry from this position on is accounted for in `entries`.
    complete_from: u64,
}

/// How many entries' nonces [`Registry::applied_nonce`] remembers.
const RECENT_NONCES: usize = 4096;

/// How many shadow-touching entries [`RecentShadows`] remembers.
const RECENT_SHADOW_ENTRIES: usize = 4096;

/// Why a write was not committed.
enum Commit {
    /// Another node wrote first; memory is back as it was: catch up and decide again.
    Retry,
    /// Failed; memory holds what the database does.
    Failed(RegistryError),
    /// The log did not answer: the entry with this nonce may be in it. Memory holds what the
    /// database does; the follower applies the entry if it is there.
    Uncertain(u64, String),
}

/// How many times a write decided against a stale replica is decided again.
const WRITE_TRIES: usize = 8;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

fn encode(value: &impl Serialize) -> Result<String> {
    serde_json::to_string(value).map_err(|e| RegistryError::Internal(e.to_string()))
}

fn decode<T: DeserializeOwned>(doc: &str) -> Result<T> {
    serde_json::from_str(doc).map_err(|e| RegistryError::Internal(format!("stored document: {e}")))
}

impl Registry {
    /// Opens (or creates) the registry database at `path`.
    pub fn open(path: &Path, region: &str) -> Result<Registry> {
        let store = Store::open(path)?;
        let st = load_in_parallel(path, &store, region)?;
        let mut r = Registry::with_state(store, st, region);
        r.reader = Some(Mutex::new(Store::open_reader(path)?));
        r.path = Some(path.to_owned());
        Ok(r)
    }

    /// A registry that lives in memory only (tests).
    pub fn in_memory(region: &str) -> Result<Registry> {
        Registry::with_store(Store::in_memory()?, region)
    }

    fn with_store(store: Store, region: &str) -> Result<Registry> {
        let st = load_state(&store, region)?;
        Ok(Registry::with_state(store, st, region))
    }

    fn with_state(store: Store, st: State, region: &str) -> Registry {
        let (feed, _) = broadcast::channel(1024);
        let applied = store
            .get(Kind::LogPosition, "", "")
            .ok()
            .flatten()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Registry {
            log: OnceLock::new(),
            path: None,
            recent_nonces: Mutex::new(Default::default()),
            recent_shadows: Mutex::new(RecentShadows {
                entries: Default::default(),
                complete_from: applied + 1,
            }),
            applied: AtomicU64::new(applied),
            region: region.to_owned(),
            state: RwLock::new(st),
            store: Mutex::new(store),
            reader: None,
            feed,
            generation: AtomicU64::new(1),
            provisioning: Mutex::new(HashMap::new()),
        }
    }
}

/// `ops` and, after them, the log position they take.
fn at_position(ops: &[Op], position: u64) -> Vec<Op> {
    let mut out = ops.to_vec();
    out.push(Op::Put {
        kind: Kind::LogPosition,
        account: String::new(),
        key: String::new(),
        doc: position.to_string(),
    });
    out
}

/// After a write that memory took but the database refused (and rolled back): memory is put
/// back to what the database holds, under the same lock, so that nobody ever acts on a change
/// that was not persisted.
fn restore(region: &str, st: &mut State, store: &Store, e: &RegistryError) {
    match load_state(store, region) {
        Ok(fresh) => {
            *st = fresh;
            tracing::error!(error = %e, "registry write failed; nothing was changed");
        }
        Err(e2) => {
            tracing::error!(error = %e, reload = %e2, "registry write failed and the registry could not be reloaded; memory may be ahead of disk");
        }
    }
}

/// The memory view of the database at `path`, open as `store`. The largest kinds after things
/// (certificates and policy attachments) are read and decoded on a second connection while
/// this one loads the rest: with a million devices, start-up is that decoding, and there is
/// more than one core. Both read the database memory-mapped while they load.
fn load_in_parallel(path: &Path, store: &Store, region: &str) -> Result<State> {
    store.map_for_load(true);
    let st = std::thread::scope(|s| {
        let ahead = s.spawn(|| {
            let reader = Store::open_reader(path)?;
            reader.map_for_load(true);
            prefetch(&reader)
        });
        load_state_with(store, region, || {
            ahead.join().unwrap_or_else(|_| {
                Err(RegistryError::Internal(
                    "the registry's loading thread failed".into(),
                ))
            })
        })
    });
    store.map_for_load(false);
    st
}

/// The registry's memory view, as the database holds it.
fn load_state(store: &Store, region: &str) -> Result<State> {
    load_state_with(store, region, || prefetch(store))
}

type ByAccount<T> = Vec<(String, Vec<T>)>;

/// The kinds [`load_state_with`] takes ready-made (possibly from another thread).
struct Prefetched {
    /// Each account's certificates.
    certificates: Vec<(String, AccountCerts)>,
    /// Each account's policy attachments: (target, policy name).
    attachments: ByAccount<(String, String)>,
}

/// One account's certificates as memory holds them, built whole.
struct AccountCerts {
    certs: compact::Certificates,
    /// How many rows there were (each must have become a certificate).
    stored: usize,
    /// The ids of those waiting for fleet provisioning ([`Account::track_certificate`]).
    provisioning: Vec<String>,
}

fn prefetch(store: &Store) -> Result<Prefetched> {
    let certificates = load_by_account(store, Kind::Certificate, |row| {
        decode::<Certificate>(row.doc)
    })?
    .into_iter()
    .map(|(account, certs)| {
        let provisioning = certs
            .iter()
            .filter(|c| c.claim_template.is_some() || c.awaits_provisioning())
            .map(|c| c.id.clone())
            .collect();
        let stored = certs.len();
        let certs = certs.into_iter().collect();
        (
            account,
            AccountCerts {
                certs,
                stored,
                provisioning,
            },
        )
    })
    .collect();
    Ok(Prefetched {
        certificates,
        attachments: load_by_account(store, Kind::PolicyAttachment, |row| {
            let (policy, target) = row.key.split_once('\n').unwrap_or((row.key, ""));
            Ok((target.to_owned(), policy.to_owned()))
        })?,
    })
}

/// The registry's memory view, with certificates and policy attachments from `prefetched`
/// (called once the things are loaded).
fn load_state_with(
    store: &Store,
    region: &str,
    prefetched: impl FnOnce() -> Result<Prefetched>,
) -> Result<State> {
    let mut st = State::default();
    let mut lap = Lap::new();
    for row in store.load(Kind::Account)? {
        let info: AccountInfo = decode(&row.doc)?;
        st.prefixes
            .insert(info.endpoint_prefix.clone(), info.id.clone());
        st.accounts.insert(
            info.id.as_str().into(),
            Account {
                arn_prefix: format!("arn:aws:iot:{region}:{}:", info.id),
                info: Some(info),
                ..Account::default()
            },
        );
    }
    for row in store.load(Kind::AccessKey)? {
        let k: AccessKey = decode(&row.doc)?;
        st.access_keys.insert(k.access_key_id.clone(), k);
    }
    for row in store.load(Kind::ThingType)? {
        let t: ThingType = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .thing_types
            .insert(t.name.clone(), t);
    }
    lap.done("accounts, keys, types");
    // The kinds there is one of per device are built whole per account (a `BTreeMap` built
    // from sorted entries has full nodes; inserted one by one in order, about half full).
    for (account, things) in load_by_account(store, Kind::Thing, |row| {
        let t: Thing = decode(row.doc)?;
        Ok((t.name.clone(), t))
    })? {
        account_mut(&mut st, &account)?.things =
            things.into_iter().map(|(k, t)| (k.into(), t)).collect();
    }
    lap.done("things");
    let links = load_by_account(store, Kind::ThingPrincipal, |row| {
        let (thing, principal) = row.key.split_once('\n').unwrap_or((row.key, ""));
        let kind: ThingPrincipalType = decode(row.doc)?;
        Ok((thing.to_owned(), principal.to_owned(), kind))
    })?;
    lap.done("thing principals read");
    let Prefetched {
        certificates,
        attachments,
    } = prefetched()?;
    lap.done("waiting for certificates and policy attachments");
    let mut registered = Vec::new();
    for (account, prepared) in certificates {
        if let Some(shared) = st
            .accounts
            .get_key_value(account.as_str())
            .map(|(k, _)| k.clone())
        {
            registered.extend(prepared.certs.keys().map(|k| (*k, shared.clone())));
        }
        let a = account_mut(&mut st, &account)?;
        a.provisioning_certs.extend(prepared.provisioning);
        a.certificates = prepared.certs;
        if a.certificates.len() != prepared.stored {
            return Err(RegistryError::Internal(format!(
                "account {account} has a stored certificate whose id is not a certificate id"
            )));
        }
    }
    st.cert_accounts = grouped(registered);
    lap.done("certificates");
    for row in store.load(Kind::CaCertificate)? {
        let mut c: CaCertificate = decode(&row.doc)?;
        c.rehydrate();
        st.ca_accounts
            .entry(c.id.clone())
            .or_default()
            .insert(row.account.clone());
        account_mut(&mut st, &row.account)?
            .ca_certificates
            .insert(c.id.clone(), c);
    }
    for row in store.load(Kind::RegistrationCode)? {
        account_mut(&mut st, &row.account)?.registration_code = Some(decode(&row.doc)?);
    }
    for row in store.load(Kind::IamUser)? {
        let u: IamUser = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .users
            .insert(u.name.clone(), u);
    }
    for row in store.load(Kind::IamRole)? {
        let r: IamRole = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .roles
            .insert(r.name.clone(), r);
    }
    for row in store.load(Kind::ManagedPolicy)? {
        let p: ManagedPolicy = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .managed_policies
            .insert(p.name.clone(), p);
    }
    for row in store.load(Kind::RoleAlias)? {
        let r: RoleAlias = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .role_aliases
            .insert(r.name.clone(), r);
    }
    for row in store.load(Kind::Session)? {
        let s: Session = decode(&row.doc)?;
        st.sessions.insert(s.access_key_id.clone(), s);
    }
    for row in store.load(Kind::Policy)? {
        let mut p: IotPolicy = decode(&row.doc)?;
        policies::reparse(&mut p);
        account_mut(&mut st, &row.account)?
            .policies
            .insert(p.name.as_str().into(), p);
    }
    for row in store.load(Kind::ThingGroup)? {
        let g: groups::ThingGroup = decode(&row.doc)?;
        let a = account_mut(&mut st, &row.account)?;
        a.group_arns.insert(
            g.name.clone(),
            format!("arn:aws:iot:{region}:{}:thinggroup/{}", row.account, g.name),
        );
        a.thing_groups.insert(g.name.clone(), g);
    }
    for row in store.load(Kind::ThingGroupMember)? {
        let (group, thing) = row.key.split_once('\n').unwrap_or((&row.key, ""));
        account_mut(&mut st, &row.account)?.link_member(group, thing);
    }
    for row in store.load(Kind::ProvisioningTemplate)? {
        let t: provisioning::ProvisioningTemplate = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .templates
            .insert(t.name.clone(), t);
    }
    for row in store.load(Kind::Authorizer)? {
        let a: authorizers::Authorizer = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .authorizers
            .insert(a.name.clone(), a);
    }
    for row in store.load(Kind::DefaultAuthorizer)? {
        account_mut(&mut st, &row.account)?.default_authorizer = Some(decode(&row.doc)?);
    }
    for row in store.load(Kind::IdentityPool)? {
        let p: cognito::IdentityPool = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .identity_pools
            .insert(p.id.clone(), p);
    }
    for row in store.load(Kind::OidcProvider)? {
        let p: oidc::OidcProvider = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .oidc_providers
            .insert(p.name.clone(), p);
    }
    for row in store.load(Kind::CognitoIdentity)? {
        let i: cognito::CognitoIdentity = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .cognito_identities
            .insert(i.id.clone(), i);
    }
    for row in store.load(Kind::Function)? {
        let f: functions::Function = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .functions
            .insert(f.name.clone(), f);
    }
    for row in store.load(Kind::JobTemplate)? {
        let t: jobs::JobTemplate = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .job_templates
            .insert(t.id.clone(), t);
    }
    for row in store.load(Kind::Job)? {
        let j: jobs::Job = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?
            .jobs
            .insert(j.id.clone(), j);
    }
    for row in store.load(Kind::JobWaiting)? {
        let thing: String = decode(&row.doc)?;
        if let Some((job, order)) = jobs::parse_waiting_key(&row.key) {
            let a = account_mut(&mut st, &row.account)?;
            a.waiting_by_thing
                .entry(thing.clone())
                .or_default()
                .insert(job.to_owned());
            a.job_waiting
                .entry(job.to_owned())
                .or_default()
                .push_back((order, thing));
        }
    }
    for row in store.load(Kind::JobExecution)? {
        let e: jobs::Execution = decode(&row.doc)?;
        account_mut(&mut st, &row.account)?.put_execution(e);
    }
    for row in store.load(Kind::EventConfig)? {
        account_mut(&mut st, &row.account)?.event_config = decode(&row.doc)?;
    }
    for row in store.load(Kind::JobSeq)? {
        account_mut(&mut st, &row.account)?.job_seq = decode(&row.doc)?;
    }
    lap.done("the other kinds");
    for (account, pairs) in attachments {
        let a = account_mut(&mut st, &account)?;
        let pairs = pairs
            .into_iter()
            .map(|(t, p)| (Arc::<str>::from(t), a.policy_name(&p)))
            .collect();
        a.policy_targets = grouped(pairs);
    }
    lap.done("policy attachments");
    for (account, links) in links {
        let a = account_mut(&mut st, &account)?;
        // One shared copy of each thing name (the `things` key) and of each principal's ARN
        // (the policy targets' when there is one), found by walking those maps in order
        // beside the links: rows come in thing order, and are sorted once by principal.
        let mut things = InOrder::new(a.things.keys());
        let thing_of: Vec<Arc<str>> = links.iter().map(|(t, _, _)| things.get(t)).collect();
        let by_principal = order_of(&links.iter().map(|l| l.1.as_str()).collect::<Vec<_>>());
        let mut targets = InOrder::new(a.policy_targets.keys());
        let mut principal_of: Vec<Arc<str>> = vec![Arc::from(""); links.len()];
        for &i in &by_principal {
            principal_of[i] = targets.get(&links[i].1);
        }
        // Both in their maps' order already (grouping them sorts nothing), each built on a
        // thread of its own.
        let by_principal: Vec<_> = by_principal
            .iter()
            .map(|&i| (principal_of[i].clone(), (thing_of[i].clone(), links[i].2)))
            .collect();
        let by_thing: Vec<_> = links
            .iter()
            .enumerate()
            .map(|(i, l)| (thing_of[i].clone(), (principal_of[i].clone(), l.2)))
            .collect();
        // What was read goes before the maps are built (start-up's peak of memory).
        drop((links, thing_of, principal_of));
        if by_thing.len() < 50_000 {
            a.principal_things = grouped(by_principal);
            a.thing_principals = grouped(by_thing);
            continue;
        }
        let (principal_things, thing_principals) = std::thread::scope(|s| {
            let other = s.spawn(|| grouped(by_principal));
            let here = grouped(by_thing);
            (other.join(), here)
        });
        a.principal_things = principal_things
            .map_err(|_| RegistryError::Internal("the registry's loading thread failed".into()))?;
        a.thing_principals = thing_principals;
    }
    lap.done("thing principals");
    tracing::info!(
        seconds = lap.total(),
        things = st.accounts.values().map(|a| a.things.len()).sum::<usize>(),
        certificates = st.cert_accounts.len(),
        "registry loaded"
    );
    Ok(st)
}

/// The indexes of `names` in the names' order. Sorted on a compact key first (the eight bytes
/// after the prefix they all share, such as `arn:aws:iot:<region>:<account>:cert/`), then by
/// the whole name where those tie: a million ARNs sort without a million cache misses per
/// pass.
fn order_of(names: &[&str]) -> Vec<usize> {
    let shared = names.first().map_or(0, |first| {
        names.iter().fold(first.len(), |n, s| {
            n.min(
                first
                    .bytes()
                    .zip(s.bytes())
                    .take_while(|(a, b)| a == b)
                    .count(),
            )
        })
    });
    let key = |s: &str| {
        let mut k = [0u8; 8];
        let rest = s.as_bytes().get(shared..).unwrap_or_default();
        let n = rest.len().min(8);
        k[..n].copy_from_slice(&rest[..n]);
        u64::from_be_bytes(k)
    };
    let mut keyed: Vec<(u64, usize)> = names.iter().enumerate().map(|(i, s)| (key(s), i)).collect();
    keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| names[a.1].cmp(names[b.1])));
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// Shared copies of names asked for in ascending order, from a map's keys (ascending too): a
/// walk beside them rather than a lookup per name. A name the map does not hold (or one asked
/// for out of order) gets a copy of its own.
struct InOrder<'a, I: Iterator<Item = &'a Arc<str>>> {
    keys: std::iter::Peekable<I>,
    last: Option<Arc<str>>,
}

impl<'a, I: Iterator<Item = &'a Arc<str>>> InOrder<'a, I> {
    fn new(keys: I) -> Self {
        InOrder {
            keys: keys.peekable(),
            last: None,
        }
    }

    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(l) = &self.last
            && **l == *name
        {
            return l.clone();
        }
        while self.keys.next_if(|k| ***k < *name).is_some() {}
        let shared = match self.keys.peek() {
            Some(k) if ***k == *name => Arc::clone(k),
            _ => Arc::from(name),
        };
        self.last = Some(shared.clone());
        shared
    }
}

/// How long each step of loading took (logged at debug level).
struct Lap {
    start: std::time::Instant,
    last: std::time::Instant,
}

impl Lap {
    fn new() -> Lap {
        let now = std::time::Instant::now();
        Lap {
            start: now,
            last: now,
        }
    }

    fn done(&mut self, what: &str) {
        let now = std::time::Instant::now();
        tracing::debug!(
            seconds = (now - self.last).as_secs_f64(),
            "registry load: {what}"
        );
        self.last = now;
    }

    fn total(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// The rows of `kind`, each made an item by `f`, gathered per account (in account order).
fn load_by_account<T>(
    store: &Store,
    kind: Kind,
    mut f: impl FnMut(store::RowRef<'_>) -> Result<T>,
) -> Result<Vec<(String, Vec<T>)>> {
    let mut out: Vec<(String, Vec<T>)> = Vec::new();
    store.each(kind, |row| {
        if out.last().is_none_or(|(a, _)| *a != row.account) {
            out.push((row.account.to_owned(), Vec::new()));
        }
        let item = f(row)?;
        if let Some((_, items)) = out.last_mut() {
            items.push(item);
        }
        Ok(())
    })?;
    Ok(out)
}

/// A map of each key to the collection of its values, built whole from unordered pairs.
fn grouped<K: Ord, V, C: FromIterator<V>>(mut pairs: Vec<(K, V)>) -> BTreeMap<K, C> {
    // Unstable: the values of one key go into a collection that orders them itself, and no
    // value is repeated (stored rows have unique keys).
    pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    let mut pairs = pairs.into_iter().peekable();
    while let Some((k, v)) = pairs.next() {
        let mut values = vec![v];
        while let Some((_, v)) = pairs.next_if(|(next, _)| *next == k) {
            values.push(v);
        }
        out.push((k, values.into_iter().collect()));
    }
    out.into_iter().collect()
}

impl Registry {
    /// The region this registry serves.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// `arn:aws:iot:<region>:<account>:<resource>`.
    pub fn arn(&self, account: &str, resource: &str) -> String {
        format!("arn:aws:iot:{}:{account}:{resource}", self.region)
    }

    /// Subscribes to the change feed.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }

    /// The policy generation: it changes whenever any effective policy may have changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes every later database read and write fail, as a broken disk would (tests of
    /// other crates; not for use by a server).
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn break_database(&self) {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .break_for_tests();
    }

    /// Flushes the database (at shutdown).
    pub fn flush(&self) -> Result<()> {
        self.store
            .lock()
            .map_err(|_| RegistryError::Internal("store lock poisoned".into()))?
            .checkpoint()
    }

    fn read_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&st)
    }

    /// Runs `f` on one account's objects for reading.
    pub fn read<T>(&self, account: &str, f: impl FnOnce(&Account) -> Result<T>) -> Result<T> {
        self.read_state(|st| match st.accounts.get(account) {
            Some(a) => f(a),
            None => Err(RegistryError::NotFound(format!(
                "Account {account} does not exist"
            ))),
        })
    }

    /// Runs a write on one account: `f` changes memory and records its writes in the
    /// transaction, which is then persisted; changes are published after the commit.
    /// `f` must validate before it mutates, so that an error leaves memory unchanged. In a
    /// cluster `f` may run more than once: again, against the newer state, when another node
    /// wrote first.
    pub(crate) fn write<T>(
        &self,
        account: &str,
        f: impl FnMut(&mut Account, &mut Tx) -> Result<T>,
    ) -> Result<T> {
        self.write_checked(account, |_| Ok(()), f)
    }

    /// [`Registry::write`] after `check` has looked at every account under the same lock (for
    /// rules across accounts, such as DEFAULT-mode uniqueness).
    pub(crate) fn write_checked<T>(
        &self,
        account: &str,
        mut check: impl FnMut(&State) -> Result<()>,
        mut f: impl FnMut(&mut Account, &mut Tx) -> Result<T>,
    ) -> Result<T> {
        self.transact(account, |st, tx| {
            check(st)?;
            let acct = st.accounts.get_mut(account).ok_or_else(|| {
                RegistryError::NotFound(format!("Account {account} does not exist"))
            })?;
            let out = f(acct, tx)?;
            if let Some(shared) = st.accounts.get_key_value(account).map(|(k, _)| k.clone()) {
                for c in tx.certs_added.iter().filter_map(|c| cert_key(c)) {
                    st.cert_accounts
                        .entry(c)
                        .or_default()
                        .insert(shared.clone());
                }
            }
            for c in tx.certs_removed.iter().filter_map(|c| cert_key(c)) {
                if let Some(s) = st.cert_accounts.get_mut(&c) {
                    s.remove(account);
                    if s.is_empty() {
                        st.cert_accounts.remove(&c);
                    }
                }
            }
            for c in &tx.cas_added {
                st.ca_accounts
                    .entry(c.clone())
                    .or_default()
                    .insert(account.to_owned());
            }
            for c in &tx.cas_removed {
                if let Some(s) = st.ca_accounts.get_mut(c) {
                    s.remove(account);
                    if s.is_empty() {
                        st.ca_accounts.remove(c);
                    }
                }
            }
            Ok(out)
        })
    }

    /// The frame of every write: `f` changes the state under the write lock and records its
    /// writes in a transaction for `account`, which is committed ([`Registry::commit`]); the
    /// generation is bumped and the changes published after the commit. When another node of
    /// the cluster wrote first, memory is put back, the replica catches up, and `f` runs again.
    fn transact<T>(
        &self,
        account: &str,
        mut f: impl FnMut(&mut State, &mut Tx) -> Result<T>,
    ) -> Result<T> {
        for _ in 0..WRITE_TRIES {
            let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
            let mut tx = Tx::new(account);
            let out = f(&mut st, &mut tx)?;
            match self.commit(&mut st, &tx.ops, tx.bump) {
                Ok(()) => {
                    drop(st);
                    if tx.bump {
                        self.generation.fetch_add(1, Ordering::AcqRel);
                    }
                    for c in tx.changes {
                        let _ = self.feed.send(c);
                    }
                    return Ok(out);
                }
                Err(Commit::Failed(e)) => {
                    drop(st);
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    return Err(e);
                }
                Err(Commit::Retry) => {
                    drop(st);
                    self.catch_up()?;
                }
                Err(Commit::Uncertain(nonce, why)) => {
                    // In the log after all? Then the follower applied it, as another node's.
                    drop(st);
                    if self.catch_up().is_ok() && self.applied_nonce(nonce) {
                        // This node's own documents (not in the log) are written now.
                        let local: Vec<Op> = tx
                            .ops
                            .iter()
                            .filter(|op| replica::local_only(op))
                            .cloned()
                            .collect();
                        if !local.is_empty() {
                            let _st = self.state.write().unwrap_or_else(|p| p.into_inner());
                            self.store
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .apply(&local)?;
                        }
                        return Ok(out);
                    }
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    return Err(RegistryError::Unavailable(format!(
                        "The cluster's registry log did not answer: {why}"
                    )));
                }
            }
        }
        Err(RegistryError::Unavailable(
            "The registry is being written by other nodes of the cluster faster than this one \
             can follow; try again."
                .into(),
        ))
    }

    /// Persists a write whose changes memory holds already. In a cluster the write is first
    /// appended to the log, on the condition that nobody else appended since this replica's
    /// last entry; if somebody did, or the log cannot be reached, memory is put back as the
    /// database holds it. A write the database refused is taken back out of memory too.
    fn commit(&self, st: &mut State, ops: &[Op], bump: bool) -> std::result::Result<(), Commit> {
        if ops.is_empty() {
            return Ok(());
        }
        // Some documents are this node's alone (account proposals): not in the log.
        let logged: Vec<Op> = ops
            .iter()
            .filter(|op| !replica::local_only(op))
            .cloned()
            .collect();
        let position = match self.log.get() {
            Some(log) if !logged.is_empty() => {
                let nonce: u64 = rand::random();
                let entry = replica::encode_entry(&logged, bump, nonce).map_err(Commit::Failed)?;
                match log.append(entry, self.applied.load(Ordering::Acquire)) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.undo(st, ops);
                        return Err(match e {
                            LogError::Conflict => Commit::Retry,
                            LogError::Unknown(why) => Commit::Uncertain(nonce, why),
                            LogError::Unavailable(why) => {
                                Commit::Failed(RegistryError::Unavailable(format!(
                                    "The cluster's registry log is unavailable: {why}"
                                )))
                            }
                        });
                    }
                }
            }
            _ => None,
        };
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let written = match position {
            None => store.apply(ops),
            Some(p) => store.apply(&at_position(ops, p)),
        };
        match (written, position) {
            (Ok(()), Some(p)) => {
                self.applied.store(p, Ordering::Release);
                Ok(())
            }
            (Ok(()), None) => Ok(()),
            (Err(e), None) => {
                restore(&self.region, st, &store, &e);
                Err(Commit::Failed(e))
            }
            (Err(e), Some(p)) => {
                // The cluster has the write and memory keeps it; this database does not, so
                // the replica stays before `p` and applies the entry again from the log.
                tracing::error!(error = %e, position = p, "registry write in the cluster's log but not in this node's database; it is applied again from the log");
                Err(Commit::Failed(e))
            }
        }
    }

    /// Puts memory back as the database holds the documents `ops` touch (a write the log
    /// did not take).
    fn undo(&self, st: &mut State, ops: &[Op]) {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut ignored = Vec::new();
        for (kind, account, key) in replica::touched(ops) {
            let done = store.get(kind, &account, &key).and_then(|doc| {
                replica::apply_doc(
                    st,
                    &self.region,
                    kind,
                    &account,
                    &key,
                    doc.as_deref(),
                    &mut ignored,
                )
            });
            if let Err(e) = done {
                restore(&self.region, st, &store, &e);
                return;
            }
        }
    }

    /// Whether an entry with this nonce was applied from the log lately.
    fn applied_nonce(&self, nonce: u64) -> bool {
        self.recent_nonces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&nonce)
    }

    /// Waits until this replica holds the cluster's log up to its end.
    fn catch_up(&self) -> Result<()> {
        match self.log.get() {
            Some(log) => log.catch_up().map_err(|e| {
                RegistryError::Unavailable(format!(
                    "The cluster's registry log is unavailable: {e:?}"
                ))
            }),
            None => Ok(()),
        }
    }

    /// Cluster mode: from now on every write goes through `log` first. Call once, after the
    /// replica caught up with the log.
    pub fn attach_log(&self, log: Arc<dyn Log>) {
        let _ = self.log.set(log);
    }

    /// The position of the last log entry this replica holds (0: none).
    pub fn log_position(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Applies the cluster log's entry at `position`, written by another node (or by this one:
    /// then it is here already and nothing happens). Entries must come in log order.
    pub fn apply_entry(&self, position: u64, entry: &[u8]) -> Result<()> {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let applied = self.applied.load(Ordering::Acquire);
        if position <= applied {
            return Ok(());
        }
        if position != applied + 1 {
            return Err(RegistryError::Internal(format!(
                "registry log: entry {position} after {applied}; entries were skipped"
            )));
        }
        let (ops, bump, nonce) = replica::decode_entry(entry)?;
        {
            let mut recent = self.recent_nonces.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT_NONCES {
                recent.pop_front();
            }
            recent.push_back(nonce);
        }
        let shadows: Vec<(String, String)> = replica::touched(&ops)
            .into_iter()
            .filter(|(k, _, _)| *k == Kind::Shadow)
            .map(|(_, a, k)| (a, k))
            .collect();
        if !shadows.is_empty() {
            let mut recent = self
                .recent_shadows
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if recent.entries.len() == RECENT_SHADOW_ENTRIES
                && let Some((p, _)) = recent.entries.pop_front()
            {
                recent.complete_from = p + 1;
            }
            recent.entries.push_back((position, shadows));
        }
        let mut changes = Vec::new();
        {
            let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            store.apply(&at_position(&ops, position))?;
            self.applied.store(position, Ordering::Release);
            for (kind, account, key) in replica::touched(&ops) {
                let done = store.get(kind, &account, &key).and_then(|doc| {
                    replica::apply_doc(
                        &mut st,
                        &self.region,
                        kind,
                        &account,
                        &key,
                        doc.as_deref(),
                        &mut changes,
                    )
                });
                if let Err(e) = done {
                    // Memory is rebuilt from the database, which holds the entry.
                    restore(&self.region, &mut st, &store, &e);
                    break;
                }
            }
        }
        drop(st);
        // As on the writing node: when effective policies may have changed.
        if bump || !changes.is_empty() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        for c in changes {
            let _ = self.feed.send(c);
        }
        Ok(())
    }

    /// Everything this registry holds, as log entries of at most about
    /// [`replica::SEED_ENTRY_BYTES`] each: how a cluster's log starts from the node that has
    /// a registry already.
    pub fn log_seed(&self) -> Result<Vec<Vec<u8>>> {
        let _st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let (mut out, mut ops, mut bytes) = (Vec::new(), Vec::new(), 0);
        for kind in Kind::ALL {
            if matches!(kind, Kind::LogPosition | Kind::AccountProposal) {
                continue;
            }
            for row in store.load(kind)? {
                bytes += row.key.len() + row.doc.len() + row.account.len() + 32;
                ops.push(Op::Put {
                    kind,
                    account: row.account,
                    key: row.key,
                    doc: row.doc,
                });
                if bytes >= replica::SEED_ENTRY_BYTES {
                    out.push(replica::encode_entry(&std::mem::take(&mut ops), true, 0)?);
                    bytes = 0;
                }
            }
        }
        if !ops.is_empty() {
            out.push(replica::encode_entry(&ops, true, 0)?);
        }
        Ok(out)
    }

    /// Records that this replica holds the log up to `position` (after seeding the log with
    /// [`Registry::log_seed`]).
    pub fn set_log_position(&self, position: u64) -> Result<()> {
        let _st = self.state.write().unwrap_or_else(|p| p.into_inner());
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply(&at_position(&[], position))?;
        self.applied.store(position, Ordering::Release);
        Ok(())
    }

    /// A text form of everything memory holds, to compare replicas (tests).
    #[doc(hidden)]
    pub fn memory_digest(&self) -> String {
        self.read_state(|st| {
            let sorted = |mut v: Vec<String>| {
                v.sort();
                v
            };
            let keys = sorted(st.access_keys.values().map(|k| format!("{k:?}")).collect());
            let prefixes = sorted(st.prefixes.iter().map(|p| format!("{p:?}")).collect());
            let cas = sorted(st.ca_accounts.iter().map(|c| format!("{c:?}")).collect());
            let sessions = sorted(st.sessions.values().map(|s| format!("{s:?}")).collect());
            format!(
                "{:#?}\n{keys:#?}\n{prefixes:?}\n{:?}\n{cas:?}\n{sessions:#?}",
                st.accounts, st.cert_accounts
            )
        })
    }

    /// Writes a snapshot of the registry (a compact copy of its database) to `path`, which
    /// must not exist; returns the log position it holds. No write happens meanwhile, so the
    /// copy is the replica as of that position.
    pub fn snapshot_to(&self, path: &Path) -> Result<u64> {
        let position = match &self.path {
            // On a connection of its own, without the registry's locks: the copy is one read
            // transaction, so its documents and the log position stored with them agree.
            Some(db) => Store::open_for_copy(db)?.copy_to(path)?,
            None => {
                let _st = self.state.read().unwrap_or_else(|p| p.into_inner());
                self.store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .copy_to(path)?
            }
        };
        Ok(position)
    }

    /// Makes this empty registry the snapshot at `path` ([`Registry::snapshot_to`]): its
    /// documents are copied into this database and memory is loaded from them. Returns the log
    /// position the snapshot holds, from which this replica goes on.
    pub fn restore_from(&self, path: &Path) -> Result<u64> {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if !st.accounts.is_empty() || self.applied.load(Ordering::Acquire) != 0 {
            return Err(RegistryError::Internal(
                "a snapshot goes only into an empty registry".into(),
            ));
        }
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.copy_from(path)?;
        *st = load_state(&store, &self.region)?;
        let position = store
            .get(Kind::LogPosition, "", "")?
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        self.applied.store(position, Ordering::Release);
        self.recent_shadows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .complete_from = position + 1;
        drop(store);
        drop(st);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(position)
    }

    /// Makes this empty registry the snapshot at `snapshot` ([`Registry::snapshot_to`]) by
    /// taking the file itself as its database (moved into place: it must be on the same file
    /// system), then loading memory as at start-up; this node's own account proposals are
    /// kept. Returns the log position the snapshot holds. A registry without a file copies
    /// the snapshot's documents instead ([`Registry::restore_from`]).
    pub fn restore_file(&self, snapshot: &Path) -> Result<u64> {
        let Some(db) = self.path.clone() else {
            return self.restore_from(snapshot);
        };
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if !st.accounts.is_empty() || self.applied.load(Ordering::Acquire) != 0 {
            return Err(RegistryError::Internal(
                "a snapshot goes only into an empty registry".into(),
            ));
        }
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut reader = self
            .reader
            .as_ref()
            .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()));
        // The file as it came (written without SQLite) reaches the disk while memory loads
        // from it; it becomes the database only once it is there.
        let synced = {
            let file = snapshot.to_path_buf();
            std::thread::spawn(move || std::fs::File::open(file)?.sync_all())
        };
        // The snapshot is made whole where it lies first (its schema checked by opening it,
        // this node's account proposals put in, its memory view loaded): nothing of the live
        // database is touched until it is known good.
        let prepared = (|| {
            let mut copy = Store::open(snapshot)?;
            let proposals: Vec<Op> = store
                .load(Kind::AccountProposal)?
                .into_iter()
                .map(|row| Op::Put {
                    kind: Kind::AccountProposal,
                    account: row.account,
                    key: row.key,
                    doc: row.doc,
                })
                .collect();
            copy.apply(&proposals)?;
            let fresh = load_in_parallel(snapshot, &copy, &self.region)?;
            let position: u64 = copy
                .get(Kind::LogPosition, "", "")?
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            copy.checkpoint()?;
            Ok::<_, RegistryError>((fresh, position))
        })();
        let synced = synced
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the syncing thread failed")));
        let (fresh, position) = prepared?;
        synced.map_err(|e| RegistryError::Internal(format!("syncing the snapshot: {e}")))?;
        // Then it replaces the database in one rename, its connections closed first (and the
        // old database's write-ahead files removed, which belong to it alone).
        *store = Store::in_memory()?;
        if let Some(r) = reader.as_deref_mut() {
            *r = Store::in_memory()?;
        }
        let swapped = (|| {
            for suffix in ["-wal", "-shm"] {
                for base in [&db, &snapshot.to_path_buf()] {
                    let mut f = base.clone().into_os_string();
                    f.push(suffix);
                    match std::fs::remove_file(&f) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(format!("{}: {e}", Path::new(&f).display())),
                    }
                }
            }
            std::fs::rename(snapshot, &db).map_err(|e| e.to_string())?;
            if let Some(dir) = db.parent().and_then(|d| std::fs::File::open(d).ok()) {
                let _ = dir.sync_all();
            }
            Ok(())
        })();
        // Whatever happened, the database at its path is opened again: the snapshot if it was
        // moved into place, else the registry as it was (empty).
        *store = Store::open(&db)?;
        if let Some(r) = reader.as_deref_mut() {
            *r = Store::open_reader(&db)?;
        }
        if let Err(e) = swapped {
            return Err(RegistryError::Internal(format!(
                "registry snapshot not moved into place: {e}"
            )));
        }
        *st = fresh;
        self.applied.store(position, Ordering::Release);
        self.recent_shadows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .complete_from = position + 1;
        drop(reader);
        drop(store);
        drop(st);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(position)
    }

    /// Empties this replica, memory and database (its account proposals kept), so that it
    /// starts again from a snapshot: the log was compacted past the position it had applied.
    /// Only before it serves (nothing may hold what it forgets).
    pub fn clear_replica(&self) -> Result<()> {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.clear_replica()?;
        *st = load_state(&store, &self.region)?;
        self.applied.store(0, Ordering::Release);
        drop(store);
        drop(st);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Which log this replica follows (what [`Registry::set_log_identity`] stored).
    pub fn log_identity(&self) -> Option<String> {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(Kind::LogPosition, "", "identity")
            .ok()
            .flatten()
    }

    /// Records which log this replica follows (the cluster's stream, by its creation time), so
    /// that a replica is never taken for one of another log that reached the same position.
    pub fn set_log_identity(&self, identity: &str) -> Result<()> {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply(&[Op::Put {
                kind: Kind::LogPosition,
                account: String::new(),
                key: "identity".into(),
                doc: identity.to_owned(),
            }])
    }

    /// Whether the registry holds nothing at all (no account).
    pub fn is_empty(&self) -> bool {
        self.read_state(|st| st.accounts.is_empty())
    }

    /// Creates an account with a root access key. `name` must be unique. On the data
    /// directory of a cluster node, from another process (no log attached, a log position
    /// stored), the account is proposed instead: stored apart, for the node to write through
    /// the cluster's log ([`Registry::load_new_accounts`]).
    pub fn create_account(&self, name: &str) -> Result<(AccountInfo, AccessKey)> {
        let propose = self.log.get().is_none() && self.log_position() > 0;
        self.transact("", |st, tx| {
            if st
                .accounts
                .values()
                .any(|a| a.info.as_ref().is_some_and(|i| i.name == name))
            {
                return Err(RegistryError::AlreadyExists {
                    message: format!("Account {name} already exists"),
                    resource_id: name.to_owned(),
                    resource_arn: String::new(),
                });
            }
            let mut id = random_string(b"0123456789", 12);
            while id.starts_with('0') || st.accounts.contains_key(id.as_str()) {
                id = random_string(b"0123456789", 12);
            }
            let mut prefix = random_string(LOWER_ALNUM, 14);
            while st.prefixes.contains_key(&prefix) {
                prefix = random_string(LOWER_ALNUM, 14);
            }
            let info = AccountInfo {
                id: id.clone(),
                name: name.to_owned(),
                endpoint_prefix: prefix,
                created: now_secs(),
            };
            let key = AccessKey {
                access_key_id: format!("AKIA{}", random_string(UPPER_ALNUM, 16)),
                secret_access_key: random_string(SECRET, 40),
                account_id: id.clone(),
                status: "Active".into(),
                created: now_secs(),
                user: None,
            };
            tx.account = id;
            if propose {
                tx.put(Kind::AccountProposal, &info.id, &(&info, &key))?;
                return Ok((info, key));
            }
            tx.put(Kind::Account, &info.id, &info)?;
            tx.put(Kind::AccessKey, &key.access_key_id, &key)?;
            self.add_account(st, &info, std::slice::from_ref(&key));
            Ok((info, key))
        })
    }

    /// Puts a new account and its keys in memory.
    fn add_account(&self, st: &mut State, info: &AccountInfo, keys: &[AccessKey]) {
        st.prefixes
            .insert(info.endpoint_prefix.clone(), info.id.clone());
        for k in keys {
            st.access_keys.insert(k.access_key_id.clone(), k.clone());
        }
        st.accounts.insert(
            info.id.as_str().into(),
            Account {
                arn_prefix: self.arn(&info.id, ""),
                info: Some(info.clone()),
                ..Account::default()
            },
        );
    }

    /// A write that may touch state outside one account (access keys, sessions): `f` gets the
    /// whole state and a transaction for `account`, which is then persisted.
    pub(crate) fn write_global<T>(
        &self,
        account: &str,
        mut f: impl FnMut(&mut State, &mut Tx) -> Result<T>,
    ) -> Result<T> {
        self.transact(account, |st, tx| {
            if !st.accounts.contains_key(account) {
                return Err(RegistryError::NotFound(format!(
                    "Account {account} does not exist"
                )));
            }
            f(st, tx)
        })
    }

    /// Loads accounts (and their root keys) that another process (`sekisho account create`)
    /// added to the database since this one started. Returns them with their first key.
    /// New accounts are empty, so nothing else needs loading. In a cluster, the accounts that
    /// process proposed are written through the log, as any write is, so that every node
    /// serves them.
    pub fn load_new_accounts(&self) -> Result<Vec<(AccountInfo, AccessKey)>> {
        if self.log.get().is_some() {
            return self.accept_account_proposals();
        }
        let (accounts, keys) = {
            let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            (store.load(Kind::Account)?, store.load(Kind::AccessKey)?)
        };
        let keys = keys
            .iter()
            .map(|k| decode::<AccessKey>(&k.doc))
            .collect::<Result<Vec<_>>>()?;
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for row in accounts {
            let info: AccountInfo = decode(&row.doc)?;
            if st.accounts.contains_key(info.id.as_str()) {
                continue;
            }
            let new: Vec<AccessKey> = keys
                .iter()
                .filter(|k| {
                    k.account_id == info.id && !st.access_keys.contains_key(&k.access_key_id)
                })
                .cloned()
                .collect();
            self.add_account(&mut st, &info, &new);
            if let Some(k) = new.into_iter().next() {
                out.push((info, k));
            }
        }
        Ok(out)
    }

    /// Writes the accounts proposed by another process through the cluster's log (a name
    /// taken meanwhile drops its proposal).
    fn accept_account_proposals(&self) -> Result<Vec<(AccountInfo, AccessKey)>> {
        let proposals = self
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .load(Kind::AccountProposal)?;
        let mut out = Vec::new();
        for row in proposals {
            let (info, key): (AccountInfo, AccessKey) = decode(&row.doc)?;
            let made = self.transact(&info.id, |st, tx| {
                tx.delete(Kind::AccountProposal, &info.id);
                let taken = st.accounts.contains_key(info.id.as_str())
                    || st.prefixes.contains_key(&info.endpoint_prefix)
                    || st.access_keys.contains_key(&key.access_key_id)
                    || st
                        .accounts
                        .values()
                        .any(|a| a.info.as_ref().is_some_and(|i| i.name == info.name));
                if taken {
                    return Ok(false);
                }
                tx.put(Kind::Account, &info.id, &info)?;
                tx.put(Kind::AccessKey, &key.access_key_id, &key)?;
                self.add_account(st, &info, std::slice::from_ref(&key));
                Ok(true)
            })?;
            if made {
                out.push((info, key));
            } else {
                tracing::warn!(account = %info.name, "a proposed account's name or id is taken; the proposal is dropped");
            }
        }
        Ok(out)
    }

    /// All accounts, oldest first.
    pub fn accounts(&self) -> Vec<AccountInfo> {
        self.read_state(|st| {
            let mut v: Vec<_> = st
                .accounts
                .values()
                .filter_map(|a| a.info.clone())
                .collect();
            v.sort_by(|a, b| a.created.total_cmp(&b.created).then(a.id.cmp(&b.id)));
            v
        })
    }

    /// The account whose endpoint prefix is `prefix`.
    pub fn account_by_prefix(&self, prefix: &str) -> Option<AccountInfo> {
        self.read_state(|st| {
            st.prefixes
                .get(prefix)
                .and_then(|id| st.accounts.get(id.as_str()))
                .and_then(|a| a.info.clone())
        })
    }

    /// An access key by id.
    pub fn access_key(&self, access_key_id: &str) -> Option<AccessKey> {
        self.read_state(|st| st.access_keys.get(access_key_id).cloned())
    }

    /// The root access keys of an account (not its IAM users').
    pub fn access_keys_of(&self, account: &str) -> Vec<AccessKey> {
        self.read_state(|st| {
            st.access_keys
                .values()
                .filter(|k| k.account_id == account && k.user.is_none())
                .cloned()
                .collect()
        })
    }

    /// The accounts in which certificate `id` is registered.
    pub fn certificate_accounts(&self, id: &str) -> Vec<String> {
        self.read_state(|st| {
            cert_key(id)
                .and_then(|k| st.cert_accounts.get(&k))
                .map(|s| s.iter().map(|a| a.to_string()).collect())
                .unwrap_or_default()
        })
    }
}

/// A certificate id (64 lower-case hex digits, as `sekisho_pki::certificate_id` writes it)
/// as the 32 bytes it encodes; `None` for anything else, which names no certificate.
pub(crate) fn cert_key(id: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if id.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode_to_slice(id, &mut out).ok()?;
    Some(out)
}

fn account_mut<'a>(st: &'a mut State, id: &str) -> Result<&'a mut Account> {
    st.accounts
        .get_mut(id)
        .ok_or_else(|| RegistryError::Internal(format!("stored object of unknown account {id}")))
}

/// One page of `items` in creation order (newest first unless `ascending`; ties by key), as
/// AWS's `List*` with `isAscendingOrder` pages them. `created_key` gives each item's creation
/// time and its key (the marker, which must name an item); `out` what the page carries. Only
/// the page is cloned and only a few pages' worth of references are sorted: a list of a
/// million certificates costs a pass over them, not a copy of them.
pub(crate) fn page_by_creation<'a, T: 'a, O>(
    items: impl Iterator<Item = &'a T> + Clone,
    created_key: impl Fn(&T) -> (f64, &str),
    out: impl Fn(&T) -> O,
    ascending: bool,
    marker: Option<&str>,
    page_size: usize,
) -> Result<Page<O>> {
    let order = |x: &&T, y: &&T| {
        let ((cx, kx), (cy, ky)) = (created_key(x), created_key(y));
        let o = cx.total_cmp(&cy).then(kx.cmp(ky));
        if ascending { o } else { o.reverse() }
    };
    let from = match marker {
        None => None,
        Some(m) => Some(
            items
                .clone()
                .find(|x| created_key(x).1 == m)
                .ok_or_else(|| {
                    RegistryError::InvalidRequest(
                        "The pagination marker or token is not valid".into(),
                    )
                })?,
        ),
    };
    // The page and the first item of the next one: the `want` first in order from the marker.
    let want = page_size.max(1) + 1;
    let mut best: Vec<&T> = Vec::with_capacity(2 * want);
    for x in items {
        if from.is_some_and(|f| order(&x, &f).is_lt()) {
            continue;
        }
        best.push(x);
        if best.len() == 2 * want {
            best.select_nth_unstable_by(want - 1, order);
            best.truncate(want);
        }
    }
    best.sort_by(order);
    let next = best.get(want - 1).map(|x| created_key(x).1.to_owned());
    best.truncate(want - 1);
    Ok(Page {
        items: best.into_iter().map(out).collect(),
        next,
    })
}

/// One page of an ordered map's values from the key `marker` on, of those `keep` accepts: it
/// reads the map from the marker until the page and the next page's first key are found,
/// never the whole map into a list. A marker whose entry was deleted since it was handed out
/// goes on from the next key, as a listing that meets a deletion should.
pub(crate) fn page_ordered<'a, K: std::borrow::Borrow<str> + Ord + 'a, V: 'a, O>(
    map: &'a BTreeMap<K, V>,
    marker: Option<&str>,
    page_size: usize,
    keep: impl Fn(&str, &V) -> bool,
    out: impl Fn(&str, &V) -> O,
) -> Page<O> {
    use std::ops::Bound::{Included, Unbounded};
    let range = match marker {
        None => map.range::<str, _>((Unbounded, Unbounded)),
        Some(m) => map.range::<str, _>((Included(m), Unbounded)),
    };
    let mut kept = range.filter(|(k, v)| keep((*k).borrow(), v));
    let items = kept
        .by_ref()
        .take(page_size.max(1))
        .map(|(k, v)| out(k.borrow(), v))
        .collect();
    Page {
        items,
        next: kept.next().map(|(k, _)| k.borrow().to_owned()),
    }
}

/// The entries of a sorted set from `marker` on (all of them without one): where a page of
/// it starts, found in the tree rather than by walking from the first entry.
pub(crate) fn from_marker<'a>(
    set: Option<&'a BTreeSet<String>>,
    marker: Option<&str>,
) -> impl Iterator<Item = &'a String> {
    use std::ops::Bound::{Included, Unbounded};
    let lower = marker.map_or(Unbounded, Included);
    set.into_iter()
        .flat_map(move |s| s.range::<str, _>((lower, Unbounded)))
}

/// One page of `items`, which come in key order, from the key `marker` on: only the page is
/// made (`out`), the rest is passed over.
pub(crate) fn page_sorted<'a, T, O>(
    items: impl Iterator<Item = (&'a str, T)>,
    marker: Option<&str>,
    page_size: usize,
    out: impl Fn(T) -> O,
) -> Page<O> {
    let mut rest = items.skip_while(|(k, _)| marker.is_some_and(|m| *k < m));
    let items = rest
        .by_ref()
        .take(page_size.max(1))
        .map(|(_, v)| out(v))
        .collect();
    Page {
        items,
        next: rest.next().map(|(k, _)| k.to_owned()),
    }
}

/// Pages through `items` (already in order) by an opaque marker: the key of the first item of
/// the next page.
pub(crate) fn paginate<T: Clone>(
    items: Vec<(String, T)>,
    marker: Option<&str>,
    page_size: usize,
) -> Result<Page<T>> {
    let start = match marker {
        None => 0,
        Some(m) => items.iter().position(|(k, _)| k == m).ok_or_else(|| {
            RegistryError::InvalidRequest("The pagination marker or token is not valid".into())
        })?,
    };
    let page_size = page_size.max(1);
    let end = (start + page_size).min(items.len());
    let next = items.get(end).map(|(k, _)| k.clone());
    Ok(Page {
        items: items[start..end].iter().map(|(_, v)| v.clone()).collect(),
        next,
    })
}

/// Checks a name against a length range and a character predicate.
pub(crate) fn check_name(
    what: &str,
    name: &str,
    max: usize,
    ok: impl Fn(char) -> bool,
) -> Result<()> {
    if name.is_empty() || name.len() > max || !name.chars().all(ok) {
        return Err(RegistryError::InvalidRequest(format!(
            "{what} {name:?} is not valid: 1-{max} characters of the allowed set"
        )));
    }
    Ok(())
}

/// Who a connection's identity is, as lifecycle events name it (`principalIdentifier`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalId {
    /// A registered certificate.
    Certificate(CertificateId),
    /// IAM credentials: their access key id.
    AccessKey(String),
    /// A custom authorizer's answer: the `principalId` its function returned.
    Custom(String),
}

impl PrincipalId {
    /// As text.
    pub fn as_str(&self) -> &str {
        match self {
            PrincipalId::Certificate(c) => c.as_str(),
            PrincipalId::AccessKey(k) | PrincipalId::Custom(k) => k,
        }
    }

    /// The certificate, for a certificate principal.
    pub fn certificate(&self) -> Option<&CertificateId> {
        match self {
            PrincipalId::Certificate(c) => Some(c),
            PrincipalId::AccessKey(_) | PrincipalId::Custom(_) => None,
        }
    }
}

/// A connection's view of its principal: the account, the certificate, the associated thing
/// and the effective policies. Built at CONNECT and rebuilt when the generation changes.
#[derive(Debug, Clone)]
pub struct CertificateIdentity {
    /// Account id.
    pub account_id: AccountId,
    /// Who: the certificate, or (for an IAM principal) the access key.
    pub principal: PrincipalId,
    /// Certificate status now.
    pub status: CertStatus,
    /// The thing associated with the connection, if any.
    pub thing: Option<Thing>,
    /// True when the thing is associated through an exclusive attachment.
    pub thing_exclusive: bool,
    /// Effective policies: (name, parsed default version).
    pub policies: Vec<(String, Arc<sekisho_policy::Policy>)>,
    /// The generation these were read at.
    pub generation: u64,
}

impl Registry {
    /// Resolves a certificate principal in `account` for a client id (AWS's thing association
    /// rule: the client id names a thing attached to the certificate, else an exclusively
    /// attached thing).
    pub fn certificate_identity(
        &self,
        account: &AccountId,
        certificate_id: &CertificateId,
        client_id: Option<&ClientId>,
    ) -> Result<CertificateIdentity> {
        let (account, certificate_id) = (account.as_str(), certificate_id.as_str());
        let client_id = client_id.map(ClientId::as_str);
        let generation = self.generation();
        self.read(account, |a| {
            let cert = a.certificates.get(certificate_id).ok_or_else(|| {
                RegistryError::NotFound(format!("Certificate {certificate_id} does not exist"))
            })?;
            let principal = self.arn(account, &format!("cert/{certificate_id}"));
            // A provisioning claim can provision with its template and do nothing else.
            if let Some(template) = &cert.claim_template {
                let doc = claim_policy(&self.region, account, template);
                let parsed = sekisho_policy::Policy::parse(&doc, sekisho_policy::Dialect::Iot)
                    .map_err(|e| RegistryError::Internal(format!("claim policy: {e}")))?;
                return Ok(CertificateIdentity {
                    account_id: AccountId::new(account),
                    principal: PrincipalId::Certificate(CertificateId::new(certificate_id)),
                    status: cert.status,
                    thing: None,
                    thing_exclusive: false,
                    policies: vec![("provisioning-claim".to_string(), Arc::new(parsed))],
                    generation,
                });
            }
            // Looked up, not listed: a principal may be attached to a million things. An
            // exclusive attachment is a principal's only one (attach_thing_principal).
            let attached = a.principal_things.get(principal.as_str());
            let by_client =
                client_id.and_then(|c| attached.and_then(|m| m.get(c).map(|k| (c, *k))));
            let chosen = by_client.or_else(|| {
                attached
                    .filter(|m| m.len() == 1)
                    .and_then(|m| m.iter().next())
                    .filter(|(_, k)| **k == ThingPrincipalType::ExclusiveThing)
                    .map(|(t, k)| (&**t, *k))
            });
            let thing = chosen.and_then(|(t, _)| a.things.get(t).cloned());
            let thing_exclusive =
                chosen.is_some_and(|(_, k)| k == ThingPrincipalType::ExclusiveThing);
            // The certificate's own policies, then those its thing inherits from its groups
            // and their ancestors (the thing associated with this connection only).
            let mut names: Vec<&str> = a
                .policy_targets
                .get(principal.as_str())
                .into_iter()
                .flatten()
                .map(|n| &**n)
                .collect();
            let inherited = thing
                .as_ref()
                .map(|t| a.group_policy_names(&t.name))
                .unwrap_or_default();
            for n in &inherited {
                if !names.contains(&n.as_str()) {
                    names.push(n);
                }
            }
            let policies = names
                .into_iter()
                .filter_map(|n| {
                    a.policies
                        .get(n)
                        .and_then(|p| p.default_parsed().map(|d| (n.to_owned(), d)))
                })
                .collect();
            Ok(CertificateIdentity {
                account_id: AccountId::new(account),
                principal: PrincipalId::Certificate(CertificateId::new(certificate_id)),
                status: cert.status,
                thing,
                thing_exclusive,
                policies,
                generation,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `order_of` orders as a plain sort does: names sharing long prefixes, names that are
    /// prefixes of others, NUL bytes where the compact key pads with zeros, ties.
    #[test]
    fn order_of_orders_as_a_plain_sort() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let prefix = if round % 2 == 0 {
                "arn:aws:iot:us-east-1:123456789012:cert/"
            } else {
                ""
            };
            let n = (next() % 300) as usize;
            let names: Vec<String> = (0..n)
                .map(|_| {
                    let len = (next() % 12) as usize;
                    let tail: String = (0..len)
                        .map(|_| ['\0', 'a', 'b', 'z', 'é'][(next() % 5) as usize])
                        .collect();
                    format!("{prefix}{tail}")
                })
                .collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let got: Vec<&str> = order_of(&refs).into_iter().map(|i| refs[i]).collect();
            let mut want = refs.clone();
            want.sort();
            assert_eq!(got, want, "round {round}");
        }
        assert!(order_of(&[]).is_empty());
    }

    /// Acknowledged means on disk: every commit is synced (`synchronous=FULL`), not only
    /// ordered (`NORMAL` loses the last commits on power failure).
    #[test]
    fn commits_are_synced() {
        let dir = std::env::temp_dir().join(format!("sekisho-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("r.db")).unwrap();
        assert_eq!(store.pragma("synchronous"), 2, "FULL");
        assert_eq!(store.pragma_text("journal_mode"), "wal");
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A write the database refuses changes nothing in memory: not the object, not the
    /// generation's meaning, and the registry keeps working afterwards.
    #[test]
    fn a_failed_write_changes_nothing() {
        let reg = Registry::in_memory("us-east-1").unwrap();
        let (info, _) = reg.create_account("a").unwrap();
        let acct = info.id;
        reg.create_thing(&acct, "before", None, Default::default())
            .unwrap();
        reg.store.lock().unwrap().fail_writes("disk full").unwrap();
        let err = reg
            .create_thing(&acct, "lost", None, Default::default())
            .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(
            reg.describe_thing(&acct, "lost").is_err(),
            "memory must not keep a refused write"
        );
        assert!(reg.describe_thing(&acct, "before").is_ok());
        reg.store.lock().unwrap().fail_writes_off().unwrap();
        reg.create_thing(&acct, "after", None, Default::default())
            .unwrap();
        assert!(reg.describe_thing(&acct, "after").is_ok());
    }

    /// Paging by creation date through every page gives the whole list in order (newest
    /// first or oldest first, ties by key) whatever the page size, as sorting it all would;
    /// a marker that names no item is refused.
    #[test]
    fn pages_by_creation_cover_the_sorted_list() {
        let mut x: u64 = 3;
        let items: Vec<(f64, String)> = (0..500)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((x >> 33) % 40) as f64, format!("k{i:03}"))
            })
            .collect();
        for ascending in [true, false] {
            let mut sorted: Vec<&(f64, String)> = items.iter().collect();
            sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            if !ascending {
                sorted.reverse();
            }
            let want: Vec<&str> = sorted.iter().map(|i| i.1.as_str()).collect();
            for size in [1, 7, 250, 499, 500, 501] {
                let (mut got, mut marker) = (Vec::new(), None::<String>);
                loop {
                    let page = page_by_creation(
                        items.iter(),
                        |i| (i.0, i.1.as_str()),
                        |i| i.1.clone(),
                        ascending,
                        marker.as_deref(),
                        size,
                    )
                    .unwrap();
                    assert!(page.items.len() <= size);
                    got.extend(page.items);
                    match page.next {
                        Some(n) => marker = Some(n),
                        None => break,
                    }
                }
                assert_eq!(got, want, "ascending {ascending}, page size {size}");
            }
        }
        assert!(matches!(
            page_by_creation(
                items.iter(),
                |i| (i.0, i.1.as_str()),
                |i| i.1.clone(),
                true,
                Some("nope"),
                10
            ),
            Err(RegistryError::InvalidRequest(_))
        ));
    }

    /// Paging an ordered map by key with a filter: every kept entry once, in order; a marker
    /// that is no key is refused.
    #[test]
    fn ordered_pages_cover_the_kept_entries() {
        let map: BTreeMap<String, u32> = (0..100).map(|i| (format!("t{i:03}"), i)).collect();
        let keep = |_: &str, v: &u32| !v.is_multiple_of(3);
        let want: Vec<u32> = (0..100u32).filter(|v| !v.is_multiple_of(3)).collect();
        for size in [1, 5, 66, 67, 100] {
            let (mut got, mut marker) = (Vec::new(), None::<String>);
            loop {
                let page = page_ordered(&map, marker.as_deref(), size, keep, |_, v| *v);
                assert!(page.items.len() <= size);
                got.extend(page.items);
                match page.next {
                    Some(n) => marker = Some(n),
                    None => break,
                }
            }
            assert_eq!(got, want, "page size {size}");
        }
        // A marker whose entry is gone goes on from the next key.
        let page = page_ordered(&map, Some("t050x"), 3, keep, |_, v| *v);
        assert_eq!(page.items, vec![52, 53, 55]);
        assert_eq!(page.next.as_deref(), Some("t056"));
        let sorted = map.iter().map(|(k, v)| (k.as_str(), *v));
        let page = page_sorted(sorted, Some("t098"), 5, |v| v);
        assert_eq!((page.items, page.next), (vec![98, 99], None));
        let page = page_sorted(map.iter().map(|(k, v)| (k.as_str(), *v)), None, 2, |v| v);
        assert_eq!(
            (page.items, page.next.as_deref()),
            (vec![0, 1], Some("t002"))
        );
    }

    /// Only what `certificate_id` writes (64 lower-case hex digits) is a certificate key: at
    /// 63 and 65 digits, in upper case or with other characters it names none.
    #[test]
    fn certificate_keys_are_exact() {
        let id = sekisho_pki::certificate_id(b"any bytes");
        assert_eq!(cert_key(&id).map(hex::encode), Some(id.clone()));
        assert!(cert_key(&id[..63]).is_none());
        assert!(cert_key(&format!("{id}0")).is_none());
        assert!(cert_key(&id.to_ascii_uppercase()).is_none());
        assert!(cert_key(&format!("{}g", &id[..63])).is_none());
        assert!(cert_key("").is_none());
    }
}
