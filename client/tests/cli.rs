//! The real `recur` binary against a real embedded cluster.

use std::path::Path;
use std::process::Output;

use assert_cmd::Command;
use candle_core::Device;
use recur_client::local::LocalCluster;
use recur_coordinator::CoordinatorConfig;
use recur_core::checkpoint::load_state_dict;
use recur_core::model::ModelConfig;
use serde_json::Value;

fn recur(coordinator: &str, args: &[&str]) -> Command {
    let mut cmd = Command::cargo_bin("recur").unwrap();
    cmd.env("RECUR_COORDINATOR", coordinator)
        .env_remove("RECUR_CLIENT_TOKEN")
        .args(args);
    cmd
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn failed(output: Output) -> (i32, String) {
    assert!(
        !output.status.success(),
        "expected failure: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Runs a blocking command off the runtime's threads.
async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_cluster_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(
        "127.0.0.1:0",
        CoordinatorConfig::new(dir.path().join("data")),
        2,
    )
    .await
    .unwrap();
    let url = cluster.url();
    let d = dir.path();
    let csv = d.join("ball.csv");

    // gen
    let out = ok(run(recur(
        &url,
        &[
            "gen",
            "ball",
            "--rows",
            "1500",
            "--seed",
            "3",
            "-o",
            csv.to_str().unwrap(),
        ],
    ))
    .await);
    assert!(out.contains("wrote 1500 rows"), "{out}");
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 1500);

    // train to completion, text output
    let trained = run(recur(
        &url,
        &[
            "train",
            csv.to_str().unwrap(),
            "--epochs",
            "4",
            "--seed",
            "3",
        ],
    ))
    .await;
    // Not a terminal: one plain line per epoch on stderr (a job under nohup is never silent).
    let log = String::from_utf8_lossy(&trained.stderr).to_string();
    for e in 1..=4 {
        assert!(log.contains(&format!("epoch {e}/4  loss ")), "{log}");
    }
    assert!(log.contains("best ") && log.contains("patience "), "{log}");
    let out = ok(trained);
    assert!(
        out.contains("completed (max_epochs) after 4 epochs"),
        "{out}"
    );
    assert!(out.contains("test accuracy"), "{out}");
    assert!(out.contains("job id: job-1"), "{out}");

    // workers, jobs, status: text and JSON
    let out = ok(run(recur(&url, &["workers"])).await);
    assert!(out.contains("local-1") && out.contains("local-2"), "{out}");
    let workers = json(&ok(run(recur(&url, &["--json", "workers"])).await));
    assert_eq!(workers.as_array().unwrap().len(), 2);
    // Boolean flags from the environment take 1/true/yes.
    let mut from_env = recur(&url, &["workers"]);
    from_env.env("RECUR_JSON", "1");
    assert_eq!(json(&ok(run(from_env).await)).as_array().unwrap().len(), 2);
    assert_eq!(workers[0]["device"], "cpu");
    let out = ok(run(recur(&url, &["jobs"])).await);
    assert!(out.contains("job-1") && out.contains("completed"), "{out}");
    let jobs = json(&ok(run(recur(&url, &["jobs", "--json"])).await));
    assert_eq!(jobs[0]["id"], "job-1");
    assert_eq!(jobs[0]["state"], "completed");
    let out = ok(run(recur(&url, &["status", "job-1"])).await);
    assert!(
        out.contains("state      completed") && out.contains("test       accuracy"),
        "{out}"
    );
    let status = json(&ok(run(recur(&url, &["--json", "status", "job-1"])).await));
    assert_eq!(status["epochs"], 4);
    assert!(status["test"]["accuracy"].as_f64().is_some());

    // watch a finished job: its epochs (with their total, which the job's state gives after
    // the history), its summary; with --json, one event per line
    let watched = run(recur(&url, &["watch", "job-1"])).await;
    let log = String::from_utf8_lossy(&watched.stderr).to_string();
    assert!(
        log.contains("epoch 1/4  loss ") && log.contains("epoch 4/4  loss "),
        "{log}"
    );
    let out = ok(watched);
    assert!(out.contains("job-1 completed"), "{out}");
    let out = ok(run(recur(&url, &["--json", "watch", "job-1"])).await);
    let events: Vec<Value> = out.lines().map(json).collect();
    let epochs: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "epoch")
        .map(|e| e["epoch"]["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2, 3, 4]);
    assert_eq!(events.last().unwrap()["job"]["state"], "completed");

    // predict: one history, stdin, interactive
    let one = ok(run(recur(&url, &["predict", "job-1", "1,3,5,7"])).await);
    let one: f64 = one.trim().parse().unwrap();
    let mut cmd = recur(&url, &["predict", "job-1", "-"]);
    cmd.write_stdin("1,3,5,7\n\n2,4,6\n");
    let lines = ok(run(cmd).await);
    let values: Vec<f64> = lines.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(values.len(), 2);
    assert!((values[0] - one).abs() < 1e-3);
    let mut cmd = recur(&url, &["predict", "job-1", "--interactive"]);
    cmd.write_stdin("1,3,5,7\nabc\n2,4,6\n");
    let session = ok(run(cmd).await);
    assert_eq!(
        session.matches("History ball locations:").count(),
        4,
        "{session}"
    );
    assert_eq!(
        session.matches("Next ball location:").count(),
        2,
        "{session}"
    );
    assert!(
        session.contains("error: value 1 `abc` is not a number"),
        "{session}"
    );
    let predicted = json(&ok(run(recur(
        &url,
        &["--json", "predict", "job-1", "1,3,5,7"],
    ))
    .await));
    assert_eq!(predicted["predictions"].as_array().unwrap().len(), 1);

    // checkpoint: a file recur-core loads, with its manifest beside it
    let model = d.join("model.safetensors");
    let out = ok(run(recur(
        &url,
        &["checkpoint", "job-1", "-o", model.to_str().unwrap()],
    ))
    .await);
    assert!(out.contains("model.safetensors"), "{out}");
    let params = load_state_dict(&model, ModelConfig::tutorial(), &Device::Cpu).unwrap();
    assert_eq!(params.to_flat().unwrap().len(), 97);
    let manifest = json(&std::fs::read_to_string(d.join("model.json")).unwrap());
    assert_eq!(manifest["model"]["kind"], "rnn_tanh");
    ok(run(recur(
        &url,
        &[
            "checkpoint",
            "job-1",
            "--latest",
            "-o",
            d.join("latest.safetensors").to_str().unwrap(),
        ],
    ))
    .await);
    // A bare file name, as the README shows it: written in the current directory.
    let here = d.join("here");
    std::fs::create_dir(&here).unwrap();
    let mut bare = recur(&url, &["checkpoint", "job-1", "-o", "bare.safetensors"]);
    bare.current_dir(&here);
    ok(run(bare).await);
    load_state_dict(
        &here.join("bare.safetensors"),
        ModelConfig::tutorial(),
        &Device::Cpu,
    )
    .unwrap();
    assert!(here.join("bare.json").exists(), "the manifest beside it");

    // plot: PNG and SVG
    let png = d.join("acc.png");
    let svg = d.join("acc.svg");
    ok(run(recur(&url, &["plot", "job-1", "-o", png.to_str().unwrap()])).await);
    ok(run(recur(&url, &["plot", "job-1", "-o", svg.to_str().unwrap()])).await);
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg_text.starts_with("<svg") && svg_text.contains("validating accuracy"),
        "{}",
        &svg_text[..200.min(svg_text.len())]
    );

    // cancel: a detached long job
    let out = ok(run(recur(
        &url,
        &[
            "train",
            csv.to_str().unwrap(),
            "--epochs",
            "100000",
            "--patience",
            "100000",
            "--detach",
        ],
    ))
    .await);
    assert_eq!(out.trim(), "job-2");
    let cancelled = json(&ok(run(recur(&url, &["--json", "cancel", "job-2"])).await));
    assert_eq!(cancelled["state"], "cancelled");
    let out = ok(run(recur(&url, &["status", "job-2"])).await);
    assert!(out.contains("cancelled"), "{out}");
    // Following a cancelled job exits 3, a completed one 0 (scripts tell them apart).
    let (code, err) = failed(run(recur(&url, &["watch", "job-2"])).await);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("job-2 was cancelled"), "{err}");
    ok(run(recur(&url, &["watch", "job-1"])).await);
    // train --dataset: a dataset already uploaded, no file.
    let first = json(&ok(run(recur(&url, &["--json", "status", "job-1"])).await));
    let dataset = first["dataset_id"].as_str().unwrap().to_string();
    let out = ok(run(recur(
        &url,
        &["train", "--dataset", &dataset, "--epochs", "1", "--detach"],
    ))
    .await);
    assert_eq!(out.trim(), "job-3");
    ok(run(recur(&url, &["watch", "job-3"])).await);
    let (code, err) = failed(run(recur(&url, &["train"])).await);
    assert_eq!(code, 2, "{err}");

    errors(&url, d).await;
    cluster.shutdown().await.unwrap();
}

