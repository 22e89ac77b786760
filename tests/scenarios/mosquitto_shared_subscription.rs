//! An external broker with `mqtt.connections = 3`: weir opens three
//! connections on one shared subscription (`$share/weir/...`, Mosquitto 2),
//! each with its own in-flight window. Mosquitto spreads the messages over
//! them; each is acknowledged on the connection it came on, and every event
//! is counted exactly once.

use crate::common;

use common::process::metric_value;
use common::*;
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_connections_share_the_load_and_count_each_event_once() {
    let port = free_port();
    let _mosquitto = Mosquitto::start(port).await;
    let weir = Weir::start_tweaked(
        &[("telemetry.sql", TELEMETRY)],
        Some(format!("mqtt://127.0.0.1:{port}")),
        |c| c.mqtt.connections = 3,
    )
    .await;
    let metrics = weir.metrics().await;
    assert_eq!(
        metric_value(&metrics, "weir_mqtt_connected"),
        Some(3.0),
        "{metrics}"
    );

    let messages: Vec<(String, String)> = (0..600)
        .map(|i| {
            (
                format!("terminals/S{}/telemetry", i % 20),
                event(T0 + i as i64 * 10, 50.0, Some(10.0)),
            )
        })
        .collect();
    let refs: Vec<(&str, String)> = messages
        .iter()
        .map(|(t, p)| (t.as_str(), p.clone()))
        .collect();
    publish(port, &refs, QoS::AtLeastOnce).await;
    wait_for("600 events counted", || async {
        let rows = weir.rows("latest").await;
        (column_sum(&rows, "reports") >= 600).then_some(())
    })
    .await;
    let rows = weir.rows("latest").await;
    assert_eq!(rows.len(), 20);
    // Three subscribed connections without a shared subscription would
    // each get every message: 1 800.
    assert_eq!(column_sum(&rows, "reports"), 600, "each event once");
    weir.stop().await;
}
