//! Checkpoints: all operator state and the ingest-log position, in one
//! atomic write.
//!
//! A checkpoint is a manifest — the sequence number of the last log record
//! whose effects it holds, every stream's watermark, and each view's plan
//! fingerprint with the length and CRC-32 of its part — plus one part per
//! view or rule: the operator's snapshot (`ViewOperator::snapshot_state`).
//!
//! Taking one stops the pipeline only for the snapshot, which shares the
//! operators' state copy-on-write (`crate::window::cow`), not for encoding
//! or writing it: the checkpoint thread encodes the parts one at a time and
//! writes each as it is encoded ([`Pending`]), so no buffer of the whole
//! state is held. It clears the slot first and writes the manifest last, so
//! a crash midway leaves a slot with no manifest, or one whose parts do not
//! match it, and start-up takes the other slot: a checkpoint is all there
//! or not at all.
//!
//! **Incremental.** A part is a small header (the watermark) and its state
//! in chunks of 512 keys or windows, each stored under a key of its own
//! that names the checkpoint generation that wrote it ([`chunk_key`]). A
//! chunk the pipeline has not written since the last checkpoint (its epoch
//! stamp, `crate::window::cow`) is not encoded or written again: the new
//! manifest refers to the chunk the older checkpoint wrote. So a
//! checkpoint's cost follows what changed, not the state's size. Chunks
//! are never overwritten; once a manifest is down, chunks that neither
//! slot's manifest refers to are deleted ([`live_chunks`]). Restore reads
//! each chunk a manifest names and checks its length and CRC-32, as for
//! any part. There is no chain to replay or compact: every manifest names
//! all of its chunks, whichever generation wrote them.
//!
//! Two checkpoints are kept, in alternating slots. Start-up takes the newest
//! one that checks out; if it does not (a torn or damaged write), it says so
//! and takes the older one, and the log still reaches back that far because
//! retention never truncates below the older checkpoint. A view whose
//! fingerprint differs from the checkpoint's (its SQL changed) starts empty.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::StoredCheckpoint;
use crate::window::Watermark;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    #[error("checkpoint {what}: checksum mismatch or truncated: a partial write")]
    Partial { what: String },
    #[error("checkpoint manifest: {0}")]
    Manifest(String),
}

/// What a checkpoint says about the state it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The last log record whose effects the state includes.
    pub seq: u64,
    /// Wall time it was taken, epoch ms.
    pub taken_at: i64,
    pub streams: BTreeMap<String, Watermark>,
    pub views: BTreeMap<String, PartInfo>,
    /// Counts the checkpoints written; names the chunks this one wrote.
    /// (0 in checkpoints from before chunks.)
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub fingerprint: u64,
    /// Length and CRC of the part: the whole state, or with `chunked` its
    /// header.
    pub len: usize,
    pub crc: u32,
    /// The state is in chunks (`segments`), not in the part.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chunked: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<SegmentRef>,
}

/// One chunked sequence of a part: a view's groups, or one window's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    pub id: i64,
    pub chunks: Vec<ChunkRef>,
}

/// A stored chunk: the generation that wrote it, its length and CRC-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef(pub u64, pub u32, pub u32);

/// A checkpoint in memory: manifest and each view's snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub manifest: Manifest,
    /// Per part: the whole state, or with chunks its header.
    pub views: BTreeMap<String, Vec<u8>>,
    /// Per chunked part: each segment's id and its chunks' bytes, in order.
    pub chunks: BTreeMap<String, Segments>,
}

/// A chunked part's state as read back: per segment, its id and its
/// chunks' bytes in order.
pub type Segments = Vec<(i64, Vec<Vec<u8>>)>;

/// One chunked sequence of an operator's snapshot, as the writer sees it.
pub struct Segment {
    pub id: i64,
    /// The vector it was taken from, and the epoch its snapshot closed
    /// (`crate::window::cow::Chunks`).
    pub source: u64,
    pub epoch: u64,
    /// Per chunk, the epoch of its last write.
    pub stamps: Vec<u64>,
}

