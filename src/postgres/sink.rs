//! Postgres sinks (DESIGN §3 "Sinks: Postgres"): a view's rows, upserted
//! into a warehouse table.
//!
//! The pipeline never waits for Postgres. The rows a sinked view writes are
//! also put in the store's *outbox*, in the same atomic batch as the rows
//! themselves: one entry per write, its rows one JSON object per line,
//! under the log record's sequence number and an index
//! (`Store::write_rows_to_sinks`). A sink task reads the outbox in order,
//! upserts a batch in one transaction, then records its position (the last
//! outbox key it delivered, in the store's meta) and trims what every sink
//! of that view has delivered. So:
//!
//! - a crash, a restart or Postgres down for an hour loses nothing: the
//!   outbox holds what was not delivered, and a replay after a crash writes
//!   the same outbox keys again;
//! - nothing is doubled: rows are upserted on the table's key (the view's
//!   keys, plus `window_start` for a windowed view, or the sink's `key`), so
//!   delivering a row again after a crash between the commit and the
//!   position write leaves the table as it was.
//!
//! Upserts are COPY into a staging table and one `INSERT ... SELECT ... ON
//! CONFLICT ... DO UPDATE` (or multi-row `INSERT ... ON CONFLICT` with text
//! parameters cast to each column's type); rows with the same key in one
//! batch are folded to the last (an updating view writes each key often).
//! A row's JSON is read straight into its cells' text, borrowed where it
//! has no escapes ([`row_cells`]): no map or value tree per row.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{connect, quote_ident};
use crate::config::ConnectionConfig;
use crate::plan::sink::SinkDef;
use crate::store::Store;

/// Most outbox rows delivered in one transaction.
const BATCH_ROWS: usize = 5_000;
/// Connections a sink writes through, in parallel (each a Postgres process).
const CONNECTIONS: usize = 2;
/// Postgres takes at most 65 535 parameters a statement.
const MAX_PARAMS: usize = 65_535;
const IDLE: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What `GET /api/v1/sinks` and `/metrics` show of a sink.
#[derive(Debug, Default)]
pub struct SinkStatus {
    pub name: String,
    pub from: String,
    pub target: String,
    pub rows_written: AtomicU64,
    pub errors: AtomicU64,
    /// Outbox rows not delivered yet (counted up to [`LAG_CAP`], at most once a second).
    pub lag_rows: AtomicU64,
    /// Age of the oldest row not delivered, ms (0 when caught up).
    pub lag_ms: AtomicI64,
    pub last_error: Mutex<Option<String>>,
}

/// The lag is counted up to this many rows.
pub const LAG_CAP: usize = 1_000_000;

#[derive(Serialize)]
pub struct SinkReport {
    pub name: String,
    pub from: String,
    pub target: String,
    pub rows_written: u64,
    pub lag_rows: u64,
    pub lag_seconds: f64,
    pub errors: u64,
    pub last_error: Option<String>,
}

impl SinkStatus {
    pub fn report(&self) -> SinkReport {
        SinkReport {
            name: self.name.clone(),
            from: self.from.clone(),
            target: self.target.clone(),
            rows_written: self.rows_written.load(Ordering::Relaxed),
            lag_rows: self.lag_rows.load(Ordering::Relaxed),
            lag_seconds: self.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            errors: self.errors.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }
}

/// The Postgres type a view column is created with.
pub fn pg_type(t: &DataType) -> &'static str {
    match t {
        DataType::Int64 | DataType::Int32 | DataType::Int16 | DataType::Int8 => "bigint",
        DataType::UInt64 | DataType::UInt32 | DataType::UInt16 | DataType::UInt8 => "bigint",
        DataType::Float64 | DataType::Float32 => "double precision",
        DataType::Boolean => "boolean",
        DataType::Timestamp(..) => "timestamptz",
        _ => "text",
    }
}

