//! The simulated fleet: terminals grouped by merchant, each with state that
//! evolves sample by sample, written straight into JSON payloads.
//!
//! Everything is seeded: a terminal's values depend only on `--seed` and its
//! index, never on how terminals are spread over connections or on timing,
//! so two runs with the same seed publish the same values.
//!
//! What a terminal does, per telemetry sample:
//! - **battery** drains while unplugged and charges while plugged in; a
//!   terminal is plugged in somewhere between 5 % and 35 % (a tenth of the
//!   fleet is neglected and runs down to 1–8 %, which trips `low_battery`)
//!   and unplugged between 85 % and 100 %;
//! - **network** stays on wifi, LTE or none for a while and then switches
//!   (a sticky Markov chain); signal strength depends on the network and is
//!   absent without one;
//! - **app latency** is lognormal around the terminal's own median, with
//!   now and then a degradation episode (median × 12 for a few hundred
//!   samples, with more errors), which trips `app_degraded`;
//! - **app version** follows a rollout: most terminals on 2.3.0, some on
//!   2.4.0, a few on a 2.5.0 beta.
//!
//! Transactions come from merchants as Poisson processes (each merchant at
//! its own rate, lognormal across merchants): payments with lognormal
//! amounts, refunds (some over $500, which `large_refunds` keeps), declines
//! (more likely for large amounts) and loyalty-point events.

/// A small xorshift generator: deterministic per seed, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `stream` under `seed`; any pair gives a non-zero state.
    pub fn new(seed: u64, stream: u64) -> Self {
        // splitmix64 of both, so neighbouring streams start far apart
        let mut z = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(stream.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(0x94D0_49BB_1331_11EB);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(z | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box–Muller; one of the pair is enough here).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Lognormal with the given median and shape (sigma of its log).
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// Exponential with the given mean: the gap between Poisson arrivals.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// Terminals per merchant (the reference data set's shape).
pub const TERMINALS_PER_MERCHANT: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Wifi,
    Lte,
    None,
}

impl Network {
    fn as_str(self) -> &'static str {
        match self {
            Network::Wifi => "wifi",
            Network::Lte => "lte",
            Network::None => "none",
        }
    }
}

/// The chance that a healthy terminal's app starts a degradation episode
/// at a sample.
const DEGRADATION_CHANCE: f64 = 0.000_05;
/// A degradation episode lasts this many samples, uniformly.
const EPISODE_SAMPLES: std::ops::Range<u64> = 200..1_000;

const VERSIONS: [&str; 3] = ["2.3.0", "2.4.0", "2.5.0-beta"];

/// One terminal's evolving state.
#[derive(Debug, Clone)]
pub struct Terminal {
    /// `T000042`: the topic level and `terminal_id`.
    pub id: String,
    pub merchant: usize,
    rng: Rng,
    /// Battery in percent.
    battery: f64,
    charging: bool,
    /// Percent per sample while unplugged / plugged in.
    drain: f64,
    charge: f64,
    plug_at: f64,
    unplug_at: f64,
    neglected: bool,
    network: Network,
    /// Median app latency in ms when healthy.
    latency_median: f64,
    /// Samples left in the current degradation episode.
    degraded_for: u32,
    version: &'static str,
}

impl Terminal {
    pub fn new(seed: u64, index: usize) -> Self {
        let mut rng = Rng::new(seed, index as u64);
        let neglected = rng.chance(0.1);
        let version = match rng.unit() {
            u if u < 0.70 => VERSIONS[0],
            u if u < 0.95 => VERSIONS[1],
            _ => VERSIONS[2],
        };
        let network = if rng.chance(0.6) {
            Network::Wifi
        } else {
            Network::Lte
        };
        let mut t = Terminal {
            id: format!("T{index:06}"),
            merchant: index / TERMINALS_PER_MERCHANT,
            battery: rng.range(10.0, 100.0),
            charging: rng.chance(0.3),
            // a full drain takes 2 000-20 000 samples, a charge 300-1 500
            drain: rng.range(0.005, 0.05),
            charge: rng.range(0.07, 0.3),
            plug_at: 0.0,
            unplug_at: 0.0,
            neglected,
            network,
            latency_median: rng.lognormal(120.0, 0.3),
            degraded_for: 0,
            version,
            rng,
        };
        t.plug_at = t.next_plug_at();
        t.unplug_at = t.rng.range(85.0, 100.0);
        t
    }