/// One part of a checkpoint not encoded yet: an operator's snapshot.
pub trait Part: Send {
    /// What is not in chunks (the watermark), encoded.
    fn header(&self) -> Result<Vec<u8>, String>;
    fn segments(&self) -> Vec<Segment>;
    /// Chunk `chunk` of segment `segment`, encoded.
    fn encode_chunk(&self, segment: usize, chunk: usize) -> Result<Vec<u8>, String>;
    /// Done with that chunk: the snapshot lets go of it.
    fn release_chunk(&mut self, segment: usize, chunk: usize);
}

/// A chunk's elements encoded (postcard) as a sequence, which the reader
/// decodes as a `Vec` of their owned form.
pub fn encode_seq<R: Serialize>(
    items: impl ExactSizeIterator<Item = R>,
) -> Result<Vec<u8>, String> {
    struct Seq<I>(std::cell::Cell<Option<I>>);
    impl<R: Serialize, I: ExactSizeIterator<Item = R>> Serialize for Seq<I> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            match self.0.take() {
                Some(items) => serializer.collect_seq(items),
                None => serializer.collect_seq(std::iter::empty::<R>()),
            }
        }
    }
    postcard::to_stdvec(&Seq(std::cell::Cell::new(Some(items)))).map_err(|e| e.to_string())
}

/// The store key of a chunk: part, segment, position, generation.
pub fn chunk_key(part: &str, segment: i64, index: usize, generation: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(part.len() + 23);
    key.extend_from_slice(CHUNK_PREFIX);
    key.extend_from_slice(part.as_bytes());
    key.push(0);
    key.extend_from_slice(&crate::window::operator::time_key(segment));
    key.extend_from_slice(&(index as u32).to_be_bytes());
    key.extend_from_slice(&generation.to_be_bytes());
    key
}

/// Every chunk key starts with this.
pub const CHUNK_PREFIX: &[u8] = b"c/";

/// The chunk keys a manifest refers to.
pub fn live_chunks(manifest: &Manifest, into: &mut HashSet<Vec<u8>>) {
    for (name, info) in &manifest.views {
        for seg in &info.segments {
            for (i, c) in seg.chunks.iter().enumerate() {
                into.insert(chunk_key(name, seg.id, i, c.0));
            }
        }
    }
}

/// What the last checkpoint written wrote, per (part, segment): the source
/// vector, the epoch, and the chunks. The next checkpoint reuses a chunk
/// from it when the same vector's chunk has not been written since.
#[derive(Debug, Default)]
pub struct Written {
    segments: HashMap<(String, i64), (u64, u64, Vec<ChunkRef>)>,
}

/// What writing a checkpoint did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes encoded and written (headers and new chunks).
    pub written: usize,
    /// Bytes of the state the checkpoint describes (with reused chunks).
    pub state: usize,
    pub chunks_written: usize,
    pub chunks_reused: usize,
}

/// A checkpoint as the pipeline takes it: what the manifest will say, and
/// the parts still to encode (on the checkpoint thread).
pub struct Pending {
    pub seq: u64,
    pub taken_at: i64,
    pub streams: BTreeMap<String, Watermark>,
    /// `(name, plan fingerprint, snapshot)`.
    pub parts: Vec<(String, u64, Box<dyn Part>)>,
    /// Positions in systems outside weir that this checkpoint includes (a
    /// reference table's Postgres LSN), each with where to publish it once
    /// both slots include it.
    pub positions: Vec<(Arc<std::sync::atomic::AtomicI64>, i64)>,
}

