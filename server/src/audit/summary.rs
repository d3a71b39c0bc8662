//! Summary entries: refusals that a client can cause faster than one durable write each
//! (rate-limited requests, refused connections and handshakes, unidentified operators) are
//! counted here and written as **one audit entry per distinct refusal per interval**, with the
//! count and the first and last time in its detail.
//!
//! A refusal is "the same" when its record is the same apart from time: RPC, reason,
//! environment, job, serial, subject, operator, peer address (without the port) and detail. The
//! first refusal of a kind is also logged at once, so an operator watching the log sees a flood
//! start without waiting for the summary.
//!
//! Memory is bounded: at most [`MAX_KINDS`] distinct refusals are held per interval; beyond
//! that, refusals are merged by reason alone into one `(many sources)` entry, so no input can
//! grow the map or the number of writes.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{AuditError, AuditLog, AuditRecord};
use crate::model::log_safe;

/// Most distinct refusals held per interval.
pub const MAX_KINDS: usize = 1024;

#[derive(Debug)]
struct Tally {
    record: AuditRecord,
    count: u64,
    first: i64,
    last: i64,
}

/// Refusals counted since the last summary.
#[derive(Debug, Default)]
pub struct Summaries {
    tallies: Mutex<HashMap<String, Tally>>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

/// The peer without its port: one client reconnecting is one source.
pub fn source_of(peer: &str) -> String {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().to_string(),
        Err(_) => peer.to_string(),
    }
}

fn key_of(r: &AuditRecord) -> String {
    [
        r.rpc.as_str(),
        &r.reason,
        &r.environment,
        &r.job_id,
        &r.cert_serial,
        &r.subject,
        &r.operator,
        &r.peer,
        &r.detail,
        &r.key_id,
    ]
    .join("\u{0}")
}

impl Summaries {
    /// Summaries that also count each refusal in `metrics`.
    pub fn new(metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        Self {
            tallies: Mutex::default(),
            metrics: Some(metrics),
        }
    }

    /// Counts one refusal (`decision` and `reason` already filled, fields bounded). `now` is
    /// Unix seconds.
    pub fn count(&self, mut record: AuditRecord, now: i64) {
        if let Some(m) = &self.metrics {
            m.counted_refusal(&record.rpc, &record.reason);
        }
        record.peer = source_of(&record.peer);
        let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = key_of(&record);
        if !t.contains_key(&key) && t.len() >= MAX_KINDS {
            record = AuditRecord {
                rpc: record.rpc,
                decision: record.decision,
                reason: record.reason,
                environment: "(site)".into(),
                peer: "(many sources)".into(),
                detail: format!("more than {MAX_KINDS} distinct refusals in one interval"),
                ..Default::default()
            };
            key = key_of(&record);
        }
        match t.get_mut(&key) {
            Some(tally) => {
                tally.count += 1;
                tally.last = now;
            }
            None => {
                tracing::warn!(
                    rpc = %record.rpc, reason = %record.reason, peer = %log_safe(&record.peer),
                    detail = %log_safe(&record.detail),
                    "refused; further refusals like this one are counted into a summary entry"
                );
                t.insert(
                    key,
                    Tally {
                        record,
                        count: 1,
                        first: now,
                        last: now,
                    },
                );
            }
        }
    }

    /// Distinct refusals waiting for the next summary.
    pub fn pending(&self) -> usize {
        self.tallies.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Writes one entry per distinct refusal counted since the last call. Entries that cannot be
    /// written are counted again for the next call (a refusal is never silently dropped).
    pub async fn flush(&self, audit: &AuditLog) -> Result<usize, AuditError> {
        let taken: Vec<Tally> = {
            let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
            t.drain().map(|(_, v)| v).collect()
        };
        let mut written = 0;
        let mut failed: Option<AuditError> = None;
        for tally in taken {
            if failed.is_some() {
                self.restore(tally);
                continue;
            }
            let mut rec = tally.record.clone();
            let what = if rec.detail.is_empty() {
                String::new()
            } else {
                format!("{}; ", rec.detail)
            };
            rec.detail = format!(
                "{what}{} refusal(s) between {} and {} (summary)",
                tally.count, tally.first, tally.last
            );
            match audit.record(rec).await {
                Ok(_) => written += 1,
                Err(e) => {
                    failed = Some(e);
                    self.restore(tally);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }

    fn restore(&self, tally: Tally) {
        let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let key = key_of(&tally.record);
        match t.get_mut(&key) {
            Some(cur) => {
                cur.count += tally.count;
                cur.first = cur.first.min(tally.first);
            }
            None => {
                t.insert(key, tally);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(peer: &str, reason: &str) -> AuditRecord {
        AuditRecord {
            rpc: "Enroll".into(),
            decision: "deny".into(),
            reason: reason.into(),
            peer: peer.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_same_refusal_from_one_source_is_one_tally() {
        let s = Summaries::default();
        for port in 0..100 {
            s.count(
                refusal(&format!("10.0.0.1:{}", 1000 + port), "rate_limited"),
                5,
            );
        }
        s.count(refusal("10.0.0.2:1", "rate_limited"), 6);
        s.count(refusal("10.0.0.1:1", "handshake"), 6);
        assert_eq!(s.pending(), 3);
    }

    #[test]
    fn distinct_refusals_beyond_the_bound_merge() {
        let s = Summaries::default();
        for i in 0..(MAX_KINDS as u32 + 500) {
            let ip = std::net::Ipv4Addr::from(i);
            s.count(refusal(&format!("{ip}:1"), "rate_limited"), 1);
        }
        assert_eq!(s.pending(), MAX_KINDS + 1);
    }
}
