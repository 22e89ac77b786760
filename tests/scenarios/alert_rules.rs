//! Alert rules follow event time (DESIGN §5), end to end through MQTT, the
//! pipeline and the alerts API: `for` against the watermark, hysteresis
//! with `clear`, disorder that must not flip an alert, the `reopen_after`
//! flapping guard, and `absent_for` — driven by other terminals' data, and
//! by idle advancement once all traffic stops. Also the list API's filters
//! and paging.

use crate::common;

use common::*;
use serde_json::Value;

/// Rules over `common::battery_pipeline`'s telemetry stream (idle timeout 1s).
const RULES: &str = "
CREATE ALERT low_battery
WITH (severity = 'warning', for = '1 minute', clear = 'battery_pct >= 20')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 15;

CREATE ALERT battery_flat
WITH (severity = 'critical', reopen_after = '10 minutes')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 5;

CREATE ALERT silent
WITH (severity = 'info', absent_for = '5 seconds')
AS SELECT terminal_id FROM telemetry;
";

const S: i64 = 1_000;

fn at(ts: i64, battery: f64) -> String {
    format!(r#"{{"ts": {ts}, "battery_pct": {battery}}}"#)
}

/// Messages of one terminal, each an array of (seconds after T0, battery).
fn terminal(id: &str, readings: &[(i64, f64)]) -> (String, String) {
    let events: Vec<String> = readings.iter().map(|(s, b)| at(T0 + s * S, *b)).collect();
    (
        format!("terminals/{id}/telemetry"),
        format!("[{}]", events.join(",")),
    )
}

async fn alerts(weir: &Weir, query: &str) -> Vec<Value> {
    let body = weir
        .get_ok(&format!("/api/v1/alerts?limit=1000&{query}"))
        .await;
    body["items"].as_array().cloned().unwrap_or_default()
}

fn time(ms: i64) -> String {
    weir::obs::format_time(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_follow_event_time() {
    let weir = Weir::start(&[("rules.sql", &battery_pipeline("1s", RULES))]).await;
    let mut sse = Sse::connect(&weir.base, "/api/v1/alerts/stream?rule=low_battery").await;

    let history = [
        // H: low for more than a minute -> opens on the row that completes
        // the run (fired_by is the run's first row); 17 % is between firing
        // and clearing (nothing happens); 25 % resolves.
        terminal(
            "H",
            &[(0, 10.0), (30, 12.0), (61, 11.0), (70, 17.0), (80, 25.0)],
        ),
        // F: a run broken by a good reading starts over; the second run is
        // never broken, so the watermark passing 40 s + 1 min opens it.
        terminal("F", &[(0, 10.0), (30, 50.0), (40, 10.0), (59, 10.0)]),
        // D: flat, then fine (no `clear`: the first row that does not match
        // resolves), then a row older than that resolve arrives (disorder:
        // ignored), then flat again within reopen_after (held back). For
        // low_battery, the late row cannot start a `for` run from 15 s
        // either (the 50 % reading at 20 s broke it): its run starts at 25 s.
        terminal("D", &[(10, 3.0), (20, 50.0), (15, 2.0), (25, 2.0)]),
        // S reports once; K reports every 2 s up to 200 s, moving the watermark.
        terminal("S", &[(0, 80.0)]),
        terminal("K", &(0..=100).map(|i| (i * 2, 90.0)).collect::<Vec<_>>()),
    ];
    let messages: Vec<(&str, String)> = history
        .iter()
        .map(|(t, p)| (t.as_str(), p.clone()))
        .collect();
    weir.publish(&messages).await;

    let (name, h_opened) = sse.next_event().await;
    assert_eq!(name, "opened");
    // The SSE filter passes low_battery only, in the order they happened.
    let (name, second) = sse.next_event().await;
    assert_eq!(name, "resolved", "{second}");
    let by_key = |v: &Value| v["alert"]["key"].as_str().map(String::from);
    assert_eq!(by_key(&h_opened).as_deref(), Some("H"));
    assert_eq!(by_key(&second).as_deref(), Some("H"));
    // then D and F open as the watermark passes 85 s and 100 s
    let (name, third) = sse.next_event().await;
    assert_eq!(
        (name.as_str(), by_key(&third).as_deref()),
        ("opened", Some("D"))
    );
    let (name, fourth) = sse.next_event().await;
    assert_eq!(
        (name.as_str(), by_key(&fourth).as_deref()),
        ("opened", Some("F"))
    );

    let low = wait_for("three low_battery alerts", || async {
        let low = alerts(&weir, "rule=low_battery").await;
        (low.len() == 3).then_some(low)
    })
    .await;
    // newest first: F opened at 100 s, D at 85 s, H at 61 s
    assert_eq!(low[0]["key"], "F");
    assert_eq!(
        low[0]["opened_at"],
        time(T0 + 100 * S),
        "F: 40 s + for 1 min"
    );
    assert_eq!(low[0]["state"], "firing");
    assert_eq!(low[0]["fired_by"]["battery_pct"], 10.0);
    assert_eq!(low[1]["key"], "D");
    assert_eq!(
        low[1]["opened_at"],
        time(T0 + 85 * S),
        "D: 25 s + for 1 min"
    );
    assert_eq!(low[2]["key"], "H");
    assert_eq!(low[2]["opened_at"], time(T0 + 61 * S));
    assert_eq!(
        low[2]["fired_by"]["battery_pct"], 10.0,
        "the run's first row"
    );
    assert_eq!(low[2]["state"], "resolved");
    assert_eq!(
        low[2]["resolved_at"],
        time(T0 + 80 * S),
        "17 % did not clear it"
    );
    assert_eq!(low[2]["cleared_by"]["battery_pct"], 25.0);
    assert_eq!(low[2]["severity"], "warning");

    let flat = alerts(&weir, "rule=battery_flat").await;
    assert_eq!(flat.len(), 1, "disorder and the flapping guard: {flat:#?}");
    assert_eq!(flat[0]["key"], "D");
    assert_eq!(flat[0]["opened_at"], time(T0 + 10 * S));
    assert_eq!(flat[0]["resolved_at"], time(T0 + 20 * S));

    // Silence measured by the watermark the other terminals move: S last
    // reported at 0 s, so it is silent from 5 s.
    let silent_s = wait_for("S to be silent", || async {
        alerts(&weir, "rule=silent&key=S").await.into_iter().next()
    })
    .await;
    assert_eq!(silent_s["opened_at"], time(T0 + 5 * S));
    assert_eq!(silent_s["severity"], "info");
    assert_eq!(silent_s["fired_by"]["terminal_id"], "S");

    // S reports again: resolved.
    weir.publish(
        &[terminal("S", &[(201, 80.0)])]
            .iter()
            .map(|(t, p)| (t.as_str(), p.clone()))
            .collect::<Vec<_>>(),
    )
    .await;
    wait_for("S's silence to resolve", || async {
        let a = alerts(&weir, "rule=silent&key=S").await;
        (a.len() == 1 && a[0]["state"] == "resolved").then_some(())
    })
    .await;

    // All traffic stops: idle advancement moves the watermark on, and K
    // (last row at 200 s) goes silent at 205 s of event time.
    let silent_k = wait_for("K to go silent while nothing arrives", || async {
        alerts(&weir, "rule=silent&key=K").await.into_iter().next()
    })
    .await;
    assert_eq!(silent_k["opened_at"], time(T0 + 205 * S));

    // Filters and paging of the list.
    let firing = alerts(&weir, "state=firing&severity=warning").await;
    assert!(firing
        .iter()
        .all(|a| a["state"] == "firing" && a["severity"] == "warning"));
    assert_eq!(firing.len(), 2, "F's and D's low battery: {firing:#?}");
    let since = alerts(&weir, &format!("since={}", time(T0 + 100 * S))).await;
    assert!(since
        .iter()
        .all(|a| a["opened_at"].as_str() >= Some(time(T0 + 100 * S).as_str())));
    assert!(since.iter().any(|a| a["key"] == "F"));
    let all = alerts(&weir, "").await;
    let mut paged = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = weir
            .get_ok(&format!("/api/v1/alerts?limit=2{cursor}"))
            .await;
        paged.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(paged, all, "pages of 2 add up to the whole list");
    assert!(all.len() >= 6, "{all:#?}");

    // Bad requests get a 4xx JSON error.
    for bad in [
        "/api/v1/alerts?state=open",
        "/api/v1/alerts?severity=urgent",
        "/api/v1/alerts?since=yesterday",
        "/api/v1/alerts?cursor=xyz",
        "/api/v1/alerts?colour=red",
        "/api/v1/alerts/not-an-id",
        "/api/v1/alerts/stream?rule=nope",
    ] {
        let (status, body) = weir.get(bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["message"].is_string(), "{bad}: {body}");
    }
    let (status, body) = weir
        .post(&format!("/api/v1/alerts/{}/ack", "0".repeat(32)), "")
        .await;
    assert_eq!(status, 404, "{body}");

    let metrics = weir.metrics().await;
    assert!(
        metrics.contains("weir_alerts_firing{rule=\"low_battery\"} 2"),
        "{metrics}"
    );
    weir.stop().await;
}
