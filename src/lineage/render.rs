//! The lineage graph as text: JSON (the contract), Mermaid (`flowchart LR`,
//! renders on GitHub), Graphviz DOT, and OpenLineage run events with the
//! `columnLineage` facet. All of it deterministic: same pipelines, same bytes.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{json, Value};

use super::{node_of, ColumnEdge, Graph, Node, NodeKind};
use crate::plan::lineage::EdgeKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Mermaid,
    Dot,
    OpenLineage,
    /// The docs' drawing: boxes link to `<kind>-<name>.html` docs pages.
    Svg,
}

impl Format {
    pub fn parse(text: &str) -> Result<Format, String> {
        match text.to_ascii_lowercase().as_str() {
            "json" => Ok(Format::Json),
            "mermaid" => Ok(Format::Mermaid),
            "dot" => Ok(Format::Dot),
            "openlineage" => Ok(Format::OpenLineage),
            "svg" => Ok(Format::Svg),
            other => Err(format!(
                "unknown format {other:?}: json, mermaid, dot, openlineage or svg"
            )),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json | Format::OpenLineage => "application/json",
            Format::Mermaid | Format::Dot => "text/plain; charset=utf-8",
            Format::Svg => "image/svg+xml",
        }
    }
}

/// `columns`: draw every column and column edge (Mermaid and DOT; JSON and
/// OpenLineage always carry them).
pub fn render(graph: &Graph, format: Format, columns: bool) -> String {
    match format {
        Format::Json => to_json(graph),
        Format::Mermaid => to_mermaid(graph, columns),
        Format::Dot => to_dot(graph, columns),
        Format::Svg => crate::docs::svg::draw(graph) + "\n",
        Format::OpenLineage => {
            let events = to_openlineage(graph, &crate::obs::format_time(crate::obs::now_ms()));
            serde_json::to_string_pretty(&events).unwrap_or_default() + "\n"
        }
    }
}

pub fn to_json(graph: &Graph) -> String {
    serde_json::to_string_pretty(graph).unwrap_or_default() + "\n"
}

fn label(n: &Node) -> String {
    match n.kind {
        NodeKind::View => match &n.window {
            Some(w) => format!("{}\n{}", n.name, w),
            None => format!(
                "{}\n{}",
                n.name,
                n.shape.map(|s| s.to_string()).unwrap_or_default()
            ),
        },
        NodeKind::Alert => match &n.rule {
            Some(r) => format!("{}\n{}", n.name, r.severity),
            None => n.name.clone(),
        },
        NodeKind::Sink => format!("{}\n{}", n.name, n.target.as_deref().unwrap_or("")),
        _ => n.name.clone(),
    }
}

/// Short ids for Mermaid and DOT: `n0`, `n1`, ... in the graph's sorted order.
fn short_ids(graph: &Graph) -> BTreeMap<&str, String> {
    graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), format!("n{i}")))
        .collect()
}

fn mermaid_text(s: &str) -> String {
    s.replace('"', "#quot;").replace('\n', "<br/>")
}

pub fn to_mermaid(graph: &Graph, columns: bool) -> String {
    let ids = short_ids(graph);
    let mut out = String::from("flowchart LR\n");
    for n in &graph.nodes {
        let id = &ids[n.id.as_str()];
        let text = mermaid_text(&format!("{}: {}", n.kind.as_str(), label(n)));
        if columns && !n.columns.is_empty() {
            let _ = writeln!(out, "  subgraph {id}[\"{text}\"]");
            for (i, c) in n.columns.iter().enumerate() {
                let _ = writeln!(out, "    {id}_{i}[\"{}\"]", mermaid_text(&c.name));
            }
            let _ = writeln!(out, "  end");
        } else {
            let shape = match n.kind {
                NodeKind::Topic => format!("{id}>\"{text}\"]"),
                NodeKind::Postgres => format!("{id}[(\"{text}\")]"),
                NodeKind::Table => format!("{id}[[\"{text}\"]]"),
                NodeKind::Stream => format!("{id}[(\"{text}\")]"),
                NodeKind::View => format!("{id}[\"{text}\"]"),
                NodeKind::Alert => format!("{id}{{{{\"{text}\"}}}}"),
                NodeKind::Sink => format!("{id}[/\"{text}\"/]"),
            };
            let _ = writeln!(out, "  {shape}");
        }
        let _ = writeln!(out, "  class {id} {}", n.kind.as_str());
    }
    if columns {
        for (from, to, kind) in column_edges(graph, &ids) {
            let arrow = if kind == EdgeKind::Filter {
                "-.->"
            } else {
                "-->"
            };
            let _ = writeln!(out, "  {from} {arrow}|{}| {to}", kind.as_str());
        }
    } else {
        for e in &graph.edges {
            if let (Some(from), Some(to)) = (ids.get(e.from.as_str()), ids.get(e.to.as_str())) {
                let _ = writeln!(out, "  {from} --> {to}");
            }
        }
    }
    out.push_str(
        "  classDef topic fill:#eef,stroke:#669\n  classDef stream fill:#e8f4ff,stroke:#369\n  classDef view fill:#efe,stroke:#393\n  classDef alert fill:#fee,stroke:#c33\n  classDef sink fill:#f6f6f6,stroke:#666\n  classDef postgres fill:#f2ecff,stroke:#6a4fa3\n  classDef table fill:#fff6e0,stroke:#a57a1f\n",
    );
    out
}

