//! Observability: counters and gauges rendered in the Prometheus text format,
//! and tracing set-up.
//!
//! Streams and views are known at start, so every series is created once and
//! updated with relaxed atomics: no locks on the hot path.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::source::decode::RejectReason;

/// Bytes allocated and not yet freed, counted by the allocator of a build
/// with the `heap-gauge` feature (src/main.rs) and shown as
/// `weir_heap_live_bytes`: what the heap holds, against the RSS, which also
/// holds what the allocator keeps of freed memory.
pub static HEAP_LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

/// Counters of one source stream.
#[derive(Debug, Default)]
pub struct StreamMetrics {
    pub messages: AtomicU64,
    pub ingested: AtomicU64,
    /// Indexed like `RejectReason::ALL`.
    pub rejected: [AtomicU64; 5],
    pub late: AtomicU64,
    /// Epoch ms; `i64::MIN` until the first event.
    pub watermark: AtomicI64,
    pub max_event_time: AtomicI64,
}

impl StreamMetrics {
    fn new() -> Self {
        Self {
            watermark: AtomicI64::new(i64::MIN),
            max_event_time: AtomicI64::new(i64::MIN),
            ..Default::default()
        }
    }

    pub fn reject(&self, reason: RejectReason) {
        self.reject_n(reason, 1);
    }

    pub fn reject_n(&self, reason: RejectReason, n: u64) {
        let i = RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.rejected[i].fetch_add(n, Ordering::Relaxed);
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn watermark(&self) -> Option<i64> {
        Some(self.watermark.load(Ordering::Relaxed)).filter(|w| *w != i64::MIN)
    }
}

/// Counters of one view.
#[derive(Debug, Default)]
pub struct ViewMetrics {
    pub rows_written: AtomicU64,
    pub errors: AtomicU64,
    pub open_groups: AtomicU64,
    pub late: AtomicU64,
    /// Keys of an updating view that idled out (`key_ttl`).
    pub keys_evicted: AtomicU64,
}

/// Counters of one alert rule.
#[derive(Debug, Default)]
pub struct AlertMetrics {
    pub firing: AtomicU64,
    pub opened: AtomicU64,
    pub resolved: AtomicU64,
    pub keys: AtomicU64,
    pub errors: AtomicU64,
    /// Keys forgotten after `key_ttl` idle.
    pub keys_evicted: AtomicU64,
}

/// Series sets by name that a pipeline reload adds to and removes from.
#[derive(Debug)]
pub struct Registry<T> {
    inner: std::sync::RwLock<BTreeMap<String, Arc<T>>>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Self {
            inner: std::sync::RwLock::new(BTreeMap::new()),
        }
    }
}

impl<T: Default> Registry<T> {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<T>>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<T>> {
        self.read().get(name).cloned()
    }

