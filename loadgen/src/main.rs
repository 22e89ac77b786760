//! weir-loadgen: simulates a fleet of terminals over MQTT and reports what
//! it achieved (DESIGN §7).
//!
//! - `fleet`: the terminals and merchants, seeded (battery cycles, network,
//!   lognormal app latency with degradation episodes, Poisson transactions).
//! - this file: the CLI, the publishers, the counting subscriber, the
//!   progress line and the report.
//! - `alerts`: terminals that drop off with a last will (`--dropouts`) and
//!   end-to-end latency through weir's API (`--api`).
//!
//! Rate control is open loop: every connection sends on a fixed schedule
//! computed from the start time, and each message's event times are its
//! *scheduled* send time. A broker that stalls a publisher shows up as a
//! schedule lag and a rate shortfall, and as latency measured from the
//! schedule, instead of being hidden by a sender that waits politely
//! (coordinated omission).

mod alerts;
mod fleet;

use std::collections::BinaryHeap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter};

pub use fleet::Rng;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "weir-loadgen",
    about = "Simulate a fleet of payment terminals over MQTT and report rate and latency"
)]
struct Args {
    /// Broker address, mqtt://host:port or mqtts://host:port.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Log in as this MQTT user (every connection; an `admin` of weir's
    /// users file may publish for every terminal).
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// mqtts://: a PEM CA to trust besides the system's.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Number of terminals (20 per merchant).
    #[arg(long, default_value_t = 1000)]
    terminals: usize,
    /// Events per second in total, telemetry and transactions; 0 sends
    /// telemetry as fast as the broker takes it.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long to publish, e.g. 30s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Telemetry events per MQTT message (a JSON array from one terminal).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// MQTT QoS of the load, 0 or 1.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Parallel MQTT connections for telemetry.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Transactions per terminal per minute (one per message; part of --rate).
    #[arg(long, default_value_t = 1.0)]
    txn_per_terminal_min: f64,
    /// Seed of the fleet's values, so runs repeat.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Start the fleet as it is after running for a long time (batteries
    /// anywhere in their charge cycle, some apps part way through a
    /// degradation episode) instead of fresh (batteries spread evenly over
    /// 10–100 %), whose alerts keep opening faster than they resolve for
    /// its first few thousand samples (about ten minutes at two samples a
    /// terminal a second).
    #[arg(long)]
    steady_fleet: bool,
    /// weir's HTTP API, e.g. http://127.0.0.1:8080: measure the latency from
    /// a marker event's time to its alert on the SSE stream.
    #[arg(long)]
    api: Option<String>,
    /// Latency markers per second with --api.
    #[arg(long, default_value_t = 20.0)]
    markers_per_s: f64,
    /// Terminals that drop off now and then (their last will fires) and come back.
    #[arg(long, default_value_t = 0)]
    dropouts: usize,
    /// Also subscribe to the load's topics and count what the broker
    /// delivers: the broker's own ceiling, in the same run as weir.
    #[arg(long)]
    count: bool,
    /// Write the JSON report here.
    #[arg(long)]
    report_json: Option<std::path::PathBuf>,
}

impl Args {
    fn qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }

    /// Transactions per second in total.
    fn txn_rate(&self) -> f64 {
        self.terminals as f64 * self.txn_per_terminal_min / 60.0
    }

    /// Telemetry events per second in total (0: as fast as possible).
    fn telemetry_rate(&self) -> f64 {
        if self.rate == 0 {
            0.0
        } else {
            (self.rate as f64 - self.txn_rate()).max(1.0)
        }
    }
}

#[derive(serde::Serialize)]
struct Report {
    events_sent: u64,
    telemetry_events_sent: u64,
    transactions_sent: u64,
    messages_sent: u64,
    messages_acked: u64,
    errors: u64,
    duration_s: f64,
    events_per_s: f64,
    target_events_per_s: u64,
    /// How far the slowest publisher fell behind its schedule.
    max_schedule_lag_ms: f64,
    terminals: usize,
    merchants: usize,
    batch: usize,
    qos: u8,
    connections: usize,
    seed: u64,
    dropouts: u64,
    returns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_delivered: Option<Delivered>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<alerts::Latency>,
}

