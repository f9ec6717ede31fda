//! The compute side of a worker: holds the shard and the parameters, runs steps and
//! evaluations with candle. Runs on its own thread, never on the async runtime.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::Device;
use recur_core::convert::{f32s_from_wire, f32s_to_wire};
use recur_core::data::{Affine, Dataset, Normalizer};
use recur_core::metrics::BatchSums;
use recur_core::model::{Dropout, ModelConfig, Params, ReferenceModel, SeqModel};
use recur_core::step::{
    Batch, Loss, StepDropout, grad_sum, predict_targets, stateful_grad_sum, stream_sums,
};
use recur_proto::v1 as pb;

use crate::{Error, Result};

/// Rows of one split of the shard, by dataset row id.
#[derive(Debug)]
struct Rows {
    data: Dataset,
    index: HashMap<u64, usize>,
    /// Evaluation batch of each local row (validation and test only).
    batch: Vec<u32>,
}

impl Rows {
    /// No rows yet, of the model's shape, with `steps` targets of the model's outputs per row
    /// (a target at every step of `steps`-step rows) or, for 0, one after the last step.
    fn shaped(model: &ModelConfig, steps: usize) -> Self {
        Self {
            data: if steps == 0 {
                Dataset::with_shape(model.input_size, model.output_size)
            } else {
                Dataset::every_step(model.input_size, steps, model.output_size)
            },
            index: HashMap::new(),
            batch: Vec::new(),
        }
    }

    fn append(&mut self, block: &pb::RowBlock, batches: Option<&[u32]>) -> Result<()> {
        if block.ids.len() != block.lengths.len() {
            return Err(Error::Protocol(
                "a row block's ids and lengths differ in number".into(),
            ));
        }
        let total: usize = block.lengths.iter().map(|&l| l as usize).sum();
        if total != block.values.len() {
            return Err(Error::Protocol(format!(
                "a row block's lengths add up to {total} but it has {} values",
                block.values.len()
            )));
        }
        if let Some(b) = batches
            && b.len() != block.ids.len()
        {
            return Err(Error::Protocol(
                "evaluation batches do not match the rows".into(),
            ));
        }
        let mut at = 0;
        for (k, (&id, &len)) in block.ids.iter().zip(&block.lengths).enumerate() {
            let len = len as usize;
            if !self.data.fits(len) {
                return Err(Error::Protocol(format!(
                    "row {id} has {len} values, not whole steps of {} and {} targets",
                    self.data.features(),
                    self.data.targets_per_row()
                )));
            }
            self.index.insert(id, self.data.len());
            self.data.push_row(&block.values[at..at + len]);
            at += len;
            if let Some(b) = batches {
                self.batch.push(b[k]);
            }
        }
        Ok(())
    }

    fn local(&self, ids: &[u64], what: &str) -> Result<Vec<usize>> {
        ids.iter()
            .map(|id| {
                self.index.get(id).copied().ok_or_else(|| {
                    Error::Protocol(format!("row {id} is not in this worker's {what} shard"))
                })
            })
            .collect()
    }
}

#[derive(Debug)]
struct Shard {
    job_id: String,
    version: u64,
    model: ModelConfig,
    /// Per target, the map back to the data's units.
    targets: Vec<Affine>,
    /// The job's loss.
    loss: Loss,
    /// The job's head dropout.
    dropout: Dropout,
    /// A stateful job: steps start from the states they are sent, evaluations carry the state
    /// from row to row.
    stateful: bool,
    train: Rows,
    validation: Rows,
    test: Rows,
}

/// A worker's compute state.
#[derive(Debug)]
pub struct Executor {
    device: Device,
    shard: Option<Shard>,
    /// The model with the parameters of `version`.
    model: Option<(u64, SeqModel)>,
    /// Extra compute time per training row (a stand-in for a slower host, for tests).
    throttle: std::time::Duration,
    /// Where commands are counted, if anywhere.
    metrics: Option<crate::WorkerMetrics>,
}

/// Rows per forward pass when evaluating.
const EVAL_CHUNK: usize = 2048;

/// Rows with a target at every step have fewer steps than this (dropout keys hold the step in
/// 24 bits).
const MAX_EVERY_STEP_WINDOW: usize = 1 << 24;

