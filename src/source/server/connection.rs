//! One client connection: CONNECT, the session it resumes or starts, then
//! one loop over the socket, the session's deliveries and the pipeline's
//! acks, until the client leaves, breaks a rule, goes quiet, is taken over,
//! or weir stops.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill,
    PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, Publish,
    PublishProperties, SubAck, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rumqttc::v5::mqttbytes::v5::{Filter, PingResp, RetainForwardRule, Subscribe, Unsubscribe};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;

use super::broker::{
    empty_properties, Inbox, Online, OutFlight, Session, SessionState, SubOptions, ToConnection,
};
use super::codec::{self, Packet, Protocol, QoS, ReadError};
use super::topics::{parse_filter, validate_topic};
use super::{Published, Shared};
use crate::auth::mqtt::{reserved_client_id, Identity, Refusal};
use crate::source::decode::{AckToken, Message};

/// Bytes read from a socket at a time (at least).
const READ_CHUNK: usize = 8 * 1024;

/// How long a taken-over connection has to hand its session over.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Why a connection ended.
#[derive(Debug, PartialEq)]
enum End {
    /// DISCONNECT from the client; `will` when it asked for its will (0x04).
    Normal {
        will: bool,
    },
    /// The socket closed, or a write failed, without DISCONNECT.
    Lost,
    /// The client broke the protocol; MQTT 5 clients are told why.
    Violation(DisconnectReasonCode, String),
    KeepAlive,
    TakenOver,
    Shutdown,
}

/// A publish from the client awaiting its PUBACK or PUBREC, in arrival order.
struct PendingAck {
    pkid: u16,
    qos: QoS,
    /// Durable (stream topics) or routed (other topics): the ack may go.
    done: bool,
    /// Not this client's to publish: dropped, and an MQTT 5 client is told so.
    refused: bool,
}

/// The read side of a connection. A plain one waits for readability before
/// it takes a buffer, so an idle connection holds none; TLS keeps its own
/// buffers (rustls) whatever we do.
enum Reader {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

impl Reader {
    /// Reads what is there into `buf`; 0 at the end. Cancel-safe.
    async fn read_more(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Reader::Plain(reader) => loop {
                reader.readable().await?;
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(READ_CHUNK);
                }
                match reader.try_read_buf(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // The readiness was stale (left from the last read,
                        // which did not drain the socket to WouldBlock): let
                        // the buffer go again before waiting, or every idle
                        // connection would hold READ_CHUNK.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        continue;
                    }
                    other => return other,
                }
            },
            Reader::Tls(reader) => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(READ_CHUNK);
                }
                reader.read_buf(buf).await
            }
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    id: u64,
    protocol: Protocol,
    client_id: String,
    /// Who logged in, and so what it may publish and subscribe to.
    identity: Identity,
    writer: Writer,
    out: BytesMut,
    keep_alive: Duration,
    /// Boxed: a will is ~200 bytes, kept as long as the connection lives,
    /// and many clients have none.
    will: Option<Box<LastWill>>,
    will_delay: u32,
    session_expiry: u32,
    state: SessionState,
    /// The client's receive maximum: our QoS 1 and 2 messages in flight to it.
    client_receive_maximum: usize,
    client_max_packet: Option<usize>,
    pending: VecDeque<PendingAck>,
    aliases: HashMap<u16, Bytes>,
    /// QoS 1 and 2 publishes still to come that may be redeliveries of
    /// messages logged before the connection (or weir) went down.
    maybe_redelivered: usize,
    /// Deliveries, a takeover, and the pipeline's acks.
    inbox: Arc<Inbox>,
    kick: tokio_util::sync::CancellationToken,
}

impl Drop for Connection {
    /// After its session is stored or handed over (the end of `close`): a
    /// takeover waiting on this connection goes on at once.
    fn drop(&mut self) {
        self.inbox.close();
    }
}

/// Counts a connection for as long as it lives: the `connected` gauge, and
/// its place in `Shared::connections` (taken when `max_connections` was
/// checked), both given back when it is dropped.
struct Counted(Arc<Shared>);

