//! Prediction: a job's best checkpoint set, cached, answering batched requests on one thread.
//!
//! Requests queue on a channel; the predictor thread takes every request waiting, groups them by
//! job and runs one forward pass per job, so concurrent callers share a batch without anyone
//! waiting for a timer. Requests are validated before they are queued; should a batch's forward
//! pass fail anyway, each request in it is run alone, so one request never fails another.
//!
//! The model is read from the set the job's `best` pointer names (see
//! [`recur_core::sets`]): sets are immutable once named, and a set replaced while it is read is
//! followed to its successor. The cache is invalidated by a generation count: a load that raced
//! with a newer best is answered from but not kept.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};

use candle_core::Device;
use recur_core::data::Normalizer;
use recur_core::model::SeqModel;
use recur_core::sets::{CheckpointSets, Role};
use recur_core::step::Loss;
use recur_core::step::{Batch, predict};
use tokio::sync::oneshot;

use crate::ids::JobId;
use crate::{Error, Result};

/// A loaded best checkpoint.
#[derive(Debug)]
struct Loaded {
    model: SeqModel,
    /// Raw values to the model's and back.
    norm: Normalizer,
    /// How outputs become predictions.
    loss: Loss,
    epoch: u64,
}

struct Request {
    job: JobId,
    rows: Vec<Vec<f32>>,
    reply: oneshot::Sender<Result<(Vec<f32>, u64)>>,
}

/// Cached models, and for each job the number of invalidations so far.
#[derive(Debug)]
struct Cache<T = Arc<Loaded>> {
    models: HashMap<JobId, T>,
    generation: HashMap<JobId, u64>,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Self {
            models: HashMap::new(),
            generation: HashMap::new(),
        }
    }
}

impl<T: Clone> Cache<T> {
    /// The cached model, or the generation a load must start from.
    fn lookup(&self, job: &JobId) -> Result<T, u64> {
        match self.models.get(job) {
            Some(m) => Ok(m.clone()),
            None => Err(self.generation.get(job).copied().unwrap_or(0)),
        }
    }

    /// Forgets the job's model; loads that began before are not kept.
    fn invalidate(&mut self, job: &JobId) {
        self.models.remove(job);
        *self.generation.entry(job.clone()).or_default() += 1;
    }

    /// Keeps a model loaded from `generation`, unless an invalidation came since.
    fn insert(&mut self, job: &JobId, generation: u64, model: T) -> bool {
        let current = self.generation.get(job).copied().unwrap_or(0) == generation;
        if current {
            self.models.insert(job.clone(), model);
        }
        current
    }
}

/// Handle to the predictor thread.
#[derive(Debug, Clone)]
pub struct Predictor {
    tx: mpsc::Sender<Request>,
    cache: Arc<Mutex<Cache>>,
}

