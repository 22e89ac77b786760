//! A stuck SSE client never slows the pipeline (DESIGN §5): while one
//! client reads nothing, a burst of 6 000 alert transitions (more than an
//! SSE client may fall behind) is processed, counted and stored. When the
//! clients read, nothing went missing silently: every transition reached
//! them, or a `lagged` event counted what they missed.

use crate::common;

use common::*;

/// Rules over `common::battery_pipeline`'s telemetry stream (idle timeout 1h).
const RULES: &str = "
CREATE ALERT battery_flat
WITH (severity = 'critical', clear = 'battery_pct >= 20')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 5;
";

const TRANSITIONS: usize = 6_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_sse_client_does_not_hold_up_alerts() {
    let weir = Weir::start(&[("p.sql", &battery_pipeline("1h", RULES))]).await;
    // Connected, then never read until the end.
    let mut stuck = Sse::connect(&weir.base, "/api/v1/alerts/stream").await;
    let mut live = Sse::connect(&weir.base, "/api/v1/alerts/stream").await;

    // A flapping battery: every row opens or resolves X's alert.
    let rows: Vec<String> = (0..TRANSITIONS)
        .map(|i| {
            let battery = if i % 2 == 0 { 1.0 } else { 50.0 };
            format!(
                r#"{{"ts": {}, "battery_pct": {battery}}}"#,
                T0 + i as i64 * 10
            )
        })
        .collect();
    for chunk in rows.chunks(1_000) {
        weir.publish(&[("terminals/X/telemetry", format!("[{}]", chunk.join(",")))])
            .await;
    }

    // The pipeline got through the burst while the stuck client read nothing.
    let metrics = wait_for("every transition counted", || async {
        let m = weir.metrics().await;
        let n = common::process::metric_value(
            &m,
            "weir_alert_transitions_total{rule=\"battery_flat\",change=\"resolved\"}",
        )?;
        (n >= (TRANSITIONS / 2) as f64).then_some(m)
    })
    .await;
    for change in ["opened", "resolved"] {
        let name =
            format!("weir_alert_transitions_total{{rule=\"battery_flat\",change=\"{change}\"}}");
        assert_eq!(
            common::process::metric_value(&metrics, &name),
            Some((TRANSITIONS / 2) as f64),
            "{name}"
        );
    }
    let stored = weir.get_ok("/api/v1/alerts?limit=10000").await;
    assert_eq!(
        stored["items"].as_array().map(Vec::len),
        Some(TRANSITIONS / 2)
    );

    // Both clients catch up: delivered + reported missing = all.
    let live_delivered = catch_up(&mut live).await;
    let stuck_delivered = catch_up(&mut stuck).await;
    assert!(live_delivered > 0 && stuck_delivered > 0);
    weir.stop().await;
}

/// Reads until every transition is accounted for; returns how many arrived.
async fn catch_up(sse: &mut Sse) -> u64 {
    let mut delivered = 0u64;
    let mut missed = 0u64;
    let mut last = String::new();
    while delivered + missed < TRANSITIONS as u64 {
        let (name, event) = sse.next_event().await;
        match name.as_str() {
            "lagged" => {
                missed += event["missed"].as_u64().expect("missed count");
                last.clear();
            }
            "opened" | "resolved" => {
                // in order: a resolve follows an open, and the other way round
                assert_ne!(name, last, "{event}");
                last = name;
                delivered += 1;
            }
            other => panic!("unexpected event {other}: {event}"),
        }
    }
    assert_eq!(delivered + missed, TRANSITIONS as u64);
    delivered
}

/// With nothing happening, the stream still sends keep-alive comments (so
/// proxies and clients can tell a quiet stream from a dead one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_sends_keep_alive_comments() {
    let pipeline = battery_pipeline("1h", RULES);
    let weir = Weir::start_tweaked(&[("p.sql", &pipeline)], None, |c| {
        c.alerts.sse_keepalive = std::time::Duration::from_millis(200);
    })
    .await;
    let mut sse = Sse::connect(&weir.base, "/api/v1/alerts/stream").await;
    for _ in 0..2 {
        let block = sse.next_block().await;
        assert!(block.starts_with(':'), "a comment, not an event: {block:?}");
    }
    weir.stop().await;
}
