//! MQTT over WebSocket, server side: a client's bytes after the upgrade, through tungstenite
//! (`Role::Server`, frame and message limits as `gateway::https` sets them) and
//! `gateway::ws::WsIo`, read to the end on a current-thread runtime, in arbitrary read sizes
//! (with `Pending` in between). Never a panic, no read returns more than the limit, nothing
//! comes out that was not sent, and:
//!
//! - raw mode: arbitrary bytes;
//! - frames mode: frames built from arbitrary fields (fin, reserved bits, opcode, mask, length
//!   encoding, payload); where RFC 6455 decides the outcome, what `WsIo` reads must be exactly
//!   the payloads of the binary messages completed before the first frame that ends the
//!   connection (text, close, a protocol error, a frame or message over the limit).
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sekisho_gateway::ws::WsIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// The largest MQTT packet the gateway accepts by default, and so its largest WebSocket frame
/// and message.
const LIMIT: usize = 128 * 1024 + 4096;
/// Frames mode: the stream built is cut at this size.
const MAX_STREAM: usize = 4 * LIMIT;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    /// Read sizes (cycled; 0: `Pending` once); none: everything at once.
    reads: Vec<u16>,
    /// Written by the server before it reads.
    write: &'a [u8],
    stream: Stream<'a>,
}

#[derive(Arbitrary, Debug)]
enum Stream<'a> {
    Raw(&'a [u8]),
    Frames(Vec<Frame<'a>>),
}

/// A frame; what is left out (input exhausted) makes a well-formed final binary frame.
#[derive(Arbitrary, Debug)]
struct Frame<'a> {
    opcode: Opcode,
    /// FIN clear: more fragments follow.
    more: bool,
    mask: [u8; 4],
    /// What makes a frame ill-formed.
    odd: Option<Odd>,
    /// The payload is this many copies of `payload` (big frames from small inputs).
    repeat: u16,
    payload: &'a [u8],
}

/// The opcodes, each as likely as all the reserved ones together.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Opcode {
    Binary,
    Continuation,
    Text,
    Close,
    Ping,
    Pong,
    /// Low four bits.
    Other(u8),
}

