//! The engine wires the stages and owns start-up and shutdown.
//!
//! ```text
//!  MQTT server connections ─┐                 prepare thread       pipeline thread
//!   (or rumqttc subscribers ├─bounded queue─▶ dedup, route,  ──▶   log append, views,  ──▶ store (fjall)
//!    to an external broker) │                 decode, encode  (2)  rules, checkpoints        ▲
//!        ▲                  ┘                                           │                    │ reads
//!        └──────── PUBACK / PUBREC after the append (and fsync) ◀───────┘             HTTP API (axum)
//! ```
//!
//! The pipeline runs on two OS threads of its own (`prepare`, `pipeline`),
//! one micro-batch apart: decoding and aggregation are CPU work that would
//! otherwise stall the async workers that serve HTTP and MQTT. For each
//! stream batch every view first processes the data and then sees the
//! advanced watermark, and a view runs after the views it reads, so data
//! always precedes the watermark that follows it — the ordering Flink's
//! watermarks give.
//!
//! Start-up: store, HTTP (so `/readyz` answers 503 while recovering), the
//! MQTT server's listener (bound, not yet accepting), pipeline thread —
//! which restores the checkpoint and replays the log — and only then the
//! MQTT server accepts clients (or the subscribers connect). Shutdown
//! (SIGTERM, SIGINT): one `CancellationToken` stops the sources; the
//! prepare thread takes in what was queued, the pipeline commits it,
//! writes a final checkpoint and syncs; `Running::shutdown` waits for every
//! task and thread.

mod pipeline;
mod prepare;
pub mod preview;
pub mod reload;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::{BrokerAddr, Config};
use crate::obs::{now_ms, Health, Metrics};
use crate::plan::changes::Deployed;
use crate::plan::{Pipeline, ViewShape};
use crate::sink::notify::{ExternalTarget, MqttTarget, Notifier};
use crate::source::decode::{AckToken, Message};
use crate::source::mqtt;
use crate::source::server::{Server, ServerError, ServerOptions};
use crate::store::{Store, StoreError};

/// Capacity of the channel between the MQTT source and the pipeline.
const INGEST_QUEUE: usize = 256;
/// How often retention runs.

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("HTTP API cannot listen on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("view {view}: {message}")]
    View { view: String, message: String },
    #[error("cannot start the pipeline thread: {0}")]
    Thread(std::io::Error),
}

/// A running weir. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub http_addr: SocketAddr,
    /// The embedded broker's address, when weir runs one.
    pub embedded_broker: Option<SocketAddr>,
    /// weir's MQTT-over-TLS listener, when configured.
    pub embedded_tls: Option<SocketAddr>,
    pub state: Arc<AppState>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    pipeline: Option<std::thread::JoinHandle<()>>,
    /// Set when weir stopped itself because it could not go on.
    fatal: Arc<std::sync::Mutex<Option<String>>>,
}

impl Running {
    /// Stops intake, the pipeline and the API, waits for them, and syncs the store.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.join().await;
    }

    /// Runs until `signal` (or a fatal error), then stops; the error, if any.
    pub async fn wait_for(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        tokio::select! {
            _ = signal => {}
            _ = self.shutdown.cancelled() => {}
        }
        self.shutdown.cancel();
        self.join().await;
        match self.fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn join(&mut self) {
        for task in self.tasks.drain(..) {
            if let Err(e) = task.await {
                if e.is_panic() {
                    let what =
                        format!("a task panicked: {}", pipeline::panic_text(&e.into_panic()));
                    tracing::error!("{what}");
                    let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
                    fatal.get_or_insert(what);
                }
            }
        }
        if let Some(thread) = self.pipeline.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Err(e) = self.state.store.sync() {
            tracing::error!(error = %e, "final store sync failed");
        }
        tracing::info!("weir stopped");
    }
}

/// Spawns weir's tasks so that a panic in one is never swallowed: weir
/// turns unhealthy, stops, and exits non-zero with the panic's message.
struct Guard {
    fatal: Arc<std::sync::Mutex<Option<String>>>,
    health: Arc<Health>,
    shutdown: CancellationToken,
}

impl Guard {
    fn spawn(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let (fatal, health, shutdown) = (
            self.fatal.clone(),
            self.health.clone(),
            self.shutdown.clone(),
        );
        tokio::spawn(async move {
            use futures::FutureExt;
            if let Err(panic) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
                let what = format!("a task panicked: {}", pipeline::panic_text(&panic));
                tracing::error!("{what}; weir stops");
                health.fail(what.clone());
                fatal
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(what);
                shutdown.cancel();
            }
        })
    }
}

