//! The ingest log: what the pipeline decoded, in the order it decoded it.
//!
//! Every micro-batch is appended to the log before its messages are
//! acknowledged (DESIGN §4), and the log is what a restart replays. A record
//! is one of:
//!
//! - **a batch**: the rows one stream decoded from a group of messages, as an
//!   Arrow IPC stream (LZ4-compressed; `benches/pipeline.rs` measures the
//!   encodings) with two extra columns — each row's event time and the index
//!   of the message it came from — plus, per message, its topic, arrival
//!   time and identity;
//! - **a watermark**: an idle stream's watermark moved by the wall clock.
//!   The wall clock is not replayable, so its effect is logged like data:
//!   replaying the log closes exactly the windows the original run closed,
//!   at the same point in the data, and an event that was late stays late.
//!
//! Records are keyed by a sequence number, `max(previous + 1, now_ms << 16)`:
//! increasing across restarts and, shifted right by 16, the wall time the
//! record was appended, which retention uses. Each record ends with a CRC-32
//! of its bytes, so a partial write is recognised and discarded at start-up.
//!
//! ## Not counting a redelivery twice
//!
//! With QoS 1, a message whose PUBACK did not reach the broker (weir crashed
//! after the append, or the connection dropped) is delivered again with the
//! DUP flag. Each QoS 1 message's identity — its packet id and an XXH3 digest
//! of topic and payload — is logged with its batch. [`Dedup`] holds the
//! identities of the last [`DEDUP_WINDOW`] messages (rebuilt from the log at
//! start-up); a message flagged DUP whose identity is there is acknowledged
//! and dropped instead of being appended again. Packet ids are reused only
//! after 65,535 deliveries and a redelivery comes within the broker's
//! inflight window, so a DUP message that matches is the same message.
//! A message without the DUP flag is never dropped: a device that really
//! sends the same payload twice is counted twice.

use std::collections::{HashSet, VecDeque};
use std::io::Cursor;
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, Int64Array, RecordBatch, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, UInt32Type};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use datafusion::arrow::ipc::CompressionType;

/// Identities of this many recent QoS 1 messages are kept for dedup.
pub const DEDUP_WINDOW: usize = 65_536;

const KIND_BATCH: u8 = 1;
const KIND_WATERMARK: u8 = 2;
const EVENT_TIME_COLUMN: &str = "__weir_event_time";
const MESSAGE_COLUMN: &str = "__weir_message";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("log record {seq}: checksum mismatch or truncated ({len} bytes): a partial write")]
    Partial { seq: u64, len: usize },
    #[error("log record {seq}: {message}")]
    Invalid { seq: u64, message: String },
    #[error("cannot encode a log record: {0}")]
    Encode(#[from] ArrowError),
}

/// Who a QoS 1 message was: packet id and a digest of topic and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId {
    pub pkid: u16,
    pub digest: u64,
}

impl MessageId {
    pub fn of(pkid: u16, topic: &str, payload: &[u8]) -> Self {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(topic.as_bytes());
        h.update(&[0]);
        h.update(payload);
        Self {
            pkid,
            digest: h.digest(),
        }
    }
}

/// What the log keeps of a message besides its rows (for dead letters and dedup).
#[derive(Debug, Clone, PartialEq)]
pub struct MessageMeta {
    pub topic: String,
    pub received_at: i64,
    pub id: Option<MessageId>,
}

/// One stream's decoded rows from one micro-batch.
#[derive(Debug, Clone)]
pub struct LoggedBatch {
    pub stream: String,
    /// Wall time of the append, epoch ms: the arrival time the watermark sees.
    pub appended_at: i64,
    pub messages: Vec<MessageMeta>,
    pub data: RecordBatch,
    pub event_time: Int64Array,
    /// For each row, its message's index in `messages`.
    pub message_index: UInt32Array,
}

#[derive(Debug, Clone)]
pub enum Record {
    Batch(Box<LoggedBatch>),
    /// An idle stream's watermark, moved by the wall clock.
    Watermark {
        stream: String,
        watermark: i64,
    },
}

/// The next sequence number after `previous` at wall time `now_ms`.
pub fn next_seq(previous: u64, now_ms: i64) -> u64 {
    (previous + 1).max((now_ms.max(0) as u64) << 16)
}

/// The smallest sequence number appended at or after wall time `t_ms`.
pub fn seq_at(t_ms: i64) -> u64 {
    (t_ms.max(0) as u64) << 16
}

/// How a batch's rows are encoded in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Plain,
    Lz4,
    Zstd,
}

pub fn encode(record: &Record) -> Result<Vec<u8>, LogError> {
    encode_with(record, Encoding::Lz4)
}

