//! Per-column normalisation: an affine map for each input feature and each target, fitted on the
//! training rows only and stored with the model so predictions take raw values.

use serde::{Deserialize, Serialize};

use super::{Dataset, Scale};
use crate::{Error, Result};

/// `normalised = (raw - shift) / scale`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Affine {
    /// Subtracted first.
    pub shift: f32,
    /// Then divided by; positive and finite.
    pub scale: f32,
}

impl Affine {
    /// Division by `scale` alone.
    pub fn divide(scale: f32) -> Self {
        Self { shift: 0.0, scale }
    }

    /// Raw to normalised.
    pub fn apply(self, raw: f32) -> f32 {
        (raw - self.shift) / self.scale
    }

    /// Normalised to raw.
    pub fn invert(self, normalised: f32) -> f32 {
        normalised * self.scale + self.shift
    }
}

/// The maps of a dataset's columns: one per input feature, one per target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    /// One per feature, in step order.
    pub inputs: Vec<Affine>,
    /// One per target.
    pub targets: Vec<Affine>,
}

/// Running mean, variance (Welford), minimum and maximum of one column.
#[derive(Debug, Clone, Copy)]
struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl Default for Moments {
    fn default() -> Self {
        Self {
            n: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Moments {
    fn add(&mut self, v: f32) {
        let v = f64::from(v);
        self.n += 1;
        let d = v - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (v - self.mean);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// The standard map (`standard`) or the min-max one; a column without spread is only
    /// shifted (its scale is 1).
    fn affine(&self, standard: bool) -> Affine {
        let spread = |s: f64| if s.is_finite() && s > 1e-12 { s } else { 1.0 };
        if standard {
            Affine {
                shift: self.mean as f32,
                // The population standard deviation, as scikit-learn's StandardScaler.
                scale: spread((self.m2 / self.n.max(1) as f64).sqrt()) as f32,
            }
        } else {
            Affine {
                shift: if self.n == 0 { 0.0 } else { self.min as f32 },
                scale: spread(self.max - self.min) as f32,
            }
        }
    }
}

impl Normalizer {
    /// Every column divided by `scale`.
    pub fn uniform(scale: f32, features: usize, targets: usize) -> Self {
        Self {
            inputs: vec![Affine::divide(scale); features],
            targets: vec![Affine::divide(scale); targets],
        }
    }

    /// The maps `scale` gives `data`: a fixed divisor for every column; `auto`, the largest
    /// magnitude of the training rows for every column; `standard` and `minmax` fitted per
    /// column. Only the rows `train` are looked at, so nothing of the validation and test rows
    /// leaks into training.
    pub fn fit(scale: Scale, data: &Dataset, train: &[usize]) -> Result<Self> {
        let (features, targets) = (data.features(), data.outputs());
        let norm = match scale {
            Scale::Fixed(s) => Self::uniform(s, features, targets),
            Scale::Auto => {
                let max = train
                    .iter()
                    .flat_map(|&r| data.row(r))
                    .fold(0f32, |m, v| m.max(v.abs()));
                Self::uniform(if max > 0.0 { max } else { 1.0 }, features, targets)
            }
            Scale::Standard | Scale::MinMax => {
                let mut inputs = vec![Moments::default(); features];
                let mut outs = vec![Moments::default(); targets];
                for &r in train {
                    for (k, &v) in data.input(r).iter().enumerate() {
                        inputs[k % features].add(v);
                    }
                    for (k, &v) in data.targets(r).iter().enumerate() {
                        outs[k % targets].add(v);
                    }
                }
                let standard = scale == Scale::Standard;
                Self {
                    inputs: inputs.iter().map(|m| m.affine(standard)).collect(),
                    targets: outs.iter().map(|m| m.affine(standard)).collect(),
                }
            }
        };
        norm.validate(features, targets)?;
        Ok(norm)
    }

    /// Checks the shape and that every map is invertible.
    pub fn validate(&self, features: usize, targets: usize) -> Result<()> {
        if self.inputs.len() != features || self.targets.len() != targets {
            return Err(Error::setting(
                "normalizer",
                format!(
                    "has {} input and {} target maps, the data has {features} features and {targets} targets",
                    self.inputs.len(),
                    self.targets.len()
                ),
            ));
        }
        for a in self.inputs.iter().chain(&self.targets) {
            if !(a.scale.is_finite() && a.scale > 0.0 && a.shift.is_finite()) {
                return Err(Error::setting(
                    "normalizer",
                    format!(
                        "scale {} shift {} is not a positive finite scale and a finite shift",
                        a.scale, a.shift
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Input steps (`features` values each), raw to normalised.
    pub fn inputs(&self, raw: &[f32]) -> Vec<f32> {
        raw.iter()
            .enumerate()
            .map(|(k, &v)| self.inputs[k % self.inputs.len()].apply(v))
            .collect()
    }

    /// Model outputs (`targets` values per sequence, one sequence after another), normalised
    /// to raw.
    pub fn outputs(&self, normalised: &[f32]) -> Vec<f32> {
        normalised
            .iter()
            .enumerate()
            .map(|(k, &v)| self.targets[k % self.targets.len()].invert(v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_feature_rows() -> Dataset {
        let mut ds = Dataset::with_shape(2, 1);
        // Steps (a, b), then the target.
        ds.push_row(&[1.0, 10.0, 3.0, 30.0, 5.0]);
        ds.push_row(&[2.0, 20.0, 7.0]);
        ds.push_row(&[100.0, 1000.0, 100.0]);
        ds
    }

    #[test]
    fn standard_is_fitted_per_column_on_the_training_rows_only() {
        let ds = two_feature_rows();
        let norm = Normalizer::fit(Scale::Standard, &ds, &[0, 1]).unwrap();
        // Feature a over rows 0 and 1: 1, 3, 2 -> mean 2, population std sqrt(2/3).
        assert!((norm.inputs[0].shift - 2.0).abs() < 1e-6);
        assert!((norm.inputs[0].scale - (2.0f32 / 3.0).sqrt()).abs() < 1e-6);
        assert!((norm.inputs[1].shift - 20.0).abs() < 1e-5);
        // Targets 5 and 7; row 2's 100 is not training data.
        assert!((norm.targets[0].shift - 6.0).abs() < 1e-6);
        assert!((norm.targets[0].scale - 1.0).abs() < 1e-6);
        let n = ds.normalized(&norm);
        assert!((n.input(0)[2] - (3.0 - 2.0) / (2.0f32 / 3.0).sqrt()).abs() < 1e-5);
        assert!((n.targets(1)[0] - 1.0).abs() < 1e-6);
        let raw = norm.outputs(n.targets(2));
        assert!((raw[0] - 100.0).abs() < 1e-4);
    }

    #[test]
    fn min_max_maps_the_training_range_onto_zero_to_one() {
        let ds = two_feature_rows();
        let norm = Normalizer::fit(Scale::MinMax, &ds, &[0, 1]).unwrap();
        assert_eq!(
            norm.inputs[1],
            Affine {
                shift: 10.0,
                scale: 20.0
            }
        );
        let n = ds.normalized(&norm);
        assert_eq!(n.input(0), &[0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn a_constant_column_is_shifted_not_divided_by_zero() {
        let mut ds = Dataset::with_shape(1, 1);
        ds.push_row(&[4.0, 4.0]);
        ds.push_row(&[4.0, 4.0]);
        for scale in [Scale::Standard, Scale::MinMax] {
            let norm = Normalizer::fit(scale, &ds, &[0, 1]).unwrap();
            assert_eq!(norm.inputs[0].scale, 1.0);
            assert_eq!(ds.normalized(&norm).input(0), &[0.0]);
        }
    }

    #[test]
    fn fixed_and_auto_divide_every_column_alike() {
        let ds = two_feature_rows();
        let norm = Normalizer::fit(Scale::Fixed(50.0), &ds, &[0]).unwrap();
        assert_eq!(norm, Normalizer::uniform(50.0, 2, 1));
        // The largest magnitude of the training rows: row 2's 1000 is not one of them.
        let norm = Normalizer::fit(Scale::Auto, &ds, &[0, 1]).unwrap();
        assert_eq!(norm, Normalizer::uniform(30.0, 2, 1));
        assert!(Normalizer::uniform(0.0, 1, 1).validate(1, 1).is_err());
        assert!(norm.validate(1, 1).is_err());
    }
}