async fn errors(url: &str, d: &Path) {
    // Unknown job.
    let (code, err) = failed(run(recur(url, &["status", "job-77"])).await);
    assert_eq!(code, 1);
    assert!(
        err.contains("error: no job job-77") && err.contains("hint: `recur jobs`"),
        "{err}"
    );
    // With --json the error is one JSON line.
    let (code, err) = failed(run(recur(url, &["--json", "status", "job-77"])).await);
    assert_eq!(code, 1);
    let err = json(&err);
    assert!(
        err["error"].as_str().unwrap().contains("no job job-77"),
        "{err}"
    );
    assert_eq!(err["exit_code"], 1);
    // An empty token (a deploy file's `${TOKEN:-}`) is refused before anything runs.
    let mut empty = recur(url, &["jobs"]);
    empty.env("RECUR_CLIENT_TOKEN", "");
    let (code, err) = failed(run(empty).await);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--token") && err.contains("empty"), "{err}");
    // Bad CSV: every bad line, as file:line: what.
    let bad = d.join("bad.csv");
    std::fs::write(&bad, "1,2,3\n1,x,3\n\n5\n").unwrap();
    let (code, err) = failed(run(recur(url, &["train", bad.to_str().unwrap()])).await);
    assert_eq!(code, 1);
    let name = bad.display().to_string();
    assert!(
        err.contains(&format!("{name}:2: value 2 `x` is not a number")),
        "{err}"
    );
    assert!(err.contains(&format!("{name}:4: has 1 value")), "{err}");
    // Bad flag values.
    let (code, err) = failed(
        run(recur(
            url,
            &["train", bad.to_str().unwrap(), "--hidden", "0"],
        ))
        .await,
    );
    assert_eq!(code, 2);
    assert!(err.contains("--hidden"), "{err}");
    let (code, err) = failed(
        run(recur(
            url,
            &["train", bad.to_str().unwrap(), "--model", "transformer"],
        ))
        .await,
    );
    assert_eq!(code, 2);
    assert!(err.contains("transformer"), "{err}");
    let (code, err) = failed(run(recur(url, &["predict", "job-1", "1,,3"])).await);
    assert_eq!(code, 1);
    assert!(err.contains("value 2 `` is not a number"), "{err}");
    let (code, err) = failed(
        run(recur(
            url,
            &["plot", "job-1", "-o", d.join("x.gif").to_str().unwrap()],
        ))
        .await,
    );
    assert_eq!(code, 1);
    assert!(err.contains(".png or .svg"), "{err}");
    // Unreachable coordinator: name the address, suggest `recur local`.
    let (code, err) = failed(run(recur("http://127.0.0.1:9", &["jobs"])).await);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach the coordinator at http://127.0.0.1:9"),
        "{err}"
    );
    assert!(err.contains("recur local"), "{err}");
    // Devices: a name that is not one, and (in a build without CUDA) a GPU, refused before
    // anything starts, for the embedded cluster, the demo and a standalone worker alike.
    for cmd in [
        ["local", "--listen", "127.0.0.1:0"],
        ["demo", "--rows", "100"],
    ] {
        let (code, err) =
            failed(run(recur(url, &[cmd[0], cmd[1], cmd[2], "--device", "gpu"])).await);
        assert_eq!(code, 1);
        assert!(err.contains("expected `cpu` or `cuda:N`"), "{err}");
    }
    #[cfg(not(feature = "cuda"))]
    for cmd in [
        &["local", "--listen", "127.0.0.1:0"][..],
        &["demo"],
        &["worker"],
    ] {
        let mut args = cmd.to_vec();
        args.extend(["--device", "cuda:0"]);
        let (code, err) = failed(run(recur(url, &args)).await);
        assert_eq!(code, 1);
        assert!(err.contains("rebuild with `--features cuda`"), "{err}");
        assert!(err.contains("hint: use --device cpu"), "{err}");
    }
}

