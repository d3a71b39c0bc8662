//! A minimal DER reader: enough to walk the few structures meshsign inspects (SPKI, the claims
//! extension, CMS signed attributes) without another ASN.1 dependency on the client side.

/// Splits one TLV off `b`: `(tag, content, rest)`. Only definite lengths up to 4 bytes.
pub fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (
            rest[..n]
                .iter()
                .fold(0usize, |a, x| (a << 8) | usize::from(*x)),
            &rest[n..],
        )
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Every TLV in `b`, in order; None if any is malformed.
pub fn tlvs(mut b: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (t, c, rest) = tlv(b)?;
        out.push((t, c));
        b = rest;
    }
    Some(out)
}

/// The subjectPublicKey BIT STRING content of a SubjectPublicKeyInfo, without the unused-bits
/// byte.
pub fn spki_key(spki: &[u8]) -> Option<&[u8]> {
    let (0x30, seq, _) = tlv(spki)? else {
        return None;
    };
    let (0x30, _alg, rest) = tlv(seq)? else {
        return None;
    };
    let (0x03, bits, _) = tlv(rest)? else {
        return None;
    };
    bits.split_first()
        .filter(|(unused, _)| **unused == 0)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_short_and_long_lengths_and_refuses_truncation() {
        assert_eq!(
            tlv(&[0x04, 0x02, 1, 2, 9]),
            Some((0x04, &[1u8, 2][..], &[9u8][..]))
        );
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend(vec![7u8; 0x80]);
        assert_eq!(tlv(&long).map(|(_, c, _)| c.len()), Some(0x80));
        assert_eq!(tlv(&[0x04, 0x05, 1]), None);
        assert_eq!(tlv(&[0x04, 0x80]), None);
        assert_eq!(
            tlvs(&[0x02, 0x01, 5, 0x02, 0x01, 6]).map(|v| v.len()),
            Some(2)
        );
    }
}
