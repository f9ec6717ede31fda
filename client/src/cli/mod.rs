//! The `recur` command line: every subcommand, its output (text or `--json`) and its errors
//! (one line, a hint, a non-zero exit).

mod args;
mod bench;
mod demo;
mod json;
mod plot;

pub use args::{Cli, Command};

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use args::{CheckpointArgs, GenCommand, LocalArgs, ModelArg, OptimizerArg, PredictArgs, TrainArgs};
use indicatif::{ProgressBar, ProgressStyle};
use recur_core::data::BallConfig;
use recur_proto::v1 as pb;
use serde_json::json;

use crate::local::LocalCluster;
use crate::{Client, ClientError};

/// A failed command: one line, a hint, and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// What went wrong (may span lines when a file has several bad lines).
    pub message: String,
    /// What to do about it; empty for none.
    pub hint: String,
    /// The process exit code.
    pub code: i32,
}

impl CliError {
    /// An error with a hint, exit code 1.
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: hint.into(),
            code: 1,
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Unreachable { .. } => Self::new(
                e.to_string(),
                "start a cluster with `recur local`, or point --coordinator (RECUR_COORDINATOR) at one",
            ),
            ClientError::Status(s) => {
                let hint = match s.code() {
                    tonic::Code::NotFound => "`recur jobs` lists the jobs",
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                        "pass the coordinator's client token with --token or RECUR_TOKEN"
                    }
                    tonic::Code::Unavailable => {
                        "is the coordinator running? `recur local` starts one"
                    }
                    _ => "",
                };
                Self::new(e.to_string(), hint)
            }
            ClientError::BadToken => Self::new(e.to_string(), "use a token of printable ASCII"),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        Self::new(e.to_string(), "")
    }
}

