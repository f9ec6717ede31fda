//! Following a job on the terminal: a bar with epoch/total, ETA, loss, accuracy, the best epoch,
//! the learning rate and the patience left, with a line per epoch printed above it. When stderr
//! is not a terminal (nohup, a Kubernetes Job, a pipe) the bar is off and each epoch is one
//! plain line, so a long job is never silent.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use recur_proto::v1 as pb;

/// The display of one followed job.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    /// Print nothing (JSON output goes to stdout instead).
    quiet: bool,
    /// Epochs the job had when following began: those are history, not news.
    replayed_up_to: Option<u64>,
    max_epochs: u64,
    patience: u64,
    best: Option<(u64, f64)>,
    live: bool,
    /// Epochs of the history that came before the job's state (which holds the total and the
    /// patience): shown once it has come.
    early: Vec<pb::EpochMetrics>,
}

impl Progress {
    /// A bar on a terminal, plain lines elsewhere; nothing at all when `quiet`.
    pub(super) fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} epoch {pos}/{len} [{wide_bar}] {elapsed} (ETA {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            quiet,
            replayed_up_to: None,
            max_epochs: 0,
            patience: 0,
            best: None,
            live: false,
            early: Vec::new(),
        }
    }

    /// The job's state changed (also sent once right after the history of its epochs).
    pub(super) fn job(&mut self, j: &pb::JobInfo) {
        if self.replayed_up_to.is_none() {
            self.replayed_up_to = Some(j.epochs);
            if let Some(spec) = &j.spec {
                self.max_epochs = spec.max_epochs;
                self.patience = spec.patience;
            }
            if let Some(bar) = &self.bar {
                bar.set_length(self.max_epochs.max(1));
                bar.set_position(j.epochs);
            }
            for e in std::mem::take(&mut self.early) {
                self.epoch(&e);
            }
        }
        if !j.message.is_empty() {
            self.note(&j.message);
        }
    }

    /// An epoch finished.
    pub(super) fn epoch(&mut self, e: &pb::EpochMetrics) {
        if self.replayed_up_to.is_none() {
            self.early.push(*e);
            return;
        }
        let v = e.validation.unwrap_or_default();
        if self.best.is_none_or(|(_, acc)| v.accuracy > acc) {
            self.best = Some((e.epoch, v.accuracy));
        }
        let (best_epoch, best_acc) = self.best.unwrap_or((e.epoch, v.accuracy));
        let patience_left = self
            .patience
            .saturating_sub(e.epoch.saturating_sub(best_epoch));
        let line = format!(
            "epoch {}/{}  loss {:.3e}  train acc {:.4}  val acc {:.4}  MAE {:.4}  best {:.4} @ {}  lr {:.3e}  patience {}  {:.0} samples/s  {} workers",
            e.epoch,
            self.max_epochs,
            e.train_loss,
            e.train_accuracy,
            v.accuracy,
            v.mae,
            best_acc,
            best_epoch,
            e.lr,
            patience_left,
            e.samples_per_sec,
            e.workers
        );
        let news = self.replayed_up_to.is_none_or(|n| e.epoch > n);
        match &self.bar {
            Some(bar) => {
                if news {
                    if !self.live {
                        // The rate so far counts the history, which arrived at once.
                        bar.reset_eta();
                        self.live = true;
                    }
                    bar.println(&line);
                }
                bar.set_position(e.epoch);
                bar.set_message(format!(
                    "val {:.4} best {best_acc:.4}@{best_epoch} lr {:.1e}",
                    v.accuracy, e.lr
                ));
            }
            None if !self.quiet => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("{line}");
                }
            }
            None => {}
        }
    }

    fn note(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None if !self.quiet => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("{message}");
                }
            }
            None => {}
        }
    }

    /// Removes the bar (the epoch lines stay).
    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
