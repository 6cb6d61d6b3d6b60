#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use sekisho_pki::{Ca, KeyKind};
use sekisho_registry::*;

const DOC: &str =
    r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*"}}"#;

fn cert_pem() -> String {
    let now = time::OffsetDateTime::now_utc();
    let ca = Ca::generate("Test CA", "Test", now).unwrap();
    ca.issue_device(KeyKind::EcdsaP256, now).unwrap().cert_pem
}

fn new_cert(r: &Registry, acct: &str) -> Certificate {
    r.add_certificate(
        acct,
        NewCertificate {
            pem: cert_pem(),
            status: CertStatus::Active,
            ca_certificate_id: None,
            mode: CertMode::Default,
            claim_template: None,
        },
    )
    .unwrap()
    .0
}

#[test]
fn survives_reopen() {
    let dir = std::env::temp_dir().join(format!("sekisho-reg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("registry.db");
    let _ = std::fs::remove_file(&path);
    let (acct, cert_id) = {
        let r = Registry::open(&path, "us-east-1").unwrap();
        let (a, _) = r.create_account("default").unwrap();
        let mut attrs = BTreeMap::new();
        attrs.insert("floor".to_string(), "3".to_string());
        r.create_thing_type(&a.id, "sensor", Some("d".into()), vec![])
            .unwrap();
        r.create_thing(&a.id, "t1", Some("sensor"), attrs).unwrap();
        let c = new_cert(&r, &a.id);
        let arn = r.arn(&a.id, &format!("cert/{}", c.id));
        r.create_policy(&a.id, "p", DOC).unwrap();
        r.create_policy_version(&a.id, "p", DOC, true).unwrap();
        r.attach_policy(&a.id, "p", &arn).unwrap();
        r.attach_thing_principal(&a.id, "t1", &arn, ThingPrincipalType::ExclusiveThing)
            .unwrap();
        r.flush().unwrap();
        (a.id, c.id)
    };
    let r = Registry::open(&path, "us-east-1").unwrap();
    assert_eq!(r.accounts().len(), 1);
    let t = r.describe_thing(&acct, "t1").unwrap();
    assert_eq!(t.attributes.get("floor").map(String::as_str), Some("3"));
    let p = r.get_policy(&acct, "p").unwrap();
    assert_eq!(p.default_version, 2);
    assert!(
        p.default_parsed().is_some(),
        "parsed documents are rebuilt on load"
    );
    let id = r
        .certificate_identity(
            &AccountId::new(acct.clone()),
            &CertificateId::new(cert_id.clone()),
            Some(&ClientId::new("other-client")),
        )
        .unwrap();
    assert_eq!(
        id.thing.as_ref().map(|t| t.name.as_str()),
        Some("t1"),
        "exclusive thing regardless of client id"
    );
    assert_eq!(id.policies.len(), 1);
    assert_eq!(r.certificate_accounts(&cert_id), vec![acct.clone()]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Memory keeps no certificate PEM: it is read from the database when asked, and stays there
/// through status changes and a reopen; a deleted certificate has none, and the same PEM
/// registered again is readable again.
#[test]
fn certificate_pem_is_read_from_the_database() {
    let dir = std::env::temp_dir().join(format!("sekisho-pem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("registry.db");
    let _ = std::fs::remove_file(&path);
    let pem = cert_pem();
    let add = |r: &Registry, acct: &str| {
        r.add_certificate(
            acct,
            NewCertificate {
                pem: pem.clone(),
                status: CertStatus::Active,
                ca_certificate_id: None,
                mode: CertMode::Default,
                claim_template: None,
            },
        )
        .unwrap()
    };
    let (acct, id) = {
        let r = Registry::open(&path, "us-east-1").unwrap();
        let (a, _) = r.create_account("default").unwrap();
        let (c, stored) = add(&r, &a.id);
        assert_eq!(stored.trim(), pem.trim());
        assert_eq!(r.certificate_pem(&a.id, &c.id).unwrap(), stored);
        r.update_certificate(&a.id, &c.id, CertStatus::Inactive)
            .unwrap();
        assert_eq!(r.certificate_pem(&a.id, &c.id).unwrap(), stored);
        (a.id, c.id)
    };
    let r = Registry::open(&path, "us-east-1").unwrap();
    assert_eq!(
        r.describe_certificate(&acct, &id).unwrap().status,
        CertStatus::Inactive
    );
    assert_eq!(r.certificate_pem(&acct, &id).unwrap().trim(), pem.trim());
    let info = r.certificate_info(&acct, &id).expect("parsed from the PEM");
    assert!(!info.serial.is_empty());
    assert!(matches!(
        r.certificate_pem(&acct, "0".repeat(64).as_str()),
        Err(RegistryError::NotFound(_))
    ));
    r.delete_certificate(&acct, &id, false).unwrap();
    assert!(matches!(
        r.certificate_pem(&acct, &id),
        Err(RegistryError::NotFound(_))
    ));
    assert!(matches!(
        r.certificate_info(&acct, &id),
        Err(RegistryError::NotFound(_))
    ));
    let (again, _) = add(&r, &acct);
    assert_eq!(again.id, id);
    assert_eq!(r.certificate_pem(&acct, &id).unwrap().trim(), pem.trim());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn thing_association_follows_client_id() {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    let c = new_cert(&r, &a.id);
    let arn = r.arn(&a.id, &format!("cert/{}", c.id));
    r.create_thing(&a.id, "t1", None, BTreeMap::new()).unwrap();
    r.create_thing(&a.id, "t2", None, BTreeMap::new()).unwrap();
    r.attach_thing_principal(&a.id, "t1", &arn, ThingPrincipalType::NonExclusiveThing)
        .unwrap();
    r.attach_thing_principal(&a.id, "t2", &arn, ThingPrincipalType::NonExclusiveThing)
        .unwrap();
    let id = r
        .certificate_identity(
            &AccountId::new(a.id.clone()),
            &CertificateId::new(c.id.clone()),
            Some(&ClientId::new("t2")),
        )
        .unwrap();
    assert_eq!(id.thing.unwrap().name, "t2");
    let id = r
        .certificate_identity(
            &AccountId::new(a.id.clone()),
            &CertificateId::new(c.id.clone()),
            Some(&ClientId::new("nope")),
        )
        .unwrap();
    assert!(id.thing.is_none());
    // An exclusive attachment is refused while another thing is attached.
    assert!(matches!(
        r.attach_thing_principal(&a.id, "t1", &arn, ThingPrincipalType::ExclusiveThing),
        Err(RegistryError::InvalidRequest(_))
    ));
}

#[test]
fn delete_preconditions() {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    let c = new_cert(&r, &a.id);
    let arn = r.arn(&a.id, &format!("cert/{}", c.id));
    r.create_thing(&a.id, "t", None, BTreeMap::new()).unwrap();
    r.create_policy(&a.id, "p", DOC).unwrap();
    r.attach_policy(&a.id, "p", &arn).unwrap();
    r.attach_thing_principal(&a.id, "t", &arn, ThingPrincipalType::NonExclusiveThing)
        .unwrap();

    assert!(matches!(
        r.delete_certificate(&a.id, &c.id, false),
        Err(RegistryError::CertificateState(_))
    ));
    r.update_certificate(&a.id, &c.id, CertStatus::Inactive)
        .unwrap();
    assert!(
        matches!(
            r.delete_certificate(&a.id, &c.id, true),
            Err(RegistryError::DeleteConflict(_))
        ),
        "thing attached"
    );
    assert!(
        matches!(r.delete_thing(&a.id, "t", None), Err(RegistryError::InvalidRequest(m)) if m.contains("still attached"))
    );
    r.detach_thing_principal(&a.id, "t", &arn).unwrap();
    assert!(
        matches!(
            r.delete_certificate(&a.id, &c.id, false),
            Err(RegistryError::DeleteConflict(_))
        ),
        "policy attached"
    );
    assert!(matches!(
        r.delete_policy(&a.id, "p"),
        Err(RegistryError::DeleteConflict(_))
    ));
    r.delete_certificate(&a.id, &c.id, true).unwrap();
    r.delete_policy(&a.id, "p").unwrap();
    r.delete_thing(&a.id, "t", None).unwrap();
    r.delete_thing(&a.id, "t", None).unwrap(); // absent: still 200
}

#[test]
fn policy_version_limit_at_n_and_n_plus_1() {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    r.create_policy(&a.id, "p", DOC).unwrap();
    for _ in 1..MAX_POLICY_VERSIONS {
        r.create_policy_version(&a.id, "p", DOC, false).unwrap();
    }
    assert_eq!(
        r.get_policy(&a.id, "p").unwrap().versions.len(),
        MAX_POLICY_VERSIONS
    );
    assert!(matches!(
        r.create_policy_version(&a.id, "p", DOC, false),
        Err(RegistryError::VersionsLimitExceeded(_))
    ));
    assert!(matches!(
        r.delete_policy_version(&a.id, "p", "1"),
        Err(RegistryError::DeleteConflict(_))
    ));
    r.delete_policy_version(&a.id, "p", "2").unwrap();
    let (_, v) = r.create_policy_version(&a.id, "p", DOC, true).unwrap();
    assert_eq!(v, 6, "version ids keep increasing");
}

#[test]
fn policy_size_limit_at_n_and_n_plus_1() {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    let base = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"arn:"#;
    let tail = r#""}}"#;
    let fill = 2048 - base.len() - tail.len();
    let doc = format!("{base}{}{tail}", "x".repeat(fill));
    assert_eq!(sekisho_policy::non_whitespace_len(&doc), 2048);
    r.create_policy(&a.id, "ok", &format!("  {doc}\n")).unwrap();
    let doc = format!("{base}{}{tail}", "x".repeat(fill + 1));
    assert!(matches!(
        r.create_policy(&a.id, "big", &doc),
        Err(RegistryError::MalformedPolicy(_))
    ));
}

#[test]
fn policies_per_target_limit_at_n_and_n_plus_1() {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    let c = new_cert(&r, &a.id);
    let arn = r.arn(&a.id, &format!("cert/{}", c.id));
    for i in 0..=MAX_POLICIES_PER_TARGET {
        r.create_policy(&a.id, &format!("p{i}"), DOC).unwrap();
    }
    for i in 0..MAX_POLICIES_PER_TARGET {
        r.attach_policy(&a.id, &format!("p{i}"), &arn).unwrap();
    }
    let last = format!("p{MAX_POLICIES_PER_TARGET}");
    assert!(matches!(
        r.attach_policy(&a.id, &last, &arn),
        Err(RegistryError::LimitExceeded(_))
    ));
}

#[test]
fn changes_reach_the_feed_and_generation() {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    let c = new_cert(&r, &a.id);
    let mut rx = r.subscribe();
    let g0 = r.generation();
    r.create_policy(&a.id, "p", DOC).unwrap();
    r.attach_policy(&a.id, "p", &r.arn(&a.id, &format!("cert/{}", c.id)))
        .unwrap();
    assert!(r.generation() > g0);
    r.update_certificate(&a.id, &c.id, CertStatus::Revoked)
        .unwrap();
    assert_eq!(
        rx.try_recv().unwrap(),
        Change::Certificate {
            account: a.id.clone(),
            certificate_id: c.id.clone(),
            status: Some(CertStatus::Revoked)
        }
    );
}

#[test]
fn accounts_are_isolated() {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    let (b, _) = r.create_account("b").unwrap();
    r.create_thing(&a.id, "t", None, BTreeMap::new()).unwrap();
    assert!(matches!(
        r.describe_thing(&b.id, "t"),
        Err(RegistryError::NotFound(_))
    ));
    let c = new_cert(&r, &a.id);
    assert!(r.describe_certificate(&b.id, &c.id).is_err());
    let arn_in_a = r.arn(&a.id, &format!("cert/{}", c.id));
    r.create_policy(&b.id, "p", DOC).unwrap();
    assert!(
        r.attach_policy(&b.id, "p", &arn_in_a).is_err(),
        "another account's certificate is not a principal here"
    );
}

#[test]
fn thing_names_and_attributes_validated() {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    assert!(
        r.create_thing(&a.id, &"x".repeat(128), None, BTreeMap::new())
            .is_ok()
    );
    assert!(
        r.create_thing(&a.id, &"x".repeat(129), None, BTreeMap::new())
            .is_err()
    );
    assert!(
        r.create_thing(&a.id, "bad name", None, BTreeMap::new())
            .is_err()
    );
    let attrs = |n: usize| {
        (0..n)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    assert!(r.create_thing(&a.id, "three", None, attrs(3)).is_ok());
    assert!(r.create_thing(&a.id, "four", None, attrs(4)).is_err());
    // Idempotent for the same configuration, conflict otherwise.
    assert!(r.create_thing(&a.id, "three", None, attrs(3)).is_ok());
    assert!(matches!(
        r.create_thing(&a.id, "three", None, attrs(2)),
        Err(RegistryError::AlreadyExists { .. })
    ));
}

#[test]
fn iam_identities_and_sessions_survive_reopen() {
    let dir = std::env::temp_dir().join(format!("sekisho-iam-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("registry.db");
    let _ = std::fs::remove_file(&path);
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"111111111111"},"Action":"sts:AssumeRole"}]}"#;
    let (acct, key, session) = {
        let r = Registry::open(&path, "us-east-1").unwrap();
        let (a, _) = r.create_account("default").unwrap();
        r.create_user(&a.id, "alice", None).unwrap();
        r.put_inline_policy(&a.id, false, "alice", "p", DOC)
            .unwrap();
        let key = r.create_access_key(&a.id, Some("alice")).unwrap();
        r.create_role(&a.id, "ops", None, trust, None, Some(7200))
            .unwrap();
        let s = r
            .create_session(
                &a.id,
                IamPrincipal::Role {
                    role: "ops".into(),
                    session: "s".into(),
                },
                900,
                None,
            )
            .unwrap();
        r.flush().unwrap();
        (a.id, key, s)
    };
    let r = Registry::open(&path, "us-east-1").unwrap();
    let c = r.credential(&key.access_key_id).unwrap();
    assert_eq!(c.principal, IamPrincipal::User("alice".into()));
    assert_eq!(c.account_id, acct);
    assert_eq!(r.identity_policies(&acct, &c.principal).unwrap().len(), 1);
    assert_eq!(r.get_role(&acct, "ops").unwrap().max_session, 7200);
    let s = r.credential(&session.access_key_id).unwrap();
    assert_eq!(s.token.as_deref(), Some(session.token.as_str()));
    // Root keys are not the user's: the profile writer must never pick a user key.
    assert!(r.access_keys_of(&acct).iter().all(|k| k.user.is_none()));
    // Refusals: bad trust document, out-of-range session length, a third key.
    assert!(matches!(
        r.create_role(&acct, "bad", None, "{", None, None),
        Err(RegistryError::MalformedPolicy(_))
    ));
    assert!(matches!(
        r.create_role(&acct, "short", None, trust, None, Some(3599)),
        Err(RegistryError::InvalidRequest(_))
    ));
    r.create_role(&acct, "long", None, trust, None, Some(43200))
        .unwrap();
    assert!(matches!(
        r.create_role(&acct, "longer", None, trust, None, Some(43201)),
        Err(RegistryError::InvalidRequest(_))
    ));
    r.create_access_key(&acct, Some("alice")).unwrap();
    assert!(matches!(
        r.create_access_key(&acct, Some("alice")),
        Err(RegistryError::LimitExceeded(_))
    ));
}

fn pending_cert(r: &Registry, acct: &str) -> Certificate {
    r.add_certificate(
        acct,
        NewCertificate {
            pem: cert_pem(),
            status: CertStatus::PendingActivation,
            ca_certificate_id: None,
            mode: CertMode::Default,
            claim_template: None,
        },
    )
    .unwrap()
    .0
}

/// A template that provisions thing `t` for the certificate `cert`, with a new policy if asked.
fn plan(cert: &str, policy: bool) -> template::Plan {
    let mut resources = serde_json::json!({
        "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "t"}},
        "certificate": {"Type": "AWS::IoT::Certificate",
            "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}}});
    if policy {
        resources["policy"] = serde_json::json!({"Type": "AWS::IoT::Policy",
            "Properties": {"PolicyDocument": DOC}});
    }
    let body = serde_json::json!({
        "Parameters": {"AWS::IoT::Certificate::Id": {"Type": "String"}},
        "Resources": resources});
    let params = BTreeMap::from([("AWS::IoT::Certificate::Id".to_string(), cert.to_string())]);
    template::evaluate(&body.to_string(), &params).unwrap()
}

fn provisioning_role(r: &Registry, acct: &str) -> String {
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"iot.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
    r.create_role(acct, "prov", None, trust, None, None)
        .unwrap();
    r.put_inline_policy(acct, true, "prov", "all", DOC).unwrap();
    format!("arn:aws:iam::{acct}:role/prov")
}

#[test]
fn concurrent_provisionings_of_one_thing_give_it_one_certificate() {
    let r = std::sync::Arc::new(Registry::in_memory("us-east-1").unwrap());
    let (a, _) = r.create_account("a").unwrap();
    let a = a.id;
    let role = provisioning_role(&r, &a);
    for _ in 0..20 {
        let _ = r.delete_thing(&a, "t", None);
        let certs: Vec<Certificate> = (0..4).map(|_| pending_cert(&r, &a)).collect();
        let results: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = certs
                .iter()
                .map(|c| {
                    let (r, a, role) = (r.clone(), a.clone(), role.clone());
                    s.spawn(move || {
                        r.register_thing(&a, plan(&c.id, false), &c.id, &role)
                            .is_ok()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
        let principals = r.list_thing_principals(&a, "t", None, 100).unwrap().items;
        assert_eq!(principals.len(), 1, "{principals:?}");
        for c in &certs {
            let _ = r.detach_thing_principal(
                &a,
                "t",
                &format!("arn:aws:iot:us-east-1:{a}:cert/{}", c.id),
            );
        }
    }
}

#[test]
fn provisioning_does_not_undo_what_an_administrator_did_meanwhile() {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    let a = a.id;
    let role = provisioning_role(&r, &a);
    // A policy the template creates, created by someone else first: refused, not attached.
    let c = pending_cert(&r, &a);
    let with_policy = plan(&c.id, true);
    r.create_policy(&a, &with_policy.policies[0].name, DOC)
        .unwrap();
    assert!(r.register_thing(&a, with_policy, &c.id, &role).is_err());
    assert_eq!(
        r.describe_certificate(&a, &c.id).unwrap().status,
        CertStatus::PendingActivation
    );
    // A certificate no longer PENDING_ACTIVATION is not provisioned (nor reactivated).
    let c = pending_cert(&r, &a);
    r.update_certificate(&a, &c.id, CertStatus::Inactive)
        .unwrap();
    assert!(
        r.register_thing(&a, plan(&c.id, false), &c.id, &role)
            .is_err()
    );
    assert_eq!(
        r.describe_certificate(&a, &c.id).unwrap().status,
        CertStatus::Inactive
    );
}
