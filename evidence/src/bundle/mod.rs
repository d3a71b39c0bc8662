//! Bundles: what travels with a signed artifact.
//!
//! - [`native`]: meshsign's `FILE.sig.json` (signature, key, receipt).
//! - [`sigstore`]: a Sigstore bundle v0.3 with the site's audit log as its transparency log.

pub mod native;
pub mod sigstore;
