//! Connections before they may start a sync: TLS, the key proofs and HELLO, each connection in a task of its own
//! under the handshake timeout, and a bounded number of them at a time.
//!
//! Nothing here touches the target, the status file or the sync metrics: a connection that has not proved the key
//! and said who it is (HELLO) is only logged and counted (`blockmover_rejected_connections_total{reason}`), whatever
//! it sends, however many there are. Only an [`Arrival`] (authenticated, with its HELLO) reaches the serve loop.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::codec::Offer;
use crate::codec::{AbortCode, Message};
use crate::error::{Error, Result};
use crate::metrics::{Metrics, Rejection};
use crate::net::{abort_on_error, authenticated, within, Halves, Timeouts};
use crate::stats::Figures;
use crate::tls::{self, Psk, Side};

/// Handshakes in flight at most. A connection beyond it drops the oldest unfinished one: a flood of idle
/// connections can then delay a source, never exhaust the process's file descriptors or memory, and a real source
/// (whose handshake takes milliseconds) gets through unless this many newer connections arrive meanwhile.
pub const MAX_HANDSHAKES: usize = 64;

/// Pause after an accept error that more connections cannot cure at once (no descriptor or memory left).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The framed halves of an authenticated source connection.
pub type Session = Halves<tokio_rustls::server::TlsStream<crate::net::Socket<TcpStream>>>;

/// What a source says about itself in HELLO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// `namespace/name` of the source.
    pub source: String,
    /// The kind of sync it offers, and its base.
    pub offer: Offer,
}

impl Hello {
    /// Whether a connection saying `other` is the same source as this one, retrying: a new connection from it
    /// supersedes this one's sync. (Its offer may differ: a retry after a lost COMMIT offers the same base, one
    /// after `--verify full` none.)
    pub fn same_source(&self, other: &Hello) -> bool {
        (
            self.volume_size,
            self.chunk_size,
            self.block_size,
            &self.source,
        ) == (
            other.volume_size,
            other.chunk_size,
            other.block_size,
            &other.source,
        )
    }
}

/// A connection that proved the key and said HELLO: it may start (or supersede) a sync.
pub struct Arrival {
    /// The peer's address.
    pub peer: SocketAddr,
    /// Bytes on the wire from the first byte of TLS.
    pub figures: Arc<Figures>,
    /// When it connected.
    pub started: Instant,
    /// Its HELLO.
    pub hello: Hello,
    /// The framed connection.
    pub session: Session,
}

/// The handshakes in flight, oldest first.
pub struct Handshakes {
    acceptor: tls::TlsAcceptor,
    psk: Psk,
    timeouts: Timeouts,
    metrics: Option<Arc<Metrics>>,
    arrived: mpsc::Sender<Arrival>,
    tasks: VecDeque<tokio::task::JoinHandle<()>>,
}

impl Handshakes {
    /// Handshakes that hand their arrivals to `arrived`.
    pub fn new(
        psk: Psk,
        timeouts: Timeouts,
        metrics: Option<Arc<Metrics>>,
        arrived: mpsc::Sender<Arrival>,
    ) -> Result<Self> {
        Ok(Handshakes {
            acceptor: tls::acceptor()?,
            psk,
            timeouts,
            metrics,
            arrived,
            tasks: VecDeque::new(),
        })
    }

    /// Starts the handshake of an accepted connection, making room first if [`MAX_HANDSHAKES`] are in flight.
    pub fn start(&mut self, tcp: TcpStream, peer: SocketAddr) {
        self.tasks.retain(|t| !t.is_finished());
        if self.tasks.len() >= MAX_HANDSHAKES {
            self.drop_oldest("too many handshakes in flight");
        }
        let (acceptor, psk, t, tx) = (
            self.acceptor.clone(),
            self.psk.clone(),
            self.timeouts,
            self.arrived.clone(),
        );
        let metrics = self.metrics.clone();
        self.tasks.push_back(tokio::spawn(async move {
            let figures = Arc::new(Figures::default());
            let started = Instant::now();
            match handshake(&acceptor, tcp, &psk, t, &figures).await {
                Ok((hello, session)) => {
                    let arrival = Arrival {
                        peer,
                        figures,
                        started,
                        hello,
                        session,
                    };
                    let _ = tx.send(arrival).await;
                }
                Err(e) => {
                    let why = rejection(&e);
                    tracing::warn!(%peer, reason = why.as_str(), "connection dropped before authentication: {e}");
                    if let Some(m) = &metrics {
                        m.rejected(why);
                    }
                }
            }
        }));
    }

