//! Device provisioning: through Sekisho's API (SigV4-signed HTTPS), or with a local CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A keep-alive HTTPS connection to the control plane with SigV4 signing.
struct Api {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    host: String,
    key: String,
    secret: String,
}

fn profile_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut in_section = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t == format!("[{section}]");
        } else if in_section
            && let Some((k, v)) = t.split_once('=')
            && k.trim() == key
        {
            return Some(v.trim().to_owned());
        }
    }
    None
}

impl Api {
    async fn open(data_dir: &Path, addr: SocketAddr) -> anyhow::Result<Api> {
        let creds = std::fs::read_to_string(data_dir.join("aws/credentials"))
            .context("reading the profile's credentials")?;
        let key =
            profile_value(&creds, "sekisho", "aws_access_key_id").context("no sekisho profile")?;
        let secret = profile_value(&creds, "sekisho", "aws_secret_access_key")
            .context("no sekisho profile")?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(data_dir.join("ca.pem"))? {
            roots.add(c?)?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        Ok(Api {
            stream,
            host: format!("localhost:{}", addr.port()),
            key,
            secret,
        })
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        extra: &[(&str, &str)],
        body: &Value,
    ) -> anyhow::Result<Value> {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let now = time::OffsetDateTime::now_utc();
        let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
        let amz_date = now.format(&fmt)?;
        let mut headers = vec![
            ("host".to_string(), self.host.clone()),
            ("x-amz-date".to_string(), amz_date.clone()),
        ];
        for (k, v) in extra {
            headers.push((k.to_string(), v.to_string()));
        }
        let body_hash = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            body.as_bytes(),
        ));
        let req = sekisho_sigv4::Request {
            method,
            path,
            query,
            headers: &headers,
            body_sha256: &body_hash,
        };
        let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        let auth = sekisho_sigv4::sign_header(
            &req,
            &self.key,
            &self.secret,
            "us-east-1",
            "iot",
            &amz_date,
            &names,
        );
        let target = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query}")
        };
        let mut text = format!(
            "{method} {target} HTTP/1.1\r\nauthorization: {auth}\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (k, v) in &headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        text.push_str(&body);
        self.stream.write_all(text.as_bytes()).await?;
        // Response: headers, then Content-Length bytes.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let (head_end, length) = loop {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed");
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                break (i + 4, len);
            }
        };
        while buf.len() < head_end + length {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let status = String::from_utf8_lossy(&buf[..head_end])
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .to_owned();
        let v: Value =
            serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
        if status != "200" {
            bail!("{method} {path}: HTTP {status}: {v}");
        }
        Ok(v)
    }
}

/// Creates `count` devices `dev-<i>` with certificates from local ECDSA keys and one shared policy.
pub async fn provision(
    data_dir: &Path,
    api: SocketAddr,
    out: &Path,
    count: usize,
    policy: &Path,
) -> anyhow::Result<Value> {
    std::fs::create_dir_all(out)?;
    let doc = std::fs::read_to_string(policy)?;
    let mut a = Api::open(data_dir, api).await?;
    let name = "sekisho-bench";
    if a.call("GET", &format!("/policies/{name}"), "", &[], &Value::Null)
        .await
        .is_err()
    {
        a.call(
            "POST",
            &format!("/policies/{name}"),
            "",
            &[],
            &json!({"policyDocument": doc}),
        )
        .await?;
    }
    let t0 = std::time::Instant::now();
    for i in 0..count {
        let dev = format!("dev-{i}");
        if out.join(format!("{dev}.crt")).exists() {
            continue;
        }
        let (key, csr) = sekisho_pki::new_csr(&dev, sekisho_pki::KeyKind::EcdsaP256)?;
        a.call("POST", &format!("/things/{dev}"), "", &[], &json!({}))
            .await?;
        let c = a
            .call(
                "POST",
                "/certificates",
                "setAsActive=true",
                &[],
                &json!({"certificateSigningRequest": csr}),
            )
            .await?;
        let arn = c["certificateArn"]
            .as_str()
            .context("certificateArn")?
            .to_owned();
        a.call(
            "PUT",
            &format!("/target-policies/{name}"),
            "",
            &[],
            &json!({"target": arn}),
        )
        .await?;
        a.call(
            "PUT",
            &format!("/things/{dev}/principals"),
            "",
            &[("x-amzn-principal", &arn)],
            &Value::Null,
        )
        .await?;
        std::fs::write(out.join(format!("{dev}.key")), key)?;
        std::fs::write(
            out.join(format!("{dev}.crt")),
            c["certificatePem"].as_str().unwrap_or_default(),
        )?;
        if i % 500 == 499 {
            eprintln!("provisioned {}/{count}", i + 1);
        }
    }
    Ok(json!({"provisioned": count, "seconds": t0.elapsed().as_secs_f64()}))
}

/// A local CA and `count` device certificates with CN `dev-<i>`.
pub fn gen_certs(out: &Path, count: usize) -> anyhow::Result<Value> {
    std::fs::create_dir_all(out)?;
    let now = time::OffsetDateTime::now_utc();
    let (ca_pem, ca_key) = (out.join("ca.pem"), out.join("ca.key"));
    let ca = if ca_pem.exists() {
        sekisho_pki::Ca::from_pem(
            &std::fs::read_to_string(&ca_pem)?,
            &std::fs::read_to_string(&ca_key)?,
        )?
    } else {
        let ca = sekisho_pki::Ca::generate("sekisho-bench device CA", "sekisho-bench", now)?;
        std::fs::write(&ca_pem, ca.cert_pem())?;
        std::fs::write(&ca_key, ca.key_pem())?;
        ca
    };
    for i in 0..count {
        let dev = format!("dev-{i}");
        if out.join(format!("{dev}.crt")).exists() {
            continue;
        }
        let k = ca.issue_named(&dev, sekisho_pki::KeyKind::EcdsaP256, now)?;
        std::fs::write(out.join(format!("{dev}.crt")), &k.cert_pem)?;
        std::fs::write(out.join(format!("{dev}.key")), &k.private_key_pem)?;
    }
    Ok(json!({"generated": count}))
}
