//! Checkpoints of the audit log's Merkle tree as C2SP signed notes (c2sp.org/tlog-checkpoint,
//! c2sp.org/signed-note):
//!
//! ```text
//! <origin>
//! <tree size>
//! <base64 root hash>
//!
//! — <origin> <base64(key id ‖ signature)>
//! ```
//!
//! The signature is of type `0x02` (ECDSA, as transparency-dev/witness implements it): ECDSA
//! P-256 over SHA-256 of the note text, ASN.1 DER; the key id is the first four bytes of
//! SHA-256 of the key's SubjectPublicKeyInfo (DER). The key is the site's audit key, the key
//! name is the origin.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::merkle::Hash;

/// Longest note accepted (a checkpoint is ~200 bytes; a few cosignatures fit).
pub const MAX_NOTE_BYTES: usize = 16 * 1024;

/// The signed body of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeHead {
    /// The log's name, e.g. `meshsign.dev/sg/audit`.
    pub origin: String,
    /// Number of leaves.
    pub size: u64,
    /// Root hash.
    pub root: Hash,
}

impl TreeHead {
    /// The note text (what is signed): origin, size, base64 root, each ending in a newline.
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            base64::engine::general_purpose::STANDARD.encode(self.root)
        )
    }

    /// The signed note: the text, a blank line, and the signature line `— <origin> <sig>`,
    /// where `sig` is `key id ‖ DER signature` (see [`key_id`]).
    pub fn note(&self, spki_der: &[u8], der_signature: &[u8]) -> String {
        let mut sig = key_id(spki_der).to_vec();
        sig.extend_from_slice(der_signature);
        format!(
            "{}\n\u{2014} {} {}\n",
            self.text(),
            self.origin,
            base64::engine::general_purpose::STANDARD.encode(sig)
        )
    }
}

/// The signed-note key id of an ECDSA key: `SHA-256(SPKI DER)[:4]`.
pub fn key_id(spki_der: &[u8]) -> [u8; 4] {
    let d = Sha256::digest(spki_der);
    [d[0], d[1], d[2], d[3]]
}

/// Why a note was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("checkpoint: {0}")]
pub struct NoteError(pub String);

/// Opens a checkpoint note: checks its form, finds the signature line of `origin` with the
/// key id of `audit_key` (others are ignored, as the spec requires), verifies it, and returns
/// the tree head. `origin = None` accepts the origin the note names (the key decides).
pub fn open(
    note: &str,
    audit_key: &p256::ecdsa::VerifyingKey,
    origin: Option<&str>,
) -> Result<TreeHead, NoteError> {
    use p256::ecdsa::signature::Verifier as _;
    use p256::pkcs8::EncodePublicKey as _;
    let bad = |m: &str| NoteError(m.to_string());
    if note.len() > MAX_NOTE_BYTES {
        return Err(bad("longer than 16 KiB"));
    }
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(bad("contains control characters"));
    }
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| bad("no blank line before the signatures"))?;
    let text = &note[..split + 1];
    let sigs = &note[split + 2..];
    let mut lines = text.lines();
    let name = lines.next().unwrap_or_default().to_string();
    let size: u64 = lines
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("the second line is not a tree size"))?;
    let root: Hash = lines
        .next()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| bad("the third line is not a base64 SHA-256 root hash"))?;
    if name.is_empty() || name.contains(' ') || name.contains('+') {
        return Err(bad("no valid origin on the first line"));
    }
    if let Some(want) = origin
        && want != name
    {
        return Err(NoteError(format!(
            "origin `{}` is not the expected `{want}`",
            crate::audit::excerpt(&name, 64)
        )));
    }
    let spki = audit_key
        .to_public_key_der()
        .map_err(|_| bad("audit key does not encode"))?;
    let want_id = key_id(spki.as_bytes());
    let sig = sigs
        .lines()
        .filter_map(|l| l.strip_prefix("\u{2014} "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(n, _)| *n == name)
        .filter_map(|(_, s)| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .find(|s| s.len() > 4 && s[..4] == want_id)
        .ok_or_else(|| bad("no signature by the audit key"))?;
    let der = p256::ecdsa::DerSignature::try_from(&sig[4..])
        .map_err(|_| bad("the signature is not DER"))?;
    audit_key
        .verify(text.as_bytes(), &der)
        .map_err(|_| bad("the audit key's signature does not verify"))?;
    Ok(TreeHead {
        origin: name,
        size,
        root,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::EncodePublicKey as _;

    type R = Result<(), Box<dyn std::error::Error>>;

    fn signed(head: &TreeHead, key: &SigningKey) -> Result<String, Box<dyn std::error::Error>> {
        let sig: p256::ecdsa::DerSignature = key.sign(head.text().as_bytes());
        let spki = key.verifying_key().to_public_key_der()?;
        Ok(head.note(spki.as_bytes(), sig.as_bytes()))
    }

    #[test]
    fn a_note_opens_with_its_key_and_not_altered() -> R {
        let key = SigningKey::from_slice(&[7u8; 32])?;
        let head = TreeHead {
            origin: "meshsign.dev/sg/audit".into(),
            size: 42,
            root: [9u8; 32],
        };
        let note = signed(&head, &key)?;
        assert!(note.starts_with("meshsign.dev/sg/audit\n42\n"));
        assert!(note.contains("\n\n\u{2014} meshsign.dev/sg/audit "));
        assert_eq!(open(&note, key.verifying_key(), None)?, head);
        assert_eq!(
            open(&note, key.verifying_key(), Some("meshsign.dev/sg/audit"))?,
            head
        );
        assert!(open(&note, key.verifying_key(), Some("other/audit")).is_err());
        // Another size, another key, a stripped signature: refused.
        let altered = note.replacen("\n42\n", "\n43\n", 1);
        assert!(open(&altered, key.verifying_key(), None).is_err());
        let other = SigningKey::from_slice(&[8u8; 32])?;
        assert!(open(&note, other.verifying_key(), None).is_err());
        let stripped = &note[..note.find('\u{2014}').ok_or("no signature line")?];
        assert!(open(stripped, key.verifying_key(), None).is_err());
        Ok(())
    }
}
