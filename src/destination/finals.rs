//! The volume digest of what the target holds, and the manifest that records it.
//!
//! Chunks settle in any order within the window; their digests are hashed in chunk order. In a delta session the
//! chunks the source did not announce hold what the destination's manifest (the base) says: the base is read in
//! step with the chunk order, so a gap of a million chunks costs no memory.

use std::collections::{BTreeMap, BTreeSet};

use crate::chunk::{Digest, Geometry, VolumeDigest};
use crate::error::{Error, Result};
use crate::manifest::{NextManifest, Patch, Writer};

/// The final digest of every chunk, in chunk order.
pub struct FinalDigests {
    /// A full comparison: the volume digest of every chunk's digest.
    digest: VolumeDigest,
    /// Every chunk below this one has its final digest.
    settled: u64,
    waiting: BTreeMap<u64, Digest>,
    count: u64,
    /// Delta: the base, and the next manifest as changes to it.
    patch: Option<Patch>,
    /// Delta: every chunk below this that was not announced is equal to the base.
    base_through: u64,
    /// Delta: announced chunks not settled yet (a NEED is open).
    held: BTreeSet<u64>,
    /// A full comparison: the next manifest, fed in chunk order.
    sink: Option<Writer>,
}

impl FinalDigests {
    /// For a session of `geometry`: a delta's `patch` (its base and the next manifest), or a full comparison's
    /// `sink` for the next manifest.
    pub fn new(geometry: Geometry, patch: Option<Patch>, sink: Option<Writer>) -> Self {
        FinalDigests {
            digest: VolumeDigest::new(geometry),
            settled: 0,
            waiting: BTreeMap::new(),
            count: geometry.chunk_count(),
            sink: if patch.is_some() { None } else { sink },
            patch,
            base_through: 0,
            held: BTreeSet::new(),
        }
    }

    /// Chunk `chunk` was announced and waits for its DATA.
    pub fn hold(&mut self, chunk: u64) {
        self.held.insert(chunk);
    }

    /// Chunk `chunk` holds `digest` now.
    pub fn push(&mut self, chunk: u64, digest: Digest) -> Result<()> {
        self.held.remove(&chunk);
        self.waiting.insert(chunk, digest);
        self.advance()
    }

    /// Delta: the base's digest of `chunk` (the destination's manifest), checked as it is read.
    pub fn base_digest(&mut self, chunk: u64) -> Result<Digest> {
        let patch = self
            .patch
            .as_mut()
            .ok_or_else(|| Error::Protocol("a full comparison has no base".into()))?;
        patch.base().digest(chunk).map_err(|e| {
            Error::ManifestDamaged(format!("the destination's, at chunk {chunk}: {e}"))
        })
    }

    /// Delta: every chunk below `through` that was not announced is equal to the base.
    pub fn base_through(&mut self, through: u64) -> Result<()> {
        self.base_through = self.base_through.max(through);
        self.advance()
    }

    fn advance(&mut self) -> Result<()> {
        loop {
            let c = self.settled;
            if c >= self.count || self.held.contains(&c) {
                return Ok(());
            }
            let Some(own) = self.waiting.remove(&c) else {
                if self.patch.is_none() || c >= self.base_through {
                    return Ok(());
                }
                // Chunk `c` and those after it up to the next held or settled one (or the end of what the base
                // covers) hold what the base says: nothing to read or hash.
                let mut end = self.base_through.min(self.count);
                if let Some(&h) = self.held.range(c..).next() {
                    end = end.min(h);
                }
                if let Some((&w, _)) = self.waiting.range(c..).next() {
                    end = end.min(w);
                }
                self.settled = end;
                continue;
            };
            match &mut self.patch {
                Some(patch) => {
                    let damaged = |e: std::io::Error| {
                        Error::ManifestDamaged(format!("the destination's, at chunk {c}: {e}"))
                    };
                    if patch.base().digest(c).map_err(damaged)? != own {
                        patch.set(c, own).map_err(damaged)?;
                    }
                }
                None => {
                    self.digest.push(&own);
                    if let Some(w) = &mut self.sink {
                        if let Err(e) = w.push(&own) {
                            tracing::warn!("the destination's manifest will not be kept: {e}");
                            self.sink = None;
                        }
                    }
                }
            }
            self.settled += 1;
        }
    }

    /// Chunks settled in order: every chunk below this index has its final digest.
    pub fn settled(&self) -> u64 {
        self.settled
    }

