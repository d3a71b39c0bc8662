//! Keys in a PKCS#11 token (an HSM; SoftHSM2 in the tests), through `cryptoki`.
//!
//! A key is generated *in* the token: private half `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`,
//! not `CKA_EXTRACTABLE`; the site keeps only a reference (token label, `CKA_ID`) and the public
//! key it read from the token's public object. Signing opens sessions from a bounded pool
//! (`[pkcs11] sessions`); a session the token dropped (reset, removal, logout) is discarded, the
//! pool re-opens and re-logs in on the next use, and while that fails every signature is refused
//! `UNAVAILABLE` (`key_unavailable`) and the health service says NOT_SERVING, until the token is
//! back — no restart. The PIN is read from a file (0600 outside dev), zeroized, never logged.
//!
//! Mechanisms: ECDSA P-256 as `CKM_ECDSA` over the SHA-256 digest (SoftHSM2 has no
//! `CKM_ECDSA_SHA256`; the raw r‖s is DER-encoded here), ECDSA P-384 as `CKM_ECDSA` over the
//! SHA-384 of the message, Ed25519 as `CKM_EDDSA` over the message, RSA PKCS#1 v1.5 as
//! `CKM_RSA_PKCS` over the DigestInfo, RSA-PSS as `CKM_RSA_PKCS_PSS` (SHA-256, MGF1-SHA-256,
//! 32-byte salt). A token without a mechanism refuses the key's creation, naming it.
//!
//! Owns: the token connection and PKCS#11 signing. Must not touch: which key signs what.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};

use super::{CustodyError, SigningBackend};
pub use crate::config::Pkcs11Config;
use crate::model::KeyAlgorithm;

/// Where a key lives in the token (stored in the key's record instead of a wrapped key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pkcs11Ref {
    /// The token's label.
    pub token_label: String,
    /// `CKA_ID` of the key pair, hex.
    pub object_id: String,
}

/// The PKCS#11 library of one module in this process. `C_Initialize` is per process, so every
/// [`Token`] of a module shares one `Library`, and its re-initialisation (after a token went
/// away) is serialised here: every call into the library runs under the read half of `state`,
/// `C_Finalize`/`C_Initialize` under the write half — so no operation is in flight, and no
/// session of the old initialisation is still held, when the library is reset (PKCS#11 v2.40
/// §5.4: C_Finalize must not be called while other threads are inside the library; every
/// session handle is invalid after it). `generation` counts the initialisations: object
/// handles are cached per generation and never used across one.
struct Library {
    module: PathBuf,
    state: RwLock<LibState>,
    /// The session pools of this module's open tokens (drained at each reset).
    pools: Mutex<Vec<std::sync::Weak<PoolCell>>>,
    /// Open tokens of this module (the library is finalised when the last one closes).
    tokens: Mutex<usize>,
}

struct LibState {
    ctx: Pkcs11,
    generation: u64,
}

