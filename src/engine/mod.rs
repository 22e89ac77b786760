//! The engine wires the stages and owns start-up and shutdown.
//!
//! ```text
//!  MQTT source task ──bounded channel──▶ pipeline thread ──▶ store (fjall)
//!   (rumqttc)            (backpressure)   decode, views,        ▲
//!                                         watermarks            │ reads
//!                                                          HTTP API (axum)
//! ```
//!
//! The pipeline runs on its own OS thread: decoding and aggregation are CPU
//! work that would otherwise stall the async workers that serve HTTP and
//! MQTT. It takes messages in micro-batches (everything queued, up to
//! `MAX_BATCH_MESSAGES`), decodes them per stream into one Arrow batch, and
//! runs the views in dependency order. For each stream batch every view first
//! processes the data and then sees the advanced watermark, and a view runs
//! after the views it reads, so data always precedes the watermark that
//! follows it — the ordering Flink's watermarks give.
//!
//! One `CancellationToken` stops everything; `Running::shutdown` waits for
//! every task and thread to finish.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::{BrokerAddr, Config};
use crate::obs::{now_ms, Metrics, StreamMetrics, ViewMetrics};
use crate::plan::{Pipeline, StreamDef, Upstream, ViewShape};
use crate::sink;
use crate::source::decode::{AckToken, Decoder, Message, RejectReason, Rejected};
use crate::source::{broker, mqtt};
use crate::store::{Store, StoreError};
use crate::window::operator::{EventBatch, ViewOperator, ViewOutput};
use crate::window::Watermark;

/// Most messages taken into one micro-batch.
const MAX_BATCH_MESSAGES: usize = 512;
/// Capacity of the channel between the MQTT source and the pipeline.
const INGEST_QUEUE: usize = 256;
/// How often idle streams are checked and their watermarks moved.
const TICK: Duration = Duration::from_millis(250);
/// How often retention runs.
const HOUSEKEEPING: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
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
    pub state: Arc<AppState>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    pipeline: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops intake, the pipeline and the API, waits for them, and syncs the store.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.join().await;
    }

    /// Waits until something cancels the engine (the shutdown token), then stops.
    pub async fn wait_for(mut self, signal: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = signal => {}
            _ = self.shutdown.cancelled() => {}
        }
        self.shutdown.cancel();
        self.join().await;
    }

    async fn join(&mut self) {
        for task in self.tasks.drain(..) {
            let _ = task.await;
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

/// Starts weir: store, broker (when embedded), MQTT source, pipeline, HTTP API.
pub async fn start(config: Config, pipeline: Pipeline) -> Result<Running, EngineError> {
    let store = Store::open(&config.storage.dir)?;
    reconcile_views(&store, &pipeline)?;
    let metrics = Arc::new(Metrics::new(
        pipeline.streams.iter().map(|s| s.name.as_str()),
        pipeline.views.iter().map(|v| v.name.as_str()),
    ));
    metrics
        .ingest_queue_capacity
        .store(INGEST_QUEUE as i64, Ordering::Relaxed);
    metrics
        .store_disk_bytes
        .store(store.disk_space(), Ordering::Relaxed);

    let (host, port, embedded_broker) =
        match config.mqtt.broker_addr().map_err(EngineError::Config)? {
            BrokerAddr::Embedded => {
                // The broker accepts more than weir does, so that an oversize
                // message reaches weir and is dead-lettered instead of vanishing.
                let addr = broker::start(
                    config.mqtt.embedded_listen,
                    config.mqtt.max_packet_bytes * 4,
                )?;
                tracing::info!(%addr, "embedded MQTT broker listening");
                (addr.ip().to_string(), addr.port(), Some(addr))
            }
            BrokerAddr::External { host, port, .. } => (host, port, None),
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
    let shutdown = CancellationToken::new();
    let pipeline = Arc::new(pipeline);
    let state = Arc::new(AppState {
        store: store.clone(),
        pipeline: pipeline.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
    });

    let (tx, rx) = mpsc::channel::<Message>(INGEST_QUEUE);
    // Unbounded, but never larger than the messages in flight, which the
    // broker's inflight window and INGEST_QUEUE bound.
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Vec<AckToken>>();
    let mut tasks = Vec::new();

    // Pipeline thread.
    let runner = Runner::new(
        &pipeline,
        store.clone(),
        metrics.clone(),
        config.mqtt.max_packet_bytes,
    )?;
    let handle = tokio::runtime::Handle::current();
    let token = shutdown.clone();
    let pipeline_thread = std::thread::Builder::new()
        .name("weir-pipeline".into())
        .spawn(move || runner.run(rx, ack_tx, handle, token))
        .map_err(EngineError::Thread)?;

    // MQTT source.
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
    };
    tasks.push(tokio::spawn(mqtt::run(
        options,
        tx,
        ack_rx,
        ready.clone(),
        metrics.clone(),
        shutdown.clone(),
    )));

    // HTTP API.
    let router = api::router(state.clone());
    let token = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));
    tracing::info!(%http_addr, "HTTP API listening");

    // Retention and disk usage.
    tasks.push(tokio::spawn(housekeeping(
        store,
        pipeline.clone(),
        metrics,
        config.clone(),
        shutdown.clone(),
    )));

    Ok(Running {
        http_addr,
        embedded_broker,
        state,
        shutdown,
        tasks,
        pipeline: Some(pipeline_thread),
    })
}

