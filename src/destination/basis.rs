//! The destination's half of agreeing on a delta: its own manifest of the target, checked against the source's
//! offer, and the manifest it keeps after a successful sync.

use std::sync::Arc;

use rayon::prelude::*;

use crate::chunk::{Digest, Geometry, ZeroDigests};
use crate::codec::{Fallback, Offer, SyncKind};
use crate::delta::{self, Policy};
use crate::manifest::{self, Expect, Meta, NextManifest, Reader, Role, Sealed, Store};
use crate::volume::Volume;

/// What a session compares against, and what it needs to keep the next manifest.
pub struct Basis {
    /// The session's kind.
    pub kind: SyncKind,
    /// Why it is a full comparison.
    pub reason: Fallback,
    /// The destination's manifest of the target: the base of a delta, or what a full comparison checks the
    /// target's scan against.
    pub base: Option<Reader>,
    /// Where manifests are kept.
    pub store: Arc<Store>,
    /// The base's last full comparison and the deltas since.
    previous: Option<(u64, u32)>,
    started_ms: u64,
}

/// Decides the session's kind from the source's offer and the destination's own manifest of `target`.
pub fn decide(
    store: &Arc<Store>,
    policy: &Policy,
    offer: &Offer,
    target: &Volume,
    geometry: Geometry,
) -> Basis {
    let mut basis = Basis {
        kind: SyncKind::Full,
        reason: offer.reason,
        base: None,
        store: store.clone(),
        previous: None,
        started_ms: delta::now_ms(),
    };
    if !store.keeps_state() {
        if offer.kind.is_delta() {
            basis.reason = Fallback::DestinationNoState;
        }
        return basis;
    }
    let loaded = match expect_of(target, geometry) {
        Ok(expect) => store.load(Role::Destination, &expect),
        Err(e) => Err(manifest::Unusable::Unreadable(e)),
    };
    let base = match loaded {
        Ok(b) => b,
        Err(why) => {
            if why != manifest::Unusable::Missing {
                tracing::warn!("ignoring the destination's manifest: {why}");
            }
            if offer.kind.is_delta() {
                basis.reason = Fallback::DestinationNoManifest;
            }
            return basis;
        }
    };
    let mut base = base;
    let h = base.header().clone();
    basis.previous = Some((h.last_full_unix_ms, h.deltas_since_full));
    let due = policy.periodic_due(h.deltas_since_full, h.last_full_unix_ms, basis.started_ms);
    if offer.kind.is_delta() {
        if policy.full_requested() {
            basis.reason = Fallback::DestinationVerify;
        } else if due {
            basis.reason = Fallback::DestinationPeriodic;
        } else if h.volume_digest != offer.base {
            basis.reason = Fallback::BasesDiffer;
        } else if let Err(e) = verified(&mut base, offer.kind) {
            tracing::warn!("ignoring the destination's manifest: damaged manifest: {e}");
            basis.reason = Fallback::DestinationNoManifest;
            return basis;
        } else {
            // The manifest is whole and of this target; check that the target still holds it before trusting it.
            match spot_check(&mut base, target, geometry) {
                Err(SpotCheck::Damaged(e)) => {
                    tracing::warn!("ignoring the destination's manifest: damaged manifest: {e}");
                    basis.reason = Fallback::DestinationNoManifest;
                    return basis;
                }
                Ok(()) => {
                    basis.kind = offer.kind;
                    basis.reason = Fallback::None;
                    basis.base = Some(base);
                    return basis;
                }
                Err(SpotCheck::Differs(why)) => {
                    tracing::warn!("not trusting the destination's manifest: {why}");
                    basis.reason = Fallback::DestinationTargetChanged;
                }
            }
        }
    }
    // A full comparison reads every digest of the manifest, to count (and repair) what differs from it.
    match base.verify_all() {
        Ok(()) => basis.base = Some(base),
        Err(e) => tracing::warn!("ignoring the destination's manifest: damaged manifest: {e}"),
    }
    basis
}

/// Checks every page of `base` first when a delta of `kind` reads them all anyway (by manifest: the source
/// announces chunks all over the volume), so that a damaged manifest means a full comparison rather than a failure
/// halfway through. A delta by change list reads only the pages it touches, and checks those as it reads them.
fn verified(base: &mut Reader, kind: SyncKind) -> std::io::Result<()> {
    match kind {
        SyncKind::ChangeList => Ok(()),
        _ => base.verify_all(),
    }
}

