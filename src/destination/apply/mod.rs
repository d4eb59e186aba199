//! The destination's session worker: compares digests, asks for changed blocks, verifies and writes them.
//!
//! Runs on a blocking thread and owns every write to the target. Invariants:
//! - a block is written only after the rebuilt chunk it belongs to hashed to the source's digest;
//! - DATA is accepted only for an open NEED, once (replays and duplicates are protocol violations);
//! - success is returned only after END, every chunk compared, every NEED answered, the target fsynced and the
//!   volume digest of what the target holds equal to the source's.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use rayon::prelude::*;

mod compare;
mod push;

use compare::DIGESTS_BATCH;

use super::basis::Basis;
use super::finals::FinalDigests;
use super::flush::Flusher;
use super::inbox::Inbox;
use super::verify::{decode_lanes, verify_and_write, Base};
use crate::chunk::{
    block_digests, block_range, runs, ChunkSummary, Digest, Geometry, VolumeDigest, ZeroDigests,
};
use crate::codec::{DataFrame, Message};
use crate::error::{Error, Result};
use crate::manifest::{BlockFile, Reader, Role, Store};
use crate::net::Outbox;
use crate::stats::{add, Figures};
use crate::volume::Volume;
use push::report_misses;

/// The destination acknowledges compared chunks this often.
pub const ACK_EVERY: u64 = 1024;

/// DATA frames verified together on all cores.
const DATA_BATCH: usize = 32;

/// A batch of DATA or BLOCKS frames with fewer payload bytes than this is verified and written on the session
/// worker's own thread. Handing a batch to rayon from this (non-rayon) thread wakes a pool thread and puts the
/// worker to sleep until the batch is done: two thread switches, which on a 2-core VM cost more than hashing and
/// writing a few 4 KiB blocks. A delta's batches are mostly of that kind (a change list's chunks carry 1-2 blocks
/// each); a full sync's 64 KiB chunks still go to all cores.
const ON_CORES_BYTES: usize = 256 * 1024;

/// Whether a batch of `frames` is worth verifying on all cores (see [`ON_CORES_BYTES`]).
fn on_cores<'a>(frames: impl IntoIterator<Item = &'a DataFrame>) -> bool {
    frames
        .into_iter()
        .map(|d| d.raw_len as usize)
        .sum::<usize>()
        >= ON_CORES_BYTES
}

/// Segments of local digests from the target's scan.
pub type LocalDigests = Receiver<Result<(u64, Vec<ChunkSummary>)>>;

/// How a session applies the source's messages.
#[derive(Clone)]
pub struct Options {
    /// Chunks the source may announce beyond those settled.
    pub window: u32,
    /// After the final fsync, read the target back and check the volume digest of the bytes read.
    pub read_back: bool,
    /// The destination's block digests file (see `manifest::BlockFile`), with a state directory.
    pub blocks: Option<Arc<BlockFile>>,
}

/// A chunk with an open NEED.
pub(super) struct Open {
    /// The source's digest of it.
    expected: Digest,
    /// The target chunk's block digests as the NEED sent them; `None`: the target chunk was all zeros.
    blocks: Option<Vec<Digest>>,
}

