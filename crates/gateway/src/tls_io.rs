//! Device TLS on rustls's unbuffered API: the connection owns its buffers and keeps none while
//! idle.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB record buffer for the connection's life
//! once it has read anything, a quarter of what an idle device connection costs. Here the
//! ciphertext read from the socket, the plaintext not yet taken by the reader and the records
//! not yet written are `Vec`s that are freed as soon as they are empty, so an idle connection
//! holds rustls's state and nothing else (BENCHMARKS.md, issue 12).
//!
//! The ClientHello is parsed by a throwaway [`rustls::server::Acceptor`] so that the server
//! name can choose the configuration (the account, its CA mode and TLS policy); the bytes read
//! are kept and replayed into the [`UnbufferedServerConnection`] built with that configuration.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::{Acceptor, ClientHello, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The largest TLS record on the wire (16 KiB of plaintext, with the expansion TLS 1.2 allows),
/// and so the most ciphertext held while a record is incomplete.
const MAX_RECORD: usize = 5 + 16_384 + 2_048;
/// Handshake messages may span records; rustls accepts up to 64 KiB of them.
const MAX_HANDSHAKE_BUFFER: usize = 0xffff + MAX_RECORD;
/// Room made before each read from the socket.
const READ_SIZE: usize = 8_192;
/// The most read from the socket at once.
const MAX_READ: usize = 16_384;
/// Plaintext taken by one `poll_write`: the rest waits for the next call.
const WRITE_CHUNK: usize = 16 * 1024;
/// Encrypted bytes queued before `poll_write` waits for the socket (rustls's buffered
/// connection allows 64 KiB).
const WRITE_QUEUE: usize = 64 * 1024;

/// A server-side TLS stream over TCP (see the module documentation). One task drives both its
/// reads and its writes (as every user here does: the MQTT driver, hyper, the WebSocket layer).
pub struct TlsIo {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext read, processed up to `at` (compacted before the next read).
    incoming: Vec<u8>,
    at: usize,
    /// Decrypted application data not yet read, from `plain_at`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Records to write, from `sent`.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer closed (close_notify or end of stream): reads end once `plain` is read.
    eof: bool,
    /// close_notify queued.
    closing: bool,
    /// A TLS error ended the connection: only the alert rustls queued for it may still go out.
    failed: bool,
}

