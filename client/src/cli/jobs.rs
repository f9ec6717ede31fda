//! Jobs: train (upload, submit, watch), list, status, watch, cancel, plot.

use std::path::Path;

use recur_proto::v1 as pb;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::args::{LabelArg, LossArg, ModelArg, OptimizerArg, TrainArgs};
use super::error::{CliError, Result, exit};
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use super::progress::Progress;
use super::text::{datasets_table, jobs_table, print_job, print_summary};
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

/// The spec `recur train` submits: the `--spec` file's (or an empty one), with every flag given
/// written over it. What neither sets is left to the coordinator's defaults.
pub(super) fn train_spec(args: &TrainArgs, base: pb::JobSpec) -> Result<pb::JobSpec> {
    let mut spec = base;
    let model_flags = args.model.is_some()
        || args.hidden.is_some()
        || args.layers.is_some()
        || args.bidirectional.is_some()
        || args.head.is_some();
    if model_flags {
        // Over the spec's model, or the tutorial's.
        let model = spec.model.get_or_insert(pb::ModelConfig {
            kind: pb::ModelKind::RnnTanh as i32,
            input_size: 1,
            hidden_size: 8,
            num_layers: 1,
            bidirectional: false,
            output_size: 1,
            head: Default::default(),
        });
        if let Some(kind) = args.model {
            model.kind = match kind {
                ModelArg::RnnTanh => pb::ModelKind::RnnTanh,
                ModelArg::RnnRelu => pb::ModelKind::RnnRelu,
                ModelArg::Lstm => pb::ModelKind::Lstm,
                ModelArg::Gru => pb::ModelKind::Gru,
            } as i32;
        }
        if let Some(hidden) = args.hidden {
            model.hidden_size = hidden;
        }
        if let Some(layers) = args.layers {
            model.num_layers = layers;
        }
        if let Some(both) = args.bidirectional {
            model.bidirectional = both;
        }
        if let Some(head) = &args.head {
            model.head.clone_from(head);
        }
    }
    if let Some(p) = args.dropout {
        if !(p.is_finite() && (0.0..1.0).contains(&p)) {
            return Err(CliError::new(
                format!("--dropout {p} is not at least 0 and below 1"),
                "for example --dropout 0.2 with --head 32",
            ));
        }
        spec.dropout = p;
    }
    if let Some(lr) = args.lr
        && !(lr.is_finite() && lr > 0.0)
    {
        return Err(CliError::new(
            format!("--lr {lr} is not a positive number"),
            "for example --lr 0.01",
        ));
    }
    if args.optimizer.is_some() || args.lr.is_some() {
        let optimizer = spec.optimizer.get_or_insert_with(Default::default);
        if let Some(kind) = args.optimizer {
            optimizer.kind = match kind {
                OptimizerArg::Sgd => pb::optimizer_spec::Kind::Sgd,
                OptimizerArg::Adam => pb::optimizer_spec::Kind::Adam,
                OptimizerArg::Adamw => pb::optimizer_spec::Kind::Adamw,
                OptimizerArg::Adadelta => pb::optimizer_spec::Kind::Adadelta,
            } as i32;
        }
        if args.lr.is_some() {
            optimizer.lr = args.lr;
        }
    }
    if let Some(scale) = &args.scale {
        use pb::Normalization as N;
        let normalization;
        (spec.scale, spec.scale_auto, normalization) = match scale.as_str() {
            "auto" => (None, true, N::Fixed),
            "standard" => (None, false, N::Standard),
            "minmax" => (None, false, N::Minmax),
            _ => match scale.parse::<f32>() {
                Ok(v) if v.is_finite() && v > 0.0 => (Some(v), false, N::Fixed),
                _ => {
                    return Err(CliError::new(
                        format!(
                            "--scale {scale} is none of `auto`, `standard`, `minmax` or a positive number"
                        ),
                        "for example --scale 50, --scale auto or --scale standard",
                    ));
                }
            },
        };
        spec.normalization = normalization as i32;
    }
    if let Some(loss) = args.loss {
        spec.loss = match loss {
            LossArg::Mse => pb::Loss::Mse,
            LossArg::Bce => pb::Loss::Bce,
        } as i32;
    }
    series_flags(args, &mut spec)?;
    if let Some(batch) = args.batch {
        spec.batch_size = Some(batch);
    }
    if let Some(epochs) = args.epochs {
        spec.max_epochs = epochs;
    }
    if let Some(patience) = args.patience {
        spec.patience = patience;
    }
    if args.target_accuracy.is_some() {
        spec.target_accuracy = args.target_accuracy;
    }
    if let Some(seed) = args.seed {
        spec.seed = seed;
    }
    if let Some(job) = &args.init_from {
        spec.init_from.clone_from(job);
    }
    if let Some(name) = &args.name {
        spec.name.clone_from(name);
    } else if spec.name.is_empty()
        && let Some(file) = args.file.as_deref().and_then(Path::file_name)
    {
        spec.name = file.to_string_lossy().into_owned();
    }
    Ok(spec)
}

