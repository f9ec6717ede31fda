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
fn an_empty_token_or_a_file_as_data_dir_is_refused_at_start() {
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
}
