//! Pipelines: `.sql` files -> stream definitions and view plans.
//!
//! Each view's `SELECT` is planned by DataFusion against the schemas of the
//! streams and views it reads. `tumble`, `hop` and `session` are registered as
//! planning-only UDFs so DataFusion accepts them in `GROUP BY`. The resulting
//! (unoptimized) logical plan is then cut into three parts that the `window`
//! operators run:
//!
//! ```text
//!   Projection / Filter (HAVING)      -> post-aggregate steps (DataFusion PhysicalExprs)
//!     Aggregate: keys, window, aggs   -> incremental aggregation (window::operator)
//!       Filter (WHERE) / Projection   -> pre-aggregate steps (DataFusion PhysicalExprs)
//!         TableScan: stream or view
//! ```
//!
//! A view without `GROUP BY` has only steps (a filter/projection view). Every
//! scalar expression is evaluated by DataFusion over Arrow batches.

pub mod alert;
pub mod changes;
pub mod ddl;
pub mod lineage;
pub mod sink;
pub mod split;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::empty::EmptyTable;
use datafusion::catalog::TableProvider;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SessionConfig, SessionContext, SessionState};
use datafusion::logical_expr::{
    create_udf, ColumnarValue, Expr, ExprSchemable, LogicalPlan, ScalarUDF, Volatility,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{CreateTableOptions, Statement as SqlStatement};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use serde::Serialize;

pub use alert::AlertPlan;
pub use ddl::{timestamp_type, EventTime, PayloadFormat, StreamDef, TableDef, TableMode};

use crate::window::agg::AggKind;
use crate::window::WindowSpec;

/// A problem in a pipeline file, with the place it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct PlanError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// The three shapes a view can take (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewShape {
    /// `GROUP BY keys, tumble|hop|session(...)`: one row per key and window, written when the window closes.
    Windowed,
    /// `GROUP BY keys` without a window: one row per key, updated in place.
    Updating,
    /// No `GROUP BY`: matching rows are appended.
    Filter,
}

/// One step of a filter/projection chain, compiled from the logical plan.
#[derive(Debug, Clone)]
pub enum Step {
    Filter(Arc<dyn PhysicalExpr>),
    Project {
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
    },
    /// A lookup join with a reference table (DESIGN §2).
    Lookup(Arc<Lookup>),
}

/// A lookup join of the rows with a reference table, on the table's primary key.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub table: String,
    /// The join column of the rows (the stream's side of `ON`).
    pub key: Arc<dyn PhysicalExpr>,
    /// `JOIN`: rows without a match are dropped; `LEFT JOIN`: kept, with NULLs.
    pub inner: bool,
    /// The rows after the join: theirs, then the table's columns.
    pub schema: SchemaRef,
    /// The table's current rows; for a windowed join, the other view's
    /// rows of the windows closing now (the pipeline sets them).
    pub rows: crate::table::TableHandle,
    /// A windowed join: the other view, and its side of the key
    /// (keys and `window_start`, as one text) over its rows.
    pub window_join: Option<(String, Arc<dyn PhysicalExpr>)>,
    /// Per column of the other side: whether anything after the join
    /// reads it (the others are NULL columns, not copied).
    pub used: Vec<bool>,
}

/// What a view can join with, by name.
pub struct Relations<'a> {
    pub tables: &'a HashMap<String, Arc<TableDef>>,
    pub views: &'a HashMap<String, Arc<ViewPlan>>,
    /// Every column any expression of the plan reads.
    pub read: HashSet<datafusion::common::Column>,
}

/// The other side of a join.
enum JoinWith {
    Table(Arc<TableDef>),
    /// A windowed view of the same window and root stream; its composite key.
    Window(Arc<ViewPlan>, Expr),
}

/// One aggregate of a view.
#[derive(Debug, Clone)]
pub struct AggregateSpec {
    pub kind: AggKind,
    /// `None` for `count(*)`.
    pub arg: Option<Arc<dyn PhysicalExpr>>,
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    pub percentile: f64,
    pub float_input: bool,
    /// `IGNORE NULLS`: rows whose argument is NULL are skipped (first_value/last_value).
    pub ignore_nulls: bool,
    pub output_type: DataType,
}

#[derive(Debug, Clone)]
pub struct AggregatePlan {
    /// Group-by expressions other than the window, in `GROUP BY` order.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    pub key_fields: Vec<Field>,
    pub window: Option<WindowSpec>,
    /// Position of the window among the group expressions of `schema`.
    pub window_position: usize,
    pub aggs: Vec<AggregateSpec>,
    /// DataFusion's output schema of the Aggregate node: group columns, then aggregates.
    pub schema: SchemaRef,
}

/// What a view reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Upstream {
    Stream(String),
    View(String),
}

impl Upstream {
    pub fn name(&self) -> &str {
        match self {
            Upstream::Stream(n) | Upstream::View(n) => n,
        }
    }
}

/// A planned view, ready to be run by `window::operator::ViewOperator`.
#[derive(Debug, Clone)]
pub struct ViewPlan {
    pub name: String,
    pub doc: String,
    pub sql: String,
    pub file: String,
    pub line: usize,
    pub shape: ViewShape,
    pub retention: Option<Duration>,
    /// Updating views: a key idle this long (in event time) leaves memory;
    /// `None`: the global `limits.key_ttl`.
    pub key_ttl: Option<Duration>,
    pub upstream: Upstream,
    /// Schema of the rows the view reads.
    pub input_schema: SchemaRef,
    pub pre: Vec<Step>,
    pub aggregate: Option<AggregatePlan>,
    pub post: Vec<Step>,
    /// Schema of the rows the view writes: `window_start`, `window_end` first for windowed views.
    pub output_schema: SchemaRef,
    /// Output columns that are group keys, in `GROUP BY` order.
    pub key_columns: Vec<String>,
    /// Per output column, the upstream columns it comes from (window
    /// bounds: none here; they come from the root stream's event time).
    pub column_lineage: Vec<lineage::ColumnLineage>,
    /// Upstream columns read by `WHERE` or `HAVING`.
    pub row_filters: std::collections::BTreeSet<String>,
    /// Reference tables joined (lookup joins), in plan order.
    pub lookups: Vec<String>,
    /// Columns a join matches on (`column` upstream, `table:<name>.<column>`).
    pub join_keys: std::collections::BTreeSet<String>,
    /// Output column -> the `--` comment above its item in the `SELECT` list.
    pub column_docs: std::collections::BTreeMap<String, String>,
    /// DataFusion's logical plan, for `weir check` and the API.
    pub logical_plan: String,
    /// Fingerprint of everything that decides the view's rows, its
    /// upstream views' definitions included: a change means its rows are stale.
    pub fingerprint: u64,
    /// Fingerprint of this view's own definition: it differs from the last
    /// run's when this view was edited, not only something upstream.
    pub definition: u64,
}

impl ViewPlan {
    pub fn window(&self) -> Option<WindowSpec> {
        self.aggregate.as_ref().and_then(|a| a.window)
    }
}

/// Every stream, view and alert rule of a pipelines folder. Views are in
/// dependency order.
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    pub streams: Vec<Arc<StreamDef>>,
    /// Reference tables from Postgres.
    pub tables: Vec<Arc<TableDef>>,
    /// Where views' rows are delivered (Postgres).
    pub sinks: Vec<Arc<sink::SinkDef>>,
    pub views: Vec<Arc<ViewPlan>>,
    pub alerts: Vec<Arc<AlertPlan>>,
}

impl Pipeline {
    pub fn stream(&self, name: &str) -> Option<&Arc<StreamDef>> {
        self.streams.iter().find(|s| s.name == name)
    }

    pub fn view(&self, name: &str) -> Option<&Arc<ViewPlan>> {
        self.views.iter().find(|v| v.name == name)
    }

    pub fn table(&self, name: &str) -> Option<&Arc<TableDef>> {
        self.tables.iter().find(|t| t.name == name)
    }

    pub fn alert(&self, name: &str) -> Option<&Arc<AlertPlan>> {
        self.alerts.iter().find(|a| a.name == name)
    }

    /// The stream a view reads from, through any views in between.
    pub fn root_stream<'p>(&'p self, view: &'p ViewPlan) -> Option<&'p StreamDef> {
        let mut upstream = &view.upstream;
        for _ in 0..=self.views.len() {
            match upstream {
                Upstream::Stream(s) => return self.stream(s).map(|s| s.as_ref()),
                Upstream::View(v) => upstream = &self.view(v)?.upstream,
            }
        }
        None
    }
}

pub const WINDOW_FUNCTIONS: [&str; 3] = ["tumble", "hop", "session"];

/// Reads every `*.sql` file of `dir` (sorted by name) and plans it.
pub fn plan_dir(dir: &Path) -> Result<Pipeline, Vec<PlanError>> {
    plan_dir_sharing(dir, &[])
}