#[test]
fn the_demo_beats_the_tutorial_and_answers_its_five_histories() {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("demo.png");
    let mut cmd = Command::cargo_bin("recur").unwrap();
    cmd.args(["demo", "--chart", chart.to_str().unwrap()])
        .env_remove("RECUR_COORDINATOR");
    let out = ok(cmd.output().unwrap());
    let metrics = out
        .lines()
        .find(|l| l.starts_with("test accuracy"))
        .unwrap_or_else(|| panic!("{out}"));
    let accuracy: f64 = metrics
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!(accuracy > 95.0, "{metrics}");
    assert!(
        out.contains("tutorial (PyTorch, SGD, 2,351 epochs): test accuracy 92.75%"),
        "{out}"
    );
    for (history, expected) in [
        ("1,2,3", 4.0),
        ("3,5,7", 9.0),
        ("9,7,5,3", 1.0),
        ("2,0,-2", -4.0),
        ("0,-3,-6", -9.0),
    ] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{history} ")))
            .unwrap_or_else(|| panic!("{history} missing:\n{out}"));
        let predicted: f64 = line
            .split("->")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((predicted - expected).abs() < 0.5, "{line}");
        assert!(line.contains(&format!("(expected {expected})")), "{line}");
    }
    assert_eq!(&std::fs::read(&chart).unwrap()[..4], b"\x89PNG");
}

