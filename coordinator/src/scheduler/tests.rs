//! The scheduler without sockets: real workers' executors answer its commands in memory, and
//! the tests decide which messages arrive, late, twice or never.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use recur_core::checkpoint::Checkpoint;
use recur_core::data::{BallConfig, Prepared};
use recur_proto::v1 as pb;
use recur_worker::Executor;

use super::*;
use crate::spec::{JobSpec, SpecLimits};

use pb::coordinator_message::Kind as Cmd;
use pb::worker_message::Kind as Reply;

/// What to do with a command on its way to a worker.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Deliver,
    /// The worker dies before it can answer.
    Kill,
    /// The worker takes the command and never answers (its compute hangs), though its stream
    /// stays open.
    Hang,
}

struct Sim {
    s: Scheduler,
    now: Instant,
    workers: BTreeMap<WorkerId, Executor>,
    replies: VecDeque<(WorkerId, Reply)>,
    progress: Vec<(JobId, JobProgress)>,
    epochs: Vec<(JobId, pb::EpochMetrics)>,
    checkpoints: Vec<(JobId, CheckpointKind, Checkpoint)>,
    disconnects: Vec<(WorkerId, String)>,
    sent: Vec<(WorkerId, Cmd)>,
    step_log: Vec<(JobId, u64)>,
    /// The steps stored with each epoch.
    steps: Vec<(JobId, pb::StepRecord)>,
    /// Rewrites replies on their way back to the scheduler (a misbehaving worker).
    tamper: Box<dyn FnMut(WorkerId, Reply) -> Reply>,
}

/// A scheduler that gives every worker only its own shard of the training rows.
fn sharded() -> SchedulerConfig {
    SchedulerConfig {
        replicate_values: 0,
        ..SchedulerConfig::default()
    }
}

impl Sim {
    fn new() -> Self {
        Self::with(SchedulerConfig::default())
    }

    fn with(config: SchedulerConfig) -> Self {
        Self {
            s: Scheduler::new(config),
            now: Instant::now(),
            workers: BTreeMap::new(),
            replies: VecDeque::new(),
            progress: Vec::new(),
            epochs: Vec::new(),
            checkpoints: Vec::new(),
            disconnects: Vec::new(),
            sent: Vec::new(),
            step_log: Vec::new(),
            steps: Vec::new(),
            tamper: Box::new(|_, reply| reply),
        }
    }

    /// Time passes to `at` with the workers' heartbeats still coming.
    fn heartbeats_until(&mut self, workers: &[WorkerId], at: Instant) {
        for &w in workers {
            self.s.message(w, Reply::Heartbeat(pb::Heartbeat {}), at);
        }
        self.s.tick(at);
        self.deliver_all();
    }

    /// Whether `worker` was dropped for missing a deadline.
    fn dropped_for_deadline(&self, worker: WorkerId) -> bool {
        self.disconnects
            .iter()
            .any(|(w, r)| *w == worker && r.contains("deadline"))
    }

    fn join(&mut self, name: &str) -> WorkerId {
        let hello = pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: name.into(),
            device: "cpu".into(),
            threads: 1,
        };
        let id = self.s.join(&hello, self.now);
        self.workers.insert(id, Executor::new(Device::Cpu));
        id
    }

    /// Carries out actions and delivers replies until nothing moves; `fate` decides each command.
    fn run(&mut self, mut fate: impl FnMut(&Sim, WorkerId, &Cmd) -> Fate) {
        loop {
            let actions = self.s.take_actions();
            if actions.is_empty() && self.replies.is_empty() {
                return;
            }
            for action in actions {
                match action {
                    Action::Send(w, m) => {
                        let Some(cmd) = m.kind else { continue };
                        if !self.workers.contains_key(&w) {
                            continue;
                        }
                        match fate(self, w, &cmd) {
                            Fate::Deliver => {
                                self.sent.push((w, cmd.clone()));
                                if let Some(reply) =
                                    self.workers.get_mut(&w).and_then(|e| e.handle(cmd))
                                {
                                    let reply = (self.tamper)(w, reply);
                                    self.replies.push_back((w, reply));
                                }
                            }
                            Fate::Hang => self.sent.push((w, cmd.clone())),
                            Fate::Kill => {
                                self.workers.remove(&w);
                                self.s.disconnect(w, "killed".into(), self.now);
                            }
                        }
                    }
                    Action::Disconnect(w, reason) => {
                        self.workers.remove(&w);
                        self.disconnects.push((w, reason));
                    }
                    Action::Job(id, p) => self.progress.push((id, p)),
                    Action::Epoch(id, e, steps) => {
                        self.steps
                            .extend(steps.into_iter().map(|s| (id.clone(), s)));
                        self.epochs.push((id, e))
                    }
                    Action::Checkpoint(id, kind, c) => self.checkpoints.push((id, kind, *c)),
                    Action::StepApplied { job, step, .. } => self.step_log.push((job, step)),
                    Action::WorkerGone { .. } => {}
                }
            }
            if let Some((w, reply)) = self.replies.pop_front()
                && self.workers.contains_key(&w)
            {
                self.s.message(w, reply, self.now);
            }
        }
    }

    fn deliver_all(&mut self) {
        self.run(|_, _, _| Fate::Deliver);
    }

    fn final_state(&self, job: &JobId) -> Option<(JobState, String)> {
        self.progress
            .iter()
            .rev()
            .filter(|(id, _)| id == job)
            .find_map(|(_, p)| {
                p.state
                    .filter(|s| s.is_final())
                    .map(|s| (s, p.message.clone().unwrap_or_default()))
            })
    }

    fn latest_params(&self, job: &JobId) -> Vec<f32> {
        self.checkpoints
            .iter()
            .rev()
            .find(|(id, kind, _)| id == job && *kind == CheckpointKind::Latest)
            .map(|(_, _, c)| c.params.clone())
            .expect("a latest checkpoint")
    }
}

