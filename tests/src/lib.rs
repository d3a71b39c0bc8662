//! Test harness: real sites on `127.0.0.1:0` with real TLS, a temporary sled database, a
//! manual clock, and OIDC issuers (ES256 and RS256) that sign real JWTs.
//!
//! One helper makes every site (SPIRE's `test/testca`, tonic's integration tests): the config is
//! written as TOML and loaded through the same path `meshsignd serve` uses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

pub mod runners;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshsign_certs_dev::{DevPki, GITHUB_OWNER_ID, GithubJob, JwtAlg, OidcIssuer, random_id};
use meshsign_client::ClientConfig;
use meshsign_client::session::RunnerKey;
use meshsign_proto::v1::{self, enrollment_client::EnrollmentClient, signer_client::SignerClient};
use meshsign_server::api::{self, SiteHandle};
use meshsign_server::audit::AuditRecord;
use meshsign_server::clock::{Clock, ManualClock};
use meshsign_server::config::SiteConfig;
use meshsign_server::state::SiteState;
use meshsign_server::store::{Kv, SledKv};
use serde_json::Value;
use tonic::transport::Channel;

/// Region of test sites.
pub const REGION: &str = "sg";
/// Trust domain of test sites.
pub const TRUST_DOMAIN: &str = "meshsign.test";
/// Issuer URL of the ES256 test issuer.
pub const ES_ISSUER: &str = "https://token.ci.test";
/// Issuer URL of the RS256 test issuer.
pub const RS_ISSUER: &str = "https://gitlab.ci.test";
/// build_p95 of both environments; cap = 1.5 × 1200 + 600 = 2400 s.
pub const BUILD_P95: u64 = 1200;
/// The TTL cap that follows.
pub const TTL_CAP: u64 = 2400;
/// Staging's session ceiling (renewals included); production keeps the default (24 h).
pub const STAGING_MAX_SESSION: u64 = 5000;

/// Test sites turn two-person review off unless the `extra` config of
/// [`TestSite::start_with`] has its own `[review]` table.
const REVIEW_OFF: &str = "\n[review]\noperations = []\n";

/// A running test site and everything needed to talk to it.
pub struct TestSite {
    /// Temporary folder (config, PKI, KEK, sled), shared with replicas of the site.
    pub dir: Arc<tempfile::TempDir>,
    /// The site.
    pub handle: SiteHandle,
    /// Its clock.
    pub clock: ManualClock,
    /// ES256 issuer, trusted by both environments (policy `ci`).
    pub es: Arc<OidcIssuer>,
    /// RS256 issuer, trusted by both environments (policy `gitlab`).
    pub rs: Arc<OidcIssuer>,
    /// A client config pointing at the site.
    pub client: ClientConfig,
    /// Path of the site config.
    pub site_toml: PathBuf,
}

/// Writes a test site's files (PKI, JWKS, KEK, site.toml) into `dir`; returns the issuers.
pub fn write_site_files(dir: &Path) -> (OidcIssuer, OidcIssuer) {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    DevPki::generate(TRUST_DOMAIN)
        .unwrap()
        .write_to(&pki)
        .unwrap();
    let es = OidcIssuer::generate(ES_ISSUER, "es-1", JwtAlg::Es256).unwrap();
    let rs = OidcIssuer::generate(RS_ISSUER, "rs-1", JwtAlg::Rs256).unwrap();
    std::fs::write(pki.join("es.jwks.json"), es.jwks().to_string()).unwrap();
    std::fs::write(pki.join("rs.jwks.json"), rs.jwks().to_string()).unwrap();
    meshsign_server::custody::Kek::generate_file(&dir.join("kek")).unwrap();
    let mut toml = format!(
        r#"trust_domain = "{TRUST_DOMAIN}"
region = "{REGION}"
data_dir = "data"
kek_file = "kek"

[listen]
enroll = "127.0.0.1:0"
sign = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tls]
server_cert = "pki/server.pem"
server_key = "pki/server.key.pem"
admin_ca = "pki/admin-ca.pem"
{REVIEW_OFF}"#
    );
    for env in ["staging", "production"] {
        toml.push_str(&format!(
            r#"
[[environments]]
name = "{env}"
audience = "meshsign:{env}:{REGION}"
build_p95_seconds = {BUILD_P95}
{ceiling}

[[environments.signing_keys]]
alias = "release"
algorithm = "ecdsa-p256-sha256"
access = {{ repositories = ["acme/*"], refs = ["refs/heads/main", "refs/tags/*"] }}

[[environments.signing_keys]]
alias = "attest"
algorithm = "ecdsa-p256-sha256"
purposes = ["attestation"]
access = {{ repositories = ["acme/*"], refs = ["refs/heads/main", "refs/tags/*"] }}

[[environments.trust_policies]]
name = "ci"
issuer = "{ES_ISSUER}"
jwks_file = "pki/es.jwks.json"
bound_claims = {{ repository_owner_id = "{GITHUB_OWNER_ID}", runner_environment = "self-hosted", environment = "{env}" }}

[[environments.trust_policies]]
name = "gitlab"
issuer = "{RS_ISSUER}"
jwks_file = "pki/rs.jwks.json"
provider = "gitlab"
bound_claims = {{ namespace_id = "72" }}
"#,
            ceiling = if env == "staging" {
                format!("max_session_seconds = {STAGING_MAX_SESSION}")
            } else {
                String::new()
            }
        ));
        if env == "production" {
            toml.push_str(
                r#"
[[environments.signing_keys]]
alias = "prod-only"
algorithm = "ecdsa-p256-sha256"
access = { repositories = ["*"], refs = ["*"] }
"#,
            );
        }
    }
    std::fs::write(dir.join("site.toml"), toml).unwrap();
    (es, rs)
}

