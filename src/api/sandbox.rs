//! The ad-hoc query sandbox (DESIGN §6 "Ad-hoc SQL is sandboxed").
//!
//! A query is a stranger's program. It runs:
//!
//! - on a runtime of its own (`weir-query` threads, with a large stack for
//!   deep plans), never on the threads that serve MQTT, HTTP or the
//!   pipeline; at shutdown that runtime is let go without waiting, so a
//!   runaway query never holds weir up;
//! - at most `http.query_concurrency` at once (more: 429), each within
//!   `http.query_timeout` (then 408, and the task is cancelled; its slot is
//!   freed only when it has really stopped, so stuck queries cannot pile up);
//!   a client that hangs up, or a request cut at `http.request_timeout`,
//!   cancels its query as well;
//! - within `http.query_memory` bytes: the views it loads and DataFusion's
//!   operators (sorts, aggregates, joins) count against one pool (then 413);
//! - after [`check`]: one `SELECT`, SQL text at most [`MAX_SQL_BYTES`], no
//!   `WITH RECURSIVE`, no table functions or `LATERAL` or `UNNEST` in `FROM`,
//!   expressions nested at most [`MAX_EXPR_DEPTH`] deep, and functions that
//!   build values of any size (`repeat`, `lpad`, `rpad`, `array_repeat`)
//!   only with a literal size up to [`MAX_BUILT_VALUE`]; `range` and
//!   `generate_series` not at all.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Query, TableFactor, Value, Visit,
    Visitor,
};
use tokio::sync::Semaphore;

use super::ApiError;

/// Longest SQL text accepted.
pub const MAX_SQL_BYTES: usize = 64 * 1024;
/// Deepest expression accepted.
pub const MAX_EXPR_DEPTH: usize = 128;
/// Largest literal size of a value-building function.
pub const MAX_BUILT_VALUE: u64 = 1_000_000;
/// Stack of a query thread: deep (but accepted) plans recurse.
const QUERY_STACK: usize = 64 << 20;

/// Functions whose second argument says how large a value they build.
const SIZED: [&str; 4] = ["repeat", "lpad", "rpad", "array_repeat"];
/// Functions that build values of any size from their arguments.
const DENIED: [&str; 2] = ["range", "generate_series"];

/// Refuses what a query may not do; the message says what and why.
pub fn check(statement: &datafusion::sql::sqlparser::ast::Statement) -> Result<(), String> {
    let mut guard = Guard { depth: 0 };
    match statement.visit(&mut guard) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(why) => Err(why),
    }
}

struct Guard {
    depth: usize,
}