/// Postgres types (information_schema's `data_type`) that hold a view type without loss.
fn fits(view: &DataType, pg: &str) -> bool {
    match pg_type(view) {
        "bigint" => matches!(pg, "bigint" | "numeric"),
        "double precision" => pg == "double precision",
        "boolean" => pg == "boolean",
        "timestamptz" => matches!(
            pg,
            "timestamp with time zone" | "timestamp without time zone"
        ),
        _ => matches!(pg, "text" | "character varying"),
    }
}

/// Creates the sink's table when it is missing (with `create`), or checks
/// that it fits the view; an error names the column that does not. An
/// existing table is never altered.
pub async fn ensure_table(
    client: &tokio_postgres::Client,
    sink: &SinkDef,
    schema: &Schema,
    create: bool,
) -> Result<(), String> {
    let (pg_schema, table) = super::split_table(&sink.table);
    let present = client
        .query(
            "SELECT column_name::text, data_type::text, is_nullable = 'YES', column_default IS NOT NULL
             FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            &[&pg_schema, &table],
        )
        .await
        .map_err(super::pg)?;
    let key_nullable = sink.key_columns.iter().any(|k| {
        schema
            .field_with_name(k)
            .map(|f| f.is_nullable())
            .unwrap_or(true)
    });
    if present.is_empty() && !create {
        return Ok(());
    }
    if present.is_empty() {
        let mut columns: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| {
                let not_null = if sink.key_columns.contains(f.name()) && !f.is_nullable() {
                    " NOT NULL"
                } else {
                    ""
                };
                format!(
                    "{} {}{not_null}",
                    quote_ident(f.name()),
                    pg_type(f.data_type())
                )
            })
            .collect();
        let keys = sink
            .key_columns
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ");
        columns.push(if key_nullable {
            format!("UNIQUE NULLS NOT DISTINCT ({keys})")
        } else {
            format!("PRIMARY KEY ({keys})")
        });
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} ({})",
            quote_ident(pg_schema),
            quote_ident(&sink.table),
            columns.join(", ")
        );
        client
            .batch_execute(&ddl)
            .await
            .map_err(|e| format!("cannot create table {}: {}", sink.table, super::pg(e)))?;
        tracing::info!(sink = %sink.name, table = %sink.table, "sink table created");
        return Ok(());
    }
    let mut by_name: HashMap<String, (String, bool, bool)> = HashMap::new();
    for r in &present {
        by_name.insert(r.get(0), (r.get(1), r.get(2), r.get(3)));
    }
    for f in schema.fields() {
        match by_name.get(f.name()) {
            None => {
                return Err(format!(
                    "table {} has no column {} (the view's {}); add it, or sink into a new table",
                    sink.table,
                    f.name(),
                    f.data_type()
                ))
            }
            Some((pg, _, _)) if !fits(f.data_type(), pg) => {
                return Err(format!(
                "table {} column {} is {pg}, which cannot hold the view's {} without loss (use {})",
                sink.table,
                f.name(),
                f.data_type(),
                pg_type(f.data_type())
            ))
            }
            Some(_) => {}
        }
    }
    for (name, (_, nullable, default)) in &by_name {
        if schema.field_with_name(name).is_err() && !nullable && !default {
            return Err(format!(
                "table {} column {name} is NOT NULL without a default, and the view has no such column",
                sink.table
            ));
        }
    }
    let unique = client
        .query(
            "SELECT array_agg(a.attname::text ORDER BY a.attname::text)
             FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = $1::text::regclass AND i.indisunique
             GROUP BY i.indexrelid",
            &[&quote_ident(&sink.table)],
        )
        .await
        .map_err(super::pg)?;
    let mut want = sink.key_columns.clone();
    want.sort();
    if !unique.iter().any(|r| r.get::<_, Vec<String>>(0) == want) {
        return Err(format!(
            "table {} has no primary key or unique constraint on ({}), which the upserts need",
            sink.table,
            sink.key_columns.join(", ")
        ));
    }
    Ok(())
}