/// Libraries loaded in this process, by module path.
static LIBRARIES: Mutex<Vec<Arc<Library>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Library {
    /// The module's library, loaded and initialised on first use; counts one more token.
    fn get(module: &Path) -> Result<Arc<Self>, CustodyError> {
        let mut libs = lock(&LIBRARIES);
        if let Some(lib) = libs.iter().find(|l| l.module == module) {
            *lock(&lib.tokens) += 1;
            return Ok(lib.clone());
        }
        let ctx = Pkcs11::new(module).map_err(|e| {
            CustodyError::Token(format!(
                "PKCS#11 module {}: {e} (check [pkcs11] module)",
                module.display()
            ))
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(p11("C_Initialize")(e)),
        }
        let lib = Arc::new(Self {
            module: module.to_path_buf(),
            state: RwLock::new(LibState { ctx, generation: 0 }),
            pools: Mutex::new(Vec::new()),
            tokens: Mutex::new(1),
        });
        libs.push(lib.clone());
        Ok(lib)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, LibState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, LibState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes every session of every token of this module (none is in use: the caller holds
    /// the write half), so none outlives the initialisation it belongs to.
    fn drain_pools(&self) {
        let pools: Vec<Arc<PoolCell>> = {
            let mut pools = lock(&self.pools);
            pools.retain(|w| w.strong_count() > 0);
            pools.iter().filter_map(std::sync::Weak::upgrade).collect()
        };
        for cell in &pools {
            let (idle, buried) = {
                let mut pool = lock(&cell.pool);
                pool.open = 0;
                (
                    std::mem::take(&mut pool.idle),
                    std::mem::take(&mut pool.buried),
                )
            };
            // C_CloseSession on each; the token may already have dropped them (harmless).
            drop(idle);
            drop(buried);
        }
    }

    /// Starts the library afresh (C_Finalize, C_Initialize) so a token that came back is found
    /// again — once for every failure seen in generation `seen`: whoever comes second finds
    /// the generation moved on and returns.
    fn reset(&self, seen: u64, label: &str) {
        let mut st = self.write();
        if st.generation != seen {
            return;
        }
        self.drain_pools();
        let _ = st.ctx.clone().finalize();
        match st
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                tracing::warn!(token = %label, error = %e, "PKCS#11 re-initialisation failed");
            }
        }
        // Every handle of the old initialisation (sessions, objects) is void from here on.
        st.generation += 1;
        drop(st);
        for cell in lock(&self.pools)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
        {
            cell.freed.notify_all();
        }
    }

    /// One token of the module closed; the last one finalises the library: SoftHSM2 (with
    /// OpenSSL 3) can crash in its exit-time destructors when a process ends with the library
    /// still initialised.
    fn release(self: &Arc<Self>) {
        let mut libs = lock(&LIBRARIES);
        let mut n = lock(&self.tokens);
        *n = n.saturating_sub(1);
        if *n > 0 {
            return;
        }
        drop(n);
        libs.retain(|l| !Arc::ptr_eq(l, self));
        drop(libs);
        let mut st = self.write();
        self.drain_pools();
        if let Err(e) = st.ctx.clone().finalize() {
            tracing::debug!(module = %self.module.display(), error = %e, "C_Finalize");
        }
        st.generation += 1;
    }
}

/// A token's sessions: idle ones, how many exist, and those the token dropped (closed only
/// when the library is reset, never while other threads open sessions: a dropped handle's
/// number may already name someone else's new session).
#[derive(Default)]
struct PoolCell {
    pool: Mutex<Pool>,
    freed: Condvar,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Session>,
    buried: Vec<Session>,
    open: usize,
}

/// An open token: the module, the slot, the PIN, and a bounded pool of logged-in sessions.
pub struct Token {
    lib: Arc<Library>,
    label: String,
    module: PathBuf,
    pin: AuthPin,
    max_sessions: usize,
    cell: Arc<PoolCell>,
    available: AtomicBool,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl Drop for Token {
    /// Closes the sessions and, for the last token of its module, finalises the library.
    fn drop(&mut self) {
        {
            let _st = self.lib.read();
            let mut pool = lock(&self.cell.pool);
            let idle = std::mem::take(&mut pool.idle);
            pool.open = pool.open.saturating_sub(idle.len());
            drop(pool);
            drop(idle);
        }
        self.lib.release();
    }
}

fn p11(what: &'static str) -> impl FnOnce(P11Error) -> CustodyError {
    move |e| CustodyError::Token(format!("{what}: {e}"))
}

/// Why an operation on a session failed.
#[derive(Debug)]
pub enum OpError {
    /// The library or token refused.
    P11(P11Error),
    /// The object found is not the key recorded (identity check); never signed with.
    Identity(String),
}

impl From<P11Error> for OpError {
    fn from(e: P11Error) -> Self {
        OpError::P11(e)
    }
}

/// Whether an error means the token or the session went away (retry on a fresh session).
fn lost(e: &P11Error) -> bool {
    matches!(
        e,
        P11Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::SlotIdInvalid
                | RvError::ObjectHandleInvalid
                | RvError::KeyHandleInvalid,
            _
        )
    )
}

/// Whether a session is left in a state no later operation should inherit.
fn session_spoiled(e: &P11Error) -> bool {
    matches!(
        e,
        P11Error::Pkcs11(
            RvError::OperationActive | RvError::OperationNotInitialized | RvError::FunctionFailed,
            _
        )
    )
}

/// What one try on a session came to.
enum Try<T> {
    Done(T),
    Refused(CustodyError),
    /// The session or the token is gone: reset the library (once) and retry.
    Gone(String),
}

impl Token {
    /// Loads the module, finds the token by label and logs in (the PIN is checked now).
    pub fn open(cfg: &Pkcs11Config, dev: bool) -> Result<Arc<Self>, CustodyError> {
        let pin = read_pin(&cfg.pin_file, dev)?;
        let lib = Library::get(&cfg.module)?;
        let cell = Arc::new(PoolCell::default());
        lock(&lib.pools).push(Arc::downgrade(&cell));
        let token = Self {
            lib,
            label: cfg.token_label.clone(),
            module: cfg.module.clone(),
            pin,
            max_sessions: cfg.sessions.clamp(1, 256),
            cell,
            available: AtomicBool::new(true),
        };
        // A session now: a wrong label or PIN refuses the start, naming what to fix (dropping
        // the token then releases its count).
        {
            let st = token.lib.read();
            let s = token.open_session(&st.ctx)?;
            lock(&token.cell.pool).open += 1;
            token.release(s);
        }
        Ok(Arc::new(token))
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether the last use of the token worked (health: NOT_SERVING while false).
    pub fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    fn slot(&self, ctx: &Pkcs11) -> Result<Slot, CustodyError> {
        for slot in ctx.get_slots_with_token().map_err(p11("C_GetSlotList"))? {
            if let Ok(info) = ctx.get_token_info(slot)
                && info.label().trim_end() == self.label
            {
                return Ok(slot);
            }
        }
        Err(CustodyError::Token(format!(
            "no PKCS#11 token labelled `{}` in {} (check [pkcs11] token_label, or that the token \
             is present)",
            self.label,
            self.module.display()
        )))
    }

    fn open_session(&self, ctx: &Pkcs11) -> Result<Session, CustodyError> {
        let slot = self.slot(ctx)?;
        let s = ctx.open_rw_session(slot).map_err(p11("C_OpenSession"))?;
        match s.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(s),
            Err(P11Error::Pkcs11(RvError::PinIncorrect, _)) => Err(CustodyError::Token(format!(
                "token `{}`: the PIN in [pkcs11] pin_file is wrong",
                self.label
            ))),
            Err(e) => Err(p11("C_Login")(e)),
        }
    }

    /// A session from the pool (waiting while `sessions` are in use), or a new one. The
    /// caller holds the library's read half.
    fn acquire(&self, ctx: &Pkcs11) -> Result<Session, CustodyError> {
        let mut pool = lock(&self.cell.pool);
        loop {
            if let Some(s) = pool.idle.pop() {
                return Ok(s);
            }
            if pool.open < self.max_sessions {
                pool.open += 1;
                drop(pool);
                return self.open_session(ctx).inspect_err(|_| self.forget());
            }
            pool = self
                .cell
                .freed
                .wait(pool)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn release(&self, s: Session) {
        lock(&self.cell.pool).idle.push(s);
        self.cell.freed.notify_one();
    }

    /// A session that failed while the token is there: closed, not returned.
    fn forget(&self) {
        let mut pool = lock(&self.cell.pool);
        pool.open = pool.open.saturating_sub(1);
        drop(pool);
        self.cell.freed.notify_one();
    }

    /// A session the token dropped: kept aside until the library is reset.
    fn bury(&self, s: Session) {
        let mut pool = lock(&self.cell.pool);
        pool.open = pool.open.saturating_sub(1);
        pool.buried.push(s);
        drop(pool);
        self.cell.freed.notify_one();
    }

    /// The library's current initialisation (object handles are valid only within one).
    fn try_once<T>(&self, f: &impl Fn(&Session, u64) -> Result<T, OpError>) -> (u64, Try<T>) {
        let st = self.lib.read();
        let generation = st.generation;
        let s = match self.acquire(&st.ctx) {
            Ok(s) => s,
            Err(e) => return (generation, Try::Gone(e.to_string())),
        };
        let outcome = match f(&s, generation) {
            Ok(v) => {
                self.release(s);
                Try::Done(v)
            }
            Err(OpError::P11(e)) if lost(&e) => {
                self.bury(s);
                Try::Gone(format!("token `{}`: {e}", self.label))
            }
            Err(OpError::P11(e)) => {
                if session_spoiled(&e) {
                    drop(s);
                    self.forget();
                } else {
                    self.release(s);
                }
                Try::Refused(CustodyError::Token(e.to_string()))
            }
            Err(OpError::Identity(what)) => {
                self.release(s);
                Try::Refused(CustodyError::TokenUnavailable(what))
            }
        };
        drop(st);
        (generation, outcome)
    }

    /// Runs `f` on a pooled session (with the library's generation); a lost session or token
    /// is retried once on a fresh one after the library is re-initialised, then refused as
    /// unavailable.
    pub fn with_session<T>(
        &self,
        f: impl Fn(&Session, u64) -> Result<T, OpError>,
    ) -> Result<T, CustodyError> {
        let mut why = String::new();
        for _ in 0..2 {
            match self.try_once(&f) {
                (_, Try::Done(v)) => {
                    self.available.store(true, Ordering::Relaxed);
                    return Ok(v);
                }
                (_, Try::Refused(e)) => return Err(e),
                (generation, Try::Gone(e)) => {
                    self.available.store(false, Ordering::Relaxed);
                    tracing::warn!(token = %self.label, error = %e, "PKCS#11 session lost; re-initialising the library");
                    self.lib.reset(generation, &self.label);
                    why = e;
                }
            }
        }
        Err(CustodyError::TokenUnavailable(why))
    }

    /// Checks the token answers (housekeeping, while it is marked unavailable).
    pub fn probe(&self) -> bool {
        self.with_session(|s, _| Ok(s.get_session_info().map(|_| ())?))
            .is_ok()
    }

    /// Generates a non-extractable key pair of `algorithm` in the token under a fresh
    /// `CKA_ID`, labelled `label`; returns its reference and SubjectPublicKeyInfo.
    pub fn generate(
        &self,
        algorithm: KeyAlgorithm,
        label: &str,
    ) -> Result<(Pkcs11Ref, Vec<u8>), CustodyError> {
        let id = meshsign_evidence::files::random_id()
            .map_err(|_| CustodyError::Crypto("random id"))?
            .as_bytes()[..16]
            .to_vec();
        let common = |extra: Vec<Attribute>| {
            let mut v = vec![
                Attribute::Token(true),
                Attribute::Id(id.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            v.extend(extra);
            v
        };
        let private = common(vec![
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ]);
        let (mechanism, public) = match algorithm {
            KeyAlgorithm::EcdsaP256Sha256 | KeyAlgorithm::EcdsaP384Sha384 => (
                Mechanism::EccKeyPairGen,
                common(vec![
                    Attribute::Verify(true),
                    Attribute::EcParams(curve_oid(algorithm).to_vec()),
                ]),
            ),
            KeyAlgorithm::Ed25519 => (
                Mechanism::EccEdwardsKeyPairGen,
                common(vec![
                    Attribute::Verify(true),
                    Attribute::EcParams(ED25519_OID_DER.to_vec()),
                ]),
            ),
            rsa => {
                let bits = rsa
                    .rsa_bits()
                    .ok_or(CustodyError::Crypto("not an RSA algorithm"))?;
                (
                    Mechanism::RsaPkcsKeyPairGen,
                    common(vec![
                        Attribute::Verify(true),
                        Attribute::ModulusBits((bits as u64).into()),
                        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                    ]),
                )
            }
        };
        self.with_session(|s, _| Ok(s.generate_key_pair(&mechanism, &public, &private)?))?;
        let r = Pkcs11Ref {
            token_label: self.label.clone(),
            object_id: hex::encode(&id),
        };
        let spki = self.public_key(&r, algorithm)?;
        Ok((r, spki))
    }

    /// Imports a PKCS#8 private key (P-256 or RSA) into the token with `C_CreateObject`:
    /// `CKA_SENSITIVE`, not extractable, under a fresh `CKA_ID`, with its public half. Nothing
    /// is written to the store; the caller drops (zeroizes) the PKCS#8. `CKA_NEVER_EXTRACTABLE`
    /// is false for an imported key — the token did not make it.
    pub fn import(
        &self,
        algorithm: KeyAlgorithm,
        pkcs8: &[u8],
        spki: &[u8],
        label: &str,
    ) -> Result<Pkcs11Ref, CustodyError> {
        let id = meshsign_evidence::files::random_id()
            .map_err(|_| CustodyError::Crypto("random id"))?
            .as_bytes()[..16]
            .to_vec();
        let key = private_key_of(pkcs8).ok_or(CustodyError::Crypto("not a PKCS#8 key"))?;
        let common = vec![
            Attribute::Token(true),
            Attribute::Id(id.clone()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        let (key_type, private_parts, public_parts) = match algorithm {
            KeyAlgorithm::EcdsaP256Sha256 => {
                // ECPrivateKey ::= SEQUENCE { version, privateKey OCTET STRING, … }
                let fields = meshsign_evidence::der::tlvs(
                    meshsign_evidence::der::tlv(&key)
                        .map(|(_, b, _)| b)
                        .ok_or(CustodyError::Crypto("ECPrivateKey"))?,
                )
                .ok_or(CustodyError::Crypto("ECPrivateKey"))?;
                let d = fields
                    .get(1)
                    .filter(|(tag, _)| *tag == 0x04)
                    .map(|(_, v)| zeroize::Zeroizing::new(v.to_vec()))
                    .ok_or(CustodyError::Crypto("ECPrivateKey"))?;
                let point = meshsign_evidence::der::spki_key(spki)
                    .ok_or(CustodyError::Crypto("public key"))?;
                (
                    KeyType::EC,
                    vec![
                        Attribute::EcParams(P256_OID_DER.to_vec()),
                        Attribute::Value(d.to_vec()),
                    ],
                    vec![
                        Attribute::EcParams(P256_OID_DER.to_vec()),
                        Attribute::EcPoint(der(0x04, point)),
                    ],
                )
            }
            a if a.rsa_bits().is_some() => {
                // RSAPrivateKey ::= SEQUENCE { version, n, e, d, p, q, dp, dq, qinv }
                let fields = meshsign_evidence::der::tlvs(
                    meshsign_evidence::der::tlv(&key)
                        .map(|(_, b, _)| b)
                        .ok_or(CustodyError::Crypto("RSAPrivateKey"))?,
                )
                .ok_or(CustodyError::Crypto("RSAPrivateKey"))?;
                if fields.len() < 9 || fields.iter().any(|(tag, _)| *tag != 0x02) {
                    return Err(CustodyError::Crypto("RSAPrivateKey"));
                }
                let int = |i: usize| -> Vec<u8> {
                    let v = fields[i].1;
                    v.strip_prefix(&[0]).unwrap_or(v).to_vec()
                };
                (
                    KeyType::RSA,
                    vec![
                        Attribute::Modulus(int(1)),
                        Attribute::PublicExponent(int(2)),
                        Attribute::PrivateExponent(int(3)),
                        Attribute::Prime1(int(4)),
                        Attribute::Prime2(int(5)),
                        Attribute::Exponent1(int(6)),
                        Attribute::Exponent2(int(7)),
                        Attribute::Coefficient(int(8)),
                    ],
                    vec![
                        Attribute::Modulus(int(1)),
                        Attribute::PublicExponent(int(2)),
                    ],
                )
            }
            _ => {
                return Err(CustodyError::Crypto(
                    "only P-256 and RSA keys can be imported into the token",
                ));
            }
        };
        let mut private = common.clone();
        private.extend([
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(key_type),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ]);
        private.extend(private_parts);
        let mut public = common;
        public.extend([
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(key_type),
            Attribute::Verify(true),
        ]);
        public.extend(public_parts);
        self.with_session(|s, _| {
            s.create_object(&private)?;
            Ok(s.create_object(&public)?)
        })?;
        let r = Pkcs11Ref {
            token_label: self.label.clone(),
            object_id: hex::encode(&id),
        };
        if self.public_key(&r, algorithm)? != spki {
            return Err(CustodyError::Token(
                "the imported key's public half does not match (token refused a part?)".into(),
            ));
        }
        Ok(r)
    }

    /// The one object of `class` with `CKA_ID` `id` (two with the same id: refused, never
    /// guessed between).
    fn find(s: &Session, class: ObjectClass, id: &[u8]) -> Result<Option<ObjectHandle>, OpError> {
        let found = s.find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])?;
        if found.len() > 1 {
            return Err(OpError::Identity(format!(
                "{} objects of class {class} carry CKA_ID {}; refusing to pick one",
                found.len(),
                hex::encode(id)
            )));
        }
        Ok(found.into_iter().next())
    }

    /// The SubjectPublicKeyInfo of the public object with `CKA_ID` `id`, on session `s`.
    fn read_spki(
        s: &Session,
        id: &[u8],
        algorithm: KeyAlgorithm,
    ) -> Result<Option<Vec<u8>>, OpError> {
        let Some(h) = Self::find(s, ObjectClass::PUBLIC_KEY, id)? else {
            return Ok(None);
        };
        let types = match algorithm.rsa_bits() {
            None => vec![AttributeType::EcPoint],
            Some(_) => vec![AttributeType::Modulus, AttributeType::PublicExponent],
        };
        let attrs = s.get_attributes(h, &types)?;
        let mut point = None;
        let (mut modulus, mut exponent) = (None, None);
        for a in attrs {
            match a {
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Modulus(m) => modulus = Some(m),
                Attribute::PublicExponent(e) => exponent = Some(e),
                _ => {}
            }
        }
        let missing = |what: &str| OpError::Identity(format!("the public object has no {what}"));
        match algorithm.rsa_bits() {
            None => {
                let p = point.ok_or_else(|| missing("CKA_EC_POINT"))?;
                // CKA_EC_POINT is the DER OCTET STRING of the point (or, in some tokens, the bare
                // point).
                let raw = match meshsign_evidence::der::tlv(&p) {
                    Some((0x04, body, rest))
                        if rest.is_empty()
                            && (body.first() == Some(&0x04)
                                || algorithm == KeyAlgorithm::Ed25519) =>
                    {
                        body.to_vec()
                    }
                    _ => p,
                };
                Ok(Some(match algorithm {
                    KeyAlgorithm::Ed25519 => super::ed25519_spki(&raw),
                    _ => ec_spki(curve_oid(algorithm), &raw),
                }))
            }
            _ => {
                let (m, e) = modulus
                    .zip(exponent)
                    .ok_or_else(|| missing("RSA public attributes"))?;
                Ok(Some(rsa_spki(&m, &e)))
            }
        }
    }

    /// The key's SubjectPublicKeyInfo, read from the token's public object.
    pub fn public_key(
        &self,
        r: &Pkcs11Ref,
        algorithm: KeyAlgorithm,
    ) -> Result<Vec<u8>, CustodyError> {
        let id = hex::decode(&r.object_id).map_err(|_| CustodyError::Crypto("object id"))?;
        self.with_session(|s, _| Self::read_spki(s, &id, algorithm))?
            .ok_or_else(|| {
                CustodyError::Token(format!(
                    "token `{}` has no public key with CKA_ID {} (was the key deleted from the \
                     token?)",
                    r.token_label, r.object_id
                ))
            })
    }

    /// Whether the private key is marked sensitive and not extractable (and never was
    /// extractable).
    pub fn private_key_is_locked(&self, r: &Pkcs11Ref) -> Result<bool, CustodyError> {
        let id = hex::decode(&r.object_id).map_err(|_| CustodyError::Crypto("object id"))?;
        self.with_session(|s, _| {
            let Some(h) = Self::find(s, ObjectClass::PRIVATE_KEY, &id)? else {
                return Ok(false);
            };
            let attrs = s.get_attributes(
                h,
                &[
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                    AttributeType::NeverExtractable,
                ],
            )?;
            Ok(attrs.iter().all(|a| match a {
                Attribute::Extractable(x) => !x,
                Attribute::Sensitive(x) | Attribute::NeverExtractable(x) => *x,
                _ => true,
            }) && attrs.len() == 3)
        })
    }
}

/// DER of the prime256v1 OID, as CKA_EC_PARAMS.
const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the secp384r1 OID.
const P384_OID_DER: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// DER of the Ed25519 OID (RFC 8410), as CKA_EC_PARAMS of an Edwards key.
const ED25519_OID_DER: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

fn curve_oid(algorithm: KeyAlgorithm) -> &'static [u8] {
    match algorithm {
        KeyAlgorithm::EcdsaP384Sha384 => &P384_OID_DER,
        _ => &P256_OID_DER,
    }
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        let mut v = vec![0x80 | bytes.len() as u8];
        v.extend(bytes);
        v
    }
}

fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(der_len(body.len()));
    v.extend_from_slice(body);
    v
}

/// A DER INTEGER from big-endian unsigned bytes.
fn der_uint(b: &[u8]) -> Vec<u8> {
    let b: Vec<u8> = b.iter().copied().skip_while(|x| *x == 0).collect();
    let mut body = Vec::with_capacity(b.len() + 1);
    if b.first().is_none_or(|x| x & 0x80 != 0) {
        body.push(0);
    }
    body.extend(b);
    der(0x02, &body)
}

fn ec_spki(curve: &[u8], point: &[u8]) -> Vec<u8> {
    const EC_PUBLIC_KEY: [u8; 9] = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    let alg = der(0x30, &[&EC_PUBLIC_KEY[..], curve].concat());
    let mut bits = vec![0u8];
    bits.extend_from_slice(point);
    der(0x30, &[alg, der(0x03, &bits)].concat())
}

fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: [u8; 11] = [
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    let alg = der(0x30, &[&RSA_ENCRYPTION[..], &[0x05, 0x00][..]].concat());
    let key = der(0x30, &[der_uint(modulus), der_uint(exponent)].concat());
    let mut bits = vec![0u8];
    bits.extend(key);
    der(0x30, &[alg, der(0x03, &bits)].concat())
}

/// The private key inside a PKCS#8 `PrivateKeyInfo` (its OCTET STRING's content), zeroized on
/// drop.
fn private_key_of(pkcs8: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let (tag, body, _) = meshsign_evidence::der::tlv(pkcs8)?;
    if tag != 0x30 {
        return None;
    }
    let fields = meshsign_evidence::der::tlvs(body)?;
    fields
        .get(2)
        .filter(|(tag, _)| *tag == 0x04)
        .map(|(_, v)| zeroize::Zeroizing::new(v.to_vec()))
}

/// ECDSA r‖s (as PKCS#11 returns it) → DER `ECDSA-Sig-Value`.
fn ecdsa_der(raw: &[u8]) -> Result<Vec<u8>, CustodyError> {
    if raw.len() != 64 && raw.len() != 96 {
        return Err(CustodyError::Crypto("unexpected ECDSA signature length"));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Ok(der(0x30, &[der_uint(r), der_uint(s)].concat()))
}

/// The DER DigestInfo prefix of SHA-256 (PKCS#1 v1.5).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

fn read_pin(path: &Path, dev: bool) -> Result<AuthPin, CustodyError> {
    let fail =
        |what: String| CustodyError::Token(format!("[pkcs11] pin_file {}: {what}", path.display()));
    #[cfg(unix)]
    if !dev {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)
            .map_err(|e| fail(e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(fail(format!(
                "readable by group or others (mode {:o}): chmod 600 it",
                mode & 0o777
            )));
        }
    }
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?);
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(fail("empty".into()));
    }
    Ok(AuthPin::from(pin.to_string()))
}

/// A signing key held in a token.
///
/// Its private object's handle is cached for one initialisation of the library (a
/// `generation`) only; in a new one the key is found again by identity — the one private key
/// of its `CKA_ID`, whose public object has the public key the site recorded — before it signs.
/// Every signature is then checked under that recorded public key before it leaves: a token
/// that signed with any other key (a stale handle, a swapped object) is refused
/// `key_unavailable`, never returned.
pub struct Pkcs11Key {
    token: Arc<Token>,
    id: Vec<u8>,
    algorithm: KeyAlgorithm,
    spki: Vec<u8>,
    /// The recorded public key, parsed once: every signature is checked with it.
    check: meshsign_evidence::sig::Verifier,
    handle: Mutex<Option<(u64, ObjectHandle)>>,
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pkcs11Key({}, token {}, id {})",
            self.algorithm.as_str(),
            self.token.label(),
            hex::encode(&self.id)
        )
    }
}

