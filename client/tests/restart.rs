//! The coordinator killed (`kill -9`) mid-job and restarted on the same data directory, again and
//! again at random moments: the job resumes from its latest checkpoint set, workers reconnect by
//! themselves, the history and the steps stay continuous, a damaged set falls back to the one
//! before it (and says so), and a kill after the last checkpoint finishes the job without
//! training more.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use recur_client::Client;
use recur_client::local::LocalCluster;
use recur_coordinator::CoordinatorConfig;
use recur_proto::v1 as pb;
use recur_tests::{Process, check_steps, follow, soak_seed, wait_for};
use recur_worker::WorkerConfig;

/// A coordinator process: `recur local --workers 0` serves a real coordinator and no workers;
/// `write_delay_ms` makes every store and checkpoint write that much slower (a test hook).
fn coordinator(data_dir: &Path, port: u16) -> Process {
    coordinator_with(data_dir, port, 0)
}

fn coordinator_with(data_dir: &Path, port: u16, write_delay_ms: u64) -> Process {
    Process(
        Command::new(env!("CARGO_BIN_EXE_recur"))
            .args([
                "local",
                "--workers",
                "0",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--test-write-delay-ms",
                &write_delay_ms.to_string(),
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn connect(url: &str) -> Client {
    let mut client = None;
    wait_for(30, "the coordinator to listen", async || {
        client = Client::connect(url, None).await.ok();
        client.is_some()
    })
    .await;
    client.unwrap()
}

async fn epochs_done(client: &mut Client, job: &str) -> u64 {
    client.job(job).await.map(|j| j.epochs).unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The set a job's `latest` pointer names.
fn latest_set(job_dir: &Path) -> Option<String> {
    std::fs::read_to_string(job_dir.join("latest"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The job's state and epochs as stored, read while no coordinator runs.
fn stored_job(data_dir: &Path, job: &str) -> (recur_coordinator::scheduler::JobState, u64) {
    let store = recur_coordinator::store::Store::open(&data_dir.join("jobs.redb")).unwrap();
    let record = store
        .job(&recur_coordinator::ids::JobId(job.to_string()))
        .unwrap()
        .unwrap();
    (record.state, record.epochs)
}

const EPOCHS: u64 = 40;

fn spec(dataset: String) -> pb::JobSpec {
    pb::JobSpec {
        dataset_id: dataset,
        batch_size: Some(50),
        max_epochs: EPOCHS,
        patience: 1_000_000,
        seed: 21,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_a_coordinator_killed_eleven_times_completes_its_job_exactly() {
    let seed = soak_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // The same job without faults.
    let reference = {
        let dir = tempfile::tempdir().unwrap();
        let cluster = LocalCluster::start("127.0.0.1:0", CoordinatorConfig::new(dir.path()), 2)
            .await
            .unwrap();
        let mut client = connect(&cluster.url()).await;
        wait_for(20, "2 workers", async || {
            client.workers().await.unwrap().len() == 2
        })
        .await;
        let dataset = recur_tests::upload_ball(&mut client, 3000, 21).await;
        let job = client.submit(spec(dataset)).await.unwrap().job_id;
        let (_, info) = follow(&mut client, &job).await;
        cluster.shutdown().await.unwrap();
        info.test.unwrap().accuracy
    };

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut process = coordinator(dir.path(), port);
    let mut client = connect(&url).await;

    // Two in-process workers that reconnect quickly.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let mut config = WorkerConfig::new(url.clone(), format!("w{i}"));
            config.min_backoff = Duration::from_millis(20);
            config.max_backoff = Duration::from_millis(200);
            let mut stopped = stopped.clone();
            tokio::spawn(recur_worker::run(config, async move {
                let _ = stopped.wait_for(|s| *s).await;
            }))
        })
        .collect();

    let dataset = recur_tests::upload_ball(&mut client, 3000, 21).await;
    let job = client.submit(spec(dataset)).await.unwrap().job_id;
    let job_dir = dir.path().join("jobs").join(&job);

    // Ten kills at random moments: a random epoch, a random delay into it. At least 15 epochs
    // are left after the last, so no kill comes after the job ended however fast epochs run.
    let mut at: Vec<u64> = (0..10).map(|_| rng.random_range(5..EPOCHS - 15)).collect();
    at.sort_unstable();
    for (round, kill_after) in at.into_iter().enumerate() {
        wait_for(120, &format!("epoch {kill_after}"), async || {
            epochs_done(&mut client, &job).await >= kill_after
        })
        .await;
        // Not synchronisation: where in the epoch the kill lands.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        process.kill().unwrap();
        process.wait().unwrap();
        assert_eq!(
            stored_job(dir.path(), &job).0,
            recur_coordinator::scheduler::JobState::Running,
            "seed {seed} round {round}: the kill came after the job ended"
        );
        let damaged = if round == 3 {
            // A damaged set found at start-up: the one before it is used, and the job says so.
            let set = latest_set(&job_dir).expect("a latest set");
            std::fs::write(
                job_dir.join("sets").join(&set).join("model.safetensors"),
                b"not a checkpoint",
            )
            .unwrap();
            Some(set)
        } else {
            None
        };
        process = coordinator(dir.path(), port);
        client = connect(&url).await;
        let resumed = client.job(&job).await.unwrap();
        // The record may lead the checkpoint by an epoch, and a damaged set costs one more.
        let slack = if damaged.is_some() { 3 } else { 2 };
        assert!(
            resumed.epochs >= kill_after - slack,
            "seed {seed} round {round}: resumed at epoch {} (killed after {kill_after})",
            resumed.epochs
        );
        if let Some(set) = damaged {
            assert!(
                resumed.warnings.iter().any(|w| w.contains(&set)),
                "seed {seed}: the damaged set {set} is not reported: {:?}",
                resumed.warnings
            );
        }
    }

    // The eleventh kill lands after the last epoch's checkpoint and before the job is marked
    // completed: a slow disk (the test hook) holds that window open (the best and completion
    // writes still to come take 2 x 300 ms). Only the last epochs run on the slow disk.
    wait_for(120, &format!("epoch {}", EPOCHS - 10), async || {
        epochs_done(&mut client, &job).await >= EPOCHS - 10
    })
    .await;
    process.kill().unwrap();
    process.wait().unwrap();
    assert_eq!(
        stored_job(dir.path(), &job).0,
        recur_coordinator::scheduler::JobState::Running,
        "seed {seed}: the job ended before the slow-disk round"
    );
    process = coordinator_with(dir.path(), port, 300);
    let last = format!("-e{EPOCHS}-");
    wait_for(120, "the last epoch's checkpoint", async || {
        latest_set(&job_dir).is_some_and(|s| s.contains(&last))
    })
    .await;
    process.kill().unwrap();
    process.wait().unwrap();
    assert_eq!(
        stored_job(dir.path(), &job),
        (recur_coordinator::scheduler::JobState::Running, EPOCHS),
        "seed {seed}: the kill must land between the last checkpoint and completion"
    );
    process = coordinator(dir.path(), port);
    client = connect(&url).await;

    let (history, info) = follow(&mut client, &job).await;
    let epochs: Vec<u64> = history.iter().map(|e| e.epoch).collect();
    assert_eq!(
        pb::JobState::try_from(info.state),
        Ok(pb::JobState::Completed),
        "seed {seed}: {}",
        info.message
    );
    assert_eq!(
        epochs,
        (1..=EPOCHS).collect::<Vec<_>>(),
        "seed {seed}: every epoch once"
    );
    assert_eq!(
        info.epochs, EPOCHS,
        "seed {seed}: trained past the last epoch"
    );
    check_steps(&client.steps(&job).await.unwrap(), 3000, 21, 50, EPOCHS);
    let test = info.test.unwrap().accuracy;
    assert!(
        reference > 0.5,
        "the reference run should have learned: {reference}"
    );
    assert!(
        (test - reference).abs() <= 0.005,
        "seed {seed}: test accuracy {test} vs {reference} without faults"
    );

    let _ = stop.send(true);
    for w in workers {
        let _ = w.await;
    }
    process.kill().unwrap();
    process.wait().unwrap();
}
