//! Configuration: a TOML file, then command-line flags on top. Parsed once into typed values.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

/// Ports of the listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    /// MQTT over mutual TLS.
    pub mqtt: u16,
    /// Device HTTPS (reserved for the HTTPS data plane).
    pub https: u16,
    /// Control plane (AWS APIs) and `/health`.
    pub api: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            mqtt: 8883,
            https: 8443,
            api: 9443,
        }
    }
}

/// Everything `sekisho serve` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Data directory (registry, CAs, profiles).
    pub data_dir: Option<PathBuf>,
    /// Addresses to listen on. The default is loopback (IPv4 and, when available, IPv6).
    pub bind: Vec<IpAddr>,
    /// Listener ports.
    pub ports: Ports,
    /// The region this deployment pretends to be.
    pub region: String,
    /// Base domain of endpoint names: `<prefix>-ats.iot.<region>.<domain>`.
    pub domain: String,
    /// Server names that reach the default route (besides no SNI at all).
    pub default_server_names: Vec<String>,
    /// Most concurrent device connections.
    pub max_connections: usize,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` wins when set.
    pub log: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: None,
            bind: vec![
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ],
            ports: Ports::default(),
            region: "us-east-1".into(),
            domain: "localhost".into(),
            default_server_names: vec!["localhost".into()],
            max_connections: 100_000,
            log: "info".into(),
        }
    }
}

impl Config {
    /// Reads a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The data directory: configured, else `$XDG_DATA_HOME/sekisho`, else
    /// `~/.local/share/sekisho`, else `./sekisho-data`.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(x).join("sekisho");
        }
        if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(h).join(".local/share/sekisho");
        }
        PathBuf::from("sekisho-data")
    }

    /// `iot.<region>.<domain>`.
    pub fn data_suffix(&self) -> String {
        format!("iot.{}.{}", self.region, self.domain)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.bind.is_empty(),
            "bind: at least one address is required"
        );
        anyhow::ensure!(self.max_connections > 0, "max_connections must be positive");
        let label_ok = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        };
        anyhow::ensure!(
            label_ok(&self.region),
            "region {:?} is not a valid DNS label",
            self.region
        );
        anyhow::ensure!(
            label_ok(&self.domain),
            "domain {:?} is not a valid DNS name",
            self.domain
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<Config>("bnd = []").is_err());
        assert!(toml::from_str::<Config>("[ports]\nmqtt = 1\nwebsocket = 2").is_err());
        let c: Config = toml::from_str("region = \"eu-west-1\"\n[ports]\nmqtt = 18883").unwrap();
        assert_eq!(c.ports.mqtt, 18883);
        assert_eq!(c.ports.api, 9443);
        assert_eq!(c.data_suffix(), "iot.eu-west-1.localhost");
        c.validate().unwrap();
    }
}
