//! The evidence crate stands alone: checking a receipt or a bundle offline pulls in no gRPC,
//! no HTTP and no async runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

#[test]
fn the_evidence_crate_depends_on_no_transport() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "meshsign-evidence",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.starts_with("meshsign-evidence "), "{tree}");
    for banned in [
        "tonic",
        "tokio",
        "hyper",
        "prost",
        "h2 ",
        "tower",
        "meshsign-proto",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(banned)),
            "meshsign-evidence depends on {banned}:\n{tree}"
        );
    }
}
