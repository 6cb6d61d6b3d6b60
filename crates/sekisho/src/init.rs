//! The data directory: created on first start with a default account, its root access key,
//! the CAs, the endpoint certificate, and an AWS CLI profile.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sekisho_pki::Ca;
use sekisho_registry::{AccessKey, AccountInfo, Registry};

use crate::config::Config;

/// Paths inside the data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory.
    pub dir: PathBuf,
}

impl Layout {
    /// `DIR/<name>`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Writes a file readable by its owner only.
fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_whole(path, contents, 0o600)
}

/// Writes `path` whole or not at all: a temporary file beside it, renamed over it. Another
/// process that reads it meanwhile (the server and `sekisho account create` both rewrite the
/// profiles) sees the old contents or the new, never a half-written file.
fn write_whole(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}",
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_whole(path, contents, 0o644)
}

/// Loads a CA from `<name>.pem`/`<name>.key`, creating it if absent.
fn ca(layout: &Layout, name: &str, cn: &str) -> anyhow::Result<Ca> {
    let (cert, key) = (
        layout.path(&format!("{name}.pem")),
        layout.path(&format!("{name}.key")),
    );
    if cert.exists() && key.exists() {
        return Ok(Ca::from_pem(
            &fs::read_to_string(&cert)?,
            &fs::read_to_string(&key)?,
        )?);
    }
    let ca = Ca::generate(cn, "Sekisho", time::OffsetDateTime::now_utc())?;
    write_secret(&key, &ca.key_pem())?;
    write_public(&cert, ca.cert_pem())?;
    Ok(ca)
}

/// Everything start-up needs from the data directory.
pub struct Material {
    /// The registry.
    pub registry: Registry,
    /// The CA that issues device certificates.
    pub device_ca: Ca,
    /// Endpoint certificate chain, PEM.
    pub server_chain: String,
    /// Endpoint key, PEM.
    pub server_key: String,
}

/// Opens (and on first start, initializes) the data directory.
pub fn open(config: &Config) -> anyhow::Result<(Layout, Material)> {
    let dir = config.data_dir();
    if !dir.exists() {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    }
    // Absolute, so that the profile's ca_bundle and the printed paths work from anywhere.
    let dir = fs::canonicalize(&dir).with_context(|| format!("resolving {}", dir.display()))?;
    let layout = Layout { dir };
    let registry = Registry::open(&layout.path("registry.db"), &config.region)?;
    let root = ca(&layout, "ca", "Sekisho Root CA")?;
    let device_ca = ca(&layout, "device-ca", "Sekisho Device CA")?;
    // The endpoint certificate covers every account's endpoints under the configured domain.
    let names = vec![
        format!("*.{}", config.data_suffix()),
        format!("*.credentials.{}", config.data_suffix()),
        format!("*.jobs.{}", config.data_suffix()),
        config.data_suffix(),
        config.s3_host(),
        format!("*.{}", config.s3_host()),
        config.cognito_host(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let (chain_path, key_path, names_path) = (
        layout.path("server.pem"),
        layout.path("server.key"),
        layout.path("server.names"),
    );
    let wanted = names.join("\n");
    let current = fs::read_to_string(&names_path).unwrap_or_default();
    if !(chain_path.exists() && key_path.exists()) || current != wanted {
        let issued = root.issue_server(&names, time::OffsetDateTime::now_utc())?;
        write_secret(&key_path, &issued.private_key_pem)?;
        write_public(&chain_path, &issued.cert_pem)?;
        write_public(&names_path, &wanted)?;
    }
    // In a cluster the default account comes from the cluster's registry log, or is made
    // through it once the node has joined (`ensure_default_account`).
    if config.cluster.is_none() && registry.accounts().is_empty() {
        let (info, key) = registry.create_account("default")?;
        write_profile(&layout, config, &info, &key)?;
        tracing::info!(account = %info.id, "created the default account");
    }
    let material = Material {
        registry,
        device_ca,
        server_chain: fs::read_to_string(&chain_path)?,
        server_key: fs::read_to_string(&key_path)?,
    };
    Ok((layout, material))
}

/// Adds (or replaces) profile `info.name` in `DIR/aws/config` and `DIR/aws/credentials`.
pub fn write_profile(
    layout: &Layout,
    config: &Config,
    info: &AccountInfo,
    key: &AccessKey,
) -> anyhow::Result<()> {
    let aws = layout.path("aws");
    fs::create_dir_all(&aws)?;
    let profile = if info.name == "default" {
        "sekisho".to_string()
    } else {
        info.name.clone()
    };
    let api = format!("https://localhost:{}", config.ports.api);
    // `aws iot-jobs-data` goes to the account's iot:Jobs endpoint, the same port.
    let jobs = format!(
        "https://{}.jobs.{}:{}",
        info.endpoint_prefix,
        config.data_suffix(),
        config.ports.https
    );
    // `aws iot-data` goes to the account's data endpoint on the device HTTPS port.
    let data = format!(
        "https://{}-ats.{}:{}",
        info.endpoint_prefix,
        config.data_suffix(),
        config.ports.https
    );
    // S3 goes path-style to localhost (`<bucket>.s3.<region>.<domain>` needs DNS that a fresh
    // machine does not have), and presigns with SigV4: botocore's default for S3 presigned URLs
    // is still SigV2, which is served too, but SigV4 links are scoped and limited to 7 days.
    let s3 = format!("https://localhost:{}", config.ports.s3);
    let config_section = format!(
        "[profile {profile}]\nregion = {region}\nca_bundle = {ca}\nservices = {profile}-services\ns3 =\n  addressing_style = path\n  signature_version = s3v4\n\n[services {profile}-services]\niot =\n  endpoint_url = {api}\niam =\n  endpoint_url = {api}\nsts =\n  endpoint_url = {api}\nlambda =\n  endpoint_url = {api}\ncognito_identity =\n  endpoint_url = {api}\niot_data_plane =\n  endpoint_url = {data}\niot_jobs_data_plane =\n  endpoint_url = {jobs}\ns3 =\n  endpoint_url = {s3}\n",
        region = config.region,
        ca = layout.path("ca.pem").display(),
    );
    let creds_section = format!(
        "[{profile}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
        key.access_key_id, key.secret_access_key
    );
    replace_section(
        &aws.join("config"),
        &[
            &format!("profile {profile}"),
            &format!("services {profile}-services"),
        ],
        &config_section,
        false,
    )?;
    replace_section(&aws.join("credentials"), &[&profile], &creds_section, true)?;
    Ok(())
}

/// Rewrites an INI file with the named sections replaced by `text`.
fn replace_section(path: &Path, names: &[&str], text: &str, secret: bool) -> anyhow::Result<()> {
    let old = fs::read_to_string(path).unwrap_or_default();
    let mut out = String::new();
    let mut skipping = false;
    for line in old.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            skipping = names.iter().any(|n| t[1..t.len() - 1].trim() == *n);
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push('\n');
    }
    out.push_str(text);
    if secret {
        write_secret(path, &out)
    } else {
        write_public(path, &out)
    }
}
