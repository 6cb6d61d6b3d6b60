//! Function code: a zip, kept and unpacked under `<dir>/<account>/<sha256>/`, where the
//! unpacking is bounded (Lambda's 250 MB unzipped, file count) and never leaves its directory
//! (entries with `..`, absolute paths or links are refused).

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest zip accepted (Lambda's direct upload limit).
pub const MAX_ZIP: usize = 50 * 1024 * 1024;
/// The most its files may hold unpacked (Lambda's limit).
pub const MAX_UNZIPPED: u64 = 250 * 1024 * 1024;
/// The most entries a zip may have.
const MAX_ENTRIES: usize = 20_000;

/// Why code was refused.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// Not a zip Lambda would take (`InvalidParameterValueException`).
    #[error("{0}")]
    Invalid(String),
    /// Larger than allowed (`RequestTooLargeException` / `CodeStorageExceededException`).
    #[error("{0}")]
    TooLarge(String),
    /// The disk said no.
    #[error("could not store the code: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// Lambda's `CodeSha256`: the base64 of the digest.
pub(crate) fn sha_base64(sha_hex: &str) -> String {
    let raw = hex::decode(sha_hex).unwrap_or_default();
    base64_encode(&raw)
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Removes an account's stored code that `keep` does not name; returns how many are left.
pub(crate) fn collect(
    dir: &Path,
    account: &str,
    keep: &std::collections::BTreeSet<String>,
) -> usize {
    let Ok(entries) = std::fs::read_dir(dir.join(account)) else {
        return 0;
    };
    let mut left = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stored = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        if !stored {
            continue;
        }
        if keep.contains(&name) {
            left += 1;
        } else {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    left
}

/// The unpacked code of `sha` for `account`.
pub(crate) fn task_dir(dir: &Path, account: &str, sha: &str) -> PathBuf {
    dir.join(account).join(sha).join("task")
}

/// Stores and unpacks a zip; returns its SHA-256 (hex) and size. The same code stored twice
/// is unpacked once.
pub(crate) fn store(dir: &Path, account: &str, zip: &[u8]) -> Result<(String, u64), CodeError> {
    if zip.len() > MAX_ZIP {
        return Err(CodeError::TooLarge(format!(
            "Unzipped size must be smaller than {MAX_UNZIPPED} bytes and the zip at most {MAX_ZIP} bytes"
        )));
    }
    if !account.bytes().all(|b| b.is_ascii_digit()) || account.is_empty() {
        return Err(CodeError::Invalid("bad account".into()));
    }
    let sha = sha256_hex(zip);
    let task = task_dir(dir, account, &sha);
    if task.is_dir() {
        return Ok((sha, zip.len() as u64));
    }
    let staging = dir
        .join(account)
        .join(format!(".{sha}.{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&staging)?;
    let result = unpack(zip, &staging.join("task"));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::write(staging.join("code.zip"), zip)?;
    let target = dir.join(account).join(&sha);
    match std::fs::rename(&staging, &target) {
        Ok(()) => {}
        // Stored meanwhile by another request: theirs stands.
        Err(_) if target.join("task").is_dir() => {
            let _ = std::fs::remove_dir_all(&staging);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e.into());
        }
    }
    Ok((sha, zip.len() as u64))
}

fn unpack(zip: &[u8], to: &Path) -> Result<(), CodeError> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip))
        .map_err(|e| CodeError::Invalid(format!("Could not unzip uploaded file: {e}")))?;
    if archive.len() > MAX_ENTRIES {
        return Err(CodeError::Invalid(format!(
            "The zip has more than {MAX_ENTRIES} entries"
        )));
    }
    std::fs::create_dir_all(to)?;
    let mut total: u64 = 0;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| CodeError::Invalid(format!("Could not unzip uploaded file: {e}")))?;
        let raw = entry.name().map(|n| n.into_owned()).unwrap_or_default();
        let absolute = raw.starts_with('/') || raw.starts_with('\\');
        let Some(rel) = entry.enclosed_name().filter(|_| !absolute) else {
            return Err(CodeError::Invalid(format!(
                "The zip entry {raw:?} leaves its directory"
            )));
        };
        if entry.is_symlink() {
            return Err(CodeError::Invalid(format!(
                "The zip entry {raw:?} is a link"
            )));
        }
        let path = to.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&path)?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Counted as read, whatever the entry claims its size is.
        let room = MAX_UNZIPPED.saturating_sub(total);
        let mut data = Vec::new();
        (&mut entry)
            .take(room + 1)
            .read_to_end(&mut data)
            .map_err(|e| CodeError::Invalid(format!("Could not unzip uploaded file: {e}")))?;
        total += data.len() as u64;
        if total > MAX_UNZIPPED {
            return Err(CodeError::TooLarge(format!(
                "Unzipped size must be smaller than {MAX_UNZIPPED} bytes"
            )));
        }
        std::fs::write(&path, &data)?;
        // Executable bits as the zip says (a `bootstrap` must run).
        #[cfg(unix)]
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o755))?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            for (name, data) in files {
                z.start_file(*name, zip::write::SimpleFileOptions::default())
                    .unwrap();
                z.write_all(data).unwrap();
            }
            z.finish().unwrap();
        }
        buf.into_inner()
    }

    fn tmp() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("sekisho-code-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn code_is_unpacked_once_and_never_outside_its_directory() {
        let dir = tmp();
        let z = zip_of(&[
            ("app.py", b"def handler(e, c):\n    return e\n"),
            ("lib/x.py", b"X = 1\n"),
        ]);
        let (sha, size) = store(&dir, "123456789012", &z).unwrap();
        assert_eq!(size, z.len() as u64);
        let task = task_dir(&dir, "123456789012", &sha);
        assert!(task.join("app.py").is_file() && task.join("lib/x.py").is_file());
        assert_eq!(store(&dir, "123456789012", &z).unwrap().0, sha);
        for bad in ["../evil.py", "/etc/evil", "a/../../evil"] {
            let z = zip_of(&[(bad, b"x")]);
            assert!(
                matches!(store(&dir, "123456789012", &z), Err(CodeError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(!dir.join("evil.py").exists() && !dir.join("123456789012/evil.py").exists());
        assert!(matches!(
            store(&dir, "123456789012", b"not a zip"),
            Err(CodeError::Invalid(_))
        ));
        assert!(matches!(
            store(&dir, "../x", &z),
            Err(CodeError::Invalid(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sizes_are_bounded() {
        let dir = tmp();
        let big = vec![0u8; MAX_ZIP + 1];
        assert!(matches!(
            store(&dir, "1", &big),
            Err(CodeError::TooLarge(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lambda_writes_the_hash_in_base64() {
        // SHA-256 of "abc".
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(
            sha_base64(sha),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b"a"), "YQ==");
    }
}