pub fn encode_with(record: &Record, encoding: Encoding) -> Result<Vec<u8>, LogError> {
    let mut out = Vec::new();
    match record {
        Record::Watermark { stream, watermark } => {
            out.push(KIND_WATERMARK);
            put_str(&mut out, stream);
            out.extend_from_slice(&watermark.to_le_bytes());
        }
        Record::Batch(b) => {
            out.push(KIND_BATCH);
            put_str(&mut out, &b.stream);
            out.extend_from_slice(&b.appended_at.to_le_bytes());
            out.extend_from_slice(&(b.messages.len() as u32).to_le_bytes());
            for m in &b.messages {
                put_str(&mut out, &m.topic);
                out.extend_from_slice(&m.received_at.to_le_bytes());
                match m.id {
                    Some(id) => {
                        out.push(1);
                        out.extend_from_slice(&id.pkid.to_le_bytes());
                        out.extend_from_slice(&id.digest.to_le_bytes());
                    }
                    None => out.push(0),
                }
            }
            let mut fields: Vec<Field> = b
                .data
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            fields.push(Field::new(EVENT_TIME_COLUMN, DataType::Int64, false));
            fields.push(Field::new(MESSAGE_COLUMN, DataType::UInt32, false));
            let mut columns = b.data.columns().to_vec();
            columns.push(Arc::new(b.event_time.clone()));
            columns.push(Arc::new(b.message_index.clone()));
            let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
            let options = IpcWriteOptions::default().try_with_compression(match encoding {
                Encoding::Plain => None,
                Encoding::Lz4 => Some(CompressionType::LZ4_FRAME),
                Encoding::Zstd => Some(CompressionType::ZSTD),
            })?;
            let mut writer =
                StreamWriter::try_new_with_options(&mut out, &batch.schema(), options)?;
            writer.write(&batch)?;
            writer.finish()?;
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

pub fn decode(seq: u64, bytes: &[u8]) -> Result<Record, LogError> {
    let partial = || LogError::Partial {
        seq,
        len: bytes.len(),
    };
    let invalid = |message: String| LogError::Invalid { seq, message };
    let (body, crc) = bytes
        .split_at_checked(bytes.len().wrapping_sub(4))
        .ok_or_else(partial)?;
    let crc = u32::from_le_bytes(crc.try_into().map_err(|_| partial())?);
    if crc32fast::hash(body) != crc {
        return Err(partial());
    }
    let mut r = Reader { bytes: body, at: 0 };
    let short = || invalid("record shorter than its header says".into());
    match r.u8().ok_or_else(short)? {
        KIND_WATERMARK => {
            let stream = r.str().ok_or_else(short)?;
            let watermark = r.i64().ok_or_else(short)?;
            Ok(Record::Watermark { stream, watermark })
        }
        KIND_BATCH => {
            let stream = r.str().ok_or_else(short)?;
            let appended_at = r.i64().ok_or_else(short)?;
            let n = r.u32().ok_or_else(short)? as usize;
            let mut messages = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                let topic = r.str().ok_or_else(short)?;
                let received_at = r.i64().ok_or_else(short)?;
                let id = match r.u8().ok_or_else(short)? {
                    0 => None,
                    _ => Some(MessageId {
                        pkid: r.u16().ok_or_else(short)?,
                        digest: r.u64().ok_or_else(short)?,
                    }),
                };
                messages.push(MessageMeta {
                    topic,
                    received_at,
                    id,
                });
            }
            let mut reader = StreamReader::try_new(Cursor::new(&body[r.at..]), None)
                .map_err(|e| invalid(e.to_string()))?;
            let batch = reader
                .next()
                .ok_or_else(|| invalid("no rows in a batch record".into()))?
                .map_err(|e| invalid(e.to_string()))?;
            let width = batch.num_columns();
            if width < 2 {
                return Err(invalid("batch record without its time columns".into()));
            }
            let event_time = batch
                .column(width - 2)
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| invalid("event time column is not Int64".into()))?
                .clone();
            let message_index = batch
                .column(width - 1)
                .as_primitive_opt::<UInt32Type>()
                .ok_or_else(|| invalid("message column is not UInt32".into()))?
                .clone();
            if message_index.values().iter().any(|&i| i as usize >= n) {
                return Err(invalid("row refers to a message not in the record".into()));
            }
            let data = batch.project(&(0..width - 2).collect::<Vec<_>>())?;
            Ok(Record::Batch(Box::new(LoggedBatch {
                stream,
                appended_at,
                messages,
                data,
                event_time,
                message_index,
            })))
        }
        other => Err(invalid(format!("unknown record kind {other}"))),
    }
}

/// The identities of a batch record's messages, packed for the id index.
pub fn pack_ids(messages: &[MessageMeta]) -> Vec<u8> {
    let mut out = Vec::new();
    for id in messages.iter().filter_map(|m| m.id) {
        out.extend_from_slice(&id.pkid.to_le_bytes());
        out.extend_from_slice(&id.digest.to_le_bytes());
    }
    out
}

pub fn unpack_ids(bytes: &[u8]) -> impl Iterator<Item = MessageId> + '_ {
    bytes.chunks_exact(10).map(|c| MessageId {
        pkid: u16::from_le_bytes([c[0], c[1]]),
        digest: u64::from_le_bytes([c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]]),
    })
}

