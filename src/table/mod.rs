//! Reference tables (DESIGN §2): what the back office knows about each
//! terminal, brought in from Postgres and met by events in lookup joins.
//!
//! A table's rows are one Arrow [`RecordBatch`] and a hash index from primary
//! key to row: a lookup join evaluates the stream's key column, finds each
//! key's row (`lookup`), and `take`s the table's columns at those rows — the
//! same vectorised path as every other step, no row-at-a-time code.
//!
//! Rows change only through the ingest log. The Postgres source
//! (`crate::postgres`) turns a snapshot or a batch of logical-decoding
//! changes into a *change batch* — the table's columns plus [`OP_COLUMN`] and
//! [`LSN_COLUMN`] — which the pipeline appends to the log like MQTT input and
//! then applies ([`Rows::apply`]). Replaying the log after a crash therefore
//! meets each event with the version of the row it met the first time, and
//! the table's rows are part of every checkpoint ([`Rows::encode`]).
//!
//! [`TableHandle`] is how the rows are shared: the pipeline thread swaps in
//! a new `Arc<Rows>` after applying a change batch; views (on the same
//! thread) and ad-hoc queries (on others) read whichever is current.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, Int8Array, RecordBatch, StringArray, UInt32Array,
};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;

/// A change batch's operation column (Int8): [`OP_UPSERT`], [`OP_DELETE`] or [`OP_REPLACE`].
pub const OP_COLUMN: &str = "__weir_op";
/// A change batch's position column (Int64): the Postgres LSN of the
/// change's transaction (0 for a table read without replication).
pub const LSN_COLUMN: &str = "__weir_lsn";
/// The row is inserted, or replaces the row with its key.
pub const OP_UPSERT: i8 = 0;
/// The row with this key goes (only the key column is read).
pub const OP_DELETE: i8 = 1;
/// Everything before goes (a snapshot starts with it; a `TRUNCATE` is one);
/// the row's own values are not read.
pub const OP_REPLACE: i8 = 2;

type Index = HashMap<Box<str>, u32, ahash::RandomState>;

/// The rows of a reference table at one point of the log.
pub struct Rows {
    /// The declared columns; every row's key is unique.
    pub batch: RecordBatch,
    index: Index,
    key: usize,
    /// LSN of the last change applied (0: none yet).
    pub lsn: i64,
}

impl std::fmt::Debug for Rows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rows")
            .field("rows", &self.batch.num_rows())
            .field("lsn", &self.lsn)
            .finish()
    }
}

/// The text form of a key column's values (a BIGINT key is indexed by its decimal text).
fn key_strings(column: &ArrayRef) -> Result<StringArray, ArrowError> {
    match column.data_type() {
        DataType::Utf8 => Ok(column.as_string::<i32>().clone()),
        _ => Ok(cast(column, &DataType::Utf8)?.as_string::<i32>().clone()),
    }
}

impl Rows {
    pub fn empty(schema: SchemaRef, key: usize) -> Rows {
        Rows {
            batch: RecordBatch::new_empty(schema),
            index: Index::default(),
            key,
            lsn: 0,
        }
    }

    /// Rows from a batch whose keys are unique (the last of equal keys wins).
    fn from_batch(batch: RecordBatch, key: usize, lsn: i64) -> Result<Rows, ArrowError> {
        let keys = key_strings(batch.column(key))?;
        let mut index = Index::with_capacity_and_hasher(keys.len(), Default::default());
        let mut duplicate = false;
        for (i, k) in keys.iter().enumerate() {
            if let Some(k) = k {
                duplicate |= index.insert(k.into(), i as u32).is_some();
            }
        }
        if duplicate || index.len() != batch.num_rows() {
            // keep only each key's last row (and no NULL keys)
            let mut rows: Vec<u32> = index.values().copied().collect();
            rows.sort_unstable();
            let batch = take_rows(&batch, &UInt32Array::from(rows))?;
            return Rows::from_batch(batch, key, lsn);
        }
        Ok(Rows {
            batch,
            index,
            key,
            lsn,
        })
    }

