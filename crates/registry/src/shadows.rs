//! Device shadow storage: one document per shadow in the registry database (kind `shadow`,
//! key `{thing}/{shadow name}`, `{thing}/` for the classic shadow). Shadows are not kept in
//! the registry's memory: the shadow service reads one when a request names it and writes a
//! batch of them in one transaction. A shadow does not need a registered thing, and deleting a
//! thing leaves its shadows, as in AWS IoT.
//!
//! A deleted shadow keeps its version (the next update continues from it) in a tombstone under
//! `\u{1}{thing}/{shadow name}`, apart from the live shadows: a thing's live named shadows are
//! one key range (listed and counted without reading deleted ones), its tombstones another,
//! which can be dropped whole, and all of an account's tombstones a third. Tombstones written before they had keys of their own (under the
//! live key, marked deleted in the document) are moved to their own keys when the database is
//! opened (schema 2), and until then still read as deleted shadows.
use std::sync::atomic::Ordering;

use crate::store::{Kind, Op};
use crate::*;

fn key(thing: &str, name: Option<&str>) -> String {
    format!("{thing}/{}", name.unwrap_or(""))
}

fn tombstone_key(thing: &str, name: Option<&str>) -> String {
    format!("\u{1}{thing}/{}", name.unwrap_or(""))
}

/// One shadow to store: its account, thing, name (`None`: classic) and document.
#[derive(Debug, Clone)]
pub struct ShadowWrite {
    /// The account.
    pub account: String,
    /// The thing's name.
    pub thing: String,
    /// The shadow's name; `None` for the classic shadow.
    pub name: Option<String>,
    /// The stored document (a deleted shadow is stored too: it keeps its version).
    pub doc: String,
    /// Whether the shadow exists; `false` stores its tombstone.
    pub exists: bool,
}

