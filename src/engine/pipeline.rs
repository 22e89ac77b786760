//! The pipeline thread: log, views, checkpoints.
//!
//! One micro-batch (everything queued, up to `MAX_BATCH_MESSAGES`) goes
//! through three steps:
//!
//! 1. **prepare**, on the prepare thread (`engine/prepare.rs`), while this
//!    one works on the micro-batch before: drop redeliveries already logged
//!    (`crate::log::Dedup`), route messages to streams, decode each stream's
//!    messages into one Arrow batch, encode the log records;
//! 2. **commit** (here, from now on), with the records' sequence numbers: append the records and the micro-batch's dead letters in
//!    one atomic store batch. Only once that is durable are the QoS 1
//!    messages acknowledged: with `storage.durability = "sync"` the acks go
//!    to the sync thread, which fsyncs once for everything queued since its
//!    last sync (group commit) and then releases them, while this thread
//!    goes on applying; with `"buffered"` they are released at once. If the
//!    store refuses the write, nothing is acknowledged: the batch is retried
//!    with backoff, `/healthz` reports the error, and the full queue stops
//!    intake;
//! 3. **apply**: run the views on each record, in dependency order, and
//!    upsert their rows.
//!
//! Replay at start-up is step 3 alone, on the records after the checkpoint,
//! so a replayed record has exactly the effect it had the first time: the
//! same batch sequence numbers (filter-view row keys), the same arrival
//! times (the idle clock), and logged watermark moves in the same places.
//!
//! Every `checkpoint_interval`, between two micro-batches, all operator
//! state, the watermarks and the last applied sequence number are written as
//! one checkpoint (`crate::checkpoint`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::UInt32Array;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::prepare::{Prepared, Preparer};
use super::EngineError;
use crate::alert::{AlertState, ChangeKind, RuleOperator};
use crate::checkpoint::{Checkpoint, Part, Pending};
use crate::config::Durability;
use crate::log::{self, Dedup, LogError, MessageMeta, Record};
use crate::obs::{now_ms, AlertMetrics, Health, Metrics, StreamMetrics, ViewMetrics};
use crate::plan::{Pipeline, StreamDef, TableDef, Upstream, ViewPlan};
use crate::sink::{self, notify::Notifier};
use crate::source::decode::{AckToken, Message, RejectReason, Rejected};
use crate::store::{LogAppend, Store, StoreError};
use crate::window::operator::{EventBatch, ViewOperator, ViewOutput};
use crate::window::Watermark;

/// Where a view or rule reading `upstream` gets its input: the index of
/// the stream at the root of its inputs, and of the view it reads, if any
/// (among `planned`, whose root streams are `roots`).
fn locate(
    name: &str,
    upstream: &Upstream,
    streams: &[StreamRuntime],
    planned: &[Arc<ViewPlan>],
    roots: &[usize],
) -> Result<(usize, Option<usize>), EngineError> {
    let (root, upstream_view) = match upstream {
        Upstream::Stream(s) => (streams.iter().position(|x| &x.def.name == s), None),
        Upstream::View(u) => {
            let up = planned.iter().position(|x| &x.name == u);
            (up.and_then(|u| roots.get(u).copied()), up)
        }
    };
    match root {
        Some(root) => Ok((root, upstream_view)),
        None => Err(EngineError::View {
            view: name.to_string(),
            message: "upstream not found".into(),
        }),
    }
}

fn roots(views: &[ViewRuntime]) -> Vec<usize> {
    views.iter().map(|v| v.root).collect()
}

/// The checkpoint part of an alert rule (views and rules share one namespace).
/// A reference table's checkpoint part.
fn table_part(table: &str) -> String {
    format!("table:{table}")
}

/// What decides a table's rows: its declaration.
fn table_fingerprint(t: &TableDef) -> u64 {
    crate::plan::fingerprint(&[&crate::plan::without_comments(&t.sql)])
}

fn alert_part(rule: &str) -> String {
    format!("alert:{rule}")
}

/// A rule whose state was not restored takes over the alerts the store
/// shows open for it, so that they still resolve.
fn adopt_open_alerts(store: &Store, operator: &mut RuleOperator) {
    let rule = operator.plan().name.clone();
    let page = store.alerts(None, None, usize::MAX, |a| {
        a.rule == rule && a.state == AlertState::Firing
    });
    match page {
        Ok(page) => {
            for a in page.items {
                operator.adopt_open(a.key, a.opened_at);
            }
        }
        Err(e) => tracing::error!(%rule, error = %e, "cannot read the rule's open alerts"),
    }
}

impl AlertRuntime {
    fn publish_metrics(&self) {
        self.metrics
            .firing
            .store(self.operator.open_alerts() as u64, Ordering::Relaxed);
        self.metrics
            .keys
            .store(self.operator.keys() as u64, Ordering::Relaxed);
    }
}

/// How often idle streams are checked and their watermarks moved.
const TICK: Duration = Duration::from_millis(250);
/// Longest wait between two attempts to write to a failing store.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Row ids of view outputs fed downstream on a watermark start here, so they
/// never collide with those fed on the data of the same log record.
const WATERMARK_ROW_BASE: u32 = 1 << 31;

#[derive(Clone)]
pub(super) struct Settings {
    pub durability: Durability,
    pub checkpoint_interval: Duration,
    /// What one message may hold (DESIGN §2 "Limits").
    pub limits: crate::source::decode::Limits,
    /// How long an updating view keeps an idle key, unless it says (`limits.key_ttl`).
    pub key_ttl: Option<Duration>,
}

struct StreamRuntime {
    def: Arc<StreamDef>,
    watermark: Watermark,
    metrics: Arc<StreamMetrics>,
}

struct AlertRuntime {
    operator: RuleOperator,
    root: usize,
    upstream_view: Option<usize>,
    metrics: Arc<AlertMetrics>,
}

struct ViewRuntime {
    operator: ViewOperator,
    /// Index of the stream at the root of this view's inputs.
    root: usize,
    /// Index of the view it reads, if it reads a view.
    upstream_view: Option<usize>,
    metrics: Arc<ViewMetrics>,
}

/// Where acknowledgements go once their messages are in the log.
enum Acker {
    /// Straight to the source: the append was enough (`buffered`, `none`).
    Direct(mpsc::UnboundedSender<Vec<AckToken>>),
    /// To the sync thread, which fsyncs and then forwards them (`sync`).
    AfterSync(std::sync::mpsc::SyncSender<Vec<AckToken>>),
}

impl Acker {
    fn send(&self, acks: Vec<AckToken>) {
        if acks.is_empty() {
            return;
        }
        // A closed channel means the source or the sync thread has stopped;
        // the broker then delivers these messages again.
        match self {
            Acker::Direct(tx) => {
                let _ = tx.send(acks);
            }
            Acker::AfterSync(tx) => {
                let _ = tx.send(acks);
            }
        }
    }
}

/// Groups of acks waiting for one fsync; bounded, so a slow disk slows intake.
const SYNC_QUEUE: usize = 64;

/// The sync thread: fsyncs the journal once for every group of acks queued
/// since the last sync, then forwards them to the source, in order.
fn spawn_syncer(
    store: Store,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    needs_restart: Arc<AtomicBool>,
    acks: mpsc::UnboundedSender<Vec<AckToken>>,
) -> std::io::Result<(
    std::sync::mpsc::SyncSender<Vec<AckToken>>,
    std::thread::JoinHandle<()>,
)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<AckToken>>(SYNC_QUEUE);
    let handle = std::thread::Builder::new()
        .name("weir-log-sync".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut pending = vec![first];
                while let Ok(more) = rx.try_recv() {
                    pending.push(more);
                }
                let started = Instant::now();
                if let Err(e) = store.sync_journal() {
                    // After a failed fsync the kernel may have dropped the
                    // dirty pages: nothing from here on can be called
                    // durable. These stay unacknowledged, and so does
                    // everything after them, until a restart.
                    needs_restart.store(true, Ordering::Release);
                    metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    metrics.store_healthy.store(0, Ordering::Relaxed);
                    tracing::error!(error = %e, "cannot sync the ingest log; nothing more is acknowledged");
                    health.fail(format!("cannot sync the ingest log: {e}"));
                    return;
                }
                metrics
                    .log_sync_ns
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                metrics.log_syncs.fetch_add(1, Ordering::Relaxed);
                for group in pending {
                    let _ = acks.send(group);
                }
            }
        })?;
    Ok((tx, handle))
}

/// The two checkpoint slots and what they imply for the log.
struct CheckpointSlots {
    /// Sequence number held by each slot.
    slots: [Option<u64>; 2],
    /// The chunks each slot's manifest refers to (the rest may go).
    live: [HashSet<Vec<u8>>; 2],
    next_slot: u8,
    /// The generation of the next checkpoint (names its chunks).
    next_generation: u64,
    /// What the last checkpoint written wrote: the next one reuses its
    /// chunks that did not change.
    previous: crate::checkpoint::Written,
    /// Log records below this are no longer needed by any checkpoint.
    log_floor: Arc<AtomicU64>,
    /// Outside positions (Postgres LSNs) each slot includes.
    positions: [Vec<(Arc<std::sync::atomic::AtomicI64>, i64)>; 2],
}

impl CheckpointSlots {
    fn new(log_floor: Arc<AtomicU64>) -> Self {
        Self {
            positions: Default::default(),
            slots: [None, None],
            live: Default::default(),
            next_slot: 0,
            next_generation: 1,
            previous: Default::default(),
            log_floor,
        }
    }

