//! A vector whose copy is cheap: the checkpoint's snapshot of operator state.
//!
//! A checkpoint needs the state as of one log position, while the pipeline
//! goes on changing it. Serializing it in place stops the pipeline for as
//! long as that takes (0.3 s at 100 000 terminals); copying it first does
//! too. [`CowVec`] keeps its elements in chunks behind `Arc`s, so a
//! snapshot ([`Clone`]) copies one pointer per chunk, and the checkpoint
//! thread reads the snapshot while the pipeline writes on: the first write
//! to a chunk the snapshot still holds copies that chunk
//! ([`Arc::make_mut`]), and only then. Elements that are themselves cheap
//! to clone (`Arc`s inside) make that copy cheap too.
//!
//! This is the copy-on-write snapshot of Flink's heap state backend
//! (`CopyOnWriteStateMap`), at chunk granularity.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// Elements per chunk: a snapshot of 200 000 groups is 391 pointers, and a
/// chunk copied on write is a few kilobytes.
const CHUNK: usize = 512;

#[derive(Debug)]
pub struct CowVec<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Default for CowVec<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Clone for CowVec<T> {
    /// A snapshot: shares every chunk.
    fn clone(&self) -> Self {
        Self {
            chunks: self.chunks.clone(),
            len: self.len,
        }
    }
}

impl<T: Clone> CowVec<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => Arc::make_mut(last).push(value),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(value);
                self.chunks.push(Arc::new(chunk));
            }
        }
        self.len += 1;
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    /// The element at `i`, its chunk copied first if a snapshot shares it.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        let chunk = self.chunks.get_mut(i / CHUNK)?;
        if i % CHUNK >= chunk.len() {
            return None;
        }
        Arc::make_mut(chunk).get_mut(i % CHUNK)
    }

    /// Removes the element at `i`, moving the last one into its place
    /// (`Vec::swap_remove`). Returns it, or `None` when `i` is out of range.
    pub fn swap_remove(&mut self, i: usize) -> Option<T> {
        if i >= self.len {
            return None;
        }
        let last_chunk = self.chunks.last_mut()?;
        let last = Arc::make_mut(last_chunk).pop()?;
        if last_chunk.is_empty() {
            self.chunks.pop();
        }
        self.len -= 1;
        if i == self.len {
            return Some(last);
        }
        let slot = self.get_mut(i)?;
        Some(std::mem::replace(slot, last))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &T> + '_ {
        Iter {
            inner: self.chunks.iter().flat_map(|c| c.iter()),
            left: self.len,
        }
    }
}

struct Iter<I> {
    inner: I,
    left: usize,
}

impl<'a, T: 'a, I: Iterator<Item = &'a T>> Iterator for Iter<I> {
    type Item = &'a T;

    fn next(&mut self) -> Option<&'a T> {
        let item = self.inner.next()?;
        self.left -= 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<'a, T: 'a, I: Iterator<Item = &'a T>> ExactSizeIterator for Iter<I> {}

impl<T: Clone> FromIterator<T> for CowVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v = CowVec::default();
        for x in iter {
            v.push(x);
        }
        v
    }
}

/// A hash map over a [`CowVec`] of entries: the same cheap snapshot
/// ([`CowMap::snapshot`]) for state kept by key. The index maps a key to
/// its entry's position; keys are `Arc`s, so the index and the entry share
/// one allocation (an interned key).
#[derive(Debug)]
pub struct CowMap<K, V> {
    index: HashMap<K, usize, ahash::RandomState>,
    entries: CowVec<(K, V)>,
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        Self {
            index: HashMap::default(),
            entries: CowVec::default(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> CowMap<K, V> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains_key<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.index.contains_key(key)
    }

    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        let i = *self.index.get(key)?;
        self.entries.get(i).map(|(_, v)| v)
    }

