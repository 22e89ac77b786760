//! Incremental aggregate state: one `AggState` per (group, aggregate).
//!
//! DataFusion evaluates each aggregate's argument and `FILTER` expression over
//! the whole batch; these states only fold the resulting arrays in, row by row,
//! and can be merged (session windows merge when a late-arriving event bridges
//! two sessions) and serialized (checkpoints).

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, BooleanBuilder, Float64Array, Float64Builder,
    Int64Array, Int64Builder, StringArray, StringBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::arrow::error::ArrowError;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::Millis;

/// The aggregates weir computes incrementally (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggKind {
    Count,
    CountDistinct,
    Sum,
    Min,
    Max,
    Avg,
    FirstValue,
    LastValue,
    /// `approx_percentile_cont(x, q)`, backed by HdrHistogram.
    ApproxPercentile,
}

impl AggKind {
    pub fn from_function_name(name: &str, distinct: bool) -> Option<AggKind> {
        Some(match (name.to_ascii_lowercase().as_str(), distinct) {
            ("count", false) => AggKind::Count,
            ("count", true) => AggKind::CountDistinct,
            ("sum", false) => AggKind::Sum,
            ("min", _) => AggKind::Min,
            ("max", _) => AggKind::Max,
            ("avg" | "mean", false) => AggKind::Avg,
            ("first_value", false) => AggKind::FirstValue,
            ("last_value", false) => AggKind::LastValue,
            ("approx_percentile_cont", false) => AggKind::ApproxPercentile,
            _ => return None,
        })
    }
}

/// One value of an aggregate's argument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    Null,
    Int(i64),
    Float(f64),
    Str(Box<str>),
    Bool(bool),
}

impl Scalar {
    fn is_null(&self) -> bool {
        matches!(self, Scalar::Null)
    }

    fn as_f64(&self) -> Option<f64> {
        match *self {
            Scalar::Int(v) => Some(v as f64),
            Scalar::Float(v) => Some(v),
            _ => None,
        }
    }

    /// Ordering for min/max; values of one argument always share a variant.
    fn less_than(&self, other: &Scalar) -> bool {
        match (self, other) {
            (Scalar::Int(a), Scalar::Int(b)) => a < b,
            (Scalar::Float(a), Scalar::Float(b)) => a.total_cmp(b).is_lt(),
            (Scalar::Str(a), Scalar::Str(b)) => a < b,
            (Scalar::Bool(a), Scalar::Bool(b)) => a < b,
            _ => false,
        }
    }
}

/// A value as `count(DISTINCT)` keeps it, 16 bytes inline: integers and
/// booleans as themselves, floats as their bits, text as its 128-bit XXH3.
/// Text is hashed as ClickHouse's `uniqExact` hashes strings (128-bit
/// SipHash): a set entry costs no allocation of its own — the merchants'
/// 5-minute hop windows held one boxed string per terminal per window —
/// and folding a row allocates nothing. Two texts of one group would have
/// to share all 128 bits to be counted once: at the exact bound of 10 000
/// values, a chance of about 10^-31.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "StoredDistinctKey", into = "StoredDistinctKey")]
pub struct DistinctKey(u128);

impl DistinctKey {
    /// Floats are tagged apart from integers: an argument's values share
    /// one type, but the two encodings never meet either way.
    const FLOAT: u128 = 1 << 64;

    fn int(v: i64) -> Self {
        DistinctKey(u128::from(v as u64))
    }

    fn float(v: f64) -> Self {
        DistinctKey(Self::FLOAT | u128::from(v.to_bits()))
    }

    fn text(s: &str) -> Self {
        DistinctKey(xxhash_rust::xxh3::xxh3_128(s.as_bytes()))
    }
}

/// `DistinctKey` in checkpoints. Variants 0-2 are how weir stored values
/// before it hashed text (checkpoints written then still restore, each value
/// becoming the key it is now); it writes only `Key`. One thing does not
/// carry over: a group already past the exact bound holds a sketch of the
/// old form's hashes, so until its window closes a value it had seen may
/// be counted once more.
#[derive(Serialize, Deserialize)]
enum StoredDistinctKey {
    Int(i64),
    Float(u64),
    Str(Box<str>),
    Key(u128),
}

