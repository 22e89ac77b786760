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
//! Two checkpoints are kept, in alternating slots. Start-up takes the newest
//! one that checks out; if it does not (a torn or damaged write), it says so
//! and takes the older one, and the log still reaches back that far because
//! retention never truncates below the older checkpoint. A view whose
//! fingerprint differs from the checkpoint's (its SQL changed) starts empty.

use std::collections::BTreeMap;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub fingerprint: u64,
    pub len: usize,
    pub crc: u32,
}

/// A checkpoint in memory: manifest and each view's snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub manifest: Manifest,
    pub views: BTreeMap<String, Vec<u8>>,
}

/// One part of a checkpoint not encoded yet: an operator's snapshot.
pub trait Part: Send {
    fn encode(&self) -> Result<Vec<u8>, String>;
}

/// A checkpoint as the pipeline takes it: what the manifest will say, and
/// the parts still to encode (on the checkpoint thread).
pub struct Pending {
    pub seq: u64,
    pub taken_at: i64,
    pub streams: BTreeMap<String, Watermark>,
    /// `(name, plan fingerprint, snapshot)`.
    pub parts: Vec<(String, u64, Box<dyn Part>)>,
}

impl Pending {
    /// Encodes each part and hands it to `put` (name, bytes) one at a
    /// time, then returns the manifest that describes them, encoded
    /// ([`Checkpoint::encode_manifest`]), and the parts' total size.
    pub fn write_parts(
        self,
        mut put: impl FnMut(&str, &[u8]) -> Result<(), String>,
    ) -> Result<(Vec<u8>, usize), String> {
        let mut views = BTreeMap::new();
        let mut total = 0;
        for (name, fingerprint, part) in self.parts {
            let bytes = part.encode().map_err(|e| format!("{name}: {e}"))?;
            drop(part); // the snapshot's shared chunks go back to the pipeline
            put(&name, &bytes)?;
            total += bytes.len();
            views.insert(
                name,
                PartInfo {
                    fingerprint,
                    len: bytes.len(),
                    crc: crc32fast::hash(&bytes),
                },
            );
        }
        let manifest = Manifest {
            seq: self.seq,
            taken_at: self.taken_at,
            streams: self.streams,
            views,
        };
        let bytes = Checkpoint::encode_manifest(&manifest).map_err(|e| e.to_string())?;
        Ok((bytes, total))
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
            },
            views,
        }
    }

    pub fn size_bytes(&self) -> usize {
        self.views.values().map(Vec::len).sum()
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

    /// Checks the manifest's checksum and every part against the manifest.
    pub fn decode(stored: StoredCheckpoint) -> Result<Self, CheckpointError> {
        let partial = |what: &str| CheckpointError::Partial {
            what: what.to_string(),
        };
        let manifest = Self::decode_manifest(&stored.manifest)?;
        let mut parts: BTreeMap<String, Vec<u8>> = stored.parts.into_iter().collect();
        let mut views = BTreeMap::new();
        for (name, info) in &manifest.views {
            let part = parts
                .remove(name)
                .ok_or_else(|| partial(&format!("part {name} (missing)")))?;
            if part.len() != info.len || crc32fast::hash(&part) != info.crc {
                return Err(partial(&format!("part {name}")));
            }
            views.insert(name.clone(), part);
        }
        Ok(Self { manifest, views })
    }
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

    struct Bytes(Vec<u8>);

    impl Part for Bytes {
        fn encode(&self) -> Result<Vec<u8>, String> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn a_pending_checkpoint_written_part_by_part_reads_back_as_the_same_checkpoint() {
        let cp = sample();
        let pending = Pending {
            seq: cp.manifest.seq,
            taken_at: cp.manifest.taken_at,
            streams: cp.manifest.streams.clone(),
            parts: vec![
                ("a".into(), 1, Box::new(Bytes(b"state of a".to_vec()))),
                ("b".into(), 2, Box::new(Bytes(vec![0; 1000]))),
            ],
        };
        let mut parts = Vec::new();
        let (manifest, total) = pending
            .write_parts(|name, bytes| {
                parts.push((name.to_string(), bytes.to_vec()));
                Ok(())
            })
            .unwrap();
        assert_eq!(total, 1010);
        let stored = StoredCheckpoint { manifest, parts };
        assert_eq!(Checkpoint::decode(stored).unwrap(), cp);
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