/// Starts weir: store, broker (when embedded), MQTT source, pipeline, HTTP API.
pub async fn start(config: Config, pipeline: Pipeline) -> Result<Running, EngineError> {
    let store = Store::open_with_cache(&config.storage.dir, config.storage.cache_bytes)?;
    let changes = crate::plan::changes::changes(
        &pipeline,
        &deployed(&store)?,
        now_ms(),
        config.storage.log_retention,
        config.storage.view_retention,
    );
    log_changes(&changes);
    note_removed(&store, &pipeline, &changes)?;
    let start_changes = changes;
    reconcile_views(&store, &pipeline, |_| true)?;
    record_deployed(&store, &config.storage.dir, &pipeline)?;
    for (i, hook) in config.alerts.webhook.iter().enumerate() {
        if let Some(unknown) = hook.rules.iter().find(|r| pipeline.alert(r).is_none()) {
            return Err(EngineError::Config(format!(
                "alerts.webhook[{i}].rules: no alert rule is named {unknown:?}"
            )));
        }
    }
    if let Some(e) = unknown_connections(&pipeline, &config).first() {
        return Err(EngineError::Config(e.to_string()));
    }
    if let Some(e) = check_sink_tables(&pipeline, &config, true).await.first() {
        return Err(EngineError::Config(e.to_string()));
    }
    let metrics = Arc::new(
        Metrics::new(
            pipeline.streams.iter().map(|s| s.name.as_str()),
            pipeline.views.iter().map(|v| v.name.as_str()),
        )
        .with_alerts(pipeline.alerts.iter().map(|a| a.name.as_str())),
    );
    metrics
        .ingest_queue_capacity
        .store(INGEST_QUEUE as i64, Ordering::Relaxed);
    metrics
        .store_disk_bytes
        .store(store.disk_space(), Ordering::Relaxed);

    let shutdown = CancellationToken::new();
    let (tx, rx) = mpsc::channel::<Message>(INGEST_QUEUE);
    let stream_filters: Vec<String> = pipeline.streams.iter().map(|s| s.topic.filter()).collect();
    let (host, port, server) = match config.mqtt.broker_addr().map_err(EngineError::Config)? {
        BrokerAddr::Embedded => {
            // The server accepts more than the decoder does, so that an
            // oversize message reaches the pipeline and is dead-lettered
            // instead of closing the terminal's connection.
            let mut options = ServerOptions::new(
                config.mqtt.embedded_listen,
                config.mqtt.max_packet_bytes * 4,
                stream_filters.clone(),
            );
            options.receive_maximum = config.mqtt.receive_maximum;
            options.max_queued = config.mqtt.max_queued_messages;
            options.max_connections = config.mqtt.max_connections;
            options.max_keep_alive = config.mqtt.max_keep_alive;
            options.max_session_expiry = config
                .mqtt
                .max_session_expiry
                .as_secs()
                .min(u32::MAX as u64) as u32;
            options.max_subscriptions = config.mqtt.max_subscriptions;
            options.max_retained = config.mqtt.max_retained;
            options.max_retained_bytes = config.mqtt.max_retained_bytes;
            if let Some(path) = &config.mqtt.users_file {
                let auth = crate::auth::mqtt::MqttAuth::load(path).map_err(EngineError::Config)?;
                tracing::info!(users = auth.user_count(), file = %path.display(), "MQTT clients must log in");
                options.auth = Arc::new(auth);
            }
            if let (Some(addr), Some(cert), Some(key)) = (
                config.mqtt.embedded_tls_listen,
                &config.mqtt.tls_cert_file,
                &config.mqtt.tls_key_file,
            ) {
                let tls = crate::tls::server_config(
                    cert,
                    key,
                    config.mqtt.tls_client_ca_file.as_deref(),
                    &[b"mqtt"],
                )
                .map_err(|e| EngineError::Config(format!("mqtt TLS: {e}")))?;
                options.tls_listen = Some(addr);
                options.tls = Some(tls);
            }
            let server = Server::bind(
                options,
                tx.clone(),
                Some(store.clone()),
                metrics.clone(),
                shutdown.clone(),
            )
            .await?;
            let addr = server.local_addr().map_err(|source| ServerError::Listen {
                addr: config.mqtt.embedded_listen,
                source,
            })?;
            tracing::info!(%addr, "MQTT server listening (it accepts clients once recovery is done)");
            if let Some(tls_addr) = server.tls_local_addr() {
                tracing::info!(addr = %tls_addr, mtls = config.mqtt.tls_client_ca_file.is_some(), "MQTT over TLS listening");
            }
            (addr.ip().to_string(), addr.port(), Some((server, addr)))
        }
        BrokerAddr::External { host, port, .. } => (host, port, None),
    };
    let embedded_tls = server.as_ref().and_then(|(s, _)| s.tls_local_addr());
    // mqtts:// to the operator's broker.
    let external_tls = match config.mqtt.broker_addr() {
        Ok(BrokerAddr::External { tls: true, .. }) => Some(
            crate::tls::client_config(
                config.mqtt.ca_file.as_deref(),
                config.mqtt.cert_file.as_deref(),
                config.mqtt.key_file.as_deref(),
            )
            .map_err(|e| EngineError::Config(format!("mqtt.broker TLS: {e}")))?,
        ),
        _ => None,
    };
    let embedded_broker = server.as_ref().map(|(_, addr)| *addr);

    let http_auth = crate::auth::http::HttpAuth::new(
        &config.http.tokens,
        &config.http.allowed_hosts,
        config.http.listen,
    )
    .map_err(EngineError::Config)?;
    let http_tls = match (&config.http.tls_cert_file, &config.http.tls_key_file) {
        (Some(cert), Some(key)) => Some(
            crate::tls::server_config(cert, key, None, &[b"http/1.1"])
                .map_err(|e| EngineError::Config(format!("http TLS: {e}")))?,
        ),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| EngineError::Http {
            addr: config.http.listen,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| EngineError::Http {
        addr: config.http.listen,
        source,
    })?;

    let ready = Arc::new(AtomicBool::new(false));
    let recovered = Arc::new(AtomicBool::new(false));
    let health = Arc::new(Health::default());
    let fatal = Arc::new(std::sync::Mutex::new(None));
    let guard = Guard {
        fatal: fatal.clone(),
        health: health.clone(),
        shutdown: shutdown.clone(),
    };
    let log_floor = Arc::new(AtomicU64::new(0));
    let handle = tokio::runtime::Handle::current();
    let mqtt_target = match &server {
        Some((server, _)) => MqttTarget::Embedded {
            publisher: server.publisher(),
            resolved_expiry: config.alerts.mqtt_resolved_expiry,
        },
        None => MqttTarget::External(ExternalTarget {
            host: host.clone(),
            port,
            client_id: format!("{}-alerts", config.mqtt.client_id),
            username: config.mqtt.username.clone(),
            password: config.mqtt.password.clone(),
            tls: external_tls.clone(),
        }),
    };
    let notifier = Arc::new(
        Notifier::start(
            &handle,
            config.alerts.mqtt.then_some(mqtt_target),
            &config.alerts.webhook,
            shutdown.clone(),
        )
        .map_err(|e| EngineError::Config(format!("alerts.webhook {e}")))?,
    );
    let _ = metrics.notifications.set(notifier.channels.clone());
    let pipeline = Arc::new(pipeline);
    let sandbox = crate::api::sandbox::Sandbox::new(
        config.http.query_concurrency,
        config.http.query_timeout,
        config.http.query_memory,
        metrics.clone(),
    )
    .map_err(EngineError::Thread)?;
    let live = Arc::new(reload::Live::new(pipeline.clone(), &config));
    live.record_start(&start_changes);
    let (reload_tx, reload_rx) = std::sync::mpsc::sync_channel::<reload::Request>(4);
    let reloader = Arc::new(reload::Reloader {
        live: live.clone(),
        store: store.clone(),
        config: config.clone(),
        runner: reload_tx,
    });
    let state = Arc::new(AppState {
        sandbox,
        live: live.clone(),
        reloader: reloader.clone(),
        rates: Default::default(),
        docs_config: config.clone(),
        fleet: Default::default(),
        notifier: notifier.clone(),
        shutdown: shutdown.clone(),
        sse_keepalive: config.alerts.sse_keepalive,
        store: store.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        recovered: recovered.clone(),
        health: health.clone(),
    });

    // Unbounded, but never larger than the messages in flight, which the
    // connections' receive maximum (or the external broker's inflight
    // window) and INGEST_QUEUE bound.
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Vec<AckToken>>();
    let mut tasks = Vec::new();

    // Pipeline thread: recovery first, then the live loop.
    let mut runner = pipeline::Runner::new(
        &pipeline,
        store.clone(),
        metrics.clone(),
        health.clone(),
        pipeline::Settings {
            durability: config.storage.durability,
            checkpoint_interval: config.storage.checkpoint_interval,
            limits: crate::source::decode::Limits {
                max_message_bytes: config.mqtt.max_packet_bytes,
                max_text_bytes: config.limits.max_text_bytes,
                max_rows_per_message: config.limits.max_rows_per_message,
                max_future_ms: config.limits.max_future.as_millis().min(i64::MAX as u128) as i64,
            },
            key_ttl: Some(config.limits.key_ttl).filter(|d| !d.is_zero()),
        },
        log_floor.clone(),
        Some(notifier),
    )?;
    runner.fatal = fatal.clone();
    runner.reloads = Some(reload_rx);
    let (table_tx, table_rx) = mpsc::channel::<crate::postgres::TableChange>(16);
    runner.table_changes = Some(table_rx);
    let health_slot = health.clone();
    let token = shutdown.clone();
    let (recovered_tx, recovered_rx) = tokio::sync::oneshot::channel::<()>();
    let recovered_flag = recovered.clone();
    let fatal_slot = fatal.clone();
    let pipeline_thread = std::thread::Builder::new()
        .name("weir-pipeline".into())
        .spawn(move || {
            if let Err(e) = runner.recover() {
                tracing::error!(error = %e, "recovery failed; weir stops");
                *fatal_slot.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("recovery failed: {e}"));
                token.cancel();
                return;
            }
            recovered_flag.store(true, Ordering::SeqCst);
            let _ = recovered_tx.send(());
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runner.run(rx, ack_tx, handle, token.clone())
            }));
            // A panic anywhere on this thread stops weir loudly: unhealthy,
            // and a non-zero exit.
            if let Err(panic) = ran {
                let what = format!(
                    "the pipeline thread panicked: {}",
                    pipeline::panic_text(&panic)
                );
                tracing::error!("{what}; weir stops");
                health_slot.fail(what.clone());
                *fatal_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
                token.cancel();
            }
        })
        .map_err(EngineError::Thread)?;

    // MQTT: weir's own server, or a subscriber to the operator's broker.
    // Either starts once replay is done, so that new input follows the log.
    let source_metrics = metrics.clone();
    let source_ready = ready.clone();
    let token = shutdown.clone();
    match server {
        Some((server, _)) => {
            drop(tx);
            tasks.push(guard.spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => return,
                    r = recovered_rx => if r.is_err() { return },
                }
                source_ready.store(true, Ordering::SeqCst);
                source_metrics.mqtt_connected.store(1, Ordering::Relaxed);
                server.serve(ack_rx).await;
                source_ready.store(false, Ordering::SeqCst);
                source_metrics.mqtt_connected.store(0, Ordering::Relaxed);
            }));
        }
        None => {
            let options = mqtt::SourceOptions {
                host,
                port,
                client_id: config.mqtt.client_id.clone(),
                username: config.mqtt.username.clone(),
                password: config.mqtt.password.clone(),
                filters: pipeline
                    .streams
                    .iter()
                    .map(|s| (s.topic.filter(), s.qos))
                    .collect(),
                max_packet_bytes: config.mqtt.max_packet_bytes,
                tls: external_tls,
                index: 0,
                total: 1,
            };
            let total = config.mqtt.connections;
            tasks.push(guard.spawn(async move {
                // The broker keeps our sessions (and queues for them) until replay is done.
                tokio::select! {
                    _ = token.cancelled() => return,
                    r = recovered_rx => if r.is_err() { return },
                }
                // Each connection gets the acks of its own messages.
                let mut ack_rx = ack_rx;
                let mut routes = Vec::with_capacity(total);
                let mut sources = Vec::with_capacity(total);
                let subscribed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                for index in 0..total {
                    let (route, acks) = mpsc::unbounded_channel::<Vec<AckToken>>();
                    routes.push(route);
                    sources.push(tokio::spawn(mqtt::run(
                        options.nth(index, total),
                        tx.clone(),
                        acks,
                        source_ready.clone(),
                        subscribed.clone(),
                        source_metrics.clone(),
                        token.clone(),
                    )));
                }
                drop(tx);
                while let Some(batch) = ack_rx.recv().await {
                    if total == 1 {
                        let _ = routes[0].send(batch);
                        continue;
                    }
                    let mut split: Vec<Vec<AckToken>> = vec![Vec::new(); total];
                    for token in batch {
                        if let Some(part) = split.get_mut(mqtt::source_of(&token)) {
                            part.push(token);
                        }
                    }
                    for (route, part) in routes.iter().zip(split) {
                        if !part.is_empty() {
                            let _ = route.send(part);
                        }
                    }
                }
                drop(routes);
                for source in sources {
                    let _ = source.await;
                }
            }));
        }
    }

    // Reference tables: each follows its Postgres table once replay is done
    // (the rows replay left are where the change feed resumes).
    for t in &pipeline.tables {
        let Some(connection) = config.connections.iter().find(|c| c.name == t.connection) else {
            continue;
        };
        let source = crate::postgres::TableSource {
            def: t.clone(),
            connection: connection.clone(),
            tx: table_tx.clone(),
            health: health.clone(),
            shutdown: shutdown.clone(),
        };
        let recovered = recovered.clone();
        let token = shutdown.clone();
        tasks.push(guard.spawn(async move {
            while !recovered.load(Ordering::SeqCst) {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                }
            }
            source.run().await;
        }));
    }
    drop(table_tx);

    // Sinks: each delivers its view's outbox to Postgres, on its own.
    // Rows left for a sink that was removed from the pipelines go.
    let sinked: std::collections::HashSet<String> =
        pipeline.sinks.iter().map(|s| s.outbox()).collect();
    match store.drop_outboxes_except(&sinked) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            entries = n,
            "removed the undelivered rows of sinks no longer defined"
        ),
        Err(e) => tracing::warn!(error = %e, "could not remove the rows of removed sinks"),
    }
    let mut statuses = Vec::new();
    store.set_sinked_rules(
        pipeline
            .sinks
            .iter()
            .filter(|s| s.from_alert)
            .map(|s| s.from.clone()),
    );
    for s in &pipeline.sinks {
        let (Some(schema), Some(connection)) = (
            sink_schema(&pipeline, s),
            config.connections.iter().find(|c| c.name == s.connection),
        ) else {
            continue;
        };
        let status = Arc::new(crate::postgres::sink::SinkStatus {
            name: s.name.clone(),
            from: s.from.clone(),
            target: s.target(),
            ..Default::default()
        });
        statuses.push(status.clone());
        let task = crate::postgres::sink::SinkTask {
            def: s.clone(),
            schema,
            connection: connection.clone(),
            store: store.clone(),
            status,
            siblings: pipeline
                .sinks
                .iter()
                .filter(|o| o.from == s.from)
                .map(|o| o.name.clone())
                .collect(),
            // COPY + merge: 2-3x the rows/s of multi-row INSERTs (BENCHMARKS.md)
            copy: true,
            shutdown: shutdown.clone(),
        };
        tasks.push(guard.spawn(task.run()));
    }
    let _ = metrics.sinks.set(statuses);

    // HTTP API.
    let open_api = http_auth.open();
    let router = api::router(state.clone(), Arc::new(http_auth));
    let token = shutdown.clone();
    let https = http_tls.is_some();
    tasks.push(guard.spawn(async move {
        let graceful = async move { token.cancelled().await };
        let served = match http_tls {
            Some(tls) => {
                axum::serve(api::TlsListener::new(listener, tls), router)
                    .with_graceful_shutdown(graceful)
                    .await
            }
            None => {
                axum::serve(listener, router)
                    .with_graceful_shutdown(graceful)
                    .await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));
    tracing::info!(%http_addr, https, tokens = !open_api, "HTTP API listening");

    // Pipeline files changing while weir runs: watched, and SIGHUP.
    if config.pipelines.watch {
        tasks.push(guard.spawn(reload::watch(
            reloader.clone(),
            std::time::Duration::from_millis(500),
            std::time::Duration::from_millis(400),
            shutdown.clone(),
        )));
    }
    #[cfg(unix)]
    {
        let reloader = reloader.clone();
        let token = shutdown.clone();
        tasks.push(guard.spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                tracing::warn!("cannot listen for SIGHUP; reload with the API or by saving a file");
                return;
            };
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    got = hup.recv() => {
                        if got.is_none() {
                            return;
                        }
                        reloader.reload(reload::Trigger::Signal).await;
                    }
                }
            }
        }));
    }

    // Retention and disk usage.
    tasks.push(guard.spawn(housekeeping(
        store,
        live.clone(),
        metrics,
        config.clone(),
        log_floor,
        shutdown.clone(),
    )));

    Ok(Running {
        http_addr,
        embedded_broker,
        embedded_tls,
        state,
        shutdown,
        tasks,
        pipeline: Some(pipeline_thread),
        fatal,
    })
}

