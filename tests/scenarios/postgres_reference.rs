//! Reference tables from a real PostgreSQL (DESIGN §2), joined by views:
//! the snapshot at start, a change made in Postgres reaching a joined view
//! through logical decoding, LEFT and inner lookup joins against an
//! independent computation, Postgres stopped and started under a running
//! weir (degraded, never down), the rows restored from the checkpoint after
//! a restart, and the password absent from every answer.

use crate::common;

use std::collections::BTreeMap;

use common::postgres::{Postgres, PASSWORD};
use common::{event, wait_for, Weir, T0};
use serde_json::Value;

const PIPELINE: &str = r#"
CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json');

-- Terminals as the back office knows them.
CREATE TABLE terminals (
  terminal_id TEXT NOT NULL PRIMARY KEY,
  region TEXT
) WITH (connector = 'postgres', connection = 'backoffice', table = 'public.terminals');

CREATE VIEW enriched AS
SELECT e.terminal_id, t.region, e.battery_pct
FROM telemetry e LEFT JOIN terminals t ON e.terminal_id = t.terminal_id;

CREATE VIEW known AS
SELECT e.terminal_id, t.region, e.battery_pct
FROM telemetry e JOIN terminals t ON e.terminal_id = t.terminal_id;
"#;

/// The table as ad-hoc SQL sees it: terminal -> region ("" for NULL).
async fn table(weir: &Weir) -> BTreeMap<String, String> {
    let (status, body) = weir
        .post(
            "/api/v1/query",
            r#"{"sql": "SELECT terminal_id, region FROM terminals"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["terminal_id"].as_str().unwrap_or("").to_string(),
                r["region"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn wait_table(weir: &Weir, expected: &BTreeMap<String, String>) {
    wait_for("the reference table to hold the Postgres rows", || async {
        (table(weir).await == *expected).then_some(())
    })
    .await
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Publishes one event per (terminal, battery) and returns what an
/// independent lookup in `table` says each should become: battery -> (terminal, region).
async fn publish_round(
    weir: &Weir,
    events: &[(&str, f64)],
    table: &BTreeMap<String, String>,
) -> Vec<(f64, String, Option<String>)> {
    let messages: Vec<(String, String)> = events
        .iter()
        .map(|(t, b)| {
            (
                format!("terminals/{t}/telemetry"),
                event(T0 + (*b * 1000.0) as i64, *b, None),
            )
        })
        .collect();
    weir.publish(&messages).await;
    events
        .iter()
        .map(|(t, b)| {
            let region = table.get(*t).filter(|r| !r.is_empty()).cloned();
            (*b, t.to_string(), region)
        })
        .collect()
}

/// Rows of a view as (battery, terminal, region), sorted by battery.
fn triples(rows: &[Value]) -> Vec<(f64, String, Option<String>)> {
    let mut out: Vec<(f64, String, Option<String>)> = rows
        .iter()
        .map(|r| {
            (
                r["battery_pct"].as_f64().expect("battery"),
                r["terminal_id"].as_str().expect("terminal").to_string(),
                r["region"].as_str().map(str::to_string),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_table_follows_postgres_and_enriches_events() {
    let pg = Postgres::start().await;
    let office = pg.backoffice().await;
    office
        .batch_execute(
            "CREATE TABLE terminals (terminal_id text PRIMARY KEY, region text, model text);
             INSERT INTO terminals VALUES ('t1', 'north', 'A8'), ('t2', 'south', 'A8'), ('t4', NULL, 'P2');",
        )
        .await
        .expect("back-office table");
    let connection = pg.connection("backoffice");
    let weir = Weir::start_tweaked(&[("p.sql", PIPELINE)], None, |c| {
        c.connections.push(connection);
    })
    .await;

    // The snapshot at start, readable by ad-hoc SQL.
    let mut expected = map(&[("t1", "north"), ("t2", "south"), ("t4", "")]);
    wait_table(&weir, &expected).await;

    // LEFT keeps the unknown terminal with a NULL region; JOIN drops it.
    let mut want = publish_round(
        &weir,
        &[("t1", 1.0), ("t2", 2.0), ("t3", 3.0), ("t4", 4.0)],
        &expected,
    )
    .await;
    let rows = weir.wait_rows("enriched", 4).await;
    assert_eq!(triples(&rows), want);
    let known: Vec<_> = want
        .iter()
        .filter(|(_, t, _)| expected.contains_key(t))
        .cloned()
        .collect();
    assert_eq!(triples(&weir.wait_rows("known", 3).await), known);

    // A change made in Postgres reaches weir through the change feed, and
    // every event processed after it meets the new row.
    office
        .batch_execute(
            "UPDATE terminals SET region = 'east' WHERE terminal_id = 't1';
             INSERT INTO terminals VALUES ('t3', 'west', 'A9');
             DELETE FROM terminals WHERE terminal_id = 't2';",
        )
        .await
        .expect("changes");
    expected = map(&[("t1", "east"), ("t3", "west"), ("t4", "")]);
    wait_table(&weir, &expected).await;
    want.extend(
        publish_round(
            &weir,
            &[("t1", 11.0), ("t2", 12.0), ("t3", 13.0), ("t4", 14.0)],
            &expected,
        )
        .await,
    );
    let rows = weir.wait_rows("enriched", 8).await;
    assert_eq!(triples(&rows), want);
    let known: Vec<_> = want
        .iter()
        .filter(|(b, t, _)| {
            let table = if *b < 10.0 {
                map(&[("t1", "north"), ("t2", "south"), ("t4", "")])
            } else {
                expected.clone()
            };
            table.contains_key(t)
        })
        .cloned()
        .collect();
    assert_eq!(triples(&weir.wait_rows("known", known.len()).await), known);

    // Postgres stops: weir stays ready, says which connection is missing,
    // and keeps enriching from the rows it holds.
    pg.stop_server();
    let detail = wait_for("readyz to say postgres is degraded", || async {
        let (status, body) = weir.get("/readyz").await;
        assert_eq!(status, 200, "{body}");
        body["degraded"]["postgres:backoffice"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert!(detail.contains("terminals"), "{detail}");
    want.extend(publish_round(&weir, &[("t3", 21.0)], &expected).await);
    assert_eq!(triples(&weir.wait_rows("enriched", 9).await), want);

    // Back: the feed resumes where it stopped.
    pg.start_server();
    wait_for("readyz to lose the degraded detail", || async {
        let (_, body) = weir.get("/readyz").await;
        body.get("degraded").is_none().then_some(())
    })
    .await;
    let office = pg.backoffice().await;
    office
        .batch_execute("UPDATE terminals SET region = 'up-again' WHERE terminal_id = 't4'")
        .await
        .expect("change after the outage");
    expected.insert("t4".into(), "up-again".into());
    wait_table(&weir, &expected).await;

    // Nothing answers with the password.
    for path in [
        "/readyz",
        "/api/v1/pipelines",
        "/api/v1/lineage",
        "/api/v1/lineage?format=dot",
        "/metrics",
    ] {
        let text = weir
            .http
            .get(format!("{}{path}", weir.base))
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("text");
        assert!(!text.contains(PASSWORD), "{path} shows the password");
    }

    // A restart with Postgres down serves the table from the checkpoint.
    pg.stop_server();
    let dir = weir.stop().await;
    let weir = Weir::start_configured(dir, None, |c| {
        c.connections.push(pg.connection("backoffice"));
    })
    .await;
    assert_eq!(table(&weir).await, expected);
    want.extend(publish_round(&weir, &[("t4", 31.0)], &expected).await);
    assert_eq!(triples(&weir.wait_rows("enriched", 10).await), want);

    // weir reset-source drops the slot and the publication weir made; the
    // next start reads the table afresh.
    pg.start_server();
    let dir = weir.stop().await;
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[pipelines]\ndir = \"{}\"\n[[connections]]\nname = \"backoffice\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_env = \"WEIR_TEST_BACKOFFICE_PASSWORD\"\ntls = \"disable\"\n",
            dir.path().join("pipelines").display(),
            pg.url("backoffice")
        ),
    )
    .expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["reset-source", "terminals", "--config"])
        .arg(&config)
        .env("WEIR_TEST_BACKOFFICE_PASSWORD", PASSWORD)
        .output()
        .expect("weir reset-source");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("replication slot weir_terminals: dropped"),
        "{said}"
    );
    let office = pg.backoffice().await;
    let left: i64 = office
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)",
            &[],
        )
        .await
        .expect("slots and publications")
        .get(0);
    assert_eq!(left, 0, "reset-source left a slot or a publication");
    office
        .batch_execute("UPDATE terminals SET region = 'after-reset' WHERE terminal_id = 't3'")
        .await
        .expect("change while weir is stopped");
    expected.insert("t3".into(), "after-reset".into());
    let weir = Weir::start_configured(dir, None, |c| {
        c.connections.push(pg.connection("backoffice"));
    })
    .await;
    wait_table(&weir, &expected).await;
    weir.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_mode_rereads_the_table() {
    let pg = Postgres::start().await;
    let office = pg.backoffice().await;
    office
        .batch_execute(
            "CREATE TABLE regions (terminal_id text PRIMARY KEY, region text);
             INSERT INTO regions VALUES ('t1', 'north');",
        )
        .await
        .expect("table");
    let pipeline = PIPELINE.replace(
        "table = 'public.terminals')",
        "table = 'regions', mode = 'snapshot', refresh = '1s')",
    );
    let connection = pg.connection("backoffice");
    let weir = Weir::start_tweaked(&[("p.sql", &pipeline)], None, |c| {
        c.connections.push(connection);
    })
    .await;
    wait_table(&weir, &map(&[("t1", "north")])).await;
    office
        .batch_execute(
            "UPDATE regions SET region = 'south'; INSERT INTO regions VALUES ('t2', 'west');",
        )
        .await
        .expect("change");
    wait_table(&weir, &map(&[("t1", "south"), ("t2", "west")])).await;
    // no replication slot or publication for a snapshot table
    let slots: i64 = office
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0);
    weir.stop().await;
}