impl Pkcs11Key {
    /// The key `r` of `token`; its public key is read from the token (callers compare it with
    /// the one they recorded: the key's record, the runner CA's certificate).
    pub fn load(
        token: &Arc<Token>,
        r: &Pkcs11Ref,
        algorithm: KeyAlgorithm,
    ) -> Result<Self, CustodyError> {
        if r.token_label != token.label() {
            return Err(CustodyError::Token(format!(
                "the key is in token `{}` but [pkcs11] names `{}`",
                r.token_label,
                token.label()
            )));
        }
        let spki = token.public_key(r, algorithm)?;
        let check = meshsign_evidence::sig::Verifier::new(algorithm.as_str(), &spki)
            .map_err(|_| CustodyError::Crypto("the token's public key does not parse"))?;
        Ok(Self {
            token: token.clone(),
            id: hex::decode(&r.object_id).map_err(|_| CustodyError::Crypto("object id"))?,
            algorithm,
            spki,
            check,
            handle: Mutex::new(None),
        })
    }

    /// What is refused when a signature does not verify under the recorded key.
    fn mismatch(&self) -> CustodyError {
        *lock(&self.handle) = None;
        tracing::error!(
            token = %self.token.label(),
            object_id = %hex::encode(&self.id),
            "the token returned a signature that does not verify under the key's recorded public key; refused"
        );
        CustodyError::TokenUnavailable(format!(
            "token `{}`: the signature of key {} does not verify under its recorded public key \
             (refused; the key is looked up again)",
            self.token.label(),
            hex::encode(&self.id)
        ))
    }
}

