CREATE TABLE t (terminal_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
  WATERMARK FOR ts AS ts)
WITH (connector = 'mqtt', topic = 'terminals/{terminal_id}/x');

CREATE VIEW window_in_where AS SELECT terminal_id FROM t WHERE tumble(INTERVAL '1' MINUTE) IS NOT NULL;

CREATE VIEW window_in_select AS SELECT terminal_id, tumble(INTERVAL '1' MINUTE) AS w FROM t;

CREATE VIEW two_windows AS SELECT count(*) AS n FROM t GROUP BY tumble(INTERVAL '1' MINUTE), hop(INTERVAL '1' MINUTE, INTERVAL '2' MINUTE);

CREATE VIEW month_window AS SELECT count(*) AS n FROM t GROUP BY tumble(INTERVAL '1' MONTH);

CREATE VIEW slide_too_big AS SELECT count(*) AS n FROM t GROUP BY hop(INTERVAL '5' MINUTE, INTERVAL '1' MINUTE);

CREATE VIEW latest AS SELECT terminal_id, last_value(v) AS v FROM t GROUP BY terminal_id;

CREATE VIEW over_updating AS SELECT count(*) AS n FROM latest GROUP BY tumble(INTERVAL '1' MINUTE);
