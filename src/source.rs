//! The source agent: reads the snapshot, announces chunk digests, answers NEEDs with the changed blocks.
//!
//! Pipeline (see `proto/PROTOCOL.md`, "Session"):
//! scan (read thread + all cores hashing) -> DIGESTS within the window -> writer task -> TLS;
//! TLS -> reader (this task) -> NEED queue -> block diff + zstd on all cores -> DATA -> writer task.
//! The reader only enqueues; at most `window` NEEDs can be open, and the NEED queue holds that many, so the
//! reader never blocks on the writer and the session cannot deadlock.
//! Success means a COMMIT from the destination equal to our END: the target is durable and verified.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rayon::prelude::*;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::adapt::Chooser;
use crate::chunk::{block_range, is_zero, Digest, Geometry, VolumeDigest, BLOCK_SIZE};
use crate::codec::{AbortCode, DataFrame, Encoding, FrameReader, Message};
use crate::error::{Error, Result};
use crate::net::{
    abort_on_error, authenticated, finish_writer, linger_close, spawn_writer, tell_peer, within,
    Outbox, Timeouts, ABORT_GRACE,
};
use crate::progress::Progress;
use crate::stats::{add, Figures};
use crate::status::{Role, StatusFile};
use crate::tls::{self, Psk, Side};
use crate::volume::Volume;

/// The largest window a destination may ask for (bounds the source's NEED queue).
const MAX_WINDOW: u32 = 1 << 16;
/// The smallest window a destination may ask for: one scan segment.
const MIN_WINDOW: u32 = crate::scan::SEGMENT_CHUNKS as u32;
/// NEEDs answered together on all cores.
const NEED_BATCH: usize = 32;
/// How long the reader still looks for the peer's ABORT after our writer failed (not `net::LINGER`, which is how
/// long a side that gave up drains its peer before closing).
const ABORT_LOOKOUT: Duration = Duration::from_secs(1);

/// What the source needs to run one sync.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Destination address (`host:port`).
    pub connect: String,
    /// The snapshot: block device or file.
    pub volume: PathBuf,
    /// The pre-shared key.
    pub psk: Psk,
    /// First-level chunk size.
    pub chunk_size: u32,
    /// zstd level for DATA payloads.
    pub zstd_level: i32,
    /// When DATA payloads are compressed.
    pub compression: Compression,
    /// Network phase limits.
    pub timeouts: Timeouts,
    /// Who this source is, `namespace/name` (sent in HELLO): a destination lets a new connection supersede a sync
    /// under way only when it comes from the same source.
    pub identity: String,
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

/// The source's window: chunks announced and acknowledged, and the digests announced for the chunks the
/// destination has not settled yet (at most a window of them: 2 MiB at the largest window). A chunk whose DATA the
/// destination rejects is unsettled, so the source can tell whether its volume changed since the scan.
struct Credit {
    acked: Mutex<u64>,
    moved: Condvar,
    stop: AtomicBool,
    /// Digests of chunks `first..first + len`, from the scan; chunks below the ACK are dropped.
    open: Mutex<(u64, std::collections::VecDeque<Digest>)>,
}

impl Credit {
    /// Credit for a session whose destination allows `window` unsettled chunks. The digests' buffer is sized
    /// once for the most the window lets the scan announce, so the scan's thread never reallocates what the
    /// reader's thread drains.
    fn new(window: u64) -> Self {
        let most = window + crate::scan::SEGMENT_CHUNKS;
        Credit {
            acked: Mutex::new(0),
            moved: Condvar::new(),
            stop: AtomicBool::new(false),
            open: Mutex::new((0, std::collections::VecDeque::with_capacity(most as usize))),
        }
    }

    /// Records the digests the scan announces next (chunks follow each other).
    fn announce(&self, digests: &[Digest]) {
        if let Ok(mut open) = self.open.lock() {
            open.1.extend(digests.iter().copied());
        }
    }