/// The spec limits of the tests' jobs.
const LIMITS: SpecLimits = SpecLimits {
    max_params: 1 << 20,
    max_batch: 1 << 16,
};

fn job(n: u64, max_steps: u64, seed: u64) -> NewJob {
    let data = BallConfig {
        rows: 400,
        ..BallConfig::tutorial(seed)
    }
    .generate()
    .unwrap();
    let wire = pb::JobSpec {
        dataset_id: "c".repeat(64),
        batch_size: Some(40),
        max_steps,
        seed,
        ..Default::default()
    };
    let spec = JobSpec::from_proto(&wire, &LIMITS).unwrap();
    let t = &spec.train;
    let data = Prepared::rows(&data, t.seed, t.split, t.scale, t.loss).unwrap();
    NewJob {
        id: JobId::nth(n),
        spec,
        data: Arc::new(data),
        init: None,
        resume: None,
    }
}

/// Checks the steps stored with the history of job `n` (made by [`job`] with `seed`): numbered
/// 1, 2, 3…; every step of exactly the batch (40) but an epoch's last; every complete epoch used
/// every training row once (its steps' row digests add up to the training split's).
fn check_stored_steps(sim: &Sim, n: u64, seed: u64) {
    let id = JobId::nth(n);
    let reference = job(n, 1, seed);
    let t = &reference.spec.train;
    let train = recur_core::data::Split::new(reference.data.data.len(), t.seed, t.split)
        .unwrap()
        .train;
    let steps: Vec<&pb::StepRecord> = sim
        .steps
        .iter()
        .filter(|(j, _)| *j == id)
        .map(|(_, s)| s)
        .collect();
    assert!(!steps.is_empty(), "no steps stored");
    assert_eq!(
        steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (1..=steps.len() as u64).collect::<Vec<_>>(),
        "every step once, in order"
    );
    let per_epoch = train.len().div_ceil(t.batch_size);
    let last_epoch = steps.last().map_or(0, |s| s.epoch);
    for epoch in 1..=last_epoch {
        let of: Vec<&&pb::StepRecord> = steps.iter().filter(|s| s.epoch == epoch).collect();
        for (k, s) in of.iter().enumerate() {
            let full = (k + 1) * t.batch_size <= train.len();
            let expected = if full {
                t.batch_size
            } else {
                train.len() % t.batch_size
            };
            assert_eq!(s.samples, expected as u64, "epoch {epoch} step {}", s.step);
        }
        if epoch < last_epoch {
            assert_eq!(of.len(), per_epoch, "epoch {epoch} lost or repeated a step");
        }
        if of.len() == per_epoch {
            let digest = of
                .iter()
                .fold(0u64, |acc, s| acc.wrapping_add(s.rows_digest));
            assert_eq!(
                digest,
                recur_core::data::rows_digest(&train),
                "epoch {epoch} did not use every training row exactly once"
            );
        }
    }
}

fn steps_of(sim: &Sim, job: &JobId) -> u64 {
    sim.progress
        .iter()
        .filter(|(id, _)| id == job)
        .map(|(_, p)| p.steps)
        .max()
        .unwrap_or(0)
}

#[test]
fn a_job_runs_to_completion_on_two_workers() {
    let mut sim = Sim::new();
    sim.join("a");
    sim.join("b");
    sim.s.submit(job(1, 12, 1), sim.now);
    sim.deliver_all();
    let id = JobId::nth(1);
    assert_eq!(sim.final_state(&id).map(|s| s.0), Some(JobState::Completed));
    assert_eq!(steps_of(&sim, &id), 12);
    // 240 training rows in batches of 40: 6 steps an epoch, so 2 epochs.
    let epochs: Vec<u64> = sim.epochs.iter().map(|(_, e)| e.epoch).collect();
    assert_eq!(epochs, [1, 2]);
    check_stored_steps(&sim, 1, 1);
    assert!(sim.epochs.iter().all(|(_, e)| e.workers == 2));
    assert!(
        sim.checkpoints
            .iter()
            .any(|(_, k, c)| *k == CheckpointKind::Best && c.manifest.test.is_some())
    );
    // Both workers were released.
    let releases = sim
        .sent
        .iter()
        .filter(|(_, c)| matches!(c, Cmd::Release(_)))
        .count();
    assert_eq!(releases, 2);
    assert!(sim.s.running().is_none());
}

