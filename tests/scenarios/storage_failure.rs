//! A full disk: weir stops acknowledging, says it is unhealthy, and loses
//! nothing. Its data directory is a small tmpfs; once that is full, appends
//! to the ingest log fail. Everything published after that stays
//! unacknowledged at the broker (Mosquitto, persistent session), so after
//! the disk is grown and weir restarted, every event is counted — once.
//!
//! Mounting needs root (CAP_SYS_ADMIN), which CI has; where the mount is not
//! allowed the test says so loudly and does nothing else.

use crate::common;

use common::process::{Spawn, WeirProcess};
use common::*;
use rumqttc::QoS;

const PIPELINE: &str = "
CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  note TEXT,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json', qos = 1, idle_timeout = '1h');

CREATE VIEW latest AS
SELECT terminal_id, count(*) AS reports FROM telemetry GROUP BY terminal_id;
";

/// 20 events with 4 KiB of incompressible text each.
fn message(k: usize, seed: &mut u64) -> String {
    let events: Vec<String> = (0..20)
        .map(|e| {
            let note: String = (0..512)
                .map(|_| {
                    *seed ^= *seed << 13;
                    *seed ^= *seed >> 7;
                    *seed ^= *seed << 17;
                    format!("{:08x}", *seed as u32)
                })
                .collect();
            format!(
                r#"{{"ts": {}, "note": "{note}"}}"#,
                T0 + (k * 20 + e) as i64 * 10
            )
        })
        .collect();
    format!("[{}]", events.join(","))
}

async fn reports(weir: &WeirProcess) -> Option<u64> {
    Some(column_sum(&weir.rows("latest").await?, "reports"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acks_and_loses_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let Some(disk) = Tmpfs::mount(&data, "12m") else {
        eprintln!("SKIPPED a_full_disk_stops_acks_and_loses_nothing: cannot mount a tmpfs here (needs root)");
        return;
    };
    std::fs::create_dir_all(root.path().join("pipelines")).expect("mkdir");
    std::fs::write(root.path().join("pipelines/t.sql"), PIPELINE).expect("pipeline");
    let port = free_port();
    let _mosquitto = Mosquitto::start(port).await;
    // the readings' 4 KiB notes fill the disk fast; the default text limit is 1 KiB
    let spec =
        Spawn::new(root.path(), port, "weir-disk-full").env("WEIR_LIMITS__MAX_TEXT_BYTES", "8192");
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;

    // Publish until weir reports that it cannot store.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut sent = 0usize;
    loop {
        let batch: Vec<String> = (sent..sent + 10).map(|k| message(k, &mut seed)).collect();
        let messages: Vec<(&str, String)> = batch
            .into_iter()
            .map(|p| ("terminals/T1/telemetry", p))
            .collect();
        publish(port, &messages, QoS::AtLeastOnce).await;
        sent += 10;
        let (status, body) = weir.try_get("/healthz").await.expect("healthz");
        if status == 503 {
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("ingest log"), "{body}");
            break;
        }
        assert!(sent < 2_000, "12 MiB never filled up:\n{}", weir.log());
    }
    assert_eq!(weir.metric("weir_store_healthy").await, Some(0.0));
    let (status, _) = weir.try_get("/readyz").await.expect("readyz");
    assert_eq!(status, 503, "not ready while the store refuses writes");

    // More arrives while the disk is full.
    let more: Vec<(&str, String)> = (sent..sent + 10)
        .map(|k| ("terminals/T1/telemetry", message(k, &mut seed)))
        .collect();
    publish(port, &more, QoS::AtLeastOnce).await;
    sent += 10;
    let counted_while_full = reports(&weir).await.unwrap_or(0);
    assert!(
        counted_while_full < (sent * 20) as u64,
        "weir counted everything although it could not store it"
    );

    // Room again, and a restart: everything the broker still held comes back.
    disk.grow("256m");
    weir.kill9();
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;
    let total = (sent * 20) as u64;
    wait_for("every event to be counted after the restart", || async {
        (reports(&weir).await? >= total).then_some(())
    })
    .await;
    assert_eq!(reports(&weir).await, Some(total), "{}", weir.log());
}