impl Pending {
    /// Writes the parts as generation `generation`: each header through
    /// `put_part` (name, bytes), each chunk not in `previous` through
    /// `put_chunk` ([`chunk_key`], bytes), encoding one at a time. Returns
    /// the manifest that describes them — it is the checkpoint once stored
    /// ([`Checkpoint::encode_manifest`]) — what to reuse from next time,
    /// and the figures.
    pub fn write_parts(
        self,
        generation: u64,
        previous: &Written,
        mut put_part: impl FnMut(&str, &[u8]) -> Result<(), String>,
        mut put_chunk: impl FnMut(&[u8], &[u8]) -> Result<(), String>,
    ) -> Result<(Manifest, Written, WriteStats), String> {
        let mut views = BTreeMap::new();
        let mut written = Written::default();
        let mut stats = WriteStats::default();
        for (name, fingerprint, mut part) in self.parts {
            let header = part.header().map_err(|e| format!("{name}: {e}"))?;
            put_part(&name, &header)?;
            stats.written += header.len();
            stats.state += header.len();
            let mut segments = Vec::new();
            for (s, seg) in part.segments().into_iter().enumerate() {
                let before = previous
                    .segments
                    .get(&(name.clone(), seg.id))
                    .filter(|(source, ..)| *source == seg.source);
                let mut chunks = Vec::with_capacity(seg.stamps.len());
                for (c, &stamp) in seg.stamps.iter().enumerate() {
                    let reuse = before
                        .filter(|(_, epoch, _)| stamp <= *epoch)
                        .and_then(|(.., refs)| refs.get(c));
                    let chunk = match reuse {
                        Some(&chunk) => {
                            stats.chunks_reused += 1;
                            chunk
                        }
                        None => {
                            let bytes = part
                                .encode_chunk(s, c)
                                .map_err(|e| format!("{name}: {e}"))?;
                            put_chunk(&chunk_key(&name, seg.id, c, generation), &bytes)?;
                            stats.chunks_written += 1;
                            stats.written += bytes.len();
                            ChunkRef(generation, bytes.len() as u32, crc32fast::hash(&bytes))
                        }
                    };
                    // the pipeline's next write there need not copy it
                    part.release_chunk(s, c);
                    stats.state += chunk.1 as usize;
                    chunks.push(chunk);
                }
                written.segments.insert(
                    (name.clone(), seg.id),
                    (seg.source, seg.epoch, chunks.clone()),
                );
                segments.push(SegmentRef { id: seg.id, chunks });
            }
            drop(part);
            views.insert(
                name,
                PartInfo {
                    fingerprint,
                    len: header.len(),
                    crc: crc32fast::hash(&header),
                    chunked: true,
                    segments,
                },
            );
        }
        let manifest = Manifest {
            seq: self.seq,
            taken_at: self.taken_at,
            streams: self.streams,
            views,
            generation,
        };
        Ok((manifest, written, stats))
    }
}

impl Checkpoint {
    /// Builds a checkpoint from view snapshots `(name, fingerprint, bytes)`.
    pub fn new(
        seq: u64,
        taken_at: i64,
        streams: BTreeMap<String, Watermark>,
        snapshots: Vec<(String, u64, Vec<u8>)>,
    ) -> Self {
        let mut views = BTreeMap::new();
        let mut infos = BTreeMap::new();
        for (name, fingerprint, bytes) in snapshots {
            infos.insert(
                name.clone(),
                PartInfo {
                    fingerprint,
                    len: bytes.len(),
                    crc: crc32fast::hash(&bytes),
                    chunked: false,
                    segments: Vec::new(),
                },
            );
            views.insert(name, bytes);
        }
        Self {
            manifest: Manifest {
                seq,
                taken_at,
                streams,
                views: infos,
                generation: 0,
            },
            views,
            chunks: BTreeMap::new(),
        }
    }

    pub fn size_bytes(&self) -> usize {
        let chunks: usize = self
            .chunks
            .values()
            .flat_map(|segments| segments.iter().flat_map(|(_, c)| c.iter().map(Vec::len)))
            .sum();
        self.views.values().map(Vec::len).sum::<usize>() + chunks
    }

    /// The checkpoint as the store keeps it; the parts move, not copy (at
    /// 100 000 terminals they are tens of megabytes).
    pub fn encode(self) -> Result<StoredCheckpoint, CheckpointError> {
        Ok(StoredCheckpoint {
            manifest: Self::encode_manifest(&self.manifest)?,
            parts: self.views.into_iter().collect(),
        })
    }

