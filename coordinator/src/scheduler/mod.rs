//! The synchronous scheduler: who is connected, which job runs, what each worker must do next.
//!
//! It does no I/O. The gRPC layer feeds it events (a worker joined, sent a message, went away; a
//! job was submitted or cancelled; time passed) and carries out the [`Action`]s it returns (send
//! a message, close a stream, persist a job update, write a checkpoint). That is what makes the
//! training protocol testable without sockets or sleeps.

mod balance;
mod job;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use recur_core::checkpoint::Checkpoint;
use recur_core::data::Prepared;
use recur_core::metrics::Metrics;
use recur_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::ids::{JobId, WorkerId};
use crate::spec::JobSpec;
use job::RunningJob;

/// The worker protocol version this coordinator speaks.
pub const PROTOCOL_VERSION: u32 = 4;

/// Tunables of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    /// A worker not heard from for this long is dropped.
    pub heartbeat_timeout: Duration,
    /// Largest number of values in one `LoadShard` part.
    pub shard_part_values: usize,
    /// A running job with no worker for this long fails.
    pub no_worker_grace: Duration,
    /// Every worker holds the whole training split when it has at most this many values (so
    /// each step is split exactly by the workers' speeds); a larger one is sharded.
    pub replicate_values: usize,
    /// A part of a step or evaluation is due within this many times what the worker's measured
    /// speed predicts...
    pub deadline_factor: f64,
    /// ...and never sooner than this (all the time a worker of unknown speed gets). A worker
    /// that misses its deadline is dropped and its part reissued.
    pub deadline_floor: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(3),
            shard_part_values: 1 << 18,
            no_worker_grace: Duration::from_secs(600),
            replicate_values: 1 << 25,
            deadline_factor: 10.0,
            deadline_floor: Duration::from_secs(60),
        }
    }
}

/// A job's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for the jobs before it.
    Queued,
    /// Training or evaluating.
    Running,
    /// Finished by a stopping rule.
    Completed,
    /// Stopped by an error.
    Failed,
    /// Stopped by a user.
    Cancelled,
}

impl JobState {
    /// Whether the job can no longer change.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// Which checkpoint of a job: the role of a checkpoint set.
pub use recur_core::sets::Role as CheckpointKind;

/// What changed about a job; the store merges it into the job's record.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JobProgress {
    /// The state, when it changed.
    pub state: Option<JobState>,
    /// A note on the state or the failure reason.
    pub message: Option<String>,
    /// Epochs completed.
    pub epochs: u64,
    /// Optimizer steps applied.
    pub steps: u64,
    /// The best epoch so far.
    pub best_epoch: u64,
    /// Its validation metrics.
    pub best_validation: Option<Metrics>,
    /// Test metrics, once completed.
    pub test: Option<Metrics>,
    /// Why training stopped.
    pub stop_reason: Option<String>,
}

/// Something the I/O layer must do.
#[derive(Debug)]
pub enum Action {
    /// Send a message on a worker's stream.
    Send(WorkerId, pb::CoordinatorMessage),
    /// Close a worker's stream and forget it.
    Disconnect(WorkerId, String),
    /// A worker is no longer part of the cluster.
    WorkerGone {
        /// Its device.
        device: String,
        /// How it went.
        how: Departure,
    },
    /// A job's state or progress changed.
    Job(JobId, JobProgress),
    /// A job finished an epoch: store its history and the steps applied in it together.
    Epoch(JobId, pb::EpochMetrics, Vec<pb::StepRecord>),
    /// Write a checkpoint (atomically; `best` before `latest` when both come).
    Checkpoint(JobId, CheckpointKind, Box<Checkpoint>),
    /// An optimizer step was applied: append it to the job's step log.
    StepApplied {
        /// The job.
        job: JobId,
        /// The step number (1-based, consecutive).
        step: u64,
        /// Samples in its global batch.
        samples: u64,
        /// Longest worker compute time of the step, in ms.
        compute_ms: f64,
        /// The whole step as the coordinator saw it, in ms.
        total_ms: f64,
    },
}

/// A job handed to the scheduler.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Its id.
    pub id: JobId,
    /// What to train.
    pub spec: JobSpec,
    /// The data, normalised and split.
    pub data: Arc<Prepared>,
    /// Starting parameters (flat, the model's layout) instead of the seed's initialisation: a
    /// fine-tuned job's copy of another job's best parameters.
    pub init: Option<Vec<f32>>,
    /// Where to continue from, for a job that was running when the coordinator stopped.
    pub resume: Option<Resume>,
}

