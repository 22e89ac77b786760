-- Terminals as the back office knows them: read once, then followed
-- through logical decoding (a change reaches weir within a second or so).
CREATE TABLE terminals (
  terminal_id TEXT NOT NULL PRIMARY KEY,
  merchant_id TEXT NOT NULL,
  -- Hardware model.
  model TEXT,
  -- Sales region.
  region TEXT
) WITH (connector = 'postgres', connection = 'backoffice', table = 'public.terminals');

-- Battery and app health per region and minute; terminals the back office
-- does not know are counted under a NULL region.
CREATE VIEW region_health_1m AS
SELECT t.region,
       count(*) AS samples,
       count(DISTINCT e.terminal_id) AS terminals,
       min(e.battery_pct) AS min_battery,
       avg(e.app_latency_ms) AS avg_latency_ms
FROM telemetry e LEFT JOIN terminals t ON e.terminal_id = t.terminal_id
GROUP BY t.region, tumble(INTERVAL '1' MINUTE);

-- Latest reading of every known terminal, with its model and merchant.
CREATE VIEW terminal_status AS
SELECT e.terminal_id,
       last_value(t.merchant_id) AS merchant_id,
       last_value(t.model) AS model,
       last_value(e.battery_pct) AS battery_pct,
       max(e.ts) AS last_seen
FROM telemetry e JOIN terminals t ON e.terminal_id = t.terminal_id
GROUP BY e.terminal_id;

-- Low battery, alerting per terminal.
CREATE ALERT low_battery
WITH (severity = 'warning', for = '1 minute', clear = 'battery_pct >= 20')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 15;

-- For the BI team's warehouse: weir creates these tables when missing.
CREATE SINK region_health_pg FROM region_health_1m
WITH (connector = 'postgres', connection = 'warehouse', table = 'analytics.region_health_1m');

CREATE SINK terminal_status_pg FROM terminal_status
WITH (connector = 'postgres', connection = 'warehouse', table = 'analytics.terminal_status');

CREATE SINK low_battery_pg FROM low_battery
WITH (connector = 'postgres', connection = 'warehouse', table = 'analytics.alerts');