/// `text` (a test site.toml) with `lines` added to environment `env`'s table.
pub fn in_environment(text: &str, env: &str, lines: &str) -> String {
    let at = format!("name = \"{env}\"\n");
    assert!(text.contains(&at), "no environment {env}");
    text.replacen(&at, &format!("{at}{lines}\n"), 1)
}

impl TestSite {
    /// Starts a fresh site.
    pub async fn start() -> Self {
        Self::start_with("", None).await
    }

    /// Starts a fresh site with `extra` appended to its site.toml and, optionally, a storage
    /// engine wrapped around its sled database (fault injection).
    pub async fn start_with(extra: &str, wrap: Option<&dyn Fn(SledKv) -> Arc<dyn Kv>>) -> Self {
        Self::start_with_settings(
            extra,
            wrap,
            meshsign_server::audit::AuditSettings::default(),
        )
        .await
    }

    /// A site whose store counts what the site reads ([`UnreadableEntryKv`] with no damaged
    /// entry): the records read from `tree`, and the read calls made to any tree (each a round
    /// trip on a database).
    pub async fn start_counting(
        extra: &str,
        tree: meshsign_server::store::Tree,
    ) -> (Self, StoreCounts) {
        let counts = std::sync::Mutex::new(None);
        let wrap = |kv: SledKv| -> Arc<dyn Kv> {
            let kv = UnreadableEntryKv::new(kv, 0).counting(tree);
            *counts.lock().unwrap_or_else(|p| p.into_inner()) = Some(StoreCounts {
                reads: kv.reads(),
                calls: kv.calls(),
                tree_calls: kv.tree_calls(),
            });
            Arc::new(kv)
        };
        let site = Self::start_with(extra, Some(&wrap)).await;
        let counts = counts.lock().unwrap_or_else(|p| p.into_inner()).take();
        (
            site,
            counts.expect("the site opened its store through the wrapper"),
        )
    }

    /// [`TestSite::start_with`] with explicit audit settings (benchmarks turn the flush off);
    /// checkpoint settings come from the site config.
    pub async fn start_with_settings(
        extra: &str,
        wrap: Option<&dyn Fn(SledKv) -> Arc<dyn Kv>>,
        settings: meshsign_server::audit::AuditSettings,
    ) -> Self {
        Self::start_edited(
            &|text: String| {
                let mut text = if extra.contains("[review]") {
                    text.replacen(REVIEW_OFF, "\n", 1)
                } else {
                    text
                };
                text.push_str(extra);
                text
            },
            wrap,
            settings,
        )
        .await
    }

    /// A fresh site whose site.toml is `edit`ed first (a setting inside an environment's
    /// table, which `extra` cannot reach: see [`in_environment`]).
    pub async fn start_edited(
        edit: &dyn Fn(String) -> String,
        wrap: Option<&dyn Fn(SledKv) -> Arc<dyn Kv>>,
        settings: meshsign_server::audit::AuditSettings,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (es, rs) = write_site_files(dir.path());
        let site_toml = dir.path().join("site.toml");
        let text = std::fs::read_to_string(&site_toml).unwrap();
        std::fs::write(&site_toml, edit(text)).unwrap();
        let clock = ManualClock::new();
        let cfg = SiteConfig::load(&site_toml).unwrap();
        std::fs::create_dir_all(&cfg.data_dir).unwrap();
        let kv = wrap.map(|w| w(SledKv::open(&cfg.data_dir).unwrap()));
        let settings = meshsign_server::audit::AuditSettings {
            checkpoint_every: cfg.audit.checkpoint_every,
            checkpoint_interval: std::time::Duration::from_secs(cfg.audit.checkpoint_seconds),
            durable: settings.durable,
            ..Default::default()
        };
        let state = SiteState::open_with(cfg, Arc::new(clock.clone()), settings, kv).unwrap();
        let handle = api::start(Arc::new(state)).await.unwrap();
        let client = client_config(dir.path(), &handle);
        Self {
            dir: Arc::new(dir),
            handle,
            clock,
            es: Arc::new(es),
            rs: Arc::new(rs),
            client,
            site_toml,
        }
    }

