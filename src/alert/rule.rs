//! One alert rule at run time: judges rows, keeps a [`KeyState`] per key,
//! and wakes keys whose `for`, `absent_for` or `reopen_after` comes due as
//! the watermark moves.
//!
//! Timers are a min-heap of (due time, key) with lazy deletion: a key's due
//! time only moves later as rows arrive (a silence restarts), so instead of
//! re-sorting on every row, a popped timer that is no longer due is pushed
//! again at the key's current due time. A key is re-pushed at most once per
//! `absent_for` of watermark progress, and the watermark check costs nothing
//! while no timer is due.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::error::DataFusionError;
use datafusion::physical_expr::PhysicalExpr;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{KeyState, Timing, Transition, Verdict};
use crate::plan::AlertPlan;
use crate::window::cow::{Chunks, CowMap};
use crate::window::operator::{run_steps, EventBatch};
use crate::window::Millis;

/// A transition of one key's alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    /// When the alert this change belongs to opened (its identity).
    pub opened_at: Millis,
    pub transition: Transition,
}

#[derive(Debug, Default, Clone)]
struct Entry {
    state: KeyState,
    /// Due time of this key's timer in the heap, if it has one.
    timer: Option<Millis>,
}

pub struct RuleOperator {
    plan: Arc<AlertPlan>,
    /// Per key: its state; a checkpoint shares it (`CowMap::snapshot`).
    keys: CowMap<Arc<str>, Entry>,
    timers: BinaryHeap<Reverse<(Millis, Arc<str>)>>,
    watermark: Option<Millis>,
    open: usize,
    /// A key idle this long (event time, behind the watermark) is forgotten.
    key_ttl: Option<Millis>,
    /// Watermark of the last pass over the keys for `key_ttl`.
    last_sweep: Option<Millis>,
    /// Keys forgotten so far (taken by the metrics).
    evicted: u64,
}

/// What a row or a timer may change besides its key's state: the timer
/// heap, the count of open alerts and the changes to report (borrowed
/// apart from the keys, so a key's entry is looked up once).
struct Counts<'a> {
    timers: &'a mut BinaryHeap<Reverse<(Millis, Arc<str>)>>,
    open: &'a mut usize,
    changes: &'a mut Vec<Change>,
}

impl Counts<'_> {
    /// Records a transition and (re)arms the key's timer.
    fn after_change(
        &mut self,
        entry: &mut Entry,
        timing: &Timing,
        key: &Arc<str>,
        opened_before: Option<Millis>,
        transition: Option<Transition>,
    ) {
        // (the state already includes `transition`: a key that just resolved
        // may be due again, say when its reopen_after guard ends)
        if let Some(due) = entry.state.due(timing) {
            if entry.timer.is_none_or(|t| due < t) {
                entry.timer = Some(due);
                self.timers.push(Reverse((due, key.clone())));
            }
        }
        let Some(transition) = transition else {
            return;
        };
        let opened_at = match &transition {
            Transition::Opened { at, .. } => {
                *self.open += 1;
                *at
            }
            Transition::Resolved { .. } => {
                *self.open = self.open.saturating_sub(1);
                opened_before.unwrap_or_default()
            }
        };
        self.changes.push(Change {
            key: key.to_string(),
            opened_at,
            transition,
        });
    }
}

/// What a checkpoint holds of a rule.
#[derive(Deserialize)]
struct Snapshot {
    watermark: Option<Millis>,
    keys: Vec<(String, KeyState)>,
}

/// `Snapshot` borrowed from a [`RuleSnapshot`]: the same bytes.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    watermark: Option<Millis>,
    keys: Vec<(&'a str, &'a KeyState)>,
}

/// A rule's state at one log position (`RuleOperator::snapshot_state`).
pub struct RuleSnapshot {
    watermark: Option<Millis>,
    keys: Chunks<(Arc<str>, Entry)>,
}

