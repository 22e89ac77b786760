//! What a start with these pipeline files does to the stored state
//! (`weir plan`, and the start-up log): which views and rules are new,
//! changed, downstream of a change, removed, or kept.
//!
//! The decision is the engine's own: a view or rule keeps its state when its
//! fingerprint equals the one in the newest checkpoint
//! (`engine::pipeline::Pipeline::restore`), and a view keeps its stored rows
//! under the same condition (`engine::reconcile_views`). A fingerprint
//! includes the upstream views' definitions ([`super::ViewPlan::fingerprint`]),
//! so an edit reaches everything computed from the edited view. The
//! definition fingerprints remembered from the last start tell an edited
//! view from one that is only downstream of an edit.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Pipeline, Upstream, ViewShape};

/// What the stored state was computed with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// Fingerprint per checkpoint part: view names, and `alert:<name>` for rules.
    pub parts: BTreeMap<String, u64>,
    /// Definition fingerprint per part name, from the last start.
    #[serde(default)]
    pub definitions: BTreeMap<String, u64>,
    /// When the newest checkpoint was taken (epoch ms); `None`: no checkpoint.
    #[serde(default)]
    pub checkpoint_at: Option<i64>,
    /// Arrival time of the oldest record the ingest log still holds (epoch ms).
    #[serde(default)]
    pub log_from: Option<i64>,
}

impl Deployed {
    /// What `pipeline` computes its state with (no checkpoint or log facts).
    pub fn of(pipeline: &Pipeline) -> Deployed {
        let mut d = Deployed::default();
        for v in &pipeline.views {
            d.parts.insert(v.name.clone(), v.fingerprint);
            d.definitions.insert(v.name.clone(), v.definition);
        }
        for a in &pipeline.alerts {
            d.parts.insert(alert_part(&a.name), a.fingerprint);
            d.definitions.insert(alert_part(&a.name), a.definition);
        }
        d
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Not in the stored state: backfilled from the log.
    New,
    /// Its own definition changed: rebuilt from the log.
    Changed,
    /// Unchanged itself, but reads a view that is new or changed: rebuilt.
    Downstream,
    /// In the stored state, not in the files: stops.
    Removed,
    /// Same fingerprint: state and rows kept.
    Kept,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::New => "new",
            Change::Changed => "changed",
            Change::Downstream => "downstream",
            Change::Removed => "removed",
            Change::Kept => "kept",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// `view` or `alert`.
    pub kind: &'static str,
    pub name: String,
    pub change: Change,
    /// What happens, in words.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub items: Vec<Item>,
    /// Wall-clock span of the log a rebuild reads, `(from, to)` epoch ms.
    pub log_from: Option<i64>,
    pub checkpoint_at: Option<i64>,
    /// A rebuild that needs more history than the log keeps.
    pub warnings: Vec<String>,
}

impl Changes {
    pub fn names(&self, change: Change) -> Vec<String> {
        self.items
            .iter()
            .filter(|i| i.change == change)
            .map(|i| i.name.clone())
            .collect()
    }

