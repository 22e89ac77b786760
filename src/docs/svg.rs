//! The lineage graph as an inline SVG: one column per depth (topics, then
//! streams, then each level of views, alerts and sinks), boxes linking to
//! their pages, curved edges. Small and self-contained, so the docs work
//! offline and without Graphviz.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{esc, page_of};
use crate::lineage::Graph;

const BOX_W: i64 = 210;
const BOX_H: i64 = 44;
const GAP_X: i64 = 60;
const GAP_Y: i64 = 16;
const PAD: i64 = 10;

/// Depth of each node: the longest path from a node with no inputs.
fn depths(graph: &Graph) -> BTreeMap<&str, i64> {
    let mut depth: BTreeMap<&str, i64> = graph.nodes.iter().map(|n| (n.id.as_str(), 0)).collect();
    // the graph is acyclic; as many rounds as nodes settle every depth
    for _ in 0..graph.nodes.len() {
        let mut moved = false;
        for e in &graph.edges {
            let from = depth.get(e.from.as_str()).copied().unwrap_or(0);
            if let Some(d) = depth.get_mut(e.to.as_str()) {
                if *d < from + 1 {
                    *d = from + 1;
                    moved = true;
                }
            }
        }
        if !moved {
            break;
        }
    }
    depth
}

pub fn draw(graph: &Graph) -> String {
    let depth = depths(graph);
    let mut rows: BTreeMap<i64, i64> = BTreeMap::new();
    let mut at: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for n in &graph.nodes {
        let d = depth.get(n.id.as_str()).copied().unwrap_or(0);
        let row = rows.entry(d).or_insert(0);
        at.insert(
            n.id.as_str(),
            (PAD + d * (BOX_W + GAP_X), PAD + *row * (BOX_H + GAP_Y)),
        );
        *row += 1;
    }
    let width = PAD * 2 + (rows.keys().max().copied().unwrap_or(0) + 1) * (BOX_W + GAP_X) - GAP_X;
    let height = PAD * 2 + rows.values().max().copied().unwrap_or(1) * (BOX_H + GAP_Y) - GAP_Y;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"lineage\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"system-ui,Helvetica,Arial,sans-serif\" role=\"img\" aria-label=\"lineage graph\">\n"
    );
    for e in &graph.edges {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (at.get(e.from.as_str()), at.get(e.to.as_str()))
        else {
            continue;
        };
        let (sx, sy, tx, ty) = (x1 + BOX_W, y1 + BOX_H / 2, x2, y2 + BOX_H / 2);
        let mid = (sx + tx) / 2;
        let _ = writeln!(
            out,
            "<path class=\"edge\" d=\"M{sx},{sy} C{mid},{sy} {mid},{ty} {tx},{ty}\" fill=\"none\" stroke=\"#8a94a3\" stroke-width=\"1.3\"/>"
        );
    }
    for n in &graph.nodes {
        let Some(&(x, y)) = at.get(n.id.as_str()) else {
            continue;
        };
        let (bg, stroke) = n.kind.colours();
        let mut name = n.name.clone();
        if name.chars().count() > 30 {
            name = name.chars().take(29).collect::<String>() + "…";
        }
        let subtitle = n
            .window
            .clone()
            .or_else(|| n.rule.as_ref().map(|r| r.severity.clone()))
            .or_else(|| n.shape.map(|s| s.to_string()))
            .unwrap_or_default();
        let node = format!(
            "<g class=\"node\" data-id=\"{id}\"><title>{id}</title><rect x=\"{x}\" y=\"{y}\" width=\"{BOX_W}\" height=\"{BOX_H}\" rx=\"6\" fill=\"{bg}\" stroke=\"{stroke}\"/><text x=\"{tx}\" y=\"{ty1}\" font-size=\"12\" fill=\"#1d2430\"><tspan fill=\"{stroke}\">{kind}</tspan> {name}</text><text x=\"{tx}\" y=\"{ty2}\" font-size=\"11\" fill=\"#667\">{sub}</text></g>",
            id = esc(&n.id),
            tx = x + 8,
            ty1 = y + 18,
            ty2 = y + 34,
            kind = n.kind.as_str(),
            name = esc(&name),
            sub = esc(&subtitle),
        );
        match page_of(n) {
            Some(page) => {
                let _ = writeln!(out, "<a href=\"{page}\">{node}</a>");
            }
            None => {
                let _ = writeln!(out, "{node}");
            }
        }
    }
    out.push_str("</svg>");
    out
}
