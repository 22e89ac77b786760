//! `weir.toml`: the operator's one config file (DESIGN §7).
//!
//! Every key has a serde default so that an empty file (or no file) serves a
//! fresh checkout. Unknown keys are errors. Every key can be overridden by an
//! environment variable `WEIR_<SECTION>__<KEY>` (`WEIR_HTTP__LISTEN=0.0.0.0:8080`);
//! overrides are applied to the TOML document *before* it is deserialized, so
//! an override goes through exactly the same type checks as the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// Everything that can go wrong while loading the config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub storage: StorageConfig,
    pub pipelines: PipelinesConfig,
    pub alerts: AlertsConfig,
    pub limits: LimitsConfig,
    /// Outside systems named once (`[[connections]]`): Postgres reference
    /// tables and sinks refer to them by name.
    pub connections: Vec<ConnectionConfig>,
}

/// A named connection to Postgres (DESIGN §3 "Connections"). The password is
/// never in this file: `password_env` names an environment variable,
/// `password_file` a file (its first line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    pub name: String,
    /// Only `postgres` today.
    pub kind: String,
    /// `postgres://user@host:port/database`, without a password.
    pub url: String,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `disable`; `prefer` (default: TLS when the server offers it,
    /// encrypted but not checking the server's certificate, as libpq's
    /// prefer; with `ca_file`, checked); `require` (TLS, the server's
    /// certificate checked against the system's roots and `ca_file`, as
    /// libpq's verify-full). TLS is rustls.
    #[serde(default)]
    pub tls: PgTls,
    /// CA certificates (PEM) to trust instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgTls {
    Disable,
    #[default]
    Prefer,
    Require,
}

impl ConnectionConfig {
    fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name: must not be empty".into());
        }
        if self.kind != "postgres" {
            return Err(format!(
                "kind: {:?} is not known (known: postgres)",
                self.kind
            ));
        }
        let url: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| format!("url: not a Postgres connection URL: {e}"))?;
        if url.get_password().is_some() {
            return Err(
                "url: holds a password; give it with password_env or password_file, never in the config file"
                    .into(),
            );
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            return Err("password_env and password_file: give one".into());
        }
        Ok(())
    }

    /// The password, from the environment or the file; `None` when neither is set.
    pub fn password(&self) -> Result<Option<String>, String> {
        if let Some(var) = &self.password_env {
            return std::env::var(var).map(Some).map_err(|_| {
                format!(
                    "connection {}: environment variable {var} is not set",
                    self.name
                )
            });
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "connection {}: cannot read password_file {}: {e}",
                    self.name,
                    path.display()
                )
            })?;
            return Ok(Some(text.lines().next().unwrap_or("").to_string()));
        }
        Ok(None)
    }
}