/// What the stored state was computed with: the newest checkpoint's
/// fingerprints, the definitions remembered from the last start, and how far
/// back the log reaches (`weir plan` and the start-up log).
/// Reference tables and sinks whose `connection` the config does not name.
pub fn unknown_connections(pipeline: &Pipeline, config: &Config) -> Vec<crate::plan::PlanError> {
    let known = |name: &str| config.connections.iter().any(|c| c.name == name);
    let tables = pipeline
        .tables
        .iter()
        .map(|t| (&t.file, t.line, format!("table {}", t.name), &t.connection));
    let sinks = pipeline
        .sinks
        .iter()
        .map(|s| (&s.file, s.line, format!("sink {}", s.name), &s.connection));
    tables
        .chain(sinks)
        .filter(|(_, _, _, c)| !known(c))
        .map(|(file, line, what, c)| crate::plan::PlanError {
            file: file.clone(),
            line,
            message: format!("{what}: connection {c:?} is not in the config's [[connections]]"),
        })
        .collect()
}

/// The columns a sink delivers: its view's, or an alert record's.
pub fn sink_schema(
    pipeline: &Pipeline,
    sink: &crate::plan::sink::SinkDef,
) -> Option<datafusion::arrow::datatypes::SchemaRef> {
    if sink.from_alert {
        Some(crate::plan::sink::alert_schema())
    } else {
        pipeline.view(&sink.from).map(|v| v.output_schema.clone())
    }
}

