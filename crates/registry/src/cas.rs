//! Bring-your-own CA: the registration code, CA certificates in DEFAULT and SNI_ONLY mode,
//! device certificates registered against them (or without one), just-in-time registration,
//! and the authentication of a presented client certificate.
//!
//! Rules kept here (AWS's, from the API model and the developer guide):
//! - a CA, and a device certificate, may be registered in DEFAULT mode by one account only;
//!   SNI_ONLY registrations are not limited;
//! - at most [`MAX_CAS_PER_SUBJECT`] CAs with the same subject per account;
//! - a DEFAULT-mode CA needs a verification certificate whose common name is the account's
//!   registration code and which the CA signed (proof of possession of the CA's key);
//! - a device certificate registered against a CA takes the CA's mode, and authenticates only
//!   while both it and the CA are ACTIVE.

use sekisho_ids::{AccountId, CertificateId};
use std::sync::Arc;

use time::OffsetDateTime;

use crate::store::Kind;
use crate::*;

/// Most CA certificates with the same subject in one account.
pub const MAX_CAS_PER_SUBJECT: usize = 10;

/// A CA certificate to register.
#[derive(Debug, Clone)]
pub struct NewCaCertificate {
    /// PEM of the CA certificate.
    pub pem: String,
    /// PEM of the verification certificate (DEFAULT mode).
    pub verification_pem: Option<String>,
    /// Mode.
    pub mode: CertMode,
    /// `setAsActive`.
    pub active: bool,
    /// `allowAutoRegistration`.
    pub auto_registration: bool,
    /// `registrationConfig`.
    pub registration_config: Option<RegistrationConfig>,
}

/// What UpdateCACertificate changes.
#[derive(Debug, Clone, Default)]
pub struct CaUpdate {
    /// `newStatus`.
    pub status: Option<CaStatus>,
    /// `newAutoRegistrationStatus`.
    pub auto_registration: Option<bool>,
    /// `registrationConfig`.
    pub registration_config: Option<RegistrationConfig>,
    /// `removeAutoRegistration`: drops the registration config.
    pub remove_auto_registration: bool,
}

/// Where a TLS connection is headed, from its server name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// The server name named this account's endpoint.
    Account(&'a str),
    /// No server name (or a default name): only a DEFAULT-mode certificate, which identifies
    /// its account by itself, is accepted.
    ByCertificate,
}

/// The outcome of authenticating a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// Registered and ACTIVE (and so is its CA, if any).
    Active {
        /// Account.
        account: AccountId,
        /// Certificate id.
        certificate_id: CertificateId,
    },
    /// Registered by just-in-time registration and not yet activated: refused, and the
    /// registration event is published again.
    PendingActivation {
        /// Account.
        account: AccountId,
        /// Certificate id.
        certificate_id: CertificateId,
        /// The CA it was registered under.
        ca_certificate_id: String,
    },
    /// Unknown, but signed by an ACTIVE CA of the account that allows auto-registration:
    /// register it PENDING_ACTIVATION once the client has proven possession of its key.
    AutoRegister {
        /// Account.
        account: AccountId,
        /// The signing CA.
        ca_certificate_id: String,
    },
    /// Refused, with the reason (for the log).
    Refused(String),
}

fn validation(msg: impl Into<String>) -> RegistryError {
    RegistryError::CertificateValidation(msg.into())
}

fn parse_pem(pem: &str, what: &str) -> Result<(Vec<u8>, sekisho_pki::CertInfo)> {
    let der = sekisho_pki::pem_to_der(pem)
        .map_err(|e| validation(format!("The {what} is not a valid PEM certificate: {e}")))?;
    let info = sekisho_pki::CertInfo::parse(&der)
        .map_err(|e| validation(format!("The {what} could not be parsed: {e}")))?;
    Ok((der, info))
}

impl CaCertificate {
    /// Fills the derived fields after loading.
    pub(crate) fn rehydrate(&mut self) {
        if let Ok(der) = sekisho_pki::pem_to_der(&self.pem) {
            self.info = sekisho_pki::CertInfo::parse(&der).ok().map(Arc::new);
            self.der = der.into();
        }
    }

    fn subject(&self) -> &[u8] {
        self.info
            .as_ref()
            .map(|i| i.subject_raw.as_slice())
            .unwrap_or_default()
    }
}