type Result<T, E = CliError> = std::result::Result<T, E>;

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

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let tls = match &cli.tls_ca {
        Some(ca) => Some(
            recur_worker::client_tls(
                ca,
                cli.tls_cert.as_deref().zip(cli.tls_key.as_deref()),
                cli.tls_domain.as_deref(),
            )
            .map_err(|e| CliError::new(e.to_string(), "check the --tls-* files"))?,
        ),
        None => None,
    };
    let connect = || Client::connect_with(&cli.coordinator, cli.token.as_deref(), tls.clone());
    match cli.command {
        Command::Demo(args) => demo::run(args, cli.json).await,
        Command::Bench(args) => bench::run(args, cli.json).await,
        Command::Local(args) => local(args).await,
        Command::Worker(args) => {
            let device = parse_device(&args.device)?;
            let name = args
                .name
                .unwrap_or_else(|| format!("recur-worker-{}", std::process::id()));
            let mut config = recur_worker::WorkerConfig::new(cli.coordinator.clone(), name);
            config.device = device;
            config.threads = args.threads;
            config.token = args.worker_token;
            config.tls = tls;
            recur_worker::run(config, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| CliError::new(e.to_string(), "check --coordinator and the worker token"))
        }
        Command::Gen(GenCommand::Ball {
            rows,
            seed,
            min_len,
            max_len,
            output,
        }) => {
            let config = BallConfig {
                rows,
                seed,
                min_len,
                max_len,
                ..BallConfig::tutorial(seed)
            };
            let data = config
                .generate()
                .map_err(|e| CliError::new(e.to_string(), "use 2 <= --min-len <= --max-len"))?;
            std::fs::write(&output, data.to_csv())
                .map_err(|e| CliError::new(format!("{}: {e}", output.display()), ""))?;
            if cli.json {
                println!("{}", json!({"path": output, "rows": rows}));
            } else {
                println!("wrote {rows} rows to {}", output.display());
            }
            Ok(())
        }
        Command::Train(args) => train(&mut connect().await?, args, cli.json).await,
        Command::Jobs => {
            let jobs = connect().await?.jobs().await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::Value::Array(jobs.iter().map(json::job).collect())
                );
            } else if jobs.is_empty() {
                println!("no jobs");
            } else {
                println!(
                    "{:<10} {:<10} {:>7} {:>9} {:>9}  NAME",
                    "ID", "STATE", "EPOCHS", "BEST VAL", "TEST"
                );
                for j in &jobs {
                    println!(
                        "{:<10} {:<10} {:>7} {:>9} {:>9}  {}",
                        j.id,
                        json::state_name(j.state),
                        j.epochs,
                        percent(j.best_validation.as_ref()),
                        percent(j.test.as_ref()),
                        j.spec.as_ref().map_or("", |s| s.name.as_str())
                    );
                }
            }
            Ok(())
        }
        Command::Status { job } => {
            let info = connect().await?.job(&job).await?;
            print_job(&info, cli.json);
            Ok(())
        }
        Command::Watch { job } => {
            let mut client = connect().await?;
            let info = watch(&mut client, &job, cli.json).await?;
            if !cli.json {
                print_summary(&info);
            }
            Ok(())
        }
        Command::Cancel { job } => {
            let info = connect().await?.cancel(&job).await?;
            if cli.json {
                println!("{}", json::job(&info));
            } else {
                println!(
                    "{} {} at epoch {}, step {}",
                    info.id,
                    json::state_name(info.state),
                    info.epochs,
                    info.steps
                );
            }
            Ok(())
        }
        Command::Workers => {
            let workers = connect().await?.workers().await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::Value::Array(workers.iter().map(json::worker).collect())
                );
            } else if workers.is_empty() {
                println!("no workers connected");
            } else {
                println!(
                    "{:<6} {:<20} {:<8} {:>7} {:<10} {:>8} {:>9} {:>10} {:>12} {:>10}",
                    "ID",
                    "NAME",
                    "DEVICE",
                    "THREADS",
                    "JOB",
                    "ROWS",
                    "STEPS",
                    "TRAINED",
                    "STEPS/S",
                    "LAST SEEN"
                );
                for w in &workers {
                    println!(
                        "{:<6} {:<20} {:<8} {:>7} {:<10} {:>8} {:>9} {:>10} {:>12.0} {:>8}ms",
                        w.id,
                        w.name,
                        w.device,
                        w.threads,
                        if w.job_id.is_empty() { "-" } else { &w.job_id },
                        w.shard_rows,
                        w.steps,
                        w.train_rows,
                        w.steps_per_second,
                        w.last_seen_ms_ago
                    );
                }
            }
            Ok(())
        }
        Command::Predict(args) => predict(&mut connect().await?, args, cli.json).await,
        Command::Checkpoint(args) => checkpoint(&mut connect().await?, args, cli.json).await,
        Command::Plot { job, output } => {
            let mut client = connect().await?;
            let (epochs, _) = history(&mut client, &job).await?;
            if epochs.is_empty() {
                return Err(CliError::new(
                    format!("{job} has no finished epoch yet"),
                    "plot it once an epoch is done",
                ));
            }
            plot::accuracy_chart(&output, &format!("{job}: accuracy per epoch"), &epochs)?;
            if cli.json {
                println!("{}", json!({"path": output, "epochs": epochs.len()}));
            } else {
                println!("wrote {} ({} epochs)", output.display(), epochs.len());
            }
            Ok(())
        }
    }
}

fn percent(m: Option<&pb::Metrics>) -> String {
    m.map_or("-".into(), |m| format!("{:.2}%", m.accuracy * 100.0))
}

