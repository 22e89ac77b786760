//! Postgres sinks against a real PostgreSQL (DESIGN §3 "Sinks: Postgres"):
//! a windowed, an updating and a filter view delivered into warehouse
//! tables weir creates; the tables equal the views' rows after weir is
//! killed with SIGKILL mid-stream and Postgres is stopped and started
//! mid-stream (nothing missing, nothing doubled); `/api/v1/sinks` and
//! `/metrics` report the lag; an existing table that does not fit is refused
//! at start-up and by `weir check`, naming the column, and left as it was;
//! the password is in no log line.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::postgres::{Postgres, PASSWORD};
use common::process::{Spawn, WeirProcess};
use common::{event, free_port, publish, publish_through_restarts, wait_for, T0};
use rumqttc::QoS;
use serde_json::Value;

const PIPELINE: &str = r#"
CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  battery_pct DOUBLE,
  app_latency_ms DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json');

CREATE VIEW health_1m AS
SELECT terminal_id, count(*) AS samples, min(battery_pct) AS min_battery,
       avg(app_latency_ms) AS avg_latency_ms
FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

CREATE VIEW latest AS
SELECT terminal_id, last_value(battery_pct) AS battery, count(*) AS reports
FROM telemetry GROUP BY terminal_id;

CREATE VIEW low AS
SELECT terminal_id, ts, battery_pct FROM telemetry WHERE battery_pct < 20;

CREATE SINK health_pg FROM health_1m
WITH (connector = 'postgres', connection = 'warehouse', table = 'analytics.health_1m');

CREATE SINK latest_pg FROM latest
WITH (connector = 'postgres', connection = 'warehouse', table = 'analytics.latest');

CREATE SINK low_pg FROM low
WITH (connector = 'postgres', connection = 'warehouse', table = 'analytics.low', key = 'terminal_id, ts');
"#;

/// A column, and whether it is a timestamp.
type Columns = &'static [(&'static str, bool)];

/// (view, its table, its columns).
const SINKS: [(&str, &str, Columns); 3] = [
    (
        "health_1m",
        "analytics.health_1m",
        &[
            ("window_start", true),
            ("window_end", true),
            ("terminal_id", false),
            ("samples", false),
            ("min_battery", false),
            ("avg_latency_ms", false),
        ],
    ),
    (
        "latest",
        "analytics.latest",
        &[
            ("terminal_id", false),
            ("battery", false),
            ("reports", false),
        ],
    ),
    (
        "low",
        "analytics.low",
        &[("terminal_id", false), ("ts", true), ("battery_pct", false)],
    ),
];

const MESSAGES: usize = 2400;
const TERMINALS: usize = 12;

fn canonical(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "NULL".into(),
        Some(Value::Number(n)) => format!("{:.6}", n.as_f64().unwrap_or(f64::NAN)),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A view's rows, each as its canonical text.
async fn view_rows(
    weir: &WeirProcess,
    view: &str,
    columns: &[(&str, bool)],
) -> Option<Vec<String>> {
    let rows = weir.rows(view).await?;
    let mut out: Vec<String> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|(c, _)| canonical(r.get(*c)))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    out.sort();
    Some(out)
}

