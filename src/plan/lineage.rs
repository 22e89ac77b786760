//! Column lineage of one planned statement, read from DataFusion's logical
//! plan (never from the SQL text): for every output column, the columns of
//! the scanned relation it is computed from and how (DESIGN §6 "Lineage").
//!
//! The plan is walked bottom-up. Each node's output columns carry the set of
//! scanned columns they come from, each with the strongest kind met on the
//! way up (`direct` < `key` < `transform` < `aggregate`): `sum(x) / 100` is an
//! aggregate of `x`, `upper(k)` over a group key `k` is a transform of it.
//! Columns read by a `WHERE` or `HAVING` decide which rows pass at all
//! (`row_filters`); columns read by an aggregate's `FILTER (WHERE ...)` decide
//! what that one output column counts (`Column::filters`).
//!
//! The same pass also finds the `--` comments written directly above a column
//! of a `CREATE TABLE` or an item of a `SELECT` list: the column's documentation.

use std::collections::{BTreeMap, BTreeSet};

use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::sqlparser::ast::{
    ColumnDef, Expr as SqlExpr, Query, SelectItem, SetExpr, Spanned,
};
use serde::Serialize;

/// How a column is derived from another (DESIGN §6). The order is strength:
/// a chain of derivations has the kind of its strongest step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKind {
    /// Copied or renamed.
    Direct,
    /// A `GROUP BY` column (or the window, from the event-time column).
    Key,
    /// A scalar expression.
    Transform,
    /// An aggregate.
    Aggregate,
    /// Read by a `WHERE`, `HAVING`, `FILTER` or `clear`: decides which rows count.
    Filter,
}

impl EdgeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Direct => "direct",
            EdgeKind::Key => "key",
            EdgeKind::Transform => "transform",
            EdgeKind::Aggregate => "aggregate",
            EdgeKind::Filter => "filter",
        }
    }
}

/// Where one output column comes from, in columns of the scanned relation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnLineage {
    /// Scanned column -> the kind of the derivation.
    pub sources: BTreeMap<String, EdgeKind>,
    /// Scanned columns read by a `FILTER (WHERE ...)` of this column's aggregate.
    pub filters: BTreeSet<String>,
}

/// The lineage of one statement's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanLineage {
    /// Per output column of the plan, in order.
    pub columns: Vec<ColumnLineage>,
    /// Scanned columns read by a `WHERE` or `HAVING`.
    pub row_filters: BTreeSet<String>,
    /// Columns a lookup join matches on: the scanned relation's, and the
    /// table's as `table:<name>.<column>`.
    pub join_keys: BTreeSet<String>,
}

/// Traces the output columns of `plan` back to the relation it scans.
/// Handles the nodes a view or alert plan is made of; anything else has
/// already been refused by the planner, and is an error here too.
pub fn trace(plan: &LogicalPlan) -> Result<PlanLineage, String> {
    match plan {
        LogicalPlan::TableScan(scan) => Ok(PlanLineage {
            columns: scan
                .projected_schema
                .fields()
                .iter()
                .map(|f| ColumnLineage {
                    sources: BTreeMap::from([(f.name().clone(), EdgeKind::Direct)]),
                    filters: BTreeSet::new(),
                })
                .collect(),
            row_filters: BTreeSet::new(),
            join_keys: BTreeSet::new(),
        }),
        LogicalPlan::SubqueryAlias(alias) => trace(&alias.input),
        // A lookup join (the planner checked its shape): the stream's
        // columns keep their lineage, the table's columns come from the
        // `table:` node, and both sides of `ON` are join keys.
        LogicalPlan::Join(join) => {
            let left = trace(&join.left)?;
            let table = match join.right.as_ref() {
                LogicalPlan::SubqueryAlias(a) => a.input.as_ref(),
                other => other,
            };
            let name = match table {
                LogicalPlan::TableScan(t) => t.table_name.table().to_ascii_lowercase(),
                _ => return Err("lineage: a join reads a reference table".into()),
            };
            let mut out = left.clone();
            for f in join.right.schema().fields() {
                out.columns.push(ColumnLineage {
                    sources: BTreeMap::from([(
                        format!("table:{name}.{}", f.name()),
                        EdgeKind::Direct,
                    )]),
                    filters: BTreeSet::new(),
                });
            }
            let mut on: Vec<&Expr> = join.on.iter().flat_map(|(a, b)| [a, b]).collect();
            if let Some(f) = &join.filter {
                on.push(f);
            }
            for e in on {
                for c in e.column_refs() {
                    if join.right.schema().has_column(c) {
                        out.join_keys.insert(format!("table:{name}.{}", c.name));
                    } else if let Ok(i) = join.left.schema().index_of_column(c) {
                        if let Some(from) = left.columns.get(i) {
                            out.join_keys.extend(from.sources.keys().cloned());
                        }
                    }
                }
            }
            Ok(out)
        }
        LogicalPlan::Filter(filter) => {
            let mut input = trace(&filter.input)?;
            let read = read_by(&filter.predicate, filter.input.as_ref(), &input)?;
            input.row_filters.extend(read);
            Ok(input)
        }
        LogicalPlan::Projection(projection) => {
            let input = trace(&projection.input)?;
            let columns = projection
                .expr
                .iter()
                .map(|e| {
                    let step = match unalias(e) {
                        Expr::Column(_) => EdgeKind::Direct,
                        _ => EdgeKind::Transform,
                    };
                    derive(e, projection.input.as_ref(), &input, step)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(PlanLineage {
                columns,
                row_filters: input.row_filters,
                join_keys: input.join_keys,
            })
        }
        LogicalPlan::Aggregate(aggregate) => {
            let input = trace(&aggregate.input)?;
            let below = aggregate.input.as_ref();
            let mut columns = Vec::new();
            for g in &aggregate.group_expr {
                // the window (tumble/hop/session) reads no column: its
                // bounds come from event time, which the view adds
                columns.push(derive(g, below, &input, EdgeKind::Key)?);
            }
            for e in &aggregate.aggr_expr {
                let mut column = ColumnLineage::default();
                if let Expr::AggregateFunction(af) = unalias(e) {
                    let params = &af.params;
                    for arg in params
                        .args
                        .iter()
                        .chain(params.order_by.iter().map(|o| &o.expr))
                    {
                        let c = derive(arg, below, &input, EdgeKind::Aggregate)?;
                        merge(&mut column, c);
                    }
                    if let Some(f) = &params.filter {
                        column.filters.extend(read_by(f, below, &input)?);
                    }
                } else {
                    column = derive(e, below, &input, EdgeKind::Aggregate)?;
                }
                columns.push(column);
            }
            Ok(PlanLineage {
                columns,
                row_filters: input.row_filters,
                join_keys: input.join_keys,
            })
        }
        other => Err(format!(
            "no column lineage for {}",
            other.display().to_string().split(':').next().unwrap_or("?")
        )),
    }
}

/// The scanned columns an expression reads, with their filters: what a
/// predicate over `input` (the node below) depends on.
pub fn read_by(
    e: &Expr,
    below: &LogicalPlan,
    input: &PlanLineage,
) -> Result<BTreeSet<String>, String> {
    let c = derive(e, below, input, EdgeKind::Filter)?;
    let mut read: BTreeSet<String> = c.sources.into_keys().collect();
    read.extend(c.filters);
    Ok(read)
}

/// The lineage of expression `e` over the output of `below`, whose columns'
/// lineage is `input`, when `e` adds a derivation of kind `step`.
fn derive(
    e: &Expr,
    below: &LogicalPlan,
    input: &PlanLineage,
    step: EdgeKind,
) -> Result<ColumnLineage, String> {
    let mut out = ColumnLineage::default();
    for column in e.column_refs() {
        let i = below
            .schema()
            .index_of_column(column)
            .map_err(|err| format!("lineage: {err}"))?;
        let Some(from) = input.columns.get(i) else {
            return Err(format!("lineage: column {column} out of range"));
        };
        for (name, kind) in &from.sources {
            let kind = (*kind).max(step);
            let slot = out.sources.entry(name.clone()).or_insert(kind);
            *slot = (*slot).max(kind);
        }
        out.filters.extend(from.filters.iter().cloned());
    }
    Ok(out)
}

fn merge(into: &mut ColumnLineage, from: ColumnLineage) {
    for (name, kind) in from.sources {
        let slot = into.sources.entry(name).or_insert(kind);
        *slot = (*slot).max(kind);
    }
    into.filters.extend(from.filters);
}

fn unalias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => unalias(&a.expr),
        other => other,
    }
}

