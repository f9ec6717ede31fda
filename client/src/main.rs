//! `recur`: parses the command line, sets up logging and runs the command; errors become one
//! line, a hint and a non-zero exit.

use std::io::IsTerminal;

use clap::Parser;
use recur_client::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    // SAFETY: nothing else runs yet (no runtime, no threads). Embedded workers (demo, local) each
    // compute on their own thread; candle's matmul pool must not oversubscribe the cores.
    #[allow(unsafe_code)]
    unsafe {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", "1");
        }
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
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
        {
            eprintln!("error: {}", e.message);
            if !e.hint.is_empty() {
                eprintln!("  hint: {}", e.hint);
            }
        }
        std::process::exit(e.code);
    }
}
