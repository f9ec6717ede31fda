//! The tutorial's ball data: positions of a ball in uniform motion.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Dataset;
use crate::{Error, Result};

/// How to generate ball data. Each row is a ball's positions: the start is uniform in
/// `[-start_range, start_range]`, the step uniform in `{-max_step..=-1, 1..=max_step}`, the row's
/// length (target included) uniform in `[min_len, max_len]`. All values are integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BallConfig {
    /// Rows to generate.
    pub rows: usize,
    /// Seed of the generator; the same seed gives the same rows.
    pub seed: u64,
    /// Shortest row (values, target included); at least 2.
    pub min_len: usize,
    /// Longest row.
    pub max_len: usize,
    /// Starts lie in `[-start_range, start_range]`.
    pub start_range: i32,
    /// Steps lie in `±1..=max_step`.
    pub max_step: i32,
}

impl BallConfig {
    /// The tutorial's data: 10,000 rows of 5 to 10 values.
    pub fn tutorial(seed: u64) -> Self {
        Self {
            rows: 10_000,
            seed,
            min_len: 5,
            max_len: 10,
            start_range: 10,
            max_step: 5,
        }
    }

    /// The W2 benchmark's data: 32,768 rows of 10 to 50 values.
    pub fn w2(seed: u64) -> Self {
        Self {
            rows: 32_768,
            min_len: 10,
            max_len: 50,
            ..Self::tutorial(seed)
        }
    }

    /// Generates the rows.
    pub fn generate(&self) -> Result<Dataset> {
        if self.min_len < 2 || self.max_len < self.min_len {
            return Err(Error::setting(
                "min_len/max_len",
                format!(
                    "need 2 <= min_len <= max_len, got {}..={}",
                    self.min_len, self.max_len
                ),
            ));
        }
        if self.max_step < 1 || self.start_range < 0 {
            return Err(Error::setting(
                "max_step",
                "max_step must be at least 1 and start_range at least 0",
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut ds = Dataset::default();
        let mut row = Vec::with_capacity(self.max_len);
        for _ in 0..self.rows {
            let start = rng.random_range(-self.start_range..=self.start_range);
            let magnitude = rng.random_range(1..=self.max_step);
            let step = if rng.random_bool(0.5) {
                magnitude
            } else {
                -magnitude
            };
            let len = rng.random_range(self.min_len..=self.max_len);
            row.clear();
            row.extend((0..len as i32).map(|k| (start + k * step) as f32));
            ds.push_row(&row);
        }
        Ok(ds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_tutorial_distribution() {
        let ds = BallConfig::tutorial(3).generate().unwrap();
        assert_eq!(ds.len(), 10_000);
        let stats = ds.stats();
        assert_eq!((stats.min_len, stats.max_len), (5, 10));
        for i in 0..ds.len() {
            let row = ds.row(i);
            assert!((-10.0..=10.0).contains(&row[0]));
            let step = row[1] - row[0];
            assert!((1.0..=5.0).contains(&step.abs()), "step {step}");
            assert!(row.windows(2).all(|w| w[1] - w[0] == step));
        }
        assert_eq!(ds, BallConfig::tutorial(3).generate().unwrap());
        assert_ne!(ds, BallConfig::tutorial(4).generate().unwrap());
        let w2 = BallConfig::w2(1).generate().unwrap().stats();
        assert_eq!((w2.rows, w2.min_len, w2.max_len), (32_768, 10, 50));
    }
}
