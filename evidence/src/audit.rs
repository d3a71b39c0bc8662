//! The audit log's wire format, hash chain and offline verification, shared by the site (which
//! writes it) and the client (which verifies exports without any service).
//!
//! ## Canonical encoding and the chain
//!
//! - `body_hash = SHA-256(canonical JSON of the record with "prev_hash" and "hash" set to "")`,
//!   where the canonical JSON is serde_json's compact output of [`AuditRecord`]: fields in
//!   declaration order, no whitespace, `null` for absent optional fields.
//! - `hash = SHA-256(prev ‖ body_hash)`, with `prev` the previous entry's hash (32 bytes; 32 zero
//!   bytes before the first entry). Both are lowercase hex in records.
//! - A **checkpoint** is itself an entry (`rpc = "Checkpoint"`) whose `checkpoint` field signs
//!   `"meshsign-audit-checkpoint-v1\n<region>\n<covers_seq>\n<head_hash>\n<time>"` (ECDSA P-256,
//!   SHA-256, DER) with the site's audit key; it covers every entry up to `covers_seq = seq − 1`,
//!   whose hash is `head_hash`.
//!
//! ## Exports
//!
//! An export is JSON lines, one per seq, in order. A filtered export replaces each entry it leaves
//! out with an [`Omitted`] line carrying only its `seq` and `body_hash`: the chain still
//! recomputes end to end, so filtered exports verify against the same signed checkpoints, and
//! nothing is revealed about the omitted entries. Checkpoints are never omitted.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// One audit entry. Inputs appear only as hashes; tokens never, only `jti`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Sequence number, from 1, gapless.
    pub seq: u64,
    /// RFC 3339 time of the decision.
    pub ts: String,
    /// Site region.
    pub site_region: String,
    /// RPC (`Enroll`, `Sign`, `SignBatch`, `RevokeSelf`, `Admin.*`, `Checkpoint`).
    pub rpc: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// `ok`, or the name of the check that failed.
    pub reason: String,
    /// Partition (`(site)` for site-wide entries).
    pub environment: String,
    /// CI job id.
    pub job_id: String,
    /// Token id.
    pub jti: String,
    /// Token issuer.
    pub token_issuer: String,
    /// Token subject (or the operator for admin entries).
    pub subject: String,
    /// Runner fingerprint.
    pub runner_fingerprint: String,
    /// Runner certificate serial (hex).
    pub cert_serial: String,
    /// Seconds the caller's certificate had left (sign decisions).
    pub ttl_remaining_sec: Option<i64>,
    /// `alias@vN`.
    pub key_id: String,
    /// SHA-256 digest signed (hex); for a batch, SHA-256 over the concatenated digests.
    pub digest: String,
    /// Number of digests signed (1, or the batch size).
    pub items: u32,
    /// Artifact name given by the caller.
    pub artifact: String,
    /// Repository claim.
    pub repository: String,
    /// Ref claim.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The CI provider whose claims were mapped (absent on entries without a token).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider: String,
    /// The pipeline id (GitHub run, GitLab pipeline, Buildkite build) of the job, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pipeline_id: String,
    /// Peer address.
    pub peer: String,
    /// Ops identity (SPIFFE ID) for admin actions.
    pub operator: String,
    /// What an admin action changed, in a few words.
    pub detail: String,
    /// Set on checkpoint entries.
    pub checkpoint: Option<Checkpoint>,
    /// The transparency-log leaves this decision added, one per signature the site made
    /// ([`crate::rekor`]): the entry names them, so the chain covers the transparency log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tlog: Option<TlogLeaves>,
    /// Hash of the previous entry (hex).
    pub prev_hash: String,
    /// This entry's hash (hex).
    pub hash: String,
}

/// Leaves of the transparency log written by one decision: `index`, `index + 1`, ….
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlogLeaves {
    /// The first leaf's index.
    pub index: u64,
    /// The leaf hashes (`SHA-256(0x00 ‖ body)`, 32 bytes each), concatenated, base64.
    pub leaves: String,
}

impl TlogLeaves {
    /// Most leaves one entry names (a SignBatch of 1,000 digests takes 43 KB of the entry).
    pub const MAX: usize = 1000;

    /// Names `leaves` from `index` on.
    pub fn new(index: u64, leaves: &[crate::merkle::Hash]) -> Self {
        use base64::Engine as _;
        Self {
            index,
            leaves: base64::engine::general_purpose::STANDARD.encode(leaves.concat()),
        }
    }

    /// The leaf hashes (none if the field is malformed).
    pub fn hashes(&self) -> Option<Vec<crate::merkle::Hash>> {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&self.leaves)
            .ok()?;
        if raw.len() % 32 != 0 || raw.len() / 32 > Self::MAX {
            return None;
        }
        raw.chunks(32)
            .map(|c| crate::merkle::Hash::try_from(c).ok())
            .collect()
    }

    /// The log's size after these leaves (none if malformed).
    pub fn end(&self) -> Option<u64> {
        let n = self.hashes()?.len() as u64;
        self.index.checked_add(n)
    }
}