/// A rule's checkpoint part: the watermark in the header, the keys' states
/// in chunks (one segment).
impl crate::checkpoint::Part for RuleSnapshot {
    fn header(&self) -> Result<Vec<u8>, String> {
        postcard::to_stdvec(&self.watermark).map_err(|e| e.to_string())
    }

    fn segments(&self) -> Vec<crate::checkpoint::Segment> {
        vec![self.keys.segment(0)]
    }

    fn encode_chunk(&self, _: usize, chunk: usize) -> Result<Vec<u8>, String> {
        let chunk = self.keys.chunk(chunk).ok_or("chunk released")?;
        crate::checkpoint::encode_seq(chunk.iter().map(|(key, e)| (&**key, &e.state)))
    }

    fn release_chunk(&mut self, _: usize, chunk: usize) {
        self.keys.release(chunk);
    }
}

impl RuleSnapshot {
    /// Postcard, keys in order (deterministic bytes).
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut keys: Vec<(&str, &KeyState)> =
            self.keys.iter().map(|(k, e)| (&**k, &e.state)).collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        postcard::to_stdvec(&SnapshotRef {
            watermark: self.watermark,
            keys,
        })
    }
}

impl RuleOperator {
    pub fn new(plan: Arc<AlertPlan>) -> Self {
        Self {
            plan,
            keys: CowMap::default(),
            timers: BinaryHeap::new(),
            watermark: None,
            open: 0,
            key_ttl: None,
            last_sweep: None,
            evicted: 0,
        }
    }

    /// Keys idle longer than `ttl` (in event time) are forgotten; an alert
    /// still open for such a key is resolved (with no row), so that a key
    /// that will never report again cannot hold state or an alert forever.
    pub fn set_key_ttl(&mut self, ttl: Option<std::time::Duration>) {
        self.key_ttl = ttl.map(|d| d.as_millis().min(Millis::MAX as u128) as Millis);
    }

    /// Keys forgotten since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// Forgets the keys idle longer than `key_ttl` at watermark `w`. Runs
    /// once per tenth of the TTL of watermark progress: a pass over all keys
    /// that often costs nothing worth counting.
    fn sweep(&mut self, w: Millis, changes: &mut Vec<Change>) {
        let Some(ttl) = self.key_ttl else {
            return;
        };
        if self
            .last_sweep
            .is_some_and(|s| w.saturating_sub(s) < (ttl / 10).max(1))
        {
            return;
        }
        self.last_sweep = Some(w);
        let before = w.saturating_sub(ttl);
        let idle = self
            .keys
            .retain(|_, e| e.state.last_activity().is_some_and(|t| t >= before));
        for (key, entry) in idle {
            if let Some(opened_at) = entry.state.opened_at {
                self.open = self.open.saturating_sub(1);
                changes.push(Change {
                    key: key.to_string(),
                    opened_at,
                    transition: Transition::Resolved { at: w, row: None },
                });
            }
            self.evicted += 1;
        }
    }

    pub fn plan(&self) -> &Arc<AlertPlan> {
        &self.plan
    }

    /// Alerts of this rule now open.
    pub fn open_alerts(&self) -> usize {
        self.open
    }