impl Predictor {
    /// Starts the predictor thread; checkpoints are read from `jobs_dir/<job>/best.*`.
    pub fn start(jobs_dir: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel::<Request>();
        let cache: Arc<Mutex<Cache>> = Arc::default();
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

    /// Forgets a job's cached model (a better checkpoint landed). A load already under way is
    /// not cached when it finishes.
    pub fn invalidate(&self, job: &JobId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.invalidate(job);
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

fn serve(rx: mpsc::Receiver<Request>, jobs_dir: PathBuf, cache: Arc<Mutex<Cache>>) {
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

fn load(job: &JobId, jobs_dir: &std::path::Path, cache: &Mutex<Cache>) -> Result<Arc<Loaded>> {
    let generation = match cache.lock().map_err(|_| Error::ShuttingDown)?.lookup(job) {
        Ok(cached) => return Ok(cached),
        Err(generation) => generation,
    };
    let sets = CheckpointSets::new(jobs_dir.join(&job.0));
    let Some((_, ckpt)) = sets.load_current(Role::Best)? else {
        return Err(Error::FailedPrecondition(format!(
            "{job} has no checkpoint yet"
        )));
    };
    let loaded = Arc::new(Loaded {
        model: SeqModel::new(ckpt.params(&Device::Cpu)?),
        norm: ckpt.manifest.normalizer(),
        loss: ckpt.manifest.loss,
        epoch: ckpt.manifest.epoch,
    });
    if let Ok(mut c) = cache.lock() {
        c.insert(job, generation, loaded.clone());
    }
    Ok(loaded)
}

fn run_batch(loaded: &Loaded, requests: Vec<Request>) {
    let rows: Vec<&[f32]> = requests
        .iter()
        .flat_map(|r| r.rows.iter().map(Vec::as_slice))
        .collect();
    match forward(loaded, &rows) {
        Ok(preds) => {
            let out = loaded.model.config().output_size;
            let mut at = 0;
            for r in requests {
                let n = r.rows.len() * out;
                let _ = r.reply.send(Ok((preds[at..at + n].to_vec(), loaded.epoch)));
                at += n;
            }
        }
        Err(e) if requests.len() == 1 => {
            if let Some(r) = requests.into_iter().next() {
                let _ = r.reply.send(Err(e));
            }
        }
        // One request must not fail the others it was batched with: each runs alone.
        Err(_) => {
            for r in requests {
                let rows: Vec<&[f32]> = r.rows.iter().map(Vec::as_slice).collect();
                let result = forward(loaded, &rows).map(|p| (p, loaded.epoch));
                let _ = r.reply.send(result);
            }
        }
    }
}

/// Predictions (data units, `output_size` per row) for raw rows of whole steps.
fn forward(loaded: &Loaded, rows: &[&[f32]]) -> Result<Vec<f32>> {
    let features = loaded.model.config().input_size;
    if let Some((i, row)) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| r.is_empty() || !r.len().is_multiple_of(features))
    {
        return Err(Error::InvalidArgument(format!(
            "sequence {i} has {} values; the model takes steps of {features} features (one per \
             feature column), at least one",
            row.len()
        )));
    }
    let scaled: Vec<Vec<f32>> = rows.iter().map(|row| loaded.norm.inputs(row)).collect();
    let inputs: Vec<&[f32]> = scaled.iter().map(Vec::as_slice).collect();
    let preds = Batch::from_inputs(&inputs, features, &Device::Cpu)
        .and_then(|b| predict(&loaded.model, &b))?;
    Ok(loaded.loss.outputs(&loaded.norm, &preds))
}

#[cfg(test)]
mod tests {
    use recur_core::model::{ModelConfig, Params};

    use super::*;

    #[test]
    fn a_request_that_fails_the_batch_fails_alone() {
        let params = Params::init(ModelConfig::tutorial(), 1, &Device::Cpu).unwrap();
        let loaded = Loaded {
            model: SeqModel::new(params),
            norm: Normalizer::uniform(50.0, 1, 1),
            loss: Loss::Mse,
            epoch: 3,
        };
        let request = |rows: Vec<Vec<f32>>| {
            let (reply, rx) = oneshot::channel();
            (
                Request {
                    job: JobId::nth(1),
                    rows,
                    reply,
                },
                rx,
            )
        };
        // An empty history cannot be packed: a batch holding it fails as a whole.
        let (good, mut good_rx) = request(vec![vec![1.0, 3.0, 5.0]]);
        let (bad, mut bad_rx) = request(vec![vec![2.0], vec![]]);
        let (also_good, mut also_rx) = request(vec![vec![4.0, 2.0], vec![7.0]]);
        run_batch(&loaded, vec![good, bad, also_good]);
        let (one, epoch) = good_rx.try_recv().unwrap().unwrap();
        assert_eq!((one.len(), epoch), (1, 3));
        assert!(bad_rx.try_recv().unwrap().is_err());
        let (two, _) = also_rx.try_recv().unwrap().unwrap();
        assert_eq!(two.len(), 2);
        // The answers are those of each request alone.
        let (alone, mut alone_rx) = request(vec![vec![4.0, 2.0], vec![7.0]]);
        run_batch(&loaded, vec![alone]);
        assert_eq!(alone_rx.try_recv().unwrap().unwrap().0, two);
    }

    #[test]
    fn a_load_that_raced_with_an_invalidation_is_not_cached() {
        let job = JobId::nth(1);
        let mut cache: Cache<u64> = Cache::default();
        // A load starts (the old best), a new best lands and invalidates, the load finishes.
        let generation = cache.lookup(&job).unwrap_err();
        cache.invalidate(&job);
        assert!(!cache.insert(&job, generation, 1), "a stale model was kept");
        assert_eq!(cache.lookup(&job), Err(1), "the next request loads again");
        // A load with no invalidation meanwhile is kept, until the next one.
        assert!(cache.insert(&job, 1, 2));
        assert_eq!(cache.lookup(&job), Ok(2));
        cache.invalidate(&job);
        assert_eq!(cache.lookup(&job), Err(2));
    }
}
