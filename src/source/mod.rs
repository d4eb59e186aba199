//! The source agent: reads the snapshot, announces chunk digests, answers NEEDs with the changed blocks.
//!
//! Pipeline (see `proto/PROTOCOL.md`, "Session"):
//! scan (read thread + `--read-depth` threads reading and hashing) -> DIGESTS within the window -> writer task -> TLS;
//! TLS -> reader (this task) -> NEED queue -> block diff + zstd on the same threads -> DATA -> writer task.
//! The reader only enqueues; at most `window` NEEDs can be open, and the NEED queue holds that many, so the
//! reader never blocks on the writer and the session cannot deadlock.
//! Success means a COMMIT from the destination equal to our END: the target is durable and verified.

mod credit;
mod data;
mod depth;
mod plan;
mod push;
mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;

pub use data::{build_data, changed_chunk};
pub use depth::{default_read_depth, MAX_READ_DEPTH, QUEUE_DEPTH};

use crate::changes::Tracker;
use crate::chunk::{Digest, Geometry, BLOCK_SIZE};
use crate::codec::{Fallback, Message, SyncKind};
use crate::delta::Policy;
use crate::error::{Error, Result};
use crate::manifest::Store;
use crate::net::{
    abort_on_error, authenticated, finish_writer, linger_close, spawn_writer, tell_peer, within,
    Timeouts, ABORT_GRACE,
};
use crate::progress::Progress;
use crate::snapshot::{Snapshot, SnapshotConfig};
use crate::stats::Figures;
use crate::status::{Role, StatusFile};
use crate::tls::{self, Psk, Side};
use crate::volume::Volume;
use credit::Credit;
use session::Session;

/// The largest window a destination may ask for (bounds the source's NEED queue).
const MAX_WINDOW: u32 = 1 << 16;
/// The smallest window a destination may ask for: one scan segment.
const MIN_WINDOW: u32 = crate::scan::SEGMENT_CHUNKS as u32;
/// NEEDs answered together on the read-depth pool (at least; a deeper pool takes one per thread).
const NEED_BATCH: usize = 32;
/// How long the reader still looks for the peer's ABORT after our writer failed (not `net::LINGER`, which is how
/// long a side that gave up drains its peer before closing).
const ABORT_LOOKOUT: Duration = Duration::from_secs(1);

/// What the source needs to run one sync.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Destination address (`host:port`).
    pub connect: String,
    /// The snapshot: block device, file, or NBD export (with its dirty bitmap, if any).
    pub volume: crate::volume::Source,
    /// The pre-shared key.
    pub psk: Psk,
    /// First-level chunk size.
    pub chunk_size: u32,
    /// zstd level for DATA payloads; `None`: chosen during the sync under [`Compression::Auto`] (from 1, see
    /// `adapt::Levels`), level 1 otherwise.
    pub zstd_level: Option<i32>,
    /// When DATA payloads are compressed.
    pub compression: Compression,
    /// Network phase limits.
    pub timeouts: Timeouts,
    /// Who this source is, `namespace/name` (sent in HELLO): a destination lets a new connection supersede a sync
    /// under way only when it comes from the same source.
    pub identity: String,
    /// Where manifests are kept between syncs (a state directory, memory, or nowhere).
    pub state: Arc<Store>,
    /// Where the change list since the last sync comes from, if anywhere (an NBD volume with a dirty bitmap
    /// brings its own: [`crate::volume::Volume::nbd_tracker`]).
    pub tracker: Option<Arc<dyn Tracker>>,
    /// When to compare in full although a delta is possible (shared by the syncs of a schedule).
    pub verify: Arc<Policy>,
    /// How the point-in-time copy is taken, and the hooks around it.
    pub snapshot: SnapshotConfig,
    /// `--bwlimit`: at most this many bytes per second on the wire.
    pub bwlimit: Option<u64>,
    /// `--read-depth`: reads in flight (1..=[`MAX_READ_DEPTH`]); `None`: [`depth::default_read_depth`] of the
    /// volume.
    pub read_depth: Option<usize>,
    /// Scans read the parts of the volume not in the page cache with `O_DIRECT` (`--direct-reads`).
    pub direct_reads: bool,
}

