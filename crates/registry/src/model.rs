//! The registry's domain objects, as stored and as served from memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::compact::{VecMap, VecSet};

/// Certificate status (AWS `CertificateStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertStatus {
    /// May authenticate.
    Active,
    /// Registered but not usable.
    Inactive,
    /// Revoked.
    Revoked,
    /// Being transferred to another account.
    PendingTransfer,
    /// Deprecated status.
    RegisterInactive,
    /// Registered by JITR, awaiting activation.
    PendingActivation,
}

impl CertStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CertStatus::Active => "ACTIVE",
            CertStatus::Inactive => "INACTIVE",
            CertStatus::Revoked => "REVOKED",
            CertStatus::PendingTransfer => "PENDING_TRANSFER",
            CertStatus::RegisterInactive => "REGISTER_INACTIVE",
            CertStatus::PendingActivation => "PENDING_ACTIVATION",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<CertStatus> {
        Some(match s {
            "ACTIVE" => CertStatus::Active,
            "INACTIVE" => CertStatus::Inactive,
            "REVOKED" => CertStatus::Revoked,
            "PENDING_TRANSFER" => CertStatus::PendingTransfer,
            "REGISTER_INACTIVE" => CertStatus::RegisterInactive,
            "PENDING_ACTIVATION" => CertStatus::PendingActivation,
            _ => return None,
        })
    }
}

/// How a certificate may be used without SNI (AWS `CertificateMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertMode {
    /// Identifies its account by itself.
    Default,
    /// Needs SNI to choose the account.
    SniOnly,
}

impl CertMode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CertMode::Default => "DEFAULT",
            CertMode::SniOnly => "SNI_ONLY",
        }
    }
}

/// An account (tenant).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountInfo {
    /// 12-digit id.
    pub id: String,
    /// Human name (the CLI profile name).
    pub name: String,
    /// The endpoint prefix, as in `<prefix>-ats.iot.<region>.<domain>`.
    pub endpoint_prefix: String,
    /// Creation time, epoch seconds.
    pub created: f64,
}

/// An access key of an account's root (IAM users come with their own issue).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessKey {
    /// `AKIA...`.
    pub access_key_id: String,
    /// The secret.
    pub secret_access_key: String,
    /// Owner account.
    pub account_id: String,
    /// `Active` or `Inactive`.
    pub status: String,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// The IAM user it belongs to; `None` for the account's root.
    #[serde(default)]
    pub user: Option<String>,
}

/// A thing's id (AWS's `thingId`): a UUID as the registry makes them, kept as its 16 bytes
/// (72 bytes a thing as text); an id of any other shape is kept as it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThingId {
    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lower-case hex.
    Uuid([u8; 16]),
    /// Anything else.
    Text(Box<str>),
}

impl ThingId {
    /// A new random id.
    pub fn random() -> ThingId {
        ThingId::Uuid(rand::random())
    }

    /// The id `s` names; what [`std::fmt::Display`] writes back is `s` again.
    pub fn parse(s: &str) -> ThingId {
        let b = s.as_bytes();
        let shaped = b.len() == 36
            && b.iter().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
            });
        let mut out = [0u8; 16];
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if shaped && hex::decode_to_slice(&hex, &mut out).is_ok() {
            ThingId::Uuid(out)
        } else {
            ThingId::Text(s.into())
        }
    }
}

impl std::fmt::Display for ThingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThingId::Uuid(b) => {
                let h = hex::encode(b);
                write!(
                    f,
                    "{}-{}-{}-{}-{}",
                    &h[0..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..32]
                )
            }
            ThingId::Text(s) => f.write_str(s),
        }
    }
}

impl Serialize for ThingId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ThingId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(ThingId::parse(&s))
    }
}

/// A thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thing {
    /// Name.
    pub name: String,
    /// Opaque id.
    pub id: ThingId,
    /// Thing type.
    pub thing_type: Option<String>,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
    /// Version, starts at 1.
    pub version: i64,
    /// Creation time, epoch seconds.
    pub created: f64,
}

/// A thing type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThingType {
    /// Name.
    pub name: String,
    /// Opaque id.
    pub id: String,
    /// Description.
    pub description: Option<String>,
    /// Searchable attribute names.
    pub searchable_attributes: Vec<String>,
    /// Whether deprecated.
    pub deprecated: bool,
    /// When deprecated, epoch seconds.
    pub deprecation_date: Option<f64>,
    /// Creation time, epoch seconds.
    pub created: f64,
}

