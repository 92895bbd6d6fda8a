//! Tidy checks on the gateway's build (rust-analyzer style): promises about
//! what the gateway links.

use std::process::Command;

/// The gateway is the MLS Delivery Service: it parses MLS framing with
/// `proto::mls` and must not link any MLS or HPKE decryption code (issue 4).
#[test]
fn gateway_links_no_mls_decryption_path_issue_4() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "gateway",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.lines().any(|l| l.starts_with("proto ")),
        "the tree was read: {tree}"
    );
    for forbidden in ["openmls", "hpke", "openmls_rust_crypto"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "the gateway links {forbidden}: it must never hold a way to decrypt referrals"
        );
    }
}
