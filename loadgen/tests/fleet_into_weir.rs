//! The load generator against a real weir (embedded broker, shipped
//! pipelines): what the report says was sent is what weir counted, stream by
//! stream, and what a subscriber that only counts received; the fleet's
//! values land in the shipped views without a dead letter.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

async fn get(http: &reqwest::Client, url: &str) -> Value {
    let text = http
        .get(url)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_fleet_sends_is_what_weir_counts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = weir::config::Config::default();
    config.http.listen = "127.0.0.1:0".parse().expect("addr");
    config.mqtt.embedded_listen = "127.0.0.1:0".parse().expect("addr");
    config.storage.dir = dir.path().join("data");
    config.pipelines.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/pipelines").into();
    let pipeline = weir::plan::plan_dir(&config.pipelines.dir).expect("shipped pipelines plan");
    let running = weir::engine::start(config, pipeline)
        .await
        .expect("weir starts");
    let base = format!("http://{}", running.http_addr);
    let broker = running.embedded_broker.expect("embedded broker");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "weir never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let report_path = dir.path().join("report.json");
    let status = tokio::task::spawn_blocking({
        let report_path = report_path.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_weir-loadgen"))
                .args(["--broker", &format!("mqtt://{broker}")])
                .args(["--terminals", "300", "--rate", "3000", "--duration", "3s"])
                .args(["--batch", "10", "--connections", "2", "--qos", "1"])
                .args(["--txn-per-terminal-min", "30", "--count"])
                .arg("--report-json")
                .arg(&report_path)
                .status()
                .expect("run weir-loadgen")
        }
    })
    .await
    .expect("join");
    assert!(status.success(), "weir-loadgen failed: {status}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report")).expect("report JSON");
    let telemetry = report["telemetry_events_sent"]
        .as_u64()
        .expect("telemetry sent");
    let transactions = report["transactions_sent"]
        .as_u64()
        .expect("transactions sent");
    assert!(telemetry > 0 && transactions > 0, "{report}");
    assert_eq!(
        report["events_sent"].as_u64(),
        Some(telemetry + transactions)
    );
    assert_eq!(
        report["broker_delivered"]["events"].as_u64(),
        Some(telemetry + transactions),
        "the counting subscriber received every event: {report}"
    );

    // weir counts every event of both streams
    let mut counted = (0.0, 0.0);
    while Instant::now() < deadline {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        counted = (
            metric(&text, "weir_ingested_events_total{stream=\"telemetry\"}"),
            metric(&text, "weir_ingested_events_total{stream=\"transactions\"}"),
        );
        if counted == (telemetry as f64, transactions as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, (telemetry as f64, transactions as f64));

    let letters = get(&http, &format!("{base}/api/v1/deadletter")).await;
    assert_eq!(
        letters["items"].as_array().map(Vec::len),
        Some(0),
        "{letters}"
    );
    // every terminal reported, with values inside their ranges
    let latest = get(
        &http,
        &format!("{base}/api/v1/views/terminal_latest/rows?limit=1000"),
    )
    .await;
    let rows = latest["items"].as_array().expect("rows");
    assert_eq!(rows.len(), 300);
    for row in rows {
        let battery = row["battery_pct"].as_f64().expect("battery");
        assert!((0.0..=100.0).contains(&battery), "{row}");
        assert!(
            row["merchant_id"]
                .as_str()
                .is_some_and(|m| m.starts_with('M')),
            "{row}"
        );
    }
    running.shutdown().await;
}