/// A device certificate registered in an account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Certificate {
    /// SHA-256 of the DER, hex.
    pub id: String,
    /// Status.
    pub status: CertStatus,
    /// Issuing CA registration, if any.
    pub ca_certificate_id: Option<String>,
    /// Mode.
    pub mode: CertMode,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// Last modification, epoch seconds.
    pub modified: f64,
    /// Bumped on every change.
    pub generation: i64,
    /// Validity start, epoch seconds.
    pub not_before: f64,
    /// Validity end, epoch seconds.
    pub not_after: f64,
    /// For a temporary provisioning claim (CreateProvisioningClaim): the template it may
    /// provision with. Such a certificate is not listed, its only policy is the implicit one
    /// of [`crate::claim_policy`], and it expires with its X.509 validity (five minutes).
    #[serde(default)]
    pub claim_template: Option<String>,
}

/// A certificate as the database holds it: its memory form and its PEM. Memory keeps neither
/// the PEM nor its parsed fields (about 2.5 KB a certificate, most of a device's cost at fleet
/// scale): [`crate::Registry::certificate_pem`] and [`crate::Registry::certificate_info`]
/// read them from the database when asked, which only DescribeCertificate, provisioning and
/// policies naming `iot:Certificate.*` variables do.
#[derive(Serialize)]
pub(crate) struct StoredCertificate<'a> {
    #[serde(flatten)]
    pub cert: &'a Certificate,
    pub pem: &'a str,
}

/// The PEM of a stored certificate document (the rest is read as a [`Certificate`]).
#[derive(Deserialize)]
pub(crate) struct StoredPem {
    pub pem: String,
}

impl Certificate {
    /// Issued here (no CA, not a provisioning claim) and still PENDING_ACTIVATION: waiting for
    /// fleet provisioning.
    pub fn awaits_provisioning(&self) -> bool {
        self.status == CertStatus::PendingActivation
            && self.ca_certificate_id.is_none()
            && self.claim_template.is_none()
    }
}

/// Status of a registered CA certificate (AWS `CACertificateStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CaStatus {
    /// Its certificates may be registered and may connect.
    Active,
    /// Its certificates may neither register nor connect.
    Inactive,
}

impl CaStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CaStatus::Active => "ACTIVE",
            CaStatus::Inactive => "INACTIVE",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<CaStatus> {
        match s {
            "ACTIVE" => Some(CaStatus::Active),
            "INACTIVE" => Some(CaStatus::Inactive),
            _ => None,
        }
    }
}

/// Just-in-time provisioning settings of a CA (`RegistrationConfig`), kept as given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationConfig {
    /// `templateBody`.
    pub template_body: Option<String>,
    /// `roleArn`.
    pub role_arn: Option<String>,
    /// `templateName`.
    pub template_name: Option<String>,
}

/// A CA certificate registered in an account (RegisterCACertificate).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaCertificate {
    /// SHA-256 of the DER, hex.
    pub id: String,
    /// PEM.
    pub pem: String,
    /// Status.
    pub status: CaStatus,
    /// Just-in-time registration of the certificates it signed.
    pub auto_registration: bool,
    /// DEFAULT (one account per region) or SNI_ONLY.
    pub mode: CertMode,
    /// JITP settings.
    pub registration_config: Option<RegistrationConfig>,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// Last modification, epoch seconds.
    pub modified: f64,
    /// Bumped on every change.
    pub generation: i64,
    /// Validity start, epoch seconds.
    pub not_before: f64,
    /// Validity end, epoch seconds.
    pub not_after: f64,
    /// Parsed fields (not stored; derived from `pem`).
    #[serde(skip)]
    pub info: Option<Arc<sekisho_pki::CertInfo>>,
    /// The DER (not stored; derived from `pem`), for signature checks.
    #[serde(skip)]
    pub der: Arc<[u8]>,
}

/// One version of a policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyVersion {
    /// The document as given.
    pub document: String,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// The parsed document (not stored; derived from `document`).
    #[serde(skip)]
    pub parsed: Option<Arc<sekisho_policy::Policy>>,
}

/// A named IoT policy with its versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IotPolicy {
    /// Name.
    pub name: String,
    /// Versions by number.
    pub versions: BTreeMap<u32, PolicyVersion>,
    /// The default version.
    pub default_version: u32,
    /// The next version number to hand out.
    pub next_version: u32,
    /// Creation time, epoch seconds.
    pub created: f64,
    /// Last modification, epoch seconds.
    pub modified: f64,
    /// Opaque generation id (changes with every modification).
    pub generation_id: String,
}

