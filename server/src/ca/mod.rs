//! Runner CAs: one active runner CA per environment that mints runner certificates.
//!
//! Owns: runner CA records and their lifecycle states, minting and self-checking a runner
//! certificate. Must not touch: tokens and policy (that is `enroll`), the audit log, running
//! state. "Issuer" in this crate means the OIDC issuer of a token; a runner certificate's
//! issuer is always called a runner CA.
//!
//! Certificates are built from policy only (DESIGN.md "Runner certificate profile"); nothing the
//! CSR asks for is copied. Every issued certificate is re-parsed and checked before it leaves.
//!
//! The claims extension's OID (`meshsign_evidence::identity::CLAIMS_EXTENSION_OID`) has arcs
//! that fit in 31 bits, so rcgen writes it as it is (the earlier `2.25.<UUID>` OID needed a
//! placeholder swapped in before signing, and Go could not parse the result).

pub mod csr;

use std::sync::Arc;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use meshsign_evidence::identity::{
    CLAIMS_EXTENSION_OID, JobClaims, RunnerId, claims_extension_oid_der,
};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    SigningKey,
};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;
use zeroize::Zeroizing;

use crate::custody::{Custodian, CustodyError, SigningBackend, Wrapped};
use crate::store::{Store, StoreError, Tree, hex_bytes};

/// Issuance failures (all internal: inputs were checked before).
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused the parameters.
    #[error("certificate build: {0}")]
    Build(#[from] rcgen::Error),
    /// The issued certificate failed its own post-issuance check.
    #[error("issued certificate failed self-check: {0}")]
    SelfCheck(String),
    /// Key custody failed.
    #[error(transparent)]
    Custody(#[from] CustodyError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Lifecycle state of a runner CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerCaState {
    /// Trusted by the sign port, not yet issuing.
    Staged,
    /// Issues new certificates; exactly one per environment.
    Active,
    /// Trusted until its last certificate expires; no longer issues.
    Retiring,
    /// No longer trusted (all its certificates have expired).
    Retired,
    /// Distrusted at once.
    Revoked,
}

impl RunnerCaState {
    /// The lowercase name (`staged`, `active`, `retiring`, `retired`, `revoked`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerCaState::Staged => "staged",
            RunnerCaState::Active => "active",
            RunnerCaState::Retiring => "retiring",
            RunnerCaState::Retired => "retired",
            RunnerCaState::Revoked => "revoked",
        }
    }
}

/// A stored runner CA.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunnerCaRecord {
    /// Short random id (hex).
    pub id: String,
    /// Environment (stored under its earlier name, `partition`).
    pub partition: String,
    /// State.
    pub state: RunnerCaState,
    /// CA certificate, DER.
    #[serde(with = "hex_bytes")]
    pub cert_der: Vec<u8>,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// For a retiring issuer: when the last certificate it issued expires.
    #[serde(default)]
    pub retire_after: Option<i64>,
    /// Private key under the KEK (a software CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped: Option<Wrapped>,
    /// Where the key is in the PKCS#11 token (a CA kept there; `[pkcs11] runner_cas = true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<crate::custody::pkcs11::Pkcs11Ref>,
}

impl RunnerCaRecord {
    /// Whether the sign port trusts certificates from this CA at `now`.
    pub fn trusted_at(&self, now: i64) -> bool {
        match self.state {
            RunnerCaState::Staged | RunnerCaState::Active => true,
            RunnerCaState::Retiring => self.retire_after.is_none_or(|t| now < t),
            RunnerCaState::Retired | RunnerCaState::Revoked => false,
        }
    }

    /// Store key.
    pub fn store_key(&self) -> Vec<u8> {
        format!("{}/{}", self.partition, self.id).into_bytes()
    }
}

fn issuer_aad(environment: &str, id: &str) -> String {
    format!("meshsign/issuer/v1\0{environment}\0{id}")
}

/// A runner CA ready to issue.
pub struct RunnerCa {
    /// Stored record.
    pub record: RunnerCaRecord,
    key: CaKey,
}

/// A runner CA's private key: in the site (decrypted from the store), or in the token.
enum CaKey {
    Software(Zeroizing<KeyPair>),
    Token(TokenKey),
}

