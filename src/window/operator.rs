//! `ViewOperator`: runs one planned view over batches.
//!
//! `process` takes a batch of the view's input: the pre-aggregate steps
//! (DataFusion `PhysicalExpr`s) filter and project it, then each row is folded
//! into the state of its group and window. `advance_watermark` closes the
//! windows whose end the watermark has reached and returns their rows, after
//! the post-aggregate steps (HAVING, the SELECT list). Updating views return
//! the rows of the keys a batch changed; filter views return the rows that
//! pass. The engine calls `process` before `advance_watermark` for every
//! batch, so that data always precedes the watermark that follows it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, RecordBatchOptions,
    UInt32Array,
};
use datafusion::arrow::compute::{cast, filter, filter_record_batch, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::error::DataFusionError;
use serde::{Deserialize, Serialize};

use super::agg::{scalars_to_array, AggState, Arg, Scalar};
use super::cow::{Chunks, CowMap, CowVec};
use super::{is_closed, Millis, WindowSpec};
use crate::plan::{Step, ViewPlan, ViewShape};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorError {
    #[error("view {view}: {source}")]
    Arrow { view: String, source: ArrowError },
    #[error("view {view}: {source}")]
    DataFusion {
        view: String,
        source: DataFusionError,
    },
    #[error("view {view}: cannot restore snapshot: {message}")]
    Restore { view: String, message: String },
}

/// Rows in flight between stages: the data, each row's event time (ms), and
/// each row's index in the batch the engine first decoded (for dead letters).
#[derive(Debug, Clone)]
pub struct EventBatch {
    pub data: RecordBatch,
    pub event_time: Int64Array,
    pub row_ids: UInt32Array,
    /// Sequence number of the batch; part of the store key of filter-view rows.
    pub seq: u64,
    /// The rows numbered by the value of one of the columns, when a step
    /// numbered them (a lookup join, by its key).
    pub keys: Option<Arc<KeyIds>>,
}

/// A batch's rows numbered by the value of `column` (one of the batch's
/// columns): equal values, equal ids, in `0..distinct`; a NULL has
/// [`NULL_KEY`]. A lookup join numbers its key column to probe the table
/// once per distinct key; an aggregate grouped by that same column reuses
/// the numbering to find each group once per distinct key and window, not
/// once per row.
#[derive(Debug)]
pub struct KeyIds {
    pub column: ArrayRef,
    pub ids: Vec<u32>,
    pub distinct: u32,
    /// Columns of the batch whose value is fixed by `column`'s (a lookup
    /// join's columns of the table): grouping by them as well as by
    /// `column` partitions the rows the same way.
    pub dependent: Vec<ArrayRef>,
}

/// The id of a NULL in [`KeyIds`].
pub const NULL_KEY: u32 = u32::MAX;

impl KeyIds {
    /// The numbering `ids` of `column`'s rows, with `distinct` keys and no
    /// dependent columns yet.
    pub fn new(column: &ArrayRef, ids: Vec<u32>, distinct: usize) -> KeyIds {
        KeyIds {
            column: Arc::clone(column),
            ids,
            distinct: distinct as u32,
            dependent: Vec::new(),
        }
    }

    /// The numbering of the rows `mask` keeps, `data` and `kept` being the
    /// batch before and after; none if the column is not one of `data`'s.
    fn filtered(
        &self,
        data: &RecordBatch,
        kept: &RecordBatch,
        mask: &BooleanArray,
    ) -> Option<Self> {
        let position =
            |column: &ArrayRef| data.columns().iter().position(|c| Arc::ptr_eq(c, column));
        let at = position(&self.column)?;
        let dependent = (self.dependent.iter())
            .filter_map(|d| position(d).map(|i| Arc::clone(kept.column(i))))
            .collect();
        let ids = self
            .ids
            .iter()
            .zip(mask.iter())
            .filter(|(_, keep)| keep.unwrap_or(false))
            .map(|(&id, _)| id)
            .collect();
        Some(KeyIds {
            column: Arc::clone(kept.column(at)),
            ids,
            distinct: self.distinct,
            dependent,
        })
    }
}

/// A [`KeyIds`] as the aggregate uses it: each row's slot (its key's, in
/// order of first appearance) and each slot's first row.
struct Numbering {
    slots: Vec<u32>,
    firsts: UInt32Array,
}

impl Numbering {
    /// None if an id is out of its range (then each row is looked up).
    fn new(keys: &KeyIds) -> Option<Numbering> {
        let null_slot = keys.distinct as usize;
        let mut slot_of = vec![u32::MAX; null_slot + 1];
        let mut firsts = Vec::new();
        let mut slots = Vec::with_capacity(keys.ids.len());
        for (r, &id) in keys.ids.iter().enumerate() {
            let id = match id {
                NULL_KEY => null_slot,
                id if id < keys.distinct => id as usize,
                _ => return None,
            };
            if slot_of[id] == u32::MAX {
                slot_of[id] = firsts.len() as u32;
                firsts.push(r as u32);
            }
            slots.push(slot_of[id]);
        }
        Some(Numbering {
            slots,
            firsts: UInt32Array::from(firsts),
        })
    }
}

impl EventBatch {
    pub fn new(data: RecordBatch, event_time: Int64Array, seq: u64) -> Self {
        let row_ids = UInt32Array::from_iter_values(0..data.num_rows() as u32);
        Self {
            data,
            event_time,
            row_ids,
            seq,
            keys: None,
        }
    }

    pub fn num_rows(&self) -> usize {
        self.data.num_rows()
    }

    /// Row `row` alone, with its row id.
    pub fn row(&self, row: usize) -> EventBatch {
        EventBatch {
            data: self.data.slice(row, 1),
            event_time: self.event_time.slice(row, 1),
            row_ids: self.row_ids.slice(row, 1),
            seq: self.seq,
            keys: None,
        }
    }
}

/// Rows a view writes: upserts keyed by `keys` (DESIGN §4).
#[derive(Debug, Clone)]
pub struct ViewOutput {
    pub rows: RecordBatch,
    pub event_time: Int64Array,
    /// Store key of each row, without the view prefix: window start and group
    /// key for windowed views, group key for updating views, event time and
    /// position for filter views. Big-endian so that keys sort by time.
    pub keys: Vec<Vec<u8>>,
}

/// What one `process` call produced.
#[derive(Debug, Default)]
pub struct Processed {
    pub output: Option<ViewOutput>,
    /// Input rows (by `row_ids`) that fell into a window that had already closed.
    pub late_rows: Vec<u32>,
}

/// One group: its key, the largest event time folded in, and its aggregate
/// states. Cloning one is two reference counts (a checkpoint's snapshot
/// shares it until the group changes; `Arc::make_mut` then copies it).
#[derive(Debug, Clone)]
struct Group {
    key: Arc<[u8]>,
    event_time: Millis,
    states: Arc<[AggState]>,
}

impl Group {
    /// The states to fold into, copied first if a snapshot still holds them.
    fn states_mut(&mut self) -> &mut [AggState] {
        Arc::make_mut(&mut self.states)
    }
}

/// Groups of one window (or of an updating view): key bytes -> aggregate
/// states. The index and the group share the key.
#[derive(Debug, Default, Clone)]
struct Groups {
    index: HashMap<Arc<[u8]>, usize, ahash::RandomState>,
    rows: CowVec<Group>,
}

impl Groups {
    fn group(&mut self, key: &[u8], fresh: &[AggState]) -> usize {
        if let Some(&g) = self.index.get(key) {
            return g;
        }
        let g = self.rows.len();
        let key: Arc<[u8]> = key.into();
        self.index.insert(key.clone(), g);
        self.rows.push(Group {
            key,
            event_time: Millis::MIN,
            states: fresh.into(),
        });
        g
    }

    /// Folds an event at time `t` into group `g` (`fold` updates the states).
    fn fold(&mut self, g: usize, t: Millis, fold: impl FnOnce(&mut [AggState])) {
        if let Some(group) = self.rows.get_mut(g) {
            fold(group.states_mut());
            group.event_time = group.event_time.max(t);
        }
    }

    fn len(&self) -> usize {
        self.rows.len()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    start: Millis,
    /// Last event time plus the gap.
    end: Millis,
    states: Vec<AggState>,
}

/// A key's open sessions, shared with a snapshot until they change.
type SessionList = Arc<KeySessions>;

#[derive(Debug, Clone, Default)]
struct KeySessions {
    sessions: Vec<Session>,
    /// Due time of this key's entry in the timer heap, if it has one.
    timer: Option<Millis>,
}

impl KeySessions {
    fn first_end(&self) -> Option<Millis> {
        self.sessions.iter().map(|s| s.end).min()
    }
}

#[derive(Debug)]
enum State {
    Filter,
    Updating {
        groups: Groups,
        dirty: Vec<usize>,
        is_dirty: Vec<bool>,
    },
    Fixed {
        windows: BTreeMap<Millis, Groups>,
    },
    Sessions {
        sessions: CowMap<Arc<[u8]>, SessionList>,
        /// (end of a key's first session, key), earliest first, with lazy
        /// deletion as in the alert rules: a session that grows leaves its
        /// timer early, and a timer popped before its key's sessions end is
        /// pushed again at the right time. Closing costs what closes, not a
        /// pass over every key.
        timers: BinaryHeap<Reverse<(Millis, Arc<[u8]>)>>,
        /// Sessions open, over all keys (metrics read it per batch).
        open: usize,
    },
}

pub struct ViewOperator {
    plan: Arc<ViewPlan>,
    watermark: Option<Millis>,
    state: State,
    /// Fresh states for a new group, cloned per group.
    fresh: Vec<AggState>,
    converter: Option<RowConverter>,
    /// Schemas with every field nullable: DataFusion's nullability is a
    /// planning hint, the operator's batches are built from real data.
    aggregate_schema: Option<SchemaRef>,
    /// Columns the operator prepends to the SELECT list (`window_start`, `window_end`).
    implicit_window_columns: Vec<&'static str>,
    /// Updating views: keys idle longer than this behind the watermark leave
    /// memory (their stored row stays; if they come back they start afresh).
    key_ttl: Option<Millis>,
    /// The watermark at the last eviction pass.
    evicted_at: Millis,
    /// Keys evicted since the last `take_evicted`.
    evicted: u64,
    /// Hashes the keys of a batch numbered by the operator itself.
    hasher: ahash::RandomState,
    own_numbering: NumberingPolicy,
}

/// Whether the operator numbers a batch's keys itself: not while batches
/// have mostly distinct keys (a view grouped by a transaction id), where
/// numbering saves nothing; such a view tries again every
/// [`NumberingPolicy::PAUSE`] batches.
#[derive(Debug, Default)]
struct NumberingPolicy {
    pause: u32,
}

impl NumberingPolicy {
    const PAUSE: u32 = 64;

    fn wanted(&mut self) -> bool {
        if self.pause == 0 {
            return true;
        }
        self.pause -= 1;
        false
    }

    /// A batch of `rows` rows had `distinct` keys.
    fn observe(&mut self, distinct: usize, rows: usize) {
        if distinct * 4 > rows * 3 {
            self.pause = Self::PAUSE;
        }
    }
}

impl std::fmt::Debug for ViewOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewOperator")
            .field("view", &self.plan.name)
            .field("watermark", &self.watermark)
            .finish()
    }
}

