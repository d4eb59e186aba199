//! BLOCKS (protocol 5, with its cover since 7, in a delta by manifest too since 8): the source pushes the blocks its
//! change list names, or whose digests differ from its base's, with the chunk's digest and the cover of its other
//! blocks (`chunk::cover`). The destination reads only its target's listed blocks (nothing, with their digests in
//! `destination.blocks`): with the cover they must give its base's digest of the chunk, and with the pushed blocks
//! the source's; then it writes them. A chunk that does not verify (the list missed a changed block of it, or the
//! target's listed blocks drifted from the base) is asked for with NEED and block digests, as any announced chunk
//! of a full session would be.

use rayon::prelude::*;

use super::{on_cores, Apply, Open};
use crate::chunk::{block_digests, is_zero, Digest, Geometry};
use crate::codec::{DataFrame, Message};
use crate::destination::verify::{decode_lanes, verify_pushed};
use crate::error::{Error, Result};
use crate::manifest::BlockFile;
use crate::stats::{add, Figures};
use crate::volume::Volume;

/// A BLOCKS frame's fields.
pub struct Push {
    /// The source's digest of the chunk.
    pub digest: Digest,
    /// The cover of its blocks the frame does not carry.
    pub cover: Vec<Digest>,
    /// The listed blocks.
    pub data: DataFrame,
}

impl Apply {
    /// Pushed chunks (BLOCKS): announced like DIGESTS entries, in order and within the window, and verified with
    /// their blocks on all cores. A chunk whose blocks do not rebuild the source's is asked for with NEED.
    pub(super) fn on_blocks(&mut self, batch: Vec<Push>) -> Result<()> {
        if !self.pushes {
            return Err(Error::Protocol("BLOCKS outside a delta session".into()));
        }
        let count = self.geometry.chunk_count();
        let mut next = self.next;
        let mut bases = Vec::with_capacity(batch.len());
        if let Some(file) = &self.blocks {
            file.prefetch(batch.iter().map(|p| p.data.chunk));
        }
        for p in &batch {
            let chunk = p.data.chunk;
            if chunk < next || chunk >= count {
                return Err(Error::Protocol(format!(
                    "BLOCKS for chunk {chunk}, expected from {next} (volume has {count})"
                )));
            }
            if self.pending.len() as u64 >= self.window {
                return Err(Error::Protocol(format!(
                    "the source announced {} chunks past the last ACK, beyond the window of {}",
                    self.pending.len() + 1,
                    self.window
                )));
            }
            self.pending.push_back(chunk);
            let base = self.finals.base_digest(chunk)?;
            let len = self.geometry.chunk_range(chunk).1;
            let known = self.blocks.as_ref().and_then(|f| f.known(chunk, len, base));
            bases.push((base, known));
            next = chunk + 1;
        }
        let (mut frames, pushes): (Vec<DataFrame>, Vec<(Digest, Vec<Digest>)>) = batch
            .into_iter()
            .map(|p| (p.data, (p.digest, p.cover)))
            .unzip();
        let wire = decode_lanes(&mut frames, &mut self.lanes)?;
        self.before_write()?;
        let outcomes: Vec<Result<Pushed>> = {
            let (target, geometry, figures) = (&*self.target, self.geometry, &*self.figures);
            let file = self.blocks.as_deref();
            let one = |i: usize| {
                let (d, (expected, cover), (base, known)) = (&frames[i], &pushes[i], &bases[i]);
                let target_now = (d, *expected, cover.as_slice());
                apply_pushed(
                    target,
                    geometry,
                    figures,
                    target_now,
                    *base,
                    known.as_deref(),
                    file,
                )
            };
            match on_cores(&frames) {
                true => (0..frames.len()).into_par_iter().map(one).collect(),
                false => (0..frames.len()).map(one).collect(),
            }
        };
        for (((d, (expected, _)), outcome), wire) in
            frames.iter().zip(pushes).zip(outcomes).zip(wire)
        {
            // Every chunk skipped before this one is equal to the base.
            self.finals.base_through(d.chunk)?;
            let f = &self.figures;
            add(&f.chunks_changed, 1);
            add(&f.pushed_chunks, 1);
            add(&f.compressed_bytes, wire as u64);
            match outcome? {
                Pushed::Written => self.settle_written(d, expected)?,
                Pushed::Differs(blocks) => {
                    add(&self.figures.push_missed, 1);
                    self.open.insert(
                        d.chunk,
                        Open {
                            expected,
                            blocks: blocks.clone(),
                        },
                    );
                    self.finals.hold(d.chunk);
                    self.send(Message::Need {
                        chunk: d.chunk,
                        blocks,
                    })?;
                }
            }
            self.next = d.chunk + 1;
        }
        Ok(())
    }
}

/// What became of a pushed chunk.
#[derive(Debug, PartialEq)]
enum Pushed {
    /// It verified, and its data blocks are written (its zero blocks are left to the caller).
    Written,
    /// It did not: the NEED to send, with the target chunk's block digests (`None`: the target chunk is zeros).
    Differs(Option<Vec<Digest>>),
}

