//! The checksums S3 clients send with uploads (`x-amz-checksum-*`, as a header or an
//! aws-chunked trailer), computed incrementally. Pure.

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// A checksum algorithm S3 accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// CRC-32 (ISO-HDLC), the AWS SDKs' default.
    Crc32,
    /// CRC-32C (Castagnoli).
    Crc32c,
    /// CRC-64/NVME.
    Crc64Nvme,
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
}

impl Algorithm {
    /// All algorithms.
    pub const ALL: [Algorithm; 5] = [
        Algorithm::Crc32,
        Algorithm::Crc32c,
        Algorithm::Crc64Nvme,
        Algorithm::Sha1,
        Algorithm::Sha256,
    ];

    /// From a header or trailer name (`x-amz-checksum-crc32`), case-insensitively.
    pub fn from_header(name: &str) -> Option<Algorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.header().eq_ignore_ascii_case(name))
    }

    /// From the name S3 uses in `x-amz-checksum-algorithm` (`CRC32`).
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name))
    }

    /// The header carrying this checksum.
    pub fn header(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "x-amz-checksum-crc32",
            Algorithm::Crc32c => "x-amz-checksum-crc32c",
            Algorithm::Crc64Nvme => "x-amz-checksum-crc64nvme",
            Algorithm::Sha1 => "x-amz-checksum-sha1",
            Algorithm::Sha256 => "x-amz-checksum-sha256",
        }
    }

    /// S3's name of the algorithm.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "CRC32",
            Algorithm::Crc32c => "CRC32C",
            Algorithm::Crc64Nvme => "CRC64NVME",
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
        }
    }
}

/// An incremental checksum.
pub enum Hasher {
    /// CRC-32.
    Crc32(crc32fast::Hasher),
    /// CRC-32C.
    Crc32c(u32),
    /// CRC-64/NVME (the running, inverted register).
    Crc64(u64),
    /// SHA-1 or SHA-256.
    Digest(digest::Context),
}

impl Hasher {
    /// A new hasher.
    pub fn new(a: Algorithm) -> Hasher {
        match a {
            Algorithm::Crc32 => Hasher::Crc32(crc32fast::Hasher::new()),
            Algorithm::Crc32c => Hasher::Crc32c(0),
            Algorithm::Crc64Nvme => Hasher::Crc64(!0),
            Algorithm::Sha1 => {
                Hasher::Digest(digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY))
            }
            Algorithm::Sha256 => Hasher::Digest(digest::Context::new(&digest::SHA256)),
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Crc32(h) => h.update(b),
            Hasher::Crc32c(c) => *c = crc32c::crc32c_append(*c, b),
            Hasher::Crc64(c) => *c = crc64nvme_update(*c, b),
            Hasher::Digest(d) => d.update(b),
        }
    }

    /// The checksum, base64 of its big-endian bytes, as S3 writes it.
    pub fn finish(self) -> String {
        match self {
            Hasher::Crc32(h) => B64.encode(h.finalize().to_be_bytes()),
            Hasher::Crc32c(c) => B64.encode(c.to_be_bytes()),
            Hasher::Crc64(c) => B64.encode((!c).to_be_bytes()),
            Hasher::Digest(d) => B64.encode(d.finish().as_ref()),
        }
    }
}

/// The reflected CRC-64/NVME polynomial.
const CRC64_NVME_POLY: u64 = 0x9a6c_9329_ac4b_c9b5;

const CRC64_TABLE: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ CRC64_NVME_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn crc64nvme_update(mut crc: u64, b: &[u8]) -> u64 {
    for &x in b {
        crc = CRC64_TABLE[((crc ^ x as u64) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(a: Algorithm, b: &[u8]) -> String {
        let mut h = Hasher::new(a);
        // In two pieces, to check that updates chain.
        let (x, y) = b.split_at(b.len() / 2);
        h.update(x);
        h.update(y);
        h.finish()
    }

    /// The catalogue check values of each CRC ("123456789") and the digests of "abc".
    #[test]
    fn known_values() {
        let hex = |s: String| hex::encode(B64.decode(s).unwrap());
        assert_eq!(hex(sum(Algorithm::Crc32, b"123456789")), "cbf43926");
        assert_eq!(hex(sum(Algorithm::Crc32c, b"123456789")), "e3069283");
        assert_eq!(
            hex(sum(Algorithm::Crc64Nvme, b"123456789")),
            "ae8b14860a799888"
        );
        assert_eq!(
            hex(sum(Algorithm::Sha1, b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(sum(Algorithm::Sha256, b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            Algorithm::from_header("X-Amz-Checksum-CRC32C"),
            Some(Algorithm::Crc32c)
        );
        assert_eq!(
            Algorithm::from_name("crc64nvme"),
            Some(Algorithm::Crc64Nvme)
        );
        assert_eq!(Algorithm::from_header("x-amz-checksum-md5"), None);
    }
}