/// What one message may hold (DESIGN §2 "Limits"); beyond, it is dead-lettered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// A longer text value is `schema` (it would become keys and rows). Default 1024.
    pub max_text_bytes: usize,
    /// A message with more rows is `oversize`. Default 10 000.
    pub max_rows_per_message: usize,
    /// An event time further ahead of its arrival is `future`, and never
    /// moves a watermark. Default `1h`.
    #[serde(with = "duration_str")]
    pub max_future: Duration,
    /// An updating view's key idle this long (event time, behind the
    /// watermark) leaves memory; its stored row stays. Per view: `WITH
    /// (key_ttl = ...)`. `0s`: never. Default `30 days`.
    #[serde(with = "duration_str")]
    pub key_ttl: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_text_bytes: 1024,
            max_rows_per_message: 10_000,
            max_future: Duration::from_secs(3600),
            key_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP API. Default `127.0.0.1:8080`; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Bearer tokens (`[[http.tokens]]`: `name`, `token_sha256`, `scopes`).
    /// None: the API is open, and only on a loopback listen unless
    /// `allow_anonymous`. `weir token new` makes one.
    pub tokens: Vec<crate::auth::http::TokenConfig>,
    /// Serve the API without tokens on a non-loopback address. Default false.
    pub allow_anonymous: bool,
    /// Host names the API answers to besides loopback ones (a `Host`
    /// header naming another is refused: DNS rebinding). Default none:
    /// on a loopback listen only loopback names, otherwise any.
    pub allowed_hosts: Vec<String>,
    /// Serve HTTPS with this PEM certificate chain and key.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Ad-hoc queries running at once (more: 429). Default 2.
    pub query_concurrency: usize,
    /// An ad-hoc query is cancelled after this (408). Default `10s`.
    #[serde(with = "duration_str")]
    pub query_timeout: Duration,
    /// Bytes one ad-hoc query may use (views loaded, sorts, aggregates; more: 413). Default 256 MiB.
    pub query_memory: usize,
    /// The longest any request may take to answer (then 503
    /// `request_timeout`; a stream's body, once started, is not limited).
    /// Default `30s`.
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tokens: Vec::new(),
            allow_anonymous: false,
            allowed_hosts: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            query_concurrency: 2,
            query_timeout: Duration::from_secs(10),
            query_memory: 256 << 20,
            request_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `"embedded"` (default): weir is the MQTT server; otherwise
    /// `mqtt://host:port` or `mqtts://host:port` of an external broker.
    pub broker: String,
    /// Listen address of weir's MQTT server. Default `127.0.0.1:1883`.
    pub embedded_listen: SocketAddr,
    /// weir's MQTT server over TLS (MQTT over TLS, usually port 8883), beside
    /// `embedded_listen`. Needs `tls_cert_file` and `tls_key_file`.
    pub embedded_tls_listen: Option<SocketAddr>,
    /// PEM certificate chain and key of weir's MQTT TLS listener.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Clients of the TLS listener may present a certificate signed by this
    /// CA (mTLS); its subject CN is their user name.
    pub tls_client_ca_file: Option<PathBuf>,
    /// `[[user]]` `name`, `password_hash` (PHC string: argon2id, or bcrypt),
    /// `role` (`terminal`, `reader`, `admin`). With it, anonymous clients
    /// are refused. `weir user new` makes an entry.
    pub users_file: Option<PathBuf>,
    /// Let anonymous clients connect to a non-loopback listener (no users
    /// file). Default false: weir refuses to start that way.
    pub allow_anonymous: bool,
    /// Client id of weir's subscriber; the persistent-session identity. Default `weir`.
    pub client_id: String,
    /// External broker: credentials, and for `mqtts://` the CA to trust
    /// besides the system's and a client certificate and key (mTLS).
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Largest MQTT packet weir accepts, in bytes. Default 2 MiB, so 1 MiB
    /// batches fit with room to spare. Larger messages are dead-lettered as `oversize`.
    pub max_packet_bytes: usize,
    /// External broker: this many connections on one shared subscription
    /// (`$share/weir/...`), each with its own in-flight window. Default 1.
    pub connections: usize,
    /// weir's MQTT server: publishes of one connection awaiting their ack
    /// (the receive maximum it advertises). Default 256.
    pub receive_maximum: u16,
    /// weir's MQTT server: messages queued per subscriber session; more are
    /// dropped and counted. Default 1000.
    pub max_queued_messages: usize,
    /// weir's MQTT server: connections at most. Default 200 000.
    pub max_connections: usize,
    /// weir's MQTT server: the longest keep-alive a client gets, in seconds
    /// (a client asking for none, or more, gets this). Default 0: as the client asks.
    pub max_keep_alive: u16,
    /// weir's MQTT server: longest a session outlives its connection. 3.1.1
    /// clients with `clean_session = false` get this; MQTT 5 clients at most
    /// this. Default `7 days`.
    #[serde(with = "duration_str")]
    pub max_session_expiry: Duration,
    /// weir's MQTT server: subscriptions per session. Default 1000.
    pub max_subscriptions: usize,
    /// weir's MQTT server: retained messages clients may keep; beyond, a
    /// client's retained message is delivered but not kept. weir's own
    /// alert notifications (`weir/alerts/...`) do not count. Default 100 000.
    pub max_retained: usize,
    /// weir's MQTT server: bytes (topics and payloads) of the retained
    /// messages clients may keep, beyond which one is delivered but not
    /// kept, as at `max_retained`: the count alone let 100 000 payloads of
    /// `max_packet_bytes` each be kept. Default 256 MiB.
    pub max_retained_bytes: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: "embedded".into(),
            embedded_listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            embedded_tls_listen: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            users_file: None,
            allow_anonymous: false,
            client_id: "weir".into(),
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            max_packet_bytes: 2 * 1024 * 1024,
            connections: 1,
            receive_maximum: 256,
            max_queued_messages: 1000,
            max_connections: 200_000,
            max_keep_alive: 0,
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            max_subscriptions: 1000,
            max_retained: 100_000,
            max_retained_bytes: 256 << 20,
        }
    }
}

