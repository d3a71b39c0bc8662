//! Signing keys: create, rotate, disable, import, CSRs for site-held keys, certificate chains.
//!
//! Owns: key lifecycle changes. Must not touch: signing requests (`sign`), wrapping (`custody`).

use x509_parser::prelude::*;

use super::{OpsError, environment_exists};
use crate::config::KeySpec;
use crate::custody::backend_from_pkcs8;
use crate::model::{AccessRule, KeyAlgorithm, NAME_RULE, Purpose, bounded, is_name};
use crate::state::SiteState;

fn reload_alias(site: &SiteState, env: &str, alias: &str) -> Result<(), OpsError> {
    Ok(site.reload_key_alias(env, alias)?)
}

fn parse_purposes(names: &[String]) -> Result<Vec<Purpose>, OpsError> {
    Purpose::parse_list(names).map_err(OpsError::Invalid)
}

fn access_rule(repositories: Vec<String>, refs: Vec<String>) -> Result<AccessRule, OpsError> {
    AccessRule::new(repositories, refs)
        .map_err(|(list, m)| OpsError::Invalid(format!("access {list}: {m}")))
}

fn alias_ok(alias: &str) -> Result<(), OpsError> {
    if is_name(alias) {
        return Ok(());
    }
    Err(OpsError::Invalid(format!(
        "alias `{}`: {NAME_RULE}",
        bounded(alias, 64)
    )))
}

fn add_spec(site: &SiteState, env: &str, spec: KeySpec) -> Result<(), OpsError> {
    let mut cfg = (*site.config()).clone();
    let p = cfg
        .environments
        .iter_mut()
        .find(|p| p.name == env)
        .ok_or_else(|| OpsError::NotFound(format!("environment `{env}`")))?;
    match p.signing_keys.iter_mut().find(|s| s.alias == spec.alias) {
        Some(s) => *s = spec.clone(),
        None => p.signing_keys.push(spec.clone()),
    }
    site.save_key_meta(env, &spec)?;
    site.set_config(cfg);
    Ok(())
}

fn spec_of(site: &SiteState, env: &str, alias: &str) -> Result<KeySpec, OpsError> {
    environment_exists(site, env)?;
    site.config()
        .environment(env)
        .and_then(|p| p.key(alias))
        .cloned()
        .ok_or_else(|| OpsError::NotFound(format!("key `{alias}` in `{env}`")))
}

/// Creates a new key alias (v1).
pub fn create_key_alias(
    site: &SiteState,
    env: &str,
    alias: &str,
    algorithm: &str,
    access: (Vec<String>, Vec<String>),
    purposes: &[String],
    backend: &str,
) -> Result<(KeySpec, String), OpsError> {
    environment_exists(site, env)?;
    alias_ok(alias)?;
    let backend = crate::custody::Backend::parse(backend).ok_or_else(|| {
        OpsError::Invalid(format!(
            "unknown backend `{}` (software or pkcs11)",
            crate::model::bounded(backend, 32)
        ))
    })?;
    if spec_of(site, env, alias).is_ok() {
        return Err(OpsError::Precondition(format!(
            "key `{alias}` exists; rotate it instead"
        )));
    }
    let algorithm = KeyAlgorithm::parse(algorithm)
        .ok_or_else(|| OpsError::Invalid(format!("unsupported algorithm `{algorithm}`")))?;
    if parse_purposes(purposes)?.contains(&Purpose::AscApi) {
        return Err(OpsError::Invalid(
            "an asc-api key is made by Apple: import its AuthKey_KID.p8 with `meshsign admin \
             key import --purpose asc-api --asc-key-id KID …`"
                .into(),
        ));
    }
    let spec = KeySpec {
        alias: alias.to_string(),
        algorithm,
        access: access_rule(access.0, access.1)?,
        disabled: false,
        purposes: crate::model::purposes_for(algorithm, parse_purposes(purposes)?)
            .map_err(OpsError::Invalid)?,
        budget: environment_budget(site, env),
        allowed_digests: None,
        backend,
        asc: None,
    };
    site.create_key_version((env, alias, 1), (algorithm, backend))?;
    add_spec(site, env, spec.clone())?;
    reload_alias(site, env, alias)?;
    Ok((spec, format!("created key {alias}@v1")))
}