/// What the counting subscriber received.
#[derive(serde::Serialize, Debug, Clone, Default)]
struct Delivered {
    messages: u64,
    events: u64,
    telemetry_events: u64,
    transactions: u64,
}

#[derive(Default)]
struct Counters {
    telemetry_events: AtomicU64,
    transactions: AtomicU64,
    messages: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    max_lag_us: AtomicU64,
}

impl Counters {
    fn events(&self) -> u64 {
        self.telemetry_events.load(Ordering::Relaxed) + self.transactions.load(Ordering::Relaxed)
    }

    fn lagged(&self, due: Instant) {
        let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
        self.max_lag_us.fetch_max(lag, Ordering::Relaxed);
    }
}

/// Where and how every connection of the run connects.
#[derive(Clone)]
pub struct Broker {
    host: String,
    port: u16,
    login: Option<(String, String)>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Broker {
    fn from_args(args: &Args) -> anyhow::Result<Broker> {
        let (tls, rest) = if let Some(rest) = args.broker.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            let rest = args
                .broker
                .strip_prefix("mqtt://")
                .context("--broker must look like mqtt://host:port or mqtts://host:port")?;
            (false, rest)
        };
        let default_port = if tls { "8883" } else { "1883" };
        let (host, port) = rest.rsplit_once(':').unwrap_or((rest, default_port));
        let tls = if tls {
            Some(tls_config(args.ca_file.as_deref())?)
        } else {
            None
        };
        Ok(Broker {
            host: host.to_string(),
            port: port.parse().context("invalid port in --broker")?,
            login: args
                .username
                .clone()
                .map(|u| (u, args.password.clone().unwrap_or_default())),
            tls,
        })
    }

    /// Options for one connection named `client_id`.
    pub fn options(&self, client_id: String) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        if let Some((user, password)) = &self.login {
            options.set_credentials(user.clone(), password.clone());
        }
        if let Some(tls) = &self.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        options
    }
}

/// rustls (ring) trusting the system's roots and `ca_file`.
fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
            .with_context(|| format!("--ca-file {}", path.display()))?
        {
            roots
                .add(cert.with_context(|| format!("--ca-file {}", path.display()))?)
                .context("--ca-file")?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The run's clock: one start instant and its wall time, so a scheduled
/// instant converts to an event time.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    start_ms: i64,
}

impl Clock {
    fn event_time(&self, due: Instant) -> i64 {
        self.start_ms + due.saturating_duration_since(self.start).as_millis() as i64
    }
}

/// A connection of this load generator to `--broker`, named `name`.
fn mqtt_options(args: &Args, name: &str) -> anyhow::Result<MqttOptions> {
    let mut options =
        Broker::from_args(args)?.options(format!("loadgen-{}-{name}", std::process::id()));
    options.set_max_packet_size(16 << 20, 16 << 20);
    options.set_keep_alive(Duration::from_secs(30));
    Ok(options)
}

/// A publishing connection: the client, and its event loop polled on a task
/// that counts acknowledgements and errors.
fn connect(
    args: &Args,
    name: &str,
    counters: &Arc<Counters>,
) -> anyhow::Result<(AsyncClient, tokio::task::JoinHandle<()>)> {
    let mut options = mqtt_options(args, name)?;
    options.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let counters = counters.clone();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok((client, poller))
}

