-- Alerts (DESIGN §5): each fires once per episode, per terminal, and
-- resolves by itself when its condition clears. Times are event times.

-- A terminal's MQTT connection. Terminals publish {"state": "online"}
-- (retained) when they connect and register {"state": "offline"} as their
-- last will, which the broker publishes when the connection drops without
-- a goodbye. No time in the payload: the arrival time is the event time.
CREATE TABLE terminal_status (terminal_id TEXT NOT NULL, state TEXT NOT NULL)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/status', format = 'json');

-- The terminal dropped off (its last will); resolves when it is back online.
CREATE ALERT terminal_offline
WITH (severity = 'critical', clear = 'state = ''online''')
AS SELECT terminal_id, state FROM terminal_status WHERE state = 'offline';

-- Battery under 15 % for a minute; resolves at 20 % or more, so a battery
-- hovering around 15 % does not flap.
CREATE ALERT low_battery
WITH (severity = 'warning', for = '1 minute', clear = 'battery_pct >= 20')
AS SELECT terminal_id, battery_pct FROM telemetry WHERE battery_pct < 15;

-- No telemetry from a terminal for 5 minutes; resolves when it reports.
CREATE ALERT terminal_silent
WITH (severity = 'critical', absent_for = '5 minutes')
AS SELECT terminal_id FROM telemetry;

-- The app is slow: a minute whose p99 latency is above 1.5 s. Resolves with
-- a minute under 800 ms; after resolving it stays quiet for 10 minutes.
CREATE ALERT app_degraded
WITH (severity = 'warning', clear = 'p99_latency_ms < 800', reopen_after = '10 minutes')
AS SELECT terminal_id, p99_latency_ms, errors, window_end
   FROM terminal_health_1m WHERE p99_latency_ms > 1500;
