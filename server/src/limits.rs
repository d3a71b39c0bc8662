//! Token buckets keyed by source address or job ([`RateLimiter`]) that keep one client from
//! exhausting the site; the site's state holds them. (Open connections per listener are the
//! transport's: `api::connections`.)
//!
//! Owns: the counting. Must not touch: what a refusal looks like (the caller turns a `false`
//! into its own refusal), the network, the store. Time comes from the injected clock, so refill
//! is tested without sleeping.
//!
//! Memory is bounded whatever the clients do: a limiter tracks at most [`MAX_TRACKED`] keys;
//! when full it forgets keys whose buckets have refilled (they behave exactly like new keys),
//! and if every tracked key is still draining, new keys share one overflow bucket — a flood
//! of fresh source addresses throttles itself instead of growing the map.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use crate::clock::SharedClock;

/// Most keys one limiter tracks.
pub const MAX_TRACKED: usize = 65_536;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    /// Seconds (clock time, fractional) of the last refill.
    at: f64,
}

/// A token bucket per key: `burst` requests at once, then `per_second`. A rate of 0 admits
/// everything (the limit is off).
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_second: f64,
    burst: f64,
    clock: SharedClock,
    buckets: Mutex<Buckets<K>>,
}

#[derive(Debug)]
struct Buckets<K> {
    map: HashMap<K, Bucket>,
    overflow: Option<Bucket>,
}

fn seconds(clock: &SharedClock) -> f64 {
    clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Bucket {
    fn refill(&mut self, now: f64, per_second: f64, burst: f64) {
        let elapsed = (now - self.at).max(0.0);
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.at = now;
    }

    fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// A limiter refilling `per_second` tokens per key up to `burst`.
    pub fn new(per_second: u32, burst: u32, clock: SharedClock) -> Self {
        Self {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            clock,
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                overflow: None,
            }),
        }
    }

    /// Whether the limit is on.
    pub fn is_on(&self) -> bool {
        self.per_second > 0.0
    }

    /// Takes one token for `key`; `false` when its bucket is empty.
    pub fn admit(&self, key: &K) -> bool {
        if !self.is_on() {
            return true;
        }
        let now = seconds(&self.clock);
        let (rate, burst) = (self.per_second, self.burst);
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = b.map.get_mut(key) {
            bucket.refill(now, rate, burst);
            return bucket.take();
        }
        if b.map.len() >= MAX_TRACKED {
            // Forget the keys that are back to a full bucket: they are no different from new.
            b.map.retain(|_, bucket| {
                bucket.refill(now, rate, burst);
                bucket.tokens < burst
            });
        }
        if b.map.len() >= MAX_TRACKED {
            let bucket = b.overflow.get_or_insert(Bucket {
                tokens: burst,
                at: now,
            });
            bucket.refill(now, rate, burst);
            return bucket.take();
        }
        let mut bucket = Bucket {
            tokens: burst,
            at: now,
        };
        let ok = bucket.take();
        b.map.insert(key.clone(), bucket);
        ok
    }

    /// Keys tracked now (tests: memory stays bounded).
    pub fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let clock = ManualClock::new();
        let l: RateLimiter<u8> = RateLimiter::new(2, 3, Arc::new(clock.clone()));
        assert_eq!((0..5).filter(|_| l.admit(&1)).count(), 3);
        assert!(l.admit(&2), "another key has its own bucket");
        clock.advance(Duration::from_millis(500));
        assert!(l.admit(&1));
        assert!(!l.admit(&1));
        clock.advance(Duration::from_secs(60));
        assert_eq!(
            (0..5).filter(|_| l.admit(&1)).count(),
            3,
            "refill stops at the burst"
        );
    }

    #[test]
    fn rate_zero_is_off() {
        let l: RateLimiter<u8> = RateLimiter::new(0, 1, Arc::new(ManualClock::new()));
        assert!((0..1000).all(|_| l.admit(&1)));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn fresh_keys_cannot_grow_the_map_past_its_bound() {
        let clock = ManualClock::new();
        let l: RateLimiter<u32> = RateLimiter::new(1, 1, Arc::new(clock));
        for k in 0..(MAX_TRACKED as u32 + 10) {
            l.admit(&k);
        }
        assert_eq!(l.tracked(), MAX_TRACKED);
        // Every tracked key is draining: new keys share the overflow bucket (one token).
        assert!(
            !l.admit(&u32::MAX),
            "the overflow bucket was spent by the first newcomer"
        );
    }
}