/// Checks each sink's table where Postgres can be reached (a table that
/// does not fit the view is an error naming the column); one that cannot
/// be reached is left to the sink, which retries. `create`: make missing
/// tables (start-up) or only report them (`weir check`).
pub async fn check_sink_tables(
    pipeline: &Pipeline,
    config: &Config,
    create: bool,
) -> Vec<crate::plan::PlanError> {
    let mut problems = Vec::new();
    for s in &pipeline.sinks {
        let (Some(schema), Some(conn)) = (
            sink_schema(pipeline, s),
            config.connections.iter().find(|c| c.name == s.connection),
        ) else {
            continue;
        };
        let client = match tokio::time::timeout(
            std::time::Duration::from_secs(5),
            crate::postgres::connect(conn),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(sink = %s.name, error = %e, "sink table not checked: Postgres unreachable; the sink retries");
                continue;
            }
            Err(_) => {
                tracing::warn!(sink = %s.name, "sink table not checked: Postgres did not answer in 5 s; the sink retries");
                continue;
            }
        };
        if let Err(e) = crate::postgres::sink::ensure_table(&client, s, &schema, create).await {
            problems.push(crate::plan::PlanError {
                file: s.file.clone(),
                line: s.line,
                message: format!("sink {}: {e}", s.name),
            });
        }
    }
    problems
}