/// The saved state a resumed job continues from.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The `latest` checkpoint, with optimizer state.
    pub latest: Checkpoint,
    /// The `best` checkpoint, if one was written.
    pub best: Option<Checkpoint>,
    /// Every epoch recorded so far.
    pub history: Vec<pb::EpochMetrics>,
}

/// How a worker left the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// It said goodbye.
    Left,
    /// Its connection closed.
    Lost,
    /// The coordinator dropped it: a missed deadline, a bad result, no heartbeat.
    Dropped,
}

impl Departure {
    /// The `cause` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Left => "left",
            Self::Lost => "lost",
            Self::Dropped => "dropped",
        }
    }
}

/// A connected worker.
#[derive(Debug, Clone)]
pub struct WorkerEntry {
    /// Its name, as it said in its hello.
    pub name: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Its compute threads.
    pub threads: u32,
    /// When it joined.
    pub joined: Instant,
    /// When it was last heard from.
    pub last_seen: Instant,
    /// The job whose shard it holds.
    pub job: Option<JobId>,
    /// Training rows in that shard.
    pub shard_rows: u64,
    /// Steps (parts) it computed.
    pub steps: u64,
    /// Training rows it computed gradients of.
    pub train_rows: u64,
    /// Its measured training throughput, time steps per second (0 until measured).
    pub speed: f64,
    /// Milliseconds it spent computing the step parts it returned.
    pub compute_ms: f64,
    /// Milliseconds its step parts spent in transport and queues (from the step's start to the
    /// result, less the compute).
    pub wait_ms: f64,
}

/// The scheduler's state.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    queue: VecDeque<NewJob>,
    running: Option<RunningJob>,
    next_worker: u64,
    actions: Vec<Action>,
}

