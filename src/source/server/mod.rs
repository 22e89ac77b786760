//! weir's own MQTT server: what terminals and every other client connect to.
//!
//! ```text
//!  socket ─▶ connection task ─┬─ stream topic ─▶ ingest queue ─▶ pipeline (decode, log append, fsync)
//!   ▲   (one per client,      │                                         │
//!   │    codec: rumqttc)      └─ every topic ──▶ broker state ──▶ subscribers' connection tasks
//!   └──── PUBACK / PUBREC ◀── ack dispatcher ◀── acks after the durable append ◀─┘
//! ```
//!
//! - **Acknowledged means durable.** A QoS 1 or 2 PUBLISH on a stream's
//!   topic is acknowledged (PUBACK, PUBREC) only when the pipeline has
//!   appended its events to the ingest log and, with `durability = "sync"`,
//!   fsynced it. Acks go back in the order the publishes came (MQTT 4.6), so
//!   a publish on another topic waits behind a stream publish before it.
//! - **Backpressure, not loss.** A connection has at most
//!   `receive_maximum` publishes awaiting their ack: a 3.1.1 client's socket
//!   is not read beyond that; an MQTT 5 client is told the limit in CONNACK
//!   and disconnected (0x93) if it sends more. When the pipeline falls
//!   behind, the bounded ingest queue fills, connection tasks wait on it and
//!   stop reading their sockets, and publishers slow to weir's pace.
//! - **A broker for everyone else**: subscriptions with wildcards and
//!   shared groups, retained messages, last wills (with MQTT 5's delay),
//!   sessions that outlive their connection (`clean_session = false`, or
//!   MQTT 5's session expiry) with queued QoS 1 and 2 delivery, client-id
//!   takeover, message expiry, topic aliases, subscription options and
//!   identifiers. Subscriber deliveries are bounded per session
//!   (`max_queued`); what does not fit is dropped and counted
//!   (`weir_mqtt_deliveries_dropped_total`), never an ingested event.
//!
//! Sessions and retained messages live in memory and are written through to
//! the store as they change ([`broker`]): after a restart of weir a
//! persistent session is found again (`session_present = true`, and its
//! client resends what was not acknowledged) and the retained messages are
//! still there; deliveries queued for offline subscribers are not kept. The
//! events themselves are in the ingest log.

pub mod broker;
pub mod codec;
mod connection;
pub mod topics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::mqtt::MqttAuth;
use crate::obs::{now_ms, Metrics};
use crate::source::decode::{AckToken, Message};
use broker::{BrokerState, Inbox};
use rumqttc::v5::mqttbytes::v5::Publish;

/// How the server behaves; from `[mqtt]`.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    /// Largest packet accepted from a client (larger: the connection is closed,
    /// MQTT 5 clients are told 0x95 first).
    pub max_packet_bytes: usize,
    /// Publishes of one connection awaiting their ack, at most.
    pub receive_maximum: u16,
    /// Messages queued per session for a subscriber; more are dropped and counted.
    pub max_queued: usize,
    pub max_connections: usize,
    /// Topic aliases an MQTT 5 client may use.
    pub topic_alias_maximum: u16,
    /// The keep-alive a client gets when it asks for none or more (seconds;
    /// 0: a client may turn keep-alive off).
    pub max_keep_alive: u16,
    /// Longest a session outlives its connection, in seconds (3.1.1
    /// persistent sessions get this; MQTT 5 ones at most this).
    pub max_session_expiry: u32,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Retained messages the server keeps for clients; more are passed on,
    /// not retained (weir's own alert notifications do not count).
    pub max_retained: usize,
    /// Bytes (topics and payloads) of the retained messages kept for
    /// clients; beyond, as beyond `max_retained`.
    pub max_retained_bytes: usize,
    /// How long a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// The stream topics' filters: publishes matching one go to the pipeline.
    pub stream_filters: Vec<String>,
    /// A second listener speaking MQTT over TLS, and its config.
    pub tls_listen: Option<SocketAddr>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Who may connect and what they may do.
    pub auth: Arc<MqttAuth>,
}

