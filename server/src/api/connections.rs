//! Open connections per listener, overall and per source address ([`ConnectionLimiter`]): the
//! transport floor's counting (the token buckets of the site's state are `crate::limits`).
//!
//! Owns: the counting. Must not touch: what a refusal looks like (the listener turns a
//! [`ConnectionRefusal`] into a summary audit entry).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// The listener holds its maximum.
    ListenerFull,
    /// This source holds its maximum.
    SourceFull,
}

impl ConnectionRefusal {
    /// The summary audit reason.
    pub fn reason(self) -> crate::model::Reason {
        use crate::model::Reason;
        match self {
            ConnectionRefusal::ListenerFull => Reason::ConnectionLimit,
            ConnectionRefusal::SourceFull => Reason::ConnectionLimitSource,
        }
    }
}

#[derive(Debug, Default)]
struct Open {
    total: u32,
    by_source: HashMap<IpAddr, u32>,
}

/// Open connections of one listener, overall and per source address.
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    max: u32,
    max_per_source: u32,
    open: Arc<Mutex<Open>>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    source: IpAddr,
    open: Arc<Mutex<Open>>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.by_source.remove(&self.source);
            }
        }
    }
}

impl ConnectionLimiter {
    /// A limiter admitting `max` connections, `max_per_source` from one address.
    pub fn new(max: u32, max_per_source: u32) -> Self {
        Self {
            max,
            max_per_source,
            open: Arc::default(),
        }
    }

    /// Admits a connection from `source`, or says why not.
    pub fn admit(&self, source: IpAddr) -> Result<ConnectionPermit, ConnectionRefusal> {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if o.total >= self.max {
            return Err(ConnectionRefusal::ListenerFull);
        }
        let n = o.by_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return Err(ConnectionRefusal::SourceFull);
        }
        *n += 1;
        o.total += 1;
        Ok(ConnectionPermit {
            source,
            open: self.open.clone(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> u32 {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_overall_and_per_source() -> Result<(), ConnectionRefusal> {
        let l = ConnectionLimiter::new(3, 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let p1 = l.admit(a)?;
        let _p2 = l.admit(a)?;
        assert_eq!(l.admit(a).err(), Some(ConnectionRefusal::SourceFull));
        let _p3 = l.admit(b)?;
        assert_eq!(l.admit(b).err(), Some(ConnectionRefusal::ListenerFull));
        drop(p1);
        assert!(l.admit(a).is_ok(), "a closed connection frees its place");
        Ok(())
    }
}
