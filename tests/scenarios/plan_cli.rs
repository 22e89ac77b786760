//! `weir plan` says what a start will do, and the start does exactly that:
//! one view's SQL is edited; plan names it as changed, the view and alert
//! that read it as downstream, and nothing else; the restart rebuilds those
//! from the log and leaves the rest as they were.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

/// TELEMETRY, plus a view over the `low_battery` view and an alert on it.
fn pipeline(threshold: u32) -> String {
    TELEMETRY.replace(
        "WHERE battery_pct < 20",
        &format!("WHERE battery_pct < {threshold}"),
    ) + "
-- Low readings per terminal per minute, read from the low_battery view.
CREATE VIEW low_per_minute AS
SELECT terminal_id, count(*) AS readings FROM low_battery
GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

CREATE ALERT very_low WITH (severity = 'warning')
AS SELECT terminal_id, battery_pct FROM low_battery WHERE battery_pct < 5;
"
}

/// `weir plan --json` on the test's folder, as a user runs it.
fn plan(dir: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["plan", "--json"])
        .current_dir(dir)
        .env("WEIR_STORAGE__DIR", dir.join("data"))
        .env("WEIR_PIPELINES__DIR", dir.join("pipelines"))
        .output()
        .expect("run weir plan");
    assert!(
        out.status.success(),
        "weir plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("weir plan --json prints JSON")
}

/// Names with this change, sorted.
fn with(plan: &Value, change: &str) -> Vec<String> {
    let mut names: Vec<String> = plan["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|i| i["change"] == change)
        .map(|i| i["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_names_the_edit_and_its_downstream_and_the_restart_does_that() {
    assert_ne!(pipeline(20), pipeline(50), "the threshold is in the text");
    let weir = Weir::start(&[("telemetry.sql", &pipeline(20))]).await;
    weir.publish(&[
        ("terminals/A/telemetry", event(T0 + 1_000, 80.0, None)),
        ("terminals/A/telemetry", event(T0 + 2_000, 30.0, None)),
        ("terminals/A/telemetry", event(T0 + 3_000, 10.0, None)),
        ("terminals/B/telemetry", event(T0 + 4_000, 45.0, None)),
        // closes the first minute
        ("terminals/B/telemetry", event(T0 + 70_000, 90.0, None)),
    ])
    .await;
    weir.wait_rows("health_1m", 2).await;
    weir.wait_rows("low_per_minute", 1).await;
    assert_eq!(
        weir.rows("low_battery").await.len(),
        1,
        "only A's 10 % is under 20"
    );

    // While weir runs, plan compares with what it runs: nothing to do.
    let running = plan(weir.dir.path());
    assert!(with(&running, "kept").len() == 5, "{running}");

    let health_before = weir.rows("health_1m").await;
    let latest_before = weir.rows("latest").await;
    let dir = weir.stop().await;
    let unchanged = plan(dir.path());
    assert_eq!(with(&unchanged, "kept").len(), 5, "{unchanged}");

    std::fs::write(dir.path().join("pipelines/telemetry.sql"), pipeline(50))
        .expect("edit the pipeline");
    let p = plan(dir.path());
    assert_eq!(with(&p, "changed"), vec!["low_battery"], "{p}");
    assert_eq!(
        with(&p, "downstream"),
        vec!["low_per_minute", "very_low"],
        "{p}"
    );
    assert_eq!(with(&p, "kept"), vec!["health_1m", "latest"], "{p}");
    assert!(
        with(&p, "new").is_empty() && with(&p, "removed").is_empty(),
        "{p}"
    );

    // The restart does what plan said.
    let weir = Weir::start_in(dir, None).await;
    let low = wait_for(
        "low_battery to be rebuilt with the new threshold",
        || async {
            let rows = weir.rows("low_battery").await;
            (rows.len() == 3).then_some(rows)
        },
    )
    .await;
    let mut readings: Vec<f64> = low
        .iter()
        .filter_map(|r| r["battery_pct"].as_f64())
        .collect();
    readings.sort_by(f64::total_cmp);
    assert_eq!(readings, vec![10.0, 30.0, 45.0]);
    let per_minute = wait_for("low_per_minute to be rebuilt from low_battery", || async {
        let rows = weir.rows("low_per_minute").await;
        (column_sum(&rows, "readings") == 3).then_some(rows)
    })
    .await;
    assert_eq!(row_with(&per_minute, "terminal_id", "A")["readings"], 2);
    assert_eq!(row_with(&per_minute, "terminal_id", "B")["readings"], 1);
    // kept: the same rows, not recomputed into doubles
    assert_eq!(weir.rows("health_1m").await, health_before);
    assert_eq!(weir.rows("latest").await, latest_before);
    let dir = weir.stop().await;

    let after = plan(dir.path());
    assert_eq!(with(&after, "kept").len(), 5, "{after}");
}
