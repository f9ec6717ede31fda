//! `recur bench`: the data plane measured end to end. It starts the real `recur-coordinator` and
//! N `recur-worker` processes (one compute thread each) on loopback, trains a workload for a few
//! epochs, and prints throughput, the step time split (compute / wait / reduce / optimizer) and
//! the scaling efficiency against one worker; with `--predict` it also measures `Predict`
//! (batched throughput, and latency of single histories at a fixed request rate). With
//! `--latency-ms` every worker's connection goes through a proxy in this process that delays
//! each direction by that much, standing in for a network link.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use recur_core::data::{BallConfig, Dataset};
use recur_proto::v1 as pb;
use serde_json::json;

use super::args::{BenchArgs, BenchWorkload};
use super::error::{CliError, Result};
use crate::Client;

/// The longest one run may take.
const RUN_LIMIT: Duration = Duration::from_secs(1800);

/// A child process killed and reaped when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one workload trains.
struct Workload {
    name: &'static str,
    data: Dataset,
    spec: pb::JobSpec,
}

impl Workload {
    fn new(which: BenchWorkload, epochs: u64) -> Result<Self> {
        let (name, config, kind, hidden, batch) = match which {
            BenchWorkload::Tutorial => (
                "tutorial",
                BallConfig::tutorial(0),
                pb::ModelKind::RnnTanh,
                8,
                100,
            ),
            BenchWorkload::W2 => ("W2", BallConfig::w2(0), pb::ModelKind::Lstm, 128, 256),
        };
        let data = config
            .generate()
            .map_err(|e| CliError::new(e.to_string(), ""))?;
        let spec = pb::JobSpec {
            name: format!("bench-{name}"),
            model: Some(pb::ModelConfig {
                kind: kind as i32,
                input_size: 1,
                hidden_size: hidden,
                num_layers: 1,
                bidirectional: false,
                output_size: 1,
                head: Default::default(),
            }),
            optimizer: Some(pb::OptimizerSpec {
                kind: pb::optimizer_spec::Kind::Sgd as i32,
                lr: Some(0.1),
                ..Default::default()
            }),
            batch_size: Some(batch),
            max_epochs: epochs,
            patience: epochs,
            checkpoint_every: u32::try_from(epochs).unwrap_or(u32::MAX),
            ..Default::default()
        };
        Ok(Self { name, data, spec })
    }
}

/// Per-step figures of one run, averaged over the measured epochs.
#[derive(Debug, Clone, Copy, Default)]
struct RunFigures {
    samples_per_sec: f64,
    step_ms: f64,
    compute_ms: f64,
    wait_ms: f64,
    reduce_ms: f64,
    optimizer_ms: f64,
    val_accuracy: f64,
}

impl RunFigures {
    /// Everything in a step but the compute.
    fn coordination_ms(&self) -> f64 {
        self.wait_ms + self.reduce_ms + self.optimizer_ms
    }

    /// Averages the epochs after the first (warm-up, and the one in which speeds are learned).
    fn of(epochs: &[pb::EpochMetrics]) -> Self {
        let measured = if epochs.len() > 1 {
            &epochs[1..]
        } else {
            epochs
        };
        let n = measured.len().max(1) as f64;
        let mut f = Self::default();
        for e in measured {
            let t = e.timing.unwrap_or_default();
            f.samples_per_sec += e.samples_per_sec / n;
            f.step_ms += t.total_ms / n;
            f.compute_ms += t.compute_ms / n;
            f.wait_ms += t.wait_ms / n;
            f.reduce_ms += t.reduce_ms / n;
            f.optimizer_ms += t.optimizer_ms / n;
        }
        f.val_accuracy = epochs
            .last()
            .and_then(|e| e.validation)
            .map_or(0.0, |m| m.accuracy);
        f
    }
}

/// Figures of `Predict`.
#[derive(Debug, Clone, Copy, Default)]
struct PredictFigures {
    batch_histories_per_sec: f64,
    single_rate: f64,
    single_p50_ms: f64,
    single_p99_ms: f64,
    single_max_ms: f64,
}

pub(super) async fn run(mut args: BenchArgs, as_json: bool) -> Result<()> {
    if !(0.0..=1000.0).contains(&args.latency_ms) {
        return Err(CliError::new(
            format!("--latency-ms {} is out of range", args.latency_ms),
            "give 0 to 1000 ms",
        ));
    }
    // One worker first: it is the reference for the scaling of the others.
    args.workers.sort_unstable();
    args.workers.dedup();
    if args.workers.first() == Some(&0) {
        return Err(CliError::new("--workers must be at least 1", ""));
    }
    let bins = binaries(args.bin_dir.as_deref())?;
    let dir = tempfile::tempdir()?;
    match measure(&args, &bins, dir.path(), as_json).await {
        Ok(()) => Ok(()),
        Err(mut e) => {
            let kept = dir.keep();
            e.hint = format!("the processes' logs are in {}", kept.display());
            Err(e)
        }
    }
}