    /// The manifest as stored: JSON and its CRC-32.
    pub fn encode_manifest(manifest: &Manifest) -> Result<Vec<u8>, CheckpointError> {
        let mut bytes =
            serde_json::to_vec(manifest).map_err(|e| CheckpointError::Manifest(e.to_string()))?;
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        Ok(bytes)
    }

    /// Only the manifest: what the checkpoint holds, without reading the
    /// parts (`weir plan`). Its parts may still turn out damaged at start-up,
    /// and then the older checkpoint is used.
    pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest, CheckpointError> {
        let partial = |what: &str| CheckpointError::Partial {
            what: what.to_string(),
        };
        let (body, crc) = bytes
            .split_at_checked(bytes.len().wrapping_sub(4))
            .ok_or_else(|| partial("manifest"))?;
        let crc = u32::from_le_bytes(crc.try_into().map_err(|_| partial("manifest"))?);
        if crc32fast::hash(body) != crc {
            return Err(partial("manifest"));
        }
        let manifest: Manifest =
            serde_json::from_slice(body).map_err(|e| CheckpointError::Manifest(e.to_string()))?;
        Ok(manifest)
    }

    /// Checks the manifest's checksum and every part against the manifest
    /// (a checkpoint without chunks: see [`Checkpoint::decode_with`]).
    pub fn decode(stored: StoredCheckpoint) -> Result<Self, CheckpointError> {
        Self::decode_with(stored, |_| Ok(None))
    }

    /// Checks the manifest's checksum and every part and chunk against the
    /// manifest; `chunk` reads a chunk by its key ([`chunk_key`]).
    pub fn decode_with(
        stored: StoredCheckpoint,
        mut chunk: impl FnMut(&[u8]) -> Result<Option<Vec<u8>>, String>,
    ) -> Result<Self, CheckpointError> {
        let partial = |what: &str| CheckpointError::Partial {
            what: what.to_string(),
        };
        let manifest = Self::decode_manifest(&stored.manifest)?;
        let mut parts: BTreeMap<String, Vec<u8>> = stored.parts.into_iter().collect();
        let mut views = BTreeMap::new();
        let mut chunks = BTreeMap::new();
        for (name, info) in &manifest.views {
            let part = parts
                .remove(name)
                .ok_or_else(|| partial(&format!("part {name} (missing)")))?;
            if part.len() != info.len || crc32fast::hash(&part) != info.crc {
                return Err(partial(&format!("part {name}")));
            }
            views.insert(name.clone(), part);
            if !info.chunked {
                continue;
            }
            let mut segments = Vec::with_capacity(info.segments.len());
            for seg in &info.segments {
                let mut list = Vec::with_capacity(seg.chunks.len());
                for (i, c) in seg.chunks.iter().enumerate() {
                    let what = || format!("part {name} chunk {i} of segment {}", seg.id);
                    let bytes = chunk(&chunk_key(name, seg.id, i, c.0))
                        .map_err(|e| CheckpointError::Manifest(format!("{}: {e}", what())))?
                        .ok_or_else(|| partial(&format!("{} (missing)", what())))?;
                    if bytes.len() != c.1 as usize || crc32fast::hash(&bytes) != c.2 {
                        return Err(partial(&what()));
                    }
                    list.push(bytes);
                }
                segments.push((seg.id, list));
            }
            chunks.insert(name.clone(), segments);
        }
        Ok(Self {
            manifest,
            views,
            chunks,
        })
    }
}

/// A checkpoint store in memory, for tests: headers, chunks (never
/// overwritten) and what the next checkpoint may reuse.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct MemoryStore {
    parts: Vec<(String, Vec<u8>)>,
    chunks: HashMap<Vec<u8>, Vec<u8>>,
    previous: Written,
    generation: u64,
}

