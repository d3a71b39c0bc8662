//! The job agent: one enrollment per job, used by every step. The agent holds the runner key and
//! certificate in memory and serves the Signer service on a Unix socket (mode 0600, in a private
//! 0700 folder; only its own user may connect — checked on every connection by peer
//! credentials), forwarding Sign and SignBatch to the site over its mutual-TLS session. A
//! RevokeSelf on the socket revokes the certificate at the site and stops the agent.
//!
//! `meshsign exec -- CMD` runs one for the life of CMD; `meshsign agent start` / `stop` for CI
//! systems whose steps are separate processes. The socket's path travels in
//! [`SOCK_VAR`]; the environment and region in [`ENV_VAR`] and [`REGION_VAR`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshsign_proto::v1::{self, signer_server};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::ClientError;
use crate::session::Session;

pub use crate::session::job::{ENV_VAR, REGION_VAR, SOCK_VAR, connect_agent as connect};

/// A running agent.
pub struct Agent {
    dir: PathBuf,
    socket: PathBuf,
    stopped: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    renewer: tokio::task::JoinHandle<()>,
    session: Shared,
    failed: Arc<std::sync::Mutex<Option<String>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// The session the agent serves; renewal swaps it under the write lock, so no Sign is in flight
/// on the old certificate once it is superseded.
type Shared = Arc<tokio::sync::RwLock<Session>>;

/// Forwards the Signer service to the site; RevokeSelf also stops the agent.
struct Forward {
    session: Shared,
    stop: watch::Sender<bool>,
}

#[tonic::async_trait]
impl signer_server::Signer for Forward {
    async fn sign(
        &self,
        req: Request<v1::SignRequest>,
    ) -> Result<Response<v1::SignResponse>, Status> {
        let session = self.session.read().await;
        session.signer.clone().sign(req.into_inner()).await
    }

    async fn sign_batch(
        &self,
        req: Request<v1::SignBatchRequest>,
    ) -> Result<Response<v1::SignBatchResponse>, Status> {
        let session = self.session.read().await;
        session.signer.clone().sign_batch(req.into_inner()).await
    }

    async fn attest(
        &self,
        req: Request<v1::AttestRequest>,
    ) -> Result<Response<v1::AttestResponse>, Status> {
        let session = self.session.read().await;
        session.signer.clone().attest(req.into_inner()).await
    }

    async fn asc_token(
        &self,
        req: Request<v1::AscTokenRequest>,
    ) -> Result<Response<v1::AscTokenResponse>, Status> {
        let session = self.session.read().await;
        session.signer.clone().asc_token(req.into_inner()).await
    }

    async fn renew(
        &self,
        _req: Request<v1::RenewRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        // The agent renews its own session; steps never hold a key of theirs to renew with.
        Err(Status::unimplemented(
            "renew: the job agent renews its own certificate",
        ))
    }

