//! The identity fields of a certificate, named as AWS IoT's `${iot:Certificate.*}` variables.

use std::collections::BTreeMap;

use ::time::OffsetDateTime;
use x509_parser::prelude::*;

use crate::PkiError;

/// Attribute name (AWS spelling) to its values, in certificate order.
pub type NameFields = BTreeMap<&'static str, Vec<String>>;

/// What the gateway needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject attributes.
    pub subject: NameFields,
    /// Issuer attributes.
    pub issuer: NameFields,
    /// Subject alternative names by kind (RFC822Name, DNSName, DirectoryName, UniformResourceIdentifier, IPAddress).
    pub subject_alt: NameFields,
    /// Issuer alternative names by kind.
    pub issuer_alt: NameFields,
    /// Serial number, decimal.
    pub serial: String,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
    /// BasicConstraints CA flag.
    pub is_ca: bool,
    /// Subject DN as DER (to find the issuing CA by name).
    pub subject_raw: Vec<u8>,
    /// Issuer DN as DER.
    pub issuer_raw: Vec<u8>,
    /// Subject public key info, DER.
    pub spki_raw: Vec<u8>,
}

fn attr_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CommonName",
        "2.5.4.10" => "Organization",
        "2.5.4.11" => "OrganizationalUnit",
        "2.5.4.6" => "Country",
        "2.5.4.8" => "State",
        "2.5.4.46" => "DistinguishedNameQualifier",
        "2.5.4.5" => "SerialNumber",
        "2.5.4.12" => "Title",
        "2.5.4.4" => "Surname",
        "2.5.4.42" => "GivenName",
        "2.5.4.43" => "Initials",
        "2.5.4.65" => "Pseudonym",
        "2.5.4.44" => "GenerationQualifier",
        _ => return None,
    })
}

fn name_fields(name: &X509Name<'_>) -> NameFields {
    let mut out = NameFields::new();
    for attr in name.iter_attributes() {
        if let (Some(n), Ok(v)) = (attr_name(&attr.attr_type().to_id_string()), attr.as_str()) {
            out.entry(n).or_default().push(v.to_owned());
        }
    }
    out
}

fn alt_names(names: &[GeneralName<'_>]) -> NameFields {
    let mut out = NameFields::new();
    for n in names {
        let (k, v) = match n {
            GeneralName::RFC822Name(s) => ("RFC822Name", s.to_string()),
            GeneralName::DNSName(s) => ("DNSName", s.to_string()),
            GeneralName::URI(s) => ("UniformResourceIdentifier", s.to_string()),
            GeneralName::DirectoryName(d) => ("DirectoryName", d.to_string()),
            GeneralName::IPAddress(b) => {
                let ip = match b.len() {
                    4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                        .to_string(),
                    16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                        .to_string(),
                    _ => continue,
                };
                ("IPAddress", ip)
            }
            _ => continue,
        };
        out.entry(k).or_default().push(v);
    }
    out
}

/// AWS IoT does not substitute certificate values with wildcard characters or of more than
/// 1024 characters.
fn substitutable(v: &str) -> bool {
    v.len() <= 1024 && !v.contains(['*', '$', '+', '?', '#'])
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn parse(der: &[u8]) -> Result<CertInfo, PkiError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| PkiError::Invalid(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::Invalid(
                "trailing bytes after the certificate".into(),
            ));
        }
        let mut subject_alt = NameFields::new();
        let mut issuer_alt = NameFields::new();
        let mut is_ca = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    subject_alt = alt_names(&san.general_names)
                }
                ParsedExtension::IssuerAlternativeName(ian) => {
                    issuer_alt = alt_names(&ian.general_names)
                }
                ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
                _ => {}
            }
        }
        let ts = |t: ASN1Time| {
            OffsetDateTime::from_unix_timestamp(t.timestamp()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
        };
        Ok(CertInfo {
            subject: name_fields(cert.subject()),
            issuer: name_fields(cert.issuer()),
            subject_alt,
            issuer_alt,
            serial: cert.serial.to_string(),
            not_before: ts(cert.validity().not_before),
            not_after: ts(cert.validity().not_after),
            is_ca,
            subject_raw: cert.subject().as_raw().to_vec(),
            issuer_raw: cert.issuer().as_raw().to_vec(),
            spki_raw: cert.public_key().raw.to_vec(),
        })
    }

    /// Whether `now` lies within the validity period.
    pub fn valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// Looks up a certificate policy variable by the part after `iot:Certificate.`, e.g.
    /// `Subject.CommonName`, `Issuer.Organization.2`, `Subject.AlternativeName.DNSName.List`,
    /// `SerialNumber`. Returns the values and whether the key is multi-valued (`.List`).
    /// Values AWS would not substitute are left out; lists are cut to five entries.
    pub fn lookup(&self, key: &str) -> Option<(Vec<&str>, bool)> {
        if key.eq_ignore_ascii_case("SerialNumber") {
            return Some((vec![self.serial.as_str()], false));
        }
        if key.eq_ignore_ascii_case("AvailableKeys") {
            return None; // served by `available_keys`, which owns its strings
        }
        let (fields, rest) = if let Some(r) = strip_ci(key, "Subject.AlternativeName.") {
            (&self.subject_alt, r)
        } else if let Some(r) = strip_ci(key, "Issuer.AlternativeName.") {
            (&self.issuer_alt, r)
        } else if let Some(r) = strip_ci(key, "Subject.") {
            (&self.subject, r)
        } else if let Some(r) = strip_ci(key, "Issuer.") {
            (&self.issuer, r)
        } else {
            return None;
        };
        let (attr, selector) = match rest.split_once('.') {
            Some((a, s)) => (a, Some(s)),
            None => (rest, None),
        };
        let values = fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(attr))
            .map(|(_, v)| v)?;
        match selector {
            None => values
                .first()
                .filter(|v| substitutable(v))
                .map(|v| (vec![v.as_str()], false)),
            Some(s) if s.eq_ignore_ascii_case("List") => Some((
                values
                    .iter()
                    .take(5)
                    .map(String::as_str)
                    .filter(|v| substitutable(v))
                    .collect(),
                true,
            )),
            Some(n) => {
                let i: usize = n.parse().ok()?;
                let v = values.get(i.checked_sub(1)?)?;
                substitutable(v).then(|| (vec![v.as_str()], false))
            }
        }
    }

    /// `iot:Certificate.AvailableKeys`: the names of the certificate variables that have values.
    pub fn available_keys(&self) -> Vec<String> {
        let mut out = vec!["iot:Certificate.SerialNumber".to_string()];
        for (prefix, fields) in [
            ("Subject", &self.subject),
            ("Issuer", &self.issuer),
            ("Subject.AlternativeName", &self.subject_alt),
            ("Issuer.AlternativeName", &self.issuer_alt),
        ] {
            for k in fields.keys() {
                out.push(format!("iot:Certificate.{prefix}.{k}"));
            }
        }
        out
    }
}

fn strip_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}
