//! [`Kv`] on PostgreSQL, for several replicas of one site sharing one database (issue 14).
//!
//! One table `kv (tree, key, value)` holds every tree, so everything a decision depends on is
//! shared by construction: issuance records, jti claims (`insert_new` is `INSERT … ON CONFLICT
//! DO NOTHING`: one winner across replicas), revocation rules, ops overlays, wrapped keys, usage,
//! and the audit entries. The audit chain's head is a row of its own (`audit_head`), locked by
//! each replica's writer for the length of one group commit ([`ChainTx`]), so replicas never
//! fork the chain or reuse a seq. `generation` counts ops changes; replicas poll it to pick up
//! each other's changes.
//!
//! **Blocking.** [`Kv`] is synchronous (sled answers in microseconds). Here each call is handed
//! to a small pool of threads that own the connections (`postgres` is the blocking face of
//! `tokio-postgres`, and must not run on the runtime's threads), and the caller waits for the
//! answer. The audit writer has a connection of its own.
//!
//! **Schema.** Versioned migrations run at start under an advisory lock (replicas starting
//! together do not race); a database whose schema is newer than this binary knows is refused.
//!
//! **Outages.** A connection that fails is replaced on the next call; while the server is
//! unreachable every call fails with [`StoreError::Unavailable`], which the use cases report as
//! `UNAVAILABLE`; service resumes by itself when PostgreSQL is back.
//!
//! **Stalls.** A server that accepts and then answers nothing (stopped, a lock held, a network
//! that drops replies) must not hold the site: every call has a deadline (`[store]
//! statement_timeout_ms`). The server enforces it where it can (`statement_timeout`,
//! `lock_timeout`); the site enforces it always — the caller stops waiting at the deadline and
//! gets `UNAVAILABLE`. A call whose caller already gave up is not started; a connection whose
//! call overran its deadline is closed when the call returns (an open transaction on it is
//! rolled back by the server). Callers on the async runtime wait with `block_in_place`, so a
//! stalled database never starves TLS handshakes or health checks of runtime threads. A statement
//! that the server completes after its caller gave up may still take effect: each is
//! idempotent or fails closed (a jti claimed by a call reported as failed is refused later,
//! never used twice); an audit batch committed that way holds entries whose requests were
//! refused — recorded, never lost.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement};

use super::{Entry, Kv, SharedChain, StoreError, Tree};

/// Migrations, in order; the schema version is their count.
const MIGRATIONS: &[&str] = &[
    // 1: the key-value table, the audit head, the ops generation.
    "CREATE TABLE kv (
         tree text NOT NULL,
         key bytea NOT NULL,
         value bytea NOT NULL,
         PRIMARY KEY (tree, key)
     );
     CREATE TABLE audit_head (
         id integer PRIMARY KEY CHECK (id = 1),
         seq bigint NOT NULL,
         hash text NOT NULL
     );
     INSERT INTO audit_head VALUES (1, 0, repeat('0', 64));
     CREATE TABLE generation (
         id integer PRIMARY KEY CHECK (id = 1),
         n bigint NOT NULL
     );
     INSERT INTO generation VALUES (1, 0);",
];

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Advisory-lock key under which migrations run (any constant shared by all replicas).
const MIGRATION_LOCK: i64 = 0x6d65_7368_7369_676e; // "meshsign"
/// Advisory-lock key held while a replica opens the site ([`Kv::begin_startup`]).
const STARTUP_LOCK: i64 = MIGRATION_LOCK + 1;

