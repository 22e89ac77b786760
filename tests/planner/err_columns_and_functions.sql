CREATE TABLE t (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry');

CREATE VIEW unknown_column AS
SELECT terminal_id,
       avg(batery_pct) AS battery
FROM t GROUP BY terminal_id;

CREATE VIEW unknown_function AS
SELECT terminal_id, medianish(battery_pct) AS m
FROM t GROUP BY terminal_id;

CREATE VIEW unknown_table AS SELECT * FROM nowhere;

CREATE VIEW reads_broken AS SELECT * FROM unknown_column;
