//! Load shedding: each listener serves at most `[limits] max_requests_in_flight` requests at
//! once; a request beyond that is answered at once with `RESOURCE_EXHAUSTED` (`overloaded: …`)
//! instead of queueing behind the others, and counted into a summary audit entry.
//!
//! Owns: the in-flight count of a listener. Must not touch: anything a request asks for.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::codegen::{Service, http};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::model::Reason;
use crate::model::{Refusal, RefusalKind};

/// The refusal of a shed request.
#[derive(Debug, thiserror::Error)]
#[error("the {port} port is serving its maximum of {max} requests; retry shortly")]
pub struct Overloaded {
    /// Which listener.
    pub port: &'static str,
    /// Its limit.
    pub max: u32,
}

impl Refusal for Overloaded {
    fn reason(&self) -> Reason {
        Reason::Overloaded
    }

    fn kind(&self) -> RefusalKind {
        RefusalKind::ResourceExhausted
    }
}

/// Counts a shed request: (refusal, peer if known).
pub type OnShed = Arc<dyn Fn(&Overloaded, Option<SocketAddr>) + Send + Sync>;

/// The tower layer that sheds a listener's excess requests.
#[derive(Clone)]
pub struct ShedLayer {
    port: &'static str,
    max: u32,
    in_flight: Arc<Semaphore>,
    on_shed: OnShed,
    metrics: Arc<crate::metrics::Metrics>,
}

impl ShedLayer {
    /// At most `max` requests at once on `port`; each answered request's time goes to
    /// `metrics`.
    pub fn new(
        port: &'static str,
        max: u32,
        on_shed: OnShed,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            port,
            max,
            in_flight: Arc::new(Semaphore::new(max as usize)),
            on_shed,
            metrics,
        }
    }
}

impl<S> tower_layer::Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// One request counted in `meshsign_requests_in_flight` until it is answered or dropped (a
/// cancelled request's future is dropped without finishing).
struct InFlight(Arc<crate::metrics::Metrics>, Option<crate::metrics::Port>);

impl InFlight {
    fn start(metrics: Arc<crate::metrics::Metrics>, port: Option<crate::metrics::Port>) -> Self {
        if let Some(p) = port {
            metrics.in_flight_add(p, 1);
        }
        Self(metrics, port)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(p) = self.1 {
            self.0.in_flight_add(p, -1);
        }
    }
}

/// [`ShedLayer`]'s service.
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

fn peer_of<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
}

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = crate::metrics::rpc_index(req.uri().path());
        let metrics = self.layer.metrics.clone();
        metrics.rpc_started(rpc);
        let started = std::time::Instant::now();
        match self.layer.in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let fut = self.inner.call(req);
                let port = crate::metrics::Port::parse(self.layer.port);
                let counted = InFlight::start(metrics.clone(), port);
                Box::pin(async move {
                    let out = fut.await;
                    drop(permit);
                    drop(counted);
                    if let Some(p) = port {
                        metrics.request(p, started.elapsed());
                    }
                    out.map(|response| Handled::watch(response, metrics, rpc, started))
                })
            }
            Err(_) => {
                let refusal = Overloaded {
                    port: self.layer.port,
                    max: self.layer.max,
                };
                (self.layer.on_shed)(&refusal, peer_of(&req));
                let response = super::status::status(&refusal).into_http();
                let response = Handled::watch(response, metrics, rpc, started);
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// Counts a call as handled (`grpc_server_handled_total`, `grpc_server_handling_seconds`) once
/// its status is known: from the response headers (a trailers-only answer, as every refusal
/// is), else from the trailers at the end of the body; a body dropped before its trailers (the
/// client went away) counts as `Canceled`, one that ends without them as `Unknown`.
struct Handled {
    inner: tonic::body::Body,
    metrics: Arc<crate::metrics::Metrics>,
    rpc: usize,
    started: std::time::Instant,
    done: bool,
}

/// The `grpc-status` of a header map, if it carries one.
fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

impl Handled {
    fn watch(
        response: http::Response<tonic::body::Body>,
        metrics: Arc<crate::metrics::Metrics>,
        rpc: usize,
        started: std::time::Instant,
    ) -> http::Response<tonic::body::Body> {
        if let Some(code) = grpc_status(response.headers()) {
            metrics.rpc_handled(rpc, code, started.elapsed());
            return response;
        }
        response.map(|inner| {
            tonic::body::Body::new(Handled {
                inner,
                metrics,
                rpc,
                started,
                done: false,
            })
        })
    }

    fn finish(&mut self, code: i32) {
        if !self.done {
            self.done = true;
            self.metrics
                .rpc_handled(self.rpc, code, self.started.elapsed());
        }
    }
}

impl Drop for Handled {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled as i32);
    }
}

impl hyper::body::Body for Handled {
    type Data = hyper::body::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(tonic::Code::Internal as i32),
            Poll::Ready(None) => self.finish(tonic::Code::Unknown as i32),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