impl IotPolicy {
    /// The default version's parsed document.
    pub fn default_parsed(&self) -> Option<Arc<sekisho_policy::Policy>> {
        self.versions
            .get(&self.default_version)
            .and_then(|v| v.parsed.clone())
    }
}

/// How a principal is attached to a thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ThingPrincipalType {
    /// The only thing of this principal.
    ExclusiveThing,
    /// One of several.
    NonExclusiveThing,
}

impl ThingPrincipalType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ThingPrincipalType::ExclusiveThing => "EXCLUSIVE_THING",
            ThingPrincipalType::NonExclusiveThing => "NON_EXCLUSIVE_THING",
        }
    }
}

/// Everything one account holds.
#[derive(Debug, Clone, Default)]
pub struct Account {
    /// Identity and endpoint.
    pub info: Option<AccountInfo>,
    /// Things by name.
    pub things: BTreeMap<Arc<str>, Thing>,
    /// Thing types by name.
    pub thing_types: BTreeMap<String, ThingType>,
    /// Certificates by id.
    pub certificates: crate::compact::Certificates,
    /// The certificates fleet provisioning looks after: provisioning claims, and certificates
    /// issued here that still wait PENDING_ACTIVATION (an index of `certificates`, kept by
    /// [`Account::track_certificate`], so that the sweeps that expire them never walk every
    /// certificate).
    pub provisioning_certs: BTreeSet<String>,
    /// CA certificates by id.
    pub ca_certificates: BTreeMap<String, CaCertificate>,
    /// The registration code (GetRegistrationCode), once asked for.
    pub registration_code: Option<String>,
    /// IAM users by name.
    pub users: BTreeMap<String, crate::iam::IamUser>,
    /// IAM roles by name.
    pub roles: BTreeMap<String, crate::iam::IamRole>,
    /// Customer managed IAM policies by name.
    pub managed_policies: BTreeMap<String, crate::iam::ManagedPolicy>,
    /// Role aliases by name.
    pub role_aliases: BTreeMap<String, crate::rolealias::RoleAlias>,
    /// Policies by name.
    /// (Keys shared with the policy names of `policy_targets`.)
    pub policies: BTreeMap<Arc<str>, IotPolicy>,
    /// Policy names attached to each target (certificate ARN, thing group ARN, ...).
    /// Keys are shared (`Account::intern`) with `principal_things` and `thing_principals`:
    /// one copy of a certificate's ARN, not three.
    pub policy_targets: BTreeMap<Arc<str>, VecSet<Arc<str>>>,
    /// Principals (ARNs) attached to each thing, with the attachment type.
    pub thing_principals: BTreeMap<Arc<str>, VecMap<Arc<str>, ThingPrincipalType>>,
    /// The reverse of `thing_principals`: things of each principal (looked up at every
    /// CONNECT, so it must not scan all things). Kept in step by `link`/`unlink`.
    /// Its thing names are shared with `thing_principals`' keys.
    pub principal_things: BTreeMap<Arc<str>, VecMap<Arc<str>, ThingPrincipalType>>,
    /// Static thing groups by name.
    pub thing_groups: BTreeMap<String, crate::groups::ThingGroup>,
    /// Each group's ARN (policy attachments are keyed by it).
    pub group_arns: BTreeMap<String, String>,
    /// Things directly in each group.
    pub group_members: BTreeMap<String, BTreeSet<String>>,
    /// The reverse of `group_members`: the groups each thing is directly in.
    pub thing_memberships: BTreeMap<String, VecSet<String>>,
    /// Jobs by id.
    pub jobs: BTreeMap<String, crate::jobs::Job>,
    /// Job executions by (thing, job).
    pub executions: BTreeMap<(String, String), crate::jobs::Execution>,
    /// The things each job has an execution on (an index of `executions`, kept by
    /// `Account::save_execution` and `Account::remove_execution`), so that what concerns one
    /// job never walks every execution of the account.
    pub job_things: BTreeMap<String, BTreeSet<String>>,
    /// The last job's creation order.
    pub job_seq: u64,
    /// Job templates by id.
    pub job_templates: BTreeMap<String, crate::jobs::JobTemplate>,
    /// Functions by name.
    pub functions: BTreeMap<String, crate::functions::Function>,
    /// Custom authorizers by name.
    pub authorizers: BTreeMap<String, crate::authorizers::Authorizer>,
    /// The default authorizer's name.
    pub default_authorizer: Option<String>,
    /// Cognito identity pools by id.
    pub identity_pools: BTreeMap<String, crate::cognito::IdentityPool>,
    /// Cognito identities by id.
    pub cognito_identities: BTreeMap<String, crate::cognito::CognitoIdentity>,
    /// IAM OpenID Connect providers by name.
    pub oidc_providers: BTreeMap<String, crate::oidc::OidcProvider>,
    /// The things waiting in each job's staged rollout, in order, with their order numbers.
    pub job_waiting: BTreeMap<String, std::collections::VecDeque<(u64, String)>>,
    /// The reverse of `job_waiting`: the jobs each thing waits in.
    pub waiting_by_thing: BTreeMap<String, BTreeSet<String>>,
    /// Provisioning templates by name.
    pub templates: BTreeMap<String, crate::provisioning::ProvisioningTemplate>,
    /// Event types enabled (UpdateEventConfigurations).
    pub event_config: BTreeMap<String, bool>,
    /// `arn:aws:iot:<region>:<account>:`, what this account's IoT ARNs begin with.
    pub arn_prefix: String,
}

