//! MQTT packets on the wire, both protocol versions, as one set of types.
//!
//! The packet codecs are rumqttc's (`mqttbytes::v4` and `v5::mqttbytes::v5`),
//! already a dependency of weir and able to read and write every packet of
//! both versions in either direction. Everything above this module speaks
//! MQTT 5's packets, a superset: a 3.1.1 packet is turned into its MQTT 5
//! form as it is read, and an MQTT 5 packet into its 3.1.1 form as it is
//! written (properties and reason codes dropped, as 3.1.1 has none).
//!
//! The protocol level is read from the CONNECT before either codec sees it:
//! 4 is 3.1.1, 5 is MQTT 5, anything else is refused with 3.1.1's
//! "unacceptable protocol version".

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

pub use m5::QoS;
pub use v5::{Packet, PublishProperties};

/// A connection's protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V4,
    V5,
}

/// Why the bytes read are not a packet.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReadError {
    #[error("packet of {size} bytes is larger than the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    #[error("the first packet must be CONNECT")]
    NotConnect,
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// The length of the next frame in `buf`, if it is all there.
fn frame(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, ReadError> {
    let mut remaining = 0usize;
    let mut shift = 0;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            let header = 2 + i;
            let size = header + remaining;
            if size > max {
                return Err(ReadError::TooLarge { size, max });
            }
            return Ok((buf.len() >= size).then_some((header, size)));
        }
    }
    if buf.len() >= 5 {
        return Err(ReadError::Malformed(
            "remaining length longer than 4 bytes".into(),
        ));
    }
    Ok(None)
}

