//! The `recur-coordinator` binary's flags: each readable from the environment, and values that
//! make no sense refused at start with the flag named.

use std::process::Command;

fn coordinator() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recur-coordinator"));
    for (var, _) in std::env::vars() {
        if var.starts_with("RECUR_") {
            cmd.env_remove(var);
        }
    }
    cmd
}

#[test]
fn every_flag_can_be_set_from_the_environment() {
    let out = coordinator().arg("-h").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // Each option starts a line with `-`; its description (and `[env: …]`) may follow below.
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') {
            blocks.push(trimmed.to_string());
        } else if let Some(block) = blocks.last_mut() {
            block.push(' ');
            block.push_str(trimmed);
        }
    }
    let mut checked = 0;
    for block in &blocks {
        if block.starts_with("-h") || block.starts_with("-V") {
            continue;
        }
        assert!(block.contains("[env: RECUR_"), "{block}");
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} flags in:\n{help}");
}

#[test]
fn an_empty_token_or_an_unusable_data_dir_is_refused_at_start() {
    let out = coordinator()
        .env("RECUR_CLIENT_TOKEN", "")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--client-token") && err.contains("empty"),
        "{err}"
    );

    let file = tempfile::NamedTempFile::new().unwrap();
    let out = coordinator()
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(file.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--data-dir") && err.contains("not a directory"),
        "{err}"
    );

    // procfs takes no new directories, not even from root (CI runs as root, which file modes
    // would not stop).
    let out = coordinator()
        .args(["--listen", "127.0.0.1:0", "--data-dir", "/proc/recur-data"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--data-dir /proc/recur-data") && err.contains("not writable"),
        "{err}"
    );
}

#[test]
fn metrics_listen_serves_plain_http_apart_from_the_grpc_port() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut child = coordinator()
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let addr = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            seen.push_str(&line);
            seen.push('\n');
            let rest = line.split("metrics served over HTTP addr=").nth(1)?;
            Some(rest.split_whitespace().next()?.to_string())
        });
    let Some(addr) = addr else {
        let _ = child.kill();
        panic!("no metrics address logged:\n{seen}");
    };
    let mut socket = std::net::TcpStream::connect(&addr).unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: recur\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("recur_build_info{version="), "{response}");
}
