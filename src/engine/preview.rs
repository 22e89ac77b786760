//! Preview (DESIGN §7): one view definition run over the ingest log's recent
//! events — those that arrived since `from` — and the rows it would write,
//! without storing anything or touching the running pipelines.
//!
//! The view is planned beside the running streams and views (so it may read
//! either), with weir's planner; its chain from the root stream is run on
//! fresh operators, with a watermark rebuilt from the records as the live
//! pipeline builds it, idle advancement up to now included. A windowed view
//! returns the windows that watermark closes.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::log::{self, Record};
use crate::plan::{Pipeline, PlanError, Upstream, ViewPlan};
use crate::store::Store;
use crate::window::operator::{EventBatch, ViewOperator, ViewOutput};
use crate::window::Watermark;

/// The file name the previewed statement's errors carry.
pub const PREVIEW_FILE: &str = "preview.sql";

#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    pub view: String,
    pub shape: String,
    pub columns: Vec<String>,
    /// Rows as JSON object texts, in the store's order (by time, then key).
    #[serde(skip)]
    pub rows: Vec<String>,
    /// What the view would store: upserts by store key, as the store does.
    #[serde(skip)]
    written: std::collections::BTreeMap<Vec<u8>, String>,
    pub truncated: bool,
    /// Log records and events read.
    pub records: u64,
    pub events: u64,
}

#[derive(Debug)]
pub enum PreviewError {
    /// The statement does not plan: file `preview.sql`, line, cause.
    Plan(Vec<PlanError>),
    /// It ran past the time limit.
    Timeout,
    Failed(String),
}

/// Plans `sql` (one `CREATE VIEW`) beside the running streams and views.
pub fn plan_preview(
    running: &Pipeline,
    sql: &str,
) -> Result<(Pipeline, Arc<ViewPlan>), PreviewError> {
    let defined = crate::plan::plan_sources(&[(PREVIEW_FILE.to_string(), sql.to_string())]);
    // names the statement defines, to leave out of the running set
    let mut context = String::new();
    for s in &running.streams {
        context.push_str(&s.sql);
        context.push_str(";\n");
    }
    for t in &running.tables {
        context.push_str(&t.sql);
        context.push_str(";\n");
    }
    let own: Vec<String> = crate::plan::split::split_statements(sql)
        .iter()
        .filter_map(|s| {
            let words: Vec<String> = s
                .text
                .split_whitespace()
                .take(6)
                .map(|w| w.to_ascii_lowercase())
                .collect();
            let at = words.iter().position(|w| w == "view")?;
            words.get(at + 1).map(|n| n.trim_matches('"').to_string())
        })
        .collect();
    for v in &running.views {
        if !own.contains(&v.name) {
            context.push_str(&v.sql);
            context.push_str(";\n");
        }
    }
    let planned = crate::plan::plan_sources_sharing(
        &[
            ("running".to_string(), context),
            (PREVIEW_FILE.to_string(), sql.to_string()),
        ],
        &running.tables,
    );
    let pipeline = match planned {
        Ok(p) => p,
        Err(errors) => {
            let mine: Vec<PlanError> = errors
                .into_iter()
                .filter(|e| e.file == PREVIEW_FILE)
                .collect();
            if mine.is_empty() {
                // the statement alone may say more (say, a stream it names)
                return Err(PreviewError::Plan(defined.err().unwrap_or_else(|| {
                    vec![PlanError {
                        file: PREVIEW_FILE.into(),
                        line: 1,
                        message: "does not plan beside the running pipelines".into(),
                    }]
                })));
            }
            return Err(PreviewError::Plan(mine));
        }
    };
    let views: Vec<&Arc<ViewPlan>> = pipeline
        .views
        .iter()
        .filter(|v| v.file == PREVIEW_FILE)
        .collect();
    let at_one = |message: &str| {
        PreviewError::Plan(vec![PlanError {
            file: PREVIEW_FILE.into(),
            line: 1,
            message: message.into(),
        }])
    };
    if !pipeline.alerts.is_empty() || pipeline.streams.iter().any(|s| s.file == PREVIEW_FILE) {
        return Err(at_one("preview takes one CREATE VIEW statement"));
    }
    match views.as_slice() {
        [one] => {
            let view = Arc::clone(one);
            Ok((pipeline, view))
        }
        _ => Err(at_one("preview takes one CREATE VIEW statement")),
    }
}

/// The views from the root stream down to `view`, in order.
fn chain(
    pipeline: &Pipeline,
    view: &Arc<ViewPlan>,
) -> Result<(String, Vec<Arc<ViewPlan>>), PreviewError> {
    let mut chain = vec![view.clone()];
    let mut at = view.clone();
    for _ in 0..=pipeline.views.len() {
        match &at.upstream {
            Upstream::Stream(s) => {
                chain.reverse();
                return Ok((s.clone(), chain));
            }
            Upstream::View(v) => {
                let up = pipeline
                    .view(v)
                    .ok_or_else(|| PreviewError::Failed(format!("view {v} not found")))?
                    .clone();
                chain.push(up.clone());
                at = up;
            }
        }
    }
    Err(PreviewError::Failed("circular views".into()))
}

