//! The HTTP API (axum), version 1 (DESIGN §6).
//!
//! Handlers only read: the store, the pipeline definitions and the metrics.
//! Store scans run on the blocking pool, so a large scan never stalls the
//! async workers, and nothing here can slow the pipeline thread. Errors are
//! `{"error": {"code", "message"}}` with a 4xx/5xx status; internal errors are
//! logged, not returned.

mod alerts;
pub mod dashboard;
pub mod lineage;
mod listener;
pub mod query;
pub mod sandbox;

pub use listener::TlsListener;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::auth::http::HttpAuth;
use crate::obs::{format_time, now_ms, Metrics};
use crate::plan::{describe_window, Pipeline, ViewPlan, ViewShape};
use crate::source::decode::RejectReason;
use crate::store::Store;
use crate::window::operator::time_key;

/// What the handlers share.
pub struct AppState {
    pub store: Store,
    /// The running pipelines and their lineage; a reload swaps them.
    pub live: Arc<crate::engine::reload::Live>,
    /// Plans the files again and applies them (`POST /api/v1/pipelines/reload`).
    pub reloader: Arc<crate::engine::reload::Reloader>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    /// False until the checkpoint is restored and the log replayed.
    pub recovered: Arc<AtomicBool>,
    pub health: Arc<crate::obs::Health>,
    /// Alert notifications: SSE clients subscribe here; acks notify here.
    pub notifier: Arc<crate::sink::notify::Notifier>,
    /// Cancelled at shutdown: ends SSE streams, which would otherwise hold
    /// the server's graceful shutdown open.
    pub shutdown: tokio_util::sync::CancellationToken,
    pub sse_keepalive: std::time::Duration,
    /// Where ad-hoc queries run (their own threads, limits).
    pub sandbox: sandbox::Sandbox,
    /// Samples for the lineage overlay's rates.
    pub rates: lineage::Rates,
    /// The configuration the docs pages describe (retention, the API address).
    pub docs_config: crate::config::Config,
    /// The dashboard's fleet summary, rebuilt at most every few seconds.
    pub fleet: dashboard::FleetCache,
}

impl AppState {
    /// The pipelines running now.
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.live.pipeline()
    }

    /// Their lineage graph.
    pub fn lineage(&self) -> Arc<crate::lineage::Graph> {
        self.live.lineage()
    }
}

/// Runs a store read on the blocking pool, so a long scan never stalls the
/// async workers; a failure is logged and answered as a 500.
pub async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// Access control in front of every route (see [`crate::auth::http`]), and
/// a time limit on every answer.
async fn guard(
    State((auth, metrics, timeout)): State<(Arc<HttpAuth>, Arc<Metrics>, std::time::Duration)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match auth.check(request.method(), request.uri().path(), request.headers()) {
        // A handler that has not answered in http.request_timeout gets a
        // 503 and is dropped (a query it ran is cancelled with it); a
        // stream's body, once started, is not limited.
        // A reload answers once its backfill is done, however long.
        Ok(_) if request.uri().path() == "/api/v1/pipelines/reload" => next.run(request).await,
        Ok(_) => match tokio::time::timeout(timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "request_timeout",
                format!(
                    "the request took longer than http.request_timeout ({}); try a smaller page",
                    crate::config::format_duration(timeout)
                ),
            )
            .into_response(),
        },
        Err(denied) => {
            metrics.http_denied.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(method = %request.method(), path = %request.uri().path(), code = denied.code, "HTTP request refused");
            let status = StatusCode::from_u16(denied.status).unwrap_or(StatusCode::FORBIDDEN);
            let mut response = (
                status,
                axum::Json(json!({"error": {"code": denied.code, "message": denied.message}})),
            )
                .into_response();
            if status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            response
        }
    }
}

