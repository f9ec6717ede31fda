//! Text output: job details, summaries, epoch lines, tables and values. (`json.rs` is the
//! `--json` form of the same.)

use recur_proto::v1 as pb;

use super::json;

pub(super) fn percent(m: Option<&pb::Metrics>) -> String {
    m.map_or("-".into(), |m| format!("{:.2}%", m.accuracy * 100.0))
}

pub(super) fn print_job(info: &pb::JobInfo, as_json: bool) {
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

pub(super) fn print_summary(info: &pb::JobInfo) {
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

/// A prediction with four decimals, trailing zeros trimmed.
pub(super) fn format_value(v: f32) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_string() }
}

/// The `recur jobs` table.
pub(super) fn jobs_table(jobs: &[pb::JobInfo]) {
    if jobs.is_empty() {
        println!("no jobs");
        return;
    }
    println!(
        "{:<10} {:<10} {:>7} {:>9} {:>9}  NAME",
        "ID", "STATE", "EPOCHS", "BEST VAL", "TEST"
    );
    for j in jobs {
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

/// The `recur workers` table.
pub(super) fn workers_table(workers: &[pb::WorkerInfo]) {
    if workers.is_empty() {
        println!("no workers connected");
        return;
    }
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
    for w in workers {
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