    /// Another replica of this site: the same config, PKI, KEK and issuers, its own data
    /// folder (`data-<name>`, for its marker) and ports. Only meaningful on a shared store
    /// (`[store] engine = "postgres"`).
    pub async fn replica(&self, name: &str) -> Self {
        let text = std::fs::read_to_string(&self.site_toml).unwrap();
        let text = text.replacen(
            "data_dir = \"data\"",
            &format!("data_dir = \"data-{name}\""),
            1,
        );
        let site_toml = self.dir.path().join(format!("site-{name}.toml"));
        std::fs::write(&site_toml, text).unwrap();
        let handle = start_site(&site_toml, self.clock.clone()).await;
        let client = client_config_named(self.dir.path(), &handle, &format!("client-{name}.toml"));
        Self {
            dir: self.dir.clone(),
            handle,
            clock: self.clock.clone(),
            es: self.es.clone(),
            rs: self.rs.clone(),
            client,
            site_toml,
        }
    }

    /// Stops the site and starts it again on the same data (new ports).
    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    /// [`TestSite::restart`], running `between` on the data folder while the site is down
    /// (to simulate what a crash leaves behind).
    pub async fn restart_with(self, between: impl FnOnce(&Path)) -> Self {
        let TestSite {
            dir,
            handle,
            clock,
            es,
            rs,
            site_toml,
            ..
        } = self;
        handle.shutdown().await;
        between(&dir.path().join("data"));
        let handle = start_site(&site_toml, clock.clone()).await;
        let client = client_config(dir.path(), &handle);
        Self {
            dir,
            handle,
            clock,
            es,
            rs,
            client,
            site_toml,
        }
    }

    /// The site's shared state.
    pub fn state(&self) -> &Arc<SiteState> {
        &self.handle.state
    }

    /// Now, by the site's clock.
    pub fn now(&self) -> i64 {
        self.clock.unix()
    }

    /// GitHub-shaped claims for `env` from the ES256 issuer, valid 5 minutes from the site's now.
    pub fn claims(&self, env: &str) -> Value {
        GithubJob::new(env).claims(
            ES_ISSUER,
            &format!("meshsign:{env}:{REGION}"),
            &random_id().unwrap(),
            self.now(),
            300,
        )
    }

    /// Claims of a GitLab CI job (GitLab's names), for the RS256 issuer.
    pub fn gitlab_claims(&self, env: &str) -> Value {
        meshsign_certs_dev::GitlabJob::new(env).claims(
            RS_ISSUER,
            &format!("meshsign:{env}:{REGION}"),
            &random_id().unwrap(),
            self.now(),
            300,
        )
    }

    /// A valid ES256 token for `env`.
    pub fn token(&self, env: &str) -> String {
        self.es.mint(&self.claims(env)).unwrap()
    }

    /// An enroll request with a fresh runner key.
    pub fn enroll_request(&self, env: &str, token: String, key: &RunnerKey) -> v1::EnrollRequest {
        v1::EnrollRequest {
            token,
            csr_der: key.csr_der().unwrap(),
            runner_fingerprint: "ab".repeat(32),
            region: REGION.into(),
            requested_ttl_seconds: 0,
            environment: env.into(),
            device_proof: None,
        }
    }

    /// A Verification client on the enroll port (public, no client certificate).
    pub async fn verification(&self) -> v1::verification_client::VerificationClient<Channel> {
        v1::verification_client::VerificationClient::new(self.enroll_channel().await)
    }

    /// A channel to the enroll port (server-auth TLS, the site's CA pinned).
    pub async fn enroll_channel(&self) -> Channel {
        let roots = meshsign_client::net::roots(&self.client).unwrap();
        let tls = meshsign_client::net::tls_config(roots, None).unwrap();
        meshsign_client::net::connect(&self.client.enroll_endpoint, "localhost", tls)
            .await
            .unwrap()
    }

    /// An Enrollment client whose connection comes from `source` (any 127.0.0.0/8 address):
    /// for what a site does with many source addresses.
    pub async fn enrollment_from(&self, source: std::net::IpAddr) -> EnrollmentClient<Channel> {
        let roots = meshsign_client::net::roots(&self.client).unwrap();
        let tls = meshsign_client::net::tls_config(roots, None).unwrap();
        let target: std::net::SocketAddr = self.client.enroll_endpoint.parse().unwrap();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let tls = tls.clone();
            async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(std::net::SocketAddr::new(source, 0))?;
                let tcp = socket.connect(target).await?;
                let name = rustls_pki_types::ServerName::try_from("localhost")
                    .map_err(std::io::Error::other)?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        let ch = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(connector)
            .await
            .unwrap();
        EnrollmentClient::new(ch)
    }

    /// An Enrollment client on the enroll port (server-auth TLS).
    pub async fn enrollment(&self) -> EnrollmentClient<Channel> {
        EnrollmentClient::new(self.enroll_channel().await)
    }

    /// Enrolls a fresh key in `env` with a valid token; returns the key, response and a signer.
    pub async fn enrolled(
        &self,
        env: &str,
    ) -> (RunnerKey, v1::EnrollResponse, SignerClient<Channel>) {
        let key = RunnerKey::generate().unwrap();
        let req = self.enroll_request(env, self.token(env), &key);
        let (resp, signer) = self.enroll_signed(&key, req).await;
        (key, resp, signer)
    }

    /// An Admin client with the admin certificate.
    pub async fn admin(&self) -> v1::admin_client::AdminClient<Channel> {
        meshsign_client::site::admin::connect(&self.client)
            .await
            .unwrap()
    }

