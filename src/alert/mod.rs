//! The alert lifecycle (DESIGN §5), pure: no I/O, no clock.
//!
//! One [`KeyState`] per (rule, key). Rows arrive already judged by the rule's
//! SQL — each either *fires* (the `WHERE` holds), *clears* (the `clear`
//! expression holds, or, without one, the `WHERE` does not) or is in
//! *neither* (between the two: hysteresis). Time is event time throughout:
//! the rows' own, and the stream's watermark for `for` and `absent_for`.
//!
//! - An alert opens when a firing row arrives (`for = 0`), or once the
//!   watermark has passed `for` after the first of an unbroken run of firing
//!   rows; any row that does not fire breaks the run.
//! - It resolves on a clearing row; rows in neither keep it as it is.
//! - `absent_for`: a key that was seen opens an alert once the watermark is
//!   `absent_for` past its last row, and resolves when it reports again.
//! - A row older than the key's last transition changes nothing, so disorder
//!   within the watermark bound cannot make an alert flap.
//! - `reopen_after` (the flapping guard): a resolved alert does not open
//!   again until that long after it resolved; if the condition still holds
//!   then, it opens then.
//!
//! [`rule::RuleOperator`] runs one rule over Arrow batches and keeps a
//! `KeyState` per key; [`record`] turns its transitions into the alerts that
//! are stored, served and notified. Like `window`, nothing here does I/O:
//! the pipeline (`engine`) stores alerts through `sink` and `store`.

pub mod record;
pub mod rule;

pub use record::{Alert, AlertEvent, AlertId, AlertState, ChangeKind};
pub use rule::{Change, RuleOperator};

use serde::{Deserialize, Serialize};

use crate::window::Millis;

/// How urgent a rule's alerts are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl std::str::FromStr for Severity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "critical" => Ok(Severity::Critical),
            other => Err(format!(
                "severity: {other:?} is not one of info, warning, critical"
            )),
        }
    }
}

/// A rule's timing options, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// How long the condition must hold before the alert opens.
    pub for_ms: Millis,
    /// Open when a seen key has produced no row for this long.
    pub absent_for_ms: Option<Millis>,
    /// After resolving, do not open again for this long.
    pub reopen_after_ms: Option<Millis>,
}

/// How a rule judged one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fires,
    Clears,
    /// Between firing and clearing: nothing changes.
    Neither,
}

/// A change of an alert, with the event time it happened at and the row
/// (as JSON text) that caused it, when a row did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Opened { at: Millis, row: Option<String> },
    Resolved { at: Millis, row: Option<String> },
}

/// The lifecycle of one (rule, key); part of the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// Event time of the open alert, if one is open.
    pub opened_at: Option<Millis>,
    /// Event time of the last transition.
    pub last_transition: Option<Millis>,
    /// Start of the current unbroken run of firing rows, and its first row.
    pending: Option<(Millis, String)>,
    /// Latest event time and row seen for this key (for `absent_for`).
    last_seen: Option<(Millis, String)>,
    /// Event time of the newest row that did not fire: a firing row older
    /// than it (disorder) cannot start a `for` run.
    last_break: Option<Millis>,
}

impl KeyState {
    pub fn is_open(&self) -> bool {
        self.opened_at.is_some()
    }