    /// Keys this rule tracks.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Judges every row of `input` (rows of the rule's source), in order.
    pub fn process(&mut self, input: &EventBatch) -> Result<Vec<Change>, DataFusionError> {
        let n = input.num_rows();
        if n == 0 {
            return Ok(Vec::new());
        }
        let fires = evaluate(self.plan.condition.as_ref(), input)?;
        let clears = evaluate(self.plan.clear.as_ref(), input)?;
        let projected = run_steps(&self.plan.project, input.clone())?;
        let rows = &projected.data;
        let key_column = rows.column(self.plan.key_index);
        let names = crate::sink::json_names(rows);
        let timing = self.plan.timing;
        let mut changes = Vec::new();
        let verdict = |i: usize| match (&fires, &clears) {
            (Some(f), _) if f.is_valid(i) && f.value(i) => Verdict::Fires,
            (None, _) => Verdict::Fires,
            (_, Some(c)) => {
                if c.is_valid(i) && c.value(i) {
                    Verdict::Clears
                } else {
                    Verdict::Neither
                }
            }
            // Without `clear`, a row on which the condition is false
            // resolves; one on which it is NULL (say, no battery
            // reading) says nothing.
            (Some(f), None) if f.is_valid(i) => Verdict::Clears,
            (Some(_), None) => Verdict::Neither,
        };
        let mut i = 0;
        while i < n {
            let Some(key) = key_text(key_column.as_ref(), i) else {
                i += 1;
                continue; // no key: nobody to alert about
            };
            // A run of rows of the same key (a terminal's message is one)
            // looks its key up once.
            let mut end = i + 1;
            while end < n && key_text(key_column.as_ref(), end).as_deref() == Some(key.as_ref()) {
                end += 1;
            }
            let mut entry: Option<(&Arc<str>, &mut Entry)> = None;
            for r in i..end {
                let verdict = verdict(r);
                if timing.absent_for_ms.is_some() && verdict != Verdict::Fires {
                    continue; // only rows that pass WHERE count as reporting
                }
                let (key, e) = match entry.take() {
                    Some(found) => found,
                    None => match self.keys.get_or_insert_with(key.as_ref(), || {
                        (key.as_ref().into(), Entry::default())
                    }) {
                        Some(found) => found,
                        None => break,
                    },
                };
                let t = input.event_time.value(r);
                let opened_at = e.state.opened_at;
                let transition = e.state.observe(&timing, t, verdict, || {
                    let mut text = String::with_capacity(64);
                    crate::sink::write_row(&mut text, &names, rows, r);
                    text
                });
                let mut counts = Counts {
                    timers: &mut self.timers,
                    open: &mut self.open,
                    changes: &mut changes,
                };
                counts.after_change(e, &timing, key, opened_at, transition);
                entry = Some((key, e));
            }
            i = end;
        }
        Ok(changes)
    }

    /// Opens the alerts whose time came with watermark `w`.
    pub fn advance_watermark(&mut self, w: Millis) -> Vec<Change> {
        if self.watermark.is_some_and(|old| w <= old) {
            return Vec::new();
        }
        self.watermark = Some(w);
        let timing = self.plan.timing;
        let mut changes = Vec::new();
        while let Some(Reverse((due, _))) = self.timers.peek() {
            if *due > w {
                break;
            }
            let Some(Reverse((due, key))) = self.timers.pop() else {
                break;
            };
            let Some(entry) = self.keys.get_mut(&*key) else {
                continue;
            };
            if entry.timer != Some(due) {
                continue; // replaced by an earlier timer, already handled
            }
            match entry.state.due(&timing) {
                // the key's time moved on since this timer was set: wait
                // for that, in order with the other keys
                Some(actual) if actual > due => {
                    entry.timer = Some(actual);
                    self.timers.push(Reverse((actual, key)));
                    continue;
                }
                Some(_) => entry.timer = None,
                None => {
                    entry.timer = None;
                    continue;
                }
            }
            let opened_at = entry.state.opened_at;
            let transition = entry.state.on_watermark(&timing, w);
            let mut counts = Counts {
                timers: &mut self.timers,
                open: &mut self.open,
                changes: &mut changes,
            };
            counts.after_change(entry, &timing, &key, opened_at, transition);
        }
        self.sweep(w, &mut changes);
        changes
    }

    /// Takes over alerts found open in the store for a rule whose own state
    /// was not restored (new definition): they stay open until they clear.
    pub fn adopt_open(&mut self, key: String, opened_at: Millis) {
        if self.keys.contains_key(key.as_str()) {
            return;
        }
        self.keys.insert(
            key.into(),
            Entry {
                state: KeyState::adopt_open(opened_at),
                timer: None,
            },
        );
        self.open += 1;
    }

    /// The rule's state as of now, for a checkpoint: shares the live
    /// entries until they change (`CowMap::snapshot`), and is encoded off
    /// the pipeline thread.
    pub fn snapshot_state(&self) -> RuleSnapshot {
        RuleSnapshot {
            watermark: self.watermark,
            keys: self.keys.snapshot(),
        }
    }

