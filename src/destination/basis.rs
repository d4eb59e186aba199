//! The destination's half of agreeing on a delta: its own manifest of the target, checked against the source's
//! offer, and the manifest it keeps after a successful sync.

use std::sync::Arc;

use crate::chunk::{Digest, Geometry};
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
    let expect = delta::target_identity(target).map(|(identity, stamp)| Expect {
        identity,
        geometry,
        stamp,
    });
    let loaded = match expect {
        Ok(expect) => store.load(Role::Destination, &expect),
        Err(e) => Err(manifest::Unusable::Unreadable(format!(
            "cannot stat the target: {e}"
        ))),
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
            basis.kind = offer.kind;
            basis.reason = Fallback::None;
        }
    }
    basis.base = Some(base);
    basis
}

impl Basis {
    /// Keeps the manifest of what the target now holds (durable, verified): `identity` is taken now, after the
    /// session's writes. A manifest that cannot be kept is logged; the next sync then compares in full.
    pub fn commit(&self, writer: Writer, volume_digest: Digest, target: &Volume) {
        let (last_full, deltas) = match (self.kind, self.previous) {
            (SyncKind::Full, _) | (_, None) => (self.started_ms, 0),
            (_, Some((last, n))) => (last, n.saturating_add(1)),
        };
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
