//! Backpressure, not loss: a publisher that writes far more than weir lets
//! be in flight loses nothing. A raw MQTT 3.1.1 client writes 5 000 QoS 1
//! publishes without waiting for a single PUBACK to a weir whose receive
//! maximum is 8: weir reads them only as fast as it logs them, every one
//! gets its PUBACK, in the order sent, and every event is counted once. An
//! MQTT 5 client, which was told the limit in CONNACK, is disconnected with
//! reason 0x93 when it ignores it.

use crate::common;

use bytes::BytesMut;
use common::*;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::source::server::codec::{self, Protocol};

const PIPELINE: &str = "
CREATE TABLE readings (terminal_id TEXT NOT NULL, seq BIGINT NOT NULL)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/readings', format = 'json', qos = 1);

CREATE VIEW per_terminal AS
SELECT terminal_id, count(*) AS n, count(DISTINCT seq) AS distinct_seqs FROM readings GROUP BY terminal_id;
";
const MESSAGES: u16 = 5_000;

async fn weir_with_receive_maximum(n: u16) -> Weir {
    Weir::start_tweaked(&[("r.sql", PIPELINE)], None, |c| {
        c.mqtt.receive_maximum = n;
    })
    .await
}

/// Reads packets until `want` returns `Some`.
async fn read_until<T>(
    socket: &mut TcpStream,
    buf: &mut BytesMut,
    protocol: Protocol,
    mut want: impl FnMut(codec::Packet) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        while let Some(packet) = codec::read(buf, protocol, 1 << 20).expect("a valid packet") {
            if let Some(t) = want(packet) {
                return t;
            }
        }
        let n = tokio::time::timeout_at(deadline, socket.read_buf(buf))
            .await
            .expect("weir answers before the deadline")
            .expect("read");
        assert!(n > 0, "weir closed the connection");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_3_1_1_publishes_is_paced_and_loses_nothing() {
    let weir = weir_with_receive_maximum(8).await;
    let socket = TcpStream::connect(("127.0.0.1", weir.broker_port))
        .await
        .expect("connect");
    let mut out = BytesMut::new();
    let mut connect = v4::Connect::new("flood");
    connect.keep_alive = 0; // legal in 3.1.1: no keep-alive
    v4::Packet::Connect(connect)
        .write(&mut out, usize::MAX)
        .unwrap();
    for pkid in 1..=MESSAGES {
        let mut p = v4::Publish::new(
            "terminals/F1/readings",
            rumqttc::QoS::AtLeastOnce,
            format!(r#"{{"seq": {pkid}}}"#),
        );
        p.pkid = pkid;
        v4::Packet::Publish(p).write(&mut out, usize::MAX).unwrap();
    }
    // Everything at once: weir must hold the rest in the socket.
    let (mut reader, mut writer) = socket.into_split();
    let writing = tokio::spawn(async move { writer.write_all(&out).await.map(|_| writer) });

    let mut buf = BytesMut::new();
    let mut acks = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        while let Some(packet) = codec::read(&mut buf, Protocol::V4, 1 << 20).expect("valid") {
            match packet {
                codec::Packet::ConnAck(a) => assert_eq!(a.code, v5::ConnectReturnCode::Success),
                codec::Packet::PubAck(a) => acks.push(a.pkid),
                other => panic!("unexpected {other:?}"),
            }
        }
        if acks.len() >= MESSAGES as usize {
            break;
        }
        let n = tokio::time::timeout_at(deadline, reader.read_buf(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("PUBACKs stopped after {}", acks.len()))
            .expect("read");
        assert!(
            n > 0,
            "weir closed the connection after {} PUBACKs",
            acks.len()
        );
    }
    let _writer = writing.await.expect("writer").expect("all written");
    let want: Vec<u16> = (1..=MESSAGES).collect();
    assert_eq!(acks, want, "one PUBACK each, in the order published");
    // A PUBACK follows the log append; the view's row follows the batch's
    // processing, a moment later: wait for the row to reach every message.
    let row = wait_for("per_terminal to count every message", || async {
        let rows = weir.rows("per_terminal").await;
        let row = rows.iter().find(|r| r["terminal_id"] == "F1")?.clone();
        (row["n"].as_u64()? >= MESSAGES as u64).then_some(row)
    })
    .await;
    assert_eq!(row["n"], MESSAGES as u64, "{row}");
    assert_eq!(row["distinct_seqs"], MESSAGES as u64, "{row}");
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_5_client_over_its_receive_maximum_is_disconnected_with_0x93() {
    let weir = weir_with_receive_maximum(8).await;
    let mut socket = TcpStream::connect(("127.0.0.1", weir.broker_port))
        .await
        .expect("connect");
    let mut out = BytesMut::new();
    let connect = v5::Connect {
        keep_alive: 0,
        client_id: "greedy".into(),
        clean_start: true,
        properties: None,
    };
    codec::write(
        &codec::Packet::Connect(connect, None, None),
        Protocol::V5,
        &mut out,
    )
    .unwrap();
    socket.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let receive_max = read_until(&mut socket, &mut buf, Protocol::V5, |p| match p {
        codec::Packet::ConnAck(a) => Some(a.properties.and_then(|p| p.receive_max)),
        _ => None,
    })
    .await;
    assert_eq!(receive_max, Some(8), "CONNACK tells the limit");

    let mut out = BytesMut::new();
    for pkid in 1..=200u16 {
        let publish = v5::Publish {
            dup: false,
            qos: rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            retain: false,
            topic: "terminals/G1/readings".into(),
            pkid,
            payload: format!(r#"{{"seq": {pkid}}}"#).into(),
            properties: None,
        };
        codec::write(&codec::Packet::Publish(publish), Protocol::V5, &mut out).unwrap();
    }
    socket.write_all(&out).await.unwrap();
    let reason = read_until(&mut socket, &mut buf, Protocol::V5, |p| match p {
        codec::Packet::Disconnect(d) => Some(d.reason_code),
        _ => None,
    })
    .await;
    assert_eq!(reason, v5::DisconnectReasonCode::ReceiveMaximumExceeded);
    let metrics = weir.metrics().await;
    assert!(
        metrics.contains("weir_mqtt_protocol_errors_total 1"),
        "{metrics}"
    );
    weir.stop().await;
}
