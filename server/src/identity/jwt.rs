//! JWT decoding and verification against pinned JWKS. The site never fetches keys.
//!
//! Owns: compact-JWS decoding, the accepted algorithms, pinned keys. Must not touch: policy
//! (which issuer, which audience: that is `enroll`), the store, the network.
//!
//! Only RS256 and ES256 are accepted; `none` and HS* never are (an HS* token would let anyone who
//! knows the public key forge tokens). Verifier keys are parsed once, when the JWKS is loaded.

use aws_lc_rs::signature::{self, ParsedPublicKey, RsaPublicKeyComponents};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};

/// A public key from a pinned JWKS, ready to verify: decoded and parsed into an aws-lc key
/// object once, when the JWKS is loaded, not per token.
#[derive(Clone, Debug)]
pub struct VerifyKey {
    alg: JwtAlg,
    /// The key as given (P-256: 0x04 ‖ x ‖ y; RSA: n and e), for comparison.
    raw: (Vec<u8>, Vec<u8>),
    parsed: ParsedPublicKey,
}

/// The JWT algorithms accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JwtAlg {
    Es256,
    Rs256,
}

impl PartialEq for VerifyKey {
    fn eq(&self, other: &Self) -> bool {
        self.alg == other.alg && self.raw == other.raw
    }
}

impl Eq for VerifyKey {}

impl VerifyKey {
    /// A P-256 key from its uncompressed SEC1 point.
    pub fn es256(point: Vec<u8>) -> Result<Self, String> {
        let parsed = ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
            .map_err(|e| format!("not a P-256 public key: {e}"))?;
        Ok(Self {
            alg: JwtAlg::Es256,
            raw: (point, Vec::new()),
            parsed,
        })
    }

    /// An RSA key from its big-endian modulus and exponent.
    pub fn rs256(n: Vec<u8>, e: Vec<u8>) -> Result<Self, String> {
        let parsed = RsaPublicKeyComponents { n: &n, e: &e }
            .to_parsed_public_key(&signature::RSA_PKCS1_2048_8192_SHA256)
            .map_err(|e| format!("not an RSA public key: {e}"))?;
        Ok(Self {
            alg: JwtAlg::Rs256,
            raw: (n, e),
            parsed,
        })
    }

    /// The JWT `alg` this key verifies.
    pub fn alg(&self) -> &'static str {
        match self.alg {
            JwtAlg::Es256 => "ES256",
            JwtAlg::Rs256 => "RS256",
        }
    }

    /// Verifies a JWS signature over `signing_input`.
    pub fn verify(&self, signing_input: &[u8], sig: &[u8]) -> bool {
        self.parsed.verify_sig(signing_input, sig).is_ok()
    }
}

/// One pinned key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jwk {
    /// Key ID.
    pub kid: String,
    /// The key.
    pub key: VerifyKey,
}

/// A pinned JWKS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Jwks {
    /// Keys, in file order.
    pub keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
    // Private members: present in a JWKS means someone is about to pin a private key.
    d: Option<Value>,
    p: Option<Value>,
    q: Option<Value>,
    dp: Option<Value>,
    dq: Option<Value>,
    qi: Option<Value>,
    k: Option<Value>,
    #[serde(rename = "use")]
    use_: Option<String>,
}

fn b64(field: &str, v: &Option<String>) -> Result<Vec<u8>, String> {
    let s = v.as_deref().ok_or_else(|| format!("missing `{field}`"))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("`{field}` is not base64url"))
}

