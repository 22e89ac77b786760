//! Helpers for the scenarios in `tests/`: a real weir on port 0 with a temp
//! dir, a real MQTT publisher (rumqttc), real HTTP (reqwest). Waiting is done
//! by polling for the state a user would see, with a generous deadline; no
//! test asserts on timing.

#![allow(dead_code)]

pub mod pki;
pub mod postgres;
pub mod process;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;
use weir::config::Config;
use weir::engine::Running;

/// 2023-11-14T22:13:00Z: a whole minute, so windows line up with T0.
pub const T0: i64 = 1_699_999_980_000;
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct Weir {
    pub running: Option<Running>,
    pub base: String,
    pub broker_port: u16,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Weir {
    /// Starts weir with these pipeline files and the embedded broker.
    pub async fn start(pipelines: &[(&str, &str)]) -> Weir {
        Self::start_with(pipelines, None).await
    }

    /// Starts weir; `broker` is `Some("mqtt://...")` for an external broker.
    pub async fn start_with(pipelines: &[(&str, &str)], broker: Option<String>) -> Weir {
        Self::start_tweaked(pipelines, broker, |_| {}).await
    }

    /// Like `start_with`, with a last say over the configuration.
    pub async fn start_tweaked(
        pipelines: &[(&str, &str)],
        broker: Option<String>,
        tweak: impl FnOnce(&mut Config),
    ) -> Weir {
        let dir = tempfile::tempdir().expect("temp dir");
        let pipeline_dir = dir.path().join("pipelines");
        std::fs::create_dir_all(&pipeline_dir).expect("pipelines dir");
        for (name, sql) in pipelines {
            std::fs::write(pipeline_dir.join(name), sql).expect("write pipeline");
        }
        Self::start_configured(dir, broker, tweak).await
    }

    /// Starts weir on an existing data/pipelines folder (for restarts).
    pub async fn start_in(dir: tempfile::TempDir, broker: Option<String>) -> Weir {
        Self::start_configured(dir, broker, |_| {}).await
    }

    /// Like `start_in`, with a last say over the configuration.
    pub async fn start_configured(
        dir: tempfile::TempDir,
        broker: Option<String>,
        tweak: impl FnOnce(&mut Config),
    ) -> Weir {
        Self::start_full(dir, broker, tweak, None).await
    }

    /// Like `start_configured`; with `https`, the API is reached as
    /// `https://localhost:port` through that client (the config's tweak
    /// sets the certificate), and `/readyz` is asked the same way.
    pub async fn start_full(
        dir: tempfile::TempDir,
        broker: Option<String>,
        tweak: impl FnOnce(&mut Config),
        https: Option<reqwest::Client>,
    ) -> Weir {
        let mut config = Config::default();
        config.http.listen = "127.0.0.1:0".parse().expect("addr");
        config.mqtt.embedded_listen = "127.0.0.1:0".parse().expect("addr");
        config.mqtt.client_id = format!("weir-test-{}", std::process::id());
        config.storage.dir = dir.path().join("data");
        config.pipelines.dir = dir.path().join("pipelines");
        // The tests' events are from 2023 (T0): keep their rows.
        config.storage.view_retention = Duration::from_secs(3650 * 24 * 3600);
        config.alerts.retention = Duration::from_secs(3650 * 24 * 3600);
        let external_port = broker.as_ref().map(|b| {
            b.rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port")
        });
        if let Some(b) = broker {
            config.mqtt.broker = b;
        }
        tweak(&mut config);
        let pipeline = weir::plan::plan_dir(&config.pipelines.dir).expect("pipelines plan");
        let running = weir::engine::start(config, pipeline)
            .await
            .expect("weir starts");
        let base = match &https {
            Some(_) => format!("https://localhost:{}", running.http_addr.port()),
            None => format!("http://{}", running.http_addr),
        };
        let broker_port = running
            .embedded_broker
            .map(|a| a.port())
            .or(external_port)
            .expect("broker port");
        let weir = Weir {
            running: Some(running),
            base,
            broker_port,
            dir,
            http: https.unwrap_or_default(),
        };
        weir.wait_ready().await;
        weir
    }

    pub async fn wait_ready(&self) {
        wait_http_ready(&self.http, &self.base, "weir to be ready").await;
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get_ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .expect("text")
    }

    /// Rows of a view (first page of up to 10 000).
    pub async fn rows(&self, view: &str) -> Vec<Value> {
        let body = self
            .get_ok(&format!("/api/v1/views/{view}/rows?limit=10000"))
            .await;
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `view` has `n` rows and returns them.
    pub async fn wait_rows(&self, view: &str, n: usize) -> Vec<Value> {
        wait_for(&format!("{view} to have {n} rows"), || async {
            let rows = self.rows(view).await;
            (rows.len() == n).then_some(rows)
        })
        .await
    }

    pub async fn publish<T: AsRef<str>>(&self, messages: &[(T, String)]) {
        publish(self.broker_port, messages, QoS::AtLeastOnce).await;
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        self.dir
    }
}

/// Waits until `GET {base}/readyz` answers 2xx.
pub async fn wait_http_ready(http: &reqwest::Client, base: &str, what: &str) {
    wait_for(what, || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

/// Waits until the unlabelled series `name` of weir's `/metrics` is at least `at_least`.
pub async fn wait_metric(weir: &Weir, name: &str, at_least: f64) {
    wait_for(&format!("{name} >= {at_least}"), || async {
        let value = process::metric_value(&weir.metrics().await, name)?;
        (value >= at_least).then_some(())
    })
    .await;
}

/// The sum of a numeric column over rows as the API serves them.
pub fn column_sum(rows: &[Value], column: &str) -> u64 {
    rows.iter().filter_map(|r| r[column].as_u64()).sum()
}

/// Polls `probe` until it returns `Some`, or panics naming `what` after `DEADLINE`.
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("gave up waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes with a real MQTT client and returns once the broker has
/// acknowledged every message (QoS 1) or they are all written (QoS 0).
/// Topics may be `&str` or `String`.
pub async fn publish<T: AsRef<str>>(port: u16, messages: &[(T, String)], qos: QoS) {
    let id = format!("test-pub-{}-{}", std::process::id(), rand_suffix());
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let owned: Vec<(String, String)> = messages
        .iter()
        .map(|(t, p)| (t.as_ref().to_string(), p.clone()))
        .collect();
    let sender = client.clone();
    let send = tokio::spawn(async move {
        for (topic, payload) in owned {
            sender
                .publish(topic, qos, false, payload)
                .await
                .expect("queue publish");
        }
    });
    let expected = messages.len();
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while done < expected {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("publish deadline");
        match event.expect("MQTT publish connection") {
            Event::Incoming(Packet::PubAck(_)) if qos == QoS::AtLeastOnce => done += 1,
            Event::Outgoing(Outgoing::Publish(_)) if qos == QoS::AtMostOnce => done += 1,
            _ => {}
        }
    }
    send.await.expect("sender");
    let _ = client.disconnect().await;
    // let the disconnect go out
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
}

/// Publishes at QoS 1 as one terminal would: a persistent session with
/// `client_id`, and through any number of broker (or weir) restarts, until
/// every message is acknowledged; `pace` between two messages.
pub async fn publish_through_restarts(
    port: u16,
    client_id: &str,
    messages: Vec<(String, String)>,
    pace: Duration,
) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_clean_session(false);
    options.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let expected = messages.len();
    let sender = tokio::spawn(async move {
        for (topic, payload) in messages {
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(pace).await;
        }
    });
    let mut acked = 0;
    while acked < expected {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _ = sender.await;
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Sends SIGTERM to a child process.
pub fn sigterm(child: &std::process::Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) with a pid we spawned and a valid signal number.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(
        rc,
        0,
        "kill -TERM {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A Mosquitto the test starts on `port`; killed when dropped.
pub struct Mosquitto {
    child: std::process::Child,
    _conf: tempfile::NamedTempFile,
}

impl Mosquitto {
    pub async fn start(port: u16) -> Mosquitto {
        Self::start_with(port, None).await
    }

    /// With `persistence`, sessions and queued messages are saved in that
    /// directory when the broker stops (SIGTERM) and loaded when it starts.
    pub async fn start_with(port: u16, persistence: Option<&std::path::Path>) -> Mosquitto {
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n{}",
            match persistence {
                Some(dir) => format!(
                    // run as root (CI), it would switch to the `mosquitto` user,
                    // which cannot write the test's temp dir
                    "persistence true\npersistence_location {}/\nautosave_interval 0\nuser root\n",
                    dir.display()
                ),
                None => "persistence false\n".to_string(),
            }
        );
        Self::start_conf(port, &conf).await
    }

    /// With this configuration file (which must listen on `port`).
    pub async fn start_conf(port: u16, conf_text: &str) -> Mosquitto {
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does this)");
        let mut conf = tempfile::NamedTempFile::new().expect("conf");
        std::io::Write::write_all(&mut conf, conf_text.as_bytes()).expect("write conf");
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(conf.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto");
        wait_for("mosquitto to listen", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Mosquitto { child, _conf: conf }
    }
}

impl Mosquitto {
    /// Stops the broker with SIGTERM, so that it saves its sessions.
    pub async fn terminate(mut self) {
        sigterm(&self.child);
        wait_for("mosquitto to exit", || {
            let done = self.child.try_wait().ok().flatten();
            async move { done }
        })
        .await;
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A telemetry stream and three views, one of each shape. The idle timeout is
/// long so that only the test's own events move the watermark.
pub const TELEMETRY: &str = "
CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  merchant_id TEXT,
  ts TIMESTAMP NOT NULL,
  battery_pct DOUBLE,
  app_latency_ms DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json', qos = 1, idle_timeout = '1h');

-- Health per terminal per minute.
CREATE VIEW health_1m AS
SELECT terminal_id, count(*) AS samples, min(battery_pct) AS min_battery, avg(app_latency_ms) AS avg_latency_ms
FROM telemetry
GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

-- Latest battery per terminal.
CREATE VIEW latest AS
SELECT terminal_id, last_value(battery_pct) AS battery_pct, count(*) AS reports
FROM telemetry
GROUP BY terminal_id;

-- Low battery readings.
CREATE VIEW low_battery AS
SELECT terminal_id, ts, battery_pct FROM telemetry WHERE battery_pct < 20;
";

/// The battery readings the alert scenarios judge: a telemetry stream with a
/// 1 s watermark bound and the given idle timeout, followed by `rules`.
pub fn battery_pipeline(idle_timeout: &str, rules: &str) -> String {
    format!(
        "CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{{terminal_id}}/telemetry', format = 'json', idle_timeout = '{idle_timeout}');
{rules}"
    )
}

/// A telemetry event as JSON text.
pub fn event(ts: i64, battery: f64, latency: Option<f64>) -> String {
    match latency {
        Some(l) => format!(r#"{{"ts": {ts}, "battery_pct": {battery}, "app_latency_ms": {l}}}"#),
        None => format!(r#"{{"ts": {ts}, "battery_pct": {battery}}}"#),
    }
}

/// Finds the row whose `column` equals `value`.
pub fn row_with<'a>(rows: &'a [Value], column: &str, value: &str) -> &'a Value {
    rows.iter()
        .find(|r| r[column].as_str() == Some(value))
        .unwrap_or_else(|| panic!("no row with {column} = {value} in {rows:?}"))
}

/// A client of `/api/v1/alerts/stream` (server-sent events).
pub struct Sse {
    response: reqwest::Response,
    buffer: String,
}

impl Sse {
    /// Connects and waits for the stream's opening comment, so that every
    /// change from now on is delivered to it.
    pub async fn connect(base: &str, path: &str) -> Sse {
        let response = reqwest::get(format!("{base}{path}"))
            .await
            .expect("SSE GET");
        assert_eq!(response.status(), 200, "SSE status");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let mut sse = Sse {
            response,
            buffer: String::new(),
        };
        let first = sse.next_block().await;
        assert!(
            first.starts_with(':'),
            "the stream opens with a comment: {first:?}"
        );
        sse
    }

    /// The next block (an event or a comment), without its blank line.
    pub async fn next_block(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block = self.buffer[..end].to_string();
                self.buffer.drain(..end + 2);
                return block;
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("an SSE block before the deadline")
                .expect("SSE stream read");
            match chunk {
                Some(bytes) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                None => panic!("the SSE stream ended; buffered: {:?}", self.buffer),
            }
        }
    }

    /// The next event (comments skipped): its name and its data as JSON.
    pub async fn next_event(&mut self) -> (String, Value) {
        loop {
            let block = self.next_block().await;
            let mut name = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !data.is_empty() {
                let value = serde_json::from_str(&data).expect("SSE data is JSON");
                return (name, value);
            }
        }
    }
}

/// A tmpfs mounted for the test's lifetime.
pub struct Tmpfs<'a>(&'a std::path::Path);

impl<'a> Tmpfs<'a> {
    pub fn mount(dir: &'a std::path::Path, size: &str) -> Option<Tmpfs<'a>> {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    pub fn grow(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.0)
            .status()
            .expect("remount");
        assert!(status.success(), "remount tmpfs");
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0)
            .status();
    }
}
