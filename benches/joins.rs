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
//!
//! Two shapes of the same 120 000 events: `mixed`, messages of 100
//! events of 100 terminals (the worst case for the lookup:
//! no two neighbouring rows share a key), and `own`, each message one
//! terminal's samples, as terminals publish on their own topic (and as
//! weir-loadgen sends them).
//!
//! Before criterion's wall-clock runs it prints the thread's CPU time per
//! event of each view and its ratio to `plain`, medians of 31 rounds that
//! take the three views in turn (A against B in the same run: this machine is shared and noisy).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datafusion::arrow::array::{ArrayRef, StringArray};
use weir::plan::plan_sources;
use weir::source::decode::Message;
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

/// CPU time of this thread so far, in ns.
fn thread_cpu_ns() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e9 + t.tv_nsec as f64
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

    let inputs = [
        ("mixed", decode(&pipeline, &common::mixed_messages())),
        ("own", decode(&pipeline, &common::messages())),
    ];
    let views = ["plain", "joined", "by_region"];
    let run = |view: &str, input: &EventBatch| {
        let plan = pipeline.view(view).expect("view").clone();
        let mut op = ViewOperator::new(plan).expect("operator");
        let processed = op.process(black_box(input)).expect("process");
        let closed = op.advance_watermark(i64::MAX / 2).expect("close");
        let rows = processed.output.map_or(0, |o| o.rows.num_rows())
            + closed.map_or(0, |o| o.rows.num_rows());
        assert!(rows > 0, "{view} emitted nothing");
        rows
    };
    for (shape, input) in &inputs {
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); views.len()];
        for _ in 0..ROUNDS {
            for (v, view) in views.iter().enumerate() {
                let t = thread_cpu_ns();
                black_box(run(view, input));
                cpu[v].push((thread_cpu_ns() - t) / input.num_rows() as f64);
            }
        }
        for (v, view) in views.iter().enumerate() {
            // each round's ratio to the plain view of the same round: the
            // machine's load drifts between rounds, less within one
            let ratios: Vec<f64> = cpu[v].iter().zip(&cpu[0]).map(|(a, b)| a / b).collect();
            println!(
                "joins/{shape}/{view}: {:.1} ns CPU/event, {:+.1} % against plain (medians of {ROUNDS} rounds)",
                median(cpu[v].clone()),
                (median(ratios) - 1.0) * 100.0
            );
        }
    }

    let mut group = c.benchmark_group("joins");
    group.sample_size(20);
    for (shape, input) in &inputs {
        group.throughput(Throughput::Elements(input.num_rows() as u64));
        for view in views {
            group.bench_function(format!("{shape}/{view}"), |b| b.iter(|| run(view, input)));
        }
    }
    group.finish();
}

const ROUNDS: usize = 31;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn decode(pipeline: &weir::plan::Pipeline, messages: &[Message]) -> EventBatch {
    let mut rejects = Vec::new();
    let decoded = common::decoder(pipeline, "telemetry").decode(messages, &mut rejects);
    assert!(rejects.is_empty(), "{rejects:?}");
    EventBatch::new(decoded.batch, decoded.event_time, 1)
}

criterion_group!(benches, bench);
criterion_main!(benches);