/// Clears the stored rows of every view whose plan changed since the last
/// run, and only those: an unchanged view keeps its rows.
fn reconcile_views(store: &Store, pipeline: &Pipeline) -> Result<(), StoreError> {
    for view in &pipeline.views {
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

async fn housekeeping(
    store: Store,
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    config: Config,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(HOUSEKEEPING);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let store = store.clone();
        let pipeline = pipeline.clone();
        let metrics = metrics.clone();
        let config = config.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            for view in &pipeline.views {
                // updating views hold one row per key and are not time-keyed
                if view.shape == ViewShape::Updating {
                    continue;
                }
                let retention = view.retention.unwrap_or(config.storage.view_retention);
                if let Err(e) = store.expire_rows(&view.name, now - retention.as_millis() as i64) {
                    tracing::warn!(view = %view.name, error = %e, "retention failed");
                }
            }
            if let Err(e) = store
                .expire_dead_letters(now - config.storage.deadletter_retention.as_millis() as i64)
            {
                tracing::warn!(error = %e, "dead-letter retention failed");
            }
            metrics
                .store_disk_bytes
                .store(store.disk_space(), Ordering::Relaxed);
        })
        .await;
    }
}

struct StreamRuntime {
    def: Arc<StreamDef>,
    decoder: Decoder,
    watermark: Watermark,
    metrics: Arc<StreamMetrics>,
}

struct ViewRuntime {
    operator: ViewOperator,
    /// Index of the stream at the root of this view's inputs.
    root: usize,
    /// Index of the view it reads, if it reads a view.
    upstream_view: Option<usize>,
    metrics: Arc<ViewMetrics>,
}

/// The pipeline: decoders, watermarks and operators, on one thread.
struct Runner {
    streams: Vec<StreamRuntime>,
    views: Vec<ViewRuntime>,
    store: Store,
    metrics: Arc<Metrics>,
    seq: u64,
}

