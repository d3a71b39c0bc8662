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
        match self.layer.in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let fut = self.inner.call(req);
                let (metrics, port) = (self.layer.metrics.clone(), self.layer.port);
                let port = crate::metrics::Port::parse(port);
                let counted = InFlight::start(metrics.clone(), port);
                let started = std::time::Instant::now();
                Box::pin(async move {
                    let out = fut.await;
                    drop(permit);
                    drop(counted);
                    if let Some(p) = port {
                        metrics.request(p, started.elapsed());
                    }
                    out
                })
            }
            Err(_) => {
                let refusal = Overloaded {
                    port: self.layer.port,
                    max: self.layer.max,
                };
                (self.layer.on_shed)(&refusal, peer_of(&req));
                let response = super::status::status(&refusal).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
