//! `CREATE ALERT name WITH (...) AS SELECT ...` (DESIGN §5).
//!
//! The statement is parsed as a `CREATE VIEW` (the word `ALERT` is swapped
//! for `VIEW ` in place, so columns in error messages stay right) and its
//! `SELECT` is planned by DataFusion against the stream or view it reads.
//! Then it is cut differently from a view:
//!
//! ```text
//!   Projection                -> the row an alert reports (fired_by / cleared_by)
//!     Filter (WHERE)          -> the firing condition, over the input row
//!       TableScan
//! ```
//!
//! A rule sees every row of its source, so the `WHERE` is not a filter here:
//! it judges each row, together with `clear` (planned as an expression over
//! the same input columns), as firing, clearing or neither.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::PhysicalExpr;

use super::{clean_message, compile_steps, physical, unsupported_node, Step, Upstream};
use crate::alert::{Severity, Timing};

/// A planned alert rule, ready for `alert::RuleOperator`.
#[derive(Debug, Clone)]
pub struct AlertPlan {
    pub name: String,
    pub doc: String,
    pub sql: String,
    pub file: String,
    pub line: usize,
    pub severity: Severity,
    pub timing: Timing,
    pub upstream: Upstream,
    /// Schema of the rows the rule reads.
    pub input_schema: SchemaRef,
    /// The `WHERE` clause, over the input row; `None` fires on every row.
    pub condition: Option<Arc<dyn PhysicalExpr>>,
    /// The `clear` option, over the input row.
    pub clear: Option<Arc<dyn PhysicalExpr>>,
    pub clear_sql: Option<String>,
    /// The `WHERE` clause as written.
    pub condition_sql: Option<String>,
    /// The `SELECT` list: what an alert reports as the row that fired or cleared it.
    pub project: Vec<Step>,
    pub output_schema: SchemaRef,
    /// Per output column, the input columns it comes from.
    pub column_lineage: Vec<super::lineage::ColumnLineage>,
    /// Input columns the firing condition (`WHERE`) reads.
    pub condition_columns: std::collections::BTreeSet<String>,
    /// Input columns `clear` reads.
    pub clear_columns: std::collections::BTreeSet<String>,
    /// Output column -> the `--` comment above its item in the `SELECT` list.
    pub column_docs: std::collections::BTreeMap<String, String>,
    /// The column (of the output) that identifies an alert's subject.
    pub key_column: String,
    pub key_index: usize,
    /// DataFusion's logical plan, for `weir check`.
    pub logical_plan: String,
    /// A key idle this long is forgotten (an alert still open for it
    /// resolves); `None`: the global `limits.key_ttl`.
    pub key_ttl: Option<Duration>,
    /// Everything that decides the rule's state, its upstream view's
    /// definition included; a change discards it.
    pub fingerprint: u64,
    /// Fingerprint of the rule's own definition.
    pub definition: u64,
}

/// The `WITH` options of a `CREATE ALERT`, validated.
#[derive(Debug, Clone, Default)]
pub struct AlertOptions {
    pub severity: Severity,
    pub timing: Timing,
    pub clear: Option<String>,
    pub key: Option<String>,
    pub key_ttl: Option<Duration>,
}

pub const OPTIONS: &str = "severity, for, clear, absent_for, key, reopen_after, key_ttl";

/// Validates `(key, value)` pairs; every problem is reported, as the option
/// it is about and what is wrong.
pub fn parse_options(pairs: &[(String, String)]) -> Result<AlertOptions, Vec<(String, String)>> {
    let mut o = AlertOptions::default();
    let mut problems = Vec::new();
    let duration = |key: &str, value: &str, problems: &mut Vec<(String, String)>| -> Option<i64> {
        match crate::config::parse_duration(value) {
            Ok(d) if d > Duration::ZERO => Some(d.as_millis() as i64),
            Ok(_) => {
                problems.push((key.into(), format!("{key}: must be longer than zero")));
                None
            }
            Err(e) => {
                problems.push((key.into(), format!("{key}: {e}")));
                None
            }
        }
    };
    for (key, value) in pairs {
        match key.as_str() {
            "severity" => match value.parse() {
                Ok(s) => o.severity = s,
                Err(e) => problems.push((key.clone(), e)),
            },
            "for" => o.timing.for_ms = duration(key, value, &mut problems).unwrap_or(0),
            "absent_for" => o.timing.absent_for_ms = duration(key, value, &mut problems),
            "reopen_after" => o.timing.reopen_after_ms = duration(key, value, &mut problems),
            "clear" if value.trim().is_empty() => {
                problems.push((key.clone(), "clear: empty expression".into()))
            }
            "clear" => o.clear = Some(value.clone()),
            "key" => o.key = Some(value.to_ascii_lowercase()),
            "key_ttl" => {
                o.key_ttl =
                    duration(key, value, &mut problems).map(|ms| Duration::from_millis(ms as u64))
            }
            other => problems.push((
                key.clone(),
                format!("unknown option {other:?} (known: {OPTIONS})"),
            )),
        }
    }
    if o.timing.absent_for_ms.is_some() {
        if o.clear.is_some() {
            problems.push((
                "clear".into(),
                "clear has no meaning with absent_for: the alert resolves when the key reports again".into(),
            ));
        }
        if o.timing.for_ms > 0 {
            problems.push((
                "for".into(),
                "for has no meaning with absent_for: absent_for is the time".into(),
            ));
        }
    }
    if problems.is_empty() {
        Ok(o)
    } else {
        Err(problems)
    }
}

