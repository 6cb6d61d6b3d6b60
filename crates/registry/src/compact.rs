//! Small sorted collections for the registry's per-device indexes.
//!
//! A `BTreeSet` or `BTreeMap` allocates a node sized for eleven entries even when it holds
//! one: about 290 bytes for `String` entries. The registry keeps one such set per certificate
//! (its policies, its things, its accounts) and per thing (its principals), almost always with
//! a single entry, so with a million devices those nodes alone cost more than a kilobyte per
//! device. These keep their entries sorted in a vector sized to fit: one `String` entry costs
//! its 24 bytes and one small allocation. Lookups are binary searches; inserting and removing
//! move the entries after the one changed, which is cheap for the sizes these hold (AWS
//! allows ten policies per target and ten groups per thing). The one set with no such bound,
//! a principal's things, is a [`VecMap`], which becomes a B-tree past [`LARGE`] entries.

use std::borrow::Borrow;
use std::collections::BTreeMap;

/// Up to this many entries a vector grows by exactly one on insert (no spare capacity);
/// beyond, it grows as vectors do (amortised doubling), so a large set is not quadratic.
const EXACT_UP_TO: usize = 8;

fn reserve<T>(v: &mut Vec<T>) {
    if v.len() < EXACT_UP_TO {
        v.reserve_exact(1);
    } else {
        v.reserve(1);
    }
}

fn shrink<T>(v: &mut Vec<T>) {
    if v.len() < EXACT_UP_TO {
        v.shrink_to_fit();
    }
}

/// A set kept as a sorted vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecSet<T>(Vec<T>);

impl<T> Default for VecSet<T> {
    fn default() -> Self {
        VecSet(Vec::new())
    }
}

impl<T: Ord> VecSet<T> {
    /// An empty set (allocates nothing).
    pub fn new() -> Self {
        VecSet(Vec::new())
    }

    fn find<Q: Ord + ?Sized>(&self, v: &Q) -> Result<usize, usize>
    where
        T: Borrow<Q>,
    {
        self.0.binary_search_by(|x| x.borrow().cmp(v))
    }

    /// Adds `v`; false if it was there already.
    pub fn insert(&mut self, v: T) -> bool {
        match self.find(&v) {
            Ok(_) => false,
            Err(i) => {
                reserve(&mut self.0);
                self.0.insert(i, v);
                true
            }
        }
    }

    /// Removes `v`; false if it was not there.
    pub fn remove<Q: Ord + ?Sized>(&mut self, v: &Q) -> bool
    where
        T: Borrow<Q>,
    {
        match self.find(v) {
            Ok(i) => {
                self.0.remove(i);
                shrink(&mut self.0);
                true
            }
            Err(_) => false,
        }
    }

    /// Whether `v` is in the set.
    pub fn contains<Q: Ord + ?Sized>(&self, v: &Q) -> bool
    where
        T: Borrow<Q>,
    {
        self.find(v).is_ok()
    }

    /// The entries, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries of `self` that `other` lacks, in order.
    pub fn difference<'a>(&'a self, other: &'a VecSet<T>) -> impl Iterator<Item = &'a T> {
        self.0.iter().filter(move |v| !other.contains(*v))
    }

    /// Whether every entry of `self` is in `other`.
    pub fn is_subset(&self, other: &VecSet<T>) -> bool {
        self.0.iter().all(|v| other.contains(v))
    }
}

impl<T: Ord> FromIterator<T> for VecSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v: Vec<T> = iter.into_iter().collect();
        v.sort();
        v.dedup();
        v.shrink_to_fit();
        VecSet(v)
    }
}

impl<T> IntoIterator for VecSet<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a, T> IntoIterator for &'a VecSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A map kept as a vector of pairs sorted by key while it is small, as a `BTreeMap` beyond
/// [`LARGE`] entries: a principal attached to a million things must not make each attach move
/// every entry after it (under the registry's lock).
#[derive(Debug, Clone)]
pub struct VecMap<K, V>(Repr<K, V>);

/// Equal when the entries are, whichever form each map has.
impl<K: Ord, V: PartialEq> PartialEq for VecMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<K: Ord, V: Eq> Eq for VecMap<K, V> {}

