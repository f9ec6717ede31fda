//! `recur`: parses the command line, sets up logging and runs the command; errors become one
//! line, a hint and a non-zero exit.

use std::io::IsTerminal;

use clap::Parser;
use recur_client::cli::exit;
use recur_client::cli::{self, Cli};

fn main() {
    let cli = Cli::try_parse().unwrap_or_else(|e| usage_error(e));
    let as_json = cli.json;
    // `recur worker --threads N` sizes this process's compute pool; everything else (embedded
    // workers of demo and local, each computing on its own thread) uses one thread unless the
    // environment says otherwise, so the matmul pool never oversubscribes the cores.
    let threads = match &cli.command {
        cli::Command::Worker(args) => Some(args.threads.max(1).to_string()),
        _ => None,
    };
    // SAFETY: nothing else runs yet (no runtime, no threads), so no one reads the environment
    // while it changes.
    #[allow(unsafe_code)]
    unsafe {
        for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
            match &threads {
                Some(n) => std::env::set_var(var, n),
                None if std::env::var_os(var).is_none() => std::env::set_var(var, "1"),
                None => {}
            }
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| cli::CliError::new(e.to_string(), ""))
        .and_then(|rt| rt.block_on(cli::run(cli)));
    if let Err(e) = result {
        #[allow(clippy::print_stderr)]
        if as_json {
            eprintln!(
                "{}",
                serde_json::json!({"error": e.message, "hint": e.hint, "exit_code": e.code})
            );
        } else {
            eprintln!("error: {}", e.message);
            if !e.hint.is_empty() {
                eprintln!("  hint: {}", e.hint);
            }
        }
        std::process::exit(e.code);
    }
}

/// A command line clap refused: its own message and exit code 2, or with `--json` (flag or
/// RECUR_JSON) one JSON line on stderr like every other error. Help and version go out as clap
/// prints them.
fn usage_error(e: clap::Error) -> ! {
    let falsey = ["", "0", "false", "no", "off", "n", "f"];
    let wants_json = std::env::args_os().any(|a| a == "--json")
        || std::env::var("RECUR_JSON")
            .is_ok_and(|v| !falsey.contains(&v.trim().to_ascii_lowercase().as_str()));
    if !e.use_stderr() || !wants_json {
        e.exit();
    }
    let rendered = e.render().to_string();
    let message = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim_start_matches("error: ");
    let usage = rendered
        .lines()
        .find_map(|l| l.strip_prefix("Usage: "))
        .unwrap_or("recur [OPTIONS] <COMMAND>");
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "{}",
            serde_json::json!({
                "error": message,
                "hint": format!("usage: {usage} (`recur help` lists everything)"),
                "exit_code": exit::USAGE,
            })
        );
    }
    std::process::exit(exit::USAGE)
}
