//! One session of the source: the scan that announces digests within the window, the reader of the
//! destination's NEED and ACK, and the servicer that answers NEEDs with DATA.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::mpsc;

use super::credit::Credit;
use super::data::{build_data, changed_chunk, compress_in_lanes, count_data};
use super::plan::Announcer;
use super::push::{self, Pusher};
use super::{Compression, SyncReport, ABORT_LOOKOUT, NEED_BATCH};
use crate::adapt::{Chooser, Levels, MIN_LEVEL};
use crate::chunk::{Digest, Geometry};
use crate::codec::{AbortCode, DataFrame, Encoding, FrameReader, Message};
use crate::error::{Error, Result};
use crate::net::{tell_peer, within, Outbox, ABORT_GRACE};
use crate::stats::{add, Figures};
use crate::volume::Volume;
use crate::zstream::{Encoder, MAX_LANES};

pub(super) struct Session {
    pub volume: Arc<Volume>,
    pub geometry: Geometry,
    pub figures: Arc<Figures>,
    /// The `--read-depth` pool: the scan's and the servicer's reads run on it.
    pub pool: Arc<rayon::ThreadPool>,
    pub credit: Arc<Credit>,
    pub announced: Arc<AtomicU64>,
    pub window: u64,
    pub zstd_level: Option<i32>,
    pub compression: Compression,
    /// What the scanner announces; taken by it when the session starts.
    pub announcer: Mutex<Option<Announcer>>,
}

