//! The running job: synchronous data-parallel training driven step by step.
//!
//! Each global mini-batch is cut into one part per worker, sized to the workers' measured speeds
//! (see [`super::balance`]); every worker returns the gradient sum of its rows, the parts are
//! added in a fixed order (part creation order, which follows worker ids) and divided by the
//! batch's sample count, and the optimizer steps. Results for another step, part or parameter
//! version are discarded.
//!
//! Where the rows live: when the training split is small enough
//! ([`super::SchedulerConfig::replicate_values`]) every worker holds all of it, so any row can go
//! to any worker and every step is split exactly by speed. Above that, each worker holds a
//! disjoint shard sized to its speed and a step's parts follow the rows' owners (proportional on
//! average, not in every step); shards are recomputed at an epoch boundary when the speeds have
//! drifted. Validation and test rows are sharded by speed too.
//!
//! A stateful job (`SeriesSpec.stateful`, K streams) keeps each stream's recurrent state here,
//! not on the workers: batch `j` holds the `j`-th window of every stream
//! (`recur_core::data::stream_batches`), every part is sent its rows' states and returns the
//! states they end with, and those are stored when the step is applied. Workers stay stateless,
//! so a lost worker's part is recomputed from the same states and N workers ≡ one process holds
//! as for independent rows. Its validation and test splits are each one stream, held and
//! evaluated by one member (the fastest), window after window from zeros.
//!
//! When a member leaves, the survivors are resharded at once and its unfinished parts are given
//! to the others, so the step completes with the exact global batch. A worker that joins gets a
//! shard at the next epoch boundary (at once if the job had no workers).
//!
//! This file holds the job's lifecycle (start and resume, epochs, completion, membership,
//! deadlines and reissues); the rest is by concern: [`sharding`] (who holds which rows, how work
//! is cut into parts), [`round`] (the parts of one piece of work and their results), [`step`]
//! and [`eval`] (the two kinds of work), [`checkpointing`] (what is saved), [`failures`] (when a
//! worker's failure is the model's). The stop rules come from `recur_core::stop`.

mod checkpointing;
mod eval;
mod failures;
mod round;
mod sharding;
mod step;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use recur_core::data::{Prepared, epoch_batches, stream_batches};
use recur_core::metrics::{Metrics, MetricsAccumulator};
use recur_core::model::Params;
use recur_core::optim::{LrScheduler, Optimizer};
use recur_core::stop::{StopReason, StopRules};
use recur_proto::Bytes;
use recur_proto::v1 as pb;

use super::balance::Speeds;
use super::{Action, Ctx, JobProgress, JobState, NewJob, msg};
use crate::ids::{JobId, WorkerId};
use crate::spec::JobSpec;
use eval::{EvalKind, PendingEval};
use failures::Failures;
use sharding::{TEST, TRAIN, VALIDATION};
use step::PendingStep;

use pb::coordinator_message::Kind as Cmd;

/// What a job does next once it has workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Step,
    Eval(EvalKind),
}

#[derive(Debug)]
enum Phase {
    /// Nothing in flight: the job has no worker, or is between two pieces of work.
    Waiting(Next),
    Step(PendingStep),
    Eval(PendingEval),
    Finished,
}

#[derive(Debug, Clone)]
struct Best {
    epoch: u64,
    version: u64,
    validation: Metrics,
    params: Vec<f32>,
}

#[derive(Debug, Default)]
struct Timing {
    steps: u64,
    compute: f64,
    wait: f64,
    reduce: f64,
    optimizer: f64,
    total: f64,
}

