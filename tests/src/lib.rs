//! The `TestCluster` harness: a real coordinator and real workers in this process, on
//! 127.0.0.1:0, with a temporary data directory, plus helpers that wait on conditions with a
//! deadline (never on a fixed sleep).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use recur_client::Client;
use recur_client::local::LocalCluster;
use recur_coordinator::CoordinatorConfig;
use recur_core::data::Dataset;
use recur_proto::v1 as pb;

/// A coordinator and workers for one test.
#[derive(Debug)]
pub struct TestCluster {
    /// The cluster; use it to add, stop or kill workers.
    pub cluster: LocalCluster,
    /// A client connected to it.
    pub client: Client,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts a coordinator with default limits and `workers` workers.
    pub async fn start(workers: usize) -> Self {
        Self::start_with(workers, |_| {}).await
    }

    /// Starts a coordinator whose config `adjust` may change, and `workers` workers.
    pub async fn start_with(workers: usize, adjust: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CoordinatorConfig::new(dir.path().join("data"));
        adjust(&mut config);
        let token = config.client_token.as_ref().map(|t| t.expose().to_string());
        let cluster = LocalCluster::start("127.0.0.1:0", config, workers)
            .await
            .unwrap();
        let client = Client::connect(&cluster.url(), token.as_deref())
            .await
            .unwrap();
        let mut tc = Self {
            cluster,
            client,
            _dir: dir,
        };
        tc.wait_for_workers(workers).await;
        tc
    }

    /// Waits until exactly `n` workers are connected.
    pub async fn wait_for_workers(&mut self, n: usize) {
        let client = &mut self.client;
        wait_for(20, &format!("{n} workers to join"), async || {
            client
                .workers()
                .await
                .map(|w| w.len() == n)
                .unwrap_or(false)
        })
        .await;
    }

    /// Uploads a dataset; returns its id.
    pub async fn upload(&mut self, data: &Dataset) -> String {
        self.client
            .upload("test.csv", data.to_csv().into_bytes(), |_| {})
            .await
            .unwrap()
            .dataset_id
    }

    /// Submits a job; returns its id.
    pub async fn submit(&mut self, spec: pb::JobSpec) -> String {
        self.client.submit(spec).await.unwrap().job_id
    }

    /// Follows a job to its end; returns its epochs (as delivered) and final state.
    pub async fn follow(&mut self, job: &str) -> (Vec<pb::EpochMetrics>, pb::JobInfo) {
        follow(&mut self.client, job).await
    }

    /// A job that can never have a checkpoint: queued behind a running job that never ends,
    /// cancelled while still queued (the blocker is cancelled too). Returns its id.
    pub async fn job_without_checkpoint(&mut self, dataset: &str) -> String {
        let endless = pb::JobSpec {
            max_epochs: 1_000_000,
            patience: 1_000_000,
            ..spec(dataset, 99)
        };
        let blocker = self.submit(endless.clone()).await;
        let queued = self.submit(endless).await;
        let cancelled = self.client.cancel(&queued).await.unwrap();
        assert_eq!(cancelled.epochs, 0, "the queued job must not have run");
        self.client.cancel(&blocker).await.unwrap();
        queued
    }

    /// Stops everything.
    pub async fn shutdown(self) {
        self.cluster.shutdown().await.unwrap();
    }
}

/// A spec for the tutorial's model on `dataset`, Adam, with the given seed.
pub fn spec(dataset: &str, seed: u64) -> pb::JobSpec {
    pb::JobSpec {
        name: "test".into(),
        dataset_id: dataset.to_string(),
        seed,
        ..Default::default()
    }
}

/// Polls `condition` every 10 ms until it holds; panics naming `what` after `secs` seconds.
pub async fn wait_for(secs: u64, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let waited = tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            tick.tick().await;
            if condition().await {
                return;
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out after {secs} s waiting for {what}"
    );
}

/// A child process that is killed and reaped when dropped, so a failing test leaves nothing
/// running.
#[derive(Debug)]
pub struct Process(pub std::process::Child);

