//! Nothing acknowledged is lost and nothing is doubled (DESIGN §4), with real
//! processes, on both kinds of broker. With Mosquitto, two weir processes
//! subscribe to it with their own persistent sessions; with weir's own MQTT
//! server (the default), a publisher with a persistent session sends the
//! same messages to each weir, and resends what was not acknowledged when
//! one comes back. One weir runs straight through;
//! the other is killed with SIGKILL twice (once mid-stream, once right after
//! it was started again) and stopped once with SIGTERM, while a known set of
//! events is published at QoS 1. In the end every view of the interrupted
//! weir equals the straight one's, and both hold every event exactly once;
//! so do the alerts a rule raised and resolved along the way.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::process::{Spawn, WeirProcess};
use common::*;
use rumqttc::QoS;
use serde_json::Value;

const TERMINALS: usize = 8;
const MESSAGES: usize = 1_200;
const EVENTS_PER_MESSAGE: usize = 4;

/// Every view shape: tumble, hop, session, updating, filter, and a window
/// over a filter view.
const PIPELINE: &str = "
CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  battery_pct DOUBLE,
  app_latency_ms DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json', qos = 1, idle_timeout = '1h');

CREATE VIEW health_1m AS
SELECT terminal_id, count(*) AS samples, min(battery_pct) AS min_battery, avg(app_latency_ms) AS avg_latency_ms,
       approx_percentile_cont(app_latency_ms, 0.9) AS p90_latency_ms
FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

CREATE VIEW health_hop AS
SELECT terminal_id, count(*) AS samples, max(battery_pct) AS max_battery
FROM telemetry GROUP BY terminal_id, hop(INTERVAL '1' MINUTE, INTERVAL '2' MINUTE);

CREATE VIEW bursts AS
SELECT terminal_id, count(*) AS samples, sum(app_latency_ms) AS total_latency
FROM telemetry GROUP BY terminal_id, session(INTERVAL '20' SECOND);

CREATE VIEW latest AS
SELECT terminal_id, last_value(battery_pct) AS battery_pct, count(*) AS reports
FROM telemetry GROUP BY terminal_id;

CREATE VIEW low_battery AS
SELECT terminal_id, ts, battery_pct FROM telemetry WHERE battery_pct < 20;

CREATE VIEW low_per_minute AS
SELECT terminal_id, count(*) AS lows FROM low_battery GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

CREATE ALERT battery_alarm
WITH (severity = 'warning', clear = 'battery_pct >= 60')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 10;
";
const VIEWS: [&str; 6] = [
    "health_1m",
    "health_hop",
    "bursts",
    "latest",
    "low_battery",
    "low_per_minute",
];

/// Message `k`: events of one terminal, in time order, at most 3 s out of
/// order across messages (inside the 5 s bound, so no event is ever late and
/// the result does not depend on how messages are batched). Every 97th
/// message starts a gap of 40 s, so that sessions end.
fn message(k: usize) -> (String, String) {
    let terminal = k % TERMINALS;
    let gaps = (k / 97) as i64 * 40_000;
    let base = T0 + k as i64 * 250 + gaps - if k.is_multiple_of(5) { 3_000 } else { 0 };
    let events: Vec<String> = (0..EVENTS_PER_MESSAGE)
        .map(|e| {
            let n = k * EVENTS_PER_MESSAGE + e;
            format!(
                r#"{{"ts": {}, "battery_pct": {}, "app_latency_ms": {}}}"#,
                base + e as i64 * 50,
                (n * 37) % 100,
                10 + (n * 13) % 90
            )
        })
        .collect();
    (
        format!("terminals/T{terminal}/telemetry"),
        format!("[{}]", events.join(",")),
    )
}

/// Rows of every view, sorted, so that two runs compare as sets.
async fn snapshot(weir: &WeirProcess) -> Option<BTreeMap<&'static str, Vec<String>>> {
    let mut all = BTreeMap::new();
    for view in VIEWS {
        let mut rows: Vec<String> = weir
            .rows(view)
            .await?
            .iter()
            .map(Value::to_string)
            .collect();
        rows.sort();
        all.insert(view, rows);
    }
    Some(all)
}