#[test]
fn a_worker_lost_mid_step_is_replaced_and_the_result_is_unchanged() {
    for config in [SchedulerConfig::default(), sharded()] {
        let mut clean = Sim::with(config);
        for n in ["a", "b", "c"] {
            clean.join(n);
        }
        clean.s.submit(job(1, 9, 2), clean.now);
        clean.deliver_all();
        let reference = clean.latest_params(&JobId::nth(1));

        let mut faulty = Sim::with(config);
        for n in ["a", "b", "c"] {
            faulty.join(n);
        }
        faulty.s.submit(job(1, 9, 2), faulty.now);
        // Worker 2 dies when the fourth step reaches it.
        let victim = WorkerId(2);
        faulty.run(|_, w, cmd| match cmd {
            Cmd::Step(s) if w == victim && s.step == 4 => Fate::Kill,
            _ => Fate::Deliver,
        });
        let id = JobId::nth(1);
        assert_eq!(
            faulty.final_state(&id).map(|s| s.0),
            Some(JobState::Completed)
        );
        assert_eq!(steps_of(&faulty, &id), 9, "no step lost or applied twice");
        let log: Vec<u64> = faulty.step_log.iter().map(|(_, s)| *s).collect();
        assert_eq!(log, (1..=9).collect::<Vec<_>>());
        check_stored_steps(&faulty, 1, 2);
        let params = faulty.latest_params(&id);
        for (a, b) in params.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-2), "{a} vs {b}");
        }
        // The survivors were resharded and took over.
        assert!(faulty.epochs.last().is_some_and(|(_, e)| e.workers == 2));
        // Survivors that hold the replicated training rows keep them: the reshard moves only
        // validation and test rows. Sharded training rows move.
        let second: Vec<&pb::LoadShard> = faulty
            .sent
            .iter()
            .filter_map(|(_, c)| match c {
                Cmd::LoadShard(l) if l.shard_version == 2 => Some(l),
                _ => None,
            })
            .collect();
        assert!(!second.is_empty());
        let replicated = config.replicate_values > 0;
        assert!(
            second
                .iter()
                .all(|l| l.keep_train == replicated && l.train.is_some() != replicated),
            "replicated {replicated}: {:?}",
            second
                .iter()
                .map(|l| (l.keep_train, l.train.is_some()))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_worker_reporting_a_wrong_sample_count_is_dropped_and_the_step_recomputed() {
    let mut clean = Sim::new();
    clean.join("a");
    clean.join("b");
    clean.s.submit(job(1, 6, 4), clean.now);
    clean.deliver_all();
    let reference = clean.latest_params(&JobId::nth(1));

    let mut sim = Sim::new();
    let a = sim.join("a");
    sim.join("b");
    let mut lied = false;
    sim.tamper = Box::new(move |w, reply| match reply {
        Reply::StepResult(mut r) if w == a && !lied => {
            lied = true;
            if let Some(s) = &mut r.sums {
                s.samples += 1;
            }
            Reply::StepResult(r)
        }
        other => other,
    });
    sim.s.submit(job(1, 6, 4), sim.now);
    sim.deliver_all();
    assert!(
        sim.disconnects
            .iter()
            .any(|(w, r)| *w == a && r.contains("samples for a step part of")),
        "{:?}",
        sim.disconnects
    );
    let id = JobId::nth(1);
    assert_eq!(sim.final_state(&id).map(|s| s.0), Some(JobState::Completed));
    assert_eq!(steps_of(&sim, &id), 6);
    for (x, y) in sim.latest_params(&id).iter().zip(&reference) {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-2), "{x} vs {y}");
    }
}

#[test]
fn duplicate_and_stale_results_are_discarded() {
    let mut sim = Sim::new();
    let a = sim.join("a");
    sim.s.submit(job(1, 3, 3), sim.now);
    // Deliver everything, but feed every step result twice and an old one once more.
    let mut seen: Vec<Reply> = Vec::new();
    loop {
        let actions = sim.s.take_actions();
        if actions.is_empty() {
            break;
        }
        for action in actions {
            match action {
                Action::Send(w, m) => {
                    if let Some(reply) = m
                        .kind
                        .and_then(|c| sim.workers.get_mut(&w).and_then(|e| e.handle(c)))
                    {
                        seen.push(reply.clone());
                        sim.s.message(w, reply.clone(), sim.now);
                        sim.s.message(w, reply, sim.now);
                        if let Some(first) = seen.first() {
                            sim.s.message(w, first.clone(), sim.now);
                        }
                    }
                }
                Action::Job(id, p) => sim.progress.push((id, p)),
                _ => {}
            }
        }
    }
    assert_eq!(steps_of(&sim, &JobId::nth(1)), 3);
    assert_eq!(
        sim.final_state(&JobId::nth(1)).map(|s| s.0),
        Some(JobState::Completed)
    );
    assert!(sim.s.workers().contains_key(&a));
}

#[test]
fn silent_workers_are_dropped_after_the_heartbeat_timeout() {
    let mut sim = Sim::new();
    let a = sim.join("a");
    let b = sim.join("b");
    sim.deliver_all();
    let later = sim.now + Duration::from_secs(2);
    sim.s.message(a, Reply::Heartbeat(pb::Heartbeat {}), later);
    sim.s.tick(sim.now + Duration::from_millis(3500));
    assert!(sim.s.workers().contains_key(&a));
    assert!(!sim.s.workers().contains_key(&b));
    sim.deliver_all();
    assert!(
        sim.disconnects
            .iter()
            .any(|(w, r)| *w == b && r.contains("no heartbeat"))
    );
}

#[test]
fn a_gradient_of_the_wrong_length_drops_the_worker_and_nan_fails_the_job() {
    let mut sim = Sim::new();
    let a = sim.join("a");
    sim.join("b");
    sim.s.submit(job(1, 6, 4), sim.now);
    // Worker a truncates its first gradient.
    let mut tampered = false;
    sim.tamper = Box::new(move |w, reply| match reply {
        Reply::StepResult(mut r) if w == a && !tampered => {
            tampered = true;
            r.grad_sum = r.grad_sum.slice(..r.grad_sum.len() - 4);
            Reply::StepResult(r)
        }
        other => other,
    });
    sim.deliver_all();
    assert!(
        sim.disconnects
            .iter()
            .any(|(w, r)| *w == a
                && r.contains("gradient of 384 bytes for a model of 97 parameters")),
        "{:?}",
        sim.disconnects
    );
    assert_eq!(
        sim.final_state(&JobId::nth(1)).map(|s| s.0),
        Some(JobState::Completed)
    );
    assert_eq!(steps_of(&sim, &JobId::nth(1)), 6);
}