impl Registry {
    /// The stored document of a shadow (or of its tombstone), if one was ever stored.
    pub fn shadow(&self, account: &str, thing: &str, name: Option<&str>) -> Result<Option<String>> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        match store.get(Kind::Shadow, account, &key(thing, name))? {
            Some(doc) => Ok(Some(doc)),
            None => store.get(Kind::Shadow, account, &tombstone_key(thing, name)),
        }
    }

    /// Stores shadows in one transaction (synced before it returns): a live shadow under its
    /// key, a deleted one as its tombstone (each replacing the other).
    pub fn put_shadows(&self, writes: &[ShadowWrite]) -> Result<()> {
        let mut ops = Vec::with_capacity(2 * writes.len());
        for w in writes {
            let (live, dead) = (
                key(&w.thing, w.name.as_deref()),
                tombstone_key(&w.thing, w.name.as_deref()),
            );
            let (put, delete) = if w.exists { (live, dead) } else { (dead, live) };
            ops.push(Op::Put {
                kind: Kind::Shadow,
                account: w.account.clone(),
                key: put,
                doc: w.doc.clone(),
            });
            ops.push(Op::Delete {
                kind: Kind::Shadow,
                account: w.account.clone(),
                key: delete,
            });
        }
        if ops.is_empty() {
            return Ok(());
        }
        let Some(log) = self.log.get() else {
            let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            return store.apply(&ops);
        };
        // In a cluster: through the log, as any registry write. The shadows were decided
        // against this node's database; if another node wrote first, the write still holds
        // unless what it wrote meanwhile touched one of these shadows.
        let nonce: u64 = rand::random();
        let entry = crate::replica::encode_entry(&ops, false, nonce)?;
        for _ in 0..crate::WRITE_TRIES {
            let st = self.state.write().unwrap_or_else(|p| p.into_inner());
            let expected = self.applied.load(Ordering::Acquire);
            match log.append(entry.clone(), expected) {
                Ok(p) => {
                    let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
                    store.apply(&crate::at_position(&ops, p))?;
                    self.applied.store(p, Ordering::Release);
                    drop(st);
                    return Ok(());
                }
                Err(crate::LogError::Conflict) => {
                    drop(st);
                    self.catch_up()?;
                    if self.shadows_touched_after(expected, &ops) {
                        return Err(RegistryError::Conflict(
                            "A shadow was changed on another node at the same time; try again"
                                .into(),
                        ));
                    }
                }
                Err(crate::LogError::Unavailable(why)) => {
                    return Err(RegistryError::Unavailable(format!(
                        "The cluster's registry log is unavailable: {why}"
                    )));
                }
                Err(crate::LogError::Unknown(why)) => {
                    drop(st);
                    if self.catch_up().is_ok() && self.applied_nonce(nonce) {
                        return Ok(());
                    }
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

    /// Whether an entry applied from the log after position `after` touched a shadow document
    /// that `ops` touch (true when that can no longer be told).
    fn shadows_touched_after(&self, after: u64, ops: &[Op]) -> bool {
        let recent = self
            .recent_shadows
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let applied = self.applied.load(Ordering::Acquire);
        // Every position in (after, applied] must be known to have touched no shadow of ours.
        if applied > after && recent.complete_from > after + 1 {
            return true;
        }
        let ours = crate::replica::touched(ops);
        recent
            .entries
            .iter()
            .filter(|(p, _)| *p > after)
            .any(|(_, keys)| {
                keys.iter()
                    .any(|(a, k)| ours.iter().any(|(_, oa, ok)| oa == a && ok == k))
            })
    }

    /// How many named shadows of a thing are stored live, counting no further than `limit`.
    pub fn named_shadow_count(&self, account: &str, thing: &str, limit: usize) -> Result<usize> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.count(
            Kind::Shadow,
            account,
            &key(thing, None),
            &format!("{thing}0"),
            limit,
        )
    }

    /// How many shadows (and tombstones) an account stores, counting no further than `limit`.
    pub fn shadow_rows(&self, account: &str, limit: usize) -> Result<usize> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.count(Kind::Shadow, account, "", "\u{10FFFF}", limit)
    }

    /// Drops every tombstone of an account (classic and named shadows of all its things);
    /// returns how many.
    pub fn drop_account_shadow_tombstones(&self, account: &str) -> Result<usize> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.delete_range(Kind::Shadow, account, "\u{1}", "\u{2}")
    }

    /// How many tombstones of a thing's named shadows are stored, counting no further than
    /// `limit`.
    pub fn shadow_tombstone_count(
        &self,
        account: &str,
        thing: &str,
        limit: usize,
    ) -> Result<usize> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.count(
            Kind::Shadow,
            account,
            &tombstone_key(thing, None),
            &format!("\u{1}{thing}0"),
            limit,
        )
    }

    /// Drops every tombstone of a thing's named shadows (their names, re-created, start again
    /// at version 1); returns how many.
    pub fn drop_shadow_tombstones(&self, account: &str, thing: &str) -> Result<usize> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.delete_range(
            Kind::Shadow,
            account,
            &tombstone_key(thing, None),
            &format!("\u{1}{thing}0"),
        )
    }

    /// The stored named shadows of a thing after `after` (exclusive), in name order, at most
    /// `limit`, as (name, document): the live ones, and tombstones stored before they had keys
    /// of their own. The caller keeps those that exist.
    pub fn named_shadows(
        &self,
        account: &str,
        thing: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let lo = key(thing, after);
        // Every key of the thing starts with "{thing}/"; '0' is the byte after '/'.
        let hi = format!("{thing}0");
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let rows = store.range(Kind::Shadow, account, &lo, &hi, limit)?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, doc)| Some((k.strip_prefix(&format!("{thing}/"))?.to_owned(), doc)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(account: &str, thing: &str, name: Option<&str>, doc: &str) -> ShadowWrite {
        ShadowWrite {
            account: account.into(),
            thing: thing.into(),
            name: name.map(str::to_owned),
            doc: doc.into(),
            exists: true,
        }
    }

    #[test]
    fn shadows_are_kept_per_account_thing_and_name() {
        let reg = Registry::in_memory("us-east-1").unwrap();
        reg.put_shadows(&[
            w("a", "lamp", None, "classic"),
            w("a", "lamp", Some("cfg"), "1"),
            w("a", "lamp", Some("$fw"), "2"),
            // Things whose names sort right before and after "lamp/".
            w("a", "lamp-x", Some("n"), "3"),
            w("a", "lamp2", Some("n"), "4"),
            w("b", "lamp", Some("zz"), "other account"),
        ])
        .unwrap();
        assert_eq!(
            reg.shadow("a", "lamp", None).unwrap().as_deref(),
            Some("classic")
        );
        assert_eq!(
            reg.shadow("a", "lamp", Some("cfg")).unwrap().as_deref(),
            Some("1")
        );
        assert_eq!(reg.shadow("b", "lamp", None).unwrap(), None);
        let names = |after, limit| -> Vec<String> {
            reg.named_shadows("a", "lamp", after, limit)
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        };
        // The classic shadow and other things' shadows are never among a thing's named ones.
        assert_eq!(names(None, 10), ["$fw", "cfg"]);
        assert_eq!(names(None, 1), ["$fw"]);
        assert_eq!(names(Some("$fw"), 10), ["cfg"]);
        // Written again: replaced.
        reg.put_shadows(&[w("a", "lamp", Some("cfg"), "5")])
            .unwrap();
        assert_eq!(
            reg.shadow("a", "lamp", Some("cfg")).unwrap().as_deref(),
            Some("5")
        );
    }

    /// A database of schema 1 (tombstones under their live keys) opens with its tombstones
    /// moved apart: not counted as live, counted and dropped as tombstones, still read back.
    #[test]
    fn old_tombstones_move_to_their_own_keys() {
        let dir = std::env::temp_dir().join(format!("sekisho-tomb-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("registry.db");
        let _ = std::fs::remove_file(&path);
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE objects (kind TEXT NOT NULL, account_id TEXT NOT NULL, key TEXT NOT NULL,
                 doc TEXT NOT NULL, PRIMARY KEY (kind, account_id, key)) WITHOUT ROWID;
                 PRAGMA user_version = 1;
                 INSERT INTO objects VALUES ('shadow', 'a', 'lamp/gone', '{\"version\":3,\"exists\":false}');
                 INSERT INTO objects VALUES ('shadow', 'a', 'lamp/', '{\"version\":2,\"exists\":false}');
                 INSERT INTO objects VALUES ('shadow', 'a', 'lamp/live', '{\"version\":1,\"exists\":true}');",
            )
            .unwrap();
        }
        let reg = Registry::open(&path, "us-east-1").unwrap();
        assert_eq!(reg.named_shadow_count("a", "lamp", 100).unwrap(), 1);
        assert_eq!(reg.shadow_tombstone_count("a", "lamp", 100).unwrap(), 1);
        assert_eq!(
            reg.shadow("a", "lamp", Some("gone")).unwrap().as_deref(),
            Some("{\"version\":3,\"exists\":false}")
        );
        assert!(reg.shadow("a", "lamp", None).unwrap().is_some());
        let listed: Vec<String> = reg
            .named_shadows("a", "lamp", None, 10)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(listed, ["live"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tombstones_are_kept_apart_counted_and_dropped() {
        let reg = Registry::in_memory("us-east-1").unwrap();
        let dead = |name: &str| ShadowWrite {
            exists: false,
            ..w("a", "lamp", Some(name), &format!("dead {name}"))
        };
        reg.put_shadows(&[
            w("a", "lamp", Some("x"), "x1"),
            w("a", "lamp", Some("y"), "y1"),
            w("a", "lamp", None, "classic"),
            w("a", "lamp2", Some("z"), "other thing"),
        ])
        .unwrap();
        assert_eq!(reg.named_shadow_count("a", "lamp", 100).unwrap(), 2);
        assert_eq!(reg.named_shadow_count("a", "lamp", 1).unwrap(), 1);
        // Deleted: read back as its tombstone, no longer live, no longer listed.
        reg.put_shadows(&[
            dead("x"),
            ShadowWrite {
                exists: false,
                ..w("a", "lamp", None, "dead classic")
            },
        ])
        .unwrap();
        assert_eq!(
            reg.shadow("a", "lamp", Some("x")).unwrap().as_deref(),
            Some("dead x")
        );
        assert_eq!(
            reg.shadow("a", "lamp", None).unwrap().as_deref(),
            Some("dead classic")
        );
        assert_eq!(reg.named_shadow_count("a", "lamp", 100).unwrap(), 1);
        assert_eq!(reg.shadow_tombstone_count("a", "lamp", 100).unwrap(), 1);
        let listed: Vec<String> = reg
            .named_shadows("a", "lamp", None, 10)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(listed, ["y"]);
        // Re-created: live again, the tombstone gone.
        reg.put_shadows(&[w("a", "lamp", Some("x"), "x2")]).unwrap();
        assert_eq!(
            reg.shadow("a", "lamp", Some("x")).unwrap().as_deref(),
            Some("x2")
        );
        assert_eq!(reg.shadow_tombstone_count("a", "lamp", 100).unwrap(), 0);
        // Dropped: only this thing's named tombstones (not its classic one, nor other things').
        reg.put_shadows(&[
            dead("x"),
            dead("y"),
            ShadowWrite {
                exists: false,
                ..w("a", "lamp2", Some("z"), "d")
            },
        ])
        .unwrap();
        assert_eq!(reg.drop_shadow_tombstones("a", "lamp").unwrap(), 2);
        assert_eq!(reg.shadow("a", "lamp", Some("x")).unwrap(), None);
        assert_eq!(
            reg.shadow("a", "lamp", None).unwrap().as_deref(),
            Some("dead classic")
        );
        assert_eq!(
            reg.shadow("a", "lamp2", Some("z")).unwrap().as_deref(),
            Some("d")
        );
    }
}
