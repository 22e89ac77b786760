//! Postgres sink throughput (issue 20's target: at least 100 000 rows/s into
//! a local Postgres).
//!
//! `WEIR_BENCH_PG_URL=postgres://weir@127.0.0.1:5432/backoffice WEIR_BENCH_PG_PASSWORD=... \
//!  cargo bench --bench sink` — N rows of a windowed view (6 columns, keyed
//! on terminal and window_start) are put in a fresh store's outbox, as the
//! pipeline puts them; one sink task (the engine's) delivers them into a
//! new table with batched `INSERT ... ON CONFLICT DO UPDATE`. Reports rows/s
//! and the CPU weir's side spent per row (Postgres' own CPU is not counted).
//! WEIR_BENCH_COPY=1 delivers with COPY into a staging table and one merge
//! instead. Without WEIR_BENCH_PG_URL it says so and does nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir::config::{ConnectionConfig, PgTls};
use weir::plan::sink::SinkDef;
use weir::postgres::sink::{SinkStatus, SinkTask};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn main() {
    let Ok(url) = std::env::var("WEIR_BENCH_PG_URL") else {
        eprintln!("sink bench: set WEIR_BENCH_PG_URL (and WEIR_BENCH_PG_PASSWORD) to a Postgres to write into");
        return;
    };
    let rows: usize = std::env::var("WEIR_BENCH_ROWS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500_000);
    // WEIR_BENCH_COPY=1: COPY into a staging table and one merge
    let copy = std::env::var("WEIR_BENCH_COPY").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = weir::store::Store::open(dir.path()).expect("store");
    let view = "bench_health_1m";
    // the outbox, filled as the pipeline fills it: 5 000 rows a log record
    let t0 = 1_700_000_000_000i64;
    for (batch, start) in (0..rows).step_by(5_000).enumerate() {
        let seq = weir::log::seq_at(t0) + batch as u64;
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = (start..(start + 5_000).min(rows))
            .map(|i| {
                let terminal = i % 100_000;
                let minute = i / 100_000;
                let ws = weir::obs::format_time(t0 + minute as i64 * 60_000);
                let we = weir::obs::format_time(t0 + (minute as i64 + 1) * 60_000);
                let json = format!(
                    r#"{{"window_start":"{ws}","window_end":"{we}","terminal_id":"T{terminal:06}","samples":{},"min_battery":{:.1},"avg_latency_ms":{:.2}}}"#,
                    10 + i % 5,
                    20.0 + (i % 80) as f64,
                    80.0 + (i % 300) as f64 / 3.0
                );
                (format!("{terminal}/{minute}").into_bytes(), json.into_bytes())
            })
            .collect();
        store
            .write_rows_to_sinks(view, pairs, Some((seq, 0)))
            .expect("outbox");
    }
    let schema = {
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let ts = weir::plan::timestamp_type;
        Arc::new(Schema::new(vec![
            Field::new("window_start", ts(), false),
            Field::new("window_end", ts(), false),
            Field::new("terminal_id", DataType::Utf8, false),
            Field::new("samples", DataType::Int64, false),
            Field::new("min_battery", DataType::Float64, true),
            Field::new("avg_latency_ms", DataType::Float64, true),
        ]))
    };
    let def = Arc::new(SinkDef {
        name: "bench_pg".into(),
        from: view.into(),
        from_alert: false,
        connection: "bench".into(),
        table: "public.weir_sink_bench".into(),
        key: Vec::new(),
        key_columns: vec!["terminal_id".into(), "window_start".into()],
        doc: String::new(),
        sql: String::new(),
        file: String::new(),
        line: 0,
    });
    let connection = ConnectionConfig {
        name: "bench".into(),
        kind: "postgres".into(),
        url,
        password_env: Some("WEIR_BENCH_PG_PASSWORD".into()),
        password_file: None,
        tls: PgTls::Disable,
        ca_file: None,
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = weir::postgres::connect(&connection).await.expect("connect");
        client
            .batch_execute("DROP TABLE IF EXISTS public.weir_sink_bench")
            .await
            .expect("drop");
        let status = Arc::new(SinkStatus::default());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = SinkTask {
            def,
            schema,
            connection: connection.clone(),
            store: store.clone(),
            status: status.clone(),
            siblings: vec!["bench_pg".into()],
            copy,
            shutdown: shutdown.clone(),
        };
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let running = tokio::spawn(task.run());
        while status.rows_written.load(Ordering::Relaxed) < rows as u64 {
            if let Some(e) = status.last_error.lock().ok().and_then(|e| e.clone()) {
                panic!("sink: {e}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (took, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        shutdown.cancel();
        let _ = running.await;
        let count: i64 = client
            .query_one("SELECT count(*) FROM public.weir_sink_bench", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(count as usize, rows);
        println!(
            "sink ({}): {rows} rows in {took:.2} s = {:.0} rows/s; weir's CPU {:.2} s = {:.2} µs/row",
            if copy { "COPY + merge" } else { "multi-row INSERT" },
            rows as f64 / took,
            cpu,
            cpu / rows as f64 * 1e6
        );
    });
}