pub fn router(state: Arc<AppState>, auth: Arc<HttpAuth>) -> Router {
    let counters = state.metrics.clone();
    let timeout = state.docs_config.http.request_timeout;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/streams", get(streams))
        .route("/api/v1/views", get(views))
        .route("/api/v1/views/{name}", get(view))
        .route("/api/v1/views/{name}/rows", get(view_rows))
        .route("/api/v1/query", post(query::query))
        .route("/api/v1/deadletter", get(dead_letters))
        .route("/api/v1/lineage", get(lineage::lineage))
        .route("/api/v1/sinks", get(sinks))
        .route("/api/v1/pipelines", get(pipelines))
        .route("/api/v1/pipelines/reload", post(reload_pipelines))
        .route("/api/v1/pipelines/preview", post(preview_pipeline))
        .route("/", get(dashboard::index))
        .route("/ui/{file}", get(dashboard::asset))
        .route("/api/v1/fleet", get(dashboard::fleet))
        .route("/api/v1/fleet/terminals", get(dashboard::terminals))
        .route("/docs", get(lineage::docs_root))
        .route("/docs/", get(lineage::docs_page))
        .route("/docs/{page}", get(lineage::docs_page))
        .route("/api/v1/alerts", get(alerts::list))
        .route("/api/v1/alerts/stream", get(alerts::stream))
        .route("/api/v1/alerts/{id}", get(alerts::one))
        .route("/api/v1/alerts/{id}/ack", post(alerts::ack))
        .fallback(not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            (auth, counters, timeout),
            guard,
        ))
}

/// `GET /api/v1/pipelines`: files, fingerprints, status, the last reload.
async fn pipelines(State(state): State<Arc<AppState>>) -> ApiResult {
    Ok(axum::Json(
        serde_json::to_value(state.live.status()).map_err(ApiError::internal)?,
    ))
}

/// `POST /api/v1/pipelines/reload`: plans the files again and applies them;
/// answers what `GET /api/v1/pipelines` then shows (`last_reload.applied`
/// false, and `errors`, when nothing changed because of them).
///
/// The reload runs in a task of its own: a client that hangs up must not
/// cut it between the pipeline applying it and weir recording it. It
/// answers once the backfill is done, however long that takes (this route
/// is not held to `http.request_timeout`).
async fn reload_pipelines(State(state): State<Arc<AppState>>) -> ApiResult {
    let reloading = state.clone();
    tokio::spawn(async move {
        reloading
            .reloader
            .reload(crate::engine::reload::Trigger::Api)
            .await;
    })
    .await
    .map_err(ApiError::internal)?;
    pipelines(State(state)).await
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    sql: String,
    /// `-15m` (before now), an RFC 3339 time, or epoch ms. Default `-15m`.
    from: Option<String>,
}

/// `from` of a preview: `-15m`, an RFC 3339 time or epoch ms.
pub fn parse_from(text: &str, now: i64) -> Result<i64, ApiError> {
    match text.strip_prefix('-') {
        Some(ago) if ago.parse::<i64>().is_err() => crate::config::parse_duration(ago)
            .map(|d| now.saturating_sub(d.as_millis().min(i64::MAX as u128) as i64))
            .map_err(|e| ApiError::bad_request(format!("from: {e}"))),
        _ => parse_time("from", text),
    }
}

