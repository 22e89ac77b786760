//! What every fuzzer checks, shared by the coverage-guided targets under
//! `fuzz/` (cargo-fuzz, libFuzzer) and the mutation fuzzer in the normal
//! test suite (`tests/fuzz_inputs.rs`). Each check feeds one input to a
//! parser of outside input and panics when an invariant breaks; a parser
//! that panics by itself is a finding too.

use bytes::Bytes;

use crate::source::decode::{Decoder, Limits, Message, PAYLOAD_LIMIT};

/// The shipped telemetry pipeline: the decoder is fuzzed with its stream.
const SHIPPED: &str = include_str!("../config/pipelines/10_telemetry.sql");

/// The topics a decoder input is published on: a good one, an empty
/// `{terminal_id}` level, and two that do not match.
const TOPICS: [&str; 4] = [
    "terminals/T1/telemetry",
    "terminals//telemetry",
    "terminals/T1",
    "x/y/z",
];

/// When every decoded message arrives, epoch ms.
const RECEIVED_AT: i64 = 1_700_000_000_000;

/// The JSON decoder with topic binding, under small limits so that inputs
/// reach them.
pub struct DecoderCheck {
    decoder: Decoder,
    limits: Limits,
}

impl DecoderCheck {
    pub fn new() -> DecoderCheck {
        let pipeline = crate::plan::plan_sources(&[("10_telemetry.sql".into(), SHIPPED.into())])
            .unwrap_or_else(|e| panic!("the shipped pipeline does not plan: {e:?}"));
        let stream = pipeline.streams[0].clone();
        let limits = Limits {
            max_message_bytes: 64 * 1024,
            max_text_bytes: 64,
            max_rows_per_message: 50,
            max_future_ms: 3_600_000,
        };
        DecoderCheck {
            decoder: Decoder::new(stream, limits),
            limits,
        }
    }

    /// A raw fuzzer input: a first byte 1, 2 or 3 picks that topic for the
    /// rest; any other input is a payload on the good topic (so that seeds
    /// of plain JSON reach the decoder's row handling).
    pub fn check_input(&self, data: &[u8]) {
        match data.split_first() {
            Some((&pick @ 1..=3, payload)) => self.check(pick, payload),
            _ => self.check(0, data),
        }
    }

    /// Decodes `payload` as one message on the topic `pick` selects: rows
    /// and event times stay within the limits, and a message yields at most
    /// one dead letter with its payload cut.
    pub fn check(&self, pick: u8, payload: &[u8]) {
        let message = Message {
            topic: TOPICS[pick as usize % TOPICS.len()].to_string(),
            payload: Bytes::copy_from_slice(payload),
            received_at: RECEIVED_AT,
            ack: None,
            dup: false,
        };
        let mut rejects = Vec::new();
        let decoded = self.decoder.decode(&[message], &mut rejects);
        let rows = decoded.batch.num_rows();
        assert!(rows <= self.limits.max_rows_per_message, "{rows} rows");
        assert_eq!(decoded.event_time.len(), rows);
        assert!(rejects.len() <= 1, "one dead letter per message");
        for r in &rejects {
            assert!(r.payload.len() <= PAYLOAD_LIMIT + 64, "dead letter not cut");
        }
        for t in decoded.event_time.values() {
            assert!(
                *t >= 0 && *t <= RECEIVED_AT + self.limits.max_future_ms,
                "event time {t} out of bounds"
            );
        }
    }
}

impl Default for DecoderCheck {
    fn default() -> Self {
        DecoderCheck::new()
    }
}

/// `weir check` on arbitrary text: it plans or reports errors, each naming
/// the file.
pub fn check_planner(input: &[u8]) {
    let text = String::from_utf8_lossy(input).into_owned();
    if let Err(errors) = crate::plan::plan_sources(&[("f.sql".into(), text)]) {
        assert!(!errors.is_empty(), "a failed plan reports an error");
        for e in errors {
            let shown = e.to_string();
            assert!(shown.contains("f.sql"), "errors name the file: {shown}");
        }
    }
}

/// The config parser on arbitrary text: it loads or says why not.
pub fn check_config(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    if let Err(e) = crate::config::Config::from_text(&text, "weir.toml", std::iter::empty()) {
        assert!(!e.to_string().is_empty(), "a config error says why");
    }
}