impl Counted {
    fn start(shared: Arc<Shared>) -> Counted {
        let m = &shared.metrics.broker;
        m.connected.fetch_add(1, Ordering::Relaxed);
        m.connections_total.fetch_add(1, Ordering::Relaxed);
        Counted(shared)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0
            .metrics
            .broker
            .connected
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection past CONNACK, its session started or resumed.
struct Opened {
    connection: Box<Connection>,
    reader: Reader,
    buf: BytesMut,
    _counted: Counted,
}

/// The task of one connection.
///
/// A task keeps the size of its largest state for as long as it lives, and
/// a connected terminal is idle nearly all of the time: with 100 000 of
/// them every KiB here is 100 MB. So what is large and brief — the TLS
/// handshake, CONNECT and login, the takeover, and the close — runs in
/// futures of its own, let go when done, and the loop the connection
/// idles in holds little more than a pointer to its [`Connection`].
pub(super) async fn run(
    shared: Arc<Shared>,
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let Some(mut opened) = Box::pin(open(shared, socket, peer, tls)).await else {
        return;
    };
    let end = opened
        .connection
        .run(&mut opened.reader, &mut opened.buf)
        .await;
    Box::pin(opened.connection.close(end)).await;
}

/// TLS, CONNECT, login and the session: a connection ready to serve, or
/// none (refused, or gone before it was done).
async fn open(
    shared: Arc<Shared>,
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Option<Opened> {
    let _ = socket.set_nodelay(true);
    // TLS first (within the same time a client has for CONNECT); a client
    // certificate the handshake verified names the client.
    let (mut reader, mut writer, cert_name): (Reader, Writer, Option<String>) = match tls {
        None => {
            let (reader, writer) = socket.into_split();
            (Reader::Plain(reader), Box::new(writer), None)
        }
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(shared.options.connect_timeout, acceptor.accept(socket)).await;
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "MQTT TLS handshake failed");
                    shared
                        .metrics
                        .broker
                        .tls_handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Err(_) => return None,
            };
            let cert_name = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| crate::tls::common_name(leaf));
            let (reader, writer) = tokio::io::split(stream);
            (Reader::Tls(reader), Box::new(writer), cert_name)
        }
    };
    let mut buf = BytesMut::with_capacity(1024);
    let max = shared.options.max_packet_bytes;
    let first = tokio::time::timeout(shared.options.connect_timeout, async {
        loop {
            match codec::read_connect(&mut buf, max) {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {}
                Err(e) => return Err(Some(e)),
            }
            match reader.read_more(&mut buf).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    })
    .await;
    let (protocol, packet) = match first {
        Ok(Ok(c)) => c,
        Ok(Err(Some(ReadError::UnsupportedProtocol(level)))) => {
            tracing::debug!(%peer, level, "MQTT client with an unsupported protocol refused");
            refuse(
                &mut writer,
                Protocol::V4,
                ConnectReturnCode::UnsupportedProtocolVersion,
            )
            .await;
            return None;
        }
        Ok(Err(Some(e))) => {
            tracing::debug!(%peer, error = %e, "MQTT connection closed before CONNECT");
            shared
                .metrics
                .broker
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Ok(Err(None)) | Err(_) => return None,
    };
    let Packet::Connect(connect, will, login) = packet else {
        return None;
    };
    // Client ids starting `weir` are weir's own.
    if reserved_client_id(&connect.client_id) {
        tracing::debug!(%peer, client = %connect.client_id, "MQTT client refused: reserved client id");
        refuse(
            &mut writer,
            protocol,
            ConnectReturnCode::ClientIdentifierNotValid,
        )
        .await;
        return None;
    }
    let (username, password) = match &login {
        Some(l) => (Some(l.username.as_str()), Some(l.password.as_bytes())),
        None => (None, None),
    };
    // Password checks queue behind each other (a few at a time): a flood of
    // logins waits at most as long as a client has for CONNECT, then is
    // told the server is busy.
    let checked = tokio::time::timeout(
        shared.options.connect_timeout,
        shared
            .options
            .auth
            .authenticate(peer.ip(), username, password, cert_name.as_deref()),
    )
    .await;
    let Ok(checked) = checked else {
        tracing::warn!(%peer, "MQTT login not checked in time: too many logins at once");
        refuse(&mut writer, protocol, ConnectReturnCode::ServerBusy).await;
        return None;
    };
    let identity = match checked {
        Ok(identity) => identity,
        Err(refusal) => {
            let m = &shared.metrics.broker;
            let code = match refusal {
                Refusal::NotAuthorized => {
                    m.logins_refused.fetch_add(1, Ordering::Relaxed);
                    ConnectReturnCode::NotAuthorized
                }
                Refusal::BadCredentials => {
                    m.login_failures.fetch_add(1, Ordering::Relaxed);
                    ConnectReturnCode::BadUserNamePassword
                }
                Refusal::RateLimited => {
                    m.logins_rate_limited.fetch_add(1, Ordering::Relaxed);
                    ConnectReturnCode::ConnectionRateExceeded
                }
            };
            tracing::info!(%peer, client = %connect.client_id, user = username.unwrap_or(""), reason = ?refusal, "MQTT login refused");
            refuse(&mut writer, protocol, code).await;
            return None;
        }
    };
    if let Some(w) = &will {
        let allowed = std::str::from_utf8(&w.topic).is_ok_and(|t| identity.may_publish(t));
        if !allowed {
            shared
                .metrics
                .broker
                .acl_denied
                .fetch_add(1, Ordering::Relaxed);
            refuse(&mut writer, protocol, ConnectReturnCode::NotAuthorized).await;
            return None;
        }
    }
    if shared.connections.fetch_add(1, Ordering::AcqRel) >= shared.options.max_connections {
        shared.connections.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(%peer, "MQTT connection refused: max_connections reached");
        refuse(&mut writer, protocol, ConnectReturnCode::ServerBusy).await;
        return None;
    }
    let counted = Counted::start(shared.clone());
    let connection = Connection::accept(shared, protocol, connect, will, identity, writer).await?;
    Some(Opened {
        connection,
        reader,
        buf,
        _counted: counted,
    })
}

/// A CONNACK that refuses, then the socket closes.
async fn refuse(writer: &mut Writer, protocol: Protocol, code: ConnectReturnCode) {
    let mut out = BytesMut::new();
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties: None,
    });
    if codec::write(&ack, protocol, &mut out).is_ok() {
        let _ = writer.write_all(&out).await;
        let _ = writer.flush().await;
    }
    let _ = writer.shutdown().await;
}

