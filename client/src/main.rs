//! `recur`: parses the command line, sets up logging and runs the command; errors become one
//! line, a hint and a non-zero exit.

use std::io::IsTerminal;

use clap::Parser;
use recur_client::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
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