/// Waits until every QoS 1 message of the run is acknowledged (at most 60 s;
/// QoS 0: half a second), then disconnects. A message sent but never
/// acknowledged is the publisher's to resend, so the report's counts are
/// only comparable with the server's once the acks are in.
async fn finish(
    client: AsyncClient,
    poller: tokio::task::JoinHandle<()>,
    counters: &Counters,
    qos: QoS,
) {
    if qos == QoS::AtMostOnce {
        tokio::time::sleep(Duration::from_millis(500)).await;
    } else {
        let give_up = Instant::now() + Duration::from_secs(60);
        while counters.acked.load(Ordering::Relaxed) < counters.messages.load(Ordering::Relaxed)
            && Instant::now() < give_up
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
}

/// One telemetry connection: its share of the terminals, each reporting
/// `--batch` samples per message, round robin, on a fixed schedule.
async fn telemetry(
    args: Args,
    index: usize,
    counters: Arc<Counters>,
    clock: Clock,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut terminals: Vec<fleet::Terminal> = (index..args.terminals)
        .step_by(args.connections)
        .map(|i| {
            if args.steady_fleet {
                fleet::Terminal::in_steady_state(args.seed, i)
            } else {
                fleet::Terminal::new(args.seed, i)
            }
        })
        .collect();
    if terminals.is_empty() {
        return Ok(());
    }
    let topics: Vec<String> = terminals
        .iter()
        .map(|t| format!("terminals/{}/telemetry", t.id))
        .collect();
    let (client, poller) = connect(&args, &format!("t{index}"), &counters)?;
    let rate = args.telemetry_rate();
    let interval = if rate == 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(args.batch as f64 * args.connections as f64 / rate)
    };
    // A terminal's samples are spaced by its reporting cadence, but one
    // message spans at most 4 s, inside the shipped streams' 5 s bound.
    let cadence_ms = if rate == 0.0 {
        10.0
    } else {
        1000.0 * args.terminals as f64 / rate
    };
    let spacing_ms = cadence_ms
        .min(4000.0 / (args.batch.max(2) - 1) as f64)
        .max(0.0) as i64;
    let qos = args.qos();
    let capacity = args.batch * 200;
    let mut payload = Vec::with_capacity(capacity);
    let mut sent: u64 = 0;
    loop {
        let due = if interval.is_zero() {
            Instant::now()
        } else {
            clock.start + interval.mul_f64(sent as f64)
        };
        if due >= deadline || Instant::now() >= deadline {
            break;
        }
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        } else {
            counters.lagged(due);
        }
        let slot = (sent as usize) % terminals.len();
        terminals[slot].telemetry_batch(
            args.batch,
            clock.event_time(due),
            spacing_ms,
            &mut payload,
        );
        if client
            .publish(
                topics[slot].clone(),
                qos,
                false,
                // hand the buffer over rather than copy it
                std::mem::replace(&mut payload, Vec::with_capacity(capacity)),
            )
            .await
            .is_err()
        {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        sent += 1;
        counters.messages.fetch_add(1, Ordering::Relaxed);
        counters
            .telemetry_events
            .fetch_add(args.batch as u64, Ordering::Relaxed);
    }
    finish(client, poller, &counters, qos).await;
    Ok(())
}

/// The merchants' transactions: a Poisson process per merchant, one
/// transaction per message, on the terminal's transactions topic.
async fn transactions(
    args: Args,
    counters: Arc<Counters>,
    clock: Clock,
    deadline: Instant,
) -> anyhow::Result<()> {
    let rate = args.txn_rate();
    if rate <= 0.0 {
        return Ok(());
    }
    let mut merchants = fleet::Merchants::new(args.seed, args.terminals, rate);
    let (client, poller) = connect(&args, "txn", &counters)?;
    // (next arrival in µs from the start, merchant), earliest first
    let mut due: BinaryHeap<std::cmp::Reverse<(u64, usize)>> = BinaryHeap::new();
    for m in 0..merchants.count() {
        let gap = merchants.next_gap_s(m);
        if gap.is_finite() {
            due.push(std::cmp::Reverse(((gap * 1e6) as u64, m)));
        }
    }
    let qos = args.qos();
    while let Some(std::cmp::Reverse((at_us, m))) = due.pop() {
        let at = clock.start + Duration::from_micros(at_us);
        if at >= deadline {
            break;
        }
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        } else {
            counters.lagged(at);
        }
        let txn = merchants.transaction(m, clock.event_time(at));
        let topic = format!("terminals/T{:06}/transactions", txn.terminal);
        if client
            .publish(topic, qos, false, txn.payload)
            .await
            .is_err()
        {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        counters.messages.fetch_add(1, Ordering::Relaxed);
        counters.transactions.fetch_add(1, Ordering::Relaxed);
        let gap = merchants.next_gap_s(m);
        if gap.is_finite() {
            due.push(std::cmp::Reverse((at_us + (gap * 1e6) as u64, m)));
        }
    }
    finish(client, poller, &counters, qos).await;
    Ok(())
}

