//! `CREATE TABLE ... WITH (connector = 'mqtt', ...)`: a source stream;
//! `CREATE TABLE ... PRIMARY KEY ... WITH (connector = 'postgres', ...)`: a
//! reference table (DESIGN §2).

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::sql::sqlparser::ast::{
    ColumnOption, CreateTable, CreateTableOptions, Expr, SqlOption, TableConstraint, Value,
};

use crate::source::topic::TopicPattern;

/// How the payload of a message is decoded. Only JSON today (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    Json,
}

/// The event-time column and the watermark bound of a stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventTime {
    /// `None`: event time is the arrival time (no `WATERMARK` clause).
    pub column: Option<String>,
    pub bound_ms: i64,
}

/// A source stream, as declared by `CREATE TABLE`.
#[derive(Debug, Clone)]
pub struct StreamDef {
    pub name: String,
    pub topic: TopicPattern,
    pub format: PayloadFormat,
    pub qos: u8,
    pub idle_timeout: Duration,
    /// Declared columns, in order.
    pub schema: SchemaRef,
    pub event_time: EventTime,
    pub doc: String,
    /// Column -> the `--` comment above it in the `CREATE TABLE`.
    pub column_docs: std::collections::BTreeMap<String, String>,
    pub sql: String,
    pub file: String,
    pub line: usize,
}

impl StreamDef {
    /// Index of the event-time column in `schema`, when there is one.
    pub fn event_time_index(&self) -> Option<usize> {
        let column = self.event_time.column.as_deref()?;
        self.schema.index_of(column).ok()
    }
}

/// The Arrow type of every `TIMESTAMP` column: UTC milliseconds.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Maps a SQL column type to Arrow. Integers are 64-bit; decimals are doubles.
pub fn sql_type_to_arrow(sql_type: &str) -> Option<DataType> {
    let t = sql_type.to_ascii_uppercase();
    let base = t.split(['(', ' ']).next().unwrap_or("");
    Some(match base {
        "TEXT" | "VARCHAR" | "STRING" | "CHAR" | "CHARACTER" => DataType::Utf8,
        "BIGINT" | "INT" | "INTEGER" | "SMALLINT" | "TINYINT" | "INT8" | "INT4" | "INT2"
        | "INT64" => DataType::Int64,
        "DOUBLE" | "FLOAT" | "REAL" | "FLOAT8" | "FLOAT4" | "FLOAT64" | "DECIMAL" | "NUMERIC" => {
            DataType::Float64
        }
        "BOOLEAN" | "BOOL" => DataType::Boolean,
        "TIMESTAMP" | "DATETIME" | "TIMESTAMPTZ" => timestamp_type(),
        _ => return None,
    })
}

