//! `meshsign codesign`: Apple code signatures built on the runner by apple-codesign, with the
//! cryptographic signature made by the site. The runner never holds the .p12 or its key.
//!
//! apple-codesign asks its signer to sign the DER signed attributes of the CMS SignedData over
//! the CodeDirectory; [`RemoteSigner`] sends exactly those bytes to the site (purpose
//! `apple-cms`, which the site parses and checks), verifies the returned signature against the
//! identity's certificate before handing it back, and reports no private key material.
//! apple-codesign is synchronous: it runs under `spawn_blocking` and the signer blocks on the
//! runtime handle for each RPC.

use std::path::{Path, PathBuf};

use apple_codesign::{CodeSignatureFlags, SettingsScope, SigningSettings, UnifiedSigner};
use meshsign_proto::v1::{self, signer_client::SignerClient};
use tonic::transport::Channel;
use x509_certificate::{
    CapturedX509Certificate, KeyAlgorithm, Sign, SignatureAlgorithm, X509CertificateError,
};

use crate::ClientError;

/// Signs through the site with a site-held key that carries an Apple identity.
pub struct RemoteSigner {
    handle: tokio::runtime::Handle,
    client: SignerClient<Channel>,
    alias: String,
    algorithm: String,
    leaf: CapturedX509Certificate,
    spki: Vec<u8>,
    /// The first error of a signature (a refusal by the site, say): apple-codesign reports a
    /// signer's failure as its own text, so the caller takes this back to keep its kind (a
    /// refusal exits 3, not 1).
    failed: std::sync::Arc<std::sync::Mutex<Option<ClientError>>>,
}

impl std::fmt::Debug for RemoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSigner")
            .field("alias", &self.alias)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl RemoteSigner {
    fn sign_remote(&self, message: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.sign_checked(message).map_err(|e| {
            // apple-codesign only carries the text on; the error itself is kept for the caller.
            let text = ClientError::Crypto(e.to_string());
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.is_none() {
                *failed = Some(e);
            }
            text
        })
    }

    fn sign_checked(&self, message: &[u8]) -> Result<Vec<u8>, ClientError> {
        let req = v1::SignRequest {
            key_alias: self.alias.clone(),
            input: Some(v1::sign_request::Input::AppleCmsSignedAttributes(
                message.to_vec(),
            )),
            artifact_name: "codesign".into(),
            algorithm: self.algorithm.clone(),
            signed_entry_timestamp: false,
        };
        let mut client = self.client.clone();
        let resp = self
            .handle
            .block_on(client.sign(req))
            .map_err(|s| ClientError::rpc("Sign", s))?
            .into_inner();
        // Never use a signature that does not verify under the identity's certificate.
        let mut digest = [0u8; 32];
        digest.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message).as_ref(),
        );
        meshsign_evidence::verify::verify_signature(
            &self.algorithm,
            &self.spki,
            &digest,
            &resp.signature,
        )
        .map_err(|e| {
            ClientError::Crypto(format!(
                "the site's signature does not verify under the certificate: {e}"
            ))
        })?;
        Ok(resp.signature)
    }
}

impl signature_x509::Signer<x509_certificate::Signature> for RemoteSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<x509_certificate::Signature, signature_x509::Error> {
        self.sign_remote(msg)
            .map(Into::into)
            .map_err(signature_x509::Error::from_source)
    }
}

impl Sign for RemoteSigner {
    #[allow(deprecated)]
    fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, SignatureAlgorithm), X509CertificateError> {
        let sig = self
            .sign_remote(message)
            .map_err(|e| X509CertificateError::Other(e.to_string()))?;
        Ok((sig, self.signature_algorithm()?))
    }

    fn key_algorithm(&self) -> Option<KeyAlgorithm> {
        self.leaf.key_algorithm()
    }

    fn public_key_data(&self) -> bytes::Bytes {
        self.leaf.public_key_data()
    }

    fn signature_algorithm(&self) -> Result<SignatureAlgorithm, X509CertificateError> {
        match self.algorithm.as_str() {
            "ecdsa-p256-sha256" => Ok(SignatureAlgorithm::EcdsaSha256),
            a if a.ends_with("-pkcs1-sha256") => Ok(SignatureAlgorithm::RsaSha256),
            other => Err(X509CertificateError::Other(format!(
                "{other} cannot make Apple code signatures"
            ))),
        }
    }

    fn private_key_data(&self) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        None
    }

    fn rsa_primes(
        &self,
    ) -> Result<
        Option<(zeroize::Zeroizing<Vec<u8>>, zeroize::Zeroizing<Vec<u8>>)>,
        X509CertificateError,
    > {
        Ok(None)
    }
}

impl x509_certificate::KeyInfoSigner for RemoteSigner {}

