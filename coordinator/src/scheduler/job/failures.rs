//! Worker failures on the piece of work in flight, and when they are the model's fault.

/// Failures of workers on the current step or evaluation. A worker that fails is dropped and its
/// part reissued; the job fails only when the failure looks like the model's: a non-finite
/// gradient from a second worker, or errors from as many workers as the work was first given to
/// (at least two: a lone worker gets a second try after it reconnects).
#[derive(Debug, Default)]
pub(super) struct Failures {
    /// Errors and missed deadlines, one line each.
    pub(super) errors: Vec<String>,
    /// Non-finite gradients, one line each.
    pub(super) non_finite: Vec<String>,
    members: usize,
}

impl Failures {
    /// Starts counting for a new piece of work given to `members` workers.
    pub(super) fn start(&mut self, members: usize) {
        *self = Self {
            members,
            ..Self::default()
        };
    }

    /// The reason to fail the job, if the failures so far are the model's.
    pub(super) fn verdict(&self) -> Option<String> {
        if self.non_finite.len() >= 2 {
            return Some(format!(
                "{}; reproduced by another worker: {}; the step was not applied (the model diverged: lower the learning rate)",
                self.non_finite[0],
                self.non_finite[1..].join("; ")
            ));
        }
        if self.errors.len() >= self.members.max(2) {
            return Some(format!(
                "every worker failed the same work: {}",
                self.errors.join("; ")
            ));
        }
        None
    }
}