/// A sink's delivery loop.
pub struct SinkTask {
    pub def: Arc<SinkDef>,
    /// The columns delivered: the view's, or an alert record's.
    pub schema: SchemaRef,
    pub connection: ConnectionConfig,
    pub store: Store,
    pub status: Arc<SinkStatus>,
    /// Every sink of the same view (the outbox is trimmed to the slowest).
    pub siblings: Vec<String>,
    /// Deliver with COPY into a staging table and one merge, instead of
    /// multi-row INSERTs (`benches/sink.rs` measures both).
    pub copy: bool,
    pub shutdown: CancellationToken,
}

fn position_key(sink: &str) -> String {
    format!("sink/{sink}/position")
}

/// An outbox key's wall time (its log seq's upper bits), epoch ms.
fn written_at(key: &[u8]) -> Option<i64> {
    let seq = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
    Some((seq >> 16) as i64)
}

impl SinkTask {
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(500);
        let mut logged = false;
        loop {
            let ran = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = self.deliver(&mut backoff, &mut logged) => r,
            };
            let Err(e) = ran else { return };
            self.status.errors.fetch_add(1, Ordering::Relaxed);
            self.status.set_error(Some(e.clone()));
            if !logged {
                tracing::warn!(sink = %self.def.name, error = %e, "sink cannot deliver; its rows wait in the outbox, retrying with backoff");
                logged = true;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn deliver(&self, backoff: &mut Duration, logged: &mut bool) -> Result<(), String> {
        let mut clients = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            clients.push(connect(&self.connection).await?);
        }
        ensure_table(&clients[0], &self.def, &self.schema, true).await?;
        let statements = Statements::new(&self.def, &self.schema);
        let name = self.def.name.clone();
        let mut position: Option<Vec<u8>> = self
            .blocking(move |s| s.get_meta(&position_key(&name)))
            .await?;
        let mut healthy = false;
        let mut last_count = std::time::Instant::now() - Duration::from_secs(2);
        let mut trimmed: Option<Vec<u8>> = None;
        loop {
            let (view, after) = (self.def.outbox(), position.clone());
            let alert = self.def.from_alert;
            // counting the lag walks the outbox: at most once a second
            let count = last_count.elapsed() >= Duration::from_secs(1);
            if count {
                last_count = std::time::Instant::now();
            }
            let (rows, lag) = self
                .blocking(move |s| {
                    let mut rows = s.outbox(&view, after.as_deref(), BATCH_ROWS)?;
                    if alert {
                        // the record as it is now (its id was queued)
                        for (_, value) in &mut rows {
                            let id: Option<crate::alert::AlertId> =
                                value.as_slice().try_into().ok();
                            *value = match id.map(|id| s.get_alert(&id)).transpose()?.flatten() {
                                Some(a) => a.api_json().into_bytes(),
                                None => b"{}".to_vec(),
                            };
                        }
                    }
                    let lag = if rows.len() < BATCH_ROWS {
                        Some(rows.len())
                    } else if count {
                        Some(s.outbox_len(&view, after.as_deref(), LAG_CAP)?)
                    } else {
                        None
                    };
                    Ok((rows, lag))
                })
                .await?;
            if let Some(lag) = lag {
                self.status.lag_rows.store(lag as u64, Ordering::Relaxed);
            }
            let age = rows
                .first()
                .and_then(|(k, _)| written_at(k))
                .map_or(0, |t| (crate::obs::now_ms() - t).max(0));
            self.status.lag_ms.store(age, Ordering::Relaxed);
            if !healthy {
                healthy = true;
                if self
                    .status
                    .last_error
                    .lock()
                    .map(|e| e.is_some())
                    .unwrap_or(false)
                    || *logged
                {
                    tracing::info!(sink = %self.def.name, "sink delivering again");
                }
                self.status.set_error(None);
                *logged = false;
                *backoff = Duration::from_millis(500);
            }
            let Some((last, _)) = rows.last() else {
                tokio::time::sleep(IDLE).await;
                continue;
            };
            let last = last.clone();
            let n = self.upsert(&mut clients, &statements, &rows).await?;
            let (name, at) = (self.def.name.clone(), last.clone());
            self.blocking(move |s| s.put_meta(&position_key(&name), &at))
                .await?;
            position = Some(last);
            self.status
                .rows_written
                .fetch_add(n as u64, Ordering::Relaxed);
            self.trim(&mut trimmed).await?;
        }
    }

