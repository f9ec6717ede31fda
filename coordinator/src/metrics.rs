//! Prometheus metrics of one coordinator, served at `GET /metrics` on its gRPC port.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// The coordinator's metrics, in a registry of its own (several coordinators can share a
/// process, as in tests).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// The process collector, under the standard `process_*` names (no `recur_` prefix).
    process: Registry,
    /// The label sets of the per-worker series exported now, to remove those of workers that
    /// left (and only those).
    worker_labels: std::sync::Arc<std::sync::Mutex<Vec<[String; 3]>>>,
    /// Optimizer steps applied.
    pub steps: IntCounter,
    /// Training samples in applied steps.
    pub samples: IntCounter,
    /// Epochs finished.
    pub epochs: IntCounter,
    /// Whole-step latency as the coordinator saw it.
    pub step_seconds: Histogram,
    /// Longest worker compute time of each step.
    pub compute_seconds: Histogram,
    /// Step latency less compute: transport and queueing.
    pub wait_seconds: Histogram,
    /// Connected workers.
    pub workers: IntGauge,
    /// Predict calls' latency.
    pub predict_seconds: Histogram,
    /// Sequences predicted.
    pub predicted: IntCounter,
    /// Jobs waiting in the queue.
    pub queued: IntGauge,
    /// Jobs that ended, by final state.
    pub jobs_finished: IntCounterVec,
    /// Per job: 1 for its current state (`queued`, `running`, …), 0 for the others.
    pub job_state: IntGaugeVec,
    /// Per job: epochs and steps done.
    pub job_epochs: IntGaugeVec,
    /// Per job: steps applied.
    pub job_steps: IntGaugeVec,
    /// Per job: the last epoch's training loss, validation accuracy and learning rate, and
    /// samples per second.
    pub job_epoch: GaugeVec,
    /// Per worker (labels `worker`, `name`, `device`): steps and rows computed, measured speed
    /// and time since it was last heard from.
    pub worker: GaugeVec,
}

/// The states a job can be in, as `job_state`'s `state` label.
pub const JOB_STATES: [&str; 5] = ["queued", "running", "completed", "failed", "cancelled"];

fn buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1e-5, 2.0, 22).unwrap_or_default()
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("recur".into()), None)?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |name: &str, help: &str| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let workers = IntGauge::new("workers", "Connected workers")?;
        registry.register(Box::new(workers.clone()))?;
        let queued = IntGauge::new("queued_jobs", "Jobs waiting in the queue")?;
        registry.register(Box::new(queued.clone()))?;
        let int_gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let jobs_finished = IntCounterVec::new(
            Opts::new("jobs_finished_total", "Jobs that ended, by final state"),
            &["state"],
        )?;
        registry.register(Box::new(jobs_finished.clone()))?;
        let build = IntGaugeVec::new(
            Opts::new("build_info", "The coordinator's version (always 1)"),
            &["version"],
        )?;
        registry.register(Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            steps: counter("steps_total", "Optimizer steps applied")?,
            samples: counter("samples_total", "Training samples in applied steps")?,
            epochs: counter("epochs_total", "Epochs finished")?,
            step_seconds: histogram("step_seconds", "Step latency seen by the coordinator")?,
            compute_seconds: histogram(
                "step_compute_seconds",
                "Longest worker compute time of a step",
            )?,
            wait_seconds: histogram(
                "step_wait_seconds",
                "Step latency less compute: transport and queueing",
            )?,
            workers,
            predict_seconds: histogram("predict_seconds", "Predict call latency")?,
            predicted: counter("predicted_sequences_total", "Sequences predicted")?,
            queued,
            jobs_finished,
            job_state: int_gauges(
                "job_state",
                "1 for the job's current state, 0 for the others",
                &["job", "state"],
            )?,
            job_epochs: int_gauges("job_epochs", "Epochs the job has done", &["job"])?,
            job_steps: int_gauges("job_steps", "Optimizer steps the job has applied", &["job"])?,
            job_epoch: gauges(
                "job_last_epoch",
                "The job's last epoch: train_loss, validation_accuracy, lr, samples_per_second",
                &["job", "metric"],
            )?,
            worker: gauges(
                "worker",
                "Per worker: steps, rows, steps_per_second, last_seen_unix_seconds",
                &["worker", "name", "device", "metric"],
            )?,
            registry,
            process,
            worker_labels: Default::default(),
        })
    }

    /// Records a job's state (one-hot over [`JOB_STATES`]), epochs and steps.
    pub fn job(&self, job: &str, state: &str, epochs: u64, steps: u64) {
        for s in JOB_STATES {
            self.job_state
                .with_label_values(&[job, s])
                .set(i64::from(s == state));
        }
        self.job_epochs.with_label_values(&[job]).set(epochs as i64);
        self.job_steps.with_label_values(&[job]).set(steps as i64);
    }

    /// Records a job's finished epoch (no validation accuracy series without a validation).
    pub fn epoch(
        &self,
        job: &str,
        train_loss: f64,
        validation_accuracy: Option<f64>,
        lr: f64,
        rate: f64,
    ) {
        for (metric, v) in [
            ("train_loss", Some(train_loss)),
            ("validation_accuracy", validation_accuracy),
            ("lr", Some(lr)),
            ("samples_per_second", Some(rate)),
        ] {
            if let Some(v) = v {
                self.job_epoch.with_label_values(&[job, metric]).set(v);
            }
        }
    }

    /// Sets the per-worker series of the workers connected now and removes those of workers
    /// that left (the others are never absent from a scrape).
    pub fn workers(&self, workers: &[WorkerRow]) {
        let Ok(mut exported) = self.worker_labels.lock() else {
            return;
        };
        let now: Vec<[String; 3]> = workers
            .iter()
            .map(|w| [w.id.clone(), w.name.clone(), w.device.clone()])
            .collect();
        for gone in exported.iter().filter(|l| !now.contains(l)) {
            for metric in WORKER_METRICS {
                let _ = self
                    .worker
                    .remove_label_values(&[&gone[0], &gone[1], &gone[2], metric]);
            }
        }
        for (w, labels) in workers.iter().zip(&now) {
            let values = [
                w.steps,
                w.rows,
                w.steps_per_second,
                w.last_seen_unix_seconds,
            ];
            for (metric, v) in WORKER_METRICS.into_iter().zip(values) {
                self.worker
                    .with_label_values(&[&labels[0], &labels[1], &labels[2], metric])
                    .set(v);
            }
        }
        *exported = now;
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// One connected worker's figures for [`Metrics::workers`].
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    /// Its id (`w-3`).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its device.
    pub device: String,
    /// Step parts computed.
    pub steps: f64,
    /// Training rows computed.
    pub rows: f64,
    /// Measured time steps per second.
    pub steps_per_second: f64,
    /// When it was last heard from, in Unix seconds.
    pub last_seen_unix_seconds: f64,
}

/// The `metric` label values of `recur_worker`, in [`WorkerRow`]'s order.
const WORKER_METRICS: [&str; 4] = [
    "steps",
    "rows",
    "steps_per_second",
    "last_seen_unix_seconds",
];
