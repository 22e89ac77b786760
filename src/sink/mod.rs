//! Sinks: what the pipeline writes out — view rows, dead letters and alerts
//! to the store, and alert notifications ([`notify`]: SSE, MQTT, webhooks).
//!
//! Rows are stored as JSON objects in the API's shape (times as RFC 3339 UTC
//! with milliseconds), so reading a row back is a copy, not a conversion.

use datafusion::arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int32Type, Int64Type, TimeUnit, UInt64Type,
};
use datafusion::arrow::util::display::array_value_to_string;
use serde_json::{Number, Value};

pub mod notify;

use std::collections::HashMap;

use crate::alert::record::{alert_id, apply_change};
use crate::alert::{Alert, AlertEvent, AlertId, Change, ChangeKind, Severity};
use crate::obs::format_time;
use crate::source::decode::{RejectReason, Rejected};
use crate::store::{Store, StoreError};
use crate::window::operator::ViewOutput;

/// One cell as a JSON value.
pub fn cell_to_json(array: &dyn Array, row: usize) -> Value {
    if array.is_null(row) {
        return Value::Null;
    }
    let float = |v: f64| Number::from_f64(v).map_or(Value::Null, Value::Number);
    match array.data_type() {
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(row).to_string()),
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Int64 => Value::from(array.as_primitive::<Int64Type>().value(row)),
        DataType::Int32 => Value::from(array.as_primitive::<Int32Type>().value(row)),
        DataType::UInt64 => Value::from(array.as_primitive::<UInt64Type>().value(row)),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(row)),
        DataType::Float32 => float(f64::from(array.as_primitive::<Float32Type>().value(row))),
        DataType::Timestamp(unit, _) => {
            let v = match unit {
                TimeUnit::Second => {
                    array
                        .as_primitive::<datafusion::arrow::datatypes::TimestampSecondType>()
                        .value(row)
                        * 1000
                }
                TimeUnit::Millisecond => array
                    .as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>()
                    .value(row),
                TimeUnit::Microsecond => {
                    array
                        .as_primitive::<datafusion::arrow::datatypes::TimestampMicrosecondType>()
                        .value(row)
                        / 1000
                }
                TimeUnit::Nanosecond => {
                    array
                        .as_primitive::<datafusion::arrow::datatypes::TimestampNanosecondType>()
                        .value(row)
                        / 1_000_000
                }
            };
            Value::String(format_time(v))
        }
        DataType::Int8
        | DataType::Int16
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => {
            match array_value_to_string(array, row)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(v) => Value::from(v),
                None => Value::Null,
            }
        }
        _ => array_value_to_string(array, row).map_or(Value::Null, Value::String),
    }
}

/// Each row of a batch as a JSON object text, keys in column order (a
/// `serde_json::Map` would sort them, and users read columns in the order
/// their SELECT lists them).
pub fn batch_to_json_text(batch: &RecordBatch) -> Vec<String> {
    let schema = batch.schema();
    let names: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| Value::String(f.name().clone()).to_string())
        .collect();
    (0..batch.num_rows())
        .map(|row| {
            let mut text = String::from("{");
            for (c, (name, column)) in names.iter().zip(batch.columns()).enumerate() {
                if c > 0 {
                    text.push(',');
                }
                text.push_str(name);
                text.push(':');
                text.push_str(&cell_to_json(column.as_ref(), row).to_string());
            }
            text.push('}');
            text
        })
        .collect()
}

/// Upserts a view's output rows. Returns the number of rows written.
pub fn write_view_output(
    store: &Store,
    view: &str,
    output: &ViewOutput,
) -> Result<usize, StoreError> {
    let rows = batch_to_json_text(&output.rows);
    let pairs = output
        .keys
        .iter()
        .cloned()
        .zip(rows)
        .map(|(key, row)| (key, row.into_bytes()));
    store.write_rows(view, pairs)
}

/// Dead letters for input rows that were late for windowed views.
pub fn late_rows<'m>(
    stream: &str,
    batch: &RecordBatch,
    event_time: &[i64],
    rows: &[u32],
    // (topic, received_at) of the message a row came from
    source: impl Fn(usize) -> (&'m str, i64),
    detail: impl Fn(i64) -> String,
) -> Vec<Rejected> {
    // Only the late rows are formatted, not the whole batch they came in.
    let picked = take_record_batch(batch, &UInt32Array::from(rows.to_vec()));
    let texts = picked.map(|b| batch_to_json_text(&b)).unwrap_or_default();
    rows.iter()
        .enumerate()
        .map(|(i, &r)| {
            let r = r as usize;
            let (topic, received_at) = source(r);
            Rejected {
                stream: stream.to_string(),
                topic: topic.to_string(),
                reason: RejectReason::Late,
                detail: detail(event_time.get(r).copied().unwrap_or(0)),
                payload: texts.get(i).cloned().unwrap_or_default(),
                received_at,
            }
        })
        .collect()
}

/// Stores a rule's changes and returns what to notify: nothing for a change
/// the store already shows (a replay after a crash), so a replay neither
/// duplicates an alert nor notifies it twice.
pub fn record_alert_changes(
    store: &Store,
    rule: &str,
    severity: Severity,
    changes: &[Change],
) -> Result<Vec<AlertEvent>, StoreError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    store.with_alert_lock(|store| {
        let mut events = Vec::new();
        // a change may follow another of the same alert within this call
        let mut written: HashMap<AlertId, Alert> = HashMap::new();
        for change in changes {
            let id = alert_id(rule, &change.key, change.opened_at);
            let stored = match written.get(&id) {
                Some(a) => Some(a.clone()),
                None => store.get_alert(&id)?,
            };
            if let Some(event) = apply_change(rule, severity, change, stored) {
                written.insert(id, event.alert.clone());
                events.push(event);
            }
        }
        store.put_alert_events(&events)?;
        Ok(events)
    })
}

/// Acknowledges an alert at wall time `now`. Returns the alert, and the
/// event to notify when it was not acknowledged before; `None` when there
/// is no such alert.
pub fn ack_alert(
    store: &Store,
    id: &AlertId,
    now: i64,
) -> Result<Option<(Alert, Option<AlertEvent>)>, StoreError> {
    store.with_alert_lock(|store| {
        let Some(mut alert) = store.get_alert(id)? else {
            return Ok(None);
        };
        if alert.acked {
            return Ok(Some((alert, None)));
        }
        alert.acked = true;
        alert.acked_at = Some(now);
        let event = AlertEvent {
            change: ChangeKind::Acked,
            at: now,
            alert: alert.clone(),
        };
        store.put_alert_events(std::slice::from_ref(&event))?;
        Ok(Some((alert, Some(event))))
    })
}
