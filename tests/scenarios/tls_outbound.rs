//! weir as a TLS client (DESIGN §7): it reads from an operator's Mosquitto
//! over `mqtts://`, presenting a client certificate the broker requires,
//! publishes its alerts back there over the same TLS, and delivers alerts to
//! an https webhook signed by a private CA. Real Mosquitto, real HTTPS,
//! certificates made in the test.

use crate::common;

use std::sync::{Arc, Mutex};

use common::pki::Pki;
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde_json::Value;
use weir::config::WebhookConfig;

const RULES: &str = "
CREATE VIEW readings AS
SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id;

CREATE ALERT low_battery
WITH (severity = 'warning')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 15;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_reads_and_alerts_through_a_mosquitto_over_mqtts() {
    let pki = Pki::new("broker");
    let weir_cert = pki.issue("weir-ingest", false);
    let terminal_cert = pki.issue("T1", false);
    let port = free_port();
    let _mosquitto = Mosquitto::start_conf(
        port,
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n\
             cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            pki.ca_file.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    )
    .await;

    let pipeline = battery_pipeline("1h", RULES);
    let (ca, cert, key) = (
        pki.ca_file.clone(),
        weir_cert.cert.clone(),
        weir_cert.key.clone(),
    );
    let weir = Weir::start_tweaked(
        &[("p.sql", &pipeline)],
        Some(format!("mqtts://localhost:{port}")),
        |c| {
            c.mqtt.ca_file = Some(ca);
            c.mqtt.cert_file = Some(cert);
            c.mqtt.key_file = Some(key);
        },
    )
    .await;

    // A terminal publishes to Mosquitto over TLS; a dashboard listens for alerts there.
    let tls = |id: &str, cert| {
        let mut o = MqttOptions::new(id, "localhost", port);
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(pki.mqtt_tls(Some(cert))),
        ));
        o
    };
    let (dash, mut dash_loop) = AsyncClient::new(tls("dash", &terminal_cert), 16);
    dash.subscribe("weir/alerts/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (terminal, mut terminal_loop) = AsyncClient::new(tls("T1", &terminal_cert), 16);
    terminal
        .publish(
            "terminals/T1/telemetry",
            QoS::AtLeastOnce,
            false,
            format!(
                r#"[{{"ts": {T0}, "battery_pct": 40}}, {{"ts": {}, "battery_pct": 7}}]"#,
                T0 + 1000
            ),
        )
        .await
        .expect("publish");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, terminal_loop.poll())
            .await
            .expect("PUBACK from Mosquitto");
        if let Ok(Event::Incoming(Packet::PubAck(_))) = event {
            break;
        }
    }

    let rows = weir.wait_rows("readings", 1).await;
    assert_eq!(rows[0]["terminal_id"], "T1");
    assert_eq!(rows[0]["n"], 2, "both readings came through TLS");

    // weir's alert, published back to Mosquitto over TLS.
    let alert = loop {
        let event = tokio::time::timeout_at(deadline, dash_loop.poll())
            .await
            .expect("the alert on Mosquitto before the deadline");
        if let Ok(Event::Incoming(Packet::Publish(p))) = event {
            break p;
        }
    };
    assert_eq!(alert.topic, "weir/alerts/low_battery/T1");
    let body: Value = serde_json::from_slice(&alert.payload).expect("alert JSON");
    assert_eq!(body["state"], "firing");
    weir.stop().await;
}

/// What the webhook received: its Authorization header and body.
type Received = Arc<Mutex<Vec<(Option<String>, Value)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_an_https_webhook_of_a_private_ca() {
    let pki = Pki::new("webhook");
    let received: Received = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Received>,
                 headers: axum::http::HeaderMap,
                 axum::Json(body): axum::Json<Value>| async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    seen.lock().expect("lock").push((auth, body));
                    "ok"
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tls = weir::tls::server_config(&pki.server_cert, &pki.server_key, None, &[b"http/1.1"])
        .expect("server TLS");
    tokio::spawn(async move {
        let _ = axum::serve(weir::api::TlsListener::new(listener, tls), app).await;
    });

    let hook: WebhookConfig = toml::from_str(&format!(
        "url = \"https://localhost:{port}/hook\"\nca_file = {:?}\nbackoff = \"50ms\"\n\
         headers = {{ Authorization = \"Bearer s3cret\" }}",
        pki.ca_file.display().to_string()
    ))
    .expect("webhook config");
    let pipeline = battery_pipeline("1h", RULES);
    let weir = Weir::start_tweaked(&[("p.sql", &pipeline)], None, |c| {
        c.alerts.webhook = vec![hook];
    })
    .await;
    weir.publish(&[(
        "terminals/T9/telemetry",
        format!(r#"{{"ts": {T0}, "battery_pct": 3}}"#),
    )])
    .await;
    let (auth, body) = wait_for("the webhook over https", || async {
        received.lock().expect("lock").first().cloned()
    })
    .await;
    assert_eq!(auth.as_deref(), Some("Bearer s3cret"));
    assert_eq!(body["change"], "opened", "{body}");
    assert_eq!(body["alert"]["rule"], "low_battery");
    assert_eq!(body["alert"]["key"], "T9");
    let metrics = weir.metrics().await;
    assert!(
        metrics.contains("weir_alert_notifications_sent_total"),
        "{metrics}"
    );
    weir.stop().await;
}
