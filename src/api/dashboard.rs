//! The web dashboard (DESIGN §6 `GET /`): a single page and its assets,
//! embedded in the binary, and the two fleet endpoints it needs that the
//! generic API does not answer in one request at 100 000 terminals:
//!
//! - `GET /api/v1/fleet`: terminals online / offline / silent / low on
//!   battery, overall and by merchant, from the shipped `terminal_latest`
//!   view and the firing alerts of the shipped rules;
//! - `GET /api/v1/fleet/terminals?search=&limit=&cursor=`: a page of
//!   `terminal_latest` rows, searched on the server, each with the rules
//!   firing for it.
//!
//! Both read a summary of the fleet that is rebuilt at most every 5 seconds,
//! on the blocking pool. The page never holds the whole fleet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{blocking, decode_cursor, encode_cursor, parse_limit, ApiError, AppState};
use crate::alert::record::AlertState;

/// The view the fleet is read from, and the rules that say what is wrong.
pub const FLEET_VIEW: &str = "terminal_latest";
pub const OFFLINE_RULE: &str = "terminal_offline";
pub const SILENT_RULE: &str = "terminal_silent";
pub const LOW_BATTERY_RULE: &str = "low_battery";

/// (file, content type, bytes). The vendored library's version and licence
/// are in `src/api/dashboard/vendor/README.md`.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("dashboard/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("dashboard/app.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("dashboard/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("dashboard/vendor/uPlot.min.css"),
    ),
];

const INDEX: &str = include_str!("dashboard/index.html");

pub async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response()
}

pub async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *bytes,
        )
            .into_response(),
        None => ApiError::not_found(format!("no dashboard file {file:?}")).into_response(),
    }
}

/// What the fleet endpoints answer from.
#[derive(Debug, Default)]
pub struct FleetSummary {
    /// Rule -> keys it is firing for.
    firing: BTreeMap<String, BTreeSet<String>>,
    body: Value,
}

#[derive(Debug, Default)]
pub struct FleetCache {
    inner: Mutex<Option<(Instant, Arc<FleetSummary>)>>,
}

const FRESH: Duration = Duration::from_secs(5);

impl FleetCache {
    async fn get(&self, state: &Arc<AppState>) -> Result<Arc<FleetSummary>, ApiError> {
        if let Some((at, s)) = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if at.elapsed() < FRESH {
                return Ok(s.clone());
            }
        }
        let st = state.clone();
        let summary = Arc::new(blocking(move || summarize(&st)).await?);
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), summary.clone()));
        Ok(summary)
    }
}

fn summarize(state: &AppState) -> Result<FleetSummary, crate::store::StoreError> {
    let mut firing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let id: Option<crate::alert::record::AlertId> =
            cursor.as_deref().and_then(|c| c.try_into().ok());
        let page = state
            .store
            .alerts(None, id.as_ref(), 10_000, |a| a.state == AlertState::Firing)?;
        for a in &page.items {
            firing
                .entry(a.rule.clone())
                .or_default()
                .insert(a.key.clone());
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let empty = BTreeSet::new();
    let rule = |name: &str| firing.get(name).unwrap_or(&empty);
    let (offline, silent, low) = (
        rule(OFFLINE_RULE),
        rule(SILENT_RULE),
        rule(LOW_BATTERY_RULE),
    );
    let mut terminals = 0u64;
    let mut online = 0u64;
    // merchant -> [terminals, offline, silent, low battery]
    let mut merchants: HashMap<String, [u64; 4]> = HashMap::new();
    let has_view = state.pipeline().view(FLEET_VIEW).is_some();
    if has_view {
        state
            .store
            .scan_rows(FLEET_VIEW, None, None, None, usize::MAX, |row| {
                let row: serde_json::Map<String, Value> =
                    serde_json::from_str(row).unwrap_or_default();
                let id = row.get("terminal_id").and_then(Value::as_str).unwrap_or("");
                let merchant = row
                    .get("merchant_id")
                    .and_then(Value::as_str)
                    .unwrap_or("(none)");
                let m = merchants.entry(merchant.to_string()).or_default();
                terminals += 1;
                m[0] += 1;
                let (off, sil, lo) = (offline.contains(id), silent.contains(id), low.contains(id));
                if !off && !sil {
                    online += 1;
                }
                m[1] += u64::from(off);
                m[2] += u64::from(sil);
                m[3] += u64::from(lo);
                false // counted; nothing to keep
            })?;
    }
    let merchant_count = merchants.len();
    let mut by_merchant: Vec<(String, [u64; 4])> = merchants.into_iter().collect();
    by_merchant.sort_by(|a, b| {
        (b.1[1] + b.1[2] + b.1[3], b.1[0])
            .cmp(&(a.1[1] + a.1[2] + a.1[3], a.1[0]))
            .then(a.0.cmp(&b.0))
    });
    by_merchant.truncate(20);
    let body = json!({
        "view": has_view.then_some(FLEET_VIEW),
        "terminals": terminals,
        "online": online,
        "offline": offline.len(),
        "silent": silent.len(),
        "low_battery": low.len(),
        "merchants": merchant_count,
        "by_merchant": by_merchant.iter().map(|(m, c)| json!({
            "merchant_id": m, "terminals": c[0], "offline": c[1], "silent": c[2], "low_battery": c[3]
        })).collect::<Vec<_>>(),
        "rules": {"offline": OFFLINE_RULE, "silent": SILENT_RULE, "low_battery": LOW_BATTERY_RULE},
    });
    Ok(FleetSummary { firing, body })
}

pub async fn fleet(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let summary = state.fleet.get(&state).await?;
    Ok(axum::Json(summary.body.clone()).into_response())
}

pub async fn terminals(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    if state.pipeline().view(FLEET_VIEW).is_none() {
        return Err(ApiError::not_found(format!(
            "the fleet is read from the view {FLEET_VIEW}, which this weir does not define"
        )));
    }
    if let Some(unknown) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "search" | "limit" | "cursor"))
    {
        return Err(ApiError::bad_request(format!(
            "unknown parameter {unknown:?} (known: search, limit, cursor)"
        )));
    }
    let limit = parse_limit(&params)?;
    let cursor = params.get("cursor").map(|c| decode_cursor(c)).transpose()?;
    let search = params
        .get("search")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default();
    if search.len() > 256 {
        return Err(ApiError::bad_request("search: at most 256 bytes"));
    }
    let summary = state.fleet.get(&state).await?;
    let st = state.clone();
    let page = blocking(move || {
        st.store
            .scan_rows(FLEET_VIEW, None, None, cursor.as_deref(), limit, |row| {
                search.is_empty() || {
                    let row: serde_json::Map<String, Value> =
                        serde_json::from_str(row).unwrap_or_default();
                    ["terminal_id", "merchant_id"].iter().any(|c| {
                        row.get(*c)
                            .and_then(Value::as_str)
                            .is_some_and(|v| v.to_lowercase().contains(&search))
                    })
                }
            })
    })
    .await?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|r| {
            let mut row: Value = serde_json::from_str(&r.json).unwrap_or(Value::Null);
            let id = row["terminal_id"].as_str().unwrap_or("").to_string();
            let rules: Vec<&str> = summary
                .firing
                .iter()
                .filter(|(_, keys)| keys.contains(&id))
                .map(|(rule, _)| rule.as_str())
                .collect();
            row["alerts"] = json!(rules);
            row
        })
        .collect();
    Ok((
        StatusCode::OK,
        axum::Json(json!({"items": items, "next_cursor": page.next.as_deref().map(encode_cursor)})),
    )
        .into_response())
}
