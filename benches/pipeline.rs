//! Decode and window aggregation of the reference telemetry.
//!
//! `cargo bench --bench pipeline` — reports events per second for:
//! - `decode`: JSON arrays of 100 events -> one Arrow batch (the shipped telemetry schema);
//! - `tumble`: the shipped `terminal_health_1m` view over decoded batches;
//! - `decode_and_tumble`: both, the path from a message to a window aggregate.
//!
//! The fleet is synthetic but shaped like the reference data set: 10 000
//! terminals reporting every 5 s, so one minute holds 12 samples per terminal.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weir::plan::{plan_sources, Pipeline};
use weir::source::decode::{Decoder, Message};
use weir::window::operator::{EventBatch, ViewOperator};

const TERMINALS: usize = 10_000;
const EVENTS_PER_MESSAGE: usize = 100;
/// 1 200 messages of 100 events: 12 samples for each of 10 000 terminals, one minute.
const MESSAGES: usize = 1200;
const T0: i64 = 1_699_999_980_000;

fn pipeline() -> Pipeline {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/pipelines/10_telemetry.sql"
    );
    let sql = std::fs::read_to_string(path).expect("shipped telemetry pipeline");
    plan_sources(&[("10_telemetry.sql".into(), sql)]).expect("shipped pipeline plans")
}

/// Messages of 100 events each, as a terminal batch would carry them, in event-time order.
fn messages() -> Vec<Message> {
    let networks = ["wifi", "lte", "none"];
    let mut out = Vec::with_capacity(MESSAGES);
    let mut n = 0usize;
    for m in 0..MESSAGES {
        let mut payload = String::from("[");
        for e in 0..EVENTS_PER_MESSAGE {
            let terminal = n % TERMINALS;
            let ts = T0 + (n / TERMINALS) as i64 * 5_000 + (terminal % 5000) as i64;
            if e > 0 {
                payload.push(',');
            }
            payload.push_str(&format!(
                r#"{{"terminal_id":"T{terminal:05}","merchant_id":"M{:04}","ts":{ts},"battery_pct":{:.1},"charging":{},"network":"{}","rssi_dbm":{},"app_latency_ms":{:.1},"app_version":"2.{}.0","error_count":{}}}"#,
                terminal / 10,
                20.0 + (n % 80) as f64,
                n.is_multiple_of(7),
                networks[n % 3],
                -50 - (n % 40) as i64,
                80.0 + (n % 300) as f64 / 3.0,
                n % 4,
                n % 3,
            ));
            n += 1;
        }
        payload.push(']');
        out.push(Message {
            topic: format!("terminals/T{:05}/telemetry", m % TERMINALS),
            payload: Bytes::from(payload),
            received_at: T0,
            ack: None,
            dup: false,
        });
    }
    out
}

fn bench(c: &mut Criterion) {
    let pipeline = pipeline();
    let stream = pipeline
        .stream("telemetry")
        .expect("telemetry stream")
        .clone();
    let view = pipeline
        .view("terminal_health_1m")
        .expect("health view")
        .clone();
    let decoder = Decoder::new(stream, 4 << 20);
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
