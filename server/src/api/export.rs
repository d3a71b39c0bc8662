//! The audit export stream: JSON lines in seq order, filters turned into omitted-entry lines.
//!
//! Owns: paging the log into a stream. Must not touch: the chain (`audit`).

use std::sync::Arc;

use meshsign_evidence::audit::{AuditRecord, ExportLine, Omitted};
use meshsign_proto::v1;
use tokio::sync::mpsc;
use tonic::Status;

use super::status::status;
use crate::audit::{AuditError, StoredEntry};
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
    #[error("the page reader stopped: {0}")]
    Reader(#[from] tokio::task::JoinError),
}

impl Refusal for ExportError {
    fn reason(&self) -> Reason {
        Reason::Internal
    }

    fn kind(&self) -> RefusalKind {
        RefusalKind::Internal
    }
}

/// Entries per page read from an embedded store.
const PAGE: usize = 512;
/// Entries per page read from a shared store (PostgreSQL): each page is a statement, and a
/// larger one spreads its round trip, its plan and the pool's hand-off over more rows. Only
/// the export reads pages this large (the time search reads `PAGE`).
const SHARED_PAGE: usize = 2048;

fn keep(r: &AuditRecord, q: &v1::ExportAuditRequest) -> bool {
    r.checkpoint.is_some()
        || ((q.environment.is_empty() || r.environment == q.environment)
            && (q.job_id.is_empty() || r.job_id == q.job_id)
            && q.wanted_decision().is_none_or(|d| r.decision == d))
}

fn line(r: AuditRecord, q: &v1::ExportAuditRequest, first: bool) -> Result<String, Status> {
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
    serde_json::to_string(&l).map_err(|e| status(&ExportError::from(e)))
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

/// One entry of a page, ready to become a line: a record to filter and encode, or (in an
/// unfiltered export) its stored JSON, which is already the line.
enum Item {
    Record(Box<AuditRecord>),
    Stored(StoredEntry),
}

impl Item {
    fn seq(&self) -> u64 {
        match self {
            Item::Record(r) => r.seq,
            Item::Stored(e) => e.seq,
        }
    }

    fn into_line(self, q: &v1::ExportAuditRequest, first: bool) -> Result<String, Status> {
        match self {
            Item::Record(r) => line(*r, q, first),
            Item::Stored(e) => Ok(e.json),
        }
    }
}

/// Bytes of lines the site puts in one message at most (unless one line alone is longer):
/// about the response encoder's chunk (it hands the transport 32 KiB at a time). Measured
/// against 256 KiB: no difference (BENCHMARKS.md, issue 30, session 33).
const MESSAGE_BYTES: usize = 32 * 1024;

/// A page's lines as messages: one line each, or — when the client takes more than one
/// (`lines_per_message`) — several per message: the cost of a message (its encoding, its
/// poll, its decoding at the client) spread over many lines. A message never spans pages,
/// so no line waits for the next page.
struct Messages {
    per: usize,
    lines: Vec<prost::bytes::Bytes>,
    bytes: usize,
    out: Vec<Result<v1::ExportLine, Status>>,
}

impl Messages {
    fn new(q: &v1::ExportAuditRequest, page_len: usize) -> Self {
        let per = usize::try_from(q.lines_per_message)
            .unwrap_or(usize::MAX)
            .max(1);
        Self {
            per,
            lines: Vec::new(),
            bytes: 0,
            out: Vec::with_capacity(if per > 1 { 4 } else { page_len }),
        }
    }

    fn push(&mut self, line: Result<String, Status>) {
        let json = match line {
            Ok(json) if self.per > 1 => json,
            Ok(json) => {
                self.out.push(Ok(v1::ExportLine {
                    json,
                    ..Default::default()
                }));
                return;
            }
            Err(e) => {
                self.close();
                self.out.push(Err(e));
                return;
            }
        };
        if !self.lines.is_empty() && self.bytes + json.len() > MESSAGE_BYTES {
            self.close();
        }
        self.bytes += json.len();
        // (A `String`'s buffer becomes the `Bytes` as it is: no copy.)
        self.lines.push(json.into_bytes().into());
        if self.lines.len() >= self.per {
            self.close();
        }
    }

    fn close(&mut self) {
        if self.lines.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.lines);
        self.bytes = 0;
        self.out.push(Ok(v1::ExportLine {
            lines,
            ..Default::default()
        }));
    }

    fn finish(mut self) -> Vec<Result<v1::ExportLine, Status>> {
        self.close();
        self.out
    }
}

