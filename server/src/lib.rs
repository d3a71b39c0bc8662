//! meshsign site library; `meshsignd` is a thin binary over it.
//!
//! The arrows run one way, top down (DESIGN.md "Layout"); a module imports only from the floors
//! below it, and `shared/tools/modcycles.py server/src` finds no cycle:
//!
//! 1. [`api`] — transport: listeners, TLS, tonic services, the one place a `Status` is built,
//!    start-up and lifecycle.
//! 2. [`enroll`], [`sign`], [`ops`] — the use cases, one function per check, named by its audit
//!    reason.
//! 3. [`state`] — the site's shared state over the store (issuance records, jti, revocations,
//!    ops overlays, runner CAs, key ring).
//! 4. [`audit`], [`ca`], [`custody`], [`config`] — the audit chain, runner CAs, keys under the
//!    KEK, the validated configuration.
//! 5. [`model`], [`identity`], [`store`], [`limits`], [`metrics`], [`clock`] — vocabulary and
//!    the refusal contract, typed identities (runner caller, operator, OIDC tokens), the storage
//!    engine, rate and connection counters, Prometheus counters, the clock.
//!
//! Words: an **environment** (`staging`, `production`) is one environment of a site; an **OIDC
//! issuer** signs job tokens; a **runner CA** signs runner certificates. [`dev`] (cargo feature
//! `dev`, on by default) makes a dev site; a production build leaves it out.

pub mod api;
pub mod audit;
pub mod ca;
pub mod clock;
pub mod config;
pub mod custody;
#[cfg(feature = "dev")]
pub mod dev;
pub mod enroll;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod sign;
pub mod state;
pub mod store;
