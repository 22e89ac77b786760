//! A terminal drops off: the broker publishes its MQTT last will, weir
//! raises `terminal_offline` at once, and resolves it when the terminal is
//! back online (DESIGN §5). Seen the way on-call staff see it: the SSE
//! stream (every transition and the ack), the alerts API, and the retained
//! MQTT notification. Run on the embedded broker and on Mosquitto.

use crate::common;

use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use serde_json::Value;

/// The status stream and rule of the shipped config, word for word.
const STATUS: &str = "
CREATE TABLE terminal_status (terminal_id TEXT NOT NULL, state TEXT NOT NULL)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/status', format = 'json');

CREATE ALERT terminal_offline
WITH (severity = 'critical', clear = 'state = ''online''')
AS SELECT terminal_id, state FROM terminal_status WHERE state = 'offline';
";

/// Connects as terminal `id` with its last will, says it is online, and
/// returns the live connection.
async fn terminal_online(port: u16, id: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(format!("terminal-{id}"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_last_will(LastWill::new(
        format!("terminals/{id}/status"),
        r#"{"state": "offline"}"#,
        QoS::AtLeastOnce,
        false,
    ));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .publish(
            format!("terminals/{id}/status"),
            QoS::AtLeastOnce,
            true,
            r#"{"state": "online"}"#,
        )
        .await
        .expect("queue online");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("the online message acknowledged before the deadline");
        if let Ok(Event::Incoming(Packet::PubAck(_))) = event {
            break;
        }
        if event.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (client, eventloop)
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[derive(PartialEq)]
enum Broker {
    Embedded,
    Mosquitto,
}

async fn scenario(weir: &Weir, broker: Broker) {
    let port = weir.broker_port;
    let mut sse = Sse::connect(&weir.base, "/api/v1/alerts/stream").await;

    // The terminal is online, then its socket closes without a DISCONNECT.
    let (_client, eventloop) = terminal_online(port, "T-9").await;
    drop(eventloop);

    let (name, opened) = sse.next_event().await;
    assert_eq!(name, "opened", "{opened}");
    let alert = &opened["alert"];
    assert_eq!(alert["rule"], "terminal_offline");
    assert_eq!(alert["key"], "T-9");
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["state"], "firing");
    assert_eq!(alert["fired_by"]["state"], "offline");
    assert_eq!(alert["acked"], false);
    let id = alert["id"].as_str().expect("id").to_string();

    let firing = weir.get_ok("/api/v1/alerts?state=firing").await;
    let items = firing["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{firing}");
    assert_eq!(items[0]["id"], id.as_str());

    // On-call acknowledges it; the stream says so.
    let (status, acked) = weir.post(&format!("/api/v1/alerts/{id}/ack"), "").await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["acked"], true);
    assert!(acked["acked_at"].is_string(), "{acked}");
    let (name, event) = sse.next_event().await;
    assert_eq!(name, "acked");
    assert_eq!(event["alert"]["id"], id.as_str());
    // acknowledging again changes nothing and sends no event
    let (status, again) = weir.post(&format!("/api/v1/alerts/{id}/ack"), "").await;
    assert_eq!(status, 200);
    assert_eq!(again["acked_at"], acked["acked_at"]);

    // The retained MQTT notification holds the current state.
    let retained = wait_for("the retained notification to show the ack", || async {
        let n = retained_notification(port, "T-9").await?;
        (n["acked"] == true).then_some(n)
    })
    .await;
    assert_eq!(retained["state"], "firing");
    if broker == Broker::Embedded {
        // a firing alert's notification stays until the alert changes
        assert_eq!(retained_expiry(port, "T-9").await, Some(None));
    }

    // The terminal comes back: the alert resolves by itself.
    let (_client, _eventloop) = terminal_online(port, "T-9").await;
    let (name, resolved) = sse.next_event().await;
    assert_eq!(name, "resolved", "{resolved}");
    assert_eq!(resolved["alert"]["id"], id.as_str());
    assert_eq!(resolved["alert"]["cleared_by"]["state"], "online");
    assert_eq!(resolved["alert"]["acked"], true, "the ack is kept");

    let one = weir.get_ok(&format!("/api/v1/alerts/{id}")).await;
    assert_eq!(one["state"], "resolved");
    let changes: Vec<&str> = one["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["change"].as_str())
        .collect();
    assert_eq!(changes, ["opened", "acked", "resolved"], "{one}");
    let retained = wait_for("the retained notification to show the resolve", || async {
        let n = retained_notification(port, "T-9").await?;
        (n["state"] == "resolved").then_some(n)
    })
    .await;
    assert_eq!(retained["id"], id.as_str());
    assert!(weir.get_ok("/api/v1/alerts?state=firing").await["items"]
        .as_array()
        .expect("items")
        .is_empty());
    if broker == Broker::Embedded {
        // On weir's own server the resolved alert's retained notification
        // expires within the hour (`alerts.mqtt_resolved_expiry`), so the
        // retained messages hold the firing alerts and the recent ones,
        // not every key that ever fired.
        let expiry = retained_expiry(port, "T-9").await;
        assert!(
            matches!(expiry, Some(Some(s)) if s > 0 && s <= 3600),
            "{expiry:?}"
        );
    }
}

/// The retained notification on `weir/alerts/terminal_offline/{id}`, as an
/// MQTT 5 client subscribing now receives it.
async fn retained_notification(port: u16, id: &str) -> Option<Value> {
    retained(port, id).await.map(|(json, _)| json)
}

/// Its message expiry (`None` inside: it has none).
async fn retained_expiry(port: u16, id: &str) -> Option<Option<u32>> {
    retained(port, id).await.map(|(_, expiry)| expiry)
}

async fn retained(port: u16, id: &str) -> Option<(Value, Option<u32>)> {
    use rumqttc::v5::mqttbytes::{v5::Packet, QoS};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let options = MqttOptions::new(format!("watcher-{id}-{}", now_nanos()), "127.0.0.1", port);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .subscribe(
            format!("weir/alerts/terminal_offline/{id}"),
            QoS::AtLeastOnce,
        )
        .await
        .ok()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, eventloop.poll()).await {
        if let Event::Incoming(Packet::Publish(p)) = event {
            let _ = client.disconnect().await;
            let expiry = p.properties.and_then(|p| p.message_expiry_interval);
            return Some((serde_json::from_slice(&p.payload).ok()?, expiry));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_on_the_embedded_broker() {
    let weir = Weir::start(&[("status.sql", STATUS)]).await;
    scenario(&weir, Broker::Embedded).await;
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_on_mosquitto() {
    let port = free_port();
    let _mosquitto = Mosquitto::start(port).await;
    let weir = Weir::start_with(
        &[("status.sql", STATUS)],
        Some(format!("mqtt://127.0.0.1:{port}")),
    )
    .await;
    scenario(&weir, Broker::Mosquitto).await;
    weir.stop().await;
}

/// A fleet's retained status messages fill `mqtt.max_retained` (here one
/// terminal does, with a limit of 1): weir's own alert notification is
/// still retained, so a dashboard subscribing after the alert opened sees
/// it; a terminal's further retained status is not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_notifications_are_retained_when_the_fleet_filled_max_retained() {
    let weir = Weir::start_tweaked(&[("status.sql", STATUS)], None, |c| {
        c.mqtt.max_retained = 1;
    })
    .await;
    let port = weir.broker_port;
    let mut sse = Sse::connect(&weir.base, "/api/v1/alerts/stream").await;
    let (_client, eventloop) = terminal_online(port, "T-1").await; // the one retained status
    drop(eventloop);
    let (name, opened) = sse.next_event().await;
    assert_eq!(name, "opened", "{opened}");
    assert_eq!(opened["alert"]["key"], "T-1");

    let retained = wait_for("the firing alert's retained notification", || async {
        retained_notification(port, "T-1").await
    })
    .await;
    assert_eq!(retained["state"], "firing", "{retained}");

    // the limit still holds for the terminals' own retained messages
    let (_client2, _eventloop2) = terminal_online(port, "T-2").await;
    let refused = wait_for("the refused retained status counted", || async {
        let metrics = weir.metrics().await;
        common::process::metric_value(&metrics, "weir_mqtt_retained_refused_total")
            .filter(|n| *n >= 1.0)
    })
    .await;
    assert_eq!(refused, 1.0);
    weir.stop().await;
}