    pub fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        let i = *self.index.get(key)?;
        self.entries.get_mut(i).map(|(_, v)| v)
    }

    /// The entry of `key`, inserted first from `make` when missing (which
    /// builds the owned key only then).
    pub fn get_or_insert_with<Q: Hash + Eq + ?Sized>(
        &mut self,
        key: &Q,
        make: impl FnOnce() -> (K, V),
    ) -> Option<(&K, &mut V)>
    where
        K: Borrow<Q>,
    {
        let i = match self.index.get(key) {
            Some(&i) => i,
            None => {
                let (k, v) = make();
                let i = self.entries.len();
                self.index.insert(k.clone(), i);
                self.entries.push((k, v));
                i
            }
        };
        self.entries.get_mut(i).map(|(k, v)| (&*k, v))
    }

    /// Inserts or replaces.
    pub fn insert(&mut self, key: K, value: V) {
        match self.index.get(&key) {
            Some(&i) => {
                if let Some(slot) = self.entries.get_mut(i) {
                    slot.1 = value;
                }
            }
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
            }
        }
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<(K, V)>
    where
        K: Borrow<Q>,
    {
        let i = self.index.remove(key)?;
        let removed = self.entries.swap_remove(i)?;
        if let Some((moved, _)) = self.entries.get(i) {
            self.index.insert(moved.clone(), i);
        }
        Some(removed)
    }

    /// Keeps the entries for which `keep` holds. `keep` only reads, so a
    /// pass that removes nothing copies no chunk a snapshot holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) -> Vec<(K, V)> {
        let mut removed = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            let Some((k, v)) = self.entries.get(i) else {
                break;
            };
            if keep(k, v) {
                i += 1;
                continue;
            }
            let k = k.clone();
            if let Some(entry) = self.remove(&k) {
                removed.push(entry);
            }
        }
        removed
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&K, &V)> + '_ {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// The entries as they are now, for a checkpoint to read while the map
    /// changes on.
    pub fn snapshot(&self) -> CowVec<(K, V)> {
        self.entries.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_keeps_what_it_saw_while_the_original_changes() {
        let mut v: CowVec<u32> = (0..2000).collect();
        let snapshot = v.clone();
        *v.get_mut(3).unwrap() = 7_000;
        *v.get_mut(1500).unwrap() = 9_000;
        v.push(2000);
        assert_eq!(v.swap_remove(0), Some(0));
        assert_eq!(snapshot.len(), 2000);
        assert!(snapshot.iter().copied().eq(0..2000));
        assert_eq!(v.len(), 2000);
        assert_eq!(v.get(0), Some(&2000), "the last element moved into 0");
        assert_eq!(v.get(3), Some(&7_000));
        assert_eq!(v.get(1500), Some(&9_000));
        assert_eq!(v.get(2000), None);
    }

    #[test]
    fn only_the_chunks_written_after_a_snapshot_are_copied() {
        let mut v: CowVec<u32> = (0..(3 * CHUNK as u32)).collect();
        let snapshot = v.clone();
        *v.get_mut(CHUNK + 1).unwrap() = 1;
        let shared = v
            .chunks
            .iter()
            .zip(&snapshot.chunks)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(shared, 2);
    }

    #[test]
    fn swap_remove_matches_vec_down_to_empty() {
        let mut v: CowVec<usize> = (0..CHUNK + 3).collect();
        let mut model: Vec<usize> = (0..CHUNK + 3).collect();
        let mut i = 7;
        while !model.is_empty() {
            let at = i % model.len();
            assert_eq!(v.swap_remove(at), Some(model.swap_remove(at)));
            assert!(v.iter().eq(model.iter()));
            assert_eq!(v.iter().len(), model.len());
            i = (i * 31 + 5) % 1_000_003;
        }
        assert!(v.is_empty());
        assert_eq!(v.swap_remove(0), None);
        assert!(v.chunks.is_empty());
    }

    #[test]
    fn the_map_finds_every_key_after_removals_and_its_snapshot_stands() {
        let mut m: CowMap<Arc<str>, u32> = CowMap::default();
        for i in 0..1500u32 {
            m.insert(Arc::from(format!("k{i}")), i);
        }
        let snapshot = m.snapshot();
        let removed = m.retain(|_, v| v % 3 != 0);
        assert_eq!(removed.len(), 500);
        assert!(removed.iter().all(|(_, v)| v % 3 == 0));
        for i in 0..1500u32 {
            let expect = (i % 3 != 0).then_some(i);
            assert_eq!(m.get(format!("k{i}").as_str()).copied(), expect, "k{i}");
        }
        *m.get_or_insert_with("new", || (Arc::from("new"), 0))
            .unwrap()
            .1 += 5;
        *m.get_or_insert_with("k1", || (Arc::from("k1"), 0))
            .unwrap()
            .1 += 5;
        assert_eq!(m.get("new"), Some(&5));
        assert_eq!(m.get("k1"), Some(&6));
        assert_eq!(m.len(), 1001);
        assert_eq!(snapshot.len(), 1500);
        assert!(snapshot.iter().map(|(_, v)| *v).eq(0..1500));
    }
}