impl SigningBackend for Pkcs11Key {
    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, CustodyError> {
        if self.algorithm.messages_only() {
            return Err(CustodyError::Crypto("this key signs messages, not digests"));
        }
        let sig = self.sign_raw(digest)?;
        self.check
            .verify_digest(digest, &sig)
            .map_err(|_| self.mismatch())?;
        Ok(sig)
    }

    fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, CustodyError> {
        let sig = match self.algorithm {
            KeyAlgorithm::Ed25519 => self.sign_with(
                Mechanism::Eddsa(cryptoki::mechanism::eddsa::EddsaParams::new(
                    cryptoki::mechanism::eddsa::EddsaSignatureScheme::Pure,
                )),
                message.to_vec(),
            )?,
            KeyAlgorithm::EcdsaP384Sha384 => {
                let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, message);
                ecdsa_der(&self.sign_with(Mechanism::Ecdsa, d.as_ref().to_vec())?)?
            }
            _ => {
                let mut d = [0u8; 32];
                d.copy_from_slice(
                    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message).as_ref(),
                );
                self.sign_raw(&d)?
            }
        };
        self.check
            .verify_message(message, &sig)
            .map_err(|_| self.mismatch())?;
        Ok(sig)
    }
}

impl Pkcs11Key {
    /// Signs a SHA-256 digest with the key's digest mechanism (unchecked: the callers check).
    fn sign_raw(&self, digest: &[u8; 32]) -> Result<Vec<u8>, CustodyError> {
        let (mechanism, data) = match self.algorithm {
            KeyAlgorithm::EcdsaP256Sha256 => (Mechanism::Ecdsa, digest.to_vec()),
            a if a.is_pss() => (
                Mechanism::RsaPkcsPss(PkcsPssParams {
                    hash_alg: cryptoki::mechanism::MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32u64.into(),
                }),
                digest.to_vec(),
            ),
            _ => (
                Mechanism::RsaPkcs,
                [&SHA256_DIGEST_INFO[..], &digest[..]].concat(),
            ),
        };
        let sig = self.sign_with(mechanism, data)?;
        match self.algorithm {
            KeyAlgorithm::EcdsaP256Sha256 => ecdsa_der(&sig),
            _ => Ok(sig),
        }
    }

