//! `meshsign notarize FILE [--wait]` (issue 29): Apple's Notary REST API v2 with App Store
//! Connect tokens the site mints (`asc-token`), so no `.p8` sits on the runner. The flow is
//! Apple's ("Submitting software for notarization over the web"): `POST
//! /notary/v2/submissions` with the file's name and SHA-256 answers a submission id and
//! temporary AWS credentials for one S3 object; the file is `PUT` there (AWS Signature V4 with
//! those credentials); `GET /notary/v2/submissions/{id}` until the status is no longer `In
//! Progress`; `GET …/{id}/logs` names the developer log's URL, which is fetched and its
//! `issues` printed. The runner needs outbound HTTPS to `appstoreconnect.apple.com` and the
//! bucket's S3 host only (proxies: `https_proxy`/`no_proxy`; extra CA: `--ca-file`).
//!
//! `apple-codesign`'s `app-store-connect` crate has a notary client, but it signs its own
//! tokens from the `.p8` (it takes the key, not a bearer token), which is exactly what
//! meshsign removes from runners; this module is the small REST flow instead.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::session::job::{self, JobOptions};
use crate::{ClientConfig, ClientError};

/// Apple's App Store Connect API.
pub const APPLE_API: &str = "https://appstoreconnect.apple.com";

/// `meshsign notarize`.
#[derive(clap::Args, Clone, Debug)]
pub struct NotarizeOptions {
    /// How the job enrolls (or the job agent's session).
    #[command(flatten)]
    pub job: JobOptions,
    /// The site's `asc-api` key alias.
    #[arg(long)]
    pub key: String,
    /// The archive to notarize (.zip, .dmg or .pkg).
    pub file: PathBuf,
    /// Wait for Apple's verdict (polling), then print the log's issues; exit 1 if it is not
    /// Accepted.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Seconds between polls.
    #[arg(long, default_value_t = 30)]
    pub poll: u64,
    /// The API's base URL (tests point it at a stand-in).
    #[arg(long, default_value = APPLE_API, hide = true)]
    pub api_url: String,
    /// The upload's base URL instead of `https://<bucket>.s3.amazonaws.com` (tests).
    #[arg(long, hide = true)]
    pub upload_url: Option<String>,
}

/// What `notarize` found out.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Notarized {
    /// Apple's submission id.
    pub id: String,
    /// `In Progress`, `Accepted`, `Invalid`, `Rejected` (as Apple spells them).
    pub status: String,
    /// The developer log's issues (`severity: path: message`), when waited for.
    pub issues: Vec<String>,
}

fn nerr(m: impl Into<String>) -> ClientError {
    ClientError::Connect {
        endpoint: "App Store Connect".into(),
        message: m.into(),
    }
}

/// Submits the file; with `--wait`, waits for and returns the verdict and the log's issues.
pub async fn notarize(cfg: &ClientConfig, o: &NotarizeOptions) -> Result<Notarized, ClientError> {
    let bytes = std::fs::read(&o.file).map_err(ClientError::io(&o.file))?;
    let name = o
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    let mut job = o.job.clone();
    job.ttl = 0;
    let ca = job.ca_file.clone().or_else(|| cfg.token_ca_file.clone());
    let (mut session, own) = job::open(cfg, &job).await?;
    let result = flow(&mut session, o, &name, bytes, ca.as_deref()).await;
    if own {
        job::finish(&mut session, result).await
    } else {
        result
    }
}

async fn flow(
    session: &mut crate::session::Session,
    o: &NotarizeOptions,
    name: &str,
    bytes: Vec<u8>,
    ca: Option<&std::path::Path>,
) -> Result<Notarized, ClientError> {
    let sha256 = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &bytes,
    ));
    let api = o.api_url.trim_end_matches('/');
    let token = session.asc_token(&o.key, &[], 0).await?.token;
    let body = serde_json::json!({ "submissionName": name, "sha256": sha256 });
    let sub = call(
        "POST",
        &format!("{api}/notary/v2/submissions"),
        &token,
        body.to_string().into_bytes(),
        ca,
    )
    .await?;
    let id = str_at(&sub, "/data/id")?;
    let a = &sub["data"]["attributes"];
    let creds = S3Credentials {
        access_key_id: str_at(a, "/awsAccessKeyId")?,
        secret_access_key: zeroize::Zeroizing::new(str_at(a, "/awsSecretAccessKey")?),
        session_token: str_at(a, "/awsSessionToken")?,
    };
    let (bucket, object) = (str_at(a, "/bucket")?, str_at(a, "/object")?);
    let base = o
        .upload_url
        .clone()
        .unwrap_or_else(|| format!("https://{bucket}.s3.amazonaws.com"));
    upload(&base, &object, &creds, bytes, ca).await?;
    crate::notes::note(&format!("submitted {name} to Apple: submission {id}"));
    let mut out = Notarized {
        id: id.clone(),
        status: "In Progress".into(),
        issues: Vec::new(),
    };
    if !o.wait {
        return Ok(out);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(o.timeout);
    let mut token = token;
    loop {
        let st = match call(
            "GET",
            &format!("{api}/notary/v2/submissions/{id}"),
            &token,
            Vec::new(),
            ca,
        )
        .await
        {
            // A token lives 20 minutes: a long wait gets a fresh one.
            Err(ClientError::Connect { message, .. }) if message.contains("401") => {
                token = session.asc_token(&o.key, &[], 0).await?.token;
                continue;
            }
            other => other?,
        };
        out.status = str_at(&st, "/data/attributes/status")?;
        if out.status != "In Progress" {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(nerr(format!(
                "submission {id} is still In Progress after {} s",
                o.timeout
            )));
        }
        tokio::time::sleep(Duration::from_secs(o.poll)).await;
    }
    let logs = call(
        "GET",
        &format!("{api}/notary/v2/submissions/{id}/logs"),
        &token,
        Vec::new(),
        ca,
    )
    .await?;
    let url = str_at(&logs, "/data/attributes/developerLogUrl")?;
    let (status, log) = crate::net::http::request(
        crate::net::http::Request {
            method: "GET",
            url: &url,
            headers: &[],
            body: Vec::new(),
        },
        ca,
    )
    .await
    .map_err(nerr)?;
    if status == 200 {
        let log: Value = serde_json::from_slice(&log).unwrap_or_default();
        out.issues = log["issues"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        format!(
                            "{}: {}: {}",
                            i["severity"].as_str().unwrap_or("issue"),
                            i["path"].as_str().unwrap_or("-"),
                            i["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
    }
    Ok(out)
}

/// An API call with the bearer token; the JSON answer, or an error naming the status.
async fn call(
    method: &str,
    url: &str,
    token: &str,
    body: Vec<u8>,
    ca: Option<&std::path::Path>,
) -> Result<Value, ClientError> {
    let auth = format!("Bearer {token}");
    let (status, text) = crate::net::http::request(
        crate::net::http::Request {
            method,
            url,
            headers: &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("accept", "application/json"),
            ],
            body,
        },
        ca,
    )
    .await
    .map_err(|e| nerr(format!("{method} {url}: {e}")))?;
    if !(200..300).contains(&status) {
        return Err(nerr(format!(
            "{method} {url} answered {status}: {}",
            meshsign_evidence::audit::excerpt(&String::from_utf8_lossy(&text), 300)
        )));
    }
    serde_json::from_slice(&text).map_err(|e| nerr(format!("{method} {url}: {e}")))
}

fn str_at(v: &Value, pointer: &str) -> Result<String, ClientError> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| nerr(format!("the answer has no {pointer}")))
}

