//! Access control: who may call the HTTP API ([`http`]) and who may
//! connect to weir's MQTT server and what they may do there ([`mqtt`]).
//! Secrets are stored hashed; TLS is in [`crate::tls`].

pub mod http;
pub mod mqtt;
