//! Training steps: each global mini-batch cut into parts, the workers' gradient sums added in
//! part order as they arrive, averaged over the rows the coordinator assigned, and applied by the
//! optimizer.

use std::collections::HashMap;
use std::time::Instant;

use recur_core::convert::{add_wire_f32s, f32s_from_wire, f32s_to_wire, first_non_finite_wire};
use recur_core::data::rows_digest;
use recur_core::metrics::BatchSums;
use recur_core::stop::StopReason;
use recur_proto::Bytes;
use recur_proto::v1 as pb;

use super::eval::EvalKind;
use super::round::{Part, Round};
use super::sharding::TRAIN;
use super::{Next, Phase, RunningJob};
use crate::ids::WorkerId;
use crate::scheduler::{Action, Ctx, msg};

use pb::coordinator_message::Kind as Cmd;

#[derive(Debug)]
pub(super) struct PartResult {
    /// The gradient sum as it travelled, until it is added to the step's total.
    grad: Option<Bytes>,
    /// A stateful job's states after the part's rows, in the part's row order.
    state: Bytes,
    sums: BatchSums,
    compute_ms: f64,
}

#[derive(Debug)]
pub(super) struct PendingStep {
    /// The step being computed (1-based): `version + 1`.
    pub(super) step: u64,
    pub(super) round: Round<PartResult>,
    /// The gradient sum of `parts[..reduced]`: results are added as they arrive, but always in
    /// part order (a result waits for those before it), so the sum does not depend on timing.
    grad: Vec<f32>,
    reduced: usize,
    sent_at: Instant,
    /// A stateful job's stream of each row of the step (empty otherwise): row `i` of a batch of
    /// `stream_batches` is stream `i`'s next window.
    pub(super) streams: HashMap<usize, usize>,
}

