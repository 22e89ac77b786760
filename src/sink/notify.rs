//! Alert notifications: the SSE hub, MQTT and webhooks.
//!
//! The pipeline (and the API, for acks) hands every [`AlertEvent`] to
//! [`Notifier::notify`], which never waits:
//!
//! - **SSE**: a `tokio::sync::broadcast` channel. A client that falls more
//!   than [`SSE_BUFFER`] events behind misses events and is told so (the API
//!   sends it a `lagged` event); the pipeline is never slowed by it.
//! - **MQTT**: a bounded queue to a task of its own that publishes each
//!   alert, retained at QoS 1, to `weir/alerts/{rule}/{key}`, so a client
//!   that subscribes later gets the current state of every alert.
//! - **Webhooks**: a bounded queue per `[[alerts.webhook]]`, drained by a
//!   task that POSTs `{"change", "at", "alert"}` and retries with
//!   exponential backoff on connection errors, 5xx and 429; other 4xx are
//!   not retried. Deliveries are in order, one at a time per webhook.
//!
//! A full queue drops the notification and counts it
//! (`weir_alert_notifications_dropped_total`); the alert itself is stored
//! either way and the API serves it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::alert::AlertEvent;
use crate::config::WebhookConfig;

/// Events an SSE client may fall behind before it misses some.
pub const SSE_BUFFER: usize = 4096;
/// Notifications waiting for the MQTT publisher.
const MQTT_QUEUE: usize = 4096;
/// Longest wait between two webhook attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Counters of one notification channel.
#[derive(Debug, Default)]
pub struct ChannelMetrics {
    pub name: String,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    pub dropped: AtomicU64,
    pub queued: AtomicU64,
}

impl ChannelMetrics {
    fn named(name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            ..Self::default()
        })
    }
}

struct Webhook {
    rules: Vec<String>,
    tx: mpsc::Sender<Arc<AlertEvent>>,
    metrics: Arc<ChannelMetrics>,
}

/// Fans alert events out; cheap to share.
pub struct Notifier {
    sse: broadcast::Sender<Arc<AlertEvent>>,
    mqtt: Option<(mpsc::Sender<Arc<AlertEvent>>, Arc<ChannelMetrics>)>,
    webhooks: Vec<Webhook>,
    /// SSE, MQTT (when on), then each webhook.
    pub channels: Vec<Arc<ChannelMetrics>>,
}

/// Where the MQTT notifications go.
#[derive(Clone)]
pub enum MqttTarget {
    /// weir's own server: published in-process, as weir (no client, no
    /// credentials; nobody else may publish under `weir/alerts/`).
    /// A resolved alert's notification expires after `resolved_expiry`
    /// (`alerts.mqtt_resolved_expiry`).
    Embedded {
        publisher: crate::source::server::Publisher,
        resolved_expiry: Duration,
    },
    /// The operator's broker, as a client.
    External(ExternalTarget),
}

#[derive(Debug, Clone)]
pub struct ExternalTarget {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `mqtts://`: the TLS client config.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Notifier {
    /// Starts the MQTT publisher and webhook tasks on `handle`.
    pub fn start(
        handle: &tokio::runtime::Handle,
        mqtt: Option<MqttTarget>,
        webhooks: &[WebhookConfig],
        shutdown: CancellationToken,
    ) -> Result<Notifier, String> {
        let (sse, _) = broadcast::channel(SSE_BUFFER);
        let sse_metrics = ChannelMetrics::named("sse");
        let mut channels = vec![sse_metrics];
        let mqtt = mqtt.map(|target| {
            let (tx, rx) = mpsc::channel(MQTT_QUEUE);
            let metrics = ChannelMetrics::named("mqtt");
            channels.push(metrics.clone());
            match target {
                MqttTarget::Embedded {
                    publisher,
                    resolved_expiry,
                } => handle.spawn(publish_embedded(
                    publisher,
                    rx,
                    metrics.clone(),
                    resolved_expiry,
                    shutdown.clone(),
                )),
                MqttTarget::External(target) => {
                    handle.spawn(publish_mqtt(target, rx, metrics.clone(), shutdown.clone()))
                }
            };
            (tx, metrics)
        });
        let mut hooks = Vec::new();
        for (i, config) in webhooks.iter().enumerate() {
            let name = config.name.clone().unwrap_or_else(|| format!("webhook{i}"));
            let (tx, rx) = mpsc::channel(config.queue);
            let client = webhook_client(config).map_err(|e| format!("{name}: {e}"))?;
            let metrics = ChannelMetrics::named(name);
            channels.push(metrics.clone());
            handle.spawn(deliver_webhook(
                config.clone(),
                client,
                rx,
                metrics.clone(),
                shutdown.clone(),
            ));
            hooks.push(Webhook {
                rules: config.rules.clone(),
                tx,
                metrics,
            });
        }
        Ok(Notifier {
            sse,
            mqtt,
            webhooks: hooks,
            channels,
        })
    }

    /// Hands `event` to every channel; never waits.
    pub fn notify(&self, event: AlertEvent) {
        let event = Arc::new(event);
        // no subscriber is not an error
        if self.sse.send(event.clone()).is_ok() {
            self.channels[0].sent.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((tx, metrics)) = &self.mqtt {
            offer(tx, metrics, &event);
        }
        for hook in &self.webhooks {
            if hook.rules.is_empty() || hook.rules.contains(&event.alert.rule) {
                offer(&hook.tx, &hook.metrics, &event);
            }
        }
    }

    /// A new SSE client's receiver.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AlertEvent>> {
        self.sse.subscribe()
    }

    pub fn sse_clients(&self) -> usize {
        self.sse.receiver_count()
    }

