//! Counters and histograms the site keeps for Prometheus (issue 15): decisions by RPC,
//! environment, decision and reason; request latency per port; counted refusals. Gauges that are
//! facts of the state (audit head, checkpoint age, expiry of certificates, key ages) are read at
//! scrape time by the transport (`api::metrics`), not kept here.
//!
//! Owns: the counting and the text exposition format. Must not touch: the network, the state.
//!
//! Label values come from decisions, so some come from the network (an unknown environment, a
//! reason's context): at most [`MAX_SERIES`] label sets are kept; beyond that, new ones are
//! counted under `(other)`, so no client can grow the scrape or the memory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Most label sets kept per counter.
pub const MAX_SERIES: usize = 2000;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A counter with labels.
#[derive(Debug, Default)]
struct Labeled {
    series: Mutex<Series>,
}

/// A counter's label sets, keyed by their [`Series::key`] so that counting one that exists
/// (every request counts a decision) allocates nothing.
#[derive(Debug, Default)]
struct Series {
    counts: std::collections::HashMap<String, (Vec<String>, u64)>,
    /// The key of the label set being counted, reused from call to call.
    scratch: String,
}

impl Series {
    /// Writes the key of `labels` into `out`: each label as its length, `:`, the label, so
    /// no two label sets share a key whatever characters they hold.
    fn key(out: &mut String, labels: &[&str]) {
        out.clear();
        for l in labels {
            let _ = write!(out, "{}:", l.len());
            out.push_str(l);
        }
    }
}

impl Labeled {
    fn add(&self, labels: &[&str], n: u64) {
        let mut guard = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        Series::key(&mut s.scratch, labels);
        if let Some((_, count)) = s.counts.get_mut(s.scratch.as_str()) {
            *count += n;
            return;
        }
        let other = vec!["(other)"; labels.len()];
        let labels = if s.counts.len() < MAX_SERIES {
            labels
        } else {
            Series::key(&mut s.scratch, &other);
            &other
        };
        s.counts
            .entry(s.scratch.clone())
            .or_insert_with(|| (labels.iter().map(|l| l.to_string()).collect(), 0))
            .1 += n;
    }

    fn snapshot(&self) -> BTreeMap<Vec<String>, u64> {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counts
            .values()
            .cloned()
            .collect()
    }
}

/// A latency histogram.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if s <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// The buckets, sum and count of series `name` with `labels` (already escaped).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{le}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"+Inf\"}} {count}\n{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {count}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
}

/// gRPC status codes by number, named as `codes.Code.String()` in grpc-go (what
/// go-grpc-prometheus puts in `grpc_code`, so stock dashboards match).
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// One gRPC method the site serves, as go-grpc-prometheus labels it.
#[derive(Debug, Clone)]
pub struct RpcMethod {
    /// Fully qualified service (`meshsign.v1.Signer`).
    pub service: String,
    /// Method (`Sign`).
    pub method: String,
    /// `unary`, `client_stream`, `server_stream` or `bidi_stream`.
    pub kind: &'static str,
}

/// Every method the site serves, from the descriptors it was built with (meshsign's own,
/// gRPC health and reflection), and one last entry, `unknown`, for any other path: the label
/// values of the per-RPC series come from this table, never from the request.
static RPC_TABLE: std::sync::LazyLock<Vec<RpcMethod>> = std::sync::LazyLock::new(|| {
    use prost::Message as _;
    let mut out = Vec::new();
    for fds in [
        meshsign_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(fds) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                for m in &service.method {
                    let kind = match (m.client_streaming(), m.server_streaming()) {
                        (false, false) => "unary",
                        (true, false) => "client_stream",
                        (false, true) => "server_stream",
                        (true, true) => "bidi_stream",
                    };
                    out.push(RpcMethod {
                        service: format!("{}.{}", file.package(), service.name()),
                        method: m.name().to_string(),
                        kind,
                    });
                }
            }
        }
    }
    out.push(RpcMethod {
        service: "unknown".into(),
        method: "unknown".into(),
        kind: "unknown",
    });
    out
});