    /// Trims the outbox to what every sink of the view has delivered.
    async fn trim(&self, trimmed: &mut Option<Vec<u8>>) -> Result<(), String> {
        let (view, siblings, from) = (self.def.outbox(), self.siblings.clone(), trimmed.clone());
        let upto = self
            .blocking(move |s| {
                let mut upto: Option<Vec<u8>> = None;
                for sink in &siblings {
                    match s.get_meta(&position_key(sink))? {
                        Some(p) => {
                            if upto.as_ref().is_none_or(|u| p < *u) {
                                upto = Some(p);
                            }
                        }
                        None => return Ok(None),
                    }
                }
                if let Some(u) = &upto {
                    s.trim_outbox(&view, from.as_deref(), u)?;
                }
                Ok(upto)
            })
            .await?;
        if upto.is_some() {
            *trimmed = upto;
        }
        Ok(())
    }

    /// Upserts the rows (JSON objects) in one transaction; returns how many
    /// distinct keys were written.
    async fn upsert(
        &self,
        clients: &mut [tokio_postgres::Client],
        statements: &Statements,
        rows: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<usize, String> {
        let schema = &self.schema;
        let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        // the last row of each key wins
        let names: HashMap<&str, usize> =
            columns.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let key_at: Vec<usize> = self
            .def
            .key_columns
            .iter()
            .filter_map(|k| names.get(k.as_str()).copied())
            .collect();
        let mut latest: HashMap<Vec<Option<&str>>, usize> = HashMap::new();
        let mut parsed: Vec<Vec<Option<Cow<str>>>> = Vec::with_capacity(rows.len());
        for (_, entry) in rows {
            for json in crate::store::outbox_rows(entry) {
                let Some(cells) = row_cells(json, &names)? else {
                    continue; // an alert removed by retention before it was delivered
                };
                parsed.push(cells);
            }
        }
        for (i, cells) in parsed.iter().enumerate() {
            let key = key_at.iter().map(|&k| cells[k].as_deref()).collect();
            latest.insert(key, i);
        }
        // Each key's last row, split over the connections by key (a key's
        // rows always take the same one), each part in its own transaction,
        // all of them in parallel: Postgres' side of an upsert is most of
        // its cost, and one connection is one Postgres process, one core.
        let parts = clients.len().max(1);
        let hasher = ahash::RandomState::new();
        let mut split: Vec<Vec<usize>> = vec![Vec::new(); parts];
        let written = latest.len();
        for (key, i) in latest {
            split[(hasher.hash_one(&key) % parts as u64) as usize].push(i);
        }
        let parsed = &parsed;
        let work = clients
            .iter_mut()
            .zip(split)
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(client, mut rows)| {
                rows.sort_unstable();
                async move { self.write_part(client, parsed, &rows, statements).await }
            });
        futures::future::try_join_all(work).await?;
        Ok(written)
    }

