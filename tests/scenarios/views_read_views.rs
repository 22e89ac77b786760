//! A view can read another view: a windowed view over a filter view, and a
//! 5-minute rollup over a 1-minute windowed view, with exact values.

use crate::common;

use common::*;
use serde_json::json;

const PIPELINE: &str = "
CREATE TABLE tx (
  txn_id TEXT NOT NULL, terminal_id TEXT NOT NULL, merchant_id TEXT NOT NULL, ts TIMESTAMP NOT NULL,
  amount_cents BIGINT, kind TEXT NOT NULL,
  WATERMARK FOR ts AS ts - INTERVAL '10' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/transactions', idle_timeout = '1h');

CREATE VIEW refunds AS SELECT merchant_id, ts, amount_cents FROM tx WHERE kind = 'refund';

CREATE VIEW refunds_per_merchant_1m AS
SELECT merchant_id, count(*) AS refunds, sum(amount_cents) AS amount_cents
FROM refunds GROUP BY merchant_id, tumble(INTERVAL '1' MINUTE);

CREATE VIEW sales_1m AS
SELECT merchant_id, sum(amount_cents) AS amount_cents
FROM tx WHERE kind = 'payment' GROUP BY merchant_id, tumble(INTERVAL '1' MINUTE);

CREATE VIEW sales_5m AS
SELECT merchant_id, sum(amount_cents) AS amount_cents, count(*) AS minutes
FROM sales_1m GROUP BY merchant_id, tumble(INTERVAL '5' MINUTE);
";

/// 2023-11-14T22:10:00Z: windows align to the epoch, so the base must be a
/// whole five minutes for the 5-minute windows to start there.
const T5: i64 = T0 - 180_000;

fn txn(id: &str, merchant: &str, second: i64, amount: i64, kind: &str) -> (&'static str, String) {
    (
        "terminals/T1/transactions",
        format!(
            r#"{{"txn_id": "{id}", "merchant_id": "{merchant}", "ts": {}, "amount_cents": {amount}, "kind": "{kind}"}}"#,
            T5 + second * 1000
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_over_filters_and_windows() {
    let weir = Weir::start(&[("tx.sql", PIPELINE)]).await;
    let messages = [
        txn("a", "M1", 5, 1000, "payment"),
        txn("b", "M1", 20, 250, "refund"),
        txn("c", "M1", 40, 750, "refund"),
        txn("d", "M1", 70, 2000, "payment"),
        txn("e", "M2", 130, 500, "payment"),
        txn("f", "M1", 200, 4000, "payment"),
        // moves the watermark to 320 s: closes minutes 0-4 and the first 5 minutes
        txn("g", "M9", 330, 1, "payment"),
    ];
    let refs: Vec<(&str, String)> = messages.iter().map(|(t, p)| (*t, p.clone())).collect();
    weir.publish(&refs).await;

    let refunds = weir.wait_rows("refunds_per_merchant_1m", 1).await;
    assert_eq!(
        refunds[0],
        json!({"window_start": "2023-11-14T22:10:00.000Z", "window_end": "2023-11-14T22:11:00.000Z",
               "merchant_id": "M1", "refunds": 2, "amount_cents": 1000})
    );
    let rollup = weir.wait_rows("sales_5m", 2).await;
    let m1 = row_with(&rollup, "merchant_id", "M1");
    assert_eq!(m1["window_start"], "2023-11-14T22:10:00.000Z");
    assert_eq!(m1["window_end"], "2023-11-14T22:15:00.000Z");
    assert_eq!(
        m1["amount_cents"], 7000,
        "1000 + 2000 + 4000 from three 1-minute rows"
    );
    assert_eq!(m1["minutes"], 3);
    assert_eq!(row_with(&rollup, "merchant_id", "M2")["amount_cents"], 500);
    weir.stop().await;
}