/// What the destination's manifest of `target` must match.
fn expect_of(target: &Volume, geometry: Geometry) -> Result<Expect, String> {
    delta::target_identity(target)
        .map(|(identity, stamp)| Expect {
            identity,
            geometry,
            stamp,
        })
        .map_err(|e| format!("cannot stat the target: {e}"))
}

/// Why a spot check failed.
enum SpotCheck {
    /// A page of the manifest it read does not hold what the page table says.
    Damaged(std::io::Error),
    /// The target does not hold what the manifest says.
    Differs(String),
}

/// Pages of the manifest the spot check draws its chunks from, at most.
const SPOT_PAGES: usize = 4 * delta::SPOT_CHECKS;

/// Reads [`delta::SPOT_CHECKS`] chunks of the target, chosen at random among those the manifest says are not
/// zero (topped up with zero chunks when there are too few), and compares them with the manifest. The chunks are
/// drawn from at most [`SPOT_PAGES`] pages of the manifest chosen at random (every page of a volume up to 16 GiB in
/// 64 KiB chunks), so that the check reads a few MiB of a large manifest, not all of it.
fn spot_check(base: &mut Reader, target: &Volume, geometry: Geometry) -> Result<(), SpotCheck> {
    let zeros = ZeroDigests::new(geometry);
    let mut rng = rand::rng();
    let mut data = Reservoir::new(delta::SPOT_CHECKS);
    let mut zero = Reservoir::new(delta::SPOT_CHECKS);
    let pages = base.pages();
    let count = pages.count() as usize;
    let mut picked: Vec<u64> = match count <= SPOT_PAGES {
        true => (0..pages.count()).collect(),
        false => rand::seq::index::sample(&mut rng, count, SPOT_PAGES)
            .into_iter()
            .map(|p| p as u64)
            .collect(),
    };
    picked.sort_unstable();
    let mut buf = Vec::new();
    for p in picked {
        // A page's first digest (but page 0's) is also the previous page's last: counted there.
        let mut chunks = pages.chunks(p);
        chunks.start += u64::from(p > 0);
        buf.resize(((chunks.end - chunks.start) * 32) as usize, 0);
        base.digests(chunks.start, &mut buf)
            .map_err(SpotCheck::Damaged)?;
        for (chunk, bytes) in chunks.zip(buf.chunks_exact(32)) {
            let d = Digest(bytes.try_into().expect("32 bytes"));
            // Every chunk of its kind has the same chance to be checked.
            match d == zeros.for_chunk(chunk) {
                false => data.offer((chunk, d), &mut rng),
                true => zero.offer((chunk, d), &mut rng),
            }
        }
    }
    let (mut data, zero) = (data.items, zero.items);
    let top_up = delta::SPOT_CHECKS.saturating_sub(data.len());
    data.extend(zero.into_iter().take(top_up));
    // All at once to the storage: a target that is not in the page cache (a block device nothing else reads) would
    // otherwise be read one chunk per core at a time, a round trip each on a network disk. (This machine's virtio
    // disk showed no difference: 16 GiB target evicted, the session's set-up 10-17 ms either way.)
    target.prefetch(data.iter().map(|&(chunk, _)| {
        let (offset, len) = geometry.chunk_range(chunk);
        (offset, len as u64)
    }));
    let differs: Vec<u64> = data
        .par_iter()
        .filter_map(|&(chunk, expected)| {
            let (offset, len) = geometry.chunk_range(chunk);
            let mut buf = vec![0u8; len];
            match target.read_exact_at(&mut buf, offset) {
                Ok(()) if Digest::of(&buf) == expected => None,
                _ => Some(chunk),
            }
        })
        .collect();
    match differs.first() {
        None => Ok(()),
        Some(chunk) => Err(SpotCheck::Differs(format!(
            "{} of {} chunks read back differ from it (chunk {chunk} first): the target changed since the last sync",
            differs.len(),
            data.len()
        ))),
    }
}

/// A uniform random sample of at most `k` of the items offered, in one pass over a stream of unknown length,
/// drawing random numbers only when an item is taken (Li's "Algorithm L"): the spot check passes over every chunk
/// of the manifest, 16 million of them for a 1 TiB volume, and a draw per chunk was most of its cost.
struct Reservoir<T> {
    k: usize,
    items: Vec<T>,
    seen: u64,
    /// The number (1-based) of the next offered item to take once the reservoir is full.
    next: u64,
    w: f64,
}

