CREATE TABLE t (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/x');

DROP TABLE t;

INSERT INTO t VALUES ('a', now(), 1.0);

CREATE VIEW ordered AS SELECT terminal_id FROM t ORDER BY terminal_id;

CREATE VIEW limited AS SELECT terminal_id FROM t LIMIT 5;

CREATE VIEW joined AS SELECT a.terminal_id FROM t a JOIN t b ON a.terminal_id = b.terminal_id;

CREATE VIEW ranked AS SELECT terminal_id, row_number() OVER (ORDER BY v) AS r FROM t;

CREATE VIEW broken AS SELEC terminal_id FROM t;

CREATE VIEW t AS SELECT 1 AS one FROM t;

CREATE VIEW bad_option WITH (retention = 'forever') AS SELECT v FROM t;
