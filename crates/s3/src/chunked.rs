//! The `aws-chunked` content encoding of S3 streaming uploads, decoded incrementally. Pure.
//!
//! A body is a series of chunks, `<hex size>[;chunk-signature=<sig>]\r\n<data>\r\n`, ending
//! with a zero-size chunk and optional trailing headers (`x-amz-checksum-crc32:...`, and for a
//! signed trailer `x-amz-trailer-signature:...`), then an empty line. With
//! `STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]` each chunk is signed, chained from the
//! request's own signature; every signature is checked before the body is accepted.

use aws_lc_rs::digest;

/// Longest chunk header or trailer line.
pub const MAX_LINE: usize = 4096;
/// Most trailing headers.
pub const MAX_TRAILERS: usize = 16;

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkError {
    /// Not aws-chunked as specified.
    Malformed(String),
    /// A chunk or trailer signature does not match.
    Signature,
}

/// What signed chunks are checked with.
#[derive(Debug, Clone)]
pub struct ChunkSigner {
    /// The SigV4 signing key of the request's scope.
    pub key: Vec<u8>,
    /// The request's `X-Amz-Date`.
    pub amz_date: String,
    /// The request's credential scope.
    pub scope: String,
    /// The signature before the next chunk (first: the request's own).
    pub previous: String,
}

#[derive(Debug)]
enum State {
    /// Reading a chunk header line.
    Header,
    /// Inside a chunk's data.
    Data { remaining: u64 },
    /// The `\r\n` after a chunk's data.
    DataEnd,
    /// Trailer lines after the zero-size chunk.
    Trailers,
    /// The body is complete.
    Done,
}

/// An incremental decoder.
pub struct Decoder {
    state: State,
    line: Vec<u8>,
    signer: Option<ChunkSigner>,
    /// The signature the current chunk claims.
    claimed: String,
    chunk_hash: Option<digest::Context>,
    trailers: Vec<(String, String)>,
    trailer_signature: Option<String>,
    decoded: u64,
}

impl Decoder {
    /// A decoder; `signer` for signed chunks.
    pub fn new(signer: Option<ChunkSigner>) -> Decoder {
        Decoder {
            state: State::Header,
            line: Vec::new(),
            signer,
            claimed: String::new(),
            chunk_hash: None,
            trailers: Vec::new(),
            trailer_signature: None,
            decoded: 0,
        }
    }

    /// Bytes of data decoded so far.
    pub fn decoded_len(&self) -> u64 {
        self.decoded
    }

