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
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
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
                "Per worker: steps, rows, steps_per_second, last_seen_seconds",
                &["worker", "name", "device", "metric"],
            )?,
            registry,
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

    /// Records a job's finished epoch.
    pub fn epoch(&self, job: &str, train_loss: f64, validation_accuracy: f64, lr: f64, rate: f64) {
        for (metric, v) in [
            ("train_loss", train_loss),
            ("validation_accuracy", validation_accuracy),
            ("lr", lr),
            ("samples_per_second", rate),
        ] {
            self.job_epoch.with_label_values(&[job, metric]).set(v);
        }
    }

    /// Replaces the per-worker series with those of the workers connected now.
    pub fn workers(&self, workers: &[WorkerRow]) {
        self.worker.reset();
        for w in workers {
            for (metric, v) in [
                ("steps", w.steps),
                ("rows", w.rows),
                ("steps_per_second", w.steps_per_second),
                ("last_seen_seconds", w.last_seen_seconds),
            ] {
                self.worker
                    .with_label_values(&[w.id.as_str(), w.name.as_str(), w.device.as_str(), metric])
                    .set(v);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
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
    /// Seconds since its last message.
    pub last_seen_seconds: f64,
}
