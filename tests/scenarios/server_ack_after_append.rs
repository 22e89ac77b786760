//! weir is the MQTT server: a PUBACK (QoS 1) or PUBREC (QoS 2) means the
//! events are in the durable ingest log. Two terminals publish straight to
//! weir — one over MQTT 3.1.1 at QoS 1, one over MQTT 5 at QoS 2, both with
//! persistent sessions — while weir is killed with SIGKILL mid-stream. Every
//! message acknowledged before the kill is there after the restart; the
//! clients resume their sessions (restored from the store), resend what was
//! not acknowledged, and in the end every message is counted exactly once.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{Spawn, WeirProcess};
use common::*;

const PIPELINE: &str = "
CREATE TABLE readings (
  terminal_id TEXT NOT NULL,
  seq BIGINT NOT NULL
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/readings', format = 'json', qos = 1);

CREATE VIEW seen AS SELECT terminal_id, seq FROM readings;
";
const QOS1_MESSAGES: u64 = 3_000;
const QOS2_MESSAGES: u64 = 1_000;

/// The sequence numbers the server has acknowledged, as the client saw them.
type Acked = Arc<Mutex<BTreeSet<u64>>>;

/// MQTT 3.1.1, QoS 1, persistent session: publishes `n` readings and keeps
/// reconnecting until all are acknowledged.
async fn qos1_terminal(port: u16, n: u64, acked: Acked) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut options = MqttOptions::new("meter-1", "127.0.0.1", port);
    options.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    tokio::spawn(async move {
        for seq in 0..n {
            let payload = format!(r#"{{"seq": {seq}}}"#);
            if client
                .publish("terminals/M1/readings", QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // rumqttc numbers packets in request order and resends with the same id.
    let mut next = 0u64;
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    while (acked.lock().unwrap().len() as u64) < n {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                in_flight.entry(pkid).or_insert_with(|| {
                    next += 1;
                    next - 1
                });
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(seq) = in_flight.remove(&ack.pkid) {
                    acked.lock().unwrap().insert(seq);
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// MQTT 5, QoS 2, session expiry of an hour: PUBREC is the server's word.
async fn qos2_terminal(port: u16, n: u64, acked: Acked) {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
    use rumqttc::Outgoing;
    let mut options = MqttOptions::new("meter-2", "127.0.0.1", port);
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(3600));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    tokio::spawn(async move {
        for seq in 0..n {
            let payload = format!(r#"{{"seq": {seq}}}"#);
            if client
                .publish("terminals/M2/readings", QoS::ExactlyOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut next = 0u64;
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let mut completed = 0u64;
    while completed < n {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                in_flight.entry(pkid).or_insert_with(|| {
                    next += 1;
                    next - 1
                });
            }
            Ok(Event::Incoming(Incoming::PubRec(rec))) => {
                if let Some(seq) = in_flight.get(&rec.pkid) {
                    acked.lock().unwrap().insert(*seq);
                }
            }
            Ok(Event::Incoming(Incoming::PubComp(comp))) => {
                if in_flight.remove(&comp.pkid).is_some() {
                    completed += 1;
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// (terminal, seq) of every row of `seen`, with how often each is there.
async fn seen(weir: &WeirProcess) -> Option<HashMap<(String, u64), usize>> {
    let mut out = HashMap::new();
    for row in weir.rows("seen").await? {
        let key = (
            row["terminal_id"].as_str()?.to_string(),
            row["seq"].as_u64()?,
        );
        *out.entry(key).or_insert(0) += 1;
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_means_logged_across_kill_9() {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("pipelines")).expect("mkdir");
    std::fs::write(root.path().join("pipelines/readings.sql"), PIPELINE).expect("pipeline");
    let port = free_port();
    let spec = Spawn::new(root.path(), port, "weir")
        .env("WEIR_MQTT__BROKER", "embedded")
        .env("WEIR_MQTT__EMBEDDED_LISTEN", &format!("127.0.0.1:{port}"))
        .env("WEIR_STORAGE__CHECKPOINT_INTERVAL", "1s");
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;

    let acked1: Acked = Default::default();
    let acked2: Acked = Default::default();
    let t1 = tokio::spawn(qos1_terminal(port, QOS1_MESSAGES, acked1.clone()));
    let t2 = tokio::spawn(qos2_terminal(port, QOS2_MESSAGES, acked2.clone()));

    wait_for("a few hundred acknowledged messages", || async {
        (acked1.lock().unwrap().len() >= 400 && !acked2.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    weir.kill9();
    let before1 = acked1.lock().unwrap().clone();
    let before2 = acked2.lock().unwrap().clone();
    assert!(
        (before1.len() as u64) < QOS1_MESSAGES,
        "the kill came after the last message: nothing was tested"
    );

    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;
    let rows = wait_for("the rows replayed from the log", || async {
        let rows = seen(&weir).await?;
        (rows.len() >= before1.len() + before2.len()).then_some(rows)
    })
    .await;
    for seq in &before1 {
        assert!(
            rows.contains_key(&("M1".to_string(), *seq)),
            "QoS 1 message {seq} was acknowledged before the kill and is gone:\n{}",
            weir.log()
        );
    }
    for seq in &before2 {
        assert!(
            rows.contains_key(&("M2".to_string(), *seq)),
            "QoS 2 message {seq} got PUBREC before the kill and is gone"
        );
    }

    // The terminals resume their sessions and resend: all counted, once.
    // (The server's rows are the judge: the terminals' own bookkeeping maps
    // packet ids to readings by the order rumqttc sends them, which a
    // reconnect can shuffle.)
    let mut rows = HashMap::new();
    for _ in 0..300 {
        rows = seen(&weir).await.unwrap_or_default();
        if rows.len() as u64 == QOS1_MESSAGES + QOS2_MESSAGES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if rows.len() as u64 != QOS1_MESSAGES + QOS2_MESSAGES {
        let m1: Vec<u64> = (0..QOS1_MESSAGES)
            .filter(|s| !rows.contains_key(&("M1".to_string(), *s)))
            .take(8)
            .collect();
        let m2: Vec<u64> = (0..QOS2_MESSAGES)
            .filter(|s| !rows.contains_key(&("M2".to_string(), *s)))
            .take(8)
            .collect();
        panic!(
            "missing M1 {m1:?} M2 {m2:?}; t1 done {} t2 done {}; before1 {} before2 {}",
            t1.is_finished(),
            t2.is_finished(),
            before1.len(),
            before2.len()
        );
    }
    t1.abort();
    t2.abort();
    let doubled: Vec<_> = rows.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "counted twice: {doubled:?}\n{}",
        weir.log()
    );
    assert!(
        weir.log()
            .contains("MQTT sessions and retained messages restored"),
        "{}",
        weir.log()
    );
}

/// QoS 2 with weir killed between PUBREC and PUBCOMP: the client resumes
/// its session and releases the message; it is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_across_a_kill_between_pubrec_and_pubcomp_counts_once() {
    use rumqttc::v5::mqttbytes::v5;
    use rumqttc::v5::mqttbytes::QoS;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weir::source::server::codec::{self, Packet, Protocol};

    async fn session(port: u16) -> (tokio::net::TcpStream, bytes::BytesMut, bool) {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut props = v5::ConnectProperties::new();
        props.session_expiry_interval = Some(600);
        let connect = v5::Connect {
            keep_alive: 0,
            client_id: "meter-q2".into(),
            clean_start: false,
            properties: Some(props),
        };
        send(&mut socket, Packet::Connect(connect, None, None)).await;
        let mut buf = bytes::BytesMut::new();
        let Packet::ConnAck(ack) = recv(&mut socket, &mut buf).await else {
            panic!("no CONNACK")
        };
        (socket, buf, ack.session_present)
    }
    async fn send(socket: &mut tokio::net::TcpStream, packet: Packet) {
        let mut out = bytes::BytesMut::new();
        codec::write(&packet, Protocol::V5, &mut out).expect("encode");
        socket.write_all(&out).await.expect("write");
    }
    async fn recv(socket: &mut tokio::net::TcpStream, buf: &mut bytes::BytesMut) -> Packet {
        loop {
            if let Some(p) = codec::read(buf, Protocol::V5, 1 << 20).expect("valid") {
                return p;
            }
            let n = tokio::time::timeout(DEADLINE, socket.read_buf(buf))
                .await
                .expect("a packet in time")
                .expect("read");
            assert!(n > 0, "closed");
        }
    }

    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("pipelines")).expect("mkdir");
    std::fs::write(root.path().join("pipelines/readings.sql"), PIPELINE).expect("pipeline");
    let port = free_port();
    let spec = Spawn::new(root.path(), port, "weir")
        .env("WEIR_MQTT__BROKER", "embedded")
        .env("WEIR_MQTT__EMBEDDED_LISTEN", &format!("127.0.0.1:{port}"));
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;

    let (mut socket, mut buf, _) = session(port).await;
    let publish = v5::Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: "terminals/Q2/readings".into(),
        pkid: 77,
        payload: r#"{"seq": 7}"#.into(),
        properties: None,
    };
    send(&mut socket, Packet::Publish(publish.clone())).await;
    let Packet::PubRec(rec) = recv(&mut socket, &mut buf).await else {
        panic!("expected PUBREC");
    };
    assert_eq!(rec.pkid, 77);
    weir.kill9();

    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;
    let (mut socket, mut buf, present) = session(port).await;
    assert!(present, "the session outlived weir");
    // A client that missed the PUBREC would send the PUBLISH again: still once.
    let mut again = publish;
    again.dup = true;
    send(&mut socket, Packet::Publish(again)).await;
    let Packet::PubRec(rec) = recv(&mut socket, &mut buf).await else {
        panic!("expected PUBREC");
    };
    send(&mut socket, Packet::PubRel(v5::PubRel::new(rec.pkid, None))).await;
    let Packet::PubComp(comp) = recv(&mut socket, &mut buf).await else {
        panic!("expected PUBCOMP");
    };
    assert_eq!(comp.pkid, 77);
    let rows = wait_for("the message counted", || async {
        let rows = seen(&weir).await?;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.get(&("Q2".to_string(), 7)), Some(&1), "{rows:?}");
}