impl From<StoredDistinctKey> for DistinctKey {
    fn from(stored: StoredDistinctKey) -> Self {
        match stored {
            StoredDistinctKey::Int(v) => DistinctKey::int(v),
            StoredDistinctKey::Float(bits) => DistinctKey::float(f64::from_bits(bits)),
            StoredDistinctKey::Str(s) => DistinctKey::text(&s),
            StoredDistinctKey::Key(k) => DistinctKey(k),
        }
    }
}

impl From<DistinctKey> for StoredDistinctKey {
    fn from(key: DistinctKey) -> Self {
        StoredDistinctKey::Key(key.0)
    }
}

/// An aggregate's argument for one batch, normalised to a few Arrow types so
/// that the per-row fold is a cheap match.
pub enum Arg {
    /// `count(*)`.
    None,
    Int(Int64Array),
    Float(Float64Array),
    Str(StringArray),
    Bool(BooleanArray),
}

impl Arg {
    /// Normalises an evaluated argument: integers, dates and timestamps become
    /// Int64 (in their own unit), floats and decimals Float64, text Utf8.
    pub fn from_array(array: &ArrayRef) -> Result<Arg, ArrowError> {
        let dt = array.data_type();
        Ok(match dt {
            DataType::Boolean => Arg::Bool(array.as_boolean().clone()),
            DataType::Float16
            | DataType::Float32
            | DataType::Float64
            | DataType::Decimal128(..) => Arg::Float(
                cast(array, &DataType::Float64)?
                    .as_primitive::<Float64Type>()
                    .clone(),
            ),
            DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Dictionary(..) => {
                Arg::Str(cast(array, &DataType::Utf8)?.as_string::<i32>().clone())
            }
            DataType::Null => Arg::None,
            _ => Arg::Int(
                cast(array, &DataType::Int64)?
                    .as_primitive::<Int64Type>()
                    .clone(),
            ),
        })
    }

    #[inline]
    pub fn get(&self, row: usize) -> Scalar {
        match self {
            Arg::None => Scalar::Int(1),
            Arg::Int(a) => {
                if a.is_null(row) {
                    Scalar::Null
                } else {
                    Scalar::Int(a.value(row))
                }
            }
            Arg::Float(a) => {
                if a.is_null(row) {
                    Scalar::Null
                } else {
                    Scalar::Float(a.value(row))
                }
            }
            Arg::Str(a) => {
                if a.is_null(row) {
                    Scalar::Null
                } else {
                    Scalar::Str(a.value(row).into())
                }
            }
            Arg::Bool(a) => {
                if a.is_null(row) {
                    Scalar::Null
                } else {
                    Scalar::Bool(a.value(row))
                }
            }
        }
    }

    /// Row `row` as `count(DISTINCT)` keeps it (`None` for NULL), without
    /// building a [`Scalar`].
    #[inline]
    fn distinct_key(&self, row: usize) -> Option<DistinctKey> {
        if self.is_null(row) {
            return None;
        }
        Some(match self {
            Arg::None => DistinctKey::int(1),
            Arg::Int(a) => DistinctKey::int(a.value(row)),
            Arg::Float(a) => DistinctKey::float(a.value(row)),
            Arg::Str(a) => DistinctKey::text(a.value(row)),
            Arg::Bool(a) => DistinctKey::int(i64::from(a.value(row))),
        })
    }

    #[inline]
    pub fn is_null(&self, row: usize) -> bool {
        match self {
            Arg::None => false,
            Arg::Int(a) => a.is_null(row),
            Arg::Float(a) => a.is_null(row),
            Arg::Str(a) => a.is_null(row),
            Arg::Bool(a) => a.is_null(row),
        }
    }

    #[inline]
    fn f64(&self, row: usize) -> Option<f64> {
        match self {
            Arg::Float(a) if !a.is_null(row) => Some(a.value(row)),
            Arg::Int(a) if !a.is_null(row) => Some(a.value(row) as f64),
            _ => None,
        }
    }
}

