//! Webhooks (DESIGN §5, `[[alerts.webhook]]`): a local HTTP server answers
//! the first POST with 500; weir retries with backoff and the notification
//! arrives, with the configured header, for the rules the webhook asked for
//! only. A webhook that never answers 2xx is given up and counted. None of
//! it holds the pipeline up.

use crate::common;

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::*;
use serde_json::Value;
use weir::config::WebhookConfig;

/// Rules over `common::battery_pipeline`'s telemetry stream (idle timeout 1h).
const RULES: &str = "
CREATE ALERT battery_flat
WITH (severity = 'critical', clear = 'battery_pct >= 20')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 5;

CREATE ALERT battery_full
WITH (severity = 'info')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct > 99;
";

#[derive(Default)]
struct Received {
    /// (authorization header, body) of every request, in order.
    requests: Vec<(String, Value)>,
}

/// A webhook receiver on port 0 that fails its first `fail_first` requests
/// with 500. Returns its URL and what it received.
async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    let app =
        axum::Router::new()
            .route(
                "/hook",
                post(
                    move |State(r): State<Arc<Mutex<Received>>>,
                          headers: HeaderMap,
                          body: String| async move {
                        let auth = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let mut r = r.lock().expect("lock");
                        r.requests
                            .push((auth, serde_json::from_str(&body).unwrap_or(Value::Null)));
                        if r.requests.len() <= fail_first {
                            StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            StatusCode::NO_CONTENT
                        }
                    },
                ),
            )
            .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), received)
}

fn hook(url: &str, name: &str, rules: &[&str], max_attempts: u32) -> WebhookConfig {
    let config: WebhookConfig = toml::from_str(&format!(
        "url = {url:?}\nname = {name:?}\nbackoff = \"50ms\"\nmax_attempts = {max_attempts}\n\
         headers = {{ Authorization = \"Bearer s3cret\" }}"
    ))
    .expect("webhook config");
    WebhookConfig {
        rules: rules.iter().map(|r| r.to_string()).collect(),
        ..config
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_retried_after_a_500_and_filtered_by_rule() {
    let (flaky_url, flaky) = receiver(1).await;
    let (broken_url, broken) = receiver(usize::MAX).await;
    let pipeline = battery_pipeline("1h", RULES);
    let weir = Weir::start_tweaked(&[("p.sql", &pipeline)], None, |c| {
        c.alerts.webhook = vec![
            hook(&flaky_url, "oncall", &["battery_flat"], 8),
            hook(&broken_url, "broken", &[], 3),
        ];
    })
    .await;

    let events = [(0, 3.0), (10, 100.0), (20, 50.0)]
        .iter()
        .map(|(s, b)| format!(r#"{{"ts": {}, "battery_pct": {b}}}"#, T0 + s * 1000))
        .collect::<Vec<_>>()
        .join(",");
    weir.publish(&[("terminals/W1/telemetry", format!("[{events}]"))])
        .await;

    // battery_flat opened (at 0 s) and resolved (at 10 s); battery_full
    // opened and resolved too, but "oncall" only wants battery_flat.
    let requests = wait_for("the flaky webhook to get both changes", || async {
        let r = flaky.lock().ok()?;
        (r.requests.len() >= 3).then(|| r.requests.clone())
    })
    .await;
    assert_eq!(
        requests.len(),
        3,
        "one failure, then two deliveries: {requests:#?}"
    );
    assert_eq!(requests[0], requests[1], "the same notification, retried");
    for (auth, body) in &requests {
        assert_eq!(auth, "Bearer s3cret");
        assert_eq!(body["alert"]["rule"], "battery_flat", "{body}");
        assert_eq!(body["alert"]["key"], "W1");
    }
    assert_eq!(requests[1].1["change"], "opened");
    assert_eq!(requests[2].1["change"], "resolved");
    assert_eq!(requests[2].1["alert"]["cleared_by"]["battery_pct"], 100.0);

    // The broken one saw every rule's changes, each tried max_attempts
    // times, and gave them up.
    let metrics = wait_for("the broken webhook to give up on all four", || async {
        let m = weir.metrics().await;
        (common::process::metric_value(
            &m,
            "weir_alert_notifications_failed_total{channel=\"broken\"}",
        )? >= 4.0)
            .then_some(m)
    })
    .await;
    assert_eq!(broken.lock().expect("lock").requests.len(), 4 * 3);
    let value = |name: &str| common::process::metric_value(&metrics, name).unwrap_or(-1.0);
    assert_eq!(
        value("weir_alert_notifications_sent_total{channel=\"oncall\"}"),
        2.0
    );
    assert_eq!(
        value("weir_alert_notifications_retries_total{channel=\"oncall\"}"),
        1.0
    );
    assert_eq!(
        value("weir_alert_notifications_failed_total{channel=\"oncall\"}"),
        0.0
    );
    assert_eq!(
        value("weir_alert_notifications_retries_total{channel=\"broken\"}"),
        8.0
    );

    // The pipeline went on meanwhile: the alerts are stored.
    let all = weir.get_ok("/api/v1/alerts").await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(2), "{all}");
    weir.stop().await;
}
