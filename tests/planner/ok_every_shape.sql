-- header: every view shape plans
CREATE TABLE tx (
  txn_id TEXT NOT NULL, terminal_id TEXT NOT NULL, merchant_id TEXT, ts TIMESTAMP NOT NULL,
  amount_cents BIGINT, kind TEXT,
  WATERMARK FOR ts AS ts - INTERVAL '10' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/transactions', format = 'json', qos = 0, idle_timeout = '30s');

CREATE VIEW sales_1m AS
SELECT merchant_id, count(*) AS n, sum(amount_cents) / 100.0 AS amount, approx_percentile_cont(amount_cents, 0.5) AS median
FROM tx WHERE kind = 'payment'
GROUP BY merchant_id, tumble(INTERVAL '1' MINUTE);

CREATE VIEW sales_5m WITH (retention = '7 days') AS
SELECT merchant_id, count(DISTINCT terminal_id) AS terminals
FROM tx GROUP BY merchant_id, hop(INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)
HAVING count(*) > 1;

CREATE VIEW bursts AS
SELECT terminal_id, first_value(amount_cents) AS first_amount, last_value(amount_cents) AS last_amount
FROM tx GROUP BY terminal_id, session(INTERVAL '30' SECOND);

CREATE VIEW totals AS
SELECT terminal_id, sum(amount_cents) FILTER (WHERE kind = 'refund') AS refunds, max(ts) AS last_seen
FROM tx GROUP BY terminal_id;

CREATE VIEW big AS SELECT txn_id, upper(kind) AS kind, amount_cents FROM tx WHERE amount_cents > 50000;

CREATE VIEW big_per_hour AS SELECT count(*) AS n FROM big GROUP BY tumble(INTERVAL '1' HOUR);