impl std::ops::Deref for Process {
    type Target = std::process::Child;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /metrics` from a coordinator over plain HTTP/1.1; returns the body.
pub async fn scrape_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: recur\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// The value of an unlabelled metric in a Prometheus text exposition.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// Generates `rows` rows of the tutorial's ball data with `seed` and uploads them; returns the
/// dataset id.
pub async fn upload_ball(client: &mut Client, rows: usize, seed: u64) -> String {
    let data = recur_core::data::BallConfig {
        rows,
        ..recur_core::data::BallConfig::tutorial(seed)
    }
    .generate()
    .unwrap();
    client
        .upload("ball.csv", data.to_csv().into_bytes(), |_| {})
        .await
        .unwrap()
        .dataset_id
}

/// Follows a job to its end; returns its epochs (as delivered) and final state.
pub async fn follow(client: &mut Client, job: &str) -> (Vec<pb::EpochMetrics>, pb::JobInfo) {
    let mut stream = client.watch(job).await.unwrap();
    let mut epochs = Vec::new();
    let mut last = None;
    tokio::time::timeout(Duration::from_secs(600), async {
        while let Some(msg) = stream.message().await.unwrap() {
            match msg.event {
                Some(pb::watch_job_response::Event::Epoch(e)) => epochs.push(e),
                Some(pb::watch_job_response::Event::Job(j)) => last = Some(j),
                None => {}
            }
        }
    })
    .await
    .expect("job did not finish in time");
    (epochs, last.expect("no job state received"))
}

/// The state of a job as an enum.
pub fn state(info: &pb::JobInfo) -> pb::JobState {
    pb::JobState::try_from(info.state).unwrap_or(pb::JobState::Unspecified)
}

/// Checks the steps a job stored (`recur`'s `GetSteps`) against what its spec implies: numbered
/// 1, 2, 3… with none missing or repeated; `epochs` epochs; every step of exactly `batch` rows
/// except each epoch's last (the remainder); and every epoch used every training row of the
/// dataset (`rows` rows, split with `seed`, 60/20/20) exactly once, by the row digests.
pub fn check_steps(steps: &[pb::StepRecord], rows: usize, seed: u64, batch: usize, epochs: u64) {
    let train = recur_core::data::Split::new(rows, seed, Default::default())
        .unwrap()
        .train;
    let per_epoch = train.len().div_ceil(batch);
    assert_eq!(
        steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (1..=epochs * per_epoch as u64).collect::<Vec<_>>(),
        "every step once, in order"
    );
    let whole = recur_core::data::rows_digest(&train);
    for (k, chunk) in steps.chunks(per_epoch).enumerate() {
        let epoch = k as u64 + 1;
        let mut digest = 0u64;
        for (i, s) in chunk.iter().enumerate() {
            assert_eq!(s.epoch, epoch, "step {} is in the wrong epoch", s.step);
            let expected = if i + 1 < per_epoch {
                batch
            } else {
                train.len() - batch * (per_epoch - 1)
            };
            assert_eq!(
                s.samples, expected as u64,
                "step {} of epoch {epoch} did not use its global batch",
                s.step
            );
            digest = digest.wrapping_add(s.rows_digest);
        }
        assert_eq!(
            digest, whole,
            "epoch {epoch} did not use every training row exactly once"
        );
    }
}

/// The seed of a soak test's random moments: `RECUR_SOAK_SEED` to replay a failure, else a new
/// one. It is printed (shown with the output of a failing test) so a failure can be replayed.
#[allow(
    clippy::print_stderr,
    reason = "the seed must reach whoever reads a failing test's output"
)]
pub fn soak_seed() -> u64 {
    let seed = std::env::var("RECUR_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("soak seed {seed} (replay with RECUR_SOAK_SEED={seed})");
    seed
}

/// Checks a `-h` text: every long flag but `--help` and `--version` names the environment
/// variable that can set it (`[env: RECUR_…]`, on the flag's line or the description under it).
/// Returns how many flags were checked.
pub fn assert_every_flag_has_env(help: &str) -> usize {
    let mut checked = 0;
    for (flag, block) in flag_blocks(help) {
        if flag == "--help" || flag == "--version" {
            continue;
        }
        assert!(
            block.contains("[env: RECUR_"),
            "{flag} has no environment variable: {block}"
        );
        checked += 1;
    }
    checked
}

/// Each option of a clap help text with the lines that describe it.
fn flag_blocks(help: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') {
            let flag = trimmed
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .unwrap_or(trimmed)
                .trim_end_matches(',')
                .to_string();
            blocks.push((flag, trimmed.to_string()));
        } else if let Some((_, block)) = blocks.last_mut()
            && !trimmed.is_empty()
            && line.starts_with(' ')
        {
            block.push(' ');
            block.push_str(trimmed);
        }
    }
    blocks
}

/// The metric names (`recur_*`, `process_*`) in the queries of a Grafana dashboard.
pub fn dashboard_metrics(dashboard: &serde_json::Value) -> std::collections::BTreeSet<String> {
    fn exprs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    exprs(dashboard, &mut found);
    found
        .iter()
        .flat_map(|e| e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')))
        .filter(|w| w.starts_with("recur_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// The value of metric `name` whose labels are exactly `labels`, in any order.
pub fn labelled_metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        let mut have: Vec<String> = set.split(',').map(str::to_string).collect();
        have.sort();
        (have == want).then(|| value.trim().parse().ok())?
    })
}

/// A job's best (or `latest`) checkpoint via the public download path: its manifest and its
/// parameters, flat.
pub async fn checkpoint(
    client: &mut Client,
    job: &str,
    latest: bool,
) -> (recur_core::checkpoint::Manifest, Vec<f32>) {
    let (manifest, bytes) = client.checkpoint(job, latest).await.unwrap();
    let manifest: recur_core::checkpoint::Manifest = serde_json::from_str(&manifest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let params =
        recur_core::checkpoint::load_state_dict(&path, manifest.model, &candle_core::Device::Cpu)
            .unwrap()
            .to_flat()
            .unwrap();
    (manifest, params)
}

/// Asserts two parameter vectors agree to 1e-5 relative (1e-7 absolute near zero).
pub fn assert_params_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1e-2),
            "{what}: parameter {k}: {x} vs {y}"
        );
    }
}