impl Visitor for Guard {
    type Break = String;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<String> {
        if query.with.as_ref().is_some_and(|w| w.recursive) {
            return ControlFlow::Break("WITH RECURSIVE is not allowed in ad-hoc queries".into());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<String> {
        match factor {
            TableFactor::Table { args: None, .. } | TableFactor::NestedJoin { .. } => {
                ControlFlow::Continue(())
            }
            TableFactor::Derived { lateral: false, .. } => ControlFlow::Continue(()),
            TableFactor::Derived { lateral: true, .. } => {
                ControlFlow::Break("LATERAL is not allowed in ad-hoc queries".into())
            }
            other => ControlFlow::Break(format!(
                "only stored views and subqueries may be read, not {other}"
            )),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<String> {
        self.depth += 1;
        if self.depth > MAX_EXPR_DEPTH {
            return ControlFlow::Break(format!(
                "expressions may be nested at most {MAX_EXPR_DEPTH} deep"
            ));
        }
        if let Expr::Function(f) = expr {
            let name = f.name.to_string().to_ascii_lowercase();
            if DENIED.contains(&name.as_str()) {
                return ControlFlow::Break(format!("{name}() is not allowed in ad-hoc queries"));
            }
            if SIZED.contains(&name.as_str()) {
                let size = match &f.args {
                    FunctionArguments::List(list) => match list.args.get(1) {
                        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) => {
                            match &v.value {
                                Value::Number(n, _) => n.parse::<u64>().ok(),
                                _ => None,
                            }
                        }
                        _ => None,
                    },
                    _ => None,
                };
                if size.is_none_or(|n| n > MAX_BUILT_VALUE) {
                    return ControlFlow::Break(format!(
                        "{name}() needs a literal size of at most {MAX_BUILT_VALUE} in ad-hoc queries"
                    ));
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<String> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

/// Where queries run; see the module docs.
pub struct Sandbox {
    runtime: Option<tokio::runtime::Runtime>,
    permits: Arc<Semaphore>,
    metrics: Arc<crate::obs::Metrics>,
    pub timeout: Duration,
    pub memory: usize,
}

impl Sandbox {
    pub fn new(
        concurrency: usize,
        timeout: Duration,
        memory: usize,
        metrics: Arc<crate::obs::Metrics>,
    ) -> std::io::Result<Sandbox> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(concurrency.max(1))
            .max_blocking_threads(concurrency.max(1) * 2)
            .thread_name("weir-query")
            .thread_stack_size(QUERY_STACK)
            .enable_all()
            .build()?;
        Ok(Sandbox {
            runtime: Some(runtime),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            metrics,
            timeout,
            memory,
        })
    }

    /// Runs `work` in the sandbox: a free slot or 429, done within the
    /// timeout or 408 (and cancelled).
    pub async fn run<F>(&self, work: F) -> Result<String, ApiError>
    where
        F: std::future::Future<Output = Result<String, ApiError>> + Send + 'static,
    {
        let Some(runtime) = &self.runtime else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "weir is stopping",
            ));
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.metrics.queries_refused.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_queries",
                "too many queries are running; try again shortly (http.query_concurrency)",
            ));
        };
        let metrics = self.metrics.clone();
        metrics.queries_running.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            _permit: permit,
            metrics,
        };
        // The slot is free only once the query has really stopped (done,
        // or cancelled at its next await).
        // If this future is dropped (the client hung up, or the request hit
        // http.request_timeout) the query is cancelled too: a detached
        // runaway would keep its slot until it finished by itself.
        let mut task = AbortOnDrop(runtime.spawn(async move {
            let _slot = slot;
            work.await
        }));
        tokio::select! {
            done = &mut task.0 => match done {
                Ok(result) => result,
                Err(e) => Err(ApiError::internal(format!("query task failed: {e}"))),
            },
            _ = tokio::time::sleep(self.timeout) => {
                task.0.abort();
                self.metrics
                    .queries_cancelled
                    .fetch_add(1, Ordering::Relaxed);
                Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "query_timeout",
                    format!(
                        "the query ran longer than http.query_timeout ({}) and was cancelled",
                        crate::config::format_duration(self.timeout)
                    ),
                ))
            }
        }
    }
}

/// A query task that is cancelled when its handle goes.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A query's place in the sandbox; counted while it lives.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<crate::obs::Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.queries_running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Never wait for a runaway query (and never block inside a runtime).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::{DFParser, Statement as DFStatement};
    use datafusion::sql::sqlparser::dialect::GenericDialect;

    fn checked(sql: &str) -> Result<(), String> {
        let statements =
            DFParser::parse_sql_with_dialect(sql, &GenericDialect {}).map_err(|e| e.to_string())?;
        match &statements[0] {
            DFStatement::Statement(s) => check(s),
            _ => Err("not a statement".into()),
        }
    }

    #[test]
    fn ordinary_queries_pass() {
        for sql in [
            "SELECT terminal_id, max(p99) AS worst FROM health GROUP BY terminal_id ORDER BY worst DESC LIMIT 10",
            "WITH t AS (SELECT * FROM health) SELECT count(*) FROM t",
            "SELECT * FROM (SELECT 1 AS x) s JOIN health h ON true",
            "SELECT repeat('-', 20), lpad(terminal_id, 8, '0') FROM latest",
        ] {
            assert_eq!(checked(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn hostile_queries_are_refused() {
        let deep = format!("SELECT {}1", "1+".repeat(200));
        for (sql, why) in [
            (
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT count(*) FROM r",
                "RECURSIVE",
            ),
            ("SELECT * FROM generate_series(1, 1000000000)", "not"),
            (
                "SELECT * FROM latest, LATERAL generate_series(1, 10)",
                "",
            ),
            ("SELECT * FROM UNNEST([1,2,3])", "not"),
            ("SELECT repeat('x', 2147483647)", "literal size"),
            ("SELECT repeat('x', n) FROM latest", "literal size"),
            ("SELECT range(1, 10000000000)", "range()"),
            ("SELECT array_repeat(1, 99999999999)", "literal size"),
            (deep.as_str(), "nested at most"),
        ] {
            let e = checked(sql).expect_err(sql);
            assert!(e.contains(why), "{sql}: {e}");
        }
    }
}