/// A job that holds the workers.
#[derive(Debug)]
pub(crate) struct RunningJob {
    id: JobId,
    spec: JobSpec,
    /// The job's rows (normalised), their split and normalisation, shared with the submission.
    data: Arc<Prepared>,
    /// The evaluation batch of every validation and test row, by dataset row.
    eval_batch: Vec<u32>,
    params: Vec<f32>,
    version: u64,
    /// `params` as they travel, with their version.
    wire: Option<(u64, Bytes)>,
    optimizer: Optimizer,
    lr: LrScheduler,
    epoch: u64,
    batches: Vec<Vec<usize>>,
    cursor: usize,
    /// A stateful job's recurrent state of each stream (`ModelConfig::state_len` values each),
    /// as its last applied step left it; zeros at each epoch's start. Empty otherwise.
    states: Vec<f32>,
    shard_version: u64,
    members: Vec<WorkerId>,
    /// Whether every member holds the whole training split.
    replicated: bool,
    /// Members that hold the whole training split (replicated) as of the last shard version:
    /// a reshard tells them to keep it rather than sending it again.
    holds_train: BTreeSet<WorkerId>,
    /// The epoch at which the shards were last recomputed.
    resharded_epoch: u64,
    /// The members' weights when the shards were last computed.
    shard_weights: Vec<f64>,
    speeds: Speeds,
    owner: [HashMap<usize, WorkerId>; 3],
    sent_version: HashMap<WorkerId, u64>,
    phase: Phase,
    stalled: bool,
    /// When the job lost its last worker (or started without one).
    stalled_since: Option<Instant>,
    next_part: u32,
    next_eval: u64,
    /// Worker failures on the piece of work in flight (errors, non-finite gradients), with the
    /// number of members when it was issued; cleared when it completes.
    failures: Failures,
    train_acc: MetricsAccumulator,
    epoch_start: Instant,
    epoch_samples: u64,
    /// The steps applied in this epoch, stored with its history.
    epoch_steps: Vec<pb::StepRecord>,
    timing: Timing,
    best: Option<Best>,
    stop: Option<&'static str>,
}

impl RunningJob {
    /// Starts (or resumes) a job; returns `None` only if it failed at once (reported).
    pub(crate) fn start(job: NewJob, cx: &mut Ctx<'_>) -> Option<Self> {
        let id = job.id.clone();
        match Self::prepare(job, cx.now) {
            Ok(mut running) => {
                let note = if cx.workers.is_empty() {
                    "waiting for workers"
                } else {
                    ""
                };
                cx.actions.push(Action::Job(
                    id.clone(),
                    JobProgress {
                        state: Some(JobState::Running),
                        message: Some(note.into()),
                        ..running.progress()
                    },
                ));
                tracing::info!(job = %id, epoch = running.epoch, "job started");
                if running.stop.is_some() {
                    tracing::info!(job = %id, epoch = running.epoch, stop = running.stop, "resumed after its last epoch; finishing without training more");
                    running.finish_training(cx);
                } else {
                    running.begin_epoch(cx);
                }
                Some(running)
            }
            Err(reason) => {
                tracing::warn!(job = %id, %reason, "job failed to start");
                cx.actions.push(Action::Job(
                    id,
                    JobProgress {
                        state: Some(JobState::Failed),
                        message: Some(reason),
                        ..JobProgress::default()
                    },
                ));
                None
            }
        }
    }

    fn prepare(job: NewJob, now: Instant) -> Result<Self, String> {
        let t = &job.spec.train;
        let split = &job.data.split;
        // Evaluation batches are the split's rows in order, `batch_size` at a time.
        let mut eval_batch = vec![0u32; job.data.data.len()];
        for rows in [&split.validation, &split.test] {
            for (i, &r) in rows.iter().enumerate() {
                eval_batch[r] = (i / t.batch_size) as u32;
            }
        }
        if split.validation.is_empty() || split.test.is_empty() {
            return Err(format!(
                "the dataset's {} rows leave an empty validation or test split",
                job.data.data.len()
            ));
        }
        let params = match job.init {
            // Fine-tuning: another job's best parameters (its model was checked at submission).
            Some(init) if init.len() == t.model.layout().total() => init,
            Some(init) => {
                return Err(format!(
                    "its starting parameters hold {} values, the model has {}",
                    init.len(),
                    t.model.layout().total()
                ));
            }
            None => Params::init(t.model, t.seed, &Device::Cpu)
                .and_then(|p| p.to_flat())
                .map_err(|e| e.to_string())?,
        };
        let optimizer = Optimizer::new(t.optimizer, params.len()).map_err(|e| e.to_string())?;
        let lr = LrScheduler::new(t.schedule, t.optimizer.lr()).map_err(|e| e.to_string())?;
        let resume = job.resume;
        let mut running = Self {
            id: job.id,
            data: job.data,
            eval_batch,
            params,
            version: 0,
            wire: None,
            optimizer,
            lr,
            epoch: 0,
            batches: Vec::new(),
            cursor: 0,
            states: Vec::new(),
            shard_version: 0,
            members: Vec::new(),
            replicated: false,
            holds_train: BTreeSet::new(),
            resharded_epoch: 0,
            shard_weights: Vec::new(),
            speeds: Speeds::default(),
            owner: Default::default(),
            sent_version: HashMap::new(),
            phase: Phase::Finished,
            stalled: false,
            stalled_since: None,
            next_part: 0,
            next_eval: 0,
            failures: Failures::default(),
            train_acc: MetricsAccumulator::default(),
            epoch_start: now,
            epoch_samples: 0,
            epoch_steps: Vec::new(),
            timing: Timing::default(),
            best: None,
            stop: None,
            spec: job.spec,
        };
        if let Some(resume) = resume {
            running.resume_from(resume)?;
        }
        Ok(running)
    }

