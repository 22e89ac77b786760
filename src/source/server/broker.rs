//! The broker's shared state: sessions, subscriptions, retained messages,
//! and routing a message to every session that wants it.
//!
//! One `std::sync::Mutex` guards it all; it is held only for map lookups and
//! queue pushes, never across an await or I/O. A session is either *online*
//! (a connection task owns its delivery state and gets messages through its
//! [`Inbox`], up to `max_queued` waiting) or *offline* (its state is here, and QoS 1 and 2
//! messages queue in it, up to `max_queued`, until it reconnects or expires).
//!
//! With a store, what must outlive weir itself is written through as it
//! changes: each persistent session's expiry and subscriptions (so that a
//! client that reconnects after weir restarted finds its session and resends
//! what was not acknowledged), and the retained messages. Queued deliveries
//! to offline subscribers are not kept across a restart of weir.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::codec::{detach_message, detach_publish, QoS};
use super::topics::{matches, SubscriptionTree};
use crate::store::Store;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties, RetainForwardRule};

/// A message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// The publisher's properties (no topic alias), with this session's
    /// subscription identifiers.
    /// Boxed: most messages have none, and deliveries queue by the thousand.
    pub properties: Option<Box<PublishProperties>>,
    pub expires_at: Option<Instant>,
}

impl Delivery {
    /// Copies the message out of the read buffer it arrived in (see
    /// [`detach`]), for a delivery kept while its session is offline.
    pub fn detach(&mut self) {
        let correlation_data = self
            .properties
            .as_mut()
            .and_then(|p| p.correlation_data.as_mut());
        detach_message(&mut self.topic, &mut self.payload, correlation_data);
    }

    /// The PUBLISH to send, or `None` if the message expired on the way.
    pub fn to_publish(&self, pkid: u16, dup: bool, now: Instant) -> Option<Publish> {
        let mut properties = self.properties.as_deref().cloned();
        if let Some(at) = self.expires_at {
            let left = at.checked_duration_since(now)?;
            if let Some(p) = properties.as_mut() {
                // Rounded up: a message with time left never says 0.
                p.message_expiry_interval = Some(left.as_secs_f64().ceil() as u32);
            }
        }
        Some(Publish {
            dup,
            qos: self.qos,
            retain: self.retain,
            topic: self.topic.clone(),
            pkid,
            payload: self.payload.clone(),
            properties,
        })
    }
}

/// Where a QoS 1 or 2 message sent to a client is in its handshake.
#[derive(Debug, Clone)]
pub enum OutFlight {
    /// Sent; PUBACK (QoS 1) or PUBREC (QoS 2) expected.
    Published(Delivery),
    /// PUBREC received, PUBREL sent; PUBCOMP expected.
    Released,
}

/// What a session keeps between connections.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Sent to the client and not yet acknowledged, by packet id, in order sent.
    pub inflight: BTreeMap<u16, OutFlight>,
    /// Waiting to be sent (the client's receive maximum is reached, or it is offline).
    pub queue: VecDeque<Delivery>,
    pub next_pkid: u16,
    /// Incoming QoS 2 packet ids acknowledged with PUBREC, awaiting PUBREL.
    pub awaiting_release: HashSet<u16>,
    /// Messages dropped because the queue was full.
    pub dropped: u64,
}

impl SessionState {
    /// The next packet id not in flight (1..=65535).
    pub fn take_pkid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return Some(self.next_pkid);
            }
        }
        None
    }

    /// Copies every kept message out of the read buffers they arrived in,
    /// as the session goes offline (see [`Delivery::detach`]).
    pub fn detach(&mut self) {
        for d in self.queue.iter_mut() {
            d.detach();
        }
        for flight in self.inflight.values_mut() {
            if let OutFlight::Published(d) = flight {
                d.detach();
            }
        }
    }

    /// Queues a delivery, dropping the oldest QoS 0 message (or else this
    /// one) when the queue is full. True when it was kept.
    pub fn enqueue(&mut self, delivery: Delivery, max_queued: usize) -> bool {
        if self.queue.len() >= max_queued {
            match self.queue.iter().position(|d| d.qos == QoS::AtMostOnce) {
                Some(i) => {
                    self.queue.remove(i);
                }
                None => {
                    self.dropped += 1;
                    return false;
                }
            }
            self.dropped += 1;
        }
        self.queue.push_back(delivery);
        true
    }
}

/// A subscription's options.
#[derive(Debug, Clone, PartialEq)]
pub struct SubOptions {
    /// The filter without its `$share/{group}/` prefix.
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainForwardRule,
    pub identifier: Option<usize>,
}

/// Messages to a connection task.
#[derive(Debug)]
pub enum ToConnection {
    Deliver(Delivery),
    /// Another connection took the client id: hand the state over and close.
    TakeOver {
        state: oneshot::Sender<SessionState>,
        /// The new connection starts clean: the old session ends (its will goes now).
        clean: bool,
    },
}

/// What one connection is handed from outside its task: messages from the
/// broker side, and the packet ids of its publishes the pipeline has made
/// durable; and a wake-up.
///
/// Not channels: every connected terminal has one, and two tokio channels
/// cost ~2.4 KiB a connection before anything is sent (each cache-padded
/// channel state, and a first block of 32 slots); this is ~100 bytes.
#[derive(Debug, Default)]
pub struct Inbox {
    waiting: std::sync::Mutex<Waiting>,
    ready: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Waiting {
    messages: VecDeque<ToConnection>,
    acks: Vec<u16>,
    /// The connection has ended: nothing more is taken in.
    closed: bool,
}

impl Inbox {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a delivery over; false (not handed) when `max` messages are
    /// already waiting for the connection.
    pub fn deliver(&self, d: Delivery, max: usize) -> bool {
        {
            let mut waiting = self.waiting();
            if waiting.closed || waiting.messages.len() >= max {
                return false;
            }
            waiting.messages.push_back(ToConnection::Deliver(d));
        }
        // Stored as a permit when the connection is not waiting.
        self.ready.notify_one();
        true
    }