/// `count(DISTINCT)` is exact up to this many values per group, then a
/// HyperLogLog++ sketch of 4 096 registers (about 3 KB, standard error
/// 1.6 %): a group's state stays bounded however many values it sees.
pub const EXACT_DISTINCT_MAX: usize = 10_000;

/// The sketch a `count(DISTINCT)` becomes past [`EXACT_DISTINCT_MAX`]. Its
/// hash (WyHash, seed 0) is stable, so checkpoints and merges agree.
pub type DistinctSketch = cardinality_estimator::CardinalityEstimator<DistinctKey>;

fn sketch_of<'a>(keys: impl IntoIterator<Item = &'a DistinctKey>) -> Box<DistinctSketch> {
    let mut sketch = Box::new(DistinctSketch::new());
    for k in keys {
        sketch.insert(k);
    }
    sketch
}

/// State of one aggregate for one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AggState {
    Count(i64),
    // Every state stays small and allocation-free until it holds values: a
    // group holds one per aggregate, and new groups clone a template of them.
    // Boxed, like the percentile below: every state of every group is as
    // large as the largest variant, and a set (64 bytes) made each of the
    // shipped views' states 72 bytes instead of 40 (BENCHMARKS.md).
    CountDistinct(Box<HashSet<DistinctKey, ahash::RandomState>>),
    SumInt(Option<i64>),
    SumFloat(Option<f64>),
    Min(Scalar),
    Max(Scalar),
    Avg {
        sum: f64,
        count: i64,
    },
    /// Value at the smallest event time (ties: the first to arrive).
    First {
        ts: Millis,
        value: Scalar,
    },
    /// Value at the largest event time (ties: the last to arrive).
    Last {
        ts: Millis,
        value: Scalar,
    },
    Percentile(Box<Percentile>),
    /// `count(DISTINCT)` past its exact bound (last: checkpoint variant
    /// numbers of the others stay as they were).
    CountDistinctApprox(Box<DistinctSketch>),
}

impl AggState {
    /// A fresh state. `float_input` picks a float or integer sum.
    pub fn new(kind: AggKind, float_input: bool, percentile: f64) -> AggState {
        match kind {
            AggKind::Count => AggState::Count(0),
            AggKind::CountDistinct => AggState::CountDistinct(Box::default()),
            AggKind::Sum if float_input => AggState::SumFloat(None),
            AggKind::Sum => AggState::SumInt(None),
            AggKind::Min => AggState::Min(Scalar::Null),
            AggKind::Max => AggState::Max(Scalar::Null),
            AggKind::Avg => AggState::Avg { sum: 0.0, count: 0 },
            AggKind::FirstValue => AggState::First {
                ts: Millis::MAX,
                value: Scalar::Null,
            },
            AggKind::LastValue => AggState::Last {
                ts: Millis::MIN,
                value: Scalar::Null,
            },
            AggKind::ApproxPercentile => {
                AggState::Percentile(Box::new(Percentile::new(percentile)))
            }
        }
    }

    /// Folds row `row` of `arg` (event time `ts`) into the state. SQL
    /// semantics: NULL arguments are skipped, except by first/last_value.
    #[inline]
    pub fn update(&mut self, arg: &Arg, row: usize, ts: Millis) {
        match self {
            AggState::Count(n) => {
                if !arg.is_null(row) {
                    *n += 1;
                }
            }
            AggState::CountDistinct(set) => {
                if let Some(k) = arg.distinct_key(row) {
                    set.insert(k);
                    if set.len() > EXACT_DISTINCT_MAX {
                        *self = AggState::CountDistinctApprox(sketch_of(set.iter()));
                    }
                }
            }
            AggState::CountDistinctApprox(sketch) => {
                if let Some(k) = arg.distinct_key(row) {
                    sketch.insert(&k);
                }
            }
            AggState::SumInt(sum) => {
                if let Arg::Int(a) = arg {
                    if !a.is_null(row) {
                        *sum = Some(sum.unwrap_or(0).wrapping_add(a.value(row)));
                    }
                }
            }
            AggState::SumFloat(sum) => {
                if let Some(v) = arg.f64(row) {
                    *sum = Some(sum.unwrap_or(0.0) + v);
                }
            }
            AggState::Min(current) => {
                if arg.is_null(row) {
                    return;
                }
                let v = arg.get(row);
                if current.is_null() || v.less_than(current) {
                    *current = v;
                }
            }
            AggState::Max(current) => {
                if arg.is_null(row) {
                    return;
                }
                let v = arg.get(row);
                if current.is_null() || current.less_than(&v) {
                    *current = v;
                }
            }
            AggState::Avg { sum, count } => {
                if let Some(v) = arg.f64(row) {
                    *sum += v;
                    *count += 1;
                }
            }
            AggState::First { ts: first, value } => {
                if ts < *first {
                    *first = ts;
                    *value = arg.get(row);
                }
            }
            AggState::Last { ts: last, value } => {
                if ts >= *last {
                    *last = ts;
                    *value = arg.get(row);
                }
            }
            AggState::Percentile(p) => {
                if let Some(v) = arg.f64(row) {
                    p.record(v);
                }
            }
        }
    }

