//! A round of parts: one piece of work (a step's global batch, or an evaluation) cut into one
//! part per worker, the results that came back, and what to redo when a worker goes. Steps and
//! evaluations share it, so deadlines and reissues work the same for both.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::ids::WorkerId;

/// Rows given to one worker.
#[derive(Debug)]
pub(super) struct Part {
    pub(super) id: u32,
    pub(super) worker: WorkerId,
    pub(super) rows: Vec<usize>,
    /// Time steps in `rows`.
    pub(super) steps: usize,
    /// When the worker's result is due.
    pub(super) due: Instant,
}

/// The parts of one piece of work and the results received, by part id.
#[derive(Debug)]
pub(super) struct Round<R> {
    /// In creation order, which is the order results are combined in.
    pub(super) parts: Vec<Part>,
    pub(super) results: BTreeMap<u32, R>,
}

impl<R> Round<R> {
    pub(super) fn new(parts: Vec<Part>) -> Self {
        Self {
            parts,
            results: BTreeMap::new(),
        }
    }

    /// The part `part` if `worker` was given it and its result is still awaited.
    pub(super) fn awaited(&self, part: u32, worker: WorkerId) -> Option<&Part> {
        if self.results.contains_key(&part) {
            return None;
        }
        self.parts
            .iter()
            .find(|p| p.id == part && p.worker == worker)
    }

    /// Whether every part has its result.
    pub(super) fn complete(&self) -> bool {
        self.results.len() == self.parts.len()
    }

    /// The parts whose results are awaited.
    pub(super) fn outstanding(&self) -> impl Iterator<Item = &Part> {
        self.parts
            .iter()
            .filter(|p| !self.results.contains_key(&p.id))
    }

    /// Removes the unfinished parts (those of `lost`, or all of them) and returns their rows,
    /// to be given out again.
    pub(super) fn take_unfinished(&mut self, lost: Option<WorkerId>) -> Vec<usize> {
        let mut rows = Vec::new();
        let results = &self.results;
        self.parts.retain(|p| {
            let redo = !results.contains_key(&p.id) && lost.is_none_or(|l| p.worker == l);
            if redo {
                rows.extend_from_slice(&p.rows);
            }
            !redo
        });
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(id: u32, worker: u64, rows: &[usize]) -> Part {
        Part {
            id,
            worker: WorkerId(worker),
            rows: rows.to_vec(),
            steps: rows.len(),
            due: Instant::now(),
        }
    }

    #[test]
    fn a_round_tracks_results_and_gives_back_unfinished_rows() {
        let mut round: Round<()> = Round::new(vec![
            part(1, 1, &[0, 1]),
            part(2, 2, &[2]),
            part(3, 1, &[3, 4]),
        ]);
        assert!(
            round.awaited(2, WorkerId(1)).is_none(),
            "not worker 1's part"
        );
        assert!(round.awaited(2, WorkerId(2)).is_some());
        round.results.insert(2, ());
        assert!(round.awaited(2, WorkerId(2)).is_none(), "already in");
        assert_eq!(
            round.outstanding().map(|p| p.id).collect::<Vec<_>>(),
            [1, 3]
        );
        // Worker 1 is lost: its two unfinished parts come back, worker 2's finished one stays.
        assert_eq!(round.take_unfinished(Some(WorkerId(1))), [0, 1, 3, 4]);
        assert!(round.complete());
        assert_eq!(round.parts.len(), 1);
    }
}