    /// An Admin client with the read-only auditor certificate.
    pub async fn auditor(&self) -> v1::admin_client::AdminClient<Channel> {
        self.admin_as("auditor").await
    }

    /// An Admin client as the second admin (`ops/admin/dev-2`), for two-person review.
    pub async fn second_admin(&self) -> v1::admin_client::AdminClient<Channel> {
        self.admin_as("admin-2").await
    }

    /// An Admin client with `pki/<name>.pem`.
    async fn admin_as(&self, name: &str) -> v1::admin_client::AdminClient<Channel> {
        let mut cfg = self.client.clone();
        let pki = self.dir.path().join("pki");
        cfg.admin = Some(meshsign_client::config::AdminIdentity {
            cert_file: pki.join(format!("{name}.pem")),
            key_file: pki.join(format!("{name}.key.pem")),
        });
        meshsign_client::site::admin::connect(&cfg).await.unwrap()
    }

    /// A sign-port client for an enrolled key (a new connection).
    pub async fn signer_for(
        &self,
        key: &RunnerKey,
        resp: &v1::EnrollResponse,
    ) -> Result<SignerClient<Channel>, String> {
        meshsign_client::session::Session::connect_signer(&self.client, key, resp)
            .await
            .map_err(|e| e.to_string())
    }

    /// Enrolls with `req`, which must be accepted.
    pub async fn enroll_ok(&self, req: v1::EnrollRequest) -> v1::EnrollResponse {
        self.enrollment()
            .await
            .enroll(req)
            .await
            .unwrap()
            .into_inner()
    }

    /// Enrolls `key` with `req` (which must be accepted) and connects a signer with the
    /// certificate.
    pub async fn enroll_signed(
        &self,
        key: &RunnerKey,
        req: v1::EnrollRequest,
    ) -> (v1::EnrollResponse, SignerClient<Channel>) {
        let resp = self.enroll_ok(req).await;
        let signer = self.signer_for(key, &resp).await.unwrap();
        (resp, signer)
    }

    /// Enrolls in `env` with claims changed by `f`.
    pub async fn enrolled_with(
        &self,
        env: &str,
        f: impl FnOnce(&mut Value),
    ) -> (RunnerKey, v1::EnrollResponse, SignerClient<Channel>) {
        let key = RunnerKey::generate().unwrap();
        let mut claims = self.claims(env);
        f(&mut claims);
        let req = self.enroll_request(env, self.es.mint(&claims).unwrap(), &key);
        let (resp, signer) = self.enroll_signed(&key, req).await;
        (key, resp, signer)
    }

    /// Every audit record so far.
    /// Every audit record; each one's reason is a word of the vocabulary
    /// (`meshsign_evidence::reason::Reason`), checked here for every test that reads the log.
    pub fn audit(&self) -> Vec<AuditRecord> {
        let all = self.state().audit.all().unwrap();
        for r in &all {
            assert!(
                r.reason.is_empty()
                    || meshsign_evidence::reason::Reason::parse(&r.reason).is_some(),
                "audit seq {}: reason `{}` is not in the vocabulary",
                r.seq,
                r.reason
            );
        }
        all
    }

    /// The last decision in the audit log: periodic checkpoints (housekeeping the site writes
    /// on its own clock, at any moment) are passed over, so a test that caused a decision
    /// reads that decision whatever the checkpoint ticker did meanwhile.
    pub fn last_audit(&self) -> AuditRecord {
        self.audit()
            .into_iter()
            .rev()
            .find(|r| r.rpc != "Checkpoint")
            .expect("an audit record")
    }
}

async fn start_site(site_toml: &Path, clock: ManualClock) -> SiteHandle {
    // A store a test opened between a stop and this start (to injure it) is released when
    // sled's own flusher thread lets go of it, a moment after the test dropped it: wait for
    // the lock (the state we need), for up to 10 s, rather than fail on the race.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let state = loop {
        let cfg = SiteConfig::load(site_toml).unwrap();
        match SiteState::open(cfg, Arc::new(clock.clone())) {
            Ok(s) => break s,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    api::start(Arc::new(state)).await.unwrap()
}

/// A client config for a running test site.
pub fn client_config(dir: &Path, h: &SiteHandle) -> ClientConfig {
    client_config_named(dir, h, "client.toml")
}

/// [`client_config`] written to `name` in `dir`.
pub fn client_config_named(dir: &Path, h: &SiteHandle, name: &str) -> ClientConfig {
    let toml = format!(
        r#"region = "{REGION}"
trust_domain = "{TRUST_DOMAIN}"
server_name = "localhost"
ca_file = "pki/server-ca.pem"
enroll_endpoint = "{}"
sign_endpoint = "{}"
admin_endpoint = "{}"
[environments.staging]
audience = "meshsign:staging:{REGION}"
[environments.production]
audience = "meshsign:production:{REGION}"
[admin]
cert_file = "pki/admin.pem"
key_file = "pki/admin.key.pem"
"#,
        h.enroll_addr, h.sign_addr, h.admin_addr
    );
    let path = dir.join(name);
    std::fs::write(&path, toml).unwrap();
    ClientConfig::load(&path).unwrap()
}

/// Runs `openssl` with `args`; returns (success, stdout+stderr).
pub fn openssl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A storage engine that fails every write while `fail` is set (a disk gone read-only), and
/// counts the reads of the whole issuance history (`scan_prefix` of the `Certs` tree).
pub struct FaultyKv {
    inner: SledKv,
    /// Set to make writes and flushes fail.
    pub fail: Arc<std::sync::atomic::AtomicBool>,
    /// Scans of the `Certs` tree so far.
    pub cert_scans: Arc<std::sync::atomic::AtomicUsize>,
}

impl FaultyKv {
    /// Wraps sled.
    pub fn new(inner: SledKv, fail: Arc<std::sync::atomic::AtomicBool>) -> Self {
        Self::counting(inner, fail, Arc::default())
    }

    /// Wraps sled, counting scans of the `Certs` tree into `cert_scans`.
    pub fn counting(
        inner: SledKv,
        fail: Arc<std::sync::atomic::AtomicBool>,
        cert_scans: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Self {
        Self {
            inner,
            fail,
            cert_scans,
        }
    }

    fn check(&self) -> Result<(), meshsign_server::store::StoreError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(meshsign_server::store::StoreError::Engine(
                "Read-only file system (os error 30)".into(),
            ));
        }
        Ok(())
    }
}

