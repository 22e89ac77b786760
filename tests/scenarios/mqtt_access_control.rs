//! Who may connect to weir's MQTT server and what they may do there
//! (DESIGN §7), tried as a stranger and as a misbehaving terminal would,
//! with real MQTT clients: with a users file anonymous clients are refused,
//! a wrong password is refused (and too many lock the address out), weir's
//! client ids are reserved, a terminal cannot publish for another terminal
//! or forge an alert, a reader sees alerts and nothing else; over TLS, a
//! client certificate names the terminal.

use crate::common;

use std::time::Duration;

use common::pki::{Issued, Pki};
use common::process::metric_value;
use common::*;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode, Transport,
};
use serde_json::Value;

const RULES: &str = "
CREATE VIEW readings AS
SELECT terminal_id, count(*) AS n, min(battery_pct) AS min_battery
FROM telemetry GROUP BY terminal_id;

CREATE ALERT low_battery
WITH (severity = 'warning')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 15;
";

/// A users file made the way an operator makes one: `weir user new` for the
/// terminal (password on stdin), and argon2id and bcrypt hashes for others.
fn users_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args([
            "user",
            "new",
            "T1",
            "--role",
            "terminal",
            "--password-stdin",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("weir user new");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), b"t1-secret\n")
        .expect("password");
    let out = child.wait_with_output().expect("weir user new output");
    assert!(out.status.success(), "weir user new failed");
    let t1 = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        t1.contains("$argon2id$") && !t1.contains("t1-secret"),
        "{t1}"
    );
    let t2 = weir::auth::mqtt::hash_password("t2-secret").expect("hash");
    let dash = bcrypt::hash("dash-secret", 4).expect("bcrypt");
    let ops = weir::auth::mqtt::hash_password("ops-secret").expect("hash");
    let text = format!(
        "{t1}\n[[user]]\nname = \"T2\"\npassword_hash = {t2:?}\nrole = \"terminal\"\n\n\
         [[user]]\nname = \"dash\"\npassword_hash = {dash:?}\nrole = \"reader\"\n\n\
         [[user]]\nname = \"ops\"\npassword_hash = {ops:?}\nrole = \"admin\"\n"
    );
    let path = dir.join("mqtt-users.toml");
    std::fs::write(&path, text).expect("users file");
    path
}

fn options(port: u16, client_id: &str, login: Option<(&str, &str)>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    o
}

/// Connects; the CONNACK's refusal, or the live client.
async fn connect(
    options: MqttOptions,
) -> Result<(AsyncClient, EventLoop), Result<ConnectReturnCode, String>> {
    let (client, mut eventloop) = AsyncClient::new(options, 32);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("an answer to CONNECT before the deadline");
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok((client, eventloop)),
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => return Err(Ok(code)),
            Err(other) => return Err(Err(other.to_string())),
        }
    }
}

async fn refused(options: MqttOptions) -> ConnectReturnCode {
    match connect(options).await {
        Ok(_) => panic!("the connection was accepted"),
        Err(Ok(code)) => code,
        Err(Err(e)) => panic!("no CONNACK: {e}"),
    }
}

/// Publishes at QoS 1 and waits for every PUBACK.
async fn publish_acked(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    messages: &[(String, String, bool)],
) {
    for (topic, payload, retain) in messages {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, *retain, payload.clone())
            .await
            .expect("queue");
    }
    let mut acked = 0;
    while acked < messages.len() {
        let event = tokio::time::timeout(DEADLINE, eventloop.poll())
            .await
            .expect("PUBACK before the deadline")
            .expect("connection");
        if let Event::Incoming(Packet::PubAck(_)) = event {
            acked += 1;
        }
    }
}

/// The SUBACK's codes for one SUBSCRIBE.
async fn subscribe(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    filter: &str,
) -> Vec<SubscribeReasonCode> {
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    loop {
        let event = tokio::time::timeout(DEADLINE, eventloop.poll())
            .await
            .expect("SUBACK before the deadline")
            .expect("connection");
        if let Event::Incoming(Packet::SubAck(ack)) = event {
            return ack.return_codes;
        }
    }
}

/// Messages received within `quiet` of each other, until `until` says stop.
async fn receive_until(
    eventloop: &mut EventLoop,
    mut until: impl FnMut(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !until(&got) {
        let Ok(event) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
            panic!("messages before the deadline; got {got:?}");
        };
        let event = event.expect("connection");
        if let Event::Incoming(Packet::Publish(p)) = event {
            got.push((p.topic, String::from_utf8_lossy(&p.payload).into_owned()));
        }
    }
    got
}