    /// A checkpoint found in `slot` at start-up.
    fn found(&mut self, slot: u8, manifest: &crate::checkpoint::Manifest) {
        self.slots[slot as usize] = Some(manifest.seq);
        let mut live = HashSet::new();
        crate::checkpoint::live_chunks(manifest, &mut live);
        self.live[slot as usize] = live;
        self.next_generation = self.next_generation.max(manifest.generation + 1);
    }

    /// Encodes `cp`'s parts one by one into the next slot (the chunks that
    /// changed since the last checkpoint), then its manifest, and syncs
    /// (see `crate::checkpoint` for why a crash midway is safe); then drops
    /// the chunks neither slot refers to any more.
    fn write(&mut self, store: &Store, metrics: &Metrics, mut cp: Pending, started: Instant) {
        let slot = self.next_slot;
        let positions = std::mem::take(&mut cp.positions);
        self.positions[slot as usize].clear();
        let seq = cp.seq;
        let generation = self.next_generation;
        // Generations are never reused, even when this one fails midway.
        self.next_generation += 1;
        // The slot is emptied first, so the log must reach back to the
        // other slot alone until this one is written.
        self.slots[slot as usize] = None;
        self.live[slot as usize].clear();
        self.publish_floor();
        let written = store
            .clear_checkpoint(slot)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                cp.write_parts(
                    generation,
                    &self.previous,
                    |name, bytes| {
                        store
                            .put_checkpoint_part(slot, name, bytes)
                            .map_err(|e| e.to_string())
                    },
                    |key, bytes| {
                        store
                            .put_checkpoint_chunk(key, bytes)
                            .map_err(|e| e.to_string())
                    },
                )
            })
            .and_then(|(manifest, written, stats)| {
                Checkpoint::encode_manifest(&manifest)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        store
                            .put_checkpoint_manifest(slot, &bytes)
                            .and_then(|()| store.sync_journal())
                            .map_err(|e| e.to_string())
                    })
                    .map(|()| (manifest, written, stats))
            });
        let (manifest, written, stats) = match written {
            Ok(done) => done,
            Err(e) => {
                metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "checkpoint failed; the log is kept until one succeeds");
                return;
            }
        };
        self.slots[slot as usize] = Some(seq);
        // An outside position is durable once both slots include it: a
        // damaged newer checkpoint falls back to the older one.
        for (at, lsn) in &positions {
            let other = self.positions[(slot ^ 1) as usize]
                .iter()
                .find(|(a, _)| Arc::ptr_eq(a, at))
                .map(|(_, l)| *l);
            if let Some(other) = other {
                at.store((*lsn).min(other), Ordering::Release);
            }
        }
        self.positions[slot as usize] = positions;
        crate::checkpoint::live_chunks(&manifest, &mut self.live[slot as usize]);
        self.previous = written;
        self.next_slot = slot ^ 1;
        self.publish_floor();
        let [a, b] = &self.live;
        let removed =
            match store.remove_checkpoint_chunks_except(|k| a.contains(k) || b.contains(k)) {
                Ok(n) => n,
                Err(e) => {
                    // they are only space; the next checkpoint tries again
                    tracing::warn!(error = %e, "old checkpoint chunks not removed");
                    0
                }
            };
        let took = started.elapsed();
        metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
        metrics
            .checkpoint_last_ms
            .store(took.as_millis() as u64, Ordering::Relaxed);
        for (gauge, value) in [
            (&metrics.checkpoint_last_bytes, stats.state),
            (&metrics.checkpoint_last_written_bytes, stats.written),
        ] {
            gauge.store(value as u64, Ordering::Relaxed);
        }
        for (counter, value) in [
            (&metrics.checkpoint_chunks_written, stats.chunks_written),
            (&metrics.checkpoint_chunks_reused, stats.chunks_reused),
        ] {
            counter.fetch_add(value as u64, Ordering::Relaxed);
        }
        tracing::debug!(
            seq,
            generation,
            state_bytes = stats.state,
            written_bytes = stats.written,
            chunks_written = stats.chunks_written,
            chunks_reused = stats.chunks_reused,
            chunks_removed = removed,
            took_ms = took.as_millis() as u64,
            "checkpoint written"
        );
    }

    /// Both checkpoints hold everything up to the older one's position; the
    /// log below it may go (retention decides when).
    fn publish_floor(&self) {
        let floor = match self.slots {
            [Some(a), Some(b)] => a.min(b),
            _ => 0,
        };
        self.log_floor.store(floor, Ordering::Relaxed);
    }
}

enum Checkpoints {
    /// Written on the pipeline thread (during recovery, or without the thread).
    Inline(CheckpointSlots),
    /// Handed to the writer thread; `busy` while it writes one.
    Thread {
        tx: std::sync::mpsc::SyncSender<(Pending, Instant)>,
        busy: Arc<AtomicBool>,
        handle: std::thread::JoinHandle<()>,
    },
    /// After shutdown's final checkpoint.
    Stopped,
}

