//! weir: a single-node stream engine for device telemetry.
//!
//! Data flows through the modules in this order:
//!
//! - [`config`]  `weir.toml` and `WEIR_<SECTION>__<KEY>` overrides.
//! - [`source`]  MQTT in: weir's own MQTT server, the rumqttc subscriber for external brokers, topic patterns, JSON -> Arrow.
//! - [`log`]     the durable ingest log's records, sequence numbers and DUP dedup.
//! - [`plan`]    pipeline `.sql` files -> stream definitions, view plans and alert rules (DataFusion).
//! - [`window`]  event time, watermarks, windowed/updating/filter operators; pure, no I/O.
//! - [`alert`]   alert rules over Arrow batches; the lifecycle per (rule, key): `for`, `clear`, `absent_for`; pure.
//! - [`sink`]    view rows, dead letters and alerts -> store; alert notifications (SSE, MQTT, webhooks).
//! - [`store`]   the only module that touches fjall: view rows, dead letters, log, checkpoints.
//! - [`checkpoint`] operator state and log position, written atomically, restored at start-up.
//! - [`api`]     the axum HTTP API; reads the store, never blocks the pipeline.
//! - [`lineage`] the graph from topic to alert sink, column by column, traced from the plans; JSON, Mermaid, DOT, OpenLineage.
//! - [`docs`]    the documentation site (`weir docs`, `/docs/`): one page per stream, view and alert, the graph as SVG.
//! - [`engine`]  wires the stages, runs the prepare and pipeline threads, owns start-up, recovery and shutdown.
//! - [`obs`]     metrics (Prometheus text) and tracing.
//! - [`auth`]    who may call the API (tokens, scopes) and who may connect to the MQTT server (users, roles, ACL).
//! - [`tls`]     rustls (ring) configs for every listener and client.
//!

pub mod alert;
pub mod api;
pub mod auth;
pub mod checkpoint;
pub mod config;
pub mod docs;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod lineage;
pub mod log;
pub mod obs;
pub mod plan;
pub mod postgres;
pub mod sink;
pub mod source;
pub mod store;
pub mod table;
pub mod tls;
pub mod window;