/// Removes a `WATERMARK FOR col AS expr` clause from a `CREATE TABLE` text
/// (sqlparser does not know it) and returns the text without it and the clause.
pub fn extract_watermark(text: &str) -> (String, Option<String>) {
    let upper = blank_strings(text).to_ascii_uppercase();
    let Some(pos) = find_word(&upper, "WATERMARK") else {
        return (text.to_string(), None);
    };
    // the clause runs to the next top-level ',' or the ')' closing the column list
    let bytes = upper.as_bytes();
    let mut depth = 0i32;
    let mut end = bytes.len();
    for (i, &b) in bytes.iter().enumerate().skip(pos) {
        match b {
            b'(' => depth += 1,
            b')' if depth == 0 => {
                end = i;
                break;
            }
            b')' => depth -= 1,
            b',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let clause = text[pos..end].trim().to_string();
    // drop the comma that separated the clause from the previous column
    let before = text[..pos].trim_end();
    let before = before.strip_suffix(',').unwrap_or(before);
    let after = &text[end..];
    let after = if before.ends_with('(') {
        after.strip_prefix(',').unwrap_or(after)
    } else {
        after
    };
    (format!("{before} {after}"), Some(clause))
}

/// Replaces the contents of string literals with spaces, keeping offsets.
fn blank_strings(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                out.push(c);
            }
            Some(_) => out.extend(std::iter::repeat_n(' ', c.len_utf8())),
            None => {
                if c == '\'' {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

fn find_word(haystack: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = haystack[from..].find(word) {
        let at = from + i;
        let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let before_ok = at == 0 || !is_word(haystack.as_bytes()[at - 1]);
        let after = at + word.len();
        let after_ok =
            after >= haystack.len() || !haystack.as_bytes()[after].is_ascii_alphanumeric();
        if before_ok && after_ok {
            return Some(at);
        }
        from = after;
    }
    None
}

/// Parses `WATERMARK FOR ts AS ts - INTERVAL '5' SECOND` (or `AS ts`).
pub fn parse_watermark(clause: &str) -> Result<(String, i64), String> {
    let words: Vec<&str> = clause.split_whitespace().collect();
    let bad = || {
        format!("invalid WATERMARK clause {clause:?}: expected WATERMARK FOR <column> AS <column> - INTERVAL '<n>' <unit>")
    };
    if words.len() < 5
        || !words[1].eq_ignore_ascii_case("FOR")
        || !words[3].eq_ignore_ascii_case("AS")
    {
        return Err(bad());
    }
    let column = words[2].to_ascii_lowercase();
    if !words[4].eq_ignore_ascii_case(&column) {
        return Err(format!(
            "WATERMARK FOR {column}: the expression must start with {column}"
        ));
    }
    if words.len() == 5 {
        return Ok((column, 0));
    }
    if words[5] != "-" || words.len() < 8 || !words[6].eq_ignore_ascii_case("INTERVAL") {
        return Err(bad());
    }
    let interval = words[7..].join(" ").replace('\'', "").to_ascii_lowercase();
    let bound =
        crate::config::parse_duration(&interval).map_err(|e| format!("WATERMARK bound: {e}"))?;
    Ok((column, bound.as_millis() as i64))
}

/// What a `CREATE TABLE` declares, before its options are checked.
pub struct TableParts {
    pub name: String,
    pub fields: Vec<Field>,
    pub options: Vec<(String, String)>,
    pub event_time: EventTime,
    /// Columns of `PRIMARY KEY`, on a column or for the table.
    pub primary_key: Vec<String>,
}

impl TableParts {
    /// The `connector` option, lowercase (`mqtt` when absent is an error later).
    pub fn connector(&self) -> Option<String> {
        self.options
            .iter()
            .find(|(k, _)| k == "connector")
            .map(|(_, v)| v.to_ascii_lowercase())
    }
}

/// How a reference table follows its Postgres table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum TableMode {
    /// Logical decoding: a replication slot and a publication (weir's, or the DBA's).
    Cdc { publication: Option<String> },
    /// The whole table read again every `refresh`.
    Snapshot {
        #[serde(with = "crate::plan::ddl::millis")]
        refresh: Duration,
    },
}

pub(crate) mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// A reference table from Postgres (DESIGN §2), as declared.
#[derive(Debug, Clone)]
pub struct TableDef {
    pub name: String,
    /// Declared columns, in order.
    pub schema: SchemaRef,
    /// The primary key column (one column: lookups are on it).
    pub key: String,
    /// `[[connections]]` name.
    pub connection: String,
    /// The Postgres table, `schema.table` (`public.` when not given).
    pub pg_table: String,
    pub mode: TableMode,
    pub doc: String,
    pub column_docs: std::collections::BTreeMap<String, String>,
    pub sql: String,
    pub file: String,
    pub line: usize,
    /// The rows it holds now: shared by the views that join it, ad-hoc
    /// queries, and the pipeline thread that applies its changes.
    pub rows: crate::table::TableHandle,
}

impl TableDef {
    pub fn key_index(&self) -> usize {
        self.schema.index_of(&self.key).unwrap_or(0)
    }

    /// The lineage node of the Postgres table it follows.
    pub fn source_node(&self) -> String {
        format!("postgres:{}/{}", self.connection, self.pg_table)
    }

    /// Replication slot and publication weir creates for it.
    pub fn slot_name(&self) -> String {
        format!("weir_{}", self.name)
    }

    pub fn publication_name(&self) -> String {
        match &self.mode {
            TableMode::Cdc {
                publication: Some(p),
            } => p.clone(),
            _ => format!("weir_{}", self.name),
        }
    }
}

/// Validates a `connector = 'postgres'` table and builds its definition.
pub fn build_table(parts: TableParts) -> Result<TableDef, Vec<String>> {
    let TableParts {
        name,
        fields,
        options,
        event_time,
        primary_key,
    } = parts;
    let mut problems = Vec::new();
    if event_time.column.is_some() {
        problems.push(
            "a reference table has no event time: remove the WATERMARK clause (rows are met as they are when an event is processed)"
                .to_string(),
        );
    }
    let key = match primary_key.as_slice() {
        [one] => match fields.iter().find(|f| f.name() == one) {
            Some(f) if matches!(f.data_type(), DataType::Utf8 | DataType::Int64) => {
                Some(one.clone())
            }
            Some(_) => {
                problems.push(format!(
                    "PRIMARY KEY {one}: must be a TEXT or BIGINT column"
                ));
                None
            }
            None => {
                problems.push(format!("PRIMARY KEY {one}: no such column"));
                None
            }
        },
        [] => {
            problems.push(
                "a postgres table needs a PRIMARY KEY (one column): lookups join on it".into(),
            );
            None
        }
        _ => {
            problems.push(format!(
                "PRIMARY KEY ({}): one column only (lookups join on it)",
                primary_key.join(", ")
            ));
            None
        }
    };
    let mut connection = None;
    let mut pg_table = None;
    let mut mode = "cdc".to_string();
    let mut refresh = None;
    let mut publication = None;
    for (k, value) in options {
        match k.as_str() {
            "connector" => {}
            "connection" => connection = Some(value),
            "table" => pg_table = Some(value),
            "mode" => mode = value.to_ascii_lowercase(),
            "refresh" => match crate::config::parse_duration(&value) {
                Ok(d) if d >= Duration::from_secs(1) => refresh = Some(d),
                Ok(_) => problems.push("refresh: at least 1s".into()),
                Err(e) => problems.push(format!("refresh: {e}")),
            },
            "publication" => publication = Some(value),
            other => problems.push(format!(
                "unknown option {other:?} (known: connector, connection, table, mode, refresh, publication)"
            )),
        }
    }
    let mode = match mode.as_str() {
        "cdc" => {
            if refresh.is_some() {
                problems.push("refresh: only with mode = 'snapshot'".into());
            }
            TableMode::Cdc { publication }
        }
        "snapshot" => {
            if publication.is_some() {
                problems.push("publication: only with mode = 'cdc'".into());
            }
            TableMode::Snapshot {
                refresh: refresh.unwrap_or(Duration::from_secs(300)),
            }
        }
        other => {
            problems.push(format!("mode = '{other}': 'cdc' or 'snapshot'"));
            TableMode::Cdc { publication: None }
        }
    };
    if connection.is_none() {
        problems.push("missing option connection = '...' (a [[connections]] name)".into());
    }
    let pg_table = match pg_table {
        Some(t) if t.split('.').count() <= 2 && !t.trim().is_empty() => {
            if t.contains('.') {
                t
            } else {
                format!("public.{t}")
            }
        }
        Some(t) => {
            problems.push(format!("table = '{t}': expected 'schema.table' or 'table'"));
            String::new()
        }
        None => {
            problems.push("missing option table = 'schema.table'".into());
            String::new()
        }
    };
    match (key, connection) {
        (Some(key), Some(connection)) if problems.is_empty() => Ok(TableDef {
            // (held nullable: Postgres may hold a NULL weir's declaration does not expect)
            rows: crate::table::TableHandle::new(
                Arc::new(Schema::new(
                    fields
                        .iter()
                        .map(|f| f.clone().with_nullable(true))
                        .collect::<Vec<_>>(),
                )),
                fields.iter().position(|f| f.name() == &key).unwrap_or(0),
            ),
            name,
            schema: Arc::new(Schema::new(fields)),
            key,
            connection,
            pg_table,
            mode,
            doc: String::new(),
            column_docs: Default::default(),
            sql: String::new(),
            file: String::new(),
            line: 0,
        }),
        _ => Err(problems),
    }
}

/// Turns a parsed `CREATE TABLE` into a stream definition. Collects every problem.
pub fn stream_from_create_table(
    ct: &CreateTable,
    watermark: Option<(String, i64)>,
) -> Result<TableParts, Vec<String>> {
    let mut problems = Vec::new();
    let name = ct.name.to_string().to_ascii_lowercase();
    let mut fields = Vec::new();
    let mut primary_key = Vec::new();
    for constraint in &ct.constraints {
        if let TableConstraint::PrimaryKey(pk) = constraint {
            primary_key.extend(
                pk.columns
                    .iter()
                    .map(|c| c.column.expr.to_string().to_ascii_lowercase()),
            );
        }
    }
    for col in &ct.columns {
        let col_name = col.name.value.to_ascii_lowercase();
        let is_key = col
            .options
            .iter()
            .any(|o| matches!(o.option, ColumnOption::PrimaryKey(_)));
        if is_key {
            primary_key.push(col_name.clone());
        }
        // (a primary key is never NULL)
        let not_null = is_key
            || col
                .options
                .iter()
                .any(|o| matches!(o.option, ColumnOption::NotNull));
        match sql_type_to_arrow(&col.data_type.to_string()) {
            Some(dt) => fields.push(Field::new(col_name, dt, !not_null)),
            None => problems.push(format!(
                "column {col_name}: unsupported type {} (supported: TEXT, BIGINT, INT, DOUBLE, FLOAT, BOOLEAN, TIMESTAMP)",
                col.data_type
            )),
        }
    }
    if fields.is_empty() && problems.is_empty() {
        problems.push(format!("table {name} declares no columns"));
    }
    let mut options = Vec::new();
    let raw_options: &[SqlOption] = match &ct.table_options {
        CreateTableOptions::With(o)
        | CreateTableOptions::Options(o)
        | CreateTableOptions::Plain(o) => o,
        _ => &[],
    };
    for option in raw_options {
        match option_pair(option) {
            Ok(pair) => options.push(pair),
            Err(e) => problems.push(e),
        }
    }
    let event_time = match watermark {
        Some((column, bound_ms)) => {
            match fields.iter().find(|f| f.name() == &column) {
                None => problems.push(format!("WATERMARK FOR {column}: no such column")),
                Some(f) if !matches!(f.data_type(), DataType::Timestamp(..)) => problems.push(
                    format!("WATERMARK FOR {column}: the column must be a TIMESTAMP"),
                ),
                Some(_) => {}
            }
            EventTime {
                column: Some(column),
                bound_ms,
            }
        }
        None => EventTime {
            column: None,
            bound_ms: 0,
        },
    };
    if problems.is_empty() {
        Ok(TableParts {
            name,
            fields,
            options,
            event_time,
            primary_key,
        })
    } else {
        Err(problems)
    }
}

/// `key = 'value'` of a `WITH (...)` list, as lowercase key and unquoted value.
pub fn option_pair(option: &SqlOption) -> Result<(String, String), String> {
    match option {
        SqlOption::KeyValue { key, value } => {
            let key = key.value.to_ascii_lowercase();
            let value = match value {
                Expr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
                    Value::Number(n, _) => n.clone(),
                    Value::Boolean(b) => b.to_string(),
                    other => other.to_string(),
                },
                Expr::Identifier(i) => i.value.clone(),
                other => other.to_string(),
            };
            Ok((key, value))
        }
        other => Err(format!(
            "unsupported option {other}: expected key = 'value'"
        )),
    }
}

/// Validates the `WITH` options of a stream and builds its definition.
pub fn build_stream(parts: TableParts) -> Result<StreamDef, Vec<String>> {
    let TableParts {
        name,
        fields,
        options,
        event_time,
        primary_key,
    } = parts;
    let mut problems = Vec::new();
    if !primary_key.is_empty() {
        problems.push(
            "PRIMARY KEY: a stream has none (events are appended); a reference table has one (connector = 'postgres')".into(),
        );
    }
    let mut topic = None;
    let mut qos = 1u8;
    let mut idle_timeout = Duration::from_secs(5);
    let mut connector = None;
    for (key, value) in options {
        match key.as_str() {
            "connector" => connector = Some(value),
            "topic" => match TopicPattern::parse(&value) {
                Ok(t) => topic = Some(t),
                Err(e) => problems.push(e),
            },
            "format" => {
                if !value.eq_ignore_ascii_case("json") {
                    problems.push(format!("format = '{value}': only 'json' is supported"));
                }
            }
            "qos" => match value.as_str() {
                "0" => qos = 0,
                "1" => qos = 1,
                _ => problems.push(format!("qos = {value}: must be 0 or 1")),
            },
            "idle_timeout" => match crate::config::parse_duration(&value) {
                Ok(d) => idle_timeout = d,
                Err(e) => problems.push(format!("idle_timeout: {e}")),
            },
            other => problems.push(format!(
                "unknown option {other:?} (known: connector, topic, format, qos, idle_timeout)"
            )),
        }
    }
    match connector.as_deref() {
        Some(c) if c.eq_ignore_ascii_case("mqtt") => {}
        Some(c) => problems.push(format!("connector = '{c}': only 'mqtt' is supported")),
        None => problems.push("missing option connector = 'mqtt'".into()),
    }
    let Some(topic) = topic else {
        problems.push("missing option topic = '...'".into());
        return Err(problems);
    };
    for binding in topic.bindings() {
        match fields.iter().find(|f| f.name() == binding) {
            None => problems.push(format!(
                "topic binds {{{binding}}} but the table has no column {binding}"
            )),
            Some(f) if f.data_type() != &DataType::Utf8 => problems.push(format!(
                "topic binds {{{binding}}}: column {binding} must be TEXT"
            )),
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(StreamDef {
        name,
        topic,
        format: PayloadFormat::Json,
        qos,
        idle_timeout,
        schema: Arc::new(Schema::new(fields)),
        event_time,
        doc: String::new(),
        column_docs: Default::default(),
        sql: String::new(),
        file: String::new(),
        line: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_clause_is_extracted() {
        let sql = "CREATE TABLE t (a TEXT, ts TIMESTAMP NOT NULL,\n  WATERMARK FOR ts AS ts - INTERVAL '5' SECOND\n) WITH (topic = 'x')";
        let (rest, clause) = extract_watermark(sql);
        assert_eq!(
            clause.as_deref(),
            Some("WATERMARK FOR ts AS ts - INTERVAL '5' SECOND")
        );
        assert!(!rest.to_uppercase().contains("WATERMARK"));
        assert!(rest.contains("NOT NULL") && rest.contains("WITH (topic = 'x')"));
        assert_eq!(
            parse_watermark(clause.as_deref().unwrap()).unwrap(),
            ("ts".into(), 5000)
        );
        assert_eq!(
            parse_watermark("WATERMARK FOR ts AS ts").unwrap(),
            ("ts".into(), 0)
        );
        assert!(parse_watermark("WATERMARK FOR ts AS other - INTERVAL '1' SECOND").is_err());
    }

    #[test]
    fn watermark_word_inside_strings_is_ignored() {
        let (rest, clause) =
            extract_watermark("CREATE TABLE t (a TEXT) WITH (topic = 'watermark')");
        assert!(clause.is_none());
        assert!(rest.contains("'watermark'"));
    }

    #[test]
    fn types_map_to_arrow() {
        assert_eq!(sql_type_to_arrow("VARCHAR(20)"), Some(DataType::Utf8));
        assert_eq!(
            sql_type_to_arrow("double precision"),
            Some(DataType::Float64)
        );
        assert_eq!(sql_type_to_arrow("TIMESTAMP"), Some(timestamp_type()));
        assert_eq!(sql_type_to_arrow("BLOB"), None);
    }
}