/// The pgoutput decoder (what Postgres' logical decoding sends) on arbitrary
/// bytes: a message or an error, never a panic; the text values of a tuple
/// become typed columns or an error naming the column.
pub fn check_pgoutput(input: &[u8]) {
    use crate::postgres::pgoutput::{decode, Message, Value};
    let Ok(message) = decode(input) else { return };
    let values = match message {
        Message::Insert { new, .. } | Message::Update { new, .. } => new,
        Message::Delete { old, .. } => old,
        _ => return,
    };
    let row: Vec<Option<String>> = values
        .into_iter()
        .map(|v| match v {
            Value::Text(t) => Some(t),
            Value::Null | Value::Unchanged => None,
        })
        .collect();
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let schema = Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("n", DataType::Int64, true),
        Field::new("x", DataType::Float64, true),
        Field::new("b", DataType::Boolean, true),
        Field::new("at", crate::plan::timestamp_type(), true),
    ]);
    if let Err(e) = crate::postgres::text_columns(&schema, &[row]) {
        assert!(
            e.starts_with("column "),
            "a conversion error names the column: {e}"
        );
    }
}

/// weir's MQTT server reading what a client sends
/// (`source::server::codec`), before and after authentication: the first
/// byte picks how (even: the bytes open a connection, CONNECT first; odd:
/// a connection already on 3.1.1, bit 1 set, or on MQTT 5), the rest
/// arrive as from the socket. Each read is a packet, "not yet" or an error,
/// never a panic; a packet read takes its bytes, no more than the limit; a
/// PUBLISH read is written as the broker forwards it to a subscriber of
/// either protocol. The filters a SUBSCRIBE and UNSUBSCRIBE carry go into
/// and out of a subscription tree, which must find for each PUBLISH's topic
/// exactly the filters `matches` says match it.
pub fn check_mqtt(input: &[u8]) {
    use crate::source::server::codec::{read, read_connect, write, Packet, Protocol, QoS};
    use crate::source::server::topics::{matches, parse_filter, validate_topic, SubscriptionTree};
    /// Small, so that inputs reach it.
    const MAX: usize = 4096;
    let Some((&mode, bytes)) = input.split_first() else {
        return;
    };
    let mut buf = bytes::BytesMut::from(bytes);
    let protocol = if mode % 2 == 0 {
        match read_connect(&mut buf, MAX) {
            Ok(Some((protocol, _))) => protocol,
            Ok(None) | Err(_) => return,
        }
    } else if mode & 2 != 0 {
        Protocol::V4
    } else {
        Protocol::V5
    };
    let mut tree = SubscriptionTree::default();
    let mut subscribed = std::collections::HashSet::new();
    loop {
        let before = buf.len();
        let Ok(Some(packet)) = read(&mut buf, protocol, MAX) else {
            return;
        };
        let taken = before - buf.len();
        assert!(taken > 0, "a packet read takes its bytes");
        assert!(
            taken <= MAX,
            "a packet of {taken} bytes passed the {MAX}-byte limit"
        );
        match packet {
            Packet::Subscribe(s) => {
                for f in &s.filters {
                    if let Ok((group, filter)) = parse_filter(&f.path) {
                        tree.insert(filter, "c", group, ());
                        subscribed.insert((group.map(str::to_string), filter.to_string()));
                    }
                }
            }
            Packet::Unsubscribe(u) => {
                for path in &u.filters {
                    if let Ok((group, filter)) = parse_filter(path) {
                        let removed = tree.remove(filter, "c", group);
                        let known =
                            subscribed.remove(&(group.map(str::to_string), filter.to_string()));
                        assert_eq!(removed, known, "unsubscribe {path:?}");
                    }
                }
            }
            Packet::Publish(mut publish) => {
                if let Ok(topic) = std::str::from_utf8(&publish.topic) {
                    if validate_topic(topic).is_ok() {
                        let mut found = 0;
                        tree.for_each_match(topic, |_, _, _| found += 1);
                        let want = subscribed.iter().filter(|(_, f)| matches(f, topic)).count();
                        assert_eq!(found, want, "subscriptions matching {topic:?}");
                    }
                }
                // as forwarded: a packet id of the subscriber's session, no alias
                if publish.qos != QoS::AtMostOnce {
                    publish.pkid = 1;
                }
                if let Some(p) = publish.properties.as_mut() {
                    p.topic_alias = None;
                }
                let publish = Packet::Publish(publish);
                for to in [Protocol::V4, Protocol::V5] {
                    let mut out = bytes::BytesMut::new();
                    let _ = write(&publish, to, &mut out);
                }
            }
            _ => {}
        }
        assert_eq!(tree.len(), subscribed.len());
    }
}
