//! Hostile messages cannot hurt weir (DESIGN §2 "Limits"): each attack is
//! published with a real MQTT client to a running weir, between good
//! readings. What a user would notice: weir stays ready, across a restart
//! too; every good reading is counted once; the watermark is where the
//! good readings put it; each bad message is one dead letter with its
//! reason; memory stays bounded.

mod common;

use common::*;

/// The process's peak resident memory, from /proc.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .expect("VmHWM")
}

fn reading(id: &str, ts: i64, battery: f64) -> (String, String) {
    (
        format!("terminals/{id}/telemetry"),
        format!(r#"{{"ts": {ts}, "battery_pct": {battery}}}"#),
    )
}

/// What a user sees after the attacks: ready, good readings counted once,
/// the watermark where they put it, one dead letter per bad message.
async fn check(weir: &Weir) {
    let (status, _) = weir.get("/readyz").await;
    assert_eq!(status, 200, "weir is still ready");
    let latest = weir.wait_rows("latest", 2).await;
    assert_eq!(row_with(&latest, "terminal_id", "T1")["reports"], 2);
    assert_eq!(row_with(&latest, "terminal_id", "T2")["reports"], 1);
    let streams = weir.get_ok("/api/v1/streams").await;
    let telemetry = &streams["items"][0];
    // the largest good event time minus the 5 s bound
    assert_eq!(
        telemetry["watermark"], "2023-11-14T22:13:15.000Z",
        "{telemetry}"
    );
    let dead = weir.get_ok("/api/v1/deadletter?limit=100").await;
    let mut reasons: Vec<String> = dead["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|d| d["reason"].as_str().unwrap_or("").to_string())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "future", "future", "oversize", "oversize", "oversize", "schema", "schema", "schema",
            "schema"
        ],
        "{dead}"
    );
    for d in dead["items"].as_array().expect("items") {
        assert!(
            d["payload"].as_str().is_some_and(|p| p.len() < 5_000),
            "each payload stored once, cut: {}",
            d["detail"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_ingestion_goes_on() {
    let weir = Weir::start(&[("telemetry.sql", TELEMETRY)]).await;
    let long_id = "T".repeat(64 * 1024 - 32);
    let long_text = "m".repeat(64 * 1024);
    let attacks: Vec<(String, String)> = vec![
        // a group key too long for the store: in the topic, in the payload
        (
            format!("terminals/{long_id}/telemetry"),
            format!(r#"{{"ts": {T0}, "battery_pct": 50}}"#),
        ),
        (
            "terminals/T1/telemetry".into(),
            format!(r#"{{"ts": {T0}, "merchant_id": "{long_text}", "battery_pct": 50}}"#),
        ),
        // event times that would drag the watermark to the end of time
        (
            "terminals/T1/telemetry".into(),
            r#"{"ts": "9999-12-31T00:00:00Z", "battery_pct": 50}"#.into(),
        ),
        (
            "terminals/T1/telemetry".into(),
            format!(r#"{{"ts": {}, "battery_pct": 50}}"#, i64::MAX),
        ),
        (
            "terminals/T1/telemetry".into(),
            format!(r#"{{"ts": {}, "battery_pct": 50}}"#, i64::MIN),
        ),
        (
            "terminals/T1/telemetry".into(),
            r#"{"ts": 1e300, "battery_pct": 50}"#.into(),
        ),
        // a million rows of nothing, two ways
        (
            "terminals/T1/telemetry".into(),
            format!("[{}]", vec!["{}"; 500_000].join(",")),
        ),
        (
            "terminals/T1/telemetry".into(),
            format!("[{}]", vec!["1"; 1_000_000].join(",")),
        ),
        // nesting
        (
            "terminals/T1/telemetry".into(),
            format!(
                r#"{{"ts": {T0}, "x": {}{}}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
        ),
    ];
    let mut messages = vec![reading("T1", T0, 80.0)];
    messages.extend(attacks.iter().cloned());
    messages.push(reading("T1", T0 + 10_000, 70.0));
    messages.push(reading("T2", T0 + 20_000, 60.0));
    weir.publish(&messages).await;

    check(&weir).await;
    let peak = peak_rss_mib();
    eprintln!("peak RSS of the test process after the attacks: {peak} MiB");
    assert!(peak < 1024, "peak RSS {peak} MiB");

    // The log holds every one of those messages: a restart replays them
    // and falls on none.
    let dir = weir.stop().await;
    let weir = Weir::start_in(dir, None).await;
    check(&weir).await;
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_a_view_cannot_compute_costs_that_row_only() {
    let pipeline = "
CREATE TABLE telemetry (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, tx BIGINT, errors BIGINT,
  WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json', idle_timeout = '1h');

CREATE VIEW error_rate AS
SELECT terminal_id, ts, tx / errors AS tx_per_error FROM telemetry;

CREATE VIEW latest AS
SELECT terminal_id, count(*) AS reports FROM telemetry GROUP BY terminal_id;
";
    let weir = Weir::start(&[("p.sql", pipeline)]).await;
    weir.publish(&[(
        "terminals/T1/telemetry",
        format!(
            r#"[{{"ts": {T0}, "tx": 100, "errors": 2}}, {{"ts": {}, "tx": 7, "errors": 0}}, {{"ts": {}, "tx": 50, "errors": 5}}]"#,
            T0 + 1000,
            T0 + 2000
        ),
    )])
    .await;
    let latest = weir.wait_rows("latest", 1).await;
    assert_eq!(latest[0]["reports"], 3, "the other view saw every row");
    let rates = weir.wait_rows("error_rate", 2).await;
    let mut got: Vec<i64> = rates
        .iter()
        .filter_map(|r| r["tx_per_error"].as_i64())
        .collect();
    got.sort();
    assert_eq!(got, [10, 50], "the computable rows of the batch are kept");
    let dead = weir.get_ok("/api/v1/deadletter?reason=schema").await;
    let items = dead["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{dead}");
    let detail = items[0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("view error_rate") && detail.to_lowercase().contains("divide by zero"),
        "{detail}"
    );
    assert!(
        items[0]["payload"]
            .as_str()
            .is_some_and(|p| p.contains("\"errors\":0")),
        "{dead}"
    );
    // A replay writes the dead letter once.
    let dir = weir.stop().await;
    let weir = Weir::start_in(dir, None).await;
    let dead = weir.get_ok("/api/v1/deadletter?reason=schema").await;
    assert_eq!(dead["items"].as_array().map(Vec::len), Some(1), "{dead}");
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_messages_stays_within_the_dead_letter_quota() {
    let weir = Weir::start_tweaked(&[("telemetry.sql", TELEMETRY)], None, |c| {
        c.storage.deadletter_max_bytes = 1 << 20;
    })
    .await;
    let junk = "x".repeat(1500);
    let mut flood: Vec<(&str, String)> = (0..2000)
        .map(|i| ("terminals/T1/telemetry", format!("not json {i} {junk}")))
        .collect();
    flood.push(reading_ref(T0, 80.0));
    weir.publish(&flood).await;
    wait_metric(&weir, "weir_deadletters_trimmed_total", 1.0).await;
    let metrics = weir.metrics().await;
    let bytes =
        common::process::metric_value(&metrics, "weir_deadletter_bytes").unwrap_or(f64::MAX);
    assert!(bytes <= (1 << 20) as f64, "{bytes} bytes of dead letters");
    // The newest are the ones kept.
    let dead = weir.get_ok("/api/v1/deadletter?limit=1").await;
    assert!(
        dead["items"][0]["payload"]
            .as_str()
            .is_some_and(|p| p.starts_with("not json 1999 ")),
        "{dead}"
    );
    let latest = weir.wait_rows("latest", 1).await;
    assert_eq!(latest[0]["reports"], 1, "ingestion went on");
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_stream_keeps_the_other_streams_dead_letters() {
    let payments = "
CREATE TABLE payments (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, amount DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/payments', format = 'json');
";
    let weir = Weir::start_tweaked(
        &[("telemetry.sql", TELEMETRY), ("payments.sql", payments)],
        None,
        |c| {
            c.storage.deadletter_max_bytes = 8 << 20;
            c.storage.deadletter_max_bytes_per_stream = 1 << 20;
        },
    )
    .await;
    // A few bad payments first: the oldest dead letters in the store.
    let bad_payments: Vec<(&str, String)> = (0..5)
        .map(|i| ("terminals/T1/payments", format!("broken payment {i}")))
        .collect();
    weir.publish(&bad_payments).await;
    wait_for("the payments' dead letters", || async {
        let dead = weir.get_ok("/api/v1/deadletter?stream=payments").await;
        (dead["items"].as_array()?.len() == 5).then_some(())
    })
    .await;
    // Then 3 MiB of junk on telemetry: over its share, under the total.
    let junk = "x".repeat(1500);
    let flood: Vec<(&str, String)> = (0..2000)
        .map(|i| ("terminals/T1/telemetry", format!("not json {i} {junk}")))
        .collect();
    weir.publish(&flood).await;
    wait_metric(&weir, "weir_deadletters_trimmed_total", 1.0).await;
    // The flood's oldest went; the payments' letters, older still, stayed.
    let dead = weir.get_ok("/api/v1/deadletter?stream=payments").await;
    assert_eq!(dead["items"].as_array().map(Vec::len), Some(5), "{dead}");
    let telemetry = weir
        .get_ok("/api/v1/deadletter?stream=telemetry&limit=10000")
        .await;
    let kept = telemetry["items"].as_array().map_or(0, Vec::len);
    assert!(
        kept > 0 && kept < 2000,
        "{kept} telemetry dead letters kept"
    );
    assert!(
        telemetry["items"][0]["payload"]
            .as_str()
            .is_some_and(|p| p.starts_with("not json 1999 ")),
        "the newest are kept"
    );
    let bytes = common::process::metric_value(&weir.metrics().await, "weir_deadletter_bytes")
        .unwrap_or(f64::MAX);
    assert!(
        bytes <= (1 << 20) as f64 + 4096.0,
        "{bytes} bytes of dead letters"
    );
    weir.stop().await;
}

fn reading_ref(ts: i64, battery: f64) -> (&'static str, String) {
    (
        "terminals/T1/telemetry",
        format!(r#"{{"ts": {ts}, "battery_pct": {battery}}}"#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_idle_out_leave_memory_and_keep_their_rows() {
    let pipeline = "
CREATE TABLE telemetry (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json', idle_timeout = '1h');

CREATE VIEW latest WITH (key_ttl = '5 minutes') AS
SELECT terminal_id, count(*) AS reports FROM telemetry GROUP BY terminal_id;
";
    let weir = Weir::start(&[("p.sql", pipeline)]).await;
    // 300 terminals nobody will hear from again (random ids, say) ...
    let strays: Vec<(String, String)> = (0..300)
        .map(|i| {
            (
                format!("terminals/stray-{i}/telemetry"),
                format!(r#"{{"ts": {T0}, "battery_pct": 50}}"#),
            )
        })
        .collect();
    weir.publish(&strays).await;
    weir.wait_rows("latest", 300).await;
    // ... and one that keeps reporting, ten minutes on.
    weir.publish(&[reading_ref(T0 + 10 * 60_000, 80.0)]).await;
    wait_for("the strays to idle out", || async {
        let metrics = weir.metrics().await;
        let evicted = metrics
            .lines()
            .find_map(|l| l.strip_prefix("weir_view_keys_evicted_total{view=\"latest\"} "))?
            .trim()
            .parse::<f64>()
            .ok()?;
        (evicted == 300.0).then_some(())
    })
    .await;
    let metrics = weir.metrics().await;
    assert!(
        metrics.contains("weir_view_open_groups{view=\"latest\"} 1"),
        "one key left in memory"
    );
    // Their rows stay in the store.
    assert_eq!(weir.rows("latest").await.len(), 301);
    weir.stop().await;
}
