//! `recur-coordinator`: parses flags, sets up logging, binds, and runs the coordinator.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use recur_coordinator::CoordinatorConfig;
use recur_coordinator::auth::Secret;

/// The recur coordinator: accepts datasets and jobs, drives workers, serves predictions.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "RECUR_LISTEN", default_value = "0.0.0.0:7070")]
    listen: String,
    /// Also serve `GET /metrics` over plain HTTP here (for example 0.0.0.0:9464), apart from
    /// the gRPC port and its TLS.
    #[arg(long, env = "RECUR_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Where datasets, the job store and checkpoints are kept.
    #[arg(long, env = "RECUR_DATA_DIR", default_value = "recur-data")]
    data_dir: PathBuf,
    /// Drop a worker not heard from for this many milliseconds.
    #[arg(long, env = "RECUR_HEARTBEAT_TIMEOUT_MS", default_value_t = 3000)]
    heartbeat_timeout_ms: u64,
    /// Largest dataset upload, in bytes.
    #[arg(long, env = "RECUR_MAX_UPLOAD_BYTES", default_value_t = 64 << 20)]
    max_upload_bytes: usize,
    /// Most rows in a dataset.
    #[arg(long, env = "RECUR_MAX_ROWS", default_value_t = 5_000_000)]
    max_rows: usize,
    /// Most values in one row.
    #[arg(long, env = "RECUR_MAX_ROW_LEN", default_value_t = 4096)]
    max_row_len: usize,
    /// Uploads at once.
    #[arg(long, env = "RECUR_MAX_CONCURRENT_UPLOADS", default_value_t = 4)]
    max_concurrent_uploads: usize,
    /// Jobs waiting in the queue.
    #[arg(long, env = "RECUR_MAX_QUEUED_JOBS", default_value_t = 100)]
    max_queued_jobs: usize,
    /// Most parameters a job's model may have.
    #[arg(long, env = "RECUR_MAX_PARAMS", default_value_t = 10_000_000)]
    max_params: usize,
    /// Largest gRPC message, in bytes.
    #[arg(long, env = "RECUR_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    max_message_bytes: usize,
    /// Most sequences in one Predict request.
    #[arg(long, env = "RECUR_MAX_PREDICT_ROWS", default_value_t = 10_000)]
    max_predict_rows: usize,
    /// Most PredictStream sessions open at once (idle ones count until they expire).
    #[arg(long, env = "RECUR_MAX_STREAM_SESSIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_stream_sessions: u32,
    /// A PredictStream session with no stream on it for this many seconds is closed.
    #[arg(long, env = "RECUR_STREAM_IDLE_SECS", default_value_t = 600)]
    stream_idle_secs: u64,
    /// Token clients must send as `authorization: Bearer <token>`.
    #[arg(long, env = "RECUR_CLIENT_TOKEN", hide_env_values = true, value_parser = recur_proto::token::parse)]
    client_token: Option<String>,
    /// Token workers must send.
    #[arg(long, env = "RECUR_WORKER_TOKEN", hide_env_values = true, value_parser = recur_proto::token::parse)]
    worker_token: Option<String>,
    /// A running job with no worker for this many seconds fails.
    #[arg(long, env = "RECUR_NO_WORKER_GRACE_S", default_value_t = 600)]
    no_worker_grace_s: u64,
    /// Every worker holds a job's whole training split when it has at most this many values
    /// (steps are then split exactly by each worker's measured speed); above it each worker
    /// holds a shard sized to its speed. 4 bytes a value per worker.
    #[arg(long, env = "RECUR_REPLICATE_VALUES", default_value_t = 1 << 25)]
    replicate_values: usize,
    /// Seconds a worker gets at least for its part of a step or evaluation (all it gets while
    /// its speed is unknown; otherwise ten times what its measured speed predicts; twice that
    /// right after a new shard, doubled for each miss of the same work). A worker that misses
    /// it (a hung compute whose heartbeats go on) is dropped and its part reissued.
    #[arg(long, env = "RECUR_PART_DEADLINE_S", default_value_t = 60)]
    part_deadline_s: u64,
    /// Checkpoint sets kept per job and role (latest, best); the sets in use are always kept.
    #[arg(long, env = "RECUR_KEEP_CHECKPOINTS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    keep_checkpoints: u64,
    /// Test hook: every store and checkpoint write takes this many ms longer (a slow disk).
    #[arg(long, default_value_t = 0, hide = true)]
    test_write_delay_ms: u64,
    /// Server certificate (PEM); with --tls-key, serves TLS only.
    #[arg(long, env = "RECUR_SERVER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server key (PEM).
    #[arg(long, env = "RECUR_SERVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates are required (mutual TLS).
    #[arg(long, env = "RECUR_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "RECUR_LOG_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_json);
    let mut config = CoordinatorConfig::new(&args.data_dir);
    config.heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    config.csv.max_bytes = args.max_upload_bytes;
    config.csv.max_rows = args.max_rows;
    config.csv.max_row_len = args.max_row_len;
    config.max_concurrent_uploads = args.max_concurrent_uploads;
    config.max_queued_jobs = args.max_queued_jobs;
    config.spec.max_params = args.max_params;
    config.max_message_bytes = args.max_message_bytes;
    config.max_predict_rows = args.max_predict_rows;
    config.max_stream_sessions = args.max_stream_sessions as usize;
    config.stream_idle = Duration::from_secs(args.stream_idle_secs);
    config.client_token = args.client_token.map(Secret::new);
    config.worker_token = args.worker_token.map(Secret::new);
    config.no_worker_grace = Duration::from_secs(args.no_worker_grace_s);
    config.replicate_values = args.replicate_values;
    config.part_deadline_floor = Duration::from_secs(args.part_deadline_s);
    config.keep_checkpoints = args.keep_checkpoints as usize;
    config.write_delay = Duration::from_millis(args.test_write_delay_ms);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
        );
        if let Some(ca) = &args.tls_client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        config.tls = Some(tls);
    }
    if args.data_dir.exists() && !args.data_dir.is_dir() {
        anyhow::bail!(
            "--data-dir {} (RECUR_DATA_DIR) is not a directory",
            args.data_dir.display()
        );
    }
    // Refused now, in one line, rather than as the store's error after the listener is up.
    let probe = args.data_dir.join(".recur-write-check");
    std::fs::create_dir_all(&args.data_dir)
        .and_then(|()| std::fs::write(&probe, b""))
        .and_then(|()| std::fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "--data-dir {} (RECUR_DATA_DIR) is not writable",
                args.data_dir.display()
            )
        })?;
    config.validate()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| {
                format!(
                    "--listen {} (RECUR_LISTEN): cannot listen there",
                    args.listen
                )
            })?;
        let metrics = match &args.metrics_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("--metrics-listen {addr} (RECUR_METRICS_LISTEN): cannot listen there")
            })?),
            None => None,
        };
        recur_coordinator::serve(listener, metrics, config, shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald, `docker logs` and files get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
