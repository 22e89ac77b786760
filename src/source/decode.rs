//! JSON payloads -> Arrow `RecordBatch`es of a stream's schema.
//!
//! A message holds one object, an array of objects, or newline-delimited
//! objects (DESIGN §2). The decoder walks the JSON with a schema-driven serde
//! visitor straight into typed cells (strings stay borrowed from the payload),
//! so there is no intermediate `serde_json::Value`. A row with a missing
//! `NOT NULL` column or a wrongly typed field is rejected on its own: the
//! visitor records the problem and keeps going, so the good rows of the same
//! message are kept. Only a JSON syntax error rejects the whole message.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Array, Int64Builder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::DataType;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::plan::StreamDef;

/// Why a message or row was rejected (the dead-letter `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Not decodable: bad JSON, not an object, unknown topic.
    Malformed,
    /// Decodable, but does not fit the stream's schema.
    Schema,
    /// Larger than `mqtt.max_packet_bytes`, more rows than
    /// `limits.max_rows_per_message`, or nested deeper than [`MAX_DEPTH`].
    Oversize,
    /// An event time more than `limits.max_future` ahead of its arrival.
    Future,
    /// Its window had already closed.
    Late,
}

impl RejectReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::Schema => "schema",
            RejectReason::Oversize => "oversize",
            RejectReason::Future => "future",
            RejectReason::Late => "late",
        }
    }

    pub fn parse(text: &str) -> Option<RejectReason> {
        Some(match text {
            "malformed" => RejectReason::Malformed,
            "schema" => RejectReason::Schema,
            "oversize" => RejectReason::Oversize,
            "future" => RejectReason::Future,
            "late" => RejectReason::Late,
            _ => return None,
        })
    }

    pub const ALL: [RejectReason; 5] = [
        RejectReason::Malformed,
        RejectReason::Schema,
        RejectReason::Oversize,
        RejectReason::Future,
        RejectReason::Late,
    ];
}

/// A message as it came off the broker.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// Wall-clock arrival, epoch ms.
    pub received_at: i64,
    /// What the source needs to acknowledge the message once it is processed
    /// (QoS 1); `None` for QoS 0.
    pub ack: Option<AckToken>,
    /// The broker's DUP flag: it may have delivered this message before.
    pub dup: bool,
}

/// Identifies a QoS 1 delivery on one connection of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    /// Packet ids are reused after a reconnect, so an ack for an older
    /// connection must not be sent on the new one.
    pub connection: u64,
    pub pkid: u16,
}

/// A rejected message or row: what the dead-letter store keeps and serves.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rejected {
    pub stream: String,
    pub topic: String,
    pub reason: RejectReason,
    pub detail: String,
    /// The raw payload text, truncated to `PAYLOAD_LIMIT` bytes.
    pub payload: String,
    pub received_at: i64,
    /// Rows this dead letter stands for (a whole message counts once).
    #[serde(default = "one")]
    pub rows: u64,
}

fn one() -> u64 {
    1
}

/// How much of a rejected payload the dead-letter store keeps.
pub const PAYLOAD_LIMIT: usize = 4096;

/// JSON nested deeper than this is `oversize` (DESIGN §2).
pub const MAX_DEPTH: usize = 64;

/// Row problems a dead letter spells out; the rest are counted.
const DETAILED_ROWS: usize = 5;

/// What one message may hold (DESIGN §2 "Limits"; `[limits]` and
/// `mqtt.max_packet_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_text_bytes: usize,
    pub max_rows_per_message: usize,
    /// How far ahead of its arrival an event time may be, in ms.
    pub max_future_ms: i64,
}

impl Limits {
    /// The defaults of DESIGN §2, with this message size.
    pub fn with_message_bytes(max_message_bytes: usize) -> Limits {
        Limits {
            max_message_bytes,
            max_text_bytes: 1024,
            max_rows_per_message: 10_000,
            max_future_ms: 3_600_000,
        }
    }
}

/// The start of the parse error for JSON nested deeper than [`MAX_DEPTH`].
const TOO_DEEP: &str = "JSON nested deeper than 64 levels";

/// Skips a value the stream has no column for, counting how deep it nests
/// (`level`: where the value sits, the payload's top being 1): deeper than
/// [`MAX_DEPTH`] is an error. Free for flat payloads: a scalar is one call.
struct Skip(usize);

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.0 > MAX_DEPTH {
            return Err(de::Error::custom(TOO_DEEP));
        }
        while seq.next_element_seed(Skip(self.0 + 1))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.0 > MAX_DEPTH {
            return Err(de::Error::custom(TOO_DEEP));
        }
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Skip(self.0 + 1))?;
        }
        Ok(())
    }
}

