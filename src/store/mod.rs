//! The store: the only module that touches fjall.
//!
//! Keyspaces:
//! - `rows`: view rows. Key `view \0 suffix`, where the suffix comes from the
//!   operator (`window::operator::ViewOutput::keys`): window start and group
//!   key, group key, or event time and position — big-endian, so a range scan
//!   is a time range. Value: the row as a JSON object. Writes are upserts, so
//!   writing the same row twice (a replay) leaves one row.
//! - `deadletter`: rejected input. Key `received_at (BE) | sequence`; late
//!   events are keyed by `received_at | log sequence | row` instead, so that a
//!   replay rewrites the same letter rather than adding one.
//! - `meta`: small facts about views (the fingerprint of their plan).
//! - `log`: the ingest log (`crate::log`), key = sequence number (BE), value =
//!   an encoded record. Values are large, so the keyspace separates them
//!   into blob files (fjall's key-value separation).
//! - `logids`: the identities of each log record's QoS 1 messages, same key;
//!   small, so the dedup window is rebuilt at start-up without reading rows.
//! - `checkpoint`: two checkpoint slots (`crate::checkpoint`), each a
//!   `<slot>/manifest` and one `<slot>/part/<view>` per operator (its
//!   header); a slot is cleared, then written part by part, manifest last.
//!   The operators' state is in chunks beside them, `c/<part>\0<segment>
//!   <index><generation>`, which either slot's manifest may refer to; a
//!   chunk is never overwritten, and goes once no manifest refers to it.
//!
//! - `alerts`: alerts (`crate::alert::Alert`) as JSON, key = the alert's
//!   16-byte id, whose first 8 bytes are its opening time: a reverse scan
//!   lists the newest first.
//! - `alert_history`: each alert's transitions and acks, key = id | time |
//!   kind, so a replayed transition rewrites its entry.
//!
//! - `broker`: what weir's MQTT server keeps across restarts
//!   (`crate::source::server`): `s/<client id>` a persistent session (its
//!   expiry and subscriptions), `r/<topic>` a retained message.
//!
//! Durability: every commit reaches the operating system before it returns
//! (fjall's default), which survives kill -9; [`Store::persist`] adds an
//! fsync, which survives a power cut. fjall's journal is one sequential file
//! for all keyspaces, so a write is never durable before the writes made
//! ahead of it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions};

use crate::alert::{self, Alert, AlertEvent, AlertId, ChangeKind};
use crate::source::decode::Rejected;
use crate::window::operator::time_key;

/// Memtable size of every keyspace (fjall's default is 64 MiB).
const MEMTABLE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: String, source: fjall::Error },
    #[error("store {what}: {source}")]
    Io {
        what: &'static str,
        source: fjall::Error,
    },
    #[error("store {what}: corrupt value: {message}")]
    Corrupt { what: &'static str, message: String },
}

impl StoreError {
    /// Another process (a running weir) holds the store.
    pub fn is_locked(&self) -> bool {
        matches!(
            self,
            StoreError::Open {
                source: fjall::Error::Locked,
                ..
            }
        )
    }
}

/// A dead letter as stored and served (DESIGN §6); `received_at` is epoch ms.
pub type DeadLetter = Rejected;

/// One stored view row.
#[derive(Debug, Clone)]
pub struct StoredRow {
    /// Key without the view prefix; its first 8 bytes are a time for windowed and filter views.
    pub key: Vec<u8>,
    /// The row as a JSON object text, columns in SELECT order.
    pub json: String,
}

/// A page of a range scan.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Key to continue after, when more items may follow.
    pub next: Option<Vec<u8>>,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            next: None,
        }
    }
}

/// Cheap to clone: fjall handles are reference counted.
#[derive(Clone)]
pub struct Store {
    db: Database,
    rows: Keyspace,
    deadletter: Keyspace,
    meta: Keyspace,
    log: Keyspace,
    logids: Keyspace,
    checkpoint: Keyspace,
    alerts: Keyspace,
    alert_history: Keyspace,
    broker: Keyspace,
    /// Rows on their way to sinks: `<view>\0` + log seq + index -> the row's JSON.
    outbox_rows: Keyspace,
    /// Alert rules with sinks: their alert changes go to the outbox (the
    /// alert's id; the sink reads the record as it is when it delivers).
    sinked_rules: std::sync::Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
    outbox_counter: std::sync::Arc<AtomicU64>,
    /// Held across an alert's read-modify-write: the pipeline (transitions)
    /// and the API (acks) both update alerts.
    alert_lock: std::sync::Arc<std::sync::Mutex<()>>,
    dead_letter_seq: std::sync::Arc<AtomicU64>,
    /// Bytes of the dead letters (keys and values), in all and per stream,
    /// kept up to date on every write and delete; the quotas are checked
    /// against them.
    dead_letter_bytes: std::sync::Arc<AtomicU64>,
    dead_letter_stream_bytes: std::sync::Arc<std::sync::Mutex<HashMap<String, u64>>>,
    dir: std::sync::Arc<std::path::PathBuf>,
    /// The journal file `sync_journal` last synced, kept open.
    journal: std::sync::Arc<std::sync::Mutex<Option<(std::path::PathBuf, std::fs::File)>>>,
    /// Every log record below this sequence number has been deleted: the
    /// next retention pass starts its scan here (`truncate_log`).
    log_truncated_below: std::sync::Arc<AtomicU64>,
}

/// The sequence number an ingest log key holds (8 bytes, big-endian).
fn log_seq(key: &[u8]) -> Result<u64, StoreError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: "ingest log",
            message: format!("key of {} bytes", key.len()),
        })
}

/// A key and its value, as stored.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One record to append: its sequence number, encoded bytes, and packed message ids.
#[derive(Debug, Clone)]
pub struct LogAppend {
    pub seq: u64,
    pub record: Vec<u8>,
    pub ids: Vec<u8>,
}

/// A stored checkpoint: the manifest and the parts, as written.
#[derive(Debug, Clone, Default)]
pub struct StoredCheckpoint {
    pub manifest: Vec<u8>,
    pub parts: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn io(what: &'static str) -> impl Fn(fjall::Error) -> StoreError {
    move |source| StoreError::Io { what, source }
}

/// The stream a stored dead letter belongs to (empty if unreadable).
fn letter_stream(value: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Stream {
        #[serde(default)]
        stream: String,
    }
    serde_json::from_slice::<Stream>(value)
        .map(|s| s.stream)
        .unwrap_or_default()
}

fn dead_letter_json(r: &Rejected) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(r).map_err(|e| StoreError::Corrupt {
        what: "dead letter",
        message: e.to_string(),
    })
}

fn decode_alert(bytes: &[u8]) -> Result<Alert, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: "alert",
        message: e.to_string(),
    })
}