impl std::fmt::Debug for TlsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIo")
            .field("incoming", &(self.incoming.len() - self.at))
            .field("plain", &(self.plain.len() - self.plain_at))
            .field("outgoing", &(self.outgoing.len() - self.sent))
            .field("eof", &self.eof)
            .field("failed", &self.failed)
            .finish()
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Appends what `put` writes to `out`, growing it to the size `put` asks for.
fn append<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut put: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    let mut room = guess;
    loop {
        out.resize(start + room, 0);
        match put(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match needs(&e) {
                Some(required) if required > room => room = required,
                _ => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

/// Buffers a connection gave back, kept for the next one that needs one on this thread: a
/// busy connection frees its buffers as soon as they are empty (so an idle one keeps none),
/// and allocating 8 KiB and more anew for every read and write costs the allocator more than
/// the rest of the TLS layer (`malloc_consolidate` in profiles of QoS 1 floods).
mod pool {
    use std::cell::RefCell;

    /// Most buffers kept per thread, and the largest kept.
    const KEEP: usize = 32;
    const LARGEST: usize = 128 * 1024;

    /// Buffers of reads and of writes are kept apart: a write queue is sized for 80 KiB, a
    /// read for one or two records, and neither should take the other's.
    #[derive(Clone, Copy)]
    pub(super) enum Kind {
        Read = 0,
        Write = 1,
    }

    thread_local! {
        static POOL: RefCell<[Vec<Vec<u8>>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
    }

    /// An empty buffer with room for at least `room` bytes.
    pub(super) fn take(kind: Kind, room: usize) -> Vec<u8> {
        let mut v = POOL
            .try_with(|p| p.borrow_mut()[kind as usize].pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        v.reserve(room);
        v
    }

    /// Gives `v` back (emptied), or frees it.
    pub(super) fn give(kind: Kind, mut v: Vec<u8>) {
        if v.capacity() == 0 || v.capacity() > LARGEST {
            return;
        }
        v.clear();
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p[kind as usize].len() < KEEP {
                p[kind as usize].push(v);
            }
        });
    }
}

/// What one pass over the received records left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// More bytes from the peer are needed.
    Read,
    /// The connection may send application data (and did, if it was given some).
    Write,
}

/// What to do once rustls may send application data.
type WriteFn<'a> = &'a mut dyn FnMut(
    &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
    &mut Vec<u8>,
) -> Result<(), EncryptError>;

/// Accepts a TLS connection: reads the ClientHello, asks `choose` for the configuration (None
/// refuses the connection silently), and completes the handshake. The caller bounds it in time.
pub async fn accept(
    mut tcp: TcpStream,
    choose: impl FnOnce(&ClientHello<'_>) -> Option<Arc<ServerConfig>>,
) -> io::Result<TlsIo> {
    use tokio::io::AsyncReadExt;
    let mut incoming = Vec::new();
    let mut acceptor = Acceptor::default();
    let mut fed = 0;
    let config = loop {
        if incoming.len() >= MAX_HANDSHAKE_BUFFER {
            return Err(invalid("ClientHello too large"));
        }
        incoming.reserve(READ_SIZE);
        if tcp.read_buf(&mut incoming).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        while fed < incoming.len() {
            match acceptor.read_tls(&mut &incoming[fed..])? {
                0 => break,
                n => fed += n,
            }
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => match choose(&accepted.client_hello()) {
                Some(config) => break config,
                None => return Err(io::ErrorKind::ConnectionRefused.into()),
            },
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = tcp.write_all(&out).await;
                return Err(invalid(e));
            }
        }
    };
    drop(acceptor);
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut io = TlsIo {
        tcp,
        conn,
        incoming,
        at: 0,
        plain: Vec::new(),
        plain_at: 0,
        outgoing: Vec::new(),
        sent: 0,
        eof: false,
        closing: false,
        failed: false,
    };
    loop {
        // On failure the alert rustls queued, if any, is in `outgoing` and reaches the peer.
        let next = io.pump(None);
        let sent = io.tcp.write_all(&io.outgoing[io.sent..]).await;
        io.outgoing = Vec::new();
        io.sent = 0;
        let next = next?;
        sent?;
        if !io.conn.is_handshaking() && next == Next::Write {
            // What the handshake grew (a large certificate chain) is not kept.
            io.compact();
            return Ok(io);
        }
        if io.eof {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        io.compact();
        if io.incoming.len() >= MAX_HANDSHAKE_BUFFER {
            return Err(invalid("handshake message too large"));
        }
        io.incoming.reserve(READ_SIZE);
        if io.tcp.read_buf(&mut io.incoming).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

impl TlsIo {
    /// The peer's certificate chain, if it presented one.
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// The application protocol the handshake agreed on (ALPN), if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Bytes of buffer the connection holds besides rustls's own state: none while idle.
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// Drops the processed prefix of `incoming`, and the buffer itself once it holds nothing;
    /// a buffer much larger than what it holds (after a large handshake) is shrunk.
    fn compact(&mut self) {
        if self.at >= self.incoming.len() {
            pool::give(pool::Kind::Read, std::mem::take(&mut self.incoming));
        } else if self.at > 0 {
            self.incoming.drain(..self.at);
        }
        self.at = 0;
        if self.incoming.capacity() > self.incoming.len() + 2 * READ_SIZE {
            self.incoming.shrink_to(self.incoming.len() + READ_SIZE);
        }
    }

    /// Processes the records received so far: application data goes to `plain`, the records
    /// rustls has to send go to `outgoing` (written by the caller, in order, before anything
    /// encrypted after them). With `write`, stops once it has run, when rustls may send
    /// application data. On an error, the connection has failed and `outgoing` ends with the
    /// alert rustls queued for it, if any.
    fn pump(&mut self, write: Option<WriteFn<'_>>) -> io::Result<Next> {
        self.pump_into(write, None)
    }

    /// [`TlsIo::pump`], with application data copied into `sink` first while it has room.
    fn pump_into(
        &mut self,
        mut write: Option<WriteFn<'_>>,
        mut sink: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<Next> {
        if self.failed {
            return Err(invalid("the TLS connection has failed"));
        }
        let result = loop {
            let status = self.conn.process_tls_records(&mut self.incoming[self.at..]);
            let mut used = status.discard;
            let step = match status.state {
                Err(e) => Err(invalid(e)),
                Ok(ConnectionState::ReadTraffic(mut records)) => loop {
                    match records.next_record() {
                        None => break Ok(None),
                        Some(Err(e)) => break Err(invalid(e)),
                        Some(Ok(record)) => {
                            used += record.discard;
                            let mut data = record.payload;
                            if self.plain.is_empty()
                                && let Some(sink) = sink.as_deref_mut()
                            {
                                let n = sink.remaining().min(data.len());
                                sink.put_slice(&data[..n]);
                                data = &data[n..];
                            }
                            if !data.is_empty() {
                                if self.plain.capacity() == 0 {
                                    self.plain = pool::take(pool::Kind::Read, data.len());
                                }
                                self.plain.extend_from_slice(data);
                            }
                        }
                    }
                },
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    append(&mut self.outgoing, 512, |b| data.encode(b), encode_needs)
                        .map(|()| None)
                        .map_err(invalid)
                }
                // Written by the caller before anything encrypted after it.
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    Ok(None)
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.eof = true;
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => {
                    self.eof = true;
                    match write {
                        Some(_) => Err(io::ErrorKind::BrokenPipe.into()),
                        None => Ok(Some(Next::Read)),
                    }
                }
                Ok(ConnectionState::BlockedHandshake) => match write {
                    Some(_) => Err(invalid("cannot send before the handshake completes")),
                    None => Ok(Some(Next::Read)),
                },
                Ok(ConnectionState::WriteTraffic(mut w)) => match write.take() {
                    Some(f) => f(&mut w, &mut self.outgoing)
                        .map(|()| Some(Next::Write))
                        .map_err(invalid),
                    None => Ok(Some(Next::Write)),
                },
                // Early data is not enabled; nothing else is expected.
                Ok(_) => Err(invalid("unexpected TLS state")),
            };
            // Discarded before anything else, as rustls requires, errors included.
            self.at += used;
            match step {
                Ok(None) => continue,
                Ok(Some(next)) => break Ok(next),
                Err(e) => break Err(e),
            }
        };
        if self.at >= self.incoming.len() {
            pool::give(pool::Kind::Read, std::mem::take(&mut self.incoming));
            self.at = 0;
        }
        if result.is_err() {
            self.failed = true;
            self.queue_alert();
        }
        result
    }

    /// Queues the alert rustls prepared after a failure, if any.
    fn queue_alert(&mut self) {
        if let Ok(ConnectionState::EncodeTlsData(mut data)) = self
            .conn
            .process_tls_records(&mut self.incoming[self.at..])
            .state
        {
            let _ = append(&mut self.outgoing, 64, |b| data.encode(b), encode_needs);
        }
    }

    /// Writes the queued records; the buffer is freed once they are all written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            match ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        pool::give(pool::Kind::Write, std::mem::take(&mut self.outgoing));
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_at);
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    pool::give(pool::Kind::Read, std::mem::take(&mut this.plain));
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(invalid("the TLS connection has failed")));
            }
            if this.eof {
                // Nothing after the end is kept.
                this.incoming = Vec::new();
                this.at = 0;
                return Poll::Ready(Ok(()));
            }
            this.compact();
            if this.incoming.len() >= MAX_RECORD {
                return Poll::Ready(Err(invalid("TLS record too large")));
            }
            if this.incoming.capacity() == 0 {
                this.incoming = pool::take(pool::Kind::Read, READ_SIZE);
            } else if this.incoming.capacity() - this.incoming.len() < READ_SIZE {
                this.incoming.reserve_exact(READ_SIZE);
            }
            // At most MAX_READ at once, whatever room a reused buffer has: what the reader
            // cannot take yet waits in `plain`, and that stays small.
            let offered = (this.incoming.capacity() - this.incoming.len()).min(MAX_READ);
            let mut got = 0;
            // A read shorter than the room offered drained the socket: its readiness is
            // forgotten at once (as a `WouldBlock` would), which saves the next read, one that
            // could only answer EAGAIN. The reactor forgets it only if no event arrived since
            // the read began, so data that came meanwhile is not missed.
            let read = this.tcp.try_io(Interest::READABLE, || {
                got = this
                    .tcp
                    .try_read_buf(&mut bytes::BufMut::limit(&mut this.incoming, MAX_READ))?;
                if got > 0 && got < offered {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match read {
                Ok(()) if got == 0 => {
                    this.eof = true;
                    continue;
                }
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if this.incoming.is_empty() {
                        pool::give(pool::Kind::Read, std::mem::take(&mut this.incoming));
                    }
                    match this.tcp.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
            // rustls holds what it answers to received records (a key update) until the
            // next write. Application data goes straight into the reader's buffer.
            let before = buf.filled().len();
            let pumped = this.pump_into(None, Some(buf));
            if buf.filled().len() > before {
                // What was decrypted before a failure is read first; the failure (kept in
                // `failed`) ends the next read.
                return Poll::Ready(Ok(()));
            }
            pumped?;
        }
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What is queued is bounded by its length, sent or not: the buffer is reused only
        // once all of it is written.
        if this.outgoing.len() >= WRITE_QUEUE {
            ready!(this.poll_send(cx))?;
        }
        let data = &data[..data.len().min(WRITE_CHUNK)];
        let guess = data.len() + 64;
        // Room for all that is queued before waiting (the queue grows by copying only when a
        // key update's answer started it small).
        let room = WRITE_QUEUE + WRITE_CHUNK + 1024;
        if this.outgoing.capacity() == 0 {
            this.outgoing = pool::take(pool::Kind::Write, room);
        } else if this.outgoing.capacity() < room {
            this.outgoing.reserve(room - this.outgoing.len());
        }
        this.pump(Some(&mut |w, out| {
            append(out, guess, |b| w.encrypt(data, b), encrypt_needs)
        }))?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            // Best effort, and not after a failure (its alert is queued already): a
            // connection that cannot send any more is closed all the same.
            if !this.failed {
                let _ = this.pump(Some(&mut |w, out| {
                    append(out, 64, |b| w.queue_close_notify(b), encrypt_needs)
                }));
            }
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
