//! Lineage: the graph of where every row and column comes from, from MQTT
//! topic to alert notification (DESIGN §6 "Lineage").
//!
//! [`build`] reads a planned [`Pipeline`] — each view's and rule's column
//! lineage was traced from DataFusion's logical plan by
//! `plan::lineage` — and the alert notification config, and makes one
//! [`Graph`]: nodes (topics, streams, views, alerts, sinks), relation edges,
//! and column edges of the kinds `direct`, `key`, `transform`, `aggregate`
//! and `filter`. Everything is sorted, so the output diffs cleanly.
//! [`render`] writes it as JSON, Mermaid, Graphviz DOT or OpenLineage events.

pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::config::AlertsConfig;
use crate::plan::lineage::{ColumnLineage, EdgeKind};
use crate::plan::{AlertPlan, Pipeline, Upstream, ViewPlan, ViewShape};

/// One node: a topic, stream, view, alert or sink.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// `topic:<filter>`, `stream:<name>`, `view:<name>`, `alert:<name>`, `sink:<name>`.
    pub id: String,
    pub kind: NodeKind,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub doc: String,
    /// The statement (streams, views, alerts); kept out of the JSON, which
    /// points at file and line instead.
    #[serde(skip)]
    pub sql: Option<String>,
    /// Views: `windowed`, `updating` or `filter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<ViewShape>,
    /// Windowed views: `tumble(1 minute)`, `hop(1 minute, 5 minutes)`, `session(2 minutes)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// Streams: the topic pattern; sinks: where notifications go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Streams: the event-time column and the watermark bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    /// Alerts: severity, condition, clear and timing, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleInfo>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<ColumnInfo>,
}

