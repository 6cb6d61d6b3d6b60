//! Bring-your-own CA rules: registration code, DEFAULT/SNI_ONLY across accounts, limits,
//! device registration against a CA, authentication by route, JITR.
#![allow(clippy::unwrap_used)]

use sekisho_pki::{Ca, KeyKind};
use sekisho_registry::*;
use time::OffsetDateTime;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn two_accounts() -> (Registry, String, String) {
    let r = Registry::in_memory("us-east-1").unwrap();
    let (a, _) = r.create_account("a").unwrap();
    let (b, _) = r.create_account("b").unwrap();
    (r, a.id, b.id)
}

fn default_ca(r: &Registry, acct: &str, ca: &Ca) -> Result<CaCertificate> {
    let code = r.registration_code(acct).unwrap();
    let verification = ca.issue_named(&code, KeyKind::EcdsaP256, now()).unwrap();
    r.register_ca_certificate(
        acct,
        NewCaCertificate {
            pem: ca.cert_pem().to_owned(),
            verification_pem: Some(verification.cert_pem),
            mode: CertMode::Default,
            active: true,
            auto_registration: false,
            registration_config: None,
        },
        now(),
    )
}

fn sni_only_ca(r: &Registry, acct: &str, ca: &Ca, auto: bool) -> Result<CaCertificate> {
    r.register_ca_certificate(
        acct,
        NewCaCertificate {
            pem: ca.cert_pem().to_owned(),
            verification_pem: None,
            mode: CertMode::SniOnly,
            active: true,
            auto_registration: auto,
            registration_config: None,
        },
        now(),
    )
}

fn der(pem: &str) -> Vec<u8> {
    sekisho_pki::pem_to_der(pem).unwrap()
}

#[test]
fn registration_code_is_stable_until_deleted() {
    let (r, a, b) = two_accounts();
    let c1 = r.registration_code(&a).unwrap();
    assert_eq!(c1.len(), 64);
    assert!(c1.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(r.registration_code(&a).unwrap(), c1);
    assert_ne!(r.registration_code(&b).unwrap(), c1);
    r.delete_registration_code(&a).unwrap();
    assert!(matches!(
        r.delete_registration_code(&a),
        Err(RegistryError::NotFound(_))
    ));
    assert_ne!(r.registration_code(&a).unwrap(), c1);
}

#[test]
fn default_in_one_account_sni_only_in_many() {
    let (r, a, b) = two_accounts();
    let ca = Ca::generate("Factory CA", "Plant", now()).unwrap();
    let reg = default_ca(&r, &a, &ca).unwrap();
    assert_eq!(reg.mode, CertMode::Default);
    assert!(matches!(
        default_ca(&r, &a, &ca),
        Err(RegistryError::AlreadyExists { .. })
    ));
    match default_ca(&r, &b, &ca) {
        Err(RegistryError::InvalidRequest(m)) => assert_eq!(m, "Cannot accept this CACertificate"),
        other => panic!("{other:?}"),
    }
    sni_only_ca(&r, &b, &ca, false).unwrap();

    // The same device certificate: DEFAULT in A, SNI_ONLY in B.
    let dev = ca.issue_named("dev-1", KeyKind::EcdsaP256, now()).unwrap();
    let in_a = r
        .register_certificate(&a, &dev.cert_pem, None, CertStatus::Active, now())
        .unwrap();
    assert_eq!(in_a.mode, CertMode::Default);
    assert_eq!(in_a.ca_certificate_id.as_deref(), Some(reg.id.as_str()));
    let in_b = r
        .register_certificate(&b, &dev.cert_pem, None, CertStatus::Active, now())
        .unwrap();
    assert_eq!(in_b.mode, CertMode::SniOnly);
    assert_eq!(in_a.id, in_b.id);

    // Routing: SNI picks the account; no SNI finds the DEFAULT registration.
    let d = der(&dev.cert_pem);
    for (route, want) in [
        (Route::Account(&a), &a),
        (Route::Account(&b), &b),
        (Route::ByCertificate, &a),
    ] {
        match r.authenticate(route, &d) {
            Authentication::Active { account, .. } => assert_eq!(&account, want),
            other => panic!("{route:?}: {other:?}"),
        }
    }

    // A certificate only in B (SNI_ONLY) is refused without SNI.
    let dev2 = ca.issue_named("dev-2", KeyKind::EcdsaP256, now()).unwrap();
    r.register_certificate(&b, &dev2.cert_pem, None, CertStatus::Active, now())
        .unwrap();
    assert!(matches!(
        r.authenticate(Route::ByCertificate, &der(&dev2.cert_pem)),
        Authentication::Refused(_)
    ));
    assert!(matches!(
        r.authenticate(Route::Account(&a), &der(&dev2.cert_pem)),
        Authentication::Refused(_)
    ));
}

#[test]
fn default_device_certificate_in_two_accounts_is_refused() {
    let (r, a, b) = two_accounts();
    let ca = Ca::generate("Factory CA", "Plant", now()).unwrap();
    default_ca(&r, &a, &ca).unwrap();
    let dev = ca.issue_named("dev", KeyKind::EcdsaP256, now()).unwrap();
    r.register_certificate(&a, &dev.cert_pem, None, CertStatus::Active, now())
        .unwrap();
    // B registers the same certificate through its built-in path (DEFAULT mode): refused.
    let err = r
        .add_certificate(
            &b,
            NewCertificate {
                pem: dev.cert_pem.clone(),
                status: CertStatus::Active,
                ca_certificate_id: None,
                mode: CertMode::Default,
                claim_template: None,
            },
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::InvalidRequest(_)), "{err:?}");
    // Without a CA (SNI_ONLY) it is fine.
    r.register_certificate_without_ca(&b, &dev.cert_pem, CertStatus::Active, now())
        .unwrap();
}

