//! Jobs: train (upload, submit, watch), list, status, watch, cancel, plot.

use std::path::Path;

use recur_proto::v1 as pb;
use serde_json::json;

use super::args::{ModelArg, OptimizerArg, TrainArgs};
use super::error::{CliError, Result, exit};
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use super::progress::Progress;
use super::text::{jobs_table, print_job, print_summary};
use super::{json, plot};
use crate::{Client, ClientError};

/// `recur jobs`.
pub(super) async fn list(client: &mut Client, as_json: bool) -> Result<()> {
    let jobs = client.jobs().await?;
    if as_json {
        println!(
            "{}",
            serde_json::Value::Array(jobs.iter().map(json::job).collect())
        );
    } else {
        jobs_table(&jobs);
    }
    Ok(())
}

/// `recur status JOB`.
pub(super) async fn status(client: &mut Client, job: &str, as_json: bool) -> Result<()> {
    let info = client.job(job).await?;
    print_job(&info, as_json);
    Ok(())
}

/// `recur watch JOB`: exits 0 when the job completed, 1 when it failed, 3 when cancelled.
pub(super) async fn follow(client: &mut Client, job: &str, as_json: bool) -> Result<()> {
    let info = watch(client, job, as_json).await?;
    if !as_json {
        print_summary(&info);
    }
    outcome(&info)
}

/// The exit status of a command that followed a job to its end.
pub(super) fn outcome(info: &pb::JobInfo) -> Result<()> {
    match pb::JobState::try_from(info.state) {
        Ok(pb::JobState::Failed) => Err(CliError::new(
            format!("{} failed: {}", info.id, info.message),
            format!("`recur status {}` shows the job", info.id),
        )),
        Ok(pb::JobState::Cancelled) => Err(CliError::new(
            format!("{} was cancelled: {}", info.id, info.message),
            "",
        )
        .with_code(exit::CANCELLED)),
        _ => Ok(()),
    }
}

/// `recur cancel JOB`.
pub(super) async fn cancel(client: &mut Client, job: &str, as_json: bool) -> Result<()> {
    let info = client.cancel(job).await?;
    if as_json {
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

/// `recur plot JOB -o FILE`.
pub(super) async fn plot(
    client: &mut Client,
    job: &str,
    output: &Path,
    as_json: bool,
) -> Result<()> {
    let (epochs, _) = history(client, job).await?;
    if epochs.is_empty() {
        return Err(CliError::new(
            format!("{job} has no finished epoch yet"),
            "plot it once an epoch is done",
        ));
    }
    plot::accuracy_chart(output, &format!("{job}: accuracy per epoch"), &epochs)?;
    if as_json {
        println!("{}", json!({"path": output, "epochs": epochs.len()}));
    } else {
        println!("wrote {} ({} epochs)", output.display(), epochs.len());
    }
    Ok(())
}

/// A job's epochs so far and its current state (does not wait for the job to end).
pub(super) async fn history(
    client: &mut Client,
    job: &str,
) -> Result<(Vec<pb::EpochMetrics>, pb::JobInfo)> {
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

/// Follows a job until it ends (or Ctrl-C, which leaves it running); returns its final state.
pub(super) async fn watch(client: &mut Client, job: &str, as_json: bool) -> Result<pb::JobInfo> {
    let mut stream = client.watch(job).await?;
    let mut progress = Progress::new(as_json);
    let mut last = None;
    loop {
        let msg = tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                progress.finish();
                return Err(CliError::new(
                    format!("stopped watching; {job} keeps running"),
                    format!("`recur watch {job}` follows it again, `recur cancel {job}` stops it"),
                )
                .with_code(exit::INTERRUPTED));
            }
            msg = stream.message() => msg.map_err(ClientError::from)?,
        };
        let Some(msg) = msg else { break };
        match msg.event {
            Some(pb::watch_job_response::Event::Epoch(e)) => {
                if as_json {
                    println!("{}", json!({"event": "epoch", "epoch": json::epoch(&e)}));
                }
                progress.epoch(&e);
            }
            Some(pb::watch_job_response::Event::Job(j)) => {
                if as_json {
                    println!("{}", json!({"event": "job", "job": json::job(&j)}));
                }
                progress.job(&j);
                last = Some(j);
            }
            None => {}
        }
    }
    progress.finish();
    last.ok_or_else(|| {
        CliError::new(
            format!("the coordinator ended the stream of {job} early"),
            "",
        )
    })
}

pub(super) fn train_spec(args: &TrainArgs, dataset_id: String) -> Result<pb::JobSpec> {
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
            .as_deref()
            .and_then(Path::file_name)
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

pub(super) async fn train(client: &mut Client, args: TrainArgs, as_json: bool) -> Result<()> {
    let dataset_id = match (&args.file, &args.dataset) {
        (Some(file), _) => {
            let bytes = std::fs::read(file)
                .map_err(|e| CliError::new(format!("{}: {e}", file.display()), "check the path"))?;
            let uploaded = upload(client, file, bytes).await?;
            if !as_json {
                let rows = uploaded.stats.map_or(0, |s| s.rows);
                eprintln!(
                    "uploaded {} ({rows} rows) as dataset {}",
                    file.display(),
                    uploaded.dataset_id
                );
            }
            uploaded.dataset_id
        }
        (None, Some(id)) => id.clone(),
        (None, None) => {
            return Err(CliError::new(
                "no data to train on",
                "give a CSV file or --dataset ID",
            ));
        }
    };
    let spec = train_spec(&args, dataset_id.clone())?;
    let submitted = client.submit(spec).await?;
    let job = submitted.job_id;
    if !as_json {
        eprintln!(
            "submitted {job} ({} ahead in the queue)",
            submitted.queue_position
        );
    }
    if args.detach {
        if as_json {
            println!("{}", json!({"job_id": job, "dataset_id": dataset_id}));
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
    outcome(&info)
}