    pub(crate) fn id(&self) -> &JobId {
        &self.id
    }

    /// Optimizer steps applied so far.
    pub(crate) fn step(&self) -> u64 {
        self.version
    }

    /// The job's stopping rules.
    fn rules(&self) -> StopRules {
        StopRules {
            max_steps: self.spec.max_steps,
            ..self.spec.train.stop_rules()
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished) && self.stop.is_some()
    }

    fn progress(&self) -> JobProgress {
        JobProgress {
            state: None,
            message: None,
            epochs: self.epoch,
            steps: self.version,
            best_epoch: self.best.as_ref().map_or(0, |b| b.epoch),
            best_validation: self.best.as_ref().map(|b| b.validation),
            test: None,
            stop_reason: None,
        }
    }

    /// Starts an epoch: picks up joined workers, shuffles the batches, issues the first step.
    fn begin_epoch(&mut self, cx: &mut Ctx<'_>) {
        self.phase = Phase::Waiting(Next::Step);
        self.refresh_members(cx);
        let t = &self.spec.train;
        if t.stateful > 0 {
            // Batch `j` holds the `j`-th window of every stream; each stream starts cold.
            self.batches = stream_batches(&self.data.split.train, t.stateful);
            // As many streams as the windows allow (`stream_batches` clamps to them).
            let streams = self.batches.first().map_or(0, Vec::len);
            self.states = vec![0.0; streams * t.model.state_len()];
        } else {
            self.batches = epoch_batches(&self.data.split.train, t.batch_size, t.seed, self.epoch);
        }
        self.cursor = 0;
        self.train_acc = MetricsAccumulator::default();
        self.timing = Timing::default();
        self.epoch_start = cx.now;
        self.epoch_samples = 0;
        self.epoch_steps.clear();
        self.issue_step(cx);
    }

    /// A resumed job whose stop rules already hold (it was stopped after its last checkpoint
    /// and before it was marked completed): evaluates the best parameters on the test rows and
    /// completes, training nothing more.
    fn finish_training(&mut self, cx: &mut Ctx<'_>) {
        self.phase = Phase::Waiting(Next::Eval(EvalKind::Test));
        self.refresh_members(cx);
        self.start_eval(EvalKind::Test, cx);
    }

    /// Drops the workers whose parts are past their deadline (a compute that hangs while the
    /// worker's heartbeats go on); their parts are reissued like a lost worker's.
    pub(crate) fn check_deadlines(&mut self, cx: &mut Ctx<'_>) {
        let late: Vec<(WorkerId, usize, Instant)> = match &self.phase {
            Phase::Step(p) => late_parts(p.round.outstanding()),
            Phase::Eval(e) => late_parts(e.round.outstanding()),
            Phase::Waiting(_) | Phase::Finished => Vec::new(),
        };
        for (worker, rows, due) in late {
            // Parts of workers already gone wait for a worker to take them over.
            if cx.now <= due
                || !cx.workers.contains_key(&worker)
                || cx.drops.iter().any(|(w, _)| *w == worker)
            {
                continue;
            }
            let reason = format!(
                "worker {worker} did not return its part of {rows} rows by its deadline (compute hung or far slower than measured)"
            );
            tracing::warn!(job = %self.id, %worker, rows, "part past its deadline; the worker is dropped");
            // A deadline missed by every worker is the job's problem (the floor is too short
            // for this model), not theirs: it fails rather than going round forever. Each miss
            // doubles the next budget of the same work.
            self.failures.errors.push(reason.clone());
            if let Some(verdict) = self.failures.verdict() {
                self.fail(
                    format!("{verdict}; raise --part-deadline-s if the work is just slow"),
                    cx,
                );
                return;
            }
            cx.drops.push((worker, reason));
        }
    }