    /// A message that goes through however many are waiting (a takeover);
    /// dropped at once when the connection has ended.
    pub fn tell(&self, message: ToConnection) {
        let mut waiting = self.waiting();
        if !waiting.closed {
            waiting.messages.push_back(message);
            drop(waiting);
            self.ready.notify_one();
        }
    }

    /// The connection has ended: what waits is dropped (a takeover's
    /// reply channel with it, so a new connection waits no longer), and
    /// nothing more is taken in.
    pub fn close(&self) {
        let mut waiting = self.waiting();
        waiting.closed = true;
        waiting.messages.clear();
        waiting.acks.clear();
    }

    pub fn acks(&self, pkids: impl Iterator<Item = u16>) {
        self.waiting().acks.extend(pkids);
        self.ready.notify_one();
    }

    /// Wakes when something was handed over since the last [`Inbox::take`].
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Everything handed over so far: the acked packet ids, and the
    /// messages in order.
    pub fn take(&self) -> (Vec<u16>, VecDeque<ToConnection>) {
        let mut waiting = self.waiting();
        (
            std::mem::take(&mut waiting.acks),
            std::mem::take(&mut waiting.messages),
        )
    }
}

#[derive(Debug)]
pub struct Online {
    pub connection: u64,
    pub inbox: std::sync::Arc<Inbox>,
    /// Ends the connection even while it is stuck writing to a client that
    /// does not read (a takeover must not wait on it).
    pub kick: tokio_util::sync::CancellationToken,
}

#[derive(Debug)]
pub struct Session {
    pub online: Option<Online>,
    /// The delivery state while offline.
    pub stored: SessionState,
    /// Seconds the session outlives its connection (`u32::MAX`: forever).
    pub expiry: u32,
    /// Bumped on every connect and disconnect, so a timer set for one
    /// disconnected period does nothing in another.
    pub generation: u64,
    /// Full filter text (with `$share/...`) -> options.
    pub subscriptions: HashMap<String, SubOptions>,
}

/// A retained message, as kept for as long as its topic has it (the
/// topic is the map's key): 64 bytes besides the topic and payload, where a
/// whole `Publish` took 216 and held the topic a second time
/// (`cargo bench --bench retained`: 426 bytes a retained status before,
/// BENCHMARKS.md "Retained messages in a third of the memory").
/// The payload is copied out of the read buffer it arrived in, and copied
/// again for each delivery (retained deliveries happen on subscribe).
#[derive(Debug, Clone)]
pub struct Retained {
    pub payload: Box<[u8]>,
    pub qos: QoS,
    pub expires_at: Option<Instant>,
    /// The publisher's properties, without topic alias and subscription
    /// identifiers; `None` when nothing else was set.
    pub properties: Option<Box<PublishProperties>>,
}

impl Retained {
    fn new(publish: &Publish, expires_at: Option<Instant>) -> Self {
        // the correlation data is detached with the payload: the rest of
        // the properties are owned strings
        let properties = forwarded_properties(publish)
            .map(|mut p| {
                if let Some(data) = p.correlation_data.as_mut() {
                    *data = super::codec::detach(data);
                }
                p
            })
            .filter(|p| **p != empty_properties());
        Retained {
            payload: Box::from(&publish.payload[..]),
            qos: publish.qos,
            expires_at,
            properties,
        }
    }

    /// The message for a subscriber of `options`, on `topic`.
    fn delivery(&self, topic: &str, options: &SubOptions) -> Delivery {
        let mut d = Delivery {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::copy_from_slice(&self.payload),
            qos: qos_min(options.qos, self.qos),
            retain: true,
            properties: self.properties.clone(),
            expires_at: self.expires_at,
        };
        add_identifier(&mut d, options.identifier);
        d
    }
}

/// Counts the routing does, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    pub delivered: u64,
    pub dropped: u64,
}

/// How often, at most, expired retained messages are looked for (besides
/// when `max_retained` is reached, and when a client subscribes).
const RETAINED_SWEEP: Duration = Duration::from_secs(10);

/// What a client's retained message counts against `max_retained_bytes`.
fn retained_bytes(topic: &str, r: &Retained) -> usize {
    topic.len() + r.payload.len()
}

/// Where the store keeps retained messages: `r/{topic}`.
const RETAINED_PREFIX: &[u8] = b"r/";

/// Whether a retained message on `topic` is one of weir's own alert
/// notifications (only weir publishes under `weir/alerts/`).
fn is_own_retained(topic: &str) -> bool {
    matches(crate::auth::mqtt::ALERTS_FILTER, topic)
}

fn retained_key(topic: &[u8]) -> Vec<u8> {
    [RETAINED_PREFIX, topic].concat()
}

#[derive(Debug)]
pub struct BrokerState {
    pub sessions: HashMap<String, Session>,
    pub subscriptions: SubscriptionTree<SubOptions>,
    pub retained: HashMap<Box<str>, Retained>,
    /// Round-robin position per shared subscription (group, filter).
    share_cursor: HashMap<(String, String), usize>,
    pub max_queued: usize,
    /// Retained messages clients may keep (`mqtt.max_retained`).
    max_retained: usize,
    /// Of `retained`, those under `weir/alerts/`: weir's own alert
    /// notifications, which only weir may publish. They do not count
    /// against `max_retained`, which bounds what clients retain (a fleet's
    /// retained status messages can fill it alone): there is at most one
    /// per rule and key, and a resolved alert's expires.
    own_retained: usize,
    /// Bytes (topics and payloads) clients' retained messages may take
    /// (`mqtt.max_retained_bytes`), and what they take.
    max_retained_bytes: usize,
    clients_retained_bytes: usize,
    /// Retained messages not kept because `max_retained` or
    /// `max_retained_bytes` was reached.
    pub retained_refused: u64,
    /// The earliest expiry among the retained messages (`None`: none
    /// expires), and when expired ones were last dropped.
    next_retained_expiry: Option<Instant>,
    last_retained_sweep: Option<Instant>,
    next_generation: u64,
    store: Option<Store>,
}

/// A persistent session as stored: enough to restore it offline.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSession {
    expiry: u32,
    subscriptions: Vec<StoredSubscription>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSubscription {
    /// Full filter text, with `$share/{group}/`.
    text: String,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    identifier: Option<u64>,
}