pub fn truncate_payload(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(&payload[..payload.len().min(PAYLOAD_LIMIT)]).into_owned();
    if payload.len() > PAYLOAD_LIMIT {
        format!("{text}... ({} bytes in all)", payload.len())
    } else {
        text
    }
}

/// The decoded rows of a stream, with each row's event time (ms).
#[derive(Debug)]
pub struct Decoded {
    pub batch: RecordBatch,
    pub event_time: Int64Array,
    /// For each row, the index of the message it came from.
    pub message_index: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnType {
    Text,
    Int,
    Float,
    Bool,
    Timestamp,
}

/// One decoded field. `Copy`, so a row of cells is set up with a memset: text
/// borrows from the payload, and the rare string that cannot be borrowed (one
/// with JSON escapes) or a field's error message lives in `Scratch::owned`.
#[derive(Debug, Clone, Copy)]
enum Cell<'a> {
    Missing,
    Null,
    Text(&'a str),
    /// Index into `Scratch::owned`.
    OwnedText(u32),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Why the field does not fit its column; index into `Scratch::owned`.
    Bad(u32),
}

/// Per-message working space of the decoder, reused across messages.
#[derive(Default)]
struct Scratch<'a> {
    /// `width` cells per row.
    cells: Vec<Cell<'a>>,
    /// Rows that are not objects: (row, why), in row order.
    problems: Vec<(usize, String)>,
    owned: Vec<String>,
    /// Set when the message had more rows than allowed (parsing stopped).
    too_many_rows: bool,
}

impl<'a> Scratch<'a> {
    fn clear(&mut self) {
        self.cells.clear();
        self.problems.clear();
        self.owned.clear();
        self.too_many_rows = false;
    }

    fn text(&self, cell: &Cell<'a>) -> Option<&str> {
        match *cell {
            Cell::Text(s) => Some(s),
            Cell::OwnedText(i) => self.owned.get(i as usize).map(String::as_str),
            _ => None,
        }
    }
}

fn keep(owned: &mut Vec<String>, text: String) -> u32 {
    owned.push(text);
    (owned.len() - 1) as u32
}

