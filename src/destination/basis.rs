//! The destination's half of agreeing on a delta: its own manifest of the target, checked against the source's
//! offer, and the manifest it keeps after a successful sync.

use std::sync::Arc;

use rayon::prelude::*;

use crate::chunk::{Digest, Geometry, ZeroDigests};
use crate::codec::{Fallback, Offer, SyncKind};
use crate::delta::{self, Policy};
use crate::manifest::{self, Expect, Meta, Reader, Role, Store, Writer};
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
    let h = base.header();
    basis.previous = Some((h.last_full_unix_ms, h.deltas_since_full));
    let due = policy.periodic_due(h.deltas_since_full, h.last_full_unix_ms, basis.started_ms);
    if offer.kind.is_delta() {
        if policy.full_requested() {
            basis.reason = Fallback::DestinationVerify;
        } else if due {
            basis.reason = Fallback::DestinationPeriodic;
        } else if h.volume_digest != offer.base {
            basis.reason = Fallback::BasesDiffer;
        } else {
            // The manifest is whole and of this target; check that the target still holds it before trusting it.
            let mut base = base;
            let checked = spot_check(&mut base, target, geometry)
                .and_then(|()| base.rewind().map_err(|e| format!("rereading it: {e}")));
            match checked {
                Ok(()) => {
                    basis.kind = offer.kind;
                    basis.reason = Fallback::None;
                }
                Err(why) => {
                    tracing::warn!("not trusting the destination's manifest: {why}");
                    basis.reason = Fallback::DestinationTargetChanged;
                }
            }
            // A full comparison after a failed spot check counts (and repairs) what differs from the manifest.
            basis.base = base.rewind().ok().map(|()| base);
            return basis;
        }
    }
    basis.base = Some(base);
    basis
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

/// Reads [`delta::SPOT_CHECKS`] chunks of the target, chosen at random among those the manifest says are not
/// zero (topped up with zero chunks when there are too few), and compares them with the manifest. Reads `base` to
/// its end.
fn spot_check(base: &mut Reader, target: &Volume, geometry: Geometry) -> Result<(), String> {
    use rand::Rng;
    let zeros = ZeroDigests::new(geometry);
    let mut rng = rand::rng();
    let mut data: Vec<(u64, Digest)> = Vec::new();
    let mut zero: Vec<(u64, Digest)> = Vec::new();
    let (mut seen_data, mut seen_zero) = (0u64, 0u64);
    for chunk in 0..geometry.chunk_count() {
        let d = base
            .next_digest()
            .map_err(|e| format!("reading it at chunk {chunk}: {e}"))?;
        // Reservoir sampling: every chunk of its kind has the same chance to be checked.
        let (pool, seen) = match d == zeros.for_chunk(chunk) {
            false => (&mut data, &mut seen_data),
            true => (&mut zero, &mut seen_zero),
        };
        *seen += 1;
        if pool.len() < delta::SPOT_CHECKS {
            pool.push((chunk, d));
        } else {
            let j = rng.random_range(0..*seen);
            if (j as usize) < delta::SPOT_CHECKS {
                pool[j as usize] = (chunk, d);
            }
        }
    }
    let top_up = delta::SPOT_CHECKS.saturating_sub(data.len());
    data.extend(zero.into_iter().take(top_up));
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
        Some(chunk) => Err(format!(
            "{} of {} chunks read back differ from it (chunk {chunk} first): the target changed since the last sync",
            differs.len(),
            data.len()
        )),
    }
}

impl Basis {
    /// Keeps the manifest of what the target now holds (durable, verified): `identity` is taken now, after the
    /// session's writes. A manifest that cannot be kept is logged; the next sync then compares in full.
    pub fn commit(&self, writer: Writer, volume_digest: Digest, target: &Volume) {
        let (last_full, deltas) =
            delta::verification_after(self.kind, self.previous, self.started_ms);
        let stamp = match delta::target_identity(target) {
            Ok((_, stamp)) => stamp,
            Err(e) => {
                tracing::warn!(
                    "the destination's manifest was not kept: cannot stat the target: {e}"
                );
                return;
            }
        };
        let meta = Meta {
            volume_digest,
            stamp,
            kind: self.kind,
            last_full_unix_ms: last_full,
            deltas_since_full: deltas,
        };
        if let Err(e) = writer.commit(meta) {
            tracing::warn!("the destination's manifest was not kept: {e}");
        }
    }
}