/// When the source compresses DATA payloads (a payload whose probe does not compress always travels raw).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Changed blocks of an incremental sync always (they are few: compressing them is cheap next to the scan);
    /// whole chunks copied into an empty target when that measures faster, see [`crate::adapt`]: on a link slower
    /// than zstd it does, on a fast link or with both agents on the same cores it does not (compressing a first
    /// sync of text-like data costs about as much CPU as the rest of the sync).
    #[default]
    Auto,
    /// Every payload: fewest bytes on the wire, whatever the CPU cost.
    Always,
    /// No payload: for links much faster than zstd.
    Never,
}

impl Compression {
    /// Whether to compress a payload; `incremental` when the NEED carried block digests, `measured` what the
    /// [`Chooser`] says for whole chunks now.
    fn wanted(self, incremental: bool, measured: bool) -> bool {
        match self {
            Compression::Always => true,
            Compression::Never => false,
            Compression::Auto => incremental || measured,
        }
    }
}

/// The outcome of a successful sync.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// The volume's geometry.
    pub geometry: Geometry,
    /// The whole-volume digest both sides agreed on.
    pub volume_digest: Digest,
}

/// Runs one sync and records it in the status file at `status` (if any): SyncInProgress, then Successful or
/// Failed with the reason; a failure keeps the previous lastSyncTime.
pub async fn sync(
    config: &SourceConfig,
    status: Option<PathBuf>,
    figures: Arc<Figures>,
) -> Result<SyncReport> {
    let mut status = StatusFile::load(status, Role::Source)?;
    sync_recorded(config, &mut status, figures).await
}

/// Runs one sync and records it in `status` (which may carry a schedule and a manual token), as [`sync`] does.
pub async fn sync_recorded(
    config: &SourceConfig,
    status: &mut StatusFile,
    figures: Arc<Figures>,
) -> Result<SyncReport> {
    let started = std::time::Instant::now();
    status.begin(chrono::Utc::now())?;
    let progress = Progress::start("source", figures.clone());
    let result = run(config, figures.clone()).await;
    drop(progress);
    let summary = figures.summary(started.elapsed());
    match &result {
        Ok(_) => {
            for line in summary.lines() {
                tracing::info!("{line}");
            }
            status.succeed(chrono::Utc::now(), figures.external(), summary)?;
        }
        Err(e) => {
            let logs = format!("{summary}error: {e}\n");
            status.fail(chrono::Utc::now(), &e.to_string(), figures.external(), logs)?;
        }
    }
    result
}

/// Runs one sync of `config.volume` to the destination; `figures` fills as it goes. The point-in-time copy
/// (`config.snapshot`) is taken first and ended after: kept as the next sync's base after a success when the
/// configuration keeps one, removed otherwise.
pub async fn run(config: &SourceConfig, figures: Arc<Figures>) -> Result<SyncReport> {
    let path = match &config.volume {
        crate::volume::Source::File(path) => path.clone(),
        // An NBD export is a point-in-time copy already (a backup job's export): no copy is taken of it.
        nbd @ crate::volume::Source::Nbd { .. } => {
            return run_on(config, nbd, config.tracker.clone(), figures).await
        }
    };
    let snap = config.snapshot.clone();
    let snapshot = tokio::task::spawn_blocking(move || Snapshot::take(&snap, &path))
        .await
        .map_err(|e| Error::Snapshot(format!("the copy was not taken: {e}")))??;
    let tracker = snapshot.tracker().or_else(|| config.tracker.clone());
    let copy = crate::volume::Source::File(snapshot.path().to_owned());
    let result = run_on(config, &copy, tracker, figures).await;
    let synced = result.as_ref().ok().map(|r| r.volume_digest);
    tokio::task::spawn_blocking(move || snapshot.finish(synced.as_ref()))
        .await
        .map_err(|e| Error::Snapshot(format!("the copy was not ended: {e}")))?;
    result
}

