//! The tutorial's accuracy and the other figures reported for a model.

use serde::{Deserialize, Serialize};

use crate::data::Affine;

/// The tutorial's accuracy of one batch: `1 - mean(|y - p| / (|y| + 1e-4))` on normalised
/// values.
pub fn tutorial_accuracy(ys: &[f32], ps: &[f32]) -> f64 {
    if ys.is_empty() {
        return 0.0;
    }
    let sum: f64 = ys
        .iter()
        .zip(ps)
        .map(|(&y, &p)| ((y - p).abs() / (y.abs() + 1e-4)) as f64)
        .sum();
    1.0 - sum / ys.len() as f64
}

/// Accumulates predictions batch by batch and reports the metrics the way the tutorial does:
/// accuracy is the mean over batches of each batch's accuracy.
#[derive(Debug, Clone, Default)]
pub struct MetricsAccumulator {
    batch_accuracy_sum: f64,
    batches: usize,
    squared_error_sum: f64,
    abs_error_sum: f64,
    exact: usize,
    samples: usize,
}

/// Metrics of a model on one part of the data.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Metrics {
    /// The tutorial's accuracy (mean of per-batch accuracies, normalised values).
    pub accuracy: f64,
    /// Mean squared error on normalised values (the training loss).
    pub loss: f64,
    /// Mean absolute error in the data's own units.
    pub mae: f64,
    /// Share of predictions that round to the exact target, in the data's own units.
    pub exact: f64,
    /// Samples measured.
    pub samples: usize,
}

/// The sums one batch (or one worker's part of it) contributes; they add up exactly across
/// workers except for the per-batch accuracy, which is kept as a sum of relative errors.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct BatchSums {
    /// Sum of `|y - p| / (|y| + 1e-4)` on normalised values.
    pub rel_error: f64,
    /// Sum of squared errors on normalised values.
    pub squared_error: f64,
    /// Sum of absolute errors in the data's units.
    pub abs_error: f64,
    /// Predictions that round to the target.
    pub exact: u64,
    /// Samples.
    pub samples: u64,
}

impl BatchSums {
    /// The sums of `ps` against `ys` (normalised; value `i` is target `i % targets.len()` of
    /// its sample, mapped back to the data's units by `targets[i % targets.len()]`). The relative
    /// error is the tutorial's, on values divided by the target's scale but not shifted (for
    /// the tutorial's /50, exactly its normalised values).
    pub fn of(ys: &[f32], ps: &[f32], targets: &[Affine]) -> Self {
        let mut sums = Self::default();
        let n = targets.len().max(1);
        for (i, (&y, &p)) in ys.iter().zip(ps).enumerate() {
            let map = targets.get(i % n).copied().unwrap_or(Affine::divide(1.0));
            let (scale, offset) = (map.scale as f64, map.shift as f64 / map.scale as f64);
            let err = (y - p).abs() as f64;
            sums.rel_error += err / ((y as f64 + offset).abs() + 1e-4);
            sums.squared_error += err * err;
            sums.abs_error += err * scale;
            let (y_raw, p_raw) = (
                y as f64 * scale + map.shift as f64,
                p as f64 * scale + map.shift as f64,
            );
            if p_raw.round() == y_raw.round() {
                sums.exact += 1;
            }
            sums.samples += 1;
        }
        sums
    }

    /// Adds another part of the same batch.
    pub fn add(&mut self, other: &BatchSums) {
        self.rel_error += other.rel_error;
        self.squared_error += other.squared_error;
        self.abs_error += other.abs_error;
        self.exact += other.exact;
        self.samples += other.samples;
    }
}

impl MetricsAccumulator {
    /// Adds one whole batch.
    pub fn add_batch(&mut self, sums: &BatchSums) {
        if sums.samples == 0 {
            return;
        }
        self.batch_accuracy_sum += 1.0 - sums.rel_error / sums.samples as f64;
        self.batches += 1;
        self.squared_error_sum += sums.squared_error;
        self.abs_error_sum += sums.abs_error;
        self.exact += sums.exact as usize;
        self.samples += sums.samples as usize;
    }

    /// The metrics so far.
    pub fn finish(&self) -> Metrics {
        let n = self.samples.max(1) as f64;
        Metrics {
            accuracy: self.batch_accuracy_sum / self.batches.max(1) as f64,
            loss: self.squared_error_sum / n,
            mae: self.abs_error_sum / n,
            exact: self.exact as f64 / n,
            samples: self.samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_is_the_tutorial_formula() {
        // torch: 1 - ((y - p).abs() / (y.abs() + 0.0001)).mean() for y=[0.5,-0.2], p=[0.4,-0.2]
        let acc = tutorial_accuracy(&[0.5, -0.2], &[0.4, -0.2]);
        let expected = 1.0 - (0.1f64 / 0.5001) / 2.0;
        assert!((acc - expected).abs() < 1e-6, "{acc} vs {expected}");
    }

    #[test]
    fn accuracy_is_a_mean_of_batch_means() {
        let mut acc = MetricsAccumulator::default();
        acc.add_batch(&BatchSums::of(
            &[1.0, 1.0, 1.0],
            &[1.0, 1.0, 1.0],
            &[Affine::divide(50.0)],
        ));
        acc.add_batch(&BatchSums::of(&[1.0], &[0.5], &[Affine::divide(50.0)]));
        let m = acc.finish();
        let second = 1.0 - 0.5 / 1.0001;
        assert!((m.accuracy - (1.0 + second) / 2.0).abs() < 1e-9);
        assert!((m.mae - 25.0 / 4.0).abs() < 1e-9);
        assert!((m.loss - 0.25 / 4.0).abs() < 1e-9);
        assert_eq!(m.exact, 0.75);
        assert_eq!(m.samples, 4);
    }

    #[test]
    fn parts_of_a_batch_add_up() {
        let whole = BatchSums::of(&[0.1, 0.2, 0.3], &[0.1, 0.25, 0.2], &[Affine::divide(50.0)]);
        let mut parts = BatchSums::of(&[0.1], &[0.1], &[Affine::divide(50.0)]);
        parts.add(&BatchSums::of(
            &[0.2, 0.3],
            &[0.25, 0.2],
            &[Affine::divide(50.0)],
        ));
        assert!((whole.rel_error - parts.rel_error).abs() < 1e-12);
        assert_eq!(whole.exact, parts.exact);
        assert_eq!(whole.samples, 3);
    }
}
