//! What durability costs.
//!
//! `cargo bench --bench durability` — for one micro-batch of the shipped
//! telemetry stream (512 messages of 12 events):
//! - `log/encode_{plain,lz4,zstd}`: the ingest-log record in each Arrow IPC
//!   encoding (sizes are printed, next to the JSON they came from);
//! - `log/append_buffered`, `log/append_sync`: appending that record to
//!   fjall, without and with the fsync that `durability = "sync"` adds;
//!
//! and for the shipped telemetry views holding 100 000 terminals:
//! - `checkpoint/snapshot_100k_terminals`: every operator's snapshot, as one
//!   encoded checkpoint (its size is printed);
//! - `checkpoint/restore_100k_terminals`: decoding it and restoring every
//!   operator — the state part of start-up.

mod common;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datafusion::arrow::array::UInt32Array;
use weir::checkpoint::Checkpoint;
use weir::log::{self, Encoding, LoggedBatch, MessageId, MessageMeta, Record};
use weir::store::{LogAppend, Store};
use weir::window::operator::{EventBatch, ViewOperator};

use common::{fleet, pipeline, telemetry_decoder, T0};

const MICRO_BATCH: usize = 512;
const CHECKPOINT_TERMINALS: usize = 100_000;

fn bench(c: &mut Criterion) {
    let pipeline = pipeline();
    let decoder = telemetry_decoder(&pipeline);

    // One micro-batch as the pipeline logs it.
    let messages = fleet(10_000, MICRO_BATCH);
    let json_bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    let mut rejects = Vec::new();
    let decoded = decoder.decode(&messages, &mut rejects);
    assert!(rejects.is_empty(), "{rejects:?}");
    let events = decoded.batch.num_rows() as u64;
    let record = Record::Batch(Box::new(LoggedBatch {
        stream: "telemetry".to_string(),
        appended_at: T0,
        messages: messages
            .iter()
            .enumerate()
            .map(|(i, m)| MessageMeta {
                topic: m.topic.clone(),
                received_at: m.received_at,
                id: Some(MessageId::of(i as u16, &m.topic, &m.payload)),
            })
            .collect(),
        data: decoded.batch,
        event_time: decoded.event_time,
        message_index: UInt32Array::from(decoded.message_index),
    }));
    eprintln!(
        "micro-batch: {} messages, {events} events, JSON {:.1} bytes/event",
        messages.len(),
        json_bytes as f64 / events as f64
    );
    for (name, encoding) in [
        ("plain", Encoding::Plain),
        ("lz4", Encoding::Lz4),
        ("zstd", Encoding::Zstd),
    ] {
        let bytes = log::encode_with(&record, encoding).expect("encode");
        eprintln!(
            "log record, {name}: {:.1} bytes/event",
            bytes.len() as f64 / events as f64
        );
    }

    let mut group = c.benchmark_group("log");
    group.throughput(Throughput::Elements(events));
    group.sample_size(20);
    for (name, encoding) in [
        ("encode_plain", Encoding::Plain),
        ("encode_lz4", Encoding::Lz4),
        ("encode_zstd", Encoding::Zstd),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(log::encode_with(black_box(&record), encoding).expect("encode")))
        });
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let bytes = log::encode(&record).expect("encode");
    let ids = match &record {
        Record::Batch(b) => log::pack_ids(&b.messages),
        Record::Watermark { .. } => Vec::new(),
    };
    let mut seq = 0u64;
    for (name, sync) in [("append_buffered", false), ("append_sync", true)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                seq += 1;
                let append = LogAppend {
                    seq,
                    record: bytes.clone(),
                    ids: ids.clone(),
                };
                store.append_log(&[append], &[]).expect("append");
                if sync {
                    store.persist().expect("sync");
                }
            })
        });
    }
    group.finish();

    // Operators of the shipped telemetry views holding 100 000 terminals.
    let state_messages = fleet(CHECKPOINT_TERMINALS, CHECKPOINT_TERMINALS);
    let mut operators: Vec<ViewOperator> = pipeline
        .views
        .iter()
        .map(|v| ViewOperator::new(Arc::clone(v)).expect("operator"))
        .collect();
    for chunk in state_messages.chunks(MICRO_BATCH) {
        let decoded = decoder.decode(chunk, &mut rejects);
        assert!(rejects.is_empty(), "{rejects:?}");
        let batch = EventBatch::new(decoded.batch, decoded.event_time, 1);
        for op in &mut operators {
            op.process(&batch).expect("process");
        }
    }
    let take = |operators: &[ViewOperator]| {
        let snapshots = operators
            .iter()
            .map(|op| {
                let plan = op.plan();
                (
                    plan.name.clone(),
                    plan.fingerprint,
                    op.snapshot().expect("snapshot"),
                )
            })
            .collect();
        Checkpoint::new(1, T0, BTreeMap::new(), snapshots)
    };
    let cp = take(&operators);
    let groups: usize = operators.iter().map(ViewOperator::open_groups).sum();
    eprintln!(
        "checkpoint: {} views, {groups} open groups, {:.1} MB",
        operators.len(),
        cp.size_bytes() as f64 / 1e6
    );
    let stored = cp.encode().expect("encode");

    let mut group = c.benchmark_group("checkpoint");
    group.sample_size(10);
    group.bench_function("snapshot_100k_terminals", |b| {
        b.iter(|| black_box(take(&operators).encode().expect("encode")))
    });
    group.bench_function("restore_100k_terminals", |b| {
        b.iter(|| {
            let cp = Checkpoint::decode(stored.clone()).expect("decode");
            for v in &pipeline.views {
                let mut op = ViewOperator::new(Arc::clone(v)).expect("operator");
                op.restore(&cp.views[&v.name]).expect("restore");
                black_box(op);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