/// [`plan_dir`], sharing reference tables' rows as [`plan_sources_sharing`].
pub fn plan_dir_sharing(dir: &Path, running: &[Arc<TableDef>]) -> Result<Pipeline, Vec<PlanError>> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| {
        vec![PlanError {
            file: dir.display().to_string(),
            line: 0,
            message: format!("cannot read pipelines folder: {e}"),
        }]
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    paths.sort();
    let mut errors = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push((path.display().to_string(), text)),
            Err(e) => errors.push(PlanError {
                file: path.display().to_string(),
                line: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    match plan_sources_sharing(&files, running) {
        Ok(p) if errors.is_empty() => Ok(p),
        Ok(_) => Err(errors),
        Err(mut e) => {
            errors.append(&mut e);
            Err(errors)
        }
    }
}

/// A statement that still has to be planned.
struct PendingView {
    /// "view" or "alert", for messages.
    what: &'static str,
    name: String,
    file: String,
    line: usize,
    doc: String,
    text: String,
    query: Box<datafusion::sql::sqlparser::ast::Query>,
    retention: Option<Duration>,
    key_ttl: Option<Duration>,
    references: Vec<String>,
    column_docs: std::collections::BTreeMap<String, String>,
}

/// Plans pipeline sources given as (file name, text). Collects every error.
pub fn plan_sources(files: &[(String, String)]) -> Result<Pipeline, Vec<PlanError>> {
    plan_sources_sharing(files, &[])
}

/// Plans like [`plan_sources`]; a reference table declared as one of
/// `running` is (same name, columns and key) shares its rows with it, so a
/// reload or a preview meets the rows the pipeline holds.
pub fn plan_sources_sharing(
    files: &[(String, String)],
    running: &[Arc<TableDef>],
) -> Result<Pipeline, Vec<PlanError>> {
    let mut errors = Vec::new();
    let mut streams: Vec<Arc<StreamDef>> = Vec::new();
    let mut tables: Vec<Arc<TableDef>> = Vec::new();
    let mut sinks: Vec<sink::SinkDef> = Vec::new();
    let mut pending: Vec<PendingView> = Vec::new();
    let mut pending_alerts: Vec<(PendingView, alert::AlertOptions)> = Vec::new();
    let mut names: HashMap<String, (String, usize)> = HashMap::new();
    let ctx = planning_context();

    for (file, text) in files {
        for stmt in split::split_statements(text) {
            let err = |line: usize, message: String| PlanError {
                file: file.clone(),
                line,
                message,
            };
            if let Err(message) = within_bounds(&stmt.text) {
                errors.push(err(stmt.line, message));
                continue;
            }
            let words: Vec<String> = stmt
                .text
                .split_whitespace()
                .take(3)
                .map(|w| w.to_ascii_uppercase())
                .collect();
            let kind = match words.as_slice() {
                [c, t, ..] if c == "CREATE" && t == "TABLE" => "table",
                [c, v, ..] if c == "CREATE" && v == "VIEW" => "view",
                [c, o, r, ..] if c == "CREATE" && o == "OR" && r == "REPLACE" => "view",
                [c, a, ..] if c == "CREATE" && a == "ALERT" => "alert",
                [c, s, ..] if c == "CREATE" && s == "SINK" => {
                    match sink::parse(&stmt.text) {
                        Ok(mut sink) => {
                            if let Some((f, l)) = names.get(&sink.name) {
                                errors.push(err(
                                    stmt.line,
                                    format!("{} is already defined at {f}:{l}", sink.name),
                                ));
                                continue;
                            }
                            names.insert(sink.name.clone(), (file.clone(), stmt.line));
                            sink.doc = stmt.doc.clone();
                            sink.file = file.clone();
                            sink.line = stmt.line;
                            sinks.push(sink);
                        }
                        Err(problems) => {
                            errors.extend(problems.into_iter().map(|p| err(stmt.line, p)))
                        }
                    }
                    continue;
                }
                _ => {
                    let start: Vec<&str> = stmt.text.split_whitespace().take(3).collect();
                    errors.push(err(
                        stmt.line,
                        format!(
                            "unsupported statement {:?}: a pipeline file holds CREATE TABLE, CREATE VIEW, CREATE ALERT and CREATE SINK statements",
                            start.join(" ")
                        ),
                    ));
                    continue;
                }
            };
            let (sql_text, watermark) = match kind {
                "table" => ddl::extract_watermark(&stmt.text),
                "alert" => (alert::as_view_statement(&stmt.text), None),
                _ => (stmt.text.clone(), None),
            };
            let parsed = match DFParser::parse_sql_with_dialect(&sql_text, &GenericDialect {}) {
                Ok(mut statements) if statements.len() == 1 => statements.pop_front(),
                Ok(_) => None,
                Err(e) => {
                    let (line, message) = locate_parser_error(&e.to_string());
                    errors.push(err(stmt.line + line.saturating_sub(1), message));
                    continue;
                }
            };
            let Some(DFStatement::Statement(parsed)) = parsed else {
                errors.push(err(stmt.line, "unsupported statement".into()));
                continue;
            };
            match *parsed {
                SqlStatement::CreateTable(ct) => {
                    let watermark = match watermark.as_deref().map(ddl::parse_watermark) {
                        Some(Ok(w)) => Some(w),
                        Some(Err(e)) => {
                            errors.push(err(stmt.line, e));
                            continue;
                        }
                        None => None,
                    };
                    let parts = ddl::stream_from_create_table(&ct, watermark);
                    let is_table =
                        matches!(&parts, Ok(p) if p.connector().as_deref() == Some("postgres"));
                    {
                        if is_table {
                            let name = ct.name.to_string().to_ascii_lowercase();
                            let built = parts.and_then(ddl::build_table);
                            match built {
                                Ok(mut t) => {
                                    if let Some((f, l)) = names.get(&t.name) {
                                        errors.push(err(
                                            stmt.line,
                                            format!("{} is already defined at {f}:{l}", t.name),
                                        ));
                                        continue;
                                    }
                                    names.insert(t.name.clone(), (file.clone(), stmt.line));
                                    t.doc = stmt.doc.clone();
                                    t.column_docs =
                                        lineage::table_column_docs(&stmt.text, &ct.columns);
                                    t.sql = stmt.text.clone();
                                    t.file = file.clone();
                                    t.line = stmt.line;
                                    if let Some(same) = running.iter().find(|r| {
                                        r.name == t.name && r.key == t.key && r.schema == t.schema
                                    }) {
                                        t.rows = same.rows.clone();
                                    }
                                    tables.push(Arc::new(t));
                                }
                                Err(problems) => errors.extend(
                                    problems
                                        .into_iter()
                                        .map(|p| err(stmt.line, format!("table {name}: {p}"))),
                                ),
                            }
                            continue;
                        }
                    }
                    let built = parts.and_then(ddl::build_stream);
                    match built {
                        Ok(mut s) => {
                            if let Some((f, l)) = names.get(&s.name) {
                                errors.push(err(
                                    stmt.line,
                                    format!("{} is already defined at {f}:{l}", s.name),
                                ));
                                continue;
                            }
                            names.insert(s.name.clone(), (file.clone(), stmt.line));
                            s.doc = stmt.doc.clone();
                            s.column_docs = lineage::table_column_docs(&stmt.text, &ct.columns);
                            s.sql = stmt.text.clone();
                            s.file = file.clone();
                            s.line = stmt.line;
                            streams.push(Arc::new(s));
                        }
                        Err(problems) => {
                            let name = ct.name.to_string();
                            errors.extend(
                                problems
                                    .into_iter()
                                    .map(|p| err(stmt.line, format!("table {name}: {p}"))),
                            );
                        }
                    }
                }
                SqlStatement::CreateView(cv) => {
                    let name = cv.name.to_string().to_ascii_lowercase();
                    let what = if kind == "alert" { "alert" } else { "view" };
                    let mut retention = None;
                    let mut key_ttl = None;
                    let options = match &cv.options {
                        CreateTableOptions::With(o) | CreateTableOptions::Options(o) => o.clone(),
                        _ => vec![],
                    };
                    let mut bad = false;
                    let mut pairs = Vec::new();
                    for option in &options {
                        match ddl::option_pair(option) {
                            Ok(pair) => pairs.push(pair),
                            Err(e) => {
                                errors.push(err(stmt.line, format!("{what} {name}: {e}")));
                                bad = true;
                            }
                        }
                    }
                    let mut alert_options = None;
                    if kind == "alert" {
                        match alert::parse_options(&pairs) {
                            Ok(o) => alert_options = Some(o),
                            Err(problems) => {
                                errors.extend(problems.iter().map(|(key, p)| {
                                    let line = option_line(&stmt.text, key)
                                        .map_or(stmt.line, |l| stmt.line + l);
                                    err(line, format!("alert {name}: {p}"))
                                }));
                                bad = true;
                            }
                        }
                    } else {
                        for (key, value) in &pairs {
                            let slot = match key.as_str() {
                                "retention" => &mut retention,
                                "key_ttl" => &mut key_ttl,
                                _ => {
                                    errors.push(err(
                                        stmt.line,
                                        format!(
                                            "view {name}: unknown option {key:?} (known: retention, key_ttl)"
                                        ),
                                    ));
                                    bad = true;
                                    continue;
                                }
                            };
                            match crate::config::parse_duration(value) {
                                Ok(d) if !d.is_zero() => *slot = Some(d),
                                Ok(_) => {
                                    errors.push(err(
                                        stmt.line,
                                        format!("view {name}: {key}: must be greater than 0"),
                                    ));
                                    bad = true;
                                }
                                Err(e) => {
                                    errors.push(err(stmt.line, format!("view {name}: {key}: {e}")));
                                    bad = true;
                                }
                            }
                        }
                    }
                    if let Some((f, l)) = names.get(&name) {
                        errors.push(err(
                            stmt.line,
                            format!("{name} is already defined at {f}:{l}"),
                        ));
                        continue;
                    }
                    names.insert(name.clone(), (file.clone(), stmt.line));
                    if bad {
                        continue;
                    }
                    let query_stmt =
                        DFStatement::Statement(Box::new(SqlStatement::Query(cv.query.clone())));
                    let references = ctx
                        .state()
                        .resolve_table_references(&query_stmt)
                        .map(|refs| {
                            refs.iter()
                                .map(|r| r.table().to_ascii_lowercase())
                                .collect()
                        })
                        .unwrap_or_default();
                    let column_docs = lineage::select_item_docs(&stmt.text, &cv.query);
                    let view = PendingView {
                        what,
                        column_docs,
                        name,
                        file: file.clone(),
                        line: stmt.line,
                        doc: stmt.doc.clone(),
                        text: stmt.text.clone(),
                        query: cv.query,
                        retention,
                        key_ttl,
                        references,
                    };
                    match alert_options {
                        Some(options) => pending_alerts.push((view, options)),
                        None => pending.push(view),
                    }
                }
                _ => errors.push(err(stmt.line, "unsupported statement".into())),
            }
        }
    }

    for s in &streams {
        register(&ctx, &s.name, s.schema.clone());
    }
    for t in &tables {
        register(&ctx, &t.name, t.schema.clone());
    }
    let stream_names: HashSet<&str> = streams.iter().map(|s| s.name.as_str()).collect();
    let table_defs: HashMap<String, Arc<TableDef>> =
        tables.iter().map(|t| (t.name.clone(), t.clone())).collect();

    // Plan views in dependency order; a view whose upstream failed is reported once.
    let mut views: Vec<Arc<ViewPlan>> = Vec::new();
    let mut planned: HashMap<String, Arc<ViewPlan>> = HashMap::new();
    let mut failed: HashSet<String> = HashSet::new();
    let pending_names: HashSet<String> = pending.iter().map(|p| p.name.clone()).collect();
    let mut remaining: Vec<PendingView> = pending;
    loop {
        let before = remaining.len();
        let mut next = Vec::new();
        for p in remaining {
            let waits_for: Vec<&String> = p
                .references
                .iter()
                .filter(|r| {
                    *r != &p.name && pending_names.contains(*r) && !planned.contains_key(*r)
                })
                .collect();
            if let Some(unknown) = p.references.iter().find(|r| {
                !stream_names.contains(r.as_str())
                    && !pending_names.contains(*r)
                    && !table_defs.contains_key(*r)
            }) {
                errors.push(PlanError {
                    file: p.file.clone(),
                    line: p.line,
                    message: format!(
                        "view {}: reads {unknown}, which is neither a stream nor a view",
                        p.name
                    ),
                });
                failed.insert(p.name.clone());
                continue;
            }
            if let Some(dep) = waits_for.iter().find(|d| failed.contains(**d)) {
                errors.push(PlanError {
                    file: p.file.clone(),
                    line: p.line,
                    message: format!("view {}: reads view {dep}, which has errors", p.name),
                });
                failed.insert(p.name.clone());
                continue;
            }
            if !waits_for.is_empty() {
                next.push(p);
                continue;
            }
            match plan_view(&ctx, &p, &stream_names, &table_defs, &planned) {
                Ok(view) => {
                    let view = Arc::new(view);
                    register(&ctx, &view.name, view.output_schema.clone());
                    planned.insert(view.name.clone(), view.clone());
                    views.push(view);
                }
                Err(e) => {
                    errors.push(e);
                    failed.insert(p.name.clone());
                }
            }
        }
        remaining = next;
        if remaining.is_empty() {
            break;
        }
        if remaining.len() == before {
            for p in &remaining {
                errors.push(PlanError {
                    file: p.file.clone(),
                    line: p.line,
                    message: format!("view {}: circular reference between views", p.name),
                });
            }
            break;
        }
    }

    let mut alerts = Vec::new();
    for (p, options) in &pending_alerts {
        let at = |message: String| PlanError {
            file: p.file.clone(),
            line: p.line,
            message: format!("alert {}: {message}", p.name),
        };
        let source = match p.references.as_slice() {
            [one] => one,
            _ => {
                errors.push(at("an alert reads exactly one stream or view".into()));
                continue;
            }
        };
        let upstream = if stream_names.contains(source.as_str()) {
            Upstream::Stream(source.clone())
        } else if table_defs.contains_key(source) {
            errors.push(at(format!(
                "reads {source}, a reference table: an alert reads a stream or a view (join the table in a view, and alert on the view)"
            )));
            continue;
        } else if planned.contains_key(source) {
            Upstream::View(source.clone())
        } else if failed.contains(source) {
            errors.push(at(format!("reads view {source}, which has errors")));
            continue;
        } else {
            errors.push(at(format!(
                "reads {source}, which is neither a stream nor a view"
            )));
            continue;
        };
        let state = ctx.state();
        let statement = DFStatement::Statement(Box::new(SqlStatement::Query(p.query.clone())));
        let plan = match futures::executor::block_on(state.statement_to_plan(statement)) {
            Ok(plan) => plan,
            Err(e) => {
                errors.push(locate_planning_error(&e, p));
                continue;
            }
        };
        match alert::compile(&state, &p.name, &p.text, options, &plan, upstream) {
            Ok(mut a) => {
                a.fingerprint = with_upstream(a.definition, &a.upstream, &planned);
                a.doc = p.doc.clone();
                a.column_docs = p.column_docs.clone();
                if let datafusion::sql::sqlparser::ast::SetExpr::Select(select) =
                    p.query.body.as_ref()
                {
                    a.condition_sql = select.selection.as_ref().map(|w| w.to_string());
                }
                a.file = p.file.clone();
                a.line = p.line;
                alerts.push(Arc::new(a));
            }
            Err(message) => {
                let key = message.split(':').next().unwrap_or("");
                let line = option_line(&p.text, key).map_or(p.line, |l| p.line + l);
                errors.push(PlanError {
                    line,
                    ..at(message)
                });
            }
        }
    }

    let mut planned_sinks = Vec::new();
    for mut sink in sinks {
        let at = |message: String| PlanError {
            file: sink.file.clone(),
            line: sink.line,
            message: format!("sink {}: {message}", sink.name),
        };
        if alerts.iter().any(|a: &Arc<AlertPlan>| a.name == sink.from) {
            if !sink.key.is_empty() {
                errors.push(at("key: an alert rule's records are keyed by id".into()));
                continue;
            }
            sink.from_alert = true;
            sink.key_columns = vec!["id".into()];
            planned_sinks.push(Arc::new(sink));
            continue;
        }
        let Some(view) = planned.get(&sink.from) else {
            let message = if pipeline_has(&pending_alerts, &sink.from) {
                format!("reads alert rule {}, which has errors", sink.from)
            } else if failed.contains(&sink.from) {
                format!("reads view {}, which has errors", sink.from)
            } else {
                format!(
                    "reads {}, which is neither a view nor an alert rule",
                    sink.from
                )
            };
            errors.push(at(message));
            continue;
        };
        let columns: Vec<&str> = view
            .output_schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        sink.key_columns = match view.shape {
            ViewShape::Windowed => {
                let mut k = view.key_columns.clone();
                k.push("window_start".into());
                k
            }
            ViewShape::Updating => view.key_columns.clone(),
            ViewShape::Filter => sink.key.clone(),
        };
        if view.shape != ViewShape::Filter && !sink.key.is_empty() {
            errors.push(at(format!(
                "key: only for a filter view; {}'s rows are keyed by {}",
                view.name,
                sink.key_columns.join(", ")
            )));
            continue;
        }
        if sink.key_columns.is_empty() {
            errors.push(at(format!(
                "{} is a filter view: say which columns make a row unique, key = 'col1, col2'",
                view.name
            )));
            continue;
        }
        if let Some(missing) = sink
            .key_columns
            .iter()
            .find(|k| !columns.contains(&k.as_str()))
        {
            errors.push(at(format!("key: {} has no column {missing}", view.name)));
            continue;
        }
        planned_sinks.push(Arc::new(sink));
    }

    if errors.is_empty() {
        Ok(Pipeline {
            streams,
            tables,
            sinks: planned_sinks,
            views,
            alerts,
        })
    } else {
        errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        Err(errors)
    }
}

fn register(ctx: &SessionContext, name: &str, schema: SchemaRef) {
    let table: Arc<dyn TableProvider> = Arc::new(EmptyTable::new(schema));
    // EmptyTable registration into the default in-memory catalog cannot fail
    // except for a duplicate name, which plan_sources has already rejected.
    let _ = ctx.register_table(name, table);
}

/// A DataFusion context for planning pipelines: spans on, window UDFs registered.
pub fn planning_context() -> SessionContext {
    let mut config = SessionConfig::new();
    config.options_mut().sql_parser.collect_spans = true;
    let ctx = SessionContext::new_with_config(config);
    for udf in window_udfs() {
        ctx.register_udf(udf);
    }
    ctx
}

/// `tumble`, `hop` and `session` as UDFs that DataFusion can plan. They are
/// never executed: the planner turns them into a `WindowSpec`.
pub fn window_udfs() -> Vec<ScalarUDF> {
    let interval = DataType::Interval(datafusion::arrow::datatypes::IntervalUnit::MonthDayNano);
    let not_here = |name: &'static str| -> datafusion::logical_expr::ScalarFunctionImplementation {
        Arc::new(move |_: &[ColumnarValue]| {
            Err(DataFusionError::Plan(format!(
                "{name}() can only be used in the GROUP BY of a view"
            )))
        })
    };
    vec![
        create_udf(
            "tumble",
            vec![interval.clone()],
            timestamp_type(),
            Volatility::Volatile,
            not_here("tumble"),
        ),
        create_udf(
            "hop",
            vec![interval.clone(), interval.clone()],
            timestamp_type(),
            Volatility::Volatile,
            not_here("hop"),
        ),
        create_udf(
            "session",
            vec![interval],
            timestamp_type(),
            Volatility::Volatile,
            not_here("session"),
        ),
    ]
}

/// Finds " at Line: N, Column: M" in a sqlparser message (relative to the
/// statement); returns (line in the statement, message without it).
fn locate_parser_error(message: &str) -> (usize, String) {
    let number_after = |label: &str| {
        message
            .find(label)
            .and_then(|i| {
                message[i + label.len()..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
            })
            .and_then(|n| n.parse::<usize>().ok())
    };
    let line = number_after("Line: ").unwrap_or(1);
    let column = number_after("Column: ");
    let mut clean = message
        .trim_start_matches("SQL error: ")
        .trim_start_matches("ParserError(\"")
        .trim_end_matches("\")")
        .to_string();
    if let Some(at) = clean.find(" at Line: ") {
        clean.truncate(at);
    }
    match column {
        Some(c) if line == 1 => (
            line,
            format!("syntax error: {clean} (column {c} of the statement)"),
        ),
        Some(c) => (line, format!("syntax error: {clean} (column {c})")),
        None => (line, format!("syntax error: {clean}")),
    }
}

/// Maps a DataFusion error to a file line: the diagnostic span when DataFusion
/// gives one, else the first line of the statement that mentions a quoted name
/// from the message, else the statement's first line.
fn locate_planning_error(e: &DataFusionError, p: &PendingView) -> PlanError {
    let message = clean_message(e);
    let mut line = p.line;
    if let Some(span) = e.diagnostic().and_then(|d| d.span) {
        if span.start.line > 0 {
            line = p.line + span.start.line as usize - 1;
        }
    } else if let Some(name) = quoted_name(&message) {
        let needle = name
            .rsplit('.')
            .next()
            .unwrap_or(&name)
            .to_ascii_lowercase();
        if let Some(offset) = p
            .text
            .lines()
            .position(|l| l.to_ascii_lowercase().contains(&needle))
        {
            line = p.line + offset;
        }
    }
    PlanError {
        file: p.file.clone(),
        line,
        message: format!("{} {}: {message}", p.what, p.name),
    }
}

/// The line (0-based, within `text`) of a `WITH` option `key = ...`.
fn option_line(text: &str, key: &str) -> Option<usize> {
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let pattern = key.to_ascii_lowercase();
    text.lines().position(|l| {
        let l = l.to_ascii_lowercase();
        l.match_indices(&pattern).any(|(i, _)| {
            let before = l[..i].chars().last();
            let after = l[i + pattern.len()..].trim_start();
            !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') && after.starts_with('=')
        })
    })
}

fn clean_message(e: &DataFusionError) -> String {
    let text = e.strip_backtrace();
    let text = text
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("Schema error: ")
        .trim_start_matches("This feature is not implemented: ");
    // DataFusion's "Valid fields are ..." lists can be very long; keep the first sentence.
    text.split(". Valid fields are")
        .next()
        .unwrap_or(text)
        .split("\n")
        .next()
        .unwrap_or(text)
        .to_string()
}

fn quoted_name(message: &str) -> Option<String> {
    for (open, close) in [("named ", "."), ("'", "'"), ("\"", "\"")] {
        if let Some(start) = message.find(open) {
            let rest = &message[start + open.len()..];
            let end = if open == "named " {
                rest.find([' ', ',']).unwrap_or(rest.len())
            } else {
                rest.find(close)?
            };
            let name = rest[..end].trim_matches(['\'', '"', '.']).to_string();
            if !name.is_empty() {
                return Some(name);
            }
        }
    }
    None
}

fn plan_view(
    ctx: &SessionContext,
    p: &PendingView,
    streams: &HashSet<&str>,
    tables: &HashMap<String, Arc<TableDef>>,
    planned: &HashMap<String, Arc<ViewPlan>>,
) -> Result<ViewPlan, PlanError> {
    let state = ctx.state();
    let statement = DFStatement::Statement(Box::new(SqlStatement::Query(p.query.clone())));
    let plan = futures::executor::block_on(state.statement_to_plan(statement))
        .map_err(|e| locate_planning_error(&e, p))?;
    let fail = |message: String| PlanError {
        file: p.file.clone(),
        line: p.line,
        message: format!("view {}: {message}", p.name),
    };
    let mut view = compile(&state, p, &plan, streams, tables, planned).map_err(fail)?;
    view.fingerprint = with_upstream(view.definition, &view.upstream, planned);
    Ok(view)
}

/// A statement's fingerprint with its upstream view's: rows computed from a
/// view go stale when that view's definition changes, however far up.
fn with_upstream(
    definition: u64,
    upstream: &Upstream,
    planned: &HashMap<String, Arc<ViewPlan>>,
) -> u64 {
    match upstream {
        // a view over a stream keeps the fingerprint it always had
        Upstream::Stream(_) => definition,
        Upstream::View(v) => match planned.get(v) {
            Some(up) => fingerprint(&[&definition.to_string(), &up.fingerprint.to_string()]),
            None => definition,
        },
    }
}

/// Cuts the logical plan into pre-steps, aggregate and post-steps.
fn compile(
    state: &SessionState,
    p: &PendingView,
    plan: &LogicalPlan,
    streams: &HashSet<&str>,
    tables: &HashMap<String, Arc<TableDef>>,
    planned: &HashMap<String, Arc<ViewPlan>>,
) -> Result<ViewPlan, String> {
    // (a join's ON is the lookup's own business: its columns are not copied)
    let mut read = HashSet::new();
    let _ = plan.apply(|node| {
        if matches!(node, LogicalPlan::Join(_)) {
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue);
        }
        for e in node.expressions() {
            read.extend(e.column_refs().into_iter().cloned());
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    let rel = Relations {
        tables,
        views: planned,
        read,
    };
    // Walk down from the top, collecting nodes above the aggregate.
    let mut above: Vec<&LogicalPlan> = Vec::new();
    let mut node = plan;
    let aggregate = loop {
        match node {
            LogicalPlan::Projection(x) => {
                above.push(node);
                node = &x.input;
            }
            LogicalPlan::Filter(x) => {
                above.push(node);
                node = &x.input;
            }
            LogicalPlan::SubqueryAlias(x) => {
                above.push(node);
                node = &x.input;
            }
            LogicalPlan::Aggregate(a) => break Some(a),
            LogicalPlan::TableScan(_) | LogicalPlan::Join(_) => break None,
            other => return Err(unsupported_node(other)),
        }
    };
    // Below the aggregate (or the whole plan for a filter view).
    let mut below: Vec<&LogicalPlan> = Vec::new();
    let scan = if let Some(a) = aggregate {
        descend(&a.input, &mut below, &rel)?
    } else {
        below = std::mem::take(&mut above);
        descend(node, &mut below, &rel)?
    };

    let source = scan.table_name.table().to_ascii_lowercase();
    let upstream = if streams.contains(source.as_str()) {
        Upstream::Stream(source.clone())
    } else if planned.contains_key(&source) {
        Upstream::View(source.clone())
    } else {
        return Err(format!("{source} is neither a stream nor a view"));
    };
    if let (Some(_), Upstream::View(v)) = (aggregate, &upstream) {
        if planned
            .get(v)
            .is_some_and(|v| v.shape == ViewShape::Updating)
        {
            return Err(format!(
                "cannot aggregate over {v}: it is an updating view whose rows change in place; aggregate over its source instead"
            ));
        }
    }
    let input_schema: SchemaRef = Arc::new(scan.projected_schema.as_arrow().clone());

    // Steps are listed top-down; they run bottom-up.
    below.reverse();
    above.reverse();
    let pre = compile_steps(state, &below, &rel)?;
    let post = compile_steps(state, &above, &rel)?;
    let lookups: Vec<String> = pre
        .iter()
        .filter_map(|s| match s {
            Step::Lookup(l) => Some(l.table.clone()),
            _ => None,
        })
        .collect();

    let (shape, aggregate_plan) = match aggregate {
        None => (ViewShape::Filter, None),
        Some(a) => {
            let agg = compile_aggregate(state, a)?;
            let shape = if agg.window.is_some() {
                ViewShape::Windowed
            } else {
                ViewShape::Updating
            };
            (shape, Some(agg))
        }
    };

    // Output schema: window bounds first for windowed views.
    let plan_schema = plan.schema().as_arrow();
    let mut fields: Vec<Field> = Vec::new();
    if shape == ViewShape::Windowed {
        for name in ["window_start", "window_end"] {
            if plan_schema.field_with_name(name).is_err() {
                fields.push(Field::new(name, timestamp_type(), false));
            }
        }
    }
    fields.extend(plan_schema.fields().iter().map(|f| f.as_ref().clone()));
    let output_schema = Arc::new(Schema::new(fields));

    let key_columns = match (&aggregate_plan, above.last()) {
        (Some(agg), Some(LogicalPlan::Projection(proj))) => {
            let key_names: Vec<&str> = agg.key_fields.iter().map(|f| f.name().as_str()).collect();
            let mut keys = Vec::new();
            for key in &key_names {
                for (i, e) in proj.expr.iter().enumerate() {
                    if let Expr::Column(c) = unalias(e) {
                        if c.name == *key || c.flat_name() == *key {
                            keys.push(proj.schema.field(i).name().clone());
                            break;
                        }
                    }
                }
            }
            keys
        }
        _ => Vec::new(),
    };

    let mut traced = lineage::trace(plan)?;
    // (the other side of a windowed join is a view, not a table)
    for v in lookups.iter().filter(|t| !tables.contains_key(*t)) {
        let (from, to) = (format!("table:{v}."), format!("view:{v}."));
        let fix = |s: &String| match s.strip_prefix(&from) {
            Some(rest) => format!("{to}{rest}"),
            None => s.clone(),
        };
        for c in &mut traced.columns {
            c.sources = c.sources.iter().map(|(k, e)| (fix(k), *e)).collect();
            c.filters = c.filters.iter().map(fix).collect();
        }
        traced.row_filters = traced.row_filters.iter().map(fix).collect();
        traced.join_keys = traced.join_keys.iter().map(fix).collect();
    }
    let mut column_lineage = Vec::with_capacity(output_schema.fields().len());
    column_lineage.resize(
        output_schema.fields().len() - traced.columns.len(),
        Default::default(),
    );
    column_lineage.extend(traced.columns);

    let logical_plan = plan.display_indent().to_string();
    if p.key_ttl.is_some() && shape != ViewShape::Updating {
        return Err(
            "key_ttl is for views without a window (their keys stay until they idle out); a windowed view frees a window's keys when it closes".into(),
        );
    }
    // (key_ttl joins the fingerprint only when set, so that views without it keep theirs)
    let ttl = p.key_ttl.map(|d| format!("{d:?}")).unwrap_or_default();
    // (a joined table's definition decides the rows too; views without joins keep theirs)
    let joined: String = lookups
        .iter()
        .filter_map(|t| match tables.get(t) {
            Some(t) => Some(without_comments(&t.sql)),
            None => planned.get(t).map(|v| v.fingerprint.to_string()),
        })
        .collect();
    let fingerprint = fingerprint(&[
        &without_comments(&p.text),
        &logical_plan,
        &format!("{:?}{ttl}{joined}", p.retention),
    ]);
    Ok(ViewPlan {
        name: p.name.clone(),
        doc: p.doc.clone(),
        sql: p.text.clone(),
        file: p.file.clone(),
        line: p.line,
        shape,
        retention: p.retention,
        key_ttl: p.key_ttl,
        upstream,
        input_schema,
        pre,
        aggregate: aggregate_plan,
        post,
        output_schema,
        key_columns,
        column_lineage,
        row_filters: traced.row_filters,
        lookups,
        join_keys: traced.join_keys,
        column_docs: p.column_docs.clone(),
        logical_plan,
        fingerprint,
        definition: fingerprint,
    })
}

fn unsupported_node(node: &LogicalPlan) -> String {
    match node {
        LogicalPlan::Sort(_) => "ORDER BY has no meaning in a continuous view: sort when you query its rows".into(),
        LogicalPlan::Limit(_) => "LIMIT is not supported in a view".into(),
        LogicalPlan::Distinct(_) => "SELECT DISTINCT is not supported in a view: use GROUP BY".into(),
        LogicalPlan::Join(_) => "a join must be below the aggregate: FROM stream s LEFT JOIN table t ON s.col = t.key".into(),
        LogicalPlan::Window(_) => {
            "window functions (OVER) are not supported: use tumble(), hop() or session() in GROUP BY".into()
        }
        LogicalPlan::Union(_) => "UNION is not supported in a view".into(),
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => "a view must read FROM a stream or a view".into(),
        other => format!("unsupported construct in a view: {}", other.display()),
    }
}

fn unalias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => unalias(&a.expr),
        other => other,
    }
}

fn window_function_in(e: &Expr) -> Option<String> {
    let mut found = None;
    let _ = e.apply(|e| {
        if let Expr::ScalarFunction(f) = e {
            if WINDOW_FUNCTIONS.contains(&f.name()) {
                found = Some(f.name().to_string());
                return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
            }
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    found
}

use datafusion::common::tree_node::TreeNode;

fn physical(
    state: &SessionState,
    e: &Expr,
    schema: &DFSchema,
) -> Result<Arc<dyn PhysicalExpr>, String> {
    if let Some(f) = window_function_in(e) {
        return Err(format!("{f}() may only appear in GROUP BY"));
    }
    state
        .create_physical_expr(e.clone(), schema)
        .map_err(|err| clean_message(&err))
}

/// Walks down from `node` to the scan a view reads, collecting the nodes on
/// the way (filters, projections, lookup joins) in `steps`, top-down.
fn descend<'a>(
    mut node: &'a LogicalPlan,
    steps: &mut Vec<&'a LogicalPlan>,
    rel: &Relations,
) -> Result<&'a datafusion::logical_expr::TableScan, String> {
    let tables = rel.tables;
    loop {
        match node {
            LogicalPlan::Projection(x) => {
                steps.push(node);
                node = &x.input;
            }
            LogicalPlan::Filter(x) => {
                steps.push(node);
                node = &x.input;
            }
            LogicalPlan::SubqueryAlias(x) => {
                steps.push(node);
                node = &x.input;
            }
            LogicalPlan::TableScan(t) => {
                let name = t.table_name.table().to_ascii_lowercase();
                if tables.contains_key(&name) {
                    return Err(format!(
                        "{name} is a reference table: a view reads a stream or a view, and joins the table (FROM stream s LEFT JOIN {name} t ON s.<column> = t.<key>)"
                    ));
                }
                return Ok(t);
            }
            LogicalPlan::Join(j) => {
                lookup_join(j, rel)?;
                steps.push(node);
                node = &j.left;
            }
            LogicalPlan::Aggregate(_) => {
                return Err("an aggregate over an aggregate is not supported: define the inner one as its own view and read from it".into())
            }
            other => return Err(unsupported_node(other)),
        }
    }
}

/// The relation a join side reads, through aliases; `None` for anything else.
fn side_name(mut node: &LogicalPlan) -> Option<String> {
    loop {
        match node {
            LogicalPlan::SubqueryAlias(x) => node = &x.input,
            LogicalPlan::TableScan(t) => return Some(t.table_name.table().to_ascii_lowercase()),
            _ => return None,
        }
    }
}

/// The pairs `left = right` a join matches on, from `ON` or `USING`.
fn join_pairs(j: &datafusion::logical_expr::Join) -> Result<Vec<(Expr, Expr)>, String> {
    let mut pairs: Vec<(Expr, Expr)> = j.on.clone();
    if let Some(f) = &j.filter {
        for conjunct in datafusion::logical_expr::utils::split_conjunction(f) {
            match conjunct {
                Expr::BinaryExpr(b) if b.op == datafusion::logical_expr::Operator::Eq => {
                    pairs.push((b.left.as_ref().clone(), b.right.as_ref().clone()))
                }
                other => {
                    return Err(format!(
                        "a join matches on equality of columns only; move {other} to WHERE"
                    ))
                }
            }
        }
    }
    Ok(pairs)
}

/// Checks that a join is a lookup join of a stream or view (left) with a
/// reference table (right) on the table's primary key, or a windowed join
/// of two windowed views; returns the left side's key expression and what
/// it joins.
fn lookup_join(
    j: &datafusion::logical_expr::Join,
    rel: &Relations,
) -> Result<(Expr, JoinWith), String> {
    use datafusion::logical_expr::JoinType;
    let tables = rel.tables;
    let left = side_name(&j.left);
    let right = side_name(&j.right);
    let table = match (&left, &right) {
        (_, Some(r)) if tables.contains_key(r) => tables[r].clone(),
        (Some(l), Some(r)) if tables.contains_key(l) => {
            return Err(format!(
                "put the stream first: FROM {r} ... JOIN {l} ... (a lookup join reads a stream and meets each event with the table's row)"
            ))
        }
        (Some(l), Some(r)) => {
            return match (rel.views.get(l), rel.views.get(r)) {
                (Some(lv), Some(rv)) if lv.window().is_some() && rv.window().is_some() => {
                    window_join(j, lv, rv, rel)
                }
                _ => Err(format!(
                    "{l} and {r} are not two windowed views: a join without a window is not supported. Join a reference table on its primary key (FROM stream s LEFT JOIN table t ON s.col = t.key), or two windowed views of the same window on their keys and window_start"
                )),
            }
        }
        _ => {
            return Err(
                "a join reads a stream or view (FROM) and a reference table (JOIN), not a subquery"
                    .into(),
            )
        }
    };
    match j.join_type {
        JoinType::Inner | JoinType::Left => {}
        other => {
            return Err(format!(
                "{} JOIN is not supported with a reference table: use JOIN (drops events without a row) or LEFT JOIN (keeps them, with NULLs)",
                other.to_string().to_uppercase()
            ))
        }
    }
    let pairs = join_pairs(j)?;
    let right_schema = j.right.schema();
    let mut found = None;
    for (a, b) in &pairs {
        let (l, r) = match (a, b) {
            (a, Expr::Column(c)) if right_schema.has_column(c) => (a, c),
            (Expr::Column(c), b) if right_schema.has_column(c) => (b, c),
            _ => {
                return Err(format!(
                    "a lookup join matches a column of the stream with the key of {}: {a} = {b} does not",
                    table.name
                ))
            }
        };
        if r.name != table.key {
            return Err(format!(
                "{}.{} is not the primary key of {} ({}): a lookup join is on the table's primary key; filter on other columns in WHERE",
                table.name, r.name, table.name, table.key
            ));
        }
        if found.is_some() {
            return Err(format!("{} is matched twice in the join", table.key));
        }
        if l.column_refs().iter().any(|c| right_schema.has_column(c)) {
            return Err(format!(
                "the stream's side of the join ({l}) reads a column of {}",
                table.name
            ));
        }
        found = Some(l.clone());
    }
    match found {
        Some(l) => Ok((l, JoinWith::Table(table))),
        None => Err(format!(
            "a lookup join needs ON <stream column> = {}.{}",
            table.name, table.key
        )),
    }
}

/// The stream at the root of a view's inputs.
fn root_of(v: &ViewPlan, views: &HashMap<String, Arc<ViewPlan>>) -> Option<String> {
    let mut up = &v.upstream;
    for _ in 0..=views.len() {
        match up {
            Upstream::Stream(s) => return Some(s.clone()),
            Upstream::View(name) => up = &views.get(name)?.upstream,
        }
    }
    None
}

/// Two windowed views of the same window and root stream, joined on all of
/// the right view's keys and `window_start` (Arroyo's windowed join). Both
/// close a window at the same watermark, so the join meets both sides'
/// rows of a window in the same step, and writes them then.
fn window_join(
    j: &datafusion::logical_expr::Join,
    lv: &ViewPlan,
    rv: &ViewPlan,
    rel: &Relations,
) -> Result<(Expr, JoinWith), String> {
    use datafusion::logical_expr::{BinaryExpr, Cast, JoinType, Operator};
    let (lw, rw) = (lv.window(), rv.window());
    if lw != rw {
        return Err(format!(
            "a windowed join needs the same window on both sides: {} is {}, {} is {}",
            lv.name,
            lw.map(|w| describe_window(&w)).unwrap_or_default(),
            rv.name,
            rw.map(|w| describe_window(&w)).unwrap_or_default()
        ));
    }
    if matches!(lw, Some(crate::window::WindowSpec::Session { .. })) {
        return Err("a windowed join of session windows is not supported (their bounds differ per key): use tumble or hop".into());
    }
    if root_of(lv, rel.views) != root_of(rv, rel.views) {
        return Err(format!(
            "{} and {} read different streams: a windowed join needs both views over the same stream (their windows close together)",
            lv.name, rv.name
        ));
    }
    if !matches!(j.join_type, JoinType::Inner | JoinType::Left) {
        return Err(format!(
            "{} JOIN is not supported for a windowed join: use JOIN or LEFT JOIN",
            j.join_type.to_string().to_uppercase()
        ));
    }
    let right_schema = j.right.schema();
    let mut matched: HashMap<String, Expr> = HashMap::new();
    for (a, b) in join_pairs(j)? {
        let (l, r) = match (&a, &b) {
            (a, Expr::Column(c)) if right_schema.has_column(c) => (a.clone(), c.clone()),
            (Expr::Column(c), b) if right_schema.has_column(c) => (b.clone(), c.clone()),
            _ => {
                return Err(format!(
                    "a windowed join matches columns of {} with columns of {}: {a} = {b} does not",
                    lv.name, rv.name
                ))
            }
        };
        let is_key = r.name == "window_start" || rv.key_columns.contains(&r.name);
        if !is_key {
            return Err(format!(
                "{}.{} is not a key of {} ({}, window_start): a windowed join is on the views' keys and window_start; filter on other columns in WHERE",
                rv.name,
                r.name,
                rv.name,
                rv.key_columns.join(", ")
            ));
        }
        matched.insert(r.name.clone(), l);
    }
    let mut wanted: Vec<String> = rv.key_columns.clone();
    wanted.push("window_start".into());
    if let Some(missing) = wanted.iter().find(|k| !matched.contains_key(*k)) {
        return Err(format!(
            "a windowed join matches every key of {} and window_start: ON lacks {}.{missing}",
            rv.name, rv.name
        ));
    }
    // Both sides' keys as one text, NULL when any part is (NULL matches nothing).
    let text = |e: Expr| Expr::Cast(Cast::new(Box::new(e), DataType::Utf8));
    let concat = |parts: Vec<Expr>| {
        parts
            .into_iter()
            .reduce(|a, b| {
                let a = Expr::BinaryExpr(BinaryExpr::new(
                    Box::new(a),
                    Operator::StringConcat,
                    Box::new(Expr::Literal(ScalarValue::Utf8(Some("\u{1}".into())), None)),
                ));
                Expr::BinaryExpr(BinaryExpr::new(
                    Box::new(a),
                    Operator::StringConcat,
                    Box::new(b),
                ))
            })
            .unwrap_or(Expr::Literal(ScalarValue::Utf8(None), None))
    };
    let (alias, _) = j.right.schema().qualified_field(0);
    let left_key = concat(wanted.iter().map(|k| text(matched[k].clone())).collect());
    let right_key = concat(
        wanted
            .iter()
            .map(|k| {
                text(Expr::Column(datafusion::common::Column::new(
                    alias.cloned(),
                    k.clone(),
                )))
            })
            .collect(),
    );
    Ok((left_key, JoinWith::Window(Arc::new(rv.clone()), right_key)))
}

fn compile_steps(
    state: &SessionState,
    nodes: &[&LogicalPlan],
    rel: &Relations,
) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for node in nodes {
        match node {
            LogicalPlan::Join(j) => {
                let (key, with) = lookup_join(j, rel)?;
                let inner = j.join_type == datafusion::logical_expr::JoinType::Inner;
                let key = physical(state, &key, j.left.schema())?;
                let schema = Arc::new(j.schema.as_arrow().clone());
                let right = j.right.schema();
                let used: Vec<bool> = (0..right.fields().len())
                    .map(|i| {
                        let (q, f) = right.qualified_field(i);
                        rel.read.iter().any(|c| {
                            &c.name == f.name()
                                && (c.relation.is_none() || c.relation.as_ref() == q)
                        })
                    })
                    .collect();
                steps.push(Step::Lookup(Arc::new(match with {
                    JoinWith::Table(table) => Lookup {
                        table: table.name.clone(),
                        key,
                        inner,
                        schema,
                        rows: table.rows.clone(),
                        window_join: None,
                        used,
                    },
                    JoinWith::Window(view, right_key) => Lookup {
                        table: view.name.clone(),
                        key,
                        inner,
                        schema,
                        rows: crate::table::TableHandle::new(
                            Arc::new(Schema::new(
                                view.output_schema
                                    .fields()
                                    .iter()
                                    .map(|f| f.as_ref().clone().with_nullable(true))
                                    .collect::<Vec<_>>(),
                            )),
                            0,
                        ),
                        window_join: Some((
                            view.name.clone(),
                            physical(state, &right_key, j.right.schema())?,
                        )),
                        used,
                    },
                })));
            }
            LogicalPlan::Filter(f) => steps.push(Step::Filter(physical(
                state,
                &f.predicate,
                f.input.schema(),
            )?)),
            LogicalPlan::Projection(proj) => {
                let exprs = proj
                    .expr
                    .iter()
                    .map(|e| physical(state, e, proj.input.schema()))
                    .collect::<Result<Vec<_>, _>>()?;
                steps.push(Step::Project {
                    exprs,
                    schema: Arc::new(proj.schema.as_arrow().clone()),
                });
            }
            // An alias renames the qualifier only; the columns stay where they are.
            _ => {}
        }
    }
    Ok(steps)
}

fn compile_aggregate(
    state: &SessionState,
    a: &datafusion::logical_expr::Aggregate,
) -> Result<AggregatePlan, String> {
    let input_schema = a.input.schema();
    let mut keys = Vec::new();
    let mut key_fields = Vec::new();
    let mut window = None;
    let mut window_position = 0;
    for (i, g) in a.group_expr.iter().enumerate() {
        if let Expr::GroupingSet(_) = g {
            return Err("GROUPING SETS, CUBE and ROLLUP are not supported in a view".into());
        }
        if let Expr::ScalarFunction(f) = unalias(g) {
            if WINDOW_FUNCTIONS.contains(&f.name()) {
                if window.is_some() {
                    return Err("a view may group by one window function only".into());
                }
                window = Some(window_spec(f.name(), &f.args)?);
                window_position = i;
                continue;
            }
        }
        keys.push(physical(state, g, input_schema)?);
        key_fields.push(a.schema.field(i).as_ref().clone());
    }
    let group_count = a.group_expr.len();
    let mut aggs = Vec::new();
    for (j, e) in a.aggr_expr.iter().enumerate() {
        let Expr::AggregateFunction(af) = unalias(e) else {
            return Err(format!("unsupported aggregate expression {e}"));
        };
        let name = af.func.name().to_string();
        let params = &af.params;
        let Some(kind) = AggKind::from_function_name(&name, params.distinct) else {
            return Err(if params.distinct {
                format!("{name}(DISTINCT ...) is not supported: only count(DISTINCT ...) is")
            } else {
                format!(
                    "aggregate {name}() is not supported in a view (supported: count, count(DISTINCT), sum, min, max, avg, first_value, last_value, approx_percentile_cont)"
                )
            });
        };
        let (value_expr, percentile) = if kind == AggKind::ApproxPercentile {
            // approx_percentile_cont(x, q) or approx_percentile_cont(q) WITHIN GROUP (ORDER BY x)
            let (value, q) = if let Some(order) = params.order_by.first() {
                (Some(&order.expr), params.args.first())
            } else {
                (params.args.first(), params.args.get(1))
            };
            let q = match q.map(unalias) {
                Some(Expr::Literal(v, _)) => literal_f64(v),
                _ => None,
            };
            let Some(q) = q.filter(|q| (0.0..=1.0).contains(q)) else {
                return Err(
                    "approx_percentile_cont needs a constant percentile between 0 and 1".into(),
                );
            };
            (value, q)
        } else {
            (params.args.first(), 0.0)
        };
        let arg = match value_expr.map(unalias) {
            None => None,
            // count(*) / count(1): every row counts
            Some(Expr::Literal(v, _)) if kind == AggKind::Count && !v.is_null() => None,
            Some(e) => Some(physical(state, e, input_schema)?),
        };
        let float_input = match value_expr {
            Some(e) => e
                .get_type(input_schema)
                .map(|t| t.is_floating() || matches!(t, DataType::Decimal128(..)))
                .unwrap_or(true),
            None => false,
        };
        let filter = match &params.filter {
            Some(f) => Some(physical(state, f, input_schema)?),
            None => None,
        };
        aggs.push(AggregateSpec {
            kind,
            arg,
            filter,
            percentile,
            float_input,
            ignore_nulls: matches!(
                params.null_treatment,
                Some(datafusion::logical_expr::expr::NullTreatment::IgnoreNulls)
            ),
            output_type: a.schema.field(group_count + j).data_type().clone(),
        });
    }
    Ok(AggregatePlan {
        keys,
        key_fields,
        window,
        window_position,
        aggs,
        schema: Arc::new(a.schema.as_arrow().clone()),
    })
}

fn literal_f64(v: &ScalarValue) -> Option<f64> {
    match v {
        ScalarValue::Float64(Some(x)) => Some(*x),
        ScalarValue::Float32(Some(x)) => Some(f64::from(*x)),
        ScalarValue::Int64(Some(x)) => Some(*x as f64),
        ScalarValue::Decimal128(Some(x), _, scale) => {
            Some(*x as f64 / 10f64.powi(i32::from(*scale)))
        }
        _ => None,
    }
}

fn interval_ms(e: &Expr, function: &str) -> Result<i64, String> {
    let bad = || format!("{function}() takes interval literals such as INTERVAL '1' MINUTE");
    let Expr::Literal(v, _) = unalias(e) else {
        return Err(bad());
    };
    let ms = match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) => {
            if i.months != 0 {
                return Err(format!(
                    "{function}(): month intervals have no fixed length; use days"
                ));
            }
            i64::from(i.days) * 86_400_000 + i.nanoseconds / 1_000_000
        }
        ScalarValue::IntervalDayTime(Some(i)) => {
            i64::from(i.days) * 86_400_000 + i64::from(i.milliseconds)
        }
        _ => return Err(bad()),
    };
    if ms <= 0 {
        return Err(format!("{function}(): the interval must be positive"));
    }
    Ok(ms)
}

