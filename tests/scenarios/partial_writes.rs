//! A torn write found at start-up is discarded with a log line, not a crash:
//! a half-written record at the end of the ingest log, a torn newest
//! checkpoint, and a newest checkpoint whose writing stopped midway (it is
//! written part by part, manifest last). weir starts, falls back to the
//! older checkpoint, replays the log from there, and its counts carry on
//! from the right place.

use crate::common;

use common::process::metric_value;
use common::*;
use weir::checkpoint::Checkpoint;
use weir::store::{LogAppend, Store, StoredCheckpoint};

async fn reports(weir: &Weir, terminal: &str) -> Option<u64> {
    weir.rows("latest")
        .await
        .iter()
        .find(|r| r["terminal_id"] == terminal)?["reports"]
        .as_u64()
}

/// The log's last record: its sequence number and bytes.
fn last_record(store: &Store) -> (u64, Vec<u8>) {
    let last = store.last_log_seq().expect("read").expect("records");
    let mut bytes = Vec::new();
    store
        .scan_log(last - 1, |seq, b| {
            if seq == last {
                bytes = b.to_vec();
            }
            true
        })
        .expect("scan");
    (last, bytes)
}

async fn publish_and_count(weir: &Weir, from: usize, to: usize) {
    let messages: Vec<(&str, String)> = (from..to)
        .map(|i| {
            (
                "terminals/T1/telemetry",
                event(T0 + i as i64 * 1_000, 50.0, Some(10.0)),
            )
        })
        .collect();
    weir.publish(&messages).await;
    wait_for(&format!("{to} reports"), || async {
        (reports(weir, "T1").await? == to as u64).then_some(())
    })
    .await;
}

/// Two runs, each ending with a checkpoint (SIGTERM-like shutdown): slot 0,
/// then slot 1; T1 has 5 reports.
async fn two_checkpoints() -> tempfile::TempDir {
    let weir = Weir::start(&[("telemetry.sql", TELEMETRY)]).await;
    publish_and_count(&weir, 0, 3).await;
    let dir = weir.stop().await;
    let weir = Weir::start_in(dir, None).await;
    publish_and_count(&weir, 3, 5).await;
    weir.stop().await
}

/// The slot of the newest checkpoint, as written.
fn newest_checkpoint(store: &Store) -> (u8, StoredCheckpoint) {
    let newest = (0..2u8)
        .filter_map(|slot| {
            let stored = store.read_checkpoint(slot).expect("read")?;
            Some((
                Checkpoint::decode_manifest(&stored.manifest).ok()?.seq,
                slot,
                stored,
            ))
        })
        .max_by_key(|(seq, _, _)| *seq);
    let (_, slot, stored) = newest.expect("two checkpoints were written");
    (slot, stored)
}

/// It starts, its state is whole (older checkpoint + replay), and it counts on.
async fn restarts_whole(dir: tempfile::TempDir) -> tempfile::TempDir {
    let weir = Weir::start_in(dir, None).await;
    assert_eq!(reports(&weir, "T1").await, Some(5));
    let metrics = weir.metrics().await;
    let replayed = metric_value(&metrics, "weir_replayed_records_total").unwrap_or(0.0);
    assert!(
        replayed >= 1.0,
        "the older checkpoint needs a replay: {metrics}"
    );
    publish_and_count(&weir, 5, 6).await;
    weir.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_whose_writing_stopped_midway_is_not_used() {
    let dir = two_checkpoints().await;
    {
        // What a crash leaves after the slot was cleared and part of the
        // next checkpoint written (half a header, a chunk of its state),
        // before its manifest.
        let store = Store::open(&dir.path().join("data")).expect("open store");
        let (slot, stored) = newest_checkpoint(&store);
        store.clear_checkpoint(slot).expect("clear");
        let (name, bytes) = &stored.parts[0];
        store
            .put_checkpoint_part(slot, name, &bytes[..bytes.len() / 2])
            .expect("part");
        store
            .put_checkpoint_chunk(&orphan_chunk(name), b"half a chunk")
            .expect("chunk");
        store.sync().expect("sync");
        assert!(store.read_checkpoint(slot).expect("read").is_none());
    }
    let dir = restarts_whole(dir).await;
    // the checkpoints written since dropped the chunk no manifest names
    let store = Store::open(&dir.path().join("data")).expect("open store");
    let (_, stored) = newest_checkpoint(&store);
    let name = &stored.parts[0].0;
    assert_eq!(
        store
            .read_checkpoint_chunk(&orphan_chunk(name))
            .expect("read"),
        None
    );
}

/// A chunk of a checkpoint that was never finished (a generation no
/// manifest has).
fn orphan_chunk(part: &str) -> Vec<u8> {
    weir::checkpoint::chunk_key(part, 0, 0, u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_log_tail_and_torn_checkpoint_are_discarded() {
    let dir = two_checkpoints().await;

    // Tear the newest checkpoint and append half a record to the log.
    let partial_seq;
    {
        let store = Store::open(&dir.path().join("data")).expect("open store");
        let (slot, stored) = newest_checkpoint(&store);
        let torn = &stored.manifest[..stored.manifest.len() / 2];
        store
            .put_checkpoint_manifest(slot, torn)
            .expect("tear checkpoint");

        let (last, bytes) = last_record(&store);
        partial_seq = last + 1;
        let half = LogAppend {
            seq: partial_seq,
            record: bytes[..bytes.len() / 2].to_vec(),
            ids: Vec::new(),
        };
        store.append_log(&[half], &[]).expect("append");
        store.sync().expect("sync");
    }

    let dir = restarts_whole(dir).await;

    let store = Store::open(&dir.path().join("data")).expect("open store");
    let mut seqs = Vec::new();
    store
        .scan_log(0, |seq, _| {
            seqs.push(seq);
            true
        })
        .expect("scan");
    assert!(
        !seqs.contains(&partial_seq),
        "the partial record was not removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_before_the_end_stops_recovery_with_a_clear_error() {
    let weir = Weir::start(&[("telemetry.sql", TELEMETRY)]).await;
    publish_and_count(&weir, 0, 3).await;
    let dir = weir.stop().await;

    // Two records after the checkpoint: the first damaged, the second whole.
    {
        let store = Store::open(&dir.path().join("data")).expect("open store");
        let (last, bytes) = last_record(&store);
        let mut damaged = bytes.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0xff;
        store
            .append_log(
                &[
                    LogAppend {
                        seq: last + 1,
                        record: damaged,
                        ids: Vec::new(),
                    },
                    LogAppend {
                        seq: last + 2,
                        record: bytes,
                        ids: Vec::new(),
                    },
                ],
                &[],
            )
            .expect("append");
        store.sync().expect("sync");
    }

    let mut config = weir::config::Config::default();
    config.http.listen = "127.0.0.1:0".parse().expect("addr");
    config.mqtt.embedded_listen = "127.0.0.1:0".parse().expect("addr");
    config.storage.dir = dir.path().join("data");
    config.pipelines.dir = dir.path().join("pipelines");
    let pipeline = weir::plan::plan_dir(&config.pipelines.dir).expect("plan");
    let running = weir::engine::start(config, pipeline)
        .await
        .expect("weir starts");
    let stopped = tokio::time::timeout(DEADLINE, running.wait_for(std::future::pending()))
        .await
        .expect("weir stops by itself");
    let error = stopped.expect_err("recovery fails");
    assert!(
        error.contains("recovery failed") && error.contains("corrupt"),
        "{error}"
    );
}
