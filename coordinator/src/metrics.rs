//! Prometheus metrics of one coordinator, served at `GET /metrics` on its gRPC port.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
    /// Open `PredictStream` sessions (held by a stream or idle).
    pub stream_sessions: IntGauge,
    /// Steps fed to `PredictStream` sessions.
    pub stream_steps: IntCounter,
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
    /// Workers that left, by `device` and `cause` (left, lost, dropped).
    pub workers_gone: IntCounterVec,
    /// gRPC calls by `service`, `method` and status `code`.
    pub grpc_calls: IntCounterVec,
    /// gRPC call latency (to the end of the response stream) by `service` and `method`.
    pub grpc_seconds: HistogramVec,
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
        let stream_sessions = IntGauge::new(
            "stream_sessions",
            "Open PredictStream sessions, held by a stream or idle",
        )?;
        registry.register(Box::new(stream_sessions.clone()))?;
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
        let workers_gone = IntCounterVec::new(
            Opts::new(
                "workers_gone_total",
                "Workers that left the cluster by cause: left (said goodbye), lost (connection closed), dropped (by the coordinator: missed deadline, bad result, no heartbeat)",
            ),
            &["device", "cause"],
        )?;
        registry.register(Box::new(workers_gone.clone()))?;
        let grpc_calls = IntCounterVec::new(
            Opts::new(
                "grpc_requests_total",
                "gRPC calls by service, method and status code",
            ),
            &["service", "method", "code"],
        )?;
        registry.register(Box::new(grpc_calls.clone()))?;
        let grpc_seconds = HistogramVec::new(
            HistogramOpts::new(
                "grpc_request_seconds",
                "gRPC call latency, to the end of the response",
            )
            .buckets(buckets()),
            &["service", "method"],
        )?;
        registry.register(Box::new(grpc_seconds.clone()))?;
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            workers_gone,
            grpc_calls,
            grpc_seconds,
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
            stream_sessions,
            stream_steps: counter("stream_steps_total", "Steps fed to PredictStream sessions")?,
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
                "Per worker: steps, rows, steps_per_second, compute_seconds, wait_seconds, last_seen_unix_seconds",
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

    /// Removes every series of a deleted job.
    pub fn remove_job(&self, job: &str) {
        for s in JOB_STATES {
            let _ = self.job_state.remove_label_values(&[job, s]);
        }
        let _ = self.job_epochs.remove_label_values(&[job]);
        let _ = self.job_steps.remove_label_values(&[job]);
        for metric in JOB_EPOCH_METRICS {
            let _ = self.job_epoch.remove_label_values(&[job, metric]);
        }
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
        let values = [Some(train_loss), validation_accuracy, Some(lr), Some(rate)];
        for (metric, v) in JOB_EPOCH_METRICS.into_iter().zip(values) {
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
                w.compute_seconds,
                w.wait_seconds,
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
    /// Seconds spent computing the parts it returned.
    pub compute_seconds: f64,
    /// Seconds its parts spent in transport and queues.
    pub wait_seconds: f64,
    /// When it was last heard from, in Unix seconds.
    pub last_seen_unix_seconds: f64,
}

/// The `metric` label values of `recur_job_last_epoch`.
const JOB_EPOCH_METRICS: [&str; 4] = [
    "train_loss",
    "validation_accuracy",
    "lr",
    "samples_per_second",
];

/// The `metric` label values of `recur_worker`, in [`WorkerRow`]'s order.
const WORKER_METRICS: [&str; 6] = [
    "steps",
    "rows",
    "steps_per_second",
    "compute_seconds",
    "wait_seconds",
    "last_seen_unix_seconds",
];
