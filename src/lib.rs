//! weir: a single-node stream engine for device telemetry.
//!
//! Data flows through the modules in this order:
//!
//! - [`config`]  `weir.toml` and `WEIR_<SECTION>__<KEY>` overrides.
//! - [`source`]  MQTT in: the embedded broker, the rumqttc subscriber, topic patterns, JSON -> Arrow.
//! - [`log`]     the ingest log's seam (batch sequence numbers; durability comes next).
//! - [`plan`]    pipeline `.sql` files -> stream definitions and view plans (DataFusion).
//! - [`window`]  event time, watermarks, windowed/updating/filter operators; pure, no I/O.
//! - [`sink`]    view output and dead letters -> store rows.
//! - [`store`]   the only module that touches fjall: view rows, dead letters, metadata.
//! - [`api`]     the axum HTTP API; reads the store, never blocks the pipeline.
//! - [`engine`]  wires the stages, owns start-up and shutdown.
//! - [`obs`]     metrics (Prometheus text) and tracing.
//!
//! Alerts (`alert`) and checkpoints (`checkpoint`) are the next stages to be
//! built; operators already snapshot and restore their state
//! ([`window::operator::ViewOperator::snapshot`]).

pub mod api;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod log;
pub mod obs;
pub mod plan;
pub mod sink;
pub mod source;
pub mod store;
pub mod window;
