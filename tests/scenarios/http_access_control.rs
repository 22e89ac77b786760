//! Who may call the HTTP API (DESIGN §6 "Who may call"), over real HTTPS
//! with a certificate made in the test: without a token nothing but the
//! health probes answers, a token outside its scope is refused, the right
//! one works; tokens come from `weir token new`; browsers cannot post
//! across sites or rebind a name; a public listen needs tokens.

use crate::common;

use common::pki::Pki;
use common::process::metric_value;
use common::*;
use serde_json::Value;
use weir::auth::http::TokenConfig;

const RULES: &str = "
CREATE VIEW readings AS
SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id;

CREATE ALERT low_battery
WITH (severity = 'warning')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 15;
";

/// `weir token new`: the token (shown once) and the config entry, parsed.
fn token_new(name: &str, scopes: &str) -> (String, TokenConfig) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["token", "new", "--name", name, "--scopes", scopes])
        .output()
        .expect("weir token new");
    assert!(out.status.success(), "weir token new failed");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token (shown once; weir keeps only its hash): "))
        .expect("the token line")
        .to_string();
    let entry = text
        .split_once("[[http.tokens]]")
        .expect("the config entry")
        .1;
    assert!(
        !entry.contains(&token),
        "the config holds the hash, not the token"
    );
    #[derive(serde::Deserialize)]
    struct File {
        http: Http,
    }
    #[derive(serde::Deserialize)]
    struct Http {
        tokens: Vec<TokenConfig>,
    }
    let file: File = toml::from_str(&format!("[[http.tokens]]{entry}")).expect("pasteable TOML");
    let config = file.http.tokens.into_iter().next().expect("one token");
    (token, config)
}