    /// Terminal `index` as it would be after the fleet has been running
    /// for a long time: somewhere in its battery cycle, drawn from the
    /// cycle's stationary distribution (the share of time it spends
    /// charging, and a battery level uniform between where it is plugged
    /// in and where it is unplugged). A fresh fleet ([`Terminal::new`])
    /// starts every battery uniform over 10–100 %, unplugged mostly, so
    /// its low batteries keep climbing for its first few thousand samples
    /// (about ten minutes at two samples a terminal a second).
    pub fn in_steady_state(seed: u64, index: usize) -> Self {
        let mut t = Self::new(seed, index);
        // time charging : draining = 1/charge : 1/drain
        t.charging = t.rng.chance(t.drain / (t.drain + t.charge));
        t.battery = t.rng.range(t.plug_at, t.unplug_at);
        // and, as often as a running fleet is, part way through a
        // degradation episode: the share of time spent in one
        let mean = (EPISODE_SAMPLES.start + EPISODE_SAMPLES.end) as f64 / 2.0;
        if t.rng.chance(mean / (mean + 1.0 / DEGRADATION_CHANCE)) {
            let length = t.episode_length();
            t.degraded_for = 1 + t.rng.below(u64::from(length)) as u32;
        }
        t
    }

    fn next_plug_at(&mut self) -> f64 {
        if self.neglected {
            self.rng.range(1.0, 8.0)
        } else {
            self.rng.range(5.0, 35.0)
        }
    }

    fn episode_length(&mut self) -> u32 {
        let span = EPISODE_SAMPLES.end - EPISODE_SAMPLES.start;
        (EPISODE_SAMPLES.start + self.rng.below(span)) as u32
    }

    /// One sample of the battery cycle.
    fn advance_battery(&mut self) {
        if self.charging {
            self.battery = (self.battery + self.charge).min(100.0);
            if self.battery >= self.unplug_at {
                self.charging = false;
                self.unplug_at = self.rng.range(85.0, 100.0);
            }
        } else {
            self.battery = (self.battery - self.drain).max(0.0);
            if self.battery <= self.plug_at {
                self.charging = true;
                self.plug_at = self.next_plug_at();
            }
        }
    }