#[derive(Debug, Clone)]
enum Repr<K, V> {
    Small(Vec<(K, V)>),
    Large(BTreeMap<K, V>),
}

/// Above this many entries a [`VecMap`] is a B-tree; below half of it, a vector again.
pub const LARGE: usize = 64;

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(Repr::Small(Vec::new()))
    }
}

/// The entries of a [`VecMap`], in key order.
pub enum Iter<'a, K, V> {
    /// Of a small map.
    Small(std::slice::Iter<'a, (K, V)>),
    /// Of a large one.
    Large(std::collections::btree_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Small(i) => i.next().map(|(k, v)| (k, v)),
            Iter::Large(i) => i.next(),
        }
    }
}

impl<K: Ord, V> VecMap<K, V> {
    /// An empty map (allocates nothing).
    pub fn new() -> Self {
        VecMap::default()
    }

    fn find<Q: Ord + ?Sized>(v: &[(K, V)], k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        v.binary_search_by(|(x, _)| x.borrow().cmp(k))
    }

    /// Sets `k` to `v`, returning the value it had.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match &mut self.0 {
            Repr::Small(items) => match Self::find(items, &k) {
                Ok(i) => Some(std::mem::replace(&mut items[i].1, v)),
                Err(_) if items.len() >= LARGE => {
                    let mut map: BTreeMap<K, V> = std::mem::take(items).into_iter().collect();
                    map.insert(k, v);
                    self.0 = Repr::Large(map);
                    None
                }
                Err(i) => {
                    reserve(items);
                    items.insert(i, (k, v));
                    None
                }
            },
            Repr::Large(map) => map.insert(k, v),
        }
    }

    /// Removes `k`, returning its value.
    pub fn remove<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        match &mut self.0 {
            Repr::Small(items) => {
                let i = Self::find(items, k).ok()?;
                let (_, v) = items.remove(i);
                shrink(items);
                Some(v)
            }
            Repr::Large(map) => {
                let v = map.remove(k)?;
                if map.len() < LARGE / 2 {
                    let items: Vec<(K, V)> = std::mem::take(map).into_iter().collect();
                    self.0 = Repr::Small(items);
                }
                Some(v)
            }
        }
    }

    /// The value of `k`.
    pub fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        match &self.0 {
            Repr::Small(items) => Self::find(items, k).ok().map(|i| &items[i].1),
            Repr::Large(map) => map.get(k),
        }
    }

    /// Whether `k` has a value.
    pub fn contains_key<Q: Ord + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.get(k).is_some()
    }

    /// The entries, in key order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        match &self.0 {
            Repr::Small(items) => Iter::Small(items.iter()),
            Repr::Large(map) => Iter::Large(map.iter()),
        }
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Small(items) => items.len(),
            Repr::Large(map) => map.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    /// Sorted by key; of entries with the same key the last one stays (as for a `BTreeMap`).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(K, V)> = iter.into_iter().collect();
        v.reverse();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|later, earlier| later.0 == earlier.0);
        if v.len() > LARGE {
            return VecMap(Repr::Large(v.into_iter().collect()));
        }
        v.shrink_to_fit();
        VecMap(Repr::Small(v))
    }
}

/// A set that is almost always one entry: that entry inline (no allocation), more in a
/// [`VecSet`]. The accounts a certificate is registered in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OneOrMore<T> {
    /// One entry.
    One(T),
    /// Several (never fewer than two), or none after removals.
    More(VecSet<T>),
}

impl<T> Default for OneOrMore<T> {
    fn default() -> Self {
        OneOrMore::More(VecSet::default())
    }
}

impl<T: Ord + Clone> OneOrMore<T> {
    /// Adds `v`; false if it was there already.
    pub fn insert(&mut self, v: T) -> bool {
        match self {
            OneOrMore::One(x) if *x == v => false,
            OneOrMore::One(x) => {
                let set: VecSet<T> = [x.clone(), v].into_iter().collect();
                *self = OneOrMore::More(set);
                true
            }
            OneOrMore::More(s) if s.is_empty() => {
                *self = OneOrMore::One(v);
                true
            }
            OneOrMore::More(s) => s.insert(v),
        }
    }