fn window_spec(name: &str, args: &[Expr]) -> Result<WindowSpec, String> {
    match (name, args) {
        ("tumble", [size]) => Ok(WindowSpec::Tumble {
            size_ms: interval_ms(size, name)?,
        }),
        ("hop", [slide, size]) => {
            let (slide_ms, size_ms) = (interval_ms(slide, name)?, interval_ms(size, name)?);
            if slide_ms > size_ms {
                return Err("hop(slide, size): the slide must not be larger than the size".into());
            }
            Ok(WindowSpec::Hop { slide_ms, size_ms })
        }
        ("session", [gap]) => Ok(WindowSpec::Session {
            gap_ms: interval_ms(gap, name)?,
        }),
        _ => Err(format!("wrong number of arguments to {name}()")),
    }
}

/// Longest statement a pipeline file (or a preview) may hold.
pub const MAX_STATEMENT_BYTES: usize = 64 * 1024;
/// Most operators one statement may hold. An expression's depth is at most
/// its operator count (plus parentheses, which the parser limits), and ASTs
/// and expression trees are cloned, dropped and evaluated recursively: a
/// chain of thousands (`1+1+...`) overflowed the stack and aborted weir.
pub const MAX_STATEMENT_OPERATORS: usize = 512;

/// Refuses a statement too long or with too many operators, before it is
/// parsed. Counts operator characters and `AND`/`OR` outside strings and
/// comments (conservatively: `count(*)` counts one).
pub fn within_bounds(text: &str) -> Result<(), String> {
    if text.len() > MAX_STATEMENT_BYTES {
        return Err(format!(
            "the statement is {} bytes; at most {MAX_STATEMENT_BYTES} are accepted",
            text.len()
        ));
    }
    let code = without_comments(text);
    let mut operators = 0usize;
    let mut quote: Option<char> = None;
    let mut word = String::new();
    let count_word = |word: &mut String, operators: &mut usize| {
        if word.eq_ignore_ascii_case("and") || word.eq_ignore_ascii_case("or") {
            *operators += 1;
        }
        word.clear();
    };
    for c in code.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c.is_ascii_alphanumeric() || c == '_' => word.push(c),
            None => {
                count_word(&mut word, &mut operators);
                if matches!(
                    c,
                    '+' | '-' | '*' | '/' | '%' | '|' | '=' | '<' | '>' | '&' | '^'
                ) {
                    operators += 1;
                }
            }
        }
    }
    count_word(&mut word, &mut operators);
    if operators > MAX_STATEMENT_OPERATORS {
        return Err(format!(
            "the statement has {operators} operators; at most {MAX_STATEMENT_OPERATORS} are accepted (split it into views)"
        ));
    }
    Ok(())
}

