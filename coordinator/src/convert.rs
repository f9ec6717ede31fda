//! Conversions between wire messages and the coordinator's types. Those of recur-core's types
//! (metrics, batch sums, model configs) live in `recur_core::convert`.

use recur_proto::v1 as pb;

use crate::scheduler::JobState;

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => Self::Queued,
            JobState::Running => Self::Running,
            JobState::Completed => Self::Completed,
            JobState::Failed => Self::Failed,
            JobState::Cancelled => Self::Cancelled,
        }
    }
}