/// How to reach the database (`[store]` with `engine = "postgres"`).
#[derive(Clone)]
pub struct PgSettings {
    /// `postgresql://USER@HOST:PORT/DB` (no password in it).
    pub url: String,
    /// The password, read from `password_file` (never from the config itself).
    pub password: Option<zeroize::Zeroizing<String>>,
    /// Connections for store calls (the audit writer has one more).
    pub pool_size: usize,
    /// The longest a call may take (see the module docs).
    pub statement_timeout: Duration,
    /// TLS to the server, verified against a CA and the url's host; `None`: plaintext (only
    /// where the config allows it).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// The TLS client config for a database whose certificate chains to the CA in `ca_file`
/// (PEM): verify-full — the chain, and the url's host among the certificate's names.
pub fn tls_from_ca_file(
    ca_file: &std::path::Path,
) -> Result<Arc<rustls::ClientConfig>, StoreError> {
    use rustls_pki_types::pem::PemObject as _;
    let bad =
        |m: String| StoreError::Engine(format!("store.ca_file {}: {m}", ca_file.display()).into());
    let pem = std::fs::read(ca_file).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("a certificate rustls refuses: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A database error says what PostgreSQL said (its `Display` alone is "db error"); anything
/// else is the connection failing: the database is unavailable.
fn unavailable(e: postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Engine(
            format!("PostgreSQL: {} ({})", db.message(), db.code().code()).into(),
        ),
        None => {
            // With its causes: "error performing TLS handshake" alone does not say that the
            // server's certificate is not the CA's.
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(": ");
                text.push_str(&c.to_string());
                cause = c.source();
            }
            StoreError::Unavailable(text)
        }
    }
}

impl PgSettings {
    fn config(&self) -> Result<postgres::Config, StoreError> {
        let mut c: postgres::Config = self
            .url
            .parse()
            .map_err(|e: postgres::Error| StoreError::Engine(Box::new(e)))?;
        if let Some(p) = &self.password {
            c.password(p.as_bytes());
        }
        c.application_name("meshsignd");
        let ms = self.statement_timeout.as_millis();
        c.options(&format!(
            "-c statement_timeout={ms} -c lock_timeout={ms} \
             -c idle_in_transaction_session_timeout={}",
            ms.saturating_mul(4)
        ));
        c.connect_timeout(self.statement_timeout.min(Duration::from_secs(5)));
        c.keepalives(true);
        c.keepalives_idle(Duration::from_secs(10));
        c.tcp_user_timeout(self.statement_timeout.max(Duration::from_secs(1)));
        Ok(c)
    }

    fn connect(&self) -> Result<Client, StoreError> {
        let mut c = self.config()?;
        match &self.tls {
            Some(tls) => {
                // Required, never "prefer": a server (or a man in the middle) that declines
                // TLS is refused, not talked to in clear.
                c.ssl_mode(postgres::config::SslMode::Require);
                c.connect(tokio_postgres_rustls::MakeRustlsConnect::new(
                    (**tls).clone(),
                ))
                .map_err(unavailable)
            }
            None => c.connect(NoTls).map_err(unavailable),
        }
    }
}

type Job = Box<dyn FnOnce(&mut Option<Conn>) + Send>;

/// One connection and the statements prepared on it. Every statement this store runs is a
/// fixed string: prepared once per connection (`Parse`/`Describe`, a round trip and a parse on
/// the server), then only bound and executed. A query by its text costs both round trips every
/// time; a proof's store calls and a commit's statements each paid the extra one (issue 30).
/// The statements go with the connection when it is dropped or replaced.
struct Conn {
    client: Client,
    prepared: std::collections::HashMap<&'static str, Statement>,
}

/// A statement's parameters.
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Conn {
    fn new(client: Client) -> Self {
        Self {
            client,
            prepared: std::collections::HashMap::new(),
        }
    }

    /// `sql` prepared on this connection (once).
    fn statement(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, postgres::Error> {
        let s = self.statement(sql)?;
        self.client.query(&s, params)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Option<Row>, postgres::Error> {
        let s = self.statement(sql)?;
        self.client.query_opt(&s, params)
    }

    fn query_one(&mut self, sql: &'static str, params: Params<'_>) -> Result<Row, postgres::Error> {
        let s = self.statement(sql)?;
        self.client.query_one(&s, params)
    }

    fn execute(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, postgres::Error> {
        let s = self.statement(sql)?;
        self.client.execute(&s, params)
    }

    /// Statements without parameters or results (`BEGIN`, `COMMIT`, `ROLLBACK`): simple
    /// protocol, one round trip, nothing to prepare.
    fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.client.batch_execute(sql)
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// [`Kv`] on PostgreSQL.
pub struct PgKv {
    settings: PgSettings,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// The audit writer's connection, on a thread of its own (calls in order).
    writer: Mutex<Option<mpsc::Sender<Job>>>,
}

/// Waits for a call's answer until `deadline`; on the async runtime's threads without holding
/// one of them (`block_in_place`).
fn wait<T>(
    answer: mpsc::Receiver<Result<T, StoreError>>,
    timeout: Duration,
) -> Result<T, StoreError> {
    let recv = || match answer.recv_timeout(timeout) {
        Ok(out) => out,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(StoreError::Unavailable(format!(
            "PostgreSQL did not answer within {} ms ([store] statement_timeout_ms)",
            timeout.as_millis()
        ))),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(StoreError::Unavailable("a store thread ended".into()))
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(recv)
        }
        _ => recv(),
    }
}

/// A job for a connection thread that runs `f` only if its caller still waits, and closes the
/// connection if `f` overran the deadline (its caller gave up: whatever state the session was
/// left in, a transaction among it, goes with it).
fn deadline_job<T: Send + 'static>(
    deadline: std::time::Instant,
    reply: mpsc::SyncSender<Result<T, StoreError>>,
    f: impl FnOnce(&mut Option<Conn>) -> Result<T, StoreError> + Send + 'static,
) -> Job {
    Box::new(move |slot| {
        if std::time::Instant::now() >= deadline {
            return;
        }
        let out = f(slot);
        if std::time::Instant::now() >= deadline {
            if let Some(c) = slot.take() {
                drop(c);
            }
            return;
        }
        let _ = reply.send(out);
    })
}

/// Starts a thread named `name` that owns one connection and runs jobs from `rx` in turn.
fn connection_thread(
    name: String,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    first: Option<Conn>,
) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut conn: Option<Conn> = first;
            loop {
                let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(job) => job,
                    Err(_) => return,
                };
                job(&mut conn);
            }
        })
        .map(|_| ())
        .map_err(|e| StoreError::Engine(Box::new(e)))
}

