//! The destination agent: accepts a source, checks its key, hashes the target and applies the changes.
//!
//! One session per accepted connection (one sync, or many with `--serve`). The target is opened only after the
//! source has proved it holds the key, so a wrong key never touches it. What is durable when the status says
//! Successful: every byte of `[0, volume_size)` of the target, fsynced, whose volume digest matched the source's.

mod apply;
mod flush;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::Instrument;

pub use apply::{decode_payload, ACK_EVERY};

use crate::chunk::{Digest, Geometry, BLOCK_SIZE};
use crate::codec::{FrameReader, Message};
use crate::error::{Error, Result};
use crate::net::{
    abort_on_error, authenticated, finish_writer, spawn_writer, tell_peer, within, Halves,
    Timeouts, ABORT_GRACE,
};
use crate::progress::Progress;
use crate::stats::Figures;
use crate::status::{Role, StatusFile};
use crate::tls::{self, Psk, Side};
use crate::volume::Volume;

/// Chunks the source may announce ahead of our ACKs (the READY window), by default.
pub const WINDOW: u32 = 8192;
/// The smallest window: one scan segment must fit in it.
pub const MIN_WINDOW: u32 = crate::scan::SEGMENT_CHUNKS as u32;
/// Messages waiting between the socket reader and the session worker.
const INBOX: usize = 64;

