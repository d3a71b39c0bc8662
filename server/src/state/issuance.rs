//! Issuance: the one way a runner certificate is minted, recorded and handed out — for an
//! enrollment (a new session) and for a renewal (the next certificate of a session) alike.
//!
//! Owns: mint → (move the session on) → record → (supersede the last) → output. Must not
//! touch: the checks before it (`enroll`, `sign::checks`), the audit entry (the caller's).

use meshsign_evidence::identity::{JobClaims, RunnerId};

use super::{SiteState, StateError};
use crate::ca::{CaError, CertRequest};
use crate::model::CertRecord;
use crate::store::StoreError;

/// A certificate handed out: the chain and what the response says of it.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf, then the issuing runner CA (DER).
    pub chain: Vec<Vec<u8>>,
    /// Serial, hex.
    pub serial_hex: String,
    /// not_after, unix seconds.
    pub not_after: i64,
    /// Granted lifetime in seconds.
    pub granted_ttl_seconds: u64,
    /// SPIFFE URI.
    pub spiffe_id: String,
    /// Environment.
    pub environment: String,
    /// Site region.
    pub region: String,
    /// Every runner CA the sign port trusts for this environment (DER).
    pub trusted_runner_cas: Vec<Vec<u8>>,
}

/// Where the new certificate stands in its session.
#[derive(Clone, Copy, Debug)]
pub enum Session<'a> {
    /// The first certificate of a new session (an enrollment).
    New,
    /// The next certificate of the session `current` holds, which started at `start`.
    Renewal {
        /// The certificate being renewed.
        current: &'a CertRecord,
        /// Unix seconds the session started.
        start: i64,
    },
}

/// Why a certificate was not handed out.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The runner CA could not mint it.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Recording it failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The environment's runner CAs could not be read.
    #[error(transparent)]
    State(#[from] StateError),
    /// Another renewal of the same certificate moved the session first (at this replica or
    /// another): the caller holds a copy.
    #[error("certificate {serial} was already renewed")]
    Superseded {
        /// The certificate presented.
        serial: String,
        /// Its session.
        session: String,
    },
}

impl SiteState {
    /// Mints a certificate for `id` with `claims` on `spki` for `ttl` seconds, records it in
    /// its session and returns it. A renewal moves the session on by a conditional write in
    /// the store before anything is recorded (of two renewals of one certificate exactly one
    /// wins; the other gets [`MintError::Superseded`]) and supersedes the renewed certificate.
    pub fn issue(
        &self,
        (id, claims, spki): (RunnerId, JobClaims, Vec<u8>),
        ttl: u64,
        session: Session<'_>,
    ) -> Result<Issued, MintError> {
        let now = self.clock.unix();
        let runner_cas = self.runner_cas(&id.environment)?;
        let ca = &runner_cas.active;
        let issued = ca.issue(&CertRequest {
            id: id.clone(),
            claims: claims.clone(),
            public_key_spki: spki,
            now_unix: now,
            ttl_seconds: ttl,
        })?;
        let (session_id, session_start, generation) = match session {
            Session::New => (issued.serial_hex.clone(), now, 0),
            Session::Renewal { current, start } => {
                let session_id = current.session_id().to_string();
                if !self.advance_session(current, &issued.serial_hex)? {
                    return Err(MintError::Superseded {
                        serial: current.serial.clone(),
                        session: session_id,
                    });
                }
                (session_id, start, current.generation + 1)
            }
        };
        self.record_issued(&CertRecord {
            serial: issued.serial_hex.clone(),
            environment: id.environment.clone(),
            region: id.region.clone(),
            fingerprint: id.fingerprint.clone(),
            claims,
            issuer_id: ca.record.id.clone(),
            not_before: issued.not_before,
            not_after: issued.not_after,
            revoked: None,
            session: session_id,
            session_start,
            generation,
            superseded: false,
        })?;
        if let Session::Renewal { current, .. } = session {
            self.supersede(&current.serial)?;
        }
        Ok(Issued {
            chain: vec![issued.der, ca.record.cert_der.clone()],
            serial_hex: issued.serial_hex,
            not_after: issued.not_after,
            granted_ttl_seconds: ttl,
            spiffe_id: id.to_uri(),
            environment: id.environment.clone(),
            region: id.region.clone(),
            trusted_runner_cas: runner_cas
                .trusted(now)
                .into_iter()
                .map(|r| r.cert_der.clone())
                .collect(),
        })
    }
}
