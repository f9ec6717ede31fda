//! Who holds which rows: shards sized to the workers' measured speeds, replicated training rows
//! when they are small enough, and the parts a piece of work is cut into.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use recur_core::data::{shard_by_steps, split_batch};
use recur_proto::v1 as pb;

use super::RunningJob;
use super::round::Part;
use crate::ids::WorkerId;
use crate::scheduler::balance::share_drift;
use crate::scheduler::{Action, Ctx, SchedulerConfig, msg};

use pb::coordinator_message::Kind as Cmd;

/// Index of the training rows in per-split tables.
pub(super) const TRAIN: usize = 0;
/// Index of the validation rows.
pub(super) const VALIDATION: usize = 1;
/// Index of the test rows.
pub(super) const TEST: usize = 2;
/// How far (in share of the work) the speeds may move from the shards' before sharded training
/// rows are recomputed at an epoch boundary.
const RESHARD_DRIFT: f64 = 0.1;

impl RunningJob {
    /// Takes in the workers that joined (and out those that left), and reshards when the
    /// members changed or their speeds drifted from the shards'.
    pub(super) fn refresh_members(&mut self, cx: &mut Ctx<'_>) {
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
    pub(super) fn reshard(&mut self, cx: &mut Ctx<'_>) {
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
        let data = &self.data.data;
        let train_values: usize = self
            .data
            .split
            .train
            .iter()
            .map(|&r| data.row(r).len())
            .sum();
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
            by_speed(&self.data.split.train)
        };
        let (validation_shards, test_shards) = if self.spec.train.stateful > 0 {
            // A stateful job evaluates each split as one stream, window after window: the
            // fastest member holds all of it.
            let fastest = (0..n)
                .max_by(|&a, &b| weights[a].total_cmp(&weights[b]).then(b.cmp(&a)))
                .unwrap_or(0);
            let whole = |rows: &[usize]| -> Vec<Vec<usize>> {
                (0..n)
                    .map(|k| {
                        if k == fastest {
                            rows.to_vec()
                        } else {
                            Vec::new()
                        }
                    })
                    .collect()
            };
            (
                whole(&self.data.split.validation),
                whole(&self.data.split.test),
            )
        } else {
            (
                by_speed(&self.data.split.validation),
                by_speed(&self.data.split.test),
            )
        };
        for (k, &w) in self.members.iter().enumerate() {
            let keep_train = replicated && self.holds_train.contains(&w);
            // A job that has finished training (resumed after its last epoch) only evaluates.
            let train: &[usize] = match (replicated, keep_train) {
                _ if self.stop.is_some() => &[],
                (false, _) => &train_shards[k],
                (true, false) => &self.data.split.train,
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
                    self.data.split.train.len()
                } else {
                    train.len()
                } as u64;
            }
            let lists = [train, &validation_shards[k], &test_shards[k]];
            for part in self.shard_messages(lists, keep_train, cx.config.shard_part_values) {
                cx.actions.push(Action::Send(w, msg(Cmd::LoadShard(part))));
            }
        }
        self.holds_train = if replicated && self.stop.is_none() {
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
    pub(super) fn shard_messages(
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
                let row = self.data.data.row(r);
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

    pub(super) fn empty_shard_part(&self) -> pb::LoadShard {
        pb::LoadShard {
            job_id: self.id.0.clone(),
            shard_version: self.shard_version,
            model: Some((&self.spec.train.model).into()),
            scale: self.data.norm.targets[0].scale,
            target_maps: self.data.norm.targets.iter().map(Into::into).collect(),
            loss: pb::Loss::from(self.spec.train.loss) as i32,
            dropout: self.spec.train.dropout,
            dropout_seed: self.spec.train.seed,
            every_step_window: if self.data.data.is_every_step() {
                (self.data.data.targets_per_row() / self.data.data.outputs()) as u32
            } else {
                0
            },
            eval_batch_size: self.spec.train.batch_size as u32,
            stateful: self.spec.train.stateful > 0,
            ..Default::default()
        }
    }

    /// Splits `rows` into parts, in member order: replicated training rows by the members'
    /// speeds, anything else by owner. Workers with no rows get no part.
    pub(super) fn make_parts(&mut self, which: usize, rows: &[usize], cx: &Ctx<'_>) -> Vec<Part> {
        let by_worker: Vec<(WorkerId, Vec<usize>)> = if which == TRAIN && self.replicated {
            let weights = self.speeds.weights(&self.members);
            let data = &self.data.data;
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
        // A stateful evaluation runs one window at a time, where a step's part runs a worker's
        // share of the streams at once: its budget counts each window that many times.
        let streams = self.spec.train.stateful;
        let serial = if which != TRAIN && streams > 0 {
            streams.div_ceil(self.members.len().max(1))
        } else {
            1
        };
        by_worker
            .into_iter()
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(worker, rows)| {
                self.next_part += 1;
                let steps = serial * rows.iter().map(|&r| self.data.data.steps(r)).sum::<usize>();
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
    pub(super) fn part_budget(
        &self,
        worker: WorkerId,
        steps: usize,
        config: &SchedulerConfig,
    ) -> Duration {
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
}