/// Where the broker is, once `mqtt.broker` has been parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAddr {
    Embedded,
    External { host: String, port: u16, tls: bool },
}

impl MqttConfig {
    pub fn broker_addr(&self) -> Result<BrokerAddr, String> {
        if self.broker == "embedded" {
            return Ok(BrokerAddr::Embedded);
        }
        let (tls, rest) = if let Some(rest) = self.broker.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = self.broker.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!(
                "mqtt.broker: expected \"embedded\", \"mqtt://host:port\" or \"mqtts://host:port\", got {:?}",
                self.broker
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => {
                let port = port.parse::<u16>().map_err(|_| {
                    format!("mqtt.broker: invalid port {port:?} in {:?}", self.broker)
                })?;
                (host.to_string(), port)
            }
            None => (rest.to_string(), if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(format!("mqtt.broker: missing host in {:?}", self.broker));
        }
        Ok(BrokerAddr::External { host, port, tls })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Data directory (fjall). Default `data`.
    pub dir: PathBuf,
    /// How often operator state is checkpointed. Default `10s`.
    #[serde(with = "duration_str")]
    pub checkpoint_interval: Duration,
    /// How long the ingest log keeps raw events. Default `24h`.
    #[serde(with = "duration_str")]
    pub log_retention: Duration,
    /// Default retention of view rows when a view sets none. Default `30 days`.
    #[serde(with = "duration_str")]
    pub view_retention: Duration,
    /// How long a dead letter is kept. Default `7 days`.
    #[serde(with = "duration_str")]
    pub deadletter_retention: Duration,
    /// Bytes the dead letters may take; beyond, the oldest go (in chunks,
    /// checked every second). Default 1 GiB.
    pub deadletter_max_bytes: u64,
    /// Bytes one stream's dead letters may take; beyond, that stream's
    /// oldest go, so that a flood of bad input on one stream does not push
    /// out the others' (checked every second). Default 256 MiB.
    pub deadletter_max_bytes_per_stream: u64,
    /// How often retention runs (log, views by event time, alerts, dead letters). Default `1m`.
    #[serde(with = "duration_str")]
    pub housekeeping_interval: Duration,
    /// When an acknowledged message is safe. Default `sync`.
    pub durability: Durability,
    /// Bytes of the store's block cache (blocks read back: alerts updated
    /// by a transition or an ack, queries, replay). It fills to this size
    /// and stays there; the operating system's page cache holds the files
    /// besides. Default 32 MiB (fjall's).
    pub cache_bytes: u64,
}

/// How far the ingest log goes before a QoS 1 message is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Appended and fsynced, once per micro-batch (group commit): survives a
    /// power cut.
    Sync,
    /// Appended and handed to the operating system: survives weir being
    /// killed, not the machine losing power.
    Buffered,
    /// No ingest log: acknowledged once processed. A crash loses what came
    /// after the last checkpoint.
    None,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data"),
            checkpoint_interval: Duration::from_secs(10),
            log_retention: Duration::from_secs(24 * 3600),
            view_retention: Duration::from_secs(30 * 24 * 3600),
            deadletter_retention: Duration::from_secs(7 * 24 * 3600),
            housekeeping_interval: Duration::from_secs(60),
            deadletter_max_bytes: 1 << 30,
            deadletter_max_bytes_per_stream: 256 << 20,
            durability: Durability::Sync,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// `storage.cache_bytes` by default.
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelinesConfig {
    /// Folder of `.sql` pipeline files. Default `config/pipelines`.
    pub dir: PathBuf,
    /// Apply changed files while running (DESIGN §7). Default `true`.
    pub watch: bool,
    /// How long a removed view's stored rows are kept (put it back within
    /// this and they are still there). Default `1 day`.
    #[serde(with = "duration_str")]
    pub removed_retention: Duration,
}

impl Default for PipelinesConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("config/pipelines"),
            watch: true,
            removed_retention: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How long a resolved alert is kept. Default `30 days`.
    #[serde(with = "duration_str")]
    pub retention: Duration,
    /// Publish every alert change, retained, to `weir/alerts/{rule}/{key}`
    /// on the broker weir reads from. Default `true`.
    pub mqtt: bool,
    /// How long a resolved alert's retained notification stays on weir's
    /// own MQTT server (its message expiry); a firing alert's stays until
    /// the alert changes. Default `1h`.
    #[serde(with = "duration_str")]
    pub mqtt_resolved_expiry: Duration,
    /// Interval of the keep-alive comments on `/api/v1/alerts/stream`. Default `15s`.
    #[serde(with = "duration_str")]
    pub sse_keepalive: Duration,
    /// Webhooks: `[[alerts.webhook]]` tables.
    pub webhook: Vec<WebhookConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(30 * 24 * 3600),
            mqtt: true,
            mqtt_resolved_expiry: Duration::from_secs(3600),
            sse_keepalive: Duration::from_secs(15),
            webhook: Vec::new(),
        }
    }
}