    /// Removes `v`; false if it was not there.
    pub fn remove<Q: Ord + ?Sized>(&mut self, v: &Q) -> bool
    where
        T: Borrow<Q>,
    {
        match self {
            OneOrMore::One(x) if (*x).borrow() == v => {
                *self = OneOrMore::More(VecSet::new());
                true
            }
            OneOrMore::One(_) => false,
            OneOrMore::More(s) => {
                let removed = s.remove(v);
                if s.len() == 1
                    && let Some(last) = s.iter().next().cloned()
                {
                    *self = OneOrMore::One(last);
                }
                removed
            }
        }
    }

    /// Whether `v` is in.
    pub fn contains<Q: Ord + ?Sized>(&self, v: &Q) -> bool
    where
        T: Borrow<Q>,
    {
        match self {
            OneOrMore::One(x) => (*x).borrow() == v,
            OneOrMore::More(s) => s.contains(v),
        }
    }

    /// The entries, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        match self {
            OneOrMore::One(x) => std::slice::from_ref(x).iter(),
            OneOrMore::More(s) => s.iter(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        matches!(self, OneOrMore::More(s) if s.is_empty())
    }
}

impl<T: Ord + Clone> FromIterator<T> for OneOrMore<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut out = OneOrMore::default();
        for v in iter {
            out.insert(v);
        }
        out
    }
}

/// An account's certificates by id, keyed by the 32 bytes the id's 64 hex digits encode
/// ([`crate::cert_key`]) rather than by a copy of the text (80 bytes of heap a device); in
/// the same order as the ids. Ids that are not certificate ids name nothing.
#[derive(Debug, Clone, Default)]
pub struct Certificates(std::collections::BTreeMap<[u8; 32], crate::Certificate>);

impl Certificates {
    /// The certificate with this id.
    pub fn get(&self, id: &str) -> Option<&crate::Certificate> {
        self.0.get(&crate::cert_key(id)?)
    }

    /// The certificate with this id, to change (not its id).
    pub fn get_mut(&mut self, id: &str) -> Option<&mut crate::Certificate> {
        self.0.get_mut(&crate::cert_key(id)?)
    }

    /// Whether a certificate has this id.
    pub fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Adds or replaces `c` under its id; false (and nothing stored) if its id is not a
    /// certificate id, which `sekisho_pki::certificate_id` never makes.
    pub fn insert(&mut self, c: crate::Certificate) -> bool {
        match crate::cert_key(&c.id) {
            Some(k) => {
                self.0.insert(k, c);
                true
            }
            None => false,
        }
    }

    /// Removes the certificate with this id.
    pub fn remove(&mut self, id: &str) -> Option<crate::Certificate> {
        self.0.remove(&crate::cert_key(id)?)
    }