/// Runs `view` over the records that arrived in `[from_ms, now_ms]`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    store: &Store,
    pipeline: &Pipeline,
    view: &Arc<ViewPlan>,
    from_ms: i64,
    now_ms: i64,
    deadline: Instant,
    max_rows: usize,
) -> Result<Preview, PreviewError> {
    let (root, plans) = chain(pipeline, view)?;
    let stream = pipeline
        .stream(&root)
        .ok_or_else(|| PreviewError::Failed(format!("stream {root} not found")))?;
    let mut operators = plans
        .iter()
        .map(|p| ViewOperator::new(p.clone()).map_err(|e| PreviewError::Failed(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut watermark = Watermark::new(
        stream.event_time.bound_ms,
        stream.idle_timeout.as_millis() as i64,
    );
    let mut out = Preview {
        view: view.name.clone(),
        shape: view.shape.to_string(),
        columns: view
            .output_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect(),
        rows: Vec::new(),
        written: Default::default(),
        truncated: false,
        records: 0,
        events: 0,
    };
    let mut failure: Option<PreviewError> = None;
    let upto = (now_ms.max(0) as u64 + 1) << 16;
    let after = log::seq_at(from_ms).saturating_sub(1);
    let scanned = store.scan_log(after, |seq, bytes| {
        if seq >= upto {
            return false;
        }
        if Instant::now() > deadline {
            failure = Some(PreviewError::Timeout);
            return false;
        }
        let Ok(record) = log::decode(seq, bytes) else {
            return true;
        };
        out.records += 1;
        let step = match record {
            Record::Batch(b) if b.stream == root => {
                out.events += b.data.num_rows() as u64;
                if let Some(max) = b.event_time.values().iter().copied().max() {
                    watermark.observe(max, (seq >> 16) as i64);
                }
                // each view takes the rows, then the watermark they moved,
                // as the live pipeline feeds them
                let batch = EventBatch::new(b.data, b.event_time, seq);
                feed(
                    &mut operators,
                    Some(batch),
                    watermark.current(),
                    &mut out,
                    max_rows,
                )
            }
            Record::Watermark {
                stream,
                watermark: w,
            } if stream == root => {
                watermark.raise(w);
                feed(
                    &mut operators,
                    None,
                    watermark.current(),
                    &mut out,
                    max_rows,
                )
            }
            _ => Ok(()),
        };
        if let Err(e) = step {
            failure = Some(e);
            return false;
        }
        !out.truncated
    });
    if let Some(e) = failure {
        return Err(e);
    }
    scanned.map_err(|e| PreviewError::Failed(e.to_string()))?;
    // idle advancement up to now, as the live pipeline has it
    if watermark.on_tick(now_ms) {
        feed(
            &mut operators,
            None,
            watermark.current(),
            &mut out,
            max_rows,
        )?;
    }
    out.rows = std::mem::take(&mut out.written).into_values().collect();
    Ok(out)
}

/// Runs a batch (or a watermark) down the chain; the last view's rows are kept.
fn feed(
    operators: &mut [ViewOperator],
    batch: Option<EventBatch>,
    watermark: Option<i64>,
    out: &mut Preview,
    max_rows: usize,
) -> Result<(), PreviewError> {
    let mut inputs: Vec<EventBatch> = batch.into_iter().collect();
    let last = operators.len().saturating_sub(1);
    for (i, op) in operators.iter_mut().enumerate() {
        let mut produced: Vec<ViewOutput> = Vec::new();
        for input in &inputs {
            let p = op
                .process(input)
                .map_err(|e| PreviewError::Failed(e.to_string()))?;
            produced.extend(p.output);
        }
        if let Some(w) = watermark {
            if let Some(o) = op
                .advance_watermark(w)
                .map_err(|e| PreviewError::Failed(e.to_string()))?
            {
                produced.push(o);
            }
        }
        if i == last {
            for o in produced {
                let texts = crate::sink::batch_to_json_text(&o.rows);
                for (key, row) in o.keys.into_iter().zip(texts) {
                    if out.written.len() >= max_rows && !out.written.contains_key(&key) {
                        out.truncated = true;
                        return Ok(());
                    }
                    out.written.insert(key, row);
                }
            }
            return Ok(());
        }
        inputs = produced
            .into_iter()
            .map(|o| EventBatch::new(o.rows, o.event_time, 0))
            .collect();
    }
    Ok(())
}