/// The column edges as (from, to, kind) in short ids, for the diagrams.
fn column_edges<'g>(
    graph: &'g Graph,
    ids: &'g BTreeMap<&str, String>,
) -> impl Iterator<Item = (String, String, EdgeKind)> + 'g {
    graph.columns.iter().filter_map(move |c| {
        Some((
            column_ref(graph, ids, &c.from)?,
            column_ref(graph, ids, &c.to)?,
            c.kind,
        ))
    })
}

/// `n3_2` for `view:x.col` (the node's short id and the column's position),
/// or the node's short id for a bare node id.
fn column_ref(graph: &Graph, ids: &BTreeMap<&str, String>, r: &str) -> Option<String> {
    let node = node_of(r);
    let id = ids.get(node)?;
    if node.len() == r.len() {
        return Some(id.clone());
    }
    let column = &r[node.len() + 1..];
    let n = graph.node(node)?;
    let i = n.columns.iter().position(|c| c.name == column)?;
    Some(format!("{id}_{i}"))
}

fn dot_text(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn to_dot(graph: &Graph, columns: bool) -> String {
    let ids = short_ids(graph);
    let mut out = String::from(
        "digraph lineage {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=11];\n  edge [color=\"#555555\", fontname=\"Helvetica\", fontsize=9];\n",
    );
    for n in &graph.nodes {
        let id = &ids[n.id.as_str()];
        let (shape, fill) = style(n.kind);
        let text = dot_text(&format!("{}: {}", n.kind.as_str(), label(n)));
        if columns && !n.columns.is_empty() {
            let _ = writeln!(
                out,
                "  subgraph cluster_{id} {{\n    label=\"{text}\";\n    style=\"rounded,filled\";\n    fillcolor=\"{fill}\";\n    {id} [label=\"rows\", shape=point];"
            );
            for (i, c) in n.columns.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "    {id}_{i} [label=\"{}\", fillcolor=\"#ffffff\"];",
                    dot_text(&c.name)
                );
            }
            out.push_str("  }\n");
        } else {
            let _ = writeln!(
                out,
                "  {id} [label=\"{text}\", shape={shape}, fillcolor=\"{fill}\"];"
            );
        }
    }
    if columns {
        for (from, to, kind) in column_edges(graph, &ids) {
            let dashed = if kind == EdgeKind::Filter {
                ", style=dashed"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {from} -> {to} [label=\"{}\"{dashed}];",
                kind.as_str()
            );
        }
    } else {
        for e in &graph.edges {
            if let (Some(from), Some(to)) = (ids.get(e.from.as_str()), ids.get(e.to.as_str())) {
                let _ = writeln!(out, "  {from} -> {to};");
            }
        }
    }
    out.push_str("}\n");
    out
}

/// Graphviz shape and fill of a kind (the fill is the SVG's too).
fn style(k: NodeKind) -> (&'static str, &'static str) {
    let shape = match k {
        NodeKind::Topic => "cds",
        NodeKind::Postgres => "cylinder",
        NodeKind::Table => "box3d",
        NodeKind::Stream => "cylinder",
        NodeKind::View => "box",
        NodeKind::Alert => "hexagon",
        NodeKind::Sink => "parallelogram",
    };
    (shape, k.colours().0)
}

pub const PRODUCER: &str = "https://github.com/weir-dev/weir";
const SCHEMA_URL: &str = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";
const COLUMN_LINEAGE_URL: &str =
    "https://openlineage.io/spec/facets/1-2-0/ColumnLineageDatasetFacet.json#/$defs/ColumnLineageDatasetFacet";
const SCHEMA_FACET_URL: &str =
    "https://openlineage.io/spec/facets/1-2-0/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet";
const SQL_FACET_URL: &str =
    "https://openlineage.io/spec/facets/1-1-0/SQLJobFacet.json#/$defs/SQLJobFacet";