    /// Counts events an SSE client missed.
    pub fn sse_lagged(&self, missed: u64) {
        self.channels[0]
            .dropped
            .fetch_add(missed, Ordering::Relaxed);
    }
}

fn offer(tx: &mpsc::Sender<Arc<AlertEvent>>, metrics: &ChannelMetrics, event: &Arc<AlertEvent>) {
    match tx.try_send(event.clone()) {
        Ok(()) => {
            metrics.queued.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The next notification of a channel's queue; `None` at shutdown.
async fn next_queued(
    rx: &mut mpsc::Receiver<Arc<AlertEvent>>,
    metrics: &ChannelMetrics,
    shutdown: &CancellationToken,
) -> Option<Arc<AlertEvent>> {
    let event = tokio::select! {
        _ = shutdown.cancelled() => None,
        event = rx.recv() => event,
    }?;
    metrics.queued.fetch_sub(1, Ordering::Relaxed);
    Some(event)
}

/// `weir/alerts/{rule}/{key}`; MQTT's special characters in the key become `_`.
pub fn alert_topic(rule: &str, key: &str) -> String {
    let clean: String = key
        .chars()
        .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
        .collect();
    let key = if clean.is_empty() { "_".into() } else { clean };
    format!("weir/alerts/{rule}/{key}")
}

/// Alerts into weir's own server, retained at QoS 1, as weir. A resolved
/// alert's notification expires after `resolved_expiry`, so the retained
/// set holds the firing alerts and the recently resolved ones, not every
/// rule and key that ever fired. (They do not count against
/// `mqtt.max_retained`, which bounds what clients retain.)
async fn publish_embedded(
    publisher: crate::source::server::Publisher,
    mut rx: mpsc::Receiver<Arc<AlertEvent>>,
    metrics: Arc<ChannelMetrics>,
    resolved_expiry: Duration,
    shutdown: CancellationToken,
) {
    while let Some(event) = next_queued(&mut rx, &metrics, &shutdown).await {
        let topic = alert_topic(&event.alert.rule, &event.alert.key);
        let payload = event.alert.api_json();
        let expiry = event.alert.resolved_at.is_some().then_some(resolved_expiry);
        if publisher
            .publish(&topic, payload.into_bytes().into(), true, expiry)
            .await
        {
            metrics.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            metrics.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn publish_mqtt(
    target: ExternalTarget,
    mut rx: mpsc::Receiver<Arc<AlertEvent>>,
    metrics: Arc<ChannelMetrics>,
    shutdown: CancellationToken,
) {
    let mut options = MqttOptions::new(target.client_id, target.host, target.port);
    options.set_keep_alive(Duration::from_secs(15));
    options.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(user) = target.username {
        options.set_credentials(user, target.password.unwrap_or_default());
    }
    if let Some(tls) = target.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    // The event loop runs on its own, so that a publish waiting for room in
    // the client's queue never stops the loop that empties it.
    let poll_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = poll_shutdown.cancelled() => break,
                event = eventloop.poll() => match event {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        // (the first attempt may race the embedded broker's start)
                        if failures == 3 {
                            tracing::warn!(error = %e, "alert publisher lost the broker; reconnecting");
                        }
                        let wait = Duration::from_millis(100 << failures.min(6));
                        tokio::time::sleep(wait).await;
                    }
                },
            }
        }
    });
    loop {
        let Some(event) = next_queued(&mut rx, &metrics, &shutdown).await else {
            break;
        };
        let topic = alert_topic(&event.alert.rule, &event.alert.key);
        let payload = event.alert.api_json();
        match client
            .publish(topic, QoS::AtLeastOnce, true, payload.into_bytes())
            .await
        {
            Ok(()) => metrics.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => metrics.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
    let _ = client.disconnect().await;
}

/// The HTTP client of one webhook: https through weir's rustls, trusting
/// the system's CAs and the webhook's `ca_file`.
fn webhook_client(config: &WebhookConfig) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().timeout(config.timeout);
    if config.url.starts_with("https://") {
        let tls = crate::tls::client_config(config.ca_file.as_deref(), None, None)
            .map_err(|e| e.to_string())?;
        builder = builder.use_preconfigured_tls((*tls).clone());
    }
    builder.build().map_err(|e| e.to_string())
}

async fn deliver_webhook(
    config: WebhookConfig,
    client: reqwest::Client,
    mut rx: mpsc::Receiver<Arc<AlertEvent>>,
    metrics: Arc<ChannelMetrics>,
    shutdown: CancellationToken,
) {
    loop {
        let Some(event) = next_queued(&mut rx, &metrics, &shutdown).await else {
            break;
        };
        let body = event.api_json();
        let mut wait = config.backoff;
        for attempt in 1..=config.max_attempts {
            let mut request = client
                .post(&config.url)
                .header("content-type", "application/json");
            for (name, value) in &config.headers {
                request = request.header(name, value);
            }
            let outcome = request.body(body.clone()).send().await;
            let retry = match &outcome {
                Ok(r) if r.status().is_success() => {
                    metrics.sent.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(r) => r.status().is_server_error() || r.status().as_u16() == 429,
                Err(_) => true,
            };
            let what = match &outcome {
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            if !retry || attempt == config.max_attempts {
                metrics.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(webhook = %metrics.name, alert = %event.alert.id, attempts = attempt, error = %what, "webhook notification given up");
                break;
            }
            metrics.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(webhook = %metrics.name, attempt, error = %what, "webhook failed; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_keep_mqtt_wildcards_out_of_keys() {
        assert_eq!(
            alert_topic("low_battery", "t-1"),
            "weir/alerts/low_battery/t-1"
        );
        assert_eq!(alert_topic("r", "a/b+#"), "weir/alerts/r/a_b__");
        assert_eq!(alert_topic("r", ""), "weir/alerts/r/_");
    }
}
