//! An embedded cluster: a coordinator and workers in this process, on loopback. `recur demo`,
//! `recur local` and the whole-cluster tests run on it.

use std::net::SocketAddr;

use recur_coordinator::CoordinatorConfig;
use recur_worker::{DeviceSpec, WorkerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running worker of the cluster.
#[derive(Debug)]
struct LocalWorker {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<recur_worker::Result<()>>,
}

/// A coordinator and workers running in this process.
#[derive(Debug)]
pub struct LocalCluster {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    coordinator: JoinHandle<recur_coordinator::Result<()>>,
    workers: Vec<Option<LocalWorker>>,
    worker_template: WorkerConfig,
    tls: bool,
}

impl LocalCluster {
    /// Starts a coordinator on `listen` (port 0 for any) and `workers` CPU workers dialing it.
    pub async fn start(
        listen: &str,
        config: CoordinatorConfig,
        workers: usize,
    ) -> anyhow::Result<Self> {
        Self::start_on(listen, config, workers, DeviceSpec::Cpu).await
    }

    /// [`LocalCluster::start`] with workers computing on `device` (check first that it opens:
    /// a worker that cannot open its device ends with that error).
    pub async fn start_on(
        listen: &str,
        config: CoordinatorConfig,
        workers: usize,
        device: DeviceSpec,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr()?;
        let tls = config.tls.is_some();
        let scheme = if tls { "https" } else { "http" };
        let mut template = WorkerConfig::new(format!("{scheme}://{addr}"), "local");
        template.token = config.worker_token.as_ref().map(|t| t.expose().to_string());
        template.device = device;
        let (stop, stopped) = oneshot::channel::<()>();
        let coordinator = tokio::spawn(recur_coordinator::run(listener, config, async {
            let _ = stopped.await;
        }));
        let mut cluster = Self {
            addr,
            stop: Some(stop),
            coordinator,
            workers: Vec::new(),
            worker_template: template,
            tls,
        };
        for _ in 0..workers {
            cluster.add_worker();
        }
        Ok(cluster)
    }

    /// The coordinator's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The coordinator's URL (`https://` when it serves TLS).
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// TLS that workers started from now on use to dial the coordinator.
    pub fn set_worker_tls(&mut self, tls: tonic::transport::ClientTlsConfig) {
        self.worker_template.tls = Some(tls);
    }

    /// Starts another worker; returns its index.
    pub fn add_worker(&mut self) -> usize {
        self.add_worker_with(|_| {})
    }

    /// Starts another worker whose config `adjust` may change (for example a throttle that makes
    /// it stand in for a slower host); returns its index.
    pub fn add_worker_with(&mut self, adjust: impl FnOnce(&mut WorkerConfig)) -> usize {
        let index = self.workers.len();
        let mut config = self.worker_template.clone();
        config.name = format!("local-{}", index + 1);
        adjust(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(recur_worker::run(config, async {
            let _ = stopped.await;
        }));
        self.workers.push(Some(LocalWorker {
            stop: Some(stop),
            task,
        }));
        index
    }

    /// Stops worker `index` gracefully (it finishes its step and says goodbye).
    pub async fn stop_worker(&mut self, index: usize) {
        if let Some(mut w) = self.workers.get_mut(index).and_then(Option::take) {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
            let _ = w.task.await;
        }
    }

    /// Kills worker `index` abruptly: its connection drops mid-whatever.
    pub fn kill_worker(&mut self, index: usize) {
        if let Some(w) = self.workers.get_mut(index).and_then(Option::take) {
            w.task.abort();
        }
    }

    /// Stops the workers, then the coordinator, and waits for both.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for i in 0..self.workers.len() {
            self.stop_worker(i).await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.coordinator).await??;
        Ok(())
    }
}