impl Jwks {
    /// Parses a JWKS document. Keys not meant for signatures (`use` other than `sig`) are
    /// skipped; EC keys must be P-256; every signing key needs a `kid`.
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let raw: RawJwks = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Vec::new();
        for (i, k) in raw.keys.iter().enumerate() {
            let private = [
                ("d", &k.d),
                ("p", &k.p),
                ("q", &k.q),
                ("dp", &k.dp),
                ("dq", &k.dq),
                ("qi", &k.qi),
                ("k", &k.k),
            ];
            if let Some((name, _)) = private.iter().find(|(_, v)| v.is_some()) {
                return Err(format!(
                    "keys[{i}]: has the private member `{name}`; pin public keys only"
                ));
            }
            if k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let kid = k
                .kid
                .clone()
                .ok_or_else(|| format!("keys[{i}]: missing `kid`"))?;
            let key = match k.kty.as_str() {
                "EC" => {
                    if k.crv.as_deref() != Some("P-256") {
                        return Err(format!("keys[{i}]: only P-256 EC keys are accepted"));
                    }
                    let (x, y) = (b64("x", &k.x)?, b64("y", &k.y)?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(format!("keys[{i}]: P-256 coordinates must be 32 bytes"));
                    }
                    let mut point = vec![0x04];
                    point.extend(x);
                    point.extend(y);
                    VerifyKey::es256(point).map_err(|e| format!("keys[{i}]: {e}"))?
                }
                "RSA" => {
                    let (n, e) = (b64("n", &k.n)?, b64("e", &k.e)?);
                    if n.len() < 256 {
                        return Err(format!("keys[{i}]: RSA modulus under 2048 bits"));
                    }
                    VerifyKey::rs256(n, e).map_err(|e| format!("keys[{i}]: {e}"))?
                }
                other => return Err(format!("keys[{i}]: unsupported kty `{other}`")),
            };
            if keys.iter().any(|j: &Jwk| j.kid == kid) {
                return Err(format!("keys[{i}]: duplicate kid `{kid}`"));
            }
            keys.push(Jwk { kid, key });
        }
        if keys.is_empty() {
            return Err("no signing keys".into());
        }
        Ok(Self { keys })
    }

    /// The key with this `kid`.
    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// A token split into its parts; nothing in it is trusted yet.
#[derive(Debug)]
pub struct UnverifiedJwt {
    /// Header `alg`.
    pub alg: String,
    /// Header `kid`, if any.
    pub kid: Option<String>,
    /// The claims object.
    pub claims: Map<String, Value>,
    signing_input: String,
    signature: Vec<u8>,
}

impl UnverifiedJwt {
    /// Splits a compact JWS. Fails on anything but three base64url parts with JSON objects.
    pub fn decode(token: &str) -> Result<Self, String> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS (three parts)".into());
        };
        let dec = |p: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p);
        let header: Map<String, Value> = dec(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("header is not base64url JSON")?;
        let claims: Map<String, Value> = dec(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("claims are not base64url JSON")?;
        let signature = dec(s).map_err(|_| "signature is not base64url")?;
        // RFC 7515 §4.1.11: a `crit` header names extensions the recipient must understand;
        // this site implements none, so it must refuse any.
        if header.contains_key("crit") {
            return Err("header `crit` names extensions this site does not implement".into());
        }
        if let Some(typ) = header.get("typ")
            && !typ.as_str().is_some_and(|t| t.eq_ignore_ascii_case("JWT"))
        {
            return Err("header `typ` is not JWT".into());
        }
        Ok(Self {
            alg: header
                .get("alg")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            kid: header
                .get("kid")
                .and_then(Value::as_str)
                .map(str::to_string),
            claims,
            signing_input: format!("{h}.{c}"),
            signature,
        })
    }

    /// Verifies the signature with `key`, which must be of the header's `alg`.
    pub fn verify(&self, key: &VerifyKey) -> bool {
        key.alg() == self.alg && key.verify(self.signing_input.as_bytes(), &self.signature)
    }

    /// A string claim.
    pub fn str_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A numeric date claim (seconds since the epoch), only within 1970..=9999: a date outside
    /// it (negative, 1e300, 2^63) counts as absent, so no check ever computes with it.
    pub fn time_claim(&self, name: &str) -> Option<i64> {
        /// 9999-12-31T23:59:59Z.
        const MAX_DATE: i64 = 253_402_300_799;
        let v = self.claims.get(name)?;
        let t = match v.as_i64() {
            Some(i) => i,
            None => {
                let f = v.as_f64()?;
                if !f.is_finite() || f < 0.0 || f > MAX_DATE as f64 {
                    return None;
                }
                f as i64
            }
        };
        (0..=MAX_DATE).contains(&t).then_some(t)
    }

    /// `aud` as a list (a single string or an array of strings).
    pub fn audiences(&self) -> Vec<&str> {
        match self.claims.get("aud") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}