impl ServerOptions {
    pub fn new(listen: SocketAddr, max_packet_bytes: usize, stream_filters: Vec<String>) -> Self {
        Self {
            listen,
            max_packet_bytes,
            receive_maximum: 256,
            max_queued: 1000,
            max_connections: 200_000,
            topic_alias_maximum: 64,
            max_keep_alive: 0,
            max_session_expiry: 7 * 24 * 3600,
            max_subscriptions: 1000,
            max_retained: 100_000,
            max_retained_bytes: 256 << 20,
            connect_timeout: Duration::from_secs(10),
            stream_filters,
            tls_listen: None,
            tls: None,
            auth: Arc::new(MqttAuth::open()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(
        "the MQTT server cannot listen on {addr}: {source} (another broker there? use it with \
         WEIR_MQTT__BROKER=mqtt://{addr}, or move weir's with WEIR_MQTT__EMBEDDED_LISTEN)"
    )]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The server, bound but not yet accepting.
pub struct Server {
    listener: TcpListener,
    /// The TLS listener, when there is one.
    tls_listener: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
    shared: Arc<Shared>,
}

/// Publishes into the server from inside weir (alert notifications): as
/// weir, which is the only publisher allowed under `weir/alerts/`.
#[derive(Clone)]
pub struct Publisher(Arc<Shared>);

impl Publisher {
    /// Retains (when asked) and routes a QoS 1 message, which expires
    /// after `expiry` when given (MQTT 5 message expiry); false once weir
    /// stops.
    pub async fn publish(
        &self,
        topic: &str,
        payload: bytes::Bytes,
        retain: bool,
        expiry: Option<Duration>,
    ) -> bool {
        let properties = expiry.map(|e| codec::PublishProperties {
            message_expiry_interval: Some(u32::try_from(e.as_secs().max(1)).unwrap_or(u32::MAX)),
            ..Default::default()
        });
        let mut publish = Publish::new(topic, codec::QoS::AtLeastOnce, payload, properties);
        publish.retain = retain;
        self.0.publish("weir", publish, None, false).await
    }
}

/// What became of a publish handed to [`Shared::publish_now`].
enum Published {
    Done,
    /// The pipeline has stopped.
    Stopped,
    /// The pipeline's queue is full: the message waits for room.
    QueueFull(Message),
}

/// What every connection task shares.
pub(crate) struct Shared {
    options: ServerOptions,
    state: Mutex<BrokerState>,
    ingest: mpsc::Sender<Message>,
    metrics: Arc<Metrics>,
    next_connection: AtomicU64,
    connections: AtomicUsize,
    /// Where the pipeline's acks for each connection go.
    ack_routes: Mutex<HashMap<u64, Arc<Inbox>>>,
    shutdown: CancellationToken,
}

/// The broker state, locked; its sizes go to `/metrics` when it is let go.
struct StateGuard<'a> {
    guard: MutexGuard<'a, BrokerState>,
    metrics: &'a Metrics,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = BrokerState;
    fn deref(&self) -> &BrokerState {
        &self.guard
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut BrokerState {
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let m = &self.metrics.broker;
        m.sessions
            .store(self.guard.sessions.len() as i64, Ordering::Relaxed);
        m.subscriptions
            .store(self.guard.subscriptions.len() as i64, Ordering::Relaxed);
        m.retained
            .store(self.guard.retained.len() as i64, Ordering::Relaxed);
        m.retained_refused.store(
            i64::try_from(self.guard.retained_refused).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl Server {
    /// Binds the listener (port 0 picks a free one).
    pub async fn bind(
        options: ServerOptions,
        ingest: mpsc::Sender<Message>,
        store: Option<crate::store::Store>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Server, ServerError> {
        let listener =
            TcpListener::bind(options.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: options.listen,
                    source,
                })?;
        let tls_listener = match (options.tls_listen, &options.tls) {
            (Some(addr), Some(config)) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Listen { addr, source })?;
                Some((listener, tokio_rustls::TlsAcceptor::from(config.clone())))
            }
            _ => None,
        };
        let mut state = BrokerState::new(options.max_queued, options.max_retained, store);
        state.set_max_retained_bytes(options.max_retained_bytes);
        let expiring = state.restore();
        if !state.sessions.is_empty() || !state.retained.is_empty() {
            tracing::info!(
                sessions = state.sessions.len(),
                retained = state.retained.len(),
                "MQTT sessions and retained messages restored"
            );
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            options,
            ingest,
            metrics,
            next_connection: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            ack_routes: Mutex::new(HashMap::new()),
            shutdown,
        });
        for (client, expiry) in expiring {
            shared.expire_later(client, expiry, 0);
        }
        Ok(Server {
            listener,
            tls_listener,
            shared,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The TLS listener's address, when there is one.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls_listener
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
    }

    /// Publishes from inside weir, as weir.
    pub fn publisher(&self) -> Publisher {
        Publisher(self.shared.clone())
    }

    /// Accepts connections and routes the pipeline's acks until shutdown.
    pub async fn serve(self, mut acks: mpsc::UnboundedReceiver<Vec<AckToken>>) {
        let shared = self.shared;
        let dispatcher = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(batch) = acks.recv().await {
                    shared.dispatch_acks(batch);
                }
            })
        };
        let tasks = tokio_util::task::TaskTracker::new();
        let tls_accept = async |tls: &Option<(TcpListener, tokio_rustls::TlsAcceptor)>| match tls {
            Some((listener, acceptor)) => (listener.accept().await, Some(acceptor.clone())),
            None => std::future::pending().await,
        };
        loop {
            let (accepted, tls) = tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                accepted = self.listener.accept() => (accepted, None),
                accepted = tls_accept(&self.tls_listener) => accepted,
            };
            match accepted {
                Ok((socket, peer)) => {
                    let shared = shared.clone();
                    tasks.spawn(connection::run(shared, socket, peer, tls));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tasks.close();
        tasks.wait().await;
        dispatcher.abort();
    }
}

impl Shared {
    fn state(&self) -> StateGuard<'_> {
        // A panic while holding the lock leaves maps that are still
        // consistent (every update is a single insert or remove).
        StateGuard {
            guard: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            metrics: &self.metrics,
        }
    }

    /// Ends `client`'s session `expiry` seconds from now, if it is still
    /// offline in the same disconnected period (`generation`) then.
    fn expire_later(self: &Arc<Self>, client: String, expiry: u32, generation: u64) {
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shared.shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(expiry as u64)) => {
                    let mut broker = shared.state();
                    if broker.sessions.get(&client).is_some_and(|s| s.online.is_none() && s.generation == generation) {
                        broker.end_session(&client);
                    }
                }
            }
        });
    }

    fn is_stream_topic(&self, topic: &str) -> bool {
        self.options
            .stream_filters
            .iter()
            .any(|f| topics::matches(f, topic))
    }

    /// Hands each connection the packet ids the pipeline made durable.
    fn dispatch_acks(&self, batch: Vec<AckToken>) {
        let routes = self.ack_routes.lock().unwrap_or_else(|e| e.into_inner());
        // A connection's tokens come in runs (its publishes in order).
        for run in batch.chunk_by(|a, b| a.connection == b.connection) {
            if let Some(inbox) = routes.get(&run[0].connection) {
                inbox.acks(run.iter().map(|t| t.pkid));
            }
        }
    }

    /// Retains, routes to subscribers and, for a stream's topic, queues for
    /// the pipeline (waiting while its queue is full). `ack` comes back
    /// through the dispatcher once the events are durable. False when the
    /// pipeline has stopped.
    async fn publish(
        &self,
        origin: &str,
        publish: Publish,
        ack: Option<AckToken>,
        dup: bool,
    ) -> bool {
        match self.publish_now(origin, publish, ack, dup) {
            Published::Done => true,
            Published::Stopped => false,
            Published::QueueFull(message) => self.wait_to_ingest(message).await,
        }
    }

    /// [`Shared::publish`] up to the point where it would wait: a connection
    /// task waits for the pipeline's queue in a future of its own, so that
    /// the state it keeps while idle stays small.
    fn publish_now(
        &self,
        origin: &str,
        publish: Publish,
        ack: Option<AckToken>,
        dup: bool,
    ) -> Published {
        let expires_at = publish
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| Instant::now() + Duration::from_secs(s as u64));
        let routed = {
            let mut state = self.state();
            if publish.retain {
                state.retain(&publish, expires_at);
            }
            state.route(origin, &publish, expires_at)
        };
        let m = &self.metrics.broker;
        m.messages_received.fetch_add(1, Ordering::Relaxed);
        m.deliveries.fetch_add(routed.delivered, Ordering::Relaxed);
        m.deliveries_dropped
            .fetch_add(routed.dropped, Ordering::Relaxed);
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Published::Done;
        };
        // An empty retained message clears the retained one: a command to
        // the broker, not data.
        if (publish.retain && publish.payload.is_empty()) || !self.is_stream_topic(topic) {
            return Published::Done;
        }
        let message = Message {
            topic: topic.to_string(),
            payload: publish.payload,
            received_at: now_ms(),
            ack,
            dup,
        };
        match self.ingest.try_send(message) {
            Ok(()) => Published::Done,
            Err(mpsc::error::TrySendError::Closed(_)) => Published::Stopped,
            Err(mpsc::error::TrySendError::Full(message)) => Published::QueueFull(message),
        }
    }

    /// Waits for room in the pipeline's queue (the time counts as the
    /// source blocked); false when the pipeline has stopped.
    async fn wait_to_ingest(&self, message: Message) -> bool {
        let blocked = std::time::Instant::now();
        let sent = self.ingest.send(message).await.is_ok();
        self.metrics
            .source_blocked_ns
            .fetch_add(blocked.elapsed().as_nanos() as u64, Ordering::Relaxed);
        sent
    }
}