impl std::fmt::Debug for PgKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgKv")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The connection of `slot`, connecting (again) if there is none or it broke.
fn ensure<'c>(
    slot: &'c mut Option<Conn>,
    settings: &PgSettings,
) -> Result<&'c mut Conn, StoreError> {
    if slot.as_ref().is_none_or(|c| c.is_closed()) {
        *slot = Some(Conn::new(settings.connect()?));
    }
    slot.as_mut()
        .ok_or_else(|| StoreError::Unavailable("no connection".into()))
}

impl PgKv {
    /// Connects, applies migrations (or refuses a newer schema), and starts the pool.
    pub fn open(settings: PgSettings) -> Result<Self, StoreError> {
        // `postgres` blocks on a runtime of its own, which must not start on a thread of
        // another runtime (the caller may be one): every connection lives on a thread of ours.
        let s = settings.clone();
        let client = std::thread::Builder::new()
            .name("pg-open".into())
            .spawn(move || -> Result<Client, StoreError> {
                let mut client = s.connect()?;
                migrate(&mut client)?;
                Ok(client)
            })
            .map_err(|e| StoreError::Engine(Box::new(e)))?
            .join()
            .map_err(|_| StoreError::Unavailable("connecting to PostgreSQL panicked".into()))??;
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..settings.pool_size.max(1) {
            connection_thread(format!("pg-{i}"), rx.clone(), None)?;
        }
        let (wtx, wrx) = mpsc::channel::<Job>();
        connection_thread(
            "pg-writer".into(),
            Arc::new(Mutex::new(wrx)),
            Some(Conn::new(client)),
        )?;
        Ok(Self {
            settings,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(wtx)),
        })
    }

    /// Hands `job` to `queue` (the pool or the writer).
    fn submit(queue: &Mutex<Option<mpsc::Sender<Job>>>, job: Job) -> Result<(), StoreError> {
        queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?
            .send(job)
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))
    }

    /// Runs `f` on a pooled connection and waits for its answer (at most the deadline).
    fn run<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Conn) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let settings = self.settings.clone();
        let timeout = settings.statement_timeout;
        let job = deadline_job(std::time::Instant::now() + timeout, reply, move |slot| {
            // A connection the server closed (a restart, an idle timeout) is found out only
            // when used: then connect again and try once more. Every statement here is
            // idempotent (put, remove, reads) or fails closed when repeated (`insert_new` after
            // a lost answer reports the key present: a jti is refused, never used twice).
            let mut out = ensure(slot, &settings).and_then(|c| {
                f(c).map_err(|e| (c.is_closed(), e)).map_err(|(closed, e)| {
                    if closed {
                        StoreError::Unavailable(e.to_string())
                    } else {
                        unavailable(e)
                    }
                })
            });
            if matches!(out, Err(StoreError::Unavailable(_))) {
                *slot = None;
                out = ensure(slot, &settings).and_then(|c| f(c).map_err(unavailable));
            }
            out
        });
        Self::submit(&self.jobs, job)?;
        wait(answer, timeout)
    }

    /// Runs `f` on the audit writer's connection (its own thread, calls in order) and waits for
    /// it (at most the deadline).
    fn on_writer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let settings = self.settings.clone();
        let timeout = settings.statement_timeout;
        let job = deadline_job(std::time::Instant::now() + timeout, reply, move |slot| {
            let c = ensure(slot, &settings)?;
            f(c)
        });
        Self::submit(&self.writer, job)?;
        wait(answer, timeout)
    }

    /// The ops generation: a counter every replica's ops changes move.
    pub fn generation(&self) -> Result<i64, StoreError> {
        self.run(|c| {
            c.query_one("SELECT n FROM generation WHERE id = 1", &[])
                .map(|r| r.get(0))
        })
    }
}

