CREATE TABLE telemetry (
  terminal_id TEXT NOT NULL,
  ts TIMESTAMP NOT NULL,
  battery_pct DOUBLE,
  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/telemetry', format = 'json');

CREATE TABLE txns (
  terminal_id TEXT NOT NULL,
  amount DOUBLE
) WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/txn', format = 'json');

CREATE TABLE terminals (
  terminal_id TEXT NOT NULL PRIMARY KEY,
  region TEXT
) WITH (connector = 'postgres', connection = 'backoffice', table = 'public.terminals');

CREATE TABLE no_key (
  terminal_id TEXT
) WITH (connector = 'postgres', connection = 'backoffice', table = 'x');

CREATE TABLE two_keys (
  a TEXT, b TEXT, PRIMARY KEY (a, b)
) WITH (connector = 'postgres', connection = 'backoffice', table = 'x', mode = 'cdc', refresh = '1m');

CREATE TABLE stream_with_key (
  terminal_id TEXT PRIMARY KEY
) WITH (connector = 'mqtt', topic = 'k/{terminal_id}');

-- a stream-stream join without a window
CREATE VIEW both_streams AS
SELECT e.terminal_id, x.amount FROM telemetry e JOIN txns x ON e.terminal_id = x.terminal_id;

-- on a column that is not the table's key
CREATE VIEW by_region AS
SELECT e.terminal_id, t.region FROM telemetry e JOIN terminals t ON e.terminal_id = t.region;

-- the table first
CREATE VIEW table_first AS
SELECT t.region FROM terminals t JOIN telemetry e ON e.terminal_id = t.terminal_id;

-- a right join
CREATE VIEW right_join AS
SELECT t.region FROM telemetry e RIGHT JOIN terminals t ON e.terminal_id = t.terminal_id;

-- reading the table alone
CREATE VIEW only_table AS SELECT region FROM terminals;

-- a condition that is not equality of columns
CREATE VIEW non_equi AS
SELECT e.terminal_id FROM telemetry e JOIN terminals t ON e.terminal_id = t.terminal_id AND e.battery_pct > 3;

-- an alert on the table
CREATE ALERT table_alert WITH (severity = 'warning', key = 'terminal_id') AS
SELECT terminal_id FROM terminals WHERE region = 'x';

CREATE VIEW ok_filter AS SELECT terminal_id, battery_pct FROM telemetry;

CREATE SINK no_key FROM ok_filter WITH (connector = 'postgres', connection = 'w', table = 't');

CREATE SINK bad_key FROM ok_filter WITH (connector = 'postgres', connection = 'w', table = 't', key = 'nope');

CREATE SINK of_alert FROM table_alert WITH (connector = 'postgres', connection = 'w', table = 't');

CREATE SINK of_nothing FROM nowhere WITH (connector = 'kafka', connection = 'w', table = 't', colour = 'red');

CREATE VIEW per_minute AS
SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

CREATE VIEW per_5_minutes AS
SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id, tumble(INTERVAL '5' MINUTE);

CREATE VIEW txn_per_minute AS
SELECT terminal_id, sum(amount) AS total FROM txns GROUP BY terminal_id, tumble(INTERVAL '1' MINUTE);

-- different windows
CREATE VIEW mixed_windows AS
SELECT a.terminal_id FROM per_minute a JOIN per_5_minutes b
  ON a.terminal_id = b.terminal_id AND a.window_start = b.window_start;

-- different streams
CREATE VIEW mixed_streams AS
SELECT a.terminal_id FROM per_minute a JOIN txn_per_minute b
  ON a.terminal_id = b.terminal_id AND a.window_start = b.window_start;

-- without window_start
CREATE VIEW no_window_key AS
SELECT a.terminal_id FROM per_minute a JOIN per_minute b ON a.terminal_id = b.terminal_id;
