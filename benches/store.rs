//! View rows in and out of the store.
//!
//! `cargo bench --bench store` — with the shipped `terminal_health_1m` view
//! closing one minute of 10 000 terminals (10 000 rows):
//! - `store/write_window_rows`: formatting the rows as JSON and upserting
//!   them into fjall (`sink::write_view_output`), per row;
//! - `store/scan_1000_rows`: one page of 1 000 rows read back the way
//!   `GET /api/v1/views/{name}/rows` reads them, per row;
//! - `store/query_group_by`: `POST /api/v1/query`'s work for a GROUP BY
//!   over the 10 000 stored rows (load the view, plan, run, render), per
//!   stored row read;
//! - `store/log_retention_pass`: one retention pass of the ingest log
//!   (`Store::truncate_log`) over a log that takes 300 records a second,
//!   keeps 60 s and is truncated once a minute, per record removed; the
//!   block cache's size afterwards is printed.

mod common;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weir::sink;
use weir::store::{LogAppend, Store};
use weir::window::operator::{EventBatch, ViewOperator};

use common::{health_view, messages, pipeline, telemetry_decoder};

fn bench(c: &mut Criterion) {
    let pipeline = pipeline();
    let view = health_view(&pipeline);
    let decoder = telemetry_decoder(&pipeline);
    let mut rejects = Vec::new();
    let decoded = decoder.decode(&messages(), &mut rejects);
    assert!(rejects.is_empty(), "{rejects:?}");
    let batch = EventBatch::new(decoded.batch, decoded.event_time, 1);
    let mut op = ViewOperator::new(Arc::clone(&view)).expect("operator");
    op.process(&batch).expect("process");
    let output = op
        .advance_watermark(i64::MAX / 2)
        .expect("close")
        .expect("a closed minute");
    let rows = output.rows.num_rows();
    eprintln!("{rows} window rows");

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(rows as u64));
    group.sample_size(20);
    group.bench_function("write_window_rows", |b| {
        b.iter(|| {
            black_box(sink::write_view_output(&store, &view.name, &output, None).expect("write"))
        })
    });
    group.throughput(Throughput::Elements(1000));
    group.bench_function("scan_1000_rows", |b| {
        b.iter(|| {
            let page = store
                .scan_rows(&view.name, None, None, None, 1000, |_| true)
                .expect("scan");
            assert_eq!(page.items.len(), 1000);
            black_box(page)
        })
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("runtime");
    let shared = Arc::new(pipeline.clone());
    let sql = "SELECT terminal_id, max(p99_latency_ms) AS worst, sum(samples) AS samples \
               FROM terminal_health_1m GROUP BY terminal_id ORDER BY worst DESC LIMIT 10";
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("query_group_by", |b| {
        b.iter(|| {
            let body = runtime
                .block_on(weir::api::query::run(store.clone(), shared.clone(), sql))
                .expect("query");
            assert!(body.contains("\"worst\""));
            black_box(body)
        })
    });
    log_retention(&mut group);
    group.finish();
}

/// A minute of appends (untimed), then the retention pass that removes the
/// minute that fell out of the window (timed).
fn log_retention(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    const PER_MINUTE: u64 = 60 * 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let record = vec![7u8; 2048];
    let mut seq = 0u64;
    let mut append_minute = |store: &Store| {
        for _ in 0..60 {
            let appends: Vec<LogAppend> = (0..PER_MINUTE / 60)
                .map(|_| {
                    seq += 1;
                    LogAppend {
                        seq,
                        record: record.clone(),
                        ids: vec![1u8; 80],
                    }
                })
                .collect();
            store.append_log(&appends, &[]).expect("append");
        }
        seq
    };
    append_minute(&store);
    group.throughput(Throughput::Elements(PER_MINUTE));
    group.sample_size(10);
    group.bench_function("log_retention_pass", |b| {
        b.iter_custom(|passes| {
            let mut spent = std::time::Duration::ZERO;
            for _ in 0..passes {
                let last = append_minute(&store);
                let start = std::time::Instant::now();
                let removed = store.truncate_log(last - PER_MINUTE + 1).expect("truncate");
                spent += start.elapsed();
                assert_eq!(removed as u64, PER_MINUTE);
            }
            spent
        })
    });
    eprintln!(
        "block cache after the passes: {} KiB",
        store.cache_bytes() >> 10
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
