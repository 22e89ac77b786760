//! The `weir` binary: `weir run` serves, `weir check` plans every pipeline,
//! `weir token new` and `weir user new` make credentials.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use weir::config::Config;

/// mimalloc instead of glibc's malloc: at 100 000 terminals glibc's
/// allocator (malloc, free, consolidation) took about 40 % of the pipeline
/// thread, and its stalls made the longest checkpoint pauses (14–27 ms);
/// with mimalloc the pipeline thread needs a fifth less CPU per event and
/// the longest pause is under half a millisecond (BENCHMARKS.md
/// "Checkpoints that do not stop the pipeline").
///
/// The `system-allocator` feature keeps glibc's, for heap profilers that see
/// only `malloc` (heaptrack): `cargo build --profile bench --features
/// system-allocator` (BENCHMARKS.md, "Where the memory goes").
#[cfg(all(not(feature = "system-allocator"), not(feature = "heap-gauge")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The `heap-gauge` feature counts the bytes the allocator hands out and
/// takes back (`weir_heap_live_bytes` in `/metrics`), to tell memory the
/// program holds from memory the allocator keeps: an atomic add on every
/// allocation, so not for production.
#[cfg(feature = "heap-gauge")]
#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

#[cfg(feature = "heap-gauge")]
mod counting {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::Ordering;

    use weir::obs::HEAP_LIVE_BYTES;

    #[cfg(not(feature = "system-allocator"))]
    static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;
    #[cfg(feature = "system-allocator")]
    static INNER: std::alloc::System = std::alloc::System;

    pub struct Counting;

    fn add(bytes: usize) {
        HEAP_LIVE_BYTES.fetch_add(bytes as i64, Ordering::Relaxed);
    }

    fn sub(bytes: usize) {
        HEAP_LIVE_BYTES.fetch_sub(bytes as i64, Ordering::Relaxed);
    }

    // SAFETY: every call is passed on unchanged to the inner allocator; the
    // counter is only arithmetic on the sizes.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { INNER.alloc(layout) };
            if !p.is_null() {
                add(layout.size());
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { INNER.alloc_zeroed(layout) };
            if !p.is_null() {
                add(layout.size());
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { INNER.dealloc(ptr, layout) };
            sub(layout.size());
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let p = unsafe { INNER.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                add(new_size);
                sub(layout.size());
            }
            p
        }
    }
}

/// `mi_option_purge_delay` in the vendored mimalloc 3 (`mimalloc.h`,
/// `enum mi_option_e`; the crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// `mi_option_allow_thp` in the same enum.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Freed memory goes back to the OS at once instead of after a second
/// (mimalloc 3's default, `src/options.c`): the
/// checkpoint thread frees a checkpoint's worth every 10 s, and with the
/// delay weir's peak RSS at 100 000 terminals was 1.1–1.3 GiB instead of
/// 1.06, for no measurable CPU.
///
/// And no transparent huge pages: with them, weir's RSS at 100 000
/// terminals and 200 000 events/s was 25–60 MiB higher minute by minute
/// over 10 minutes (peak 747 against 719 MiB), for no measurable CPU
/// (BENCHMARKS.md, "The live heap is flat"). mimalloc turns THP off for the process when it starts
/// with the option off (`MIMALLOC_ALLOW_THP=0`), before `main`; set from
/// here, the option stops its own huge-page advice, and the `prctl` does
/// what its start would have done.
fn tune_allocator() {
    // (mimalloc's own variables, `MIMALLOC_PURGE_DELAY` and
    // `MIMALLOC_ALLOW_THP`, still decide when they are set)
    // SAFETY: sets plain integer options, before any thread is started.
    unsafe {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
        }
    }
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and changes only
    // this process's THP flag. A kernel without it says EINVAL: weir then
    // runs as before, which is harmless.
    #[cfg(target_os = "linux")]
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

/// A diagnostic for memory benchmarks (BENCHMARKS.md): every 30 s,
/// mimalloc's statistics as JSON into `dir` (`030.json`, `060.json`, ...).
/// Pages per size class need a build with `CFLAGS=-DMI_STAT=2`.
fn write_allocator_stats(dir: PathBuf) {
    std::thread::spawn(move || {
        for i in 1u64.. {
            std::thread::sleep(std::time::Duration::from_secs(30));
            // SAFETY: with no buffer given, mimalloc allocates the text and
            // returns it (or null); it is freed here with mi_free.
            let json = unsafe {
                let p = libmimalloc_sys::mi_stats_get_json(0, std::ptr::null_mut());
                if p.is_null() {
                    continue;
                }
                let text = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
                libmimalloc_sys::mi_free(p.cast());
                text
            };
            let _ = std::fs::write(dir.join(format!("{:03}.json", i * 30)), json);
        }
    });
}

