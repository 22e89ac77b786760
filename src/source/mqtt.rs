//! The MQTT subscriber (rumqttc): one subscription per stream topic filter.
//!
//! Messages go into a bounded channel to the pipeline. When the channel is
//! full the send waits, the event loop is not polled, and so weir stops
//! reading from the broker (backpressure) instead of buffering without bound;
//! the time spent waiting is `weir_source_blocked_seconds_total`.
//!
//! Session: persistent (`clean_session = false`, the configured client id),
//! so the broker queues QoS 1 messages while weir is down or replaying. When
//! the broker reports no session (first connect, or it lost it) the filters
//! are subscribed again; when it has one they are not, because subscribing
//! again would redeliver retained messages.
//!
//! Acknowledgement: acks are manual. A QoS 1 message is acknowledged (PUBACK)
//! only once the pipeline has appended it to the durable ingest log; the
//! pipeline sends its `AckToken`s back over `acks`. Tokens carry the
//! connection they came on: one from an earlier connection is not sent,
//! since the broker redelivers that message anyway (and the log's dedup
//! recognises it).
//!
//! Several connections (`mqtt.connections`): each runs this loop with its
//! own client id (`<client_id>-<n>` after the first) on one shared
//! subscription (`$share/weir/<filter>`), so the broker spreads the
//! messages over them and each has its own in-flight window. The top 16
//! bits of an ack token's connection number say which of them it belongs to.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::decode::{AckToken, Message};
use crate::obs::{now_ms, Metrics};

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `mqtts://`: the TLS client config (trusted CAs, client certificate).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// (filter, qos) per stream.
    pub filters: Vec<(String, u8)>,
    pub max_packet_bytes: usize,
    /// Which of `total` connections this is (0-based).
    pub index: usize,
    pub total: usize,
}

impl SourceOptions {
    /// The options of connection `index` of `total`: its client id and, when
    /// there are several, the filters as one shared subscription.
    pub fn nth(&self, index: usize, total: usize) -> SourceOptions {
        let mut o = self.clone();
        o.index = index;
        o.total = total;
        if index > 0 {
            o.client_id = format!("{}-{index}", self.client_id);
        }
        if total > 1 {
            o.filters = self
                .filters
                .iter()
                .map(|(f, q)| (format!("$share/weir/{f}"), *q))
                .collect();
        }
        o
    }
}

/// The connection an ack token belongs to, among `mqtt.connections`.
pub fn source_of(token: &AckToken) -> usize {
    (token.connection >> 48) as usize
}

/// Runs until `shutdown`; `ready` is set while connected and subscribed.
pub async fn run(
    options: SourceOptions,
    tx: mpsc::Sender<Message>,
    mut acks: mpsc::UnboundedReceiver<Vec<AckToken>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    subscribed: Arc<std::sync::atomic::AtomicUsize>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut is_subscribed = false;
    // Ready once every connection is subscribed.
    let mark = |now: bool, was: &mut bool| {
        if now != *was {
            let n = if now {
                subscribed.fetch_add(1, Ordering::SeqCst) + 1
            } else {
                subscribed.fetch_sub(1, Ordering::SeqCst) - 1
            };
            *was = now;
            ready.store(n == options.total, Ordering::SeqCst);
            metrics.mqtt_connected.store(n as i64, Ordering::Relaxed);
        }
    };
    let mut mqtt = MqttOptions::new(
        options.client_id.clone(),
        options.host.clone(),
        options.port,
    );
    mqtt.set_keep_alive(Duration::from_secs(15));
    // Packets above our own limit are still read (and dead-lettered as
    // oversize by the decoder) rather than dropping the connection.
    let incoming_limit = options.max_packet_bytes.saturating_mul(8);
    mqtt.set_max_packet_size(incoming_limit, incoming_limit);
    mqtt.set_clean_session(false);
    mqtt.set_manual_acks(true);
    if let Some(user) = &options.username {
        mqtt.set_credentials(user.clone(), options.password.clone().unwrap_or_default());
    }
    if let Some(tls) = &options.tls {
        mqtt.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(mqtt, 64);
    let filters: Vec<SubscribeFilter> = options
        .filters
        .iter()
        .map(|(f, q)| {
            SubscribeFilter::new(
                f.clone(),
                if *q == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                },
            )
        })
        .collect();
    let mut backoff = Duration::from_millis(100);
    let mut pending_subacks = 0usize;
    // Counts connections, so acks from an earlier one are dropped; the top
    // 16 bits are this source's index.
    let mut connection = (options.index as u64) << 48;
    // Acks that did not fit the client's request queue yet.
    let mut unsent: std::collections::VecDeque<AckToken> = std::collections::VecDeque::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(batch) = acks.recv() => {
                unsent.extend(batch.into_iter().filter(|a| a.connection == connection));
                send_acks(&client, &mut unsent);
                tracing::trace!(unsent = unsent.len(), connection, "acks queued");
                continue;
            }
            event = eventloop.poll() => event,
        };
        send_acks(&client, &mut unsent);
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connection += 1;
                unsent.clear();
                backoff = Duration::from_millis(100);
                tracing::info!(host = %options.host, port = options.port, session_present = ack.session_present, "connected to MQTT broker");
                if ack.session_present || filters.is_empty() {
                    mark(true, &mut is_subscribed);
                } else {
                    // try_ because the request channel is drained by this very
                    // loop, so an awaiting send could deadlock.
                    pending_subacks = 1;
                    if let Err(e) = client.try_subscribe_many(filters.clone()) {
                        tracing::warn!(error = %e, "could not queue subscriptions");
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let failed = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if failed {
                    tracing::error!("broker refused a subscription");
                }
                pending_subacks = pending_subacks.saturating_sub(1);
                if pending_subacks == 0 {
                    mark(true, &mut is_subscribed);
                    tracing::info!(filters = ?options.filters, "subscribed");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let ack = (publish.qos != QoS::AtMostOnce).then_some(AckToken {
                    connection,
                    pkid: publish.pkid,
                });
                let message = Message {
                    topic: publish.topic,
                    payload: publish.payload,
                    received_at: now_ms(),
                    ack,
                    dup: publish.dup,
                };
                metrics.ingest_queue_depth.store(
                    (tx.max_capacity() - tx.capacity()) as i64,
                    Ordering::Relaxed,
                );
                match tx.try_send(message) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                    Err(mpsc::error::TrySendError::Full(message)) => {
                        // Backpressure: stop reading from the broker until there is room.
                        let blocked = std::time::Instant::now();
                        let sent = tokio::select! {
                            _ = shutdown.cancelled() => break,
                            sent = tx.send(message) => sent,
                        };
                        metrics
                            .source_blocked_ns
                            .fetch_add(blocked.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        if sent.is_err() {
                            break;
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                mark(false, &mut is_subscribed);
                metrics.mqtt_reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    mark(false, &mut is_subscribed);
    // Send the acks already owed, then a clean DISCONNECT (the session stays).
    send_acks(&client, &mut unsent);
    if client.try_disconnect().is_ok() {
        let flush = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
    }
}

/// Queues PUBACKs on the client without waiting: the request queue is drained
/// by this same task's `poll`, so an awaiting send could deadlock.
fn send_acks(client: &AsyncClient, unsent: &mut std::collections::VecDeque<AckToken>) {
    while let Some(token) = unsent.front() {
        let mut publish = rumqttc::Publish::new("", QoS::AtLeastOnce, Vec::<u8>::new());
        publish.pkid = token.pkid;
        if client.try_ack(&publish).is_err() {
            return;
        }
        unsent.pop_front();
    }
}
