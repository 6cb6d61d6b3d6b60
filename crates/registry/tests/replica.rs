//! Registries as replicas of one log (cluster mode), with the log in memory: whatever a
//! replica applies leaves its memory as the writer's, and as a fresh load of its database; a
//! write decided against a stale replica is taken back and decided again.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use sekisho_pki::{Ca, KeyKind};
use sekisho_registry::*;

const DOC: &str =
    r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*"}}"#;

type Entries = Arc<Mutex<Vec<Vec<u8>>>>;

/// A log in memory, shared by the replicas; each has its own handle, which catches it up.
struct MemLog {
    entries: Entries,
    me: Mutex<Weak<Registry>>,
    conflicts: AtomicUsize,
    /// The next append is answered "no answer": 1 after storing the entry, 2 without.
    silent: AtomicUsize,
}

impl Log for MemLog {
    fn append(&self, entry: Vec<u8>, expected: u64) -> Result<u64, LogError> {
        let mut e = self.entries.lock().unwrap();
        if e.len() as u64 != expected {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
            return Err(LogError::Conflict);
        }
        match self.silent.swap(0, Ordering::Relaxed) {
            1 => {
                e.push(entry);
                return Err(LogError::Unknown("stored, the answer lost".into()));
            }
            2 => return Err(LogError::Unknown("lost on the way".into())),
            _ => {}
        }
        e.push(entry);
        Ok(e.len() as u64)
    }

    fn catch_up(&self) -> Result<(), LogError> {
        let r = self.me.lock().unwrap().upgrade().unwrap();
        sync(&r, &self.entries);
        Ok(())
    }
}

/// Applies the entries `r` does not hold yet.
fn sync(r: &Registry, entries: &Entries) {
    let all = entries.lock().unwrap().clone();
    for (i, e) in all.iter().enumerate().skip(r.log_position() as usize) {
        r.apply_entry(i as u64 + 1, e).unwrap();
    }
}

fn replica(path: &std::path::Path, entries: &Entries) -> (Arc<Registry>, Arc<MemLog>) {
    let r = Arc::new(Registry::open(path, "us-east-1").unwrap());
    let log = follow(&r, entries);
    (r, log)
}

