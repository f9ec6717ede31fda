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

/// A daily multi-feature series with known relations, for the series layout: `date` (ISO, from
/// 2020-01-01), `temp` (a yearly-ish cycle of period 73 days), `demand` (a weekly cycle plus 3 per
/// degree of the previous day's temperature above 20), `price` (half of demand's deviation),
/// each with uniform noise. A few cells of `temp` and `demand` are missing (`null`, empty or
/// `NaN`), so `demand` one step ahead is predictable from windows of `temp` and `demand` once
/// those steps are dropped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeriesConfig {
    /// Time steps (lines after the header).
    pub steps: usize,
    /// Seed; the same seed gives the same file.
    pub seed: u64,
    /// Share of steps with a missing cell, in parts per thousand.
    pub missing_per_mille: u32,
}

impl SeriesConfig {
    /// 2,000 days, 5 per mille of them with a missing cell.
    pub fn example(seed: u64) -> Self {
        Self {
            steps: 2000,
            seed,
            missing_per_mille: 5,
        }
    }

    /// The file's text: a header, then one line per day.
    pub fn to_csv(&self) -> String {
        use std::f64::consts::TAU;
        use std::fmt::Write as _;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut out = String::from("date,temp,demand,price\n");
        let mut prev_temp = 20.0;
        for t in 0..self.steps {
            let tf = t as f64;
            let temp = 20.0 + 8.0 * (TAU * tf / 73.0).sin() + rng.random_range(-0.5..0.5);
            let demand = 100.0
                + 3.0 * (prev_temp - 20.0)
                + 10.0 * (TAU * tf / 7.0).sin()
                + rng.random_range(-1.0..1.0);
            let price = 50.0 + 0.5 * (demand - 100.0) + rng.random_range(-0.5..0.5);
            prev_temp = temp;
            let day = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs((18_262 + t as u64) * 86_400);
            let date = humantime::format_rfc3339(day).to_string();
            let cell = |v: f64| format!("{v:.2}");
            let (mut temp_cell, mut demand_cell) = (cell(temp), cell(demand));
            if rng.random_range(0..1000) < self.missing_per_mille {
                let missing = ["null", "", "NaN"][rng.random_range(0..3)].to_string();
                if rng.random_bool(0.5) {
                    temp_cell = missing;
                } else {
                    demand_cell = missing;
                }
            }
            let _ = writeln!(
                out,
                "{},{temp_cell},{demand_cell},{}",
                &date[..10],
                cell(price)
            );
        }
        out
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

    #[test]
    fn the_series_has_dates_in_order_and_a_few_missing_cells() {
        let text = SeriesConfig::example(1).to_csv();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "date,temp,demand,price");
        assert_eq!(lines.len(), 2001);
        assert!(lines[1].starts_with("2020-01-01,"));
        assert!(lines[60].starts_with("2020-02-29,"));
        assert!(lines[367].starts_with("2021-01-01,"));
        assert!(lines.windows(2).skip(1).all(|w| w[0][..10] < w[1][..10]));
        let missing = lines[1..]
            .iter()
            .filter(|l| {
                l.split(',')
                    .any(|c| c.is_empty() || c == "null" || c == "NaN")
            })
            .count();
        assert!(
            (3..=30).contains(&missing),
            "{missing} lines with a missing cell"
        );
        assert_eq!(text, SeriesConfig::example(1).to_csv());
    }
}
