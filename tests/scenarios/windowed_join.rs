//! A windowed join of two windowed views of the same window (Arroyo's
//! windowed join, DESIGN §3): written when both sides' windows close, equal
//! to an independent computation of the same numbers, LEFT keeping windows
//! the other side has no row for, inner dropping them.

use crate::common;

use std::collections::BTreeMap;

use common::{event, Weir, T0};

const PIPELINE: &str = r#"
CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json');

CREATE VIEW low_1m AS
SELECT terminal_id, count(*) AS low_readings
FROM telemetry WHERE battery_pct < 20
GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

CREATE VIEW all_1m AS
SELECT terminal_id, count(*) AS readings
FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

CREATE VIEW low_share_1m AS
SELECT a.terminal_id, a.window_start, a.readings, l.low_readings
FROM all_1m a LEFT JOIN low_1m l
  ON a.terminal_id = l.terminal_id AND a.window_start = l.window_start;

CREATE VIEW low_only_1m AS
SELECT a.terminal_id, a.window_start, a.readings, l.low_readings
FROM all_1m a JOIN low_1m l
  ON l.window_start = a.window_start AND l.terminal_id = a.terminal_id;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_join_meets_both_sides_of_each_window() {
    let weir = Weir::start(&[("p.sql", PIPELINE)]).await;
    // 3 terminals, 4 minutes, a reading every 7 s; batteries dip below 20 for some
    let mut messages = Vec::new();
    // (terminal, minute) -> (readings, low readings): the independent count
    let mut want: BTreeMap<(String, i64), (u64, u64)> = BTreeMap::new();
    for i in 0..(4 * 60 / 7) {
        for t in 0..3 {
            let ts = T0 + i * 7_000 + t * 100;
            // t2 never runs low: its windows have no row in low_1m
            let battery = if t == 2 {
                55.0
            } else {
                ((i * 13 + t * 29) % 60) as f64
            };
            let terminal = format!("t{t}");
            let minute = (ts - T0) / 60_000;
            let slot = want.entry((terminal.clone(), minute)).or_default();
            slot.0 += 1;
            slot.1 += u64::from(battery < 20.0);
            messages.push((
                format!("terminals/{terminal}/telemetry"),
                event(ts, battery, None),
            ));
        }
    }
    // one event far ahead closes every window
    messages.push((
        "terminals/t9/telemetry".into(),
        event(T0 + 3_600_000, 50.0, None),
    ));
    weir.publish(&messages).await;

    let rows = |rows: Vec<serde_json::Value>| -> BTreeMap<(String, i64), (u64, Option<u64>)> {
        rows.iter()
            .filter(|r| r["terminal_id"] != "t9")
            .map(|r| {
                let start = chrono::DateTime::parse_from_rfc3339(
                    r["window_start"].as_str().expect("start"),
                )
                .expect("rfc3339")
                .timestamp_millis();
                (
                    (
                        r["terminal_id"].as_str().expect("terminal").to_string(),
                        (start - T0) / 60_000,
                    ),
                    (
                        r["readings"].as_u64().expect("readings"),
                        r["low_readings"].as_u64(),
                    ),
                )
            })
            .collect()
    };
    let left = rows(weir.wait_rows("low_share_1m", want.len()).await);
    let expected: BTreeMap<_, _> = want
        .iter()
        .map(|(k, (n, low))| (k.clone(), (*n, (*low > 0).then_some(*low))))
        .collect();
    assert_eq!(left, expected);
    assert!(
        left.values().any(|(_, low)| low.is_none()),
        "every window had a low reading: the LEFT case is untested"
    );
    let inner_want: BTreeMap<_, _> = expected
        .into_iter()
        .filter(|(_, (_, low))| low.is_some())
        .collect();
    let inner = rows(weir.wait_rows("low_only_1m", inner_want.len()).await);
    assert_eq!(inner, inner_want);
    weir.stop().await;
}