/// The session state that applies the source's messages to the target.
pub struct Apply {
    target: Arc<Volume>,
    geometry: Geometry,
    zeros: ZeroDigests,
    /// A full comparison: the target's scan. `None` in a delta session, which does not hash the target.
    local: Option<LocalDigests>,
    local_ready: VecDeque<ChunkSummary>,
    /// A full comparison with a manifest: what the manifest says each target chunk holds (a target chunk that
    /// holds something else was written behind the destination's back, or the manifest is stale).
    drift: Option<Reader>,
    /// Announced chunks not yet covered by an ACK we sent (the window counts these).
    pending: VecDeque<u64>,
    delta: bool,
    /// A delta session, where the source may push blocks (BLOCKS: by change list since protocol 5, by manifest
    /// since 8).
    pushes: bool,
    /// Where the manifest lives; it is invalidated before the first write of the session.
    store: Arc<Store>,
    wrote: bool,
    basis: Basis,
    /// The buffer [`Apply::target_block_digests`] reads into.
    scratch: Vec<u8>,
    out: Outbox,
    figures: Arc<Figures>,
    window: u64,
    /// The next chunk index DIGESTS must announce.
    next: u64,
    last_ack: u64,
    /// The chunks with an open NEED.
    open: HashMap<u64, Open>,
    finals: FinalDigests,
    end: Option<Digest>,
    /// A run of zeroing not yet issued: (offset, len).
    zero_run: Option<(u64, u64)>,
    /// Background fsyncs while the sync runs.
    flusher: Option<Flusher>,
    read_back: bool,
    /// The target's size when the session opened it: another writer that truncates or extends it shows here.
    target_size: u64,
    /// The decoders of the source's compression lanes, created when a lane is first used.
    lanes: Vec<Option<crate::zstream::Decoder>>,
    /// The block digests of the target's chunks as this session hashes and writes them; in a delta, what the
    /// target holds where an entry proves itself against the base.
    blocks: Option<Arc<BlockFile>>,
}