    /// The certificates' ids as keys, in order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.0.keys()
    }

    /// The certificates, by id.
    pub fn values(&self) -> impl Iterator<Item = &crate::Certificate> + Clone {
        self.0.values()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<crate::Certificate> for Certificates {
    /// Built whole (full B-tree nodes); certificates whose id is not a certificate id are left
    /// out, as [`Certificates::insert`] leaves them.
    fn from_iter<I: IntoIterator<Item = crate::Certificate>>(iter: I) -> Self {
        Certificates(
            iter.into_iter()
                .filter_map(|c| crate::cert_key(&c.id).map(|k| (k, c)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// The same operations on a `VecSet` and a `BTreeSet` leave the same contents, in order.
    #[test]
    fn set_behaves_as_a_btreeset() {
        let mut ours = VecSet::new();
        let mut theirs = BTreeSet::new();
        let mut x: u64 = 7;
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = ((x >> 33) % 64) as u32;
            if x & 1 == 0 {
                assert_eq!(ours.insert(v), theirs.insert(v));
            } else {
                assert_eq!(ours.remove(&v), theirs.remove(&v));
            }
            assert_eq!(ours.contains(&v), theirs.contains(&v));
            assert_eq!(ours.len(), theirs.len());
        }
        assert!(ours.iter().eq(theirs.iter()));
        let other: VecSet<u32> = (0..64).filter(|v| v % 3 == 0).collect();
        let other_b: BTreeSet<u32> = other.iter().copied().collect();
        assert!(ours.difference(&other).eq(theirs.difference(&other_b)));
        assert!(other.difference(&ours).eq(other_b.difference(&theirs)));
        assert_eq!(ours.is_subset(&other), theirs.is_subset(&other_b));
        let small: VecSet<u32> = ours.iter().copied().take(3).collect();
        assert!(small.is_subset(&ours));
        let collected: VecSet<u32> = [3, 1, 3, 2].into_iter().collect();
        assert_eq!(collected.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn map_behaves_as_a_btreemap() {
        let mut ours = VecMap::new();
        let mut theirs = BTreeMap::new();
        let mut x: u64 = 11;
        let (mut was_large, mut small_again) = (false, false);
        for i in 0..20000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = format!("k{}", (x >> 33) % 200);
            // Mostly inserting for the first half (well past LARGE), only removing after.
            if i < 10000 && !(x >> 8).is_multiple_of(4) {
                assert_eq!(ours.insert(k.clone(), i), theirs.insert(k.clone(), i));
            } else {
                assert_eq!(ours.remove(k.as_str()), theirs.remove(k.as_str()));
            }
            assert_eq!(ours.get(k.as_str()), theirs.get(k.as_str()));
            assert_eq!(
                ours.contains_key(k.as_str()),
                theirs.contains_key(k.as_str())
            );
            assert_eq!(ours.len(), theirs.len());
            was_large |= matches!(ours.0, Repr::Large(_));
            small_again |= was_large && matches!(ours.0, Repr::Small(_));
        }
        assert!(was_large && small_again, "both ways across the threshold");
        assert!(ours.iter().eq(theirs.iter()));
        assert!(ours.keys().eq(theirs.keys()));
        let pairs = [("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5)];
        let ours: VecMap<&str, i32> = pairs.into_iter().collect();
        let theirs: BTreeMap<&str, i32> = pairs.into_iter().collect();
        assert!(ours.iter().eq(theirs.iter()));
        assert!(matches!(&ours.0, Repr::Small(v) if v.capacity() == 3));
        let mut many: VecMap<u32, ()> = (0..=LARGE as u32).map(|i| (i, ())).collect();
        assert!(matches!(many.0, Repr::Large(_)));
        assert!(many.keys().copied().eq(0..=LARGE as u32));
        // Between the thresholds the same entries may be held either way: still equal.
        for i in 40..=LARGE as u32 {
            many.remove(&i);
        }
        let small: VecMap<u32, ()> = (0..40).map(|i| (i, ())).collect();
        assert!(matches!(many.0, Repr::Large(_)) && matches!(small.0, Repr::Small(_)));
        assert_eq!(many, small);
    }

    /// The same operations on a `OneOrMore` and a `BTreeSet` leave the same contents.
    #[test]
    fn one_or_more_behaves_as_a_btreeset() {
        let mut ours: OneOrMore<u32> = OneOrMore::default();
        let mut theirs = BTreeSet::new();
        let mut x: u64 = 5;
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = ((x >> 33) % 4) as u32;
            if x & 1 == 0 {
                assert_eq!(ours.insert(v), theirs.insert(v));
            } else {
                assert_eq!(ours.remove(&v), theirs.remove(&v));
            }
            assert_eq!(ours.contains(&v), theirs.contains(&v));
            assert_eq!(ours.is_empty(), theirs.is_empty());
            assert!(ours.iter().eq(theirs.iter()));
            assert_eq!(matches!(ours, OneOrMore::One(_)), theirs.len() == 1);
        }
    }

    /// One entry costs one exactly sized allocation, not a node of eleven.
    #[test]
    fn one_entry_is_sized_to_fit() {
        let mut s = VecSet::new();
        s.insert("policy".to_string());
        assert_eq!(s.0.capacity(), 1);
        s.insert("another".to_string());
        assert_eq!(s.0.capacity(), 2);
        s.remove("policy");
        assert_eq!(s.0.capacity(), 1);
        let mut m = VecMap::new();
        m.insert("thing".to_string(), 1u8);
        assert!(matches!(&m.0, Repr::Small(v) if v.capacity() == 1));
    }
}
