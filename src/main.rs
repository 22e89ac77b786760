//! The `weir` binary: `weir run` serves, `weir check` plans every pipeline.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use weir::config::Config;
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
    /// Parse and plan every pipeline, print each plan, and list every error with file:line.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Pipelines folder; overrides the config's pipelines.dir.
        #[arg(long)]
        pipelines: Option<PathBuf>,
    },
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
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, pipelines } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let dir = pipelines.unwrap_or(config.pipelines.dir);
            match plan::plan_dir(&dir) {
                Ok(pipeline) => {
                    print!("{}", plan::describe(&pipeline));
                    println!(
                        "\nok: {} streams, {} views, {} alerts in {}",
                        pipeline.streams.len(),
                        pipeline.views.len(),
                        pipeline.alerts.len(),
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
