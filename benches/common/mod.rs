//! The synthetic fleet the benchmarks feed on: shaped like the reference
//! data set, 10 000 terminals reporting every 5 s, so one minute holds 12
//! samples per terminal.

#![allow(dead_code)]

/// The allocator weir runs with (src/main.rs): what allocates shows in the
/// numbers as it costs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use bytes::Bytes;
use weir::plan::{plan_sources, Pipeline, ViewPlan};
use weir::source::decode::{Decoder, Message};

pub const TERMINALS: usize = 10_000;
/// A terminal's minute: 12 samples, one message.
pub const EVENTS_PER_MESSAGE: usize = 12;
/// 10 000 messages of 12 events: one minute of 10 000 terminals.
pub const MESSAGES: usize = TERMINALS;
pub const T0: i64 = 1_699_999_980_000;

pub fn pipeline() -> Pipeline {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/pipelines/10_telemetry.sql"
    );
    let sql = std::fs::read_to_string(path).expect("shipped telemetry pipeline");
    plan_sources(&[("10_telemetry.sql".into(), sql)]).expect("shipped pipeline plans")
}

/// The decoder of the shipped `telemetry` stream.
pub fn telemetry_decoder(pipeline: &Pipeline) -> Decoder {
    let stream = pipeline
        .stream("telemetry")
        .expect("telemetry stream")
        .clone();
    Decoder::new(stream, bench_limits())
}

/// The shipped `terminal_health_1m` view (tumbling minute per terminal).
pub fn health_view(pipeline: &Pipeline) -> Arc<ViewPlan> {
    pipeline
        .view("terminal_health_1m")
        .expect("health view")
        .clone()
}

/// One minute of the fleet: each message one terminal's 12 samples (see [`fleet`]).
pub fn messages() -> Vec<Message> {
    fleet(TERMINALS, MESSAGES)
}

/// `count` messages of [`EVENTS_PER_MESSAGE`] samples, as terminals (and
/// weir-loadgen) send them: each message holds samples of the one terminal
/// its topic names — the shipped telemetry stream dead-letters a row whose
/// `terminal_id` disagrees with the topic — 300 ms apart (a message spans
/// 3.3 s, inside the stream's 5 s bound), terminals taking turns, a minute
/// apart per round.
pub fn fleet(terminals: usize, count: usize) -> Vec<Message> {
    let mut out = Vec::with_capacity(count);
    let mut n = 0usize;
    for m in 0..count {
        let terminal = m % terminals;
        let base = T0 + (m / terminals) as i64 * 60_000 + (terminal % 10_000) as i64 * 5;
        let mut payload = String::from("[");
        for e in 0..EVENTS_PER_MESSAGE {
            if e > 0 {
                payload.push(',');
            }
            telemetry_event(&mut payload, terminal, n, base + e as i64 * 300);
            n += 1;
        }
        payload.push(']');
        out.push(message(
            &format!("terminals/T{terminal:05}/telemetry"),
            payload,
        ));
    }
    out
}

/// The same 120 000 events as [`messages`] in messages of 100 events of 100
/// terminals each, in event-time order: no two neighbouring rows share a
/// key. Only for streams whose topic does not name the terminal.
pub fn mixed_messages() -> Vec<Message> {
    let mut out = Vec::with_capacity(1200);
    let mut n = 0usize;
    for m in 0..1200 {
        let mut payload = String::from("[");
        for e in 0..100 {
            let terminal = n % TERMINALS;
            let ts = T0 + (n / TERMINALS) as i64 * 5_000 + (terminal % 5000) as i64;
            if e > 0 {
                payload.push(',');
            }
            telemetry_event(&mut payload, terminal, n, ts);
            n += 1;
        }
        payload.push(']');
        out.push(message(
            &format!("terminals/T{:05}/telemetry", m % TERMINALS),
            payload,
        ));
    }
    out
}