/// A signed statement of the chain head.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The last entry covered (this entry's seq − 1).
    pub covers_seq: u64,
    /// Hash of entry `covers_seq`.
    pub head_hash: String,
    /// Unix seconds.
    pub time: i64,
    /// The audit key's id.
    pub key_id: String,
    /// ECDSA P-256 / SHA-256 signature, DER, hex.
    pub signature: String,
    /// The Merkle tree head over entries 1..=`covers_seq` as a C2SP signed note, signed by
    /// the same key ([`crate::note`]); absent on checkpoints written before the tree existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The transparency log's tree head at this checkpoint, a C2SP signed note (origin
    /// `<trust domain>/<region>/log`) signed by the same key; absent before the log existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_note: Option<String>,
}

impl Checkpoint {
    /// The bytes the audit key signs.
    pub fn message(region: &str, covers_seq: u64, head_hash: &str, time: i64) -> Vec<u8> {
        format!("meshsign-audit-checkpoint-v1\n{region}\n{covers_seq}\n{head_hash}\n{time}")
            .into_bytes()
    }
}

/// Hex of 32 zero bytes: the `prev_hash` of the first entry.
pub fn genesis() -> String {
    "0".repeat(64)
}

impl AuditRecord {
    /// The id returned to callers: `<region>-<seq>`.
    pub fn audit_id(&self) -> String {
        format!("{}-{}", self.site_region, self.seq)
    }

