//! weir's end-to-end scenarios, one module per scenario file, built as one
//! test binary: each integration-test file would otherwise link its own copy
//! of weir and DataFusion (some 330 MB each in a debug build), and forty of
//! them filled CI's disk. Run one file's scenarios with
//! `cargo test --test scenarios <module>::`, e.g. `postgres_sink::`.
//!
//! Two suites stay binaries of their own because they look at their whole
//! process: `poison_input` reads its peak RSS, `fuzz_inputs` silences the
//! panic hook while it fuzzes.

#[path = "../common/mod.rs"]
mod common;

mod alert_rules;
mod alert_sse_slow_client;
mod alert_webhook;
mod alerts_last_will;
mod backfill;
mod check_cli;
mod crash_recovery;
mod dashboard_browser;
mod docs_site;
mod embedded_broker_end_to_end;
mod http_access_control;
mod http_bad_requests;
mod idle_stream_closes_windows;
mod incremental_checkpoints;
mod lineage_golden;
mod mosquitto_broker;
mod mosquitto_persistent_session;
mod mosquitto_shared_subscription;
mod mqtt_access_control;
mod oversize_and_unknown_topics;
mod partial_writes;
mod pipeline_panic;
mod plan_cli;
mod planner_golden;
mod postgres_reference;
mod postgres_sink;
mod postgres_tls;
mod qos1_acks_flow;
mod query_sandbox;
mod reload;
mod retention_event_time;
mod server_ack_after_append;
mod server_backpressure_full_disk;
mod server_broker;
mod server_flow_control;
mod server_mqtt5;
mod storage_failure;
mod tls_outbound;
mod views_read_views;
mod windowed_join;
