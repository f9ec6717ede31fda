//! Optimizers over flat `f32` vectors with state that is saved with checkpoints, and learning-rate
//! schedules. Each update is `torch.optim`'s, operation for operation.

mod schedule;

pub use schedule::{LrSchedule, LrScheduler};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::check_len;
use crate::{Error, Result};

/// An optimizer and its hyper-parameters (PyTorch's defaults where not given).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// `torch.optim.SGD`.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum factor (0 for none).
        momentum: f64,
        /// Dampening of the momentum.
        dampening: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
        /// Nesterov momentum (needs momentum > 0 and dampening 0).
        nesterov: bool,
    },
    /// `torch.optim.Adam`.
    Adam {
        /// Learning rate.
        lr: f64,
        /// Decay of the first moment.
        beta1: f64,
        /// Decay of the second moment.
        beta2: f64,
        /// Added to the denominator.
        eps: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
    /// `torch.optim.AdamW` (decoupled weight decay).
    AdamW {
        /// Learning rate.
        lr: f64,
        /// Decay of the first moment.
        beta1: f64,
        /// Decay of the second moment.
        beta2: f64,
        /// Added to the denominator.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// `torch.optim.Adadelta`.
    Adadelta {
        /// Learning rate (scales the delta).
        lr: f64,
        /// Decay of the running averages.
        rho: f64,
        /// Added inside the square roots.
        eps: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    /// Plain SGD with this learning rate.
    pub fn sgd(lr: f64) -> Self {
        Self::Sgd {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }

    /// Adam with PyTorch's defaults and this learning rate.
    pub fn adam(lr: f64) -> Self {
        Self::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// AdamW with PyTorch's defaults (weight decay 0.01) and this learning rate.
    pub fn adamw(lr: f64) -> Self {
        Self::AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    /// Adadelta with PyTorch's defaults and this learning rate.
    pub fn adadelta(lr: f64) -> Self {
        Self::Adadelta {
            lr,
            rho: 0.9,
            eps: 1e-6,
            weight_decay: 0.0,
        }
    }

    /// The name used on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::Adam { .. } => "adam",
            Self::AdamW { .. } => "adamw",
            Self::Adadelta { .. } => "adadelta",
        }
    }

    /// The optimizer of this name with PyTorch's defaults and `lr`.
    pub fn by_name(name: &str, lr: f64) -> Result<Self> {
        match name {
            "sgd" => Ok(Self::sgd(lr)),
            "adam" => Ok(Self::adam(lr)),
            "adamw" => Ok(Self::adamw(lr)),
            "adadelta" => Ok(Self::adadelta(lr)),
            other => Err(Error::setting(
                "optimizer",
                format!("`{other}` is not one of sgd, adam, adamw, adadelta"),
            )),
        }
    }

    /// The initial learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            Self::Sgd { lr, .. }
            | Self::Adam { lr, .. }
            | Self::AdamW { lr, .. }
            | Self::Adadelta { lr, .. } => lr,
        }
    }

    /// Checks every hyper-parameter, naming the first that is out of range.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::setting(
                    field,
                    format!("must be a positive number, got {v}"),
                ))
            }
        };
        let non_negative = |field: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::setting(field, format!("must be 0 or more, got {v}")))
            }
        };
        let unit = |field: &'static str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::setting(field, format!("must be in [0, 1), got {v}")))
            }
        };
        positive("lr", self.lr())?;
        match *self {
            Self::Sgd {
                momentum,
                dampening,
                weight_decay,
                nesterov,
                ..
            } => {
                non_negative("momentum", momentum)?;
                non_negative("dampening", dampening)?;
                non_negative("weight_decay", weight_decay)?;
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return Err(Error::setting(
                        "nesterov",
                        "needs momentum above 0 and dampening 0",
                    ));
                }
            }
            Self::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            }
            | Self::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                positive("eps", eps)?;
                non_negative("weight_decay", weight_decay)?;
            }
            Self::Adadelta {
                rho,
                eps,
                weight_decay,
                ..
            } => {
                if !(0.0..=1.0).contains(&rho) {
                    return Err(Error::setting(
                        "rho",
                        format!("must be in [0, 1], got {rho}"),
                    ));
                }
                positive("eps", eps)?;
                non_negative("weight_decay", weight_decay)?;
            }
        }
        Ok(())
    }
}

/// An optimizer's running state: the step count and named buffers, each as long as the
/// parameter vector.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OptimizerState {
    /// Steps taken.
    pub step: u64,
    /// Buffers by name (`momentum_buffer`, `exp_avg`, `exp_avg_sq`, `square_avg`, `acc_delta`).
    pub buffers: BTreeMap<String, Vec<f32>>,
}

/// An optimizer over a flat parameter vector.
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    lr: f64,
    len: usize,
    state: OptimizerState,
}

