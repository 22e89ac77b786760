-- The back office's terminals, and a schema for the warehouse tables weir
-- writes. Run as the role weir connects as (it owns the table, so weir can
-- create the publication it follows the table through).
CREATE TABLE IF NOT EXISTS terminals (
  terminal_id text PRIMARY KEY,
  merchant_id text NOT NULL,
  model text,
  region text
);
INSERT INTO terminals VALUES
  ('T1', 'M1', 'A8', 'north'),
  ('T2', 'M1', 'A8', 'north'),
  ('T3', 'M2', 'P2', 'south')
ON CONFLICT (terminal_id) DO NOTHING;
CREATE SCHEMA IF NOT EXISTS analytics;
