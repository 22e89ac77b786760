//! A terminal publishes to the embedded broker; the windowed, updating and
//! filter views hold the exact values over HTTP; bad input lands in the
//! dead-letter store and weir keeps serving.

use crate::common;

use common::*;
use serde_json::{json, Value};

fn t(seconds: i64) -> i64 {
    T0 + seconds * 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_flows_into_every_view_shape() {
    let weir = Weir::start(&[("telemetry.sql", TELEMETRY)]).await;

    weir.publish(&[
        // a batch: a JSON array of two events
        (
            "terminals/T1/telemetry",
            format!(
                "[{}, {}]",
                event(t(1), 50.0, Some(100.0)),
                event(t(2), 15.0, Some(300.0))
            ),
        ),
        ("terminals/T2/telemetry", event(t(30), 80.0, None)),
        // not JSON at all
        ("terminals/T2/telemetry", "{\"ts\": ".to_string()),
        // one bad row and one good row in the same message
        (
            "terminals/T3/telemetry",
            format!(
                r#"[{{"ts": {}, "battery_pct": "full"}}, {}]"#,
                t(40),
                event(t(41), 10.0, None)
            ),
        ),
    ])
    .await;

    // The updating view shows every accepted event at once.
    let latest = weir.wait_rows("latest", 3).await;
    assert_eq!(
        row_with(&latest, "terminal_id", "T1"),
        &json!({"terminal_id": "T1", "battery_pct": 15.0, "reports": 2})
    );
    assert_eq!(row_with(&latest, "terminal_id", "T2")["reports"], 1);
    assert_eq!(row_with(&latest, "terminal_id", "T3")["battery_pct"], 10.0);

    // The filter view appends the matching rows.
    let low = weir.wait_rows("low_battery", 2).await;
    let mut low_terminals: Vec<&str> = low
        .iter()
        .filter_map(|r| r["terminal_id"].as_str())
        .collect();
    low_terminals.sort();
    assert_eq!(low_terminals, vec!["T1", "T3"]);
    assert_eq!(
        row_with(&low, "terminal_id", "T3")["ts"],
        "2023-11-14T22:13:41.000Z"
    );

    // The watermark (41 s - 5 s) has not reached the end of the first minute: no window row yet.
    assert!(weir.rows("health_1m").await.is_empty());

    // An event at 70 s moves the watermark to 65 s and closes [0 s, 60 s).
    weir.publish(&[("terminals/T1/telemetry", event(t(70), 49.0, Some(50.0)))])
        .await;
    let health = weir.wait_rows("health_1m", 3).await;
    assert_eq!(
        row_with(&health, "terminal_id", "T1"),
        &json!({
            "window_start": "2023-11-14T22:13:00.000Z",
            "window_end": "2023-11-14T22:14:00.000Z",
            "terminal_id": "T1",
            "samples": 2,
            "min_battery": 15.0,
            "avg_latency_ms": 200.0
        })
    );
    assert_eq!(row_with(&health, "terminal_id", "T2")["samples"], 1);
    assert_eq!(
        row_with(&health, "terminal_id", "T2")["avg_latency_ms"],
        Value::Null
    );
    assert_eq!(row_with(&health, "terminal_id", "T3")["min_battery"], 10.0);

    // An event for the closed minute is late: dead-lettered, left out of the
    // window, but still counted by the updating and filter views.
    weir.publish(&[("terminals/T1/telemetry", event(t(10), 5.0, None))])
        .await;
    let late = wait_for("the late event in the dead-letter store", || async {
        let body = weir.get_ok("/api/v1/deadletter?reason=late").await;
        body["items"].as_array().filter(|a| !a.is_empty()).cloned()
    })
    .await;
    assert_eq!(late.len(), 1);
    assert_eq!(late[0]["stream"], "telemetry");
    assert_eq!(late[0]["topic"], "terminals/T1/telemetry");
    assert!(
        late[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("health_1m"),
        "{}",
        late[0]
    );
    assert!(
        late[0]["payload"]
            .as_str()
            .unwrap_or("")
            .contains("\"battery_pct\":5.0"),
        "{}",
        late[0]
    );
    let latest = weir.wait_rows("latest", 3).await;
    assert_eq!(row_with(&latest, "terminal_id", "T1")["reports"], 4);
    weir.wait_rows("low_battery", 3).await;
    let health = weir.rows("health_1m").await;
    assert_eq!(
        row_with(&health, "terminal_id", "T1")["samples"],
        2,
        "the closed window is not changed"
    );

    // The malformed message and the bad row are in the dead-letter store with their reasons.
    let dead = weir.get_ok("/api/v1/deadletter?stream=telemetry").await;
    let reasons: Vec<&str> = dead["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["reason"].as_str())
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "malformed").count(),
        1,
        "{dead}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "schema").count(),
        1,
        "{dead}"
    );
    let schema = weir.get_ok("/api/v1/deadletter?reason=schema").await;
    assert_eq!(
        schema["items"][0]["detail"],
        "1 of 2 rows rejected: row 0: field battery_pct: expected a number, got a string"
    );
    assert!(schema["items"][0]["received_at"]
        .as_str()
        .unwrap_or("")
        .ends_with('Z'));

    // Metrics count what happened.
    let metrics = weir.metrics().await;
    for line in [
        "weir_ingested_events_total{stream=\"telemetry\"} 6",
        "weir_late_events_total{stream=\"telemetry\"} 1",
        "weir_rejected_events_total{stream=\"telemetry\",reason=\"malformed\"} 1",
        "weir_rejected_events_total{stream=\"telemetry\",reason=\"schema\"} 1",
        "weir_view_rows_written_total{view=\"health_1m\"} 3",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("weir_watermark_lag_seconds{stream=\"telemetry\"}"));
    // what the store holds in memory: the events just written, in its memtables
    wait_for("the store's memtable bytes", || async {
        let text = weir.metrics().await;
        common::process::metric_value(&text, "weir_store_memtable_bytes").filter(|&b| b > 0.0)
    })
    .await;
    // and its block cache, bounded by fjall's capacity
    let cache = common::process::metric_value(&weir.metrics().await, "weir_store_cache_bytes")
        .expect("weir_store_cache_bytes in /metrics");
    assert!(cache <= (32 << 20) as f64, "block cache {cache} bytes");

    // Streams and views describe themselves.
    let streams = weir.get_ok("/api/v1/streams").await;
    assert_eq!(streams["items"][0]["name"], "telemetry");
    assert_eq!(streams["items"][0]["subscription"], "terminals/+/telemetry");
    assert_eq!(streams["items"][0]["counters"]["late"], 1);
    assert_eq!(streams["items"][0]["watermark"], "2023-11-14T22:14:05.000Z");
    let views = weir.get_ok("/api/v1/views").await;
    let health_view = views["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "health_1m")
        .unwrap()
        .clone();
    assert_eq!(health_view["shape"], "windowed");
    assert_eq!(health_view["keys"], json!(["terminal_id"]));
    assert_eq!(
        health_view["upstream"],
        json!({"kind": "stream", "name": "telemetry"})
    );
    assert_eq!(health_view["row_count"], 3);
    assert_eq!(health_view["doc"], "Health per terminal per minute.");

    // weir still serves.
    assert_eq!(weir.get_ok("/healthz").await["status"], "ok");
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_filter_page_and_query() {
    let weir = Weir::start(&[("telemetry.sql", TELEMETRY)]).await;
    let mut messages = Vec::new();
    // In time order (minute by minute), so that no event is late however
    // the messages are cut into micro-batches.
    for minute in 0..3 {
        for (i, terminal) in ["A", "B", "C"].iter().enumerate() {
            let ts = T0 + minute * 60_000 + i as i64 * 1000;
            messages.push((
                format!("terminals/{terminal}/telemetry"),
                event(ts, 50.0 + minute as f64, Some(10.0)),
            ));
        }
    }
    messages.push((
        "terminals/A/telemetry".into(),
        event(T0 + 10 * 60_000, 1.0, None),
    ));
    let refs: Vec<(&str, String)> = messages
        .iter()
        .map(|(t, p)| (t.as_str(), p.clone()))
        .collect();
    weir.publish(&refs).await;
    // 3 terminals x 3 minutes closed
    weir.wait_rows("health_1m", 9).await;

    let a = weir.get_ok("/api/v1/views/health_1m/rows?key=A").await;
    assert_eq!(a["items"].as_array().unwrap().len(), 3);
    assert!(a["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["terminal_id"] == "A"));

    let minute1 = weir
        .get_ok("/api/v1/views/health_1m/rows?from=2023-11-14T22:14:00Z&to=2023-11-14T22:15:00Z")
        .await;
    let items = minute1["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items
        .iter()
        .all(|r| r["window_start"] == "2023-11-14T22:14:00.000Z"));
    assert!(items.iter().all(|r| r["min_battery"] == 51.0));

    // paging: 9 rows in pages of 4
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/views/health_1m/rows?limit=4&cursor={c}"),
            None => "/api/v1/views/health_1m/rows?limit=4".to_string(),
        };
        let page = weir.get_ok(&path).await;
        seen.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 9);
    seen.dedup();
    assert_eq!(seen.len(), 9, "no row appears twice across pages");

    // ad-hoc SQL over stored views
    let (status, body) = weir
        .post(
            "/api/v1/query",
            r#"{"sql": "SELECT terminal_id, sum(samples) AS samples, min(min_battery) AS low FROM health_1m GROUP BY terminal_id ORDER BY terminal_id"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["columns"], json!(["terminal_id", "samples", "low"]));
    assert_eq!(
        body["rows"],
        json!([
            {"terminal_id": "A", "samples": 3, "low": 50.0},
            {"terminal_id": "B", "samples": 3, "low": 50.0},
            {"terminal_id": "C", "samples": 3, "low": 50.0}
        ])
    );
    weir.stop().await;
}