impl PendingStep {
    /// Adds every result whose turn has come to the running sum.
    fn reduce_ready(&mut self) {
        while let Some(part) = self.round.parts.get(self.reduced) {
            let Some(result) = self.round.results.get_mut(&part.id) else {
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

impl RunningJob {
    /// The parameters to send a worker with a command at `version`, if it lacks them.
    pub(super) fn params_for(
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
    pub(super) fn wire_params(&mut self) -> Bytes {
        match &self.wire {
            Some((v, bytes)) if *v == self.version => bytes.clone(),
            _ => {
                let bytes = f32s_to_wire(&self.params);
                self.wire = Some((self.version, bytes.clone()));
                bytes
            }
        }
    }

    /// The states a stateful job's part starts from: each row's stream's, in the part's order.
    fn initial_state(&self, part: &Part, streams: &HashMap<usize, usize>) -> Bytes {
        if streams.is_empty() {
            return Bytes::new();
        }
        let per = self.spec.train.model.state_len();
        let mut values = Vec::with_capacity(part.rows.len() * per);
        for r in &part.rows {
            // Every row of a step has a stream (the map is built from the step's batch).
            let k = streams.get(r).copied().unwrap_or_default();
            values.extend_from_slice(&self.states[k * per..(k + 1) * per]);
        }
        f32s_to_wire(&values)
    }

    pub(super) fn send_step_parts(
        &mut self,
        parts: &[Part],
        step: u64,
        streams: &HashMap<usize, usize>,
        cx: &mut Ctx<'_>,
    ) {
        let values = self.wire_params();
        for part in parts {
            let params = self.params_for(part.worker, self.version, &values);
            let initial_state = self.initial_state(part, streams);
            cx.actions.push(Action::Send(
                part.worker,
                msg(Cmd::Step(pb::Step {
                    job_id: self.id.0.clone(),
                    step,
                    part: part.id,
                    params,
                    version: self.version,
                    rows: part.rows.iter().map(|&r| r as u64).collect(),
                    initial_state,
                })),
            ));
        }
    }

    pub(super) fn issue_step(&mut self, cx: &mut Ctx<'_>) {
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
        let streams: HashMap<usize, usize> = if self.states.is_empty() {
            HashMap::new()
        } else {
            rows.iter().enumerate().map(|(k, &r)| (r, k)).collect()
        };
        self.failures.start(self.members.len());
        self.send_step_parts(&parts, step, &streams, cx);
        self.phase = Phase::Step(PendingStep {
            step,
            round: Round::new(parts),
            grad: Vec::new(),
            reduced: 0,
            sent_at: cx.now,
            streams,
        });
    }

    pub(crate) fn step_result(&mut self, worker: WorkerId, r: pb::StepResult, cx: &mut Ctx<'_>) {
        let expected_len = self.params.len();
        let state_len = self.spec.train.model.state_len();
        let Phase::Step(pending) = &mut self.phase else {
            return;
        };
        let fresh = r.job_id == self.id.0
            && r.step == pending.step
            && r.version == self.version
            && pending.round.awaited(r.part, worker).is_some();
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
        if let Some(bad) = first_non_finite_wire(&r.grad_sum) {
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
        let Some(part) = pending.round.awaited(r.part, worker) else {
            return;
        };
        // A stateful job's part returns every row's state; any other part none.
        let state_bytes = if pending.streams.is_empty() {
            0
        } else {
            part.rows.len() * state_len * 4
        };
        if r.final_state.len() != state_bytes {
            cx.drops.push((
                worker,
                format!(
                    "sent final states of {} bytes for a part of {} rows ({state_bytes} bytes)",
                    r.final_state.len(),
                    part.rows.len()
                ),
            ));
            return;
        }
        // A state the worker's own gradient did not show as broken would poison its stream's
        // next step, on whichever worker: the sender is dropped and the part recomputed.
        if let Some(bad) = first_non_finite_wire(&r.final_state) {
            cx.drops.push((
                worker,
                format!("sent a non-finite final state (value {bad}); its part is recomputed"),
            ));
            return;
        }
        // The coordinator knows how many samples it asked for (each row's targets count, as the
        // metrics do); a worker must agree.
        let per_row = self.data.data.targets_per_row() as u64;
        let sums = match r.sums.as_ref().map(BatchSums::from) {
            Some(sums) if sums.samples == part.rows.len() as u64 * per_row => sums,
            other => {
                cx.drops.push((
                    worker,
                    format!(
                        "reported {} samples for a step part of {} rows of {per_row} targets",
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
            // The worker's own figure; a nonsense one is left out rather than spoil the sums.
            if r.compute_ms.is_finite() && r.compute_ms >= 0.0 {
                let since_sent = cx.now.saturating_duration_since(pending.sent_at);
                w.compute_ms += r.compute_ms;
                w.wait_ms += (since_sent.as_secs_f64() * 1e3 - r.compute_ms).max(0.0);
            }
        }
        pending.round.results.insert(
            r.part,
            PartResult {
                grad: Some(r.grad_sum),
                state: r.final_state,
                sums,
                compute_ms: r.compute_ms,
            },
        );
        pending.reduce_ready();
        if pending.round.complete() {
            self.apply_step(cx);
        }
    }

    /// A stateful job's streams continue from the states the step's parts ended with.
    fn store_states(&mut self, pending: &PendingStep) {
        if pending.streams.is_empty() {
            return;
        }
        let per = self.spec.train.model.state_len();
        for part in &pending.round.parts {
            let Some(result) = pending.round.results.get(&part.id) else {
                continue;
            };
            // Lengths were checked when the result arrived.
            let Ok(values) = f32s_from_wire(&result.state, "StepResult.final_state") else {
                continue;
            };
            for (r, state) in part.rows.iter().zip(values.chunks_exact(per)) {
                if let Some(&k) = pending.streams.get(r) {
                    self.states[k * per..(k + 1) * per].copy_from_slice(state);
                }
            }
        }
    }

    pub(super) fn apply_step(&mut self, cx: &mut Ctx<'_>) {
        let Phase::Step(mut pending) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            return;
        };
        // What arrived before the last result was added while waiting; what is left is on the
        // critical path.
        let t0 = Instant::now();
        pending.reduce_ready();
        let mut sums = BatchSums::default();
        let mut compute: f64 = 0.0;
        for part in &pending.round.parts {
            if let Some(r) = pending.round.results.get(&part.id) {
                sums.add(&r.sums);
                compute = compute.max(r.compute_ms);
            }
        }
        // Every part's sample count was checked against the rows it was given.
        let samples: u64 = pending
            .round
            .parts
            .iter()
            .map(|p| p.rows.len() as u64)
            .sum();
        let mut grad = std::mem::take(&mut pending.grad);
        let n = samples.max(1) as f32;
        grad.iter_mut().for_each(|v| *v /= n);
        let t1 = Instant::now();
        if let Err(e) = self.optimizer.step(&mut self.params, &grad) {
            self.fail(format!("optimizer step failed: {e}"), cx);
            return;
        }
        let t2 = Instant::now();
        self.store_states(&pending);
        self.version += 1;
        self.cursor += 1;

        self.epoch_samples += samples;
        // Digests add up, so the step's is the sum of its parts'.
        let digest = pending
            .round
            .parts
            .iter()
            .fold(0u64, |acc, p| acc.wrapping_add(rows_digest(&p.rows)));
        self.epoch_steps.push(pb::StepRecord {
            step: self.version,
            epoch: self.epoch + 1,
            samples,
            rows_digest: digest,
        });
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
}