    /// The entry as the log stores it (canonical JSON, `prev_hash` and `hash` set): what its
    /// Merkle leaf hashes, SHA-256(0x00 || bytes).
    pub fn entry_bytes(&self) -> Vec<u8> {
        // Serializing plain fields cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// SHA-256 of the canonical body (hex).
    pub fn body_hash(&self) -> String {
        let mut body = self.clone();
        body.prev_hash = String::new();
        body.hash = String::new();
        // Serializing plain fields cannot fail.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }

    /// `SHA-256(prev ‖ body_hash)` (hex) for this entry's content and `prev_hash`.
    pub fn compute_hash(&self) -> String {
        chain(&self.prev_hash, &self.body_hash())
    }

    /// Chains the entry after `prev` (sets `prev_hash` and `hash`) and returns its JSON —
    /// the same bytes as `serde_json::to_vec(self)` — encoding the body only once: the body
    /// ends with the empty `prev_hash` and `hash`, which are spliced in. (The writer's hot path;
    /// [`AuditRecord::compute_hash`] is the reference it is tested against.)
    pub fn seal(&mut self, prev: &str) -> Vec<u8> {
        const TAIL: &[u8] = br#""prev_hash":"","hash":""}"#;
        self.prev_hash.clear();
        self.hash.clear();
        // One buffer for the body and then the entry (an entry per decision, on every
        // request's path); serializing plain fields cannot fail.
        let mut body = Vec::with_capacity(1024);
        if serde_json::to_writer(&mut body, &*self).is_err() {
            body.clear();
        }
        let body_hash: [u8; 32] = Sha256::digest(&body).into();
        self.prev_hash.push_str(prev);
        self.hash = chain_digest(prev, &body_hash);
        match body.strip_suffix(TAIL) {
            Some(head) if prev.bytes().all(|b| b.is_ascii_hexdigit()) => {
                let head = head.len();
                body.truncate(head);
                body.extend_from_slice(b"\"prev_hash\":\"");
                body.extend_from_slice(self.prev_hash.as_bytes());
                body.extend_from_slice(b"\",\"hash\":\"");
                body.extend_from_slice(self.hash.as_bytes());
                body.extend_from_slice(b"\"}");
                body
            }
            _ => serde_json::to_vec(&*self).unwrap_or_default(),
        }
    }
}

/// Longest text field of an entry, in bytes (a field that would be longer is recorded as an
/// [`excerpt`]).
pub const MAX_FIELD_BYTES: usize = 256;
/// Longest `detail`, in bytes.
pub const MAX_DETAIL_BYTES: usize = 1024;
/// Largest encoded entry: 21 text fields at [`MAX_FIELD_BYTES`], the detail, the checkpoint,
/// numbers and names, each character escaped by JSON at worst as `\u00XX` (6 bytes), and up
/// to [`TlogLeaves::MAX`] transparency leaves (43 KB of base64). A client that receives
/// exports sets its message limit above this, so no entry can stop an export.
pub const MAX_ENTRY_BYTES: usize = 128 * 1024;

/// `s` if it is at most `max` bytes; otherwise its longest prefix that leaves room for a
/// marker, then `…[sha256:<first 16 hex of SHA-256(s)>,<len> bytes]`. What an entry, a log line
/// or a message keeps of an oversized or invalid value: enough to recognise it, the hash to
/// match it against the original, never the whole of it.
pub fn excerpt(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let digest = hex::encode(Sha256::digest(s.as_bytes()));
    let marker = format!("…[sha256:{},{} bytes]", &digest[..16], s.len());
    let mut cut = max.saturating_sub(marker.len());
    while cut > 0 && !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{marker}", &s[..cut])
}

impl AuditRecord {
    /// Cuts every text field to its maximum ([`excerpt`]), so the entry fits in
    /// [`MAX_ENTRY_BYTES`] whatever went into it. The writer applies it to every entry.
    pub fn bound_fields(&mut self) {
        let cut = |f: &mut String, max: usize| {
            if f.len() > max {
                *f = excerpt(f, max);
            }
        };
        for f in [
            &mut self.ts,
            &mut self.site_region,
            &mut self.rpc,
            &mut self.decision,
            &mut self.reason,
            &mut self.environment,
            &mut self.job_id,
            &mut self.jti,
            &mut self.token_issuer,
            &mut self.subject,
            &mut self.runner_fingerprint,
            &mut self.cert_serial,
            &mut self.key_id,
            &mut self.digest,
            &mut self.artifact,
            &mut self.repository,
            &mut self.git_ref,
            &mut self.provider,
            &mut self.pipeline_id,
            &mut self.peer,
            &mut self.operator,
        ] {
            cut(f, MAX_FIELD_BYTES);
        }
        cut(&mut self.detail, MAX_DETAIL_BYTES);
        if let Some(c) = self.checkpoint.as_mut() {
            for f in [&mut c.head_hash, &mut c.key_id, &mut c.signature] {
                cut(f, MAX_FIELD_BYTES);
            }
            if let Some(n) = c.note.as_mut() {
                cut(n, MAX_DETAIL_BYTES);
            }
            if let Some(n) = c.log_note.as_mut() {
                cut(n, MAX_DETAIL_BYTES);
            }
        }
        // Leaves come from the site's own hashing, never from a caller; a malformed or
        // oversized list is dropped whole (the writer refuses such an entry before this).
        if self
            .tlog
            .as_ref()
            .is_some_and(|t| t.leaves.len() > TlogLeaves::MAX.div_ceil(3) * 4 * 32)
        {
            self.tlog = None;
        }
    }
}

/// `SHA-256(prev ‖ body_hash)`, both given as hex.
pub fn chain(prev_hex: &str, body_hash_hex: &str) -> String {
    chain_digest(prev_hex, &hex::decode(body_hash_hex).unwrap_or_default())
}

/// [`chain`] with the body hash as bytes: a 64-digit `prev_hex` (every entry's but a
/// malformed one's) is decoded on the stack.
fn chain_digest(prev_hex: &str, body_hash: &[u8]) -> String {
    let mut h = Sha256::new();
    let mut prev = [0u8; 32];
    if prev_hex.len() == 64 && hex::decode_to_slice(prev_hex, &mut prev).is_ok() {
        h.update(prev);
    } else {
        h.update(hex::decode(prev_hex).unwrap_or_default());
    }
    h.update(body_hash);
    hex::encode(h.finalize())
}

/// An entry left out of a filtered export.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Omitted {
    /// Its seq.
    pub seq: u64,
    /// Its body hash.
    pub body_hash: String,
    /// Always true (marks the line kind).
    pub omitted: bool,
    /// Set on the first line of an export only: the chain hash before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
}

/// One line of an export.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ExportLine {
    /// An entry left out by a filter.
    Omitted(Omitted),
    /// A whole entry.
    Entry(Box<AuditRecord>),
}

impl ExportLine {
    /// The line's seq.
    pub fn seq(&self) -> u64 {
        match self {
            ExportLine::Omitted(o) => o.seq,
            ExportLine::Entry(e) => e.seq,
        }
    }
}

/// Where and why an export failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log invalid at seq {seq}: {reason}")]
pub struct VerifyError {
    /// The first bad seq.
    pub seq: u64,
    /// What is wrong there.
    pub reason: String,
}

/// What a successful verification covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// First seq.
    pub first_seq: u64,
    /// Last seq.
    pub last_seq: u64,
    /// Whole entries checked.
    pub entries: u64,
    /// Omitted entries bridged by their body hash.
    pub omitted: u64,
    /// Checkpoint signatures verified.
    pub checkpoints: u64,
    /// Entries after the last checkpoint (chained, not yet signed).
    pub unanchored: u64,
}