#[cfg(test)]
impl MemoryStore {
    /// Writes `part` as the only part of the next checkpoint.
    pub(crate) fn write(&mut self, name: &str, part: Box<dyn Part>) -> (Manifest, WriteStats) {
        self.generation += 1;
        let pending = Pending {
            positions: Vec::new(),
            seq: self.generation,
            taken_at: 7,
            streams: BTreeMap::new(),
            parts: vec![(name.to_string(), 1, part)],
        };
        self.parts.clear();
        let (manifest, written, stats) = pending
            .write_parts(
                self.generation,
                &self.previous,
                |name, bytes| {
                    self.parts.push((name.to_string(), bytes.to_vec()));
                    Ok(())
                },
                |key, bytes| {
                    let earlier = self.chunks.insert(key.to_vec(), bytes.to_vec());
                    assert!(earlier.is_none(), "a chunk was overwritten");
                    Ok(())
                },
            )
            .expect("written");
        self.previous = written;
        (manifest, stats)
    }

    /// The checkpoint `manifest` describes, read back as start-up does.
    pub(crate) fn read(&self, manifest: &Manifest) -> Result<Checkpoint, CheckpointError> {
        let stored = StoredCheckpoint {
            manifest: Checkpoint::encode_manifest(manifest)?,
            parts: self.parts.clone(),
        };
        Checkpoint::decode_with(stored, |key| Ok(self.chunks.get(key).cloned()))
    }
}