pub fn deployed(store: &Store) -> Result<Deployed, StoreError> {
    let mut newest: Option<crate::checkpoint::Manifest> = None;
    for slot in 0..2u8 {
        let Some(bytes) = store.read_checkpoint_manifest(slot)? else {
            continue;
        };
        if let Ok(m) = crate::checkpoint::Checkpoint::decode_manifest(&bytes) {
            if newest
                .as_ref()
                .is_none_or(|n| (m.seq, m.taken_at) > (n.seq, n.taken_at))
            {
                newest = Some(m);
            }
        }
    }
    let definitions = match store.get_meta(DEFINITIONS_KEY)? {
        Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        None => Default::default(),
    };
    Ok(Deployed {
        parts: newest
            .as_ref()
            .map(|m| {
                m.views
                    .iter()
                    // (reference tables' rows are parts too; not views or rules)
                    .filter(|(k, _)| !k.starts_with("table:"))
                    .map(|(k, v)| (k.clone(), v.fingerprint))
                    .collect()
            })
            .unwrap_or_default(),
        definitions,
        checkpoint_at: newest.map(|m| m.taken_at),
        log_from: store.first_log_seq()?.map(|seq| (seq >> 16) as i64),
    })
}

const DEFINITIONS_KEY: &str = "pipelines/definitions";