/// The outbox name of an alert rule's records (a view cannot be named so).
pub fn alert_outbox_name(rule: &str) -> String {
    format!("{ALERT_OUTBOX}{rule}")
}

const ALERT_OUTBOX: &str = "alert:";

fn alert_outbox(rule: &str) -> Vec<u8> {
    view_prefix(&alert_outbox_name(rule))
}

/// The rows of a view's outbox entry, one JSON object per line (JSON text
/// has no raw line breaks).
pub fn outbox_rows(entry: &[u8]) -> impl Iterator<Item = &[u8]> {
    entry.split(|&b| b == b'\n')
}

/// How many rows an outbox entry of `view` holds (an alert rule's: one id).
fn entry_rows(view: &str, entry: &[u8]) -> usize {
    if view.starts_with(ALERT_OUTBOX) {
        1
    } else {
        entry.iter().filter(|&&b| b == b'\n').count() + 1
    }
}

/// The key range of `view`'s outbox entries after position `after`.
fn outbox_after(view: &str, after: Option<&[u8]>) -> (Vec<u8>, Vec<u8>) {
    let prefix = view_prefix(view);
    let mut start = prefix.clone();
    if let Some(a) = after {
        start.extend_from_slice(a);
        start.push(0); // the smallest key greater than the position
    }
    let mut end = prefix;
    // the view name is followed by \0; \1 ends the prefix range
    if let Some(last) = end.last_mut() {
        *last = 1;
    }
    (start, end)
}

fn view_prefix(view: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(view.len() + 1);
    p.extend_from_slice(view.as_bytes());
    p.push(0);
    p
}

