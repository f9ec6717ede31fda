//! When training stops and which epoch is the best: the rules the single-process
//! [`Trainer`](crate::train::Trainer) and the coordinator share, so both stop at the same epoch
//! and keep the same parameters, and a resumed job can re-apply them before training more.

use serde::{Deserialize, Serialize};

/// Why training stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `max_epochs` ran.
    MaxEpochs,
    /// `max_steps` optimizer steps were applied.
    MaxSteps,
    /// `patience` epochs passed without a better validation accuracy.
    Patience,
    /// Validation accuracy reached the target.
    TargetAccuracy,
    /// The caller stopped it.
    Cancelled,
}

impl StopReason {
    /// The name used in job records and the API (`max_epochs`, `patience`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxEpochs => "max_epochs",
            Self::MaxSteps => "max_steps",
            Self::Patience => "patience",
            Self::TargetAccuracy => "target_accuracy",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The stopping rules of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StopRules {
    /// Most epochs.
    pub max_epochs: u64,
    /// Epochs without a better validation accuracy before stopping.
    pub patience: u64,
    /// Stop once validation accuracy reaches this.
    pub target_accuracy: Option<f64>,
    /// Most optimizer steps (the epoch in progress is cut short and evaluated).
    pub max_steps: Option<u64>,
}

impl StopRules {
    /// Whether an epoch with validation accuracy `accuracy` becomes the best, given the best so
    /// far (`None` before any epoch): strictly better only, so ties keep the earlier epoch.
    pub fn is_better(accuracy: f64, best: Option<f64>) -> bool {
        best.is_none_or(|b| accuracy > b)
    }

    /// Whether `steps` applied steps end training (the epoch in progress is then evaluated).
    pub fn steps_done(&self, steps: u64) -> bool {
        self.max_steps.is_some_and(|m| steps >= m)
    }

    /// Why training stops after `epoch` epochs and `steps` steps, when the best epoch so far is
    /// `best_epoch` and the last epoch's validation accuracy was `accuracy`; `None` to go on.
    /// The target is checked first, then patience, then the step and epoch budgets.
    pub fn after_epoch(
        &self,
        epoch: u64,
        steps: u64,
        best_epoch: u64,
        accuracy: f64,
    ) -> Option<StopReason> {
        if self.target_accuracy.is_some_and(|t| accuracy >= t) {
            Some(StopReason::TargetAccuracy)
        } else if epoch.saturating_sub(best_epoch) > self.patience {
            Some(StopReason::Patience)
        } else if self.steps_done(steps) {
            Some(StopReason::MaxSteps)
        } else if epoch >= self.max_epochs {
            Some(StopReason::MaxEpochs)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_in_order() {
        let rules = StopRules {
            max_epochs: 10,
            patience: 3,
            target_accuracy: Some(0.9),
            max_steps: Some(100),
        };
        assert_eq!(rules.after_epoch(1, 10, 1, 0.5), None);
        assert_eq!(
            rules.after_epoch(10, 100, 10, 0.95),
            Some(StopReason::TargetAccuracy),
            "the target wins"
        );
        assert_eq!(rules.after_epoch(5, 50, 1, 0.5), Some(StopReason::Patience));
        assert_eq!(
            rules.after_epoch(4, 50, 1, 0.5),
            None,
            "3 epochs without better"
        );
        assert_eq!(
            rules.after_epoch(5, 100, 5, 0.5),
            Some(StopReason::MaxSteps)
        );
        assert_eq!(
            rules.after_epoch(10, 99, 10, 0.5),
            Some(StopReason::MaxEpochs)
        );
        assert!(StopRules::is_better(0.1, None));
        assert!(
            !StopRules::is_better(0.5, Some(0.5)),
            "ties keep the earlier epoch"
        );
        assert!(rules.steps_done(100) && !rules.steps_done(99));
        assert_eq!(StopReason::MaxSteps.as_str(), "max_steps");
    }
}