#[test]
fn global_local_and_worker_flags_can_be_set_from_the_environment() {
    for args in [&["-h"][..], &["local", "-h"], &["worker", "-h"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_recur"))
            .args(args)
            .output()
            .unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            recur_tests::assert_every_flag_has_env(&help) >= 5,
            "{args:?}: {help}"
        );
    }
}

#[test]
fn completions_for_three_shells_and_a_man_page() {
    let output = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_recur"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = output(&["completions", "bash"]);
    assert!(
        bash.contains("_recur()") && bash.contains("checkpoint"),
        "{bash}"
    );
    assert!(output(&["completions", "zsh"]).starts_with("#compdef recur"));
    assert!(output(&["completions", "fish"]).contains("complete -c recur"));
    let man = output(&["man"]);
    assert!(
        man.contains(".TH recur 1") && man.contains("RECUR_CLIENT_TOKEN"),
        "{man}"
    );
}

#[test]
fn recur_worker_threads_sizes_the_compute_pool() {
    use std::io::{BufRead, BufReader};
    // No coordinator listens on port 9: the worker starts, logs, and keeps retrying.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_recur"))
        .args([
            "--coordinator",
            "http://127.0.0.1:9",
            "worker",
            "--threads",
            "3",
        ])
        .env("RUST_LOG", "info")
        .env("CANDLE_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let line = BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("worker starting"));
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .ok()
        .flatten();
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("the worker logs its start");
    assert!(
        line.contains("threads=3") && line.contains("compute_threads=3"),
        "{line}"
    );
}

/// The flat parameters of a downloaded checkpoint.
fn params(path: &Path, config: ModelConfig) -> Vec<f32> {
    load_state_dict(path, config, &Device::Cpu)
        .unwrap()
        .to_flat()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_fine_tuning_and_deleting_jobs_and_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let cluster = LocalCluster::start("127.0.0.1:0", CoordinatorConfig::new(&data_dir), 2)
        .await
        .unwrap();
    let url = cluster.url();
    let d = dir.path();
    let path = |name: &str| d.join(name).to_str().unwrap().to_string();
    let csv = path("ball.csv");
    ok(run(recur(
        &url,
        &["gen", "ball", "--rows", "1500", "--seed", "4", "-o", &csv],
    ))
    .await);

    // --print-spec writes the spec a train would submit (no upload); any field of it can be
    // edited and given back with --spec, and flags win over the file.
    let printed = ok(run(recur(
        &url,
        &[
            "train",
            &csv,
            "--print-spec",
            "--model",
            "gru",
            "--hidden",
            "6",
            "--seed",
            "5",
            "--epochs",
            "9",
            "--optimizer",
            "sgd",
            "--lr",
            "0.1",
            "--head",
            "10,5",
            "--dropout",
            "0.25",
        ],
    ))
    .await);
    let (code, err) = failed(
        run(recur(
            &url,
            &[
                "train",
                &csv,
                "--print-spec",
                "--head",
                "8",
                "--dropout",
                "1.5",
            ],
        ))
        .await,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--dropout 1.5 is not at least 0 and below 1"),
        "{err}"
    );
    let mut spec = json(&printed);
    assert_eq!(spec["model"]["kind"], "MODEL_KIND_GRU", "{spec}");
    assert_eq!(spec["model"]["head"], serde_json::json!([10, 5]), "{spec}");
    assert_eq!(spec["dropout"], 0.25, "{spec}");
    assert_eq!(spec["dataset_id"].as_str().unwrap().len(), 64, "{spec}");
    spec["train_percent"] = 70.into();
    spec["validation_percent"] = 15.into();
    std::fs::write(path("job.json"), spec.to_string()).unwrap();
    let out = ok(run(recur(
        &url,
        &[
            "--json",
            "train",
            &csv,
            "--spec",
            &path("job.json"),
            "--epochs",
            "2",
            "--detach",
        ],
    ))
    .await);
    let submitted = json(&out);
    assert_eq!(submitted["job_id"], "job-1");
    assert_eq!(
        submitted["dataset_id"], spec["dataset_id"],
        "the printed id is the upload's"
    );
    ok(run(recur(&url, &["watch", "job-1"])).await);
    let mut client = recur_client::Client::connect(&url, None).await.unwrap();
    let first = client.job("job-1").await.unwrap();
    let first_spec = first.spec.clone().unwrap();
    assert_eq!(first.epochs, 2, "--epochs overrides the file's 9");
    assert_eq!(
        (first_spec.train_percent, first_spec.validation_percent),
        (70, 15)
    );
    let first_model = first_spec.model.clone().unwrap();
    assert_eq!(first_model.hidden_size, 6);
    assert_eq!(first_model.head, [10, 5]);
    assert_eq!(first_spec.dropout, 0.25);
    assert_eq!(first_spec.seed, 5);

    // datasets: listed with their jobs; a prefix names one.
    let listed = ok(run(recur(&url, &["datasets"])).await);
    let dataset = spec["dataset_id"].as_str().unwrap().to_string();
    assert!(
        listed.contains(&dataset[..12]) && listed.contains("1500"),
        "{listed}"
    );
    let listed = json(&ok(run(recur(&url, &["--json", "datasets", "list"])).await));
    assert_eq!(listed[0]["id"], dataset.as_str());
    assert_eq!(listed[0]["job_ids"][0], "job-1");

    // Fine-tuning from job-1: its model without model flags; a near-zero learning rate keeps
    // job-1's best parameters, which shows they were the start.
    let out = ok(run(recur(
        &url,
        &[
            "--json",
            "train",
            "--dataset",
            &dataset[..10],
            "--init-from",
            "job-1",
            "--epochs",
            "1",
            "--optimizer",
            "sgd",
            "--lr",
            "1e-12",
            "--detach",
        ],
    ))
    .await);
    assert_eq!(json(&out)["job_id"], "job-2");
    ok(run(recur(&url, &["watch", "job-2"])).await);
    // Its checkpoint holds the MLP head under PyTorch's `nn.Sequential` names.
    let gru = ModelConfig {
        kind: recur_core::model::ModelKind::Gru,
        hidden_size: 6,
        head: recur_core::model::HeadLayers::new(&[10, 5]).unwrap(),
        ..ModelConfig::tutorial()
    };
    for job in ["job-1", "job-2"] {
        ok(run(recur(
            &url,
            &[
                "checkpoint",
                job,
                "-o",
                &path(&format!("{job}.safetensors")),
            ],
        ))
        .await);
    }
    let (a, b) = (
        params(&d.join("job-1.safetensors"), gru),
        params(&d.join("job-2.safetensors"), gru),
    );
    let moved = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(
        moved < 1e-6,
        "job-2 did not start from job-1's parameters (moved {moved})"
    );
    // Another model than the source's is refused, naming both.
    let (code, err) = failed(
        run(recur(
            &url,
            &[
                "train",
                "--dataset",
                &dataset,
                "--init-from",
                "job-1",
                "--model",
                "lstm",
            ],
        ))
        .await,
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("init_from") && err.contains("gru hidden 6"),
        "{err}"
    );
    let (_, err) = failed(
        run(recur(
            &url,
            &["train", "--dataset", &dataset, "--init-from", "job-9"],
        ))
        .await,
    );
    assert!(err.contains("init_from: no job job-9"), "{err}");

    // A running job cannot be deleted, nor its dataset.
    let out = ok(run(recur(
        &url,
        &[
            "--json",
            "train",
            "--dataset",
            &dataset,
            "--epochs",
            "100000",
            "--patience",
            "100000",
            "--detach",
        ],
    ))
    .await);
    let running = json(&out)["job_id"].as_str().unwrap().to_string();
    let (code, err) = failed(run(recur(&url, &["delete", &running])).await);
    assert_eq!(code, 1);
    assert!(err.contains("cancel it first"), "{err}");
    let (_, err) = failed(run(recur(&url, &["datasets", "delete", &dataset])).await);
    assert!(err.contains("in use by") && err.contains(&running), "{err}");
    ok(run(recur(&url, &["cancel", &running])).await);

    // Deleting job-1 takes its record, history and checkpoints; job-2 (fine-tuned from it)
    // keeps its own and still predicts.
    let out = ok(run(recur(&url, &["delete", "job-1"])).await);
    assert!(out.contains("deleted job-1"), "{out}");
    assert!(!data_dir.join("jobs/job-1").exists());
    let (_, err) = failed(run(recur(&url, &["status", "job-1"])).await);
    assert!(err.contains("no job job-1"), "{err}");
    let jobs = json(&ok(run(recur(&url, &["--json", "jobs"])).await));
    assert!(
        jobs.as_array().unwrap().iter().all(|j| j["id"] != "job-1"),
        "{jobs}"
    );
    ok(run(recur(&url, &["predict", "job-2", "1,3,5,7"])).await);
    assert!(client.steps("job-1").await.is_err());

    // With every job ended, the dataset goes, file and all.
    let out = ok(run(recur(&url, &["datasets", "delete", &dataset[..12]])).await);
    assert!(out.contains(&format!("deleted dataset {dataset}")), "{out}");
    assert!(!data_dir.join(format!("datasets/{dataset}.csv")).exists());
    assert!(ok(run(recur(&url, &["datasets"])).await).contains("no datasets"));
    let (_, err) = failed(run(recur(&url, &["train", "--dataset", &dataset[..12]])).await);
    assert!(err.contains("no dataset id starts with"), "{err}");
    cluster.shutdown().await.unwrap();
}

#[test]
fn usage_errors_are_json_with_json() {
    let out = Command::cargo_bin("recur")
        .unwrap()
        .args(["--json", "train", "--hidden", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = json(&String::from_utf8_lossy(&out.stderr));
    assert!(err["error"].as_str().unwrap().contains("--hidden"), "{err}");
    assert_eq!(err["exit_code"], 2);
    // Without --json, clap's own text.
    let out = Command::cargo_bin("recur")
        .unwrap()
        .args(["train", "--hidden", "0"])
        .env_remove("RECUR_JSON")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
}

/// The mean absolute error of "tomorrow's demand is today's" over the test part of a series
/// file (the last 20 % of its complete days), the baseline a model of it must beat.
fn persistence_mae(path: &Path) -> f64 {
    let text = std::fs::read_to_string(path).unwrap();
    let demand: Vec<f64> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            let (temp, demand) = (cells[1].parse::<f64>(), cells[2].parse::<f64>());
            match (temp, demand) {
                (Ok(t), Ok(d)) if t.is_finite() && d.is_finite() => Some(d),
                _ => None,
            }
        })
        .collect();
    let test = &demand[demand.len() * 80 / 100..];
    let errors: Vec<f64> = test.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
    errors.iter().sum::<f64>() / errors.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_is_trained_from_flags_and_predicted_from_raw_steps() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(
        "127.0.0.1:0",
        CoordinatorConfig::new(dir.path().join("data")),
        2,
    )
    .await
    .unwrap();
    let url = cluster.url();
    let days = dir.path().join("days.csv");
    let days_arg = days.to_str().unwrap();
    ok(run(recur(
        &url,
        &["gen", "series", "--seed", "2", "-o", days_arg],
    ))
    .await);
    assert!(
        std::fs::read_to_string(&days)
            .unwrap()
            .starts_with("date,temp,demand,price\n")
    );

    let series = [
        "--features",
        "temp,demand",
        "--targets",
        "demand",
        "--window",
        "14",
        "--order-by",
        "date",
        "--model",
        "gru",
        "--hidden",
        "16",
    ];
    // --every-step asks for a target at every step of each window.
    let mut args = vec!["train", days_arg, "--print-spec", "--every-step"];
    args.extend(series);
    let printed = json(&ok(run(recur(&url, &args)).await));
    assert_eq!(printed["series"]["every_step"], true, "{printed}");
    assert_eq!(printed["series"]["window"], 14, "{printed}");
    // --stateful K: K streams of consecutive windows (stride = window), a target at every step.
    let mut args = vec!["train", days_arg, "--print-spec", "--stateful", "3"];
    args.extend(series);
    let printed = json(&ok(run(recur(&url, &args)).await));
    assert_eq!(printed["series"]["stateful"], 3, "{printed}");
    assert_eq!(printed["series"]["stride"], 14, "{printed}");
    assert_eq!(printed["series"]["every_step"], true, "{printed}");

    // Missing cells are refused unless dropped, naming the line and column.
    let mut args = vec!["train", days_arg];
    args.extend(series);
    let (code, err) = failed(run(recur(&url, &args)).await);
    assert_eq!(code, 1);
    assert!(
        err.contains("days.csv:") && err.contains("missing value"),
        "{err}"
    );

    args.extend(["--drop-missing", "--epochs", "40", "--seed", "1"]);
    let mut json_args = vec!["--json"];
    json_args.extend(&args);
    let out = ok(run(recur(&url, &json_args)).await);
    let last = out.lines().last().unwrap_or_default();
    let info = json(last);
    let mae = info["job"]["test"]["mae"].as_f64().unwrap();
    let baseline = persistence_mae(&days);
    assert!(
        mae < baseline / 3.0,
        "test MAE {mae} is not well below tomorrow-is-today's {baseline}"
    );
    let datasets = json(&ok(run(recur(&url, &["--json", "datasets"])).await));
    assert_eq!(datasets[0]["layout"], "series");
    assert_eq!(datasets[0]["columns"][2], "demand");

    // Raw steps, `;` between steps: 14 steps of (temp, demand) give one demand.
    let history: Vec<String> = (0..14)
        .map(|t| format!("{:.1},{:.1}", 20.0 + (t % 3) as f64, 100.0 + (t % 7) as f64))
        .collect();
    let history = history.join(";");
    let out = ok(run(recur(&url, &["predict", "job-1", &history])).await);
    let predicted: f64 = out.trim().parse().unwrap();
    assert!((60.0..140.0).contains(&predicted), "{predicted}");
    let (_, err) = failed(run(recur(&url, &["predict", "job-1", "20,100;21"])).await);
    assert!(
        err.contains("has 3 values; the model takes steps of 2 features"),
        "{err}"
    );
    cluster.shutdown().await.unwrap();
}
