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
//! drifted. Validation and test rows are always sharded by speed.
//!
//! When a member leaves, the survivors are resharded at once and its unfinished parts are given
//! to the others, so the step completes with the exact global batch. A worker that joins gets a
//! shard at the next epoch boundary (at once if the job had no workers).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use candle_core::Device;
use recur_core::checkpoint::{Checkpoint, FORMAT_VERSION, Manifest};
use recur_core::convert::{add_wire_f32s, f32s_from_wire, f32s_to_wire};
use recur_core::data::{Dataset, Split, epoch_batches, shard_by_steps, split_batch};
use recur_core::metrics::{BatchSums, Metrics, MetricsAccumulator};
use recur_core::model::Params;
use recur_core::optim::{LrScheduler, Optimizer};
use recur_core::stop::{StopReason, StopRules};
use recur_proto::Bytes;
use recur_proto::v1 as pb;

use super::balance::{Speeds, share_drift};
use super::{Action, CheckpointKind, Ctx, JobProgress, JobState, NewJob, SchedulerConfig, msg};
use crate::ids::{JobId, WorkerId};
use crate::spec::JobSpec;

use pb::coordinator_message::Kind as Cmd;

#[derive(Debug)]
struct Part {
    id: u32,
    worker: WorkerId,
    rows: Vec<usize>,
    /// Time steps in `rows`.
    steps: usize,
    /// When the worker's result is due.
    due: Instant,
}

#[derive(Debug)]
struct PartResult {
    /// The gradient sum as it travelled, until it is added to the step's total.
    grad: Option<Bytes>,
    sums: BatchSums,
    compute_ms: f64,
}

#[derive(Debug)]
struct PendingStep {
    /// The step being computed (1-based): `version + 1`.
    step: u64,
    parts: Vec<Part>,
    results: BTreeMap<u32, PartResult>,
    /// The gradient sum of `parts[..reduced]`: results are added as they arrive, but always in
    /// part order (a result waits for those before it), so the sum does not depend on timing.
    grad: Vec<f32>,
    reduced: usize,
    sent_at: Instant,
}

