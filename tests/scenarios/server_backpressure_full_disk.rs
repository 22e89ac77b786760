//! Overload slows the publisher, on weir's own server: when weir cannot log
//! (its data directory, a small tmpfs, is full), it acknowledges nothing
//! more and reads no more than `mqtt.receive_maximum` unacknowledged
//! publishes from a connection, however many the publisher has written: the
//! rest wait in the socket, and the publisher's writes stop. After the disk
//! is grown and weir restarted, the publisher resends what was not
//! acknowledged and every event is counted once.
//!
//! Mounting needs root (CAP_SYS_ADMIN), which CI has; where the mount is not
//! allowed the test says so loudly and does nothing else.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use common::process::{Spawn, WeirProcess};
use common::*;
use rumqttc::mqttbytes::v4;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::source::server::codec::{self, Packet, Protocol};

const PIPELINE: &str = "
CREATE TABLE readings (terminal_id TEXT NOT NULL, seq BIGINT NOT NULL, note TEXT)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/readings', format = 'json', qos = 1);

CREATE VIEW per_terminal AS
SELECT terminal_id, count(*) AS n, count(DISTINCT seq) AS distinct_seqs FROM readings GROUP BY terminal_id;
";
const WINDOW: u64 = 8;

/// One reading with about 8 KiB of incompressible text.
fn payload(seq: u64) -> String {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let note: String = (0..1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{:08x}", x as u32)
        })
        .collect();
    format!(r#"{{"seq": {seq}, "note": "{note}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_the_publisher_at_the_window_and_loses_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let Some(disk) = Tmpfs::mount(&data, "12m") else {
        eprintln!("SKIPPED a_full_disk_holds_the_publisher_at_the_window: cannot mount a tmpfs here (needs root)");
        return;
    };
    std::fs::create_dir_all(root.path().join("pipelines")).expect("mkdir");
    std::fs::write(root.path().join("pipelines/r.sql"), PIPELINE).expect("pipeline");
    let port = free_port();
    let spec = Spawn::new(root.path(), port, "weir")
        .env("WEIR_MQTT__BROKER", "embedded")
        .env("WEIR_MQTT__EMBEDDED_LISTEN", &format!("127.0.0.1:{port}"))
        .env("WEIR_MQTT__RECEIVE_MAXIMUM", &WINDOW.to_string())
        // the readings' 8 KiB notes fill the disk fast; the default text limit is 1 KiB
        .env("WEIR_LIMITS__MAX_TEXT_BYTES", "16384");
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;

    // A raw MQTT 3.1.1 publisher with a persistent session: it writes
    // readings as fast as its socket takes them and counts PUBACKs.
    let total: u64 = 4_000;
    let written = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut reader, mut writer) = socket.into_split();
    let mut connect = v4::Connect::new("meter-full");
    connect.clean_session = false;
    let mut out = BytesMut::new();
    v4::Packet::Connect(connect)
        .write(&mut out, usize::MAX)
        .unwrap();
    writer.write_all(&out).await.expect("CONNECT");
    let writing = {
        let written = written.clone();
        tokio::spawn(async move {
            for seq in 1..=total {
                let mut p = v4::Publish::new(
                    "terminals/F1/readings",
                    rumqttc::QoS::AtLeastOnce,
                    payload(seq),
                );
                p.pkid = seq as u16;
                let mut out = BytesMut::new();
                v4::Packet::Publish(p).write(&mut out, usize::MAX).unwrap();
                if writer.write_all(&out).await.is_err() {
                    return;
                }
                written.store(seq, Ordering::SeqCst);
            }
        })
    };
    let reading = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            loop {
                while let Ok(Some(packet)) = codec::read(&mut buf, Protocol::V4, 1 << 20) {
                    if let Packet::PubAck(_) = packet {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
    };

    wait_for("weir to report that it cannot store", || async {
        let (status, _) = weir.try_get("/healthz").await?;
        (status == 503).then_some(())
    })
    .await;
    // The publisher gets well ahead of the acks: its socket takes what weir
    // does not read.
    wait_for(
        "the publisher to have written 100 readings beyond the acks",
        || async {
            let ahead = written
                .load(Ordering::SeqCst)
                .saturating_sub(acked.load(Ordering::SeqCst));
            (ahead >= 100).then_some(())
        },
    )
    .await;
    let received = weir
        .metric("weir_mqtt_messages_received_total")
        .await
        .expect("metric") as u64;
    let acked_now = acked.load(Ordering::SeqCst);
    assert!(
        received <= acked_now + WINDOW,
        "weir took in {received} publishes with {acked_now} acknowledged: more than the window of {WINDOW} ahead"
    );
    assert!(
        written.load(Ordering::SeqCst) < total,
        "the publisher was never held back: it wrote all {total}"
    );

    // Room again, and a restart: the publisher comes back to its session
    // and resends, with DUP and the same packet ids, what weir never
    // acknowledged.
    writing.abort();
    reading.abort();
    disk.grow("256m");
    weir.kill9();
    let weir = WeirProcess::spawn(&spec);
    weir.wait_ready().await;
    let acked_before = acked.load(Ordering::SeqCst);
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut connect = v4::Connect::new("meter-full");
    connect.clean_session = false;
    let mut out = BytesMut::new();
    v4::Packet::Connect(connect)
        .write(&mut out, usize::MAX)
        .unwrap();
    for seq in acked_before + 1..=total {
        let mut p = v4::Publish::new(
            "terminals/F1/readings",
            rumqttc::QoS::AtLeastOnce,
            payload(seq),
        );
        p.pkid = seq as u16;
        p.dup = seq <= written.load(Ordering::SeqCst);
        v4::Packet::Publish(p).write(&mut out, usize::MAX).unwrap();
    }
    let (mut reader, mut writer) = socket.split();
    let send = async { writer.write_all(&out).await.expect("resend") };
    let receive = async {
        let mut buf = BytesMut::new();
        let mut acks = 0;
        while acks < total - acked_before {
            while let Some(packet) = codec::read(&mut buf, Protocol::V4, 1 << 20).expect("valid") {
                if let Packet::PubAck(_) = packet {
                    acks += 1;
                }
            }
            if acks >= total - acked_before {
                break;
            }
            let n = tokio::time::timeout(DEADLINE, reader.read_buf(&mut buf))
                .await
                .expect("PUBACKs keep coming")
                .expect("read");
            assert!(n > 0, "weir closed the connection");
        }
    };
    tokio::join!(send, receive);
    let rows = wait_for("every reading counted", || async {
        let rows = weir.rows("per_terminal").await?;
        (rows.first()?["n"].as_u64()? >= total).then_some(rows)
    })
    .await;
    assert_eq!(rows[0]["n"], total, "{rows:?}");
    // (4 000 values: under count(DISTINCT)'s exact bound, so this is exact)
    assert_eq!(rows[0]["distinct_seqs"], total, "each reading once");
}