/// `POST /api/v1/pipelines/preview`: one view run over the log's recent
/// events; the rows it would write, nothing stored.
async fn preview_pipeline(
    State(state): State<Arc<AppState>>,
    body: Result<axum::Json<PreviewRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    use crate::engine::preview::{self, PreviewError};
    let axum::Json(request) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if request.sql.len() > 64 * 1024 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "a preview statement is at most 64 KiB",
        ));
    }
    // Previews read the log on the blocking pool: two at a time.
    static PREVIEWS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let Ok(slot) = PREVIEWS.try_acquire() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            "two previews are running; try again when one is done",
        ));
    };
    let now = crate::obs::now_ms();
    let from = parse_from(request.from.as_deref().unwrap_or("-15m"), now)?;
    let running = state.pipeline();
    let timeout = state.docs_config.http.query_timeout;
    let st = state.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        // The slot goes with the work, not with the request: a client that
        // hangs up cannot start previews beyond the two (each ends at its
        // deadline).
        let _slot = slot;
        let (pipeline, view) = preview::plan_preview(&running, &request.sql)?;
        let deadline = std::time::Instant::now() + timeout;
        preview::run(&st.store, &pipeline, &view, from, now, deadline, MAX_LIMIT)
    })
    .await
    .map_err(ApiError::internal)?;
    match outcome {
        Ok(p) => {
            let rows = p.rows.join(",");
            let mut head = serde_json::to_value(&p).map_err(ApiError::internal)?;
            head["from"] = json!(crate::obs::format_time(from));
            let head = head.to_string();
            // rows are spliced in as text, to keep their columns in SELECT order
            let body = format!("{},\"rows\":[{rows}]}}", head.trim_end_matches('}'));
            Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
        }
        Err(PreviewError::Plan(errors)) => {
            let message = errors
                .iter()
                .map(|e| format!("line {}: {}", e.line, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            let list: Vec<Value> = errors
                .iter()
                .map(|e| json!({"file": e.file, "line": e.line, "message": e.message}))
                .collect();
            Ok((
                StatusCode::BAD_REQUEST,
                axum::Json(
                    json!({"error": {"code": "bad_pipeline", "message": message}, "errors": list}),
                ),
            )
                .into_response())
        }
        Err(PreviewError::Timeout) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the preview took longer than http.query_timeout ({}); try a later from",
                crate::config::format_duration(timeout)
            ),
        )),
        Err(PreviewError::Failed(why)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "preview_failed",
            why,
        )),
    }
}

/// An API error: status, machine-readable code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// What went wrong, for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }

    /// Logs the internal error; the client only learns that something failed.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "API request failed");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error; see the server log".into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

type ApiResult = Result<axum::Json<Value>, ApiError>;

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// 200 while weir can store what it receives; 503 with the reason when the
/// store refuses writes (weir then acknowledges nothing).
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.health.problem() {
        None => axum::Json(json!({"status": "ok"})).into_response(),
        Some(problem) => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unhealthy",
            message: problem,
        }
        .into_response(),
    }
}

/// `GET /api/v1/sinks`: each sink's target, rows written, lag and last error.
async fn sinks(State(state): State<Arc<AppState>>) -> ApiResult {
    let sinks: Vec<_> = state
        .metrics
        .sinks
        .get()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|s| s.report())
        .collect();
    Ok(axum::Json(json!({ "sinks": sinks })))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let not_ready = |message: &str| {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "not_ready",
            message: message.into(),
        }
        .into_response()
    };
    if !state.recovered.load(Ordering::SeqCst) {
        not_ready("restoring the checkpoint and replaying the ingest log")
    } else if let Some(problem) = state.health.problem() {
        not_ready(&problem)
    } else if !state.ready.load(Ordering::SeqCst) {
        not_ready("sources are not subscribed yet")
    } else {
        let degraded = state.health.degraded();
        if degraded.is_empty() {
            axum::Json(json!({"status": "ready"})).into_response()
        } else {
            axum::Json(json!({"status": "ready", "degraded": degraded})).into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(now_ms()),
    )
        .into_response()
}

fn schema_json(schema: &datafusion::arrow::datatypes::Schema) -> Value {
    Value::Array(
        schema
            .fields()
            .iter()
            .map(|f| json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()}))
            .collect(),
    )
}

async fn streams(State(state): State<Arc<AppState>>) -> ApiResult {
    let items: Vec<Value> = state
        .pipeline()
        .streams
        .iter()
        .map(|s| {
            let m = &state.metrics.streams[&s.name];
            json!({
                "name": s.name,
                "doc": s.doc,
                "topic": s.topic.as_str(),
                "subscription": s.topic.filter(),
                "format": s.format,
                "qos": s.qos,
                "idle_timeout": crate::config::format_duration(s.idle_timeout),
                "event_time": s.event_time.column,
                "watermark_bound_ms": s.event_time.bound_ms,
                "schema": schema_json(&s.schema),
                "counters": {
                    "messages": m.messages.load(Ordering::Relaxed),
                    "ingested": m.ingested.load(Ordering::Relaxed),
                    "rejected": m.rejected_total(),
                    "late": m.late.load(Ordering::Relaxed),
                },
                "watermark": m.watermark().map(format_time),
                "file": s.file,
                "line": s.line,
            })
        })
        .collect();
    Ok(axum::Json(json!({"items": items, "next_cursor": null})))
}