fn print_job(info: &pb::JobInfo, as_json: bool) {
    if as_json {
        println!("{}", json::job(info));
        return;
    }
    let spec = info.spec.clone().unwrap_or_default();
    println!("job        {}", info.id);
    if !spec.name.is_empty() {
        println!("name       {}", spec.name);
    }
    println!(
        "state      {}{}",
        json::state_name(info.state),
        if info.message.is_empty() {
            String::new()
        } else {
            format!(" ({})", info.message)
        }
    );
    println!("dataset    {}", spec.dataset_id);
    println!("epochs     {} ({} steps)", info.epochs, info.steps);
    if let Some(v) = &info.best_validation {
        println!(
            "best       epoch {}: validation accuracy {:.2}%, MAE {:.4}",
            info.best_epoch,
            v.accuracy * 100.0,
            v.mae
        );
    }
    if let Some(e) = &info.last_epoch {
        let t = e.timing.unwrap_or_default();
        println!(
            "last epoch {}: loss {:.3e}, {:.0} samples/s, {} workers, step {:.3} ms (compute {:.3}, wait {:.3})",
            e.epoch,
            e.train_loss,
            e.samples_per_sec,
            e.workers,
            t.total_ms,
            t.compute_ms,
            t.wait_ms
        );
    }
    if let Some(t) = &info.test {
        println!(
            "test       accuracy {:.2}%, MAE {:.4}, exact {:.2}%",
            t.accuracy * 100.0,
            t.mae,
            t.exact * 100.0
        );
    }
    if !info.stop_reason.is_empty() {
        println!("stopped by {}", info.stop_reason);
    }
    for w in &info.warnings {
        println!("warning    {w}");
    }
}

fn print_summary(info: &pb::JobInfo) {
    match pb::JobState::try_from(info.state) {
        Ok(pb::JobState::Completed) => {
            let t = info.test.unwrap_or_default();
            println!(
                "{} completed ({}) after {} epochs; best epoch {}",
                info.id, info.stop_reason, info.epochs, info.best_epoch
            );
            println!(
                "test accuracy {:.2}%  MAE {:.4}  exact {:.2}%",
                t.accuracy * 100.0,
                t.mae,
                t.exact * 100.0
            );
        }
        _ => println!(
            "{} {}{}",
            info.id,
            json::state_name(info.state),
            if info.message.is_empty() {
                String::new()
            } else {
                format!(": {}", info.message)
            }
        ),
    }
}

/// A job's epochs so far and its current state (does not wait for the job to end).
async fn history(client: &mut Client, job: &str) -> Result<(Vec<pb::EpochMetrics>, pb::JobInfo)> {
    let mut stream = client.watch(job).await?;
    let mut epochs = Vec::new();
    while let Some(msg) = stream.message().await.map_err(ClientError::from)? {
        match msg.event {
            Some(pb::watch_job_response::Event::Epoch(e)) => epochs.push(e),
            Some(pb::watch_job_response::Event::Job(j)) => return Ok((epochs, j)),
            None => {}
        }
    }
    Err(CliError::new(
        format!("the coordinator ended the stream of {job} early"),
        "",
    ))
}

