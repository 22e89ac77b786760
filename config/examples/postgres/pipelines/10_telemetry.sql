-- Telemetry every terminal reports every few seconds.
CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  -- Battery level, in percent (0-100).
  battery_pct DOUBLE,
  -- Round trip of the payment app to its backend, in milliseconds.
  app_latency_ms DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json', qos = 1);
