//! Dev PKI and dev OIDC issuer for meshsign.
//!
//! One helper that tests and `meshsignd dev` both use (SPIRE's `test/testca`, linkerd's
//! `meshtls/tests/util.rs`): a server CA and a server certificate for loopback names, an admin CA
//! with an admin client certificate, and an OIDC issuer (ES256 or RS256) that mints tokens shaped
//! as GitHub Actions issues them. Everything is generated at run time; nothing is checked in.
//!
//! These are *dev* credentials: they are written to plain files on purpose so a developer's
//! client can use them. Site keys (runner CAs, signing keys) never come from here.

use std::path::Path;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use meshsign_evidence::pem_encode;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use zeroize::Zeroizing;

/// Errors making or writing dev material.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// rcgen refused to build a certificate or key.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The crypto library refused an operation.
    #[error("crypto: {0}")]
    Crypto(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file holds something other than a PKCS#8 EC P-256 or RSA key.
    #[error("unsupported key in {0}")]
    BadKey(String),
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A CA and a certificate it issued, as PEM.
#[derive(Clone)]
pub struct Issued {
    /// Leaf certificate, PEM.
    pub cert_pem: String,
    /// Leaf private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// The dev PKI: server TLS for loopback, an admin CA and one admin client certificate.
#[derive(Clone, Debug)]
pub struct DevPki {
    /// CA that issued the server certificate; clients pin it.
    pub server_ca_pem: String,
    /// Server certificate (localhost, 127.0.0.1, ::1) and key.
    pub server: Issued,
    /// Admin CA; the admin port verifies client certificates against it.
    pub admin_ca_pem: String,
    /// Admin client certificate (`spiffe://<td>/ops/admin/dev`) and key.
    pub admin: Issued,
    /// Read-only ops certificate (`spiffe://<td>/ops/auditor/dev`) and key.
    pub auditor: Issued,
    /// A second admin (`spiffe://<td>/ops/admin/dev-2`), to approve what the first proposes
    /// under two-person review.
    pub second_admin: Issued,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(3650);
    p
}

fn leaf_params(cn: &str, sans: Vec<SanType>, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(825);
    p
}

impl DevPki {
    /// Generates a fresh dev PKI for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, DevError> {
        let server_ca = CertifiedIssuer::self_signed(
            ca_params("meshsign dev server CA"),
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        )?;
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let sans = vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(
                "127.0.0.1"
                    .parse()
                    .map_err(|_| DevError::Crypto("ip".into()))?,
            ),
            SanType::IpAddress("::1".parse().map_err(|_| DevError::Crypto("ip".into()))?),
        ];
        let server = leaf_params("localhost", sans, ExtendedKeyUsagePurpose::ServerAuth)
            .signed_by(&server_key, &server_ca)?;

        let admin_ca = CertifiedIssuer::self_signed(
            ca_params("meshsign dev admin CA"),
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        )?;
        let ops_cert = |role: &str, name: &str| -> Result<Issued, DevError> {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let uri = format!("spiffe://{trust_domain}/ops/{role}/{name}");
            let cert = leaf_params(
                &format!("meshsign dev {role}"),
                vec![SanType::URI(uri.try_into()?)],
                ExtendedKeyUsagePurpose::ClientAuth,
            )
            .signed_by(&key, &admin_ca)?;
            Ok(Issued {
                cert_pem: cert.pem(),
                key_pem: Zeroizing::new(key.serialize_pem()),
            })
        };
        let (admin, auditor) = (ops_cert("admin", "dev")?, ops_cert("auditor", "dev")?);
        let second_admin = ops_cert("admin", "dev-2")?;

        Ok(Self {
            server_ca_pem: server_ca.pem(),
            server: Issued {
                cert_pem: server.pem(),
                key_pem: Zeroizing::new(server_key.serialize_pem()),
            },
            admin_ca_pem: admin_ca.pem(),
            admin,
            auditor,
            second_admin,
        })
    }

    /// Writes the PKI into `dir` (see [`files`] for the names); keys get mode 0600.
    pub fn write_to(&self, dir: &Path) -> Result<(), DevError> {
        let files: [(&str, &[u8], bool); 10] = [
            (files::SERVER_CA, self.server_ca_pem.as_bytes(), false),
            (files::SERVER_CERT, self.server.cert_pem.as_bytes(), false),
            (files::SERVER_KEY, self.server.key_pem.as_bytes(), true),
            (files::ADMIN_CA, self.admin_ca_pem.as_bytes(), false),
            (files::ADMIN_CERT, self.admin.cert_pem.as_bytes(), false),
            (files::ADMIN_KEY, self.admin.key_pem.as_bytes(), true),
            (files::AUDITOR_CERT, self.auditor.cert_pem.as_bytes(), false),
            (files::AUDITOR_KEY, self.auditor.key_pem.as_bytes(), true),
            (
                files::ADMIN2_CERT,
                self.second_admin.cert_pem.as_bytes(),
                false,
            ),
            (
                files::ADMIN2_KEY,
                self.second_admin.key_pem.as_bytes(),
                true,
            ),
        ];
        for (name, bytes, secret) in files {
            write_file(&dir.join(name), bytes, secret)?;
        }
        Ok(())
    }
}