/// Where an export may start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At the genesis of the chain: seq 1, whose `prev_hash` is [`genesis`].
    Genesis,
    /// At the genesis, or mid-chain at a signed checkpoint entry (a log retained after
    /// pruning, an export `--since` a checkpoint): the checkpoint's signature anchors it.
    GenesisOrCheckpoint,
}

/// Verifies a whole export: it must start at the chain's genesis ([`Start::Genesis`]).
pub fn verify_export(
    lines: &[ExportLine],
    audit_key: &p256::ecdsa::VerifyingKey,
) -> Result<VerifyReport, VerifyError> {
    verify_export_from(lines, audit_key, Start::Genesis)
}

/// Verifies an export: not empty, starting where `start` allows, seqs consecutive, every hash
/// recomputed, every checkpoint signed by `audit_key` over the running head.
pub fn verify_export_from(
    lines: &[ExportLine],
    audit_key: &p256::ecdsa::VerifyingKey,
    start: Start,
) -> Result<VerifyReport, VerifyError> {
    // Each entry's hash depends on its content alone: computed on every core first; the
    // chain, the order and the checkpoints are then checked in one pass.
    let computed = crate::par::par_map(lines, |line| match line {
        ExportLine::Entry(e) => Some(e.compute_hash()),
        ExportLine::Omitted(_) => None,
    });
    let views: Vec<_> = lines
        .iter()
        .zip(&computed)
        .map(|(l, c)| (View::of(l), c.as_deref()))
        .collect();
    verify_lines(&views, audit_key, start)
}

/// Parses an export's text and verifies it as [`verify_export_from`] does, faster: a line that
/// is the writer's own encoding of its entry (every line a site exports) is hashed from its
/// bytes, with no re-encoding — the body is the line with `prev_hash` and `hash` emptied
/// ([`AuditRecord::seal`]). That hash is used only when it is the line's `hash` (then the
/// line's bytes are the ones the chain committed); any other line has its content hashed, as
/// before, so what verifies is the same.
pub fn verify_export_text(
    text: &str,
    audit_key: &p256::ecdsa::VerifyingKey,
    start: Start,
) -> Result<VerifyReport, ExportTextError> {
    verify_export_reader(text.as_bytes(), audit_key, start)
}

/// Bytes of an export read (and its lines checked) at once by [`verify_export_reader`].
const READ_CHUNK: usize = 8 << 20;

/// The longest line [`verify_export_reader`] takes (a site's entries are far shorter).
const MAX_LINE: usize = 64 << 20;

/// [`verify_export_text`] over an export read from `r` in chunks of whole lines: the memory
/// of one chunk, whatever the export's size (a year of a site's log is tens of GB).
pub fn verify_export_reader(
    r: impl std::io::Read,
    audit_key: &p256::ecdsa::VerifyingKey,
    start: Start,
) -> Result<VerifyReport, ExportTextError> {
    verify_in_chunks(r, audit_key, start, READ_CHUNK)
}

/// [`verify_export_reader`], reading `chunk` bytes at a time.
fn verify_in_chunks(
    mut r: impl std::io::Read,
    audit_key: &p256::ecdsa::VerifyingKey,
    start: Start,
    chunk: usize,
) -> Result<VerifyReport, ExportTextError> {
    let mut check = ChainCheck::new(audit_key, start);
    let mut buf: Vec<u8> = Vec::with_capacity(chunk * 2);
    let mut lines_before = 0usize;
    let mut eof = false;
    while !eof {
        let old = buf.len();
        buf.resize(old + chunk, 0);
        let mut n = 0;
        while old + n < buf.len() {
            match r.read(&mut buf[old + n..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ExportTextError::Read(e.to_string())),
            }
        }
        buf.truncate(old + n);
        let end = if eof {
            buf.len()
        } else {
            match buf.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if buf.len() > MAX_LINE => {
                    return Err(ExportTextError::Parse(format!(
                        "line {}: longer than {MAX_LINE} bytes",
                        lines_before + 1
                    )));
                }
                None => continue,
            }
        };
        let text = std::str::from_utf8(&buf[..end]).map_err(|e| {
            let line = buf[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            ExportTextError::Parse(format!("line {}: not UTF-8", lines_before + line + 1))
        })?;
        lines_before = check_text(&mut check, text, lines_before)?;
        buf.drain(..end);
    }
    Ok(check.finish()?)
}

