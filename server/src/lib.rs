//! meshsign site library; `meshsignd` is a thin binary over it.
//!
//! Layers (DESIGN.md "Layout"): [`config`] → validated [`config::SiteConfig`]; [`jwt`] and
//! [`enroll`] verify OIDC tokens offline and mint runner certificates through [`issuer`];
//! [`authz`] turns a peer certificate into a typed [`authz::Caller`] and runs the per-RPC checks;
//! [`sign`] holds keys under the KEK; [`audit`] records every decision; [`store`] hides sled;
//! [`api`] alone knows tonic; [`tls`] builds the three listeners; [`site`] starts them all.

pub mod api;
pub mod apple_cms;
pub mod audit;
pub mod authz;
pub mod clock;
pub mod config;
pub mod dev;
pub mod enroll;
pub mod issuer;
pub mod journal;
pub mod jwt;
pub mod ops;
pub mod pool;
pub mod sign;
pub mod signing;
pub mod site;
pub mod store;
pub mod tls;
