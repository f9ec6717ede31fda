//! Prediction: a job's best checkpoint, cached, answering batched requests on one thread.
//!
//! Requests queue on a channel; the predictor thread takes every request waiting, groups them by
//! job and runs one forward pass per job, so concurrent callers share a batch without anyone
//! waiting for a timer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};

use candle_core::Device;
use recur_core::checkpoint::Checkpoint;
use recur_core::model::SeqModel;
use recur_core::step::{Batch, predict};
use tokio::sync::oneshot;

use crate::ids::JobId;
use crate::{Error, Result};

/// A loaded best checkpoint.
#[derive(Debug)]
struct Loaded {
    model: SeqModel,
    scale: f32,
    epoch: u64,
}

struct Request {
    job: JobId,
    rows: Vec<Vec<f32>>,
    reply: oneshot::Sender<Result<(Vec<f32>, u64)>>,
}

/// Handle to the predictor thread.
#[derive(Debug, Clone)]
pub struct Predictor {
    tx: mpsc::Sender<Request>,
    cache: Arc<Mutex<HashMap<JobId, Arc<Loaded>>>>,
}

impl Predictor {
    /// Starts the predictor thread; checkpoints are read from `jobs_dir/<job>/best.*`.
    pub fn start(jobs_dir: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel::<Request>();
        let cache: Arc<Mutex<HashMap<JobId, Arc<Loaded>>>> = Arc::default();
        let thread_cache = cache.clone();
        std::thread::Builder::new()
            .name("recur-predict".into())
            .spawn(move || serve(rx, jobs_dir, thread_cache))
            .map(|_| ())
            .unwrap_or_else(
                |e| tracing::error!(error = %e, "could not start the predictor thread"),
            );
        Self { tx, cache }
    }

    /// Forgets a job's cached model (a better checkpoint landed).
    pub fn invalidate(&self, job: &JobId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(job);
        }
    }

    /// Predicts the next value of each raw row with the job's best checkpoint; returns the
    /// predictions (data units) and the checkpoint's epoch.
    pub async fn predict(&self, job: JobId, rows: Vec<Vec<f32>>) -> Result<(Vec<f32>, u64)> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { job, rows, reply })
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }
}

fn serve(
    rx: mpsc::Receiver<Request>,
    jobs_dir: PathBuf,
    cache: Arc<Mutex<HashMap<JobId, Arc<Loaded>>>>,
) {
    while let Ok(first) = rx.recv() {
        let mut by_job: HashMap<JobId, Vec<Request>> = HashMap::new();
        by_job.entry(first.job.clone()).or_default().push(first);
        while let Ok(more) = rx.try_recv() {
            by_job.entry(more.job.clone()).or_default().push(more);
        }
        for (job, requests) in by_job {
            let loaded = load(&job, &jobs_dir, &cache);
            match loaded {
                Err(e) => {
                    let msg = e.to_string();
                    for r in requests {
                        let _ = r.reply.send(Err(Error::FailedPrecondition(msg.clone())));
                    }
                }
                Ok(loaded) => run_batch(&loaded, requests),
            }
        }
    }
}

fn load(
    job: &JobId,
    jobs_dir: &std::path::Path,
    cache: &Mutex<HashMap<JobId, Arc<Loaded>>>,
) -> Result<Arc<Loaded>> {
    if let Some(l) = cache.lock().ok().and_then(|c| c.get(job).cloned()) {
        return Ok(l);
    }
    let dir = jobs_dir.join(&job.0);
    let ckpt = Checkpoint::load(&dir, "best").map_err(|e| match e {
        recur_core::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::FailedPrecondition(format!("{job} has no checkpoint yet"))
        }
        other => Error::Core(other),
    })?;
    let loaded = Arc::new(Loaded {
        model: SeqModel::new(ckpt.params(&Device::Cpu)?),
        scale: ckpt.manifest.scale,
        epoch: ckpt.manifest.epoch,
    });
    if let Ok(mut c) = cache.lock() {
        c.insert(job.clone(), loaded.clone());
    }
    Ok(loaded)
}

fn run_batch(loaded: &Loaded, requests: Vec<Request>) {
    let scaled: Vec<Vec<f32>> = requests
        .iter()
        .flat_map(|r| {
            r.rows
                .iter()
                .map(|row| row.iter().map(|v| v / loaded.scale).collect())
        })
        .collect();
    let inputs: Vec<&[f32]> = scaled.iter().map(Vec::as_slice).collect();
    let result = Batch::from_inputs(&inputs, loaded.model.config().input_size, &Device::Cpu)
        .and_then(|b| predict(&loaded.model, &b));
    match result {
        Ok(preds) => {
            let out = loaded.model.config().output_size;
            let mut at = 0;
            for r in requests {
                let n = r.rows.len() * out;
                let values = preds[at..at + n].iter().map(|p| p * loaded.scale).collect();
                at += n;
                let _ = r.reply.send(Ok((values, loaded.epoch)));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for r in requests {
                let _ = r.reply.send(Err(Error::Core(recur_core::Error::BadRow {
                    row: 0,
                    problem: msg.clone(),
                })));
            }
        }
    }
}
