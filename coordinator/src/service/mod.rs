//! The gRPC layer: shared state, the loop that owns the scheduler, and the two services.

mod client;
mod worker;

pub use client::ClientService;
pub use worker::WorkerService;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use recur_core::sets::CheckpointSets;
use recur_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tonic::Status;

use crate::config::CoordinatorConfig;
use crate::datasets::Datasets;
use crate::ids::{JobId, WorkerId};
use crate::metrics::WorkerRow;
use crate::predict::Predictor;
use crate::scheduler::{Action, CheckpointKind, JobState, NewJob, Scheduler};
use crate::store::{JobRecord, Store};

/// What the handlers tell the scheduler loop.
#[derive(Debug)]
pub(crate) enum Event {
    Join {
        hello: pb::Hello,
        tx: mpsc::UnboundedSender<Result<pb::CoordinatorMessage, Status>>,
        /// Dropped when the coordinator drops the worker: its stream's reader stops, so the
        /// stream closes even while the worker (a hung compute) keeps its end open.
        stop_reading: oneshot::Sender<()>,
        reply: oneshot::Sender<WorkerId>,
    },
    /// A worker's message, stamped when it was read from the stream.
    Message(WorkerId, pb::worker_message::Kind, Instant),
    Closed(WorkerId, String),
    Submit(Box<NewJob>),
    Cancel(JobId, oneshot::Sender<bool>),
    /// Deletes an ended job; answers with the record as it was.
    Delete(JobId, oneshot::Sender<Result<JobRecord, Status>>),
    Workers(oneshot::Sender<Vec<pb::WorkerInfo>>),
}

/// The coordinator's end of a worker's stream.
#[derive(Debug)]
pub(crate) struct WorkerStream {
    tx: mpsc::UnboundedSender<Result<pb::CoordinatorMessage, Status>>,
    /// Dropping it stops the reader of the worker's messages.
    _stop_reading: oneshot::Sender<()>,
}

/// A live update for `WatchJob` subscribers.
#[derive(Debug, Clone)]
pub(crate) struct WatchEvent {
    pub job: JobId,
    pub event: pb::watch_job_response::Event,
    pub is_final: bool,
}

/// State the handlers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: CoordinatorConfig,
    pub store: Store,
    pub datasets: Datasets,
    pub predictor: Predictor,
    /// `PredictStream` sessions.
    pub sessions: crate::stream::Sessions,
    pub events: mpsc::UnboundedSender<Event>,
    pub watch: broadcast::Sender<WatchEvent>,
    pub uploads: tokio::sync::Semaphore,
    /// Dataset changes: uploads and submissions hold it shared, a dataset's deletion alone, so
    /// a dataset is never deleted between a submission's check and its job's record.
    pub datasets_gate: tokio::sync::RwLock<()>,
    /// Fires once when the coordinator shuts down; long-lived streams end on it.
    pub shutdown: broadcast::Sender<()>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
}

impl Shared {
    pub fn jobs_dir(&self) -> PathBuf {
        self.config.data_dir.join("jobs")
    }

