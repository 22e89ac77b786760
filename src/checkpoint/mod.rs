//! Checkpoints: all operator state and the ingest-log position, in one
//! atomic write.
//!
//! A checkpoint is a manifest — the sequence number of the last log record
//! whose effects it holds, every stream's watermark, and each view's plan
//! fingerprint with the length and CRC-32 of its part — plus one part per
//! view: the operator's snapshot (`ViewOperator::snapshot`). The store
//! writes a checkpoint with one fjall batch, so it is all there or not at
//! all.
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
        let mut manifest = serde_json::to_vec(&self.manifest)
            .map_err(|e| CheckpointError::Manifest(e.to_string()))?;
        let crc = crc32fast::hash(&manifest);
        manifest.extend_from_slice(&crc.to_le_bytes());
        Ok(StoredCheckpoint {
            manifest,
            parts: self.views.into_iter().collect(),
        })
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
