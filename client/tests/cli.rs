//! The `client` binary without a gateway: help, configuration errors, exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failing test may panic

use std::process::Command;

const CLIENT: &str = env!("CARGO_BIN_EXE_client");

#[test]
fn help_teaches_every_command_and_the_exit_codes() {
    let out = Command::new(CLIENT).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["send", "inbox", "fetch", "ack", "status", "Exit codes"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
}

#[test]
fn missing_or_bad_configuration_exits_3_and_names_the_problem() {
    let out = Command::new(CLIENT)
        .env_remove("CLIENT_CONFIG")
        .args(["inbox"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "gateway = \"https://127.0.0.1:1\"\narea = \"northshire\"\ncert = \"a\"\nkey = \"b\"\nca = \"c\"\ncolour = \"red\"\n").unwrap();
    let out = Command::new(CLIENT)
        .arg("--config")
        .arg(&path)
        .arg("inbox")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("colour"), "the unknown key is named: {err}");

    std::fs::write(&path, "gateway = \"https://127.0.0.1:1\"\narea = \"northshire\"\ncert = \"missing.crt\"\nkey = \"b\"\nca = \"c\"\n").unwrap();
    let out = Command::new(CLIENT)
        .arg("--config")
        .arg(&path)
        .arg("inbox")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.crt"));
}

#[test]
fn bad_arguments_exit_2() {
    let out = Command::new(CLIENT)
        .args(["send", "--to", "not-an-address", "--category", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
