//! `load-registry`: a generated registry of many devices, loaded straight into a data
//! directory no server has open (issue 15: the registry at fleet scale is measured with one,
//! not by calling the API a million times). Devices are `dev-<i>`: a thing, an ACTIVE
//! certificate of the server's own device CA, attached, with the thing-name policy
//! `bench-fleet`. The keys of the first `keep` devices are written out (`dev-<i>.crt|key`) so
//! that `conn` can connect as them.

use std::path::Path;

use anyhow::Context as _;
use sekisho_registry::{BulkDevice, Registry};
use serde_json::{Value, json};

const POLICY: &str = r#"{"Version":"2012-10-17","Statement":[
 {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},
 {"Effect":"Allow","Action":["iot:Publish","iot:Receive"],"Resource":"arn:aws:iot:*:*:topic/bench/${iot:Connection.Thing.ThingName}"},
 {"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/bench/${iot:Connection.Thing.ThingName}"}]}"#;

/// Loads `devices` devices (from `dev-<start>`) in transactions of `batch`.
pub fn load(
    data_dir: &Path,
    region: &str,
    start: usize,
    devices: usize,
    batch: usize,
    keep: usize,
    out: &Path,
) -> anyhow::Result<Value> {
    let t0 = std::time::Instant::now();
    let registry = Registry::open(&data_dir.join("registry.db"), region)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let account = registry
        .accounts()
        .into_iter()
        .next()
        .context("no account: run `sekisho serve` on the data directory once first")?
        .id;
    match registry.create_policy(&account, "bench-fleet", POLICY) {
        Ok(_) | Err(sekisho_registry::RegistryError::AlreadyExists { .. }) => {}
        Err(e) => anyhow::bail!("{e}"),
    }
    let ca = sekisho_pki::Ca::from_pem(
        &std::fs::read_to_string(data_dir.join("device-ca.pem"))?,
        &std::fs::read_to_string(data_dir.join("device-ca.key"))?,
    )?;
    std::fs::create_dir_all(out)?;
    let now = time::OffsetDateTime::now_utc();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut added = 0;
    let mut issued_secs = 0.0;
    let mut first = start;
    while first < start + devices {
        let last = (first + batch.max(1)).min(start + devices);
        // Certificates issued on every core; the registry write is one transaction.
        let t = std::time::Instant::now();
        let chunks: Vec<Vec<usize>> = (first..last)
            .collect::<Vec<_>>()
            .chunks((last - first).div_ceil(threads))
            .map(<[usize]>::to_vec)
            .collect();
        let mut issued: Vec<(usize, sekisho_pki::IssuedKeys)> = std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .iter()
                .map(|c| {
                    let ca = &ca;
                    s.spawn(move || {
                        c.iter()
                            .map(|&i| {
                                ca.issue_named(
                                    &format!("dev-{i}"),
                                    sekisho_pki::KeyKind::EcdsaP256,
                                    now,
                                )
                                .map(|k| (i, k))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a thread panicked"))?
                        .map_err(anyhow::Error::from)
                })
                .collect::<anyhow::Result<Vec<_>>>()
                .map(|v| v.into_iter().flatten().collect())
        })?;
        issued.sort_by_key(|(i, _)| *i);
        issued_secs += t.elapsed().as_secs_f64();
        for (i, k) in issued.iter().filter(|(i, _)| *i < start + keep) {
            std::fs::write(out.join(format!("dev-{i}.crt")), &k.cert_pem)?;
            std::fs::write(out.join(format!("dev-{i}.key")), &k.private_key_pem)?;
        }
        let batch: Vec<BulkDevice> = issued
            .into_iter()
            .map(|(i, k)| BulkDevice {
                thing: format!("dev-{i}"),
                cert_pem: k.cert_pem,
            })
            .collect();
        added += registry
            .bulk_load_devices(&account, "bench-fleet", &batch)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprint!(
            "\rloaded {added}/{devices} ({:.0}s)",
            t0.elapsed().as_secs_f64()
        );
        first = last;
    }
    eprintln!();
    registry.flush().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(
        json!({"added": added, "seconds": t0.elapsed().as_secs_f64(),
              "seconds_issuing_certificates": issued_secs, "account": account}),
    )
}
