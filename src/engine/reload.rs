//! Changing pipelines while weir runs (DESIGN §7): a reload plans every file
//! again; with any error nothing changes and the errors are reported; with
//! none, exactly what `weir plan` would say is applied by the pipeline thread
//! (`pipeline::Runner::reload`): new views and rules backfilled from the log,
//! changed ones and their downstream rebuilt, unchanged ones kept with their
//! state, removed ones stopped. MQTT connections stay up; ingestion waits
//! only while the pipeline thread swaps and backfills.
//!
//! Triggers: the pipelines folder changing (watched, debounced), `SIGHUP`,
//! and `POST /api/v1/pipelines/reload`. One reload runs at a time.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;
use crate::lineage::Graph;
use crate::plan::changes::{Change, Changes, Deployed};
use crate::plan::{Pipeline, PlanError};

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Start,
    Watch,
    Signal,
    Api,
}

/// The last reload, as `GET /api/v1/pipelines` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LastReload {
    pub at: String,
    pub trigger: Trigger,
    /// False when errors (or a change that needs a restart) stopped it.
    pub applied: bool,
    pub new: Vec<String>,
    pub changed: Vec<String>,
    pub rebuilt: Vec<String>,
    pub removed: Vec<String>,
    pub kept: Vec<String>,
    /// How long ingestion waited: the swap, and the filled views catching
    /// up on the last records (the backfill runs beside the pipeline).
    pub paused_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileStatus {
    pub file: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorStatus {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// `GET /api/v1/pipelines`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `ok`, or `error` when the files on disk do not plan (weir keeps
    /// running what it had).
    pub status: &'static str,
    pub errors: Vec<ErrorStatus>,
    pub files: Vec<FileStatus>,
    pub last_reload: Option<LastReload>,
    /// A reload under way: its views are being filled from the log beside
    /// the running pipeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reloading: Option<Reloading>,
}

/// A reload under way, as `GET /api/v1/pipelines` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Reloading {
    pub since: String,
    pub trigger: Trigger,
    /// The views being built (new, changed and downstream).
    pub rebuilding: Vec<String>,
}

/// The running pipelines, their lineage, and the reload status; shared by
/// the API and the reloader.
pub struct Live {
    running: RwLock<(Arc<Pipeline>, Arc<Graph>)>,
    status: Mutex<Status>,
    /// Held while a reload runs: one at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Live {
    pub fn new(pipeline: Arc<Pipeline>, config: &Config) -> Live {
        let graph = Arc::new(crate::lineage::build(&pipeline, &config.alerts));
        Live {
            running: RwLock::new((pipeline, graph)),
            status: Mutex::new(Status {
                status: "ok",
                errors: vec![],
                files: files(&config.pipelines.dir),
                last_reload: None,
                reloading: None,
            }),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.running
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    pub fn lineage(&self) -> Arc<Graph> {
        self.running
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_running(&self, pipeline: Arc<Pipeline>, graph: Arc<Graph>) {
        *self.running.write().unwrap_or_else(|e| e.into_inner()) = (pipeline, graph);
    }

    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn record_start(&self, changes: &Changes) {
        let report = last_reload(Trigger::Start, true, changes, 0, None);
        self.set_status(|s| s.last_reload = Some(report));
    }
}

/// The `.sql` files of the folder with a fingerprint of their text.
fn files(dir: &std::path::Path) -> Vec<FileStatus> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            out.push(FileStatus {
                file: p.display().to_string(),
                fingerprint: format!("{:016x}", crate::plan::fingerprint(&[&text])),
            });
        }
    }
    out
}

fn last_reload(
    trigger: Trigger,
    applied: bool,
    changes: &Changes,
    paused_ms: u64,
    refused: Option<String>,
) -> LastReload {
    let mut rebuilt = changes.names(Change::Changed);
    rebuilt.extend(changes.names(Change::Downstream));
    rebuilt.sort();
    LastReload {
        at: crate::obs::format_time(crate::obs::now_ms()),
        trigger,
        applied,
        new: changes.names(Change::New),
        changed: changes.names(Change::Changed),
        rebuilt,
        removed: changes.names(Change::Removed),
        kept: changes.names(Change::Kept),
        paused_ms,
        refused,
    }
}

