CREATE TABLE telemetry (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry');

CREATE ALERT bad_options
WITH (severity = 'urgent',
      for = 'soon',
      colour = 'red')
AS SELECT terminal_id FROM telemetry;

CREATE ALERT bad_clear
WITH (clear = 'voltage > 3')
AS SELECT terminal_id FROM telemetry WHERE battery_pct < 3;

CREATE ALERT grouped
AS SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id;

CREATE ALERT nowhere AS SELECT terminal_id FROM nothing;

CREATE ALERT absent_and_clear WITH (absent_for = '1m', clear = 'battery_pct > 1')
AS SELECT terminal_id FROM telemetry;

CREATE ALERT bad_key WITH (key = 'merchant_id')
AS SELECT terminal_id FROM telemetry WHERE battery_pct < 3;

CREATE ALERT bad_where AS SELECT terminal_id FROM telemetry
  WHERE batery_pct < 3;