/// Rewrites step results: `nan` puts a NaN in the gradient, otherwise the result becomes the
/// worker's error.
fn spoil(r: pb::StepResult, nan: bool) -> Reply {
    if nan {
        let mut r = r;
        let mut g = recur_core::convert::f32s_from_wire(&r.grad_sum, "grad").unwrap();
        g[3] = f32::NAN;
        r.grad_sum = recur_core::convert::f32s_to_wire(&g);
        Reply::StepResult(r)
    } else {
        Reply::Error(pb::WorkerError {
            job_id: r.job_id,
            message: "CUDA_ERROR_OUT_OF_MEMORY".into(),
        })
    }
}

#[test]
fn one_failing_worker_is_dropped_and_the_job_goes_on_unchanged() {
    let mut clean = Sim::new();
    clean.join("a");
    clean.join("b");
    clean.s.submit(job(1, 6, 4), clean.now);
    clean.deliver_all();
    let reference = clean.latest_params(&JobId::nth(1));
    for nan in [true, false] {
        let mut sim = Sim::new();
        let a = sim.join("a");
        sim.join("b");
        // Worker a fails its third step part, once.
        let mut seen = 0;
        sim.tamper = Box::new(move |w, reply| match reply {
            Reply::StepResult(r) if w == a => {
                seen += 1;
                if seen == 3 {
                    spoil(r, nan)
                } else {
                    Reply::StepResult(r)
                }
            }
            other => other,
        });
        sim.s.submit(job(1, 6, 4), sim.now);
        sim.deliver_all();
        let id = JobId::nth(1);
        assert_eq!(
            sim.final_state(&id).map(|s| s.0),
            Some(JobState::Completed),
            "nan {nan}: {:?}",
            sim.final_state(&id)
        );
        assert!(
            sim.disconnects.iter().any(|(w, _)| *w == a),
            "nan {nan}: the failing worker is dropped"
        );
        assert_eq!(steps_of(&sim, &id), 6);
        for (x, y) in sim.latest_params(&id).iter().zip(&reference) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-2), "{x} vs {y}");
        }
    }
}

#[test]
fn a_failure_every_worker_reproduces_fails_the_job_without_applying_the_step() {
    for nan in [true, false] {
        let mut sim = Sim::new();
        sim.join("a");
        sim.tamper = Box::new(move |_, reply| match reply {
            Reply::StepResult(r) => spoil(r, nan),
            other => other,
        });
        sim.s.submit(job(2, 6, 4), sim.now);
        sim.deliver_all();
        let id = JobId::nth(2);
        assert_eq!(
            sim.final_state(&id),
            None,
            "a lone worker's failure waits for another try"
        );
        // The worker comes back (a new connection) and fails the same step again.
        sim.join("a-again");
        sim.deliver_all();
        let (state, reason) = sim.final_state(&id).unwrap();
        assert_eq!(state, JobState::Failed);
        if nan {
            assert!(
                reason.contains("non-finite gradient")
                    && reason.contains("w-1")
                    && reason.contains("reproduced by another worker")
                    && reason.contains("not applied"),
                "{reason}"
            );
        } else {
            assert!(
                reason.contains("every worker failed") && reason.contains("OUT_OF_MEMORY"),
                "{reason}"
            );
        }
        assert_eq!(steps_of(&sim, &id), 0);
    }
}

#[test]
fn cancel_releases_the_workers_and_the_next_job_starts() {
    let mut sim = Sim::new();
    sim.join("a");
    sim.s.submit(job(1, 1000, 5), sim.now);
    sim.s.submit(job(2, 3, 6), sim.now);
    // Run the first job for a few steps, then cancel it.
    let mut steps = 0;
    sim.run(|_, _, cmd| {
        if matches!(cmd, Cmd::Step(_)) {
            steps += 1;
        }
        if steps > 4 { Fate::Kill } else { Fate::Deliver }
    });
    // The worker was "killed" to stop the run; bring one back and cancel.
    sim.join("b");
    assert!(sim.s.cancel(&JobId::nth(1), sim.now));
    sim.deliver_all();
    assert_eq!(
        sim.final_state(&JobId::nth(1)).map(|s| s.0),
        Some(JobState::Cancelled)
    );
    assert_eq!(
        sim.final_state(&JobId::nth(2)).map(|s| s.0),
        Some(JobState::Completed)
    );
    assert!(!sim.s.cancel(&JobId::nth(1), sim.now));
}

#[test]
fn a_job_without_workers_waits_and_starts_when_one_joins() {
    let mut sim = Sim::new();
    sim.s.submit(job(1, 3, 7), sim.now);
    sim.deliver_all();
    let waiting = sim
        .progress
        .iter()
        .any(|(_, p)| p.message.as_deref() == Some("waiting for workers"));
    assert!(waiting, "{:?}", sim.progress);
    assert!(sim.final_state(&JobId::nth(1)).is_none());
    sim.join("late");
    sim.deliver_all();
    assert_eq!(
        sim.final_state(&JobId::nth(1)).map(|s| s.0),
        Some(JobState::Completed)
    );
}

