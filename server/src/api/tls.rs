//! rustls configurations for the three listeners (swappable: [`ListenerTls`]), and the accept
//! loop that hands tonic
//! `tokio_rustls::server::TlsStream`s (so `Request::peer_certs()` works).
//!
//! Owns: rustls server configurations and the accept loop. Must not touch: who a peer is
//! (`identity`), what it may do (the use cases).
//!
//! tonic's own server TLS takes only a CA root; we build the `ServerConfig` ourselves: TLS 1.3
//! only, ALPN `h2`, aws-lc-rs, and the site's clock as rustls' time provider so handshake-time
//! validity and per-RPC validity agree.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ServerConfig, version::TLS13};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::connections::{ConnectionLimiter, ConnectionPermit};
use crate::clock::{RustlsTime, SharedClock};
use crate::config::TlsFiles;

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing or does not parse.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{path}: no certificates")]
    NoCertificates {
        /// The file.
        path: String,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (e.g. no usable root).
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider: aws-lc-rs, one library for TLS, certificates and signing.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process default (idempotent).
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The server's certificate chain and key.
pub struct ServerIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("chain_len", &self.chain.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

fn pem_err(path: &Path) -> impl FnOnce(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |source| TlsError::Pem {
        path: path.display().to_string(),
        source,
    }
}

/// Reads every certificate from a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(path))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

impl ServerIdentity {
    /// Loads the server certificate chain and key.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let chain = read_certs(&files.server_cert)?;
        let key =
            PrivateKeyDer::from_pem_file(&files.server_key).map_err(pem_err(&files.server_key))?;
        Ok(Self { chain, key })
    }
}

fn finish(
    builder: rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    id: &ServerIdentity,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

fn builder(
    clock: &SharedClock,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, TlsError> {
    ServerConfig::builder_with_details(provider(), Arc::new(RustlsTime(clock.clone())))
        .with_protocol_versions(&[&TLS13])
        .map_err(TlsError::from)
}

fn client_verifier(roots: &[Vec<u8>]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut store = RootCertStore::empty();
    for der in roots {
        store.add(CertificateDer::from(der.clone()))?;
    }
    Ok(WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider()).build()?)
}

/// Enroll port: server-auth TLS 1.3, no client certificate.
pub fn enroll_config(
    id: &ServerIdentity,
    clock: &SharedClock,
) -> Result<Arc<ServerConfig>, TlsError> {
    finish(builder(clock)?, None, id)
}

/// Sign port: mutual TLS 1.3; the handshake fails without a certificate from one of `runner_cas`.
pub fn sign_config(
    id: &ServerIdentity,
    runner_cas: &[Vec<u8>],
    clock: &SharedClock,
) -> Result<Arc<ServerConfig>, TlsError> {
    finish(builder(clock)?, Some(client_verifier(runner_cas)?), id)
}

/// Admin port: mutual TLS 1.3 against the admin CA(s).
pub fn admin_config(
    id: &ServerIdentity,
    admin_ca: &Path,
    clock: &SharedClock,
) -> Result<Arc<ServerConfig>, TlsError> {
    let roots: Vec<Vec<u8>> = read_certs(admin_ca)?
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    finish(builder(clock)?, Some(client_verifier(&roots)?), id)
}

/// A listener's TLS configuration, swappable at run time (each new handshake reads it).
pub type TlsCell = Arc<std::sync::RwLock<Arc<ServerConfig>>>;

/// Wraps a configuration in a [`TlsCell`].
pub fn cell(cfg: Arc<ServerConfig>) -> TlsCell {
    Arc::new(std::sync::RwLock::new(cfg))
}

/// The TLS configurations of the three listeners, swappable at run time: the sign port's when
/// the trusted runner CAs change, all three when a reload brings new `[tls]` files. New
/// handshakes use the new configuration; open connections keep theirs (the per-RPC checks
/// govern them).
#[derive(Debug)]
pub struct ListenerTls {
    identity: std::sync::RwLock<Arc<ServerIdentity>>,
    clock: SharedClock,
    /// Enroll port.
    pub enroll: TlsCell,
    /// Sign port.
    pub sign: TlsCell,
    /// Admin port.
    pub admin: TlsCell,
}

impl ListenerTls {
    /// Loads the server identity and builds the three configurations.
    pub fn load(
        files: &TlsFiles,
        runner_cas: &[Vec<u8>],
        clock: SharedClock,
    ) -> Result<Self, TlsError> {
        let id = Arc::new(ServerIdentity::load(files)?);
        Ok(Self {
            enroll: cell(enroll_config(&id, &clock)?),
            sign: cell(sign_config(&id, runner_cas, &clock)?),
            admin: cell(admin_config(&id, &files.admin_ca, &clock)?),
            identity: std::sync::RwLock::new(id),
            clock,
        })
    }

    fn identity(&self) -> Arc<ServerIdentity> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds the sign port's configuration for a new set of trusted runner CAs.
    pub fn set_runner_cas(&self, runner_cas: &[Vec<u8>]) -> Result<(), TlsError> {
        let cfg = sign_config(&self.identity(), runner_cas, &self.clock)?;
        *self.sign.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        Ok(())
    }

    /// Re-reads `[tls]` (server chain, key, admin CA): every configuration is built first,
    /// then all three are swapped, so a bad file changes nothing.
    pub fn reload(&self, files: &TlsFiles, runner_cas: &[Vec<u8>]) -> Result<(), TlsError> {
        let id = Arc::new(ServerIdentity::load(files)?);
        let enroll = enroll_config(&id, &self.clock)?;
        let sign = sign_config(&id, runner_cas, &self.clock)?;
        let admin = admin_config(&id, &files.admin_ca, &self.clock)?;
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = id;
        *self.enroll.write().unwrap_or_else(|p| p.into_inner()) = enroll;
        *self.sign.write().unwrap_or_else(|p| p.into_inner()) = sign;
        *self.admin.write().unwrap_or_else(|p| p.into_inner()) = admin;
        Ok(())
    }
}

/// Room for a whole unary response (HTTP/2 HEADERS, DATA and trailers) and most batch responses.
const WRITE_BUFFER: usize = 32 * 1024;

/// A write this long (an HTTP/2 DATA frame of the default maximum size, 16 KiB, with its
/// header) skips the gathering buffer.
const DIRECT_WRITE: usize = 16 * 1024;

/// A server TLS stream whose writes are gathered until HTTP/2 flushes.
///
/// tokio-rustls encrypts and sends every `poll_write` at once, and h2 hands a response over in
/// several writes (frame headers, the message, trailers): unbuffered, one gRPC response costs
/// two or three TLS records and as many `writev` calls. Gathered here, it is one record and one
/// system call per flush (measured with `meshsign-bench`; see BENCHMARKS.md).
///
/// It also closes a connection that completed the handshake but sends nothing within
/// `[limits] first_request_timeout_seconds`: an idle TLS connection must not hold a file
/// descriptor forever.
pub struct BufferedTls {
    inner: BufWriter<TlsStream<TcpStream>>,
    /// Until the first bytes arrive: when the connection gives up on them.
    first_read: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The connection's place under the listener's caps, freed when it closes.
    _permit: ConnectionPermit,
    /// A flush's one turn of the scheduler before it sends (see `poll_flush`).
    turn: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl BufferedTls {
    /// Wraps an accepted stream that must send its first bytes within `first_request`.
    pub fn new(
        stream: TlsStream<TcpStream>,
        first_request: Duration,
        permit: ConnectionPermit,
    ) -> Self {
        Self {
            inner: BufWriter::with_capacity(WRITE_BUFFER, stream),
            first_read: Some(Box::pin(tokio::time::sleep(first_request))),
            _permit: permit,
            turn: None,
        }
    }
}

impl Connected for BufferedTls {
    /// The same information tonic gives for a bare TLS stream (peer address and certificates),
    /// so `Request::remote_addr` and `Request::peer_certs` work unchanged.
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.get_ref().connect_info()
    }
}

impl AsyncRead for BufferedTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.first_read = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = this
                    .first_read
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request after the TLS handshake",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for BufferedTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    /// A write of a whole HTTP/2 DATA frame or more (a streamed export's, [`DIRECT_WRITE`])
    /// goes to TLS as it is, after what is gathered: rustls copies it into its record anyway,
    /// and gathering it first was a second copy of every byte (8 % of the daemon's CPU in an
    /// export, measured with `perf`). Smaller writes are gathered as before.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().fold(0usize, |n, b| n.saturating_add(b.len()));
        if len < DIRECT_WRITE {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        if !this.inner.buffer().is_empty() {
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        }
        Pin::new(&mut this.inner)
            .get_pin_mut()
            .poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// Sends what is gathered, after letting the runtime run the other tasks that are ready
    /// once: h2's connection task flushes as soon as a response's HEADERS and DATA are queued,
    /// often while the response's own task, on the other worker, is a moment from queuing its
    /// trailers, so one response went out in two records and two `writev`s (1.7 per Sign,
    /// measured). After the turn, h2 queues what arrived meanwhile before it flushes again.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.inner.buffer().is_empty() {
            let turn = this
                .turn
                .get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
            if turn.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        this.turn = None;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Whether an `accept` error concerns one connection or a momentary shortage (file
/// descriptors, memory), after which accepting may succeed again.
fn accept_error_is_transient(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut | OutOfMemory
    ) {
        return true;
    }
    // EMFILE, ENFILE, ENOBUFS, ENOMEM, EPROTO, EPERM (a firewall refused one connection).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12 | 71 | 1))
}

/// What one listener admits: its connection caps, deadlines, and where refusals are counted.
#[derive(Clone)]
pub struct Admission {
    /// `enroll`, `sign` or `admin` (in summary entries).
    pub port: &'static str,
    /// Open connections, overall and per source.
    pub connections: ConnectionLimiter,
    /// Time to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to send the first bytes after it.
    pub first_request_timeout: Duration,
    /// Counts a refused connection: (reason, peer, detail).
    pub refused: Arc<dyn Fn(crate::model::Reason, SocketAddr, String) + Send + Sync>,
}

/// Accepts TCP connections, admits each under the listener's caps (a connection over a cap is
/// closed at once, before any TLS work), completes each TLS handshake in its own task (bounded
/// by the handshake deadline, so a slow client cannot stall the loop), and yields the
/// streams. Refusals are counted into summary audit entries, never one write per connection.
/// The loop ends when the returned stream is dropped, or when the listening socket fails for
/// good (then the server on it stops and [`super::SiteHandle::died`] reports it).
pub fn incoming(
    listener: TcpListener,
    config: TlsCell,
    admission: Admission,
) -> ReceiverStream<Result<BufferedTls, io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) if accept_error_is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => {
                    // The listening socket itself is broken: end the stream, so the server
                    // stops and the daemon exits naming this listener, instead of a live
                    // process that accepts nothing.
                    tracing::error!(error = %e, "accept failed for good; the listener stops");
                    break;
                }
            };
            let permit = match admission.connections.admit(peer.ip()) {
                Ok(p) => p,
                Err(refusal) => {
                    drop(tcp);
                    (admission.refused)(
                        refusal.reason(),
                        peer,
                        format!("{} port: connection refused at its cap", admission.port),
                    );
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let current = config.read().unwrap_or_else(|p| p.into_inner()).clone();
            let (acceptor, tx, admission) =
                (TlsAcceptor::from(current), tx.clone(), admission.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(admission.handshake_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => {
                        let stream = BufferedTls::new(tls, admission.first_request_timeout, permit);
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => (admission.refused)(
                        crate::model::Reason::Handshake,
                        peer,
                        format!("{} port: {}", admission.port, handshake_reason(&e)),
                    ),
                    Err(_) => (admission.refused)(
                        crate::model::Reason::HandshakeTimeout,
                        peer,
                        format!(
                            "{} port: no TLS handshake within {:?}",
                            admission.port, admission.handshake_timeout
                        ),
                    ),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// What a failed handshake says, without anything the client chose: rustls' error names the
/// failed check (an unknown or revoked issuer, no certificate, a bad message); I/O errors are
/// reduced to their kind.
fn handshake_reason(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => crate::model::bounded(&tls.to_string(), 160),
        None => format!("{:?}", e.kind()),
    }
}
