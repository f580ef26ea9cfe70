//! `apisix-agent`: eBPF profiler for Apache APISIX and OpenResty (nginx + ngx_lua + LuaJIT).
//!
//! This file only parses the command line and hands it to the library ([`apisix_agent`]),
//! whose modules do the work.
//!
//! Hooks and metrics: those of the command run (`record`, `run`).

use std::{path::PathBuf, process::ExitCode};

use apisix_agent::{config, daemon, output, record};
use clap::{Parser, Subcommand};

/// eBPF profiler for APISIX / OpenResty: mixed C + Lua flame graphs of CPU time, blocked time
/// and Lua memory.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sample one process (all its threads) and write a flame graph or folded stacks.
    Record(record::RecordArgs),
    /// Run the daemon: discover APISIX/OpenResty workers, sample them continuously, and serve
    /// Prometheus metrics, flame graphs and pprof profiles over HTTP.
    Run {
        /// YAML configuration (see config.example.yaml); without it, the built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Render folded stacks (`root;…;leaf COUNT` lines) as an SVG flame graph.
    Render {
        /// Folded input (default: standard input).
        #[arg(long, short)]
        input: Option<PathBuf>,
        /// SVG output (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Title of the graph.
        #[arg(long, default_value = "Flame graph")]
        title: String,
    },
    /// The per-path difference of two folded profiles (two heap snapshots, or any two
    /// folded files): a differential flame graph (widths of AFTER, growth red) or
    /// `stack BEFORE AFTER` lines.
    Diff {
        /// The earlier profile (folded stacks).
        before: PathBuf,
        /// The later profile (folded stacks).
        after: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = output::diff::DiffFormat::Svg)]
        format: output::diff::DiffFormat,
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Load every BPF program this kernel runs (in the variant it needs) and check the
    /// verifier's figures against their budgets; exits non-zero when a program is refused or
    /// over budget. Needs root.
    CheckKernel {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file and print the effective configuration.
    CheckConfig {
        /// YAML configuration to check.
        config: PathBuf,
    },
    /// Read a password from standard input (one line, at most 72 bytes: bcrypt ignores the
    /// rest) and print its bcrypt hash, for `http.basic_auth_users`.
    HashPassword {
        /// bcrypt cost (4..=31); each step doubles the time a check takes.
        #[arg(long, default_value_t = 10)]
        cost: u32,
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
        Command::Record(args) => record::run(&args).map_err(anyhow::Error::new),
        Command::Run { config } => daemon::run(config.as_deref()).map_err(anyhow::Error::new),
        Command::CheckConfig { config } => check_config(&config),
        Command::CheckKernel { json } => check_kernel(json),
        Command::HashPassword { cost } => {
            daemon::auth::hash_password_line(std::io::stdin().lock(), cost)
                .map_err(anyhow::Error::new)
                .and_then(|hash| print_line(&hash))
        }
        Command::Render {
            input,
            output,
            title,
        } => render(input.as_deref(), output.as_deref(), &title),
        Command::Diff {
            before,
            after,
            format,
            output,
        } => output::diff::diff_files(&before, &after, format, output.as_deref())
            .map(|d| {
                if d.bad_lines > 0 {
                    eprintln!("diff: {} lines were not folded stacks", d.bad_lines);
                }
            })
            .map_err(anyhow::Error::new),
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

/// A `--phase` value.
fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    let config = config::Config::load(Some(path))?;
    let text = serde_yaml::to_string(&config)?;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

/// `check-kernel`: the table or JSON on standard output; fails when the check does.
fn check_kernel(json: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let check = apisix_agent::sampling::check::check_kernel();
    let text = if json {
        serde_json::to_string_pretty(&check)? + "\n"
    } else {
        check.text()
    };
    std::io::stdout().write_all(text.as_bytes())?;
    if check.ok {
        Ok(())
    } else {
        anyhow::bail!("some BPF programs do not load within their budgets on this kernel")
    }
}

/// Writes `text` and a line end to standard output.
fn print_line(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    std::io::stdout().write_all(format!("{text}\n").as_bytes())?;
    Ok(())
}

/// `render`: folded text in, SVG out; says on stderr how long rendering took.
fn render(
    input: Option<&std::path::Path>,
    output: Option<&std::path::Path>,
    title: &str,
) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};

    use anyhow::Context as _;
    let mut text = String::new();
    match input {
        Some(p) => {
            text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        }
        None => {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
        }
    }
    let (folded, bad) = output::Folded::parse(&text);
    if bad > 0 {
        eprintln!("skipped {bad} lines that are not `stack COUNT`");
    }
    let started = std::time::Instant::now();
    let mut svg = Vec::new();
    folded.write_svg(title, &mut svg).context("rendering")?;
    let took = started.elapsed();
    match output {
        Some(p) => std::fs::write(p, &svg).with_context(|| format!("writing {}", p.display()))?,
        None => std::io::stdout()
            .write_all(&svg)
            .context("writing standard output")?,
    }
    eprintln!(
        "rendered {} samples ({} distinct stacks) in {:.1} ms",
        folded.total(),
        folded.lines().len(),
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}
