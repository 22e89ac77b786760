//! A mutation fuzzer in the normal suite (the coverage-guided one is
//! `fuzz/`, cargo-fuzz), for everything that parses input from outside:
//! the JSON decoder with topic binding (what terminals send), the MQTT
//! server's packet reader (what any client sends, before it has logged
//! in), the pipeline planner (`weir check` on arbitrary text), the config
//! parser and the pgoutput decoder. Seeds
//! are the checked-in corpus under `fuzz/corpus/`; each iteration mutates
//! one (bit flips, cut, duplicated and spliced ranges, hostile tokens) and
//! feeds it to the checks in `weir::fuzzing`, which both fuzzers share.
//! Nothing may panic, and the decoder's limits must hold. Deterministic (a
//! fixed seed per target); more
//! iterations with `WEIR_FUZZ_ITERATIONS=N` (`scripts/fuzz`). A crashing
//! input is written to `target/fuzz-crashes/` to be added to the corpus.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use weir::fuzzing::{check_config, check_planner, DecoderCheck};

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    ",",
    ":",
    "null",
    "true",
    "1e309",
    "-9223372036854775808",
    "18446744073709551616",
    "0.0000001",
    "NaN",
    "\"ts\"",
    "\"terminal_id\"",
    "\"9999-12-31T23:59:59Z\"",
    "\n",
    "'",
    "(",
    ")",
    ";",
    "--",
    "/*",
    "*/",
    "SELECT",
    "FROM",
    "GROUP BY",
    "WHERE",
    "tumble(INTERVAL '1' MINUTE)",
    "hop(",
    "session(",
    "WATERMARK FOR",
    "CREATE VIEW x AS ",
    "CREATE ALERT a WITH (",
    "= '",
    "''",
    "[[",
    "]]",
    "= \"",
    "\u{feff}",
    "\u{1F600}",
    "\0",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 if len > 1 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16)).min(len);
                data.drain(a..b);
            }
            3 if len > 1 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let piece = data[a..b].to_vec();
                let at = rng.below(len);
                for _ in 0..1 + rng.below(4) {
                    data.splice(at..at, piece.iter().copied());
                }
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = (a + 1 + rng.below(128)).min(other.len());
                    let at = rng.below(len + 1);
                    data.splice(at..at, other[a..b].iter().copied());
                }
            }
            5 | 6 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let at = rng.below(len + 1);
                data.splice(at..at, token.iter().copied());
            }
            _ => {}
        }
    }
    data
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| std::fs::read(entry.ok()?.path()).ok())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn iterations(default: usize) -> usize {
    std::env::var("WEIR_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `check` on `iterations` mutated inputs; a panic fails the test
/// after the input is saved.
fn fuzz(target: &str, seed: u64, default: usize, mut check: impl FnMut(&[u8])) {
    let seeds = corpus(target);
    let mut rng = Rng(seed);
    let n = iterations(default);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..n {
        let input = mutate(&mut rng, &seeds);
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            std::panic::set_hook(quiet);
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{target}-{i}"));
            let _ = std::fs::write(&file, &input);
            panic!(
                "{target}: input {i} panicked; saved to {} ({:?})",
                file.display(),
                String::from_utf8_lossy(&input)
            );
        }
    }
    std::panic::set_hook(quiet);
    eprintln!("{target}: {n} inputs, no panic");
}

#[test]
fn the_decoder_survives_mutated_payloads_and_topics() {
    let check = DecoderCheck::new();
    let mut pick = Rng(7);
    fuzz("decoder", 0x5eed_0001, 20_000, |input| {
        check.check(pick.next() as u8, input)
    });
}

#[test]
fn the_planner_survives_mutated_pipelines() {
    fuzz("planner", 0x5eed_0002, 1_000, check_planner);
}

#[test]
fn the_config_parser_survives_mutated_files() {
    fuzz("config", 0x5eed_0003, 3_000, check_config);
}

#[test]
fn the_pgoutput_decoder_survives_mutated_messages() {
    fuzz(
        "pgoutput",
        0x5eed_0004,
        20_000,
        weir::fuzzing::check_pgoutput,
    );
}

#[test]
fn the_mqtt_server_survives_mutated_client_bytes() {
    fuzz("mqtt", 0x5eed_0005, 200_000, weir::fuzzing::check_mqtt);
}

/// The hand-written MQTT seeds (`fuzz/corpus/mqtt/v4-*`, `v5-*`; the rest
/// are what libFuzzer kept) are sessions weir's server reads to their end,
/// packet by packet (3.1.1 and 5: CONNECT with will and login, PUBLISH at
/// each QoS with properties and a topic alias, SUBSCRIBE with shared and
/// wildcard filters then PUBLISH to topics they match and do not,
/// UNSUBSCRIBE, acks, DISCONNECT), so the mutations start from what
/// clients send, not from bytes the server refuses.
#[test]
fn the_mqtt_seeds_are_sessions_the_server_reads_to_their_end() {
    use weir::source::server::codec::{read, read_connect, Protocol};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/mqtt");
    let seeds: Vec<Vec<u8>> = [
        "v4-session",
        "v4-will-login",
        "v4-connected",
        "v4-subscribed",
        "v5-session",
        "v5-connected",
        "v5-subscribed",
    ]
    .iter()
    .map(|name| std::fs::read(dir.join(name)).expect("a hand-written seed"))
    .collect();
    for seed in seeds {
        let (mode, bytes) = seed.split_first().expect("a mode byte");
        let mut buf = bytes::BytesMut::from(bytes);
        let mut packets = 0;
        let protocol = if mode % 2 == 0 {
            let (protocol, _) = read_connect(&mut buf, 4096)
                .expect("a CONNECT")
                .expect("a whole CONNECT");
            packets += 1;
            protocol
        } else if mode & 2 != 0 {
            Protocol::V4
        } else {
            Protocol::V5
        };
        while !buf.is_empty() {
            let read = read(&mut buf, protocol, 4096);
            assert!(
                matches!(read, Ok(Some(_))),
                "seed {seed:?}: after {packets} packets: {read:?}"
            );
            packets += 1;
        }
        assert!(packets >= 2, "seed {seed:?}: {packets} packets");
    }
}