impl Connection {
    /// Takes the session over, starts or resumes it, and sends CONNACK.
    async fn accept(
        shared: Arc<Shared>,
        protocol: Protocol,
        connect: rumqttc::v5::mqttbytes::v5::Connect,
        will: Option<LastWill>,
        identity: Identity,
        mut writer: Writer,
    ) -> Option<Box<Connection>> {
        // kept for the whole connection (and past it, with a will delay)
        let will = will.map(|w| Box::new(codec::detach_will(w)));
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        let clean = connect.clean_start;
        let props = connect.properties.clone();
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if protocol == Protocol::V4 && !clean {
                // 3.1.1 §3.1.3-8: an empty id must come with a clean session.
                refuse(
                    &mut writer,
                    protocol,
                    ConnectReturnCode::ClientIdentifierNotValid,
                )
                .await;
                return None;
            }
            let generated = format!("auto-{id:x}-{:x}", crate::obs::now_ms());
            assigned = Some(generated.clone());
            generated
        } else {
            connect.client_id.clone()
        };
        let max_expiry = shared.options.max_session_expiry;
        let session_expiry = match protocol {
            Protocol::V4 if clean => 0,
            Protocol::V4 => max_expiry,
            Protocol::V5 => props
                .as_ref()
                .and_then(|p| p.session_expiry_interval)
                .unwrap_or(0)
                .min(max_expiry),
        };
        let requested_expiry = props.as_ref().and_then(|p| p.session_expiry_interval);
        if let Some(w) = &will {
            if !std::str::from_utf8(&w.topic).is_ok_and(|t| validate_topic(t).is_ok()) {
                refuse(&mut writer, protocol, ConnectReturnCode::TopicNameInvalid).await;
                return None;
            }
        }

        // Take the client id over from a connection that holds it.
        let holder = {
            let mut state = shared.state();
            state
                .sessions
                .get_mut(&client_id)
                .and_then(|s| s.online.take())
        };
        let mut handed = None;
        if let Some(holder) = holder {
            let (tx, rx) = oneshot::channel();
            holder
                .inbox
                .tell(ToConnection::TakeOver { state: tx, clean });
            handed = tokio::time::timeout(TAKEOVER_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok);
            // Handed over or not (stuck writing to a client that does not
            // read), the old connection ends now.
            holder.kick.cancel();
        }
        let kick = tokio_util::sync::CancellationToken::new();

