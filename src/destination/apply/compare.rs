//! DIGESTS: the source's announced chunks compared with the target's scan (a full comparison) or with the target
//! chunks read now (a delta), and a NEED for each that differs.

use rayon::prelude::*;

use super::{Apply, Open};
use crate::chunk::{block_digests, is_zero, ChunkSummary, Digest};
use crate::codec::Message;
use crate::error::{Error, Result};
use crate::stats::add;

/// Whether a target chunk (`ours`) must answer the source's `theirs` with a NEED carrying its block digests: it
/// differs, the source's chunk is not zeros (those are zeroed without data) and the target's is not (its blocks
/// are all zeros: a NEED without digests says so).
fn needs_blocks(ours: &ChunkSummary, theirs: &Digest, zero_digest: &Digest) -> bool {
    ours.digest != *theirs && theirs != zero_digest && !ours.zero
}

/// A target chunk as the comparison knows it.
struct Local {
    /// Its digest; `None` when a delta did not hash it.
    digest: Option<Digest>,
    /// It is all zeros.
    zero: bool,
    /// The digests of its blocks, when it will need data.
    blocks: Option<Vec<Digest>>,
}

impl Local {
    fn hashed(summary: ChunkSummary, blocks: Option<Vec<Digest>>) -> Self {
        Local {
            digest: Some(summary.digest),
            zero: summary.zero,
            blocks,
        }
    }
}

/// A delta session's announced chunks compared together.
pub(super) const DIGESTS_BATCH: usize = 256;

