//! `recur-worker`: parses flags, sizes the compute thread pool, and runs a worker.

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use recur_worker::{DeviceSpec, WorkerConfig};

/// A recur worker: joins a coordinator and computes gradients for its jobs.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "RECUR_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// Name shown in `recur workers` (default: host name and process id).
    #[arg(long, env = "RECUR_WORKER_NAME")]
    name: Option<String>,
    /// `cpu` or `cuda:N` (the latter needs a build with `--features cuda`).
    #[arg(long, env = "RECUR_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Compute threads. Keep the total over all workers of a host at or below its free cores:
    /// candle's pool spins and collapses when oversubscribed.
    #[arg(long, env = "RECUR_THREADS", default_value_t = 1)]
    threads: u32,
    /// Token to present to the coordinator.
    #[arg(long, env = "RECUR_WORKER_TOKEN", hide_env_values = true, value_parser = recur_proto::token::parse)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the coordinator's; enables TLS (use an https:// URL).
    #[arg(long, env = "RECUR_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for a coordinator that requires mutual TLS.
    #[arg(
        long,
        env = "RECUR_TLS_CERT",
        requires = "tls_key",
        requires = "tls_ca"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM).
    #[arg(long, env = "RECUR_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Name expected in the coordinator's certificate, when not the URL's host.
    #[arg(long, env = "RECUR_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Serve this worker's own metrics (`GET /metrics`, plain HTTP) here, for example
    /// 0.0.0.0:9465.
    #[arg(long, env = "RECUR_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "RECUR_LOG_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = args.threads.max(1).to_string();
    // SAFETY: nothing else runs yet (no runtime, no threads), so no one reads the environment
    // while it changes. candle and rayon size their pools from these variables.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &threads);
        std::env::set_var("CANDLE_NUM_THREADS", &threads);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald, `docker logs` and files get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let mut config = WorkerConfig::new(args.coordinator, name);
    config.device = args.device;
    config.threads = args.threads;
    config.token = args.token;
    if let Some(ca) = &args.tls_ca {
        let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
        config.tls = Some(recur_worker::client_tls(
            ca,
            identity,
            args.tls_domain.as_deref(),
        )?);
    }
    // One thread does all the networking: a step's messages then hop between fewer threads
    // (measured: 0.25 -> 0.16 ms of coordination a step on the tutorial model). Computing runs
    // on its own thread either way.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let metrics_listen = args.metrics_listen;
    runtime.block_on(async move {
        if let Some(addr) = &metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("--metrics-listen {addr} (RECUR_METRICS_LISTEN): cannot listen there")
            })?;
            let metrics =
                recur_worker::WorkerMetrics::new(&config.name, &config.device.to_string())
                    .context("metrics")?;
            config.metrics = Some(metrics.clone());
            tracing::info!(addr = %listener.local_addr()?, "metrics served over HTTP");
            tokio::spawn(async move {
                // Ends with the process.
                if let Err(e) =
                    recur_worker::serve_metrics(listener, metrics, std::future::pending()).await
                {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            });
        }
        recur_worker::run(config, recur_worker::shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
