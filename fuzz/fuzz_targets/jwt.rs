//! The JWT parser and what the enrollment checks read from it: decode, claims, dates,
//! audiences; and the JWKS parser (pinned files, `SetJwks`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshsign_server::identity::jwt::{Jwks, UnverifiedJwt};

fuzz_target!(|data: &[u8]| {
    let _ = Jwks::parse(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(jwt) = UnverifiedJwt::decode(text) {
        for claim in ["iss", "sub", "jti", "aud", "repository", "ref"] {
            let _ = jwt.str_claim(claim);
        }
        for claim in ["exp", "nbf", "iat"] {
            let _ = jwt.time_claim(claim);
        }
        let _ = jwt.audiences();
    }
});
