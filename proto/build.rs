//! Compiles the contract with protox (pure Rust), so no system `protoc` is needed.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=meshsign");
    let fds = protox::compile(["meshsign/v1/meshsign.proto"], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("meshsign_descriptor.bin"), fds.encode_to_vec())?;
    // Messages carrying secrets get a hand-written Debug (src/lib.rs) that redacts them.
    tonic_prost_build::configure()
        .skip_debug(["meshsign.v1.EnrollRequest", "meshsign.v1.ImportKeyRequest"])
        // An export's runs of lines: a client reads them as slices of the received frame.
        .bytes(".meshsign.v1.ExportLine.lines")
        .compile_fds(fds)?;
    Ok(())
}