/// What the destination needs to run.
#[derive(Clone, Debug)]
pub struct DestinationConfig {
    /// Address to listen on.
    pub listen: String,
    /// The target: block device or file, at least as large as the volume.
    pub target: PathBuf,
    /// The pre-shared key.
    pub psk: Psk,
    /// Status file, if any.
    pub status: Option<PathBuf>,
    /// Keep serving syncs after the first.
    pub serve: bool,
    /// Network phase limits.
    pub timeouts: Timeouts,
    /// Chunks the source may announce beyond those settled ([`WINDOW`] unless testing flow control).
    pub window: u32,
    /// With `serve`: the schedule syncs are expected on (sets `nextSyncTime`; deadlines count in the metrics).
    pub schedule: Option<crate::schedule::Schedule>,
    /// Metrics to feed, if served.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Binds the listener (so the caller learns the address before any sync).
pub async fn bind(config: &DestinationConfig) -> Result<TcpListener> {
    TcpListener::bind(&config.listen)
        .await
        .map_err(|e| Error::net("listen", e))
}

/// The framed halves of an authenticated source connection.
type Session = Halves<tokio_rustls::server::TlsStream<crate::net::Socket<TcpStream>>>;

/// A connection that completed TLS and proved it holds the key, or one whose key did not match.
struct Arrival {
    peer: SocketAddr,
    figures: Arc<Figures>,
    started: Instant,
    session: Result<Session>,
}

/// Serves syncs on `listener`: one, or until the process ends with `serve`. Returns the last session's result.
///
/// Each connection does its TLS handshake and PSK exchange in a task of its own, under the handshake timeout, so
/// a client that sends nothing or garbage (a port scanner, a health check) is logged and dropped without
/// touching the target, the status or a sync under way. A source that proves the key starts a sync; one whose
/// proof does not verify fails the sync ("pre-shared keys do not match"): a wrong key is a configuration error
/// that waiting will not cure.
pub async fn serve(config: &DestinationConfig, listener: TcpListener) -> Result<Digest> {
    match serve_until(config, listener, std::future::pending()).await? {
        Served::Synced(d) => Ok(d),
        Served::Idle | Served::Interrupted(_) => Err(Error::Cancelled("stop")),
    }
}

/// How long a stop waits for a session under way to end by itself (one that has sent its COMMIT is closing).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How [`serve_until`] ended without an error.
#[derive(Debug)]
pub enum Served {
    /// A one-shot destination served its sync: the volume digest.
    Synced(Digest),
    /// Stopped while a `--serve` destination waited for a source: nothing was under way.
    Idle,
    /// Stopped (by what is named) during a sync, or before a one-shot destination served its sync.
    Interrupted(&'static str),
}

/// [`serve`] until `stop` resolves to the name of what stopped it (a signal).
pub async fn serve_until(
    config: &DestinationConfig,
    listener: TcpListener,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<Served> {
    tokio::pin!(stop);
    let acceptor = tls::acceptor()?;
    let local = listener
        .local_addr()
        .map_or_else(|_| config.listen.clone(), |a| a.to_string());
    let (arrived_tx, mut arrived) = mpsc::channel::<Arrival>(4);
    let config = Arc::new(config.clone());
    // Held by the session worker, the only writer of the target: a session waits for it before opening the target,
    // so a superseded session can never write behind its successor's back.
    let target_lock = Arc::new(tokio::sync::Mutex::new(()));
    let mut current: Option<Running> = None;
    loop {
        tokio::select! {
            signal = &mut stop => {
                // A session that is closing after its COMMIT (or about to) is given a moment to end as it would.
                let ended = match current.as_mut() {
                    Some(r) => tokio::time::timeout(STOP_GRACE, &mut r.task).await.ok(),
                    None => None,
                };
                return match ended {
                    // A one-shot destination's sync ended: its own outcome.
                    Some(Ok(result)) if !config.serve => result.map(Served::Synced),
                    // A serving destination's session ended (its status says how): nothing is under way.
                    Some(Ok(_)) => Ok(Served::Idle),
                    None if current.is_none() && config.serve => Ok(Served::Idle),
                    _ => Ok(Served::Interrupted(signal)),
                };
            }
            accepted = listener.accept() => {
                let (tcp, peer) = accepted.map_err(|e| Error::net("accept", e))?;
                let (acceptor, psk, t, tx) =
                    (acceptor.clone(), config.psk.clone(), config.timeouts, arrived_tx.clone());
                tokio::spawn(async move {
                    let figures = Arc::new(Figures::default());
                    let started = Instant::now();
                    let session = handshake(&acceptor, tcp, &psk, t, &figures).await;
                    match session {
                        Err(e) if !matches!(e, Error::KeysDoNotMatch(_)) => {
                            tracing::warn!(%peer, "connection dropped before authentication: {e}");
                        }
                        session => {
                            let _ = tx.send(Arrival { peer, figures, started, session }).await;
                        }
                    }
                });
            }
            Some(arrival) = arrived.recv() => {
                if let Some(running) = current.take() {
                    if arrival.session.is_err() {
                        // A wrong key must not end a sync under way: only a source that proved the key may.
                        tracing::warn!(peer = %arrival.peer, "connection refused during a sync: {}",
                            arrival.session.err().map(|e| e.to_string()).unwrap_or_default());
                        current = Some(running);
                        continue;
                    }
                    // The source retried: its previous connection is stale (frozen, or half-open after a
                    // partition). End that session, recording why, and serve the new one.
                    tracing::warn!(peer = %arrival.peer, "a new source connection supersedes the sync under way");
                    let _ = running.supersede.send(());
                    let _ = running.task.await;
                }
                let (supersede, superseded) = tokio::sync::oneshot::channel();
                let (config, lock, local) = (config.clone(), target_lock.clone(), local.clone());
                let task = tokio::spawn(async move {
                    session_with_status(&config, arrival, local, lock, superseded).await
                });
                current = Some(Running { task, supersede });
            }
            finished = async { current.as_mut().map(|r| &mut r.task).expect("guarded").await },
                if current.is_some() => {
                current = None;
                let result = finished
                    .unwrap_or_else(|e| Err(Error::Protocol(format!("session task failed: {e}"))));
                if !config.serve {
                    return result.map(Served::Synced);
                }
            }
        }
    }
}

/// The session under way, and how to end it when the source reconnects.
struct Running {
    task: tokio::task::JoinHandle<Result<Digest>>,
    supersede: tokio::sync::oneshot::Sender<()>,
}

/// Aborts a task when dropped: a superseded session must not leave its writer blocked on a dead peer, which would
/// keep the worker (and with it the target) blocked on a full outbox.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// TLS handshake and PSK exchange of one connection, bytes counted from the first.
async fn handshake(
    acceptor: &tls::TlsAcceptor,
    tcp: TcpStream,
    psk: &Psk,
    t: Timeouts,
    figures: &Figures,
) -> Result<Session> {
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
    authenticated(tls, exporter, psk, Side::Destination, t.handshake).await
}

async fn session_with_status(
    config: &DestinationConfig,
    arrival: Arrival,
    local: String,
    target_lock: Arc<tokio::sync::Mutex<()>>,
    superseded: tokio::sync::oneshot::Receiver<()>,
) -> Result<Digest> {
    let Arrival {
        peer,
        figures,
        started,
        session: connection,
    } = arrival;
    let mut status = StatusFile::load(config.status.clone(), Role::Destination)?;
    status.set_rsync_tls_address(local);
    status.set_schedule(config.schedule.clone());
    status.begin(chrono::Utc::now())?;
    if let Some(m) = &config.metrics {
        m.started(figures.clone());
    }
    let span = tracing::info_span!("session", %peer);
    span.in_scope(|| tracing::info!("source connected"));
    let result = match connection {
        Ok(halves) => {
            let run = session(
                config,
                halves,
                figures.clone(),
                &mut status,
                started,
                target_lock,
            )
            .instrument(span.clone());
            tokio::select! {
                r = run => r,
                Ok(()) = superseded => Err(Error::Superseded),
            }
        }
        Err(e) => Err(e),
    };
    let _enter = span.enter();
    // Before the status write below, which may fail: the metrics must not show this sync under way forever.
    if let Some(m) = &config.metrics {
        m.finished(result.is_ok(), started.elapsed());
    }
    if let Err(e) = &result {
        tracing::error!("sync failed: {e}");
        let logs = format!("{}error: {e}\n", figures.summary(started.elapsed()));
        status.fail(chrono::Utc::now(), &e.to_string(), figures.external(), logs)?;
    }
    result
}

async fn session(
    config: &DestinationConfig,
    (mut reader, mut writer): Session,
    figures: Arc<Figures>,
    status: &mut StatusFile,
    started: Instant,
    target_lock: Arc<tokio::sync::Mutex<()>>,
) -> Result<Digest> {
    let t = config.timeouts;
    let hello = within("hello", t.handshake, reader.expect("hello")).await;
    let opened = match abort_on_error(&mut writer, hello).await? {
        Message::Hello {
            volume_size,
            chunk_size,
            block_size,
        } => open_target(config, volume_size, chunk_size, block_size),
        Message::Abort { code, message } => return Err(Error::PeerAbort { code, message }),
        other => Err(Error::Protocol(format!(
            "expected HELLO, received {}",
            other.name()
        ))),
    };
    // A superseded session's worker may still be finishing a batch: wait until it cannot write any more.
    let writing = within("wait for the previous session", t.handshake, async {
        Ok(target_lock.lock_owned().await)
    })
    .await;
    let opened = opened.and_then(|o| writing.map(|w| (o, w)));
    let ((target, geometry), writing) = match opened {
        Ok(o) => o,
        Err(e) => {
            let _ = writer
                .send(&Message::Abort {
                    code: e.abort_code(),
                    message: e.to_string(),
                })
                .await;
            return Err(e);
        }
    };
    figures.set_geometry(&geometry);
    tracing::info!(
        target = %config.target.display(),
        volume_size = geometry.volume_size(),
        chunk_size = geometry.chunk_size(),
        "sync started"
    );
    writer
        .send(&Message::Ready {
            target_size: target.size(),
            window: config.window,
        })
        .await?;
    let _progress = Progress::start("destination", figures.clone());

    let target = Arc::new(target);
    let local = spawn_target_scan(target.clone(), geometry, figures.bytes_read.clone());
    let (outbox, writer_task) = spawn_writer(writer, 256);
    let _abort_writer = AbortOnDrop(writer_task.abort_handle());
    let (inbox_tx, mut inbox_rx) = mpsc::channel::<Message>(INBOX);
    let worker = {
        let apply = apply::Apply::new(
            target,
            geometry,
            local,
            outbox.clone(),
            figures.clone(),
            config.window,
        );
        tokio::task::spawn_blocking(move || {
            let _writing = writing;
            apply.run(&mut inbox_rx)
        })
    };
    let result = pump(&mut reader, inbox_tx, worker, t.idle).await;
    let digest = match result {
        Ok(d) => d,
        Err(e) => {
            if tell_peer(&e) {
                let _ = outbox
                    .send(Message::Abort {
                        code: e.abort_code(),
                        message: e.to_string(),
                    })
                    .await;
            }
            drop(outbox);
            let _ = finish_writer(writer_task, ABORT_GRACE).await;
            return Err(e);
        }
    };
    // Durable and verified: record success first, then tell the source.
    figures.set_volume_digest(digest);
    let elapsed = started.elapsed();
    let summary = figures.summary(elapsed);
    for line in summary.lines() {
        tracing::info!("{line}");
    }
    status.succeed(chrono::Utc::now(), figures.external(), summary)?;
    let commit = Message::Commit {
        chunk_count: geometry.chunk_count(),
        volume_size: geometry.volume_size(),
        digest,
    };
    if outbox.send(commit).await.is_ok() {
        drop(outbox);
        if let Ok(mut w) = finish_writer(writer_task, t.handshake).await {
            if let Err(e) = within("close", t.handshake, w.shutdown()).await {
                tracing::warn!("the sync is durable, but closing the connection failed: {e}");
            }
        }
    }
    tracing::info!(digest = %digest, "sync completed in {:.2}s", elapsed.as_secs_f64());
    Ok(digest)
}

fn open_target(
    config: &DestinationConfig,
    volume_size: u64,
    chunk_size: u32,
    block_size: u32,
) -> Result<(Volume, Geometry)> {
    if block_size != BLOCK_SIZE {
        return Err(Error::Config(format!(
            "the source uses {block_size}-byte blocks; protocol version 1 uses {BLOCK_SIZE}"
        )));
    }
    let geometry = Geometry::new(volume_size, chunk_size).map_err(Error::Config)?;
    let mut target = Volume::open_target(&config.target)?;
    target.allow_writes_below(volume_size)?;
    Ok((target, geometry))
}

/// Reads the source's frames into the worker's inbox until the worker finishes or something fails.
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    inbox: mpsc::Sender<Message>,
    mut worker: tokio::task::JoinHandle<Result<Digest>>,
    idle: std::time::Duration,
) -> Result<Digest> {
    let joined = |r: std::result::Result<Result<Digest>, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| Err(Error::Protocol(format!("session worker failed: {e}"))))
    };
    loop {
        tokio::select! {
            r = &mut worker => return joined(r),
            m = within("idle read", idle, reader.expect("sync")) => {
                let msg = match m {
                    Ok(Message::Abort { code, message }) => Err(Error::PeerAbort { code, message }),
                    Ok(msg @ (Message::Digests { .. } | Message::Data(_) | Message::End { .. })) => Ok(msg),
                    Ok(other) => Err(Error::Protocol(format!("unexpected {} from the source", other.name()))),
                    Err(e) => Err(e),
                };
                match msg {
                    Ok(msg) => {
                        if inbox.send(msg).await.is_err() {
                            return joined(worker.await);
                        }
                    }
                    Err(e) => {
                        drop(inbox);
                        // The worker's own error, if it has one, is the cause; otherwise ours. A worker stuck
                        // sending to a peer that stopped reading is not waited for past the grace period.
                        return match tokio::time::timeout(ABORT_GRACE, worker).await {
                            Ok(Ok(Err(w))) if !matches!(w, Error::PeerClosed(_)) => Err(w),
                            _ => Err(e),
                        };
                    }
                }
            }
        }
    }
}

/// Hashes the target's first `volume_size` bytes on a blocking thread, feeding the worker segment by segment.
fn spawn_target_scan(
    target: Arc<Volume>,
    geometry: Geometry,
    bytes_read: Arc<AtomicU64>,
) -> apply::LocalDigests {
    let (tx, rx) = std::sync::mpsc::sync_channel(crate::scan::READ_AHEAD + 2);
    tokio::task::spawn_blocking(move || {
        let r = crate::scan::scan(target, geometry, bytes_read, |first, s| {
            tx.send(Ok((first, s)))
                .map_err(|_| Error::Cancelled("session end"))
        });
        if let Err(e) = r {
            let _ = tx.send(Err(e));
        }
    });
    rx
}
