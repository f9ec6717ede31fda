//! Dropout on the head's hidden layers, with masks that depend only on what a sample is and when
//! it is seen, so that N workers and one process drop the same units.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `nn.Dropout(p)` after each ReLU of the head, in training only. A sample's mask is drawn from a
/// counter-based generator keyed by (seed, optimizer step, the sample's dataset row, unit): the
/// same wherever the sample is computed, so sharding a batch changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Dropout {
    /// Probability that a unit is zeroed; kept units are scaled by `1 / (1 - p)`.
    pub p: f32,
    /// Seeds the masks (the job's seed).
    pub seed: u64,
}

impl Dropout {
    /// Checks `p` is in `[0, 1)`.
    pub fn validate(p: f32) -> Result<()> {
        if p.is_finite() && (0.0..1.0).contains(&p) {
            Ok(())
        } else {
            Err(Error::setting(
                "dropout",
                format!("must be at least 0 and below 1, got {p}"),
            ))
        }
    }

    /// The masks of one step: for each hidden width, `keys.len() × width` values in row order,
    /// each 0 (dropped) or `1 / (1 - p)` (kept). `keys` are the samples' dataset rows.
    pub fn masks(&self, step: u64, keys: &[u64], widths: &[usize]) -> Vec<Vec<f32>> {
        let units: usize = widths.iter().sum();
        // A unit is dropped when its 32-bit draw is below p · 2^32.
        let threshold = (f64::from(self.p) * 4_294_967_296.0) as u64;
        let keep = 1.0 / (1.0 - self.p);
        let mut masks: Vec<Vec<f32>> = widths
            .iter()
            .map(|w| Vec::with_capacity(w * keys.len()))
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(step);
        for &key in keys {
            rng.set_word_pos(u128::from(key) * units as u128);
            for (mask, &w) in masks.iter_mut().zip(widths) {
                mask.extend((0..w).map(|_| {
                    if u64::from(rng.next_u32()) < threshold {
                        0.0
                    } else {
                        keep
                    }
                }));
            }
        }
        masks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_samples_mask_depends_on_its_row_and_step_not_its_batch() {
        let d = Dropout { p: 0.3, seed: 7 };
        let widths = [5, 3];
        let whole = d.masks(4, &[10, 11, 12, 13], &widths);
        let part = d.masks(4, &[12, 10], &widths);
        assert_eq!(&part[0][..5], &whole[0][10..15]);
        assert_eq!(&part[0][5..], &whole[0][..5]);
        assert_eq!(&part[1][..3], &whole[1][6..9]);
        let next_step = d.masks(5, &[10, 11, 12, 13], &widths);
        assert_ne!(next_step, whole);
        let other_seed = Dropout { p: 0.3, seed: 8 }.masks(4, &[10, 11, 12, 13], &widths);
        assert_ne!(other_seed, whole);
    }

    #[test]
    fn about_p_of_the_units_are_dropped_and_the_rest_scaled() {
        let d = Dropout { p: 0.25, seed: 1 };
        let keys: Vec<u64> = (0..2000).collect();
        let masks = d.masks(1, &keys, &[16]);
        let dropped = masks[0].iter().filter(|&&v| v == 0.0).count();
        let share = dropped as f64 / masks[0].len() as f64;
        assert!((share - 0.25).abs() < 0.01, "dropped share {share}");
        assert!(
            masks[0]
                .iter()
                .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6)
        );
        assert!(
            Dropout { p: 0.0, seed: 1 }.masks(1, &keys, &[4])[0]
                .iter()
                .all(|&v| v == 1.0)
        );
        assert!(Dropout::validate(1.0).is_err() && Dropout::validate(-0.1).is_err());
        assert!(Dropout::validate(f32::NAN).is_err() && Dropout::validate(0.5).is_ok());
    }
}
