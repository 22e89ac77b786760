//! weir as a child process (the `weir` binary Cargo built for the tests), so
//! that a test can kill it with SIGKILL or stop it with SIGTERM, as an
//! operator or the kernel would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::{free_port, wait_for, wait_http_ready};

pub struct WeirProcess {
    child: Child,
    pub base: String,
    pub dir: PathBuf,
    http: reqwest::Client,
}

/// How to start one weir process.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// Holds `pipelines/` (written by the caller) and gets `data/` and `weir.log`.
    pub dir: PathBuf,
    pub broker_port: u16,
    pub client_id: String,
    /// Extra `WEIR_<SECTION>__<KEY>` settings.
    pub env: Vec<(String, String)>,
    /// Largest file the process may write (RLIMIT_FSIZE), to make writes fail.
    pub max_file_bytes: Option<u64>,
    /// A config file (`weir run --config`), for what has no WEIR_* variable.
    pub config: Option<PathBuf>,
}

impl Spawn {
    pub fn new(dir: &Path, broker_port: u16, client_id: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            broker_port,
            client_id: client_id.to_string(),
            env: Vec::new(),
            max_file_bytes: None,
            config: None,
        }
    }

    /// weir as the MQTT server on `port`, with `pipeline` as its one
    /// pipeline file (written into `dir/pipelines`).
    pub fn embedded(dir: &Path, port: u16, pipeline: &str) -> Self {
        std::fs::create_dir_all(dir.join("pipelines")).expect("mkdir pipelines");
        std::fs::write(dir.join("pipelines/p.sql"), pipeline).expect("pipeline");
        Self::new(dir, port, "weir")
            .env("WEIR_MQTT__BROKER", "embedded")
            .env("WEIR_MQTT__EMBEDDED_LISTEN", &format!("127.0.0.1:{port}"))
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

impl WeirProcess {
    pub fn spawn(spec: &Spawn) -> WeirProcess {
        let port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.dir.join("weir.log"))
            .expect("weir.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
        cmd.arg("run");
        if let Some(config) = &spec.config {
            cmd.arg("--config").arg(config);
        }
        cmd.current_dir(&spec.dir)
            .env("WEIR_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "WEIR_MQTT__BROKER",
                format!("mqtt://127.0.0.1:{}", spec.broker_port),
            )
            .env("WEIR_MQTT__CLIENT_ID", &spec.client_id)
            .env("WEIR_STORAGE__DIR", spec.dir.join("data"))
            .env("WEIR_PIPELINES__DIR", spec.dir.join("pipelines"))
            .env("WEIR_LOG", "info,rumqttc=warn,fjall=warn,lsm_tree=warn")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        if let Some(limit) = spec.max_file_bytes {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only async-signal-safe calls
            // (setrlimit, signal) are made.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // a write past the limit then fails with EFBIG instead of killing
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn weir");
        WeirProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir: spec.dir.clone(),
            http: reqwest::Client::new(),
        }
    }

    /// The weir log so far (for failure messages).
    /// The process id, to signal it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("weir.log")).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        wait_http_ready(&self.http, &self.base, "weir (child process) to be ready").await;
    }

    /// Status and JSON body of a GET, or `None` while weir is not answering.
    pub async fn try_get(&self, path: &str) -> Option<(u16, Value)> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        let text = r.text().await.ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Every row of a view, as weir serves them.
    pub async fn rows(&self, view: &str) -> Option<Vec<Value>> {
        let (status, body) = self
            .try_get(&format!("/api/v1/views/{view}/rows?limit=10000"))
            .await?;
        (status == 200).then(|| body["items"].as_array().cloned().unwrap_or_default())
    }

    /// One unlabelled series of `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metric_value(&text, name)
    }

    /// The exit status once weir has stopped by itself.
    pub async fn wait_exit(mut self) -> std::process::ExitStatus {
        wait_for("weir to exit by itself", || {
            let done = self.child.try_wait().expect("try_wait");
            async move { done }
        })
        .await
    }

    /// SIGKILL: no flush, no checkpoint, no goodbye.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status once weir has stopped by itself.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        super::sigterm(&self.child);
        wait_for("weir to exit after SIGTERM", || {
            let done = self.child.try_wait().expect("try_wait");
            async move { done }
        })
        .await
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of an unlabelled series in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