impl Runner {
    fn new(
        pipeline: &Pipeline,
        store: Store,
        metrics: Arc<Metrics>,
        max_bytes: usize,
    ) -> Result<Self, EngineError> {
        let streams = pipeline
            .streams
            .iter()
            .map(|s| StreamRuntime {
                def: s.clone(),
                decoder: Decoder::new(s.clone(), max_bytes),
                watermark: Watermark::new(s.event_time.bound_ms, s.idle_timeout.as_millis() as i64),
                metrics: metrics.streams[&s.name].clone(),
            })
            .collect::<Vec<_>>();
        let mut views: Vec<ViewRuntime> = Vec::new();
        for (i, v) in pipeline.views.iter().enumerate() {
            let operator = ViewOperator::new(v.clone()).map_err(|e| EngineError::View {
                view: v.name.clone(),
                message: e.to_string(),
            })?;
            let (root, upstream_view) = match &v.upstream {
                Upstream::Stream(s) => (streams.iter().position(|x| &x.def.name == s), None),
                Upstream::View(u) => {
                    let up = pipeline.views[..i].iter().position(|x| &x.name == u);
                    (up.map(|u| views[u].root), up)
                }
            };
            let Some(root) = root else {
                return Err(EngineError::View {
                    view: v.name.clone(),
                    message: "upstream not found".into(),
                });
            };
            views.push(ViewRuntime {
                operator,
                root,
                upstream_view,
                metrics: metrics.views[&v.name].clone(),
            });
        }
        Ok(Self {
            streams,
            views,
            store,
            metrics,
            seq: 0,
        })
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<Message>,
        acks: mpsc::UnboundedSender<Vec<AckToken>>,
        handle: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) {
        let mut messages: Vec<Message> = Vec::with_capacity(MAX_BATCH_MESSAGES);
        let mut last_tick = now_ms();
        loop {
            let first = handle.block_on(async {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => None,
                    m = rx.recv() => m.map(Some),
                    _ = tokio::time::sleep(TICK) => Some(None),
                }
            });
            match first {
                None => break,
                Some(Some(m)) => {
                    messages.push(m);
                    while messages.len() < MAX_BATCH_MESSAGES {
                        match rx.try_recv() {
                            Ok(m) => messages.push(m),
                            Err(_) => break,
                        }
                    }
                    self.metrics
                        .ingest_queue_depth
                        .store(rx.len() as i64, Ordering::Relaxed);
                    let tokens: Vec<AckToken> = messages.iter().filter_map(|m| m.ack).collect();
                    self.ingest(&mut messages);
                    // Processed and written: now the broker may forget them.
                    // (The durable ingest-log append will go right before this.)
                    if !tokens.is_empty() {
                        let _ = acks.send(tokens);
                    }
                }
                Some(None) => {}
            }
            let now = now_ms();
            if now - last_tick >= TICK.as_millis() as i64 {
                last_tick = now;
                self.tick(now);
            }
        }
        tracing::info!("pipeline stopped");
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Decodes and processes one micro-batch of messages.
    fn ingest(&mut self, messages: &mut Vec<Message>) {
        self.metrics
            .pipeline_batches
            .fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let mut rejects: Vec<Rejected> = Vec::new();
        let mut per_stream: Vec<Vec<Message>> =
            (0..self.streams.len()).map(|_| Vec::new()).collect();
        for m in messages.drain(..) {
            match self
                .streams
                .iter()
                .position(|s| s.def.topic.matches(&m.topic, |_, _| {}))
            {
                Some(i) => per_stream[i].push(m),
                None => {
                    self.metrics
                        .unmatched_messages
                        .fetch_add(1, Ordering::Relaxed);
                    rejects.push(Rejected {
                        stream: String::new(),
                        topic: m.topic.clone(),
                        reason: RejectReason::Malformed,
                        detail: format!("topic {} matches no stream", m.topic),
                        payload: crate::source::decode::truncate_payload(&m.payload),
                        received_at: m.received_at,
                    });
                }
            }
        }
        for (i, msgs) in per_stream.iter().enumerate() {
            if msgs.is_empty() {
                continue;
            }
            let stream = &self.streams[i];
            stream
                .metrics
                .messages
                .fetch_add(msgs.len() as u64, Ordering::Relaxed);
            let before = rejects.len();
            let decoded = stream.decoder.decode(msgs, &mut rejects);
            for r in &rejects[before..] {
                stream.metrics.reject(r.reason);
            }
            let rows = decoded.batch.num_rows();
            stream
                .metrics
                .ingested
                .fetch_add(rows as u64, Ordering::Relaxed);
            if rows == 0 {
                continue;
            }
            let max_event_time = decoded
                .event_time
                .values()
                .iter()
                .copied()
                .max()
                .unwrap_or(i64::MIN);
            let watermark_before = stream.watermark.current();
            let seq = self.next_seq();
            let batch = EventBatch::new(decoded.batch, decoded.event_time, seq);
            let (late, late_views) = self.run_views(i, Some(&batch), None);
            if !late.is_empty() {
                let rows: Vec<u32> = late.into_iter().collect();
                let views = late_views.join(", ");
                let watermark = watermark_before
                    .map(crate::obs::format_time)
                    .unwrap_or_default();
                let letters = sink::late_rows(
                    &self.streams[i].def.name,
                    &batch.data,
                    batch.event_time.values(),
                    &rows,
                    |r| {
                        let m = &msgs[decoded.message_index.get(r).copied().unwrap_or(0) as usize];
                        (m.topic.as_str(), m.received_at)
                    },
                    |t| {
                        format!(
                            "event time {} is behind the watermark {watermark}: its window had closed in {views}",
                            crate::obs::format_time(t)
                        )
                    },
                );
                self.streams[i]
                    .metrics
                    .late
                    .fetch_add(letters.len() as u64, Ordering::Relaxed);
                self.streams[i]
                    .metrics
                    .reject_n(RejectReason::Late, letters.len() as u64);
                rejects.extend(letters);
            }
            let stream = &mut self.streams[i];
            stream.watermark.observe(max_event_time, now);
            self.publish_watermark(i);
            let watermark = self.streams[i].watermark.current();
            self.run_views(i, None, watermark);
        }
        if let Err(e) = self.store.write_dead_letters(&rejects) {
            self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, lost = rejects.len(), "cannot store dead letters");
        }
    }

    /// Moves idle streams' watermarks with the wall clock.
    fn tick(&mut self, now: i64) {
        for i in 0..self.streams.len() {
            if self.streams[i].watermark.on_tick(now) {
                self.publish_watermark(i);
                let watermark = self.streams[i].watermark.current();
                self.run_views(i, None, watermark);
            }
        }
    }

    fn publish_watermark(&self, i: usize) {
        let s = &self.streams[i];
        if let Some(w) = s.watermark.current() {
            s.metrics.watermark.store(w, Ordering::Relaxed);
        }
        if let Some(t) = s.watermark.max_event_time() {
            s.metrics.max_event_time.store(t, Ordering::Relaxed);
        }
    }

    /// Runs the views rooted at stream `root` in dependency order, on a batch
    /// of the stream, or on a watermark. Returns the late rows of the stream
    /// batch and the views they were late for.
    fn run_views(
        &mut self,
        root: usize,
        batch: Option<&EventBatch>,
        watermark: Option<i64>,
    ) -> (BTreeSet<u32>, Vec<String>) {
        let mut late = BTreeSet::new();
        let mut late_views = Vec::new();
        let mut outputs: Vec<Vec<ViewOutput>> = (0..self.views.len()).map(|_| Vec::new()).collect();
        for v in 0..self.views.len() {
            if self.views[v].root != root {
                continue;
            }
            let inputs: Vec<EventBatch> = match self.views[v].upstream_view {
                None => batch.into_iter().cloned().collect(),
                Some(u) => outputs[u]
                    .iter()
                    .map(|o| EventBatch::new(o.rows.clone(), o.event_time.clone(), self.next_seq()))
                    .collect(),
            };
            let view = &mut self.views[v];
            let name = view.operator.plan().name.clone();
            let mut produced = Vec::new();
            for input in &inputs {
                match view.operator.process(input) {
                    Ok(p) => {
                        if !p.late_rows.is_empty() {
                            view.metrics
                                .late
                                .fetch_add(p.late_rows.len() as u64, Ordering::Relaxed);
                            if view.upstream_view.is_none() {
                                late.extend(p.late_rows.iter().copied());
                                late_views.push(name.clone());
                            }
                        }
                        produced.extend(p.output);
                    }
                    Err(e) => {
                        view.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(view = %name, error = %e, rows = input.num_rows(), "view failed on a batch; its rows were skipped");
                    }
                }
            }
            if let Some(w) = watermark {
                match view.operator.advance_watermark(w) {
                    Ok(out) => produced.extend(out),
                    Err(e) => {
                        view.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(view = %name, error = %e, "view failed to close windows");
                    }
                }
            }
            for out in &produced {
                match sink::write_view_output(&self.store, &name, out) {
                    Ok(n) => {
                        view.metrics
                            .rows_written
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(view = %name, error = %e, "cannot store view rows");
                    }
                }
            }
            view.metrics
                .open_groups
                .store(view.operator.open_groups() as u64, Ordering::Relaxed);
            outputs[v] = produced;
        }
        (late, late_views)
    }
}
