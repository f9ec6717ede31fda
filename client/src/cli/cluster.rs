//! Running the cluster: `recur local`, `recur worker`, `recur workers`, and generated data.

use std::path::PathBuf;

use recur_core::data::{BallConfig, SeriesConfig};
use serde_json::json;

use super::args::{LocalArgs, WorkerArgs};
use super::error::{CliError, Result, exit};
use super::json;
use super::text::workers_table;
use crate::Client;
use crate::local::LocalCluster;

/// A `--device` value this build and host can compute on, or the error that says what to do.
pub(crate) fn parse_device(device: &str) -> Result<recur_worker::DeviceSpec> {
    let spec: recur_worker::DeviceSpec = device.parse().map_err(|e: recur_worker::Error| {
        CliError::new(e.to_string(), "use --device cpu or cuda:N")
    })?;
    spec.open().map_err(|e| {
        CliError::new(
            e.to_string(),
            "use --device cpu, or a build with --features cuda on a host with that GPU",
        )
    })?;
    Ok(spec)
}

/// `recur worker`: runs until Ctrl-C or SIGTERM.
pub(super) async fn worker(
    args: WorkerArgs,
    coordinator: String,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<()> {
    let device = parse_device(&args.device)?;
    let name = args
        .name
        .unwrap_or_else(|| format!("recur-worker-{}", std::process::id()));
    let mut config = recur_worker::WorkerConfig::new(coordinator, name);
    config.device = device;
    config.threads = args.threads;
    config.token = args.worker_token;
    config.tls = tls;
    if let Some(addr) = &args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::new(
                format!("--metrics-listen {addr} (RECUR_METRICS_LISTEN): {e}"),
                "pick a free address",
            )
            .with_code(exit::USAGE)
        })?;
        let metrics = recur_worker::WorkerMetrics::new(&config.name, &config.device.to_string())
            .map_err(|e| CliError::new(format!("metrics: {e}"), ""))?;
        config.metrics = Some(metrics.clone());
        tokio::spawn(async move {
            if let Err(e) =
                recur_worker::serve_metrics(listener, metrics, std::future::pending()).await
            {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    recur_worker::run(config, recur_worker::shutdown_signal())
        .await
        .map_err(|e| CliError::new(e.to_string(), "check --coordinator and the worker token"))
}

/// `recur workers`.
pub(super) async fn workers(client: &mut Client, as_json: bool) -> Result<()> {
    let workers = client.workers().await?;
    if as_json {
        println!(
            "{}",
            serde_json::Value::Array(workers.iter().map(json::worker).collect())
        );
    } else {
        workers_table(&workers);
    }
    Ok(())
}

/// `recur gen ball`.
pub(super) fn gen_ball(config: BallConfig, output: PathBuf, as_json: bool) -> Result<()> {
    let rows = config.rows;
    let data = config
        .generate()
        .map_err(|e| CliError::new(e.to_string(), "use 2 <= --min-len <= --max-len"))?;
    std::fs::write(&output, data.to_csv())
        .map_err(|e| CliError::new(format!("{}: {e}", output.display()), ""))?;
    if as_json {
        println!("{}", json!({"path": output, "rows": rows}));
    } else {
        println!("wrote {rows} rows to {}", output.display());
    }
    Ok(())
}

pub(super) fn gen_series(config: SeriesConfig, output: PathBuf, as_json: bool) -> Result<()> {
    std::fs::write(&output, config.to_csv())
        .map_err(|e| CliError::new(format!("{}: {e}", output.display()), ""))?;
    if as_json {
        println!("{}", json!({"path": output, "steps": config.steps}));
    } else {
        println!(
            "wrote {} days (date,temp,demand,price) to {}",
            config.steps,
            output.display()
        );
    }
    Ok(())
}

pub(super) async fn local(args: LocalArgs) -> Result<()> {
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(tempfile::tempdir()?),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.path().to_path_buf()))
        .unwrap_or_default();
    let mut config = recur_coordinator::CoordinatorConfig::new(&data_dir);
    config.keep_checkpoints = args.keep_checkpoints as usize;
    config.write_delay = std::time::Duration::from_millis(args.test_write_delay_ms);
    let device = parse_device(&args.device)?;
    let cluster = LocalCluster::start_on(&args.listen, config, args.workers, device)
        .await
        .map_err(|e| {
            CliError::new(
                e.to_string(),
                "pick another address with --listen, e.g. 127.0.0.1:0",
            )
        })?;
    println!(
        "recur local: coordinator on {} with {} workers on {device}, data in {}",
        cluster.url(),
        args.workers,
        data_dir.display()
    );
    println!(
        "try: recur --coordinator {} workers    (Ctrl-C stops)",
        cluster.url()
    );
    recur_worker::shutdown_signal().await;
    eprintln!("stopping");
    cluster
        .shutdown()
        .await
        .map_err(|e| CliError::new(e.to_string(), ""))?;
    Ok(())
}