/// A retained message as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredRetained {
    payload: Vec<u8>,
    qos: u8,
    /// Epoch ms after which it is gone.
    expires_at_ms: Option<i64>,
    payload_format_indicator: Option<u8>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<Vec<u8>>,
    user_properties: Vec<(String, String)>,
}

fn qos_from(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl BrokerState {
    pub fn new(max_queued: usize, max_retained: usize, store: Option<Store>) -> Self {
        Self {
            max_retained,
            max_retained_bytes: 256 << 20,
            clients_retained_bytes: 0,
            own_retained: 0,
            retained_refused: 0,
            next_retained_expiry: None,
            last_retained_sweep: None,
            sessions: HashMap::new(),
            subscriptions: SubscriptionTree::default(),
            retained: HashMap::new(),
            share_cursor: HashMap::new(),
            max_queued,
            next_generation: 0,
            store,
        }
    }

    /// Loads the stored sessions (offline) and retained messages; returns
    /// the sessions with a finite expiry, whose timers the caller starts.
    pub fn restore(&mut self) -> Vec<(String, u32)> {
        let Some(store) = self.store.clone() else {
            return Vec::new();
        };
        let mut expiring = Vec::new();
        match store.broker_records(b"s/") {
            Ok(records) => {
                for (key, value) in records {
                    let client = String::from_utf8_lossy(&key[2..]).into_owned();
                    let Ok(stored) = postcard::from_bytes::<StoredSession>(&value) else {
                        tracing::warn!(%client, "stored MQTT session unreadable; dropped");
                        continue;
                    };
                    let mut session = Session {
                        online: None,
                        stored: SessionState::default(),
                        expiry: stored.expiry,
                        generation: 0,
                        subscriptions: HashMap::new(),
                    };
                    for sub in stored.subscriptions {
                        let Ok((group, filter)) = super::topics::parse_filter(&sub.text) else {
                            continue;
                        };
                        let options = SubOptions {
                            filter: filter.to_string(),
                            qos: qos_from(sub.qos),
                            no_local: sub.no_local,
                            retain_as_published: sub.retain_as_published,
                            retain_handling: match sub.retain_handling {
                                0 => RetainForwardRule::OnEverySubscribe,
                                1 => RetainForwardRule::OnNewSubscribe,
                                _ => RetainForwardRule::Never,
                            },
                            identifier: sub.identifier.map(|i| i as usize),
                        };
                        self.subscriptions
                            .insert(filter, &client, group, options.clone());
                        session.subscriptions.insert(sub.text, options);
                    }
                    if stored.expiry != u32::MAX {
                        expiring.push((client.clone(), stored.expiry));
                    }
                    self.sessions.insert(client, session);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the stored MQTT sessions"),
        }
        let now_ms = crate::obs::now_ms();
        let now = Instant::now();
        match store.broker_records(RETAINED_PREFIX) {
            Ok(records) => {
                for (key, value) in records {
                    let topic = String::from_utf8_lossy(&key[RETAINED_PREFIX.len()..]);
                    let Ok(r) = postcard::from_bytes::<StoredRetained>(&value) else {
                        continue;
                    };
                    let left = match r.expires_at_ms {
                        Some(at) if at <= now_ms => {
                            if let Err(e) = store.put_broker(&key, None) {
                                tracing::warn!(error = %e, "cannot remove an expired retained message");
                            }
                            continue;
                        }
                        Some(at) => {
                            Some(now + std::time::Duration::from_millis((at - now_ms) as u64))
                        }
                        None => None,
                    };
                    let has_properties = r.payload_format_indicator.is_some()
                        || r.content_type.is_some()
                        || r.response_topic.is_some()
                        || r.correlation_data.is_some()
                        || !r.user_properties.is_empty();
                    let retained = Retained {
                        payload: r.payload.into_boxed_slice(),
                        qos: qos_from(r.qos),
                        expires_at: left,
                        properties: has_properties.then(|| {
                            Box::new(PublishProperties {
                                payload_format_indicator: r.payload_format_indicator,
                                content_type: r.content_type,
                                response_topic: r.response_topic,
                                correlation_data: r.correlation_data.map(Bytes::from),
                                user_properties: r.user_properties,
                                ..empty_properties()
                            })
                        }),
                    };
                    self.note_retained_expiry(left);
                    self.keep_retained(topic.into(), retained);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the stored retained messages"),
        }
        expiring
    }

    /// Writes a persistent session's record (or removes it, once it is not persistent).
    pub fn save_session(&self, client: &str) {
        let Some(store) = &self.store else { return };
        let key = [b"s/".as_slice(), client.as_bytes()].concat();
        let record = self.sessions.get(client).filter(|s| s.expiry > 0).map(|s| {
            let mut subscriptions: Vec<StoredSubscription> = s
                .subscriptions
                .iter()
                .map(|(text, o)| StoredSubscription {
                    text: text.clone(),
                    qos: o.qos as u8,
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    retain_handling: match o.retain_handling {
                        RetainForwardRule::OnEverySubscribe => 0,
                        RetainForwardRule::OnNewSubscribe => 1,
                        RetainForwardRule::Never => 2,
                    },
                    identifier: o.identifier.map(|i| i as u64),
                })
                .collect();
            subscriptions.sort_by(|a, b| a.text.cmp(&b.text));
            StoredSession {
                expiry: s.expiry,
                subscriptions,
            }
        });
        let bytes = record.and_then(|r| postcard::to_allocvec(&r).ok());
        if let Err(e) = store.put_broker(&key, bytes.as_deref()) {
            tracing::warn!(%client, error = %e, "cannot store the MQTT session");
        }
    }

    pub fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Ends a session: its subscriptions go; its state is returned.
    pub fn end_session(&mut self, client: &str) -> Option<Session> {
        let session = self.sessions.remove(client)?;
        if session.expiry > 0 {
            self.save_session(client);
        }
        for filter in session.subscriptions.keys() {
            if let Ok((group, path)) = super::topics::parse_filter(filter) {
                self.subscriptions.remove(path, client, group);
            }
        }
        Some(session)
    }

    /// Keeps or clears the retained message of `publish`'s topic.
    pub fn retain(&mut self, publish: &Publish, expires_at: Option<Instant>) {
        self.retain_at(publish, expires_at, Instant::now());
    }

    fn retain_at(&mut self, publish: &Publish, expires_at: Option<Instant>, now: Instant) {
        let topic = String::from_utf8_lossy(&publish.topic);
        let own = is_own_retained(&topic);
        let payload = publish.payload.len();
        let swept_lately = self
            .last_retained_sweep
            .is_some_and(|at| now.saturating_duration_since(at) < RETAINED_SWEEP);
        if !swept_lately || self.refuses(&topic, own, payload) {
            self.drop_expired_retained(now);
        }
        if self.refuses(&topic, own, payload) {
            // not kept, and what the topic had is no longer its retained
            // message: a later subscriber gets nothing rather than a stale one
            self.retained_refused += 1;
            if self.forget_retained(&topic) {
                self.unstore_retained(&topic);
            }
            return;
        }
        self.note_retained_expiry(expires_at);
        self.store_retained(publish, expires_at);
        if payload == 0 {
            self.forget_retained(&topic);
        } else {
            let retained = Retained::new(publish, expires_at);
            match self.retained.get_mut(&*topic) {
                Some(kept) => {
                    if !own {
                        self.clients_retained_bytes = self.clients_retained_bytes
                            - retained_bytes(&topic, kept)
                            + retained_bytes(&topic, &retained);
                    }
                    *kept = retained;
                }
                None => self.keep_retained(topic.into(), retained),
            }
        }
    }

    /// Whether a client's retained message of `payload` bytes on `topic`
    /// is not kept: it would pass `max_retained` or `max_retained_bytes`.
    /// weir's own, and clearing a topic, always are.
    fn refuses(&self, topic: &str, own: bool, payload: usize) -> bool {
        if own || payload == 0 {
            return false;
        }
        let kept = self.retained.get(topic);
        let bytes = self.clients_retained_bytes - kept.map_or(0, |r| retained_bytes(topic, r))
            + topic.len()
            + payload;
        (kept.is_none() && self.clients_retained() >= self.max_retained)
            || bytes > self.max_retained_bytes
    }

    /// Sets `mqtt.max_retained_bytes` (`new` sets 256 MiB).
    pub fn set_max_retained_bytes(&mut self, bytes: usize) {
        self.max_retained_bytes = bytes;
    }

    /// Retained messages that count against `max_retained`.
    fn clients_retained(&self) -> usize {
        self.retained.len().saturating_sub(self.own_retained)
    }

    /// Keeps `retained` for `topic`, which has none.
    fn keep_retained(&mut self, topic: Box<str>, retained: Retained) {
        if is_own_retained(&topic) {
            self.own_retained += 1;
        } else {
            self.clients_retained_bytes += retained_bytes(&topic, &retained);
        }
        self.retained.insert(topic, retained);
    }

    /// Drops `topic`'s retained message from memory; whether it had one.
    fn forget_retained(&mut self, topic: &str) -> bool {
        let Some(old) = self.retained.remove(topic) else {
            return false;
        };
        if is_own_retained(topic) {
            self.own_retained = self.own_retained.saturating_sub(1);
        } else {
            self.clients_retained_bytes -= retained_bytes(topic, &old);
        }
        true
    }

    fn unstore_retained(&self, topic: &str) {
        if let Some(store) = &self.store {
            if let Err(e) = store.put_broker(&retained_key(topic.as_bytes()), None) {
                tracing::warn!(error = %e, "cannot remove a retained message");
            }
        }
    }

    fn note_retained_expiry(&mut self, expires_at: Option<Instant>) {
        if let Some(at) = expires_at {
            self.next_retained_expiry = Some(self.next_retained_expiry.map_or(at, |n| n.min(at)));
        }
    }

    /// Drops the retained messages whose expiry has passed, from memory and
    /// from the store, once the earliest of them has: expired messages are
    /// never delivered, and they would count against `max_retained`.
    fn drop_expired_retained(&mut self, now: Instant) {
        self.last_retained_sweep = Some(now);
        if self.next_retained_expiry.is_none_or(|at| at > now) {
            return;
        }
        let mut next: Option<Instant> = None;
        let mut gone = Vec::new();
        let mut own_gone = 0;
        let mut bytes_gone = 0;
        self.retained.retain(|topic, r| match r.expires_at {
            Some(at) if at <= now => {
                if is_own_retained(topic) {
                    own_gone += 1;
                } else {
                    bytes_gone += retained_bytes(topic, r);
                }
                gone.push(topic.clone());
                false
            }
            Some(at) => {
                next = Some(next.map_or(at, |n| n.min(at)));
                true
            }
            None => true,
        });
        self.next_retained_expiry = next;
        self.own_retained = self.own_retained.saturating_sub(own_gone);
        self.clients_retained_bytes -= bytes_gone;
        for topic in gone {
            self.unstore_retained(&topic);
        }
    }

    fn store_retained(&self, publish: &Publish, expires_at: Option<Instant>) {
        let Some(store) = &self.store else { return };
        let key = retained_key(&publish.topic);
        let record = (!publish.payload.is_empty()).then(|| {
            let p = publish.properties.as_ref();
            StoredRetained {
                payload: publish.payload.to_vec(),
                qos: publish.qos as u8,
                expires_at_ms: expires_at.map(|at| {
                    crate::obs::now_ms()
                        + at.saturating_duration_since(Instant::now()).as_millis() as i64
                }),
                payload_format_indicator: p.and_then(|p| p.payload_format_indicator),
                content_type: p.and_then(|p| p.content_type.clone()),
                response_topic: p.and_then(|p| p.response_topic.clone()),
                correlation_data: p.and_then(|p| p.correlation_data.as_ref().map(|b| b.to_vec())),
                user_properties: p.map(|p| p.user_properties.clone()).unwrap_or_default(),
            }
        });
        let bytes = record.and_then(|r| postcard::to_allocvec(&r).ok());
        if let Err(e) = store.put_broker(&key, bytes.as_deref()) {
            tracing::warn!(error = %e, "cannot store a retained message");
        }
    }

    /// The retained messages matching `filter`, unexpired, as deliveries.
    pub fn retained_for(
        &mut self,
        filter: &str,
        options: &SubOptions,
        now: Instant,
    ) -> Vec<Delivery> {
        self.drop_expired_retained(now);
        let mut out: Vec<Delivery> = self
            .retained
            .iter()
            .filter(|(topic, _)| matches(filter, topic))
            .map(|(topic, r)| r.delivery(topic, options))
            .collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// Sends `publish` to every session subscribed to its topic: once per
    /// session, at the highest QoS any of its matching subscriptions granted
    /// (capped by the message's), with all their identifiers; one member of
    /// each shared subscription group, in turn.
    pub fn route(
        &mut self,
        origin: &str,
        publish: &Publish,
        expires_at: Option<Instant>,
    ) -> Routed {
        let topic = String::from_utf8_lossy(&publish.topic);
        // session -> (qos, retain as published, identifiers)
        let mut targets: HashMap<String, (QoS, bool, Vec<usize>)> = HashMap::new();
        // (group, filter) -> members
        let mut groups: BTreeMap<(String, String), Vec<(String, SubOptions)>> = BTreeMap::new();
        self.subscriptions
            .for_each_match(&topic, |client, group, options| match group {
                None => {
                    if options.no_local && client == origin {
                        return;
                    }
                    let entry = targets.entry(client.to_string()).or_insert((
                        QoS::AtMostOnce,
                        false,
                        Vec::new(),
                    ));
                    entry.0 = qos_max(entry.0, options.qos);
                    entry.1 |= options.retain_as_published;
                    entry.2.extend(options.identifier);
                }
                Some(group) => {
                    groups
                        .entry((group.to_string(), options.filter.clone()))
                        .or_default()
                        .push((client.to_string(), options.clone()));
                }
            });
        for (key, mut members) in groups {
            members.sort_by(|a, b| a.0.cmp(&b.0));
            // Prefer members that are online.
            let online: Vec<usize> = (0..members.len())
                .filter(|&i| {
                    self.sessions
                        .get(&members[i].0)
                        .is_some_and(|s| s.online.is_some())
                })
                .collect();
            let pool = if online.is_empty() {
                (0..members.len()).collect()
            } else {
                online
            };
            let cursor = self.share_cursor.entry(key).or_insert(0);
            let (client, options) = &members[pool[*cursor % pool.len()]];
            *cursor = cursor.wrapping_add(1);
            let entry =
                targets
                    .entry(client.clone())
                    .or_insert((QoS::AtMostOnce, false, Vec::new()));
            entry.0 = qos_max(entry.0, options.qos);
            entry.2.extend(options.identifier);
        }
        let mut routed = Routed::default();
        // What offline sessions keep until they are back: copied out of the
        // publisher's read buffer once, and shared by all of them (a
        // command to a fleet with 30 000 terminals offline is one copy).
        let mut kept_copy: Option<Publish> = None;
        for (client, (qos, retain_as_published, identifiers)) in targets {
            let Some(session) = self.sessions.get_mut(&client) else {
                continue;
            };
            let qos = qos_min(qos, publish.qos);
            let source = match &session.online {
                Some(_) => publish,
                // QoS 0 messages are not kept for an offline session.
                None if qos == QoS::AtMostOnce => continue,
                None => kept_copy.get_or_insert_with(|| detach_publish(publish.clone())),
            };
            let mut d = delivery(
                source,
                qos,
                retain_as_published && publish.retain,
                expires_at,
            );
            for id in identifiers {
                add_identifier(&mut d, Some(id));
            }
            let kept = match &session.online {
                Some(online) => online.inbox.deliver(d, self.max_queued),
                None => session.stored.enqueue(d, self.max_queued),
            };
            if kept {
                routed.delivered += 1;
            } else {
                routed.dropped += 1;
            }
        }
        routed
    }
}

/// The publisher's properties as passed on: without the topic alias and
/// subscription identifiers, which belonged to its own PUBLISH.
fn forwarded_properties(publish: &Publish) -> Option<Box<PublishProperties>> {
    publish.properties.clone().map(|mut p| {
        p.topic_alias = None;
        p.subscription_identifiers.clear();
        Box::new(p)
    })
}

fn delivery(publish: &Publish, qos: QoS, retain: bool, expires_at: Option<Instant>) -> Delivery {
    let properties = forwarded_properties(publish);
    Delivery {
        topic: publish.topic.clone(),
        payload: publish.payload.clone(),
        qos: qos_min(qos, publish.qos),
        retain,
        properties,
        expires_at,
    }
}

fn qos_max(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) {
        a
    } else {
        b
    }
}

fn qos_min(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

fn add_identifier(d: &mut Delivery, id: Option<usize>) {
    if let Some(id) = id {
        d.properties
            .get_or_insert_with(|| Box::new(empty_properties()))
            .subscription_identifiers
            .push(id);
    }
}

pub fn empty_properties() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        subscription_identifiers: Vec::new(),
        content_type: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, qos: QoS, retain: bool) -> Publish {
        Publish {
            dup: false,
            qos,
            retain,
            topic: Bytes::from(topic.to_string()),
            pkid: 0,
            payload: Bytes::from_static(b"x"),
            properties: None,
        }
    }

    fn options(qos: QoS) -> SubOptions {
        SubOptions {
            filter: String::new(),
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainForwardRule::OnEverySubscribe,
            identifier: None,
        }
    }

    fn offline(state: &mut BrokerState, client: &str, subs: &[(&str, SubOptions)]) {
        let mut session = Session {
            online: None,
            stored: SessionState::default(),
            expiry: u32::MAX,
            generation: 0,
            subscriptions: HashMap::new(),
        };
        for (filter, o) in subs {
            let (group, path) = super::super::topics::parse_filter(filter).unwrap();
            state.subscriptions.insert(path, client, group, o.clone());
            session.subscriptions.insert(filter.to_string(), o.clone());
        }
        state.sessions.insert(client.to_string(), session);
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
        let mut state = BrokerState::new(10, 100, None);
        let mut with_id = options(QoS::AtMostOnce);
        with_id.identifier = Some(7);
        offline(
            &mut state,
            "c",
            &[("a/#", options(QoS::ExactlyOnce)), ("a/+", with_id)],
        );
        let routed = state.route("p", &publish("a/b", QoS::ExactlyOnce, false), None);
        assert_eq!(
            routed,
            Routed {
                delivered: 1,
                dropped: 0
            }
        );
        let q = &state.sessions["c"].stored.queue;
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].qos, QoS::ExactlyOnce);
        assert_eq!(
            q[0].properties.as_ref().unwrap().subscription_identifiers,
            vec![7]
        );
        // capped by the message's QoS
        state.route("p", &publish("a/b", QoS::AtLeastOnce, false), None);
        assert_eq!(state.sessions["c"].stored.queue[1].qos, QoS::AtLeastOnce);
    }

    #[test]
    fn no_local_skips_the_publisher_and_offline_sessions_skip_qos_0() {
        let mut state = BrokerState::new(10, 100, None);
        let mut o = options(QoS::AtLeastOnce);
        o.no_local = true;
        offline(&mut state, "me", &[("t", o)]);
        state.route("me", &publish("t", QoS::AtLeastOnce, false), None);
        state.route("other", &publish("t", QoS::AtMostOnce, false), None);
        assert!(state.sessions["me"].stored.queue.is_empty());
        state.route("other", &publish("t", QoS::AtLeastOnce, false), None);
        assert_eq!(state.sessions["me"].stored.queue.len(), 1);
    }

    #[test]
    fn an_online_session_gets_at_most_max_queued_and_an_ended_one_lets_a_takeover_go() {
        let mut state = BrokerState::new(2, 100, None);
        offline(&mut state, "c", &[("t", options(QoS::AtLeastOnce))]);
        let inbox = std::sync::Arc::new(Inbox::default());
        if let Some(session) = state.sessions.get_mut("c") {
            session.online = Some(Online {
                connection: 1,
                inbox: inbox.clone(),
                kick: tokio_util::sync::CancellationToken::new(),
            });
        }
        let mut routed = Routed::default();
        for _ in 0..3 {
            let r = state.route("p", &publish("t", QoS::AtLeastOnce, false), None);
            routed.delivered += r.delivered;
            routed.dropped += r.dropped;
        }
        assert_eq!(
            routed,
            Routed {
                delivered: 2,
                dropped: 1
            }
        );
        // a takeover goes through a full inbox
        let (tx, mut waiting_for_state) = oneshot::channel();
        inbox.tell(ToConnection::TakeOver {
            state: tx,
            clean: false,
        });
        let (_, taken) = inbox.take();
        assert_eq!(taken.len(), 3);
        assert!(matches!(taken.back(), Some(ToConnection::TakeOver { .. })));
        // The connection ends before it reads a second takeover, or one
        // comes after: neither leaves the new connection waiting.
        let (tx, mut before) = oneshot::channel();
        inbox.tell(ToConnection::TakeOver {
            state: tx,
            clean: false,
        });
        inbox.close();
        let (tx, mut after) = oneshot::channel();
        inbox.tell(ToConnection::TakeOver {
            state: tx,
            clean: false,
        });
        let closed = |r| matches!(r, Err(oneshot::error::TryRecvError::Closed));
        assert!(closed(before.try_recv()));
        assert!(closed(after.try_recv()));
        assert!(!inbox.deliver(
            delivery(
                &publish("t", QoS::AtLeastOnce, false),
                QoS::AtLeastOnce,
                false,
                None
            ),
            2
        ));
        drop(taken);
        assert!(closed(waiting_for_state.try_recv()));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let mut state = BrokerState::new(2, 100, None);
        offline(&mut state, "c", &[("t", options(QoS::AtLeastOnce))]);
        for _ in 0..3 {
            state.route("p", &publish("t", QoS::AtLeastOnce, false), None);
        }
        assert_eq!(state.sessions["c"].stored.queue.len(), 2);
        assert_eq!(state.sessions["c"].stored.dropped, 1);
    }

    #[test]
    fn shared_subscriptions_take_turns() {
        let mut state = BrokerState::new(10, 100, None);
        offline(
            &mut state,
            "a",
            &[("$share/g/t/#", options(QoS::AtLeastOnce))],
        );
        offline(
            &mut state,
            "b",
            &[("$share/g/t/#", options(QoS::AtLeastOnce))],
        );
        for _ in 0..4 {
            state.route("p", &publish("t/x", QoS::AtLeastOnce, false), None);
        }
        assert_eq!(state.sessions["a"].stored.queue.len(), 2);
        assert_eq!(state.sessions["b"].stored.queue.len(), 2);
    }

    /// Whether `part` lies inside `whole`'s memory.
    fn within(part: &Bytes, whole: &Bytes) -> bool {
        let range = whole.as_ptr_range();
        range.contains(&part.as_ptr())
    }

    #[test]
    fn a_retained_message_keeps_its_own_bytes_not_the_buffer_it_arrived_in() {
        // what the codec reads is a slice of the connection's read buffer:
        // kept as it is, a 16-byte status would hold the whole buffer
        let mut raw = vec![0u8; 64 * 1024];
        raw[100..119].copy_from_slice(b"terminals/t1/status");
        raw[200..218].copy_from_slice(br#"{"state":"online"}"#);
        let read_buffer = Bytes::from(raw);
        let mut status = publish("", QoS::AtLeastOnce, true);
        status.topic = read_buffer.slice(100..119);
        status.payload = read_buffer.slice(200..218);
        let mut state = BrokerState::new(10, 100, None);
        state.retain(&status, None);
        let kept = &state.retained["terminals/t1/status"];
        assert_eq!(&kept.payload[..], &status.payload[..]);
        assert!(!read_buffer.as_ptr_range().contains(&kept.payload.as_ptr()));
        let delivered = state.retained_for("#", &options(QoS::AtMostOnce), Instant::now());
        assert_eq!(delivered[0].topic, "terminals/t1/status");
        assert!(!within(&delivered[0].topic, &read_buffer));
    }

    /// A retained message is delivered with the properties its publisher
    /// gave it, less what belonged to that one PUBLISH (the topic alias,
    /// the publisher's subscription identifiers), plus the subscriber's
    /// own identifier.
    #[test]
    fn a_retained_message_keeps_its_publishers_properties_but_not_its_alias() {
        let mut described = publish("terminals/t1/config", QoS::AtLeastOnce, true);
        described.properties = Some(PublishProperties {
            content_type: Some("application/json".into()),
            correlation_data: Some(Bytes::from_static(b"req-7")),
            user_properties: vec![("site".into(), "lyon".into())],
            topic_alias: Some(3),
            subscription_identifiers: vec![12],
            ..empty_properties()
        });
        let mut aliased = publish("terminals/t2/config", QoS::AtLeastOnce, true);
        aliased.properties = Some(PublishProperties {
            topic_alias: Some(4),
            ..empty_properties()
        });
        let mut state = BrokerState::new(10, 100, None);
        state.retain(&described, None);
        state.retain(&aliased, None);
        let subscriber = SubOptions {
            identifier: Some(9),
            ..options(QoS::AtLeastOnce)
        };
        let got = state.retained_for("terminals/+/config", &subscriber, Instant::now());
        assert_eq!(got.len(), 2);
        let p = got[0].properties.as_deref().expect("properties");
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"req-7"[..]));
        assert_eq!(p.user_properties, [("site".into(), "lyon".into())]);
        assert_eq!(
            (p.topic_alias, &p.subscription_identifiers[..]),
            (None, &[9][..])
        );
        let p = got[1]
            .properties
            .as_deref()
            .expect("the subscriber's identifier");
        assert_eq!(
            (
                p.topic_alias,
                &p.subscription_identifiers[..],
                p.content_type.as_deref()
            ),
            (None, &[9][..], None)
        );
    }

    #[test]
    fn a_message_kept_for_an_offline_session_holds_none_of_the_read_buffer() {
        let mut raw = vec![0u8; 64 * 1024];
        raw[100..119].copy_from_slice(b"terminals/t1/config");
        raw[200..212].copy_from_slice(br#"{"rate": 10}"#);
        let read_buffer = Bytes::from(raw);
        let mut config = publish("", QoS::AtLeastOnce, false);
        config.topic = read_buffer.slice(100..119);
        config.payload = read_buffer.slice(200..212);
        let mut state = BrokerState::new(10, 100, None);
        for terminal in ["t1", "t2"] {
            offline(
                &mut state,
                terminal,
                &[("terminals/+/config", options(QoS::AtLeastOnce))],
            );
        }
        state.route("backoffice", &config, None);
        let kept = &state.sessions["t1"].stored.queue[0];
        assert_eq!(kept.payload, config.payload);
        assert!(!within(&kept.topic, &read_buffer));
        assert!(!within(&kept.payload, &read_buffer));
        // one copy for every offline session, not one each
        let other = &state.sessions["t2"].stored.queue[0];
        assert_eq!(other.payload.as_ptr(), kept.payload.as_ptr());
    }

    #[test]
    fn retained_messages_are_kept_replaced_cleared_and_expire() {
        let mut state = BrokerState::new(10, 100, None);
        let now = Instant::now();
        state.retain(&publish("s/1", QoS::AtLeastOnce, true), None);
        state.retain(&publish("s/2", QoS::AtLeastOnce, true), Some(now));
        let got = state.retained_for("s/+", &options(QoS::AtMostOnce), now);
        assert_eq!(got.len(), 1, "the expired one is gone");
        assert!(got[0].retain);
        assert_eq!(got[0].qos, QoS::AtMostOnce);
        let mut clear = publish("s/1", QoS::AtMostOnce, true);
        clear.payload = Bytes::new();
        state.retain(&clear, None);
        assert!(state
            .retained_for("#", &options(QoS::AtMostOnce), now)
            .is_empty());
    }

    /// weir's alert notifications do not count against `max_retained`: a
    /// fleet's retained status messages may fill it, and a firing alert's
    /// notification is still there for a dashboard that subscribes later;
    /// clients' messages are still refused at the limit, also after weir's
    /// own have come and gone (cleared, expired, restored from the store).
    #[test]
    fn alert_notifications_are_retained_when_clients_filled_the_limit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let mut state = BrokerState::new(10, 2, Some(store.clone()));
        let t0 = Instant::now();
        for t in ["terminals/T1/status", "terminals/T2/status"] {
            state.retain_at(&publish(t, QoS::AtLeastOnce, true), None, t0);
        }
        let firing = publish("weir/alerts/terminal_offline/T3", QoS::AtLeastOnce, true);
        state.retain_at(&firing, None, t0);
        let resolved = publish("weir/alerts/low_battery/T4", QoS::AtLeastOnce, true);
        state.retain_at(&resolved, Some(t0 + Duration::from_secs(60)), t0);
        let alerts = |state: &mut BrokerState, now| -> Vec<String> {
            state
                .retained_for("weir/alerts/#", &options(QoS::AtLeastOnce), now)
                .iter()
                .map(|d| String::from_utf8_lossy(&d.topic).into_owned())
                .collect()
        };
        assert_eq!(
            alerts(&mut state, t0),
            [
                "weir/alerts/low_battery/T4",
                "weir/alerts/terminal_offline/T3"
            ]
        );
        assert_eq!(state.retained_refused, 0);

        let status = publish("terminals/T5/status", QoS::AtLeastOnce, true);
        state.retain_at(&status, None, t0);
        assert_eq!(state.retained_refused, 1, "the clients' limit still holds");

        // the resolved one expires and the firing one is cleared: the
        // clients' limit is where it was
        let mut clear = firing.clone();
        clear.payload = Bytes::new();
        state.retain_at(&clear, None, t0 + Duration::from_secs(61));
        assert!(alerts(&mut state, t0 + Duration::from_secs(61)).is_empty());
        state.retain_at(&status, None, t0 + Duration::from_secs(61));
        assert_eq!(state.retained_refused, 2);

        // and after a restart
        let mut restarted = BrokerState::new(10, 2, Some(store));
        restarted.restore();
        restarted.retain_at(&firing, None, t0);
        restarted.retain_at(&status, None, t0);
        assert_eq!(restarted.retained_refused, 1);
        assert_eq!(
            alerts(&mut restarted, t0),
            ["weir/alerts/terminal_offline/T3"]
        );
    }

    #[test]
    fn retained_messages_stop_at_the_limit_but_replace_and_clear() {
        let mut state = BrokerState::new(10, 2, None);
        for t in ["a", "b", "c"] {
            state.retain(&publish(t, QoS::AtMostOnce, true), None);
        }
        assert_eq!((state.retained.len(), state.retained_refused), (2, 1));
        state.retain(&publish("a", QoS::AtLeastOnce, true), None);
        assert_eq!(
            state.retained["a"].qos,
            QoS::AtLeastOnce,
            "replacing is allowed"
        );
        let mut clear = publish("a", QoS::AtMostOnce, true);
        clear.payload = Bytes::new();
        state.retain(&clear, None);
        state.retain(&publish("c", QoS::AtMostOnce, true), None);
        assert!(state.retained.contains_key("c"));
    }

    /// `max_retained_bytes` bounds what clients' retained messages take
    /// (topics and payloads): one that would pass it is not kept, and what
    /// its topic had is gone rather than stale; clearing and expiry give
    /// the room back; weir's own notifications do not count; a restart
    /// counts what it restored.
    #[test]
    fn retained_bytes_are_bounded_and_a_refused_replacement_leaves_nothing_stale() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let msg = |topic: &str, bytes: usize| {
            let mut p = publish(topic, QoS::AtLeastOnce, true);
            p.payload = Bytes::from(vec![b'x'; bytes]);
            p
        };
        let kept = |state: &BrokerState| {
            let mut topics: Vec<String> = state.retained.keys().map(|t| t.to_string()).collect();
            topics.sort_unstable();
            topics
        };
        let mut state = BrokerState::new(10, 100, Some(store.clone()));
        state.set_max_retained_bytes(100);
        let t0 = Instant::now();
        state.retain_at(&msg("a", 40), None, t0); // 41 bytes with its topic
        state.retain_at(&msg("b", 40), None, t0); // 82
        state.retain_at(&msg("c", 40), None, t0); // 123: no
        state.retain_at(&msg("weir/alerts/r/k", 500), None, t0);
        assert_eq!(state.retained_refused, 1);
        assert_eq!(kept(&state), ["a", "b", "weir/alerts/r/k"]);

        state.retain_at(&msg("a", 50), None, t0); // 92
        state.retain_at(&msg("b", 60), None, t0); // 112: no, and b's 40 are gone
        assert_eq!(state.retained_refused, 2);
        assert_eq!(kept(&state), ["a", "weir/alerts/r/k"]);

        let t60 = t0 + Duration::from_secs(60);
        state.retain_at(&msg("d", 40), Some(t60), t0); // 92
        state.retain_at(&msg("e", 40), None, t0 + Duration::from_secs(30)); // 133: no
        assert_eq!(state.retained_refused, 3);
        state.retain_at(&msg("e", 40), None, t60 + Duration::from_secs(1)); // d expired: 92
        state.retain_at(&msg("a", 0), None, t60 + Duration::from_secs(1)); // cleared: 41
        state.retain_at(&msg("f", 40), None, t60 + Duration::from_secs(1)); // 82
        assert_eq!(state.retained_refused, 3);
        assert_eq!(kept(&state), ["e", "f", "weir/alerts/r/k"]);

        let mut restarted = BrokerState::new(10, 100, Some(store));
        restarted.set_max_retained_bytes(100);
        restarted.restore();
        assert_eq!(kept(&restarted), ["e", "f", "weir/alerts/r/k"]);
        restarted.retain_at(&msg("g", 40), None, t0); // 123: no
        assert_eq!(restarted.retained_refused, 1);
    }

    /// A retained message with an expiry (MQTT 5): once it has expired, it
    /// no longer counts against `max_retained`, and it is gone from the
    /// store, so a restart does not bring it back.
    #[test]
    fn expired_retained_messages_make_room_and_leave_the_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let mut state = BrokerState::new(10, 2, Some(store.clone()));
        let t0 = Instant::now();
        let expiring = publish("terminals/T1/notice", QoS::AtLeastOnce, true);
        state.retain_at(&expiring, Some(t0 + Duration::from_secs(60)), t0);
        state.retain_at(
            &publish("terminals/T1/status", QoS::AtLeastOnce, true),
            None,
            t0,
        );
        let status = publish("terminals/T2/status", QoS::AtLeastOnce, true);
        state.retain_at(&status, None, t0 + Duration::from_secs(30));
        assert_eq!(
            state.retained_refused, 1,
            "full, and nothing has expired yet"
        );

        state.retain_at(&status, None, t0 + Duration::from_secs(61));
        assert_eq!(state.retained_refused, 1, "the expired one made room");
        let mut kept: Vec<&str> = state.retained.keys().map(|t| &**t).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["terminals/T1/status", "terminals/T2/status"]);

        let mut restarted = BrokerState::new(10, 2, Some(store));
        restarted.restore();
        let mut kept: Vec<&str> = restarted.retained.keys().map(|t| &**t).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["terminals/T1/status", "terminals/T2/status"]);
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        let mut s = SessionState {
            next_pkid: u16::MAX - 1,
            ..Default::default()
        };
        s.inflight.insert(1, OutFlight::Released);
        assert_eq!(s.take_pkid(), Some(u16::MAX));
        assert_eq!(s.take_pkid(), Some(2));
    }

    #[test]
    fn expired_messages_are_not_sent_and_the_rest_say_what_is_left() {
        let now = Instant::now();
        let mut d = delivery(
            &publish("t", QoS::AtLeastOnce, false),
            QoS::AtLeastOnce,
            false,
            Some(now + std::time::Duration::from_millis(1500)),
        );
        d.properties = Some(Box::new(empty_properties()));
        let p = d.to_publish(1, false, now).unwrap();
        assert_eq!(p.properties.unwrap().message_expiry_interval, Some(2));
        assert!(d
            .to_publish(1, false, now + std::time::Duration::from_secs(2))
            .is_none());
    }
}
