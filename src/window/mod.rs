//! Event time: window assignment, watermarks and the view operators that
//! aggregate over them.
//!
//! Everything here is pure: no tokio, no I/O, no clock reads. Times are epoch
//! milliseconds passed in by the caller (`engine`), so every rule — when a
//! window closes, when an event is late, when an idle stream's watermark moves —
//! is tested without a runtime.

pub mod agg;
pub mod cow;
pub mod operator;

use serde::{Deserialize, Serialize};

/// Epoch milliseconds.
pub type Millis = i64;

/// The window function of a windowed view (Arroyo's dialect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WindowSpec {
    /// `tumble(size)`: fixed, non-overlapping windows `[k*size, (k+1)*size)`.
    Tumble { size_ms: Millis },
    /// `hop(slide, size)`: windows of `size` starting every `slide`.
    Hop { slide_ms: Millis, size_ms: Millis },
    /// `session(gap)`: per key, events closer than `gap` share a window
    /// `[first event, last event + gap)`.
    Session { gap_ms: Millis },
}

impl WindowSpec {
    /// Starts of the fixed windows (tumble, hop) that contain `t`, earliest first.
    /// Empty for sessions, whose windows depend on other events.
    pub fn window_starts(&self, t: Millis) -> impl Iterator<Item = Millis> {
        let (slide, size) = match *self {
            WindowSpec::Tumble { size_ms } => (size_ms, size_ms),
            WindowSpec::Hop { slide_ms, size_ms } => (slide_ms, size_ms),
            WindowSpec::Session { .. } => (1, 0),
        };
        let last_start = t - t.rem_euclid(slide);
        // number of windows of `size` every `slide` that contain t
        let count = if size == 0 {
            0
        } else {
            (size + slide - 1) / slide
        };
        let first_start = last_start - (count - 1).max(0) * slide;
        (0..count)
            .map(move |i| first_start + i * slide)
            .filter(move |start| start + size > t)
    }

    /// Length of a fixed window; for sessions, the gap.
    pub fn size_ms(&self) -> Millis {
        match *self {
            WindowSpec::Tumble { size_ms } | WindowSpec::Hop { size_ms, .. } => size_ms,
            WindowSpec::Session { gap_ms } => gap_ms,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            WindowSpec::Tumble { .. } => "tumble",
            WindowSpec::Hop { .. } => "hop",
            WindowSpec::Session { .. } => "session",
        }
    }
}

/// A window closes once the watermark reaches its end.
pub fn is_closed(window_end: Millis, watermark: Option<Millis>) -> bool {
    watermark.is_some_and(|w| w >= window_end)
}

/// A stream's watermark: the largest event time seen minus the stream's bound,
/// moved forward by the wall clock while the stream is idle (DESIGN §4).
///
/// Idle advancement: once nothing has arrived for `idle_timeout`, the
/// watermark becomes `max_event_time - bound + (now - last_arrival)`, i.e. it
/// moves on at wall-clock speed from where the data left it. It never jumps
/// to the wall clock itself, so replaying old data does not close every
/// window at once, and it never moves backwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    bound_ms: Millis,
    idle_timeout_ms: Millis,
    max_event_time: Option<Millis>,
    last_arrival: Option<Millis>,
    current: Option<Millis>,
}

impl Watermark {
    pub fn new(bound_ms: Millis, idle_timeout_ms: Millis) -> Self {
        Self {
            bound_ms,
            idle_timeout_ms,
            max_event_time: None,
            last_arrival: None,
            current: None,
        }
    }

    /// The current watermark, `None` before the first event.
    pub fn current(&self) -> Option<Millis> {
        self.current
    }

    pub fn max_event_time(&self) -> Option<Millis> {
        self.max_event_time
    }

    /// Records a batch whose largest event time is `max_event_time`, arriving at wall time `now`.
    pub fn observe(&mut self, max_event_time: Millis, now: Millis) {
        self.max_event_time = Some(
            self.max_event_time
                .map_or(max_event_time, |m| m.max(max_event_time)),
        );
        self.last_arrival = Some(now);
        // Checked: event times are bounded at decode, but a watermark must
        // never wrap whatever it is given.
        self.raise(max_event_time.saturating_sub(self.bound_ms));
    }

    /// Advances an idle stream's watermark with the wall clock. Returns whether it moved.
    pub fn on_tick(&mut self, now: Millis) -> bool {
        let (Some(max_event_time), Some(last_arrival)) = (self.max_event_time, self.last_arrival)
        else {
            return false;
        };
        let idle_for = now.saturating_sub(last_arrival);
        if idle_for < self.idle_timeout_ms {
            return false;
        }
        self.raise(
            max_event_time
                .saturating_sub(self.bound_ms)
                .saturating_add(idle_for),
        )
    }