/// The series flags, over the spec file's `series` (any of them makes the job a series job).
fn series_flags(args: &TrainArgs, spec: &mut pb::JobSpec) -> Result<()> {
    let s = &args.series;
    let any = s.series
        || !s.features.is_empty()
        || !s.targets.is_empty()
        || s.window.is_some()
        || s.stride.is_some()
        || s.horizon.is_some()
        || s.drop_missing
        || s.order_by.is_some()
        || !s.column_scale.is_empty()
        || s.label.is_some()
        || s.every_step
        || s.stateful.is_some();
    if !any {
        return Ok(());
    }
    let series = spec.series.get_or_insert_with(|| pb::SeriesSpec {
        window: 1,
        stride: 1,
        horizon: 1,
        ..Default::default()
    });
    if !s.features.is_empty() {
        series.features.clone_from(&s.features);
    }
    if !s.targets.is_empty() {
        series.targets.clone_from(&s.targets);
    }
    if let Some(w) = s.window {
        series.window = w;
    }
    if let Some(stride) = s.stride {
        series.stride = stride;
    }
    if let Some(h) = s.horizon {
        series.horizon = h;
    }
    if s.drop_missing {
        series.drop_missing = true;
    }
    if let Some(order) = &s.order_by {
        series.order_by.clone_from(order);
    }
    if let Some(LabelArg::Rises) = s.label {
        series.label = pb::LabelRule::Rises as i32;
    }
    if s.every_step {
        series.every_step = true;
    }
    if let Some(streams) = s.stateful {
        // Consecutive windows, each a chunk of the stream, with a target at every step.
        series.stateful = streams;
        series.every_step = true;
        if s.stride.is_none() {
            series.stride = series.window;
        }
    }
    for pair in &s.column_scale {
        let parsed = pair
            .split_once('=')
            .and_then(|(c, v)| Some((c.trim(), v.trim().parse::<f32>().ok()?)))
            .filter(|(c, v)| !c.is_empty() && v.is_finite() && *v > 0.0);
        let Some((column, scale)) = parsed else {
            return Err(CliError::new(
                format!("--column-scale {pair} is not COLUMN=DIVISOR"),
                "for example --column-scale volume=1e8",
            ));
        };
        series.column_scales.insert(column.to_string(), scale);
    }
    // The model's sizes follow the columns (the coordinator fills in zeros).
    if let Some(model) = spec.model.as_mut() {
        model.input_size = 0;
        model.output_size = 0;
    }
    Ok(())
}

/// Reads a `--spec` file.
fn read_spec(path: &Path) -> Result<pb::JobSpec> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::new(format!("{}: {e}", path.display()), "check the path"))?;
    serde_json::from_str(&text).map_err(|e| {
        CliError::new(
            format!("{}: {e}", path.display()),
            "a job spec is the JSON form of recur.v1.JobSpec; `recur train --print-spec` writes one",
        )
    })
}

/// The full id of a dataset given whole or as a unique prefix.
pub(super) async fn dataset_id(client: &mut Client, given: &str) -> Result<String> {
    if given.len() == 64 {
        return Ok(given.to_ascii_lowercase());
    }
    let given = given.to_ascii_lowercase();
    let matches: Vec<String> = client
        .datasets()
        .await?
        .into_iter()
        .map(|d| d.id)
        .filter(|id| !given.is_empty() && id.starts_with(&given))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(CliError::new(
            format!("no dataset id starts with `{given}`"),
            "`recur datasets` lists them",
        )),
        _ => Err(CliError::new(
            format!("{} dataset ids start with `{given}`", matches.len()),
            "give more digits",
        )),
    }
}