    fn end_epoch(&mut self, validation: Metrics, cx: &mut Ctx<'_>) {
        self.epoch += 1;
        let train = self.train_acc.finish();
        let lr_used = self.optimizer.lr();
        let next_lr = self.lr.epoch_end(validation.loss);
        self.optimizer.set_lr(next_lr);
        let improved = StopRules::is_better(
            validation.accuracy,
            self.best.as_ref().map(|b| b.validation.accuracy),
        );
        if improved {
            self.best = Some(Best {
                epoch: self.epoch,
                version: self.version,
                validation,
                params: self.params.clone(),
            });
        }
        let seconds = cx
            .now
            .saturating_duration_since(self.epoch_start)
            .as_secs_f64();
        let steps = self.timing.steps.max(1) as f64;
        let record = pb::EpochMetrics {
            epoch: self.epoch,
            train_loss: train.loss,
            train_accuracy: train.accuracy,
            validation: Some((&validation).into()),
            lr: lr_used,
            seconds,
            samples_per_sec: self.epoch_samples as f64 / seconds.max(1e-9),
            workers: self.members.len() as u32,
            timing: Some(pb::StepTiming {
                compute_ms: self.timing.compute / steps,
                wait_ms: self.timing.wait / steps,
                reduce_ms: self.timing.reduce / steps,
                optimizer_ms: self.timing.optimizer / steps,
                total_ms: self.timing.total / steps,
            }),
            step: self.version,
        };
        tracing::info!(
            job = %self.id,
            epoch = self.epoch,
            val_accuracy = validation.accuracy,
            train_loss = train.loss,
            step_ms = self.timing.total / steps,
            "epoch done"
        );
        // The best checkpoint is written before the record that announces it: a client that sees
        // a best validation in the job's progress can predict from it at once.
        if improved {
            self.push_best(None, cx);
        }
        cx.actions.push(Action::Epoch(
            self.id.clone(),
            record,
            std::mem::take(&mut self.epoch_steps),
        ));
        cx.actions
            .push(Action::Job(self.id.clone(), self.progress()));
        let best_epoch = self.best.as_ref().map_or(0, |b| b.epoch);
        if self.stop.is_none() {
            self.stop = self
                .rules()
                .after_epoch(self.epoch, self.version, best_epoch, validation.accuracy)
                .map(StopReason::as_str);
        }
        if self.stop.is_some() || self.epoch.is_multiple_of(self.spec.checkpoint_every) {
            self.push_latest(cx);
        }
        if self.stop.is_some() {
            self.start_eval(EvalKind::Test, cx);
        } else {
            self.begin_epoch(cx);
        }
    }

    fn complete(&mut self, test: Metrics, cx: &mut Ctx<'_>) {
        self.push_best(Some(test), cx);
        let stop = self.stop.unwrap_or("max_epochs");
        tracing::info!(job = %self.id, test_accuracy = test.accuracy, stop, "job completed");
        cx.actions.push(Action::Job(
            self.id.clone(),
            JobProgress {
                state: Some(JobState::Completed),
                message: Some(String::new()),
                test: Some(test),
                stop_reason: Some(stop.to_string()),
                ..self.progress()
            },
        ));
        self.release(cx);
    }

    pub(crate) fn fail(&mut self, reason: String, cx: &mut Ctx<'_>) {
        tracing::warn!(job = %self.id, %reason, "job failed");
        cx.actions.push(Action::Job(
            self.id.clone(),
            JobProgress {
                state: Some(JobState::Failed),
                message: Some(reason),
                ..self.progress()
            },
        ));
        self.stop = Some("failed");
        self.release(cx);
    }

    pub(crate) fn cancel(&mut self, cx: &mut Ctx<'_>) {
        tracing::info!(job = %self.id, step = self.version, "job cancelled");
        cx.actions.push(Action::Job(
            self.id.clone(),
            JobProgress {
                state: Some(JobState::Cancelled),
                message: Some(format!("cancelled at step {}", self.version)),
                ..self.progress()
            },
        ));
        self.stop = Some("cancelled");
        self.release(cx);
    }

