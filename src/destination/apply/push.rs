//! BLOCKS (protocol 5): in a delta by change list the source pushes the blocks its list names with the chunk's
//! digest. The destination rebuilds the chunk from its target and those blocks and writes them only if it hashes to
//! the digest; a chunk that does not (the list missed a changed block of it, or the target drifted) is asked for
//! with NEED and block digests, as any announced chunk of a full session would be.

use rayon::prelude::*;

use super::{Apply, Open};
use crate::chunk::{block_digests, is_zero, Digest, Geometry};
use crate::codec::{DataFrame, Message};
use crate::destination::verify::{decode_lanes, verify_and_write, Base};
use crate::error::{Error, Result};
use crate::stats::{add, Figures};
use crate::volume::Volume;

impl Apply {
    /// Pushed chunks (BLOCKS): announced like DIGESTS entries, in order and within the window, and verified with
    /// their blocks on all cores. A chunk whose blocks do not rebuild the source's is asked for with NEED.
    pub(super) fn on_blocks(&mut self, batch: Vec<(Digest, DataFrame)>) -> Result<()> {
        if !self.pushes {
            return Err(Error::Protocol(
                "BLOCKS outside a delta by change list".into(),
            ));
        }
        let count = self.geometry.chunk_count();
        let mut next = self.next;
        for (_, d) in &batch {
            if d.chunk < next || d.chunk >= count {
                return Err(Error::Protocol(format!(
                    "BLOCKS for chunk {}, expected from {next} (volume has {count})",
                    d.chunk
                )));
            }
            if self.pending.len() as u64 >= self.window {
                return Err(Error::Protocol(format!(
                    "the source announced {} chunks past the last ACK, beyond the window of {}",
                    self.pending.len() + 1,
                    self.window
                )));
            }
            self.pending.push_back(d.chunk);
            next = d.chunk + 1;
        }
        let (expected, mut frames): (Vec<Digest>, Vec<DataFrame>) = batch.into_iter().unzip();
        let wire = decode_lanes(&mut frames, &mut self.lanes)?;
        self.before_write()?;
        let outcomes: Vec<Result<Pushed>> = {
            let (target, geometry, figures) = (&*self.target, self.geometry, &*self.figures);
            frames
                .par_iter()
                .zip(&expected)
                .map(|(d, e)| apply_pushed(target, geometry, figures, d, *e))
                .collect()
        };
        for (((d, expected), outcome), wire) in frames.iter().zip(expected).zip(outcomes).zip(wire)
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
enum Pushed {
    /// It verified, and its data blocks are written (its zero blocks are left to the caller).
    Written,
    /// It did not: the NEED to send, with the target chunk's block digests (`None`: the target chunk is zeros).
    Differs(Option<Vec<Digest>>),
}

/// Rebuilds and checks one pushed chunk, writing its data blocks if it verifies.
fn apply_pushed(
    target: &Volume,
    geometry: Geometry,
    figures: &Figures,
    d: &DataFrame,
    expected: Digest,
) -> Result<Pushed> {
    match verify_and_write(target, geometry, figures, d, expected, Base::Target) {
        Ok(()) => Ok(Pushed::Written),
        Err(Error::DigestMismatch { .. }) => {
            // Read again: the buffer that failed holds the pushed blocks, not the target's.
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

/// Logs the pushed chunks that needed more than their listed blocks, once per session.
pub fn report_misses(figures: &Figures) {
    let missed = figures
        .push_missed
        .load(std::sync::atomic::Ordering::Relaxed);
    if missed > 0 {
        tracing::warn!(
            "{missed} chunks of the change list changed in blocks the list did not name: compared and repaired \
             block by block in this sync; a tracker that misses blocks may miss whole chunks, which only a full \
             comparison finds (--verify full)"
        );
    }
}