impl Account {
    /// CAs of this account that could have issued a certificate with this issuer name and
    /// whose key verifies its signature.
    fn issuers_of<'a>(
        &'a self,
        der: &'a [u8],
        info: &'a sekisho_pki::CertInfo,
    ) -> impl Iterator<Item = &'a CaCertificate> + 'a {
        self.ca_certificates.values().filter(move |ca| {
            ca.subject() == info.issuer_raw.as_slice() && sekisho_pki::signed_by(der, &ca.der)
        })
    }
}

impl Registry {
    /// GetRegistrationCode: the account's code, created on first use.
    pub fn registration_code(&self, account: &str) -> Result<String> {
        self.write(account, |a, tx| {
            if let Some(c) = &a.registration_code {
                return Ok(c.clone());
            }
            let code = random_string(b"0123456789abcdef", 64);
            tx.put(Kind::RegistrationCode, "code", &code)?;
            a.registration_code = Some(code.clone());
            Ok(code)
        })
    }

    /// DeleteRegistrationCode.
    pub fn delete_registration_code(&self, account: &str) -> Result<()> {
        self.write(account, |a, tx| {
            if a.registration_code.is_none() {
                return Err(RegistryError::NotFound(
                    "The registration code does not exist".into(),
                ));
            }
            tx.delete(Kind::RegistrationCode, "code");
            a.registration_code = None;
            Ok(())
        })
    }

    /// RegisterCACertificate.
    pub fn register_ca_certificate(
        &self,
        account: &str,
        new: NewCaCertificate,
        now: OffsetDateTime,
    ) -> Result<CaCertificate> {
        let (der, info) = parse_pem(&new.pem, "CA certificate")?;
        if !info.is_ca {
            return Err(validation(
                "The certificate is not a CA certificate (basicConstraints cA is not set)",
            ));
        }
        if !info.valid_at(now) {
            return Err(validation("The CA certificate is expired or not yet valid"));
        }
        let verification = match (new.mode, new.verification_pem.as_deref()) {
            (CertMode::Default, None | Some("")) => {
                return Err(RegistryError::InvalidRequest(
                    "A verification certificate is required to register a CA certificate in DEFAULT mode".into(),
                ));
            }
            (CertMode::Default, Some(v)) => {
                let (vder, vinfo) = parse_pem(v, "verification certificate")?;
                if !sekisho_pki::signed_by(&vder, &der) {
                    return Err(validation(
                        "The verification certificate is not signed by the CA certificate",
                    ));
                }
                if !vinfo.valid_at(now) {
                    return Err(validation(
                        "The verification certificate is expired or not yet valid",
                    ));
                }
                let cn = vinfo
                    .lookup("Subject.CommonName")
                    .and_then(|(v, _)| v.first().map(|s| s.to_string()));
                Some(cn)
            }
            (CertMode::SniOnly, None | Some("")) => None,
            (CertMode::SniOnly, Some(_)) => {
                return Err(RegistryError::InvalidRequest(
                    "A verification certificate must not be given for a CA certificate in SNI_ONLY mode".into(),
                ));
            }
        };
        let id = sekisho_pki::certificate_id(&der);
        let arn = self.arn(account, &format!("cacert/{id}"));
        let info = Arc::new(info);
        let der: Arc<[u8]> = der.into();
        self.write_checked(
            account,
            |st| {
                // A CA identifies its account without SNI only if no other account has it in
                // DEFAULT mode.
                if new.mode == CertMode::Default
                    && st.ca_accounts.get(&id).is_some_and(|accts| {
                        accts.iter().any(|other| {
                            other != account
                                && st.accounts.get(other.as_str()).is_some_and(|a| {
                                    a.ca_certificates
                                        .get(&id)
                                        .is_some_and(|c| c.mode == CertMode::Default)
                                })
                        })
                    })
                {
                    return Err(RegistryError::InvalidRequest(
                        "Cannot accept this CACertificate".into(),
                    ));
                }
                Ok(())
            },
            |a, tx| {
                if a.ca_certificates.contains_key(&id) {
                    return Err(RegistryError::AlreadyExists {
                        message: "The CA certificate is already registered".into(),
                        resource_id: id.clone(),
                        resource_arn: arn.clone(),
                    });
                }
                if let Some(cn) = &verification {
                    match (&a.registration_code, cn) {
                        (Some(code), Some(cn)) if code == cn => {}
                        _ => {
                            return Err(RegistryError::RegistrationCodeValidation(
                                "The common name of the verification certificate does not match the registration code".into(),
                            ));
                        }
                    }
                }
                let same_subject = a
                    .ca_certificates
                    .values()
                    .filter(|c| c.subject() == info.subject_raw.as_slice())
                    .count();
                if same_subject >= MAX_CAS_PER_SUBJECT {
                    return Err(RegistryError::LimitExceeded(
                        "Limit reached for number of CA Certificates with same subject".into(),
                    ));
                }
                let t = now_secs();
                let ca = CaCertificate {
                    id: id.clone(),
                    pem: sekisho_pki::der_to_pem(&der),
                    status: if new.active {
                        CaStatus::Active
                    } else {
                        CaStatus::Inactive
                    },
                    auto_registration: new.auto_registration,
                    mode: new.mode,
                    registration_config: new.registration_config.clone(),
                    created: t,
                    modified: t,
                    generation: 1,
                    not_before: info.not_before.unix_timestamp() as f64,
                    not_after: info.not_after.unix_timestamp() as f64,
                    info: Some(info.clone()),
                    der: der.clone(),
                };
                tx.put(Kind::CaCertificate, &id, &ca)?;
                tx.cas_added.push(id.clone());
                a.ca_certificates.insert(id.clone(), ca.clone());
                Ok(ca)
            },
        )
    }

