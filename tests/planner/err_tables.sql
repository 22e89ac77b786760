CREATE TABLE no_topic (a TEXT) WITH (connector = 'mqtt');

CREATE TABLE bad_options (a TEXT) WITH (connector = 'kafka', topic = 'x/{b}', qos = 2, colour = 'red');

CREATE TABLE bad_type (a TEXT, b BLOB) WITH (connector = 'mqtt', topic = 'x');

CREATE TABLE bad_watermark (a TEXT, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'mqtt', topic = 'x');

CREATE TABLE bad_binding (n BIGINT) WITH (connector = 'mqtt', topic = 'x/{n}');
