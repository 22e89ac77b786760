//! The dashboard in a real browser: weir runs the shipped pipelines, a
//! terminal publishes telemetry, another connects with a last will; headless
//! Chromium (driven by playwright-core, tests/dashboard/check.cjs) checks
//! that the fleet shows the terminal and its battery, that the offline alert
//! appears without a reload when the second terminal's connection drops, and
//! that ack works. Screenshots of each tab go to target/dashboard-screenshots.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// node, playwright-core and chromium, or why not (a failure on CI).
fn tools() -> Option<(PathBuf, PathBuf)> {
    let which = |name: &str| {
        Command::new("which")
            .arg(name)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    };
    let modules = root().join("target/npm/node_modules");
    let found = match (which("node"), which("chromium")) {
        (Some(_), Some(chromium)) if modules.join("playwright-core").is_dir() => {
            Some((modules, chromium))
        }
        _ => None,
    };
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "node, chromium or playwright-core missing on CI (scripts/test installs them)"
        );
        eprintln!("node, chromium or playwright-core missing: skipping the browser test");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_and_a_live_offline_alert_that_can_be_acked() {
    let Some((modules, chromium)) = tools() else {
        return;
    };
    let shipped: Vec<(String, String)> = std::fs::read_dir(root().join("config/pipelines"))
        .expect("shipped pipelines")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .map(|p| {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("p.sql")
                .to_string();
            (name, std::fs::read_to_string(&p).expect("read"))
        })
        .collect();
    let files: Vec<(&str, &str)> = shipped
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    // weir with an API token: the page asks for it and keeps it in the tab
    let token = weir::auth::http::new_token();
    let entry = weir::auth::http::TokenConfig {
        name: "dashboard".into(),
        token_sha256: weir::auth::http::token_digest(&token),
        scopes: vec![
            weir::auth::http::Scope::Read,
            weir::auth::http::Scope::Ack,
            weir::auth::http::Scope::Query,
        ],
    };
    let weir = Weir::start_tweaked(&files, None, |c| c.http.tokens = vec![entry]).await;
    // the page and its files hold no data and load without the token; data does not
    let http = reqwest::Client::new();
    for (path, status) in [
        ("/", 200),
        ("/ui/app.js", 200),
        ("/ui/uPlot.iife.min.js", 200),
        ("/api/v1/fleet", 401),
    ] {
        let got = http
            .get(format!("{}{path}", weir.base))
            .send()
            .await
            .expect("GET")
            .status();
        assert_eq!(got.as_u16(), status, "{path}");
    }
    let with_token = |path: &str| {
        http.get(format!("{}{path}", weir.base))
            .bearer_auth(&token)
            .send()
    };
    for (path, status) in [
        ("/api/v1/fleet/terminals?limit=5", 200),
        ("/api/v1/fleet/terminals?search=", 200),
        ("/api/v1/fleet/terminals?limit=999999", 400),
        ("/api/v1/fleet/terminals?cursor=zz", 400),
        ("/api/v1/fleet/terminals?color=red", 400),
        ("/ui/../Cargo.toml", 404),
        ("/ui/nothing.js", 404),
    ] {
        let got = with_token(path).await.expect("GET").status();
        assert_eq!(got.as_u16(), status, "{path}");
    }
    let long = "x".repeat(300);
    let got = with_token(&format!("/api/v1/fleet/terminals?search={long}"))
        .await
        .expect("GET");
    assert_eq!(got.status().as_u16(), 400, "a search of 300 bytes");

    let now = weir::obs::now_ms();
    // three minutes of T1's history, so that its chart has closed minutes
    let mut history: Vec<(String, String)> = [(180, 31.0, 110), (120, 22.0, 180), (60, 14.0, 240)]
        .iter()
        .map(|(ago, battery, latency)| {
            let ts = now - ago * 1000;
            (
                "terminals/T1/telemetry".to_string(),
                format!(r#"{{"ts": {ts}, "merchant_id": "M1", "battery_pct": {battery}, "app_latency_ms": {latency}, "network": "wifi", "app_version": "2.4.1"}}"#),
            )
        })
        .collect();
    weir.publish(&history).await;
    history.clear();
    weir.publish(&[
        (
            "terminals/T1/telemetry",
            format!(r#"{{"ts": {now}, "merchant_id": "M1", "battery_pct": 12.5, "app_latency_ms": 120, "network": "wifi", "app_version": "2.4.1"}}"#),
        ),
        (
            "terminals/T7/telemetry",
            format!(r#"{{"ts": {now}, "merchant_id": "M2", "battery_pct": 80, "network": "cellular"}}"#),
        ),
    ])
    .await;

    // and one message that is not JSON: a dead letter to browse
    weir.publish(&[("terminals/T1/telemetry", "this is not JSON".to_string())])
        .await;

    // T7 connects with a last will, as the shipped terminal_status stream expects.
    let mut options = MqttOptions::new("terminal-T7", "127.0.0.1", weir.broker_port);
    options.set_last_will(LastWill::new(
        "terminals/T7/status",
        r#"{"state": "offline"}"#,
        QoS::AtLeastOnce,
        false,
    ));
    let (t7, mut t7_loop) = AsyncClient::new(options, 16);
    let mut t7 = Some(t7);
    t7.as_ref()
        .expect("client")
        .publish(
            "terminals/T7/status",
            QoS::AtLeastOnce,
            true,
            r#"{"state": "online"}"#,
        )
        .await
        .expect("queue online");
    let (online_tx, online) = tokio::sync::oneshot::channel();
    let connection = tokio::spawn(async move {
        let mut online_tx = Some(online_tx);
        loop {
            match t7_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    if let Some(tx) = online_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("T7's connection ended: {e}");
                    break;
                }
            }
        }
    });
    tokio::time::timeout(DEADLINE, online)
        .await
        .expect("T7's online status acknowledged")
        .expect("T7's connection");
    wait_for("both terminals in terminal_latest", || async {
        let body: serde_json::Value = with_token("/api/v1/views/terminal_latest/rows")
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (body["items"].as_array()?.len() == 2).then_some(())
    })
    .await;

    let shots = root().join("target/dashboard-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshots dir");
    let mut node = Command::new("node")
        .arg(root().join("tests/dashboard/check.cjs"))
        .arg(&weir.base)
        .arg(&shots)
        .arg(&token)
        .env("NODE_PATH", &modules)
        .env("CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run node");
    let stdout = node.stdout.take().expect("stdout");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut metrics = None;
    let mut dropped = false;
    while let Some(line) = tokio::time::timeout(std::time::Duration::from_secs(120), lines.recv())
        .await
        .expect("the browser check went quiet")
    {
        if line == "READY" && !dropped {
            // The terminal's connection drops without a DISCONNECT: weir
            // publishes its will, the rule fires, the page must show it.
            connection.abort();
            t7.take();
            dropped = true;
        } else if let Some(m) = line.strip_prefix("METRICS ") {
            metrics = Some(m.to_string());
        }
    }
    let status = node.wait().expect("node exits");
    assert!(
        status.success(),
        "the browser check failed (its stderr says why)"
    );
    assert!(dropped, "the check never got to the Alerts tab");
    for tab in ["fleet", "terminal", "alerts", "engine", "sql", "docs"] {
        assert!(
            shots.join(format!("{tab}.png")).is_file(),
            "no screenshot of {tab}"
        );
    }
    eprintln!("dashboard: {}", metrics.unwrap_or_default());
    weir.stop().await;
}
