//! Device certificates.

use std::sync::Arc;

use crate::store::Kind;
use crate::*;

fn parse_info(pem: &str) -> Option<Arc<sekisho_pki::CertInfo>> {
    let der = sekisho_pki::pem_to_der(pem).ok()?;
    sekisho_pki::CertInfo::parse(&der).ok().map(Arc::new)
}

/// A certificate's stored PEM: it is written once, with the certificate, and never changes.
fn stored_pem(store: &crate::store::Store, account: &str, id: &str) -> Result<Option<String>> {
    match store.get(Kind::Certificate, account, id)? {
        Some(doc) => Ok(Some(decode::<StoredPem>(&doc)?.pem)),
        None => Ok(None),
    }
}

/// A certificate to register.
#[derive(Debug, Clone)]
pub struct NewCertificate {
    /// PEM of the certificate.
    pub pem: String,
    /// Initial status.
    pub status: CertStatus,
    /// Issuing CA registration, if any.
    pub ca_certificate_id: Option<String>,
    /// Mode.
    pub mode: CertMode,
    /// A provisioning claim for this template (CreateProvisioningClaim).
    pub claim_template: Option<String>,
}

impl Registry {
    /// Registers a certificate (CreateKeysAndCertificate, CreateCertificateFromCsr,
    /// RegisterCertificate). Returns it and its PEM (normalised).
    pub fn add_certificate(
        &self,
        account: &str,
        new: NewCertificate,
    ) -> Result<(Certificate, String)> {
        let der = sekisho_pki::pem_to_der(&new.pem)
            .map_err(|e| RegistryError::CertificateValidation(e.to_string()))?;
        let info = sekisho_pki::CertInfo::parse(&der)
            .map_err(|e| RegistryError::CertificateValidation(e.to_string()))?;
        let id = sekisho_pki::certificate_id(&der);
        let default_mode = new.mode == CertMode::Default;
        let check = |st: &State| {
            // A DEFAULT-mode certificate identifies its account without SNI: one account only.
            if default_mode
                && cert_key(&id)
                    .and_then(|k| st.cert_accounts.get(&k))
                    .is_some_and(|accts| {
                        accts.iter().any(|other| {
                            **other != *account
                                && st.accounts.get(&**other).is_some_and(|a| {
                                    a.certificates
                                        .get(&id)
                                        .is_some_and(|c| c.mode == CertMode::Default)
                                })
                        })
                    })
            {
                return Err(RegistryError::InvalidRequest(
                    "This request is not valid: the certificate is registered in DEFAULT mode in another account".into(),
                ));
            }
            Ok(())
        };
        self.write_checked(account, check, |a, tx| {
            if a.certificates.contains_key(&id) {
                return Err(RegistryError::AlreadyExists {
                    message: "The certificate is already provisioned or registered".into(),
                    resource_id: id.clone(),
                    resource_arn: self.arn(account, &format!("cert/{id}")),
                });
            }
            let now = now_secs();
            let pem = sekisho_pki::der_to_pem(&der);
            let cert = Certificate {
                id: id.clone(),
                status: new.status,
                ca_certificate_id: new.ca_certificate_id.clone(),
                mode: new.mode,
                created: now,
                modified: now,
                generation: 1,
                not_before: info.not_before.unix_timestamp() as f64,
                not_after: info.not_after.unix_timestamp() as f64,
                claim_template: new.claim_template.clone(),
            };
            tx.put(
                Kind::Certificate,
                &id,
                &StoredCertificate {
                    cert: &cert,
                    pem: &pem,
                },
            )?;
            tx.certs_added.push(id.clone());
            a.certificates.insert(cert.clone());
            a.track_certificate(&cert);
            Ok((cert, pem))
        })
    }

    /// A certificate's PEM (DescribeCertificate, provisioning): read from the database, as
    /// memory does not keep it (decision 0002, addendum of 2026-12).
    pub fn certificate_pem(&self, account: &str, id: &str) -> Result<String> {
        let store = self
            .reader
            .as_ref()
            .unwrap_or(&self.store)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        stored_pem(&store, account, id)?
            .ok_or_else(|| RegistryError::NotFound(format!("The certificate {id} does not exist")))
    }

    /// A certificate's parsed identity fields (the `iot:Certificate.*` policy variables,
    /// provisioning template parameters), parsed from its stored PEM. Every failure is an
    /// error (gone, unreadable, unparseable), never "no fields": callers must not decide as
    /// if the fields were absent, since a policy condition on a missing value can allow.
    pub fn certificate_info(&self, account: &str, id: &str) -> Result<Arc<sekisho_pki::CertInfo>> {
        parse_info(&self.certificate_pem(account, id)?).ok_or_else(|| {
            RegistryError::Internal(format!("the stored certificate {id} does not parse"))
        })
    }

    /// DescribeCertificate.
    pub fn describe_certificate(&self, account: &str, id: &str) -> Result<Certificate> {
        self.read(account, |a| {
            a.certificates.get(id).cloned().ok_or_else(|| {
                RegistryError::NotFound(format!("The certificate {id} does not exist"))
            })
        })
    }