impl ViewOperator {
    pub fn new(plan: Arc<ViewPlan>) -> Result<Self, OperatorError> {
        let view = plan.name.clone();
        let (state, fresh, converter, aggregate_schema) = match &plan.aggregate {
            None => (State::Filter, Vec::new(), None, None),
            Some(agg) => {
                let fresh = agg
                    .aggs
                    .iter()
                    .map(|a| AggState::new(a.kind, a.float_input, a.percentile))
                    .collect();
                let converter = if agg.key_fields.is_empty() {
                    None
                } else {
                    let fields = agg
                        .key_fields
                        .iter()
                        .map(|f| SortField::new(f.data_type().clone()))
                        .collect();
                    Some(
                        RowConverter::new(fields).map_err(|source| OperatorError::Arrow {
                            view: view.clone(),
                            source,
                        })?,
                    )
                };
                let state = match agg.window {
                    None => State::Updating {
                        groups: Groups::default(),
                        dirty: Vec::new(),
                        is_dirty: Vec::new(),
                    },
                    Some(WindowSpec::Session { .. }) => State::Sessions {
                        sessions: CowMap::default(),
                        timers: BinaryHeap::new(),
                        open: 0,
                    },
                    Some(_) => State::Fixed {
                        windows: BTreeMap::new(),
                    },
                };
                (state, fresh, converter, Some(nullable(&agg.schema)))
            }
        };
        let implicit_window_columns = if plan.shape == ViewShape::Windowed {
            ["window_start", "window_end"]
                .into_iter()
                .enumerate()
                .filter(|(i, name)| {
                    plan.output_schema
                        .fields()
                        .get(*i)
                        .is_some_and(|f| f.name() == name)
                })
                .map(|(_, n)| n)
                .collect::<Vec<_>>()
        } else {
            Vec::new()
        };
        Ok(Self {
            plan,
            watermark: None,
            state,
            fresh,
            converter,
            aggregate_schema,
            implicit_window_columns,
            key_ttl: None,
            evicted_at: Millis::MIN,
            evicted: 0,
            hasher: ahash::RandomState::new(),
            own_numbering: NumberingPolicy::default(),
        })
    }

    /// Sets how long an updating view keeps an idle key (event time).
    pub fn set_key_ttl(&mut self, ttl: Option<std::time::Duration>) {
        self.key_ttl = ttl.map(|d| d.as_millis().min(Millis::MAX as u128) as Millis);
    }

    /// Keys evicted since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// Drops the keys of an updating view whose newest event is more than
    /// `key_ttl` behind `watermark`. Runs when the watermark has moved a
    /// tenth of the TTL since the last pass, so its cost (one pass over the
    /// keys) is spread thin.
    fn evict_idle(&mut self, watermark: Millis) {
        let Some(ttl) = self.key_ttl else { return };
        if self.evicted_at != Millis::MIN
            && watermark.saturating_sub(self.evicted_at) < (ttl / 10).max(1)
        {
            return;
        }
        self.evicted_at = watermark;
        let State::Updating {
            groups,
            dirty,
            is_dirty,
        } = &mut self.state
        else {
            return;
        };
        let cutoff = watermark.saturating_sub(ttl);
        if !groups.rows.iter().any(|g| g.event_time < cutoff) {
            return;
        }
        let old = std::mem::take(groups);
        let mut remap = vec![usize::MAX; old.rows.len()];
        for (g, group) in old.rows.iter().enumerate() {
            // A key with an update not yet emitted stays until it is.
            if group.event_time < cutoff && !is_dirty.get(g).copied().unwrap_or(false) {
                self.evicted += 1;
                continue;
            }
            remap[g] = groups.rows.len();
            groups.index.insert(group.key.clone(), groups.rows.len());
            groups.rows.push(group.clone());
        }
        for g in dirty.iter_mut() {
            *g = remap[*g];
        }
        let mut flags = vec![false; groups.rows.len()];
        for &g in dirty.iter() {
            flags[g] = true;
        }
        *is_dirty = flags;
    }

    pub fn plan(&self) -> &Arc<ViewPlan> {
        &self.plan
    }

    pub fn watermark(&self) -> Option<Millis> {
        self.watermark
    }

    /// Number of open groups (windows x keys, sessions, or keys); for metrics.
    pub fn open_groups(&self) -> usize {
        match &self.state {
            State::Filter => 0,
            State::Updating { groups, .. } => groups.len(),
            State::Fixed { windows } => windows.values().map(Groups::len).sum(),
            State::Sessions { open, .. } => *open,
        }
    }