    /// Advances one sample and appends it as a JSON object at event time `ts` (epoch ms).
    pub fn write_sample(&mut self, ts: i64, out: &mut Vec<u8>) {
        self.advance_battery();
        // network: sticky, a switch every ~500 samples
        if self.rng.chance(0.002) {
            self.network = match self.rng.unit() {
                u if u < 0.6 => Network::Wifi,
                u if u < 0.95 => Network::Lte,
                _ => Network::None,
            };
        }
        // app latency, with degradation episodes (~1 in 20 000 samples)
        if self.degraded_for == 0 && self.rng.chance(DEGRADATION_CHANCE) {
            self.degraded_for = self.episode_length();
        }
        let degraded = self.degraded_for > 0;
        self.degraded_for = self.degraded_for.saturating_sub(1);
        let median = if degraded {
            self.latency_median * 12.0
        } else {
            self.latency_median
        };
        let latency = self.rng.lognormal(median, 0.45).min(60_000.0);
        let errors = if degraded {
            u64::from(self.rng.chance(0.3)) + u64::from(self.rng.chance(0.1))
        } else {
            u64::from(self.rng.chance(0.01))
        };

        out.extend_from_slice(b"{\"ts\":");
        push_int(out, ts);
        out.extend_from_slice(b",\"merchant_id\":\"M");
        push_padded(out, self.merchant as u64, 5);
        out.extend_from_slice(b"\",\"battery_pct\":");
        push_tenths(out, self.battery);
        out.extend_from_slice(if self.charging {
            b",\"charging\":true"
        } else {
            b",\"charging\":false"
        });
        out.extend_from_slice(b",\"network\":\"");
        out.extend_from_slice(self.network.as_str().as_bytes());
        out.push(b'"');
        let rssi = match self.network {
            Network::Wifi => Some(self.rng.range(-75.0, -40.0)),
            Network::Lte => Some(self.rng.range(-115.0, -70.0)),
            Network::None => None,
        };
        if let Some(rssi) = rssi {
            out.extend_from_slice(b",\"rssi_dbm\":");
            push_int(out, rssi as i64);
        }
        out.extend_from_slice(b",\"app_latency_ms\":");
        push_tenths(out, latency);
        out.extend_from_slice(b",\"app_version\":\"");
        out.extend_from_slice(self.version.as_bytes());
        out.extend_from_slice(b"\",\"error_count\":");
        push_int(out, errors as i64);
        out.push(b'}');
    }

    /// A JSON array of `count` samples, the last at `end_ms`, `spacing_ms` apart.
    pub fn telemetry_batch(
        &mut self,
        count: usize,
        end_ms: i64,
        spacing_ms: i64,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.push(b'[');
        for i in 0..count {
            if i > 0 {
                out.push(b',');
            }
            let ts = end_ms - (count - 1 - i) as i64 * spacing_ms;
            self.write_sample(ts, out);
        }
        out.push(b']');
    }
}

/// Kinds of transaction a terminal reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnKind {
    Payment,
    Refund,
    Points,
}

/// Merchants' transactions: one Poisson process per merchant.
#[derive(Debug)]
pub struct Merchants {
    rng: Rng,
    /// Mean gap between a merchant's transactions, in seconds.
    mean_gap_s: Vec<f64>,
    currency: Vec<&'static str>,
    terminals: usize,
    seed: u64,
    issued: u64,
}

/// One transaction, ready to publish.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub terminal: usize,
    pub payload: Vec<u8>,
}

impl Merchants {
    /// Merchants of `terminals` terminals with `per_s` transactions per second in total.
    pub fn new(seed: u64, terminals: usize, per_s: f64) -> Self {
        let count = terminals.div_ceil(TERMINALS_PER_MERCHANT).max(1);
        let mut rng = Rng::new(seed, u64::MAX - 1);
        // busy and quiet merchants: weights lognormal, then scaled to the total
        let weights: Vec<f64> = (0..count).map(|_| rng.lognormal(1.0, 0.8)).collect();
        let total: f64 = weights.iter().sum();
        let mean_gap_s = weights
            .iter()
            .map(|w| {
                let rate = per_s * w / total;
                if rate > 0.0 {
                    1.0 / rate
                } else {
                    f64::INFINITY
                }
            })
            .collect();
        let currency = (0..count)
            .map(|_| match rng.below(10) {
                0..=5 => "EUR",
                6..=8 => "USD",
                _ => "GBP",
            })
            .collect();
        Merchants {
            rng,
            mean_gap_s,
            currency,
            terminals,
            seed,
            issued: 0,
        }
    }

    pub fn count(&self) -> usize {
        self.mean_gap_s.len()
    }

    /// Seconds until merchant `m`'s next transaction.
    pub fn next_gap_s(&mut self, m: usize) -> f64 {
        let mean = self.mean_gap_s[m];
        if mean.is_finite() {
            self.rng.exponential(mean)
        } else {
            f64::INFINITY
        }
    }