enum ColumnBuilder {
    Text(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Timestamp(TimestampMillisecondBuilder),
}

/// Decodes the messages of one stream. Reusable across batches.
pub struct Decoder {
    stream: Arc<StreamDef>,
    names: Vec<String>,
    types: Vec<ColumnType>,
    nullable: Vec<bool>,
    event_time_column: Option<usize>,
    /// Column of each `{name}` level of the topic, in `TopicPattern::bindings` order.
    bound_columns: Vec<Option<usize>>,
    limits: Limits,
}

impl Decoder {
    pub fn new(stream: Arc<StreamDef>, limits: Limits) -> Self {
        let schema = stream.schema.clone();
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let types = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Utf8 => ColumnType::Text,
                DataType::Int64 => ColumnType::Int,
                DataType::Float64 => ColumnType::Float,
                DataType::Boolean => ColumnType::Bool,
                _ => ColumnType::Timestamp,
            })
            .collect();
        let nullable = schema.fields().iter().map(|f| f.is_nullable()).collect();
        let event_time_column = stream.event_time_index();
        // planning checked that every binding names a column; None keeps the zip aligned regardless
        let bound_columns = stream
            .topic
            .bindings()
            .map(|b| names.iter().position(|n| n == b))
            .collect();
        Self {
            stream,
            names,
            types,
            nullable,
            event_time_column,
            bound_columns,
            limits,
        }
    }

    /// Decodes `messages` into one batch; rejected messages and rows are appended to `rejects`.
    pub fn decode(&self, messages: &[Message], rejects: &mut Vec<Rejected>) -> Decoded {
        let width = self.names.len();
        let mut builders: Vec<ColumnBuilder> = self
            .types
            .iter()
            .map(|t| match t {
                ColumnType::Text => ColumnBuilder::Text(StringBuilder::new()),
                ColumnType::Int => ColumnBuilder::Int(Int64Builder::new()),
                ColumnType::Float => ColumnBuilder::Float(Float64Builder::new()),
                ColumnType::Bool => ColumnBuilder::Bool(BooleanBuilder::new()),
                ColumnType::Timestamp => ColumnBuilder::Timestamp(
                    TimestampMillisecondBuilder::new().with_timezone("UTC"),
                ),
            })
            .collect();
        let mut event_time = Int64Builder::new();
        let mut message_index = Vec::new();
        let mut scratch = Scratch::default();

        let limits = self.limits;
        // Rows of one message that were turned away: (row, reason, why).
        let mut bad: Vec<(usize, RejectReason, String)> = Vec::new();
        for (m, message) in messages.iter().enumerate() {
            let reject = |reason: RejectReason, detail: String| Rejected {
                stream: self.stream.name.clone(),
                topic: message.topic.clone(),
                reason,
                detail,
                payload: truncate_payload(&message.payload),
                received_at: message.received_at,
                rows: 1,
            };
            if message.payload.len() > limits.max_message_bytes {
                rejects.push(reject(
                    RejectReason::Oversize,
                    format!(
                        "message of {} bytes exceeds the limit of {} bytes",
                        message.payload.len(),
                        limits.max_message_bytes
                    ),
                ));
                continue;
            }
            let Some(bound) = self.stream.topic.bind(&message.topic) else {
                rejects.push(reject(
                    RejectReason::Malformed,
                    format!(
                        "topic {} does not match {}",
                        message.topic,
                        self.stream.topic.as_str()
                    ),
                ));
                continue;
            };
            if let Some((name, value)) = bound.iter().find(|(_, v)| v.len() > limits.max_text_bytes)
            {
                rejects.push(reject(
                    RejectReason::Schema,
                    format!(
                        "topic level {name} of {} bytes exceeds limits.max_text_bytes ({})",
                        value.len(),
                        limits.max_text_bytes
                    ),
                ));
                continue;
            }
            scratch.clear();
            let text = match std::str::from_utf8(&message.payload) {
                Ok(text) => text,
                Err(e) => {
                    rejects.push(reject(
                        RejectReason::Malformed,
                        format!("payload is not UTF-8: {e}"),
                    ));
                    continue;
                }
            };
            if let Err(e) = self.parse_payload(text, &mut scratch) {
                rejects.push(if e.to_string().starts_with(TOO_DEEP) {
                    reject(RejectReason::Oversize, TOO_DEEP.to_string())
                } else if scratch.too_many_rows {
                    reject(
                        RejectReason::Oversize,
                        format!(
                            "more than limits.max_rows_per_message ({}) rows",
                            limits.max_rows_per_message
                        ),
                    )
                } else {
                    reject(RejectReason::Malformed, format!("invalid JSON: {e}"))
                });
                continue;
            }
            let rows = scratch.cells.len() / width.max(1);
            bad.clear();
            // Problems come in row order: one cursor, no search.
            let mut next_problem = 0;
            for r in 0..rows {
                if let Some((pr, p)) = scratch.problems.get(next_problem) {
                    if *pr == r {
                        next_problem += 1;
                        bad.push((r, RejectReason::Schema, p.clone()));
                        continue;
                    }
                }
                // The topic is authoritative (DESIGN §2): a payload value
                // that disagrees with its topic level is not this
                // publisher's to give, so one terminal cannot speak for another.
                let mut disagrees = None;
                for (column, (_, value)) in self.bound_columns.iter().zip(&bound) {
                    let Some(c) = *column else { continue };
                    let cell = &scratch.cells[r * width + c];
                    if matches!(cell, Cell::Missing | Cell::Null) {
                        scratch.cells[r * width + c] = Cell::Text(value);
                    } else if scratch.text(cell) != Some(*value) {
                        disagrees = Some(format!(
                            "field {} does not match the topic's {} ({value:?})",
                            self.names[c], self.names[c]
                        ));
                        break;
                    }
                }
                if let Some(problem) = disagrees {
                    bad.push((r, RejectReason::Schema, problem));
                    continue;
                }
                let row = &scratch.cells[r * width..(r + 1) * width];
                if let Some(problem) = self.check_row(row, &scratch.owned) {
                    bad.push((r, RejectReason::Schema, problem));
                    continue;
                }
                let t = match self.event_time_column {
                    Some(c) => match row[c] {
                        Cell::Int(t) => t,
                        _ => message.received_at,
                    },
                    None => message.received_at,
                };
                if t < 0 {
                    bad.push((
                        r,
                        RejectReason::Schema,
                        format!("event time {t} is before 1970-01-01"),
                    ));
                    continue;
                }
                if t > message.received_at.saturating_add(limits.max_future_ms) {
                    bad.push((
                        r,
                        RejectReason::Future,
                        format!(
                            "event time {} is more than limits.max_future ({} s) after its arrival {}",
                            crate::obs::format_time(t),
                            limits.max_future_ms / 1000,
                            crate::obs::format_time(message.received_at)
                        ),
                    ));
                    continue;
                }
                for (c, cell) in row.iter().enumerate() {
                    append(&mut builders[c], cell, &scratch);
                }
                event_time.append_value(t);
                message_index.push(m as u32);
            }
            if let Some((_, reason, _)) = bad.first() {
                // One dead letter per message, its payload once, whatever
                // the number of bad rows.
                let mut detail = if bad.len() == 1 && rows == 1 {
                    String::new()
                } else {
                    format!("{} of {rows} rows rejected: ", bad.len())
                };
                for (i, (r, _, why)) in bad.iter().take(DETAILED_ROWS).enumerate() {
                    if i > 0 {
                        detail.push_str("; ");
                    }
                    detail.push_str(&format!("row {r}: {why}"));
                }
                if bad.len() > DETAILED_ROWS {
                    detail.push_str(&format!("; and {} more", bad.len() - DETAILED_ROWS));
                }
                let mut dead = reject(*reason, detail);
                dead.rows = bad.len() as u64;
                rejects.push(dead);
            }
        }
        let columns: Vec<ArrayRef> = builders
            .into_iter()
            .map(|b| -> ArrayRef {
                match b {
                    ColumnBuilder::Text(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::Int(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::Float(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::Bool(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::Timestamp(mut b) => Arc::new(b.finish()),
                }
            })
            .collect();
        let rows = message_index.len();
        let batch = RecordBatch::try_new_with_options(
            self.stream.schema.clone(),
            columns,
            &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(rows)),
        )
        // The builders follow the schema's types and check_row enforces NOT NULL,
        // so the batch always matches the schema.
        .unwrap_or_else(|_| RecordBatch::new_empty(self.stream.schema.clone()));
        Decoded {
            batch,
            event_time: event_time.finish(),
            message_index,
        }
    }

    /// A row is valid when every NOT NULL column has a value and no field had the wrong type.
    fn check_row(&self, row: &[Cell], owned: &[String]) -> Option<String> {
        for (c, cell) in row.iter().enumerate() {
            match cell {
                Cell::Bad(why) => {
                    let why = owned
                        .get(*why as usize)
                        .map_or("invalid value", String::as_str);
                    return Some(format!("field {}: {why}", self.names[c]));
                }
                Cell::Missing | Cell::Null if !self.nullable[c] => {
                    return Some(format!("missing NOT NULL column {}", self.names[c]));
                }
                _ => {}
            }
        }
        if let Some(c) = self.event_time_column {
            if !matches!(row[c], Cell::Int(_)) {
                return Some(format!("missing event time {}", self.names[c]));
            }
        }
        None
    }

    /// Parses a payload already checked to be UTF-8 (once, for the whole
    /// message: `from_str` then skips serde_json's per-string validation).
    fn parse_payload<'a>(
        &self,
        payload: &'a str,
        scratch: &mut Scratch<'a>,
    ) -> Result<(), serde_json::Error> {
        let first = payload.bytes().find(|b| !b.is_ascii_whitespace());
        if first == Some(b'[') {
            let mut de = serde_json::Deserializer::from_str(payload);
            de.deserialize_seq(RowsVisitor {
                decoder: self,
                scratch,
            })?;
            return de.end();
        }
        // One object, or newline-delimited objects.
        let mut de = serde_json::Deserializer::from_str(payload);
        RowSeed {
            decoder: self,
            scratch,
            row: 0,
            level: 1,
        }
        .deserialize(&mut de)?;
        if de.end().is_ok() {
            return Ok(());
        }
        scratch.clear();
        for (row, line) in payload
            .split('\n')
            .filter(|l| !l.trim().is_empty())
            .enumerate()
        {
            if row >= self.limits.max_rows_per_message {
                scratch.too_many_rows = true;
                return Err(de::Error::custom("too many rows"));
            }
            let mut de = serde_json::Deserializer::from_str(line);
            RowSeed {
                decoder: self,
                scratch,
                row,
                level: 1,
            }
            .deserialize(&mut de)?;
            de.end()?;
        }
        Ok(())
    }
}

fn append(builder: &mut ColumnBuilder, cell: &Cell, scratch: &Scratch) {
    match (builder, cell) {
        (ColumnBuilder::Text(b), cell) => match scratch.text(cell) {
            Some(s) => b.append_value(s),
            None => b.append_null(),
        },
        (ColumnBuilder::Int(b), Cell::Int(v)) => b.append_value(*v),
        (ColumnBuilder::Int(b), _) => b.append_null(),
        (ColumnBuilder::Float(b), Cell::Float(v)) => b.append_value(*v),
        (ColumnBuilder::Float(b), Cell::Int(v)) => b.append_value(*v as f64),
        (ColumnBuilder::Float(b), _) => b.append_null(),
        (ColumnBuilder::Bool(b), Cell::Bool(v)) => b.append_value(*v),
        (ColumnBuilder::Bool(b), _) => b.append_null(),
        (ColumnBuilder::Timestamp(b), Cell::Int(v)) => b.append_value(*v),
        (ColumnBuilder::Timestamp(b), _) => b.append_null(),
    }
}

/// Visits a JSON array of rows.
struct RowsVisitor<'d, 'c, 'a> {
    decoder: &'d Decoder,
    scratch: &'c mut Scratch<'a>,
}

