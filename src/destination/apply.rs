//! The destination's session worker: compares digests, asks for changed blocks, verifies and writes them.
//!
//! Runs on a blocking thread and owns every write to the target. Invariants:
//! - a block is written only after the rebuilt chunk it belongs to hashed to the source's digest;
//! - DATA is accepted only for an open NEED, once (replays and duplicates are protocol violations);
//! - success is returned only after END, every chunk compared, every NEED answered, the target fsynced and the
//!   volume digest of what the target holds equal to the source's.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use crate::chunk::{
    block_digests, block_range, blocks_in, ChunkSummary, Digest, Geometry, VolumeDigest,
    ZeroDigests,
};
use rayon::prelude::*;

use super::flush::Flusher;
use crate::codec::{DataFrame, Encoding, Message};
use crate::error::{Error, Result};
use crate::net::Outbox;
use crate::stats::{add, Figures};
use crate::volume::Volume;

/// The destination acknowledges compared chunks this often.
pub const ACK_EVERY: u64 = 1024;

/// DATA frames verified together on all cores.
const DATA_BATCH: usize = 32;

/// Segments of local digests from the target's scan.
pub type LocalDigests = Receiver<Result<(u64, Vec<ChunkSummary>)>>;

/// How a session applies the source's messages.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Chunks the source may announce beyond those settled.
    pub window: u32,
    /// After the final fsync, read the target back and check the volume digest of the bytes read.
    pub read_back: bool,
}

/// The session state that applies the source's messages to the target.
pub struct Apply {
    target: Arc<Volume>,
    geometry: Geometry,
    zeros: ZeroDigests,
    local: LocalDigests,
    local_ready: VecDeque<ChunkSummary>,
    out: Outbox,
    figures: Arc<Figures>,
    window: u64,
    /// The next chunk index DIGESTS must announce.
    next: u64,
    last_ack: u64,
    /// Source digests of chunks with an open NEED, and whether the target chunk was all zeros.
    open: HashMap<u64, (Digest, bool)>,
    finals: FinalDigests,
    end: Option<Digest>,
    /// A run of zeroing not yet issued: (offset, len).
    zero_run: Option<(u64, u64)>,
    /// Background fsyncs while the sync runs.
    flusher: Option<Flusher>,
    read_back: bool,
    /// The target's size when the session opened it: another writer that truncates or extends it shows here.
    target_size: u64,
}

impl Apply {
    /// A worker for one session.
    pub fn new(
        target: Arc<Volume>,
        geometry: Geometry,
        local: LocalDigests,
        out: Outbox,
        figures: Arc<Figures>,
        options: Options,
    ) -> Self {
        Apply {
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
            finals: FinalDigests::new(geometry),
            end: None,
            zero_run: None,
            flusher: None,
        }
    }