    /// Takes the progress (not the settings) of a checkpointed watermark.
    pub fn restore(&mut self, saved: &Watermark) {
        self.max_event_time = saved.max_event_time;
        self.last_arrival = saved.last_arrival;
        self.current = saved.current;
    }

    /// Restarts the idle clock at `now`: after a restart, a stream is idle
    /// only once it has received nothing for `idle_timeout` since weir came
    /// back, not since the last event before it went down.
    pub fn resume(&mut self, now: Millis) {
        if self.last_arrival.is_some() {
            self.last_arrival = Some(now);
        }
    }

    /// Sets the watermark from upstream (a view's watermark follows its input's).
    pub fn raise(&mut self, candidate: Millis) -> bool {
        if self.current.is_none_or(|c| candidate > c) {
            self.current = Some(candidate);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Millis = 60_000;

    fn starts(spec: WindowSpec, t: Millis) -> Vec<Millis> {
        spec.window_starts(t).collect()
    }

    #[test]
    fn tumble_assigns_one_window() {
        let spec = WindowSpec::Tumble { size_ms: MIN };
        assert_eq!(starts(spec, 0), vec![0]);
        assert_eq!(starts(spec, MIN - 1), vec![0]);
        assert_eq!(starts(spec, MIN), vec![MIN]);
        assert_eq!(starts(spec, 90_000), vec![MIN]);
        // before the epoch, still aligned
        assert_eq!(starts(spec, -1), vec![-MIN]);
    }

    #[test]
    fn hop_assigns_overlapping_windows() {
        let spec = WindowSpec::Hop {
            slide_ms: MIN,
            size_ms: 5 * MIN,
        };
        assert_eq!(
            starts(spec, 7 * MIN + 10),
            vec![3 * MIN, 4 * MIN, 5 * MIN, 6 * MIN, 7 * MIN]
        );
        assert_eq!(
            starts(spec, 5 * MIN),
            vec![MIN, 2 * MIN, 3 * MIN, 4 * MIN, 5 * MIN]
        );
        // slide that does not divide the size
        let spec = WindowSpec::Hop {
            slide_ms: 2 * MIN,
            size_ms: 5 * MIN,
        };
        assert_eq!(starts(spec, 5 * MIN), vec![2 * MIN, 4 * MIN]);
        assert_eq!(starts(spec, 4 * MIN), vec![0, 2 * MIN, 4 * MIN]);
        // every window returned contains t
        for t in [0, 1, MIN - 1, 3 * MIN + 7, 11 * MIN] {
            for s in spec.window_starts(t) {
                assert!(s <= t && t < s + 5 * MIN);
            }
        }
    }

    #[test]
    fn sessions_have_no_fixed_windows() {
        assert!(starts(WindowSpec::Session { gap_ms: MIN }, 5).is_empty());
    }

    #[test]
    fn window_closes_when_watermark_reaches_end() {
        assert!(!is_closed(MIN, None));
        assert!(!is_closed(MIN, Some(MIN - 1)));
        assert!(is_closed(MIN, Some(MIN)));
    }

    #[test]
    fn watermark_is_max_event_time_minus_bound_and_never_regresses() {
        let mut w = Watermark::new(5_000, 5_000);
        assert_eq!(w.current(), None);
        w.observe(100_000, 1);
        assert_eq!(w.current(), Some(95_000));
        w.observe(90_000, 2); // out of order: no regression
        assert_eq!(w.current(), Some(95_000));
        w.observe(101_000, 3);
        assert_eq!(w.current(), Some(96_000));
    }

    #[test]
    fn idle_stream_advances_with_injected_clock() {
        let mut w = Watermark::new(5_000, 5_000);
        assert!(!w.on_tick(10_000), "no data yet: nothing to advance");
        w.observe(100_000, 1_000_000);
        assert!(!w.on_tick(1_004_999), "not idle yet");
        assert_eq!(w.current(), Some(95_000));
        assert!(w.on_tick(1_005_000));
        assert_eq!(w.current(), Some(100_000));
        assert!(w.on_tick(1_065_000));
        assert_eq!(w.current(), Some(160_000));
        // new data resets idleness; the watermark keeps its advanced value
        w.observe(101_000, 1_066_000);
        assert_eq!(w.current(), Some(160_000));
        assert!(!w.on_tick(1_067_000));
    }
}