    /// DescribeCACertificate.
    pub fn describe_ca_certificate(&self, account: &str, id: &str) -> Result<CaCertificate> {
        self.read(account, |a| {
            a.ca_certificates.get(id).cloned().ok_or_else(|| {
                RegistryError::NotFound(format!("The CA certificate {id} does not exist"))
            })
        })
    }

    /// ListCACertificates, by creation date (descending unless `ascending`).
    pub fn list_ca_certificates(
        &self,
        account: &str,
        ascending: bool,
        marker: Option<&str>,
        page_size: usize,
    ) -> Result<Page<CaCertificate>> {
        self.read(account, |a| {
            page_by_creation(
                a.ca_certificates.values(),
                |c| (c.created, c.id.as_str()),
                CaCertificate::clone,
                ascending,
                marker,
                page_size,
            )
        })
    }

    /// UpdateCACertificate. Deactivating a CA refuses new connections of the certificates
    /// registered under it and cuts their live ones (change feed).
    pub fn update_ca_certificate(&self, account: &str, id: &str, update: CaUpdate) -> Result<()> {
        self.write(account, |a, tx| {
            let ca = a.ca_certificates.get_mut(id).ok_or_else(|| {
                RegistryError::NotFound(format!("The CA certificate {id} does not exist"))
            })?;
            let mut next = ca.clone();
            if let Some(s) = update.status {
                next.status = s;
            }
            if let Some(r) = update.auto_registration {
                next.auto_registration = r;
            }
            if let Some(c) = update.registration_config.clone() {
                next.registration_config = Some(c);
            }
            if update.remove_auto_registration {
                next.registration_config = None;
            }
            next.modified = now_secs();
            next.generation += 1;
            tx.put(Kind::CaCertificate, id, &next)?;
            if next.status != ca.status {
                tx.bump();
                tx.change(Change::CaCertificate {
                    account: account.to_owned(),
                    ca_certificate_id: id.to_owned(),
                    status: Some(next.status),
                });
            }
            *ca = next;
            Ok(())
        })
    }

    /// DeleteCACertificate: only an INACTIVE CA. Certificates registered under it stay
    /// registered but can no longer authenticate (their CA is gone).
    pub fn delete_ca_certificate(&self, account: &str, id: &str) -> Result<()> {
        self.write(account, |a, tx| {
            let ca = a.ca_certificates.get(id).ok_or_else(|| {
                RegistryError::NotFound(format!("The CA certificate {id} does not exist"))
            })?;
            if ca.status == CaStatus::Active {
                return Err(RegistryError::CertificateState(format!(
                    "The CA certificate must be deactivated (not ACTIVE) before deletion. Id: {id}"
                )));
            }
            tx.delete(Kind::CaCertificate, id);
            tx.cas_removed.push(id.to_owned());
            tx.bump();
            tx.change(Change::CaCertificate {
                account: account.to_owned(),
                ca_certificate_id: id.to_owned(),
                status: None,
            });
            a.ca_certificates.remove(id);
            Ok(())
        })
    }

