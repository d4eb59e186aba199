//! Sockets: byte counting at the TCP level, phase timeouts, and the PSK authentication exchange.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::codec::{AbortCode, FrameReader, FrameWriter, Message};
use crate::error::{Error, Result};
use crate::ratelimit::Bucket;
use crate::tls::{Psk, Side};

/// Limits of the network phases.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// TLS handshake, authentication and HELLO/READY, each.
    pub handshake: Duration,
    /// Longest silence from the peer once the session runs.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            handshake: Duration::from_secs(30),
            idle: Duration::from_secs(600),
        }
    }
}

/// Runs `fut` with a limit; the error names the phase.
pub async fn within<T>(
    phase: &'static str,
    limit: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| Error::Timeout {
            phase,
            after: limit,
        })?
}

/// How long a failing session waits to deliver its ABORT.
pub const ABORT_GRACE: Duration = Duration::from_secs(5);

/// Bytes that crossed the socket in each direction: the "bytes on the wire", TLS records included.
#[derive(Debug, Default)]
pub struct WireCounters {
    /// Bytes written to the socket.
    pub sent: AtomicU64,
    /// Bytes read from the socket.
    pub received: AtomicU64,
}

/// Read-ahead under TLS. rustls asks its transport for 4 KiB at a time: straight on the socket that is one
/// `recv` per 4 KiB (a third of the destination's CPU on a full sync went to them); through this buffer it is one
/// per 256 KiB, at the cost of one memory copy.
pub const SOCKET_READ_AHEAD: usize = 256 * 1024;

/// The socket as TLS sees it: counted, and read ahead in [`SOCKET_READ_AHEAD`] bytes.
pub type Socket<S> = tokio::io::BufReader<Counted<S>>;

/// Wraps a connected socket for TLS: see [`Socket`].
pub fn socket<S: AsyncRead + Unpin>(inner: S, counters: Arc<WireCounters>) -> Socket<S> {
    socket_limited(inner, counters, None)
}

/// [`socket`], writing at most `rate` bytes per second when given (`source --bwlimit`).
pub fn socket_limited<S: AsyncRead + Unpin>(
    inner: S,
    counters: Arc<WireCounters>,
    rate: Option<u64>,
) -> Socket<S> {
    let mut counted = Counted::new(inner, counters);
    counted.limit = rate.map(|r| Limit {
        bucket: Bucket::new(r),
        sleep: None,
    });
    tokio::io::BufReader::with_capacity(SOCKET_READ_AHEAD, counted)
}

/// A stream that counts the bytes read and written through it, and may limit the rate it writes at.
pub struct Counted<S> {
    inner: S,
    counters: Arc<WireCounters>,
    limit: Option<Limit>,
}