/// Writes `part` as the only part of a checkpoint and reads it back:
/// its header and segments, as restore gets them.
#[cfg(test)]
pub(crate) fn round_trip(part: Box<dyn Part>) -> (Vec<u8>, Segments) {
    let mut store = MemoryStore::default();
    let (manifest, _) = store.write("p", part);
    let mut cp = store.read(&manifest).expect("read back");
    let header = cp.views.remove("p").expect("header");
    (header, cp.chunks.remove("p").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let mut streams = BTreeMap::new();
        let mut w = Watermark::new(5_000, 5_000);
        w.observe(100_000, 1);
        streams.insert("telemetry".to_string(), w);
        Checkpoint::new(
            42,
            7,
            streams,
            vec![
                ("a".into(), 1, b"state of a".to_vec()),
                ("b".into(), 2, vec![0; 1000]),
            ],
        )
    }

    #[test]
    fn round_trips() {
        let cp = sample();
        assert_eq!(cp.size_bytes(), 1010);
        assert_eq!(
            Checkpoint::decode(cp.clone().encode().unwrap()).unwrap(),
            cp
        );
    }

    use crate::window::cow::{Chunks, CowVec};

    /// A part over one vector of numbers, chunked as operators are.
    struct Numbers(Chunks<u32>);

    impl Part for Numbers {
        fn header(&self) -> Result<Vec<u8>, String> {
            Ok(b"header".to_vec())
        }
        fn segments(&self) -> Vec<Segment> {
            vec![Segment {
                id: 3,
                source: self.0.source,
                epoch: self.0.epoch,
                stamps: self.0.stamps().to_vec(),
            }]
        }
        fn encode_chunk(&self, _: usize, chunk: usize) -> Result<Vec<u8>, String> {
            let c = self.0.chunk(chunk).ok_or("released")?;
            Ok(c.iter().flat_map(|n| n.to_le_bytes()).collect())
        }
        fn release_chunk(&mut self, _: usize, chunk: usize) {
            self.0.release(chunk);
        }
    }

    /// A store in memory holding checkpoints of one vector of numbers.
    #[derive(Default)]
    struct Kept(MemoryStore);

    impl Kept {
        fn write(&mut self, numbers: &CowVec<u32>) -> (Manifest, WriteStats) {
            self.0.write("n", Box::new(Numbers(numbers.snapshot())))
        }

        fn read(&self, manifest: &Manifest) -> Result<Vec<u32>, CheckpointError> {
            let cp = self.0.read(manifest)?;
            assert_eq!(cp.views["n"], b"header");
            let segments = &cp.chunks["n"];
            assert_eq!(segments.len(), 1);
            assert_eq!(segments[0].0, 3);
            Ok(segments[0]
                .1
                .iter()
                .flat_map(|c| c.chunks(4))
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect())
        }
    }

    #[test]
    fn a_checkpoint_written_chunk_by_chunk_reads_back_whole() {
        let numbers: CowVec<u32> = (0..2000).collect();
        let mut kept = Kept::default();
        let (manifest, stats) = kept.write(&numbers);
        assert_eq!(stats.chunks_written, 4);
        assert_eq!(stats.chunks_reused, 0);
        assert_eq!(stats.written, 6 + 2000 * 4);
        assert_eq!(kept.read(&manifest).unwrap(), (0..2000).collect::<Vec<_>>());
    }

    #[test]
    fn the_next_checkpoint_writes_only_the_chunks_that_changed() {
        let mut numbers: CowVec<u32> = (0..2000).collect();
        let mut kept = Kept::default();
        let (first, _) = kept.write(&numbers);
        *numbers.get_mut(700).unwrap() = 1;
        let (second, stats) = kept.write(&numbers);
        assert_eq!((stats.chunks_written, stats.chunks_reused), (1, 3));
        assert_eq!(stats.written, 6 + 512 * 4);
        assert_eq!(stats.state, 6 + 2000 * 4);
        let mut expect: Vec<u32> = (0..2000).collect();
        expect[700] = 1;
        assert_eq!(kept.read(&second).unwrap(), expect);
        // the first checkpoint still reads as it was: its chunks stay
        assert_eq!(kept.read(&first).unwrap(), (0..2000).collect::<Vec<_>>());
        // nothing changed: nothing but the header is written
        let (third, stats) = kept.write(&numbers);
        assert_eq!((stats.chunks_written, stats.chunks_reused), (0, 4));
        assert_eq!(kept.read(&third).unwrap(), expect);
        // the chunks the two newest manifests need, and no others
        let mut live = HashSet::new();
        live_chunks(&second, &mut live);
        live_chunks(&third, &mut live);
        assert_eq!(live.len(), 4);
        assert_eq!(kept.0.chunks.len(), 5);
        let mut only_first = HashSet::new();
        live_chunks(&first, &mut only_first);
        assert_eq!(only_first.difference(&live).count(), 1);
    }

    #[test]
    fn a_new_vector_in_the_same_place_is_written_whole() {
        let mut kept = Kept::default();
        kept.write(&(0..2000).collect());
        // a rebuilt operator: same part and segment, another vector
        let (manifest, stats) = kept.write(&(0..2000).map(|n| n + 1).collect());
        assert_eq!((stats.chunks_written, stats.chunks_reused), (4, 0));
        assert_eq!(kept.read(&manifest).unwrap(), (1..2001).collect::<Vec<_>>());
    }

    #[test]
    fn a_missing_or_damaged_chunk_fails_the_checkpoint() {
        let numbers: CowVec<u32> = (0..2000).collect();
        let mut kept = Kept::default();
        let (manifest, _) = kept.write(&numbers);
        let key = chunk_key("n", 3, 1, 1);
        let chunk = kept.0.chunks.get_mut(&key).unwrap();
        chunk[5] ^= 1;
        let err = kept.read(&manifest).unwrap_err().to_string();
        assert!(err.contains("part n chunk 1"), "{err}");
        kept.0.chunks.remove(&key);
        let err = kept.read(&manifest).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn a_torn_manifest_or_part_is_refused() {
        let stored = sample().encode().unwrap();
        let mut torn = stored.clone();
        torn.manifest.truncate(torn.manifest.len() - 3);
        assert!(matches!(
            Checkpoint::decode(torn),
            Err(CheckpointError::Partial { .. })
        ));
        let mut short_part = stored.clone();
        short_part.parts[1].1.truncate(10);
        let err = Checkpoint::decode(short_part).unwrap_err().to_string();
        assert!(err.contains("part b"), "{err}");
        let mut missing = stored;
        missing.parts.remove(0);
        assert!(Checkpoint::decode(missing)
            .unwrap_err()
            .to_string()
            .contains("missing"));
    }
}
