//! JSON forms of the wire types, for `--json`.

use recur_proto::v1 as pb;
use serde_json::{Value, json};

/// A job state's name.
pub fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Queued) => "queued",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Completed) => "completed",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

/// Metrics as JSON.
pub fn metrics(m: Option<&pb::Metrics>) -> Value {
    m.map_or(Value::Null, |m| {
        json!({"accuracy": m.accuracy, "loss": m.loss, "mae": m.mae, "exact": m.exact,
               "precision": m.precision, "recall": m.recall, "samples": m.samples})
    })
}

/// An epoch as JSON.
pub fn epoch(e: &pb::EpochMetrics) -> Value {
    let t = e.timing.unwrap_or_default();
    json!({
        "epoch": e.epoch,
        "step": e.step,
        "train_loss": e.train_loss,
        "train_accuracy": e.train_accuracy,
        "validation": metrics(e.validation.as_ref()),
        "lr": e.lr,
        "seconds": e.seconds,
        "samples_per_sec": e.samples_per_sec,
        "workers": e.workers,
        "step_ms": {"total": t.total_ms, "compute": t.compute_ms, "wait": t.wait_ms, "reduce": t.reduce_ms, "optimizer": t.optimizer_ms},
    })
}

/// A job as JSON.
pub fn job(j: &pb::JobInfo) -> Value {
    let spec = j.spec.clone().unwrap_or_default();
    let model = spec.model.unwrap_or_default();
    let kind = match pb::ModelKind::try_from(model.kind) {
        Ok(pb::ModelKind::RnnTanh) => "rnn_tanh",
        Ok(pb::ModelKind::RnnRelu) => "rnn_relu",
        Ok(pb::ModelKind::Lstm) => "lstm",
        Ok(pb::ModelKind::Gru) => "gru",
        _ => "unspecified",
    };
    json!({
        "id": j.id,
        "name": spec.name,
        "state": state_name(j.state),
        "message": j.message,
        "dataset_id": spec.dataset_id,
        "model": {"kind": kind, "hidden_size": model.hidden_size, "num_layers": model.num_layers, "bidirectional": model.bidirectional, "head": model.head, "input_size": model.input_size, "output_size": model.output_size},
        "dropout": spec.dropout,
        "batch_size": spec.batch_size.unwrap_or(100),
        "seed": spec.seed,
        "epochs": j.epochs,
        "steps": j.steps,
        "best_epoch": j.best_epoch,
        "best_validation": metrics(j.best_validation.as_ref()),
        "test": metrics(j.test.as_ref()),
        "stop_reason": j.stop_reason,
        "warnings": j.warnings,
        "last_epoch": j.last_epoch.as_ref().map_or(Value::Null, epoch),
        "created_unix_ms": j.created_unix_ms,
        "updated_unix_ms": j.updated_unix_ms,
    })
}

/// A worker as JSON.
pub fn worker(w: &pb::WorkerInfo) -> Value {
    json!({
        "id": w.id,
        "name": w.name,
        "device": w.device,
        "threads": w.threads,
        "job_id": w.job_id,
        "shard_rows": w.shard_rows,
        "steps": w.steps,
        "train_rows": w.train_rows,
        "steps_per_second": w.steps_per_second,
        "last_seen_ms_ago": w.last_seen_ms_ago,
        "joined_unix_ms": w.joined_unix_ms,
    })
}

/// A dataset as JSON.
pub fn dataset(d: &pb::DatasetInfo) -> Value {
    let s = d.stats.clone().unwrap_or_default();
    let series = s.layout == pb::DatasetLayout::Series as i32;
    json!({
        "id": d.id,
        "name": d.name,
        "layout": if series { "series" } else { "rows" },
        "columns": s.columns,
        "rows": s.rows,
        "min_len": s.min_len,
        "max_len": s.max_len,
        "mean_len": s.mean_len,
        "max_abs": s.max_abs,
        "bytes": s.bytes,
        "uploaded_unix_ms": d.uploaded_unix_ms,
        "job_ids": d.job_ids,
    })
}
