//! Worker processes that die (`kill -9`) or stop (`SIGSTOP`) in the middle of a job.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use recur_client::Client;
use recur_client::local::LocalCluster;
use recur_coordinator::CoordinatorConfig;
use recur_core::data::BallConfig;
use recur_proto::v1 as pb;
use recur_tests::{Process, check_steps, follow, soak_seed, wait_for};

fn worker(url: &str, name: &str) -> Process {
    Process(
        Command::new(env!("CARGO_BIN_EXE_recur-worker"))
            .args(["--coordinator", url, "--name", name])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn job_spec(dataset: &str, max_epochs: u64) -> pb::JobSpec {
    pb::JobSpec {
        dataset_id: dataset.into(),
        batch_size: Some(50),
        max_epochs,
        patience: 1_000_000,
        seed: 12,
        ..Default::default()
    }
}

const STEPS_PER_EPOCH: usize = 36; // 3,000 rows, 60 % for training, batches of 50

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_ten_worker_kills_at_random_moments_lose_no_step() {
    let data = BallConfig {
        rows: 3000,
        ..BallConfig::tutorial(12)
    }
    .generate()
    .unwrap();
    let csv = data.to_csv().into_bytes();

    // The same job without faults, on in-process workers.
    let base_dir = tempfile::tempdir().unwrap();
    let baseline = LocalCluster::start("127.0.0.1:0", CoordinatorConfig::new(base_dir.path()), 3)
        .await
        .unwrap();
    let mut client = Client::connect(&baseline.url(), None).await.unwrap();
    wait_for(20, "3 workers", async || {
        client.workers().await.unwrap().len() == 3
    })
    .await;
    let dataset = client
        .upload("b.csv", csv.clone(), |_| {})
        .await
        .unwrap()
        .dataset_id;
    let id = client.submit(job_spec(&dataset, 150)).await.unwrap().job_id;
    let (_, reference) = follow(&mut client, &id).await;
    baseline.shutdown().await.unwrap();

    // The same job while worker processes are killed three times.
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start("127.0.0.1:0", CoordinatorConfig::new(dir.path()), 0)
        .await
        .unwrap();
    let url = cluster.url();
    let mut workers: Vec<Process> = (0..3).map(|i| worker(&url, &format!("p{i}"))).collect();
    let mut client = Client::connect(&url, None).await.unwrap();
    wait_for(30, "3 worker processes", async || {
        client.workers().await.unwrap().len() == 3
    })
    .await;
    let dataset = client
        .upload("b.csv", csv, |_| {})
        .await
        .unwrap()
        .dataset_id;
    let id = client.submit(job_spec(&dataset, 150)).await.unwrap().job_id;
    // Ten kills at random moments: ten different epochs, a random delay into the epoch (up to
    // the last epoch's length), a random victim among three joined workers.
    let seed = soak_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut at: Vec<u64> = rand::seq::index::sample(&mut rng, 137, 10)
        .into_iter()
        .map(|e| e as u64 + 3)
        .collect();
    at.sort_unstable();
    for (k, epoch) in at.into_iter().enumerate() {
        let mut epoch_ms = 1;
        wait_for(120, &format!("epoch {epoch} with 3 workers"), async || {
            let info = client.job(&id).await.unwrap();
            epoch_ms = info
                .last_epoch
                .map_or(1, |e| ((e.seconds * 1e3) as u64).max(1));
            info.epochs >= epoch && client.workers().await.unwrap().len() == 3
        })
        .await;
        // Not synchronisation: where in the epoch the fault lands.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..epoch_ms))).await;
        let mut victim = workers.remove(rng.random_range(0..workers.len()));
        victim.kill().unwrap();
        victim.wait().unwrap();
        let info = client.job(&id).await.unwrap();
        assert_eq!(
            pb::JobState::try_from(info.state),
            Ok(pb::JobState::Running),
            "seed {seed}: kill {k} came after the job ended"
        );
        workers.push(worker(&url, &format!("replacement{k}")));
    }
    let (epochs, info) = follow(&mut client, &id).await;
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let steps = client.steps(&id).await.unwrap();
    cluster.shutdown().await.unwrap();

    assert_eq!(
        pb::JobState::try_from(info.state),
        Ok(pb::JobState::Completed),
        "seed {seed}: {}",
        info.message
    );
    assert_eq!(
        epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        (1..=150).collect::<Vec<_>>(),
        "seed {seed}"
    );
    check_steps(&steps, 3000, 12, 50, 150);
    let (test, reference_test) = (
        info.test.unwrap().accuracy,
        reference.test.unwrap().accuracy,
    );
    assert!(
        reference_test > 0.5,
        "the reference run should have learned: {reference_test}"
    );
    assert!(
        (test - reference_test).abs() <= 0.005,
        "test accuracy {test} vs {reference_test} without faults"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_is_dropped_and_rejoins_after_sigcont() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CoordinatorConfig::new(dir.path());
    config.heartbeat_timeout = Duration::from_secs(1);
    let cluster = LocalCluster::start("127.0.0.1:0", config, 0).await.unwrap();
    let url = cluster.url();
    let mut workers: Vec<Process> = (0..2).map(|i| worker(&url, &format!("s{i}"))).collect();
    let mut client = Client::connect(&url, None).await.unwrap();
    wait_for(30, "2 worker processes", async || {
        client.workers().await.unwrap().len() == 2
    })
    .await;
    let dataset = recur_tests::upload_ball(&mut client, 3000, 13).await;
    let id = client
        .submit(job_spec(&dataset, 1_000_000))
        .await
        .unwrap()
        .job_id;
    let mut events = client.watch(&id).await.unwrap();
    let mut next_epoch = async || loop {
        if let Some(pb::watch_job_response::Event::Epoch(e)) =
            events.message().await.unwrap().unwrap().event
        {
            return e;
        }
    };
    assert_eq!(next_epoch().await.workers, 2);

    signal(&workers[1], "-STOP");
    wait_for(20, "the stopped worker to be dropped", async || {
        client.workers().await.unwrap().len() == 1
    })
    .await;
    // Training goes on without it.
    let mut with_one = None;
    for _ in 0..1000 {
        let e = next_epoch().await;
        if e.workers == 1 {
            with_one = Some(e.epoch);
            break;
        }
    }
    assert!(with_one.is_some(), "no epoch ran on the survivor alone");

    signal(&workers[1], "-CONT");
    wait_for(30, "the worker to rejoin", async || {
        client.workers().await.unwrap().len() == 2
    })
    .await;
    let mut rejoined = false;
    for _ in 0..1000 {
        if next_epoch().await.workers == 2 {
            rejoined = true;
            break;
        }
    }
    assert!(rejoined, "the rejoined worker never got a shard");
    let info = client.cancel(&id).await.unwrap();
    assert_eq!(
        pb::JobState::try_from(info.state),
        Ok(pb::JobState::Cancelled)
    );
    // The steps of every recorded epoch are stored (the cancelled epoch's are not).
    let steps = client.steps(&id).await.unwrap();
    assert_eq!(
        steps.len() % STEPS_PER_EPOCH,
        0,
        "only whole epochs are stored"
    );
    check_steps(&steps, 3000, 12, 50, (steps.len() / STEPS_PER_EPOCH) as u64);
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_worker_process_gracefully_with_a_goodbye() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CoordinatorConfig::new(dir.path());
    // Far longer than the test waits: the worker's leaving is seen from its Goodbye.
    config.heartbeat_timeout = Duration::from_secs(120);
    let cluster = LocalCluster::start("127.0.0.1:0", config, 0).await.unwrap();
    let url = cluster.url();
    let mut w = worker(&url, "term");
    let mut client = Client::connect(&url, None).await.unwrap();
    wait_for(30, "the worker to join", async || {
        client.workers().await.unwrap().len() == 1
    })
    .await;
    signal(&w, "-TERM");
    let status = tokio::task::spawn_blocking(move || w.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
    wait_for(10, "the coordinator to see the worker leave", async || {
        client.workers().await.unwrap().is_empty()
    })
    .await;
    cluster.shutdown().await.unwrap();
}

#[test]
fn every_worker_flag_can_be_set_from_the_environment_and_an_empty_token_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_recur-worker"))
        .arg("-h")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(recur_tests::assert_every_flag_has_env(&help) >= 9, "{help}");
    let out = Command::new(env!("CARGO_BIN_EXE_recur-worker"))
        .env("RECUR_WORKER_TOKEN", "")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--token") && err.contains("empty"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_its_own_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start("127.0.0.1:0", CoordinatorConfig::new(dir.path()), 0)
        .await
        .unwrap();
    let url = cluster.url();
    let mut child = Command::new(env!("CARGO_BIN_EXE_recur-worker"))
        .args([
            "--coordinator",
            &url,
            "--name",
            "m",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader keeps draining the log, so the worker never blocks on a full pipe.
    let stderr = child.stderr.take().unwrap();
    let _w = Process(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("metrics served over HTTP addr=").nth(1) {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
    });
    let addr: std::net::SocketAddr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the worker logs its metrics address")
        .parse()
        .unwrap();
    let mut client = Client::connect(&url, None).await.unwrap();
    wait_for(30, "the worker to join", async || {
        client.workers().await.unwrap().len() == 1
    })
    .await;
    let dataset = recur_tests::upload_ball(&mut client, 3000, 12).await;
    let job = client.submit(job_spec(&dataset, 2)).await.unwrap().job_id;
    let (_, info) = follow(&mut client, &job).await;
    assert_eq!(info.epochs, 2, "{}", info.message);
    let body = recur_tests::scrape_metrics(addr).await;
    let metric = |name: &str, labels: &[(&str, &str)]| {
        let worker = [("device", "cpu"), ("name", "m")];
        recur_tests::labelled_metric(&body, name, &[labels, &worker].concat())
    };
    assert_eq!(metric("recur_worker_joined", &[]), Some(1.0), "{body}");
    // One worker computed every training row of both epochs: 60 % of 3,000, twice.
    assert_eq!(
        metric("recur_worker_rows_total", &[]),
        Some(3600.0),
        "{body}"
    );
    assert_eq!(
        metric(
            "recur_worker_commands_total",
            &[("kind", "step"), ("outcome", "ok")]
        ),
        Some(info.steps as f64),
        "{body}"
    );
    let evaluations = metric(
        "recur_worker_commands_total",
        &[("kind", "evaluate"), ("outcome", "ok")],
    );
    assert!(evaluations.is_some_and(|n| n > 0.0), "{body}");
    assert_eq!(
        metric(
            "recur_worker_command_seconds_count",
            &[("kind", "evaluate")]
        ),
        evaluations,
        "{body}"
    );
    assert!(
        !body.contains("recur_worker_device_memory_bytes{"),
        "no device memory on the CPU: {body}"
    );
    assert!(
        recur_tests::metric(&body, "process_resident_memory_bytes").is_some_and(|b| b > 0.0),
        "{body}"
    );
    cluster.shutdown().await.unwrap();
}