impl Opcode {
    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0,
            Opcode::Text => 1,
            Opcode::Binary => 2,
            Opcode::Close => 8,
            Opcode::Ping => 9,
            Opcode::Pong => 10,
            Opcode::Other(b) => b & 0x0f,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Odd {
    /// RSV1-3 (low three bits).
    rsv: u8,
    unmasked: bool,
    length: Length,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Length {
    Minimal,
    /// The 16- or 64-bit form where a shorter one would do.
    Wide16,
    Wide64,
    /// A length that is not the payload's.
    Declared(u64),
}

/// The client's side: `input` in the scheduled read sizes; writes are dropped.
struct Peer<'a> {
    input: &'a [u8],
    reads: &'a [u16],
    next: usize,
    pending: bool,
}

impl AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut n = self.input.len().min(buf.remaining());
        if !self.reads.is_empty() {
            let step = self.reads[self.next % self.reads.len()];
            self.next += 1;
            if step == 0 && !self.pending {
                self.pending = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.pending = false;
            n = n.min(usize::from(step).max(1));
        }
        let (now, rest) = self.input.split_at(n);
        buf.put_slice(now);
        self.input = rest;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Encodes frames as a client sends them; with what the RFC says `WsIo` must read, when it
/// says.
fn build(frames: &[Frame<'_>]) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut out = Vec::new();
    let mut read = Vec::new();
    // The message being assembled: binary or not, and its bytes so far.
    let mut message: Option<(bool, Vec<u8>)> = None;
    let mut predicted = true;
    let mut ended = false;
    for f in frames {
        let payload = f.payload.repeat(usize::from(f.repeat % 64) + 1);
        if out.len() + payload.len() + 14 > MAX_STREAM {
            break;
        }
        let opcode = f.opcode.bits();
        let fin = !f.more;
        let (rsv, mask, length) = match f.odd {
            None => (0, Some(f.mask), Length::Minimal),
            Some(o) => (o.rsv & 0x07, (!o.unmasked).then_some(f.mask), o.length),
        };
        out.push(u8::from(fin) << 7 | rsv << 4 | opcode);
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        let len = payload.len() as u64;
        let declared = match length {
            Length::Declared(d) => d,
            _ => len,
        };
        match length {
            Length::Minimal | Length::Declared(_) if declared < 126 => {
                out.push(mask_bit | declared as u8);
            }
            Length::Minimal | Length::Wide16 | Length::Declared(_) if declared < 65_536 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(declared as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&declared.to_be_bytes());
            }
        }
        if let Some(m) = mask {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        } else {
            out.extend_from_slice(&payload);
        }

        if ended || !predicted {
            continue;
        }
        match length {
            Length::Minimal => {}
            // Refused from the header alone.
            Length::Declared(d) if d > LIMIT as u64 => {
                ended = true;
                continue;
            }
            // The RFC wants the minimal form; whether a library insists is its own affair.
            Length::Declared(_) | Length::Wide16 | Length::Wide64 => {
                predicted = false;
                continue;
            }
        }
        // From here on, every outcome but carrying on ends the connection.
        let fail = payload.len() > LIMIT || rsv != 0 || mask.is_none();
        ended = fail
            || match opcode {
                // Continuation.
                0 => match &mut message {
                    None => true,
                    Some((_, m)) if m.len() + payload.len() > LIMIT => true,
                    Some((binary, m)) => {
                        m.extend_from_slice(&payload);
                        if fin {
                            let binary = *binary;
                            let m = message.take().map(|(_, m)| m).unwrap_or_default();
                            if binary {
                                read.extend_from_slice(&m);
                            }
                            // A text message ends the connection: MQTT is binary.
                            !binary
                        } else {
                            false
                        }
                    }
                },
                // Text and binary.
                1 | 2 if message.is_some() => true,
                1 if fin => true,
                2 if fin => {
                    read.extend_from_slice(&payload);
                    false
                }
                1 | 2 => {
                    message = Some((opcode == 2, payload.clone()));
                    false
                }
                // Ping and pong, answered or ignored.
                9 | 10 => !fin || payload.len() > 125,
                // Close (valid or not), and reserved opcodes.
                _ => true,
            };
    }
    (out, predicted.then_some(read))
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
}

/// Runs the server side over `input`: what it read.
fn serve(input: &[u8], reads: &[u16], write: &[u8]) -> Vec<u8> {
    let peer = Peer {
        input,
        reads,
        next: 0,
        pending: false,
    };
    RUNTIME.with(|rt| {
        rt.block_on(async {
            let config = WebSocketConfig::default()
                .max_frame_size(Some(LIMIT))
                .max_message_size(Some(LIMIT));
            let ws = WebSocketStream::from_raw_socket(peer, Role::Server, Some(config)).await;
            let mut io = WsIo::new(ws);
            if !write.is_empty() {
                io.write_all(write).await.expect("writing to a sink");
                io.flush().await.expect("flushing to a sink");
            }
            let mut got = Vec::new();
            let mut buf = vec![0u8; 2 * LIMIT];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        assert!(n <= LIMIT, "one read returned {n} bytes");
                        got.extend_from_slice(&buf[..n]);
                    }
                }
            }
            let _ = io.shutdown().await;
            got
        })
    })
}

fuzz_target!(|input: Input<'_>| {
    match &input.stream {
        Stream::Raw(bytes) => {
            let got = serve(bytes, &input.reads, input.write);
            assert!(got.len() <= bytes.len());
        }
        Stream::Frames(frames) => {
            let (bytes, expected) = build(frames);
            let got = serve(&bytes, &input.reads, input.write);
            assert!(got.len() <= bytes.len());
            if let Some(expected) = expected {
                assert!(
                    got == expected,
                    "read {} bytes, expected {}",
                    got.len(),
                    expected.len()
                );
            }
        }
    }
});
