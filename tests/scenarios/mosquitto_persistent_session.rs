//! weir's persistent MQTT session across a weir restart and two broker
//! restarts (Mosquitto with persistence): what is published while weir is
//! down is queued by the broker for weir's session, survives the broker
//! restarting, and is counted once when weir is back; a broker restart
//! while weir runs loses nothing either.

use crate::common;

use common::*;
use rumqttc::QoS;

async fn reports(weir: &Weir) -> Option<u64> {
    Some(column_sum(&weir.rows("latest").await, "reports"))
}

async fn wait_reports(weir: &Weir, n: u64) {
    wait_for(&format!("{n} events counted"), || async {
        (reports(weir).await? >= n).then_some(())
    })
    .await;
    assert_eq!(reports(weir).await, Some(n), "events counted twice");
}

fn events(from: i64, to: i64) -> Vec<(&'static str, String)> {
    (from..to)
        .map(|i| {
            let topic = if i % 2 == 0 {
                "terminals/A/telemetry"
            } else {
                "terminals/B/telemetry"
            };
            (topic, event(T0 + i * 1_000, 40.0, Some(5.0)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_weir_and_broker_restarts() {
    let port = free_port();
    let broker = Some(format!("mqtt://127.0.0.1:{port}"));
    let saved = tempfile::tempdir().expect("tempdir");
    let mosquitto = Mosquitto::start_with(port, Some(saved.path())).await;

    let weir = Weir::start_with(&[("telemetry.sql", TELEMETRY)], broker.clone()).await;
    publish(port, &events(0, 10), QoS::AtLeastOnce).await;
    wait_reports(&weir, 10).await;

    // weir stops; the broker queues for its session, then restarts itself.
    let dir = weir.stop().await;
    publish(port, &events(10, 25), QoS::AtLeastOnce).await;
    mosquitto.terminate().await;
    let mosquitto = Mosquitto::start_with(port, Some(saved.path())).await;

    let weir = Weir::start_in(dir, broker.clone()).await;
    wait_reports(&weir, 25).await;

    // The broker restarts under a running weir, with a publish in between.
    mosquitto.terminate().await;
    wait_for("weir to notice the broker is gone", || async {
        let (status, _) = weir.get("/readyz").await;
        (status == 503).then_some(())
    })
    .await;
    let _mosquitto = Mosquitto::start_with(port, Some(saved.path())).await;
    weir.wait_ready().await;
    publish(port, &events(25, 40), QoS::AtLeastOnce).await;
    wait_reports(&weir, 40).await;
    weir.stop().await;
}
