//! MQTT 5 as a client sees it, one behaviour a test, against a weir with no
//! pipeline (a plain broker). The client is a small raw one over rumqttc's
//! MQTT 5 packet codec, so that every property and reason code on the wire
//! can be set and read.

use crate::common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::process::metric_value;
use common::*;
use rumqttc::v5::mqttbytes::v5::{
    self, ConnectProperties, Filter, LastWill, LastWillProperties, PublishProperties,
    RetainForwardRule, SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::source::server::codec::{self, Packet, Protocol};

struct Client {
    socket: TcpStream,
    buf: BytesMut,
    next_pkid: u16,
}

impl Client {
    async fn connect(
        port: u16,
        connect: v5::Connect,
        will: Option<LastWill>,
    ) -> (Client, v5::ConnAck) {
        let socket = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut client = Client {
            socket,
            buf: BytesMut::new(),
            next_pkid: 0,
        };
        client.send(Packet::Connect(connect, will, None)).await;
        let Packet::ConnAck(ack) = client.recv().await else {
            panic!("no CONNACK");
        };
        (client, ack)
    }

    async fn simple(port: u16, id: &str) -> Client {
        Self::connect(port, connect(id, true, None), None).await.0
    }

    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        codec::write(&packet, Protocol::V5, &mut out).expect("encode");
        self.socket.write_all(&out).await.expect("write");
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.expect("write");
    }

    /// The next packet; panics if weir closes the connection first.
    async fn recv(&mut self) -> Packet {
        self.try_recv().await.expect("weir closed the connection")
    }

    /// The next packet, or `None` once weir has closed the connection.
    async fn try_recv(&mut self) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(p) =
                codec::read(&mut self.buf, Protocol::V5, 1 << 24).expect("valid packet")
            {
                return Some(p);
            }
            let n = tokio::time::timeout_at(deadline, self.socket.read_buf(&mut self.buf))
                .await
                .expect("a packet before the deadline")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// The next PUBLISH (acknowledging QoS 1 ones), skipping acks.
    async fn next_publish(&mut self) -> v5::Publish {
        loop {
            if let Packet::Publish(p) = self.recv().await {
                if p.qos == QoS::AtLeastOnce {
                    self.send(Packet::PubAck(v5::PubAck::new(p.pkid, None)))
                        .await;
                }
                return p;
            }
        }
    }

    async fn subscribe(
        &mut self,
        filters: Vec<Filter>,
        id: Option<usize>,
    ) -> Vec<v5::SubscribeReasonCode> {
        self.next_pkid += 1;
        let properties = id.map(|id| SubscribeProperties {
            id: Some(id),
            user_properties: vec![],
        });
        self.send(Packet::Subscribe(v5::Subscribe {
            pkid: self.next_pkid,
            filters,
            properties,
        }))
        .await;
        loop {
            if let Packet::SubAck(a) = self.recv().await {
                return a.return_codes;
            }
        }
    }

    /// Publishes and, at QoS 1, waits for the PUBACK.
    async fn publish(
        &mut self,
        topic: &str,
        payload: &str,
        qos: QoS,
        retain: bool,
        properties: Option<PublishProperties>,
    ) {
        let pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            self.next_pkid += 1;
            self.next_pkid
        };
        self.send(Packet::Publish(v5::Publish {
            dup: false,
            qos,
            retain,
            topic: Bytes::from(topic.to_string()),
            pkid,
            payload: Bytes::from(payload.to_string()),
            properties,
        }))
        .await;
        if qos == QoS::AtLeastOnce {
            loop {
                if let Packet::PubAck(a) = self.recv().await {
                    assert_eq!(a.pkid, pkid);
                    return;
                }
            }
        }
    }
}

fn connect(id: &str, clean: bool, properties: Option<ConnectProperties>) -> v5::Connect {
    v5::Connect {
        keep_alive: 30,
        client_id: id.to_string(),
        clean_start: clean,
        properties,
    }
}

fn expiry(seconds: u32) -> Option<ConnectProperties> {
    let mut p = ConnectProperties::new();
    p.session_expiry_interval = Some(seconds);
    Some(p)
}

