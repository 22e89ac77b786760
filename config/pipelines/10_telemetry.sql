-- Telemetry every terminal reports every few seconds: battery, network and app health.
-- The terminal id comes from the topic when the payload does not carry it.
CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  merchant_id TEXT,
  -- When the terminal took the reading (its clock).
  ts TIMESTAMP NOT NULL,
  -- Battery level, in percent (0-100).
  battery_pct DOUBLE,
  charging BOOLEAN,
  -- wifi, cellular, ethernet, or none while offline.
  network TEXT,
  rssi_dbm DOUBLE,
  -- Round trip of the payment app to its backend, in milliseconds.
  app_latency_ms DOUBLE,
  app_version TEXT,
  error_count BIGINT,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry',
        format = 'json', qos = 1);

-- Battery, signal and app health per terminal, per minute.
CREATE VIEW terminal_health_1m AS
SELECT terminal_id,
       count(*) AS samples,
       -- Battery level, in percent: the lowest reading of the minute.
       min(battery_pct) AS min_battery,
       avg(rssi_dbm) AS avg_rssi_dbm,
       avg(app_latency_ms) AS avg_latency_ms,
       -- 99th percentile of the app's latency (HdrHistogram, 3 significant digits).
       approx_percentile_cont(app_latency_ms, 0.99) AS p99_latency_ms,
       sum(error_count) AS errors,
       -- Readings taken while the terminal had no network.
       count(*) FILTER (WHERE network = 'none') AS offline_samples
FROM telemetry
GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

-- Latest known status of every terminal, updated in place.
CREATE VIEW terminal_latest AS
SELECT terminal_id,
       last_value(merchant_id) IGNORE NULLS AS merchant_id,
       last_value(battery_pct) IGNORE NULLS AS battery_pct,
       last_value(charging) IGNORE NULLS AS charging,
       last_value(network) IGNORE NULLS AS network,
       last_value(app_latency_ms) IGNORE NULLS AS app_latency_ms,
       last_value(app_version) IGNORE NULLS AS app_version,
       max(ts) AS last_seen,
       count(*) AS reports
FROM telemetry
GROUP BY terminal_id;

-- Fleet-wide app versions per hour: how a rollout progresses.
CREATE VIEW app_versions_1h AS
SELECT app_version,
       count(DISTINCT terminal_id) AS terminals,
       avg(app_latency_ms) AS avg_latency_ms
FROM telemetry
GROUP BY app_version, tumble(INTERVAL '1' HOUR);