        let inbox = Arc::new(Inbox::default());
        shared
            .ack_routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, inbox.clone());
        let (session_present, state) = {
            let mut broker = shared.state();
            let generation = broker.generation();
            if clean {
                broker.end_session(&client_id);
                handed = None;
            }
            let present = broker.sessions.contains_key(&client_id);
            let session = broker
                .sessions
                .entry(client_id.clone())
                .or_insert_with(|| Session {
                    online: None,
                    stored: SessionState::default(),
                    expiry: session_expiry,
                    generation,
                    subscriptions: HashMap::new(),
                });
            let mut state = match handed {
                Some(mut handed) => {
                    // Routed while it changed hands.
                    handed.queue.extend(session.stored.queue.drain(..));
                    handed
                }
                None => std::mem::take(&mut session.stored),
            };
            state.dropped = 0;
            session.online = Some(Online {
                connection: id,
                inbox: inbox.clone(),
                kick: kick.clone(),
            });
            let changed = session.expiry != session_expiry || !present;
            session.expiry = session_expiry;
            session.generation = generation;
            if changed {
                broker.save_session(&client_id);
            }
            (present, state)
        };

        let options = &shared.options;
        // What the client accepts, and never more than a session may queue.
        let client_receive_maximum = (props
            .as_ref()
            .and_then(|p| p.receive_maximum)
            .unwrap_or(u16::MAX)
            .max(1) as usize)
            .min(shared.options.max_queued);
        let client_max_packet = props
            .as_ref()
            .and_then(|p| p.max_packet_size)
            .map(|s| s as usize);
        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        if options.max_keep_alive > 0 && (keep_alive == 0 || keep_alive > options.max_keep_alive) {
            keep_alive = options.max_keep_alive;
            server_keep_alive = Some(keep_alive);
        }
        let will_delay = will
            .as_ref()
            .and_then(|w| w.properties.as_ref())
            .and_then(|p| p.delay_interval)
            .unwrap_or(0);
        let mut connection = Box::new(Connection {
            shared: shared.clone(),
            id,
            protocol,
            client_id,
            identity,
            writer,
            out: BytesMut::new(),
            keep_alive: Duration::from_secs(keep_alive as u64),
            will,
            will_delay,
            session_expiry,
            state,
            client_receive_maximum,
            client_max_packet,
            pending: VecDeque::new(),
            aliases: HashMap::new(),
            // A client resends what it had in flight first, with DUP set —
            // or, some clients (rumqttc), without. Of those, at most a
            // receive maximum can have been logged unacknowledged: so many
            // are checked against the log's recent identities as if DUP.
            maybe_redelivered: if session_present {
                options.receive_maximum as usize
            } else {
                0
            },
            inbox,
            kick,
        });
        let properties = (protocol == Protocol::V5).then(|| ConnAckProperties {
            // Said only when weir shortened what the client asked for.
            session_expiry_interval: requested_expiry
                .filter(|&asked| asked > session_expiry)
                .map(|_| session_expiry),
            receive_max: Some(options.receive_maximum),
            max_qos: None,
            retain_available: None,
            max_packet_size: Some(options.max_packet_bytes.min(u32::MAX as usize) as u32),
            assigned_client_identifier: assigned,
            topic_alias_max: Some(options.topic_alias_maximum),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        });
        connection.send(&Packet::ConnAck(ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
            properties,
        }));
        tracing::debug!(client = %connection.client_id, connection = id, ?protocol, session_present, "MQTT client connected");
        // A resumed session: what was in flight goes again, then the queue.
        let now = Instant::now();
        let inflight: Vec<(u16, OutFlight)> = connection
            .state
            .inflight
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (pkid, flight) in inflight {
            match flight {
                OutFlight::Published(d) => match d.to_publish(pkid, true, now) {
                    Some(p) => connection.send(&Packet::Publish(p)),
                    None => {
                        connection.state.inflight.remove(&pkid);
                    }
                },
                OutFlight::Released => connection.send(&Packet::PubRel(PubRel::new(pkid, None))),
            }
        }
        connection.pump();
        if connection.flush().await.is_err() {
            connection.close(End::Lost).await;
            return None;
        }
        Some(connection)
    }

    async fn run(&mut self, reader: &mut Reader, buf: &mut BytesMut) -> End {
        let shutdown = self.shared.shutdown.clone();
        let receive_maximum = self.shared.options.receive_maximum as usize;
        let mut last_heard = Instant::now();
        loop {
            // Acks first: they may open the window for packets already read.
            self.release_acks();
            // Packets already read (several may have come in one read).
            loop {
                // A 3.1.1 client is not read beyond the window: its publishes
                // wait in the socket, and so it slows down.
                if self.protocol == Protocol::V4 && self.pending.len() >= receive_maximum {
                    break;
                }
                match codec::read(buf, self.protocol, self.shared.options.max_packet_bytes) {
                    Ok(Some(packet)) => {
                        last_heard = Instant::now();
                        match self.handle(packet) {
                            Ok(None) => {}
                            // The pipeline's queue is full: the client waits
                            // with it, in a future of its own (see `run`).
                            Ok(Some(waiting)) => {
                                if !Box::pin(self.shared.wait_to_ingest(waiting)).await {
                                    return End::Shutdown;
                                }
                            }
                            Err(end) => return end,
                        }
                    }
                    Ok(None) => break,
                    Err(ReadError::TooLarge { size, max }) => {
                        return End::Violation(
                            DisconnectReasonCode::PacketTooLarge,
                            format!("packet of {size} bytes, limit {max}"),
                        )
                    }
                    Err(e) => {
                        return End::Violation(DisconnectReasonCode::MalformedPacket, e.to_string())
                    }
                }
            }
            if buf.is_empty() && buf.capacity() > 0 {
                *buf = BytesMut::new();
            }
            self.release_acks();
            self.pump();
            if self.flush().await.is_err() {
                return End::Lost;
            }
            let can_read = self.protocol == Protocol::V5 || self.pending.len() < receive_maximum;
            if !can_read {
                // The client waits for weir, not the other way round.
                last_heard = Instant::now();
            }
            let deadline = (!self.keep_alive.is_zero() && can_read)
                .then(|| last_heard + self.keep_alive * 3 / 2);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = self.kick.cancelled() => return End::TakenOver,
                _ = self.inbox.ready() => {
                    let (acks, messages) = self.inbox.take();
                    self.mark_durable(acks);
                    // In order (a takeover ends it).
                    for message in messages {
                        if let Some(end) = self.on_message(message) {
                            return end;
                        }
                    }
                }
                // Readable first, then a buffer: an idle connection holds none.
                read = reader.read_more(buf), if can_read => {
                    match read {
                        Ok(0) | Err(_) => return End::Lost,
                        Ok(_) => {}
                    }
                },
                _ = sleep_until(deadline) => return End::KeepAlive,
            }
        }
    }

    /// Publishes whose events the pipeline has made durable: their acks may go.
    fn mark_durable(&mut self, pkids: Vec<u16>) {
        for pkid in pkids {
            if let Some(p) = self.pending.iter_mut().find(|p| p.pkid == pkid && !p.done) {
                p.done = true;
            }
        }
    }

    /// A message from the broker side; `Some` when the connection must end.
    fn on_message(&mut self, message: ToConnection) -> Option<End> {
        match message {
            ToConnection::Deliver(d) => {
                if !self.state.enqueue(d, self.shared.options.max_queued) {
                    self.shared
                        .metrics
                        .broker
                        .deliveries_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            ToConnection::TakeOver { state, clean } => {
                if clean {
                    self.will_delay = 0;
                }
                let _ = state.send(std::mem::take(&mut self.state));
                Some(End::TakenOver)
            }
        }
    }

    /// One packet from the client; a message for the pipeline when its
    /// queue is full and it has to wait.
    fn handle(&mut self, packet: Packet) -> Result<Option<Message>, End> {
        match packet {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(a) => {
                if matches!(self.state.inflight.get(&a.pkid), Some(OutFlight::Published(d)) if d.qos == QoS::AtLeastOnce)
                {
                    self.state.inflight.remove(&a.pkid);
                }
                Ok(None)
            }
            Packet::PubRec(r) => {
                if matches!(
                    self.state.inflight.get(&r.pkid),
                    Some(OutFlight::Published(_))
                ) {
                    if (r.reason as u8) >= 0x80 {
                        self.state.inflight.remove(&r.pkid);
                    } else {
                        self.state.inflight.insert(r.pkid, OutFlight::Released);
                        self.send(&Packet::PubRel(PubRel::new(r.pkid, None)));
                    }
                }
                Ok(None)
            }
            Packet::PubComp(c) => {
                if matches!(self.state.inflight.get(&c.pkid), Some(OutFlight::Released)) {
                    self.state.inflight.remove(&c.pkid);
                }
                Ok(None)
            }
            Packet::PubRel(r) => {
                tracing::trace!(client = %self.client_id, pkid = r.pkid, known = self.state.awaiting_release.contains(&r.pkid), "PUBREL");
                let mut comp = PubComp::new(r.pkid, None);
                if !self.state.awaiting_release.remove(&r.pkid) {
                    comp.reason = PubCompReason::PacketIdentifierNotFound;
                }
                self.send(&Packet::PubComp(comp));
                Ok(None)
            }
            Packet::Subscribe(s) => {
                self.on_subscribe(s);
                Ok(None)
            }
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                Ok(None)
            }
            Packet::PingReq(_) => {
                self.send(&Packet::PingResp(PingResp));
                Ok(None)
            }
            Packet::Disconnect(d) => {
                if let Some(expiry) = d
                    .properties
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval)
                {
                    if self.session_expiry == 0 && expiry != 0 {
                        return Err(End::Violation(
                            DisconnectReasonCode::ProtocolError,
                            "session expiry set on DISCONNECT after CONNECT set none".into(),
                        ));
                    }
                    self.session_expiry = expiry;
                }
                Err(End::Normal {
                    will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                })
            }
            Packet::Connect(..) => Err(End::Violation(
                DisconnectReasonCode::ProtocolError,
                "a second CONNECT".into(),
            )),
            Packet::Auth(_) => Err(End::Violation(
                DisconnectReasonCode::ProtocolError,
                "AUTH without an authentication method".into(),
            )),
            other => Err(End::Violation(
                DisconnectReasonCode::ProtocolError,
                format!("a client does not send {other:?}"),
            )),
        }
    }

    fn on_publish(&mut self, mut p: Publish) -> Result<Option<Message>, End> {
        // Topic aliases (MQTT 5): a topic with an alias sets it, an empty
        // topic uses it.
        if let Some(alias) = p
            .properties
            .as_mut()
            .and_then(|props| props.topic_alias.take())
        {
            if alias == 0 || alias > self.shared.options.topic_alias_maximum {
                return Err(End::Violation(
                    DisconnectReasonCode::TopicAliasInvalid,
                    format!("topic alias {alias}"),
                ));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(topic) => p.topic = topic.clone(),
                    None => {
                        return Err(End::Violation(
                            DisconnectReasonCode::ProtocolError,
                            format!("topic alias {alias} was never set"),
                        ))
                    }
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        let topic = match std::str::from_utf8(&p.topic).map(|t| (t, validate_topic(t))) {
            Ok((topic, Ok(()))) => topic.to_string(),
            _ => {
                return Err(End::Violation(
                    DisconnectReasonCode::TopicNameInvalid,
                    "invalid topic name".into(),
                ))
            }
        };
        let qos = p.qos;
        let pkid = p.pkid;
        if qos != QoS::AtMostOnce {
            if self.protocol == Protocol::V5
                && self.pending.len() >= self.shared.options.receive_maximum as usize
            {
                return Err(End::Violation(
                    DisconnectReasonCode::ReceiveMaximumExceeded,
                    format!(
                        "more than {} publishes awaiting their ack",
                        self.shared.options.receive_maximum
                    ),
                ));
            }
            if qos == QoS::ExactlyOnce && self.state.awaiting_release.contains(&pkid) {
                // A QoS 2 message already taken in: acknowledge, never twice in.
                if !self.pending.iter().any(|a| a.pkid == pkid) {
                    self.send(&Packet::PubRec(PubRec::new(pkid, None)));
                }
                return Ok(None);
            }
        }
        if !self.identity.may_publish(&topic) {
            // Not this client's topic: dropped. MQTT 5 says why in the ack;
            // 3.1.1 has no way to, so the ack is a plain one (as Mosquitto does).
            self.shared
                .metrics
                .broker
                .acl_denied
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = %self.client_id, user = ?self.identity.name(), %topic, "PUBLISH refused by the ACL");
            if qos != QoS::AtMostOnce {
                self.pending.push_back(PendingAck {
                    pkid,
                    qos,
                    done: true,
                    refused: self.protocol == Protocol::V5,
                });
                if qos == QoS::ExactlyOnce && self.protocol == Protocol::V4 {
                    self.state.awaiting_release.insert(pkid);
                }
            }
            return Ok(None);
        }
        let stream = self.shared.is_stream_topic(&topic) && !(p.retain && p.payload.is_empty());
        let ack = (qos != QoS::AtMostOnce && stream).then_some(AckToken {
            connection: self.id,
            pkid,
        });
        if qos != QoS::AtMostOnce {
            self.pending.push_back(PendingAck {
                pkid,
                qos,
                done: ack.is_none(),
                refused: false,
            });
            if qos == QoS::ExactlyOnce {
                self.state.awaiting_release.insert(pkid);
            }
        }
        tracing::trace!(client = %self.client_id, pkid, ?qos, dup = p.dup, "PUBLISH");
        let mut dup = p.dup;
        if qos != QoS::AtMostOnce && self.maybe_redelivered > 0 {
            self.maybe_redelivered -= 1;
            dup = true;
        }
        match self.shared.publish_now(&self.client_id, p, ack, dup) {
            Published::Done => Ok(None),
            Published::Stopped => Err(End::Shutdown),
            Published::QueueFull(message) => Ok(Some(message)),
        }
    }

    fn on_subscribe(&mut self, s: Subscribe) {
        let identifier = s.properties.as_ref().and_then(|p| p.id);
        let now = Instant::now();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        {
            let mut broker = self.shared.state();
            for Filter {
                path,
                qos,
                nolocal,
                preserve_retain,
                retain_forward_rule,
            } in s.filters
            {
                let Ok((group, filter)) = parse_filter(&path) else {
                    codes.push(match self.protocol {
                        Protocol::V5 => SubscribeReasonCode::TopicFilterInvalid,
                        Protocol::V4 => SubscribeReasonCode::Failure,
                    });
                    continue;
                };
                if !self.identity.may_subscribe(filter) {
                    self.shared
                        .metrics
                        .broker
                        .acl_denied
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(client = %self.client_id, user = ?self.identity.name(), filter = %path, "SUBSCRIBE refused by the ACL");
                    codes.push(match self.protocol {
                        Protocol::V5 => SubscribeReasonCode::NotAuthorized,
                        Protocol::V4 => SubscribeReasonCode::Failure,
                    });
                    continue;
                }
                let full = broker.sessions.get(&self.client_id).is_some_and(|s| {
                    s.subscriptions.len() >= self.shared.options.max_subscriptions
                        && !s.subscriptions.contains_key(&path)
                });
                if full {
                    codes.push(match self.protocol {
                        Protocol::V5 => SubscribeReasonCode::QuotaExceeded,
                        Protocol::V4 => SubscribeReasonCode::Failure,
                    });
                    continue;
                }
                let options = SubOptions {
                    filter: filter.to_string(),
                    qos,
                    no_local: nolocal,
                    retain_as_published: preserve_retain,
                    retain_handling: retain_forward_rule,
                    identifier,
                };
                let existed =
                    broker
                        .subscriptions
                        .insert(filter, &self.client_id, group, options.clone());
                if let Some(session) = broker.sessions.get_mut(&self.client_id) {
                    session.subscriptions.insert(path.clone(), options.clone());
                }
                let send_retained = group.is_none()
                    && match options.retain_handling {
                        RetainForwardRule::OnEverySubscribe => true,
                        RetainForwardRule::OnNewSubscribe => !existed,
                        RetainForwardRule::Never => false,
                    };
                if send_retained {
                    retained.extend(broker.retained_for(filter, &options, now));
                }
                codes.push(SubscribeReasonCode::Success(qos));
            }
            broker.save_session(&self.client_id);
        }
        self.send(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes: codes,
            properties: None,
        }));
        let max = self.shared.options.max_queued;
        for d in retained {
            self.state.enqueue(d, max);
        }
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        {
            let mut broker = self.shared.state();
            for path in &u.filters {
                let removed = match parse_filter(path) {
                    Ok((group, filter)) => {
                        broker.subscriptions.remove(filter, &self.client_id, group)
                    }
                    Err(_) => false,
                };
                if let Some(session) = broker.sessions.get_mut(&self.client_id) {
                    session.subscriptions.remove(path);
                }
                reasons.push(if removed {
                    UnsubAckReason::Success
                } else {
                    UnsubAckReason::NoSubscriptionExisted
                });
            }
            broker.save_session(&self.client_id);
        }
        self.send(&Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons,
            properties: None,
        }));
    }

    /// Sends the acks that may go: in arrival order, up to the first
    /// publish still waiting for the log.
    fn release_acks(&mut self) {
        while self.pending.front().is_some_and(|p| p.done) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let packet = match p.qos {
                QoS::ExactlyOnce => {
                    let mut rec = PubRec::new(p.pkid, None);
                    if p.refused {
                        rec.reason = PubRecReason::NotAuthorized;
                    }
                    Packet::PubRec(rec)
                }
                _ => {
                    let mut ack = PubAck::new(p.pkid, None);
                    if p.refused {
                        ack.reason = PubAckReason::NotAuthorized;
                    }
                    Packet::PubAck(ack)
                }
            };
            self.send(&packet);
        }
    }

    /// Moves queued deliveries onto the wire while the client's window allows.
    fn pump(&mut self) {
        let now = Instant::now();
        while let Some(front) = self.state.queue.front() {
            if front.qos != QoS::AtMostOnce
                && self.state.inflight.len() >= self.client_receive_maximum
            {
                break;
            }
            let Some(d) = self.state.queue.pop_front() else {
                break;
            };
            let pkid = if d.qos == QoS::AtMostOnce {
                0
            } else {
                match self.state.take_pkid() {
                    Some(pkid) => pkid,
                    None => {
                        self.state.queue.push_front(d);
                        break;
                    }
                }
            };
            let Some(publish) = d.to_publish(pkid, false, now) else {
                continue; // expired on the way
            };
            let packet = Packet::Publish(publish);
            if self
                .client_max_packet
                .is_some_and(|max| codec::size(&packet) > max)
            {
                // MQTT 5 §3.1.2.24: larger than the client accepts: not sent.
                self.shared
                    .metrics
                    .broker
                    .deliveries_dropped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if d.qos != QoS::AtMostOnce {
                self.state.inflight.insert(pkid, OutFlight::Published(d));
            }
            self.send(&packet);
        }
    }

    fn send(&mut self, packet: &Packet) {
        if let Err(e) = codec::write(packet, self.protocol, &mut self.out) {
            tracing::warn!(client = %self.client_id, error = %e, "cannot encode an MQTT packet");
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let writer = &mut self.writer;
        let out = &self.out;
        let write = async move {
            writer.write_all(out).await?;
            // TLS holds what it encrypted until flushed; TCP does nothing here.
            writer.flush().await
        };
        let result = tokio::select! {
            result = write => result,
            _ = self.kick.cancelled() => Err(std::io::ErrorKind::ConnectionAborted.into()),
        };
        // Nothing held between writes: most connections are idle most of
        // the time, and a hundred thousand of them would hold it all.
        self.out = BytesMut::new();
        result
    }

    /// Says why (MQTT 5), closes, stores or ends the session, and sends the will.
    async fn close(mut self: Box<Self>, end: End) {
        let reason = match &end {
            End::Violation(code, why) => {
                tracing::debug!(client = %self.client_id, reason = ?code, why, "MQTT client disconnected for a protocol violation");
                self.shared
                    .metrics
                    .broker
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                Some(*code)
            }
            End::KeepAlive => Some(DisconnectReasonCode::KeepAliveTimeout),
            End::TakenOver => Some(DisconnectReasonCode::SessionTakenOver),
            End::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            End::Normal { .. } | End::Lost => None,
        };
        if let (Some(code), Protocol::V5) = (reason, self.protocol) {
            self.send(&Packet::Disconnect(Disconnect::new(code)));
        }
        let _ = self.flush().await;
        let _ = self.writer.shutdown().await;
        self.shared
            .ack_routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);

        // Not when weir itself stops: the session outlives weir, the client
        // reconnects when it is back, and 100 000 wills would be 100 000
        // false "offline" alerts.
        let send_will = !matches!(end, End::Normal { will: false } | End::Shutdown);
        // On takeover the session goes on in the new connection: the will
        // waits for its delay as if this client had reconnected in time.
        let taken_over = end == End::TakenOver;
        let mut will_delay = self.will_delay.min(self.session_expiry);
        let generation = {
            let mut broker = self.shared.state();
            let generation = broker.generation();
            let mine = broker
                .sessions
                .get(&self.client_id)
                .is_some_and(|s| s.online.as_ref().is_none_or(|o| o.connection == self.id));
            if mine && !taken_over {
                if self.session_expiry == 0 {
                    broker.end_session(&self.client_id);
                    will_delay = 0;
                } else if let Some(session) = broker.sessions.get_mut(&self.client_id) {
                    session.online = None;
                    session.generation = generation;
                    let changed = session.expiry != self.session_expiry;
                    session.expiry = self.session_expiry;
                    let mut state = std::mem::take(&mut self.state);
                    state.queue.extend(session.stored.queue.drain(..));
                    // Unsent QoS 0 messages are not kept for an offline session.
                    state.queue.retain(|d| d.qos != QoS::AtMostOnce);
                    // kept until the client is back, maybe for days
                    state.detach();
                    session.stored = state;
                    if changed {
                        broker.save_session(&self.client_id);
                    }
                }
            }
            generation
        };
        if self.session_expiry != 0 && self.session_expiry != u32::MAX && !taken_over {
            self.shared
                .expire_later(self.client_id.clone(), self.session_expiry, generation);
        }
        let Some(will) = self.will.take().filter(|_| send_will) else {
            return;
        };
        if taken_over && will_delay > 0 {
            return;
        }
        let publish = will_publish(*will);
        if will_delay == 0 || taken_over {
            self.shared
                .publish(&self.client_id, publish, None, false)
                .await;
            return;
        }
        let shared = self.shared.clone();
        let client = self.client_id.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(will_delay as u64)) => {}
            }
            // Not if the client came back (a newer generation) in time.
            let still_gone = {
                let broker = shared.state();
                broker
                    .sessions
                    .get(&client)
                    .is_none_or(|s| s.online.is_none() && s.generation == generation)
            };
            if still_gone {
                shared.publish(&client, publish, None, false).await;
            }
        });
    }
}