impl<'de: 'a, 'a> Visitor<'de> for RowsVisitor<'_, '_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut row = 0;
        loop {
            if row >= self.decoder.limits.max_rows_per_message {
                self.scratch.too_many_rows = true;
                return Err(de::Error::custom("too many rows"));
            }
            let seed = RowSeed {
                decoder: self.decoder,
                scratch: &mut *self.scratch,
                row,
                level: 2,
            };
            if seq.next_element_seed(seed)?.is_none() {
                return Ok(());
            }
            row += 1;
        }
    }
}

/// Decodes one row (a JSON object) into `width` cells.
struct RowSeed<'d, 'c, 'a> {
    decoder: &'d Decoder,
    scratch: &'c mut Scratch<'a>,
    row: usize,
    /// Nesting level of the row (1: the payload is the row).
    level: usize,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for RowSeed<'_, '_, 'a> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for RowSeed<'_, '_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let d = self.decoder;
        let start = self.scratch.cells.len();
        self.scratch
            .cells
            .resize(start + d.names.len(), Cell::Missing);
        // KeySeed finds the column without allocating the key (serde's
        // Cow<str> always would).
        let mut hint = 0;
        while let Some(column) = map.next_key_seed(KeySeed {
            names: &d.names,
            hint: &mut hint,
        })? {
            match column {
                Some(c) => {
                    let cell = map.next_value_seed(CellSeed {
                        column: d.types[c],
                        owned: &mut self.scratch.owned,
                        max_text: d.limits.max_text_bytes,
                        level: self.level + 1,
                    })?;
                    self.scratch.cells[start + c] = cell;
                }
                None => {
                    map.next_value_seed(Skip(self.level + 1))?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip(self.level + 1))?.is_some() {}
        self.not_an_object("an array")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_an_object("a string")
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_an_object("a number")
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_an_object("a number")
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_an_object("a number")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_an_object("a boolean")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_an_object("null")
    }
}