    /// Upserts `rows` of `parsed` in one transaction.
    async fn write_part(
        &self,
        client: &mut tokio_postgres::Client,
        parsed: &[Vec<Option<Cow<'_, str>>>],
        rows: &[usize],
        sql: &Statements,
    ) -> Result<(), String> {
        let tx = client.transaction().await.map_err(super::pg)?;
        if self.copy {
            // COPY into a staging table, then one INSERT ... SELECT ... ON CONFLICT
            tx.batch_execute(&sql.create_stage)
                .await
                .map_err(super::pg)?;
            let mut text = String::with_capacity(rows.len() * 64);
            for &i in rows {
                for (c, cell) in parsed[i].iter().enumerate() {
                    if c > 0 {
                        text.push('\t');
                    }
                    match cell {
                        None => text.push_str("\\N"),
                        Some(s) => copy_escape(&mut text, s),
                    }
                }
                text.push('\n');
            }
            let copy = tx
                .copy_in::<_, bytes::Bytes>(&sql.copy)
                .await
                .map_err(super::pg)?;
            futures::pin_mut!(copy);
            use futures::SinkExt;
            copy.send(bytes::Bytes::from(text))
                .await
                .map_err(super::pg)?;
            copy.finish().await.map_err(super::pg)?;
            tx.batch_execute(&sql.merge).await.map_err(super::pg)?;
            return tx.commit().await.map_err(super::pg);
        }
        let width = sql.casts.len().max(1);
        for chunk in rows.chunks((MAX_PARAMS / width).clamp(1, 1000)) {
            let mut text = sql.insert.clone();
            let mut params: Vec<Option<String>> = Vec::with_capacity(chunk.len() * width);
            for (r, &i) in chunk.iter().enumerate() {
                if r > 0 {
                    text.push(',');
                }
                text.push('(');
                for (c, cell) in parsed[i].iter().enumerate() {
                    if c > 0 {
                        text.push(',');
                    }
                    params.push(cell.as_deref().map(str::to_string));
                    text.push_str(&format!("${}::{}", params.len(), sql.casts[c]));
                }
                text.push(')');
            }
            text.push(' ');
            text.push_str(&sql.conflict);
            let types = vec![tokio_postgres::types::Type::TEXT; params.len()];
            let statement = tx.prepare_typed(&text, &types).await.map_err(super::pg)?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            tx.execute(&statement, &refs).await.map_err(super::pg)?;
        }
        tx.commit().await.map_err(super::pg)
    }
}

/// The SQL of a sink's upserts.
struct Statements {
    /// Each column's Postgres type (text parameters are cast to it).
    casts: Vec<&'static str>,
    /// `INSERT INTO t (columns) VALUES ` (rows follow).
    insert: String,
    /// `ON CONFLICT (keys) DO UPDATE SET ...` (or `DO NOTHING`).
    conflict: String,
    create_stage: String,
    copy: String,
    /// `INSERT INTO t SELECT ... FROM stage ON CONFLICT ...`.
    merge: String,
}

impl Statements {
    fn new(def: &SinkDef, schema: &Schema) -> Statements {
        let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let list = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !def.key_columns.iter().any(|k| k == *c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        let conflict = format!(
            "ON CONFLICT ({}) {}",
            def.key_columns
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", "),
            if updates.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            }
        );
        let table = quote_ident(&def.table);
        let stage = quote_ident(&format!("weir_stage_{}", def.name));
        Statements {
            casts: schema.fields().iter().map(|f| pg_type(f.data_type())).collect(),
            insert: format!("INSERT INTO {table} ({list}) VALUES "),
            create_stage: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            ),
            copy: format!("COPY {stage} ({list}) FROM STDIN"),
            merge: format!("INSERT INTO {table} ({list}) SELECT {list} FROM {stage} {conflict}"),
            conflict,
        }
    }
}

/// One outbox row's cells in the table's column order (`columns`: name →
/// position), as text: a string's own text (borrowed from `json` when it
/// has no escapes), a number or boolean as JSON writes it, an object or
/// array as its JSON; `None` for null or absent. `Ok(None)` for `{}` (an
/// alert record removed before it was delivered).
fn row_cells<'a>(
    json: &'a [u8],
    columns: &HashMap<&str, usize>,
) -> Result<Option<Vec<Option<Cow<'a, str>>>>, String> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let row = RowSeed { columns }
        .deserialize(&mut de)
        .and_then(|row| de.end().map(|()| row))
        .map_err(|e| format!("outbox row is not a JSON object: {e}"))?;
    Ok(row)
}