    /// ListCertificates, by creation date (descending unless `ascending`).
    pub fn list_certificates(
        &self,
        account: &str,
        ca: Option<&str>,
        ascending: bool,
        marker: Option<&str>,
        page_size: usize,
    ) -> Result<Page<Certificate>> {
        self.read(account, |a| {
            page_by_creation(
                a.certificates
                    .values()
                    // Provisioning claims are not listed (as on AWS).
                    .filter(|c| c.claim_template.is_none())
                    .filter(|c| ca.is_none_or(|ca| c.ca_certificate_id.as_deref() == Some(ca))),
                |c| (c.created, c.id.as_str()),
                Certificate::clone,
                ascending,
                marker,
                page_size,
            )
        })
    }

    /// UpdateCertificate. PENDING_TRANSFER and PENDING_ACTIVATION cannot be set by callers;
    /// the change reaches live connections through the change feed.
    pub fn update_certificate(&self, account: &str, id: &str, status: CertStatus) -> Result<()> {
        self.set_certificate_status(account, id, status, None)
    }

    /// UpdateCertificate's change, made only while the certificate's status is `only_from`
    /// when that is given (provisioning activates only a certificate still waiting for it).
    pub(crate) fn set_certificate_status(
        &self,
        account: &str,
        id: &str,
        status: CertStatus,
        only_from: Option<CertStatus>,
    ) -> Result<()> {
        if matches!(
            status,
            CertStatus::PendingTransfer | CertStatus::PendingActivation
        ) {
            return Err(RegistryError::InvalidRequest(format!(
                "The status {} cannot be set through UpdateCertificate",
                status.as_str()
            )));
        }
        self.write(account, |a, tx| {
            let c = a.certificates.get_mut(id).ok_or_else(|| {
                RegistryError::NotFound(format!("The certificate {id} does not exist"))
            })?;
            if c.status == CertStatus::PendingTransfer {
                return Err(RegistryError::CertificateState(format!(
                    "The certificate {id} is pending transfer and cannot be updated"
                )));
            }
            if let Some(from) = only_from
                && c.status != from
            {
                return Err(RegistryError::CertificateState(format!(
                    "The certificate {id} is {} now, not {}",
                    c.status.as_str(),
                    from.as_str()
                )));
            }
            if c.status == status {
                return Ok(());
            }
            // Revocation is final: a revoked certificate (a leaked key) never authenticates
            // again, whoever holds UpdateCertificate.
            if c.status == CertStatus::Revoked {
                return Err(RegistryError::CertificateState(format!(
                    "The certificate {id} is REVOKED; its status cannot be changed"
                )));
            }
            let mut next = c.clone();
            next.status = status;
            next.modified = now_secs();
            next.generation += 1;
            // The stored document keeps its PEM (memory has none): only the members memory
            // holds are written, so a revocation never needs to read anything first.
            tx.patch(Kind::Certificate, id, &next)?;
            tx.bump();
            tx.change(Change::Certificate {
                account: account.to_owned(),
                certificate_id: id.to_owned(),
                status: Some(status),
            });
            let tracked = next.clone();
            *c = next;
            a.track_certificate(&tracked);
            Ok(())
        })
    }

    /// DeleteCertificate, with AWS's preconditions: not ACTIVE; no thing attached; no policy
    /// attached unless `force`.
    pub fn delete_certificate(&self, account: &str, id: &str, force: bool) -> Result<()> {
        let arn = self.arn(account, &format!("cert/{id}"));
        self.write(account, |a, tx| {
            let c = a.certificates.get(id).ok_or_else(|| {
                RegistryError::NotFound(format!("The certificate {id} does not exist"))
            })?;
            if c.status == CertStatus::Active {
                return Err(RegistryError::CertificateState(format!(
                    "Certificate must be deactivated (not ACTIVE) before deletion. Id: {id}"
                )));
            }
            if a.principal_things
                .get(arn.as_str())
                .is_some_and(|m| !m.is_empty())
            {
                return Err(RegistryError::DeleteConflict(format!(
                    "Things must be detached before deletion (arn: {arn})"
                )));
            }
            let policies = a
                .policy_targets
                .get(arn.as_str())
                .cloned()
                .unwrap_or_default();
            if !policies.is_empty() && !force {
                return Err(RegistryError::DeleteConflict(format!(
                    "Certificate policies must be detached before deletion (arn: {arn})"
                )));
            }
            for p in &policies {
                tx.delete(Kind::PolicyAttachment, &format!("{p}\n{arn}"));
            }
            tx.delete(Kind::Certificate, id);
            tx.certs_removed.push(id.to_owned());
            tx.bump();
            tx.change(Change::Certificate {
                account: account.to_owned(),
                certificate_id: id.to_owned(),
                status: None,
            });
            a.policy_targets.remove(arn.as_str());
            a.certificates.remove(id);
            a.provisioning_certs.remove(id);
            Ok(())
        })
    }
}
