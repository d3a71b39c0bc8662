//! meshsign client: a typed API over the site's RPCs and the use cases of the `meshsign` CLI.
//!
//! The client never depends on the server crate; it shares only `meshsign-proto` (the contract)
//! and `meshsign-evidence` (formats and offline verification). It is built in layers whose
//! arrows point down only (`.ci/layers` checks it):
//!
//! | layer | holds |
//! | --- | --- |
//! | [`usecase`] | what a command does: sign, attest, codesign, agent, drill, fleet, preflight, verify |
//! | [`site`] | typed clients of one site's services: [`site::admin`], [`site::verification`] |
//! | [`session`] | a job's credentials: runner key, token sources, enrollment, renewal |
//! | [`net`] | TLS, channels, failover between a site's endpoints |
//! | [`config`], [`error`], [`notes`] | the client file, the error every layer returns, notes on stderr |
//!
//! The `meshsign` binary only parses arguments, calls one use case and renders its result. A
//! runner key is made in memory ([`session::RunnerKey`]), sent as a CSR, and neither it nor the
//! certificate ever touches the disk.

pub mod config;
pub mod device;
pub mod error;
pub mod net;
pub mod notes;
pub mod session;
pub mod site;
pub mod usecase;

pub use config::ClientConfig;
pub use error::ClientError;