#[test]
fn verification_certificate_rules() {
    let (r, a, _) = two_accounts();
    let ca = Ca::generate("Factory CA", "Plant", now()).unwrap();
    let other = Ca::generate("Other CA", "Plant", now()).unwrap();
    let code = r.registration_code(&a).unwrap();
    let new = |verification: Option<String>, mode| NewCaCertificate {
        pem: ca.cert_pem().to_owned(),
        verification_pem: verification,
        mode,
        active: true,
        auto_registration: false,
        registration_config: None,
    };
    // Missing in DEFAULT mode.
    assert!(matches!(
        r.register_ca_certificate(&a, new(None, CertMode::Default), now()),
        Err(RegistryError::InvalidRequest(_))
    ));
    // Wrong code.
    let wrong = ca
        .issue_named("not-the-code", KeyKind::EcdsaP256, now())
        .unwrap();
    assert!(matches!(
        r.register_ca_certificate(&a, new(Some(wrong.cert_pem), CertMode::Default), now()),
        Err(RegistryError::RegistrationCodeValidation(_))
    ));
    // Right code, signed by another CA.
    let forged = other.issue_named(&code, KeyKind::EcdsaP256, now()).unwrap();
    assert!(matches!(
        r.register_ca_certificate(&a, new(Some(forged.cert_pem), CertMode::Default), now()),
        Err(RegistryError::CertificateValidation(_))
    ));
    // Given in SNI_ONLY mode.
    let good = ca.issue_named(&code, KeyKind::EcdsaP256, now()).unwrap();
    assert!(matches!(
        r.register_ca_certificate(
            &a,
            new(Some(good.cert_pem.clone()), CertMode::SniOnly),
            now()
        ),
        Err(RegistryError::InvalidRequest(_))
    ));
    // Not a CA.
    let leaf = NewCaCertificate {
        pem: good.cert_pem.clone(),
        ..new(None, CertMode::SniOnly)
    };
    assert!(matches!(
        r.register_ca_certificate(&a, leaf, now()),
        Err(RegistryError::CertificateValidation(_))
    ));
    // Expired (seen from 30 years on).
    let later = now() + time::Duration::days(365 * 30);
    assert!(matches!(
        r.register_ca_certificate(&a, new(None, CertMode::SniOnly), later),
        Err(RegistryError::CertificateValidation(_))
    ));
    r.register_ca_certificate(&a, new(Some(good.cert_pem), CertMode::Default), now())
        .unwrap();
}

#[test]
fn ten_cas_per_subject_then_limit() {
    let (r, a, _) = two_accounts();
    for i in 0..MAX_CAS_PER_SUBJECT {
        let ca = Ca::generate("Same Subject", "Plant", now()).unwrap();
        sni_only_ca(&r, &a, &ca, false).unwrap_or_else(|e| panic!("CA {i}: {e}"));
    }
    let eleventh = Ca::generate("Same Subject", "Plant", now()).unwrap();
    match sni_only_ca(&r, &a, &eleventh, false) {
        Err(RegistryError::LimitExceeded(m)) => {
            assert_eq!(
                m,
                "Limit reached for number of CA Certificates with same subject"
            )
        }
        other => panic!("{other:?}"),
    }
    // A device of one of them still registers: the right CA is found by signature.
    let page = r.list_ca_certificates(&a, true, None, 250).unwrap();
    assert_eq!(page.items.len(), MAX_CAS_PER_SUBJECT);
}

