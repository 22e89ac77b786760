-- Seeds beside the shipped pipelines (config/pipelines/, which the fuzzer reads too).
CREATE TABLE s (k TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE, n BIGINT, WATERMARK FOR ts AS ts - INTERVAL '2' SECOND)
WITH (connector = 'mqtt', topic = 'a/{k}/b', format = 'json', qos = 0, idle_timeout = '10s');

CREATE VIEW h WITH (retention = '1 day') AS
SELECT k, count(DISTINCT n) AS d, approx_percentile_cont(v, 0.99) AS p99 FROM s GROUP BY k, hop(INTERVAL '10' SECOND, INTERVAL '1' MINUTE);

CREATE VIEW u WITH (key_ttl = '1 hour') AS SELECT k, sum(v) FILTER (WHERE n > 0) AS pos FROM s GROUP BY k;

CREATE ALERT hot WITH (severity = 'info', for = '30 seconds', clear = 'pos < 10') AS SELECT k, pos FROM u WHERE pos > 100;
