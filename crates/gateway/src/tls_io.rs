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
use std::task::{Context, Poll, Waker, ready};

use rustls::ServerConfig;
use rustls::server::{Acceptor, ClientHello, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The largest TLS record on the wire (16 KiB of plaintext, with the expansion TLS 1.2 allows),
/// and so the most ciphertext held while a record is incomplete.
const MAX_RECORD: usize = 5 + 16_384 + 2_048;
/// Handshake messages may span records; rustls accepts up to 64 KiB of them.
const MAX_HANDSHAKE_BUFFER: usize = 0xffff + MAX_RECORD;
/// Room made before each read from the socket.
const READ_SIZE: usize = 8_192;
/// Plaintext taken by one `poll_write`: the rest waits for the next call.
const WRITE_CHUNK: usize = 64 * 1024;
/// Encrypted bytes queued before `poll_write` waits for the socket.
const WRITE_QUEUE: usize = 256 * 1024;

/// A server-side TLS stream over TCP (see the module documentation).
pub struct TlsIo {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet processed (a partial record, mostly).
    incoming: Vec<u8>,
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
    /// The reader waiting on the socket, woken when the writer's processing found plaintext.
    reader: Option<Waker>,
}

impl std::fmt::Debug for TlsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIo")
            .field("incoming", &self.incoming.len())
            .field("plain", &(self.plain.len() - self.plain_at))
            .field("outgoing", &(self.outgoing.len() - self.sent))
            .field("eof", &self.eof)
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

/// Removes `n` processed bytes from the front of `buf`, freeing it once empty.
fn discard(buf: &mut Vec<u8>, n: usize) {
    if n == 0 {
        return;
    }
    if n >= buf.len() {
        *buf = Vec::new();
    } else {
        buf.drain(..n);
    }
}

/// What one pass over the received records left to do.
enum Next {
    /// More bytes from the peer are needed.
    Read,
    /// The connection may send application data.
    Write,
}

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
        plain: Vec::new(),
        plain_at: 0,
        outgoing: Vec::new(),
        sent: 0,
        eof: false,
        closing: false,
        reader: None,
    };
    loop {
        let next = match io.process() {
            Ok(next) => next,
            Err(e) => {
                // The alert rustls queued for the failure, if any, reaches the peer.
                let _ = io.send_alert().await;
                return Err(e);
            }
        };
        io.tcp.write_all(&io.outgoing[io.sent..]).await?;
        io.outgoing = Vec::new();
        io.sent = 0;
        if !io.conn.is_handshaking() && matches!(next, Next::Write) {
            return Ok(io);
        }
        if io.eof {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
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

    /// Bytes of buffer the connection holds besides rustls's own state: none while idle.
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// Processes the records received so far: application data goes to `plain`, the records
    /// rustls has to send go to `outgoing` (written by the caller, in order).
    fn process(&mut self) -> io::Result<Next> {
        let next = loop {
            let status = self.conn.process_tls_records(&mut self.incoming);
            let mut used = status.discard;
            let state = status.state.map_err(invalid)?;
            let next = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(invalid)?;
                        used += record.discard;
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    append(&mut self.outgoing, 512, |b| data.encode(b), encode_needs)
                        .map_err(invalid)?;
                    None
                }
                // Written by the caller before anything encrypted after it.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.eof = true;
                    None
                }
                ConnectionState::Closed => {
                    self.eof = true;
                    Some(Next::Read)
                }
                ConnectionState::BlockedHandshake => Some(Next::Read),
                ConnectionState::WriteTraffic(_) => Some(Next::Write),
                // Early data is not enabled; nothing else is expected.
                _ => return Err(invalid("unexpected TLS state")),
            };
            discard(&mut self.incoming, used);
            if let Some(next) = next {
                break next;
            }
        };
        Ok(next)
    }

    /// Writes the alert rustls queued after a failure, if any.
    async fn send_alert(&mut self) -> io::Result<()> {
        let mut out = std::mem::take(&mut self.outgoing);
        if let Ok(ConnectionState::EncodeTlsData(mut data)) =
            self.conn.process_tls_records(&mut self.incoming).state
        {
            let _ = append(&mut out, 64, |b| data.encode(b), encode_needs);
        }
        self.tcp.write_all(&out[self.sent.min(out.len())..]).await
    }

    /// Encrypts `data` after whatever is queued; `data` must be at most [`WRITE_CHUNK`].
    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        let guess = data.len() + 64 * (1 + data.len() / 16_384);
        self.with_write(|w, out| append(out, guess, |b| w.encrypt(data, b), encrypt_needs))
    }

    /// Runs `f` once rustls may send application data (after it has processed what was
    /// received and queued what it has to send), with the queue of records to write.
    fn with_write(
        &mut self,
        f: impl FnOnce(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut Vec<u8>,
        ) -> Result<(), EncryptError>,
    ) -> io::Result<()> {
        let mut f = Some(f);
        loop {
            let status = self.conn.process_tls_records(&mut self.incoming);
            let mut used = status.discard;
            let had_plain = self.plain.len() > self.plain_at;
            let done = match status.state.map_err(invalid)? {
                ConnectionState::WriteTraffic(mut w) => {
                    if let Some(f) = f.take() {
                        f(&mut w, &mut self.outgoing).map_err(invalid)?;
                    }
                    true
                }
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(invalid)?;
                        used += record.discard;
                        self.plain.extend_from_slice(record.payload);
                    }
                    false
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    append(&mut self.outgoing, 512, |b| e.encode(b), encode_needs)
                        .map_err(invalid)?;
                    false
                }
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    false
                }
                ConnectionState::PeerClosed => {
                    self.eof = true;
                    false
                }
                ConnectionState::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                _ => return Err(invalid("cannot send before the handshake completes")),
            };
            discard(&mut self.incoming, used);
            // A reader waiting on the socket learns of what was found here.
            if ((!had_plain && self.plain.len() > self.plain_at) || self.eof)
                && let Some(w) = self.reader.take()
            {
                w.wake();
            }
            if done {
                return Ok(());
            }
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
        self.outgoing = Vec::new();
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
                    this.plain = Vec::new();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.incoming.len() >= MAX_RECORD {
                return Poll::Ready(Err(invalid("TLS record too large")));
            }
            // What rustls answers to received records (key updates) waits behind the writes;
            // writes stop at WRITE_QUEUE, so a peer past twice that sends and never reads.
            if this.outgoing.len() - this.sent > 2 * WRITE_QUEUE {
                return Poll::Ready(Err(invalid("the peer does not read what it is sent")));
            }
            this.incoming.reserve(READ_SIZE);
            match this.tcp.try_read_buf(&mut this.incoming) {
                Ok(0) => {
                    this.eof = true;
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if this.incoming.is_empty() {
                        this.incoming = Vec::new();
                    }
                    match this.tcp.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            this.reader = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
            this.process()?;
            // Records rustls answers with (a key update) go out now, or with the next write.
            if this.sent < this.outgoing.len()
                && let Poll::Ready(Err(e)) = this.poll_send(cx)
            {
                return Poll::Ready(Err(e));
            }
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
        if this.outgoing.len() - this.sent >= WRITE_QUEUE {
            ready!(this.poll_send(cx))?;
        }
        let data = &data[..data.len().min(WRITE_CHUNK)];
        this.encrypt(data)?;
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
            // Best effort: a connection that cannot send any more is closed all the same.
            let _ = this
                .with_write(|w, out| append(out, 64, |b| w.queue_close_notify(b), encrypt_needs));
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
