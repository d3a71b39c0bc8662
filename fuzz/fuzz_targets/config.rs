//! The site config loader (TOML schema and validation). Relative paths point into a folder that
//! does not exist, so file reads fail instead of touching the machine.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = meshsign_server::config::SiteConfig::from_toml(
            text,
            std::path::Path::new("/nonexistent-meshsign-fuzz"),
        );
    }
});
