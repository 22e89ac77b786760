//! Only what changed is recomputed: after a restart with a new view and a
//! changed one, both are rebuilt from the ingest log's history, while the
//! unchanged views keep their rows and their state.

use crate::common;

use common::*;

/// TELEMETRY with `latest` changed (a column added) and a new view.
fn changed_pipeline() -> String {
    TELEMETRY.replace(
        "SELECT terminal_id, last_value(battery_pct) AS battery_pct, count(*) AS reports",
        "SELECT terminal_id, last_value(battery_pct) AS battery_pct, count(*) AS reports, max(battery_pct) AS max_battery",
    ) + "
-- New: readings per terminal.
CREATE VIEW readings AS
SELECT terminal_id, count(*) AS n, min(battery_pct) AS lowest FROM telemetry GROUP BY terminal_id;
"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_and_changed_views_are_rebuilt_from_the_log() {
    assert_ne!(changed_pipeline(), TELEMETRY, "the replace found its text");
    let weir = Weir::start(&[("telemetry.sql", TELEMETRY)]).await;
    weir.publish(&[
        ("terminals/A/telemetry", event(T0 + 1_000, 80.0, Some(10.0))),
        ("terminals/A/telemetry", event(T0 + 2_000, 15.0, Some(30.0))),
        ("terminals/B/telemetry", event(T0 + 3_000, 60.0, None)),
        // closes the first minute: one health row each for A and B
        ("terminals/B/telemetry", event(T0 + 70_000, 55.0, None)),
    ])
    .await;
    weir.wait_rows("health_1m", 2).await;
    wait_for("latest to count 4 reports", || async {
        (column_sum(&weir.rows("latest").await, "reports") == 4).then_some(())
    })
    .await;
    let health_before = weir.rows("health_1m").await;
    let dir = weir.stop().await;

    std::fs::write(
        dir.path().join("pipelines/telemetry.sql"),
        changed_pipeline(),
    )
    .expect("change the pipeline");
    let weir = Weir::start_in(dir, None).await;

    // The new view holds the history.
    let readings = weir.wait_rows("readings", 2).await;
    assert_eq!(row_with(&readings, "terminal_id", "A")["n"], 2);
    assert_eq!(row_with(&readings, "terminal_id", "A")["lowest"], 15.0);
    assert_eq!(row_with(&readings, "terminal_id", "B")["n"], 2);
    // The changed view was rebuilt, with its new column.
    let latest = weir.wait_rows("latest", 2).await;
    assert_eq!(row_with(&latest, "terminal_id", "A")["reports"], 2);
    assert_eq!(row_with(&latest, "terminal_id", "A")["max_battery"], 80.0);
    assert_eq!(row_with(&latest, "terminal_id", "B")["battery_pct"], 55.0);
    // The unchanged windowed view kept its rows, not doubled.
    assert_eq!(weir.rows("health_1m").await, health_before);

    // And everything carries on from there.
    weir.publish(&[("terminals/A/telemetry", event(T0 + 71_000, 5.0, None))])
        .await;
    let readings = wait_for("the new view to count new data", || async {
        let rows = weir.rows("readings").await;
        (row_with(&rows, "terminal_id", "A")["n"] == 3).then_some(rows)
    })
    .await;
    assert_eq!(row_with(&readings, "terminal_id", "A")["lowest"], 5.0);
    let latest = weir.rows("latest").await;
    assert_eq!(row_with(&latest, "terminal_id", "A")["reports"], 3);
    weir.stop().await;
}