pub mod postgres;
pub mod softhsm;

/// File names the dev PKI and dev issuer use inside their folder.
pub mod files {
    /// Server CA certificate (clients pin it).
    pub const SERVER_CA: &str = "server-ca.pem";
    /// Server certificate.
    pub const SERVER_CERT: &str = "server.pem";
    /// Server private key.
    pub const SERVER_KEY: &str = "server.key.pem";
    /// Admin CA certificate.
    pub const ADMIN_CA: &str = "admin-ca.pem";
    /// Admin client certificate.
    pub const ADMIN_CERT: &str = "admin.pem";
    /// Admin client private key.
    pub const ADMIN_KEY: &str = "admin.key.pem";
    /// Auditor (read-only ops) client certificate.
    pub const AUDITOR_CERT: &str = "auditor.pem";
    /// Auditor client private key.
    pub const AUDITOR_KEY: &str = "auditor.key.pem";
    /// Second admin's client certificate (two-person review).
    pub const ADMIN2_CERT: &str = "admin-2.pem";
    /// Second admin's private key.
    pub const ADMIN2_KEY: &str = "admin-2.key.pem";
    /// Dev OIDC issuer signing key (PKCS#8).
    pub const OIDC_KEY: &str = "dev-oidc.key.pem";
    /// Dev OIDC issuer JWKS (public).
    pub const OIDC_JWKS: &str = "dev-oidc.jwks.json";
}