    /// The series of `name`, created when new.
    pub fn get_or_add(&self, name: &str) -> Arc<T> {
        if let Some(m) = self.get(name) {
            return m;
        }
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    /// Keeps only these names (a reload removed the others).
    pub fn retain(&self, names: &std::collections::BTreeSet<&str>) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| names.contains(k.as_str()));
    }

    /// Every series set, sorted by name.
    pub fn all(&self) -> Vec<(String, Arc<T>)> {
        self.read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// All of weir's metrics. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub streams: BTreeMap<String, Arc<StreamMetrics>>,
    pub views: Registry<ViewMetrics>,
    pub alerts: Registry<AlertMetrics>,
    /// The notification channels (SSE, MQTT, webhooks), once started.
    pub notifications: std::sync::OnceLock<Vec<Arc<crate::sink::notify::ChannelMetrics>>>,
    /// Postgres sinks, once started.
    pub sinks: std::sync::OnceLock<Vec<Arc<crate::postgres::sink::SinkStatus>>>,
    pub alert_acks: AtomicU64,
    /// Messages with a topic no stream matches.
    pub unmatched_messages: AtomicU64,
    pub ingest_queue_depth: AtomicI64,
    pub ingest_queue_capacity: AtomicI64,
    pub pipeline_batches: AtomicU64,
    pub mqtt_connected: AtomicI64,
    pub mqtt_reconnects: AtomicU64,
    /// weir's own MQTT server.
    pub broker: BrokerMetrics,
    pub store_disk_bytes: AtomicU64,
    pub store_memtable_bytes: AtomicU64,
    pub store_cache_bytes: AtomicU64,
    pub store_errors: AtomicU64,
    /// HTTP requests refused by access control.
    pub http_denied: AtomicU64,
    /// Ad-hoc queries running now, cancelled at the timeout, turned away (all slots taken).
    pub queries_running: AtomicI64,
    pub queries_cancelled: AtomicU64,
    pub queries_refused: AtomicU64,
    /// Passes of retention and disk accounting.
    pub housekeeping_runs: AtomicU64,
    /// Bytes the dead letters take, and those deleted over the quota.
    pub deadletter_bytes: AtomicI64,
    pub deadletters_trimmed: AtomicU64,
    /// 0 while the store refuses writes (and nothing is acknowledged).
    pub store_healthy: AtomicI64,
    /// Nanoseconds the MQTT source waited on a full ingest queue.
    pub source_blocked_ns: AtomicU64,
    /// QoS 1 redeliveries recognised as already logged and dropped.
    pub duplicates_dropped: AtomicU64,
    pub log_records: AtomicU64,
    pub log_bytes: AtomicU64,
    /// Nanoseconds the pipeline spent appending to the ingest log.
    pub log_append_ns: AtomicU64,
    /// Nanoseconds the sync thread spent in fsync.
    pub log_sync_ns: AtomicU64,
    /// fsyncs of the ingest log (one per group of micro-batches).
    pub log_syncs: AtomicU64,
    pub log_truncated_records: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_last_ms: AtomicU64,
    /// Microseconds the pipeline stood still for the last checkpoint's snapshot.
    pub checkpoint_last_pause_us: AtomicU64,
    /// The longest such pause since start, microseconds.
    pub checkpoint_max_pause_us: AtomicU64,
    pub checkpoint_last_bytes: AtomicU64,
    /// What the last checkpoint wrote (the rest it reused).
    pub checkpoint_last_written_bytes: AtomicU64,
    pub checkpoint_chunks_written: AtomicU64,
    pub checkpoint_chunks_reused: AtomicU64,
    pub replayed_records: AtomicU64,
    pub replayed_events: AtomicU64,
    pub recovery_ms: AtomicU64,
}

/// weir's MQTT server (`source::server`).
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    pub connected: AtomicI64,
    pub connections_total: AtomicU64,
    pub messages_received: AtomicU64,
    pub deliveries: AtomicU64,
    /// Deliveries to subscribers dropped: a session's queue was full, or the
    /// message was larger than the client accepts.
    pub deliveries_dropped: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// CONNECTs with a wrong user name, password or certificate name.
    pub login_failures: AtomicU64,
    /// CONNECTs without credentials where a users file asks for them.
    pub logins_refused: AtomicU64,
    /// CONNECTs refused unchecked: too many failures from that address.
    pub logins_rate_limited: AtomicU64,
    /// PUBLISH, SUBSCRIBE and wills the ACL refused.
    pub acl_denied: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub sessions: AtomicI64,
    pub subscriptions: AtomicI64,
    pub retained: AtomicI64,
    /// Retained messages delivered but not kept: `mqtt.max_retained` or
    /// `mqtt.max_retained_bytes` was reached.
    pub retained_refused: AtomicI64,
}

