//! Names the commit meshsignd is built from, for `meshsign_build_info{commit}`: `MESHSIGN_COMMIT`
//! when set (a release build outside a checkout), else `git rev-parse`, else `unknown`.
fn main() {
    println!("cargo:rerun-if-env-changed=MESHSIGN_COMMIT");
    // Only paths that exist: cargo reruns a script whose watched path is missing on every build
    // (a container build's context has no .git).
    for watched in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(watched).exists() {
            println!("cargo:rerun-if-changed={watched}");
        }
    }
    let commit = std::env::var("MESHSIGN_COMMIT").ok().or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    });
    let commit = commit
        .filter(|c| !c.is_empty() && c.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESHSIGN_COMMIT={commit}");
}
