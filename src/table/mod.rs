//! Reference tables (DESIGN §2): what the back office knows about each
//! terminal, brought in from Postgres and met by events in lookup joins.
//!
//! A table's rows are one Arrow [`RecordBatch`] and a hash index from primary
//! key to row: a lookup join evaluates the stream's key column, finds each
//! key's row (`lookup`), and `take`s the table's columns at those rows — the
//! same vectorised path as every other step, no row-at-a-time code.
//!
//! The index holds a key of up to 11 bytes inline with its row (a longer
//! one as the row number, compared against the key column), and a lookup
//! first numbers the batch's own distinct keys, so a terminal's events in
//! one batch probe the table once: the table's index is larger than the
//! CPU's cache and each probe of it is a cache miss.
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

use hashbrown::HashTable;

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

/// A key as the index holds it: at most 11 bytes (a terminal id) inline as
/// two integers, its bytes then its length (equal keys, equal pairs), so
/// that finding it reads no string; a longer one as its text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key<'a> {
    Short(u64, u32),
    Long(&'a str),
}

impl<'a> Key<'a> {
    #[inline]
    fn of(key: &'a str) -> Key<'a> {
        let k = key.as_bytes();
        if k.len() > 11 {
            return Key::Long(key);
        }
        // (shifts, not a copy into a buffer read back as integers: that read
        // waits for the copy's bytes to reach memory)
        let (mut lo, mut hi) = (0u64, (k.len() as u32) << 24);
        for (i, &c) in k.iter().enumerate() {
            if i < 8 {
                lo |= (c as u64) << (8 * i);
            } else {
                hi |= (c as u32) << (8 * (i - 8));
            }
        }
        Key::Short(lo, hi)
    }

    fn hash(self, hasher: &ahash::RandomState) -> u64 {
        match self {
            Key::Short(lo, hi) => hasher.hash_one((lo, hi)),
            Key::Long(k) => hasher.hash_one(k),
        }
    }
}

/// Primary key → row: short keys with their row in one hash table, long
/// ones as row numbers compared against the key column's text.
#[derive(Clone)]
struct Index {
    hasher: ahash::RandomState,
    short: HashTable<(u64, u32, u32)>,
    long: HashTable<u32>,
    /// The key column as text (a BIGINT key is indexed by its decimal text).
    keys: StringArray,
}

impl Default for Index {
    fn default() -> Index {
        Index::build(StringArray::from(Vec::<&str>::new())).0
    }
}

impl Index {
    /// The index of `keys`; with equal keys, the last row's. Returns it and
    /// whether some key was NULL or not unique.
    fn build(keys: StringArray) -> (Index, bool) {
        let hasher = ahash::RandomState::new();
        let mut short: HashTable<(u64, u32, u32)> = HashTable::with_capacity(keys.len());
        let mut long: HashTable<u32> = HashTable::new();
        let mut unfit = false;
        for (i, k) in keys.iter().enumerate() {
            let Some(k) = k else {
                unfit = true;
                continue;
            };
            let key = Key::of(k);
            let hash = key.hash(&hasher);
            let row = i as u32;
            let replaced = match key {
                Key::Short(lo, hi) => match short.find_mut(hash, |e| (e.0, e.1) == (lo, hi)) {
                    Some(e) => Some(std::mem::replace(&mut e.2, row)),
                    None => {
                        short.insert_unique(hash, (lo, hi, row), |e| hasher.hash_one((e.0, e.1)));
                        None
                    }
                },
                Key::Long(k) => match long.find_mut(hash, |&r| keys.value(r as usize) == k) {
                    Some(r) => Some(std::mem::replace(r, row)),
                    None => {
                        long.insert_unique(hash, row, |&r| hasher.hash_one(keys.value(r as usize)));
                        None
                    }
                },
            };
            unfit |= replaced.is_some();
        }
        let index = Index {
            hasher,
            short,
            long,
            keys,
        };
        (index, unfit)
    }

    fn find(&self, key: Key, hash: u64) -> Option<u32> {
        match key {
            Key::Short(lo, hi) => self
                .short
                .find(hash, |e| (e.0, e.1) == (lo, hi))
                .map(|e| e.2),
            Key::Long(k) => self
                .long
                .find(hash, |&r| self.keys.value(r as usize) == k)
                .copied(),
        }
    }

    /// Every row the index points to.
    fn rows(&self) -> impl Iterator<Item = u32> + '_ {
        self.short
            .iter()
            .map(|e| e.2)
            .chain(self.long.iter().copied())
    }
}

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

