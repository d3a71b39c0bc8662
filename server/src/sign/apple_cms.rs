//! Checks on the CMS signed attributes of an Apple code signature before the site signs them.
//!
//! Owns: the DER walk over the signed attributes and the facts it audits. Must not touch:
//! keys, the audit log, the state.
//!
//! An Apple code signature is a CMS SignedData over the CodeDirectory; the signer signs the DER
//! SET OF signed attributes. The site refuses anything that is not what a code-signing step
//! produces: content type must be id-data, signingTime must be within a few minutes of now, the
//! messageDigest (the CodeDirectory's SHA-256) must be there. The CDHashes are audited.

use meshsign_evidence::der::{tlv, tlvs};

/// Skew tolerated on signingTime.
pub const SIGNING_TIME_WINDOW_SECS: i64 = 300;

const OID_CONTENT_TYPE: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x03]; // 1.2.840.113549.1.9.3
const OID_MESSAGE_DIGEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x04]; // 1.2.840.113549.1.9.4
const OID_SIGNING_TIME: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x05]; // 1.2.840.113549.1.9.5
const OID_ID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01]; // 1.2.840.113549.1.7.1
const OID_APPLE_CDHASHES2: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x63, 0x64, 0x09, 0x02]; // 1.2.840.113635.100.9.2

/// What the site learned from signed attributes it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppleCmsFacts {
    /// SHA-256 of the attributes: what gets signed.
    pub digest: [u8; 32],
    /// The messageDigest attribute (hex): the CodeDirectory hash.
    pub code_directory_hash: String,
    /// Hashes from Apple's CDHashes2 attribute (hex), if present.
    pub cdhashes: Vec<String>,
}

/// Why the attributes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{check}: {message}")]
pub struct AppleCmsError {
    /// The failed check (audit reason).
    pub check: crate::model::Reason,
    /// What is wrong.
    pub message: String,
}

fn err(check: crate::model::Reason, message: impl Into<String>) -> AppleCmsError {
    AppleCmsError {
        check,
        message: message.into(),
    }
}

/// Parses and checks DER signed attributes (a SET, tag 0x31) at `now_unix`.
pub fn check(der: &[u8], now_unix: i64) -> Result<AppleCmsFacts, AppleCmsError> {
    let malformed = || {
        err(
            crate::model::Reason::AppleCms,
            "signed attributes are not a DER SET OF Attribute",
        )
    };
    let (tag, content, rest) = tlv(der).ok_or_else(malformed)?;
    if tag != 0x31 || !rest.is_empty() {
        return Err(malformed());
    }
    let (mut content_type, mut message_digest, mut signing_time, mut cdhashes) =
        (None, None, None, Vec::new());
    let mut seen: Vec<&[u8]> = Vec::new();
    for (t, attr) in tlvs(content).ok_or_else(malformed)? {
        if t != 0x30 {
            return Err(malformed());
        }
        let parts = tlvs(attr).ok_or_else(malformed)?;
        let [(0x06, oid), (0x31, values)] = parts.as_slice() else {
            return Err(malformed());
        };
        let values = tlvs(values).ok_or_else(malformed)?;
        // RFC 5652 §5.3: each attribute type at most once; content-type, message-digest and
        // signing-time carry exactly one value. Otherwise the hash audited here may not be the
        // one Apple's verifier reads.
        if seen.contains(oid) {
            return Err(err(
                crate::model::Reason::AppleCms,
                "an attribute type appears twice",
            ));
        }
        seen.push(oid);
        if matches!(
            *oid,
            OID_CONTENT_TYPE | OID_MESSAGE_DIGEST | OID_SIGNING_TIME
        ) && values.len() != 1
        {
            return Err(err(
                crate::model::Reason::AppleCms,
                "content-type, message-digest and signing-time take exactly one value",
            ));
        }
        match *oid {
            OID_CONTENT_TYPE => content_type = values.first().copied(),
            OID_MESSAGE_DIGEST => message_digest = values.first().copied(),
            OID_SIGNING_TIME => signing_time = values.first().copied(),
            OID_APPLE_CDHASHES2 => {
                // Each value: SEQUENCE { hashAlgorithm OID, OCTET STRING digest }.
                for (vt, v) in values {
                    if vt == 0x30
                        && let Some(fields) = tlvs(v)
                        && let Some((0x04, d)) = fields.get(1).copied()
                    {
                        cdhashes.push(hex::encode(d));
                    }
                }
            }
            _ => {}
        }
    }
    match content_type {
        Some((0x06, OID_ID_DATA)) => {}
        Some(_) => {
            return Err(err(
                crate::model::Reason::ContentType,
                "content type must be id-data (1.2.840.113549.1.7.1)",
            ));
        }
        None => {
            return Err(err(
                crate::model::Reason::ContentType,
                "no content-type attribute",
            ));
        }
    }
    let code_directory_hash = match message_digest {
        Some((0x04, d)) if d.len() == 32 => hex::encode(d),
        _ => {
            return Err(err(
                crate::model::Reason::AppleCms,
                "messageDigest must be a 32-byte SHA-256",
            ));
        }
    };
    let t = match signing_time {
        Some((0x17, s)) => parse_time(s, false),
        Some((0x18, s)) => parse_time(s, true),
        _ => None,
    }
    .ok_or_else(|| {
        err(
            crate::model::Reason::SigningTime,
            "no valid signingTime attribute",
        )
    })?;
    if (t - now_unix).abs() > SIGNING_TIME_WINDOW_SECS {
        return Err(err(
            crate::model::Reason::SigningTime,
            format!(
                "signingTime is {}s from now (at most {SIGNING_TIME_WINDOW_SECS}s)",
                t - now_unix
            ),
        ));
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref());
    Ok(AppleCmsFacts {
        digest,
        code_directory_hash,
        cdhashes,
    })
}

/// UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime `YYYYMMDDHHMMSSZ` → unix seconds.
fn parse_time(s: &[u8], generalized: bool) -> Option<i64> {
    let s = std::str::from_utf8(s).ok()?.strip_suffix('Z')?;
    let (year, rest) = if generalized {
        (s.get(..4)?.parse::<i32>().ok()?, s.get(4..)?)
    } else {
        let yy = s.get(..2)?.parse::<i32>().ok()?;
        (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
    };
    if rest.len() != 10 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |i: usize| rest[i..i + 2].parse::<u8>().ok();
    let month = ::time::Month::try_from(n(0)?).ok()?;
    let date = ::time::Date::from_calendar_date(year, month, n(2)?).ok()?;
    let t = ::time::Time::from_hms(n(4)?, n(6)?, n(8)?).ok()?;
    Some(
        ::time::PrimitiveDateTime::new(date, t)
            .assume_utc()
            .unix_timestamp(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        assert_eq!(parse_time(b"700101000000Z", false), Some(0));
        assert_eq!(parse_time(b"20261125120000Z", true), Some(1795608000));
        assert_eq!(parse_time(b"2026112512000Z", true), None);
        assert_eq!(parse_time(b"261325120000Z", false), None);
    }
}