/// A token-held P-256 key as rcgen's signer (ECDSA over SHA-256 of the to-be-signed bytes).
/// rcgen's error cannot carry the token's, so the last one is kept for [`RunnerCa::issue`] to
/// name (`key_unavailable` when the token is away or its signature did not verify).
struct TokenKey(Arc<dyn SigningBackend>, std::sync::Mutex<Option<String>>);

impl TokenKey {
    fn new(backend: Arc<dyn SigningBackend>) -> Self {
        Self(backend, std::sync::Mutex::new(None))
    }

    /// The token's last refusal, if there was one.
    fn take_error(&self) -> Option<String> {
        self.1.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl PublicKeyData for TokenKey {
    fn der_bytes(&self) -> &[u8] {
        // rcgen wants the subjectPublicKey bytes, not the SPKI.
        meshsign_evidence::der::spki_key(self.0.public_key_der()).unwrap_or_default()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for TokenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign_message(msg).map_err(|e| {
            *self.1.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            rcgen::Error::RemoteKeyError
        })
    }
}

impl CaKey {
    fn signer(&self) -> &dyn SigningKey {
        match self {
            CaKey::Software(k) => &**k,
            CaKey::Token(k) => k,
        }
    }
}

impl std::fmt::Debug for RunnerCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerCa")
            .field("id", &self.record.id)
            .field("environment", &self.record.partition)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// What a runner certificate is made of; all from policy and verified claims.
#[derive(Clone, Debug)]
pub struct CertRequest {
    /// SPIFFE ID.
    pub id: RunnerId,
    /// Job claims for the extension.
    pub claims: JobClaims,
    /// Subject public key (SPKI DER), taken from the verified CSR.
    pub public_key_spki: Vec<u8>,
    /// Unix seconds of issuance.
    pub now_unix: i64,
    /// Granted lifetime.
    pub ttl_seconds: u64,
}

/// An issued runner certificate.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// Leaf DER.
    pub der: Vec<u8>,
    /// Serial, lowercase hex.
    pub serial_hex: String,
    /// not_before, unix seconds.
    pub not_before: i64,
    /// not_after, unix seconds.
    pub not_after: i64,
}

/// The CSR's public key, handed to rcgen.
struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl RunnerCa {
    /// Creates a new runner CA for `environment` in `state`, stores it wrapped under the KEK.
    pub fn create(
        store: &Store,
        custodian: &Custodian,
        trust_domain: &str,
        region: &str,
        environment: &str,
        state: RunnerCaState,
        now_unix: i64,
    ) -> Result<Self, CaError> {
        let id = meshsign_evidence::files::random_id().map_err(|_| CustodyError::Crypto("rng"))?
            [..16]
            .to_string();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, format!("meshsign {trust_domain}"));
        dn.push(
            DnType::CommonName,
            format!("meshsign runner CA {environment} {region} {id}"),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = unix_to_time(now_unix - 3600);
        p.not_after = unix_to_time(now_unix + 2 * 365 * 86400);
        p.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let (key, wrapped, pkcs11) = match custodian
            .token
            .as_ref()
            .filter(|_| custodian.runner_cas_in_token)
        {
            Some(token) => {
                let alg = crate::model::KeyAlgorithm::EcdsaP256Sha256;
                let (r, _) =
                    token.generate(alg, &format!("meshsign runner CA {environment} {id}"))?;
                let backend: Arc<dyn SigningBackend> =
                    Arc::new(crate::custody::pkcs11::Pkcs11Key::load(token, &r, alg)?);
                (CaKey::Token(TokenKey::new(backend)), None, Some(r))
            }
            None => {
                let key = Zeroizing::new(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?);
                let pkcs8 = Zeroizing::new(key.serialize_der());
                let (nonce, ciphertext) =
                    custodian.kek.wrap(&issuer_aad(environment, &id), &pkcs8)?;
                (
                    CaKey::Software(key),
                    Some(Wrapped { nonce, ciphertext }),
                    None,
                )
            }
        };
        let cert = match &key {
            CaKey::Software(k) => p.self_signed(&**k)?,
            CaKey::Token(k) => p.self_signed(k)?,
        };
        let record = RunnerCaRecord {
            id,
            partition: environment.to_string(),
            state,
            cert_der: cert.der().to_vec(),
            created_at: now_unix,
            retire_after: None,
            wrapped,
            pkcs11,
        };
        store.put(Tree::RunnerCas, &record.store_key(), &record)?;
        store.flush()?;
        Ok(Self { record, key })
    }

    /// Loads a stored runner CA: decrypts its key, or finds it in the token.
    pub fn load(record: RunnerCaRecord, custodian: &Custodian) -> Result<Self, CaError> {
        let key = match (&record.wrapped, &record.pkcs11) {
            (Some(w), _) => {
                let pkcs8 = custodian.kek.unwrap(
                    &issuer_aad(&record.partition, &record.id),
                    &w.nonce,
                    &w.ciphertext,
                )?;
                CaKey::Software(Zeroizing::new(KeyPair::try_from(pkcs8.as_slice())?))
            }
            (None, Some(r)) => {
                let token = custodian.token.as_ref().ok_or_else(|| {
                    CustodyError::Token(format!(
                        "runner CA {} is in PKCS#11 token `{}`, and the site config has no [pkcs11]",
                        record.id, r.token_label
                    ))
                })?;
                let alg = crate::model::KeyAlgorithm::EcdsaP256Sha256;
                let key = crate::custody::pkcs11::Pkcs11Key::load(token, r, alg)?;
                // The token's object must hold the key the CA's certificate names.
                let cert_spki = X509Certificate::from_der(&record.cert_der)
                    .map(|(_, c)| c.tbs_certificate.subject_pki.raw.to_vec())
                    .unwrap_or_default();
                if key.public_key_der() != cert_spki.as_slice() {
                    return Err(CustodyError::Token(format!(
                        "runner CA {}: the token's object with CKA_ID {} does not hold the key its \
                         certificate names (was the token's object replaced?)",
                        record.id, r.object_id
                    ))
                    .into());
                }
                CaKey::Token(TokenKey::new(Arc::new(key)))
            }
            (None, None) => {
                return Err(CustodyError::Unwrap {
                    slot: format!("runner CA {}", record.id),
                }
                .into());
            }
        };
        Ok(Self { record, key })
    }

    /// Every stored runner CA of a environment.
    pub fn records(store: &Store, environment: &str) -> Result<Vec<RunnerCaRecord>, StoreError> {
        store.scan(Tree::RunnerCas, format!("{environment}/").as_bytes())
    }

    /// Issues a runner certificate from policy, then re-parses and checks it.
    pub fn issue(&self, req: &CertRequest) -> Result<IssuedCert, CaError> {
        let serial = random_serial()?;
        let not_before = req.now_unix - 60;
        let not_after = req.now_unix + req.ttl_seconds as i64;
        let uri = req.id.to_uri();

        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!(
                "runner {}",
                &req.id.fingerprint[..16.min(req.id.fingerprint.len())]
            ),
        );
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(uri.clone().try_into()?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = unix_to_time(not_before);
        p.not_after = unix_to_time(not_after);
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            &CLAIMS_EXTENSION_OID,
            req.claims.to_extension_value(),
        )];
        let issuer = rcgen::Issuer::from_ca_cert_der(
            &self.record.cert_der.as_slice().into(),
            self.key.signer(),
        )?;
        let cert = p
            .signed_by(&CsrKey(spki_key_bytes(&req.public_key_spki)?), &issuer)
            .map_err(|e| match (&e, &self.key) {
                (rcgen::Error::RemoteKeyError, CaKey::Token(k)) => {
                    CaError::Custody(CustodyError::TokenUnavailable(format!(
                        "runner CA {}: {}",
                        self.record.id,
                        k.take_error()
                            .unwrap_or_else(|| "its key in the token did not sign".into())
                    )))
                }
                _ => e.into(),
            })?;
        let der = cert.der().to_vec();
        self.check_issued(&der, req, &serial, not_before, not_after)?;
        Ok(IssuedCert {
            der,
            serial_hex: hex::encode(serial),
            not_before,
            not_after,
        })
    }

    /// SPIRE-style self-check of what was just signed.
    fn check_issued(
        &self,
        der: &[u8],
        req: &CertRequest,
        serial: &[u8],
        not_before: i64,
        not_after: i64,
    ) -> Result<(), CaError> {
        let bad = |m: &str| CaError::SelfCheck(m.to_string());
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| CaError::SelfCheck(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let (_, ca) = X509Certificate::from_der(&self.record.cert_der)
            .map_err(|e| CaError::SelfCheck(e.to_string()))?;
        let ca_key = UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_ASN1,
            ca.public_key().subject_public_key.data.as_ref(),
        );
        ca_key
            .verify(
                cert.tbs_certificate.as_ref(),
                cert.signature_value.data.as_ref(),
            )
            .map_err(|_| bad("signature does not verify under the CA"))?;
        if cert.raw_serial() != serial {
            return Err(bad("serial"));
        }
        if cert.validity().not_before.timestamp() != not_before
            || cert.validity().not_after.timestamp() != not_after
        {
            return Err(bad("validity"));
        }
        if cert.public_key().raw != req.public_key_spki.as_slice() {
            return Err(bad("subject key differs from the CSR's"));
        }
        if crate::identity::only_uri_san(&cert) != Some(req.id.to_uri().as_str()) {
            return Err(bad("SAN must be exactly the runner's SPIFFE URI"));
        }
        match cert.basic_constraints() {
            Ok(Some(bc)) if !bc.value.ca => {}
            _ => return Err(bad("CA:false")),
        }
        match cert.extended_key_usage() {
            Ok(Some(eku)) if eku.value.client_auth && !eku.value.server_auth && !eku.value.any => {}
            _ => return Err(bad("EKU clientAuth only")),
        }
        let claims_oid = claims_extension_oid_der();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.as_bytes() == &claims_oid[2..])
            .ok_or_else(|| bad("claims extension missing"))?;
        if ext.critical
            || JobClaims::from_extension_value(ext.value).ok().as_ref() != Some(&req.claims)
        {
            return Err(bad("claims extension"));
        }
        Ok(())
    }
}