    /// Feeds received bytes; decoded data is appended to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ChunkError> {
        while !input.is_empty() {
            match self.state {
                State::Header | State::Trailers | State::DataEnd => {
                    let Some(line) = self.take_line(&mut input)? else {
                        return Ok(());
                    };
                    self.on_line(line)?;
                }
                State::Data { remaining } => {
                    let n = remaining.min(input.len() as u64) as usize;
                    let (data, rest) = input.split_at(n);
                    out.extend_from_slice(data);
                    if let Some(h) = &mut self.chunk_hash {
                        h.update(data);
                    }
                    self.decoded += n as u64;
                    input = rest;
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        self.end_chunk()?;
                        State::DataEnd
                    } else {
                        State::Data { remaining }
                    };
                }
                State::Done => {
                    return Err(ChunkError::Malformed(
                        "data after the end of the aws-chunked body".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Ends the body: it must be complete. Returns the trailing headers (names lower-case).
    pub fn finish(self) -> Result<Vec<(String, String)>, ChunkError> {
        match self.state {
            State::Done => Ok(self.trailers),
            _ => Err(ChunkError::Malformed(
                "the aws-chunked body ended before its final chunk".into(),
            )),
        }
    }

    /// Takes one `\r\n`-terminated line, or buffers a partial one.
    fn take_line(&mut self, input: &mut &[u8]) -> Result<Option<String>, ChunkError> {
        match input.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.line.extend_from_slice(&input[..i]);
                *input = &input[i + 1..];
                if self.line.len() > MAX_LINE {
                    return Err(ChunkError::Malformed("chunk header line too long".into()));
                }
                let mut line = std::mem::take(&mut self.line);
                if line.pop() != Some(b'\r') {
                    return Err(ChunkError::Malformed("lines must end with CRLF".into()));
                }
                String::from_utf8(line)
                    .map(Some)
                    .map_err(|_| ChunkError::Malformed("chunk header is not UTF-8".into()))
            }
            None => {
                self.line.extend_from_slice(input);
                *input = &[];
                if self.line.len() > MAX_LINE {
                    return Err(ChunkError::Malformed("chunk header line too long".into()));
                }
                Ok(None)
            }
        }
    }

    fn on_line(&mut self, line: String) -> Result<(), ChunkError> {
        match self.state {
            State::DataEnd => {
                if !line.is_empty() {
                    return Err(ChunkError::Malformed(
                        "chunk data longer than its declared size".into(),
                    ));
                }
                self.state = State::Header;
            }
            State::Header => {
                let (size, ext) = match line.split_once(';') {
                    Some((s, e)) => (s, Some(e)),
                    None => (line.as_str(), None),
                };
                let size = u64::from_str_radix(size.trim(), 16).map_err(|_| {
                    ChunkError::Malformed(format!("bad chunk size {:?}", size.trim()))
                })?;
                self.claimed = match (ext, &self.signer) {
                    (Some(e), Some(_)) => e
                        .trim()
                        .strip_prefix("chunk-signature=")
                        .ok_or_else(|| ChunkError::Malformed("expected chunk-signature".into()))?
                        .to_owned(),
                    (None, Some(_)) => {
                        return Err(ChunkError::Malformed("a chunk has no signature".into()));
                    }
                    _ => String::new(),
                };
                if self.signer.is_some() {
                    self.chunk_hash = Some(digest::Context::new(&digest::SHA256));
                }
                if size == 0 {
                    self.end_chunk()?;
                    self.state = State::Trailers;
                } else {
                    self.state = State::Data { remaining: size };
                }
            }
            State::Trailers => {
                if line.is_empty() {
                    self.check_trailer_signature()?;
                    self.state = State::Done;
                    return Ok(());
                }
                let (name, value) = line
                    .split_once(':')
                    .ok_or_else(|| ChunkError::Malformed(format!("bad trailer {line:?}")))?;
                let name = name.trim().to_ascii_lowercase();
                let value = value.trim().to_owned();
                if name == "x-amz-trailer-signature" {
                    self.trailer_signature = Some(value);
                } else {
                    if self.trailers.len() >= MAX_TRAILERS {
                        return Err(ChunkError::Malformed("too many trailers".into()));
                    }
                    self.trailers.push((name, value));
                }
            }
            State::Data { .. } | State::Done => {}
        }
        Ok(())
    }

    /// Checks the signature of the chunk just read.
    fn end_chunk(&mut self) -> Result<(), ChunkError> {
        let (Some(signer), Some(h)) = (&mut self.signer, self.chunk_hash.take()) else {
            return Ok(());
        };
        let expected = sekisho_sigv4::chunk_signature(
            &signer.key,
            &signer.amz_date,
            &signer.scope,
            &signer.previous,
            &hex::encode(h.finish()),
        );
        if !sekisho_sigv4::signatures_equal(&expected, &self.claimed) {
            return Err(ChunkError::Signature);
        }
        signer.previous = expected;
        Ok(())
    }

    /// With signed chunks, trailers must be signed too.
    fn check_trailer_signature(&mut self) -> Result<(), ChunkError> {
        let Some(signer) = &self.signer else {
            return Ok(());
        };
        if self.trailers.is_empty() && self.trailer_signature.is_none() {
            return Ok(());
        }
        let Some(given) = &self.trailer_signature else {
            return Err(ChunkError::Signature);
        };
        let block: String = self
            .trailers
            .iter()
            .map(|(k, v)| format!("{k}:{v}\n"))
            .collect();
        let expected = sekisho_sigv4::trailer_signature(
            &signer.key,
            &signer.amz_date,
            &signer.scope,
            &signer.previous,
            &hex::encode(digest::digest(&digest::SHA256, block.as_bytes())),
        );
        if sekisho_sigv4::signatures_equal(&expected, given) {
            Ok(())
        } else {
            Err(ChunkError::Signature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Trailers = Vec<(String, String)>;

    fn decode_in_pieces(
        body: &[u8],
        signer: Option<ChunkSigner>,
        piece: usize,
    ) -> Result<(Vec<u8>, Trailers), ChunkError> {
        let mut d = Decoder::new(signer);
        let mut out = Vec::new();
        for p in body.chunks(piece) {
            d.feed(p, &mut out)?;
        }
        Ok((out, d.finish()?))
    }

    #[test]
    fn unsigned_with_trailer_in_any_split() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n";
        for piece in 1..body.len() {
            let (out, tr) = decode_in_pieces(body, None, piece).unwrap();
            assert_eq!(out, b"hello world");
            assert_eq!(tr, vec![("x-amz-checksum-crc32".into(), "DUoRhQ==".into())]);
        }
    }

    #[test]
    fn truncated_and_overlong_bodies_are_refused() {
        let body = b"5\r\nhello\r\n0\r\n\r\n";
        assert!(decode_in_pieces(&body[..body.len() - 2], None, 64).is_err());
        assert!(decode_in_pieces(b"3\r\nhello\r\n0\r\n\r\n", None, 64).is_err());
        assert!(decode_in_pieces(b"zz\r\n", None, 64).is_err());
        assert!(decode_in_pieces(b"5\r\nhello\r\n0\r\n\r\nmore", None, 64).is_err());
        let long = vec![b'1'; MAX_LINE + 2];
        assert!(decode_in_pieces(&long, None, 7).is_err());
    }

    proptest::proptest! {
        /// Any data, cut into any chunks, then fed in any pieces, decodes to itself.
        #[test]
        fn round_trip(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            chunk in 1usize..700,
            piece in 1usize..900,
        ) {
            let mut body = Vec::new();
            for c in data.chunks(chunk) {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n");
            let (out, trailers) = decode_in_pieces(&body, None, piece).unwrap();
            proptest::prop_assert_eq!(out, data);
            proptest::prop_assert_eq!(trailers.len(), 1);
        }

        /// Arbitrary bytes never panic and never decode more than they hold.
        #[test]
        fn arbitrary_input(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            piece in 1usize..64,
        ) {
            let mut d = Decoder::new(None);
            let mut out = Vec::new();
            for p in body.chunks(piece) {
                if d.feed(p, &mut out).is_err() {
                    break;
                }
            }
            proptest::prop_assert!(out.len() <= body.len());
        }
    }

    /// AWS's streaming example: 65536 + 1024 bytes of `a`, three signed chunks.
    #[test]
    fn signed_chunks_verify_and_tampering_fails() {
        let key = sekisho_sigv4::signing_key(
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "20130524",
            "us-east-1",
            "s3",
        );
        let signer = ChunkSigner {
            key,
            amz_date: "20130524T000000Z".into(),
            scope: "20130524/us-east-1/s3/aws4_request".into(),
            previous: "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9".into(),
        };
        let mut body = Vec::new();
        body.extend_from_slice(b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648\r\n");
        body.extend_from_slice(&[b'a'; 65536]);
        body.extend_from_slice(b"\r\n400;chunk-signature=0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497\r\n");
        body.extend_from_slice(&[b'a'; 1024]);
        body.extend_from_slice(b"\r\n0;chunk-signature=b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9\r\n\r\n");
        let (out, _) = decode_in_pieces(&body, Some(signer.clone()), 1000).unwrap();
        assert_eq!(out.len(), 66560);
        let mut bad = body.clone();
        bad[200] = b'b';
        assert_eq!(
            decode_in_pieces(&bad, Some(signer.clone()), 1000).unwrap_err(),
            ChunkError::Signature
        );
        // Unsigned chunks where signed ones are expected.
        assert!(decode_in_pieces(b"1\r\na\r\n0\r\n\r\n", Some(signer), 64).is_err());
    }
}