fn will_publish(will: LastWill) -> Publish {
    let properties = will.properties.map(|w| PublishProperties {
        payload_format_indicator: w.payload_format_indicator,
        message_expiry_interval: w.message_expiry_interval,
        content_type: w.content_type,
        response_topic: w.response_topic,
        correlation_data: w.correlation_data,
        user_properties: w.user_properties,
        ..empty_properties()
    });
    Publish {
        dup: false,
        qos: will.qos,
        retain: will.retain,
        topic: will.topic,
        pkid: 0,
        payload: will.message,
        properties,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::server::{Server, ServerOptions};
    use tokio::sync::mpsc;

    /// An idle terminal costs weir mostly its connection's task, which keeps
    /// the size of its largest state for as long as the terminal stays
    /// connected: 100 000 terminals times this.
    #[tokio::test]
    async fn a_connected_terminal_keeps_a_small_task() {
        let listen = "127.0.0.1:0".parse().expect("an address");
        let (ingest, _pipeline) = mpsc::channel(1);
        let server = Server::bind(
            ServerOptions::new(listen, 1 << 20, vec!["t/#".into()]),
            ingest,
            None,
            Arc::default(),
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("the server binds");
        let addr = server.local_addr().expect("its address");
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), server.listener.accept());
        let (socket, peer) = accepted.expect("a connection");
        let task = run(server.shared.clone(), socket, peer, None);
        let size = std::mem::size_of_val(&task);
        eprintln!(
            "connection task {size} bytes, Connection {} bytes",
            std::mem::size_of::<Connection>()
        );
        assert!(size <= 1024, "a connection's task is {size} bytes");
    }
}