/// The index in [`RPC_TABLE`] of a request path (`/meshsign.v1.Signer/Sign`).
pub fn rpc_index(path: &str) -> usize {
    static BY_PATH: std::sync::LazyLock<std::collections::HashMap<String, usize>> =
        std::sync::LazyLock::new(|| {
            RPC_TABLE
                .iter()
                .enumerate()
                .map(|(i, m)| (format!("/{}/{}", m.service, m.method), i))
                .collect()
        });
    BY_PATH
        .get(path)
        .copied()
        .unwrap_or(RPC_TABLE.len().saturating_sub(1))
}

/// Per-method counts: started, handled by code, handling time.
#[derive(Debug, Default)]
struct RpcCounts {
    started: AtomicU64,
    handled: [AtomicU64; GRPC_CODES.len()],
    seconds: Histogram,
}

/// [`RpcCounts`] for every entry of [`RPC_TABLE`].
#[derive(Debug)]
struct RpcStats(Vec<RpcCounts>);

impl Default for RpcStats {
    fn default() -> Self {
        Self((0..RPC_TABLE.len()).map(|_| RpcCounts::default()).collect())
    }
}

/// Live certificates per environment, and when they were counted.
pub type LiveCount = (std::time::Instant, Vec<(String, u64)>);

/// The site's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    decisions: Labeled,
    counted_refusals: Labeled,
    issued: Labeled,
    renewals: Labeled,
    abandoned: Labeled,
    latency: [Histogram; 3],
    rpcs: RpcStats,
    /// Requests each listener is serving now (what load shedding counts).
    in_flight: [AtomicI64; 3],
    /// Unix seconds of the last signed checkpoint (0: none yet in this process).
    pub last_checkpoint_unix: AtomicI64,
    /// Bytes in the audit journal.
    pub journal_bytes: AtomicU64,
    /// Failed store writes (audit commits that failed).
    pub store_errors: AtomicU64,
    /// Wall-clock steps larger than the token leeway seen by housekeeping.
    pub clock_steps: AtomicU64,
    /// The last count of live certificates per environment and when it was made (counting
    /// reads every issuance record, so scrapes reuse it for a while).
    pub live_certificates: Mutex<Option<LiveCount>>,
}

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Enroll (and public verification material).
    Enroll,
    /// Sign.
    Sign,
    /// Admin.
    Admin,
}

impl Port {
    fn index(self) -> usize {
        self as usize
    }