/// The BIT STRING content of an SPKI (the EC point), which rcgen wants for the subject key.
fn spki_key_bytes(spki: &[u8]) -> Result<Vec<u8>, CaError> {
    let (_, parsed) =
        SubjectPublicKeyInfo::from_der(spki).map_err(|e| CaError::SelfCheck(e.to_string()))?;
    Ok(parsed.subject_public_key.data.to_vec())
}

/// 128 random bits, high bit cleared so the DER INTEGER is positive and 16 bytes long.
fn random_serial() -> Result<[u8; 16], CustodyError> {
    use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
    let mut s = [0u8; 16];
    SystemRandom::new()
        .fill(&mut s)
        .map_err(|_| CustodyError::Crypto("rng"))?;
    s[0] = (s[0] & 0x7f) | 0x40;
    Ok(s)
}

fn unix_to_time(t: i64) -> ::time::OffsetDateTime {
    ::time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(::time::OffsetDateTime::UNIX_EPOCH)
}

/// The runner CAs of one environment: the one that issues, and every record (for trust checks).
#[derive(Debug)]
pub struct RunnerCas {
    /// The active issuer.
    pub active: Arc<RunnerCa>,
    /// Every stored runner CA of the environment, oldest first.
    pub records: Vec<RunnerCaRecord>,
}

