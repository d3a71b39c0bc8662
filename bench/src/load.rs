//! The load generator: N concurrent runners against a site, over real mutual TLS, with the
//! client library the `meshsign` CLI uses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshsign_certs_dev::GithubJob;
use meshsign_client::device::DeviceKey;
use meshsign_client::session::token::DevMinter;
use meshsign_client::session::{EnrollParams, RunnerKey, Session};
use meshsign_client::{ClientConfig, net as transport};
use meshsign_proto::v1::{self, enrollment_client::EnrollmentClient};

/// The environment every benchmark runner enrolls in (a dev site has `staging` and this).
pub const ENVIRONMENT: &str = "production";
/// The key every benchmark request signs with.
pub const KEY: &str = "release";

/// What one load window did.
pub struct Window {
    /// Successful operations (signatures for batches).
    pub ops: u64,
    /// Failed calls.
    pub errors: u64,
    /// Per-call latencies, sorted.
    pub latencies: Vec<Duration>,
    /// Wall time of the window.
    pub seconds: f64,
}

/// Mints dev tokens for the site's dev issuer (the client library's minter, loaded once).
#[derive(Clone)]
pub struct Tokens {
    minter: Arc<DevMinter>,
    job: GithubJob,
    audience: String,
}

impl Tokens {
    /// Loads the dev issuer named in the site's client config.
    pub fn new(cfg: &ClientConfig) -> Result<Self, String> {
        Ok(Self {
            minter: Arc::new(DevMinter::load(cfg).map_err(|e| e.to_string())?),
            job: GithubJob::new(ENVIRONMENT),
            audience: cfg.audience(ENVIRONMENT).map_err(|e| e.to_string())?.into(),
        })
    }

    /// A fresh token (new jti) for a job in [`ENVIRONMENT`].
    pub fn mint(&self) -> Result<String, String> {
        self.minter
            .mint(&self.audience, &self.job)
            .map(|t| t.to_string())
            .map_err(|e| e.to_string())
    }
}

fn fingerprint(i: usize) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("bench-runner-{i}").as_bytes(),
    ))
}

/// What the sign-port load sends.
#[derive(Clone, Copy)]
pub enum SignLoad {
    /// Unary Sign of one digest (no SET asked for: what `meshsign sign` asks for its native
    /// signature files).
    Sign,
    /// Unary Sign of one digest asking for the signature's SET (what a Sigstore bundle needs).
    SignPromised,
    /// SignBatch of this many digests.
    Batch(usize),
}

/// Enrolls `n` runners (untimed) and returns their sessions.
pub async fn sessions(
    cfg: &ClientConfig,
    tokens: &Tokens,
    n: usize,
) -> Result<Vec<Session>, String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let params = EnrollParams {
            device: None,
            environment: ENVIRONMENT.into(),
            token: tokens.mint()?,
            fingerprint: fingerprint(i),
            requested_ttl_seconds: 0,
            region: None,
        };
        out.push(
            Session::start(cfg, &params)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(out)
}

/// A unary Sign of one SHA-256 digest with `key` (asking for the SET if `promise`).
fn sign_request(key: &str, digest: Vec<u8>, promise: bool) -> v1::SignRequest {
    v1::SignRequest {
        key_alias: key.into(),
        input: Some(v1::sign_request::Input::Sha256Digest(digest)),
        artifact_name: String::new(),
        algorithm: String::new(),
        signed_entry_timestamp: promise,
    }
}

/// Runs `what` from every session for `duration`.
pub async fn sign(
    sessions: Vec<Session>,
    what: SignLoad,
    key: &'static str,
    duration: Duration,
) -> Window {
    sign_keeping(sessions, what, key, duration).await.0
}