/// One sync of `source` (the copy, or an NBD export), with the change list from `tracker`.
async fn run_on(
    config: &SourceConfig,
    source: &crate::volume::Source,
    tracker: Option<Arc<dyn Tracker>>,
    figures: Arc<Figures>,
) -> Result<SyncReport> {
    let t = config.timeouts;
    // An NBD reply is waited for half the idle timeout: a frozen export is reported as such, before the
    // destination's silence (it waits for the digests the frozen export holds up) is.
    let nbd_wait = (t.idle / 2).max(Duration::from_secs(1));
    let mut volume = Volume::open(source, t.connect, nbd_wait)?;
    volume.set_direct_reads(config.direct_reads);
    let volume = Arc::new(volume);
    let geometry = Geometry::new(volume.size(), config.chunk_size).map_err(Error::Config)?;
    figures.set_geometry(&geometry);
    // An NBD export answers change lists from its dirty bitmap (if one was asked for) and allocation maps from
    // base:allocation (always, for full comparisons that do not verify).
    let nbd = volume.nbd_tracker();
    let tracker: Option<Arc<dyn Tracker>> = tracker.or_else(|| {
        let t = nbd.clone().filter(|t| t.bitmap().is_some())?;
        Some(t as Arc<dyn Tracker>)
    });
    let allocation: Option<Arc<dyn Tracker>> = tracker
        .clone()
        .or_else(|| nbd.map(|t| t as Arc<dyn Tracker>));
    let plan = plan::Plan::prepare(
        config.state.clone(),
        tracker.as_deref(),
        &config.verify,
        &config.identity,
        geometry,
    )?;
    if let Some(tracker) = &tracker {
        let failure = plan.tracker_failure().map(str::to_owned);
        figures.set_tracker(tracker.describe(), failure);
    }

    let tcp = within("connect", t.connect, async {
        TcpStream::connect(&config.connect)
            .await
            .map_err(|source| Error::Connect {
                addr: config.connect.clone(),
                source,
            })
    })
    .await?;
    let _ = tcp.set_nodelay(true);
    let peer: Option<SocketAddr> = tcp.peer_addr().ok();
    tracing::info!(?peer, volume = %config.volume, size = geometry.volume_size(), "connected");
    let stream = crate::net::socket_limited(tcp, figures.wire.clone(), config.bwlimit);
    figures
        .rate_limit
        .store(config.bwlimit.unwrap_or(0), Ordering::Relaxed);
    let connected = std::time::Instant::now();
    let tls = within("tls handshake", t.handshake, async {
        tls::connector()?
            .connect(tls::server_name(), stream)
            .await
            .map_err(|e| Error::net("tls handshake", e))
    })
    .await?;
    let exporter = tls::client_exporter(&tls)?;
    let (mut reader, mut writer) =
        authenticated(tls, exporter, &config.psk, Side::Source, t.handshake).await?;

    let hello = Message::Hello {
        volume_size: geometry.volume_size(),
        chunk_size: geometry.chunk_size(),
        block_size: BLOCK_SIZE,
        source: config.identity.clone(),
        offer: plan.offer,
    };
    within("hello", t.handshake, writer.send(&hello)).await?;
    let ready = within("hello", t.handshake, reader.expect("hello")).await;
    let (window, kind, reason) = match abort_on_error(&mut writer, ready).await? {
        Message::Ready {
            window,
            kind,
            reason,
            ..
        } if (MIN_WINDOW..=MAX_WINDOW).contains(&window) => (window, kind, reason),
        Message::Ready { window, .. } => {
            return Err(Error::Protocol(format!("READY asks for window {window}")))
        }
        Message::Abort { code, message } => return Err(Error::PeerAbort { code, message }),
        other => {
            return Err(Error::Protocol(format!(
                "expected READY, received {}",
                other.name()
            )))
        }
    };

    let announcer = abort_on_error(&mut writer, plan.settle(kind)).await?;
    let _rate = WireRate {
        figures: figures.clone(),
        since: connected,
    };
    figures.set_kind(kind, reason);
    if let (SyncKind::Full, Some(tracker)) = (kind, &allocation) {
        use_allocation_map(&volume, tracker.as_ref(), geometry, reason);
    }
    match kind {
        SyncKind::Full => tracing::info!("full comparison: {reason}"),
        _ => tracing::info!("{kind} sync against the image of the last sync"),
    }
    let depth = config
        .read_depth
        .unwrap_or_else(|| depth::default_read_depth(volume.kind()));
    let pool = abort_on_error(&mut writer, depth::read_pool(depth)).await?;
    figures.read_depth.store(depth as u64, Ordering::Relaxed);
    tracing::info!("read depth {depth}: reads in flight on the volume");
    let (outbox, writer_task) = spawn_writer(writer, 64, t.idle);
    let mut writer_task = Some(writer_task);
    let session = Session {
        volume,
        geometry,
        figures,
        pool,
        credit: Arc::new(Credit::new(u64::from(window))),
        announced: Arc::new(AtomicU64::new(0)),
        window: u64::from(window),
        zstd_level: config.zstd_level,
        compression: config.compression,
        announcer: Mutex::new(Some(announcer)),
    };
    let result = session
        .drive(&mut reader, outbox, &mut writer_task, t.idle)
        .await;
    session.credit.stop();
    let limit = if result.is_ok() { t.idle } else { ABORT_GRACE };
    // A writer that ended early already gave its outcome to `drive` (and is not polled again).
    let writer = match writer_task {
        Some(task) => finish_writer(task, limit).await,
        None => Err(Error::PeerClosed("sync")),
    };
    let report = match result {
        Ok(report) => {
            config.verify.served(kind);
            report
        }
        Err(e) => {
            if let (true, Ok(w)) = (tell_peer(&e), writer) {
                linger_close(&mut reader, w).await;
            }
            return Err(e);
        }
    };
    let mut writer = writer?;
    within("close", t.handshake, writer.shutdown()).await?;
    Ok(report)
}

