//! The destination agent: accepts a source, checks its key, hashes the target and applies the changes.
//!
//! The target is opened once, exclusively, before the destination listens ([`bind`]): a second destination on the
//! same target, or a mounted block device, is refused at start-up. Connections authenticate in tasks of their own
//! ([`accept`]); one that has not proved the key never touches the target, the status or the sync metrics. One
//! sync runs at a time ([`session`]): a new connection of the same source supersedes it, another source is told
//! it is busy. What is durable when the status says Successful: every byte of `[0, volume_size)` of the target,
//! fsynced, whose volume digest matched the source's (with `--read-back`, computed from the bytes read back).

mod accept;
mod apply;
mod basis;
mod finals;
mod flush;
mod inbox;
mod session;
mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use accept::MAX_HANDSHAKES;
pub use apply::ACK_EVERY;
pub use verify::decode_payload;

use crate::chunk::Digest;
use crate::delta::Verify;
use crate::error::{Error, Result};
use crate::manifest::{Role, Store};
use crate::metrics::Rejection;
use crate::net::Timeouts;
use crate::tls::Psk;
use crate::volume::Volume;
use accept::{Arrival, Handshakes};
use session::Shared;

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
    /// After the final fsync, read the whole target back and check its volume digest against the source's (one
    /// more read of the volume's size; catches another writer of the target during the sync).
    pub read_back: bool,
    /// Scans read the parts of the target not in the page cache with `O_DIRECT` (`--direct-reads`).
    pub direct_reads: bool,
    /// Where the manifest of the target is kept between syncs (a state directory, memory, or nowhere).
    pub state: Arc<Store>,
    /// When to compare in full although a delta is possible.
    pub verify: Verify,
}

/// A destination ready to serve: its target held exclusively, its port bound.
pub struct Bound {
    listener: TcpListener,
    target: Volume,
}

impl Bound {
    /// The address the destination listens on.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// Opens the target (exclusively: see [`Volume::open_target`]) and binds the listener, so that an unusable target
/// or a second destination on it is reported at start-up, and the caller learns the address before any sync.
pub async fn bind(config: &DestinationConfig) -> Result<Bound> {
    let mut target = Volume::open_target(&config.target)?;
    target.set_direct_reads(config.direct_reads);
    // This volume is a destination now: a manifest this state directory kept while it was a source describes an
    // image it sent, not what a later failback writes here.
    config
        .state
        .invalidate(Role::Source)
        .map_err(|e| Error::State(e.to_string()))?;
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|e| Error::net("listen", e))?;
    Ok(Bound { listener, target })
}

/// Serves syncs on `bound`: one, or until the process ends with `serve`. Returns the last session's result.
///
/// Each connection does its TLS handshake, PSK exchange and HELLO in a task of its own, under the handshake
/// timeout, so a client that sends nothing, garbage or a wrong key is logged, counted and dropped without touching
/// the target, the status or a sync under way (see [`accept`]).
pub async fn serve(config: &DestinationConfig, bound: Bound) -> Result<Digest> {
    match serve_until(config, bound, std::future::pending()).await? {
        Served::Synced(d) => Ok(d),
        Served::Idle | Served::Interrupted(_) => Err(Error::Cancelled("stop")),
    }
}

/// How long a stop waits for a session under way to end by itself (one that has sent its COMMIT is closing).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long a superseded session is given to end (tell its stale peer, let its worker finish a batch) before the
/// new one starts anyway; the new one still waits for the old worker's hold on the target.
const SUPERSEDE_GRACE: Duration = Duration::from_secs(10);

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

/// The session under way.
struct Running {
    task: tokio::task::JoinHandle<Result<Digest>>,
    /// Set to true to end the session because its source connected again.
    supersede: watch::Sender<bool>,
    hello: accept::Hello,
    since: Instant,
}

/// [`serve`] until `stop` resolves to the name of what stopped it (a signal).
pub async fn serve_until(
    config: &DestinationConfig,
    bound: Bound,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<Served> {
    tokio::pin!(stop);
    let Bound { listener, target } = bound;
    let shared = Arc::new(Shared {
        target: Arc::new(target),
        writing: Arc::new(tokio::sync::Mutex::new(())),
        policy: Arc::new(crate::delta::Policy::new(config.verify)),
        local: listener
            .local_addr()
            .map_or_else(|_| config.listen.clone(), |a| a.to_string()),
    });
    let (arrived_tx, mut arrived) = mpsc::channel::<Arrival>(4);
    let mut handshakes = Handshakes::new(
        config.psk.clone(),
        config.timeouts,
        config.metrics.clone(),
        arrived_tx,
    )?;
    let config = Arc::new(config.clone());
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
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => handshakes.start(tcp, peer),
                Err(e) => handshakes.accept_failed(e).await?,
            },
            Some(arrival) = arrived.recv() => {
                if let Some(running) = current.take() {
                    if !running.hello.same_source(&arrival.hello) {
                        if let Some(m) = &config.metrics {
                            m.rejected(Rejection::Busy);
                        }
                        accept::refuse_busy(arrival, &running.hello.source, running.since, config.timeouts.handshake);
                        current = Some(running);
                        continue;
                    }
                    // The same source retried: its previous connection is stale (frozen, or half-open after a
                    // partition). End that session, which tells its peer and records why, and serve the new one.
                    tracing::warn!(peer = %arrival.peer, "a new connection of the same source supersedes the sync under way");
                    let _ = running.supersede.send(true);
                    let mut task = running.task;
                    if tokio::time::timeout(SUPERSEDE_GRACE, &mut task).await.is_err() {
                        tracing::warn!("the superseded session did not end within {SUPERSEDE_GRACE:?}; starting the new one");
                    }
                }
                let (supersede, superseded) = watch::channel(false);
                let hello = arrival.hello.clone();
                let (config, shared) = (config.clone(), shared.clone());
                let task = tokio::spawn(async move {
                    session::run(&config, &shared, arrival, superseded).await
                });
                current = Some(Running { task, supersede, hello, since: Instant::now() });
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