    async fn revoke_self(
        &self,
        req: Request<v1::RevokeSelfRequest>,
    ) -> Result<Response<v1::RevokeSelfResponse>, Status> {
        let session = self.session.read().await;
        let r = session.signer.clone().revoke_self(req.into_inner()).await;
        let _ = self.stop.send(true);
        r
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    ClientError::io(path)
}

/// A private folder (0700) for the socket.
fn private_dir() -> Result<PathBuf, ClientError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let id =
        meshsign_evidence::files::random_id().map_err(|e| ClientError::Crypto(e.to_string()))?;
    let dir = base.join(format!("meshsign-agent-{}", &id[..12]));
    let mut b = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(&dir).map_err(io(&dir))?;
    Ok(dir)
}

impl Agent {
    /// Serves `session` on a new socket until [`Agent::stopped`] (a RevokeSelf on the socket),
    /// renewing its certificate by half of each lifetime (see [`renew_loop`]).
    pub async fn start(session: Session, cfg: &crate::ClientConfig) -> Result<Self, ClientError> {
        let dir = private_dir()?;
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).map_err(io(&socket))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                .map_err(io(&socket))?;
        }
        let owner = owner_uid(&dir)?;
        let (stop, stopped) = watch::channel(false);
        let session: Shared = Arc::new(tokio::sync::RwLock::new(session));
        let svc = Forward {
            session: session.clone(),
            stop: stop.clone(),
        };
        let failed: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let renewer = tokio::spawn(renew_loop(
            session.clone(),
            cfg.clone(),
            stop.clone(),
            failed.clone(),
        ));
        let incoming = async_stream_of(listener, owner);
        let mut rx = stopped.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(signer_server::SignerServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.wait_for(|v| *v).await;
                }),
        );
        Ok(Self {
            dir,
            socket,
            stopped,
            stop,
            server,
            renewer,
            session,
            failed,
        })
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits until a RevokeSelf on the socket stopped the agent.
    pub async fn stopped(&mut self) {
        let _ = self.stopped.wait_for(|v| *v).await;
    }

    /// Stops serving, revokes the certificate at the site (unless a RevokeSelf already did),
    /// and removes the socket and its folder. The key and certificate go with the session.
    pub async fn finish(self, reason: &str) -> Result<(), ClientError> {
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let already = *self.stopped.borrow() && failed.is_none();
        let _ = self.stop.send(true);
        self.renewer.abort();
        let _ = self.server.await;
        let _ = std::fs::remove_dir_all(&self.dir);
        if !already {
            let session = self.session.read().await;
            session
                .signer
                .clone()
                .revoke_self(v1::RevokeSelfRequest {
                    reason: reason.to_string(),
                })
                .await
                .map_err(|s| ClientError::rpc("RevokeSelf", s))?;
        }
        match failed {
            Some(why) => Err(ClientError::Connect {
                endpoint: "renewal".into(),
                message: why,
            }),
            None => Ok(()),
        }
    }
}

/// Renews the session by half of each certificate's remaining life; a failed renewal is
/// retried with backoff while the certificate lasts. A renewal that cannot succeed is loud: it
/// is printed, the agent stops serving (later steps fail) and the job is failed
/// ([`Agent::finish`] reports it). Never a silent fallback.
async fn renew_loop(
    session: Shared,
    cfg: crate::ClientConfig,
    stop: watch::Sender<bool>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
) {
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    };
    loop {
        let not_after = session
            .read()
            .await
            .enrollment
            .not_after
            .map_or(0, |t| t.seconds);
        let left = (not_after - unix()).max(0);
        tokio::time::sleep(std::time::Duration::from_secs(
            u64::try_from(left / 2).unwrap_or(0),
        ))
        .await;
        let mut wait = 1u64;
        loop {
            let result = {
                let mut s = session.write().await;
                let ttl = s.enrollment.granted_ttl_seconds;
                s.renew(&cfg, ttl).await
            };
            match result {
                Ok(()) => break,
                Err(e) if unix() + i64::try_from(wait).unwrap_or(i64::MAX) < not_after => {
                    eprintln!("meshsign agent: renewal failed, retrying in {wait} s: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
                    wait = (wait * 2).min(30);
                }
                Err(e) => {
                    let why = format!("the job's certificate could not be renewed: {e}");
                    eprintln!("meshsign agent: {why}; the agent stops and the job fails");
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    let _ = stop.send(true);
                    return;
                }
            }
        }
    }
}

#[cfg(unix)]
fn owner_uid(dir: &Path) -> Result<u32, ClientError> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(dir).map_err(io(dir))?.uid())
}

#[cfg(not(unix))]
fn owner_uid(_: &Path) -> Result<u32, ClientError> {
    Ok(0)
}

/// Accepted connections whose peer runs as `owner`; others are closed at once.
fn async_stream_of(
    listener: UnixListener,
    owner: u32,
) -> tokio_stream::wrappers::ReceiverStream<Result<UnixStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => break,
            };
            let Ok((stream, _)) = accepted else { continue };
            let same_user = stream.peer_cred().is_ok_and(|c| c.uid() == owner);
            if !same_user {
                continue; // dropped: only the agent's own user may use it
            }
            if tx.send(Ok(stream)).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// `meshsign exec`: enroll once, serve the job agent, run `command` with [`SOCK_VAR`], then
