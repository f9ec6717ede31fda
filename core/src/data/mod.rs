//! Sequence data: the CSV reader, the ball-data generator, normalisation, splits, shards and
//! mini-batches.

mod csv;
mod generate;
mod split;

pub use csv::{CsvErrors, CsvLimits, LineError, LineProblem, parse_csv};
pub use generate::BallConfig;
pub use split::{
    Scale, Split, SplitFractions, epoch_batches, rows_digest, shard_by_steps, split_batch,
};

use std::fmt::Write as _;

/// Variable-length rows of values, stored flat. In each row the last value is the target and the
/// rest are the input steps (one feature per step).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    values: Vec<f32>,
    /// `offsets[i]..offsets[i + 1]` is row `i`; starts with 0.
    offsets: Vec<usize>,
}

/// Row counts and lengths of a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DatasetStats {
    /// Rows.
    pub rows: usize,
    /// Values in the shortest row (target included).
    pub min_len: usize,
    /// Values in the longest row.
    pub max_len: usize,
    /// Mean values per row.
    pub mean_len: f64,
    /// Largest absolute value.
    pub max_abs: f32,
}

impl Dataset {
    /// Appends a row (inputs then target).
    pub fn push_row(&mut self, row: &[f32]) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.values.extend_from_slice(row);
        self.offsets.push(self.values.len());
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i`, target included.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[self.offsets[i]..self.offsets[i + 1]]
    }

    /// The input steps of row `i`.
    pub fn input(&self, i: usize) -> &[f32] {
        let row = self.row(i);
        &row[..row.len() - 1]
    }

    /// The target of row `i`.
    pub fn target(&self, i: usize) -> f32 {
        self.values[self.offsets[i + 1] - 1]
    }

    /// Input steps of row `i` (its length minus the target).
    pub fn steps(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i] - 1
    }

    /// Rows, lengths and the largest magnitude.
    pub fn stats(&self) -> DatasetStats {
        let lens = (0..self.len()).map(|i| self.offsets[i + 1] - self.offsets[i]);
        DatasetStats {
            rows: self.len(),
            min_len: lens.clone().min().unwrap_or(0),
            max_len: lens.max().unwrap_or(0),
            mean_len: self.values.len() as f64 / self.len().max(1) as f64,
            max_abs: self.values.iter().fold(0.0, |m, v| m.max(v.abs())),
        }
    }

    /// A copy with every value divided by `scale`.
    pub fn scaled(&self, scale: f32) -> Dataset {
        Dataset {
            values: self.values.iter().map(|v| v / scale).collect(),
            offsets: self.offsets.clone(),
        }
    }

    /// The rows as CSV text, one per line, in the shortest form that reads back to the same
    /// `f32` values.
    pub fn to_csv(&self) -> String {
        let mut out = String::with_capacity(self.values.len() * 4);
        for i in 0..self.len() {
            for (j, v) in self.row(i).iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{v}");
            }
            out.push('\n');
        }
        out
    }
}