/// A statement without its `--` comments (each becomes one space): what its
/// fingerprint is taken over, so that documenting a column does not rebuild
/// the view. A statement without comments is its own text, so fingerprints
/// taken before this existed stay the same.
pub fn without_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '-' && chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                out.push(' ');
            }
            None => out.push(c),
        }
    }
    out
}

/// FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
pub fn fingerprint(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Human-readable plan of a whole pipeline, as `weir check` prints it.
pub fn describe(pipeline: &Pipeline) -> String {
    let mut out = String::new();
    for s in &pipeline.streams {
        out.push_str(&format!("stream {} ({}:{})\n", s.name, s.file, s.line));
        out.push_str(&format!(
            "  topic: {}  qos: {}  idle_timeout: {}\n",
            s.topic.as_str(),
            s.qos,
            crate::config::format_duration(s.idle_timeout)
        ));
        match &s.event_time.column {
            Some(c) => out.push_str(&format!(
                "  event time: {c} (watermark bound {} ms)\n",
                s.event_time.bound_ms
            )),
            None => out.push_str("  event time: arrival time\n"),
        }
        for f in s.schema.fields() {
            out.push_str(&format!(
                "  {} {}{}\n",
                f.name(),
                f.data_type(),
                if f.is_nullable() { "" } else { " NOT NULL" }
            ));
        }
    }
    for t in &pipeline.tables {
        out.push_str(&format!("\ntable {} ({}:{})\n", t.name, t.file, t.line));
        let mode = match &t.mode {
            TableMode::Cdc { .. } => format!(
                "cdc (slot {}, publication {})",
                t.slot_name(),
                t.publication_name()
            ),
            TableMode::Snapshot { refresh } => format!(
                "snapshot every {}",
                crate::config::format_duration(*refresh)
            ),
        };
        out.push_str(&format!(
            "  follows: {}  mode: {mode}\n  primary key: {}\n",
            t.source_node(),
            t.key
        ));
        for f in t.schema.fields() {
            out.push_str(&format!(
                "  {} {}{}\n",
                f.name(),
                f.data_type(),
                if f.is_nullable() { "" } else { " NOT NULL" }
            ));
        }
    }
    for v in &pipeline.views {
        out.push_str(&format!("\nview {} ({}:{})\n", v.name, v.file, v.line));
        let shape = match v.window() {
            Some(w) => format!("windowed ({})", describe_window(&w)),
            None => format!("{:?}", v.shape).to_ascii_lowercase(),
        };
        out.push_str(&format!(
            "  shape: {shape}\n  reads: {}\n",
            v.upstream.name()
        ));
        for step in &v.pre {
            if let Step::Lookup(l) = step {
                let join = if l.inner { "JOIN" } else { "LEFT JOIN" };
                out.push_str(&match l.window_join {
                    Some(_) => format!(
                        "  windowed join: {join} {}, on its keys and window_start, written as windows close\n",
                        l.table
                    ),
                    None => format!("  lookup join: {join} {} on {}\n", l.table, l.key),
                });
            }
        }
        if !v.key_columns.is_empty() {
            out.push_str(&format!("  keys: {}\n", v.key_columns.join(", ")));
        }
        if let Some(note) = distinct_note(v) {
            out.push_str(&format!("  {note}\n"));
        }
        out.push_str("  output:");
        for f in v.output_schema.fields() {
            out.push_str(&format!(" {} {},", f.name(), f.data_type()));
        }
        out.pop();
        out.push_str("\n  plan:\n");
        for line in v.logical_plan.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    for s in &pipeline.sinks {
        out.push_str(&format!(
            "\nsink {} ({}:{})\n  from: {}  to: {}\n  keyed on: {}\n",
            s.name,
            s.file,
            s.line,
            s.from,
            s.target(),
            s.key_columns.join(", ")
        ));
    }
    for a in &pipeline.alerts {
        let ms = |ms: i64| crate::config::format_duration(Duration::from_millis(ms as u64));
        out.push_str(&format!("\nalert {} ({}:{})\n", a.name, a.file, a.line));
        out.push_str(&format!(
            "  severity: {}  reads: {}  key: {}\n",
            a.severity.as_str(),
            a.upstream.name(),
            a.key_column
        ));
        let mut timing = Vec::new();
        if a.timing.for_ms > 0 {
            timing.push(format!("for {}", ms(a.timing.for_ms)));
        }
        if let Some(t) = a.timing.absent_for_ms {
            timing.push(format!("absent_for {}", ms(t)));
        }
        if let Some(t) = a.timing.reopen_after_ms {
            timing.push(format!("reopen_after {}", ms(t)));
        }
        if let Some(c) = &a.clear_sql {
            timing.push(format!("clear {c}"));
        }
        if !timing.is_empty() {
            out.push_str(&format!("  {}\n", timing.join("  ")));
        }
        out.push_str("  plan:\n");
        for line in a.logical_plan.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// How a view's `count(DISTINCT)` counts, when it has one: `weir check`
/// and the docs say it, since past its bound the count is an estimate.
pub fn distinct_note(v: &ViewPlan) -> Option<String> {
    let has = v
        .aggregate
        .as_ref()
        .is_some_and(|a| a.aggs.iter().any(|g| g.kind == AggKind::CountDistinct));
    has.then(|| {
        format!(
            "count(DISTINCT): exact up to {} values per group, then a HyperLogLog++ estimate (standard error 1.6 %)",
            crate::window::agg::EXACT_DISTINCT_MAX
        )
    })
}

pub fn describe_window(w: &WindowSpec) -> String {
    let d = |ms: i64| crate::config::format_duration(Duration::from_millis(ms as u64));
    match *w {
        WindowSpec::Tumble { size_ms } => format!("tumble {}", d(size_ms)),
        WindowSpec::Hop { slide_ms, size_ms } => {
            format!("hop {} every {}", d(size_ms), d(slide_ms))
        }
        WindowSpec::Session { gap_ms } => format!("session gap {}", d(gap_ms)),
    }
}

impl fmt::Display for ViewShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViewShape::Windowed => "windowed",
            ViewShape::Updating => "updating",
            ViewShape::Filter => "filter",
        })
    }
}

