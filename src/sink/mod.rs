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
///
/// Written straight into each row's text, the same text `cell_to_json`
/// would give: building a `Value` per cell cost two allocations a cell, and
/// every updating-view row goes through here (BENCHMARKS.md, "View rows").
pub fn batch_to_json_text(batch: &RecordBatch) -> Vec<String> {
    let names = json_names(batch);
    let mut capacity = 2;
    (0..batch.num_rows())
        .map(|row| {
            let mut text = String::with_capacity(capacity);
            write_row(&mut text, &names, batch, row);
            capacity = capacity.max(text.len());
            text
        })
        .collect()
}

/// The column names of `batch` as JSON string literals, for `write_row`.
pub fn json_names(batch: &RecordBatch) -> Vec<String> {
    batch
        .schema()
        .fields()
        .iter()
        .map(|f| Value::String(f.name().clone()).to_string())
        .collect()
}

/// Appends row `row` of `batch` as a JSON object, keys (`json_names`) in column order.
pub fn write_row(out: &mut String, names: &[String], batch: &RecordBatch, row: usize) {
    out.push('{');
    for (c, (name, column)) in names.iter().zip(batch.columns()).enumerate() {
        if c > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push(':');
        write_cell(out, column.as_ref(), row);
    }
    out.push('}');
}

/// Appends one cell as JSON, exactly as `cell_to_json(..).to_string()` would.
fn write_cell(out: &mut String, array: &dyn Array, row: usize) {
    if array.is_null(row) {
        out.push_str("null");
        return;
    }
    match array.data_type() {
        DataType::Utf8 => write_json_str(out, array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => write_json_str(out, array.as_string::<i64>().value(row)),
        DataType::Utf8View => write_json_str(out, array.as_string_view().value(row)),
        DataType::Boolean => out.push_str(if array.as_boolean().value(row) {
            "true"
        } else {
            "false"
        }),
        DataType::Int64 => {
            out.push_str(itoa::Buffer::new().format(array.as_primitive::<Int64Type>().value(row)))
        }
        DataType::Int32 => {
            out.push_str(itoa::Buffer::new().format(array.as_primitive::<Int32Type>().value(row)))
        }
        DataType::UInt64 => {
            out.push_str(itoa::Buffer::new().format(array.as_primitive::<UInt64Type>().value(row)))
        }
        DataType::Float64 => write_f64(out, array.as_primitive::<Float64Type>().value(row)),
        DataType::Float32 => write_f64(
            out,
            f64::from(array.as_primitive::<Float32Type>().value(row)),
        ),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            let ms = array
                .as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>()
                .value(row);
            out.push('"');
            write_time(out, ms);
            out.push('"');
        }
        _ => out.push_str(&cell_to_json(array, row).to_string()),
    }
}

/// serde_json's float text (ryu), and `null` for what JSON cannot hold.
fn write_f64(out: &mut String, v: f64) {
    if v.is_finite() {
        out.push_str(ryu::Buffer::new().format_finite(v));
    } else {
        out.push_str("null");
    }
}

/// A JSON string literal, escaped as serde_json escapes it.
fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `format_time`'s text (`2026-11-22T10:00:05.000Z`), without chrono's
/// formatter for the years it can be written with four digits.
fn write_time(out: &mut String, ms: i64) {
    use chrono::{Datelike, Timelike};
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        out.push_str(&format_time(ms));
        return;
    };
    let year = t.year();
    if !(0..=9999).contains(&year) {
        out.push_str(&format_time(ms));
        return;
    }
    let digits = |out: &mut String, v: u32, width: usize| {
        let mut buffer = itoa::Buffer::new();
        let text = buffer.format(v);
        for _ in text.len()..width {
            out.push('0');
        }
        out.push_str(text);
    };
    digits(out, year as u32, 4);
    for (separator, value, width) in [
        ('-', t.month(), 2),
        ('-', t.day(), 2),
        ('T', t.hour(), 2),
        (':', t.minute(), 2),
        (':', t.second(), 2),
        ('.', t.timestamp_subsec_millis(), 3),
    ] {
        out.push(separator);
        digits(out, value, width);
    }
    out.push('Z');
}