async fn measure(
    args: &BenchArgs,
    bins: &(PathBuf, PathBuf),
    dir: &Path,
    as_json: bool,
) -> Result<()> {
    let mut rows = Vec::new();
    if !as_json {
        println!(
            "recur bench: real coordinator and worker processes on loopback, 1 compute thread a worker{}",
            if args.latency_ms > 0.0 {
                format!(
                    ", {} ms added each way between workers and coordinator",
                    args.latency_ms
                )
            } else {
                String::new()
            }
        );
        println!(
            "{:<9} {:>7} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "workload",
            "workers",
            "samples/s",
            "step ms",
            "compute",
            "wait",
            "reduce",
            "optimizer",
            "coord ms",
            "scaling"
        );
    }
    for &which in &args.workloads {
        let workload = Workload::new(which, args.epochs)?;
        let mut single: Option<RunFigures> = None;
        for &n in &args.workers {
            let want_predict = args.predict && which == BenchWorkload::Tutorial && n == 1;
            let (figures, predict) =
                run_one(bins, dir, &workload, n, args.latency_ms, want_predict).await?;
            if n == 1 {
                single = Some(figures);
            }
            let scaling = single
                .filter(|s| s.samples_per_sec > 0.0)
                .map(|s| figures.samples_per_sec / (n as f64 * s.samples_per_sec));
            if as_json {
                rows.push(json!({
                    "workload": workload.name,
                    "workers": n,
                    "latency_ms": args.latency_ms,
                    "samples_per_sec": figures.samples_per_sec,
                    "step_ms": figures.step_ms,
                    "compute_ms": figures.compute_ms,
                    "wait_ms": figures.wait_ms,
                    "reduce_ms": figures.reduce_ms,
                    "optimizer_ms": figures.optimizer_ms,
                    "coordination_ms": figures.coordination_ms(),
                    "scaling": scaling,
                    "validation_accuracy": figures.val_accuracy,
                }));
            } else {
                println!(
                    "{:<9} {:>7} {:>11.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8}",
                    workload.name,
                    n,
                    figures.samples_per_sec,
                    figures.step_ms,
                    figures.compute_ms,
                    figures.wait_ms,
                    figures.reduce_ms,
                    figures.optimizer_ms,
                    figures.coordination_ms(),
                    scaling.map_or("-".to_string(), |s| format!("{:.1}%", s * 100.0)),
                );
            }
            if let Some(p) = predict {
                if as_json {
                    rows.push(json!({
                        "predict": {
                            "batch_of_1000_histories_per_sec": p.batch_histories_per_sec,
                            "single_requests_per_sec": p.single_rate,
                            "single_p50_ms": p.single_p50_ms,
                            "single_p99_ms": p.single_p99_ms,
                            "single_max_ms": p.single_max_ms,
                        }
                    }));
                } else {
                    println!(
                        "predict: {:.0} histories/s in batches of 1000; single histories at {:.0} requests/s: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                        p.batch_histories_per_sec,
                        p.single_rate,
                        p.single_p50_ms,
                        p.single_p99_ms,
                        p.single_max_ms
                    );
                }
            }
        }
    }
    if as_json {
        println!("{}", serde_json::Value::Array(rows));
    }
    Ok(())
}

/// The coordinator and worker binaries: in `dir`, or beside this executable.
fn binaries(dir: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let coordinator = dir.join("recur-coordinator");
    let worker = dir.join("recur-worker");
    for bin in [&coordinator, &worker] {
        if !bin.is_file() {
            return Err(CliError::new(
                format!("{} not found", bin.display()),
                "build all binaries first (`cargo build --release`) or pass --bin-dir",
            ));
        }
    }
    Ok((coordinator, worker))
}

