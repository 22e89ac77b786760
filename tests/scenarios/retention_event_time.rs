//! Retention runs in event time (DESIGN §4): a view's rows expire against
//! its watermark minus its retention, never against the wall clock. Data
//! with event times years in the past (a backfill, a terminal with a wrong
//! clock) survives kill -9 and restarts; what is older than the retention
//! behind the watermark goes.

use crate::common;

use common::process::{Spawn, WeirProcess};
use common::*;
use rumqttc::QoS;

const PIPELINE: &str = "
CREATE TABLE telemetry (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json', idle_timeout = '1h');

-- The default retention (30 days).
CREATE VIEW per_minute AS
SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

CREATE VIEW per_minute_short WITH (retention = '1 hour') AS
SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);
";

const MIN: i64 = 60_000;

async fn window_starts(weir: &WeirProcess, view: &str) -> Option<Vec<String>> {
    let rows = weir.rows(view).await?;
    let mut starts: Vec<String> = rows
        .iter()
        .filter_map(|r| r["window_start"].as_str().map(str::to_string))
        .collect();
    starts.sort();
    Some(starts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_event_times_survive_kill_9_and_retention_follows_the_watermark() {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let spec = Spawn::embedded(root.path(), port, PIPELINE)
        .env("WEIR_STORAGE__HOUSEKEEPING_INTERVAL", "200ms");
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;

    // 2023: three minutes of readings, and one a minute later to close them.
    let messages: Vec<(String, String)> = [0, MIN, 2 * MIN, 3 * MIN + 5_000]
        .iter()
        .map(|t| {
            (
                "terminals/T1/telemetry".to_string(),
                format!(r#"{{"ts": {}, "battery_pct": 50}}"#, T0 + t),
            )
        })
        .collect();
    publish(port, &messages, QoS::AtLeastOnce).await;
    let three = wait_for("three closed windows", || async {
        let starts = window_starts(&weir, "per_minute").await?;
        (starts.len() == 3).then_some(starts)
    })
    .await;

    // kill -9 twice, each time after retention has run on the restarted weir.
    let mut weir = weir;
    for _ in 0..2 {
        weir.kill9();
        weir = WeirProcess::spawn(&spec);
        weir.wait_ready().await;
        let runs = weir
            .metric("weir_housekeeping_runs_total")
            .await
            .unwrap_or(0.0);
        wait_for("retention to run after the restart", || async {
            (weir.metric("weir_housekeeping_runs_total").await? >= runs + 3.0).then_some(())
        })
        .await;
        assert_eq!(
            window_starts(&weir, "per_minute").await,
            Some(three.clone()),
            "three-year-old windows are kept: {}",
            weir.log()
        );
        assert_eq!(
            window_starts(&weir, "per_minute_short").await,
            Some(three.clone())
        );
    }

    // Two hours later in event time: the 1-hour view lets its old windows go
    // (22:13 to 22:16 are more than an hour behind the watermark, 00:14:04),
    // the 30-day one keeps them; both have the new 00:13 window.
    let later: Vec<(&str, String)> = [2 * 60 * MIN, 2 * 60 * MIN + MIN + 5_000]
        .iter()
        .map(|t| {
            (
                "terminals/T1/telemetry",
                format!(r#"{{"ts": {}, "battery_pct": 50}}"#, T0 + t),
            )
        })
        .collect();
    publish(port, &later, QoS::AtLeastOnce).await;
    wait_for("the old windows of the 1-hour view to expire", || async {
        let short = window_starts(&weir, "per_minute_short").await?;
        (short.len() == 1).then_some(())
    })
    .await;
    let kept = window_starts(&weir, "per_minute").await.expect("rows");
    assert_eq!(kept.len(), 5, "{kept:?}");
    let short = window_starts(&weir, "per_minute_short")
        .await
        .expect("rows");
    assert!(
        short.iter().all(|s| s.as_str() >= "2023-11-15T00:00:00"),
        "only the windows within an hour of the watermark: {short:?}"
    );
}