const NAMESPACE: &str = "weir";

/// A stable run id (UUID text) for a job: its name hashed, so the same
/// pipeline gives the same ids.
fn run_id(name: &str) -> String {
    let a = crate::plan::fingerprint(&[name, "a"]);
    let b = crate::plan::fingerprint(&[name, "b"]);
    let hex = format!("{a:016x}{b:016x}");
    // version 4 and variant bits, so validators accept it as a UUID
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

fn transformation(kind: EdgeKind) -> Value {
    let (t, subtype) = match kind {
        EdgeKind::Direct => ("DIRECT", "IDENTITY"),
        EdgeKind::Transform => ("DIRECT", "TRANSFORMATION"),
        EdgeKind::Aggregate => ("DIRECT", "AGGREGATION"),
        EdgeKind::Key => ("INDIRECT", "GROUP_BY"),
        EdgeKind::Filter => ("INDIRECT", "FILTER"),
    };
    json!({"type": t, "subtype": subtype})
}

fn dataset(n: &Node) -> Value {
    json!({"namespace": NAMESPACE, "name": n.id})
}

/// One OpenLineage `RUNNING` event per view and alert (a continuous job),
/// its inputs, and its output dataset with the schema and `columnLineage`
/// facets.
pub fn to_openlineage(graph: &Graph, event_time: &str) -> Vec<Value> {
    let mut events = Vec::new();
    for n in graph
        .nodes
        .iter()
        .filter(|n| matches!(n.kind, NodeKind::View | NodeKind::Alert))
    {
        let (inputs, _) = graph.neighbours(&n.id);
        let inputs: Vec<Value> = inputs
            .iter()
            .filter_map(|i| graph.node(i))
            .map(dataset)
            .collect();
        let mut fields = serde_json::Map::new();
        for c in &n.columns {
            let edges = graph.column_sources(&n.id, Some(&c.name));
            if edges.is_empty() {
                continue;
            }
            let input_fields: Vec<Value> = edges
                .iter()
                .map(|e: &&ColumnEdge| {
                    let node = node_of(&e.from);
                    json!({"namespace": NAMESPACE, "name": node, "field": &e.from[node.len() + 1..],
                           "transformations": [transformation(e.kind)]})
                })
                .collect();
            fields.insert(c.name.clone(), json!({"inputFields": input_fields}));
        }
        let row_filters: Vec<Value> = graph
            .column_sources(&n.id, None)
            .iter()
            .map(|e| {
                let node = node_of(&e.from);
                json!({"namespace": NAMESPACE, "name": node, "field": &e.from[node.len() + 1..],
                       "transformations": [transformation(e.kind)]})
            })
            .collect();
        let schema_fields: Vec<Value> = n
            .columns
            .iter()
            .map(|c| {
                let mut f = json!({"name": c.name, "type": c.data_type});
                if !c.doc.is_empty() {
                    f["description"] = json!(c.doc);
                }
                f
            })
            .collect();
        let mut column_lineage =
            json!({"_producer": PRODUCER, "_schemaURL": COLUMN_LINEAGE_URL, "fields": fields});
        if !row_filters.is_empty() {
            column_lineage["dataset"] = json!(row_filters);
        }
        events.push(json!({
            "eventType": "RUNNING",
            "eventTime": event_time,
            "producer": PRODUCER,
            "schemaURL": SCHEMA_URL,
            "run": {"runId": run_id(&n.id)},
            "job": {
                "namespace": NAMESPACE,
                "name": n.id,
                "facets": {"sql": {"_producer": PRODUCER, "_schemaURL": SQL_FACET_URL,
                                   "query": n.sql.clone().unwrap_or_default()}}
            },
            "inputs": inputs,
            "outputs": [{
                "namespace": NAMESPACE,
                "name": n.id,
                "facets": {
                    "schema": {"_producer": PRODUCER, "_schemaURL": SCHEMA_FACET_URL, "fields": schema_fields},
                    "columnLineage": column_lineage
                }
            }]
        }));
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_stable_uuids() {
        let id = run_id("view:x");
        assert_eq!(id, run_id("view:x"));
        assert_ne!(id, run_id("view:y"));
        let parts: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(parts, vec![8, 4, 4, 4, 12]);
        assert_eq!(&id[14..15], "4");
    }

    #[test]
    fn formats_parse() {
        assert_eq!(Format::parse("DOT"), Ok(Format::Dot));
        assert_eq!(Format::parse("svg"), Ok(Format::Svg));
        assert!(Format::parse("png").is_err());
    }
}