    /// Handles an accept error: a shortage (descriptors, memory) or a connection that died in the backlog is
    /// logged, makes room by dropping the oldest handshake, and waits a moment; the listener stays. Anything
    /// else is returned.
    pub async fn accept_failed(&mut self, e: io::Error) -> Result<()> {
        if !transient(&e) {
            return Err(Error::net("accept", e));
        }
        tracing::warn!("accept failed, listening on: {e}");
        self.tasks.retain(|t| !t.is_finished());
        self.drop_oldest("no file descriptor or memory left");
        tokio::time::sleep(ACCEPT_BACKOFF).await;
        Ok(())
    }

    fn drop_oldest(&mut self, why: &str) {
        if let Some(oldest) = self.tasks.pop_front() {
            oldest.abort();
            tracing::warn!("dropped the oldest unfinished handshake: {why}");
            if let Some(m) = &self.metrics {
                m.rejected(Rejection::Overload);
            }
        }
    }
}

impl Drop for Handshakes {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Accept errors that say nothing about the listener: no descriptor, no memory, or a connection reset while it
/// waited in the backlog.
fn transient(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let Some(code) = e.raw_os_error() else {
        return false;
    };
    [
        Errno::MFILE,
        Errno::NFILE,
        Errno::NOMEM,
        Errno::NOBUFS,
        Errno::CONNABORTED,
        Errno::CONNRESET,
        Errno::PROTO,
        Errno::PERM,
        Errno::INTR,
        Errno::AGAIN,
    ]
    .iter()
    .any(|errno| errno.raw_os_error() == code)
}

fn rejection(e: &Error) -> Rejection {
    match e {
        Error::KeysDoNotMatch(_) => Rejection::Auth,
        Error::Timeout { .. } => Rejection::Timeout,
        _ => Rejection::Handshake,
    }
}

/// TLS handshake, PSK exchange and HELLO of one connection, bytes counted from the first.
async fn handshake(
    acceptor: &tls::TlsAcceptor,
    tcp: TcpStream,
    psk: &Psk,
    t: Timeouts,
    figures: &Figures,
) -> Result<(Hello, Session)> {
    let _ = tcp.set_nodelay(true);
    let stream = crate::net::socket(tcp, figures.wire.clone());
    let tls = within("tls handshake", t.handshake, async {
        acceptor
            .accept(stream)
            .await
            .map_err(|e| Error::net("tls handshake", e))
    })
    .await?;
    let exporter = tls::server_exporter(&tls)?;
    let (mut reader, mut writer) =
        authenticated(tls, exporter, psk, Side::Destination, t.handshake).await?;
    let hello = within("hello", t.handshake, reader.expect("hello")).await;
    match abort_on_error(&mut writer, hello).await? {
        Message::Hello {
            volume_size,
            chunk_size,
            block_size,
            source,
            offer,
        } => {
            let hello = Hello {
                volume_size,
                chunk_size,
                block_size,
                source,
                offer,
            };
            Ok((hello, (reader, writer)))
        }
        Message::Abort { code, message } => Err(Error::PeerAbort { code, message }),
        other => {
            let e = Error::Protocol(format!("expected HELLO, received {}", other.name()));
            abort_on_error(&mut writer, Err(e)).await
        }
    }
}

/// Turns away an authenticated source while another one's sync runs: ABORT `Busy`, which the source reports as
/// retryable, then close. Runs on its own, so a source that does not read cannot hold the serve loop.
pub fn refuse_busy(arrival: Arrival, busy_with: &str, since: Instant, limit: Duration) {
    let Arrival {
        peer,
        hello,
        session: (_reader, mut writer),
        ..
    } = arrival;
    let message = format!(
        "busy with another source ({busy_with}, syncing for {:.0}s): retry later",
        since.elapsed().as_secs_f64()
    );
    tracing::warn!(%peer, source = %hello.source, "connection refused: {message}");
    tokio::spawn(async move {
        let abort = Message::Abort {
            code: AbortCode::Busy,
            message,
        };
        let _ = within("send", limit, async {
            writer.send(&abort).await?;
            writer.shutdown().await
        })
        .await;
    });
}