/// A write rate limit and the timer a write waits on for tokens.
struct Limit {
    bucket: Bucket,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Limit {
    /// How many of `want` bytes may be written now; pending (with the timer armed) until any may.
    fn poll_allowed(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<usize> {
        loop {
            if let Some(sleep) = &mut self.sleep {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            match self.bucket.take(want, std::time::Instant::now()) {
                Ok(n) => return Poll::Ready(n),
                Err(wait) => self.sleep = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
    }
}

impl<S> Counted<S> {
    /// Wraps `inner`, adding to `counters`.
    pub fn new(inner: S, counters: Arc<WireCounters>) -> Self {
        Counted {
            inner,
            counters,
            limit: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counters.received.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let allowed = match &mut this.limit {
            Some(limit) if !buf.is_empty() => match limit.poll_allowed(cx, buf.len()) {
                Poll::Ready(n) => n,
                Poll::Pending => return Poll::Pending,
            },
            _ => buf.len(),
        };
        let r = Pin::new(&mut this.inner).poll_write(cx, &buf[..allowed]);
        if let Poll::Ready(Ok(n)) = &r {
            this.counters.sent.fetch_add(*n as u64, Ordering::Relaxed);
            if let Some(limit) = &mut this.limit {
                limit.bucket.spend(*n);
            }
        }
        r
    }

    /// rustls hands its queued TLS records over as one vectored write; without this, each record would be a
    /// `send` of its own.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.limit.is_some() {
            // Limited: one slice at a time, as much of it as the bucket allows.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, first);
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether the peer should be told about this error with an ABORT (it cannot be when the link itself failed, and
/// need not be when the peer is the one that aborted).
pub fn tell_peer(e: &Error) -> bool {
    !matches!(
        e,
        Error::PeerAbort { .. } | Error::PeerClosed(_) | Error::Net { .. } | Error::Timeout { .. }
    )
}

/// Passes `result` through; on an error the peer should know about, sends it an ABORT first (best effort).
pub async fn abort_on_error<W: AsyncWrite + Unpin, T>(
    writer: &mut FrameWriter<W>,
    result: Result<T>,
) -> Result<T> {
    if let Err(e) = &result {
        if tell_peer(e) {
            let _ = writer
                .send(&Message::Abort {
                    code: e.abort_code(),
                    message: e.to_string(),
                })
                .await;
        }
    }
    result
}

/// The framed halves of an authenticated session.
pub type Halves<S> = (
    FrameReader<tokio::io::ReadHalf<S>>,
    FrameWriter<tokio::io::WriteHalf<S>>,
);

/// Splits an established TLS stream into framed halves and runs the PSK exchange on them.
pub async fn authenticated<S: AsyncRead + AsyncWrite>(
    tls: S,
    exporter: [u8; 32],
    psk: &Psk,
    side: Side,
    limit: Duration,
) -> Result<Halves<S>> {
    let (r, w) = tokio::io::split(tls);
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
    authenticate(&mut reader, &mut writer, psk, side, &exporter, limit).await?;
    Ok((reader, writer))
}

/// Exchanges PSK proofs: sends ours, checks the peer's. Fails with "keys do not match" on a wrong key.
pub async fn authenticate<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    psk: &Psk,
    side: Side,
    exporter: &[u8; 32],
    limit: Duration,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    within("authentication", limit, async {
        writer
            .send(&Message::Auth {
                proof: psk.proof(side, exporter),
            })
            .await?;
        let msg = reader.expect("authentication").await;
        match abort_on_error(writer, msg).await? {
            Message::Auth { proof } if psk.verify(side.peer(), exporter, &proof) => Ok(()),
            Message::Auth { .. } => {
                let reason = "the peer's proof does not verify with our key".to_owned();
                let _ = writer
                    .send(&Message::Abort {
                        code: AbortCode::Auth,
                        message: "pre-shared keys do not match".into(),
                    })
                    .await;
                Err(Error::KeysDoNotMatch(reason))
            }
            Message::Abort {
                code: AbortCode::Auth,
                ..
            } => Err(Error::KeysDoNotMatch(
                "the peer rejected our proof".to_owned(),
            )),
            Message::Abort { code, message } => Err(Error::PeerAbort { code, message }),
            other => Err(Error::Protocol(format!(
                "expected AUTH, received {}",
                other.name()
            ))),
        }
    })
    .await
}

/// Frames queued for the peer; the capacity bounds what waits for the socket.
pub type Outbox = tokio::sync::mpsc::Sender<Message>;

/// `future`'s output if it is ready at its first poll, else `None` (the future is dropped: only for cancel-safe
/// ones, such as a `FrameReader` read). For taking what a socket read already brought without waiting for more.
pub fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Starts the task that owns the write half: it sends queued messages, batching what is queued together, and
/// hands the writer back when every [`Outbox`] is dropped, so the caller can close the stream.
///
/// A peer that is alive but does not read (a paused process or VM: its TCP window stays at zero) would block a
/// write forever, and with it every task feeding the outbox. Each write must therefore complete within `stall`
/// (the idle timeout): otherwise the task ends with a "send" timeout, dropping the outbox's receiver so that every
/// sender fails at once instead of waiting.
pub fn spawn_writer<W>(
    mut writer: FrameWriter<W>,
    capacity: usize,
    stall: Duration,
) -> (Outbox, tokio::task::JoinHandle<Result<FrameWriter<W>>>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(capacity);
    let task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            within("send", stall, writer.queue(&msg)).await?;
            while let Ok(msg) = rx.try_recv() {
                within("send", stall, writer.queue(&msg)).await?;
            }
            within("send", stall, writer.flush()).await?;
        }
        Ok(writer)
    });
    (tx, task)
}

/// How long a side that gave up (its ABORT sent) keeps reading what its peer still sends before it closes.
pub const LINGER: Duration = Duration::from_secs(2);

/// Closes a failed session so that the peer reads our ABORT: TLS close_notify and TCP FIN, then whatever the peer
/// still sends is read and dropped until it closes too, for at most [`LINGER`]. Closing a socket with unread data
/// makes the kernel send a reset, and a peer that receives one may lose the ABORT still in its receive queue:
/// it would then report a vanished peer instead of the reason.
pub async fn linger_close<R, W>(reader: &mut FrameReader<R>, mut writer: FrameWriter<W>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + LINGER;
    let _ = tokio::time::timeout_at(deadline, writer.shutdown()).await;
    // Bytes, not frames: the session may have stopped reading in the middle of a frame.
    let mut sink = vec![0u8; 64 * 1024];
    let stream = reader.get_mut();
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// Waits for the writer task to drain (after every [`Outbox`] is dropped) and returns the writer; a peer that stops
/// reading cannot hold us: after `limit` the task is aborted and the phase named "send" times out.
pub async fn finish_writer<W>(
    task: tokio::task::JoinHandle<Result<FrameWriter<W>>>,
    limit: Duration,
) -> Result<FrameWriter<W>> {
    let abort = task.abort_handle();
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(Error::Protocol(format!("writer task failed: {e}"))),
        Err(_) => {
            abort.abort();
            Err(Error::Timeout {
                phase: "send",
                after: limit,
            })
        }
    }
}