impl Apply {
    /// A worker for one session.
    pub fn new(
        target: Arc<Volume>,
        geometry: Geometry,
        local: Option<LocalDigests>,
        out: Outbox,
        figures: Arc<Figures>,
        options: Options,
        mut basis: Basis,
    ) -> Self {
        let store = basis.store.clone();
        let delta = basis.kind.is_delta();
        let pushes = delta;
        let base = basis.base.take();
        // A delta keeps its next manifest as changes to its base; a full comparison writes it whole, and counts
        // what the target holds against the base (`drift`).
        let (patch, drift) = match delta {
            true => (base.map(|b| store.patch(b)), None),
            false => (None, base),
        };
        let sink = match patch {
            Some(_) => None,
            None => {
                let sink = crate::delta::target_identity(&target)
                    .map_err(|e| e.to_string())
                    .and_then(|(identity, _)| {
                        store
                            .writer(Role::Destination, geometry, &identity)
                            .map_err(|e| e.to_string())
                    });
                match sink {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!("the destination's manifest will not be kept: {e}");
                        None
                    }
                }
            }
        };
        Apply {
            drift,
            pending: VecDeque::new(),
            delta,
            pushes,
            store,
            wrote: false,
            basis,
            scratch: Vec::new(),
            target_size: target.size(),
            read_back: options.read_back,
            target,
            geometry,
            zeros: ZeroDigests::new(geometry),
            local,
            local_ready: VecDeque::new(),
            out,
            figures,
            window: u64::from(options.window),
            next: 0,
            last_ack: 0,
            open: HashMap::new(),
            finals: FinalDigests::new(geometry, patch, sink),
            end: None,
            zero_run: None,
            flusher: None,
            lanes: (0..crate::zstream::MAX_LANES).map(|_| None).collect(),
            blocks: options.blocks,
        }
    }

    /// Applies messages until the sync is durable and verified; returns the volume digest.
    pub fn run(mut self, inbox: &mut Inbox) -> Result<Digest> {
        let result = self.serve(inbox);
        // A damaged manifest is dropped whether or not the target was written, so that the retry compares in full;
        // a session that wrote and failed drops the base it set aside, which no longer describes the target.
        let drop = match &result {
            Err(Error::ManifestDamaged(_)) => true,
            Err(_) => self.wrote,
            Ok(_) => false,
        };
        if drop {
            if let Err(e) = self.store.invalidate(Role::Destination) {
                tracing::warn!("cannot drop the destination's manifest: {e}");
            }
        }
        result
    }

    fn serve(&mut self, inbox: &mut Inbox) -> Result<Digest> {
        let mut held = None;
        loop {
            if self.done() {
                return self.finish();
            }
            let Some(msg) = held.take().or_else(|| inbox.blocking_recv()) else {
                return Err(Error::PeerClosed("sync"));
            };
            match msg {
                Message::Digests { first, digests } => {
                    // A delta's announcements are scattered, often one chunk per frame: frames already waiting
                    // are compared together, on all cores.
                    let mut frames = vec![(first, digests)];
                    let mut chunks = frames[0].1.len();
                    while self.delta && chunks < DIGESTS_BATCH {
                        match inbox.try_recv() {
                            Some(Message::Digests { first, digests }) => {
                                chunks += digests.len();
                                frames.push((first, digests));
                            }
                            Some(other) => {
                                held = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    self.on_digests(&frames)?;
                    self.acknowledge()?;
                }
                Message::Blocks {
                    digest,
                    cover,
                    data,
                } => {
                    let first = push::Push {
                        digest,
                        cover,
                        data,
                    };
                    let batch = gather(inbox, &mut held, first, |m| match m {
                        Message::Blocks {
                            digest,
                            cover,
                            data,
                        } => Ok(push::Push {
                            digest,
                            cover,
                            data,
                        }),
                        other => Err(other),
                    });
                    self.on_blocks(batch)?;
                    self.acknowledge()?;
                }
                Message::Data(d) => {
                    let batch = gather(inbox, &mut held, d, |m| match m {
                        Message::Data(d) => Ok(d),
                        other => Err(other),
                    });
                    self.on_data(batch)?;
                    self.acknowledge()?;
                }
                Message::End {
                    chunk_count,
                    volume_size,
                    digest,
                } => {
                    tracing::debug!("END received, {} NEEDs open", self.open.len());
                    if chunk_count != self.geometry.chunk_count()
                        || volume_size != self.geometry.volume_size()
                    {
                        return Err(Error::Protocol(format!(
                            "END announces {chunk_count} chunks of a {volume_size}-byte volume, HELLO said {} of {}",
                            self.geometry.chunk_count(),
                            self.geometry.volume_size()
                        )));
                    }
                    if self.end.replace(digest).is_some() {
                        return Err(Error::Protocol("second END".into()));
                    }
                    if self.delta {
                        // Every chunk not announced is equal to the base.
                        self.next = self.geometry.chunk_count();
                        self.finals.base_through(self.next)?;
                        self.acknowledge()?;
                    }
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected {} from the source",
                        other.name()
                    )))
                }
            }
        }
    }

    fn done(&self) -> bool {
        self.end.is_some() && self.next == self.geometry.chunk_count() && self.open.is_empty()
    }

    /// Makes the sync durable and checks it; keeps the next manifest only if every check passed. A check that
    /// fails (the digests differ, the target was resized, its bytes read back differ) also drops the manifest it
    /// started from: whatever the cause, it no longer describes the target, and the retry compares in full.
    fn finish(&mut self) -> Result<Digest> {
        report_misses(&self.figures, self.basis.kind);
        tracing::debug!("every chunk settled");
        let result = self.durable_and_checked();
        if result.is_err() {
            if let Err(e) = self.store.invalidate(Role::Destination) {
                tracing::warn!("cannot drop the destination's manifest: {e}");
            }
        }
        result
    }

    fn durable_and_checked(&mut self) -> Result<Digest> {
        self.flush_zero_run()?;
        let (ours, manifest) = self.finals.finish()?;
        let theirs = self.end.unwrap_or(ours);
        if ours != theirs {
            return Err(Error::VolumeDigestMismatch {
                source_digest: theirs.to_hex(),
                destination_digest: ours.to_hex(),
            });
        }
        // The next manifest is written and fsynced under a temporary name while the target is made durable, so
        // that the two fsyncs overlap; it becomes the manifest only once the target is durable and checked.
        let flushing = std::time::Instant::now();
        let (target, basis, flusher) = (&self.target, &self.basis, self.flusher.take());
        let (durable, sealed) = std::thread::scope(|scope| {
            let sealing = manifest.map(|m| scope.spawn(move || basis.seal(m, ours, target)));
            let durable = flusher
                .map_or(Ok(()), Flusher::finish)
                .and_then(|()| target.sync());
            (durable, sealing.and_then(|h| h.join().ok().flatten()))
        });
        durable?;
        tracing::info!("target fsynced in {:.2}s", flushing.elapsed().as_secs_f64());
        // `ours` is built from the digests this session computed or verified, not from the target's bytes now:
        // these two checks look at the target itself.
        let size = self.target.current_size()?;
        if size != self.target_size {
            return Err(Error::TargetResized {
                path: self.target.path().to_owned(),
                before: self.target_size,
                after: size,
            });
        }
        if self.read_back {
            let reading = std::time::Instant::now();
            let found = read_back(&self.target, self.geometry, &self.figures)?;
            tracing::info!(
                "target read back in {:.2}s",
                reading.elapsed().as_secs_f64()
            );
            if found != theirs {
                return Err(Error::ReadBackMismatch {
                    path: self.target.path().to_owned(),
                    found: found.to_hex(),
                    expected: theirs.to_hex(),
                });
            }
        }
        if let Some(sealed) = sealed {
            super::basis::publish(sealed);
        }
        Ok(ours)
    }

    pub(super) fn send(&self, msg: Message) -> Result<()> {
        self.out
            .blocking_send(msg)
            .map_err(|_| Error::PeerClosed("sync"))
    }

    /// Sends ACK for the chunks *settled* in order: compared, and written when they needed data. Acknowledging
    /// only settled chunks is what bounds the open NEEDs by the window (see "Flow control" in the protocol). An
    /// ACK goes out every quarter window, and whenever the destination has caught up with the announcements.
    fn acknowledge(&mut self) -> Result<()> {
        let settled = self.finals.settled();
        let every = (self.window / 4).clamp(1, ACK_EVERY);
        // Caught up (every announced chunk settled): the source may be waiting for exactly this credit.
        let due = settled - self.last_ack >= every || settled >= self.next;
        if settled > self.last_ack && due {
            self.last_ack = settled;
            while self.pending.front().is_some_and(|c| *c < settled) {
                self.pending.pop_front();
            }
            self.send(Message::Ack { through: settled })?;
        }
        Ok(())
    }

    /// Before the session's first write to the target: its manifest no longer describes it. Its base is set aside
    /// durably before the write, so no crash can leave a manifest that claims what the target no longer holds; a
    /// delta's patch still reads it, and its commit puts it back.
    pub(super) fn before_write(&mut self) -> Result<()> {
        if !self.wrote {
            self.store
                .set_aside(Role::Destination)
                .map_err(|e| Error::State(e.to_string()))?;
            self.wrote = true;
        }
        Ok(())
    }

    /// The block digests of target chunk `chunk`, read into a buffer kept across chunks.
    pub(super) fn target_block_digests(&mut self, chunk: u64) -> Result<Vec<Digest>> {
        let (offset, len) = self.geometry.chunk_range(chunk);
        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(len, 0);
        let read = self.target.read_exact_at(&mut buf, offset);
        let digests = read.map(|()| block_digests(&buf));
        self.scratch = buf;
        add(&self.figures.bytes_read, len as u64);
        digests
    }

    /// Verifies a batch of DATA frames on all cores; each worker writes the data blocks of the chunks it verified,
    /// and zero blocks are then issued in order (merged into runs).
    fn on_data(&mut self, mut batch: Vec<DataFrame>) -> Result<()> {
        let wire = decode_lanes(&mut batch, &mut self.lanes)?;
        let mut claimed = Vec::with_capacity(batch.len());
        for d in batch {
            let Some(open) = self.open.remove(&d.chunk) else {
                return Err(Error::Protocol(format!(
                    "DATA for chunk {} that has no open NEED (unsolicited, replayed or duplicated)",
                    d.chunk
                )));
            };
            claimed.push((d, open));
        }
        self.before_write()?;
        let written: Vec<Result<()>> = {
            let (target, geometry, figures) = (&*self.target, self.geometry, &*self.figures);
            let file = self.blocks.as_deref();
            let one = |(d, open): &(DataFrame, Open)| {
                let base = match &open.blocks {
                    Some(blocks) => Base::Blocks(blocks),
                    None => Base::Zeros,
                };
                let now = verify_and_write(target, geometry, figures, d, open.expected, base)?;
                if let Some(file) = file {
                    file.write(d.chunk, &now);
                }
                Ok(())
            };
            if on_cores(claimed.iter().map(|(d, _)| d)) {
                claimed.par_iter().map(one).collect()
            } else {
                claimed.iter().map(one).collect()
            }
        };
        for (((d, open), result), wire) in claimed.into_iter().zip(written).zip(wire) {
            result?;
            add(&self.figures.compressed_bytes, wire as u64);
            self.settle_written(&d, open.expected)?;
        }
        Ok(())
    }

    /// A DATA or BLOCKS frame verified and its data blocks written: its writes go to the write-behind, its zero
    /// blocks are zeroed, it is counted, and its chunk is settled with `expected`.
    pub(super) fn settle_written(&mut self, d: &DataFrame, expected: Digest) -> Result<()> {
        let flusher = match &mut self.flusher {
            Some(f) => f,
            None => self.flusher.insert(Flusher::new(self.target.clone())?),
        };
        flusher.wrote(u64::from(d.raw_len));
        self.zero_blocks_of(d)?;
        let f = &self.figures;
        add(&f.chunks_sent, 1);
        add(&f.blocks_sent, u64::from(d.send_mask.count_ones()));
        add(&f.zero_blocks, u64::from(d.zero_mask.count_ones()));
        add(&f.data_bytes, u64::from(d.raw_len));
        self.finals.push(d.chunk, expected)
    }

    /// Zeroes the blocks a verified DATA or BLOCKS frame marks as zeros.
    fn zero_blocks_of(&mut self, d: &DataFrame) -> Result<()> {
        let (offset, len) = self.geometry.chunk_range(d.chunk);
        for (b0, b1) in runs(d.zero_mask) {
            let start = block_range(len, b0).start as u64;
            let end = block_range(len, b1 - 1).end as u64;
            self.zero(offset + start, end - start)?;
        }
        Ok(())
    }

    /// Zeroes a range, merging adjacent ranges into one call.
    pub(super) fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.before_write()?;
        match &mut self.zero_run {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                self.flush_zero_run()?;
                self.zero_run = Some((offset, len));
            }
        }
        Ok(())
    }

    fn flush_zero_run(&mut self) -> Result<()> {
        if let Some((o, l)) = self.zero_run.take() {
            self.target.zero_range(o, l)?;
        }
        Ok(())
    }
}

/// `first` and the messages of its kind already waiting in `inbox` (`take` says which), up to [`DATA_BATCH`]; the
/// first message of another kind is kept in `held`.
fn gather<T>(
    inbox: &mut Inbox,
    held: &mut Option<Message>,
    first: T,
    take: impl Fn(Message) -> std::result::Result<T, Message>,
) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < DATA_BATCH {
        match inbox.try_recv().map(&take) {
            Some(Ok(item)) => batch.push(item),
            Some(Err(other)) => {
                *held = Some(other);
                break;
            }
            None => break,
        }
    }
    batch
}

/// The volume digest of the target's bytes as they read now (after the final fsync): one more full read and hash
/// of `[0, volume_size)`, on all cores, counted in `bytes_read`.
fn read_back(target: &Arc<Volume>, geometry: Geometry, figures: &Figures) -> Result<Digest> {
    let mut digest = VolumeDigest::new(geometry);
    crate::scan::scan(
        target.clone(),
        geometry,
        figures.bytes_read.clone(),
        |_, summaries| {
            summaries.iter().for_each(|s| digest.push(&s.digest));
            Ok(())
        },
    )?;
    Ok(digest.finish())
}
