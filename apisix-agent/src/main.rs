//! `apisix-agent`: eBPF profiler for Apache APISIX and OpenResty (nginx + ngx_lua + LuaJIT).
//!
//! This file only wires the command line to the modules that do the work.

mod bpf;
mod fold;
mod luajit;
mod memory;
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
