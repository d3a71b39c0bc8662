//! The jti replay store: a token is used once. Entries are kept until the token's `exp` plus
//! the leeway, then pruned by housekeeping — by the earlier of the wall clock and the site's
//! monotonic time ([`crate::clock::WallGuard`]), so a wall clock stepped ahead (a wrong NTP
//! answer) does not forget tokens that become usable again once it steps back.
//!
//! Owns: the `Jti` tree and its key scheme. Must not touch: token verification (`enroll`).

use aws_lc_rs::digest::{SHA256, digest};

use super::SiteState;
use crate::store::{StoreError, Tree};

/// Replay-store key: a hash of the issuer (bounded length) and the jti.
fn key(iss: &str, jti: &str) -> Vec<u8> {
    let mut k = hex::encode(&digest(&SHA256, iss.as_bytes()).as_ref()[..8]).into_bytes();
    k.push(b'/');
    k.extend_from_slice(jti.as_bytes());
    k
}

impl SiteState {
    /// Whether `(iss, jti)` was used before (read only: the claim happens at issuance).
    pub fn jti_seen(&self, iss: &str, jti: &str) -> Result<bool, StoreError> {
        Ok(self.store.kv().get(Tree::Jti, &key(iss, jti))?.is_some())
    }

    /// Claims `(iss, jti)` atomically until `until` (unix seconds); false if it was claimed
    /// already (two concurrent uses of one token yield one certificate).
    pub fn claim_jti(&self, iss: &str, jti: &str, until: i64) -> Result<bool, StoreError> {
        self.store
            .kv()
            .insert_new(Tree::Jti, &key(iss, jti), &until.to_be_bytes())
    }

    /// Removes entries whose token can no longer be used; returns how many.
    pub fn prune_jti(&self) -> Result<usize, StoreError> {
        let now = self.wall_guard.horizon(&*self.clock);
        let mut removed = 0;
        for (k, v) in self.store.kv().scan_prefix(Tree::Jti, b"")? {
            let until = v.as_slice().try_into().map(i64::from_be_bytes).unwrap_or(0);
            if until < now {
                self.store.kv().remove(Tree::Jti, &k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