#[test]
fn a_job_left_without_workers_fails_after_the_grace_period() {
    let mut sim = Sim::new();
    let a = sim.join("a");
    sim.s.submit(job(1, 1000, 8), sim.now);
    let mut steps = 0;
    sim.run(|_, _, cmd| {
        if matches!(cmd, Cmd::Step(_)) {
            steps += 1;
        }
        if steps > 2 { Fate::Kill } else { Fate::Deliver }
    });
    assert!(!sim.s.workers().contains_key(&a));
    assert!(
        sim.progress
            .iter()
            .any(|(_, p)| p.message.as_deref() == Some("waiting for workers"))
    );
    sim.s.tick(sim.now + Duration::from_secs(599));
    sim.deliver_all();
    assert!(
        sim.final_state(&JobId::nth(1)).is_none(),
        "still within the grace period"
    );
    sim.s.tick(sim.now + Duration::from_secs(601));
    sim.deliver_all();
    let (state, reason) = sim.final_state(&JobId::nth(1)).unwrap();
    assert_eq!(state, JobState::Failed);
    assert!(reason.contains("no worker for 600 s"), "{reason}");
}

#[test]
fn step_parts_follow_measured_speeds_and_a_change_of_speed_mid_job() {
    let (a, b) = (WorkerId(1), WorkerId(2));
    let mut reference = Sim::new();
    reference.join("a");
    reference.join("b");
    reference.s.submit(job(1, 30, 3), reference.now);
    reference.deliver_all();

    let mut sim = Sim::new();
    sim.join("a");
    sim.join("b");
    // Until step 15 worker b computes ten times slower than a; from then on a does.
    sim.tamper = Box::new(move |w, reply| match reply {
        Reply::StepResult(mut r) => {
            let slow = if r.step <= 15 { b } else { a };
            let per_row = if w == slow { 1.0 } else { 0.1 };
            r.compute_ms = per_row * r.sums.map_or(0, |s| s.samples) as f64;
            Reply::StepResult(r)
        }
        other => other,
    });
    sim.s.submit(job(1, 30, 3), sim.now);
    sim.deliver_all();
    let id = JobId::nth(1);
    assert_eq!(sim.final_state(&id).map(|s| s.0), Some(JobState::Completed));

    // Rows each worker was given, by step.
    let mut rows: BTreeMap<u64, [usize; 2]> = BTreeMap::new();
    for (w, cmd) in &sim.sent {
        if let Cmd::Step(s) = cmd {
            rows.entry(s.step).or_default()[usize::from(*w == b)] += s.rows.len();
        }
    }
    let [ra, rb] = rows[&1];
    assert!(
        ra.abs_diff(rb) <= 4,
        "no speed known: equal steps, so about equal rows: {ra} and {rb}"
    );
    for step in 8..=15 {
        let [ra, rb] = rows[&step];
        assert!(
            rb * 4 <= ra,
            "step {step}: b is 10x slower but got {rb} rows to a's {ra}"
        );
    }
    for step in 23..=30 {
        let [ra, rb] = rows[&step];
        assert!(
            ra * 4 <= rb,
            "step {step}: a is now 10x slower but got {ra} rows to b's {rb}"
        );
    }
    assert!(
        rows.values().all(|[ra, rb]| *ra >= 1 && *rb >= 1),
        "every worker keeps at least one row a step, so it stays measured"
    );
    // Who computed what does not change the result.
    let params = sim.latest_params(&id);
    for (x, y) in params.iter().zip(&reference.latest_params(&id)) {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-2), "{x} vs {y}");
    }
    let infos = sim.s.workers();
    assert!(
        infos[&a].speed == 0.0 && infos[&b].speed == 0.0,
        "a speed belongs to a job; idle workers show none"
    );
    assert_eq!(infos[&a].train_rows + infos[&b].train_rows, 30 * 40);
}

#[test]
fn sharded_training_rows_move_to_follow_the_speeds_at_an_epoch_boundary() {
    let b = WorkerId(2);
    let mut reference = Sim::with(sharded());
    reference.join("a");
    reference.join("b");
    reference.s.submit(job(1, 30, 5), reference.now);
    reference.deliver_all();

    let mut sim = Sim::with(sharded());
    sim.join("a");
    sim.join("b");
    // b computes ten times slower than a.
    sim.tamper = Box::new(move |w, reply| match reply {
        Reply::StepResult(mut r) => {
            let per_row = if w == b { 1.0 } else { 0.1 };
            r.compute_ms = per_row * r.sums.map_or(0, |s| s.samples) as f64;
            Reply::StepResult(r)
        }
        other => other,
    });
    sim.s.submit(job(1, 30, 5), sim.now);
    sim.deliver_all();
    let id = JobId::nth(1);
    assert_eq!(sim.final_state(&id).map(|s| s.0), Some(JobState::Completed));
    // Training rows each worker was sent, by shard version.
    let mut train: BTreeMap<u64, [usize; 2]> = BTreeMap::new();
    for (w, cmd) in &sim.sent {
        if let Cmd::LoadShard(l) = cmd {
            train.entry(l.shard_version).or_default()[usize::from(*w == b)] +=
                l.train.as_ref().map_or(0, |t| t.ids.len());
        }
    }
    let first = train[&1];
    assert!(
        first[0].abs_diff(first[1]) < 20,
        "equal shards at first: {first:?}"
    );
    assert!(train.len() >= 2, "the shards were recomputed: {train:?}");
    let [ra, rb] = *train.values().last().unwrap();
    assert_eq!(ra + rb, 240);
    assert!(
        rb * 4 <= ra,
        "the slow worker's shard shrank: a {ra}, b {rb}"
    );
    for (x, y) in sim
        .latest_params(&id)
        .iter()
        .zip(&reference.latest_params(&id))
    {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-2), "{x} vs {y}");
    }
}