/// Parses and hashes the lines of `text` (whole lines; `lines_before` lines came before it)
/// on every core, then checks them in order; returns the count of lines read so far.
fn check_text(
    check: &mut ChainCheck<'_>,
    text: &str,
    lines_before: usize,
) -> Result<usize, ExportTextError> {
    let mut count = 0;
    let raw: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .inspect(|(i, _)| count = i + 1)
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (lines_before + i, l))
        .collect();
    let parsed = crate::par::par_map(&raw, |(i, l)| -> Result<_, ExportTextError> {
        // The writer's own line: only what the chain checks read is parsed (the rest of the
        // line is committed by its hash, checked here).
        if let Some(body) = raw_body_hash(l)
            && let Ok(link) = serde_json::from_str::<Link>(l)
            && chain(&link.prev_hash, &body) == link.hash
        {
            return Ok(Parsed::Link(link));
        }
        let line: ExportLine = serde_json::from_str(l)
            .map_err(|e| ExportTextError::Parse(format!("line {}: {e}", i + 1)))?;
        let computed = match &line {
            ExportLine::Entry(e) => Some(e.compute_hash()),
            ExportLine::Omitted(_) => None,
        };
        Ok(Parsed::Line(line, computed))
    });
    for p in &parsed {
        match p {
            Ok(Parsed::Link(l)) => check.next(&l.view(), Some(l.hash.as_str()))?,
            Ok(Parsed::Line(line, computed)) => check.next(&View::of(line), computed.as_deref())?,
            Err(e) => return Err(e.clone()),
        }
    }
    Ok(lines_before + count)
}

/// A line of [`verify_export_text`], parsed.
enum Parsed {
    /// The writer's encoding of an entry, its hash checked: what the chain checks read.
    Link(Link),
    /// Any other line, and its entry's hash computed from its content.
    Line(ExportLine, Option<String>),
}

/// What the chain checks read of an entry (serde skips the other fields without keeping
/// them): parsed only from a line whose bytes are shown to be the ones its hash commits.
#[derive(Deserialize)]
struct Link {
    seq: u64,
    site_region: String,
    #[serde(default)]
    checkpoint: Option<Checkpoint>,
    prev_hash: String,
    hash: String,
}

impl Link {
    fn view(&self) -> View<'_> {
        View::Entry(EntryView {
            seq: self.seq,
            site_region: &self.site_region,
            checkpoint: self.checkpoint.as_ref(),
            prev_hash: &self.prev_hash,
            hash: &self.hash,
        })
    }
}

/// A line as the chain checks see it.
#[derive(Clone, Copy)]
enum View<'a> {
    Omitted(&'a Omitted),
    Entry(EntryView<'a>),
}

#[derive(Clone, Copy)]
struct EntryView<'a> {
    seq: u64,
    site_region: &'a str,
    checkpoint: Option<&'a Checkpoint>,
    prev_hash: &'a str,
    hash: &'a str,
}

impl<'a> View<'a> {
    fn of(line: &'a ExportLine) -> Self {
        match line {
            ExportLine::Omitted(o) => View::Omitted(o),
            ExportLine::Entry(e) => View::Entry(EntryView {
                seq: e.seq,
                site_region: &e.site_region,
                checkpoint: e.checkpoint.as_ref(),
                prev_hash: &e.prev_hash,
                hash: &e.hash,
            }),
        }
    }

    fn seq(&self) -> u64 {
        match self {
            View::Omitted(o) => o.seq,
            View::Entry(e) => e.seq,
        }
    }
}

/// Why [`verify_export_text`] refused an export.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportTextError {
    /// A line is not an export line (the message names its 1-based number), as
    /// [`parse_export`] says.
    #[error("{0}")]
    Parse(String),
    /// The lines do not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The export could not be read.
    #[error("reading the export: {0}")]
    Read(String),
}

/// The body hash (hex) of an exported line that ends as the writer encodes an entry:
/// `…,"prev_hash":"<64 hex>","hash":"<64 hex>"}`; None for any other line.
fn raw_body_hash(line: &str) -> Option<String> {
    const PREV: &[u8] = br#""prev_hash":""#;
    const MID: &[u8] = br#"","hash":""#;
    const END: &[u8] = br#""}"#;
    const TAIL: &[u8] = br#""prev_hash":"","hash":""}"#;
    let b = line.as_bytes();
    let tail_len = PREV.len() + 64 + MID.len() + 64 + END.len();
    let head_len = b.len().checked_sub(tail_len)?;
    let (head, tail) = b.split_at(head_len);
    let (p, rest) = tail.split_at(PREV.len());
    let (h1, rest) = rest.split_at(64);
    let (m, rest) = rest.split_at(MID.len());
    let (h2, e) = rest.split_at(64);
    let hex = |h: &[u8]| h.iter().all(u8::is_ascii_hexdigit);
    if p != PREV || m != MID || e != END || !hex(h1) || !hex(h2) {
        return None;
    }
    let mut d = Sha256::new();
    d.update(head);
    d.update(TAIL);
    Some(hex::encode(d.finalize()))
}