impl Node {
    /// A node with nothing but its identity; the builders fill in the rest.
    fn new(kind: NodeKind, id: String, name: String) -> Node {
        Node {
            id,
            kind,
            name,
            file: None,
            line: None,
            doc: String::new(),
            sql: None,
            shape: None,
            window: None,
            keys: vec![],
            target: None,
            event_time: None,
            rule: None,
            columns: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Topic,
    /// A Postgres table a reference table follows (`postgres:<connection>/<table>`).
    Postgres,
    Stream,
    /// A reference table (`table:<name>`).
    Table,
    View,
    Alert,
    Sink,
}

impl NodeKind {
    /// Fill and stroke colours of this kind in every drawing (SVG, DOT).
    pub fn colours(self) -> (&'static str, &'static str) {
        match self {
            NodeKind::Topic => ("#eeeeff", "#6b6fa8"),
            NodeKind::Postgres => ("#f2ecff", "#6a4fa3"),
            NodeKind::Table => ("#fff6e0", "#a57a1f"),
            NodeKind::Stream => ("#e8f4ff", "#3a6ea5"),
            NodeKind::View => ("#eeffee", "#3c8d52"),
            NodeKind::Alert => ("#ffeeee", "#c0392b"),
            NodeKind::Sink => ("#f6f6f6", "#777777"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Topic => "topic",
            NodeKind::Postgres => "postgres",
            NodeKind::Table => "table",
            NodeKind::Stream => "stream",
            NodeKind::View => "view",
            NodeKind::Alert => "alert",
            NodeKind::Sink => "sink",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub doc: String,
}

/// An alert rule's semantics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleInfo {
    pub severity: String,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clear: Option<String>,
    /// "fires when battery_pct < 15 holds for 1 minute; resolves at battery_pct >= 20".
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
}

/// A column edge: `from` and `to` are `<node id>.<column>`; a `filter` edge
/// whose `to` is a bare node id decides which of that node's rows exist.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ColumnEdge {
    pub from: String,
    pub to: String,
    pub kind: EdgeKind,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub columns: Vec<ColumnEdge>,
}

/// Which side of a node to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Upstream,
    Downstream,
    Both,
}

pub fn topic_id(filter: &str) -> String {
    format!("topic:{filter}")
}

fn upstream_id(u: &Upstream) -> String {
    match u {
        Upstream::Stream(s) => format!("stream:{s}"),
        Upstream::View(v) => format!("view:{v}"),
    }
}

fn columns_of(
    schema: &datafusion::arrow::datatypes::Schema,
    docs: &BTreeMap<String, String>,
) -> Vec<ColumnInfo> {
    schema
        .fields()
        .iter()
        .map(|f| ColumnInfo {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            doc: docs.get(f.name()).cloned().unwrap_or_default(),
        })
        .collect()
}

fn words(ms: i64) -> String {
    crate::config::format_duration_words(Duration::from_millis(ms.max(0) as u64))
}

/// Arroyo-style window text: `tumble(1 minute)`.
pub fn window_text(w: &crate::window::WindowSpec) -> String {
    use crate::window::WindowSpec;
    match *w {
        WindowSpec::Tumble { size_ms } => format!("tumble({})", words(size_ms)),
        WindowSpec::Hop { slide_ms, size_ms } => {
            format!("hop({}, {})", words(slide_ms), words(size_ms))
        }
        WindowSpec::Session { gap_ms } => format!("session({})", words(gap_ms)),
    }
}

/// What a rule does, in words.
pub fn rule_summary(a: &AlertPlan) -> String {
    let t = &a.timing;
    let mut s = match (t.absent_for_ms, &a.condition_sql) {
        (Some(absent), _) => format!(
            "fires when a {} that has reported sends nothing for {}; resolves when it reports again",
            a.key_column,
            words(absent)
        ),
        (None, Some(c)) if t.for_ms > 0 => {
            format!("fires when {c} holds for {}", words(t.for_ms))
        }
        (None, Some(c)) => format!("fires when {c}"),
        (None, None) if t.for_ms > 0 => format!("fires on rows that keep coming for {}", words(t.for_ms)),
        (None, None) => "fires on every row".to_string(),
    };
    if t.absent_for_ms.is_none() {
        match &a.clear_sql {
            Some(c) => s.push_str(&format!("; resolves at {c}")),
            None => s.push_str("; resolves when a row no longer matches"),
        }
    }
    if let Some(r) = t.reopen_after_ms {
        s.push_str(&format!("; after resolving, stays quiet for {}", words(r)));
    }
    format!("{s} (one alert per {})", a.key_column)
}

/// The lineage graph of a pipeline and where its alerts are delivered.
pub fn build(pipeline: &Pipeline, alerts: &AlertsConfig) -> Graph {
    let mut g = Graph::default();
    for s in &pipeline.streams {
        let id = format!("stream:{}", s.name);
        let topic = topic_id(&s.topic.filter());
        g.nodes.push(Node {
            columns: s
                .topic
                .bindings()
                .map(|b| ColumnInfo {
                    name: b.to_string(),
                    data_type: "topic level".into(),
                    doc: String::new(),
                })
                .collect(),
            ..Node::new(NodeKind::Topic, topic.clone(), s.topic.filter())
        });
        g.edges.push(Edge {
            from: topic.clone(),
            to: id.clone(),
        });
        for b in s.topic.bindings() {
            g.columns.push(ColumnEdge {
                from: format!("{topic}.{b}"),
                to: format!("{id}.{b}"),
                kind: EdgeKind::Direct,
            });
        }
        g.nodes.push(Node {
            file: Some(s.file.clone()),
            line: Some(s.line),
            doc: s.doc.clone(),
            sql: Some(s.sql.clone()),
            target: Some(s.topic.as_str().to_string()),
            event_time: Some(match &s.event_time.column {
                Some(c) => format!("{c}, watermark {} behind", words(s.event_time.bound_ms)),
                None => "arrival time".into(),
            }),
            columns: columns_of(&s.schema, &s.column_docs),
            ..Node::new(NodeKind::Stream, id, s.name.clone())
        });
    }
    for t in &pipeline.tables {
        let source = t.source_node();
        let id = format!("table:{}", t.name);
        g.nodes.push(Node {
            target: Some(t.pg_table.clone()),
            columns: columns_of(&t.schema, &BTreeMap::new()),
            ..Node::new(
                NodeKind::Postgres,
                source.clone(),
                format!("{}/{}", t.connection, t.pg_table),
            )
        });
        g.edges.push(Edge {
            from: source.clone(),
            to: id.clone(),
        });
        for f in t.schema.fields() {
            g.columns.push(ColumnEdge {
                from: format!("{source}.{}", f.name()),
                to: format!("{id}.{}", f.name()),
                kind: EdgeKind::Direct,
            });
        }
        g.nodes.push(Node {
            file: Some(t.file.clone()),
            line: Some(t.line),
            doc: t.doc.clone(),
            sql: Some(t.sql.clone()),
            keys: vec![t.key.clone()],
            target: Some(t.source_node()),
            columns: columns_of(&t.schema, &t.column_docs),
            ..Node::new(NodeKind::Table, id, t.name.clone())
        });
    }
    for v in &pipeline.views {
        add_view(&mut g, pipeline, v);
    }
    for a in &pipeline.alerts {
        add_alert(&mut g, a);
    }
    add_sinks(&mut g, pipeline, alerts);
    add_postgres_sinks(&mut g, pipeline);
    g.sort();
    g
}

/// The event-time column a view's window bounds come from: the root stream's.
fn event_time_source(pipeline: &Pipeline, v: &ViewPlan) -> Option<String> {
    let s = pipeline.root_stream(v)?;
    s.event_time
        .column
        .as_ref()
        .map(|c| format!("stream:{}.{c}", s.name))
}

fn lineage_edges(
    g: &mut Graph,
    from_node: &str,
    to_node: &str,
    names: &[String],
    lineage: &[ColumnLineage],
) {
    for (name, column) in names.iter().zip(lineage) {
        let to = format!("{to_node}.{name}");
        for (source, kind) in &column.sources {
            g.columns.push(ColumnEdge {
                from: column_ref(from_node, source),
                to: to.clone(),
                kind: *kind,
            });
        }
        for source in &column.filters {
            g.columns.push(ColumnEdge {
                from: column_ref(from_node, source),
                to: to.clone(),
                kind: EdgeKind::Filter,
            });
        }
    }
}

/// A traced source column as a column ref: a joined table's columns are
/// traced as `table:<name>.<column>` already; the rest are `from_node`'s.
fn column_ref(from_node: &str, source: &str) -> String {
    if source.starts_with("table:") || source.starts_with("view:") {
        source.to_string()
    } else {
        format!("{from_node}.{source}")
    }
}

fn add_view(g: &mut Graph, pipeline: &Pipeline, v: &ViewPlan) {
    let id = format!("view:{}", v.name);
    let from = upstream_id(&v.upstream);
    g.edges.push(Edge {
        from: from.clone(),
        to: id.clone(),
    });
    for t in &v.lookups {
        let kind = if pipeline.table(t).is_some() {
            "table"
        } else {
            "view"
        };
        g.edges.push(Edge {
            from: format!("{kind}:{t}"),
            to: id.clone(),
        });
    }
    // what a lookup join matches on decides which rows meet which
    for key in &v.join_keys {
        g.columns.push(ColumnEdge {
            from: column_ref(&from, key),
            to: id.clone(),
            kind: EdgeKind::Key,
        });
    }
    let names: Vec<String> = v
        .output_schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    lineage_edges(g, &from, &id, &names, &v.column_lineage);
    if let (Some(_), Some(ts)) = (v.window(), event_time_source(pipeline, v)) {
        for bound in ["window_start", "window_end"] {
            g.columns.push(ColumnEdge {
                from: ts.clone(),
                to: format!("{id}.{bound}"),
                kind: EdgeKind::Key,
            });
        }
    }
    for source in &v.row_filters {
        g.columns.push(ColumnEdge {
            from: column_ref(&from, source),
            to: id.clone(),
            kind: EdgeKind::Filter,
        });
    }
    g.nodes.push(Node {
        file: Some(v.file.clone()),
        line: Some(v.line),
        doc: v.doc.clone(),
        sql: Some(v.sql.clone()),
        shape: Some(v.shape),
        window: v.window().map(|w| window_text(&w)),
        keys: v.key_columns.clone(),
        columns: columns_of(&v.output_schema, &v.column_docs),
        ..Node::new(NodeKind::View, id, v.name.clone())
    });
}

fn add_alert(g: &mut Graph, a: &AlertPlan) {
    let id = format!("alert:{}", a.name);
    let from = upstream_id(&a.upstream);
    g.edges.push(Edge {
        from: from.clone(),
        to: id.clone(),
    });
    let names: Vec<String> = a
        .output_schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut lineage = a.column_lineage.clone();
    // the key column identifies the alert: a key edge, not a copy
    if let Some(key) = lineage.get_mut(a.key_index) {
        for kind in key.sources.values_mut() {
            *kind = (*kind).max(EdgeKind::Key);
        }
    }
    lineage_edges(g, &from, &id, &names, &lineage);
    for source in a.condition_columns.iter().chain(&a.clear_columns) {
        g.columns.push(ColumnEdge {
            from: format!("{from}.{source}"),
            to: id.clone(),
            kind: EdgeKind::Filter,
        });
    }
    g.nodes.push(Node {
        file: Some(a.file.clone()),
        line: Some(a.line),
        doc: a.doc.clone(),
        sql: Some(a.sql.clone()),
        keys: vec![a.key_column.clone()],
        rule: Some(RuleInfo {
            severity: a.severity.as_str().to_string(),
            key: a.key_column.clone(),
            condition: a.condition_sql.clone(),
            clear: a.clear_sql.clone(),
            summary: rule_summary(a),
        }),
        columns: columns_of(&a.output_schema, &a.column_docs),
        ..Node::new(NodeKind::Alert, id, a.name.clone())
    });
}

/// A webhook URL without credentials or query: enough to recognise it.
fn safe_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    if scheme.is_empty() {
        rest.to_string()
    } else {
        format!("{scheme}://{rest}")
    }
}

/// Postgres sinks: `view -> sink:<name>`, every column delivered as is.
fn add_postgres_sinks(g: &mut Graph, pipeline: &Pipeline) {
    for s in &pipeline.sinks {
        let id = format!("sink:{}", s.name);
        let from = match s.from_alert {
            true => format!("alert:{}", s.from),
            false => format!("view:{}", s.from),
        };
        g.edges.push(Edge {
            from: from.clone(),
            to: id.clone(),
        });
        let columns = match s.from_alert {
            // an alert rule's records, not columns of its node
            true => Vec::new(),
            false => pipeline
                .view(&s.from)
                .map(|v| columns_of(&v.output_schema, &v.column_docs))
                .unwrap_or_default(),
        };
        for c in &columns {
            g.columns.push(ColumnEdge {
                from: format!("{from}.{}", c.name),
                to: format!("{id}.{}", c.name),
                kind: EdgeKind::Direct,
            });
        }
        g.nodes.push(Node {
            file: Some(s.file.clone()),
            line: Some(s.line),
            doc: s.doc.clone(),
            sql: Some(s.sql.clone()),
            keys: s.key_columns.clone(),
            target: Some(s.target()),
            columns,
            ..Node::new(NodeKind::Sink, id, s.name.clone())
        });
    }
}

fn add_sinks(g: &mut Graph, pipeline: &Pipeline, alerts: &AlertsConfig) {
    let sink = |name: &str, target: String, doc: &str| Node {
        doc: doc.to_string(),
        target: Some(target),
        ..Node::new(NodeKind::Sink, format!("sink:{name}"), name.to_string())
    };
    if pipeline.alerts.is_empty() {
        return;
    }
    // every alert change goes to the SSE stream; the MQTT topic when enabled
    if alerts.mqtt {
        g.nodes.push(sink(
            "mqtt",
            "weir/alerts/{rule}/{key}".into(),
            "Every alert change, retained, on weir's MQTT broker.",
        ));
        for a in &pipeline.alerts {
            g.edges.push(Edge {
                from: format!("alert:{}", a.name),
                to: "sink:mqtt".into(),
            });
        }
    }
    for (i, w) in alerts.webhook.iter().enumerate() {
        let name = w.name.clone().unwrap_or_else(|| format!("webhook{i}"));
        g.nodes.push(sink(
            &name,
            safe_url(&w.url),
            "Every alert change of its rules, POSTed as JSON.",
        ));
        for a in &pipeline.alerts {
            if w.rules.is_empty() || w.rules.iter().any(|r| r == &a.name) {
                g.edges.push(Edge {
                    from: format!("alert:{}", a.name),
                    to: format!("sink:{name}"),
                });
            }
        }
    }
}

/// The node id part of a column reference `<node id>.<column>`.
pub fn node_of(column_ref: &str) -> &str {
    match column_ref.rfind('.') {
        // a topic filter may hold dots; a column name never does
        Some(i) if !column_ref[i + 1..].contains('/') => &column_ref[..i],
        _ => column_ref,
    }
}

impl Graph {
    fn sort(&mut self) {
        self.nodes
            .sort_by(|a, b| (a.kind, &a.id).cmp(&(b.kind, &b.id)));
        self.nodes.dedup_by(|a, b| a.id == b.id);
        self.edges.sort();
        self.edges.dedup();
        self.columns.sort();
        self.columns.dedup();
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Finds a node by id (`view:x`) or by name (`x`, when only one node has it).
    pub fn resolve(&self, name: &str) -> Result<&Node, String> {
        if let Some(n) = self.node(name) {
            return Ok(n);
        }
        let found: Vec<&Node> = self.nodes.iter().filter(|n| n.name == name).collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] => Err(format!(
                "no stream, view, alert, topic or sink is named {name:?}"
            )),
            many => Err(format!(
                "{name:?} is ambiguous: {}",
                many.iter()
                    .map(|n| n.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Node ids reachable from `start` along the edges (forward) or against them.
    fn reach(&self, start: &str, forward: bool) -> BTreeSet<String> {
        let mut seen = BTreeSet::from([start.to_string()]);
        let mut todo = vec![start.to_string()];
        while let Some(at) = todo.pop() {
            for e in &self.edges {
                let (here, next) = if forward {
                    (&e.from, &e.to)
                } else {
                    (&e.to, &e.from)
                };
                if *here == at && seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    }

    /// The part of the graph upstream of, downstream of, or around one node.
    pub fn around(&self, id: &str, direction: Direction) -> Graph {
        let mut keep = BTreeSet::new();
        if direction != Direction::Downstream {
            keep.extend(self.reach(id, false));
        }
        if direction != Direction::Upstream {
            keep.extend(self.reach(id, true));
        }
        Graph {
            nodes: self
                .nodes
                .iter()
                .filter(|n| keep.contains(&n.id))
                .cloned()
                .collect(),
            edges: self
                .edges
                .iter()
                .filter(|e| keep.contains(&e.from) && keep.contains(&e.to))
                .cloned()
                .collect(),
            columns: self
                .columns
                .iter()
                .filter(|c| keep.contains(node_of(&c.from)) && keep.contains(node_of(&c.to)))
                .cloned()
                .collect(),
        }
    }

    /// Direct neighbours of a node: (upstream ids, downstream ids).
    pub fn neighbours(&self, id: &str) -> (Vec<&str>, Vec<&str>) {
        let up = self
            .edges
            .iter()
            .filter(|e| e.to == id)
            .map(|e| e.from.as_str())
            .collect();
        let down = self
            .edges
            .iter()
            .filter(|e| e.from == id)
            .map(|e| e.to.as_str())
            .collect();
        (up, down)
    }

    /// Column edges into `<id>.<column>`, and filter edges into `id` itself.
    pub fn column_sources(&self, id: &str, column: Option<&str>) -> Vec<&ColumnEdge> {
        let to = match column {
            Some(c) => format!("{id}.{c}"),
            None => id.to_string(),
        };
        self.columns.iter().filter(|c| c.to == to).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_refs_split_at_the_last_dot_of_a_node() {
        assert_eq!(node_of("stream:telemetry.ts"), "stream:telemetry");
        assert_eq!(node_of("topic:site.a/+/t.terminal_id"), "topic:site.a/+/t");
        assert_eq!(node_of("topic:site.a/+/t"), "topic:site.a/+/t");
        assert_eq!(node_of("view:v"), "view:v");
    }

    #[test]
    fn webhook_urls_lose_credentials_and_query() {
        assert_eq!(
            safe_url("https://u:p@hooks.example.com/a?token=x"),
            "https://hooks.example.com/a"
        );
        assert_eq!(safe_url("http://h:8080/x"), "http://h:8080/x");
    }
}