/// Appends the `n`th event of the fleet, from `terminal` at `ts`, as JSON.
pub fn telemetry_event(payload: &mut String, terminal: usize, n: usize, ts: i64) {
    let networks = ["wifi", "lte", "none"];
    payload.push_str(&format!(
        r#"{{"terminal_id":"T{terminal:05}","merchant_id":"M{:04}","ts":{ts},"battery_pct":{:.1},"charging":{},"network":"{}","rssi_dbm":{},"app_latency_ms":{:.1},"app_version":"2.{}.0","error_count":{}}}"#,
        terminal / 10,
        20.0 + (n % 80) as f64,
        n.is_multiple_of(7),
        networks[n % 3],
        -50 - (n % 40) as i64,
        80.0 + (n % 300) as f64 / 3.0,
        n % 4,
        n % 3,
    ));
}

/// A message received at [`T0`].
pub fn message(topic: &str, payload: String) -> Message {
    Message {
        topic: topic.to_string(),
        payload: Bytes::from(payload),
        received_at: T0,
        ack: None,
        dup: false,
    }
}

/// Every shipped pipeline file, planned together (the engine's view of `config/pipelines`).
pub fn shipped() -> Pipeline {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pipelines");
    weir::plan::plan_dir(std::path::Path::new(dir)).expect("shipped pipelines plan")
}

/// The decoder of a stream of `pipeline`.
pub fn decoder(pipeline: &Pipeline, stream: &str) -> Decoder {
    Decoder::new(
        pipeline.stream(stream).expect("stream").clone(),
        bench_limits(),
    )
}

/// `count` transactions, one per message as terminals send them, from
/// `terminals` terminals of 20 per merchant over ten minutes of event time:
/// payments, refunds (some over $500), points and declines.
pub fn transactions(terminals: usize, count: usize) -> Vec<Message> {
    let kinds = [
        "payment", "payment", "payment", "payment", "refund", "points",
    ];
    (0..count)
        .map(|n| {
            let terminal = (n * 7919) % terminals;
            let ts = T0 + (n as i64 * 600_000) / count as i64;
            let kind = kinds[n % kinds.len()];
            let amount = 500 + (n * 104_729) % 80_000;
            let status = if n % 23 == 0 { "declined" } else { "approved" };
            let payload = format!(
                r#"{{"txn_id":"x-{n}","merchant_id":"M{:05}","ts":{ts},"amount_cents":{amount},"currency":"EUR","kind":"{kind}","status":"{status}","points":{}}}"#,
                terminal / 20,
                amount / 100
            );
            Message {
                topic: format!("terminals/T{terminal:06}/transactions"),
                payload: Bytes::from(payload),
                received_at: T0,
                ack: None,
                dup: false,
            }
        })
        .collect()
}

/// `count` messages as the load generator sends them: each holds 100
/// samples of one terminal (50 ms apart), terminals taking turns; a tenth
/// of the terminals report a battery under 15 %.
pub fn terminal_batches(terminals: usize, count: usize) -> Vec<Message> {
    (0..count)
        .map(|m| {
            let terminal = m % terminals;
            let round = (m / terminals) as i64;
            let mut payload = String::from("[");
            for e in 0..EVENTS_PER_MESSAGE {
                if e > 0 {
                    payload.push(',');
                }
                let ts = T0 + round * 5_000 + e as i64 * 50;
                let battery = if terminal.is_multiple_of(10) { 9.5 } else { 20.0 + (terminal % 80) as f64 };
                payload.push_str(&format!(
                    r#"{{"merchant_id":"M{:05}","ts":{ts},"battery_pct":{battery:.1},"charging":false,"network":"wifi","rssi_dbm":-60,"app_latency_ms":{}.0,"app_version":"2.3.0","error_count":0}}"#,
                    terminal / 20,
                    80 + (m + e) % 200,
                ));
            }
            payload.push(']');
            Message {
                topic: format!("terminals/T{terminal:06}/telemetry"),
                payload: Bytes::from(payload),
                received_at: T0,
                ack: None,
                dup: false,
            }
        })
        .collect()
}

/// The default limits, with room for the benches' large messages.
pub fn bench_limits() -> weir::source::decode::Limits {
    weir::source::decode::Limits {
        max_rows_per_message: 1_000_000,
        ..weir::source::decode::Limits::with_message_bytes(4 << 20)
    }
}