fn reading(battery: f64) -> String {
    format!(r#"{{"ts": {T0}, "battery_pct": {battery}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_and_failed_logins_are_limited() {
    let dir = tempfile::tempdir().expect("dir");
    let users = users_file(dir.path());
    let pipeline = battery_pipeline("1h", RULES);
    let weir = Weir::start_tweaked(&[("p.sql", &pipeline)], None, |c| {
        c.mqtt.users_file = Some(users);
    })
    .await;
    let port = weir.broker_port;

    assert_eq!(
        refused(options(port, "anon", None)).await,
        ConnectReturnCode::NotAuthorized,
        "anonymous clients are refused once there is a users file"
    );
    assert_eq!(
        refused(options(port, "t1", Some(("T1", "wrong")))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused(options(port, "t1", Some(("nobody", "t1-secret")))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused(options(port, "weir", Some(("ops", "ops-secret")))).await,
        ConnectReturnCode::BadClientId,
        "client ids starting weir are weir's, whoever asks"
    );
    let (ok, _eventloop) = connect(options(port, "t1", Some(("T1", "t1-secret"))))
        .await
        .expect("the right password lets T1 in");
    drop(ok);

    // Guessing: after enough failures this address is refused without a
    // check, even with the right password, until the window ends.
    for i in 0..weir::auth::mqtt::FAILURES_PER_WINDOW {
        let _ = connect(options(port, "guess", Some(("T2", &format!("guess{i}"))))).await;
    }
    assert_eq!(
        refused(options(port, "t2", Some(("T2", "t2-secret")))).await,
        ConnectReturnCode::ServiceUnavailable,
        "MQTT 5's 0x9F (connection rate exceeded), as 3.1.1 can say it"
    );
    let metrics = weir.metrics().await;
    assert_eq!(
        metric_value(&metrics, "weir_mqtt_logins_refused_total"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "weir_mqtt_login_failures_total")
            >= Some(weir::auth::mqtt::FAILURES_PER_WINDOW as f64)
    );
    assert!(metric_value(&metrics, "weir_mqtt_logins_rate_limited_total") >= Some(1.0));
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_speaks_only_for_itself_and_a_reader_only_reads_alerts() {
    let dir = tempfile::tempdir().expect("dir");
    let users = users_file(dir.path());
    let pipeline = battery_pipeline("1h", RULES);
    let weir = Weir::start_tweaked(&[("p.sql", &pipeline)], None, |c| {
        c.mqtt.users_file = Some(users);
    })
    .await;
    let port = weir.broker_port;

    // The reader: alerts yes, anything else no.
    let (reader, mut reader_loop) = connect(options(port, "dash", Some(("dash", "dash-secret"))))
        .await
        .expect("reader connects");
    assert_eq!(
        subscribe(&reader, &mut reader_loop, "#").await,
        [SubscribeReasonCode::Failure]
    );
    assert_eq!(
        subscribe(&reader, &mut reader_loop, "terminals/+/telemetry").await,
        [SubscribeReasonCode::Failure]
    );
    assert_eq!(
        subscribe(&reader, &mut reader_loop, "weir/alerts/#").await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    let (t1, mut t1_loop) = connect(options(port, "t1", Some(("T1", "t1-secret"))))
        .await
        .expect("T1 connects");
    assert_eq!(
        subscribe(&t1, &mut t1_loop, "terminals/#").await,
        [SubscribeReasonCode::Failure],
        "a terminal does not read other terminals"
    );
    assert_eq!(
        subscribe(&t1, &mut t1_loop, "weir/commands/T1/#").await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // T1 tries everything a compromised terminal would. MQTT 3.1.1 has no
    // refusal in PUBACK: each is acknowledged and dropped.
    publish_acked(
        &t1,
        &mut t1_loop,
        &[
            // as another terminal, by topic
            ("terminals/T2/telemetry".into(), reading(3.0), false),
            // as another terminal, by payload
            (
                "terminals/T1/telemetry".into(),
                format!(r#"{{"ts": {T0}, "battery_pct": 4, "terminal_id": "T2"}}"#),
                false,
            ),
            // a forged alert, retained for every dashboard
            (
                "weir/alerts/low_battery/T2".into(),
                r#"{"state": "firing"}"#.into(),
                true,
            ),
            // a command to another terminal
            ("weir/commands/T2/reboot".into(), "now".into(), false),
            // and its own reading, which counts
            ("terminals/T1/telemetry".into(), reading(9.0), false),
        ],
    )
    .await;

    // The reader gets T1's real alert, not the forgery.
    let got = receive_until(&mut reader_loop, |got| !got.is_empty()).await;
    assert_eq!(got[0].0, "weir/alerts/low_battery/T1", "{got:?}");
    let alert: Value = serde_json::from_str(&got[0].1).expect("alert JSON");
    assert_eq!(alert["key"], "T1");
    assert_eq!(alert["state"], "firing");

    // Only T1's own reading is in the view.
    let rows = weir.wait_rows("readings", 1).await;
    assert_eq!(rows[0]["terminal_id"], "T1");
    assert_eq!(rows[0]["n"], 1);
    assert_eq!(rows[0]["min_battery"], 9.0);
    let dead = weir.get_ok("/api/v1/deadletter?reason=schema").await;
    let items = dead["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{dead}");
    assert!(
        items[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("terminal_id does not match the topic")),
        "{dead}"
    );

    // An admin may command a terminal; the terminal gets it.
    let (ops, mut ops_loop) = connect(options(port, "ops-console", Some(("ops", "ops-secret"))))
        .await
        .expect("admin connects");
    publish_acked(
        &ops,
        &mut ops_loop,
        &[("weir/commands/T1/reboot".into(), "please".into(), false)],
    )
    .await;
    let got = receive_until(&mut t1_loop, |got| !got.is_empty()).await;
    assert_eq!(
        got,
        [("weir/commands/T1/reboot".to_string(), "please".to_string())]
    );

    // A new reader sees the retained alerts: T1's, never a forged T2.
    let (late, mut late_loop) = connect(options(port, "dash-2", Some(("dash", "dash-secret"))))
        .await
        .expect("reader connects");
    subscribe(&late, &mut late_loop, "weir/alerts/#").await;
    let got = receive_until(&mut late_loop, |got| !got.is_empty()).await;
    let more = tokio::time::timeout(Duration::from_millis(500), late_loop.poll()).await;
    assert!(
        !matches!(more, Ok(Ok(Event::Incoming(Packet::Publish(_))))),
        "only one retained alert"
    );
    assert_eq!(got[0].0, "weir/alerts/low_battery/T1");

    let metrics = weir.metrics().await;
    assert!(
        metric_value(&metrics, "weir_mqtt_acl_denied_total") >= Some(6.0),
        "{metrics}"
    );
    weir.stop().await;
}

/// A TLS client of weir's MQTT-over-TLS listener.
fn tls_options(port: u16, client_id: &str, pki: &Pki, cert: Option<&Issued>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "localhost", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(pki.mqtt_tls(cert)),
    ));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_client_certificate_names_the_terminal() {
    let dir = tempfile::tempdir().expect("dir");
    let users = users_file(dir.path());
    let pki = Pki::new("mqtt");
    let stranger_ca = Pki::new("stranger");
    let tls_port = free_port();
    let pipeline = battery_pipeline("1h", RULES);
    let weir = Weir::start_tweaked(&[("p.sql", &pipeline)], None, |c| {
        c.mqtt.users_file = Some(users);
        c.mqtt.embedded_tls_listen = Some(format!("127.0.0.1:{tls_port}").parse().expect("addr"));
        c.mqtt.tls_cert_file = Some(pki.server_cert.clone());
        c.mqtt.tls_key_file = Some(pki.server_key.clone());
        c.mqtt.tls_client_ca_file = Some(pki.ca_file.clone());
    })
    .await;

    // T7 is in no users file: the CA vouches for it, as a terminal.
    let t7 = pki.issue("T7", false);
    let (client, mut eventloop) = connect(tls_options(tls_port, "t7", &pki, Some(&t7)))
        .await
        .expect("a certificate signed by the client CA logs in");
    publish_acked(
        &client,
        &mut eventloop,
        &[
            ("terminals/T7/telemetry".into(), reading(50.0), false),
            ("terminals/T8/telemetry".into(), reading(60.0), false),
        ],
    )
    .await;
    let rows = weir.wait_rows("readings", 1).await;
    assert_eq!(rows[0]["terminal_id"], "T7", "{rows:?}");
    assert_eq!(rows[0]["n"], 1, "T7 cannot publish as T8");

    // A certificate from another CA does not get through the handshake.
    let forged = stranger_ca.issue("T7", false);
    match connect(tls_options(tls_port, "t7", &pki, Some(&forged))).await {
        Err(Err(_)) => {}
        Err(Ok(code)) => panic!("a CONNACK ({code:?}) for a certificate of another CA"),
        Ok(_) => panic!("a certificate of another CA was accepted"),
    }
    // Without a certificate, TLS alone is not a login.
    assert_eq!(
        refused(tls_options(tls_port, "nocert", &pki, None)).await,
        ConnectReturnCode::NotAuthorized
    );
    // ... but a password is.
    let mut o = tls_options(tls_port, "ops-tls", &pki, None);
    o.set_credentials("ops", "ops-secret");
    connect(o).await.expect("password over TLS");
    // A certificate and another user name: refused.
    let mut o = tls_options(tls_port, "t7-as-ops", &pki, Some(&t7));
    o.set_credentials("ops", "ops-secret");
    assert_eq!(refused(o).await, ConnectReturnCode::BadUserNamePassword);

    let metrics = weir.metrics().await;
    assert!(
        metric_value(&metrics, "weir_mqtt_tls_handshake_failures_total") >= Some(1.0),
        "{metrics}"
    );
    weir.stop().await;
}