/// Shared by the counting subscriber and its caller.
#[derive(Default)]
struct DeliveredCounters {
    messages: AtomicU64,
    telemetry_events: AtomicU64,
    transactions: AtomicU64,
}

/// Subscribes to the load's topics (same QoS) and counts what arrives; the
/// returned future resolves once subscribed.
async fn counting_subscriber(
    args: &Args,
    counters: Arc<DeliveredCounters>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(args, "count")?, 100);
    client
        .subscribe_many([
            SubscribeFilter::new("terminals/+/telemetry".into(), args.qos()),
            SubscribeFilter::new("terminals/+/transactions".into(), args.qos()),
        ])
        .await
        .context("queue subscription")?;
    let subscribed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match subscribed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("counting subscriber: {e}"),
        Err(_) => bail!("counting subscriber: no SUBACK within 10 s"),
    }
    Ok(tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    counters.messages.fetch_add(1, Ordering::Relaxed);
                    // our payloads hold one object per event and no nested objects
                    let events = p.payload.iter().filter(|&&b| b == b'{').count() as u64;
                    if p.topic.ends_with("/transactions") {
                        counters.transactions.fetch_add(events, Ordering::Relaxed);
                    } else {
                        counters
                            .telemetry_events
                            .fetch_add(events, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }))
}

