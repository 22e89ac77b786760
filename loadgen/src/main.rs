//! weir-loadgen: publishes a fleet's telemetry over MQTT at a target rate and
//! reports what it achieved (DESIGN §7).
//!
//! This first version drives throughput: N terminals publish telemetry
//! batches (`--batch` events per message, a JSON array on the terminal's
//! topic) over `--connections` MQTT connections, paced open-loop: each
//! connection sends on a fixed schedule computed from the start time, so a
//! slow broker shows up as a rate shortfall rather than being hidden.
//! `--dropouts` adds terminals that drop off with a real last will, and
//! `--api` measures alert latency end to end (see `alerts`).
//! Not yet here (the load-generator issue): the realistic fleet model
//! (battery cycles, transactions), latency of view rows, and the progress
//! line.

mod alerts;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "weir-loadgen",
    about = "Simulate a fleet of terminals over MQTT"
)]
struct Args {
    /// Broker address, mqtt://host:port.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Number of terminals.
    #[arg(long, default_value_t = 1000)]
    terminals: usize,
    /// Events per second in total; 0 sends as fast as the broker takes them.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long to publish, e.g. 30s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Events per MQTT message (a JSON array from one terminal).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// MQTT QoS, 0 or 1.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Parallel MQTT connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seed of the fleet's values, so runs repeat.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// weir's HTTP API, e.g. http://127.0.0.1:8080: measure the latency from
    /// publishing a terminal's offline status to its alert on the SSE stream.
    #[arg(long)]
    api: Option<String>,
    /// Latency markers per second with --api.
    #[arg(long, default_value_t = 20.0)]
    markers_per_s: f64,
    /// Terminals that drop off now and then (their last will fires) and come back.
    #[arg(long, default_value_t = 0)]
    dropouts: usize,
    /// Write the JSON report here.
    #[arg(long)]
    report_json: Option<std::path::PathBuf>,
}

#[derive(serde::Serialize)]
struct Report {
    events_sent: u64,
    messages_sent: u64,
    messages_acked: u64,
    errors: u64,
    duration_s: f64,
    events_per_s: f64,
    target_events_per_s: u64,
    terminals: usize,
    batch: usize,
    qos: u8,
    connections: usize,
    dropouts: u64,
    returns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<alerts::Latency>,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    messages: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
}

/// A small xorshift generator: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn parse_broker(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .context("--broker must look like mqtt://host:port")?;
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    Ok((
        host.to_string(),
        port.parse().context("invalid port in --broker")?,
    ))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One telemetry batch of `batch` events from terminal `terminal`.
fn telemetry(rng: &mut Rng, terminal: usize, batch: usize, ts: i64) -> String {
    let networks = ["wifi", "lte", "lte", "none"];
    let mut out = String::with_capacity(batch * 200);
    out.push('[');
    for i in 0..batch {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"terminal_id":"T{terminal:06}","merchant_id":"M{:05}","ts":{},"battery_pct":{},"charging":{},"network":"{}","rssi_dbm":{},"app_latency_ms":{},"app_version":"2.{}.0","error_count":{}}}"#,
            terminal / 20,
            ts + i as i64,
            5 + rng.below(95),
            rng.below(4) == 0,
            networks[rng.below(4) as usize],
            -40 - rng.below(60) as i64,
            40 + rng.below(400),
            rng.below(3),
            u64::from(rng.below(20) == 0),
        ));
    }
    out.push(']');
    out
}

async fn connection(
    args: Args,
    index: usize,
    counters: Arc<Counters>,
    deadline: Instant,
) -> anyhow::Result<()> {
    let (host, port) = parse_broker(&args.broker)?;
    let mut options = MqttOptions::new(
        format!("weir-loadgen-{}-{index}", std::process::id()),
        host,
        port,
    );
    options.set_max_packet_size(16 << 20, 16 << 20);
    options.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let poll_counters = counters.clone();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    poll_counters.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(_) => {
                    poll_counters.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    // This connection's share of the terminals and of the rate.
    let terminals: Vec<usize> = (index..args.terminals).step_by(args.connections).collect();
    if terminals.is_empty() {
        return Ok(());
    }
    let messages_per_s = args.rate as f64 / args.connections as f64 / args.batch as f64;
    let interval = if args.rate == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(1.0 / messages_per_s)
    };
    let mut rng = Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64 + 1));
    let start = Instant::now();
    let mut sent: u64 = 0;
    while Instant::now() < deadline {
        if !interval.is_zero() {
            // open loop: the schedule is fixed from the start, not from the last send
            let due = start + interval.mul_f64(sent as f64);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let terminal = terminals[(sent as usize) % terminals.len()];
        let payload = telemetry(&mut rng, terminal, args.batch, now_ms());
        let topic = format!("terminals/T{terminal:06}/telemetry");
        if client.publish(topic, qos, false, payload).await.is_err() {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        sent += 1;
        counters.messages.fetch_add(1, Ordering::Relaxed);
        counters
            .events
            .fetch_add(args.batch as u64, Ordering::Relaxed);
    }
    // give QoS 1 acks a moment to come back, then leave
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.qos > 1 || args.batch == 0 || args.connections == 0 || args.terminals == 0 {
        bail!("--qos must be 0 or 1; --batch, --connections and --terminals at least 1");
    }
    parse_broker(&args.broker)?;
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let deadline = started + args.duration;
    let dropout_counters = Arc::new(alerts::DropoutCounters::default());
    let dropouts: Vec<_> = (0..args.dropouts)
        .map(|i| {
            tokio::spawn(alerts::dropout_terminal(
                args.broker.clone(),
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
            args.broker.clone(),
            args.markers_per_s,
            deadline,
        ))
    });
    let tasks: Vec<_> = (0..args.connections)
        .map(|i| tokio::spawn(connection(args.clone(), i, counters.clone(), deadline)))
        .collect();
    for t in tasks {
        t.await??;
    }
    for t in dropouts {
        t.await??;
    }
    let latency = match latency {
        Some(t) => Some(t.await??),
        None => None,
    };
    let elapsed = args
        .duration
        .as_secs_f64()
        .min(started.elapsed().as_secs_f64());
    let events = counters.events.load(Ordering::Relaxed);
    let report = Report {
        events_sent: events,
        messages_sent: counters.messages.load(Ordering::Relaxed),
        messages_acked: counters.acked.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        duration_s: elapsed,
        events_per_s: events as f64 / elapsed.max(1e-9),
        target_events_per_s: args.rate,
        terminals: args.terminals,
        batch: args.batch,
        qos: args.qos,
        connections: args.connections,
        dropouts: dropout_counters.dropped.load(Ordering::Relaxed),
        returns: dropout_counters.returned.load(Ordering::Relaxed),
        latency_ms: latency,
    };
    println!(
        "sent {} events in {} messages over {:.1} s: {:.0} events/s (target {}), {} acked, {} errors",
        report.events_sent,
        report.messages_sent,
        report.duration_s,
        report.events_per_s,
        if args.rate == 0 { "max".to_string() } else { args.rate.to_string() },
        report.messages_acked,
        report.errors
    );
    if args.dropouts > 0 {
        println!(
            "{} terminals dropped off {} times (last will) and came back {} times",
            args.dropouts, report.dropouts, report.returns
        );
    }
    if let Some(l) = &report.latency_ms {
        println!(
            "alert latency (publish -> SSE, {} markers, {} missing): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
            l.samples, l.missing, l.p50, l.p90, l.p99, l.p999, l.max
        );
    }
    if let Some(path) = &args.report_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