    fn arrow_err(&self) -> impl Fn(ArrowError) -> OperatorError + '_ {
        move |source| OperatorError::Arrow {
            view: self.plan.name.clone(),
            source,
        }
    }

    fn df_err(&self) -> impl Fn(DataFusionError) -> OperatorError + '_ {
        move |source| OperatorError::DataFusion {
            view: self.plan.name.clone(),
            source,
        }
    }

    /// Runs a batch of the view's input through the view.
    pub fn process(&mut self, input: &EventBatch) -> Result<Processed, OperatorError> {
        let batch = run_steps(&self.plan.pre, input.clone()).map_err(self.df_err())?;
        if batch.num_rows() == 0 {
            return Ok(Processed::default());
        }
        // an Arc clone, so that the plan can be read while the state is updated
        let plan = Arc::clone(&self.plan);
        let Some(agg) = plan.aggregate.as_ref() else {
            return Ok(Processed {
                output: Some(self.filter_output(batch)),
                late_rows: Vec::new(),
            });
        };
        let n = batch.num_rows();
        // Keys, arguments and FILTER masks are evaluated by DataFusion, whole-batch.
        let key_arrays = agg
            .keys
            .iter()
            .map(|e| e.evaluate(&batch.data).and_then(|v| v.into_array(n)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.df_err())?;
        // Grouped by one text column (windows and updating views; sessions
        // go row by row), the rows are numbered by key first — or a lookup
        // join on that column already did it, which also serves a grouping
        // by the table's columns as well — so that only each distinct key is
        // converted to its row bytes and found in the groups, once per
        // window: numbering costs a probe of a table of the batch's keys,
        // which stays in the cache; finding a group, a probe of all of them.
        // Otherwise every row is converted and found.
        let numberable = matches!(self.state, State::Fixed { .. } | State::Updating { .. });
        let shared = (batch.keys.as_ref()).filter(|k| {
            k.ids.len() == n
                && key_arrays.iter().any(|a| Arc::ptr_eq(a, &k.column))
                && key_arrays.iter().all(|a| {
                    Arc::ptr_eq(a, &k.column) || k.dependent.iter().any(|d| Arc::ptr_eq(a, d))
                })
        });
        let numbering = match (key_arrays.as_slice(), shared) {
            _ if !numberable => None,
            (_, Some(k)) => Numbering::new(k),
            ([key], None) if self.own_numbering.wanted() => {
                let own =
                    crate::table::number_keys(key, &self.hasher).and_then(|k| Numbering::new(&k));
                if let Some(own) = &own {
                    self.own_numbering.observe(own.firsts.len(), n);
                }
                own
            }
            _ => None,
        };
        let rows = match (&self.converter, &numbering) {
            (Some(c), Some(numbering)) => {
                let firsts = (key_arrays.iter())
                    .map(|a| take(a, &numbering.firsts, None))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(self.arrow_err())?;
                Some(c.convert_columns(&firsts).map_err(self.arrow_err())?)
            }
            (Some(c), None) => Some(c.convert_columns(&key_arrays).map_err(self.arrow_err())?),
            (None, _) => None,
        };
        let mut args = Vec::with_capacity(agg.aggs.len());
        let mut masks: Vec<Option<BooleanArray>> = Vec::with_capacity(agg.aggs.len());
        for a in &agg.aggs {
            args.push(match &a.arg {
                None => Arg::None,
                Some(e) => {
                    let array = e
                        .evaluate(&batch.data)
                        .and_then(|v| v.into_array(n))
                        .map_err(self.df_err())?;
                    Arg::from_array(&array).map_err(self.arrow_err())?
                }
            });
            masks.push(match &a.filter {
                None => None,
                Some(f) => {
                    let array = f
                        .evaluate(&batch.data)
                        .and_then(|v| v.into_array(n))
                        .map_err(self.df_err())?;
                    Some(array.as_boolean().clone())
                }
            });
        }
        let key_of = |i: usize| -> &[u8] {
            match &rows {
                Some(r) => r.row(i).data(),
                None => &[],
            }
        };
        // Row r's group in `groups`; `run` names the window's run of rows (a
        // numbered key is found once per run).
        let fresh = &self.fresh;
        let mut memo = numbering
            .as_ref()
            .map(|nb| vec![(0u32, 0u32); nb.firsts.len()]);
        let mut group_of = |groups: &mut Groups, r: usize, run: u32| -> usize {
            match (&numbering, memo.as_mut()) {
                (Some(nb), Some(memo)) => {
                    let slot = nb.slots[r] as usize;
                    let (seen_in, g) = memo[slot];
                    if seen_in == run {
                        return g as usize;
                    }
                    let g = groups.group(key_of(slot), fresh);
                    memo[slot] = (run, g as u32);
                    g
                }
                _ => groups.group(key_of(r), fresh),
            }
        };
        let mut run: u32 = 0;
        let n_aggs = agg.aggs.len();
        let ignore_nulls: Vec<bool> = agg.aggs.iter().map(|a| a.ignore_nulls).collect();
        let fold = |states: &mut [AggState], i: usize, t: Millis| {
            for j in 0..n_aggs {
                if ignore_nulls[j] && args[j].is_null(i) {
                    continue;
                }
                if let Some(mask) = &masks[j] {
                    if mask.is_null(i) || !mask.value(i) {
                        continue;
                    }
                }
                states[j].update(&args[j], i, t);
            }
        };
        let watermark = self.watermark;
        let mut late_rows = Vec::new();
        match &mut self.state {
            State::Filter => {}
            State::Updating {
                groups,
                dirty,
                is_dirty,
            } => {
                for i in 0..n {
                    let t = batch.event_time.value(i);
                    let g = group_of(groups, i, 1);
                    groups.fold(g, t, |states| fold(states, i, t));
                    if is_dirty.len() <= g {
                        is_dirty.resize(g + 1, false);
                    }
                    if !is_dirty[g] {
                        is_dirty[g] = true;
                        dirty.push(g);
                    }
                }
            }
            State::Fixed { windows } => {
                let (slide, size) = match agg.window {
                    Some(WindowSpec::Hop { slide_ms, size_ms }) => (slide_ms, size_ms),
                    Some(w) => (w.size_ms(), w.size_ms()),
                    None => (1, 1),
                };
                // A row belongs to the windows starting at last_start(t) - j * slide
                // for j = 0.. while they still contain t (WindowSpec::window_starts).
                // Rows mostly come in event-time order, so consecutive rows share a
                // window: its groups are looked up once per run of rows, not per row.
                let last_start = |t: Millis| t - t.rem_euclid(slide);
                let windows_per_row = (size + slide - 1) / slide;
                let times = batch.event_time.values();
                let mut late = vec![false; n];
                for j in 0..windows_per_row {
                    let mut i = 0;
                    while i < n {
                        let start = last_start(times[i]) - j * slide;
                        let mut end = i + 1;
                        while end < n && last_start(times[end]) - j * slide == start {
                            end += 1;
                        }
                        if is_closed(start + size, watermark) {
                            for r in i..end {
                                // late only for windows that contain the row
                                late[r] |= start + size > times[r];
                            }
                            i = end;
                            continue;
                        }
                        let groups = windows.entry(start).or_default();
                        run += 1;
                        for r in i..end {
                            let t = times[r];
                            if start + size <= t {
                                continue; // this window ends before t
                            }
                            let g = group_of(groups, r, run);
                            groups.fold(g, t, |states| fold(states, r, t));
                        }
                        i = end;
                    }
                }
                late_rows.extend((0..n).filter(|&r| late[r]).map(|r| batch.row_ids.value(r)));
            }
            State::Sessions {
                sessions,
                timers,
                open,
            } => {
                let gap = agg.window.map_or(1, |w| w.size_ms());
                for i in 0..n {
                    let t = batch.event_time.value(i);
                    let key = key_of(i);
                    let Some((key_arc, entry)) =
                        sessions.get_or_insert_with(key, || (key.into(), Arc::default()))
                    else {
                        continue;
                    };
                    let entry = Arc::make_mut(entry);
                    let list = &mut entry.sessions;
                    // sessions that [t, t + gap) touches merge into one
                    let (mut start, mut end) = (t, t + gap);
                    let mut merged: Option<Vec<AggState>> = None;
                    let mut k = 0;
                    while k < list.len() {
                        if list[k].start < end && start < list[k].end {
                            let s = list.swap_remove(k);
                            *open -= 1;
                            start = start.min(s.start);
                            end = end.max(s.end);
                            match &mut merged {
                                None => merged = Some(s.states),
                                Some(m) => {
                                    for (a, b) in m.iter_mut().zip(s.states) {
                                        a.merge(b);
                                    }
                                }
                            }
                        } else {
                            k += 1;
                        }
                    }
                    if merged.is_none() && is_closed(end, watermark) {
                        late_rows.push(batch.row_ids.value(i));
                        if list.is_empty() {
                            sessions.remove(key);
                        }
                        continue;
                    }
                    let mut states = merged.unwrap_or_else(|| self.fresh.clone());
                    fold(&mut states, i, t);
                    list.push(Session { start, end, states });
                    *open += 1;
                    if entry.timer.is_none_or(|due| end < due) {
                        entry.timer = Some(end);
                        timers.push(Reverse((end, key_arc.clone())));
                    }
                }
            }
        }
        let output = match &mut self.state {
            State::Updating { .. } => self.emit_updates()?,
            _ => None,
        };
        Ok(Processed { output, late_rows })
    }

    /// Moves the view's watermark to `watermark` and returns the rows of the windows it closed.
    pub fn advance_watermark(
        &mut self,
        watermark: Millis,
    ) -> Result<Option<ViewOutput>, OperatorError> {
        if self.watermark.is_some_and(|w| w >= watermark) {
            return Ok(None);
        }
        self.watermark = Some(watermark);
        // Closed windows and sessions leave the state here; the rows are then
        // built from borrowed states, without copying them per group.
        let mut closed_windows: Vec<(Millis, Millis, Groups)> = Vec::new();
        let mut closed_sessions: Vec<(Arc<[u8]>, Session)> = Vec::new();
        if matches!(self.state, State::Updating { .. }) {
            self.evict_idle(watermark);
            return Ok(None);
        }
        match &mut self.state {
            State::Filter | State::Updating { .. } => return Ok(None),
            State::Fixed { windows } => {
                let size = self.plan.window().map_or(1, |w| w.size_ms());
                while let Some(entry) = windows.first_entry() {
                    let start = *entry.key();
                    if !is_closed(start + size, Some(watermark)) {
                        break;
                    }
                    closed_windows.push((start, start + size, entry.remove()));
                }
            }
            State::Sessions {
                sessions,
                timers,
                open,
            } => {
                while let Some(Reverse((due, _))) = timers.peek() {
                    if !is_closed(*due, Some(watermark)) {
                        break;
                    }
                    let Some(Reverse((due, key))) = timers.pop() else {
                        break;
                    };
                    // (read first: a stale timer copies nothing a snapshot holds)
                    if sessions.get(&key).is_none_or(|e| e.timer != Some(due)) {
                        continue; // the key is gone, or has a later timer
                    }
                    let Some(entry) = sessions.get_mut(&key) else {
                        continue;
                    };
                    let entry = Arc::make_mut(entry);
                    let mut k = 0;
                    while k < entry.sessions.len() {
                        if is_closed(entry.sessions[k].end, Some(watermark)) {
                            closed_sessions.push((key.clone(), entry.sessions.swap_remove(k)));
                            *open -= 1;
                        } else {
                            k += 1;
                        }
                    }
                    entry.timer = entry.first_end();
                    match entry.timer {
                        Some(next) => timers.push(Reverse((next, key))),
                        None => {
                            sessions.remove(&key);
                        }
                    }
                }
                // deterministic output order: by window, then key
                closed_sessions
                    .sort_by(|a, b| (a.1.start, a.1.end, &a.0).cmp(&(b.1.start, b.1.end, &b.0)));
            }
        }
        let mut closed: Vec<Closed> = Vec::new();
        for (start, end, groups) in &closed_windows {
            for group in groups.rows.iter() {
                closed.push(Closed {
                    key: &group.key,
                    window: Some((*start, *end)),
                    states: &group.states,
                    event_time: end - 1,
                });
            }
        }
        for (key, session) in &closed_sessions {
            closed.push(Closed {
                key,
                window: Some((session.start, session.end)),
                states: &session.states,
                event_time: session.end - 1,
            });
        }
        if closed.is_empty() {
            return Ok(None);
        }
        self.emit(&closed)
    }

    fn emit_updates(&mut self) -> Result<Option<ViewOutput>, OperatorError> {
        let changed: Vec<usize> = match &mut self.state {
            State::Updating {
                dirty, is_dirty, ..
            } => {
                for &g in dirty.iter() {
                    is_dirty[g] = false;
                }
                std::mem::take(dirty)
            }
            _ => return Ok(None),
        };
        let State::Updating { groups, .. } = &self.state else {
            return Ok(None);
        };
        if changed.is_empty() {
            return Ok(None);
        }
        let rows: Vec<Closed> = changed
            .iter()
            .filter_map(|&g| groups.rows.get(g))
            .map(|group| Closed {
                key: &group.key,
                window: None,
                states: &group.states,
                event_time: group.event_time,
            })
            .collect();
        self.emit(&rows)
    }

    /// Builds the Aggregate node's output batch from group states, runs the
    /// post-aggregate steps and adds the window columns.
    fn emit(&self, entries: &[Closed<'_>]) -> Result<Option<ViewOutput>, OperatorError> {
        let (Some(agg), Some(schema)) = (&self.plan.aggregate, &self.aggregate_schema) else {
            return Ok(None);
        };
        let m = entries.len();
        let mut key_arrays: Vec<ArrayRef> = match &self.converter {
            Some(c) => {
                let parser = c.parser();
                c.convert_rows(entries.iter().map(|e| parser.parse(e.key)))
                    .map_err(self.arrow_err())?
            }
            None => Vec::new(),
        }
        .into_iter()
        .rev()
        .collect();
        let starts =
            Int64Array::from_iter_values(entries.iter().map(|e| e.window.map_or(0, |w| w.0)));
        let ends =
            Int64Array::from_iter_values(entries.iter().map(|e| e.window.map_or(0, |w| w.1)));
        let group_count = schema.fields().len() - agg.aggs.len();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for i in 0..group_count {
            if agg.window.is_some() && i == agg.window_position {
                columns.push(cast(&starts, schema.field(i).data_type()).map_err(self.arrow_err())?);
            } else if let Some(array) = key_arrays.pop() {
                columns.push(cast(&array, schema.field(i).data_type()).map_err(self.arrow_err())?);
            }
        }
        let mut values: Vec<Scalar> = Vec::with_capacity(m);
        for (j, spec) in agg.aggs.iter().enumerate() {
            values.clear();
            values.extend(entries.iter().map(|e| e.states[j].evaluate()));
            columns.push(scalars_to_array(&values, &spec.output_type).map_err(self.arrow_err())?);
        }
        let data = RecordBatch::try_new_with_options(
            schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(m)),
        )
        .map_err(self.arrow_err())?;
        let event_time = Int64Array::from_iter_values(entries.iter().map(|e| e.event_time));
        let batch = run_steps(&self.plan.post, EventBatch::new(data, event_time, 0))
            .map_err(self.df_err())?;
        // Rows that survived HAVING, by their position in `entries`.
        let survivors: Vec<usize> = batch.row_ids.values().iter().map(|&i| i as usize).collect();
        let mut out_columns: Vec<ArrayRef> = Vec::new();
        let timestamp_type = crate::plan::timestamp_type();
        for name in &self.implicit_window_columns {
            let source = if *name == "window_start" {
                &starts
            } else {
                &ends
            };
            let picked = Int64Array::from_iter_values(survivors.iter().map(|&i| source.value(i)));
            out_columns.push(cast(&picked, &timestamp_type).map_err(self.arrow_err())?);
        }
        out_columns.extend(batch.data.columns().iter().cloned());
        let rows = RecordBatch::try_new_with_options(
            nullable(&self.plan.output_schema),
            out_columns,
            &RecordBatchOptions::new().with_row_count(Some(survivors.len())),
        )
        .map_err(self.arrow_err())?;
        let keys = survivors
            .iter()
            .map(|&i| {
                let e = &entries[i];
                let mut key = Vec::with_capacity(8 + e.key.len());
                if let Some((start, _)) = e.window {
                    key.extend_from_slice(&time_key(start));
                }
                key.extend_from_slice(e.key);
                key
            })
            .collect();
        Ok(Some(ViewOutput {
            rows,
            event_time: batch.event_time,
            keys,
        }))
    }

    fn filter_output(&self, batch: EventBatch) -> ViewOutput {
        let keys = (0..batch.num_rows())
            .map(|i| {
                let mut key = Vec::with_capacity(20);
                key.extend_from_slice(&time_key(batch.event_time.value(i)));
                key.extend_from_slice(&batch.seq.to_be_bytes());
                key.extend_from_slice(&batch.row_ids.value(i).to_be_bytes());
                key
            })
            .collect();
        let rows = match batch
            .data
            .clone()
            .with_schema(nullable(&self.plan.output_schema))
        {
            Ok(rows) => rows,
            // same columns, only nullability differs; keep the batch as it is otherwise
            Err(_) => batch.data,
        };
        ViewOutput {
            rows,
            event_time: batch.event_time,
            keys,
        }
    }

    /// The operator's state (open windows, sessions, updating groups,
    /// watermark) as of now, for a checkpoint. It shares the live state's
    /// chunks ([`CowVec`]), so taking it costs a pointer per chunk: the
    /// pipeline stands still for that, not for the encoding, which the
    /// checkpoint thread does ([`ViewSnapshot::encode`]).
    pub fn snapshot_state(&self) -> ViewSnapshot {
        let state = match &self.state {
            State::Filter => SnapshotState::Empty,
            State::Updating { groups, .. } => SnapshotState::Groups(groups.rows.snapshot()),
            State::Fixed { windows } => SnapshotState::Windows(
                windows
                    .iter()
                    .map(|(s, g)| (*s, g.rows.snapshot()))
                    .collect(),
            ),
            State::Sessions { sessions, .. } => SnapshotState::Sessions(sessions.snapshot()),
        };
        ViewSnapshot {
            view: self.plan.name.clone(),
            watermark: self.watermark,
            state,
        }
    }

    /// The state encoded for a checkpoint (`snapshot_state` then `encode`).
    pub fn snapshot(&self) -> Result<Vec<u8>, OperatorError> {
        self.snapshot_state().encode()
    }

    /// Replaces the operator's state with a snapshot taken by `snapshot`.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        let snap: Snapshot = postcard::from_bytes(bytes).map_err(|e| self.restore_error(e))?;
        self.restore_snapshot(snap)
    }

    fn restore_error(&self, e: impl std::fmt::Display) -> OperatorError {
        OperatorError::Restore {
            view: self.plan.name.clone(),
            message: e.to_string(),
        }
    }

    /// Replaces the operator's state with a checkpoint's chunked part: the
    /// header and the segments a [`ViewSnapshot`] wrote as a
    /// [`crate::checkpoint::Part`].
    pub fn restore_chunked(
        &mut self,
        header: &[u8],
        segments: &crate::checkpoint::Segments,
    ) -> Result<(), OperatorError> {
        let mut snap = Snapshot {
            watermark: postcard::from_bytes(header).map_err(|e| self.restore_error(e))?,
            ..Snapshot::default()
        };
        for (id, chunks) in segments {
            let mut groups = Vec::new();
            for chunk in chunks {
                match &self.state {
                    State::Sessions { .. } => snap.sessions.extend(
                        postcard::from_bytes::<Vec<(Vec<u8>, Vec<Session>)>>(chunk)
                            .map_err(|e| self.restore_error(e))?,
                    ),
                    _ => groups.extend(
                        postcard::from_bytes::<Vec<GroupSnapshot>>(chunk)
                            .map_err(|e| self.restore_error(e))?,
                    ),
                }
            }
            match &self.state {
                State::Fixed { .. } => snap.windows.push((*id, groups)),
                _ => snap.groups.extend(groups),
            }
        }
        self.restore_snapshot(snap)
    }

    fn restore_snapshot(&mut self, snap: Snapshot) -> Result<(), OperatorError> {
        let view = self.plan.name.clone();
        let n_aggs = self.fresh.len();
        let check = |g: &GroupSnapshot| -> Result<(), OperatorError> {
            if g.states.len() == n_aggs {
                Ok(())
            } else {
                Err(OperatorError::Restore {
                    view: view.clone(),
                    message: "aggregate count differs from the plan".into(),
                })
            }
        };
        let build = |list: Vec<GroupSnapshot>| -> Result<Groups, OperatorError> {
            let mut groups = Groups::default();
            for g in list {
                check(&g)?;
                let i = groups.group(&g.key, &g.states);
                if let Some(group) = groups.rows.get_mut(i) {
                    group.event_time = g.event_time;
                }
            }
            Ok(groups)
        };
        self.watermark = snap.watermark;
        match &mut self.state {
            State::Filter => {}
            State::Updating {
                groups,
                dirty,
                is_dirty,
            } => {
                *groups = build(snap.groups)?;
                dirty.clear();
                is_dirty.clear();
            }
            State::Fixed { windows } => {
                windows.clear();
                for (start, list) in snap.windows {
                    windows.insert(start, build(list)?);
                }
            }
            State::Sessions {
                sessions,
                timers,
                open,
            } => {
                sessions.clear();
                timers.clear();
                *open = 0;
                for (key, list) in snap.sessions {
                    let key: Arc<[u8]> = key.into();
                    let mut entry = KeySessions {
                        sessions: list,
                        timer: None,
                    };
                    entry.timer = entry.first_end();
                    if let Some(due) = entry.timer {
                        timers.push(Reverse((due, key.clone())));
                    }
                    *open += entry.sessions.len();
                    sessions.insert(key, Arc::new(entry));
                }
            }
        }
        Ok(())
    }
}

