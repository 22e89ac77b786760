//! Every bad HTTP request gets a 4xx JSON error, and weir keeps serving.

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors() {
    let weir = Weir::start(&[("telemetry.sql", TELEMETRY)]).await;
    let cases: Vec<(&str, Option<&str>, u16, &str)> = vec![
        ("/api/v1/views/nope/rows", None, 404, "not_found"),
        ("/api/v1/nothing/here", None, 404, "not_found"),
        (
            "/api/v1/views/health_1m/rows?limit=0",
            None,
            400,
            "bad_request",
        ),
        (
            "/api/v1/views/health_1m/rows?limit=abc",
            None,
            400,
            "bad_request",
        ),
        (
            "/api/v1/views/health_1m/rows?from=yesterday",
            None,
            400,
            "bad_request",
        ),
        (
            "/api/v1/views/health_1m/rows?cursor=zz",
            None,
            400,
            "bad_request",
        ),
        (
            "/api/v1/views/health_1m/rows?key.nosuch=1",
            None,
            400,
            "bad_request",
        ),
        (
            "/api/v1/views/health_1m/rows?colour=red",
            None,
            400,
            "bad_request",
        ),
        ("/api/v1/views/latest/rows?from=0", None, 400, "bad_request"),
        ("/api/v1/deadletter?reason=boring", None, 400, "bad_request"),
        ("/api/v1/query", Some("not json"), 400, "bad_request"),
        (
            "/api/v1/query",
            Some(r#"{"query": "SELECT 1"}"#),
            400,
            "bad_request",
        ),
        (
            "/api/v1/query",
            Some(r#"{"sql": "DROP TABLE health_1m"}"#),
            400,
            "bad_request",
        ),
        (
            "/api/v1/query",
            Some(r#"{"sql": "INSERT INTO health_1m VALUES (1)"}"#),
            400,
            "bad_request",
        ),
        (
            "/api/v1/query",
            Some(r#"{"sql": "CREATE TABLE x (a INT)"}"#),
            400,
            "bad_request",
        ),
        (
            "/api/v1/query",
            Some(r#"{"sql": "SELECT 1; SELECT 2"}"#),
            400,
            "bad_request",
        ),
        (
            "/api/v1/query",
            Some(r#"{"sql": "SELECT nope FROM health_1m"}"#),
            400,
            "bad_request",
        ),
        (
            "/api/v1/query",
            Some(r#"{"sql": "SELECT * FROM telemetry"}"#),
            400,
            "bad_request",
        ),
        (
            "/api/v1/query",
            Some(r#"{"sql": "SELEC 1"}"#),
            400,
            "bad_request",
        ),
    ];
    for (path, body, status, code) in cases {
        let (got, json) = match body {
            Some(b) => weir.post(path, b).await,
            None => weir.get(path).await,
        };
        assert_eq!(got, status, "{path} {body:?}: {json}");
        assert_eq!(json["error"]["code"], code, "{path} {body:?}: {json}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}: {json}"
        );
    }
    // a valid query over an empty view works
    let (status, body) = weir
        .post(
            "/api/v1/query",
            r#"{"sql": "SELECT count(*) AS n FROM health_1m"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"][0]["n"], 0);
    assert_eq!(weir.get_ok("/healthz").await["status"], "ok");
    weir.stop().await;
}