impl Store {
    /// Opens (or creates) the store in `dir` with the default block cache.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_with_cache(dir, crate::config::DEFAULT_CACHE_BYTES)
    }

    /// Opens the store with a block cache of `cache_bytes`
    /// (`storage.cache_bytes`).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(fjall::Error::from(e)))?;
        // (at 100 000 terminals the cache fills by 2-3 MiB a minute, most
        // likely with the alerts each transition reads back — not traced
        // per read: `weir_store_cache_bytes`)
        let db = Database::builder(dir)
            .cache_size(cache_bytes)
            .open()
            .map_err(open_err)?;
        // fjall gives every keyspace a 64 MiB memtable; weir writes to five
        // at a rate, so that alone could hold 320 MiB. 16 MiB keeps weir's
        // RSS within its budget at 100 000 terminals (BENCHMARKS.md,
        // "Memory") for a few more, smaller flushes.
        let plain = || KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES);
        let separated = || plain().with_kv_separation(Some(KvSeparationOptions::default()));
        let rows = db.keyspace("rows", plain).map_err(open_err)?;
        let deadletter = db.keyspace("deadletter", plain).map_err(open_err)?;
        let meta = db.keyspace("meta", plain).map_err(open_err)?;
        let log = db.keyspace("log", separated).map_err(open_err)?;
        let logids = db.keyspace("logids", plain).map_err(open_err)?;
        let checkpoint = db.keyspace("checkpoint", separated).map_err(open_err)?;
        let alerts = db.keyspace("alerts", plain).map_err(open_err)?;
        let alert_history = db.keyspace("alert_history", plain).map_err(open_err)?;
        let broker = db.keyspace("broker", plain).map_err(open_err)?;
        let outbox = db.keyspace("outbox", plain).map_err(open_err)?;
        // continue the dead-letter sequence after the newest stored one
        let seq = match deadletter.last_key_value() {
            Some(guard) => {
                let key = guard.key().map_err(open_err)?;
                key.get(8..16)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_be_bytes)
                    + 1
            }
            None => 0,
        };
        let mut letter_bytes = 0u64;
        let mut stream_bytes: HashMap<String, u64> = HashMap::new();
        for guard in deadletter.iter() {
            let (k, v) = guard.into_inner().map_err(io("count dead letters"))?;
            let size = (k.len() + v.len()) as u64;
            letter_bytes += size;
            *stream_bytes.entry(letter_stream(&v)).or_default() += size;
        }
        Ok(Store {
            dead_letter_bytes: std::sync::Arc::new(AtomicU64::new(letter_bytes)),
            dead_letter_stream_bytes: std::sync::Arc::new(std::sync::Mutex::new(stream_bytes)),
            db,
            rows,
            deadletter,
            meta,
            log,
            logids,
            checkpoint,
            alerts,
            alert_history,
            broker,
            outbox_rows: outbox,
            sinked_rules: Default::default(),
            outbox_counter: Default::default(),
            alert_lock: Default::default(),
            dead_letter_seq: std::sync::Arc::new(AtomicU64::new(seq)),
            dir: std::sync::Arc::new(dir.to_path_buf()),
            journal: Default::default(),
            log_truncated_below: Default::default(),
        })
    }

    /// Appends log records and the dead letters of the same micro-batch in
    /// one atomic batch. On return the bytes are with the operating system;
    /// call [`Store::persist`] to have them on disk.
    pub fn append_log(
        &self,
        records: &[LogAppend],
        letters: &[Rejected],
    ) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for r in records {
            let key = r.seq.to_be_bytes();
            batch.insert(&self.log, key, r.record.as_slice());
            if !r.ids.is_empty() {
                batch.insert(&self.logids, key, r.ids.as_slice());
            }
        }
        self.add_dead_letters(&mut batch, letters)?;
        batch.commit().map_err(io("append to the ingest log"))
    }

    /// fsyncs the journal: everything committed so far survives a power cut.
    pub fn persist(&self) -> Result<(), StoreError> {
        self.db
            .persist(fjall::PersistMode::SyncData)
            .map_err(io("sync the journal"))
    }

    /// fsyncs the active journal file through a descriptor of our own, so
    /// that appends — which take fjall's journal lock, held during
    /// [`Store::persist`] — do not wait for the disk. Sound because fjall
    /// hands every commit to the OS before it returns (the default, not
    /// manual, journal persistence), fully syncs a journal and its folder
    /// when it rotates to the next one, and the active journal is the
    /// highest-numbered `<n>.jnl` in the store's folder. Where that layout is
    /// not found, it falls back to [`Store::persist`].
    pub fn sync_journal(&self) -> Result<(), StoreError> {
        let newest = std::fs::read_dir(self.dir.as_path())
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let path = e.ok()?.path();
                let n: u64 = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".jnl")?
                    .parse()
                    .ok()?;
                Some((n, path))
            })
            .max_by_key(|(n, _)| *n);
        let Some((_, path)) = newest else {
            return self.persist();
        };
        let mut cached = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        if cached.as_ref().is_none_or(|(p, _)| *p != path) {
            let file = std::fs::File::open(&path)
                .map_err(|e| io("open the journal to sync it")(fjall::Error::from(e)))?;
            *cached = Some((path, file));
        }
        match cached.as_ref() {
            Some((_, file)) => file
                .sync_data()
                .map_err(|e| io("sync the journal")(fjall::Error::from(e))),
            None => self.persist(),
        }
    }

    /// Calls `f` with every log record after `after`, in order, until it returns false.
    pub fn scan_log(
        &self,
        after: u64,
        mut f: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let start = after.saturating_add(1).to_be_bytes();
        for guard in self.log.range(start..) {
            let (key, value) = guard.into_inner().map_err(io("read the ingest log"))?;
            if !f(log_seq(&key)?, &value) {
                break;
            }
        }
        Ok(())
    }

    /// The newest log record's sequence number.
    pub fn last_log_seq(&self) -> Result<Option<u64>, StoreError> {
        match self.log.last_key_value() {
            Some(guard) => log_seq(&guard.key().map_err(io("read the ingest log"))?).map(Some),
            None => Ok(None),
        }
    }

    /// The oldest record the log still holds.
    pub fn first_log_seq(&self) -> Result<Option<u64>, StoreError> {
        // from where retention ended: the tombstones before it are not read
        let from = self
            .log_truncated_below
            .load(Ordering::Relaxed)
            .to_be_bytes();
        match self.log.range(from..).next() {
            Some(guard) => log_seq(&guard.key().map_err(io("read the ingest log"))?).map(Some),
            None => Ok(None),
        }
    }

    /// Only the manifest of the checkpoint in `slot`, as written.
    pub fn read_checkpoint_manifest(&self, slot: u8) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .checkpoint
            .get(format!("{slot}/manifest"))
            .map_err(io("read checkpoint"))?
            .map(|m| m.to_vec()))
    }

    /// Removes one log record (a partial write found at start-up).
    pub fn remove_log_record(&self, seq: u64) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        batch.remove(&self.log, seq.to_be_bytes());
        batch.remove(&self.logids, seq.to_be_bytes());
        batch.commit().map_err(io("remove a log record"))
    }

    /// Packed message ids of the newest log records, newest first, until
    /// `enough` says the caller has what it needs.
    pub fn recent_log_ids(&self, mut enough: impl FnMut(&[u8]) -> bool) -> Result<(), StoreError> {
        for guard in self.logids.iter().rev() {
            let value = guard.value().map_err(io("read log ids"))?;
            if enough(&value) {
                break;
            }
        }
        Ok(())
    }

    /// Deletes log records with a sequence number below `below` (retention).
    pub fn truncate_log(&self, below: u64) -> Result<usize, StoreError> {
        // in chunks, so that a long backlog does not become one huge batch
        const CHUNK: usize = 1024;
        let end = below.to_be_bytes();
        // Start where the last pass ended, not at the log's first key: the
        // records before it are deleted, but their tombstones stay in the
        // tree until compaction drops them, and a scan from the start reads
        // through all of them (and their blocks, into the block cache) again
        // at every pass and every chunk.
        let mut from = self.log_truncated_below.load(Ordering::Relaxed);
        let mut n = 0;
        while from < below {
            let mut batch = self.db.batch();
            let mut in_batch = 0;
            let mut last = None;
            for guard in self.log.range(from.to_be_bytes()..end).take(CHUNK) {
                let key = guard.key().map_err(io("truncate the ingest log"))?;
                last = Some(log_seq(&key)?);
                batch.remove(&self.logids, key.clone());
                batch.remove(&self.log, key);
                in_batch += 1;
            }
            let Some(last) = last else { break };
            batch.commit().map_err(io("truncate the ingest log"))?;
            n += in_batch;
            // Every record up to `last` is gone, and none is appended there
            // later: sequence numbers only grow (`log::next_seq`).
            from = last + 1;
            self.log_truncated_below.fetch_max(from, Ordering::Relaxed);
            if in_batch < CHUNK {
                break;
            }
        }
        Ok(n)
    }

    /// Starts writing a checkpoint into `slot` part by part: removes the
    /// slot's manifest and parts (one batch), so until
    /// `put_checkpoint_manifest` the slot holds no checkpoint.
    pub fn clear_checkpoint(&self, slot: u8) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        batch.remove(&self.checkpoint, format!("{slot}/manifest"));
        for guard in self.checkpoint.prefix(format!("{slot}/part/")) {
            batch.remove(
                &self.checkpoint,
                guard.key().map_err(io("write checkpoint"))?,
            );
        }
        batch.commit().map_err(io("write checkpoint"))
    }

    /// One part of the checkpoint being written into `slot`.
    pub fn put_checkpoint_part(
        &self,
        slot: u8,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.checkpoint
            .insert(format!("{slot}/part/{name}"), bytes)
            .map_err(io("write checkpoint"))
    }

    /// The manifest, last: from here on the slot holds the checkpoint
    /// (once the journal is synced).
    pub fn put_checkpoint_manifest(&self, slot: u8, manifest: &[u8]) -> Result<(), StoreError> {
        self.checkpoint
            .insert(format!("{slot}/manifest"), manifest)
            .map_err(io("write checkpoint"))
    }

    /// A chunk of a checkpoint's state, under its key
    /// (`crate::checkpoint::chunk_key`). Chunks belong to no slot: a
    /// manifest in either slot may refer to them.
    pub fn put_checkpoint_chunk(&self, key: &[u8], bytes: &[u8]) -> Result<(), StoreError> {
        self.checkpoint
            .insert(key, bytes)
            .map_err(io("write checkpoint"))
    }

    pub fn read_checkpoint_chunk(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .checkpoint
            .get(key)
            .map_err(io("read checkpoint"))?
            .map(|v| v.to_vec()))
    }

    /// Removes every checkpoint chunk whose key `live` does not hold (the
    /// chunks no manifest refers to); returns how many went.
    pub fn remove_checkpoint_chunks_except(
        &self,
        live: impl Fn(&[u8]) -> bool,
    ) -> Result<usize, StoreError> {
        let mut batch = self.db.batch();
        let mut removed = 0;
        for guard in self.checkpoint.prefix(crate::checkpoint::CHUNK_PREFIX) {
            let key = guard.key().map_err(io("read checkpoint"))?;
            if !live(&key) {
                batch.remove(&self.checkpoint, key);
                removed += 1;
            }
        }
        batch.commit().map_err(io("write checkpoint"))?;
        Ok(removed)
    }

    /// The checkpoint in `slot`, as written.
    pub fn read_checkpoint(&self, slot: u8) -> Result<Option<StoredCheckpoint>, StoreError> {
        let Some(manifest) = self
            .checkpoint
            .get(format!("{slot}/manifest"))
            .map_err(io("read checkpoint"))?
        else {
            return Ok(None);
        };
        let prefix = format!("{slot}/part/");
        let mut parts = Vec::new();
        for guard in self.checkpoint.prefix(&prefix) {
            let (key, value) = guard.into_inner().map_err(io("read checkpoint"))?;
            let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            parts.push((name, value.to_vec()));
        }
        Ok(Some(StoredCheckpoint {
            manifest: manifest.to_vec(),
            parts,
        }))
    }

    /// Upserts rows of one view in one atomic batch.
    pub fn write_rows(
        &self,
        view: &str,
        rows: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<usize, StoreError> {
        self.write_rows_to_sinks(view, rows, None)
    }

    /// Writes rows; with `outbox = Some((seq, index))` the rows are also put
    /// in the sinks' outbox, in the same atomic batch: one entry, under `seq`
    /// and `index` (replaying the same log record writes the same entry
    /// again), holding the rows' JSON one per line. The next call for the
    /// same record passes `index` advanced by the rows written.
    pub fn write_rows_to_sinks(
        &self,
        view: &str,
        rows: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        outbox: Option<(u64, u32)>,
    ) -> Result<usize, StoreError> {
        let prefix = view_prefix(view);
        let mut batch = self.db.batch();
        let mut n = 0;
        let mut lines: Vec<u8> = Vec::new();
        for (suffix, value) in rows {
            let mut key = prefix.clone();
            key.extend_from_slice(&suffix);
            if outbox.is_some() {
                if n > 0 {
                    lines.push(b'\n');
                }
                lines.extend_from_slice(&value);
            }
            batch.insert(&self.rows, key, value);
            n += 1;
        }
        if let (Some((seq, index)), true) = (outbox, n > 0) {
            let mut o = prefix;
            o.extend_from_slice(&seq.to_be_bytes());
            o.extend_from_slice(&index.to_be_bytes());
            batch.insert(&self.outbox_rows, o, lines);
        }
        batch.commit().map_err(io("write rows"))?;
        Ok(n)
    }

    /// Alert rules whose records go to sinks.
    pub fn set_sinked_rules(&self, rules: impl IntoIterator<Item = String>) {
        *self.sinked_rules.write().unwrap_or_else(|e| e.into_inner()) = rules.into_iter().collect();
    }

    /// Outbox entries of `view` after position `after` (an outbox key
    /// suffix: seq + index), in order, until they hold `limit` rows or more:
    /// (suffix, entry). A view's entry holds rows of JSON one per line
    /// ([`outbox_rows`]); an alert rule's, one alert id.
    pub fn outbox(
        &self,
        view: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let (start, end) = outbox_after(view, after);
        let skip = view.len() + 1;
        let mut out = Vec::new();
        let mut rows = 0;
        for guard in self.outbox_rows.range(start..end) {
            let (k, v) = guard.into_inner().map_err(io("read outbox"))?;
            rows += entry_rows(view, &v);
            out.push((k[skip..].to_vec(), v.to_vec()));
            if rows >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Rows in the outbox entries of `view` after `after`, counted up to `cap`.
    pub fn outbox_len(
        &self,
        view: &str,
        after: Option<&[u8]>,
        cap: usize,
    ) -> Result<usize, StoreError> {
        let (start, end) = outbox_after(view, after);
        let mut n = 0;
        for guard in self.outbox_rows.range(start..end) {
            let (_, v) = guard.into_inner().map_err(io("count outbox"))?;
            n += entry_rows(view, &v);
            if n >= cap {
                return Ok(cap);
            }
        }
        Ok(n)
    }

    /// Removes `view`'s outbox entries after `from` (from the start when
    /// `None`) up to and including `upto`. (Start where the last trim
    /// ended: the removed entries' tombstones are not walked again.)
    pub fn trim_outbox(
        &self,
        view: &str,
        from: Option<&[u8]>,
        upto: &[u8],
    ) -> Result<usize, StoreError> {
        let mut prefix = view_prefix(view);
        let mut end = prefix.clone();
        end.extend_from_slice(upto);
        end.push(0);
        if let Some(f) = from {
            prefix.extend_from_slice(f);
        }
        let mut batch = self.db.batch();
        let mut n = 0;
        for guard in self.outbox_rows.range(prefix..end) {
            let key = guard.key().map_err(io("trim outbox"))?;
            batch.remove(&self.outbox_rows, key);
            n += 1;
        }
        batch.commit().map_err(io("trim outbox"))?;
        Ok(n)
    }

    /// Removes the outbox entries of every view or alert rule not in `keep`
    /// (a sink removed from the pipelines leaves its undelivered rows
    /// behind). Returns how many entries went.
    pub fn drop_outboxes_except(&self, keep: &HashSet<String>) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut batch = self.db.batch();
        for guard in self.outbox_rows.iter() {
            let key = guard.key().map_err(io("read outbox"))?;
            let name = key.split(|&b| b == 0).next().unwrap_or_default();
            if keep.contains(&*String::from_utf8_lossy(name)) {
                continue;
            }
            batch.remove(&self.outbox_rows, key);
            n += 1;
            if n % 10_000 == 0 {
                std::mem::replace(&mut batch, self.db.batch())
                    .commit()
                    .map_err(io("drop outbox"))?;
            }
        }
        batch.commit().map_err(io("drop outbox"))?;
        Ok(n)
    }

    pub fn write_dead_letters(&self, items: &[Rejected]) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch();
        self.add_dead_letters(&mut batch, items)?;
        batch.commit().map_err(io("write dead letters"))
    }

    fn add_dead_letters(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        items: &[Rejected],
    ) -> Result<(), StoreError> {
        let mut sizes = Vec::with_capacity(items.len());
        for r in items {
            let seq = self.dead_letter_seq.fetch_add(1, Ordering::Relaxed);
            let mut key = time_key(r.received_at).to_vec();
            key.extend_from_slice(&seq.to_be_bytes());
            let value = dead_letter_json(r)?;
            sizes.push((r.stream.as_str(), (key.len() + value.len()) as u64));
            batch.insert(&self.deadletter, key, value);
        }
        self.count_dead_letter_bytes(sizes);
        Ok(())
    }

    /// Writes dead letters under keys of the caller's choosing (after
    /// `received_at`): writing the same letter again replaces it.
    pub fn write_keyed_dead_letters(
        &self,
        items: &[(Vec<u8>, Rejected)],
    ) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch();
        let mut sizes = Vec::with_capacity(items.len());
        for (suffix, r) in items {
            let mut key = time_key(r.received_at).to_vec();
            key.extend_from_slice(suffix);
            let value = dead_letter_json(r)?;
            // (a rewrite of the same letter counts twice until trimmed: an
            // overestimate, on the safe side)
            sizes.push((r.stream.as_str(), (key.len() + value.len()) as u64));
            batch.insert(&self.deadletter, key, value);
        }
        batch.commit().map_err(io("write dead letters"))?;
        self.count_dead_letter_bytes(sizes);
        Ok(())
    }

    /// Rows of `view` with key suffix in `[from, to)`, after `cursor`, up to `limit` that pass `keep`.
    pub fn scan_rows(
        &self,
        view: &str,
        from: Option<&[u8]>,
        to: Option<&[u8]>,
        cursor: Option<&[u8]>,
        limit: usize,
        mut keep: impl FnMut(&str) -> bool,
    ) -> Result<Page<StoredRow>, StoreError> {
        let prefix = view_prefix(view);
        let with_prefix = |s: &[u8]| {
            let mut k = prefix.clone();
            k.extend_from_slice(s);
            k
        };
        let mut start = with_prefix(from.unwrap_or(&[]));
        if let Some(c) = cursor {
            let mut after = with_prefix(c);
            after.push(0); // the smallest key greater than the cursor
            if after > start {
                start = after;
            }
        }
        let end = match to {
            Some(t) => with_prefix(t),
            None => {
                let mut e = prefix.clone();
                // the view name is followed by \0; \1 ends the prefix range
                if let Some(last) = e.last_mut() {
                    *last = 1;
                }
                e
            }
        };
        let mut page = Page::default();
        if start >= end {
            return Ok(page);
        }
        for guard in self.rows.range(start..end) {
            let (key, value) = guard.into_inner().map_err(io("scan rows"))?;
            let json = String::from_utf8(value.to_vec()).map_err(|e| StoreError::Corrupt {
                what: "view row",
                message: e.to_string(),
            })?;
            let suffix = key[prefix.len()..].to_vec();
            if !keep(&json) {
                continue;
            }
            if page.items.len() == limit {
                page.next = page.items.last().map(|r: &StoredRow| r.key.clone());
                break;
            }
            page.items.push(StoredRow { key: suffix, json });
        }
        Ok(page)
    }

    /// Number of stored rows of a view (a key-only scan).
    pub fn count_rows(&self, view: &str) -> Result<usize, StoreError> {
        let mut n = 0;
        for guard in self.rows.prefix(view_prefix(view)) {
            guard.key().map_err(io("count rows"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Deletes every row of a view (its plan changed: the old rows are stale).
    pub fn clear_view(&self, view: &str) -> Result<usize, StoreError> {
        let mut batch = self.db.batch();
        let mut n = 0;
        for guard in self.rows.prefix(view_prefix(view)) {
            batch.remove(&self.rows, guard.key().map_err(io("clear view"))?);
            n += 1;
        }
        batch.commit().map_err(io("clear view"))?;
        Ok(n)
    }

    /// Deletes rows of a time-keyed view whose time is before `before` (retention).
    pub fn expire_rows(&self, view: &str, before: i64) -> Result<usize, StoreError> {
        let prefix = view_prefix(view);
        let mut end = prefix.clone();
        end.extend_from_slice(&time_key(before));
        let mut batch = self.db.batch();
        let mut n = 0;
        for guard in self.rows.range(prefix..end) {
            batch.remove(&self.rows, guard.key().map_err(io("expire rows"))?);
            n += 1;
        }
        batch.commit().map_err(io("expire rows"))?;
        Ok(n)
    }

    /// Deletes dead letters received before `before`.
    pub fn expire_dead_letters(&self, before: i64) -> Result<usize, StoreError> {
        let end = time_key(before).to_vec();
        let mut batch = self.db.batch();
        let mut gone = Vec::new();
        for guard in self.deadletter.range(..end) {
            let (k, v) = guard.into_inner().map_err(io("expire dead letters"))?;
            gone.push((letter_stream(&v), (k.len() + v.len()) as u64));
            batch.remove(&self.deadletter, k);
        }
        batch.commit().map_err(io("expire dead letters"))?;
        let n = gone.len();
        self.forget_dead_letter_bytes(gone);
        Ok(n)
    }

    /// Bytes the dead letters take (keys and values).
    pub fn dead_letter_bytes(&self) -> u64 {
        self.dead_letter_bytes.load(Ordering::Relaxed)
    }

    /// Bytes the dead letters of each stream take, largest first.
    pub fn dead_letter_bytes_by_stream(&self) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self
            .dead_letter_stream_bytes
            .lock()
            .map(|m| m.iter().map(|(s, b)| (s.clone(), *b)).collect())
            .unwrap_or_default();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all
    }

    fn count_dead_letter_bytes<'a>(&self, sizes: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut total = 0;
        if let Ok(mut streams) = self.dead_letter_stream_bytes.lock() {
            for (stream, size) in sizes {
                total += size;
                match streams.get_mut(stream) {
                    Some(b) => *b += size,
                    None => {
                        streams.insert(stream.to_string(), size);
                    }
                }
            }
        }
        self.dead_letter_bytes.fetch_add(total, Ordering::Relaxed);
    }

    fn forget_dead_letter_bytes(&self, gone: impl IntoIterator<Item = (String, u64)>) {
        let mut total = 0u64;
        if let Ok(mut streams) = self.dead_letter_stream_bytes.lock() {
            for (stream, size) in gone {
                total += size;
                if let Some(b) = streams.get_mut(&stream) {
                    *b = b.saturating_sub(size);
                    if *b == 0 {
                        streams.remove(&stream);
                    }
                }
            }
        }
        let _ = self
            .dead_letter_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(total))
            });
    }

    /// Deletes the oldest dead letters, in chunks, until they take at most
    /// `target` bytes. Returns how many went.
    pub fn trim_dead_letters(&self, target: u64) -> Result<usize, StoreError> {
        self.trim(None, target)
    }

    /// Deletes the oldest dead letters of `stream`, in chunks, until that
    /// stream's take at most `target` bytes (the other streams' stay).
    /// Returns how many went.
    pub fn trim_stream_dead_letters(&self, stream: &str, target: u64) -> Result<usize, StoreError> {
        self.trim(Some(stream), target)
    }

    fn stream_dead_letter_bytes(&self, stream: Option<&str>) -> u64 {
        match stream {
            None => self.dead_letter_bytes(),
            Some(s) => self
                .dead_letter_stream_bytes
                .lock()
                .ok()
                .and_then(|m| m.get(s).copied())
                .unwrap_or(0),
        }
    }

    fn trim(&self, stream: Option<&str>, target: u64) -> Result<usize, StoreError> {
        const CHUNK: usize = 10_000;
        let mut n = 0;
        // Where the previous chunk stopped: each chunk goes on from there
        // rather than scanning past the letters it kept again.
        let mut from: Option<Vec<u8>> = None;
        while self.stream_dead_letter_bytes(stream) > target {
            let mut batch = self.db.batch();
            let mut gone = Vec::new();
            let mut bytes = 0u64;
            let over = self.stream_dead_letter_bytes(stream) - target;
            let iter = match &from {
                Some(k) => self.deadletter.range(k.clone()..),
                None => self.deadletter.iter(),
            };
            let mut exhausted = true;
            for guard in iter {
                let (k, v) = guard.into_inner().map_err(io("trim dead letters"))?;
                let letter = letter_stream(&v);
                if stream.is_some_and(|s| s != letter) {
                    continue;
                }
                let size = (k.len() + v.len()) as u64;
                bytes += size;
                gone.push((letter, size));
                batch.remove(&self.deadletter, k.clone());
                if gone.len() == CHUNK || bytes >= over {
                    from = Some(k.to_vec());
                    exhausted = false;
                    break;
                }
            }
            if gone.is_empty() {
                // The count overestimated (rewritten letters): none are left.
                self.forget_all_dead_letter_bytes(stream);
                break;
            }
            batch.commit().map_err(io("trim dead letters"))?;
            n += gone.len();
            self.forget_dead_letter_bytes(gone);
            if exhausted {
                self.forget_all_dead_letter_bytes(stream);
                break;
            }
        }
        Ok(n)
    }

    /// After a scan found nothing more to delete: the count is zero.
    fn forget_all_dead_letter_bytes(&self, stream: Option<&str>) {
        match stream {
            None => {
                self.dead_letter_bytes.store(0, Ordering::Relaxed);
                if let Ok(mut m) = self.dead_letter_stream_bytes.lock() {
                    m.clear();
                }
            }
            Some(s) => {
                let left = self
                    .dead_letter_stream_bytes
                    .lock()
                    .ok()
                    .and_then(|mut m| m.remove(s))
                    .unwrap_or(0);
                let _ = self.dead_letter_bytes.fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |b| Some(b.saturating_sub(left)),
                );
            }
        }
    }

    /// Dead letters, newest first, that pass `keep`; `cursor` continues a previous page.
    pub fn dead_letters(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
        mut keep: impl FnMut(&DeadLetter) -> bool,
    ) -> Result<Page<DeadLetter>, StoreError> {
        let iter = match cursor {
            Some(c) => self.deadletter.range(..c.to_vec()),
            None => self.deadletter.iter(),
        };
        let mut page = Page::default();
        let mut last_key: Option<Vec<u8>> = None;
        for guard in iter.rev() {
            let (key, value) = guard.into_inner().map_err(io("scan dead letters"))?;
            let letter: DeadLetter =
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    what: "dead letter",
                    message: e.to_string(),
                })?;
            if !keep(&letter) {
                continue;
            }
            if page.items.len() == limit {
                page.next = last_key;
                break;
            }
            last_key = Some(key.to_vec());
            page.items.push(letter);
        }
        Ok(page)
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .meta
            .get(key)
            .map_err(io("read meta"))?
            .map(|v| v.to_vec()))
    }

    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(key, value).map_err(io("write meta"))
    }

    pub fn delete_meta(&self, key: &str) -> Result<(), StoreError> {
        self.meta.remove(key).map_err(io("write meta"))
    }

    /// Every meta entry whose key starts with `prefix`: (key, value).
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.meta.prefix(prefix) {
            let (key, value) = guard.into_inner().map_err(io("read meta"))?;
            out.push((String::from_utf8_lossy(&key).into_owned(), value.to_vec()));
        }
        Ok(out)
    }

    /// Sets the log record `seq` aside for good (its processing panicked),
    /// durably: replay skips it from now on.
    pub fn mark_poison(&self, seq: u64, why: &str) -> Result<(), StoreError> {
        let key = [b"poison/".as_slice(), &seq.to_be_bytes()].concat();
        self.meta
            .insert(key, why.as_bytes())
            .map_err(io("write poison mark"))?;
        self.sync()
    }

    /// Log records set aside by [`Store::mark_poison`].
    pub fn poisoned(&self) -> Result<std::collections::BTreeSet<u64>, StoreError> {
        let mut out = std::collections::BTreeSet::new();
        for guard in self.meta.prefix(b"poison/") {
            let (k, _) = guard.into_inner().map_err(io("read poison marks"))?;
            if let Some(seq) = k
                .get(7..15)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
            {
                out.insert(seq);
            }
        }
        Ok(out)
    }

    /// Writes (or, with `None`, removes) one of the MQTT server's records.
    pub fn put_broker(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.broker.insert(key, v).map_err(io("write broker state")),
            None => self.broker.remove(key).map_err(io("remove broker state")),
        }
    }

    /// Every MQTT server record whose key starts with `prefix`, in key order.
    pub fn broker_records(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        for guard in self.broker.prefix(prefix) {
            let (k, v) = guard.into_inner().map_err(io("read broker state"))?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Runs `f` with the alert lock held: an alert's read-modify-write must
    /// not interleave with another's.
    pub fn with_alert_lock<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        let _guard = self
            .alert_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(self)
    }

    pub fn get_alert(&self, id: &AlertId) -> Result<Option<Alert>, StoreError> {
        self.alerts
            .get(id)
            .map_err(io("read alert"))?
            .map(|bytes| decode_alert(&bytes))
            .transpose()
    }

    /// Stores alerts after a change and their history entries, in one batch.
    pub fn put_alert_events(&self, events: &[AlertEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let corrupt = |e: serde_json::Error| StoreError::Corrupt {
            what: "alert",
            message: e.to_string(),
        };
        let mut batch = self.db.batch();
        let sinked = self
            .sinked_rules
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for event in events {
            let Some(id) = alert::record::parse_id(&event.alert.id) else {
                continue;
            };
            if sinked.contains(&event.alert.rule) {
                // ordered by wall time, then by a counter (acks come from the API)
                let n = self.outbox_counter.fetch_add(1, Ordering::Relaxed);
                let mut o = alert_outbox(&event.alert.rule);
                o.extend_from_slice(&crate::log::seq_at(crate::obs::now_ms()).to_be_bytes());
                o.extend_from_slice(&(n as u32).to_be_bytes());
                batch.insert(&self.outbox_rows, o, id.to_vec());
            }
            batch.insert(
                &self.alerts,
                id,
                serde_json::to_vec(&event.alert).map_err(corrupt)?,
            );
            let mut key = id.to_vec();
            key.extend_from_slice(&time_key(event.at));
            key.push(event.change.code());
            let row = match event.change {
                ChangeKind::Opened => Some(&event.alert.fired_by),
                ChangeKind::Resolved => event.alert.cleared_by.as_ref(),
                ChangeKind::Acked => None,
            };
            let entry = serde_json::json!({
                "change": event.change,
                "at": crate::obs::format_time(event.at),
                "row": row,
            });
            batch.insert(
                &self.alert_history,
                key,
                serde_json::to_vec(&entry).map_err(corrupt)?,
            );
        }
        batch.commit().map_err(io("write alerts"))
    }

    /// An alert's history entries, oldest first, as JSON texts.
    pub fn alert_history(&self, id: &AlertId) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for guard in self.alert_history.prefix(id) {
            let (_, value) = guard.into_inner().map_err(io("read alert history"))?;
            out.push(String::from_utf8_lossy(&value).into_owned());
        }
        Ok(out)
    }

    /// Alerts newest first (by opening time) that opened at or after
    /// `since` and pass `keep`; `cursor` (an id) continues a previous page.
    pub fn alerts(
        &self,
        since: Option<i64>,
        cursor: Option<&AlertId>,
        limit: usize,
        mut keep: impl FnMut(&Alert) -> bool,
    ) -> Result<Page<Alert>, StoreError> {
        let low = since.map_or(Vec::new(), |t| time_key(t).to_vec());
        if cursor.is_some_and(|c| c.as_slice() <= low.as_slice()) {
            return Ok(Page::default()); // the cursor is already before `since`
        }
        let iter = match cursor {
            Some(c) => self.alerts.range(low..c.to_vec()),
            None => self.alerts.range(low..),
        };
        let mut page = Page::default();
        for guard in iter.rev() {
            let (_, value) = guard.into_inner().map_err(io("scan alerts"))?;
            let alert = decode_alert(&value)?;
            if !keep(&alert) {
                continue;
            }
            if page.items.len() == limit {
                page.next = page
                    .items
                    .last()
                    .and_then(|a: &Alert| alert::record::parse_id(&a.id))
                    .map(|id| id.to_vec());
                break;
            }
            page.items.push(alert);
        }
        Ok(page)
    }

    /// Deletes resolved alerts (and their history) that resolved before `before`.
    pub fn expire_alerts(&self, before: i64) -> Result<usize, StoreError> {
        let mut batch = self.db.batch();
        let mut n = 0;
        for guard in self.alerts.range(..time_key(before).to_vec()) {
            let (key, value) = guard.into_inner().map_err(io("expire alerts"))?;
            let Ok(alert) = decode_alert(&value) else {
                continue;
            };
            if alert.resolved_at.is_some_and(|r| r < before) {
                batch.remove(&self.alerts, key.clone());
                for h in self.alert_history.prefix(&key) {
                    batch.remove(&self.alert_history, h.key().map_err(io("expire alerts"))?);
                }
                n += 1;
            }
        }
        batch.commit().map_err(io("expire alerts"))?;
        Ok(n)
    }

    /// Bytes on disk.
    pub fn disk_space(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// Bytes held in memtables (active and sealed, every keyspace): what
    /// the store keeps in memory besides its block cache. (fjall marks the
    /// call experimental; it reads one counter.)
    pub fn memtable_bytes(&self) -> u64 {
        self.db.write_buffer_size()
    }

    /// Bytes of blocks in the store's block cache (`storage.cache_bytes` at
    /// most): it fills as blocks are read back (alert read-modify-writes,
    /// queries, the log's retention scan) and stays at its capacity after.
    pub fn cache_bytes(&self) -> u64 {
        self.db.cache_size()
    }

    /// Flushes the journal to disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(io("sync"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::decode::RejectReason;

    fn row(v: i64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"v": v})).unwrap()
    }

    #[test]
    fn log_retention_truncates_below_a_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let appends: Vec<LogAppend> = (1..=5u64)
            .map(|seq| LogAppend {
                seq,
                record: vec![seq as u8],
                ids: vec![seq as u8; 10],
            })
            .collect();
        store.append_log(&appends, &[]).unwrap();
        assert_eq!(store.truncate_log(3).unwrap(), 2);
        let mut left = Vec::new();
        store
            .scan_log(0, |seq, bytes| {
                left.push((seq, bytes.to_vec()));
                true
            })
            .unwrap();
        assert_eq!(left, vec![(3, vec![3]), (4, vec![4]), (5, vec![5])]);
        let mut ids = Vec::new();
        store
            .recent_log_ids(|packed| {
                ids.push(packed[0]);
                false
            })
            .unwrap();
        assert_eq!(ids, vec![5, 4, 3], "ids of truncated records go too");
        assert_eq!(store.last_log_seq().unwrap(), Some(5));
    }

    #[test]
    fn each_retention_pass_starts_where_the_last_one_ended() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let append = |seqs: std::ops::RangeInclusive<u64>| {
            let appends: Vec<LogAppend> = seqs
                .map(|seq| LogAppend {
                    seq,
                    record: seq.to_be_bytes().to_vec(),
                    ids: vec![1],
                })
                .collect();
            store.append_log(&appends, &[]).unwrap();
        };
        let first_left = || {
            let mut first = None;
            store
                .scan_log(0, |seq, _| {
                    first = Some(seq);
                    false
                })
                .unwrap();
            first
        };
        // more than one chunk of 1 024 in a pass
        append(1..=3000);
        assert_eq!(store.truncate_log(2500).unwrap(), 2499);
        assert_eq!(first_left(), Some(2500));
        assert_eq!(store.first_log_seq().unwrap(), Some(2500));
        // what came since, and what was left below the next floor
        append(3001..=4000);
        assert_eq!(store.truncate_log(3500).unwrap(), 1000);
        assert_eq!(first_left(), Some(3500));
        assert_eq!(store.truncate_log(3500).unwrap(), 0, "nothing twice");
        assert_eq!(
            store.truncate_log(100).unwrap(),
            0,
            "a lower floor removes nothing"
        );
        assert_eq!(first_left(), Some(3500));
        // a reopened store starts from the log's start again
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.first_log_seq().unwrap(), Some(3500));
        assert_eq!(store.truncate_log(3600).unwrap(), 100);
        assert_eq!(store.first_log_seq().unwrap(), Some(3600));
        assert_eq!(store.last_log_seq().unwrap(), Some(4000));
    }

    #[test]
    fn the_journal_is_synced_through_its_own_file() {
        // Guards the layout `sync_journal` relies on: if fjall stops keeping
        // `<n>.jnl` in the store's folder, this fails instead of weir
        // silently falling back to the slower locked sync.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let append = LogAppend {
            seq: 1,
            record: vec![1, 2, 3],
            ids: Vec::new(),
        };
        store.append_log(&[append], &[]).unwrap();
        store.sync_journal().unwrap();
        let cached = store.journal.lock().unwrap();
        let (path, _) = cached.as_ref().expect("the active journal was found");
        assert!(path.to_string_lossy().ends_with(".jnl"), "{path:?}");
    }

    #[test]
    fn outbox_entries_hold_a_writes_rows_and_replays_write_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rows = |from: i64, n: i64| (from..from + n).map(|v| (v.to_be_bytes().to_vec(), row(v)));
        assert_eq!(
            store
                .write_rows_to_sinks("v", rows(0, 3), Some((7, 0)))
                .unwrap(),
            3
        );
        assert_eq!(
            store
                .write_rows_to_sinks("v", rows(3, 2), Some((7, 3)))
                .unwrap(),
            2
        );
        // a replay of the first write after a crash: the same entry, not a third
        store
            .write_rows_to_sinks("v", rows(0, 3), Some((7, 0)))
            .unwrap();
        store.write_rows_to_sinks("w", rows(0, 1), None).unwrap();
        let all = store.outbox("v", None, 1000).unwrap();
        assert_eq!(all.len(), 2);
        let delivered: Vec<Vec<u8>> = all
            .iter()
            .flat_map(|(_, entry)| outbox_rows(entry).map(<[u8]>::to_vec).collect::<Vec<_>>())
            .collect();
        assert_eq!(delivered, (0..5).map(row).collect::<Vec<_>>());
        assert_eq!(store.outbox_len("v", None, 1000).unwrap(), 5);
        assert_eq!(store.outbox_len("v", None, 4).unwrap(), 4);
        // reading stops once the entries hold the limit's rows
        assert_eq!(store.outbox("v", None, 2).unwrap().len(), 1);
        let first = all[0].0.clone();
        assert_eq!(store.outbox("v", Some(&first), 1000).unwrap(), all[1..]);
        assert_eq!(store.outbox_len("v", Some(&first), 1000).unwrap(), 2);
        store.trim_outbox("v", None, &first).unwrap();
        assert_eq!(store.outbox("v", None, 1000).unwrap(), all[1..]);
        assert!(store.outbox("w", None, 1000).unwrap().is_empty());
        // a sink of "v" removed, one of "v2" kept ("v" is a prefix of its name)
        store
            .write_rows_to_sinks("v2", rows(0, 2), Some((8, 0)))
            .unwrap();
        let keep: HashSet<String> = ["v2".to_string()].into();
        assert_eq!(store.drop_outboxes_except(&keep).unwrap(), 1);
        assert!(store.outbox("v", None, 1000).unwrap().is_empty());
        assert_eq!(store.outbox_len("v2", None, 1000).unwrap(), 2);
    }

    #[test]
    fn upserts_ranges_and_paging() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = |t: i64, k: &str| {
            let mut key = time_key(t).to_vec();
            key.extend_from_slice(k.as_bytes());
            key
        };
        store
            .write_rows(
                "v",
                vec![
                    (key(0, "a"), row(1)),
                    (key(60_000, "a"), row(2)),
                    (key(60_000, "b"), row(3)),
                ],
            )
            .unwrap();
        store.write_rows("v", vec![(key(0, "a"), row(10))]).unwrap(); // upsert
        store
            .write_rows("v2", vec![(key(0, "a"), row(99))])
            .unwrap();
        assert_eq!(store.count_rows("v").unwrap(), 3);
        let all = store
            .scan_rows("v", None, None, None, 10, |_| true)
            .unwrap();
        let v = |r: &StoredRow| {
            serde_json::from_str::<serde_json::Value>(&r.json).unwrap()["v"]
                .as_i64()
                .unwrap()
        };
        let values: Vec<_> = all.items.iter().map(v).collect();
        assert_eq!(values, vec![10, 2, 3]);
        let range = store
            .scan_rows(
                "v",
                Some(&time_key(60_000)),
                Some(&time_key(120_000)),
                None,
                10,
                |_| true,
            )
            .unwrap();
        assert_eq!(range.items.len(), 2);
        let first = store.scan_rows("v", None, None, None, 2, |_| true).unwrap();
        assert_eq!(first.items.len(), 2);
        let rest = store
            .scan_rows("v", None, None, first.next.as_deref(), 2, |_| true)
            .unwrap();
        assert_eq!(rest.items.len(), 1);
        assert_eq!(v(&rest.items[0]), 3);
        assert!(rest.next.is_none());
        assert_eq!(store.expire_rows("v", 60_000).unwrap(), 1);
        assert_eq!(store.clear_view("v").unwrap(), 2);
        assert_eq!(store.count_rows("v2").unwrap(), 1);
    }

    #[test]
    fn a_streams_quota_trims_only_its_oldest_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let letter = |stream: &str, t: i64| Rejected {
            stream: stream.into(),
            topic: "t".into(),
            reason: RejectReason::Malformed,
            detail: String::new(),
            payload: "x".repeat(100),
            received_at: t,
            rows: 1,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            let mut all: Vec<Rejected> = (0..5).map(|t| letter("quiet", t)).collect();
            all.extend((5..105).map(|t| letter("loud", t)));
            store.write_dead_letters(&all).unwrap();
        }
        // The per-stream counts are rebuilt when the store opens.
        let store = Store::open(dir.path()).unwrap();
        let by_stream = store.dead_letter_bytes_by_stream();
        assert_eq!(by_stream[0].0, "loud");
        assert_eq!(by_stream[1].0, "quiet");
        let loud = by_stream[0].1;
        let n = store.trim_stream_dead_letters("loud", loud / 2).unwrap();
        assert!((50..60).contains(&n), "{n} deleted");
        let kept = store.dead_letters(None, 1000, |_| true).unwrap().items;
        let quiet = kept.iter().filter(|d| d.stream == "quiet").count();
        assert_eq!(quiet, 5, "the other stream's letters stay");
        let oldest_loud = kept
            .iter()
            .filter(|d| d.stream == "loud")
            .map(|d| d.received_at)
            .min();
        assert_eq!(oldest_loud, Some(5 + n as i64), "the oldest went first");
        assert!(store.dead_letter_bytes_by_stream()[0].1 <= loud / 2);
        assert_eq!(
            store.dead_letter_bytes(),
            store
                .dead_letter_bytes_by_stream()
                .iter()
                .map(|s| s.1)
                .sum::<u64>()
        );
    }

    #[test]
    fn dead_letters_newest_first_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let letter = |t: i64, reason| Rejected {
            stream: "s".into(),
            topic: "t".into(),
            reason,
            detail: format!("d{t}"),
            payload: "{}".into(),
            received_at: t,
            rows: 1,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write_dead_letters(&[
                    letter(1, RejectReason::Malformed),
                    letter(2, RejectReason::Schema),
                ])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        store
            .write_dead_letters(&[letter(3, RejectReason::Malformed)])
            .unwrap();
        let page = store.dead_letters(None, 2, |_| true).unwrap();
        assert_eq!(
            page.items.iter().map(|d| d.received_at).collect::<Vec<_>>(),
            vec![3, 2]
        );
        let next = store
            .dead_letters(page.next.as_deref(), 2, |_| true)
            .unwrap();
        assert_eq!(
            next.items.iter().map(|d| d.received_at).collect::<Vec<_>>(),
            vec![1]
        );
        let malformed = store
            .dead_letters(None, 10, |d| d.reason == RejectReason::Malformed)
            .unwrap();
        assert_eq!(malformed.items.len(), 2);
    }
}
