//! Text output: job details, summaries, epoch lines, tables and values. (`json.rs` is the
//! `--json` form of the same.)

use std::time::Duration;

use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
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
        println!("test       {}", test_figures(info, t));
    }
    if !info.stop_reason.is_empty() {
        println!("stopped by {}", info.stop_reason);
    }
    for w in &info.warnings {
        println!("warning    {w}");
    }
}

/// Whether a job's targets are 0/1 labels (a BCE job).
fn labelled(info: &pb::JobInfo) -> bool {
    info.spec
        .as_ref()
        .is_some_and(|s| s.loss == pb::Loss::Bce as i32)
}

/// A job's test metrics in a line: labels get precision and recall, values MAE and exact.
fn test_figures(info: &pb::JobInfo, t: &pb::Metrics) -> String {
    if labelled(info) {
        format!(
            "accuracy {:.2}%  precision {:.2}%  recall {:.2}%  loss {:.4}",
            t.accuracy * 100.0,
            t.precision * 100.0,
            t.recall * 100.0,
            t.loss
        )
    } else {
        format!(
            "accuracy {:.2}%  MAE {:.4}  exact {:.2}%",
            t.accuracy * 100.0,
            t.mae,
            t.exact * 100.0
        )
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
            println!("test {}", test_figures(info, &t));
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

/// A table in the terminal's style: no borders, a header row, columns as wide as their widest
/// cell (long names never break the layout), numbers right-aligned.
fn table(header: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(Cell::new));
    for &c in right {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// How long ago `unix_ms` was, to the second ("3m 12s"); "-" for none.
pub(super) fn age(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    human(Duration::from_millis(now.saturating_sub(unix_ms)))
}

/// A duration to the second, as humans read it ("1h 2m 3s"; "0s" under a second).
pub(super) fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// The `recur jobs` table.
pub(super) fn jobs_table(jobs: &[pb::JobInfo]) {
    if jobs.is_empty() {
        println!("no jobs");
        return;
    }
    let mut t = table(
        &[
            "ID", "STATE", "EPOCHS", "BEST VAL", "TEST", "AGE", "UPDATED", "NAME",
        ],
        &[2, 3, 4],
    );
    for j in jobs {
        t.add_row(vec![
            j.id.clone(),
            json::state_name(j.state).to_string(),
            j.epochs.to_string(),
            percent(j.best_validation.as_ref()),
            percent(j.test.as_ref()),
            age(j.created_unix_ms),
            age(j.updated_unix_ms),
            j.spec.as_ref().map_or(String::new(), |s| s.name.clone()),
        ]);
    }
    println!("{t}");
}

/// The `recur workers` table.
pub(super) fn workers_table(workers: &[pb::WorkerInfo]) {
    if workers.is_empty() {
        println!("no workers connected");
        return;
    }
    let mut t = table(
        &[
            "ID",
            "NAME",
            "DEVICE",
            "THREADS",
            "JOB",
            "ROWS",
            "STEPS",
            "TRAINED",
            "STEPS/S",
            "AGE",
            "LAST SEEN",
        ],
        &[3, 5, 6, 7, 8],
    );
    for w in workers {
        t.add_row(vec![
            w.id.clone(),
            w.name.clone(),
            w.device.clone(),
            w.threads.to_string(),
            if w.job_id.is_empty() {
                "-".into()
            } else {
                w.job_id.clone()
            },
            w.shard_rows.to_string(),
            w.steps.to_string(),
            w.train_rows.to_string(),
            format!("{:.0}", w.steps_per_second),
            age(w.joined_unix_ms),
            format!("{} ms ago", w.last_seen_ms_ago),
        ]);
    }
    println!("{t}");
}

/// The `recur datasets` table (ids shortened to 12 digits; `--json` has them whole).
pub(super) fn datasets_table(datasets: &[pb::DatasetInfo]) {
    if datasets.is_empty() {
        println!("no datasets");
        return;
    }
    let mut t = table(
        &["ID", "ROWS", "LENGTHS", "SIZE", "JOBS", "AGE", "NAME"],
        &[1, 3, 4],
    );
    for d in datasets {
        let s = d.stats.clone().unwrap_or_default();
        // A series shows its header instead of row lengths.
        let shape = if s.layout == pb::DatasetLayout::Series as i32 {
            format!("series: {}", s.columns.join(","))
        } else {
            format!("{}-{}", s.min_len, s.max_len)
        };
        t.add_row(vec![
            d.id.chars().take(12).collect(),
            s.rows.to_string(),
            shape,
            bytes(s.bytes),
            d.job_ids.len().to_string(),
            age(d.uploaded_unix_ms),
            d.name.clone(),
        ]);
    }
    println!("{t}");
}

/// A size in bytes as people read it (`1.5 MiB`).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
