//! An injected clock, so expiry, replay windows and rotation are tested without sleeping
//! (rustls `TimeProvider`). The same clock feeds rustls' certificate checks on the sign port.
//!
//! Owns: the `Clock` trait, the system and manual clocks, rustls' time provider. Must not
//! touch: anything else; it imports no module of this crate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The source of "now" for every time-dependent decision in the site.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;

    /// Time elapsed on a clock that only moves forward (`CLOCK_MONOTONIC`: wall-clock steps,
    /// forward or back, do not move it), from an arbitrary start.
    fn monotonic(&self) -> Duration {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed()
    }

    /// Seconds since the Unix epoch (0 before the epoch).
    fn unix(&self) -> i64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// Wall-clock time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests, drills): time passing moves both its wall
/// clock and its monotonic clock; a step moves the wall clock alone.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<(SystemTime, Duration)>>);

impl ManualClock {
    /// Starts at the current wall-clock time.
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new((SystemTime::now(), Duration::ZERO))))
    }

    /// Lets time pass.
    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        t.0 += by;
        t.1 += by;
    }

    /// Steps the wall clock by `secs` (either way) without time passing, as a wrong NTP
    /// answer or an operator's `date -s` would.
    pub fn step(&self, secs: i64) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let by = Duration::from_secs(secs.unsigned_abs());
        t.0 = if secs >= 0 { t.0 + by } else { t.0 - by };
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    fn monotonic(&self) -> Duration {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

/// Wall-clock time held against the monotonic clock: from an anchor taken at start, "trusted
/// now" is the anchor's wall time plus the monotonic time since. Whatever must not happen
/// early because the wall clock jumped ahead (forgetting a spent token) waits for the earlier
/// of the two ([`WallGuard::horizon`]); a wall clock that moved away from it by more than a
/// tolerance is reported once per step ([`WallGuard::step`]).
#[derive(Debug)]
pub struct WallGuard {
    anchor_unix: i64,
    anchor_mono: Duration,
    reported_offset: std::sync::atomic::AtomicI64,
}

impl WallGuard {
    /// Anchors at `clock`'s present.
    pub fn new(clock: &dyn Clock) -> Self {
        Self {
            anchor_unix: clock.unix(),
            anchor_mono: clock.monotonic(),
            reported_offset: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// The anchor's wall time plus the monotonic time since (unix seconds).
    pub fn trusted_unix(&self, clock: &dyn Clock) -> i64 {
        let since = clock.monotonic().saturating_sub(self.anchor_mono);
        self.anchor_unix
            .saturating_add(i64::try_from(since.as_secs()).unwrap_or(i64::MAX))
    }

    /// The earlier of the wall clock and the trusted time: a wall clock stepped ahead does not
    /// bring anything forward.
    pub fn horizon(&self, clock: &dyn Clock) -> i64 {
        clock.unix().min(self.trusted_unix(clock))
    }

    /// The wall clock's offset from the trusted time (seconds, + ahead), when it moved by more
    /// than `tolerance` since the last one reported (then it is reported: once per step).
    pub fn step(&self, clock: &dyn Clock, tolerance: i64) -> Option<i64> {
        use std::sync::atomic::Ordering;
        let offset = clock.unix().saturating_sub(self.trusted_unix(clock));
        let last = self.reported_offset.load(Ordering::Relaxed);
        if offset.saturating_sub(last).abs() > tolerance {
            self.reported_offset.store(offset, Ordering::Relaxed);
            return Some(offset);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_step_moves_neither_the_horizon_nor_goes_unreported() {
        let clock = ManualClock::new();
        let guard = WallGuard::new(&clock);
        let start = clock.unix();
        clock.advance(Duration::from_secs(100));
        assert_eq!(guard.horizon(&clock), start + 100);
        assert_eq!(guard.step(&clock, 60), None, "time passing is no step");
        clock.step(86_400);
        assert_eq!(
            guard.horizon(&clock),
            start + 100,
            "a step ahead is not trusted"
        );
        assert_eq!(guard.step(&clock, 60), Some(86_400));
        assert_eq!(guard.step(&clock, 60), None, "reported once");
        clock.step(-86_400);
        assert_eq!(
            guard.step(&clock, 60),
            Some(0),
            "the step back is reported too"
        );
        clock.step(-3_600);
        assert_eq!(
            guard.horizon(&clock),
            start + 100 - 3_600,
            "behind: the wall clock"
        );
    }
}

/// Shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// Adapts a [`Clock`] to rustls' `TimeProvider`, so handshake-time certificate validity uses the
/// same notion of "now" as the per-RPC checks.
#[derive(Debug)]
pub struct RustlsTime(pub SharedClock);

impl rustls::time_provider::TimeProvider for RustlsTime {
    fn current_time(&self) -> Option<rustls_pki_types::UnixTime> {
        Some(rustls_pki_types::UnixTime::since_unix_epoch(
            self.0
                .now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO),
        ))
    }
}