/// A group ready to be emitted, borrowing its key and states.
struct Closed<'a> {
    key: &'a [u8],
    window: Option<(Millis, Millis)>,
    states: &'a [AggState],
    event_time: Millis,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    watermark: Option<Millis>,
    groups: Vec<GroupSnapshot>,
    windows: Vec<(Millis, Vec<GroupSnapshot>)>,
    sessions: Vec<(Vec<u8>, Vec<Session>)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupSnapshot {
    key: Vec<u8>,
    event_time: Millis,
    states: Vec<AggState>,
}

/// An operator's state at one log position (`ViewOperator::snapshot_state`),
/// sharing chunks with the live state until they change.
pub struct ViewSnapshot {
    view: String,
    watermark: Option<Millis>,
    state: SnapshotState,
}

enum SnapshotState {
    Empty,
    Groups(Chunks<Group>),
    Windows(Vec<(Millis, Chunks<Group>)>),
    Sessions(Chunks<(Arc<[u8]>, SessionList)>),
}

/// A view's checkpoint part: the watermark in the header; the groups (one
/// segment), each window's groups (a segment per window, its start the id)
/// or the sessions (one segment) in chunks.
impl crate::checkpoint::Part for ViewSnapshot {
    fn header(&self) -> Result<Vec<u8>, String> {
        postcard::to_stdvec(&self.watermark).map_err(|e| e.to_string())
    }

