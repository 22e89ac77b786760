//! `weir check` as a user runs it: every error with file:line and exit 1; the
//! shipped pipelines plan cleanly. `weir run` refuses bad config and bad
//! pipelines with a clear message.

use std::process::Command;

fn weir() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn shipped_pipelines_plan_cleanly() {
    let out = weir().arg("check").output().expect("run weir check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for view in [
        "terminal_health_1m",
        "terminal_latest",
        "merchant_sales_5m",
        "large_refunds",
    ] {
        assert!(
            stdout.contains(&format!("view {view} (")),
            "{view} missing from:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("shape: windowed (hop 5m every 1m)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("TableScan: telemetry"),
        "plans are printed:\n{stdout}"
    );
}

#[test]
fn every_error_is_listed_with_file_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("a.sql"),
        "CREATE TABLE t (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)\n\
         WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/x');\n\
         \n\
         CREATE VIEW bad_column AS\n\
         SELECT terminal_id, avg(w) AS a FROM t GROUP BY terminal_id;\n\
         CREATE VIEW bad_function AS SELECT frobnicate(v) AS f FROM t;\n",
    )
    .expect("write a.sql");
    std::fs::write(
        dir.path().join("b.sql"),
        "-- a comment\nCREATE VIEW misplaced AS SELECT v FROM t WHERE tumble(INTERVAL '1' MINUTE) IS NULL;\nDELETE FROM t;\n",
    )
    .expect("write b.sql");
    let out = weir()
        .arg("check")
        .arg("--pipelines")
        .arg(dir.path())
        .output()
        .expect("run weir check");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let a = dir.path().join("a.sql").display().to_string();
    let b = dir.path().join("b.sql").display().to_string();
    for expected in [
        format!("{a}:5: view bad_column: No field named w"),
        format!("{a}:6: view bad_function: Invalid function 'frobnicate'"),
        format!("{b}:2: view misplaced: tumble() may only appear in GROUP BY"),
        format!("{b}:3: unsupported statement \"DELETE FROM t\""),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("4 error(s)"), "{stderr}");
}

#[test]
fn run_refuses_a_bad_config_key_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, "[http]\nlisten = \"127.0.0.1:0\"\nport = 8080\n")
        .expect("write config");
    let out = weir()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run weir");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("port"), "{stderr}");
}

#[test]
fn run_refuses_broken_pipelines() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("x.sql"),
        "CREATE VIEW v AS SELECT * FROM nothing;",
    )
    .expect("write");
    let out = weir()
        .arg("run")
        .env("WEIR_PIPELINES__DIR", dir.path())
        .env("WEIR_STORAGE__DIR", dir.path().join("data"))
        .env("WEIR_HTTP__LISTEN", "127.0.0.1:0")
        .env("WEIR_MQTT__EMBEDDED_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run weir");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("x.sql:1: view v: reads nothing, which is neither a stream nor a view"),
        "{stderr}"
    );
}
