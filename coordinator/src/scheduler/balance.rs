//! How fast each worker computes, learned from the step results it sends, and the weights that
//! share out shards and step parts so that all workers finish a step together.
//!
//! A worker's speed is its training throughput in time steps (summed sequence lengths) per
//! millisecond of compute, as it reports the compute time of each step part; it is smoothed over
//! parts so one slow part (a page fault, a noisy neighbour) moves it only half way. Giving each
//! worker work in proportion to its speed converges to equal compute times even when a part has
//! a fixed cost besides its per-step cost: the share of a worker whose parts take `o + c·s` ms
//! for `s` steps moves towards the share at which the times are equal, never away from it.

use std::collections::BTreeMap;

use crate::ids::WorkerId;

/// How much of a new measurement enters the smoothed speed.
const SMOOTHING: f64 = 0.5;

/// The shortest compute time a measurement is taken to have, in ms (a part of a few rows can
/// report less than a timer tick).
const MIN_COMPUTE_MS: f64 = 0.01;

/// How many times faster or slower than the current estimate one measurement may count as: a
/// single odd report (a clock step, a worker that claims no time at all) cannot take over the
/// split, while a real change of speed still shows within a few steps.
const MAX_JUMP: f64 = 4.0;

/// Learned throughput per worker.
#[derive(Debug, Default, Clone)]
pub(crate) struct Speeds {
    /// Time steps per ms of compute, smoothed.
    by_worker: BTreeMap<WorkerId, f64>,
}

impl Speeds {
    /// Records that `worker` computed a part of `steps` time steps in `compute_ms`.
    pub(crate) fn observe(&mut self, worker: WorkerId, steps: usize, compute_ms: f64) {
        if steps == 0 || !compute_ms.is_finite() || compute_ms < 0.0 {
            return;
        }
        let sample = steps as f64 / compute_ms.max(MIN_COMPUTE_MS);
        self.by_worker
            .entry(worker)
            .and_modify(|s| *s += SMOOTHING * (sample.clamp(*s / MAX_JUMP, *s * MAX_JUMP) - *s))
            .or_insert(sample);
    }

    /// Forgets a worker (it left).
    pub(crate) fn forget(&mut self, worker: WorkerId) {
        self.by_worker.remove(&worker);
    }

    /// The smoothed speed of `worker` in time steps per ms, if it was measured.
    pub(crate) fn get(&self, worker: WorkerId) -> Option<f64> {
        self.by_worker.get(&worker).copied()
    }

    /// One weight per member, in order: its speed, or for a member not measured yet the mean
    /// speed of those that were (all 1 when none was).
    pub(crate) fn weights(&self, members: &[WorkerId]) -> Vec<f64> {
        let known: Vec<f64> = members.iter().filter_map(|w| self.get(*w)).collect();
        let fallback = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        members
            .iter()
            .map(|w| self.get(*w).unwrap_or(fallback))
            .collect()
    }
}