/// The checks of an export whose lines come with their entries' hashes computed already
/// (None for an omitted line).
fn verify_lines(
    lines: &[(View<'_>, Option<&str>)],
    audit_key: &p256::ecdsa::VerifyingKey,
    start: Start,
) -> Result<VerifyReport, VerifyError> {
    let mut check = ChainCheck::new(audit_key, start);
    for (line, computed) in lines {
        check.next(line, *computed)?;
    }
    check.finish()
}

/// The checks of an export, one line after the other in order (what carries from line to line
/// is the running chain hash, the next seq and the count since the last checkpoint): an export
/// of any size is checked with the memory of one chunk of lines.
struct ChainCheck<'k> {
    audit_key: &'k p256::ecdsa::VerifyingKey,
    start: Start,
    report: VerifyReport,
    running: Option<String>,
    expected_seq: Option<u64>,
    since_checkpoint: u64,
}

impl<'k> ChainCheck<'k> {
    fn new(audit_key: &'k p256::ecdsa::VerifyingKey, start: Start) -> Self {
        Self {
            audit_key,
            start,
            report: VerifyReport::default(),
            running: None,
            expected_seq: None,
            since_checkpoint: 0,
        }
    }

    /// Where the export may start (checked on its first line).
    fn check_start(&self, first: &View<'_>) -> Result<(), VerifyError> {
        let at_genesis = match first {
            View::Entry(e) => e.seq == 1 && e.prev_hash == genesis(),
            View::Omitted(o) => o.seq == 1 && o.prev_hash.as_deref() == Some(&genesis()),
        };
        if at_genesis {
            return Ok(());
        }
        let at_checkpoint = matches!(first, View::Entry(e) if e.checkpoint.is_some());
        match self.start {
            Start::Genesis => Err(VerifyError {
                seq: first.seq(),
                reason: format!(
                    "the log starts mid-chain at seq {}{}",
                    first.seq(),
                    if at_checkpoint {
                        " (a signed checkpoint: verify it with --from-checkpoint)"
                    } else {
                        " (not at a signed checkpoint, so nothing anchors its start)"
                    }
                ),
            }),
            Start::GenesisOrCheckpoint if !at_checkpoint => Err(VerifyError {
                seq: first.seq(),
                reason: format!(
                    "the log starts mid-chain at seq {}, which is not a signed checkpoint",
                    first.seq()
                ),
            }),
            Start::GenesisOrCheckpoint => Ok(()),
        }
    }

    /// Checks the next line.
    fn next(&mut self, line: &View<'_>, computed: Option<&str>) -> Result<(), VerifyError> {
        use p256::ecdsa::signature::Verifier as _;
        let seq = line.seq();
        let bad = |reason: String| VerifyError { seq, reason };
        match self.expected_seq {
            None => self.check_start(line)?,
            Some(exp) if seq != exp => {
                return Err(VerifyError {
                    seq: if seq > exp { exp } else { seq },
                    reason: if seq > exp {
                        format!("entry {exp} is missing (next line is {seq})")
                    } else {
                        format!("duplicate or out of order: expected {exp}, found {seq}")
                    },
                });
            }
            Some(_) => {}
        }
        match line {
            View::Omitted(o) => {
                let prev = self
                    .running
                    .take()
                    .or_else(|| o.prev_hash.clone())
                    .ok_or_else(|| bad("the first line needs the chain hash before it".into()))?;
                self.running = Some(chain(&prev, &o.body_hash));
                self.report.omitted += 1;
                self.since_checkpoint += 1;
            }
            View::Entry(e) => {
                let prev = self
                    .running
                    .take()
                    .unwrap_or_else(|| e.prev_hash.to_string());
                if e.prev_hash != prev {
                    return Err(bad("prev_hash does not match the previous entry".into()));
                }
                let computed = computed.unwrap_or_default();
                if computed != e.hash {
                    return Err(bad("hash does not match the entry's content".into()));
                }
                if let Some(cp) = e.checkpoint {
                    if cp.covers_seq + 1 != seq || cp.head_hash != prev {
                        return Err(bad(
                            "checkpoint does not cover the chain head before it".into()
                        ));
                    }
                    let sig = hex::decode(&cp.signature)
                        .ok()
                        .and_then(|d| p256::ecdsa::DerSignature::try_from(d.as_slice()).ok())
                        .ok_or_else(|| bad("checkpoint signature is malformed".into()))?;
                    let msg =
                        Checkpoint::message(e.site_region, cp.covers_seq, &cp.head_hash, cp.time);
                    self.audit_key
                        .verify(&msg, &sig)
                        .map_err(|_| bad("checkpoint signature does not verify".into()))?;
                    self.report.checkpoints += 1;
                    self.since_checkpoint = 0;
                } else {
                    self.since_checkpoint += 1;
                }
                self.running = Some(computed.to_string());
                self.report.entries += 1;
            }
        }
        if self.expected_seq.is_none() {
            self.report.first_seq = seq;
        }
        self.report.last_seq = seq;
        self.expected_seq = Some(seq + 1);
        Ok(())
    }

    /// The report, once every line was checked.
    fn finish(mut self) -> Result<VerifyReport, VerifyError> {
        if self.expected_seq.is_none() {
            return Err(VerifyError {
                seq: 0,
                reason: "the log is empty: there is nothing to verify".into(),
            });
        }
        self.report.unanchored = self.since_checkpoint;
        Ok(self.report)
    }
}

/// Parses JSON lines into export lines; the error names the 1-based line number.
pub fn parse_export(text: &str) -> Result<Vec<ExportLine>, String> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    // Lines parse independently: on every core (issue 30: `audit verify` of a year's log).
    crate::par::par_map(&lines, |(i, l)| {
        serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1))
    })
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_matches_the_reference_encoding_and_hash() {
        let mut prev = genesis();
        for (i, detail) in ["", "quote \" and \\ and \n newline", "ünïcödé"]
            .into_iter()
            .enumerate()
        {
            let mut rec = AuditRecord {
                seq: i as u64 + 1,
                ts: "2026-11-25T00:00:00Z".into(),
                rpc: "Sign".into(),
                detail: detail.into(),
                ttl_remaining_sec: (i == 1).then_some(42),
                checkpoint: (i == 2).then(|| Checkpoint {
                    covers_seq: 2,
                    head_hash: prev.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let json = rec.seal(&prev);
            assert_eq!(rec.prev_hash, prev);
            assert_eq!(rec.hash, rec.compute_hash(), "entry {i}");
            assert_eq!(Some(json), serde_json::to_vec(&rec).ok(), "entry {i}");
            prev = rec.hash.clone();
        }
    }

    /// The text path hashes the writer's lines from their bytes and agrees with the content
    /// path on everything: an export verifies; a line re-encoded another way (its fields in
    /// another order) still verifies through its content; an edited line fails at its seq;
    /// a line that is no JSON is named by its number.
    #[test]
    fn verifying_the_text_agrees_with_verifying_the_parsed_lines() {
        let key = p256::ecdsa::SigningKey::from_slice(&[5; 32]).expect("scalar");
        let vk = *key.verifying_key();
        let mut prev = genesis();
        let mut lines = Vec::new();
        for i in 0..40u64 {
            let mut rec = AuditRecord {
                seq: i + 1,
                ts: "2026-12-05T00:00:00Z".into(),
                rpc: "Sign".into(),
                detail: format!("entry {i} \"quoted\" ünï"),
                ..Default::default()
            };
            let json = rec.seal(&prev);
            prev = rec.hash.clone();
            lines.push(String::from_utf8(json).unwrap());
        }
        let text = lines.join("\n");
        let parsed = parse_export(&text).unwrap();
        let want = verify_export_from(&parsed, &vk, Start::Genesis).unwrap();
        assert_eq!(
            verify_export_text(&text, &vk, Start::Genesis).unwrap(),
            want
        );
        assert!(raw_body_hash(&lines[3]).is_some());
        // Line 6 re-encoded with its fields in another order: same content, other bytes.
        let mut reordered = lines.clone();
        let v: serde_json::Value = serde_json::from_str(&lines[5]).unwrap();
        let mut fields: Vec<(String, serde_json::Value)> =
            v.as_object().unwrap().clone().into_iter().collect();
        fields.reverse();
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
            .collect();
        reordered[5] = format!("{{{}}}", body.join(","));
        assert!(raw_body_hash(&reordered[5]).is_none());
        assert_eq!(
            verify_export_text(&reordered.join("\n"), &vk, Start::Genesis).unwrap(),
            want
        );
        // An edited detail in line 9: refused at seq 9, as the content path refuses it.
        let mut edited = lines.clone();
        edited[8] = edited[8].replace("entry 8", "entry X");
        let e = verify_export_text(&edited.join("\n"), &vk, Start::Genesis).unwrap_err();
        let ExportTextError::Verify(e) = e else {
            panic!("{e}")
        };
        assert_eq!(e.seq, 9);
        let from_parsed = verify_export_from(
            &parse_export(&edited.join("\n")).unwrap(),
            &vk,
            Start::Genesis,
        )
        .unwrap_err();
        assert_eq!(e, from_parsed);
        let mut broken = lines.clone();
        broken[2] = "{not json".into();
        let e = verify_export_text(&broken.join("\n"), &vk, Start::Genesis).unwrap_err();
        assert!(e.to_string().starts_with("line 3: "), "{e}");
    }

    /// A reader that hands out at most `max` bytes a call, and is interrupted every 3rd call.
    struct Trickle<'a> {
        bytes: &'a [u8],
        max: usize,
        calls: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = self.max.min(out.len()).min(self.bytes.len());
            out[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn an_export_read_in_chunks_verifies_as_the_whole_text_does() {
        let key = p256::ecdsa::SigningKey::from_slice(&[6; 32]).expect("scalar");
        let vk = *key.verifying_key();
        let mut prev = genesis();
        let mut lines = Vec::new();
        for i in 0..30u64 {
            let mut rec = AuditRecord {
                seq: i + 1,
                rpc: "Sign".into(),
                detail: "ü".repeat(usize::try_from(i).unwrap() * 7),
                ..Default::default()
            };
            let json = rec.seal(&prev);
            prev = rec.hash.clone();
            lines.push(String::from_utf8(json).unwrap());
        }
        // Blank lines and a CRLF are read as the whole text reads them.
        lines.insert(10, String::new());
        lines[20].push('\r');
        let text = lines.join("\n") + "\n";
        let want = verify_export_text(&text, &vk, Start::Genesis).unwrap();
        assert_eq!(want.entries, 30);
        let mut edited = lines.clone();
        edited[25] = edited[25].replace("\"Sign\"", "\"Sigm\"");
        let edited = edited.join("\n");
        let mut broken = lines.clone();
        broken[27] = "{not json".into();
        let broken = broken.join("\n");
        // Chunks shorter than a line, cutting a character, and longer than the whole export.
        for chunk in [1, 5, 64, 700, 1 << 20] {
            for max in [1, 3, 4096] {
                let read = |t: &str| {
                    let r = Trickle {
                        bytes: t.as_bytes(),
                        max,
                        calls: 0,
                    };
                    verify_in_chunks(r, &vk, Start::Genesis, chunk)
                };
                assert_eq!(read(&text).unwrap(), want, "chunk {chunk}, max {max}");
                let e = read(&edited).unwrap_err();
                assert_eq!(
                    e,
                    verify_export_text(&edited, &vk, Start::Genesis).unwrap_err()
                );
                assert!(e.to_string().contains("at seq 25"), "{e}");
                let e = read(&broken).unwrap_err();
                assert!(e.to_string().starts_with("line 28: "), "{e}");
            }
        }
        // Not UTF-8: named by its line.
        let mut bad = text.clone().into_bytes();
        let at = text.find("\"seq\":5,").unwrap();
        bad[at] = 0xFF;
        let e = verify_export_reader(bad.as_slice(), &vk, Start::Genesis).unwrap_err();
        assert_eq!(e.to_string(), "line 5: not UTF-8");
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    #[test]
    fn an_excerpt_keeps_a_prefix_and_the_hash() {
        let long = "é".repeat(1000);
        let e = excerpt(&long, 100);
        assert!(e.len() <= 100, "{}", e.len());
        assert!(e.starts_with("éé"));
        let h = hex::encode(Sha256::digest(long.as_bytes()));
        assert!(e.contains(&format!("sha256:{}", &h[..16])), "{e}");
        assert!(e.ends_with(",2000 bytes]"), "{e}");
        assert_eq!(excerpt("short", 100), "short");
    }

    #[test]
    fn no_entry_exceeds_the_maximum_whatever_its_fields_hold() {
        let worst = "\u{1}".repeat(1 << 20);
        let mut r = AuditRecord {
            ts: worst.clone(),
            site_region: worst.clone(),
            rpc: worst.clone(),
            decision: worst.clone(),
            reason: worst.clone(),
            environment: worst.clone(),
            job_id: worst.clone(),
            jti: worst.clone(),
            token_issuer: worst.clone(),
            subject: worst.clone(),
            runner_fingerprint: worst.clone(),
            cert_serial: worst.clone(),
            ttl_remaining_sec: Some(i64::MIN),
            key_id: worst.clone(),
            digest: worst.clone(),
            items: u32::MAX,
            artifact: worst.clone(),
            repository: worst.clone(),
            git_ref: worst.clone(),
            provider: worst.clone(),
            pipeline_id: worst.clone(),
            peer: worst.clone(),
            operator: worst.clone(),
            detail: worst.clone(),
            tlog: Some(TlogLeaves::new(
                u64::MAX,
                &vec![[0xff; 32]; TlogLeaves::MAX],
            )),
            checkpoint: Some(Checkpoint {
                covers_seq: u64::MAX,
                head_hash: worst.clone(),
                time: i64::MIN,
                key_id: worst.clone(),
                signature: worst.clone(),
                note: Some(worst.clone()),
                log_note: Some(worst.clone()),
            }),
            seq: u64::MAX,
            prev_hash: String::new(),
            hash: String::new(),
        };
        r.bound_fields();
        let bytes = r.seal(&genesis());
        assert!(bytes.len() <= MAX_ENTRY_BYTES, "{} bytes", bytes.len());
    }
}
