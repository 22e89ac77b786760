//! Decode and window aggregation of the reference telemetry.
//!
//! `cargo bench --bench pipeline` — reports events per second for:
//! - `decode`: JSON arrays of 12 events (a terminal's minute) -> one Arrow batch (the shipped telemetry schema);
//! - `tumble`: the shipped `terminal_health_1m` view over decoded batches;
//! - `decode_and_tumble`: both, the path from a message to a window aggregate.
//!
//! The fleet is synthetic but shaped like the reference data set: 10 000
//! terminals reporting every 5 s, so one minute holds 12 samples per terminal.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weir::window::operator::{EventBatch, ViewOperator};

mod common;

use common::{health_view, messages, pipeline, telemetry_decoder, EVENTS_PER_MESSAGE, MESSAGES};

fn bench(c: &mut Criterion) {
    let pipeline = pipeline();
    let view = health_view(&pipeline);
    let decoder = telemetry_decoder(&pipeline);
    let messages = messages();
    let events = (MESSAGES * EVENTS_PER_MESSAGE) as u64;
    let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    eprintln!(
        "{} messages, {events} events, {:.1} bytes/event",
        messages.len(),
        bytes as f64 / events as f64
    );

    let mut group = c.benchmark_group("telemetry");
    group.throughput(Throughput::Elements(events));
    group.sample_size(20);

    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut rejects = Vec::new();
            let decoded = decoder.decode(black_box(&messages), &mut rejects);
            assert!(rejects.is_empty());
            black_box(decoded)
        })
    });

    let mut rejects = Vec::new();
    let decoded = decoder.decode(&messages, &mut rejects);
    let batch = EventBatch::new(decoded.batch, decoded.event_time, 1);
    group.bench_function("tumble", |b| {
        b.iter(|| {
            let mut op = ViewOperator::new(Arc::clone(&view)).expect("operator");
            op.process(black_box(&batch)).expect("process");
            black_box(op.advance_watermark(i64::MAX / 2).expect("close"))
        })
    });

    group.bench_function("decode_and_tumble", |b| {
        b.iter(|| {
            let mut op = ViewOperator::new(Arc::clone(&view)).expect("operator");
            let mut rejects = Vec::new();
            let decoded = decoder.decode(black_box(&messages), &mut rejects);
            let batch = EventBatch::new(decoded.batch, decoded.event_time, 1);
            op.process(&batch).expect("process");
            black_box(op.advance_watermark(i64::MAX / 2).expect("close"))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