    fn segments(&self) -> Vec<crate::checkpoint::Segment> {
        match &self.state {
            SnapshotState::Empty => Vec::new(),
            SnapshotState::Groups(groups) => vec![groups.segment(0)],
            SnapshotState::Windows(windows) => windows
                .iter()
                .map(|(start, groups)| groups.segment(*start))
                .collect(),
            SnapshotState::Sessions(sessions) => vec![sessions.segment(0)],
        }
    }

    fn encode_chunk(&self, segment: usize, chunk: usize) -> Result<Vec<u8>, String> {
        let groups = |chunks: &Chunks<Group>| {
            let chunk = chunks.chunk(chunk).ok_or("chunk released")?;
            crate::checkpoint::encode_seq(chunk.iter().map(|g| GroupSnapshotRef {
                key: &g.key,
                event_time: g.event_time,
                states: &g.states,
            }))
        };
        match &self.state {
            SnapshotState::Empty => Err("no chunks".into()),
            SnapshotState::Groups(chunks) => groups(chunks),
            SnapshotState::Windows(windows) => {
                groups(&windows.get(segment).ok_or("no such window")?.1)
            }
            SnapshotState::Sessions(sessions) => crate::checkpoint::encode_seq(
                sessions
                    .chunk(chunk)
                    .ok_or("chunk released")?
                    .iter()
                    .map(|(key, list)| (key.as_ref(), list.sessions.as_slice())),
            ),
        }
    }

    fn release_chunk(&mut self, segment: usize, chunk: usize) {
        match &mut self.state {
            SnapshotState::Empty => {}
            SnapshotState::Groups(chunks) => chunks.release(chunk),
            SnapshotState::Windows(windows) => {
                if let Some((_, chunks)) = windows.get_mut(segment) {
                    chunks.release(chunk);
                }
            }
            SnapshotState::Sessions(sessions) => sessions.release(chunk),
        }
    }
}

impl ViewSnapshot {
    /// Serializes the state in postcard: compact binary serde, 18 MB instead
    /// of JSON's 66 MB for the shipped views at 100 000 terminals
    /// (`benches/durability.rs`). Same bytes as before snapshots were
    /// shared, so older checkpoints restore.
    pub fn encode(&self) -> Result<Vec<u8>, OperatorError> {
        let empty = || SnapshotRef {
            watermark: self.watermark,
            groups: GroupsRef(None),
            windows: Vec::new(),
            sessions: Vec::new(),
        };
        let snap = match &self.state {
            SnapshotState::Empty => empty(),
            SnapshotState::Groups(groups) => SnapshotRef {
                groups: GroupsRef(Some(groups)),
                ..empty()
            },
            SnapshotState::Windows(windows) => SnapshotRef {
                windows: windows
                    .iter()
                    .map(|(s, g)| (*s, GroupsRef(Some(g))))
                    .collect(),
                ..empty()
            },
            SnapshotState::Sessions(sessions) => {
                let mut list: Vec<(&[u8], &[Session])> = sessions
                    .iter()
                    .map(|(k, v)| (k.as_ref(), v.sessions.as_slice()))
                    .collect();
                list.sort_by(|a, b| a.0.cmp(b.0));
                SnapshotRef {
                    sessions: list,
                    ..empty()
                }
            }
        };
        postcard::to_stdvec(&snap).map_err(|e| OperatorError::Restore {
            view: self.view.clone(),
            message: e.to_string(),
        })
    }
}

