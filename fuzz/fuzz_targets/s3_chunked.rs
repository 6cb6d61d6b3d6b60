//! S3's `aws-chunked` bodies through `s3::chunked::Decoder`, unsigned and with chunk
//! signatures. Never a panic, and:
//!
//! - raw mode: arbitrary bytes, fed whole and in arbitrary pieces, give the same result (a
//!   network read may split a body anywhere); never more data out than bytes in;
//!   `decoded_len` counts what came out;
//! - built mode: arbitrary chunks and trailers, encoded (and signed, chained from a seed
//!   signature, as SDKs do), decode to themselves in any pieces; with one byte changed, a signed
//!   body either fails or still decodes to exactly the same data and trailers.
#![no_main]

use aws_lc_rs::digest;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sekisho_s3::checksum::Algorithm;
use sekisho_s3::chunked::{ChunkError, ChunkSigner, Decoder, MAX_LINE, MAX_TRAILERS};

const DATE: &str = "20260101T000000Z";
const SCOPE: &str = "20260101/us-east-1/s3/aws4_request";
/// The request's own signature, which the first chunk's is chained to.
const SEED: &str = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9";

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    Raw {
        signed: bool,
        pieces: Vec<u16>,
        body: &'a [u8],
    },
    Built {
        signed: bool,
        sign_trailers: bool,
        chunks: Vec<Chunk<'a>>,
        trailers: Vec<(&'a str, &'a str)>,
        pieces: Vec<u16>,
        corrupt: Option<(u32, u8)>,
    },
}

#[derive(Arbitrary, Debug)]
struct Chunk<'a> {
    data: &'a [u8],
    upper: bool,
    leading_zeros: u8,
    /// Unsigned bodies: a chunk extension, which is ignored.
    extension: bool,
}

type Decoded = Result<(Vec<u8>, Vec<(String, String)>), ChunkError>;

fn signer() -> ChunkSigner {
    ChunkSigner {
        key: sekisho_sigv4::signing_key("secret", &DATE[..8], "us-east-1", "s3"),
        amz_date: DATE.into(),
        scope: SCOPE.into(),
        previous: SEED.into(),
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, b))
}

/// Decodes `body` fed in the given piece sizes (cycled; none: all at once).
fn decode(body: &[u8], signed: bool, pieces: &[u16]) -> Decoded {
    let mut d = Decoder::new(signed.then(signer));
    let mut out = Vec::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = match pieces {
            [] => rest.len(),
            p => (usize::from(p[i % p.len()]) + 1).min(rest.len()),
        };
        i += 1;
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        let before = out.len();
        let r = d.feed(piece, &mut out);
        assert!(out.len() - before <= piece.len(), "more out than in");
        assert_eq!(d.decoded_len(), out.len() as u64);
        r?;
    }
    let trailers = d.finish()?;
    for (name, _) in &trailers {
        let _ = Algorithm::from_header(name);
    }
    Ok((out, trailers))
}

fn built(
    signed: bool,
    sign_trailers: bool,
    chunks: &[Chunk<'_>],
    trailers: &[(&str, &str)],
) -> (Vec<u8>, Decoded) {
    let s = signer();
    let mut previous = s.previous.clone();
    let mut sign = |data: &[u8]| {
        let sig = sekisho_sigv4::chunk_signature(&s.key, DATE, SCOPE, &previous, &sha256_hex(data));
        previous = sig.clone();
        format!(";chunk-signature={sig}")
    };
    let mut body = Vec::new();
    let mut data = Vec::new();
    for c in chunks.iter().filter(|c| !c.data.is_empty()) {
        let size = if c.upper {
            format!("{:X}", c.data.len())
        } else {
            format!("{:x}", c.data.len())
        };
        body.extend_from_slice("0".repeat(usize::from(c.leading_zeros % 4)).as_bytes());
        body.extend_from_slice(size.as_bytes());
        if signed {
            body.extend_from_slice(sign(c.data).as_bytes());
        } else if c.extension {
            body.extend_from_slice(b";ext=1");
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(c.data);
        body.extend_from_slice(b"\r\n");
        data.extend_from_slice(c.data);
    }
    body.push(b'0');
    if signed {
        body.extend_from_slice(sign(b"").as_bytes());
    }
    body.extend_from_slice(b"\r\n");
    // Trailers as a client writes them: lower-case names, values without surrounding space.
    let trailers: Vec<(String, String)> = trailers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
        .filter(|(k, v)| {
            !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && k != "x-amz-trailer-signature"
                && !v.contains(['\r', '\n'])
                && k.len() + v.len() < MAX_LINE - 8
        })
        .take(MAX_TRAILERS)
        .collect();
    let mut block = String::new();
    for (k, v) in &trailers {
        block.push_str(&format!("{k}:{v}\n"));
        body.extend_from_slice(format!("{k}:{v}\r\n").as_bytes());
    }
    let trailer_signed = signed && sign_trailers && !trailers.is_empty();
    if trailer_signed {
        let sig = sekisho_sigv4::trailer_signature(
            &s.key,
            DATE,
            SCOPE,
            &previous,
            &sha256_hex(block.as_bytes()),
        );
        body.extend_from_slice(format!("x-amz-trailer-signature:{sig}\r\n").as_bytes());
    }
    body.extend_from_slice(b"\r\n");
    let expected = if signed && !trailers.is_empty() && !trailer_signed {
        Err(ChunkError::Signature)
    } else {
        Ok((data, trailers))
    };
    (body, expected)
}

fuzz_target!(|input: Input<'_>| {
    match input {
        Input::Raw {
            signed,
            pieces,
            body,
        } => {
            let whole = decode(body, signed, &[]);
            let split = decode(body, signed, &pieces);
            assert_eq!(whole, split, "the result depends on how the body was split");
            if let Ok((out, _)) = &whole {
                assert!(out.len() <= body.len());
            }
        }
        Input::Built {
            signed,
            sign_trailers,
            chunks,
            trailers,
            pieces,
            corrupt,
        } => {
            let (body, expected) = built(signed, sign_trailers, &chunks, &trailers);
            assert_eq!(
                decode(&body, signed, &pieces),
                expected,
                "{:?}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(decode(&body, signed, &[]), expected);
            if signed
                && let Some((at, x)) = corrupt
                && x != 0
            {
                let mut bad = body.clone();
                let i = at as usize % bad.len();
                bad[i] ^= x;
                if let Ok(got) = decode(&bad, true, &pieces) {
                    assert_eq!(
                        Ok(got),
                        expected,
                        "a changed signed body decoded differently"
                    );
                }
            }
        }
    }
});
