//! `s3::checksum`: any data, hashed in any pieces, gives the same checksum as hashed at once,
//! in S3's form (base64 of the checksum's bytes); algorithm names from headers never panic
//! and name only what they should.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sekisho_s3::checksum::{Algorithm, Hasher};

fuzz_target!(|input: (Vec<u16>, &str, &[u8])| {
    let (cuts, name, data) = input;
    for a in Algorithm::ALL {
        let mut whole = Hasher::new(a);
        whole.update(data);
        let whole = whole.finish();
        let mut split = Hasher::new(a);
        let mut rest = data;
        for c in &cuts {
            let (piece, tail) = rest.split_at(usize::from(*c).min(rest.len()));
            split.update(piece);
            rest = tail;
        }
        split.update(rest);
        assert_eq!(split.finish(), whole, "{a:?}");
        let bytes: usize = match a {
            Algorithm::Crc32 | Algorithm::Crc32c => 4,
            Algorithm::Crc64Nvme => 8,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
        };
        assert_eq!(whole.len(), bytes.div_ceil(3) * 4, "{a:?}: {whole}");
        assert_eq!(Algorithm::from_header(a.header()), Some(a));
        assert_eq!(Algorithm::from_name(a.name()), Some(a));
    }
    if let Some(a) = Algorithm::from_header(name) {
        assert!(a.header().eq_ignore_ascii_case(name));
    }
    if let Some(a) = Algorithm::from_name(name) {
        assert!(a.name().eq_ignore_ascii_case(name));
    }
});
