//! weir: a single-node stream engine for device telemetry.
//!
//! Data flows through the modules in this order:
//!
//! - [`config`]     `weir.toml` and `WEIR_*` overrides.
//! - [`source`]     MQTT in: the embedded broker, the rumqttc subscriber, topic patterns, JSON -> Arrow.
//! - [`log`]        the ingest position of every decoded batch (the durable log's seam).
//! - [`plan`]       pipeline `.sql` files -> stream definitions and view plans (DataFusion).
//! - [`window`]     event time, watermarks, windowed/updating/filter operators; pure, no I/O.
//! - [`alert`]      alert rules (not yet implemented).
//! - [`sink`]       view output and dead letters -> store rows.
//! - [`store`]      the only module that touches fjall: view rows, dead letters, metadata.
//! - [`checkpoint`] operator snapshots (the checkpoint seam).
//! - [`api`]        the axum HTTP API; reads the store, never blocks the pipeline.
//! - [`engine`]     wires the stages, owns start-up and shutdown.
//! - [`obs`]        metrics (Prometheus text) and tracing.

pub mod config;
pub mod plan;
pub mod source;
pub mod window;
