//! A failure on the pipeline thread is loud, never silent (DESIGN §4): a
//! message whose processing panics weir (here by fault injection, since no
//! known input does any more) makes weir stop with a non-zero exit and an
//! error in its log; the message is set aside as a dead letter, so the
//! restart does not fall on it again, and everything before and after it is
//! counted.

use crate::common;

use common::process::{Spawn, WeirProcess};
use common::*;
use rumqttc::QoS;

const PIPELINE: &str = "
CREATE TABLE telemetry (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json');

CREATE VIEW latest AS
SELECT terminal_id, count(*) AS reports FROM telemetry GROUP BY terminal_id;
";

fn reading(id: &str, s: i64) -> (String, String) {
    (
        format!("terminals/{id}/telemetry"),
        format!(r#"{{"ts": {}, "battery_pct": 50}}"#, T0 + s * 1000),
    )
}

async fn send(port: u16, messages: &[(String, String)]) {
    publish(port, messages, QoS::AtLeastOnce).await;
}

async fn reports(weir: &WeirProcess, id: &str) -> Option<u64> {
    let rows = weir.rows("latest").await?;
    rows.iter()
        .find(|r| r["terminal_id"] == id)
        .and_then(|r| r["reports"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_message_stops_weir_loudly_and_is_set_aside() {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let spec = Spawn::embedded(root.path(), port, PIPELINE).env("WEIR_TEST_PANIC_ON", "POISON");
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;
    send(port, &[reading("T1", 1), reading("T1", 2)]).await;
    wait_for("T1 counted", || async {
        (reports(&weir, "T1").await? == 2).then_some(())
    })
    .await;

    send(port, &[reading("POISON", 3)]).await;
    let log_dir = root.path().to_path_buf();
    let status = weir.wait_exit().await;
    assert!(!status.success(), "weir exits non-zero: {status:?}");
    let log = std::fs::read_to_string(log_dir.join("weir.log")).unwrap_or_default();
    assert!(
        log.contains("panicked") && log.contains("set aside"),
        "the log says why:\n{log}"
    );

    // Restarted with the fault still armed: replay does not meet it again.
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;
    let (_, dead) = weir
        .try_get("/api/v1/deadletter?reason=schema")
        .await
        .expect("deadletter");
    let items = dead["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{dead}");
    assert_eq!(items[0]["topic"], "terminals/POISON/telemetry");
    assert!(
        items[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("panicked")),
        "{dead}"
    );
    send(port, &[reading("T1", 4), reading("T2", 5)]).await;
    wait_for("T1 and T2 counted after the restart", || async {
        let t1 = reports(&weir, "T1").await?;
        let t2 = reports(&weir, "T2").await?;
        (t1 == 3 && t2 == 1).then_some(())
    })
    .await;
    assert_eq!(reports(&weir, "POISON").await, None);
    let status = weir.terminate().await;
    assert!(status.success(), "a clean stop exits 0: {status:?}");
}