/// Checks one pushed chunk (its frame, the source's digest of it and its cover) against `base` (the manifest's
/// digest of it, and the target chunk's block digests when `known`), writing its data blocks, and its block
/// digests to `file`, if it verifies; if not, reads the whole target chunk for its NEED.
fn apply_pushed(
    target: &Volume,
    geometry: Geometry,
    figures: &Figures,
    (d, expected, cover): (&DataFrame, Digest, &[Digest]),
    base: Digest,
    known: Option<&[Digest]>,
    file: Option<&BlockFile>,
) -> Result<Pushed> {
    match verify_pushed(target, geometry, figures, d, expected, cover, (base, known)) {
        Ok(now) => {
            if let (Some(file), Some(now)) = (file, now) {
                file.write(d.chunk, &now);
            }
            Ok(Pushed::Written)
        }
        Err(Error::DigestMismatch { .. }) => {
            let (offset, len) = geometry.chunk_range(d.chunk);
            let mut chunk = vec![0u8; len];
            target.read_exact_at(&mut chunk, offset)?;
            add(&figures.bytes_read, len as u64);
            Ok(Pushed::Differs(
                (!is_zero(&chunk)).then(|| block_digests(&chunk)),
            ))
        }
        Err(e) => Err(e),
    }
}

/// Logs the pushed chunks that needed more than their listed blocks, once per session of `kind`.
pub fn report_misses(figures: &Figures, kind: crate::codec::SyncKind) {
    let missed = figures
        .push_missed
        .load(std::sync::atomic::Ordering::Relaxed);
    if missed > 0 && kind == crate::codec::SyncKind::Manifest {
        // The source found the blocks that differ by hashing, so what differs is the target: its listed blocks,
        // read here without their digests in `destination.blocks`, no longer hold the base.
        tracing::warn!(
            "{missed} pushed chunks did not verify against the target's manifest (their target blocks changed \
             since the last sync, behind the destination's back): compared and repaired block by block in this \
             sync; other such writes are found only by a full comparison (--verify full)"
        );
    } else if missed > 0 {
        tracing::warn!(
            "{missed} chunks of the change list changed in blocks the list did not name: compared and repaired \
             block by block in this sync; a tracker that misses blocks may miss whole chunks, which only a full \
             comparison finds (--verify full)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{block_range, cover, BLOCK_SIZE};
    use crate::codec::Encoding;
    use bytes::Bytes;
    use std::sync::atomic::Ordering;

    const CHUNK: usize = 65536;
    const BLOCK: usize = BLOCK_SIZE as usize;

    /// A pushed chunk 1 of a three-chunk target: the source's chunk, its frame (blocks in `sent` changed and sent,
    /// those in `zeroed` zeros) and the cover of the blocks the frame does not carry.
    struct Case {
        source: Vec<u8>,
        frame: DataFrame,
        cover: Vec<Digest>,
    }

    fn case(base: &[u8], sent: u64, zeroed: u64, unlisted_change: Option<usize>) -> Case {
        let mut source = base.to_vec();
        let mut payload = Vec::new();
        for b in 0..16u32 {
            let r = block_range(CHUNK, b);
            if sent & (1 << b) != 0 {
                source[r.clone()]
                    .iter_mut()
                    .for_each(|x| *x = x.wrapping_add(1));
                payload.extend_from_slice(&source[r]);
            } else if zeroed & (1 << b) != 0 {
                source[r].fill(0);
            }
        }
        if let Some(b) = unlisted_change {
            source[b * BLOCK + 7] ^= 0x80;
        }
        let cover = cover(&block_digests(&source), CHUNK, sent | zeroed);
        let frame = DataFrame {
            chunk: 1,
            send_mask: sent,
            zero_mask: zeroed,
            encoding: Encoding::Raw,
            raw_len: payload.len() as u32,
            payload: Bytes::from(payload),
        };
        Case {
            source,
            frame,
            cover,
        }
    }

    #[test]
    fn a_pushed_chunk_is_checked_from_its_cover_and_the_targets_listed_blocks_only(
    ) -> anyhow::Result<()> {
        use rand::{RngCore, SeedableRng};
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("t.img");
        let mut data = vec![0u8; 3 * CHUNK];
        rand_chacha::ChaCha8Rng::seed_from_u64(3).fill_bytes(&mut data);
        let g = Geometry::new(data.len() as u64, CHUNK as u32).map_err(anyhow::Error::msg)?;
        let base = data[CHUNK..2 * CHUNK].to_vec();
        let base_digest = Digest::of(&base);
        let now = |target: &Volume| -> anyhow::Result<Vec<u8>> {
            let mut chunk = vec![0u8; CHUNK];
            target.read_exact_at(&mut chunk, CHUNK as u64)?;
            Ok(chunk)
        };
        let blocks_file = BlockFile::open(&dir.path().join("destination.blocks"), g)?;
        let run_known = |c: &Case,
                         target_chunk: &[u8],
                         known: Option<&[Digest]>|
         -> anyhow::Result<(Result<Pushed>, u64, Vec<u8>)> {
            let mut bytes = data.clone();
            bytes[CHUNK..2 * CHUNK].copy_from_slice(target_chunk);
            std::fs::write(&path, &bytes)?;
            let mut target = Volume::open_target(&path)?;
            target.allow_writes_below(bytes.len() as u64)?;
            let figures = Figures::default();
            let expected = Digest::of(&c.source);
            let out = apply_pushed(
                &target,
                g,
                &figures,
                (&c.frame, expected, &c.cover),
                base_digest,
                known,
                Some(&blocks_file),
            );
            Ok((
                out,
                figures.bytes_read.load(Ordering::Relaxed),
                now(&target)?,
            ))
        };
        let run = |c: &Case, target_chunk: &[u8]| run_known(c, target_chunk, None);
        let (sent, zeroed) = ((1u64 << 3) | (1 << 9), 1u64 << 12);

        // The list is right: only the three listed blocks are read, the two data blocks written.
        let right = case(&base, sent, zeroed, None);
        let (out, read, after) = run(&right, &base)?;
        assert_eq!(out?, Pushed::Written);
        assert_eq!(
            read,
            3 * BLOCK as u64,
            "only the listed blocks of the target are read"
        );
        for b in 0..16 {
            let r = block_range(CHUNK, b);
            let is = if sent & (1 << b) != 0 {
                &right.source[r.clone()]
            } else {
                &base[r.clone()]
            };
            assert_eq!(
                &after[r], is,
                "block {b} (zero blocks are left to the caller)"
            );
        }

        // The list missed a changed block of the chunk: the cover does not give the base's digest. The whole target
        // chunk is read for the NEED, and nothing is written.
        let missed = case(&base, sent, zeroed, Some(5));
        let (out, read, after) = run(&missed, &base)?;
        assert_eq!(out?, Pushed::Differs(Some(block_digests(&base))));
        assert_eq!(read, (3 * BLOCK + CHUNK) as u64);
        assert_eq!(after, base, "nothing written");

        // A listed block of the target drifted from the base: asked for with NEED too.
        let mut drifted = base.clone();
        drifted[9 * BLOCK] ^= 1;
        let (out, _, after) = run(&right, &drifted)?;
        assert_eq!(out?, Pushed::Differs(Some(block_digests(&drifted))));
        assert_eq!(after, drifted, "nothing written");

        // A payload that does not rebuild the source's chunk is refused the same way.
        let mut tampered = case(&base, sent, zeroed, None);
        let mut payload = tampered.frame.payload.to_vec();
        payload[0] ^= 1;
        tampered.frame.payload = Bytes::from(payload);
        let (out, _, after) = run(&tampered, &base)?;
        assert!(matches!(out?, Pushed::Differs(_)));
        assert_eq!(after, base, "nothing written");

        // The documented trust (PROTOCOL.md, "Why a delta sync is safe"): a target block outside the list that
        // drifted from the base is not read, so not seen; the next full comparison finds it.
        let mut behind = base.clone();
        behind[BLOCK] ^= 1;
        let (out, read, _) = run(&right, &behind)?;
        assert_eq!((out?, read), (Pushed::Written, 3 * BLOCK as u64));

        // Every block listed: nothing of the target is read.
        let whole = case(&base, 0xffff & !zeroed, zeroed, None);
        assert!(whole.cover.is_empty());
        let (out, read, _) = run(&whole, &base)?;
        assert_eq!((out?, read), (Pushed::Written, 0));

        // With the target chunk's block digests known (the destination's block digests file): nothing of the
        // target is read, and the chunk's new block digests are kept. A missed block is still caught (the cover
        // does not give the base's digest); a listed block that drifted is now trusted like the unlisted ones.
        let known = block_digests(&base);
        let (out, read, _) = run_known(&right, &base, Some(&known))?;
        assert_eq!((out?, read), (Pushed::Written, 0));
        assert_eq!(
            blocks_file.read(1, 16),
            Some(block_digests(&right.source)),
            "the chunk's block digests as written"
        );
        let (out, read, after) = run_known(&missed, &base, Some(&known))?;
        assert_eq!(out?, Pushed::Differs(Some(block_digests(&base))));
        assert_eq!((read, after), (CHUNK as u64, base.clone()));
        let (out, read, _) = run_known(&right, &drifted, Some(&known))?;
        assert_eq!((out?, read), (Pushed::Written, 0));

        // A cover that does not fit the listed blocks, and a frame that lists nothing, are protocol violations.
        let mut short = case(&base, sent, zeroed, None);
        short.cover.pop();
        let mut none = case(&base, 0, 0, None);
        none.cover = right.cover.clone();
        for (bad, needle) in [(short, "cover does not fit"), (none, "no block listed")] {
            let (out, _, after) = run(&bad, &base)?;
            let err = out.expect_err("a protocol violation");
            assert!(
                matches!(&err, Error::Protocol(m) if m.contains(needle)),
                "{err}"
            );
            assert_eq!(after, base, "nothing written");
        }
        Ok(())
    }
}