    /// RegisterCertificate: a device certificate signed by a CA registered in the account,
    /// in the CA's mode. `ca_pem` picks the CA when several share the subject.
    pub fn register_certificate(
        &self,
        account: &str,
        pem: &str,
        ca_pem: Option<&str>,
        status: CertStatus,
        now: OffsetDateTime,
    ) -> Result<Certificate> {
        let (der, info) = parse_pem(pem, "certificate")?;
        if !info.valid_at(now) {
            return Err(validation("The certificate is expired or not yet valid"));
        }
        let wanted_ca = match ca_pem {
            Some(p) if !p.is_empty() => {
                let (ca_der, _) = parse_pem(p, "CA certificate")?;
                Some(sekisho_pki::certificate_id(&ca_der))
            }
            _ => None,
        };
        let (ca_id, mode) = self.read(account, |a| {
            if let Some(w) = &wanted_ca
                && !a.ca_certificates.contains_key(w)
            {
                return Err(validation("The CA certificate is not registered in this account"));
            }
            let issuers: Vec<&CaCertificate> = a
                .issuers_of(&der, &info)
                .filter(|c| wanted_ca.as_ref().is_none_or(|w| *w == c.id))
                .collect();
            match issuers.as_slice() {
                [] => Err(validation(
                    "The certificate is not signed by a CA certificate registered in this account",
                )),
                [ca] if ca.status != CaStatus::Active => Err(RegistryError::CertificateState(
                    format!("The CA certificate {} is not ACTIVE", ca.id),
                )),
                [ca] => Ok((ca.id.clone(), ca.mode)),
                _ => Err(RegistryError::CertificateConflict(
                    "More than one registered CA certificate has this subject and key; pass caCertificatePem".into(),
                )),
            }
        })?;
        self.add_certificate(
            account,
            NewCertificate {
                pem: pem.to_owned(),
                status,
                ca_certificate_id: Some(ca_id),
                mode,
                claim_template: None,
            },
        )
        .map(|(c, _)| c)
    }

    /// RegisterCertificateWithoutCA: SNI_ONLY, no issuer check.
    pub fn register_certificate_without_ca(
        &self,
        account: &str,
        pem: &str,
        status: CertStatus,
        now: OffsetDateTime,
    ) -> Result<Certificate> {
        let (_, info) = parse_pem(pem, "certificate")?;
        if !info.valid_at(now) {
            return Err(validation("The certificate is expired or not yet valid"));
        }
        self.add_certificate(
            account,
            NewCertificate {
                pem: pem.to_owned(),
                status,
                ca_certificate_id: None,
                mode: CertMode::SniOnly,
                claim_template: None,
            },
        )
        .map(|(c, _)| c)
    }

    /// Just-in-time registration: registers `der` PENDING_ACTIVATION under `ca_id` (the
    /// CA's mode). Idempotent: a certificate registered meanwhile is returned as it is.
    pub fn auto_register(&self, account: &str, der: &[u8], ca_id: &str) -> Result<Certificate> {
        let mode = self.read(account, |a| {
            a.ca_certificates
                .get(ca_id)
                .map(|c| c.mode)
                .ok_or_else(|| RegistryError::NotFound(format!("CA {ca_id} does not exist")))
        })?;
        match self.add_certificate(
            account,
            NewCertificate {
                pem: sekisho_pki::der_to_pem(der),
                status: CertStatus::PendingActivation,
                ca_certificate_id: Some(ca_id.to_owned()),
                mode,
                claim_template: None,
            },
        ) {
            Err(RegistryError::AlreadyExists { resource_id, .. }) => {
                self.describe_certificate(account, &resource_id)
            }
            other => other.map(|(c, _)| c),
        }
    }