impl PendingStep {
    /// Adds every result whose turn has come to the running sum.
    fn reduce_ready(&mut self) {
        while let Some(part) = self.parts.get(self.reduced) {
            let Some(result) = self.results.get_mut(&part.id) else {
                break;
            };
            if let Some(g) = result.grad.take() {
                // Lengths were checked when the result arrived.
                if self.reduced == 0 {
                    let first = f32s_from_wire(&g, "StepResult.grad_sum");
                    debug_assert!(first.is_ok(), "gradient lengths are checked on arrival");
                    self.grad = first.unwrap_or_default();
                } else {
                    let added = add_wire_f32s(&mut self.grad, &g);
                    debug_assert!(added, "gradient lengths are checked on arrival");
                }
            }
            self.reduced += 1;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EvalKind {
    Validation,
    Test,
}

#[derive(Debug)]
struct PendingEval {
    id: u64,
    kind: EvalKind,
    version: u64,
    parts: Vec<Part>,
    done: BTreeSet<u32>,
    sums: Vec<BatchSums>,
}

/// Failures of workers on the current step or evaluation. A worker that fails is dropped and its
/// part reissued; the job fails only when the failure looks like the model's: a non-finite
/// gradient from a second worker, or errors from as many workers as the work was first given to
/// (at least two: a lone worker gets a second try after it reconnects).
#[derive(Debug, Default)]
struct Failures {
    errors: Vec<String>,
    non_finite: Vec<String>,
    members: usize,
}

impl Failures {
    fn start(&mut self, members: usize) {
        *self = Self {
            members,
            ..Self::default()
        };
    }

    /// The reason to fail the job, if the failures so far are the model's.
    fn verdict(&self) -> Option<String> {
        if self.non_finite.len() >= 2 {
            return Some(format!(
                "{}; reproduced by another worker: {}; the step was not applied (the model diverged: lower the learning rate)",
                self.non_finite[0],
                self.non_finite[1..].join("; ")
            ));
        }
        if self.errors.len() >= self.members.max(2) {
            return Some(format!(
                "every worker failed the same work: {}",
                self.errors.join("; ")
            ));
        }
        None
    }
}

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
    data: Dataset,
    scale: f32,
    split: Split,
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
    timing: Timing,
    best: Option<Best>,
    stop: Option<&'static str>,
}

const TRAIN: usize = 0;
/// How far (in share of the work) the speeds may move from the shards' before sharded training
/// rows are recomputed at an epoch boundary.
const RESHARD_DRIFT: f64 = 0.1;
const VALIDATION: usize = 1;
const TEST: usize = 2;

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
        let scale = t.scale.resolve(&job.data).map_err(|e| e.to_string())?;
        let split = Split::new(job.data.len(), t.seed, t.split).map_err(|e| e.to_string())?;
        // Evaluation batches are the split's rows in order, `batch_size` at a time.
        let mut eval_batch = vec![0u32; job.data.len()];
        for rows in [&split.validation, &split.test] {
            for (i, &r) in rows.iter().enumerate() {
                eval_batch[r] = (i / t.batch_size) as u32;
            }
        }
        if split.validation.is_empty() || split.test.is_empty() {
            return Err(format!(
                "the dataset's {} rows leave an empty validation or test split",
                job.data.len()
            ));
        }
        let mut params = Params::init(t.model, t.seed, &Device::Cpu)
            .and_then(|p| p.to_flat())
            .map_err(|e| e.to_string())?;
        let mut optimizer = Optimizer::new(t.optimizer, params.len()).map_err(|e| e.to_string())?;
        let mut lr = LrScheduler::new(t.schedule, t.optimizer.lr()).map_err(|e| e.to_string())?;
        let (mut version, mut epoch, mut best) = (0, 0, None);
        let mut stop = None;
        if let Some(resume) = job.resume {
            let m = &resume.latest.manifest;
            if resume.latest.params.len() != params.len() || m.model != t.model {
                return Err("the latest checkpoint does not fit the job's model".into());
            }
            params.clone_from(&resume.latest.params);
            version = m.step;
            epoch = m.epoch;
            if let Some(state) = resume.latest.optimizer.clone() {
                optimizer.load_state(state).map_err(|e| e.to_string())?;
            }
            if let Some(s) = &m.scheduler {
                lr = s.clone();
            }
            optimizer.set_lr(m.lr.unwrap_or(lr.lr()));
            best = resume.best.and_then(|b| {
                Some(Best {
                    epoch: b.manifest.epoch,
                    version: b.manifest.step,
                    validation: b.manifest.validation?,
                    params: b.params,
                })
            });
            // The stop rules are applied again: a job stopped after its last checkpoint and
            // before it was marked completed finishes without training more.
            if let Some(last) = resume.history.last().and_then(|e| e.validation) {
                let mut rules = StopRules {
                    max_steps: job.spec.max_steps,
                    ..t.stop_rules()
                };
                // The best epoch as the history tells it (the best checkpoint may be missing, or
                // newer than `latest` and so not kept); without the best parameters patience
                // cannot end the job, since its test would have nothing to test.
                let history_best = resume
                    .history
                    .iter()
                    .filter_map(|e| Some((e.epoch, e.validation?.accuracy)))
                    .fold(None, |acc: Option<(u64, f64)>, (e, a)| {
                        if StopRules::is_better(a, acc.map(|x| x.1)) {
                            Some((e, a))
                        } else {
                            acc
                        }
                    });
                if best.is_none() {
                    rules.patience = u64::MAX;
                }
                let best_epoch = history_best.map_or(0, |b| b.0);
                stop = rules
                    .after_epoch(epoch, version, best_epoch, last.accuracy)
                    .map(StopReason::as_str);
            }
        }
        Ok(Self {
            id: job.id,
            data: job.data.scaled(scale),
            scale,
            split,
            eval_batch,
            params,
            version,
            wire: None,
            optimizer,
            lr,
            epoch,
            batches: Vec::new(),
            cursor: 0,
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
            timing: Timing::default(),
            best,
            stop,
            spec: job.spec,
        })
    }