/// Every alert, as the API lists it, without the ack fields (sorted by id).
async fn alerts(weir: &WeirProcess) -> Option<Vec<String>> {
    let (status, body) = weir.try_get("/api/v1/alerts?limit=10000").await?;
    if status != 200 {
        return None;
    }
    let mut items: Vec<String> = body["items"]
        .as_array()?
        .iter()
        .map(Value::to_string)
        .collect();
    items.sort();
    Some(items)
}

/// Total `reports` over the `latest` view: every event counted once.
async fn reports(weir: &WeirProcess) -> Option<u64> {
    Some(column_sum(&weir.rows("latest").await?, "reports"))
}

async fn wait_reports_at_least(weir: &WeirProcess, n: u64) {
    wait_for(&format!("{n} events counted"), || async {
        (reports(weir).await? >= n).then_some(())
    })
    .await;
}

#[derive(Clone, Copy, PartialEq)]
enum Broker {
    Mosquitto,
    Embedded,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_kill_9_twice_and_sigterm_lose_and_double_nothing() {
    kill_9_twice_and_sigterm_lose_and_double_nothing(Broker::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_weirs_own_server_kill_9_twice_and_sigterm_lose_and_double_nothing() {
    kill_9_twice_and_sigterm_lose_and_double_nothing(Broker::Embedded).await;
}

async fn kill_9_twice_and_sigterm_lose_and_double_nothing(broker: Broker) {
    let port = free_port();
    let _mosquitto = match broker {
        Broker::Mosquitto => Some(Mosquitto::start(port).await),
        Broker::Embedded => None,
    };
    let root = tempfile::tempdir().expect("tempdir");
    let mut specs = Vec::new();
    let mut ports = Vec::new();
    for name in ["straight", "interrupted"] {
        let dir = root.path().join(name);
        std::fs::create_dir_all(dir.join("pipelines")).expect("mkdir");
        std::fs::write(dir.join("pipelines/telemetry.sql"), PIPELINE).expect("pipeline");
        let mut spec = Spawn::new(&dir, port, &format!("weir-{name}"))
            .env("WEIR_STORAGE__CHECKPOINT_INTERVAL", "1s")
            // the events are from 2023: keep their rows
            .env("WEIR_STORAGE__VIEW_RETENTION", "3650 days")
            .env("WEIR_ALERTS__RETENTION", "3650 days");
        if broker == Broker::Embedded {
            let own = free_port();
            spec = spec
                .env("WEIR_MQTT__BROKER", "embedded")
                .env("WEIR_MQTT__EMBEDDED_LISTEN", &format!("127.0.0.1:{own}"));
            ports.push(own);
        } else {
            ports.push(port);
        }
        specs.push(spec);
    }
    let straight = WeirProcess::spawn(&specs[0]);
    let mut weir = WeirProcess::spawn(&specs[1]);
    straight.wait_ready().await;
    weir.wait_ready().await;

    let all: Vec<(String, String)> = (0..MESSAGES).map(message).collect();
    let publisher = match broker {
        // The publisher runs on its own; the broker queues for whoever is down.
        Broker::Mosquitto => tokio::spawn(async move {
            for chunk in all.chunks(40) {
                let chunk: Vec<(&str, String)> =
                    chunk.iter().map(|(t, p)| (t.as_str(), p.clone())).collect();
                publish(port, &chunk, QoS::AtLeastOnce).await;
                // 2 ms a message, as the embedded run: the kills land mid-stream
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
        }),
        // A terminal per weir, each resending what its weir did not acknowledge.
        Broker::Embedded => {
            let (a, b) = (ports[0], ports[1]);
            let again = all.clone();
            tokio::spawn(async move {
                // paced like the Mosquitto run, so that the kills land mid-stream
                let pace = Duration::from_millis(2);
                let straight = publish_through_restarts(a, "fleet", all, pace);
                let interrupted = publish_through_restarts(b, "fleet", again, pace);
                tokio::join!(straight, interrupted);
            })
        }
    };
    let total = (MESSAGES * EVENTS_PER_MESSAGE) as u64;

    // 1. SIGKILL mid-stream, after at least one checkpoint.
    wait_reports_at_least(&weir, total / 4).await;
    // ... and with records logged after it, so that the restart replays some
    // (a kill right after a checkpoint would leave nothing to replay).
    let mut seen: Option<(f64, f64)> = None;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let checkpoints = weir.metric("weir_checkpoints_total").await;
        let logged = weir.metric("weir_log_records_total").await;
        if let (Some(checkpoints), Some(logged)) = (checkpoints, logged) {
            match seen {
                Some((c, l)) if c == checkpoints && logged > l => break,
                _ if checkpoints >= 1.0 => seen = Some((checkpoints, logged)),
                _ => {}
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no records logged after a checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    weir.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 2. SIGKILL again, right after it starts (during or just after recovery).
    weir = WeirProcess::spawn(&specs[1]);
    wait_for("weir to answer", || async {
        weir.try_get("/healthz").await
    })
    .await;
    weir.kill9();

    // 3. SIGTERM later on: a clean stop exits 0.
    weir = WeirProcess::spawn(&specs[1]);
    weir.wait_ready().await;
    wait_reports_at_least(&weir, total * 2 / 3).await;
    let status = weir.terminate().await;
    assert!(status.success(), "weir exited with {status} after SIGTERM");

    weir = WeirProcess::spawn(&specs[1]);
    weir.wait_ready().await;
    publisher.await.expect("publisher");
    // One event far ahead closes every window of both runs.
    let last = [(
        "terminals/T0/telemetry",
        event(T0 + 3_600_000, 50.0, Some(10.0)),
    )];
    if broker == Broker::Embedded {
        publish(ports[0], &last, QoS::AtLeastOnce).await;
    }
    publish(ports[1], &last, QoS::AtLeastOnce).await;

    wait_for("both runs to count every event", || async {
        let a = reports(&straight).await?;
        let b = reports(&weir).await?;
        (a > total && b > total).then_some(())
    })
    .await;
    assert_eq!(
        reports(&straight).await,
        Some(total + 1),
        "the straight run"
    );
    assert_eq!(
        reports(&weir).await,
        Some(total + 1),
        "the interrupted run counted some events twice"
    );
    let want = snapshot(&straight).await.expect("straight rows");
    // Both have counted everything; the last rows may still be in flight.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let got = loop {
        let got = snapshot(&weir).await.expect("interrupted rows");
        if got == want || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for view in VIEWS {
        let missing: Vec<_> = want[view]
            .iter()
            .filter(|r| !got[view].contains(r))
            .collect();
        let extra: Vec<_> = got[view]
            .iter()
            .filter(|r| !want[view].contains(r))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{view} differs from the straight run:\nmissing {missing:#?}\nextra {extra:#?}\n{}",
            weir.log()
        );
    }
    // Alerts are part of operator state: the replays neither lost nor
    // doubled one, and every transition is the same.
    let want_alerts = alerts(&straight).await.expect("straight alerts");
    let got_alerts = alerts(&weir).await.expect("interrupted alerts");
    assert!(want_alerts.len() > 10, "{want_alerts:#?}");
    let missing: Vec<_> = want_alerts
        .iter()
        .filter(|a| !got_alerts.contains(a))
        .collect();
    let extra: Vec<_> = got_alerts
        .iter()
        .filter(|a| !want_alerts.contains(a))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "alerts differ from the straight run ({} vs {}):\nmissing {missing:#?}\nextra {extra:#?}",
        got_alerts.len(),
        want_alerts.len()
    );

    // Not vacuous: the views hold closed windows and sessions.
    for view in VIEWS {
        assert!(!got[view].is_empty(), "{view} is empty");
    }
    let samples: u64 = got["health_1m"]
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(r).ok()?["samples"].as_u64())
        .sum();
    assert_eq!(
        samples, total,
        "closed minute windows hold every event once"
    );
    // The restarts did restore checkpoints and replay the log after them.
    let log = weir.log();
    assert!(log.contains("checkpoint restored"), "{log}");
    let replayed: u64 = log
        .lines()
        .filter_map(|l| {
            l.split("replayed_events=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(replayed > 0, "no restart replayed the log:\n{log}");
}