/// Why the stream definitions of `next` cannot replace `running`'s without
/// a restart, if they cannot: the MQTT subscriptions, decoders and the log's
/// record layout are built from them at start.
pub fn stream_change(running: &Pipeline, next: &Pipeline) -> Option<String> {
    let text = |s: &crate::plan::StreamDef| crate::plan::without_comments(&s.sql);
    for s in &next.streams {
        match running.stream(&s.name) {
            None => {
                return Some(format!(
                    "stream {} is new: adding a stream needs a restart (its topic is subscribed at start)",
                    s.name
                ))
            }
            Some(old) if text(old) != text(s) => {
                return Some(format!(
                    "stream {} changed: changing a stream needs a restart (its decoder and topic are set at start)",
                    s.name
                ))
            }
            Some(_) => {}
        }
    }
    running
        .streams
        .iter()
        .find(|s| next.stream(&s.name).is_none())
        .map(|s| {
            format!(
                "stream {} was removed: removing a stream needs a restart",
                s.name
            )
        })
}

/// What the pipeline thread is asked to do, and where it answers.
pub(super) struct Request {
    pub pipeline: Arc<Pipeline>,
    pub reply: tokio::sync::oneshot::Sender<Result<Duration, String>>,
}

/// Plans the files again and applies them; the outcome is also kept for
/// `GET /api/v1/pipelines`.
pub struct Reloader {
    pub(super) live: Arc<Live>,
    pub(super) store: crate::store::Store,
    pub(super) config: Config,
    pub(super) runner: std::sync::mpsc::SyncSender<Request>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    pub async fn reload(&self, trigger: Trigger) -> LastReload {
        let _one_at_a_time = self.live.reloading.lock().await;
        let dir = self.config.pipelines.dir.clone();
        // (planning is CPU work: off the async workers)
        let running = self.live.pipeline().tables.clone();
        let planned =
            tokio::task::spawn_blocking(move || crate::plan::plan_dir_sharing(&dir, &running))
                .await
                .unwrap_or_else(|e| {
                    Err(vec![PlanError {
                        file: String::new(),
                        line: 0,
                        message: format!("planning failed: {e}"),
                    }])
                });
        let files = files(&self.config.pipelines.dir);
        let next = match planned {
            Ok(p) => Arc::new(p),
            Err(errors) => {
                for e in &errors {
                    tracing::error!(file = %e.file, line = e.line, "pipelines not reloaded: {}", e.message);
                }
                let report = last_reload(
                    trigger,
                    false,
                    &empty_changes(),
                    0,
                    Some(format!("{} error(s) in the pipeline files", errors.len())),
                );
                self.live.set_status(|s| {
                    s.status = "error";
                    s.errors = errors
                        .iter()
                        .map(|e| ErrorStatus {
                            file: e.file.clone(),
                            line: e.line,
                            message: e.message.clone(),
                        })
                        .collect();
                    s.files = files;
                    s.last_reload = Some(report.clone());
                });
                return report;
            }
        };
        let running = self.live.pipeline();
        let mut deployed = Deployed::of(&running);
        deployed.log_from = self
            .store
            .first_log_seq()
            .ok()
            .flatten()
            .map(|seq| (seq >> 16) as i64);
        let changes = crate::plan::changes::changes(
            &next,
            &deployed,
            crate::obs::now_ms(),
            self.config.storage.log_retention,
            self.config.storage.view_retention,
        );
        let refuse = |why: String| {
            tracing::error!("pipelines not reloaded: {why}");
            let report = last_reload(trigger, false, &changes, 0, Some(why.clone()));
            self.live.set_status(|s| {
                s.status = "error";
                s.errors = vec![ErrorStatus {
                    file: self.config.pipelines.dir.display().to_string(),
                    line: 0,
                    message: why,
                }];
                s.files = files.clone();
                s.last_reload = Some(report.clone());
            });
            report
        };
        if let Some(why) = stream_change(&running, &next) {
            return refuse(why);
        }
        for (i, hook) in self.config.alerts.webhook.iter().enumerate() {
            if let Some(unknown) = hook.rules.iter().find(|r| next.alert(r).is_none()) {
                return refuse(format!(
                    "alerts.webhook[{i}].rules names {unknown:?}, which the new pipelines do not define"
                ));
            }
        }
        let mut paused = Duration::ZERO;
        if changes.any() {
            let rebuilding = last_reload(trigger, true, &changes, 0, None);
            let mut views: Vec<String> = rebuilding.new.clone();
            views.extend(rebuilding.rebuilt.iter().cloned());
            views.sort();
            views.dedup();
            self.live.set_status(|s| {
                s.reloading = Some(Reloading {
                    since: crate::obs::format_time(crate::obs::now_ms()),
                    trigger,
                    rebuilding: views,
                })
            });
            let (reply, answer) = tokio::sync::oneshot::channel();
            let sent = self.runner.send(Request {
                pipeline: next.clone(),
                reply,
            });
            let applied = match sent {
                Ok(()) => answer
                    .await
                    .unwrap_or_else(|_| Err("the pipeline thread has stopped".into())),
                Err(_) => Err("the pipeline thread has stopped".into()),
            };
            self.live.set_status(|s| s.reloading = None);
            match applied {
                Ok(d) => paused = d,
                Err(why) => return refuse(why),
            }
        }
        if let Err(e) = super::record_deployed(&self.store, &self.config.storage.dir, &next)
            .and_then(|()| super::note_removed(&self.store, &next, &changes))
        {
            tracing::warn!(error = %e, "cannot record the reloaded definitions");
        }
        let graph = Arc::new(crate::lineage::build(&next, &self.config.alerts));
        self.live.set_running(next, graph);
        let report = last_reload(trigger, true, &changes, paused.as_millis() as u64, None);
        for item in &changes.items {
            if item.change != Change::Kept {
                tracing::info!(kind = item.kind, name = %item.name, change = item.change.as_str(), "{}", item.detail);
            }
        }
        tracing::info!(
            trigger = ?trigger,
            new = report.new.len(),
            rebuilt = report.rebuilt.len(),
            removed = report.removed.len(),
            kept = report.kept.len(),
            paused_ms = report.paused_ms,
            "pipelines reloaded"
        );
        self.live.set_status(|s| {
            s.status = "ok";
            s.errors.clear();
            s.files = files;
            s.last_reload = Some(report.clone());
        });
        report
    }
}

fn empty_changes() -> Changes {
    Changes {
        items: vec![],
        log_from: None,
        checkpoint_at: None,
        warnings: vec![],
    }
}

/// A fingerprint of the folder's `.sql` files (names, sizes, times): the
/// watcher reloads when it changes and then holds still for `quiet`.
fn folder_state(dir: &std::path::Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "sql"))
        .map(|e| {
            let meta = e.metadata().ok();
            (
                e.path(),
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            )
        })
        .collect();
    out.sort();
    out
}

/// Watches the pipelines folder: a change that then holds still for `quiet`
/// (an editor's save is several writes) is one reload.
pub async fn watch(
    reloader: Arc<Reloader>,
    poll: Duration,
    quiet: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let dir = reloader.config.pipelines.dir.clone();
    let mut seen = folder_state(&dir);
    let mut changed_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(poll);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let d = dir.clone();
        let now = tokio::task::spawn_blocking(move || folder_state(&d))
            .await
            .unwrap_or_default();
        if now != seen {
            seen = now;
            changed_at = Some(Instant::now());
            continue;
        }
        if changed_at.is_some_and(|t| t.elapsed() >= quiet) {
            changed_at = None;
            reloader.reload(Trigger::Watch).await;
        }
    }
}
