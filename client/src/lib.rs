//! meshsign client: a typed API over the site's RPCs and the pieces of the `meshsign` CLI.
//!
//! The client never depends on the server crate; it shares only `meshsign-proto` (the contract) and `meshsign-evidence`
//! (formats and offline verification). A runner key is
//! made in memory ([`runner::RunnerKey`]), sent as a CSR, and neither it nor the certificate ever
//! touches the disk.

pub mod admin;
pub mod agent;
#[cfg(feature = "codesign")]
pub mod codesign;
pub mod config;
pub mod drill;
pub mod error;
pub mod evidence;
pub mod fleet;
pub mod preflight;
pub mod runner;
pub mod token;
pub mod transport;

pub use config::ClientConfig;
pub use error::ClientError;