struct RowSeed<'c> {
    columns: &'c HashMap<&'c str, usize>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Option<Vec<Option<Cow<'de, str>>>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = Option<Vec<Option<Cow<'de, str>>>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut cells: Vec<Option<Cow<'de, str>>> = vec![None; self.columns.len()];
        let mut any = false;
        while let Some(name) = map.next_key_seed(Cell)? {
            any = true;
            match name.as_deref().and_then(|n| self.columns.get(n)) {
                Some(&at) => cells[at] = map.next_value_seed(Cell)?,
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(any.then_some(cells))
    }
}

/// One JSON value as the text COPY or a text parameter takes (`None`: null).
struct Cell;

impl<'de> DeserializeSeed<'de> for Cell {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Cell {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v)))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(if v { "true" } else { "false" })))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(itoa::Buffer::new().format(v).to_string())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(itoa::Buffer::new().format(v).to_string())))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        // as serde_json writes a float (JSON has no NaN or infinity)
        Ok(Some(Cow::Owned(Value::from(v).to_string())))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let v = Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(Some(Cow::Owned(v.to_string())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let v = Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Some(Cow::Owned(v.to_string())))
    }
}

/// A value in COPY's text format (backslash escapes).
fn copy_escape(out: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_is_escaped() {
        let mut out = String::new();
        copy_escape(&mut out, "a\tb\nc\\d\re");
        assert_eq!(out, "a\\tb\\nc\\\\d\\re");
    }

    #[test]
    fn outbox_rows_become_cells_in_column_order() {
        let columns: HashMap<&str, usize> = [
            ("id", 0),
            ("note", 1),
            ("n", 2),
            ("x", 3),
            ("ok", 4),
            ("row", 5),
            ("gone", 6),
        ]
        .into_iter()
        .collect();
        let json = br#"{"n":-12,"x":2.5,"note":"tab\there \u00e9","ok":true,"id":"T1","row":{"a":[1,null]},"extra":[1,{"b":2}],"gone":null}"#;
        let cells = row_cells(json, &columns).unwrap().unwrap();
        let text: Vec<Option<&str>> = cells.iter().map(|c| c.as_deref()).collect();
        assert_eq!(
            text,
            [
                Some("T1"),
                Some("tab\there é"),
                Some("-12"),
                Some("2.5"),
                Some("true"),
                Some(r#"{"a":[1,null]}"#),
                None
            ]
        );
        // a string without escapes is borrowed, not copied
        assert!(matches!(cells[0], Some(Cow::Borrowed(_))));
        // a large float and an integer past i64 keep JSON's spelling of them
        let cells = row_cells(br#"{"x":1e300,"n":18446744073709551615}"#, &columns)
            .unwrap()
            .unwrap();
        assert_eq!(cells[3].as_deref(), Some("1e+300"));
        assert_eq!(cells[2].as_deref(), Some("18446744073709551615"));
        assert_eq!(row_cells(b"{}", &columns).unwrap(), None);
        for bad in [&b"[1]"[..], b"{\"id\":", b"{} {}", b"", b"\"id\""] {
            assert!(
                row_cells(bad, &columns).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn view_types_map_to_postgres_and_back() {
        assert_eq!(pg_type(&DataType::Int64), "bigint");
        assert!(fits(&DataType::Int64, "numeric"));
        assert!(!fits(&DataType::Int64, "integer"));
        assert!(fits(&DataType::Float64, "double precision"));
        assert!(!fits(&DataType::Float64, "real"));
        assert!(fits(
            &crate::plan::timestamp_type(),
            "timestamp without time zone"
        ));
        assert!(fits(&DataType::Utf8, "character varying"));
        assert!(!fits(&DataType::Utf8, "integer"));
    }

    #[test]
    fn outbox_keys_tell_their_time() {
        let seq = crate::log::seq_at(1_700_000_000_123) + 5;
        let mut key = seq.to_be_bytes().to_vec();
        key.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(written_at(&key), Some(1_700_000_000_123));
        assert_eq!(written_at(b"short"), None);
    }
}