    pub fn send(&self, event: Event) -> Result<(), Status> {
        self.events
            .send(event)
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Owns the scheduler: applies events, ticks heartbeats, and carries out the actions.
pub(crate) async fn scheduler_loop(
    shared: Arc<Shared>,
    scheduler: Scheduler,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut shutdown: broadcast::Receiver<()>,
) {
    let tick_every = (shared
        .config
        .heartbeat_timeout
        .min(shared.config.part_deadline_floor)
        / 4)
    .max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(tick_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = LoopState {
        scheduler,
        streams: HashMap::new(),
        published_workers: Vec::new(),
    };
    loop {
        let event = tokio::select! {
            // Ticks first, so a flood of messages cannot hold them off; each tick applies what
            // was queued before it (below).
            biased;
            _ = shutdown.recv() => break,
            _ = ticker.tick() => None,
            event = events.recv() => match event {
                Some(event) => Some(event),
                None => break,
            },
        };
        match event {
            Some(event) => state.handle(&shared, event),
            None => {
                // What was queued before this tick counts first: after a slow write the queued
                // heartbeats (stamped when they were read) show who is alive. Only those: the
                // drain must end even while messages keep coming.
                // The tick judges the moment it fired, with everything read before it applied
                // (even when applying it blocked on a write for a while).
                let at = Instant::now();
                for _ in 0..events.len() {
                    let Ok(event) = events.try_recv() else { break };
                    state.handle(&shared, event);
                }
                state.scheduler.tick(at);
                state.perform_all(&shared);
                state.publish_workers(&shared);
            }
        }
    }
    tracing::info!("scheduler loop stopped");
}

/// What the scheduler loop owns besides the scheduler: the workers' streams, and which workers
/// the per-worker metrics show.
struct LoopState {
    scheduler: Scheduler,
    streams: HashMap<WorkerId, WorkerStream>,
    published_workers: Vec<WorkerId>,
}

impl LoopState {
    /// Applies one event and carries out what it caused.
    fn handle(&mut self, shared: &Shared, event: Event) {
        let now = Instant::now();
        let mut cancelled = None;
        match event {
            Event::Join {
                hello,
                tx,
                stop_reading,
                reply,
            } => {
                let id = self.scheduler.join(&hello, now);
                self.streams.insert(
                    id,
                    WorkerStream {
                        tx,
                        _stop_reading: stop_reading,
                    },
                );
                let _ = reply.send(id);
            }
            Event::Message(id, kind, read_at) => self.scheduler.message(id, kind, read_at),
            Event::Closed(id, reason) => self.scheduler.closed(id, reason, now),
            Event::Submit(job) => self.scheduler.submit(*job, now),
            Event::Cancel(id, reply) => {
                // Answer only once the cancellation is stored (below), so the caller reads the
                // new state.
                cancelled = Some((reply, self.scheduler.cancel(&id, now)));
            }
            Event::Workers(reply) => {
                let _ = reply.send(worker_infos(&self.scheduler, now));
            }
            Event::Delete(id, reply) => {
                let result = if self.scheduler.has_job(&id) {
                    Err(Status::failed_precondition(format!(
                        "{id} is queued or running; cancel it first (`recur cancel {id}`)"
                    )))
                } else {
                    // Every write of the job's actions is done (they run before the next event),
                    // so nothing recreates what is deleted here.
                    blocking(|| delete_job(shared, &id))
                };
                let _ = reply.send(result);
            }
        }
        self.perform_all(shared);
        if let Some((reply, found)) = cancelled {
            let _ = reply.send(found);
        }
    }

    /// Sets the per-worker metrics from the connected workers.
    fn publish_workers(&mut self, shared: &Shared) {
        let now = Instant::now();
        let wall = now_ms() as f64 / 1e3;
        let rows: Vec<WorkerRow> = self
            .scheduler
            .workers()
            .iter()
            .map(|(id, w)| WorkerRow {
                id: id.to_string(),
                name: w.name.clone(),
                device: w.device.clone(),
                steps: w.steps as f64,
                rows: w.train_rows as f64,
                steps_per_second: w.speed,
                compute_seconds: w.compute_ms / 1e3,
                wait_seconds: w.wait_ms / 1e3,
                last_seen_unix_seconds: wall
                    - now.saturating_duration_since(w.last_seen).as_secs_f64(),
            })
            .collect();
        shared.metrics.workers(&rows);
        self.published_workers = self.scheduler.workers().keys().copied().collect();
    }

    /// Carries out the scheduler's actions. Store and checkpoint writes tell the runtime that
    /// this thread blocks, so the tasks that read the workers' streams (and stamp their
    /// messages) keep running elsewhere meanwhile.
    fn perform_all(&mut self, shared: &Shared) {
        let m = &shared.metrics;
        m.workers.set(self.scheduler.workers().len() as i64);
        m.queued.set(self.scheduler.queued() as i64);
        // Per-worker series change with membership at once; their figures follow on ticks and
        // at each epoch's end, not on every step message.
        let (sends, writes): (Vec<Action>, Vec<Action>) = self
            .scheduler
            .take_actions()
            .into_iter()
            .partition(|a| matches!(a, Action::Send(..) | Action::Disconnect(..)));
        // Messages to workers go out before the writes the same event caused: a worker computes
        // its next part while the epoch's history and checkpoints are written, and the time a
        // slow disk takes does not count against its deadline.
        for action in sends {
            perform(shared, &mut self.streams, action);
        }
        let epoch_ended = writes.iter().any(|a| matches!(a, Action::Epoch(..)));
        if epoch_ended
            || !self
                .scheduler
                .workers()
                .keys()
                .eq(self.published_workers.iter())
        {
            self.publish_workers(shared);
        }
        let slow = writes.iter().any(|a| {
            matches!(
                a,
                Action::Job(..) | Action::Epoch(..) | Action::Checkpoint(..)
            )
        });
        let run = || {
            for action in writes {
                perform(shared, &mut self.streams, action);
            }
        };
        if slow {
            blocking(run);
        } else {
            run();
        }
    }
}

/// Runs `f`, which blocks on the disk, telling a multi-threaded runtime so, so that the tasks
/// that read the workers' streams keep running elsewhere meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Deletes an ended job: its directory of checkpoint sets is renamed out of sight, then the
/// store's record, history and steps go in one transaction (the job vanishes at once), and the
/// renamed directory is removed in the background (a crash leaves a `.deleted-` directory, swept
/// at the next start). A rename that fails leaves the job as it was.
fn delete_job(shared: &Shared, id: &JobId) -> Result<JobRecord, Status> {
    let Some(record) = shared.store.job(id)? else {
        return Err(Status::not_found(format!("no job {id}")));
    };
    if !record.state.is_final() {
        return Err(Status::failed_precondition(format!(
            "{id} is {}; cancel it first (`recur cancel {id}`)",
            state_name(record.state)
        )));
    }
    let dir = shared.jobs_dir().join(&id.0);
    let doomed = shared.jobs_dir().join(format!(".deleted-{}", id.0));
    let moved = match std::fs::rename(&dir, &doomed) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(Status::internal(format!(
                "cannot move {} out of the way: {e}",
                dir.display()
            )));
        }
    };
    if let Err(e) = shared.store.delete_job(id) {
        if moved && let Err(back) = std::fs::rename(&doomed, &dir) {
            tracing::error!(job = %id, error = %back, "could not put a job's checkpoints back");
        }
        return Err(e.into());
    }
    shared.predictor.invalidate(id);
    shared.sessions.forget_job(id);
    shared.metrics.remove_job(&id.0);
    if moved {
        let job = id.clone();
        std::thread::spawn(move || {
            if let Err(e) = std::fs::remove_dir_all(&doomed) {
                tracing::error!(%job, path = %doomed.display(), error = %e, "could not remove a deleted job's checkpoints");
            }
        });
    }
    tracing::info!(job = %id, "job deleted");
    Ok(record)
}

fn worker_infos(scheduler: &Scheduler, now: Instant) -> Vec<pb::WorkerInfo> {
    let wall = now_ms();
    scheduler
        .workers()
        .iter()
        .map(|(id, w)| pb::WorkerInfo {
            id: id.to_string(),
            name: w.name.clone(),
            device: w.device.clone(),
            threads: w.threads,
            job_id: w.job.as_ref().map(|j| j.0.clone()).unwrap_or_default(),
            shard_rows: w.shard_rows,
            joined_unix_ms: wall
                .saturating_sub(now.saturating_duration_since(w.joined).as_millis() as u64),
            last_seen_ms_ago: now.saturating_duration_since(w.last_seen).as_millis() as u64,
            steps: w.steps,
            train_rows: w.train_rows,
            steps_per_second: w.speed,
        })
        .collect()
}

fn perform(shared: &Shared, streams: &mut HashMap<WorkerId, WorkerStream>, action: Action) {
    match action {
        Action::Send(id, message) => {
            if let Some(stream) = streams.get(&id) {
                let _ = stream.tx.send(Ok(message));
            }
        }
        Action::WorkerGone { device, how } => {
            shared
                .metrics
                .workers_gone
                .with_label_values(&[device.as_str(), how.as_str()])
                .inc();
        }
        Action::Disconnect(id, reason) => {
            if let Some(stream) = streams.remove(&id) {
                let _ = stream.tx.send(Err(Status::aborted(format!(
                    "dropped by the coordinator: {reason}"
                ))));
            }
        }
        Action::Job(id, progress) => {
            slow_disk(shared);
            let record = match shared.store.job(&id) {
                Ok(Some(mut record)) => {
                    record.apply(&progress, now_ms());
                    if let Err(e) = shared.store.put_job(&record) {
                        tracing::error!(job = %id, error = %e, "could not persist job");
                    }
                    record
                }
                Ok(None) => {
                    tracing::error!(job = %id, "progress for an unknown job");
                    return;
                }
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "could not read job");
                    return;
                }
            };
            let state_name = job_metrics(shared, &record);
            if progress.state.is_some_and(JobState::is_final) {
                shared
                    .metrics
                    .jobs_finished
                    .with_label_values(&[state_name.as_str()])
                    .inc();
            }
            publish_job(shared, &record);
        }
        Action::Epoch(id, epoch, steps) => {
            slow_disk(shared);
            shared.metrics.epochs.inc();
            shared.metrics.epoch(
                &id.0,
                epoch.train_loss,
                epoch.validation.map(|v| v.accuracy),
                epoch.lr,
                epoch.samples_per_sec,
            );
            if let Err(e) = shared.store.append_epoch(&id, &epoch, &steps) {
                tracing::error!(job = %id, error = %e, "could not persist epoch");
            }
            let _ = shared.watch.send(WatchEvent {
                job: id,
                event: pb::watch_job_response::Event::Epoch(epoch),
                is_final: false,
            });
        }
        Action::StepApplied {
            samples,
            compute_ms,
            total_ms,
            ..
        } => {
            let m = &shared.metrics;
            m.steps.inc();
            m.samples.inc_by(samples);
            m.step_seconds.observe(total_ms / 1e3);
            m.compute_seconds.observe(compute_ms / 1e3);
            m.wait_seconds
                .observe((total_ms - compute_ms).max(0.0) / 1e3);
        }
        Action::Checkpoint(id, kind, checkpoint) => {
            slow_disk(shared);
            let sets = CheckpointSets::new(shared.jobs_dir().join(&id.0));
            match sets.save(kind, &checkpoint, shared.config.keep_checkpoints) {
                Ok(set) => {
                    tracing::debug!(job = %id, %set, "checkpoint set written");
                    if kind == CheckpointKind::Best {
                        shared.predictor.invalidate(&id);
                        shared.sessions.invalidate(&id);
                    }
                }
                Err(e) => tracing::error!(job = %id, error = %e, "could not write checkpoint"),
            }
        }
    }
}

/// The test hook [`CoordinatorConfig::write_delay`]: a disk this much slower for each store or
/// checkpoint write.
fn slow_disk(shared: &Shared) {
    if !shared.config.write_delay.is_zero() {
        std::thread::sleep(shared.config.write_delay);
    }
}

/// A state's lower-case name (`running`).
pub(crate) fn state_name(state: JobState) -> String {
    pb::JobState::from(state)
        .as_str_name()
        .trim_start_matches("JOB_STATE_")
        .to_lowercase()
}

/// Sets a job's per-job metrics from its record; returns its state's name.
pub(crate) fn job_metrics(shared: &Shared, record: &JobRecord) -> String {
    let name = state_name(record.state);
    shared
        .metrics
        .job(&record.id.0, &name, record.epochs, record.steps);
    name
}

pub(crate) fn publish_job(shared: &Shared, record: &JobRecord) {
    let last = shared.store.last_epoch(&record.id).ok().flatten();
    let _ = shared.watch.send(WatchEvent {
        job: record.id.clone(),
        event: pb::watch_job_response::Event::Job(record.to_proto(last)),
        is_final: record.state.is_final(),
    });
}
