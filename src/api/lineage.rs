//! `GET /api/v1/lineage`: the lineage graph (DESIGN §6), whole or around one
//! node, as JSON, Mermaid, DOT or OpenLineage; JSON carries a live overlay
//! per node (`live`): events/s, rows written, late events, watermark lag,
//! state keys, open alerts.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::lineage::render::{render, Format};
use crate::lineage::{Direction, Graph};
use crate::obs::Metrics;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineageQuery {
    format: Option<String>,
    node: Option<String>,
    direction: Option<String>,
    columns: Option<bool>,
}

/// Counter samples, so that a rate is the change between two requests at
/// least a second apart (the first: since start).
#[derive(Debug)]
pub struct Rates {
    inner: Mutex<RateState>,
}

#[derive(Debug)]
struct RateState {
    at: Instant,
    counts: BTreeMap<String, u64>,
    rates: BTreeMap<String, f64>,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            inner: Mutex::new(RateState {
                at: Instant::now(),
                counts: BTreeMap::new(),
                rates: BTreeMap::new(),
            }),
        }
    }
}

impl Rates {
    /// Per node id: events (streams) or rows (views) per second.
    pub fn sample(&self, metrics: &Metrics) -> BTreeMap<String, f64> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = state.at.elapsed().as_secs_f64();
        if elapsed >= 1.0 || state.rates.is_empty() {
            let mut counts = BTreeMap::new();
            for (name, s) in &metrics.streams {
                counts.insert(format!("stream:{name}"), s.ingested.load(Ordering::Relaxed));
            }
            for (name, v) in metrics.views.all() {
                counts.insert(
                    format!("view:{name}"),
                    v.rows_written.load(Ordering::Relaxed),
                );
            }
            let seconds = elapsed.max(0.001);
            state.rates = counts
                .iter()
                .map(|(id, now)| {
                    let before = state.counts.get(id).copied().unwrap_or(0);
                    (id.clone(), now.saturating_sub(before) as f64 / seconds)
                })
                .collect();
            state.counts = counts;
            state.at = Instant::now();
        }
        state.rates.clone()
    }
}

/// The figures of every node, from the metrics.
pub fn live(
    graph: &Graph,
    metrics: &Metrics,
    rates: &BTreeMap<String, f64>,
) -> BTreeMap<String, Value> {
    let now = crate::obs::now_ms();
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let mut out = BTreeMap::new();
    for n in &graph.nodes {
        let figures = if let Some(name) = n.id.strip_prefix("stream:") {
            metrics.streams.get(name).map(|s| {
                json!({
                    "events_per_s": round(rates.get(&n.id).copied().unwrap_or(0.0)),
                    "events": s.ingested.load(Ordering::Relaxed),
                    "rejected": s.rejected_total(),
                    "late_events": s.late.load(Ordering::Relaxed),
                    "watermark": s.watermark().map(crate::obs::format_time),
                    "watermark_lag_ms": s.watermark().map(|w| now.saturating_sub(w)),
                })
            })
        } else if let Some(name) = n.id.strip_prefix("view:") {
            metrics.views.get(name).map(|v| {
                json!({
                    "rows_per_s": round(rates.get(&n.id).copied().unwrap_or(0.0)),
                    "rows_written": v.rows_written.load(Ordering::Relaxed),
                    "late_events": v.late.load(Ordering::Relaxed),
                    "state_keys": v.open_groups.load(Ordering::Relaxed),
                    "errors": v.errors.load(Ordering::Relaxed),
                })
            })
        } else if let Some(name) = n.id.strip_prefix("alert:") {
            metrics.alerts.get(name).map(|a| {
                json!({
                    "firing": a.firing.load(Ordering::Relaxed),
                    "opened": a.opened.load(Ordering::Relaxed),
                    "resolved": a.resolved.load(Ordering::Relaxed),
                    "state_keys": a.keys.load(Ordering::Relaxed),
                })
            })
        } else {
            None
        };
        if let Some(f) = figures {
            out.insert(n.id.clone(), f);
        }
    }
    out
}

/// The graph, or the part of it around `node`.
pub fn select(
    graph: &Graph,
    node: Option<&str>,
    direction: Option<&str>,
) -> Result<Graph, ApiError> {
    let direction = match direction {
        None | Some("") | Some("both") => Direction::Both,
        Some("upstream") => Direction::Upstream,
        Some("downstream") => Direction::Downstream,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "direction {other:?}: upstream, downstream or both"
            )))
        }
    };
    match node {
        None | Some("") => Ok(graph.clone()),
        Some(name) => {
            let node = graph.resolve(name).map_err(ApiError::not_found)?;
            Ok(graph.around(&node.id, direction))
        }
    }
}

pub async fn lineage(
    State(state): State<Arc<AppState>>,
    query: Result<Query<LineageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let format =
        Format::parse(q.format.as_deref().unwrap_or("json")).map_err(ApiError::bad_request)?;
    let graph = select(&state.lineage(), q.node.as_deref(), q.direction.as_deref())?;
    if format == Format::Json {
        let rates = state.rates.sample(&state.metrics);
        let mut body = serde_json::to_value(&graph).map_err(ApiError::internal)?;
        let figures = live(&graph, &state.metrics, &rates);
        if let Some(nodes) = body["nodes"].as_array_mut() {
            for node in nodes {
                if let Some(f) = node["id"].as_str().and_then(|id| figures.get(id)) {
                    node["live"] = f.clone();
                }
            }
        }
        return Ok(axum::Json(body).into_response());
    }
    let text = render(&graph, format, q.columns.unwrap_or(false));
    Ok(([(header::CONTENT_TYPE, format.content_type())], text).into_response())
}

/// The documentation site, live: `/docs/` and `/docs/{page}` (a page file,
/// `view-x.html`, or a name, `x`), with the current figures.
pub async fn docs_page(
    State(state): State<Arc<AppState>>,
    page: Option<axum::extract::Path<String>>,
) -> Result<Response, ApiError> {
    let rates = state.rates.sample(&state.metrics);
    let figures: crate::docs::Figures = live(&state.lineage(), &state.metrics, &rates)
        .into_iter()
        .map(|(id, v)| {
            let pairs = v
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| {
                            (
                                k.replace('_', " "),
                                v.to_string().trim_matches('"').to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            (id, pairs)
        })
        .collect();
    let config = state.docs_config.clone();
    let pages = crate::docs::site(&state.lineage(), &state.pipeline(), &config, &figures);
    let wanted = page.map(|p| p.0).unwrap_or_else(|| "index.html".into());
    let html = match pages.get(&wanted) {
        Some(h) => h.clone(),
        None => {
            let by_name = state
                .lineage()
                .resolve(&wanted)
                .ok()
                .and_then(crate::docs::page_of)
                .and_then(|p| pages.get(&p));
            match by_name {
                Some(h) => h.clone(),
                None => return Err(ApiError::not_found(format!("no docs page {wanted:?}"))),
            }
        }
    };
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response())
}

/// `/docs` -> `/docs/`, so that the pages' relative links resolve.
pub async fn docs_root() -> Response {
    axum::response::Redirect::permanent("/docs/").into_response()
}
