//! The coordinator killed (`kill -9`) mid-job and restarted on the same data directory: the job
//! resumes from its latest checkpoint, workers reconnect by themselves, the history stays
//! continuous, and a damaged checkpoint falls back to the one before it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use recur_client::Client;
use recur_proto::v1 as pb;
use recur_tests::{Process, follow, wait_for};
use recur_worker::WorkerConfig;

/// A coordinator process: `recur local --workers 0` serves a real coordinator and no workers.
fn coordinator(data_dir: &Path, port: u16) -> Process {
    Process(
        Command::new(env!("CARGO_BIN_EXE_recur"))
            .args([
                "local",
                "--workers",
                "0",
                "--listen",
                &format!("127.0.0.1:{port}"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinator_resumes_its_job_from_the_latest_checkpoint() {
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
    let spec = pb::JobSpec {
        dataset_id: dataset,
        batch_size: Some(50),
        max_epochs: 24,
        patience: 1_000_000,
        seed: 21,
        ..Default::default()
    };
    let job = client.submit(spec).await.unwrap().job_id;
    let job_dir = dir.path().join("jobs").join(&job);

    for (round, kill_after) in [4u64, 10, 16].into_iter().enumerate() {
        wait_for(120, &format!("epoch {kill_after}"), async || {
            epochs_done(&mut client, &job).await >= kill_after
        })
        .await;
        process.kill().unwrap();
        process.wait().unwrap();
        if round == 1 {
            // A damaged file found at start-up: the previous checkpoint is used instead.
            std::fs::write(job_dir.join("latest.safetensors"), b"not a checkpoint").unwrap();
        }
        process = coordinator(dir.path(), port);
        client = connect(&url).await;
        let resumed = client.job(&job).await.unwrap();
        assert!(
            resumed.epochs >= kill_after.saturating_sub(2),
            "round {round}: resumed at epoch {} (killed after {kill_after})",
            resumed.epochs
        );
        assert!(resumed.epochs > 1, "round {round}: started over");
    }

    let (history, info) = follow(&mut client, &job).await;
    let epochs: Vec<u64> = history.iter().map(|e| e.epoch).collect();
    assert_eq!(
        pb::JobState::try_from(info.state),
        Ok(pb::JobState::Completed),
        "{}",
        info.message
    );
    assert_eq!(
        epochs,
        (1..=24).collect::<Vec<_>>(),
        "the history is continuous"
    );
    let log: Vec<u64> = std::fs::read_to_string(job_dir.join("steps.log"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(
        log,
        (1..=24 * 36).collect::<Vec<u64>>(),
        "every step counted once"
    );
    assert!(info.test.unwrap().accuracy > 0.0);

    let _ = stop.send(true);
    for w in workers {
        let _ = w.await;
    }
    process.kill().unwrap();
    process.wait().unwrap();
}
