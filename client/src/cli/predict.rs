//! Using a trained model: predictions and checkpoint downloads.

use std::io::{BufRead, Write};

use serde_json::json;

use super::args::{CheckpointArgs, PredictArgs};
use super::error::{CliError, Result};
use super::text::format_value;
use crate::Client;

/// Parses `1,3,5,7` (spaces allowed) into values. Steps of several features may be separated
/// by `;` for readability (`20.5,101;21,99` is two steps of two features); the values are sent
/// one after another either way.
pub(super) fn parse_history(text: &str) -> Result<Vec<f32>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the history is empty".into());
    }
    text.split([',', ';'])
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

/// `recur predict JOB --stream`: stdin lines of steps in, one line per step out.
async fn stream(client: &mut Client, args: PredictArgs, as_json: bool) -> Result<()> {
    let mut session = match &args.session {
        Some(id) => client.resume_stream(id, Some(&args.job)).await?,
        None => client.open_stream(&args.job).await?,
    };
    let opened = session.opened().clone();
    if as_json {
        println!(
            "{}",
            json!({"session_id": opened.session_id, "job_id": opened.job_id, "epoch": opened.epoch,
                   "input_size": opened.input_size, "output_size": opened.output_size, "steps": opened.steps})
        );
    } else {
        eprintln!(
            "session {} on {} (epoch {}): {} values per step, {} per prediction; {} steps so far",
            opened.session_id,
            opened.job_id,
            opened.epoch,
            opened.input_size,
            opened.output_size,
            opened.steps
        );
    }
    let outs = (opened.output_size as usize).max(1);
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let values = parse_history(&line).map_err(|e| {
            CliError::new(
                format!("stdin:{}: {e}", i + 1),
                "give steps like 20.5,101;21,99 (features by commas, steps by semicolons)",
            )
        })?;
        let answer = session.feed(values).await.map_err(|e| {
            CliError::new(
                format!("stdin:{}: {e}", i + 1),
                format!(
                    "`recur predict {} --stream --session {}` continues where it stood",
                    args.job, opened.session_id
                ),
            )
        })?;
        if as_json {
            println!(
                "{}",
                json!({"steps": answer.steps, "predictions": answer.predictions})
            );
        } else {
            for p in answer.predictions.chunks(outs) {
                println!("{}", joined(p));
            }
        }
        std::io::stdout().flush()?;
    }
    // Back on the coordinator before this command exits: `--session` continues it at once.
    session.close().await?;
    Ok(())
}

pub(super) async fn predict(client: &mut Client, args: PredictArgs, as_json: bool) -> Result<()> {
    if args.stream {
        return stream(client, args, as_json).await;
    }
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
            // One line per history: its targets, comma-separated.
            let per_row = (predictions.len() / rows.len()).max(1);
            for p in predictions.chunks(per_row) {
                println!("{}", joined(p));
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
        println!("{}", joined(&r.predictions));
    }
    Ok(())
}

/// Predictions of one history (one per target), comma-separated.
fn joined(values: &[f32]) -> String {
    values
        .iter()
        .map(|&v| format_value(v))
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) async fn checkpoint(
    client: &mut Client,
    args: CheckpointArgs,
    as_json: bool,
) -> Result<()> {
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
