//! weir against a Mosquitto the test starts: values arrive, and after the
//! broker restarts (losing every session) weir reconnects, subscribes again
//! and keeps counting.

use crate::common;

use common::*;
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mosquitto_with_restart() {
    let port = free_port();
    let mosquitto = Mosquitto::start(port).await;
    let weir = Weir::start_with(
        &[("telemetry.sql", TELEMETRY)],
        Some(format!("mqtt://127.0.0.1:{port}")),
    )
    .await;

    publish(
        port,
        &[
            (
                "terminals/M1/telemetry",
                event(T0 + 1_000, 60.0, Some(20.0)),
            ),
            (
                "terminals/M1/telemetry",
                event(T0 + 2_000, 55.0, Some(40.0)),
            ),
            ("terminals/M2/telemetry", event(T0 + 3_000, 12.0, None)),
        ],
        QoS::AtLeastOnce,
    )
    .await;
    let latest = weir.wait_rows("latest", 2).await;
    assert_eq!(row_with(&latest, "terminal_id", "M1")["reports"], 2);
    assert_eq!(row_with(&latest, "terminal_id", "M1")["battery_pct"], 55.0);

    // The broker goes away and comes back empty: no session, no subscriptions.
    drop(mosquitto);
    wait_for("weir to notice the broker is gone", || async {
        let (status, _) = weir.get("/readyz").await;
        (status == 503).then_some(())
    })
    .await;
    let _mosquitto = Mosquitto::start(port).await;
    weir.wait_ready().await;

    publish(
        port,
        &[
            (
                "terminals/M1/telemetry",
                event(T0 + 61_000, 50.0, Some(60.0)),
            ),
            ("terminals/M2/telemetry", event(T0 + 70_000, 11.0, None)),
        ],
        QoS::AtLeastOnce,
    )
    .await;
    // (the two messages may land in two micro-batches: wait for both)
    wait_for("both messages after the broker restart", || async {
        let rows = weir.rows("latest").await;
        let reports = |t: &str| {
            rows.iter()
                .find(|r| r["terminal_id"] == t)
                .map(|r| r["reports"].clone())
        };
        (reports("M1")? == 3 && reports("M2")? == 2).then_some(())
    })
    .await;
    // the watermark (70 s - 5 s) closed the first minute
    let health = weir.wait_rows("health_1m", 2).await;
    assert_eq!(
        row_with(&health, "terminal_id", "M1")["avg_latency_ms"],
        30.0
    );
    assert_eq!(row_with(&health, "terminal_id", "M2")["min_battery"], 12.0);
    let metrics = weir.metrics().await;
    assert!(
        !metrics.contains("weir_mqtt_reconnects_total 0"),
        "{metrics}"
    );
    weir.stop().await;
}