    /// Anything rebuilt, new or removed.
    pub fn any(&self) -> bool {
        self.items.iter().any(|i| i.change != Change::Kept)
    }
}

pub fn alert_part(name: &str) -> String {
    format!("alert:{name}")
}

fn words(d: Duration) -> String {
    crate::config::format_duration_words(d)
}

/// Compares `pipeline` with what the stored state was computed with.
/// `now`: wall time (for the history available); `log_retention` and
/// `view_retention`: the config's, for the warnings.
pub fn changes(
    pipeline: &Pipeline,
    deployed: &Deployed,
    now: i64,
    log_retention: Duration,
    view_retention: Duration,
) -> Changes {
    let history = deployed
        .log_from
        .map(|from| Duration::from_millis((now - from).max(0) as u64));
    let history_words = match history {
        Some(h) => format!("{} of history in the log", words(round_to_seconds(h))),
        None => "the log is empty".to_string(),
    };
    let mut items = Vec::new();
    let mut warnings = Vec::new();
    let mut rebuilt: BTreeMap<&str, Change> = BTreeMap::new();
    let classify = |part: &str, fingerprint: u64, definition: u64| -> Option<Change> {
        match deployed.parts.get(part) {
            Some(f) if *f == fingerprint => None,
            None if !deployed.definitions.contains_key(part) => Some(Change::New),
            _ => match deployed.definitions.get(part) {
                Some(d) if *d == definition => Some(Change::Downstream),
                _ => Some(Change::Changed),
            },
        }
    };
    for v in &pipeline.views {
        let upstream_fresh = match &v.upstream {
            Upstream::View(u) => rebuilt.get(u.as_str()).copied(),
            Upstream::Stream(_) => None,
        };
        let change = classify(&v.name, v.fingerprint, v.definition).unwrap_or(Change::Kept);
        // a checkpoint made before its upstream changed
        let change = match (change, upstream_fresh) {
            (Change::Changed, Some(_))
                if deployed.definitions.get(&v.name) == Some(&v.definition) =>
            {
                Change::Downstream
            }
            (c, _) => c,
        };
        let detail = match change {
            Change::Kept => "state and stored rows kept".to_string(),
            Change::New | Change::Changed | Change::Downstream => {
                let why = match (change, &v.upstream) {
                    (Change::Downstream, Upstream::View(u)) => {
                        format!("reads {u}, which is rebuilt: ")
                    }
                    _ => String::new(),
                };
                let verb = if change == Change::New {
                    "backfilled"
                } else {
                    "rebuilt"
                };
                match (&v.upstream, upstream_fresh) {
                    (Upstream::View(u), None) => format!(
                        "{why}starts empty: it reads {u}, which is kept, and {u}'s history is not recomputed for it"
                    ),
                    _ => {
                        let stored = if change == Change::New {
                            String::new()
                        } else {
                            "; its stored rows are replaced".to_string()
                        };
                        format!("{why}{verb} from the log ({history_words}){stored}")
                    }
                }
            }
            Change::Removed => unreachable_removed(),
        };
        if change != Change::Kept {
            rebuilt.insert(v.name.as_str(), change);
            let keeps = v.retention.unwrap_or(view_retention);
            // a new view loses nothing; a rebuilt one loses the rows the log
            // no longer has the input for
            if change != Change::New && v.shape != ViewShape::Updating && keeps > log_retention {
                warnings.push(format!(
                    "view {} ({}:{}) is rebuilt: it keeps {} of rows, but the log keeps {} (storage.log_retention), so its stored rows older than that are lost, not recomputed",
                    v.name,
                    v.file,
                    v.line,
                    words(keeps),
                    words(log_retention)
                ));
            }
        }
        items.push(Item {
            kind: "view",
            name: v.name.clone(),
            change,
            detail,
        });
    }
    for a in &pipeline.alerts {
        let part = alert_part(&a.name);
        let change = classify(&part, a.fingerprint, a.definition).unwrap_or(Change::Kept);
        let detail = match change {
            Change::Kept => "rule state kept".to_string(),
            Change::New => "starts watching new rows (rules are not run over history)".to_string(),
            Change::Downstream => {
                format!(
                    "reads {}, which is rebuilt: its state starts over; open alerts stay open until they resolve",
                    a.upstream.name()
                )
            }
            Change::Changed => {
                "its state starts over; open alerts stay open until they resolve".to_string()
            }
            Change::Removed => unreachable_removed(),
        };
        items.push(Item {
            kind: "alert",
            name: a.name.clone(),
            change,
            detail,
        });
    }
    for part in deployed.parts.keys() {
        let (kind, name) = match part.strip_prefix("alert:") {
            Some(rule) => ("alert", rule),
            None => ("view", part.as_str()),
        };
        let present = match kind {
            "alert" => pipeline.alert(name).is_some(),
            _ => pipeline.view(name).is_some(),
        };
        if !present {
            items.push(Item {
                kind,
                name: name.to_string(),
                change: Change::Removed,
                detail: if kind == "view" {
                    "stops; its state is dropped and its stored rows are no longer served".into()
                } else {
                    "stops; its alerts stay in the alert history".into()
                },
            });
        }
    }
    Changes {
        items,
        log_from: deployed.log_from,
        checkpoint_at: deployed.checkpoint_at,
        warnings,
    }
}

fn unreachable_removed() -> String {
    // classify never answers Removed for a statement that is in the files
    String::from("stops")
}

fn round_to_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// `weir plan`'s text: one line per view and rule, then the warnings.
pub fn describe(changes: &Changes) -> String {
    let mut out = String::new();
    let width = changes
        .items
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(0);
    let mut items: Vec<&Item> = changes.items.iter().collect();
    items.sort_by_key(|i| (i.change, i.kind, i.name.clone()));
    for i in items {
        out.push_str(&format!(
            "{:<10} {:<5} {:<width$}  {}\n",
            i.change.as_str(),
            i.kind,
            i.name,
            i.detail
        ));
    }
    for w in &changes.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(sql: &str) -> Pipeline {
        super::super::plan_sources(&[("p.sql".into(), sql.into())]).expect("plans")
    }

    const BASE: &str = "CREATE TABLE t (k TEXT, v DOUBLE, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'mqtt', topic = 'a/{k}');
CREATE VIEW a AS SELECT k, v FROM t WHERE v > 1;
CREATE VIEW b AS SELECT k, count(*) AS n FROM a GROUP BY k, tumble(INTERVAL '1' MINUTE);
CREATE VIEW c AS SELECT k, max(v) AS m FROM t GROUP BY k;
CREATE ALERT on_b AS SELECT k, n FROM b WHERE n > 10;";

    fn plan(before: &Pipeline, after: &Pipeline) -> Changes {
        changes(
            after,
            &Deployed::of(before),
            0,
            Duration::from_secs(86_400),
            Duration::from_secs(86_400),
        )
    }

    #[test]
    fn an_edit_rebuilds_the_view_and_what_reads_it_and_nothing_else() {
        let before = pipeline(BASE);
        let after = pipeline(&BASE.replace("WHERE v > 1", "WHERE v > 2"));
        let c = plan(&before, &after);
        assert_eq!(c.names(Change::Changed), vec!["a"]);
        assert_eq!(c.names(Change::Downstream), vec!["b", "on_b"]);
        assert_eq!(c.names(Change::Kept), vec!["c"]);
        assert!(c.names(Change::New).is_empty() && c.names(Change::Removed).is_empty());
    }

    #[test]
    fn nothing_changed_keeps_everything() {
        let before = pipeline(BASE);
        let c = plan(&before, &before);
        assert!(!c.any());
        assert_eq!(c.names(Change::Kept).len(), 4);
    }

    #[test]
    fn new_and_removed() {
        let before = pipeline(BASE);
        let after = pipeline(&BASE.replace(
            "CREATE VIEW c AS SELECT k, max(v) AS m FROM t GROUP BY k;",
            "CREATE VIEW d AS SELECT k, min(v) AS m FROM t GROUP BY k;",
        ));
        let c = plan(&before, &after);
        assert_eq!(c.names(Change::New), vec!["d"]);
        assert_eq!(c.names(Change::Removed), vec!["c"]);
        assert_eq!(c.names(Change::Kept), vec!["a", "b", "on_b"]);
    }

    #[test]
    fn a_new_view_over_a_kept_view_starts_empty() {
        let before = pipeline(BASE);
        let after = pipeline(&format!(
            "{BASE}\nCREATE VIEW e AS SELECT k FROM a WHERE v > 5;"
        ));
        let c = plan(&before, &after);
        let e = c.items.iter().find(|i| i.name == "e").expect("e");
        assert_eq!(e.change, Change::New);
        assert!(e.detail.contains("starts empty"), "{}", e.detail);
    }

    #[test]
    fn a_rebuild_longer_than_the_log_is_a_warning() {
        let before = pipeline(BASE);
        let after = pipeline(&BASE.replace("WHERE v > 1", "WHERE v > 2"));
        let c = changes(
            &after,
            &Deployed::of(&before),
            0,
            Duration::from_secs(3600),
            Duration::from_secs(86_400),
        );
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings); // a and b
        assert!(
            c.warnings[0].contains("view a (p.sql:2)"),
            "{:?}",
            c.warnings
        );
    }
}
