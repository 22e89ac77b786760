//! The prepare stage, on a thread of its own: dedup, routing to streams,
//! JSON -> Arrow decoding and the log records' encoding (Arrow IPC + LZ4).
//! This is most of the CPU an event costs before the views; it runs here
//! while the pipeline thread commits and applies the micro-batch before,
//! so the two use both cores (`engine/pipeline.rs` has the other half).
//!
//! Order is kept: micro-batches leave in the order their messages arrived,
//! over a channel of two, and the pipeline thread gives them their log
//! sequence numbers as it commits them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use datafusion::arrow::array::UInt32Array;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Durability;
use crate::log::{self, Dedup, LoggedBatch, MessageId, MessageMeta, Record};
use crate::obs::{now_ms, Metrics, StreamMetrics};
use crate::plan::StreamDef;
use crate::source::decode::{AckToken, Decoder, Message, RejectReason, Rejected};

/// Most messages taken into one micro-batch.
pub(super) const MAX_BATCH_MESSAGES: usize = 512;

/// A micro-batch decoded and encoded, waiting for its sequence numbers.
#[derive(Default)]
pub(super) struct Prepared {
    pub records: Vec<Record>,
    /// For each record: its encoded bytes and packed message ids, unless
    /// there is no log (`durability = "none"`) or it could not be encoded.
    pub encoded: Vec<Option<(Vec<u8>, Vec<u8>)>>,
    pub rejects: Vec<Rejected>,
    pub acks: Vec<AckToken>,
}

struct StreamPrep {
    def: Arc<StreamDef>,
    decoder: Decoder,
    metrics: Arc<StreamMetrics>,
}

pub(super) struct Preparer {
    streams: Vec<StreamPrep>,
    dedup: Dedup,
    metrics: Arc<Metrics>,
    durability: Durability,
}

impl Preparer {
    pub(super) fn new(
        streams: &[Arc<StreamDef>],
        dedup: Dedup,
        metrics: Arc<Metrics>,
        durability: Durability,
        limits: crate::source::decode::Limits,
    ) -> Self {
        let streams = streams
            .iter()
            .map(|def| StreamPrep {
                def: def.clone(),
                decoder: Decoder::new(def.clone(), limits),
                metrics: metrics.streams[&def.name].clone(),
            })
            .collect();
        Self {
            streams,
            dedup,
            metrics,
            durability,
        }
    }

