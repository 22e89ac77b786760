//! Ad-hoc SQL is a stranger's program (DESIGN §6): what a hostile or
//! careless query gets, seen through the API, while terminals keep
//! publishing: refusals as JSON errors, a runaway query cancelled at the
//! timeout, too many at once turned away, a memory-hungry one stopped, and
//! none of it delaying ingestion or shutdown.

use crate::common;

use common::*;
use serde_json::Value;

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// 100 terminals in `latest`, so that a few cross joins are astronomic.
async fn fleet(weir: &Weir) {
    let messages: Vec<(String, String)> = (0..100)
        .map(|i| {
            (
                format!("terminals/T{i:03}/telemetry"),
                format!(r#"{{"ts": {}, "battery_pct": 50}}"#, T0 + i),
            )
        })
        .collect();
    weir.publish(&messages).await;
    weir.wait_rows("latest", 100).await;
}

fn query(sql: &str) -> String {
    serde_json::json!({ "sql": sql }).to_string()
}

/// Ten billion rows, each looked at (a count(*) would be answered from statistics).
const RUNAWAY: &str = "SELECT sum(length(concat(a.terminal_id, b.terminal_id, c.terminal_id, \
     d.terminal_id, e.terminal_id))) AS n FROM latest a, latest b, latest c, latest d, latest e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queries_get_errors_and_runaway_ones_are_cancelled() {
    let weir = Weir::start_tweaked(&[("telemetry.sql", TELEMETRY)], None, |c| {
        c.http.query_timeout = std::time::Duration::from_secs(8);
        c.http.query_memory = 4 << 20;
    })
    .await;
    fleet(&weir).await;

    // Refused before they run.
    let deep = format!("SELECT {}1 AS x", "1+".repeat(20_000));
    for (sql, status, expected) in [
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT count(*) FROM r",
            400,
            "bad_request",
        ),
        ("SELECT repeat('x', 2147483647)", 400, "bad_request"),
        (
            "SELECT * FROM latest, LATERAL generate_series(1, 1000000000)",
            400,
            "bad_request",
        ),
        (deep.as_str(), 400, "bad_request"),
    ] {
        let (got, body) = weir.post("/api/v1/query", &query(sql)).await;
        assert_eq!((got, code(&body)), (status, expected), "{sql:.80}: {body}");
    }
    let huge = format!("SELECT {}1 AS x", "1+".repeat(150_000));
    let (got, body) = weir.post("/api/v1/query", &query(&huge)).await;
    assert_eq!((got, code(&body)), (413, "query_too_large"), "{body}");

    // Too much memory: a set of a million strings in 4 MiB.
    let (got, body) = weir
        .post(
            "/api/v1/query",
            &query(
                "SELECT count(DISTINCT concat(a.terminal_id, b.terminal_id, c.terminal_id)) AS n \
                 FROM latest a, latest b, latest c",
            ),
        )
        .await;
    assert_eq!(
        (got, code(&body)),
        (413, "query_memory"),
        "{:.300}",
        body.to_string()
    );

    // Two runaway queries take both slots; a third is turned away; both are
    // cancelled at the timeout. Meanwhile terminals publish and are counted.
    let runaway = query(RUNAWAY);
    let first = weir.post("/api/v1/query", &runaway);
    let second = weir.post("/api/v1/query", &runaway);
    let third = async {
        wait_metric(&weir, "weir_queries_running", 2.0).await;
        weir.post("/api/v1/query", &query("SELECT 1 AS x")).await
    };
    let ingest = async {
        weir.publish(&[(
            "terminals/T999/telemetry",
            format!(r#"{{"ts": {}, "battery_pct": 10}}"#, T0 + 1000),
        )])
        .await;
        weir.wait_rows("latest", 101).await
    };
    let ((s1, b1), (s2, b2), (s3, b3), latest) = tokio::join!(first, second, third, ingest);
    assert_eq!((s1, code(&b1)), (408, "query_timeout"), "{b1}");
    assert_eq!((s2, code(&b2)), (408, "query_timeout"), "{b2}");
    assert_eq!((s3, code(&b3)), (429, "too_many_queries"), "{b3}");
    assert_eq!(latest.len(), 101, "ingestion went on");

    // The slots come back once the cancelled queries have stopped.
    let answer = wait_for("a query slot again", || async {
        let (got, body) = weir
            .post("/api/v1/query", &query("SELECT count(*) AS n FROM latest"))
            .await;
        (got == 200).then_some(body)
    })
    .await;
    assert_eq!(answer["rows"][0]["n"], 101);

    // A runaway query does not hold up shutdown.
    let runaway = tokio::spawn({
        let http = weir.http.clone();
        let url = format!("{}/api/v1/query", weir.base);
        async move {
            let _ = http
                .post(url)
                .header("content-type", "application/json")
                .body(query(RUNAWAY))
                .send()
                .await;
        }
    });
    tokio::time::timeout(DEADLINE, weir.stop())
        .await
        .expect("weir stops while a runaway query runs");
    runaway.abort();
}

/// How many ad-hoc queries run, once it is `n`.
async fn wait_running(weir: &Weir, n: f64) {
    wait_for(&format!("{n} queries running"), || async {
        let running = common::process::metric_value(&weir.metrics().await, "weir_queries_running")?;
        (running == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_at_its_timeout_cancels_its_query() {
    // The request timeout is far shorter than the query's own.
    let weir = Weir::start_tweaked(&[("telemetry.sql", TELEMETRY)], None, |c| {
        c.http.request_timeout = std::time::Duration::from_secs(1);
        c.http.query_timeout = std::time::Duration::from_secs(3600);
    })
    .await;
    fleet(&weir).await;
    let (status, body) = weir.post("/api/v1/query", &query(RUNAWAY)).await;
    assert_eq!((status, code(&body)), (503, "request_timeout"), "{body}");
    // The query stopped with its request: its slot is free again.
    wait_running(&weir, 0.0).await;
    let (status, body) = weir.post("/api/v1/query", &query("SELECT 1 AS x")).await;
    assert_eq!(status, 200, "{body}");
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_its_query() {
    let weir = Weir::start_tweaked(&[("telemetry.sql", TELEMETRY)], None, |c| {
        c.http.request_timeout = std::time::Duration::from_secs(3600);
        c.http.query_timeout = std::time::Duration::from_secs(3600);
    })
    .await;
    fleet(&weir).await;
    // Two runaway queries take both slots; their clients give up.
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(500))
        .build()
        .expect("client");
    let url = format!("{}/api/v1/query", weir.base);
    let send = || {
        impatient
            .post(&url)
            .header("content-type", "application/json")
            .body(query(RUNAWAY))
            .send()
    };
    let (a, b) = tokio::join!(send(), send());
    assert!(a.is_err() && b.is_err(), "the runaway queries answered");
    // Without cancellation they would hold both slots for an hour.
    wait_running(&weir, 0.0).await;
    let (status, body) = weir.post("/api/v1/query", &query("SELECT 1 AS x")).await;
    assert_eq!(status, 200, "{body}");
    weir.stop().await;
}