impl Session {
    /// Runs the scan and the NEED service until COMMIT; on failure tells the peer why.
    pub async fn drive<R: tokio::io::AsyncRead + Unpin, W>(
        &self,
        reader: &mut FrameReader<R>,
        outbox: Outbox,
        writer: &mut Option<tokio::task::JoinHandle<Result<W>>>,
        idle: Duration,
    ) -> Result<SyncReport> {
        let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<Error>();
        let (need_tx, need_rx) = mpsc::channel::<(u64, Option<Vec<Digest>>)>(self.window as usize);
        let pushing = self
            .announcer
            .lock()
            .is_ok_and(|a| a.as_ref().is_some_and(Announcer::pushes));
        let (push_lanes, need_lanes) = push::lanes(pushing, lane_count());
        let scanner = self.spawn_scanner(outbox.clone(), fail_tx.clone(), push_lanes);
        let servicer = self.spawn_servicer(need_rx, outbox.clone(), fail_tx, need_lanes);
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
                // The scan or the servicer stops with Cancelled when its outbox closed, i.e. the writer ended: the
                // writer's own outcome (a send timeout, a broken socket) is the cause, and the next turn gets it.
                Some(e) = fail_rx.recv() => match e {
                    Error::Cancelled(_) if writer.is_some() => continue,
                    e => Err(e),
                },
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
                        Ok(Some((ours, mut announcer)))
                            if ours == digest
                                && chunk_count == self.geometry.chunk_count()
                                && volume_size == self.geometry.volume_size() =>
                        {
                            self.figures.set_volume_digest(ours);
                            announcer.commit(ours);
                            Ok(SyncReport {
                                geometry: self.geometry,
                                volume_digest: ours,
                            })
                        }
                        Ok(Some((ours, _))) => Err(Error::VolumeDigestMismatch {
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
        let (volume, geometry, pool) = (self.volume.clone(), self.geometry, self.pool.clone());
        let changed = tokio::task::spawn_blocking(move || {
            pool.install(|| changed_chunk(&volume, geometry, &candidates))
        })
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
        if chunk >= self.announced.load(Ordering::Acquire) || !self.credit.is_open(chunk) {
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

    /// Scans the snapshot (or the chunks of its change list) and announces within the window what the session's
    /// kind asks for, then END. Returns the volume digest and the announcer, which keeps the next manifest.
    fn spawn_scanner(
        &self,
        outbox: Outbox,
        fail: mpsc::UnboundedSender<Error>,
        push_lanes: std::ops::Range<usize>,
    ) -> tokio::task::JoinHandle<Option<(Digest, Announcer)>> {
        let (volume, geometry, credit, announced) = (
            self.volume.clone(),
            self.geometry,
            self.credit.clone(),
            self.announced.clone(),
        );
        let (window, figures) = (self.window, self.figures.clone());
        let pool = self.pool.clone();
        let level = self.zstd_level.unwrap_or(MIN_LEVEL);
        let compress = self.compression.wanted(true, false).then_some(level);
        let announcer = self.announcer.lock().ok().and_then(|mut a| a.take());
        tokio::task::spawn_blocking(move || {
            let Some(mut announcer) = announcer else {
                let _ = fail.send(Error::Protocol("the session has no announcer".into()));
                return None;
            };
            let stopped = || Error::Cancelled("session end");
            let mut pusher = Pusher::new(push_lanes, level);
            // Chunks that differ from the base (or all, in a full comparison) are announced in chunk order: pushed
            // with their listed blocks, or in DIGESTS runs.
            let zeros = crate::chunk::ZeroDigests::new(geometry);
            let delta = announcer.is_delta();
            let block_file = announcer.block_file();
            // A delta by manifest pushes the blocks that differ from the base's (protocol 8), read again here.
            let differing = match (&block_file, announcer.pushes_differing()) {
                (Some(file), true) => announcer.known_blocks(file),
                _ => None,
            };
            let reread = volume.clone();
            let mut announce = |announcer: &mut Announcer,
                                scanned: Vec<(u64, Digest)>,
                                blocks: Option<(u64, crate::scan::Blocks)>,
                                mut pushed: Vec<push::Pushed>| {
                let chunks = announcer.feed(scanned)?;
                // Before this segment's entries are replaced below: they still hold the base's block digests.
                if let (Some(known), Some((first, blocks))) = (&differing, &blocks) {
                    let segment = (*first, blocks);
                    pushed = push::differing(
                        &pool, &reread, geometry, known, &zeros, &chunks, segment, compress,
                    )?;
                }
                // The block digests of what this sync hashed, for later deltas by change list: a full comparison's
                // whole segment, and a delta's too when the file was empty (new, or after `--block-digests off`);
                // otherwise a delta's changed chunks (below: the others' entries still hold).
                let whole = block_file.as_ref().filter(|f| !delta || f.was_empty());
                if let (Some(file), Some((first, blocks))) = (whole, &blocks) {
                    file.write_run(*first, blocks.flat(), blocks.stride());
                }
                let Some(last) = chunks.last().map(|(c, _)| *c) else {
                    return Ok(());
                };
                pushed
                    .retain(|(d, _, _)| chunks.binary_search_by_key(&d.chunk, |(c, _)| *c).is_ok());
                let (mut pushed, covers): (Vec<(DataFrame, bool)>, Vec<Vec<Digest>>) = pushed
                    .into_iter()
                    .map(|(d, worth, c)| ((d, worth), c))
                    .unzip();
                if pushed.iter().any(|(_, worth)| *worth) {
                    pool.install(|| pusher.compress(&mut pushed))?;
                }
                if !credit.wait(chunks.len() as u64, window) {
                    return Err(stopped());
                }
                credit.announce(&chunks);
                // Only in a delta, whose announced chunks are the changed ones: in a full comparison most of them
                // are equal on the target, and keeping every chunk's digests to answer a few NEEDs measured no
                // faster than reading those chunks again.
                let changed = block_file.as_ref().filter(|f| delta && !f.was_empty());
                if let (Some(file), Some((first, blocks))) = (changed, &blocks) {
                    for &(c, _) in &chunks {
                        let count = geometry.blocks_in_chunk(c) as usize;
                        if let Some(b) = c
                            .checked_sub(*first)
                            .and_then(|at| blocks.of(at as usize, count))
                        {
                            file.write(c, b);
                        }
                    }
                }
                if let (true, Some((first, blocks))) = (delta, &blocks) {
                    // Before DIGESTS go out: their NEEDs take these. A zero chunk gets no NEED.
                    credit.keep_blocks(chunks.iter().filter_map(|&(c, d)| {
                        let count = geometry.blocks_in_chunk(c) as usize;
                        let at = c.checked_sub(*first)? as usize;
                        (d != zeros.for_chunk(c)).then_some(())?;
                        Some((c, blocks.of(at, count)?.into()))
                    }));
                }
                announced.store(last + 1, Ordering::Release);
                let pushed = pushed.into_iter().map(|(d, _)| d).zip(covers).collect();
                for msg in push::announcements(&chunks, pushed) {
                    if let Message::Blocks { data, .. } = &msg {
                        count_data(&figures, data, true);
                        add(&figures.pushed_chunks, 1);
                        credit.pushed(data.chunk);
                    }
                    outbox.blocking_send(msg).map_err(|_| stopped())?;
                }
                Ok(())
            };
            let bytes_read = figures.bytes_read.clone();
            let pushing = announcer.pushes_listed();
            let known = match (&block_file, pushing) {
                (Some(file), true) => announcer.known_blocks(file),
                _ => None,
            };
            let entries = block_file.clone();
            let scanned = match announcer.take_selection() {
                Some(list) => {
                    let list = Arc::new(list);
                    let listed = list.clone();
                    crate::scan::scan_selected(
                        Some(pool.clone()),
                        volume,
                        geometry,
                        list,
                        bytes_read,
                        crate::scan::Keep {
                            blocks: pushing,
                            base: known.map(|k| k as Arc<dyn crate::scan::BaseBlocks>),
                            keep: move |chunk, read: crate::scan::Read<'_>| {
                                if let (Some(file), false) = (&entries, read.blocks.is_empty()) {
                                    file.write(chunk, read.blocks);
                                }
                                let push = pushing && !read.summary.zero;
                                push.then(|| {
                                    let mask = listed.listed_blocks(chunk);
                                    let (bytes, blocks) = (read.bytes, read.blocks);
                                    push::listed_blocks(
                                        geometry, chunk, bytes, blocks, mask, compress,
                                    )
                                })
                            },
                        },
                        |segment| {
                            let mut digests = Vec::with_capacity(segment.len());
                            let mut pushed = Vec::new();
                            for (c, s, frame) in segment {
                                digests.push((c, s.digest));
                                pushed.extend(frame);
                            }
                            announce(&mut announcer, digests, None, pushed)
                        },
                    )
                }
                None => {
                    // A delta keeps the scan's block digests of the chunks it announces (`announce`); with a
                    // block digests file, every sync writes them there.
                    let keep_blocks = delta || block_file.is_some();
                    crate::scan::scan_keeping_blocks(
                        Some(pool.clone()),
                        volume,
                        geometry,
                        bytes_read,
                        keep_blocks,
                        |first, summaries, blocks| {
                            let digests =
                                (first..).zip(summaries.iter().map(|s| s.digest)).collect();
                            let blocks = keep_blocks.then_some((first, blocks));
                            announce(&mut announcer, digests, blocks, Vec::new())
                        },
                    )
                }
            };
            let r = scanned.and_then(|()| {
                let digest = announcer.finish()?;
                add(&figures.change_list_missed, announcer.missed());
                tracing::debug!("scan finished, END sent");
                // Every chunk is announced (or proven equal to the base): ACKs may now cover all of them.
                announced.store(geometry.chunk_count(), Ordering::Release);
                outbox
                    .blocking_send(Message::End {
                        chunk_count: geometry.chunk_count(),
                        volume_size: geometry.volume_size(),
                        digest,
                    })
                    .map_err(|_| stopped())?;
                // While the destination makes the target durable: the manifest's fsync overlaps its own.
                announcer.seal(digest);
                Ok(digest)
            });
            match r {
                Ok(d) => Some((d, announcer)),
                Err(e) => {
                    let _ = fail.send(e);
                    None
                }
            }
        })
    }

    /// Answers NEEDs in batches, building DATA frames on the read-depth pool.
    fn spawn_servicer(
        &self,
        mut needs: mpsc::Receiver<(u64, Option<Vec<Digest>>)>,
        outbox: Outbox,
        fail: mpsc::UnboundedSender<Error>,
        lanes: std::ops::Range<usize>,
    ) -> tokio::task::JoinHandle<()> {
        let (volume, geometry, figures, level, compression) = (
            self.volume.clone(),
            self.geometry,
            self.figures.clone(),
            self.zstd_level,
            self.compression,
        );
        let (pool, credit) = (self.pool.clone(), self.credit.clone());
        // A batch keeps every reader thread busy (and at most one chunk per thread waits to be sent).
        let batch_size = NEED_BATCH.max(pool.current_num_threads());
        tokio::task::spawn_blocking(move || {
            let mut chooser = Chooser::new();
            let mut levels = Levels::new(
                level.unwrap_or(MIN_LEVEL),
                level.is_none() && compression == Compression::Auto,
            );
            let first_lane = lanes.start;
            let mut encoders: Vec<Option<Encoder>> = lanes.map(|_| None).collect();
            let mut last = Instant::now();
            while let Some(first) = needs.blocking_recv() {
                let mut batch = vec![first];
                while batch.len() < batch_size {
                    match needs.try_recv() {
                        Ok(n) => batch.push(n),
                        Err(_) => break,
                    }
                }
                volume.will_need(batch.iter().map(|(chunk, _)| {
                    let (offset, len) = geometry.chunk_range(*chunk);
                    (offset, len as u64)
                }));
                let measured = chooser.compress();
                let count = batch.len() as u64;
                let level = levels.level();
                let (mut compressing, mut sample) = (Duration::ZERO, None);
                let built: Result<Vec<(DataFrame, bool)>> = pool.install(|| {
                    let mut frames = batch
                        .into_par_iter()
                        .map(|(chunk, blocks)| {
                            let level = compression
                                .wanted(blocks.is_some(), measured)
                                .then_some(level);
                            let scanned = blocks.as_ref().and_then(|_| credit.take_blocks(chunk));
                            build_data(
                                &volume,
                                geometry,
                                chunk,
                                blocks.as_deref(),
                                scanned.as_deref(),
                                level,
                            )
                        })
                        .collect::<Result<Vec<_>>>()?;
                    sample = frames
                        .iter()
                        .find(|(_, w)| *w)
                        .map(|(d, _)| d.payload.clone());
                    let start = Instant::now();
                    compress_in_lanes(&mut frames, &mut encoders, first_lane, level)?;
                    compressing = start.elapsed();
                    Ok(frames)
                });
                let frames = match built {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = fail.send(e);
                        return;
                    }
                };
                let (mut raw, mut waiting, mut lanes) = (0, Duration::ZERO, 0);
                for (d, _) in frames {
                    // A NEED for a pushed chunk answers a chunk whose pushed blocks were counted.
                    count_data(&figures, &d, !credit.was_pushed(d.chunk));
                    raw += u64::from(d.raw_len);
                    if matches!(d.encoding, Encoding::Lane(_)) {
                        lanes += u64::from(d.raw_len);
                    }
                    let start = Instant::now();
                    if outbox.blocking_send(Message::Data(d)).is_err() {
                        return;
                    }
                    waiting += start.elapsed();
                }
                let now = Instant::now();
                chooser.record(count, raw, now - last, waiting, levels.raised());
                let next = levels.record(compressing, waiting, now - last, lanes, sample);
                figures.set_zstd_level(next, levels.highest());
                last = now;
            }
        })
    }
}

/// Compression lanes: one per core, at most [`MAX_LANES`]. Fewer lanes would give each more context (smaller
/// payloads) but compress a full sync's chunks on fewer cores.
fn lane_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_LANES)
}
