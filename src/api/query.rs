//! `POST /api/v1/query`: ad-hoc, read-only SQL over stored views.
//!
//! The query is parsed first and must be exactly one `SELECT` (anything else
//! is a 400). The views it names are loaded from the store into in-memory
//! tables of their output schema and the query runs on a fresh DataFusion
//! context with DDL, DML and statements disabled.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::catalog::MemTable;
use datafusion::execution::context::{SQLOptions, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use serde_json::{json, Value};

use super::{blocking, ApiError, AppState, MAX_LIMIT};
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
    let body = run(state.store.clone(), state.pipeline.clone(), &request.sql).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Runs one read-only query over the stored views and renders the answer
/// as the endpoint's JSON body (`benches/store.rs` times this).
pub async fn run(store: Store, pipeline: Arc<Pipeline>, sql: &str) -> Result<String, ApiError> {
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
    let ctx = SessionContext::new();
    let references = ctx
        .state()
        .resolve_table_references(statement)
        .map_err(|e| ApiError::bad_request(e.strip_backtrace()))?;
    let mut views = Vec::new();
    for r in references {
        let name = r.table().to_ascii_lowercase();
        match pipeline.view(&name) {
            Some(v) => views.push(v.clone()),
            None => {
                return Err(ApiError::bad_request(format!(
                    "no view named {name:?}: queries read stored views"
                )))
            }
        }
    }
    for view in views {
        let st = store.clone();
        let name = view.name.clone();
        let rows =
            blocking(move || st.scan_rows(&name, None, None, None, usize::MAX, |_| true)).await?;
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
        .map_err(|e| ApiError::bad_request(e.strip_backtrace()))?;
    let columns: Vec<String> = frame
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let batches = frame
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(e.strip_backtrace()))?;
    let mut rows: Vec<String> = Vec::new();
    let mut truncated = false;
    for batch in &batches {
        for row in batch_to_json_text(batch) {
            if rows.len() == MAX_LIMIT {
                truncated = true;
                break;
            }
            rows.push(row);
        }
    }
    // rows are spliced in as text to keep their columns in SELECT order
    Ok(format!(
        "{{\"columns\":{},\"rows\":[{}],\"truncated\":{truncated}}}",
        json!(columns),
        rows.join(",")
    ))
}