/// A full comparison that does not verify reads only what the tracker says is allocated (the rest is zeros).
fn use_allocation_map(
    volume: &Volume,
    tracker: &dyn Tracker,
    geometry: Geometry,
    reason: Fallback,
) {
    let verifying = matches!(
        reason,
        Fallback::SourceVerify
            | Fallback::SourcePeriodic
            | Fallback::DestinationVerify
            | Fallback::DestinationPeriodic
    );
    if verifying {
        return;
    }
    match tracker.allocated(geometry) {
        Ok(Some(extents)) => {
            let bytes: u64 = extents.iter().map(|(_, l)| l).sum();
            tracing::info!(
                "{}: {} extents, {bytes} bytes allocated; the rest is read as zeros",
                tracker.describe(),
                extents.len()
            );
            volume.set_allocated(extents);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("no allocation map ({e}): reading the whole volume"),
    }
}

/// Records the bytes per second sent on the wire from connect to the end of the session, however it ends.
struct WireRate {
    figures: Arc<Figures>,
    since: std::time::Instant,
}

impl Drop for WireRate {
    fn drop(&mut self) {
        let secs = self.since.elapsed().as_secs_f64();
        if secs > 0.0 {
            let sent = crate::stats::get(&self.figures.wire.sent) as f64;
            self.figures
                .wire_send_rate
                .store((sent / secs) as u64, Ordering::Relaxed);
        }
    }
}