impl RowSeed<'_, '_, '_> {
    fn not_an_object<E>(self, got: &str) -> Result<(), E> {
        // keep the row count aligned: an all-missing row that is reported as a problem
        let width = self.decoder.names.len();
        self.scratch
            .cells
            .resize(self.scratch.cells.len() + width, Cell::Missing);
        self.scratch
            .problems
            .push((self.row, format!("expected a JSON object, got {got}")));
        Ok(())
    }
}

/// Maps an object key to its column index (`None`: not a column) without
/// allocating. Producers write fields in a steady order, so the column after
/// the previous match (`hint`) is tried first: usually one comparison per key.
struct KeySeed<'n, 'h> {
    names: &'n [String],
    hint: &'h mut usize,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_, '_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<usize>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_, '_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        let found = if self.names.get(*self.hint).is_some_and(|n| n == v) {
            Some(*self.hint)
        } else {
            self.names.iter().position(|n| n == v)
        };
        if let Some(c) = found {
            *self.hint = c + 1;
        }
        Ok(found)
    }
}

/// Decodes one field as its column's type; a wrong type becomes `Cell::Bad`.
struct CellSeed<'o> {
    column: ColumnType,
    owned: &'o mut Vec<String>,
    /// Longer text is `Cell::Bad` (it would become keys and rows).
    max_text: usize,
    /// Nesting level of the value.
    level: usize,
}

