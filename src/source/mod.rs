//! Sources: MQTT in, Arrow out.
//!
//! - `server`: weir's own MQTT server (the default): terminals connect here.
//! - `mqtt`: the rumqttc subscriber for an external broker.
//! - `topic`: topic patterns with `{name}` bindings.
//! - `decode`: JSON payloads to Arrow batches, with per-row rejection.

pub mod decode;
pub mod mqtt;
pub mod server;
pub mod topic;
