//! A worker's own Prometheus metrics, served over plain HTTP at `GET /metrics` on
//! `--metrics-listen`: commands by kind and outcome with their compute time, training rows,
//! whether it is joined, how often it (re)joined, a GPU's free and total memory, and process
//! metrics. Every series carries the worker's `name` and `device`.

use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The worker's metrics; clones share them.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    registry: Registry,
    process: Registry,
    /// Commands carried out, by `kind` (load, step, evaluate, release) and `outcome` (ok, error).
    pub commands: IntCounterVec,
    /// Time to carry out a command, by `kind`.
    pub command_seconds: HistogramVec,
    /// Training rows it computed gradients of.
    pub rows: IntCounter,
    /// 1 while joined to a coordinator.
    pub joined: IntGauge,
    /// Times it joined a coordinator (1 plus its reconnections).
    pub joins: IntCounter,
    /// A GPU's free and total memory (`kind`), read at each scrape.
    device_memory: IntGaugeVec,
    /// The GPU whose memory is reported; none on the CPU.
    device: Arc<Mutex<Option<candle_core::Device>>>,
}

impl WorkerMetrics {
    /// Registers every metric, labelled with the worker's `name` and `device`.
    pub fn new(name: &str, device: &str) -> prometheus::Result<Self> {
        let labels = [
            ("name".to_string(), name.to_string()),
            ("device".to_string(), device.to_string()),
        ]
        .into_iter()
        .collect();
        let registry = Registry::new_custom(Some("recur_worker".into()), Some(labels))?;
        let commands = IntCounterVec::new(
            Opts::new(
                "commands_total",
                "Commands carried out, by kind and outcome",
            ),
            &["kind", "outcome"],
        )?;
        registry.register(Box::new(commands.clone()))?;
        let command_seconds = HistogramVec::new(
            HistogramOpts::new("command_seconds", "Time to carry out a command, by kind")
                .buckets(prometheus::exponential_buckets(1e-5, 2.0, 22)?),
            &["kind"],
        )?;
        registry.register(Box::new(command_seconds.clone()))?;
        let rows = IntCounter::new("rows_total", "Training rows it computed gradients of")?;
        registry.register(Box::new(rows.clone()))?;
        let joined = IntGauge::new("joined", "1 while joined to a coordinator")?;
        registry.register(Box::new(joined.clone()))?;
        let joins = IntCounter::new("joins_total", "Times it joined a coordinator")?;
        registry.register(Box::new(joins.clone()))?;
        let device_memory = IntGaugeVec::new(
            Opts::new(
                "device_memory_bytes",
                "The GPU's free and total memory (kind), at the scrape",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(device_memory.clone()))?;
        let build = IntGauge::with_opts(
            Opts::new("build_info", "The worker's version (always 1)")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        registry.register(Box::new(build.clone()))?;
        build.set(1);
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            process,
            commands,
            command_seconds,
            rows,
            joined,
            joins,
            device_memory,
            device: Arc::default(),
        })
    }

    /// Reports `device`'s memory from now on (nothing is reported for the CPU).
    pub fn watch_device(&self, device: &candle_core::Device) {
        if let Ok(mut watched) = self.device.lock() {
            *watched = Some(device.clone());
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let memory = self
            .device
            .lock()
            .ok()
            .and_then(|d| d.as_ref().and_then(recur_core::fused::device_memory));
        if let Some((free, total)) = memory {
            for (kind, bytes) in [("free", free), ("total", total)] {
                self.device_memory
                    .with_label_values(&[kind])
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: WorkerMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move { metrics.render() }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
