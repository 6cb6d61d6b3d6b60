//! Device shadow storage: one document per shadow in the registry database (kind `shadow`,
//! key `{thing}/{shadow name}`, `{thing}/` for the classic shadow). Shadows are not kept in
//! the registry's memory: the shadow service reads one when a request names it and writes a
//! batch of them in one transaction. A shadow does not need a registered thing, and deleting a
//! thing leaves its shadows, as in AWS IoT.

use crate::store::{Kind, Op};
use crate::*;

fn key(thing: &str, name: Option<&str>) -> String {
    format!("{thing}/{}", name.unwrap_or(""))
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
}

impl Registry {
    /// The stored document of a shadow, if one was ever stored.
    pub fn shadow(&self, account: &str, thing: &str, name: Option<&str>) -> Result<Option<String>> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.get(Kind::Shadow, account, &key(thing, name))
    }

    /// Stores shadows in one transaction (synced before it returns).
    pub fn put_shadows(&self, writes: &[ShadowWrite]) -> Result<()> {
        let ops: Vec<Op> = writes
            .iter()
            .map(|w| Op::Put {
                kind: Kind::Shadow,
                account: w.account.clone(),
                key: key(&w.thing, w.name.as_deref()),
                doc: w.doc.clone(),
            })
            .collect();
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.apply(&ops)
    }

    /// The stored named shadows of a thing after `after` (exclusive), in name order, at most
    /// `limit`, as (name, document). The caller keeps those that exist.
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
}