    pub fn snapshot(&self) -> Result<Vec<u8>, postcard::Error> {
        self.snapshot_state().encode()
    }

    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), postcard::Error> {
        self.restore_snapshot(postcard::from_bytes(bytes)?);
        Ok(())
    }

    /// Replaces the state with a checkpoint's chunked part (what a
    /// [`RuleSnapshot`] wrote as a [`crate::checkpoint::Part`]).
    pub fn restore_chunked(
        &mut self,
        header: &[u8],
        segments: &crate::checkpoint::Segments,
    ) -> Result<(), postcard::Error> {
        let mut snapshot = Snapshot {
            watermark: postcard::from_bytes(header)?,
            keys: Vec::new(),
        };
        for chunk in segments.iter().flat_map(|(_, chunks)| chunks) {
            snapshot
                .keys
                .extend(postcard::from_bytes::<Vec<(String, KeyState)>>(chunk)?);
        }
        self.restore_snapshot(snapshot);
        Ok(())
    }

    fn restore_snapshot(&mut self, snapshot: Snapshot) {
        self.keys.clear();
        self.timers.clear();
        self.open = 0;
        self.watermark = snapshot.watermark;
        let timing = self.plan.timing;
        for (key, state) in snapshot.keys {
            let timer = state.due(&timing);
            let key: Arc<str> = key.into();
            if let Some(due) = timer {
                self.timers.push(Reverse((due, key.clone())));
            }
            if state.is_open() {
                self.open += 1;
            }
            self.keys.insert(key, Entry { state, timer });
        }
    }
}

/// A boolean expression over the input rows; `None` when there is none.
fn evaluate(
    expr: Option<&Arc<dyn PhysicalExpr>>,
    input: &EventBatch,
) -> Result<Option<BooleanArray>, DataFusionError> {
    let Some(expr) = expr else {
        return Ok(None);
    };
    let value = expr.evaluate(&input.data)?.into_array(input.num_rows())?;
    match value.data_type() {
        DataType::Boolean => Ok(Some(value.as_boolean().clone())),
        other => Err(DataFusionError::Plan(format!(
            "an alert condition must be true or false, not {other}"
        ))),
    }
}