/// [`sign`], handing the sessions back for the next window.
pub async fn sign_keeping(
    sessions: Vec<Session>,
    what: SignLoad,
    key: &'static str,
    duration: Duration,
) -> (Window, Vec<Session>) {
    window_keeping(sessions, duration, move |mut s: Session, i| async move {
        let digest = vec![(i % 251) as u8; 32];
        let ok = match what {
            SignLoad::Sign => s
                .signer
                .sign(sign_request(key, digest, false))
                .await
                .is_ok(),
            SignLoad::SignPromised => s.signer.sign(sign_request(key, digest, true)).await.is_ok(),
            SignLoad::Batch(n) => s
                .signer
                .sign_batch(v1::SignBatchRequest {
                    key_alias: key.into(),
                    sha256_digests: vec![digest; n],
                    artifact_name: String::new(),
                    algorithm: String::new(),
                    signed_entry_timestamp: false,
                })
                .await
                .is_ok(),
        };
        let ops = match (ok, what) {
            (false, _) => 0,
            (true, SignLoad::Sign | SignLoad::SignPromised) => 1,
            (true, SignLoad::Batch(n)) => n as u64,
        };
        (s, ops)
    })
    .await
}

/// What `meshsign sign --format sigstore` does per file: Sign, then the bundle built and
/// checked as `sigstore_bundle` checks it (the body this signature, digest and key; the SET
/// naming the audit key's log and well formed), from every session for
/// `duration`. One op = one checked bundle. With `batch` > 1, SignBatch of `batch` digests and
/// one bundle per signature (what it does for several files); ops = bundles.
pub async fn bundles(
    cfg: &ClientConfig,
    sessions: Vec<Session>,
    key: &'static str,
    batch: usize,
    duration: Duration,
) -> Result<Window, String> {
    let mut v = meshsign_client::site::verification::client(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let spki = meshsign_client::site::verification::material(&mut v, ENVIRONMENT, key)
        .await
        .map_err(|e| e.to_string())?
        .audit_public_key_der;
    let spki =
        Arc::new(meshsign_client::site::verification::log_key(&spki).map_err(|e| e.to_string())?);
    let workers: Vec<_> = sessions.into_iter().map(|s| (s, spki.clone())).collect();
    Ok(
        window(workers, duration, move |(mut s, spki), i| async move {
            let digests: Vec<[u8; 32]> = (0..batch).map(|j| [((i + j) % 251) as u8; 32]).collect();
            let responses = if batch == 1 {
                s.signer
                    .sign(sign_request(key, digests[0].to_vec(), true))
                    .await
                    .map(|r| vec![r.into_inner()])
                    .map_err(|e| e.to_string())
            } else {
                s.sign_batch(key, &digests, "bench", true)
                    .await
                    .map_err(|e| e.to_string())
            };
            let ok = match responses {
                Ok(rs) => {
                    let work: Vec<_> = rs.iter().zip(&digests).collect();
                    meshsign_client::site::verification::par_map(&work, |(r, d)| {
                        let hint = format!("bench/{ENVIRONMENT}/{}", r.key_id);
                        meshsign_client::site::verification::sigstore_bundle(
                            r,
                            hint,
                            (meshsign_evidence::rekor::BodyHash::Sha256, &d[..]),
                            &spki,
                        )
                        .and_then(|b| {
                            serde_json::to_vec(&b)
                                .map_err(|e| meshsign_client::ClientError::Crypto(e.to_string()))
                        })
                        .is_ok()
                    })
                    .into_iter()
                    .filter(|ok| *ok)
                    .count() as u64
                }
                Err(_) => 0,
            };
            ((s, spki), ok)
        })
        .await,
    )
}

/// Enrollment load: every call is a new TLS connection, a new token and a new key + CSR.
pub async fn enroll(
    cfg: &ClientConfig,
    tokens: &Tokens,
    concurrency: usize,
    duration: Duration,
) -> Result<Window, String> {
    let tls = transport::tls_config(transport::roots(cfg).map_err(|e| e.to_string())?, None)
        .map_err(|e| e.to_string())?;
    let ctx = Arc::new((cfg.clone(), tokens.clone(), tls));
    let workers = vec![ctx; concurrency];
    Ok(window(workers, duration, |ctx, i| async move {
        let ok = enroll_once(&ctx.0, &ctx.1, ctx.2.clone(), i).await.is_ok();
        (ctx, u64::from(ok))
    })
    .await)
}

/// Enrollment load with a device key per worker (an environment with `runners =
/// "registered"`): each call also signs the device key's proof, as `meshsign` does.
pub async fn enroll_proven(
    cfg: &ClientConfig,
    tokens: &Tokens,
    devices: &[Arc<DeviceKey>],
    duration: Duration,
) -> Result<Window, String> {
    let tls = transport::tls_config(transport::roots(cfg).map_err(|e| e.to_string())?, None)
        .map_err(|e| e.to_string())?;
    let workers: Vec<_> = devices
        .iter()
        .map(|d| Arc::new((cfg.clone(), tokens.clone(), tls.clone(), d.clone())))
        .collect();
    Ok(window(workers, duration, |ctx, i| async move {
        let ok = enroll_with(&ctx.0, &ctx.1, ctx.2.clone(), i, Some(ctx.3.clone()))
            .await
            .is_ok();
        (ctx, u64::from(ok))
    })
    .await)
}

async fn enroll_once(
    cfg: &ClientConfig,
    tokens: &Tokens,
    tls: Arc<rustls::ClientConfig>,
    i: usize,
) -> Result<(), String> {
    enroll_with(cfg, tokens, tls, i, None).await
}

async fn enroll_with(
    cfg: &ClientConfig,
    tokens: &Tokens,
    tls: Arc<rustls::ClientConfig>,
    i: usize,
    device: Option<Arc<DeviceKey>>,
) -> Result<(), String> {
    let key = RunnerKey::generate().map_err(|e| e.to_string())?;
    let ch = transport::connect(&cfg.enroll_endpoint, &cfg.server_name, tls)
        .await
        .map_err(|e| e.to_string())?;
    let params = EnrollParams {
        fingerprint: device
            .as_ref()
            .map_or_else(|| fingerprint(i), |d| d.fingerprint()),
        device,
        environment: ENVIRONMENT.into(),
        token: tokens.mint()?,
        requested_ttl_seconds: 0,
        region: None,
    };
    let req =
        meshsign_client::session::enroll_request(cfg, &key, &params).map_err(|e| e.to_string())?;
    EnrollmentClient::new(ch)
        .enroll(req)
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_string())
}