impl Account {
    /// The account id.
    pub fn id(&self) -> &str {
        self.info.as_ref().map(|i| i.id.as_str()).unwrap_or("")
    }

    /// Keeps [`Account::provisioning_certs`] right for `c` after it was stored or changed.
    pub fn track_certificate(&mut self, c: &Certificate) {
        if c.claim_template.is_some() || c.awaits_provisioning() {
            self.provisioning_certs.insert(c.id.clone());
        } else {
            self.provisioning_certs.remove(&c.id);
        }
    }

    /// The shared copy of a principal's or policy target's ARN, if one of the maps keyed by
    /// it holds it already; a new one otherwise.
    pub fn intern(&self, arn: &str) -> Arc<str> {
        self.principal_things
            .get_key_value(arn)
            .map(|(k, _)| k.clone())
            .or_else(|| {
                self.policy_targets
                    .get_key_value(arn)
                    .map(|(k, _)| k.clone())
            })
            .unwrap_or_else(|| Arc::from(arn))
    }

    /// The shared copy of a policy's name (the key of `policies`), or a new one.
    pub fn policy_name(&self, name: &str) -> Arc<str> {
        self.policies
            .get_key_value(name)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(name))
    }

    /// Records that `principal` is attached to `thing`.
    pub fn link(&mut self, thing: &str, principal: &str, kind: ThingPrincipalType) {
        let principal = self.intern(principal);
        // One shared copy of the thing's name: the `things` key.
        let thing: Arc<str> = match self.things.get_key_value(thing) {
            Some((k, _)) => k.clone(),
            None => self
                .thing_principals
                .get_key_value(thing)
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| Arc::from(thing)),
        };
        self.thing_principals
            .entry(thing.clone())
            .or_default()
            .insert(principal.clone(), kind);
        self.principal_things
            .entry(principal)
            .or_default()
            .insert(thing, kind);
    }

    /// Removes the attachment of `principal` to `thing`.
    pub fn unlink(&mut self, thing: &str, principal: &str) {
        if let Some(ps) = self.thing_principals.get_mut(thing) {
            ps.remove(principal);
            if ps.is_empty() {
                self.thing_principals.remove(thing);
            }
        }
        if let Some(ts) = self.principal_things.get_mut(principal) {
            ts.remove(thing);
            if ts.is_empty() {
                self.principal_things.remove(principal);
            }
        }
    }
}

#[cfg(test)]
mod thing_id_tests {
    use super::*;

    /// Every id reads back as written: the registry's UUIDs in 16 bytes, any other shape
    /// (upper case, a missing dash, one character more or less) as its text.
    #[test]
    fn thing_ids_read_back_as_written() {
        let made = ThingId::random();
        let text = made.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(ThingId::parse(&text), made);
        for s in [
            "0123abcd-4567-89ef-0123-456789abcdef",
            "0123ABCD-4567-89ef-0123-456789abcdef",
            "0123abcd-4567-89ef-0123-456789abcde",
            "0123abcd-4567-89ef-0123-456789abcdef0",
            "0123abcd04567-89ef-0123-456789abcdef",
            "",
            "thing-id-of-another-shape",
        ] {
            let id = ThingId::parse(s);
            assert_eq!(id.to_string(), s);
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(json, serde_json::to_string(s).unwrap());
            assert_eq!(serde_json::from_str::<ThingId>(&json).unwrap(), id);
        }
        assert!(matches!(
            ThingId::parse("0123abcd-4567-89ef-0123-456789abcdef"),
            ThingId::Uuid(_)
        ));
        assert!(std::mem::size_of::<ThingId>() <= 24);
    }
}