impl Optimizer {
    /// A fresh optimizer for `len` parameters.
    pub fn new(config: OptimizerConfig, len: usize) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            lr: config.lr(),
            config,
            len,
            state: OptimizerState::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The learning rate the next step uses.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate (a schedule does this between epochs).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The running state, to save.
    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// Restores saved state; every buffer must have the parameter vector's length and belong to
    /// this optimizer.
    pub fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        let allowed = self.buffer_names();
        for (name, buf) in &state.buffers {
            if !allowed.contains(&name.as_str()) {
                return Err(Error::setting(
                    "optimizer state",
                    format!("buffer `{name}` does not belong to {}", self.config.name()),
                ));
            }
            check_len("optimizer state", buf.len(), self.len)?;
        }
        self.state = state;
        Ok(())
    }

    fn buffer_names(&self) -> &'static [&'static str] {
        match self.config {
            OptimizerConfig::Sgd { .. } => &["momentum_buffer"],
            OptimizerConfig::Adam { .. } | OptimizerConfig::AdamW { .. } => {
                &["exp_avg", "exp_avg_sq"]
            }
            OptimizerConfig::Adadelta { .. } => &["acc_delta", "square_avg"],
        }
    }

    fn buffer(&mut self, name: &str) -> Vec<f32> {
        self.state
            .buffers
            .remove(name)
            .unwrap_or_else(|| vec![0.0; self.len])
    }

    /// Applies one update to `params` with the averaged gradient `grads`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) -> Result<()> {
        check_len("parameters", params.len(), self.len)?;
        check_len("gradient", grads.len(), self.len)?;
        let lr = self.lr as f32;
        self.state.step += 1;
        match self.config {
            OptimizerConfig::Sgd {
                momentum,
                dampening,
                weight_decay,
                nesterov,
                ..
            } => {
                // Like torch, `1 - x` is formed in double precision before it meets the f32s.
                let (momentum, keep, wd) = (
                    momentum as f32,
                    (1.0 - dampening) as f32,
                    weight_decay as f32,
                );
                let first = !self.state.buffers.contains_key("momentum_buffer");
                let mut buf = if momentum != 0.0 {
                    self.buffer("momentum_buffer")
                } else {
                    Vec::new()
                };
                for i in 0..self.len {
                    let mut g = grads[i];
                    if wd != 0.0 {
                        g += wd * params[i];
                    }
                    if momentum != 0.0 {
                        buf[i] = if first {
                            g
                        } else {
                            momentum * buf[i] + keep * g
                        };
                        g = if nesterov {
                            g + momentum * buf[i]
                        } else {
                            buf[i]
                        };
                    }
                    params[i] -= lr * g;
                }
                if momentum != 0.0 {
                    self.state.buffers.insert("momentum_buffer".into(), buf);
                }
            }
            OptimizerConfig::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            }
            | OptimizerConfig::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                let decoupled = matches!(self.config, OptimizerConfig::AdamW { .. });
                let mut m = self.buffer("exp_avg");
                let mut v = self.buffer("exp_avg_sq");
                let t = self.state.step as i32;
                let step_size = (self.lr / (1.0 - beta1.powi(t))) as f32;
                let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt() as f32;
                let (b2, eps) = (beta2 as f32, eps as f32);
                let (one_minus_b1, one_minus_b2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
                let decay = (1.0 - self.lr * weight_decay) as f32;
                let wd = weight_decay as f32;
                for i in 0..self.len {
                    let mut g = grads[i];
                    if decoupled {
                        params[i] *= decay;
                    } else if wd != 0.0 {
                        g += wd * params[i];
                    }
                    m[i] += (g - m[i]) * one_minus_b1;
                    v[i] = v[i] * b2 + one_minus_b2 * g * g;
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    params[i] -= step_size * m[i] / denom;
                }
                self.state.buffers.insert("exp_avg".into(), m);
                self.state.buffers.insert("exp_avg_sq".into(), v);
            }
            OptimizerConfig::Adadelta {
                rho,
                eps,
                weight_decay,
                ..
            } => {
                let mut sq = self.buffer("square_avg");
                let mut acc = self.buffer("acc_delta");
                let (one_minus_rho, eps, wd) =
                    ((1.0 - rho) as f32, eps as f32, weight_decay as f32);
                let rho = rho as f32;
                for i in 0..self.len {
                    let mut g = grads[i];
                    if wd != 0.0 {
                        g += wd * params[i];
                    }
                    sq[i] = sq[i] * rho + one_minus_rho * g * g;
                    let std = (sq[i] + eps).sqrt();
                    let delta = (acc[i] + eps).sqrt() / std * g;
                    acc[i] = acc[i] * rho + one_minus_rho * delta * delta;
                    params[i] -= lr * delta;
                }
                self.state.buffers.insert("square_avg".into(), sq);
                self.state.buffers.insert("acc_delta".into(), acc);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let err = OptimizerConfig::adam(f64::NAN).validate().unwrap_err();
        assert!(err.to_string().contains("lr"), "{err}");
        let err = OptimizerConfig::sgd(0.0).validate().unwrap_err();
        assert!(err.to_string().contains("lr"), "{err}");
        assert!(OptimizerConfig::by_name("rmsprop", 0.1).is_err());
    }

    #[test]
    fn state_round_trips_and_is_checked() {
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.1), 3).unwrap();
        let mut p = vec![1.0, 2.0, 3.0];
        opt.step(&mut p, &[0.1, 0.2, 0.3]).unwrap();
        let mut resumed = Optimizer::new(OptimizerConfig::adam(0.1), 3).unwrap();
        resumed.load_state(opt.state().clone()).unwrap();
        let mut q = p.clone();
        opt.step(&mut p, &[0.3, 0.2, 0.1]).unwrap();
        resumed.step(&mut q, &[0.3, 0.2, 0.1]).unwrap();
        assert_eq!(p, q);
        let mut bad = opt.state().clone();
        bad.buffers.insert("exp_avg".into(), vec![0.0; 2]);
        assert!(resumed.load_state(bad).is_err());
        assert!(resumed.step(&mut q, &[0.0; 2]).is_err());
    }
}
