//! The `pkcs11` backend: a P-256 key generated in a PKCS#11 token (a YubiKey's PIV applet
//! through its module, a smart card, SoftHSM2 in tests): sensitive, not extractable. The user
//! PIN is read from `MESHSIGN_DEVICE_PIN` each time the key is used, never stored.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};

use super::{B64, Backend, Descriptor, PIN_ENV, point_to_spki, raw_to_der};
use crate::ClientError;

/// DER of the P-256 curve's OID (CKA_EC_PARAMS).
const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Where a PKCS#11 device key is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Location {
    /// The PKCS#11 module (`.so` / `.dylib`).
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// The key's CKA_ID (hex).
    pub id: String,
    /// A file holding the user PIN (mode 0600), for runners without an interactive user;
    /// else the PIN comes from `MESHSIGN_DEVICE_PIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
}

fn p11(what: &'static str) -> impl Fn(P11Error) -> ClientError {
    move |e| ClientError::Crypto(format!("PKCS#11 {what}: {e}"))
}

fn pin(token: &str, pin_file: Option<&Path>) -> Result<String, ClientError> {
    match pin_file {
        Some(p) => Ok(std::fs::read_to_string(p)
            .map_err(ClientError::io(p))?
            .trim_end_matches(['\r', '\n'])
            .to_string()),
        None => std::env::var(PIN_ENV).map_err(|_| {
            ClientError::Usage(format!(
                "the device key is in PKCS#11 token `{token}`: set {PIN_ENV} to its user PIN"
            ))
        }),
    }
}

fn session(
    module: &Path,
    token: &str,
    pin_file: Option<&Path>,
) -> Result<(Pkcs11, Session), ClientError> {
    let ctx = Pkcs11::new(module).map_err(|e| {
        ClientError::Config(format!(
            "{}: cannot load the PKCS#11 module: {e}",
            module.display()
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(p11("C_Initialize")(e)),
    }
    let slot = ctx
        .get_slots_with_token()
        .map_err(p11("C_GetSlotList"))?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == token)
        })
        .ok_or_else(|| {
            ClientError::Config(format!(
                "no PKCS#11 token labelled `{token}` in {} (is it plugged in?)",
                module.display()
            ))
        })?;
    let pin = pin(token, pin_file)?;
    let s = ctx.open_rw_session(slot).map_err(p11("C_OpenSession"))?;
    match s.login(UserType::User, Some(&AuthPin::new(pin.into()))) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok((ctx, s)),
        Err(P11Error::Pkcs11(RvError::PinIncorrect, _)) => Err(ClientError::Usage(format!(
            "token `{token}`: the PIN ({}) is not its user PIN",
            pin_file.map_or(PIN_ENV.to_string(), |p| p.display().to_string())
        ))),
        Err(e) => Err(p11("C_Login")(e)),
    }
}

/// Generates the key pair in the token (private: sensitive, not extractable, sign only).
pub(super) fn init(
    module: &Path,
    token: &str,
    pin_file: Option<&Path>,
    instance: &str,
) -> Result<Descriptor, ClientError> {
    let (_ctx, s) = session(module, token, pin_file)?;
    let id = hex::decode(
        meshsign_evidence::files::random_id().map_err(|e| ClientError::Crypto(e.to_string()))?,
    )
    .map_err(|e| ClientError::Crypto(e.to_string()))?;
    let label = format!("meshsign-device-{instance}").into_bytes();
    let public = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(P256_OID_DER.to_vec()),
        Attribute::Id(id.clone()),
        Attribute::Label(label.clone()),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Id(id.clone()),
        Attribute::Label(label),
    ];
    let (pub_h, _) = s
        .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .map_err(p11("C_GenerateKeyPair"))?;
    let attrs = s
        .get_attributes(pub_h, &[AttributeType::EcPoint])
        .map_err(p11("C_GetAttributeValue"))?;
    let point = attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or_else(|| ClientError::Crypto("the token's public key has no CKA_EC_POINT".into()))?;
    // CKA_EC_POINT is the DER OCTET STRING of the point (some tokens give the bare point).
    let raw = match meshsign_evidence::der::tlv(&point) {
        Some((0x04, inner, rest)) if rest.is_empty() && inner.first() == Some(&0x04) => {
            inner.to_vec()
        }
        _ => point,
    };
    Ok(Descriptor {
        backend: Backend::Pkcs11,
        spki: B64.encode(point_to_spki(&raw)?),
        file: None,
        pkcs11: Some(Pkcs11Location {
            module: module.to_path_buf(),
            token: token.to_string(),
            id: hex::encode(id),
            pin_file: pin_file.map(Path::to_path_buf),
        }),
        tpm: None,
    })
}

/// Signs SHA-256 of `message` with CKM_ECDSA in the token.
pub(super) fn sign(at: &Pkcs11Location, message: &[u8]) -> Result<Vec<u8>, ClientError> {
    let (_ctx, s) = session(&at.module, &at.token, at.pin_file.as_deref())?;
    let id = hex::decode(&at.id)
        .map_err(|_| ClientError::Config(format!("pkcs11 id `{}` is not hex", at.id)))?;
    let key = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id),
        ])
        .map_err(p11("C_FindObjects"))?
        .into_iter()
        .next()
        .ok_or_else(|| {
            ClientError::Config(format!(
                "token `{}` holds no device key with id {} (was it deleted?)",
                at.token, at.id
            ))
        })?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
    let raw = s
        .sign(&Mechanism::Ecdsa, key, digest.as_ref())
        .map_err(p11("C_Sign"))?;
    raw_to_der(&raw)
}
