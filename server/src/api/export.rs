//! The audit export stream: JSON lines in seq order, filters turned into omitted-entry lines.
//!
//! Owns: paging the log into a stream. Must not touch: the chain (`audit`).

use std::sync::Arc;

use meshsign_evidence::audit::{AuditRecord, ExportLine, Omitted};
use meshsign_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::status::status;
use crate::audit::AuditError;
use crate::model::Reason;
use crate::model::{Refusal, RefusalKind};
use crate::state::SiteState;

/// Why an export stopped (internal faults: logged under an error id).
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("reading the log: {0}")]
    Read(#[from] AuditError),
    #[error("encoding an export line: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Refusal for ExportError {
    fn reason(&self) -> Reason {
        Reason::Internal
    }

    fn kind(&self) -> RefusalKind {
        RefusalKind::Internal
    }
}

const PAGE: usize = 512;

fn keep(r: &AuditRecord, q: &v1::ExportAuditRequest) -> bool {
    r.checkpoint.is_some()
        || ((q.environment.is_empty() || r.environment == q.environment)
            && (q.job_id.is_empty() || r.job_id == q.job_id)
            && q.wanted_decision().is_none_or(|d| r.decision == d))
}

fn line(r: AuditRecord, q: &v1::ExportAuditRequest, first: bool) -> Result<v1::ExportLine, Status> {
    let l = if keep(&r, q) {
        ExportLine::Entry(Box::new(r))
    } else {
        let prev_hash = first.then(|| r.prev_hash.clone());
        ExportLine::Omitted(Omitted {
            seq: r.seq,
            body_hash: r.body_hash(),
            omitted: true,
            prev_hash,
        })
    };
    serde_json::to_string(&l)
        .map(|json| v1::ExportLine { json })
        .map_err(|e| status(&ExportError::from(e)))
}

fn start_seq(site: &SiteState, q: &v1::ExportAuditRequest) -> Result<u64, Status> {
    if q.since_time == 0 {
        return Ok(q.since_seq.max(1));
    }
    // First entry at or after since_time (entries are in time order).
    let mut from = 1;
    loop {
        let page = site
            .audit
            .range(from, PAGE)
            .map_err(|e| status(&ExportError::from(e)))?;
        let Some(last) = page.last() else {
            return Ok(from);
        };
        for r in &page {
            let t = ::time::OffsetDateTime::parse(
                &r.ts,
                &::time::format_description::well_known::Rfc3339,
            )
            .map(|t| t.unix_timestamp())
            .unwrap_or(0);
            if t >= q.since_time {
                return Ok(r.seq.max(q.since_seq));
            }
        }
        from = last.seq + 1;
    }
}

/// The export as a stream; with `follow`, it waits for new entries until the client goes away.
pub fn stream(
    site: Arc<SiteState>,
    q: v1::ExportAuditRequest,
) -> ReceiverStream<Result<v1::ExportLine, Status>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut next = match start_seq(&site, &q) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut head = site.audit.head();
        let mut first = true;
        let oldest = site
            .audit
            .range(0, 1)
            .ok()
            .and_then(|v| v.first().map(|r| r.seq))
            .unwrap_or(1);
        let started_at_first = next <= oldest;
        // On a shared store every entry in it is committed (a PostgreSQL transaction per group
        // commit), and other replicas add entries this replica's head does not see: read up to
        // the end, and look again every half second when following.
        let shared = site.store.kv().chain().is_some();
        loop {
            let page = match site.audit.range(next, PAGE) {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(status(&ExportError::from(e)))).await;
                    return;
                }
            };
            let durable = if shared { u64::MAX } else { *head.borrow() };
            let mut sent = false;
            for r in page.into_iter().take_while(|r| r.seq <= durable) {
                next = r.seq + 1;
                sent = true;
                if tx.send(line(r, &q, first)).await.is_err() {
                    return;
                }
                first = false;
            }
            if sent {
                continue;
            }
            // Reached the durable head: an unfiltered export from the start now covers it all.
            let unfiltered =
                q.environment.is_empty() && q.job_id.is_empty() && q.wanted_decision().is_none();
            if unfiltered && started_at_first && next > 1 {
                let _ = site.audit.mark_exported(next - 1);
            }
            if !q.follow {
                return;
            }
            let poll = async {
                if shared {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await
                } else {
                    std::future::pending::<()>().await
                }
            };
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                () = poll => {},
                () = tx.closed() => return,
            }
        }
    });
    ReceiverStream::new(rx)
}