fn epoch_bar(max_epochs: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(max_epochs);
    bar.set_style(
        ProgressStyle::with_template("{spinner} epoch {pos} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn epoch_line(e: &pb::EpochMetrics) -> String {
    let v = e.validation.unwrap_or_default();
    format!(
        "loss {:.2e} | train acc {:.4} | val acc {:.4} | val MAE {:.4} | {:.0} samples/s | {} workers",
        e.train_loss, e.train_accuracy, v.accuracy, v.mae, e.samples_per_sec, e.workers
    )
}

/// Follows a job until it ends (or Ctrl-C, which leaves it running); returns its final state.
async fn watch(client: &mut Client, job: &str, as_json: bool) -> Result<pb::JobInfo> {
    let mut stream = client.watch(job).await?;
    let bar = epoch_bar(0);
    let mut last = None;
    loop {
        let msg = tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                bar.finish_and_clear();
                eprintln!("stopped watching; {job} keeps running (`recur cancel {job}` stops it)");
                std::process::exit(0);
            }
            msg = stream.message() => msg.map_err(ClientError::from)?,
        };
        let Some(msg) = msg else { break };
        match msg.event {
            Some(pb::watch_job_response::Event::Epoch(e)) => {
                if as_json {
                    println!("{}", json!({"event": "epoch", "epoch": json::epoch(&e)}));
                }
                bar.set_position(e.epoch);
                bar.set_message(epoch_line(&e));
            }
            Some(pb::watch_job_response::Event::Job(j)) => {
                if as_json {
                    println!("{}", json!({"event": "job", "job": json::job(&j)}));
                }
                if !j.message.is_empty() {
                    bar.set_message(j.message.clone());
                }
                last = Some(j);
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    last.ok_or_else(|| {
        CliError::new(
            format!("the coordinator ended the stream of {job} early"),
            "",
        )
    })
}

fn train_spec(args: &TrainArgs, dataset_id: String) -> Result<pb::JobSpec> {
    let kind = match args.model {
        ModelArg::RnnTanh => pb::ModelKind::RnnTanh,
        ModelArg::RnnRelu => pb::ModelKind::RnnRelu,
        ModelArg::Lstm => pb::ModelKind::Lstm,
        ModelArg::Gru => pb::ModelKind::Gru,
    };
    let optimizer = match args.optimizer {
        OptimizerArg::Sgd => pb::optimizer_spec::Kind::Sgd,
        OptimizerArg::Adam => pb::optimizer_spec::Kind::Adam,
        OptimizerArg::Adamw => pb::optimizer_spec::Kind::Adamw,
        OptimizerArg::Adadelta => pb::optimizer_spec::Kind::Adadelta,
    };
    if let Some(lr) = args.lr
        && !(lr.is_finite() && lr > 0.0)
    {
        return Err(CliError::new(
            format!("--lr {lr} is not a positive number"),
            "for example --lr 0.01",
        ));
    }
    let (scale, scale_auto) = if args.scale == "auto" {
        (None, true)
    } else {
        match args.scale.parse::<f32>() {
            Ok(v) if v.is_finite() && v > 0.0 => (Some(v), false),
            _ => {
                return Err(CliError::new(
                    format!(
                        "--scale {} is neither `auto` nor a positive number",
                        args.scale
                    ),
                    "for example --scale 50 or --scale auto",
                ));
            }
        }
    };
    let name = args.name.clone().unwrap_or_else(|| {
        args.file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    });
    Ok(pb::JobSpec {
        name,
        dataset_id,
        model: Some(pb::ModelConfig {
            kind: kind as i32,
            input_size: 1,
            hidden_size: args.hidden,
            num_layers: args.layers,
            bidirectional: args.bidirectional,
            output_size: 1,
        }),
        optimizer: Some(pb::OptimizerSpec {
            kind: optimizer as i32,
            lr: args.lr,
            ..Default::default()
        }),
        batch_size: Some(args.batch),
        max_epochs: args.epochs,
        patience: args.patience,
        target_accuracy: args.target_accuracy,
        seed: args.seed,
        scale,
        scale_auto,
        ..Default::default()
    })
}

/// Uploads a file with a byte progress bar; returns the dataset id.
pub(crate) async fn upload(
    client: &mut Client,
    path: &Path,
    bytes: Vec<u8>,
) -> Result<pb::UploadDatasetResponse> {
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(bytes.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("uploading {bytes}/{total_bytes} {wide_bar} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let progress = bar.clone();
    let name = path.display().to_string();
    let result = client
        .upload(&name, bytes, move |n| progress.set_position(n))
        .await;
    bar.finish_and_clear();
    result.map_err(|e| match e.code() {
        Some(tonic::Code::InvalidArgument) => {
            CliError::new(e.to_string(), "fix the file and run again")
        }
        _ => e.into(),
    })
}

async fn train(client: &mut Client, args: TrainArgs, as_json: bool) -> Result<()> {
    let bytes = std::fs::read(&args.file)
        .map_err(|e| CliError::new(format!("{}: {e}", args.file.display()), "check the path"))?;
    let uploaded = upload(client, &args.file, bytes).await?;
    let spec = train_spec(&args, uploaded.dataset_id.clone())?;
    let submitted = client.submit(spec).await?;
    let job = submitted.job_id;
    if !as_json {
        let rows = uploaded.stats.map_or(0, |s| s.rows);
        eprintln!(
            "uploaded {} ({rows} rows) as dataset {}",
            args.file.display(),
            &uploaded.dataset_id[..12]
        );
        eprintln!(
            "submitted {job} ({} ahead in the queue)",
            submitted.queue_position
        );
    }
    if args.detach {
        if as_json {
            println!(
                "{}",
                json!({"job_id": job, "dataset_id": uploaded.dataset_id})
            );
        } else {
            println!("{job}");
        }
        return Ok(());
    }
    let info = watch(client, &job, as_json).await?;
    if !as_json {
        print_summary(&info);
        println!("job id: {job}");
    }
    if pb::JobState::try_from(info.state) == Ok(pb::JobState::Failed) {
        return Err(CliError::new(
            format!("{job} failed: {}", info.message),
            "`recur status` shows the job",
        ));
    }
    Ok(())
}

/// Parses `1,3,5,7` (spaces allowed) into values.
fn parse_history(text: &str) -> Result<Vec<f32>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the history is empty".into());
    }
    text.split(',')
        .enumerate()
        .map(|(i, v)| {
            let v = v.trim();
            match v.parse::<f32>() {
                Ok(x) if x.is_finite() => Ok(x),
                _ => Err(format!("value {} `{v}` is not a number", i + 1)),
            }
        })
        .collect()
}

async fn predict(client: &mut Client, args: PredictArgs, as_json: bool) -> Result<()> {
    let job = args.job;
    if args.interactive {
        let stdin = std::io::stdin();
        let mut stdout = std::io::stdout();
        loop {
            print!("History ball locations: ");
            stdout.flush()?;
            let mut line = String::new();
            if stdin.lock().read_line(&mut line)? == 0 {
                println!();
                return Ok(());
            }
            if line.trim().is_empty() {
                continue;
            }
            match parse_history(&line) {
                Err(e) => println!("error: {e}"),
                Ok(history) => match client.predict(&job, vec![history]).await {
                    Ok(r) => println!("Next ball location: {}", format_value(r.predictions[0])),
                    Err(e) if e.code() == Some(tonic::Code::InvalidArgument) => {
                        println!("error: {e}")
                    }
                    Err(e) => return Err(e.into()),
                },
            }
        }
    }
    let history = args.history.unwrap_or_default();
    if history == "-" {
        let mut rows = Vec::new();
        for (i, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            rows.push(parse_history(&line).map_err(|e| {
                CliError::new(
                    format!("stdin:{}: {e}", i + 1),
                    "give one history per line, like 1,3,5,7",
                )
            })?);
        }
        if rows.is_empty() {
            return Err(CliError::new(
                "stdin has no histories",
                "give one history per line, like 1,3,5,7",
            ));
        }
        let mut predictions = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(1000) {
            predictions.extend(client.predict(&job, chunk.to_vec()).await?.predictions);
        }
        if as_json {
            println!("{}", json!({"predictions": predictions}));
        } else {
            for p in predictions {
                println!("{}", format_value(p));
            }
        }
        return Ok(());
    }
    let values =
        parse_history(&history).map_err(|e| CliError::new(e, "give a history like 1,3,5,7"))?;
    let r = client.predict(&job, vec![values]).await?;
    if as_json {
        println!(
            "{}",
            json!({"predictions": r.predictions, "epoch": r.epoch})
        );
    } else {
        println!("{}", format_value(r.predictions[0]));
    }
    Ok(())
}

/// A prediction with four decimals, trailing zeros trimmed.
fn format_value(v: f32) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_string() }
}

async fn checkpoint(client: &mut Client, args: CheckpointArgs, as_json: bool) -> Result<()> {
    let (manifest, bytes) = client.checkpoint(&args.job, args.latest).await?;
    let manifest_path = args.output.with_extension("json");
    recur_core::checkpoint::atomic_write(&args.output, &bytes)
        .map_err(|e| CliError::new(e.to_string(), "check the output path"))?;
    recur_core::checkpoint::atomic_write(&manifest_path, manifest.as_bytes())
        .map_err(|e| CliError::new(e.to_string(), "check the output path"))?;
    if as_json {
        println!(
            "{}",
            json!({"path": args.output, "manifest": manifest_path, "bytes": bytes.len()})
        );
    } else {
        println!(
            "wrote {} ({} bytes) and {}",
            args.output.display(),
            bytes.len(),
            manifest_path.display()
        );
    }
    Ok(())
}

async fn local(args: LocalArgs) -> Result<()> {
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
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("stopping");
    cluster
        .shutdown()
        .await
        .map_err(|e| CliError::new(e.to_string(), ""))?;
    Ok(())
}