/// A loopback port nobody listens on now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn run_one(
    (coordinator_bin, worker_bin): &(PathBuf, PathBuf),
    dir: &Path,
    workload: &Workload,
    workers: usize,
    latency_ms: f64,
    predict: bool,
) -> Result<(RunFigures, Option<PredictFigures>)> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let data_dir = dir.join(format!("{}-{workers}", workload.name));
    let log = std::fs::File::create(dir.join(format!("{}-{workers}.log", workload.name)))?;
    let _coordinator = Process(
        Command::new(coordinator_bin)
            .args(["--listen", &addr.to_string(), "--data-dir"])
            .arg(&data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    let url = format!("http://{addr}");
    let mut client = connect_within(&url, Duration::from_secs(30)).await?;
    let mut procs = Vec::new();
    let mut proxies = Vec::new();
    for i in 0..workers {
        let target = if latency_ms > 0.0 {
            let proxy = DelayProxy::start(addr, Duration::from_secs_f64(latency_ms / 1e3)).await?;
            let url = format!("http://{}", proxy.addr);
            proxies.push(proxy);
            url
        } else {
            url.clone()
        };
        let log = std::fs::File::create(dir.join(format!(
            "{}-{workers}-worker-{}.log",
            workload.name,
            i + 1
        )))?;
        procs.push(Process(
            Command::new(worker_bin)
                .args(["--coordinator", &target, "--threads", "1", "--name"])
                .arg(format!("bench-{}", i + 1))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.workers().await?.len() < workers {
        if Instant::now() > deadline {
            return Err(CliError::new(
                format!("{workers} workers did not join within 30 s"),
                "",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let uploaded = client
        .upload(
            &format!("{}.csv", workload.name),
            workload.data.to_csv().into_bytes(),
            |_| {},
        )
        .await?;
    let job = client
        .submit(pb::JobSpec {
            dataset_id: uploaded.dataset_id,
            ..workload.spec.clone()
        })
        .await?
        .job_id;
    let mut stream = client.watch(&job).await?;
    let mut epochs = Vec::new();
    let mut last = None;
    let followed = tokio::time::timeout(RUN_LIMIT, async {
        while let Some(msg) = stream.message().await.map_err(crate::ClientError::from)? {
            match msg.event {
                Some(pb::watch_job_response::Event::Epoch(e)) => epochs.push(e),
                Some(pb::watch_job_response::Event::Job(j)) => last = Some(j),
                None => {}
            }
        }
        Ok::<_, CliError>(())
    })
    .await;
    match followed {
        Ok(result) => result?,
        Err(_) => {
            return Err(CliError::new(
                format!(
                    "the {} run with {workers} workers did not finish within {} s",
                    workload.name,
                    RUN_LIMIT.as_secs()
                ),
                "",
            ));
        }
    }
    let info = last.ok_or_else(|| CliError::new("the job's stream ended early", ""))?;
    if info.state != pb::JobState::Completed as i32 {
        return Err(CliError::new(
            format!(
                "the benchmark job ended {}: {}",
                super::json::state_name(info.state),
                info.message
            ),
            "",
        ));
    }
    let figures = RunFigures::of(&epochs);
    let predicted = if predict {
        Some(bench_predict(&client, &job, &workload.data).await?)
    } else {
        None
    };
    drop(procs);
    Ok((figures, predicted))
}

async fn connect_within(url: &str, within: Duration) -> Result<Client> {
    let deadline = Instant::now() + within;
    loop {
        let problem = match Client::connect(url, None).await {
            Ok(mut c) => match c.workers().await {
                Ok(_) => return Ok(c),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(CliError::new(
                format!(
                    "the coordinator at {url} did not answer within {} s: {problem}",
                    within.as_secs()
                ),
                "see its log in the benchmark's temporary directory",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Batched throughput (20 requests of 1,000 histories, one at a time), then single histories
/// sent at 1,000 requests/s for 3 s, each on its own task, latency measured per request.
async fn bench_predict(client: &Client, job: &str, data: &Dataset) -> Result<PredictFigures> {
    let histories: Vec<Vec<f32>> = (0..data.len().min(1000))
        .map(|r| {
            let row = data.row(r);
            row[..row.len() - 1].to_vec()
        })
        .collect();
    let mut c = client.clone();
    c.predict(job, histories.clone()).await?; // load the model
    let start = Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        c.predict(job, histories.clone()).await?;
    }
    let batch_histories_per_sec = (rounds * histories.len()) as f64 / start.elapsed().as_secs_f64();

    let rate = 1000.0;
    let count = 3000;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        ticker.tick().await;
        let mut c = client.clone();
        let job = job.to_string();
        let one = vec![histories[i % histories.len()].clone()];
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            c.predict(&job, one).await.map(|_| t.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for t in tasks {
        let elapsed = t.await.map_err(|e| CliError::new(e.to_string(), ""))??;
        latencies.push(elapsed.as_secs_f64() * 1e3);
    }
    let sent_over = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(PredictFigures {
        batch_histories_per_sec,
        single_rate: count as f64 / sent_over,
        single_p50_ms: at(0.5),
        single_p99_ms: at(0.99),
        single_max_ms: at(1.0),
    })
}

/// A TCP proxy on loopback that delivers every byte `delay` after it arrived, in order, in both
/// directions: a link with that one-way latency (and no bandwidth limit). It runs on plain
/// threads with blocking sockets, whose sleeps are precise to tens of microseconds (an async
/// timer rounds up to the next millisecond).
struct DelayProxy {
    addr: SocketAddr,
}

impl DelayProxy {
    async fn start(target: SocketAddr, delay: Duration) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        // The threads end when their connections close (the processes are killed at the end of
        // the run); the accept loop ends with this process.
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                let Ok(outbound) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                for (from, to) in [(&inbound, &outbound), (&outbound, &inbound)] {
                    let _ = from.set_nodelay(true);
                    if let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) {
                        delayed_copy(from, to, delay);
                    }
                }
            }
        });
        Ok(Self { addr })
    }
}

/// Copies `from` to `to` on two threads: a reader that stamps each chunk with when it is due,
/// and a writer that sleeps until then.
fn delayed_copy(mut from: std::net::TcpStream, mut to: std::net::TcpStream, delay: Duration) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((due, chunk)) = rx.recv() {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}