/// The `--` comment lines directly above line `line` (1-based) of `text`,
/// joined with `\n`; empty when there are none.
pub fn comment_above(text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut doc = Vec::new();
    let mut at = line.saturating_sub(1);
    while at > 0 {
        let above = lines.get(at - 1).map_or("", |l| l.trim());
        match above.strip_prefix("--") {
            Some(comment) => doc.push(comment.trim()),
            None => break,
        }
        at -= 1;
    }
    doc.reverse();
    doc.join("\n")
}

/// Docs of a `CREATE TABLE`'s columns: name -> the comment above it.
/// `text` is the statement as parsed (line 1 is its first line).
pub fn table_column_docs(text: &str, columns: &[ColumnDef]) -> BTreeMap<String, String> {
    let mut docs = BTreeMap::new();
    for c in columns {
        let line = c.name.span.start.line as usize;
        let doc = comment_above(text, line);
        if !doc.is_empty() {
            docs.insert(c.name.value.to_ascii_lowercase(), doc);
        }
    }
    docs
}

/// Docs of a `SELECT` list's items: output name -> the comment above the item.
pub fn select_item_docs(text: &str, query: &Query) -> BTreeMap<String, String> {
    let mut docs = BTreeMap::new();
    let SetExpr::Select(select) = query.body.as_ref() else {
        return docs;
    };
    for item in &select.projection {
        let name = match item {
            SelectItem::ExprWithAlias { alias, .. } => alias.value.clone(),
            SelectItem::UnnamedExpr(SqlExpr::Identifier(i)) => i.value.clone(),
            SelectItem::UnnamedExpr(SqlExpr::CompoundIdentifier(parts)) => match parts.last() {
                Some(i) => i.value.clone(),
                None => continue,
            },
            _ => continue,
        };
        let line = item.span().start.line as usize;
        let doc = comment_above(text, line);
        if !doc.is_empty() {
            docs.insert(name.to_ascii_lowercase(), doc);
        }
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_directly_above_a_line() {
        let text = "CREATE TABLE t (\n  -- The terminal.\n  -- From the topic.\n  terminal_id TEXT,\n\n  ts TIMESTAMP\n)";
        assert_eq!(comment_above(text, 4), "The terminal.\nFrom the topic.");
        assert_eq!(comment_above(text, 6), "");
        assert_eq!(comment_above(text, 1), "");
        assert_eq!(comment_above(text, 0), "");
    }

    #[test]
    fn kinds_order_by_strength() {
        assert!(EdgeKind::Direct < EdgeKind::Key);
        assert!(EdgeKind::Key < EdgeKind::Transform);
        assert!(EdgeKind::Transform < EdgeKind::Aggregate);
        assert_eq!(
            EdgeKind::Direct.max(EdgeKind::Aggregate),
            EdgeKind::Aggregate
        );
    }
}