/// Runs `op` in a loop on each worker state until `duration` has passed; `op` returns the
/// state back with the number of operations it completed (0 = failed).
async fn window<S, F, Fut>(workers: Vec<S>, duration: Duration, op: F) -> Window
where
    S: Send + 'static,
    F: Fn(S, usize) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = (S, u64)> + Send,
{
    window_keeping(workers, duration, op).await.0
}

/// [`window`], handing the worker states back (sessions reused by the next window).
async fn window_keeping<S, F, Fut>(workers: Vec<S>, duration: Duration, op: F) -> (Window, Vec<S>)
where
    S: Send + 'static,
    F: Fn(S, usize) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = (S, u64)> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(i, mut state)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ops, mut errors, mut lat) = (0u64, 0u64, Vec::with_capacity(8192));
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let (back, n) = op(state, i).await;
                    state = back;
                    if n == 0 {
                        errors += 1;
                    } else {
                        ops += n;
                        lat.push(t.elapsed());
                    }
                }
                (ops, errors, lat, state)
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut w = Window {
        ops: 0,
        errors: 0,
        latencies: Vec::new(),
        seconds: 0.0,
    };
    let mut states = Vec::new();
    for t in tasks {
        if let Ok((o, e, l, state)) = t.await {
            w.ops += o;
            w.errors += e;
            w.latencies.extend(l);
            states.push(state);
        }
    }
    w.seconds = start.elapsed().as_secs_f64();
    w.latencies.sort();
    (w, states)
}
