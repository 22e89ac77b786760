//! The cost of a lookup join (issue 20's target: at most 10 % more CPU per
//! event than the same view without it, at 100 000 reference rows).
//!
//! `cargo bench --bench joins` — events per second through one view's
//! operator (120 000 events, 10 000 terminals, one minute; windows closed by
//! a final watermark), one core, for the shipped `terminal_health_1m`:
//! - `plain`: as shipped;
//! - `joined`: the same SELECT over `telemetry e LEFT JOIN terminals t ON
//!   e.terminal_id = t.terminal_id` (100 000 rows in `terminals`; the join
//!   is done, its columns not used);
//! - `by_region`: the same, grouped by `t.region` as well (a key more).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datafusion::arrow::array::{ArrayRef, StringArray};
use weir::plan::plan_sources;
use weir::table::{change_batch, OP_UPSERT};
use weir::window::operator::{EventBatch, ViewOperator};

mod common;

const REFERENCE_ROWS: usize = 100_000;

fn sql() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/pipelines/10_telemetry.sql"
    );
    // (the fleet's batches carry many terminals: the topic binds none)
    let shipped = std::fs::read_to_string(path)
        .expect("shipped telemetry pipeline")
        .replace("terminals/{terminal_id}/telemetry", "terminals/+/telemetry");
    let health = "SELECT terminal_id,
       count(*) AS samples, min(battery_pct) AS min_battery, avg(rssi_dbm) AS avg_rssi_dbm,
       avg(app_latency_ms) AS avg_latency_ms, approx_percentile_cont(app_latency_ms, 0.99) AS p99_latency_ms,
       sum(error_count) AS errors, count(*) FILTER (WHERE network = 'none') AS offline_samples";
    let joined = health
        .replace("terminal_id,", "e.terminal_id,")
        .replace("(battery_pct", "(e.battery_pct")
        .replace("(rssi_dbm", "(e.rssi_dbm")
        .replace("(app_latency_ms", "(e.app_latency_ms")
        .replace("(error_count", "(e.error_count")
        .replace("network =", "e.network =");
    format!(
        "{shipped}
CREATE TABLE terminals (terminal_id TEXT NOT NULL PRIMARY KEY, region TEXT, model TEXT)
WITH (connector = 'postgres', connection = 'backoffice', table = 'terminals');
CREATE VIEW plain AS {health} FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);
CREATE VIEW joined AS {joined} FROM telemetry e LEFT JOIN terminals t ON e.terminal_id = t.terminal_id
GROUP BY e.terminal_id, tumble(INTERVAL '1' MINUTE);
CREATE VIEW by_region AS {joined}, t.region FROM telemetry e LEFT JOIN terminals t ON e.terminal_id = t.terminal_id
GROUP BY e.terminal_id, t.region, tumble(INTERVAL '1' MINUTE);
"
    )
}

fn bench(c: &mut Criterion) {
    let pipeline = plan_sources(&[("bench.sql".into(), sql())]).expect("plans");
    let table = pipeline.table("terminals").expect("table");
    // 100 000 terminals in the back office, the fleet's 10 000 among them
    let ids: Vec<String> = (0..REFERENCE_ROWS).map(|i| format!("T{i:05}")).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(&ids)),
        Arc::new(StringArray::from_iter_values(
            ids.iter()
                .map(|i| format!("region-{}", i.as_bytes()[5] % 7)),
        )),
        Arc::new(StringArray::from_iter_values(ids.iter().map(|_| "A8"))),
    ];
    let changes = change_batch(
        &table.schema,
        columns,
        vec![OP_UPSERT; REFERENCE_ROWS],
        vec![1; REFERENCE_ROWS],
    )
    .expect("change batch");
    let rows = table.rows.get().apply(&changes).expect("rows");
    assert_eq!(rows.len(), REFERENCE_ROWS);
    table.rows.set(Arc::new(rows));

    let mut rejects = Vec::new();
    let decoded = common::decoder(&pipeline, "telemetry").decode(&common::messages(), &mut rejects);
    assert!(rejects.is_empty(), "{rejects:?}");
    let input = EventBatch::new(decoded.batch, decoded.event_time, 1);

    let mut group = c.benchmark_group("joins");
    group.sample_size(20);
    group.throughput(Throughput::Elements(input.num_rows() as u64));
    for view in ["plain", "joined", "by_region"] {
        let plan = pipeline.view(view).expect("view").clone();
        group.bench_function(view, |b| {
            b.iter(|| {
                let mut op = ViewOperator::new(plan.clone()).expect("operator");
                let processed = op.process(black_box(&input)).expect("process");
                let closed = op.advance_watermark(i64::MAX / 2).expect("close");
                let rows = processed.output.map_or(0, |o| o.rows.num_rows())
                    + closed.map_or(0, |o| o.rows.num_rows());
                assert!(rows > 0, "{view} emitted nothing");
                rows
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