/// A live line on stderr, once a second, when stderr is a terminal.
async fn progress(counters: Arc<Counters>, started: Instant, deadline: Instant) {
    let mut last = (0u64, 0u64, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while Instant::now() < deadline {
        tick.tick().await;
        let now = Instant::now();
        let (events, acked) = (counters.events(), counters.acked.load(Ordering::Relaxed));
        let dt = now.duration_since(last.2).as_secs_f64().max(1e-3);
        eprint!(
            "\r[{:>4.0} s] sent {:>10.0} events/s   acked {:>8.0} msg/s   errors {}   lag {:.0} ms   ",
            now.duration_since(started).as_secs_f64(),
            (events - last.0) as f64 / dt,
            (acked - last.1) as f64 / dt,
            counters.errors.load(Ordering::Relaxed),
            counters.max_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
        );
        last = (events, acked, now);
    }
    eprintln!();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.qos > 1 || args.batch == 0 || args.connections == 0 || args.terminals == 0 {
        bail!("--qos must be 0 or 1; --batch, --connections and --terminals at least 1");
    }
    if !(args.txn_per_terminal_min >= 0.0 && args.txn_per_terminal_min.is_finite()) {
        bail!("--txn-per-terminal-min must be 0 or more");
    }
    if args.rate > 0 && args.txn_rate() >= args.rate as f64 {
        bail!(
            "--rate {} leaves nothing for telemetry after {:.0} transactions/s",
            args.rate,
            args.txn_rate()
        );
    }
    let broker = Broker::from_args(&args)?;

    let delivered = Arc::new(DeliveredCounters::default());
    let subscriber = if args.count {
        Some(counting_subscriber(&args, delivered.clone()).await?)
    } else {
        None
    };

    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let clock = Clock {
        start: started,
        start_ms: wall_ms(),
    };
    let deadline = started + args.duration;
    let dropout_counters = Arc::new(alerts::DropoutCounters::default());
    let dropouts: Vec<_> = (0..args.dropouts)
        .map(|i| {
            tokio::spawn(alerts::dropout_terminal(
                broker.clone(),
                i,
                args.seed,
                dropout_counters.clone(),
                deadline,
            ))
        })
        .collect();
    let latency = args.api.clone().map(|api| {
        tokio::spawn(alerts::measure(
            api,
            broker.clone(),
            args.markers_per_s,
            deadline,
        ))
    });
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(progress(counters.clone(), started, deadline)));
    let mut tasks: Vec<_> = (0..args.connections)
        .map(|i| {
            tokio::spawn(telemetry(
                args.clone(),
                i,
                counters.clone(),
                clock,
                deadline,
            ))
        })
        .collect();
    tasks.push(tokio::spawn(transactions(
        args.clone(),
        counters.clone(),
        clock,
        deadline,
    )));
    for t in tasks {
        t.await??;
    }
    let publishing_s = started.elapsed().as_secs_f64();
    for t in dropouts {
        t.await??;
    }
    let latency = match latency {
        Some(t) => Some(t.await??),
        None => None,
    };
    if let Some(p) = progress {
        let _ = p.await;
    }
    let broker_delivered = match subscriber {
        Some(task) => {
            // until nothing has arrived for 2 s (at most 60 s)
            let give_up = Instant::now() + Duration::from_secs(60);
            let mut last = u64::MAX;
            loop {
                let now = delivered.messages.load(Ordering::Relaxed);
                if now == last || Instant::now() > give_up {
                    break;
                }
                last = now;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            task.abort();
            let telemetry_events = delivered.telemetry_events.load(Ordering::Relaxed);
            let transactions = delivered.transactions.load(Ordering::Relaxed);
            Some(Delivered {
                messages: delivered.messages.load(Ordering::Relaxed),
                events: telemetry_events + transactions,
                telemetry_events,
                transactions,
            })
        }
        None => None,
    };

    let elapsed = args.duration.as_secs_f64().min(publishing_s);
    let events = counters.events();
    let report = Report {
        events_sent: events,
        telemetry_events_sent: counters.telemetry_events.load(Ordering::Relaxed),
        transactions_sent: counters.transactions.load(Ordering::Relaxed),
        messages_sent: counters.messages.load(Ordering::Relaxed),
        messages_acked: counters.acked.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        duration_s: elapsed,
        events_per_s: events as f64 / elapsed.max(1e-9),
        target_events_per_s: args.rate,
        max_schedule_lag_ms: counters.max_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
        terminals: args.terminals,
        merchants: args.terminals.div_ceil(fleet::TERMINALS_PER_MERCHANT),
        batch: args.batch,
        qos: args.qos,
        connections: args.connections,
        seed: args.seed,
        dropouts: dropout_counters.dropped.load(Ordering::Relaxed),
        returns: dropout_counters.returned.load(Ordering::Relaxed),
        broker_delivered,
        latency_ms: latency,
    };
    print_summary(&args, &report);
    if let Some(path) = &args.report_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_summary(args: &Args, report: &Report) {
    println!(
        "sent {} events ({} telemetry, {} transactions) in {} messages over {:.1} s: {:.0} events/s (target {})",
        report.events_sent,
        report.telemetry_events_sent,
        report.transactions_sent,
        report.messages_sent,
        report.duration_s,
        report.events_per_s,
        if args.rate == 0 {
            "max".to_string()
        } else {
            args.rate.to_string()
        },
    );
    println!(
        "{} terminals, {} merchants, {} events per message, QoS {}: {} acked, {} errors, schedule lag at most {:.1} ms",
        report.terminals,
        report.merchants,
        report.batch,
        report.qos,
        report.messages_acked,
        report.errors,
        report.max_schedule_lag_ms
    );
    if args.dropouts > 0 {
        println!(
            "{} terminals dropped off {} times (last will) and came back {} times",
            args.dropouts, report.dropouts, report.returns
        );
    }
    if let Some(d) = &report.broker_delivered {
        println!(
            "counting subscriber received {} events ({} telemetry, {} transactions) in {} messages: {:.2} % of those sent",
            d.events,
            d.telemetry_events,
            d.transactions,
            d.messages,
            100.0 * d.events as f64 / report.events_sent.max(1) as f64
        );
    }
    if let Some(l) = &report.latency_ms {
        println!(
            "alert latency (marker event time -> SSE, {} markers, {} missing): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
            l.samples, l.missing, l.p50, l.p90, l.p99, l.p999, l.max
        );
    }
}