/// `Snapshot` borrowed from a [`ViewSnapshot`]; serializes to the same bytes
/// (serde writes a sequence, a slice and a `Vec` alike), so `restore` reads
/// it back as a `Snapshot`.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    watermark: Option<Millis>,
    groups: GroupsRef<'a>,
    windows: Vec<(Millis, GroupsRef<'a>)>,
    sessions: Vec<(&'a [u8], &'a [Session])>,
}

#[derive(Serialize)]
struct GroupSnapshotRef<'a> {
    key: &'a [u8],
    event_time: Millis,
    states: &'a [AggState],
}

/// The groups as a sequence of [`GroupSnapshotRef`], written one by one.
struct GroupsRef<'a>(Option<&'a Chunks<Group>>);

impl Serialize for GroupsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let len = self.0.map_or(0, Chunks::len);
        let mut seq = serializer.serialize_seq(Some(len))?;
        for g in self.0.into_iter().flat_map(Chunks::iter) {
            seq.serialize_element(&GroupSnapshotRef {
                key: &g.key,
                event_time: g.event_time,
                states: &g.states,
            })?;
        }
        seq.end()
    }
}

/// Big-endian time with the sign bit flipped, so byte order is time order.
pub fn time_key(t: Millis) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

fn nullable(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ))
}

/// Runs filter/projection steps, carrying event times and row ids along.
pub fn run_steps(steps: &[Step], mut batch: EventBatch) -> Result<EventBatch, DataFusionError> {
    for step in steps {
        let n = batch.num_rows();
        match step {
            Step::Filter(predicate) => {
                let mask = predicate.evaluate(&batch.data)?.into_array(n)?;
                let mask = match mask.data_type() {
                    DataType::Boolean => mask.as_boolean().clone(),
                    other => {
                        return Err(DataFusionError::Plan(format!(
                            "WHERE must be a boolean expression, got {other}"
                        )))
                    }
                };
                if mask.true_count() == n {
                    continue;
                }
                let kept = filter_record_batch(&batch.data, &mask)?;
                batch.keys = batch
                    .keys
                    .take()
                    .and_then(|k| k.filtered(&batch.data, &kept, &mask).map(Arc::new));
                batch.data = kept;
                batch.event_time = filter(&batch.event_time, &mask)?.as_primitive().clone();
                batch.row_ids = filter(&batch.row_ids, &mask)?.as_primitive().clone();
            }
            Step::Project { exprs, schema } => {
                let columns = exprs
                    .iter()
                    .map(|e| e.evaluate(&batch.data).and_then(|v| v.into_array(n)))
                    .collect::<Result<Vec<_>, _>>()?;
                batch.data = RecordBatch::try_new_with_options(
                    nullable(schema),
                    columns,
                    &RecordBatchOptions::new().with_row_count(Some(n)),
                )?;
            }
            Step::Lookup(lookup) => {
                let keys = lookup.key.evaluate(&batch.data)?.into_array(n)?;
                let rows = lookup.rows.get();
                let found = rows.lookup(&keys)?;
                let mut at = found.rows;
                let mut numbered = Some(found.keys);
                if lookup.inner && at.null_count() > 0 {
                    let found = datafusion::arrow::compute::is_not_null(&at)?;
                    let kept = filter_record_batch(&batch.data, &found)?;
                    numbered = numbered.and_then(|k| k.filtered(&batch.data, &kept, &found));
                    batch.data = kept;
                    batch.event_time = filter(&batch.event_time, &found)?.as_primitive().clone();
                    batch.row_ids = filter(&batch.row_ids, &found)?.as_primitive().clone();
                    at = filter(&at, &found)?.as_primitive().clone();
                }
                let mut columns = batch.data.columns().to_vec();
                let mut from_table = Vec::with_capacity(rows.batch.num_columns());
                for (i, column) in rows.batch.columns().iter().enumerate() {
                    from_table.push(if lookup.used.get(i).copied().unwrap_or(true) {
                        datafusion::arrow::compute::take(column, &at, None)?
                    } else {
                        // nothing reads it: not copied
                        datafusion::arrow::array::new_null_array(column.data_type(), at.len())
                    });
                }
                columns.extend(from_table.iter().cloned());
                // The numbering, with the table's columns as fixed by the key.
                // (A key computed by an expression is no column of the batch:
                // no aggregate can be grouped by the same array.)
                batch.keys = numbered.map(|mut k| {
                    k.dependent = from_table;
                    Arc::new(k)
                });
                batch.data = RecordBatch::try_new_with_options(
                    nullable(&lookup.schema),
                    columns,
                    &RecordBatchOptions::new().with_row_count(Some(at.len())),
                )?;
            }
        }
    }
    Ok(batch)
}