/// Uploads a file with a byte progress bar; returns the dataset id.
pub(crate) async fn upload(
    client: &mut Client,
    path: &Path,
    bytes: Vec<u8>,
    layout: pb::DatasetLayout,
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
        .upload_as(&name, bytes, layout, move |n| progress.set_position(n))
        .await;
    bar.finish_and_clear();
    result.map_err(|e| match e.code() {
        Some(tonic::Code::InvalidArgument) => {
            CliError::new(e.to_string(), "fix the file and run again")
        }
        _ => e.into(),
    })
}

/// `recur train --print-spec`: the spec `train` would submit, as a `--spec` file, without
/// uploading or submitting anything (a coordinator is asked only to resolve a `--dataset`
/// prefix).
pub(super) async fn print_spec(client: Option<&mut Client>, args: TrainArgs) -> Result<()> {
    let mut spec = train_spec(&args, base_spec(&args)?)?;
    if let Some(file) = &args.file {
        // The id the file would be uploaded under.
        let bytes = std::fs::read(file)
            .map_err(|e| CliError::new(format!("{}: {e}", file.display()), "check the path"))?;
        spec.dataset_id = hex::encode(Sha256::digest(&bytes));
    } else if let (Some(id), Some(client)) = (&args.dataset, client) {
        spec.dataset_id = dataset_id(client, id).await?;
    }
    let text = serde_json::to_string_pretty(&spec)
        .map_err(|e| CliError::new(format!("cannot write the spec: {e}"), ""))?;
    println!("{text}");
    Ok(())
}

fn base_spec(args: &TrainArgs) -> Result<pb::JobSpec> {
    match &args.spec {
        Some(path) => read_spec(path),
        None => Ok(pb::JobSpec::default()),
    }
}

pub(super) async fn train(client: &mut Client, args: TrainArgs, as_json: bool) -> Result<()> {
    let base = base_spec(&args)?;
    let mut spec = train_spec(&args, base)?;
    spec.dataset_id = match (&args.file, &args.dataset) {
        (Some(file), _) => {
            let bytes = std::fs::read(file)
                .map_err(|e| CliError::new(format!("{}: {e}", file.display()), "check the path"))?;
            let layout = if spec.series.is_some() {
                pb::DatasetLayout::Series
            } else {
                pb::DatasetLayout::Rows
            };
            let uploaded = upload(client, file, bytes, layout).await?;
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
        (None, Some(id)) => dataset_id(client, id).await?,
        (None, None) if !spec.dataset_id.is_empty() => spec.dataset_id.clone(),
        (None, None) => {
            return Err(CliError::new(
                "no data to train on",
                "give a CSV file, --dataset ID, or a --spec with a dataset_id",
            )
            .with_code(exit::USAGE));
        }
    };
    let dataset_id = spec.dataset_id.clone();
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

/// `recur delete JOB`.
pub(super) async fn delete(client: &mut Client, job: &str, as_json: bool) -> Result<()> {
    let info = client.delete_job(job).await?;
    if as_json {
        println!("{}", json!({"deleted": json::job(&info)}));
    } else {
        println!(
            "deleted {} ({}, {} epochs) with its history and checkpoints",
            info.id,
            json::state_name(info.state),
            info.epochs
        );
    }
    Ok(())
}

/// `recur datasets [list]`.
pub(super) async fn datasets(client: &mut Client, as_json: bool) -> Result<()> {
    let datasets = client.datasets().await?;
    if as_json {
        println!(
            "{}",
            serde_json::Value::Array(datasets.iter().map(json::dataset).collect())
        );
    } else {
        datasets_table(&datasets);
    }
    Ok(())
}

/// `recur datasets delete ID`.
pub(super) async fn delete_dataset(client: &mut Client, id: &str, as_json: bool) -> Result<()> {
    let id = dataset_id(client, id).await?;
    let info = client.delete_dataset(&id).await?;
    if as_json {
        println!("{}", json!({"deleted": json::dataset(&info)}));
    } else {
        println!(
            "deleted dataset {} ({}, {} rows)",
            info.id,
            info.name,
            info.stats.map_or(0, |s| s.rows)
        );
    }
    Ok(())
}