impl Metrics {
    pub fn new<'a>(
        streams: impl IntoIterator<Item = &'a str>,
        views: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        Self {
            streams: streams
                .into_iter()
                .map(|s| (s.to_string(), Arc::new(StreamMetrics::new())))
                .collect(),
            store_healthy: AtomicI64::new(1),
            ..Default::default()
        }
        .with_views(views)
    }

    fn with_views<'a>(self, views: impl IntoIterator<Item = &'a str>) -> Self {
        for v in views {
            self.views.get_or_add(v);
        }
        self
    }

    /// Adds one series set per alert rule.
    pub fn with_alerts<'a>(self, rules: impl IntoIterator<Item = &'a str>) -> Self {
        for r in rules {
            self.alerts.get_or_add(r);
        }
        self
    }

    fn render_alerts(&self, out: &mut String) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let per_rule = |value: &dyn Fn(&AlertMetrics) -> u64| -> Vec<(String, String)> {
            self.alerts
                .all()
                .iter()
                .map(|(r, m)| (format!("rule=\"{r}\""), value(m).to_string()))
                .collect()
        };
        family(
            out,
            "weir_alerts_firing",
            "gauge",
            "Alerts open now, per rule.",
            per_rule(&|m| load(&m.firing)),
        );
        let transitions = self
            .alerts
            .all()
            .into_iter()
            .flat_map(|(r, m)| {
                [("opened", load(&m.opened)), ("resolved", load(&m.resolved))]
                    .into_iter()
                    .map(move |(c, v)| (format!("rule=\"{r}\",change=\"{c}\""), v.to_string()))
            })
            .collect();
        family(
            out,
            "weir_alert_transitions_total",
            "counter",
            "Alerts opened and resolved, per rule.",
            transitions,
        );
        family(
            out,
            "weir_alert_keys",
            "gauge",
            "Keys each rule tracks in memory.",
            per_rule(&|m| load(&m.keys)),
        );
        family(
            out,
            "weir_alert_keys_evicted_total",
            "counter",
            "Keys a rule forgot after key_ttl idle (an alert still open for one was resolved).",
            per_rule(&|m| load(&m.keys_evicted)),
        );
        family(
            out,
            "weir_alert_errors_total",
            "counter",
            "Batches a rule failed to evaluate or store.",
            per_rule(&|m| load(&m.errors)),
        );
        family(
            out,
            "weir_alert_acks_total",
            "counter",
            "Alerts acknowledged through the API.",
            vec![(String::new(), load(&self.alert_acks).to_string())],
        );
        let channels = self.notifications.get().map(Vec::as_slice).unwrap_or(&[]);
        let per_channel = |value: &dyn Fn(&crate::sink::notify::ChannelMetrics) -> u64| {
            channels
                .iter()
                .map(|c| (format!("channel=\"{}\"", c.name), value(c).to_string()))
                .collect::<Vec<_>>()
        };
        family(
            out,
            "weir_alert_notifications_sent_total",
            "counter",
            "Alert notifications delivered, per channel (sse: handed to connected clients).",
            per_channel(&|c| load(&c.sent)),
        );
        family(
            out,
            "weir_alert_notifications_failed_total",
            "counter",
            "Alert notifications given up after their last attempt, per channel.",
            per_channel(&|c| load(&c.failed)),
        );
        family(
            out,
            "weir_alert_notifications_retries_total",
            "counter",
            "Webhook attempts that failed and were retried.",
            per_channel(&|c| load(&c.retries)),
        );
        family(
            out,
            "weir_alert_notifications_dropped_total",
            "counter",
            "Notifications dropped because the channel's queue was full (sse: events a slow client missed).",
            per_channel(&|c| load(&c.dropped)),
        );
        family(
            out,
            "weir_alert_notifications_queued",
            "gauge",
            "Notifications waiting for delivery, per channel.",
            per_channel(&|c| load(&c.queued)),
        );
        let sinks = self.sinks.get().map(Vec::as_slice).unwrap_or(&[]);
        let per_sink = |value: &dyn Fn(&crate::postgres::sink::SinkStatus) -> String| {
            sinks
                .iter()
                .map(|s| (format!("sink=\"{}\"", s.name), value(s)))
                .collect::<Vec<_>>()
        };
        family(
            out,
            "weir_sink_rows_written_total",
            "counter",
            "Rows upserted into the sink's table (after folding a batch's rows of one key).",
            per_sink(&|s| load(&s.rows_written).to_string()),
        );
        family(
            out,
            "weir_sink_lag_rows",
            "gauge",
            "View rows written and not yet delivered to the sink.",
            per_sink(&|s| load(&s.lag_rows).to_string()),
        );
        family(
            out,
            "weir_sink_lag_seconds",
            "gauge",
            "Age of the oldest view row not yet delivered to the sink.",
            per_sink(&|s| format!("{:.3}", s.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0)),
        );
        family(
            out,
            "weir_sink_errors_total",
            "counter",
            "Failed delivery attempts (each retried with backoff).",
            per_sink(&|s| load(&s.errors).to_string()),
        );
    }

    /// The Prometheus text exposition of every series; `now` is epoch ms.
    pub fn render(&self, now: i64) -> String {
        let mut out = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let per_stream =
            |value: &dyn Fn(&StreamMetrics) -> Option<String>| -> Vec<(String, String)> {
                self.streams
                    .iter()
                    .filter_map(|(s, m)| value(m).map(|v| (format!("stream=\"{s}\""), v)))
                    .collect()
            };
        let per_view = |value: &dyn Fn(&ViewMetrics) -> u64| -> Vec<(String, String)> {
            self.views
                .all()
                .iter()
                .map(|(v, m)| (format!("view=\"{v}\""), value(m).to_string()))
                .collect()
        };

        let mut messages = per_stream(&|m| Some(load(&m.messages).to_string()));
        messages.push((
            "stream=\"\"".into(),
            load(&self.unmatched_messages).to_string(),
        ));
        family(
            &mut out,
            "weir_mqtt_messages_total",
            "counter",
            "MQTT messages received, per stream (\"\": matching no stream).",
            messages,
        );
        family(
            &mut out,
            "weir_ingested_events_total",
            "counter",
            "Events decoded and accepted, per stream.",
            per_stream(&|m| Some(load(&m.ingested).to_string())),
        );
        let rejected = self
            .streams
            .iter()
            .flat_map(|(s, m)| {
                RejectReason::ALL
                    .iter()
                    .enumerate()
                    .map(move |(i, reason)| {
                        (
                            format!("stream=\"{s}\",reason=\"{}\"", reason.as_str()),
                            m.rejected[i].load(Ordering::Relaxed).to_string(),
                        )
                    })
            })
            .collect();
        family(
            &mut out,
            "weir_rejected_events_total",
            "counter",
            "Messages or rows sent to the dead-letter store, per stream and reason.",
            rejected,
        );
        family(
            &mut out,
            "weir_late_events_total",
            "counter",
            "Events whose window had closed, per stream.",
            per_stream(&|m| Some(load(&m.late).to_string())),
        );
        family(
            &mut out,
            "weir_watermark_lag_seconds",
            "gauge",
            "Wall clock minus the stream's watermark.",
            per_stream(&|m| {
                m.watermark()
                    .map(|w| format!("{:.3}", (now - w) as f64 / 1000.0))
            }),
        );
        family(
            &mut out,
            "weir_watermark_timestamp_seconds",
            "gauge",
            "The stream's watermark, as a Unix time.",
            per_stream(&|m| m.watermark().map(|w| format!("{:.3}", w as f64 / 1000.0))),
        );
        family(
            &mut out,
            "weir_view_rows_written_total",
            "counter",
            "Rows written (upserted) to the store, per view.",
            per_view(&|m| load(&m.rows_written)),
        );
        family(
            &mut out,
            "weir_view_late_events_total",
            "counter",
            "Input rows left out of a closed window, per view.",
            per_view(&|m| load(&m.late)),
        );
        family(
            &mut out,
            "weir_view_errors_total",
            "counter",
            "Batches a view failed to evaluate.",
            per_view(&|m| load(&m.errors)),
        );
        family(
            &mut out,
            "weir_view_keys_evicted_total",
            "counter",
            "Keys of an updating view dropped from memory after idling longer than key_ttl.",
            per_view(&|m| load(&m.keys_evicted)),
        );
        family(
            &mut out,
            "weir_view_open_groups",
            "gauge",
            "Open (key, window) groups held in memory, per view.",
            per_view(&|m| load(&m.open_groups)),
        );
        let seconds = |c: &AtomicU64| format!("{:.3}", load(c) as f64 / 1e9);
        let more: [(&str, &str, &str, String); 20] = [
            (
                "weir_store_healthy",
                "gauge",
                "0 while the store refuses writes; weir then acknowledges nothing.",
                self.store_healthy.load(Ordering::Relaxed).to_string(),
            ),
            (
                "weir_source_blocked_seconds_total",
                "counter",
                "Time the MQTT source waited on a full ingest queue (backpressure).",
                seconds(&self.source_blocked_ns),
            ),
            (
                "weir_duplicates_dropped_total",
                "counter",
                "QoS 1 redeliveries (DUP) already in the ingest log, acknowledged and dropped.",
                load(&self.duplicates_dropped).to_string(),
            ),
            (
                "weir_log_records_total",
                "counter",
                "Records appended to the ingest log.",
                load(&self.log_records).to_string(),
            ),
            (
                "weir_log_bytes_total",
                "counter",
                "Bytes appended to the ingest log.",
                load(&self.log_bytes).to_string(),
            ),
            (
                "weir_log_append_seconds_total",
                "counter",
                "Time the pipeline spent appending to the ingest log.",
                seconds(&self.log_append_ns),
            ),
            (
                "weir_log_sync_seconds_total",
                "counter",
                "Time the sync thread spent in fsync (durability = \"sync\").",
                seconds(&self.log_sync_ns),
            ),
            (
                "weir_log_syncs_total",
                "counter",
                "fsyncs of the ingest log, each for every micro-batch queued since the one before.",
                load(&self.log_syncs).to_string(),
            ),
            (
                "weir_log_truncated_records_total",
                "counter",
                "Log records deleted by retention.",
                load(&self.log_truncated_records).to_string(),
            ),
            (
                "weir_checkpoints_total",
                "counter",
                "Checkpoints written.",
                load(&self.checkpoints).to_string(),
            ),
            (
                "weir_checkpoint_last_duration_seconds",
                "gauge",
                "How long the last checkpoint took (snapshot, write, sync).",
                format!("{:.3}", load(&self.checkpoint_last_ms) as f64 / 1000.0),
            ),
            (
                "weir_checkpoint_last_pause_seconds",
                "gauge",
                "How long the pipeline stood still for the last checkpoint's snapshot.",
                format!("{:.6}", load(&self.checkpoint_last_pause_us) as f64 / 1e6),
            ),
            (
                "weir_checkpoint_max_pause_seconds",
                "gauge",
                "The longest the pipeline stood still for a checkpoint's snapshot since start.",
                format!("{:.6}", load(&self.checkpoint_max_pause_us) as f64 / 1e6),
            ),
            (
                "weir_checkpoint_last_bytes",
                "gauge",
                "Size of the last checkpoint's operator state.",
                load(&self.checkpoint_last_bytes).to_string(),
            ),
            (
                "weir_checkpoint_last_written_bytes",
                "gauge",
                "What the last checkpoint wrote: the chunks of state that changed since the one before, and headers.",
                load(&self.checkpoint_last_written_bytes).to_string(),
            ),
            (
                "weir_checkpoint_chunks_written_total",
                "counter",
                "Chunks of operator state written by checkpoints.",
                load(&self.checkpoint_chunks_written).to_string(),
            ),
            (
                "weir_checkpoint_chunks_reused_total",
                "counter",
                "Chunks of operator state a checkpoint took from the one before, unchanged.",
                load(&self.checkpoint_chunks_reused).to_string(),
            ),
            (
                "weir_replayed_records_total",
                "counter",
                "Log records replayed at start-up.",
                load(&self.replayed_records).to_string(),
            ),
            (
                "weir_replayed_events_total",
                "counter",
                "Events replayed from the log at start-up.",
                load(&self.replayed_events).to_string(),
            ),
            (
                "weir_recovery_seconds",
                "gauge",
                "Time from start to the end of replay.",
                format!("{:.3}", load(&self.recovery_ms) as f64 / 1000.0),
            ),
        ];
        for (name, kind, help, value) in more {
            family(&mut out, name, kind, help, vec![(String::new(), value)]);
        }
        let b = &self.broker;
        let single: [(&str, &str, &str, i64); 31] = [
            (
                "weir_mqtt_sessions",
                "gauge",
                "Sessions weir's MQTT server holds, online and offline.",
                b.sessions.load(Ordering::Relaxed),
            ),
            (
                "weir_mqtt_subscriptions",
                "gauge",
                "Subscriptions in weir's MQTT server.",
                b.subscriptions.load(Ordering::Relaxed),
            ),
            (
                "weir_mqtt_retained_messages",
                "gauge",
                "Retained messages weir's MQTT server holds.",
                b.retained.load(Ordering::Relaxed),
            ),
            (
                "weir_mqtt_retained_refused_total",
                "counter",
                "Retained messages delivered but not kept: clients' retained messages reached mqtt.max_retained or mqtt.max_retained_bytes.",
                b.retained_refused.load(Ordering::Relaxed),
            ),
            (
                "weir_mqtt_clients_connected",
                "gauge",
                "Clients connected to weir's MQTT server.",
                b.connected.load(Ordering::Relaxed),
            ),
            (
                "weir_mqtt_connections_total",
                "counter",
                "Connections weir's MQTT server accepted.",
                load(&b.connections_total) as i64,
            ),
            (
                "weir_mqtt_messages_received_total",
                "counter",
                "PUBLISH packets (and wills) weir's MQTT server took in.",
                load(&b.messages_received) as i64,
            ),
            (
                "weir_mqtt_deliveries_total",
                "counter",
                "Messages weir's MQTT server routed to subscribers.",
                load(&b.deliveries) as i64,
            ),
            (
                "weir_mqtt_deliveries_dropped_total",
                "counter",
                "Deliveries to subscribers dropped (session queue full, or larger than the client accepts).",
                load(&b.deliveries_dropped) as i64,
            ),
            (
                "weir_mqtt_protocol_errors_total",
                "counter",
                "Connections closed for a protocol violation.",
                load(&b.protocol_errors) as i64,
            ),
            (
                "weir_mqtt_login_failures_total",
                "counter",
                "MQTT CONNECTs refused for a wrong user name, password or certificate name.",
                load(&b.login_failures) as i64,
            ),
            (
                "weir_mqtt_logins_refused_total",
                "counter",
                "MQTT CONNECTs refused for having no credentials (a users file is configured).",
                load(&b.logins_refused) as i64,
            ),
            (
                "weir_mqtt_logins_rate_limited_total",
                "counter",
                "MQTT CONNECTs refused unchecked after too many failed logins from their address.",
                load(&b.logins_rate_limited) as i64,
            ),
            (
                "weir_mqtt_acl_denied_total",
                "counter",
                "MQTT publishes, subscriptions and wills refused by the access rules.",
                load(&b.acl_denied) as i64,
            ),
            (
                "weir_mqtt_tls_handshake_failures_total",
                "counter",
                "TLS handshakes on weir's MQTT TLS listener that failed.",
                load(&b.tls_handshake_failures) as i64,
            ),
            (
                "weir_http_requests_denied_total",
                "counter",
                "HTTP requests refused: no or unknown token, missing scope, Host, Origin or Content-Type.",
                load(&self.http_denied) as i64,
            ),
            (
                "weir_deadletter_bytes",
                "gauge",
                "Bytes the dead letters take in the store.",
                self.deadletter_bytes.load(Ordering::Relaxed),
            ),
            (
                "weir_deadletters_trimmed_total",
                "counter",
                "Oldest dead letters deleted because they took more than storage.deadletter_max_bytes.",
                load(&self.deadletters_trimmed) as i64,
            ),
            (
                "weir_housekeeping_runs_total",
                "counter",
                "Passes of retention (log, views by event time, alerts, dead letters) and disk accounting.",
                load(&self.housekeeping_runs) as i64,
            ),
            (
                "weir_queries_running",
                "gauge",
                "Ad-hoc queries running in the query sandbox.",
                self.queries_running.load(Ordering::Relaxed),
            ),
            (
                "weir_queries_cancelled_total",
                "counter",
                "Ad-hoc queries cancelled at http.query_timeout.",
                load(&self.queries_cancelled) as i64,
            ),
            (
                "weir_queries_refused_total",
                "counter",
                "Ad-hoc queries turned away because http.query_concurrency were running.",
                load(&self.queries_refused) as i64,
            ),
            (
                "weir_ingest_queue_depth",
                "gauge",
                "Messages waiting between the MQTT source and the pipeline.",
                self.ingest_queue_depth.load(Ordering::Relaxed),
            ),
            (
                "weir_ingest_queue_capacity",
                "gauge",
                "Capacity of that queue; when full, weir stops reading from the broker.",
                self.ingest_queue_capacity.load(Ordering::Relaxed),
            ),
            (
                "weir_pipeline_batches_total",
                "counter",
                "Micro-batches run through the pipeline.",
                load(&self.pipeline_batches) as i64,
            ),
            (
                "weir_mqtt_connected",
                "gauge",
                "Subscribed connections to an external broker (1 with weir's own server, once it accepts clients).",
                self.mqtt_connected.load(Ordering::Relaxed),
            ),
            (
                "weir_mqtt_reconnects_total",
                "counter",
                "Connection errors after which the source reconnected.",
                load(&self.mqtt_reconnects) as i64,
            ),
            (
                "weir_store_disk_bytes",
                "gauge",
                "Bytes the store uses on disk.",
                load(&self.store_disk_bytes) as i64,
            ),
            (
                "weir_store_memtable_bytes",
                "gauge",
                "Bytes the store holds in memtables (every keyspace), sampled each second.",
                load(&self.store_memtable_bytes) as i64,
            ),
            (
                "weir_store_cache_bytes",
                "gauge",
                "Bytes the store holds in its block cache, sampled each second.",
                load(&self.store_cache_bytes) as i64,
            ),
            (
                "weir_store_errors_total",
                "counter",
                "Failed store writes.",
                load(&self.store_errors) as i64,
            ),
        ];
        for (name, kind, help, value) in single {
            family(
                &mut out,
                name,
                kind,
                help,
                vec![(String::new(), value.to_string())],
            );
        }
        #[cfg(feature = "heap-gauge")]
        family(
            &mut out,
            "weir_heap_live_bytes",
            "gauge",
            "Bytes allocated and not freed (builds with the heap-gauge feature).",
            vec![(
                String::new(),
                HEAP_LIVE_BYTES.load(Ordering::Relaxed).to_string(),
            )],
        );
        self.render_alerts(&mut out);
        out
    }
}

