//! weir acknowledges QoS 1 messages itself (manual acks, after processing).
//! Mosquitto lets only 20 unacknowledged QoS 1 messages be in flight to a
//! subscriber, so if weir's acks did not flow, it would stop at 20 of 300.

use crate::common;

use common::*;
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_qos1_messages_all_arrive() {
    let port = free_port();
    let _mosquitto = Mosquitto::start(port).await;
    let weir = Weir::start_with(
        &[("telemetry.sql", TELEMETRY)],
        Some(format!("mqtt://127.0.0.1:{port}")),
    )
    .await;
    let messages: Vec<(&str, String)> = (0..300)
        .map(|i| ("terminals/Q1/telemetry", event(T0 + i * 100, 50.0, None)))
        .collect();
    publish(port, &messages, QoS::AtLeastOnce).await;
    wait_for("all 300 QoS 1 messages to be counted", || async {
        let rows = weir.rows("latest").await;
        (rows.first()?["reports"] == 300).then_some(())
    })
    .await;
    weir.stop().await;
}