/// One webhook: every alert change of the chosen rules is POSTed as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://...` or `https://...` (the system's CAs are trusted, and `ca_file`).
    pub url: String,
    /// A PEM CA to trust for this webhook besides the system's (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name in metrics and logs. Default `webhook<N>` (its position, from 0).
    #[serde(default)]
    pub name: Option<String>,
    /// Only these rules; all when empty.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Extra request headers, such as `Authorization`.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Attempts per notification before it is given up (and counted). Default 8.
    #[serde(default = "WebhookConfig::default_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry; doubles each time, up to 1 minute. Default `500ms`.
    #[serde(default = "WebhookConfig::default_backoff", with = "duration_str")]
    pub backoff: Duration,
    /// Per-request timeout. Default `10s`.
    #[serde(default = "WebhookConfig::default_timeout", with = "duration_str")]
    pub timeout: Duration,
    /// Notifications waiting for delivery; more are dropped (and counted). Default 1000.
    #[serde(default = "WebhookConfig::default_queue")]
    pub queue: usize,
}

impl WebhookConfig {
    fn default_attempts() -> u32 {
        8
    }
    fn default_backoff() -> Duration {
        Duration::from_millis(500)
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(10)
    }
    fn default_queue() -> usize {
        1000
    }
}

/// Parses durations written as `"10s"`, `"5 minutes"`, `"24h"`, `"7 days"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Formats a duration the way the config writes it (`"10s"`, `"1m"`).
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// A duration for people: `1 minute`, `5 minutes`, `1 hour 30 minutes`, `500 ms`.
pub fn format_duration_words(duration: Duration) -> String {
    let mut left = duration.as_millis();
    if left == 0 {
        return "0 seconds".into();
    }
    let mut parts = Vec::new();
    for (unit, ms) in [
        ("day", 86_400_000u128),
        ("hour", 3_600_000),
        ("minute", 60_000),
        ("second", 1_000),
    ] {
        let n = left / ms;
        if n > 0 {
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
            left %= ms;
        }
    }
    if left > 0 {
        parts.push(format!("{left} ms"));
    }
    parts.join(" ")
}

