//! Sequence data: the CSV reader, the ball-data generator, normalisation, splits, shards and
//! mini-batches.

mod csv;
mod generate;
mod norm;
mod series;
mod split;

pub use csv::{CsvErrors, CsvLimits, LineError, LineProblem, parse_csv};
pub use generate::{BallConfig, SeriesConfig};
pub use norm::{Affine, Normalizer};
pub use series::{
    ColumnScale, Label, Missing, SeriesInfo, SeriesSpec, Windows, cut_windows, read_series_header,
};
pub use split::{
    Scale, Split, SplitFractions, epoch_batches, rows_digest, shard_by_steps, split_batch,
    stream_batches,
};

use std::fmt::Write as _;

use crate::Result;
use crate::step::Loss;

/// Variable-length rows of values, stored flat. Each row is its input steps, `features` values
/// per step, followed by its `targets` values. The tutorial's rows are one feature per step and
/// one target: the last value. A dataset with a target at every step (see
/// [`Dataset::every_step`]) holds `steps × outputs` targets per row, step by step.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    values: Vec<f32>,
    /// `offsets[i]..offsets[i + 1]` is row `i`; starts with 0.
    offsets: Vec<usize>,
    features: usize,
    targets: usize,
    /// Target columns: `targets` for targets after the last step, `targets / steps` for targets
    /// at every step.
    outputs: usize,
}

impl Default for Dataset {
    /// An empty dataset of one feature per step and one target.
    fn default() -> Self {
        Self::with_shape(1, 1)
    }
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
    /// An empty dataset of `features` values per step and `targets` values per row (both at
    /// least 1).
    pub fn with_shape(features: usize, targets: usize) -> Self {
        Self {
            values: Vec::new(),
            offsets: vec![0],
            features: features.max(1),
            targets: targets.max(1),
            outputs: targets.max(1),
        }
    }

    /// An empty dataset of rows of `steps` steps of `features` values, each step with its own
    /// `outputs` targets (a label per time step): `steps × outputs` targets per row, in step
    /// order.
    pub fn every_step(features: usize, steps: usize, outputs: usize) -> Self {
        let outputs = outputs.max(1);
        Self {
            outputs,
            ..Self::with_shape(features, steps.max(1).saturating_mul(outputs))
        }
    }

    /// Target columns: the values the model predicts at a step.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Whether each row's targets are one per step (`targets_per_row` > `outputs`).
    pub fn is_every_step(&self) -> bool {
        self.targets != self.outputs
    }

    /// Values per input step.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Target values per row.
    pub fn targets_per_row(&self) -> usize {
        self.targets
    }

    /// Whether `len` values make a row of this shape: at least one step, whole steps (and, with
    /// a target at every step, as many steps as targets).
    pub fn fits(&self, len: usize) -> bool {
        len > self.targets
            && (len - self.targets).is_multiple_of(self.features)
            && (!self.is_every_step()
                || (len - self.targets) / self.features * self.outputs == self.targets)
    }

    /// Appends a row (input steps then targets); its length must pass [`Dataset::fits`].
    pub fn push_row(&mut self, row: &[f32]) {
        debug_assert!(self.fits(row.len()), "a row of {} values", row.len());
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

    /// The input steps of row `i`, `features` values each.
    pub fn input(&self, i: usize) -> &[f32] {
        let row = self.row(i);
        &row[..row.len() - self.targets]
    }

    /// The targets of row `i`.
    pub fn targets(&self, i: usize) -> &[f32] {
        let row = self.row(i);
        &row[row.len() - self.targets..]
    }

    /// Input steps of row `i`.
    pub fn steps(&self, i: usize) -> usize {
        (self.offsets[i + 1] - self.offsets[i] - self.targets) / self.features
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
            ..self.clone()
        }
    }

    /// A copy normalised by `norm`: each input value by its feature's map, each target by its
    /// own. `norm` must have this dataset's shape.
    pub fn normalized(&self, norm: &Normalizer) -> Dataset {
        let mut out = self.clone();
        for i in 0..self.len() {
            let (start, end) = (self.offsets[i], self.offsets[i + 1]);
            let split = end - self.targets;
            for (k, v) in out.values[start..split].iter_mut().enumerate() {
                *v = norm.inputs[k % self.features].apply(*v);
            }
            for (k, v) in out.values[split..end].iter_mut().enumerate() {
                *v = norm.targets[k % self.outputs].apply(*v);
            }
        }
        out
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

/// A job's data ready to train on: normalised rows, their split, and the normalisation (fitted on
/// the training rows only).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The rows, normalised.
    pub data: Dataset,
    /// Training, validation and test rows.
    pub split: Split,
    /// Raw values to normalised ones, per column.
    pub norm: Normalizer,
}

impl Prepared {
    /// Rows shuffled by `seed` and cut by `fractions`.
    pub fn rows(
        raw: &Dataset,
        seed: u64,
        fractions: SplitFractions,
        scale: Scale,
        loss: Loss,
    ) -> Result<Self> {
        let split = Split::new(raw.len(), seed, fractions)?;
        let norm = Normalizer::fit(scale, raw, &split.train)?;
        Self::finish(raw, split, norm, loss)
    }

    /// A series' windows, as split by time.
    pub fn series(windows: &Windows, scale: Scale, loss: Loss) -> Result<Self> {
        let norm = windows.normalizer(scale)?;
        Self::finish(&windows.data, windows.split.clone(), norm, loss)
    }

    /// Labels (BCE) are 0 or 1 and are not normalised.
    fn finish(raw: &Dataset, split: Split, mut norm: Normalizer, loss: Loss) -> Result<Self> {
        if loss == Loss::Bce {
            for i in 0..raw.len() {
                if let Some(t) = raw.targets(i).iter().find(|&&t| t != 0.0 && t != 1.0) {
                    return Err(crate::Error::setting(
                        "loss",
                        format!(
                            "bce needs 0/1 labels; row {} (1-based) has target {t}",
                            i + 1
                        ),
                    ));
                }
            }
            norm.targets.fill(Affine::divide(1.0));
        }
        Ok(Self {
            data: raw.normalized(&norm),
            split,
            norm,
        })
    }
}
