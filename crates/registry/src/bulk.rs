//! Generated registries for the benchmarks (issue 15: the registry at fleet scale): many
//! devices loaded at once, each a thing, an ACTIVE certificate (DEFAULT mode, as
//! CreateKeysAndCertificate leaves one: the certificates are new, so no other account holds
//! them), the thing–certificate attachment and one policy on the certificate, as CreateThing,
//! CreateKeysAndCertificate, AttachThingPrincipal and AttachPolicy would leave them, but in
//! one transaction per call instead of four per device. Not an API: the load tool calls it on
//! a data directory no server has open.

use crate::store::Kind;
use crate::*;

/// One device of [`Registry::bulk_load_devices`].
#[derive(Debug, Clone)]
pub struct BulkDevice {
    /// The thing's name.
    pub thing: String,
    /// Its certificate, PEM.
    pub cert_pem: String,
}

impl Registry {
    /// Loads `devices` into `account` with `policy` (which must exist) attached to each
    /// certificate. Devices whose thing or certificate exists already are skipped; returns
    /// how many were added.
    pub fn bulk_load_devices(
        &self,
        account: &str,
        policy: &str,
        devices: &[BulkDevice],
    ) -> Result<usize> {
        let now = now_secs();
        let mut parsed = Vec::with_capacity(devices.len());
        for d in devices {
            check_name("Thing name", &d.thing, 128, crate::things::thing_name_char)?;
            let der = sekisho_pki::pem_to_der(&d.cert_pem)
                .map_err(|e| RegistryError::CertificateValidation(e.to_string()))?;
            let info = sekisho_pki::CertInfo::parse(&der)
                .map_err(|e| RegistryError::CertificateValidation(e.to_string()))?;
            let id = sekisho_pki::certificate_id(&der);
            let pem = sekisho_pki::der_to_pem(&der);
            let cert = Certificate {
                id: id.clone(),
                status: CertStatus::Active,
                ca_certificate_id: None,
                mode: CertMode::Default,
                created: now,
                modified: now,
                generation: 1,
                not_before: info.not_before.unix_timestamp() as f64,
                not_after: info.not_after.unix_timestamp() as f64,
                claim_template: None,
            };
            parsed.push((d.thing.clone(), cert, pem));
        }
        self.write(account, |a, tx| {
            if !a.policies.contains_key(policy) {
                return Err(RegistryError::NotFound(format!(
                    "Policy {policy} does not exist"
                )));
            }
            let mut added = 0;
            for (name, cert, pem) in parsed.clone() {
                if a.things.contains_key(name.as_str()) || a.certificates.contains_key(&cert.id) {
                    continue;
                }
                let arn = self.arn(account, &format!("cert/{}", cert.id));
                let thing = Thing {
                    name: name.clone(),
                    id: ThingId::random(),
                    thing_type: None,
                    attributes: BTreeMap::new(),
                    version: 1,
                    created: now,
                };
                tx.put(Kind::Thing, &name, &thing)?;
                a.things.insert(name.as_str().into(), thing);
                tx.put(
                    Kind::Certificate,
                    &cert.id,
                    &StoredCertificate {
                        cert: &cert,
                        pem: &pem,
                    },
                )?;
                tx.certs_added.push(cert.id.clone());
                a.track_certificate(&cert);
                a.certificates.insert(cert);
                let kind = ThingPrincipalType::NonExclusiveThing;
                tx.put(Kind::ThingPrincipal, &format!("{name}\n{arn}"), &kind)?;
                a.link(&name, &arn, kind);
                tx.put(Kind::PolicyAttachment, &format!("{policy}\n{arn}"), &"")?;
                let (key, name) = (a.intern(&arn), a.policy_name(policy));
                a.policy_targets.entry(key).or_default().insert(name);
                added += 1;
            }
            tx.bump();
            Ok(added)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the bulk load leaves is what the API calls would: the device is its thing's
    /// principal, its policy applies, and it survives a reopen.
    #[test]
    fn bulk_devices_are_whole_devices() {
        let dir = std::env::temp_dir().join(format!("sekisho-bulk-{}", crate::things::uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.db");
        let now = time::OffsetDateTime::now_utc();
        let ca = sekisho_pki::Ca::generate("t", "t", now).unwrap();
        let devices: Vec<BulkDevice> = (0..3)
            .map(|i| BulkDevice {
                thing: format!("dev-{i}"),
                cert_pem: ca
                    .issue_named(&format!("dev-{i}"), sekisho_pki::KeyKind::EcdsaP256, now)
                    .unwrap()
                    .cert_pem,
            })
            .collect();
        let account = {
            let r = Registry::open(&path, "us-east-1").unwrap();
            let (a, _) = r.create_account("a").unwrap();
            assert!(r.bulk_load_devices(&a.id, "missing", &devices).is_err());
            r.create_policy(&a.id, "p", r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}"#)
                .unwrap();
            assert_eq!(r.bulk_load_devices(&a.id, "p", &devices).unwrap(), 3);
            assert_eq!(
                r.bulk_load_devices(&a.id, "p", &devices).unwrap(),
                0,
                "loaded once"
            );
            r.flush().unwrap();
            a.id
        };
        let r = Registry::open(&path, "us-east-1").unwrap();
        let der = sekisho_pki::pem_to_der(&devices[1].cert_pem).unwrap();
        let id = sekisho_pki::certificate_id(&der);
        let c = r.describe_certificate(&account, &id).unwrap();
        assert_eq!(c.status, CertStatus::Active);
        let arn = r.arn(&account, &format!("cert/{id}"));
        let things = r
            .list_principal_things(&account, &arn, None, 10)
            .unwrap()
            .items;
        assert_eq!(
            things,
            vec![("dev-1".to_string(), ThingPrincipalType::NonExclusiveThing)]
        );
        let policies = r
            .list_attached_policies(&account, &arn, false, None, 10)
            .unwrap()
            .items;
        assert_eq!(
            policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            vec!["p"]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod provisioning_index_tests {
    use super::*;

    /// The certificates fleet provisioning looks after are found through their index, which
    /// follows them: a pending certificate is in it until it is activated or deleted, a claim
    /// until it is deleted, an active one never; and it is rebuilt at load.
    #[test]
    fn the_provisioning_index_follows_its_certificates() {
        let dir =
            std::env::temp_dir().join(format!("sekisho-index-{}", crate::things::uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.db");
        let now = time::OffsetDateTime::now_utc();
        let ca = sekisho_pki::Ca::generate("t", "t", now).unwrap();
        let pem = |n: &str| {
            ca.issue_named(n, sekisho_pki::KeyKind::EcdsaP256, now)
                .unwrap()
                .cert_pem
        };
        let new = |pem: String, status, claim: Option<&str>| NewCertificate {
            pem,
            status,
            ca_certificate_id: None,
            mode: CertMode::Default,
            claim_template: claim.map(str::to_owned),
        };
        let later = now_secs() + 10.0;
        let r = Registry::open(&path, "us-east-1").unwrap();
        let (a, _) = r.create_account("a").unwrap();
        let pending = r
            .add_certificate(&a.id, new(pem("p"), CertStatus::PendingActivation, None))
            .unwrap()
            .0;
        let other = r
            .add_certificate(&a.id, new(pem("q"), CertStatus::PendingActivation, None))
            .unwrap()
            .0;
        r.add_certificate(&a.id, new(pem("x"), CertStatus::Active, None))
            .unwrap();
        let claim = r
            .add_certificate(&a.id, new(pem("c"), CertStatus::Active, Some("tmpl")))
            .unwrap()
            .0;
        assert_eq!(r.pending_certificates(&a.id), 2);
        assert_eq!(r.stale_pending_certificates(later).len(), 2);
        r.update_certificate(&a.id, &pending.id, CertStatus::Active)
            .unwrap();
        assert_eq!(r.pending_certificates(&a.id), 1);
        let expired = r.expired_claims(claim.not_after + 1.0);
        assert_eq!(expired, vec![(a.id.clone(), claim.id.clone())]);
        r.flush().unwrap();
        drop(r);
        let r = Registry::open(&path, "us-east-1").unwrap();
        assert_eq!(
            r.stale_pending_certificates(later),
            vec![(a.id.clone(), other.id.clone())]
        );
        assert_eq!(r.expired_claims(claim.not_after + 1.0).len(), 1);
        r.delete_certificate(&a.id, &other.id, false).unwrap();
        assert_eq!(r.pending_certificates(&a.id), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
