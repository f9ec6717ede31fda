//! Prometheus metrics of one coordinator, served at `GET /metrics` on its gRPC port.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};

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
}

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
            registry,
        })
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