impl<'de> DeserializeSeed<'de> for CellSeed<'_> {
    type Value = Cell<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Cell<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CellSeed<'_> {
    type Value = Cell<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Cell<'de>, E> {
        Ok(match self.column {
            ColumnType::Text if v.len() > self.max_text => self.too_long(v.len()),
            ColumnType::Text => Cell::Text(v),
            _ => self.text(v),
        })
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cell<'de>, E> {
        Ok(self.text(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cell<'de>, E> {
        Ok(match self.column {
            ColumnType::Int | ColumnType::Timestamp => Cell::Int(v),
            ColumnType::Float => Cell::Float(v as f64),
            _ => self.mismatch("a number"),
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cell<'de>, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) if self.column == ColumnType::Float => Ok(Cell::Float(v as f64)),
            Err(_) => Ok(Cell::Bad(keep(self.owned, format!("{v} is out of range")))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cell<'de>, E> {
        Ok(match self.column {
            ColumnType::Float => Cell::Float(v),
            ColumnType::Int if v.fract() == 0.0 && v.abs() < 9.0e15 => Cell::Int(v as i64),
            ColumnType::Timestamp if v.is_finite() && v.abs() < 9.0e15 => {
                Cell::Int(v.round() as i64)
            }
            _ => self.mismatch("a fractional number"),
        })
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Cell<'de>, E> {
        Ok(match self.column {
            ColumnType::Bool => Cell::Bool(v),
            _ => self.mismatch("a boolean"),
        })
    }

    fn visit_unit<E: de::Error>(self) -> Result<Cell<'de>, E> {
        Ok(Cell::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Cell<'de>, E> {
        Ok(Cell::Null)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Cell<'de>, A::Error> {
        Skip(self.level).visit_map(map)?;
        Ok(self.mismatch("an object"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Cell<'de>, A::Error> {
        Skip(self.level).visit_seq(seq)?;
        Ok(self.mismatch("an array"))
    }
}

impl CellSeed<'_> {
    /// A string that cannot be borrowed (it had escapes), or one for a non-text column.
    fn text<'de>(self, v: &str) -> Cell<'de> {
        match self.column {
            ColumnType::Text if v.len() > self.max_text => self.too_long(v.len()),
            ColumnType::Text => Cell::OwnedText(keep(self.owned, v.to_string())),
            ColumnType::Timestamp => match chrono::DateTime::parse_from_rfc3339(v) {
                Ok(t) => Cell::Int(t.timestamp_millis()),
                Err(e) => Cell::Bad(keep(
                    self.owned,
                    format!("{v:?} is not an RFC 3339 timestamp ({e})"),
                )),
            },
            _ => self.mismatch("a string"),
        }
    }

    fn too_long<'de>(self, len: usize) -> Cell<'de> {
        let max = self.max_text;
        Cell::Bad(keep(
            self.owned,
            format!("text of {len} bytes exceeds limits.max_text_bytes ({max})"),
        ))
    }

    fn mismatch<'de>(self, got: &str) -> Cell<'de> {
        let expected = match self.column {
            ColumnType::Text => "a string",
            ColumnType::Int => "an integer",
            ColumnType::Float => "a number",
            ColumnType::Bool => "a boolean",
            ColumnType::Timestamp => "epoch milliseconds or an RFC 3339 string",
        };
        Cell::Bad(keep(self.owned, format!("expected {expected}, got {got}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan_sources;
    use datafusion::arrow::util::pretty::pretty_format_batches;

    fn decoder() -> Decoder {
        let sql = "CREATE TABLE telemetry (terminal_id TEXT NOT NULL, merchant_id TEXT, ts TIMESTAMP NOT NULL,
            battery_pct DOUBLE, charging BOOLEAN, error_count BIGINT,
            WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
            WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json');";
        let p = plan_sources(&[("t.sql".into(), sql.into())]).unwrap();
        Decoder::new(
            p.streams[0].clone(),
            Limits {
                max_message_bytes: 1024,
                max_text_bytes: 64,
                max_rows_per_message: 100,
                max_future_ms: 3_600_000,
            },
        )
    }

    fn message(topic: &str, payload: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from(payload.to_string()),
            received_at: 777,
            ack: None,
            dup: false,
        }
    }

    fn decode(messages: &[Message]) -> (String, Vec<i64>, Vec<Rejected>) {
        let mut rejects = Vec::new();
        let d = decoder().decode(messages, &mut rejects);
        let text = pretty_format_batches(&[d.batch]).unwrap().to_string();
        (text, d.event_time.values().to_vec(), rejects)
    }

    #[test]
    fn object_array_and_ndjson() {
        let (text, times, rejects) = decode(&[
            message(
                "terminals/T1/telemetry",
                r#"{"ts": 1000, "battery_pct": 50, "charging": true, "extra": {"x": 1}}"#,
            ),
            message(
                "terminals/T2/telemetry",
                r#"[{"ts": "1970-01-01T00:00:02Z", "battery_pct": 40.5}, {"ts": 3000, "terminal_id": "T2"}, {"ts": 3500, "terminal_id": "T9"}]"#,
            ),
            message(
                "terminals/T3/telemetry",
                "{\"ts\": 4000, \"error_count\": 2}\n{\"ts\": 5000}\n",
            ),
        ]);
        // The payload may repeat its topic's terminal_id; it may not name another.
        let details: Vec<_> = rejects
            .iter()
            .map(|r| (r.reason, r.detail.as_str(), r.topic.as_str()))
            .collect();
        assert_eq!(
            details,
            vec![(
                RejectReason::Schema,
                "1 of 3 rows rejected: row 2: field terminal_id does not match the topic's terminal_id (\"T2\")",
                "terminals/T2/telemetry"
            )]
        );
        assert_eq!(times, vec![1000, 2000, 3000, 4000, 5000]);
        assert!(
            text.contains("| T1          |             | 1970-01-01T00:00:01Z | 50.0"),
            "{text}"
        );
        // a payload value that disagrees with the topic level is rejected
        assert!(!text.contains("| T9 "), "{text}");
        assert!(text.contains("| T3 ") && text.contains("| 2 "), "{text}");
    }

    #[test]
    fn bad_rows_are_rejected_alone() {
        let (_, times, rejects) = decode(&[message(
            "terminals/T1/telemetry",
            r#"[{"ts": 1000}, {"ts": 2000, "battery_pct": "full"}, {"battery_pct": 3}, 7, {"ts": 5000}]"#,
        )]);
        assert_eq!(times, vec![1000, 5000]);
        // One dead letter for the message, every bad row in it.
        let details: Vec<_> = rejects
            .iter()
            .map(|r| (r.reason, r.detail.as_str(), r.rows))
            .collect();
        assert_eq!(
            details,
            vec![(
                RejectReason::Schema,
                "3 of 5 rows rejected: row 1: field battery_pct: expected a number, got a string; \
                 row 2: missing NOT NULL column ts; row 3: expected a JSON object, got a number",
                3
            )]
        );
        assert!(rejects[0].payload.contains("\"full\""));
        assert_eq!(rejects[0].received_at, 777);
    }

    #[test]
    fn malformed_and_oversize_messages() {
        let big = format!(r#"{{"ts": 1, "pad": "{}"}}"#, "x".repeat(2000));
        let (_, times, rejects) = decode(&[
            message("terminals/T1/telemetry", "{\"ts\": 1"),
            message("terminals/T1/telemetry", &big),
            message("terminals/T1/other", "{\"ts\": 1}"),
            message("terminals/T1/telemetry", "{\"ts\": 9}"),
        ]);
        assert_eq!(times, vec![9]);
        let reasons: Vec<_> = rejects.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            vec![
                RejectReason::Malformed,
                RejectReason::Oversize,
                RejectReason::Malformed
            ]
        );
        assert!(
            rejects[0].detail.starts_with("invalid JSON"),
            "{}",
            rejects[0].detail
        );
    }

    #[test]
    fn escaped_strings_and_non_utf8() {
        let (text, _, rejects) = decode(&[
            // An escaped payload value that equals its topic level is that level.
            message(
                "terminals/T\\x/telemetry",
                r#"{"ts": 1, "merchant_id": "M\"1\u00e9", "terminal_id": "T\\x"}"#,
            ),
            Message {
                topic: "terminals/T1/telemetry".into(),
                payload: Bytes::from_static(b"{\"ts\": 1, \"merchant_id\": \"\xff\"}"),
                received_at: 1,
                ack: None,
                dup: false,
            },
        ]);
        assert!(
            text.contains(r#"| T\x "#) && text.contains(r#"M"1é"#),
            "{text}"
        );
        assert_eq!(rejects.len(), 1);
        assert!(
            rejects[0].detail.contains("not UTF-8"),
            "{}",
            rejects[0].detail
        );
    }

    #[test]
    fn bad_timestamp_string_is_a_schema_error() {
        let (_, _, rejects) =
            decode(&[message("terminals/T1/telemetry", r#"{"ts": "yesterday"}"#)]);
        assert_eq!(rejects.len(), 1);
        assert_eq!(rejects[0].reason, RejectReason::Schema);
        assert!(
            rejects[0].detail.contains("RFC 3339"),
            "{}",
            rejects[0].detail
        );
    }

    #[test]
    fn limits_turn_hostile_messages_into_one_dead_letter_each() {
        let long = "x".repeat(65);
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let many: String = format!("[{}]", vec!["{}"; 101].join(","));
        let numbers: String = format!("[{}]", vec!["1"; 200].join(","));
        let hour = 3_600_000;
        let (_, times, rejects) = decode(&[
            // a key too long to store, in the payload and as the topic level
            message(
                "terminals/T1/telemetry",
                &format!(r#"{{"ts": 1000, "merchant_id": "{long}"}}"#),
            ),
            message(&format!("terminals/{long}/telemetry"), r#"{"ts": 1000}"#),
            // rows beyond the limit, and nesting beyond 64
            message("terminals/T1/telemetry", &many),
            message("terminals/T1/telemetry", &numbers),
            message("terminals/T1/telemetry", &deep),
            // the far future, the far past
            message(
                "terminals/T1/telemetry",
                &format!(
                    r#"[{{"ts": 2000}}, {{"ts": {}}}, {{"ts": "9999-12-31T00:00:00Z"}}]"#,
                    777 + hour + 1
                ),
            ),
            message(
                "terminals/T1/telemetry",
                &format!(r#"{{"ts": {}}}"#, i64::MIN),
            ),
            message("terminals/T1/telemetry", r#"{"ts": 1e300}"#),
            // and a good one: still counted
            message(
                "terminals/T1/telemetry",
                &format!(r#"{{"ts": {}}}"#, 777 + hour),
            ),
        ]);
        assert_eq!(times, vec![2000, 777 + hour]);
        let got: Vec<_> = rejects
            .iter()
            .map(|r| {
                (
                    r.reason,
                    r.rows,
                    r.detail.split(':').next().unwrap_or("").to_string(),
                )
            })
            .collect();
        use RejectReason::*;
        assert_eq!(got.len(), 8, "{rejects:#?}");
        assert_eq!(got[0].0, Schema);
        assert!(
            rejects[0]
                .detail
                .contains("exceeds limits.max_text_bytes (64)"),
            "{}",
            rejects[0].detail
        );
        assert_eq!(got[1].0, Schema);
        assert!(
            rejects[1]
                .detail
                .contains("topic level terminal_id of 65 bytes"),
            "{}",
            rejects[1].detail
        );
        assert_eq!(
            (got[2].0, got[3].0, got[4].0),
            (Oversize, Oversize, Oversize)
        );
        assert!(rejects[2].detail.contains("max_rows_per_message (100)"));
        assert!(rejects[4].detail.contains("nested deeper than 64"));
        assert_eq!((got[5].0, got[5].1), (Future, 2), "{}", rejects[5].detail);
        assert_eq!(got[6].0, Schema, "{}", rejects[6].detail);
        assert_eq!(got[7].0, Schema, "{}", rejects[7].detail);
        // every payload stored once and cut
        assert!(rejects
            .iter()
            .all(|r| r.payload.len() <= PAYLOAD_LIMIT + 64));
    }

    #[test]
    fn nesting_is_counted_where_it_is_and_strings_do_not_count() {
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let (_, _, rejects) = decode(&[
            // 64 levels: the payload's array, then 63 in the row
            message("terminals/T1/telemetry", &nest(64)),
            message("terminals/T1/telemetry", &nest(65)),
            // an object with an unknown field nesting to 64, and to 65
            message(
                "terminals/T1/telemetry",
                &format!(r#"{{"ts": 1000, "x": {}}}"#, nest(63)),
            ),
            message(
                "terminals/T1/telemetry",
                &format!(r#"{{"ts": 1000, "x": {}}}"#, nest(64)),
            ),
            message(
                "terminals/T1/telemetry",
                &format!(r#"{{"ts": 1000, "x": "{}"}}"#, "[".repeat(500)),
            ),
        ]);
        let reasons: Vec<_> = rejects
            .iter()
            .map(|r| (r.reason, r.detail.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    RejectReason::Schema,
                    "row 0: expected a JSON object, got an array"
                ),
                (RejectReason::Oversize, "JSON nested deeper than 64 levels"),
                (RejectReason::Oversize, "JSON nested deeper than 64 levels"),
            ],
            "{rejects:#?}"
        );
    }
}
