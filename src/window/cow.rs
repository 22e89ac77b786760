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
//!
//! Every chunk also carries the epoch of its last write, and a snapshot
//! ([`CowVec::snapshot`]) starts a new epoch. A checkpoint that wrote a
//! chunk as of epoch `e` can reuse what it wrote while the chunk's stamp is
//! still at most `e`: that makes checkpoints incremental
//! (`crate::checkpoint`), at the same chunk granularity.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Elements per chunk: a snapshot of 200 000 groups is 391 pointers, and a
/// chunk copied on write is a few kilobytes.
const CHUNK: usize = 512;

/// Identities of vectors: a checkpoint reuses a chunk only from the same
/// vector, never from another that happens to sit at the same place.
static SOURCES: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
pub struct CowVec<T> {
    chunks: Vec<Arc<Vec<T>>>,
    /// Per chunk: the epoch of its last write.
    stamps: Vec<u64>,
    len: usize,
    /// This vector's identity (unique in the process).
    source: u64,
    /// Snapshots taken so far; writes are stamped with it.
    epoch: AtomicU64,
}

impl<T> Default for CowVec<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            stamps: Vec::new(),
            len: 0,
            source: SOURCES.fetch_add(1, Ordering::Relaxed),
            epoch: AtomicU64::new(0),
        }
    }
}

impl<T> Clone for CowVec<T> {
    /// Another vector with the same elements, sharing every chunk until
    /// either side writes to it. It is a vector of its own (a new source):
    /// a checkpoint's snapshot is [`CowVec::snapshot`].
    fn clone(&self) -> Self {
        Self {
            chunks: self.chunks.clone(),
            stamps: self.stamps.clone(),
            len: self.len,
            ..Self::default()
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

    fn stamp(&mut self, chunk: usize) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        if let Some(s) = self.stamps.get_mut(chunk) {
            *s = epoch;
        }
    }

    pub fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => Arc::make_mut(last).push(value),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(value);
                self.chunks.push(Arc::new(chunk));
                self.stamps.push(0);
            }
        }
        self.stamp(self.chunks.len() - 1);
        self.len += 1;
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    /// The element at `i`, its chunk copied first if a snapshot shares it.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        if i >= self.len {
            return None;
        }
        self.stamp(i / CHUNK);
        let chunk = self.chunks.get_mut(i / CHUNK)?;
        Arc::make_mut(chunk).get_mut(i % CHUNK)
    }

    /// Removes the element at `i`, moving the last one into its place
    /// (`Vec::swap_remove`). Returns it, or `None` when `i` is out of range.
    pub fn swap_remove(&mut self, i: usize) -> Option<T> {
        if i >= self.len {
            return None;
        }
        let at = self.chunks.len() - 1;
        self.stamp(at);
        let last_chunk = self.chunks.last_mut()?;
        let last = Arc::make_mut(last_chunk).pop()?;
        if last_chunk.is_empty() {
            self.chunks.pop();
            self.stamps.pop();
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

    /// The elements as they are now, for a checkpoint to read while this
    /// vector changes on: one pointer per chunk, and a new epoch begins.
    pub fn snapshot(&self) -> Chunks<T> {
        Chunks {
            source: self.source,
            epoch: self.epoch.fetch_add(1, Ordering::Relaxed),
            stamps: self.stamps.clone(),
            chunks: self.chunks.iter().cloned().map(Some).collect(),
            len: self.len,
        }
    }
}

/// A [`CowVec`] as of one snapshot. The checkpoint releases each chunk as
/// soon as it has encoded (or reused) it, so that the pipeline's next write
/// there need not copy it.
#[derive(Debug)]
pub struct Chunks<T> {
    /// The vector it was taken from.
    pub source: u64,
    /// The epoch it closed: every chunk stamped at most this is as it was
    /// when this snapshot was taken.
    pub epoch: u64,
    stamps: Vec<u64>,
    chunks: Vec<Option<Arc<Vec<T>>>>,
    len: usize,
}

impl<T> Chunks<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Per chunk, the epoch of its last write.
    pub fn stamps(&self) -> &[u64] {
        &self.stamps
    }

    /// Chunk `i`, unless released.
    pub fn chunk(&self, i: usize) -> Option<&[T]> {
        self.chunks.get(i)?.as_deref().map(Vec::as_slice)
    }

    /// Lets go of chunk `i`.
    pub fn release(&mut self, i: usize) {
        if let Some(c) = self.chunks.get_mut(i) {
            *c = None;
        }
    }

    /// This snapshot as a checkpoint segment (`crate::checkpoint`).
    pub fn segment(&self, id: i64) -> crate::checkpoint::Segment {
        crate::checkpoint::Segment {
            id,
            source: self.source,
            epoch: self.epoch,
            stamps: self.stamps.clone(),
        }
    }

    /// Every element of the chunks not released.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks.iter().flatten().flat_map(|c| c.iter())
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
    pub fn snapshot(&self) -> Chunks<(K, V)> {
        self.entries.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_keeps_what_it_saw_while_the_original_changes() {
        let mut v: CowVec<u32> = (0..2000).collect();
        let snapshot = v.snapshot();
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
        let mut snapshot = v.snapshot();
        *v.get_mut(CHUNK + 1).unwrap() = 1;
        let shared = |v: &CowVec<u32>, snapshot: &Chunks<u32>| {
            v.chunks
                .iter()
                .zip(&snapshot.chunks)
                .filter(|(a, b)| b.as_ref().is_some_and(|b| Arc::ptr_eq(a, b)))
                .count()
        };
        assert_eq!(shared(&v, &snapshot), 2);
        // a chunk the snapshot let go of is written in place
        snapshot.release(2);
        *v.get_mut(2 * CHUNK).unwrap() = 1;
        assert_eq!(shared(&v, &snapshot), 1);
        assert_eq!(snapshot.iter().count(), 2 * CHUNK);
    }

    #[test]
    fn stamps_say_which_chunks_changed_since_a_snapshot() {
        let mut v: CowVec<u32> = (0..(4 * CHUNK as u32)).collect();
        let first = v.snapshot();
        assert!(first.stamps().iter().all(|&s| s <= first.epoch));
        *v.get_mut(1).unwrap() = 7; // chunk 0
        v.swap_remove(CHUNK + 2); // chunk 1, and the last chunk (3)
        let second = v.snapshot();
        assert!(second.epoch > first.epoch);
        let changed: Vec<usize> = (0..4)
            .filter(|&i| second.stamps()[i] > first.epoch)
            .collect();
        assert_eq!(changed, vec![0, 1, 3]);
        v.push(9); // the last chunk again
        let third = v.snapshot();
        let changed: Vec<usize> = (0..4)
            .filter(|&i| third.stamps()[i] > second.epoch)
            .collect();
        assert_eq!(changed, vec![3]);
        // a clone is a vector of its own: nothing of it can be reused from
        // the original's checkpoints
        assert_ne!(v.clone().snapshot().source, third.source);
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