    /// Rows of `batches` (in `schema`, nullable), indexed by `key`
    /// evaluated over them: the other side of a windowed join, whose key is
    /// unique per batch set (a view's keys and window_start).
    pub fn keyed(
        schema: SchemaRef,
        batches: &[RecordBatch],
        key: &dyn datafusion::physical_expr::PhysicalExpr,
    ) -> Result<Rows, datafusion::error::DataFusionError> {
        let mut columns: Vec<RecordBatch> = Vec::with_capacity(batches.len());
        for b in batches {
            columns.push(RecordBatch::try_new(schema.clone(), b.columns().to_vec())?);
        }
        let batch = concat_batches(&schema, &columns)?;
        let keys = key.evaluate(&batch)?.into_array(batch.num_rows())?;
        let keys = key_strings(&keys)?;
        let mut index = Index::with_capacity_and_hasher(keys.len(), Default::default());
        for (i, k) in keys.iter().enumerate() {
            if let Some(k) = k {
                index.insert(k.into(), i as u32);
            }
        }
        Ok(Rows {
            batch,
            index,
            key: 0,
            lsn: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// For each value of `keys` (a stream's join column), the row with that
    /// key, or NULL when there is none.
    pub fn lookup(&self, keys: &ArrayRef) -> Result<UInt32Array, ArrowError> {
        let keys = key_strings(keys)?;
        // a message's rows are mostly one terminal's: a key equal to the
        // previous row's costs a comparison, not a hash
        let mut last: Option<(&str, Option<u32>)> = None;
        Ok(keys
            .iter()
            .map(|k| {
                let k = k?;
                if let Some((previous, at)) = last {
                    if previous == k {
                        return at;
                    }
                }
                let at = self.index.get(k).copied();
                last = Some((k, at));
                at
            })
            .collect())
    }

    /// The rows after `changes` (the table's columns, then [`OP_COLUMN`] and
    /// [`LSN_COLUMN`]), applied in order.
    pub fn apply(&self, changes: &RecordBatch) -> Result<Rows, ArrowError> {
        let width = self.batch.num_columns();
        let bad = |m: &str| ArrowError::InvalidArgumentError(format!("change batch: {m}"));
        if changes.num_columns() != width + 2 {
            return Err(bad("wrong number of columns"));
        }
        let ops = changes
            .column(width)
            .as_primitive_opt::<datafusion::arrow::datatypes::Int8Type>()
            .ok_or_else(|| bad("op column is not Int8"))?;
        let lsns = changes
            .column(width + 1)
            .as_primitive_opt::<datafusion::arrow::datatypes::Int64Type>()
            .ok_or_else(|| bad("lsn column is not Int64"))?;
        let lsn = lsns.iter().flatten().max().unwrap_or(0).max(self.lsn);
        let data = RecordBatch::try_new(self.batch.schema(), changes.columns()[..width].to_vec())?;
        // After the last OP_REPLACE, the changes apply to an empty table.
        let (base, data) = match ops.values().iter().rposition(|&op| op == OP_REPLACE) {
            Some(at) => (
                &Rows::empty(self.batch.schema(), self.key),
                data.slice(at + 1, data.num_rows() - at - 1),
            ),
            None => (self, data),
        };
        let ops = ops.slice(changes.num_rows() - data.num_rows(), data.num_rows());
        // Each key's last change decides; the old rows of changed keys go.
        let keys = key_strings(data.column(self.key))?;
        let mut last: HashMap<&str, usize, ahash::RandomState> = HashMap::default();
        for (i, k) in keys.iter().enumerate() {
            if let Some(k) = k {
                last.insert(k, i);
            }
        }
        let keep_old: datafusion::arrow::array::BooleanArray = {
            let old = key_strings(base.batch.column(self.key))?;
            old.iter()
                .map(|k| Some(k.is_none_or(|k| !last.contains_key(k))))
                .collect()
        };
        let mut upserts: Vec<u32> = last
            .values()
            .filter(|&&i| ops.value(i) != OP_DELETE)
            .map(|&i| i as u32)
            .collect();
        upserts.sort_unstable();
        let kept = filter_record_batch(&base.batch, &keep_old)?;
        let added = take_rows(&data, &UInt32Array::from(upserts))?;
        let batch = concat_batches(&self.batch.schema(), [&kept, &added])?;
        Rows::from_batch(batch, self.key, lsn)
    }

    /// The rows as an Arrow IPC stream, preceded by the LSN: a checkpoint part.
    pub fn encode(&self) -> Result<Vec<u8>, ArrowError> {
        let mut out = self.lsn.to_le_bytes().to_vec();
        let mut writer = StreamWriter::try_new(&mut out, &self.batch.schema())?;
        writer.write(&self.batch)?;
        writer.finish()?;
        drop(writer);
        Ok(out)
    }

    /// Reads what [`Rows::encode`] wrote; the columns must be `schema`'s.
    pub fn decode(bytes: &[u8], schema: SchemaRef, key: usize) -> Result<Rows, String> {
        let (lsn, ipc) = bytes
            .split_at_checked(8)
            .ok_or("table part shorter than its header")?;
        let lsn = i64::from_le_bytes(lsn.try_into().map_err(|_| "bad header")?);
        let mut reader =
            StreamReader::try_new(Cursor::new(ipc), None).map_err(|e| e.to_string())?;
        let batch = match reader.next() {
            Some(b) => b.map_err(|e| e.to_string())?,
            None => RecordBatch::new_empty(schema.clone()),
        };
        let same = batch.schema().fields().len() == schema.fields().len()
            && batch
                .schema()
                .fields()
                .iter()
                .zip(schema.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if !same {
            return Err("the checkpointed rows have other columns than the table".into());
        }
        let batch =
            RecordBatch::try_new(schema, batch.columns().to_vec()).map_err(|e| e.to_string())?;
        Rows::from_batch(batch, key, lsn).map_err(|e| e.to_string())
    }
}

/// A table's rows in a checkpoint: one part, no chunks, encoded on the
/// checkpoint writer's thread.
pub struct TablePart(pub Arc<Rows>);

impl crate::checkpoint::Part for TablePart {
    fn header(&self) -> Result<Vec<u8>, String> {
        self.0.encode().map_err(|e| e.to_string())
    }
    fn segments(&self) -> Vec<crate::checkpoint::Segment> {
        Vec::new()
    }
    fn encode_chunk(&self, _: usize, _: usize) -> Result<Vec<u8>, String> {
        Err("a table part has no chunks".into())
    }
    fn release_chunk(&mut self, _: usize, _: usize) {}
}

fn take_rows(batch: &RecordBatch, rows: &UInt32Array) -> Result<RecordBatch, ArrowError> {
    let columns = batch
        .columns()
        .iter()
        .map(|c| take(c, rows, None))
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(batch.schema(), columns)
}

/// The schema of a table's change batches: its columns (all nullable: a
/// delete carries only the key), then the op and the LSN.
pub fn change_schema(schema: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| Field::new(f.name(), f.data_type().clone(), true))
        .collect();
    fields.push(Field::new(OP_COLUMN, DataType::Int8, false));
    fields.push(Field::new(LSN_COLUMN, DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

/// A change batch from the table's columns (in the change schema's
/// nullability), ops and LSNs.
pub fn change_batch(
    schema: &Schema,
    mut columns: Vec<ArrayRef>,
    ops: Vec<i8>,
    lsns: Vec<i64>,
) -> Result<RecordBatch, ArrowError> {
    columns.push(Arc::new(Int8Array::from(ops)));
    columns.push(Arc::new(Int64Array::from(lsns)));
    RecordBatch::try_new(change_schema(schema), columns)
}

/// A table's current rows, shared by the pipeline thread (which replaces
/// them as changes are applied) and everything that reads them; and the
/// LSN that both stored checkpoints include (the Postgres source advances
/// its replication slot no further).
#[derive(Clone)]
pub struct TableHandle {
    rows: Arc<RwLock<Arc<Rows>>>,
    durable: Arc<AtomicI64>,
}

impl std::fmt::Debug for TableHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl TableHandle {
    pub fn new(schema: SchemaRef, key: usize) -> TableHandle {
        TableHandle {
            rows: Arc::new(RwLock::new(Arc::new(Rows::empty(schema, key)))),
            durable: Arc::new(AtomicI64::new(0)),
        }
    }

    pub fn get(&self) -> Arc<Rows> {
        self.rows.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, rows: Arc<Rows>) {
        *self.rows.write().unwrap_or_else(|e| e.into_inner()) = rows;
    }

    pub fn durable(&self) -> i64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Where the checkpoint writer records the durable LSN.
    pub fn durable_slot(&self) -> Arc<AtomicI64> {
        self.durable.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("terminal_id", DataType::Utf8, false),
            Field::new("region", DataType::Utf8, true),
        ]))
    }

    fn changes(rows: &[(&str, Option<&str>, i8, i64)]) -> RecordBatch {
        let s = schema();
        change_batch(
            &s,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1))),
            ],
            rows.iter().map(|r| r.2).collect(),
            rows.iter().map(|r| r.3).collect(),
        )
        .unwrap()
    }

    fn region(rows: &Rows, key: &str) -> Option<String> {
        let keys: ArrayRef = Arc::new(StringArray::from(vec![key]));
        let at = rows.lookup(&keys).unwrap();
        if at.is_null(0) {
            return None;
        }
        let col = rows.batch.column(1).as_string::<i32>();
        let i = at.value(0) as usize;
        Some(if col.is_null(i) {
            "NULL".into()
        } else {
            col.value(i).to_string()
        })
    }

    #[test]
    fn changes_apply_in_order_and_the_last_for_a_key_wins() {
        let t = Rows::empty(schema(), 0)
            .apply(&changes(&[
                ("", None, OP_REPLACE, 10),
                ("t1", Some("north"), OP_UPSERT, 10),
                ("t2", Some("south"), OP_UPSERT, 10),
            ]))
            .unwrap();
        assert_eq!(t.len(), 2);
        let t = t
            .apply(&changes(&[
                ("t1", Some("east"), OP_UPSERT, 11),
                ("t3", None, OP_UPSERT, 12),
                ("t2", None, OP_DELETE, 13),
                ("t3", Some("west"), OP_UPSERT, 14),
            ]))
            .unwrap();
        assert_eq!(region(&t, "t1").as_deref(), Some("east"));
        assert_eq!(region(&t, "t2"), None);
        assert_eq!(region(&t, "t3").as_deref(), Some("west"));
        assert_eq!(t.len(), 2);
        assert_eq!(t.lsn, 14);
        // a delete then an insert of the same key keeps the insert
        let t = t
            .apply(&changes(&[
                ("t1", None, OP_DELETE, 15),
                ("t1", Some("back"), OP_UPSERT, 16),
            ]))
            .unwrap();
        assert_eq!(region(&t, "t1").as_deref(), Some("back"));
        // a snapshot replaces everything
        let t = t
            .apply(&changes(&[
                ("t1", Some("gone"), OP_UPSERT, 20),
                ("", None, OP_REPLACE, 20),
                ("t9", Some("only"), OP_UPSERT, 20),
            ]))
            .unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(region(&t, "t1"), None);
        assert_eq!(region(&t, "t9").as_deref(), Some("only"));
        // a truncate alone empties it
        let t = t.apply(&changes(&[("", None, OP_REPLACE, 21)])).unwrap();
        assert!(t.is_empty());
        assert_eq!(t.lsn, 21);
    }

    #[test]
    fn rows_survive_a_checkpoint() {
        let t = Rows::empty(schema(), 0)
            .apply(&changes(&[
                ("t1", Some("north"), OP_UPSERT, 7),
                ("t2", None, OP_UPSERT, 8),
            ]))
            .unwrap();
        let back = Rows::decode(&t.encode().unwrap(), schema(), 0).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.lsn, 8);
        assert_eq!(region(&back, "t1").as_deref(), Some("north"));
        assert_eq!(region(&back, "t2").as_deref(), Some("NULL"));
        let other = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        assert!(Rows::decode(&t.encode().unwrap(), other, 0).is_err());
        assert!(Rows::decode(b"abc", schema(), 0).is_err());
    }

    #[test]
    fn bigint_keys_match_bigint_and_text_columns() {
        let s = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let t = Rows::empty(s.clone(), 0)
            .apply(
                &change_batch(
                    &s,
                    vec![Arc::new(Int64Array::from(vec![42, 7]))],
                    vec![OP_UPSERT; 2],
                    vec![1, 1],
                )
                .unwrap(),
            )
            .unwrap();
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(7), None, Some(8)]));
        let at = t.lookup(&ints).unwrap();
        assert!(at.is_valid(0) && at.is_null(1) && at.is_null(2));
        let text: ArrayRef = Arc::new(StringArray::from(vec!["42"]));
        assert!(t.lookup(&text).unwrap().is_valid(0));
    }
}
