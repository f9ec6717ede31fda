//! Learning-rate schedules, stepped once per epoch as `torch.optim.lr_scheduler` does.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the learning rate changes between epochs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The optimizer's learning rate throughout.
    Constant,
    /// `StepLR`: multiply by `gamma` every `step_size` epochs.
    Step {
        /// Epochs between decays.
        step_size: u32,
        /// Factor applied at each decay.
        gamma: f64,
    },
    /// `CosineAnnealingLR` (closed form): from the base rate down to `eta_min` over `t_max`
    /// epochs.
    Cosine {
        /// Epochs of the half period.
        t_max: u32,
        /// The lowest rate.
        eta_min: f64,
    },
    /// `ReduceLROnPlateau(mode="min", threshold_mode="rel")` on the validation loss.
    Plateau {
        /// Factor applied when the loss stops improving.
        factor: f64,
        /// Epochs without improvement before reducing.
        patience: u32,
        /// Relative improvement that counts.
        threshold: f64,
        /// Epochs to wait after a reduction.
        cooldown: u32,
        /// The rate never goes below this.
        min_lr: f64,
    },
}

impl LrSchedule {
    /// Reduce-on-plateau with PyTorch's defaults except `factor` and `patience`.
    pub fn plateau(factor: f64, patience: u32) -> Self {
        Self::Plateau {
            factor,
            patience,
            threshold: 1e-4,
            cooldown: 0,
            min_lr: 0.0,
        }
    }

    /// Checks the fields.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Constant => Ok(()),
            Self::Step { step_size, gamma } => {
                if step_size == 0 || !(gamma.is_finite() && gamma > 0.0) {
                    Err(Error::setting(
                        "schedule",
                        "step decay needs step_size >= 1 and gamma > 0",
                    ))
                } else {
                    Ok(())
                }
            }
            Self::Cosine { t_max, eta_min } => {
                if t_max == 0 || !(eta_min.is_finite() && eta_min >= 0.0) {
                    Err(Error::setting(
                        "schedule",
                        "cosine needs t_max >= 1 and eta_min >= 0",
                    ))
                } else {
                    Ok(())
                }
            }
            Self::Plateau {
                factor,
                threshold,
                min_lr,
                ..
            } => {
                let ok = factor > 0.0 && factor < 1.0 && threshold >= 0.0 && min_lr >= 0.0;
                if !ok {
                    Err(Error::setting(
                        "schedule",
                        "plateau needs 0 < factor < 1, threshold >= 0 and min_lr >= 0",
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A schedule with its running state; saved with checkpoints so a resumed job continues it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrScheduler {
    schedule: LrSchedule,
    base_lr: f64,
    lr: f64,
    epoch: u64,
    best: f64,
    bad_epochs: u32,
    cooldown_left: u32,
}

impl LrScheduler {
    /// A scheduler starting at `base_lr`.
    pub fn new(schedule: LrSchedule, base_lr: f64) -> Result<Self> {
        schedule.validate()?;
        Ok(Self {
            schedule,
            base_lr,
            lr: base_lr,
            epoch: 0,
            best: f64::INFINITY,
            bad_epochs: 0,
            cooldown_left: 0,
        })
    }

    /// The rate for the coming epoch.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Ends an epoch with its validation loss and returns the rate for the next one.
    pub fn epoch_end(&mut self, val_loss: f64) -> f64 {
        self.epoch += 1;
        let e = self.epoch as f64;
        match self.schedule {
            LrSchedule::Constant => {}
            LrSchedule::Step { step_size, gamma } => {
                self.lr = self.base_lr * gamma.powi((self.epoch / step_size as u64) as i32);
            }
            LrSchedule::Cosine { t_max, eta_min } => {
                let cos = (std::f64::consts::PI * e / t_max as f64).cos();
                self.lr = eta_min + (self.base_lr - eta_min) * (1.0 + cos) / 2.0;
            }
            LrSchedule::Plateau {
                factor,
                patience,
                threshold,
                cooldown,
                min_lr,
            } => {
                if val_loss < self.best * (1.0 - threshold) {
                    self.best = val_loss;
                    self.bad_epochs = 0;
                } else {
                    self.bad_epochs += 1;
                }
                if self.cooldown_left > 0 {
                    self.cooldown_left -= 1;
                    self.bad_epochs = 0;
                }
                if self.bad_epochs > patience {
                    let new_lr = (self.lr * factor).max(min_lr);
                    if self.lr - new_lr > 1e-8 {
                        self.lr = new_lr;
                    }
                    self.cooldown_left = cooldown;
                    self.bad_epochs = 0;
                }
            }
        }
        self.lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_and_cosine_follow_the_closed_forms() {
        let mut s = LrScheduler::new(
            LrSchedule::Step {
                step_size: 2,
                gamma: 0.5,
            },
            1.0,
        )
        .unwrap();
        let lrs: Vec<f64> = (0..5).map(|_| s.epoch_end(0.0)).collect();
        assert_eq!(lrs, [1.0, 0.5, 0.5, 0.25, 0.25]);
        let mut c = LrScheduler::new(
            LrSchedule::Cosine {
                t_max: 4,
                eta_min: 0.0,
            },
            1.0,
        )
        .unwrap();
        let lrs: Vec<f64> = (0..4).map(|_| c.epoch_end(0.0)).collect();
        let expected = [0.853_553_390_593_273_8, 0.5, 0.146_446_609_406_726_24, 0.0];
        for (a, b) in lrs.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{lrs:?}");
        }
    }
}