/// The checkpoints and history a coordinator killed right after a job's last `latest` write
/// finds at restart (the job record still says running).
fn resume_point(sim: &Sim, id: &JobId) -> Resume {
    let last = |kind| {
        sim.checkpoints
            .iter()
            .rev()
            .find(|(j, k, _)| j == id && *k == kind)
            .map(|(_, _, c)| c.clone())
    };
    Resume {
        latest: last(CheckpointKind::Latest).expect("a latest checkpoint"),
        best: last(CheckpointKind::Best),
        history: sim
            .epochs
            .iter()
            .filter(|(j, _)| j == id)
            .map(|(_, e)| *e)
            .collect(),
    }
}

#[test]
fn a_job_resumed_after_its_last_epoch_completes_without_training_more() {
    let by_steps = job(1, 12, 1);
    let mut by_epochs = job(1, 0, 1);
    by_epochs.spec.train.max_epochs = 2;
    for (spec, reason) in [(by_steps, "max_steps"), (by_epochs, "max_epochs")] {
        let id = JobId::nth(1);
        let mut first = Sim::new();
        first.join("a");
        first.join("b");
        first.s.submit(spec.clone(), first.now);
        first.deliver_all();
        let done = first
            .progress
            .iter()
            .rev()
            .find(|(_, p)| p.state == Some(JobState::Completed))
            .map(|(_, p)| p.clone())
            .expect("the first run completes");
        assert_eq!(done.stop_reason.as_deref(), Some(reason));

        // The restarted coordinator has the job before any worker is back.
        let mut second = Sim::new();
        second.s.submit(
            NewJob {
                init: None,
                resume: Some(resume_point(&first, &id)),
                ..spec
            },
            second.now,
        );
        second.deliver_all();
        second.join("a");
        second.join("b");
        second.deliver_all();
        let finished = second
            .progress
            .iter()
            .rev()
            .find(|(_, p)| p.state.is_some_and(JobState::is_final))
            .map(|(_, p)| p.clone())
            .expect("the resumed job ends");
        assert_eq!(finished.state, Some(JobState::Completed), "{reason}");
        assert_eq!(finished.stop_reason.as_deref(), Some(reason));
        assert_eq!(
            finished.steps, done.steps,
            "{reason}: no step trained after resuming"
        );
        assert_eq!(finished.epochs, done.epochs);
        assert!(
            !second.sent.iter().any(|(_, c)| matches!(c, Cmd::Step(_))),
            "{reason}: a step was issued after the job had stopped"
        );
        assert!(second.epochs.is_empty(), "no epoch recorded twice");
        assert!(
            !second
                .sent
                .iter()
                .any(|(_, c)| matches!(c, Cmd::LoadShard(l) if l.train.is_some())),
            "{reason}: training rows were sent to a job that only tests"
        );
        // The same best parameters were tested (sums may be added in another order).
        let (t, d) = (finished.test.unwrap(), done.test.unwrap());
        assert_eq!(t.samples, d.samples);
        for (x, y) in [(t.accuracy, d.accuracy), (t.loss, d.loss), (t.mae, d.mae)] {
            assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
}

#[test]
fn a_worker_whose_compute_hangs_misses_its_deadline_and_its_part_is_reissued() {
    let config = SchedulerConfig {
        deadline_floor: Duration::from_secs(5),
        ..SchedulerConfig::default()
    };
    let mut clean = Sim::with(config);
    clean.join("a");
    clean.join("b");
    clean.s.submit(job(1, 6, 7), clean.now);
    clean.deliver_all();
    let reference = clean.latest_params(&JobId::nth(1));

    let mut sim = Sim::with(config);
    let a = sim.join("a");
    let b = sim.join("b");
    sim.s.submit(job(1, 6, 7), sim.now);
    // a's compute hangs at step 3; its heartbeats go on.
    sim.run(|_, w, cmd| match cmd {
        Cmd::Step(s) if w == a && s.step == 3 => Fate::Hang,
        _ => Fate::Deliver,
    });
    let id = JobId::nth(1);
    assert_eq!(sim.step_log.len(), 2, "step 3 waits for a");
    sim.heartbeats_until(&[a, b], sim.now + Duration::from_secs(4));
    assert!(sim.s.workers().contains_key(&a), "not late yet");
    sim.heartbeats_until(&[a, b], sim.now + Duration::from_secs(6));
    assert!(sim.dropped_for_deadline(a), "{:?}", sim.disconnects);
    assert!(sim.s.workers().contains_key(&b));
    assert_eq!(sim.final_state(&id).map(|s| s.0), Some(JobState::Completed));
    assert_eq!(steps_of(&sim, &id), 6);
    for (x, y) in sim.latest_params(&id).iter().zip(&reference) {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-2), "{x} vs {y}");
    }
}