    /// Applies messages until the sync is durable and verified; returns the volume digest.
    pub fn run(mut self, inbox: &mut tokio::sync::mpsc::Receiver<Message>) -> Result<Digest> {
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
                    self.on_digests(first, &digests)?;
                    self.acknowledge()?;
                }
                Message::Data(d) => {
                    let mut batch = vec![d];
                    while batch.len() < DATA_BATCH {
                        match inbox.try_recv() {
                            Ok(Message::Data(d)) => batch.push(d),
                            Ok(other) => {
                                held = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.on_data(batch)?;
                    self.acknowledge()?;
                }
                Message::End {
                    chunk_count,
                    volume_size,
                    digest,
                } => {
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

    fn finish(mut self) -> Result<Digest> {
        self.flush_zero_run()?;
        let flushing = std::time::Instant::now();
        if let Some(f) = self.flusher.take() {
            f.finish()?;
        }
        self.target.sync()?;
        tracing::info!("target fsynced in {:.2}s", flushing.elapsed().as_secs_f64());
        let ours = self.finals.finish()?;
        let theirs = self.end.unwrap_or(ours);
        if ours != theirs {
            return Err(Error::VolumeDigestMismatch {
                source_digest: theirs.to_hex(),
                destination_digest: ours.to_hex(),
            });
        }
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
        Ok(ours)
    }

    fn send(&self, msg: Message) -> Result<()> {
        self.out
            .blocking_send(msg)
            .map_err(|_| Error::PeerClosed("sync"))
    }

    fn next_local(&mut self) -> Result<ChunkSummary> {
        loop {
            if let Some(s) = self.local_ready.pop_front() {
                return Ok(s);
            }
            match self.local.recv() {
                Ok(Ok((_, summaries))) => self.local_ready.extend(summaries),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Cancelled("target scan ended early")),
            }
        }
    }

    fn on_digests(&mut self, first: u64, digests: &[Digest]) -> Result<()> {
        let count = self.geometry.chunk_count();
        let through = first + digests.len() as u64;
        if first != self.next || through > count {
            return Err(Error::Protocol(format!(
                "DIGESTS for chunks {first}..{through}, expected from {} (volume has {count})",
                self.next
            )));
        }
        if through - self.last_ack > self.window {
            return Err(Error::Protocol(format!(
                "the source announced {} chunks past the last ACK, beyond the window of {}",
                through - self.last_ack,
                self.window
            )));
        }
        for (i, theirs) in (first..).zip(digests) {
            let ours = self.next_local()?;
            if ours.digest == *theirs {
                self.finals.push(i, ours.digest);
            } else if *theirs == self.zeros.for_chunk(i) {
                add(&self.figures.chunks_changed, 1);
                add(&self.figures.zero_chunks, 1);
                let (offset, len) = self.geometry.chunk_range(i);
                self.zero(offset, len as u64)?;
                self.finals.push(i, *theirs);
            } else {
                add(&self.figures.chunks_changed, 1);
                let blocks = if ours.zero {
                    None
                } else {
                    Some(block_digests(&self.read_chunk(i)?))
                };
                self.open.insert(i, (*theirs, ours.zero));
                self.send(Message::Need { chunk: i, blocks })?;
            }
            self.next = i + 1;
        }
        Ok(())
    }

    /// Sends ACK for the chunks *settled* in order: compared, and written when they needed data. Acknowledging
    /// only settled chunks is what bounds the open NEEDs by the window (see "Flow control" in the protocol). An
    /// ACK goes out every quarter window, and whenever the destination has caught up with the announcements.
    fn acknowledge(&mut self) -> Result<()> {
        let settled = self.finals.settled();
        let every = (self.window / 4).clamp(1, ACK_EVERY);
        // Caught up (every announced chunk settled): the source may be waiting for exactly this credit.
        let due = settled - self.last_ack >= every || settled == self.next;
        if settled > self.last_ack && due {
            self.last_ack = settled;
            self.send(Message::Ack { through: settled })?;
        }
        Ok(())
    }

    fn read_chunk(&self, chunk: u64) -> Result<Vec<u8>> {
        let (offset, len) = self.geometry.chunk_range(chunk);
        let mut buf = vec![0u8; len];
        self.target.read_exact_at(&mut buf, offset)?;
        add(&self.figures.bytes_read, len as u64);
        Ok(buf)
    }

    /// Verifies a batch of DATA frames on all cores; each worker writes the data blocks of the chunks it verified,
    /// and zero blocks are then issued in order (merged into runs).
    fn on_data(&mut self, batch: Vec<DataFrame>) -> Result<()> {
        let mut claimed = Vec::with_capacity(batch.len());
        for d in batch {
            let Some((expected, target_zero)) = self.open.remove(&d.chunk) else {
                return Err(Error::Protocol(format!(
                    "DATA for chunk {} that has no open NEED (unsolicited, replayed or duplicated)",
                    d.chunk
                )));
            };
            claimed.push((d, expected, target_zero));
        }
        let written: Vec<Result<()>> = {
            let (target, geometry, figures) = (&*self.target, self.geometry, &*self.figures);
            claimed
                .par_iter()
                .map(|(d, expected, tz)| {
                    verify_and_write(target, geometry, figures, d, *expected, *tz)
                })
                .collect()
        };
        if self.flusher.is_none() {
            self.flusher = Some(Flusher::new(self.target.clone())?);
        }
        for ((d, expected, _), result) in claimed.into_iter().zip(written) {
            result?;
            if let Some(f) = &mut self.flusher {
                f.wrote(u64::from(d.raw_len));
            }
            let (offset, len) = self.geometry.chunk_range(d.chunk);
            for (b0, b1) in runs(d.zero_mask) {
                let start = block_range(len, b0).start as u64;
                let end = block_range(len, b1 - 1).end as u64;
                self.zero(offset + start, end - start)?;
            }
            let f = &self.figures;
            add(&f.chunks_sent, 1);
            add(&f.blocks_sent, u64::from(d.send_mask.count_ones()));
            add(&f.zero_blocks, u64::from(d.zero_mask.count_ones()));
            add(&f.data_bytes, u64::from(d.raw_len));
            add(&f.compressed_bytes, d.payload.len() as u64);
            self.finals.push(d.chunk, expected);
        }
        Ok(())
    }

    /// Zeroes a range, merging adjacent ranges into one call.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
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

/// Rebuilds a chunk (the target's bytes with the DATA's blocks replaced or zeroed), checks it against the source's
/// digest, and only then writes its data blocks. Zero blocks are left to the caller. Buffers are per worker thread:
/// a fresh 64 KiB allocation per chunk showed up as page faults and unmapping in profiles.
fn verify_and_write(
    target: &Volume,
    geometry: Geometry,
    figures: &Figures,
    d: &DataFrame,
    expected: Digest,
    target_zero: bool,
) -> Result<()> {
    thread_local! {
        static BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }
    BUFFERS.with(|cell| {
        let (scratch, chunk) = &mut *cell.borrow_mut();
        let (offset, len) = geometry.chunk_range(d.chunk);
        let raw = decoded(d, len, scratch)?;
        if raw.len() == len {
            // Every block travelled (a chunk copied whole): the payload is the chunk, hashed and written in place.
            if Digest::of(raw) != expected {
                return Err(Error::DigestMismatch { chunk: d.chunk });
            }
            return target.write_all_at(raw, offset);
        }
        chunk.resize(len, 0);
        if !target_zero {
            target.read_exact_at(chunk, offset)?;
            add(&figures.bytes_read, len as u64);
        }
        // The buffer holds the previous chunk: every block is either sent, zeroed, or (when the target chunk is
        // all zeros) zero-filled here; otherwise it was just read from the target.
        let mut at = 0;
        for b in 0..blocks_in(len) {
            let r = block_range(len, b);
            if d.send_mask & (1 << b) != 0 {
                let n = r.len();
                chunk[r].copy_from_slice(&raw[at..at + n]);
                at += n;
            } else if target_zero || d.zero_mask & (1 << b) != 0 {
                chunk[r].fill(0);
            }
        }
        if Digest::of(chunk) != expected {
            return Err(Error::DigestMismatch { chunk: d.chunk });
        }
        for (b0, b1) in runs(d.send_mask) {
            let (start, end) = (block_range(len, b0).start, block_range(len, b1 - 1).end);
            target.write_all_at(&chunk[start..end], offset + start as u64)?;
        }
        Ok(())
    })
}

/// Checks a DATA frame's masks and lengths against its chunk and decodes its payload (zstd capped at `raw_len`).
pub fn decode_payload(d: &DataFrame, chunk_len: usize) -> Result<Vec<u8>> {
    let mut scratch = Vec::new();
    decoded(d, chunk_len, &mut scratch).map(<[u8]>::to_vec)
}

/// [`decode_payload`] without copies: a raw payload is borrowed, a zstd one is decompressed into `scratch`.
fn decoded<'a>(d: &'a DataFrame, chunk_len: usize, scratch: &'a mut Vec<u8>) -> Result<&'a [u8]> {
    let blocks = blocks_in(chunk_len);
    let valid = if blocks == 64 {
        u64::MAX
    } else {
        (1u64 << blocks) - 1
    };
    let bad = |why: String| Error::Protocol(format!("DATA for chunk {}: {why}", d.chunk));
    if d.send_mask & d.zero_mask != 0 || (d.send_mask | d.zero_mask) & !valid != 0 {
        return Err(bad(
            "block masks overlap or name blocks outside the chunk".into()
        ));
    }
    let expected: usize = (0..blocks)
        .filter(|b| d.send_mask & (1 << b) != 0)
        .map(|b| block_range(chunk_len, b).len())
        .sum();
    if d.raw_len as usize != expected {
        return Err(bad(format!(
            "raw_len {} but its blocks hold {expected}",
            d.raw_len
        )));
    }
    match d.encoding {
        Encoding::Raw if d.payload.len() == expected => Ok(&d.payload),
        Encoding::Raw => Err(bad(format!(
            "raw payload of {} bytes, expected {expected}",
            d.payload.len()
        ))),
        Encoding::Zstd if d.payload.len() >= expected => {
            Err(bad("a zstd payload no smaller than its raw data".into()))
        }
        Encoding::Zstd => match decompress(&d.payload, expected, scratch) {
            Ok(n) if n == expected => Ok(&scratch[..n]),
            Ok(n) => Err(bad(format!(
                "zstd payload decompresses to {n} bytes, expected {expected}"
            ))),
            Err(e) => Err(bad(format!(
                "zstd payload does not decompress within {expected} bytes: {e}"
            ))),
        },
    }
}

/// zstd decompression into `out`, refused beyond `capacity` bytes, with one reusable context per thread.
fn decompress(payload: &[u8], capacity: usize, out: &mut Vec<u8>) -> std::io::Result<usize> {
    thread_local! {
        static CONTEXT: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    }
    if out.len() < capacity {
        out.resize(capacity, 0);
    }
    CONTEXT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress_to_buffer(payload, &mut out[..capacity]),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

/// Runs of set bits as half-open block ranges.
fn runs(mask: u64) -> impl Iterator<Item = (u32, u32)> {
    let mut m = mask;
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let start = m.trailing_zeros();
        let len = (m >> start).trailing_ones();
        m &= !(((1u128 << len) - 1) as u64) << start;
        Some((start, start + len))
    })
}

/// The volume digest of what the target holds, fed in any order within the window and hashed in chunk order.
struct FinalDigests {
    digest: VolumeDigest,
    waiting: BTreeMap<u64, Digest>,
    count: u64,
}

impl FinalDigests {
    fn new(geometry: Geometry) -> Self {
        FinalDigests {
            digest: VolumeDigest::new(geometry),
            waiting: BTreeMap::new(),
            count: geometry.chunk_count(),
        }
    }

    fn push(&mut self, chunk: u64, digest: Digest) {
        self.waiting.insert(chunk, digest);
        while let Some(d) = self.waiting.remove(&self.digest.chunks()) {
            self.digest.push(&d);
        }
    }

    /// Chunks settled in order: every chunk below this index has its final digest.
    fn settled(&self) -> u64 {
        self.digest.chunks()
    }

    fn finish(&self) -> Result<Digest> {
        if self.digest.chunks() != self.count || !self.waiting.is_empty() {
            return Err(Error::Protocol(format!(
                "only {} of {} chunks are settled",
                self.digest.chunks(),
                self.count
            )));
        }
        Ok(self.digest.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(send: u64, zero: u64, enc: Encoding, raw_len: u32, payload: Vec<u8>) -> DataFrame {
        DataFrame {
            chunk: 0,
            send_mask: send,
            zero_mask: zero,
            encoding: enc,
            raw_len,
            payload: Bytes::from(payload),
        }
    }

    #[test]
    fn runs_split_a_mask_into_consecutive_blocks() {
        assert_eq!(runs(0b0111_0110).collect::<Vec<_>>(), vec![(1, 3), (4, 7)]);
        assert_eq!(runs(u64::MAX).collect::<Vec<_>>(), vec![(0, 64)]);
        assert_eq!(runs(0).count(), 0);
    }

    #[test]
    fn payload_checks_reject_inconsistent_frames() {
        let ok = decode_payload(&frame(0b1, 0, Encoding::Raw, 4096, vec![1; 4096]), 65536);
        assert_eq!(ok.expect("valid").len(), 4096);
        let overlap = frame(0b1, 0b1, Encoding::Raw, 4096, vec![1; 4096]);
        assert!(decode_payload(&overlap, 65536).is_err());
        let outside = frame(1 << 16, 0, Encoding::Raw, 4096, vec![1; 4096]);
        assert!(decode_payload(&outside, 65536).is_err());
        let wrong_len = frame(0b11, 0, Encoding::Raw, 4096, vec![1; 4096]);
        assert!(decode_payload(&wrong_len, 65536).is_err());
        let short_last = frame(0b10, 0, Encoding::Raw, 100, vec![1; 100]);
        assert!(decode_payload(&short_last, 4196).is_ok());
    }

    #[test]
    fn decompression_is_capped_at_raw_len() {
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).expect("compress");
        let err =
            decode_payload(&frame(0b1, 0, Encoding::Zstd, 4096, bomb), 65536).expect_err("bomb");
        assert!(
            err.to_string().contains("does not decompress within 4096"),
            "{err}"
        );
        let inflated = zstd::bulk::compress(&[7u8; 10], 3).expect("compress");
        let err = decode_payload(&frame(0b1, 0, Encoding::Zstd, 4096, inflated), 65536)
            .expect_err("short");
        assert!(err.to_string().contains("expected 4096"), "{err}");
    }

    #[test]
    fn final_digests_reorder_within_the_window() -> anyhow::Result<()> {
        let g = Geometry::new(3 * 65536, 65536).map_err(anyhow::Error::msg)?;
        let ds = [Digest::of(b"0"), Digest::of(b"1"), Digest::of(b"2")];
        let mut f = FinalDigests::new(g);
        f.push(1, ds[1]);
        assert!(f.finish().is_err());
        f.push(2, ds[2]);
        f.push(0, ds[0]);
        let mut v = VolumeDigest::new(g);
        ds.iter().for_each(|d| v.push(d));
        assert_eq!(f.finish()?, v.finish());
        Ok(())
    }
}
