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
    let refs: Vec<(&str, String)> = messages
        .iter()
        .map(|(t, p)| (t.as_str(), p.clone()))
        .collect();
    weir.publish(&refs).await;

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