/// One metric family: HELP, TYPE, and a line per (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, series: Vec<(String, String)>) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in series {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// What `/healthz` reports: `None` while healthy, else why not.
#[derive(Debug, Default)]
pub struct Health {
    problem: std::sync::Mutex<Option<String>>,
    /// Working, without something outside weir: what is missing -> why
    /// (`postgres:backoffice` -> the error). `/readyz` stays 200 and says so.
    degraded: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl Health {
    /// Marks `what` degraded; true when it was not already.
    pub fn degrade(&self, what: &str, why: String) -> bool {
        self.degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(what.to_string(), why)
            .is_none()
    }

    /// `what` works again; true when it was degraded.
    pub fn recover(&self, what: &str) -> bool {
        self.degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(what)
            .is_some()
    }

    pub fn degraded(&self) -> std::collections::BTreeMap<String, String> {
        self.degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn fail(&self, why: String) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    pub fn clear(&self) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Logs to stderr; `WEIR_LOG` (or `RUST_LOG`) sets the filter, default `info`
/// for weir and `warn` for the embedded broker.
pub fn init_tracing() {
    let filter = std::env::var("WEIR_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,rumqttc=warn,fjall=warn,lsm_tree=warn".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Wall clock, epoch ms. Only `engine` and `api` read the clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Epoch ms as RFC 3339 UTC with milliseconds (the API's time format).
pub fn format_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new(["telemetry"], ["health"]);
        m.streams["telemetry"]
            .ingested
            .fetch_add(3, Ordering::Relaxed);
        m.streams["telemetry"].reject(RejectReason::Schema);
        m.streams["telemetry"]
            .watermark
            .store(1_000, Ordering::Relaxed);
        let text = m.render(3_500);
        assert!(text.contains("weir_ingested_events_total{stream=\"telemetry\"} 3\n"));
        assert!(
            text.contains("weir_rejected_events_total{stream=\"telemetry\",reason=\"schema\"} 1\n")
        );
        assert!(text.contains("weir_watermark_lag_seconds{stream=\"telemetry\"} 2.500\n"));
        assert!(text.contains("# TYPE weir_view_rows_written_total counter"));
        assert_eq!(format_time(1_500), "1970-01-01T00:00:01.500Z");
    }
}