#[test]
fn a_resumed_job_without_its_best_checkpoint_trains_on_instead_of_stopping_for_patience() {
    // Patience 1: measured from "no best epoch" (0), two epochs would look like patience run out.
    let mut spec = job(1, 0, 8);
    spec.spec.train.max_epochs = 4;
    spec.spec.train.patience = 1;
    let id = JobId::nth(1);
    let mut first = Sim::new();
    first.join("a");
    first.s.submit(spec.clone(), first.now);
    first.deliver_all();
    let mut resume = resume_point(&first, &id);
    // The state after epoch 2, with the best checkpoint lost.
    resume.latest = first
        .checkpoints
        .iter()
        .find(|(j, k, c)| j == &id && *k == CheckpointKind::Latest && c.manifest.epoch == 2)
        .map(|(_, _, c)| c.clone())
        .expect("a latest checkpoint at epoch 2");
    resume.history.truncate(2);
    resume.best = None;
    let mut second = Sim::new();
    second.join("a");
    second.s.submit(
        NewJob {
            init: None,
            resume: Some(resume),
            ..spec
        },
        second.now,
    );
    second.deliver_all();
    assert!(
        second.sent.iter().any(|(_, c)| matches!(c, Cmd::Step(_))),
        "the job trained on"
    );
    assert_eq!(
        second.final_state(&id).map(|s| s.0),
        Some(JobState::Completed)
    );
}

#[test]
fn with_three_workers_the_job_fails_only_when_every_one_fails_the_same_step() {
    // Two of three fail: they are dropped, the third computes the step, the job completes.
    let mut sim = Sim::new();
    let (a, b, _c) = (sim.join("a"), sim.join("b"), sim.join("c"));
    sim.tamper = Box::new(move |w, reply| match reply {
        Reply::StepResult(r) if w == a || w == b => spoil(r, false),
        other => other,
    });
    sim.s.submit(job(1, 6, 4), sim.now);
    sim.deliver_all();
    let id = JobId::nth(1);
    assert_eq!(
        sim.final_state(&id).map(|s| s.0),
        Some(JobState::Completed),
        "{:?}",
        sim.final_state(&id)
    );
    assert_eq!(steps_of(&sim, &id), 6);
    for w in [a, b] {
        assert!(sim.disconnects.iter().any(|(d, _)| *d == w), "{w} dropped");
    }
    check_stored_steps(&sim, 1, 4);

    // All three fail the same step: the job fails at once, naming all three, step not applied.
    let mut sim = Sim::new();
    for n in ["a", "b", "c"] {
        sim.join(n);
    }
    sim.tamper = Box::new(|_, reply| match reply {
        Reply::StepResult(r) => spoil(r, false),
        other => other,
    });
    sim.s.submit(job(2, 6, 4), sim.now);
    sim.deliver_all();
    let id = JobId::nth(2);
    let (state, reason) = sim.final_state(&id).unwrap();
    assert_eq!(state, JobState::Failed);
    assert!(reason.contains("every worker failed"), "{reason}");
    for w in ["w-1", "w-2", "w-3"] {
        assert!(reason.contains(w), "{w} missing from: {reason}");
    }
    assert_eq!(steps_of(&sim, &id), 0);
}

#[test]
fn a_worker_whose_evaluation_hangs_misses_its_deadline_and_the_evaluation_completes() {
    let config = SchedulerConfig {
        deadline_floor: Duration::from_secs(5),
        ..SchedulerConfig::default()
    };
    let mut sim = Sim::with(config);
    let a = sim.join("a");
    let b = sim.join("b");
    sim.s.submit(job(1, 6, 7), sim.now);
    // a's compute hangs in the first validation; its heartbeats go on.
    sim.run(|_, w, cmd| match cmd {
        Cmd::Evaluate(_) if w == a => Fate::Hang,
        _ => Fate::Deliver,
    });
    let id = JobId::nth(1);
    assert!(sim.epochs.is_empty(), "the epoch waits for a's evaluation");
    sim.heartbeats_until(&[a, b], sim.now + Duration::from_secs(11));
    assert!(sim.dropped_for_deadline(a), "{:?}", sim.disconnects);
    assert_eq!(sim.final_state(&id).map(|s| s.0), Some(JobState::Completed));
    assert_eq!(sim.epochs.len(), 1);
    assert_eq!(sim.epochs[0].1.workers, 1, "b evaluated a's rows too");
}

/// A stateful job (`SeriesSpec.stateful`, 3 streams) on a generated series of two features,
/// with the one-process trainer that runs the same spec.
fn stateful_job(max_epochs: u64) -> (NewJob, recur_core::train::Trainer) {
    use recur_core::data::{CsvLimits, SeriesConfig, cut_windows};
    let csv = SeriesConfig {
        steps: 500,
        seed: 6,
        missing_per_mille: 10,
    }
    .to_csv();
    let wire = pb::JobSpec {
        dataset_id: "c".repeat(64),
        batch_size: Some(4),
        max_epochs,
        seed: 3,
        model: Some(pb::ModelConfig {
            kind: pb::ModelKind::Lstm as i32,
            hidden_size: 6,
            num_layers: 2,
            ..Default::default()
        }),
        series: Some(pb::SeriesSpec {
            features: vec!["temp".into(), "demand".into()],
            targets: vec!["demand".into()],
            window: 8,
            stride: 8,
            horizon: 1,
            drop_missing: true,
            order_by: "date".into(),
            every_step: true,
            stateful: 3,
            ..Default::default()
        }),
        ..Default::default()
    };
    let spec = JobSpec::from_proto(&wire, &LIMITS).unwrap();
    assert_eq!(spec.train.stateful, 3);
    let series = spec.series.clone().unwrap();
    let windows = cut_windows(
        csv.as_bytes(),
        "days.csv",
        &series,
        spec.train.split,
        &CsvLimits::default(),
    )
    .unwrap();
    let data = Prepared::series(&windows, spec.train.scale, spec.train.loss).unwrap();
    let trainer = recur_core::train::Trainer::with_split(
        spec.train.clone(),
        &windows.data,
        data.split.clone(),
        data.norm.clone(),
        &Device::Cpu,
    )
    .unwrap();
    let job = NewJob {
        id: JobId::nth(1),
        spec,
        data: Arc::new(data),
        init: None,
        resume: None,
    };
    (job, trainer)
}