/// Whether `q` keeps every entry (then its lines are the stored entries as they are).
fn unfiltered(q: &v1::ExportAuditRequest) -> bool {
    q.environment.is_empty() && q.job_id.is_empty() && q.wanted_decision().is_none()
}

/// The page of up to `len` entries from `from` (a blocking store read: run off the async
/// workers).
fn page(site: &SiteState, from: u64, len: usize, unfiltered: bool) -> Result<Vec<Item>, Status> {
    let items = if unfiltered {
        site.audit
            .range_stored(from, len)
            .map(|v| v.into_iter().map(Item::Stored).collect())
    } else {
        site.audit
            .range(from, len)
            .map(|v| v.into_iter().map(|r| Item::Record(Box::new(r))).collect())
    };
    items.map_err(|e| status(&ExportError::from(e)))
}

/// A page being read on a blocking thread (its first seq, the read), so the next pages are
/// read while this one is sent: on PostgreSQL a page is a query whose time is mostly the
/// database's and the wire's, and queries on the pool's connections run side by side.
type Ahead = (u64, tokio::task::JoinHandle<Result<Vec<Item>, Status>>);

/// Pages read ahead of the one being sent (at most `READ_AHEAD` pages held).
const READ_AHEAD: usize = 3;

fn read_ahead(site: &Arc<SiteState>, from: u64, len: usize, unfiltered: bool) -> Ahead {
    let site = site.clone();
    let read = tokio::task::spawn_blocking(move || page(&site, from, len, unfiltered));
    (from, read)
}

/// The export as a stream; with `follow`, it waits for new entries until the client goes away.
pub fn stream(site: Arc<SiteState>, q: v1::ExportAuditRequest) -> Lines {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut next = match start_seq(&site, &q) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(vec![Err(e)]).await;
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
        let unfiltered = unfiltered(&q);
        // On a shared store every entry in it is committed (a PostgreSQL transaction per group
        // commit), and other replicas add entries this replica's head does not see: read up to
        // the end, and look again every half second when following.
        let shared = site.store.kv().chain().is_some();
        let len = if shared { SHARED_PAGE } else { PAGE };
        let mut ahead: std::collections::VecDeque<Ahead> = std::collections::VecDeque::new();
        loop {
            // The page read ahead if it starts where this one must; else (a guess that missed:
            // a gap, the durable head) drop the guesses and read it now.
            let read = match ahead.pop_front() {
                Some((from, read)) if from == next => read,
                _ => {
                    ahead.clear();
                    read_ahead(&site, next, len, unfiltered).1
                }
            };
            let page = match read.await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    let _ = tx.send(vec![Err(e)]).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(vec![Err(status(&ExportError::from(e)))]).await;
                    return;
                }
            };
            let durable = if shared { u64::MAX } else { *head.borrow() };
            // Seqs are gapless past the oldest kept entry: a full page of them is followed by
            // the page from its last seq + 1, and the one after that a page's length further.
            if let Some(last) = page.last().map(Item::seq).filter(|l| *l <= durable) {
                let full = page.len() == len && page.first().map(Item::seq) == Some(next);
                let want = if full { READ_AHEAD } else { 1 };
                let mut from = ahead.back().map_or(last + 1, |(f, _)| f + len as u64);
                while ahead.len() < want {
                    ahead.push_back(read_ahead(&site, from, len, unfiltered));
                    from += len as u64;
                }
            }
            // The page's lines go to the response whole: its encoder then fills whole frames
            // instead of waking for each line.
            let mut messages = Messages::new(&q, page.len());
            let mut failed = false;
            for item in page.into_iter().take_while(|i| i.seq() <= durable) {
                next = item.seq() + 1;
                let line = item.into_line(&q, first);
                failed = line.is_err();
                messages.push(line);
                first = false;
                if failed {
                    break;
                }
            }
            let lines = messages.finish();
            let sent = !lines.is_empty();
            if (sent && tx.send(lines).await.is_err()) || failed {
                return;
            }
            if sent {
                continue;
            }
            // Reached the durable head: an unfiltered export from the start now covers it all.
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
    Lines {
        rx,
        page: Vec::new().into_iter(),
    }
}

/// The export's lines: pages come whole from the reading task and go out line by line.
pub struct Lines {
    rx: mpsc::Receiver<Vec<Result<v1::ExportLine, Status>>>,
    page: std::vec::IntoIter<Result<v1::ExportLine, Status>>,
}

impl tokio_stream::Stream for Lines {
    type Item = Result<v1::ExportLine, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some(line) = self.page.next() {
                return std::task::Poll::Ready(Some(line));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(page) => self.page = page.into_iter(),
                None => return std::task::Poll::Ready(None),
            }
        }
    }
}