/// Catches `r` up with the log and attaches it.
fn follow(r: &Arc<Registry>, entries: &Entries) -> Arc<MemLog> {
    let log = Arc::new(MemLog {
        entries: entries.clone(),
        me: Mutex::new(Arc::downgrade(r)),
        conflicts: AtomicUsize::new(0),
        silent: AtomicUsize::new(0),
    });
    sync(r, entries);
    r.attach_log(log.clone());
    log
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sekisho-replica-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cert_pem() -> String {
    let now = time::OffsetDateTime::now_utc();
    let ca = Ca::generate("Test CA", "Test", now).unwrap();
    ca.issue_device(KeyKind::EcdsaP256, now).unwrap().cert_pem
}

/// `b`'s memory is `a`'s, and what a fresh load of `b`'s database gives.
fn same(a: &Registry, b: &Registry, b_path: &std::path::Path) {
    assert_eq!(a.log_position(), b.log_position());
    let (ma, mb) = (a.memory_digest(), b.memory_digest());
    assert!(
        ma == mb,
        "replica differs from the writer:\n{ma}\n----\n{mb}"
    );
    let fresh = Registry::open(b_path, "us-east-1").unwrap();
    assert_eq!(fresh.log_position(), b.log_position());
    let mf = fresh.memory_digest();
    assert!(
        mb == mf,
        "replica differs from its database:\n{mb}\n----\n{mf}"
    );
}

#[test]
fn a_replica_follows_every_kind_of_write_and_its_revocations() {
    let d = dir("kinds");
    let entries: Entries = Arc::default();
    let (a, _) = replica(&d.join("a.db"), &entries);
    let (b, _) = replica(&d.join("b.db"), &entries);
    let mut feed = b.subscribe();
    let (info, _) = a.create_account("default").unwrap();
    let acct = info.id;
    a.create_thing_type(&acct, "sensor", Some("d".into()), vec![])
        .unwrap();
    let attrs = BTreeMap::from([("floor".to_string(), "3".to_string())]);
    a.create_thing(&acct, "t1", Some("sensor"), attrs).unwrap();
    a.create_thing(&acct, "t2", None, BTreeMap::new()).unwrap();
    let (cert, _) = a
        .add_certificate(
            &acct,
            NewCertificate {
                pem: cert_pem(),
                status: CertStatus::Active,
                ca_certificate_id: None,
                mode: CertMode::Default,
                claim_template: None,
            },
        )
        .unwrap();
    let arn = a.arn(&acct, &format!("cert/{}", cert.id));
    a.create_policy(&acct, "p", DOC).unwrap();
    a.create_policy_version(&acct, "p", DOC, true).unwrap();
    a.attach_policy(&acct, "p", &arn).unwrap();
    a.attach_thing_principal(&acct, "t1", &arn, ThingPrincipalType::ExclusiveThing)
        .unwrap();
    a.create_thing_group(&acct, "g", None, Some("group"), BTreeMap::new())
        .unwrap();
    a.create_thing_group(&acct, "child", Some("g"), None, BTreeMap::new())
        .unwrap();
    a.add_thing_to_group(&acct, "child", "t1").unwrap();
    let group_arn = a.arn(&acct, "thinggroup/g");
    a.attach_policy(&acct, "p", &group_arn).unwrap();
    a.create_user(&acct, "alice", None).unwrap();
    a.create_access_key(&acct, Some("alice")).unwrap();
    sync(&b, &entries);
    same(&a, &b, &d.join("b.db"));
    assert_eq!(
        b.effective_policies(&acct, Some(&arn), Some("t1"))
            .unwrap()
            .len(),
        1
    );

    // A revocation made on one replica reaches the other's change feed.
    a.update_certificate(&acct, &cert.id, CertStatus::Revoked)
        .unwrap();
    let before = b.generation();
    sync(&b, &entries);
    assert!(b.generation() > before);
    let mut seen = Vec::new();
    while let Ok(c) = feed.try_recv() {
        seen.push(c);
    }
    assert!(
        seen.contains(&Change::Certificate {
            account: acct.clone(),
            certificate_id: cert.id.clone(),
            status: Some(CertStatus::Revoked),
        }),
        "{seen:?}"
    );
    same(&a, &b, &d.join("b.db"));

    // Removals.
    a.detach_policy(&acct, "p", &group_arn).unwrap();
    a.remove_thing_from_group(&acct, "child", "t1").unwrap();
    a.delete_thing_group(&acct, "child", None).unwrap();
    a.detach_policy(&acct, "p", &arn).unwrap();
    a.detach_thing_principal(&acct, "t1", &arn).unwrap();
    a.delete_thing(&acct, "t2", None).unwrap();
    a.delete_certificate(&acct, &cert.id, false).unwrap();
    sync(&b, &entries);
    same(&a, &b, &d.join("b.db"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_write_on_a_stale_replica_is_decided_again_after_catching_up() {
    let d = dir("stale");
    let entries: Entries = Arc::default();
    let (a, _) = replica(&d.join("a.db"), &entries);
    let (b, b_log) = replica(&d.join("b.db"), &entries);
    let (info, _) = a.create_account("default").unwrap();
    let acct = info.id;
    sync(&b, &entries);
    // `b` is behind `a` by one thing; its own write still lands, after `a`'s.
    a.create_thing(&acct, "from-a", None, BTreeMap::new())
        .unwrap();
    b.create_thing(&acct, "from-b", None, BTreeMap::new())
        .unwrap();
    assert_eq!(b_log.conflicts.load(Ordering::Relaxed), 1);
    assert!(b.describe_thing(&acct, "from-a").is_ok());
    sync(&a, &entries);
    same(&b, &a, &d.join("a.db"));

    // The same name from both sides: the second is decided against the first.
    let one = BTreeMap::from([("by".to_string(), "a".to_string())]);
    let two = BTreeMap::from([("by".to_string(), "b".to_string())]);
    a.create_thing(&acct, "x", None, one).unwrap();
    let lost = b.create_thing(&acct, "x", None, two).unwrap_err();
    assert!(
        matches!(lost, RegistryError::AlreadyExists { .. }),
        "{lost:?}"
    );
    assert_eq!(b_log.conflicts.load(Ordering::Relaxed), 2);
    let t = b.describe_thing(&acct, "x").unwrap();
    assert_eq!(t.attributes.get("by").map(String::as_str), Some("a"));
    sync(&a, &entries);
    same(&b, &a, &d.join("a.db"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_reopened_replica_goes_on_from_its_position() {
    let d = dir("reopen");
    let entries: Entries = Arc::default();
    let (a, _) = replica(&d.join("a.db"), &entries);
    let (info, _) = a.create_account("default").unwrap();
    let acct = info.id;
    {
        let (b, _) = replica(&d.join("b.db"), &entries);
        assert_eq!(b.log_position(), 1);
    }
    a.create_thing(&acct, "later", None, BTreeMap::new())
        .unwrap();
    let (b, _) = replica(&d.join("b.db"), &entries);
    assert_eq!(b.log_position(), 2);
    same(&a, &b, &d.join("b.db"));
    // An entry already held is skipped; one after a gap is refused.
    let first = entries.lock().unwrap()[0].clone();
    b.apply_entry(1, &first).unwrap();
    assert!(b.apply_entry(4, &first).is_err());
    assert!(b.apply_entry(3, b"not json").is_err());
    assert_eq!(b.log_position(), 2);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_seed_carries_a_registry_into_an_empty_replica() {
    let d = dir("seed");
    let single = Registry::open(&d.join("a.db"), "us-east-1").unwrap();
    let (info, _) = single.create_account("default").unwrap();
    for i in 0..50 {
        single
            .create_thing(&info.id, &format!("t{i}"), None, BTreeMap::new())
            .unwrap();
    }
    let seed = single.log_seed().unwrap();
    let entries: Entries = Arc::new(Mutex::new(seed.clone()));
    single.set_log_position(seed.len() as u64).unwrap();
    let (b, _) = replica(&d.join("b.db"), &entries);
    same(&single, &b, &d.join("b.db"));
    std::fs::remove_dir_all(&d).unwrap();
}

fn shadow(account: &str, thing: &str, doc: &str) -> ShadowWrite {
    ShadowWrite {
        account: account.into(),
        thing: thing.into(),
        name: None,
        doc: doc.into(),
        exists: true,
    }
}

#[test]
fn shadows_go_through_the_log_and_a_stale_write_of_the_same_shadow_is_refused() {
    let d = dir("shadows");
    let entries: Entries = Arc::default();
    let (a, _) = replica(&d.join("a.db"), &entries);
    let (b, b_log) = replica(&d.join("b.db"), &entries);
    let (info, _) = a.create_account("default").unwrap();
    let acct = info.id;
    a.put_shadows(&[shadow(&acct, "t", r#"{"version":1}"#)])
        .unwrap();
    sync(&b, &entries);
    assert_eq!(
        b.shadow(&acct, "t", None).unwrap().as_deref(),
        Some(r#"{"version":1}"#)
    );
    // `b` is behind by a write of shadow t: its own write of t was decided on the old one.
    a.put_shadows(&[shadow(&acct, "t", r#"{"version":2}"#)])
        .unwrap();
    let lost = b
        .put_shadows(&[shadow(&acct, "t", r#"{"version":2,"by":"b"}"#)])
        .unwrap_err();
    assert!(matches!(lost, RegistryError::Conflict(_)), "{lost:?}");
    assert_eq!(
        b.shadow(&acct, "t", None).unwrap().as_deref(),
        Some(r#"{"version":2}"#)
    );
    // Behind by a write of another shadow only: its write holds, after catching up.
    a.put_shadows(&[shadow(&acct, "u", r#"{"version":1}"#)])
        .unwrap();
    b.put_shadows(&[shadow(&acct, "t", r#"{"version":3}"#)])
        .unwrap();
    assert_eq!(b_log.conflicts.load(Ordering::Relaxed), 2);
    sync(&a, &entries);
    assert_eq!(
        a.shadow(&acct, "t", None).unwrap().as_deref(),
        Some(r#"{"version":3}"#)
    );
    assert_eq!(a.log_position(), b.log_position());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn an_account_made_on_a_stale_replica_leaves_no_trace_of_its_first_try() {
    let d = dir("accounts");
    let entries: Entries = Arc::default();
    let (a, _) = replica(&d.join("a.db"), &entries);
    let (b, b_log) = replica(&d.join("b.db"), &entries);
    a.create_account("x").unwrap();
    // `b` is behind: its first try is taken back (account, prefix, key), its second lands.
    b.create_account("y").unwrap();
    assert_eq!(b_log.conflicts.load(Ordering::Relaxed), 1);
    assert!(matches!(
        b.create_account("x"),
        Err(RegistryError::AlreadyExists { .. })
    ));
    sync(&a, &entries);
    same(&b, &a, &d.join("a.db"));
    same(&a, &b, &d.join("b.db"));
    assert_eq!(b.accounts().len(), 2);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn an_account_made_by_another_process_on_a_replica_goes_through_the_log() {
    let d = dir("proposal");
    let entries: Entries = Arc::default();
    let (a, _) = replica(&d.join("a.db"), &entries);
    a.create_account("default").unwrap();
    let (b, _) = replica(&d.join("b.db"), &entries);
    // `sekisho account create` on b's directory: a process without the log.
    let (info, key) = {
        let cli = Registry::open(&d.join("b.db"), "us-east-1").unwrap();
        let made = cli.create_account("made-by-cli").unwrap();
        assert!(cli.accounts().iter().all(|i| i.name != "made-by-cli"));
        made
    };
    assert!(b.accounts().iter().all(|i| i.name != "made-by-cli"));
    let accepted = b.load_new_accounts().unwrap();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].0.id, info.id);
    sync(&a, &entries);
    assert!(a.access_key(&key.access_key_id).is_some());
    same(&b, &a, &d.join("a.db"));
    // Accepted once.
    assert!(b.load_new_accounts().unwrap().is_empty());
    std::fs::remove_dir_all(&d).unwrap();
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

/// A template that provisions thing `t` for the certificate `cert`.
fn plan(cert: &str) -> template::Plan {
    let body = serde_json::json!({
        "Parameters": {"AWS::IoT::Certificate::Id": {"Type": "String"}},
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "t"}},
            "certificate": {"Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}}}});
    let params = BTreeMap::from([("AWS::IoT::Certificate::Id".to_string(), cert.to_string())]);
    template::evaluate(&body.to_string(), &params).unwrap()
}

/// Two nodes provisioning one thing at once (their per-account locks are their own): the
/// thing gets one certificate.
#[test]
fn provisionings_of_one_thing_on_two_replicas_give_it_one_certificate() {
    let d = dir("provisioning");
    let entries: Entries = Arc::default();
    let (a, _) = replica(&d.join("a.db"), &entries);
    let (b, _) = replica(&d.join("b.db"), &entries);
    let (info, _) = a.create_account("a").unwrap();
    let acct = info.id;
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"iot.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
    a.create_role(&acct, "prov", None, trust, None, None)
        .unwrap();
    a.put_inline_policy(&acct, true, "prov", "all", DOC)
        .unwrap();
    let role = format!("arn:aws:iam::{acct}:role/prov");
    for _ in 0..20 {
        let _ = a.delete_thing(&acct, "t", None);
        let (ca, cb) = (pending_cert(&a, &acct), pending_cert(&a, &acct));
        sync(&b, &entries);
        let ok: Vec<bool> = std::thread::scope(|s| {
            let one = s.spawn(|| a.register_thing(&acct, plan(&ca.id), &ca.id, &role).is_ok());
            let two = s.spawn(|| b.register_thing(&acct, plan(&cb.id), &cb.id, &role).is_ok());
            vec![one.join().unwrap(), two.join().unwrap()]
        });
        sync(&a, &entries);
        sync(&b, &entries);
        assert_eq!(ok.iter().filter(|ok| **ok).count(), 1, "{ok:?}");
        for r in [&a, &b] {
            let principals = r
                .list_thing_principals(&acct, "t", None, 100)
                .unwrap()
                .items;
            assert_eq!(principals.len(), 1, "{principals:?}");
        }
        for c in [&ca, &cb] {
            let _ = a.detach_thing_principal(
                &acct,
                "t",
                &format!("arn:aws:iot:us-east-1:{acct}:cert/{}", c.id),
            );
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_write_whose_append_was_not_answered_is_found_in_the_log_or_refused() {
    let d = dir("unanswered");
    let entries: Entries = Arc::default();
    let (a, a_log) = replica(&d.join("a.db"), &entries);
    let (info, _) = a.create_account("default").unwrap();
    let acct = info.id;
    // Stored, the answer lost: the write stands, applied from the log.
    a_log.silent.store(1, Ordering::Relaxed);
    a.create_thing(&acct, "stored", None, BTreeMap::new())
        .unwrap();
    assert!(a.describe_thing(&acct, "stored").is_ok());
    assert_eq!(a.log_position(), 2);
    // Lost: refused, and nothing changed.
    a_log.silent.store(2, Ordering::Relaxed);
    let e = a
        .create_thing(&acct, "lost", None, BTreeMap::new())
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unavailable(_)), "{e:?}");
    assert!(a.describe_thing(&acct, "lost").is_err());
    assert_eq!(a.log_position(), 2);
    let (b, _) = replica(&d.join("b.db"), &entries);
    same(&a, &b, &d.join("b.db"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_snapshot_file_becomes_an_empty_replicas_database_with_its_proposals_kept() {
    let d = dir("snapshot-file");
    let entries: Entries = Arc::default();
    let (a, _) = replica(&d.join("a.db"), &entries);
    let (info, _) = a.create_account("default").unwrap();
    for i in 0..20 {
        a.create_thing(&info.id, &format!("t{i}"), None, BTreeMap::new())
            .unwrap();
    }
    let at = a.snapshot_to(&d.join("snap.db")).unwrap();
    a.create_thing(&info.id, "later", None, BTreeMap::new())
        .unwrap();
    // An account proposed on the empty replica's directory (no log attached, a position
    // stored: `sekisho account create` beside a node) stays proposed.
    let b_path = d.join("b.db");
    {
        let b = Registry::open(&b_path, "us-east-1").unwrap();
        b.set_log_position(1).unwrap();
        b.create_account("proposed").unwrap();
    }
    let b = Arc::new(Registry::open(&b_path, "us-east-1").unwrap());
    b.set_log_position(0).unwrap();
    assert!(b.is_empty());
    // A file that is not a snapshot is refused and changes nothing: the registry is still its
    // own database, with its proposal.
    std::fs::write(
        d.join("junk.db"),
        b"not a database at all, but long enough to be read",
    )
    .unwrap();
    assert!(b.restore_file(&d.join("junk.db")).is_err());
    assert!(b.is_empty());
    assert_eq!(b.log_position(), 0);
    assert!(b_path.exists());
    assert_eq!(b.restore_file(&d.join("snap.db")).unwrap(), at);
    assert!(!d.join("snap.db").exists(), "the file was moved into place");
    assert!(
        b.restore_file(&d.join("snap.db")).is_err(),
        "not empty any more"
    );
    assert!(b.describe_thing(&info.id, "t19").is_ok());
    follow(&b, &entries);
    same(&a, &b, &b_path);
    assert_eq!(
        b.load_new_accounts().unwrap().len(),
        1,
        "the proposal was kept"
    );
    drop(b);
    // What it holds is on disk: opened again, the same.
    let again = Registry::open(&b_path, "us-east-1").unwrap();
    assert!(again.describe_thing(&info.id, "later").is_ok());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_snapshot_carries_a_replica_into_an_empty_one_which_goes_on_from_its_position() {
    let d = dir("snapshot");
    let entries: Entries = Arc::default();
    let (a, _) = replica(&d.join("a.db"), &entries);
    let (info, _) = a.create_account("default").unwrap();
    for i in 0..20 {
        a.create_thing(&info.id, &format!("t{i}"), None, BTreeMap::new())
            .unwrap();
    }
    a.put_shadows(&[shadow(&info.id, "t1", r#"{"version":1}"#)])
        .unwrap();
    let at = a.snapshot_to(&d.join("snap.db")).unwrap();
    assert_eq!(at, a.log_position());
    // Written after the snapshot: the new replica gets them from the log.
    a.create_thing(&info.id, "later", None, BTreeMap::new())
        .unwrap();
    let b = Arc::new(Registry::open(&d.join("b.db"), "us-east-1").unwrap());
    assert_eq!(b.restore_from(&d.join("snap.db")).unwrap(), at);
    assert!(
        b.restore_from(&d.join("snap.db")).is_err(),
        "not empty any more"
    );
    // A replica that fell behind a compacted log is emptied and starts again from the
    // snapshot: nothing of what it held before stays.
    b.apply_entry(at + 1, &entries.lock().unwrap()[at as usize])
        .unwrap();
    assert_eq!(b.log_position(), at + 1);
    b.clear_replica().unwrap();
    assert!(b.is_empty());
    assert_eq!(b.log_position(), 0);
    assert!(b.describe_thing(&info.id, "t1").is_err());
    assert_eq!(b.restore_from(&d.join("snap.db")).unwrap(), at);
    assert!(
        b.describe_thing(&info.id, "later").is_err(),
        "not in the snapshot"
    );
    follow(&b, &entries);
    same(&a, &b, &d.join("b.db"));
    assert_eq!(
        b.shadow(&info.id, "t1", None).unwrap().as_deref(),
        Some(r#"{"version":1}"#)
    );
    std::fs::remove_dir_all(&d).unwrap();
}
