//! The embedded MQTT broker: rumqttd, in process, on its own thread.
//!
//! rumqttd 0.20 has no config builder and its `start()` blocks, so the config
//! is written out here in full and the broker gets a thread. Its segment
//! sizes are kept small: the defaults (100 MB x 10) would cost a gigabyte of
//! memory for a log weir does not need, since weir keeps its own.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error(
        "embedded broker cannot listen on {addr}: {source} (another broker there? use it with \
         WEIR_MQTT__BROKER=mqtt://{addr}, or move the embedded one with WEIR_MQTT__EMBEDDED_LISTEN)"
    )]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("embedded broker thread: {0}")]
    Thread(std::io::Error),
}

/// Starts the broker on `listen` (port 0 picks a free port) and returns the address it serves.
pub fn start(listen: SocketAddr, max_payload_bytes: usize) -> Result<SocketAddr, BrokerError> {
    // rumqttd reports a failed bind only inside its own thread; bind here first
    // so that a port in use is a clear start-up error, and to resolve port 0.
    let probe = TcpListener::bind(listen).map_err(|source| BrokerError::Listen {
        addr: listen,
        source,
    })?;
    let addr = probe.local_addr().map_err(|source| BrokerError::Listen {
        addr: listen,
        source,
    })?;
    drop(probe);

    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_payload_bytes,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let mut v4 = HashMap::new();
    v4.insert(
        "1".to_string(),
        ServerSettings {
            name: "weir-v4".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections,
        },
    );
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100_010,
            max_outgoing_packet_count: 1000,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("weir-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    Ok(addr)
}