impl RunnerCas {
    /// Loads the environment's issuers, creating an active one if there is none.
    pub fn load_or_create(
        store: &Store,
        custodian: &Custodian,
        trust_domain: &str,
        region: &str,
        environment: &str,
        now_unix: i64,
    ) -> Result<Self, CaError> {
        let mut records = RunnerCa::records(store, environment)?;
        records.sort_by_key(|r| r.created_at);
        let active = match records.iter().find(|r| r.state == RunnerCaState::Active) {
            Some(r) => RunnerCa::load(r.clone(), custodian)?,
            None => {
                let ca = RunnerCa::create(
                    store,
                    custodian,
                    trust_domain,
                    region,
                    environment,
                    RunnerCaState::Active,
                    now_unix,
                )?;
                tracing::info!(environment, issuer = %ca.record.id, "created runner CA");
                records.push(ca.record.clone());
                ca
            }
        };
        Ok(Self {
            active: Arc::new(active),
            records,
        })
    }

    /// The CAs trusted at `now`, the active one first.
    pub fn trusted(&self, now: i64) -> Vec<&RunnerCaRecord> {
        let mut v: Vec<&RunnerCaRecord> =
            self.records.iter().filter(|r| r.trusted_at(now)).collect();
        v.sort_by_key(|r| r.id != self.active.record.id);
        v
    }

    /// Whether CA `id` is trusted at `now`.
    pub fn is_trusted(&self, id: &str, now: i64) -> bool {
        self.records.iter().any(|r| r.id == id && r.trusted_at(now))
    }
}