fn view_json(view: &ViewPlan, row_count: Option<usize>) -> Value {
    let window = view.window().map(|w| {
        let mut v = serde_json::to_value(w).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("description".into(), Value::String(describe_window(&w)));
        }
        v
    });
    json!({
        "name": view.name,
        "doc": view.doc,
        "sql": view.sql,
        "shape": view.shape,
        "window": window,
        "keys": view.key_columns,
        "schema": schema_json(&view.output_schema),
        "upstream": view.upstream,
        "retention": view.retention.map(crate::config::format_duration),
        "row_count": row_count,
        "file": view.file,
        "line": view.line,
    })
}

async fn views(State(state): State<Arc<AppState>>) -> ApiResult {
    let st = state.clone();
    let counts = blocking(move || {
        st.pipeline()
            .views
            .iter()
            .map(|v| st.store.count_rows(&v.name))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let items: Vec<Value> = state
        .pipeline()
        .views
        .iter()
        .zip(counts)
        .map(|(v, n)| view_json(v, Some(n)))
        .collect();
    Ok(axum::Json(json!({"items": items, "next_cursor": null})))
}

fn find_view(state: &AppState, name: &str) -> Result<Arc<ViewPlan>, ApiError> {
    state
        .pipeline()
        .view(name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no view named {name:?}")))
}

async fn view(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    let view = find_view(&state, &name)?;
    let st = state.clone();
    let n = name.clone();
    let count = blocking(move || st.store.count_rows(&n)).await?;
    let mut body = view_json(&view, Some(count));
    if let Value::Object(m) = &mut body {
        m.insert("plan".into(), Value::String(view.logical_plan.clone()));
    }
    Ok(axum::Json(body))
}

/// A 400 naming the first parameter not in `allowed`.
pub fn reject_unknown(params: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_request(format!(
            "unknown parameter {k:?} (known: {})",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

/// `limit` with its default and maximum.
pub fn parse_limit(params: &HashMap<String, String>) -> Result<usize, ApiError> {
    match params.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!(
                "limit must be an integer from 1 to {MAX_LIMIT}, got {text:?}"
            ))),
        },
    }
}

/// A time given as RFC 3339 or epoch milliseconds.
pub fn parse_time(name: &str, text: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            ApiError::bad_request(format!(
                "{name} must be an RFC 3339 time or epoch milliseconds, got {text:?}"
            ))
        })
}

pub fn encode_cursor(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_cursor(text: &str) -> Result<Vec<u8>, ApiError> {
    let bad =
        || ApiError::bad_request("invalid cursor: pass back the next_cursor of a previous page");
    if !text.len().is_multiple_of(2) || text.is_empty() {
        return Err(bad());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(bad)
        })
        .collect()
}

fn json_matches(value: Option<&Value>, wanted: &str) -> bool {
    match value {
        Some(Value::String(s)) => s == wanted,
        Some(Value::Number(n)) => {
            n.to_string() == wanted
                || n.as_f64()
                    .zip(wanted.parse::<f64>().ok())
                    .is_some_and(|(a, b)| a == b)
        }
        Some(Value::Bool(b)) => b.to_string() == wanted,
        Some(Value::Null) | None => wanted.is_empty() || wanted == "null",
        // arrays and objects are never key values
        Some(_) => false,
    }
}