impl<T> Reservoir<T> {
    fn new(k: usize) -> Self {
        Reservoir {
            k,
            items: Vec::with_capacity(k),
            seen: 0,
            next: 0,
            w: 1.0,
        }
    }

    fn offer(&mut self, item: T, rng: &mut impl rand::Rng) {
        self.seen += 1;
        if self.items.len() < self.k {
            self.items.push(item);
            if self.items.len() == self.k {
                self.w = (open_unit(rng).ln() / self.k as f64).exp();
                self.next = self.seen.saturating_add(self.skip(rng));
            }
            return;
        }
        if self.k > 0 && self.seen == self.next {
            let slot = rng.random_range(0..self.k);
            self.items[slot] = item;
            self.w *= (open_unit(rng).ln() / self.k as f64).exp();
            self.next = self.seen.saturating_add(self.skip(rng));
        }
    }

    /// How many items on from the current one the next to take is (at least 1).
    fn skip(&self, rng: &mut impl rand::Rng) -> u64 {
        // Saturating float-to-int: a vanishing w skips past any real stream.
        (open_unit(rng).ln() / (1.0 - self.w).ln()).floor() as u64 + 1
    }
}

/// A random number in (0, 1].
fn open_unit(rng: &mut impl rand::Rng) -> f64 {
    1.0 - rng.random::<f64>()
}

impl Basis {
    /// Writes the manifest `next` will be of the target once it is durable, with `volume_digest`, under a temporary
    /// name (see [`Sealed`]); [`publish`] makes it the manifest. `None` (and a warning) when it cannot be kept: the
    /// next sync then compares in full. The target is not written any more: its stamp (size, mtime) is final.
    pub fn seal(
        &self,
        next: NextManifest,
        volume_digest: Digest,
        target: &Volume,
    ) -> Option<Sealed> {
        let (last_full, deltas) =
            delta::verification_after(self.kind, self.previous, self.started_ms);
        let stamp = match delta::target_identity(target) {
            Ok((_, stamp)) => stamp,
            Err(e) => {
                tracing::warn!(
                    "the destination's manifest was not kept: cannot stat the target: {e}"
                );
                return None;
            }
        };
        let meta = Meta {
            volume_digest,
            stamp,
            kind: self.kind,
            last_full_unix_ms: last_full,
            deltas_since_full: deltas,
        };
        next.seal(meta)
            .map_err(|e| tracing::warn!("the destination's manifest was not kept: {e}"))
            .ok()
    }
}

/// Makes a manifest [`Basis::seal`] wrote the destination's manifest (a warning if it cannot).
pub fn publish(sealed: Sealed) {
    if let Err(e) = sealed.publish() {
        tracing::warn!("the destination's manifest was not kept: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_reservoir_keeps_everything_when_offered_fewer_than_it_holds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut r = Reservoir::new(64);
        (0..40u32).for_each(|i| r.offer(i, &mut rng));
        assert_eq!(r.items, (0..40).collect::<Vec<_>>());
        let mut none = Reservoir::new(0);
        (0..10u32).for_each(|i| none.offer(i, &mut rng));
        assert!(none.items.is_empty());
    }

    #[test]
    fn the_reservoir_samples_every_item_with_the_same_chance() {
        // 64 of 10 000, 2 000 times: each tenth of the stream should get a tenth of the 128 000 picks. With a
        // seeded generator the counts are fixed; the bound (5% of the expected 12 800) is about 4.5 standard
        // deviations, and a reservoir that favoured the early or late items (taking the first k, or every new
        // item) lands far outside it.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut tenths = [0u64; 10];
        for _ in 0..2000 {
            let mut r = Reservoir::new(64);
            (0..10_000u64).for_each(|i| r.offer(i, &mut rng));
            assert_eq!(r.items.len(), 64);
            let mut distinct = r.items.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 64, "an item was taken twice");
            r.items
                .iter()
                .for_each(|i| tenths[(*i / 1000) as usize] += 1);
        }
        for (t, n) in tenths.iter().enumerate() {
            assert!(
                n.abs_diff(12_800) < 640,
                "tenth {t} of the stream got {n} of 128000 picks: {tenths:?}"
            );
        }
    }
}