/// Writes a file; with `secret` it is created with mode 0600.
pub fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), DevError> {
    meshsign_evidence::files::write_atomic(path, bytes, secret).map_err(|source| DevError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// JWT algorithms the dev issuer can sign with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtAlg {
    /// ECDSA P-256 with SHA-256 (fixed-size r||s signature).
    Es256,
    /// RSA PKCS#1 v1.5 with SHA-256.
    Rs256,
}

enum IssuerKey {
    Ec(EcdsaKeyPair),
    Rsa(aws_lc_rs::rsa::KeyPair),
}

/// An OIDC issuer that mints JWTs offline (a stand-in for a CI's token service).
pub struct OidcIssuer {
    /// The `iss` it writes.
    pub issuer: String,
    /// The `kid` in the JWS header and the JWKS.
    pub kid: String,
    key: IssuerKey,
    pkcs8: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for OidcIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl OidcIssuer {
    /// A fresh issuer with a new key.
    pub fn generate(issuer: &str, kid: &str, alg: JwtAlg) -> Result<Self, DevError> {
        let pkcs8 = match alg {
            JwtAlg::Es256 => {
                let doc = EcdsaKeyPair::generate_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &SystemRandom::new(),
                )
                .map_err(|e| DevError::Crypto(e.to_string()))?;
                Zeroizing::new(doc.as_ref().to_vec())
            }
            JwtAlg::Rs256 => {
                use aws_lc_rs::encoding::AsDer as _;
                let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                    .map_err(|e| DevError::Crypto(e.to_string()))?;
                let der = kp.as_der().map_err(|e| DevError::Crypto(e.to_string()))?;
                Zeroizing::new(der.as_ref().to_vec())
            }
        };
        Self::from_pkcs8(issuer, kid, pkcs8)
    }

    /// Loads an issuer key from PKCS#8 DER (EC P-256 or RSA).
    pub fn from_pkcs8(
        issuer: &str,
        kid: &str,
        pkcs8: Zeroizing<Vec<u8>>,
    ) -> Result<Self, DevError> {
        let key = if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
        {
            IssuerKey::Ec(k)
        } else if let Ok(k) = aws_lc_rs::rsa::KeyPair::from_pkcs8(&pkcs8) {
            IssuerKey::Rsa(k)
        } else {
            return Err(DevError::BadKey(issuer.to_string()));
        };
        Ok(Self {
            issuer: issuer.to_string(),
            kid: kid.to_string(),
            key,
            pkcs8,
        })
    }

    /// Loads an issuer key from a PKCS#8 PEM file.
    pub fn load(issuer: &str, kid: &str, key_file: &Path) -> Result<Self, DevError> {
        use rustls_pki_types::PrivatePkcs8KeyDer;
        use rustls_pki_types::pem::PemObject as _;
        let der = PrivatePkcs8KeyDer::from_pem_file(key_file)
            .map_err(|_| DevError::BadKey(key_file.display().to_string()))?;
        Self::from_pkcs8(issuer, kid, Zeroizing::new(der.secret_pkcs8_der().to_vec()))
    }

    /// The JWT `alg` this issuer signs with.
    pub fn alg(&self) -> JwtAlg {
        match self.key {
            IssuerKey::Ec(_) => JwtAlg::Es256,
            IssuerKey::Rsa(_) => JwtAlg::Rs256,
        }
    }

    /// The issuer's public JWK.
    pub fn jwk(&self) -> Value {
        match &self.key {
            IssuerKey::Ec(k) => {
                let point = k.public_key().as_ref();
                // Uncompressed SEC1 point: 0x04 || x (32) || y (32).
                let (x, y) = point
                    .get(1..)
                    .unwrap_or_default()
                    .split_at(32.min(point.len().saturating_sub(1)));
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "alg": "ES256", "use": "sig",
                       "x": b64url(x), "y": b64url(y)})
            }
            IssuerKey::Rsa(k) => {
                let pk = k.public_key();
                json!({"kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig",
                       "n": b64url(pk.modulus().big_endian_without_leading_zero()),
                       "e": b64url(pk.exponent().big_endian_without_leading_zero())})
            }
        }
    }

    /// `{"keys": [jwk]}`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk()] })
    }

    /// Signs `header.claims` as a compact JWS; the header is used exactly as given.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> Result<String, DevError> {
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = match &self.key {
            IssuerKey::Ec(k) => k
                .sign(&SystemRandom::new(), signing_input.as_bytes())
                .map_err(|e| DevError::Crypto(e.to_string()))?
                .as_ref()
                .to_vec(),
            IssuerKey::Rsa(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    signing_input.as_bytes(),
                    &mut sig,
                )
                .map_err(|e| DevError::Crypto(e.to_string()))?;
                sig
            }
        };
        Ok(format!("{signing_input}.{}", b64url(&sig)))
    }

    /// Mints a token with the standard header (`alg`, `typ`, `kid`).
    pub fn mint(&self, claims: &Value) -> Result<String, DevError> {
        let alg = match self.alg() {
            JwtAlg::Es256 => "ES256",
            JwtAlg::Rs256 => "RS256",
        };
        self.sign_with_header(&json!({"alg": alg, "typ": "JWT", "kid": self.kid}), claims)
    }

    /// Writes the key (0600) and JWKS into `dir` under [`files::OIDC_KEY`] / [`files::OIDC_JWKS`].
    pub fn write_to(&self, dir: &Path) -> Result<(), DevError> {
        let pem = Zeroizing::new(pem_encode("PRIVATE KEY", &self.pkcs8));
        write_file(&dir.join(files::OIDC_KEY), pem.as_bytes(), true)?;
        write_file(
            &dir.join(files::OIDC_JWKS),
            self.jwks().to_string().as_bytes(),
            false,
        )
    }
}

/// The numeric id GitHub gives the test organisation `acme` (`repository_owner_id`; GitHub's
/// tokens carry ids as strings). Policies bind it, not the renamable name.
pub const GITHUB_OWNER_ID: &str = "1100001";
/// The numeric id of `acme/app` (`repository_id`).
pub const GITHUB_REPOSITORY_ID: &str = "690000001";