/// Numbers the distinct values of `keys` in order of appearance: each row's
/// id ([`NULL_KEY`](crate::window::operator::NULL_KEY) for NULL), and each
/// id's key with its hash. A key equal to the previous row's costs a
/// comparison; another, a hash and a probe of a table of the batch's keys
/// alone, which stays in the CPU's cache.
fn number<'a>(
    keys: &'a StringArray,
    hasher: &ahash::RandomState,
) -> (Vec<u32>, Vec<(Key<'a>, u64)>) {
    let mut distinct: Vec<(Key, u64)> = Vec::new();
    let mut seen: HashTable<u32> = HashTable::with_capacity(keys.len().min(4096));
    let mut ids: Vec<u32> = Vec::with_capacity(keys.len());
    let mut last: Option<(&str, u32)> = None;
    for i in 0..keys.len() {
        if keys.is_null(i) {
            ids.push(crate::window::operator::NULL_KEY);
            continue;
        }
        let k = keys.value(i);
        if let Some((previous, id)) = last {
            if previous == k {
                ids.push(id);
                continue;
            }
        }
        let key = Key::of(k);
        let hash = key.hash(hasher);
        let id = match seen.find(hash, |&id| distinct[id as usize].0 == key) {
            Some(&id) => id,
            None => {
                let id = distinct.len() as u32;
                distinct.push((key, hash));
                seen.insert_unique(hash, id, |&id| distinct[id as usize].1);
                id
            }
        };
        last = Some((k, id));
        ids.push(id);
    }
    (ids, distinct)
}

/// The rows of a text column numbered by value (see [`number`]), for an
/// aggregate grouped by it alone; None for a column of another type.
pub fn number_keys(
    column: &ArrayRef,
    hasher: &ahash::RandomState,
) -> Option<crate::window::operator::KeyIds> {
    let keys = column.as_string_opt::<i32>()?;
    let (ids, distinct) = number(keys, hasher);
    Some(crate::window::operator::KeyIds::new(
        column,
        ids,
        distinct.len(),
    ))
}

/// What [`Rows::lookup`] found.
pub struct Lookup {
    /// Each key's row, NULL where the table has none.
    pub rows: UInt32Array,
    /// The batch's keys, numbered.
    pub keys: crate::window::operator::KeyIds,
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
        let (index, unfit) = Index::build(key_strings(batch.column(key))?);
        if unfit {
            // keep only each key's last row (and no NULL keys)
            let mut rows: Vec<u32> = index.rows().collect();
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
        let (index, _) = Index::build(key_strings(&keys)?);
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
    /// key, or NULL when there is none; and the numbering of the batch's
    /// keys it was found through (the view's aggregate may reuse it).
    pub fn lookup(&self, column: &ArrayRef) -> Result<Lookup, ArrowError> {
        let keys = key_strings(column)?;
        // First the batch's distinct keys, numbered in a table of its own
        // that stays in the cache (the table's index does not).
        let (ids, distinct) = number(&keys, &self.index.hasher);
        // Then one probe of the index per distinct key: independent probes,
        // whose cache misses the CPU overlaps.
        let rows: Vec<Option<u32>> = distinct
            .iter()
            .map(|&(key, hash)| self.index.find(key, hash))
            .collect();
        let rows = ids
            .iter()
            .map(|&id| rows.get(id as usize).copied().flatten())
            .collect();
        Ok(Lookup {
            rows,
            keys: crate::window::operator::KeyIds::new(column, ids, distinct.len()),
        })
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
        let at = rows.lookup(&keys).unwrap().rows;
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
    fn lookups_find_every_key_short_or_long_and_nothing_else() {
        // keys around the 11 bytes held inline, ones that differ only in
        // length or a trailing NUL, an empty one, and multi-byte text
        let table: Vec<String> = (0..20)
            .map(|n| "k".repeat(n))
            .chain(
                [
                    "a",
                    "a\0",
                    "\0",
                    "ünïcödé-key",
                    "ünïcödé-ke",
                    "T000001",
                    "T0000012345678",
                ]
                .map(String::from),
            )
            .collect();
        let rows: Vec<(&str, Option<&str>, i8, i64)> = table
            .iter()
            .map(|k| (k.as_str(), Some(k.as_str()), OP_UPSERT, 1))
            .collect();
        let t = Rows::empty(schema(), 0).apply(&changes(&rows)).unwrap();
        assert_eq!(t.len(), table.len());
        // a batch that repeats keys, neighbouring and not, misses some, has NULLs
        let probes: Vec<Option<String>> = table
            .iter()
            .chain(table.iter().rev())
            .flat_map(|k| {
                [
                    Some(k.clone()),
                    Some(format!("{k}x")),
                    None,
                    Some(k.clone()),
                ]
            })
            .collect();
        let keys: ArrayRef = Arc::new(StringArray::from(probes.clone()));
        let at = t.lookup(&keys).unwrap().rows;
        let values = t.batch.column(1).as_string::<i32>();
        for (i, probe) in probes.iter().enumerate() {
            let expected = probe.as_ref().filter(|p| table.contains(p));
            let found = (!at.is_null(i)).then(|| values.value(at.value(i) as usize).to_string());
            assert_eq!(found.as_ref(), expected, "probe {probe:?}");
        }
        // and the batch's keys numbered: equal keys share an id, others do
        // not, NULLs have none
        let numbered = t.lookup(&keys).unwrap().keys;
        let distinct: std::collections::HashSet<&String> = probes.iter().flatten().collect();
        assert_eq!(numbered.distinct as usize, distinct.len());
        for (i, a) in probes.iter().enumerate() {
            let id = numbered.ids[i];
            assert_eq!(a.is_none(), id == crate::window::operator::NULL_KEY);
            assert!(a.is_none() || id < numbered.distinct);
            for (j, b) in probes.iter().enumerate() {
                if a.is_some() && b.is_some() {
                    assert_eq!(a == b, id == numbered.ids[j], "{a:?} {b:?}");
                }
            }
        }
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
        let at = t.lookup(&ints).unwrap().rows;
        assert!(at.is_valid(0) && at.is_null(1) && at.is_null(2));
        let text: ArrayRef = Arc::new(StringArray::from(vec!["42"]));
        assert!(t.lookup(&text).unwrap().rows.is_valid(0));
    }
}
