//! Three hosts in network namespaces joined by veth pairs: a coordinator and two workers. One
//! worker's link is cut (the job goes on without it) and restored (it rejoins). It needs root and
//! iproute2, so it is `#[ignore]`d in a plain `cargo test` and `.ci/run` runs it explicitly as
//! root (`cargo test --release -p recur-client --test netns -- --ignored`); where it cannot run it
//! fails, saying why. It creates and removes its namespaces itself.

// The helpers report failed commands on stderr, for the test's output.
#![allow(clippy::print_stderr)]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const RECUR: &str = env!("CARGO_BIN_EXE_recur");

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and links of one test run; removed on drop, whatever happened.
struct Hosts {
    names: [String; 3],
    children: Vec<Child>,
}

impl Hosts {
    fn create() -> Self {
        let tag = std::process::id() % 100_000;
        let names = [format!("rc{tag}"), format!("rw1{tag}"), format!("rw2{tag}")];
        let hosts = Self {
            names,
            children: Vec::new(),
        };
        for n in &hosts.names {
            must(&["ip", "netns", "add", n]);
            must(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        for (i, worker) in [&hosts.names[1], &hosts.names[2]].into_iter().enumerate() {
            let (c_side, w_side) = (format!("vc{}{tag}", i + 1), format!("vw{}{tag}", i + 1));
            must(&[
                "ip",
                "link",
                "add",
                &c_side,
                "netns",
                &hosts.names[0],
                "type",
                "veth",
                "peer",
                "name",
                &w_side,
                "netns",
                worker,
            ]);
            must(&[
                "ip",
                "-n",
                &hosts.names[0],
                "addr",
                "add",
                &format!("10.201.{}.1/24", i + 1),
                "dev",
                &c_side,
            ]);
            must(&[
                "ip",
                "-n",
                worker,
                "addr",
                "add",
                &format!("10.201.{}.2/24", i + 1),
                "dev",
                &w_side,
            ]);
            must(&["ip", "-n", &hosts.names[0], "link", "set", &c_side, "up"]);
            must(&["ip", "-n", worker, "link", "set", &w_side, "up"]);
        }
        hosts
    }

    fn spawn(&mut self, host: usize, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.names[host], RECUR])
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Runs `recur --json ARGS` on the coordinator's host and parses its output.
    fn recur(&self, args: &[&str]) -> Value {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.names[0],
                RECUR,
                "--json",
                "--coordinator",
                "http://127.0.0.1:7070",
            ])
            .args(args)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "recur {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn link(&self, worker: usize, up: bool) {
        let dev = format!("vw{worker}{}", std::process::id() % 100_000);
        must(&[
            "ip",
            "-n",
            &self.names[worker],
            "link",
            "set",
            &dev,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

fn wait_for(secs: u64, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Each check runs a process; no extra pause is needed between them.
    }
}

fn is_root() -> bool {
    sh(&["id", "-u"]).stdout.trim_ascii() == b"0"
}

#[test]
#[ignore = "needs root and iproute2 (network namespaces); .ci/run runs it explicitly"]
fn a_cut_worker_link_is_survived_and_a_restored_one_rejoins() {
    assert!(
        is_root(),
        "this test creates network namespaces and must run as root"
    );
    assert!(
        sh(&["ip", "netns", "list"]).status.success(),
        "`ip netns` does not work here: install iproute2"
    );
    let data_dir = tempfile::tempdir().unwrap();
    let csv = data_dir.path().join("ball.csv");
    let mut hosts = Hosts::create();
    hosts.spawn(
        0,
        &[
            "local",
            "--workers",
            "0",
            "--listen",
            "0.0.0.0:7070",
            "--data-dir",
            data_dir.path().join("data").to_str().unwrap(),
        ],
    );
    hosts.spawn(
        1,
        &[
            "--coordinator",
            "http://10.201.1.1:7070",
            "worker",
            "--name",
            "host-1",
        ],
    );
    hosts.spawn(
        2,
        &[
            "--coordinator",
            "http://10.201.2.1:7070",
            "worker",
            "--name",
            "host-2",
        ],
    );
    let workers = |h: &Hosts| h.recur(&["workers"]).as_array().map_or(0, Vec::len);
    wait_for(60, "two workers across the links", || workers(&hosts) == 2);

    hosts.recur(&["gen", "ball", "--rows", "3000", "-o", csv.to_str().unwrap()]);
    let submitted = hosts.recur(&[
        "train",
        csv.to_str().unwrap(),
        "--epochs",
        "1000000",
        "--patience",
        "1000000",
        "--detach",
    ]);
    let job = submitted["job_id"].as_str().expect("a job id").to_string();
    let status = |h: &Hosts| h.recur(&["status", &job]);
    let epoch_workers = |v: &Value| {
        (
            v["epochs"].as_u64().unwrap_or(0),
            v["last_epoch"]["workers"].as_u64().unwrap_or(0),
        )
    };
    wait_for(60, "the first epoch on two workers", || {
        epoch_workers(&status(&hosts)).1 == 2
    });

    hosts.link(1, false);
    wait_for(60, "the cut-off worker to be dropped", || {
        workers(&hosts) == 1
    });
    let (cut_at, _) = epoch_workers(&status(&hosts));
    wait_for(60, "epochs on the remaining worker", || {
        let (epochs, on) = epoch_workers(&status(&hosts));
        epochs >= cut_at + 2 && on == 1
    });

    hosts.link(1, true);
    wait_for(90, "the worker to rejoin", || workers(&hosts) == 2);
    wait_for(60, "an epoch on both workers again", || {
        epoch_workers(&status(&hosts)).1 == 2
    });
    let cancelled = hosts.recur(&["cancel", &job]);
    assert_eq!(cancelled["state"], "cancelled", "{}", status(&hosts));
}