    /// Merges another state of the same aggregate into this one.
    pub fn merge(&mut self, other: AggState) {
        match (self, other) {
            (AggState::Count(a), AggState::Count(b)) => *a += b,
            (
                this @ AggState::CountDistinct(_),
                other @ (AggState::CountDistinct(_) | AggState::CountDistinctApprox(_)),
            ) => {
                let AggState::CountDistinct(a) = this else {
                    return;
                };
                match other {
                    AggState::CountDistinct(b) => {
                        a.extend(*b);
                        if a.len() > EXACT_DISTINCT_MAX {
                            *this = AggState::CountDistinctApprox(sketch_of(a.iter()));
                        }
                    }
                    AggState::CountDistinctApprox(mut b) => {
                        for k in a.iter() {
                            b.insert(k);
                        }
                        *this = AggState::CountDistinctApprox(b);
                    }
                    _ => {}
                }
            }
            (AggState::CountDistinctApprox(a), AggState::CountDistinct(b)) => {
                for k in b.iter() {
                    a.insert(k);
                }
            }
            (AggState::CountDistinctApprox(a), AggState::CountDistinctApprox(b)) => a.merge(&b),
            (AggState::SumInt(a), AggState::SumInt(Some(b))) => {
                *a = Some(a.unwrap_or(0).wrapping_add(b))
            }
            (AggState::SumFloat(a), AggState::SumFloat(Some(b))) => *a = Some(a.unwrap_or(0.0) + b),
            (AggState::Min(a), AggState::Min(b))
                if !b.is_null() && (a.is_null() || b.less_than(a)) =>
            {
                *a = b
            }
            (AggState::Max(a), AggState::Max(b))
                if !b.is_null() && (a.is_null() || a.less_than(&b)) =>
            {
                *a = b
            }
            (AggState::Avg { sum, count }, AggState::Avg { sum: s, count: c }) => {
                *sum += s;
                *count += c;
            }
            (AggState::First { ts, value }, AggState::First { ts: t, value: v }) if t < *ts => {
                *ts = t;
                *value = v;
            }
            (AggState::Last { ts, value }, AggState::Last { ts: t, value: v }) if t >= *ts => {
                *ts = t;
                *value = v;
            }
            (AggState::Percentile(a), AggState::Percentile(b)) => a.merge(*b),
            // nothing to take from `other` (empty, or not better), or mismatched
            // variants, which states of one aggregate never are
            _ => {}
        }
    }

    /// The aggregate's current value.
    pub fn evaluate(&self) -> Scalar {
        match self {
            AggState::Count(n) => Scalar::Int(*n),
            AggState::CountDistinct(set) => Scalar::Int(set.len() as i64),
            AggState::CountDistinctApprox(sketch) => Scalar::Int(sketch.estimate() as i64),
            AggState::SumInt(s) => s.map_or(Scalar::Null, Scalar::Int),
            AggState::SumFloat(s) => s.map_or(Scalar::Null, Scalar::Float),
            AggState::Min(v) | AggState::Max(v) => v.clone(),
            AggState::Avg { sum, count } => {
                if *count == 0 {
                    Scalar::Null
                } else {
                    Scalar::Float(sum / *count as f64)
                }
            }
            AggState::First { value, .. } | AggState::Last { value, .. } => value.clone(),
            AggState::Percentile(p) => p.value().map_or(Scalar::Null, Scalar::Float),
        }
    }
}