/// The next version number of `alias`, from the store (another replica may have made a version
/// this one has not loaded yet). Two replicas may still pick the same number at the same
/// moment: the record is stored by a conditional insert, so one of them is refused.
fn next_version(site: &SiteState, env: &str, alias: &str) -> Result<u32, OpsError> {
    let records = site.key_records(Some((env, alias)))?;
    Ok(records.iter().map(|r| r.version).max().map_or(1, |v| v + 1))
}

/// Refuses a key the site already holds under any alias or version, in any environment: one key,
/// one purpose — importing the same key twice (say, once as an `attestation` key, once as a
/// digest key) would let it sign what the attestation-only rule keeps from it.
fn held_elsewhere(site: &SiteState, spki: &[u8]) -> Result<(), OpsError> {
    let records = site.key_records(None)?;
    match records.iter().find(|r| r.public_key_der == spki) {
        Some(r) => Err(OpsError::Precondition(format!(
            "this key is already held by the site as {}/{}@v{}: one key serves one alias \
             (and so one purpose); import a new key",
            r.partition, r.alias, r.version
        ))),
        None => Ok(()),
    }
}

/// Adds `alias@vN+1`, which signs from then on; older versions stay verifiable.
pub fn rotate_key(site: &SiteState, env: &str, alias: &str) -> Result<(KeySpec, String), OpsError> {
    let spec = spec_of(site, env, alias)?;
    let v = next_version(site, env, alias)?;
    site.create_key_version((env, alias, v), (spec.algorithm, spec.backend))?;
    reload_alias(site, env, alias)?;
    Ok((spec, format!("rotated {alias} to v{v}")))
}

/// Disables an alias: it no longer signs; its versions stay in the verification material.
pub fn disable_key(
    site: &SiteState,
    env: &str,
    alias: &str,
) -> Result<(KeySpec, String), OpsError> {
    let mut spec = spec_of(site, env, alias)?;
    spec.disabled = true;
    add_spec(site, env, spec.clone())?;
    Ok((spec, format!("disabled key {alias}")))
}

/// Imports a PKCS#8 PEM key (P-256 or RSA) as a new version of `alias` (or its v1), with an
/// optional certificate chain. One-way: nothing returns it.
#[allow(clippy::too_many_arguments)]
pub fn import_key(
    site: &SiteState,
    env: &str,
    alias: &str,
    (pem, chain_pem): (&[u8], &[u8]),
    access: (Vec<String>, Vec<String>),
    purposes: &[String],
    into: &str,
    asc: &AscInput,
) -> Result<(KeySpec, String), OpsError> {
    use rustls_pki_types::PrivatePkcs8KeyDer;
    let into = crate::custody::Backend::parse(into).ok_or_else(|| {
        OpsError::Invalid(format!(
            "unknown backend `{}` (software or pkcs11)",
            bounded(into, 32)
        ))
    })?;
    use rustls_pki_types::pem::PemObject as _;
    environment_exists(site, env)?;
    alias_ok(alias)?;
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
        .map_err(|_| OpsError::Invalid("not a PKCS#8 PEM private key".into()))?;
    let pkcs8 = der.secret_pkcs8_der();
    // The alias's algorithm decides; a new alias takes P-256, or RSA PKCS#1 v1.5 of the key's size.
    let existing = spec_of(site, env, alias).ok();
    let backend = match &existing {
        Some(s) => backend_from_pkcs8(s.algorithm, pkcs8).map_err(|_| {
            OpsError::Invalid(format!("the key is not a {} key", s.algorithm.as_str()))
        })?,
        None => {
            let guesses = [
                KeyAlgorithm::EcdsaP256Sha256,
                KeyAlgorithm::Rsa2048Pkcs1Sha256,
                KeyAlgorithm::Rsa3072Pkcs1Sha256,
                KeyAlgorithm::Rsa4096Pkcs1Sha256,
            ];
            guesses
                .into_iter()
                .find_map(|a| backend_from_pkcs8(a, pkcs8).ok())
                .ok_or_else(|| {
                    OpsError::Invalid(
                        "only P-256 and RSA 2048/3072/4096 keys can be imported".into(),
                    )
                })?
        }
    };
    held_elsewhere(site, backend.public_key_der())?;
    let spec = match existing {
        Some(s) => s,
        None => {
            let purposes =
                crate::model::purposes_for(backend.algorithm(), parse_purposes(purposes)?)
                    .map_err(OpsError::Invalid)?;
            let asc = asc.identity(purposes.contains(&Purpose::AscApi))?;
            KeySpec {
                alias: alias.to_string(),
                algorithm: backend.algorithm(),
                access: access_rule(access.0, access.1)?,
                disabled: false,
                purposes,
                budget: environment_budget(site, env),
                allowed_digests: None,
                backend: into,
                asc,
            }
        }
    };
    let v = next_version(site, env, alias)?;
    // Into the token when asked, or when the alias keeps its keys there.
    if into == crate::custody::Backend::Pkcs11 || spec.backend == crate::custody::Backend::Pkcs11 {
        let token = site.custodian.token.as_ref().ok_or_else(|| {
            OpsError::Precondition("import into pkcs11: the site config has no [pkcs11]".into())
        })?;
        let r = token.import(
            backend.algorithm(),
            pkcs8,
            backend.public_key_der(),
            &crate::custody::token_label(env, alias, v),
        )?;
        site.store_token_key(
            (env, alias, v),
            backend.algorithm(),
            r,
            backend.public_key_der().to_vec(),
        )?;
    } else {
        site.store_imported_key((env, alias, v), &*backend, pkcs8)?;
    }
    add_spec(site, env, spec.clone())?;
    reload_alias(site, env, alias)?;
    if !chain_pem.is_empty() {
        set_key_certificate(site, env, alias, chain_pem)?;
    }
    Ok((
        spec,
        format!(
            "imported {alias}@v{v}{}",
            if chain_pem.is_empty() {
                ""
            } else {
                " with its certificate chain"
            }
        ),
    ))
}