fn properties() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![],
        subscription_identifiers: vec![],
        content_type: None,
    }
}

/// A plain broker: no pipelines, and no client of weir's own (alert notifications off).
async fn broker() -> Weir {
    Weir::start_tweaked(&[], None, |c| {
        c.mqtt.max_keep_alive = 120;
        c.alerts.mqtt = false;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_client_id_is_assigned_one_and_server_keep_alive_is_said() {
    let weir = broker().await;
    let mut c = connect("", true, None);
    c.keep_alive = 0; // asks for none; weir's limit is 120 s
    let (_client, ack) = Client::connect(weir.broker_port, c, None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    let props = ack.properties.expect("CONNACK properties");
    assert!(props
        .assigned_client_identifier
        .is_some_and(|id| !id.is_empty()));
    assert_eq!(props.server_keep_alive, Some(120));
    assert!(props.receive_max.is_some() && props.topic_alias_max.is_some());
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_properties_and_user_properties_pass_through() {
    let weir = broker().await;
    let mut sub = Client::simple(weir.broker_port, "responder").await;
    sub.subscribe(vec![Filter::new("req/+", QoS::AtLeastOnce)], Some(42))
        .await;
    let mut publisher = Client::simple(weir.broker_port, "requester").await;
    let mut p = properties();
    p.response_topic = Some("resp/requester".into());
    p.correlation_data = Some(Bytes::from_static(b"corr-1"));
    p.user_properties = vec![("region".into(), "eu".into())];
    p.content_type = Some("application/json".into());
    p.payload_format_indicator = Some(1);
    publisher
        .publish("req/time", "{}", QoS::AtLeastOnce, false, Some(p))
        .await;
    let got = sub.next_publish().await;
    let props = got.properties.expect("properties");
    assert_eq!(props.response_topic.as_deref(), Some("resp/requester"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(
        props.user_properties,
        vec![("region".to_string(), "eu".to_string())]
    );
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(props.payload_format_indicator, Some(1));
    assert_eq!(
        props.subscription_identifiers,
        vec![42],
        "the subscription's identifier"
    );
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_stand_for_their_topic_and_a_bad_alias_is_0x94() {
    let weir = broker().await;
    let mut sub = Client::simple(weir.broker_port, "alias-sub").await;
    sub.subscribe(vec![Filter::new("meters/#", QoS::AtMostOnce)], None)
        .await;
    let mut p = Client::simple(weir.broker_port, "alias-pub").await;
    let mut with_alias = properties();
    with_alias.topic_alias = Some(3);
    p.publish(
        "meters/42/kwh",
        "1",
        QoS::AtLeastOnce,
        false,
        Some(with_alias.clone()),
    )
    .await;
    p.publish("", "2", QoS::AtLeastOnce, false, Some(with_alias))
        .await;
    for want in ["1", "2"] {
        let got = sub.next_publish().await;
        assert_eq!(
            (&got.topic[..], &got.payload[..]),
            (&b"meters/42/kwh"[..], want.as_bytes())
        );
        assert!(
            got.properties.is_none_or(|p| p.topic_alias.is_none()),
            "aliases are per connection"
        );
    }
    let mut too_big = properties();
    too_big.topic_alias = Some(60_000);
    p.publish("meters/1", "x", QoS::AtMostOnce, false, Some(too_big))
        .await;
    let Packet::Disconnect(d) = p.recv().await else {
        panic!("expected DISCONNECT");
    };
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::TopicAliasInvalid);
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_retain_as_published_and_retain_handling() {
    let weir = broker().await;
    let port = weir.broker_port;
    let mut setter = Client::simple(port, "setter").await;
    setter
        .publish("cfg/a", "retained-a", QoS::AtLeastOnce, true, None)
        .await;

    let mut c = Client::simple(port, "opts").await;
    let mut never = Filter::new("cfg/#", QoS::AtLeastOnce);
    never.retain_forward_rule = RetainForwardRule::Never;
    let mut keep_flag = Filter::new("live/#", QoS::AtLeastOnce);
    keep_flag.preserve_retain = true;
    let mut not_mine = Filter::new("chat/#", QoS::AtLeastOnce);
    not_mine.nolocal = true;
    c.subscribe(vec![never, keep_flag, not_mine], None).await;
    // no-local: its own message does not come back; another client's does.
    c.publish("chat/room", "from-me", QoS::AtLeastOnce, false, None)
        .await;
    setter
        .publish("chat/room", "from-setter", QoS::AtLeastOnce, false, None)
        .await;
    let got = c.next_publish().await;
    assert_eq!(
        &got.payload[..],
        b"from-setter",
        "retain handling 2: no retained cfg/a either"
    );
    // retain-as-published keeps the flag on a live message.
    setter
        .publish("live/x", "kept", QoS::AtLeastOnce, true, None)
        .await;
    let got = c.next_publish().await;
    assert_eq!((&got.payload[..], got.retain), (&b"kept"[..], true));

    // retain handling 1: retained messages on a new subscription only.
    let mut once = Filter::new("cfg/#", QoS::AtLeastOnce);
    once.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    let mut d = Client::simple(port, "once").await;
    d.subscribe(vec![once.clone()], None).await;
    let got = d.next_publish().await;
    assert_eq!((&got.payload[..], got.retain), (&b"retained-a"[..], true));
    d.subscribe(vec![once], None).await;
    setter
        .publish("cfg/b", "live-b", QoS::AtLeastOnce, false, None)
        .await;
    let got = d.next_publish().await;
    assert_eq!(
        &got.payload[..],
        b"live-b",
        "no second copy of cfg/a on re-subscribe"
    );
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reason_codes_for_bad_filters_and_unknown_unsubscribes() {
    let weir = broker().await;
    let mut c = Client::simple(weir.broker_port, "codes").await;
    let codes = c
        .subscribe(
            vec![
                Filter::new("a/#/b", QoS::AtLeastOnce),
                Filter::new("ok/+", QoS::ExactlyOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        codes,
        [
            v5::SubscribeReasonCode::TopicFilterInvalid,
            v5::SubscribeReasonCode::Success(QoS::ExactlyOnce)
        ]
    );
    c.send(Packet::Unsubscribe(v5::Unsubscribe {
        pkid: 99,
        filters: vec!["ok/+".into(), "never/subscribed".into()],
        properties: None,
    }))
    .await;
    let Packet::UnsubAck(a) = c.recv().await else {
        panic!("expected UNSUBACK");
    };
    assert_eq!(
        a.reasons,
        [
            v5::UnsubAckReason::Success,
            v5::UnsubAckReason::NoSubscriptionExisted
        ]
    );
    weir.stop().await;
}

/// A filter as deep as one SUBSCRIBE can carry (65 535 slashes, 65 536
/// levels) once overflowed the stack of the task that routed a message to
/// it, and so aborted weir. Filters and topic names have at most 128
/// levels: the deep filter is refused (0x8F) beside a good one, a PUBLISH
/// to a deep topic ends its connection (0x90), and weir serves the next
/// clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_or_topic_too_deep_is_refused_and_weir_goes_on() {
    let weir = broker().await;
    let port = weir.broker_port;
    let deep = "/".repeat(65_535);
    let mut c = Client::simple(port, "deep").await;
    let codes = c
        .subscribe(
            vec![
                Filter::new(deep.clone(), QoS::AtMostOnce),
                Filter::new("ok/#", QoS::AtMostOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        codes,
        [
            v5::SubscribeReasonCode::TopicFilterInvalid,
            v5::SubscribeReasonCode::Success(QoS::AtMostOnce)
        ]
    );
    c.publish(&deep, "down", QoS::AtMostOnce, false, None).await;
    let mut reason = None;
    while let Some(packet) = c.try_recv().await {
        if let Packet::Disconnect(d) = packet {
            reason = Some(d.reason_code);
        }
    }
    assert_eq!(reason, Some(v5::DisconnectReasonCode::TopicNameInvalid));

    let mut subscriber = Client::simple(port, "after").await;
    subscriber
        .subscribe(vec![Filter::new("ok/#", QoS::AtLeastOnce)], None)
        .await;
    let mut publisher = Client::simple(port, "publisher").await;
    publisher
        .publish("ok/1", "still here", QoS::AtLeastOnce, false, None)
        .await;
    assert_eq!(subscriber.next_publish().await.payload, "still here");
    weir.stop().await;
}

/// `mqtt.max_retained_bytes` bounds the bytes of what clients retain (the
/// count alone let 100 000 payloads of 2 MiB each be kept): a retained
/// message that would pass it is delivered but not kept, and a later
/// subscriber gets what fitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_past_max_retained_bytes_are_not_kept() {
    let weir = Weir::start_tweaked(&[], None, |c| {
        c.mqtt.max_retained_bytes = 1000;
        c.alerts.mqtt = false;
    })
    .await;
    let port = weir.broker_port;
    let mut publisher = Client::simple(port, "config-push").await;
    let big = "x".repeat(600);
    for topic in ["config/T1", "config/T2"] {
        publisher
            .publish(topic, &big, QoS::AtLeastOnce, true, None)
            .await;
    }
    publisher
        .publish("config/T3", "small", QoS::AtLeastOnce, true, None)
        .await;

    let mut subscriber = Client::simple(port, "later").await;
    subscriber
        .subscribe(vec![Filter::new("config/#", QoS::AtLeastOnce)], None)
        .await;
    publisher
        .publish("config/end", "live", QoS::AtLeastOnce, false, None)
        .await;
    let mut retained = Vec::new();
    loop {
        let p = subscriber.next_publish().await;
        if p.topic == "config/end" {
            break;
        }
        retained.push((
            String::from_utf8_lossy(&p.topic).into_owned(),
            p.payload.len(),
        ));
    }
    retained.sort();
    assert_eq!(
        retained,
        [("config/T1".to_string(), 600), ("config/T3".to_string(), 5)]
    );
    let refused = metric_value(&weir.metrics().await, "weir_mqtt_retained_refused_total");
    assert_eq!(refused, Some(1.0));
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_after_its_expiry_and_a_queued_message_after_its_own() {
    let weir = broker().await;
    let port = weir.broker_port;
    let (mut c, _) = Client::connect(port, connect("expiring", true, expiry(1)), None).await;
    c.subscribe(vec![Filter::new("news", QoS::AtLeastOnce)], None)
        .await;
    c.send(Packet::Disconnect(v5::Disconnect::new(
        v5::DisconnectReasonCode::NormalDisconnection,
    )))
    .await;
    drop(c);
    wait_for("the 1 s session to expire", || async {
        let sessions = metric_value(&weir.metrics().await, "weir_mqtt_sessions")?;
        (sessions == 0.0).then_some(())
    })
    .await;
    let (_c, ack) = Client::connect(port, connect("expiring", false, expiry(60)), None).await;
    assert!(!ack.session_present, "the session had expired");

    // A message that expires while queued for an absent subscriber is not sent.
    let (mut s, _) = Client::connect(port, connect("away", true, expiry(300)), None).await;
    s.subscribe(vec![Filter::new("q/#", QoS::AtLeastOnce)], None)
        .await;
    drop(s); // gone without DISCONNECT
    wait_for("the subscriber to be offline", || async {
        let n = metric_value(&weir.metrics().await, "weir_mqtt_clients_connected")?;
        (n == 1.0).then_some(())
    })
    .await;
    let mut p = Client::simple(port, "sender").await;
    let mut short = properties();
    short.message_expiry_interval = Some(1);
    p.publish("q/short", "stale", QoS::AtLeastOnce, false, Some(short))
        .await;
    let mut long = properties();
    long.message_expiry_interval = Some(600);
    p.publish("q/long", "fresh", QoS::AtLeastOnce, false, Some(long))
        .await;
    // Time passes for the queued messages (the input, not an assertion).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (mut s, ack) = Client::connect(port, connect("away", false, expiry(300)), None).await;
    assert!(ack.session_present);
    let got = s.next_publish().await;
    assert_eq!(&got.payload[..], b"fresh", "the expired one is dropped");
    let left = got
        .properties
        .and_then(|p| p.message_expiry_interval)
        .expect("expiry");
    assert!(left < 600, "the interval counts down while queued: {left}");
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_waits_its_delay_and_a_reconnect_in_time_cancels_it() {
    let weir = broker().await;
    let port = weir.broker_port;
    let mut watcher = Client::simple(port, "watcher").await;
    watcher
        .subscribe(vec![Filter::new("status/+", QoS::AtLeastOnce)], None)
        .await;
    let will = |payload: &'static str| {
        Some(LastWill {
            topic: Bytes::from_static(b"status/T1"),
            message: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Some(LastWillProperties {
                delay_interval: Some(1),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: vec![],
            }),
        })
    };
    // Dropped, then back within the delay: its will must never go.
    let (first, _) = Client::connect(port, connect("T1", false, expiry(60)), will("first")).await;
    drop(first);
    let (second, ack) =
        Client::connect(port, connect("T1", false, expiry(60)), will("second")).await;
    assert!(ack.session_present);
    // Dropped for good: its will goes once the delay has passed.
    drop(second);
    let got = watcher.next_publish().await;
    assert_eq!(
        &got.payload[..],
        b"second",
        "the first will was cancelled by the reconnect"
    );
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_size_limits_hold_both_ways() {
    let weir = broker().await;
    let port = weir.broker_port;
    // The client accepts at most 200 bytes: a larger message is not sent to it.
    let mut small = ConnectProperties::new();
    small.max_packet_size = Some(200);
    let (mut sub, _) = Client::connect(port, connect("small", true, Some(small)), None).await;
    sub.subscribe(vec![Filter::new("blob/#", QoS::AtLeastOnce)], None)
        .await;
    let mut p = Client::simple(port, "blobber").await;
    p.publish(
        "blob/big",
        &"x".repeat(1_000),
        QoS::AtLeastOnce,
        false,
        None,
    )
    .await;
    p.publish("blob/small", "ok", QoS::AtLeastOnce, false, None)
        .await;
    let got = sub.next_publish().await;
    assert_eq!(&got.topic[..], b"blob/small");
    // A PUBLISH whose header announces more than weir's limit (4 x
    // max_packet_bytes = 8 MiB) is refused before its body is read: 0x95.
    let nine_mib = 9 * 1024 * 1024u32;
    let mut header = vec![0x30u8];
    let mut len = nine_mib;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        header.push(byte);
        if len == 0 {
            break;
        }
    }
    header.extend_from_slice(b"\x00\x04blob");
    p.send_raw(&header).await;
    let mut reason = None;
    while let Some(packet) = p.try_recv().await {
        if let Packet::Disconnect(d) = packet {
            reason = Some(d.reason_code);
        }
    }
    assert_eq!(reason, Some(v5::DisconnectReasonCode::PacketTooLarge));
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_give_each_message_to_one_member() {
    let weir = broker().await;
    let port = weir.broker_port;
    let mut a = Client::simple(port, "worker-a").await;
    let mut b = Client::simple(port, "worker-b").await;
    a.subscribe(
        vec![Filter::new("$share/workers/jobs/#", QoS::AtLeastOnce)],
        None,
    )
    .await;
    b.subscribe(
        vec![Filter::new("$share/workers/jobs/#", QoS::AtLeastOnce)],
        None,
    )
    .await;
    let mut p = Client::simple(port, "boss").await;
    for i in 0..10 {
        p.publish(
            &format!("jobs/{i}"),
            &i.to_string(),
            QoS::AtLeastOnce,
            false,
            None,
        )
        .await;
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(String::from_utf8_lossy(&a.next_publish().await.payload).into_owned());
        got.push(String::from_utf8_lossy(&b.next_publish().await.payload).into_owned());
    }
    got.sort_by_key(|s| s.parse::<u32>().unwrap_or(0));
    let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "each job once, five to each worker");
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_one_and_a_half_keep_alives() {
    let weir = broker().await;
    let mut c = connect("sleepy", true, None);
    c.keep_alive = 1;
    let (mut client, _) = Client::connect(weir.broker_port, c, None).await;
    // It sends nothing, not even PINGREQ.
    let mut reason = None;
    while let Some(packet) = client.try_recv().await {
        if let Packet::Disconnect(d) = packet {
            reason = Some(d.reason_code);
        }
    }
    assert_eq!(reason, Some(v5::DisconnectReasonCode::KeepAliveTimeout));
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_delivery_is_sent_again_with_dup_on_reconnect() {
    let weir = broker().await;
    let port = weir.broker_port;
    let (mut sub, _) = Client::connect(port, connect("forgetful", true, expiry(300)), None).await;
    sub.subscribe(vec![Filter::new("orders/#", QoS::ExactlyOnce)], None)
        .await;
    let mut p = Client::simple(port, "shop").await;
    p.publish("orders/1", "one", QoS::AtLeastOnce, false, None)
        .await;
    // Received, never acknowledged, then the connection drops.
    let first = loop {
        if let Packet::Publish(publish) = sub.recv().await {
            break publish;
        }
    };
    assert!(!first.dup);
    drop(sub);
    let (mut sub, ack) =
        Client::connect(port, connect("forgetful", false, expiry(300)), None).await;
    assert!(ack.session_present);
    let again = loop {
        if let Packet::Publish(publish) = sub.recv().await {
            break publish;
        }
    };
    assert_eq!(
        (&again.payload[..], again.pkid, again.dup),
        (&b"one"[..], first.pkid, true)
    );
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_sends_a_client_no_more_than_its_receive_maximum_unacknowledged() {
    let weir = broker().await;
    let port = weir.broker_port;
    let mut two = ConnectProperties::new();
    two.receive_maximum = Some(2);
    let (mut sub, _) = Client::connect(port, connect("slow-reader", true, Some(two)), None).await;
    sub.subscribe(vec![Filter::new("feed/#", QoS::AtLeastOnce)], None)
        .await;
    let mut p = Client::simple(port, "feeder").await;
    for i in 0..5 {
        p.publish(
            &format!("feed/{i}"),
            &i.to_string(),
            QoS::AtLeastOnce,
            false,
            None,
        )
        .await;
    }
    // All five are routed to the subscriber's session (the publisher has its
    // PUBACKs). Whatever weir would send now, it sends before it answers a
    // PINGREQ read after them: count what comes before the PINGRESP.
    sub.send(Packet::PingReq(v5::PingReq)).await;
    let mut held = Vec::new();
    loop {
        match sub.recv().await {
            Packet::Publish(got) => held.push(got),
            Packet::PingResp(_) => break,
            _ => {}
        }
    }
    assert_eq!(held.len(), 2, "two in flight at most: {held:?}");
    // Each PUBACK lets one more through, in order.
    let mut seen: Vec<String> = held
        .iter()
        .map(|h| String::from_utf8_lossy(&h.payload).into_owned())
        .collect();
    for h in held {
        sub.send(Packet::PubAck(v5::PubAck::new(h.pkid, None)))
            .await;
    }
    while seen.len() < 5 {
        let got = sub.next_publish().await;
        seen.push(String::from_utf8_lossy(&got.payload).into_owned());
    }
    assert_eq!(seen, ["0", "1", "2", "3", "4"]);
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_ends_an_old_connection_stuck_on_a_client_that_does_not_read() {
    let weir = broker().await;
    let port = weir.broker_port;
    let mut old = Client::simple(port, "stuck").await;
    old.subscribe(vec![Filter::new("big/#", QoS::AtMostOnce)], None)
        .await;
    // The old client reads nothing more: weir's writes to it fill the
    // socket buffers and its connection task waits on the write.
    let mut p = Client::simple(port, "flooder").await;
    let chunk = "z".repeat(64 * 1024);
    for i in 0..400 {
        p.publish(&format!("big/{i}"), &chunk, QoS::AtMostOnce, false, None)
            .await;
    }
    p.publish("big/last", "x", QoS::AtLeastOnce, false, None)
        .await;
    wait_metric(&weir, "weir_mqtt_clients_connected", 2.0).await;
    let (_new, ack) = Client::connect(port, connect("stuck", true, None), None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    // The stuck one is gone (without its socket ever being read again):
    // the flooder and the new connection remain.
    wait_for("the stuck connection to be closed", || async {
        let n = metric_value(&weir.metrics().await, "weir_mqtt_clients_connected")?;
        (n == 2.0).then_some(())
    })
    .await;
    drop(old);
    weir.stop().await;
}
