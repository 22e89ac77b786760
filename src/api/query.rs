//! `POST /api/v1/query`: ad-hoc, read-only SQL over stored views.
//!
//! The query is parsed first and must be exactly one `SELECT` (anything else
//! is a 400). The views it names are loaded from the store into in-memory
//! tables of their output schema and the query runs on a fresh DataFusion
//! context with DDL, DML and statements disabled.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::catalog::MemTable;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use futures::StreamExt;
use serde_json::{json, Value};

use super::{blocking, sandbox, ApiError, AppState, MAX_LIMIT};
use crate::plan::Pipeline;
use crate::sink::batch_to_json_text;
use crate::store::Store;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    sql: String,
}

pub async fn query(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: QueryRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the body must be {{\"sql\": \"SELECT ...\"}}: {e}"))
    })?;
    if request.sql.len() > sandbox::MAX_SQL_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "query_too_large",
            format!(
                "the SQL text is {} bytes; at most {} are accepted",
                request.sql.len(),
                sandbox::MAX_SQL_BYTES
            ),
        ));
    }
    let (store, pipeline, memory) = (state.store.clone(), state.pipeline(), state.sandbox.memory);
    let body = state
        .sandbox
        .run(async move { run_limited(store, pipeline, &request.sql, memory).await })
        .await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Runs one read-only query over the stored views and renders the answer
/// as the endpoint's JSON body (`benches/store.rs` times this), with no
/// memory limit beyond the machine's.
pub async fn run(store: Store, pipeline: Arc<Pipeline>, sql: &str) -> Result<String, ApiError> {
    run_limited(store, pipeline, sql, usize::MAX).await
}

/// Like [`run`], within `memory` bytes (loaded views and operators). Call
/// it inside the [`sandbox::Sandbox`]: parsing and planning recurse as deep
/// as the query nests.
pub async fn run_limited(
    store: Store,
    pipeline: Arc<Pipeline>,
    sql: &str,
    memory: usize,
) -> Result<String, ApiError> {
    let statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {})
        .map_err(|e| ApiError::bad_request(format!("invalid SQL: {e}")))?;
    if statements.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "expected exactly one query, got {} statements",
            statements.len()
        )));
    }
    let statement = &statements[0];
    let is_query =
        matches!(statement, DFStatement::Statement(s) if matches!(**s, SqlStatement::Query(_)));
    if !is_query {
        return Err(ApiError::bad_request(
            "only read-only queries (SELECT ...) are allowed",
        ));
    }
    if let DFStatement::Statement(s) = statement {
        sandbox::check(s).map_err(ApiError::bad_request)?;
    }
    let pool = Arc::new(GreedyMemoryPool::new(memory));
    // No spilling: an ad-hoc query writes nothing to disk.
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(ApiError::internal)?;
    let state = SessionStateBuilder::new()
        .with_config(SessionConfig::new())
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(YieldEverywhere))
        .build();
    let ctx = SessionContext::new_with_state(state);
    let references = ctx
        .state()
        .resolve_table_references(statement)
        .map_err(|e| ApiError::bad_request(e.strip_backtrace()))?;
    let mut views = Vec::new();
    for r in references {
        let name = r.table().to_ascii_lowercase();
        if let Some(t) = pipeline.table(&name) {
            // A reference table: its rows as the pipeline holds them now.
            let rows = t.rows.get();
            let table = MemTable::try_new(rows.batch.schema(), vec![vec![rows.batch.clone()]])
                .map_err(ApiError::internal)?;
            ctx.register_table(name.as_str(), Arc::new(table))
                .map_err(ApiError::internal)?;
            continue;
        }
        match pipeline.view(&name) {
            Some(v) => views.push(v.clone()),
            None => {
                return Err(ApiError::bad_request(format!(
                    "no view or reference table named {name:?}: queries read stored views and reference tables"
                )))
            }
        }
    }
    // The views are loaded whole: their text counts against the limit
    // (twice: as JSON and as Arrow).
    let mut loaded = 0usize;
    for view in views {
        let st = store.clone();
        let name = view.name.clone();
        let rows =
            blocking(move || st.scan_rows(&name, None, None, None, usize::MAX, |_| true)).await?;
        loaded = loaded.saturating_add(rows.items.iter().map(|r| r.json.len() * 2).sum::<usize>());
        if loaded > memory {
            return Err(too_much_memory(memory));
        }
        let schema = Arc::new(Schema::new(
            view.output_schema
                .fields()
                .iter()
                .map(|f| Field::new(f.name(), f.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let values: Vec<Value> = rows
            .items
            .iter()
            .map(|r| serde_json::from_str(&r.json))
            .collect::<Result<_, _>>()
            .map_err(ApiError::internal)?;
        let mut decoder = arrow_json::ReaderBuilder::new(schema.clone())
            .with_batch_size(values.len().max(1))
            .build_decoder()
            .map_err(ApiError::internal)?;
        decoder.serialize(&values).map_err(ApiError::internal)?;
        let batches: Vec<_> = decoder
            .flush()
            .map_err(ApiError::internal)?
            .into_iter()
            .collect();
        let table = MemTable::try_new(schema, vec![batches]).map_err(ApiError::internal)?;
        ctx.register_table(view.name.as_str(), Arc::new(table))
            .map_err(ApiError::internal)?;
    }
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let frame = ctx
        .sql_with_options(sql, options)
        .await
        .map_err(|e| query_error(e, memory))?;
    let columns: Vec<String> = frame
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    // Streamed: only the rows that are returned are ever held.
    let mut stream = frame
        .execute_stream()
        .await
        .map_err(|e| query_error(e, memory))?;
    let mut rows: Vec<String> = Vec::new();
    let mut truncated = false;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| query_error(e, memory))?;
        for row in batch_to_json_text(&batch) {
            if rows.len() == MAX_LIMIT {
                truncated = true;
                break;
            }
            rows.push(row);
        }
        if truncated {
            break;
        }
    }
    // rows are spliced in as text to keep their columns in SELECT order
    Ok(format!(
        "{{\"columns\":{},\"rows\":[{}],\"truncated\":{truncated}}}",
        json!(columns),
        rows.join(",")
    ))
}

fn too_much_memory(memory: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "query_memory",
        format!("the query needs more than http.query_memory ({memory} bytes)"),
    )
}

/// A planning or execution error: the memory limit is a 413, the rest 400.
fn query_error(e: DataFusionError, memory: usize) -> ApiError {
    match e.find_root() {
        DataFusionError::ResourcesExhausted(_) => too_much_memory(memory),
        _ => ApiError::bad_request(e.strip_backtrace()),
    }
}

/// Makes every operator of an ad-hoc query give the thread back now and
/// then (tokio's cooperative budget), so that cancelling it at the timeout
/// takes effect. DataFusion does this for its sources; an operator that
/// makes many batches from one input (a cross join) would otherwise keep
/// its consumer busy without ever yielding.
#[derive(Debug)]
struct YieldEverywhere;

impl PhysicalOptimizerRule for YieldEverywhere {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if node.is::<CooperativeExec>() {
                return Ok(Transformed::no(node));
            }
            Ok(Transformed::yes(
                Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>
            ))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "weir_yield_everywhere"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
