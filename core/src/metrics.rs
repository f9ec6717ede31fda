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
    labelled: bool,
    true_pos: u64,
    false_pos: u64,
    false_neg: u64,
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
    /// For 0/1 labels: of the predicted 1s, the share that are 1 (0 when none is predicted).
    #[serde(default)]
    pub precision: f64,
    /// For 0/1 labels: of the actual 1s, the share predicted 1 (0 when there is none).
    #[serde(default)]
    pub recall: f64,
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
    /// Predictions that round to the target (for labels: correct labels).
    pub exact: u64,
    /// Samples.
    pub samples: u64,
    /// Whether these are sums of 0/1 labels against logits ([`BatchSums::of_labels`]).
    #[serde(default)]
    pub labelled: bool,
    /// Labels 1 predicted 1.
    #[serde(default)]
    pub true_pos: u64,
    /// Labels 0 predicted 1.
    #[serde(default)]
    pub false_pos: u64,
    /// Labels 1 predicted 0.
    #[serde(default)]
    pub false_neg: u64,
}

/// Binary cross-entropy of `logit` against the label `t`, computed stably (PyTorch's
/// `BCEWithLogitsLoss`): `max(x, 0) - x t + log(1 + exp(-|x|))`.
pub fn bce_with_logits(logit: f32, t: f32) -> f64 {
    let x = f64::from(logit);
    x.max(0.0) - x * f64::from(t) + (-x.abs()).exp().ln_1p()
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

    /// The sums of logits `xs` against 0/1 labels `ys`: the label predicted is 1 when the
    /// logit is positive (probability above one half). `rel_error` counts wrong labels (so the
    /// per-batch accuracy is the share of correct ones), `squared_error` sums the binary
    /// cross-entropy (the loss), `abs_error` sums `|sigmoid(x) - y|`, `exact` counts correct
    /// labels.
    pub fn of_labels(ys: &[f32], xs: &[f32]) -> Self {
        let mut sums = Self {
            labelled: true,
            ..Self::default()
        };
        for (&y, &x) in ys.iter().zip(xs) {
            let (actual, predicted) = (y > 0.5, x > 0.0);
            sums.squared_error += bce_with_logits(x, y);
            let p = 1.0 / (1.0 + (-f64::from(x)).exp());
            sums.abs_error += (p - f64::from(y)).abs();
            if actual == predicted {
                sums.exact += 1;
            } else {
                sums.rel_error += 1.0;
            }
            match (actual, predicted) {
                (true, true) => sums.true_pos += 1,
                (false, true) => sums.false_pos += 1,
                (true, false) => sums.false_neg += 1,
                (false, false) => {}
            }
            sums.samples += 1;
        }
        sums
    }

    /// Adds another part of the same batch.
    pub fn add(&mut self, other: &BatchSums) {
        self.labelled |= other.labelled;
        self.true_pos += other.true_pos;
        self.false_pos += other.false_pos;
        self.false_neg += other.false_neg;
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
        self.labelled |= sums.labelled;
        self.true_pos += sums.true_pos;
        self.false_pos += sums.false_pos;
        self.false_neg += sums.false_neg;
    }

    /// The metrics so far. For labels, accuracy is the share of correct labels over all
    /// samples; otherwise the tutorial's mean of per-batch accuracies.
    pub fn finish(&self) -> Metrics {
        let n = self.samples.max(1) as f64;
        let share = |a: u64, b: u64| {
            if a + b == 0 {
                0.0
            } else {
                a as f64 / (a + b) as f64
            }
        };
        Metrics {
            accuracy: if self.labelled {
                self.exact as f64 / n
            } else {
                self.batch_accuracy_sum / self.batches.max(1) as f64
            },
            loss: self.squared_error_sum / n,
            mae: self.abs_error_sum / n,
            exact: self.exact as f64 / n,
            samples: self.samples,
            precision: share(self.true_pos, self.false_pos),
            recall: share(self.true_pos, self.false_neg),
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

    #[test]
    fn labels_count_correct_predictions_precision_and_recall() {
        // Labels 1 1 0 0 1 against logits + - + - +: tp 2, fn 1, fp 1, tn 1.
        let ys = [1.0, 1.0, 0.0, 0.0, 1.0];
        let xs = [2.0, -1.0, 0.5, -3.0, 0.1];
        let mut acc = MetricsAccumulator::default();
        let mut sums = BatchSums::of_labels(&ys[..2], &xs[..2]);
        sums.add(&BatchSums::of_labels(&ys[2..], &xs[2..]));
        acc.add_batch(&sums);
        let m = acc.finish();
        assert_eq!(m.samples, 5);
        assert!((m.accuracy - 0.6).abs() < 1e-12);
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-12);
        // Each term is log(1 + exp(-x)) for label 1 and log(1 + exp(x)) for label 0; their
        // mean is 0.621450138877723.
        let terms: f64 = ys
            .iter()
            .zip(&xs)
            .map(|(&y, &x)| bce_with_logits(x, y))
            .sum();
        let by_hand = [
            (1.0 + (-2.0f64).exp()).ln(),
            (1.0 + 1.0f64.exp()).ln(),
            (1.0 + 0.5f64.exp()).ln(),
            (1.0 + (-3.0f64).exp()).ln(),
            (1.0 + (-0.1f64).exp()).ln(),
        ];
        // (The logits are f32: 0.1 is not exactly 0.1.)
        assert!((terms - by_hand.iter().sum::<f64>()).abs() < 1e-7);
        assert!((m.loss - terms / 5.0).abs() < 1e-12);
        assert!((m.loss - 0.621_450_138_877_723).abs() < 1e-7);
        // Large logits stay finite.
        assert!(bce_with_logits(100.0, 0.0).is_finite() && bce_with_logits(-100.0, 1.0) > 99.0);
    }
}