/// The identities of the last `capacity` logged QoS 1 messages.
#[derive(Debug)]
pub struct Dedup {
    order: VecDeque<MessageId>,
    set: HashSet<MessageId, ahash::RandomState>,
    capacity: usize,
}

impl Dedup {
    pub fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::with_capacity(capacity.min(1 << 16)),
            set: HashSet::with_capacity_and_hasher(capacity.min(1 << 16), Default::default()),
            capacity,
        }
    }

    pub fn contains(&self, id: &MessageId) -> bool {
        self.set.contains(id)
    }

    pub fn insert(&mut self, id: MessageId) {
        if self.capacity == 0 || !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&bytes[..len]);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        self.take(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;

    fn rows_per_message(batch: &LoggedBatch) -> Vec<usize> {
        let mut counts = vec![0; batch.messages.len()];
        for &i in batch.message_index.values().iter() {
            if let Some(c) = counts.get_mut(i as usize) {
                *c += 1;
            }
        }
        counts
    }

    fn sample() -> LoggedBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false)]));
        let data = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(vec!["t-1", "t-2", "t-1"]))],
        )
        .unwrap();
        LoggedBatch {
            stream: "telemetry".into(),
            appended_at: 1_700_000_000_123,
            messages: vec![
                MessageMeta {
                    topic: "terminals/t-1/telemetry".into(),
                    received_at: 1_700_000_000_100,
                    id: Some(MessageId::of(7, "terminals/t-1/telemetry", b"[..]")),
                },
                MessageMeta {
                    topic: "terminals/t-2/telemetry".into(),
                    received_at: 1_700_000_000_101,
                    id: None,
                },
            ],
            data,
            event_time: Int64Array::from(vec![10, 20, 30]),
            message_index: UInt32Array::from(vec![0, 1, 0]),
        }
    }

    #[test]
    fn batch_records_round_trip_in_every_encoding() {
        for encoding in [Encoding::Plain, Encoding::Lz4, Encoding::Zstd] {
            let bytes = encode_with(&Record::Batch(Box::new(sample())), encoding).unwrap();
            let Record::Batch(back) = decode(5, &bytes).unwrap() else {
                panic!("not a batch");
            };
            let want = sample();
            assert_eq!(back.stream, want.stream);
            assert_eq!(back.appended_at, want.appended_at);
            assert_eq!(back.messages, want.messages);
            assert_eq!(back.data, want.data);
            assert_eq!(back.event_time, want.event_time);
            assert_eq!(back.message_index, want.message_index);
            assert_eq!(rows_per_message(&back), vec![2, 1]);
        }
    }

    #[test]
    fn watermark_records_round_trip() {
        let record = Record::Watermark {
            stream: "s".into(),
            watermark: -5,
        };
        match decode(1, &encode(&record).unwrap()).unwrap() {
            Record::Watermark { stream, watermark } => {
                assert_eq!((stream.as_str(), watermark), ("s", -5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_truncated_or_flipped_record_is_a_partial_write() {
        let bytes = encode(&Record::Batch(Box::new(sample()))).unwrap();
        for cut in [0, 1, 3, bytes.len() / 2, bytes.len() - 1] {
            assert!(matches!(
                decode(9, &bytes[..cut]),
                Err(LogError::Partial { seq: 9, .. })
            ));
        }
        let mut flipped = bytes.clone();
        flipped[10] ^= 0x40;
        assert!(matches!(decode(9, &flipped), Err(LogError::Partial { .. })));
    }

    #[test]
    fn sequence_numbers_increase_and_carry_the_append_time() {
        let a = next_seq(0, 1_700_000_000_000);
        let b = next_seq(a, 1_700_000_000_000);
        let c = next_seq(b, 1_699_999_999_000); // the clock stepped back
        assert!(a < b && b < c);
        assert_eq!(a >> 16, 1_700_000_000_000);
        assert!(seq_at(1_700_000_000_001) > b);
    }

    #[test]
    fn dedup_remembers_a_bounded_window() {
        let mut d = Dedup::new(2);
        let id = |p| MessageId { pkid: p, digest: 1 };
        d.insert(id(1));
        d.insert(id(2));
        d.insert(id(2));
        assert!(d.contains(&id(1)) && d.contains(&id(2)));
        d.insert(id(3));
        assert!(!d.contains(&id(1)));
        assert_eq!(d.len(), 2);
        let packed = pack_ids(&sample().messages);
        assert_eq!(
            unpack_ids(&packed).collect::<Vec<_>>(),
            vec![sample().messages[0].id.unwrap()]
        );
    }
}