/// The temporary credentials Apple hands out for one upload.
struct S3Credentials {
    access_key_id: String,
    secret_access_key: zeroize::Zeroizing<String>,
    session_token: String,
}

/// Apple's notary bucket's region.
const S3_REGION: &str = "us-west-2";

/// `PUT base/object` signed with AWS Signature Version 4 (service `s3`, the payload's SHA-256
/// in `x-amz-content-sha256`, the session token in `x-amz-security-token`).
async fn upload(
    base: &str,
    object: &str,
    c: &S3Credentials,
    bytes: Vec<u8>,
    ca: Option<&std::path::Path>,
) -> Result<(), ClientError> {
    let url = format!(
        "{}/{}",
        base.trim_end_matches('/'),
        object.trim_start_matches('/')
    );
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| nerr(format!("bad upload URL {url}")))?;
    let host = match (uri.host(), uri.port_u16()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => return Err(nerr(format!("upload URL {url} has no host"))),
    };
    let now = time::OffsetDateTime::now_utc();
    let amz_date = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let payload = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &bytes,
    ));
    let authorization = sigv4(c, ("PUT", uri.path(), &host), (&amz_date, &payload));
    let (status, text) = crate::net::http::request(
        crate::net::http::Request {
            method: "PUT",
            url: &url,
            headers: &[
                ("authorization", &authorization),
                ("x-amz-date", &amz_date),
                ("x-amz-content-sha256", &payload),
                ("x-amz-security-token", &c.session_token),
            ],
            body: bytes,
        },
        ca,
    )
    .await
    .map_err(|e| nerr(format!("upload to {host}: {e}")))?;
    if !(200..300).contains(&status) {
        return Err(nerr(format!(
            "upload to {host} answered {status}: {}",
            meshsign_evidence::audit::excerpt(&String::from_utf8_lossy(&text), 300)
        )));
    }
    Ok(())
}

/// The `Authorization` header of AWS Signature Version 4 for a request without a query.
fn sigv4(
    c: &S3Credentials,
    (method, path, host): (&str, &str, &str),
    (amz_date, payload_sha256): (&str, &str),
) -> String {
    use aws_lc_rs::hmac;
    let date = &amz_date[..8];
    let signed_headers = "host;x-amz-content-sha256;x-amz-date;x-amz-security-token";
    let canonical = format!(
        "{method}\n{path}\n\nhost:{host}\nx-amz-content-sha256:{payload_sha256}\nx-amz-date:{amz_date}\nx-amz-security-token:{}\n\n{signed_headers}\n{payload_sha256}",
        c.session_token
    );
    let scope = format!("{date}/{S3_REGION}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            canonical.as_bytes()
        ))
    );
    let mac = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
            .as_ref()
            .to_vec()
    };
    let k = mac(
        format!("AWS4{}", c.secret_access_key.as_str()).as_bytes(),
        date,
    );
    let k = mac(&k, S3_REGION);
    let k = mac(&k, "s3");
    let k = mac(&k, "aws4_request");
    let signature = hex::encode(mac(&k, &to_sign));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        c.access_key_id
    )
}

#[cfg(test)]
mod tests {
    /// AWS's published example: the signing key and signature of "GET Object" from the S3
    /// SigV4 documentation would need their exact headers; here the derivation chain is
    /// checked against AWS's documented signing-key example (IAM "Deriving the signing key").
    #[test]
    fn signing_key_derivation_matches_aws_documentation() {
        use aws_lc_rs::hmac;
        let mac = |key: &[u8], data: &str| {
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
                .as_ref()
                .to_vec()
        };
        let k = mac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215");
        let k = mac(&k, "us-east-1");
        let k = mac(&k, "iam");
        let k = mac(&k, "aws4_request");
        assert_eq!(
            hex::encode(k),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }
}