    /// Authenticates a presented client certificate (validity already checked) for a route.
    /// Reads memory only. Parses the certificate only when it is not registered (to look for
    /// an auto-registering CA).
    pub fn authenticate(&self, route: Route<'_>, der: &[u8]) -> Authentication {
        let id = sekisho_pki::certificate_id(der);
        self.read_state(|st| {
            let registered = cert_key(&id).and_then(|k| st.cert_accounts.get(&k));
            let account = match route {
                Route::Account(acct) => registered.filter(|s| s.contains(acct)).map(|_| acct),
                Route::ByCertificate => registered.and_then(|s| {
                    s.iter()
                        .find(|acct| {
                            st.accounts
                                .get(&***acct)
                                .and_then(|a| a.certificates.get(&id))
                                .is_some_and(|c| c.mode == CertMode::Default)
                        })
                        .map(|a| &**a)
                }),
            };
            let Some(account) = account else {
                // Not registered here: just-in-time registration needs the server name to
                // name the account (AWS requires SNI for it).
                if let Route::Account(acct) = route
                    && let Some(a) = st.accounts.get(acct)
                    && !a.ca_certificates.is_empty()
                    && let Ok(info) = sekisho_pki::CertInfo::parse(der)
                    && let Some(ca) = a
                        .issuers_of(der, &info)
                        .find(|c| c.status == CaStatus::Active && c.auto_registration)
                {
                    return Authentication::AutoRegister {
                        account: AccountId::new(acct),
                        ca_certificate_id: ca.id.clone(),
                    };
                }
                return Authentication::Refused(format!(
                    "certificate {id} is not registered for this endpoint"
                ));
            };
            let Some(cert) = st
                .accounts
                .get(account)
                .and_then(|a| a.certificates.get(&id))
            else {
                return Authentication::Refused(format!("certificate {id} vanished"));
            };
            if let Some(ca_id) = &cert.ca_certificate_id {
                match st
                    .accounts
                    .get(account)
                    .and_then(|a| a.ca_certificates.get(ca_id))
                {
                    Some(ca) if ca.status == CaStatus::Active => {}
                    Some(_) => {
                        return Authentication::Refused(format!(
                            "certificate {id}: its CA {ca_id} is INACTIVE"
                        ));
                    }
                    None => {
                        return Authentication::Refused(format!(
                            "certificate {id}: its CA {ca_id} is no longer registered"
                        ));
                    }
                }
            }
            match cert.status {
                CertStatus::Active => Authentication::Active {
                    account: AccountId::new(account),
                    certificate_id: CertificateId::new(id),
                },
                CertStatus::PendingActivation if cert.ca_certificate_id.is_some() => {
                    Authentication::PendingActivation {
                        account: AccountId::new(account),
                        ca_certificate_id: cert.ca_certificate_id.clone().unwrap_or_default(),
                        certificate_id: CertificateId::new(id),
                    }
                }
                s => Authentication::Refused(format!("certificate {id} is {}", s.as_str())),
            }
        })
    }

    /// Whether a registered certificate may still act, as a connection already authenticated
    /// with it must re-check on every request: it is registered in the account, ACTIVE, and its
    /// CA (if any) is still registered and ACTIVE.
    pub fn certificate_usable(
        &self,
        account: &AccountId,
        certificate_id: &CertificateId,
    ) -> std::result::Result<(), Unusable> {
        self.read_state(|st| {
            let a = st
                .accounts
                .get(account.as_str())
                .ok_or(Unusable::AccountGone)?;
            let cert = a
                .certificates
                .get(certificate_id.as_str())
                .ok_or(Unusable::Deleted)?;
            if cert.status != CertStatus::Active {
                return Err(Unusable::NotActive(cert.status));
            }
            if let Some(ca_id) = &cert.ca_certificate_id {
                match a.ca_certificates.get(ca_id) {
                    Some(ca) if ca.status == CaStatus::Active => {}
                    Some(_) => return Err(Unusable::CaInactive(ca_id.clone())),
                    None => return Err(Unusable::CaDeleted(ca_id.clone())),
                }
            }
            Ok(())
        })
    }

    /// The ids of the certificates registered under a CA (to cut their connections).
    pub fn certificates_of_ca(&self, account: &str, ca_id: &str) -> Vec<String> {
        self.read(account, |a| {
            Ok(a.certificates
                .values()
                .filter(|c| c.ca_certificate_id.as_deref() == Some(ca_id))
                .map(|c| c.id.clone())
                .collect())
        })
        .unwrap_or_default()
    }
}

/// Why a registered certificate can no longer act ([`Registry::certificate_usable`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// Its account no longer exists.
    #[error("the account is gone")]
    AccountGone,
    /// The certificate was deleted.
    #[error("the certificate was deleted")]
    Deleted,
    /// The certificate left ACTIVE.
    #[error("the certificate is {}", .0.as_str())]
    NotActive(CertStatus),
    /// Its CA was deactivated.
    #[error("its CA {0} is INACTIVE")]
    CaInactive(String),
    /// Its CA was deleted.
    #[error("its CA {0} is no longer registered")]
    CaDeleted(String),
}