use weir::plan;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "A single-node stream engine for device telemetry: MQTT in, windowed SQL views out."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: embedded broker (by default), pipelines, HTTP API.
    Run {
        /// Config file; without it, built-in defaults plus WEIR_* variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Drop what weir created in Postgres to follow a reference table (its
    /// replication slot, and its publication unless the table names the
    /// DBA's): the next start reads the table afresh.
    ResetSource {
        /// The reference table (`CREATE TABLE ... WITH (connector = 'postgres')`).
        name: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Parse and plan every pipeline, print each plan, and list every error with file:line.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Pipelines folder; overrides the config's pipelines.dir.
        #[arg(long)]
        pipelines: Option<PathBuf>,
    },
    /// The lineage graph, from MQTT topics to alert sinks, with column-level
    /// edges: whole, or upstream/downstream of one node.
    Lineage {
        /// A node: its name (`terminal_health_1m`) or id (`view:terminal_health_1m`).
        name: Option<String>,
        /// Only what NAME is computed from.
        #[arg(long, conflicts_with = "downstream")]
        upstream: bool,
        /// Only what is computed from NAME.
        #[arg(long)]
        downstream: bool,
        /// Draw every column and column edge (mermaid, dot).
        #[arg(long)]
        columns: bool,
        /// json, mermaid, dot, openlineage or svg.
        #[arg(long, default_value = "json")]
        format: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Pipelines folder; overrides the config's pipelines.dir.
        #[arg(long)]
        pipelines: Option<PathBuf>,
    },
    /// What a start with the current pipeline files would do to the stored
    /// state: which views and rules are new, changed (rebuilt from the log),
    /// downstream of a change, removed, or kept.
    Plan {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Pipelines folder; overrides the config's pipelines.dir.
        #[arg(long)]
        pipelines: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the documentation site: an index, the lineage graph and one
    /// page per stream, view and alert (the same pages weir serves at /docs/).
    Docs {
        /// Where to write it.
        #[arg(long, default_value = "weir-docs")]
        out: PathBuf,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Pipelines folder; overrides the config's pipelines.dir.
        #[arg(long)]
        pipelines: Option<PathBuf>,
    },
    /// Run one view definition over the ingest log's recent events and print
    /// the rows it would write; nothing is stored. While weir runs (the data
    /// folder is in use) it asks the running weir (http.listen; a token in
    /// WEIR_TOKEN when the API has tokens).
    Preview {
        /// A file holding one CREATE VIEW statement.
        file: PathBuf,
        /// Events that arrived since: `-15m`, an RFC 3339 time, or epoch ms.
        #[arg(long, default_value = "-15m", allow_hyphen_values = true)]
        from: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Pipelines folder; overrides the config's pipelines.dir.
        #[arg(long)]
        pipelines: Option<PathBuf>,
    },
    /// API tokens: `weir token new --name dashboard --scopes read`.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// MQTT users: `weir user new T00042 --role terminal`.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Make a random token: print it once, and the [[http.tokens]] entry
    /// (with its SHA-256, not the token) to paste into weir.toml.
    New {
        /// Who holds it (shown in logs).
        #[arg(long, default_value = "token")]
        name: String,
        /// Comma-separated: read, query, ack, admin.
        #[arg(long, value_delimiter = ',', default_value = "read")]
        scopes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Make an MQTT user: a random password (or one read from stdin), printed
    /// once, and the [[user]] entry (argon2id hash) to paste into the users file.
    New {
        /// The user name; for a terminal, its terminal id (its topics are
        /// terminals/{name}/...).
        name: String,
        /// terminal, reader or admin.
        #[arg(long, default_value = "terminal")]
        role: String,
        /// Read the password from the first line of stdin instead of making one.
        #[arg(long)]
        password_stdin: bool,
    },
}

fn new_token(name: &str, scopes: &[String]) -> ExitCode {
    use weir::auth::http::{new_token, token_digest, Scope};
    let mut parsed = Vec::new();
    for scope in scopes {
        match Scope::parse(scope) {
            Ok(s) => parsed.push(s.as_str()),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let token = new_token();
    println!("token (shown once; weir keeps only its hash): {token}");
    println!();
    println!("[[http.tokens]]");
    println!("name = {name:?}");
    println!("token_sha256 = {:?}", token_digest(&token));
    println!("scopes = {parsed:?}");
    ExitCode::SUCCESS
}

fn new_user(name: &str, role: &str, password_stdin: bool) -> ExitCode {
    use weir::auth::mqtt::{hash_password, valid_user_name, Role};
    if let Err(e) = valid_user_name(name) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let role: Role = match serde_json::from_value(serde_json::Value::String(role.into())) {
        Ok(r) => r,
        Err(_) => {
            eprintln!("error: unknown role {role:?}: expected terminal, reader or admin");
            return ExitCode::from(2);
        }
    };
    let password = if password_stdin {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut line) {
            eprintln!("error: cannot read the password from stdin: {e}");
            return ExitCode::from(2);
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            eprintln!("error: empty password on stdin");
            return ExitCode::from(2);
        }
        line
    } else {
        let token = weir::auth::http::new_token();
        token.trim_start_matches("weir_")[..24].to_string()
    };
    let hash = match hash_password(&password) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: cannot hash the password: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !password_stdin {
        println!("password (shown once; weir keeps only its hash): {password}");
        println!();
    }
    println!("[[user]]");
    println!("name = {name:?}");
    println!("password_hash = {hash:?}");
    println!(
        "role = {:?}",
        serde_json::to_value(role)
            .unwrap_or_default()
            .as_str()
            .unwrap_or("terminal")
    );
    ExitCode::SUCCESS
}

/// Plans the pipelines of `config` (or `pipelines`), printing every error.
fn plan_or_report(
    config: Option<PathBuf>,
    pipelines: Option<PathBuf>,
) -> Result<(Config, plan::Pipeline), ExitCode> {
    let config = load_config(config)?;
    let dir = pipelines.unwrap_or_else(|| config.pipelines.dir.clone());
    match plan::plan_dir(&dir) {
        Ok(p) => Ok((config, p)),
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "\n{} error(s) in {}; `weir check` lists them",
                errors.len(),
                dir.display()
            );
            Err(ExitCode::from(1))
        }
    }
}

fn lineage(
    name: Option<String>,
    direction: weir::lineage::Direction,
    columns: bool,
    format: &str,
    config: Option<PathBuf>,
    pipelines: Option<PathBuf>,
) -> ExitCode {
    use weir::lineage::render::{render, Format};
    let format = match Format::parse(format) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (config, pipeline) = match plan_or_report(config, pipelines) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut graph = weir::lineage::build(&pipeline, &config.alerts);
    if let Some(name) = name {
        match graph.resolve(&name) {
            Ok(node) => {
                let id = node.id.clone();
                graph = graph.around(&id, direction);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    print!("{}", render(&graph, format, columns));
    ExitCode::SUCCESS
}

/// The stored state of `config`'s data folder, and where it was read from.
fn stored_state(config: &Config) -> Result<(weir::plan::changes::Deployed, String), String> {
    use weir::plan::changes::Deployed;
    let dir = &config.storage.dir;
    if !dir.join("lock").exists() && !dir.join(weir::engine::DEPLOYED_FILE).exists() {
        return Ok((
            Deployed::default(),
            format!(
                "no stored state in {}: everything starts new",
                dir.display()
            ),
        ));
    }
    match weir::store::Store::open(dir) {
        Ok(store) => weir::engine::deployed(&store)
            .map(|d| {
                (
                    d,
                    format!("compared with the stored state in {}", dir.display()),
                )
            })
            .map_err(|e| e.to_string()),
        Err(e) if e.is_locked() => {
            let path = dir.join(weir::engine::DEPLOYED_FILE);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "weir is running on {} and {} cannot be read: {e}",
                    dir.display(),
                    path.display()
                )
            })?;
            let d: Deployed =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok((
                d,
                format!(
                    "weir is running on {}: compared with the pipelines it runs",
                    dir.display()
                ),
            ))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn plan_command(config: Option<PathBuf>, pipelines: Option<PathBuf>, json: bool) -> ExitCode {
    let (config, pipeline) = match plan_or_report(config, pipelines) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let (deployed, source) = match stored_state(&config) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let changes = weir::plan::changes::changes(
        &pipeline,
        &deployed,
        weir::obs::now_ms(),
        config.storage.log_retention,
        config.storage.view_retention,
    );
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&changes).unwrap_or_default()
        );
    } else {
        println!("{source}");
        if let Some(at) = changes.checkpoint_at {
            println!("newest checkpoint: {}", weir::obs::format_time(at));
        }
        println!();
        print!("{}", weir::plan::changes::describe(&changes));
    }
    ExitCode::SUCCESS
}

fn docs(out: &std::path::Path, config: Option<PathBuf>, pipelines: Option<PathBuf>) -> ExitCode {
    let (config, pipeline) = match plan_or_report(config, pipelines) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let graph = weir::lineage::build(&pipeline, &config.alerts);
    let pages = weir::docs::site(&graph, &pipeline, &config, &Default::default());
    if let Err(e) = std::fs::create_dir_all(out) {
        eprintln!("error: cannot create {}: {e}", out.display());
        return ExitCode::from(1);
    }
    for (name, html) in &pages {
        if let Err(e) = std::fs::write(out.join(name), html) {
            eprintln!("error: cannot write {}: {e}", out.join(name).display());
            return ExitCode::from(1);
        }
    }
    println!(
        "wrote {} pages to {} (open {})",
        pages.len(),
        out.display(),
        out.join("index.html").display()
    );
    ExitCode::SUCCESS
}

fn preview(
    file: &std::path::Path,
    from: &str,
    config: Option<PathBuf>,
    pipelines: Option<PathBuf>,
) -> ExitCode {
    use weir::engine::preview::{self, PreviewError};
    let sql = match std::fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let (config, pipeline) = match plan_or_report(config, pipelines) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let now = weir::obs::now_ms();
    let from_ms = match weir::api::parse_from(from, now) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}", e.message());
            return ExitCode::from(2);
        }
    };
    let store = match weir::store::Store::open_with_cache(
        &config.storage.dir,
        config.storage.cache_bytes,
    ) {
        Ok(s) => s,
        Err(e) if e.is_locked() => return preview_remote(&config, &sql, from),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let planned = preview::plan_preview(&pipeline, &sql);
    let result = planned.and_then(|(p, view)| {
        let deadline = std::time::Instant::now() + config.http.query_timeout;
        preview::run(&store, &p, &view, from_ms, now, deadline, 10_000)
    });
    match result {
        Ok(p) => {
            println!(
                "view {} ({}): {} rows from {} records ({} events) since {}{}",
                p.view,
                p.shape,
                p.rows.len(),
                p.records,
                p.events,
                weir::obs::format_time(from_ms),
                if p.truncated { ", truncated" } else { "" }
            );
            for row in &p.rows {
                println!("{row}");
            }
            ExitCode::SUCCESS
        }
        Err(PreviewError::Plan(errors)) => {
            for e in errors {
                eprintln!("{}:{}: {}", file.display(), e.line, e.message);
            }
            ExitCode::from(1)
        }
        Err(PreviewError::Timeout) => {
            eprintln!("error: the preview took longer than http.query_timeout; try a later --from");
            ExitCode::from(1)
        }
        Err(PreviewError::Failed(why)) => {
            eprintln!("error: {why}");
            ExitCode::from(1)
        }
    }
}