    /// The name used in labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Port::Enroll => "enroll",
            Port::Sign => "sign",
            Port::Admin => "admin",
        }
    }

    /// From a port name.
    pub fn parse(s: &str) -> Option<Self> {
        [Port::Enroll, Port::Sign, Port::Admin]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// A label value made safe for the exposition format (quotes, backslashes, newlines escaped;
/// bounded).
fn label(v: &str) -> String {
    let v: String = v.chars().take(64).collect();
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// One decision written to the audit log.
    pub fn decision(&self, rpc: &str, environment: &str, decision: &str, reason: &str) {
        let allowed = decision == "allow";
        if allowed && (rpc == "Enroll" || rpc == "Renew") {
            self.issued.add(&[environment, rpc], 1);
        }
        if rpc == "Renew" {
            self.renewals.add(
                &[
                    environment,
                    if allowed { "ok" } else { "failed" },
                    if allowed { "" } else { reason },
                ],
                1,
            );
        }
        self.decisions.add(&[rpc, environment, decision, reason], 1);
    }

    /// A session of `environment` was abandoned (`state::sessions`), counted by this replica.
    pub fn session_abandoned(&self, environment: &str) {
        self.abandoned.add(&[environment], 1);
    }

    /// Sessions of `environment` this replica counted as abandoned.
    pub fn sessions_abandoned(&self, environment: &str) -> u64 {
        self.abandoned
            .snapshot()
            .get(&vec![environment.to_string()])
            .copied()
            .unwrap_or(0)
    }

    /// A refusal counted into a summary entry (rate limits, shedding, handshakes).
    pub fn counted_refusal(&self, rpc: &str, reason: &str) {
        self.counted_refusals.add(&[rpc, reason], 1);
    }

    /// A request on `port` started (+1) or was answered (-1).
    pub fn in_flight_add(&self, port: Port, delta: i64) {
        self.in_flight[port.index()].fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
    }

    /// Requests `port` is serving now: what tests wait on instead of sleeping.
    pub fn in_flight(&self, port: Port) -> i64 {
        self.in_flight[port.index()].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long one request on `port` took.
    pub fn request(&self, port: Port, took: Duration) {
        self.latency[port.index()].observe(took);
    }

    /// A gRPC call to method `rpc` (from [`rpc_index`]) started.
    pub fn rpc_started(&self, rpc: usize) {
        if let Some(c) = self.rpcs.0.get(rpc) {
            c.started.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A gRPC call to method `rpc` ended with status `code` (its number) after `took`.
    pub fn rpc_handled(&self, rpc: usize, code: i32, took: Duration) {
        if let Some(c) = self.rpcs.0.get(rpc) {
            let code = usize::try_from(code)
                .ok()
                .filter(|c| *c < GRPC_CODES.len())
                .unwrap_or(2); // Unknown
            c.handled[code].fetch_add(1, Ordering::Relaxed);
            c.seconds.observe(took);
        }
    }

    /// The per-RPC series under go-grpc-prometheus' names: `grpc_server_started_total`,
    /// `grpc_server_handled_total` (with `grpc_code`) and the `grpc_server_handling_seconds`
    /// histogram, for every method called at least once.
    fn render_rpcs(&self, out: &mut String) {
        let called: Vec<(&RpcMethod, &RpcCounts)> = RPC_TABLE
            .iter()
            .zip(self.rpcs.0.iter())
            .filter(|(_, c)| c.started.load(Ordering::Relaxed) > 0)
            .collect();
        let labels = |m: &RpcMethod| {
            format!(
                "grpc_type=\"{}\",grpc_service=\"{}\",grpc_method=\"{}\"",
                m.kind,
                label(&m.service),
                label(&m.method)
            )
        };
        let _ = writeln!(
            out,
            "# HELP grpc_server_started_total Total number of RPCs started on the server.\n# TYPE grpc_server_started_total counter"
        );
        for (m, c) in &called {
            let _ = writeln!(
                out,
                "grpc_server_started_total{{{}}} {}",
                labels(m),
                c.started.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n# TYPE grpc_server_handled_total counter"
        );
        for (m, c) in &called {
            for (code, n) in GRPC_CODES.iter().zip(c.handled.iter()) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "grpc_server_handled_total{{{},grpc_code=\"{code}\"}} {n}",
                        labels(m)
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP grpc_server_handling_seconds Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.\n# TYPE grpc_server_handling_seconds histogram"
        );
        for (m, c) in &called {
            c.seconds
                .render(out, "grpc_server_handling_seconds", &labels(m));
        }
    }

    /// The counters and histograms in Prometheus' text format (gauges are added by the caller).
    pub fn render(&self, out: &mut String) {
        self.render_rpcs(out);
        let _ = writeln!(
            out,
            "# HELP meshsign_decisions_total Decisions written to the audit log, by RPC, environment, decision and reason.\n# TYPE meshsign_decisions_total counter"
        );
        for (l, n) in self.decisions.snapshot() {
            let _ = writeln!(
                out,
                "meshsign_decisions_total{{rpc=\"{}\",environment=\"{}\",decision=\"{}\",reason=\"{}\"}} {n}",
                label(&l[0]),
                label(&l[1]),
                label(&l[2]),
                label(&l[3])
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshsign_counted_refusals_total Refusals counted into summary entries (rate limits, load shedding, refused connections and handshakes, unknown operators).\n# TYPE meshsign_counted_refusals_total counter"
        );
        for (l, n) in self.counted_refusals.snapshot() {
            let _ = writeln!(
                out,
                "meshsign_counted_refusals_total{{rpc=\"{}\",reason=\"{}\"}} {n}",
                label(&l[0]),
                label(&l[1])
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshsign_certificates_issued_total Runner certificates issued, by environment and RPC (Enroll or Renew).\n# TYPE meshsign_certificates_issued_total counter"
        );
        for (l, n) in self.issued.snapshot() {
            let _ = writeln!(
                out,
                "meshsign_certificates_issued_total{{environment=\"{}\",rpc=\"{}\"}} {n}",
                label(&l[0]),
                label(&l[1])
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshsign_renewals_total Certificate renewals by environment and result (ok, failed) with the refusal's reason.\n# TYPE meshsign_renewals_total counter"
        );
        for (l, n) in self.renewals.snapshot() {
            let _ = writeln!(
                out,
                "meshsign_renewals_total{{environment=\"{}\",result=\"{}\",reason=\"{}\"}} {n}",
                label(&l[0]),
                label(&l[1]),
                label(&l[2])
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshsign_request_duration_seconds Time to answer a request, by port.\n# TYPE meshsign_request_duration_seconds histogram"
        );
        for port in [Port::Enroll, Port::Sign, Port::Admin] {
            self.latency[port.index()].render(
                out,
                "meshsign_request_duration_seconds",
                &format!("port=\"{}\"", port.as_str()),
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshsign_requests_in_flight Requests each listener is serving now (load shedding refuses beyond [limits] max_requests_in_flight).\n# TYPE meshsign_requests_in_flight gauge"
        );
        for port in [Port::Enroll, Port::Sign, Port::Admin] {
            let _ = writeln!(
                out,
                "meshsign_requests_in_flight{{port=\"{}\"}} {}",
                port.as_str(),
                self.in_flight(port)
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshsign_store_errors_total Audit commits that failed (the store or database did not take the write).\n# TYPE meshsign_store_errors_total counter\nmeshsign_store_errors_total {}",
            self.store_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshsign_clock_steps_total Wall-clock steps larger than the token leeway, measured against the monotonic clock.\n# TYPE meshsign_clock_steps_total counter\nmeshsign_clock_steps_total {}",
            self.clock_steps.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshsign_audit_journal_bytes Bytes in the audit journal.\n# TYPE meshsign_audit_journal_bytes gauge\nmeshsign_audit_journal_bytes {}",
            self.journal_bytes.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_label_values_cannot_grow_or_break_the_exposition() {
        let m = Metrics::default();
        for i in 0..(MAX_SERIES + 500) {
            m.decision("Enroll", &format!("env-{i}\"\n}} 1"), "deny", "environment");
        }
        let mut out = String::new();
        m.render(&mut out);
        let lines = out
            .lines()
            .filter(|l| l.starts_with("meshsign_decisions_total{"))
            .count();
        assert_eq!(lines, MAX_SERIES + 1, "the rest is counted under (other)");
        assert!(out.contains("environment=\"(other)\""));
        for l in out.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit_once(' ').map(|(_, v)| v).unwrap_or("");
            assert!(value.parse::<f64>().is_ok(), "one sample per line: {l:?}");
        }
    }

    #[test]
    fn the_histogram_is_cumulative() {
        let m = Metrics::default();
        m.request(Port::Sign, Duration::from_millis(3));
        m.request(Port::Sign, Duration::from_millis(300));
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("meshsign_request_duration_seconds_bucket{port=\"sign\",le=\"0.005\"} 1")
        );
        assert!(
            out.contains("meshsign_request_duration_seconds_bucket{port=\"sign\",le=\"0.5\"} 2")
        );
        assert!(out.contains("meshsign_request_duration_seconds_count{port=\"sign\"} 2"));
    }
}
