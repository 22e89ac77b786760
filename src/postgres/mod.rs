//! Postgres: connections (`[[connections]]`), and the source that keeps a
//! reference table in step with its Postgres table (DESIGN §2).
//!
//! ## The change feed
//!
//! Logical decoding read over an ordinary connection:
//! `pg_logical_slot_peek_binary_changes` with the `pgoutput` plugin, polled
//! every [`POLL`]. The other way — a crate speaking the streaming
//! replication protocol — pushes changes sooner, but needs a replication
//! connection (`replication=database`), which tokio-postgres does not offer
//! and the crates that do are young; a reference table changes a few times a
//! minute, so half a second of polling costs nothing that matters and keeps
//! to one well-kept client.
//!
//! Nothing is lost across a crash: changes are *peeked*, not consumed. They
//! go into the ingest log (`crate::table`), and the slot is advanced only to
//! the LSN that both stored checkpoints include ([`TableHandle::durable`]);
//! after a restart the slot returns what the checkpoint may lack, and
//! transactions at or below the table's restored LSN are skipped.
//!
//! The first start (no slot yet) creates the slot, then reads the table:
//! that snapshot is logged as the table's whole content at the slot's
//! start LSN, and changes follow. A change committed between the slot's
//! creation and the read is applied twice, in order — upserts and deletes
//! by key converge to the same rows.
//!
//! `mode = 'snapshot'` re-reads the whole table every `refresh` and logs it
//! when it differs from the last read.
//!
//! [`TableHandle::durable`]: crate::table::TableHandle

pub mod pgoutput;
pub mod sink;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    ArrayRef, AsArray, BooleanBuilder, PrimitiveBuilder, RecordBatch, StringBuilder,
};
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType, DataType, Float64Type, Int64Type, Schema, TimestampMillisecondType,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ConnectionConfig, PgTls};
use crate::obs::Health;
use crate::plan::{TableDef, TableMode};
use crate::table::{change_batch, OP_DELETE, OP_REPLACE, OP_UPSERT};

/// How often the change feed is read.
pub const POLL: Duration = Duration::from_millis(500);
/// Most changes read at once (whole transactions; the rest next time).
const PEEK_CHANGES: i32 = 100_000;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Rows for a reference table, on their way into the ingest log.
#[derive(Debug)]
pub struct TableChange {
    pub table: String,
    /// The lineage node it came from, `postgres:<connection>/<table>`.
    pub origin: String,
    /// The table's columns, then `__weir_op` and `__weir_lsn` (`crate::table`).
    pub batch: RecordBatch,
}

/// Opens a connection; errors never hold the password.
pub async fn connect(conn: &ConnectionConfig) -> Result<tokio_postgres::Client, String> {
    let mut config: tokio_postgres::Config = conn
        .url
        .parse()
        .map_err(|e| format!("connection {}: url: {e}", conn.name))?;
    let password = conn.password()?;
    if let Some(p) = &password {
        config.password(p.as_bytes());
    }
    config.application_name("weir");
    config.connect_timeout(Duration::from_secs(10));
    let scrub = |e: tokio_postgres::Error| {
        let mut text = pg(e);
        if let Some(p) = password.as_deref().filter(|p| !p.is_empty()) {
            text = text.replace(p, "***");
        }
        format!("connection {}: {text}", conn.name)
    };
    let client = match conn.tls {
        PgTls::Disable => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) =
                config.connect(tokio_postgres::NoTls).await.map_err(scrub)?;
            tokio::spawn(connection);
            client
        }
        mode => {
            config.ssl_mode(match mode {
                PgTls::Require => tokio_postgres::config::SslMode::Require,
                _ => tokio_postgres::config::SslMode::Prefer,
            });
            // prefer: encrypted, whoever the server is (libpq's prefer);
            // require: encrypted to a server the roots or ca_file vouch for
            let tls = match (mode, &conn.ca_file) {
                (PgTls::Prefer, None) => crate::tls::unverified_client_config(),
                _ => crate::tls::client_config(conn.ca_file.as_deref(), None, None),
            }
            .map_err(|e| format!("connection {}: tls: {e}", conn.name))?;
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = config.connect(connector).await.map_err(scrub)?;
            tokio::spawn(connection);
            client
        }
    };
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .map_err(scrub)?;
    Ok(client)
}