/// revoke and return `command`'s exit status.
pub async fn exec(
    cfg: &crate::ClientConfig,
    job: &crate::session::job::JobOptions,
    command: &[String],
) -> Result<u8, ClientError> {
    let (program, rest) = command
        .split_first()
        .ok_or_else(|| ClientError::Usage("give the command after --".into()))?;
    let session = crate::session::job::start(cfg, job).await?;
    let vars = variables_of(&session);
    let agent = Agent::start(session, cfg).await?;
    let status = tokio::process::Command::new(program)
        .args(rest)
        .env(SOCK_VAR, agent.socket())
        .envs(vars.iter().skip(1).map(|(k, v)| (*k, v)))
        .status()
        .await;
    let finished = agent.finish("job finished").await;
    let status = status.map_err(|e| ClientError::Usage(format!("{program}: {e}")))?;
    if let Err(e) = finished {
        crate::notes::note(&format!(
            "warning: revoking the job's certificate failed: {e}"
        ));
        if status.success() {
            return Err(e);
        }
    }
    Ok(status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(1))
}

/// The variables a job's later steps need, the socket's first (its value filled in by the
/// caller once the agent serves).
fn variables_of(session: &Session) -> [(&'static str, String); 3] {
    [
        (SOCK_VAR, String::new()),
        (ENV_VAR, session.enrollment.environment.clone()),
        (REGION_VAR, session.enrollment.region.clone()),
    ]
}

/// `meshsign agent serve` (what `agent start` runs in the background): enroll, hand the
/// variables for the job's later steps to `announce`, serve until `agent stop`.
pub async fn serve(
    cfg: &crate::ClientConfig,
    job: &crate::session::job::JobOptions,
    announce: impl FnOnce(&[(&'static str, String)]) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let session = crate::session::job::start(cfg, job).await?;
    let mut vars = variables_of(&session);
    let mut agent = Agent::start(session, cfg).await?;
    vars[0].1 = agent.socket().display().to_string();
    announce(&vars)?;
    agent.stopped().await;
    agent.finish("job finished").await
}

/// `meshsign agent start`: runs this process's own command line again in the background,
/// `agent start` replaced by `agent serve`, and hands each of its variable lines to `line` once
/// it serves.
pub async fn start_background(mut line: impl FnMut(&str)) -> Result<(), ClientError> {
    use tokio::io::AsyncBufReadExt as _;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let at = argv.iter().position(|a| a == "start").unwrap_or(argv.len());
    let (before, after) = argv.split_at(at);
    let global: Vec<&std::ffi::OsString> = before.iter().filter(|a| *a != "agent").collect();
    let args = after.get(1..).unwrap_or_default();
    let me = std::env::current_exe().map_err(|e| ClientError::Usage(e.to_string()))?;
    let mut child = tokio::process::Command::new(me)
        .args(global)
        .args(["agent", "serve"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // The agent outlives this command: it must not hold the caller's output open (a CI
        // step waits for it). Its own failures before serving come back on stdout.
        .stderr(std::process::Stdio::null())
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| ClientError::Usage(format!("cannot start the agent: {e}")))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| ClientError::Usage("the agent has no stdout".into()))?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    for _ in 0..3 {
        match lines.next_line().await {
            Ok(Some(l)) => match l.strip_prefix("error: ") {
                Some(e) => {
                    return Err(ClientError::Usage(format!("the agent did not start: {e}")));
                }
                None => line(&l),
            },
            _ => {
                let status = child.wait().await.ok();
                return Err(ClientError::Usage(format!(
                    "the agent stopped before it served ({status:?}); see its message above"
                )));
            }
        }
    }
    Ok(())
}

/// `meshsign agent stop`: revokes the agent's certificate (which stops it); returns the
/// certificate's serial.
pub async fn stop() -> Result<String, ClientError> {
    let sock = std::env::var_os(SOCK_VAR)
        .ok_or_else(|| ClientError::Usage(format!("{SOCK_VAR} is not set")))?;
    let serial = connect(Path::new(&sock))
        .await?
        .revoke_self(v1::RevokeSelfRequest {
            reason: "job finished".into(),
        })
        .await
        .map_err(|s| ClientError::rpc("RevokeSelf", s))?
        .into_inner()
        .serial;
    // The agent removes its socket as it exits: wait for that (briefly), so a teardown hook
    // that returns leaves no socket behind.
    for _ in 0..100 {
        if !Path::new(&sock).exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(serial)
}
