-- Telemetry reported by every terminal.
CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json');

-- Terminals as the back office knows them.
CREATE TABLE terminals (
  terminal_id TEXT NOT NULL PRIMARY KEY,
  -- Where the terminal stands.
  region TEXT,
  model TEXT
) WITH (connector = 'postgres', connection = 'backoffice', table = 'public.terminals');

-- Merchants, re-read every minute.
CREATE TABLE merchants (
  merchant_id BIGINT,
  name TEXT,
  PRIMARY KEY (merchant_id)
) WITH (connector = 'postgres', connection = 'backoffice', table = 'merchants',
        mode = 'snapshot', refresh = '1 minute');

-- Every event with its terminal's region (NULL when unknown).
CREATE VIEW enriched AS
SELECT e.terminal_id, t.region, e.battery_pct
FROM telemetry e LEFT JOIN terminals t ON e.terminal_id = t.terminal_id;

-- Low battery per region and minute, known terminals only.
CREATE VIEW low_battery_by_region AS
SELECT t.region, count(*) AS low, min(e.battery_pct) AS min_battery
FROM telemetry e JOIN terminals t ON t.terminal_id = e.terminal_id
WHERE e.battery_pct < 20
GROUP BY t.region, tumble(INTERVAL '1' MINUTE);

-- Joined through USING.
CREATE VIEW latest_model AS
SELECT terminal_id, last_value(model) AS model
FROM telemetry LEFT JOIN terminals USING (terminal_id)
GROUP BY terminal_id;

-- Per region and minute, for the BI team's warehouse.
CREATE SINK low_battery_pg FROM low_battery_by_region
WITH (connector = 'postgres', connection = 'warehouse', table = 'analytics.low_battery_by_region');

-- Enriched events, keyed by terminal and battery reading.
CREATE SINK enriched_pg FROM enriched
WITH (connector = 'postgres', connection = 'warehouse', table = 'enriched', key = 'terminal_id, battery_pct');

-- Low-battery readings per terminal and minute.
CREATE VIEW low_1m AS
SELECT terminal_id, count(*) AS low_readings
FROM telemetry WHERE battery_pct < 20
GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

-- All readings per terminal and minute.
CREATE VIEW all_1m AS
SELECT terminal_id, count(*) AS readings, avg(battery_pct) AS avg_battery
FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

-- The share of low readings, per terminal and minute (a windowed join).
CREATE VIEW low_share_1m AS
SELECT a.terminal_id, a.window_start, a.readings, l.low_readings,
       l.low_readings * 1.0 / a.readings AS low_share
FROM all_1m a LEFT JOIN low_1m l
  ON a.terminal_id = l.terminal_id AND a.window_start = l.window_start;