/// The key of row `i` as text (strings as they are, other types as JSON).
fn key_text(column: &dyn Array, i: usize) -> Option<Cow<'_, str>> {
    if column.is_null(i) {
        return None;
    }
    Some(match column.data_type() {
        DataType::Utf8 => Cow::Borrowed(column.as_string::<i32>().value(i)),
        DataType::Utf8View => Cow::Borrowed(column.as_string_view().value(i)),
        _ => Cow::Owned(match crate::sink::cell_to_json(column, i) {
            Value::String(s) => s,
            other => other.to_string(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Millis = 86_400_000;

    fn rule(options: &str, condition: &str) -> RuleOperator {
        let sql = format!(
            "CREATE TABLE telemetry (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, battery_pct DOUBLE,
               WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
             WITH (connector = 'mqtt', topic = 'terminals/{{terminal_id}}/telemetry', format = 'json');
             CREATE ALERT r WITH ({options}) AS SELECT terminal_id, battery_pct FROM telemetry {condition};"
        );
        let pipeline = crate::plan::plan_sources(&[("t.sql".into(), sql)]).expect("plans");
        let plan = pipeline.alerts[0].clone();
        let mut op = RuleOperator::new(plan.clone());
        op.set_key_ttl(plan.key_ttl);
        op
    }

    fn batch(rows: &[(&str, Millis, f64)]) -> EventBatch {
        let rows: Vec<(&str, Millis, Option<f64>)> =
            rows.iter().map(|&(t, ts, b)| (t, ts, Some(b))).collect();
        crate::window::operator::test_support::batch(&rows, 1)
    }

    #[test]
    fn idle_keys_are_forgotten_after_key_ttl_and_busy_ones_stay() {
        let mut op = rule(
            "severity = 'warning', key_ttl = '7 days'",
            "WHERE battery_pct < 15",
        );
        op.process(&batch(&[("gone", 0, 50.0), ("busy", 0, 50.0)]))
            .expect("rows");
        assert_eq!(op.keys(), 2);
        op.advance_watermark(6 * DAY);
        op.process(&batch(&[("busy", 6 * DAY, 50.0)]))
            .expect("rows");
        let changes = op.advance_watermark(8 * DAY);
        assert!(changes.is_empty(), "nothing was open: {changes:?}");
        assert_eq!(op.keys(), 1, "the idle key went, the busy one stayed");
        assert_eq!(op.take_evicted(), 1);
        assert_eq!(op.take_evicted(), 0);
    }

    #[test]
    fn a_silent_key_open_past_key_ttl_is_resolved_and_forgotten() {
        let mut op = rule(
            "severity = 'critical', absent_for = '5 minutes', key_ttl = '1 day'",
            "",
        );
        op.process(&batch(&[("T1", 0, 50.0)])).expect("rows");
        let opened = op.advance_watermark(10 * 60_000);
        assert!(
            matches!(
                opened.as_slice(),
                [Change {
                    transition: Transition::Opened { .. },
                    ..
                }]
            ),
            "{opened:?}"
        );
        assert_eq!(op.open_alerts(), 1);
        // a day of silence later the key is forgotten and its alert resolved
        let changes = op.advance_watermark(2 * DAY);
        assert_eq!(op.open_alerts(), 0);
        assert_eq!(op.keys(), 0);
        match changes.as_slice() {
            [Change {
                key,
                transition: Transition::Resolved { row: None, .. },
                ..
            }] => assert_eq!(key, "T1"),
            other => panic!("expected one resolution without a row: {other:?}"),
        }
        // reporting again starts afresh
        op.process(&batch(&[("T1", 2 * DAY + 1, 50.0)]))
            .expect("rows");
        assert_eq!(op.keys(), 1);
    }

    /// A snapshot encoded after the rule ran on (keys changed, added,
    /// forgotten) still restores the state it was taken at: a restored rule
    /// then makes exactly the changes the live one made.
    #[test]
    fn a_snapshot_holds_the_state_it_was_taken_at() {
        let make = || {
            rule(
                "severity = 'warning', for = '1 minute', key_ttl = '1 day'",
                "WHERE battery_pct < 15",
            )
        };
        let mut op = make();
        op.process(&batch(&[("a", 0, 10.0), ("b", 0, 50.0), ("c", 0, 10.0)]))
            .expect("rows");
        let shared = op.snapshot_state();
        let after = |op: &mut RuleOperator| {
            let mut changes = op
                .process(&batch(&[
                    ("a", 30_000, 10.0),
                    ("c", 30_000, 50.0),
                    ("d", 30_000, 5.0),
                ]))
                .expect("rows");
            changes.extend(op.advance_watermark(2 * 60_000));
            changes.extend(op.advance_watermark(3 * DAY));
            changes
        };
        let live = after(&mut op);
        assert!(!live.is_empty());
        assert_eq!(op.keys(), 0, "every key was forgotten");
        let mut restored = make();
        restored
            .restore(&shared.encode().expect("encode"))
            .expect("restore");
        assert_eq!(restored.keys(), 3);
        let mut from_chunks = make();
        let (header, segments) = crate::checkpoint::round_trip(Box::new(shared));
        from_chunks
            .restore_chunked(&header, &segments)
            .expect("restore from chunks");
        assert_eq!(from_chunks.keys(), 3);
        assert_eq!(after(&mut restored), live);
        assert_eq!(after(&mut from_chunks), live);
    }

    #[test]
    fn without_key_ttl_nothing_is_forgotten() {
        let mut op = rule("severity = 'warning'", "WHERE battery_pct < 15");
        op.process(&batch(&[("a", 0, 50.0)])).expect("rows");
        op.advance_watermark(3650 * DAY);
        assert_eq!(op.keys(), 1);
    }
}