    /// Merchant `m`'s next transaction at event time `ts`.
    pub fn transaction(&mut self, m: usize, ts: i64) -> Transaction {
        let first = m * TERMINALS_PER_MERCHANT;
        let span = TERMINALS_PER_MERCHANT
            .min(self.terminals.saturating_sub(first))
            .max(1);
        let terminal = (first + self.rng.below(span as u64) as usize).min(self.terminals - 1);
        let kind = match self.rng.unit() {
            u if u < 0.88 => TxnKind::Payment,
            u if u < 0.92 => TxnKind::Refund,
            _ => TxnKind::Points,
        };
        let amount = match kind {
            TxnKind::Payment => Some(self.rng.lognormal(2_500.0, 1.0).max(50.0) as i64),
            // refunds spread wider: a few per hundred are over $500
            TxnKind::Refund => Some(self.rng.lognormal(4_000.0, 1.5).max(50.0) as i64),
            TxnKind::Points => None,
        };
        // declines: 3 %, and more for large amounts
        let decline_p = 0.03 + amount.map_or(0.0, |a| (a as f64 / 200_000.0).min(0.3));
        let approved = !self.rng.chance(decline_p);
        let points = match kind {
            TxnKind::Payment if approved => amount.map(|a| a / 100),
            TxnKind::Points => Some(10 + self.rng.below(490) as i64),
            _ => None,
        };
        self.issued += 1;
        let mut out = Vec::with_capacity(220);
        out.extend_from_slice(b"{\"txn_id\":\"");
        out.extend_from_slice(format!("{:x}-{:x}", self.seed, self.issued).as_bytes());
        out.extend_from_slice(b"\",\"merchant_id\":\"M");
        push_padded(&mut out, m as u64, 5);
        out.extend_from_slice(b"\",\"ts\":");
        push_int(&mut out, ts);
        if let Some(a) = amount {
            out.extend_from_slice(b",\"amount_cents\":");
            push_int(&mut out, a);
            out.extend_from_slice(b",\"currency\":\"");
            out.extend_from_slice(self.currency[m].as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(match kind {
            TxnKind::Payment => b",\"kind\":\"payment\"".as_slice(),
            TxnKind::Refund => b",\"kind\":\"refund\"".as_slice(),
            TxnKind::Points => b",\"kind\":\"points\"".as_slice(),
        });
        out.extend_from_slice(if approved {
            b",\"status\":\"approved\"".as_slice()
        } else {
            b",\"status\":\"declined\"".as_slice()
        });
        if let Some(p) = points {
            out.extend_from_slice(b",\"points\":");
            push_int(&mut out, p);
        }
        out.push(b'}');
        Transaction {
            terminal,
            payload: out,
        }
    }
}

fn push_int(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn push_padded(out: &mut Vec<u8>, v: u64, width: usize) {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(v);
    for _ in digits.len()..width {
        out.push(b'0');
    }
    out.extend_from_slice(digits.as_bytes());
}

/// `v` with one decimal (`41.5`), without going through float formatting.
fn push_tenths(out: &mut Vec<u8>, v: f64) {
    let tenths = (v * 10.0).round() as i64;
    push_int(out, tenths / 10);
    out.push(b'.');
    out.push(b'0' + (tenths % 10).unsigned_abs() as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(t: &mut Terminal, n: usize) -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| {
                let mut out = Vec::new();
                t.write_sample(1_700_000_000_000 + i as i64 * 1000, &mut out);
                serde_json::from_slice(&out).expect("valid JSON")
            })
            .collect()
    }

    #[test]
    fn same_seed_same_values_other_seed_other_values() {
        let a = samples(&mut Terminal::new(7, 3), 50);
        let b = samples(&mut Terminal::new(7, 3), 50);
        let c = samples(&mut Terminal::new(8, 3), 50);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn battery_runs_down_and_charges_back() {
        let mut t = Terminal::new(1, 0);
        t.neglected = true;
        let values: Vec<f64> = samples(&mut t, 60_000)
            .iter()
            .map(|s| s["battery_pct"].as_f64().expect("battery"))
            .collect();
        let low = values.iter().position(|&b| b < 10.0).expect("runs low");
        let recharged = values[low..].iter().any(|&b| b > 80.0);
        assert!(recharged, "a low battery is charged again");
        assert!(values.iter().all(|&b| (0.0..=100.0).contains(&b)));
    }

    #[test]
    fn a_steady_fleet_starts_where_a_long_running_one_is() {
        // The share of neglected terminals under low_battery's 15 %, which
        // is what drives the alerts firing; the same 2 000 or so terminals
        // in each fleet.
        let neglected = |fleet: Vec<Terminal>| -> Vec<Terminal> {
            fleet.into_iter().filter(|t| t.neglected).collect()
        };
        let low = |fleet: &[Terminal]| {
            fleet.iter().filter(|t| t.battery < 15.0).count() as f64 / fleet.len() as f64
        };
        let mut running = neglected((0..20_000).map(|i| Terminal::new(5, i)).collect());
        let fresh = low(&running);
        // run it for 60 000 samples (several charge cycles of the slowest
        // battery), then average the share over the next 40 000
        let mut long_running = 0.0;
        for step in 0..100_000 {
            for t in &mut running {
                t.advance_battery();
            }
            if step >= 60_000 && step % 1_000 == 0 {
                long_running += low(&running) / 40.0;
            }
        }
        let steady = low(&neglected(
            (0..20_000)
                .map(|i| Terminal::in_steady_state(5, i))
                .collect(),
        ));
        let report =
            format!("fresh {fresh:.3}, long running {long_running:.3}, steady {steady:.3}");
        assert!((steady - long_running).abs() < 0.015, "{report}");
        assert!(fresh < long_running - 0.02, "{report}");
    }

    #[test]
    fn latency_is_lognormal_with_degradation_episodes() {
        let mut t = Terminal::new(2, 5);
        t.degraded_for = 300;
        let latencies: Vec<f64> = samples(&mut t, 20_000)
            .iter()
            .map(|s| s["app_latency_ms"].as_f64().expect("latency"))
            .collect();
        let episode_median = median(&latencies[..300]);
        let normal_median = median(&latencies[300..]);
        assert!(
            episode_median > normal_median * 5.0,
            "{episode_median} vs {normal_median}"
        );
        assert!(latencies.iter().all(|&l| l > 0.0));
    }

    #[test]
    fn transactions_parse_and_mix_kinds_declines_and_large_refunds() {
        let mut merchants = Merchants::new(3, 200, 100.0);
        assert_eq!(merchants.count(), 10);
        let mut kinds = std::collections::HashMap::new();
        let mut declined = 0;
        let mut large_refunds = 0;
        for i in 0..20_000 {
            let t = merchants.transaction(i % 10, 1_700_000_000_000);
            assert!(t.terminal / TERMINALS_PER_MERCHANT == i % 10);
            let v: serde_json::Value = serde_json::from_slice(&t.payload).expect("valid JSON");
            *kinds
                .entry(v["kind"].as_str().expect("kind").to_string())
                .or_insert(0) += 1;
            declined += usize::from(v["status"] == "declined");
            large_refunds += usize::from(
                v["kind"] == "refund"
                    && v["status"] == "approved"
                    && v["amount_cents"].as_i64().unwrap_or(0) > 50_000,
            );
        }
        assert_eq!(kinds.len(), 3, "{kinds:?}");
        assert!(
            declined > 0 && large_refunds > 0,
            "{declined} {large_refunds}"
        );
    }

    #[test]
    fn numbers_format_like_json() {
        let mut out = Vec::new();
        push_tenths(&mut out, 41.26);
        out.push(b' ');
        push_tenths(&mut out, 0.04);
        out.push(b' ');
        push_padded(&mut out, 42, 5);
        assert_eq!(String::from_utf8(out).expect("utf8"), "41.3 0.0 00042");
    }

    fn median(values: &[f64]) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}