/// Borrowed parts of the scheduler a running job acts through.
pub(crate) struct Ctx<'a> {
    pub config: &'a SchedulerConfig,
    pub workers: &'a mut BTreeMap<WorkerId, WorkerEntry>,
    pub actions: &'a mut Vec<Action>,
    pub now: Instant,
    /// Workers to drop after the job's handler returns (a protocol violation).
    pub drops: Vec<(WorkerId, String)>,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            workers: BTreeMap::new(),
            queue: VecDeque::new(),
            running: None,
            next_worker: 1,
            actions: Vec::new(),
        }
    }

    /// The actions produced since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Whether a job is queued or running here.
    pub fn has_job(&self, id: &JobId) -> bool {
        self.running() == Some(id) || self.queue.iter().any(|j| &j.id == id)
    }

    /// Connected workers.
    pub fn workers(&self) -> &BTreeMap<WorkerId, WorkerEntry> {
        &self.workers
    }

    /// Jobs waiting behind the running one.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The running job's id.
    pub fn running(&self) -> Option<&JobId> {
        self.running.as_ref().map(RunningJob::id)
    }

    /// Registers a worker after its hello; the caller has checked the protocol version.
    pub fn join(&mut self, hello: &pb::Hello, now: Instant) -> WorkerId {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        self.workers.insert(
            id,
            WorkerEntry {
                name: hello.name.clone(),
                device: hello.device.clone(),
                threads: hello.threads,
                joined: now,
                last_seen: now,
                job: None,
                shard_rows: 0,
                steps: 0,
                train_rows: 0,
                speed: 0.0,
                compute_ms: 0.0,
                wait_ms: 0.0,
            },
        );
        let heartbeat_ms = (self.config.heartbeat_timeout.as_millis() / 3).max(1) as u32;
        self.actions.push(Action::Send(
            id,
            msg(pb::coordinator_message::Kind::Welcome(pb::Welcome {
                worker_id: id.to_string(),
                heartbeat_interval_ms: heartbeat_ms,
            })),
        ));
        tracing::info!(worker = %id, name = %hello.name, device = %hello.device, "worker joined");
        self.with_job(now, |job, cx| job.worker_joined(cx));
        id
    }

    /// A message from a worker.
    pub fn message(&mut self, id: WorkerId, kind: pb::worker_message::Kind, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.last_seen = now;
        use pb::worker_message::Kind;
        match kind {
            Kind::Heartbeat(_) => {}
            Kind::Hello(_) => self.disconnect(id, "sent a second hello".into(), now),
            Kind::Goodbye(g) => {
                tracing::info!(worker = %id, reason = %g.reason, "worker left");
                self.remove(
                    id,
                    format!("said goodbye: {}", g.reason),
                    Departure::Left,
                    now,
                );
            }
            Kind::Error(e) => self.with_job(now, |job, cx| {
                if job.id().0 == e.job_id {
                    job.worker_error(id, &e.message, cx);
                }
            }),
            Kind::StepResult(r) => self.with_job(now, |job, cx| job.step_result(id, r, cx)),
            Kind::EvalResult(r) => self.with_job(now, |job, cx| job.eval_result(id, r, cx)),
        }
    }

    /// Runs `f` on the running job, then drops the workers it found misbehaving and moves the
    /// queue on.
    fn with_job(&mut self, now: Instant, f: impl FnOnce(&mut RunningJob, &mut Ctx<'_>)) {
        let mut drops = Vec::new();
        if let Some(job) = &mut self.running {
            // Every event of the job's handling carries its id and step.
            let span = tracing::info_span!("job", job = %job.id(), step = job.step());
            let _entered = span.enter();
            let mut cx = ctx(&self.config, &mut self.workers, &mut self.actions, now);
            f(job, &mut cx);
            drops = cx.drops;
        }
        for (id, reason) in drops {
            self.disconnect(id, reason, now);
        }
        self.advance(now);
    }

    /// A worker must be dropped (it missed a deadline, sent a bad result, went silent).
    pub fn disconnect(&mut self, id: WorkerId, reason: String, now: Instant) {
        if self.workers.contains_key(&id) {
            tracing::warn!(worker = %id, %reason, "worker dropped");
        }
        self.remove(id, reason, Departure::Dropped, now);
    }

    /// A worker's stream closed.
    pub fn closed(&mut self, id: WorkerId, reason: String, now: Instant) {
        if self.workers.contains_key(&id) {
            tracing::warn!(worker = %id, %reason, "worker lost");
        }
        self.remove(id, reason, Departure::Lost, now);
    }

    fn remove(&mut self, id: WorkerId, reason: String, how: Departure, now: Instant) {
        let Some(gone) = self.workers.remove(&id) else {
            return;
        };
        self.actions.push(Action::WorkerGone {
            device: gone.device,
            how,
        });
        self.actions.push(Action::Disconnect(id, reason));
        self.with_job(now, |job, cx| job.worker_left(id, cx));
    }

    /// Queues a job (or resumes one at the front of the queue).
    pub fn submit(&mut self, job: NewJob, now: Instant) {
        self.actions.push(Action::Job(
            job.id.clone(),
            JobProgress {
                state: Some(JobState::Queued),
                ..JobProgress::default()
            },
        ));
        if job.resume.is_some() {
            self.queue.push_front(job);
        } else {
            self.queue.push_back(job);
        }
        self.advance(now);
    }

    /// Cancels a queued or running job; false if it is neither.
    pub fn cancel(&mut self, id: &JobId, now: Instant) -> bool {
        if let Some(pos) = self.queue.iter().position(|j| &j.id == id) {
            self.queue.remove(pos);
            self.actions.push(Action::Job(
                id.clone(),
                JobProgress {
                    state: Some(JobState::Cancelled),
                    message: Some("cancelled before it started".into()),
                    ..JobProgress::default()
                },
            ));
            return true;
        }
        match &mut self.running {
            Some(job) if job.id() == id => {
                self.with_job(now, |job, cx| job.cancel(cx));
                true
            }
            _ => false,
        }
    }

    /// Drops workers whose heartbeats stopped or whose step part is past its deadline, and fails
    /// a job that has waited for workers longer than the grace period.
    pub fn tick(&mut self, now: Instant) {
        let grace = self.config.no_worker_grace;
        self.with_job(now, |job, cx| job.check_grace(grace, cx));
        self.with_job(now, |job, cx| job.check_deadlines(cx));
        let timeout = self.config.heartbeat_timeout;
        let dead: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.last_seen) > timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.disconnect(
                id,
                format!("no heartbeat for {} ms", timeout.as_millis()),
                now,
            );
        }
    }

    /// Retires a finished job and starts the next queued one.
    fn advance(&mut self, now: Instant) {
        loop {
            if self.running.as_ref().is_some_and(RunningJob::is_finished) {
                self.running = None;
            }
            if self.running.is_some() {
                return;
            }
            let Some(next) = self.queue.pop_front() else {
                return;
            };
            let mut cx = ctx(&self.config, &mut self.workers, &mut self.actions, now);
            self.running = RunningJob::start(next, &mut cx);
        }
    }
}

fn ctx<'a>(
    config: &'a SchedulerConfig,
    workers: &'a mut BTreeMap<WorkerId, WorkerEntry>,
    actions: &'a mut Vec<Action>,
    now: Instant,
) -> Ctx<'a> {
    Ctx {
        config,
        workers,
        actions,
        now,
        drops: Vec::new(),
    }
}

pub(crate) fn msg(kind: pb::coordinator_message::Kind) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage { kind: Some(kind) }
}