    /// Event time of the newest thing that happened to this key.
    pub fn last_activity(&self) -> Option<Millis> {
        [
            self.last_seen.as_ref().map(|(t, _)| *t),
            self.last_transition,
            self.pending.as_ref().map(|(t, _)| *t),
            self.last_break,
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// Applies one judged row at event time `t`. `row` renders the row (as
    /// JSON text); it is called only when the row is kept.
    pub fn observe(
        &mut self,
        timing: &Timing,
        t: Millis,
        verdict: Verdict,
        row: impl FnOnce() -> String,
    ) -> Option<Transition> {
        if timing.absent_for_ms.is_some() {
            // Presence rules: any row is the key reporting.
            if self.last_seen.as_ref().is_some_and(|(seen, _)| t < *seen) {
                return None;
            }
            let row = row();
            // (every row of a presence rule lands here: copy it only to resolve)
            if self.last_transition.is_some_and(|last| t < last) || self.opened_at.is_none() {
                self.last_seen = Some((t, row));
                return None;
            }
            self.last_seen = Some((t, row.clone()));
            return Some(self.resolve(t, row));
        }
        if self.last_transition.is_some_and(|last| t < last) {
            return None; // older than what already happened to this key
        }
        match verdict {
            Verdict::Fires => {
                if self.is_open() || self.last_break.is_some_and(|b| t < b) {
                    return None;
                }
                match &mut self.pending {
                    Some((since, first)) if t < *since => {
                        // an older row of the same run: it started earlier
                        *since = t;
                        *first = row();
                    }
                    Some(_) => {}
                    None => self.pending = Some((t, row())),
                }
                let (since, first) = self.pending.clone()?;
                let due = (since + timing.for_ms).max(self.guard_end(timing));
                (t >= due).then(|| self.open(t, first))
            }
            Verdict::Clears | Verdict::Neither => {
                self.last_break = Some(self.last_break.map_or(t, |b| b.max(t)));
                // a row from before the run began does not break it
                if self.pending.as_ref().is_none_or(|(since, _)| t >= *since) {
                    self.pending = None;
                }
                (verdict == Verdict::Clears && self.opened_at.is_some())
                    .then(|| self.resolve(t, row()))
            }
        }
    }

    /// When the watermark reaching this time would open an alert (a `for`
    /// run, a silence, or the end of a flapping guard), if it would.
    pub fn due(&self, timing: &Timing) -> Option<Millis> {
        if self.is_open() {
            return None;
        }
        let guard_end = self.guard_end(timing);
        if let Some(absent) = timing.absent_for_ms {
            let (seen, _) = self.last_seen.as_ref()?;
            if self.last_transition.is_some_and(|l| *seen < l) {
                return None; // this silence already had its alert
            }
            return Some((seen + absent).max(guard_end));
        }
        let (since, _) = self.pending.as_ref()?;
        Some((since + timing.for_ms).max(guard_end))
    }

    /// The watermark moved: a `for` run may have lasted long enough, or a
    /// key may have gone silent.
    pub fn on_watermark(&mut self, timing: &Timing, watermark: Millis) -> Option<Transition> {
        let due = self.due(timing)?;
        if watermark < due {
            return None;
        }
        let row = if timing.absent_for_ms.is_some() {
            self.last_seen.as_ref().map(|(_, r)| r.clone())
        } else {
            self.pending.as_ref().map(|(_, r)| r.clone())
        }?;
        Some(self.open(due, row))
    }

    /// The flapping guard: the earliest time the alert may open again.
    fn guard_end(&self, timing: &Timing) -> Millis {
        match (timing.reopen_after_ms, self.last_transition) {
            (Some(guard), Some(last)) if self.opened_at.is_none() => last + guard,
            _ => Millis::MIN,
        }
    }

    fn open(&mut self, at: Millis, row: String) -> Transition {
        self.pending = None;
        self.opened_at = Some(at);
        self.last_transition = Some(at);
        Transition::Opened { at, row: Some(row) }
    }

    fn resolve(&mut self, at: Millis, row: String) -> Transition {
        self.opened_at = None;
        self.pending = None;
        self.last_transition = Some(at);
        Transition::Resolved { at, row: Some(row) }
    }

    /// State for an alert found open in the store when the rule's own state
    /// was lost (its definition changed): it stays open until it clears.
    pub fn adopt_open(opened_at: Millis) -> Self {
        Self {
            opened_at: Some(opened_at),
            last_transition: Some(opened_at),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Millis = 1_000;
    const MIN: Millis = 60 * S;

    fn opened(at: Millis, row: &str) -> Option<Transition> {
        Some(Transition::Opened {
            at,
            row: Some(row.into()),
        })
    }

    fn resolved(at: Millis, row: &str) -> Option<Transition> {
        Some(Transition::Resolved {
            at,
            row: Some(row.into()),
        })
    }

    #[test]
    fn a_threshold_opens_once_and_the_first_non_matching_row_resolves() {
        let t = Timing::default();
        let mut k = KeyState::default();
        assert_eq!(
            k.observe(&t, 10 * S, Verdict::Fires, || "b=12".into()),
            opened(10 * S, "b=12")
        );
        // keeps matching: still the same open alert
        assert_eq!(
            k.observe(&t, 20 * S, Verdict::Fires, || "b=11".into()),
            None
        );
        assert!(k.is_open());
        assert_eq!(
            k.observe(&t, 30 * S, Verdict::Clears, || "b=40".into()),
            resolved(30 * S, "b=40")
        );
        assert!(!k.is_open());
    }

    #[test]
    fn hysteresis_rows_between_fire_and_clear_change_nothing() {
        let t = Timing::default();
        let mut k = KeyState::default();
        k.observe(&t, 10 * S, Verdict::Fires, || "b=14".into());
        // 15 <= b < 20: no longer firing, not yet clear
        assert_eq!(
            k.observe(&t, 20 * S, Verdict::Neither, || "b=17".into()),
            None
        );
        assert!(k.is_open());
        assert_eq!(
            k.observe(&t, 30 * S, Verdict::Clears, || "b=21".into()),
            resolved(30 * S, "b=21")
        );
    }

    #[test]
    fn disorder_within_the_bound_does_not_flip_an_alert() {
        let t = Timing::default();
        let mut k = KeyState::default();
        k.observe(&t, 10 * S, Verdict::Fires, || "b=10".into());
        k.observe(&t, 30 * S, Verdict::Clears, || "b=50".into());
        // a firing row from before the resolve arrives late
        assert_eq!(k.observe(&t, 25 * S, Verdict::Fires, || "b=9".into()), None);
        assert!(!k.is_open());
        assert_eq!(k.last_transition, Some(30 * S));
    }

    #[test]
    fn for_needs_an_unbroken_run_measured_against_the_watermark() {
        let t = Timing {
            for_ms: MIN,
            ..Timing::default()
        };
        let mut k = KeyState::default();
        assert_eq!(k.observe(&t, 0, Verdict::Fires, || "first".into()), None);
        assert_eq!(k.on_watermark(&t, 59 * S), None);
        // a non-firing row breaks the run; the next run starts over
        assert_eq!(
            k.observe(&t, 50 * S, Verdict::Neither, || "ok".into()),
            None
        );
        assert_eq!(k.on_watermark(&t, 70 * S), None);
        assert_eq!(
            k.observe(&t, 80 * S, Verdict::Fires, || "again".into()),
            None
        );
        assert_eq!(k.on_watermark(&t, 139 * S), None);
        assert_eq!(k.on_watermark(&t, 140 * S), opened(140 * S, "again"));
    }

    #[test]
    fn disorder_does_not_stitch_a_for_run_across_a_break() {
        let t = Timing {
            for_ms: MIN,
            ..Timing::default()
        };
        let mut k = KeyState::default();
        k.observe(&t, 10 * S, Verdict::Fires, || "low".into());
        k.observe(&t, 20 * S, Verdict::Clears, || "fine".into());
        // older than the good reading: cannot start a run
        assert_eq!(
            k.observe(&t, 15 * S, Verdict::Fires, || "late low".into()),
            None
        );
        assert_eq!(k.on_watermark(&t, 75 * S), None, "no run from 15 s");
        // a run from 40 s, and a good reading from before it arriving late
        k.observe(&t, 40 * S, Verdict::Fires, || "low again".into());
        k.observe(&t, 35 * S, Verdict::Clears, || "old fine".into());
        assert_eq!(k.on_watermark(&t, 100 * S), opened(100 * S, "low again"));
    }

    #[test]
    fn for_also_opens_on_a_row_that_completes_the_run() {
        let t = Timing {
            for_ms: MIN,
            ..Timing::default()
        };
        let mut k = KeyState::default();
        k.observe(&t, 0, Verdict::Fires, || "first".into());
        assert_eq!(
            k.observe(&t, 61 * S, Verdict::Fires, || "later".into()),
            opened(61 * S, "first")
        );
    }

    #[test]
    fn absent_for_opens_after_silence_and_resolves_when_the_key_reports() {
        let t = Timing {
            absent_for_ms: Some(5 * MIN),
            ..Timing::default()
        };
        let mut k = KeyState::default();
        // never seen: never absent
        assert_eq!(k.on_watermark(&t, 60 * MIN), None);
        k.observe(&t, 0, Verdict::Fires, || "hello".into());
        assert_eq!(k.on_watermark(&t, 5 * MIN - 1), None);
        assert_eq!(k.on_watermark(&t, 6 * MIN), opened(5 * MIN, "hello"));
        assert_eq!(k.on_watermark(&t, 9 * MIN), None, "one alert per silence");
        assert_eq!(
            k.observe(&t, 9 * MIN, Verdict::Fires, || "back".into()),
            resolved(9 * MIN, "back")
        );
        // silent again: a new alert, measured from the new last row
        assert_eq!(k.on_watermark(&t, 14 * MIN), opened(14 * MIN, "back"));
    }

    #[test]
    fn reopen_after_keeps_a_flapping_key_from_reopening_at_once() {
        let t = Timing {
            reopen_after_ms: Some(MIN),
            ..Timing::default()
        };
        let mut k = KeyState::default();
        k.observe(&t, 0, Verdict::Fires, || "low".into());
        k.observe(&t, 10 * S, Verdict::Clears, || "ok".into());
        assert_eq!(
            k.observe(&t, 20 * S, Verdict::Fires, || "low again".into()),
            None
        );
        assert_eq!(k.on_watermark(&t, 69 * S), None);
        assert!(!k.is_open());
        // still low when the guard runs out: it opens then
        assert_eq!(k.on_watermark(&t, 70 * S), opened(70 * S, "low again"));
    }

    #[test]
    fn state_survives_a_checkpoint_round_trip() {
        let t = Timing {
            for_ms: MIN,
            ..Timing::default()
        };
        let mut k = KeyState::default();
        k.observe(&t, 0, Verdict::Fires, || "first".into());
        let mut back: KeyState = postcard::from_bytes(&postcard::to_stdvec(&k).unwrap()).unwrap();
        assert_eq!(back, k);
        assert_eq!(back.on_watermark(&t, MIN), opened(MIN, "first"));
    }
}
