//! `meshsign-certs-dev`: writes a dev PKI and a dev OIDC issuer into a folder.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use meshsign_certs_dev::{DevPki, JwtAlg, OidcIssuer, files};

#[derive(Parser)]
#[command(
    name = "meshsign-certs-dev",
    version,
    about = "Write a meshsign dev PKI and dev OIDC issuer to a folder"
)]
struct Cli {
    /// Output folder (created if missing).
    #[arg(long, default_value = "pki")]
    out: PathBuf,
    /// Trust domain for the admin certificate's SPIFFE ID.
    #[arg(long, default_value = "meshsign.dev")]
    trust_domain: String,
    /// Issuer URL of the dev OIDC issuer.
    #[arg(long, default_value = "https://oidc.meshsign.dev")]
    issuer: String,
    /// `kid` of the dev OIDC issuer key.
    #[arg(long, default_value = "dev-1")]
    kid: String,
    /// JWT algorithm of the dev issuer.
    #[arg(long, value_enum, default_value_t = Alg::Es256)]
    alg: Alg,
}

#[derive(Clone, Copy, ValueEnum)]
enum Alg {
    Es256,
    Rs256,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let alg = match cli.alg {
        Alg::Es256 => JwtAlg::Es256,
        Alg::Rs256 => JwtAlg::Rs256,
    };
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        std::fs::create_dir_all(&cli.out)?;
        DevPki::generate(&cli.trust_domain)?.write_to(&cli.out)?;
        OidcIssuer::generate(&cli.issuer, &cli.kid, alg)?.write_to(&cli.out)?;
        Ok(())
    };
    match run() {
        Ok(()) => {
            println!(
                "wrote dev PKI and dev OIDC issuer to {}:",
                cli.out.display()
            );
            for f in [
                files::SERVER_CA,
                files::SERVER_CERT,
                files::SERVER_KEY,
                files::ADMIN_CA,
                files::ADMIN_CERT,
                files::ADMIN_KEY,
                files::AUDITOR_CERT,
                files::AUDITOR_KEY,
                files::OIDC_KEY,
                files::OIDC_JWKS,
            ] {
                println!("  {f}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshsign-certs-dev: {e}");
            ExitCode::FAILURE
        }
    }
}
