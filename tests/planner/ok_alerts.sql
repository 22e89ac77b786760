CREATE TABLE telemetry (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, battery_pct DOUBLE,
  app_latency_ms DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry');

CREATE TABLE terminal_status (terminal_id TEXT NOT NULL, state TEXT NOT NULL)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/status', format = 'json');

CREATE VIEW health_1m AS
SELECT terminal_id, approx_percentile_cont(app_latency_ms, 0.99) AS p99
FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

CREATE ALERT low_battery
WITH (severity = 'warning', for = '1 minute', clear = 'battery_pct >= 20')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 15;

CREATE ALERT terminal_silent
WITH (severity = 'critical', absent_for = '5 minutes')
AS SELECT terminal_id FROM telemetry;

CREATE ALERT terminal_offline
WITH (severity = 'critical', clear = 'state = ''online''')
AS SELECT terminal_id, state FROM terminal_status WHERE state = 'offline';

CREATE ALERT slow_minutes
WITH (key = 'terminal_id', clear = 'p99 < 300', reopen_after = '10 minutes')
AS SELECT window_end, terminal_id, p99 FROM health_1m WHERE p99 > 500;
