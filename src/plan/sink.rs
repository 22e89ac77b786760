//! `CREATE SINK name FROM view WITH (connector = 'postgres', ...)`: where a
//! view's rows are delivered (DESIGN §3 "Sinks: Postgres").
//!
//! sqlparser has no `CREATE SINK`; the statement is small enough to read by
//! hand, and its `WITH` list is handed to sqlparser as a `CREATE TABLE`'s,
//! so its options are read exactly as every other statement's.

use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{CreateTableOptions, Statement as SqlStatement};
use datafusion::sql::sqlparser::dialect::GenericDialect;

/// A Postgres sink, as declared.
#[derive(Debug, Clone)]
pub struct SinkDef {
    pub name: String,
    /// The view (or alert rule) it delivers.
    pub from: String,
    /// `from` is an alert rule: its alert records, keyed by `id`.
    pub from_alert: bool,
    pub connection: String,
    /// `schema.table` (`public.` when not given).
    pub table: String,
    /// For a filter view: the columns that make a row unique.
    pub key: Vec<String>,
    /// The columns the Postgres table is keyed on (set when planned).
    pub key_columns: Vec<String>,
    pub doc: String,
    pub sql: String,
    pub file: String,
    pub line: usize,
}

impl SinkDef {
    pub fn target(&self) -> String {
        format!("postgres:{}/{}", self.connection, self.table)
    }

    /// Where its rows wait in the store's outbox.
    pub fn outbox(&self) -> String {
        if self.from_alert {
            crate::store::alert_outbox_name(&self.from)
        } else {
            self.from.clone()
        }
    }
}

/// The columns of an alert rule's sink table: the alert record (DESIGN §5).
pub fn alert_schema() -> datafusion::arrow::datatypes::SchemaRef {
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let ts = super::timestamp_type;
    std::sync::Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("opened_at", ts(), false),
        Field::new("resolved_at", ts(), true),
        Field::new("acked", DataType::Boolean, false),
        Field::new("acked_at", ts(), true),
        Field::new("fired_by", DataType::Utf8, true),
        Field::new("cleared_by", DataType::Utf8, true),
    ]))
}

fn is_ident(word: &str) -> bool {
    !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !word.starts_with(|c: char| c.is_ascii_digit())
}

/// Parses the statement's text; every problem at once.
pub fn parse(text: &str) -> Result<SinkDef, Vec<String>> {
    let usage = "expected CREATE SINK name FROM view WITH (connector = 'postgres', connection = '...', table = '...')";
    let words: Vec<&str> = text.split_whitespace().collect();
    let (name, from) = match words.as_slice() {
        [c, s, name, f, from, ..]
            if c.eq_ignore_ascii_case("CREATE")
                && s.eq_ignore_ascii_case("SINK")
                && f.eq_ignore_ascii_case("FROM") =>
        {
            (name.to_ascii_lowercase(), from.to_ascii_lowercase())
        }
        _ => return Err(vec![usage.into()]),
    };
    if !is_ident(&name) || !is_ident(&from) {
        return Err(vec![usage.into()]);
    }
    let upper = text.to_ascii_uppercase();
    let Some(with) = upper.find("WITH") else {
        return Err(vec![format!("sink {name}: {usage}")]);
    };
    let options_text = &text[with..];
    let sql = format!("CREATE TABLE __sink (x INT) {options_text}");
    let parsed = DFParser::parse_sql_with_dialect(&sql, &GenericDialect {})
        .map_err(|e| vec![format!("sink {name}: {e}")])?;
    let options = match parsed.front() {
        Some(DFStatement::Statement(s)) => match s.as_ref() {
            SqlStatement::CreateTable(ct) => match &ct.table_options {
                CreateTableOptions::With(o) | CreateTableOptions::Options(o) => o.clone(),
                _ => vec![],
            },
            _ => vec![],
        },
        _ => vec![],
    };
    let mut problems = Vec::new();
    let mut connector = None;
    let mut connection = None;
    let mut table = None;
    let mut key = Vec::new();
    for option in &options {
        match super::ddl::option_pair(option) {
            Ok((k, v)) => match k.as_str() {
                "connector" => connector = Some(v.to_ascii_lowercase()),
                "connection" => connection = Some(v),
                "table" => table = Some(v),
                "key" => {
                    key = v
                        .split(',')
                        .map(|c| c.trim().to_ascii_lowercase())
                        .filter(|c| !c.is_empty())
                        .collect()
                }
                other => problems.push(format!(
                    "sink {name}: unknown option {other:?} (known: connector, connection, table, key)"
                )),
            },
            Err(e) => problems.push(format!("sink {name}: {e}")),
        }
    }
    match connector.as_deref() {
        Some("postgres") => {}
        Some(other) => problems.push(format!(
            "sink {name}: connector = '{other}': only 'postgres' is supported"
        )),
        None => problems.push(format!(
            "sink {name}: missing option connector = 'postgres'"
        )),
    }
    let table = match table {
        Some(t)
            if (1..=2).contains(&t.split('.').count())
                && t.split('.').all(|p| !p.trim().is_empty()) =>
        {
            if t.contains('.') {
                t
            } else {
                format!("public.{t}")
            }
        }
        Some(t) => {
            problems.push(format!(
                "sink {name}: table = '{t}': expected 'schema.table' or 'table'"
            ));
            String::new()
        }
        None => {
            problems.push(format!(
                "sink {name}: missing option table = 'schema.table'"
            ));
            String::new()
        }
    };
    let Some(connection) = connection else {
        problems.push(format!(
            "sink {name}: missing option connection = '...' (a [[connections]] name)"
        ));
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(SinkDef {
        name,
        from,
        from_alert: false,
        connection,
        table,
        key,
        key_columns: Vec::new(),
        doc: String::new(),
        sql: text.to_string(),
        file: String::new(),
        line: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_statement_parses() {
        let s = parse("CREATE SINK h_pg FROM terminal_health_1m\nWITH (connector = 'postgres', connection = 'warehouse', table = 'analytics.h')").unwrap();
        assert_eq!(
            (s.name.as_str(), s.from.as_str()),
            ("h_pg", "terminal_health_1m")
        );
        assert_eq!(s.table, "analytics.h");
        assert_eq!(s.target(), "postgres:warehouse/analytics.h");
        let s = parse("create sink x from v with (connector='postgres', connection='w', table='t', key='a, b')").unwrap();
        assert_eq!(s.table, "public.t");
        assert_eq!(s.key, ["a", "b"]);
    }

    #[test]
    fn bad_sinks_say_what_is_wrong() {
        let e = parse(
            "CREATE SINK x FROM v WITH (connector = 'kafka', table = 'a.b.c', colour = 'red')",
        )
        .unwrap_err();
        let all = e.join("\n");
        for needle in ["only 'postgres'", "'schema.table'", "colour", "connection"] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
        assert!(parse("CREATE SINK x").is_err());
        assert!(parse("CREATE SINK x FROM v").is_err());
        assert!(parse("CREATE SINK 1x FROM v WITH (connector = 'postgres')").is_err());
    }
}
