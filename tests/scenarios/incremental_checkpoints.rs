//! Checkpoints are incremental (issue 15): a checkpoint writes only the
//! chunks of state that changed since the one before and refers to the
//! rest, and weir restores from such a checkpoint — chunks of several
//! generations — to exactly the state it had.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::process::metric_value;
use common::*;
use weir::checkpoint::Checkpoint;
use weir::store::Store;

/// Enough terminals for several chunks (512 keys each) per view and rule.
const TERMINALS: usize = 1_500;

fn pipeline() -> String {
    format!(
        "{TELEMETRY}
CREATE ALERT low
WITH (severity = 'warning', clear = 'battery_pct >= 20')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 15;
"
    )
}

fn terminal(i: usize) -> String {
    format!("T{i:04}")
}

async fn counts(weir: &Weir) -> Vec<(String, u64)> {
    let mut rows: Vec<(String, u64)> = weir
        .rows("latest")
        .await
        .iter()
        .map(|r| {
            (
                r["terminal_id"].as_str().unwrap_or_default().to_string(),
                r["reports"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    rows.sort();
    rows
}

async fn metric(weir: &Weir, name: &str) -> f64 {
    metric_value(&weir.metrics().await, name).unwrap_or(0.0)
}

/// Waits until `n` more checkpoints than now were written.
async fn checkpoints_after(weir: &Weir, n: f64) {
    let now = metric(weir, "weir_checkpoints_total").await;
    wait_metric(weir, "weir_checkpoints_total", now + n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_writes_what_changed_and_restores_whole() {
    let sql = pipeline();
    let weir = Weir::start_tweaked(&[("telemetry.sql", &sql)], None, |c| {
        c.storage.checkpoint_interval = Duration::from_millis(200);
    })
    .await;
    // every terminal once; a third of them low
    let first: Vec<(String, String)> = (0..TERMINALS)
        .map(|i| {
            let battery = if i % 3 == 0 { 10.0 } else { 50.0 };
            (
                format!("terminals/{}/telemetry", terminal(i)),
                event(T0 + i as i64, battery, Some(5.0)),
            )
        })
        .collect();
    weir.publish(&first).await;
    wait_for("every terminal counted", || async {
        (counts(&weir).await.len() == TERMINALS).then_some(())
    })
    .await;
    checkpoints_after(&weir, 2.0).await;
    let reused_before = metric(&weir, "weir_checkpoint_chunks_reused_total").await;

    // one terminal reports again: one chunk of each view and of the rule
    weir.publish(&[(
        format!("terminals/{}/telemetry", terminal(700)),
        event(T0 + 2_000, 12.0, Some(5.0)),
    )])
    .await;
    wait_for("T0700's second report", || async {
        let rows = counts(&weir).await;
        rows.contains(&(terminal(700), 2)).then_some(rows)
    })
    .await;
    checkpoints_after(&weir, 2.0).await;
    let metrics = weir.metrics().await;
    let value = |name| metric_value(&metrics, name).unwrap_or(0.0);
    assert!(
        value("weir_checkpoint_chunks_reused_total") > reused_before,
        "unchanged chunks were written again: {metrics}"
    );
    assert!(
        value("weir_checkpoint_last_written_bytes") < value("weir_checkpoint_last_bytes") / 2.0,
        "a checkpoint after one event wrote most of the state: {metrics}"
    );
    let before = counts(&weir).await;
    let dir = weir.stop().await;

    // The newest checkpoint is made of chunks of more than one generation.
    {
        let store = Store::open(&dir.path().join("data")).expect("open store");
        let newest = (0..2u8)
            .filter_map(|slot| store.read_checkpoint_manifest(slot).expect("read"))
            .filter_map(|bytes| Checkpoint::decode_manifest(&bytes).ok())
            .max_by_key(|m| m.generation)
            .expect("a checkpoint");
        let generations: BTreeSet<u64> = newest
            .views
            .values()
            .flat_map(|p| p.segments.iter().flat_map(|s| s.chunks.iter().map(|c| c.0)))
            .collect();
        assert!(
            generations.len() > 1,
            "every chunk from one generation: {generations:?}"
        );
    }

    // The restart restores it without replaying anything, and counts on
    // from exactly where it was, for a terminal in a reused chunk and for
    // the one in the rewritten chunk; the rule still knows who is low.
    let weir = Weir::start_in(dir, None).await;
    let metrics = weir.metrics().await;
    assert_eq!(
        metric_value(&metrics, "weir_replayed_records_total"),
        Some(0.0),
        "the checkpoint covered the whole log: {metrics}"
    );
    assert_eq!(counts(&weir).await, before);
    weir.publish(&[
        (
            format!("terminals/{}/telemetry", terminal(1)),
            event(T0 + 3_000, 50.0, Some(5.0)),
        ),
        (
            format!("terminals/{}/telemetry", terminal(700)),
            event(T0 + 3_000, 50.0, Some(5.0)),
        ),
    ])
    .await;
    let after = wait_for("the two new reports", || async {
        let rows = counts(&weir).await;
        rows.contains(&(terminal(700), 3)).then_some(rows)
    })
    .await;
    assert!(after.contains(&(terminal(1), 2)), "{after:?}");
    assert_eq!(
        after.iter().map(|(_, n)| n).sum::<u64>(),
        TERMINALS as u64 + 3
    );
    // T0700 was low and is back at 50: its alert resolves, which only a
    // rule that remembered it can do
    let alerts = weir.get_ok("/api/v1/alerts?rule=low&limit=1000").await;
    let t700: Vec<_> = alerts["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|a| a["key"] == terminal(700))
        .collect();
    assert_eq!(t700.len(), 1, "{alerts}");
    wait_for("T0700's alert to resolve", || async {
        let a = weir
            .get_ok(&format!("/api/v1/alerts?rule=low&key={}", terminal(700)))
            .await;
        (a["items"][0]["state"] == "resolved").then_some(())
    })
    .await;
    weir.stop().await;
}
