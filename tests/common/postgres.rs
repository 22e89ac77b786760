//! A real PostgreSQL for the tests: its own cluster (`initdb`, `pg_ctl`) on
//! a temp dir and a free port, `wal_level = logical`, password
//! authentication over TCP. Started as the `postgres` user when the tests
//! run as root (initdb refuses root). `scripts/test` installs PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::free_port;

/// The role weir logs in as, and its password (the tests check it never shows).
pub const ROLE: &str = "weir";
pub const PASSWORD: &str = "s3cret-Pg-pa55word";
pub const SUPER_PASSWORD: &str = "super-s3cret";

pub struct Postgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    /// More server settings (`-c name=value`), e.g. TLS.
    extra: String,
}

/// Where `initdb` and `pg_ctl` are: Debian keeps them off the PATH.
fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        let which = Command::new("sh")
            .args(["-c", "command -v initdb"])
            .output()
            .expect("sh");
        let path = String::from_utf8_lossy(&which.stdout).trim().to_string();
        assert!(
            !path.is_empty(),
            "PostgreSQL is not installed (apt-get install postgresql; scripts/test does)"
        );
        Path::new(&path).parent().expect("bin dir").to_path_buf()
    })
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

impl Postgres {
    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).output().expect("run a PostgreSQL program")
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// initdb and start; the `weir` role (LOGIN REPLICATION) owns database `backoffice`.
    pub async fn start() -> Postgres {
        Self::start_with(None).await
    }

    /// As [`Postgres::start`], serving TLS with this certificate and key (PEM).
    pub async fn start_tls(cert: &Path, key: &Path) -> Postgres {
        Self::start_with(Some((cert, key))).await
    }

    async fn start_with(tls: Option<(&Path, &Path)>) -> Postgres {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut pg = Postgres {
            port: free_port(),
            bin: bin_dir(),
            dir,
            extra: String::new(),
        };
        if let Some((cert, key)) = tls {
            let (c, k) = (
                pg.dir.path().join("server.crt"),
                pg.dir.path().join("server.key"),
            );
            std::fs::copy(cert, &c).expect("copy cert");
            std::fs::copy(key, &k).expect("copy key");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))
                .expect("chmod key");
            pg.extra = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                c.display(),
                k.display()
            );
        }
        std::fs::write(pg.dir.path().join("pw"), SUPER_PASSWORD).expect("pwfile");
        if is_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .expect("chown");
            assert!(chown.success());
        }
        let data = pg.data();
        let pwfile = pg.dir.path().join("pw");
        let out = pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                pwfile.to_str().expect("utf-8 path"),
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_server();
        let admin = pg.connect("postgres", "postgres", SUPER_PASSWORD).await;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {ROLE} LOGIN REPLICATION PASSWORD '{PASSWORD}'"
            ))
            .await
            .expect("role");
        admin
            .batch_execute(&format!("CREATE DATABASE backoffice OWNER {ROLE}"))
            .await
            .expect("database");
        pg
    }

    /// Starts the server (again).
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_replication_slots=8 -c max_wal_senders=8 -c fsync=off{}",
            self.port,
            self.dir.path().display(),
            self.extra
        );
        let log = self.dir.path().join("postgres.log");
        let data = self.data();
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-o",
                &options,
                "-l",
                log.to_str().expect("utf-8 path"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server (`fast`: connections are cut, as in an outage).
    pub fn stop_server(&self) {
        let data = self.data();
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{database}", self.port)
    }

    pub async fn connect(
        &self,
        user: &str,
        database: &str,
        password: &str,
    ) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname(database)
            .password(password);
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect to the test Postgres");
        tokio::spawn(connection);
        client
    }

    /// A client as the `weir` role on `backoffice`.
    pub async fn backoffice(&self) -> tokio_postgres::Client {
        self.connect(ROLE, "backoffice", PASSWORD).await
    }

    /// A `[[connections]]` entry for `backoffice` whose password is in a file.
    pub fn connection(&self, name: &str) -> weir::config::ConnectionConfig {
        let file = self.dir.path().join("weir-password");
        std::fs::write(&file, PASSWORD).expect("password file");
        weir::config::ConnectionConfig {
            name: name.to_string(),
            kind: "postgres".into(),
            url: self.url("backoffice"),
            password_env: None,
            password_file: Some(file),
            tls: weir::config::PgTls::Disable,
            ca_file: None,
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        if let Some(data) = data.to_str() {
            let _ = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
    }
}
