//! Alert rules over telemetry: every row of the stream is judged.
//!
//! `cargo bench --bench alerts` — events per second through one shipped
//! rule, from a decoded batch to its changes, one core. The batch is
//! 120 000 events shaped as the load generator sends them: messages of 100
//! samples of one terminal, 1 200 terminals, a tenth of them with a low
//! battery:
//! - `low_battery`: a threshold with `for` and `clear` (hysteresis);
//! - `terminal_silent`: a presence rule (`absent_for`), which keeps the
//!   last row of every key.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weir::alert::RuleOperator;
use weir::window::operator::EventBatch;

mod common;

fn bench(c: &mut Criterion) {
    let pipeline = common::shipped();
    let mut rejects = Vec::new();
    let messages = common::terminal_batches(1_200, 1_200);
    let decoded = common::decoder(&pipeline, "telemetry").decode(&messages, &mut rejects);
    assert!(rejects.is_empty());
    let batch = EventBatch::new(decoded.batch, decoded.event_time, 1);
    let mut group = c.benchmark_group("alerts");
    group.throughput(Throughput::Elements(batch.num_rows() as u64));
    group.sample_size(20);
    for rule in ["low_battery", "terminal_silent"] {
        let plan = pipeline.alert(rule).expect("shipped rule").clone();
        group.bench_function(rule, |b| {
            b.iter(|| {
                let mut op = RuleOperator::new(plan.clone());
                let changes = op.process(black_box(&batch)).expect("process");
                assert!(op.keys() > 0, "{rule} tracked no key");
                black_box((changes, op.advance_watermark(i64::MAX / 2)))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