/// What to sign and how.
#[derive(Clone, Debug)]
pub struct CodesignOptions {
    /// Key alias in the partition.
    pub alias: String,
    /// Mach-O (thin or universal), .app bundle or .dmg.
    pub input: PathBuf,
    /// Output (default: in place).
    pub output: Option<PathBuf>,
    /// Entitlements plist (XML).
    pub entitlements: Option<PathBuf>,
    /// Hardened runtime flag.
    pub runtime: bool,
    /// RFC 3161 time-stamp server (None: no time stamp). The site never connects anywhere.
    pub timestamp_url: Option<String>,
}

/// `meshsign codesign`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct CodesignArgs {
    /// How the job enrolls.
    #[command(flatten)]
    pub job: crate::session::job::JobOptions,
    /// Key alias.
    #[arg(long)]
    pub key: String,
    /// Entitlements plist (XML).
    #[arg(long)]
    pub entitlements: Option<PathBuf>,
    /// Enable the hardened runtime.
    #[arg(long)]
    pub runtime: bool,
    /// RFC 3161 time-stamp server, or `none` (the default: no time stamp).
    #[arg(long)]
    pub timestamp_url: Option<String>,
    /// Mach-O (thin or universal), .app bundle or .dmg.
    pub input: PathBuf,
    /// Output (default: sign in place).
    pub output: Option<PathBuf>,
}

impl CodesignArgs {
    /// The options of [`codesign`].
    pub fn options(&self) -> CodesignOptions {
        CodesignOptions {
            alias: self.key.clone(),
            input: self.input.clone(),
            output: self.output.clone(),
            entitlements: self.entitlements.clone(),
            runtime: self.runtime,
            timestamp_url: self.timestamp_url.clone().filter(|u| u != "none"),
        }
    }
}

/// `meshsign codesign`: checks the input and the key's identity at the site's public
/// Verification service before the job's token is spent, then signs in the job's session.
pub async fn run(
    cfg: &crate::ClientConfig,
    job: &crate::session::job::JobOptions,
    opts: CodesignOptions,
) -> Result<(), ClientError> {
    if !opts.input.exists() {
        return Err(ClientError::Usage(format!(
            "{}: no such file or bundle (nothing was enrolled; the token is not spent)",
            opts.input.display()
        )));
    }
    let mut v = crate::site::verification::client(cfg).await?;
    let identity =
        crate::site::verification::signing_identity(&mut v, &job.environment, &opts.alias).await?;
    if identity.certificate_chain.is_empty() {
        return Err(ClientError::Usage(format!(
            "key `{}` has no certificate, so it makes no Apple signatures: attach one with \
             `meshsign admin key set-certificate` (nothing was enrolled; the token is not spent)",
            opts.alias
        )));
    }
    crate::session::job::with_session(cfg, job, async |session: &mut crate::session::Session| {
        codesign(session.signer.clone(), identity, opts).await
    })
    .await
}