impl Kv for FaultyKv {
    fn get(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
    ) -> Result<Option<Vec<u8>>, meshsign_server::store::StoreError> {
        self.inner.get(t, k)
    }
    fn put(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
        v: &[u8],
    ) -> Result<(), meshsign_server::store::StoreError> {
        self.check()?;
        self.inner.put(t, k, v)
    }
    fn insert_new(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
        v: &[u8],
    ) -> Result<bool, meshsign_server::store::StoreError> {
        self.check()?;
        self.inner.insert_new(t, k, v)
    }
    fn update(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, meshsign_server::store::StoreError> {
        self.check()?;
        self.inner.update(t, k, old, new)
    }
    fn remove(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
    ) -> Result<(), meshsign_server::store::StoreError> {
        self.check()?;
        self.inner.remove(t, k)
    }
    fn scan_prefix(
        &self,
        t: meshsign_server::store::Tree,
        p: &[u8],
    ) -> Result<Vec<meshsign_server::store::Entry>, meshsign_server::store::StoreError> {
        if t == meshsign_server::store::Tree::Certs {
            self.cert_scans
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.scan_prefix(t, p)
    }
    fn scan_range(
        &self,
        t: meshsign_server::store::Tree,
        f: &[u8],
        l: usize,
    ) -> Result<Vec<meshsign_server::store::Entry>, meshsign_server::store::StoreError> {
        self.inner.scan_range(t, f, l)
    }
    fn last(
        &self,
        t: meshsign_server::store::Tree,
    ) -> Result<Option<meshsign_server::store::Entry>, meshsign_server::store::StoreError> {
        self.inner.last(t)
    }
    fn flush(&self) -> Result<(), meshsign_server::store::StoreError> {
        self.check()?;
        self.inner.flush()
    }
}

/// Exports the whole audit log through the admin port, as parsed lines.
pub async fn export(
    site: &TestSite,
    req: v1::ExportAuditRequest,
) -> Vec<meshsign_evidence::audit::ExportLine> {
    let (lines, end) = export_raw(site, req).await;
    assert!(end.is_none(), "the export failed: {end:?}");
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An export's lines as sent, and the status it ended with (None: a clean end); a message of
/// several lines (`lines_per_message`) is split into its lines.
pub async fn export_raw(
    site: &TestSite,
    req: v1::ExportAuditRequest,
) -> (Vec<String>, Option<tonic::Status>) {
    let (messages, end) = export_messages(site, req).await;
    let lines = messages
        .iter()
        .flat_map(meshsign_client::site::admin::export_lines)
        // A line that is not UTF-8 shows as such in the test's comparison.
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    (lines, end)
}

/// An export's messages as sent, and the status it ended with (None: a clean end).
pub async fn export_messages(
    site: &TestSite,
    req: v1::ExportAuditRequest,
) -> (Vec<v1::ExportLine>, Option<tonic::Status>) {
    let mut stream = site
        .admin()
        .await
        .export_audit(req)
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// The site's audit key, fetched through the admin port.
pub async fn audit_key(site: &TestSite) -> p256::ecdsa::VerifyingKey {
    use p256::pkcs8::DecodePublicKey as _;
    let k = site
        .admin()
        .await
        .get_audit_public_key(v1::GetAuditPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    p256::ecdsa::VerifyingKey::from_public_key_der(&k.public_key_der).unwrap()
}

/// A Sign request for a fixed digest.
pub fn sign_req(alias: &str, byte: u8) -> v1::SignRequest {
    v1::SignRequest {
        key_alias: alias.into(),
        input: Some(v1::sign_request::Input::Sha256Digest(vec![byte; 32])),
        artifact_name: "t".into(),
        algorithm: String::new(),
        signed_entry_timestamp: false,
    }
}

/// [`sign_req`] asking for the signature's signed entry timestamp (what a Sigstore bundle
/// needs).
pub fn sign_req_promised(alias: &str, byte: u8) -> v1::SignRequest {
    v1::SignRequest {
        signed_entry_timestamp: true,
        ..sign_req(alias, byte)
    }
}

/// Writes DER as PEM to `path`.
pub fn write_pem(path: &Path, label: &str, der: &[u8]) {
    std::fs::write(path, meshsign_evidence::pem_encode(label, der)).unwrap();
}

/// openssl verifies a message signature from the site: Ed25519 with `pkeyutl -rawin`, the others
/// with `dgst` over SHA-384 (P-384) or SHA-256. `dir` takes the signature and key files.
pub fn openssl_verifies_message(dir: &Path, r: &v1::SignResponse, message_file: &Path) {
    let (sig, pubkey) = (dir.join("message.sig"), dir.join("message.pem"));
    std::fs::write(&sig, &r.signature).unwrap();
    write_pem(&pubkey, "PUBLIC KEY", &r.public_key_der);
    let (pk, sg, fl) = (
        pubkey.display().to_string(),
        sig.display().to_string(),
        message_file.display().to_string(),
    );
    let (ok, out) = match r.algorithm.as_str() {
        "ed25519" => openssl(&[
            "pkeyutl", "-verify", "-pubin", "-inkey", &pk, "-rawin", "-in", &fl, "-sigfile", &sg,
        ]),
        "ecdsa-p384-sha384" => {
            openssl(&["dgst", "-sha384", "-verify", &pk, "-signature", &sg, &fl])
        }
        _ => openssl(&["dgst", "-sha256", "-verify", &pk, "-signature", &sg, &fl]),
    };
    assert!(ok, "{} ({}): {out}", r.key_id, r.algorithm);
}

/// A test whose keys live in a SoftHSM2 token. SoftHSM2 reads `SOFTHSM2_CONF` once per process
/// and this workspace forbids the `unsafe` that `set_var` needs, so the test makes a token
/// labelled `label` in a temp dir and runs itself (`test`, by exact name) again as a child
/// process with its config. In the child this returns the token's folder (its `pin` file is
/// beside it): run the body, then call [`softhsm_child_done`]. In the parent it returns `None`
/// after checking the child: its whole body ran (`done` written) and it passed. SoftHSM2 2.6.1
/// with OpenSSL 3 sometimes crashes in its exit-time destructors after that (about 1 run in
/// 10): that crash, and only after `done`, is tolerated — any failure before it is not. The
/// child's `report:` lines are printed by the parent.
pub fn in_softhsm_child(test: &str, label: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MESHSIGN_TEST_HSM_DIR") {
        return Some(PathBuf::from(dir));
    }
    let hsm_dir = tempfile::tempdir().unwrap();
    let conf = meshsign_certs_dev::softhsm::token(hsm_dir.path(), label).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env("SOFTHSM2_CONF", conf)
        .env("MESHSIGN_TEST_HSM_DIR", hsm_dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(hsm_dir.path().join("done").exists(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
    for line in text
        .lines()
        .filter_map(|l| l.find("report:").map(|i| &l[i..]))
    {
        eprintln!("{line}");
    }
    #[cfg(unix)]
    if !out.status.success() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(out.status.signal(), Some(11), "{text}");
        eprintln!("note: SoftHSM2 crashed at process exit after the test completed");
    }
    None
}

/// Marks the child of [`in_softhsm_child`] as having run its whole body.
pub fn softhsm_child_done(hsm_dir: &Path) {
    std::fs::write(hsm_dir.join("done"), b"").unwrap();
}

/// What a [`TestSite::start_counting`] site's store counted.
pub struct StoreCounts {
    /// Records read from the counted tree.
    pub reads: Arc<std::sync::atomic::AtomicU64>,
    /// Read calls to any tree.
    pub calls: Arc<std::sync::atomic::AtomicU64>,
    /// Calls, reads and writes, to the counted tree (a `get_many` or a `put_many` counts one:
    /// on a database, one round trip each).
    pub tree_calls: Arc<std::sync::atomic::AtomicU64>,
}

/// A storage engine whose audit entry `seq` cannot be read (a damaged page: the engine's
/// checksum fails when the page is read, as sled's "Read corrupted data at file offset …").
/// Everything else reads and writes as sled does. It also counts the records read from one
/// tree (the audit log unless told: a get or `last` counts one, a scan each row it returns), to
/// show what a request made the site read.
pub struct UnreadableEntryKv {
    inner: SledKv,
    seq: u64,
    counted: meshsign_server::store::Tree,
    reads: Arc<std::sync::atomic::AtomicU64>,
    calls: Arc<std::sync::atomic::AtomicU64>,
    tree_calls: Arc<std::sync::atomic::AtomicU64>,
    gate: Option<Arc<ScanGate>>,
    /// With [`UnreadableEntryKv::late_writes`]: whether the damaged entry was read yet.
    late: Option<Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>>,
    /// With [`UnreadableEntryKv::misread`]: what the damaged entry reads as instead of an error.
    misread: Option<Misread>,
}

/// What a damaged audit entry reads as when the engine does not notice ([`UnreadableEntryKv::misread`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misread {
    /// Its first half (a write cut short).
    Cut,
    /// The next entry's bytes (a misplaced page).
    Next,
}

/// Holds every scan of one tree, once armed, until opened: a whole-tree read (a snapshot's)
/// caught part way, deterministically.
pub struct ScanGate {
    tree: meshsign_server::store::Tree,
    /// (armed, a scan waits or waited at it)
    state: std::sync::Mutex<(bool, bool)>,
    changed: std::sync::Condvar,
}

impl ScanGate {
    /// A gate on scans of `tree`, open until armed.
    pub fn new(tree: meshsign_server::store::Tree) -> Arc<Self> {
        Arc::new(Self {
            tree,
            state: std::sync::Mutex::new((false, false)),
            changed: std::sync::Condvar::new(),
        })
    }

    /// From now on, scans of the tree wait.
    pub fn arm(&self) {
        self.state.lock().unwrap().0 = true;
    }

    /// Lets every waiting and later scan through.
    pub fn open(&self) {
        self.state.lock().unwrap().0 = false;
        self.changed.notify_all();
    }

    /// Blocks until a scan reached the armed gate (or `timeout`); whether one did.
    pub fn wait_reached(&self, timeout: std::time::Duration) -> bool {
        let s = self.state.lock().unwrap();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| !s.1)
            .unwrap();
        s.1
    }

    fn pass(&self, t: meshsign_server::store::Tree) {
        if t != self.tree {
            return;
        }
        let mut s = self.state.lock().unwrap();
        if s.0 {
            s.1 = true;
            self.changed.notify_all();
        }
        while s.0 {
            s = self.changed.wait(s).unwrap();
        }
    }
}

impl UnreadableEntryKv {
    /// Wraps sled; audit entry `seq` is unreadable (0: none, seqs start at 1).
    pub fn new(inner: SledKv, seq: u64) -> Self {
        Self {
            inner,
            seq,
            counted: meshsign_server::store::Tree::Audit,
            reads: Arc::default(),
            calls: Arc::default(),
            tree_calls: Arc::default(),
            gate: None,
            late: None,
            misread: None,
        }
    }

    /// The damaged entry reads without an error, as `how` says: the damage only its contents
    /// show.
    pub fn misread(mut self, how: Misread) -> Self {
        self.misread = Some(how);
        self
    }

    /// The damaged entry's bytes as misread (`stored`: what was written).
    fn misread_bytes(&self, how: Misread, stored: Vec<u8>) -> Vec<u8> {
        match how {
            Misread::Cut => stored[..stored.len() / 2].to_vec(),
            Misread::Next => self
                .inner
                .get(
                    meshsign_server::store::Tree::Audit,
                    &(self.seq + 1).to_be_bytes(),
                )
                .ok()
                .flatten()
                .unwrap_or(stored),
        }
    }

    /// Writes to the audit log wait until the damaged entry has been read (at most 10 s), then
    /// take 200 ms more, as on a slow disk: a commit the writer began before the damage was
    /// found lands well after it was.
    pub fn late_writes(mut self) -> Self {
        self.late = Some(Arc::default());
        self
    }

    fn found(&self) {
        if let Some(late) = &self.late {
            *late.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            late.1.notify_all();
        }
    }

    fn hold(&self, t: meshsign_server::store::Tree) {
        let Some(late) = &self.late else { return };
        if t != meshsign_server::store::Tree::Audit {
            return;
        }
        // A poisoned lock (a panicking test thread) still holds the flag: read through it.
        let read = late.0.lock().unwrap_or_else(|p| p.into_inner());
        drop(
            late.1
                .wait_timeout_while(read, std::time::Duration::from_secs(10), |r| !*r)
                .unwrap_or_else(|p| p.into_inner()),
        );
        // Not a wait for a state: the injected slowness of the write itself (a slow disk). The
        // store cannot observe the moment the damage is reported, which is what it must land
        // after; 200 ms is ~10⁴ times the time between the damaged read and that report.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    /// Scans pass `gate` first.
    pub fn gated(mut self, gate: Arc<ScanGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Counts the reads of `tree` instead of the audit log's.
    pub fn counting(mut self, tree: meshsign_server::store::Tree) -> Self {
        self.counted = tree;
        self
    }

    /// The count of records read from the counted tree, shared with the caller.
    pub fn reads(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.reads.clone()
    }

    /// The count of read calls made to the store, any tree (a get, a `get_many`, a scan or a
    /// `last` each count one: on a database, one round trip each).
    pub fn calls(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.calls.clone()
    }

    /// The count of calls, reads and writes, made to the counted tree, shared with the caller.
    pub fn tree_calls(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.tree_calls.clone()
    }

    fn call(&self) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn tree_call(&self, t: meshsign_server::store::Tree) {
        if t == self.counted {
            self.tree_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn damaged(&self, t: meshsign_server::store::Tree, k: &[u8]) -> bool {
        t == meshsign_server::store::Tree::Audit && k == self.seq.to_be_bytes().as_slice()
    }

    fn count(&self, t: meshsign_server::store::Tree, n: usize) {
        if t == self.counted {
            self.reads
                .fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn read_error() -> meshsign_server::store::StoreError {
        meshsign_server::store::StoreError::Engine(
            "Read corrupted data at file offset 1918128".into(),
        )
    }

    fn rows(
        &self,
        t: meshsign_server::store::Tree,
        rows: Vec<meshsign_server::store::Entry>,
    ) -> Result<Vec<meshsign_server::store::Entry>, meshsign_server::store::StoreError> {
        if let Some(g) = &self.gate {
            g.pass(t);
        }
        self.call();
        self.tree_call(t);
        self.count(t, rows.len());
        if let Some(how) = self.misread {
            return Ok(rows
                .into_iter()
                .map(|(k, v)| match self.damaged(t, &k) {
                    true => {
                        let v = self.misread_bytes(how, v);
                        (k, v)
                    }
                    false => (k, v),
                })
                .collect());
        }
        if rows.iter().any(|(k, _)| self.damaged(t, k)) {
            self.found();
            return Err(Self::read_error());
        }
        Ok(rows)
    }
}

impl Kv for UnreadableEntryKv {
    fn get(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
    ) -> Result<Option<Vec<u8>>, meshsign_server::store::StoreError> {
        self.call();
        self.tree_call(t);
        self.count(t, 1);
        if let (Some(how), true) = (self.misread, self.damaged(t, k)) {
            return Ok(self.inner.get(t, k)?.map(|v| self.misread_bytes(how, v)));
        }
        if self.damaged(t, k) {
            self.found();
            return Err(Self::read_error());
        }
        self.inner.get(t, k)
    }
    fn get_many(
        &self,
        t: meshsign_server::store::Tree,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, meshsign_server::store::StoreError> {
        self.call();
        self.tree_call(t);
        self.count(t, keys.len());
        if self.misread.is_some() {
            return keys.iter().map(|k| self.get(t, k)).collect();
        }
        if keys.iter().any(|k| self.damaged(t, k)) {
            self.found();
            return Err(Self::read_error());
        }
        keys.iter().map(|k| self.inner.get(t, k)).collect()
    }
    fn put(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
        v: &[u8],
    ) -> Result<(), meshsign_server::store::StoreError> {
        self.tree_call(t);
        self.hold(t);
        self.inner.put(t, k, v)
    }
    fn put_many(
        &self,
        t: meshsign_server::store::Tree,
        entries: &[(&[u8], &[u8])],
    ) -> Result<(), meshsign_server::store::StoreError> {
        self.tree_call(t);
        self.hold(t);
        self.inner.put_many(t, entries)
    }
    fn insert_new(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
        v: &[u8],
    ) -> Result<bool, meshsign_server::store::StoreError> {
        self.tree_call(t);
        self.hold(t);
        self.inner.insert_new(t, k, v)
    }
    fn update(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, meshsign_server::store::StoreError> {
        self.tree_call(t);
        self.inner.update(t, k, old, new)
    }
    fn remove(
        &self,
        t: meshsign_server::store::Tree,
        k: &[u8],
    ) -> Result<(), meshsign_server::store::StoreError> {
        self.tree_call(t);
        self.inner.remove(t, k)
    }
    fn scan_prefix(
        &self,
        t: meshsign_server::store::Tree,
        p: &[u8],
    ) -> Result<Vec<meshsign_server::store::Entry>, meshsign_server::store::StoreError> {
        self.rows(t, self.inner.scan_prefix(t, p)?)
    }
    fn scan_range(
        &self,
        t: meshsign_server::store::Tree,
        f: &[u8],
        l: usize,
    ) -> Result<Vec<meshsign_server::store::Entry>, meshsign_server::store::StoreError> {
        self.rows(t, self.inner.scan_range(t, f, l)?)
    }
    /// Every part checked as each alone is, counted as the one call it is (one round trip on
    /// a database): the calls it made, less all but one once they all succeeded (a concurrent
    /// caller's counts are kept).
    fn scans_and_get_many(
        &self,
        scans: &[meshsign_server::store::Scan<'_>],
        get: (meshsign_server::store::Tree, &[Vec<u8>]),
    ) -> Result<meshsign_server::store::ScansAndValues, meshsign_server::store::StoreError> {
        let made = scans.len() + usize::from(!get.1.is_empty());
        let out = meshsign_server::store::one_by_one(self, scans, get)?;
        self.calls.fetch_sub(
            made.saturating_sub(1) as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
        Ok(out)
    }
    fn last(
        &self,
        t: meshsign_server::store::Tree,
    ) -> Result<Option<meshsign_server::store::Entry>, meshsign_server::store::StoreError> {
        self.call();
        self.tree_call(t);
        self.count(t, 1);
        self.inner.last(t)
    }
    fn flush(&self) -> Result<(), meshsign_server::store::StoreError> {
        self.inner.flush()
    }
}

/// Copies a folder tree (a stopped site's data folder, to damage a copy of it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Waits until `ready` holds — an observable state (a count of open connections, a record, a
/// port) — checking every 10 ms, and fails naming `what` after `within`. Tests wait on this,
/// never on a fixed sleep.
pub async fn wait_until(what: &str, within: std::time::Duration, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {within:?} for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
