//! Typed clients of one site's services: the admin port ([`admin`]) and the public
//! Verification service ([`verification`]: verification material, receipts, distrust lists,
//! and the conversion of a site's responses into evidence bundles).

pub mod admin;
pub mod verification;