    pub(crate) fn id(&self) -> &JobId {
        &self.id
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
        self.batches = epoch_batches(&self.split.train, t.batch_size, t.seed, self.epoch);
        self.cursor = 0;
        self.train_acc = MetricsAccumulator::default();
        self.timing = Timing::default();
        self.epoch_start = cx.now;
        self.epoch_samples = 0;
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

    /// Takes in the workers that joined (and out those that left), and reshards when the
    /// members changed or their speeds drifted from the shards'.
    fn refresh_members(&mut self, cx: &mut Ctx<'_>) {
        let active: Vec<WorkerId> = cx.workers.keys().copied().collect();
        // Shards follow the speeds, but not more often than every other epoch: moving a large
        // sharded training split costs more than a little imbalance.
        let drifted = self.epoch >= self.resharded_epoch + 2
            && share_drift(&self.speeds.weights(&self.members), &self.shard_weights)
                > RESHARD_DRIFT;
        if active != self.members || self.members.is_empty() || drifted {
            self.members = active;
            self.reshard(cx);
        }
    }

    /// Divides the rows among the members by real steps, weighted by their speeds, and sends
    /// every member its shard. Replicated training rows are sent only to members that do not
    /// hold them yet.
    fn reshard(&mut self, cx: &mut Ctx<'_>) {
        self.owner = Default::default();
        self.sent_version.clear();
        if self.members.is_empty() {
            self.stalled = true;
            self.stalled_since.get_or_insert(cx.now);
            self.holds_train.clear();
            return;
        }
        self.stalled = false;
        self.stalled_since = None;
        self.shard_version += 1;
        self.resharded_epoch = self.epoch;
        let n = self.members.len();
        let data = &self.data;
        let train_values: usize = self.split.train.iter().map(|&r| data.row(r).len()).sum();
        let replicated = train_values <= cx.config.replicate_values;
        if !replicated || !self.replicated {
            self.holds_train.clear();
        }
        self.replicated = replicated;
        self.shard_weights = self.speeds.weights(&self.members);
        let weights = &self.shard_weights;
        let by_speed = |rows: &[usize]| shard_by_steps(rows, weights, |r| data.steps(r));
        let train_shards = if replicated {
            Vec::new()
        } else {
            by_speed(&self.split.train)
        };
        let validation_shards = by_speed(&self.split.validation);
        let test_shards = by_speed(&self.split.test);
        for (k, &w) in self.members.iter().enumerate() {
            let keep_train = replicated && self.holds_train.contains(&w);
            let train: &[usize] = match (replicated, keep_train) {
                (false, _) => &train_shards[k],
                (true, false) => &self.split.train,
                (true, true) => &[],
            };
            for (which, rows) in [
                (TRAIN, if replicated { &[][..] } else { train }),
                (VALIDATION, &validation_shards[k][..]),
                (TEST, &test_shards[k][..]),
            ] {
                for &r in rows {
                    self.owner[which].insert(r, w);
                }
            }
            if let Some(entry) = cx.workers.get_mut(&w) {
                entry.job = Some(self.id.clone());
                entry.shard_rows = if replicated {
                    self.split.train.len()
                } else {
                    train.len()
                } as u64;
            }
            let lists = [train, &validation_shards[k], &test_shards[k]];
            for part in self.shard_messages(lists, keep_train, cx.config.shard_part_values) {
                cx.actions.push(Action::Send(w, msg(Cmd::LoadShard(part))));
            }
        }
        self.holds_train = if replicated {
            self.members.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        tracing::info!(
            job = %self.id,
            workers = n,
            shard_version = self.shard_version,
            replicated,
            weights = ?self.shard_weights,
            "resharded"
        );
    }

    /// The `LoadShard` messages of one worker's shard: training, validation and test rows, cut
    /// into parts of at most `part_values` values.
    fn shard_messages(
        &self,
        lists: [&[usize]; 3],
        keep_train: bool,
        part_values: usize,
    ) -> Vec<pb::LoadShard> {
        let empty = || pb::LoadShard {
            keep_train,
            ..self.empty_shard_part()
        };
        let mut parts = Vec::new();
        let mut current = empty();
        let mut values = 0;
        for (which, rows) in lists.into_iter().enumerate() {
            for &r in rows {
                let row = self.data.row(r);
                if values + row.len() > part_values && values > 0 {
                    parts.push(std::mem::replace(&mut current, empty()));
                    values = 0;
                }
                values += row.len();
                let block = match which {
                    TRAIN => current.train.get_or_insert_default(),
                    VALIDATION => {
                        current.validation_batches.push(self.eval_batch[r]);
                        current.validation.get_or_insert_default()
                    }
                    _ => {
                        current.test_batches.push(self.eval_batch[r]);
                        current.test.get_or_insert_default()
                    }
                };
                block.ids.push(r as u64);
                block.lengths.push(row.len() as u32);
                block.values.extend_from_slice(row);
            }
        }
        current.last = true;
        parts.push(current);
        parts
    }

    fn empty_shard_part(&self) -> pb::LoadShard {
        pb::LoadShard {
            job_id: self.id.0.clone(),
            shard_version: self.shard_version,
            model: Some((&self.spec.train.model).into()),
            scale: self.scale,
            eval_batch_size: self.spec.train.batch_size as u32,
            ..Default::default()
        }
    }

    /// Splits `rows` into parts, in member order: replicated training rows by the members'
    /// speeds, anything else by owner. Workers with no rows get no part.
    fn make_parts(&mut self, which: usize, rows: &[usize], cx: &Ctx<'_>) -> Vec<Part> {
        let by_worker: Vec<(WorkerId, Vec<usize>)> = if which == TRAIN && self.replicated {
            let weights = self.speeds.weights(&self.members);
            let data = &self.data;
            self.members
                .iter()
                .copied()
                .zip(split_batch(rows, &weights, |r| data.steps(r)))
                .collect()
        } else {
            let mut by_owner: BTreeMap<WorkerId, Vec<usize>> = BTreeMap::new();
            for &r in rows {
                if let Some(&w) = self.owner[which].get(&r) {
                    by_owner.entry(w).or_default().push(r);
                }
            }
            by_owner.into_iter().collect()
        };
        by_worker
            .into_iter()
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(worker, rows)| {
                self.next_part += 1;
                let steps = rows.iter().map(|&r| self.data.steps(r)).sum();
                Part {
                    id: self.next_part,
                    worker,
                    steps,
                    rows,
                    due: cx.now + self.part_budget(worker, steps, cx.config),
                }
            })
            .collect()
    }

    /// How long `worker` may take for a part of `steps` time steps: `deadline_factor` times what
    /// its measured speed predicts, and never less than `deadline_floor` (the whole budget while
    /// its speed is unknown).
    fn part_budget(&self, worker: WorkerId, steps: usize, config: &SchedulerConfig) -> Duration {
        let expected_ms = self
            .speeds
            .get(worker)
            .map_or(0.0, |speed| steps as f64 / speed.max(1e-9));
        let budget = Duration::from_secs_f64((expected_ms * config.deadline_factor / 1e3).min(1e6));
        // A part right after a reshard also waits for its shard to arrive and load; a part that
        // was missed before gets twice the time for each miss.
        let shard_allowance = if self.sent_version.contains_key(&worker) {
            1
        } else {
            2
        };
        let misses = self.failures.errors.len().min(8) as u32;
        budget.max(config.deadline_floor) * shard_allowance * 2u32.pow(misses)
    }

    /// Drops the workers whose parts are past their deadline (a compute that hangs while the
    /// worker's heartbeats go on); their parts are reissued like a lost worker's.
    pub(crate) fn check_deadlines(&mut self, cx: &mut Ctx<'_>) {
        let late: Vec<(WorkerId, usize, Instant)> = match &self.phase {
            Phase::Step(p) => p
                .parts
                .iter()
                .filter(|part| !p.results.contains_key(&part.id))
                .map(|part| (part.worker, part.rows.len(), part.due))
                .collect(),
            Phase::Eval(e) => e
                .parts
                .iter()
                .filter(|part| !e.done.contains(&part.id))
                .map(|part| (part.worker, part.rows.len(), part.due))
                .collect(),
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

    /// The parameters to send a worker with a command at `version`, if it lacks them.
    fn params_for(
        &mut self,
        worker: WorkerId,
        version: u64,
        values: &Bytes,
    ) -> Option<pb::FlatVector> {
        if self.sent_version.get(&worker) == Some(&version) {
            return None;
        }
        self.sent_version.insert(worker, version);
        Some(pb::FlatVector {
            version,
            values: values.clone(),
        })
    }

    /// The current parameters as they travel, encoded once per version and shared by every
    /// message that carries them.
    fn wire_params(&mut self) -> Bytes {
        match &self.wire {
            Some((v, bytes)) if *v == self.version => bytes.clone(),
            _ => {
                let bytes = f32s_to_wire(&self.params);
                self.wire = Some((self.version, bytes.clone()));
                bytes
            }
        }
    }

    fn send_step_parts(&mut self, parts: &[Part], step: u64, cx: &mut Ctx<'_>) {
        let values = self.wire_params();
        for part in parts {
            let params = self.params_for(part.worker, self.version, &values);
            cx.actions.push(Action::Send(
                part.worker,
                msg(Cmd::Step(pb::Step {
                    job_id: self.id.0.clone(),
                    step,
                    part: part.id,
                    params,
                    version: self.version,
                    rows: part.rows.iter().map(|&r| r as u64).collect(),
                })),
            ));
        }
    }

    fn issue_step(&mut self, cx: &mut Ctx<'_>) {
        if self.stalled {
            self.phase = Phase::Waiting(Next::Step);
            return;
        }
        if self.cursor >= self.batches.len() {
            self.start_eval(EvalKind::Validation, cx);
            return;
        }
        let rows = self.batches[self.cursor].clone();
        let parts = self.make_parts(TRAIN, &rows, cx);
        let step = self.version + 1;
        self.failures.start(self.members.len());
        self.send_step_parts(&parts, step, cx);
        self.phase = Phase::Step(PendingStep {
            step,
            parts,
            results: BTreeMap::new(),
            grad: Vec::new(),
            reduced: 0,
            sent_at: cx.now,
        });
    }

    fn start_eval(&mut self, kind: EvalKind, cx: &mut Ctx<'_>) {
        if self.stalled {
            self.phase = Phase::Waiting(Next::Eval(kind));
            return;
        }
        let (which, rows) = match kind {
            EvalKind::Validation => (VALIDATION, self.split.validation.clone()),
            EvalKind::Test => (TEST, self.split.test.clone()),
        };
        let version = match (kind, &self.best) {
            (EvalKind::Test, Some(b)) => b.version,
            _ => self.version,
        };
        self.next_eval += 1;
        self.failures.start(self.members.len());
        let parts = self.make_parts(which, &rows, cx);
        let batches = rows.len().div_ceil(self.spec.train.batch_size);
        let eval = PendingEval {
            id: self.next_eval,
            kind,
            version,
            parts,
            done: BTreeSet::new(),
            sums: vec![BatchSums::default(); batches],
        };
        self.send_eval_parts(
            &eval,
            &eval.parts.iter().map(|p| p.id).collect::<Vec<_>>(),
            cx,
        );
        self.phase = Phase::Eval(eval);
    }

    fn send_eval_parts(&mut self, eval: &PendingEval, part_ids: &[u32], cx: &mut Ctx<'_>) {
        let values = match (&self.best, eval.version == self.version) {
            (Some(b), false) => f32s_to_wire(&b.params),
            _ => self.wire_params(),
        };
        for part in eval.parts.iter().filter(|p| part_ids.contains(&p.id)) {
            let params = self.params_for(part.worker, eval.version, &values);
            cx.actions.push(Action::Send(
                part.worker,
                msg(Cmd::Evaluate(pb::Evaluate {
                    job_id: self.id.0.clone(),
                    eval_id: eval.id,
                    part: part.id,
                    params,
                    version: eval.version,
                    split: match eval.kind {
                        EvalKind::Validation => pb::EvalSplit::Validation,
                        EvalKind::Test => pb::EvalSplit::Test,
                    } as i32,
                    rows: part.rows.iter().map(|&r| r as u64).collect(),
                })),
            ));
        }
    }

    pub(crate) fn step_result(&mut self, worker: WorkerId, r: pb::StepResult, cx: &mut Ctx<'_>) {
        let expected_len = self.params.len();
        let Phase::Step(pending) = &mut self.phase else {
            return;
        };
        let fresh = r.job_id == self.id.0
            && r.step == pending.step
            && r.version == self.version
            && pending
                .parts
                .iter()
                .any(|p| p.id == r.part && p.worker == worker)
            && !pending.results.contains_key(&r.part);
        if !fresh {
            tracing::debug!(job = %self.id, %worker, step = r.step, part = r.part, "stale step result discarded");
            return;
        }
        if r.grad_sum.len() != expected_len * 4 {
            cx.drops.push((
                worker,
                format!(
                    "sent a gradient of {} bytes for a model of {expected_len} parameters ({} bytes)",
                    r.grad_sum.len(),
                    expected_len * 4
                ),
            ));
            return;
        }
        if let Some(bad) = r
            .grad_sum
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
        {
            let step = pending.step;
            let reason = format!(
                "worker {worker} returned a non-finite gradient (value {bad}) at step {step}"
            );
            self.failures.non_finite.push(reason.clone());
            if let Some(verdict) = self.failures.verdict() {
                self.fail(verdict, cx);
            } else {
                tracing::warn!(job = %self.id, %worker, step, "non-finite gradient; the worker is dropped and its part recomputed elsewhere");
                cx.drops
                    .push((worker, format!("{reason}; its part is recomputed")));
            }
            return;
        }
        let Some(part) = pending.parts.iter().find(|p| p.id == r.part) else {
            return;
        };
        // The coordinator knows how many samples it asked for; a worker must agree.
        let sums = match r.sums.as_ref().map(BatchSums::from) {
            Some(sums) if sums.samples == part.rows.len() as u64 => sums,
            other => {
                cx.drops.push((
                    worker,
                    format!(
                        "reported {} samples for a step part of {} rows",
                        other.map_or("no".to_string(), |s| s.samples.to_string()),
                        part.rows.len()
                    ),
                ));
                return;
            }
        };
        self.speeds.observe(worker, part.steps, r.compute_ms);
        if let Some(w) = cx.workers.get_mut(&worker) {
            w.steps += 1;
            w.train_rows += part.rows.len() as u64;
            w.speed = self.speeds.get(worker).unwrap_or(0.0) * 1e3;
        }
        pending.results.insert(
            r.part,
            PartResult {
                grad: Some(r.grad_sum),
                sums,
                compute_ms: r.compute_ms,
            },
        );
        pending.reduce_ready();
        if pending.results.len() == pending.parts.len() {
            self.apply_step(cx);
        }
    }

    fn apply_step(&mut self, cx: &mut Ctx<'_>) {
        let Phase::Step(mut pending) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            return;
        };
        // What arrived before the last result was added while waiting; what is left is on the
        // critical path.
        let t0 = Instant::now();
        pending.reduce_ready();
        let mut sums = BatchSums::default();
        let mut compute: f64 = 0.0;
        for part in &pending.parts {
            if let Some(r) = pending.results.get(&part.id) {
                sums.add(&r.sums);
                compute = compute.max(r.compute_ms);
            }
        }
        // Every part's sample count was checked against the rows it was given.
        let samples: u64 = pending.parts.iter().map(|p| p.rows.len() as u64).sum();
        let mut grad = std::mem::take(&mut pending.grad);
        let n = samples.max(1) as f32;
        grad.iter_mut().for_each(|v| *v /= n);
        let t1 = Instant::now();
        if let Err(e) = self.optimizer.step(&mut self.params, &grad) {
            self.fail(format!("optimizer step failed: {e}"), cx);
            return;
        }
        let t2 = Instant::now();
        self.version += 1;
        self.cursor += 1;

        self.epoch_samples += samples;
        self.train_acc.add_batch(&sums);
        let total = cx
            .now
            .saturating_duration_since(pending.sent_at)
            .as_secs_f64()
            * 1e3;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let reduce = ms(t1 - t0);
        self.timing.steps += 1;
        self.timing.compute += compute;
        self.timing.wait += (total - compute).max(0.0);
        self.timing.reduce += reduce;
        self.timing.optimizer += ms(t2 - t1);
        self.timing.total += total + ms(t2 - t0);
        cx.actions.push(Action::StepApplied {
            job: self.id.clone(),
            step: self.version,
            samples,
            compute_ms: compute,
            total_ms: total + ms(t2 - t0),
        });
        if self.rules().steps_done(self.version) {
            self.stop = Some(StopReason::MaxSteps.as_str());
            self.start_eval(EvalKind::Validation, cx);
        } else {
            self.issue_step(cx);
        }
    }

    pub(crate) fn eval_result(&mut self, worker: WorkerId, r: pb::EvalResult, cx: &mut Ctx<'_>) {
        let Phase::Eval(eval) = &mut self.phase else {
            return;
        };
        let fresh = r.job_id == self.id.0
            && r.eval_id == eval.id
            && eval
                .parts
                .iter()
                .any(|p| p.id == r.part && p.worker == worker)
            && !eval.done.contains(&r.part);
        if !fresh {
            return;
        }
        for b in &r.batches {
            match (eval.sums.get_mut(b.batch as usize), &b.sums) {
                (Some(slot), Some(s)) => slot.add(&BatchSums::from(s)),
                _ => {
                    cx.drops.push((
                        worker,
                        format!(
                            "sent sums for evaluation batch {}, which does not exist",
                            b.batch
                        ),
                    ));
                    return;
                }
            }
        }
        eval.done.insert(r.part);
        if eval.done.len() < eval.parts.len() {
            return;
        }
        let mut acc = MetricsAccumulator::default();
        for s in &eval.sums {
            acc.add_batch(s);
        }
        let metrics = acc.finish();
        match eval.kind {
            EvalKind::Validation => self.end_epoch(metrics, cx),
            EvalKind::Test => self.complete(metrics, cx),
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
        cx.actions.push(Action::Epoch(self.id.clone(), record));
        cx.actions
            .push(Action::Job(self.id.clone(), self.progress()));
        if improved {
            self.push_best(None, cx);
        }
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

    fn manifest(&self, epoch: u64, step: u64, validation: Option<Metrics>) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            model: self.spec.train.model,
            scale: self.scale,
            epoch,
            step,
            validation,
            test: None,
            optimizer: None,
            scheduler: None,
            lr: None,
            position: BTreeMap::new(),
        }
    }

    fn push_best(&self, test: Option<Metrics>, cx: &mut Ctx<'_>) {
        if let Some(b) = &self.best {
            let mut manifest = self.manifest(b.epoch, b.version, Some(b.validation));
            manifest.test = test;
            cx.actions.push(Action::Checkpoint(
                self.id.clone(),
                CheckpointKind::Best,
                Box::new(Checkpoint {
                    manifest,
                    params: b.params.clone(),
                    optimizer: None,
                }),
            ));
        }
    }

    fn push_latest(&self, cx: &mut Ctx<'_>) {
        let mut manifest = self.manifest(self.epoch, self.version, None);
        manifest.optimizer = Some(*self.optimizer.config());
        manifest.scheduler = Some(self.lr.clone());
        manifest.lr = Some(self.optimizer.lr());
        manifest.position =
            BTreeMap::from([("epoch".to_string(), self.epoch), ("batch".to_string(), 0)]);
        cx.actions.push(Action::Checkpoint(
            self.id.clone(),
            CheckpointKind::Latest,
            Box::new(Checkpoint {
                manifest,
                params: self.params.clone(),
                optimizer: Some(self.optimizer.state().clone()),
            }),
        ));
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
                let mut rows = Vec::new();
                pending.parts.retain(|p| {
                    let redo =
                        !pending.results.contains_key(&p.id) && lost.is_none_or(|l| p.worker == l);
                    if redo {
                        rows.extend_from_slice(&p.rows);
                    }
                    !redo
                });
                let new_parts = self.make_parts(TRAIN, &rows, cx);
                self.send_step_parts(&new_parts, pending.step, cx);
                pending.parts.extend(new_parts);
                self.phase = Phase::Step(pending);
            }
            Phase::Eval(mut eval) => {
                let which = if eval.kind == EvalKind::Validation {
                    VALIDATION
                } else {
                    TEST
                };
                let mut rows = Vec::new();
                eval.parts.retain(|p| {
                    let redo = !eval.done.contains(&p.id) && lost.is_none_or(|l| p.worker == l);
                    if redo {
                        rows.extend_from_slice(&p.rows);
                    }
                    !redo
                });
                let new_parts = self.make_parts(which, &rows, cx);
                let ids: Vec<u32> = new_parts.iter().map(|p| p.id).collect();
                eval.parts.extend(new_parts);
                self.send_eval_parts(&eval, &ids, cx);
                self.phase = Phase::Eval(eval);
            }
            Phase::Waiting(Next::Step) => self.issue_step(cx),
            Phase::Waiting(Next::Eval(kind)) => self.start_eval(kind, cx),
            Phase::Finished => {}
        }
    }
}