/// Batches of the test stream `telemetry(terminal_id, ts, battery_pct)`,
/// shared by the operators' and the rules' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    };
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::EventBatch;
    use crate::window::Millis;

    /// `(terminal_id, ts, battery_pct)` rows at log position `seq`.
    pub(crate) fn batch(rows: &[(&str, Millis, Option<f64>)], seq: u64) -> EventBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("terminal_id", DataType::Utf8, false),
            Field::new("ts", crate::plan::timestamp_type(), false),
            Field::new("battery_pct", DataType::Float64, true),
        ]));
        let data = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(
                    TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1))
                        .with_timezone("UTC"),
                ),
                Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
            ],
        )
        .expect("the test schema fits the test rows");
        EventBatch::new(
            data,
            Int64Array::from_iter_values(rows.iter().map(|r| r.1)),
            seq,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::batch;
    use super::*;
    use crate::plan::plan_sources;
    use datafusion::arrow::util::display::array_value_to_string;

    const STREAM: &str = "CREATE TABLE telemetry (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, battery_pct DOUBLE,
        WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
        WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json');";

    fn operator(view_sql: &str) -> ViewOperator {
        let pipeline = plan_sources(&[("t.sql".into(), format!("{STREAM}\n{view_sql}"))]).unwrap();
        ViewOperator::new(pipeline.views[0].clone()).unwrap()
    }

    /// Rows as "col=value" strings, for readable assertions.
    fn show(out: &ViewOutput) -> Vec<String> {
        let schema = out.rows.schema();
        (0..out.rows.num_rows())
            .map(|i| {
                schema
                    .fields()
                    .iter()
                    .enumerate()
                    .map(|(c, f)| {
                        format!(
                            "{}={}",
                            f.name(),
                            array_value_to_string(out.rows.column(c), i).unwrap()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    const MIN: Millis = 60_000;

    #[test]
    fn tumble_closes_on_watermark_and_reports_late_rows() {
        let mut op = operator(
            "CREATE VIEW v AS SELECT terminal_id, count(*) AS n, min(battery_pct) AS low FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);",
        );
        let p = op
            .process(&batch(
                &[
                    ("a", 1_000, Some(50.0)),
                    ("a", 2_000, Some(40.0)),
                    ("b", 59_999, None),
                ],
                1,
            ))
            .unwrap();
        assert!(p.output.is_none() && p.late_rows.is_empty());
        assert!(
            op.advance_watermark(MIN - 1).unwrap().is_none(),
            "window [0, 60s) is still open"
        );
        let out = op.advance_watermark(MIN).unwrap().unwrap();
        assert_eq!(
            show(&out),
            vec![
                "window_start=1970-01-01T00:00:00Z window_end=1970-01-01T00:01:00Z terminal_id=a n=2 low=40.0",
                "window_start=1970-01-01T00:00:00Z window_end=1970-01-01T00:01:00Z terminal_id=b n=1 low=",
            ]
        );
        // an event for the closed window is late; one for the next window is not
        let p = op
            .process(&batch(
                &[("a", 30_000, Some(1.0)), ("a", MIN + 1, Some(2.0))],
                2,
            ))
            .unwrap();
        assert_eq!(p.late_rows, vec![0]);
        let out = op.advance_watermark(2 * MIN).unwrap().unwrap();
        assert_eq!(show(&out), vec!["window_start=1970-01-01T00:01:00Z window_end=1970-01-01T00:02:00Z terminal_id=a n=1 low=2.0"]);
    }

    #[test]
    fn hop_counts_each_event_in_every_window() {
        let mut op = operator(
            "CREATE VIEW v AS SELECT count(*) AS n FROM telemetry GROUP BY hop(INTERVAL '1' MINUTE, INTERVAL '2' MINUTE);",
        );
        op.process(&batch(&[("a", 30_000, None), ("a", 90_000, None)], 1))
            .unwrap();
        let out = op.advance_watermark(3 * MIN).unwrap().unwrap();
        let rows = show(&out);
        assert_eq!(rows.len(), 3);
        assert!(rows[0].ends_with("n=1"), "[-1m,1m) holds 30s: {rows:?}");
        assert!(rows[1].ends_with("n=2"), "[0,2m) holds both: {rows:?}");
        assert!(rows[2].ends_with("n=1"), "[1m,3m) holds 90s: {rows:?}");
    }

    #[test]
    fn sessions_merge_and_close_after_gap() {
        let mut op = operator(
            "CREATE VIEW v AS SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id, session(INTERVAL '10' SECOND);",
        );
        op.process(&batch(
            &[("a", 0, None), ("a", 22_000, None), ("a", 5_000, None)],
            1,
        ))
        .unwrap();
        op.process(&batch(&[("b", 1_000, None)], 2)).unwrap();
        assert_eq!(op.open_groups(), 3, "a has two sessions, b one");
        // sessions [0s,15s) and [22s,32s); 14 s reaches both and bridges them into one
        op.process(&batch(&[("a", 14_000, None)], 2)).unwrap();
        assert_eq!(op.open_groups(), 2);
        op.advance_watermark(11_000).unwrap();
        assert_eq!(op.open_groups(), 1, "b's session closed");
        assert!(op.advance_watermark(31_999).unwrap().is_none());
        let out = op.advance_watermark(32_000).unwrap().unwrap();
        assert_eq!(op.open_groups(), 0);
        assert_eq!(
            show(&out),
            vec!["window_start=1970-01-01T00:00:00Z window_end=1970-01-01T00:00:32Z terminal_id=a n=4"]
        );
        // a lone event whose session would already be closed is late
        let p = op.process(&batch(&[("a", 20_000, None)], 3)).unwrap();
        assert_eq!(p.late_rows, vec![0]);
    }

    #[test]
    fn idle_keys_of_an_updating_view_leave_memory_after_key_ttl() {
        let mut op = operator(
            "CREATE VIEW v WITH (key_ttl = '1 minute') AS SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id;",
        );
        op.set_key_ttl(op.plan().key_ttl);
        op.process(&batch(&[("a", 0, None), ("b", 100_000, None)], 1))
            .unwrap();
        assert_eq!(op.open_groups(), 2);
        // b is within a minute of the watermark, a is not
        op.advance_watermark(100_000).unwrap();
        assert_eq!((op.open_groups(), op.take_evicted()), (1, 1));
        assert_eq!(op.take_evicted(), 0);
        // a comes back: it starts afresh; b kept its count
        let out = op
            .process(&batch(&[("a", 110_000, None), ("b", 110_000, None)], 2))
            .unwrap()
            .output
            .unwrap();
        assert_eq!(show(&out), vec!["terminal_id=a n=1", "terminal_id=b n=2"]);
        // without a TTL nothing goes
        let mut keep = operator(
            "CREATE VIEW v AS SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id;",
        );
        keep.process(&batch(&[("a", 0, None)], 1)).unwrap();
        keep.advance_watermark(i64::MAX).unwrap();
        assert_eq!(keep.open_groups(), 1);
    }

    #[test]
    fn updating_view_emits_changed_keys_and_ignores_lateness() {
        let mut op = operator(
            "CREATE VIEW v AS SELECT terminal_id, last_value(battery_pct) AS battery, count(*) AS n FROM telemetry GROUP BY terminal_id;",
        );
        let out = op
            .process(&batch(
                &[("a", 10_000, Some(50.0)), ("b", 11_000, Some(60.0))],
                1,
            ))
            .unwrap()
            .output
            .unwrap();
        assert_eq!(
            show(&out),
            vec![
                "terminal_id=a battery=50.0 n=1",
                "terminal_id=b battery=60.0 n=1"
            ]
        );
        op.advance_watermark(1_000_000).unwrap();
        // an old event still counts, but does not replace the newer value
        let out = op
            .process(&batch(&[("a", 5_000, Some(99.0))], 2))
            .unwrap()
            .output
            .unwrap();
        assert_eq!(show(&out), vec!["terminal_id=a battery=50.0 n=2"]);
    }

    #[test]
    fn filter_view_keeps_matching_rows_with_unique_keys() {
        let mut op = operator("CREATE VIEW v AS SELECT terminal_id, battery_pct * 2 AS doubled FROM telemetry WHERE battery_pct < 20;");
        let out = op
            .process(&batch(
                &[
                    ("a", 1, Some(10.0)),
                    ("b", 2, Some(30.0)),
                    ("c", 3, Some(5.0)),
                ],
                7,
            ))
            .unwrap()
            .output
            .unwrap();
        assert_eq!(
            show(&out),
            vec!["terminal_id=a doubled=20.0", "terminal_id=c doubled=10.0"]
        );
        assert_ne!(out.keys[0], out.keys[1]);
    }

    #[test]
    fn filter_clause_and_having() {
        let mut op = operator(
            "CREATE VIEW v AS SELECT terminal_id, count(*) FILTER (WHERE battery_pct < 20) AS low FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE) HAVING count(*) > 1;",
        );
        op.process(&batch(
            &[
                ("a", 1, Some(10.0)),
                ("a", 2, Some(30.0)),
                ("b", 3, Some(5.0)),
            ],
            1,
        ))
        .unwrap();
        let out = op.advance_watermark(MIN).unwrap().unwrap();
        assert_eq!(show(&out).len(), 1);
        assert!(
            show(&out)[0].ends_with("terminal_id=a low=1"),
            "{:?}",
            show(&out)
        );
        assert_eq!(out.keys.len(), 1);
    }

    /// The same input, straight or through snapshot -> new operator ->
    /// restore, gives the same rows. The snapshot is encoded only after the
    /// live operator ran on (new groups, changed groups, closed windows), as
    /// the checkpoint thread encodes while the pipeline runs: it must still
    /// hold the state as of when it was taken.
    #[test]
    fn snapshot_restore_gives_the_same_output_for_every_shape() {
        let views = [
            "CREATE VIEW v AS SELECT terminal_id, count(*) AS n, avg(battery_pct) AS a, approx_percentile_cont(battery_pct, 0.5) AS p FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);",
            "CREATE VIEW v AS SELECT terminal_id, count(DISTINCT battery_pct) AS n FROM telemetry GROUP BY terminal_id, hop(INTERVAL '30' SECOND, INTERVAL '1' MINUTE);",
            "CREATE VIEW v AS SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id, session(INTERVAL '10' SECOND);",
            "CREATE VIEW v AS SELECT terminal_id, sum(battery_pct) AS s FROM telemetry GROUP BY terminal_id;",
        ];
        let first = batch(
            &[
                ("a", 1_000, Some(1.0)),
                ("b", 20_000, Some(2.0)),
                ("a", 50_000, Some(3.0)),
            ],
            1,
        );
        let second = batch(
            &[
                ("a", 55_000, Some(4.0)),
                ("b", 70_000, Some(5.0)),
                ("c", 130_000, Some(6.0)),
            ],
            2,
        );
        for sql in views {
            // restart: 0 none, 1 from the one-piece encoding, 2 from a
            // checkpoint's chunks
            let run = |restart: u8| -> Vec<String> {
                let mut op = operator(sql);
                let mut rows = Vec::new();
                let mut step = |op: &mut ViewOperator, b: &EventBatch, w: Millis| {
                    if let Some(o) = op.process(b).unwrap().output {
                        rows.extend(show(&o));
                    }
                    if let Some(o) = op.advance_watermark(w).unwrap() {
                        rows.extend(show(&o));
                    }
                };
                step(&mut op, &first, 45_000);
                if restart > 0 {
                    let shared = op.snapshot_state();
                    op.process(&second).unwrap();
                    op.advance_watermark(200_000).unwrap();
                    if restart == 1 {
                        let snap = shared.encode().unwrap();
                        op = operator(sql);
                        op.restore(&snap).unwrap();
                    } else {
                        let (header, segments) = crate::checkpoint::round_trip(Box::new(shared));
                        op = operator(sql);
                        op.restore_chunked(&header, &segments).unwrap();
                    }
                }
                step(&mut op, &second, 200_000);
                rows
            };
            let straight = run(0);
            assert!(!straight.is_empty(), "{sql}");
            assert_eq!(straight, run(1), "{sql}");
            assert_eq!(straight, run(2), "{sql}: from chunks");
        }
    }

    fn time_from_key(bytes: [u8; 8]) -> Millis {
        (u64::from_be_bytes(bytes) ^ (1 << 63)) as Millis
    }

    #[test]
    fn time_keys_sort_like_times() {
        let times = [-5_000, -1, 0, 1, 60_000, i64::MAX / 2];
        for w in times.windows(2) {
            assert!(time_key(w[0]) < time_key(w[1]));
            assert_eq!(time_from_key(time_key(w[0])), w[0]);
        }
    }

    /// Batches of mostly distinct keys are not numbered for a while.
    #[test]
    fn numbering_pauses_while_keys_are_mostly_distinct() {
        let mut policy = NumberingPolicy::default();
        assert!(policy.wanted());
        policy.observe(10, 100);
        assert!(policy.wanted(), "few keys: numbered");
        policy.observe(80, 100);
        let skipped = (0..200).take_while(|_| !policy.wanted()).count();
        assert_eq!(skipped, NumberingPolicy::PAUSE as usize);
        assert!(policy.wanted());
    }

    /// A view grouped by one text column finds its groups through a
    /// numbering of the batch's keys (once per key and window, not per
    /// row), its own or, when it joins a reference table on that column,
    /// the join's: its counts and sums must be those of every row found on
    /// its own, for hop windows (a row in two windows, runs of rows by
    /// window), an updating view, NULL keys, keys the table lacks, an inner
    /// join and a WHERE on the table's column (rows filtered after the
    /// numbering).
    #[test]
    fn numbered_keys_group_as_rows_found_one_by_one() {
        let sql = "CREATE TABLE readings (terminal_id TEXT, ts TIMESTAMP NOT NULL, v DOUBLE,
                WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
            WITH (connector = 'mqtt', topic = 'r/+', format = 'json');
            CREATE TABLE terminals (terminal_id TEXT NOT NULL PRIMARY KEY, region TEXT)
            WITH (connector = 'postgres', connection = 'backoffice', table = 'terminals');
            CREATE VIEW hop_joined AS SELECT r.terminal_id, count(*) AS n, sum(r.v) AS s
              FROM readings r LEFT JOIN terminals t ON r.terminal_id = t.terminal_id
              GROUP BY r.terminal_id, hop(INTERVAL '1' MINUTE, INTERVAL '2' MINUTE);
            CREATE VIEW hop_plain AS SELECT terminal_id, count(*) AS n, sum(v) AS s
              FROM readings GROUP BY terminal_id, hop(INTERVAL '1' MINUTE, INTERVAL '2' MINUTE);
            CREATE VIEW north_joined AS SELECT r.terminal_id, count(*) AS n, sum(r.v) AS s
              FROM readings r JOIN terminals t ON r.terminal_id = t.terminal_id
              WHERE t.region = 'north'
              GROUP BY r.terminal_id, tumble(INTERVAL '1' MINUTE);
            CREATE VIEW north_plain AS SELECT terminal_id, count(*) AS n, sum(v) AS s
              FROM readings WHERE terminal_id IN ('a', 'c')
              GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);
            CREATE VIEW latest_joined AS SELECT r.terminal_id, count(*) AS n, sum(r.v) AS s
              FROM readings r LEFT JOIN terminals t ON r.terminal_id = t.terminal_id
              GROUP BY r.terminal_id;
            CREATE VIEW latest_plain AS SELECT terminal_id, count(*) AS n, sum(v) AS s
              FROM readings GROUP BY terminal_id;
            CREATE VIEW region_joined AS SELECT r.terminal_id, t.region, count(*) AS n, sum(r.v) AS s
              FROM readings r LEFT JOIN terminals t ON r.terminal_id = t.terminal_id
              GROUP BY r.terminal_id, t.region, tumble(INTERVAL '1' MINUTE);
            CREATE VIEW region_plain AS SELECT terminal_id, count(*) AS n, sum(v) AS s
              FROM readings GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);";
        let pipeline = plan_sources(&[("t.sql".into(), sql.to_string())]).unwrap();
        let table = pipeline.table("terminals").unwrap();
        let changes = crate::table::change_batch(
            &table.schema,
            vec![
                Arc::new(datafusion::arrow::array::StringArray::from(vec![
                    "a", "b", "c", "d",
                ])),
                Arc::new(datafusion::arrow::array::StringArray::from(vec![
                    "north", "south", "north", "south",
                ])),
            ],
            vec![crate::table::OP_UPSERT; 4],
            vec![1; 4],
        )
        .unwrap();
        table
            .rows
            .set(Arc::new(table.rows.get().apply(&changes).unwrap()));

        // keys interleaved, some NULL, "x" and "y" not in the table; times
        // over three minutes, not in order
        let keys = ["a", "b", "x", "c", "a", "", "d", "b", "y", "a", "c", ""];
        let batches: Vec<EventBatch> = (0..6)
            .map(|b| {
                let rows: Vec<(Option<&str>, Millis, f64)> = (0..40)
                    .map(|i| {
                        let k = keys[(i * 7 + b * 5) % keys.len()];
                        let t = ((i * 37 + b * 11) % 180) as Millis * 1_000;
                        (Some(k).filter(|k| !k.is_empty()), t, (i + b) as f64)
                    })
                    .collect();
                let schema = pipeline.streams[0].schema.clone();
                let data = RecordBatch::try_new(
                    schema,
                    vec![
                        Arc::new(datafusion::arrow::array::StringArray::from(
                            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                        )),
                        Arc::new(
                            datafusion::arrow::array::TimestampMillisecondArray::from(
                                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                            )
                            .with_timezone_opt(
                                match crate::plan::timestamp_type() {
                                    DataType::Timestamp(_, tz) => tz,
                                    _ => None,
                                },
                            ),
                        ),
                        Arc::new(datafusion::arrow::array::Float64Array::from(
                            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                        )),
                    ],
                )
                .unwrap();
                let times = Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
                EventBatch::new(data, times, b as u64 + 1)
            })
            .collect();

        for (joined, plain) in [
            ("hop_joined", "hop_plain"),
            ("north_joined", "north_plain"),
            ("latest_joined", "latest_plain"),
            ("region_joined", "region_plain"),
        ] {
            let view = |name: &str| {
                let plan = pipeline.views.iter().find(|v| v.name == name).unwrap();
                ViewOperator::new(plan.clone()).unwrap()
            };
            let (mut j, mut p, mut per_row) = (view(joined), view(plain), view(plain));
            // the reference: every row converted and found on its own
            per_row.own_numbering.pause = u32::MAX;
            // the joined view does take the numbered path
            // (grouped by the join's key, and by the table's region as well)
            let stepped = run_steps(&j.plan.pre, batches[0].clone()).unwrap();
            let numbered = stepped.keys.as_ref().expect("the join numbers its keys");
            let keys = &j.plan.aggregate.as_ref().unwrap().keys;
            for (i, key) in keys.iter().enumerate() {
                let key = key.evaluate(&stepped.data).unwrap();
                let key = key.into_array(stepped.num_rows()).unwrap();
                let same = |a: &ArrayRef| Arc::ptr_eq(a, &key);
                match i {
                    0 => assert!(same(&numbered.column), "{joined}"),
                    _ => assert!(numbered.dependent.iter().any(same), "{joined}"),
                }
            }
            let out = |op: &mut ViewOperator| {
                let mut rows = Vec::new();
                for b in &batches {
                    rows.extend(op.process(b).unwrap().output.iter().flat_map(show));
                }
                rows.extend(
                    op.advance_watermark(10 * MIN)
                        .unwrap()
                        .iter()
                        .flat_map(show),
                );
                rows.sort();
                rows
            };
            let (from_joined, from_plain) = (out(&mut j), out(&mut p));
            let reference = out(&mut per_row);
            assert!(reference.len() > 5, "{plain}: {reference:?}");
            assert_eq!(from_plain, reference, "{plain}, its keys numbered");
            // region_joined: the plain rows with each terminal's region
            let mut expected: Vec<String> = reference
                .iter()
                .map(|row| {
                    if joined != "region_joined" {
                        return row.clone();
                    }
                    let region = match row.split(' ').find(|f| f.starts_with("terminal_id=")) {
                        Some("terminal_id=a" | "terminal_id=c") => "north",
                        Some("terminal_id=b" | "terminal_id=d") => "south",
                        _ => "",
                    };
                    row.replace(" n=", &format!(" region={region} n="))
                })
                .collect();
            expected.sort();
            assert_eq!(from_joined, expected, "{joined} against {plain}");
        }
    }
}