impl Apply {
    fn next_local(&mut self) -> Result<ChunkSummary> {
        loop {
            if let Some(s) = self.local_ready.pop_front() {
                return Ok(s);
            }
            let Some(local) = &self.local else {
                return Err(Error::Protocol("a delta session has no target scan".into()));
            };
            match local.recv() {
                Ok(Ok((_, summaries))) => self.local_ready.extend(summaries),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Cancelled("target scan ended early")),
            }
        }
    }

    pub(super) fn on_digests(&mut self, frames: &[(u64, Vec<Digest>)]) -> Result<()> {
        let count = self.geometry.chunk_count();
        let mut next = self.next;
        for (first, digests) in frames {
            let (first, through) = (*first, first + digests.len() as u64);
            // A delta session announces only the chunks that differ from the base: it may skip ahead, never back.
            let in_order = first == next || (self.delta && first > next);
            if !in_order || through > count {
                return Err(Error::Protocol(format!(
                    "DIGESTS for chunks {first}..{through}, expected from {next} (volume has {count})"
                )));
            }
            if self.pending.len() as u64 + digests.len() as u64 > self.window {
                return Err(Error::Protocol(format!(
                    "the source announced {} chunks past the last ACK, beyond the window of {}",
                    self.pending.len() + digests.len(),
                    self.window
                )));
            }
            self.pending.extend(first..through);
            next = through;
        }
        let announced = || {
            frames
                .iter()
                .flat_map(|(first, digests)| (*first..).zip(digests))
        };
        let local: Vec<Local> = if self.delta {
            let announced: Vec<(u64, &Digest)> = announced().collect();
            let known = self.known_announced(&announced)?;
            self.read_announced(announced, known)?
        } else {
            let mut local = Vec::with_capacity(frames.iter().map(|(_, d)| d.len()).sum());
            let mut changed = Vec::new();
            for (i, theirs) in announced() {
                let ours = self.next_local()?;
                self.check_drift(i, &ours)?;
                if needs_blocks(&ours, theirs, &self.zeros.for_chunk(i)) {
                    changed.push((local.len(), i));
                }
                local.push(Local::hashed(ours, None));
            }
            for ((at, _), blocks) in changed.iter().zip(self.read_block_digests(&changed)?) {
                local[*at].blocks = Some(blocks);
            }
            local
        };
        for ((i, theirs), ours) in announced().zip(local) {
            if self.delta {
                // Every chunk skipped before this one is equal to the base.
                self.finals.base_through(i)?;
            }
            if ours.digest == Some(*theirs) {
                self.finals.push(i, *theirs)?;
            } else if *theirs == self.zeros.for_chunk(i) {
                add(&self.figures.chunks_changed, 1);
                add(&self.figures.zero_chunks, 1);
                let (offset, len) = self.geometry.chunk_range(i);
                self.zero(offset, len as u64)?;
                self.finals.push(i, *theirs)?;
            } else {
                add(&self.figures.chunks_changed, 1);
                let blocks = match (ours.zero, ours.blocks) {
                    (true, _) => None,
                    (false, Some(b)) => Some(b),
                    (false, None) => Some(self.target_block_digests(i)?),
                };
                self.open.insert(
                    i,
                    Open {
                        expected: *theirs,
                        blocks: blocks.clone(),
                    },
                );
                self.finals.hold(i);
                self.send(Message::Need { chunk: i, blocks })?;
            }
            self.next = i + 1;
        }
        Ok(())
    }

    /// A delta session reads only the target chunks the source announced, on all cores, and hashes the blocks of
    /// those that will need data, not the chunks: the source announced each because it differs from the base, and
    /// the destination's manifest says the target holds the base. A target chunk of zeros needs no hashing to be
    /// known. One that holds the announced bytes after all (written behind the manifest's back) costs a NEED whose
    /// DATA carries no blocks, and is checked like any other before it is settled.
    /// The chunks `known` already describes (see [`Apply::known_announced`]) are not read.
    fn read_announced(
        &self,
        announced: Vec<(u64, &Digest)>,
        known: Vec<Option<Local>>,
    ) -> Result<Vec<Local>> {
        let zeros = &self.zeros;
        let unknown: Vec<(u64, &Digest)> = announced
            .iter()
            .zip(&known)
            .filter(|(_, k)| k.is_none())
            .map(|(a, _)| *a)
            .collect();
        let mut read = self
            .read_target_chunks(
                unknown,
                |(i, _)| *i,
                |(i, theirs), buf| {
                    if is_zero(buf) {
                        Local::hashed(zeros.zero_summary(i), None)
                    } else {
                        let blocks = (*theirs != zeros.for_chunk(i)).then(|| block_digests(buf));
                        Local {
                            digest: None,
                            zero: false,
                            blocks,
                        }
                    }
                },
            )?
            .into_iter();
        known
            .into_iter()
            .map(|k| {
                k.or_else(|| read.next())
                    .ok_or_else(|| Error::Protocol("a target chunk read went missing".into()))
            })
            .collect()
    }

    /// A delta's announced chunks as the destination's manifest and block digests describe them, without reading
    /// the target: a chunk of zeros in the base is zeros, and one whose entry in the block digests file merges into
    /// the base's digest has those block digests (the same trust as every chunk the session does not read: the
    /// target holds the base). `None` for a chunk that must be read.
    fn known_announced(&mut self, announced: &[(u64, &Digest)]) -> Result<Vec<Option<Local>>> {
        let Some(file) = self.blocks.clone() else {
            return Ok(announced.iter().map(|_| None).collect());
        };
        file.prefetch(announced.iter().map(|&(i, _)| i));
        announced
            .iter()
            .map(|&(i, theirs)| {
                let base = self.finals.base_digest(i)?;
                let zero = self.zeros.for_chunk(i);
                if base == zero {
                    return Ok(Some(Local::hashed(self.zeros.zero_summary(i), None)));
                }
                let len = self.geometry.chunk_range(i).1;
                Ok(file.known(i, len, base).map(|blocks| Local {
                    digest: None,
                    zero: false,
                    blocks: (*theirs != zero).then_some(blocks),
                }))
            })
            .collect()
    }

    /// The block digests of the target chunks of a full comparison that will need data (`(_, chunk)` pairs), read
    /// on all cores. After a direct scan they are not in the page cache, so all their reads are started first.
    fn read_block_digests(&self, chunks: &[(usize, u64)]) -> Result<Vec<Vec<Digest>>> {
        let geometry = self.geometry;
        self.target.will_need(chunks.iter().map(|(_, i)| {
            let (offset, len) = geometry.chunk_range(*i);
            (offset, len as u64)
        }));
        let chunks = chunks.iter().map(|(_, i)| *i).collect();
        self.read_target_chunks(chunks, |i| *i, |_, buf| block_digests(buf))
    }

    /// Reads the target chunk of each item (`chunk_of` says which) on all cores, into a buffer each worker keeps,
    /// and maps the item and the chunk's bytes with `f`; counts what was read.
    fn read_target_chunks<I: Send, T: Send>(
        &self,
        items: Vec<I>,
        chunk_of: impl Fn(&I) -> u64 + Sync,
        f: impl Fn(I, &[u8]) -> T + Sync,
    ) -> Result<Vec<T>> {
        let (target, geometry, figures) = (&*self.target, self.geometry, &*self.figures);
        items
            .into_par_iter()
            .map(|item| {
                thread_local! {
                    static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                let (offset, len) = geometry.chunk_range(chunk_of(&item));
                BUFFER.with(|cell| {
                    let mut buf = cell.borrow_mut();
                    buf.resize(len, 0);
                    target.read_exact_at(&mut buf, offset)?;
                    add(&figures.bytes_read, len as u64);
                    Ok(f(item, &buf))
                })
            })
            .collect()
    }

    /// A full comparison with a manifest: a target chunk that does not hold what the manifest says was written by
    /// something else (or the manifest is stale); this comparison repairs it, and says so.
    fn check_drift(&mut self, chunk: u64, ours: &ChunkSummary) -> Result<()> {
        let Some(base) = &mut self.drift else {
            return Ok(());
        };
        let expected = base.digest(chunk).map_err(|e| {
            Error::ManifestDamaged(format!("the destination's, at chunk {chunk}: {e}"))
        })?;
        if expected != ours.digest {
            let n = self
                .figures
                .target_drift
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n <= 8 {
                tracing::warn!(
                    "target chunk {chunk} does not hold what the destination's manifest says: something else wrote the target; this full comparison repairs it"
                );
            }
        }
        Ok(())
    }
}