    /// The private key's handle in this initialisation of the library: cached, or found again
    /// by identity (one private key with this `CKA_ID`, whose public object holds the recorded
    /// public key).
    fn handle(&self, s: &Session, generation: u64) -> Result<ObjectHandle, OpError> {
        if let Some((g, h)) = *lock(&self.handle)
            && g == generation
        {
            return Ok(h);
        }
        let h = Token::find(s, ObjectClass::PRIVATE_KEY, &self.id)?.ok_or(OpError::P11(
            P11Error::Pkcs11(
                RvError::KeyHandleInvalid,
                cryptoki::context::Function::FindObjects,
            ),
        ))?;
        match Token::read_spki(s, &self.id, self.algorithm)? {
            Some(spki) if spki == self.spki => {}
            _ => {
                return Err(OpError::Identity(format!(
                    "token `{}`: the object with CKA_ID {} no longer holds the key's recorded \
                     public key",
                    self.token.label(),
                    hex::encode(&self.id)
                )));
            }
        }
        *lock(&self.handle) = Some((generation, h));
        Ok(h)
    }

    /// Signs `data` with `mechanism` on a pooled session.
    fn sign_with(&self, mechanism: Mechanism, data: Vec<u8>) -> Result<Vec<u8>, CustodyError> {
        self.token.with_session(|s, generation| {
            let h = self.handle(s, generation)?;
            Ok(s.sign(&mechanism, h, &data)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_pin_file_must_be_private_and_non_empty() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir()?;
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234\n")?;
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644))?;
        let e = read_pin(&pin, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("pin_file") && e.contains("chmod 600"), "{e}");
        assert!(read_pin(&pin, true).is_ok(), "dev mode tolerates it");
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600))?;
        assert!(read_pin(&pin, false).is_ok());
        std::fs::write(&pin, "\n")?;
        let e = read_pin(&pin, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("empty") && !e.contains("1234"), "{e}");
        Ok(())
    }

    #[test]
    fn der_integers_are_minimal_and_positive() {
        assert_eq!(der_uint(&[0, 0, 5]), vec![0x02, 0x01, 0x05]);
        assert_eq!(der_uint(&[0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der_uint(&[0]), vec![0x02, 0x01, 0x00]);
        assert_eq!(der_len(200), vec![0x81, 200]);
        assert_eq!(der_len(0x1234), vec![0x82, 0x12, 0x34]);
    }
}
