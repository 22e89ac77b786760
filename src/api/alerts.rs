//! `/api/v1/alerts`: list, one alert with its history, acknowledge, and the
//! server-sent event stream of every change (DESIGN §5, §6).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::{blocking, parse_limit, parse_time, ApiError, AppState};
use crate::alert::record::{id_text, parse_id};
use crate::alert::{AlertId, AlertState, Severity};
use crate::obs::now_ms;

fn alert_id(text: &str) -> Result<AlertId, ApiError> {
    parse_id(text).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{text:?} is not an alert id (32 hexadecimal digits)"
        ))
    })
}

fn parse_state(text: &str) -> Result<AlertState, ApiError> {
    match text {
        "firing" => Ok(AlertState::Firing),
        "resolved" => Ok(AlertState::Resolved),
        other => Err(ApiError::bad_request(format!(
            "state must be firing or resolved, got {other:?}"
        ))),
    }
}

/// `GET /api/v1/alerts?state=&rule=&key=&severity=&since=&limit=&cursor=`:
/// newest first (by `opened_at`); `since` keeps alerts opened at or after it.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    super::reject_unknown(
        &params,
        &[
            "state", "rule", "key", "severity", "since", "limit", "cursor",
        ],
    )?;
    let limit = parse_limit(&params)?;
    let cursor = params.get("cursor").map(|c| alert_id(c)).transpose()?;
    let wanted_state = params.get("state").map(|s| parse_state(s)).transpose()?;
    let severity = params
        .get("severity")
        .map(|s| s.parse::<Severity>().map_err(ApiError::bad_request))
        .transpose()?;
    let since = params
        .get("since")
        .map(|t| parse_time("since", t))
        .transpose()?;
    let rule = params.get("rule").cloned();
    let key = params.get("key").cloned();
    let st = state.clone();
    let page = blocking(move || {
        st.store.alerts(since, cursor.as_ref(), limit, |a| {
            wanted_state.is_none_or(|s| a.state == s)
                && severity.is_none_or(|s| a.severity == s)
                && rule.as_ref().is_none_or(|r| &a.rule == r)
                && key.as_ref().is_none_or(|k| &a.key == k)
        })
    })
    .await?;
    let items: Vec<String> = page.items.iter().map(|a| a.api_json()).collect();
    Ok(super::raw_list(&items, page.next.as_deref()))
}

/// `GET /api/v1/alerts/{id}`: the alert and its history, oldest first.
pub async fn one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = alert_id(&id)?;
    let st = state.clone();
    let (alert, history) = blocking(move || {
        let alert = st.store.get_alert(&id)?;
        let history = st.store.alert_history(&id)?;
        Ok((alert, history))
    })
    .await?;
    let Some(alert) = alert else {
        return Err(ApiError::not_found(format!(
            "no alert with id {}",
            id_text(&id)
        )));
    };
    let history: Vec<Value> = history
        .iter()
        .filter_map(|h| serde_json::from_str(h).ok())
        .collect();
    Ok(json_text(alert.api_json_with_history(&history)))
}

fn json_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `POST /api/v1/alerts/{id}/ack`: acknowledges (idempotent: acknowledging
/// again keeps the first `acked_at`). Answers the alert.
pub async fn ack(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = alert_id(&id)?;
    let st = state.clone();
    let outcome = blocking(move || crate::sink::ack_alert(&st.store, &id, now_ms())).await?;
    let Some((alert, event)) = outcome else {
        return Err(ApiError::not_found(format!(
            "no alert with id {}",
            id_text(&id)
        )));
    };
    if let Some(event) = event {
        state.metrics.alert_acks.fetch_add(1, Ordering::Relaxed);
        state.notifier.notify(event);
    }
    Ok(json_text(alert.api_json()))
}

/// `GET /api/v1/alerts/stream?rule=&key=`: one server-sent event per change,
/// named after it (`opened`, `resolved`, `acked`), whose data is
/// `{"change", "at", "alert"}`; a comment first, then keep-alive comments.
/// A client too slow to keep up gets a `lagged` event with the number of
/// events it missed (re-read `GET /api/v1/alerts` then); the pipeline never
/// waits for it.
/// Alert streams (SSE) open at once, at most.
pub const MAX_SSE_CLIENTS: usize = 1024;

pub async fn stream(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    super::reject_unknown(&params, &["rule", "key"])?;
    let rule = params.get("rule").cloned();
    let key = params.get("key").cloned();
    if let Some(r) = &rule {
        if state.pipeline().alert(r).is_none() {
            return Err(ApiError::bad_request(format!(
                "no alert rule is named {r:?}"
            )));
        }
    }
    // Each client holds a receiver of the notification channel: a cap, so
    // that clients opening streams without end cannot grow weir.
    if state.notifier.sse_clients() >= MAX_SSE_CLIENTS {
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("{MAX_SSE_CLIENTS} alert streams are open already; try again later"),
        ));
    }
    let rx = state.notifier.subscribe();
    let shutdown = state.shutdown.clone();
    let hello = futures::stream::once(async {
        Ok(Event::default().comment("weir alert stream: one event per alert change"))
    });
    let events = futures::stream::unfold(
        (rx, shutdown, state.clone()),
        move |(mut rx, shutdown, state)| {
            let (rule, key) = (rule.clone(), key.clone());
            async move {
                loop {
                    let received = tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        r = rx.recv() => r,
                    };
                    let event = match received {
                        Ok(e) => e,
                        Err(RecvError::Lagged(missed)) => {
                            state.notifier.sse_lagged(missed);
                            let sse = Event::default()
                                .event("lagged")
                                .data(json!({"missed": missed}).to_string());
                            return Some((Ok(sse), (rx, shutdown, state)));
                        }
                        Err(RecvError::Closed) => return None,
                    };
                    if rule.as_ref().is_some_and(|r| r != &event.alert.rule)
                        || key.as_ref().is_some_and(|k| k != &event.alert.key)
                    {
                        continue;
                    }
                    let sse = Event::default()
                        .event(event.change.as_str())
                        .data(event.api_json());
                    return Some((Ok(sse), (rx, shutdown, state)));
                }
            }
        },
    );
    use futures::StreamExt;
    Ok(Sse::new(hello.chain(events)).keep_alive(KeepAlive::new().interval(state.sse_keepalive)))
}