/// The data folder is in use: ask the running weir.
fn preview_remote(config: &Config, sql: &str, from: &str) -> ExitCode {
    let url = format!("http://{}/api/v1/pipelines/preview", config.http.listen);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let answer = runtime.block_on(async {
        let mut request = reqwest::Client::new()
            .post(&url)
            .json(&serde_json::json!({"sql": sql, "from": from}));
        if let Ok(token) = std::env::var("WEIR_TOKEN") {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        Ok::<_, reqwest::Error>((status, response.text().await?))
    });
    match answer {
        Ok((status, body)) if status.is_success() => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("error: weir answered {status}: {body}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: the data folder is in use and {url} did not answer: {e}");
            ExitCode::from(1)
        }
    }
}

/// The config file to use: the one given, else `config/weir.toml` when it exists.
fn config_path(given: Option<PathBuf>) -> Option<PathBuf> {
    given.or_else(|| {
        let default = PathBuf::from("config/weir.toml");
        default.exists().then_some(default)
    })
}

fn load_config(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    Config::load(config_path(path).as_deref(), std::env::vars()).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    tune_allocator();
    if let Some(dir) = std::env::var_os("WEIR_ALLOC_STATS") {
        write_allocator_stats(PathBuf::from(dir));
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            action: TokenAction::New { name, scopes },
        } => new_token(&name, &scopes),
        Command::User {
            action:
                UserAction::New {
                    name,
                    role,
                    password_stdin,
                },
        } => new_user(&name, &role, password_stdin),
        Command::Lineage {
            name,
            upstream,
            downstream,
            columns,
            format,
            config,
            pipelines,
        } => {
            let direction = match (upstream, downstream) {
                (true, _) => weir::lineage::Direction::Upstream,
                (_, true) => weir::lineage::Direction::Downstream,
                _ => weir::lineage::Direction::Both,
            };
            lineage(name, direction, columns, &format, config, pipelines)
        }
        Command::Preview {
            file,
            from,
            config,
            pipelines,
        } => preview(&file, &from, config, pipelines),
        Command::Docs {
            out,
            config,
            pipelines,
        } => docs(&out, config, pipelines),
        Command::Plan {
            config,
            pipelines,
            json,
        } => plan_command(config, pipelines, json),
        Command::ResetSource { name, config } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let pipeline = match plan::plan_dir(&config.pipelines.dir) {
                Ok(p) => p,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    return ExitCode::from(1);
                }
            };
            let Some(table) = pipeline.table(&name.to_ascii_lowercase()).cloned() else {
                eprintln!(
                    "error: no reference table named {name:?} in {}",
                    config.pipelines.dir.display()
                );
                return ExitCode::from(1);
            };
            let Some(connection) = config
                .connections
                .iter()
                .find(|c| c.name == table.connection)
                .cloned()
            else {
                eprintln!(
                    "error: connection {:?} is not in the config's [[connections]]",
                    table.connection
                );
                return ExitCode::from(1);
            };
            let reset = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| rt.block_on(weir::postgres::reset_source(&table, &connection)));
            match reset {
                Ok(done) => {
                    for line in done {
                        println!("{line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { config, pipelines } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let dir = pipelines.unwrap_or_else(|| config.pipelines.dir.clone());
            match plan::plan_dir(&dir).and_then(|p| {
                let unknown = weir::engine::unknown_connections(&p, &config);
                if !unknown.is_empty() {
                    return Err(unknown);
                }
                // sink tables that exist must fit their views (where Postgres answers)
                let unfit = match p.sinks.is_empty() {
                    true => Vec::new(),
                    false => tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map(|rt| rt.block_on(weir::engine::check_sink_tables(&p, &config, false)))
                        .unwrap_or_default(),
                };
                match unfit.is_empty() {
                    true => Ok(p),
                    false => Err(unfit),
                }
            }) {
                Ok(pipeline) => {
                    print!("{}", plan::describe(&pipeline));
                    // what a start would rebuild, when the stored state can be read
                    if let Ok((deployed, _)) = stored_state(&config) {
                        let changes = plan::changes::changes(
                            &pipeline,
                            &deployed,
                            weir::obs::now_ms(),
                            config.storage.log_retention,
                            config.storage.view_retention,
                        );
                        for w in &changes.warnings {
                            eprintln!("warning: {w}");
                        }
                    }
                    println!(
                        "\nok: {} streams, {} tables, {} views, {} alerts, {} sinks in {}",
                        pipeline.streams.len(),
                        pipeline.tables.len(),
                        pipeline.views.len(),
                        pipeline.alerts.len(),
                        pipeline.sinks.len(),
                        dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    eprintln!("\n{} error(s) in {}", errors.len(), dir.display());
                    ExitCode::from(1)
                }
            }
        }
        Command::Run { config } => {
            weir::obs::init_tracing();
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let pipeline = match plan::plan_dir(&config.pipelines.dir) {
                Ok(p) => p,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    eprintln!("\nweir did not start: {} error(s) in the pipelines; `weir check` lists them", errors.len());
                    return ExitCode::from(1);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            runtime.block_on(async move {
                let running = match weir::engine::start(config, pipeline).await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(1);
                    }
                };
                match running.wait_for(shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod allocator_tests {
    use super::*;

    /// The option number names `purge_delay` in the mimalloc built here:
    /// it reads mimalloc 3's default, 1000 ms, until set (an upgrade that
    /// renumbers the options fails this test instead of tuning something
    /// else).
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads and sets a plain integer option.
        unsafe {
            let before = libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY);
            assert!(before == 1000 || before == 0, "purge_delay read {before}");
            tune_allocator();
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 0);
        }
    }
}