fn pipeline_has(alerts: &[(PendingView, alert::AlertOptions)], name: &str) -> bool {
    alerts.iter().any(|(p, _)| p.name == name)
}

#[cfg(test)]
mod comment_tests {
    use super::{within_bounds, without_comments};

    #[test]
    fn statements_are_bounded_before_parsing() {
        let chain = |n: usize| {
            format!(
                "CREATE VIEW v AS SELECT {} AS x FROM t",
                vec!["1"; n + 1].join("+")
            )
        };
        assert!(within_bounds(&chain(500)).is_ok());
        assert!(within_bounds(&chain(600)).is_err_and(|e| e.contains("600 operators")));
        let ands = format!("SELECT a FROM t WHERE {}", vec!["a = 1"; 300].join(" AND "));
        assert!(within_bounds(&ands).is_err(), "AND counts");
        // operators inside strings and comments do not count
        let quoted = format!(
            "SELECT '{}' AS s FROM t -- {}",
            "+".repeat(2000),
            "*".repeat(2000)
        );
        assert!(within_bounds(&quoted).is_ok());
        assert!(within_bounds(&"x".repeat(70_000)).is_err_and(|e| e.contains("bytes")));
    }

    #[test]
    fn comments_go_and_strings_stay() {
        assert_eq!(
            without_comments("SELECT a -- x\nFROM t"),
            "SELECT a  FROM t"
        );
        assert_eq!(
            without_comments("SELECT '--not' AS a FROM t"),
            "SELECT '--not' AS a FROM t"
        );
        assert_eq!(without_comments("SELECT a FROM t"), "SELECT a FROM t");
    }
}