    /// The volume digest, once every chunk settled, and the next manifest.
    pub fn finish(&mut self) -> Result<(Digest, Option<NextManifest>)> {
        if self.settled != self.count || !self.waiting.is_empty() {
            return Err(Error::Protocol(format!(
                "only {} of {} chunks are settled",
                self.settled, self.count
            )));
        }
        match self.patch.take() {
            Some(mut patch) => {
                let digest = patch
                    .volume_digest()
                    .map_err(|e| Error::ManifestDamaged(format!("the destination's: {e}")))?;
                Ok((digest, Some(NextManifest::Patch(Box::new(patch)))))
            }
            None => Ok((
                self.digest.finish(),
                self.sink.take().map(|w| NextManifest::Whole(Box::new(w))),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Expect, Meta, Role, Store, SyncKind, BULK_DIGESTS};

    #[test]
    fn final_digests_reorder_within_the_window() -> anyhow::Result<()> {
        let g = Geometry::new(3 * 65536, 65536).map_err(anyhow::Error::msg)?;
        let ds = [Digest::of(b"0"), Digest::of(b"1"), Digest::of(b"2")];
        let mut f = FinalDigests::new(g, None, None);
        f.push(1, ds[1])?;
        assert!(f.finish().is_err());
        f.push(2, ds[2])?;
        f.push(0, ds[0])?;
        let mut v = VolumeDigest::new(g);
        ds.iter().for_each(|d| v.push(d));
        assert_eq!(f.finish()?.0, v.finish());
        Ok(())
    }

    /// Commits `old` as the destination's manifest (identity "t") in `store`: the base a delta reads.
    fn base_of(store: &Store, g: Geometry, old: &[Digest]) -> anyhow::Result<Expect> {
        let mut w = store.writer(Role::Destination, g, "t")?;
        let mut v = VolumeDigest::new(g);
        for d in old {
            w.push(d)?;
            v.push(d);
        }
        w.commit(Meta {
            volume_digest: v.finish(),
            kind: SyncKind::Full,
            last_full_unix_ms: 0,
            deltas_since_full: 0,
            stamp: 0,
        })?;
        Ok(Expect {
            identity: "t".into(),
            geometry: g,
            stamp: 0,
        })
    }

    #[test]
    fn a_delta_takes_the_base_for_the_chunks_not_announced_and_waits_for_held_ones(
    ) -> anyhow::Result<()> {
        let g = Geometry::new(6 * 65536, 65536).map_err(anyhow::Error::msg)?;
        let old: Vec<Digest> = (0..6u8).map(|i| Digest::of(&[i])).collect();
        let store = Store::memory(1 << 20);
        let expect = base_of(&store, g, &old)?;
        let base = store.patch(store.load(Role::Destination, &expect)?);
        let new2 = Digest::of(b"new 2");
        let mut f = FinalDigests::new(g, Some(base), None);
        f.hold(2);
        f.base_through(4)?;
        assert_eq!(f.settled(), 2, "chunk 2 is held: nothing past it settles");
        f.push(2, new2)?;
        assert_eq!(f.settled(), 4);
        f.base_through(6)?;
        let mut want = VolumeDigest::new(g);
        for (i, d) in old.iter().enumerate() {
            want.push(if i == 2 { &new2 } else { d });
        }
        assert_eq!(f.finish()?.0, want.finish());
        Ok(())
    }

    #[test]
    fn long_runs_of_base_digests_settle_around_held_and_settled_chunks() -> anyhow::Result<()> {
        // More chunks than one bulk copy, with held and settled chunks inside and at the edges of the runs.
        let n = 2 * BULK_DIGESTS + 777;
        let g = Geometry::new(n * 65536, 65536).map_err(anyhow::Error::msg)?;
        let old: Vec<Digest> = (0..n).map(|i| Digest::of(&i.to_le_bytes())).collect();
        let store = Store::memory(1 << 24);
        let expect = base_of(&store, g, &old)?;
        let changed = [
            0,
            1,
            BULK_DIGESTS - 1,
            BULK_DIGESTS,
            BULK_DIGESTS + 5,
            n - 1,
        ];
        let new = |i: u64| Digest::of(format!("new {i}").as_bytes());
        let patch = store.patch(store.load(Role::Destination, &expect)?);
        let mut f = FinalDigests::new(g, Some(patch), None);
        for &c in &changed {
            f.hold(c);
        }
        f.base_through(BULK_DIGESTS + 100)?;
        assert_eq!(f.settled(), 0, "chunk 0 is held");
        f.push(0, new(0))?;
        assert_eq!(f.settled(), 1, "chunk 1 is held");
        f.push(BULK_DIGESTS, new(BULK_DIGESTS))?;
        f.push(1, new(1))?;
        assert_eq!(f.settled(), BULK_DIGESTS - 1);
        f.push(BULK_DIGESTS - 1, new(BULK_DIGESTS - 1))?;
        assert_eq!(f.settled(), BULK_DIGESTS + 5);
        f.push(BULK_DIGESTS + 5, new(BULK_DIGESTS + 5))?;
        assert_eq!(
            f.settled(),
            BULK_DIGESTS + 100,
            "the base covers no further yet"
        );
        f.base_through(n)?;
        assert_eq!(f.settled(), n - 1);
        f.push(n - 1, new(n - 1))?;
        let mut want = VolumeDigest::new(g);
        for (i, d) in old.iter().enumerate() {
            let i = i as u64;
            want.push(&if changed.contains(&i) { new(i) } else { *d });
        }
        let (digest, next) = f.finish()?;
        assert_eq!(digest, want.finish());
        // The next manifest holds the same digests, in order: a changes file of the chunks that changed.
        let Some(NextManifest::Patch(patch)) = next else {
            panic!("a delta's next manifest is a patch");
        };
        patch.commit(Meta {
            volume_digest: digest,
            kind: SyncKind::ChangeList,
            last_full_unix_ms: 0,
            deltas_since_full: 1,
            stamp: 0,
        })?;
        let mut r = store.load(Role::Destination, &expect)?;
        assert_eq!(r.changed(), changed.len() as u64);
        for (i, d) in old.iter().enumerate() {
            let i = i as u64;
            assert_eq!(
                r.next_digest()?,
                if changed.contains(&i) { new(i) } else { *d },
                "chunk {i}"
            );
        }
        Ok(())
    }
}
