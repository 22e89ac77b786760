//! Changing pipelines while weir runs: a saved file is reloaded without a
//! restart. A changed view and its downstream are rebuilt from the log,
//! exact; a new view is backfilled; an unchanged one keeps its rows, nothing
//! doubled; a removed one stops; a broken file changes nothing and says
//! where it is broken; a changed stream is refused with the reason. An MQTT
//! client connected throughout never reconnects, and a restart afterwards
//! keeps everything as the reload left it.

use crate::common;

use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// TELEMETRY (health_1m, latest, low_battery) with low_battery's threshold,
/// plus a windowed view over low_battery.
fn pipeline(threshold: u32) -> String {
    TELEMETRY.replace(
        "WHERE battery_pct < 20",
        &format!("WHERE battery_pct < {threshold}"),
    ) + "
CREATE VIEW low_per_minute AS
SELECT terminal_id, count(*) AS readings FROM low_battery
GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);
"
}

/// The edit: low_battery's threshold up, latest removed, readings added.
fn edited() -> String {
    let without_latest = pipeline(50).replace(
        "CREATE VIEW latest AS
SELECT terminal_id, last_value(battery_pct) AS battery_pct, count(*) AS reports
FROM telemetry
GROUP BY terminal_id;",
        "",
    );
    without_latest
        + "
-- Readings per terminal.
CREATE VIEW readings AS
SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id;
"
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

async fn pipelines(weir: &Weir) -> Value {
    weir.get_ok("/api/v1/pipelines").await
}

/// Waits for a reload after `before` (the previous `last_reload.at`).
async fn next_reload(weir: &Weir, before: &Value) -> Value {
    wait_for("the pipelines to be reloaded", || async {
        let p = pipelines(weir).await;
        (p["last_reload"]["at"] != *before && p["last_reload"]["trigger"] != "start").then_some(p)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_file_is_applied_without_a_restart() {
    assert_ne!(edited(), pipeline(50), "the edit removes latest");
    let weir = Weir::start_tweaked(&[("telemetry.sql", &pipeline(20))], None, |c| {
        // a removed view's rows go 2 s after it is removed
        c.pipelines.removed_retention = Duration::from_secs(2);
        c.storage.housekeeping_interval = Duration::from_millis(200);
    })
    .await;
    let stored_rows = |weir: &Weir, view: &str| {
        weir.running
            .as_ref()
            .expect("running")
            .state
            .store
            .count_rows(view)
            .expect("count rows")
    };
    let start = pipelines(&weir).await;
    assert_eq!(start["status"], "ok", "{start}");
    assert_eq!(start["last_reload"]["trigger"], "start");

    // An MQTT client connected throughout: it must never reconnect.
    let mut options = MqttOptions::new("watcher-1", "127.0.0.1", weir.broker_port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .subscribe("weir/alerts/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let connacks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connacks.clone();
    let watcher = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });

    weir.publish(&[
        ("terminals/A/telemetry", event(T0 + 1_000, 80.0, Some(10.0))),
        ("terminals/A/telemetry", event(T0 + 2_000, 30.0, Some(30.0))),
        ("terminals/A/telemetry", event(T0 + 3_000, 10.0, None)),
        ("terminals/B/telemetry", event(T0 + 4_000, 45.0, None)),
        // closes the first minute
        ("terminals/B/telemetry", event(T0 + 70_000, 90.0, None)),
    ])
    .await;
    weir.wait_rows("health_1m", 2).await;
    weir.wait_rows("low_per_minute", 1).await;
    let health_before = weir.rows("health_1m").await;
    assert_eq!(weir.rows("low_battery").await.len(), 1);
    weir.wait_rows("latest", 2).await;

    // Save the edit: the watcher applies it.
    let file = weir.dir.path().join("pipelines/telemetry.sql");
    std::fs::write(&file, edited()).expect("save the edit");
    let p = next_reload(&weir, &start["last_reload"]["at"]).await;
    let r = &p["last_reload"];
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(r["trigger"], "watch", "{p}");
    assert_eq!(r["applied"], true, "{p}");
    assert_eq!(names(&r["new"]), vec!["readings"], "{p}");
    assert_eq!(names(&r["changed"]), vec!["low_battery"], "{p}");
    assert_eq!(
        names(&r["rebuilt"]),
        vec!["low_battery", "low_per_minute"],
        "{p}"
    );
    assert_eq!(names(&r["removed"]), vec!["latest"], "{p}");
    assert_eq!(names(&r["kept"]), vec!["health_1m"], "{p}");

    // Rebuilt from the log, exact.
    let mut low: Vec<f64> = weir
        .rows("low_battery")
        .await
        .iter()
        .filter_map(|r| r["battery_pct"].as_f64())
        .collect();
    low.sort_by(f64::total_cmp);
    assert_eq!(low, vec![10.0, 30.0, 45.0]);
    let per_minute = weir.rows("low_per_minute").await;
    assert_eq!(row_with(&per_minute, "terminal_id", "A")["readings"], 2);
    assert_eq!(row_with(&per_minute, "terminal_id", "B")["readings"], 1);
    // Backfilled, exact.
    let readings = weir.rows("readings").await;
    assert_eq!(row_with(&readings, "terminal_id", "A")["n"], 3);
    assert_eq!(row_with(&readings, "terminal_id", "B")["n"], 2);
    // Kept: the same rows.
    assert_eq!(weir.rows("health_1m").await, health_before);
    // Removed: no longer served, and its rows go after removed_retention.
    let (status, _) = weir.get("/api/v1/views/latest/rows").await;
    assert_eq!(status, 404);
    wait_for("the removed view's rows to be dropped", || async {
        (stored_rows(&weir, "latest") == 0).then_some(())
    })
    .await;
    assert_eq!(
        stored_rows(&weir, "health_1m"),
        2,
        "a kept view keeps its rows"
    );

    // New data reaches every view once.
    weir.publish(&[
        ("terminals/A/telemetry", event(T0 + 71_000, 40.0, None)),
        ("terminals/A/telemetry", event(T0 + 130_000, 95.0, None)),
    ])
    .await;
    let readings = wait_for("readings to count the new data", || async {
        let rows = weir.rows("readings").await;
        (row_with(&rows, "terminal_id", "A")["n"] == 5).then_some(rows)
    })
    .await;
    assert_eq!(row_with(&readings, "terminal_id", "B")["n"], 2);
    let health = weir.wait_rows("health_1m", 4).await;
    let minute_2: Vec<&Value> = health
        .iter()
        .filter(|r| r["window_start"] == weir::obs::format_time(T0 + 60_000))
        .collect();
    let samples: u64 = minute_2.iter().filter_map(|r| r["samples"].as_u64()).sum();
    assert_eq!(samples, 2, "minute 2 counted once: {health:?}");

    // A broken file: nothing changes; the error says where.
    let before = pipelines(&weir).await;
    std::fs::write(
        &file,
        edited().replace(
            "count(*) AS n FROM telemetry",
            "count(* AS n FROM telemetry",
        ),
    )
    .expect("save a broken file");
    let p = next_reload(&weir, &before["last_reload"]["at"]).await;
    assert_eq!(p["status"], "error", "{p}");
    assert_eq!(p["last_reload"]["applied"], false, "{p}");
    let error = &p["errors"][0];
    assert!(
        error["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("telemetry.sql")),
        "{p}"
    );
    assert!(error["line"].as_u64().is_some_and(|l| l > 1), "{p}");
    weir.publish(&[("terminals/B/telemetry", event(T0 + 131_000, 50.0, None))])
        .await;
    wait_for("readings still running", || async {
        let rows = weir.rows("readings").await;
        (row_with(&rows, "terminal_id", "B")["n"] == 3).then_some(())
    })
    .await;

    // Fixed again, and reloaded through the API with nothing to do.
    std::fs::write(&file, edited()).expect("fix the file");
    let before = pipelines(&weir).await;
    let p = next_reload(&weir, &before["last_reload"]["at"]).await;
    assert_eq!(p["status"], "ok", "{p}");
    let (status, p) = weir.post("/api/v1/pipelines/reload", "{}").await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["last_reload"]["trigger"], "api");
    assert_eq!(p["last_reload"]["applied"], true);
    assert_eq!(names(&p["last_reload"]["kept"]).len(), 4, "{p}");
    assert!(names(&p["last_reload"]["rebuilt"]).is_empty(), "{p}");

    // A changed stream is refused, with the reason; the views go on.
    std::fs::write(
        &file,
        edited().replace(
            "app_latency_ms DOUBLE,",
            "app_latency_ms DOUBLE, extra TEXT,",
        ),
    )
    .expect("change the stream");
    let p = wait_for("the stream change to be refused", || async {
        let p = pipelines(&weir).await;
        (p["status"] == "error").then_some(p)
    })
    .await;
    assert!(
        p["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stream telemetry changed")),
        "{p}"
    );
    std::fs::write(&file, edited()).expect("undo the stream change");
    wait_for("the files to plan again", || async {
        (pipelines(&weir).await["status"] == "ok").then_some(())
    })
    .await;

    assert_eq!(
        connacks.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the MQTT client reconnected"
    );
    watcher.abort();

    // A restart keeps what the reload built.
    let readings = weir.rows("readings").await;
    let low = weir.rows("low_battery").await;
    let dir = weir.stop().await;
    let weir = Weir::start_in(dir, None).await;
    let p = pipelines(&weir).await;
    assert_eq!(names(&p["last_reload"]["kept"]).len(), 4, "{p}");
    assert_eq!(weir.rows("readings").await, readings);
    assert_eq!(weir.rows("low_battery").await, low);
    weir.stop().await;
}

/// `POST /api/v1/pipelines/preview`.
async fn preview(weir: &Weir, sql: &str, from: &str) -> (u16, Value) {
    let body = serde_json::json!({"sql": sql, "from": from}).to_string();
    weir.post("/api/v1/pipelines/preview", &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_runs_a_view_over_recent_events_and_stores_nothing() {
    let weir = Weir::start(&[("telemetry.sql", &pipeline(20))]).await;
    weir.publish(&[
        ("terminals/A/telemetry", event(T0 + 1_000, 80.0, None)),
        ("terminals/A/telemetry", event(T0 + 2_000, 30.0, None)),
        ("terminals/A/telemetry", event(T0 + 3_000, 10.0, None)),
        ("terminals/B/telemetry", event(T0 + 4_000, 45.0, None)),
        ("terminals/B/telemetry", event(T0 + 70_000, 90.0, None)),
    ])
    .await;
    weir.wait_rows("health_1m", 2).await;

    // The same SQL as a running view gives that view's rows, in its order.
    let health_sql = TELEMETRY
        .split("CREATE VIEW health_1m AS")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("health_1m's SELECT");
    let (status, p) = preview(
        &weir,
        &format!("CREATE VIEW health_again AS{health_sql}"),
        "-1h",
    )
    .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        p["rows"].as_array().cloned().unwrap_or_default(),
        weir.rows("health_1m").await,
        "{p}"
    );

    // A windowed view: the windows the watermark closes, exact.
    let windowed = "CREATE VIEW per_minute AS\nSELECT terminal_id, count(*) AS n, min(battery_pct) AS low\nFROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE)";
    let (status, p) = preview(&weir, windowed, "-1h").await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["view"], "per_minute");
    assert_eq!(p["events"], 5, "{p}");
    let rows = p["rows"].as_array().expect("rows").clone();
    assert_eq!(rows.len(), 2, "minute 1 of A and B; minute 2 is open: {p}");
    assert_eq!(row_with(&rows, "terminal_id", "A")["n"], 3);
    assert_eq!(row_with(&rows, "terminal_id", "A")["low"], 10.0);
    assert_eq!(row_with(&rows, "terminal_id", "B")["n"], 1);
    let columns: Vec<&str> = p["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(
        columns,
        vec!["window_start", "window_end", "terminal_id", "n", "low"]
    );

    // A view over a running view; an updating view gives one row per key.
    let (status, p) = preview(
        &weir,
        "CREATE VIEW low_count AS SELECT terminal_id, count(*) AS n FROM low_battery GROUP BY terminal_id",
        "-1h",
    )
    .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        p["rows"],
        serde_json::json!([{"terminal_id": "A", "n": 1}]),
        "{p}"
    );

    // Only events that arrived since `from`.
    let (_, p) = preview(
        &weir,
        windowed,
        &weir::obs::format_time(weir::obs::now_ms() + 60_000),
    )
    .await;
    assert_eq!(p["events"], 0, "{p}");

    // Nothing stored, nothing running changed.
    let (status, _) = weir.get("/api/v1/views/per_minute/rows").await;
    assert_eq!(status, 404);
    let views = weir.get_ok("/api/v1/views").await;
    assert_eq!(views["items"].as_array().map(Vec::len), Some(4), "{views}");

    // Errors: line and cause; one statement only; a bad body.
    let (status, p) = preview(
        &weir,
        "CREATE VIEW bad AS\nSELECT nope\nFROM telemetry",
        "-1h",
    )
    .await;
    assert_eq!(status, 400, "{p}");
    assert_eq!(p["error"]["code"], "bad_pipeline");
    assert_eq!(p["errors"][0]["line"], 2, "{p}");
    assert!(
        p["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{p}"
    );
    let (status, p) = preview(
        &weir,
        "CREATE TABLE x (a TEXT) WITH (connector = 'mqtt', topic = 'x')",
        "-1h",
    )
    .await;
    assert_eq!(status, 400, "{p}");
    let (status, p) = preview(&weir, windowed, "yesterday").await;
    assert_eq!(status, 400, "{p}");
    let (status, p) = weir
        .post("/api/v1/pipelines/preview", r#"{"sql": 1}"#)
        .await;
    assert_eq!(status, 400, "{p}");

    // `weir preview FILE` while weir runs asks it over HTTP.
    let file = weir.dir.path().join("per_minute.sql");
    std::fs::write(&file, windowed).expect("write the view");
    let cli = |dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["preview"])
            .arg(&file)
            .args(["--from", "-1h"])
            .current_dir(dir)
            .env("WEIR_STORAGE__DIR", dir.join("data"))
            .env("WEIR_PIPELINES__DIR", dir.join("pipelines"))
            .env("WEIR_HTTP__LISTEN", weir.base.trim_start_matches("http://"))
            .output()
            .expect("run weir preview")
    };
    let out = cli(weir.dir.path());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(r#""terminal_id":"A","n":3"#), "{text}");
    // and with weir stopped it reads the log itself
    let dir = weir.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["preview"])
        .arg(&file)
        .args(["--from", "-1h"])
        .current_dir(dir.path())
        .env("WEIR_STORAGE__DIR", dir.path().join("data"))
        .env("WEIR_PIPELINES__DIR", dir.path().join("pipelines"))
        .output()
        .expect("run weir preview");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("view per_minute (windowed): 2 rows"),
        "{text}"
    );
    assert!(text.contains(r#""terminal_id":"B","n":1"#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_same_process() {
    let edited = edited_weir(false, &[]).await;
    let pid = edited.weir.pid();
    edited.sighup();
    let Held { mut weir, _dir, .. } = edited;
    applied_reload(&weir, "signal").await;
    let rows = weir.rows("low_battery").await.expect("rows");
    assert_eq!(rows.len(), 2, "rebuilt with the new threshold: {rows:?}");
    assert!(weir.running(), "the same process goes on");
    assert_eq!(weir.pid(), pid);
    weir.terminate().await;
}

/// Waits for a reload by `trigger` to be recorded, and checks that it
/// applied the edit of [`edited_weir`] (low_battery changed); its status.
async fn applied_reload(weir: &common::process::WeirProcess, trigger: &str) -> Value {
    let status = wait_for(&format!("the {trigger} reload to be recorded"), || async {
        let (_, p) = weir.try_get("/api/v1/pipelines").await?;
        (p["last_reload"]["trigger"] == trigger).then_some(p)
    })
    .await;
    assert_eq!(status["last_reload"]["applied"], true, "{status}");
    assert_eq!(
        names(&status["last_reload"]["changed"]),
        vec!["low_battery"],
        "{status}"
    );
    status
}

/// A weir (child process, the folder not watched: only a signal or the API
/// reloads) after A's readings at 10 % and 40 % (low_battery holds the
/// first), with the file edited to a threshold of 50 and not yet reloaded.
/// Held (`held`), its reload backfills wait for `release` to exist
/// (`WEIR_TEST_HOLD_BACKFILL`).
struct Held {
    weir: common::process::WeirProcess,
    spec: common::process::Spawn,
    release: std::path::PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

async fn held(env: &[(&str, &str)]) -> Held {
    edited_weir(true, env).await
}

async fn edited_weir(hold: bool, env: &[(&str, &str)]) -> Held {
    use common::process::{Spawn, WeirProcess};
    let dir = tempfile::tempdir().expect("temp dir");
    let release = dir.path().join("release-backfill");
    let port = free_port();
    let mut spec =
        Spawn::embedded(dir.path(), port, &pipeline(20)).env("WEIR_PIPELINES__WATCH", "false");
    if hold {
        spec = spec.env("WEIR_TEST_HOLD_BACKFILL", &release.display().to_string());
    }
    for (k, v) in env {
        spec = spec.env(k, v);
    }
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;
    common::publish(
        port,
        &[
            ("terminals/A/telemetry", event(T0 + 1_000, 10.0, None)),
            ("terminals/A/telemetry", event(T0 + 2_000, 40.0, None)),
        ],
        QoS::AtLeastOnce,
    )
    .await;
    wait_for("low_battery to hold A's 10 %", || async {
        (weir.rows("low_battery").await?.len() == 1).then_some(())
    })
    .await;
    std::fs::write(dir.path().join("pipelines/p.sql"), pipeline(50)).expect("edit");
    Held {
        weir,
        spec,
        release,
        port,
        _dir: dir,
    }
}

impl Held {
    fn sighup(&self) {
        // SAFETY: kill(2) with our own child's pid and a signal number.
        let sent = unsafe { libc::kill(self.weir.pid() as i32, libc::SIGHUP) };
        assert_eq!(sent, 0, "SIGHUP sent");
    }

    /// SIGHUP, then until the held backfill has started; then B publishes
    /// a reading at 30 %.
    async fn reload_and_publish_b(&self) {
        self.sighup();
        wait_for("the backfill to start", || async {
            self.weir
                .log()
                .contains("backfilling new and changed views beside the running pipeline")
                .then_some(())
        })
        .await;
        common::publish(
            self.port,
            &[("terminals/B/telemetry", event(T0 + 3_000, 30.0, None))],
            QoS::AtLeastOnce,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingestion_goes_on_while_a_reload_backfills() {
    use common::process::WeirProcess;
    let held = held(&[]).await;
    held.reload_and_publish_b().await;
    let Held {
        weir,
        spec,
        release,
        _dir,
        ..
    } = held;
    // The backfill is held; events keep being counted by the kept view.
    wait_for("latest to count B while the backfill runs", || async {
        let rows = weir.rows("latest").await?;
        rows.iter().any(|r| r["terminal_id"] == "B").then_some(())
    })
    .await;
    let (_, status) = weir.try_get("/api/v1/pipelines").await.expect("status");
    assert!(
        status["last_reload"]["trigger"] != "signal",
        "the reload is not done while its backfill is held: {status}"
    );
    assert_eq!(status["reloading"]["trigger"], "signal", "{status}");
    assert_eq!(
        names(&status["reloading"]["rebuilding"]),
        vec!["low_battery", "low_per_minute"],
        "{status}"
    );
    std::fs::write(&release, "").expect("release");
    let status = applied_reload(&weir, "signal").await;
    assert!(status.get("reloading").is_none(), "{status}");
    // Rebuilt with the new threshold, B included: the event that came
    // during the backfill was caught up, once.
    let mut low: Vec<(String, f64)> = weir
        .rows("low_battery")
        .await
        .expect("rows")
        .iter()
        .filter_map(|r| {
            Some((
                r["terminal_id"].as_str()?.to_string(),
                r["battery_pct"].as_f64()?,
            ))
        })
        .collect();
    low.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    assert_eq!(
        low,
        vec![("A".into(), 10.0), ("A".into(), 40.0), ("B".into(), 30.0)]
    );
    // A restart finds the same, nothing doubled.
    weir.terminate().await;
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;
    let rows = weir.rows("low_battery").await.expect("rows");
    assert_eq!(rows.len(), 3, "{rows:?}");
    let latest = weir.rows("latest").await.expect("rows");
    assert_eq!(column_sum(&latest, "reports"), 3, "{latest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_reloads_backfill_rebuilds_at_the_next_start() {
    use common::process::WeirProcess;
    let held = held(&[("WEIR_STORAGE__CHECKPOINT_INTERVAL", "200ms")]).await;
    held.reload_and_publish_b().await;
    let Held {
        weir,
        spec,
        release,
        _dir,
        ..
    } = held;
    // Checkpoints go on while the backfill is held (without the view
    // being filled); then weir dies before the backfill is done.
    let taken = weir.metric("weir_checkpoints_total").await.unwrap_or(0.0);
    wait_for("a checkpoint during the backfill", || async {
        (weir.metric("weir_checkpoints_total").await? >= taken + 2.0).then_some(())
    })
    .await;
    weir.kill9();
    std::fs::write(&release, "").expect("release");
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;
    let rows = weir.rows("low_battery").await.expect("rows");
    let mut low: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["battery_pct"].as_f64())
        .collect();
    low.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    assert_eq!(
        low,
        vec![10.0, 30.0, 40.0],
        "rebuilt at the start: {rows:?}"
    );
    assert!(
        weir.log()
            .contains("view is new or changed since the checkpoint: it is rebuilt from the log"),
        "{}",
        weir.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_client_hung_up_is_applied_and_recorded() {
    let Held {
        weir,
        release,
        _dir,
        ..
    } = held(&[]).await;
    // The client gives up while the backfill is held.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let answer = impatient
        .post(format!("{}/api/v1/pipelines/reload", weir.base))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await;
    assert!(
        answer.is_err(),
        "the reload answered before its backfill: {answer:?}"
    );
    std::fs::write(&release, "").expect("release");
    // Applied, and weir knows it: status, lineage and the rebuilt rows.
    applied_reload(&weir, "api").await;
    let rows = weir.rows("low_battery").await.expect("rows");
    assert_eq!(rows.len(), 2, "rebuilt with the new threshold: {rows:?}");
}
