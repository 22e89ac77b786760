//! weir's MQTT server as a broker for every client, not only terminals:
//! `mosquitto_pub`/`mosquitto_sub` (3.1.1 and MQTT 5) and rumqttc, against
//! a running weir — with no pipeline at all, and beside one.

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// `mosquitto_sub` on weir, printing `topic payload` lines; stops after
/// `count` messages (or 30 s).
fn mosquitto_sub(port: u16, count: usize, args: &[&str]) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-v", "-W", "30"])
        .args(["-C", &count.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)")
}

async fn lines(child: std::process::Child) -> Vec<String> {
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("mosquitto_sub output");
    assert!(
        output.status.success(),
        "mosquitto_sub failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn mosquitto_pub(port: u16, args: &[&str]) {
    let output = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("mosquitto_pub");
    assert!(
        output.status.success(),
        "mosquitto_pub {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_pipelines_weir_is_a_ready_broker_for_3_1_1_and_mqtt_5_clients() {
    let weir = Weir::start(&[]).await;
    let port = weir.broker_port;
    let (status, _) = weir.get("/readyz").await;
    assert_eq!(status, 200, "ready with no stream to subscribe");
    let v5 = mosquitto_sub(port, 2, &["-V", "mqttv5", "-q", "2", "-t", "plant/#"]);
    let v311 = mosquitto_sub(
        port,
        2,
        &["-V", "mqttv311", "-q", "1", "-t", "plant/+/temp"],
    );
    wait_metric(&weir, "weir_mqtt_subscriptions", 2.0).await;
    mosquitto_pub(
        port,
        &[
            "-V",
            "mqttv5",
            "-q",
            "2",
            "-t",
            "plant/a/temp",
            "-m",
            "21.5",
        ],
    );
    mosquitto_pub(
        port,
        &[
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-t",
            "plant/b/temp",
            "-m",
            "19",
        ],
    );
    let mut got = lines(v5).await;
    got.sort();
    assert_eq!(got, ["plant/a/temp 21.5", "plant/b/temp 19"]);
    let mut got = lines(v311).await;
    got.sort();
    assert_eq!(got, ["plant/a/temp 21.5", "plant/b/temp 19"]);
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_later_subscribers_survive_a_restart_and_clear() {
    let weir = Weir::start(&[("telemetry.sql", TELEMETRY)]).await;
    let port = weir.broker_port;
    mosquitto_pub(
        port,
        &[
            "-r",
            "-q",
            "1",
            "-t",
            "terminals/T1/status",
            "-m",
            r#"{"state":"online"}"#,
        ],
    );
    mosquitto_pub(
        port,
        &[
            "-r",
            "-q",
            "1",
            "-t",
            "terminals/T2/status",
            "-m",
            r#"{"state":"offline"}"#,
        ],
    );
    let got = lines(mosquitto_sub(port, 2, &["-t", "terminals/+/status"])).await;
    assert_eq!(
        got,
        [
            r#"terminals/T1/status {"state":"online"}"#,
            r#"terminals/T2/status {"state":"offline"}"#
        ]
    );
    // `$` topics are not matched by a leading wildcard.
    mosquitto_pub(port, &["-r", "-t", "$weir/test", "-m", "hidden"]);
    mosquitto_pub(port, &["-r", "-t", "zz/last", "-m", "seen"]);
    let got = lines(mosquitto_sub(port, 3, &["-t", "#"])).await;
    assert_eq!(
        got.last().map(String::as_str),
        Some("zz/last seen"),
        "{got:?}"
    );
    assert!(!got.iter().any(|l| l.starts_with('$')), "{got:?}");

    let dir = weir.stop().await;
    let weir = Weir::start_in(dir, None).await;
    let port = weir.broker_port;
    let got = lines(mosquitto_sub(port, 1, &["-t", "terminals/T2/status"])).await;
    assert_eq!(
        got,
        [r#"terminals/T2/status {"state":"offline"}"#],
        "kept across a restart"
    );
    // An empty retained message clears it (T3 is there to end the list).
    mosquitto_pub(port, &["-r", "-n", "-t", "terminals/T2/status"]);
    mosquitto_pub(port, &["-r", "-t", "terminals/T3/status", "-m", "{}"]);
    let got = lines(mosquitto_sub(port, 2, &["-t", "terminals/+/status"])).await;
    assert_eq!(
        got,
        [
            r#"terminals/T1/status {"state":"online"}"#,
            "terminals/T3/status {}"
        ]
    );
    weir.stop().await;
}

/// A rumqttc client with a persistent session (clean session off).
fn persistent(port: u16, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_clean_session(false);
    AsyncClient::new(options, 64)
}

/// Polls until `n` publishes have arrived; returns their payloads and
/// whether the broker said it had the session.
async fn receive(eventloop: &mut rumqttc::EventLoop, n: usize) -> (Vec<String>, bool) {
    let mut got = Vec::new();
    let mut present = false;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while got.len() < n {
        let Ok(event) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
            panic!("only {} of {n} messages arrived: {got:?}", got.len());
        };
        let event = event.expect("subscriber connection");
        match event {
            Event::Incoming(Packet::ConnAck(a)) => present = a.session_present,
            Event::Incoming(Packet::Publish(p)) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned())
            }
            _ => {}
        }
    }
    (got, present)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_subscriber_gets_what_was_published_while_it_was_away() {
    let weir = Weir::start(&[]).await;
    let port = weir.broker_port;
    let (client, mut eventloop) = persistent(port, "dashboard-1");
    client
        .subscribe("fleet/news/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("connect") {
            break;
        }
    }
    client.disconnect().await.unwrap();
    while eventloop.poll().await.is_ok() {}

    for i in 0..5 {
        mosquitto_pub(
            port,
            &[
                "-q",
                "1",
                "-t",
                &format!("fleet/news/low_battery/T{i}"),
                "-m",
                &format!("a{i}"),
            ],
        );
    }
    // QoS 0 is not kept for an absent subscriber.
    mosquitto_pub(port, &["-q", "0", "-t", "fleet/news/x/y", "-m", "lost"]);

    let (_client, mut eventloop) = persistent(port, "dashboard-1");
    let (got, present) = receive(&mut eventloop, 5).await;
    assert!(present, "the session was kept");
    assert_eq!(
        got,
        ["a0", "a1", "a2", "a3", "a4"],
        "queued, in order, at QoS 1"
    );
    drop(eventloop);

    // The subscription outlives a restart of weir too.
    let dir = weir.stop().await;
    let weir = Weir::start_in(dir, None).await;
    let port = weir.broker_port;
    let (_client, mut eventloop) = persistent(port, "dashboard-1");
    let present = loop {
        if let Event::Incoming(Packet::ConnAck(a)) = eventloop.poll().await.expect("connect") {
            break a.session_present;
        }
    };
    assert!(present, "the session was restored from the store");
    mosquitto_pub(
        port,
        &["-q", "1", "-t", "fleet/news/r/T9", "-m", "after-restart"],
    );
    let (got, _) = receive(&mut eventloop, 1).await;
    assert_eq!(
        got,
        ["after-restart"],
        "the subscription was restored with it"
    );
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let weir = Weir::start(&[]).await;
    let port = weir.broker_port;
    let mut options = MqttOptions::new("overlap", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client.subscribe("a/#", QoS::AtMostOnce).await.unwrap();
    client.subscribe("a/+/c", QoS::ExactlyOnce).await.unwrap();
    let mut subacks = 0;
    while subacks < 2 {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("poll") {
            subacks += 1;
        }
    }
    mosquitto_pub(port, &["-q", "2", "-t", "a/b/c", "-m", "one"]);
    mosquitto_pub(port, &["-q", "0", "-t", "a/b/c", "-m", "two"]);
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.expect("poll") {
            got.push((String::from_utf8_lossy(&p.payload).into_owned(), p.qos));
        }
    }
    assert_eq!(
        got,
        [
            ("one".to_string(), QoS::ExactlyOnce),
            ("two".to_string(), QoS::AtMostOnce)
        ],
        "each once, at min(message QoS, highest granted)"
    );
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_over_and_the_will_goes() {
    let weir = Weir::start(&[]).await;
    let port = weir.broker_port;
    let watcher = mosquitto_sub(port, 1, &["-t", "terminals/+/status"]);
    wait_metric(&weir, "weir_mqtt_subscriptions", 1.0).await;
    let mut options = MqttOptions::new("T5", "127.0.0.1", port);
    options.set_last_will(rumqttc::LastWill::new(
        "terminals/T5/status",
        r#"{"state":"offline"}"#,
        QoS::AtLeastOnce,
        false,
    ));
    let (_first, mut first_loop) = AsyncClient::new(options, 16);
    assert!(matches!(
        first_loop.poll().await,
        Ok(Event::Incoming(Packet::ConnAck(_)))
    ));
    let (_second, mut second_loop) =
        AsyncClient::new(MqttOptions::new("T5", "127.0.0.1", port), 16);
    assert!(matches!(
        second_loop.poll().await,
        Ok(Event::Incoming(Packet::ConnAck(_)))
    ));
    // The first connection is closed by the server.
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            if first_loop.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the first connection was not closed");
    assert_eq!(
        lines(watcher).await,
        [r#"terminals/T5/status {"state":"offline"}"#]
    );
    weir.stop().await;
}
