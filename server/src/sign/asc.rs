//! App Store Connect API tokens (issue 29): the site mints the short-lived ES256 JWT that
//! `notarytool`, `altool`, fastlane and the App Store Connect REST API take, with an Apple
//! `.p8` key that never leaves it. The runner gets a token for its job, never the key.
//!
//! Apple's format ("Generating Tokens for API Requests"): header `{"alg":"ES256","kid":KID,
//! "typ":"JWT"}`; claims `iss` (the team's issuer id; an individual key has `sub: "user"`
//! instead), `iat`, `exp` (at most 20 minutes after `iat`), `aud: "appstoreconnect-v1"` and an
//! optional `scope` list. The key's identity and allowed scopes come from policy; a runner may
//! only narrow the scopes and shorten the lifetime.
//!
//! Owns: the token's checks and its claims. Must not touch: tonic.

use base64::Engine as _;
use serde_json::json;

use super::{Caller, SignError, checks};
use crate::model::{AscIdentity, Purpose, Reason, bounded};
use crate::state::SiteState;

/// Apple's ceiling on a token's lifetime (`exp − iat`).
pub const MAX_TTL_SECONDS: u64 = 1200;
/// Apple's audience for App Store Connect API tokens.
pub const AUDIENCE: &str = "appstoreconnect-v1";

/// A token request (typed; `api` converts).
#[derive(Clone, Debug)]
pub struct AscTokenInput {
    /// An `asc-api` key in the caller's environment.
    pub alias: String,
    /// Scopes asked for (a subset of the key's; empty for the key's own).
    pub scopes: Vec<String>,
    /// Lifetime asked for (0: the most).
    pub ttl_seconds: u64,
    /// Peer address.
    pub peer: String,
}

/// A minted token.
#[derive(Clone, Debug)]
pub struct AscTokenOutput {
    /// Compact JWS.
    pub token: String,
    /// `exp` (Unix seconds).
    pub expires_at: i64,
    /// The scopes it carries.
    pub scopes: Vec<String>,
    /// `alias@vN`.
    pub key_id: String,
    /// Its audit entry.
    pub audit_id: String,
}

type Checked = (crate::custody::LoadedKey, AscIdentity, Vec<String>, u64);

/// Checks the request, audits the decision (job, scopes, expiry), and mints the token.
pub async fn asc_token(
    site: &SiteState,
    caller: &Caller,
    input: AscTokenInput,
) -> Result<AscTokenOutput, SignError> {
    let now = site.clock.unix();
    let mut rec = caller.audit_record("AscToken", now, &input.peer);
    super::within_rate(site, caller, &rec, &input.alias, now)?;
    let mut budgeted = false;
    let checked = check(site, caller, &input, &mut rec, &mut budgeted);
    if let Ok((_, id, scopes, ttl)) = &checked {
        rec.detail = format!(
            "App Store Connect token kid {} scope {} expires {}",
            id.key_id,
            if scopes.is_empty() {
                "(the key's role)".to_string()
            } else {
                bounded(&scopes.join(", "), 400)
            },
            crate::model::when(now.saturating_add(i64::try_from(*ttl).unwrap_or(0)))
        );
    }
    let (written, _) =
        super::record_decision(site, rec, &checked, budgeted, "asc token refused").await?;
    let (key, id, scopes, ttl) = checked?;
    let exp = now.saturating_add(i64::try_from(ttl).unwrap_or(0));
    let token = match mint(&key, &id, &scopes, now, exp) {
        Ok(t) => t,
        Err(e) => {
            // The allow entry is written; say that no token left.
            let what = ("AscToken", "asc token refused", input.peer.as_str());
            return Err(super::record_unsigned(site, caller, what, &written, e).await);
        }
    };
    Ok(AscTokenOutput {
        token,
        expires_at: exp,
        scopes,
        key_id: key.record.key_id(),
        audit_id: written.audit_id(),
    })
}