    fn release(&mut self, cx: &mut Ctx<'_>) {
        self.phase = Phase::Finished;
        for w in std::mem::take(&mut self.members) {
            if let Some(entry) = cx.workers.get_mut(&w) {
                entry.job = None;
                entry.shard_rows = 0;
                entry.speed = 0.0;
                cx.actions.push(Action::Send(
                    w,
                    msg(Cmd::Release(pb::Release {
                        job_id: self.id.0.clone(),
                    })),
                ));
            }
        }
    }

    /// Fails the job if it has had no worker for longer than `grace`.
    pub(crate) fn check_grace(&mut self, grace: std::time::Duration, cx: &mut Ctx<'_>) {
        if let Some(since) = self.stalled_since
            && !self.is_finished()
            && cx.now.saturating_duration_since(since) > grace
        {
            self.fail(
                format!(
                    "no worker for {} s, the grace period; start workers and resubmit",
                    grace.as_secs()
                ),
                cx,
            );
        }
    }

    /// A worker could not carry out a command of this job (out of memory, a failed kernel, a
    /// shard it could not load): it is dropped and its part reissued, unless every worker fails
    /// the same way.
    pub(crate) fn worker_error(&mut self, worker: WorkerId, message: &str, cx: &mut Ctx<'_>) {
        if self.is_finished() || !self.members.contains(&worker) {
            return;
        }
        let reason = format!("worker {worker} failed: {message}");
        self.failures.errors.push(reason.clone());
        if let Some(verdict) = self.failures.verdict() {
            self.fail(verdict, cx);
        } else {
            tracing::warn!(job = %self.id, %worker, error = %message, "worker failed; it is dropped and its part reissued");
            cx.drops.push((worker, reason));
        }
    }

    pub(crate) fn worker_joined(&mut self, cx: &mut Ctx<'_>) {
        if self.stalled && !self.is_finished() {
            self.members = cx.workers.keys().copied().collect();
            self.reshard(cx);
            cx.actions.push(Action::Job(
                self.id.clone(),
                JobProgress {
                    message: Some(String::new()),
                    ..self.progress()
                },
            ));
            self.reissue(None, cx);
        }
    }

    pub(crate) fn worker_left(&mut self, id: WorkerId, cx: &mut Ctx<'_>) {
        if !self.members.contains(&id) || self.is_finished() {
            return;
        }
        self.members.retain(|&m| m != id);
        self.speeds.forget(id);
        self.reshard(cx);
        if self.stalled {
            cx.actions.push(Action::Job(
                self.id.clone(),
                JobProgress {
                    message: Some("waiting for workers".into()),
                    ..self.progress()
                },
            ));
            return;
        }
        self.reissue(Some(id), cx);
    }

    /// Gives the unfinished parts of the current step or evaluation (those of `lost`, or all of
    /// them) to the rows' current owners.
    fn reissue(&mut self, lost: Option<WorkerId>, cx: &mut Ctx<'_>) {
        match std::mem::replace(&mut self.phase, Phase::Finished) {
            Phase::Step(mut pending) => {
                let rows = pending.round.take_unfinished(lost);
                let new_parts = self.make_parts(TRAIN, &rows, cx);
                self.send_step_parts(&new_parts, pending.step, &pending.streams, cx);
                pending.round.parts.extend(new_parts);
                self.phase = Phase::Step(pending);
            }
            Phase::Eval(mut eval) => {
                let which = if eval.kind == EvalKind::Validation {
                    VALIDATION
                } else {
                    TEST
                };
                let rows = eval.round.take_unfinished(lost);
                let new_parts = self.make_parts(which, &rows, cx);
                let ids: Vec<u32> = new_parts.iter().map(|p| p.id).collect();
                eval.round.parts.extend(new_parts);
                self.send_eval_parts(&eval, &ids, cx);
                self.phase = Phase::Eval(eval);
            }
            Phase::Waiting(Next::Step) => self.issue_step(cx),
            Phase::Waiting(Next::Eval(kind)) => self.start_eval(kind, cx),
            Phase::Finished => {}
        }
    }
}

/// Worker, row count and deadline of each awaited part.
fn late_parts<'a>(parts: impl Iterator<Item = &'a round::Part>) -> Vec<(WorkerId, usize, Instant)> {
    parts
        .map(|part| (part.worker, part.rows.len(), part.due))
        .collect()
}