/// The file `weir plan` reads while weir runs (the store is locked then).
pub const DEPLOYED_FILE: &str = "deployed.json";

/// Remembers the running definitions (in the store, for the next start's
/// plan) and writes `deployed.json` beside the store: what a restart will
/// compare the files with, once this run has checkpointed.
pub(super) fn record_deployed(
    store: &Store,
    dir: &std::path::Path,
    pipeline: &Pipeline,
) -> Result<(), StoreError> {
    let mut running = Deployed::of(pipeline);
    running.log_from = store.first_log_seq()?.map(|seq| (seq >> 16) as i64);
    let definitions = serde_json::to_vec(&running.definitions).unwrap_or_default();
    store.put_meta(DEFINITIONS_KEY, &definitions)?;
    let path = dir.join(DEPLOYED_FILE);
    let tmp = dir.join(format!("{DEPLOYED_FILE}.tmp"));
    let written = serde_json::to_vec_pretty(&running)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), error = %e, "cannot write the deployed pipelines file (weir plan reads it while weir runs)");
    }
    Ok(())
}

/// Notes when views were removed (their rows go after
/// `pipelines.removed_retention`), and forgets it for views that are back.
pub(super) fn note_removed(
    store: &Store,
    pipeline: &Pipeline,
    changes: &crate::plan::changes::Changes,
) -> Result<(), StoreError> {
    let now = now_ms();
    for item in &changes.items {
        if item.kind == "view" && item.change == crate::plan::changes::Change::Removed {
            let key = format!("{REMOVED_PREFIX}{}", item.name);
            if store.get_meta(&key)?.is_none() {
                store.put_meta(&key, &now.to_be_bytes())?;
            }
        }
    }
    for v in &pipeline.views {
        let key = format!("{REMOVED_PREFIX}{}", v.name);
        if store.get_meta(&key)?.is_some() {
            store.delete_meta(&key)?;
        }
    }
    Ok(())
}