/// The App Store Connect identity an import names (`--asc-key-id`, `--asc-issuer-id` or
/// `--asc-individual`, `--asc-scope`).
#[derive(Clone, Debug, Default)]
pub struct AscInput {
    /// Apple's key id (empty: none given).
    pub key_id: String,
    /// The team's issuer id.
    pub issuer_id: String,
    /// An individual key (`sub: "user"`).
    pub individual: bool,
    /// The scopes its tokens may carry (empty: unrestricted).
    pub scopes: Vec<String>,
}

impl AscInput {
    /// The identity of a new `asc-api` alias (`is_asc`), which needs one; any other key may
    /// not name one.
    fn identity(&self, is_asc: bool) -> Result<Option<crate::model::AscIdentity>, OpsError> {
        match (self.key_id.is_empty(), is_asc) {
            (true, false) => Ok(None),
            (true, true) => Err(OpsError::Invalid(
                "an asc-api key needs --asc-key-id and --asc-issuer-id (or --asc-individual)"
                    .into(),
            )),
            (false, false) => Err(OpsError::Invalid(
                "--asc-key-id is for a key imported with --purpose asc-api".into(),
            )),
            (false, true) => crate::model::AscIdentity::new(
                &self.key_id,
                Some(self.issuer_id.as_str()),
                self.individual,
                self.scopes.clone(),
            )
            .map(Some)
            .map_err(OpsError::Invalid),
        }
    }
}

/// Every key spec of a environment.
pub fn list_keys(site: &SiteState, env: &str) -> Result<Vec<KeySpec>, OpsError> {
    environment_exists(site, env)?;
    Ok(site
        .config()
        .environment(env)
        .map(|p| p.signing_keys.clone())
        .unwrap_or_default())
}

// === signing identities (certificates on site-held keys) ===

/// Lets rcgen sign (a CSR) with a site-held key through [`crate::custody::SigningBackend`].
struct BackendSigner<'a> {
    backend: &'a dyn crate::custody::SigningBackend,
    key_bits: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for BackendSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.key_bits
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl rcgen::SigningKey for BackendSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let d: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg)
            .as_ref()
            .try_into()
            .map_err(|_| rcgen::Error::RemoteKeyError)?;
        self.backend
            .sign_digest(&d)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// Subject of a key CSR.
#[derive(Clone, Debug, Default)]
pub struct CsrSubject {
    /// CN.
    pub common_name: String,
    /// emailAddress (Apple asks for it).
    pub email: String,
    /// O.
    pub organization: String,
    /// C.
    pub country: String,
}

