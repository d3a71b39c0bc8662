//! What each `meshsign` command does, without parsing or printing: the binary turns arguments
//! into the options here and renders what comes back.

pub mod admin;
pub mod agent;
pub mod asc;
pub mod attest;
#[cfg(feature = "codesign")]
pub mod codesign;
#[cfg(feature = "dev")]
pub mod dev;
pub mod device;
pub mod drill;
pub mod fleet;
pub mod material;
pub mod notarize;
pub mod preflight;
pub mod sign;
pub mod status;
pub mod verify;