    /// Runs on its own thread until `shutdown`, then prepares what is still
    /// queued and returns; closing `out` tells the pipeline it has all.
    pub(super) fn run(
        mut self,
        mut rx: mpsc::Receiver<Message>,
        out: mpsc::Sender<Prepared>,
        handle: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) {
        let mut messages: Vec<Message> = Vec::with_capacity(MAX_BATCH_MESSAGES);
        loop {
            let first = handle.block_on(async {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => None,
                    m = rx.recv() => m,
                }
            });
            let Some(first) = first else { break };
            messages.push(first);
            while messages.len() < MAX_BATCH_MESSAGES {
                match rx.try_recv() {
                    Ok(m) => messages.push(m),
                    Err(_) => break,
                }
            }
            self.metrics
                .ingest_queue_depth
                .store(rx.len() as i64, Ordering::Relaxed);
            let prepared = self.prepare(&mut messages);
            if out.blocking_send(prepared).is_err() {
                return;
            }
        }
        // Shutdown: the sources have stopped; take in what they had queued.
        rx.close();
        while let Ok(m) = rx.try_recv() {
            messages.push(m);
            if messages.len() == MAX_BATCH_MESSAGES {
                let prepared = self.prepare(&mut messages);
                if out.blocking_send(prepared).is_err() {
                    return;
                }
            }
        }
        if !messages.is_empty() {
            let prepared = self.prepare(&mut messages);
            let _ = out.blocking_send(prepared);
        }
    }

    /// Dedups, routes and decodes one micro-batch and encodes its log records.
    pub(super) fn prepare(&mut self, messages: &mut Vec<Message>) -> Prepared {
        let now = now_ms();
        let mut out = Prepared::default();
        let n_streams = self.streams.len();
        let mut per_stream: Vec<Vec<Message>> = (0..n_streams).map(|_| Vec::new()).collect();
        let mut per_stream_ids: Vec<Vec<Option<MessageId>>> =
            (0..n_streams).map(|_| Vec::new()).collect();
        // Acks in arrival order (MQTT 4.6), each with its stream, so
        // that a stream whose record cannot be logged acknowledges nothing.
        let mut acks: Vec<(Option<usize>, AckToken)> = Vec::new();
        for m in messages.drain(..) {
            let id = m.ack.map(|a| MessageId::of(a.pkid, &m.topic, &m.payload));
            if m.dup && id.is_some_and(|id| self.dedup.contains(&id)) {
                self.metrics
                    .duplicates_dropped
                    .fetch_add(1, Ordering::Relaxed);
                acks.extend(m.ack.map(|a| (None, a)));
                continue;
            }
            match self
                .streams
                .iter()
                .position(|s| s.def.topic.matches(&m.topic, |_, _| {}))
            {
                Some(i) => {
                    acks.extend(m.ack.map(|a| (Some(i), a)));
                    per_stream[i].push(m);
                    per_stream_ids[i].push(id);
                }
                None => {
                    acks.extend(m.ack.map(|a| (None, a)));
                    self.metrics
                        .unmatched_messages
                        .fetch_add(1, Ordering::Relaxed);
                    out.rejects.push(Rejected {
                        stream: String::new(),
                        topic: m.topic.clone(),
                        reason: RejectReason::Malformed,
                        detail: format!("topic {} matches no stream", m.topic),
                        payload: crate::source::decode::truncate_payload(&m.payload),
                        received_at: m.received_at,
                        rows: 1,
                    });
                }
            }
        }
        let mut unlogged = vec![false; n_streams];
        for (i, (msgs, ids)) in per_stream.into_iter().zip(per_stream_ids).enumerate() {
            if msgs.is_empty() {
                continue;
            }
            let stream = &self.streams[i];
            stream
                .metrics
                .messages
                .fetch_add(msgs.len() as u64, Ordering::Relaxed);
            let before = out.rejects.len();
            let decoded = stream.decoder.decode(&msgs, &mut out.rejects);
            for r in &out.rejects[before..] {
                stream.metrics.reject_n(r.reason, r.rows);
            }
            let rows = decoded.batch.num_rows();
            stream
                .metrics
                .ingested
                .fetch_add(rows as u64, Ordering::Relaxed);
            if rows == 0 && ids.iter().all(Option::is_none) {
                continue;
            }
            let name = stream.def.name.clone();
            let messages: Vec<MessageMeta> = msgs
                .into_iter()
                .zip(ids)
                .map(|(m, id)| MessageMeta {
                    topic: m.topic,
                    received_at: m.received_at,
                    id,
                })
                .collect();
            // Remembered now, not after the commit: this micro-batch is
            // committed before any later one (or weir stops, and the restart
            // rebuilds the window from the log).
            for id in messages.iter().filter_map(|m| m.id) {
                self.dedup.insert(id);
            }
            let ids = log::pack_ids(&messages);
            let record = Record::Batch(Box::new(LoggedBatch {
                stream: name,
                appended_at: now,
                data: decoded.batch,
                event_time: decoded.event_time,
                message_index: UInt32Array::from(decoded.message_index),
                messages,
            }));
            let encoded = match self.durability {
                Durability::None => None,
                _ => match log::encode(&record) {
                    Ok(bytes) => Some((bytes, ids)),
                    Err(e) => {
                        // Not expected for a batch we just built. Its rows are
                        // processed, but since a restart could not replay
                        // them, its messages are not acknowledged.
                        tracing::error!(stream = %self.streams[i].def.name, error = %e, "cannot encode a log record; its messages stay unacknowledged");
                        unlogged[i] = true;
                        None
                    }
                },
            };
            out.encoded.push(encoded);
            out.records.push(record);
        }
        out.acks = acks
            .into_iter()
            .filter(|(stream, _)| stream.is_none_or(|i| !unlogged[i]))
            .map(|(_, a)| a)
            .collect();
        out
    }
}
