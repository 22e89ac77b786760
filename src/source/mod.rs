//! Sources: MQTT in, Arrow out.
//!
//! - `broker`: the embedded rumqttd broker (the default).
//! - `mqtt`: the rumqttc subscriber that feeds the pipeline.
//! - `topic`: topic patterns with `{name}` bindings.
//! - `decode`: JSON payloads to Arrow batches, with per-row rejection.

pub mod broker;
pub mod decode;
pub mod mqtt;
pub mod topic;