/// Claims shaped as GitHub Actions issues them for a job.
#[derive(Clone, Debug)]
pub struct GithubJob {
    /// `repository`, e.g. `acme/app`.
    pub repository: String,
    /// `ref`, e.g. `refs/heads/main`.
    pub git_ref: String,
    /// Deployment `environment`.
    pub environment: String,
    /// `check_run_id`: the job (meshsign's job id); empty leaves the claim out, as in tokens
    /// GitHub issued before 2025-11-13.
    pub check_run_id: String,
    /// `run_id`: the workflow run (meshsign's pipeline id), shared by every job of the run.
    pub run_id: String,
    /// `run_attempt`: which attempt of the run.
    pub run_attempt: String,
    /// `runner_environment`: `github-hosted` or `self-hosted`.
    pub runner_environment: String,
}

impl GithubJob {
    /// A job on `refs/heads/main` of `acme/app` in `environment`, self-hosted.
    pub fn new(environment: &str) -> Self {
        Self {
            repository: "acme/app".into(),
            git_ref: "refs/heads/main".into(),
            environment: environment.into(),
            check_run_id: "1001".into(),
            run_id: "13456789012".into(),
            run_attempt: "1".into(),
            runner_environment: "self-hosted".into(),
        }
    }

    /// The claims set: iss, aud, sub, repository, ref, environment, job_workflow_ref,
    /// check_run_id, run_id, run_attempt, runner_environment, jti, iat, nbf, exp (token valid
    /// `ttl` seconds from `now`).
    pub fn claims(&self, iss: &str, aud: &str, jti: &str, now_unix: i64, ttl: i64) -> Value {
        let mut claims = json!({
            "iss": iss,
            "aud": aud,
            "sub": format!("repo:{}:environment:{}", self.repository, self.environment),
            "repository": self.repository,
            "repository_id": GITHUB_REPOSITORY_ID,
            "repository_owner": self.repository.split('/').next().unwrap_or_default(),
            "repository_owner_id": GITHUB_OWNER_ID,
            "ref": self.git_ref,
            "environment": self.environment,
            "workflow_ref": format!("{}/.github/workflows/release.yml@{}", self.repository, self.git_ref),
            "job_workflow_ref": format!("{}/.github/workflows/release.yml@{}", self.repository, self.git_ref),
            "sha": "e0f1a2b3c4d5e6f708192a3b4c5d6e7f80912a3b",
            "workflow": "release",
            "run_id": self.run_id,
            "run_number": "7",
            "run_attempt": self.run_attempt,
            "runner_environment": self.runner_environment,
            "event_name": "push",
            "jti": jti,
            "iat": now_unix,
            "nbf": now_unix,
            "exp": now_unix + ttl,
        });
        if !self.check_run_id.is_empty() {
            claims["check_run_id"] = self.check_run_id.clone().into();
        }
        claims
    }
}

/// Claims shaped as GitLab CI issues them in an `id_tokens` token (names from GitLab's
/// documentation: "OpenID Connect (OIDC) Authentication Using ID Tokens").
#[derive(Clone, Debug)]
pub struct GitlabJob {
    /// `project_path`, e.g. `acme/app`.
    pub project_path: String,
    /// `ref`: the bare branch or tag name, e.g. `main`.
    pub git_ref: String,
    /// `ref_type`: `branch` or `tag`.
    pub ref_type: String,
    /// `job_id`.
    pub job_id: String,
    /// `pipeline_id`.
    pub pipeline_id: String,
    /// `environment` (deployment environment), if the job has one.
    pub environment: String,
}

impl GitlabJob {
    /// A job on branch `main` of `acme/app` deploying to `environment`.
    pub fn new(environment: &str) -> Self {
        Self {
            project_path: "acme/app".into(),
            git_ref: "main".into(),
            ref_type: "branch".into(),
            job_id: "302".into(),
            pipeline_id: "12345".into(),
            environment: environment.into(),
        }
    }

