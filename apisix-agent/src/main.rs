//! `apisix-agent`: eBPF profiler for Apache APISIX and OpenResty (nginx + ngx_lua + LuaJIT).
//!
//! This file only wires the command line to the modules that do the work.

mod aggregate;
mod bpf;
mod capture;
mod config;
mod continuous;
mod daemon;
mod discovery;
mod fold;
mod http;
mod luajit;
mod memory;
mod metrics;
mod process;
mod record;
mod stacks;
mod symbolize;
mod unwind;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

/// eBPF CPU profiler for APISIX / OpenResty: mixed C + Lua flame graphs.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sample one process (all its threads) and write a flame graph or folded stacks.
    Record {
        /// Process to sample.
        #[arg(long)]
        pid: u32,
        /// How long to sample, in seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Samples per second per CPU.
        #[arg(long, default_value_t = 99)]
        frequency: u64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = record::Format::Svg)]
        format: record::Format,
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Name Lua frames by their current line instead of the function's first line.
        #[arg(long)]
        lines: bool,
    },
    /// Run the node daemon: discover targets (host and Docker), sample them continuously,
    /// serve /metrics, /flamegraph, /targets and /healthz.
    Run {
        /// YAML configuration (see config.example.yaml); without it, the built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and print the effective configuration.
    CheckConfig {
        /// YAML configuration to check.
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its lifecycle; one-shot commands only warnings.
    let default_filter = match cli.command {
        Command::Run { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Record {
            pid,
            duration,
            frequency,
            format,
            output,
            lines,
        } => record::run(&record::RecordOptions {
            pid,
            duration: Duration::from_secs(duration),
            frequency,
            format,
            output,
            style: if lines {
                luajit::NameStyle::CurrentLine
            } else {
                luajit::NameStyle::FirstLine
            },
        }),
        Command::Run { config } => daemon::run(config.as_deref()),
        Command::CheckConfig { config } => check_config(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

/// `check-config`: validates a file and prints the effective configuration as YAML.
fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    let config = config::Config::load(Some(path))?;
    let text = serde_yaml::to_string(&config)?;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}