/// A PKCS#10 CSR (PEM) signed by the active version of a site-held key.
pub fn key_csr(
    site: &SiteState,
    env: &str,
    alias: &str,
    subject: &CsrSubject,
) -> Result<((String, String), String), OpsError> {
    use rcgen::{DnType, DnValue};
    spec_of(site, env, alias)?;
    let key = site
        .keys()
        .active(env, alias)
        .cloned()
        .ok_or_else(|| OpsError::NotFound(format!("key `{alias}` in `{env}`")))?;
    let alg = match key.backend.algorithm() {
        KeyAlgorithm::EcdsaP256Sha256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        a if a.is_pss() => {
            return Err(OpsError::Invalid(
                "CSRs are made for ECDSA and RSA PKCS#1 v1.5 keys".into(),
            ));
        }
        _ => &rcgen::PKCS_RSA_SHA256,
    };
    if subject.common_name.is_empty() {
        return Err(OpsError::Invalid("--common-name is required".into()));
    }
    let key_bits = meshsign_evidence::der::spki_key(&key.record.public_key_der)
        .ok_or_else(|| OpsError::Invalid("stored public key is not an SPKI".into()))?
        .to_vec();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(DnType::CommonName, subject.common_name.clone());
    if !subject.organization.is_empty() {
        dn.push(DnType::OrganizationName, subject.organization.clone());
    }
    if !subject.country.is_empty() {
        dn.push(DnType::CountryName, subject.country.clone());
    }
    if !subject.email.is_empty() {
        let ia5 = subject
            .email
            .clone()
            .try_into()
            .map_err(|_| OpsError::Invalid("email must be ASCII".into()))?;
        dn.push(
            DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
            DnValue::Ia5String(ia5),
        );
    }
    params.distinguished_name = dn;
    let signer = BackendSigner {
        backend: &*key.backend,
        key_bits,
        alg,
    };
    let csr = params
        .serialize_request(&signer)
        .map_err(|e| OpsError::Invalid(format!("csr: {e}")))?;
    let pem = meshsign_evidence::pem_encode("CERTIFICATE REQUEST", csr.der());
    let key_id = key.record.key_id();
    Ok((
        (key_id.clone(), pem),
        format!("CSR for {key_id} (CN={})", subject.common_name),
    ))
}

/// Attaches a certificate chain to the active version of a key; the leaf must carry its key.
pub fn set_key_certificate(
    site: &SiteState,
    env: &str,
    alias: &str,
    chain_pem: &[u8],
) -> Result<(KeySpec, String), OpsError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let spec = spec_of(site, env, alias)?;
    let key = site
        .keys()
        .active(env, alias)
        .cloned()
        .ok_or_else(|| OpsError::NotFound(format!("key `{alias}` in `{env}`")))?;
    let chain: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(chain_pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| OpsError::Invalid(format!("chain: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| OpsError::Invalid("chain: no certificate".into()))?;
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|_| OpsError::Invalid("chain: leaf does not parse".into()))?;
    if cert.public_key().raw != key.record.public_key_der.as_slice() {
        return Err(OpsError::Invalid(format!(
            "chain: the leaf certificate is not for {}",
            key.record.key_id()
        )));
    }
    for (i, c) in chain.iter().enumerate().skip(1) {
        X509Certificate::from_der(c)
            .map_err(|_| OpsError::Invalid(format!("chain: certificate {i} does not parse")))?;
    }
    let subject = cert.subject().to_string();
    let mut record = (*key.record).clone();
    record.certificate_chain = chain.clone();
    site.save_key_record(&record)?;
    reload_alias(site, env, alias)?;
    let detail = format!("certificate for {} (subject {subject})", record.key_id());
    Ok((spec, detail))
}

/// The budget a key made by ops starts with: its environment's.
fn environment_budget(site: &SiteState, env: &str) -> crate::config::Budget {
    site.config()
        .environment(env)
        .map(|e| e.budget)
        .unwrap_or_default()
}

/// A job's signatures per key, with each key's budget now.
#[allow(clippy::type_complexity)]
pub fn job_usage(
    site: &SiteState,
    env: &str,
    job_id: &str,
) -> Result<
    (
        crate::state::usage::JobUsage,
        std::collections::BTreeMap<String, crate::config::Budget>,
    ),
    OpsError,
> {
    environment_exists(site, env)?;
    if job_id.is_empty() || job_id.len() > 256 {
        return Err(OpsError::Invalid("job id: 1 to 256 bytes".into()));
    }
    let usage = site.job_usage(env, job_id)?;
    let config = site.config();
    let budgets = config
        .environment(env)
        .map(|e| {
            e.signing_keys
                .iter()
                .map(|k| (k.alias.clone(), k.budget))
                .collect()
        })
        .unwrap_or_default();
    Ok((usage, budgets))
}