/// Signs `opts.input` with the identity of `opts.alias`, through `client` (an enrolled session).
pub async fn codesign(
    client: SignerClient<Channel>,
    identity: v1::SigningIdentity,
    opts: CodesignOptions,
) -> Result<(), ClientError> {
    let leaf_der = identity.certificate_chain.first().ok_or_else(|| {
        ClientError::Config(format!(
            "key `{}` has no certificate: attach one with `meshsign admin key set-certificate`",
            opts.alias
        ))
    })?;
    let leaf = CapturedX509Certificate::from_der(leaf_der.clone())
        .map_err(|e| ClientError::Crypto(e.to_string()))?;
    let chain = identity.certificate_chain[1..]
        .iter()
        .map(|c| {
            CapturedX509Certificate::from_der(c.clone())
                .map_err(|e| ClientError::Crypto(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let entitlements = match &opts.entitlements {
        Some(p) => Some(std::fs::read_to_string(p).map_err(ClientError::io(p))?),
        None => None,
    };
    let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let signer = RemoteSigner {
        handle: tokio::runtime::Handle::current(),
        client,
        alias: opts.alias.clone(),
        algorithm: identity.algorithm.clone(),
        leaf: leaf.clone(),
        spki: identity.public_key_der.clone(),
        failed: failed.clone(),
    };
    let signed = tokio::task::spawn_blocking(move || -> Result<(), ClientError> {
        let mut settings = SigningSettings::default();
        settings.set_signing_key(&signer, leaf);
        for c in chain {
            settings.chain_certificate(c);
        }
        settings.chain_apple_certificates();
        settings.set_team_id_from_signing_certificate();
        if let Some(xml) = &entitlements {
            settings
                .set_entitlements_xml(SettingsScope::Main, xml)
                .map_err(|e| ClientError::Config(format!("entitlements: {e}")))?;
        }
        if opts.runtime {
            settings.add_code_signature_flags(SettingsScope::Main, CodeSignatureFlags::RUNTIME);
        }
        if let Some(url) = &opts.timestamp_url {
            settings
                .set_time_stamp_url(url.as_str())
                .map_err(|e| ClientError::Config(format!("timestamp url: {e}")))?;
        }
        let output: &Path = opts.output.as_deref().unwrap_or(&opts.input);
        if opts
            .input
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ipa"))
        {
            return sign_ipa(settings, &opts.input, output, entitlements.is_none());
        }
        UnifiedSigner::new(settings)
            .sign_path(&opts.input, output)
            .map_err(|e| ClientError::Crypto(format!("codesign {}: {e}", opts.input.display())))
    })
    .await
    .map_err(|e| ClientError::Crypto(format!("codesign task: {e}")))?;
    // A signature the site refused (or that did not verify) is that error, not apple-codesign's
    // rewording of it.
    match (
        signed,
        failed.lock().unwrap_or_else(|p| p.into_inner()).take(),
    ) {
        (Err(_), Some(cause)) => Err(cause),
        (r, _) => r,
    }
}

/// Entitlements (XML plist) from an `embedded.mobileprovision` (a CMS SignedData over a plist).
pub fn profile_entitlements(profile: &[u8]) -> Result<String, ClientError> {
    let bad = |m: String| ClientError::Usage(format!("embedded.mobileprovision: {m}"));
    let sd = cryptographic_message_syntax::SignedData::parse_ber(profile)
        .map_err(|e| bad(e.to_string()))?;
    let content = sd
        .signed_content()
        .ok_or_else(|| bad("no content".into()))?;
    let value =
        plist::Value::from_reader(std::io::Cursor::new(content)).map_err(|e| bad(e.to_string()))?;
    let ent = value
        .as_dictionary()
        .and_then(|d| d.get("Entitlements"))
        .ok_or_else(|| bad("no Entitlements".into()))?;
    let mut xml = Vec::new();
    ent.to_writer_xml(&mut xml)
        .map_err(|e| bad(e.to_string()))?;
    String::from_utf8(xml).map_err(|e| bad(e.to_string()))
}

/// An .ipa: unzip, sign `Payload/*.app` (with the embedded profile's entitlements unless some
/// were given), zip again.
fn sign_ipa(
    mut settings: SigningSettings<'_>,
    input: &Path,
    output: &Path,
    use_profile: bool,
) -> Result<(), ClientError> {
    let work = tempfile::tempdir().map_err(|e| ClientError::Io {
        path: "tempdir".into(),
        source: e,
    })?;
    let file = std::fs::File::open(input).map_err(ClientError::io(input))?;
    zip::ZipArchive::new(file)
        .and_then(|mut z| z.extract(work.path()))
        .map_err(|e| ClientError::Crypto(format!("{}: {e}", input.display())))?;
    let payload = work.path().join("Payload");
    let apps: Vec<PathBuf> = std::fs::read_dir(&payload)
        .map_err(ClientError::io(&payload))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "app"))
        .collect();
    let [app] = apps.as_slice() else {
        return Err(ClientError::Crypto(format!(
            "{}: expected exactly one Payload/*.app",
            input.display()
        )));
    };
    let profile = app.join("embedded.mobileprovision");
    if use_profile && profile.exists() {
        let xml =
            profile_entitlements(&std::fs::read(&profile).map_err(ClientError::io(&profile))?)?;
        settings
            .set_entitlements_xml(SettingsScope::Main, xml)
            .map_err(|e| ClientError::Config(format!("profile entitlements: {e}")))?;
    }
    UnifiedSigner::new(settings)
        .sign_path(app, app)
        .map_err(|e| ClientError::Crypto(format!("codesign {}: {e}", app.display())))?;
    zip_dir(work.path(), output)
}

fn zip_dir(root: &Path, output: &Path) -> Result<(), ClientError> {
    use std::io::Write as _;
    let zerr = |e: zip::result::ZipError| ClientError::Crypto(format!("{}: {e}", output.display()));
    let out = std::fs::File::create(output).map_err(ClientError::io(output))?;
    let mut zw = zip::ZipWriter::new(out);
    let mut stack = vec![root.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(ClientError::io(&d))? {
            let p = e.map_err(ClientError::io(&d))?.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                files.push(p)
            }
        }
    }
    files.sort();
    for p in files {
        let name = p
            .strip_prefix(root)
            .unwrap_or(&p)
            .to_string_lossy()
            .replace('\\', "/");
        #[cfg(unix)]
        let mode = {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(&p)
                .map(|m| m.permissions().mode())
                .unwrap_or(0o644)
        };
        #[cfg(not(unix))]
        let mode = 0o644;
        let opts = zip::write::SimpleFileOptions::default().unix_permissions(mode);
        zw.start_file(name, opts).map_err(zerr)?;
        zw.write_all(&std::fs::read(&p).map_err(ClientError::io(&p))?)
            .map_err(ClientError::io(&p))?;
    }
    zw.finish().map_err(zerr)?;
    Ok(())
}