/// The largest difference between two sets of weights' shares (each normalised to sum to 1);
/// 1 when they are not comparable (different lengths).
pub(crate) fn share_drift(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 1.0;
    }
    let (sa, sb): (f64, f64) = (a.iter().sum(), b.iter().sum());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x / sa - y / sb).abs())
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use recur_core::data::split_batch;

    use super::*;

    /// A worker whose parts take `fixed + per_step * steps` ms.
    #[derive(Clone, Copy)]
    struct Cost {
        fixed: f64,
        per_step: f64,
    }

    impl Cost {
        fn ms(self, steps: usize) -> f64 {
            if steps == 0 {
                0.0
            } else {
                self.fixed + self.per_step * steps as f64
            }
        }
    }

    /// Runs `steps` steps of a batch of 100 rows of 5 steps each on workers with `costs`;
    /// returns the compute time of each worker in the last step.
    fn run(speeds: &mut Speeds, members: &[WorkerId], costs: &[Cost], steps: usize) -> Vec<f64> {
        let rows: Vec<usize> = (0..100).collect();
        let mut times = Vec::new();
        for _ in 0..steps {
            let parts = split_batch(&rows, &speeds.weights(members), |_| 5);
            times = parts
                .iter()
                .zip(costs)
                .map(|(p, c)| c.ms(p.len() * 5))
                .collect();
            for ((w, p), t) in members.iter().zip(&parts).zip(&times) {
                speeds.observe(*w, p.len() * 5, *t);
            }
        }
        times
    }

    fn spread(times: &[f64]) -> f64 {
        let max = times.iter().copied().fold(0.0, f64::max);
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        (max - min) / max
    }

    #[test]
    fn unmeasured_workers_get_the_mean_and_equal_weights_start() {
        let (a, b, c) = (WorkerId(1), WorkerId(2), WorkerId(3));
        let mut s = Speeds::default();
        assert_eq!(s.weights(&[a, b]), vec![1.0, 1.0]);
        s.observe(a, 100, 10.0);
        s.observe(b, 300, 10.0);
        assert_eq!(s.weights(&[a, b, c]), vec![10.0, 30.0, 20.0]);
        s.observe(a, 300, 10.0);
        assert_eq!(s.get(a), Some(20.0), "half of the new measurement enters");
        s.observe(b, 1000, 0.0);
        assert_eq!(
            s.get(b),
            Some(30.0 + 0.5 * (120.0 - 30.0)),
            "a wild measurement counts as 4x the estimate at most"
        );
        s.forget(a);
        assert_eq!(s.get(a), None);
        s.observe(c, 0, 5.0);
        s.observe(c, 10, f64::NAN);
        assert_eq!(s.get(c), None, "empty or broken measurements are ignored");
    }

    #[test]
    fn shares_converge_to_equal_compute_times_and_follow_a_change_of_speed() {
        let members = [WorkerId(1), WorkerId(2)];
        let mut speeds = Speeds::default();
        // Worker 2 is ten times slower per step; both have a fixed cost per part.
        let mut costs = [
            Cost {
                fixed: 0.2,
                per_step: 0.01,
            },
            Cost {
                fixed: 0.2,
                per_step: 0.1,
            },
        ];
        let first = run(&mut speeds, &members, &costs, 1);
        assert!(spread(&first) > 0.5, "equal parts at first: {first:?}");
        let settled = run(&mut speeds, &members, &costs, 20);
        assert!(spread(&settled) < 0.15, "times after 20 steps: {settled:?}");
        let w = speeds.weights(&members);
        assert!(w[0] > 3.0 * w[1], "the fast worker weighs more: {w:?}");

        // Worker 2 becomes the fast one mid-job: the split follows within a few steps.
        costs.swap(0, 1);
        let changed = run(&mut speeds, &members, &costs, 1);
        assert!(spread(&changed) > 0.5, "the old split is now unbalanced");
        let resettled = run(&mut speeds, &members, &costs, 20);
        assert!(
            spread(&resettled) < 0.15,
            "times after the change: {resettled:?}"
        );
        let w = speeds.weights(&members);
        assert!(w[1] > 3.0 * w[0], "weights follow the change: {w:?}");
    }

    #[test]
    fn a_very_slow_worker_keeps_one_row_and_is_measured() {
        let members = [WorkerId(1), WorkerId(2)];
        let mut speeds = Speeds::default();
        let costs = [
            Cost {
                fixed: 0.0,
                per_step: 0.001,
            },
            Cost {
                fixed: 0.0,
                per_step: 10.0,
            },
        ];
        run(&mut speeds, &members, &costs, 30);
        let parts = split_batch(
            &(0..100).collect::<Vec<_>>(),
            &speeds.weights(&members),
            |_| 5,
        );
        assert_eq!(parts[1].len(), 1, "parts: {parts:?}");
        assert_eq!(parts[0].len(), 99);
    }

    #[test]
    fn drift_compares_shares_not_magnitudes() {
        assert_eq!(share_drift(&[1.0, 1.0], &[5.0, 5.0]), 0.0);
        assert!((share_drift(&[3.0, 1.0], &[1.0, 1.0]) - 0.25).abs() < 1e-12);
        assert_eq!(share_drift(&[1.0], &[1.0, 1.0]), 1.0);
    }
}
