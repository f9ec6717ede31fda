//! Evaluations: the validation split after each epoch, the test split with the best parameters
//! at the end; per-batch sums from every part, combined into the split's metrics.

use recur_core::convert::f32s_to_wire;
use recur_core::metrics::{BatchSums, MetricsAccumulator};
use recur_proto::v1 as pb;

use super::round::Round;
use super::sharding::{TEST, VALIDATION};
use super::{Next, Phase, RunningJob};
use crate::ids::WorkerId;
use crate::scheduler::{Action, Ctx, msg};

use pb::coordinator_message::Kind as Cmd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EvalKind {
    Validation,
    Test,
}

#[derive(Debug)]
pub(super) struct PendingEval {
    pub(super) id: u64,
    pub(super) kind: EvalKind,
    pub(super) version: u64,
    pub(super) round: Round<()>,
    /// Loss and accuracy sums per evaluation batch.
    sums: Vec<BatchSums>,
}

impl RunningJob {
    pub(super) fn start_eval(&mut self, kind: EvalKind, cx: &mut Ctx<'_>) {
        if self.stalled {
            self.phase = Phase::Waiting(Next::Eval(kind));
            return;
        }
        let (which, rows) = match kind {
            EvalKind::Validation => (VALIDATION, self.data.split.validation.clone()),
            EvalKind::Test => (TEST, self.data.split.test.clone()),
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
            round: Round::new(parts),
            sums: vec![BatchSums::default(); batches],
        };
        self.send_eval_parts(
            &eval,
            &eval.round.parts.iter().map(|p| p.id).collect::<Vec<_>>(),
            cx,
        );
        self.phase = Phase::Eval(eval);
    }

    pub(super) fn send_eval_parts(
        &mut self,
        eval: &PendingEval,
        part_ids: &[u32],
        cx: &mut Ctx<'_>,
    ) {
        let values = match (&self.best, eval.version == self.version) {
            (Some(b), false) => f32s_to_wire(&b.params),
            _ => self.wire_params(),
        };
        for part in eval.round.parts.iter().filter(|p| part_ids.contains(&p.id)) {
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

    pub(crate) fn eval_result(&mut self, worker: WorkerId, r: pb::EvalResult, cx: &mut Ctx<'_>) {
        let Phase::Eval(eval) = &mut self.phase else {
            return;
        };
        let fresh = r.job_id == self.id.0
            && r.eval_id == eval.id
            && eval.round.awaited(r.part, worker).is_some();
        if !fresh {
            return;
        }
        // Every batch is checked before any is added: a part that is refused and reissued must
        // not leave some of its sums counted.
        if let Some(bad) = r
            .batches
            .iter()
            .find(|b| b.sums.is_none() || b.batch as usize >= eval.sums.len())
        {
            cx.drops.push((
                worker,
                format!(
                    "sent sums for evaluation batch {}, which does not exist or is empty",
                    bad.batch
                ),
            ));
            return;
        }
        for b in &r.batches {
            if let (Some(slot), Some(s)) = (eval.sums.get_mut(b.batch as usize), &b.sums) {
                slot.add(&BatchSums::from(s));
            }
        }
        eval.round.results.insert(r.part, ());
        if !eval.round.complete() {
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
}