async fn view_rows(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let view = find_view(&state, &name)?;
    let limit = parse_limit(&params)?;
    let cursor = params.get("cursor").map(|c| decode_cursor(c)).transpose()?;
    let columns: Vec<&str> = view
        .output_schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    let mut filters: Vec<(String, String)> = Vec::new();
    for (k, v) in &params {
        if k == "key" {
            let column = view
                .key_columns
                .first()
                .cloned()
                .or_else(|| match view.shape {
                    ViewShape::Filter => columns.first().map(|c| c.to_string()),
                    _ => None,
                })
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "view {name} has no key column in its output; use key.<column>="
                    ))
                })?;
            filters.push((column, v.clone()));
        } else if let Some(column) = k.strip_prefix("key.") {
            if !columns.contains(&column) {
                return Err(ApiError::bad_request(format!(
                    "view {name} has no column {column:?}"
                )));
            }
            filters.push((column.to_string(), v.clone()));
        } else if !matches!(k.as_str(), "limit" | "cursor" | "from" | "to") {
            return Err(ApiError::bad_request(format!(
                "unknown parameter {k:?} (known: key, key.<column>, from, to, limit, cursor)"
            )));
        }
    }
    let from = params
        .get("from")
        .map(|t| parse_time("from", t))
        .transpose()?;
    let to = params.get("to").map(|t| parse_time("to", t)).transpose()?;
    if view.shape == ViewShape::Updating && (from.is_some() || to.is_some()) {
        return Err(ApiError::bad_request(format!(
            "view {name} is an updating view (one row per key): from/to do not apply"
        )));
    }
    let st = state.clone();
    let page = blocking(move || {
        let from_key = from.map(time_key);
        let to_key = to.map(time_key);
        st.store.scan_rows(
            &name,
            from_key.as_ref().map(|k| k.as_slice()),
            to_key.as_ref().map(|k| k.as_slice()),
            cursor.as_deref(),
            limit,
            |row| {
                filters.is_empty() || {
                    let row: serde_json::Map<String, Value> =
                        serde_json::from_str(row).unwrap_or_default();
                    filters.iter().all(|(c, v)| json_matches(row.get(c), v))
                }
            },
        )
    })
    .await?;
    let rows: Vec<String> = page.items.into_iter().map(|r| r.json).collect();
    Ok(raw_list(&rows, page.next.as_deref()))
}

/// A list response whose items are JSON texts already in column order.
fn raw_list(items: &[String], next: Option<&[u8]>) -> Response {
    let next = match next {
        Some(k) => Value::String(encode_cursor(k)).to_string(),
        None => "null".into(),
    };
    let body = format!("{{\"items\":[{}],\"next_cursor\":{next}}}", items.join(","));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn dead_letters(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult {
    let limit = parse_limit(&params)?;
    let cursor = params.get("cursor").map(|c| decode_cursor(c)).transpose()?;
    let stream = params.get("stream").cloned();
    let reason = match params.get("reason") {
        None => None,
        Some(r) => Some(RejectReason::parse(r).ok_or_else(|| {
            ApiError::bad_request(format!(
                "reason must be one of malformed, schema, oversize, late; got {r:?}"
            ))
        })?),
    };
    reject_unknown(&params, &["stream", "reason", "limit", "cursor"])?;
    let st = state.clone();
    let page = blocking(move || {
        st.store.dead_letters(cursor.as_deref(), limit, |d| {
            stream.as_ref().is_none_or(|s| &d.stream == s) && reason.is_none_or(|r| d.reason == r)
        })
    })
    .await?;
    let items: Vec<Value> = page
        .items
        .into_iter()
        .map(|d| {
            json!({
                "stream": d.stream,
                "topic": d.topic,
                "reason": d.reason,
                "detail": d.detail,
                "payload": d.payload,
                "received_at": format_time(d.received_at),
            })
        })
        .collect();
    Ok(axum::Json(
        json!({"items": items, "next_cursor": page.next.map(|k| encode_cursor(&k))}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let key = vec![0u8, 1, 254, 255];
        assert_eq!(decode_cursor(&encode_cursor(&key)).unwrap(), key);
        assert!(decode_cursor("zz").is_err());
        assert!(decode_cursor("abc").is_err());
    }

    #[test]
    fn limits_and_times() {
        let params = |v: &str| HashMap::from([("limit".to_string(), v.to_string())]);
        assert_eq!(parse_limit(&HashMap::new()).unwrap(), DEFAULT_LIMIT);
        assert_eq!(parse_limit(&params("10000")).unwrap(), 10_000);
        assert!(parse_limit(&params("0")).is_err());
        assert!(parse_limit(&params("10001")).is_err());
        assert_eq!(parse_time("from", "1970-01-01T00:01:00Z").unwrap(), 60_000);
        assert_eq!(parse_time("from", "60000").unwrap(), 60_000);
        assert!(parse_time("from", "yesterday").is_err());
    }
}
