//! Oversize messages and messages on topics no stream declares are
//! dead-lettered with their reason; the pipeline keeps going.

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_unmatched_messages_are_dead_lettered() {
    // The stream subscribes to everything under fleet/, but only binds fleet/{terminal_id}/telemetry.
    let sql = TELEMETRY.replace("terminals/{terminal_id}/telemetry", "fleet/#");
    let weir = Weir::start(&[("telemetry.sql", &sql)]).await;
    let huge = format!(
        r#"{{"ts": {T0}, "terminal_id": "X", "pad": "{}"}}"#,
        "x".repeat(3 * 1024 * 1024)
    );
    weir.publish(&[
        ("fleet/X/telemetry", huge),
        (
            "fleet/X/telemetry",
            format!(r#"{{"ts": {T0}, "terminal_id": "X", "battery_pct": 5}}"#),
        ),
        // no terminal_id anywhere: the NOT NULL column is missing
        ("fleet/telemetry", format!(r#"{{"ts": {T0}}}"#)),
    ])
    .await;
    let latest = weir.wait_rows("latest", 1).await;
    assert_eq!(latest[0]["terminal_id"], "X");
    let oversize = weir.get_ok("/api/v1/deadletter?reason=oversize").await;
    let item = &oversize["items"][0];
    assert_eq!(item["stream"], "telemetry");
    assert!(
        item["detail"]
            .as_str()
            .unwrap_or("")
            .contains("exceeds the limit"),
        "{item}"
    );
    assert!(
        item["payload"].as_str().unwrap_or("").len() < 10_000,
        "the payload is truncated"
    );
    let schema = weir.get_ok("/api/v1/deadletter?reason=schema").await;
    assert_eq!(
        schema["items"][0]["detail"],
        "row 0: missing NOT NULL column terminal_id"
    );
    weir.stop().await;
}