mod duration_str {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Loads `path` (or only defaults when `None`), applies `WEIR_*` overrides
    /// from `env`, and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::from_text(&text, &path.display().to_string(), env)
            }
            None => Config::from_table(toml::Table::new(), "defaults".to_string(), env),
        }
    }

    /// Parses a config file's text (`origin` names it in errors), then as
    /// [`Config::load`].
    pub fn from_text(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let doc = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        Config::from_table(doc, origin.to_string(), env)
    }

    fn from_table(
        mut doc: toml::Table,
        origin: String,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        apply_env_overrides(&mut doc, env)?;
        let config: Config = doc
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin,
                message: e.message().to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(e) = self.mqtt.broker_addr() {
            problems.push(e);
        }
        if !(1..=64).contains(&self.mqtt.connections) {
            problems.push(format!(
                "mqtt.connections: {} is not between 1 and 64",
                self.mqtt.connections
            ));
        }
        if self.mqtt.receive_maximum == 0 {
            problems.push("mqtt.receive_maximum: must be at least 1".into());
        }
        if self.mqtt.max_queued_messages == 0 {
            problems.push("mqtt.max_queued_messages: must be at least 1".into());
        }
        if self.mqtt.client_id.trim().is_empty() {
            problems.push("mqtt.client_id: must not be empty".into());
        }
        if self.mqtt.max_packet_bytes < 1024 * 1024 + 1024 {
            problems.push(format!(
                "mqtt.max_packet_bytes: {} is too small, 1 MiB batches must fit",
                self.mqtt.max_packet_bytes
            ));
        }
        if self.mqtt.cert_file.is_some() != self.mqtt.key_file.is_some() {
            problems.push("mqtt.cert_file and mqtt.key_file must be given together".into());
        }
        let external_tls = matches!(
            self.mqtt.broker_addr(),
            Ok(BrokerAddr::External { tls: true, .. })
        );
        if !external_tls && (self.mqtt.ca_file.is_some() || self.mqtt.cert_file.is_some()) {
            problems.push(
                "mqtt.ca_file, mqtt.cert_file, mqtt.key_file: only for an external broker reached \
                 with mqtts:// (weir's own listener uses tls_cert_file, tls_key_file)"
                    .into(),
            );
        }
        if self.mqtt.username.is_none() && self.mqtt.password.is_some() {
            problems.push("mqtt.password: given without mqtt.username".into());
        }
        let embedded = self.mqtt.broker_addr() == Ok(BrokerAddr::Embedded);
        if embedded {
            if self.mqtt.embedded_tls_listen.is_some()
                && (self.mqtt.tls_cert_file.is_none() || self.mqtt.tls_key_file.is_none())
            {
                problems.push(
                    "mqtt.embedded_tls_listen: needs mqtt.tls_cert_file and mqtt.tls_key_file"
                        .into(),
                );
            }
            if self.mqtt.tls_client_ca_file.is_some() && self.mqtt.embedded_tls_listen.is_none() {
                problems.push(
                    "mqtt.tls_client_ca_file: client certificates need mqtt.embedded_tls_listen"
                        .into(),
                );
            }
            let exposed = !self.mqtt.embedded_listen.ip().is_loopback()
                || self
                    .mqtt
                    .embedded_tls_listen
                    .is_some_and(|a| !a.ip().is_loopback());
            if exposed && self.mqtt.users_file.is_none() && !self.mqtt.allow_anonymous {
                problems.push(
                    "mqtt: a listener on a non-loopback address needs mqtt.users_file (who may \
                     connect), or mqtt.allow_anonymous = true to let anyone in"
                        .into(),
                );
            }
        }
        if self.http.tokens.is_empty()
            && !self.http.listen.ip().is_loopback()
            && !self.http.allow_anonymous
        {
            problems.push(format!(
                "http.listen: {} is not a loopback address and no [[http.tokens]] are \
                 configured; add tokens (weir token new), or set http.allow_anonymous = true \
                 to serve the API to anyone",
                self.http.listen
            ));
        }
        for (i, token) in self.http.tokens.iter().enumerate() {
            if let Err(e) = token.check() {
                problems.push(format!("http.tokens[{i}]: {e}"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.connections.iter().enumerate() {
            if let Err(e) = c.check() {
                problems.push(format!("connections[{i}] ({}): {e}", c.name));
            }
            if !names.insert(c.name.as_str()) {
                problems.push(format!(
                    "connections[{i}]: the name {:?} is used twice",
                    c.name
                ));
            }
        }
        if !(1..=64).contains(&self.http.query_concurrency) {
            problems.push(format!(
                "http.query_concurrency: {} is not between 1 and 64",
                self.http.query_concurrency
            ));
        }
        if self.http.request_timeout < Duration::from_millis(100) {
            problems.push("http.request_timeout: at least 100ms".into());
        }
        if self.http.query_timeout.is_zero() {
            problems.push("http.query_timeout: must be greater than 0".into());
        }
        if self.http.query_memory < 1 << 20 {
            problems.push("http.query_memory: at least 1 MiB (1048576)".into());
        }
        if self.http.tls_cert_file.is_some() != self.http.tls_key_file.is_some() {
            problems.push("http.tls_cert_file and http.tls_key_file must be given together".into());
        }
        if !(16..=16 * 1024).contains(&self.limits.max_text_bytes) {
            problems.push(format!(
                "limits.max_text_bytes: {} is not between 16 and 16384 (text values become keys)",
                self.limits.max_text_bytes
            ));
        }
        if !(1..=1_000_000).contains(&self.limits.max_rows_per_message) {
            problems.push(format!(
                "limits.max_rows_per_message: {} is not between 1 and 1 000 000",
                self.limits.max_rows_per_message
            ));
        }
        if self.limits.max_future > Duration::from_secs(366 * 24 * 3600) {
            problems.push("limits.max_future: at most a year".into());
        }
        if self.storage.cache_bytes < 1 << 20 {
            problems.push("storage.cache_bytes: at least 1 MiB (1048576)".into());
        }
        if self.storage.deadletter_max_bytes < 1 << 20 {
            problems.push("storage.deadletter_max_bytes: at least 1 MiB (1048576)".into());
        }
        if self.storage.deadletter_max_bytes_per_stream < 1 << 20
            || self.storage.deadletter_max_bytes_per_stream > self.storage.deadletter_max_bytes
        {
            problems.push(
                "storage.deadletter_max_bytes_per_stream: at least 1 MiB (1048576) and at most \
                 storage.deadletter_max_bytes"
                    .into(),
            );
        }
        if self.storage.housekeeping_interval < Duration::from_millis(100) {
            problems.push("storage.housekeeping_interval: at least 100ms".into());
        }
        if self.storage.checkpoint_interval.is_zero() {
            problems.push("storage.checkpoint_interval: must be greater than 0".into());
        }
        if self.storage.dir.as_os_str().is_empty() {
            problems.push("storage.dir: must not be empty".into());
        }
        if self.alerts.mqtt_resolved_expiry.is_zero()
            || self.alerts.mqtt_resolved_expiry.as_secs() > u64::from(u32::MAX)
        {
            problems.push(
                "alerts.mqtt_resolved_expiry: must be at least 1s and at most 136 years".into(),
            );
        }
        if self.alerts.sse_keepalive.is_zero() {
            problems.push("alerts.sse_keepalive: must be greater than 0".into());
        }
        for (i, w) in self.alerts.webhook.iter().enumerate() {
            let at = format!("alerts.webhook[{i}]");
            if !w.url.starts_with("http://") && !w.url.starts_with("https://") {
                problems.push(format!(
                    "{at}.url: {:?} is not an http:// or https:// URL",
                    w.url
                ));
            }
            if w.max_attempts == 0 {
                problems.push(format!("{at}.max_attempts: must be at least 1"));
            }
            if w.queue == 0 {
                problems.push(format!("{at}.queue: must be at least 1"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Applies `WEIR_<SECTION>__<KEY>=value` to the TOML document. The value is
/// read as a TOML value when it parses as one (`8080`, `true`), else as a string.
fn apply_env_overrides(
    doc: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("WEIR_") else {
            continue;
        };
        // WEIR_LOG and friends are not config keys.
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        if !matches!(
            section.as_str(),
            "http" | "mqtt" | "storage" | "pipelines" | "alerts" | "limits"
        ) {
            problems.push(format!("{name}: unknown config section [{section}]"));
            continue;
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let table = doc
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match table {
            toml::Value::Table(t) => {
                t.insert(key, parsed);
            }
            _ => problems.push(format!(
                "{name}: [{section}] is not a table in the config file"
            )),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_serve_a_fresh_checkout() {
        let c = Config::load(None, []).unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.mqtt.embedded_listen.to_string(), "127.0.0.1:1883");
        assert_eq!(c.mqtt.broker_addr().unwrap(), BrokerAddr::Embedded);
        assert_eq!(c.storage.dir, PathBuf::from("data"));
        assert_eq!(c.storage.checkpoint_interval, Duration::from_secs(10));
        assert_eq!(c.pipelines.dir, PathBuf::from("config/pipelines"));
    }

    #[test]
    fn file_and_env_override() {
        let f = write(
            "[http]\nlisten = \"127.0.0.1:9000\"\n[storage]\ncheckpoint_interval = \"30s\"\n",
        );
        let env = vec![
            (
                "WEIR_MQTT__BROKER".to_string(),
                "mqtt://broker.local:1884".to_string(),
            ),
            ("WEIR_STORAGE__LOG_RETENTION".to_string(), "2h".to_string()),
            ("WEIR_LIMITS__MAX_FUTURE".to_string(), "10m".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let c = Config::load(Some(f.path()), env).unwrap();
        assert_eq!(c.limits.max_future, Duration::from_secs(600));
        assert_eq!(c.http.listen.port(), 9000);
        assert_eq!(c.storage.checkpoint_interval, Duration::from_secs(30));
        assert_eq!(c.storage.log_retention, Duration::from_secs(7200));
        assert_eq!(
            c.mqtt.broker_addr().unwrap(),
            BrokerAddr::External {
                host: "broker.local".into(),
                port: 1884,
                tls: false
            }
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let f = write("[http]\nlisten = \"127.0.0.1:9000\"\nlisen = 1\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn unknown_env_key_is_named() {
        let env = vec![("WEIR_HTTP__PORT".to_string(), "1".to_string())];
        let err = Config::load(None, env).unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let f = write("[storage]\ncheckpoint_interval = \"ten seconds\"\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("ten seconds"), "{err}");
    }

    #[test]
    fn the_block_cache_size_is_set_or_refused() {
        let env = vec![(
            "WEIR_STORAGE__CACHE_BYTES".to_string(),
            "67108864".to_string(),
        )];
        assert_eq!(
            Config::load(None, env).unwrap().storage.cache_bytes,
            64 << 20
        );
        let f = write("[storage]\ncache_bytes = 4096\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("storage.cache_bytes: at least 1 MiB"), "{err}");
    }

    #[test]
    fn every_problem_is_reported() {
        let f = write("[mqtt]\nbroker = \"tcp://x\"\nclient_id = \"\"\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(
            err.contains("mqtt.broker") && err.contains("mqtt.client_id"),
            "{err}"
        );
    }
}