/// Cuts the planned `SELECT` of a rule into condition and projection, and
/// plans `clear` against the input columns.
pub fn compile(
    state: &SessionState,
    name: &str,
    text: &str,
    options: &AlertOptions,
    plan: &LogicalPlan,
    upstream: Upstream,
) -> Result<AlertPlan, String> {
    let mut above: Vec<&LogicalPlan> = Vec::new();
    let mut condition = None;
    let mut node = plan;
    let scan = loop {
        match node {
            LogicalPlan::Projection(x) => {
                above.push(node);
                node = &x.input;
            }
            LogicalPlan::SubqueryAlias(x) => node = &x.input,
            LogicalPlan::Filter(f) if condition.is_none() => {
                condition = Some(physical(state, &f.predicate, f.input.schema())?);
                node = &f.input;
            }
            LogicalPlan::TableScan(t) => break t,
            LogicalPlan::Aggregate(_) => {
                return Err("an alert judges rows one by one and has no GROUP BY: aggregate in a view and alert on the view's rows".into())
            }
            other => return Err(unsupported_node(other)),
        }
    };
    let input_df_schema = scan.projected_schema.clone();
    let input_schema: SchemaRef = Arc::new(input_df_schema.as_arrow().clone());
    above.reverse();
    let (tables, views) = (Default::default(), Default::default());
    let none = super::Relations {
        tables: &tables,
        views: &views,
        read: Default::default(),
    };
    let project = compile_steps(state, &above, &none)?;
    let output_schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());

    let mut clear_columns = std::collections::BTreeSet::new();
    let clear = match &options.clear {
        None => None,
        Some(sql) => {
            let expr = state
                .create_logical_expr(sql, &input_df_schema)
                .map_err(|e| format!("clear: {}", clean_message(&e)))?;
            clear_columns.extend(expr.column_refs().into_iter().map(|c| c.name.clone()));
            Some(physical(state, &expr, &input_df_schema).map_err(|e| format!("clear: {e}"))?)
        }
    };
    let traced = super::lineage::trace(plan)?;

    let (key_index, key_column) = match &options.key {
        None => (0, output_schema.field(0).name().clone()),
        Some(k) => match output_schema.index_of(k) {
            Ok(i) => (i, k.clone()),
            Err(_) => {
                let selected: Vec<&str> = output_schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect();
                return Err(format!(
                    "key: {k:?} is not a selected column (selected: {})",
                    selected.join(", ")
                ));
            }
        },
    };

    let logical_plan = plan.display_indent().to_string();
    // (key_ttl joins the fingerprint only when set, so rules without it keep theirs)
    let ttl = options
        .key_ttl
        .map(|d| format!("{d:?}"))
        .unwrap_or_default();
    let fingerprint = super::fingerprint(&[
        &super::without_comments(text),
        &logical_plan,
        &format!("{:?}{ttl}", options.timing),
        options.clear.as_deref().unwrap_or(""),
        &key_column,
    ]);
    Ok(AlertPlan {
        name: name.to_string(),
        doc: String::new(),
        sql: text.to_string(),
        file: String::new(),
        line: 0,
        severity: options.severity,
        timing: options.timing,
        upstream,
        input_schema,
        condition,
        clear,
        clear_sql: options.clear.clone(),
        condition_sql: None,
        project,
        output_schema,
        column_lineage: traced.columns,
        condition_columns: traced.row_filters,
        clear_columns,
        column_docs: Default::default(),
        key_column,
        key_index,
        logical_plan,
        key_ttl: options.key_ttl,
        fingerprint,
        definition: fingerprint,
    })
}

/// Replaces the word `ALERT` after `CREATE` with `VIEW ` (same length), so
/// the statement parses as a view and positions stay the same.
pub fn as_view_statement(text: &str) -> String {
    let upper = text.to_ascii_uppercase();
    match upper.find("ALERT") {
        Some(at) => format!("{}VIEW {}", &text[..at], &text[at + 5..]),
        None => text.to_string(),
    }
}