    /// The claims set GitLab puts in an ID token.
    pub fn claims(&self, iss: &str, aud: &str, jti: &str, now_unix: i64, ttl: i64) -> Value {
        let (namespace, _) = self
            .project_path
            .split_once('/')
            .unwrap_or((&self.project_path, ""));
        let ref_path = match self.ref_type.as_str() {
            "tag" => format!("refs/tags/{}", self.git_ref),
            _ => format!("refs/heads/{}", self.git_ref),
        };
        json!({
            "iss": iss,
            "aud": aud,
            "sub": format!("project_path:{}:ref_type:{}:ref:{}", self.project_path, self.ref_type, self.git_ref),
            "namespace_id": "72",
            "namespace_path": namespace,
            "project_id": "20",
            "project_path": self.project_path,
            "user_id": "5",
            "user_login": "dev1",
            "user_email": "dev1@example.test",
            "user_access_level": "developer",
            "pipeline_id": self.pipeline_id,
            "pipeline_source": "push",
            "job_id": self.job_id,
            "ref": self.git_ref,
            "ref_type": self.ref_type,
            "ref_path": ref_path,
            "ref_protected": "true",
            "environment": self.environment,
            "environment_protected": "false",
            "deployment_tier": self.environment,
            "runner_id": 27,
            "runner_environment": "self-hosted",
            "sha": "714a629c0b401fdce83e847fc9589983fc6f46bc",
            "project_visibility": "private",
            "ci_config_ref_uri": format!("gitlab.example.test/{}//.gitlab-ci.yml@{ref_path}", self.project_path),
            "ci_config_sha": "714a629c0b401fdce83e847fc9589983fc6f46bc",
            "jti": jti,
            "iat": now_unix,
            "nbf": now_unix,
            "exp": now_unix + ttl,
        })
    }
}

/// Claims shaped as the Buildkite agent's `oidc request-token` issues them (names from
/// Buildkite's OIDC documentation).
#[derive(Clone, Debug)]
pub struct BuildkiteJob {
    /// `organization_slug`.
    pub organization_slug: String,
    /// `pipeline_slug`.
    pub pipeline_slug: String,
    /// `build_branch`.
    pub build_branch: String,
    /// `build_tag` (null when the build is not for a tag).
    pub build_tag: Option<String>,
    /// `build_number`.
    pub build_number: u64,
    /// `job_id` (a UUID).
    pub job_id: String,
}

impl BuildkiteJob {
    /// A job of pipeline `app` in organization `acme` on branch `main`.
    pub fn new() -> Self {
        Self {
            organization_slug: "acme".into(),
            pipeline_slug: "app".into(),
            build_branch: "main".into(),
            build_tag: None,
            build_number: 5,
            job_id: "01945ecf-80f0-41e8-9b83-a2970a9305a1".into(),
        }
    }

    /// The claims set Buildkite puts in an OIDC token.
    pub fn claims(&self, iss: &str, aud: &str, jti: &str, now_unix: i64, ttl: i64) -> Value {
        let commit = "b5ffe3aeea51cec6c41aef16e45ee6bce47d8810";
        let git_ref = match &self.build_tag {
            Some(t) => format!("refs/tags/{t}"),
            None => format!("refs/heads/{}", self.build_branch),
        };
        json!({
            "iss": iss,
            "sub": format!(
                "organization:{}:pipeline:{}:ref:{git_ref}:commit:{commit}:step:",
                self.organization_slug, self.pipeline_slug
            ),
            "aud": aud,
            "iat": now_unix,
            "nbf": now_unix,
            "exp": now_unix + ttl,
            "jti": jti,
            "organization_slug": self.organization_slug,
            "pipeline_slug": self.pipeline_slug,
            "build_number": self.build_number,
            "build_branch": self.build_branch,
            "build_tag": self.build_tag,
            "build_commit": commit,
            "step_key": null,
            "job_id": self.job_id,
            "agent_id": "01945ecf-8bcf-40a6-9d70-a765db9a0928",
            "build_source": "ui",
            "runner_environment": "self-hosted",
        })
    }
}

impl Default for BuildkiteJob {
    fn default() -> Self {
        Self::new()
    }
}

/// A random identifier (128 bits, 32 hex characters), for `jti` values, issuer and rule ids.
/// Fails only if the OS random number generator is unavailable (then no key could be made either).
pub fn random_id() -> Result<String, DevError> {
    meshsign_evidence::files::random_id().map_err(|e| DevError::Crypto(e.to_string()))
}