impl Executor {
    /// An executor computing on `device`.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            shard: None,
            model: None,
            throttle: std::time::Duration::ZERO,
            metrics: None,
        }
    }

    /// Counts and times every command in `metrics`.
    pub fn with_metrics(mut self, metrics: Option<crate::WorkerMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Makes every training row of a step take `per_row` longer, as on a slower host (for tests
    /// and benchmarks of clusters of mixed speed; the time counts as compute).
    pub fn with_throttle(mut self, per_row: std::time::Duration) -> Self {
        self.throttle = per_row;
        self
    }

    /// Carries out one command; returns the message to send back, if any.
    pub fn handle(
        &mut self,
        cmd: pb::coordinator_message::Kind,
    ) -> Option<pb::worker_message::Kind> {
        use pb::coordinator_message::Kind as C;
        use pb::worker_message::Kind as W;
        let (job_id, step) = match &cmd {
            C::LoadShard(s) => (s.job_id.clone(), None),
            C::Step(s) => (s.job_id.clone(), Some(s.step)),
            C::Evaluate(e) => (e.job_id.clone(), None),
            C::Release(r) => (r.job_id.clone(), None),
            C::Welcome(_) => return None,
        };
        // Every event of the command (and of what it calls) carries the job and step.
        let span = tracing::info_span!("command", job = %job_id, step);
        let _entered = span.enter();
        let kind = match &cmd {
            C::LoadShard(_) => "load",
            C::Step(_) => "step",
            C::Evaluate(_) => "evaluate",
            C::Release(_) | C::Welcome(_) => "release",
        };
        let started = std::time::Instant::now();
        let rows = match &cmd {
            C::Step(s) => s.rows.len() as u64,
            _ => 0,
        };
        let result = match cmd {
            C::LoadShard(part) => self.load(part).map(|()| None),
            C::Step(step) => self.step(step).map(|r| Some(W::StepResult(r))),
            C::Evaluate(e) => self.evaluate(e).map(|r| Some(W::EvalResult(r))),
            C::Release(r) => {
                if self.shard.as_ref().is_some_and(|s| s.job_id == r.job_id) {
                    self.shard = None;
                    self.model = None;
                }
                Ok(None)
            }
            C::Welcome(_) => Ok(None),
        };
        if let Some(m) = &self.metrics {
            let outcome = if result.is_ok() { "ok" } else { "error" };
            if result.is_ok() {
                m.rows.inc_by(rows);
            }
            m.commands.with_label_values(&[kind, outcome]).inc();
            m.command_seconds
                .with_label_values(&[kind])
                .observe(started.elapsed().as_secs_f64());
        }
        result.unwrap_or_else(|e| {
            tracing::warn!(job = %job_id, error = %e, "command failed");
            Some(W::Error(pb::WorkerError {
                job_id,
                message: e.to_string(),
            }))
        })
    }

    fn load(&mut self, part: pb::LoadShard) -> Result<()> {
        let fresh = !self
            .shard
            .as_ref()
            .is_some_and(|s| s.job_id == part.job_id && s.version == part.shard_version);
        if fresh {
            let wire = part
                .model
                .as_ref()
                .ok_or_else(|| Error::Protocol("LoadShard without a model".into()))?;
            let model = ModelConfig::try_from(wire)?;
            let steps = part.every_step_window as usize;
            if steps >= MAX_EVERY_STEP_WINDOW {
                return Err(Error::Protocol(format!(
                    "LoadShard: a target at every step of {steps} steps is above the limit {MAX_EVERY_STEP_WINDOW}"
                )));
            }
            if self
                .model
                .as_ref()
                .is_some_and(|(_, m)| *m.config() != model)
            {
                self.model = None;
            }
            let train = if part.keep_train {
                match self.shard.take() {
                    Some(old) if old.job_id == part.job_id => old.train,
                    _ => {
                        return Err(Error::Protocol(format!(
                            "asked to keep the training rows of job {}, which this worker does not hold",
                            part.job_id
                        )));
                    }
                }
            } else {
                Rows::shaped(&model, steps)
            };
            let targets = if part.target_maps.is_empty() {
                vec![Affine::divide(part.scale); model.output_size]
            } else {
                part.target_maps.iter().map(Affine::from).collect()
            };
            Normalizer {
                inputs: vec![Affine::divide(1.0); model.input_size],
                targets: targets.clone(),
            }
            .validate(model.input_size, model.output_size)
            .map_err(|e| Error::Protocol(format!("LoadShard: {e}")))?;
            self.shard = Some(Shard {
                job_id: part.job_id.clone(),
                version: part.shard_version,
                model,
                targets,
                loss: match pb::Loss::try_from(part.loss) {
                    Ok(pb::Loss::Bce) => Loss::Bce,
                    Ok(pb::Loss::Mse | pb::Loss::Unspecified) => Loss::Mse,
                    Err(_) => {
                        return Err(Error::Protocol(format!(
                            "LoadShard: unknown loss {}",
                            part.loss
                        )));
                    }
                },
                dropout: {
                    Dropout::validate(part.dropout)
                        .map_err(|e| Error::Protocol(format!("LoadShard: {e}")))?;
                    Dropout {
                        p: part.dropout,
                        seed: part.dropout_seed,
                    }
                },
                stateful: part.stateful,
                train,
                validation: Rows::shaped(&model, steps),
                test: Rows::shaped(&model, steps),
            });
        }
        let shard = self
            .shard
            .as_mut()
            .ok_or_else(|| Error::Protocol("no shard".into()))?;
        if let Some(b) = &part.train {
            shard.train.append(b, None)?;
        }
        if let Some(b) = &part.validation {
            shard.validation.append(b, Some(&part.validation_batches))?;
        }
        if let Some(b) = &part.test {
            shard.test.append(b, Some(&part.test_batches))?;
        }
        Ok(())
    }

    /// Makes the model hold the parameters of `version`.
    fn set_params(&mut self, params: Option<pb::FlatVector>, version: u64) -> Result<()> {
        let shard = self
            .shard
            .as_ref()
            .ok_or_else(|| Error::Protocol("a command came before any shard".into()))?;
        match params {
            Some(p) => {
                if p.version != version {
                    return Err(Error::Protocol(format!(
                        "parameters of version {} for a command at version {version}",
                        p.version
                    )));
                }
                let values = f32s_from_wire(&p.values, "FlatVector.values")?;
                match &mut self.model {
                    Some((v, model)) if model.config() == &shard.model => {
                        model.params().set_flat(&values)?;
                        *v = version;
                    }
                    _ => {
                        let params = Params::from_flat(shard.model, &values, &self.device)?;
                        self.model = Some((version, SeqModel::new(params)));
                    }
                }
                Ok(())
            }
            None => match &self.model {
                Some((v, _)) if *v == version => Ok(()),
                Some((v, _)) => Err(Error::Protocol(format!(
                    "holding parameters of version {v}, asked for {version}"
                ))),
                None => Err(Error::Protocol("no parameters received yet".into())),
            },
        }
    }

    fn step(&mut self, step: pb::Step) -> Result<pb::StepResult> {
        let start = Instant::now();
        self.set_params(step.params, step.version)?;
        let (shard, model) = self.ready(&step.job_id)?;
        let rows = shard.train.local(&step.rows, "training")?;
        let state_len = if shard.stateful {
            rows.len() * shard.model.state_len() * 4
        } else {
            0
        };
        if step.initial_state.len() != state_len {
            return Err(Error::Protocol(format!(
                "a step of {} rows came with initial states of {} bytes, not {state_len}",
                rows.len(),
                step.initial_state.len()
            )));
        }
        let mut final_state = Vec::new();
        let g = if rows.is_empty() {
            recur_core::step::GradSum {
                grads: vec![0.0; model.config().layout().total()],
                sums: BatchSums::default(),
            }
        } else if shard.stateful {
            // Each row continues its stream from the state it was sent.
            let init = f32s_from_wire(&step.initial_state, "Step.initial_state")?;
            let batch = Batch::from_rows(&shard.train.data, &rows, &self.device)?;
            let reference = ReferenceModel::new(model.params().clone());
            let (g, state) =
                stateful_grad_sum(&reference, &batch, &shard.targets, shard.loss, Some(&init))?;
            final_state = state;
            g
        } else {
            let batch = Batch::from_rows(&shard.train.data, &rows, &self.device)?;
            let dropout = StepDropout {
                dropout: shard.dropout,
                step: step.step,
                rows: &step.rows,
            };
            grad_sum(model, &batch, &shard.targets, shard.loss, Some(dropout))?
        };
        if !self.throttle.is_zero() {
            std::thread::sleep(self.throttle * rows.len() as u32);
        }
        let grad_sum = f32s_to_wire(&g.grads);
        Ok(pb::StepResult {
            job_id: step.job_id,
            step: step.step,
            part: step.part,
            version: step.version,
            grad_sum,
            sums: Some((&g.sums).into()),
            compute_ms: start.elapsed().as_secs_f64() * 1e3,
            final_state: f32s_to_wire(&final_state),
        })
    }

    fn evaluate(&mut self, e: pb::Evaluate) -> Result<pb::EvalResult> {
        let start = Instant::now();
        self.set_params(e.params, e.version)?;
        let (shard, model) = self.ready(&e.job_id)?;
        let (rows, what) = if e.split == pb::EvalSplit::Test as i32 {
            (&shard.test, "test")
        } else {
            (&shard.validation, "validation")
        };
        let local = rows.local(&e.rows, what)?;
        let mut by_batch: BTreeMap<u32, BatchSums> = BTreeMap::new();
        if shard.stateful {
            // One stream: each row starts from the state the one before it ended with.
            let reference = ReferenceModel::new(model.params().clone());
            let per_row = stream_sums(
                &reference,
                &rows.data,
                &local,
                &shard.targets,
                shard.loss,
                &self.device,
            )?;
            for (&r, sums) in local.iter().zip(&per_row) {
                by_batch.entry(rows.batch[r]).or_default().add(sums);
            }
        }
        for chunk in local.chunks(EVAL_CHUNK).filter(|_| !shard.stateful) {
            let batch = Batch::from_rows(&rows.data, chunk, &self.device)?;
            let preds = predict_targets(model, &batch)?;
            let outs = rows.data.targets_per_row();
            for (k, &r) in chunk.iter().enumerate() {
                let sums = shard.loss.sums(
                    rows.data.targets(r),
                    &preds[k * outs..(k + 1) * outs],
                    &shard.targets,
                );
                by_batch.entry(rows.batch[r]).or_default().add(&sums);
            }
        }
        Ok(pb::EvalResult {
            job_id: e.job_id,
            eval_id: e.eval_id,
            part: e.part,
            batches: by_batch
                .into_iter()
                .map(|(batch, s)| pb::BatchSumsAt {
                    batch,
                    sums: Some((&s).into()),
                })
                .collect(),
            compute_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn ready(&self, job_id: &str) -> Result<(&Shard, &SeqModel)> {
        let shard = self
            .shard
            .as_ref()
            .filter(|s| s.job_id == job_id)
            .ok_or_else(|| Error::Protocol(format!("no shard for job {job_id}")))?;
        let (_, model) = self
            .model
            .as_ref()
            .ok_or_else(|| Error::Protocol("no parameters".into()))?;
        Ok((shard, model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::coordinator_message::Kind as C;
    use pb::worker_message::Kind as W;

    /// A worker holding one stateful training row of 3 steps (GRU, 4 units: 4 state values).
    fn stateful_worker(stateful: bool) -> (Executor, pb::FlatVector) {
        let model = ModelConfig {
            kind: recur_core::model::ModelKind::Gru,
            hidden_size: 4,
            ..ModelConfig::tutorial()
        };
        let mut ex = Executor::new(Device::Cpu);
        let load = C::LoadShard(pb::LoadShard {
            job_id: "j".into(),
            shard_version: 1,
            model: Some((&model).into()),
            scale: 1.0,
            every_step_window: 3,
            stateful,
            train: Some(pb::RowBlock {
                ids: vec![7],
                lengths: vec![6],
                values: vec![0.1, 0.2, 0.3, 0.2, 0.3, 0.4],
            }),
            last: true,
            ..Default::default()
        });
        assert!(ex.handle(load).is_none(), "the shard loads");
        let flat = Params::init(model, 1, &Device::Cpu)
            .and_then(|p| p.to_flat())
            .unwrap();
        let params = pb::FlatVector {
            version: 0,
            values: f32s_to_wire(&flat),
        };
        (ex, params)
    }

    fn step(params: Option<pb::FlatVector>, state: &[f32]) -> C {
        C::Step(pb::Step {
            job_id: "j".into(),
            step: 1,
            part: 1,
            params,
            version: 0,
            rows: vec![7],
            initial_state: f32s_to_wire(state),
        })
    }

    fn error(reply: Option<W>) -> String {
        match reply {
            Some(W::Error(e)) => e.message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn a_stateful_step_takes_and_returns_each_rows_state_and_refuses_the_wrong_length() {
        let (mut ex, params) = stateful_worker(true);
        let err = error(ex.handle(step(Some(params.clone()), &[0.0; 3])));
        assert!(
            err.contains("a step of 1 rows came with initial states of 12 bytes, not 16"),
            "{err}"
        );
        // The state a row starts from changes its gradient and is carried on.
        let result = |ex: &mut Executor, state: &[f32]| match ex.handle(step(None, state)) {
            Some(W::StepResult(r)) => r,
            other => panic!("{other:?}"),
        };
        assert!(ex.handle(step(Some(params), &[0.0; 4])).is_some());
        let cold = result(&mut ex, &[0.0; 4]);
        let warm = result(&mut ex, &[0.5, -0.5, 0.25, 0.0]);
        assert_eq!(cold.final_state.len(), 16);
        assert_ne!(cold.grad_sum, warm.grad_sum);
        assert_ne!(cold.final_state, warm.final_state);
        // Without a state, a non-stateful shard's step; with one, it is refused.
        let (mut ex, params) = stateful_worker(false);
        let err = error(ex.handle(step(Some(params), &[0.0; 4])));
        assert!(err.contains("initial states of 16 bytes, not 0"), "{err}");
    }
}
