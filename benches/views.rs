//! Window aggregation for every view shape, on the shipped views.
//!
//! `cargo bench --bench views` — events per second through one view's
//! operator, from a decoded batch to its rows emitted (windows closed by a
//! final watermark), one core:
//! - telemetry (120 000 events, 10 000 terminals, one minute):
//!   `tumble` (`terminal_health_1m`, 8 aggregates with a percentile),
//!   `tumble_distinct` (`app_versions_1h`, count distinct),
//!   `updating` (`terminal_latest`, last values per terminal);
//! - transactions (60 000, one per message, 2 000 terminals, ten minutes):
//!   `hop` (`merchant_sales_5m`, 1 minute slide over 5), `session`
//!   (`terminal_sessions`, 2 minute gap), `filter` (`large_refunds`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weir::window::operator::{EventBatch, ViewOperator};

mod common;

fn batch(
    pipeline: &weir::plan::Pipeline,
    stream: &str,
    messages: &[weir::source::decode::Message],
) -> EventBatch {
    let mut rejects = Vec::new();
    let decoded = common::decoder(pipeline, stream).decode(messages, &mut rejects);
    assert!(rejects.is_empty(), "{rejects:?}");
    EventBatch::new(decoded.batch, decoded.event_time, 1)
}

fn bench(c: &mut Criterion) {
    let pipeline = common::shipped();
    let telemetry = batch(&pipeline, "telemetry", &common::messages());
    let transactions = batch(
        &pipeline,
        "transactions",
        &common::transactions(2_000, 60_000),
    );
    let cases = [
        ("tumble", "terminal_health_1m", &telemetry),
        ("tumble_distinct", "app_versions_1h", &telemetry),
        ("updating", "terminal_latest", &telemetry),
        ("hop", "merchant_sales_5m", &transactions),
        ("session", "terminal_sessions", &transactions),
        ("filter", "large_refunds", &transactions),
    ];
    let mut group = c.benchmark_group("views");
    group.sample_size(20);
    for (shape, view, input) in cases {
        let plan = pipeline.view(view).expect("shipped view").clone();
        group.throughput(Throughput::Elements(input.num_rows() as u64));
        group.bench_function(shape, |b| {
            b.iter(|| {
                let mut op = ViewOperator::new(plan.clone()).expect("operator");
                let processed = op.process(black_box(input)).expect("process");
                let closed = op.advance_watermark(i64::MAX / 2).expect("close");
                let rows = processed.output.map_or(0, |o| o.rows.num_rows())
                    + closed.map_or(0, |o| o.rows.num_rows());
                assert!(rows > 0, "{view} emitted nothing");
                black_box(rows)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