async fn call(
    weir: &Weir,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, &str)>,
) -> (u16, Value) {
    let mut request = weir.http.request(method, format!("{}{path}", weir.base));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some((content_type, body)) = body {
        request = request
            .header("content-type", content_type)
            .body(body.to_string());
    }
    let response = request.send().await.expect("HTTPS request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_scopes_guard_the_api_over_https() {
    use reqwest::Method;
    let pki = Pki::new("api");
    let (reader, reader_cfg) = token_new("dashboard", "read");
    let (querier, querier_cfg) = token_new("analyst", "read,query");
    let (acker, acker_cfg) = token_new("oncall", "read,ack");
    let (admin, admin_cfg) = token_new("ops", "admin");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir_all(dir.path().join("pipelines")).expect("dir");
    std::fs::write(
        dir.path().join("pipelines/p.sql"),
        battery_pipeline("1h", RULES),
    )
    .expect("pipeline");
    let (cert, key) = (pki.server_cert.clone(), pki.server_key.clone());
    let weir = Weir::start_full(
        dir,
        None,
        |c| {
            c.http.tokens = vec![reader_cfg, querier_cfg, acker_cfg, admin_cfg];
            c.http.tls_cert_file = Some(cert);
            c.http.tls_key_file = Some(key);
        },
        Some(pki.https_client()),
    )
    .await;

    // The health probes need no token (start_full waited on /readyz).
    let (status, _) = call(&weir, Method::GET, "/healthz", None, None).await;
    assert_eq!(status, 200);

    // No token, an unknown token: 401, as JSON.
    let (status, body) = call(&weir, Method::GET, "/api/v1/views", None, None).await;
    assert_eq!((status, code(&body)), (401, "unauthorized"), "{body}");
    let (status, _) = call(
        &weir,
        Method::GET,
        "/api/v1/views",
        Some("weir_guess"),
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = call(&weir, Method::GET, "/metrics", None, None).await;
    assert_eq!(status, 401, "metrics are data too");

    // Reading with a read token.
    let (status, body) = call(&weir, Method::GET, "/api/v1/views", Some(&reader), None).await;
    assert_eq!(status, 200, "{body}");

    // Lineage, the docs, the fleet and the pipelines' status are data: `read`.
    for path in [
        "/api/v1/lineage",
        "/docs/",
        "/api/v1/fleet",
        "/api/v1/pipelines",
    ] {
        let (status, _) = call(&weir, Method::GET, path, None, None).await;
        assert_eq!(status, 401, "{path} without a token");
        let (status, _) = call(&weir, Method::GET, path, Some(&reader), None).await;
        assert_eq!(status, 200, "{path} with a read token");
    }
    // The dashboard's page holds no data: open.
    let (status, _) = call(&weir, Method::GET, "/", None, None).await;
    assert_eq!(status, 200);
    // Reloading is `admin`; a preview is `query`.
    let empty = Some(("application/json", "{}"));
    for token in [&reader, &querier, &acker] {
        let (status, body) = call(
            &weir,
            Method::POST,
            "/api/v1/pipelines/reload",
            Some(token),
            empty,
        )
        .await;
        assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    }
    let (status, body) = call(
        &weir,
        Method::POST,
        "/api/v1/pipelines/reload",
        Some(&admin),
        empty,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let preview = Some((
        "application/json",
        r#"{"sql": "CREATE VIEW p AS SELECT terminal_id FROM telemetry", "from": "-1m"}"#,
    ));
    let (status, body) = call(
        &weir,
        Method::POST,
        "/api/v1/pipelines/preview",
        Some(&reader),
        preview,
    )
    .await;
    assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    let (status, body) = call(
        &weir,
        Method::POST,
        "/api/v1/pipelines/preview",
        Some(&querier),
        preview,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Ad-hoc SQL needs `query`.
    let sql = Some((
        "application/json",
        r#"{"sql": "SELECT count(*) AS n FROM readings"}"#,
    ));
    let (status, body) = call(&weir, Method::POST, "/api/v1/query", Some(&reader), sql).await;
    assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    let (status, body) = call(&weir, Method::POST, "/api/v1/query", Some(&querier), sql).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&weir, Method::POST, "/api/v1/query", Some(&admin), sql).await;
    assert_eq!(status, 200, "admin may do anything: {body}");

    // An alert to acknowledge.
    weir.publish(&[(
        "terminals/T1/telemetry",
        format!(r#"{{"ts": {T0}, "battery_pct": 5}}"#),
    )])
    .await;
    let id = wait_for("the low_battery alert", || async {
        let (_, body) = call(&weir, Method::GET, "/api/v1/alerts", Some(&reader), None).await;
        body["items"][0]["id"].as_str().map(str::to_string)
    })
    .await;
    let ack = format!("/api/v1/alerts/{id}/ack");
    let json = Some(("application/json", ""));
    let (status, _) = call(&weir, Method::POST, &ack, Some(&querier), json).await;
    assert_eq!(status, 403, "query does not include ack");
    let (status, body) = call(&weir, Method::POST, &ack, Some(&acker), json).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["acked"], true, "{body}");

    // Browsers: a form post, a cross-site post, a rebound host name.
    let form = Some(("application/x-www-form-urlencoded", "sql=SELECT+1"));
    let (status, body) = call(&weir, Method::POST, "/api/v1/query", Some(&querier), form).await;
    assert_eq!(
        (status, code(&body)),
        (415, "unsupported_media_type"),
        "{body}"
    );
    let cross = weir
        .http
        .post(format!("{}{ack}", weir.base))
        .bearer_auth(&acker)
        .header("content-type", "application/json")
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(cross.status().as_u16(), 403);
    let rebound = weir
        .http
        .get(format!("{}/api/v1/views", weir.base))
        .bearer_auth(&reader)
        .header("host", "evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(rebound.status().as_u16(), 403);

    // Nothing is served in clear on the HTTPS port.
    let clear = reqwest::Client::new()
        .get(format!(
            "{}/healthz",
            weir.base.replace("https://", "http://")
        ))
        .send()
        .await;
    assert!(
        clear.as_ref().map_or(true, |r| !r.status().is_success()),
        "{clear:?}"
    );

    let (_, metrics) = call(&weir, Method::GET, "/metrics", Some(&reader), None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metric_value(&metrics, "weir_http_requests_denied_total") >= Some(8.0),
        "{metrics}"
    );
    weir.stop().await;
}

#[test]
fn a_public_listen_needs_tokens_or_an_explicit_yes() {
    let load = |env: &[(&str, &str)]| {
        weir::config::Config::load(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    };
    let e = load(&[("WEIR_HTTP__LISTEN", "0.0.0.0:8080")])
        .expect_err("an open API on every interface is refused")
        .to_string();
    assert!(
        e.contains("http.allow_anonymous") && e.contains("weir token new"),
        "{e}"
    );
    load(&[
        ("WEIR_HTTP__LISTEN", "0.0.0.0:8080"),
        ("WEIR_HTTP__ALLOW_ANONYMOUS", "true"),
    ])
    .expect("said out loud, it is allowed");
    let e = load(&[("WEIR_MQTT__EMBEDDED_LISTEN", "0.0.0.0:1883")])
        .expect_err("an open MQTT server on every interface is refused")
        .to_string();
    assert!(e.contains("mqtt.users_file"), "{e}");
}