/// Builds an Arrow array of `data_type` from evaluated aggregate values.
pub fn scalars_to_array(values: &[Scalar], data_type: &DataType) -> Result<ArrayRef, ArrowError> {
    let array: ArrayRef = match data_type {
        DataType::Boolean => {
            let mut b = BooleanBuilder::with_capacity(values.len());
            for v in values {
                match v {
                    Scalar::Bool(x) => b.append_value(*x),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let mut b = StringBuilder::with_capacity(values.len(), values.len() * 8);
            for v in values {
                match v {
                    Scalar::Str(s) => b.append_value(s),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => {
            let mut b = Float64Builder::with_capacity(values.len());
            for v in values {
                b.append_option(v.as_f64());
            }
            Arc::new(b.finish())
        }
        _ => {
            let mut b = Int64Builder::with_capacity(values.len());
            for v in values {
                match v {
                    Scalar::Int(x) => b.append_value(*x),
                    Scalar::Float(x) => b.append_value(*x as i64),
                    Scalar::Bool(x) => b.append_value(i64::from(*x)),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
    };
    if array.data_type() == data_type {
        Ok(array)
    } else {
        cast(&array, data_type)
    }
}

/// Values kept exactly up to this many; beyond, an HdrHistogram takes over.
const EXACT_LIMIT: usize = 128;
/// Histogram resolution: values are recorded in thousandths.
const SCALE: f64 = 1000.0;

/// `approx_percentile_cont` state. Small groups (a terminal's samples in one
/// minute) keep their values and answer exactly; larger ones switch to an
/// HdrHistogram with 2 significant digits (1 %), whose memory stays bounded
/// however many values arrive. Negative values go to a second histogram of
/// magnitudes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Percentile {
    q: f64,
    exact: Vec<f64>,
    /// Positive values and negative magnitudes, once there are too many to keep.
    histograms: Option<Box<Histograms>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Histograms {
    #[serde(with = "histogram_serde")]
    positive: Histogram<u64>,
    /// Only series with negative values (signal strength in dBm) pay for this one.
    #[serde(with = "histogram_serde::optional")]
    negative: Option<Histogram<u64>>,
}

impl PartialEq for Percentile {
    fn eq(&self, other: &Self) -> bool {
        let shape = |p: &Percentile| {
            p.histograms
                .as_ref()
                .map(|h| (h.positive.len(), h.positive.max(), h.negative_len()))
        };
        self.q == other.q && self.exact == other.exact && shape(self) == shape(other)
    }
}

impl Percentile {
    pub fn new(q: f64) -> Self {
        Self {
            q: q.clamp(0.0, 1.0),
            exact: Vec::new(),
            histograms: None,
        }
    }

    pub fn record(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        match &mut self.histograms {
            Some(h) => h.record(v),
            None => {
                self.exact.push(v);
                if self.exact.len() > EXACT_LIMIT {
                    let mut h = Box::new(Histograms {
                        positive: new_histogram(),
                        negative: None,
                    });
                    for v in std::mem::take(&mut self.exact) {
                        h.record(v);
                    }
                    self.histograms = Some(h);
                }
            }
        }
    }

    pub fn merge(&mut self, other: Percentile) {
        match (&mut self.histograms, other.histograms) {
            (_, None) => {
                for v in other.exact {
                    self.record(v);
                }
            }
            (None, Some(mut theirs)) => {
                for v in std::mem::take(&mut self.exact) {
                    theirs.record(v);
                }
                self.histograms = Some(theirs);
            }
            (Some(mine), Some(theirs)) => {
                let _ = mine.positive.add(&theirs.positive);
                if let Some(theirs) = &theirs.negative {
                    let _ = mine.negative.get_or_insert_with(new_histogram).add(theirs);
                }
            }
        }
    }

    /// Continuous percentile (linear interpolation) over the exact values,
    /// or the histograms' value at the quantile.
    pub fn value(&self) -> Option<f64> {
        let Some(h) = &self.histograms else {
            if self.exact.is_empty() {
                return None;
            }
            let mut sorted = self.exact.clone();
            sorted.sort_by(f64::total_cmp);
            let rank = self.q * (sorted.len() - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            let frac = rank - lo as f64;
            return Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac);
        };
        let total = h.positive.len() + h.negative_len();
        if total == 0 {
            return None;
        }
        let rank = self.q * total as f64;
        let neg = h.negative_len() as f64;
        if let Some(negative) = h.negative.as_ref().filter(|_| rank < neg) {
            // the most negative values are the largest magnitudes
            let q = 1.0 - rank / neg;
            Some(-(negative.value_at_quantile(q) as f64) / SCALE)
        } else {
            let q = if h.positive.is_empty() {
                0.0
            } else {
                (rank - neg) / h.positive.len() as f64
            };
            Some(h.positive.value_at_quantile(q.min(1.0)) as f64 / SCALE)
        }
    }
}

impl Histograms {
    fn negative_len(&self) -> u64 {
        self.negative.as_ref().map_or(0, |h| h.len())
    }

    fn record(&mut self, v: f64) {
        let scaled = (v.abs() * SCALE).round().min(u64::MAX as f64 / 4.0) as u64;
        let h = if v < 0.0 {
            self.negative.get_or_insert_with(new_histogram)
        } else {
            &mut self.positive
        };
        // `record` grows the auto-resizing histogram; clamp only if it cannot grow
        if h.record(scaled).is_err() {
            h.saturating_record(scaled);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 2 significant digits, auto-resizing: 1 % relative error at any magnitude
    // in about 10 KiB. 3 digits cost about 80 KiB per histogram, which 10 000
    // busy terminal-minutes turned into 1.6 GB (BENCHMARKS.md).
    match Histogram::new(2) {
        Ok(h) => h,
        // new() only fails for more than 5 significant digits
        Err(_) => unreachable!("2 significant digits is a valid histogram precision"),
    }
}

mod histogram_serde {
    use super::*;
    use serde::{Deserializer, Serializer};

    /// Histograms travel as their recorded (value, count) pairs.
    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(u64, u64)> = h
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        pairs.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let pairs: Vec<(u64, u64)> = Vec::deserialize(d)?;
        let mut h = new_histogram();
        for (value, count) in pairs {
            let _ = h.record_n(value, count);
        }
        Ok(h)
    }

    pub mod optional {
        use super::*;

        pub fn serialize<S: Serializer>(
            h: &Option<Histogram<u64>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match h {
                Some(h) => s.serialize_some(&Wrapper(h)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Histogram<u64>>, D::Error> {
            let pairs: Option<Vec<(u64, u64)>> = Option::deserialize(d)?;
            Ok(pairs.map(|pairs| {
                let mut h = new_histogram();
                for (value, count) in pairs {
                    let _ = h.record_n(value, count);
                }
                h
            }))
        }

        struct Wrapper<'a>(&'a Histogram<u64>);

        impl Serialize for Wrapper<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                super::serialize(self.0, s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every group holds one state per aggregate: at 100 000 terminals and
    /// the shipped views, 8 bytes more per state is some 15 MB more state.
    #[test]
    fn a_state_is_no_larger_than_its_largest_inline_variant() {
        assert!(std::mem::size_of::<Scalar>() <= 24);
        assert!(std::mem::size_of::<AggState>() <= 40);
    }

    fn floats(values: &[Option<f64>]) -> Arg {
        Arg::Float(Float64Array::from(values.to_vec()))
    }

    fn distinct_of(values: std::ops::Range<i64>) -> AggState {
        let arg = Arg::Int(Int64Array::from_iter_values(values.clone()));
        let mut s = AggState::new(AggKind::CountDistinct, false, 0.5);
        for i in 0..values.count() {
            s.update(&arg, i, 0);
        }
        s
    }

    fn count(s: &AggState) -> i64 {
        match s.evaluate() {
            Scalar::Int(n) => n,
            other => panic!("not a count: {other:?}"),
        }
    }

    #[test]
    fn count_distinct_is_exact_to_its_bound_then_a_bounded_sketch() {
        let exact = distinct_of(0..EXACT_DISTINCT_MAX as i64);
        assert!(matches!(exact, AggState::CountDistinct(_)));
        assert_eq!(count(&exact), EXACT_DISTINCT_MAX as i64);
        let big = distinct_of(0..200_000);
        assert!(matches!(big, AggState::CountDistinctApprox(_)));
        let n = count(&big);
        assert!((n - 200_000).abs() < 10_000, "within 5 %: {n}");
        // its checkpoint is small and round-trips
        let bytes = postcard::to_stdvec(&big).expect("serialize");
        assert!(bytes.len() < 8_192, "{} bytes", bytes.len());
        let back: AggState = postcard::from_bytes(&bytes).expect("deserialize");
        assert_eq!(count(&back), n);
    }

    #[test]
    fn count_distinct_merges_across_the_bound() {
        // two exact halves that overlap, and an exact one into a sketch
        let m = EXACT_DISTINCT_MAX as i64;
        let mut a = distinct_of(0..m * 8 / 10);
        a.merge(distinct_of(m * 4 / 10..m));
        assert_eq!(count(&a), m, "still exact");
        let mut b = distinct_of(0..m * 9 / 10);
        b.merge(distinct_of(m / 2..m * 3 / 2));
        assert!(matches!(b, AggState::CountDistinctApprox(_)));
        assert!((count(&b) - m * 3 / 2).abs() < m * 3 / 40, "{}", count(&b));
        let mut c = distinct_of(0..5 * m);
        c.merge(distinct_of(4 * m..6 * m));
        assert!((count(&c) - 6 * m).abs() < 6 * m / 20, "{}", count(&c));
        let mut d = distinct_of(0..10);
        d.merge(distinct_of(0..5 * m));
        assert!((count(&d) - 5 * m).abs() < 5 * m / 20, "{}", count(&d));
    }

    fn fold(kind: AggKind, arg: &Arg, rows: usize, float: bool) -> Scalar {
        let mut s = AggState::new(kind, float, 0.5);
        for i in 0..rows {
            s.update(arg, i, i as Millis);
        }
        s.evaluate()
    }

    #[test]
    fn sql_semantics_skip_nulls() {
        let arg = floats(&[Some(3.0), None, Some(1.0), Some(2.0)]);
        assert_eq!(fold(AggKind::Count, &arg, 4, true), Scalar::Int(3));
        assert_eq!(fold(AggKind::Sum, &arg, 4, true), Scalar::Float(6.0));
        assert_eq!(fold(AggKind::Min, &arg, 4, true), Scalar::Float(1.0));
        assert_eq!(fold(AggKind::Max, &arg, 4, true), Scalar::Float(3.0));
        assert_eq!(fold(AggKind::Avg, &arg, 4, true), Scalar::Float(2.0));
        assert_eq!(fold(AggKind::FirstValue, &arg, 4, true), Scalar::Float(3.0));
        assert_eq!(fold(AggKind::LastValue, &arg, 4, true), Scalar::Float(2.0));
        assert_eq!(
            fold(AggKind::ApproxPercentile, &arg, 4, true),
            Scalar::Float(2.0)
        );
        let empty = floats(&[None]);
        assert_eq!(fold(AggKind::Sum, &empty, 1, true), Scalar::Null);
        assert_eq!(fold(AggKind::Avg, &empty, 1, true), Scalar::Null);
        assert_eq!(fold(AggKind::Count, &Arg::None, 3, false), Scalar::Int(3));
    }

    #[test]
    fn count_distinct_and_strings() {
        let arg = Arg::Str(StringArray::from(vec![
            Some("b"),
            Some("a"),
            Some("b"),
            None,
        ]));
        assert_eq!(fold(AggKind::CountDistinct, &arg, 4, false), Scalar::Int(2));
        assert_eq!(fold(AggKind::Min, &arg, 4, false), Scalar::Str("a".into()));
        assert_eq!(fold(AggKind::Max, &arg, 4, false), Scalar::Str("b".into()));
    }

    /// A `count(DISTINCT)` of text checkpointed before weir hashed text (its
    /// values stored as strings) restores to the same set: the texts it
    /// already holds are not counted again.
    #[test]
    fn count_distinct_of_text_restores_from_a_checkpoint_that_stored_the_strings() {
        #[derive(Serialize)]
        enum Before {
            #[allow(dead_code)]
            Int(i64),
            #[allow(dead_code)]
            Float(u64),
            Str(Box<str>),
        }
        #[derive(Serialize)]
        enum BeforeState {
            #[allow(dead_code)]
            Count(i64),
            // (a Box, as the state has, encodes as what it holds)
            CountDistinct(Vec<Before>),
        }
        let stored = BeforeState::CountDistinct(vec![
            Before::Str("T00001".into()),
            Before::Str("T00002".into()),
        ]);
        let bytes = postcard::to_stdvec(&stored).expect("serialize");
        let mut state: AggState = postcard::from_bytes(&bytes).expect("an old checkpoint restores");
        let arg = Arg::Str(StringArray::from(vec!["T00002", "T00003", "T00001"]));
        for row in 0..3 {
            state.update(&arg, row, 0);
        }
        assert_eq!(count(&state), 3);
        // and what is written now restores as it was
        let again: AggState =
            postcard::from_bytes(&postcard::to_stdvec(&state).expect("serialize"))
                .expect("restore");
        assert_eq!(again, state);
        // integers and floats keep their values apart from each other
        let ints = Arg::Int(Int64Array::from(vec![1, 1, 2]));
        let float_ones = Arg::Float(Float64Array::from(vec![1.0, 1.0]));
        assert_eq!(
            fold(AggKind::CountDistinct, &ints, 3, false),
            Scalar::Int(2)
        );
        assert_eq!(
            fold(AggKind::CountDistinct, &float_ones, 2, true),
            Scalar::Int(1)
        );
    }

    #[test]
    fn first_and_last_follow_event_time_not_arrival() {
        let arg = floats(&[Some(10.0), Some(20.0), Some(30.0)]);
        let mut first = AggState::new(AggKind::FirstValue, true, 0.0);
        let mut last = AggState::new(AggKind::LastValue, true, 0.0);
        for (row, ts) in [(0, 500), (1, 100), (2, 300)] {
            first.update(&arg, row, ts);
            last.update(&arg, row, ts);
        }
        assert_eq!(first.evaluate(), Scalar::Float(20.0));
        assert_eq!(last.evaluate(), Scalar::Float(10.0));
    }

    #[test]
    fn merge_equals_folding_everything() {
        let arg = floats(&(0..300).map(|i| Some(i as f64)).collect::<Vec<_>>());
        for kind in [
            AggKind::Count,
            AggKind::Sum,
            AggKind::Min,
            AggKind::Max,
            AggKind::Avg,
            AggKind::FirstValue,
            AggKind::LastValue,
        ] {
            let mut a = AggState::new(kind, true, 0.9);
            let mut b = AggState::new(kind, true, 0.9);
            let mut all = AggState::new(kind, true, 0.9);
            for i in 0..300 {
                all.update(&arg, i, i as Millis);
                if i % 3 == 0 {
                    a.update(&arg, i, i as Millis)
                } else {
                    b.update(&arg, i, i as Millis)
                }
            }
            a.merge(b);
            assert_eq!(a.evaluate(), all.evaluate(), "{kind:?}");
        }
    }

    #[test]
    fn percentile_switches_to_histogram_within_its_precision() {
        let mut p = Percentile::new(0.99);
        for i in 1..=10_000 {
            p.record(i as f64);
        }
        let v = p.value().unwrap();
        assert!((v - 9_900.0).abs() / 9_900.0 < 0.01, "{v}");
        let mut n = Percentile::new(0.5);
        for i in -500..500 {
            n.record(i as f64);
        }
        let v = n.value().unwrap();
        assert!(v.abs() <= 1.0, "{v}");
        let back: Percentile = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
        assert_eq!(
            back.value(),
            n.value(),
            "negative histogram survives a checkpoint"
        );
        // round-trips through serialization (checkpoints)
        let json = serde_json::to_string(&p).unwrap();
        let back: Percentile = serde_json::from_str(&json).unwrap();
        assert_eq!(back.value(), p.value());
    }
}