/// `schema.table` as its two parts (`public` when no schema is given).
pub fn split_table(name: &str) -> (&str, &str) {
    name.split_once('.').unwrap_or(("public", name))
}

/// Quotes an identifier (`schema.table` quotes each part).
pub fn quote_ident(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// Text values (Postgres' text output) in the table's column types.
pub fn text_columns(
    schema: &Schema,
    rows: &[Vec<Option<String>>],
) -> Result<Vec<ArrayRef>, String> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (c, field) in schema.fields().iter().enumerate() {
        let cell = |r: &Vec<Option<String>>| r.get(c).cloned().flatten();
        let bad = |v: &str| {
            format!(
                "column {}: {v:?} is not a {}",
                field.name(),
                field.data_type()
            )
        };
        let array: ArrayRef = match field.data_type() {
            DataType::Utf8 => {
                let mut b = StringBuilder::new();
                for r in rows {
                    b.append_option(cell(r));
                }
                Arc::new(b.finish())
            }
            DataType::Int64 => primitive::<Int64Type>(rows, c, |v| v.trim().parse().ok(), bad)?,
            DataType::Float64 => primitive::<Float64Type>(rows, c, |v| v.trim().parse().ok(), bad)?,
            DataType::Boolean => {
                let mut b = BooleanBuilder::new();
                for r in rows {
                    match cell(r).as_deref() {
                        None => b.append_null(),
                        Some("t" | "true") => b.append_value(true),
                        Some("f" | "false") => b.append_value(false),
                        Some(v) => return Err(bad(v)),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Timestamp(_, _) => Arc::new(
                primitive::<TimestampMillisecondType>(rows, c, parse_timestamp, bad)?
                    .as_primitive::<TimestampMillisecondType>()
                    .clone()
                    .with_timezone("UTC"),
            ),
            other => {
                return Err(format!(
                    "column {}: type {other} is not supported",
                    field.name()
                ))
            }
        };
        columns.push(array);
    }
    Ok(columns)
}

/// Column `c` of `rows`, each text parsed by `parse` (`bad` says why not).
fn primitive<T: ArrowPrimitiveType>(
    rows: &[Vec<Option<String>>],
    c: usize,
    parse: impl Fn(&str) -> Option<T::Native>,
    bad: impl Fn(&str) -> String,
) -> Result<ArrayRef, String> {
    let mut b = PrimitiveBuilder::<T>::with_capacity(rows.len());
    for r in rows {
        match r.get(c).and_then(|v| v.as_deref()) {
            None => b.append_null(),
            Some(v) => b.append_value(parse(v).ok_or_else(|| bad(v))?),
        }
    }
    Ok(Arc::new(b.finish()))
}

/// `2026-12-03 10:15:00.123+00` (timestamptz in UTC) or without the offset (timestamp), as epoch ms.
fn parse_timestamp(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z") {
        return Some(t.timestamp_millis());
    }
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

/// The source of one reference table: connects, keeps the table in step,
/// reconnects with backoff; says in `/readyz` when it cannot.
pub struct TableSource {
    pub def: Arc<TableDef>,
    pub connection: ConnectionConfig,
    pub tx: mpsc::Sender<TableChange>,
    pub health: Arc<Health>,
    pub shutdown: CancellationToken,
}

impl TableSource {
    fn health_key(&self) -> String {
        format!("postgres:{}", self.connection.name)
    }

    pub async fn run(self) {
        let mut backoff = Duration::from_millis(500);
        let mut logged = false;
        // (what has been handed to the pipeline, across reconnects)
        let mut sent: Option<u64> = None;
        let mut last_snapshot: Option<u64> = None;
        loop {
            let ran = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = self.follow(&mut sent, &mut last_snapshot, &mut logged, &mut backoff) => r,
            };
            let Err(e) = ran else { return };
            let what = self.health_key();
            let why = format!(
                "table {} cannot follow {}: {e}",
                self.def.name, self.def.pg_table
            );
            if self.health.degrade(&what, why.clone()) || !logged {
                tracing::warn!(table = %self.def.name, connection = %self.connection.name, error = %e,
                    "reference table: Postgres unreachable or refusing; serving the rows weir holds and retrying with backoff");
                logged = true;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Connected: follows the table until an error (or shutdown).
    async fn follow(
        &self,
        sent: &mut Option<u64>,
        last_snapshot: &mut Option<u64>,
        logged: &mut bool,
        backoff: &mut Duration,
    ) -> Result<(), String> {
        let client = connect(&self.connection).await?;
        let columns = self.check_columns(&client).await?;
        let mut healthy = |source: &Self| {
            if source.health.recover(&source.health_key()) || *logged {
                tracing::info!(table = %source.def.name, connection = %source.connection.name, "reference table: following Postgres again");
            }
            *logged = false;
            *backoff = Duration::from_millis(500);
        };
        match &self.def.mode {
            TableMode::Snapshot { refresh } => loop {
                let rows = self.read_rows(&client, &columns).await?;
                healthy(self);
                let digest = digest(&rows);
                if *last_snapshot != Some(digest) {
                    self.send_snapshot(rows, 0).await?;
                    *last_snapshot = Some(digest);
                }
                tokio::time::sleep(*refresh).await;
            },
            TableMode::Cdc { publication } => {
                let slot = self.def.slot_name();
                let publication_name = self.def.publication_name();
                if publication.is_none() {
                    let exists = client
                        .query_opt(
                            "SELECT 1 FROM pg_publication WHERE pubname = $1",
                            &[&publication_name],
                        )
                        .await
                        .map_err(pg)?;
                    if exists.is_none() {
                        client
                            .batch_execute(&format!(
                                "CREATE PUBLICATION {} FOR TABLE {}",
                                quote_ident(&publication_name),
                                quote_ident(&self.def.pg_table)
                            ))
                            .await
                            .map_err(|e| format!("cannot create publication {publication_name} (it needs the table's owner; or create one and name it with publication = '...'): {}", pg(e)))?;
                    }
                }
                let existing = slot_position(&client, &slot).await?;
                let applied = self.def.rows.get().lsn.max(0) as u64;
                let start = match existing {
                    Some(_) if applied > 0 || sent.is_some() => sent.unwrap_or(applied),
                    _ => {
                        // a new slot (or one weir never read): its start, then the table as it is
                        let at = match existing {
                            Some(at) => at,
                            None => {
                                client
                                    .query_one(
                                        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                                        &[&slot],
                                    )
                                    .await
                                    .map_err(|e| format!("cannot create replication slot {slot} (the role needs REPLICATION, and wal_level = logical): {}", pg(e)))?;
                                slot_position(&client, &slot).await?.unwrap_or(0)
                            }
                        };
                        let rows = self.read_rows(&client, &columns).await?;
                        self.send_snapshot(rows, at).await?;
                        at
                    }
                };
                *sent = Some(start);
                healthy(self);
                let mut advanced = 0u64;
                loop {
                    self.poll_changes(&client, &slot, &publication_name, sent)
                        .await?;
                    let durable = self.def.rows.durable().max(0) as u64;
                    let to = durable.min(sent.unwrap_or(0));
                    if to > advanced {
                        client
                            .query_one(
                                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                                &[&slot, &pgoutput::format_lsn(to)],
                            )
                            .await
                            .map_err(pg)?;
                        advanced = to;
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }

    /// Every declared column must exist in the Postgres table.
    async fn check_columns(&self, client: &tokio_postgres::Client) -> Result<Vec<String>, String> {
        let (schema, table) = split_table(&self.def.pg_table);
        let rows = client
            .query(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
                &[&schema, &table],
            )
            .await
            .map_err(pg)?;
        let present: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        if present.is_empty() {
            return Err(format!("Postgres has no table {}", self.def.pg_table));
        }
        let declared: Vec<String> = self
            .def
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        if let Some(missing) = declared.iter().find(|c| !present.contains(c)) {
            return Err(format!(
                "table {} declares column {missing}, which {} does not have",
                self.def.name, self.def.pg_table
            ));
        }
        Ok(declared)
    }

    async fn read_rows(
        &self,
        client: &tokio_postgres::Client,
        columns: &[String],
    ) -> Result<Vec<Vec<Option<String>>>, String> {
        let select = columns
            .iter()
            .map(|c| format!("{}::text", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = client
            .query(
                &format!("SELECT {select} FROM {}", quote_ident(&self.def.pg_table)),
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| {
                (0..columns.len())
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect()
            })
            .collect())
    }

    async fn send_snapshot(&self, rows: Vec<Vec<Option<String>>>, lsn: u64) -> Result<(), String> {
        // one clearing row first: the table is exactly what follows
        let mut all = Vec::with_capacity(rows.len() + 1);
        all.push(vec![None; self.def.schema.fields().len()]);
        let mut ops = vec![OP_REPLACE];
        all.extend(rows);
        ops.resize(all.len(), OP_UPSERT);
        let lsns = vec![lsn as i64; all.len()];
        self.send(all, ops, lsns).await
    }

    async fn send(
        &self,
        rows: Vec<Vec<Option<String>>>,
        ops: Vec<i8>,
        mut lsns: Vec<i64>,
    ) -> Result<(), String> {
        if lsns.is_empty() {
            lsns = vec![0; rows.len()];
        }
        let columns = text_columns(&self.def.schema, &rows)?;
        let batch =
            change_batch(&self.def.schema, columns, ops, lsns).map_err(|e| e.to_string())?;
        self.tx
            .send(TableChange {
                table: self.def.name.clone(),
                origin: self.def.source_node(),
                batch,
            })
            .await
            .map_err(|_| "weir is stopping".to_string())
    }

    /// Reads the slot's pending transactions and hands those after `sent` to the pipeline.
    async fn poll_changes(
        &self,
        client: &tokio_postgres::Client,
        slot: &str,
        publication: &str,
        sent: &mut Option<u64>,
    ) -> Result<(), String> {
        let rows = client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, 'proto_version', '1', 'publication_names', $3)",
                &[&slot, &PEEK_CHANGES, &publication],
            )
            .await
            .map_err(pg)?;
        let after = sent.unwrap_or(0);
        let mut relations: HashMap<u32, pgoutput::Relation> = HashMap::new();
        let mut pending: Vec<(Vec<Option<String>>, i8)> = Vec::new();
        let mut out_rows = Vec::new();
        let mut out_ops = Vec::new();
        let mut out_lsns = Vec::new();
        let (want_schema, want_table) = split_table(&self.def.pg_table);
        let declared: Vec<String> = self
            .def
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut last = after;
        for row in rows {
            let data: Vec<u8> = row.get(0);
            match pgoutput::decode(&data)? {
                // (only this table's: changes of others in the publication are not ours)
                pgoutput::Message::Relation(r) => {
                    if r.namespace == want_schema && r.name == want_table {
                        relations.insert(r.id, r);
                    }
                }
                pgoutput::Message::Begin { .. } => pending.clear(),
                pgoutput::Message::Commit { end_lsn } => {
                    if end_lsn > after {
                        for (values, op) in pending.drain(..) {
                            out_rows.push(values);
                            out_ops.push(op);
                            out_lsns.push(end_lsn as i64);
                        }
                        last = last.max(end_lsn);
                    }
                    pending.clear();
                }
                pgoutput::Message::Insert { relation, new }
                | pgoutput::Message::Update { relation, new } => {
                    if let Some(r) = relations.get(&relation) {
                        pending.push((project(r, &new, &declared), OP_UPSERT));
                    }
                }
                pgoutput::Message::Delete { relation, old } => {
                    if let Some(r) = relations.get(&relation) {
                        pending.push((project(r, &old, &declared), OP_DELETE));
                    }
                }
                pgoutput::Message::Truncate { relations: ids } => {
                    if ids.iter().any(|id| relations.contains_key(id)) {
                        pending.push((vec![None; declared.len()], OP_REPLACE));
                    }
                }
                pgoutput::Message::Other(_) => {}
            }
        }
        if !out_rows.is_empty() {
            let n = out_rows.len();
            self.send(out_rows, out_ops, out_lsns).await?;
            tracing::debug!(table = %self.def.name, changes = n, "reference table: changes from Postgres");
        }
        *sent = Some(last);
        Ok(())
    }
}

/// Drops the replication slot weir created for `table`, and the publication
/// unless the table names one of the DBA's; says what it did.
pub async fn reset_source(
    table: &TableDef,
    conn: &ConnectionConfig,
) -> Result<Vec<String>, String> {
    let client = connect(conn).await?;
    let mut done = Vec::new();
    let slot = table.slot_name();
    let dropped = client
        .query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("cannot drop replication slot {slot} (is weir running? stop it first): {}", pg(e)))?;
    done.push(match dropped.len() {
        0 => format!("replication slot {slot}: none"),
        _ => format!("replication slot {slot}: dropped"),
    });
    match &table.mode {
        TableMode::Cdc { publication: None } => {
            let name = table.publication_name();
            client
                .batch_execute(&format!(
                    "DROP PUBLICATION IF EXISTS {}",
                    quote_ident(&name)
                ))
                .await
                .map_err(|e| format!("cannot drop publication {name}: {}", pg(e)))?;
            done.push(format!("publication {name}: dropped"));
        }
        TableMode::Cdc {
            publication: Some(p),
        } => done.push(format!("publication {p}: the DBA's, kept")),
        TableMode::Snapshot { .. } => {}
    }
    done.push(format!(
        "table {}: the next start reads {} afresh",
        table.name, table.pg_table
    ));
    Ok(done)
}

/// Where a replication slot's changes start (its confirmed flush LSN);
/// `None` when there is no such slot.
async fn slot_position(client: &tokio_postgres::Client, slot: &str) -> Result<Option<u64>, String> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg)?;
    Ok(row.map(|r| {
        let lsn: Option<String> = r.get(0);
        lsn.as_deref().and_then(pgoutput::parse_lsn).unwrap_or(0)
    }))
}

/// A tuple's values in the declared columns' order (by name).
fn project(
    r: &pgoutput::Relation,
    values: &[pgoutput::Value],
    declared: &[String],
) -> Vec<Option<String>> {
    declared
        .iter()
        .map(|c| {
            let i = r.columns.iter().position(|x| x == c)?;
            match values.get(i)? {
                pgoutput::Value::Text(t) => Some(t.clone()),
                // (an unchanged TOASTed value: a reference table's short text is never TOASTed)
                pgoutput::Value::Null | pgoutput::Value::Unchanged => None,
            }
        })
        .collect()
}

fn digest(rows: &[Vec<Option<String>>]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for r in rows {
        for v in r {
            match v {
                Some(t) => {
                    h.update(&[1]);
                    h.update(&(t.len() as u64).to_le_bytes());
                    h.update(t.as_bytes());
                }
                None => h.update(&[0]),
            }
        }
    }
    h.digest()
}

/// A Postgres error in words: the server's message, or the client's error
/// with its causes ("error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer").
fn pg(e: tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::Field;

    #[test]
    fn text_values_become_typed_columns() {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
            Field::new("x", DataType::Float64, true),
            Field::new("b", DataType::Boolean, true),
            Field::new("at", crate::plan::timestamp_type(), true),
        ]);
        let rows = vec![
            vec![
                Some("a".into()),
                Some("42".into()),
                Some("1.5".into()),
                Some("t".into()),
                Some("2026-12-03 10:15:00.25+00".into()),
            ],
            vec![
                Some("b".into()),
                None,
                None,
                Some("f".into()),
                Some("2026-12-03 10:15:00".into()),
            ],
        ];
        let c = text_columns(&schema, &rows).unwrap();
        assert_eq!(
            c[1].as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0),
            42
        );
        assert!(c[1].is_null(1));
        assert!(c[3].as_boolean().value(0) && !c[3].as_boolean().value(1));
        let ts = c[4].as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
        assert_eq!(ts.value(0) - ts.value(1), 250);
        let bad = text_columns(&schema, &[vec![Some("c".into()), Some("x1".into())]]).unwrap_err();
        assert!(bad.contains("column n") && bad.contains("x1"), "{bad}");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("public.terminals"), "\"public\".\"terminals\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
