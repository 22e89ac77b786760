//! When a stream goes quiet, its watermark moves with the wall clock after
//! `idle_timeout`, so the last window closes without further traffic.

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_window_closes_when_the_stream_goes_idle() {
    let sql = TELEMETRY.replace("idle_timeout = '1h'", "idle_timeout = '1s'");
    let weir = Weir::start(&[("telemetry.sql", &sql)]).await;
    // 1 ms before the end of a minute: once idle, the watermark needs only the
    // 5 s bound plus 1 ms of wall-clock time to pass the window's end.
    weir.publish(&[("terminals/I1/telemetry", event(T0 + 59_999, 42.0, None))])
        .await;
    // No later event arrives; the window [T0, T0 + 60 s) still closes.
    let rows = wait_for("the idle stream's window to close", || async {
        let rows = weir.rows("health_1m").await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["terminal_id"], "I1");
    assert_eq!(rows[0]["samples"], 1);
    weir.stop().await;
}