impl Checkpoints {
    /// Moves the writing onto a thread of its own (keeps it inline if the
    /// thread cannot start).
    fn start_thread(&mut self, store: Store, metrics: Arc<Metrics>) {
        let Checkpoints::Inline(mut slots) = std::mem::replace(self, Checkpoints::Stopped) else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Pending, Instant)>(1);
        let busy = Arc::new(AtomicBool::new(false));
        let flag = busy.clone();
        let floor = slots.log_floor.clone();
        let spawned = std::thread::Builder::new()
            .name("weir-checkpoint".into())
            .spawn(move || {
                for (cp, started) in rx {
                    slots.write(&store, &metrics, cp, started);
                    flag.store(false, Ordering::Release);
                }
            });
        *self = match spawned {
            Ok(handle) => Checkpoints::Thread { tx, busy, handle },
            Err(e) => {
                // The slots went with the closure that never ran: start over
                // empty, which keeps the log until two checkpoints exist.
                tracing::error!(error = %e, "cannot start the checkpoint thread; checkpoints are written inline");
                Checkpoints::Inline(CheckpointSlots::new(floor))
            }
        };
    }

    /// Waits for the writer thread to finish what it was given.
    fn finish(&mut self) {
        if let Checkpoints::Thread { tx, handle, .. } =
            std::mem::replace(self, Checkpoints::Stopped)
        {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// The pipeline: decoders, watermarks, operators and the log, on one thread.
pub(super) struct Runner {
    streams: Vec<StreamRuntime>,
    /// Reference tables: their change batches are logged and applied here.
    tables: Vec<Arc<TableDef>>,
    /// Views with sinks: their rows also go to the outbox.
    sinked: HashSet<String>,
    /// The log record whose rows are being written, and the next outbox index in it.
    outbox_at: (u64, u32),
    /// Change batches from the Postgres sources, to log and apply.
    pub(super) table_changes: Option<mpsc::Receiver<crate::postgres::TableChange>>,
    views: Vec<ViewRuntime>,
    alerts: Vec<AlertRuntime>,
    /// Where alert changes go once stored (none in benches).
    notifier: Option<Arc<Notifier>>,
    store: Store,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    settings: Settings,
    /// Sequence number of the last record appended (or, without a log, applied).
    last_seq: u64,
    dedup: Dedup,
    /// Wall time of the last checkpoint.
    last_checkpoint: i64,
    /// Where checkpoints go: written here until `run` starts the writer thread.
    checkpoints: Checkpoints,
    /// A failure only a restart mends: a view's rows could not be stored, or
    /// the sync thread could not sync the log. Checkpoints stop, so that the
    /// restart replays (and rewrites) from the last good one, and `/healthz`
    /// stays failed. Shared with the sync thread.
    needs_restart: Arc<AtomicBool>,
    /// While backfilling: the views that run (all, when `None`).
    only: Option<Vec<bool>>,
    /// `sync` without the sync thread: `commit` fsyncs itself.
    sync_inline: bool,
    /// Why weir stopped itself, when it did (the engine reports it and exits non-zero).
    pub(super) fatal: Arc<std::sync::Mutex<Option<String>>>,
    /// Set once processing panicked: the operators' state cannot be trusted,
    /// so nothing more is applied, acknowledged or checkpointed.
    broken: bool,
    /// Fault injection for the tests (`WEIR_TEST_PANIC_ON`): processing a
    /// batch whose first column holds this text panics. Unset in production.
    panic_on: Option<String>,
    /// Pipeline reloads to apply between two micro-batches.
    pub(super) reloads: Option<std::sync::mpsc::Receiver<super::reload::Request>>,
    /// A reload whose new and changed views are being filled from the log
    /// on a thread of their own, while the pipeline goes on.
    filling: Option<Filling>,
    /// Set to stop a backfill early (this runner fills views for a reload,
    /// and weir is stopping).
    cancel: Option<Arc<AtomicBool>>,
}

/// A reload's backfill, running beside the pipeline: the views in `mask`
/// sit in the pipeline as placeholders (not run, not checkpointed) until
/// the thread hands over their operators, filled from the log up to (nearly)
/// where the pipeline is.
struct Filling {
    mask: Vec<bool>,
    /// The last record the pipeline applied, for the backfill's rounds.
    head: Arc<AtomicU64>,
    started: Instant,
    /// How long ingestion waited when the reload began.
    paused: Duration,
    done: std::sync::mpsc::Receiver<Result<Filled, String>>,
    reply: Option<tokio::sync::oneshot::Sender<Result<Duration, String>>>,
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Fault injection for the tests (`WEIR_TEST_HOLD_BACKFILL=PATH`): a
/// reload's backfill waits until PATH exists, so that a test can show the
/// pipeline going on meanwhile. Unset in production.
fn hold_for_tests(cancel: &AtomicBool) {
    let Some(path) = std::env::var_os("WEIR_TEST_HOLD_BACKFILL").filter(|p| !p.is_empty()) else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    while !path.exists() && !cancel.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Filling {
    fn answer(&mut self, result: Result<Duration, String>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}

/// What a backfill thread hands over: the filled operators (for the views
/// in the mask) and each stream's watermark where the backfill stopped.
struct Filled {
    operators: Vec<Option<ViewOperator>>,
    watermarks: Vec<Watermark>,
    records: u64,
    /// The last log record it read.
    upto: u64,
}

impl Runner {
    pub(super) fn new(
        pipeline: &Pipeline,
        store: Store,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        settings: Settings,
        log_floor: Arc<AtomicU64>,
        notifier: Option<Arc<Notifier>>,
    ) -> Result<Self, EngineError> {
        let streams = pipeline
            .streams
            .iter()
            .map(|s| StreamRuntime {
                def: s.clone(),
                watermark: Watermark::new(s.event_time.bound_ms, s.idle_timeout.as_millis() as i64),
                metrics: metrics.streams[&s.name].clone(),
            })
            .collect::<Vec<_>>();
        let mut views: Vec<ViewRuntime> = Vec::new();
        for (i, v) in pipeline.views.iter().enumerate() {
            let mut operator = ViewOperator::new(v.clone()).map_err(|e| EngineError::View {
                view: v.name.clone(),
                message: e.to_string(),
            })?;
            operator.set_key_ttl(v.key_ttl.or(settings.key_ttl));
            let (root, upstream_view) = locate(
                &v.name,
                &v.upstream,
                &streams,
                &pipeline.views[..i],
                &roots(&views),
            )?;
            views.push(ViewRuntime {
                operator,
                root,
                upstream_view,
                metrics: metrics.views.get_or_add(&v.name),
            });
        }
        let mut alerts = Vec::new();
        for a in &pipeline.alerts {
            let (root, upstream_view) = locate(
                &a.name,
                &a.upstream,
                &streams,
                &pipeline.views,
                &roots(&views),
            )?;
            alerts.push(AlertRuntime {
                operator: {
                    let mut op = RuleOperator::new(a.clone());
                    op.set_key_ttl(a.key_ttl.or(settings.key_ttl));
                    op
                },
                root,
                upstream_view,
                metrics: metrics.alerts.get_or_add(&a.name),
            });
        }
        Ok(Self {
            streams,
            tables: pipeline.tables.clone(),
            sinked: pipeline
                .sinks
                .iter()
                .filter(|s| !s.from_alert)
                .map(|s| s.from.clone())
                .collect(),
            outbox_at: (0, 0),
            table_changes: None,
            views,
            alerts,
            notifier,
            store,
            metrics,
            health,
            settings,
            last_seq: 0,
            dedup: Dedup::new(log::DEDUP_WINDOW),
            last_checkpoint: now_ms(),
            checkpoints: Checkpoints::Inline(CheckpointSlots::new(log_floor)),
            needs_restart: Arc::new(AtomicBool::new(false)),
            only: None,
            sync_inline: false,
            fatal: Arc::default(),
            broken: false,
            panic_on: std::env::var("WEIR_TEST_PANIC_ON")
                .ok()
                .filter(|v| !v.is_empty()),
            reloads: None,
            filling: None,
            cancel: None,
        })
    }

    /// Restores the newest good checkpoint and replays the log after it.
    pub(super) fn recover(&mut self) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut best: Option<(u8, Checkpoint)> = None;
        for slot in 0..2u8 {
            let Some(stored) = self.store.read_checkpoint(slot)? else {
                continue;
            };
            let store = &self.store;
            let read = Checkpoint::decode_with(stored, |key| {
                store.read_checkpoint_chunk(key).map_err(|e| e.to_string())
            });
            match read {
                Ok(cp) => {
                    if let Checkpoints::Inline(c) = &mut self.checkpoints {
                        c.found(slot, &cp.manifest);
                    }
                    // Newest by log position, then by time: a restart
                    // with nothing new in the log writes the same position
                    // with different state (a rebuilt view).
                    let key = |m: &crate::checkpoint::Manifest| (m.seq, m.taken_at);
                    if best
                        .as_ref()
                        .is_none_or(|(_, b)| key(&cp.manifest) > key(&b.manifest))
                    {
                        best = Some((slot, cp));
                    }
                }
                Err(e) => {
                    tracing::warn!(slot, error = %e, "checkpoint discarded; an older one (or none) is used");
                }
            }
        }
        let mut from = 0;
        if let Some((slot, cp)) = best {
            if let Checkpoints::Inline(c) = &mut self.checkpoints {
                c.next_slot = slot ^ 1;
            }
            from = cp.manifest.seq;
            let fresh = self.restore(&cp);
            tracing::info!(
                seq = from,
                taken_at = %crate::obs::format_time(cp.manifest.taken_at),
                bytes = cp.size_bytes(),
                "checkpoint restored"
            );
            self.backfill(fresh, from)?;
        }
        if let Checkpoints::Inline(c) = &self.checkpoints {
            c.publish_floor();
        }

        let last = self.store.last_log_seq()?;
        let store = self.store.clone();
        let poisoned = self.store.poisoned()?;
        let mut replayed = 0u64;
        let mut corrupt = None;
        store.scan_log(from, |seq, bytes| {
            if poisoned.contains(&seq) {
                // It panicked the pipeline once; it is a dead letter now.
                self.last_seq = self.last_seq.max(seq);
                return true;
            }
            match log::decode(seq, bytes) {
                Ok(record) => {
                    self.apply(seq, record, true);
                    replayed += 1;
                }
                Err(e @ LogError::Partial { .. }) if Some(seq) == last => {
                    tracing::warn!(error = %e, "the log's last record was only partly written (a crash mid-append); it is discarded — its messages were never acknowledged");
                    if let Err(e) = self.store.remove_log_record(seq) {
                        tracing::error!(error = %e, "cannot remove the partial record");
                    }
                }
                Err(e) => {
                    // Not a torn last write: acknowledged data is damaged.
                    // Going on would silently lose it; stop and say so.
                    corrupt = Some(format!(
                        "ingest log record {seq} is corrupt ({e}); it holds acknowledged \
                         messages, so weir will not skip it silently: restore the data \
                         directory from a backup, or move it aside to start empty"
                    ));
                    return false;
                }
            }
            self.last_seq = self.last_seq.max(seq);
            true
        })?;
        if let Some(message) = corrupt {
            return Err(StoreError::Corrupt {
                what: "ingest log",
                message,
            });
        }
        self.last_seq = self.last_seq.max(from);
        self.metrics
            .replayed_records
            .fetch_add(replayed, Ordering::Relaxed);

        // The identities of the newest logged messages, oldest first.
        let mut packed: Vec<Vec<u8>> = Vec::new();
        let mut count = 0;
        self.store.recent_log_ids(|ids| {
            count += ids.len() / 10;
            packed.push(ids.to_vec());
            count >= log::DEDUP_WINDOW
        })?;
        for ids in packed.iter().rev() {
            for id in log::unpack_ids(ids) {
                self.dedup.insert(id);
            }
        }

        let now = now_ms();
        for s in &mut self.streams {
            s.watermark.resume(now);
        }
        self.last_checkpoint = now;
        let took = started.elapsed();
        self.metrics
            .recovery_ms
            .store(took.as_millis() as u64, Ordering::Relaxed);
        tracing::info!(
            replayed_records = replayed,
            replayed_events = self.metrics.replayed_events.load(Ordering::Relaxed),
            remembered_messages = self.dedup.len(),
            took_ms = took.as_millis() as u64,
            "recovered"
        );
        Ok(())
    }

    /// Restores streams and views from `cp`; returns, per view, whether it
    /// starts empty (new or changed since the checkpoint).
    fn restore(&mut self, cp: &Checkpoint) -> Vec<bool> {
        let mut fresh = Vec::with_capacity(self.views.len());
        for s in &mut self.streams {
            if let Some(w) = cp.manifest.streams.get(&s.def.name) {
                s.watermark.restore(w);
            }
        }
        for i in 0..self.streams.len() {
            self.publish_watermark(i);
        }
        for t in &self.tables {
            let part = table_part(&t.name);
            match (cp.manifest.views.get(&part), cp.views.get(&part)) {
                (Some(info), Some(bytes)) if info.fingerprint == table_fingerprint(t) => {
                    let empty = t.rows.get();
                    match crate::table::Rows::decode(bytes, empty.batch.schema(), t.key_index()) {
                        Ok(rows) => {
                            tracing::info!(table = %t.name, rows = rows.len(), "reference table restored");
                            t.rows.set(Arc::new(rows));
                        }
                        Err(e) => {
                            tracing::error!(table = %t.name, error = %e, "reference table not restored; it is read from Postgres again")
                        }
                    }
                }
                _ => {
                    tracing::info!(table = %t.name, "reference table is new or changed: it is read from Postgres")
                }
            }
        }
        for v in &mut self.views {
            let plan = v.operator.plan().clone();
            match (cp.manifest.views.get(&plan.name), cp.views.get(&plan.name)) {
                (Some(info), Some(bytes)) if info.fingerprint == plan.fingerprint => {
                    let restored = match cp.chunks.get(&plan.name) {
                        Some(segments) => v.operator.restore_chunked(bytes, segments),
                        None => v.operator.restore(bytes),
                    };
                    match restored {
                        Ok(()) => fresh.push(false),
                        Err(e) => {
                            tracing::error!(view = %plan.name, error = %e, "view state not restored; it starts empty");
                            fresh.push(true);
                        }
                    }
                }
                _ => {
                    tracing::info!(view = %plan.name, "view is new or changed since the checkpoint: it is rebuilt from the log");
                    fresh.push(true);
                }
            }
            v.metrics
                .open_groups
                .store(v.operator.open_groups() as u64, Ordering::Relaxed);
        }
        for a in &mut self.alerts {
            let plan = a.operator.plan().clone();
            let part = alert_part(&plan.name);
            let restored = match (cp.manifest.views.get(&part), cp.views.get(&part)) {
                (Some(info), Some(bytes)) if info.fingerprint == plan.fingerprint => {
                    let restored = match cp.chunks.get(&part) {
                        Some(segments) => a.operator.restore_chunked(bytes, segments),
                        None => a.operator.restore(bytes),
                    };
                    match restored {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::error!(rule = %plan.name, error = %e, "alert rule state not restored");
                            false
                        }
                    }
                }
                _ => false,
            };
            if !restored {
                adopt_open_alerts(&self.store, &mut a.operator);
            }
            a.publish_metrics();
        }
        fresh
    }

    /// Runs the log up to `upto` (the checkpoint's position) through the
    /// views that start empty, and only them, so that a new or changed view
    /// holds the history the log still has (DESIGN §4). The streams'
    /// watermarks are rebuilt from the log alongside and put back after; a
    /// view that reads an unchanged view is not backfilled (its input would
    /// have to be recomputed too) and starts empty.
    fn backfill(&mut self, fresh: Vec<bool>, upto: u64) -> Result<(), StoreError> {
        let only = self.fill_mask(fresh);
        if !only.contains(&true) {
            return Ok(());
        }
        let start = self.fresh_watermarks();
        let (records, _) = self.replay_only(only, 0, upto, start)?;
        tracing::info!(records, "new and changed views backfilled from the log");
        Ok(())
    }

    /// Which of the `fresh` views a backfill fills: not those that read an
    /// unchanged view (they start empty).
    fn fill_mask(&self, fresh: Vec<bool>) -> Vec<bool> {
        let mut only = fresh;
        for v in 0..self.views.len() {
            if let Some(u) = self.views[v].upstream_view {
                if only[v] && !only[u] {
                    tracing::info!(view = %self.views[v].operator.plan().name, "reads an unchanged view: starts empty, not backfilled");
                    only[v] = false;
                }
            }
        }
        only
    }

    /// Each stream's watermark as before its first event.
    fn fresh_watermarks(&self) -> Vec<Watermark> {
        self.streams
            .iter()
            .map(|s| {
                Watermark::new(
                    s.def.event_time.bound_ms,
                    s.def.idle_timeout.as_millis() as i64,
                )
            })
            .collect()
    }

    /// Runs the log records after `after` up to `upto` through the views in
    /// `only`, with the streams' watermarks starting at `start` (the live
    /// ones are put back after). Returns how many records it applied and
    /// the watermarks where it stopped.
    fn replay_only(
        &mut self,
        only: Vec<bool>,
        after: u64,
        upto: u64,
        start: Vec<Watermark>,
    ) -> Result<(u64, Vec<Watermark>), StoreError> {
        let saved: Vec<Watermark> = self
            .streams
            .iter_mut()
            .zip(start)
            .map(|(s, w)| std::mem::replace(&mut s.watermark, w))
            .collect();
        self.only = Some(only);
        let store = self.store.clone();
        let cancel = self.cancel.clone();
        let mut records = 0u64;
        let scanned = store.scan_log(after, |seq, bytes| {
            if seq > upto || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                return false;
            }
            if let Ok(record) = log::decode(seq, bytes) {
                self.apply(seq, record, false);
                records += 1;
            }
            true
        });
        self.only = None;
        let reached: Vec<Watermark> = self
            .streams
            .iter_mut()
            .zip(saved)
            .map(|(s, w)| std::mem::replace(&mut s.watermark, w))
            .collect();
        for i in 0..self.streams.len() {
            self.publish_watermark(i);
        }
        scanned.map(|()| (records, reached))
    }

    /// Fills the views in `mask` from the log up to `upto` (this runner is
    /// a reload's, on a thread of its own) and hands over their operators.
    ///
    /// It reads the log up to `upto`, then, in rounds, what the pipeline
    /// appended meanwhile (`head`), until one round is short: what is left
    /// for the pipeline to catch up on in its pause is a round's worth.
    fn fill(
        mut self,
        next: &Pipeline,
        mask: Vec<bool>,
        upto: u64,
        head: &AtomicU64,
    ) -> Result<Filled, String> {
        super::reconcile_views(&self.store, next, |v| mask[v])
            .map_err(|e| format!("the rebuilt views' old rows could not be removed: {e}"))?;
        /// A round of fewer records ends the backfill.
        const SHORT_ROUND: u64 = 500;
        /// Rounds at most: if ingestion outruns the backfill, the pipeline
        /// catches up on the rest in its pause rather than never.
        const MAX_ROUNDS: usize = 8;
        let mut watermarks = self.fresh_watermarks();
        let mut records = 0;
        let mut after = 0;
        let mut upto = upto;
        for _ in 0..MAX_ROUNDS {
            let (n, reached) = self
                .replay_only(mask.clone(), after, upto, watermarks)
                .map_err(|e| format!("the backfill could not read the log: {e}"))?;
            records += n;
            watermarks = reached;
            after = upto;
            // (log sequence numbers are not dense: rounds are measured in
            // records read)
            if n < SHORT_ROUND {
                break;
            }
            upto = head.load(Ordering::Acquire).max(after);
        }
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Err("weir is stopping; the backfill was cancelled".into());
        }
        if self.needs_restart.load(Ordering::Acquire) {
            return Err("the backfill could not store the views' rows; restart weir".into());
        }
        let operators = self
            .views
            .into_iter()
            .zip(&mask)
            .map(|(v, &filled)| filled.then_some(v.operator))
            .collect();
        Ok(Filled {
            operators,
            watermarks,
            records,
            upto: after,
        })
    }

    pub(super) fn run(
        mut self,
        rx: mpsc::Receiver<Message>,
        acks: mpsc::UnboundedSender<Vec<AckToken>>,
        handle: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) {
        let mut syncer = None;
        let acks = match self.settings.durability {
            Durability::Sync => match spawn_syncer(
                self.store.clone(),
                self.metrics.clone(),
                self.health.clone(),
                self.needs_restart.clone(),
                acks.clone(),
            ) {
                Ok((tx, handle)) => {
                    syncer = Some(handle);
                    Acker::AfterSync(tx)
                }
                Err(e) => {
                    // Without the thread, this one fsyncs each micro-batch
                    // before its acks go: slower, as durable.
                    tracing::error!(error = %e, "cannot start the log sync thread; the pipeline fsyncs each micro-batch itself");
                    self.sync_inline = true;
                    Acker::Direct(acks)
                }
            },
            Durability::Buffered | Durability::None => Acker::Direct(acks),
        };
        self.checkpoints
            .start_thread(self.store.clone(), self.metrics.clone());
        // The prepare stage takes the messages, and the dedup window that
        // recovery rebuilt.
        let (prepared_tx, mut prepared_rx) = mpsc::channel::<Prepared>(2);
        let preparer = Preparer::new(
            &self
                .streams
                .iter()
                .map(|s| s.def.clone())
                .collect::<Vec<_>>(),
            std::mem::replace(&mut self.dedup, Dedup::new(0)),
            self.metrics.clone(),
            self.settings.durability,
            self.settings.limits,
        );
        let prepare_thread = {
            let (handle, shutdown) = (handle.clone(), shutdown.clone());
            std::thread::Builder::new()
                .name("weir-prepare".into())
                .spawn(move || preparer.run(rx, prepared_tx, handle, shutdown))
        };
        let prepare_thread = match prepare_thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the prepare thread; weir stops");
                shutdown.cancel();
                None
            }
        };
        let mut last_tick = now_ms();
        // Until the prepare stage has handed over everything (at shutdown,
        // what was still queued too) and closed the channel.
        loop {
            let next = handle.block_on(async {
                tokio::select! {
                    p = prepared_rx.recv() => Some(p),
                    _ = tokio::time::sleep(TICK) => None,
                }
            });
            match next {
                Some(None) => break,
                Some(Some(prepared)) => self.step(prepared, &acks, &handle, &shutdown),
                None => {}
            }
            while let Some(change) = self
                .table_changes
                .as_mut()
                .and_then(|rx| rx.try_recv().ok())
            {
                let prepared = self.prepare_table_change(change);
                self.step(prepared, &acks, &handle, &shutdown);
            }
            if let Some(f) = &self.filling {
                f.head.store(self.last_seq, Ordering::Release);
            }
            self.poll_filling();
            // One reload at a time: the next waits until this one's
            // backfill is in.
            while self.filling.is_none() {
                let Some(request) = self.reloads.as_ref().and_then(|rx| rx.try_recv().ok()) else {
                    break;
                };
                self.reload(request);
            }
            let now = now_ms();
            if now - last_tick >= TICK.as_millis() as i64 {
                last_tick = now;
                self.tick(now);
            }
            if !shutdown.is_cancelled() && !self.broken {
                self.checkpoint(now, false);
            }
        }
        if let Some(t) = prepare_thread {
            let _ = t.join();
        }
        if let Some(filling) = &mut self.filling {
            // The views being filled stay out of the last checkpoint: the
            // next start rebuilds them from the log.
            filling.cancel.store(true, Ordering::Relaxed);
            if let Some(t) = filling.thread.take() {
                let _ = t.join();
            }
            if let Some(reply) = filling.reply.take() {
                let _ = reply.send(Err(
                    "weir stopped before the backfill was done; the next start completes it".into(),
                ));
            }
        }
        if !self.broken {
            self.checkpoint(now_ms(), true);
        }
        self.checkpoints.finish();
        drop(acks);
        if let Some(handle) = syncer {
            let _ = handle.join();
        }
        tracing::info!("pipeline stopped");
    }

    /// Numbers, commits (retrying while the store refuses), acknowledges
    /// and applies one prepared micro-batch.
    fn step(
        &mut self,
        mut prepared: Prepared,
        acks: &Acker,
        handle: &tokio::runtime::Handle,
        shutdown: &CancellationToken,
    ) {
        if self.broken {
            // Not acknowledged: publishers send them again after the restart.
            return;
        }
        self.metrics
            .pipeline_batches
            .fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let seqs: Vec<u64> = prepared
            .records
            .iter()
            .map(|_| self.next_seq(now))
            .collect();
        let appends: Vec<LogAppend> = seqs
            .iter()
            .zip(prepared.encoded.drain(..))
            .filter_map(|(&seq, encoded)| {
                let (record, ids) = encoded?;
                Some(LogAppend { seq, record, ids })
            })
            .collect();
        let mut delay = Duration::from_millis(100);
        while let Err(e) = self.commit(&appends, &prepared.rejects) {
            self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            self.metrics.store_healthy.store(0, Ordering::Relaxed);
            let why = format!("cannot append to the ingest log: {e}");
            if self.health.problem().as_deref() != Some(why.as_str()) {
                tracing::error!(error = %e, messages = prepared.acks.len(), "cannot append to the ingest log; nothing is acknowledged until a write succeeds");
            }
            self.health.fail(why);
            let stop = handle.block_on(async {
                tokio::select! {
                    _ = shutdown.cancelled() => true,
                    _ = tokio::time::sleep(delay) => false,
                }
            });
            if stop {
                // Not acknowledged: the publishers (or the broker) send them again.
                return;
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
        if !self.needs_restart.load(Ordering::Acquire)
            && self.metrics.store_healthy.swap(1, Ordering::Relaxed) == 0
        {
            tracing::info!("the store accepts writes again");
            self.health.clear();
        }
        let logged = self.settings.durability != Durability::None;
        if logged {
            acks.send(std::mem::take(&mut prepared.acks));
        }
        for (seq, record) in seqs.into_iter().zip(prepared.records) {
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.apply(seq, record, false)
            }));
            if let Err(panic) = applied {
                self.poisoned(seq, panic_text(&panic), shutdown);
                return;
            }
        }
        if !logged {
            acks.send(prepared.acks);
        }
    }

    /// Processing log record `seq` panicked: its operators' state cannot be
    /// trusted any more. The record is set aside for good (replay skips it),
    /// its messages become dead letters, and weir stops unhealthy with an
    /// error, so that a restart recovers from the last checkpoint without it.
    fn poisoned(&mut self, seq: u64, why: String, shutdown: &CancellationToken) {
        self.broken = true;
        let what = format!("processing ingest log record {seq} panicked: {why}");
        tracing::error!(seq, "{what}; the record is set aside and weir stops");
        if let Err(e) = self.store.mark_poison(seq, &why) {
            tracing::error!(error = %e, "cannot set the record aside");
        }
        // The record's messages, read back from the log (only on this rare
        // path; with durability "none" nothing was logged, and nothing replays).
        let mut messages = None;
        let scanned = self.store.scan_log(seq.saturating_sub(1), |s, bytes| {
            if s == seq {
                if let Ok(Record::Batch(b)) = log::decode(s, bytes) {
                    messages = Some((b.stream, b.messages));
                }
            }
            s < seq
        });
        if let Err(e) = scanned {
            tracing::error!(error = %e, "cannot read the set-aside record back");
        }
        if let Some((stream, messages)) = messages {
            let letters: Vec<Rejected> = messages
                .iter()
                .map(|m| Rejected {
                    stream: stream.clone(),
                    topic: m.topic.clone(),
                    reason: crate::source::decode::RejectReason::Schema,
                    detail: format!("set aside: {what}"),
                    payload: String::new(),
                    received_at: m.received_at,
                    rows: 1,
                })
                .collect();
            if let Err(e) = self.store.write_dead_letters(&letters) {
                tracing::error!(error = %e, "cannot write the set-aside messages' dead letters");
            }
        }
        self.health.fail(what.clone());
        *self.fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
        shutdown.cancel();
    }

    /// A reference table's change batch as a log record, like a stream's.
    fn prepare_table_change(&self, change: crate::postgres::TableChange) -> Prepared {
        let now = now_ms();
        let n = change.batch.num_rows();
        let messages = vec![MessageMeta {
            topic: change.origin,
            received_at: now,
            id: None,
        }];
        let record = Record::Batch(Box::new(log::LoggedBatch {
            stream: change.table,
            appended_at: now,
            messages,
            data: change.batch,
            event_time: datafusion::arrow::array::Int64Array::from(vec![now; n]),
            message_index: UInt32Array::from(vec![0u32; n]),
        }));
        let encoded = if self.settings.durability == Durability::None {
            None
        } else {
            match log::encode(&record) {
                Ok(bytes) => Some((bytes, Vec::new())),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a reference table's changes; they are applied, not logged");
                    None
                }
            }
        };
        Prepared {
            records: vec![record],
            encoded: vec![encoded],
            rejects: Vec::new(),
            acks: Vec::new(),
        }
    }

    /// Applies a reference table's logged change batch.
    fn apply_table(&mut self, table: usize, changes: &datafusion::arrow::array::RecordBatch) {
        // (a reload's backfill runner leaves the shared rows to the pipeline)
        if self.cancel.is_some() {
            return;
        }
        let t = &self.tables[table];
        match t.rows.get().apply(changes) {
            Ok(rows) => {
                tracing::debug!(table = %t.name, rows = rows.len(), lsn = rows.lsn, "reference table changed");
                t.rows.set(Arc::new(rows));
            }
            Err(e) => {
                tracing::error!(table = %t.name, error = %e, "a reference table's changes cannot be applied; they are skipped")
            }
        }
    }

    fn next_seq(&mut self, now: i64) -> u64 {
        self.last_seq = log::next_seq(self.last_seq, now);
        self.last_seq
    }

    /// Appends the prepared records and dead letters, and syncs when configured.
    fn commit(&self, appends: &[LogAppend], rejects: &[Rejected]) -> Result<(), StoreError> {
        if self.settings.durability == Durability::None {
            return self.store.write_dead_letters(rejects);
        }
        let started = Instant::now();
        // With `sync`, the fsync is the sync thread's (one for every group of
        // micro-batches, before their acks go): this thread does not wait for
        // the disk — unless that thread could not start.
        self.store.append_log(appends, rejects)?;
        if self.sync_inline {
            self.store.persist()?;
        }
        let bytes: usize = appends.iter().map(|a| a.record.len()).sum();
        self.metrics
            .log_records
            .fetch_add(appends.len() as u64, Ordering::Relaxed);
        self.metrics
            .log_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.metrics
            .log_append_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Runs one log record through the views (live, or replayed at start-up).
    fn apply(&mut self, seq: u64, record: Record, replay: bool) {
        match record {
            Record::Watermark { stream, watermark } => {
                let Some(i) = self.stream_index(&stream) else {
                    return;
                };
                self.streams[i].watermark.raise(watermark);
                self.publish_watermark(i);
                let current = self.streams[i].watermark.current();
                self.run_views(i, None, current, seq);
            }
            Record::Batch(b) => {
                if let Some(value) = &self.panic_on {
                    let hit = b.data.columns().first().is_some_and(|c| {
                        c.as_any()
                            .downcast_ref::<datafusion::arrow::array::StringArray>()
                            .is_some_and(|a| a.iter().any(|v| v == Some(value.as_str())))
                    });
                    if hit {
                        panic!("WEIR_TEST_PANIC_ON matched {value:?}");
                    }
                }
                if let Some(t) = self.tables.iter().position(|t| t.name == b.stream) {
                    self.apply_table(t, &b.data);
                    return;
                }
                let Some(i) = self.stream_index(&b.stream) else {
                    tracing::warn!(stream = %b.stream, "log record of a stream that no longer exists: skipped");
                    return;
                };
                let rows = b.data.num_rows();
                if rows == 0 {
                    return;
                }
                if replay {
                    self.metrics
                        .replayed_events
                        .fetch_add(rows as u64, Ordering::Relaxed);
                }
                let max_event_time = b
                    .event_time
                    .values()
                    .iter()
                    .copied()
                    .max()
                    .unwrap_or(i64::MIN);
                let watermark_before = self.streams[i].watermark.current();
                let batch = EventBatch::new(b.data, b.event_time, seq);
                let run = self.run_views(i, Some(&batch), None, seq);
                // (a backfill does not write dead letters: the first run did)
                if !run.late.is_empty() && self.only.is_none() {
                    self.late_letters(
                        i,
                        seq,
                        &batch,
                        &b.messages,
                        &b.message_index,
                        &run.late,
                        &run.late_views,
                        watermark_before,
                    );
                }
                if !run.failed_rows.is_empty() && self.only.is_none() {
                    self.failed_letters(
                        i,
                        seq,
                        &batch,
                        &b.messages,
                        &b.message_index,
                        &run.failed_rows,
                    );
                }
                self.streams[i]
                    .watermark
                    .observe(max_event_time, b.appended_at);
                self.publish_watermark(i);
                let current = self.streams[i].watermark.current();
                self.run_views(i, None, current, seq);
            }
        }
    }

    /// Dead letters for late rows.
    #[allow(clippy::too_many_arguments)]
    fn late_letters(
        &mut self,
        stream: usize,
        seq: u64,
        batch: &EventBatch,
        messages: &[MessageMeta],
        message_index: &UInt32Array,
        late: &BTreeSet<u32>,
        late_views: &[String],
        watermark_before: Option<i64>,
    ) {
        let rows: Vec<u32> = late.iter().copied().collect();
        let views = late_views.join(", ");
        let watermark = watermark_before
            .map(crate::obs::format_time)
            .unwrap_or_default();
        let n = self.row_letters(
            (stream, seq, RejectReason::Late, None),
            (batch, messages, message_index),
            &rows,
            |_, t| {
                format!(
                    "event time {} is behind the watermark {watermark}: its window had closed in {views}",
                    crate::obs::format_time(t)
                )
            },
        );
        self.streams[stream]
            .metrics
            .late
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Dead letters (`schema`) for rows a view could not compute.
    fn failed_letters(
        &mut self,
        stream: usize,
        seq: u64,
        batch: &EventBatch,
        messages: &[MessageMeta],
        message_index: &UInt32Array,
        failed: &BTreeMap<u32, String>,
    ) {
        let rows: Vec<u32> = failed.keys().copied().collect();
        self.row_letters(
            (stream, seq, RejectReason::Schema, Some(b'v')),
            (batch, messages, message_index),
            &rows,
            |row, _| failed.get(&row).cloned().unwrap_or_default(),
        );
    }

    /// Stores one dead letter per row of log record `seq`, keyed by (log
    /// record, row, `tag`) so that a replay writes the same letters again
    /// instead of new ones, and counts them; returns how many.
    fn row_letters(
        &mut self,
        (stream, seq, reason, tag): (usize, u64, RejectReason, Option<u8>),
        (batch, messages, message_index): (&EventBatch, &[MessageMeta], &UInt32Array),
        rows: &[u32],
        detail: impl Fn(u32, i64) -> String,
    ) -> u64 {
        let letters = sink::rejected_rows(
            &self.streams[stream].def.name,
            reason,
            &batch.data,
            batch.event_time.values(),
            rows,
            |r| message_of(messages, message_index, r),
            detail,
        );
        let n = letters.len() as u64;
        self.streams[stream].metrics.reject_n(reason, n);
        let keyed: Vec<(Vec<u8>, Rejected)> = rows
            .iter()
            .zip(letters)
            .map(|(row, letter)| {
                let mut key = seq.to_be_bytes().to_vec();
                key.extend_from_slice(&row.to_be_bytes());
                key.extend(tag);
                (key, letter)
            })
            .collect();
        if let Err(e) = self.store.write_keyed_dead_letters(&keyed) {
            self.row_write_failed(&e);
            tracing::error!(error = %e, lost = keyed.len(), reason = reason.as_str(), "cannot store rows' dead letters");
        }
        n
    }

    fn stream_index(&self, name: &str) -> Option<usize> {
        self.streams.iter().position(|s| s.def.name == name)
    }

    /// Moves idle streams' watermarks with the wall clock, logging each move.
    fn tick(&mut self, now: i64) {
        if self.broken {
            return;
        }
        for i in 0..self.streams.len() {
            let before = self.streams[i].watermark.clone();
            if !self.streams[i].watermark.on_tick(now) {
                continue;
            }
            let Some(watermark) = self.streams[i].watermark.current() else {
                continue;
            };
            let seq = self.next_seq(now);
            let record = Record::Watermark {
                stream: self.streams[i].def.name.clone(),
                watermark,
            };
            if self.settings.durability != Durability::None {
                let appended = log::encode(&record)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        let append = LogAppend {
                            seq,
                            record: bytes,
                            ids: Vec::new(),
                        };
                        self.store
                            .append_log(&[append], &[])
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = appended {
                    // Not moved after all: a move the log does not hold would
                    // make a replay differ from this run.
                    self.streams[i].watermark = before;
                    self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot log an idle watermark move; retried on the next tick");
                    continue;
                }
            }
            self.apply(seq, record, false);
        }
    }

    /// Swaps in `next`'s views and rules between two micro-batches: kept
    /// ones (same fingerprint) move over with their state, new and changed
    /// ones start empty and are backfilled from the log up to the last
    /// record applied (as at start-up), removed ones stop. Streams are the
    /// same (the reloader refused otherwise). Returns how long ingestion
    /// waited.
    fn reload(&mut self, request: super::reload::Request) {
        let started = Instant::now();
        match self.swap(&request.pipeline) {
            Err(e) => {
                let _ = request.reply.send(Err(e));
            }
            Ok(None) => {
                // nothing to fill: done (the next checkpoint takes the new
                // state; a restart before it applies the same change again)
                let _ = request.reply.send(Ok(started.elapsed()));
            }
            Ok(Some(mask)) => self.start_filling(&request.pipeline, mask, started, request.reply),
        }
    }

    /// Fills the views in `mask` on a thread of its own from the log up to
    /// the last record applied; the pipeline goes on meanwhile, and
    /// [`Runner::poll_filling`] takes the filled views in.
    fn start_filling(
        &mut self,
        next: &Pipeline,
        mask: Vec<bool>,
        started: Instant,
        reply: tokio::sync::oneshot::Sender<Result<Duration, String>>,
    ) {
        let upto = self.last_seq;
        let cancel = Arc::new(AtomicBool::new(false));
        let sub = Runner::new(
            next,
            self.store.clone(),
            self.metrics.clone(),
            self.health.clone(),
            self.settings.clone(),
            Arc::new(AtomicU64::new(0)),
            None,
        );
        let mut sub = match sub {
            Ok(sub) => sub,
            Err(e) => {
                let _ = reply.send(Err(format!("the backfill could not start: {e}")));
                return;
            }
        };
        // Its watermarks are the backfill's own, not the live ones.
        for s in &mut sub.streams {
            s.metrics = Arc::default();
        }
        sub.cancel = Some(cancel.clone());
        let (tx, done) = std::sync::mpsc::channel();
        let cancel_thread = cancel.clone();
        let head = Arc::new(AtomicU64::new(upto));
        let head_thread = head.clone();
        let thread = std::thread::Builder::new()
            .name("weir-backfill".into())
            .spawn({
                let mask = mask.clone();
                let next = next.clone();
                move || {
                    hold_for_tests(&cancel_thread);
                    let _ = tx.send(sub.fill(&next, mask, upto, &head_thread));
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = reply.send(Err(format!("cannot start the backfill thread: {e}")));
                return;
            }
        };
        tracing::info!(
            upto,
            views = mask.iter().filter(|m| **m).count(),
            "backfilling new and changed views beside the running pipeline"
        );
        self.filling = Some(Filling {
            mask,
            head,
            started,
            paused: started.elapsed(),
            done,
            reply: Some(reply),
            cancel,
            thread: Some(thread),
        });
    }

    /// Takes a finished backfill in: its operators replace the
    /// placeholders, catch up on what the log got meanwhile (ingestion
    /// waits for this part only), and go live.
    fn poll_filling(&mut self) {
        let result = match &self.filling {
            None => return,
            Some(f) => match f.done.try_recv() {
                Ok(result) => result,
                Err(std::sync::mpsc::TryRecvError::Empty) => return,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    Err("the backfill thread stopped without an answer (it panicked)".into())
                }
            },
        };
        let Some(mut filling) = self.filling.take() else {
            return;
        };
        if let Some(t) = filling.thread.take() {
            let _ = t.join();
        }
        let result = if self.broken {
            Err("the pipeline failed while the backfill ran".to_string())
        } else {
            result
        };
        let filled = match result {
            Ok(filled) => filled,
            Err(e) => {
                // The placeholders stay out of checkpoints, so a restart
                // rebuilds them.
                self.needs_restart.store(true, Ordering::Release);
                self.health
                    .fail(format!("a reload's backfill failed: {e}; restart weir"));
                tracing::error!(error = %e, "a reload's backfill failed; restart weir");
                filling.answer(Err(format!(
                    "the new pipelines are in place but not filled: {e}; restart weir"
                )));
                return;
            }
        };
        let catch_up = Instant::now();
        for (v, operator) in filled.operators.into_iter().enumerate() {
            if let (Some(op), Some(view)) = (operator, self.views.get_mut(v)) {
                view.operator = op;
            }
        }
        let caught_up = self.replay_only(
            filling.mask.clone(),
            filled.upto,
            self.last_seq,
            filled.watermarks,
        );
        let behind = match caught_up {
            Ok((n, _)) => n,
            Err(e) => {
                self.row_write_failed(&e);
                filling.answer(Err(format!(
                    "the new pipelines are in place but not filled: {e}; restart weir"
                )));
                return;
            }
        };
        for a in &self.alerts {
            a.publish_metrics();
        }
        // (no checkpoint forced here: it would stop ingestion for as long
        // as the whole state takes to copy; until the next one, a restart
        // rebuilds these views from the log, as any start does)
        let paused = filling.paused + catch_up.elapsed();
        tracing::info!(
            records = filled.records,
            caught_up = behind,
            took_ms = filling.started.elapsed().as_millis() as u64,
            swap_ms = filling.paused.as_millis() as u64,
            catch_up_ms = catch_up.elapsed().as_millis() as u64,
            paused_ms = paused.as_millis() as u64,
            "new and changed views backfilled from the log beside the pipeline"
        );
        filling.answer(Ok(paused));
    }

    /// The swap of a reload (see [`Runner::reload`]): in `next`'s views and
    /// rules; returns the views that need filling from the log, if any.
    fn swap(&mut self, next: &Pipeline) -> Result<Option<Vec<bool>>, String> {
        if self.broken || self.needs_restart.load(Ordering::Acquire) {
            return Err("the pipeline has failed and waits for a restart".into());
        }
        if next.streams.len() != self.streams.len()
            || next
                .streams
                .iter()
                .zip(&self.streams)
                .any(|(a, b)| a.name != b.def.name)
        {
            return Err("the streams differ: a restart is needed".into());
        }
        let tables = |p: &[Arc<TableDef>]| -> Vec<(String, u64)> {
            p.iter()
                .map(|t| (t.name.clone(), table_fingerprint(t)))
                .collect()
        };
        if tables(&next.tables) != tables(&self.tables) {
            return Err("the reference tables differ: a restart is needed".into());
        }
        let sinked: HashSet<String> = next
            .sinks
            .iter()
            .filter(|s| !s.from_alert)
            .map(|s| s.from.clone())
            .collect();
        if sinked != self.sinked {
            return Err("the sinks differ: a restart is needed".into());
        }
        // Everything that can fail comes first, so that a failure leaves
        // the running pipeline as it was: new operators, and where each
        // view and rule sits (root stream, upstream view).
        let mut fresh_views = Vec::with_capacity(next.views.len());
        for v in &next.views {
            let kept = self.views.iter().any(|rt| {
                rt.operator.plan().name == v.name && rt.operator.plan().fingerprint == v.fingerprint
            });
            if kept {
                fresh_views.push(None);
            } else {
                let mut operator =
                    ViewOperator::new(v.clone()).map_err(|e| format!("view {}: {e}", v.name))?;
                operator.set_key_ttl(v.key_ttl.or(self.settings.key_ttl));
                fresh_views.push(Some(operator));
            }
        }
        let place = |name: &str, upstream: &Upstream, before: &[Arc<ViewPlan>], roots: &[usize]| {
            locate(name, upstream, &self.streams, before, roots).map_err(|e| e.to_string())
        };
        let mut view_places: Vec<(usize, Option<usize>)> = Vec::with_capacity(next.views.len());
        for (i, v) in next.views.iter().enumerate() {
            let roots: Vec<usize> = view_places.iter().map(|p| p.0).collect();
            view_places.push(place(&v.name, &v.upstream, &next.views[..i], &roots)?);
        }
        let roots: Vec<usize> = view_places.iter().map(|p| p.0).collect();
        let alert_places = next
            .alerts
            .iter()
            .map(|a| place(&a.name, &a.upstream, &next.views, &roots))
            .collect::<Result<Vec<_>, _>>()?;

        // The swap: nothing below fails.
        let mut old_views: std::collections::HashMap<String, ViewRuntime> = self
            .views
            .drain(..)
            .map(|rt| (rt.operator.plan().name.clone(), rt))
            .collect();
        let mut views: Vec<ViewRuntime> = Vec::with_capacity(next.views.len());
        let mut fresh = Vec::with_capacity(next.views.len());
        let mut retired_views = Vec::new();
        for ((v, new_operator), (root, upstream_view)) in
            next.views.iter().zip(fresh_views).zip(view_places)
        {
            let (operator, is_fresh) = match (new_operator, old_views.remove(&v.name)) {
                (Some(op), old) => {
                    retired_views.extend(old);
                    (op, true)
                }
                (None, Some(rt)) => (rt.operator, false),
                // (not reached: a kept view was among the old ones, just
                // drained; if it were, it would start empty and be filled)
                (None, None) => {
                    let mut op = ViewOperator::new(v.clone())
                        .map_err(|e| format!("view {}: {e}", v.name))?;
                    op.set_key_ttl(v.key_ttl.or(self.settings.key_ttl));
                    (op, true)
                }
            };
            fresh.push(is_fresh);
            views.push(ViewRuntime {
                operator,
                root,
                upstream_view,
                metrics: self.metrics.views.get_or_add(&v.name),
            });
        }
        let mut old_alerts: std::collections::HashMap<String, AlertRuntime> = self
            .alerts
            .drain(..)
            .map(|rt| (rt.operator.plan().name.clone(), rt))
            .collect();
        let mut alerts = Vec::with_capacity(next.alerts.len());
        let mut retired = Vec::new();
        for (a, (root, upstream_view)) in next.alerts.iter().zip(alert_places) {
            let operator = match old_alerts.remove(&a.name) {
                Some(rt) if rt.operator.plan().fingerprint == a.fingerprint => rt.operator,
                other => {
                    retired.extend(other);
                    let mut op = RuleOperator::new(a.clone());
                    op.set_key_ttl(a.key_ttl.or(self.settings.key_ttl));
                    adopt_open_alerts(&self.store, &mut op);
                    op
                }
            };
            alerts.push(AlertRuntime {
                operator,
                root,
                upstream_view,
                metrics: self.metrics.alerts.get_or_add(&a.name),
            });
        }
        self.views = views;
        self.alerts = alerts;
        // The replaced operators' state (a whole fleet's, for a changed
        // view) is freed on a thread of its own: at 100 000 terminals
        // freeing it here stopped ingestion for ~0.2 s.
        let _ = std::thread::Builder::new()
            .name("weir-retire".into())
            .spawn(move || drop((old_views, retired_views, old_alerts, retired)));
        let names: std::collections::BTreeSet<&str> =
            next.views.iter().map(|v| v.name.as_str()).collect();
        self.metrics.views.retain(&names);
        let rules: std::collections::BTreeSet<&str> =
            next.alerts.iter().map(|a| a.name.as_str()).collect();
        self.metrics.alerts.retain(&rules);
        // The stored rows of rebuilt views go; the backfill writes them
        // again. Those of the views it fills go on its thread (nothing
        // writes them meanwhile: they are placeholders); the others' here,
        // before they run. A store failure from here on is one a restart
        // mends (the restart replays from the last checkpoint with the new
        // files, and clears what is left).
        let mask = self.fill_mask(fresh);
        if let Err(e) = super::reconcile_views(&self.store, next, |v| !mask[v]) {
            self.row_write_failed(&e);
            return Err(format!(
                "the new pipelines are in place but not filled: {e}; restart weir"
            ));
        }
        for a in &self.alerts {
            a.publish_metrics();
        }
        Ok(mask.contains(&true).then_some(mask))
    }

    /// Takes a checkpoint when one is due (or `force`d at shutdown) and the
    /// writer is free. Only the snapshot happens here, since a consistent
    /// state needs the pipeline to stand still; the writer thread encodes,
    /// writes and syncs it.
    fn checkpoint(&mut self, now: i64, force: bool) {
        if self.needs_restart.load(Ordering::Acquire)
            || matches!(self.checkpoints, Checkpoints::Stopped)
        {
            return;
        }
        if !force
            && now - self.last_checkpoint < self.settings.checkpoint_interval.as_millis() as i64
        {
            return;
        }
        if let Checkpoints::Thread { busy, .. } = &self.checkpoints {
            if !force && busy.load(Ordering::Acquire) {
                return; // the previous one is still being written: next tick
            }
        }
        self.last_checkpoint = now;
        let started = Instant::now();
        let mut parts: Vec<(String, u64, Box<dyn Part>)> =
            Vec::with_capacity(self.views.len() + self.alerts.len());
        for (i, v) in self.views.iter().enumerate() {
            if self.filling.as_ref().is_some_and(|f| f.mask[i]) {
                continue; // being filled: a restart rebuilds it
            }
            let plan = v.operator.plan();
            parts.push((
                plan.name.clone(),
                plan.fingerprint,
                Box::new(v.operator.snapshot_state()),
            ));
        }
        for a in &self.alerts {
            let plan = a.operator.plan();
            parts.push((
                alert_part(&plan.name),
                plan.fingerprint,
                Box::new(a.operator.snapshot_state()),
            ));
        }
        let mut positions = Vec::with_capacity(self.tables.len());
        for t in &self.tables {
            let rows = t.rows.get();
            positions.push((t.rows.durable_slot(), rows.lsn));
            parts.push((
                table_part(&t.name),
                table_fingerprint(t),
                Box::new(crate::table::TablePart(rows)),
            ));
        }
        let streams = self
            .streams
            .iter()
            .map(|s| (s.def.name.clone(), s.watermark.clone()))
            .collect();
        let cp = Pending {
            seq: self.last_seq,
            taken_at: now,
            streams,
            parts,
            positions,
        };
        let pause = started.elapsed().as_micros() as u64;
        self.metrics
            .checkpoint_last_pause_us
            .store(pause, Ordering::Relaxed);
        self.metrics
            .checkpoint_max_pause_us
            .fetch_max(pause, Ordering::Relaxed);
        tracing::debug!(seq = cp.seq, pause_us = pause, "checkpoint snapshot taken");
        match &mut self.checkpoints {
            Checkpoints::Inline(slots) => slots.write(&self.store, &self.metrics, cp, started),
            Checkpoints::Thread { tx, busy, .. } => {
                busy.store(true, Ordering::Release);
                if tx.send((cp, started)).is_err() {
                    busy.store(false, Ordering::Release);
                    tracing::error!("the checkpoint writer has stopped; checkpoint skipped");
                }
            }
            Checkpoints::Stopped => {}
        }
    }

    fn row_write_failed(&mut self, e: &StoreError) {
        self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.store_healthy.store(0, Ordering::Relaxed);
        if !self.needs_restart.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %e, "a view's rows could not be stored; checkpoints stop so that a restart replays them");
        }
        self.health.fail(format!(
            "cannot store view rows: {e}; restart weir to replay them"
        ));
    }

    fn publish_watermark(&self, i: usize) {
        let s = &self.streams[i];
        if let Some(w) = s.watermark.current() {
            s.metrics.watermark.store(w, Ordering::Relaxed);
        }
        if let Some(t) = s.watermark.max_event_time() {
            s.metrics.max_event_time.store(t, Ordering::Relaxed);
        }
    }

    /// Runs the views rooted at stream `root` in dependency order, on a batch
    /// of the stream, or on a watermark. `seq` is the log record's; views fed
    /// by other views use it too, with row ids that do not repeat within the
    /// record. Returns the late rows of the stream batch and the views they
    /// were late for.
    fn run_views(
        &mut self,
        root: usize,
        batch: Option<&EventBatch>,
        watermark: Option<i64>,
        seq: u64,
    ) -> ViewsRun {
        let mut late = BTreeSet::new();
        let mut late_views = Vec::new();
        let mut failed_rows: BTreeMap<u32, String> = BTreeMap::new();
        let mut outputs: Vec<Vec<ViewOutput>> = (0..self.views.len()).map(|_| Vec::new()).collect();
        let row_base = if batch.is_some() {
            0
        } else {
            WATERMARK_ROW_BASE
        };
        let mut failed: Option<StoreError> = None;
        for v in 0..self.views.len() {
            if self.views[v].root != root || self.only.as_ref().is_some_and(|only| !only[v]) {
                continue;
            }
            // A placeholder while its backfill runs beside the pipeline.
            if self.only.is_none() && self.filling.as_ref().is_some_and(|f| f.mask[v]) {
                continue;
            }
            let inputs: Vec<EventBatch> = match self.views[v].upstream_view {
                None => batch.into_iter().cloned().collect(),
                Some(u) => {
                    let mut next_row = row_base;
                    outputs[u]
                        .iter()
                        .map(|o| {
                            let mut b = EventBatch::new(o.rows.clone(), o.event_time.clone(), seq);
                            let n = b.num_rows() as u32;
                            b.row_ids = UInt32Array::from_iter_values(next_row..next_row + n);
                            next_row += n;
                            b
                        })
                        .collect()
                }
            };
            // A windowed join meets the other view's rows of the windows closing now.
            for step in &self.views[v].operator.plan().pre {
                let crate::plan::Step::Lookup(l) = step else {
                    continue;
                };
                let Some((other, key)) = &l.window_join else {
                    continue;
                };
                let batches: Vec<datafusion::arrow::array::RecordBatch> = self
                    .views
                    .iter()
                    .position(|rt| &rt.operator.plan().name == other)
                    .map(|r| outputs[r].iter().map(|o| o.rows.clone()).collect())
                    .unwrap_or_default();
                let schema = l.rows.get().batch.schema();
                match crate::table::Rows::keyed(schema, &batches, key.as_ref()) {
                    Ok(rows) => l.rows.set(Arc::new(rows)),
                    Err(e) => {
                        tracing::error!(view = %self.views[v].operator.plan().name, error = %e, "windowed join: the other side's rows cannot be keyed")
                    }
                }
            }
            let view = &mut self.views[v];
            let name = view.operator.plan().name.clone();
            let mut produced = Vec::new();
            let mut take = |p: crate::window::operator::Processed,
                            view: &mut ViewRuntime,
                            produced: &mut Vec<ViewOutput>| {
                if !p.late_rows.is_empty() {
                    view.metrics
                        .late
                        .fetch_add(p.late_rows.len() as u64, Ordering::Relaxed);
                    if view.upstream_view.is_none() {
                        late.extend(p.late_rows.iter().copied());
                        if !late_views.contains(&name) {
                            late_views.push(name.clone());
                        }
                    }
                }
                produced.extend(p.output);
            };
            for input in &inputs {
                match view.operator.process(input) {
                    Ok(p) => take(p, view, &mut produced),
                    Err(e) => {
                        // A row the view cannot compute (a division by zero,
                        // an overflowing cast) costs that row, not the batch:
                        // the batch goes again row by row, and each failing
                        // row becomes a dead letter naming the view.
                        tracing::warn!(view = %name, error = %e, rows = input.num_rows(), "view failed on a batch; its rows go one by one");
                        for r in 0..input.num_rows() {
                            let one = input.row(r);
                            match view.operator.process(&one) {
                                Ok(p) => take(p, view, &mut produced),
                                Err(e) => {
                                    view.metrics.errors.fetch_add(1, Ordering::Relaxed);
                                    if view.upstream_view.is_none() {
                                        let row = one.row_ids.value(0);
                                        failed_rows
                                            .entry(row)
                                            .or_insert_with(|| format!("view {name}: {e}"));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            if let Some(w) = watermark {
                match view.operator.advance_watermark(w) {
                    Ok(out) => produced.extend(out),
                    Err(e) => {
                        view.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(view = %name, error = %e, "view failed to close windows");
                    }
                }
                let evicted = view.operator.take_evicted();
                if evicted > 0 {
                    view.metrics
                        .keys_evicted
                        .fetch_add(evicted, Ordering::Relaxed);
                }
            }
            for out in &produced {
                let outbox = if self.sinked.contains(&name) {
                    if self.outbox_at.0 != seq {
                        self.outbox_at = (seq, 0);
                    }
                    Some((seq, &mut self.outbox_at.1))
                } else {
                    None
                };
                match sink::write_view_output(&self.store, &name, out, outbox) {
                    Ok(n) => {
                        view.metrics
                            .rows_written
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(view = %name, error = %e, "cannot store view rows");
                        failed = Some(e);
                    }
                }
            }
            view.metrics
                .open_groups
                .store(view.operator.open_groups() as u64, Ordering::Relaxed);
            outputs[v] = produced;
        }
        if self.only.is_none() {
            if let Err(e) = self.run_alerts(root, batch, &outputs, watermark) {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            self.row_write_failed(&e);
        }
        ViewsRun {
            late,
            late_views,
            failed_rows,
        }
    }

    /// Runs the alert rules rooted at stream `root` on what `run_views` fed
    /// and produced, stores their changes and notifies them.
    fn run_alerts(
        &mut self,
        root: usize,
        batch: Option<&EventBatch>,
        outputs: &[Vec<ViewOutput>],
        watermark: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut result = Ok(());
        for a in &mut self.alerts {
            if a.root != root {
                continue;
            }
            let plan = a.operator.plan().clone();
            let mut changes = Vec::new();
            let inputs: Vec<EventBatch> = match a.upstream_view {
                None => batch.into_iter().cloned().collect(),
                Some(u) => outputs[u]
                    .iter()
                    .map(|o| EventBatch::new(o.rows.clone(), o.event_time.clone(), 0))
                    .collect(),
            };
            for input in &inputs {
                match a.operator.process(input) {
                    Ok(c) => changes.extend(c),
                    Err(e) => {
                        a.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(rule = %plan.name, error = %e, "alert rule failed on a batch");
                    }
                }
            }
            if let Some(w) = watermark {
                changes.extend(a.operator.advance_watermark(w));
                let evicted = a.operator.take_evicted();
                if evicted > 0 {
                    a.metrics.keys_evicted.fetch_add(evicted, Ordering::Relaxed);
                }
            }
            if !changes.is_empty() {
                match sink::record_alert_changes(&self.store, &plan.name, plan.severity, &changes) {
                    Ok(events) => {
                        for event in events {
                            let counter = match event.change {
                                ChangeKind::Opened => Some(&a.metrics.opened),
                                ChangeKind::Resolved => Some(&a.metrics.resolved),
                                ChangeKind::Acked => None,
                            };
                            if let Some(c) = counter {
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                            if let Some(n) = &self.notifier {
                                n.notify(event);
                            }
                        }
                    }
                    Err(e) => {
                        a.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(rule = %plan.name, error = %e, "cannot store alerts");
                        result = Err(e);
                    }
                }
            }
            a.publish_metrics();
        }
        result
    }
}

/// (topic, received_at) of the message row `row` of a logged batch came from.
fn message_of<'m>(
    messages: &'m [MessageMeta],
    message_index: &UInt32Array,
    row: usize,
) -> (&'m str, i64) {
    message_index
        .values()
        .get(row)
        .and_then(|&i| messages.get(i as usize))
        .map_or(("", 0), |m| (m.topic.as_str(), m.received_at))
}

/// What [`Runner::run_views`] found beside the rows it wrote.
struct ViewsRun {
    /// Input rows (row ids) late for some view, and those views.
    late: BTreeSet<u32>,
    late_views: Vec<String>,
    /// Input rows a view could not compute, with why.
    failed_rows: BTreeMap<u32, String>,
}

/// The message a panic carried.
pub(super) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