impl Drop for PgKv {
    /// The connection threads end (and drop their connections) when their queues close.
    fn drop(&mut self) {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Applies the migrations this binary knows, or refuses a newer schema.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let db = |e: postgres::Error| unavailable(e);
    let mut tx = client.transaction().map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(db)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS meshsign_schema (version integer NOT NULL)")
        .map_err(db)?;
    let version: i32 = match tx
        .query_opt("SELECT version FROM meshsign_schema", &[])
        .map_err(db)?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO meshsign_schema VALUES (0)", &[])
                .map_err(db)?;
            0
        }
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "the database's schema is version {version}; this meshsignd knows versions up to \
             {SCHEMA_VERSION}: run the newer meshsignd that migrated it (nothing was changed)"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.batch_execute(sql).map_err(db)?;
        let v = i as i32 + 1;
        tx.execute("UPDATE meshsign_schema SET version = $1", &[&v])
            .map_err(db)?;
        tracing::info!(version = v, "database schema migrated");
    }
    tx.commit().map_err(db)
}

/// The smallest byte string greater than every string starting with `prefix` (None: no bound).
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

fn entries(rows: Vec<postgres::Row>) -> Vec<Entry> {
    rows.into_iter().map(|r| (r.get(0), r.get(1))).collect()
}

impl Kv for PgKv {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.run(move |c| {
            c.query_opt(
                "SELECT value FROM kv WHERE tree = $1 AND key = $2",
                &[&tree.name(), &key],
            )
            .map(|r| r.map(|r| r.get(0)))
        })
    }

    /// One statement for all of `keys`.
    fn get_many(&self, tree: Tree, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.len() < 2 {
            return keys.iter().map(|k| self.get(tree, k)).collect();
        }
        let want = keys.to_vec();
        let found: std::collections::HashMap<Vec<u8>, Vec<u8>> = self
            .run(move |c| {
                c.query(
                    "SELECT key, value FROM kv WHERE tree = $1 AND key = ANY($2)",
                    &[&tree.name(), &want],
                )
                .map(entries)
            })?
            .into_iter()
            .collect();
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let (key, value) = (key.to_vec(), value.to_vec());
        self.run(move |c| {
            c.execute(
                "INSERT INTO kv (tree, key, value) VALUES ($1, $2, $3)
                 ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
                &[&tree.name(), &key, &value],
            )
            .map(|_| ())
        })
    }

    /// One statement for them all (a batch's Merkle nodes: one round trip, not one each). A
    /// key given twice keeps its last value, as puts in order would (one statement may not
    /// update a row twice).
    fn put_many(&self, tree: Tree, entries: &[(&[u8], &[u8])]) -> Result<(), StoreError> {
        if entries.len() < 2 {
            return entries.iter().try_for_each(|(k, v)| self.put(tree, k, v));
        }
        let last: std::collections::HashMap<&[u8], &[u8]> = entries.iter().copied().collect();
        let (keys, values): (Vec<Vec<u8>>, Vec<Vec<u8>>) = last
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .unzip();
        self.run(move |c| {
            c.execute(
                "INSERT INTO kv (tree, key, value)
                 SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) AS t(k, v)
                 ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
                &[&tree.name(), &keys, &values],
            )
            .map(|_| ())
        })
    }

    fn insert_new(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        let (key, value) = (key.to_vec(), value.to_vec());
        self.run(move |c| {
            c.execute(
                "INSERT INTO kv (tree, key, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&tree.name(), &key, &value],
            )
            .map(|n| n == 1)
        })
    }

    fn update(&self, tree: Tree, key: &[u8], old: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        let (key, old, new) = (key.to_vec(), old.to_vec(), new.to_vec());
        self.run(move |c| {
            c.execute(
                "UPDATE kv SET value = $4 WHERE tree = $1 AND key = $2 AND value = $3",
                &[&tree.name(), &key, &old, &new],
            )
            .map(|n| n == 1)
        })
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        let key = key.to_vec();
        self.run(move |c| {
            c.execute(
                "DELETE FROM kv WHERE tree = $1 AND key = $2",
                &[&tree.name(), &key],
            )
            .map(|_| ())
        })
    }

    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let (from, to) = (prefix.to_vec(), successor(prefix));
        self.run(move |c| {
            c.query(
                "SELECT key, value FROM kv WHERE tree = $1 AND key >= $2
                 AND ($3::bytea IS NULL OR key < $3) ORDER BY key",
                &[&tree.name(), &from, &to],
            )
            .map(entries)
        })
    }

    fn scan_range(&self, tree: Tree, from: &[u8], limit: usize) -> Result<Vec<Entry>, StoreError> {
        let (from, limit) = (from.to_vec(), i64::try_from(limit).unwrap_or(i64::MAX));
        self.run(move |c| {
            c.query(
                "SELECT key, value FROM kv WHERE tree = $1 AND key >= $2 ORDER BY key LIMIT $3",
                &[&tree.name(), &from, &limit],
            )
            .map(entries)
        })
    }

    /// One statement for up to two scans and the keys (an inclusion proof's: the entry's block
    /// of 16, the tree's right edge, the stored nodes): a `UNION ALL` whose parts are told
    /// apart by a column. A scan's rows come back in key order from its own `ORDER BY …
    /// LIMIT`; they are sorted again here, as a `UNION ALL` does not promise to keep it. More
    /// scans (a proof never asks for them) or none: the calls one by one.
    fn scans_and_get_many(
        &self,
        scans: &[super::Scan<'_>],
        get: (Tree, &[Vec<u8>]),
    ) -> Result<super::ScansAndValues, StoreError> {
        /// Scans `$1`–`$3` and `$4`–`$6`, keys `$7`–`$8`; part 2 is the keys' rows.
        const TWO: &str = "(SELECT 0::int2 AS part, key, value FROM kv WHERE tree = $1
              AND key >= $2 ORDER BY key LIMIT $3)
             UNION ALL
             (SELECT 1::int2, key, value FROM kv WHERE tree = $4 AND key >= $5
              ORDER BY key LIMIT $6)
             UNION ALL
             (SELECT 2::int2, key, value FROM kv WHERE tree = $7 AND key = ANY($8))";
        /// One scan `$1`–`$3`, keys `$4`–`$5`.
        const ONE: &str = "(SELECT 0::int2 AS part, key, value FROM kv WHERE tree = $1
              AND key >= $2 ORDER BY key LIMIT $3)
             UNION ALL
             (SELECT 2::int2, key, value FROM kv WHERE tree = $4 AND key = ANY($5))";
        let n = scans.len();
        if !(1..=2).contains(&n) {
            return super::one_by_one(self, scans, get);
        }
        let owned: Vec<(&'static str, Vec<u8>, i64)> = scans
            .iter()
            .map(|&(tree, from, limit)| {
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                (tree.name(), from.to_vec(), limit)
            })
            .collect();
        let (get_tree, want) = (get.0.name(), get.1.to_vec());
        let (mut entries, found) = self.run(move |c| {
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(8);
            for (tree, from, limit) in &owned {
                params.extend([tree as &(dyn ToSql + Sync), from, limit]);
            }
            params.extend([&get_tree as &(dyn ToSql + Sync), &want]);
            let rows = c.query(if n == 1 { ONE } else { TWO }, &params)?;
            let mut entries: Vec<Vec<Entry>> = vec![Vec::new(); n];
            let mut found = std::collections::HashMap::new();
            for r in rows {
                let entry: Entry = (r.try_get(1)?, r.try_get(2)?);
                match entries.get_mut(usize::try_from(r.try_get::<_, i16>(0)?).unwrap_or(n)) {
                    Some(scan) => scan.push(entry),
                    None => {
                        found.insert(entry.0, entry.1);
                    }
                }
            }
            Ok((entries, found))
        })?;
        for scan in &mut entries {
            scan.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let values = get.1.iter().map(|k| found.get(k).cloned()).collect();
        Ok((entries, values))
    }

    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError> {
        self.run(move |c| {
            c.query_opt(
                "SELECT key, value FROM kv WHERE tree = $1 ORDER BY key DESC LIMIT 1",
                &[&tree.name()],
            )
            .map(|r| r.map(|r| (r.get(0), r.get(1))))
        })
    }

    /// Every statement is its own committed transaction (`synchronous_commit` as the server
    /// has it, `on` by default): nothing to flush.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn chain(&self) -> Option<&dyn SharedChain> {
        Some(self)
    }

    fn generation(&self) -> Option<Result<i64, StoreError>> {
        Some(PgKv::generation(self))
    }

    fn location(&self) -> Option<String> {
        Some(self.settings.url.clone())
    }

    fn begin_startup(&self) -> Result<(), StoreError> {
        // Another replica may hold the lock for its whole start: wait for it in turns of the
        // deadline (each turn a call of its own), for as long as a start may take.
        let until = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let got = self.on_writer(|c| {
                c.query_one("SELECT pg_try_advisory_lock($1)", &[&STARTUP_LOCK])
                    .map(|r| r.get::<_, bool>(0))
                    .map_err(unavailable)
            })?;
            if got {
                return Ok(());
            }
            if std::time::Instant::now() >= until {
                return Err(StoreError::Unavailable(
                    "another replica has been opening the site for 120 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn end_startup(&self) {
        let _ = self.on_writer(|c| {
            c.execute("SELECT pg_advisory_unlock($1)", &[&STARTUP_LOCK])
                .map(|_| ())
                .map_err(unavailable)
        });
    }

    fn bump_generation(&self) -> Result<(), StoreError> {
        self.run(|c| {
            c.execute("UPDATE generation SET n = n + 1 WHERE id = 1", &[])
                .map(|_| ())
        })
    }
}

impl SharedChain for PgKv {
    fn begin(&self) -> Result<(u64, String), StoreError> {
        self.on_writer(|c| {
            let row = (|| {
                c.batch_execute("BEGIN")?;
                c.query_one(
                    "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
                    &[],
                )
            })();
            match row {
                Ok(r) => {
                    let seq: i64 = r.get(0);
                    Ok((u64::try_from(seq).unwrap_or(0), r.get(1)))
                }
                Err(e) => {
                    let _ = c.batch_execute("ROLLBACK");
                    Err(unavailable(e))
                }
            }
        })
    }

    fn commit(&self, entries: &[(u64, Vec<u8>)], head: (u64, &str)) -> Result<(), StoreError> {
        let keys: Vec<Vec<u8>> = entries
            .iter()
            .map(|(s, _)| s.to_be_bytes().to_vec())
            .collect();
        let values: Vec<Vec<u8>> = entries.iter().map(|(_, v)| v.clone()).collect();
        let seq = i64::try_from(head.0).unwrap_or(i64::MAX);
        let hash = head.1.to_string();
        self.on_writer(move |c| {
            let result = (|| {
                if !keys.is_empty() {
                    c.execute(
                        "INSERT INTO kv (tree, key, value)
                         SELECT 'audit', k, v FROM unnest($1::bytea[], $2::bytea[]) AS t(k, v)",
                        &[&keys, &values],
                    )?;
                }
                c.execute(
                    "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
                    &[&seq, &hash],
                )?;
                c.batch_execute("COMMIT")
            })();
            result.map_err(|e| {
                let _ = c.batch_execute("ROLLBACK");
                unavailable(e)
            })
        })
    }

    fn rollback(&self) {
        let _ = self.on_writer(|c| c.batch_execute("ROLLBACK").map_err(unavailable));
    }
}

#[cfg(test)]
mod tests {
    use super::successor;

    #[test]
    fn successor_bounds_a_prefix() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(successor(&[0xff, 0xff]), None);
        assert_eq!(successor(b""), None);
    }
}