fn check(
    site: &SiteState,
    caller: &Caller,
    input: &AscTokenInput,
    rec: &mut crate::audit::AuditRecord,
    budgeted: &mut bool,
) -> Result<Checked, SignError> {
    rec.key_id = bounded(&input.alias, 64);
    let authorized = checks::authorize(site, caller, &input.alias)?;
    let key = authorized.key.clone();
    rec.key_id = key.record.key_id();
    let spec = authorized.spec(&input.alias);
    checks::purpose_is(spec, &input.alias, Purpose::AscApi)?;
    let id = spec.and_then(|s| s.asc.clone()).ok_or_else(|| {
        SignError::input(
            Reason::Purpose,
            format!("key `{}` has no App Store Connect identity", input.alias),
        )
    })?;
    let ttl = match input.ttl_seconds {
        0 => MAX_TTL_SECONDS,
        t if t > MAX_TTL_SECONDS => {
            return Err(SignError::input(
                Reason::AscTtl,
                format!(
                    "{t} s asked; an App Store Connect token lives at most {MAX_TTL_SECONDS} s"
                ),
            ));
        }
        t => t,
    };
    crate::model::check_asc_scopes(&input.scopes)
        .map_err(|m| SignError::input(Reason::AscScope, m))?;
    let scopes = match (id.scopes.is_empty(), input.scopes.is_empty()) {
        (_, true) => id.scopes.clone(),
        (true, false) => input.scopes.clone(),
        (false, false) => {
            if let Some(wider) = input.scopes.iter().find(|s| !id.scopes.contains(s)) {
                return Err(SignError::input(
                    Reason::AscScope,
                    format!(
                        "scope `{}` is not one key `{}` allows ({})",
                        bounded(wider, 80),
                        input.alias,
                        bounded(&id.scopes.join(", "), 300)
                    ),
                ));
            }
            input.scopes.clone()
        }
    };
    rec.items = 1;
    *budgeted = spec.is_some_and(|s| s.budget.is_limited());
    checks::budget(site, &authorized.record, spec, &input.alias, 1)?;
    Ok((key, id, scopes, ttl))
}

/// The compact JWS: Apple's header and claims, signed ES256 (raw `r ‖ s`) by the key.
fn mint(
    key: &crate::custody::LoadedKey,
    id: &AscIdentity,
    scopes: &[String],
    iat: i64,
    exp: i64,
) -> Result<String, SignError> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = json!({ "alg": "ES256", "kid": id.key_id, "typ": "JWT" });
    let mut claims = json!({ "iat": iat, "exp": exp, "aud": AUDIENCE });
    match &id.issuer_id {
        Some(iss) => claims["iss"] = iss.as_str().into(),
        None => claims["sub"] = "user".into(),
    }
    if !scopes.is_empty() {
        claims["scope"] = scopes.into();
    }
    let signing_input = format!(
        "{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    );
    let der = key
        .backend
        .sign_message(signing_input.as_bytes())
        .map_err(SignError::Custody)?;
    let raw = der_to_raw(&der).ok_or(SignError::Custody(crate::custody::CustodyError::Crypto(
        "ES256 signature",
    )))?;
    Ok(format!("{signing_input}.{}", b64.encode(raw)))
}

/// JWS ES256 wants `r ‖ s`, 32 bytes each (RFC 7518 §3.4), not the DER `Ecdsa-Sig-Value`.
fn der_to_raw(der: &[u8]) -> Option<[u8; 64]> {
    use meshsign_evidence::der::{tlv, tlvs};
    let (tag, body, rest) = tlv(der)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let ints = tlvs(body)?;
    let [(0x02, r), (0x02, s)] = ints.as_slice() else {
        return None;
    };
    let mut out = [0u8; 64];
    for (i, v) in [r, s].into_iter().enumerate() {
        let v = v.strip_prefix(&[0u8][..]).unwrap_or(v);
        if v.len() > 32 {
            return None;
        }
        out[i * 32 + 32 - v.len()..(i + 1) * 32].copy_from_slice(v);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn der_signatures_become_fixed_width_r_and_s() {
        // r with a leading 0x00 (high bit set), s short (leading zero bytes dropped by DER).
        let mut der = vec![0x30, 0x00, 0x02, 0x21, 0x00];
        der.extend([0x80; 32]);
        der.extend([0x02, 0x02, 0x01, 0x02]);
        der[1] = u8::try_from(der.len() - 2).unwrap_or(0);
        let raw = super::der_to_raw(&der).unwrap_or([0; 64]);
        assert_eq!(&raw[..32], &[0x80; 32]);
        assert_eq!(&raw[32..62], &[0; 30]);
        assert_eq!(&raw[62..], &[1, 2]);
        assert!(super::der_to_raw(&der[..der.len() - 1]).is_none());
    }
}