#[test]
fn a_stateful_job_carries_every_streams_state_like_one_process_through_lost_workers() {
    // One process: two epochs, each from cold states, validated as one stream.
    let (_, mut trainer) = stateful_job(2);
    let records: Vec<_> = (0..2).map(|_| trainer.run_epoch().unwrap()).collect();
    let expected = trainer.params().to_vec();
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
            "{what}: {a} vs {b}"
        );
    };
    for config in [SchedulerConfig::default(), sharded()] {
        let mut sim = Sim::with(config);
        for n in ["a", "b", "c"] {
            sim.join(n);
        }
        let (job, _) = stateful_job(2);
        let per_epoch = job.data.split.train.len().div_ceil(3) as u64;
        let whole = [job.data.split.validation.len(), job.data.split.test.len()];
        sim.s.submit(job, sim.now);
        // Worker 2 dies when its first part from the third step on reaches it, and whoever
        // holds the validation stream dies in the middle of the first evaluation.
        let mut evaluations = 0;
        sim.run(|_, w, cmd| match cmd {
            Cmd::Step(s) if w == WorkerId(2) && s.step >= 3 => Fate::Kill,
            Cmd::Evaluate(_) => {
                evaluations += 1;
                if evaluations == 1 {
                    Fate::Kill
                } else {
                    Fate::Deliver
                }
            }
            _ => Fate::Deliver,
        });
        let id = JobId::nth(1);
        assert_eq!(
            sim.final_state(&id).map(|s| s.0),
            Some(JobState::Completed),
            "{:?}",
            sim.final_state(&id)
        );
        assert_eq!(
            steps_of(&sim, &id),
            2 * per_epoch,
            "one step per window of a stream"
        );
        // Every step part was sent each of its rows' states.
        for (_, cmd) in &sim.sent {
            if let Cmd::Step(s) = cmd {
                assert_eq!(s.initial_state.len(), s.rows.len() * 2 * 2 * 6 * 4);
            }
        }
        // Validation and test ran as one stream on one worker each time.
        for (_, cmd) in &sim.sent {
            if let Cmd::Evaluate(e) = cmd {
                assert_eq!(
                    e.rows.len(),
                    whole[e.split as usize],
                    "a whole split in one part"
                );
            }
        }
        let params = sim.latest_params(&id);
        assert_eq!(params.len(), expected.len());
        for (k, (a, b)) in params.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1e-2),
                "replicated {}: parameter {k}: {a} vs {b}",
                config.replicate_values > 0
            );
        }
        let epochs: Vec<&pb::EpochMetrics> = sim.epochs.iter().map(|(_, e)| e).collect();
        assert_eq!(epochs.len(), 2);
        for (e, r) in epochs.iter().zip(&records) {
            let v = e.validation.unwrap();
            assert_eq!(v.samples, r.validation.samples as u64);
            close(v.mae, r.validation.mae, "validation MAE");
            close(v.accuracy, r.validation.accuracy, "validation accuracy");
            close(e.train_loss, r.train_loss, "training loss");
        }
        assert_eq!(epochs[1].workers, 1, "two of the three workers were lost");
    }
}

#[test]
fn stateful_results_with_bad_states_drop_their_workers_and_change_nothing() {
    let (_, mut trainer) = stateful_job(1);
    trainer.run_epoch().unwrap();
    let expected = trainer.params().to_vec();
    let mut sim = Sim::new();
    let a = sim.join("a");
    let b = sim.join("b");
    sim.join("c");
    let (job, _) = stateful_job(1);
    sim.s.submit(job, sim.now);
    // Worker a loses one float of its second step's final states; worker b's fourth step ends
    // with an infinite state (its gradient finite).
    sim.tamper = Box::new(move |w, reply| match reply {
        Reply::StepResult(mut r) if w == a && r.step == 2 => {
            r.final_state = r.final_state.slice(..r.final_state.len() - 4);
            Reply::StepResult(r)
        }
        Reply::StepResult(mut r) if w == b && r.step == 4 => {
            let mut state = recur_core::convert::f32s_from_wire(&r.final_state, "s").unwrap();
            state[5] = f32::INFINITY;
            r.final_state = recur_core::convert::f32s_to_wire(&state);
            Reply::StepResult(r)
        }
        other => other,
    });
    sim.deliver_all();
    let dropped = |worker: WorkerId, wanted: &str| {
        assert!(
            sim.disconnects
                .iter()
                .any(|(w, r)| *w == worker && r.contains(wanted)),
            "{worker}: {:?}",
            sim.disconnects
        );
    };
    // Each worker had one of the three streams: 24 state values (2 layers of 6, h and c).
    dropped(
        a,
        "sent final states of 92 bytes for a part of 1 rows (96 bytes)",
    );
    dropped(b, "sent a non-finite final state (value 5)");
    let id = JobId::nth(1);
    assert_eq!(sim.final_state(&id).map(|s| s.0), Some(JobState::Completed));
    for (x, y) in sim.latest_params(&id).iter().zip(&expected) {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-2), "{x} vs {y}");
    }
}
