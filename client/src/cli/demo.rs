//! `recur demo`: the tutorial end to end on an embedded cluster.

use std::path::Path;
use std::time::Instant;

use recur_core::data::BallConfig;
use recur_proto::v1 as pb;
use serde_json::json;

use super::args::DemoArgs;
use super::error::{CliError, Result};
use super::jobs::{history, upload, watch};
use super::plot;
use super::text::{format_value, print_summary};
use crate::Client;
use crate::local::LocalCluster;

/// The tutorial's five histories and the positions that follow them.
const HISTORIES: [(&[f32], f32); 5] = [
    (&[1.0, 2.0, 3.0], 4.0),
    (&[3.0, 5.0, 7.0], 9.0),
    (&[9.0, 7.0, 5.0, 3.0], 1.0),
    (&[2.0, 0.0, -2.0], -4.0),
    (&[0.0, -3.0, -6.0], -9.0),
];

/// The tutorial's PyTorch result, to compare with.
const TUTORIAL_ACCURACY: f64 = 0.9275;

pub(super) async fn run(args: DemoArgs, as_json: bool) -> Result<()> {
    let start = Instant::now();
    let dir = tempfile::tempdir()?;
    let config = recur_coordinator::CoordinatorConfig::new(dir.path().join("data"));
    let device = super::cluster::parse_device(&args.device)?;
    let cluster = LocalCluster::start_on("127.0.0.1:0", config, args.workers, device)
        .await
        .map_err(|e| CliError::new(e.to_string(), ""))?;
    let say = |line: String| {
        if !as_json {
            println!("{line}");
        }
    };
    say(format!(
        "recur demo: embedded coordinator on {} with {} workers on {device}",
        cluster.url(),
        args.workers
    ));
    let mut client = Client::connect(&cluster.url(), None).await?;
    let data = BallConfig {
        rows: args.rows,
        ..BallConfig::tutorial(args.seed)
    }
    .generate()
    .map_err(|e| CliError::new(e.to_string(), ""))?;
    say(format!(
        "generated {} rows of ball positions (5 to 10 values each, seed {})",
        data.len(),
        args.seed
    ));
    let uploaded = upload(
        &mut client,
        Path::new("ball.csv"),
        data.to_csv().into_bytes(),
        pb::DatasetLayout::Rows,
    )
    .await?;
    let spec = pb::JobSpec {
        name: "tutorial".into(),
        dataset_id: uploaded.dataset_id,
        seed: args.seed,
        ..Default::default()
    };
    let job = client.submit(spec).await?.job_id;
    say(format!(
        "training {job}: rnn_tanh, hidden 8, Adam lr 0.01 halved on plateaus, batch 100, patience 100"
    ));
    let info = watch(&mut client, &job, false).await?;
    if pb::JobState::try_from(info.state) != Ok(pb::JobState::Completed) {
        return Err(CliError::new(
            format!("{job} did not complete: {}", info.message),
            "",
        ));
    }
    let train_seconds = start.elapsed().as_secs_f64();
    if !as_json {
        print_summary(&info);
    }
    let test = info.test.unwrap_or_default();
    say(format!(
        "tutorial (PyTorch, SGD, 2,351 epochs): test accuracy {:.2}%; recur: {:.2}%",
        TUTORIAL_ACCURACY * 100.0,
        test.accuracy * 100.0
    ));
    let (epochs, _) = history(&mut client, &job).await?;
    plot::accuracy_chart(&args.chart, "recur demo: accuracy per epoch", &epochs)?;
    say(format!("accuracy chart: {}", args.chart.display()));
    let rows: Vec<Vec<f32>> = HISTORIES.iter().map(|(h, _)| h.to_vec()).collect();
    let predictions = client.predict(&job, rows).await?.predictions;
    say("predictions (history -> next position, expected):".into());
    for ((history, expected), p) in HISTORIES.iter().zip(&predictions) {
        let h: Vec<String> = history.iter().map(|v| format_value(*v)).collect();
        say(format!(
            "  {:<12} -> {:>8}   (expected {})",
            h.join(","),
            format_value(*p),
            format_value(*expected)
        ));
    }
    say(format!("done in {train_seconds:.1} s"));
    if as_json {
        println!(
            "{}",
            json!({
                "job_id": job,
                "epochs": info.epochs,
                "best_epoch": info.best_epoch,
                "stop_reason": info.stop_reason,
                "test": super::json::metrics(info.test.as_ref()),
                "tutorial_accuracy": TUTORIAL_ACCURACY,
                "chart": args.chart,
                "predictions": HISTORIES.iter().zip(&predictions).map(|((h, e), p)| json!({"history": h, "prediction": p, "expected": e})).collect::<Vec<_>>(),
                "seconds": train_seconds,
            })
        );
    }
    cluster
        .shutdown()
        .await
        .map_err(|e| CliError::new(e.to_string(), ""))?;
    Ok(())
}