/// Upserts a view's output rows. Returns the number of rows written.
/// With `outbox` (the view has sinks): the log record's seq and the next
/// outbox index of that record, advanced past these rows.
pub fn write_view_output(
    store: &Store,
    view: &str,
    output: &ViewOutput,
    outbox: Option<(u64, &mut u32)>,
) -> Result<usize, StoreError> {
    let rows = batch_to_json_text(&output.rows);
    let pairs = output
        .keys
        .iter()
        .cloned()
        .zip(rows)
        .map(|(key, row)| (key, row.into_bytes()));
    match outbox {
        Some((seq, index)) => {
            let n = store.write_rows_to_sinks(view, pairs, Some((seq, *index)))?;
            *index = index.wrapping_add(n as u32);
            Ok(n)
        }
        None => store.write_rows(view, pairs),
    }
}

/// Dead letters for single input rows (late for a window, or not
/// computable by a view), each with the row as its payload.
pub fn rejected_rows<'m>(
    stream: &str,
    reason: RejectReason,
    batch: &RecordBatch,
    event_time: &[i64],
    rows: &[u32],
    // (topic, received_at) of the message a row came from
    source: impl Fn(usize) -> (&'m str, i64),
    // why, from the row and its event time
    detail: impl Fn(u32, i64) -> String,
) -> Vec<Rejected> {
    // Only the late rows are formatted, not the whole batch they came in.
    let picked = take_record_batch(batch, &UInt32Array::from(rows.to_vec()));
    let texts = picked.map(|b| batch_to_json_text(&b)).unwrap_or_default();
    rows.iter()
        .enumerate()
        .map(|(i, &row)| {
            let r = row as usize;
            let (topic, received_at) = source(r);
            Rejected {
                stream: stream.to_string(),
                topic: topic.to_string(),
                reason,
                detail: detail(row, event_time.get(r).copied().unwrap_or(0)),
                payload: texts.get(i).cloned().unwrap_or_default(),
                received_at,
                rows: 1,
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, StringArray,
        TimestampMillisecondArray, UInt64Array,
    };
    use datafusion::arrow::datatypes::{Field, Schema};

    use super::*;

    /// The row as `cell_to_json` renders it: what rows looked like before
    /// the direct writer, and what the API promises.
    fn reference(batch: &RecordBatch, row: usize) -> String {
        let cells: Vec<String> = batch
            .schema()
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| {
                format!(
                    "{}:{}",
                    Value::String(f.name().clone()),
                    cell_to_json(c.as_ref(), row)
                )
            })
            .collect();
        format!("{{{}}}", cells.join(","))
    }

    #[test]
    fn rows_are_written_as_cell_to_json_renders_them() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("text \"quoted\"", DataType::Utf8, true),
            Field::new("flag", DataType::Boolean, true),
            Field::new("i64", DataType::Int64, true),
            Field::new("i32", DataType::Int32, true),
            Field::new("u64", DataType::UInt64, true),
            Field::new("f64", DataType::Float64, true),
            Field::new("f32", DataType::Float32, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                true,
            ),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![
                    Some("plain"),
                    Some("quote \" back \\ nl \n tab \t cr \r bell \u{7} del \u{7f} é ✓"),
                    None,
                    Some(""),
                ])),
                Arc::new(BooleanArray::from(vec![
                    Some(true),
                    Some(false),
                    None,
                    Some(true),
                ])),
                Arc::new(Int64Array::from(vec![
                    Some(0),
                    Some(i64::MIN),
                    None,
                    Some(i64::MAX),
                ])),
                Arc::new(Int32Array::from(vec![
                    Some(-7),
                    Some(i32::MAX),
                    None,
                    Some(0),
                ])),
                Arc::new(UInt64Array::from(vec![
                    Some(u64::MAX),
                    Some(1),
                    None,
                    Some(0),
                ])),
                Arc::new(Float64Array::from(vec![
                    Some(39.0),
                    Some(f64::NAN),
                    None,
                    Some(-1.25e-300),
                ])),
                Arc::new(Float32Array::from(vec![
                    Some(0.1),
                    Some(f32::INFINITY),
                    None,
                    Some(3.5),
                ])),
                Arc::new(
                    TimestampMillisecondArray::from(vec![
                        Some(1_764_000_005_123),
                        Some(0),
                        None,
                        Some(-62_198_755_200_000),
                    ])
                    .with_timezone("UTC"),
                ),
            ],
        )
        .expect("batch");
        let rows = batch_to_json_text(&batch);
        assert_eq!(rows.len(), 4);
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row, &reference(&batch, i), "row {i}");
            serde_json::from_str::<Value>(row).expect("valid JSON");
        }
        assert!(
            rows[0].contains("\"at\":\"2025-11-24T16:00:05.123Z\""),
            "{}",
            rows[0]
        );
    }
}