const REMOVED_PREFIX: &str = "removed/";

/// Drops the stored rows of views removed longer than `retention` ago.
fn drop_removed(
    store: &Store,
    pipeline: &Pipeline,
    retention: std::time::Duration,
    now: i64,
) -> Result<usize, StoreError> {
    let mut dropped = 0;
    for (key, value) in store.meta_with_prefix(REMOVED_PREFIX)? {
        let name = &key[REMOVED_PREFIX.len()..];
        let at = value
            .as_slice()
            .try_into()
            .map(i64::from_be_bytes)
            .unwrap_or(0);
        if pipeline.view(name).is_some() {
            store.delete_meta(&key)?;
            continue;
        }
        if now.saturating_sub(at) >= retention.as_millis().min(i64::MAX as u128) as i64 {
            let rows = store.clear_view(name)?;
            store.delete_meta(&format!("view/{name}/fingerprint"))?;
            store.delete_meta(&key)?;
            tracing::info!(view = %name, rows, "a removed view's rows were dropped (pipelines.removed_retention)");
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// The start-up log of what this start does to the stored state: the same
/// lines `weir plan` prints.
fn log_changes(changes: &crate::plan::changes::Changes) {
    use crate::plan::changes::Change;
    for item in &changes.items {
        if item.change == Change::Kept {
            continue;
        }
        tracing::info!(kind = item.kind, name = %item.name, change = item.change.as_str(), "{}", item.detail);
    }
    for w in &changes.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(
        new = changes.names(Change::New).len(),
        changed = changes.names(Change::Changed).len(),
        downstream = changes.names(Change::Downstream).len(),
        removed = changes.names(Change::Removed).len(),
        kept = changes.names(Change::Kept).len(),
        "pipelines planned against the stored state"
    );
}

/// Clears the stored rows of every view whose plan changed since the last
/// run, among those `which` selects (by index), and only those: an
/// unchanged view keeps its rows.
pub(super) fn reconcile_views(
    store: &Store,
    pipeline: &Pipeline,
    which: impl Fn(usize) -> bool,
) -> Result<(), StoreError> {
    for (i, view) in pipeline.views.iter().enumerate() {
        if !which(i) {
            continue;
        }
        let key = format!("view/{}/fingerprint", view.name);
        let current = view.fingerprint.to_be_bytes();
        match store.get_meta(&key)? {
            Some(old) if old == current => {}
            Some(_) => {
                let n = store.clear_view(&view.name)?;
                tracing::info!(view = %view.name, cleared = n, "view definition changed: its old rows were removed");
                store.put_meta(&key, &current)?;
            }
            None => store.put_meta(&key, &current)?,
        }
    }
    Ok(())
}

/// The dead-letter quotas: each stream's share first (its oldest go, the
/// other streams' stay), then the total. Down to 90 % of a quota, so that
/// trimming is not constant.
fn enforce_dead_letter_quotas(
    store: &Store,
    metrics: &Metrics,
    storage: &crate::config::StorageConfig,
) {
    let per_stream = storage.deadletter_max_bytes_per_stream;
    let trimmed =
        |what: &str, result: Result<usize, crate::store::StoreError>, max: u64| match result {
            Ok(n) => {
                metrics
                    .deadletters_trimmed
                    .fetch_add(n as u64, Ordering::Relaxed);
                tracing::warn!(
                    deleted = n,
                    max_bytes = max,
                    of = what,
                    "dead letters over their quota: the oldest were deleted"
                );
            }
            Err(e) => tracing::warn!(error = %e, of = what, "dead-letter quota failed"),
        };
    for (stream, bytes) in store.dead_letter_bytes_by_stream() {
        if bytes <= per_stream {
            break; // largest first
        }
        let result = store.trim_stream_dead_letters(&stream, per_stream / 10 * 9);
        trimmed(&format!("stream {stream}"), result, per_stream);
    }
    let max = storage.deadletter_max_bytes;
    if store.dead_letter_bytes() > max {
        let result = store.trim_dead_letters(max / 10 * 9);
        trimmed("all streams", result, max);
    }
    metrics
        .deadletter_bytes
        .store(store.dead_letter_bytes() as i64, Ordering::Relaxed);
}

async fn housekeeping(
    store: Store,
    live: Arc<reload::Live>,
    metrics: Arc<Metrics>,
    config: Config,
    log_floor: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(config.storage.housekeeping_interval);
    // The dead-letter quota is checked every second: a flood of bad input
    // must not fill the disk between two retention passes.
    let mut quota = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
            _ = quota.tick() => {
                metrics.deadletter_bytes.store(store.dead_letter_bytes() as i64, Ordering::Relaxed);
                metrics.store_memtable_bytes.store(store.memtable_bytes(), Ordering::Relaxed);
                metrics.store_cache_bytes.store(store.cache_bytes(), Ordering::Relaxed);
                let store = store.clone();
                let metrics = metrics.clone();
                let storage = config.storage.clone();
                let _ = tokio::task::spawn_blocking(move || enforce_dead_letter_quotas(&store, &metrics, &storage)).await;
                continue;
            }
        }
        let store = store.clone();
        let pipeline = live.pipeline();
        let metrics = metrics.clone();
        let config = config.clone();
        let floor = log_floor.load(Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            // The log keeps everything since the older checkpoint, and at
            // least `log_retention` of history.
            let retained =
                crate::log::seq_at(now - config.storage.log_retention.as_millis() as i64);
            match store.truncate_log(floor.min(retained)) {
                Ok(n) => {
                    metrics
                        .log_truncated_records
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "log retention failed"),
            }
            for view in &pipeline.views {
                // updating views hold one row per key and are not time-keyed
                if view.shape == ViewShape::Updating {
                    continue;
                }
                // Event time (DESIGN §4): rows older than the view's
                // watermark minus its retention go, never by the wall clock,
                // so a backfill of last year's data stays. No watermark
                // yet (recovery not done, no data): nothing goes.
                let Some(watermark) = pipeline
                    .root_stream(view)
                    .and_then(|s| metrics.streams.get(&s.name))
                    .and_then(|m| m.watermark())
                else {
                    continue;
                };
                let retention = view.retention.unwrap_or(config.storage.view_retention);
                let before =
                    watermark.saturating_sub(retention.as_millis().min(i64::MAX as u128) as i64);
                if let Err(e) = store.expire_rows(&view.name, before) {
                    tracing::warn!(view = %view.name, error = %e, "retention failed");
                }
            }
            if let Err(e) = drop_removed(&store, &pipeline, config.pipelines.removed_retention, now)
            {
                tracing::warn!(error = %e, "dropping removed views' rows failed");
            }
            if let Err(e) = store.expire_alerts(now - config.alerts.retention.as_millis() as i64) {
                tracing::warn!(error = %e, "alert retention failed");
            }
            if let Err(e) = store
                .expire_dead_letters(now - config.storage.deadletter_retention.as_millis() as i64)
            {
                tracing::warn!(error = %e, "dead-letter retention failed");
            }
            metrics
                .store_disk_bytes
                .store(store.disk_space(), Ordering::Relaxed);
            metrics.housekeeping_runs.fetch_add(1, Ordering::Relaxed);
        })
        .await;
    }
}
