-- Payments, refunds and loyalty points, as terminals report them.
CREATE TABLE transactions (
  txn_id TEXT NOT NULL,
  terminal_id TEXT NOT NULL,
  merchant_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  amount_cents BIGINT,
  currency TEXT,
  kind TEXT NOT NULL,
  status TEXT NOT NULL,
  points BIGINT,
  WATERMARK FOR ts AS ts - INTERVAL '10' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/transactions',
        format = 'json', qos = 1);

-- Sales per merchant over the last 5 minutes, refreshed every minute.
CREATE VIEW merchant_sales_5m AS
SELECT merchant_id,
       count(*) FILTER (WHERE kind = 'payment' AND status = 'approved') AS payments,
       sum(amount_cents) FILTER (WHERE kind = 'payment' AND status = 'approved') AS sales_cents,
       sum(amount_cents) FILTER (WHERE kind = 'refund' AND status = 'approved') AS refunds_cents,
       count(*) FILTER (WHERE status = 'declined') AS declines,
       sum(points) FILTER (WHERE kind = 'points') AS points,
       count(DISTINCT terminal_id) AS active_terminals
FROM transactions
GROUP BY merchant_id, hop(INTERVAL '1' MINUTE, INTERVAL '5' MINUTE);

-- Refunds over $500: every one is worth a look.
CREATE VIEW large_refunds AS
SELECT txn_id, terminal_id, merchant_id, ts, amount_cents, currency
FROM transactions
WHERE kind = 'refund' AND status = 'approved' AND amount_cents > 50000;

-- Spending sessions per terminal: bursts of transactions with less than 2 minutes between them.
CREATE VIEW terminal_sessions AS
SELECT terminal_id,
       count(*) AS transactions,
       sum(amount_cents) AS amount_cents
FROM transactions
GROUP BY terminal_id, session(INTERVAL '2' MINUTE);

-- Large refunds per merchant per hour, read from the large_refunds view.
CREATE VIEW large_refunds_per_merchant_1h AS
SELECT merchant_id, count(*) AS refunds, sum(amount_cents) AS amount_cents
FROM large_refunds
GROUP BY merchant_id, tumble(INTERVAL '1' HOUR);
