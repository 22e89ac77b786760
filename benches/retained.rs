//! What a retained message costs weir's MQTT server, in memory and time.
//!
//! `cargo bench --bench retained` keeps 100 000 retained messages of two
//! kinds a fleet has, one kind at a time, and prints the heap they hold
//! (bytes per message, counted by a global allocator that wraps the one
//! weir runs with) and how long keeping and delivering them takes:
//! - `status`: a terminal's retained online/offline status
//!   (`terminals/T000042/status`, `{"state":"online"}`), the fleet's
//!   last-will pattern (DESIGN §1);
//! - `alert`: weir's own notification of a resolved `low_battery` alert
//!   (`weir/alerts/low_battery/T000042`, the JSON the API serves, ~330
//!   bytes), kept for `alerts.mqtt_resolved_expiry`.
//!
//! - `queued`: one 2 KiB command (`weir/commands/all`, QoS 1) routed to
//!   10 000 offline persistent sessions, as it arrived: a slice of a
//!   64 KiB read buffer; the heap it holds per session.
//!
//! Times are of a second round (the first warms the allocator up).
//! The messages are kept in memory only (no store): the store's copy is
//! the LSM tree's, bounded by its memtable and cache.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Publish, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use weir::alert::record::{Alert, AlertState};
use weir::alert::Severity;
use weir::source::server::broker::{BrokerState, Session, SessionState, SubOptions};

static LIVE: AtomicI64 = AtomicI64::new(0);

struct Counting;

// SAFETY: every call goes unchanged to mimalloc; the counter only adds sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MESSAGES: usize = 100_000;

fn status(i: usize) -> Publish {
    Publish::new(
        format!("terminals/T{i:06}/status"),
        QoS::AtLeastOnce,
        Bytes::from_static(br#"{"state":"online"}"#),
        None,
    )
}

fn alert(i: usize) -> Publish {
    let key = format!("T{i:06}");
    let opened_at = 1_700_000_000_000 + i as i64;
    let alert = Alert {
        id: weir::alert::record::id_text(&weir::alert::record::alert_id(
            "low_battery",
            &key,
            opened_at,
        )),
        rule: "low_battery".into(),
        key: key.clone(),
        severity: Severity::Warning,
        state: AlertState::Resolved,
        opened_at,
        resolved_at: Some(opened_at + 180_000),
        acked: false,
        acked_at: None,
        fired_by: json!({"terminal_id": key, "battery_pct": 12.5}),
        cleared_by: Some(json!({"terminal_id": key, "battery_pct": 21.0})),
    };
    Publish::new(
        format!("weir/alerts/low_battery/{key}"),
        QoS::AtLeastOnce,
        alert.api_json().into_bytes(),
        None,
    )
}

fn measure(kind: &str, make: fn(usize) -> Publish, expiry: Option<Duration>, print: bool) {
    let messages: Vec<Publish> = (0..MESSAGES).map(make).collect();
    let payload: usize = messages.iter().map(|p| p.payload.len()).sum::<usize>() / MESSAGES;
    let before = LIVE.load(Ordering::Relaxed);
    let mut state = BrokerState::new(100, MESSAGES, None);
    let start = Instant::now();
    for p in &messages {
        state.retain(p, expiry.map(|e| Instant::now() + e));
    }
    let keep = start.elapsed();
    let held = LIVE.load(Ordering::Relaxed) - before;
    drop(messages);
    let options = SubOptions {
        filter: "#".into(),
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainForwardRule::OnEverySubscribe,
        identifier: None,
    };
    let start = Instant::now();
    let delivered = black_box(state.retained_for("#", &options, Instant::now()));
    let deliver = start.elapsed();
    assert_eq!(delivered.len(), MESSAGES);
    if !print {
        return;
    }
    println!(
        "retained/{kind}: {MESSAGES} messages of {payload} bytes: heap {:.1} MiB, \
         {} bytes a message; keep {:.0} ns a message, deliver all to a `#` \
         subscriber {:.0} ns a message",
        held as f64 / 1048576.0,
        held / MESSAGES as i64,
        keep.as_nanos() as f64 / MESSAGES as f64,
        deliver.as_nanos() as f64 / MESSAGES as f64,
    );
}

const OFFLINE: usize = 10_000;

fn queued(print: bool) {
    let options = SubOptions {
        filter: "weir/commands/all".into(),
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainForwardRule::OnEverySubscribe,
        identifier: None,
    };
    let mut state = BrokerState::new(1000, MESSAGES, None);
    for i in 0..OFFLINE {
        let client = format!("T{i:06}");
        state
            .subscriptions
            .insert("weir/commands/all", &client, None, options.clone());
        let mut session = Session {
            online: None,
            stored: SessionState::default(),
            expiry: u32::MAX,
            generation: 0,
            subscriptions: Default::default(),
        };
        session
            .subscriptions
            .insert("weir/commands/all".into(), options.clone());
        state.sessions.insert(client, session);
    }
    let mut read_buffer = vec![b' '; 64 * 1024];
    read_buffer[..17].copy_from_slice(b"weir/commands/all");
    let read_buffer = Bytes::from(read_buffer);
    let mut command = Publish::new("", QoS::AtLeastOnce, Bytes::new(), None);
    command.topic = read_buffer.slice(..17);
    command.payload = read_buffer.slice(1024..3072);
    command.pkid = 1;
    let before = LIVE.load(Ordering::Relaxed);
    let start = Instant::now();
    let routed = state.route("backoffice", &command, None);
    let took = start.elapsed();
    let held = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(routed.delivered, OFFLINE as u64);
    if print {
        println!(
            "retained/queued: one 2048-byte command to {OFFLINE} offline sessions: heap {:.1} MiB, \
             {} bytes a session; route {:.0} ns a session",
            held as f64 / 1048576.0,
            held / OFFLINE as i64,
            took.as_nanos() as f64 / OFFLINE as f64,
        );
    }
}

fn main() {
    // the first round warms the allocator up (pages from the system)
    for print in [false, true] {
        measure("status", status, None, print);
        measure("alert", alert, Some(Duration::from_secs(3600)), print);
        queued(print);
    }
}