    /// The unsettled chunks among `answered` (a bit per chunk), with the digests the scan announced for them.
    fn unsettled(&self, answered: &[u64]) -> Vec<(u64, Digest)> {
        let Ok(open) = self.open.lock() else {
            return Vec::new();
        };
        let is_set = |c: u64| {
            answered
                .get((c / 64) as usize)
                .is_some_and(|w| w & (1 << (c % 64)) != 0)
        };
        (open.0..)
            .zip(open.1.iter())
            .filter(|(c, _)| is_set(*c))
            .map(|(c, d)| (c, *d))
            .collect()
    }

    /// Waits until announcing chunks up to `through` keeps within `window`; false when the session stopped.
    fn wait(&self, through: u64, window: u64) -> bool {
        let Ok(mut acked) = self.acked.lock() else {
            return false;
        };
        while through.saturating_sub(*acked) > window {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            acked = match self.moved.wait_timeout(acked, Duration::from_millis(100)) {
                Ok((a, _)) => a,
                Err(_) => return false,
            };
        }
        !self.stop.load(Ordering::Relaxed)
    }

    fn ack(&self, through: u64) {
        if let Ok(mut a) = self.acked.lock() {
            *a = (*a).max(through);
        }
        if let Ok(mut open) = self.open.lock() {
            let (first, digests) = &mut *open;
            let settled = through.saturating_sub(*first).min(digests.len() as u64);
            digests.drain(..settled as usize);
            *first += settled;
        }
        self.moved.notify_all();
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.moved.notify_all();
    }
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

/// Runs one sync of `config.volume` to the destination; `figures` fills as it goes.
pub async fn run(config: &SourceConfig, figures: Arc<Figures>) -> Result<SyncReport> {
    let volume = Arc::new(Volume::open_source(&config.volume)?);
    let geometry = Geometry::new(volume.size(), config.chunk_size).map_err(Error::Config)?;
    figures.set_geometry(&geometry);
    let t = config.timeouts;

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
    tracing::info!(?peer, volume = %config.volume.display(), size = geometry.volume_size(), "connected");
    let stream = crate::net::socket(tcp, figures.wire.clone());
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
    };
    within("hello", t.handshake, writer.send(&hello)).await?;
    let ready = within("hello", t.handshake, reader.expect("hello")).await;
    let window = match abort_on_error(&mut writer, ready).await? {
        Message::Ready { window, .. } if (MIN_WINDOW..=MAX_WINDOW).contains(&window) => window,
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

    let (outbox, writer_task) = spawn_writer(writer, 64, t.idle);
    let mut writer_task = Some(writer_task);
    let session = Session {
        volume,
        geometry,
        figures,
        credit: Arc::new(Credit::new(u64::from(window))),
        announced: Arc::new(AtomicU64::new(0)),
        window: u64::from(window),
        zstd_level: config.zstd_level,
        compression: config.compression,
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
        Ok(report) => report,
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

struct Session {
    volume: Arc<Volume>,
    geometry: Geometry,
    figures: Arc<Figures>,
    credit: Arc<Credit>,
    announced: Arc<AtomicU64>,
    window: u64,
    zstd_level: i32,
    compression: Compression,
}

impl Session {
    /// Runs the scan and the NEED service until COMMIT; on failure tells the peer why.
    async fn drive<R: tokio::io::AsyncRead + Unpin, W>(
        &self,
        reader: &mut FrameReader<R>,
        outbox: Outbox,
        writer: &mut Option<tokio::task::JoinHandle<Result<W>>>,
        idle: Duration,
    ) -> Result<SyncReport> {
        let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<Error>();
        let (need_tx, need_rx) = mpsc::channel::<(u64, Option<Vec<Digest>>)>(self.window as usize);
        let scanner = self.spawn_scanner(outbox.clone(), fail_tx.clone());
        let servicer = self.spawn_servicer(need_rx, outbox.clone(), fail_tx);
        let mut answered = vec![0u64; self.geometry.chunk_count().div_ceil(64) as usize];
        // The writer only ends early on an error: a peer that stopped reading (send timeout) or a broken socket.
        // A peer that gives up sends ABORT and closes, and our next write then fails: its reason may be waiting
        // to be read, so the reader gets a moment to find it before the writer's error is reported.
        let mut writer_failed: Option<Error> = None;
        let result = loop {
            let limit = if writer_failed.is_some() {
                ABORT_LOOKOUT
            } else {
                idle
            };
            let msg = tokio::select! {
                m = within("idle read", limit, reader.expect("sync")) => m,
                Some(e) = fail_rx.recv() => Err(e),
                w = async { writer.as_mut().expect("guarded").await }, if writer.is_some() => {
                    *writer = None;
                    writer_failed = Some(match w {
                        Ok(Err(e)) => e,
                        Ok(Ok(_)) => Error::Protocol("the writer ended early".into()),
                        Err(e) => Error::Protocol(format!("writer task failed: {e}")),
                    });
                    continue;
                }
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => break Err(writer_failed.take().unwrap_or(e)),
            };
            match msg {
                Message::Ack { through } => {
                    if through > self.announced.load(Ordering::Acquire) {
                        break Err(Error::Protocol(format!(
                            "ACK through {through} is past the chunks announced"
                        )));
                    }
                    self.credit.ack(through);
                }
                Message::Need { chunk, blocks } => {
                    if let Err(e) = self.check_need(chunk, blocks.as_deref(), &mut answered) {
                        break Err(e);
                    }
                    match need_tx.try_send((chunk, blocks)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            break Err(Error::Protocol(
                                "the destination exceeded its window of open NEEDs".into(),
                            ));
                        }
                        // The servicer stopped: it reported why (a read error) or its writer failed; either
                        // reaches this loop, which ends with that cause, not with this NEED.
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
                Message::Commit {
                    chunk_count,
                    volume_size,
                    digest,
                } => {
                    break match scanner.await {
                        Ok(Some(ours))
                            if ours == digest
                                && chunk_count == self.geometry.chunk_count()
                                && volume_size == self.geometry.volume_size() =>
                        {
                            self.figures.set_volume_digest(ours);
                            Ok(SyncReport {
                                geometry: self.geometry,
                                volume_digest: ours,
                            })
                        }
                        Ok(Some(ours)) => Err(Error::VolumeDigestMismatch {
                            source_digest: ours.to_hex(),
                            destination_digest: digest.to_hex(),
                        }),
                        _ => Err(Error::Protocol("COMMIT before the scan finished".into())),
                    };
                }
                Message::Abort {
                    code: AbortCode::Digest,
                    message,
                } => break Err(self.digest_refused(message, &answered).await),
                Message::Abort { code, message } => break Err(Error::PeerAbort { code, message }),
                other => {
                    break Err(Error::Protocol(format!(
                        "unexpected {} from the destination",
                        other.name()
                    )))
                }
            }
        };
        self.credit.stop();
        drop(need_tx);
        if let Err(e) = &result {
            if tell_peer(e) {
                let _ = outbox.try_send(Message::Abort {
                    code: e.abort_code(),
                    message: e.to_string(),
                });
            }
        }
        drop(outbox);
        // The servicer may be blocked handing a frame to a writer stuck on a peer that stopped reading: the writer
        // is ended (and with it the servicer's outbox) by the caller, so it is not waited for past the grace.
        let _ = tokio::time::timeout(ABORT_GRACE, servicer).await;
        result
    }

    /// The destination refused DATA that did not hash to the digest we announced. A snapshot cannot change, so
    /// either the volume is live (written during the sync) or the target changed under the destination: read the
    /// chunks we answered that are still unsettled (one of them is the refused one) and hash them again.
    async fn digest_refused(&self, message: String, answered: &[u64]) -> Error {
        let candidates = self.credit.unsettled(answered);
        let (volume, geometry) = (self.volume.clone(), self.geometry);
        let changed =
            tokio::task::spawn_blocking(move || changed_chunk(&volume, geometry, &candidates))
                .await;
        match changed {
            Ok(Ok(Some(chunk))) => Error::VolumeChanged { chunk },
            Ok(Err(e)) => e,
            _ => Error::PeerAbort {
                code: AbortCode::Digest,
                message,
            },
        }
    }

    fn check_need(
        &self,
        chunk: u64,
        blocks: Option<&[Digest]>,
        answered: &mut [u64],
    ) -> Result<()> {
        if chunk >= self.announced.load(Ordering::Acquire) {
            return Err(Error::Protocol(format!(
                "NEED for chunk {chunk}, which was not announced"
            )));
        }
        let (word, bit) = ((chunk / 64) as usize, 1u64 << (chunk % 64));
        if answered[word] & bit != 0 {
            return Err(Error::Protocol(format!("second NEED for chunk {chunk}")));
        }
        answered[word] |= bit;
        if let Some(b) = blocks {
            if b.len() != self.geometry.blocks_in_chunk(chunk) as usize {
                return Err(Error::Protocol(format!(
                    "NEED for chunk {chunk} carries {} block digests",
                    b.len()
                )));
            }
        }
        Ok(())
    }

    /// Scans the snapshot and announces its digests within the window, then END. Returns the volume digest.
    fn spawn_scanner(
        &self,
        outbox: Outbox,
        fail: mpsc::UnboundedSender<Error>,
    ) -> tokio::task::JoinHandle<Option<Digest>> {
        let (volume, geometry, credit, announced) = (
            self.volume.clone(),
            self.geometry,
            self.credit.clone(),
            self.announced.clone(),
        );
        let (window, bytes_read) = (self.window, self.figures.bytes_read.clone());
        tokio::task::spawn_blocking(move || {
            let mut vd = VolumeDigest::new(geometry);
            let stopped = || Error::Cancelled("session end");
            let r = crate::scan::scan(volume, geometry, bytes_read, |first, summaries| {
                let through = first + summaries.len() as u64;
                if !credit.wait(through, window) {
                    return Err(stopped());
                }
                let digests: Vec<Digest> = summaries.iter().map(|s| s.digest).collect();
                digests.iter().for_each(|d| vd.push(d));
                credit.announce(&digests);
                announced.store(through, Ordering::Release);
                outbox
                    .blocking_send(Message::Digests { first, digests })
                    .map_err(|_| stopped())
            })
            .and_then(|()| {
                let digest = vd.finish();
                outbox
                    .blocking_send(Message::End {
                        chunk_count: geometry.chunk_count(),
                        volume_size: geometry.volume_size(),
                        digest,
                    })
                    .map_err(|_| stopped())?;
                Ok(digest)
            });
            match r {
                Ok(d) => Some(d),
                Err(e) => {
                    let _ = fail.send(e);
                    None
                }
            }
        })
    }

    /// Answers NEEDs in batches, building DATA frames on all cores.
    fn spawn_servicer(
        &self,
        mut needs: mpsc::Receiver<(u64, Option<Vec<Digest>>)>,
        outbox: Outbox,
        fail: mpsc::UnboundedSender<Error>,
    ) -> tokio::task::JoinHandle<()> {
        let (volume, geometry, figures, level, compression) = (
            self.volume.clone(),
            self.geometry,
            self.figures.clone(),
            self.zstd_level,
            self.compression,
        );
        tokio::task::spawn_blocking(move || {
            let mut chooser = Chooser::new();
            let mut last = std::time::Instant::now();
            while let Some(first) = needs.blocking_recv() {
                let mut batch = vec![first];
                while batch.len() < NEED_BATCH {
                    match needs.try_recv() {
                        Ok(n) => batch.push(n),
                        Err(_) => break,
                    }
                }
                let measured = chooser.compress();
                let count = batch.len() as u64;
                let frames: Vec<Result<DataFrame>> = batch
                    .into_par_iter()
                    .map(|(chunk, blocks)| {
                        let level = compression
                            .wanted(blocks.is_some(), measured)
                            .then_some(level);
                        build_data(&volume, geometry, chunk, blocks.as_deref(), level)
                    })
                    .collect();
                let mut raw = 0;
                for frame in frames {
                    match frame {
                        Ok(d) => {
                            count_data(&figures, &d);
                            raw += u64::from(d.raw_len);
                            if outbox.blocking_send(Message::Data(d)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = fail.send(e);
                            return;
                        }
                    }
                }
                let now = std::time::Instant::now();
                chooser.record(count, raw, now - last);
                last = now;
            }
        })
    }
}

fn count_data(figures: &Figures, d: &DataFrame) {
    add(&figures.chunks_changed, 1);
    add(&figures.chunks_sent, 1);
    add(&figures.blocks_sent, u64::from(d.send_mask.count_ones()));
    add(&figures.zero_blocks, u64::from(d.zero_mask.count_ones()));
    add(&figures.data_bytes, u64::from(d.raw_len));
    add(&figures.compressed_bytes, d.payload.len() as u64);
}

/// The first of `chunks` whose bytes no longer hash to the digest given with it (read again now, on all cores).
pub fn changed_chunk(
    volume: &Volume,
    geometry: Geometry,
    chunks: &[(u64, Digest)],
) -> Result<Option<u64>> {
    let changed: Vec<Result<Option<u64>>> = chunks
        .par_iter()
        .map(|&(chunk, announced)| {
            let (offset, len) = geometry.chunk_range(chunk);
            let mut bytes = Vec::with_capacity(len);
            volume.read_append(&mut bytes, offset, len)?;
            Ok((Digest::of(&bytes) != announced).then_some(chunk))
        })
        .collect();
    changed.into_iter().find_map(|r| r.transpose()).transpose()
}

/// Builds the DATA answer to a NEED: the blocks whose digests differ from the target's (or, for a target chunk of
/// zeros, the non-zero blocks); zero blocks become marks; with a `zstd_level`, the payload is zstd when that is
/// smaller, else raw.
///
/// The chunk is read again, not taken from the scan: on a snapshot it holds the bytes the scan hashed. On a live
/// volume it may not, and the destination then refuses the rebuilt chunk (its digest is checked before anything is
/// written); [`changed_chunk`] tells the source why.
pub fn build_data(
    volume: &Volume,
    geometry: Geometry,
    chunk: u64,
    target_blocks: Option<&[Digest]>,
    zstd_level: Option<i32>,
) -> Result<DataFrame> {
    let (offset, len) = geometry.chunk_range(chunk);
    // Read into the buffer that becomes the payload: a chunk whose blocks all travel (a first sync) is sent from
    // where it was read; otherwise the blocks that travel are moved to the front.
    let mut raw = Vec::with_capacity(len);
    volume.read_append(&mut raw, offset, len)?;
    let (mut send_mask, mut zero_mask) = (0u64, 0u64);
    let mut kept = 0;
    for b in 0..geometry.blocks_in_chunk(chunk) {
        let r = block_range(len, b);
        let block = &raw[r.clone()];
        let zero = is_zero(block);
        let differs = match target_blocks {
            None => !zero,
            Some(theirs) => Digest::of(block) != theirs[b as usize],
        };
        if !differs {
            continue;
        }
        if zero {
            zero_mask |= 1 << b;
        } else {
            send_mask |= 1 << b;
            if r.start != kept {
                raw.copy_within(r.clone(), kept);
            }
            kept += r.len();
        }
    }
    raw.truncate(kept);
    let raw_len = raw.len() as u32;
    let (encoding, payload) = match zstd_level
        .filter(|l| compressible(&raw, *l))
        .map(|l| compress(&raw, l))
    {
        Some(Ok(z)) if z.len() < raw.len() => (Encoding::Zstd, Bytes::from(z)),
        _ => (Encoding::Raw, Bytes::from(raw)),
    };
    Ok(DataFrame {
        chunk,
        send_mask,
        zero_mask,
        encoding,
        raw_len,
        payload,
    })
}

/// Bytes compressed as a probe before compressing a whole payload.
const PROBE: usize = 2 * BLOCK_SIZE as usize;

/// Whether compressing `raw` looks worthwhile, judged by compressing its first [`PROBE`] bytes: zstd spends as long
/// on random data (encrypted or already compressed guest files) as on text, only to have the result discarded. A
/// probe that saves less than 1/32 sends the payload raw; a payload that small is compressed without probing.
fn compressible(raw: &[u8], level: i32) -> bool {
    if raw.len() <= 2 * PROBE {
        return true;
    }
    let probe = &raw[..PROBE];
    compress(probe, level).is_ok_and(|z| z.len() < probe.len() - probe.len() / 32)
}

/// zstd with one reusable context per thread: a fresh context per 64 KiB chunk costs as much as compressing it.
fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static CONTEXT: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    CONTEXT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match slot.as_mut() {
            Some((_, c)) => c.compress(raw),
            None => zstd::bulk::compress(raw, level),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::block_digests;
    use rand::{RngCore, SeedableRng};

    fn volume_of(dir: &tempfile::TempDir, data: &[u8]) -> anyhow::Result<(Volume, Geometry)> {
        let p = dir.path().join("v.img");
        std::fs::write(&p, data)?;
        let g = Geometry::new(data.len() as u64, 65536).map_err(anyhow::Error::msg)?;
        Ok((Volume::open_source(&p)?, g))
    }

    #[test]
    fn random_chunks_travel_raw_and_text_chunks_compressed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut data = vec![0u8; 2 * 65536];
        rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut data[..65536]);
        let words = b"the replica of a volume keeps every block of the snapshot ";
        for (i, b) in data[65536..].iter_mut().enumerate() {
            *b = words[i % words.len()];
        }
        let (volume, g) = volume_of(&dir, &data)?;

        let random = build_data(&volume, g, 0, None, Some(1))?;
        assert_eq!(random.encoding, Encoding::Raw);
        assert_eq!((random.send_mask, random.zero_mask), (0xffff, 0));
        assert_eq!(&random.payload[..], &data[..65536]);

        let text = build_data(&volume, g, 1, None, Some(1))?;
        assert_eq!(text.encoding, Encoding::Zstd);
        assert_eq!(text.raw_len, 65536);
        assert!(
            text.payload.len() < 65536 / 8,
            "{} bytes",
            text.payload.len()
        );
        let back = zstd::bulk::decompress(&text.payload, 65536)?;
        assert_eq!(&back[..], &data[65536..]);
        Ok(())
    }

    #[test]
    fn only_blocks_that_differ_from_the_target_travel_and_zero_blocks_as_a_mask(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut data = vec![7u8; 65536];
        data[4096..8192].fill(0);
        data[40960] = 1;
        let (volume, g) = volume_of(&dir, &data)?;
        let mut theirs = block_digests(&data);
        theirs[1] = Digest::of(&[9u8; 4096]); // target block 1 is not zero: it must be zeroed
        theirs[10] = Digest::of(&[7u8; 4096]); // target block 10 differs: it must travel
        let d = build_data(&volume, g, 0, Some(&theirs), Some(1))?;
        assert_eq!(d.send_mask, 1 << 10);
        assert_eq!(d.zero_mask, 1 << 1);
        assert_eq!(d.raw_len, 4096);
        Ok(())
    }

    #[test]
    fn a_chunk_that_changed_since_the_scan_is_found_by_reading_it_again() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut data = vec![5u8; 4 * 65536];
        let (volume, g) = volume_of(&dir, &data)?;
        let scanned: Vec<(u64, Digest)> = (0..4)
            .map(|c| (c, Digest::of(&data[c as usize * 65536..][..65536])))
            .collect();
        assert_eq!(changed_chunk(&volume, g, &scanned)?, None);
        data[2 * 65536 + 100] = 6;
        let (volume, g) = volume_of(&dir, &data)?;
        assert_eq!(changed_chunk(&volume, g, &scanned)?, Some(2));
        assert_eq!(
            changed_chunk(&volume, g, &scanned[..2])?,
            None,
            "only the chunks asked about"
        );
        let err = Error::VolumeChanged { chunk: 2 };
        assert!(err.is_retryable());
        assert!(
            err.to_string().contains("(chunk 2): sync from a snapshot"),
            "{err}"
        );
        Ok(())
    }
}