/// Reads the CONNECT that opens a connection, and with it the protocol.
pub fn read_connect(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(Protocol, Packet)>, ReadError> {
    let Some((header, _)) = frame(buf, max)? else {
        return Ok(None);
    };
    if buf[0] != 0x10 {
        return Err(ReadError::NotConnect);
    }
    let name_len = buf
        .get(header..header + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        .ok_or_else(|| ReadError::Malformed("CONNECT without a protocol name".into()))?;
    let level = *buf
        .get(header + 2 + name_len)
        .ok_or_else(|| ReadError::Malformed("CONNECT without a protocol level".into()))?;
    let protocol = match level {
        4 => Protocol::V4,
        5 => Protocol::V5,
        other => return Err(ReadError::UnsupportedProtocol(other)),
    };
    Ok(read(buf, protocol, max)?.map(|packet| (protocol, packet)))
}

/// `bytes` in an allocation of its own. What [`read`] returns shares the
/// connection's read buffer (a packet's topic and payload are slices of
/// it), so a packet kept after it is handled — a retained message, a last
/// will — would keep the whole buffer it arrived in alive (8 KiB or more,
/// for a payload of a few bytes) for as long as it is kept.
pub fn detach(bytes: &Bytes) -> Bytes {
    Bytes::copy_from_slice(bytes)
}

/// [`detach`] for the parts of a message that are slices of the read
/// buffer: its topic, payload and correlation data.
pub fn detach_message(
    topic: &mut Bytes,
    payload: &mut Bytes,
    correlation_data: Option<&mut Bytes>,
) {
    *topic = detach(topic);
    *payload = detach(payload);
    if let Some(data) = correlation_data {
        *data = detach(data);
    }
}

/// A PUBLISH that holds none of the read buffer (see [`detach`]).
pub fn detach_publish(mut publish: v5::Publish) -> v5::Publish {
    let correlation_data = publish
        .properties
        .as_mut()
        .and_then(|p| p.correlation_data.as_mut());
    detach_message(&mut publish.topic, &mut publish.payload, correlation_data);
    publish
}

/// A will that holds none of the read buffer (see [`detach`]).
pub fn detach_will(mut will: v5::LastWill) -> v5::LastWill {
    let correlation_data = will
        .properties
        .as_mut()
        .and_then(|p| p.correlation_data.as_mut());
    detach_message(&mut will.topic, &mut will.message, correlation_data);
    will
}

/// Reads the next packet, if it is all in `buf`.
pub fn read(
    buf: &mut BytesMut,
    protocol: Protocol,
    max: usize,
) -> Result<Option<Packet>, ReadError> {
    let Some((_, size)) = frame(buf, max)? else {
        return Ok(None);
    };
    // An MQTT 5 DISCONNECT may have no body (reason 0) or a reason code
    // alone (no properties), neither of which the v5 codec accepts.
    if protocol == Protocol::V5 && buf[0] == 0xE0 && size <= 3 {
        let code = if size == 3 { buf[2] } else { 0 };
        buf.advance(size);
        let code = v5::DisconnectReasonCode::try_from(code)
            .map_err(|e| ReadError::Malformed(e.to_string()))?;
        return Ok(Some(Packet::Disconnect(v5::Disconnect::new(code))));
    }
    let malformed = |e: &dyn std::fmt::Display| ReadError::Malformed(e.to_string());
    let mut frame_bytes = buf.split_to(size);
    match protocol {
        Protocol::V5 => v5::Packet::read(&mut frame_bytes, None)
            .map(Some)
            .map_err(|e| malformed(&e)),
        Protocol::V4 => v4::Packet::read(&mut frame_bytes, usize::MAX)
            .map_err(|e| malformed(&e))
            .and_then(|p| from_v4(p).map(Some)),
    }
}

/// Appends `packet` to `out` in `protocol`'s form.
pub fn write(packet: &Packet, protocol: Protocol, out: &mut BytesMut) -> Result<(), String> {
    match protocol {
        Protocol::V5 => packet.write(out, None).map(drop).map_err(|e| e.to_string()),
        Protocol::V4 => match to_v4(packet) {
            Some(p) => p
                .write(out, usize::MAX)
                .map(drop)
                .map_err(|e| e.to_string()),
            None => Ok(()), // nothing to say in 3.1.1 (a server's DISCONNECT)
        },
    }
}

/// The size of `packet` on the wire in MQTT 5 form (3.1.1's is never larger).
pub fn size(packet: &Packet) -> usize {
    packet.size()
}

fn qos4(q: m4::QoS) -> QoS {
    match q {
        m4::QoS::AtMostOnce => QoS::AtMostOnce,
        m4::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m4::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos5(q: QoS) -> m4::QoS {
    match q {
        QoS::AtMostOnce => m4::QoS::AtMostOnce,
        QoS::AtLeastOnce => m4::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m4::QoS::ExactlyOnce,
    }
}

fn from_v4(packet: v4::Packet) -> Result<Packet, ReadError> {
    Ok(match packet {
        v4::Packet::Connect(c) => {
            let will = c.last_will.map(|w| v5::LastWill {
                topic: Bytes::from(w.topic),
                message: w.message,
                qos: qos4(w.qos),
                retain: w.retain,
                properties: None,
            });
            let login = c.login.map(|l| v5::Login {
                username: l.username,
                password: l.password,
            });
            Packet::Connect(
                v5::Connect {
                    keep_alive: c.keep_alive,
                    client_id: c.client_id,
                    clean_start: c.clean_session,
                    properties: None,
                },
                will,
                login,
            )
        }
        v4::Packet::Publish(p) => Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: qos4(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubAck(p) => Packet::PubAck(v5::PubAck::new(p.pkid, None)),
        v4::Packet::PubRec(p) => Packet::PubRec(v5::PubRec::new(p.pkid, None)),
        v4::Packet::PubRel(p) => Packet::PubRel(v5::PubRel::new(p.pkid, None)),
        v4::Packet::PubComp(p) => Packet::PubComp(v5::PubComp::new(p.pkid, None)),
        v4::Packet::Subscribe(s) => Packet::Subscribe(v5::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| v5::Filter {
                    path: f.path,
                    qos: qos4(f.qos),
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: v5::RetainForwardRule::OnEverySubscribe,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe(v5::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
            properties: None,
        }),
        v4::Packet::PingReq => Packet::PingReq(v5::PingReq),
        v4::Packet::Disconnect => Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )),
        // What a server sends: read too, so that a client (a test) can use
        // this codec; the server refuses them from a client.
        v4::Packet::ConnAck(a) => Packet::ConnAck(v5::ConnAck {
            session_present: a.session_present,
            code: match a.code {
                v4::ConnectReturnCode::Success => v5::ConnectReturnCode::Success,
                v4::ConnectReturnCode::RefusedProtocolVersion => {
                    v5::ConnectReturnCode::UnsupportedProtocolVersion
                }
                v4::ConnectReturnCode::BadClientId => {
                    v5::ConnectReturnCode::ClientIdentifierNotValid
                }
                v4::ConnectReturnCode::ServiceUnavailable => {
                    v5::ConnectReturnCode::ServerUnavailable
                }
                v4::ConnectReturnCode::BadUserNamePassword => {
                    v5::ConnectReturnCode::BadUserNamePassword
                }
                v4::ConnectReturnCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
            },
            properties: None,
        }),
        v4::Packet::SubAck(a) => Packet::SubAck(v5::SubAck {
            pkid: a.pkid,
            return_codes: a
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => {
                        v5::SubscribeReasonCode::Success(qos4(q))
                    }
                    v4::SubscribeReasonCode::Failure => v5::SubscribeReasonCode::Failure,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::UnsubAck(a) => Packet::UnsubAck(v5::UnsubAck {
            pkid: a.pkid,
            reasons: Vec::new(),
            properties: None,
        }),
        v4::Packet::PingResp => Packet::PingResp(v5::PingResp),
    })
}

fn to_v4(packet: &Packet) -> Option<v4::Packet> {
    Some(match packet {
        Packet::ConnAck(a) => v4::Packet::ConnAck(v4::ConnAck {
            session_present: a.session_present,
            code: match a.code {
                v5::ConnectReturnCode::Success => v4::ConnectReturnCode::Success,
                v5::ConnectReturnCode::UnsupportedProtocolVersion
                | v5::ConnectReturnCode::RefusedProtocolVersion => {
                    v4::ConnectReturnCode::RefusedProtocolVersion
                }
                v5::ConnectReturnCode::ClientIdentifierNotValid
                | v5::ConnectReturnCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                v5::ConnectReturnCode::BadUserNamePassword => {
                    v4::ConnectReturnCode::BadUserNamePassword
                }
                v5::ConnectReturnCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                _ => v4::ConnectReturnCode::ServiceUnavailable,
            },
        }),
        Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos5(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck::new(a.pkid)),
        Packet::PubRec(a) => v4::Packet::PubRec(v4::PubRec::new(a.pkid)),
        Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel::new(a.pkid)),
        Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp::new(a.pkid)),
        Packet::SubAck(a) => v4::Packet::SubAck(v4::SubAck::new(
            a.pkid,
            a.return_codes
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => {
                        v4::SubscribeReasonCode::Success(qos5(*q))
                    }
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::UnsubAck(a) => v4::Packet::UnsubAck(v4::UnsubAck::new(a.pkid)),
        Packet::PingResp(_) => v4::Packet::PingResp,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_bytes(packet: v4::Packet) -> BytesMut {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).unwrap();
        out
    }

    #[test]
    fn a_will_kept_for_the_connection_holds_none_of_the_read_buffer() {
        let mut connect = v4::Connect::new("t1");
        connect.last_will = Some(v4::LastWill::new(
            "terminals/t1/status",
            r#"{"state": "offline"}"#,
            m4::QoS::AtLeastOnce,
            true,
        ));
        let mut buf = BytesMut::with_capacity(8 * 1024);
        buf.extend_from_slice(&v4_bytes(v4::Packet::Connect(connect)));
        let start = buf.as_ptr() as usize;
        let read_buffer = start..start + buf.capacity();
        let (_, packet) = read_connect(&mut buf, 1 << 20).unwrap().unwrap();
        let Packet::Connect(_, Some(will), _) = packet else {
            panic!("{packet:?}")
        };
        // as read, the will is a slice of the buffer: kept, it would keep it
        assert!(read_buffer.contains(&(will.message.as_ptr() as usize)));
        let will = detach_will(will);
        assert_eq!(&will.message[..], br#"{"state": "offline"}"#);
        assert_eq!(&will.topic[..], b"terminals/t1/status");
        assert!(!read_buffer.contains(&(will.message.as_ptr() as usize)));
        assert!(!read_buffer.contains(&(will.topic.as_ptr() as usize)));
    }

    #[test]
    fn a_3_1_1_connect_with_keep_alive_0_is_read() {
        let mut connect = v4::Connect::new("t1");
        connect.keep_alive = 0;
        connect.clean_session = false;
        let mut buf = v4_bytes(v4::Packet::Connect(connect));
        let (protocol, packet) = read_connect(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(protocol, Protocol::V4);
        let Packet::Connect(c, None, None) = packet else {
            panic!("{packet:?}")
        };
        assert_eq!(
            (c.client_id.as_str(), c.keep_alive, c.clean_start),
            ("t1", 0, false)
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn an_mqtt_5_connect_is_read_with_its_properties() {
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: "t5".into(),
            clean_start: true,
            properties: Some(v5::ConnectProperties {
                session_expiry_interval: Some(60),
                receive_maximum: Some(10),
                max_packet_size: None,
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: vec![],
                authentication_method: None,
                authentication_data: None,
            }),
        };
        let mut buf = BytesMut::new();
        Packet::Connect(connect, None, None)
            .write(&mut buf, None)
            .unwrap();
        let (protocol, packet) = read_connect(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(protocol, Protocol::V5);
        let Packet::Connect(c, ..) = packet else {
            panic!()
        };
        assert_eq!(c.properties.unwrap().session_expiry_interval, Some(60));
    }

    #[test]
    fn partial_frames_wait_and_hostile_headers_are_errors() {
        let mut publish = v4::Publish::new("a/b", m4::QoS::AtLeastOnce, vec![1u8; 300]);
        publish.pkid = 1;
        let full = v4_bytes(v4::Packet::Publish(publish));
        for cut in [0, 1, 2, 100, full.len() - 1] {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(
                read(&mut part, Protocol::V4, 1 << 20),
                Ok(None),
                "cut at {cut}"
            );
        }
        let mut big = full.clone();
        assert!(matches!(
            read(&mut big, Protocol::V4, 100),
            Err(ReadError::TooLarge { .. })
        ));
        let mut endless = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(read(&mut endless, Protocol::V4, usize::MAX).is_err());
        let mut not_connect = full.clone();
        assert_eq!(
            read_connect(&mut not_connect, 1 << 20),
            Err(ReadError::NotConnect)
        );
        let mut mqisdp = BytesMut::from(
            &[
                0x10u8, 12, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 10,
            ][..],
        );
        assert_eq!(
            read_connect(&mut mqisdp, 1 << 20),
            Err(ReadError::UnsupportedProtocol(3))
        );
        // garbage with a valid length is malformed, never a panic
        let mut garbage = BytesMut::from(&[0x82u8, 3, 0, 0, 0][..]);
        assert!(matches!(
            read(&mut garbage, Protocol::V4, 1 << 20),
            Err(ReadError::Malformed(_))
        ));
    }

    /// Every byte string, whole or cut, garbled or not, is a packet, an
    /// error or "more to come" — never a panic (a poor man's fuzzer, run on
    /// every `cargo test`).
    #[test]
    fn hostile_bytes_never_panic_the_codec() {
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        let mut publish = v4::Publish::new(
            "terminals/T1/telemetry",
            m4::QoS::ExactlyOnce,
            vec![7u8; 40],
        );
        publish.pkid = 9;
        seeds.push(v4_bytes(v4::Packet::Publish(publish)).to_vec());
        let mut connect = v4::Connect::new("t");
        connect.last_will = Some(v4::LastWill::new("w/t", "bye", m4::QoS::AtLeastOnce, true));
        connect.set_login("user", "pass");
        seeds.push(v4_bytes(v4::Packet::Connect(connect)).to_vec());
        seeds.push(
            v4_bytes(v4::Packet::Subscribe(v4::Subscribe::new(
                "a/#",
                m4::QoS::AtLeastOnce,
            )))
            .to_vec(),
        );
        let mut v5_publish = BytesMut::new();
        Packet::Publish(v5::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Bytes::from_static(b"a/b"),
            pkid: 3,
            payload: Bytes::from_static(b"{}"),
            properties: Some(v5::PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(5),
                topic_alias: Some(2),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into())],
                subscription_identifiers: vec![],
                content_type: Some("json".into()),
            }),
        })
        .write(&mut v5_publish, None)
        .unwrap();
        seeds.push(v5_publish.to_vec());
        // xorshift: the same cases every run
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let mut bytes = seeds[round % seeds.len()].clone();
            match next() % 4 {
                0 => {
                    let cut = (next() as usize) % (bytes.len() + 1);
                    bytes.truncate(cut);
                }
                1 => {
                    for _ in 0..1 + next() % 4 {
                        let i = (next() as usize) % bytes.len();
                        bytes[i] = next() as u8;
                    }
                }
                2 => bytes = (0..next() % 64).map(|_| next() as u8).collect(),
                _ => {
                    let i = (next() as usize) % bytes.len();
                    bytes.insert(i, next() as u8);
                }
            }
            for protocol in [Protocol::V4, Protocol::V5] {
                let mut buf = BytesMut::from(&bytes[..]);
                // read until nothing more comes out, as a connection would
                for _ in 0..8 {
                    match read(&mut buf, protocol, 1 << 16) {
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => break,
                    }
                }
                let mut buf = BytesMut::from(&bytes[..]);
                let _ = read_connect(&mut buf, 1 << 16);
            }
        }
    }

    #[test]
    fn short_mqtt_5_disconnects_are_read() {
        let mut buf = BytesMut::from(&[0xE0u8, 0][..]);
        assert!(matches!(
            read(&mut buf, Protocol::V5, 1 << 20),
            Ok(Some(Packet::Disconnect(d))) if d.reason_code == v5::DisconnectReasonCode::NormalDisconnection
        ));
        let mut buf = BytesMut::from(&[0xE0u8, 1, 0x04][..]);
        assert!(matches!(
            read(&mut buf, Protocol::V5, 1 << 20),
            Ok(Some(Packet::Disconnect(d))) if d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage
        ));
        let mut buf = BytesMut::from(&[0xE0u8, 1, 0x03][..]);
        assert!(
            read(&mut buf, Protocol::V5, 1 << 20).is_err(),
            "no such reason"
        );
    }

    #[test]
    fn mqtt_5_packets_are_written_in_3_1_1_form() {
        let publish = Packet::Publish(v5::Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: Bytes::from_static(b"x/y"),
            pkid: 7,
            payload: Bytes::from_static(b"hi"),
            properties: None,
        });
        let mut out = BytesMut::new();
        write(&publish, Protocol::V4, &mut out).unwrap();
        let back = v4::Packet::read(&mut out, usize::MAX).unwrap();
        let v4::Packet::Publish(p) = back else {
            panic!()
        };
        assert_eq!(
            (p.topic.as_str(), p.pkid, p.retain, p.qos),
            ("x/y", 7, true, m4::QoS::ExactlyOnce)
        );
    }
}
