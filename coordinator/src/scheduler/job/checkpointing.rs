//! What a job saves: the best parameters (by validation accuracy) and the latest epoch's state,
//! as checkpoint sets the I/O layer writes (see `recur_core::sets`).

use std::collections::BTreeMap;

use recur_core::checkpoint::{Checkpoint, FORMAT_VERSION, Manifest};
use recur_core::metrics::Metrics;

use recur_core::stop::{StopReason, StopRules};

use super::{Best, RunningJob};
use crate::scheduler::{Action, CheckpointKind, Ctx, Resume};

impl RunningJob {
    /// Continues from a checkpoint set: its parameters, step, epoch, optimizer and schedule
    /// state, and the best parameters. The stop rules are applied again, so a job stopped after
    /// its last checkpoint and before it was marked completed finishes without training more.
    pub(super) fn resume_from(&mut self, resume: Resume) -> Result<(), String> {
        let m = &resume.latest.manifest;
        let t = &self.spec.train;
        if resume.latest.params.len() != self.params.len() || m.model != t.model {
            return Err("the latest checkpoint does not fit the job's model".into());
        }
        self.params.clone_from(&resume.latest.params);
        self.version = m.step;
        self.epoch = m.epoch;
        if let Some(state) = resume.latest.optimizer.clone() {
            self.optimizer
                .load_state(state)
                .map_err(|e| e.to_string())?;
        }
        if let Some(s) = &m.scheduler {
            self.lr = s.clone();
        }
        self.optimizer.set_lr(m.lr.unwrap_or(self.lr.lr()));
        self.best = resume.best.and_then(|b| {
            Some(Best {
                epoch: b.manifest.epoch,
                version: b.manifest.step,
                validation: b.manifest.validation?,
                params: b.params,
            })
        });
        if let Some(last) = resume.history.last().and_then(|e| e.validation) {
            let mut rules = self.rules();
            // The best epoch as the history tells it (the best checkpoint may be missing, or
            // newer than `latest` and so not kept); without the best parameters patience cannot
            // end the job, since its test would have nothing to test.
            let history_best = resume
                .history
                .iter()
                .filter_map(|e| Some((e.epoch, e.validation?.accuracy)))
                .fold(None, |acc: Option<(u64, f64)>, (e, a)| {
                    if StopRules::is_better(a, acc.map(|x| x.1)) {
                        Some((e, a))
                    } else {
                        acc
                    }
                });
            if self.best.is_none() {
                rules.patience = u64::MAX;
            }
            let best_epoch = history_best.map_or(0, |b| b.0);
            self.stop = rules
                .after_epoch(self.epoch, self.version, best_epoch, last.accuracy)
                .map(StopReason::as_str);
        }
        Ok(())
    }

    fn manifest(&self, epoch: u64, step: u64, validation: Option<Metrics>) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            model: self.spec.train.model,
            scale: self.data.norm.targets[0].scale,
            epoch,
            step,
            validation,
            test: None,
            optimizer: None,
            scheduler: None,
            lr: None,
            position: BTreeMap::new(),
            normalizer: Some(self.data.norm.clone()),
            loss: self.spec.train.loss,
        }
    }

    pub(super) fn push_best(&self, test: Option<Metrics>, cx: &mut Ctx<'_>) {
        if let Some(b) = &self.best {
            let mut manifest = self.manifest(b.epoch, b.version, Some(b.validation));
            manifest.test = test;
            cx.actions.push(Action::Checkpoint(
                self.id.clone(),
                CheckpointKind::Best,
                Box::new(Checkpoint {
                    manifest,
                    params: b.params.clone(),
                    optimizer: None,
                }),
            ));
        }
    }

    pub(super) fn push_latest(&self, cx: &mut Ctx<'_>) {
        let mut manifest = self.manifest(self.epoch, self.version, None);
        manifest.optimizer = Some(*self.optimizer.config());
        manifest.scheduler = Some(self.lr.clone());
        manifest.lr = Some(self.optimizer.lr());
        manifest.position =
            BTreeMap::from([("epoch".to_string(), self.epoch), ("batch".to_string(), 0)]);
        cx.actions.push(Action::Checkpoint(
            self.id.clone(),
            CheckpointKind::Latest,
            Box::new(Checkpoint {
                manifest,
                params: self.params.clone(),
                optimizer: Some(self.optimizer.state().clone()),
            }),
        ));
    }
}