/// The sink table's rows, in the same canonical text.
async fn table_rows(
    db: &tokio_postgres::Client,
    table: &str,
    columns: &[(&str, bool)],
) -> Option<Vec<String>> {
    let select = columns
        .iter()
        .map(|(c, ts)| {
            if *ts {
                format!("to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
            } else {
                format!("{c}::text")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let rows = db
        .query(&format!("SELECT {select} FROM {table}"), &[])
        .await
        .ok()?;
    let mut out: Vec<String> = rows
        .iter()
        .map(|r| {
            (0..columns.len())
                .map(|i| match r.get::<_, Option<String>>(i) {
                    None => "NULL".into(),
                    Some(text) => match (columns[i].1, text.parse::<f64>()) {
                        (false, Ok(f)) if columns[i].0 != "terminal_id" => format!("{f:.6}"),
                        _ => text,
                    },
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    out.sort();
    Some(out)
}

fn message(i: usize) -> (String, String) {
    let terminal = format!("T{}", i % TERMINALS);
    // a battery that dips under 20 now and then, a latency that varies
    let battery = 5.0 + ((i * 7) % 90) as f64;
    (
        format!("terminals/{terminal}/telemetry"),
        event(T0 + i as i64 * 250, battery, Some((i % 13) as f64 * 3.5)),
    )
}

fn config(dir: &std::path::Path, pg: &Postgres) -> std::path::PathBuf {
    let path = dir.join("weir.toml");
    std::fs::write(
        &path,
        format!(
            "[[connections]]\nname = \"warehouse\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_env = \"WEIR_TEST_WAREHOUSE_PASSWORD\"\ntls = \"disable\"\n",
            pg.url("backoffice")
        ),
    )
    .expect("config");
    path
}

fn spawn_spec(dir: &std::path::Path, port: u16, pg: &Postgres) -> Spawn {
    let mut spec = Spawn::embedded(dir, port, PIPELINE)
        .env("WEIR_STORAGE__CHECKPOINT_INTERVAL", "1s")
        .env("WEIR_STORAGE__VIEW_RETENTION", "3650 days")
        .env("WEIR_TEST_WAREHOUSE_PASSWORD", PASSWORD);
    spec.config = Some(config(dir, pg));
    spec
}

async fn sink_report(weir: &WeirProcess) -> Option<Vec<Value>> {
    let (status, body) = weir.try_get("/api/v1/sinks").await?;
    (status == 200).then(|| body["sinks"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_tables_equal_the_views_through_kill_9_and_a_postgres_outage() {
    let pg = Postgres::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let spec = spawn_spec(root.path(), port, &pg);
    let mut weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;

    let all: Vec<(String, String)> = (0..MESSAGES).map(message).collect();
    let publisher = tokio::spawn(async move {
        publish_through_restarts(port, "terminal-fleet", all, Duration::from_millis(3)).await;
    });

    // SIGKILL once rows have reached Postgres and more are on the way.
    wait_for("rows delivered to Postgres before the kill", || async {
        let sinks = sink_report(&weir).await?;
        let written: u64 = sinks
            .iter()
            .filter_map(|s| s["rows_written"].as_u64())
            .sum();
        (written > 0).then_some(())
    })
    .await;
    weir.kill9();
    weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;

    // Postgres goes away mid-stream and comes back: ingestion goes on,
    // the sinks say so, and catch up.
    pg.stop_server();
    let error = wait_for("a sink to report its last error", || async {
        let sinks = sink_report(&weir).await?;
        sinks
            .iter()
            .find_map(|s| s["last_error"].as_str().map(str::to_string))
    })
    .await;
    assert!(!error.contains(PASSWORD), "{error}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.start_server();

    publisher.await.expect("publisher");
    // One event far ahead closes every window.
    publish(
        port,
        &[(
            "terminals/T0/telemetry",
            event(T0 + 3_600_000, 50.0, Some(1.0)),
        )],
        QoS::AtLeastOnce,
    )
    .await;

    let db = pg.backoffice().await;
    for (view, table, columns) in SINKS {
        let want = wait_for(&format!("view {view} to hold every event"), || async {
            if view != "latest" {
                return view_rows(&weir, view, columns)
                    .await
                    .filter(|r| !r.is_empty());
            }
            let rows = weir.rows(view).await?;
            let reports: u64 = rows.iter().filter_map(|r| r["reports"].as_u64()).sum();
            (reports == MESSAGES as u64 + 1).then_some(())?;
            view_rows(&weir, view, columns).await
        })
        .await;
        let deadline = tokio::time::Instant::now() + common::DEADLINE;
        let got = loop {
            let got = table_rows(&db, table, columns).await.unwrap_or_default();
            if got == want || tokio::time::Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (w, g): (BTreeSet<_>, BTreeSet<_>) = (want.iter().collect(), got.iter().collect());
        let missing: Vec<_> = w.difference(&g).take(5).collect();
        let extra: Vec<_> = g.difference(&w).take(5).collect();
        assert!(
            got == want,
            "{table}: {} rows, the view {}; missing {missing:?}, not in the view {extra:?}",
            got.len(),
            want.len()
        );
    }
    // caught up: no lag, no error
    let sinks = wait_for("the sinks to catch up", || async {
        let sinks = sink_report(&weir).await?;
        sinks
            .iter()
            .all(|s| s["lag_rows"] == 0 && s["last_error"].is_null())
            .then_some(sinks)
    })
    .await;
    assert_eq!(sinks.len(), 3);
    let metrics = weir
        .try_get("/metrics")
        .await
        .map(|(_, b)| b.as_str().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(
        metrics.contains("weir_sink_lag_rows{sink=\"low_pg\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("weir_sink_rows_written_total{sink=\"health_pg\"}"));
    let status = weir.terminate().await;
    assert!(status.success());
    let log = std::fs::read_to_string(root.path().join("weir.log")).unwrap_or_default();
    assert!(
        log.contains("sink cannot deliver"),
        "the outage is not in the log"
    );
    assert!(!log.contains(PASSWORD), "the log shows the password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_does_not_fit_is_refused_and_left_alone() {
    let pg = Postgres::start().await;
    let db = pg.backoffice().await;
    db.batch_execute(
        "CREATE SCHEMA analytics;
         CREATE TABLE analytics.latest (terminal_id text PRIMARY KEY, battery integer, reports bigint);",
    )
    .await
    .expect("an unfit table");
    let root = tempfile::tempdir().expect("tempdir");
    let spec = spawn_spec(root.path(), free_port(), &pg);

    // weir check names the column
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["check", "--config"])
        .arg(spec.config.as_ref().expect("config"))
        .arg("--pipelines")
        .arg(root.path().join("pipelines"))
        .env("WEIR_TEST_WAREHOUSE_PASSWORD", PASSWORD)
        .output()
        .expect("weir check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "weir check accepted an unfit table");
    assert!(
        stderr.contains("sink latest_pg") && stderr.contains("column battery is integer"),
        "{stderr}"
    );

    // start-up refuses it too, and the table is left as it was
    let weir = WeirProcess::spawn(&spec);
    let status = weir.wait_exit().await;
    assert!(!status.success());
    let log = std::fs::read_to_string(root.path().join("weir.log")).unwrap_or_default();
    assert!(log.contains("column battery is integer"), "{log}");
    let columns: Vec<String> = db
        .query(
            "SELECT column_name::text || ' ' || data_type::text FROM information_schema.columns
             WHERE table_schema = 'analytics' AND table_name = 'latest' ORDER BY ordinal_position",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        columns,
        ["terminal_id text", "battery integer", "reports bigint"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_rules_records_follow_their_lifecycle_into_postgres() {
    let pg = Postgres::start().await;
    let rules = "
CREATE ALERT battery_flat WITH (severity = 'critical', clear = 'battery_pct >= 20')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 5;

CREATE SINK battery_flat_pg FROM battery_flat
WITH (connector = 'postgres', connection = 'warehouse', table = 'ops.alerts');
";
    let pipeline = common::battery_pipeline("1 hour", rules);
    let connection = pg.connection("warehouse");
    let weir = common::Weir::start_tweaked(&[("p.sql", &pipeline)], None, |c| {
        c.connections.push(connection);
    })
    .await;
    let db = pg.backoffice().await;
    let row = |state: &'static str| {
        let db = &db;
        move || async move {
            let rows = db
                .query(
                    "SELECT id, key, severity, state, acked, fired_by::jsonb ->> 'battery_pct'
                     FROM ops.alerts",
                    &[],
                )
                .await
                .ok()?;
            let r = rows.first()?;
            (rows.len() == 1 && r.get::<_, String>(3) == state).then(|| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, bool>(4),
                    r.get::<_, Option<String>>(5),
                )
            })
        }
    };
    // fires
    weir.publish(&[("terminals/t1/telemetry", event(T0, 3.0, None))])
        .await;
    let (id, key, severity, acked, fired_by) =
        wait_for("the firing alert in Postgres", row("firing")).await;
    assert_eq!(
        (key.as_str(), severity.as_str(), acked),
        ("t1", "critical", false)
    );
    assert_eq!(fired_by.as_deref(), Some("3.0"));
    // acknowledged through the API
    let (status, body) = weir.post(&format!("/api/v1/alerts/{id}/ack"), "").await;
    assert_eq!(status, 200, "{body}");
    wait_for("the ack in Postgres", || async {
        let r = row("firing")().await?;
        r.3.then_some(())
    })
    .await;
    // resolves: the same row, by id
    weir.publish(&[("terminals/t1/telemetry", event(T0 + 10_000, 50.0, None))])
        .await;
    let (again, ..) = wait_for("the resolved alert in Postgres", row("resolved")).await;
    assert_eq!(again, id);
    weir.stop().await;
}
