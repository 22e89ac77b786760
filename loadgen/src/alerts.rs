//! Terminals that drop off, and alert latency through weir's API.
//!
//! - `--dropouts N`: N terminals (`D000000`...) each hold a connection of
//!   their own with a real MQTT last will (`{"state": "offline"}` on
//!   `terminals/{id}/status`), say `{"state": "online"}` (retained) when
//!   they connect, and now and then close their socket without a DISCONNECT
//!   — so the broker publishes the will and weir's `terminal_offline` rule
//!   fires — then come back a few seconds later, which resolves it.
//! - `--api URL`: end-to-end alert latency. Marker terminals (`LAT...`) go
//!   offline on a fixed schedule (`--markers-per-s`, open loop); the time
//!   from each marker's *scheduled* publish to its `opened` event on
//!   `GET /api/v1/alerts/stream?rule=terminal_offline` goes into an
//!   HdrHistogram. Measuring from the schedule, not from when the publish
//!   happened, keeps a stalled publisher from hiding latency (coordinated
//!   omission). Each marker goes back online right after, so its alert
//!   resolves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, LastWill, QoS};

use super::{Broker, Rng};

#[derive(Default)]
pub struct DropoutCounters {
    pub dropped: AtomicU64,
    pub returned: AtomicU64,
}

/// One terminal that drops off and comes back until `deadline`.
pub async fn dropout_terminal(
    broker: Broker,
    index: usize,
    seed: u64,
    counters: Arc<DropoutCounters>,
    deadline: Instant,
) -> anyhow::Result<()> {
    let id = format!("D{index:06}");
    let topic = format!("terminals/{id}/status");
    let mut rng = Rng::new(seed, (1 << 40) + index as u64);
    let mut first = true;
    while Instant::now() < deadline {
        let mut options = broker.options(format!("terminal-{id}"));
        options.set_keep_alive(Duration::from_secs(5));
        options.set_last_will(LastWill::new(
            topic.clone(),
            r#"{"state":"offline"}"#,
            QoS::AtLeastOnce,
            false,
        ));
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        client
            .publish(
                topic.clone(),
                QoS::AtLeastOnce,
                true,
                r#"{"state":"online"}"#,
            )
            .await
            .context("queue online")?;
        if !first {
            counters.returned.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        // online for 5-15 s, polling the connection
        let online = Duration::from_millis(5_000 + rng.below(10_000));
        let until = (Instant::now() + online).min(deadline);
        while Instant::now() < until {
            if tokio::time::timeout_at(until.into(), eventloop.poll())
                .await
                .is_ok_and(|r| r.is_err())
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if Instant::now() >= deadline {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
            break;
        }
        // the socket closes without a DISCONNECT: the broker sends the will
        drop(eventloop);
        counters.dropped.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(3_000 + rng.below(7_000))).await;
    }
    Ok(())
}

/// Latency percentiles in milliseconds, as the report holds them.
#[derive(serde::Serialize, Debug, Clone)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub samples: u64,
    /// Markers whose alert was not seen before the end.
    pub missing: u64,
}

/// Publishes markers until `deadline` and measures publish-to-SSE latency.
pub async fn measure(
    api: String,
    broker: Broker,
    markers_per_s: f64,
    deadline: Instant,
) -> anyhow::Result<Latency> {
    let url = format!(
        "{}/api/v1/alerts/stream?rule=terminal_offline",
        api.trim_end_matches('/')
    );
    let mut response = reqwest::get(&url)
        .await
        .with_context(|| format!("GET {url}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        bail!("{url}: {status}: {body} (does weir run the shipped terminal_offline rule?)");
    }
    let scheduled: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).context("histogram")?,
    ));

    // The SSE reader: each `opened` event of a marker is one sample.
    let reader_scheduled = scheduled.clone();
    let reader_histogram = histogram.clone();
    let reader = tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            let now = Instant::now();
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if !block.starts_with("event: opened") && !block.contains("\nevent: opened") {
                    continue;
                }
                let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else {
                    continue;
                };
                let Some(key) = event["alert"]["key"].as_str() else {
                    continue;
                };
                let due = reader_scheduled.lock().ok().and_then(|mut s| s.remove(key));
                if let (Some(due), Ok(mut h)) = (due, reader_histogram.lock()) {
                    let us = now.saturating_duration_since(due).as_micros() as u64;
                    let _ = h.record(us.max(1));
                }
            }
        }
    });

    let mut options = broker.options(format!("loadgen-markers-{}", std::process::id()));
    options.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let poller = tokio::spawn(async move {
        while Instant::now() < deadline + Duration::from_secs(5) {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let interval = Duration::from_secs_f64(1.0 / markers_per_s.max(0.001));
    let start = Instant::now();
    let mut n: u64 = 0;
    loop {
        let due = start + interval.mul_f64(n as f64);
        if due >= deadline {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let key = format!("LAT{n:07}");
        if let Ok(mut s) = scheduled.lock() {
            s.insert(key.clone(), due);
        }
        let topic = format!("terminals/{key}/status");
        client
            .publish(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                r#"{"state":"offline"}"#,
            )
            .await
            .context("publish marker")?;
        client
            .publish(topic, QoS::AtLeastOnce, false, r#"{"state":"online"}"#)
            .await
            .context("publish marker")?;
        n += 1;
    }
    // wait up to 5 s for the last markers' alerts
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle && scheduled.lock().map(|s| !s.is_empty()).unwrap_or(false) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.abort();
    poller.abort();
    let _ = client.disconnect().await;
    let missing = scheduled.lock().map(|s| s.len() as u64).unwrap_or(0);
    let h = histogram
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram lock"))?;
    let ms = |v: u64| v as f64 / 1000.0;
    Ok(Latency {
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        samples: h.len(),
        missing,
    })
}