#[test]
fn device_registration_needs_a_registered_active_ca() {
    let (r, a, _) = two_accounts();
    let ca = Ca::generate("Factory CA", "Plant", now()).unwrap();
    let dev = ca.issue_named("dev", KeyKind::EcdsaP256, now()).unwrap();
    assert!(matches!(
        r.register_certificate(&a, &dev.cert_pem, None, CertStatus::Active, now()),
        Err(RegistryError::CertificateValidation(_))
    ));
    let reg = sni_only_ca(&r, &a, &ca, false).unwrap();
    r.update_ca_certificate(
        &a,
        &reg.id,
        CaUpdate {
            status: Some(CaStatus::Inactive),
            ..CaUpdate::default()
        },
    )
    .unwrap();
    assert!(matches!(
        r.register_certificate(&a, &dev.cert_pem, None, CertStatus::Active, now()),
        Err(RegistryError::CertificateState(_))
    ));
    r.update_ca_certificate(
        &a,
        &reg.id,
        CaUpdate {
            status: Some(CaStatus::Active),
            ..CaUpdate::default()
        },
    )
    .unwrap();
    let c = r
        .register_certificate(
            &a,
            &dev.cert_pem,
            Some(ca.cert_pem()),
            CertStatus::Active,
            now(),
        )
        .unwrap();
    assert!(matches!(
        r.authenticate(Route::Account(&a), &der(&dev.cert_pem)),
        Authentication::Active { .. }
    ));
    // Deactivating the CA stops its certificates; deleting needs it inactive first.
    assert!(matches!(
        r.delete_ca_certificate(&a, &reg.id),
        Err(RegistryError::CertificateState(_))
    ));
    r.update_ca_certificate(
        &a,
        &reg.id,
        CaUpdate {
            status: Some(CaStatus::Inactive),
            ..CaUpdate::default()
        },
    )
    .unwrap();
    assert!(matches!(
        r.authenticate(Route::Account(&a), &der(&dev.cert_pem)),
        Authentication::Refused(_)
    ));
    r.delete_ca_certificate(&a, &reg.id).unwrap();
    assert!(matches!(
        r.authenticate(Route::Account(&a), &der(&dev.cert_pem)),
        Authentication::Refused(_)
    ));
    assert_eq!(r.certificates_of_ca(&a, &reg.id), vec![c.id]);
}

#[test]
fn just_in_time_registration() {
    let (r, a, b) = two_accounts();
    let ca = Ca::generate("JITR CA", "Plant", now()).unwrap();
    let reg = sni_only_ca(&r, &a, &ca, true).unwrap();
    let dev = ca
        .issue_named("jitr-dev", KeyKind::EcdsaP256, now())
        .unwrap();
    let d = der(&dev.cert_pem);
    // Other account, no SNI: no auto-registration.
    assert!(matches!(
        r.authenticate(Route::Account(&b), &d),
        Authentication::Refused(_)
    ));
    assert!(matches!(
        r.authenticate(Route::ByCertificate, &d),
        Authentication::Refused(_)
    ));
    let Authentication::AutoRegister {
        account,
        ca_certificate_id,
    } = r.authenticate(Route::Account(&a), &d)
    else {
        panic!("expected auto-registration");
    };
    assert_eq!(
        (account.as_str(), ca_certificate_id.as_str()),
        (a.as_str(), reg.id.as_str())
    );
    let c = r.auto_register(&a, &d, &reg.id).unwrap();
    assert_eq!(c.status, CertStatus::PendingActivation);
    assert_eq!(
        r.auto_register(&a, &d, &reg.id).unwrap().id,
        c.id,
        "idempotent"
    );
    assert!(matches!(
        r.authenticate(Route::Account(&a), &d),
        Authentication::PendingActivation { .. }
    ));
    r.update_certificate(&a, &c.id, CertStatus::Active).unwrap();
    assert!(matches!(
        r.authenticate(Route::Account(&a), &d),
        Authentication::Active { .. }
    ));

    // Auto-registration off, or the CA inactive: refused.
    let dev2 = ca
        .issue_named("jitr-dev-2", KeyKind::EcdsaP256, now())
        .unwrap();
    let d2 = der(&dev2.cert_pem);
    for update in [
        CaUpdate {
            auto_registration: Some(false),
            ..CaUpdate::default()
        },
        CaUpdate {
            auto_registration: Some(true),
            status: Some(CaStatus::Inactive),
            ..CaUpdate::default()
        },
    ] {
        r.update_ca_certificate(&a, &reg.id, update).unwrap();
        assert!(matches!(
            r.authenticate(Route::Account(&a), &d2),
            Authentication::Refused(_)
        ));
    }
}
